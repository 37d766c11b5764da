"""`p2p profile ...`: create, fill, inspect, edit, export and forget the private profiles.

Everything is stored in the SQLite file under the data dir (`p2p_local.store`). `--json` prints
machine-readable output for scripts. Errors exit with their family's code (StoreError 7, DataError 6).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

from p2p_local.commands.args import examples
from p2p_local.data.records import parse_time
from p2p_local.errors import DataError, StoreError, UsageError
from p2p_local.files import PRIVATE_FILE, atomic_write, refuse_special
from p2p_local.importers import FORMATS, MAX_FIELD_CHARS, check_label, import_file, import_git
from p2p_local.store import Store, StoredItem
from p2p_local.store.records import check_name
from p2p_local.terminal import json_text, shown

EPILOG = """examples:
  p2p profile create alice --task {task}
  p2p profile create me --task-card my-task.json          # a task of your own (docs/DATA.md: "Your own task")
  p2p profile import alice ratings.csv --user 42          # MovieLens (movies.csv beside it)
  p2p profile import bob history.jsonl                    # {{"user_id", "items": [{{"input", "output", "time"}}]}}
  p2p profile add alice --input {query} --output 5
  p2p profile show alice --items 20
  p2p profile edit alice 17 --output 4
  p2p profile export alice -o alice.json
  p2p profile forget alice --yes                          # items, history, adapters, chats: all gone
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    ex = examples()
    parser = subparsers.add_parser(
        "profile",
        help="create, import, inspect, edit, export and forget profiles",
        description="Your private profiles: the history a personalized adapter is made from.",
        epilog=EPILOG.format(**ex),
    )
    sub = parser.add_subparsers(dest="profile_command", metavar="ACTION")
    parser.set_defaults(func=lambda _args: parser.print_help() or 2)
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="machine-readable output")

    def add(name: str, func, help: str, epilog: str, *positional: str) -> argparse.ArgumentParser:
        """An action, with its positional arguments (`name`, `item_id`: validated by _POSITIONAL)."""
        p = sub.add_parser(name, help=help, description=help, parents=[as_json],
                           epilog="example:\n  " + epilog)
        p.set_defaults(func=func)
        for dest in positional:
            p.add_argument(dest, type=_POSITIONAL[dest])
        return p

    p = add("create", cmd_create, "create an empty profile", f"p2p profile create alice --task {ex['task']}", "name")
    p.add_argument("--task", type=_task_arg, help=f"default task of its items (e.g. {ex['task']})")
    p.add_argument("--task-card", type=Path, metavar="FILE",
                   help="a task card JSON of your own (docs/DATA.md): stored in this data dir under its name, "
                        "which becomes the profile's task and names it in every command")

    add("list", cmd_list, "list profiles with their item counts", "p2p profile list --json")

    p = add("show", cmd_show, "show a profile and its most recent items", "p2p profile show alice --items 20", "name")
    p.add_argument("--items", type=_count_arg, default=10, metavar="N", help="how many recent items (default 10)")
    p.add_argument("--task", type=_task_arg, help="only items of this task")

    p = add("add", cmd_add, "add one item", 'p2p profile add alice --input "Heat (1995) | Genres: Action" --output 5',
            "name")
    p.add_argument("--input", type=_text_arg, required=True)
    p.add_argument("--output", type=_text_arg, required=True)
    p.add_argument("--task", type=_task_arg, help="default: the profile's task")
    p.add_argument("--time", help="unix seconds or ISO 8601 (default: now)")
    p.add_argument("--meta", help="a JSON object of extra fields")

    p = add("import", cmd_import, "import items from a file or a git repository (one transaction: all or nothing; "
            "items already there are not added again)",
            "p2p profile import alice ~/Downloads/ml-latest-small/ratings.csv --user 1\n"
            "  p2p profile import me --git ~/src/project --author me@example.org --since 2023-01-01 --create\n"
            "  p2p profile import me letterboxd/ratings.csv --movies movies.csv --dry-run", "name")
    p.add_argument("file", type=Path, nargs="?", help="the file to import (or --git PATH)")
    p.add_argument("--format", choices=FORMATS, default="auto")
    p.add_argument("--movies", type=Path, help="MovieLens movies.csv (default: beside the ratings file; "
                                                 "for a Letterboxd export: where genres come from)")
    p.add_argument("--git", type=Path, metavar="PATH",
                   help="import your own commits of a local git repository (as commit subjects)")
    p.add_argument("--author", action="append", metavar="EMAIL|NAME",
                   help="with --git: whose commits (repeatable; default: the repository's user.email)")
    p.add_argument("--since", metavar="DATE", help="with --git: only commits since DATE (2024-01-01, '6 months ago')")
    p.add_argument("--dry-run", action="store_true", help="parse and show counts and three sample items; write nothing")
    p.add_argument("--user", help="which user of a multi-user file")
    p.add_argument("--task", type=_task_arg,
                   help="task for items that name none (default: the file's, else the profile's)")
    p.add_argument("--create", action="store_true", help="create the profile if it does not exist")

    p = add("edit", cmd_edit, "change an item (the old version stays in its history)",
            "p2p profile edit alice 17 --output 4", "name", "item_id")
    p.add_argument("--input", type=_text_arg)
    p.add_argument("--output", type=_text_arg)
    p.add_argument("--task", type=_task_arg)
    p.add_argument("--time", help="unix seconds or ISO 8601")

    add("delete", cmd_delete, "delete an item", "p2p profile delete alice 17", "name", "item_id")
    add("history", cmd_history, "an item's change history", "p2p profile history alice 17", "name", "item_id")

    p = add("forget", cmd_forget, "delete a profile and everything made from it", "p2p profile forget alice --yes",
            "name")
    p.add_argument("--yes", action="store_true", help="do not ask (required when stdin is not a terminal)")

    p = add("export", cmd_export, "write the profile in the generic per-user JSON format",
            "p2p profile export alice -o alice.json", "name")
    p.add_argument("-o", "--output", type=Path, help="file to write (default: stdout); created mode 0600")
    p.add_argument("--mode", type=_mode_arg, default=PRIVATE_FILE, metavar="OCTAL",
                   help="file mode of the export (default 600: only you can read it)")


