"""`p2p data prepare | stats | import-lamp`: the per-user task sets used for training and evaluation."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from p2p_lab.commands import needs_lab
from p2p_local.errors import DataError


@needs_lab("data", "prepare and inspect the per-user task sets")
def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data",
        help="prepare and inspect the per-user task sets",
        description="Converts the real per-user data in ../shared/data into user-disjoint "
        "train/val/test/ood sets under the cache dir (see docs/DATA.md).",
    )
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")

    prep = dsub.add_parser(
        "prepare",
        help="build every task set (or --tasks ...) from ../shared/data",
        epilog="example: p2p data prepare --tasks movielens-rating --seed 0",
    )
    prep.add_argument("--tasks", nargs="+", metavar="TASK", help="task names (default: all)")
    prep.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    prep.add_argument(
        "--no-encoder", action="store_true", help="cluster users on profile features, not MiniLM embeddings"
    )
    prep.add_argument("--quiet", action="store_true", help="no progress on stderr")
    prep.add_argument("--force", action="store_true",
                      help="rebuild even the sets that are current (same sources, seed, card and code)")
    prep.set_defaults(func=cmd_prepare)

    st = dsub.add_parser("stats", help="users and samples per split, and the bad-input counts")
    st.add_argument("--tasks", nargs="+", metavar="TASK", help="task names (default: all)")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=cmd_stats)

    imp = dsub.add_parser(
        "import-lamp",
        help="convert a LaMP questions/outputs pair into the generic users JSONL",
        epilog="example: p2p data import-lamp dev_questions.json dev_outputs.json -o lamp3-dev.jsonl",
    )
    imp.add_argument("questions", type=Path)
    imp.add_argument("outputs", type=Path, nargs="?", default=None)
    imp.add_argument("--task", help="LaMP task (e.g. LaMP_3) when there is no outputs file")
    imp.add_argument("-o", "--out", type=Path, required=True, help="users JSONL to write (card beside it)")
    imp.set_defaults(func=cmd_import_lamp)
    p.set_defaults(func=lambda _args: p.print_help() or 2)


def _tasks(names: list[str] | None) -> list[str]:
    from p2p_lab.data.prepare import TASKS

    names = [t for n in names for t in n.split(",") if t] if names else list(TASKS)  # "a b" or "a,b"
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise DataError(f"unknown task(s): {', '.join(unknown)}", hint=f"known tasks: {', '.join(TASKS)}")
    return names


def cmd_prepare(args: argparse.Namespace) -> int:
    from p2p_lab.data.prepare import default_embedder, is_current, prepare_task, sources_fingerprint

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    tasks = _tasks(args.tasks)
    t0 = time.perf_counter()
    if not args.force:  # `make eval` prepares first: a current set is kept, not rebuilt (minutes for commits)
        sources = sources_fingerprint()
        current = [t for t in tasks if is_current(t, args.seed, sources)]
        for t in current:
            log(f"[{t}] current (same sources, seed, card and code): kept; --force rebuilds it")
        tasks = [t for t in tasks if t not in current]
        if not tasks:
            print(f"all {len(current)} task sets current: nothing to do")
            return 0
    embed, name, failed = None, "", []
    if not args.no_encoder:
        embed, name = default_embedder(log)  # load once for all tasks
    for task in tasks:
        try:
            prepare_task(task, seed=args.seed, embed=embed, log=log, embed_name=name)
        except DataError as e:  # one unusable source file must not stop the other tasks
            print(f"error: {task}: {e}", file=sys.stderr)
            failed.append(task)
    print(f"prepared {len(tasks) - len(failed)}/{len(tasks)} task sets in {time.perf_counter() - t0:.1f} s")
    return DataError.exit_code if failed else 0


def cmd_stats(args: argparse.Namespace) -> int:
    from p2p_lab.data.prepare import SPLITS, read_stats, task_dir

    tasks = _tasks(args.tasks)
    all_stats = {t: read_stats(t) for t in tasks}
    if args.json:
        print(json.dumps(all_stats, indent=2))
        return 0
    for task, s in all_stats.items():
        if s is None:
            print(f"{task}: not prepared (run `p2p data prepare --tasks {task}`)")
            continue
        print(
            f"{task}  (seed {s['seed']}, OOD clustered on {s['split_info'].get('ood_space')}) {task_dir(task)}"
        )
        for name in SPLITS:
            sp = s["splits"][name]
            print(f"  {name:<6} {sp['users']:>5} users {sp['samples']:>7} samples {sp['items']:>7} items")
        bad = {k: v for k, v in s["conversion"].items() if v and k not in ("users", "items", "rows_read")}
        print(
            "  input: " + ", ".join(f"{k} {v}" for k, v in bad.items()) if bad else "  input: nothing skipped"
        )
    return 0


def cmd_import_lamp(args: argparse.Namespace) -> int:
    from p2p_lab.data.lamp import import_lamp
    from p2p_local.data.format import write_users_jsonl

    card, users = import_lamp(args.questions, args.outputs, args.task)
    n = write_users_jsonl(args.out, users)
    card_path = args.out.with_name(args.out.stem + ".card.json")
    card.save(card_path)
    print(f"{card.name}: {n} users -> {args.out} (card: {card_path})")
    return 0
