"""The on-device app must never import torch (laptops get no 700 MB framework), nor open sockets."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import p2p_local

PKG = Path(p2p_local.__file__).parent


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_module_under_p2p_local_imports_torch_or_network_libraries() -> None:
    offenders = {}
    for f in PKG.rglob("*.py"):
        bad = imported_modules(f) & {"torch", "transformers", "peft", "requests", "urllib3", "httpx", "trainer"}
        if bad:
            offenders[str(f.relative_to(PKG))] = sorted(bad)
    assert not offenders, f"p2p_local must stay torch-free and offline: {offenders}"


def test_every_app_module_imports_with_torch_blocked() -> None:
    """Import every module in a process where `import torch` fails: catches indirect imports too."""
    code = (
        "import sys, importlib, pkgutil\n"
        "sys.modules['torch'] = None\n"  # makes `import torch` raise ImportError
        "import p2p_local\n"
        "for m in pkgutil.walk_packages(p2p_local.__path__, 'p2p_local.'):\n"
        "    importlib.import_module(m.name)\n"
        "print('ok', len(sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-3000:]


def test_the_check_itself_can_fail(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("import os\nfrom torch import nn\n")
    assert "torch" in imported_modules(f)
