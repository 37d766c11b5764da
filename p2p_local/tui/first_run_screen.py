"""The first-run screen: where your profile comes from, when you have none of your own (only the demo, or nothing):
your git commits (`p2p profile import NAME --git PATH`), a file (`p2p profile import NAME FILE`) or the demo.

Each is at most two keys away: `g` then Enter imports the current directory's repository, `d` opens the demo.
The import runs in a worker, on its own store connection (a sqlite3 connection belongs to one thread).
"""

from __future__ import annotations

from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Input, Label, OptionList, Static
from textual.widgets.option_list import Option

from p2p_local.errors import P2PError
from p2p_local.tui.session import error_text

OWN_PROFILE = "me"  # the name an import gets unless the user types another


def own_profiles(store) -> list[str]:
    """The user's profiles: every profile but the demo."""
    from p2p_local.demo import DEMO_PROFILE

    return [p.name for p in store.profiles.list_profiles() if p.name != DEMO_PROFILE]


def _first_run_marker(store) -> Path:
    return Path(store.path).parent / ".first-run-done"  # beside the store it is about


def first_run_done(store) -> bool:
    """Whether the first-run screen was answered once (then a demo-only store opens on the chat)."""
    return _first_run_marker(store).exists()


def mark_first_run_done(store) -> None:
    from p2p_local.files import atomic_write

    try:
        atomic_write(_first_run_marker(store), b"")
    except (P2PError, OSError):
        pass  # a read-only data dir: the screen shows again next time, nothing worse


class FirstRunScreen(ModalScreen[str | None]):
    """Import your history from git or a file, or use the demo; dismisses with the profile to open."""

    BINDINGS = [("g", "git", "git"), ("f", "file", "file"), ("d", "demo", "demo"), ("escape", "back", "back")]
    AUTO_FOCUS = "#sources"

    def __init__(self, first: bool = False) -> None:
        """`first`: shown because the user has no profile of their own yet (else: "Import history")."""
        super().__init__()
        self.first = first

    def compose(self) -> ComposeResult:
        # Scrolls on a small terminal (80x24): the form that gets the focus is scrolled into view.
        with VerticalScroll(classes="dialog", id="first-run"):
            yield Label(f"[b]{'Welcome to p2p chat' if self.first else 'Import history'}[/b]  "
                        f"[dim]g · f · d  ·  esc: {'chat with the demo for now' if self.first else 'back'}[/dim]")
            yield Static("Answers are personalized by a LoRA adapter made on this device from your own history; "
                         "nothing leaves it. Where should your profile come from?", classes="about")
            yield OptionList(
                Option(self._line("g", "your commits in a git repository", "git log, no network; "
                                  "your commit subjects"), id="git"),
                Option(self._line("f", "a file", "JSONL, JSON, CSV, MovieLens ratings or a Letterboxd export"),
                       id="file"),
                Option(self._line("d", "the demo", "a real MovieLens user's 119 ratings"), id="demo"),
                id="sources",
            )
            with Horizontal(classes="form -hidden", id="git-form"):
                yield Input(".", placeholder="repository path", id="git-path")
                yield Input(placeholder="author e-mail (default: the repository's user.email)", id="git-author")
            with Horizontal(classes="form -hidden", id="file-form"):
                yield Input(placeholder="path to the file, e.g. ~/Downloads/ratings.csv", id="file-path")
            with Horizontal(classes="form -hidden", id="name-form"):
                yield Label("into profile", classes="field-label")
                yield Input(OWN_PROFILE, id="profile-name")
            yield Static(id="first-run-status")

    @staticmethod
    def _line(key: str, what: str, about: str) -> Content:
        return Content.assemble((f" {key} ", "bold reverse"), "  ", (what, "bold"), "\n      ", (about, "dim"))

    @property
    def profile_name(self) -> str:
        return self.query_one("#profile-name", Input).value.strip() or OWN_PROFILE

    def say(self, text: str, error: bool = False) -> None:
        self.query_one("#first-run-status", Static).update(Content(text).stylize("bold red" if error else "dim"))

    def show_form(self, which: str) -> None:
        """The git or the file form (and the profile name), the other one hidden."""
        for form in ("git", "file"):
            self.query_one(f"#{form}-form").set_class(form != which, "-hidden")
        self.query_one("#name-form").remove_class("-hidden")

    # --- the three ways -----------------------------------------------------------------------------
    def action_git(self) -> None:
        self.show_form("git")
        path = self.query_one("#git-path", Input)
        path.focus()
        path.cursor_position = len(path.value)
        self.say("Enter imports your commits from this repository (author optional).")

    def action_file(self) -> None:
        self.show_form("file")
        self.query_one("#file-path", Input).focus()
        self.say("Type the file's path, then Enter.")

    def action_demo(self) -> None:
        from p2p_local.demo import import_demo

        self.dismiss(import_demo(self.app.store))

    def action_back(self) -> None:
        if isinstance(self.focused, Input):
            self.query_one("#sources", OptionList).focus()
        else:
            self.dismiss(None)

    @on(OptionList.OptionSelected, "#sources")
    def chosen(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        {"git": self.action_git, "file": self.action_file, "demo": self.action_demo}[event.option.id or "demo"]()

    @on(Input.Submitted, "#git-path")
    @on(Input.Submitted, "#git-author")
    def git_submitted(self) -> None:
        repo = self.query_one("#git-path", Input).value.strip() or "."
        author = self.query_one("#git-author", Input).value.strip()
        self.say(f"reading the commits of {repo} …")
        self.run_import(self.profile_name, "git", repo, author)

    @on(Input.Submitted, "#file-path")
    def file_submitted(self) -> None:
        path = self.query_one("#file-path", Input).value.strip()
        if not path:
            self.say("Type the file's path first.", error=True)
            return
        self.say(f"reading {path} …")
        self.run_import(self.profile_name, "file", path, "")

    @work(thread=True, exclusive=True, group="import", exit_on_error=False)
    def run_import(self, name: str, how: str, where: str, author: str) -> None:
        """Import into profile `name` (created if new; removed again if the import fails)."""
        from p2p_local.importers import import_file, import_git
        from p2p_local.store import Store

        app, path = self.app, Path(where).expanduser()
        try:
            with Store(app.store.path) as store:
                created = not store.profiles.profile_exists(name)
                if created:
                    store.profiles.create_profile(name)
                try:
                    if how == "git":
                        result = import_git(store, name, path, authors=[author] if author else ())
                    else:
                        result = import_file(store, name, path)
                    if created and result.imported == 0:
                        raise P2PError(f"nothing to import from {where}", hint="; ".join(result.notes) or None)
                except BaseException:
                    if created:  # all or nothing: a failed import leaves no empty profile behind
                        store.forget_profile(name)
                    raise
        except Exception as e:  # an unreadable path, a broken file: say it, stay on this screen
            app.call_from_thread(self.say, error_text(e), True)
            return
        app.call_from_thread(self.imported, name, result)

    def imported(self, name: str, result) -> None:
        dups = f", {result.duplicates} already there" if result.duplicates else ""
        self.app.notify(f"{result.imported} items ({result.task or 'no task'}{dups})\n" + "\n".join(result.notes),
                        title=f"imported into '{name}'", timeout=8)
        self.dismiss(name)
