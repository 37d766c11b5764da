"""The profile panel: what the adapter is built from (items, tasks, last change), the items, the summary,
and the exact text the encoder sees.

Add an item (type its input and output, Enter) or forget one (select it, Delete). Every change makes
the cached adapter stale; closing the panel makes a new one. `e` exports the adapter (what
`p2p adapter export` does); `ctrl+x` forgets the whole profile, after its name is typed to confirm.
"""

from __future__ import annotations

import time
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.content import Content
from textual.screen import Screen
from textual.widgets import Button, DataTable, Footer, Header, Input, Static, TabbedContent, TabPane, TextArea

from p2p_local import paths
from p2p_local.errors import P2PError
from p2p_local.pipeline import HISTORY_READ
from p2p_local.profile import FEATURE_NAMES
from p2p_local.tui.ask_screen import AskScreen

MAX_ROWS = 500  # newest items shown; the store handles 100k-item profiles, a table should not


def _cell(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def when(t: float | None, with_time: bool = True) -> str:
    return time.strftime("%Y-%m-%d %H:%M" if with_time else "%Y-%m-%d", time.localtime(t)) if t else "—"


FORGOTTEN = "forgotten"  # what the panel dismisses with once the whole profile is gone


class ProfileScreen(Screen[bool | str]):
    """A profile's items, summary and encoder text; add, forget, make or export its adapter. Dismisses with
    `changed` (True: a new adapter is due), or FORGOTTEN."""

    BINDINGS = [
        ("escape", "close", "back"),
        ("delete,d", "forget", "forget item"),
        ("a", "add", "add item"),
        ("p", "personalize", "make adapter"),
        ("e", "export", "export adapter"),
        ("ctrl+x", "forget_profile", "forget profile"),
    ]

    def __init__(self, profile: str, task: str | None) -> None:
        super().__init__()
        self.profile = profile
        self.task_name = task
        self.changed = False

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False, icon="◆")
        yield Static(id="profile-head")
        with TabbedContent(initial="items"):
            with TabPane("Items", id="items"):
                yield DataTable(id="item-table", cursor_type="row", zebra_stripes=True)
                with Horizontal(id="add-row"):
                    yield Input(placeholder="input", id="new-input")
                    yield Input(placeholder="output", id="new-output")
                    yield Button("add", id="add-button", variant="primary")
            with TabPane("Summary", id="summary"):
                with VerticalScroll():
                    yield Static(id="summary-head")
                    yield Static(id="summary-text", markup=False)
                    yield Static(id="features-text")
            with TabPane("Encoder text", id="encoder"):
                yield Static("[dim]Exactly what the profile encoder embeds for this task; nothing else about you is "
                             "used. In the chat, each question retrieves its own relevant past items.[/dim]")
                yield TextArea(id="encoder-text", read_only=True, soft_wrap=True)
        yield Footer(compact=True)

    @property
    def store(self):
        return self.app.store

    @property
    def item_task(self) -> str | None:
        """New items get the chat's task, else the profile's default task."""
        return self.task_name if self.task_name in self.app.cards else self.store.profiles.get_profile(self.profile).task

    def on_mount(self) -> None:
        table = self.query_one("#item-table", DataTable)
        table.add_columns("id", "when", "task", "input", "output")
        self.show_examples()
        self.refresh_all()
        table.focus()

    def show_examples(self) -> None:
        """The add row's placeholders from the task's card: a sample input and the kind of output it takes."""
        card = self.app.cards.get(self.item_task or "")
        if card is None:
            return
        if card.samples:
            self.query_one("#new-input", Input).placeholder = f"input, e.g. {card.samples[0]}"
        output = f"{card.labels[0]}-{card.labels[-1]}" if card.labelled and card.labels else "the text"
        self.query_one("#new-output", Input).placeholder = f"output ({output})"

    def refresh_all(self) -> None:
        self.refresh_items()
        self.refresh_profile_text()

    def refresh_items(self) -> None:
        self.query_one("#profile-head", Static).update(self.head())
        table = self.query_one("#item-table", DataTable)
        row = table.cursor_row
        table.clear()
        for it in reversed(self.store.profiles.items(self.profile, limit=MAX_ROWS)):  # newest first
            table.add_row(str(it.id), when(it.time, with_time=False), it.task, _cell(it.input, 60), _cell(it.output, 30), key=str(it.id))
        if table.row_count:
            table.move_cursor(row=min(row, table.row_count - 1))

    def head(self) -> Content:
        """Two lines: the profile (items per task, last change) and what its adapter is built from."""
        p = self.store.profiles.get_profile(self.profile)
        counts = self.store.profiles.task_counts(self.profile)
        tasks = ", ".join(f"{t} {n}" for t, n in sorted(counts.items(), key=lambda tn: -tn[1])) or "no items"
        shown = min(p.n_items, MAX_ROWS)
        line1 = Content.assemble((p.name, "bold"), f" · {p.n_items} items ({tasks})",
                                 f" · newest {shown} shown" if shown < p.n_items else "",
                                 f" · last change {when(p.updated)}")
        task = self.item_task
        adapters = self.store.adapters.all(self.profile)
        if task is None:
            built = "adapter: no task yet (pick one with ctrl+t in the chat)"
        else:
            n = counts.get(task, 0)
            read = f", the newest {HISTORY_READ} read" if n > HISTORY_READ else ""
            built = f"adapter for {task}: built from {n} items{read}"
        if not adapters:
            state = "none made yet (made on the first question)"
        elif p.adapter_stale:
            state = f"stale: the items changed after the last one ({when(adapters[0].created)})"
        else:
            state = f"up to date, made {when(adapters[0].created)}"
        return Content("\n").join([line1, Content.assemble((built, "dim"), " · ", (state, "dim"))])

    def refresh_profile_text(self) -> None:
        task = self.item_task
        if task is None or task not in self.app.cards:
            self.query_one("#summary-head", Static).update("No task: pick one with ctrl+t in the chat.")
            return
        try:
            prof = self.app.session.profile_text(self.profile, task)
        except P2PError as e:
            self.query_one("#summary-head", Static).update(Content(str(e)).stylize("bold red"))
            return
        self.query_one("#summary-head", Static).update(f"[b]Summary[/b] for {task}, computed on this device:")
        self.query_one("#summary-text", Static).update(prof.summary)
        self.query_one("#features-text", Static).update(features_text(prof.features))
        self.query_one("#encoder-text", TextArea).load_text(prof.text)

    # --- actions ----------------------------------------------------------------------------------
    def action_close(self) -> None:
        self.dismiss(self.changed)

    def action_add(self) -> None:
        self.query_one(TabbedContent).active = "items"
        self.query_one("#new-input", Input).focus()

    @on(Input.Submitted, "#new-input")
    def next_field(self) -> None:
        self.query_one("#new-output", Input).focus()

    @on(Input.Submitted, "#new-output")
    @on(Button.Pressed, "#add-button")
    def add_item(self) -> None:
        inp, out = self.query_one("#new-input", Input), self.query_one("#new-output", Input)
        text, answer = inp.value.strip(), out.value.strip()
        task = self.item_task
        if not text or not answer:
            self.notify("An item needs an input and an output.", severity="warning")
            return
        card = self.app.cards.get(task)
        if card is not None and card.labelled and answer not in card.labels:
            self.notify(f"{task} answers are one of {', '.join(card.labels)}", severity="warning")
            return
        try:
            item = self.store.profiles.add_item(self.profile, task, text, answer)
        except P2PError as e:
            self.notify(str(e), severity="error")
            return
        inp.value, out.value = "", ""
        self.changed = True
        self.refresh_all()
        self.query_one("#item-table", DataTable).move_cursor(row=0)
        self.notify(f"added item #{item.id}", timeout=2)
        inp.focus()

    def action_forget(self) -> None:
        table = self.query_one("#item-table", DataTable)
        if not table.row_count:
            return
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        self.store.profiles.delete_item(int(key))
        self.changed = True
        self.refresh_all()
        self.notify(f"forgot item #{key}", timeout=2)

    def action_forget_profile(self) -> None:
        p = self.store.profiles.get_profile(self.profile)

        def answered(name: str | None) -> None:
            if name is None:
                return
            if name != p.name:
                self.notify(f"The name did not match: {p.name!r} is kept.", severity="warning")
                return
            report = self.store.forget_profile(p.name)
            self.app.notify(f"{report.items} items, {report.adapters} adapters, {report.conversations} conversations",
                            title=f"forgot '{p.name}'", timeout=6)
            self.dismiss(FORGOTTEN)

        self.app.push_screen(AskScreen(
            f"Forget profile {p.name}?",
            f"This deletes {p.name}, its {p.n_items} items, their change history, its adapters and its "
            "conversations, on this device. Type the profile's name to confirm.",
            placeholder=p.name), answered)

    def action_export(self) -> None:
        def answered(folder: str | None) -> None:
            if folder:
                from p2p_local.adapter_export import export_adapter  # what `p2p adapter export` runs

                self.notify("exporting the adapter …", timeout=2)
                self.adapter_job(self.app, "export failed", self.exported, export_adapter, self.app.session,
                                 self.profile, Path(folder).expanduser(), task=self.item_task)

        self.app.push_screen(AskScreen(
            "Export the adapter to", "The adapter under a stable name, with a README of the llama.cpp, llama-server "
            "and Ollama commands that use it (what `p2p adapter export` writes).",
            value=str(paths.data_dir() / "exports")), answered)

    def exported(self, ex) -> None:
        self.notify(f"{ex.path}\nhow to use it: {ex.readme}", title="adapter exported", timeout=10)
        self.refresh_items()

    def action_personalize(self) -> None:
        self.notify("making the adapter …", timeout=2)
        self.adapter_job(self.app, "personalization failed", self.adapter_made, self.app.session.personalize,
                         self.profile, self.item_task)

    @work(thread=True, exclusive=True, group="adapter", exit_on_error=False)
    def adapter_job(self, app, failed: str, done, fn, *args, **kwargs) -> None:
        """`fn(*args, **kwargs)` off the UI thread, holding the engine; then `done(result)` on the UI thread."""
        try:
            with app.session_lock:
                result = app.session_call(fn, *args, **kwargs)
        except Exception as e:
            app.call_from_thread(self.notify, str(e), title=failed, severity="error", timeout=10)
            return
        app.call_from_thread(done, result)

    def adapter_made(self, result) -> None:
        parts = ", ".join(f"{k} {v:.0f} ms" for k, v in (result.timings_ms or {}).items())
        how = "from the cache" if result.cached else parts
        self.notify(f"{result.adapter_path}\n{how}", title="adapter ready", timeout=8)
        self.refresh_items()


def features_text(features) -> str:
    """The numeric profile features (the hypernetwork's second input), the non-zero ones by name."""
    values = [float(x) for x in features]
    names = FEATURE_NAMES if len(FEATURE_NAMES) == len(values) else [f"f{i}" for i in range(len(values))]
    rows = [f"  {n:<22} {v:+.3f}" for n, v in zip(names, values, strict=True) if v != 0.0]
    return "\n[b]Numeric features[/b] (the hypernetwork's second input; zeros hidden)\n\n" + "\n".join(rows)
