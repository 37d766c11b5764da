"""Converters: the real data in ../shared/data, and hand-made bad inputs that must never crash them."""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from pathlib import Path

import pytest

from p2p_lab.data.converters import (
    MIN_COMMITS,
    convert,
    convert_commits,
    convert_email_rewrite,
    convert_movielens,
    convert_offensiveness,
)
from p2p_local.data.records import (
    MAX_BODY_CHARS,
    MAX_COMMENT_CHARS,
    MAX_FILES_CHARS,
    PR_SUFFIX,
    commit_input,
    truncate,
)
from p2p_local.errors import DataError

# ------------------------------------------------------------------ real data


@pytest.fixture(scope="module")
def movielens(shared_data):
    return convert_movielens(shared_data)


def test_movielens_real(movielens, shared_data):
    users, stats = movielens.users, movielens.stats
    assert len(users) == 610 and stats["items"] == 100836  # the README's counts
    by_id = {u.user_id: u for u in users}
    # Half stars round up: compare every rating of user 1 with the raw file.
    with open(shared_data / "movielens-latest-small" / "ratings.csv", newline="") as fh:
        raw = [r for r in csv.DictReader(fh) if r["userId"] == "1"]
    got = {it.meta["item_id"]: it for it in by_id["1"].items}
    assert len(got) == len(raw)
    for r in raw:
        it = got[int(r["movieId"])]
        assert it.output == str(math.ceil(float(r["rating"])))
        assert it.time == float(r["timestamp"])
    toy = got[1]
    assert toy.input == "Toy Story (1995) | Genres: Adventure|Animation|Children|Comedy|Fantasy"
    assert toy.meta["genres"][0] == "Adventure"
    for u in users:
        times = [it.time for it in u.items]
        assert times == sorted(times)
        assert {it.output for it in u.items} <= {"1", "2", "3", "4", "5"}
    assert stats["items_duplicate_time"] > 0  # MovieLens has many same-second ratings: counted


def test_half_star_rounding_examples(tmp_path):
    movies = [(str(m), f"M{m} (2000)", "Drama") for m in range(5)]
    ratings = [("1", str(i), r, str(100 + i)) for i, r in enumerate(["0.5", "3.5", "4.0", "5.0", "1.5"])]
    _movielens_dir(tmp_path, ratings, movies)
    (u,) = convert_movielens(tmp_path).users
    assert [it.output for it in u.items] == ["1", "4", "4", "5", "2"]


def test_popquorn_and_commits_real(shared_data):
    off = convert("popquorn-offensiveness", shared_data)
    assert len(off.users) == 262 and off.stats["items"] == 13036
    assert all(it.time is None for u in off.users for it in u.items)  # no timestamps: file order
    assert max(len(it.input) for u in off.users for it in u.items) <= MAX_COMMENT_CHARS
    email = convert("popquorn-email-rewrite", shared_data)
    assert email.stats["rows_skipped_missing_user"] == 80  # rows with an empty user_id
    assert all(it.input and it.output for u in email.users for it in u.items)
    assert not any(u.user_id.endswith(".0") for u in email.users)
    commits = convert("commit-subject", shared_data)
    assert all(len(u.items) >= MIN_COMMITS for u in commits.users)
    assert commits.stats["users"] == len(commits.users) > 50
    assert all(it.input.startswith("files: ") for u in commits.users for it in u.items)
    # GitHub's merge-button suffix "(#123)" is gone; an author's own "(#871, #976)" stays (their words).
    assert not any(PR_SUFFIX.search(it.output) for u in commits.users for it in u.items)
    assert {it.meta["repo"] for u in commits.users for it in u.items} >= {"pytest-dev/pytest", "pypa/pip", "numpy/numpy"}


def test_conversion_is_deterministic(shared_data):
    a = convert("commit-subject", shared_data)
    b = convert("commit-subject", shared_data)
    assert a.users == b.users and a.stats == b.stats


# ------------------------------------------------------------------ bad inputs


