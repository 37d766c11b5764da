"""The one route from what a user typed to an answer: card + history + text -> profile -> adapter -> answer.

The app (`Session`: `p2p ask`, `p2p personalize`, the chat), the evaluation (`p2p_lab.eval`) and the
trainer's sample builder (`trainer.samples`) call these functions and nothing else for these steps, so a
figure measured in the evaluation is a figure of what the user runs (tests/test_pipeline_parity.py):

1. `query_item(card, text)`       the query as the task card reads the typed text (a movie's genres...)
2. `history_item(card, ...)`      a stored item, its metadata completed by the same card rules
3. `make_profile(card, history, query)`   summary, retrieval, encoder text, features (profile.py)
4. `Personalizer`                 profile -> encoder -> hypernetwork -> adapter tensors -> GGUF file
5. the answer: `task_prompt`, then `label_scores` + `decode_label` (rating/label tasks: read off the
   distribution over the labels, never free text) or `generation_settings` + `finish_text`.

The nouns: a `Request` (card, history, typed text) goes through `Route.answer` and comes back an `Answer`
(the streamed text, finished; the label distribution; the `Personalization` it was answered with: profile,
adapter tensors, adapter file, scale; timings). Every entry point calls `Route.answer`: the app through
`Session` (personalize.py: store reads, the adapter cache, the lock), the evaluation through its methods,
which override only the step a control changes (its prompt, its profile or its adapter).
"""

from __future__ import annotations

import functools
import math
import re
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from p2p_local.adapter import BaseInfo, write_adapter
from p2p_local.bundle import Bundle
from p2p_local.data.format import FREE_CHAT, Item, TaskCard
from p2p_local.diffs import compact_diff, looks_like_diff, shown
from p2p_local.encoder import Encoder
from p2p_local.errors import AdapterError, DataError
from p2p_local.profile import MAX_SUMMARY_ITEMS, Profile, build_profile

Tensors = dict[str, tuple[np.ndarray, np.ndarray]]

HISTORY_READ = MAX_SUMMARY_ITEMS  # the newest items a profile reads; older ones only count

# The decoding rules (one place: the app and the evaluation answer alike).
RATING_DECODING = "median"  # ratings: the median of the label distribution (MAE-optimal); labels: argmax
ONE_LINE_TOKENS = 32  # one-line generation (commit subjects) stops at the newline, or here
MULTI_LINE_RATIO = 1.5  # multi-line generation (rewrites): room for 1.5x the input's tokens...
MULTI_LINE_MIN_TOKENS = 32  # ...but at least this many
CHAT_TOKENS = 160  # free chat
CHAT_TURNS = 6  # transcript turns kept in a free-chat prompt
CHAT_STOP = ("\nUser:", "\n\n\n")
PROMPT_SLACK = 4  # tokens kept free beside the answer (token counts are not additive at joins)


# --- 1-3: items and the profile -------------------------------------------------------------------
def query_item(card: TaskCard, text: str) -> Item:
    """The query a user typed, as the card reads it: no output, metadata parsed from the text. A diff asked
    of a task that reads changes (`card.diff_chars`: commit subjects) becomes the commit being written:
    its files line in the training items' format (`gitlog.commit_query`) and its compact diff
    (`diffs.compact_diff`, the rule of every entry point) as `meta["diff"]`."""
    if card.diff_chars and looks_like_diff(text):
        from p2p_local.gitlog import commit_query

        d = compact_diff(text)
        return Item(commit_query(d.files), "", None, {"diff": d.text, "diff_total": d.chars_total})
    return Item(text, "", None, card.input_meta(text))


def served_query(card: TaskCard, item: Item) -> Item:
    """A held-out item as the app receives its query: a change-reading task is asked at commit time (the
    hook, `git diff --cached | p2p ask -`), when the change exists and its message body does not yet, so
    the query is the files line and the diff alone. Any other item is itself."""
    if not card.diff_chars or "\n" not in item.input:
        return item
    return Item(item.input.split("\n", 1)[0], item.output, item.time, item.meta)


def prompt_input(card: TaskCard, item: Item, example: bool = False) -> str:
    """What the prompt shows of an item (the query, or an `example`): its input, then (a task that reads
    changes) the first `card.diff_chars` (an example: `card.example_diff_chars`) characters of its compact
    diff, whole lines."""
    chars = card.example_diff_chars if example else card.diff_chars
    diff = shown(item.meta.get("diff") or "", chars) if card.diff_chars and chars else ""
    return f"{item.input}\n{diff}" if diff else item.input


