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
    s.add_items("alice", rows())
print("DONE", flush=True)
"""


def _big_jsonl(path: Path, n: int, tag: str) -> Path:
    items = [{"input": f"{tag} movie {i} ({1950 + i % 70}) | Genres: Drama|Comedy", "output": str(1 + i % 5),
              "time": 1e9 + i} for i in range(n)]
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


@pytest.mark.parametrize("when", ["start", "write"])
def test_sigkill_of_the_real_cli_is_all_or_nothing(p2p_home: Path, tmp_path: Path, when: str):
    """The real `p2p profile import`, killed at whatever point it has reached: never half an import."""
    assert main(["profile", "create", "alice", "--task", "t"]) == 0
    big = _big_jsonl(tmp_path / "big.jsonl", 60_000, "big")
    env = {**os.environ, "P2P_HOME": str(p2p_home), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen([sys.executable, "-m", "p2p_local.cli", "profile", "import", "alice", str(big)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = p2p_home / "p2p.sqlite3"
    wal = db.with_name(db.name + "-wal")
    try:
        if when == "write":  # wait until the transaction is writing (the WAL grows), then kill
            for _ in range(3000):
                if child.poll() is not None or (wal.exists() and wal.stat().st_size > 500_000):
                    break
                child_wait(child, 0.01)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    ok, n_items, n_hist = _counts(db)
    assert ok == "ok"
    assert (n_items, n_hist) in {(0, 0), (60_000, 60_000)}


def child_wait(child: subprocess.Popen, seconds: float) -> None:
    try:
        child.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        pass
