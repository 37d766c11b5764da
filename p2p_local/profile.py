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

import hashlib
import math
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from p2p_local.data.format import Item, TaskCard

MAX_SUMMARY_ITEMS = 2000
MAX_RETRIEVAL_ITEMS = 300  # BM25 index build is ~linear: ~10 ms for 300 short items on a laptop core
MAX_ITEM_CHARS = 160  # per retrieved item in the profile text / baseline prompts
RETRIEVED_K = 2  # history items retrieved into the profile text
WRAPPER = "extract personalization features relevant to: {description}"

# The feature contract. A bundle records FEATURE_VERSION and FEATURE_NAMES (manifest "features") and
# `Bundle.check` refuses one trained on another contract: bump the version whenever a name, an order,
# a constant below or the way a feature is computed changes.
FEATURE_VERSION = 1
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
)  # fmt: skip
FEATURE_NAMES: tuple[str, ...] = _COMMON + _RATING + _TEXT
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


def _text_block(hist, query, retrieved, f, stats, n_total) -> list[str]:
    outs = [it.output.strip() for it in hist]
    out_w = [_words(o) for o in outs]
    in_w = [_words(it.input) for it in hist]
    n = len(outs)
    out_len = np.array([len(w) for w in out_w], dtype=np.float64)
    in_len = np.array([len(w) for w in in_w], dtype=np.float64)
    lo_out = np.log1p(out_len)
    rate = lambda pred: sum(1 for o in outs if pred(o)) / n  # noqa: E731
    starts_lower = rate(lambda o: bool(o) and o.lstrip("\"'([").strip()[:1].islower())
    ends_period = rate(lambda o: o.endswith("."))
    ends_other = rate(lambda o: o[-1:] in "!?")
    exclaim, question = rate(lambda o: "!" in o), rate(lambda o: "?" in o)
    contraction = rate(lambda o: bool(_CONTRACTION.search(o)))
    multiline = rate(lambda o: "\n" in o)
    prefix_tag = rate(lambda o: bool(_PREFIX_TAG.match(o)))
    digit = rate(lambda o: any(c.isdigit() for c in o))
    first_person = rate(lambda o: bool(_FIRST_PERSON.search(o)))
    greeting = rate(lambda o: bool(_GREETING.match(o)))
    all_words = [w for ws in out_w for w in ws]
    n_words = max(len(all_words), 1)
    commas = sum(o.count(",") for o in outs) / n_words
    caps = sum(1 for w in all_words if len(w) >= 2 and w.isupper()) / n_words
    window = [w.lower() for w in all_words[-STYLE_WINDOW:]]
    ttr = len(set(window)) / max(len(window), 1)
    word_len = sum(len(w) for w in all_words) / n_words
    copies = [
        sum(1 for w in ow if w.lower() in iw) / len(ow)
        for ow, iw in ((o, {x.lower() for x in i}) for o, i in zip(out_w, in_w, strict=True))
        if ow and iw
    ]
    copy_rate = float(np.mean(copies)) if copies else 0.0
    has_input = bool(in_len.sum())
    ratio = float(np.mean(np.log((out_len + 1) / (in_len + 1)))) if has_input else 0.0

    log200 = math.log1p(WORDS_SCALE)
    f[_IDX["t_out_len"]] = float(lo_out.mean()) / log200
    f[_IDX["t_out_len_std"]] = float(lo_out.std())
    f[_IDX["t_in_len"]] = float(np.log1p(in_len).mean()) / log200
    f[_IDX["t_len_ratio"]] = float(np.clip(ratio / LEN_RATIO_DIV, -LEN_RATIO_CLIP, LEN_RATIO_CLIP))
    for name, x in (
        ("t_starts_lower", starts_lower), ("t_ends_period", ends_period), ("t_ends_other_punct", ends_other),
        ("t_has_exclaim", exclaim), ("t_has_question", question), ("t_contraction", contraction),
        ("t_multiline", multiline), ("t_type_token", ttr), ("t_copy_rate", copy_rate),
        ("t_prefix_tag", prefix_tag), ("t_has_digit", digit), ("t_first_person", first_person),
        ("t_greeting", greeting),
    ):  # fmt: skip
        f[_IDX[name]] = x
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
    openings = Counter(
        ws[0] if not _PREFIX_TAG.match(o) else o.split()[0] for o, ws in zip(outs, out_w, strict=True) if ws
    )
    common = [(w, c) for w, c in openings.most_common(3) if c >= 2]
    if common:
        lines.append("Typical openings: " + ", ".join(f'"{w}" {_pct(c / n)}' for w, c in common) + ".")
    doc_freq = Counter(w for o in outs for w in sorted(_content_words(o)))  # sorted: ties keep one order in every process
    recurring = [w for w, c in doc_freq.most_common(8) if c >= 2]
    if recurring:
        lines.append("Recurring words: " + ", ".join(recurring) + ".")
    return lines


# ---------------------------------------------------------------- retrieval


def _doc(card: TaskCard, item: Item) -> str:
    # Rating/label outputs are single tokens with no retrieval value; text outputs carry the topic.
    return item.input if card.kind != "generation" else f"{item.input} {item.output}"


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
    tokens = bm25s.tokenize(
        [_doc(card, it) for it in pool], stopwords="en", show_progress=False, return_ids=False
    )
    keep = [i for i, t in enumerate(tokens) if t]
    q = bm25s.tokenize([query.input], stopwords="en", show_progress=False, return_ids=False)
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
    f[_IDX["r_neighbour_match" if card.kind != "generation" else "t_neighbour_match"]] = match
    if card.kind == "generation":
        lines = _text_block(hist, query, retrieved, f, stats, n_total)
    else:
        lines = _rating_block(card, hist, query, retrieved, f, stats, n_total)
    if n_total > len(hist):
        lines.append(f"(Statistics over the latest {len(hist)}.)")
    summary = " ".join(lines)
    parts = [head, f"Summary: {summary}"]
    if card.kind != "generation":
        parts.append(label_frequency(card, hist))
    if retrieved:
        parts.append("Relevant past items:\n" + render_history(retrieved))
    return _finish(summary, retrieved, "\n".join(parts), f, False, n_total, stats)


def _finish(summary, retrieved, text, f, empty, n, stats) -> Profile:
    feats = np.nan_to_num(f, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)
    digest = hashlib.sha256(text.encode("utf-8") + feats.tobytes()).hexdigest()
    return Profile(summary, retrieved, text, feats, digest, empty, n, stats)
