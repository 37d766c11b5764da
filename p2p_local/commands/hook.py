"""`p2p hook install | uninstall | run`: your personalized commit subject, proposed in git's editor."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EPILOG = """examples:
  p2p hook install                          # this repository; the profile holding your commits
  p2p hook install --repo ~/src/app --profile me --timeout 5
  p2p hook uninstall --repo ~/src/app       # puts back the hook that was there before
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hook", help="install a git hook that proposes your personalized commit subject",
                       description="A prepare-commit-msg hook: `git commit` opens the editor with the subject line "
                                   "your profile's adapter proposes for the staged files. It never blocks a commit.",
                       epilog=EPILOG)
    hsub = p.add_subparsers(dest="hook_command", metavar="ACTION")
    p.set_defaults(func=lambda _args: p.print_help() or 2)

    ins = hsub.add_parser("install", help="install (or update) the hook in a repository", epilog=EPILOG)
    ins.add_argument("--repo", type=Path, default=Path("."), help="the repository (default: the current folder)")
    ins.add_argument("--profile", help="profile to personalize with (default: the one holding commit subjects)")
    ins.add_argument("--task", help="task card (default: the task of imported commits)")
    ins.add_argument("--timeout", type=float, default=None, help="seconds before the hook gives up (default 10)")
    ins.set_defaults(func=cmd_install)

    un = hsub.add_parser("uninstall", help="remove the hook and restore the one that was there", epilog=EPILOG)
    un.add_argument("--repo", type=Path, default=Path("."))
    un.set_defaults(func=cmd_uninstall)

    run = hsub.add_parser("run", help="what the installed hook calls (git passes MSG_FILE [SOURCE [SHA]])")
    run.add_argument("msg_file", type=Path)
    run.add_argument("source", nargs="?", default="")
    run.add_argument("sha", nargs="?", default="")
    run.add_argument("--profile", required=True)
    run.add_argument("--task", default=None)
    run.add_argument("--timeout", type=float, default=None)
    run.set_defaults(func=cmd_run)


def cmd_install(args: argparse.Namespace) -> int:
    from p2p_local import hook
    from p2p_local.errors import UsageError

    if args.timeout is not None and not 0 < args.timeout <= 600:
        raise UsageError(f"--timeout must be within 0-600 seconds, got {args.timeout:g}")
    from p2p_local.personalize import choose
    from p2p_local.store import Store

    hook.hooks_dir(args.repo)  # a repository first: the first thing to say when it is not one
    task = _known_task(args.task or hook.COMMIT_TASK)
    with Store() as store:  # a named profile must exist (did-you-mean hint); else the one rule picks it
        profile, task = choose(store, args.profile, task)
    if profile is None:
        raise UsageError(f"no profile holds {task} items yet",
                         hint="p2p profile import me --git . --create   (then p2p hook install)")
    path = hook.install(args.repo, profile, task, args.timeout or hook.DEFAULT_TIMEOUT_S)
    print(f"installed {path} (profile {profile!r}, task {task}, data dir {hook.recorded_env()['P2P_HOME']})")
    print("  git commit now opens the editor with your personalized subject line; "
          f"p2p hook uninstall --repo {args.repo} removes it")
    return 0


def _known_task(task: str) -> str:
    """A built-in task card (the hook would otherwise fail silently at every commit); free chat is none."""
    from p2p_local.data.format import builtin_cards, resolve_task
    from p2p_local.errors import UsageError

    card = resolve_task(task)
    if card is None:
        raise UsageError(f"unknown task {task[:70]!r}", hint=f"known tasks: {', '.join(builtin_cards())}")
    return card.name


def cmd_run(args: argparse.Namespace) -> int:
    """Never fails the commit: whatever happens, exit 0 (a message on stderr says why nothing was proposed)."""
    from p2p_local import hook

    timeout = args.timeout or float(os.environ.get("P2P_HOOK_TIMEOUT") or hook.DEFAULT_TIMEOUT_S)
    try:
        subject = hook.run(args.msg_file, args.source, profile=args.profile, task=args.task or hook.COMMIT_TASK,
                           timeout=timeout)
    except TimeoutError as e:
        print(f"p2p hook: {e}; commit message left as it was", file=sys.stderr, flush=True)
        os._exit(0)  # the worker may still be inside llama.cpp: do not wait for it
    except Exception as e:  # a missing model, store or profile: no proposal, never a blocked commit
        print(f"p2p hook: no proposal ({str(e).splitlines()[0]})", file=sys.stderr)
        return 0
    if subject:
        print(f"p2p hook: proposed {subject!r}", file=sys.stderr)
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    from p2p_local import hook

    path, restored = hook.uninstall(args.repo)
    print(f"removed the p2p-local hook {path}" + ("; the earlier hook is back in place" if restored else ""))
    return 0
