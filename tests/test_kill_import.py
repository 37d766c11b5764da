"""SIGKILL in the middle of an import: the store stays intact and holds all or none of that import."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from p2p_local.cli import main

# Runs the real importer in a child process, but pauses inside the write transaction (after
# `stop_after` rows went to SQLite) and says so, so the parent kills it at a known point.
CHILD = r"""
import sys, time
from p2p_local.importers import read_import
from p2p_local.store import Store

path, stop_after = sys.argv[1], int(sys.argv[2])
parsed = read_import(path)

def rows():
    for i, item in enumerate(parsed.items):
        if i == stop_after:
            print("MID", flush=True)
            time.sleep(120)
        yield item

with Store() as s:
    s.profiles.add_items("alice", rows())
print("DONE", flush=True)
"""


def _big_jsonl(path: Path, n: int, tag: str) -> Path:
    # Short items: one JSONL line holds the whole user and must stay under the importer's line limit.
    items = [{"input": f"{tag} movie {i}", "output": str(1 + i % 5), "time": 1_000_000_000 + i}
             for i in range(n)]
    path.write_text(json.dumps({"user_id": tag, "items": items}) + "\n")
    return path


def _counts(db: Path) -> tuple[str, int, int]:
    conn = sqlite3.connect(db)
    try:
        ok = conn.execute("PRAGMA integrity_check").fetchone()[0]
        n_items = conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        n_hist = conn.execute("SELECT COUNT(*) FROM item_history").fetchone()[0]
    finally:
        conn.close()
    return ok, n_items, n_hist


def test_sigkill_mid_import_loses_nothing_committed_and_adds_nothing(p2p_home: Path, tmp_path: Path):
    db = p2p_home / "p2p.sqlite3"
    assert main(["profile", "create", "alice", "--task", "t"]) == 0
    first = _big_jsonl(tmp_path / "first.jsonl", 2_000, "first")
    assert main(["profile", "import", "alice", str(first)]) == 0  # committed before the crash

    big = _big_jsonl(tmp_path / "big.jsonl", 60_000, "big")
    env = {**os.environ, "P2P_HOME": str(p2p_home), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(big), "40000"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line.strip() == "MID", child.stderr.read()
        # 40k uncommitted rows overflow SQLite's page cache: some already sit in the WAL file.
        wal = db.with_name(db.name + "-wal")
        assert wal.stat().st_size > 1_000_000
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()

    ok, n_items, n_hist = _counts(db)
    assert ok == "ok"
    assert (n_items, n_hist) == (2_000, 2_000)  # all of the first import, none of the killed one

    # The store keeps working: the same import now goes through completely.
    assert main(["profile", "import", "alice", str(big)]) == 0
    ok, n_items, n_hist = _counts(db)
    assert (ok, n_items, n_hist) == ("ok", 62_000, 62_000)


# What a planted bug looks like: an importer that commits every 5,000 rows instead of once. Loaded into
# the real CLI's process through sitecustomize, so the kill test below can be shown to catch it.
CHUNKED = """
import contextlib
import p2p_local.store.db as db
import p2p_local.store.profiles as profiles
db.Store.transaction = lambda self: contextlib.nullcontext(self.conn)  # the import's one transaction, gone
real = profiles.ProfileStore.add_items
def add_items(self, profile, items, task=None):
    items, n, batch = list(items), 0, 5000
    for i in range(0, len(items), batch):
        n += real(self, profile, items[i:i + batch], task)
    return n
profiles.ProfileStore.add_items = add_items
"""


def kill_import_mid_write(p2p_home: Path, big: Path, wal_bytes: int, pythonpath: str = "") -> tuple:
    """Run the real `p2p profile import`, SIGKILL it once the WAL holds `wal_bytes` (the write transaction
    is under way), and return the store's (integrity, items, history). Fails if the import finished first:
    a kill that hits nothing proves nothing."""
    env = {**os.environ, "P2P_HOME": str(p2p_home),
           "PYTHONPATH": os.pathsep.join(p for p in (pythonpath, str(Path(__file__).resolve().parents[1])) if p)}
    child = subprocess.Popen([sys.executable, "-m", "p2p_local.cli", "profile", "import", "alice", str(big)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    db = p2p_home / "p2p.sqlite3"
    wal = db.with_name(db.name + "-wal")
    try:
        for _ in range(30_000):
            if child.poll() is not None or (wal.exists() and wal.stat().st_size > wal_bytes):
                break
            child_wait(child, 0.002)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL, f"the import ended before the kill: {child.stderr.read()}"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return _counts(db)


@pytest.mark.parametrize("wal_bytes", [50_000, 2_000_000])
def test_sigkill_of_the_real_cli_is_all_or_nothing(p2p_home: Path, tmp_path: Path, wal_bytes: int):
    """The real `p2p profile import`, killed early and late inside its write: never half an import."""
    assert main(["profile", "create", "alice", "--task", "t"]) == 0
    big = _big_jsonl(tmp_path / "big.jsonl", 60_000, "big")
    ok, n_items, n_hist = kill_import_mid_write(p2p_home, big, wal_bytes)
    assert ok == "ok"
    assert (n_items, n_hist) in {(0, 0), (60_000, 60_000)}


def test_the_kill_test_catches_an_import_committed_in_pieces(p2p_home: Path, tmp_path: Path):
    """The planted bug: chunked commits. Killed late, the store holds part of the import, which the
    all-or-nothing assertion above refuses."""
    plant = tmp_path / "plant"
    plant.mkdir()
    (plant / "sitecustomize.py").write_text(CHUNKED)
    assert main(["profile", "create", "alice", "--task", "t"]) == 0
    big = _big_jsonl(tmp_path / "big.jsonl", 60_000, "big")
    ok, n_items, n_hist = kill_import_mid_write(p2p_home, big, 2_000_000, pythonpath=str(plant))
    assert ok == "ok"
    assert (n_items, n_hist) not in {(0, 0), (60_000, 60_000)}
    assert n_items % 5000 == 0 and n_items == n_hist


def child_wait(child: subprocess.Popen, seconds: float) -> None:
    try:
        child.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        pass
