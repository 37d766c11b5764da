"""`p2p chat [--profile NAME] [--task T] [--demo]`: the terminal chat.

With no profile in the store, the demo profile (one real MovieLens user) is imported and opened,
personalized, so a first run shows what the adapter does within a minute.
"""

from __future__ import annotations

import argparse
import sys

from p2p_local.commands.args import examples, task_arg
from p2p_local.errors import UsageError

EPILOG = """examples:
  p2p chat                                   # the profile used last (the demo on a first run)
  p2p chat --profile me --task {commits}
  p2p chat --profile demo --compare          # base and personalized answers side by side
  p2p chat --model smollm2-135m              # free chat on an instruct model (p2p models list; F2 in the chat)
  p2p chat --new                             # a new conversation instead of resuming the last
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    ex = examples()
    p = subparsers.add_parser("chat", help="the terminal chat: personalized answers, side by side with the base model",
                              description="Chat with the local model, personalized by an adapter made from a profile. "
                              "Keys are shown at the bottom of the screen; ctrl+p lists every command.",
                              epilog=EPILOG.format(**ex))
    p.add_argument("--profile", help="profile to chat as (default: the one used last)")
    p.add_argument("--task", type=task_arg, help=f"task card to start with, e.g. {ex['task']}, or 'free' for free chat "
                   "(default: the profile's task)")
    p.add_argument("--model", metavar="NAME", help="free chat on this instruct model (`p2p models list`; your own: "
                   "`p2p models add FILE --name N`), and the chat opens on free chat unless --task is given; "
                   "task answers stay on the bundle's base")
    p.add_argument("--demo", action="store_true", help="open the demo profile (imported on first use)")
    p.add_argument("--base", action="store_true", help="start with personalization off")
    p.add_argument("--compare", action="store_true", help="start in the side-by-side view")
    p.add_argument("--new", action="store_true", help="start a new conversation instead of resuming the last")
    p.set_defaults(func=run)


def pick_profile(store, requested: str | None, demo: bool, task: str | None = None) -> str | None:
    """The profile to open: the requested one, or for a named task the one `personalize.choose` picks
    (as ask and hook do); else the demo (imported if needed) or the one used last."""
    from p2p_local.data.format import FREE_CHAT
    from p2p_local.demo import import_demo
    from p2p_local.personalize import choose

    if requested is not None or (task not in (None, FREE_CHAT) and store.profiles.list_profiles() and not demo):
        return choose(store, requested, task)[0]
    if demo or not store.profiles.list_profiles():
        return import_demo(store)
    recent = store.conversations.all()
    if recent and recent[0].profile is not None:
        return recent[0].profile
    return max(store.profiles.list_profiles(), key=lambda p: p.updated).name


def run(args: argparse.Namespace) -> int:
    from p2p_local.data.format import FREE_CHAT
    from p2p_local.personalize import Session
    from p2p_local.tui import ChatApp

    if not _on_a_terminal():
        raise UsageError("p2p chat needs a terminal (stdin and stdout are not both one)",
                         hint='for scripts and pipes use: p2p ask "..." --profile P   (or: echo ... | p2p ask -)')
    print("loading the model and the hypernetwork …", file=sys.stderr, flush=True)
    # A chat model is for free chat: `--model` alone opens there (a task's answers would not come from it).
    task = args.task or (FREE_CHAT if args.model is not None else None)
    with Session.open(chat_model=args.model) as session:
        profile = pick_profile(session.store, args.profile, args.demo, task)
        # A profile named on the command line is the user's choice: no first-run screen asking for one.
        ChatApp(session, profile=profile, task=task, personalized=not args.base, compare=args.compare,
                resume=not args.new, first_run=False if args.profile else None).run()
    return 0


def _on_a_terminal() -> bool:
    """The chat draws on and reads from a terminal; without one (a pipe, /dev/null, a cron job) the app
    would wait forever for keys that never come."""
    try:
        return sys.stdin is not None and sys.stdout is not None and sys.stdin.isatty() and sys.stdout.isatty()
    except (ValueError, OSError):  # a closed stream
        return False
