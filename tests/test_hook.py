"""The prepare-commit-msg hook, installed in a real repository and run by a real `git commit`: it proposes
what `git diff --cached | p2p ask -` answers, keeps and restores an earlier hook, and never blocks a commit
(no model, too slow, a message given with -m)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from p2p_local.cli import main
from p2p_local.gitlog import COMMIT_TASK
from p2p_local.hook import HOOK, SAVED, is_ours

ME = ("Ada Lovelace", "ada@example.org")
EDITOR_FALLBACK = "manual subject"


def _env(repo: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "GIT_AUTHOR_NAME": ME[0], "GIT_AUTHOR_EMAIL": ME[1], "GIT_COMMITTER_NAME": ME[0],
            "GIT_COMMITTER_EMAIL": ME[1], "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(repo.parent), **extra}


def _git(repo: Path, *args: str, input: str | None = None, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(repo), *args], env=_env(repo, **extra), check=True, capture_output=True,
                          text=True, input=input)


def _subject(repo: Path) -> str:
    return _git(repo, "log", "-1", "--format=%s").stdout.strip()


@pytest.fixture
def repo(tmp_path: Path, p2p_home: Path) -> Path:
    """A repository with a few of Ada's commits, imported into profile 'me'."""
    r = tmp_path / "proj"
    r.mkdir()
    _git(r, "init", "-q", "-b", "main")
    _git(r, "config", "user.email", ME[1])
    for i, (name, msg) in enumerate([("src/app.py", "Add the app"), ("README.md", "Write the readme"),
                                     ("src/app.py", "Fix the app's exit code"), ("tests/test_app.py", "Test the app")]):
        (r / name).parent.mkdir(parents=True, exist_ok=True)
        (r / name).write_text(f"v{i}\n")
        _git(r, "add", "-A")
        _git(r, "commit", "-q", "-m", msg, GIT_AUTHOR_DATE=f"@{1_700_000_000 + i * 100} +0000")
    assert main(["profile", "import", "me", "--git", str(r), "--create"]) == 0
    # An editor that keeps a proposed subject, and writes its own when the hook proposed nothing.
    editor = r.parent / "editor.sh"
    editor.write_text(f'#!/bin/sh\ngrep -q "^[^#]" "$1" || {{ echo "{EDITOR_FALLBACK}" > "$1.new"; cat "$1" >> "$1.new"; '
                      'mv "$1.new" "$1"; }\n')
    editor.chmod(0o755)
    return r


def test_hook_proposes_what_ask_answers(repo: Path, capsys):
    hooks = repo / ".git" / "hooks"
    earlier = hooks / HOOK
    earlier.write_text('#!/bin/sh\necho ran >> "$(dirname "$0")/../earlier-hook-ran"\n')
    earlier.chmod(0o755)
    before = earlier.read_text()
    # the only profile with commits: 'me'; a generous timeout: this test compares answers, a loaded CI machine
    # may take more than the default 10 s (which leaves git's message, as it should)
    assert main(["hook", "install", "--repo", str(repo), "--timeout", "120"]) == 0
    assert "profile 'me'" in capsys.readouterr().out
    assert is_ours(hooks / HOOK) and (hooks / SAVED).read_text() == before and os.access(hooks / HOOK, os.X_OK)

    (repo / "src" / "app.py").write_text("v9\n")
    (repo / "docs").mkdir()
    (repo / "docs" / "usage.md").write_text("use it\n")
    _git(repo, "add", "-A")
    diff = _git(repo, "diff", "--cached").stdout
    asked = subprocess.run([sys.executable, "-m", "p2p_local.cli", "ask", "-", "--task", COMMIT_TASK,
                            "--profile", "me", "--json"], input=diff, capture_output=True, text=True,
                           env=_env(repo), check=True)
    answer = json.loads(asked.stdout)
    # the diff, read as the task reads a commit: its files line, then its compact diff
    assert answer["query"].startswith("files: docs/usage.md, src/app.py\ndiff --git a/docs/usage.md b/docs/usage.md\n")
    assert answer["adapter"] is not None
    proposed = answer["text"].strip()
    assert proposed

    _git(repo, "commit", "-q", GIT_EDITOR=str(repo.parent / "editor.sh"))  # the editor keeps the proposal
    assert _subject(repo) == proposed
    assert (repo / ".git" / "earlier-hook-ran").read_text() == "ran\n"  # the earlier hook still ran first

    # -m: git's own message, no model run.
    (repo / "README.md").write_text("more\n")
    _git(repo, "commit", "-qam", "my own words")
    assert _subject(repo) == "my own words"

    assert main(["hook", "uninstall", "--repo", str(repo)]) == 0
    assert (hooks / HOOK).read_text() == before and not (hooks / SAVED).exists()


