"""Print pip constraints pinning every core dependency of pyproject.toml to its declared floor.

`tools/package_check.sh` installs the wheel under these constraints, so the floors we declare are the versions
we test, not a guess.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

# torch is pinned separately to the CPU wheel this project is developed with (see the Makefile's TORCH_SPEC).
SKIP = {"torch"}


def floors(pyproject: Path) -> list[str]:
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    pins = []
    for requirement in dependencies:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][^,;\s]*).*", requirement)
        if match is None:
            sys.exit(f"{pyproject}: dependency {requirement!r} has no '>=' floor")
        name, version = match.groups()
        if name.lower() not in SKIP:
            pins.append(f"{name}=={version}")
    return pins


if __name__ == "__main__":
    print("\n".join(floors(Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml"))))
