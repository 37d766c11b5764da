"""Your own commits of a local git repository as commit-subject items (`p2p profile import NAME --git PATH`).

Read with `git log` on the machine (no network, no hooks, no pager): the author's non-merge commits,
each turned into an item by `p2p_local.data.records.commit_item`, the rule the training data's converter
uses (changed files + body -> subject line). Before that, the body loses what the training data never
had: trailers that name people (`Signed-off-by:`, `Co-authored-by:`, any `...-by:`, `Cc:`, `Change-Id:`)
and e-mail addresses (written `<email>`, as in ../shared/data/commits).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from p2p_local.data.records import commit_item, parse_time
from p2p_local.diffs import DIFF_ARGS, LINE_CHARS, MAX_PATCH_CHARS, compact_diff
from p2p_local.errors import DataError, UsageError
from p2p_local.store import NewItem

COMMIT_TASK = "commit-subject"  # the commit-subject task card (see data/cards)
MAX_COMMITS = 1_000_000
PROGRESS_EVERY = 2_000  # commits between progress reports
GIT_TIMEOUT_S = 600.0

# Fields are NUL-separated (`-z`); a record starts with a random marker of this run, which no path or
# message can contain by design (git forbids NUL in both; the marker is unguessable), so a file name
# holding git's separators, newlines or anything else cannot start an item of its own.
# %B, not %s: %s joins a multi-line first paragraph into one line, while the subject is the first line
# (`records.commit_item` keeps it, as the training converter does with the raw message).
_FIELDS = "%H%x00%P%x00%aN%x00%aE%x00%at%x00%B%x00%b%x00"
_N_FIELDS = 7
# Size budgets (characters) before any text handling: what an item keeps is far shorter (data/records.py),
# and a 1 GB commit message must neither be held whole nor scanned.
MAX_SUBJECT_SCAN = 1_000
MAX_BODY_SCAN = 4_000
MAX_NAME_CHARS = 1_000
MAX_PATH_BYTES = 4_096  # PATH_MAX
MAX_FILES_KEPT = 10_000  # file names kept per commit (the item shows 4)
MAX_TOKEN_BYTES = 64 << 10  # bytes of one field kept from git's output; the rest is skipped unread
# Trailers that name people or review tooling: whole lines, dropped from the body (see `_is_trailer`).
_TRAILER_KEYS = {"cc", "change-id", "reviewed-on"}
_TOKEN = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:-[A-Za-z0-9]+)*")  # unambiguous: linear
# Possessive runs after a lookbehind: a match can only start where a run starts and never backtracks
# into one, so one very long word costs linear time (the plain pattern was quadratic: 11 s at 100 kB).
EMAIL = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]++@[A-Za-z0-9-]++(?:\.[A-Za-z0-9-]++)+")
_RELATIVE = re.compile(r"^\d+\s+(?:second|minute|hour|day|week|month|year)s?\s+ago$", re.IGNORECASE)


def scrub(text: str) -> str:
    """Trailers out, e-mail addresses replaced by `<email>` (the training data's treatment). Linear time."""
    kept = ["" if _is_trailer(line) else line for line in text.split("\n")]
    return EMAIL.sub("<email>", "\n".join(kept))


def _is_trailer(line: str) -> bool:
    """`Signed-off-by: ...`, any `Xxx-by:`, `Cc:`, `Change-Id:`, `Reviewed-on:` (any case, indented or not)."""
    key, colon, _ = line.partition(":")
    if not colon:
        return False
    key = key.strip(" \t").lower()
    return key in _TRAILER_KEYS or (key.endswith("-by") and _TOKEN.fullmatch(key) is not None)


def budget(text: str, max_chars: int) -> str:
    """At most `max_chars` of `text`, cut before the last partial word (an address cut in half would
    escape the scrub)."""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = max(cut.rfind(" "), cut.rfind("\n"), cut.rfind("\t"))
    return cut[:space] if space > 0 else ""


def git_items(repo: str | Path, authors: Sequence[str] = (), since: str | None = None, *,
              progress: Callable[[int], None] | None = None) -> tuple[list[NewItem], Counter, list[str]]:
    """The commits of `authors` (names or e-mails; default: the repository's `user.email`) in `repo`,
    oldest first, as items of the commit-subject task. Returns (items, counts, authors used).
    `progress(n)`: called every PROGRESS_EVERY commits read, and with -n once at the end of a long read."""
    repo = _repo_root(Path(repo))
    who = [a.strip() for a in authors if a and a.strip()] or [_config_email(repo)]
    wanted = {a.casefold() for a in who}
    marker = "p2p-" + secrets.token_hex(16)
    args = ["log", "--no-color", "--no-ext-diff", "--no-textconv", "--no-renames", "--encoding=UTF-8", "--name-only", "-z",
            f"--format={marker}%x00{_FIELDS}"]
    if since:
        args.append(f"--since={_since(since)}")
    stats: Counter = Counter()
    items: list[NewItem] = []
    for rec in _records(repo, args, marker.encode()):
        stats["commits_read"] += 1
        if progress and stats["commits_read"] % PROGRESS_EVERY == 0:
            progress(stats["commits_read"])
        parsed = _commit(rec)
        if parsed is None:
            stats["commits_unreadable"] += 1
            continue
        sha, parents, name, email, when, subject, body, files = parsed
        if len(parents.split()) > 1:
            stats["merges_skipped"] += 1
            continue
        if name.casefold() not in wanted and email.casefold() not in wanted:
            stats["other_authors_skipped"] += 1
            continue
        made = commit_item(scrub(budget(subject, MAX_SUBJECT_SCAN)), scrub(budget(body, MAX_BODY_SCAN)), files,
                           sha, stats)
        if made is None:
            stats["empty_subject_skipped"] += 1
            continue
        inp, out, meta = made
        meta["sha"] = sha  # until its diff is read (below)
        items.append(NewItem(inp, out, float(when) if when.isdigit() and len(when) < 16 else None, meta,
                             COMMIT_TASK, where=f"{repo} commit {sha[:12]}"))
        if len(items) > MAX_COMMITS:
            raise DataError(f"{repo}: more than {MAX_COMMITS:,} commits", hint="narrow it with --since")
    if progress and stats["commits_read"] >= PROGRESS_EVERY:
        progress(-stats["commits_read"])  # negative: the last report
    diffs = commit_diffs(repo, [it.meta["sha"] for it in items])  # the change itself: what the query reads
    for it in items:
        sha = it.meta.pop("sha")
        if diffs.get(sha):
            it.meta["diff"] = diffs[sha]
    items.reverse()  # git lists newest first
    items.sort(key=lambda it: (it.time is not None, it.time or 0.0))  # stable: equal times keep git's order
    return items, stats, who


_HEX = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?")  # sha1 or sha256


def _commit(rec: list[bytes]) -> tuple[str, str, str, str, str, str, str, list[str]] | None:
    """One record's fields (sha, parents, name, e-mail, time, subject, body, files), or None when it
    does not have git's shape. After the fields comes git's empty terminator, then the file names (the
    first after a newline), each a whole NUL-terminated field: no byte inside a name can split one."""
    if len(rec) < _N_FIELDS or (len(rec) > _N_FIELDS and rec[_N_FIELDS] != b""):
        return None
    sha, parents, name, email, when, subject, body = (f.decode("utf-8", errors="replace") for f in rec[:_N_FIELDS])
    if not _HEX.fullmatch(sha) or not all(_HEX.fullmatch(p) for p in parents.split()):
        return None
    raw = rec[_N_FIELDS + 1:]
    if raw and raw[0].startswith(b"\n"):
        raw[0] = raw[0][1:]  # git's blank line between the message and the names
    files = [f.decode("utf-8", errors="replace") for f in raw[:MAX_FILES_KEPT] if f and len(f) <= MAX_PATH_BYTES]
    return sha, parents, name[:MAX_NAME_CHARS], email[:MAX_NAME_CHARS], when.strip(), subject, body, files


def _records(repo: Path, args: list[str], marker: bytes) -> Iterator[list[bytes]]:
    """`git log` output, one commit record (its NUL-separated fields) at a time, streamed: a large history
    is never held whole, and a field longer than MAX_TOKEN_BYTES keeps only its start."""
    proc = subprocess.Popen(git_command(repo, args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=git_env())
    rec: list[bytes] | None = None
    tail = b""
    skipping = False  # inside an over-long field: its bytes are dropped up to the next NUL
    assert proc.stdout is not None
    try:
        while chunk := proc.stdout.read(1 << 16):
            if skipping:
                end = chunk.find(b"\0")
                if end < 0:
                    continue
                chunk, skipping = chunk[end:], False
            *done, tail = (tail + chunk).split(b"\0")
            if len(tail) > MAX_TOKEN_BYTES:
                tail, skipping = tail[:MAX_TOKEN_BYTES], True
            for field in done:
                if field == marker:
                    if rec is not None:
                        yield rec
                    rec = []
                elif rec is not None:
                    rec.append(field)
        err = proc.stderr.read().decode("utf-8", errors="replace") if proc.stderr else ""
        rc = proc.wait(timeout=GIT_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if rc != 0:
        if "does not have any commits" in err:
            return  # an empty repository: nothing to import
        raise DataError(f"{repo}: git log failed: {first_line(err)}", hint="check the path is a git repository")
    if rec is not None:
        rec.append(tail)
        yield rec


def _repo_root(path: Path) -> Path:
    if shutil.which("git") is None:
        raise DataError("git is not installed", hint="install git, or export your commits to a JSONL file")
    if not path.exists():
        raise DataError(f"{path}: no such folder", hint="pass the folder of a local git repository")
    if not path.is_dir():
        raise DataError(f"{path} is not a folder", hint="pass the folder of a local git repository")
    r = subprocess.run(git_command(path, ["rev-parse", "--show-toplevel"]), capture_output=True, text=True, env=git_env())
    if r.returncode != 0:
        raise DataError(f"{path} is not a git repository ({first_line(r.stderr)})",
                        hint="pass the folder of a local git repository (one with a .git inside)")
    return Path(r.stdout.strip() or path)


def _config_email(repo: Path) -> str:
    r = subprocess.run(git_command(repo, ["config", "user.email"]), capture_output=True, text=True, env=git_env())
    email = r.stdout.strip()
    if r.returncode != 0 or not email:
        raise UsageError(f"whose commits? {repo} has no user.email configured",
                         hint="pass --author EMAIL (or --author 'Your Name'; repeat it for several)")
    return email


def _since(value: str) -> str:
    """ISO 8601 dates and '3 months ago' pass; anything else is refused (git would read garbage as 'now')."""

    v = value.strip()
    if _RELATIVE.match(v):
        return v
    try:
        t = parse_time(v)
    except ValueError:
        t = None
    if t is None:
        raise UsageError(f"--since {value!r} is not a date", hint="e.g. --since 2024-01-01 or --since '6 months ago'")
    return f"@{int(t)}"


def git_command(repo: Path, args: list[str]) -> list[str]:
    """`git ARGS` run in `repo`, as every git call of the app runs it (the hook's too)."""
    # No pager, no optional locks (a read must not touch the index), no system/user config side effects.
    return ["git", "--no-pager", "-c", "core.quotepath=off", "-C", str(repo), *args]


def git_env() -> dict[str, str]:
    """The environment of every git call: no locks taken by a read, no prompts, no pager, C messages."""
    env = dict(os.environ)
    env.update({"GIT_OPTIONAL_LOCKS": "0", "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C", "GIT_PAGER": "cat"})
    return env


def first_line(text: str) -> str:
    """The first non-blank line of git's stderr, for an error message."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[0] if lines else "no message"


# --- the change: diffs of imported commits, the staged change ------------------------------------
def commit_diffs(repo: str | Path, shas: Sequence[str]) -> dict[str, str]:
    """Each commit's compact diff (`diffs.compact_diff`, against its first parent), read in one streamed
    `git log --no-walk --stdin -p` over just these commits."""
    if not shas:
        return {}
    marker = "p2p-" + secrets.token_hex(16)  # no diff line can start with it: each starts with + - @ or a git word
    args = ["log", "--no-walk=unsorted", "--stdin", "-p", *DIFF_ARGS, f"--format={marker}%H"]
    proc = subprocess.Popen(git_command(Path(repo), args), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=git_env())
    out: dict[str, str] = {}
    assert proc.stdin is not None and proc.stdout is not None
    feeder = threading.Thread(target=_feed, args=(proc.stdin, shas), daemon=True)
    feeder.start()
    sha, lines, size = None, [], 0
    try:
        for raw in proc.stdout:
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            if line.startswith(marker):
                if sha is not None:
                    out[sha] = compact_diff("\n".join(lines)).text
                sha, lines, size = line[len(marker):].strip(), [], 0
            elif size < MAX_PATCH_CHARS:  # the rest of a huge patch is read past, not kept
                lines.append(line[:LINE_CHARS + 1])
                size += len(lines[-1]) + 1
        if sha is not None:
            out[sha] = compact_diff("\n".join(lines)).text
        proc.wait(timeout=GIT_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return out


def _feed(stdin: Any, shas: Sequence[str]) -> None:
    try:
        for sha in shas:
            stdin.write(sha.encode() + b"\n")
        stdin.close()
    except (BrokenPipeError, OSError):  # git stopped early: its exit status says why
        pass


def files_shown(commit_input: str) -> tuple[int, int]:
    """(files named, files changed) of a commit item's input ("files: a, b (+3 more)")."""
    head = commit_input.split("\n", 1)[0]
    if not head.startswith("files: ") or head == "files: none":
        return 0, 0
    names, more = head[len("files: "):], 0
    m = _MORE.search(names)
    if m:
        names, more = names[:m.start()], int(m.group(1))
    named = names.count(", ") + 1
    return named, named + more


_MORE = re.compile(r" \(\+(\d+) more\)$")


def commit_query(files: Sequence[str], body: str = "") -> str:
    """What the commit-subject task reads for a commit being written: its files (and a body, if any), in
    exactly the training items' format (`commit_item`)."""
    made = commit_item("-", scrub(body), list(files))
    assert made is not None
    return made[0]


def staged_diff(repo: str | Path = ".") -> str:
    """The change `git commit` would record now, as git shows it by the compact rule's options (honours
    GIT_INDEX_FILE, as git sets it for hooks). At most MAX_PATCH_CHARS are read."""
    r = subprocess.run(git_command(Path(repo), ["diff", "--cached", *DIFF_ARGS]), capture_output=True,
                       env=git_env(), timeout=60)
    if r.returncode != 0:
        raise DataError(f"{repo}: git diff --cached failed: {first_line(r.stderr.decode(errors='replace'))}")
    return r.stdout[:MAX_PATCH_CHARS].decode("utf-8", errors="replace")
