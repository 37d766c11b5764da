"""Per-user data as the app reads it: the generic format and the task cards (see docs/DATA.md).

Converters, splits, metrics and prepared task sets study the app and live in `p2p_lab`.
"""

from p2p_local.data.format import (
    Item,
    TaskCard,
    User,
    builtin_card,
    builtin_cards,
    read_users_jsonl,
    write_users_jsonl,
)

__all__ = [
    "Item",
    "TaskCard",
    "User",
    "builtin_card",
    "builtin_cards",
    "read_users_jsonl",
    "write_users_jsonl",
]
