"""The generic per-user format every task is converted into, and the task card that describes a task.

Users file (JSONL, one user per line, items in time order):
    {"user_id": "42", "items": [{"input": "...", "output": "...", "time": 964982703.0, "meta": {...}}]}

Task card (JSON): what the model is asked (`template` with `{input}`), what kind of answer
(`rating` | `label` | `generation`), the allowed labels, the metrics and a one-sentence description
used in the profile wrapper. See docs/DATA.md.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import stat
import string
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import IO, Any

from p2p_local.data.records import brief, time_in_range
from p2p_local.errors import DataError, UsageError
from p2p_local.files import atomic_open, atomic_write
from p2p_local.paths import regular_file

KINDS = ("rating", "label", "generation")
LABELLED_KINDS = ("rating", "label")  # kinds answered by one of the card's labels (a distribution over them)
MAX_SAMPLES, MAX_SAMPLE_CHARS = 8, 2000  # a card's `samples`: a few short inputs, not a data set
SPLITS_BY = ("users", "repository")  # a card's `split`: how the lab's prepared data holds users out
# Card fields no cached result depends on (example inputs; the split rule, whose effect the data's own hash
# carries): `keyed_dict` leaves them out, so results keyed before these fields existed stay valid.
UNKEYED_FIELDS = ("samples", "split", "aliases")

# Bounds on what a card or a users file may hold: past them a hostile or broken file gets a DataError naming
# the field or line, not a crash, a hang or a MemoryError deep inside the lab (issue: untrusted input).
# The task name has a profile name's shape (`store.records.check_name`): it names files (`p2p eval`'s reports)
# and the store keys cards by it.
TASK_NAME = re.compile(r"\A\w[\w.@+-]{0,63}\Z")
MAX_CARD_BYTES = 1 << 20  # a card is a few hundred bytes
MAX_TEMPLATE_CHARS, MAX_DESCRIPTION_CHARS = 4000, 1000  # the template precedes every prompt: it must fit n_ctx
MAX_LABELS, MAX_LABEL_CHARS = 256, 100
MAX_METRICS, MAX_NAME_CHARS = 16, 64  # metric names, input_fields keys and rule texts
MAX_INPUT_FIELDS = 16
INPUT_FIELD_RULE_KEYS = ("after", "split", "ignore")
MAX_USERS_FILE_BYTES = 1 << 30  # 1 GiB: the largest prepared set (commit subjects' train) is ~140 MB
MAX_LINE_BYTES = 64 << 20  # one user with all their items (the largest prepared user: ~7 MB)
MAX_USER_ID_CHARS = 256
MAX_META_DEPTH = 16  # nesting of an item's meta (as the importers: `importers.MAX_DEPTH`)


@dataclass
class Item:
    """One record of a user's history: what they saw (`input`) and what they did (`output`)."""

    input: str
    output: str
    time: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"input": self.input, "output": self.output, "time": self.time, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: Any) -> Item:
        if not isinstance(d, dict):
            raise ValueError(f"an item must be an object, got {type(d).__name__}")
        for key in ("input", "output"):
            if not isinstance(d.get(key), str):
                raise ValueError(f"item field {key!r} must be a string")
        t = d.get("time")
        if t is not None and (isinstance(t, bool) or not isinstance(t, int | float)):
            raise ValueError("item field 'time' must be a number or null")
        if t is not None:
            t = time_in_range(t)  # finite, 1900..2100: a NaN or a 400-digit time poisons every later sort and date
        meta = d.get("meta") or {}
        if not isinstance(meta, dict):
            raise ValueError("item field 'meta' must be an object")
        check_meta(meta)
        return cls(d["input"], d["output"], t, meta)


