"""`p2p models list | prepare | add`: the base models and the profile encoder on this machine."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from p2p_local import models

EPILOG = """examples:
  p2p models prepare                 # the default base (Gemma 3 270M) and the profile encoder, offline
  p2p models list                    # what is known, and whether it is ready
  p2p models add my-instruct.gguf --name mine && p2p chat --model mine   # free chat on your model
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list, prepare and add base models",
                       description="Base models live in the data dir; each is checked by sha256 and architecture.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    msub = p.add_subparsers(dest="models_command", metavar="ACTION")

    ls = msub.add_parser("list", help="show known base models and whether they are ready",
                         epilog="examples:\n  p2p models list\n  p2p models list --json",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
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
                                 "  p2p models add ~/models/new.gguf --name qwen --replace",
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    add.add_argument("file", type=Path)
    add.add_argument("--name", required=True, help="a plain name (never a path), e.g. qwen-0.5b")
    add.add_argument("--replace", action="store_true", help="replace a model you added before under this name")
    add.set_defaults(func=cmd_add)
    p.set_defaults(func=lambda _args: p.print_help() or 2)


def cmd_list(args: argparse.Namespace) -> int:
    rows = [
        {"name": s.name, "arch": s.arch, "file": str(models.model_path(s)), "sha256": s.sha256,
         "status": models.status(s), "description": s.description}
        for s in models.known_models().values()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['name']:<16} {r['arch']:<8} {r['status']:<14} {r['description']}")
            print(f"{'':<16} {r['file']}")  # the path llama.cpp's own tools take with -m
    return 0


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
