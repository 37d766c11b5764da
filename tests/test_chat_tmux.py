"""The chat in a real terminal (issue 26): `p2p chat` in tmux at 80x24, as a user starts it, with the real model.
The footer's keys fit 80 columns, a question gets a reply naming the model, and Ctrl-Q quits. Skipped where
tmux is not installed (the Textual pilot tests in test_chat_ux.py cover the same screens without a terminal)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2p_local import paths

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


def pane(name: str) -> str:
    return subprocess.run(["tmux", "capture-pane", "-p", "-t", name], capture_output=True, text=True).stdout


def wait_for(name: str, what, timeout: float = 90.0) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = pane(name)
        if what(text):
            return text
        time.sleep(0.5)
    raise AssertionError(f"timed out; the screen was:\n{pane(name)}")


def test_the_chat_in_tmux_at_80x24(p2p_home: Path) -> None:
    from p2p_local.cli import main
    from p2p_local.demo import demo_path

    assert main(["profile", "create", "demo", "--task", "movielens-rating"]) == 0
    assert main(["profile", "import", "demo", str(demo_path())]) == 0
    name = f"p2p-test-{p2p_home.parent.name}"[:40]
    env = f"P2P_HOME={shlex.quote(str(p2p_home))} P2P_MODELS={shlex.quote(str(paths.models_dir()))} P2P_THREADS=1"
    cmd = f"env {env} TERM=xterm-256color {shlex.quote(sys.executable)} -m p2p_local.cli chat --profile demo"
    subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "80", "-y", "24", cmd], check=True)
    try:
        screen = wait_for(name, lambda t: "quit" in t and "send" in t)
        footer = screen.rstrip("\n").splitlines()[-1]
        for key in ("send", "quit", "task", "model"):  # every footer key visible at 80 columns
            assert key in footer, footer
        subprocess.run(["tmux", "send-keys", "-t", name, "Heat (1995) | Genres: Action|Crime|Thriller", "Enter"],
                       check=True)
        wait_for(name, lambda t: "gemma3" in t and "★" in t)  # the reply, its stars and the model that answered
        subprocess.run(["tmux", "send-keys", "-t", name, "C-q"], check=True)
        end = time.monotonic() + 20
        while time.monotonic() < end and subprocess.run(["tmux", "has-session", "-t", name],
                                                        capture_output=True).returncode == 0:
            time.sleep(0.3)
        assert subprocess.run(["tmux", "has-session", "-t", name], capture_output=True).returncode != 0, pane(name)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)
