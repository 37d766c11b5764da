"""`p2p models list | prepare | add`: the base models and the profile encoder on this machine; `list`
also shows the hypernetwork bundles and, per task, whether a bundle was trained on the app's prompt."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from p2p_local import models
from p2p_local.errors import ModelError

EPILOG = """examples:
  p2p models prepare                 # the default base (Gemma 3 270M) and the profile encoder, offline
  p2p models list                    # what is known, and whether it is ready
  p2p models add my-instruct.gguf --name mine && p2p chat --model mine   # free chat on your model
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list, prepare and add base models",
                       description="Base models live in the data dir; each is checked by sha256 and architecture.",
                       epilog=EPILOG)
    msub = p.add_subparsers(dest="models_command", metavar="ACTION")

    ls = msub.add_parser("list", help="show known base models and bundles, and whether they are ready",
                         epilog="examples:\n  p2p models list\n  p2p models list --json")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_list)

    prep = msub.add_parser("prepare", help="place and verify a base model and the profile encoder (offline)",
                           epilog="example: p2p models prepare            # the default Gemma 3 270M")
    prep.add_argument("name", nargs="?", default=None, help="model name (default: the default base)")
    prep.add_argument("--quiet", action="store_true")
    prep.set_defaults(func=cmd_prepare)

    add = msub.add_parser("add", help="register another llama.cpp GGUF model (an instruct one: for free chat)",
                          epilog="examples:\n  p2p models add ~/models/qwen2.5-1.5b-instruct-q4_k_m.gguf --name qwen\n"
                                 "  p2p chat --model qwen          # free chat with its chat template\n"
                                 "  p2p models add ~/models/new.gguf --name qwen --replace")
    add.add_argument("file", type=Path)
    add.add_argument("--name", required=True, help="a plain name (never a path), e.g. qwen-0.5b")
    add.add_argument("--replace", action="store_true", help="replace a model you added before under this name")
    add.set_defaults(func=cmd_add)
    p.set_defaults(func=lambda _args: p.print_help() or 2)


def cmd_list(args: argparse.Namespace) -> int:
    rows = [
        {"name": s.name, "arch": s.arch, "file": str(models.model_path(s)), "sha256": s.sha256,
         "status": models.status(s), "template": template_of(s), "description": s.description}
        for s in models.known_models().values()
    ]
    encoder = encoder_row()
    bundles = bundle_rows()
    if args.json:
        print(json.dumps({"models": rows, "encoder": encoder, "bundles": bundles}, indent=2))
    else:
        for r in rows:
            print(f"{r['name']:<16} {r['arch']:<8} {r['status']:<14} {r['description']}")
            print(f"{'':<16} {r['file']}")  # the path llama.cpp's own tools take with -m
            print(f"{'':<16} {TEMPLATE_WORDS[r['template']]}")
        print(f"\nprofile encoder  {encoder['status']:<14} {encoder['id']} (ONNX), what turns a profile into its embedding")
        print(f"{'':<16} {encoder['folder']}")
        for b in bundles:
            print(f"\nbundle {b['name']}{' (in use)' if b['in_use'] else ''}: {b['path']}")
            if b.get("error"):
                print(f"  {b['error']}")
            for t in b["tasks"]:
                print(f"  {t['task']:<24} {CARD_WORDS[t['card']].format(**t)}")
    return 0


TEMPLATE_WORDS = {  # how `list` says a model's chat template (`template_of`)
    "chat": "chat template: yes (free chat with --model uses it)",
    "none": "chat template: none (a pretrained base: task answers, not free chat with --model)",
    "unknown": "chat template: not known until the file is prepared",
}


def template_of(spec: models.ModelSpec) -> str:
    """"chat" (the GGUF holds a chat template), "none", or "unknown" (not verified yet), as `models.verify`
    recorded it (`status` verifies first; parsing the file again would take seconds)."""
    record = models.verified_record(models.model_path(spec)) or {}
    return {True: "chat", False: "none"}.get(record.get("chat_template"), "unknown")


def encoder_row() -> dict[str, str]:
    """The profile encoder: ready, or what is missing (`encoder.check_prepared`, the check `Session.open` makes)."""
    from p2p_local.encoder import ENCODER_ID, check_prepared, encoder_dir

    try:
        check_prepared()
        status = "ready"
    except ModelError:
        status = "not prepared"
    return {"id": ENCODER_ID, "status": status, "folder": str(encoder_dir())}


CARD_WORDS = {  # how `list` says a bundle task's `card_status`
    "same": "trained on this prompt",
    "different": "trained on another prompt (card {trained} vs {current})",
    "untrained": "not trained on this task",
    "unknown": "prompt not recorded (an older bundle)",
    "no card": "no task card of this name here",
}


def bundle_rows() -> list[dict[str, Any]]:
    """Each installed bundle and, per task it names, how its trained card relates to the app's card
    (`bundle.card_status`; "no card" where this p2p-local has no card of that name). Reads manifests only."""
    from p2p_local.bundle import DEFAULT_BUNDLE, card_status, installed_bundles, read_manifest, trained_cards
    from p2p_local.data.format import builtin_card, builtin_cards, canonical_task, card_hash
    from p2p_local.errors import BundleError

    out, seen = [], set()
    for d in installed_bundles():
        row: dict[str, Any] = {"name": d.name, "path": str(d), "in_use": d.name == DEFAULT_BUNDLE and d.name not in seen,
                               "tasks": []}
        seen.add(d.name)
        out.append(row)
        try:
            _, manifest = read_manifest(d)
        except BundleError as e:
            row["error"] = str(e)
            continue
        recorded = trained_cards(manifest) or {}
        names = [canonical_task(t["name"]) for t in manifest.get("tasks", []) if isinstance(t, dict) and isinstance(t.get("name"), str)]
        for task in dict.fromkeys([*names, *recorded]):
            card = builtin_card(task) if task in builtin_cards() else None
            row["tasks"].append({"task": task, "card": card_status(manifest, card) if card else "no card",
                                 "trained": recorded.get(task), "current": card_hash(card) if card else None})
    return out


def cmd_prepare(args: argparse.Namespace) -> int:
    def say(msg: str) -> None:
        if not args.quiet:
            print(f"  {msg}", file=sys.stderr, flush=True)

    spec = models.get_spec(args.name)
    path = models.prepare_base(spec, progress=say)
    print(f"{spec.name}: ready at {path}")
    from p2p_local.encoder import prepare_encoder  # late: only `prepare` needs the encoder

    print(f"profile encoder: ready at {prepare_encoder(progress=say)}")
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    spec = models.add_model(args.file, args.name, progress=lambda m: print(f"  {m}", file=sys.stderr),
                            replace=args.replace)
    print(f"{spec.name}: {spec.arch}, sha256 {spec.sha256[:16]}..., ready")
    return 0
