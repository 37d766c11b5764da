"""Raw data in ../shared/data -> the generic per-user format (`format.py`). Deterministic.

Every converter returns `Converted(users, stats)`. Bad input never crashes a conversion: malformed
rows, missing user ids, bad ratings, non-UTF-8 bytes, duplicates and too-short histories are skipped
(or repaired) and counted in `stats`. Only an unusable file (missing, or lacking a required column)
raises `DataError`. Decisions (truncation, ordering, filtering) are documented in docs/DATA.md.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from p2p_local.data.format import Item, User, canonical_task, time_ordered
from p2p_local.data.records import (
    MAX_COMMENT_CHARS,
    MAX_EMAIL_CHARS,
    clean_text,
    commit_item,
    movie_genres,
    movie_item,
    truncate,
)
from p2p_local.diffs import compact_diff
from p2p_local.errors import DataError
from p2p_local.paths import shared_data_dir

MIN_USER_ITEMS = 2  # one item gives no (history, query) sample
MIN_COMMITS = 8  # commit authors with fewer commits are dropped (too little to personalize on)


@dataclass
class Converted:
    users: list[User]
    stats: Counter = field(default_factory=Counter)


# ---------------------------------------------------------------- shared helpers


def _read_text(path: Path, stats: Counter) -> str:
    """File -> str. Invalid UTF-8 bytes become U+FFFD and the affected lines are counted."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}", hint="the real data must sit at ../shared/data")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        bad = 0
        for line in raw.split(b"\n"):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                bad += 1
        stats["lines_non_utf8"] += bad
        return raw.decode("utf-8-sig", errors="replace")


def _csv_rows(path: Path, required: tuple[str, ...], stats: Counter) -> Iterator[tuple[int, dict[str, str]]]:
    """(row number, row) for well-formed rows; rows with the wrong field count are counted and skipped."""
    text = _read_text(path, stats).replace("\x00", "")  # NUL bytes make the csv module raise
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader)]
    except (StopIteration, csv.Error):
        raise DataError(f"{path}: empty or unreadable CSV header") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {missing}; found {header}",
            hint="the converter expects the file exactly as it is in ../shared/data",
        )
    rowno = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error:
            stats["rows_skipped_malformed"] += 1
            continue
        rowno += 1
        stats["rows_read"] += 1
        if not row or all(not c.strip() for c in row):
            stats["rows_skipped_blank"] += 1
            continue
        if len(row) != len(header):
            stats["rows_skipped_malformed"] += 1
            continue
        yield rowno, dict(zip(header, row, strict=True))


def _user_id(raw: str) -> str:
    """'12', '12.0' -> '12' (pandas wrote some ids as floats); '' stays ''."""
    s = raw.strip()
    return s[:-2] if re.fullmatch(r"\d+\.0", s) else s


def _to_rating(raw: str, lo: int = 1, hi: int = 5) -> int | None:
    """A 1..5 rating; half stars round up (0.5 -> 1, 3.5 -> 4). None if unparseable or out of range."""
    try:
        x = float(raw)
    except ValueError:
        return None
    if not math.isfinite(x) or x <= lo - 1 or x > hi:
        return None
    return min(hi, max(lo, math.ceil(x)))


def _finish(by_user: dict[str, list[Item]], stats: Counter, min_items: int = MIN_USER_ITEMS) -> list[User]:
    """Order each user's items in time, count ties, drop too-short histories, order users by id."""
    users = []
    for uid, items in by_user.items():
        items = time_ordered(items)
        times = [it.time for it in items if it.time is not None]
        stats["items_duplicate_time"] += sum(1 for a, b in zip(times, times[1:], strict=False) if a == b)
        if not items:
            stats["users_dropped_empty"] += 1
        elif len(items) == 1 and min_items > 1:
            stats["users_dropped_one_item"] += 1
        elif len(items) < min_items:
            stats["users_dropped_few_items"] += 1
        else:
            users.append(User(uid, items))
    users.sort(key=lambda u: (0, int(u.user_id), "") if u.user_id.isdigit() else (1, 0, u.user_id))
    stats["users"] = len(users)
    stats["items"] = sum(len(u.items) for u in users)
    return users


# A CSV row's reading: why it is skipped (the counter `rows_skipped_<why>`), or (its item key, its Item's builder).
RowRead = Callable[[dict[str, str]], str | tuple[str, Callable[[], Item]]]


