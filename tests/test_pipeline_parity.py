"""One route: the app, the evaluation and the trainer's samples turn a user's history into the same
profile, the same adapter and the same answer, bit for bit where the code is shared.

Real users of every built-in task (../shared/data through the converters), the real encoder, the shipped
bundle and llama.cpp. The app's side goes the way a user's data does: `p2p profile import` of a file
(MovieLens' own ratings.csv + movies.csv for the rating task, a real git repository replaying the author's
commits for the commit task, the generic JSONL for the others) into a
real SQLite store, then `Session`. The evaluation's side is `p2p_lab.eval`'s P2P method on the converter's
users; the trainer's is `trainer.samples.build_samples`.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from p2p_lab.data.converters import convert
from p2p_lab.eval.methods import P2P, EvalContext, MethodOptions, Query
from p2p_local import pipeline
from p2p_local.data.format import User, builtin_card, builtin_cards, write_users_jsonl
from p2p_local.importers import import_file, import_git
from p2p_local.profile import FEATURE_NAMES

pytestmark = pytest.mark.real
USERS_PER_TASK = 2
TRAINER_TOKENS = {"input_ids": [2, 3]}  # the sample's token ids are not compared here: only its profile


def _users(task: str) -> list[User]:
    """Real users with a history of 8+ items, the same ones every run (sorted by id). Commit authors whose
    history a test repository can replay exactly: no address for the importer's scrub to remove, no file
    list cut short, one commit per second of history."""
    users = sorted((u for u in convert(task).users if len(u.items) >= 9), key=lambda u: u.user_id)
    if task == "commit-subject":
        users = [u for u in users if len(u.items) <= 40 and _replayable(u)]
    return users[:USERS_PER_TASK]


def _replayable(user: User) -> bool:
    times = [it.time for it in user.items]
    return (all(t is not None for t in times) and len(set(times)) == len(times)
            and not any("@" in it.input or "@" in it.output or "(+" in it.input.split("\n")[0] for it in user.items))


def _git_repo(user: User, n: int, tmp: Path) -> Path:
    """A real git repository whose author me@example.org made the user's first `n` commits: each commit
    touches the files its item names, with the item's subject, body and date. Item `n`'s change is left
    staged: the commit being written, as the hook and `git diff --cached | p2p ask -` read it."""
    import subprocess

    repo = tmp / f"repo-{user.user_id}"
    repo.mkdir()
    env = {"GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(tmp), "PATH": "/usr/bin:/bin"}
    run = lambda *a, **kw: subprocess.run(["git", "-C", str(repo), *a], check=True, capture_output=True,  # noqa: E731
                                          env={**env, **kw})
    run("init", "-q", "-b", "main")
    run("config", "user.email", "me@example.org")
    run("config", "user.name", "Me")
    for k, it in enumerate(user.items[:n]):
        head, _, body = it.input.partition("\n")
        files = [] if head == "files: none" else head.removeprefix("files: ").split(", ")
        for f in files:
            path = repo / f
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as fh:
                fh.write(f"{k}\n")
            run("add", "--", f)
        date = f"@{int(it.time)} +0000"
        run("commit", "-q", "--allow-empty", "-m", it.output + (f"\n\n{body}" if body else ""),
            GIT_AUTHOR_DATE=date, GIT_COMMITTER_DATE=date)
    head = user.items[n].input.split("\n")[0]
    for f in [] if head == "files: none" else head.removeprefix("files: ").split(", "):
        path = repo / f
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.write(f"{n}\n")
        run("add", "--", f)
    return repo


def _as_replayed(store, name: str, user: User, i: int, repo: Path) -> tuple[User, str]:
    """The commit author as the replay repository holds them: each stored item's diff (what `--git` read)
    in place of the dataset's, and the held-out commit at commit time (`pipeline.served_query`) with the
    staged diff; and that staged diff, the app's query text."""
    from p2p_local.data.format import Item
    from p2p_local.gitlog import staged_diff

    stored = store.profiles.items(name, "commit-subject")
    assert [s.output for s in stored] == [it.output for it in user.items[:i]]
    items = [Item(it.input, it.output, it.time, {**{k: v for k, v in it.meta.items() if k != "diff"},
                                                  **({"diff": s.meta["diff"]} if s.meta.get("diff") else {})})
             for it, s in zip(user.items[:i], stored, strict=True)]
    diff = staged_diff(repo)
    query = pipeline.query_item(builtin_card("commit-subject"), diff)
    held = pipeline.served_query(builtin_card("commit-subject"), user.items[i])
    assert query.input == held.input
    items.append(Item(held.input, held.output, held.time, {**user.items[i].meta, "diff": query.meta["diff"]}))
    return User(user.user_id, items), diff


def _import(store, name: str, task: str, user: User, history_n: int, shared: Path, tmp: Path) -> Path | None:
    """Import the user's first `history_n` items as a user would: their own file, `p2p profile import`
    (a commit author: their replayed repository, returned)."""
    store.profiles.create_profile(name, task=task)
    if task == "movielens-rating":
        # MovieLens' own files: this user's rows, in file order, up to the held-out one.
        src = shared / "movielens-latest-small"
        keep = {it.meta["item_id"] for it in user.items[:history_n]}
        with open(src / "ratings.csv", newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["userId"] == user.user_id and int(r["movieId"]) in keep]
        out = tmp / f"{name}-ratings.csv"
        with open(out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["userId", "movieId", "rating", "timestamp"])
            w.writeheader()
            w.writerows(rows)
        shutil.copy(src / "movies.csv", tmp / "movies.csv")
        import_file(store, name, out, user=user.user_id, movies=tmp / "movies.csv")
    elif task == "commit-subject":  # the author's own repository, read by `p2p profile import --git`
        repo = _git_repo(user, history_n, tmp)
        import_git(store, name, repo, authors=["me@example.org"])
        return repo
    else:
        out = tmp / f"{name}.jsonl"
        write_users_jsonl(out, [User(user.user_id, user.items[:history_n])])
        import_file(store, name, out, task=task)
    return None


