"""`p2p personalize NAME`: turn a profile into its LoRA adapter now, and show what it cost."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from p2p_local.commands.args import examples, task_arg


def register(sub: argparse._SubParsersAction) -> None:
    ex = examples()
    p = sub.add_parser(
        "personalize", help="generate a profile's adapter now and print the timings",
        description="profile -> encoder -> hypernetwork -> GGUF LoRA adapter, attached to the base model.",
        epilog=f"examples:\n  p2p personalize alice\n  p2p personalize alice --task {ex['task']} --query {ex['query']} --json\n"
               "  p2p personalize alice --peft-out alice-peft/")
    p.add_argument("profile")
    p.add_argument("--task", type=task_arg, help="task card (default: the profile's task)")
    p.add_argument("--query", help="make the adapter query-aware (retrieval over the history)")
    p.add_argument("--force", action="store_true", help="regenerate even if a cached adapter fits")
    p.add_argument("--peft-out", type=Path, help="also export the adapter in PEFT format (vLLM, transformers)")
    p.add_argument("--bundle", help="hypernetwork bundle (default: the shipped one)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from p2p_local.bundle import untrained_note
    from p2p_local.data.format import FREE_CHAT
    from p2p_local.personalize import Session

    with Session.open(bundle=args.bundle, n_ctx=512) as s:
        r = s.personalize(args.profile, args.task, query=args.query, force=args.force)
        peft_dir = None
        if args.peft_out:
            from p2p_local.adapter_export import write_peft

            peft_dir = write_peft(s, args.profile, r, s.card(r.task), args.peft_out, args.query)
        # the bundle's record of this task's card (Bundle.card_status); "untrained": a user's own task
        card = None if r.task == FREE_CHAT else s.bundle.card_status(s.card(r.task))
        untrained = card == "untrained"
        out = {"profile": args.profile, "task": r.task, "card": card, "items": r.n_items, "adapter": str(r.adapter_path),
               "fingerprint": r.fingerprint, "cached": r.cached, "neutral_bundle": r.neutral, "empty_profile": r.empty,
               "bundle": s.bundle.name, "timings_ms": {k: round(v, 2) for k, v in r.timings_ms.items()}}
        if peft_dir:
            out["peft"] = str(peft_dir)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{args.profile}: {r.n_items:,} {r.task} items -> {r.adapter_path}")
    print("  " + "  ".join(f"{k[:-3]} {v:.1f} ms" for k, v in out["timings_ms"].items()) + ("  (cached)" if r.cached else ""))
    if r.neutral:
        print("  note: the loaded bundle is the neutral stand-in; its adapter changes nothing yet")
    if r.empty:
        print("  note: the profile has no items for this task: this is the hypernetwork's neutral adapter")
    if untrained:
        print(f"  note: {untrained_note(r.task)}")
    if peft_dir:
        print(f"  PEFT export: {peft_dir}")
    return 0
