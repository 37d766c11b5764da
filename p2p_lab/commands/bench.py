"""`p2p bench SUITE`: speed and memory figures, JSON plus a readable table."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from p2p_lab.commands import needs_lab


@needs_lab("bench", "measure speed and memory (JSON + table)")
def register(sub: argparse._SubParsersAction) -> None:
    from p2p_lab.bench import SUITES

    p = sub.add_parser("bench", help="measure speed and memory (JSON + table)",
                       epilog="examples:\n  p2p bench runtime --json\n  p2p bench personalize --json\n"
                              "  p2p bench all --json-out reports/bench.json")
    p.add_argument("suite", choices=[*SUITES, "serve", "all"])
    p.add_argument("--json", action="store_true", help="print JSON only")
    p.add_argument("--json-out", type=Path, help="also write the JSON (and a .md table beside it)")
    p.add_argument("--users", type=int, default=3, help="cost: test users timed (default 3)")
    p.add_argument("--oppu-max-items", type=int, default=0,
                   help="cost: OPPU trains on each user's latest N items (default 0: the whole history)")
    p.add_argument("--requests", type=int, default=32,
                   help="serve: requests per concurrency level and path (default 32)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.suite == "serve":  # its own report: JSON, .md and .png (p2p_lab/serve_bench.py)
        from p2p_lab.serve_bench import run as run_serve

        return run_serve(args)
    from p2p_lab.bench import ALL, SUITES, machine, table

    names = list(ALL) if args.suite == "all" else [args.suite]
    results: dict = {}
    for name in names:
        print(f"bench {name} ...", file=sys.stderr, flush=True)
        if name == "cost":
            results[name] = SUITES[name](users=args.users, oppu_max_items=args.oppu_max_items)
        else:
            results[name] = SUITES[name]()
    command = "p2p bench " + args.suite
    if args.suite == "cost":
        command += f" --users {args.users}" + (f" --oppu-max-items {args.oppu_max_items}" if args.oppu_max_items else "")
    results["machine"] = {**machine(), "command": command,
                          "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    text = json.dumps(results, indent=2)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(text + "\n")
        if "history" in results:
            from p2p_lab.bench import plot_history

            stem = args.json_out.stem if args.json_out.stem.endswith("history") else args.json_out.stem + "-history"
            plot_history(results["history"], args.json_out.with_name(stem + ".png"))
        if "strength" in results:
            from p2p_lab.bench import plot_strength

            stem = args.json_out.stem if args.json_out.stem.endswith("strength") else args.json_out.stem + "-strength"
            plot_strength(results["strength"], args.json_out.with_name(stem + ".png"))
        args.json_out.with_suffix(".md").write_text(
            f"# Benchmarks\n\n`{results['machine']['command']}` on {results['machine']['platform']}, "
            f"{results['machine']['cpus']} CPUs, {results['machine']['date']}\n\n{table(results)}\n")
    print(text if args.json else table(results))
    return 0
