"""The generic per-user format every task is converted into, and the task card that describes a task.

Users file (JSONL, one user per line, items in time order):
    {"user_id": "42", "items": [{"input": "...", "output": "...", "time": 964982703.0, "meta": {...}}]}

Task card (JSON): what the model is asked (`template` with `{input}`), what kind of answer
(`rating` | `label` | `generation`), the allowed labels, the metrics and a one-sentence description
used in the profile wrapper. See docs/DATA.md.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from p2p_local.errors import DataError, UsageError
from p2p_local.files import atomic_open, atomic_write

KINDS = ("rating", "label", "generation")
LABELLED_KINDS = ("rating", "label")  # kinds answered by one of the card's labels (a distribution over them)
MAX_SAMPLES, MAX_SAMPLE_CHARS = 8, 2000  # a card's `samples`: a few short inputs, not a data set
SPLITS_BY = ("users", "repository")  # a card's `split`: how the lab's prepared data holds users out
# Card fields no cached result depends on (example inputs; the split rule, whose effect the data's own hash
# carries): `keyed_dict` leaves them out, so results keyed before these fields existed stay valid.
UNKEYED_FIELDS = ("samples", "split")


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
        meta = d.get("meta") or {}
        if not isinstance(meta, dict):
            raise ValueError("item field 'meta' must be an object")
        return cls(d["input"], d["output"], None if t is None else float(t), meta)


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
    # (commit subjects: reports/commit-subject-*.md). 0: the query alone.
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

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DataError(f"task card {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if "{input}" not in self.template:
            raise DataError(f"task card {self.name!r}: template must contain '{{input}}'")
        try:
            self.template.format(input="x")
        except (KeyError, IndexError, ValueError) as e:
            raise DataError(
                f"task card {self.name!r}: template is not a valid format string ({e})",
                hint="write literal braces as '{{' and '}}'",
            ) from None
        if self.labelled and not self.labels:
            raise DataError(f"task card {self.name!r}: a {self.kind} task needs 'labels'")
        if self.value_range is not None:
            self.value_range = (float(self.value_range[0]), float(self.value_range[1]))
        self.labels = [str(x) for x in self.labels]
        self.metrics = list(self.metrics)
        if not isinstance(self.input_fields, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("after"), str) and v["after"] for v in self.input_fields.values()
        ):
            raise DataError(f"task card {self.name!r}: input_fields maps a meta key to {{\"after\": TEXT, \"split\": SEP}}")
        if isinstance(self.examples, bool) or not isinstance(self.examples, int) or not 0 <= self.examples <= 8:
            raise DataError(f"task card {self.name!r}: examples must be a whole number from 0 to 8")
        if isinstance(self.diff_chars, bool) or not isinstance(self.diff_chars, int) or not 0 <= self.diff_chars <= 2000:
            raise DataError(f"task card {self.name!r}: diff_chars must be a whole number from 0 to 2000")
        if self.examples_diff_chars is not None and (isinstance(self.examples_diff_chars, bool) or not isinstance(
                self.examples_diff_chars, int) or not 0 <= self.examples_diff_chars <= 2000):
            raise DataError(f"task card {self.name!r}: examples_diff_chars must be a whole number from 0 to 2000")
        if not isinstance(self.samples, list) or len(self.samples) > MAX_SAMPLES or not all(
                isinstance(x, str) and x.strip() and len(x) <= MAX_SAMPLE_CHARS for x in self.samples):
            raise DataError(f"task card {self.name!r}: samples must be a list of at most {MAX_SAMPLES} non-empty "
                            f"texts of at most {MAX_SAMPLE_CHARS} characters")
        if self.split not in SPLITS_BY:
            raise DataError(f"task card {self.name!r}: split must be one of {SPLITS_BY}, got {self.split!r}")
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
    def from_dict(cls, d: dict[str, Any]) -> TaskCard:
        known = set(cls.__dataclass_fields__)
        missing = {"name", "kind", "template", "description"} - set(d)
        if missing:
            raise DataError(f"task card lacks fields: {sorted(missing)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def load(cls, path: str | Path) -> TaskCard:
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"task card not found: {path}", hint="check the path of the task card JSON") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"task card {path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise DataError(f"task card {path} must be a JSON object")
        return cls.from_dict(d)

    def save(self, path: str | Path) -> None:
        atomic_write(path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")


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


# Former names of built-in tasks, still accepted wherever a task is named (stored profiles, bundles, files).
TASK_ALIASES = {"pytest-commit-subject": "commit-subject"}  # a developer's commit subject, not pytest's


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
    """A task's current name (a former name maps to it; any other name is returned as it is)."""
    return TASK_ALIASES.get(name, name)


def builtin_cards() -> list[str]:
    """Names of the task cards shipped with the package."""
    root = resources.files("p2p_local.data") / "cards"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".json"))


def builtin_card(name: str) -> TaskCard:
    """A shipped task card by name (`movielens-rating`, ...; a former name gives today's card)."""
    name = canonical_task(name)
    res = resources.files("p2p_local.data") / "cards" / f"{name}.json"
    if not res.is_file():
        raise DataError(f"unknown task {name!r}", hint=f"known tasks: {', '.join(builtin_cards())}")
    return TaskCard.from_dict(json.loads(res.read_text(encoding="utf-8")))


def read_users_jsonl(path: str | Path) -> list[User]:
    """All users of the file; a malformed line raises DataError naming the file and line number."""
    path = Path(path)
    try:
        fh = path.open("rb")  # bytes: decode line by line so a bad byte is reported at its own line
    except FileNotFoundError:
        raise DataError(f"users file not found: {path}", hint="check the path of the users JSONL") from None
    users = []
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{lineno}: not UTF-8 text", hint="re-save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                users.append(User.from_dict(json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            except ValueError as e:
                raise DataError(f"{path}:{lineno}: {e}", hint="see docs/DATA.md for the format") from None
    return users


def write_users_jsonl(path: str | Path, users: Iterable[User]) -> int:
    """Write users (atomically: `files.atomic_open`). Returns the number written."""
    n = 0
    with atomic_open(path, 0o644, binary=False) as fh:
        for u in users:
            fh.write(json.dumps(u.to_dict(), ensure_ascii=False) + "\n")
            n += 1
    return n
