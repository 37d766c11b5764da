"""Scoring and user-level bootstrap (p2p_lab.eval.stats): exact values on hand-made records."""

from __future__ import annotations

import math

import numpy as np
import pytest

from p2p_lab.eval.stats import (
    Scorer,
    bootstrap_weights,
    median_index,
    paired_difference,
    summarize,
)
from p2p_lab.metrics import example_scores
from p2p_local.data.format import TaskCard, builtin_card


def _lp(p):
    return list(np.log(np.asarray(p, dtype=np.float64)))


def test_rating_decodings_and_cross_entropy():
    s = Scorer(builtin_card("movielens-rating"))
    # argmax = 5 (0.4), median = 4 (cdf reaches 0.5 at "4"), expected value = 3.6
    p = [0.1, 0.1, 0.2, 0.2, 0.4]
    v = s.query_stats({"lp": _lp(p), "target": "4"})
    m = {k: float(x[0]) for k, x in s.metrics(v).items()}
    assert m["mae"] == 0.0  # median 4
    assert m["mae_argmax"] == 1.0  # argmax 5
    assert m["mae_ev"] == pytest.approx(abs(0.1 + 0.2 + 0.6 + 0.8 + 2.0 - 4))
    assert m["ce"] == pytest.approx(-math.log(0.2))
    assert m["acc"] == 0.0


def test_median_index_is_first_label_reaching_half():
    assert median_index(np.array([0.5, 0.5])) == 0
    assert median_index(np.array([0.2, 0.2, 0.6])) == 2
    assert median_index(np.array([0.1, 0.3, 0.1, 0.5])) == 2


def test_label_f1_matches_sklearn():
    from sklearn.metrics import f1_score

    card = TaskCard(name="t", kind="label", template="{input} ->", description="d", labels=["a", "b", "c"])
    s = Scorer(card)
    golds = ["a", "a", "b", "c", "c", "c"]
    preds = ["a", "b", "b", "c", "a", "c"]
    onehot = {lab: [0.8 if x == lab else 0.1 for x in card.labels] for lab in card.labels}
    total = sum(s.query_stats({"lp": _lp(onehot[p]), "target": g}) for p, g in zip(preds, golds, strict=True))
    m = s.metrics(total)
    assert m["f1"][0] == pytest.approx(f1_score(golds, preds, average="macro"))
    assert m["acc"][0] == pytest.approx(4 / 6)


def test_generation_rouge_agrees_with_data_metrics():
    card = builtin_card("commit-subject")
    s = Scorer(card)
    pred, gold = "Fixes the capturing of stderr", "fix capture of stderr output"
    v = s.query_stats({"text": pred, "target": gold})
    ref = example_scores(card, [pred], [gold])
    m = s.metrics(v)
    assert m["rouge1"][0] == pytest.approx(ref["rouge1"][0])
    assert m["rougeL"][0] == pytest.approx(ref["rougeL"][0])
    empty = s.query_stats({"text": "", "target": gold, "unparseable": True})
    assert empty[s.index["unparseable"]] == 1 and s.metrics(empty)["rougeL"][0] == 0


def test_rouge_on_new_outputs_gives_no_credit_for_a_repeated_real_output():
    s = Scorer(builtin_card("commit-subject"))
    copied = s.query_stats({"text": "add changelog entry", "target": "Add changelog entry", "copy": True,
                            "real_copy": True})
    fresh = s.query_stats({"text": "fix parser", "target": "fix the parser", "real_copy": False})
    m = s.metrics(copied + fresh)
    assert m["rougeL"][0] == pytest.approx((1.0 + s.metrics(fresh)["rougeL"][0]) / 2)
    assert m["rougeL_new"][0] == pytest.approx(s.metrics(fresh)["rougeL"][0])
    assert math.isnan(s.metrics(copied)["rougeL_new"][0])  # no new output: undefined, not 0


def test_bootstrap_resamples_users_and_pairs():
    s = Scorer(builtin_card("movielens-rating"))
    sure = {lab: [0.96 if x == lab else 0.01 for x in s.labels] for lab in s.labels}
    # Ten users: half always right, half always off by 2 -> MAE 1.0, and the CI must be wide.
    users = []
    for u in range(10):
        pred = "3" if u % 2 == 0 else "5"
        users.append(sum(s.query_stats({"lp": _lp(sure[pred]), "target": "3"}) for _ in range(4)))
    sums = np.stack(users)
    w = bootstrap_weights(10, 500, seed=1)
    assert w.shape == (500, 10) and (w.sum(1) == 10).all()
    est = summarize(s, sums, ["mae"], n_boot=500, seed=1)["mae"]
    assert est.value == pytest.approx(1.0)
    assert 0.2 < est.lo < 1.0 < est.hi < 1.8
    same = paired_difference(s, sums, sums, ["mae", "ce"], n_boot=200, seed=1)
    assert same["mae"].value == 0 and same["mae"].lo == 0 and same["mae"].hi == 0
    better = np.stack([sum(s.query_stats({"lp": _lp(sure["3"]), "target": "3"}) for _ in range(4))] * 10)
    d = paired_difference(s, better, sums, ["mae"], n_boot=500, seed=1)["mae"]
    assert d.value == pytest.approx(-1.0) and d.hi < 0  # the CI excludes 0


def test_estimates_are_deterministic_for_a_seed():
    s = Scorer(builtin_card("movielens-rating"))
    rng = np.random.default_rng(0)
    sums = np.stack([
        s.query_stats({"lp": _lp(rng.dirichlet(np.ones(5))), "target": str(rng.integers(1, 6))}) for _ in range(12)
    ])
    a = summarize(s, sums, ["mae", "ce"], 300, seed=3)
    b = summarize(s, sums, ["mae", "ce"], 300, seed=3)
    assert a == b
