"""A small modal list to pick one thing: the task, or the profile."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList
from textual.widgets.option_list import Option


class PickerScreen(ModalScreen[str | None]):
    """Pick one of `options` ((value, description) pairs); dismisses with the value, or None on Esc."""

    BINDINGS = [("escape", "dismiss(None)", "cancel")]

    def __init__(self, title: str, options: list[tuple[str, str]], current: str | None = None) -> None:
        super().__init__()
        self.title_text = title
        self.options = options
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(f"[b]{self.title_text}[/b]  [dim]↑↓ move · ⏎ choose · esc cancel[/dim]")
            yield OptionList(
                *(Option(self._line(value, about), id=value) for value, about in self.options), id="picker"
            )

    def _line(self, value: str, about: str) -> Content:
        mark = "● " if value == self.current else "  "
        return Content.assemble(mark, (value, "bold"), "\n    ", (about, "dim"))

    def on_mount(self) -> None:
        ol = self.query_one(OptionList)
        ids = [v for v, _ in self.options]
        if self.current in ids:
            ol.highlighted = ids.index(self.current)
        ol.focus()

    @on(OptionList.OptionSelected)
    def chosen(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.dismiss(event.option.id)
