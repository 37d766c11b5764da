"""Task metrics from maintained libraries: MAE/RMSE, accuracy and F1 (scikit-learn), ROUGE (rouge-score).

Model outputs are parsed into a label first (`parse_label`: the first label-like token). Outputs that
cannot be parsed are never dropped: they are counted (`n_unparseable`) and scored with a documented
fallback:
- rating tasks: the label farthest from the gold (the worst possible error), so garbage never helps MAE;
- rating and label tasks: wrong for accuracy, and a miss (false negative) for F1;
- generation: an empty output scores ROUGE 0 (counted as `n_empty`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from p2p_local.data.format import TaskCard
from p2p_local.errors import DataError
from p2p_local.pipeline import decode_distribution  # noqa: F401  (the app's rule, re-exported)

UNPARSEABLE = "<unparseable>"
_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?")
_SPELLED = {
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
}
_SPELLED_RE = re.compile(r"\b(" + "|".join(_SPELLED) + r")\b", re.I)


def _numeric_labels(card: TaskCard) -> dict[str, float] | None:
    try:
        return {lab: float(lab) for lab in card.labels}
    except ValueError:
        return None


def parse_label(text: str, card: TaskCard) -> str | None:
    """The first label-like token of a model output, as one of `card.labels`; None if there is none.

    Numeric labels: the first number (digits or a spelled-out "one".."ten") inside the value range,
    rounded to the nearest label (halves round up, like the MovieLens half stars). Other labels: the
    earliest case-insensitive whole-word occurrence (the longest label wins at the same position).
    """
    if not text:
        return None
    numeric = _numeric_labels(card)
    if numeric:
        lo, hi = card.value_range or (min(numeric.values()), max(numeric.values()))
        found = [(m.start(), float(m.group())) for m in _NUMBER.finditer(text)]
        found += [(m.start(), float(_SPELLED[m.group(1).lower()])) for m in _SPELLED_RE.finditer(text)]
        for _, v in sorted(found):
            if lo <= v <= hi:
                return min(numeric, key=lambda lab: (abs(numeric[lab] - v), -numeric[lab]))
        return None
    best: tuple[int, int, str] | None = None
    for lab in card.labels:
        for m in _label_pattern(lab).finditer(text):
            cand = (m.start(), -len(lab), lab)
            if best is None or cand < best:
                best = cand
            break
    return best[2] if best else None


@lru_cache(maxsize=256)
def _label_pattern(label: str) -> re.Pattern[str]:
    pre = r"(?<!\w)" if label[:1].isalnum() else ""
    post = r"(?!\w)" if label[-1:].isalnum() else ""
    return re.compile(pre + re.escape(label) + post, re.I)


def _check_golds(golds: Sequence[str], card: TaskCard) -> list[str]:
    out = [str(g).strip() for g in golds]
    bad = [g for g in out if g not in card.labels]
    if bad:
        raise DataError(f"{card.name}: gold labels not in the task's labels: {sorted(set(bad))[:5]}")
    return out


def example_scores(card: TaskCard, preds: Sequence[str], golds: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-example scores (for bootstrap confidence intervals), with the fallbacks applied.

    rating: abs_error, sq_error, correct, parsed (1/0); label: correct, parsed; generation: rouge1, rougeL.
    """
    if len(preds) != len(golds):
        raise DataError(f"{len(preds)} predictions for {len(golds)} golds")
    if card.kind == "generation":
        scorer = _rouge()
        s = [scorer.score(str(g), str(p)) for p, g in zip(preds, golds, strict=True)]
        return {
            "rouge1": np.array([x["rouge1"].fmeasure for x in s], dtype=np.float64),
            "rougeL": np.array([x["rougeL"].fmeasure for x in s], dtype=np.float64),
        }
    golds = _check_golds(golds, card)
    parsed = [parse_label(str(p), card) for p in preds]
    out = {
        "correct": np.array([p == g for p, g in zip(parsed, golds, strict=True)], dtype=np.float64),
        "parsed": np.array([p is not None for p in parsed], dtype=np.float64),
    }
    numeric = _numeric_labels(card)
    if card.kind == "rating" and numeric:
        vals = np.array(list(numeric.values()))
        err = []
        for p, g in zip(parsed, golds, strict=True):
            gv = numeric[g]
            err.append(abs(numeric[p] - gv) if p is not None else float(np.abs(vals - gv).max()))
        out["abs_error"] = np.array(err, dtype=np.float64)
        out["sq_error"] = out["abs_error"] ** 2
    return out


