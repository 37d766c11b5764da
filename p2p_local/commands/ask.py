"""`p2p ask "..."`: one answer, streamed to stdout, personalized by a profile's adapter."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ask", help="answer one prompt (streams), personalized with a profile",
        epilog="examples:\n  p2p ask 'Heat (1995) | Genres: Action|Crime' --profile demo --task movielens-rating\n"
               "  p2p ask 'Heat (1995) | Genres: Action|Crime' --profile demo --base     # no adapter\n"
               "  p2p ask 'fix tmpdir cleanup on windows' --profile me --task pytest-commit-subject --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("text")
    p.add_argument("--profile", help="profile to personalize with (default: the only / first profile)")
    p.add_argument("--task", help="task card whose template frames the prompt (default: the profile's task; "
                                  "'chat' for a plain transcript)")
    p.add_argument("--base", action="store_true", help="answer with the base model, no adapter")
    p.add_argument("--scale", type=float, default=1.0, help="adapter strength 0-2 (default 1)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from p2p_local.errors import StoreError
    from p2p_local.personalize import FREE_CHAT, Session

    if not 0.0 <= args.scale <= 2.0:
        raise StoreError(f"--scale must be within 0-2, got {args.scale}")
    with Session.open() as s:
        profile = args.profile
        if profile is None and not args.base:
            names = [p.name for p in s.profiles()]
            profile = names[0] if names else None
        task = args.task or (s.default_task(profile) if profile else FREE_CHAT)  # as answer() picks it: say which
        pieces = []
        stream = s.answer(args.text, profile=profile, task=task, personalized=not args.base, scale=args.scale,
                          temperature=args.temperature, max_tokens=args.max_tokens)
        for piece in stream:
            pieces.append(piece)
            if not args.json:
                sys.stdout.write(piece)
                sys.stdout.flush()
        adapter, scale = s.engine.active
    if args.json:
        print(json.dumps({"text": "".join(pieces), "profile": profile, "task": task,
                          "adapter": str(adapter.path) if adapter else None, "scale": scale}))
    else:
        sys.stdout.write("\n")
    return 0
