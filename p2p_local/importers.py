"""Read a user's history from a file into profile items: generic JSONL / JSON / CSV, and MovieLens.

Formats (`fmt`):
- jsonl: one user per line `{"user_id", "task"?, "items": [{"input", "output", "time", "meta"}]}`
  (a line may also be a single item `{"input", "output", ...}`);
- json: one such user object, a list of them, or a list of items;
- csv: header with `input,output` and optionally `time`, `task`, `user_id`; other columns go to meta;
- movielens: `userId,movieId,rating,timestamp` plus `movies.csv` (beside it, or `movies=`): input
  "Title (Year) | Genres: A|B", output the rating rounded up to 1..5, task "movielens-rating".
A file with several users needs `user=`. Times are unix seconds or ISO 8601 text.

The whole file is parsed and checked before anything is written, and the write is one transaction:
a bad line or a killed process leaves the profile exactly as it was. Errors name file and line.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import json.decoder
import json.scanner
import math
import re
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2p_local.data.records import brief, movie_genres, movie_item, parse_time
from p2p_local.errors import DataError, UsageError
from p2p_local.paths import regular_file
from p2p_local.store import NewItem, Store

# Bounds on what a file may hold: past them a hostile or broken file gets a clear error, not a
# MemoryError, a RecursionError or a field that breaks every later screen.
MAX_FILE_BYTES = 256 << 20  # 256 MiB: ~2M MovieLens rows; a real history is far smaller
MAX_LINE_CHARS = 64 << 20  # one JSONL line: one user with all their items (100k ratings: ~12 MiB)
MAX_FIELD_CHARS = 100_000  # one input / output / meta value
MAX_DEPTH = 16  # nesting of JSON containers (meta values)
MAX_ITEMS = 1_000_000

FORMATS = ("auto", "jsonl", "json", "csv", "movielens", "letterboxd")
MOVIELENS_TASK = "movielens-rating"
MOVIELENS_COLUMNS = ("userId", "movieId", "rating")


@dataclass(frozen=True)
class ParsedImport:
    path: Path
    format: str
    user_id: str | None
    task: str | None  # the file's own task (top-level "task", or movielens-rating)
    items: list[NewItem]
    notes: tuple[str, ...] = ()  # what the summary should say (e.g. titles without genres)


@dataclass(frozen=True)
class ImportResult:
    profile: str
    path: str
    format: str
    user_id: str | None
    task: str | None
    imported: int
    parse_seconds: float
    write_seconds: float
    duplicates: int = 0  # items the profile already holds: not added again (imports are idempotent)
    dry_run: bool = False  # nothing was written; `imported` is what a real run would add
    samples: tuple[dict[str, Any], ...] = ()  # up to SAMPLES of the new items (input, output, time, task)
    notes: tuple[str, ...] = ()


def import_file(
    store: Store,
    profile: str,
    path: Path | str,
    fmt: str = "auto",
    *,
    user: str | None = None,
    movies: Path | str | None = None,
    task: str | None = None,
    dry_run: bool = False,
    progress: Callable[[str], None] | None = None,
    create: bool = False,
) -> ImportResult:
    """Parse `path` and add its items to `profile` in one transaction. `progress(stage)` hears of each
    stage of a large import (reading, checking and writing), so a long one is never silent.

    Task of each item: its own (CSV column / item "task" / meta "task"), else `task`, else the
    file's, else the profile's default. A profile without a default task takes the import's.
    Items the profile already holds are not added again; `dry_run` parses and counts, writes nothing.
    `create`: a missing profile is created with its items, in one transaction (all or nothing).
    """
    prof = _import_target(store, profile, dry_run or create)  # fail before parsing a big file
    t0 = time.perf_counter()
    if progress:
        progress(f"reading {Path(path).name}")
    parsed = read_import(path, fmt, user=user, movies=movies)
    if progress:
        progress(f"{len(parsed.items):,} items read; checking and {'counting' if dry_run else 'writing'} them")
    return add_parsed(store, prof, parsed, task=task, dry_run=dry_run, parse_seconds=time.perf_counter() - t0,
                      create=profile if create else None)


def import_git(store: Store, profile: str, repo: Path | str, *, authors: Iterable[str] = (), since: str | None = None,
               dry_run: bool = False, progress: Any = None, create: bool = False) -> ImportResult:
    """The author's own commits of a local git repository (`p2p_local.gitlog`), as `import_file` adds a file's items."""
    from p2p_local.gitlog import COMMIT_TASK, git_items

    prof = _import_target(store, profile, dry_run or create)
    t0 = time.perf_counter()
    items, stats, who = git_items(repo, list(authors), since, progress=progress)
    notes = [f"{stats['commits_read']:,} commits read, {len(items):,} by {' / '.join(who)}"]
    notes += [f"{stats[k]:,} {k.replace('_', ' ')}" for k in ("merges_skipped", "other_authors_skipped",
                                                                "empty_subject_skipped") if stats[k]]
    parsed = ParsedImport(Path(repo), "git", ", ".join(who), COMMIT_TASK, items, tuple(notes))
    return add_parsed(store, prof, parsed, dry_run=dry_run, parse_seconds=time.perf_counter() - t0,
                      create=profile if create else None)


SAMPLES = 3  # items a dry run shows


def _import_target(store: Store, profile: str, may_be_new: bool) -> Any:
    """The profile to import into; a dry run or `create` may name one that does not exist yet (None)."""
    if may_be_new and not store.profiles.profile_exists(profile):
        return None
    return store.profiles.get_profile(profile)


def add_parsed(store: Store, prof: Any, parsed: ParsedImport, *, task: str | None = None, dry_run: bool = False,
               parse_seconds: float = 0.0, create: str | None = None) -> ImportResult:
    """Add what a reader parsed to profile `prof` (None: a dry run into a profile not created yet, or the
    profile `create` names, made in the same transaction as its items). Imports into one profile are
    serialized (`Store.profile_lock`): the duplicate check and the write see one state."""
    default_task = task or parsed.task
    fallback = default_task or (prof.task if prof is not None else None)  # the task of an item naming none
    check_answers(parsed.items, fallback, store)
    t1 = time.perf_counter()
    if dry_run:
        new, dups = _new_items(store, prof, parsed.items, fallback)
        n = len(new)
    else:
        name = prof.name if prof is not None else create
        if name is None:
            raise ValueError("add_parsed: no profile to import into")
        with store.profile_lock(name), store.transaction():
            # As it is now, under the lock (another import may have made it since we looked).
            prof = store.profiles.get_profile(name) if store.profiles.profile_exists(name) else store.profiles.create_profile(name, task=task)
            fallback = default_task or prof.task
            new, dups = _new_items(store, prof, parsed.items, fallback)
            n = store.profiles.add_items(prof.name, new, task=default_task)
            if prof.task is None and default_task and n:
                store.profiles.set_profile_task(prof.name, default_task)
    samples = tuple({"input": it.input, "output": it.output, "time": it.time, "task": it.task or fallback}
                    for it in new[:SAMPLES])
    return ImportResult(prof.name if prof is not None else "", str(parsed.path), parsed.format, parsed.user_id,
                        fallback, n, round(parse_seconds, 4), round(time.perf_counter() - t1, 4),
                        duplicates=dups, dry_run=dry_run, samples=samples, notes=parsed.notes)


def _new_items(store: Store, prof: Any, items: list[NewItem], default_task: str | None) -> tuple[list[NewItem], int]:
    """Items the profile does not hold yet, by (task, input, output, time): importing a file twice adds nothing.
    A multiset: a file that holds an item twice adds it twice the first time, and never again."""
    if prof is None or not items:
        return list(items), 0
    held = Counter((i.task, i.input, i.output, i.time) for i in store.profiles.items(prof.name))
    new: list[NewItem] = []
    for it in items:
        key = (it.task or default_task, it.input, it.output, it.time)
        if held[key] > 0:
            held[key] -= 1
        else:
            new.append(it)
    return new, len(items) - len(new)


def read_import(
    path: Path | str, fmt: str = "auto", *, user: str | None = None, movies: Path | str | None = None
) -> ParsedImport:
    """Parse and validate a whole file (nothing is written)."""
    path = Path(path)
    if fmt not in FORMATS:
        raise DataError(f"unknown import format {fmt!r}", hint=f"one of {', '.join(FORMATS)}")
    text = _read_text(path)
    try:
        if fmt == "auto":
            fmt = detect_format(path, text)
        if fmt == "letterboxd":
            return _read_letterboxd(path, text, Path(movies) if movies else None)
        if fmt == "movielens":
            return _read_movielens(path, text, user, Path(movies) if movies else path.parent / "movies.csv")
        return {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv}[fmt](path, text, user)
    except csv.Error as e:  # MovieLens files and format detection read CSV too
        raise DataError(f"{path}: unreadable CSV ({e})", hint="check the file is the CSV it claims to be") from None


def check_answers(items: Iterable[NewItem], default_task: str | None, store: Any = None) -> None:
    """Refuse, at import as at `profile add`, answers outside a rating/label task's labels (the task's card
    found as every command finds it: `answer_labels`)."""
    allowed: dict[str | None, list[str] | None] = {}
    for n, it in enumerate(items, 1):
        task = it.task or default_task
        if task not in allowed:
            allowed[task] = answer_labels(task, store)
        labels = allowed[task]
        if labels is not None and it.output.strip() not in labels:
            raise DataError(f"{it.where or f'item {n}'}: {task} answers are one of {', '.join(labels)}, "
                            f"got {brief(it.output)}", hint=f"e.g. {labels[-1]}")


def check_label(task: str | None, output: str, store: Any = None) -> None:
    """One answer, as `check_answers` checks each imported one (for `profile add` / `edit`)."""
    labels = answer_labels(task, store)
    if labels is not None and output.strip() not in labels:
        raise DataError(f"{task} answers are one of {', '.join(labels)}, got {brief(output)}",
                        hint=f"e.g. --output {labels[-1]}")


def answer_labels(task: str | None, store: Any = None) -> list[str] | None:
    """The answers a rating/label task card allows (e.g. "1".."5"); None for free text or an unknown task.
    The card: the store's resolver (`store.task_cards.task_card`: built-in, else the user's own); without a store
    (a dry run before there is one) the built-in cards only.
    Why: the profile builder skips any other output, and a value out of range poisons features."""
    from p2p_local.data.format import builtin_card, builtin_cards  # late: cards are read on use

    if task is None:
        return None
    if hasattr(store, "task_cards"):
        try:
            card = store.task_cards.task_card(task)
        except UsageError:  # a task no card describes: its answers are free text
            return None
    elif task in builtin_cards():
        card = builtin_card(task)
    else:
        return None
    return None if card.kind == "generation" else list(card.labels)


def detect_format(path: Path, text: str | None = None) -> str:
    """By extension, and for .csv by header (MovieLens ratings vs generic input,output)."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        return "json"
    if suffix in (".csv", ".txt") or text is not None:
        text = _read_text(path) if text is None else text
        header = [h.strip() for h in next(csv.reader(io.StringIO(text.split("\n", 1)[0])), [])]
        if all(c in header for c in MOVIELENS_COLUMNS):
            return "movielens"
        if "input" in header and "output" in header:
            return "csv"
        if all(c in header for c in LETTERBOXD_COLUMNS):
            return "letterboxd"
        if text.lstrip().startswith(("{", "[")):
            return "jsonl" if text.lstrip().startswith("{") and "\n{" in text.strip() else "json"
        raise DataError(
            f"{path}:1: cannot tell the format from the header {header[:8]}",
            hint="CSV needs columns input,output (or MovieLens userId,movieId,rating,timestamp); or pass --format",
        )
    raise DataError(f"{path}: unknown file type {suffix!r}", hint="pass --format jsonl|json|csv|movielens")


