"""Check lorastream's structure: no import cycles, exit statuses and dtype-name tables each defined once.

    python tools/check_structure.py [PACKAGE_DIR]     (default: src/lorastream beside this script)

Prints one line per problem and exits 1, or exits 0 when there is none. Standard library only, so it runs
before anything is installed. What it reads:

- Import cycles between the package's modules, counting function-level imports (they still form a cycle,
  only a hidden one) and package `__init__` modules (importing `a.b.c` runs `a/__init__` and `a/b/__init__`
  first), but not imports under `if TYPE_CHECKING:` (never run). Cycles are looked for twice: between modules,
  and between subpackages taken whole (`formats` -> `codecs` -> `formats` is a cycle even when no single module
  imports itself back).
- Exit statuses: outside `errors.py`, no `sys.exit(N)`/`SystemExit(N)` with a literal N other than 0, no
  `exit_code = N` or `exit_code=N` with a literal, no module constant such as `IO_ERROR = 5`.
- dtype-name tables: outside `dtypes.py`, no dict literal mapping names to `torch.<dtype>` (or back).
- Private names: no `from .module import _name` across modules.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ERRORS_MODULE = "errors.py"
DTYPES_MODULE = "dtypes.py"
# Module constants that name an exit status (IO_ERROR = 5, FAILED_JOBS = 6, EXIT_MISMATCH = 4).
_STATUS_NAME = re.compile(r"EXIT|STATUS|_ERROR$|^FAILED|FAILED$")
_EXIT_CALLS = {"exit", "SystemExit", "_exit"}
_TORCH_DTYPES = {"float64", "float32", "float16", "bfloat16", "half", "float", "double", "int64", "int32", "int16",
                 "int8", "uint8", "bool", "float8_e4m3fn", "float8_e5m2", "complex64", "complex128", "long", "int"}


@dataclass
class Module:
    name: str  # dotted, e.g. lorastream.formats.hf; a package by its own name
    path: Path
    is_package: bool
    tree: ast.Module
    imports: dict[str, int] = field(default_factory=dict)  # imported module -> first line


def _modules(root: Path) -> dict[str, Module]:
    found: dict[str, Module] = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        found[name] = Module(name, path, is_package, ast.parse(path.read_text(), str(path)))
    return found


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node that may run: all of them except the bodies of `if TYPE_CHECKING:`."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                yield child
                yield from _runtime_nodes(child)
            continue
        yield node
        yield from _runtime_nodes(node)


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _resolve_imports(module: Module, modules: dict[str, Module], root: str) -> None:
    """Fill `module.imports` with every package module it makes Python load."""
    own_package = module.name if module.is_package else module.name.rpartition(".")[0]
    loading_already = {module.name, *_ancestors(module.name)}

    def add(target: str, line: int) -> None:
        """`target`, and the package `__init__`s Python runs before it (not the root's, nor those of the
        importer's own packages: they are already loading)."""
        if target in modules:
            module.imports.setdefault(target, line)
        for name in _ancestors(target):
            if name in modules and name != root and name not in loading_already:
                module.imports.setdefault(name, line)

    for node in _runtime_nodes(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == root or alias.name.startswith(root + "."):
                    add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = own_package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if not (target == root or target.startswith(root + ".")):
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                add(submodule if submodule in modules else target, node.lineno)
    module.imports.pop(module.name, None)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Per strongly connected component of more than one node (Tarjan), a shortest cycle through each of its
    members, without repeats: every module of a tangle gets named."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    cycles: list[list[str]] = []
    for component in components:
        for start in component:
            if not any(start in cycle for cycle in cycles):
                cycles.append(_closed_path(graph, set(component), start))
    return cycles


def _closed_path(graph: dict[str, set[str]], component: set[str], start: str) -> list[str]:
    """A shortest path from `start` back to itself inside its component."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph.get(node, ()) & component):
                if nxt == start:
                    return [*paths[node], start]
                if nxt not in paths:
                    paths[nxt] = [*paths[node], nxt]
                    following.append(nxt)
        frontier = following
    return [start, start]


def _collapsed(name: str, root: str) -> str:
    """A module's subpackage (lorastream.formats.hf -> lorastream.formats); top-level modules stand alone."""
    return ".".join(name.split(".")[:2]) if name != root else root


def import_cycles(modules: dict[str, Module], root: str) -> list[str]:
    graph = {m.name: set(m.imports) for m in modules.values()}
    problems = [f"{modules[c[0]].path}: import cycle between modules: {' -> '.join(c)}" for c in _cycles(graph)]
    packages: dict[str, set[str]] = {}
    for module in modules.values():
        here = _collapsed(module.name, root)
        packages.setdefault(here, set()).update(t for t in (_collapsed(i, root) for i in module.imports) if t != here)
    # A cycle of top-level modules only is a module cycle, reported above; here, those through a subpackage.
    problems += [f"{modules[c[0]].path}: import cycle between packages: {' -> '.join(c)}"
                 for c in _cycles(packages) if any(modules[n].is_package and n != root for n in c)]
    return problems


def _literal_int(node: ast.AST | None) -> int | None:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return int(node.value)
    return None


def exit_statuses(module: Module) -> list[str]:
    """Exit statuses spelled as numbers outside errors.py (and `exit_code = N` anywhere)."""
    problems = []
    where = f"{module.path}"
    outside = module.path.name != ERRORS_MODULE
    for node in _runtime_nodes(module.tree):
        if isinstance(node, ast.Call):
            called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            status = _literal_int(node.args[0]) if node.args else None
            if outside and called in _EXIT_CALLS and status not in (None, 0):
                problems.append(f"{where}:{node.lineno}: exit status {status} spelled as a number; use "
                                "errors.ExitStatus")
            for keyword in node.keywords:
                status = _literal_int(keyword.value)
                if keyword.arg == "exit_code" and status not in (None, 0):
                    problems.append(f"{where}:{node.lineno}: exit_code={status} spelled as a number; use "
                                    "errors.ExitStatus")
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            status = _literal_int(node.value)
            for target in targets:
                name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
                if status in (None, 0):
                    continue
                if name == "exit_code":
                    problems.append(f"{where}:{node.lineno}: exit_code = {status} spelled as a number; use "
                                    "errors.ExitStatus")
                elif outside and node.col_offset == 0 and _STATUS_NAME.search(name):
                    problems.append(f"{where}:{node.lineno}: exit status {name} = {status} defined outside "
                                    f"{ERRORS_MODULE}")
    return problems


def _is_torch_dtype(node: ast.AST | None) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr in _TORCH_DTYPES and isinstance(node.value, ast.Name)
            and node.value.id == "torch")


def dtype_tables(module: Module) -> list[str]:
    if module.path.name == DTYPES_MODULE:
        return []
    problems = []
    for node in _runtime_nodes(module.tree):
        if isinstance(node, ast.Dict):
            pairs = sum(1 for k, v in zip(node.keys, node.values, strict=True)
                        if (isinstance(k, ast.Constant) and isinstance(k.value, str) and _is_torch_dtype(v))
                        or (_is_torch_dtype(k) and isinstance(v, ast.Constant) and isinstance(v.value, str)))
            if pairs >= 2:
                problems.append(f"{module.path}:{node.lineno}: a dtype-name table outside {DTYPES_MODULE}; use "
                                "the one there")
    return problems


def private_imports(module: Module, root: str) -> list[str]:
    problems = []
    for node in _runtime_nodes(module.tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(root)):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    problems.append(f"{module.path}:{node.lineno}: imports the private name {alias.name} from "
                                    f"{'.' * node.level}{node.module or ''}; make it public or keep it there")
    return problems


def check(package_dir: Path) -> list[str]:
    """Every problem found in the package at `package_dir`, one line each."""
    modules = _modules(package_dir)
    root = package_dir.name
    for module in modules.values():
        _resolve_imports(module, modules, root)
    problems = import_cycles(modules, root)
    for module in modules.values():
        problems += exit_statuses(module) + dtype_tables(module) + private_imports(module, root)
    return problems


def main(argv: list[str]) -> int:
    package_dir = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent / "src" / "lorastream"
    if not (package_dir / "__init__.py").is_file():
        print(f"{package_dir}: not a Python package folder")
        return 1
    problems = check(package_dir)
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