def what_was_read(card: TaskCard, item: Item) -> dict[str, Any] | None:
    """What a change-reading answer read of the change (never cut silently): files named of all, diff
    characters shown of the whole compact diff. None for a task that reads no change."""
    if not card.diff_chars:
        return None
    from p2p_local.gitlog import files_shown

    diff = item.meta.get("diff") or ""
    named, total = files_shown(item.input)
    return {"files": named, "files_total": total, "diff_chars": len(shown(diff, card.diff_chars)),
            "diff_chars_total": int(item.meta.get("diff_total") or len(diff))}


def history_item(card: TaskCard, input: str, output: str, time: float | None = None,
                 meta: dict[str, Any] | None = None) -> Item:
    """A stored item in the per-user format; the card's input fields fill what the text carries."""
    return Item(input, output, time, {**(meta or {}), **card.input_meta(input)})


def make_profile(card: TaskCard, history: list[Item], query: Item | None = None,
                 n_total: int | None = None) -> Profile:
    """The profile for `query` from `history` (strictly earlier items, time order). The query's output
    is blanked and its metadata read from its text, so nothing downstream can see the answer."""
    q = None if query is None else Item(query.input, "", query.time, {**query.meta, **card.input_meta(query.input)})
    return build_profile(card, history, q, n_total=n_total)


# --- 4: profile -> adapter -------------------------------------------------------------------------
def pool_embeddings(vectors: np.ndarray) -> np.ndarray:
    """Per-item vectors [n, E] -> the profile embedding [1, E]: their mean (float64, in order), L2-normalised."""
    v = np.asarray(vectors, dtype=np.float64).mean(axis=0)
    return (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32)[None]


def profile_embedding(encoder: Encoder, profile: Profile) -> np.ndarray:
    """The profile's embedding [1, E]: each pooled item (profile.item_texts) embedded alone, then pooled.
    The trainer embeds each item once and pools the same way (trainer/samples.py), bit for bit."""
    return pool_embeddings(encoder.embed_each(profile.item_texts))


class Personalizer:
    """Profile -> LoRA tensors -> GGUF adapter, one forward pass. Checks bundle/base/encoder agree up front."""

    def __init__(self, bundle: Bundle, encoder: Encoder, base: BaseInfo) -> None:
        bundle.check(base, encoder)
        self.bundle, self.encoder, self.base = bundle, encoder, base

    def tensors(self, profile: Profile) -> tuple[Tensors, dict[str, float]]:
        t0 = time.perf_counter()
        emb = profile_embedding(self.encoder, profile)
        t1 = time.perf_counter()
        tensors = self.tensors_from(emb, profile.features[None])
        t2 = time.perf_counter()
        return tensors, {"encode_ms": (t1 - t0) * 1e3, "hypernet_ms": (t2 - t1) * 1e3}

    def tensors_from(self, embedding: np.ndarray, features: np.ndarray) -> Tensors:
        """One adapter from one (embedding [1, E], features [1, F]) pair (controls feed their own)."""
        (tensors,) = self.bundle.generate(embedding, np.asarray(features, dtype=np.float32))
        return tensors

    def write_tensors(self, tensors: Tensors, path: Path, fingerprint: str, card: TaskCard | None = None) -> None:
        """The GGUF adapter; with the task card it names its task and prompt for llama.cpp's tools."""
        named = {"task_name": card.name, "prompt_prefix": card.prefix} if card else {}
        write_adapter(path, tensors, alpha=self.bundle.alpha, base=self.base, dtype="f16",
                      generator=f"p2p-local/{self.bundle.name}", profile_fingerprint=fingerprint, **named)


# --- the strength control ---------------------------------------------------------------------------
# llama.cpp's LoRA scale saturates early: on the demo user's ratings the answer distribution's distance
# from the base reaches ~40% of its x1 value by scale 0.03 and ~85% by 0.1 (`p2p bench strength`). So
# below x1 the user's strength maps log-linearly onto [STRENGTH_FLOOR, 1] (x0.25 -> 0.032, x0.5 -> 0.1,
# x0.75 -> 0.32) and x1 is the trained adapter exactly. Above x1 the effect grows slowly too (scale 2
# moved no median rating of the demo queries, 3 moved three of eight), so the scale rises twice as fast
# as the strength (x1.5 -> 2, x2 -> 3; at 4 rewrites turned to noise).
STRENGTH_FLOOR = 0.01
# A profile without items of the task gets the hypernetwork's population adapter, what it was trained to make of
# an empty history; stronger than x1 it is noise with nothing personal in it, so the route answers from the base.
EMPTY_MAX_STRENGTH = 1.0


def lora_scale(strength: float) -> float:
    """The llama.cpp LoRA scale of a user strength (0 = the base model, 1 = the trained adapter)."""
    if strength <= 0:
        return 0.0
    if strength >= 1:
        return 2.0 * strength - 1.0
    return STRENGTH_FLOOR ** (1.0 - strength)


