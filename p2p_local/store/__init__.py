"""The private profile store (SQLite): profiles, items and their history, adapter cache, conversations.

    from p2p_local.store import Store
    with Store() as s:                       # p2p_local.paths.store_path(), created 0600 on first use
        s.create_profile("alice", task="movielens-rating")
        s.add_item("alice", None, "Heat (1995) | Genres: Action|Crime", "5")

db.py is the `Store` facade; connection.py the connection and its transactions; profiles.py,
adapter_cache.py and conversations.py the aggregates; records.py the record types and value checks.
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
