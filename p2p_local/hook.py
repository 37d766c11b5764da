"""A `prepare-commit-msg` git hook that proposes your personalized subject line in the commit editor.

`p2p hook install` writes a small shell script into the repository's hooks folder (core.hooksPath
honoured). A hook that was there before is kept beside it (`prepare-commit-msg.p2p-saved`), still runs
first, and comes back on `p2p hook uninstall`. The script calls `p2p hook run`, which

- proposes only when git opens the editor on an empty message (not for `-m`, `-F`, merges, squashes,
  amends, or a template that already holds a subject); the script itself decides the cheap cases in the
  shell, without starting Python: a message source other than none/template, or a rebase, cherry-pick,
  revert or merge in progress. It exports the data dir it was installed with (unless the commit's
  environment sets one), so a shell without P2P_HOME still finds the profile;
- reads the staged change as the task reads an imported commit (its files line and compact diff,
  `pipeline.query_item`: the imported commits' rule), personalizes with the profile's adapter and writes
  the best proposal as the first line, the others and what was read as `#` lines below it;
- never blocks a commit: a missing model, profile or store, an error or a run past the timeout
  (`--timeout`, or `P2P_HOOK_TIMEOUT` seconds) leaves the message as git made it, and the script
  always exits 0 for its own part.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2p_local.errors import StoreError, UsageError
from p2p_local.files import atomic_write, disk_error, quoted
from p2p_local.gitlog import COMMIT_TASK, first_line, git_command, git_env, staged_diff

HOOK = "prepare-commit-msg"
SAVED = HOOK + ".p2p-saved"
MARK = "# p2p-local prepare-commit-msg hook"
DEFAULT_TIMEOUT_S = 10.0
PROPOSALS = 3  # the subject, then two more as `#` lines
PROPOSE_SOURCES = ("", "template")
# sys.path[0] is the cwd. The process ends without the interpreter's teardown (freeing the model and the runtimes,
# ~0.1 s at every commit): by then `main` has written the message, and the store has committed every write (autocommit
# outside its transactions); the session may still be closing in its thread, and the OS frees what it holds.
_ENTRY = ("import os, sys; sys.path.pop(0); from p2p_local.cli import main; rc = main(); sys.stdout.flush(); "
          "sys.stderr.flush(); os._exit(rc)")


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


# What makes the hook step aside without starting Python: files in the git dir while a rebase, cherry-pick,
# revert or merge is under way (each of their commits would otherwise pay a Python start).
BUSY = ("rebase-merge", "rebase-apply", "CHERRY_PICK_HEAD", "REVERT_HEAD", "MERGE_HEAD")
GONE = "# p2p-local: no proposal: data dir {} is gone (p2p hook install again)"


def recorded_env() -> dict[str, str]:
    """What the hook exports for `p2p hook run` unless the commit's environment sets it: the data dir in use now
    (a commit from a shell without P2P_HOME still finds the profile), and P2P_MODELS when it is set."""
    from p2p_local.paths import data_dir

    out = {"P2P_HOME": os.path.abspath(data_dir(create=False))}
    if os.environ.get("P2P_MODELS"):
        out["P2P_MODELS"] = os.path.abspath(os.path.expanduser(os.environ["P2P_MODELS"]))
    return out


def script(profile: str, task: str, timeout: float, python: str | None = None,
           env: dict[str, str] | None = None) -> str:
    """The hook: the saved hook first (its failure still stops the commit), then ours, whose failure never does.

    Ours exits in the shell, before any Python, unless git opens the editor on a new message (no source, or a
    template) outside a rebase/cherry-pick/revert/merge: a rebase of N commits then costs N shell starts, not N
    Python starts. The git dir is the message file's folder (git writes COMMIT_EDITMSG there; 2.39 sets GIT_DIR
    for hooks only in a linked worktree), so no `git rev-parse` either. `env` (default `recorded_env()`) is exported unless
    already set. `_ENTRY` drops the current folder from sys.path: the repository's own folders must not shadow
    the installed p2p_local (a clone of this one would)."""
    py = quoted(python or sys.executable)
    sources = "|".join(quoted(s) for s in PROPOSE_SOURCES)
    exports = "".join(f'[ -n "${{{k}-}}" ] || {k}={quoted(v)}; export {k}\n'
                      for k, v in (recorded_env() if env is None else env).items())
    gone = quoted(GONE.format("%s") + "\\n")  # printf's format: the data dir goes in as an argument
    return f"""#!/bin/sh
{MARK} (p2p hook uninstall removes it and restores any earlier hook)
case $0 in */*) hooks_dir=${{0%/*}} ;; *) hooks_dir=. ;; esac
if [ -x "$hooks_dir/{SAVED}" ]; then
  "$hooks_dir/{SAVED}" "$@" || exit $?
fi
case ${{2-}} in {sources}) ;; *) exit 0 ;; esac
git_dir=${{1%/*}}
[ "$git_dir" != "$1" ] && [ -f "$git_dir/HEAD" ] || git_dir=$(git rev-parse --git-dir 2>/dev/null) || exit 0
for f in {" ".join(BUSY)}; do
  [ -e "$git_dir/$f" ] && exit 0
done
{exports}if [ ! -d "$P2P_HOME" ]; then
  printf {gone} "$P2P_HOME" >>"$1"
  exit 0
fi
{py} -c {quoted(_ENTRY)} hook run --profile {quoted(profile)} --task {quoted(task)} --timeout {timeout:g} "$@" \\
  </dev/null >/dev/null 2>&1 || true
exit 0
"""


def install(repo: str | Path, profile: str, task: str = COMMIT_TASK, timeout: float = DEFAULT_TIMEOUT_S, *,
            python: str | None = None, env: dict[str, str] | None = None) -> Path:
    """Install (or update) the hook; an earlier, foreign hook is kept as SAVED and still runs first.
    `python`: the interpreter the hook starts (default: this one); `env`: what it exports (`script`)."""
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
        atomic_write(path, script(profile, task, timeout, python, env), mode=0o755)
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


def propose(query: str, profile: str, task: str, ready: Callable[[Proposal], None] | None = None) -> Proposal:
    """The personalized proposals for a commit query, a staged diff (what `p2p ask - --candidates 3` prints).
    `ready` gets them before the session closes (50 ms): the hook writes them meanwhile, and its process then
    ends without waiting."""
    from concurrent.futures import ThreadPoolExecutor

    from p2p_local.engine import Engine
    from p2p_local.errors import ModelError
    from p2p_local.models import get_spec, model_path, prepare_base

    spec = get_spec()
    if not model_path(spec).is_file():  # a commit is no time to assemble a 250 MB model
        raise ModelError("the base model is not prepared", hint="p2p models prepare")
    with ThreadPoolExecutor(1, thread_name_prefix="p2p-base") as pool:
        # llama.cpp reads the model (0.4 s, native) while the app imports the rest and Session.open loads the
        # bundle, the encoder and BM25 (0.4 s): both halves of the start on the two cores at once
        base = pool.submit(lambda: Engine(prepare_base(spec), sha256=spec.sha256))
        from p2p_local.personalize import Session

        with Session.open(base=base) as s:
            if not s.store.profiles.profile_exists(profile):
                raise StoreError(f"no profile {profile!r}")
            a = s.answer(query, profile=profile, task=task).finish()
            proposal = Proposal([c.text for c in a.candidates[:PROPOSALS]] or [a.text], a.request.read)
            if ready is not None:
                ready(proposal)
            return proposal


@dataclass
class Proposal:
    """The hook's proposals (best first) and what was read of the staged change (`pipeline.what_was_read`)."""

    lines: list[str]
    read: dict[str, Any] | None = None

    def comments(self) -> list[str]:
        """The `#` lines under the subject: the other proposals, and what was read (never cut silently)."""
        out = [f"# p2p-local also proposes: {line}" for line in self.lines[1:]]
        r = self.read
        if r:
            out.append(f"# p2p-local read {r['files']} of {r['files_total']} files and {r['diff_chars']:,} of "
                       f"{r['diff_chars_total']:,} diff characters")
        return out


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
    query = staged_diff(repo)
    if not query.strip():
        return None
    found: list[Proposal] = []
    errors: list[BaseException] = []
    done = threading.Event()  # proposals or an error are there (the session may still be closing)

    def work() -> None:
        try:
            propose(query, profile, task, ready=lambda p: (found.append(p), done.set()))
        except BaseException as e:  # reported by the caller, never raised into git
            errors.append(e)
        finally:
            done.set()

    threading.Thread(target=work, name="p2p-hook", daemon=True).start()
    if not done.wait(timeout):
        raise TimeoutError(f"no subject within {timeout:g} s")
    if errors:
        raise errors[0]
    lines = [ln.strip() for ln in (found[0].lines if found else []) if ln.strip()]
    if not lines:
        return None
    mode = msg_file.stat().st_mode & 0o777
    comments = "".join(c + "\n" for c in found[0].comments())
    atomic_write(msg_file, lines[0].splitlines()[0] + "\n" + comments + text, mode=mode)
    return lines[0]
