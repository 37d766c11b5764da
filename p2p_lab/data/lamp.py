"""Import the LaMP benchmark's JSON layout into the generic per-user format.

LaMP ships, per task and split, a questions file and an outputs file:
    questions: [{"id": "310", "input": "<instruction> ... <text>", "profile": [{"id": ..., <fields>}, ...]}]
    outputs:   {"task": "LaMP_3", "golds": [{"id": "310", "output": "4"}]}
Each question becomes one `User` (LaMP gives no user ids across questions): the profile items in time
order (by their `date` when every item has one, else as listed), then the question itself as the last
item (meta {"lamp_id": ..., "query": true}), so `splits.samples(user, last_n=1)` yields LaMP's sample.
The question's fixed instruction prefix is stripped so the query reads like the profile items;
the task card's template supplies the instruction instead.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from p2p_local.data.format import Item, TaskCard, User, time_ordered
from p2p_local.errors import DataError

# Profile item -> (input field, output field), per LaMP task.
PROFILE_FIELDS: dict[int, tuple[str, str]] = {
    1: ("abstract", "title"),  # the author's papers (the query is a choice between two references)
    2: ("description", "tag"),  # movie descriptions and the user's tags
    3: ("text", "score"),  # product reviews and their scores
    4: ("text", "title"),  # news articles and their headlines
    5: ("abstract", "title"),  # paper abstracts and their titles
    6: ("text", "title"),  # emails and their subjects
    7: ("", "text"),  # tweets (no input side)
}

# The instruction LaMP puts in front of each question's text (everything up to and including it is cut).
PREFIXES: dict[int, re.Pattern[str]] = {
    2: re.compile(r"^.*?description:\s*", re.S),
    3: re.compile(r"^.*?review:\s*", re.S),
    4: re.compile(r"^Generate a headline for the following article:\s*", re.S),
    5: re.compile(r"^Generate a title for the following abstract of a paper:\s*", re.S),
    6: re.compile(r"^Generate a subject for the following email:\s*", re.S),
    7: re.compile(r"^Paraphrase the following tweet without any explanation before or after it:\s*", re.S),
}

LAMP2_TAGS = [
    "sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy",
    "classic", "psychology", "fantasy", "romance", "thought-provoking", "social commentary",
    "violence", "true story",
]  # fmt: skip

_CARDS: dict[int, dict[str, Any]] = {
    1: {"kind": "label", "labels": ["[1]", "[2]"], "metrics": ["accuracy", "f1_macro"],
        "template": "{input}\nAnswer: ", "description": "which paper this author would cite."},
    2: {"kind": "label", "labels": LAMP2_TAGS, "metrics": ["accuracy", "f1_macro"],
        "template": "Movie: {input}\nTag: ", "description": "which tag this user gives a movie."},
    3: {"kind": "rating", "labels": ["1", "2", "3", "4", "5"], "value_range": [1, 5],
        "metrics": ["mae", "rmse"], "template": "Review: {input}\nScore (1-5): ",
        "description": "the score (1-5) this user gives a product in a review."},
    4: {"kind": "generation", "metrics": ["rouge1", "rougeL"], "template": "Article:\n{input}\nHeadline:\n",
        "description": "how this journalist writes news headlines."},
    5: {"kind": "generation", "metrics": ["rouge1", "rougeL"], "template": "Abstract:\n{input}\nTitle:\n",
        "description": "how this scholar titles papers."},
    6: {"kind": "generation", "metrics": ["rouge1", "rougeL"], "template": "Email:\n{input}\nSubject:\n",
        "description": "how this user writes email subjects."},
    7: {"kind": "generation", "metrics": ["rouge1", "rougeL"], "template": "Tweet:\n{input}\nParaphrase:\n",
        "description": "how this user phrases tweets."},
}  # fmt: skip


def task_number(task: str | int) -> int:
    """'LaMP_3', 'LaMP-3', 'lamp3', 3 -> 3."""
    m = re.fullmatch(r"(?i)(?:lamp[-_ ]?)?([1-7])", str(task).strip())
    if not m:
        raise DataError(f"unknown LaMP task {task!r}", hint="LaMP tasks are LaMP_1 .. LaMP_7")
    return int(m.group(1))


def lamp_card(task: str | int) -> TaskCard:
    n = task_number(task)
    return TaskCard(name=f"lamp-{n}", **_CARDS[n])


def _load_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"LaMP file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"LaMP file {path} is not valid UTF-8 JSON: {e}") from None


def _time(d: dict[str, Any]) -> float | None:
    raw = d.get("date")
    if raw is None or raw == "":
        return None
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        return float(raw)
    try:
        return datetime.fromisoformat(str(raw)).timestamp()
    except ValueError:
        return None


def import_lamp(
    questions_path: str | Path, outputs_path: str | Path | None = None, task: str | int | None = None
) -> tuple[TaskCard, list[User]]:
    """Read a LaMP questions (+ outputs) pair. `task` is read from the outputs file when not given.

    Questions without a gold output (LaMP's hidden test sets) keep output "" and meta {"gold": false}.
    """
    questions = _load_json(Path(questions_path))
    outputs = _load_json(Path(outputs_path)) if outputs_path is not None else None
    if task is None:
        if not isinstance(outputs, dict) or "task" not in outputs:
            raise DataError("cannot tell the LaMP task", hint="pass task='LaMP_3' (or the outputs file)")
        task = outputs["task"]
    n = task_number(task)
    if not isinstance(questions, list):
        raise DataError(f"{questions_path}: expected a JSON list of questions")
    golds: dict[str, str] = {}
    if outputs is not None:
        if not isinstance(outputs, dict) or not isinstance(outputs.get("golds"), list):
            raise DataError(f"{outputs_path}: expected {{'task': ..., 'golds': [...]}}")
        golds = {
            str(g["id"]): str(g["output"]) for g in outputs["golds"] if isinstance(g, dict) and "id" in g
        }
    in_field, out_field = PROFILE_FIELDS[n]
    users = []
    for qi, q in enumerate(questions):
        if not isinstance(q, dict) or "id" not in q or not isinstance(q.get("input"), str):
            raise DataError(f"{questions_path}: question #{qi} lacks 'id' or 'input'")
        qid = str(q["id"])
        history = []
        for p in q.get("profile") or []:
            if not isinstance(p, dict):
                continue
            inp = str(p.get(in_field, "")) if in_field else ""
            out = str(p.get(out_field, ""))
            history.append(Item(inp, out, _time(p), {"lamp_id": str(p.get("id", ""))}))
        history = time_ordered(history)
        text = q["input"]
        if n in PREFIXES:
            text = PREFIXES[n].sub("", text, count=1)
        meta: dict[str, Any] = {"lamp_id": qid, "query": True}
        if qid not in golds:
            meta["gold"] = False
        # The query is the newest item: it goes last whatever the profile dates say.
        t = None if any(it.time is None for it in history) else max((it.time for it in history), default=None)
        users.append(User(qid, history + [Item(text, golds.get(qid, ""), t, meta)]))
    return lamp_card(n), users
