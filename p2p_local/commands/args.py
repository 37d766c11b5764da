"""Argument types shared by the answering commands: a bad value is a usage error (exit 2) before any
model loads, never a store or model error."""

from __future__ import annotations

import argparse
import functools
import json
import math
import shlex

MAX_SCALE = 2.0
MAX_TEMPERATURE = 2.0
MAX_TOKENS = 2048  # the engine's context: more can never be generated
MAX_CANDIDATES = 8  # proposals of a one-line answer (each costs a short greedy branch)


class HelpFormatter(argparse.HelpFormatter):
    """Descriptions wrap to the terminal; indented lines (the examples of an epilog) stay as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(indent + line if line[:1].isspace() or not line.strip()
                         else super(HelpFormatter, self)._fill_text(line, width, indent)
                         for line in text.splitlines())


class Parser(argparse.ArgumentParser):
    """Every `p2p` parser: the help formatter above. Sub-parsers inherit the class (argparse builds them with
    `type(parent)`), so no command re-spells it."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - argparse's own signature
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


@functools.cache
def examples() -> dict[str, str]:
    """Names for the help examples, read from the shipped cards (the one home of a task's facts, so no command
    spells one): `task` and `query`, the first labelled card and its first sample; `commits`, the first card that
    reads a change; `json_query`, the sample as a JSON string. A help text says `EPILOG.format(**examples())`."""
    from p2p_local.data.format import builtin_card, builtin_cards

    cards = [builtin_card(name) for name in builtin_cards()]
    rated = next((c for c in cards if c.labelled and c.samples), None)
    change = next((c for c in cards if c.diff_chars), None)
    sample = rated.samples[0] if rated else "QUERY"
    return {"task": rated.name if rated else "TASK", "query": shlex.quote(sample), "json_query": json.dumps(sample),
            "commits": change.name if change else "TASK"}


def scale_arg(value: str) -> float:
    """An adapter strength, 0..MAX_SCALE."""
    return _bounded_float(value, MAX_SCALE)


def temperature_arg(value: str) -> float:
    """A sampling temperature, 0 (greedy) .. MAX_TEMPERATURE."""
    return _bounded_float(value, MAX_TEMPERATURE, " (0: greedy)")


def _bounded_float(value: str, top: float, note: str = "") -> float:
    """A finite number in 0..top, else argparse's usage error naming the range."""
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value[:30]!r} is not a number") from None
    if not math.isfinite(x) or not 0.0 <= x <= top:
        raise argparse.ArgumentTypeError(f"{value[:30]} is outside 0..{top:g}{note}")
    return x


def max_tokens_arg(value: str) -> int:
    """How many tokens an answer may have, 1 .. MAX_TOKENS."""
    return bounded_int(value, MAX_TOKENS)


def candidates_arg(value: str) -> int:
    """How many proposals a one-line answer lists, 1 .. MAX_CANDIDATES."""
    return bounded_int(value, MAX_CANDIDATES)


def bounded_int(value: str, top: int, low: int = 1) -> int:
    """A whole number in low..top, else argparse's usage error naming the range."""
    try:
        n = int(value) if len(value) <= 12 else low - 1
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value[:30]!r} is not an integer") from None
    if not low <= n <= top:
        raise argparse.ArgumentTypeError(f"{value[:30]} is outside {low}..{top}")
    return n


def missing_modules(names: tuple[str, ...]) -> list[str]:
    """The modules of an optional extra this interpreter cannot import (found without importing them)."""
    import importlib.util

    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def task_arg(value: str) -> str:
    """A task's name: a built-in card's, a card of the user's own stored in this data dir (`p2p profile create
    NAME --task-card FILE`), or free chat (any of its names: `data.format.FREE_CHAT_NAMES`)."""
    from p2p_local.data.format import FREE_CHAT, builtin_cards, resolve_task
    from p2p_local.errors import UsageError
    from p2p_local.store.task_cards import stored_task_names

    try:  # free chat (None) or a built-in card (a former name gives today's): the one reading of a task
        card = resolve_task(value)
        return FREE_CHAT if card is None else card.name
    except UsageError:
        pass
    own = stored_task_names()  # read-only: a bad argument never creates or upgrades the store
    if value in own:
        return value
    known = builtin_cards() + own
    raise argparse.ArgumentTypeError(f"unknown task {value[:70]!r} (known: {', '.join(known)}, or chat/free; "
                                     "your own: p2p profile create NAME --task-card FILE)")
