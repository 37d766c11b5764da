"""The bundle records the task cards it was trained on (`manifest["cards"]`, `card_hash`) and the app flags,
never refuses, an answer on a card changed since: `Bundle.card_status`, `p2p models list`, `p2p ask --json`."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from p2p_local.bundle import DEFAULT_BUNDLE, Bundle, card_status, read_manifest
from p2p_local.cli import main
from p2p_local.data.format import TaskCard, builtin_card, builtin_cards, card_hash
from p2p_local.errors import BundleError
from p2p_local.paths import repo_root

SHIPPED = repo_root() / "models" / DEFAULT_BUNDLE
COMMIT = "commit-subject"


def as_trained(card: TaskCard) -> TaskCard:
    """The commit card of the bundle shipped before the warm start: no examples (recipe `full`), no diff."""
    return TaskCard.from_dict({**card.to_dict(), "examples": 0, "diff_chars": 0})


def test_the_hash_follows_the_prompt_not_the_description() -> None:
    card = builtin_card(COMMIT)
    h = card_hash(card)
    assert len(h) == 16 and int(h, 16) >= 0
    for change in ({"template": "Change:\n{input}\nSubject line:\n"}, {"examples": card.examples + 1},
                   {"diff_chars": card.diff_chars + 100}, {"one_line": False}):
        assert card_hash(dataclasses.replace(card, **change)) != h, change
    assert card_hash(dataclasses.replace(card, description="another sentence", metrics=["rouge1"])) == h
    assert card_hash(TaskCard.from_dict(card.to_dict())) == h  # stable across a save/load


def test_the_shipped_bundle_was_trained_on_the_current_cards() -> None:
    _, manifest = read_manifest(SHIPPED)
    assert set(manifest["cards"]) == set(builtin_cards())
    for task in builtin_cards():  # the commit card with its examples and diff: the warm start on the served prompt
        assert card_status(manifest, builtin_card(task)) == "same", task
    assert manifest["cards"][COMMIT] != card_hash(as_trained(builtin_card(COMMIT)))
    own = TaskCard("my-task", "generation", "Q: {input}\nA:", "my own task")
    assert card_status(manifest, own) == "untrained"
    assert card_status({k: v for k, v in manifest.items() if k != "cards"}, builtin_card(COMMIT)) == "unknown"


def _copy(tmp_path: Path, cards: dict | None) -> Path:
    dest = tmp_path / DEFAULT_BUNDLE
    shutil.copytree(SHIPPED, dest, ignore=shutil.ignore_patterns("*.gguf", "*.md"))
    manifest = json.loads((dest / "manifest.json").read_text())
    if cards is None:
        del manifest["cards"]
    else:
        manifest["cards"] = cards
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dest


def test_a_bundle_trained_on_the_current_card_is_the_same(tmp_path) -> None:
    current = {t: card_hash(builtin_card(t)) for t in builtin_cards()}
    b = Bundle.load(_copy(tmp_path, {"pytest-commit-subject": current[COMMIT]}), threads=1)  # a former name counts
    assert b.trained_card(COMMIT) == current[COMMIT] and b.card_status(builtin_card(COMMIT)) == "same"
    assert b.card_status(builtin_card("movielens-rating")) == "untrained"
    old = Bundle.load(_copy(tmp_path / "old", None), threads=1)
    assert old.trained_card(COMMIT) is None and old.card_status(builtin_card(COMMIT)) == "unknown"
    bad = _copy(tmp_path / "bad", {COMMIT: 3})
    with pytest.raises(BundleError, match="cards"):
        read_manifest(bad)


def test_models_list_flags_a_bundle_trained_on_another_prompt(p2p_home, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("P2P_MODELS", str(tmp_path / "m"))  # no base model to verify: fast
    trained, now = card_hash(as_trained(builtin_card(COMMIT))), card_hash(builtin_card(COMMIT))
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert f"bundle {DEFAULT_BUNDLE} (in use)" in out
    assert f"{COMMIT:<24} trained on this prompt" in out and "another prompt" not in out

    # the user's copy, exported before the commit card read the diff, overrides the shipped one and is flagged
    _copy(p2p_home / "bundles", {**{t: card_hash(builtin_card(t)) for t in builtin_cards()}, COMMIT: trained})
    assert main(["models", "list"]) == 0
    assert f"{COMMIT:<24} trained on another prompt (card {trained} vs {now})" in capsys.readouterr().out
    assert main(["models", "list", "--json"]) == 0
    user, shipped = json.loads(capsys.readouterr().out)["bundles"]
    assert user["in_use"] and not shipped["in_use"] and Path(user["path"]).parent == p2p_home / "bundles"
    assert {t["task"]: t["card"] for t in user["tasks"]}[COMMIT] == "different"
    assert {t["task"]: t["card"] for t in shipped["tasks"]} == dict.fromkeys(builtin_cards(), "same")


def test_export_records_the_cards_as_trained() -> None:
    pytest.importorskip("torch")
    from trainer.export import trained_cards

    tasks = [{"name": t} for t in builtin_cards()]
    plain = trained_cards(tasks, {"recipe": "full"})
    assert plain[COMMIT] == card_hash(TaskCard.from_dict({**builtin_card(COMMIT).to_dict(), "examples": 0}))
    assert trained_cards(tasks, {"recipe": "full-examples"})[COMMIT] == card_hash(builtin_card(COMMIT))
    assert trained_cards(tasks, {"recipe": "full", "data": [{"name": COMMIT, "card": "recorded"}]})[COMMIT] == "recorded"
    assert plain["movielens-rating"] == card_hash(builtin_card("movielens-rating"))


def test_a_warm_start_keeps_the_cards_of_the_tasks_it_did_not_retrain(tmp_path) -> None:
    pytest.importorskip("torch")
    from trainer.export import inherit_tasks

    parent = tmp_path / "parent"
    parent.mkdir()
    others = sorted(set(builtin_cards()) - {COMMIT})
    (parent / "manifest.json").write_text(json.dumps({
        "name": "parent", "onnx": {"sha256": "ab" * 32},
        "tasks": [{"name": t, "kind": builtin_card(t).kind} for t in [COMMIT, *others]],
        "cards": {COMMIT: "old-commit", **{t: f"old-{t}" for t in others}}}))
    training: dict = {}
    tasks, cards = inherit_tasks(parent, [{"name": COMMIT, "card": "served"}], training)
    assert [t["name"] for t in tasks] == [COMMIT, *others]
    # the retrained task: this run's card; the others: the parent's record, not today's cards
    assert cards == {COMMIT: "served", **{t: f"old-{t}" for t in others}}
    assert training["init_bundle"] == {"name": "parent", "onnx_sha256": "ab" * 32, "inherited_tasks": others}

    # exported again once its own export replaced the folder it started from: the record stays the first parent's
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "manifest.json").write_text(json.dumps({
        "name": "shipped", "onnx": {"sha256": "cd" * 32}, "tasks": tasks, "cards": cards,
        "training": {**training, "recipe": "warm-diff", "steps": 90, "wall_time_s": 1.0}}))
    again: dict = {"recipe": "warm-diff", "steps": 90, "wall_time_s": 1.0}
    assert inherit_tasks(shipped, [{"name": COMMIT, "card": "served"}], again) == (tasks, cards)
    assert again["init_bundle"]["onnx_sha256"] == "ab" * 32


def test_an_early_stopped_run_exports_the_validation_it_logged(tmp_path) -> None:
    pytest.importorskip("torch")
    from trainer.export import logged_evaluation

    ev = {COMMIT: {"loss_true": 3.07, "loss_shuffled": 3.39}}
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"step": 60, "eval": {COMMIT: {"loss_true": 3.08}}}, {"step": 90, "loss": 2.4}, {"step": 90, "eval": ev})) + "\n")
    assert logged_evaluation(tmp_path / "best.pt", 90) == {"split": "val", "tasks": ev}
    assert logged_evaluation(tmp_path / "best.pt", 30) is None
    assert logged_evaluation(tmp_path / "elsewhere" / "best.pt", 90) is None
