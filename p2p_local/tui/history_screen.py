"""Past conversations and full-text search over every message (SQLite FTS5 via the store)."""

from __future__ import annotations

import time

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Input, Label, OptionList
from textual.widgets.option_list import Option

from p2p_local.terminal import shown

MAX_CONVERSATIONS = 200
SNIPPET = 90


def snippet(text: str, query: str, width: int = SNIPPET) -> str:
    """One line of `text` around the first word of `query`."""
    flat = " ".join(text.split())
    words = query.lower().split()
    at = flat.lower().find(words[0]) if words else -1
    start = max(0, at - width // 3) if at > 0 else 0
    out = flat[start : start + width]
    return ("…" if start else "") + out + ("…" if start + width < len(flat) else "")


class HistoryScreen(ModalScreen[int | None]):
    """Type to search messages; with an empty box, the conversations newest first. Dismisses with a conversation id."""

    BINDINGS = [
        Binding("escape", "dismiss(None)", "close"),
        Binding("down", "focus_results", "results", show=False),
    ]

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide"):
            yield Label("[b]Conversations[/b]  [dim]type to search all messages · ↓ results · ⏎ open · esc close[/dim]")
            yield Input(placeholder="search messages …", id="query")
            yield OptionList(id="results")

    def on_mount(self) -> None:
        self.show_results("")
        self.query_one("#query", Input).focus()

    @on(Input.Changed, "#query")
    def query_changed(self, event: Input.Changed) -> None:
        self.show_results(event.value)

    @on(Input.Submitted, "#query")
    def action_focus_results(self) -> None:
        results = self.query_one("#results", OptionList)
        if results.option_count:
            results.focus()
            if results.highlighted is None:
                results.highlighted = 0

    def show_results(self, query: str) -> None:
        store = self.app.store
        results = self.query_one("#results", OptionList)
        results.clear_options()
        if not query.strip():
            for c in store.conversations()[:MAX_CONVERSATIONS]:
                when = time.strftime("%Y-%m-%d %H:%M", time.localtime(c.created))
                line = Content.assemble((shown(c.title) or f"conversation {c.id}", "bold"), "\n    ",
                                        (f"{c.profile or 'no profile'} · {c.n_messages} messages · {when}", "dim"))
                results.add_option(Option(line, id=f"c{c.id}"))
            return
        hits = store.search_messages(query)
        titles = {c.id: c for c in store.conversations()}
        for m in hits:
            conv = titles.get(m.conversation_id)
            head = (shown(conv.title) if conv and conv.title else f"conversation {m.conversation_id}")
            line = Content.assemble((f"{m.role}: ", "bold"), snippet(shown(m.content), query), "\n    ",
                                    (f"in “{head}” · {conv.profile if conv else ''}", "dim"))
            results.add_option(Option(line, id=f"m{m.id}:{m.conversation_id}"))
        if not hits:
            results.add_option(Option(Content.styled("no message matches", "dim"), disabled=True))

    @on(OptionList.OptionSelected, "#results")
    def chosen(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        oid = event.option.id or ""
        self.dismiss(int(oid.rsplit(":", 1)[-1]) if oid.startswith("m") else int(oid[1:]))
