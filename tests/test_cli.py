"""`p2p --help` lists every command group; errors map to exit codes."""

from __future__ import annotations

import subprocess
import sys

from p2p_local.cli import GROUPS, main


def test_help_lists_the_commands() -> None:
    proc = subprocess.run([sys.executable, "-m", "p2p_local.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for group in GROUPS:
        assert f"    {group}" in proc.stdout, f"`p2p --help` does not list {group}"


def test_no_command_prints_help_and_exits_2(capsys) -> None:
    assert main([]) == 2
    assert "usage: p2p" in capsys.readouterr().out
