"""Write the tables of supported architectures from the test matrix (tests/test_families.py): the README's short
table (one row per kind) and docs/architectures.md (one row per tested case, and the refusals).

    python tools/architectures.py           # rewrite both
    python tools/architectures.py --check   # exit 1 if either is not what the matrix gives (a test runs this)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGE = ROOT / "docs" / "architectures.md"
START, END = "<!-- architectures: written by tools/architectures.py -->", "<!-- /architectures -->"


def _matrix() -> tuple[list, list]:
    sys.path.insert(0, str(ROOT / "tests"))
    import test_families

    return test_families.FAMILIES, test_families.REFUSED


def _adapter(family: object) -> str:
    lora = {"target_modules": "all-linear", **family.lora}  # type: ignore[attr-defined]
    modules = lora.pop("target_modules")
    parts = [f"`{modules}`" if isinstance(modules, str) else "`" + ", ".join(modules) + "`"]
    parts += [f"{key} `{value}`" for key, value in lora.items()]
    return " + ".join(parts)


def readme_table() -> str:
    families, _ = _matrix()
    kinds: dict[str, list[str]] = {}
    for family in families:
        kinds.setdefault(family.kind, []).append(family.name)
    rows = [f"| {kind} | {', '.join(names)} |" for kind, names in kinds.items()]
    return "\n".join([START, "", "| kind | tested against PEFT's `merge_and_unload` |", "|---|---|", *rows, "",
                      "Each row of [the architecture matrix](docs/architectures.md) is a test: a tiny random model "
                      "from its transformers config, a PEFT adapter, every parameter and the logits compared.", END])


def page() -> str:
    families, refused = _matrix()
    lines = [
        "# Supported architectures",
        "",
        "Generated from the test matrix (`tests/test_families.py`) by `tools/architectures.py`; a test fails when",
        "this page is not what the matrix gives. Each row is a tiny random model built from its transformers",
        "config and saved with `save_pretrained`, a PEFT adapter (the column below) with every trained tensor",
        "random, merged by lorastream with the smallest row blocks, loaded back with `from_pretrained`: every",
        "parameter equals PEFT's `merge_and_unload` bit for bit, and so do the logits on a few tokens.",
        "",
        "| architecture | kind | transformers class | dtype | adapter | note |",
        "|---|---|---|---|---|---|",
        *(f"| {f.name} | {f.kind} | `{f.model_class}` | {str(f.dtype).removeprefix('torch.')} | {_adapter(f)} | "
          f"{f.note} |" for f in families),
        "",
        "## Refused",
        "",
        "These are refused before anything is written (exit status 2, one line naming why); each has a test.",
        "",
        "| case | why |",
        "|---|---|",
        *(f"| {case} | {why} |" for case, why in refused),
        "",
    ]
    return "\n".join(lines)


def _readme_with_table(text: str) -> str:
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{README}: no {START} ... {END} section")
    return pattern.sub(lambda _m: readme_table(), text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that both are current")
    check = parser.parse_args().check
    wanted = {README: _readme_with_table(README.read_text()), PAGE: page()}
    stale = [path for path, text in wanted.items() if not path.exists() or path.read_text() != text]
    if check:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is not current: run python tools/architectures.py", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.write_text(wanted[path])
    return 0


if __name__ == "__main__":
    sys.exit(main())
