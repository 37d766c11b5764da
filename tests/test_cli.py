"""`p2p --help` lists every command group; errors map to exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from p2p_local.cli import GROUPS, main


def test_help_lists_the_commands() -> None:
    proc = subprocess.run([sys.executable, "-m", "p2p_local.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for group in GROUPS:
        assert f"    {group}" in proc.stdout, f"`p2p --help` does not list {group}"


def test_no_command_prints_help_and_exits_2(capsys) -> None:
    assert main([]) == 2
    assert "usage: p2p" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["ask", "Q", "--scale", "-1"], ["ask", "Q", "--scale", "nan"], ["ask", "Q", "--scale", "x"],
    ["ask", "Q", "--task", "nope"], ["personalize", "demo", "--task", "nope"], ["chat", "--task", "nope"],
])
def test_bad_scale_or_task_is_a_usage_error_before_any_model_loads(argv, p2p_home, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "error: argument" in capsys.readouterr().err


def test_chat_without_a_terminal_exits_2_at_once(p2p_home) -> None:
    """`p2p chat < /dev/null` (a cron job, a pipe) used to wait forever for keys; it refuses before any model loads."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "p2p_local.cli", "chat"], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "needs a terminal" in proc.stderr and "Traceback" not in proc.stderr


def test_help_wraps_prose_and_keeps_example_lines(monkeypatch, capsys) -> None:
    """One formatter for every command: a description wraps to the terminal, an example line stays whole (a
    wrapped command line could not be pasted), and the examples name the shipped cards' tasks."""
    from p2p_local.commands.args import examples

    monkeypatch.setenv("COLUMNS", "60")
    with pytest.raises(SystemExit):
        main(["chat", "--help"])
    out = capsys.readouterr().out
    prose = out.split("\n\n")[1]  # the description
    assert len(prose.splitlines()) > 1 and all(len(line) <= 60 for line in prose.splitlines())
    ex = examples()
    assert f"  p2p chat --profile me --task {ex['commits']}\n" in out
    assert "p2p chat --model smollm2-135m              # free chat on an instruct model" in out  # > 60 columns, whole