# --- 5: the answer ---------------------------------------------------------------------------------
def answer_tokens(engine: Any, card: TaskCard, text: str) -> int:
    """Tokens an answer may take: one label token, or the generation budget of the card's kind."""
    if card.labelled:
        return 1
    if card.one_line:
        return ONE_LINE_TOKENS
    return max(MULTI_LINE_MIN_TOKENS, math.ceil(MULTI_LINE_RATIO * len(engine.tokenize(text, add_bos=False))))


def cut_tokens(engine: Any, text: str, n: int) -> str:
    """The first `n` tokens of `text` (all of it when shorter)."""
    if n <= 0:
        return ""
    toks = engine.tokenize(text, add_bos=False)
    return engine.detokenize(toks[:n]) if len(toks) > n else text


EXAMPLE_SEP = "\n\n"  # between the examples and the query


def render_items(card: TaskCard, items: Sequence[Item]) -> list[str]:
    """History items as examples in the task's own template, one string per item.

    Why not profile.render_history ("Input: .. Output: .." lines): a pretrained base model continues
    the pattern it sees, and with a second format in the prompt it answered commit queries
    with "Input: files: ..." (measured); examples in the query's own format are the strong baseline.
    """
    return [card.prompt(prompt_input(card, it, example=True)) + it.output for it in items]


def examples(card: TaskCard | None, profile: Profile | None) -> list[str]:
    """The card's `examples`: the history items retrieved for the query, rendered, best last (nearest the
    query, so it is the last dropped when the context is short). None without a profile (the base model)."""
    if card is None or profile is None or not card.examples:
        return []
    return render_items(card, list(reversed(list(profile.retrieved)[: card.examples])))


def fit_prompt(engine: Any, card: TaskCard, text: str, header: str = "", shots: Sequence[str] = (),
               reserve: int | None = None) -> tuple[str, int]:
    """`header` + shots + the card's prompt around `text` (blank lines between), within the context less
    `reserve` tokens (default: the answer's budget). Shots are dropped from the FRONT (put the least
    important first), then the header, and last the head of the input is kept. Returns (prompt, shots kept)."""
    budget = engine.n_ctx - (answer_tokens(engine, card, text) if reserve is None else reserve) - PROMPT_SLACK
    query_prompt = card.prompt(text)
    n_query = len(engine.tokenize(query_prompt))
    if n_query > budget:  # the query alone does not fit: keep the head of its input
        n_input = len(engine.tokenize(text, add_bos=False))
        query_prompt = card.prompt(cut_tokens(engine, text, max(8, n_input - (n_query - budget))))
        n_query = len(engine.tokenize(query_prompt))
    if not header and not shots:
        return query_prompt, 0
    room = budget - n_query - 2
    if header:
        limit = room // 2 if shots else room  # a long summary must not starve the examples
        header = cut_tokens(engine, header, max(0, limit - 1))
        room -= len(engine.tokenize(header + EXAMPLE_SEP, add_bos=False)) if header else 0
    kept: list[str] = []
    for shot in reversed(shots):  # keep from the back (most important last) while they fit
        n = len(engine.tokenize(shot + EXAMPLE_SEP, add_bos=False))
        if n > room:
            break
        kept.insert(0, shot)
        room -= n
    while True:
        prompt = EXAMPLE_SEP.join([p for p in [header, *kept] if p] + [query_prompt])
        if len(engine.tokenize(prompt)) <= budget or not (kept or header):
            return prompt, len(kept)
        if kept:  # token counts are not exactly additive at the joins
            kept.pop(0)
        else:
            header = ""


def task_prompt(engine: Any, card: TaskCard, text: str, shots: Sequence[str] = ()) -> str:
    """The card's prompt around `text`, after `shots` (examples), fitted to the context."""
    return fit_prompt(engine, card, text, "", shots)[0]


def chat_prompt(text: str, transcript: Sequence[tuple[str, str]] = (), about: str = "") -> str:
    """Free chat for a base model with no chat template: what is known of the user, then a transcript."""
    head = f"About the user: {about}\n" if about else ""
    turns = "".join(f"{'User' if role == 'user' else 'Assistant'}: {content}\n"
                    for role, content in list(transcript)[-CHAT_TURNS:])
    return f"{head}{turns}User: {text}\nAssistant:"


CHAT_SYSTEM = "You are a helpful assistant. Answer briefly."


def chat_messages(text: str, transcript: Sequence[tuple[str, str]] = (), about: str = "") -> list[dict[str, str]]:
    """Free chat for an instruct model (its own chat template applies them): what is known of the user as
    the system prompt, the last turns, the new message."""
    system = CHAT_SYSTEM + (f" About the user: {about}" if about else "")
    turns = [{"role": "user" if role == "user" else "assistant", "content": content}
             for role, content in list(transcript)[-CHAT_TURNS:]]
    return [{"role": "system", "content": system}, *turns, {"role": "user", "content": text}]