# --- handlers ------------------------------------------------------------------------------------
def cmd_create(args: argparse.Namespace) -> int:
    from p2p_local.data.format import TaskCard

    card = TaskCard.load(args.task_card) if args.task_card is not None else None  # TaskCard's rules first
    if card is not None and args.task is not None and args.task != card.name:
        raise UsageError(f"--task {args.task} names another task than the card ({card.name})",
                         hint="drop --task: the card's name is the profile's task")
    with Store() as s, s.transaction():  # the card and the profile together, or neither
        if card is not None:
            s.task_cards.save_task_card(card)
        prof = s.profiles.create_profile(args.name, task=card.name if card is not None else args.task)
    if args.json:
        return _print_json(asdict(prof))
    print(f"created profile {prof.name!r}" + (f" (task {prof.task})" if prof.task else ""))
    if card is not None:
        print(f"task card {card.name!r} stored in this data dir: --task {card.name} finds it in every command")
    print(f"next: p2p profile import {prof.name} FILE   or   p2p profile add {prof.name} --input ... --output ...")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with Store() as s:
        profiles = s.profiles.list_profiles()
        made = {p.name: bool(s.adapters.all(p.name)) for p in profiles}
    if args.json:
        return _print_json([asdict(p) for p in profiles])
    if not profiles:
        print("no profiles yet: p2p profile create NAME")
        return 0
    rows = [("NAME", "TASK", "ITEMS", "ADAPTER", "UPDATED")]
    rows += [(p.name, shown(p.task or "-"), str(p.n_items),
              "none yet" if not made[p.name] else ("stale" if p.adapter_stale else "ok"), _date(p.updated, True))
             for p in profiles]
    _print_table(rows)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with Store() as s:
        prof = s.profiles.get_profile(args.name)
        tasks = s.profiles.task_counts(args.name)
        adapters = s.adapters.all(args.name)
        n_conv = len(s.conversations.all(args.name))
        items = s.profiles.items(args.name, task=args.task, limit=max(args.items, 0))
    if args.json:
        return _print_json({"profile": asdict(prof), "tasks": tasks, "adapters": [asdict(a) for a in adapters],
                            "conversations": n_conv, "items": [asdict(i) for i in items]})
    adapter = "none yet" if not adapters else ("stale (items changed since)" if prof.adapter_stale else "up to date")
    print(f"profile {prof.name}")
    print(f"  task:          {shown(prof.task or '-')}")
    print(f"  items:         {prof.n_items:,}" + (f"  ({', '.join(f'{shown(t)}: {n:,}' for t, n in tasks.items())})" if tasks else ""))
    print(f"  adapter:       {adapter}")
    print(f"  conversations: {n_conv}")
    print(f"  created:       {_date(prof.created, True)}   updated: {_date(prof.updated, True)}")
    if items:
        print(f"\nmost recent {len(items)} item(s), oldest first:")
        _print_table([("ID", "TIME", "TASK", "INPUT", "OUTPUT")] + [_item_row(i) for i in items])
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    meta = _json_object(args.meta, "--meta") if args.meta else None
    with Store() as s:
        check_label(args.task or s.profiles.get_profile(args.name).task, args.output, s)
        item = s.profiles.add_item(args.name, args.task, args.input, args.output, time=_time_arg(args.time), meta=meta)
    if args.json:
        return _print_json(asdict(item))
    print(f"added item {item.id} to {args.name!r} (task {item.task})")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    if (args.file is None) == (args.git is None):
        raise UsageError("give either a FILE or --git PATH", hint="p2p profile import NAME FILE   or   "
                                                                 "p2p profile import NAME --git PATH")
    if args.git is None and (args.author or args.since):
        raise UsageError("--author and --since go with --git", hint="p2p profile import NAME --git PATH --author EMAIL")
    with _import_store(args.dry_run) as s:
        if not s.profiles.profile_exists(args.name) and not args.create:
            try:
                s.profiles.get_profile(args.name)
            except StoreError as e:  # keep its did-you-mean, offer --create
                raise StoreError(e.args[0], hint=f"{e.hint}; or import with --create") from None
        # --create: the profile is made in the import's own transaction (a failed or killed import
        # leaves no empty profile behind).
        if args.git is not None:
            result = import_git(s, args.name, args.git, authors=args.author or (), since=args.since,
                                dry_run=args.dry_run, progress=_progress("commits read"), create=args.create)
        else:
            result = import_file(s, args.name, args.file, args.format, user=args.user, movies=args.movies,
                                 task=args.task, dry_run=args.dry_run, progress=_stage_progress(args.file),
                                 create=args.create)
    if args.json:
        return _print_json(asdict(result))
    user = f", user {result.user_id}" if result.user_id else ""
    dups = f", {result.duplicates:,} already there" if result.duplicates else ""
    what = f"{result.imported:,} items into {args.name!r} ({result.format}{user}; task {result.task or '-'}{dups})"
    if result.dry_run:
        print(f"dry run: would import {what}; nothing written")
    else:
        print(f"imported {what} in {result.parse_seconds + result.write_seconds:.2f} s")
    for note in result.notes:
        print(f"  {note}")
    if result.dry_run and result.samples:
        print(f"first {len(result.samples)} of them:")
        for it in result.samples:
            when = _date(it["time"]) if it["time"] is not None else "-"
            print(f"  {when}  {_short(it['input'], 70)}  ->  {_short(it['output'], 50)}")
    return 0