# --- generic per-user format ---------------------------------------------------------------------
def _read_jsonl(path: Path, text: str, user: str | None) -> ParsedImport:
    users: list[tuple[int, dict]] = []  # (line, user record)
    loose: list[tuple[int, dict]] = []  # (line, item record): item-per-line files
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if len(line) > MAX_LINE_CHARS:
            raise DataError(f"{path}:{lineno}: line of {len(line):,} characters, at most {MAX_LINE_CHARS:,}",
                            hint="one user (or item) per line; split very large users into several files")
        obj = _loads(path, line, lineno)
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        (users if "items" in obj else loose).append((lineno, obj))
    if users and loose:
        raise DataError(f"{path}:{loose[0][0]}: a line without \"items\" in a file of user records",
                        hint='each line is {"user_id": ..., "items": [...]}')
    if loose:
        return ParsedImport(path, "jsonl", None, None, _by_time(_line_item(obj, f"{path}:{ln}") for ln, obj in loose))
    lineno, rec = _pick_user(path, users, user)
    try:
        return _user_import(path, "jsonl", rec, where=f"{path}:{lineno}")
    except _At as e:
        raise DataError(f"{path}:{lineno}: {_describe(e.at)}{e.msg}", hint=e.hint) from None


def _line_item(obj: Any, where: str) -> NewItem:
    """One item of a JSONL line or CSV row at `where` (file:line)."""
    try:
        return _item(obj, where=where)
    except _At as e:
        raise DataError(f"{where}: {e.msg}", hint=e.hint) from None


