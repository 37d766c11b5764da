"""Small widgets of the chat: the multi-line input, one message (with a rating's label distribution as a
bar chart beside the stars), a base-vs-personalized pair, the status line."""

from __future__ import annotations

from dataclasses import dataclass

from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.markup import escape
from textual.message import Message
from textual.widgets import Markdown, Static, TextArea

from p2p_local.data.format import LABELLED_KINDS
from p2p_local.terminal import Printer, printable

# Keys that insert a newline instead of sending. Most terminals send the same byte for Enter and
# Shift+Enter; ctrl+j (a raw line feed) works everywhere, shift/alt+enter where the terminal tells them apart.
NEWLINE_KEYS = ("ctrl+j", "shift+enter", "alt+enter")


class ChatInput(TextArea):
    """Multi-line input: Enter sends, ctrl+j (or shift+enter) starts a new line; ↑/↓ on a single line recall
    the conversation's earlier prompts, as a shell does (`prompts`, oldest first; the draft comes back last)."""

    BINDINGS = [
        Binding("enter", "submit", "send", key_display="⏎"),
        Binding("ctrl+j", "newline", "line", key_display="^j"),
    ]

    @dataclass
    class Submitted(Message):
        text: str

    def __init__(self, **kw) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", **kw)
        self.prompts: list[str] = []  # (not `history`: TextArea's undo history)
        self._recall: int | None = None  # index into history while browsing it
        self._draft = ""  # what was typed before browsing began

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "submit" and getattr(self.screen, "busy", False):
            return False  # hidden while an answer streams: the footer shows how to stop it instead
        return super().check_action(action, parameters)

    def set_prompts(self, prompts: list[str]) -> None:
        self.prompts = [p for i, p in enumerate(prompts) if not i or p != prompts[i - 1]]
        self._recall = None

    def remember(self, prompt: str) -> None:
        if not self.prompts or self.prompts[-1] != prompt:
            self.prompts.append(prompt)
        self._recall = None

    def _recalling(self) -> bool:
        """↑/↓ browse the history: on an empty or one-line input, or on a recalled prompt left as it was."""
        if self._recall is not None and self.text == self.prompts[self._recall]:
            return True
        return "\n" not in self.text and bool(self.prompts)

    def recall(self, step: int) -> None:
        """One prompt back (-1) or forward (+1); forward past the newest brings the draft back."""
        if self._recall is None or self.text != self.prompts[self._recall]:
            if step > 0:
                return
            self._recall, self._draft = len(self.prompts), self.text
        at = self._recall + step
        if at < 0:
            return
        self._recall = at if at < len(self.prompts) else None
        self.load_text(self.prompts[at] if self._recall is not None else self._draft)
        self.move_cursor(self.document.end)

    async def _on_key(self, event: events.Key) -> None:
        # TextArea inserts "\n" for Enter in its own key handler, before any binding: intercept here.
        if event.key in ("up", "down") and self._recalling():
            event.stop()
            event.prevent_default()
            self.recall(-1 if event.key == "up" else 1)
            return
        if event.key not in ("enter", *NEWLINE_KEYS):
            await super()._on_key(event)
            return
        event.stop()
        event.prevent_default()
        if event.key == "enter":
            self.action_submit()
        else:
            self.action_newline()

    def action_submit(self) -> None:
        text = self.text.strip()
        if text:
            self.post_message(self.Submitted(text))

    def action_newline(self) -> None:
        self.insert("\n")


def stars(label: str, top: int = 5) -> str:
    """'4' -> '★★★★☆' (empty string when the label is not a whole number in 1..top)."""
    try:
        n = int(label.strip())
    except ValueError:
        return ""
    return "★" * n + "☆" * (top - n) if 1 <= n <= top else ""


BAR_WIDTH = 12  # cells of the longest possible bar (probability 1)
_EIGHTHS = " ▏▎▍▌▋▊▉"


def bar(p: float, width: int = BAR_WIDTH) -> str:
    """A horizontal bar of `p` in 0..1, to an eighth of a cell."""
    eighths = round(max(0.0, min(1.0, p)) * width * 8)
    full, part = divmod(eighths, 8)
    return ("█" * full + (_EIGHTHS[part] if part else "")).ljust(width)


def dist_chart(dist: dict[str, float], answer: str = "") -> Content:
    """The label distribution, highest label on top, one line each: `5 ███▌        29%`; the answer in bold."""
    top = answer.strip()
    return Content("\n").join(
        Content.assemble((f"{label:>2} ", "bold" if label == top else ""),
                         (bar(p), "bold $success" if label == top else "$text-muted"), f" {p * 100:3.0f}%")
        for label, p in reversed(dist.items()))


class DistChart(Static):
    """The model's probabilities over the labels, beside a rating answer (what its median was read off)."""

    def show(self, dist: dict[str, float] | None, answer: str = "") -> None:
        self.set_class(bool(dist), "-shown")
        self.update(dist_chart(dist, answer) if dist else "")


