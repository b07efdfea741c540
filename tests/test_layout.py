"""The package's parts as folders, and imports that point down the layers (docs/design-notes.md,
"Layers"): flow and nn know nothing of files, the CLI or training, and no module imports back."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "cdc"

# rank of each part: a module may import its own part or a part of lower rank
# cdc/__init__.py is the package's face: its lazy `load` reaches cdc.sample.api, so it ranks at the
# top; modules import only __version__ from it, an edge to "cdc" that the walk leaves out
RANK = {
    "config": 0, "config_checks": -1, "fileio": 0, "interrupt": 0, "redact": -1, "__init__": 9,
    "flow": 1, "nn": 1,
    "data": 2, "train": 3, "eval": 4, "sample": 5, "ablate": 6, "tune": 6,
    "rerun": 7, "cli": 8, "__main__": 9,
}
PURE = {"flow": {"flow"}, "nn": {"nn", "config"}}  # what the tensor parts may import at all


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 2:
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def imports(path: Path, mods: dict[str, Path]) -> set[str]:
    """cdc modules `path` imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            if n in mods and n.startswith("cdc"):
                found.add(n)
    return found


def part(mod: str) -> str:
    return mod.split(".")[1] if "." in mod else "__init__"


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(p, mods) - {m, "cdc"} for m, p in mods.items()}


def test_every_module_belongs_to_a_known_part():
    assert {part(m) for m in graph()} <= set(RANK), sorted({part(m) for m in graph()} - set(RANK))
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert top == [
        "__init__.py", "__main__.py", "config.py", "config_checks.py", "fileio.py", "interrupt.py", "redact.py"
    ]


def test_imports_point_down_the_layers():
    bad = []
    for mod, deps in graph().items():
        for dep in deps:
            p, q = part(mod), part(dep)
            if p != q and RANK[q] >= RANK[p]:
                bad.append(f"{mod} -> {dep}")
            if p in PURE and q not in PURE[p]:
                bad.append(f"{mod} -> {dep} (the {p} part is pure tensor code)")
    assert not bad, bad


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}  # 1 on the DFS stack, 2 done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_the_checker_finds_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The walk itself, on a made-up package: a cycle and flow importing fileio are both caught."""
    import pytest

    fake = tmp_path / "cdc"
    (fake / "flow").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "fileio.py").write_text("from cdc.flow import a\n")
    (fake / "flow" / "__init__.py").write_text("")
    (fake / "flow" / "a.py").write_text("def f():\n    from cdc.fileio import x\n")
    monkeypatch.setattr(__import__(__name__), "PKG", fake)
    with pytest.raises(AssertionError, match="import cycle: cdc.fileio -> cdc.flow.a -> cdc.fileio"):
        test_no_import_cycle()
    with pytest.raises(AssertionError, match="cdc.flow.a -> cdc.fileio"):
        test_imports_point_down_the_layers()
