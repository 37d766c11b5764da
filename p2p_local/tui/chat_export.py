"""The chat's export key: a conversation written as Markdown into <data dir>/exports/ (0600).

How a conversation reads as a document is the chat's concern, not the store's: the store hands out
the conversation and its messages, and `forget_profile` removes the file via `conversation_export_path`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from p2p_local.files import atomic_write
from p2p_local.paths import private_dir
from p2p_local.store import Store
from p2p_local.store.conversations import conversation_export_path


def export_conversation(store: Store, conversation_id: int) -> Path:
    """Write the conversation as Markdown into <data dir>/exports/; returns the file."""
    path = conversation_export_path(conversation_id)
    private_dir(path.parent)  # 0700, also an older 0755 one
    return atomic_write(path, conversation_markdown(store, conversation_id))  # 0600: private, as the store


def conversation_markdown(store: Store, conversation_id: int) -> str:
    """The conversation as a Markdown document: title, who it was with, then each message with how it
    was answered (and a rating reply's label distribution)."""
    conv = store.get_conversation(conversation_id)
    title = conv.title or f"Conversation {conv.id}"
    who = f"profile **{conv.profile}**" if conv.profile else "base model (no profile)"
    started = time.strftime("%Y-%m-%d %H:%M", time.localtime(conv.created))
    lines = [f"# {title}", "", f"_{who} · started {started}_", ""]
    for m in store.messages(conversation_id):
        head = {"user": "You", "assistant": "Assistant", "system": "System"}[m.role]
        details = _message_details(m.role, m.meta)
        lines += [f"**{head}**" + (f" ({', '.join(details)})" if details else "") + ":", "", m.content, ""]
        if m.role == "assistant" and isinstance(m.meta.get("dist"), dict) and m.meta["dist"]:
            dist = " · ".join(f"{label}: {100 * float(p):.0f}%" for label, p in m.meta["dist"].items())
            lines += [f"_label distribution: {dist}_", ""]
    return "\n".join(lines)


def _message_details(role: str, meta: dict[str, Any]) -> list[str]:
    """What an exported message says of how it was answered: the task (or free chat), and how."""
    task = meta.get("task") or "free chat"
    if role == "user":
        return [task]
    if role != "assistant":
        return []
    if meta.get("free_chat") == "summary":
        how = "base model + profile summary"  # free chat never attaches a task adapter
    elif meta.get("mode") == "personalized":
        how = "personalized" + (f" x{meta['scale']:g}" if isinstance(meta.get("scale"), (int, float)) else "")
    else:
        how = str(meta.get("mode") or "")
    details = [d for d in (task, how) if d]
    return details + [k for k in ("cut", "stopped") if meta.get(k)]
