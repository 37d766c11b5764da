"""Importers: generic JSONL / JSON / CSV, MovieLens (real data), errors that name file and line."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from p2p_local.data.records import parse_time
from p2p_local.errors import DataError
from p2p_local.importers import detect_format, import_file, rating_to_stars, read_import
from p2p_local.store import Store


@pytest.fixture
def store(p2p_home: Path):
    with Store() as s:
        yield s


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- MovieLens, real data ------------------------------------------------------------------------
def _real_user_rows(ratings: Path, user: str) -> list[dict]:
    with ratings.open(newline="") as f:
        return [r for r in csv.DictReader(f) if r["userId"] == user]


def test_movielens_real_user_import(store: Store, shared_data: Path):
    ratings = shared_data / "movielens-latest-small" / "ratings.csv"
    user = "3"  # rates in half stars too (0.5 ... 5.0)
    rows = _real_user_rows(ratings, user)
    assert any(float(r["rating"]) % 1 for r in rows)

    store.profiles.create_profile("ml3")
    res = import_file(store, "ml3", ratings, user=user)  # movies.csv found beside it
    assert (res.format, res.user_id, res.task, res.imported) == ("movielens", user, "movielens-rating", len(rows))
    items = store.profiles.items("ml3")
    assert len(items) == len(rows)
    assert store.profiles.get_profile("ml3").task == "movielens-rating"
    assert [i.time for i in items] == sorted(i.time for i in items)

    expected = {int(r["movieId"]): str(math.ceil(float(r["rating"]))) for r in rows}
    assert {i.meta["item_id"]: i.output for i in items} == expected
    assert all(i.output in {"1", "2", "3", "4", "5"} for i in items)

    # The item is the converter's item (the training data's): same text, same metadata (genres).
    from p2p_lab.data.converters import convert

    converted = next(u for u in convert("movielens-rating").users if u.user_id == user)
    by_id = {it.meta["item_id"]: it for it in converted.items}
    for it in items:
        assert (it.input, it.meta) == (by_id[it.meta["item_id"]].input, by_id[it.meta["item_id"]].meta)
    assert " | Genres: " in items[0].input and "(" in items[0].input  # "Title (Year) | Genres: A|B"
    assert items[0].meta["genres"]


def test_movielens_needs_user_and_movies(tmp_path: Path, shared_data: Path):
    ratings = shared_data / "movielens-latest-small" / "ratings.csv"
    with pytest.raises(DataError, match="610 users") as e:
        read_import(ratings)
    assert "--user" in e.value.hint
    with pytest.raises(DataError, match="no user '99999'"):
        read_import(ratings, user="99999")
    lone = _write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n")
    with pytest.raises(DataError, match="movies.csv: no such file") as e:
        read_import(lone)
    assert "--movies" in e.value.hint
    got = read_import(lone, movies=shared_data / "movielens-latest-small" / "movies.csv")
    assert got.items[0].input == "Toy Story (1995) | Genres: Adventure|Animation|Children|Comedy|Fantasy"


def test_movielens_bad_rows_name_the_line(tmp_path: Path):
    _write(tmp_path / "movies.csv", "movieId,title,genres\n1,Heat (1995),Action|Crime\n")
    bad = _write(tmp_path / "r.csv", "userId,movieId,rating,timestamp\n1,1,4.0,1\n1,1,nine,2\n")
    with pytest.raises(DataError, match=r"r\.csv:3: bad rating row"):
        read_import(bad)
    unknown = _write(tmp_path / "r2.csv", "userId,movieId,rating,timestamp\n1,1,4.0,1\n1,2,4.0,2\n")
    with pytest.raises(DataError, match=r"r2\.csv:3: movie 2 is not in"):
        read_import(unknown)
    out_of_range = _write(tmp_path / "r3.csv", "userId,movieId,rating,timestamp\n1,1,7,1\n")
    with pytest.raises(DataError, match=r"r3\.csv:2: rating 7.0"):
        read_import(out_of_range)


def test_rating_to_stars():
    assert [rating_to_stars(r) for r in (0.5, 1.0, 1.5, 3.5, 4.0, 4.5, 5.0)] == [1, 1, 2, 4, 4, 5, 5]


# --- generic formats -----------------------------------------------------------------------------
def test_jsonl_users_pick_and_items(tmp_path: Path):
    f = _write(tmp_path / "u.jsonl", "\n".join([
        json.dumps({"user_id": "u1", "task": "t", "items": [{"input": "b", "output": "2", "time": 20},
                                                           {"input": "a", "output": 1, "time": "1970-01-01T00:00:10Z"}]}),
        "",
        json.dumps({"user_id": 2, "items": [{"input": "c", "output": "3", "meta": {"k": 1}}]}),
    ]))
    with pytest.raises(DataError, match="holds 2 users"):
        read_import(f)
    p = read_import(f, user="u1")
    assert (p.format, p.user_id, p.task) == ("jsonl", "u1", "t")
    assert [(i.input, i.output, i.time) for i in p.items] == [("a", "1", 10.0), ("b", "2", 20.0)]  # time order
    p2 = read_import(f, user="2")
    assert p2.items[0].meta == {"k": 1} and p2.items[0].time is None


def test_jsonl_errors_name_file_and_line(tmp_path: Path):
    good = json.dumps({"user_id": "u", "items": [{"input": "a", "output": "b"}]})
    f = _write(tmp_path / "bad.jsonl", good + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        read_import(f)
    f = _write(tmp_path / "bad2.jsonl", "\n\n" + json.dumps({"user_id": "u", "items": [
        {"input": "a", "output": "b"}, {"input": "a", "output": "b", "time": "yesterday"}]}) + "\n")
    with pytest.raises(DataError, match=r"bad2\.jsonl:3: item 1: bad time 'yesterday'"):
        read_import(f)
    f = _write(tmp_path / "items.jsonl", '{"input": "a", "output": "b"}\n{"input": "", "output": "b"}\n')
    with pytest.raises(DataError, match=r"items\.jsonl:2: item 'input' must be a non-empty string"):
        read_import(f)


def test_json_single_user_list_and_items(tmp_path: Path):
    one = _write(tmp_path / "one.json", json.dumps({"user_id": "x", "items": [{"input": "a", "output": "b"}]}))
    assert read_import(one).user_id == "x"
    many = _write(tmp_path / "many.json", json.dumps([{"user_id": "x", "items": [{"input": "a", "output": "b"}]},
                                                      {"user_id": "y", "items": []}]))
    assert read_import(many, user="y").items == []
    items = _write(tmp_path / "items.json", json.dumps([{"input": "a", "output": "b", "task": "t2"}]))
    assert read_import(items).items[0].task == "t2"


def test_json_structural_errors_give_the_line_of_the_item(tmp_path: Path):
    doc = {"user_id": "x", "items": [{"input": "a", "output": "b"}, {"input": "c", "output": "d"},
                                     {"input": "e", "output": None}]}
    f = _write(tmp_path / "pretty.json", json.dumps(doc, indent=2))
    line = next(n for n, ln in enumerate(f.read_text().splitlines(), 1) if '"e"' in ln) - 1  # the item's "{"
    with pytest.raises(DataError, match=rf"pretty\.json:{line}: item 2: item 'output'"):
        read_import(f)
    users = _write(tmp_path / "users.json", json.dumps([{"user_id": "x", "items": []},
                                                        {"user_id": "y", "items": [{"input": 1, "output": [1]}]}],
                                                       indent=1))
    line = next(n for n, ln in enumerate(users.read_text().splitlines(), 1) if '"input": 1' in ln) - 1
    with pytest.raises(DataError, match=rf"users\.json:{line}: item 0: item 'output'"):
        read_import(users, user="y")
    syntax = _write(tmp_path / "syntax.json", '{\n  "user_id": "x",\n  "items": [,]\n}')
    with pytest.raises(DataError, match=r"syntax\.json:3: invalid JSON"):
        read_import(syntax)


def test_csv_generic_with_task_time_meta_and_multiline(tmp_path: Path):
    f = _write(tmp_path / "h.csv", 'input,output,time,task,source\n'
                                   'hello,world,2024-01-01T00:00:00+00:00,greet,notes\n'
                                   '"multi\nline, with comma",ok,1,,\n')
    p = read_import(f)
    assert p.format == "csv"
    assert [(i.input, i.output, i.time, i.task, i.meta) for i in p.items] == [
        ("multi\nline, with comma", "ok", 1.0, None, {}),
        ("hello", "world", 1704067200.0, "greet", {"source": "notes"}),
    ]


def test_csv_errors_name_the_line(tmp_path: Path):
    f = _write(tmp_path / "h.csv", 'input,output\na,b\n"two\nlines",c\nonly-one-field\n')
    with pytest.raises(DataError, match=r"h\.csv:5: fewer fields"):
        read_import(f)
    f = _write(tmp_path / "m.csv", "input,answer\na,b\n")
    with pytest.raises(DataError, match=r"m\.csv:1: cannot tell the format"):
        read_import(f)
    with pytest.raises(DataError, match=r"m\.csv:1: missing column\(s\) output"):
        read_import(f, "csv")
    f = _write(tmp_path / "e.csv", "input,output\na,\n")
    with pytest.raises(DataError, match=r"e\.csv:2: item 'output'"):
        read_import(f)
    latin = tmp_path / "l.csv"
    latin.write_bytes(b"input,output\na,b\ncaf\xe9,c\n")
    with pytest.raises(DataError, match=r"l\.csv:3: not UTF-8"):
        read_import(latin)


def test_csv_with_user_column_and_bom(tmp_path: Path):
    f = _write(tmp_path / "u.csv", "\ufeffuser_id,input,output\n1,a,b\n2,c,d\n1,e,f\n")
    assert [i.input for i in read_import(f, user="1").items] == ["a", "e"]
    with pytest.raises(DataError, match="holds 2 users"):
        read_import(f)


def test_detect_format_and_missing_file(tmp_path: Path):
    assert detect_format(Path("x.jsonl")) == "jsonl" and detect_format(Path("x.json")) == "json"
    assert detect_format(_write(tmp_path / "r.csv", "userId,movieId,rating,timestamp\n")) == "movielens"
    with pytest.raises(DataError, match="no such file"):
        read_import(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="unknown import format"):
        read_import(tmp_path / "nope.jsonl", "xml")


def test_parse_time():
    assert parse_time(None) is None and parse_time("") is None
    assert parse_time(5) == 5.0 and parse_time(" 7.5 ") == 7.5
    assert parse_time("1970-01-01T00:01:00Z") == 60.0
    for bad in ("soon", True, float("nan"), [1]):
        with pytest.raises(ValueError):
            parse_time(bad)


# --- into the store ------------------------------------------------------------------------------
def test_failed_import_leaves_profile_untouched(store: Store, tmp_path: Path):
    store.profiles.create_profile("alice", task="t")
    store.profiles.add_item("alice", None, "kept", "1")
    lines = [json.dumps({"input": f"i{k}", "output": "o"}) for k in range(500)] + ['{"input": "x"}']
    f = _write(tmp_path / "big.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"big\.jsonl:501"):
        import_file(store, "alice", f)
    assert [i.input for i in store.profiles.items("alice")] == ["kept"]


def test_import_task_resolution(store: Store, tmp_path: Path):
    f = _write(tmp_path / "h.csv", "input,output,task\na,1,\nb,2,own\n")
    store.profiles.create_profile("p")
    from p2p_local.errors import StoreError

    with pytest.raises(StoreError, match="no default task"):
        import_file(store, "p", f)  # neither the file, --task nor the profile names a task for "a"
    assert store.profiles.count_items("p") == 0
    import_file(store, "p", f, task="cli")
    assert store.profiles.task_counts("p") == {"cli": 1, "own": 1}
    assert store.profiles.get_profile("p").task == "cli"


def test_a_file_import_reports_its_stages(store: Store, tmp_path: Path):
    """A long import is never silent: the CLI shows these stages for large files on a terminal."""
    path = _write(tmp_path / "items.jsonl", "".join(
        json.dumps({"input": f"q{i}", "output": "4", "time": 1.6e9 + i}) + "\n" for i in range(50)))
    store.profiles.create_profile("p", task="movielens-rating")
    stages: list[str] = []
    import_file(store, "p", path, progress=stages.append)
    assert stages == ["reading items.jsonl", "50 items read; checking and writing them"]
