"""The layers of vlp, read from the source's import statements (every import, at any depth, TYPE_CHECKING ones
too): vlp.runtime is the lowest; vlp/data, vlp/eval, vlp/models.py, vlp/runtime and data_tools never import
vlp.train (at any depth); no two modules import each other, directly or round a longer circle."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BELOW_TRAIN = ("vlp/data", "vlp/eval", "vlp/models.py", "vlp/runtime", "data_tools")
RUNTIME_MAY_NOT = ("vlp.train", "vlp.data", "vlp.eval", "vlp.models", "vlp.curate", "vlp.rewrite")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports (absolute names; `from a import b` is a.b when a.b is a module, else a)."""
    found: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names]
            found.update(n for n in names if _is_module(n))
            if not all(_is_module(n) for n in names):   # a name defined in `base` itself
                found.add(base)
    return found


def _is_module(name: str) -> bool:
    stem = ROOT.joinpath(*name.split("."))
    return stem.with_suffix(".py").is_file() or (stem / "__init__.py").is_file()


def project_modules() -> dict[str, Path]:
    files = [*ROOT.glob("vlp/**/*.py"), *ROOT.glob("data_tools/**/*.py")]
    return {module_name(p): p for p in files}


def test_lower_layers_never_import_train():
    offenders = []
    for name, path in sorted(project_modules().items()):
        rel = str(path.relative_to(ROOT))
        if not rel.startswith(BELOW_TRAIN):
            continue
        bad = sorted(m for m in imports(path) if m == "vlp.train" or m.startswith("vlp.train."))
        offenders += [f"{rel} imports {m}" for m in bad]
    assert not offenders, "\n".join(offenders)


def test_runtime_is_the_lowest_layer():
    offenders = []
    for name, path in sorted(project_modules().items()):
        if name.startswith("vlp.runtime"):
            bad = sorted(m for m in imports(path) if m.startswith(RUNTIME_MAY_NOT))
            offenders += [f"{name} imports {m}" for m in bad]
    assert not offenders, "\n".join(offenders)


def test_no_import_cycles():
    """No circle of modules importing each other, at import time or inside functions (a deferred import that
    closes a circle is still a circle: the two modules cannot be read or moved apart)."""
    modules = project_modules()
    graph = {name: sorted(m for m in imports(path) if m in modules and m != name)
             for name, path in modules.items()}
    cycles, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [node, nxt]) if nxt in trail else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, trail + [node])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert not cycles, "\n".join(cycles)