def _movielens_dir(root: Path, ratings, movies=None, header="userId,movieId,rating,timestamp") -> Path:
    d = root / "movielens-latest-small"
    d.mkdir(parents=True, exist_ok=True)
    movies = movies or [("10", "Heat (1995)", "Action|Crime"), ("11", "Up (2009)", "(no genres listed)")]
    with open(d / "movies.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["movieId", "title", "genres"])
        w.writerows(movies)
    lines = [header] + [",".join(r) for r in ratings]
    (d / "ratings.csv").write_text("\n".join(lines) + "\n")
    return d


def test_movielens_bad_rows_are_counted(tmp_path):
    rows = [
        ("1", "10", "4.0", "100"),
        ("1", "11", "3.5", "100"),  # same timestamp: counted, order kept
        ("1", "10", "2.0", "101"),  # duplicate (user, movie)
        ("1", "10", "4.0", "102", "extra"),  # wrong field count
        ("1", "10", "abc", "103"),  # bad rating
        ("1", "10", "9", "104"),  # out of range
        ("1", "99", "4", "105"),  # unknown movie
        ("", "10", "4", "106"),  # no user
        ("1", "11", "4", "later"),  # bad timestamp
        ("2", "10", "5", "100"),  # a one-item user
    ]
    stats = convert_movielens(_movielens_dir(tmp_path, rows).parent).stats
    users = convert_movielens(tmp_path).users
    assert [u.user_id for u in users] == ["1"]
    assert [it.output for it in users[0].items] == ["4", "4"]
    assert users[0].items[1].input == "Up (2009) | Genres: unknown"
    assert stats["rows_skipped_duplicate"] == 1
    assert stats["rows_skipped_malformed"] == 1
    assert stats["rows_skipped_bad_rating"] == 2
    assert stats["rows_skipped_unknown_movie"] == 1
    assert stats["rows_skipped_missing_user"] == 1
    assert stats["rows_skipped_bad_time"] == 1
    assert stats["users_dropped_one_item"] == 1
    assert stats["items_duplicate_time"] == 1


def test_missing_timestamp_column_keeps_file_order(tmp_path):
    _movielens_dir(tmp_path, [("1", "11", "2"), ("1", "10", "5")], header="userId,movieId,rating")
    res = convert_movielens(tmp_path)
    assert [it.output for it in res.users[0].items] == ["2", "5"]
    assert res.stats["column_missing_timestamp"] == 1


def test_missing_required_column_is_a_clear_error(tmp_path):
    _movielens_dir(tmp_path, [("1", "10", "100")], header="userId,movieId,timestamp")
    with pytest.raises(DataError, match=r"missing column\(s\) \['rating'\]"):
        convert_movielens(tmp_path)
    with pytest.raises(DataError, match="not found"):
        convert_offensiveness(tmp_path)


def _popquorn(root: Path, name: str, header: list[str], rows: list[list[str]], raw_tail: bytes = b"") -> None:
    d = root / "popquorn"
    d.mkdir(parents=True, exist_ok=True)
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    (d / name).write_bytes(buf.getvalue().encode("utf-8") + raw_tail)


OFF_HEADER = [
    "instance_id",
    "user_id",
    "text",
    "offensiveness",
    "gender",
    "race",
    "age",
    "occupation",
    "education",
]


def test_offensiveness_survives_non_utf8_and_malformed_rows(tmp_path):
    rows = [
        ["1", "0", "fine comment", "1.0", "Man", "", "", "", ""],
        ["2", "0", 'a "quoted", comma text\nwith a newline', "4.0", "", "", "", "", ""],
        ["3", "0", "", "2.0", "", "", "", "", ""],  # empty text
        ["4", "0", "short row"],  # malformed
        ["5", "0", "x" * 2000, "5", "", "", "", "", ""],  # long: truncated
        ["6", "1.0", "only one", "3", "", "", "", "", ""],  # user '1' with one item
        ["1", "0", "fine comment again", "2", "", "", "", "", ""],  # duplicate instance for user 0
    ]
    tail = b"7,0,caf\xe9 latin-1 bytes,2.0,,,,,\n"  # non-UTF-8 line
    _popquorn(tmp_path, "offensiveness.csv", OFF_HEADER, rows, tail)
    res = convert_offensiveness(tmp_path)
    (u,) = res.users
    assert u.user_id == "0"
    assert [it.meta["item_id"] for it in u.items] == [1, 2, 5, 7]  # file order
    assert u.items[1].input == 'a "quoted", comma text\nwith a newline'
    assert len(u.items[2].input) <= MAX_COMMENT_CHARS and u.items[2].input.endswith("…")
    assert "\ufffd" in u.items[3].input
    s = res.stats
    assert s["lines_non_utf8"] == 1 and s["rows_skipped_empty_text"] == 1
    assert s["rows_skipped_malformed"] == 1 and s["rows_skipped_duplicate"] == 1
    assert s["users_dropped_one_item"] == 1 and s["texts_truncated"] == 1


def test_email_rewrite_bad_rows(tmp_path):
    header = [
        "instance_id",
        "user_id",
        "original email",
        "revised email",
        "gender",
        "race",
        "age",
        "occupation",
        "education",
    ]
    rows = [
        ["1", "", "hi", "Hello.", "", "", "", "", ""],  # no user id
        ["2", "3.0", "yo\r\nsee you", "Hello,\n\n\n\nSee you.", "", "", "", "", ""],
        ["3", "3.0", "ok", "", "", "", "", "", ""],  # empty revision
        ["4", "3.0", "thx", "Thank you.", "", "", "", "", ""],
    ]
    _popquorn(tmp_path, "email_rewriting.csv", header, rows)
    res = convert_email_rewrite(tmp_path)
    (u,) = res.users
    assert u.user_id == "3"
    assert u.items[0].input == "yo\nsee you" and u.items[0].output == "Hello,\n\nSee you."
    assert res.stats["rows_skipped_missing_user"] == 1 and res.stats["rows_skipped_empty_text"] == 1


def test_empty_file_gives_no_users(tmp_path):
    _popquorn(tmp_path, "offensiveness.csv", OFF_HEADER, [])
    res = convert_offensiveness(tmp_path)
    assert res.users == [] and res.stats["users"] == 0


def _commit(author, n, date, subject="Fix it", body="", files=("a.py",)):
    return {
        "commit": f"{author}{n:04d}",
        "author_id": author,
        "date": date,
        "subject": subject,
        "body": body,
        "files": list(files),
    }


def test_commits_bad_lines_and_filters(tmp_path):
    d = tmp_path / "commits"
    d.mkdir()
    recs = [
        _commit("big", i, f"2020-01-{i + 1:02d}T10:00:00+00:00", f"Change {i} (#12{i})")
        for i in range(MIN_COMMITS)
    ]
    recs += [_commit("small", i, "2020-01-01T00:00:00+00:00") for i in range(3)]  # too few commits
    recs.append(_commit("solo", 0, "2020-01-01T00:00:00+00:00"))  # one commit
    lines = [json.dumps(r) for r in recs]
    lines[0] = json.dumps(
        _commit(
            "big", 0, "2019-12-31T23:00:00-05:00", "Change 0", "Body " * 200, [f"f{i}.py" for i in range(7)]
        )
    )
    lines += [
        "{broken json",
        "[1]",
        json.dumps(_commit("", 1, "2020-01-01")),
        json.dumps(_commit("big", 99, "yesterday")),
    ]
    lines.append(lines[1])  # duplicate commit
    (d / "pytest.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + b'{"author_id": "\xff"}\n')
    # A second repository: the same person (one id across repositories) and a commit hash seen in both.
    other = [{**_commit("big", 50 + i, f"2020-02-{i + 1:02d}T10:00:00+00:00", f"Other {i}"), "repo": "o/other"}
             for i in range(2)]
    other.append({**_commit("big", 1, "2020-01-02T10:00:00+00:00"), "repo": "o/other"})  # same hash, other repo
    (d / "other.jsonl").write_text("\n".join(json.dumps(r) for r in other) + "\n")
    res = convert_commits(tmp_path)
    (u,) = res.users
    assert u.user_id == "big" and len(u.items) == MIN_COMMITS + 3
    assert {it.meta["repo"] for it in u.items} == {"pytest", "o/other"}  # the file's stem when a record has none
    assert [it.output for it in u.items if it.meta["repo"] == "o/other"] == ["Fix it", "Other 0", "Other 1"]
    u.items[:] = [it for it in u.items if it.meta["repo"] == "pytest"]
    assert [it.output for it in u.items] == [f"Change {i}" for i in range(MIN_COMMITS)]  # "(#12i)" removed
    first = u.items[0]
    assert first.input.startswith("files: f0.py, f1.py, f2.py, f3.py, f4.py, f5.py, f6.py\nBody")  # every file
    assert len(first.input.split("\n", 1)[1]) <= MAX_BODY_CHARS
    assert u.items[1].input == "files: a.py"  # empty body: files only
    s = res.stats
    assert s["rows_skipped_malformed"] == 3  # broken json, a list, the non-UTF-8 line
    assert s["rows_skipped_missing_user"] == 1 and s["rows_skipped_bad_time"] == 1
    assert s["rows_skipped_duplicate"] == 1 and s["lines_non_utf8"] == 1
    assert s["users_dropped_few_commits"] == 1 and s["users_dropped_one_item"] == 1
    assert s["subjects_pr_suffix_removed"] == MIN_COMMITS - 1


def test_commit_input_and_truncate():
    assert commit_input("", []) == "files: none"
    # Every changed file is named (a new file must not hide behind "+N more") up to the character budget.
    assert commit_input("", ["b.py", "a/new.py", "c.py", "d.py", "e.py"]) == "files: b.py, a/new.py, c.py, d.py, e.py"
    many = [f"src/module_{i:04d}.py" for i in range(200)]
    stats: Counter = Counter()
    line = commit_input("", many, stats)
    shown = line.removeprefix("files: ").split(" (+")[0].split(", ")
    assert shown == many[: len(shown)] and len(line) <= MAX_FILES_CHARS + 40
    assert line.endswith(f"(+{200 - len(shown)} more)") and stats["commits_files_cut"] == 1
    assert truncate("short", 10) == "short"
    t = truncate("word " * 50, 40)
    assert len(t) <= 40 and t.endswith("…") and not t[:-1].endswith(" ")


def test_unknown_task():
    with pytest.raises(DataError, match="no converter"):
        convert("nope")
