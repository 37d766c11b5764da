"""Scores and 95% bootstrap confidence intervals, resampling USERS (not queries).

Why users: a test user contributes several queries that share one profile, so queries are not
independent; resampling queries would make the intervals too narrow. Every metric here is a function
of per-user *sums* of per-query statistics (absolute error, log-loss, confusion counts, ...), so a
bootstrap replicate is one matrix product: counts [B, U] @ per-user sums [U, K].

Per-query records (what the runner stores) hold raw predictions, not scores, so metrics can change
without re-running the model:
- rating / label: `lp` = log-probabilities over the task's labels (renormalised among them);
- generation: `text` = the model's output.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from p2p_local.data.format import TaskCard
from p2p_local.pipeline import median_index
from p2p_local.profile import first_word, starts_lowercase

# Metric name -> True when higher is better.
HIGHER_IS_BETTER = {
    "mae": False, "rmse": False, "mae_argmax": False, "mae_ev": False, "rmse_ev": False, "ce": False,
    "acc": True, "f1": True, "rouge1": True, "rougeL": True, "rougeL_new": True, "nll": False,
    "first_word": True, "case": True, "case_hist": True, "copy": False, "copy_real": False,
}
PRIMARY = {"rating": "mae", "label": "acc", "generation": "rougeL"}
METRIC_DOC = {
    "mae": "MAE, decoding the median of the predicted distribution (the MAE-optimal choice)",
    "rmse": "RMSE of the median",
    "mae_argmax": "MAE, decoding the most likely label",
    "mae_ev": "MAE of the expected value",
    "rmse_ev": "RMSE of the expected value (the RMSE-optimal choice)",
    "ce": "cross-entropy of the target under the predicted label distribution (nats)",
    "acc": "accuracy of the most likely label",
    "f1": "macro F1 of the most likely label",
    "rouge1": "ROUGE-1 F-measure",
    "rougeL": "ROUGE-L F-measure",
    "rougeL_new": "ROUGE-L on the queries whose real output is new (not one of the user's earlier outputs): no "
                  "credit for repeating the past",
    "nll": "per-token negative log-likelihood of the user's real output, teacher-forced (nats/token)",
    "first_word": "share of answers whose first word is the real output's (case-insensitive)",
    "case": "share of answers that open in the real output's case (lower-case or not)",
    "case_hist": "for users whose history opens >= 90% in one case: share of answers that open in that case",
    "copy": "share of answers equal (case- and whitespace-insensitively) to one of the user's earlier outputs",
    "copy_real": "the same share for the user's real outputs (what an answer's copy rate should be near)",
}
CASE_CONSISTENT = 0.9  # a history that opens in one case this often has a case style an answer should keep


def metric_names(kind: str) -> list[str]:
    if kind == "rating":
        return ["mae", "rmse", "mae_argmax", "mae_ev", "rmse_ev", "ce", "acc"]
    if kind == "label":
        return ["acc", "f1", "ce"]
    return ["rouge1", "rougeL", "rougeL_new", "nll", "first_word", "case", "case_hist", "copy", "copy_real"]


# --- per-query statistics ------------------------------------------------------------------------
class Scorer:
    """Turns one query record into a fixed-length statistics vector, and sums of those into metrics."""

    def __init__(self, card: TaskCard) -> None:
        self.card = card
        self.kind = card.kind
        self.labels = list(card.labels)
        if self.kind == "rating":
            self.values = np.array([float(x) for x in self.labels])
        self.keys = self._keys()
        self.index = {k: i for i, k in enumerate(self.keys)}

    def _keys(self) -> list[str]:
        if self.kind == "rating":
            return ["n", "n_ce", "abs_med", "sq_med", "abs_arg", "abs_ev", "sq_ev", "nll", "correct",
                    "unparseable"]
        if self.kind == "label":
            per_label = [f"{s}_{i}" for i in range(len(self.labels)) for s in ("tp", "fp", "fn")]
            return ["n", "n_ce", "nll", "correct", "unparseable", *per_label]
        return ["n", "rouge1", "rougeL", "unparseable", "tok_nll", "n_tok", "first_match", "case_match",
                "n_case_hist", "case_hist_ok", "copy", "real_copy", "rougeL_new", "n_new"]

    def query_stats(self, rec: Mapping) -> np.ndarray:
        v = np.zeros(len(self.keys))
        ix = self.index
        v[ix["n"]] = 1.0
        if rec.get("unparseable"):
            v[ix["unparseable"]] = 1.0
        if self.kind == "generation":
            r1, rl = self.rouge(rec.get("text", ""), rec["target"])
            v[ix["rouge1"]], v[ix["rougeL"]] = r1, rl
            if rec.get("n_tok"):  # records made before the NLL was measured have none
                v[ix["tok_nll"]], v[ix["n_tok"]] = float(rec["nll_sum"]), float(rec["n_tok"])
            text, target = rec.get("text", "") or "", str(rec["target"])
            v[ix["first_match"]] = float(first_word(text) is not None and first_word(text) == first_word(target))
            v[ix["case_match"]] = float(starts_lowercase(text) == starts_lowercase(target))
            v[ix["copy"]], v[ix["real_copy"]] = float(bool(rec.get("copy"))), float(bool(rec.get("real_copy")))
            if not rec.get("real_copy"):  # a real output that repeats the past would reward copying it
                v[ix["rougeL_new"]], v[ix["n_new"]] = rl, 1.0
            lower = rec.get("hist_lower")  # the history's share of lower-case openings (runner)
            if lower is not None and (lower >= CASE_CONSISTENT or lower <= 1 - CASE_CONSISTENT):
                v[ix["n_case_hist"]] = 1.0
                v[ix["case_hist_ok"]] = float(starts_lowercase(text) == (lower >= CASE_CONSISTENT))
            return v
        lp = np.asarray(rec["lp"], dtype=np.float64)
        p = np.exp(lp - lp.max())
        p /= p.sum()
        arg = int(np.argmax(p))
        target = str(rec["target"])
        t = self.labels.index(target) if target in self.labels else None
        if t is not None:
            v[ix["n_ce"]] = 1.0
            v[ix["nll"]] = -math.log(max(float(p[t]), 1e-12))
        v[ix["correct"]] = float(arg == t)
        if self.kind == "rating":
            y = float(target)
            med = float(self.values[median_index(p)])
            ev = float(p @ self.values)
            v[ix["abs_med"]], v[ix["sq_med"]] = abs(med - y), (med - y) ** 2
            v[ix["abs_arg"]] = abs(float(self.values[arg]) - y)
            v[ix["abs_ev"]], v[ix["sq_ev"]] = abs(ev - y), (ev - y) ** 2
        else:
            v[ix[f"tp_{arg}"]] += float(arg == t)
            v[ix[f"fp_{arg}"]] += float(arg != t)
            if t is not None:
                v[ix[f"fn_{t}"]] += float(arg != t)
        return v

    def rouge(self, prediction: str, target: str) -> tuple[float, float]:
        # The project's one ROUGE (data.metrics: rouge-score, LaMP's settings).
        from p2p_lab.metrics import example_scores

        s = example_scores(self.card, [prediction], [target])
        return float(s["rouge1"][0]), float(s["rougeL"][0])

    def metrics(self, sums: np.ndarray) -> dict[str, np.ndarray]:
        """Metrics from summed statistics; `sums` is [K] or [B, K] (one row per bootstrap replicate)."""
        s = np.atleast_2d(sums)
        col = {k: s[:, i] for k, i in self.index.items()}
        n = np.maximum(col["n"], 1e-12)
        out: dict[str, np.ndarray] = {}
        if self.kind == "generation":
            out["rouge1"], out["rougeL"] = col["rouge1"] / n, col["rougeL"] / n
            out["rougeL_new"] = col["rougeL_new"] / np.where(col["n_new"] > 0, col["n_new"], np.nan)
            out["nll"] = col["tok_nll"] / np.where(col["n_tok"] > 0, col["n_tok"], np.nan)
            out["first_word"], out["case"] = col["first_match"] / n, col["case_match"] / n
            out["case_hist"] = col["case_hist_ok"] / np.where(col["n_case_hist"] > 0, col["n_case_hist"], np.nan)
            out["copy"], out["copy_real"] = col["copy"] / n, col["real_copy"] / n
            return out
        n_ce = np.where(col["n_ce"] > 0, col["n_ce"], np.nan)
        if self.kind == "rating":
            out["mae"] = col["abs_med"] / n
            out["rmse"] = np.sqrt(col["sq_med"] / n)
            out["mae_argmax"] = col["abs_arg"] / n
            out["mae_ev"] = col["abs_ev"] / n
            out["rmse_ev"] = np.sqrt(col["sq_ev"] / n)
            out["ce"] = col["nll"] / n_ce
            out["acc"] = col["correct"] / n
            return out
        out["acc"] = col["correct"] / n
        f1s = []
        for i in range(len(self.labels)):
            tp, fp, fn = col[f"tp_{i}"], col[f"fp_{i}"], col[f"fn_{i}"]
            denom = 2 * tp + fp + fn
            f1s.append(np.where(denom > 0, 2 * tp / np.maximum(denom, 1e-12), np.nan))
        with np.errstate(invalid="ignore"):
            out["f1"] = np.nanmean(np.stack(f1s), axis=0) if f1s else np.full(len(s), np.nan)
        out["ce"] = col["nll"] / n_ce
        return out


# --- bootstrap ------------------------------------------------------------------------------------
@dataclass
class Estimate:
    value: float
    lo: float
    hi: float

    def to_dict(self) -> dict[str, float | None]:
        return {"value": _finite(self.value), "ci": [_finite(self.lo), _finite(self.hi)]}


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def bootstrap_weights(n_users: int, n_boot: int, seed: int) -> np.ndarray:
    """[B, U] resampling counts (each row draws U users with replacement). Seeded: the same users
    get the same weights in every method, which is what makes paired differences paired."""
    rng = np.random.default_rng(seed)
    if n_users == 0:
        return np.zeros((n_boot, 0))
    return rng.multinomial(n_users, np.full(n_users, 1.0 / n_users), size=n_boot).astype(np.float64)


def estimate(metric_fn: Callable[[np.ndarray], np.ndarray], user_sums: np.ndarray, weights: np.ndarray
             ) -> Estimate:
    """Point value on all users + the 2.5/97.5 percentiles over bootstrap replicates."""
    point = float(metric_fn(user_sums.sum(axis=0))[0])
    reps = metric_fn(weights @ user_sums)
    reps = reps[np.isfinite(reps)]
    if len(reps) == 0:
        return Estimate(point, math.nan, math.nan)
    lo, hi = np.percentile(reps, [2.5, 97.5])
    return Estimate(point, float(lo), float(hi))


def summarize(scorer: Scorer, user_sums: np.ndarray, metrics: Sequence[str], n_boot: int = 1000,
              seed: int = 0) -> dict[str, Estimate]:
    """Every metric of one method with its 95% CI over users. `user_sums`: [U, K]."""
    w = bootstrap_weights(len(user_sums), n_boot, seed)
    return {m: estimate(lambda s, m=m: scorer.metrics(s)[m], user_sums, w) for m in metrics}


def paired_difference(scorer: Scorer, sums_a: np.ndarray, sums_b: np.ndarray, metrics: Sequence[str],
                      n_boot: int = 1000, seed: int = 0) -> dict[str, Estimate]:
    """metric(a) - metric(b) on the same users (rows aligned), CI from one shared resampling of users."""
    assert sums_a.shape == sums_b.shape, "paired rows must be the same users in the same order"
    w = bootstrap_weights(len(sums_a), n_boot, seed)
    out = {}
    for m in metrics:
        def diff(s_a: np.ndarray, s_b: np.ndarray, m: str = m) -> np.ndarray:
            return scorer.metrics(s_a)[m] - scorer.metrics(s_b)[m]

        point = float(diff(sums_a.sum(0), sums_b.sum(0))[0])
        reps = diff(w @ sums_a, w @ sums_b)
        reps = reps[np.isfinite(reps)]
        lo, hi = np.percentile(reps, [2.5, 97.5]) if len(reps) else (math.nan, math.nan)
        out[m] = Estimate(point, float(lo), float(hi))
    return out
