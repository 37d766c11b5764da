"""Argument types shared by the answering commands: a bad value is a usage error (exit 2) before any
model loads, never a store or model error."""

from __future__ import annotations

import argparse
import math

MAX_SCALE = 2.0


def scale_arg(value: str) -> float:
    """An adapter strength, 0..MAX_SCALE."""
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value[:30]!r} is not a number") from None
    if not math.isfinite(x) or not 0.0 <= x <= MAX_SCALE:
        raise argparse.ArgumentTypeError(f"{value[:30]} is outside 0..{MAX_SCALE:g}")
    return x


def task_arg(value: str) -> str:
    """A built-in task card's name, or free chat (any of its names: `data.format.FREE_CHAT_NAMES`)."""
    from p2p_local.data.format import FREE_CHAT, builtin_cards, canonical_task, is_free_chat

    known = builtin_cards()
    if is_free_chat(value):
        return FREE_CHAT
    if canonical_task(value) in known:
        return canonical_task(value)
    raise argparse.ArgumentTypeError(f"unknown task {value[:70]!r} (known: {', '.join(known)}, or chat/free)")
