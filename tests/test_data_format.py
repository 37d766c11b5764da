"""The generic per-user format and task cards: round trips and clear errors on malformed input."""

from __future__ import annotations

import json

import pytest

from p2p_local.data import Item, TaskCard, User, builtin_card, builtin_cards
from p2p_local.data.format import read_users_jsonl, time_ordered, write_users_jsonl
from p2p_local.errors import DataError


def test_users_round_trip(tmp_path):
    users = [
        User("a", [Item("x", "1", 1.0, {"genres": ["Drama"]}), Item("y", "2", 2.0)]),
        User("b", [Item("ünïcode ✓", "line1\nline2", None, {})]),
    ]
    p = tmp_path / "u.jsonl"
    assert write_users_jsonl(p, users) == 2
    assert read_users_jsonl(p) == users


def test_reading_orders_items_by_time_stably(tmp_path):
    p = tmp_path / "u.jsonl"
    items = [
        {"input": k, "output": "1", "time": t, "meta": {}}
        for k, t in [("c", 3), ("a", 1), ("b1", 2), ("b2", 2)]
    ]
    p.write_text(json.dumps({"user_id": 7, "items": items}) + "\n")
    (u,) = read_users_jsonl(p)
    assert u.user_id == "7"
    assert [it.input for it in u.items] == ["a", "b1", "b2", "c"]


def test_items_without_time_keep_file_order():
    items = [Item("b", "", None), Item("a", "", 1.0)]
    assert time_ordered(items) == items


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("{not json", "not valid JSON"),
        ('{"user_id": "u"}', "'items' must be a list"),
        ('{"items": []}', "user_id"),
        ('{"user_id": "u", "items": [{"input": 1, "output": "x"}]}', "item 0"),
        ('{"user_id": "u", "items": [{"input": "a", "output": "x", "time": "soon"}]}', "time"),
        ("[1, 2]", "must be an object"),
    ],
)
def test_malformed_lines_name_the_line(tmp_path, line, fragment):
    p = tmp_path / "bad.jsonl"
    good = json.dumps({"user_id": "ok", "items": []})
    p.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(DataError) as e:
        read_users_jsonl(p)
    assert f"{p}:3:" in str(e.value)
    assert fragment in str(e.value)


def test_non_utf8_line_is_reported_with_its_number(tmp_path):
    p = tmp_path / "bad.jsonl"
    good = json.dumps({"user_id": "ok", "items": []}).encode()
    p.write_bytes(good + b"\n" + good + b"\n" + b'{"user_id": "\xff\xfe", "items": []}\n')
    with pytest.raises(DataError, match=r":3: not UTF-8"):
        read_users_jsonl(p)


def test_missing_users_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_users_jsonl(tmp_path / "nope.jsonl")


def test_card_round_trip_and_prompt(tmp_path):
    card = builtin_card("movielens-rating")
    p = tmp_path / "card.json"
    card.save(p)
    assert TaskCard.load(p) == card
    prompt = card.prompt("Heat (1995) | Genres: Action|Crime")
    assert prompt == "Movie: Heat (1995) | Genres: Action|Crime\nThe user's rating (1-5): "
    # braces in the input are data, not format fields
    assert "{x}" in card.prompt("{x}")


def test_builtin_cards_follow_the_label_convention():
    names = builtin_cards()
    assert set(names) >= {
        "movielens-rating",
        "popquorn-offensiveness",
        "popquorn-email-rewrite",
        "commit-subject",
    }
    for name in names:
        card = builtin_card(name)
        assert card.name == name and card.description and card.metrics
        assert 2 <= len(card.samples) <= 4 and all(card.prompt(x) for x in card.samples)  # what a user might type
        if card.kind in ("rating", "label"):
            # the label is appended directly: the template ends in ": " and labels carry no spaces
            assert card.template.endswith(": ")
            assert all(lab == lab.strip() and lab for lab in card.labels)
        else:
            assert card.template.endswith("\n")


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"kind": "regression"}, "kind"),
        ({"template": "no placeholder"}, "{input}"),
        ({"template": "{input} {other}"}, "format string"),
        ({"labels": []}, "labels"),
        ({"samples": "Heat (1995)"}, "samples"),
        ({"samples": ["Heat (1995)", " "]}, "samples"),
        ({"samples": ["Heat (1995)"] * 9}, "samples"),
        ({"samples": ["x" * 2001]}, "samples"),
        ({"samples": [5]}, "samples"),
        ({"split": "items"}, "split"),
    ],
)
def test_invalid_cards_are_rejected(changes, fragment):
    d = builtin_card("movielens-rating").to_dict() | changes
    with pytest.raises(DataError, match=fragment):
        TaskCard.from_dict(d)


def test_card_load_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        TaskCard.load(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(DataError, match="not valid JSON"):
        TaskCard.load(tmp_path / "bad.json")
    with pytest.raises(DataError, match="unknown task"):
        builtin_card("no-such-task")


def test_the_commit_task_keeps_its_former_name_as_an_alias(tmp_path) -> None:
    """`pytest-commit-subject` became `commit-subject`: the old name still finds the card, the CLI takes
    it, and a store written under it is renamed by migration 0004 (and new rows are stored renamed)."""
    import argparse
    import sqlite3

    from p2p_local.commands.args import task_arg
    from p2p_local.data.format import builtin_card, builtin_cards, canonical_task
    from p2p_local.store import Store
    from p2p_local.store.migrations import migrate

    assert "commit-subject" in builtin_cards() and "pytest-commit-subject" not in builtin_cards()
    assert builtin_card("pytest-commit-subject") == builtin_card("commit-subject")
    assert canonical_task("pytest-commit-subject") == "commit-subject" == task_arg("pytest-commit-subject")
    with pytest.raises(argparse.ArgumentTypeError):
        task_arg("pytest-commit")
    db = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(db)
    migrate(conn, upto=3)
    conn.execute("INSERT INTO profiles (name, task, created, updated) VALUES ('me', 'pytest-commit-subject', 0, 0)")
    conn.execute("INSERT INTO items (profile_id, task, input, output, created, updated) "
                 "VALUES (1, 'pytest-commit-subject', 'files: a.py', 'Fix a', 0, 0)")
    conn.commit()
    conn.close()
    with Store(db) as s:
        assert s.profiles.get_profile("me").task == "commit-subject"
        assert [i.task for i in s.profiles.items("me")] == ["commit-subject"]
        s.profiles.add_item("me", "pytest-commit-subject", "files: b.py", "Fix b")
        assert s.profiles.task_counts("me") == {"commit-subject": 2}


def test_samples_split_and_aliases_key_no_cached_result():
    """The evaluation's run dirs are keyed by the card: fields no result depends on stay out of the key, so run
    dirs made before the cards had them are still found."""
    card = builtin_card("commit-subject")
    assert card.samples and card.split == "repository" and card.aliases == ["pytest-commit-subject"]
    assert card.keyed_dict() == {k: v for k, v in card.to_dict().items() if k not in ("samples", "split", "aliases")}
    assert TaskCard.from_dict(card.to_dict()) == card  # saved and loaded with them
