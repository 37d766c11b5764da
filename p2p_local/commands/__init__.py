"""CLI subcommand groups. Each module exposes `register(subparsers)`; `p2p_local.cli` wires them.

A command handler takes the parsed `argparse.Namespace` and returns an exit code (0 = success).
"""