class MessageView(Vertical, can_focus=True):
    """One message: a title line and a Markdown body that can grow while a reply streams in (and for a
    rating/label reply, its `dist` chart). A cut reply shows its `mark` (`pipeline.cut_mark`) after the text,
    never part of it. Focus it (Tab, or click) and press `c` to copy its text."""

    BINDINGS = [Binding("c", "copy", "copy")]

    def __init__(self, role: str, text: str = "", *, title: str = "", kind: str | None = None,
                 dist: dict[str, float] | None = None, mark: str = "", **kw) -> None:
        super().__init__(classes=f"message {role}", **kw)
        self.role = role
        self.text = text
        self.mark = mark
        self.kind = kind  # task kind of the reply (rating answers are shown with stars)
        self.dist = dist
        self._title = title or {"user": "you", "assistant": "assistant", "system": "note"}.get(role, role)
        self._printer = Printer()  # the streamed text: an escape sequence cut between pieces is removed whole

    def compose(self) -> ComposeResult:
        yield Static(self._title, classes="title")
        if self.role == "user":
            # The user's text is shown as typed, never interpreted as Markdown.
            yield Static(printable(self.text), classes="body", markup=False)
        elif self.kind in LABELLED_KINDS:
            with Horizontal(classes="answer-row"):
                yield Markdown(self._shown(self.text), classes="body")
                chart = DistChart(classes="dist")
                chart.show(self.dist, self.text)
                yield chart
        else:
            yield Markdown(self._shown(self.text) + self.mark, classes="body")

    def _shown(self, text: str) -> str:
        if self.kind == "rating" and text.strip() and stars(text):
            return f"**{text.strip()}**  {stars(text)}"
        return printable(text)  # the model may repeat an escape sequence of the profile's items

    @property
    def body(self) -> Markdown:
        return self.query_one(".body", Markdown)

    async def append_text(self, delta: str) -> None:
        """Append streamed text (called from the reply worker, at most every ~50 ms)."""
        if not delta:
            return
        self.text += delta
        self.add_class("streaming")
        await self.body.append(self._printer.feed(delta))

    async def finish(self, text: str, *, title: str | None = None, stopped: bool = False,
                     dist: dict[str, float] | None = None, mark: str = "") -> None:
        """Show the final text (re-rendered once, with the rating shown as stars and its distribution, and
        the cut `mark`)."""
        self.text, self.mark = text, mark
        self.remove_class("streaming")
        self.set_class(stopped, "stopped")
        if title is not None:
            self.query_one(".title", Static).update(title)
        await self.body.update((self._shown(text) if text else "_(no answer)_") + mark)
        if dist is not None:
            self.dist = dist
        charts = self.query(DistChart)
        if charts:
            charts.first().show(self.dist, text)

    def action_copy(self) -> None:
        self.app.copy_to_clipboard(self.text)
        self.app.notify("message copied to the clipboard", timeout=2)


class ComparePair(Horizontal):
    """The same question answered twice, side by side: base model | personalized."""

    def __init__(self, base: MessageView, personal: MessageView) -> None:
        super().__init__(classes="pair")
        self.base = base
        self.personal = personal

    def compose(self) -> ComposeResult:
        yield self.base
        yield self.personal


class StatusBar(Static):
    """One line under the header: profile, task, personalization, scale, adapter state."""

    def show(
        self,
        *,
        profile: str | None,
        task: str | None,
        personalized: bool,
        scale: float,
        compare: bool,
        adapter: str = "",
        free_chat: str | None = None,
        model_kind: str = "base model",
        system_prompt: bool = False,
    ) -> None:
        """`free_chat` (task None): how it answers, "adapter", "summary" (base model + profile summary) or "base";
        `model_kind`: "chat model" when free chat runs on the chosen instruct model; `system_prompt`: one is set."""
        parts = [f"[b]profile[/b] {escape(profile or '—')}", f"[b]task[/b] {escape(task or 'free chat')}"]
        if profile is None:
            parts.append(f"[dim]{model_kind} only[/dim]")
        elif task is None and free_chat == "summary":
            parts.append(f"[b $success]{model_kind} + your profile summary[/] [dim](no adapter in free chat)[/dim]")
        elif personalized and free_chat != "base":
            parts.append(f"[b $success]personalized[/] ×{scale:.2f} [dim]^↑↓[/dim]")
        else:
            parts.append(f"[b $warning]{model_kind}[/]")
        if system_prompt:
            parts.append("[dim]system prompt[/dim]")
        if compare:
            parts.append("[b $accent]side by side[/]")
        if adapter:
            parts.append(f"[dim]{escape(adapter)}[/dim]")
        self.update("  ·  ".join(parts))
