"""A small modal that asks for one line: a folder to export to, or a profile's name to confirm forgetting it."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, Static


class AskScreen(ModalScreen[str | None]):
    """`question` with an input (prefilled with `value`); Enter dismisses with the text, Esc with None."""

    BINDINGS = [("escape", "dismiss(None)", "cancel")]

    def __init__(self, question: str, about: str = "", value: str = "", placeholder: str = "") -> None:
        super().__init__()
        self.question, self.about, self.value, self.placeholder = question, about, value, placeholder

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(f"[b]{self.question}[/b]  [dim]⏎ ok · esc cancel[/dim]")
            if self.about:
                yield Static(self.about, classes="about", markup=False)
            yield Input(self.value, placeholder=self.placeholder, id="answer")

    def on_mount(self) -> None:
        self.query_one("#answer", Input).focus()

    @on(Input.Submitted, "#answer")
    def answered(self, event: Input.Submitted) -> None:
        event.stop()
        self.dismiss(event.value.strip())