class _NoProfiles:
    """What a dry run reads on a machine with no store yet: no profiles (nothing is created to find out)."""

    def profile_exists(self, name: str) -> bool:
        return False

    def get_profile(self, name: str) -> Any:
        raise StoreError(f"no profile named {name!r}", hint=f"create it: p2p profile create {name}")


class _NoStore:
    profiles = _NoProfiles()


def _import_store(dry_run: bool) -> Any:
    """The store an import reads and writes; a dry run opens it read-only, or none when there is none
    yet (so a dry run writes nothing at all: not the data dir, not the store)."""
    from p2p_local import paths

    if not dry_run:
        return Store()
    path = paths.store_path(create=False)
    return Store(path, readonly=True, snapshot=True) if path.is_file() else nullcontext(_NoStore())


LARGE_IMPORT_BYTES = 4 << 20  # files above this say what they are doing (on a terminal)


def _stage_progress(path: Path):
    """Stage lines on stderr for a large file import (a terminal only: logs and pipes stay clean)."""
    try:
        large = Path(path).stat().st_size > LARGE_IMPORT_BYTES
    except OSError:
        return None  # the importer says what is wrong with the path
    if not large or not sys.stderr.isatty():
        return None
    return lambda stage: print(f"  {stage}…", file=sys.stderr, flush=True)


