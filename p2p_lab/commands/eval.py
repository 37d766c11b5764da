"""`p2p eval`: every method on the same held-out users, with bootstrap CIs, written to reports/."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from p2p_lab.commands import needs_lab
from p2p_local.errors import P2PError

EPILOG = """examples:
  p2p eval --task movielens-rating --users 50            # every method that applies, 50 test users
  p2p eval --task movielens-rating --methods base,user-mean,p2p --split ood
  p2p eval --task commit-subject --methods base,rag,pag,all-history --users 20
  p2p eval --data users.jsonl --task-card card.json      # your own data (generic format, docs/DATA.md)
  p2p eval --summary --card models/gemma3-270m-p2p        # gather reports/ into SUMMARY.md (+ the bundle's EVAL.md)

methods: base rag pag all-history mt-lora oppu p2p p2p-rag p2p-shuffled p2p-random
         global-mean user-mean user-item-bias logreg (the last four: rating/label tasks)
Results are appended per (method, user) under OUT/runs/: an interrupted run continues where it stopped.
"""


@needs_lab("eval", "evaluate every method on held-out users (reports with CIs)")
def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate every method on held-out users (reports with CIs)",
                       description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", help="built-in task (see `p2p data stats`), or a name for --data")
    p.add_argument("--split", default="test", choices=("test", "ood", "val", "all"),
                   help="held-out users to evaluate (default: test; `all` = every user, no training users)")
    p.add_argument("--methods", help="comma-separated (default: every method that applies to the task)")
    p.add_argument("--users", type=int, help="evaluate at most N users (a seeded subset; default: all)")
    p.add_argument("--queries", type=int, default=10, help="each user's last N items are the queries (default 10)")
    p.add_argument("--out", type=Path, default=None,
                   help="report directory (default: eval/ in the data dir; the shipped reports: --out reports)")
    p.add_argument("--data", type=Path, help="your own users JSONL (generic format)")
    p.add_argument("--task-card", type=Path, help="the task card JSON for --data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    p.add_argument("--n-ctx", type=int, default=2048, help="model context (prompt-side baselines fill it)")
    p.add_argument("--bundle", help="hypernetwork bundle dir or name (default: the shipped one)")
    p.add_argument("--mtlora", type=Path, help="MT-LoRA GGUF adapter")
    p.add_argument("--oppu-dir", type=Path, help="directory of per-user OPPU adapters <user_id>.gguf")
    p.add_argument("--oppu-train", action="store_true", help="train missing OPPU adapters (needs torch; slow)")
    p.add_argument("--oppu-users", type=int, help="give OPPU only the first N evaluated users (training cost)")
    p.add_argument("--oppu-max-items", type=int,
                   help="OPPU trains on each user's latest N earlier items (default 0: all of them)")
    p.add_argument("--max-tokens", type=int, help="generation budget (default: ~24 one-line, 1.5x input otherwise)")
    p.add_argument("--branches", type=int, help="one-line answers: first tokens the line is chosen among "
                   "(default: the app's; 1 = the plain greedy line)")
    p.add_argument("--copy-margin", type=float, help="one-line answers: nats/token within which a line that is "
                   "not one of the user's earlier outputs goes first (default: the app's; 0 = no copy rule)")
    p.add_argument("--card-field", action="append", default=[], metavar="NAME=JSON",
                   help="evaluate the task card with a field changed, e.g. examples=1 or examples_diff_chars=200 "
                        "(repeatable; the run is stored apart)")
    p.add_argument("--fresh", action="store_true", help="ignore results stored by earlier runs")
    p.add_argument("--summary", action="store_true",
                   help="evaluate nothing: gather the reports in --out into SUMMARY.md, summary.json and summary.png")
    p.add_argument("--card", type=Path, help="with --summary: also write EVAL.md into this bundle directory")
    p.add_argument("--readme", type=Path, help="with --summary: also put the headline table in this file's "
                                               "<!-- summary:begin --> ... <!-- summary:end --> block")
    p.set_defaults(func=cmd_eval)


def command_line(args: argparse.Namespace) -> str:
    """The canonical command line for these arguments (recorded in the report)."""
    parts = ["p2p", "eval"]
    for opt in ("task", "split", "methods", "users", "queries", "out", "data", "task_card", "seed", "bootstrap",
                "n_ctx", "bundle", "mtlora", "oppu_dir", "oppu_users", "oppu_max_items", "max_tokens"):
        v = getattr(args, opt, None)
        if v is not None:
            parts += ["--" + opt.replace("_", "-"), str(v)]
    for flag in ("oppu_train", "fresh"):
        if getattr(args, flag, False):
            parts.append("--" + flag.replace("_", "-"))
    return " ".join(shlex.quote(p) for p in parts)


def cmd_eval(args: argparse.Namespace) -> int:
    from p2p_lab.eval.methods import MethodOptions
    from p2p_lab.eval.report import fmt
    from p2p_lab.eval.runner import EvalConfig, run_eval

    if args.out is None:  # the lab never writes over the shipped reports unless told to (--out reports)
        from p2p_local.paths import data_dir

        args.out = data_dir() / "eval"
    if args.summary:
        from p2p_lab.eval.summary import write_summary

        write_summary(args.out, args.card, readme=args.readme)
        return 0
    if args.queries < 1 or (args.users is not None and args.users < 1):
        raise P2PError("--queries and --users must be at least 1")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    cfg = EvalConfig(
        task=args.task, split=args.split, methods=methods, users=args.users, queries=args.queries,
        out=args.out, data=args.data, task_card=args.task_card, seed=args.seed, bootstrap=args.bootstrap,
        fresh=args.fresh, command=command_line(args), card_fields=card_fields(args.card_field),
        options=MethodOptions(n_ctx=args.n_ctx, seed=args.seed, bundle=args.bundle, mtlora=args.mtlora,
                              oppu_dir=args.oppu_dir, oppu_train=args.oppu_train, oppu_users=args.oppu_users, oppu_max_items=args.oppu_max_items or 0,
                              max_tokens=args.max_tokens, branches=args.branches, copy_margin=args.copy_margin),
    )
    out = run_eval(cfg)
    rep = out.report
    primary = rep["primary_metric"]
    print(f"{rep['task']} ({rep['split']}): {rep['data']['n_users']} users, {rep['data']['n_queries']} queries; "
          f"{primary}, 95% CI over users")
    for name, e in rep["methods"].items():
        if e["status"] == "ok":
            print(f"  {name:16s} {fmt(e['metrics'][primary])}")
        else:
            print(f"  {name:16s} skipped: {e['reason'].splitlines()[0]}")
    for p in out.paths:
        print(p)
    sys.stdout.flush()
    return 0


def card_fields(pairs: list[str]) -> dict:
    """--card-field NAME=JSON (repeatable) -> {NAME: value}; a malformed one is a usage error."""
    import json

    from p2p_local.errors import UsageError

    out = {}
    for pair in pairs:
        name, eq, value = pair.partition("=")
        try:
            if not eq or not name:
                raise ValueError("no NAME=")
            out[name.strip()] = json.loads(value)
        except ValueError:
            raise UsageError(f"--card-field {pair[:60]!r} is not NAME=JSON", hint="e.g. --card-field examples=1") from None
    return out