def label_token_ids(engine: Any, labels: Sequence[str]) -> list[int]:
    """Each label's first token. Labels must not share one, or the distribution would be ambiguous."""
    ids = [engine.tokenize(label, add_bos=False)[0] for label in labels]
    if len(set(ids)) != len(ids):
        raise DataError(f"labels {list(labels)} share a first token; the label distribution would be ambiguous",
                        hint="use labels that start with distinct tokens (e.g. digits or distinct words)")
    return ids


def label_scores(engine: Any, prompt: str, ids: Sequence[int]) -> dict[str, Any]:
    """The model's log-distribution over the labels (first tokens `ids`) under whatever adapter is attached.

    `mass`: probability on the labels; `unparseable`: the most likely next token of the whole
    vocabulary is no label (what free-text decoding would have got wrong).
    """
    logits = engine.last_logits(prompt).astype(np.float64)
    full = logits - _logsumexp(logits)
    sel = full[list(ids)]
    return {"lp": sel - _logsumexp(sel), "mass": float(np.exp(sel).sum()),
            "unparseable": int(np.argmax(logits)) not in set(ids)}


def _logsumexp(x: np.ndarray) -> float:
    m = float(np.max(x))
    return m + math.log(float(np.exp(x - m).sum()))


def median_index(p: np.ndarray) -> int:
    """The first label whose cumulative probability reaches 1/2: the median of an ordinal distribution
    (the tolerance keeps an exact half, summed in floating point, on the lower label)."""
    p = np.asarray(p, dtype=np.float64)
    return int(np.searchsorted(np.cumsum(p / p.sum()), 0.5 - 1e-9))


def decode_distribution(card: TaskCard, probs: np.ndarray, how: str = "argmax") -> list[str]:
    """Label probabilities [n, len(labels)] -> labels. `median` is the MAE-optimal choice for ratings,
    `mean` rounds the expected value (halves up), `argmax` takes the most likely label."""
    p = np.asarray(probs, dtype=np.float64)
    p = p / p.sum(axis=1, keepdims=True)
    if how == "argmax":
        return [card.labels[i] for i in p.argmax(axis=1)]
    if how == "median":
        return [card.labels[median_index(row)] for row in p]
    if how == "mean":
        try:
            numeric = {lab: float(lab) for lab in card.labels}
        except ValueError:
            raise DataError("decode 'mean' needs numeric labels") from None
        ev = p @ np.array(list(numeric.values()))
        return [min(numeric, key=lambda lab, e=e: (abs(numeric[lab] - e), -numeric[lab])) for e in ev]
    raise DataError(f"unknown decoding {how!r}", hint="argmax, median or mean")


def decode_label(card: TaskCard, lp: Sequence[float]) -> str:
    """The answer of a rating/label task from its label log-probabilities (the one decoding rule)."""
    how = RATING_DECODING if card.kind == "rating" else "argmax"
    return decode_distribution(card, np.exp(np.asarray(lp, dtype=np.float64))[None], how)[0]


def stop_strings(card: TaskCard | None) -> list[str]:
    """Where a generated answer of this card ends (the app, the evaluation and the exported adapter's
    llama.cpp / Ollama usage alike): one-line tasks at the newline; multi-line ones where a new example
    would begin (the template's first line) or at two blank lines; free chat at the next turn."""
    if card is None:
        return list(CHAT_STOP)
    if card.one_line:
        return ["\n"]
    head = card.prefix.strip().splitlines()
    return (["\n" + head[0]] if head and head[0] else []) + ["\n\n\n"]


def generation_settings(engine: Any, card: TaskCard | None, text: str) -> dict[str, Any]:
    """max_tokens and stop strings of a generated answer (greedy in the evaluation and by default)."""
    if card is None:
        return {"max_tokens": CHAT_TOKENS, "stop": stop_strings(None)}
    return {"max_tokens": answer_tokens(engine, card, text), "stop": stop_strings(card)}


# A small base model can loop ("I'm sorry for the late notice." five times over): the answer ends at
# the first verbatim repeat of a sentence or line, or when its tail is one chunk three times over.
REPEAT_MIN_CHARS = 12  # shorter units repeat legitimately ("Thanks.", "- ok")
_UNIT = re.compile(r"[^.!?\n]*(?:[.!?]+|\n)")  # a sentence or a line, with its end
# How an answer was cut, marked the same way wherever it is shown (the chat, `p2p ask`, the exported Markdown),
# never part of the stored text: "length" its token budget, "repeat" the guard below (it started over),
# "stopped" the user (Esc / Ctrl-C). `Answer.finish_reason` "stop" is an answer that ended by itself: no mark.
CUT_MARKS = {"length": " […]", "repeat": " [… it began repeating itself]", "stopped": " [… stopped]"}
CUT_NOTES = {"length": "cut at its token budget", "repeat": "cut where it began repeating itself",
             "stopped": "stopped before it was done"}
