"""Privacy, tested: import -> personalize -> ask with every socket blocked; profile data stays in the
data dir; `p2p profile forget` removes items, cached adapters and chat history (checked on disk)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

MARKER = "Zyzzogeton Quuxfilm"  # a title no file outside the data dir can contain by chance

FLOW = textwrap.dedent(
    """
    import socket, sys, json
    attempts = []
    def refuse(*a, **k):
        attempts.append(repr(a[:2]))
        raise OSError("network blocked by test_privacy")
    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse
    socket.create_connection = refuse
    socket.getaddrinfo = refuse
    from p2p_local.cli import main
    from p2p_local.store import Store
    codes = [
        main(["profile", "create", "priv", "--task", "movielens-rating"]),
        main(["profile", "import", "priv", sys.argv[1]]),
        main(["personalize", "priv", "--query", "Heat (1995) | Genres: Action", "--json"]),
        main(["ask", sys.argv[2], "--profile", "priv", "--task", "movielens-rating", "--json"]),
    ]
    with Store() as s:  # a chat turn, as the TUI stores it
        c = s.new_conversation("priv", "t")
        s.add_message(c, "user", sys.argv[2])
    print(json.dumps({"codes": codes, "attempts": attempts}))
    """
)


def run_flow(sandbox: Path, home: Path, models: Path, ratings: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "P2P_"))}
    env.update(HOME=str(sandbox / "home"), TMPDIR=str(sandbox / "tmp"), XDG_DATA_HOME=str(sandbox / "xdg-data"),
               XDG_CACHE_HOME=str(sandbox / "xdg-cache"), XDG_CONFIG_HOME=str(sandbox / "xdg-config"),
               P2P_HOME=str(home), P2P_MODELS=str(models))
    for d in ("home", "tmp"):
        (sandbox / d).mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", FLOW, str(ratings), f"{MARKER} (2001) | Genres: Drama"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def files_containing(root: Path, needle: bytes, skip: Path | None = None) -> list[Path]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and (skip is None or skip not in p.parents):
            if needle in p.read_bytes():
                hits.append(p)
    return hits


def test_offline_and_private_end_to_end(tmp_path: Path, base_model_path: Path) -> None:
    from p2p_local import paths

    models = paths.models_dir()
    sandbox = tmp_path / "sandbox"
    home = sandbox / "data"
    items = [{"input": f"{MARKER} {i} (2001) | Genres: Drama", "output": str(1 + i % 5), "time": 1e9 + i,
              "meta": {"genres": ["Drama"]}} for i in range(30)]
    ratings = tmp_path / "user.jsonl"
    ratings.write_text(json.dumps({"user_id": "u1", "items": items}) + "\n")
    before = {p: p.stat().st_mtime_ns for p in models.rglob("*") if p.is_file()}

    out = run_flow(sandbox, home, models, ratings)
    assert out["codes"] == [0, 0, 0, 0]
    assert out["attempts"] == [], f"something tried to open a connection: {out['attempts']}"

    # the profile's text exists only inside the data dir (the input file aside) ...
    assert files_containing(home, MARKER.encode()), "the store should hold the profile"
    assert files_containing(sandbox, MARKER.encode(), skip=home) == []
    changed = [p for p in models.rglob("*") if p.is_file() and before.get(p) != p.stat().st_mtime_ns]
    assert not any(MARKER.encode() in p.read_bytes() for p in changed)
    adapters = list((home / "adapters").rglob("*.gguf"))
    assert adapters, "personalize must have cached an adapter in the data dir"

    # ... and forget removes it: rows, adapter files, chat history
    env = dict(os.environ, P2P_HOME=str(home), P2P_MODELS=str(models))
    proc = subprocess.run([sys.executable, "-m", "p2p_local.cli", "profile", "forget", "priv", "--yes", "--json"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert not any(p.exists() for p in adapters)
    assert files_containing(home, MARKER.encode()) == []
    import sqlite3

    con = sqlite3.connect(home / "p2p.sqlite3")
    assert con.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 0
    assert con.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0
    assert con.execute("SELECT COUNT(*) FROM adapters").fetchone()[0] == 0
    con.close()
    assert (os.stat(home / "p2p.sqlite3").st_mode & 0o777) == 0o600
