"""Text from the user's data or the model, made safe to print on a terminal: one rule for every command and
the chat. An imported commit subject or title holding escape sequences, or a model answer repeating one, would
otherwise clear, recolour, retitle or rewrite the user's terminal; a right-to-left override would reorder what
the user reads; a CR or BS would overprint it.

- `shown(text)`: one line (line breaks and tabs become spaces) - table cells, titles, proposals.
- `printable(text)`: several lines kept (`\n`, `\t`) - an answer as it streams.
- `Printer`: `printable` over a stream, an escape sequence split across pieces held back until whole.
- `json_text(obj)`: JSON whose strings escape what `printable` drops (valid JSON, the same values).
"""

from __future__ import annotations

import json
import re
from typing import Any

# CSI (ESC [ ... final byte), OSC (ESC ] ... BEL or ESC \), and any other two-byte ESC sequence; C1's CSI.
# Each class excludes what ends it, so the pattern never backtracks (linear time).
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]?|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b.?|\x9b[0-?]*[ -/]*[@-~]?")
# What a terminal acts on or reorders by: C0 and C1 controls, DEL, the bidirectional controls (RLO...), the
# line and paragraph separators. Joiners (ZWJ in emoji) and the like stay: they change no other text.
# A whole sequence, from its ESC (or C1 CSI) on: what a stream may print past.
_WHOLE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[^\[\]]|\x9b[0-?]*[ -/]*[@-~]")
MAX_HELD = 256  # an unfinished sequence longer than this is no sequence a terminal waits for: let it go
_OTHER = "\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_DROP = re.compile(f"[\x00-\x1f{_OTHER}]")
_DROP_KEEP_LINES = re.compile(f"[\x00-\x08\x0b-\x1f{_OTHER}]")  # \t and \n stay


def printable(text: str) -> str:
    """`text` without escape sequences and unsafe controls; line breaks and tabs kept."""
    return _DROP_KEEP_LINES.sub("", _ESCAPES.sub("", text))


def shown(text: str) -> str:
    """`text` on one line: `printable`, its line breaks and tabs as spaces."""
    return _DROP.sub("", _ESCAPES.sub("", text).replace("\r\n", " ").translate(_SPACES))


_SPACES = str.maketrans({"\n": " ", "\t": " ", "\r": " "})


def json_text(obj: Any, **kw: Any) -> str:
    """`json.dumps(obj)` with the text readable (not \\u-escaped) except what a terminal would act on."""
    text = json.dumps(obj, ensure_ascii=False, **kw)
    # Outside strings JSON holds ASCII punctuation only, so every match lies in a string: escaping it there
    # keeps the document valid and its values equal.
    return _DROP.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


class Printer:
    """`printable` over a stream of pieces: an escape sequence cut between two pieces is held back until it is
    whole, so it is removed whole (not its ESC alone, leaving "[2J" in the text)."""

    def __init__(self) -> None:
        self.held = ""

    def feed(self, piece: str) -> str:
        text, self.held = self.held + piece, ""
        at = max(text.rfind("\x1b"), text.rfind("\x9b"))
        if at >= 0 and len(text) - at < MAX_HELD and not _WHOLE.match(text, at):
            text, self.held = text[:at], text[at:]
        return printable(text)

    def flush(self) -> str:
        text, self.held = self.held, ""
        return printable(text)
