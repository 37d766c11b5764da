"""How the store behaves with a big profile: insert, import, count, list, edit, forget (for `p2p bench app`).

Runs on synthetic MovieLens-like items in a throwaway store (a temp dir), never in the user's.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from p2p_local.store import NewItem, Store


def bench_store(n: int = 100_000) -> dict:
    """Seconds for each operation on an `n`-item profile, plus the database size (MiB, items + history)."""
    out: dict = {"n_items": n}
    with tempfile.TemporaryDirectory(prefix="p2p-bench-") as tmp:
        db = Path(tmp) / "bench.sqlite3"
        with Store(db) as s:
            s.profiles.create_profile("bench", task="movielens-rating")
            items = [_item(i) for i in range(n)]
            out["insert_s"] = _timed(lambda: s.profiles.add_items("bench", items))
            s.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # size of the data, not of a full WAL
            out["db_mb"] = round(sum(f.stat().st_size for f in Path(tmp).glob("bench.sqlite3*")) / 2**20, 1)
            out["count_s"] = _timed(lambda: s.profiles.count_items("bench"))
            out["list_profiles_s"] = _timed(s.list_profiles)
            out["recent_50_s"] = _timed(lambda: s.profiles.items("bench", limit=50))
            out["recent_50_by_task_s"] = _timed(lambda: s.profiles.items("bench", task="movielens-rating", limit=50))
            out["all_items_s"] = _timed(lambda: s.profiles.items("bench"))
            out["edit_s"] = _timed(lambda: s.profiles.edit_item(n // 2, output="5"))
            out["export_s"] = _timed(lambda: s.profiles.export_profile("bench"))

            # The import path end to end: a JSONL file of n items -> parse -> one transaction.
            from p2p_local.importers import import_file

            path = Path(tmp) / "user.jsonl"
            path.write_text(json.dumps({"user_id": "u", "items": [_record(i) for i in range(n)]}) + "\n")
            s.profiles.create_profile("imported", task="movielens-rating")
            res = import_file(s, "imported", path)
            out["import_jsonl_parse_s"], out["import_jsonl_write_s"] = res.parse_seconds, res.write_seconds
            out["forget_s"] = _timed(lambda: s.forget_profile("bench"))
    return out


def _item(i: int) -> NewItem:
    return NewItem(**_record(i))


def _record(i: int) -> dict:
    genres = ("Comedy", "Drama", "Action|Crime", "Romance", "Sci-Fi|Thriller")[i % 5]
    return {"input": f"Movie number {i} ({1950 + i % 70}) | Genres: {genres}", "output": str(1 + i % 5),
            "time": 9e8 + 60.0 * i, "meta": {"movie_id": i, "rating": 1 + i % 5}}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return round(time.perf_counter() - t0, 4)


if __name__ == "__main__":
    print(json.dumps(bench_store(), indent=2))
