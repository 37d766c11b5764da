"""The LaMP-layout importer, on a small fixture written in LaMP's documented JSON layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from p2p_lab.data.lamp import import_lamp, lamp_card, task_number
from p2p_lab.data.splits import samples
from p2p_local.cli import main
from p2p_local.data.format import TaskCard, read_users_jsonl
from p2p_local.errors import DataError

FIX = Path(__file__).parent / "fixtures" / "lamp"


def test_lamp3_rating_import():
    card, users = import_lamp(FIX / "LaMP_3_dev_questions.json", FIX / "LaMP_3_dev_outputs.json")
    assert card.name == "lamp-3" and card.kind == "rating" and card.labels == ["1", "2", "3", "4", "5"]
    assert [u.user_id for u in users] == ["3100", "3101", "3102"]
    u = users[0]
    assert [(it.input[:5], it.output) for it in u.items[:-1]] == [
        ("Great", "5"),
        ("The t", "2"),
        ("Decen", "3"),
    ]
    q = u.items[-1]
    assert (
        q.input == "The blender broke after two weeks and customer service never answered."
    )  # prefix stripped
    assert q.output == "1" and q.meta == {"lamp_id": "3100", "query": True}
    # LaMP's sample = the question with the whole profile as history
    ((history, query),) = samples(u, last_n=1)
    assert query is q and history == u.items[:-1]
    assert users[2].items == [users[2].items[-1]]  # empty profile: the question alone


def test_lamp4_orders_profile_by_date_and_keeps_query_last():
    card, users = import_lamp(FIX / "LaMP_4_dev_questions.json", FIX / "LaMP_4_dev_outputs.json")
    assert card.kind == "generation"
    u = users[0]
    assert [it.meta["lamp_id"] for it in u.items] == ["4000", "4001", "4002", "400"]
    assert [it.output for it in u.items[:3]] == [
        "Mayor Unveils Riverside Housing Plan",
        "Library Closure Sparks Protest",
        "Bike Thefts Soar Downtown",
    ]
    assert u.items[-1].output == "Council Approves Bike Lane Expansion"
    assert u.items[-1].input.startswith("The city council voted")
    times = [it.time for it in u.items]
    assert times == sorted(times)


def test_questions_without_golds_need_a_task():
    with pytest.raises(DataError, match="cannot tell the LaMP task"):
        import_lamp(FIX / "LaMP_7_test_questions.json")
    card, (u,) = import_lamp(FIX / "LaMP_7_test_questions.json", task="LaMP_7")
    assert card.name == "lamp-7"
    assert [it.output for it in u.items[:2]] == [
        "cant believe its raining again lol",
        "new album dropped and its amazing!!",
    ]
    assert u.items[-1].output == "" and u.items[-1].meta["gold"] is False
    assert u.items[-1].input == "so tired of mondays, coffee is not working today"


def test_task_names_and_bad_files(tmp_path):
    assert task_number("LaMP_2") == task_number("lamp-2") == task_number(2) == 2
    with pytest.raises(DataError):
        task_number("LaMP_9")
    assert lamp_card("LaMP_2").kind == "label" and len(lamp_card(2).labels) == 15
    bad = tmp_path / "q.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not valid"):
        import_lamp(bad, task=3)
    bad.write_text(json.dumps([{"input": "no id"}]))
    with pytest.raises(DataError, match="lacks 'id'"):
        import_lamp(bad, task=3)


def test_import_lamp_cli(tmp_path, capsys):
    out = tmp_path / "lamp3.jsonl"
    rc = main(
        [
            "data",
            "import-lamp",
            str(FIX / "LaMP_3_dev_questions.json"),
            str(FIX / "LaMP_3_dev_outputs.json"),
            "-o",
            str(out),
        ]
    )
    assert rc == 0
    users = read_users_jsonl(out)
    assert len(users) == 3 and users[1].items[-1].output == "5"
    assert TaskCard.load(tmp_path / "lamp3.card.json").name == "lamp-3"
