"""Per-user data: the generic format and task cards, converters, splits, metrics, prepared task sets.

    from p2p_local.data import load_task
    td = load_task("movielens-rating")   # TaskData(card, train, val, test, ood, stats)

See docs/DATA.md.
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
from p2p_local.data.prepare import TASKS, TaskData, load_task, prepare_task

__all__ = [
    "Item",
    "TASKS",
    "TaskCard",
    "TaskData",
    "User",
    "builtin_card",
    "builtin_cards",
    "load_task",
    "prepare_task",
    "read_users_jsonl",
    "write_users_jsonl",
]
