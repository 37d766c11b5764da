"""`p2p profile ...` end to end through `p2p_local.cli.main`, checking the SQLite file directly."""

from __future__ import annotations

import io
import json
import sqlite3
import stat
from pathlib import Path

import pytest

from p2p_local.cli import main


def _db(home: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(home / "p2p.sqlite3")
    conn.row_factory = sqlite3.Row
    return conn


def _json(capsys, argv: list[str]):
    capsys.readouterr()
    assert main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["profile", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "p2p profile import" in out and "forget" in out
    with pytest.raises(SystemExit):
        main(["profile", "import", "--help"])
    assert "example:" in capsys.readouterr().out


def test_create_list_show(p2p_home: Path, capsys):
    assert main(["profile", "create", "alice", "--task", "movielens-rating"]) == 0
    assert "created profile 'alice'" in capsys.readouterr().out
    row = _db(p2p_home).execute("SELECT name, task, adapter_stale FROM profiles").fetchone()
    assert tuple(row) == ("alice", "movielens-rating", 1)

    assert main(["profile", "create", "alice"]) == 7  # StoreError
    assert "already exists" in capsys.readouterr().err

    assert main(["profile", "list"]) == 0
    out = capsys.readouterr().out
    assert "alice" in out and "movielens-rating" in out
    assert "none yet" in out and "stale" not in out  # no adapter was ever made: not "stale"
    listed = _json(capsys, ["profile", "list"])
    assert [(p["name"], p["n_items"]) for p in listed] == [("alice", 0)]

    shown = _json(capsys, ["profile", "show", "alice"])
    assert shown["profile"]["name"] == "alice" and shown["items"] == []
    assert main(["profile", "show", "alicia"]) == 7
    assert "did you mean 'alice'" in capsys.readouterr().err


def test_add_edit_delete_history(p2p_home: Path, capsys):
    main(["profile", "create", "bob", "--task", "notes"])
    item = _json(capsys, ["profile", "add", "bob", "--input", "Heat (1995) | Genres: Action|Crime", "--output", "5",
                          "--time", "2020-01-02T03:04:05+00:00", "--meta", '{"source": "cli"}'])
    assert item["task"] == "notes" and item["time"] == 1577934245.0
    db = _db(p2p_home)
    row = db.execute("SELECT input, output, meta FROM items WHERE id = ?", (item["id"],)).fetchone()
    assert tuple(row) == ("Heat (1995) | Genres: Action|Crime", "5", '{"source": "cli"}')

    assert main(["profile", "edit", "bob", str(item["id"]), "--output", "4"]) == 0
    assert db.execute("SELECT output FROM items WHERE id = ?", (item["id"],)).fetchone()[0] == "4"
    assert main(["profile", "edit", "bob", str(item["id"])]) == 2  # nothing to change
    capsys.readouterr()
    assert main(["profile", "edit", "bob", str(item["id"]), "--output", "4"]) == 0  # the value it already has
    assert "nothing changed" in capsys.readouterr().out
    hist = _json(capsys, ["profile", "history", "bob", str(item["id"])])
    assert [h["action"] for h in hist] == ["add", "edit"] and hist[1]["old"]["output"] == "5"

    main(["profile", "create", "carol", "--task", "t"])
    assert main(["profile", "edit", "carol", str(item["id"]), "--output", "1"]) == 7  # not carol's item
    assert main(["profile", "add", "bob", "--input", "x", "--output", "y", "--time", "someday"]) == 6  # DataError
    assert main(["profile", "add", "bob", "--input", "x", "--output", "y", "--meta", "[1]"]) == 6

    assert main(["profile", "delete", "bob", str(item["id"])]) == 0
    assert db.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 0
    actions = [r[0] for r in db.execute("SELECT action FROM item_history WHERE item_id = ? ORDER BY id", (item["id"],))]
    assert actions == ["add", "edit", "delete"]


def test_import_real_movielens_user_and_export(p2p_home: Path, shared_data: Path, tmp_path: Path, capsys):
    ratings = shared_data / "movielens-latest-small" / "ratings.csv"
    assert main(["profile", "import", "ml", str(ratings), "--user", "1"]) == 7  # no such profile yet
    assert "--create" in capsys.readouterr().err
    res = _json(capsys, ["profile", "import", "ml", str(ratings), "--user", "1", "--create"])
    assert (res["format"], res["user_id"], res["task"], res["imported"]) == ("movielens", "1", "movielens-rating", 232)
    db = _db(p2p_home)
    assert db.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 232
    assert db.execute("SELECT task FROM profiles WHERE name = 'ml'").fetchone()[0] == "movielens-rating"
    assert db.execute("SELECT COUNT(*) FROM item_history WHERE action = 'add'").fetchone()[0] == 232

    assert main(["profile", "import", "ml", str(ratings)]) == 6  # 610 users: which one?
    assert "--user" in capsys.readouterr().err

    shown = _json(capsys, ["profile", "show", "ml", "--items", "3"])
    assert shown["profile"]["n_items"] == 232 and len(shown["items"]) == 3
    assert shown["tasks"] == {"movielens-rating": 232}
    assert main(["profile", "show", "ml"]) == 0
    assert "most recent 10 item(s)" in capsys.readouterr().out

    out = tmp_path / "ml.json"
    assert main(["profile", "export", "ml", "-o", str(out)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    data = json.loads(out.read_text())
    assert data["user_id"] == "ml" and data["task"] == "movielens-rating" and len(data["items"]) == 232
    assert set(data["items"][0]) == {"input", "output", "time", "meta"}

    capsys.readouterr()
    assert main(["profile", "export", "ml"]) == 0  # to stdout
    assert json.loads(capsys.readouterr().out) == data

    # The export imports back as a new profile with the same items.
    assert main(["profile", "import", "copy", str(out), "--create"]) == 0
    rows = db.execute("SELECT p.name, COUNT(*) FROM items i JOIN profiles p ON p.id = i.profile_id GROUP BY p.name")
    assert dict(rows.fetchall()) == {"ml": 232, "copy": 232}


def test_import_bad_file_exit_code_and_nothing_written(p2p_home: Path, tmp_path: Path, capsys):
    main(["profile", "create", "alice", "--task", "t"])
    f = tmp_path / "h.csv"
    f.write_text("input,output\na,b\nc,\n")
    assert main(["profile", "import", "alice", str(f)]) == 6
    assert "h.csv:3" in capsys.readouterr().err
    assert _db(p2p_home).execute("SELECT COUNT(*) FROM items").fetchone()[0] == 0


def test_forget_needs_confirmation(p2p_home: Path, monkeypatch, capsys):
    main(["profile", "create", "alice", "--task", "t"])
    main(["profile", "add", "alice", "--input", "a", "--output", "b"])

    class FakeTTY(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stdin", io.StringIO("alice\n"))  # not a terminal: refuse
    assert main(["profile", "forget", "alice"]) == 7
    assert "--yes" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", FakeTTY("bob\n"))  # a terminal, wrong answer
    assert main(["profile", "forget", "alice"]) == 1
    assert _db(p2p_home).execute("SELECT COUNT(*) FROM profiles").fetchone()[0] == 1

    monkeypatch.setattr("sys.stdin", FakeTTY("alice\n"))  # a terminal, typed the name
    assert main(["profile", "forget", "alice"]) == 0
    db = _db(p2p_home)
    assert db.execute("SELECT COUNT(*) FROM profiles").fetchone()[0] == 0
    assert db.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 0
    assert db.execute("SELECT COUNT(*) FROM item_history").fetchone()[0] == 0


def test_forget_yes_removes_adapter_files(p2p_home: Path, capsys):
    from p2p_local.store import Store

    main(["profile", "create", "alice", "--task", "t"])
    with Store() as s:
        f = s.adapters.adapter_dir("alice") / "abc.gguf"
        f.write_bytes(b"GGUF")
        s.adapters.record_adapter("alice", "abc", "bundle", f)
    assert f.resolve().is_relative_to(p2p_home.resolve())  # profile data stays under the data dir
    report = _json(capsys, ["profile", "forget", "alice", "--yes"])
    assert report["adapters"] == 1 and report["files_removed"] == 1
    assert not f.exists()
    assert _db(p2p_home).execute("SELECT COUNT(*) FROM adapters").fetchone()[0] == 0
    assert main(["profile", "forget", "alice", "--yes"]) == 7


def test_profile_without_action_prints_usage(p2p_home: Path, capsys):
    assert main(["profile"]) == 2
    assert "ACTION" in capsys.readouterr().out


def test_show_strips_escape_sequences_from_user_data(p2p_home, capsys) -> None:
    """A commit subject holding ANSI/OSC sequences (colour, window title, cursor moves) printed raw by
    `profile show` would rewrite the user's terminal: the text is shown, the sequences are not."""
    from p2p_local.cli import main

    assert main(["profile", "create", "esc", "--task", "commit-subject"]) == 0
    evil = "files: a.py\x1b]0;pwned\x07"
    assert main(["profile", "add", "esc", "--input", evil, "--output", "Fix \x1b[31mred\x1b[0m\x1b[2J it\x9b1A"]) == 0
    capsys.readouterr()
    assert main(["profile", "show", "esc"]) == 0
    out = capsys.readouterr().out
    assert "Fix red it" in out and "files: a.py" in out
    assert not any(c in out for c in "\x1b\x07\x9b"), repr(out)
