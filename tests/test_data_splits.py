"""Splits are user-disjoint and seeded; a sample's profile never holds its own query or anything later."""

from __future__ import annotations

import numpy as np
import pytest

from p2p_lab.data.converters import convert
from p2p_lab.data.splits import (
    EVAL_LAST_N,
    RepoSplitConfig,
    SplitConfig,
    count_samples,
    eval_samples,
    samples,
    split_by_repo,
    split_users,
)
from p2p_local.data.format import Item, User, builtin_card
from p2p_local.profile import build_profile


@pytest.fixture(scope="module")
def commits(shared_data):
    return convert("commit-subject", shared_data).users


def _ids(users):
    return [u.user_id for u in users]


def test_splits_are_user_disjoint_and_complete(commits):
    sp = split_users(commits, builtin_card("commit-subject"), SplitConfig(seed=3))
    parts = [set(_ids(getattr(sp, n))) for n in ("train", "val", "test", "ood")]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not parts[i] & parts[j]
    assert set().union(*parts) == set(_ids(commits))
    assert all(parts)  # every split has users
    assert sp.info["ood_space"] == "features"
    held = set(sp.info["held_out_clusters"])
    assert len(sp.ood) == sum(sp.info["cluster_sizes"][c] for c in held)  # whole clusters only


def test_splits_are_seeded(commits):
    card = builtin_card("commit-subject")
    a = split_users(commits, card, SplitConfig(seed=1))
    b = split_users(list(reversed(commits)), card, SplitConfig(seed=1))  # input order does not matter
    c = split_users(commits, card, SplitConfig(seed=2))
    assert _ids(a.test) == _ids(b.test) and _ids(a.ood) == _ids(b.ood)
    assert _ids(a.test) != _ids(c.test)


def _blob_users(sizes: dict[str, int]) -> list[User]:
    return [
        User(f"{word}{i:03d}", [Item(f"{word} item", "3", 1.0), Item(f"{word} again", "4", 2.0)])
        for word, n in sizes.items()
        for i in range(n)
    ]


def test_ood_holds_out_a_small_isolated_cluster():
    """Three well-separated groups of users in embedding space: the small far one is the OOD split."""
    users = _blob_users({"apple": 40, "berry": 34, "zebra": 6})
    centres = {"apple": [0.0, 0.0], "berry": [1.0, 0.0], "zebra": [10.0, 10.0]}
    rng = np.random.default_rng(0)

    def embed(texts):
        out = []
        for t in texts:
            word = next(w for w in centres if w in t)
            out.append(np.array(centres[word]) + rng.normal(0, 0.05, 2))
        return np.array(out)

    sp = split_users(
        users, builtin_card("movielens-rating"), SplitConfig(seed=0, n_clusters=3, ood_frac=0.08), embed=embed
    )
    assert sp.info["ood_space"] == "embedding"
    assert sorted(_ids(sp.ood)) == [f"zebra{i:03d}" for i in range(6)]
    assert not any(u.user_id.startswith("zebra") for u in sp.train + sp.val + sp.test)


def test_tiny_user_sets_skip_ood():
    sp = split_users(_blob_users({"a": 5}), builtin_card("movielens-rating"))
    assert sp.ood == [] and "fewer than" in sp.info["ood_skipped"]
    assert len(sp.train) + len(sp.val) + len(sp.test) == 5


def test_samples_hold_only_strictly_earlier_items(shared_data):
    """Every (history, query): history = the items before the query's position, ties included."""
    card = builtin_card("movielens-rating")
    users = convert("movielens-rating", shared_data).users[:40]
    tie_seen = False
    for u in users:
        pos = {id(it): i for i, it in enumerate(u.items)}
        ss = samples(u)
        assert len(ss) == len(u.items) - 1 == count_samples(u)
        for history, query in ss:
            qi = pos[id(query)]
            assert [pos[id(h)] for h in history] == list(range(qi))
            assert all(h.time <= query.time for h in history)
            tie_seen |= any(h.time == query.time for h in history)
        # The profile built for an evaluation sample sees neither the query nor a later item.
        for history, query in eval_samples(u)[-3:]:
            p = build_profile(card, history, query)
            assert p.n_history == pos[id(query)]
            assert all(any(r is h for h in history) for r in p.retrieved)
            assert not any(r is query or pos[id(r)] >= pos[id(query)] for r in p.retrieved)
    assert tie_seen  # the real data has same-second ratings: earlier position counts as earlier


def test_samples_options():
    u = User("u", [Item(str(i), "1", float(i)) for i in range(30)])
    assert len(eval_samples(u)) == EVAL_LAST_N == count_samples(u, last_n=EVAL_LAST_N)
    assert [q.input for _, q in eval_samples(u)] == [str(i) for i in range(20, 30)]
    ss = samples(u, min_history=5, max_history=3)
    assert ss[0][1].input == "5" and [h.input for h in ss[0][0]] == ["2", "3", "4"]
    short = User("s", [Item("only", "1")])
    assert samples(short) == [] and eval_samples(short) == [] and count_samples(short) == 0
    two = User("t", [Item("a", "1"), Item("b", "2")])
    assert [(len(h), q.input) for h, q in eval_samples(two)] == [(1, "b")]


def _repo_user(uid: str, repos: list[str]) -> User:
    return User(uid, [Item(f"files: {r}", "Fix", float(k), {"repo": r}) for k, r in enumerate(repos)])


def test_repository_split_holds_out_whole_repositories_and_drops_authors_on_both_sides():
    users = ([_repo_user(f"ood{i}", ["a/held", "b/held"]) for i in range(5)]
             + [_repo_user(f"both{i}", ["a/held", "c/kept"]) for i in range(3)]
             + [_repo_user(f"in{i:02d}", ["c/kept", "d/kept"]) for i in range(30)])
    cfg = RepoSplitConfig(ood_repos=("a/held", "b/held"), n_test=6, n_val=4, seed=3)
    sp = split_by_repo(users[::-1], cfg)  # input order does not matter
    assert [u.user_id for u in sp.ood] == [f"ood{i}" for i in range(5)]
    assert sp.info["users_dropped_both_sides"] == 3
    ids = [u.user_id for part in (sp.train, sp.val, sp.test) for u in part]
    assert len(sp.test) == 6 and len(sp.val) == 4 and len(sp.train) == 20 and len(set(ids)) == 30
    assert not any(u.user_id.startswith("both") for u in sp.train + sp.val + sp.test + sp.ood)
    assert all(it.meta["repo"] not in cfg.ood_repos for u in sp.train + sp.val + sp.test for it in u.items)
    again = split_by_repo(users, cfg)
    assert [u.user_id for u in again.test] == [u.user_id for u in sp.test]
    other = split_by_repo(users, RepoSplitConfig(ood_repos=cfg.ood_repos, n_test=6, n_val=4, seed=4))
    assert [u.user_id for u in other.test] != [u.user_id for u in sp.test]


def test_the_commit_task_has_its_acceptance_sizes(shared_data):
    """Issue 16: >= 200 test and >= 100 validation authors, a repository-disjoint OOD split of >= 150."""
    from p2p_lab.data.converters import convert

    sp = split_by_repo(convert("commit-subject", shared_data).users)
    assert len(sp.test) >= 200 and len(sp.val) >= 100 and len(sp.ood) >= 150 and len(sp.info["ood_repos"]) >= 2
    held = set(sp.info["ood_repos"])
    assert all({it.meta["repo"] for it in u.items} <= held for u in sp.ood)
    assert not any(it.meta["repo"] in held for u in sp.train + sp.val + sp.test for it in u.items)
