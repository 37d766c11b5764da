"""A `prepare-commit-msg` git hook that proposes your personalized subject line in the commit editor.

`p2p hook install` writes a small shell script into the repository's hooks folder (core.hooksPath
honoured). A hook that was there before is kept beside it (`prepare-commit-msg.p2p-saved`), still runs
first, and comes back on `p2p hook uninstall`. The script calls `p2p hook run`, which

- proposes only when git opens the editor on an empty message (not for `-m`, `-F`, merges, squashes,
  amends, or a template that already holds a subject);
- reads the staged files as the commit-subject task reads a commit (`gitlog.commit_query`: the training
  items' format), personalizes with the profile's adapter and writes the answer as the first line;
- never blocks a commit: a missing model, profile or store, an error or a run past the timeout
  (`--timeout`, or `P2P_HOOK_TIMEOUT` seconds) leaves the message as git made it, and the script
  always exits 0 for its own part.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import threading
from pathlib import Path

from p2p_local.errors import StoreError, UsageError
from p2p_local.files import atomic_write, disk_error
from p2p_local.gitlog import COMMIT_TASK, commit_query, first_line, git_command, git_env, staged_files

HOOK = "prepare-commit-msg"
SAVED = HOOK + ".p2p-saved"
MARK = "# p2p-local prepare-commit-msg hook"
DEFAULT_TIMEOUT_S = 10.0
PROPOSE_SOURCES = ("", "template")
_ENTRY = "import sys; sys.path.pop(0); from p2p_local.cli import main; sys.exit(main())"  # sys.path[0]: the cwd  # git's 2nd argument: no source (plain `git commit`) or a template


def hooks_dir(repo: str | Path) -> Path:
    """The repository's hooks folder (`git rev-parse --git-path hooks`: core.hooksPath and worktrees honoured)."""
    repo = Path(repo)
    r = subprocess.run(git_command(repo, ["rev-parse", "--git-path", "hooks"]), capture_output=True, text=True, env=git_env())
    if r.returncode != 0:
        raise UsageError(f"{repo} is not a git repository ({first_line(r.stderr)})",
                         hint="p2p hook install --repo PATH-OF-A-GIT-REPOSITORY")
    path = Path(r.stdout.strip())
    return path if path.is_absolute() else (repo / path).resolve()


def is_ours(path: Path) -> bool:
    try:
        return MARK in path.read_text(encoding="utf-8", errors="replace")[:200]
    except OSError:
        return False


def script(profile: str, task: str, timeout: float, python: str | None = None) -> str:
    """The hook: the saved hook first (its failure still stops the commit), then ours, whose failure never does.
    `_ENTRY` drops the current folder from sys.path: the repository's own folders must not shadow the installed
    p2p_local (a clone of this one would)."""
    py = shlex.quote(python or sys.executable)
    return f"""#!/bin/sh
{MARK} (p2p hook uninstall removes it and restores any earlier hook)
hooks_dir=$(dirname "$0")
if [ -x "$hooks_dir/{SAVED}" ]; then
  "$hooks_dir/{SAVED}" "$@" || exit $?
fi
{py} -c {shlex.quote(_ENTRY)} hook run --profile {shlex.quote(profile)} --task {shlex.quote(task)} --timeout {timeout:g} "$@" \\
  </dev/null >/dev/null 2>&1 || true
exit 0
"""


def install(repo: str | Path, profile: str, task: str = COMMIT_TASK, timeout: float = DEFAULT_TIMEOUT_S) -> Path:
    """Install (or update) the hook; an earlier, foreign hook is kept as SAVED and still runs first."""
    d = hooks_dir(repo)
    path, saved = d / HOOK, d / SAVED
    moved = False
    try:
        if path.exists() and not is_ours(path):
            if saved.exists():
                raise UsageError(f"{path} exists and so does {saved}: not overwriting either",
                                 hint="move one of them away, then run p2p hook install again")
            os.replace(path, saved)
            moved = True
        atomic_write(path, script(profile, task, timeout), mode=0o755)
    except (OSError, StoreError) as e:
        if moved:  # the foreign hook goes back where it was: a failed install changes nothing
            os.replace(saved, path)
        if isinstance(e, OSError):
            raise disk_error(e, path) from e
        raise
    return path


def uninstall(repo: str | Path) -> tuple[Path, bool]:
    """Remove our hook and put back what was there; returns (hook path, whether an earlier hook came back)."""
    d = hooks_dir(repo)
    path, saved = d / HOOK, d / SAVED
    if path.exists() and not is_ours(path):
        raise UsageError(f"{path} is not the p2p-local hook: leaving it alone", hint="remove it by hand if you mean to")
    if not path.exists() and not saved.exists():
        raise UsageError(f"no p2p-local hook in {d}", hint="p2p hook install --repo PATH")
    path.unlink(missing_ok=True)
    if saved.exists():
        os.replace(saved, path)
        return path, True
    return path, False


def propose(query: str, profile: str, task: str) -> str:
    """The personalized subject for a commit query (what `p2p ask QUERY --profile P --task T` prints)."""
    from p2p_local.errors import ModelError
    from p2p_local.models import get_spec, model_path
    from p2p_local.personalize import Session

    if not model_path(get_spec()).is_file():  # a commit is no time to assemble a 250 MB model
        raise ModelError("the base model is not prepared", hint="p2p models prepare")
    with Session.open() as s:
        if not s.store.profile_exists(profile):
            raise StoreError(f"no profile {profile!r}")
        return s.answer(query, profile=profile, task=task).finish().text


def run(msg_file: str | Path, source: str = "", *, profile: str, task: str = COMMIT_TASK,
        timeout: float = DEFAULT_TIMEOUT_S, repo: str | Path = ".") -> str | None:
    """The hook's work: write a proposed subject into `msg_file` when git asks for a new message.

    Returns the subject written, or None (nothing to do, or nothing in time). Never raises for a missing
    model or profile: the caller (the hook script) must not stop the commit.
    """
    if source not in PROPOSE_SOURCES:
        return None
    msg_file = Path(msg_file)
    text = msg_file.read_text(encoding="utf-8", errors="replace")
    if any(ln.strip() and not ln.startswith("#") for ln in text.splitlines()):
        return None  # a template (or something) already wrote a message: leave it
    files = staged_files(repo)
    if not files:
        return None
    query = commit_query(files)
    found: list[str] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            found.append(propose(query, profile, task))
        except BaseException as e:  # reported by the caller, never raised into git
            errors.append(e)

    worker = threading.Thread(target=work, name="p2p-hook", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise TimeoutError(f"no subject within {timeout:g} s")
    if errors:
        raise errors[0]
    subject = found[0].splitlines()[0].strip() if found and found[0].strip() else ""
    if not subject:
        return None
    mode = msg_file.stat().st_mode & 0o777
    atomic_write(msg_file, subject + "\n" + text, mode=mode)
    return subject
