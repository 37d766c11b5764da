"""Import from where the data lives: a real git repository made here (several authors, a merge, trailers,
e-mail addresses), a Letterboxd-style CSV (titles matched to the real MovieLens catalogue); dry runs;
importing twice adds nothing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from p2p_local.cli import main
from p2p_local.data.records import commit_item
from p2p_local.errors import DataError, UsageError
from p2p_local.gitlog import COMMIT_TASK, git_items, scrub
from p2p_local.importers import import_file, import_git, match_title, read_movies, title_index
from p2p_local.store import Store

ME = ("Ada Lovelace", "ada@example.org")
OTHER = ("Bob Builder", "bob@example.org")


def _git(repo: Path, *args: str, who: tuple[str, str] = ME, when: int = 1_700_000_000) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": who[0], "GIT_AUTHOR_EMAIL": who[1], "GIT_COMMITTER_NAME": who[0],
           "GIT_COMMITTER_EMAIL": who[1], "GIT_AUTHOR_DATE": f"@{when} +0000", "GIT_COMMITTER_DATE": f"@{when} +0000",
           "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(repo.parent)}
    return subprocess.run(["git", "-C", str(repo), *args], env=env, check=True, capture_output=True, text=True).stdout


def _commit(repo: Path, files: dict[str, str], message: str, who=ME, when=1_700_000_000) -> None:
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    _git(repo, "add", "-A", who=who, when=when)
    _git(repo, "commit", "-q", "-m", message, who=who, when=when)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """Ada's and Bob's commits on two branches, merged; trailers and addresses in the bodies."""
    r = tmp_path / "proj"
    r.mkdir()
    _git(r, "init", "-q", "-b", "main")
    _git(r, "config", "user.email", ME[1])
    _commit(r, {"src/app.py": "print(1)\n"}, "Add the app", when=1_700_000_000)
    _commit(r, {"README.md": "hi\n"}, "Write a readme\n\nExplains how to run it; ask ada@example.org.\n\n"
            "Signed-off-by: Ada Lovelace <ada@example.org>\nCo-authored-by: Bob Builder <bob@example.org>",
            when=1_700_000_100)
    _git(r, "checkout", "-q", "-b", "feature")
    _commit(r, {"src/feature.py": "x = 1\n", "tests/test_feature.py": "def test(): pass\n"},
            "Bob adds a feature (#12)\n\nReviewed-by: Ada Lovelace <ada@example.org>", who=OTHER, when=1_700_000_200)
    _git(r, "checkout", "-q", "main")
    _commit(r, {"src/app.py": "print(2)\n"}, "Fix the app's output\n\nIt printed 1.\nCc: someone@example.com",
            when=1_700_000_300)
    _git(r, "merge", "-q", "--no-ff", "feature", "-m", "Merge branch 'feature'", when=1_700_000_400)
    _commit(r, {"docs/a.md": "a\n"}, "Document a", when=1_700_000_500)
    return r


def test_git_items_are_the_converters_items(repo: Path):
    items, stats, who = git_items(repo)  # default author: the repository's user.email
    assert who == [ME[1]]
    assert [it.output for it in items] == ["Add the app", "Write a readme", "Fix the app's output", "Document a"]
    assert stats["merges_skipped"] == 1 and stats["other_authors_skipped"] == 1
    assert all(it.task == COMMIT_TASK for it in items)
    assert [it.time for it in items] == [1_700_000_000.0, 1_700_000_100.0, 1_700_000_300.0, 1_700_000_500.0]
    readme = items[1]
    # Exactly what the training data's converter makes of the scrubbed commit.
    inp, out, meta = commit_item("Write a readme", "Explains how to run it; ask <email>.", ["README.md"], "")
    assert (readme.input, readme.output) == (inp, out)
    assert readme.input == "files: README.md\nExplains how to run it; ask <email>."
    assert "Signed-off-by" not in readme.input and "@" not in readme.input and "Co-authored" not in readme.input
    assert items[2].input == "files: src/app.py\nIt printed 1."  # the Cc: trailer is gone
    assert len(readme.meta["item_id"]) == 12 and readme.meta["n_files"] == 1


def test_git_authors_by_name_or_email_and_since(repo: Path):
    items, _, _ = git_items(repo, ["bob builder"])  # a name, any case
    assert [it.output for it in items] == ["Bob adds a feature"]  # "(#12)" goes, as in the training data
    assert "Reviewed-by" not in items[0].input
    assert items[0].input == "files: src/feature.py, tests/test_feature.py"
    both, _, _ = git_items(repo, [ME[1], OTHER[0]])
    assert len(both) == 5
    recent, _, _ = git_items(repo, since="2023-11-14T22:18:00+00:00")  # 1_700_000_280
    assert [it.output for it in recent] == ["Fix the app's output", "Document a"]
    with pytest.raises(UsageError):
        git_items(repo, since="not a date")


def test_scrub_matches_the_training_data():
    body = "Fixes it.\n\nSigned-off-by: A B <a@b.org>\nCo-Authored-By: C <c@d.io>\nAuthor: x.y+z@mail.co.uk"
    assert scrub(body) == "Fixes it.\n\n\n\nAuthor: <email>"
    assert commit_item("s", scrub(body), [])[0] == "files: none\nFixes it.\n\nAuthor: <email>"


def test_git_import_idempotent_and_dry_run(repo: Path, p2p_home: Path, capsys):
    assert main(["profile", "import", "me", "--git", str(repo), "--dry-run", "--create"]) == 0
    out = capsys.readouterr().out
    assert "dry run: would import 4 items" in out and "nothing written" in out
    assert "1 merges skipped" in out and "1 other authors skipped" in out
    assert out.count("  ->  ") == 3  # three sample items
    with Store() as s:
        assert not s.profiles.profile_exists("me")  # a dry run creates nothing
    assert main(["profile", "import", "me", "--git", str(repo), "--create"]) == 0
    assert "imported 4 items" in capsys.readouterr().out
    assert main(["profile", "import", "me", "--git", str(repo)]) == 0
    assert "imported 0 items" in capsys.readouterr().out
    with Store() as s:
        assert s.profiles.count_items("me") == 4
        assert s.profiles.get_profile("me").task == COMMIT_TASK
        res = import_git(s, "me", repo, authors=[OTHER[1]])  # Bob's one commit is new
        assert (res.imported, res.duplicates) == (1, 0)
        res = import_git(s, "me", repo, authors=[ME[1], OTHER[1]], dry_run=True)
        assert (res.imported, res.duplicates, len(res.samples)) == (0, 5, 0)


def test_git_bad_input(tmp_path: Path, p2p_home: Path, capsys):
    with pytest.raises(DataError, match="not a git repository"):
        git_items(tmp_path)
    with pytest.raises(DataError, match="no such folder"):
        git_items(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    _git(empty, "init", "-q")
    assert git_items(empty, ["x@y.z"])[0] == []  # no commits yet: nothing, not an error
    assert main(["profile", "import", "me", "--git", str(tmp_path), "--create"]) == 6
    assert "not a git repository" in capsys.readouterr().err
    assert main(["profile", "import", "me", "x.csv", "--git", str(tmp_path)]) == 2
    assert main(["profile", "import", "me", "x.csv", "--author", "a"]) == 2


# --- Letterboxd ----------------------------------------------------------------------------------
LETTERBOXD = """Date,Name,Year,Letterboxd URI,Rating
2023-01-05,The American President,1995,https://boxd.it/aaaa,4.5
2023-02-11,Heat,1995,https://boxd.it/bbbb,5
2023-03-02,A Film Nobody Catalogued,2021,https://boxd.it/cccc,2
2023-03-09,Toy Story,1995,https://boxd.it/dddd,
2023-04-01,"City of Lost Children, The",1995,https://boxd.it/eeee,3
"""


def test_letterboxd_with_movielens_genres(tmp_path: Path, p2p_home: Path, shared_data: Path, capsys):
    movies = shared_data / "movielens-latest-small" / "movies.csv"
    f = tmp_path / "ratings.csv"
    f.write_text(LETTERBOXD)
    with Store() as s:
        s.profiles.create_profile("lb")
        res = import_file(s, "lb", f, movies=movies)
        assert (res.format, res.task, res.imported) == ("letterboxd", "movielens-rating", 4)
        assert any("3 titles matched" in n and "1 without a match" in n for n in res.notes)
        assert any("1 watched but unrated" in n for n in res.notes)
        items = s.profiles.items("lb")
    by_out = {i.input: i.output for i in items}
    assert by_out["American President, The (1995) | Genres: Comedy|Drama|Romance"] == "5"  # 4.5 rounds up
    assert by_out["Heat (1995) | Genres: Action|Crime|Thriller"] == "5"
    assert by_out["A Film Nobody Catalogued (2021) | Genres: unknown"] == "2"
    assert any(i.startswith("City of Lost Children, The (Cité des enfants perdus, La) (1995) | Genres: Adventure")
               for i in by_out)
    heat = next(i for i in items if i.input.startswith("Heat"))
    assert heat.meta["item_id"] == 6 and heat.meta["genres"] == ["Action", "Crime", "Thriller"]
    # Twice: nothing new. Without a catalogue: no genres, and the summary says how many.
    assert main(["profile", "import", "lb", str(f), "--movies", str(movies)]) == 0
    assert "imported 0 items" in capsys.readouterr().out and True
    assert main(["profile", "import", "lb2", str(f), "--create", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would import 4 items" in out and "4 titles without genres" in out and out.count("  ->  ") == 3


def test_letterboxd_bad_rows(tmp_path: Path, p2p_home: Path):
    f = tmp_path / "lb.csv"
    f.write_text("Date,Name,Year,Rating\n2023-01-01,Heat,1995,nine\n")
    with Store() as s:
        s.profiles.create_profile("x")
        with pytest.raises(DataError, match=r"lb.csv:2: rating 'nine' is not a Letterboxd rating"):
            import_file(s, "x", f)
        # Absurd ratings, malformed years (int() of "²" or of 5000 digits raised: exit 70), NUL in a name.
        for name, year, rating, said in [("Heat", "1995", "7", "not a Letterboxd rating"),
                                         ("Heat", "1995", "1e-300", "not a Letterboxd rating"),
                                         ("Heat", "1995", "4.25", "not a Letterboxd rating"),
                                         ("Heat", "1995", "nan", "not a Letterboxd rating"),
                                         ("Heat", "1995", "0", "not a Letterboxd rating"),
                                         ("Heat", "199\u00b2", "4", "is not a year"),
                                         ("Heat", "1" * 5000, "4", "is not a year"),
                                         ("Heat", "0995", "4", "is not a year"),
                                         ("He\x00at", "1995", "4", "control characters"),
                                         ("He\x1b[31mat", "1995", "4", "control characters")]:
            f.write_text(f"Date,Name,Year,Rating\n2023-01-01,{name},{year},{rating}\n")
            with pytest.raises(DataError, match=said):
                import_file(s, "x", f)
        f.write_text("Date,Name,Year,Rating\n2023-01-01,Heat,1995,4.5\n2023-01-02,Up,,5\n")
        assert import_file(s, "x", f).imported == 2
        assert s.profiles.count_items("x") == 2


def test_title_matching(shared_data: Path):
    index = title_index(read_movies(shared_data / "movielens-latest-small" / "movies.csv"))
    assert match_title(index, "the american president", "1995")[0] == 11
    assert match_title(index, "Heat", "1996")[0] == 6  # a year off: release dates differ by country
    assert match_title(index, "Heat", "1972") is None
    assert match_title(index, "No Such Movie", "2000") is None


def test_file_names_cannot_inject_or_split_items(tmp_path: Path, p2p_home: Path):
    """Bob's commit names files so that git's old record/unit separators (\\x1e, NUL-split fields) would
    spell a commit "by Ada" with a chosen subject; Ada's own commit has such a name too. Neither may add,
    split or change an item: records start at a per-run marker and file names are whole NUL fields."""
    r = tmp_path / "proj"
    r.mkdir()
    _git(r, "init", "-q", "-b", "main")
    _git(r, "config", "user.email", ME[1])
    _commit(r, {"src/app.py": "1\n"}, "Add the app")
    forged = ["\x1e" + "0" * 40, "1", "2", ME[1], "b", "c chosen subject", "d\x1e", "e\nf"]
    _commit(r, {name: "x\n" for name in forged}, "Bob's harmless commit", who=OTHER, when=1_700_000_100)
    _commit(r, {"x\x1ey": "1\n", "\nlead": "2\n"}, "Ada's own odd names\n\nbody \x1e with a separator",
            when=1_700_000_200)
    items, stats, _ = git_items(r)
    assert [it.output for it in items] == ["Add the app", "Ada's own odd names"]
    assert stats["commits_read"] == 3 and stats["other_authors_skipped"] == 1 and not stats["commits_unreadable"]
    assert items[1].input.startswith("files: \nlead, x\x1ey\n")  # both names whole, the body after them
    assert "chosen subject" not in " ".join(it.input + it.output for it in items)


def test_one_very_long_word_is_linear(tmp_path: Path):
    """The e-mail scrub was quadratic on one long word (11 s at 100k characters, ~20 min at 1 MB)."""
    import time

    word = "a" * 1_000_000
    t0 = time.perf_counter()
    assert scrub(word + " x@y.org") == word + " <email>"
    assert scrub(("a-" * 300_000) + "by: me") == ""  # a trailer key of 600k characters, linear too
    assert time.perf_counter() - t0 < 5.0
    r = tmp_path / "proj"
    r.mkdir()
    _git(r, "init", "-q", "-b", "main")
    _git(r, "config", "user.email", ME[1])
    (r / "a.py").write_text("1\n")
    (tmp_path / "msg").write_text("Subject " + "s" * 2_000_000 + "\n\n" + "b" * 3_000_000)
    _git(r, "add", "-A")
    _git(r, "commit", "-q", "-F", str(tmp_path / "msg"))
    t0 = time.perf_counter()
    items, _, _ = git_items(r)
    assert time.perf_counter() - t0 < 20.0
    assert len(items) == 1 and len(items[0].output) <= 120 and len(items[0].input) < 1000