def _convert_csv(path: Path, required: tuple[str, ...], stats: Counter, read: RowRead, user_col: str = "user_id",
                 optional: tuple[str, ...] = ()) -> Converted:
    """The CSV converters' one row loop: each well-formed row's user id (missing: counted), then `read(row)`;
    a repeated (user, key) pair keeps the first. A builder runs only for a kept row, so what it counts
    (`texts_truncated`) counts kept items. An `optional` column the file lacks is counted once
    (`column_missing_<col>`)."""
    by_user: dict[str, list[Item]] = {}
    seen: set[tuple[str, str]] = set()
    first = True
    for _, row in _csv_rows(path, required, stats):
        if first:
            first = False
            for col in optional:
                if col not in row:
                    stats[f"column_missing_{col}"] = 1
        uid = _user_id(row[user_col])
        if not uid:
            stats["rows_skipped_missing_user"] += 1
            continue
        got = read(row)
        if isinstance(got, str):
            stats[f"rows_skipped_{got}"] += 1
            continue
        key, build = got
        if (uid, key) in seen:
            stats["rows_skipped_duplicate"] += 1
            continue
        seen.add((uid, key))
        by_user.setdefault(uid, []).append(build())
    return Converted(_finish(by_user, stats), stats)


# ---------------------------------------------------------------- MovieLens


def convert_movielens(src: Path) -> Converted:
    """Ratings -> rating task. Input "Title (Year) | Genres: A|B", output "1".."5", time = timestamp."""
    stats: Counter = Counter()
    d = src / "movielens-latest-small"
    movies: dict[str, tuple[str, list[str]]] = {}
    for _, row in _csv_rows(d / "movies.csv", ("movieId", "title", "genres"), Counter()):
        movies[row["movieId"].strip()] = (row["title"], movie_genres(row["genres"]))

    def read(row: dict[str, str]) -> str | tuple[str, Callable[[], Item]]:
        rating = _to_rating(row["rating"])
        if rating is None:
            return "bad_rating"
        mid = row["movieId"].strip()
        if mid not in movies:
            return "unknown_movie"
        t = None
        if "timestamp" in row:  # without the column, items keep file order
            try:
                t = float(row["timestamp"])
            except ValueError:
                return "bad_time"

        def build() -> Item:
            text, meta = movie_item(*movies[mid], mid)  # the importer's rule too (p2p_local.data.records)
            return Item(text, str(rating), t, meta)

        return mid, build

    return _convert_csv(d / "ratings.csv", ("userId", "movieId", "rating"), stats, read, user_col="userId",
                        optional=("timestamp",))


# ---------------------------------------------------------------- POPQUORN


def _instance_meta(iid: str) -> dict[str, int | str]:
    return {"item_id": int(iid) if iid.isdigit() else iid}


def convert_offensiveness(src: Path) -> Converted:
    """Annotator's 1-5 offensiveness score of a Reddit comment. No timestamps: items keep file order."""
    stats: Counter = Counter()

    def read(row: dict[str, str]) -> str | tuple[str, Callable[[], Item]]:
        score = _to_rating(row["offensiveness"])
        if score is None:
            return "bad_rating"
        text = clean_text(row["text"])
        if not text:
            return "empty_text"
        iid = row["instance_id"].strip()
        return iid, lambda: Item(truncate(text, MAX_COMMENT_CHARS, stats), str(score), None, _instance_meta(iid))

    path = src / "popquorn" / "offensiveness.csv"
    return _convert_csv(path, ("instance_id", "user_id", "text", "offensiveness"), stats, read)


def convert_email_rewrite(src: Path) -> Converted:
    """Original (informal) email -> the annotator's revised email. No timestamps: file order."""
    stats: Counter = Counter()

    def read(row: dict[str, str]) -> str | tuple[str, Callable[[], Item]]:
        original, revised = clean_text(row["original email"]), clean_text(row["revised email"])
        if not original or not revised:
            return "empty_text"
        iid = row["instance_id"].strip()
        return iid, lambda: Item(truncate(original, MAX_EMAIL_CHARS, stats), truncate(revised, MAX_EMAIL_CHARS, stats),
                                 None, _instance_meta(iid))

    path = src / "popquorn" / "email_rewriting.csv"
    return _convert_csv(path, ("instance_id", "user_id", "original email", "revised email"), stats, read)


# ---------------------------------------------------------------- commits


COMMIT_FILES = "commits/*.jsonl"  # every repository of ../shared/data/commits (one author id per person across them)


