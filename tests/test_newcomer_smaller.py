"""The smaller items a newcomer hit (issue 18): a commit's subject is its first line, accented titles
match MovieLens, big JSONL users import, missing files and a user's own bad model get hints that fit,
`--help` examples that work, and a bare movie title completes in `p2p ask` as in the chat."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from p2p_local.cli import EPILOG, main
from p2p_local.commands.args import examples
from p2p_local.gitlog import git_items
from p2p_local.importers import MAX_LINE_CHARS, match_title, normal_title, read_movies, title_index


def test_git_subject_is_the_first_line_of_a_multi_line_first_paragraph(tmp_path: Path) -> None:
    repo = tmp_path / "r"
    repo.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "Ada", "GIT_AUTHOR_EMAIL": "ada@example.org", "GIT_COMMITTER_NAME": "Ada",
           "GIT_COMMITTER_EMAIL": "ada@example.org", "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(tmp_path)}
    for args in (["init", "-q"], ["config", "user.email", "ada@example.org"]):
        subprocess.run(["git", "-C", str(repo), *args], env=env, check=True)
    (repo / "a.py").write_text("x = 1\n")
    subprocess.run(["git", "-C", str(repo), "add", "-A"], env=env, check=True)
    subprocess.run(["git", "-C", str(repo), "commit", "-q", "-m", "Fix the parser\nwhen the input is empty\n\nDetails."],
                   env=env, check=True)
    items, _, _ = git_items(repo)
    assert [it.output for it in items] == ["Fix the parser"]  # `%s` made it "Fix the parser when the input is empty"


def test_accented_titles_match_movielens(shared_data: Path) -> None:
    assert normal_title("Amélie") == normal_title("Amelie") == "amelie"
    index = title_index(read_movies(shared_data / "movielens-latest-small" / "movies.csv"))
    assert match_title(index, "Amélie", "2001")[1][0].startswith("Amelie (Fabuleux destin d'Amélie Poulain")


def test_one_jsonl_user_with_100k_ratings_imports(p2p_home, tmp_path: Path, capsys) -> None:
    items = [{"input": f"Movie number {i} (2001) | Genres: Drama", "output": str(1 + i % 5), "time": 1e9 + i}
             for i in range(100_000)]
    line = json.dumps({"user_id": "big", "items": items})
    assert len(line) > 4 << 20 and len(line) < MAX_LINE_CHARS  # over the old 4 MiB line limit
    f = tmp_path / "big.jsonl"
    f.write_text(line + "\n")
    assert main(["profile", "import", "big", str(f), "--create", "--task", "movielens-rating"]) == 0
    assert "imported 100,000 items" in capsys.readouterr().out  # thousands separated, as elsewhere


def test_hints_fit_the_case(p2p_home, tmp_path: Path, capsys) -> None:
    assert main(["profile", "create", "me"]) == 0
    capsys.readouterr()
    assert main(["profile", "import", "me", str(tmp_path / "nosuch.csv")]) == 6
    err = capsys.readouterr().err
    assert "check the path" in err and "fix the value at the place named" not in err
    bad = tmp_path / "notes.gguf"
    bad.write_text("not a model")
    assert main(["models", "add", str(bad), "--name", "not-a-model"]) == 3
    err = capsys.readouterr().err
    assert "GGUF" in err and "models prepare" not in err  # the user's own file: nothing to prepare


@pytest.mark.parametrize("command", [["chat"], ["models"], ["models", "add"], ["hook", "install"], ["ask"]])
def test_help_has_examples(command: list[str], capsys) -> None:
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    assert "example" in capsys.readouterr().out


def test_help_example_does_not_double_the_template(session, capsys) -> None:
    line = next(ln for ln in EPILOG.format(**examples()).splitlines() if "p2p ask" in ln)
    words = shlex.split(line.split("#")[0])
    card = session.card(words[words.index("--task") + 1])  # the example's task, read from the shipped cards
    query = words[2]
    assert "Movie:" not in query and card.prompt(query).count("Movie:") == 1  # the template adds "Movie: " itself


def test_ask_completes_a_bare_title_as_the_chat_does(session, capsys) -> None:
    assert main(["ask", "toy story", "--profile", "demo", "--task", "movielens-rating", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)  # from the movies the store holds, as the chat's Catalogue
    assert out["query"] == "Toy Story (1995) | Genres: Adventure|Animation|Children|Comedy|Fantasy"
    assert out["text"] in "12345"
