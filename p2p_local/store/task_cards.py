"""A user's own task cards, stored in this data dir and keyed by task name, and THE resolver from a task's name
to its card (`task_card`): a built-in card first, else a stored one. Every command that names a task (ask,
chat, personalize, adapter export, profile import) reaches its card through it, via `Session.card` or here.
A built-in name cannot be taken by a user's card: the bundle was trained on the built-in's prompt.
"""

from __future__ import annotations

import json
import sqlite3
import time as _time
from pathlib import Path

from p2p_local import paths
from p2p_local.data.format import (
    FREE_CHAT_NAMES,
    TaskCard,
    builtin_card,
    builtin_cards,
    canonical_task,
)
from p2p_local.errors import P2PError, StoreError, UsageError
from p2p_local.store.connection import StoreBase
from p2p_local.store.records import check_name


class TaskCardStore:
    """The task-card aggregate (a part of `Store`)."""

    def __init__(self, db: StoreBase) -> None:
        self.db = db

    def save_task_card(self, card: TaskCard) -> bool:
        """Store a user's card under its name; True if stored, False if this very card is already there.
        Refuses a built-in (or free chat's) name, and a different card under a stored name (a task name means
        one card in a data dir: items, adapters and conversations refer to the task by it)."""
        name = card.name
        if canonical_task(name) in builtin_cards() or name in FREE_CHAT_NAMES:
            raise UsageError(f"task {name!r} is a built-in task: a card of your own cannot replace it",
                             hint="give your card another \"name\", e.g. my-" + name)
        try:
            check_name(name)  # the same shape as a profile name: it appears in commands and file names
        except StoreError:
            raise UsageError(f"invalid task name {name!r} in the task card",
                             hint="use 1-64 letters, digits or . _ @ + - (starting with a letter or digit)") from None
        text = json.dumps(TaskCard.from_dict(card.to_dict()).to_dict(), sort_keys=True, ensure_ascii=False)
        with self.db._write() as c:
            row = c.execute("SELECT card FROM task_cards WHERE name = ?", (name,)).fetchone()
            if row is not None:
                if json.loads(row[0]) == json.loads(text):
                    return False
                raise StoreError(f"a different task card named {name!r} is already stored",
                                 hint="give your card another \"name\" (profiles holding the stored one still use "
                                      "it; forgetting them all removes it)")
            c.execute("INSERT INTO task_cards (name, card, created) VALUES (?, ?, ?)", (name, text, _time.time()))
        return True

    def stored_card(self, name: str) -> TaskCard | None:
        """A user's card stored under `name`, or None."""
        row = self.db.conn.execute("SELECT card FROM task_cards WHERE name = ?", (name,)).fetchone()
        return None if row is None else TaskCard.from_dict(json.loads(row[0]))

    def stored_cards(self) -> dict[str, TaskCard]:
        """Every user's card stored here, by name."""
        rows = self.db.conn.execute("SELECT name, card FROM task_cards ORDER BY name")
        return {r[0]: TaskCard.from_dict(json.loads(r[1])) for r in rows}

    def task_card(self, name: str) -> TaskCard:
        """The card of task `name`: the built-in one (a former name gives today's), else the user's stored one;
        UsageError naming the known tasks otherwise."""
        task = canonical_task(name)
        if task in builtin_cards():
            return builtin_card(task)
        card = self.stored_card(task)
        if card is None:
            raise UsageError(f"unknown task {task!r}", hint=f"known tasks: {', '.join(self.task_names())}; "
                                                           "your own: p2p profile create NAME --task-card FILE")
        return card

    def all(self) -> dict[str, TaskCard]:
        """Every task's card: the built-in ones, then the user's."""
        return {**{n: builtin_card(n) for n in builtin_cards()}, **self.stored_cards()}

    def task_names(self) -> list[str]:
        """Names of every task: the built-in ones, then the user's."""
        return builtin_cards() + [r[0] for r in self.db.conn.execute("SELECT name FROM task_cards ORDER BY name")]


def stored_task_names(path: Path | None = None) -> list[str]:
    """Names of the user's cards in the store at `path` (default: this data dir's), read-only; [] where there is
    no store or it cannot be read (an argument check must not create or upgrade one)."""
    from p2p_local.store.db import Store

    path = paths.store_path(create=False) if path is None else path
    if not path.is_file():
        return []
    try:
        with Store(path, readonly=True) as s:
            return [r[0] for r in s.conn.execute("SELECT name FROM task_cards ORDER BY name")]
    except (P2PError, sqlite3.Error):
        return []
