"""Metrics: parsing model output into labels, unparseable outputs counted and scored, library values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from p2p_lab.data.lamp import lamp_card
from p2p_lab.metrics import compute_metrics, decode_distribution, example_scores, parse_label
from p2p_local.data.format import builtin_card
from p2p_local.errors import DataError

RATING = builtin_card("movielens-rating")
GEN = builtin_card("commit-subject")


@pytest.mark.parametrize(
    "text, label",
    [
        ("4", "4"), (" 5\n", "5"), ("3 stars", "3"), ("I'd say four.", "4"), ("4.5", "5"), ("2.4", "2"),
        ("10/10, really a 3", "3"), ("-1 then 2", "2"), ("", None), ("no idea", None), ("0", None), ("v2", None),
    ],
)  # fmt: skip
def test_parse_rating(text, label):
    assert parse_label(text, RATING) == label


def test_parse_text_labels():
    tags = lamp_card("LaMP_2")
    assert parse_label("It is Dark Comedy, I think", tags) == "dark comedy"  # longest label at a position
    assert parse_label("comedy or sci-fi", tags) == "comedy"  # earliest wins
    assert parse_label("classical music", tags) is None  # whole words only
    assert parse_label("answer: [2]", lamp_card("LaMP_1")) == "[2]"


def test_rating_metrics_count_and_penalise_unparseable():
    m = compute_metrics(RATING, ["4", "3", "no idea", "5"], ["4", "5", "1", "5"])
    assert m["n"] == 4 and m["n_unparseable"] == 1
    # errors 0, 2, 4 (unparseable scored as the farthest label from gold 1, i.e. 5), 0
    assert m["mae"] == pytest.approx(6 / 4)
    assert m["rmse"] == pytest.approx(math.sqrt((0 + 4 + 16 + 0) / 4))
    assert m["accuracy"] == pytest.approx(0.5)
    ex = example_scores(RATING, ["4", "3", "no idea", "5"], ["4", "5", "1", "5"])
    assert ex["abs_error"].tolist() == [0, 2, 4, 0] and ex["parsed"].tolist() == [1, 1, 0, 1]
    assert ex["abs_error"].mean() == pytest.approx(m["mae"])


def test_f1_matches_a_hand_computation():
    golds = ["1", "1", "2", "2", "3"]
    preds = ["1", "2", "2", "2", "garbage"]
    m = compute_metrics(RATING, preds, golds)
    # per class F1: "1": p=1, r=.5 -> 2/3; "2": p=2/3, r=1 -> .8; "3": p=0, r=0 -> 0 (the unparseable miss)
    assert m["f1_macro"] == pytest.approx((2 / 3 + 0.8 + 0) / 3)
    assert m["f1_weighted"] == pytest.approx((2 * 2 / 3 + 2 * 0.8 + 0) / 5)
    assert m["accuracy"] == pytest.approx(3 / 5) and m["n_unparseable"] == 1


def test_rouge_and_empty_outputs():
    m = compute_metrics(GEN, ["Fix the bug in the parser", ""], ["Fix the bug in the parser", "Add docs"])
    assert m["rouge1"] == pytest.approx(0.5) and m["rougeL"] == pytest.approx(0.5) and m["n_empty"] == 1
    part = compute_metrics(GEN, ["fix parser"], ["Fix the parser"])
    assert part["rouge1"] == pytest.approx(2 * (1 * 2 / 3) / (1 + 2 / 3))
    ex = example_scores(GEN, ["a b", "c"], ["a b", "d"])
    assert ex["rouge1"].tolist() == [1.0, 0.0]


def test_bad_inputs_raise():
    with pytest.raises(DataError, match="gold labels"):
        compute_metrics(RATING, ["4"], ["4.5"])
    with pytest.raises(DataError, match="predictions for"):
        compute_metrics(GEN, ["a"], ["a", "b"])
    empty = compute_metrics(RATING, [], [])
    assert empty["n"] == 0 and math.isnan(empty["mae"])


def test_decode_distribution():
    # The last two rows tell the three rules apart: a median-decoder that fell back to argmax (or to the
    # mean) fails here. Row 4: argmax 5, median 2 (the cdf reaches 0.5 at "2"), mean 3.01 -> 3.
    # Row 5: argmax 1, median 3, mean 2.9 -> 3.
    p = np.array([[0.1, 0.1, 0.2, 0.3, 0.3], [0.5, 0, 0, 0, 0.5], [0, 0, 0, 0.6, 0.4],
                  [0.46, 0.05, 0, 0, 0.49], [0.4, 0.05, 0.3, 0.05, 0.2]])
    assert decode_distribution(RATING, p, "argmax") == ["4", "1", "4", "5", "1"]
    assert decode_distribution(RATING, p, "median") == ["4", "1", "4", "2", "3"]
    assert decode_distribution(RATING, p, "mean") == ["4", "3", "4", "3", "3"]
    with pytest.raises(DataError):
        decode_distribution(RATING, p, "mode")
