"""The commit-subject task reads the change (issue 23): one compact-diff rule for the importer, `ask -`, the
hook's staged change and the dataset converter; what was read is said; one-line answers come as distinct
proposals and never parrot an earlier subject when another line scores close."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
from pathlib import Path

import pytest

from p2p_local import pipeline
from p2p_local.cli import main
from p2p_local.data.format import Item, builtin_card
from p2p_local.diffs import compact_diff, is_last, keep_within, shown
from p2p_local.gitlog import git_items, staged_diff
from p2p_local.paths import shared_data_dir

ME = ("Ada Lovelace", "ada@example.org")
CARD = builtin_card("commit-subject")


# --- the rule -----------------------------------------------------------------------------------------
PATCH = """diff --git a/src/app.py b/src/app.py
index 3b18e51..a2c3f4d 100644
--- a/src/app.py
+++ b/src/app.py
@@ -1,3 +1,3 @@ def main():
 context line
-    return 1
+    return 0
 more context
diff --git a/poetry.lock b/poetry.lock
index 1111111..2222222 100644
--- a/poetry.lock
+++ b/poetry.lock
@@ -10 +10 @@
-version = "1.0"
+version = "1.1"
diff --git a/README.md b/README.md
new file mode 100644
index 0000000..e69de29
--- /dev/null
+++ b/README.md
@@ -0,0 +1 @@
+""" + "x" * 300 + "\n"


def test_compact_diff_drops_headers_and_context_cuts_lines_and_puts_lock_files_last():
    d = compact_diff(PATCH)
    lines = d.text.split("\n")
    assert not any(ln.startswith(("index ", "--- ", "+++ ", " ")) for ln in lines)
    assert max(len(ln) for ln in lines) == 200  # the long added line, cut
    assert [ln for ln in lines if ln.startswith("diff --git")] == [
        "diff --git a/src/app.py b/src/app.py", "diff --git a/README.md b/README.md",
        "diff --git a/poetry.lock b/poetry.lock"]  # the lock file last, git's order otherwise
    assert d.files == ("src/app.py", "poetry.lock", "README.md")  # files keep git's order
    assert compact_diff(d.text) == compact_diff(d.text)  # and the rule is idempotent:
    assert compact_diff(d.text).text == d.text
    small = compact_diff(PATCH, max_chars=120)
    assert len(small.text) <= 120 and small.cut and small.chars_total == d.chars_total


def test_keep_within_keeps_whole_lines_in_order():
    assert keep_within(["ab", "cd", "ef"], 5) == "ab\ncd"
    assert keep_within(["abcdef", "x"], 5) == ""  # a line that does not fit ends the text: no gaps
    assert shown("ab\ncd\nef", 0) == ""


@pytest.mark.parametrize("path,last", [("poetry.lock", True), ("web/package-lock.json", True), ("go.sum", True),
                                       ("src/pip/_vendor/rich/x.py", True), ("static/app.min.js", True),
                                       ("src/app.py", False), ("docs/locking.rst", False), ("builder.py", False)])
def test_lock_generated_and_vendored_files(path, last):
    assert is_last(path) is last


def test_the_stored_diffs_follow_the_rule():
    """The shared data's diffs (made by ../shared/data/README.md's rule) keep every change line under
    `compact_diff`; only hunk headers lose their numbers (and a lock file's section moves last)."""
    path = shared_data_dir() / "commits" / "diffs" / "flask.jsonl.gz"
    if not path.is_file():
        pytest.skip("../shared/data is not here")
    n = 0
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)["diff"]
            if not d:
                continue
            ours = compact_diff(d).text
            assert compact_diff(ours).text == ours  # idempotent
            changed = [ln for ln in d.split("\n") if ln.startswith(("+", "-"))]
            assert [ln for ln in ours.split("\n") if ln.startswith(("+", "-"))] == changed[:len(
                [ln for ln in ours.split("\n") if ln.startswith(("+", "-"))])] or any(
                is_last(f) for f in compact_diff(d).files)
            assert not [ln for ln in ours.split("\n") if ln.startswith("@@ -")]
            n += 1
            if n >= 300:
                break
    assert n == 300


# --- a real repository: the importer and the staged change agree ---------------------------------------
def _env(home: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "GIT_AUTHOR_NAME": ME[0], "GIT_AUTHOR_EMAIL": ME[1], "GIT_COMMITTER_NAME": ME[0],
            "GIT_COMMITTER_EMAIL": ME[1], "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(home), **extra}


def _git(repo: Path, *args: str, **extra: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], env=_env(repo.parent, **extra), check=True,
                          capture_output=True, text=True).stdout


