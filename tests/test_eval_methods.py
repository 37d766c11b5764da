"""Evaluation methods on real data and the real GGUF model: prompts fit, no future leaks, classic
references behave, missing inputs are skipped (never faked), and P2P with a zero adapter equals Base."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from p2p_lab.data.converters import convert
from p2p_lab.eval.methods import (
    METHODS,
    OPPU,
    P2P,
    PAG,
    RAG,
    AllHistory,
    Base,
    EvalContext,
    GlobalMean,
    LogReg,
    MethodOptions,
    MTLoRA,
    Skip,
    UserItemBias,
    UserMean,
    default_methods,
    fit_prompt,
)
from p2p_lab.eval.runner import build_queries
from p2p_local.data.format import Item, User, builtin_card


@pytest.fixture(scope="module")
def movielens() -> list[User]:
    return convert("movielens-rating").users


def _ctx(card, users, train, engine, tmp_path: Path, n_queries: int = 3, **opts) -> EvalContext:
    return EvalContext(card=card, train=train, users=users, queries=build_queries(users, n_queries),
                       options=MethodOptions(n_ctx=engine.n_ctx, **opts), run_dir=tmp_path, task=card.name,
                       log=lambda m: None, _engine=engine)


def test_default_methods_by_kind():
    assert set(default_methods("rating")) == set(METHODS)
    gen = default_methods("generation")
    assert "user-mean" not in gen and "logreg" not in gen and {"base", "rag", "p2p", "oppu"} <= set(gen)
    assert "user-item-bias" not in default_methods("label")


def test_all_history_fills_the_context_with_the_newest_earlier_items(movielens, engine, tmp_path):
    card = builtin_card("movielens-rating")
    user = max(movielens, key=lambda u: len(u.items))  # thousands of items: far more than fit
    ctx = _ctx(card, [user], [], engine, tmp_path)
    m = AllHistory()
    m.prepare(ctx)
    first = ctx.queries[user.user_id][0]  # later items exist: they must never appear
    prompt = m.prompt(ctx.request(first))
    n = len(engine.tokenize(prompt))
    assert engine.n_ctx - 120 < n <= engine.n_ctx - 1  # filled, and room for the answer token
    assert prompt.endswith(card.prompt(first.item.input))
    assert card.prompt(first.history[-1].input) + first.history[-1].output in prompt  # newest earlier item
    assert first.history[0].input not in prompt  # the oldest did not fit
    for later in user.items[len(first.history) + 1:]:
        assert later.input not in prompt
    rec = m.predict(ctx, first)
    assert len(rec["lp"]) == 5 and np.isclose(np.exp(rec["lp"]).sum(), 1, atol=1e-3)
    assert 0 < rec["mass"] <= 1 and isinstance(rec["unparseable"], bool)


def test_rag_and_pag_prompts(movielens, engine, tmp_path):
    card = builtin_card("movielens-rating")
    user = movielens[5]
    ctx = _ctx(card, [user], [], engine, tmp_path)
    q = ctx.queries[user.user_id][-1]
    rag, pag = RAG(), PAG()
    rag.prepare(ctx)
    pag.prepare(ctx)
    retrieved = ctx.profile(q).retrieved
    assert len(retrieved) == 2
    p = rag.prompt(ctx.request(q))
    shots = [card.prompt(it.input) + it.output for it in retrieved]
    assert p == "\n\n".join([shots[1], shots[0], card.prompt(q.item.input)])  # best example nearest the query
    p = pag.prompt(ctx.request(q))
    assert p.startswith("About this user: " + ctx.profile(q).summary) and shots[0] in p and shots[1] not in p
    assert ctx.profile(q).n_history == len(q.history)  # the profile is built from earlier items only


def test_long_generation_input_is_cut_to_fit(engine, tmp_path):
    card = builtin_card("popquorn-email-rewrite")
    long_text = "Please send me the quarterly numbers before Friday. " * 200
    user = User("u", [Item("hi there", "Hello.", None), Item(long_text, "Dear team, numbers by Friday.", None)])
    ctx = _ctx(card, [user], [user], engine, tmp_path, max_tokens=8)
    q = ctx.queries["u"][0]
    prompt, kept = fit_prompt(ctx, ctx.request(q), "", ["Email:\nhi there\nRewritten by the user:\nHello."])
    assert len(engine.tokenize(prompt)) <= engine.n_ctx - 8 - 4
    assert prompt.startswith("Email:\nPlease send me") and kept == 0  # the query wins over the example
    out = Base()
    out.prepare(ctx)
    rec = out.predict(ctx, q)
    assert isinstance(rec["text"], str) and rec["unparseable"] == (not rec["text"])


def test_classic_references(movielens, tmp_path):
    card = builtin_card("movielens-rating")
    train, test = movielens[:200], movielens[200:206]
    ctx = EvalContext(card=card, train=train, users=test, queries=build_queries(test, 3),
                      options=MethodOptions(logreg_users=40), run_dir=tmp_path, log=lambda m: None)
    q = ctx.queries[test[0].user_id][0]
    for cls in (GlobalMean, UserMean, UserItemBias, LogReg):
        m = cls()
        m.prepare(ctx)
        rec = m.predict(ctx, q)
        p = np.exp(rec["lp"])
        assert p.shape == (5,) and np.isclose(p.sum(), 1, atol=1e-4) and (p > 0).all(), cls.name
    assert ctx._engine is None  # classic references never load the model

    # The user-mean follows the user's own labels; the bias model follows the item's reputation.
    fives = User("f", [Item(f"m{i}", "5", float(i)) for i in range(20)] + [Item("q", "1", 99.0)])
    um = UserMean()
    um.prepare(ctx)
    assert int(np.argmax(um.predict(ctx, build_queries([fives], 1)["f"][0])["lp"])) == 4
    loved = [User(f"t{i}", [Item("X", "5", 1.0, {"item_id": 1}), Item("Y", "1", 2.0, {"item_id": 2})]) for i in range(30)]
    ctx2 = EvalContext(card=card, train=loved, users=[], queries={}, options=MethodOptions(), run_dir=tmp_path)
    uib = UserItemBias()
    uib.prepare(ctx2)
    hist = [Item("Z", "3", 0.0, {"item_id": 3})]
    assert uib.point(hist, Item("X", "", 5.0, {"item_id": 1})) > uib.point(hist, Item("Y", "", 5.0, {"item_id": 2})) + 1
    with pytest.raises(Skip, match="training users"):
        GlobalMean().prepare(EvalContext(card=card, train=[], users=[], queries={}, options=MethodOptions(),
                                         run_dir=tmp_path))


def test_missing_inputs_are_skipped_with_a_reason(movielens, engine, tmp_path):
    card = builtin_card("movielens-rating")
    ctx = _ctx(card, movielens[:3], movielens[3:10], engine, tmp_path, mtlora=tmp_path / "none.gguf",
               oppu_dir=tmp_path / "no-oppu", bundle=str(tmp_path / "no-bundle"))
    with pytest.raises(Skip, match="no MT-LoRA adapter at .*none.gguf"):
        MTLoRA().prepare(ctx)
    with pytest.raises(Skip, match="no OPPU adapters"):
        OPPU().prepare(ctx)
    with pytest.raises(Skip, match="no hypernetwork bundle"):
        P2P().prepare(ctx)


def test_p2p_with_a_zero_adapter_equals_base(movielens, engine, tmp_path, monkeypatch):
    """A bundle that emits B = 0 (the neutral stand-in, exported here): the whole P2P path (profile ->
    encoder -> hypernetwork -> GGUF -> attach) must then reproduce Base exactly. The eval itself
    refuses a neutral bundle."""
    from p2p_local.bundle import Bundle
    from trainer.export import export_bundle, neutral_hypernet

    neutral = export_bundle(neutral_hypernet(), tmp_path / "neutral-bundle", neutral=True)
    card = builtin_card("movielens-rating")
    users = movielens[20:22]
    ctx = _ctx(card, users, [], engine, tmp_path, n_queries=2, bundle=str(neutral))
    with pytest.raises(Skip, match="neutral"):
        P2P().prepare(ctx)
    real_load = Bundle.load

    def load_as_trained(*a, **kw):
        b = real_load(*a, **kw)
        b.neutral = False
        return b

    monkeypatch.setattr(Bundle, "load", load_as_trained)
    base, p2p, shuffled, rnd = Base(), P2P(), METHODS["p2p-shuffled"](), METHODS["p2p-random"]()
    for m in (base, p2p, shuffled, rnd):
        m.prepare(ctx)
    assert shuffled.partner == {users[0].user_id: users[1].user_id, users[1].user_id: users[0].user_id}
    for user in users:
        qs = ctx.queries[user.user_id]
        expected = [base.predict(ctx, q)["lp"] for q in qs]
        for m in (p2p, shuffled, rnd):
            m.start_user(ctx, user, qs)
            got = [m.predict(ctx, q)["lp"] for q in qs]
            m.end_user(ctx)
            np.testing.assert_allclose(got, expected, atol=2e-3)
    assert engine.active == (None, 0.0)  # every per-query adapter was detached and freed


def test_the_cards_examples_reach_the_evaluation_and_key_only_the_methods_that_show_them(p2p_home: Path):
    """The evaluation reads the app's card (not the copy saved with the prepared data), and a change of the
    card's `examples` re-runs only the methods whose prompt shows them: P2P and its shuffled control."""
    import dataclasses
    import json
    from types import SimpleNamespace

    from p2p_lab.data.prepare import DATA_VERSION, SPLITS, load_task, task_dir
    from p2p_lab.eval.methods import METHODS
    from p2p_lab.eval.runner import EvalConfig, run_key

    card = builtin_card("commit-subject")
    d = task_dir("commit-subject")
    d.mkdir(parents=True)
    dataclasses.replace(card, examples=0).save(d / "card.json")  # saved before the card changed
    for name in SPLITS:
        (d / f"{name}.jsonl").write_text("")
    (d / "stats.json").write_text(json.dumps({"version": DATA_VERSION}))
    assert card.examples == 2 and load_task("commit-subject", build=False).card == card

    assert run_key(EvalConfig(), card, "s") == run_key(EvalConfig(), dataclasses.replace(card, examples=0), "s")
    shows = {name for name, cls in METHODS.items() if getattr(cls, "uses_examples", False)}
    assert shows == {"p2p", "p2p-shuffled", "p2p-before"}
    m = METHODS["p2p"]()
    m.bundle, m.examples, m.decoding = SimpleNamespace(sha256="ab" * 32), 2, ""
    assert m.fingerprint() == "ab" * 8 + ":examples=2"