def _trainer_sample(card, user: User, i: int, encoder, tokenizer=None, max_prompt_tokens: int = 64,
                    prompt_examples: bool = False):
    """The trainer's sample of the user's item i (`build_samples`, the trainer's own path)."""
    from trainer.samples import build_samples

    s = build_samples(card, [User(user.user_id, user.items[: i + 1])], tokenizer or (lambda *a, **k: TRAINER_TOKENS),
                      lambda texts: dict(zip(texts, encoder.embed_each(texts), strict=True)), items_per_user=1,
                      last=True, seed=0, max_prompt_tokens=max_prompt_tokens, max_target_tokens=24,
                      prompt_examples=prompt_examples)
    assert len(s) == 1
    return s


@pytest.fixture(scope="module")
def hf_tokenizer(base_model_path):
    from trainer.base import load_tokenizer

    return load_tokenizer(base_model_path)


@pytest.mark.parametrize("task", builtin_cards())
def test_app_eval_and_trainer_agree(task: str, session, shared_data: Path, tmp_path: Path, hf_tokenizer) -> None:
    card = builtin_card(task)
    engine = session.engine
    ctx = EvalContext(card=card, train=[], users=[], queries={}, options=MethodOptions(), run_dir=tmp_path,
                      task=task, _engine=engine)
    method = P2P()
    method.prepare(ctx)
    for k, user in enumerate(_users(task)):
        i = len(user.items) - 1  # the held-out query: the user's last item, history = everything before
        name = f"u{k}"
        repo = _import(session.store, name, task, user, i, shared_data, tmp_path)
        asked = user.items[i].input  # what the user asks: the item's text (a commit: its staged diff)
        if repo is not None:
            user, asked = _as_replayed(session.store, name, user, i, repo)
        query = user.items[i]

        # 1. the profile: app (store -> Session) == evaluation (dataset -> EvalContext) == trainer
        app = session.profile_text(name, task, asked)
        q = Query(user.user_id, 0, user.items[:i], query)
        ev = ctx.profile(q)
        assert app.text == ev.text, f"{task} user {user.user_id}: the profile text differs"
        assert app.features.tobytes() == ev.features.tobytes(), {
            n: (a, b) for n, a, b in zip(FEATURE_NAMES, app.features, ev.features, strict=True) if a != b}
        assert app.fingerprint == ev.fingerprint
        sample = _trainer_sample(card, user, i, session.encoder)
        emb_t, feats_t = sample.embeddings[0], sample.features[0]
        assert feats_t.tobytes() == app.features.tobytes(), "the trainer's sample has other features"
        emb_app = pipeline.profile_embedding(session.encoder, app)[0]
        assert emb_t.tobytes() == emb_app.tobytes(), "the trainer embeds the profile differently"

        # 2. the adapter tensors
        t_app, _ = session.personalizer.tensors(app)
        t_ev, _ = method.personalizer.tensors(ev)
        assert t_app.keys() == t_ev.keys()
        for key in t_app:
            for a, b in zip(t_app[key], t_ev[key], strict=True):
                assert a.tobytes() == b.tobytes(), key

        # 3. the answer: the app (`Session.answer`, what `p2p ask` renders) and the evaluation's P2P record,
        # both `pipeline.Route.answer`
        app_answer = session.answer(asked, profile=name, task=task).finish()
        record = method.predict(ctx, q)
        # the prompt: the card's retrieved examples (P2P + retrieval where the card asks for it), then the query
        shots = pipeline.examples(card, app)
        assert len(shots) == min(card.examples, len(app.retrieved)) and (shots or not card.examples)
        assert all(shot in app_answer.prompt for shot in shots)
        assert app_answer.prompt == method.prompt(ctx.request(q), pipeline.Personalization(ev, ev.fingerprint, task))
        if card.examples:  # trained as answered: the trainer's prompt (`prompt_examples`) is the app's, token for token
            budget = engine.n_ctx - pipeline.answer_tokens(engine, card, query.input) - pipeline.PROMPT_SLACK
            trained = _trainer_sample(card, user, i, session.encoder, hf_tokenizer, budget, True).prompt_ids[0]
            assert trained == engine.tokenize(app_answer.prompt), "the trainer's prompt is not the app's"
        if card.kind == "generation":
            assert app_answer.text == record["text"]
        else:
            lp = np.round(app_answer.scores["lp"], 5)
            assert lp.tolist() == pytest.approx(record["lp"], abs=2e-5)
            assert app_answer.text == pipeline.decode_label(card, record["lp"])
    method.close(ctx)


def test_a_typed_movie_query_carries_its_genres() -> None:
    """The card reads the metadata a dataset item carries out of the text a user types."""
    card = builtin_card("movielens-rating")
    q = pipeline.query_item(card, "101 Dalmatians (1996) | Genres: Adventure|Children|Comedy")
    assert q.meta == {"genres": ["Adventure", "Children", "Comedy"]}
    assert pipeline.query_item(card, "Heat (1995) | Genres: unknown").meta == {"genres": []}
    assert pipeline.query_item(card, "Frozen").meta == {}
    assert pipeline.query_item(builtin_card("popquorn-email-rewrite"), "hi | Genres: x").meta == {}
