"""`p2p adapter export NAME --to DIR`: a profile's adapter under a readable, stable name, for every llama.cpp tool.

The adapter cache keeps only the newest few files per profile, so a cached path handed to `llama-server`
can vanish; an export is the user's own copy. The GGUF says what it is (`general.name`,
`general.base_model.0.*`, `adapter.lora.task_name`, `adapter.lora.prompt_prefix`), and a README beside
it gives the exact llama.cpp and Ollama commands, with the prompt and the decoding rule, so an answer of
`p2p ask` can be reproduced outside the app.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from p2p_local.commands.args import examples

EPILOG = """examples:
  p2p adapter export me --to ~/adapters                       # ~/adapters/me-<task>.gguf + README
  p2p adapter export alice --to out/ --task {task} --query {query}
  p2p adapter export me --to out/ --format peft               # a PEFT folder (transformers, vLLM) + model card
  p2p adapter export me --to /srv/llama --mode 644            # world-readable, for a server run by another user
"""

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("adapter", help="export a profile's adapter for llama.cpp, llama-server, Ollama or PEFT",
                       epilog=EPILOG.format(**examples()))
    asub = p.add_subparsers(dest="adapter_command", metavar="ACTION")
    p.set_defaults(func=lambda _args: p.print_help() or 2)
    ex = asub.add_parser("export", help="write the profile's adapter under a stable name, with usage notes",
                         epilog=EPILOG.format(**examples()))
    ex.add_argument("profile")
    ex.add_argument("--to", type=Path, required=True, metavar="DIR", help="folder to write into (created)")
    ex.add_argument("--task", help="task card (default: the profile's task)")
    ex.add_argument("--query", help="a query-aware adapter for this query (what `p2p ask QUERY` uses)")
    ex.add_argument("--format", choices=("gguf", "peft"), default="gguf")
    ex.add_argument("--mode", default="600", help="file mode in octal (default 600: private; 644: world-readable)")
    ex.add_argument("--bundle", help="hypernetwork bundle (default: the shipped one)")
    ex.add_argument("--json", action="store_true")
    ex.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from p2p_local.adapter_export import export_adapter
    from p2p_local.personalize import Session

    mode = _mode(args.mode)
    with Session.open(bundle=args.bundle) as s:
        ex = export_adapter(s, args.profile, args.to, task=args.task, query=args.query, fmt=args.format, mode=mode)
    if args.json:
        print(json.dumps({k: str(v) for k, v in ex.__dict__.items()}))
        return 0
    print(f"{args.profile}: {ex.task} adapter -> {ex.path}")
    print(f"  how to use it (llama.cpp, llama-server, Ollama{', PEFT' if args.format == 'peft' else ''}): {ex.readme}")
    return 0


def _mode(text: str) -> int:
    from p2p_local.errors import UsageError

    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777 or not mode & 0o400:
        raise UsageError(f"--mode {text!r} is not a file mode the owner can read", hint="e.g. 600 (private) or 644")
    return mode
