"""The private profile store: one SQLite file under the data dir (mode 0600, WAL, foreign keys on).

It holds profiles, their items with a per-item change history, the cache of generated adapters, and
the chat's conversations. Profiles are addressed by name. Every write is one transaction, so a
process killed mid-import leaves either the whole import or none of it. Any change to a profile's
items marks its adapter stale. `secure_delete` is on, so forgotten data is overwritten in the file,
not just unlinked from the b-tree.

One Store per thread (sqlite3 connections are not shared across threads).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import time as _time
import urllib.parse
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2p_local import paths
from p2p_local.data.format import canonical_task
from p2p_local.data.records import MAX_TIME, MIN_TIME
from p2p_local.errors import StoreError
from p2p_local.files import disk_error, sha256_file
from p2p_local.store.migrations import migrate

log = logging.getLogger(__name__)

# Profile names appear in commands and file listings: letters/digits first, no spaces or slashes.
# \A...\Z, not ^...$: `$` also matches before a trailing newline ("alice\n" would pass).
_NAME = re.compile(r"\A\w[\w.@+-]{0,63}\Z")
# Item times (unix seconds) between 1900 and 2100: outside is a unit mix-up or poison (inf, 1e300).
ITEM_FIELDS = ("task", "time", "input", "output", "meta")
ROLES = ("system", "user", "assistant")


# --- records -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProfileRecord:
    id: int
    name: str
    task: str | None  # default task for new items
    created: float
    updated: float
    adapter_stale: bool
    n_items: int


@dataclass(frozen=True)
class NewItem:
    """An item to add (what importers produce). `task=None` means the profile's default task."""

    input: str
    output: str
    time: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    task: str | None = None
    where: str = ""  # "file:line" it came from, for error messages (never stored)


@dataclass(frozen=True)
class StoredItem:
    id: int
    profile_id: int
    task: str
    time: float | None
    input: str
    output: str
    meta: dict[str, Any]
    created: float
    updated: float

    def record(self) -> dict[str, Any]:
        """The item in the generic per-user format."""
        return {"input": self.input, "output": self.output, "time": self.time, "meta": self.meta}


@dataclass(frozen=True)
class HistoryEntry:
    id: int
    item_id: int
    action: str  # add | edit | delete
    old: dict[str, Any] | None
    new: dict[str, Any] | None
    at: float


@dataclass(frozen=True)
class AdapterRecord:
    fingerprint: str
    bundle_hash: str
    path: Path
    created: float


@dataclass(frozen=True)
class ForgetReport:
    items: int
    history: int
    adapters: int
    files_removed: int
    conversations: int
    messages: int


@dataclass(frozen=True)
class Conversation:
    id: int
    profile: str | None  # None: a chat with the base model only
    title: str
    created: float
    n_messages: int


@dataclass(frozen=True)
class Message:
    id: int
    conversation_id: int
    role: str
    content: str
    meta: dict[str, Any]
    created: float


