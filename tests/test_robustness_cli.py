"""The CLI's top-level guard, usage errors (exit 2), atomic honest exports and private modes."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from p2p_local import cli
from p2p_local.cli import main as _main
from p2p_local.errors import InternalError


def main(argv: list[str]) -> int:
    """The CLI's exit code, also for argparse's usage errors (SystemExit 2)."""
    try:
        return _main(argv)
    except SystemExit as e:
        return int(e.code or 0)


def test_an_unexpected_exception_is_one_line_a_log_and_its_own_code(p2p_home: Path, monkeypatch, capsys) -> None:
    import p2p_local.commands.profile as profile_cmd

    def boom(args):
        raise RuntimeError("planted bug")

    monkeypatch.setattr(profile_cmd, "cmd_list", boom)
    assert main(["profile", "list"]) == InternalError.exit_code == 70
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("error: internal error (RuntimeError: planted bug)")
    log = Path(err.split("the details are in ")[1].split(". Please")[0])
    assert log.is_file() and "planted bug" in log.read_text() and "Traceback" in log.read_text()
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    monkeypatch.setenv("P2P_DEBUG", "1")
    with pytest.raises(RuntimeError, match="planted bug"):
        _main(["profile", "list"])


@pytest.mark.parametrize(
    "argv",
    [
        ["profile", "create", "alice\n"],
        ["profile", "create", "a/b"],
        ["profile", "show", "alice", "--items", "99999999999999999999999"],
        ["profile", "show", "alice", "--items", "-1"],
        ["profile", "show", "alice", "--items", "9" * 5000],
        ["profile", "edit", "alice", "0", "--output", "1"],
        ["profile", "history", "alice", str(2**70)],
        ["profile", "add", "alice", "--input", "x" * 200_000, "--output", "5"],
        ["profile", "export", "alice", "--mode", "999"],
        ["profile", "create", "bob", "--task", "two words"],
    ],
)
def test_bad_arguments_are_usage_errors(p2p_home: Path, argv: list[str], capsys) -> None:
    assert main(argv) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_exports_to_a_directory_or_a_missing_folder_are_usage_errors(p2p_home: Path, tmp_path: Path, capsys) -> None:
    assert main(["profile", "create", "alice"]) == 0
    assert main(["profile", "export", "alice", "-o", str(tmp_path)]) == 2
    assert main(["profile", "export", "alice", "-o", str(tmp_path / "no" / "such" / "a.json")]) == 2
    assert not (tmp_path / "no").exists()
    assert "Traceback" not in capsys.readouterr().err


def test_invalid_utf8_arguments_are_usage_errors(p2p_home: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "p2p_local.cli", "profile", "show", b"\xff\xfe".decode(
        "utf-8", "surrogateescape")], capture_output=True, env={**os.environ, "P2P_HOME": str(p2p_home)})
    assert proc.returncode == 2
    assert b"Traceback" not in proc.stderr and b"not valid UTF-8" in proc.stderr


def test_export_is_atomic_and_a_full_disk_says_so(p2p_home: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """The issue's "export truncates its target before writing": the old file must survive a failed write."""
    assert main(["profile", "create", "alice", "--task", "movielens-rating"]) == 0
    assert main(["profile", "add", "alice", "--input", "Heat (1995)", "--output", "5", "--time", "1700000000"]) == 0
    target = tmp_path / "alice.json"
    target.write_text("precious old export\n")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", full)
        assert main(["profile", "export", "alice", "-o", str(target)]) == 7
    err = capsys.readouterr().err
    assert "disk full" in err and str(target) in err and "Traceback" not in err
    assert target.read_text() == "precious old export\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".alice")) == []  # no temp left
    assert main(["profile", "export", "alice", "-o", str(target)]) == 0
    assert stat.S_IMODE(target.stat().st_mode) == 0o600 and "Heat" in target.read_text()
    assert main(["profile", "export", "alice", "-o", str(target), "--mode", "644"]) == 0
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_the_data_dir_is_made_private_even_if_it_existed(tmp_path: Path, monkeypatch) -> None:
    from p2p_local import paths

    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    (home / "adapters").mkdir(mode=0o755)
    os.chmod(home, 0o755)
    monkeypatch.setenv("P2P_HOME", str(home))
    monkeypatch.delenv("P2P_MODELS", raising=False)
    assert main(["profile", "list"]) == 0
    paths.adapters_dir()
    for d in (home, home / "adapters"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    assert stat.S_IMODE((home / "p2p.sqlite3").stat().st_mode) == 0o600


def test_broken_pipe_is_quiet(p2p_home: Path) -> None:
    code = ("import sys; from p2p_local.cli import main; sys.exit(main(['profile', 'list', '--json']))")
    proc = subprocess.run(f"{sys.executable} -c \"{code}\" | head -c 0", shell=True, capture_output=True,
                          env={**os.environ, "P2P_HOME": str(p2p_home)})
    assert b"Traceback" not in proc.stderr


def test_guard_covers_stdout_that_cannot_encode(p2p_home: Path, monkeypatch) -> None:
    assert cli.check_argv(["ok", "ünïcode"]) == ["ok", "ünïcode"]


def test_forget_removes_exported_chats(p2p_home: Path) -> None:
    from p2p_local.store import Store
    from p2p_local.tui.chat_export import export_conversation

    with Store() as s:
        s.profiles.create_profile("alice", task="t")
        s.profiles.create_profile("bob", task="t")
        mine = s.conversations.new_conversation("alice", "secret chat")
        s.conversations.add_message(mine, "user", "my secret")
        theirs = s.conversations.new_conversation("bob", "bob's chat")
        mine_md, theirs_md = export_conversation(s, mine), export_conversation(s, theirs)
        s.forget_profile("alice")
    assert not mine_md.exists()
    assert theirs_md.exists()  # another profile's export stays
