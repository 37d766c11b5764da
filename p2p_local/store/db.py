"""The private profile store: one SQLite file under the data dir (mode 0600, WAL, foreign keys on).

It holds profiles, their items with a per-item change history, the cache of generated adapters, and
the chat's conversations. Profiles are addressed by name. Every write is one transaction, so a
process killed mid-import leaves either the whole import or none of it. Any change to a profile's
items marks its adapter stale. `secure_delete` is on, so forgotten data is overwritten in the file,
not just unlinked from the b-tree.

`Store` is a facade over one connection (connection.py) composed of the three aggregates, each in
its own module: profiles and items (profiles.py), the adapter cache (adapter_cache.py) and the
conversations (conversations.py). Forgetting a profile spans all three, so it lives here.

One Store per thread (sqlite3 connections are not shared across threads).
"""

from __future__ import annotations

from pathlib import Path

from p2p_local import paths
from p2p_local.store.adapter_cache import AdapterCache, remove_private
from p2p_local.store.conversations import ConversationStore, conversation_export_path
from p2p_local.store.profiles import ProfileStore
from p2p_local.store.records import ForgetReport


class Store(ProfileStore, AdapterCache, ConversationStore):
    """`with Store() as s: s.create_profile("alice", task="movielens-rating")`."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        removed = sum(remove_private(f) for f in files)
        if self.has_fts and counts["messages"]:
            self.conn.execute("INSERT INTO messages_fts(messages_fts) VALUES ('optimize')")  # drop old tokens
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return ForgetReport(counts["items"], counts["history"], counts["adapters"], removed,
                            counts["conversations"], counts["messages"])


def profile_exports_in_data_dir(profile: str, tasks: list[str]) -> list[Path]:
    """Adapter exports of the profile in <data dir>/exports/ (where the chat's export key writes them):
    their README holds the query text, so `forget_profile` removes them too."""
    from p2p_local.exports import profile_exports

    return profile_exports(paths.data_dir() / "exports", profile, tasks)

