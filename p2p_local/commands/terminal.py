"""Text from the user's data, made safe to print on a terminal: a commit subject or a title holding escape
sequences would otherwise recolour, retitle or rewrite the user's terminal when `profile show` prints it."""

from __future__ import annotations

import re
import unicodedata

# CSI (ESC [ ... final byte), OSC (ESC ] ... BEL or ESC \), and any other two-byte ESC sequence.
# Each class excludes what ends it, so the pattern never backtracks (linear time).
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]?|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b.?|\x9b[0-?]*[ -/]*[@-~]?")


def shown(text: str) -> str:
    """`text` without escape sequences and control characters (line breaks and tabs become spaces)."""
    text = _ESCAPES.sub("", text)
    return "".join(" " if c in "\n\t\r" else c for c in text
                   if c in "\n\t\r" or unicodedata.category(c) not in ("Cc", "Cf"))
