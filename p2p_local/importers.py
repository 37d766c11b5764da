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
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from p2p_local.errors import DataError
from p2p_local.store import NewItem, Store

FORMATS = ("auto", "jsonl", "json", "csv", "movielens")
MOVIELENS_TASK = "movielens-rating"
MOVIELENS_COLUMNS = ("userId", "movieId", "rating")


@dataclass(frozen=True)
class ParsedImport:
    path: Path
    format: str
    user_id: str | None
    task: str | None  # the file's own task (top-level "task", or movielens-rating)
    items: list[NewItem]


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


def import_file(
    store: Store,
    profile: str,
    path: Path | str,
    fmt: str = "auto",
    *,
    user: str | None = None,
    movies: Path | str | None = None,
    task: str | None = None,
) -> ImportResult:
    """Parse `path` and add its items to `profile` in one transaction.

    Task of each item: its own (CSV column / item "task" / meta "task"), else `task`, else the
    file's, else the profile's default. A profile without a default task takes the import's.
    """
    prof = store.get_profile(profile)  # fail before parsing a big file
    t0 = time.perf_counter()
    parsed = read_import(path, fmt, user=user, movies=movies)
    t1 = time.perf_counter()
    default_task = task or parsed.task
    n = store.add_items(profile, parsed.items, task=default_task)
    if prof.task is None and default_task and n:
        store.set_profile_task(profile, default_task)
    t2 = time.perf_counter()
    return ImportResult(profile, str(path), parsed.format, parsed.user_id, default_task or prof.task, n,
                        round(t1 - t0, 4), round(t2 - t1, 4))


def read_import(
    path: Path | str, fmt: str = "auto", *, user: str | None = None, movies: Path | str | None = None
) -> ParsedImport:
    """Parse and validate a whole file (nothing is written)."""
    path = Path(path)
    if fmt not in FORMATS:
        raise DataError(f"unknown import format {fmt!r}", hint=f"one of {', '.join(FORMATS)}")
    text = _read_text(path)
    if fmt == "auto":
        fmt = detect_format(path, text)
    if fmt == "jsonl":
        return _read_jsonl(path, text, user)
    if fmt == "json":
        return _read_json(path, text, user)
    if fmt == "csv":
        return _read_csv(path, text, user)
    return _read_movielens(path, text, user, Path(movies) if movies else path.parent / "movies.csv")


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
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg}, column {e.colno})") from e
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        (users if "items" in obj else loose).append((lineno, obj))
    if users and loose:
        raise DataError(f"{path}:{loose[0][0]}: a line without \"items\" in a file of user records",
                        hint='each line is {"user_id": ..., "items": [...]}')
    if loose:
        return ParsedImport(path, "jsonl", None, None, _by_time(_jsonl_item(path, ln, obj) for ln, obj in loose))
    lineno, rec = _pick_user(path, users, user)
    try:
        return _user_import(path, "jsonl", rec)
    except _At as e:
        raise DataError(f"{path}:{lineno}: {_describe(e.at)}{e.msg}", hint=e.hint) from None


def _jsonl_item(path: Path, lineno: int, obj: dict) -> NewItem:
    try:
        return _item(obj)
    except _At as e:
        raise DataError(f"{path}:{lineno}: {e.msg}", hint=e.hint) from None


def _read_json(path: Path, text: str, user: str | None) -> ParsedImport:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from e
    single = isinstance(doc, dict)
    try:
        if not isinstance(doc, dict | list):
            raise _At((), "expected a user object, a list of users, or a list of items")
        if single:
            return _user_import(path, "json", doc)
        if doc and all(isinstance(x, dict) and "items" not in x for x in doc):  # a plain list of items
            return ParsedImport(path, "json", None, None, _by_time(_item(it, (i,)) for i, it in enumerate(doc)))
        for i, x in enumerate(doc):
            if not isinstance(x, dict):
                raise _At((i,), f"expected a user object, got {type(x).__name__}")
        index, rec = _pick_user(path, list(enumerate(doc)), user)
        return _user_import(path, "json", rec, at=(index,))
    except _At as e:
        raise DataError(f"{path}:{_json_line(text, e.at)}: {_describe(e.at)}{e.msg}", hint=e.hint) from None


def _user_import(path: Path, fmt: str, rec: dict, at: tuple = ()) -> ParsedImport:
    """One user record {"user_id", "task"?, "items"} -> ParsedImport (errors: _At with a path)."""
    items = rec.get("items")
    if not isinstance(items, list):
        raise _At(at, '"items" must be a list')
    task = rec.get("task")
    if task is not None and not (isinstance(task, str) and task.strip()):
        raise _At(at, f'"task" must be a non-empty string, got {task!r}')
    parsed = [_item(it, at + ("items", i)) for i, it in enumerate(items)]
    uid = rec.get("user_id")
    return ParsedImport(path, fmt, None if uid is None else str(uid), task, _by_time(parsed))


