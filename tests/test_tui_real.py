"""The chat's main flows on the real path: the real Session (llama.cpp engine, ONNX encoder and
hypernetwork bundle, SQLite store), driven headless with Textual's Pilot.

What a reply says depends on the model and the bundle, so these tests check the wiring: a reply
streams and is stored, the adapter llama.cpp has attached matches the toggle/scale/profile, Esc
really stops llama.cpp, and the profile panel shows the exact encoder text.
"""

from __future__ import annotations

import threading
import time

import pytest
from textual.widgets import DataTable, Input, TextArea

from p2p_local import paths
from p2p_local.demo import DEMO_PROFILE, DEMO_QUESTIONS, import_demo
from p2p_local.pipeline import lora_scale
from p2p_local.tui import ChatApp
from p2p_local.tui.chat_screen import FREE_CHAT
from p2p_local.tui.profile_screen import ProfileScreen
from p2p_local.tui.widgets import ChatInput, ComparePair, MessageView

pytestmark = pytest.mark.real

SIZE = (120, 40)
WAIT_S = 120.0  # a stuck flow fails; a slow machine does not


@pytest.fixture(scope="module")
def bundle_and_encoder():
    from p2p_local.bundle import Bundle
    from p2p_local.encoder import Encoder

    return Bundle.load(), Encoder.load()


@pytest.fixture
def session(engine, bundle_and_encoder, p2p_home):
    """A real Session on the shared engine, with a fresh store holding the demo profile."""
    from p2p_local.personalize import Session
    from p2p_local.store import Store

    bundle, encoder = bundle_and_encoder
    s = Session(engine, bundle, encoder, Store())
    import_demo(s.store)
    yield s
    engine.use(None)
    s.store.close()  # not s.close(): the engine is shared by the whole test session


async def until(pilot, cond, what: str) -> None:
    end = time.monotonic() + WAIT_S
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for: {what}")
        await pilot.pause(0.05)


async def send(pilot, text: str) -> None:
    screen = pilot.app.chat
    screen.query_one(ChatInput).load_text(text)
    await pilot.press("enter")
    await until(pilot, lambda: not screen.busy and not screen.query(".streaming"), "the reply")
    await pilot.pause()


def replies(app) -> list[MessageView]:
    return [v for v in app.chat.query(MessageView) if v.role == "assistant"]


def no_error(view: MessageView) -> bool:
    return "error" not in str(view.query_one(".title").render())


@pytest.mark.asyncio
async def test_real_rating_personalized_base_scale_and_side_by_side(session):
    engine = session.engine
    app = ChatApp(session, first_run=False, profile=DEMO_PROFILE)
    async with app.run_test(size=SIZE) as pilot:
        screen = app.chat
        assert screen.task_name == "movielens-rating"
        await until(pilot, lambda: screen.adapter_note.startswith("adapter"), "the first adapter")

        await send(pilot, DEMO_QUESTIONS[0])
        view = replies(app)[-1]
        assert view.text and no_error(view), view.text
        assert engine.active[0] is not None and engine.active[1] == 1.0  # the demo adapter, at scale 1
        assert engine.active[0].path.parent == session.store.adapters.adapter_dir(DEMO_PROFILE)

        await pilot.press("ctrl+down", "ctrl+down")  # 0.5
        await send(pilot, DEMO_QUESTIONS[1])
        assert engine.active[1] == pytest.approx(lora_scale(0.5)) and no_error(replies(app)[-1])  # x0.5

        await pilot.press("ctrl+g")  # personalization off: no adapter attached
        await send(pilot, DEMO_QUESTIONS[1])
        assert engine.active == (None, 0.0) and no_error(replies(app)[-1])

        await pilot.press("ctrl+g", "ctrl+b")  # side by side
        await send(pilot, DEMO_QUESTIONS[0])
        pair = screen.query_one(ComparePair)
        assert pair.personal.text and pair.base.text and no_error(pair.personal) and no_error(pair.base)
        assert engine.active == (None, 0.0)  # the base reply ran last

        msgs = session.store.conversations.messages(screen.conversation_id)
        assert [m.meta.get("mode") for m in msgs if m.role == "assistant"] == [
            "personalized", "personalized", "base", "personalized", "base"]
        assert [m.meta.get("scale") for m in msgs if m.role == "assistant"][:2] == [1.0, 0.5]

        # Search and export work on what the real flow stored.
        hits = session.store.conversations.search_messages("Zodiac")
        assert {m.conversation_id for m in hits} == {screen.conversation_id}
        await pilot.press("ctrl+s")
        assert "Zodiac (2007)" in (paths.data_dir() / "exports" / f"conversation-{screen.conversation_id}.md").read_text()


