"""The chat's export key: a conversation written as Markdown into <data dir>/exports/ (0600).

How a conversation reads as a document is the chat's concern, not the store's: the store hands out
the conversation and its messages, and `forget_profile` / `delete_conversation` remove the file via
`conversation_export_path`. A reply says how it was made (task, adapter or not, the model that answered)
and carries the same cut mark as in the chat and `p2p ask` (`pipeline.CUT_MARKS`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from p2p_local.files import atomic_write
from p2p_local.paths import private_dir
from p2p_local.pipeline import CUT_MARKS, cut_mark
from p2p_local.store import Store
from p2p_local.store.conversations import conversation_export_path


def export_conversation(store: Store, conversation_id: int) -> Path:
    """Write the conversation as Markdown into <data dir>/exports/; returns the file."""
    path = conversation_export_path(conversation_id)
    private_dir(path.parent)  # 0700, also an older 0755 one
    return atomic_write(path, conversation_markdown(store, conversation_id))  # 0600: private, as the store


def cut_reason(meta: dict[str, Any]) -> str | None:
    """How a stored reply was cut: "stopped" (the user), "length" or "repeat" (`pipeline.CUT_MARKS`), or None."""
    if meta.get("stopped"):
        return "stopped"
    cut = meta.get("cut")
    if cut is True:  # stored before the reason was: only the token budget was marked then
        return "length"
    return cut if isinstance(cut, str) and cut in CUT_MARKS else None


def conversation_markdown(store: Store, conversation_id: int) -> str:
    """The conversation as a Markdown document: title, who it was with, then each message with how it
    was answered (and a rating reply's label distribution)."""
    conv = store.conversations.get_conversation(conversation_id)
    title = conv.title or f"Conversation {conv.id}"
    who = f"profile **{conv.profile}**" if conv.profile else "base model (no profile)"
    started = time.strftime("%Y-%m-%d %H:%M", time.localtime(conv.created))
    lines = [f"# {title}", "", f"_{who} · started {started}_", ""]
    if conv.system_prompt:
        lines += [f"_system prompt (free chat): {' '.join(conv.system_prompt.split())}_", ""]
    for m in store.conversations.messages(conversation_id):
        head = {"user": "You", "assistant": "Assistant", "system": "Note"}[m.role]
        details = _message_details(m.role, m.meta)
        content = m.content + (cut_mark(cut_reason(m.meta)) if m.role == "assistant" else "")
        lines += [f"**{head}**" + (f" ({', '.join(details)})" if details else "") + ":", "", content, ""]
        if m.role == "assistant" and isinstance(m.meta.get("dist"), dict) and m.meta["dist"]:
            dist = " · ".join(f"{label}: {100 * float(p):.0f}%" for label, p in m.meta["dist"].items())
            lines += [f"_label distribution: {dist}_", ""]
    return "\n".join(lines)


def _message_details(role: str, meta: dict[str, Any]) -> list[str]:
    """What an exported message says of how it was answered: the task (or free chat), how, and by which model."""
    task = meta.get("task") or "free chat"
    if role == "user":
        return [task]
    if role != "assistant":
        return []
    kind = "chat model" if meta.get("chat_model") else "base model"
    if meta.get("empty"):
        how = "base model: no items of this task in the profile, no adapter"
    elif meta.get("free_chat") == "summary":
        how = f"{kind} + profile summary"  # free chat never attaches a task adapter
    elif meta.get("mode") == "personalized":
        how = "personalized" + (f" x{meta['scale']:g}" if isinstance(meta.get("scale"), (int, float)) else "")
    elif meta.get("mode") == "base" and meta.get("chat_model"):
        how = kind
    else:
        how = str(meta.get("mode") or "")
    details = [d for d in (task, how, str(meta.get("model") or "")) if d]
    reason = cut_reason(meta)
    return details + ([reason if reason == "stopped" else f"cut: {reason}"] if reason else [])
