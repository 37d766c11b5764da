"""The terminal chat app. Heavy objects come in from outside (a `Session`, see session.py), so tests can
pass a fake:

    ChatApp(Session.open(), profile="demo").run()   # the profile's own task

With no profile of the user's own (only the demo, or none) the chat opens on the first-run screen.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from p2p_local.data.format import resolve_task
from p2p_local.tui.chat_screen import ChatScreen
from p2p_local.tui.first_run_screen import first_run_done, own_profiles
from p2p_local.tui.session import ChatSession

T = TypeVar("T")


class ChatApp(App[None]):
    """p2p chat: a local model, personalized by a LoRA adapter made from your profile."""

    CSS_PATH = "app.tcss"
    TITLE = "p2p chat"
    BINDINGS = [Binding("ctrl+q", "quit", "quit", priority=True)]

    def __init__(
        self,
        session: ChatSession,  # `task=None`: the profile's task; free chat by any of its names (`resolve_task`)
        *,
        profile: str | None = None,
        task: str | None = None,
        personalized: bool = True,
        compare: bool = False,
        resume: bool = True,
        first_run: bool | None = None,  # None: no profile of the user's own, and the screen never answered
    ) -> None:
        super().__init__()
        self.session = session
        self.store = session.store
        if first_run is None:
            first_run = not own_profiles(self.store) and not first_run_done(self.store)
        self.first_run = first_run
        self.cards = dict(session.task_cards())
        self.session_lock = threading.Lock()  # one engine: personalize and answer never run at once
        if task is None and profile is not None:  # the profile's default task
            default = self.store.profiles.get_profile(profile).task
            task = default if default in self.cards else None
        elif task is not None:
            card = resolve_task(task, self.cards.__getitem__)
            task = card.name if card is not None else None
        self._start = dict(profile=profile, task=task, personalized=personalized, compare=compare, resume=resume)

    def session_call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call a session method from a worker thread: on the UI thread, which owns the store's sqlite3
        connection, unless the session is `threadsafe`. `answer()` returns at once; the worker iterates the
        `Answer` (which holds llama.cpp for the whole reply)."""
        if self.session.threadsafe:
            return fn(*args, **kwargs)
        return self.call_from_thread(fn, *args, **kwargs)

    def get_default_screen(self) -> Screen:
        return ChatScreen(**self._start)

    @property
    def chat(self) -> ChatScreen:
        """The chat screen (always at the bottom of the screen stack)."""
        return self.screen_stack[0]  # type: ignore[return-value]

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """The chat's actions in the command palette (ctrl+p) too, for those who forget keys."""
        yield from super().get_system_commands(screen)
        chat = self.chat
        if isinstance(chat, ChatScreen) and screen is chat:
            for title, about, action in (
                ("Task", "Pick the task (its prompt template) or free chat   ^t", chat.action_pick_task),
                ("Model", "The model free chat runs on (task answers: the bundle's base)   F2", chat.action_pick_model),
                ("Switch profile", "Chat as another profile   ^r", chat.action_pick_profile),
                ("Import history", "A profile from your git commits or a file, or the demo", chat.action_import),
                ("Profile panel", "Items, summary and the exact encoder text   ^o", chat.action_open_profile),
                ("Personalization on/off", "Answer with or without the adapter   ^g", chat.action_toggle_personal),
                ("Stronger adapter", "Adapter strength up a step   ^↑", lambda: chat.action_scale(1)),
                ("Weaker adapter", "Adapter strength down a step   ^↓", lambda: chat.action_scale(-1)),
                ("Side by side", "Base model and personalized answers next to each other   ^b",
                 chat.action_toggle_compare),
                ("System prompt", "Free chat's system prompt in this conversation", chat.action_system_prompt),
                ("New conversation", "Start over (the old one stays in the history)   ^n",
                 chat.action_new_conversation),
                ("Rename conversation", "Give this conversation another title", chat.action_rename),
                ("Delete conversation", "Remove it for good: messages, search index, its export",
                 chat.action_delete_conversation),
                ("Search conversations", "Full-text search over all messages (F2 rename, del delete)   ^f",
                 chat.action_search),
                ("Export conversation", "Save it as Markdown in the data dir   ^s", chat.action_export),
                ("Copy last reply", "The last reply's text to the clipboard   ^l", chat.action_copy_last),
            ):
                yield SystemCommand(title, about, action)
