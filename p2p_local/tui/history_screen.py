"""Past conversations and full-text search over every message (SQLite FTS5 via the store); a conversation
is renamed (F2) or deleted (Del: its messages, its search-index words and its exported Markdown) here, or
from the chat's command palette for the one open (`ask_rename`, `ask_delete`)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Input, Label, OptionList
from textual.widgets.option_list import Option

from p2p_local.errors import StoreError
from p2p_local.terminal import shown
from p2p_local.tui.ask_screen import AskScreen

MAX_CONVERSATIONS = 200
SNIPPET = 90
CONFIRM = ("yes", "y")


def ask_rename(app: App, conversation_id: int, done: Callable[[], object] | None = None) -> None:
    """Ask for the conversation's new title (prefilled with the old one) and store it."""
    conv = app.store.conversations.get_conversation(conversation_id)

    def answered(title: str | None) -> None:
        if title is None or title == conv.title:
            return
        try:
            app.store.conversations.rename_conversation(conversation_id, title)
        except StoreError as e:
            app.notify(str(e), title="not renamed", severity="error")
            return
        app.notify(shown(title) or "(untitled)", title="conversation renamed", timeout=3)
        if done is not None:
            done()

    app.push_screen(AskScreen("Rename conversation", value=shown(conv.title), placeholder="a title"), answered)


def ask_delete(app: App, conversation_id: int, done: Callable[[int | None], Awaitable[None] | None]) -> None:
    """Confirm, then delete the conversation for good (`Store.delete_conversation`); `done(id)` after, or
    `done(None)` when the user thought better of it."""
    conv = app.store.conversations.get_conversation(conversation_id)
    about = (f"“{shown(conv.title) or f'conversation {conv.id}'}”: its {conv.n_messages} messages, their search "
             "index and its exported Markdown are removed for good. Type yes to delete it.")

    async def answered(text: str | None) -> None:
        if (text or "").lower() not in CONFIRM:
            result = done(None)
        else:
            n = app.store.conversations.delete_conversation(conversation_id)
            app.notify(f"{n} messages removed", title="conversation deleted", timeout=3)
            result = done(conversation_id)
        if result is not None:
            await result

    app.push_screen(AskScreen("Delete this conversation?", about, placeholder="yes"), answered)


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
        Binding("f2", "rename", "rename", show=False),
        Binding("delete,ctrl+d", "delete", "delete", show=False),  # the query box takes them first
    ]

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide"):
            yield Label("[b]Conversations[/b]  [dim]type to search all messages · ↓ results · ⏎ open · "
                        "F2 rename · del delete · esc close[/dim]")
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
            for c in store.conversations.all()[:MAX_CONVERSATIONS]:
                when = time.strftime("%Y-%m-%d %H:%M", time.localtime(c.created))
                line = Content.assemble((shown(c.title) or f"conversation {c.id}", "bold"), "\n    ",
                                        (f"{c.profile or 'no profile'} · {c.n_messages} messages · {when}", "dim"))
                results.add_option(Option(line, id=f"c{c.id}"))
            return
        hits = store.conversations.search_messages(query)
        titles = {c.id: c for c in store.conversations.all()}
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
        self.dismiss(_conversation_of(event.option.id or ""))

    def highlighted_conversation(self) -> int | None:
        results = self.query_one("#results", OptionList)
        if results.highlighted is None:
            return None
        return _conversation_of(results.get_option_at_index(results.highlighted).id or "")

    def action_rename(self) -> None:
        conversation_id = self.highlighted_conversation()
        if conversation_id is not None:
            ask_rename(self.app, conversation_id, self.refresh_results)

    def action_delete(self) -> None:
        conversation_id = self.highlighted_conversation()
        if conversation_id is not None:
            ask_delete(self.app, conversation_id, lambda _: self.refresh_results())

    def refresh_results(self) -> None:
        at = self.query_one("#results", OptionList).highlighted
        self.show_results(self.query_one("#query", Input).value)
        results = self.query_one("#results", OptionList)
        if results.option_count:
            results.highlighted = min(at or 0, results.option_count - 1)
            results.focus()


def _conversation_of(option_id: str) -> int | None:
    """The conversation of a result: "c<id>" (a conversation) or "m<message id>:<conversation id>" (a hit)."""
    if option_id.startswith("m"):
        return int(option_id.rsplit(":", 1)[-1])
    return int(option_id[1:]) if option_id.startswith("c") else None
