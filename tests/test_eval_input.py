"""`p2p eval --data FILE --task-card CARD` reads untrusted files: every bad input ends in a clean error (a
P2PError's exit code and message), never exit 70 (a crash), a hang or an unbounded read; outputs are checked
against the card before the run; matplotlib writes nothing outside --out.

Most cases run `cli.main` (what the `p2p` script calls) in-process; the ones that could hang or must see the
real process environment (a FIFO, /dev/zero, $HOME) run the installed `p2p` in a subprocess with a timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from p2p_local.cli import main
from p2p_local.data import format as fmt
from p2p_local.data.format import TaskCard, read_users_jsonl
from p2p_local.errors import DataError, InternalError, UsageError

P2P = Path(sys.executable).with_name("p2p")
CARD = {"name": "mine", "kind": "rating", "template": "Movie: {input}\nRating (1-5): ", "description": "rates movies",
        "labels": ["1", "2", "3", "4", "5"], "value_range": [1, 5], "metrics": ["mae"]}


def _user(uid: str, n: int = 6, **item) -> dict:
    items = [{"input": f"movie {i}", "output": str(1 + (i * 7 + len(uid)) % 5), "time": 1e9 + i} for i in range(n)]
    items[0].update(item)
    return {"user_id": uid, "items": items}


def _lines(*users: dict) -> str:
    return "".join(json.dumps(u, allow_nan=True) + "\n" for u in users)


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    """A valid card and users file (40 users, 6 items each) to break one thing at a time."""
    card, data = tmp_path / "card.json", tmp_path / "users.jsonl"
    card.write_text(json.dumps(CARD))
    data.write_text(_lines(*(_user(str(u)) for u in range(40))))
    return card, data


def _eval(p2p_home, tmp_path: Path, card: Path | str, data: Path | str, *extra: str) -> int:
    return main(["eval", "--data", str(data), "--task-card", str(card), "--methods", "global-mean", "--queries", "2",
                 "--bootstrap", "10", "--out", str(tmp_path / "out"), *extra])


def _refused(capsys, code: int, exit_code: int, *fragments: str) -> None:
    err = capsys.readouterr().err
    assert code == exit_code != InternalError.exit_code, err
    for f in fragments:
        assert f in err, err


# --- the card: every field's type and range --------------------------------------------------------------
@pytest.mark.parametrize("changes, fragment", [
    ({"labels": 5}, "labels"),
    ({"labels": [["1"]]}, "label"),
    ({"labels": ["1", "1"]}, "distinct"),
    ({"labels": [" 1"]}, "surrounding spaces"),
    ({"labels": ["nan", "1"]}, "finite"),
    ({"value_range": "ab"}, "value_range"),
    ({"value_range": [5, 1]}, "value_range"),
    ({"value_range": [1, float("nan")]}, "value_range"),
    ({"value_range": [1, 10**400]}, "value_range"),
    ({"value_range": [2, 5]}, "outside value_range"),
    ({"kind": ["rating"]}, "kind"),
    ({"name": "../../etc/x"}, "invalid name"),
    ({"name": 5}, "invalid name"),
    ({"template": 5}, "template"),
    ({"template": "{input} {input:>999999999}"}, "only field"),
    ({"template": "{input} {input.__class__}"}, "only field"),
    ({"template": "x" * 5000 + "{input}"}, "at most"),
    ({"description": ["a"]}, "description"),
    ({"metrics": "mae"}, "metrics"),
    ({"metrics": [1]}, "metrics"),
    ({"input_fields": {"g": 1}}, "input_fields"),
    ({"input_fields": {"g": {"after": "x", "split": 3}}}, "split"),
    ({"input_fields": {"g": {"after": "x", "ignore": "y"}}}, "ignore"),
    ({"input_fields": {"g": {"after": "x", "oops": 1}}}, "input_fields"),
    ({"one_line": "yes"}, "one_line"),
    ({"examples": "2"}, "examples"),
    ({"samples": "x"}, "samples"),
    ({"split": {}}, "split"),
])
def test_a_card_field_of_the_wrong_type_or_range_is_a_data_error(p2p_home, tmp_path, files, capsys, changes,
                                                                  fragment):
    card, data = files
    card.write_text(json.dumps(CARD | changes, allow_nan=True))
    _refused(capsys, _eval(p2p_home, tmp_path, card, data), DataError.exit_code, fragment)


def test_profile_create_checks_the_card_by_the_same_rules(p2p_home, tmp_path, capsys):
    card = tmp_path / "card.json"
    card.write_text(json.dumps(CARD | {"labels": 5}))
    _refused(capsys, main(["profile", "create", "x", "--task-card", str(card)]), DataError.exit_code, "labels")


@pytest.mark.parametrize("text, fragment", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"name": ' + "9" * 5000 + "}", "unusable JSON value"),
    ("[1, 2]", "JSON object"),
    ("{", "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
])
def test_a_card_file_that_is_not_a_json_object_is_a_data_error(p2p_home, tmp_path, files, capsys, text, fragment):
    card, data = files
    card.write_bytes(text if isinstance(text, bytes) else text.encode())
    _refused(capsys, _eval(p2p_home, tmp_path, card, data), DataError.exit_code, fragment)


def test_a_card_field_study_is_checked_too(p2p_home, tmp_path, files, capsys):
    card, data = files
    code = _eval(p2p_home, tmp_path, card, data, "--card-field", "labels=5")
    _refused(capsys, code, DataError.exit_code, "labels")


def test_an_oversized_card_is_refused_before_it_is_read(tmp_path, monkeypatch):
    path = tmp_path / "card.json"
    path.write_text(json.dumps(CARD | {"pad": "x" * 5000}))
    monkeypatch.setattr(fmt, "MAX_CARD_BYTES", 1000)
    with pytest.raises(DataError, match="too large"):
        TaskCard.load(path)


# --- the users file ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("item, fragment", [
    ({"time": int("9" * 400)}, "outside 1900..2100"),
    ({"time": float("nan")}, "outside 1900..2100"),
    ({"time": float("inf")}, "outside 1900..2100"),
    ({"time": 1e300}, "outside 1900..2100"),
    ({"time": "2024-01-01"}, "time"),
    ({"meta": {"x": float("nan")}}, "non-finite"),
    ({"meta": {"x": json.loads("[" * 40 + "]" * 40)}}, "nested more than 16"),
])
def test_a_bad_item_is_a_data_error_at_its_line(p2p_home, tmp_path, files, capsys, item, fragment):
    card, data = files
    data.write_text(_lines(_user("a"), _user("b", **item)))
    _refused(capsys, _eval(p2p_home, tmp_path, card, data), DataError.exit_code, f"{data}:2", fragment)


def test_metadata_nested_past_the_recursion_limit_is_a_data_error(p2p_home, tmp_path, files, capsys):
    card, data = files
    deep = "[" * 100_000 + "]" * 100_000
    data.write_text(_lines(_user("a")) + '{"user_id": "b", "items": [{"input": "a", "output": "3", "meta": {"x": '
                    + deep + "}}]}\n")
    _refused(capsys, _eval(p2p_home, tmp_path, card, data), DataError.exit_code, f"{data}:2", "nested too deeply")


def test_a_repeated_user_id_is_refused(p2p_home, tmp_path, files, capsys):
    card, data = files
    data.write_text(_lines(_user("a"), _user("b"), _user("a")))
    _refused(capsys, _eval(p2p_home, tmp_path, card, data), DataError.exit_code, f"{data}:3", "'a' again",
             "line 1")


def test_a_repeated_user_id_counts_numbers_as_text(tmp_path):
    data = tmp_path / "u.jsonl"
    data.write_text(_lines(_user("7") | {"user_id": 7}, _user("7")))
    with pytest.raises(DataError, match="again"):
        read_users_jsonl(data)


def test_an_output_outside_the_labels_is_refused_before_the_run(p2p_home, tmp_path, files, capsys):
    card, data = files
    data.write_text(_lines(*(_user(str(u)) for u in range(39)), _user("z", output="banana")))
    _refused(capsys, _eval(p2p_home, tmp_path, card, data), DataError.exit_code, "'banana'", "labels")
    assert not (tmp_path / "out" / "runs").exists()  # refused before any method ran


def test_a_line_past_the_cap_is_refused(tmp_path, monkeypatch):
    data = tmp_path / "u.jsonl"
    data.write_text(_lines(_user("a"), _user("b", input="x" * 5000)))
    monkeypatch.setattr(fmt, "MAX_LINE_BYTES", 2000)
    with pytest.raises(DataError, match=r":2: line longer than 2,000 bytes"):
        read_users_jsonl(data)


def test_a_file_past_the_cap_is_refused_before_it_is_read(tmp_path, monkeypatch):
    data = tmp_path / "u.jsonl"
    data.write_text(_lines(*(_user(str(u)) for u in range(20))))
    monkeypatch.setattr(fmt, "MAX_USERS_FILE_BYTES", 1000)
    with pytest.raises(DataError, match="too large"):
        read_users_jsonl(data)


@pytest.mark.parametrize("which", ["data", "card"])
def test_a_folder_is_not_a_file(p2p_home, tmp_path, files, capsys, which):
    card, data = files
    folder = tmp_path / "folder"
    folder.mkdir()
    args = (folder, data) if which == "card" else (card, folder)
    _refused(capsys, _eval(p2p_home, tmp_path, *args), DataError.exit_code, "is a directory")


def test_a_missing_file_is_a_data_error(p2p_home, tmp_path, files, capsys):
    card, _ = files
    _refused(capsys, _eval(p2p_home, tmp_path, card, tmp_path / "nope.jsonl"), DataError.exit_code, "not found")


def test_a_task_name_that_is_a_path_is_refused(p2p_home, tmp_path, files, capsys):
    card, data = files
    code = _eval(p2p_home, tmp_path, card, data, "--task", "../../escape")
    _refused(capsys, code, UsageError.exit_code, "not a task name")


def test_out_that_is_a_file_is_refused(p2p_home, tmp_path, files, capsys):
    card, data = files
    (tmp_path / "out").write_text("mine")
    _refused(capsys, _eval(p2p_home, tmp_path, card, data), UsageError.exit_code, "not a folder")


# --- through the installed CLI: what could hang, read forever or write under $HOME ----------------------------
def _cli(tmp_path: Path, card: Path | str, data: Path | str, timeout: float = 60) -> subprocess.CompletedProcess:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MPL", "XDG_"))}
    env |= {"HOME": str(home), "P2P_HOME": str(tmp_path / "p2p-home"), "P2P_THREADS": "1"}
    return subprocess.run([str(P2P), "eval", "--data", str(data), "--task-card", str(card), "--methods",
                           "global-mean,user-mean", "--queries", "2", "--bootstrap", "10", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("which", ["data", "card"])
def test_a_fifo_is_refused_without_blocking(tmp_path, files, which):
    card, data = files
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    proc = _cli(tmp_path, *((fifo, data) if which == "card" else (card, fifo)), timeout=30)  # a block never returns
    assert proc.returncode == DataError.exit_code and "not a regular file" in proc.stderr, proc.stderr


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
@pytest.mark.parametrize("which", ["data", "card"])
def test_dev_zero_is_refused_not_read(tmp_path, files, which):
    card, data = files
    proc = _cli(tmp_path, *(("/dev/zero", data) if which == "card" else (card, "/dev/zero")), timeout=30)
    assert proc.returncode == DataError.exit_code and "not a regular file" in proc.stderr, proc.stderr


def test_a_run_writes_nothing_under_home(tmp_path, files):
    card, data = files
    proc = _cli(tmp_path, card, data, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert list((tmp_path / "home").iterdir()) == []  # no ~/.config/matplotlib, no ~/.cache/matplotlib
    assert (tmp_path / "out" / "mine-test.png").is_file()
    assert not list((tmp_path / "out").glob(".matplotlib*"))  # its cache was temporary, inside --out
