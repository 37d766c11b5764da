"""A user's history -> a profile: summary text, BM25-retrieved items, the encoder text, numeric features.

`build_profile(card, history, query)` is the only entry point the rest of the app needs:
- `.summary`   statistics computed on the device, rendered as short text (no LLM writes it);
- `.retrieved` the top-k history items for the query (BM25 via `bm25s`; the most recent without a query);
- `.text`      exactly what the profile encoder embeds: task wrapper + summary + label frequencies
               (rating/label tasks) + retrieved items;
- `.features`  float32[FEATURE_DIM], one layout for every task (the hypernetwork's second input):
               a common block, a rating block and a text block; the block that does not apply is zero.
               A frozen sentence embedding hides numbers (see ../shared/notes/cpu-feasibility.md),
               so the numbers the hypernetwork needs go here, scaled to roughly unit range;
- `.fingerprint` sha256 over text + features: identifies the profile without revealing it.

Work is bounded whatever the history size: statistics use the most recent MAX_SUMMARY_ITEMS items,
retrieval indexes the most recent MAX_RETRIEVAL_ITEMS.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from p2p_local.data.format import Item, TaskCard
from p2p_local.diffs import shown

# A profile describes the user's recent self: statistics over the latest MAX_SUMMARY_ITEMS items, retrieval
# over the latest MAX_RETRIEVAL_ITEMS. The trainer builds every training sample with the same windows
# (max_history = MAX_SUMMARY_ITEMS), so a sample's profile is the device's, not an approximation.
MAX_SUMMARY_ITEMS = 256
MAX_RETRIEVAL_ITEMS = 128  # a BM25 index is built per query: ~3.5 ms for 128 short items on a laptop core
MAX_ITEM_CHARS = 160  # per retrieved item in the profile text / baseline prompts
RETRIEVED_K = 2  # history items retrieved into the profile text
POOL_ITEMS = 16  # items embedded one by one and pooled into the profile embedding: the retrieved, then the latest
WRAPPER = "extract personalization features relevant to: {description}"

# The feature contract. A bundle records FEATURE_VERSION and FEATURE_NAMES (manifest "features") and
# `Bundle.check` refuses one trained on another contract: bump the version whenever a name, an order,
# a constant below or the way a feature is computed changes.
FEATURE_VERSION = 2
RECENT = 20  # "recent" window for the recent-mean feature
HIST_BINS = 5  # rating histogram bins over the value range
QUERY_PRIOR_WEIGHT = 2.0  # the query-genre mean is shrunk to the user's mean with this many pseudo-items
COUNT_SCALE = 1000  # log1p(count) / log1p(COUNT_SCALE): ~1 at a thousand items
WORDS_SCALE = 200  # log1p(words) / log1p(WORDS_SCALE): text lengths to ~unit range
LEN_RATIO_DIV, LEN_RATIO_CLIP = 3.0, 1.5  # log(out/in) / 3, clipped to +-1.5
RATE_GAIN, RATE_CLIP = 5.0, 2.0  # comma and capital-word rates x5, clipped at 2
WORD_LEN_DIV = 10.0  # mean word length / 10
STYLE_WINDOW = 500  # type/token ratio over the latest words, comparable across history sizes

_COMMON = ("is_rating", "is_label", "is_generation", "is_empty", "log_count")
_RATING = (
    "r_mean", "r_std", "r_median", "r_recent_mean",
    *(f"r_hist_{i}" for i in range(HIST_BINS)),
    "r_query_mean", "r_query_log_count", "r_query_share", "r_query_delta",
    "r_neighbour_mean", "r_neighbour_match",
)  # fmt: skip
_TEXT = (
    "t_out_len", "t_out_len_std", "t_in_len", "t_len_ratio",
    "t_starts_lower", "t_ends_period", "t_ends_other_punct", "t_has_exclaim", "t_has_question",
    "t_comma_rate", "t_contraction", "t_caps_words", "t_multiline", "t_type_token", "t_word_len",
    "t_copy_rate", "t_prefix_tag", "t_has_digit", "t_first_person", "t_greeting",
    "t_query_in_len", "t_neighbour_out_len", "t_neighbour_match",
    "t_opening_share", "t_open_past", "t_open_third", "t_issue_ref", "t_backtick",
)  # fmt: skip
# How a user opens an output (commit subjects: "Add", "fix", "Updated"...): the share of each common
# opening verb, any inflection. Style the summary states and the adapter must carry (issue 16).
OPENINGS = (
    "add", "fix", "update", "remove", "use", "make", "improve", "refactor", "bump", "support",
    "allow", "move", "rename", "revert", "change", "clean", "drop", "implement", "document", "test",
)  # fmt: skip
_OPEN = tuple(f"t_open_{w}" for w in OPENINGS)
FEATURE_NAMES: tuple[str, ...] = _COMMON + _RATING + _TEXT + _OPEN
FEATURE_DIM = len(FEATURE_NAMES)
_IDX = {n: i for i, n in enumerate(FEATURE_NAMES)}

_STOP = frozenset(
    "a an the and or but if of to in on at by for with from as is are was were be been being it its this that "
    "these those i me my we our you your he she they them their his her him us not no do does did done have has "
    "had so than then there here what which who whom when where why how all any some can could would should will "
    "just also into about over out up down more most very too only own same such both each few other again "
    "once under further off while because until against between through during before after above below "
    "am get got let lets im dont thats ive youre like just know think really would could people thing things "
    "make made much many well even still want going good yeah sure though every never always something".split()
)
_WORD = re.compile(r"[A-Za-z][A-Za-z'\-]*|\d+")
_CONTRACTION = re.compile(r"[A-Za-z](?:'|’)(?:s|re|t|ll|ve|m|d)\b", re.I)
_FIRST_PERSON = re.compile(r"\b(?:i|me|my|mine|we|our|us)\b", re.I)
_GREETING = re.compile(r"^\s*(?:hi|hello|hey|dear|greetings|good (?:morning|afternoon|evening))\b", re.I)
_ISSUE_REF = re.compile(r"#\d")
_PREFIX_TAG = re.compile(r"^\s*(?:\[[^\]]{1,30}\]|[A-Za-z][\w\-/.]{0,24}:\s)")


@dataclass
class Profile:
    summary: str
    retrieved: list[Item]
    text: str
    features: np.ndarray
    fingerprint: str
    empty: bool = False
    n_history: int = 0
    stats: dict[str, float] = field(default_factory=dict)  # the numbers behind the summary (for UIs)
    item_texts: list[str] = field(default_factory=list)  # what the encoder embeds, one item each (pooled)


# ---------------------------------------------------------------- small text helpers


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


def _content_words(text: str) -> set[str]:
    """Lower-cased words of 4+ letters, no stopwords, no contractions (the topic-ish words)."""
    return {
        w
        for w in (x.lower().strip("'-") for x in _words(text))
        if len(w) >= 4 and w not in _STOP and "'" not in w
    }


def _flat(text: str, max_chars: int = MAX_ITEM_CHARS) -> str:
    """One line, at most `max_chars` (profile texts and baseline prompts stay short)."""
    s = " ".join(text.split())
    return s if len(s) <= max_chars else s[: max_chars - 1].rstrip() + "…"


def _pct(x: float) -> str:
    return f"{round(100 * x)}%"


# ---------------------------------------------------------------- ratings / labels


def _label_values(card: TaskCard) -> tuple[dict[str, float], float, float]:
    """label -> numeric value, and the value range. Ratings use their numbers; labels their index."""
    if card.kind == "rating":
        try:
            values = {lab: float(lab) for lab in card.labels}
        except ValueError:
            values = {lab: float(i) for i, lab in enumerate(card.labels)}
    else:
        values = {lab: float(i) for i, lab in enumerate(card.labels)}
    lo, hi = card.value_range or (min(values.values()), max(values.values()))
    return values, float(lo), float(hi)


def _tags(item: Item, keyword_mode: bool) -> set[str]:
    """Genres/topics from meta; without any, the item's content words stand in as topics."""
    if keyword_mode:
        return _content_words(item.input)
    for key in ("genres", "tags", "topics"):
        v = item.meta.get(key)
        if isinstance(v, list):
            return {str(x) for x in v}
    return set()


