"""The compact diff: what a change-reading task (commit subjects) reads of a change, by one rule for every entry point.

The importer (`p2p profile import --git`), a diff piped to `p2p ask -`, the hook's staged change, the
dataset converter (whose stored diffs were made by the same rule, ../shared/data/README.md) and so the
trainer all call `compact_diff`:

1. the patch is git's `diff -U0 --no-renames --no-color --no-ext-diff --no-textconv` (`DIFF_ARGS`; a past
   commit: against its first parent, a change being committed: the staged patch);
2. `index `, `--- ` and `+++ ` lines are dropped (the `diff --git a/X b/X` line names the file), and so
   are context lines (` ` first); (ours) a hunk header keeps its section heading, not its line numbers
   (`@@ -82 +82 @@ def f():` -> `@@ def f():`): numbers say nothing a subject line needs, and without them
   and the context a piped `git diff` (-U3) reads as its -U0 form, near enough;
3. each line is cut to LINE_CHARS characters;
4. (ours) the sections of lock, generated and vendored files go after the others, in git's order each;
5. lines are kept, in order, while the text stays within `max_chars` (STORED_CHARS is the data's rule).

Re-applied to a stored diff (the data's steps 1-3 and 5 at 2,000 characters), it gives the live rule's text
whenever the stored cut dropped no line the shorter headers now leave room for; `compact_diff` is idempotent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DIFF_ARGS = ("-U0", "--no-renames", "--no-color", "--no-ext-diff", "--no-textconv")
LINE_CHARS = 200
STORED_CHARS = 2_000  # what an item keeps (the data's rule); the prompt reads a card's `diff_chars` of it
MAX_PATCH_CHARS = 4 << 20  # a patch is read no further (a vendored tree must not cost the hook seconds)
_DROP = ("index ", "--- ", "+++ ", " ")
_SECTION = re.compile(r"^diff --git a/(.*) b/(.*)$")
_HUNK = re.compile(r"^@@ -\d+(?:,\d+)? \+\d+(?:,\d+)? @@ ?")
# Lock, generated and vendored files: what the change *did* is rarely in them, so they are read last.
_LAST = re.compile(
    r"(?:^|/)(?:[^/]*\.lock|package-lock\.json|npm-shrinkwrap\.json|pnpm-lock\.yaml|go\.sum|"
    r"[^/]*\.min\.(?:js|css)|[^/]*\.map|[^/]*_pb2(?:_grpc)?\.pyi?|[^/]*\.pb\.go|[^/]*\.generated\.[^/]+)$"
    r"|(?:^|/)(?:vendor|_vendor|vendored|third_party|node_modules|dist|build|generated)/"
)


@dataclass(frozen=True)
class Diff:
    """A compact diff: its text (within the budget it was cut to) and what the whole change held."""

    text: str
    chars_total: int  # characters of the whole compact patch, before the cut (step 5)
    files: tuple[str, ...] = ()  # the changed files, in git's order

    @property
    def cut(self) -> bool:
        return len(self.text) < self.chars_total


def is_last(path: str) -> bool:
    """A lock, generated or vendored file (its section is read after the others)."""
    return _LAST.search(path) is not None


def looks_like_diff(text: str) -> bool:
    return text.lstrip().startswith("diff --git ")


def compact_diff(patch: str, max_chars: int = STORED_CHARS) -> Diff:
    """The rule above applied to `patch` (a git diff, or an already compact one)."""
    sections: list[list[str]] = []
    files: list[str] = []
    for line in patch[:MAX_PATCH_CHARS].replace("\r\n", "\n").split("\n"):
        m = _SECTION.match(line)
        if m:
            sections.append([])
            files.append(m.group(2))
        elif not sections or not line or line.startswith(_DROP):
            continue
        elif line.startswith("@@"):
            line = _HUNK.sub("@@ ", line).rstrip()
        sections[-1].append(line[:LINE_CHARS])
    order = sorted(range(len(sections)), key=lambda i: is_last(files[i]))  # stable: git's order within each
    lines = [ln for i in order for ln in sections[i]]
    return Diff(keep_within(lines, max_chars), len("\n".join(lines)), tuple(dict.fromkeys(files)))


def keep_within(lines: list[str], max_chars: int) -> str:
    """Lines, in order, while their text ("\\n"-joined) stays within `max_chars` (step 5)."""
    n, kept = -1, []
    for line in lines:
        n += len(line) + 1
        if n > max_chars:
            break
        kept.append(line)
    return "\n".join(kept)


def shown(diff: str, max_chars: int) -> str:
    """The part of a stored compact diff a prompt reads: its lines within `max_chars`."""
    return keep_within(diff.split("\n"), max_chars) if diff and max_chars > 0 else ""