def convert_commits(src: Path) -> Converted:
    """Commits of every repository: output = subject line, input = changed files + body, meta["repo"] =
    the repository. One user per author id across repositories (their items in time order); authors with
    fewer than MIN_COMMITS commits in all are dropped."""
    stats: Counter = Counter()
    paths = sorted(src.glob(COMMIT_FILES))
    if not paths:
        raise DataError(f"no commit files at {src / COMMIT_FILES}", hint="the real data must sit at ../shared/data")
    by_user: dict[str, list[Item]] = {}
    seen: set[tuple[str, str]] = set()
    for path in paths:
        diffs = _commit_diffs(path.parent / COMMIT_DIFFS / f"{path.stem}.jsonl.gz", stats)
        for line in _read_text(path, stats).splitlines():
            rec = _commit_record(line, stats)
            if rec is None:
                continue
            uid, t, subject, body, files, sha, repo = rec
            repo = repo or path.stem
            if sha and (repo, sha) in seen:
                stats["rows_skipped_duplicate"] += 1
                continue
            seen.add((repo, sha))
            made = commit_item(subject, body, files, sha, stats)  # the git importer's rule too
            if made is None:
                stats["rows_skipped_empty_text"] += 1
                continue
            if not body.strip():
                stats["commits_empty_body"] += 1
            inp, out, meta = made
            stats[f"repo_commits:{repo}"] += 1
            diff = diffs.get((repo, sha))
            if diff:
                meta["diff"] = compact_diff(diff).text  # the app's rule (lock/vendored files last), idempotent
            else:
                stats["commits_without_diff"] += 1
            by_user.setdefault(uid, []).append(Item(inp, out, t, {**meta, "repo": repo}))
    few = [u for u, items in by_user.items() if MIN_USER_ITEMS <= len(items) < MIN_COMMITS]
    stats["users_dropped_few_commits"] = len(few)
    for u in few:
        del by_user[u]
    return Converted(_finish(by_user, stats), stats)


COMMIT_DIFFS = "diffs"  # commits/diffs/<name>.jsonl.gz: each commit's compact diff (the rule of p2p_local.diffs)


def _commit_diffs(path: Path, stats: Counter) -> dict[tuple[str, str], str]:
    """(repo, commit) -> the stored compact diff; empty (counted) when the repository has no diff file."""
    if not path.is_file():
        stats["repos_without_diff_file"] += 1
        return {}
    out: dict[tuple[str, str], str] = {}
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                stats["diff_rows_malformed"] += 1
                continue
            if isinstance(rec, dict) and isinstance(rec.get("diff"), str):
                out[(str(rec.get("repo")), str(rec.get("commit")))] = rec["diff"]
    return out


def _commit_record(line: str, stats: Counter) -> tuple[str, float, str, str, list, str, str] | None:
    """One JSONL line -> (author, time, subject, body, files, sha, repo), or None (counted) when unusable."""
    if not line.strip():
        return None
    stats["rows_read"] += 1
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        stats["rows_skipped_malformed"] += 1
        return None
    if not isinstance(rec, dict):
        stats["rows_skipped_malformed"] += 1
        return None
    uid, subject, date = rec.get("author_id"), rec.get("subject"), rec.get("date")
    body, files = rec.get("body") or "", rec.get("files") or []
    if not isinstance(uid, str) or not uid.strip():
        stats["rows_skipped_missing_user"] += 1
        return None
    if not isinstance(subject, str) or not isinstance(body, str) or not isinstance(files, list):
        stats["rows_skipped_malformed"] += 1
        return None
    try:
        t = datetime.fromisoformat(str(date)).timestamp()
    except ValueError:
        stats["rows_skipped_bad_time"] += 1
        return None
    repo = rec.get("repo")
    return uid.strip(), t, subject, body, files, str(rec.get("commit") or ""), repo if isinstance(repo, str) else ""


CONVERTERS: dict[str, Callable[[Path], Converted]] = {
    "movielens-rating": convert_movielens,
    "popquorn-offensiveness": convert_offensiveness,
    "popquorn-email-rewrite": convert_email_rewrite,
    "commit-subject": convert_commits,
}


def convert(task: str, src: Path | None = None) -> Converted:
    """Run the converter of a built-in task over the shared data (or `src`)."""
    task = canonical_task(task)
    if task not in CONVERTERS:
        raise DataError(f"no converter for task {task!r}", hint=f"known: {', '.join(CONVERTERS)}")
    return CONVERTERS[task](Path(src) if src is not None else shared_data_dir())
