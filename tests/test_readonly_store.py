"""A read-only data dir (a read-only mount, a chmod'ed folder): reading commands work, writing ones say why.

The store opens with sqlite's `mode=ro` when the database or its folder cannot be written. We run as root
in CI containers, where chmod stops nothing: the real check uses a read-only bind mount in a private
mount namespace (`unshare -m`), the rest a store opened with `readonly=True`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from p2p_local.cli import main
from p2p_local.errors import StoreError
from p2p_local.store import Store
from p2p_local.store.connection import store_writable


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def filled(p2p_home: Path) -> Path:
    assert main(["profile", "create", "alice", "--task", "movielens-rating"]) == 0
    assert main(["profile", "add", "alice", "--input", "Heat (1995) | Genres: Action", "--output", "5"]) == 0
    return p2p_home / "p2p.sqlite3"


def test_a_readonly_store_reads_and_refuses_writes(filled: Path) -> None:
    before = _digest(filled)
    with Store(readonly=True) as s:
        assert s.readonly
        assert [p.name for p in s.profiles.list_profiles()] == ["alice"]
        assert s.profiles.export_profile("alice")["items"][0]["output"] == "5"
        for write in (lambda: s.profiles.add_item("alice", None, "Up (2009)", "4"), lambda: s.profiles.create_profile("bob"),
                      lambda: s.forget_profile("alice"), lambda: s.conversations.new_conversation("alice")):
            with pytest.raises(StoreError, match="read-only") as e:
                write()
            assert "P2P_HOME" in e.value.hint
    assert _digest(filled) == before
    with Store() as s:  # writable again: the default detects it
        assert not s.readonly and s.profiles.count_items("alice") == 1


def test_writability_is_detected(tmp_path: Path, monkeypatch) -> None:
    assert store_writable(tmp_path / "p2p.sqlite3")
    assert store_writable(tmp_path / "not" / "yet" / "p2p.sqlite3")  # created on first open
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "p2p.sqlite3").write_bytes(b"")
    locked.chmod(0o500)
    if os.geteuid() == 0:  # root passes access(2) whatever the mode: ask as its owner would be answered
        def by_owner_bits(path, mode, **kw):
            bits = os.stat(path).st_mode
            return not (mode & os.W_OK and not bits & 0o200) and not (mode & os.X_OK and not bits & 0o100)
        monkeypatch.setattr("p2p_local.store.connection.os.access", by_owner_bits)
    try:
        assert not store_writable(locked / "p2p.sqlite3")  # the folder: no -wal / -shm could be made
        assert not store_writable(locked / "sub" / "p2p.sqlite3")
        locked.chmod(0o700)
        (locked / "p2p.sqlite3").chmod(0o400)
        assert not store_writable(locked / "p2p.sqlite3")  # the file itself
    finally:
        locked.chmod(0o700)


def test_a_readonly_store_that_needs_an_upgrade_says_so(filled: Path) -> None:
    import sqlite3

    con = sqlite3.connect(filled)
    con.execute("DELETE FROM schema_upgrades WHERE version = (SELECT MAX(version) FROM schema_upgrades)")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="schema upgrade"):
        Store(readonly=True)


def _ro_mount_works() -> bool:
    unshare = shutil.which("unshare")
    if not unshare:
        return False
    probe = subprocess.run([unshare, "-m", "sh", "-c", "mount --bind /tmp /tmp && mount -o remount,bind,ro /tmp"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _ro_mount_works(), reason="needs unshare -m and mount (root in a container)")
def test_the_cli_on_a_readonly_mounted_data_dir(filled: Path, tmp_path: Path) -> None:
    home = filled.parent
    before = {p.name: _digest(p) for p in home.iterdir() if p.is_file()}
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'

    def p2p(*argv: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, P2P_HOME=str(home))
        return subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", str(home), sys.executable, "-m",
                               "p2p_local.cli", *argv], env=env, capture_output=True, text=True, timeout=120)

    listed = p2p("profile", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [p["name"] for p in json.loads(listed.stdout)] == ["alice"]
    shown = p2p("profile", "show", "alice")
    assert shown.returncode == 0 and "Heat (1995)" in shown.stdout, shown.stderr
    out = tmp_path / "alice.json"
    exported = p2p("profile", "export", "alice", "-o", str(out))
    assert exported.returncode == 0, exported.stderr
    assert json.loads(out.read_text())["items"][0]["output"] == "5"

    added = p2p("profile", "add", "alice", "--input", "Up (2009)", "--output", "4")
    assert added.returncode == StoreError.exit_code, added.stderr
    assert added.stderr.startswith("error: the profile store") and "read-only" in added.stderr
    assert "hint:" in added.stderr and "Traceback" not in added.stderr
    assert {p.name: _digest(p) for p in home.iterdir() if p.is_file()} == before
