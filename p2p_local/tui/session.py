"""What the chat needs of the rest of p2p-local: `ChatSession`, a Protocol that `p2p_local.personalize.Session`
satisfies (and the tests' fake: tests/test_tui.py checks both with `isinstance`). Beyond this surface,
exporting an adapter (the profile panel's `e`) needs the real `Session` (its engine's base model).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from p2p_local.data.format import TaskCard
from p2p_local.errors import P2PError
from p2p_local.profile import Profile
from p2p_local.store import Store

if TYPE_CHECKING:
    from p2p_local.pipeline import Answer

@runtime_checkable
class AdapterResult(Protocol):
    """What `personalize` tells the status line (`pipeline.Personalization`)."""

    adapter_path: Path | None
    timings_ms: dict[str, float]
    cached: bool
    neutral: bool  # the untrained stand-in bundle: the adapter changes nothing
    empty: bool  # a profile without items: the hypernetwork's population adapter


@runtime_checkable
class ChatSession(Protocol):
    """Exactly what the chat calls. `threadsafe`: its methods may run on worker threads (else they are
    marshalled to the UI thread, where the store's sqlite3 connection lives: see `ChatApp.session_call`)."""

    threadsafe: bool

    @property
    def store(self) -> Store: ...

    def task_cards(self) -> dict[str, TaskCard]: ...

    @property
    def base_model(self) -> str:
        """The bundle's base (its registry name): every task answer, and free chat without a chat model."""
        ...

    @property
    def chat_model(self) -> str | None:
        """The instruct model free chat runs on (`--model`, the model picker); None: the base."""
        ...

    def chat_models(self) -> dict[str, str]:
        """The registered models free chat may run on (`p2p models list`): name -> description."""
        ...

    def use_chat_model(self, name: str | None) -> None:
        """Free chat on `name` from now on (slow: prepares and loads it); None or the base's name: the base."""
        ...

    def model_of(self, answer: Answer) -> str:
        """The model that answered `answer` (after its stream ended)."""
        ...

    def personalize(self, profile: str, task: str | None = None) -> AdapterResult: ...

    def answer(self, text: str, *, profile: str | None = None, task: str | None = None, personalized: bool = True,
               scale: float = 1.0, transcript: list[tuple[str, str]] | None = None, system: str = "") -> Answer:
        """The `pipeline.Answer`: iterate to stream, closing cancels; a rating's `distribution` is set once its
        stream ends. `task` "chat": free chat with `transcript` and `system` (the conversation's system prompt).
        Above x1, a profile without items of the task answers from the base (`personalization.empty`, no adapter)."""
        ...

    def profile_text(self, profile: str, task: str | None = None) -> Profile: ...

    def about(self, profile: str) -> str:
        """The profile summary free chat puts in the base model's prompt."""
        ...

    def free_chat_adapter(self) -> bool:
        """Whether the bundle was trained for free chat (else free chat is the base model + `about`)."""
        ...


def free_chat_mode(session: ChatSession, profile: str | None, personalized: bool) -> str:
    """How free chat answers for this profile: "adapter", "summary" (base model + the profile summary) or "base"."""
    if profile is None or not personalized:
        return "base"
    return "adapter" if session.free_chat_adapter() else "summary"


def answering_model(session: ChatSession, free_chat: bool, mode: str) -> str:
    """The model that will answer (the route's rule, `Session.model_of` once answered): free chat without an
    adapter (`mode` of `free_chat_mode`, or "base") runs on the chat model when one is chosen, else the base."""
    chat = session.chat_model
    return chat if free_chat and chat and mode != "adapter" else session.base_model


def untrained_task(session: ChatSession, card: TaskCard | None) -> bool:
    """Whether the session's bundle was never trained on `card`'s task (a user's own card: `Bundle.card_status`).
    A session without a bundle (the tests' fake) says no."""
    bundle = getattr(session, "bundle", None)
    return card is not None and bundle is not None and bundle.card_status(card) == "untrained"


def error_text(e: Exception) -> str:
    """What the chat shows of a failure: a P2PError's message (and hint), else the exception's type too."""
    return str(e) if isinstance(e, P2PError) else f"{type(e).__name__}: {e}"
