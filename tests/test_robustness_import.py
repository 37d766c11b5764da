"""Importers refuse hostile files with a DataError at file:line: never a traceback, a hang or poison in the store."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from p2p_local.data.records import parse_time
from p2p_local.errors import DataError, P2PError, StoreError
from p2p_local.importers import MAX_FIELD_CHARS, import_file
from p2p_local.store import Store


@pytest.fixture
def store(p2p_home: Path):
    s = Store()
    s.profiles.create_profile("alice", task="movielens-rating")
    s.profiles.create_profile("gen", task="commit-subject")
    yield s
    s.close()


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def refused(store: Store, path: Path, match: str, profile: str = "alice", **kw) -> DataError:
    before = store.profiles.count_items(profile)
    with pytest.raises(DataError, match=match) as e:
        import_file(store, profile, path, **kw)
    assert store.profiles.count_items(profile) == before  # all or nothing
    return e.value


CSV_HEAD = "input,output,time\n"
DEEP: list = [1]
for _ in range(20):
    DEEP = [DEEP]


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("big-field.csv", CSV_HEAD + "x" * 200_000 + ",5,1\n", r"big-field.csv:2: unreadable CSV"),
        ("long-field.csv", CSV_HEAD + "x" * (MAX_FIELD_CHARS + 1) + ",5,1\n", r"long-field.csv:2: .*characters"),
        ("nul.csv", CSV_HEAD + "a\x00b,5,1\n", r"nul.csv:2: .*NUL"),
        ("inf-time.csv", CSV_HEAD + "a,5,inf\n", r"inf-time.csv:2: .*outside 1900..2100"),
        ("huge-time.csv", CSV_HEAD + "a,5,1e300\n", r"huge-time.csv:2: .*outside"),
        ("ms-time.csv", CSV_HEAD + "a,5,1700000000000\n", r"ms-time.csv:2: .*outside"),
        ("rating-9.csv", CSV_HEAD + "a,5,1\nb,9,2\n", r"rating-9.csv:3: movielens-rating answers are one of"),
        ("deep.json", "[" * 100_000 + "]" * 100_000, r"deep.json:1: JSON nested too deeply"),
        ("deep-meta.jsonl", json.dumps({"input": "a", "output": "5", "meta": {"k": DEEP}}),
         r"deep-meta.jsonl:1: .*nested"),
        ("bigint.json", '[{"input": "a", "output": ' + "9" * 5000 + "}]", r"bigint.json:1: unusable JSON value"),
        ("bigint2.json", '[{"input": "a", "output": ' + "9" * 400 + "}]", r"not a usable number"),
        ("bigtime.json", '[{"input": "a", "output": "5", "time": ' + "9" * 400 + "}]", r"outside 1900..2100"),
        ("surrogate.jsonl", '{"input": "a\\ud800", "output": "5"}\n', r"surrogate.jsonl:1: .*surrogate"),
        ("nan.jsonl", '{"input": "a", "output": "5", "time": NaN}\n', r"nan.jsonl:1: .*outside"),
        ("rating-0.jsonl", '{"input": "a", "output": "0"}\n', r"rating-0.jsonl:1: movielens-rating answers"),
        ("label-float.json", '[{"input": "a", "output": 4.5}]', r"movielens-rating answers are one of"),
    ],
)
def test_hostile_files_are_refused_at_their_line(store: Store, tmp_path: Path, name: str, text: str,
                                                 match: str) -> None:
    e = refused(store, _write(tmp_path / name, text), match)
    assert e.hint is not None or ":" in str(e)


def test_generation_tasks_take_any_text_but_not_poison(store: Store, tmp_path: Path) -> None:
    ok = _write(tmp_path / "ok.jsonl", '{"input": "diff", "output": "Fix the thing", "time": 1700000000}\n')
    assert import_file(store, "gen", ok).imported == 1
    refused(store, _write(tmp_path / "bad.jsonl", '{"input": "diff", "output": "x", "time": "inf"}\n'),
            "outside", profile="gen")


def test_a_fifo_is_refused_without_blocking(store: Store, tmp_path: Path) -> None:
    fifo = tmp_path / "ratings.csv"
    os.mkfifo(fifo)
    result: list[BaseException | None] = []

    def run() -> None:
        try:
            import_file(Store(), "alice", fifo)
            result.append(None)
        except BaseException as e:  # noqa: BLE001 - the thread reports whatever happened
            result.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():  # unblock the reader so the test process can end, then fail
        with open(fifo, "w"):
            pass
        pytest.fail("importing a FIFO blocked")
    assert isinstance(result[0], DataError) and "not a regular file" in str(result[0])


def test_devices_and_directories_are_refused(store: Store, tmp_path: Path) -> None:
    refused(store, Path("/dev/zero"), "not a regular file", fmt="csv")
    refused(store, tmp_path, "directory")


def test_profile_add_and_import_agree_on_times() -> None:
    for bad in ("inf", "-inf", "nan", "1e300", 1e300, float("inf"), 10**400, "9" * 100, "2200-01-01"):
        with pytest.raises(ValueError):
            parse_time(bad)
    assert parse_time("2024-05-01T12:00:00Z") == 1714564800.0
    assert parse_time(0) == 0.0


def test_the_store_refuses_poison_times_too(store: Store) -> None:
    for bad in (float("inf"), float("nan"), 1e300, -1e300):
        with pytest.raises(StoreError, match="time"):
            store.profiles.add_item("alice", None, "a", "5", time=bad)


@pytest.mark.parametrize("name", ["alice\n", "alice\r\n", " alice", "a/b", "", "x" * 65, "a\x00"])
def test_profile_names_match_whole_strings(store: Store, name: str) -> None:
    with pytest.raises(P2PError):
        store.profiles.create_profile(name)


def test_imported_profile_shows_and_round_trips(store: Store, tmp_path: Path, capsys) -> None:
    """What import accepts, `show` displays and `export` writes back in a form import accepts again."""
    from p2p_local.cli import main

    src = _write(tmp_path / "ok.csv", CSV_HEAD + "Heat (1995),5,1700000000\n\"a, b\",3,\n")
    import_file(store, "alice", src)
    assert main(["profile", "show", "alice"]) == 0
    out = tmp_path / "alice.json"
    assert main(["profile", "export", "alice", "-o", str(out)]) == 0
    store.profiles.create_profile("copy", task="movielens-rating")
    assert import_file(store, "copy", out).imported == 2


def test_letterboxd_with_a_column_twice_is_refused(tmp_path: Path, p2p_home: Path) -> None:
    """csv keeps the last of two "Rating" columns: the file is refused, not read by a guess."""
    from p2p_local.cli import main

    f = tmp_path / "ratings.csv"
    f.write_text("Date,Name,Year,Letterboxd URI,Rating,Rating\n2020-01-01,Heat,1995,https://boxd.it/x,4,1\n")
    assert main(["profile", "import", "me", str(f), "--create"]) == 6
    assert not (p2p_home / "p2p.sqlite3").exists() or main(["profile", "show", "me"]) != 0
