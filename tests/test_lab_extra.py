"""The lab targets in an app-only install (`make chat` alone): `make data | bench | eval` install the lab
extra first, and a lab command run without it says how to get it and exits 2 (never 70 on a missing module).

An app-only venv is simulated, not built: the lab extra's modules are made unimportable in the child
process (`sys.modules[name] = None`), which is cheap and needs no network; each target's own command,
as `make -n` prints it, runs there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from p2p_lab.commands import LAB_MODULES

ROOT = Path(__file__).resolve().parent.parent
APP_ONLY = ("import sys\n"
            f"for m in {LAB_MODULES!r}: sys.modules[m] = None\n"
            "from p2p_local.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")


def _app_only(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "P2P_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", APP_ONLY, *args], capture_output=True, text=True, env=env,
                          timeout=120, cwd=ROOT)


def _make_commands(target: str, venv: Path) -> list[str]:
    out = subprocess.run(["make", "-n", target, f"VENV={venv}", "ARGS=--task movielens-rating --users 1"],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("target", ["data", "bench", "eval"])
def test_each_lab_target_installs_the_extra_and_its_command_is_guarded(target: str, tmp_path: Path) -> None:
    venv = tmp_path / "venv"  # not there: make prints every step a fresh clone would run
    lines = _make_commands(target, venv)
    install = lines.index(f"{venv}/bin/pip install -e '.[lab]'")
    p2p = [i for i, line in enumerate(lines) if line.startswith(f"{venv}/bin/p2p ") and " models " not in line]
    assert p2p and min(p2p) > install, lines  # the extra goes in before any lab command runs
    for i in p2p:
        args = lines[i].split()[1:]
        r = _app_only(args, tmp_path)
        assert r.returncode == 2, (args, r.stderr)
        assert "needs the lab extra" in r.stderr and "pip install -e '.[lab]'" in r.stderr, r.stderr
        assert "internal error" not in r.stderr and "Traceback" not in r.stderr


def test_help_marks_the_lab_commands_in_an_app_only_install(tmp_path: Path) -> None:
    r = _app_only(["--help"], tmp_path)
    assert r.returncode == 0
    for name in ("data", "bench", "eval"):
        line = next(ln for ln in r.stdout.splitlines() if ln.strip().startswith(name + " "))
        assert "needs the lab extra" in line, line
    r = _app_only(["bench", "--help"], tmp_path)
    assert r.returncode == 2 and "needs the lab extra" in r.stderr


def test_with_the_extra_the_real_commands_are_there(tmp_path: Path) -> None:
    from p2p_lab.commands import missing_lab_modules

    assert missing_lab_modules() == []  # the test venv has the extra (make test installs it)
    env = {**os.environ, "P2P_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "p2p_local.cli", "data", "stats", "--help"], capture_output=True,
                       text=True, env=env, timeout=120, cwd=ROOT)
    assert r.returncode == 0 and "--json" in r.stdout
