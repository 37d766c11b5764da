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


@pytest.mark.real
def test_samples_do_not_depend_on_the_number_of_workers(torch_base, shared_data):
    """The forked sample builder and its per-item embedding cache give the same bits as one process."""
    from p2p_lab.data.converters import convert
    from p2p_local.data.format import builtin_card
    from trainer.samples import _embed_parallel, build_samples, load_encoder

    _, tok = torch_base
    enc = load_encoder()
    card, users = builtin_card("popquorn-email-rewrite"), convert("popquorn-email-rewrite", shared_data).users[:10]
    embed = lambda texts: dict(zip(texts, enc.embed_each(texts), strict=True))  # noqa: E731
    kw = dict(items_per_user=3, last=False, seed=0, max_prompt_tokens=64, max_target_tokens=24)
    one, two = (build_samples(card, users, tok, embed, workers=w, **kw) for w in (1, 2))
    assert len(one) > 10 and one.prompt_ids == two.prompt_ids and one.user_ids == two.user_ids
    assert one.embeddings.tobytes() == two.embeddings.tobytes() and one.features.tobytes() == two.features.tobytes()
    texts = [f"item {i}" for i in range(1100)]
    assert np.array_equal(np.stack(_embed_parallel(enc, texts, 2, print)), enc.embed_each(texts))


class _WordTokenizer:
    """A stand-in for the HF tokenizer: one token per whitespace-separated word, BOS on request."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [hash(w) % 1000 + 1 for w in text.split()]
        return {"input_ids": ([0] if add_special_tokens else []) + ids}

    def decode(self, ids: list[int]) -> str:
        raise AssertionError("no cut expected in these prompts")


def test_the_sample_prompt_is_the_apps_prompt_and_drops_the_oldest_example_first():
    from p2p_local.data.format import Item, builtin_card
    from p2p_local.pipeline import make_profile
    from trainer.samples import sample_prompt

    card = builtin_card("commit-subject")
    assert card.examples == 2 and recipe("full-examples").prompt_examples
    history = [Item(f"files: src/mod{i}.py\n", f"fix mod{i} parser", float(i)) for i in range(6)]
    query = Item("files: src/mod5.py\n", "", 10.0)
    profile = make_profile(card, history, query)
    second, best = (card.prompt(it.input) + it.output for it in reversed(list(profile.retrieved)[:2]))
    tok = _WordTokenizer()
    assert sample_prompt(card, query, profile, tok, 320, False) == card.prompt(query.input)
    full = sample_prompt(card, query, profile, tok, 320, True)
    assert full == f"{second}\n\n{best}\n\n{card.prompt(query.input)}"  # best last, nearest the query
    n_full = len(tok(full)["input_ids"])
    one = sample_prompt(card, query, profile, tok, n_full - 1, True)
    assert one == f"{best}\n\n{card.prompt(query.input)}"  # the budget drops the second-best example