def _commit(repo: Path, files: dict[str, str], subject: str, i: int) -> None:
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", subject, GIT_AUTHOR_DATE=f"@{1_700_000_000 + i * 100} +0000")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "proj"
    r.mkdir()
    _git(r, "init", "-q", "-b", "main")
    _git(r, "config", "user.email", ME[1])
    _commit(r, {"src/app.py": "def main():\n    return 1\n", "poetry.lock": "version = 1\n"}, "Add the app", 0)
    _commit(r, {"src/app.py": "def main():\n    return 0\n", "poetry.lock": "version = 2\n",
                "docs/usage.md": "Run it.\n"}, "Return 0 from main", 1)
    return r


def test_the_staged_change_and_the_imported_commit_give_the_same_query(repo: Path):
    items, _, _ = git_items(repo, [ME[1]])
    imported = Item(items[-1].input, "", None, items[-1].meta)
    assert "diff" in imported.meta and "-    return 1" in imported.meta["diff"]
    _git(repo, "reset", "-q", "--soft", "HEAD~1")  # the same change, staged again
    staged = pipeline.query_item(CARD, staged_diff(repo))
    assert pipeline.prompt_input(CARD, staged) == pipeline.prompt_input(CARD, imported)
    assert staged.meta["diff"] == imported.meta["diff"]
    # The lock file's section is read last; the files line keeps git's order.
    assert staged.meta["diff"].index("poetry.lock") > staged.meta["diff"].index("docs/usage.md")
    read = pipeline.what_was_read(CARD, staged)
    assert read == {"files": 3, "files_total": 3, "diff_chars": len(staged.meta["diff"]),
                    "diff_chars_total": len(staged.meta["diff"])}


def test_a_piped_diff_with_context_reads_as_the_compact_one(repo: Path):
    _git(repo, "reset", "-q", "--soft", "HEAD~1")
    with_context = _git(repo, "diff", "--cached")  # git's default -U3, as a user pipes it
    piped, staged = (pipeline.query_item(CARD, d) for d in (with_context, staged_diff(repo)))
    assert piped.input == staged.input

    def changes(item: Item) -> list[str]:  # hunk headings may differ: a -U3 hunk starts earlier
        return [ln for ln in item.meta["diff"].split("\n") if not ln.startswith("@@")]

    assert changes(piped) == changes(staged)


# --- the answer: what was read, proposals, no parroting ------------------------------------------------
class _Branches:
    """A stand-in engine whose branches are fixed lines (unit test of the ranking only)."""

    def __init__(self, lines: list[tuple[str, float]]) -> None:
        self.lines = lines

    def branches(self, prompt: str, n: int, max_tokens: int) -> list[tuple[str, float, int]]:
        return [(text + "\n", lp * 2, 2) for text, lp in self.lines[:n]]


def test_a_copy_goes_below_a_close_alternative_and_stays_when_nothing_is_close():
    earlier = {pipeline.copy_key("Release version 8.2.1")}
    close = _Branches([("release  VERSION 8.2.1", -0.5), ("Start version 8.4.2", -0.9), ("start", -3.0)])
    ranked, _ = pipeline.one_line_candidates(close, CARD, "p", earlier, 32)
    assert [c.text for c in ranked] == ["Start version 8.4.2", "start", "release  VERSION 8.2.1"]
    assert ranked[-1].copy and not ranked[0].copy
    far = _Branches([("Release version 8.2.1", -0.5), ("Start version 8.4.2", -2.0)])
    ranked, _ = pipeline.one_line_candidates(far, CARD, "p", earlier, 32)
    assert ranked[0].text == "Release version 8.2.1"  # nothing else scores close: the copy stays first
    dup = _Branches([("Fix it", -0.5), ("fix  it", -0.6), ("Fix the bug", -0.7)])
    assert [c.text for c in pipeline.one_line_candidates(dup, CARD, "p", set(), 32)[0]] == ["Fix it", "Fix the bug"]


