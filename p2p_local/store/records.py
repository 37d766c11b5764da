"""What the store takes in and hands out: its record types, and the checks on names, tasks, times, texts
and meta that every aggregate applies before writing (so a bad value fails the same way everywhere)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2p_local.data.format import canonical_task
from p2p_local.data.records import time_in_range
from p2p_local.errors import StoreError

# Profile names appear in commands and file listings: letters/digits first, no spaces or slashes.
# \A...\Z, not ^...$: `$` also matches before a trailing newline ("alice\n" would pass).
_NAME = re.compile(r"\A\w[\w.@+-]{0,63}\Z")
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
    system_prompt: str = ""  # free chat's system prompt in this conversation ("": none)
    scale: float | None = None  # the adapter strength it was left at (None: the chat's current one)


@dataclass(frozen=True)
class Message:
    id: int
    conversation_id: int
    role: str
    content: str
    meta: dict[str, Any]
    created: float


# --- checks --------------------------------------------------------------------------------------
def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise StoreError(
            f"invalid profile name {name!r}",
            hint="use 1-64 letters, digits or . _ @ + - (starting with a letter or digit), e.g. alice",
        )
    return name


def check_task(task: Any) -> str:
    if not isinstance(task, str) or not task.strip():
        raise StoreError(f"invalid task {task!r}", hint="a task is a non-empty name, e.g. my-ratings")
    return canonical_task(task.strip())


def check_time(t: Any) -> float | None:
    """Unix seconds between 1900 and 2100 (`data.records.time_in_range`), or None."""
    if t is None:
        return None
    if isinstance(t, bool) or not isinstance(t, int | float):
        raise StoreError(f"invalid item time {t!r}", hint="times are unix seconds (a number) or empty")
    try:
        return time_in_range(t)
    except ValueError as e:
        raise StoreError(f"item {e}", hint="times are unix seconds (a number) or empty") from None


def check_text(what: str, s: Any) -> str:
    if not isinstance(s, str) or not s.strip():
        raise StoreError(f"item {what} must be a non-empty string, got {s!r}")
    return s


def dump_meta(meta: Any) -> str:
    if not isinstance(meta, dict):
        raise StoreError(f"item meta must be a JSON object, got {type(meta).__name__}")
    try:
        return json.dumps(meta, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise StoreError(f"item meta is not JSON-serializable: {e}") from e

