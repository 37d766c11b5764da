"""The `Store` facade: the aggregates on one connection, plus `forget_profile`, which spans them."""

from __future__ import annotations

import sqlite3
from contextlib import AbstractContextManager
from pathlib import Path

from p2p_local import paths
from p2p_local.exports import profile_exports
from p2p_local.store.adapter_cache import AdapterCache, remove_private
from p2p_local.store.connection import StoreBase
from p2p_local.store.conversations import ConversationStore, conversation_export_path
from p2p_local.store.profiles import ProfileStore
from p2p_local.store.records import ForgetReport
from p2p_local.store.task_cards import TaskCardStore


class Store:
    """The aggregates on one connection; a caller names the one it uses:
    `with Store() as s: s.profiles.create_profile("alice", task="my-ratings")`."""

    def __init__(self, path: Path | str | None = None, readonly: bool | None = None, snapshot: bool = False) -> None:
        self.db = StoreBase(path, readonly, snapshot)  # the connection, its transactions and locks
        self.profiles = ProfileStore(self.db)
        self.adapters = AdapterCache(self.db)
        self.conversations = ConversationStore(self.db)
        self.task_cards = TaskCardStore(self.db)

    @property
    def path(self) -> Path:
        return self.db.path

    @property
    def readonly(self) -> bool:
        return self.db.readonly

    @property
    def conn(self) -> sqlite3.Connection:
        return self.db.conn

    def transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        """One write transaction around calls to several aggregates (all or nothing)."""
        return self.db.transaction()

    def profile_lock(self, profile: str) -> AbstractContextManager[None]:
        """One profile's changes, one at a time (`StoreBase.profile_lock`)."""
        return self.db.profile_lock(profile)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def forget_profile(self, name: str) -> ForgetReport:
        """Remove the profile and everything derived from it: items, history, adapters (rows AND
        files), conversations and their messages. Freed pages are zeroed (secure_delete) and the
        WAL is checkpointed, so the text does not linger in the database files."""
        with self.profile_lock(name):  # an answer writing this profile's adapter finishes first
            p = self.profiles.get_profile(name)
            files = [Path(r.path) for r in self.adapters.all(name)] + [self.adapters.adapter_dir(name, create=False)]
            # Chats the user exported from the chat screen are traces of the profile too.
            files += [conversation_export_path(c.id) for c in self.conversations.all(name)]
            # So are its adapter exports in <data dir>/exports/ (the chat's export key): READMEs hold queries.
            files += profile_exports(paths.data_dir() / "exports", p.name, [p.task or "", *self.profiles.task_counts(name)])
            counts = {}
            with self.db._write() as c:
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
                # A user's task card goes with the last profile that uses it (it may describe the user too).
                c.execute("DELETE FROM task_cards WHERE name NOT IN (SELECT task FROM profiles WHERE task IS NOT NULL)"
                          " AND name NOT IN (SELECT DISTINCT task FROM items)")
            removed = sum(remove_private(f) for f in files)
            if self.db.has_fts and counts["messages"]:
                self.conn.execute("INSERT INTO messages_fts(messages_fts) VALUES ('optimize')")  # drop old tokens
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return ForgetReport(counts["items"], counts["history"], counts["adapters"], removed,
                            counts["conversations"], counts["messages"])

