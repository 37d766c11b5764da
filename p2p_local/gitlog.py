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
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from p2p_local.data.records import commit_item, parse_time
from p2p_local.errors import DataError, UsageError
from p2p_local.store import NewItem

COMMIT_TASK = "commit-subject"  # the commit-subject task card (see data/cards)
MAX_COMMITS = 1_000_000
PROGRESS_EVERY = 2_000  # commits between progress reports
GIT_TIMEOUT_S = 600.0

_SEP = "\x1e"  # record separator before each commit; fields are NUL-separated (`-z`)
# %B, not %s: %s joins a multi-line first paragraph into one line, while the subject is the first line
# (`records.commit_item` keeps it, as the training converter does with the raw message).
_FORMAT = _SEP + "%H%x00%P%x00%aN%x00%aE%x00%at%x00%B%x00%b%x00"
_N_FIELDS = 7
# Trailers that name people or review tooling: whole lines, dropped from the body.
TRAILER = re.compile(r"^[ \t]*(?:[A-Za-z][A-Za-z0-9]*(?:-[A-Za-z0-9]+)*-by|Cc|Change-Id|Reviewed-on)[ \t]*:.*$",
                     re.IGNORECASE | re.MULTILINE)
EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
_RELATIVE = re.compile(r"^\d+\s+(?:second|minute|hour|day|week|month|year)s?\s+ago$", re.IGNORECASE)


def scrub(text: str) -> str:
    """Trailers out, e-mail addresses replaced by `<email>` (the training data's treatment)."""
    return EMAIL.sub("<email>", TRAILER.sub("", text))


def git_items(repo: str | Path, authors: Sequence[str] = (), since: str | None = None, *,
              progress: Callable[[int], None] | None = None) -> tuple[list[NewItem], Counter, list[str]]:
    """The commits of `authors` (names or e-mails; default: the repository's `user.email`) in `repo`,
    oldest first, as items of the commit-subject task. Returns (items, counts, authors used).
    `progress(n)`: called every PROGRESS_EVERY commits read, and with -n once at the end of a long read."""
    repo = _repo_root(Path(repo))
    who = [a.strip() for a in authors if a and a.strip()] or [_config_email(repo)]
    wanted = {a.casefold() for a in who}
    args = ["log", "--no-color", "--no-ext-diff", "--no-textconv", "--encoding=UTF-8", "--name-only", "-z",
            f"--format={_FORMAT}"]
    if since:
        args.append(f"--since={_since(since)}")
    stats: Counter = Counter()
    items: list[NewItem] = []
    for rec in _records(repo, args):
        stats["commits_read"] += 1
        if progress and stats["commits_read"] % PROGRESS_EVERY == 0:
            progress(stats["commits_read"])
        parts = rec.split("\0")
        if len(parts) < _N_FIELDS:
            stats["commits_unreadable"] += 1
            continue
        sha, parents, name, email, when, subject, body = parts[:_N_FIELDS]
        if len(parents.split()) > 1:
            stats["merges_skipped"] += 1
            continue
        if name.casefold() not in wanted and email.casefold() not in wanted:
            stats["other_authors_skipped"] += 1
            continue
        files = [f.strip("\n") for f in parts[_N_FIELDS:] if f.strip("\n")]
        made = commit_item(scrub(subject), scrub(body), files, sha, stats)
        if made is None:
            stats["empty_subject_skipped"] += 1
            continue
        inp, out, meta = made
        items.append(NewItem(inp, out, float(when) if when.strip().isdigit() else None, meta, COMMIT_TASK,
                             where=f"{repo} commit {sha[:12]}"))
        if len(items) > MAX_COMMITS:
            raise DataError(f"{repo}: more than {MAX_COMMITS:,} commits", hint="narrow it with --since")
    if progress and stats["commits_read"] >= PROGRESS_EVERY:
        progress(-stats["commits_read"])  # negative: the last report
    items.reverse()  # git lists newest first
    items.sort(key=lambda it: (it.time is not None, it.time or 0.0))  # stable: equal times keep git's order
    return items, stats, who


def _records(repo: Path, args: list[str]):
    """`git log` output, one commit record at a time (streamed: a large history is never held as text twice)."""
    proc = subprocess.Popen(git_command(repo, args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=git_env())
    buf = ""
    assert proc.stdout is not None
    try:
        while chunk := proc.stdout.read(1 << 16):
            buf += chunk.decode("utf-8", errors="replace")
            *done, buf = buf.split(_SEP)
            for rec in done:
                if rec:
                    yield rec
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
    if buf:
        yield buf


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


# --- the query of a commit not written yet -------------------------------------------------------
_DIFF_FILE = re.compile(r"^diff --git a/(.*) b/(.*)$")


def looks_like_diff(text: str) -> bool:
    return text.lstrip().startswith("diff --git ")


def diff_files(diff: str) -> list[str]:
    """The changed files of a unified `git diff` (new names; a deleted file by its old name), in git's order."""
    files: list[str] = []
    for line in diff.splitlines():
        m = _DIFF_FILE.match(line)
        if m:
            files.append(m.group(2))
    return list(dict.fromkeys(files))


def commit_query(files: Sequence[str], body: str = "") -> str:
    """What the commit-subject task reads for a commit being written: its files (and a body, if any), in
    exactly the training items' format (`commit_item`)."""
    made = commit_item("-", scrub(body), list(files))
    assert made is not None
    return made[0]


def staged_files(repo: str | Path = ".") -> list[str]:
    """The files `git commit` would record now (honours GIT_INDEX_FILE, as git sets it for hooks)."""
    r = subprocess.run(git_command(Path(repo), ["diff", "--cached", "--name-only", "-z", "--no-ext-diff"]),
                       capture_output=True, env=git_env(), timeout=60)
    if r.returncode != 0:
        raise DataError(f"{repo}: git diff --cached failed: {first_line(r.stderr.decode(errors='replace'))}")
    return [f for f in r.stdout.decode("utf-8", errors="replace").split("\0") if f]