def rating_metrics(card: TaskCard, preds: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
    """MAE and RMSE (sklearn) plus accuracy/F1, with unparseable outputs scored at the worst error."""
    from sklearn.metrics import mean_absolute_error, mean_squared_error

    numeric = _numeric_labels(card)
    if numeric is None:
        raise DataError(f"{card.name}: rating metrics need numeric labels")
    golds = _check_golds(golds, card)
    vals = np.array(list(numeric.values()))
    parsed = [parse_label(str(p), card) for p in preds]
    y_true = np.array([numeric[g] for g in golds])
    y_pred = np.array(
        [
            numeric[p] if p is not None else vals[np.argmax(np.abs(vals - numeric[g]))]
            for p, g in zip(parsed, golds, strict=True)
        ]
    )
    out = label_metrics(card, preds, golds)
    if len(golds):
        out["mae"] = float(mean_absolute_error(y_true, y_pred))
        out["rmse"] = math.sqrt(float(mean_squared_error(y_true, y_pred)))
    else:
        out["mae"] = out["rmse"] = float("nan")
    return out


def label_metrics(card: TaskCard, preds: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
    """Accuracy, macro and weighted F1 (sklearn) over the labels that occur in golds or predictions."""
    from sklearn.metrics import accuracy_score, f1_score

    golds = _check_golds(golds, card)
    parsed = [parse_label(str(p), card) for p in preds]
    y_pred = [p if p is not None else UNPARSEABLE for p in parsed]
    present = [lab for lab in card.labels if lab in set(golds) | set(y_pred)]
    n = len(golds)
    out: dict[str, float] = {"n": n, "n_unparseable": sum(p is None for p in parsed)}
    if not n:
        return out | {"accuracy": float("nan"), "f1_macro": float("nan"), "f1_weighted": float("nan")}
    out["accuracy"] = float(accuracy_score(golds, y_pred))
    for avg in ("macro", "weighted"):
        out[f"f1_{avg}"] = float(f1_score(golds, y_pred, labels=present, average=avg, zero_division=0))
    return out


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    # use_stemmer=False: the default of HF `evaluate`'s rouge, which LaMP's evaluation uses.
    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)


def generation_metrics(preds: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1 / ROUGE-L F-measure (rouge-score). Empty outputs score 0 and are counted."""
    if len(preds) != len(golds):
        raise DataError(f"{len(preds)} predictions for {len(golds)} golds")
    scorer = _rouge()
    r1, rl = [], []
    for p, g in zip(preds, golds, strict=True):
        s = scorer.score(str(g), str(p))
        r1.append(s["rouge1"].fmeasure)
        rl.append(s["rougeL"].fmeasure)
    n = len(golds)
    return {
        "n": n,
        "n_empty": sum(1 for p in preds if not str(p).strip()),
        "rouge1": float(np.mean(r1)) if n else float("nan"),
        "rougeL": float(np.mean(rl)) if n else float("nan"),
    }


def compute_metrics(card: TaskCard, preds: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
    """All metrics of the task's kind (a superset of `card.metrics`), plus the parse counts."""
    if len(preds) != len(golds):
        raise DataError(f"{len(preds)} predictions for {len(golds)} golds")
    if card.kind == "generation":
        return generation_metrics(preds, golds)
    if card.kind == "rating":
        return rating_metrics(card, preds, golds)
    return label_metrics(card, preds, golds)
