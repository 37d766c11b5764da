"""How a raw record becomes an item: one function per source kind, shared by the dataset converters
(`p2p_lab.data.converters`, the training and evaluation data) and the app's importers, so an item the
user imports is the item the hypernetwork was trained on: the same text, the same metadata.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from datetime import datetime
from itertools import accumulate
from typing import Any

# Deliberate caps (characters): training cost on a laptop CPU grows with prompt length.
MAX_TITLE_CHARS = 120
MAX_COMMENT_CHARS = 400
MAX_EMAIL_CHARS = 500
MAX_SUBJECT_CHARS = 120
MAX_BODY_CHARS = 300
MAX_FILES_CHARS = 600  # every changed file is named up to this budget; only huge commits say "+N more"
NO_GENRES = "(no genres listed)"  # MovieLens' own spelling of "none"
MIN_TIME = -2_208_988_800.0  # 1900-01-01: item times are unix seconds within 1900..2100
MAX_TIME = 4_102_444_800.0  # 2100-01-01

PR_SUFFIX = re.compile(r"(?:\s*\(#\d+\))+\s*$")  # "(#123)", also stacked "(#123) (#130)"


def clean_text(text: str) -> str:
    """Normalise line ends and whitespace; keep line structure (it is part of a user's style)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ").replace("\x00", "")
    lines = [ln.rstrip() for ln in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def truncate(text: str, max_chars: int, stats: Counter | None = None) -> str:
    """Cut at a word boundary before `max_chars` and mark the cut with an ellipsis."""
    if len(text) <= max_chars:
        return text
    if stats is not None:
        stats["texts_truncated"] += 1
    cut = text[: max_chars - 1]
    space = cut.rfind(" ")
    if space > max_chars // 2:
        cut = cut[:space]
    return cut.rstrip() + "…"


def movie_genres(field: str) -> list[str]:
    """MovieLens' "A|B" genres field -> ["A", "B"] ("(no genres listed)" -> [])."""
    return [g for g in field.split("|") if g and g != NO_GENRES]


def movie_item(title: str, genres: list[str], movie_id: int | str) -> tuple[str, dict[str, Any]]:
    """A rated movie's input text ("Title (Year) | Genres: A|B") and metadata (genres, item_id)."""
    text = f"{truncate(clean_text(title), MAX_TITLE_CHARS)} | Genres: {'|'.join(genres) if genres else 'unknown'}"
    item_id = int(movie_id) if str(movie_id).isdigit() else movie_id
    return text, {"genres": list(genres), "item_id": item_id}


def commit_input(body: str, files: list[str], stats: Counter | None = None) -> str:
    """Compact commit description: every changed file first, then the body (truncated).

    Every file name is shown (a new file must not hide behind "+2 more"), up to MAX_FILES_CHARS; past
    that budget (vendored trees, mass renames) the rest is counted. An empty body gives the files line
    alone: half of pytest's commits have no body, and the files still say what the commit touched.
    """
    shown = files[: max(1, sum(n <= MAX_FILES_CHARS for n in accumulate(len(f) + 2 for f in files)))]
    line = ", ".join(shown)
    if len(files) > len(shown):
        line += f" (+{len(files) - len(shown)} more)"
        if stats is not None:
            stats["commits_files_cut"] += 1
    head = f"files: {line}" if files else "files: none"
    body = truncate(body, MAX_BODY_CHARS, stats) if body else ""
    return f"{head}\n{body}" if body else head


def commit_item(subject: str, body: str, files: list[str], sha: str = "",
                stats: Counter | None = None) -> tuple[str, str, dict[str, Any]] | None:
    """A commit's (input, output = its subject line, metadata); None when the subject is empty."""
    subject = clean_text(subject).split("\n")[0]
    if PR_SUFFIX.search(subject):
        subject = PR_SUFFIX.sub("", subject)
        if stats is not None:
            stats["subjects_pr_suffix_removed"] += 1  # "(#1234)" is added by GitHub, not by the author
    if not subject:
        return None
    files = [str(f) for f in files if isinstance(f, str) and f]
    inp = commit_input(clean_text(body), files, stats)
    return inp, truncate(subject, MAX_SUBJECT_CHARS, stats), {"item_id": sha[:12], "n_files": len(files)}


# --- times and values as the importers read them ------------------------------------------------
def parse_time(value: Any) -> float | None:
    """Unix seconds from a number, a numeric string or ISO 8601 text; None/"" -> None.

    Between 1900 and 2100: a time outside them is a unit mix-up (milliseconds) or poison (`inf`,
    `1e300`) that `time.localtime` and every later screen would choke on.
    """
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError(f"bad time {value!r}")
    if isinstance(value, int | float):
        return time_in_range(value)
    if isinstance(value, str):
        s = value.strip()
        if len(s) > 64:
            raise ValueError(f"bad time {s[:20]!r}...: too long for a time")
        for parse in (float, lambda s: datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()):  # naive: local
            try:
                t = parse(s)
            except (ValueError, OverflowError, OSError):
                continue
            return time_in_range(t)
    raise ValueError(f"bad time {brief(value)}: use unix seconds or ISO 8601 (2024-05-01T12:00:00)")


def time_in_range(value: float) -> float:
    try:
        t = float(value)
    except OverflowError:
        t = math.inf
    if not (math.isfinite(t) and MIN_TIME <= t <= MAX_TIME):
        raise ValueError(f"time {brief(value)} is outside 1900..2100 (unix seconds)")
    return t


def brief(v: Any) -> str:
    """A value for an error message: repr, cut short (a 100 MB field must not fill the terminal)."""
    big = isinstance(v, int) and v.bit_length() > 100  # str() of a 5000-digit int raises ValueError
    text = f"an integer of about {int(v.bit_length() * 0.30103)} digits" if big else repr(v)
    return text if len(text) <= 80 else text[:77] + "..."
