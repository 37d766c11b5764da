"""The private profile store: one SQLite file under the data dir (0600, WAL, foreign keys on) holding profiles,
their items with a per-item change history, the adapter cache, the chat's conversations and the user's own
task cards.

    from p2p_local.store import Store
    with Store() as s:                       # p2p_local.paths.store_path(), created 0600 on first use
        s.profiles.create_profile("alice", task="my-ratings")
        s.profiles.add_item("alice", None, "Heat (1995) | Genres: Action|Crime", "5")

Every write is one transaction (a process killed mid-import leaves all of the import or none), and
`secure_delete` overwrites forgotten data in the file. db.py: `Store` (one per thread) composes the aggregates
on connection.py's one connection, and a caller names the one it uses: `store.profiles` (profiles.py),
`store.adapters` (adapter_cache.py), `store.conversations` (conversations.py), `store.task_cards` (task_cards.py,
with the one task name -> card resolver); records.py: the record types and value checks.
"""

from p2p_local.store.db import Store
from p2p_local.store.records import (
    AdapterRecord,
    Conversation,
    ForgetReport,
    HistoryEntry,
    Message,
    NewItem,
    ProfileRecord,
    StoredItem,
)

__all__ = [
    "AdapterRecord",
    "Conversation",
    "ForgetReport",
    "HistoryEntry",
    "StoredItem",
    "Message",
    "NewItem",
    "ProfileRecord",
    "Store",
]
