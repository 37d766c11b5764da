"""The chat's conversations (of a profile, or of none: the base model) and their messages, with full-text
search (FTS5 where this SQLite has it, else LIKE)."""

from __future__ import annotations

import json
import re
import sqlite3
import time as _time
from pathlib import Path
from typing import Any

from p2p_local import paths
from p2p_local.errors import StoreError
from p2p_local.store.adapter_cache import remove_private
from p2p_local.store.connection import StoreBase
from p2p_local.store.records import ROLES, Conversation, Message, dump_meta

MAX_TITLE_CHARS = 200
MAX_SYSTEM_PROMPT_CHARS = 4000  # a system prompt shares the small model's context with the transcript

# A conversation with its profile's name (NULL: none) and message count, as `_conversation` reads it.
_CONVERSATIONS = (
    "SELECT c.*, p.name AS profile_name,"
    " (SELECT COUNT(*) FROM messages WHERE conversation_id = c.id) AS n_messages"
    " FROM conversations c LEFT JOIN profiles p ON p.id = c.profile_id"
)


class ConversationStore:
    """The conversations aggregate (a part of `Store`)."""

    def __init__(self, db: StoreBase) -> None:
        self.db = db

    def new_conversation(self, profile: str | None = None, title: str = "", *, system_prompt: str = "",
                         scale: float | None = None) -> int:
        pid = self.db._pid(profile) if profile is not None else None
        title, system_prompt, scale = _title(title), _system_prompt(system_prompt), _scale(scale)
        with self.db._write() as c:
            cur = c.execute(
                "INSERT INTO conversations (profile_id, title, created, system_prompt, scale) VALUES (?, ?, ?, ?, ?)",
                (pid, title, _time.time(), system_prompt, scale),
            )
        return int(cur.lastrowid)

    def rename_conversation(self, conversation_id: int, title: str) -> None:
        self._conversation_row(conversation_id)
        with self.db._write() as c:
            c.execute("UPDATE conversations SET title = ? WHERE id = ?", (_title(title), conversation_id))

    def set_conversation_settings(self, conversation_id: int, *, system_prompt: str | None = None,
                                  scale: float | None = None) -> None:
        """Change the conversation's system prompt and/or strength (None: left as it is)."""
        self._conversation_row(conversation_id)
        with self.db._write() as c:
            if system_prompt is not None:
                c.execute("UPDATE conversations SET system_prompt = ? WHERE id = ?",
                          (_system_prompt(system_prompt), conversation_id))
            if scale is not None:
                c.execute("UPDATE conversations SET scale = ? WHERE id = ?", (_scale(scale), conversation_id))

    def delete_conversation(self, conversation_id: int) -> int:
        """Remove the conversation as `forget_profile` removes a profile's: its messages (freed pages zeroed:
        secure_delete), their words in the search index, the Markdown the chat exported of it, and the WAL
        checkpointed so the text does not linger in the database files. Returns the messages removed."""
        self._conversation_row(conversation_id)
        with self.db._write() as c:
            n = c.execute("DELETE FROM messages WHERE conversation_id = ?", (conversation_id,)).rowcount
            c.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
        remove_private(conversation_export_path(conversation_id))
        if self.db.has_fts and n:
            self.db.conn.execute("INSERT INTO messages_fts(messages_fts) VALUES ('optimize')")  # drop old tokens
        self.db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return n

    def add_message(self, conversation_id: int, role: str, content: str, meta: dict[str, Any] | None = None) -> int:
        """Append a message. `meta` e.g. {"mode": "personalized", "adapter": "...", "scale": 1.0}."""
        if role not in ROLES:
            raise StoreError(f"unknown message role {role!r}", hint=f"one of {', '.join(ROLES)}")
        self._conversation_row(conversation_id)
        with self.db._write() as c:
            cur = c.execute(
                "INSERT INTO messages (conversation_id, role, content, meta, created) VALUES (?, ?, ?, ?, ?)",
                (conversation_id, role, content, dump_meta(meta or {}), _time.time()),
            )
        return int(cur.lastrowid)

    def all(self, profile: str | None = None) -> list[Conversation]:
        """Conversations, newest first: all of them, or only those of `profile`."""
        if profile is None:
            rows = self.db.conn.execute(_CONVERSATIONS + " ORDER BY c.id DESC")
        else:
            rows = self.db.conn.execute(_CONVERSATIONS + " WHERE c.profile_id = ? ORDER BY c.id DESC",
                                     (self.db._pid(profile),))
        return [_conversation(r) for r in rows]

    def get_conversation(self, conversation_id: int) -> Conversation:
        return _conversation(self._conversation_row(conversation_id))

    def messages(self, conversation_id: int) -> list[Message]:
        self._conversation_row(conversation_id)
        rows = self.db.conn.execute("SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,))
        return [_message(r) for r in rows]

    def search_messages(self, query: str, profile: str | None = None, limit: int = 50) -> list[Message]:
        """Messages containing every word of `query` (FTS5 ranking where available, else LIKE)."""
        words = re.findall(r"\w+", query)
        if not words:
            return []
        args: list[Any] = []
        if self.db.has_fts:
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
            args.append(self.db._pid(profile))
        sql += (" ORDER BY f.rank" if self.db.has_fts else " ORDER BY m.id DESC") + " LIMIT ?"
        args.append(limit)
        return [_message(r) for r in self.db.conn.execute(sql, args)]

    def _conversation_row(self, conversation_id: int) -> sqlite3.Row:
        row = self.db.conn.execute(_CONVERSATIONS + " WHERE c.id = ?", (conversation_id,)).fetchone()
        if row is None:
            raise StoreError(f"no conversation with id {conversation_id}")
        return row


def conversation_export_path(conversation_id: int) -> Path:
    """Where the chat exports a conversation as Markdown (`forget_profile` removes it with the profile)."""
    return paths.data_dir() / "exports" / f"conversation-{int(conversation_id)}.md"


def _conversation(r: sqlite3.Row) -> Conversation:
    return Conversation(r["id"], r["profile_name"], r["title"], r["created"], r["n_messages"],
                        r["system_prompt"], r["scale"])


def _title(title: str) -> str:
    if not isinstance(title, str):
        raise StoreError(f"a conversation title must be a string, got {type(title).__name__}")
    return " ".join(title.split())[:MAX_TITLE_CHARS]  # one line: it is listed and exported as a heading


def _system_prompt(text: str) -> str:
    if not isinstance(text, str):
        raise StoreError(f"a system prompt must be a string, got {type(text).__name__}")
    if len(text) > MAX_SYSTEM_PROMPT_CHARS:
        raise StoreError(f"the system prompt is {len(text):,} characters; at most {MAX_SYSTEM_PROMPT_CHARS:,}",
                         hint="keep it short: it shares the model's context with the conversation")
    return text.strip()


def _scale(scale: float | None) -> float | None:
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not 0 <= scale <= 4:
        raise StoreError(f"invalid adapter strength {scale!r}", hint="a number from 0 to 2")
    return float(scale)


def _message(r: sqlite3.Row) -> Message:
    return Message(r["id"], r["conversation_id"], r["role"], r["content"], json.loads(r["meta"]), r["created"])
