"""Training at scale, the parts that need no model: task-balanced sampling, the wall-clock schedule and
checkpoint selection by validation loss (the tiny recipe runs them end to end in test_train_recipe)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainer.config import recipe
from trainer.train import TaskMixture, lr_lambda, val_score


@pytest.mark.parametrize("power", [0.0, 0.5, 1.0])
def test_tasks_are_drawn_in_proportion_to_size_to_the_power(power):
    sizes = [90_000, 10_000, 1_000]
    mix = TaskMixture(sizes, seed=0, power=power)
    drawn = np.bincount([t for step in range(400) for t, _ in mix.batch(step, 64)], minlength=3) / (400 * 64)
    want = np.array(sizes, dtype=float) ** power
    assert np.allclose(drawn, want / want.sum(), atol=0.01)


def test_an_empty_task_is_never_drawn():
    mix = TaskMixture([100, 0, 50], seed=1, power=0.0)
    assert all(t != 1 for step in range(50) for t, _ in mix.batch(step, 16))


def test_the_wall_clock_schedule_follows_the_budget_not_the_steps():
    cfg = recipe("tiny", steps=1_000_000, warmup_frac=0.1, lr_min_ratio=0.1, max_wall_s=100, time_schedule=True)
    clock = {"progress": 0.0}
    f = lr_lambda(cfg, clock)
    at = {}
    for t in (0.05, 0.1, 0.55, 1.0):
        clock["progress"] = t
        at[t] = f(12345)  # the step does not matter
    assert at[0.05] == pytest.approx(0.5)
    assert at[0.1] == pytest.approx(1.0)
    assert at[0.55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert at[1.0] == pytest.approx(0.1)
    assert lr_lambda(cfg)(0) == pytest.approx(1 / int(0.1 * cfg.steps))  # without a clock: by steps


def test_checkpoints_are_chosen_by_the_summed_validation_loss():
    ev = {"a": {"loss_true": 3.5, "loss_shuffled": 4.0}, "b": {"loss_true": 1.25}, "c": {"n": 0}}
    assert val_score(ev) == pytest.approx(4.75)