def _rating_block(card, hist, query, retrieved, f, stats, n_total) -> list[str]:
    """Fill the rating block of `f`; return summary lines."""
    values, lo, hi = _label_values(card)
    mid, half = (lo + hi) / 2, max((hi - lo) / 2, 1e-6)
    rated = [(it, values[it.output.strip()]) for it in hist if it.output.strip() in values]
    if not rated:
        return [f"{len(hist)} past items, none with a known label."]
    v = np.array([x for _, x in rated], dtype=np.float64)
    mean, std, median = float(v.mean()), float(v.std()), float(np.median(v))
    recent = float(v[-RECENT:].mean())
    norm = lambda x: (x - mid) / half  # noqa: E731  (-1 .. 1 over the value range)
    f[_IDX["r_mean"]], f[_IDX["r_std"]] = norm(mean), std / half
    f[_IDX["r_median"]], f[_IDX["r_recent_mean"]] = norm(median), norm(recent)
    bins = np.clip(((v - lo) / max(hi - lo, 1e-6) * HIST_BINS).astype(int), 0, HIST_BINS - 1)
    hist_counts = np.bincount(bins, minlength=HIST_BINS) / len(v)
    for i in range(HIST_BINS):
        f[_IDX[f"r_hist_{i}"]] = hist_counts[i]
    stats.update(mean=mean, std=std, n_rated=len(v))

    # Query-conditional: a Jaccard-weighted mean over history items sharing the query's genres/topics,
    # shrunk towards the user's mean (prior weight 2) so that one shared item does not swing it.
    keyword_mode = not any(_tags(it, False) for it, _ in rated[-50:])
    q_mean, q_count, q_share = mean, 0, 0.0
    if query is not None:
        qt = _tags(query, keyword_mode)
        if qt:
            w = np.array(
                [len(qt & t) / len(qt | t) if (t := _tags(it, keyword_mode)) else 0.0 for it, _ in rated]
            )
            q_count = int((w > 0).sum())
            q_share = q_count / len(w)
            q_mean = float((w @ v + QUERY_PRIOR_WEIGHT * mean) / (w.sum() + QUERY_PRIOR_WEIGHT))
    f[_IDX["r_query_mean"]] = norm(q_mean)
    f[_IDX["r_query_log_count"]] = math.log1p(q_count) / math.log1p(COUNT_SCALE)
    f[_IDX["r_query_share"]] = q_share
    f[_IDX["r_query_delta"]] = (q_mean - mean) / half
    nb = [values[it.output.strip()] for it in retrieved if it.output.strip() in values]
    f[_IDX["r_neighbour_mean"]] = norm(float(np.mean(nb))) if nb else norm(mean)
    stats.update(query_mean=q_mean, query_count=q_count)

    scale = f"{lo:g}-{hi:g}" if card.kind == "rating" else "label index"
    lines = [
        f"{n_total} past ratings, mean {mean:.2f} (spread {std:.2f}) on {scale}; last {min(RECENT, len(v))} average {recent:.2f}."
    ]
    if card.kind == "label":
        lines = [f"{n_total} past labelled items."]
    # Liked / disliked genres or topics (support >= 3 items, top 3 each way).
    by_tag: dict[str, list[float]] = {}
    for it, x in rated:
        for t in _tags(it, keyword_mode):
            by_tag.setdefault(t, []).append(x)
    ranked = sorted(((float(np.mean(xs)), t) for t, xs in by_tag.items() if len(xs) >= 3), reverse=True)
    if card.kind == "rating" and len(ranked) >= 2:
        what = "topics" if keyword_mode else "genres"
        each = min(3, len(ranked) // 2)  # never list a genre as both liked and disliked
        lines.append(f"Rates highest {what}: " + ", ".join(f"{t} {m:.1f}" for m, t in ranked[:each]) + ".")
        lines.append(
            f"Rates lowest {what}: " + ", ".join(f"{t} {m:.1f}" for m, t in ranked[::-1][:each]) + "."
        )
    return lines


def label_frequency(card: TaskCard, history: list[Item]) -> str:
    """'Label frequency: 4: 40%, 5: 30%, ...' (ratings in label order, labels by frequency)."""
    counts = Counter(
        it.output.strip() for it in history[-MAX_SUMMARY_ITEMS:] if it.output.strip() in card.labels
    )
    n = sum(counts.values())
    if not n:
        return "Label frequency: none yet."
    labels = card.labels if card.kind == "rating" else [lab for lab, _ in counts.most_common()]
    return (
        "Label frequency: "
        + ", ".join(f"{lab}: {_pct(counts[lab] / n)}" for lab in labels if counts[lab])
        + "."
    )


# ---------------------------------------------------------------- text (generation)


def opening_verb(word: str) -> str | None:
    """The OPENINGS verb a (lower-cased) first word inflects ("fixes", "fixed", "updating" -> fix, update)."""
    for stem in (word, word[:-1], word[:-2], word[:-3], word[:-3] + "e", word[:-2] + "e"):
        if stem in _OPENING_SET:
            return stem
    return None


_OPENING_SET = frozenset(OPENINGS)


def starts_lowercase(text: str) -> bool:
    """Whether a text opens with a lower-case letter (quotes and brackets skipped): the case of a style."""
    return text.lstrip("\"'([").strip()[:1].islower()


def first_word(text: str) -> str | None:
    """The first word of a text, lower-cased (None for a text without words)."""
    m = _WORD.search(text)
    return m.group().lower() if m else None


@dataclass(frozen=True)
class _Facts:
    """What the text block reads of one history item, computed once per distinct (input, output)."""

    out: str
    out_words: tuple[str, ...]
    lower_words: tuple[str, ...]
    in_len: int
    flags: tuple[bool, ...]  # _FLAG_NAMES, in order
    commas: int
    caps: int
    chars: int
    copy: float | None
    content: tuple[str, ...]
    first: str | None  # the first word, lower-cased
    opening: str | None  # the "typical opening" token (a prefix tag whole)


_FLAG_NAMES = ("t_starts_lower", "t_ends_period", "t_ends_other_punct", "t_has_exclaim", "t_has_question",
               "t_contraction", "t_multiline", "t_prefix_tag", "t_has_digit", "t_first_person", "t_greeting",
               "t_issue_ref", "t_backtick")


@functools.lru_cache(maxsize=1 << 15)
def _facts(input: str, output: str) -> _Facts:
    o = output.strip()
    ow = tuple(_words(o))
    iw = _words(input)
    flags = (starts_lowercase(o), o.endswith("."), o[-1:] in "!?", "!" in o,
             "?" in o, bool(_CONTRACTION.search(o)), "\n" in o, bool(_PREFIX_TAG.match(o)),
             any(c.isdigit() for c in o), bool(_FIRST_PERSON.search(o)), bool(_GREETING.match(o)),
             bool(_ISSUE_REF.search(o)), "`" in o)
    in_lower = {x.lower() for x in iw}
    copy = sum(1 for w in ow if w.lower() in in_lower) / len(ow) if ow and iw else None
    opening = (ow[0] if not _PREFIX_TAG.match(o) else o.split()[0]) if ow else None
    return _Facts(o, ow, tuple(w.lower() for w in ow), len(iw), flags, o.count(","),
                  sum(1 for w in ow if len(w) >= 2 and w.isupper()), sum(len(w) for w in ow), copy,
                  tuple(sorted(_content_words(o))), ow[0].lower() if ow else None, opening)


def _text_block(hist, query, retrieved, f, stats, n_total) -> list[str]:
    facts = [_facts(it.input, it.output) for it in hist]
    n = len(facts)
    out_len = np.array([len(x.out_words) for x in facts], dtype=np.float64)
    in_len = np.array([x.in_len for x in facts], dtype=np.float64)
    lo_out = np.log1p(out_len)
    share = {name: sum(1 for x in facts if x.flags[k]) / n for k, name in enumerate(_FLAG_NAMES)}
    starts_lower, ends_period = share["t_starts_lower"], share["t_ends_period"]
    exclaim, question, contraction = share["t_has_exclaim"], share["t_has_question"], share["t_contraction"]
    multiline, greeting, copies_of = share["t_multiline"], share["t_greeting"], [x.copy for x in facts]
    n_words = max(int(out_len.sum()), 1)
    commas = sum(x.commas for x in facts) / n_words
    caps = sum(x.caps for x in facts) / n_words
    window: list[str] = []
    for x in reversed(facts):  # the latest STYLE_WINDOW words
        if len(window) >= STYLE_WINDOW:
            break
        window[:0] = x.lower_words
    window = window[-STYLE_WINDOW:]
    ttr = len(set(window)) / max(len(window), 1)
    word_len = sum(x.chars for x in facts) / n_words
    copies = [c for c in copies_of if c is not None]
    copy_rate = float(np.mean(copies)) if copies else 0.0
    has_input = bool(in_len.sum())
    ratio = float(np.mean(np.log((out_len + 1) / (in_len + 1)))) if has_input else 0.0

    log200 = math.log1p(WORDS_SCALE)
    f[_IDX["t_out_len"]] = float(lo_out.mean()) / log200
    f[_IDX["t_out_len_std"]] = float(lo_out.std())
    f[_IDX["t_in_len"]] = float(np.log1p(in_len).mean()) / log200
    f[_IDX["t_len_ratio"]] = float(np.clip(ratio / LEN_RATIO_DIV, -LEN_RATIO_CLIP, LEN_RATIO_CLIP))
    for name, x in share.items():
        f[_IDX[name]] = x
    f[_IDX["t_type_token"]], f[_IDX["t_copy_rate"]] = ttr, copy_rate
    f[_IDX["t_comma_rate"]] = min(commas * RATE_GAIN, RATE_CLIP)
    f[_IDX["t_caps_words"]] = min(caps * RATE_GAIN, RATE_CLIP)
    f[_IDX["t_word_len"]] = word_len / WORD_LEN_DIV
    if query is not None:
        f[_IDX["t_query_in_len"]] = math.log1p(len(_words(query.input))) / log200
    nb = [math.log1p(len(_words(it.output))) for it in retrieved]
    f[_IDX["t_neighbour_out_len"]] = (float(np.mean(nb)) if nb else float(lo_out.mean())) / log200
    stats.update(mean_output_words=float(out_len.mean()), mean_input_words=float(in_len.mean()))

    # Register: a crude, documented heuristic over casing, contractions and exclamations.
    casual = 0.4 * starts_lower + 0.3 * contraction + 0.3 * exclaim
    register = (
        "casual" if casual >= 0.25 else ("formal" if contraction < 0.05 and ends_period > 0.5 else "neutral")
    )
    lines = [
        f"{n_total} past examples. Output length about {np.median(out_len):.0f} words"
        + (
            f" (input about {np.median(in_len):.0f}; output/input {math.exp(ratio):.2f})."
            if has_input
            else "."
        ),
        f"Register: {register}. Starts lowercase {_pct(starts_lower)}, ends with a period {_pct(ends_period)}, "
        f"'!' in {_pct(exclaim)}, '?' in {_pct(question)}, contractions in {_pct(contraction)}, "
        f"multi-line {_pct(multiline)}, greeting {_pct(greeting)}, copies {_pct(copy_rate)} of input words.",
    ]
    firsts = [x.first for x in facts if x.first is not None]
    first_counts = Counter(firsts)
    n_first = max(len(firsts), 1)
    f[_IDX["t_opening_share"]] = first_counts.most_common(1)[0][1] / n_first if firsts else 0.0
    f[_IDX["t_open_past"]] = sum(1 for w in firsts if len(w) > 3 and w.endswith("ed")) / n_first
    f[_IDX["t_open_third"]] = sum(1 for w in firsts if len(w) > 3 and w.endswith("s") and not w.endswith("ss")) / n_first
    for w, c in Counter(opening_verb(w) for w in firsts).items():
        if w is not None:
            f[_IDX[f"t_open_{w}"]] = c / n_first
    openings = Counter(x.opening for x in facts if x.opening is not None)
    common = [(w, c) for w, c in openings.most_common(3) if c >= 2]
    if common:
        lines.append("Typical openings: " + ", ".join(f'"{w}" {_pct(c / n)}' for w, c in common) + ".")
    doc_freq = Counter(w for x in facts for w in x.content)  # sorted per item: ties keep one order in every process
    recurring = [w for w, c in doc_freq.most_common(8) if c >= 2]
    if recurring:
        lines.append("Recurring words: " + ", ".join(recurring) + ".")
    return lines


# ---------------------------------------------------------------- retrieval


def _doc(card: TaskCard, item: Item) -> str:
    # Rating/label outputs are single tokens with no retrieval value; text outputs carry the topic.
    return _with_change(card, item, item.input if card.labelled else f"{item.input} {item.output}")


def _with_change(card: TaskCard, item: Item, text: str) -> str:
    """A task that reads changes retrieves by the change too: the part of the diff the prompt shows."""
    diff = shown(item.meta.get("diff") or "", card.diff_chars) if card.diff_chars else ""
    return f"{text} {diff}" if diff else text


@functools.lru_cache(maxsize=1 << 15)
def _bm25_tokens(doc: str) -> tuple[str, ...]:
    """bm25s' tokens of one document (per document: the same as tokenizing the pool at once), once per text."""
    import bm25s

    return tuple(bm25s.tokenize([doc], stopwords="en", show_progress=False, return_ids=False)[0])


def retrieve(card: TaskCard, history: list[Item], query: Item | None, k: int = 2) -> list[Item]:
    """Top-k history items for the query by BM25 (bm25s); the most recent items when there is no
    query or nothing matches. Indexes at most the MAX_RETRIEVAL_ITEMS most recent items."""
    return _retrieve(card, history, query, k)[0]


def _retrieve(card: TaskCard, history: list[Item], query: Item | None, k: int) -> tuple[list[Item], int]:
    """(items, how many of them BM25 matched; the rest are recent fill-ins)."""
    import bm25s  # imported lazily: only needed when there is a history

    pool = history[-MAX_RETRIEVAL_ITEMS:]
    if not pool or k <= 0:
        return [], 0
    recent = pool[::-1]
    if query is None or not query.input.strip():
        return recent[:k], 0
    tokens = [list(_bm25_tokens(_doc(card, it))) for it in pool]
    keep = [i for i, t in enumerate(tokens) if t]
    q = bm25s.tokenize([_with_change(card, query, query.input)], stopwords="en", show_progress=False,
                       return_ids=False)
    picked: list[int] = []
    if keep and q[0]:
        index = bm25s.BM25()
        index.index([tokens[i] for i in keep], show_progress=False)
        ids, scores = index.retrieve(q, k=min(k, len(keep)), show_progress=False)
        picked = [keep[int(i)] for i, s in zip(ids[0], scores[0], strict=True) if s > 0]
    out = [pool[i] for i in picked]
    for it in recent:  # fill up with the most recent non-picked items
        if len(out) >= k:
            break
        if not any(it is o for o in out):
            out.append(it)
    return out, len(picked)


# ---------------------------------------------------------------- the profile


def render_history(items: list[Item], max_chars: int = MAX_ITEM_CHARS) -> str:
    """History items as "Input: .. Output: .." lines: the retrieved items of the profile text."""
    return "\n".join(
        f"Input: {_flat(it.input, max_chars)} Output: {_flat(it.output, max_chars)}" for it in items
    )


def item_text(card: TaskCard, item: Item) -> str:
    """One history item as the encoder embeds it: a generated text (its style is the point) or a rated
    input with its label."""
    if card.kind == "generation":
        return _flat(item.output)
    return f"{_flat(item.input)} | {item.output.strip()}"


def pooled_items(history: list[Item], retrieved: list[Item], n: int = POOL_ITEMS) -> list[Item]:
    """The items pooled into the profile embedding: the retrieved ones, then the latest others."""
    out = list(retrieved[:n])
    for it in reversed(history):
        if len(out) >= n:
            break
        if not any(it is o for o in out):
            out.append(it)
    return out


def build_profile(card: TaskCard, history: list[Item], query: Item | None = None, k: int = RETRIEVED_K,
                  n_total: int | None = None) -> Profile:
    """The profile of a user whose (time-ordered) `history` is everything before `query`.

    The caller passes only items strictly earlier than the query; nothing here looks at the query's output.
    Only the latest MAX_SUMMARY_ITEMS items are read, so a caller may pass just those and the full count
    as `n_total` (the store does: cost stays flat in history size). Call it through `p2p_local.pipeline`.
    """
    if n_total is None:
        n_total = len(history)
    history = history[-MAX_SUMMARY_ITEMS:]
    f = np.zeros(FEATURE_DIM, dtype=np.float64)
    f[_IDX[{"rating": "is_rating", "label": "is_label", "generation": "is_generation"}[card.kind]]] = 1.0
    hist = history
    stats: dict[str, float] = {"n_history": float(n_total)}
    head = WRAPPER.format(description=card.description)
    if not hist:
        f[_IDX["is_empty"]] = 1.0
        summary = "No history yet."
        text = f"{head}\nSummary: {summary}"
        return _finish(summary, [], text, f, True, 0, stats)
    f[_IDX["log_count"]] = math.log1p(n_total) / math.log1p(COUNT_SCALE)
    retrieved, matched = _retrieve(card, history, query, k)
    match = matched / len(retrieved) if retrieved else 0.0
    f[_IDX["r_neighbour_match" if card.labelled else "t_neighbour_match"]] = match
    if card.kind == "generation":
        lines = _text_block(hist, query, retrieved, f, stats, n_total)
    else:
        lines = _rating_block(card, hist, query, retrieved, f, stats, n_total)
    if n_total > len(hist):
        lines.append(f"(Statistics over the latest {len(hist)}.)")
    summary = " ".join(lines)
    parts = [head, f"Summary: {summary}"]
    if card.labelled:
        parts.append(label_frequency(card, hist))
    if retrieved:
        parts.append("Relevant past items:\n" + render_history(retrieved))
    items = [item_text(card, it) for it in pooled_items(hist, retrieved)]
    return _finish(summary, retrieved, "\n".join(parts), f, False, n_total, stats, items)


def _finish(summary, retrieved, text, f, empty, n, stats, items=None) -> Profile:
    feats = np.nan_to_num(f, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)
    items = items or [text]  # no history: the (empty) profile text stands for it
    digest = hashlib.sha256("\n".join([text, *items]).encode("utf-8") + feats.tobytes()).hexdigest()
    return Profile(summary, retrieved, text, feats, digest, empty, n, stats, items)