# --- the store -----------------------------------------------------------------------------------
class Store:
    """`with Store() as s: s.create_profile("alice", task="movielens-rating")`."""

    def __init__(self, path: Path | str | None = None, readonly: bool | None = None) -> None:
        """Open (creating and upgrading) the store. `readonly=None`: read-only exactly when the database
        or its folder cannot be written (a read-only mount, a chmod'ed data dir), so reading commands
        still work there and writing ones fail with a StoreError saying why; True forces it."""
        self.path = Path(path) if path is not None else paths.store_path()
        self.readonly = not store_writable(self.path) if readonly is None else bool(readonly)
        self.conn = _connect_readonly(self.path) if self.readonly else _connect(self.path)
        try:
            if self.readonly:
                _check_schema_current(self.conn, self.path)
            else:
                migrate(self.conn)
        except BaseException:
            self.conn.close()
            raise
        self.has_fts = bool(
            self.conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'messages_fts'").fetchone()
        )

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        """One write transaction around several store calls (all or nothing): `import --create` makes the
        profile and its items together, so a kill mid-way leaves no empty profile behind."""
        return self._write()

    @contextmanager
    def import_lock(self, profile: str) -> Iterator[None]:
        """Serialize imports into one profile across processes (blocking): each reads what the profile holds
        to skip duplicates, then writes, and two at once would both add everything. One byte per profile
        (by a hash of its name) of a lock file beside the store: no file names the profile."""
        try:
            import fcntl
        except ImportError:  # no POSIX locks (Windows): the write transaction still keeps the store whole
            yield
            return
        offset = int(hashlib.sha256(profile.encode("utf-8")).hexdigest()[:7], 16)
        try:
            fd = os.open(self.path.with_name(self.path.name + ".import-lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise StoreError(f"cannot lock the profile store for an import: {e.strerror}",
                             hint="check the data dir's permissions") from e
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX, 1, offset)
            yield
        finally:
            os.close(fd)  # releases the lock

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction. IMMEDIATE takes the write lock up front (no upgrade deadlocks). Nested
        uses join the outer transaction (`transaction()`)."""
        if self.conn.in_transaction and getattr(self, "_outer", False):
            yield self.conn
            return
        if self.readonly:
            raise StoreError(f"the profile store {self.path} is read-only here: this command changes it",
                             hint="reading commands (profile list / show / export) work; to change profiles, "
                                  "make the data dir writable or point P2P_HOME at a writable copy")
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise StoreError(f"the profile store is busy: {e}", hint="another p2p process is writing; retry") from e
        try:
            self._outer = True
            try:
                yield self.conn
            finally:
                self._outer = False
            self.conn.execute("COMMIT")
        except BaseException as e:
            # SQLite rolls back by itself on some errors (a full disk): then a ROLLBACK here would fail
            # and hide the real error behind "cannot rollback - no transaction is active".
            if self.conn.in_transaction:
                try:
                    self.conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            if isinstance(e, sqlite3.OperationalError) and "full" in str(e).lower():
                raise StoreError(f"disk full: cannot write the profile store {self.path} ({e})",
                                 hint="free some space and try again; nothing was changed") from e
            if isinstance(e, sqlite3.OperationalError):
                raise StoreError(f"the profile store {self.path} could not be written: {e}",
                                 hint="check the data dir's disk and permissions; nothing was changed") from e
            raise

    # --- profiles --------------------------------------------------------------------------------
    def create_profile(self, name: str, task: str | None = None) -> ProfileRecord:
        name = check_name(name)
        task = _check_task(task) if task is not None else None
        now = _time.time()
        try:
            with self._write() as c:
                c.execute(
                    "INSERT INTO profiles (name, task, created, updated) VALUES (?, ?, ?, ?)", (name, task, now, now)
                )
        except sqlite3.IntegrityError as e:
            raise StoreError(f"profile {name!r} already exists", hint="pick another name (see `p2p profile list`)") from e
        return self.get_profile(name)

    def list_profiles(self) -> list[ProfileRecord]:
        rows = self.conn.execute(
            "SELECT p.*, (SELECT COUNT(*) FROM items WHERE profile_id = p.id) AS n_items FROM profiles p ORDER BY name"
        ).fetchall()
        return [_profile(r) for r in rows]

    def get_profile(self, name: str) -> ProfileRecord:
        """The profile with its item count; StoreError (with a did-you-mean hint) if unknown."""
        pid = self._pid(name)
        row = self.conn.execute(
            "SELECT p.*, (SELECT COUNT(*) FROM items WHERE profile_id = p.id) AS n_items FROM profiles p WHERE id = ?",
            (pid,),
        ).fetchone()
        return _profile(row)

    def _pid(self, name: str) -> int:
        """A profile's id (cheap: no item count); the unknown-profile error lives here."""
        row = self.conn.execute("SELECT id FROM profiles WHERE name = ?", (name,)).fetchone()
        if row is None:
            known = [r[0] for r in self.conn.execute("SELECT name FROM profiles ORDER BY name")]
            close = difflib.get_close_matches(str(name), known, n=1)
            if close:
                hint = f"did you mean {close[0]!r}?"
            elif known:
                hint = f"known profiles: {', '.join(known[:10])}"
            else:
                hint = f"create it: p2p profile create {name}"
            raise StoreError(f"no profile named {name!r}", hint=hint)
        return row[0]

    def profile_exists(self, name: str) -> bool:
        return self.conn.execute("SELECT 1 FROM profiles WHERE name = ?", (name,)).fetchone() is not None

    def set_profile_task(self, name: str, task: str | None) -> ProfileRecord:
        """Set (or clear, with None) the default task of new items."""
        pid = self._pid(name)
        task = _check_task(task) if task is not None else None
        with self._write() as c:
            c.execute("UPDATE profiles SET task = ?, updated = ? WHERE id = ?", (task, _time.time(), pid))
        return self.get_profile(name)

    def mark_stale(self, name: str, stale: bool = True) -> None:
        """Flag (or clear) "the cached adapter no longer reflects this profile"."""
        pid = self._pid(name)
        with self._write() as c:
            c.execute("UPDATE profiles SET adapter_stale = ? WHERE id = ?", (int(stale), pid))

    def count_items(self, profile: str, task: str | None = None) -> int:
        pid = self._pid(profile)
        if task is None:
            return self.conn.execute("SELECT COUNT(*) FROM items WHERE profile_id = ?", (pid,)).fetchone()[0]
        sql = "SELECT COUNT(*) FROM items WHERE profile_id = ? AND task = ?"
        return self.conn.execute(sql, (pid, task)).fetchone()[0]

    def task_counts(self, profile: str) -> dict[str, int]:
        """{task: number of items}, most items first."""
        rows = self.conn.execute(
            "SELECT task, COUNT(*) FROM items WHERE profile_id = ? GROUP BY task ORDER BY COUNT(*) DESC, task",
            (self._pid(profile),),
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
        pid = self._pid(profile)
        profile_task = self.conn.execute("SELECT task FROM profiles WHERE id = ?", (pid,)).fetchone()[0]
        default_task = _check_task(task) if task is not None else profile_task
        now = _time.time()

        def rows() -> Iterator[tuple]:
            for n, it in enumerate(items, 1):
                t = it.task if it.task is not None else default_task
                if t is None:
                    raise StoreError(
                        f"item {n} has no task and profile {profile!r} has no default task",
                        hint=f"pass --task, or create the profile with one: p2p profile create {profile} --task T",
                    )
                yield (pid, _check_task(t), _check_time(it.time), _check_text("input", it.input),
                       _check_text("output", it.output), _dump_meta(it.meta), now, now)

        with self._write() as c:
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
        first_id = last_id + 1
        return first_id, n

    def get_item(self, item_id: int) -> StoredItem:
        row = self.conn.execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            raise StoreError(f"no item with id {item_id}", hint="see ids with: p2p profile show NAME --items 20")
        return _item(row)

    def edit_item(self, item_id: int, **fields: Any) -> StoredItem:
        """Change some of task/time/input/output/meta; records the old and new item in the history."""
        unknown = set(fields) - set(ITEM_FIELDS)
        if unknown:
            raise StoreError(f"cannot edit {sorted(unknown)}", hint=f"editable fields: {', '.join(ITEM_FIELDS)}")
        old = self.get_item(item_id)
        checks = {"task": _check_task, "time": _check_time, "meta": lambda m: m,
                  "input": lambda s: _check_text("input", s), "output": lambda s: _check_text("output", s)}
        new = {k: checks[k](v) for k, v in fields.items()}
        before = _snapshot(old)
        after = {**before, **new}
        if after == before:
            return old
        now = _time.time()
        with self._write() as c:
            c.execute(
                "UPDATE items SET task = ?, time = ?, input = ?, output = ?, meta = ?, updated = ? WHERE id = ?",
                (after["task"], after["time"], after["input"], after["output"], _dump_meta(after["meta"]), now, item_id),
            )
            self._history(c, old, "edit", before, after, now)
        return self.get_item(item_id)

    def delete_item(self, item_id: int) -> None:
        old = self.get_item(item_id)
        now = _time.time()
        with self._write() as c:
            c.execute("DELETE FROM items WHERE id = ?", (item_id,))
            self._history(c, old, "delete", _snapshot(old), None, now)

    def items(self, profile: str, task: str | None = None, limit: int | None = None) -> list[StoredItem]:
        """The profile's items in time order (unknown times first); `limit`: only the most recent ones."""
        where, args = "profile_id = ?", [self._pid(profile)]
        if task is not None:
            where, args = where + " AND task = ?", args + [task]
        if limit is None:
            rows = self.conn.execute(f"SELECT * FROM items WHERE {where} ORDER BY time, id", args).fetchall()
        else:
            # Newest `limit` through the index, then back to time order.
            rows = self.conn.execute(
                f"SELECT * FROM items WHERE {where} ORDER BY time DESC, id DESC LIMIT ?", args + [max(limit, 0)]
            ).fetchall()[::-1]
        return [_item(r) for r in rows]

    def item_history(self, item_id: int, profile: str | None = None) -> list[HistoryEntry]:
        """Every add/edit/delete of an item, oldest first (also after it was deleted)."""
        sql, args = "SELECT * FROM item_history WHERE item_id = ?", [item_id]
        if profile is not None:
            sql, args = sql + " AND profile_id = ?", args + [self._pid(profile)]
        rows = self.conn.execute(sql + " ORDER BY id", args)
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

    # --- export / forget -------------------------------------------------------------------------
    def export_profile(self, name: str) -> dict[str, Any]:
        """The profile in the generic per-user format (JSON-able), plus its default task.

        Items of another task than the profile's carry it in `meta["task"]` (the format has no
        per-item task field); the importers read it back from there.
        """
        p = self.get_profile(name)
        counts = self.task_counts(name)
        task = p.task or (next(iter(counts)) if counts else None)
        out = []
        for it in self.items(name):
            rec = it.record()
            if it.task != task:
                rec["meta"] = {**it.meta, "task": it.task}
            out.append(rec)
        return {"user_id": p.name, "task": task, "items": out}

    def forget_profile(self, name: str) -> ForgetReport:
        """Remove the profile and everything derived from it: items, history, adapters (rows AND
        files), conversations and their messages. Freed pages are zeroed (secure_delete) and the
        WAL is checkpointed, so the text does not linger in the database files."""
        p = self.get_profile(name)
        files = [Path(r.path) for r in self.adapters(name)] + [self.adapter_dir(name, create=False)]
        # Chats the user exported from the chat screen are traces of the profile too.
        files += [conversation_export_path(c.id) for c in self.conversations(name)]
        files += profile_exports_in_data_dir(p.name, [p.task or "", *self.task_counts(name)])
        counts = {}
        with self._write() as c:
            conv_ids = "SELECT id FROM conversations WHERE profile_id = :p"
            for key, sql in (
                ("messages", f"DELETE FROM messages WHERE conversation_id IN ({conv_ids})"),
                ("conversations", "DELETE FROM conversations WHERE profile_id = :p"),
                ("history", "DELETE FROM item_history WHERE profile_id = :p"),
                ("items", "DELETE FROM items WHERE profile_id = :p"),
                ("adapters", "DELETE FROM adapters WHERE profile_id = :p"),
            ):
                counts[key] = c.execute(sql, {"p": p.id}).rowcount
            c.execute("DELETE FROM profiles WHERE id = ?", (p.id,))
        removed = sum(_remove_private(f) for f in files)
        if self.has_fts and counts["messages"]:
            self.conn.execute("INSERT INTO messages_fts(messages_fts) VALUES ('optimize')")  # drop old tokens
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return ForgetReport(counts["items"], counts["history"], counts["adapters"], removed,
                            counts["conversations"], counts["messages"])

    # --- adapter cache ---------------------------------------------------------------------------
    def adapter_dir(self, profile: str, create: bool = True) -> Path:
        """Where this profile's adapter files belong (by id: a re-created name starts clean).
        `forget_profile` removes this whole directory."""
        d = paths.adapters_dir() / f"profile-{self._pid(profile)}"
        if create:
            try:
                paths.private_dir(d)
            except OSError as e:
                raise disk_error(e, d) from e
        return d

    def cached_adapter(self, profile: str, fingerprint: str, bundle_hash: str) -> Path | None:
        """The adapter made from this exact profile state and bundle, if its file is still the one written.

        The file's sha256, recorded at write time, is checked on every use: a missing, replaced or
        corrupted file (or one from before checksums) is dropped with a warning, and None makes the
        caller regenerate it, once.
        """
        row = self.conn.execute(
            "SELECT id, path, sha256 FROM adapters WHERE profile_id = ? AND fingerprint = ? AND bundle_hash = ?",
            (self._pid(profile), fingerprint, bundle_hash),
        ).fetchone()
        if row is None:
            return None
        path = Path(row["path"])
        problem = _cached_file_problem(path, row["sha256"])
        if problem is None:
            return path
        log.warning("warning: cached adapter %s %s; regenerating it", path.name, problem)
        with self._write() as c:
            c.execute("DELETE FROM adapters WHERE id = ?", (row["id"],))
        _remove_cached(path)
        return None

    def record_adapter(self, profile: str, fingerprint: str, bundle_hash: str, path: Path | str) -> None:
        """Remember an adapter made for the profile's current state (clears the stale flag), with its sha256."""
        pid = self._pid(profile)
        path = Path(path).resolve()
        try:
            digest = sha256_file(path)
        except OSError:
            digest = None  # unreadable now: recorded untrusted, so its first use regenerates it
        now = _time.time()
        with self._write() as c:
            c.execute(
                "INSERT INTO adapters (profile_id, fingerprint, bundle_hash, path, created, sha256)"
                " VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (profile_id, fingerprint, bundle_hash) DO UPDATE SET path = excluded.path,"
                " created = excluded.created, sha256 = excluded.sha256",
                (pid, fingerprint, bundle_hash, str(path), now, digest),
            )
            c.execute("UPDATE profiles SET adapter_stale = 0 WHERE id = ?", (pid,))

    def adapters(self, profile: str) -> list[AdapterRecord]:
        """Cached adapters of a profile, newest first."""
        pid = self._pid(profile)
        rows = self.conn.execute("SELECT * FROM adapters WHERE profile_id = ? ORDER BY created DESC, id DESC", (pid,))
        return [AdapterRecord(r["fingerprint"], r["bundle_hash"], Path(r["path"]), r["created"]) for r in rows]

    def prune_adapters(self, profile: str, keep: int = 3) -> int:
        """Delete all but the `keep` newest cached adapters (rows and files); returns how many went."""
        old = self.adapters(profile)[keep:]
        pid = self._pid(profile)
        with self._write() as c:
            for a in old:
                c.execute("DELETE FROM adapters WHERE profile_id = ? AND path = ?", (pid, str(a.path)))
        for a in old:
            _remove_private(a.path)
        return len(old)

    # --- conversations ---------------------------------------------------------------------------
    def new_conversation(self, profile: str | None = None, title: str = "") -> int:
        pid = self._pid(profile) if profile is not None else None
        with self._write() as c:
            cur = c.execute(
                "INSERT INTO conversations (profile_id, title, created) VALUES (?, ?, ?)", (pid, title, _time.time())
            )
        return int(cur.lastrowid)

    def set_conversation_title(self, conversation_id: int, title: str) -> None:
        self._conversation_row(conversation_id)
        with self._write() as c:
            c.execute("UPDATE conversations SET title = ? WHERE id = ?", (title, conversation_id))

    def delete_conversation(self, conversation_id: int) -> None:
        self._conversation_row(conversation_id)
        with self._write() as c:
            c.execute("DELETE FROM messages WHERE conversation_id = ?", (conversation_id,))
            c.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    def add_message(self, conversation_id: int, role: str, content: str, meta: dict[str, Any] | None = None) -> int:
        """Append a message. `meta` e.g. {"mode": "personalized", "adapter": "...", "scale": 1.0}."""
        if role not in ROLES:
            raise StoreError(f"unknown message role {role!r}", hint=f"one of {', '.join(ROLES)}")
        self._conversation_row(conversation_id)
        with self._write() as c:
            cur = c.execute(
                "INSERT INTO messages (conversation_id, role, content, meta, created) VALUES (?, ?, ?, ?, ?)",
                (conversation_id, role, content, _dump_meta(meta or {}), _time.time()),
            )
        return int(cur.lastrowid)

    def conversations(self, profile: str | None = None) -> list[Conversation]:
        """Conversations, newest first: all of them, or only those of `profile`."""
        sql = (
            "SELECT c.*, p.name AS profile_name,"
            " (SELECT COUNT(*) FROM messages WHERE conversation_id = c.id) AS n_messages"
            " FROM conversations c LEFT JOIN profiles p ON p.id = c.profile_id"
        )
        if profile is None:
            rows = self.conn.execute(sql + " ORDER BY c.id DESC")
        else:
            rows = self.conn.execute(sql + " WHERE c.profile_id = ? ORDER BY c.id DESC", (self._pid(profile),))
        return [_conversation(r) for r in rows]

    def get_conversation(self, conversation_id: int) -> Conversation:
        return _conversation(self._conversation_row(conversation_id))

    def messages(self, conversation_id: int) -> list[Message]:
        self._conversation_row(conversation_id)
        rows = self.conn.execute("SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,))
        return [_message(r) for r in rows]

    def search_messages(self, query: str, profile: str | None = None, limit: int = 50) -> list[Message]:
        """Messages containing every word of `query` (FTS5 ranking where available, else LIKE)."""
        words = re.findall(r"\w+", query)
        if not words:
            return []
        args: list[Any] = []
        if self.has_fts:
            sql = ("SELECT m.* FROM messages_fts f JOIN messages m ON m.id = f.rowid"
                   " JOIN conversations c ON c.id = m.conversation_id WHERE messages_fts MATCH ?")
            args.append(" ".join('"' + w + '"' for w in words))  # quoted: user text is never FTS syntax
        else:
            sql = "SELECT m.* FROM messages m JOIN conversations c ON c.id = m.conversation_id WHERE 1"
            for w in words:
                sql += " AND m.content LIKE ? ESCAPE '\\'"
                args.append("%" + w.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
        if profile is not None:
            sql += " AND c.profile_id = ?"
            args.append(self._pid(profile))
        sql += (" ORDER BY f.rank" if self.has_fts else " ORDER BY m.id DESC") + " LIMIT ?"
        args.append(limit)
        return [_message(r) for r in self.conn.execute(sql, args)]

    def _conversation_row(self, conversation_id: int) -> sqlite3.Row:
        row = self.conn.execute(
            "SELECT c.*, p.name AS profile_name,"
            " (SELECT COUNT(*) FROM messages WHERE conversation_id = c.id) AS n_messages"
            " FROM conversations c LEFT JOIN profiles p ON p.id = c.profile_id WHERE c.id = ?",
            (conversation_id,),
        ).fetchone()
        if row is None:
            raise StoreError(f"no conversation with id {conversation_id}")
        return row


# --- helpers -------------------------------------------------------------------------------------
# The JSON snapshot of an item, as SQL (bulk 'add' history) and as Python (edits): same keys.
_SNAPSHOT_SQL = "json_object('task', task, 'time', time, 'input', input, 'output', output, 'meta', json(meta))"


def _snapshot(item: StoredItem) -> dict[str, Any]:
    return {"task": item.task, "time": item.time, "input": item.input, "output": item.output, "meta": item.meta}


def _connect(path: Path) -> sqlite3.Connection:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Create the file 0600 before SQLite does (it would use the umask); the -wal and -shm files
        # SQLite creates later copy the database file's permissions.
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
        os.chmod(path, 0o600)
    except OSError as e:
        raise StoreError(f"cannot create the profile store {path}: {e.strerror}",
                         hint="set P2P_HOME to a writable directory") from e
    try:
        conn = sqlite3.connect(path, timeout=10.0, isolation_level=None)  # we manage transactions
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: a killed process loses no commit
        conn.execute("PRAGMA secure_delete = ON")  # forgotten text is overwritten, not left in free pages
        # After a big import the WAL is checkpointed (autocheckpoint) and, on the next write, cut back
        # to this size instead of keeping a copy of the whole import on disk.
        conn.execute("PRAGMA journal_size_limit = 16777216")
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as e:
        raise StoreError(
            f"cannot open the profile store {path}: {e}",
            hint="if the file is damaged, move it aside (your profiles are in it) and run the command again",
        ) from e
    return conn


def store_writable(path: Path) -> bool:
    """Whether the store at `path` can be written: the file (when it exists) and its folder (SQLite
    creates the -wal and -shm files beside it). access(2) also says no on a read-only mount, for root too."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # a store not created yet: the first folder that exists decides
    if path.exists() and not os.access(path, os.W_OK):
        return False
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        return not (os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return True


def _connect_readonly(path: Path) -> sqlite3.Connection:
    """The store opened read-only (sqlite `mode=ro`): no file is created, changed or chmod'ed."""
    if not path.is_file():
        raise StoreError(f"there is no profile store at {path}, and its folder is read-only",
                         hint="set P2P_HOME to a writable directory (or make this one writable)")
    uri = "file:" + urllib.parse.quote(str(path)) + "?mode=ro"
    last: sqlite3.Error | None = None
    # A WAL database on a read-only folder without its -shm file only opens as `immutable` (nothing
    # else can be writing it: the folder is read-only). Tried second, when plain mode=ro cannot read.
    for suffix in ("", "&immutable=1"):
        conn = None
        try:
            conn = sqlite3.connect(uri + suffix, uri=True, timeout=10.0, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            return conn
        except sqlite3.Error as e:
            last = e
            if conn is not None:
                conn.close()
    raise StoreError(f"cannot open the profile store {path} read-only: {last}",
                     hint="check that the file is readable; if it is damaged, restore it from a backup")


def _check_schema_current(conn: sqlite3.Connection, path: Path) -> None:
    """A read-only store cannot be upgraded: refuse one this version would have to change first."""
    from p2p_local.store.migrations import available_upgrades

    try:
        applied = {r[0] for r in conn.execute("SELECT version FROM schema_upgrades")}
    except sqlite3.Error:
        applied = set()
    known = available_upgrades()
    newest = max((u.version for u in known), default=0)
    if applied and max(applied) > newest:
        raise StoreError(f"this store has schema version {max(applied)}, newer than this p2p-local knows ({newest})",
                         hint="upgrade p2p-local, or point P2P_HOME at another data dir")
    pending = [u.version for u in known if u.version not in applied and not u.requires]
    if pending:
        raise StoreError(f"the profile store {path} is read-only and needs a schema upgrade first "
                         f"({', '.join(f'{v:04d}' for v in pending)})",
                         hint="run any p2p command once with the data dir writable")


def conversation_export_path(conversation_id: int) -> Path:
    """Where the chat exports a conversation as Markdown (`forget_profile` removes it with the profile)."""
    return paths.data_dir() / "exports" / f"conversation-{int(conversation_id)}.md"


def profile_exports_in_data_dir(profile: str, tasks: list[str]) -> list[Path]:
    """Adapter exports of the profile in <data dir>/exports/ (where the chat's export key writes them):
    their README holds the query text, so `forget_profile` removes them too."""
    from p2p_local.exports import profile_exports

    return profile_exports(paths.data_dir() / "exports", profile, tasks)


def _cached_file_problem(path: Path, sha256: str | None) -> str | None:
    """Why a cached adapter file cannot be served as is, or None when it is exactly what was written."""
    if not path.exists():
        return "is missing"
    if not path.is_file():
        return "is not a regular file"
    if not sha256:
        return "has no recorded checksum (made by an older version)"
    try:
        if sha256_file(path) != sha256:
            return "does not match its checksum (the file was changed or damaged)"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    return None


def _remove_cached(path: Path) -> None:
    """Clear the way for a regenerated adapter: the bad file, or an empty directory in its place."""
    try:
        if path.is_dir():
            path.rmdir()  # only when empty: a folder with content is the user's, and the write says so
        else:
            _remove_private(path)
    except OSError:
        pass


def _remove_private(path: Path) -> int:
    """Delete an adapter file or directory, but only inside our data dir; returns files removed."""
    try:
        path.resolve().relative_to(paths.data_dir().resolve())
    except ValueError:
        return 0  # never delete a user's file that merely sits elsewhere
    if path.is_dir():
        n = sum(1 for f in path.rglob("*") if f.is_file())
        shutil.rmtree(path, ignore_errors=True)
        return n
    if path.is_file():
        path.unlink(missing_ok=True)
        return 1
    return 0


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise StoreError(
            f"invalid profile name {name!r}",
            hint="use 1-64 letters, digits or . _ @ + - (starting with a letter or digit), e.g. alice",
        )
    return name


def _check_task(task: Any) -> str:
    if not isinstance(task, str) or not task.strip():
        raise StoreError(f"invalid task {task!r}", hint="a task is a non-empty name, e.g. movielens-rating")
    return canonical_task(task.strip())


def _check_time(t: Any) -> float | None:
    if t is None:
        return None
    if isinstance(t, bool) or not isinstance(t, int | float):
        raise StoreError(f"invalid item time {t!r}", hint="times are unix seconds (a number) or empty")
    try:
        value = float(t)
    except OverflowError:
        value = float("inf")
    if not MIN_TIME <= value <= MAX_TIME:  # also false for NaN
        raise StoreError(f"item time {value!r} is outside 1900..2100", hint="times are unix seconds (a number) or empty")
    return value


def _check_text(what: str, s: Any) -> str:
    if not isinstance(s, str) or not s.strip():
        raise StoreError(f"item {what} must be a non-empty string, got {s!r}")
    return s


def _dump_meta(meta: Any) -> str:
    if not isinstance(meta, dict):
        raise StoreError(f"item meta must be a JSON object, got {type(meta).__name__}")
    try:
        return json.dumps(meta, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise StoreError(f"item meta is not JSON-serializable: {e}") from e


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


def _conversation(r: sqlite3.Row) -> Conversation:
    return Conversation(r["id"], r["profile_name"], r["title"], r["created"], r["n_messages"])


def _message(r: sqlite3.Row) -> Message:
    return Message(r["id"], r["conversation_id"], r["role"], r["content"], json.loads(r["meta"]), r["created"])