@pytest.mark.asyncio
async def test_real_escape_stops_llama_cpp_and_the_chat_goes_on(session):
    # Hold the real token stream after its first piece until Esc has been pressed, so the reply
    # cannot finish on its own first (a fast machine and a short answer would otherwise race Esc).
    real_answer, gate, closed = session.answer, threading.Event(), []

    def held_answer(*args, **kwargs):
        pieces = real_answer(*args, **kwargs)

        def held():
            try:
                held_once = False
                for piece in pieces:
                    yield piece
                    # Hold after the first piece with visible text: a leading " " or "\n" shows nothing,
                    # and holding there would leave the screen blank until the gate times out.
                    if piece.strip() and not held_once:
                        held_once = True
                        gate.wait(WAIT_S)
            finally:
                pieces.close()
                closed.append(True)

        return held()

    session.answer = held_answer
    app = ChatApp(session, first_run=False, profile=DEMO_PROFILE, task=FREE_CHAT)
    async with app.run_test(size=SIZE) as pilot:
        screen = app.chat
        screen.query_one(ChatInput).load_text("Write a very long story about a dragon who learns to cook.")
        await pilot.press("enter")
        await until(pilot, lambda: replies(app) and replies(app)[-1].text, "the first streamed text")
        await pilot.press("escape")
        gate.set()
        await until(pilot, lambda: not screen.busy, "the reply to stop")
        await pilot.pause()
        view = replies(app)[-1]
        assert view.has_class("stopped") and closed == [True]
        stored = session.store.conversations.messages(screen.conversation_id)[-1]
        assert stored.meta.get("stopped") is True and stored.content == view.text
        # llama.cpp was released: the engine lock is free and the next request runs.
        assert session.engine._lock.acquire(blocking=False)
        session.engine._lock.release()
        del session.answer  # back to the real method
        await send(pilot, "What is the capital of France?")
        assert replies(app)[-1].text and no_error(replies(app)[-1])
        assert session.store.conversations.messages(screen.conversation_id)[-2].content == "What is the capital of France?"


@pytest.mark.asyncio
async def test_real_profile_panel_and_profile_switch(session):
    store = session.store
    store.profiles.create_profile("alice", task="popquorn-offensiveness")
    store.profiles.add_item("alice", None, "What a stupid idea, typical of people like you.", "4")
    store.profiles.add_item("alice", None, "Thanks for sharing, this helped me a lot.", "1")
    app = ChatApp(session, first_run=False, profile=DEMO_PROFILE)
    async with app.run_test(size=SIZE) as pilot:
        screen = app.chat
        await pilot.press("ctrl+o")
        panel = app.screen
        assert isinstance(panel, ProfileScreen)
        assert panel.query_one("#item-table", DataTable).row_count == 119
        expected = session.profile_text(DEMO_PROFILE, "movielens-rating")
        assert panel.query_one("#encoder-text", TextArea).text == expected.text

        await pilot.press("a", *"Heat (1995) | Genres: Action|Crime|Thriller", "enter", "5", "enter")
        await pilot.pause()
        assert store.profiles.get_profile(DEMO_PROFILE).n_items == 120
        assert panel.query_one("#encoder-text", TextArea).text == session.profile_text(
            DEMO_PROFILE, "movielens-rating").text
        assert panel.query_one("#new-input", Input).value == ""
        table = panel.query_one("#item-table", DataTable)
        table.focus()
        table.move_cursor(row=0)
        await pilot.press("delete")
        await pilot.pause()
        assert store.profiles.get_profile(DEMO_PROFILE).n_items == 119
        await pilot.press("escape")

        await screen.switch_profile("alice")
        assert screen.task_name == "popquorn-offensiveness"
        await send(pilot, "You clearly have no idea what you are talking about.")
        assert no_error(replies(app)[-1])
        active = session.engine.active[0]
        assert active is not None and active.path.parent == store.adapters.adapter_dir("alice")


