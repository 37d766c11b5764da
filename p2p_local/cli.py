"""`p2p`: the command line. Subcommands read like sentences: `p2p profile import ratings.csv`.

Each command group lives in `p2p_local/commands/<group>.py` and registers itself here.
Exit codes: 0 ok, 1 generic error, 2 usage, then one per error family (see `errors.py`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from p2p_local import __version__
from p2p_local.errors import P2PError

# Order = order in `p2p --help`.
GROUPS = ("models", "profile", "personalize", "ask", "chat", "data", "bench", "eval")

EPILOG = """examples:
  p2p models prepare                      # place and verify the default base model and encoder
  p2p profile create alice
  p2p profile import alice ratings.csv    # MovieLens-style ratings, CSV / JSON / JSONL
  p2p personalize alice                   # profile -> LoRA adapter, with timings
  p2p ask "Movie: Heat (1995) | Genres: Action|Crime" --task movielens-rating
  p2p chat                                # the terminal chat
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2p",
        description="On-device LLM personalization: your history -> a LoRA adapter -> a local model.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"p2p-local {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in GROUPS:
        try:
            module = importlib.import_module(f"p2p_local.commands.{group}")
        except ModuleNotFoundError as e:
            if e.name == f"p2p_local.commands.{group}":
                continue  # group not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except P2PError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
