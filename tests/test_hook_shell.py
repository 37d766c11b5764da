"""The installed hook's shell part, run by real `git` in real repositories: it starts no Python when git already
has a message (-m/-F, merge, squash, amend) or a rebase or cherry-pick is under way, exports the data dir it was
installed with, runs a saved foreign hook first, and says so in the message when that data dir is gone.

The hook is installed with a fake `python` that logs its arguments and environment: no model, no Python start."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from p2p_local import hook

FOREIGN = '#!/bin/sh\nprintf "foreign %s\\n" "${2-}" >> LOG\n'  # LOG: the calls log


def _env(tmp: Path, drop: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("GIT_") and k not in drop}
    return {**base, "GIT_AUTHOR_NAME": "Ada", "GIT_AUTHOR_EMAIL": "ada@example.org", "GIT_COMMITTER_NAME": "Ada",
            "GIT_COMMITTER_EMAIL": "ada@example.org", "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(tmp),
            "XDG_CONFIG_HOME": str(tmp), "GIT_EDITOR": str(tmp / "editor.sh"), **extra}


def _git(repo: Path, *args: str, check: bool = True, drop: tuple[str, ...] = (),
         **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(repo), *args], env=_env(repo.parent, drop, **extra), check=check,
                          capture_output=True, text=True)


def _commit_file(repo: Path, name: str, text: str, *args: str, **extra: str) -> subprocess.CompletedProcess:
    (repo / name).write_text(text)
    _git(repo, "add", name)
    return _git(repo, "commit", "-q", *args, **extra)


def _log(repo: Path) -> list[str]:
    log = repo.parent / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def _python_calls(repo: Path) -> list[str]:
    return [ln for ln in _log(repo) if ln.startswith("python")]


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A repository with one commit, a foreign hook, and ours on top of it (with the fake python)."""
    home = tmp_path / "p2p home's"  # a space and a quote: the script's quoting
    home.mkdir()
    monkeypatch.setenv("P2P_HOME", str(home))
    monkeypatch.setenv("P2P_MODELS", str(tmp_path / "shared models"))
    log = shlex.quote(str(tmp_path / "calls.log"))
    fake = tmp_path / "fake-python"
    fake.write_text(f'#!/bin/sh\necho "python $*" >> {log}\nenv > {shlex.quote(str(tmp_path / "python.env"))}\n')
    editor = tmp_path / "editor.sh"  # keeps what it was shown; writes a subject when there is none
    editor.write_text(f'#!/bin/sh\ncp "$1" {shlex.quote(str(tmp_path / "seen"))}\n'
                      'grep -q "^[^#]" "$1" || echo "edited subject" >> "$1"\n')
    for f in (fake, editor):
        f.chmod(0o755)
    r = tmp_path / "proj"
    r.mkdir()
    _git(r, "init", "-q", "-b", "main")
    _commit_file(r, "README.md", "start\n", "-m", "Start")
    foreign = r / ".git" / "hooks" / hook.HOOK
    foreign.write_text(FOREIGN.replace("LOG", log))
    foreign.chmod(0o755)
    hook.install(r, "me", python=str(fake))
    assert hook.is_ours(foreign) and (foreign.parent / hook.SAVED).exists()
    return r


def _side_branch(repo: Path) -> None:
    """`side` with one commit of its own; `main` moves on too (a merge is a real merge)."""
    _git(repo, "checkout", "-q", "-b", "side")
    _commit_file(repo, "side.txt", "side\n", "-m", "Side")
    _git(repo, "checkout", "-q", "main")
    _commit_file(repo, "main.txt", "main\n", "-m", "Main")
    (repo.parent / "calls.log").unlink(missing_ok=True)  # the commits above are not what the tests look at


@pytest.mark.parametrize("source", ["message", "merge", "squash", "commit"])
def test_a_message_from_git_starts_no_python(repo: Path, source: str):
    _side_branch(repo)
    if source == "message":
        _commit_file(repo, "a.txt", "a\n", "-m", "Add a")
    elif source == "merge":
        _git(repo, "merge", "-q", "--no-ff", "--no-edit", "side")
    elif source == "squash":
        _git(repo, "merge", "-q", "--squash", "side")
        _git(repo, "commit", "-q")
    else:
        _git(repo, "commit", "-q", "--amend", "--no-edit")
    assert _log(repo) == [f"foreign {source}"]  # git passed that source; the foreign hook ran, python did not


def test_a_new_message_or_a_template_starts_python(repo: Path):
    _commit_file(repo, "a.txt", "a\n")
    foreign, ours = _log(repo)  # the foreign hook first, then ours, with git's arguments
    assert foreign == "foreign " and ours.startswith("python -c ")
    assert ours.endswith(" hook run --profile me --task commit-subject --timeout 10 .git/COMMIT_EDITMSG")
    template = repo.parent / "template"
    template.write_text("# say why\n")
    _commit_file(repo, "b.txt", "b\n", "-t", str(template))
    assert _python_calls(repo)[-1].endswith(".git/COMMIT_EDITMSG template")
    assert _git(repo, "log", "-1", "--format=%s").stdout.strip() == "edited subject"


