"""Every entry point answers through the one route, `pipeline.Route.answer` (Request -> Answer): `p2p ask`,
the git hook, adapter export and the evaluation's methods here; the chat in tests/test_tui_real.py.
A rating answer evaluates its prompt once (counted at the engine)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from p2p_local import pipeline
from p2p_local.cli import main
from p2p_local.data.format import builtin_card
from p2p_local.engine import Engine
from p2p_local.errors import UsageError

pytestmark = pytest.mark.real
Q = "Heat (1995) | Genres: Action|Crime|Thriller"
TASK = "movielens-rating"


@pytest.fixture
def routed(monkeypatch) -> list[tuple[str, pipeline.Request, pipeline.Answer]]:
    """Each `Route.answer` call: (the route's class, the request, the Answer it returned)."""
    calls: list = []
    real = pipeline.Route.answer

    def spy(self, request, **kw):
        answer = real(self, request, **kw)
        calls.append((type(self).__name__, request, answer))
        return answer

    monkeypatch.setattr(pipeline.Route, "answer", spy)
    return calls


@pytest.fixture
def evaluations(monkeypatch) -> list[str]:
    """Each prompt the engine evaluates for a distribution (`Engine.last_logits`)."""
    seen: list = []
    real = Engine.last_logits

    def count(self, prompt):
        seen.append(prompt)
        return real(self, prompt)

    monkeypatch.setattr(Engine, "last_logits", count)
    return seen


def test_ask_renders_the_routes_answer_with_its_distribution(session, routed, evaluations, capsys) -> None:
    assert main(["ask", Q, "--profile", "demo", "--task", TASK, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    [(route, request, answer)] = routed
    assert route == "_CachedRoute" and request.card.name == TASK and request.profile_name == "demo"
    assert out["text"] == answer.text and out["adapter"] == str(answer.adapter) and out["scale"] == 1.0
    assert list(out["distribution"]) == builtin_card(TASK).labels
    assert out["card"] == "same"  # the bundle was trained on this card's prompt (tests/test_bundle_cards.py)
    assert out["distribution"] == pytest.approx(answer.distribution, abs=1e-6)
    assert len(evaluations) == 1  # the answer and its distribution: one evaluation of the prompt


def test_ask_free_chat_and_the_profile_rule(session, routed, capsys) -> None:
    assert main(["ask", "Hello", "--task", "free", "--max-tokens", "4", "--json"]) == 0  # the only profile: demo
    out = json.loads(capsys.readouterr().out)
    assert out["task"] == "chat" and out["profile"] == "demo" and out["adapter"] is None
    assert routed[-1][1].free_chat and routed[-1][1].about  # the demo's summary in the prompt
    with pytest.raises(UsageError, match="no profile holds commit-subject items"):
        session.choose(None, "commit-subject")  # the demo rates movies: never answers a commit from them
    session.store.profiles.create_profile("me", task="commit-subject")
    assert session.choose(None, "commit-subject") == ("me", "commit-subject")
    with pytest.raises(UsageError, match="several profiles exist: .*demo.*me"):
        session.choose(None, None)
    assert session.choose("demo", "free") == ("demo", "chat")
    assert main(["ask", "files: a.py", "--profile", "demo", "--task", "commit-subject", "--max-tokens", "4"]) == 0


def test_the_hook_proposes_the_routes_answer(session, routed) -> None:
    from p2p_local import hook

    session.store.profiles.create_profile("me", task="commit-subject")
    session.store.profiles.add_item("me", "commit-subject", "files: src/app.py", "Fix the app", time=1.0)
    proposal = hook.propose("files: src/app.py, src/cli.py", "me", "commit-subject")
    [(_, request, answer)] = routed
    assert proposal.lines[0] == answer.text and request.card.name == "commit-subject" and answer.personalization
    assert proposal.lines == [c.text for c in answer.candidates[:hook.PROPOSALS]]


def test_a_commit_answer_shows_the_authors_own_commits_first(session, routed, capsys) -> None:
    """The commit card's default is P2P + retrieval: personalized, the prompt holds the author's two
    nearest commits (BM25) in the card's own format before the query, and `--json` says how many; the base
    model (`--base`) gets the query alone."""
    session.store.profiles.create_profile("me", task="commit-subject")
    for i, (inp, out) in enumerate([("files: src/app.py", "fix the app"), ("files: docs/index.md", "docs: typo"),
                                    ("files: src/cli.py", "cli: add --json"), ("files: setup.cfg", "bump")]):
        session.store.profiles.add_item("me", "commit-subject", inp, out, time=float(i))
    card = builtin_card("commit-subject")
    assert main(["ask", "files: src/app.py, src/cli.py", "--profile", "me", "--task", "commit-subject",
                 "--max-tokens", "8", "--json"]) == 0
    out, answer = json.loads(capsys.readouterr().out), routed[-1][2]
    assert out["examples"] == answer.examples == card.examples == 2
    assert answer.prompt.index(card.prompt("files: src/cli.py") + "cli: add --json") < answer.prompt.index(
        card.prompt("files: src/app.py") + "fix the app") < answer.prompt.rindex(card.prompt("files: src/app.py, src/cli.py"))
    assert "docs: typo" not in answer.prompt and "bump" not in answer.prompt
    assert main(["ask", "files: src/app.py, src/cli.py", "--profile", "me", "--task", "commit-subject",
                 "--max-tokens", "8", "--json", "--base"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["examples"] == 0 and routed[-1][2].prompt == card.prompt("files: src/app.py, src/cli.py")


def test_a_staged_diff_is_read_as_the_commit_by_every_entry_point(session, routed) -> None:
    diff = "diff --git a/src/app.py b/src/app.py\n--- a/src/app.py\n+++ b/src/app.py\n@@ -1 +1 @@\n-a\n+b\n"
    answer = session.answer(diff, task="commit-subject", personalized=False, max_tokens=4).finish()
    read = "files: src/app.py\ndiff --git a/src/app.py b/src/app.py\n@@\n-a\n+b"  # files, then the compact diff
    assert answer.request.query == read and answer.prompt.endswith(builtin_card("commit-subject").prompt(read))
    assert answer.request.read == {"files": 1, "files_total": 1, "diff_chars": 45, "diff_chars_total": 45}


def test_adapter_export_is_the_routes_adapter(session, routed, evaluations, tmp_path: Path) -> None:
    from p2p_local.adapter import read_adapter
    from p2p_local.adapter_export import export_adapter

    ex = export_adapter(session, "demo", tmp_path, task=TASK, query=Q)
    [(_, request, answer)] = routed
    assert request.query == Q and ex.source == answer.adapter and evaluations == []  # nothing evaluated
    got, made = read_adapter(ex.path).tensors, read_adapter(answer.adapter).tensors
    assert got.keys() == made.keys() and all(np.array_equal(got[k][0], made[k][0]) for k in got)


def test_the_evaluations_methods_answer_through_the_route(session, routed, evaluations, tmp_path):
    from p2p_lab.eval.methods import P2P, RAG, Base, EvalContext, MethodOptions, Query
    from p2p_local.data.format import Item, User

    card, engine = builtin_card(TASK), session.engine
    user = User("demo", [Item(r.input, r.output, r.time, r.meta) for r in session.store.profiles.items("demo", task=TASK)][-12:])
    q = Query(user.user_id, 0, user.items[:-1], user.items[-1])
    ctx = EvalContext(card=card, train=[], users=[user], queries={user.user_id: [q]}, options=MethodOptions(),
                      run_dir=tmp_path, task=TASK, _engine=engine)
    for m in (Base(), RAG(), P2P()):
        m.prepare(ctx)
        n = len(evaluations)
        record = m.predict(ctx, q)
        route, request, answer = routed[-1]
        assert route == type(m).__name__ and request.item is user.items[-1] and request.history == q.history
        assert record["lp"] == [round(float(x), 5) for x in answer.scores["lp"]]
        assert len(evaluations) == n + 1  # one evaluation of the prompt per rating answer
        assert (answer.personalization is not None) == isinstance(m, P2P)
        m.close(ctx)
    assert [r for r, *_ in routed] == ["Base", "RAG", "P2P"]
