"""Profiles and their items (added in bulk in one transaction, edited and deleted with a per-item change
history). Any change to a profile's items marks its cached adapter stale (adapter_cache.py clears the flag).
"""

from __future__ import annotations

import json
import sqlite3
import time as _time
from collections.abc import Iterable, Iterator
from typing import Any

from p2p_local.errors import StoreError
from p2p_local.store.connection import StoreBase
from p2p_local.store.records import (
    ITEM_FIELDS,
    HistoryEntry,
    NewItem,
    ProfileRecord,
    StoredItem,
    check_name,
    check_task,
    check_text,
    check_time,
    dump_meta,
)

# The JSON snapshot of an item, as SQL (bulk 'add' history) and as Python (edits): same keys.
_SNAPSHOT_SQL = "json_object('task', task, 'time', time, 'input', input, 'output', output, 'meta', json(meta))"
# A profile with its item count, as `_profile` reads it.
_PROFILES = "SELECT p.*, (SELECT COUNT(*) FROM items WHERE profile_id = p.id) AS n_items FROM profiles p"


class ProfileStore:
    """The profiles and items aggregate (a part of `Store`)."""

    def __init__(self, db: StoreBase) -> None:
        self.db = db

    def create_profile(self, name: str, task: str | None = None) -> ProfileRecord:
        name = check_name(name)
        task = check_task(task) if task is not None else None
        now = _time.time()
        try:
            with self.db._write() as c:
                c.execute(
                    "INSERT INTO profiles (name, task, created, updated) VALUES (?, ?, ?, ?)", (name, task, now, now)
                )
        except sqlite3.IntegrityError as e:
            raise StoreError(f"profile {name!r} already exists", hint="pick another name (see `p2p profile list`)") from e
        return self.get_profile(name)

    def list_profiles(self) -> list[ProfileRecord]:
        return [_profile(r) for r in self.db.conn.execute(_PROFILES + " ORDER BY name")]

    def get_profile(self, name: str) -> ProfileRecord:
        """The profile with its item count; StoreError (with a did-you-mean hint) if unknown."""
        pid = self.db._pid(name)
        row = self.db.conn.execute(_PROFILES + " WHERE id = ?", (pid,)).fetchone()
        return _profile(row)

    def profile_exists(self, name: str) -> bool:
        return self.db.conn.execute("SELECT 1 FROM profiles WHERE name = ?", (name,)).fetchone() is not None

    def set_profile_task(self, name: str, task: str | None) -> ProfileRecord:
        """Set (or clear, with None) the default task of new items."""
        pid = self.db._pid(name)
        task = check_task(task) if task is not None else None
        with self.db._write() as c:
            c.execute("UPDATE profiles SET task = ?, updated = ? WHERE id = ?", (task, _time.time(), pid))
        return self.get_profile(name)

    def count_items(self, profile: str, task: str | None = None) -> int:
        """One index range (every answer counts its task's items: no scan of the profile's other tasks)."""
        sql, args = "SELECT COUNT(*) FROM items WHERE profile_id = ?", [self.db._pid(profile)]
        if task is not None:
            sql, args = sql + " AND task = ?", [*args, task]
        return self.db.conn.execute(sql, args).fetchone()[0]

    def task_counts(self, profile: str) -> dict[str, int]:
        """{task: number of items}, most items first."""
        rows = self.db.conn.execute(
            "SELECT task, COUNT(*) FROM items WHERE profile_id = ? GROUP BY task ORDER BY COUNT(*) DESC, task",
            (self.db._pid(profile),),
        )
        return {r[0]: r[1] for r in rows}

    # --- items -----------------------------------------------------------------------------------
    def add_item(
        self,
        profile: str,
        task: str | None,
        input: str,
        output: str,
        time: float | None = None,
        meta: dict[str, Any] | None = None,
    ) -> StoredItem:
        """Add one item. `task=None`: the profile's default task; `time=None`: now."""
        when = _time.time() if time is None else time
        first_id, _ = self._insert(profile, [NewItem(input, output, when, meta or {}, task)])
        return self.get_item(first_id)

    def add_items(self, profile: str, items: Iterable[NewItem], task: str | None = None) -> int:
        """Add many items in ONE transaction (all or nothing); returns how many were added.

        `task` is the default for items without one (else the profile's). `items` is consumed lazily,
        so a generator over a big file is never held twice in memory.
        """
        return self._insert(profile, items, task)[1]

    def _insert(self, profile: str, items: Iterable[NewItem], task: str | None = None) -> tuple[int, int]:
        """Insert items in one transaction; returns (id of the first new item, how many)."""
        pid = self.db._pid(profile)
        profile_task = self.db.conn.execute("SELECT task FROM profiles WHERE id = ?", (pid,)).fetchone()[0]
        default_task = check_task(task) if task is not None else profile_task
        now = _time.time()

        def rows() -> Iterator[tuple]:
            for n, it in enumerate(items, 1):
                t = it.task if it.task is not None else default_task
                if t is None:
                    raise StoreError(
                        f"item {n} has no task and profile {profile!r} has no default task",
                        hint=f"pass --task, or create the profile with one: p2p profile create {profile} --task T",
                    )
                yield (pid, check_task(t), check_time(it.time), check_text("input", it.input),
                       check_text("output", it.output), dump_meta(it.meta), now, now)

        with self.db._write() as c:
            # Item ids are AUTOINCREMENT (never reused, so a deleted item's history stays its own):
            # everything above the last id handed out is ours, as we hold the write lock.
            last_id = c.execute("SELECT COALESCE(MAX(seq), 0) FROM sqlite_sequence WHERE name = 'items'").fetchone()[0]
            cur = c.executemany(
                "INSERT INTO items (profile_id, task, time, input, output, meta, created, updated)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                rows(),
            )
            n = max(cur.rowcount, 0)
            # One statement writes the 'add' history of every new row.
            c.execute(
                "INSERT INTO item_history (item_id, profile_id, action, old, new, at)"
                f" SELECT id, profile_id, 'add', NULL, {_SNAPSHOT_SQL}, ? FROM items"
                " WHERE profile_id = ? AND id > ?",
                (now, pid, last_id),
            )
            if n:
                c.execute("UPDATE profiles SET adapter_stale = 1, updated = ? WHERE id = ?", (now, pid))
        return last_id + 1, n

    def get_item(self, item_id: int) -> StoredItem:
        row = self.db.conn.execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            raise StoreError(f"no item with id {item_id}", hint="see ids with: p2p profile show NAME --items 20")
        return _item(row)

    def edit_item(self, item_id: int, **fields: Any) -> StoredItem:
        """Change some of task/time/input/output/meta; records the old and new item in the history."""
        unknown = set(fields) - set(ITEM_FIELDS)
        if unknown:
            raise StoreError(f"cannot edit {sorted(unknown)}", hint=f"editable fields: {', '.join(ITEM_FIELDS)}")
        old = self.get_item(item_id)
        checks = {"task": check_task, "time": check_time, "meta": lambda m: m,
                  "input": lambda s: check_text("input", s), "output": lambda s: check_text("output", s)}
        new = {k: checks[k](v) for k, v in fields.items()}
        before = _snapshot(old)
        after = {**before, **new}
        if after == before:
            return old
        now = _time.time()
        with self.db._write() as c:
            c.execute(
                "UPDATE items SET task = ?, time = ?, input = ?, output = ?, meta = ?, updated = ? WHERE id = ?",
                (after["task"], after["time"], after["input"], after["output"], dump_meta(after["meta"]), now, item_id),
            )
            self._history(c, old, "edit", before, after, now)
        return self.get_item(item_id)

    def delete_item(self, item_id: int) -> None:
        old = self.get_item(item_id)
        now = _time.time()
        with self.db._write() as c:
            c.execute("DELETE FROM items WHERE id = ?", (item_id,))
            self._history(c, old, "delete", _snapshot(old), None, now)

    def items(self, profile: str, task: str | None = None, limit: int | None = None) -> list[StoredItem]:
        """The profile's items in time order (unknown times first); `limit`: only the most recent ones."""
        where, args = "profile_id = ?", [self.db._pid(profile)]
        if task is not None:
            where, args = where + " AND task = ?", args + [task]
        if limit is None:
            rows = self.db.conn.execute(f"SELECT * FROM items WHERE {where} ORDER BY time, id", args).fetchall()
        else:
            # Newest `limit` through the index, then back to time order.
            rows = self.db.conn.execute(
                f"SELECT * FROM items WHERE {where} ORDER BY time DESC, id DESC LIMIT ?", args + [max(limit, 0)]
            ).fetchall()[::-1]
        return [_item(r) for r in rows]

    def item_history(self, item_id: int, profile: str | None = None) -> list[HistoryEntry]:
        """Every add/edit/delete of an item, oldest first (also after it was deleted)."""
        sql, args = "SELECT * FROM item_history WHERE item_id = ?", [item_id]
        if profile is not None:
            sql, args = sql + " AND profile_id = ?", args + [self.db._pid(profile)]
        rows = self.db.conn.execute(sql + " ORDER BY id", args)
        return [
            HistoryEntry(r["id"], r["item_id"], r["action"], _load(r["old"]), _load(r["new"]), r["at"]) for r in rows
        ]

    def _history(self, c: sqlite3.Connection, item: StoredItem, action: str, old: dict | None, new: dict | None,
                 now: float) -> None:
        c.execute(
            "INSERT INTO item_history (item_id, profile_id, action, old, new, at) VALUES (?, ?, ?, ?, ?, ?)",
            (item.id, item.profile_id, action, _dump(old), _dump(new), now),
        )
        c.execute("UPDATE profiles SET adapter_stale = 1, updated = ? WHERE id = ?", (now, item.profile_id))

    # --- export ----------------------------------------------------------------------------------
    def export_profile(self, name: str) -> dict[str, Any]:
        """The profile in the generic per-user format (JSON-able), plus its default task.

        Items of another task than the profile's carry it in `meta["task"]` (the format has no
        per-item task field); the importers read it back from there.
        """
        p = self.get_profile(name)
        counts = self.task_counts(name)
        task = p.task or next(iter(counts), None)
        out = [{"input": it.input, "output": it.output, "time": it.time,
                "meta": it.meta if it.task == task else {**it.meta, "task": it.task}} for it in self.items(name)]
        return {"user_id": p.name, "task": task, "items": out}


def _snapshot(item: StoredItem) -> dict[str, Any]:
    return {"task": item.task, "time": item.time, "input": item.input, "output": item.output, "meta": item.meta}


def _dump(obj: dict | None) -> str | None:
    return None if obj is None else json.dumps(obj, ensure_ascii=False)


def _load(text: str | None) -> dict | None:
    return None if text is None else json.loads(text)


def _profile(r: sqlite3.Row) -> ProfileRecord:
    return ProfileRecord(r["id"], r["name"], r["task"], r["created"], r["updated"], bool(r["adapter_stale"]), r["n_items"])


def _item(r: sqlite3.Row) -> StoredItem:
    meta = r["meta"]
    return StoredItem(r["id"], r["profile_id"], r["task"], r["time"], r["input"], r["output"],
                json.loads(meta) if meta != "{}" else {}, r["created"], r["updated"])