def _progress(what: str):
    """Progress on stderr for long imports (a terminal only: logs and pipes stay clean)."""
    if not sys.stderr.isatty():
        return None

    def say(n: int) -> None:
        end = "\n" if n < 0 else ""  # -1: done
        print(f"\r  {abs(n):,} {what}", end=end, file=sys.stderr, flush=True)

    return say


def cmd_edit(args: argparse.Namespace) -> int:
    fields = {k: getattr(args, k) for k in ("input", "output", "task") if getattr(args, k) is not None}
    if args.time is not None:
        fields["time"] = _time_arg(args.time)
    if not fields:
        print("error: nothing to change: pass --input, --output, --task or --time", file=sys.stderr)
        return 2
    with Store() as s:
        old = _item_of(s, args.name, args.item_id)
        if "output" in fields or "task" in fields:
            check_label(fields.get("task", old.task), fields.get("output", old.output), s)
        item = s.profiles.edit_item(args.item_id, **fields)
    if args.json:
        return _print_json(asdict(item))
    if item == old:  # the store records nothing for a no-op edit: say so rather than "edited"
        print(f"item {item.id} of {args.name!r} already has these values: nothing changed")
        return 0
    print(f"edited item {item.id} of {args.name!r} (see: p2p profile history {args.name} {item.id})")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with Store() as s:
        _item_of(s, args.name, args.item_id)
        s.profiles.delete_item(args.item_id)
    if args.json:
        return _print_json({"deleted": args.item_id})
    print(f"deleted item {args.item_id} of {args.name!r}")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    with Store() as s:
        history = s.profiles.item_history(args.item_id, profile=args.name)
        if not history:
            raise StoreError(f"profile {args.name!r} has no item {args.item_id}",
                             hint=f"see ids with: p2p profile show {args.name}")
    if args.json:
        return _print_json([asdict(h) for h in history])
    for h in history:
        state = h.new if h.new is not None else h.old
        print(f"{_date(h.at, True)}  {h.action:6}  {_short(state['input'], 50)} -> {_short(state['output'], 30)}")
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    with Store() as s:
        prof = s.profiles.get_profile(args.name)
        if not args.yes and not confirm_forget(prof.name, prof.n_items):
            print("not forgotten", file=sys.stderr)
            return 1
        report = s.forget_profile(prof.name)
    if args.json:
        return _print_json(asdict(report))
    print(f"forgot {prof.name!r}: {report.items} items, {report.adapters} adapters ({report.files_removed} files), "
          f"{report.conversations} conversations")
    return 0


def confirm_forget(name: str, n_items: int) -> bool:
    """Ask on a terminal; refuse outright when stdin is not one (scripts must say --yes)."""
    if not sys.stdin or not sys.stdin.isatty():
        raise StoreError(f"refusing to forget {name!r} without confirmation (stdin is not a terminal)",
                         hint=f"p2p profile forget {name} --yes")
    print(f"This deletes profile {name!r}, its {n_items:,} items, their history, adapters and conversations.")
    print("Type the profile name to confirm: ", end="", flush=True)
    return sys.stdin.readline().strip() == name


def cmd_export(args: argparse.Namespace) -> int:
    with Store() as s:
        data = s.profiles.export_profile(args.name)
    text = json.dumps(data, ensure_ascii=False) + "\n"  # one line: a valid .json and .jsonl file
    if args.output is None or str(args.output) == "-":
        sys.stdout.write(json_text(data) + "\n")  # the same values; nothing a terminal acts on
        return 0
    out = _export_target(args.output)
    # Atomic: the old file stays whole until the new one is complete (a full disk loses nothing).
    # Private data: the file is created 0600, whatever the umask, unless --mode says otherwise.
    atomic_write(out, text.encode("utf-8"), mode=args.mode)
    if args.json:
        return _print_json({"profile": args.name, "path": str(out), "items": len(data["items"])})
    print(f"wrote {len(data['items']):,} items of {args.name!r} to {out}", file=sys.stderr)
    return 0