def check_meta(meta: dict[str, Any]) -> None:
    """An item's meta: at most MAX_META_DEPTH levels of containers and only finite numbers (ValueError otherwise).
    Iterative, so a deep meta is refused here rather than by a RecursionError in whatever walks it later."""
    stack: list[tuple[Any, int]] = [(meta, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_META_DEPTH:
            raise ValueError(f"item field 'meta' is nested more than {MAX_META_DEPTH} levels deep")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
        elif isinstance(node, float) and not math.isfinite(node):
            raise ValueError("item field 'meta' holds a non-finite number")


@dataclass
class User:
    """A user and their items, oldest first."""

    user_id: str
    items: list[Item]

    def to_dict(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "items": [it.to_dict() for it in self.items]}

    @classmethod
    def from_dict(cls, d: Any) -> User:
        if not isinstance(d, dict):
            raise ValueError(f"a user must be an object, got {type(d).__name__}")
        uid = d.get("user_id")
        if not isinstance(uid, str | int) or isinstance(uid, bool) or str(uid) == "":
            raise ValueError("'user_id' must be a non-empty string")
        if len(str(uid)) > MAX_USER_ID_CHARS:
            raise ValueError(f"'user_id' has {len(str(uid)):,} characters, at most {MAX_USER_ID_CHARS}")
        items = d.get("items")
        if not isinstance(items, list):
            raise ValueError("'items' must be a list")
        parsed = []
        for i, it in enumerate(items):
            try:
                parsed.append(Item.from_dict(it))
            except ValueError as e:
                raise ValueError(f"item {i}: {e}") from None
        return cls(str(uid), time_ordered(parsed))


def time_ordered(items: list[Item]) -> list[Item]:
    """Oldest first. Stable: ties keep their given order; if any item lacks a time, keep the given order."""
    if any(it.time is None for it in items):
        return list(items)
    return sorted(items, key=lambda it: it.time)


@dataclass
class TaskCard:
    """What a task asks and how it is scored."""

    name: str
    kind: str  # rating | label | generation
    template: str  # contains "{input}"; for rating/label the label is appended directly
    description: str  # one sentence, used in the profile wrapper
    labels: list[str] = field(default_factory=list)
    value_range: tuple[float, float] | None = None
    metrics: list[str] = field(default_factory=list)
    # How the typed input carries item metadata, e.g. {"genres": {"after": " | Genres: ", "split": "|"}}:
    # the metadata is read back from the text, so a query typed by the user carries what a dataset item does.
    input_fields: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Generation answers are one line (commit subjects) or several (email rewrites); None: read the template.
    one_line: bool | None = None
    # History items retrieved for the query (BM25) and shown before it in the card's own format when the
    # answer is personalized: P2P + retrieval, the default where it measured better than the adapter alone
    # (the commit reports under reports/). 0: the query alone.
    examples: int = 0
    # A task that reads a change (commit subjects): the query may be a diff, read by `p2p_local.diffs`, and
    # this many characters of an item's compact diff (`meta["diff"]`) follow its input in the prompt and in
    # retrieval. 0: the task reads no change.
    diff_chars: int = 0
    # Characters of each shown example's diff (`examples`); None: `diff_chars`, as the query.
    examples_diff_chars: int | None = None
    # Example inputs a user might type (at most MAX_SAMPLES): the chat's input placeholder, an exported
    # adapter's README and `p2p bench strength`'s queries read them, so no code spells a task's inputs.
    samples: list[str] = field(default_factory=list)
    # How the lab splits the task's users (p2p_lab/data/prepare.py): "users" holds out clusters of users,
    # "repository" whole repositories (commits: an author's style must not reach training from another repo).
    split: str = "users"
    # Former names of the task, still accepted wherever a task is named (stored profiles, bundles, files).
    aliases: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Every field's type and range, in the order a reader meets them: a card comes from a user's file
        # (`p2p profile create --task-card`, `p2p eval --task-card`), so nothing here may raise but DataError.
        _check_name(self.name)
        where = f"task card {self.name!r}"
        if not isinstance(self.kind, str) or self.kind not in KINDS:
            raise DataError(f"{where}: kind must be one of {KINDS}, got {brief(self.kind)}")
        _check_template(where, self.template)
        if not isinstance(self.description, str) or len(self.description) > MAX_DESCRIPTION_CHARS:
            raise DataError(f"{where}: description must be a text of at most {MAX_DESCRIPTION_CHARS:,} characters, "
                            f"got {brief(self.description)}")
        self.labels = _checked_labels(where, self.labels)
        if self.labelled and not self.labels:
            raise DataError(f"{where}: a {self.kind} task needs 'labels'")
        self.value_range = _checked_value_range(where, self.value_range, self.labels)
        self.metrics = _checked_metrics(where, self.metrics)
        _check_input_fields(where, self.input_fields)
        if self.one_line is not None and not isinstance(self.one_line, bool):
            raise DataError(f"{where}: one_line must be true, false or null, got {brief(self.one_line)}")
        _check_count(where, "examples", self.examples, 8)
        _check_count(where, "diff_chars", self.diff_chars, 2000)
        if self.examples_diff_chars is not None:
            _check_count(where, "examples_diff_chars", self.examples_diff_chars, 2000)
        if not isinstance(self.samples, list) or len(self.samples) > MAX_SAMPLES or not all(
                isinstance(x, str) and x.strip() and len(x) <= MAX_SAMPLE_CHARS for x in self.samples):
            raise DataError(f"{where}: samples must be a list of at most {MAX_SAMPLES} non-empty "
                            f"texts of at most {MAX_SAMPLE_CHARS} characters")
        if not isinstance(self.aliases, list) or len(self.aliases) > MAX_SAMPLES or not all(
                isinstance(a, str) and TASK_NAME.match(a) for a in self.aliases):
            raise DataError(f"{where}: aliases must be a list of at most {MAX_SAMPLES} task names")
        if not isinstance(self.split, str) or self.split not in SPLITS_BY:
            raise DataError(f"{where}: split must be one of {SPLITS_BY}, got {brief(self.split)}")
        if self.one_line is None and self.kind == "generation":
            self.one_line = "line" in self.template.split("{input}")[-1].lower()  # "Subject line:" is one line

    @property
    def labelled(self) -> bool:
        """Whether an answer is one of the labels (rating, label), read off the label distribution."""
        return self.kind in LABELLED_KINDS

    @property
    def prefix(self) -> str:
        """The template's text before "{input}" (an adapter's prompt prefix; a rewrite's stop cue)."""
        return self.template.split("{input}")[0]

    @property
    def example_diff_chars(self) -> int:
        """Characters of an example's diff shown (`examples_diff_chars`, else the query's `diff_chars`)."""
        return self.diff_chars if self.examples_diff_chars is None else self.examples_diff_chars

    def input_meta(self, text: str) -> dict[str, Any]:
        """The metadata a typed input carries by this card's `input_fields` (the last "after" marker on)."""
        out: dict[str, Any] = {}
        for key, rule in self.input_fields.items():
            at = text.rfind(rule["after"])
            if at < 0:
                continue
            value = text[at + len(rule["after"]):].strip()
            sep = rule.get("split")
            if sep:
                ignore = set(rule.get("ignore", []))
                out[key] = [v.strip() for v in value.split(sep) if v.strip() and v.strip() not in ignore]
            else:
                out[key] = value
        return out

    def prompt(self, text: str) -> str:
        """The model prompt for one input; a rating/label answer is appended directly after it."""
        return self.template.format(input=text)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["value_range"] = list(self.value_range) if self.value_range is not None else None
        return d

    def keyed_dict(self) -> dict[str, Any]:
        """`to_dict()` less UNKEYED_FIELDS: the card as keys of cached results read it (the evaluation's run dir)."""
        return {k: v for k, v in self.to_dict().items() if k not in UNKEYED_FIELDS}

    @classmethod
    def from_dict(cls, d: Any) -> TaskCard:
        """A card from its JSON object; any problem (a field's type or range) is a DataError naming the field.
        Unknown fields are ignored (a card written by a later version)."""
        if not isinstance(d, dict):
            raise DataError(f"a task card must be a JSON object, got {type(d).__name__}")
        known = set(cls.__dataclass_fields__)
        missing = {"name", "kind", "template", "description"} - set(d)
        if missing:
            raise DataError(f"task card lacks fields: {sorted(missing)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def load(cls, path: str | Path) -> TaskCard:
        """A card file the user hands us (`--task-card`): a regular file of at most MAX_CARD_BYTES, JSON, checked."""
        path = Path(path)
        with open_regular(path, "task card", MAX_CARD_BYTES) as fh:
            data = fh.read(MAX_CARD_BYTES + 1)
        if len(data) > MAX_CARD_BYTES:  # grew since the check
            raise DataError(f"task card {path} is too large (more than {MAX_CARD_BYTES:,} bytes)")
        try:
            d = json.loads(data.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"task card {path} is not valid JSON: {e}") from None
        except RecursionError:
            raise DataError(f"task card {path}: JSON nested too deeply", hint="a card nests at most 3 levels") from None
        except ValueError as e:  # an integer past Python's 4300-digit conversion limit
            raise DataError(f"task card {path}: unusable JSON value ({e})") from None
        if not isinstance(d, dict):
            raise DataError(f"task card {path} must be a JSON object")
        return cls.from_dict(d)

    def save(self, path: str | Path) -> None:
        atomic_write(path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")


def _check_name(name: Any) -> None:
    """A task name: 1-64 letters, digits or . _ @ + - from a letter or digit (it names report files)."""
    if not isinstance(name, str) or not TASK_NAME.match(name):
        raise DataError(f"task card: invalid name {brief(name)}",
                        hint="use 1-64 letters, digits or . _ @ + - (starting with a letter or digit)")


def _check_template(where: str, template: Any) -> None:
    """A format string of bounded length whose only field is a plain `{input}` (no `{input:>99999999}`, whose
    padding would make every prompt a hundred megabytes, no attribute or index lookups)."""
    if not isinstance(template, str) or len(template) > MAX_TEMPLATE_CHARS:
        raise DataError(f"{where}: template must be a text of at most {MAX_TEMPLATE_CHARS:,} characters, "
                        f"got {brief(template)}")
    if "{input}" not in template:
        raise DataError(f"{where}: template must contain '{{input}}'")
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise DataError(f"{where}: template is not a valid format string ({e})",
                        hint="write literal braces as '{{' and '}}'") from None
    if any(f != ("input", "", None) for f in fields):
        raise DataError(f"{where}: template must be a format string whose only field is '{{input}}', "
                        f"got {brief(template)}",
                        hint="write literal braces as '{{' and '}}'")


def _checked_labels(where: str, labels: Any) -> list[str]:
    """Distinct labels as texts (numbers are read as text, 4 as "4"): each non-empty, without surrounding spaces (an
    answer is matched stripped), of at most MAX_LABEL_CHARS; a label that reads as a number is finite."""
    if not isinstance(labels, list) or len(labels) > MAX_LABELS:
        raise DataError(f"{where}: labels must be a list of at most {MAX_LABELS} texts, got {brief(labels)}")
    out = []
    for x in labels:
        if (isinstance(x, int) and not isinstance(x, bool) and x.bit_length() <= 64) or isinstance(x, float):
            x = str(x)  # a non-finite float reads as "nan"/"inf": refused below
        if not isinstance(x, str) or not x.strip() or x != x.strip() or len(x) > MAX_LABEL_CHARS:
            raise DataError(f"{where}: each label must be a non-empty text of at most {MAX_LABEL_CHARS} characters "
                            f"without surrounding spaces, got {brief(x)}")
        if _number(x) is not None and not math.isfinite(_number(x)):
            raise DataError(f"{where}: label {brief(x)} is not a finite number")
        out.append(x)
    if len(set(out)) != len(out):
        raise DataError(f"{where}: labels must be distinct, got {brief(out)}")
    return out


def _number(text: str) -> float | None:
    """`text` as a float (as the metrics read a rating label), None if it is not one."""
    try:
        return float(text)
    except (ValueError, OverflowError):
        return None


def _checked_value_range(where: str, value_range: Any, labels: list[str]) -> tuple[float, float] | None:
    """None, or [lo, hi] of finite numbers with lo < hi (features divide by hi - lo) holding every numeric label."""
    if value_range is None:
        return None
    ok = isinstance(value_range, list | tuple) and len(value_range) == 2 and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value_range)
    lo, hi = (_finite(value_range[0]), _finite(value_range[1])) if ok else (None, None)
    if lo is None or hi is None or not lo < hi:
        raise DataError(f"{where}: value_range must be null or [low, high], two finite numbers with low < high, "
                        f"got {brief(value_range)}")
    outside = [x for x in labels if _number(x) is not None and not lo <= _number(x) <= hi]
    if outside:
        raise DataError(f"{where}: label {brief(outside[0])} is outside value_range [{lo:g}, {hi:g}]")
    return lo, hi


def _finite(v: int | float) -> float | None:
    try:
        f = float(v)
    except OverflowError:  # a 400-digit integer
        return None
    return f if math.isfinite(f) else None


def _checked_metrics(where: str, metrics: Any) -> list[str]:
    if not isinstance(metrics, list) or len(metrics) > MAX_METRICS or not all(
            isinstance(m, str) and m.strip() and len(m) <= MAX_NAME_CHARS for m in metrics):
        raise DataError(f"{where}: metrics must be a list of at most {MAX_METRICS} metric names "
                        f"(e.g. [\"mae\", \"rmse\"]), got {brief(metrics)}")
    return list(metrics)


def _check_input_fields(where: str, input_fields: Any) -> None:
    """{meta key: {"after": TEXT, "split": SEP or null, "ignore": [TEXT, ...]}}, with bounded keys and texts."""
    shape = f"{where}: input_fields maps a meta key to {{\"after\": TEXT, \"split\": SEP, \"ignore\": [TEXT]}}"
    if not isinstance(input_fields, dict) or len(input_fields) > MAX_INPUT_FIELDS:
        raise DataError(f"{shape} (at most {MAX_INPUT_FIELDS} keys), got {brief(input_fields)}")
    for key, rule in input_fields.items():
        if not (isinstance(key, str) and key.strip() and len(key) <= MAX_NAME_CHARS):
            raise DataError(f"{shape}: key {brief(key)} is not a name of at most {MAX_NAME_CHARS} characters")
        if not isinstance(rule, dict) or set(rule) - set(INPUT_FIELD_RULE_KEYS):
            raise DataError(f"{shape}: {key!r} is {brief(rule)}")
        after, sep, ignore = rule.get("after"), rule.get("split"), rule.get("ignore", [])
        if not (isinstance(after, str) and after and len(after) <= MAX_NAME_CHARS):
            raise DataError(f"{shape}: {key!r}'s \"after\" must be a non-empty text of at most {MAX_NAME_CHARS} "
                            f"characters, got {brief(after)}")
        if sep is not None and not (isinstance(sep, str) and len(sep) <= MAX_NAME_CHARS):
            raise DataError(f"{shape}: {key!r}'s \"split\" must be a text or null, got {brief(sep)}")
        if not (isinstance(ignore, list) and len(ignore) <= MAX_LABELS
                and all(isinstance(x, str) and len(x) <= MAX_LABEL_CHARS for x in ignore)):
            raise DataError(f"{shape}: {key!r}'s \"ignore\" must be a list of texts, got {brief(ignore)}")


def _check_count(where: str, name: str, value: Any, most: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= most:
        raise DataError(f"{where}: {name} must be a whole number from 0 to {most}, got {brief(value)}")


def card_hash(card: TaskCard) -> str:
    """16 hex digits of sha256 over the canonical JSON of what defines the text the model is trained on
    and answers from: the template, the examples shown, the diff characters shown (`diff_chars`, and
    `examples_diff_chars` where it applies), one-line answers, the query's input fields, and the kind and labels (a
    rating's label follows the prompt). The name, description and metrics do not count. A bundle records
    this per task (`manifest["cards"]`), so the app can say whether it answers with the prompt the
    bundle was trained on."""
    fields = {"template": card.template, "examples": card.examples, "diff_chars": card.diff_chars,
              "one_line": card.one_line, "input_fields": card.input_fields, "kind": card.kind, "labels": card.labels}
    if card.diff_chars:  # only a change-reading card shows examples' diffs (other cards' hashes stay as they were)
        fields["examples_diff_chars"] = card.example_diff_chars
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


FREE_CHAT = "chat"  # the pseudo-task: plain transcript, no task template, no task adapter
FREE_CHAT_NAMES = (FREE_CHAT, "free", "free chat")  # how a user may name it (`--task free`, the chat's picker)


def resolve_task(name: str, card: Callable[[str], TaskCard] | None = None) -> TaskCard | None:
    """A task as the user named it (`--task`, the chat's picker, `Session.answer(task=...)`), read once at
    the boundary: None for free chat (any of FREE_CHAT_NAMES), else the task's card through `card`, a name ->
    card lookup (`Session.card`: the store's, which knows the user's own cards too); by default the built-in
    cards alone, a former name giving today's card and an unknown one a UsageError naming the known tasks."""
    if name in FREE_CHAT_NAMES:
        return None
    if card is not None:
        return card(name)
    if canonical_task(name) not in builtin_cards():
        raise UsageError(f"unknown task {name[:70]!r}", hint=f"known tasks: {', '.join(builtin_cards())}")
    return builtin_card(name)


def canonical_task(name: str) -> str:
    """A task's current name (a former name, a built-in card's `aliases`, maps to it; any other name is returned
    as it is)."""
    return task_aliases().get(name, name)


@functools.cache
def task_aliases() -> dict[str, str]:
    """Former name -> current name, from the built-in cards."""
    return {alias: name for name in builtin_cards() for alias in _read_builtin(name).aliases}


def builtin_cards() -> list[str]:
    """Names of the task cards shipped with the package."""
    root = resources.files("p2p_local.data") / "cards"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".json"))


def builtin_card(name: str) -> TaskCard:
    """A shipped task card by name (a former name gives today's card)."""
    return _read_builtin(canonical_task(name))


def _read_builtin(name: str) -> TaskCard:
    res = resources.files("p2p_local.data") / "cards" / f"{name}.json"
    if not res.is_file():
        raise DataError(f"unknown task {name!r}", hint=f"known tasks: {', '.join(builtin_cards())}")
    return TaskCard.from_dict(json.loads(res.read_text(encoding="utf-8")))


def open_regular(path: Path, what: str, max_bytes: int) -> IO[bytes]:
    """`path` opened for reading if it is a regular file of at most `max_bytes`, else a DataError saying why.
    Why: a FIFO blocks the open itself, `/dev/zero` never ends and a folder fails deep inside a parser. The stat
    comes before the open, the open is non-blocking (a FIFO swapped in after the stat does not block it) and the
    opened file is checked again."""
    regular_file(path, what, max_bytes, DataError)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise DataError(f"cannot read {what} {path}: {e.strerror or e}", hint="check the path and its permissions") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise DataError(f"{what} {path} is not a regular file (a pipe, socket or device)",
                        hint="save it to a file first and pass that file")
    return os.fdopen(fd, "rb")


def read_users_jsonl(path: str | Path) -> list[User]:
    """All users of the file; a malformed line raises DataError naming the file and line number.
    Bounded: a regular file of at most MAX_USERS_FILE_BYTES, lines of at most MAX_LINE_BYTES, meta at most
    MAX_META_DEPTH deep, each user id once."""
    path = Path(path)
    users: list[tuple[int, User]] = []
    with open_regular(path, "users file", MAX_USERS_FILE_BYTES) as fh:  # bytes: a bad byte is told at its own line
        lineno, total = 0, 0
        while raw := fh.readline(MAX_LINE_BYTES + 1):
            lineno += 1
            total += len(raw)
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(f"{path}:{lineno}: line longer than {MAX_LINE_BYTES:,} bytes",
                                hint="a line holds one user; split a huge history into several files")
            if total > MAX_USERS_FILE_BYTES:  # grew since the check
                raise DataError(f"{path}: larger than {MAX_USERS_FILE_BYTES:,} bytes", hint="split it into smaller files")
            user = _user_line(path, lineno, raw)
            if user is not None:
                users.append((lineno, user))
    check_unique_users(path, users)  # after the lines' own errors: those are told first
    return [u for _, u in users]


def check_unique_users(path: Path, users: list[tuple[int, User]]) -> None:
    """Each user id on one line: a repeated id would count one user twice (and split their history)."""
    first_line: dict[str, int] = {}
    for lineno, user in users:
        if user.user_id in first_line:
            raise DataError(f"{path}:{lineno}: user {brief(user.user_id)} again (first on line "
                            f"{first_line[user.user_id]})", hint="give each user one line with all their items")
        first_line[user.user_id] = lineno


def _user_line(path: Path, lineno: int, raw: bytes) -> User | None:
    """One line of a users file (None for a blank one); any problem is a DataError at path:line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}:{lineno}: not UTF-8 text", hint="re-save the file as UTF-8") from None
    if not line.strip():
        return None
    try:
        return User.from_dict(json.loads(line))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise DataError(f"{path}:{lineno}: JSON nested too deeply",
                        hint=f"an item's meta is at most {MAX_META_DEPTH} levels deep") from None
    except ValueError as e:  # the format's rules; an integer past Python's 4300-digit limit
        raise DataError(f"{path}:{lineno}: {e}", hint="see docs/DATA.md for the format") from None


def check_outputs(card: TaskCard, users: Iterable[User], source: str) -> None:
    """Every output of a rating/label task is one of the card's labels (exactly: the metrics compare them as
    they are), else a DataError naming the user and item. Checked before a run, not found after it."""
    if not card.labelled:
        return
    labels = set(card.labels)
    for user in users:
        for i, it in enumerate(user.items):
            if it.output not in labels:
                raise DataError(f"{source}: user {brief(user.user_id)}, item {i} in time order ({brief(it.input)}): "
                                f"output {brief(it.output)} is not one of the card's labels "
                                f"({', '.join(card.labels[:10])})",
                                hint="fix the output or the card's \"labels\"")


def write_users_jsonl(path: str | Path, users: Iterable[User]) -> int:
    """Write users (atomically: `files.atomic_open`). Returns the number written."""
    n = 0
    with atomic_open(path, 0o644, binary=False) as fh:
        for u in users:
            fh.write(json.dumps(u.to_dict(), ensure_ascii=False) + "\n")
            n += 1
    return n
