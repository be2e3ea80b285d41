"""tools/check_structure.py: lorastream itself passes, and each kind of problem planted in a package is caught."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "check_structure.py"


def _check(package: Path) -> tuple[int, list[str]]:
    done = subprocess.run([sys.executable, str(SCRIPT), str(package)], capture_output=True, text=True, check=False)
    assert done.stderr == ""
    return done.returncode, done.stdout.splitlines()


def _package(root: Path, files: dict[str, str]) -> Path:
    package = root / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    return package


def test_lorastream_has_no_cycles_and_one_definition_of_each_table() -> None:
    assert _check(ROOT / "src" / "lorastream") == (0, [])


def test_a_cycle_through_a_function_level_import_is_caught(tmp_path: Path) -> None:
    package = _package(tmp_path, {
        "a.py": "def f():\n    from . import b\n    return b\n",
        "b.py": "from .a import f\n",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .d import X\nY = 1\n",
        "d.py": "from .c import Y\nX = Y\n",
    })
    status, lines = _check(package)
    assert status == 1
    assert lines == [f"{package / 'a.py'}: import cycle between modules: pkg.a -> pkg.b -> pkg.a"]


def test_a_cycle_between_subpackages_is_caught(tmp_path: Path) -> None:
    package = _package(tmp_path, {
        "formats/__init__.py": "", "formats/ref.py": "X = 1\n", "formats/hf.py": "from ..codecs import Source\n",
        "codecs/__init__.py": "from ..formats.ref import X\nSource = X\n",
    })
    status, lines = _check(package)
    assert status == 1
    assert lines == [f"{package / 'codecs' / '__init__.py'}: import cycle between packages: pkg.codecs -> "
                     "pkg.formats -> pkg.codecs"]


def test_a_cycle_through_the_package_init_is_caught(tmp_path: Path) -> None:
    package = _package(tmp_path, {"__init__.py": "VERSION = '1'\nfrom .api import run\n",
                                  "api.py": "from . import VERSION\ndef run(): return VERSION\n"})
    assert _check(package) == (1, [f"{package / '__init__.py'}: import cycle between modules: pkg -> pkg.api -> pkg"])


def test_exit_statuses_dtype_tables_and_private_imports_outside_their_module_are_caught(tmp_path: Path) -> None:
    package = _package(tmp_path, {
        "errors.py": "from enum import IntEnum\nclass ExitStatus(IntEnum):\n    INPUT = 2\n",
        "dtypes.py": "import torch\nNAMES = {'float16': torch.float16, 'float32': torch.float32}\n",
        "cli.py": "import sys\nIO_ERROR = 5\ndef main():\n    sys.exit(4)\n",
        "batch.py": "from .cli import _helper\nclass Outcome:\n    exit_code = 6\n",
        "out.py": "import torch\nNAMES = {torch.bfloat16: 'bfloat16', torch.float16: 'float16'}\n",
    })
    status, lines = _check(package)
    assert status == 1
    assert sorted(lines) == sorted([
        f"{package / 'cli.py'}:2: exit status IO_ERROR = 5 defined outside errors.py",
        f"{package / 'cli.py'}:4: exit status 4 spelled as a number; use errors.ExitStatus",
        f"{package / 'batch.py'}:1: imports the private name _helper from .cli; make it public or keep it there",
        f"{package / 'batch.py'}:3: exit_code = 6 spelled as a number; use errors.ExitStatus",
        f"{package / 'out.py'}:2: a dtype-name table outside dtypes.py; use the one there",
    ])
