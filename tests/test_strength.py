"""The strength control has effect across its range: the user's xS maps onto llama.cpp's LoRA scale
(log-linear below x1, where the adapter's effect saturates), and x0.5 and x2 answers differ from x1's
on a fixed query set. `p2p bench strength` reports the curve per task, with a PNG."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from p2p_local.pipeline import STRENGTH_FLOOR, lora_scale

TASK = "movielens-rating"


def test_lora_scale_is_monotonic_and_exact_at_0_and_1() -> None:
    xs = np.linspace(0, 2, 41)
    ys = [lora_scale(x) for x in xs]
    assert ys[0] == 0.0 and lora_scale(1.0) == 1.0 and lora_scale(2.0) == 3.0
    assert all(b > a for a, b in zip(ys, ys[1:], strict=False))
    assert lora_scale(0.5) == pytest.approx(STRENGTH_FLOOR ** 0.5)


def test_half_and_double_strength_move_the_answer(session) -> None:
    from p2p_lab.bench import QUERIES

    def dists(x: float) -> np.ndarray:
        out = []
        for q in QUERIES:
            out.append(list(session.answer(q, profile="demo", task=TASK, scale=x).finish().distribution.values()))
        return np.array(out)

    half, one, two = dists(0.5), dists(1.0), dists(2.0)
    tv = lambda a, b: 0.5 * np.abs(a - b).sum(axis=1)  # noqa: E731
    # Measured on the demo profile (reports/bench-strength.md): TV from x1 ~0.1-0.2 at x0.5, and the
    # median answer changes on several of the 8 queries; a control with no step would give ~0.
    assert tv(half, one).mean() > 0.05 and tv(two, one).mean() > 0.01
    labels = lambda p: [int(np.searchsorted(np.cumsum(r), 0.5 - 1e-9)) for r in p]  # noqa: E731
    assert labels(half) != labels(one) and labels(two) != labels(one)


def test_bench_strength_writes_the_curve_and_a_png(p2p_home, monkeypatch, tmp_path: Path, capsys) -> None:
    from p2p_lab import bench
    from p2p_local.cli import main

    monkeypatch.setattr(bench, "STRENGTH_MAX_QUERIES", 1)
    monkeypatch.setattr(bench, "STRENGTHS", (0.0, 0.5, 1.0, 2.0))
    monkeypatch.setattr(bench.bench_strength, "__defaults__", ((0.0, 0.5, 1.0, 2.0),))
    out = tmp_path / "bench.json"
    assert main(["bench", "strength", "--json-out", str(out)]) == 0
    r = json.loads(out.read_text())["strength"]
    assert r["strengths"] == [0.0, 0.5, 1.0, 2.0] and r["lora_scales"][1] == pytest.approx(0.1)
    for task, t in r["tasks"].items():
        assert len(t["effect"]) == 4 and t["effect"][0] == 0.0 and t["differs_from_x1"][2] == 0.0, task
    assert (tmp_path / "bench-strength.png").stat().st_size > 1000
    assert "movielens-rating: share of answers unlike x1's" in (tmp_path / "bench.md").read_text()
    assert "strength" in capsys.readouterr().out


def test_strength_queries_are_the_cards_samples_and_a_task_without_them_is_left_out() -> None:
    from p2p_lab.bench import strength_queries
    from p2p_local.data.format import TaskCard, builtin_card

    bare = TaskCard.from_dict(builtin_card(TASK).to_dict() | {"name": "bare", "samples": []})
    said: list[str] = []
    queries = strength_queries({TASK: builtin_card(TASK), "bare": bare}, log=said.append)
    assert queries == {TASK: builtin_card(TASK).samples}
    assert said == ["bench strength: bare left out (its task card has no samples)"]