@pytest.mark.asyncio
async def test_real_bare_title_rating_chart_and_honest_free_chat(session):
    import numpy as np

    from p2p_local import pipeline
    from p2p_local.tui.session import ChatSession
    from p2p_local.tui.widgets import DistChart

    assert isinstance(session, ChatSession)
    card = session.card("movielens-rating")
    app = ChatApp(session, first_run=False, profile=DEMO_PROFILE)
    async with app.run_test(size=SIZE) as pilot:
        screen = app.chat
        await send(pilot, "toy story")  # completed from the demo's own movies
        toy = "Toy Story (1995) | Genres: Adventure|Animation|Children|Comedy|Fantasy"
        assert session.store.conversations.messages(screen.conversation_id)[0].content == toy
        view = replies(app)[-1]
        assert no_error(view) and list(view.dist) == card.labels
        assert abs(sum(view.dist.values()) - 1.0) < 1e-3
        assert view.query_one(DistChart).has_class("-shown")
        # The chart is the distribution the answer was read off: the route's answer to the same question
        # (its adapter, still attached, from the cache) reads it again.
        assert session.engine.active[0] is not None
        exact = session.answer(toy, profile=DEMO_PROFILE, task="movielens-rating").finish().distribution
        assert view.dist == pytest.approx(exact, abs=1e-3)
        assert view.text == pipeline.decode_label(card, np.log(np.array(list(exact.values()))))

        await send(pilot, "Frozen")  # not among the demo's movies: sent as typed
        assert session.store.conversations.messages(screen.conversation_id)[-2].content == "Frozen"
        assert no_error(replies(app)[-1]) and replies(app)[-1].dist

        await pilot.press("ctrl+t")
        app.screen.query_one("OptionList").highlighted = 0  # free chat
        await pilot.press("enter")
        await pilot.pause()
        if not session.free_chat_adapter():
            assert app.sub_title == "demo · free chat + your profile summary · gemma3-270m"
            await send(pilot, "Which movie should I watch tonight?")
            view = replies(app)[-1]
            assert no_error(view) and str(view.query_one(".title").render()).startswith(
                "base model + your profile summary")
            assert session.engine.active == (None, 0.0)  # no adapter was attached for it


@pytest.mark.asyncio
async def test_real_chat_rating_is_the_routes_answer_evaluated_once(session, monkeypatch):
    """The chat renders `pipeline.Route.answer`'s Answer: its text and the distribution it was read off,
    from ONE evaluation of the prompt (the chat used to ask for the distribution again after each answer)."""
    from p2p_local import pipeline
    from p2p_local.engine import Engine

    answers, evaluations = [], []
    real_answer, real_logits = pipeline.Route.answer, Engine.last_logits

    def spy(self, request, **kw):
        answers.append(real_answer(self, request, **kw))
        return answers[-1]

    def count(self, prompt):
        evaluations.append(prompt)
        return real_logits(self, prompt)

    monkeypatch.setattr(pipeline.Route, "answer", spy)
    monkeypatch.setattr(Engine, "last_logits", count)
    app = ChatApp(session, first_run=False, profile=DEMO_PROFILE, task="movielens-rating")
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "Heat (1995) | Genres: Action|Crime|Thriller")
        view = replies(app)[-1]
        assert no_error(view)
        [answer] = answers
        assert len(evaluations) == 1 and evaluations[0] == answer.prompt
        assert view.text == answer.text and view.dist == pytest.approx(answer.distribution, abs=1e-4)


@pytest.mark.asyncio
async def test_real_model_picker_runs_free_chat_on_the_instruct_model_and_names_it(session):
    """F2 -> SmolLM2 (the built-in instruct model): free chat answers from it, the reply and the header name it,
    the switch is noted in the conversation; task answers stay on the bundle's base."""
    from p2p_local.tui.picker_screen import PickerScreen

    app = ChatApp(session, first_run=False, profile=DEMO_PROFILE, task=FREE_CHAT)
    try:
        async with app.run_test(size=SIZE) as pilot:
            screen = app.chat
            await send(pilot, "Hello!")
            assert session.store.conversations.messages(screen.conversation_id)[-1].meta["model"] == "gemma3-270m"
            await pilot.press("f2")
            picker = app.screen
            assert isinstance(picker, PickerScreen)
            options = picker.query_one("OptionList")
            ids = [options.get_option_at_index(i).id for i in range(options.option_count)]
            assert ids[0] == "gemma3-270m" and "smollm2-135m" in ids
            options.highlighted = ids.index("smollm2-135m")
            await pilot.press("enter")
            await until(pilot, lambda: app.sub_title.endswith("· smollm2-135m"), "the switch to SmolLM2")
            await send(pilot, "What movie should I watch tonight?")
            view = replies(app)[-1]
            assert no_error(view) and "smollm2-135m" in str(view.query_one(".title").render()), view.text
            msgs = session.store.conversations.messages(screen.conversation_id)
            assert [m.meta.get("model") for m in msgs if m.role != "user"] == [
                "gemma3-270m", "smollm2-135m", "smollm2-135m"]  # reply, the switch note, reply
            assert session.chat_engine.last_finish is not None  # the instruct model's engine answered
            await pilot.press("ctrl+t")
            app.screen.query_one("OptionList").highlighted = 1 + sorted(app.cards).index("movielens-rating")
            await pilot.press("enter")
            await send(pilot, DEMO_QUESTIONS[0])
            assert "gemma3-270m" in str(replies(app)[-1].query_one(".title").render())
    finally:
        session.use_chat_model(None)  # closes the instruct model's engine (the base is shared)