def _export_target(path: Path) -> Path:
    """The export's file: in an existing folder, not a folder itself (both usage errors, exit 2)."""
    refuse_special(path, UsageError)  # `-o /dev/null` as root would become a file holding the profile
    if path.is_dir():
        raise UsageError(f"--output {path} is a directory", hint=f"give a file name, e.g. {path / 'profile.json'}")
    if not path.parent.is_dir():
        raise UsageError(f"--output {path}: folder {path.parent} does not exist", hint="create it first")
    return path


# --- argument types: a bad value is a usage error (exit 2) naming the argument ---------------------
MAX_SHOW = 100_000  # items `show` lists at most
MAX_ID = 2**63 - 1  # SQLite's INTEGER


def _name_arg(value: str) -> str:
    try:
        return check_name(value)
    except StoreError as e:
        raise argparse.ArgumentTypeError(f"{e.args[0]} ({e.hint})") from None


def _task_arg(value: str) -> str:
    if not value.strip() or len(value) > 64 or any(c.isspace() for c in value.strip()):
        raise argparse.ArgumentTypeError(f"invalid task {value[:70]!r}: a task is a name like my-ratings")
    return value.strip()


def _count_arg(value: str) -> int:
    n = _int_arg(value)
    if not 0 <= n <= MAX_SHOW:
        raise argparse.ArgumentTypeError(f"{value[:30]} is outside 0..{MAX_SHOW:,}")
    return n


def _id_arg(value: str) -> int:
    n = _int_arg(value)
    if not 1 <= n <= MAX_ID:
        raise argparse.ArgumentTypeError(f"{value[:30]} is not an item id (a positive integer)")
    return n


def _int_arg(value: str) -> int:
    if len(value) > 30:  # int() of a 5000-digit string raises, and no count is that long
        raise argparse.ArgumentTypeError(f"{value[:30]}... is not a usable integer")
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None


def _text_arg(value: str) -> str:
    if len(value) > MAX_FIELD_CHARS:
        raise argparse.ArgumentTypeError(f"{len(value):,} characters, at most {MAX_FIELD_CHARS:,}")
    if "\x00" in value:
        raise argparse.ArgumentTypeError("holds a NUL character")
    return value


def _mode_arg(value: str) -> int:
    try:
        mode = int(value, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an octal file mode like 600 or 644") from None
    if not 0 <= mode <= 0o777 or not mode & 0o400:
        raise argparse.ArgumentTypeError(f"{value!r}: a mode from 400 to 777 that lets you read the file")
    return mode


_POSITIONAL = {"name": _name_arg, "item_id": _id_arg}


# --- helpers -------------------------------------------------------------------------------------
def _item_of(s: Store, name: str, item_id: int) -> StoredItem:
    prof = s.profiles.get_profile(name)
    try:
        item = s.profiles.get_item(item_id)
    except StoreError:
        item = None
    if item is None or item.profile_id != prof.id:
        raise StoreError(f"profile {name!r} has no item {item_id}", hint=f"see ids with: p2p profile show {name}")
    return item


def _time_arg(value: str | None) -> float | None:
    try:
        return parse_time(value)
    except ValueError as e:
        raise DataError(f"--time: {e}") from None


def _json_object(text: str, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{what}: invalid JSON ({e.msg})") from None
    except (RecursionError, ValueError) as e:  # nesting past the recursion limit, 5000-digit integers
        raise DataError(f"{what}: unusable JSON ({type(e).__name__})", hint="a small flat object") from None
    if not isinstance(obj, dict):
        raise DataError(f"{what}: must be a JSON object like '{{\"source\": \"notes\"}}'")
    return obj


def _print_json(obj: Any) -> int:
    print(json_text(obj, default=str))
    return 0


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _item_row(i: StoredItem) -> tuple[str, ...]:
    return (str(i.id), _date(i.time) if i.time is not None else "-", _short(i.task, 40), _short(i.input, 60),
            _short(i.output, 30))


def _short(text: str, n: int) -> str:
    text = " ".join(shown(text).split())  # user data: no escape sequences reach the terminal
    return text if len(text) <= n else text[: n - 1] + "…"


def _date(t: float, with_time: bool = False) -> str:
    return time.strftime("%Y-%m-%d %H:%M" if with_time else "%Y-%m-%d", time.localtime(t))