def _read_json(path: Path, text: str, user: str | None) -> ParsedImport:
    doc = _loads(path, text, None)
    single = isinstance(doc, dict)
    try:
        if not isinstance(doc, dict | list):
            raise _At((), "expected a user object, a list of users, or a list of items")
        if single:
            return _user_import(path, "json", doc)
        if doc and all(isinstance(x, dict) and "items" not in x for x in doc):  # a plain list of items
            if len(doc) > MAX_ITEMS:
                raise _At((), f"{len(doc):,} items, at most {MAX_ITEMS:,} per import")
            return ParsedImport(path, "json", None, None,
                                _by_time(_item(it, (i,), where=f"{path}: item {i}") for i, it in enumerate(doc)))
        for i, x in enumerate(doc):
            if not isinstance(x, dict):
                raise _At((i,), f"expected a user object, got {type(x).__name__}")
        index, rec = _pick_user(path, list(enumerate(doc)), user)
        return _user_import(path, "json", rec, at=(index,))
    except _At as e:
        raise DataError(f"{path}:{_json_line(text, e.at)}: {_describe(e.at)}{e.msg}", hint=e.hint) from None


def _loads(path: Path, text: str, lineno: int | None) -> Any:
    """json.loads with every failure as a DataError at file:line: syntax, nesting past Python's
    recursion limit, integers past its 4300-digit conversion limit."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno or e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{path}:{lineno or 1}: JSON nested too deeply",
                        hint=f"items and their meta are at most {MAX_DEPTH} levels deep") from None
    except ValueError as e:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        raise DataError(f"{path}:{lineno or 1}: unusable JSON value ({e})") from None


def _user_import(path: Path, fmt: str, rec: dict, at: tuple = (), where: str = "") -> ParsedImport:
    """One user record {"user_id", "task"?, "items"} -> ParsedImport (errors: _At with a path)."""
    items = rec.get("items")
    if not isinstance(items, list):
        raise _At(at, '"items" must be a list')
    task = rec.get("task")
    if task is not None and not (isinstance(task, str) and task.strip()):
        raise _At(at, f'"task" must be a non-empty string, got {task!r}')
    if len(items) > MAX_ITEMS:
        raise _At(at, f"{len(items):,} items, at most {MAX_ITEMS:,} per import")
    parsed = [_item(it, at + ("items", i), where=f"{where or path}: item {i}") for i, it in enumerate(items)]
    uid = rec.get("user_id")
    return ParsedImport(path, fmt, None if uid is None else str(uid), task, _by_time(parsed))


def _item(obj: Any, at: tuple = (), where: str = "") -> NewItem:
    """Check one generic item; a problem raises _At(at, ...) for the caller to turn into file:line."""
    if not isinstance(obj, dict):
        raise _At(at, f"an item must be an object with input and output, got {type(obj).__name__}")
    fields = {}
    for key in ("input", "output"):
        v = obj.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool):
            # A number must read back as itself as text: finite, and an int of at most 64 bits.
            if not (v.bit_length() <= 64 if isinstance(v, int) else math.isfinite(v)):
                raise _At(at, f"item {key!r} is not a usable number: {brief(v)}")
            v = str(int(v)) if float(v).is_integer() else str(v)  # "output": 4 reads as "4"
        if not isinstance(v, str) or not v.strip():
            raise _At(at, f"item {key!r} must be a non-empty string, got {brief(v)}",
                      hint='items look like {"input": "...", "output": "...", "time": 1700000000}')
        fields[key] = _check_field(at, key, v)
    meta = obj.get("meta") or {}
    if not isinstance(meta, dict):
        raise _At(at, f"item 'meta' must be an object, got {type(meta).__name__}")
    _check_meta(at, meta)
    meta = dict(meta)
    meta_task = meta.pop("task", None)  # export_profile keeps a non-default task in meta
    task = obj.get("task", meta_task)
    if task is not None and not (isinstance(task, str) and task.strip() and len(task) <= 64):
        raise _At(at, f"item 'task' must be a non-empty name, got {brief(task)}")
    try:
        t = parse_time(obj.get("time"))
    except ValueError as e:
        raise _At(at, str(e)) from None
    return NewItem(fields["input"], fields["output"], t, meta, task, where)


def _check_field(at: tuple, key: str, v: str) -> str:
    if len(v) > MAX_FIELD_CHARS:
        raise _At(at, f"item {key!r} has {len(v):,} characters, at most {MAX_FIELD_CHARS:,}",
                  hint="shorten it; a profile item is one example, not a document")
    if "\x00" in v:  # C code (SQLite's and the tokenizer's C strings) would cut the text there
        raise _At(at, f"item {key!r} holds a NUL character", hint="remove it; the file may be binary")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (\ud800 in JSON): not text SQLite or the tokenizer can take
        raise _At(at, f"item {key!r} holds an invalid character (a lone UTF-16 surrogate)",
                  hint="fix the file's encoding") from None
    return v


def _check_meta(at: tuple, meta: dict) -> None:
    """Meta: at most MAX_DEPTH levels, bounded strings, finite numbers, valid text. Iterative: no recursion."""
    stack: list[tuple[Any, int]] = [(meta, 1)]
    size = 0
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _At(at, f"item 'meta' is nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, dict):
            stack.extend((k, depth + 1) for k in node)
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
        elif isinstance(node, str):
            size += len(node)
            _check_field(at, "meta", node)
        elif isinstance(node, float) and not math.isfinite(node):
            raise _At(at, "item 'meta' holds a non-finite number")
        elif isinstance(node, int) and not isinstance(node, bool) and abs(node) > 2**63:
            raise _At(at, "item 'meta' holds an integer too large to store")
        if size > MAX_FIELD_CHARS:
            raise _At(at, f"item 'meta' holds more than {MAX_FIELD_CHARS:,} characters of text")


# --- CSV -----------------------------------------------------------------------------------------
def _read_csv(path: Path, text: str, user: str | None) -> ParsedImport:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        return _csv_rows(path, reader, user)
    except csv.Error as e:  # a NUL byte, a field past csv's limit, an unterminated quote
        # line_num counts the lines read before the failing record: the problem is on the next one.
        raise DataError(f"{path}:{reader.line_num + 1}: unreadable CSV ({e})",
                        hint=f"fields hold at most {MAX_FIELD_CHARS:,} characters; quote fields with commas") from None


def _csv_rows(path: Path, reader: csv.DictReader, user: str | None) -> ParsedImport:
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    missing = [c for c in ("input", "output") if c not in header]
    if missing:
        raise DataError(f"{path}:1: missing column(s) {', '.join(missing)} (found {brief(', '.join(header))})",
                        hint="the header must name at least input,output (optionally time,task,user_id)")
    extra = [h for h in header if h not in ("input", "output", "time", "task", "user_id") and h]
    by_user: dict[str, list[NewItem]] = {}
    n = 0
    for row in reader:
        where = f"{path}:{reader.line_num}"
        n += 1
        if n > MAX_ITEMS:
            raise DataError(f"{where}: more than {MAX_ITEMS:,} rows", hint="split the file")
        if None in row:
            raise DataError(f"{where}: more fields than the header has columns", hint="quote fields that contain commas")
        if any(v is None for v in row.values()):
            raise DataError(f"{where}: fewer fields than the header's {len(header)} columns ({','.join(header)})")
        rec: dict[str, Any] = {"input": row["input"], "output": row["output"], "time": row.get("time") or None,
                               "meta": {k: row[k] for k in extra if row.get(k) not in (None, "")}}
        if row.get("task"):
            rec["task"] = row["task"]
        by_user.setdefault(row.get("user_id") or "", []).append(_line_item(rec, where))
    uid = _pick_key(path, list(by_user), user)
    return ParsedImport(path, "csv", uid or None, None, _by_time(by_user.get(uid, [])))


# --- MovieLens -----------------------------------------------------------------------------------
def _read_movielens(path: Path, text: str, user: str | None, movies_path: Path) -> ParsedImport:
    movies = read_movies(movies_path)
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [h.strip() for h in next(reader, [])]
    if not all(c in header for c in MOVIELENS_COLUMNS):
        raise DataError(f"{path}:1: not a MovieLens ratings file (header {header[:6]})",
                        hint="expected columns userId,movieId,rating,timestamp")
    col = {c: header.index(c) for c in header}
    ts = col.get("timestamp")
    users: dict[str, list[tuple[int, list[str]]]] = {}
    for row in reader:
        if row:  # parse lazily: only the chosen user's rows are converted
            users.setdefault(row[col["userId"]].strip(), []).append((reader.line_num, row))
    uid = _pick_key(path, list(users), user)
    items = []
    for lineno, row in users.get(uid, []):
        where = f"{path}:{lineno}"
        try:
            movie_id, rating = int(row[col["movieId"]]), float(row[col["rating"]])
            when = float(row[ts]) if ts is not None and row[ts].strip() else None
        except (ValueError, IndexError):
            raise DataError(f"{where}: bad rating row {row}", hint="userId,movieId,rating,timestamp") from None
        if not 0 < rating <= 5:
            raise DataError(f"{where}: rating {rating} is outside 0.5..5")
        if movie_id not in movies:
            raise DataError(f"{where}: movie {movie_id} is not in {movies_path}",
                            hint="pass the movies.csv that belongs to these ratings with --movies")
        text, meta = movie_item(*movies[movie_id], movie_id)  # the converter's rule: same text, same meta
        items.append(NewItem(text, str(rating_to_stars(rating)), when, meta))
    return ParsedImport(path, "movielens", uid, MOVIELENS_TASK, _by_time(items))


def read_movies(path: Path) -> dict[int, tuple[str, list[str]]]:
    """movies.csv -> {movieId: (title, genres)}."""
    text = _read_text(path, hint="MovieLens ratings need their movies.csv: put it beside the ratings or pass --movies")
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [h.strip() for h in next(reader, [])]
    if not {"movieId", "title", "genres"} <= set(header):
        raise DataError(f"{path}:1: not a MovieLens movies file (header {header[:6]})",
                        hint="expected columns movieId,title,genres")
    i_id, i_title, i_genres = header.index("movieId"), header.index("title"), header.index("genres")
    out = {}
    for row in reader:
        if not row:
            continue
        try:
            out[int(row[i_id])] = (row[i_title], movie_genres(row[i_genres]))
        except (ValueError, IndexError):
            raise DataError(f"{path}:{reader.line_num}: bad movie row {row}") from None
    return out


def rating_to_stars(rating: float) -> int:
    """MovieLens half stars rounded up to whole stars 1..5 (0.5 -> 1, 3.5 -> 4)."""
    return min(5, max(1, math.ceil(rating)))


# --- Letterboxd ----------------------------------------------------------------------------------
LETTERBOXD_COLUMNS = ("Name", "Year", "Rating")
# ASCII only: str.isdigit() accepts "²" and other digits int() refuses, and 5000 digits raise in int().
_YEAR = re.compile(r"[0-9]{4}")
MIN_YEAR, MAX_YEAR = 1870, 2200
_LETTERBOXD_RATING = re.compile(r"[0-9](?:\.[05]0*)?")
_ARTICLES = ("the", "a", "an", "les", "le", "la", "l'", "die", "der", "das", "el", "il", "los", "las")


def _read_letterboxd(path: Path, text: str, movies_path: Path | None) -> ParsedImport:
    """A Letterboxd export (`ratings.csv`/`diary.csv`: Date, Name, Year, [Letterboxd URI,] Rating in half
    stars). A title found in MovieLens' movies.csv (`movies`, or one beside the file) gets its MovieLens
    title and genres, so the item is the one the model was trained on; others get no genres."""
    if movies_path is None and (path.parent / "movies.csv").is_file():
        movies_path = path.parent / "movies.csv"
    catalogue = title_index(read_movies(movies_path)) if movies_path else {}
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    if not all(c in header for c in LETTERBOXD_COLUMNS):
        raise DataError(f"{path}:1: not a Letterboxd export (header {header[:6]})",
                        hint="expected columns Date,Name,Year,Rating (Letterboxd: Settings > Import & Export)")
    twice = sorted({c for c in header if header.count(c) > 1})
    if twice:  # csv keeps the last of two "Rating" columns: which one the user meant is unknowable
        raise DataError(f"{path}:1: {'columns' if len(twice) > 1 else 'column'} {', '.join(map(brief, twice))} "
                        f"{'appear' if len(twice) > 1 else 'appears'} more than once", hint="keep one column of each name")
    when_col = "Watched Date" if "Watched Date" in header else ("Date" if "Date" in header else None)
    items, unrated, unmatched = [], 0, 0
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if len(items) >= MAX_ITEMS:
            raise DataError(f"{where}: more than {MAX_ITEMS:,} rows", hint="split the file")
        name, year, rating = ((row.get(c) or "").strip() for c in LETTERBOXD_COLUMNS)
        if not name:
            raise DataError(f"{where}: a row without a Name")
        if len(name) > MAX_FIELD_CHARS:
            raise DataError(f"{where}: a Name of {len(name):,} characters, at most {MAX_FIELD_CHARS:,}")
        if not name.isprintable():  # NUL, escape sequences, line breaks: no title holds them
            raise DataError(f"{where}: the Name {brief(name)} holds control characters", hint="fix that row")
        if not rating:
            unrated += 1  # watched, not rated: nothing to learn a rating from
            continue
        if not _LETTERBOXD_RATING.fullmatch(rating) or not 0.5 <= float(rating) <= 5:
            raise DataError(f"{where}: rating {brief(rating)} is not a Letterboxd rating",
                            hint="Letterboxd ratings are 0.5 to 5 in half stars (0.5, 1, 1.5, ... 5)")
        stars = float(rating)
        if year and not (_YEAR.fullmatch(year) and MIN_YEAR <= int(year) <= MAX_YEAR):
            raise DataError(f"{where}: year {brief(year)} is not a year", hint=f"a year {MIN_YEAR}-{MAX_YEAR}, or empty")
        try:
            when = parse_time(row.get(when_col)) if when_col else None
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None
        match = match_title(catalogue, name, year)
        if match is None:
            unmatched += 1
            title, genres, item_id = f"{name} ({year})" if year else name, [], (row.get("Letterboxd URI") or "").strip()
        else:
            item_id, (title, genres) = match
        text_, meta = movie_item(title, genres, item_id or f"{name} ({year})")
        items.append(NewItem(text_, str(rating_to_stars(stars)), when, meta, where=where))
    notes = [(f"{len(items) - unmatched:,} titles matched in {movies_path} (MovieLens genres), "
              f"{unmatched:,} without a match: no genres") if catalogue else
             f"{unmatched:,} titles without genres (pass --movies movies.csv to add MovieLens genres)"]
    if unrated:
        notes.append(f"{unrated:,} watched but unrated entries skipped")
    return ParsedImport(path, "letterboxd", None, MOVIELENS_TASK, _by_time(items), tuple(notes))


def normal_title(title: str) -> str:
    """A title for matching: case, accents, punctuation and a leading or trailing article ignored
    ("The American President" and MovieLens' "American President, The" are one key; "Amélie" is "Amelie")."""
    bare = "".join(ch for ch in unicodedata.normalize("NFKD", title.casefold()) if not unicodedata.combining(ch))
    t = " ".join("".join(ch if ch.isalnum() or ch == "'" else " " for ch in bare).split())
    words = t.split(" ")
    if len(words) > 1 and words[-1] in _ARTICLES:
        words = words[:-1]
    elif len(words) > 1 and words[0] in _ARTICLES:
        words = words[1:]
    return " ".join(words).replace("'", "")


def split_title_year(title: str) -> tuple[list[str], str]:
    """"City of Lost Children, The (Cité des enfants perdus, La) (1995)" -> (its names, "1995")."""
    t = title.strip()
    year = ""
    if t.endswith(")") and t[-6:-5] == "(" and t[-5:-1].isdigit():
        t, year = t[:-6].strip(), t[-5:-1]
    names = [t]
    if t.endswith(")") and "(" in t:  # an alternative (original-language or a.k.a.) title
        at = t.rfind("(")
        names = [t[:at].strip(), t[at + 1:-1].removeprefix("a.k.a. ").strip()]
    return [n for n in names if n], year


def title_index(movies: dict[int, tuple[str, list[str]]]) -> dict[str, list[tuple[str, int, str, list[str]]]]:
    """normal_title -> [(year, movieId, MovieLens title, genres)] for `match_title`."""
    index: dict[str, list[tuple[str, int, str, list[str]]]] = {}
    for movie_id, (title, genres) in movies.items():
        names, year = split_title_year(title)
        for n in names:
            index.setdefault(normal_title(n), []).append((year, movie_id, title, genres))
    return index


def match_title(index: dict, name: str, year: str = "") -> tuple[int, tuple[str, list[str]]] | None:
    """The MovieLens movie of `name` (and `year`, when given: one year off is allowed, release dates differ)."""
    found = index.get(normal_title(name), [])
    if year:
        exact = [f for f in found if f[0] == year]
        found = exact or [f for f in found if f[0].isdigit() and abs(int(f[0]) - int(year)) <= 1]
    if len(found) != 1:
        return None
    _, movie_id, title, genres = found[0]
    return movie_id, (title, genres)


# --- shared helpers ------------------------------------------------------------------------------
class _At(Exception):
    """A problem in a JSON document at a path (tuple of keys/indices); turned into a line number."""

    def __init__(self, at: tuple, msg: str, hint: str | None = None) -> None:
        super().__init__(msg)
        self.at, self.msg, self.hint = at, msg, hint


def _json_line(text: str, at: tuple) -> int:
    """Line of the value at path `at` in a JSON text (error path only: re-parses, tracking positions)."""
    newlines = [i for i, ch in enumerate(text) if ch == "\n"]
    starts: dict[int, int] = {}  # id(container) -> offset of its opening bracket

    def track(parse):
        def wrapped(s_and_end, *args, **kwargs):
            value, end = parse(s_and_end, *args, **kwargs)
            starts[id(value)] = s_and_end[1] - 1
            return value, end

        return wrapped

    dec = json.JSONDecoder()
    dec.parse_object = track(json.decoder.JSONObject)
    dec.parse_array = track(dec.parse_array)
    dec.scan_once = json.scanner.py_make_scanner(dec)  # the C scanner ignores the hooks
    try:
        node = dec.decode(text)
    except (RecursionError, ValueError):  # the pure-Python scanner recurses deeper than the C one
        return 1
    offset = starts.get(id(node), 0)
    for key in at:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            break
        offset = starts.get(id(node), offset)
    return bisect.bisect_right(newlines, offset) + 1


def _describe(at: tuple) -> str:
    """("items", 3) -> "item 3: " (the index within the user's items list)."""
    return f"item {at[-1]}: " if len(at) >= 2 and at[-2] == "items" else ""


def _pick_user(path: Path, users: list[tuple[int, dict]], user: str | None) -> tuple[int, dict]:
    """The one user record to import: `user` by id, or the only one there is."""
    ids = [str(u.get("user_id")) for _, u in users]
    if not users:
        raise DataError(f"{path}: no users in the file")
    return users[ids.index(_pick_key(path, ids, user))]


def _pick_key(path: Path, ids: list[str], user: str | None) -> str:
    if user is not None:
        if user not in ids:
            raise DataError(f"{path}: no user {user!r} in the file ({len(ids)} users)",
                            hint=f"user ids there include: {', '.join(ids[:8])}")
        return user
    if len(ids) > 1:
        raise DataError(f"{path}: the file holds {len(ids)} users; which one is this profile?",
                        hint=f"pass --user ID (ids include: {', '.join(ids[:8])})")
    return ids[0] if ids else ""


def _by_time(items: Iterable[NewItem]) -> list[NewItem]:
    """Time order (unknown times first, as the store lists them); stable, so file order breaks ties."""
    return sorted(items, key=lambda it: (it.time is not None, it.time or 0.0))


def _read_text(path: Path, hint: str | None = None) -> str:
    """A regular file of bounded size, as UTF-8 text (no FIFOs, devices or directories: they hang or never end)."""
    if not path.exists():
        raise DataError(f"{path}: no such file", hint=hint or "check the path (a relative one starts in the current folder)")
    try:
        regular_file(path, "import file", MAX_FILE_BYTES, DataError)
    except DataError as e:
        raise DataError(str(e.args[0]), hint=hint or e.hint) from None
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)  # bounded even if the file grows while we read
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}", hint=hint) from None
    if len(data) > MAX_FILE_BYTES:
        raise DataError(f"{path}: larger than {MAX_FILE_BYTES:,} bytes", hint="split it into smaller files")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {e.start})",
                        hint="save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
