"""`p2p`: the command line. Subcommands read like sentences: `p2p profile import ratings.csv`.

Each command group lives in `p2p_local/commands/<group>.py` and registers itself here. Groups from
other installed packages (`p2p_lab`'s eval, bench and data) arrive through the `p2p_local.commands`
entry-point group, so this package never imports them.
Exit codes: 0 ok, 1 generic error, 2 usage, then one per error family (see `errors.py`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sqlite3
import sys
import tempfile
import time
import traceback
from contextlib import suppress
from importlib.metadata import entry_points
from pathlib import Path

from p2p_local import __version__
from p2p_local.commands.args import Parser, examples
from p2p_local.errors import InternalError, P2PError, UsageError

# Order = order in `p2p --help`.
GROUPS = ("models", "profile", "personalize", "ask", "chat", "serve", "adapter", "hook")
PLUGIN_GROUP = "p2p_local.commands"

EPILOG = """examples:
  p2p models prepare                      # place and verify the default base model and encoder
  p2p profile create alice
  p2p profile import alice ratings.csv    # MovieLens-style ratings, CSV / JSON / JSONL
  p2p personalize alice                   # profile -> LoRA adapter, with timings
  p2p ask {query} --task {task}   # the task frames it
  p2p chat                                # the terminal chat
"""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; `only`: just that built-in group (what running one of its commands needs: the
    commit hook starts `p2p hook run` at every `git commit`, and every group imports its own modules)."""
    parser = Parser(prog="p2p", epilog=EPILOG.format(**examples()),
                    description="On-device LLM personalization: your history -> a LoRA adapter -> a local model.")
    parser.add_argument("--version", action="version", version=f"p2p-local {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in GROUPS if only is None else (only,):
        importlib.import_module(f"p2p_local.commands.{group}").register(sub)
    for ep in entry_points(group=PLUGIN_GROUP) if only is None else ():
        try:
            register = ep.load()
        except ImportError:
            continue  # its package's extra is not installed: the command is simply absent
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Whatever happens, the user sees one clear line, never a traceback.

    P2PErrors print their message and hint and exit with their family's code; anything else is a bug:
    one line, the path of a log holding the traceback, how to report it, exit 70. `P2P_DEBUG=1`
    re-raises instead, for developers.
    """
    # Whatever we create is the user's alone (0700 folders, 0600 files), whatever their umask says;
    # `--mode` options widen an export on request. Restored on return (tests call main in-process).
    umask = os.umask(0o077)
    try:
        _safe_stdout()
        argv = check_argv(sys.argv[1:] if argv is None else list(argv))
        parser = build_parser(argv[0] if argv and argv[0] in GROUPS else None)
        args = parser.parse_args(argv)  # a usage error exits 2 here (SystemExit), after printing it
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except P2PError as e:
        _say(f"error: {e}")
        return e.exit_code
    except sqlite3.DatabaseError as e:  # the store damaged past what opening it reads: a store error, not a bug
        from p2p_local.paths import store_path
        from p2p_local.store.connection import damaged

        err = damaged(store_path(), e)
        _say(f"error: {err}")
        return err.exit_code
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except BrokenPipeError:
        # `p2p ... | head`: the reader left; not an error worth a message. Keep Python's exit-time
        # flush of stdout from failing again.
        _silence_stdout()
        return 141
    except Exception as e:
        if os.environ.get("P2P_DEBUG") == "1":
            raise
        return _report_crash(e)
    finally:
        os.umask(umask)


def check_argv(argv: list[str]) -> list[str]:
    """Arguments must be text: bytes that are not UTF-8 arrive as lone surrogates and would fail deep
    inside (tokenizer, SQLite) with a traceback. Refuse them here, by position."""
    for i, arg in enumerate(argv, 1):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(f"argument {i} is not valid UTF-8 text: {arg!a}",
                             hint="pass text and file names as UTF-8") from None
        if "\x00" in arg:
            raise UsageError(f"argument {i} holds a NUL character", hint="remove it") from None
    return argv


def _safe_stdout() -> None:
    """Text from files (lone surrogates in JSON) must print, not crash: escape what cannot be encoded."""
    with suppress(AttributeError, OSError, ValueError):  # no reconfigure: not a text stream (a test's)
        sys.stdout.reconfigure(errors="backslashreplace")


def _say(msg: str) -> None:
    """Print to stderr whatever the text holds (lone surrogates from undecodable argv, ...)."""
    enc = getattr(sys.stderr, "encoding", None) or "utf-8"
    with suppress(OSError, ValueError):  # stderr closed: nothing more we can do
        sys.stderr.write(msg.encode(enc, errors="backslashreplace").decode(enc, errors="replace") + "\n")
        sys.stderr.flush()


def _silence_stdout() -> None:
    with suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _report_crash(e: BaseException) -> int:
    """The top-level guard's message: one line, where the traceback went, how to report it."""
    what = f"{type(e).__name__}: {e}"
    if len(what) > 200:
        what = what[:200] + "..."
    log = _write_crash_log(e)
    _say(f"error: internal error ({what})")
    where = f"the details are in {log}" if log else "set P2P_DEBUG=1 to see the details"
    _say(f"  hint: this is a bug in p2p-local {__version__}; {where}. "
         "Please report it with that file attached (it holds the traceback, not your profile).")
    return InternalError.exit_code


def _write_crash_log(e: BaseException) -> Path | None:
    """Write the traceback to `<data dir>/logs/` (or the temp dir when that is not writable)."""
    from p2p_local.files import atomic_write  # late: the guard must work even if imports are broken

    text = (f"p2p-local {__version__}, python {sys.version.split()[0]}, {time.strftime('%Y-%m-%dT%H:%M:%S')}\n"
            f"command: {_command_name()}\n\n" + "".join(traceback.format_exception(e)))
    name = f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for folder in _log_dirs():
        with suppress(P2PError, OSError):
            return atomic_write(folder / name, text.encode("utf-8", errors="backslashreplace"))
    return None


def _log_dirs() -> list[Path]:
    dirs = []
    with suppress(Exception):  # the data dir itself may be what is broken
        from p2p_local.paths import data_dir, private_dir
        dirs.append(private_dir(data_dir() / "logs"))
    dirs.append(Path(tempfile.gettempdir()))
    return dirs


def _command_name() -> str:
    """The subcommand only: arguments may hold private text (queries, names)."""
    words = [a for a in sys.argv[1:3] if not a.startswith("-")]
    return "p2p " + " ".join(w for w in words if w.isidentifier())


if __name__ == "__main__":
    sys.exit(main())
