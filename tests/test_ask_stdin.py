"""`p2p ask -`: the query from a pipe, answered as the same query given as an argument; `p2p personalize`
and `p2p ask` make the same adapter for the same query (so an answer can be reproduced in llama.cpp)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from p2p_local.cli import main
from p2p_local.commands.ask import query_text
from p2p_local.data.format import builtin_card
from p2p_local.pipeline import Request

QUERY = "Heat (1995) | Genres: Action|Crime|Thriller"


@pytest.fixture
def demo(p2p_home: Path) -> str:
    from p2p_local.demo import import_demo
    from p2p_local.store import Store

    with Store() as s:
        import_demo(s, "demo")
    return "demo"


def _json_out(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_piped_ask_equals_the_argument(demo: str, capsys, monkeypatch):
    piped = subprocess.run([sys.executable, "-m", "p2p_local.cli", "ask", "-", "--profile", demo, "--task",
                            "movielens-rating", "--json"], input=QUERY + "\n", capture_output=True, text=True,
                           env=dict(os.environ), check=True)
    got = json.loads(piped.stdout)
    assert main(["ask", QUERY, "--profile", demo, "--task", "movielens-rating", "--json"]) == 0
    want = _json_out(capsys)
    assert got == want and got["query"] == QUERY and got["text"] in "12345"
    # No argument at all while stdin is a pipe reads it too.
    monkeypatch.setattr(sys, "stdin", io.StringIO(QUERY))
    assert main(["ask", "--profile", demo, "--task", "movielens-rating", "--json"]) == 0
    assert _json_out(capsys) == want
    # personalize --query makes the very adapter ask used.
    assert main(["personalize", demo, "--task", "movielens-rating", "--query", QUERY, "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["adapter"] == want["adapter"] and made["cached"]


def test_empty_or_missing_query(p2p_home: Path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    assert main(["ask", "-", "--base"]) == 2
    assert "the query is empty" in capsys.readouterr().err


def test_diff_as_commit_query(monkeypatch):
    diff = ("diff --git a/src/app.py b/src/app.py\nindex 1..2 100644\n--- a/src/app.py\n+++ b/src/app.py\n@@ -1 +1 @@\n"
            "-a\n+b\ndiff --git a/old name.txt b/new name.txt\nsimilarity index 100%\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO(diff))
    text = query_text("-")
    assert Request(builtin_card("commit-subject"), text).query == (
        "files: src/app.py, new name.txt\ndiff --git a/src/app.py b/src/app.py\n@@\n-a\n+b\n"
        "diff --git a/old name.txt b/new name.txt\nsimilarity index 100%")  # files, then the compact diff
    assert Request(builtin_card("movielens-rating"), text).query == text  # other tasks read the text as it is
