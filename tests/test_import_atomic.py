"""Imports under concurrency and interruption, on the real CLI and store in child processes: two imports
of the same file at once add it once; `import --create` killed mid-way leaves no profile; `--dry-run`
writes nothing at all, not even the data dir."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

# The real CLI, with a pause (or a kill) planted inside the import's write step.
CHILD = r"""
import os, sys, time
import p2p_local.importers as imp
from p2p_local.cli import main

mode = sys.argv[1]
real = imp._new_items

def slow(*a, **k):  # read what the profile holds, then wait before writing: the window two imports race in
    out = real(*a, **k)
    print("READ", flush=True)
    time.sleep(float(os.environ.get("PAUSE", "0")))
    return out

def killed(*a, **k):  # the process dies inside the import, after the profile row would be made
    os._exit(137)

imp._new_items = slow if mode == "slow" else killed
sys.exit(main(sys.argv[2:]))
"""


def _file(tmp_path: Path, n: int = 50) -> Path:
    items = [{"input": f"Movie {i} (2001) | Genres: Drama", "output": str(1 + i % 5), "time": 1e9 + i}
             for i in range(n)]
    path = tmp_path / "u.jsonl"
    path.write_text(json.dumps({"user_id": "u", "task": "movielens-rating", "items": items}) + "\n")
    return path


def _child(mode: str, *argv: str, pause: float = 0.0) -> subprocess.Popen:
    env = dict(os.environ, PAUSE=str(pause))
    return subprocess.Popen([sys.executable, "-c", CHILD, mode, *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _count(home: Path, sql: str) -> int:
    con = sqlite3.connect(home / "p2p.sqlite3")
    try:
        return con.execute(sql).fetchone()[0]
    finally:
        con.close()


def test_two_imports_at_once_add_the_file_once(tmp_path: Path, p2p_home: Path) -> None:
    path = _file(tmp_path)
    first = _child("slow", "profile", "import", "alice", str(path), "--create", pause=3.0)
    assert first.stdout.readline().strip() == "READ"  # it has read the (empty) profile and is about to write
    second = _child("slow", "profile", "import", "alice", str(path), "--create")
    outs = [p.communicate(timeout=120) for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], outs
    assert _count(p2p_home, "SELECT COUNT(*) FROM items") == 50  # not 100
    assert "50 already there" in outs[1][0]


def test_create_killed_mid_way_leaves_no_profile(tmp_path: Path, p2p_home: Path) -> None:
    proc = _child("kill", "profile", "import", "bob", str(_file(tmp_path)), "--create")
    proc.communicate(timeout=120)
    assert proc.returncode == 137
    assert _count(p2p_home, "SELECT COUNT(*) FROM profiles") == 0
    con = sqlite3.connect(p2p_home / "p2p.sqlite3")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()


def test_dry_run_on_a_new_machine_writes_nothing(tmp_path: Path, p2p_home: Path) -> None:
    from p2p_local.cli import main

    t0 = time.time()
    assert main(["profile", "import", "carol", str(_file(tmp_path)), "--create", "--dry-run"]) == 0
    assert not p2p_home.exists(), "a dry run created the data dir"
    assert main(["profile", "import", "carol", str(_file(tmp_path)), "--dry-run"]) != 0  # no such profile: said
    assert not p2p_home.exists() and time.time() - t0 < 60


def test_dry_run_into_an_existing_store_leaves_no_file_behind(tmp_path: Path, p2p_home: Path) -> None:
    """Not even SQLite's -wal and -shm files: a reader in `mode=ro` creates them and never removes them."""
    from p2p_local.cli import main

    assert main(["profile", "create", "carol"]) == 0
    before = sorted(p.name for p in p2p_home.iterdir())
    assert main(["profile", "import", "carol", str(_file(tmp_path)), "--dry-run"]) == 0
    assert sorted(p.name for p in p2p_home.iterdir()) == before