def test_ask_reads_a_piped_diff_and_lists_distinct_proposals(repo: Path, p2p_home: Path, capsys, monkeypatch):
    assert main(["profile", "import", "me", "--git", str(repo), "--create"]) == 0
    _git(repo, "reset", "-q", "--soft", "HEAD~1")
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO(_git(repo, "diff", "--cached")))
    assert main(["ask", "-", "--profile", "me", "--task", "commit-subject", "--candidates", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["read"]["files"] == out["read"]["files_total"] == 3
    assert out["read"]["diff_chars"] == out["read"]["diff_chars_total"] > 0
    texts = [c["text"] for c in out["candidates"]]
    assert texts[0] == out["text"] and 1 <= len(texts) <= 3
    assert len({pipeline.copy_key(t) for t in texts}) == len(texts)  # distinct
    monkeypatch.setattr("sys.stdin", io.StringIO(_git(repo, "diff", "--cached")))
    assert main(["ask", "-", "--profile", "me", "--task", "commit-subject", "--candidates", "3"]) == 0
    assert capsys.readouterr().out.splitlines() == texts  # the text form: the same proposals, one a line



# --- the installed hook, replaying real commits: no verbatim copy of an earlier subject -----------------
HISTORY = [  # (file, text, subject): a small project's life, one author, lower-case imperative subjects
    ("pager/core.py", "def page(lines, size):\n    return [lines[i:i + size] for i in range(0, len(lines), size)]\n",
     "add a pager that splits lines into pages"),
    ("pager/cli.py", "import sys\nfrom pager.core import page\n\ndef main():\n    print(page(sys.stdin.readlines(), 20))\n",
     "add a command line entry point"),
    ("README.md", "# pager\n\nSplit text into pages.\n", "write a readme"),
    ("pager/core.py", "def page(lines, size):\n    if size < 1:\n        raise ValueError('size must be positive')\n"
     "    return [lines[i:i + size] for i in range(0, len(lines), size)]\n", "reject a page size below one"),
    ("tests/test_core.py", "from pager.core import page\n\ndef test_page():\n    assert page([1, 2, 3], 2) == [[1, 2], [3]]\n",
     "test the pager on an odd number of lines"),
    ("pyproject.toml", "[project]\nname = 'pager'\nversion = '0.1.0'\n", "package the project"),
    ("pager/cli.py", "import sys\nfrom pager.core import page\n\ndef main():\n    size = int(sys.argv[1]) if len(sys.argv) > 1 else 20\n"
     "    print(page(sys.stdin.readlines(), size))\n", "take the page size from the command line"),
    ("docs/usage.md", "Run `pager 30 < file.txt` to split a file into pages of 30 lines.\n", "document the usage"),
    # replayed through the hook:
    ("pager/core.py", "def page(lines, size):\n    if size < 1:\n        raise ValueError('size must be positive')\n"
     "    return [lines[i:i + size] for i in range(0, len(lines), size)] or [[]]\n", "return one empty page for empty input"),
    ("tests/test_cli.py", "import subprocess\n\ndef test_cli_size():\n    assert subprocess.run(['pager', '5']).returncode == 0\n",
     "test the size argument of the command line"),
    ("pyproject.toml", "[project]\nname = 'pager'\nversion = '0.2.0'\n", "release 0.2.0"),
    ("README.md", "# pager\n\nSplit text into pages.\n\nSee docs/usage.md.\n", "link the usage from the readme"),
]
REPLAYED = 4


def test_the_hook_replays_real_commits_without_copying_an_earlier_subject(tmp_path: Path, p2p_home: Path, capsys):
    from p2p_local.hook import HOOK

    repo = tmp_path / "pager"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "config", "user.email", ME[1])
    for i, (name, text, subject) in enumerate(HISTORY[:-REPLAYED]):
        _commit(repo, {name: text}, subject, i)
    assert main(["profile", "import", "me", "--git", str(repo), "--create"]) == 0
    assert main(["hook", "install", "--repo", str(repo), "--profile", "me", "--timeout", "120"]) == 0
    assert (repo / ".git" / "hooks" / HOOK).is_file()
    keep = tmp_path / "editor.sh"  # the editor keeps git's message as proposed, and a copy of it to read
    keep.write_text('#!/bin/sh\ncp "$1" "$1.seen"\n')
    keep.chmod(0o755)
    earlier = [s for _, _, s in HISTORY[:-REPLAYED]]
    got = []
    for i, (name, text, _) in enumerate(HISTORY[-REPLAYED:], start=len(HISTORY) - REPLAYED):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
        _git(repo, "add", "-A")
        _git(repo, "commit", "-q", GIT_EDITOR=str(keep), GIT_AUTHOR_DATE=f"@{1_700_000_000 + i * 100} +0000")
        subject = _git(repo, "log", "-1", "--format=%s").strip()
        seen = (repo / ".git" / "COMMIT_EDITMSG.seen").read_text()
        assert seen.startswith(subject + "\n")  # the hook proposed it: the first line of git's message
        assert "# p2p-local read 1 of 1 files and " in seen  # what was read, never cut silently
        assert seen.count("# p2p-local also proposes: ") == 2  # three proposals, the others as comments
        got.append(subject)
        earlier.append(subject)
    copies = [s for s in got if pipeline.copy_key(s) in {pipeline.copy_key(e) for e in earlier[:len(HISTORY) - REPLAYED]}]
    assert not copies, f"verbatim copies of earlier subjects: {copies} (all proposals: {got})"
