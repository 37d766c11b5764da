"""`p2p ask "..."`: one answer, streamed to stdout, personalized by a profile's adapter.

The query may come from standard input (`-`, or nothing given while stdin is a pipe):
`git diff --cached | p2p ask - --task commit-subject --profile me`. For the commit-subject task a
diff is read as the task reads a commit: its changed files (and no body yet), the training items' format.
"""

from __future__ import annotations

import argparse
import json
import sys

from p2p_local.commands.args import CHAT_TASKS, max_tokens_arg, scale_arg, task_arg, temperature_arg
from p2p_local.errors import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ask", help="answer one prompt (streams), personalized with a profile",
        epilog="examples:\n  p2p ask 'Heat (1995) | Genres: Action|Crime' --profile demo --task movielens-rating\n"
               "  p2p ask 'Heat (1995) | Genres: Action|Crime' --profile demo --base     # no adapter\n"
               "  p2p ask 'fix tmpdir cleanup on windows' --profile me --task commit-subject --json\n"
               "  git diff --cached | p2p ask - --task commit-subject --profile me   # the query from stdin\n"
               "  p2p ask 'what should I watch tonight?' --profile demo --model smollm2-135m  # free chat, instruct model",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("text", nargs="?", help="the query; '-' (or none, with a pipe) reads it from standard input")
    p.add_argument("--profile", help="profile to personalize with (default: the only / first profile)")
    p.add_argument("--task", type=task_arg, help="task card whose template frames the prompt (default: the profile's task; "
                                  "'chat' for a plain transcript)")
    p.add_argument("--model", metavar="NAME", help="free chat on this instruct model (see `p2p models list`; "
                   "add your own with `p2p models add FILE --name N`); task answers stay on the bundle's base")
    p.add_argument("--base", action="store_true", help="answer with the base model, no adapter")
    p.add_argument("--scale", type=scale_arg, default=1.0, help="adapter strength 0-2 (default 1)")
    p.add_argument("--temperature", type=temperature_arg, default=0.0, help="0 = greedy (default), at most 2")
    p.add_argument("--max-tokens", type=max_tokens_arg, help="at most this many tokens (1-2048)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from p2p_local.personalize import FREE_CHAT, Session
    from p2p_local.pipeline import CUT_MARK

    text = query_text(args.text)
    if args.model is not None and args.task and args.task not in CHAT_TASKS:
        raise UsageError(f"--model is for free chat; {args.task} answers come from the bundle's base",
                         hint="drop --model, or ask with --task chat")
    with Session.open(chat_model=args.model) as s:
        profile = args.profile
        if profile is None and not args.base:
            names = [p.name for p in s.profiles()]
            profile = names[0] if names else None
        task = args.task or (FREE_CHAT if args.model is not None or not profile else s.default_task(profile))
        task = FREE_CHAT if task in CHAT_TASKS else task
        text = task_query(text, task)
        if len(text) > MAX_QUERY_CHARS:  # tokenizing 50 MB took minutes, only to be refused by the context
            raise UsageError(f"the query is {len(text):,} characters; the model reads at most {MAX_QUERY_CHARS:,}",
                             hint="ask with a shorter text (a diff for commit-subject is read by its file names)")
        if task != FREE_CHAT:
            text = complete_title(s, text, task, profile, quiet=args.json)
        pieces = []
        stream = s.answer(text, profile=profile, task=task, personalized=not args.base, scale=args.scale,
                          temperature=args.temperature, max_tokens=args.max_tokens)
        for piece in stream:
            pieces.append(piece)
            if not args.json:
                sys.stdout.write(piece)
                sys.stdout.flush()
        adapter, scale = s.engine.active
        finish = s.last_finish
    if args.json:
        print(json.dumps({"text": "".join(pieces), "query": text, "profile": profile, "task": task,
                          "adapter": str(adapter.path) if adapter else None, "scale": args.scale if adapter else 0.0,
                          "lora_scale": scale, "finish": finish}))
    else:
        sys.stdout.write((CUT_MARK if finish == "length" else "") + "\n")
        if finish == "length":
            print("(cut at its token budget; --max-tokens N allows more)", file=sys.stderr)
    return 0


MAX_STDIN_CHARS = 64 << 20  # a big diff is fine (only its file names are read); the prompt keeps what fits
MAX_QUERY_CHARS = 16_000  # what reaches the model: more than its 2048-token context holds in any language


def query_text(text: str | None) -> str:
    """The query: the argument, or standard input for '-' (or no argument while stdin is not a terminal)."""
    from p2p_local.errors import UsageError

    piped = text is None or text == "-"
    if piped:
        if text is None and _stdin_is_terminal():
            raise UsageError("no query given", hint="p2p ask \"...\"   or   echo \"...\" | p2p ask -")
        text = _read_stdin()
        try:
            text.encode("utf-8")  # undecodable bytes arrive as lone surrogates
        except UnicodeEncodeError:
            raise UsageError("standard input is not valid UTF-8 text", hint="pipe UTF-8 text") from None
        if len(text) > MAX_STDIN_CHARS:
            raise UsageError(f"the query on standard input is longer than {MAX_STDIN_CHARS:,} characters",
                             hint="pipe a shorter text (for commits: git diff --cached --stat, or the diff itself)")
    if not text.strip():
        raise UsageError("the query is empty", hint="nothing on standard input (nothing staged?)" if piped else None)
    return text.strip("\n") if piped else text  # a pipe ends its text with a newline: not part of the query


def _stdin_is_terminal() -> bool:
    try:
        return sys.stdin is None or sys.stdin.isatty()
    except (OSError, ValueError):  # closed
        return False


def _read_stdin() -> str:
    """At most MAX_STDIN_CHARS + 1 characters of standard input, without a UTF-8 byte-order mark (an
    editor's BOM hid a diff from the commit task); a closed or write-only stdin is a usage error."""
    from p2p_local.errors import UsageError

    if sys.stdin is None:
        return ""
    try:
        text = sys.stdin.read(MAX_STDIN_CHARS + 1)
    except (OSError, ValueError) as e:  # opened write-only (EBADF), closed
        raise UsageError(f"cannot read standard input ({getattr(e, 'strerror', None) or e})",
                         hint="pipe the query in, or pass it as an argument") from None
    return text.removeprefix("\ufeff")


def task_query(text: str, task: str | None) -> str:
    """A diff asked of the commit-subject task becomes the commit as the task reads one (`gitlog.commit_query`)."""
    from p2p_local.gitlog import commit_query, diff_files, looks_like_diff

    if task in COMMIT_TASKS and looks_like_diff(text):
        return commit_query(diff_files(text))
    return text


def complete_title(session, text: str, task: str, profile: str | None, quiet: bool = False) -> str:
    """A bare movie title ("Toy Story") completed as the chat completes it (`tui.titles.Catalogue`: the
    movies the store holds, the profile's own first); the first match when several, said on stderr."""
    from p2p_local.tui.titles import Catalogue, needs_completion

    card = session.card(task)
    if not needs_completion(card, text):
        return text
    matches = Catalogue(session.store, card.name).lookup(text, profile)
    if not matches:
        return text
    if not quiet:
        more = f" (also: {', '.join(m.title for m in matches[1:4])})" if len(matches) > 1 else ""
        print(f"read as: {matches[0].text}{more}", file=sys.stderr)
    return matches[0].text


COMMIT_TASKS = ("commit-subject",)  # former names resolve through data.format.canonical_task
