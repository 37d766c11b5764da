"""`p2p data prepare | stats` and `load_task` on the real data, written into a private data dir."""

from __future__ import annotations

import json
import shutil

import pytest

from p2p_lab.data.prepare import SPLITS, load_task, read_stats, task_dir
from p2p_local.cli import main
from p2p_local.errors import DataError


@pytest.fixture
def home(p2p_home, monkeypatch):
    monkeypatch.delenv("P2P_CACHE", raising=False)  # write the sets under the private P2P_HOME
    return p2p_home


def test_prepare_stats_and_load(home, capsys):
    task = "popquorn-email-rewrite"
    assert main(["data", "prepare", "--tasks", task, "--no-encoder", "--quiet", "--seed", "5"]) == 0
    d = task_dir(task)
    assert d.is_relative_to(home)
    assert {p.name for p in d.iterdir()} == {
        "train.jsonl",
        "val.jsonl",
        "test.jsonl",
        "ood.jsonl",
        "card.json",
        "stats.json",
    }
    capsys.readouterr()
    assert main(["data", "stats", "--json", "--tasks", task]) == 0
    stats = json.loads(capsys.readouterr().out)[task]
    assert stats["seed"] == 5 and stats["encoder"] is None and stats["split_info"]["ood_space"] == "features"
    assert stats["conversion"]["rows_skipped_missing_user"] == 80

    td = load_task(task, build=False)
    assert td.card.name == task
    ids = [{u.user_id for u in td.split(s)} for s in SPLITS]
    assert sum(len(x) for x in ids) == len(set().union(*ids)) == stats["conversion"]["users"]
    for s in SPLITS:
        assert stats["splits"][s]["users"] == len(td.split(s))
    assert stats["splits"]["test"]["samples"] == sum(min(10, len(u.items) - 1) for u in td.test)

    assert main(["data", "stats", "--tasks", task]) == 0
    out = capsys.readouterr().out
    assert "test" in out and "rows_skipped_missing_user 80" in out


def test_load_task_builds_when_missing_and_rebuilds_stale(home):
    task = "popquorn-email-rewrite"  # clustered OOD (the commit task holds whole repositories out instead)
    with pytest.raises(DataError, match="not prepared"):
        load_task(task, build=False)
    td = load_task(task, log=lambda m: None)  # builds it, clustering on MiniLM profile embeddings
    stats = read_stats(task)
    assert stats["encoder"] == "minilm" and stats["split_info"]["ood_space"] == "embedding"
    assert len(td.train) > len(td.test) > 0 and len(td.ood) > 0
    stats_path = task_dir(task) / "stats.json"
    s = json.loads(stats_path.read_text())
    s["version"] = -1
    stats_path.write_text(json.dumps(s))
    assert read_stats(task) is None  # stale: rebuilt on next load


def test_prepare_continues_past_a_broken_source(home, tmp_path, monkeypatch, shared_data, capsys):
    src = tmp_path / "shared"
    shutil.copytree(shared_data / "popquorn", src / "popquorn")
    (src / "movielens-latest-small").mkdir()
    (src / "movielens-latest-small" / "ratings.csv").write_text("userId,movieId\n1,2\n")
    monkeypatch.setenv("P2P_SHARED_DATA", str(src))
    rc = main(
        [
            "data",
            "prepare",
            "--tasks",
            "movielens-rating",
            "popquorn-email-rewrite",
            "--no-encoder",
            "--quiet",
        ]
    )
    assert rc == DataError.exit_code
    err = capsys.readouterr().err
    assert "movielens-rating" in err and "not found" in err
    assert read_stats("popquorn-email-rewrite") is not None and read_stats("movielens-rating") is None


def test_unknown_task_is_a_usage_error(home, capsys):
    assert main(["data", "prepare", "--tasks", "nope"]) == DataError.exit_code
    assert "unknown task" in capsys.readouterr().err


@pytest.mark.parametrize("rule", ["users", "repository"])
def test_the_card_says_how_users_are_split(home, monkeypatch, rule):
    """prepare.py takes the split rule from the card's `split`, not from a list of task names."""
    from p2p_lab.data import prepare
    from p2p_lab.data.converters import Converted
    from p2p_lab.data.splits import Splits
    from p2p_local.data.format import Item, TaskCard, User, builtin_card

    card = TaskCard.from_dict(builtin_card("popquorn-email-rewrite").to_dict() | {"split": rule})
    users = [User("u", [Item("a", "b"), Item("c", "d")])]
    used = []
    monkeypatch.setattr(prepare, "builtin_card", lambda task: card)
    monkeypatch.setattr(prepare, "convert", lambda task, src=None: Converted(users))
    monkeypatch.setattr(prepare, "split_by_repo", lambda u, cfg: used.append("repository") or Splits(u, [], [], []))
    monkeypatch.setattr(prepare, "split_users",
                        lambda u, c, cfg, embed=None: used.append("users") or Splits(u, [], [], []))
    stats = prepare.prepare_task(card.name, embed=None, log=lambda msg: None)
    assert used == [rule] and (stats["encoder_unavailable"] == "none (repository split)") == (rule == "repository")
