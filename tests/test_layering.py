"""The architecture's layering, read from the source (every import, function-local ones included):
store ← blend ← api; retrieval stands alone; eval never uses api; no module imports itself back."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("store", "blend", "retrieval", "api", "eval")
FORBIDDEN = {
    "store": {"blend", "api", "retrieval", "eval"},
    "blend": {"api", "retrieval", "eval"},
    "retrieval": {"blend", "store", "api", "eval"},
    "eval": {"api"},
}


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports (`from pkg import name` counts pkg.name when that is a
    module, else pkg)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        out.update(n for n in names if n.split(".")[0] in PACKAGES)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: {i for i in imports_of(p, known) if i in known and i != m} for m, p in mods.items()}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_follow_the_layering(package):
    bad = sorted((m, i) for m, deps in graph().items() if m.split(".")[0] == package
                 for i in deps if i.split(".")[0] in FORBIDDEN[package])
    assert not bad, f"{package}/ must not import {sorted(FORBIDDEN[package])}: {bad}"


def test_no_import_cycle_between_modules():
    g = graph()
    index, low, on_stack, stack, cycles, counter = {}, {}, set(), [], [], [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    assert not cycles, f"modules that import each other: {cycles}"


def test_the_checker_sees_a_forbidden_import(tmp_path):
    """The rules above are only as good as the parser: it must find a function-local import."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from api.service import RagService\n    import eval.metrics\n")
    assert imports_of(src, {"api.service", "eval.metrics"}) == {"api.service", "eval.metrics"}