def test_no_python_while_a_rebase_or_cherry_pick_is_under_way(repo: Path):
    for i in range(3):
        _commit_file(repo, f"f{i}.txt", f"{i}\n", "-m", f"Change {i}")
    _git(repo, "rebase", "-q", "-i", "HEAD~2", GIT_SEQUENCE_EDITOR="sed -i -e 1s/^pick/edit/")
    assert (repo / ".git" / "rebase-merge").is_dir()  # stopped at the first commit
    _commit_file(repo, "new.txt", "new\n")  # a plain `git commit` (no source) in the middle of the rebase
    _git(repo, "rebase", "--continue")
    assert "foreign " in _log(repo) and _python_calls(repo) == []
    _git(repo, "rebase", "-q", "--force-rebase", "HEAD~3")  # a rebase rewriting 3 commits: source `message`
    assert _python_calls(repo) == []

    _git(repo, "checkout", "-q", "-b", "side", "HEAD~1")
    _commit_file(repo, "f2.txt", "other\n", "-m", "Conflict")
    _git(repo, "checkout", "-q", "main")
    assert _git(repo, "cherry-pick", "side", check=False).returncode != 0  # a conflict: CHERRY_PICK_HEAD
    assert _run_hook(repo) == 0 and _python_calls(repo) == []  # as git would call it with no source
    _commit_file(repo, "f2.txt", "resolved\n")  # git passes a source here (`merge`)
    assert _python_calls(repo) == []

    assert _run_hook(repo) == 0 and len(_python_calls(repo)) == 1  # nothing under way: our part runs again
    _commit_file(repo, "after.txt", "after\n")
    assert len(_python_calls(repo)) == 2


def _run_hook(repo: Path, *args: str) -> int:
    """The installed hook run as git runs it (from the top of the work tree), without a commit."""
    (repo / ".git" / "COMMIT_EDITMSG").write_text("\n# Please enter the commit message\n")
    return subprocess.run([str(repo / ".git" / "hooks" / hook.HOOK), ".git/COMMIT_EDITMSG", *args], cwd=repo,
                          env=_env(repo.parent)).returncode


@pytest.mark.parametrize("busy", hook.BUSY)
def test_no_python_while_each_operation_is_under_way(repo: Path, busy: str):
    marker = repo / ".git" / busy  # rebase-merge/-apply: folders; the others: a file holding a commit id
    if busy.startswith("rebase"):
        marker.mkdir()
    else:
        marker.write_text("0" * 40 + "\n")
    assert _run_hook(repo) == 0 and _run_hook(repo, "template") == 0 and _python_calls(repo) == []
    shutil.rmtree(marker) if marker.is_dir() else marker.unlink()
    assert _run_hook(repo) == 0 and len(_python_calls(repo)) == 1


def test_the_data_dir_recorded_at_install_reaches_python(repo: Path, tmp_path: Path):
    _commit_file(repo, "a.txt", "a\n", drop=("P2P_HOME", "P2P_MODELS"))  # a shell without them
    env = dict(ln.split("=", 1) for ln in (tmp_path / "python.env").read_text().splitlines() if "=" in ln)
    assert env["P2P_HOME"] == str(tmp_path / "p2p home's")
    assert env["P2P_MODELS"] == str(tmp_path / "shared models")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _commit_file(repo, "b.txt", "b\n", P2P_HOME=str(elsewhere))  # one set for the commit wins (tests, portable)
    assert f"P2P_HOME={elsewhere}" in (tmp_path / "python.env").read_text().splitlines()


def test_a_failing_foreign_hook_still_stops_the_commit(repo: Path):
    saved = repo / ".git" / "hooks" / hook.SAVED
    saved.write_text(saved.read_text() + "exit 3\n")
    head = _git(repo, "rev-parse", "HEAD").stdout
    (repo / "a.txt").write_text("a\n")
    _git(repo, "add", "a.txt")
    assert _git(repo, "commit", "-q", check=False).returncode != 0
    assert _git(repo, "rev-parse", "HEAD").stdout == head
    assert _log(repo) == ["foreign "]  # it ran, with git's arguments; ours did not


def test_a_data_dir_gone_since_install_is_said_in_the_message(repo: Path, tmp_path: Path):
    home = tmp_path / "p2p home's"
    shutil.rmtree(home)
    _commit_file(repo, "a.txt", "a\n", drop=("P2P_HOME",))
    assert _python_calls(repo) == []
    assert hook.GONE.format(home) in (tmp_path / "seen").read_text().splitlines()  # what the editor showed
    assert _git(repo, "log", "-1", "--format=%B").stdout.strip() == "edited subject"  # git strips the comment


def test_a_linked_worktree(repo: Path, tmp_path: Path):
    """There git passes an absolute message file in the worktree's own git dir, where a rebase there leaves its
    state: the same checks hold."""
    wt = tmp_path / "wt"
    _git(repo, "worktree", "add", "-q", str(wt))
    _commit_file(wt, "a.txt", "a\n")
    assert len(_python_calls(repo)) == 1
    busy = Path(_git(wt, "rev-parse", "--absolute-git-dir").stdout.strip()) / "rebase-merge"
    busy.mkdir()
    _commit_file(wt, "b.txt", "b\n")
    assert len(_python_calls(repo)) == 1


def test_the_rebase_bench_runs_each_tree_size() -> None:
    """`p2p bench hook-rebase` in small: every variant timed in a repository of each tree size, the hook's own
    Python start measured beside them (what a rebase would pay if the script did not step aside)."""
    from p2p_lab.bench import bench_hook_rebase

    r = bench_hook_rebase(commits=3, repeat=1, sizes=(2, 40))
    for n in (2, 40):
        for variant in ("without_hook", "empty_hook", "with_hook"):
            assert r[f"rebase_median_ms_{variant}_{n}"] > 0
        assert r["targets"][f"with_vs_without_{n}"] == "<= 1.2"
    assert r["python_hook_run_median_ms"] > 0 and r["tree_files"] == [2, 40]
