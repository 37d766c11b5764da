"""`p2p ask "..."`: one answer, streamed to stdout, personalized by a profile's adapter.

The query may come from standard input (`-`, or nothing given while stdin is a pipe):
`git diff --cached | p2p ask - --profile me`. For a task that reads a change (the card's `diff_chars`) a
diff is read as the task reads a commit (`pipeline.query_item`, for every entry point): its changed files in
the training items' format and its compact diff (`p2p_local.diffs`); `--json` says what was read.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from p2p_local.commands.args import (
    candidates_arg,
    examples,
    max_tokens_arg,
    scale_arg,
    task_arg,
    temperature_arg,
)
from p2p_local.errors import UsageError

EPILOG = """examples:
  p2p ask {query} --profile demo --task {task}
  p2p ask {query} --profile demo --base     # no adapter
  git diff --cached | p2p ask - --task {commits} --profile me   # the query from stdin
  git diff --cached | p2p ask - --profile me --candidates 3 --json  # three proposals, best first
  p2p ask 'what should I watch tonight?' --profile demo --model smollm2-135m  # free chat, instruct model"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ask", help="answer one prompt (streams), personalized with a profile",
                       epilog=EPILOG.format(**examples()))
    p.add_argument("text", nargs="?", help="the query; '-' (or none, with a pipe) reads it from standard input")
    p.add_argument("--profile", help="profile to personalize with (default: the only profile holding the task's items)")
    p.add_argument("--task", type=task_arg, help="task card whose template frames the prompt (default: the profile's task; "
                                  "'chat' or 'free' for a plain transcript)")
    p.add_argument("--model", metavar="NAME", help="free chat on this instruct model (see `p2p models list`; "
                   "add your own with `p2p models add FILE --name N`); task answers stay on the bundle's base")
    p.add_argument("--base", action="store_true", help="answer with the base model, no adapter")
    p.add_argument("--scale", type=scale_arg, default=1.0, help="adapter strength 0-2 (default 1)")
    p.add_argument("--temperature", type=temperature_arg, default=0.0, help="0 = greedy (default), at most 2")
    p.add_argument("--max-tokens", type=max_tokens_arg, help="at most this many tokens (1-2048)")
    p.add_argument("--candidates", type=candidates_arg, default=1, metavar="N",
                   help="one-line tasks (commit subjects): N distinct proposals, best first, one a line (1-8)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from p2p_local.bundle import untrained_note
    from p2p_local.data.format import FREE_CHAT
    from p2p_local.personalize import Session
    from p2p_local.pipeline import CUT_NOTES, cut_mark, lora_scale
    from p2p_local.terminal import Printer, json_text, shown

    text = query_text(args.text)
    if args.model is not None and args.task and args.task != FREE_CHAT:
        raise UsageError(f"--model is for free chat; {args.task} answers come from the bundle's base",
                         hint="drop --model, or ask with --task chat")
    task = args.task or (FREE_CHAT if args.model is not None else None)
    with Session.open(chat_model=args.model, encoder=not args.base) as s:  # --base: no encoder needed
        if args.base and args.profile is None:  # the base model: no profile to choose
            profile, task = None, task or FREE_CHAT
        else:
            profile, task = s.choose(args.profile, task)
        text = asked_text(s, text, task, profile, quiet=args.json)
        answer = s.answer(text, profile=profile, task=task, personalized=not args.base, scale=args.scale,
                          temperature=args.temperature, max_tokens=args.max_tokens)
        printer = Printer()  # the model may repeat an escape sequence of the profile's items
        started = False  # a free-chat answer begins with the space after "Assistant:": not printed
        with answer:
            try:
                for piece in answer:
                    if not args.json:
                        shown_piece = printer.feed(piece) if started else printer.feed(piece).lstrip()
                        started = started or bool(shown_piece)
                        sys.stdout.write(shown_piece)
                        sys.stdout.flush()
            except KeyboardInterrupt:  # Ctrl-C: the partial answer stays, marked as the chat marks it
                if not args.json:
                    sys.stdout.write(printer.flush() + cut_mark("stopped") + "\n")
                raise
        if not args.json:
            sys.stdout.write(printer.flush())
        model = s.model_of(answer)  # the file/registry name of the model that answered
    proposals = [c.text for c in answer.candidates[: args.candidates]] or [answer.text]
    if args.json:
        out = {"text": answer.text, "query": answer.request.query, "profile": profile,
               "task": answer.request.task, "model": model,
               "adapter": str(answer.adapter) if answer.adapter else None,
               "scale": answer.scale, "lora_scale": lora_scale(answer.scale), "finish": answer.finish_reason,
               "examples": answer.examples, "read": answer.request.read,
               # the bundle's record of this task's card (Bundle.card_status); None: free chat
               "card": s.bundle.card_status(answer.request.card) if answer.request.card else None,
               "cut": answer.finish_reason if cut_mark(answer.finish_reason) else None}
        if answer.candidates:
            out["candidates"] = [{"text": c.text, "logprob": round(c.logprob, 4), "copy": c.copy}
                                 for c in answer.candidates[: args.candidates]]
        if answer.distribution is not None:
            out["distribution"] = {k: round(v, 6) for k, v in answer.distribution.items()}
        print(json_text(out))
    else:
        sys.stdout.write(cut_mark(answer.finish_reason) + "\n")
        if answer.adapter and answer.request.card and s.bundle.card_status(answer.request.card) == "untrained":
            print(f"note: {untrained_note(answer.request.card.name)}", file=sys.stderr)
        if answer.personalization is not None and answer.personalization.empty and answer.adapter is None:
            print(f"note: {profile} has no {answer.request.task} items: above x1 no adapter, the base model answered",
                  file=sys.stderr)
        for more in proposals[1:]:  # the other proposals, one a line
            print(shown(more))
        if answer.finish_reason == "length":
            print("(cut at its token budget; --max-tokens N allows more)", file=sys.stderr)
        elif cut_mark(answer.finish_reason):
            print(f"({CUT_NOTES[answer.finish_reason]})", file=sys.stderr)
    return 0


class QueryTooLong(UsageError):
    """A query longer than the model reads (`MAX_QUERY_CHARS`), as the task reads it."""


def asked_text(session: Any, text: str, task: str | None, profile: str | None, quiet: bool = False) -> str:
    """The text to answer, as `p2p ask` (and `p2p serve`) take it: refused when the task would read more than
    the model can (checked on the task's reading of it: a diff becomes its compact form), and a bare movie title
    completed (`complete_title`)."""
    from p2p_local.data.format import resolve_task
    from p2p_local.pipeline import Request

    card = resolve_task(task, session.card)
    query = Request(card, text).query  # as the task will read it (a diff: files + compact diff)
    if len(query) > MAX_QUERY_CHARS:  # tokenizing 50 MB took minutes, only to be refused by the context
        raise QueryTooLong(f"the query is {len(query):,} characters; the model reads at most {MAX_QUERY_CHARS:,}",
                           hint="ask with a shorter text (a diff is read in its compact form by a task that reads changes)")
    return complete_title(session, text, task, profile, quiet=quiet) if card is not None else text


MAX_STDIN_CHARS = 64 << 20  # a big diff is fine (its compact form is read); the prompt keeps what fits
MAX_QUERY_CHARS = 16_000  # what reaches the model: more than its 2048-token context holds in any language


def query_text(text: str | None) -> str:
    """The query: the argument, or standard input for '-' (or no argument while stdin is not a terminal)."""
    piped = text is None or text == "-"
    if piped:
        if text is None and _stdin_is_terminal():
            raise UsageError("no query given", hint="p2p ask \"...\"   or   echo \"...\" | p2p ask -")
        text = _read_stdin()
        try:
            text.encode("utf-8")  # undecodable bytes arrive as lone surrogates
        except UnicodeEncodeError:
            from p2p_local.diffs import looks_like_diff

            if not looks_like_diff(text):
                raise UsageError("standard input is not valid UTF-8 text", hint="pipe UTF-8 text") from None
            # A diff of a file in another encoding: its odd bytes become U+FFFD, as in the hook's staged diff.
            text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
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
    if sys.stdin is None:
        return ""
    try:
        text = sys.stdin.read(MAX_STDIN_CHARS + 1)
    except (OSError, ValueError) as e:  # opened write-only (EBADF), closed
        raise UsageError(f"cannot read standard input ({getattr(e, 'strerror', None) or e})",
                         hint="pipe the query in, or pass it as an argument") from None
    return text.removeprefix("\ufeff")


def complete_title(session, text: str, task: str, profile: str | None, quiet: bool = False) -> str:
    """A bare movie title ("Toy Story") completed as the chat completes it (`tui.titles.Catalogue`: the
    movies the store holds, the profile's own first); the first match when several, said on stderr."""
    from p2p_local.tui.titles import Catalogue, needs_completion

    card = session.card(task)
    if not needs_completion(card, text):
        return text
    matches = Catalogue(session.store, card).lookup(text, profile)
    if not matches:
        return text
    if not quiet:
        more = f" (also: {', '.join(m.title for m in matches[1:4])})" if len(matches) > 1 else ""
        print(f"read as: {matches[0].text}{more}", file=sys.stderr)
    return matches[0].text
