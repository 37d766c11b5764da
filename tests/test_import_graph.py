"""The packages' import graph: no cycle among module-level imports (a newcomer reads each module above the ones it
imports), and the app never imports the code that studies it (`p2p_lab`, `trainer`), not even lazily."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("p2p_local", "p2p_lab", "trainer")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def imports(path: Path, root: Path, modules: set[str], *, top_level: bool) -> set[str]:
    """The package modules `path` imports: at module level (`top_level`, what runs at import time, outside
    `if TYPE_CHECKING`), or anywhere in it."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    if top_level:
        nodes, todo = [], list(tree.body)
        while todo:
            n = todo.pop()
            if isinstance(n, ast.If) and not _type_checking(n):
                todo += n.body + n.orelse
            elif isinstance(n, ast.Try):
                todo += n.body + n.orelse + n.finalbody + [s for h in n.handlers for s in h.body]
            else:
                nodes.append(n)
    else:
        nodes = list(ast.walk(tree))
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: set[str] = set()
    for n in nodes:
        if isinstance(n, ast.Import):
            out |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:
                anchor = package.split(".")[: len(package.split(".")) - (n.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out |= {f"{base}.{a.name}" for a in n.names}
    return {m for m in out if m in modules and m != me}


def graph(root: Path, *, top_level: bool = True) -> dict[str, set[str]]:
    files = {module_name(f, root): f for p in PACKAGES for f in (root / p).rglob("*.py") if (root / p).is_dir()}
    return {m: imports(f, root, set(files), top_level=top_level) for m, f in files.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each a cycle's modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle() -> None:
    g = graph(ROOT)
    assert len(g) > 80  # the three packages were read
    assert cycles(g) == []


def test_the_app_never_imports_what_studies_it() -> None:
    upward = {m: sorted(d for d in deps if not d.startswith("p2p_local"))
              for m, deps in graph(ROOT, top_level=False).items() if m.startswith("p2p_local")}
    assert {m: d for m, d in upward.items() if d} == {}


def test_the_checks_can_fail(tmp_path: Path) -> None:
    pkg = tmp_path / "p2p_local"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from p2p_local import b\n")
    (pkg / "b.py").write_text("from . import a\n\ndef f():\n    from p2p_lab import x\n")
    (tmp_path / "p2p_lab").mkdir()
    (tmp_path / "p2p_lab" / "__init__.py").write_text("")
    (tmp_path / "p2p_lab" / "x.py").write_text("")
    assert cycles(graph(tmp_path)) == [["p2p_local.a", "p2p_local.b"]]
    assert "p2p_lab.x" in graph(tmp_path, top_level=False)["p2p_local.b"]


def test_the_ask_and_hook_path_imports_no_ui() -> None:
    """`p2p ask` and the commit hook run at every `git commit`: Textual (a third of a second to import) stays out."""
    import subprocess
    import sys

    code = ("import sys; import p2p_local.cli, p2p_local.hook, p2p_local.commands.ask, p2p_local.personalize, "
            "p2p_local.tui.titles; print(sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'rich')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_one_command_builds_only_its_group() -> None:
    """`p2p hook run` (every `git commit`) and `p2p ask` parse with their own group only: no other group's modules
    and no plugin (p2p_lab's eval, bench, data) is imported for them; `p2p --help` still lists every command."""
    import subprocess
    import sys

    code = ("import sys; from p2p_local.cli import build_parser; p = build_parser('hook'); "
            "print(sorted(m for m in sys.modules if m.startswith(('p2p_lab', 'p2p_local.commands.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "['p2p_local.commands.args', 'p2p_local.commands.hook']"
    from p2p_local.cli import build_parser

    whole = build_parser().format_help()
    assert all(name in whole for name in ("ask", "hook", "eval", "bench"))