def test_hook_never_blocks_a_commit(repo: Path, tmp_path: Path):
    assert main(["hook", "install", "--repo", str(repo), "--profile", "me"]) == 0
    editor = str(repo.parent / "editor.sh")

    (repo / "a.txt").write_text("a\n")
    _git(repo, "add", "a.txt")
    no_models = tmp_path / "no-models"
    no_models.mkdir()
    _git(repo, "commit", "-q", GIT_EDITOR=editor, P2P_MODELS=str(no_models))  # no base model: no proposal
    assert _subject(repo) == EDITOR_FALLBACK

    assert main(["hook", "install", "--repo", str(repo), "--profile", "me", "--timeout", "0.01"]) == 0  # update
    (repo / "b.txt").write_text("b\n")
    _git(repo, "add", "b.txt")
    _git(repo, "commit", "-q", GIT_EDITOR=editor)  # too slow: gives up, the commit goes on
    assert _subject(repo) == EDITOR_FALLBACK

    assert main(["profile", "forget", "me", "--yes"]) == 0
    (repo / "c.txt").write_text("c\n")
    _git(repo, "add", "c.txt")
    _git(repo, "commit", "-q", GIT_EDITOR=editor)  # a profile forgotten since the install
    assert _subject(repo) == EDITOR_FALLBACK

    assert main(["hook", "uninstall", "--repo", str(repo)]) == 0
    assert not (repo / ".git" / "hooks" / HOOK).exists()
    assert main(["hook", "uninstall", "--repo", str(repo)]) == 2  # nothing to remove


def test_hook_install_errors(tmp_path: Path, p2p_home: Path, capsys):
    assert main(["hook", "install", "--repo", str(tmp_path), "--profile", "me"]) == 2
    assert "not a git repository" in capsys.readouterr().err


def test_hook_install_refuses_unknown_profile_or_task(repo: Path, capsys):
    """Installed, they would silently propose nothing at every commit: refused up front."""
    assert main(["hook", "install", "--repo", str(repo), "--profile", "nobody"]) == 7
    assert "no profile named 'nobody'" in capsys.readouterr().err
    assert main(["hook", "install", "--repo", str(repo), "--profile", "me", "--task", "no-such-task"]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert not (repo / ".git" / "hooks" / HOOK).exists()


def test_hook_install_that_cannot_write_keeps_the_foreign_hook(repo: Path, monkeypatch, capsys):
    """A read-only hooks folder (here: the write fails with EROFS, as on a read-only mount, where even root
    cannot write): a clean error, and the user's own hook stays in place, unchanged."""
    import errno

    import p2p_local.hook as hook_mod

    foreign = repo / ".git" / "hooks" / HOOK
    foreign.write_text("#!/bin/sh\necho mine\n")

    def read_only(path, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(hook_mod, "atomic_write", read_only)
    assert main(["hook", "install", "--repo", str(repo), "--profile", "me"]) == 7
    assert "cannot write" in capsys.readouterr().err
    assert foreign.read_text() == "#!/bin/sh\necho mine\n" and not (foreign.parent / SAVED).exists()