def _item(obj: Any, at: tuple = ()) -> NewItem:
    """Check one generic item; a problem raises _At(at, ...) for the caller to turn into file:line."""
    if not isinstance(obj, dict):
        raise _At(at, f"an item must be an object with input and output, got {type(obj).__name__}")
    fields = {}
    for key in ("input", "output"):
        v = obj.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool):
            v = _num_text(v)  # "output": 4 reads as "4"
        if not isinstance(v, str) or not v.strip():
            raise _At(at, f"item {key!r} must be a non-empty string, got {v!r}",
                      hint='items look like {"input": "...", "output": "...", "time": 1700000000}')
        fields[key] = v
    meta = obj.get("meta") or {}
    if not isinstance(meta, dict):
        raise _At(at, f"item 'meta' must be an object, got {type(meta).__name__}")
    meta = dict(meta)
    meta_task = meta.pop("task", None)  # export_profile keeps a non-default task in meta
    task = obj.get("task", meta_task)
    if task is not None and not (isinstance(task, str) and task.strip()):
        raise _At(at, f"item 'task' must be a non-empty string, got {task!r}")
    try:
        t = parse_time(obj.get("time"))
    except ValueError as e:
        raise _At(at, str(e)) from None
    return NewItem(fields["input"], fields["output"], t, meta, task)


# --- CSV -----------------------------------------------------------------------------------------
def _read_csv(path: Path, text: str, user: str | None) -> ParsedImport:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    missing = [c for c in ("input", "output") if c not in header]
    if missing:
        raise DataError(f"{path}:1: missing column(s) {', '.join(missing)} (found {', '.join(header) or 'none'})",
                        hint="the header must name at least input,output (optionally time,task,user_id)")
    extra = [h for h in header if h not in ("input", "output", "time", "task", "user_id") and h]
    by_user: dict[str, list[NewItem]] = {}
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if None in row:
            raise DataError(f"{where}: more fields than the header has columns", hint="quote fields that contain commas")
        if any(v is None for v in row.values()):
            raise DataError(f"{where}: fewer fields than the header's {len(header)} columns ({','.join(header)})")
        rec: dict[str, Any] = {"input": row["input"], "output": row["output"], "time": row.get("time") or None,
                               "meta": {k: row[k] for k in extra if row.get(k) not in (None, "")}}
        if row.get("task"):
            rec["task"] = row["task"]
        try:
            item = _item(rec)
        except _At as e:
            raise DataError(f"{where}: {e.msg}", hint=e.hint) from None
        by_user.setdefault(row.get("user_id") or "", []).append(item)
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
        items.append(NewItem(movies[movie_id], str(rating_to_stars(rating)), when,
                             {"movie_id": movie_id, "rating": rating}))
    return ParsedImport(path, "movielens", uid, MOVIELENS_TASK, _by_time(items))


def read_movies(path: Path) -> dict[int, str]:
    """movies.csv -> {movieId: "Title (Year) | Genres: A|B"}."""
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
            out[int(row[i_id])] = movie_text(row[i_title], row[i_genres])
        except (ValueError, IndexError):
            raise DataError(f"{path}:{reader.line_num}: bad movie row {row}") from None
    return out


def movie_text(title: str, genres: str) -> str:
    return f"{title.strip()} | Genres: {genres.strip()}"


def rating_to_stars(rating: float) -> int:
    """MovieLens half stars rounded up to whole stars 1..5 (0.5 -> 1, 3.5 -> 4)."""
    return min(5, max(1, math.ceil(rating)))


# --- shared helpers ------------------------------------------------------------------------------
def parse_time(value: Any) -> float | None:
    """Unix seconds from a number, a numeric string or ISO 8601 text; None/"" -> None."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError(f"bad time {value!r}")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"bad time {value!r}")
        return float(value)
    if isinstance(value, str):
        s = value.strip()
        try:
            return float(s)
        except ValueError:
            pass
        try:
            return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()  # naive: local time
        except ValueError:
            pass
    raise ValueError(f"bad time {value!r}: use unix seconds or ISO 8601 (2024-05-01T12:00:00)")


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
    node = dec.decode(text)
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
    uid = _pick_key(path, ids, user)
    return users[ids.index(uid)]


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


def _num_text(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


def _read_text(path: Path, hint: str | None = None) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file", hint=hint) from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}", hint=hint) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {e.start})",
                        hint="save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
