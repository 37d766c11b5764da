"""A damaged store is a clean exit 7 (StoreError) whatever its bytes: random files, a valid header over random
pages, a real store with pages overwritten or cut short. Never exit 70 (a crash), never a traceback."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from p2p_local.cli import main

COMMANDS = (["profile", "list"], ["profile", "show", "demo"], ["profile", "export", "demo"],
            ["profile", "add", "demo", "--input", "x", "--output", "3"])


def damaged_stores(good: bytes, n: int = 24):
    r = random.Random(7)
    yield "random bytes", bytes(r.randrange(256) for _ in range(8192))
    yield "header + random", b"SQLite format 3\x00" + bytes(r.randrange(256) for _ in range(8192))
    yield "cut short", good[: len(good) // 3]
    for i in range(n):
        data = bytearray(good)
        for _ in range(r.randint(1, 6)):  # overwrite a few random runs (a header field, a page, a cell)
            at = r.randrange(len(data))
            data[at:at + r.randint(1, 512)] = bytes(r.randrange(256) for _ in range(r.randint(1, 512)))
        yield f"overwritten #{i}", bytes(data)


@pytest.fixture(scope="module")
def good_store(tmp_path_factory) -> bytes:
    import os

    from p2p_local.demo import import_demo
    from p2p_local.store import Store

    home = tmp_path_factory.mktemp("good")
    old = os.environ.get("P2P_HOME")
    os.environ["P2P_HOME"] = str(home)
    try:
        with Store() as s:
            import_demo(s, "demo")
            s.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        if old is None:
            os.environ.pop("P2P_HOME")
        else:
            os.environ["P2P_HOME"] = old
    return (home / "p2p.sqlite3").read_bytes()


def test_a_damaged_store_is_a_clean_store_error(good_store: bytes, p2p_home: Path, capsys) -> None:
    codes: dict[str, list[int]] = {}
    for what, data in damaged_stores(good_store):
        for f in p2p_home.glob("p2p.sqlite3*"):
            f.unlink()
        p2p_home.mkdir(parents=True, exist_ok=True)
        (p2p_home / "p2p.sqlite3").write_bytes(data)
        codes[what] = [main(cmd) for cmd in COMMANDS]
        err = capsys.readouterr().err
        assert "Traceback" not in err and "internal error" not in err, (what, err)
    assert all(c in (0, 7) for cs in codes.values() for c in cs), codes
    assert codes["random bytes"] == [7] * len(COMMANDS)  # nothing readable: every command says so