CUT_MARK = CUT_MARKS["length"]


def cut_mark(reason: str | None) -> str:
    """The mark shown after an answer cut for `reason` (a `CUT_MARKS` key, or a `finish_reason`); "" if uncut."""
    return CUT_MARKS.get(reason or "", "")


def _norm(unit: str) -> str:
    return " ".join(unit.split()).lower()


def repeat_scan(text: str) -> tuple[int | None, int]:
    """(where a looping answer should end, else None; how much of `text` may be shown now). A sentence
    repeats when an earlier one ends with it; a trailing unfinished sentence that could be such a repeat
    is held back until it is decided."""
    seen: set[str] = set()
    end = 0
    for m in _UNIT.finditer(text):
        unit = _norm(m.group())
        if len(unit) >= REPEAT_MIN_CHARS:
            if any(u.endswith(unit) for u in seen):  # "Hi, I'm sorry." then "I'm sorry." repeats too
                return m.start(), m.start()
            seen.add(unit)
        end = m.end()
    n = len(text)
    for p in range(REPEAT_MIN_CHARS, n // 3 + 1):
        if text[n - p:] == text[n - 2 * p:n - p] == text[n - 3 * p:n - 2 * p]:
            return n - 2 * p, n - 2 * p
    tail = _norm(text[end:])
    if tail and any(tail in u for u in seen):
        return None, end
    return None, n


class GuardedStream:
    """A generated answer's pieces, ended well: cut at the first repeat (`repeat_scan`). After iteration
    `finish` says how it ended: "stop" (a stop rule or end of text), "repeat" (the guard) or "length"
    (its token budget: the app shows `CUT_MARK`). Closing it closes (cancels) the generation."""

    def __init__(self, engine: Any, pieces: Iterator[str]) -> None:
        self.engine, self.pieces, self.finish = engine, pieces, None

    def __iter__(self) -> Iterator[str]:
        text, shown = "", 0
        try:
            for piece in self.pieces:
                text += piece
                cut, safe = repeat_scan(text)
                if safe > shown:
                    yield text[shown:safe]
                    shown = safe
                if cut is not None:
                    self.finish = "repeat"
                    return
            self.finish = getattr(self.engine, "last_finish", None) or "stop"
            if len(text) > shown and self.finish == "length":
                self.finish = "repeat"  # the budget cut a sentence that was starting over: drop it
            elif len(text) > shown:
                yield text[shown:]
        finally:
            close = getattr(self.pieces, "close", None)
            if close is not None:
                close()


# --- one-line answers: proposals, and no parroting ----------------------------------------------------
# A small base model shown the user's earlier lines tends to repeat one of them word for word (39% of commit
# answers did, against 2.2% of the authors' own subjects). A one-line answer is therefore chosen among
# greedy lines from the CANDIDATE_BRANCHES most likely first tokens: the greedy line first, except that
# a line equal (case- and whitespace-insensitively) to one of the user's earlier outputs goes below every
# other line whose mean token log-probability is within COPY_MARGIN of it. The proposals (`--candidates`)
# are the same list. Both constants were chosen by measurement (reports/commit-anticopy.md).
CANDIDATE_BRANCHES = 4
COPY_MARGIN = 1.0  # nats per token


@dataclass
class Candidate:
    """One proposed line: its text, mean token log-probability, and whether it repeats an earlier output."""

    text: str
    logprob: float
    copy: bool = False
    branch: int = 0  # its first token's rank (0: the greedy line)


def copy_key(text: str) -> str:
    """The form two outputs are compared in for copying: case- and whitespace-insensitive."""
    return _norm(text)


def demoted(c: Candidate, cands: list[Candidate], margin: float = COPY_MARGIN) -> bool:
    """Whether the copy rule moves `c` down: it repeats an earlier output and another line scores within `margin`."""
    return c.copy and any(not d.copy and d.logprob >= c.logprob - margin for d in cands)


def rank_candidates(cands: list[Candidate], margin: float = COPY_MARGIN) -> list[Candidate]:
    """Branch order (greedy line first), a copy moved below the others when one of them scores within `margin`."""
    return [c for c in cands if not demoted(c, cands, margin)] + [c for c in cands if demoted(c, cands, margin)]


def one_line_candidates(engine: Any, card: TaskCard, prompt: str, earlier: set[str], max_tokens: int,
                        branches: int = CANDIDATE_BRANCHES, margin: float = COPY_MARGIN) -> tuple[list[Candidate], str]:
    """The distinct lines of `engine.branches`, ranked (`rank_candidates`); and how the first ended."""
    out: list[Candidate] = []
    seen: set[str] = set()
    finish = "stop"
    for i, (raw, lp, n) in enumerate(engine.branches(prompt, branches, max_tokens)):
        loop = repeat_scan(raw)[0]  # a line that starts over ends where it repeats (GuardedStream's rule)
        text = finish_text(card, raw if loop is None else raw[:loop])
        key = copy_key(text)
        if not text or key in seen:
            continue
        seen.add(key)
        out.append(Candidate(text, lp / n, key in earlier, i))
        if i == 0 and "\n" not in raw and n >= max_tokens:
            finish = "length"
    ranked = rank_candidates(out, margin)
    return ranked, finish if ranked and out and ranked[0] is out[0] else "stop"


def finish_text(card: TaskCard | None, text: str) -> str:
    """The answer as scored and shown: stripped; a one-line task's first line."""
    text = text.strip()
    return text.split("\n")[0].strip() if card is not None and card.one_line else text


# --- the route as nouns: Request -> Route.answer -> Answer ------------------------------------------
@dataclass
class Request:
    """What is asked: the task's card, the user's history and the typed text.

    Free chat (`free_chat`: a plain transcript after `about`, what is known of the user) is a request
    without a card, or with the card of free chat itself (`FREE_CHAT`: a bundle trained for free chat, whose
    adapter answers it). `item` (the evaluation) is the held-out item, so its metadata and time reach the
    profile as stored.
    """

    card: TaskCard | None
    text: str
    history: list[Item] = field(default_factory=list)  # strictly earlier items, time order
    n_total: int | None = None  # items in the whole history (the newest HISTORY_READ are read)
    profile_name: str | None = None  # the stored profile (the adapter cache's key), if any
    transcript: Sequence[tuple[str, str]] = ()
    about: str = ""
    item: Item | None = None

    @property
    def free_chat(self) -> bool:
        """A plain transcript, not a task's prompt: no card, or free chat's own."""
        return self.card is None or self.card.name == FREE_CHAT

    @property
    def task(self) -> str:
        return FREE_CHAT if self.card is None else self.card.name

    @functools.cached_property  # parsing a large piped diff once, not for query, read and the profile each
    def query_item(self) -> Item | None:
        """The query as the task reads it (`query_item`: a staged diff becomes the commit); the held-out
        item in the evaluation; None for free chat or no text."""
        if self.item is not None:
            return self.item
        if self.card is None or not self.text:
            return None
        if self.free_chat:  # a free-chat bundle's profile: the text as typed
            return Item(self.text, "", None, self.card.input_meta(self.text))
        return query_item(self.card, self.text)

    @property
    def query(self) -> str:
        """The query as the prompt shows it (`prompt_input`); free chat: the text itself."""
        item = self.query_item
        return self.text if item is None or self.free_chat else prompt_input(self.card, item)

    @property
    def read(self) -> dict[str, Any] | None:
        """What the answer read of a change (`what_was_read`), for the tasks that read one."""
        item = self.query_item
        return None if item is None or self.card is None else what_was_read(self.card, item)

    @functools.cached_property  # retrieval and features once per request (every evaluated method shares it)
    def profile(self) -> Profile:
        """The profile this request is personalized with (query-aware when there is a query)."""
        assert self.card is not None
        return make_profile(self.card, self.history, self.query_item, n_total=self.n_total)


@dataclass
class Personalization:
    """What an answer is personalized with: the profile, the adapter tensors made of it and the GGUF file."""

    profile: Profile | None
    fingerprint: str
    task: str = ""
    tensors: Tensors | None = None  # None until made (a cached adapter file needs none)
    adapter_path: Path | None = None
    cached: bool = False  # the file came from the adapter cache
    neutral: bool = False  # the bundle is the untrained stand-in: the adapter changes nothing
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        """The profile had no items: the adapter is the hypernetwork's neutral (population) one."""
        return bool(self.profile is not None and self.profile.empty)

    @property
    def n_items(self) -> int:
        return self.profile.n_history if self.profile is not None else 0


_ATTACHED = object()  # the route's marker: personalized and attached, nothing evaluated yet


class Answer:
    """One answer, streamed: iterate for the text pieces (closing cancels). `text` is the answer as scored
    and shown (`finish_text`, set by the route as its stream ends): reading it runs what is left of the
    stream first (as `llm`'s `Response.text()` does), so a caller that wants no stream just reads it, and
    the other fields are whole after it (or after `finish()`). A rating/label answer is read off its one
    evaluation of the prompt, kept as `scores` (label log-probabilities, mass, unparseable) and `distribution`."""

    def __init__(self, request: Request, steps: Iterator[Any] | None = None) -> None:
        self.request = request
        self._steps: Iterator[Any] = iter(steps if steps is not None else ())
        self._text = ""
        self.prompt = ""
        self.scores: dict[str, Any] | None = None
        self.distribution: dict[str, float] | None = None
        self.personalization: Personalization | None = None
        self.scale = 0.0
        self.finish_reason: str | None = None  # a generated answer: "stop", "repeat" or "length" (`GuardedStream`)
        self.examples = 0  # the user's own history items shown before the query (the card's `examples`)
        self.candidates: list[Candidate] = []  # a one-line answer's proposals, best first (`text` is the first)
        self.timings_ms: dict[str, float] = {}

    @property
    def text(self) -> str:
        """The whole answer as scored and shown: the stream is drained first (a closed one stays as it ended)."""
        self.finish()
        return self._text

    @property
    def adapter(self) -> Path | None:
        return self.personalization.adapter_path if self.personalization else None

    def __iter__(self) -> Answer:
        return self

    def __next__(self) -> str:
        while True:
            piece = next(self._steps)
            if piece is not _ATTACHED:
                return piece

    def prepare(self) -> Answer:
        """Run the route up to the attached adapter (what an export needs); nothing is evaluated."""
        for piece in self._steps:
            if piece is _ATTACHED:
                break
        return self

    def finish(self) -> Answer:
        """The whole answer (the stream drained)."""
        for _ in self:
            pass
        return self

    def close(self) -> None:
        close = getattr(self._steps, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Answer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Route:
    """Request -> Answer over one engine: personalize (profile -> tensors -> GGUF -> attached), prompt,
    decode. Subclasses change one step: `Session` the adapter file (its cache) and attaching (its loaded
    adapters); the evaluation's methods their prompt, their profile or their fixed adapter."""

    def __init__(self, engine: Any, personalizer: Personalizer | None = None, scratch: Path | None = None) -> None:
        self.engine, self.personalizer = engine, personalizer
        self.scratch = scratch  # where an adapter is written when nothing caches it
        self.lock = threading.RLock()  # one engine: one answer at a time
        self._label_ids: dict[tuple[str, ...], list[int]] = {}
        self._loaded: Any = None

    chat_engine: Any = None  # free chat on an instruct model of the user's choice (`--model`), if any
    branches = CANDIDATE_BRANCHES  # first tokens a one-line answer is chosen among (1: the greedy line)
    copy_margin = COPY_MARGIN

    # --- the one function ----------------------------------------------------------------------------
    def answer(self, request: Request, *, personalized: bool = True, scale: float = 1.0, temperature: float = 0.0,
               max_tokens: int | None = None, seed: int | None = None) -> Answer:
        """The answer to `request`, personalized (its adapter attached at `scale`) or from the base model.
        Nothing runs until the Answer is iterated; the lock is held until its stream ends or is closed."""
        answer = Answer(request)
        answer._steps = self._steps(answer, personalized and scale > 0 and request.card is not None,
                                    scale, temperature, max_tokens, seed)
        return answer

    def _steps(self, a: Answer, personalized: bool, scale: float, temperature: float, max_tokens: int | None,
               seed: int | None) -> Iterator[Any]:
        with self.lock:
            t0 = time.perf_counter()
            req = a.request
            if personalized and scale > EMPTY_MAX_STRENGTH and not req.history:
                # No items of this task in the profile: nothing personal to strengthen. The hypernetwork's
                # population adapter turned to noise above x1 ("5555..." at x2), so no adapter: the base
                # answers, and `personalization.empty` (with no adapter) says why.
                self.detach()
                a.personalization, a.scale = self.personalization(req), 0.0
            elif personalized:
                a.personalization, a.scale = self.personalize(req, scale), scale
            else:
                self.detach()
            yield _ATTACHED
            t1 = time.perf_counter()
            a.prompt = self.prompt(req, a.personalization)
            p = a.personalization
            a.examples = sum(shot in a.prompt for shot in examples(req.card, p.profile if p is not None else None))
            card = None if req.free_chat else req.card
            try:
                if card is not None and card.labelled:
                    a.scores = label_scores(self.engine, a.prompt, self.label_ids(card))
                    a.distribution = dict(zip(card.labels, np.exp(a.scores["lp"]).tolist(), strict=True))
                    a._text = decode_label(card, a.scores["lp"])
                    yield a._text
                    return
                kw = generation_settings(self.engine, card, req.query)
                if max_tokens:
                    kw["max_tokens"] = max_tokens
                if card is not None and card.one_line and temperature == 0:
                    earlier = {copy_key(it.output) for it in req.history}
                    a.candidates, a.finish_reason = one_line_candidates(
                        self.engine, card, a.prompt, earlier, kw["max_tokens"], self.branches, self.copy_margin)
                    a._text = a.candidates[0].text if a.candidates else ""
                    if a._text:
                        yield a._text
                    return
                raw: list[str] = []
                if card is None and self.chat_engine is not None and a.adapter is None:
                    # Free chat on the chosen instruct model: its chat template, the summary as system prompt.
                    chat = self.chat_engine
                    stream = GuardedStream(chat, chat.chat(chat_messages(req.text, req.transcript, req.about),
                                                           max_tokens=kw["max_tokens"], temperature=temperature))
                else:
                    stream = GuardedStream(self.engine, self.engine.generate(a.prompt, temperature=temperature,
                                                                             seed=seed, **kw))
                try:
                    for piece in stream:
                        raw.append(piece)
                        yield piece
                finally:
                    a._text, a.finish_reason = finish_text(card, "".join(raw)), stream.finish
            finally:
                t2 = time.perf_counter()
                a.timings_ms.update({"personalize_ms": (t1 - t0) * 1e3, "answer_ms": (t2 - t1) * 1e3,
                                     "total_ms": (t2 - t0) * 1e3})

    # --- the steps a subclass may change ---------------------------------------------------------------
    def personalization(self, request: Request) -> Personalization:
        """The profile the request is personalized with (a control feeds another)."""
        profile = request.profile
        return Personalization(profile, profile.fingerprint, request.task)

    def prompt(self, request: Request, p: Personalization | None = None) -> str:
        """The card's prompt around the query (after the card's retrieved examples when personalized), or
        (free chat) a transcript after what is known of the user."""
        if request.free_chat:
            return chat_prompt(request.text, request.transcript, request.about)
        shots = examples(request.card, p.profile if p is not None else None)
        return task_prompt(self.engine, request.card, request.query, shots)

    def adapter_file(self, p: Personalization, request: Request, force: bool = False) -> Path:
        """Where the adapter is: written to the scratch file (Session: its cache)."""
        if self.scratch is None:
            self.scratch = Path(tempfile.mkdtemp(prefix="p2p-route-")) / "adapter.gguf"
        self.write(p, self.scratch, request.card)
        return self.scratch

    def attach(self, path: Path, scale: float) -> None:
        """Load the adapter file into llama.cpp and attach it (the one loaded before is freed first: the
        scratch file is rewritten in place)."""
        self.release()
        self._loaded = self.engine.load_adapter(path)
        self.engine.use(self._loaded, lora_scale(scale))

    # --- built from those ------------------------------------------------------------------------------
    def personalize(self, request: Request, scale: float = 1.0, force: bool = False) -> Personalization:
        """Profile -> adapter file -> attached at `scale`; a cached file llama.cpp refuses is made again once."""
        t0 = time.perf_counter()
        p = self.personalization(request)
        p.neutral = bool(self.personalizer and self.personalizer.bundle.neutral)
        p.timings_ms["profile_ms"] = (time.perf_counter() - t0) * 1e3
        p.adapter_path = self.adapter_file(p, request, force)
        t2 = time.perf_counter()
        try:
            self.attach(p.adapter_path, scale)
        except AdapterError as e:
            if not p.cached:
                raise
            # A cached file that passed its checksum but not the validator (written by an older version).
            warnings.warn(f"cached adapter {p.adapter_path.name} was refused ({str(e).splitlines()[0]}); "
                          "regenerated", stacklevel=2)
            p.adapter_path = self.adapter_file(p, request, force=True)
            self.attach(p.adapter_path, scale)
        p.timings_ms["load_attach_ms"] = (time.perf_counter() - t2) * 1e3
        p.timings_ms["total_ms"] = (time.perf_counter() - t0) * 1e3
        return p

    def write(self, p: Personalization, path: Path, card: TaskCard | None) -> None:
        """The personalization's GGUF adapter (its tensors made first, unless a control gave them)."""
        assert self.personalizer is not None, "a route without a Personalizer writes no adapter"
        if p.tensors is None:
            assert p.profile is not None
            p.tensors, timings = self.personalizer.tensors(p.profile)
            p.timings_ms.update(timings)
        t0 = time.perf_counter()
        self.personalizer.write_tensors(p.tensors, path, p.fingerprint, card)
        p.cached = False
        p.timings_ms["write_ms"] = (time.perf_counter() - t0) * 1e3

    def detach(self) -> None:
        """The base model: no adapter attached."""
        if self.engine.active[0] is not None:
            self.engine.use(None)

    def release(self) -> None:
        """Free the adapter this route loaded (if any)."""
        if self._loaded is not None:
            self.engine.free_adapter(self._loaded)
            self._loaded = None

    def label_ids(self, card: TaskCard) -> list[int]:
        key = tuple(card.labels)
        if key not in self._label_ids:
            self._label_ids[key] = label_token_ids(self.engine, card.labels)
        return self._label_ids[key]
