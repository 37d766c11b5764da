"""The on-device app must never import torch (laptops get no 700 MB framework), nor open sockets."""

from __future__ import annotations

import ast
import os
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


# The app's whole route in a child where `import torch` fails: profile -> personalize -> ask -> a chat turn
# (the Session the chat drives, free chat and the rating task). PLANT puts a lazy `import torch` into the
# encoder's loader, the kind of import the static check above cannot see: the run must then fail.
FLOW = """
import os, sys
sys.modules["torch"] = None
if os.environ.get("PLANT") == "torch":
    import p2p_local.encoder as enc
    real = enc.Encoder.load.__func__
    def load(cls, *a, **k):
        import torch  # noqa: F401  (the planted bug)
        return real(cls, *a, **k)
    enc.Encoder.load = classmethod(load)
from p2p_local.cli import main
from p2p_local.demo import DEMO_PROFILE, import_demo
from p2p_local.personalize import Session
from p2p_local.store import Store
with Store() as s:
    import_demo(s)
codes = [main(["personalize", DEMO_PROFILE]),
         main(["ask", "Heat (1995) | Genres: Action|Crime", "--profile", DEMO_PROFILE, "--task", "movielens-rating"])]
session = Session.open()
try:
    rating = "".join(session.answer("Heat (1995) | Genres: Action|Crime", profile=DEMO_PROFILE,
                                    task="movielens-rating"))
    chat = "".join(session.answer("Hello, who are you?", profile=DEMO_PROFILE, task=None, max_tokens=8,
                                  transcript=[]))
finally:
    session.close()
assert codes == [0, 0], codes
assert rating.strip() and chat.strip(), (rating, chat)
assert sys.modules.get("torch") is None, "torch was imported"
print("ok")
"""


def run_without_torch(tmp_path: Path, plant: str = "") -> subprocess.CompletedProcess:
    from p2p_local import paths

    env = dict(os.environ, P2P_HOME=str(tmp_path / "home"), P2P_MODELS=str(paths.models_dir()), PLANT=plant)
    return subprocess.run([sys.executable, "-c", FLOW], env=env, capture_output=True, text=True, timeout=600)


def test_personalize_ask_and_chat_run_with_torch_blocked(tmp_path: Path, base_model_path: Path) -> None:
    proc = run_without_torch(tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_a_lazy_torch_import_is_caught(tmp_path: Path, base_model_path: Path) -> None:
    proc = run_without_torch(tmp_path, plant="torch")
    assert proc.returncode != 0 and "torch" in proc.stderr, proc.stderr[-3000:]
