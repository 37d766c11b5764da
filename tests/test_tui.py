"""The terminal chat, driven headless with Textual's Pilot.

The app gets its heavy objects from a session; here a small fake with the same surface as
`p2p_local.personalize.Session` (a real Store in a tmp data dir, the real task cards and the real
profile builder; only the model is replaced by scripted replies). The same flows run on the real
session and model in tests/test_tui_real.py.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from textual.widgets import DataTable, Input, OptionList, TextArea

from p2p_local import paths
from p2p_local.data.format import Item as FormatItem
from p2p_local.data.format import builtin_card, builtin_cards
from p2p_local.demo import DEMO_PROFILE, import_demo
from p2p_local.pipeline import Answer, Personalization, Request
from p2p_local.profile import build_profile
from p2p_local.store import Store
from p2p_local.tui import ChatApp
from p2p_local.tui.chat_export import conversation_markdown
from p2p_local.tui.chat_screen import FREE_CHAT, ChatScreen, visible_text
from p2p_local.tui.history_screen import HistoryScreen, snippet
from p2p_local.tui.picker_screen import PickerScreen
from p2p_local.tui.profile_screen import ProfileScreen
from p2p_local.tui.widgets import ChatInput, ComparePair, MessageView, stars

SIZE = (120, 40)
WAIT_S = 20.0  # generous bound for a condition that should become true (not a timing assertion)


@dataclass
class FakeResult:
    adapter_path: Path
    timings_ms: dict
    cached: bool = False
    neutral: bool = False
    empty: bool = False


# The label distribution of a rating reply, by whether the reply was personalized (median 4 / 3).
DISTS = {True: {"1": 0.05, "2": 0.1, "3": 0.2, "4": 0.4, "5": 0.25},
         False: {"1": 0.1, "2": 0.2, "3": 0.4, "4": 0.2, "5": 0.1}}


@dataclass
class FakeSession:
    """Scripted replies; records every call. `gate` (if set) pauses a reply halfway until released.
    A `ChatSession` (tests check it), not thread-safe: its calls are marshalled to the UI thread."""

    store: Store
    threadsafe: bool = False
    chat_adapter: bool = False  # a bundle trained for free chat
    replies: dict = field(default_factory=lambda: {True: "4", False: "3"})
    free_reply: str = "Hello there, I am a small model.\nUser: this part is cut"
    endless: bool = False
    gate: threading.Event | None = None
    calls: list = field(default_factory=list)
    dist_reads: list = field(default_factory=list)  # (text, task) of each rating answer whose distribution was read
    personalized_profiles: list = field(default_factory=list)
    closed: int = 0
    base_model: str = "gemma3-270m"
    chat_model: str | None = None  # free chat's instruct model (`--model`, F2); None: the base
    empty_tasks: set = field(default_factory=set)  # tasks the profile has no items of: the base answers
    model_switches: list = field(default_factory=list)
    finish: str | None = None  # the answer's `finish_reason` as its stream ends ("repeat", "length": cut)

    def task_cards(self):
        return {n: builtin_card(n) for n in builtin_cards()}

    def personalize(self, profile, task=None):
        self.personalized_profiles.append((profile, task))
        return FakeResult(paths.adapters_dir() / f"{profile}.gguf",
                          {"encode_ms": 12.0, "hypernet_ms": 3.0, "write_ms": 2.0, "total_ms": 17.0})

    def profile_text(self, profile, task=None):
        card = builtin_card(task or self.store.profiles.get_profile(profile).task)
        hist = [FormatItem(it.input, it.output, it.time, it.meta) for it in self.store.profiles.items(profile, task=card.name)]
        return build_profile(card, hist)

    def about(self, profile):
        return self.profile_text(profile).summary

    def free_chat_adapter(self):
        return self.chat_adapter

    def chat_models(self):
        return {"gemma3-270m": "Gemma 3 270M (base)", "smollm2-135m": "SmolLM2 135M Instruct"}

    def use_chat_model(self, name):
        self.model_switches.append(name)
        self.chat_model = None if name in (None, self.base_model) else name

    def model_of(self, answer):
        # The route's rule: free chat without an adapter runs on the chat model, when one is chosen.
        on_chat = answer.request.free_chat and self.chat_model and answer.adapter is None
        return self.chat_model if on_chat else self.base_model

    def answer(self, text, *, profile=None, task=None, personalized=True, scale=1.0, transcript=None, system=""):
        assert threading.current_thread() is threading.main_thread()  # the store's thread (see ChatApp.session_call)
        self.calls.append(dict(text=text, profile=profile, task=task, personalized=personalized, scale=scale,
                               transcript=transcript, system=system))
        empty = personalized and profile is not None and task in self.empty_tasks and scale > 1  # the route's rule
        reply = self.free_reply if task == "chat" else self.replies[personalized and not empty] + ("!" * 20)

        card = None if task == "chat" else builtin_card(task)
        answer = Answer(Request(card, text))
        if empty:  # as the route does: the profile without items, no adapter file
            answer.personalization = Personalization(build_profile(card, []), "empty", task)
        fake = self

        class Rating(Answer):  # a rating's distribution, read off the answer's one evaluation, once asked
            @property
            def distribution(self):
                fake.dist_reads.append((text, task))
                return dict(DISTS[personalized])

            @distribution.setter
            def distribution(self, value):
                pass

        if card is not None and card.kind in ("rating", "label"):
            answer = Rating(answer.request)
            if empty:
                answer.personalization = Personalization(build_profile(card, []), "empty", task)

        def pieces():
            try:
                if self.endless:
                    while True:
                        time.sleep(0.005)
                        yield "more "
                chunks = [reply[i : i + 2] for i in range(0, len(reply), 2)]
                half = len(chunks) // 2
                for i, c in enumerate(chunks):
                    if i == half and self.gate is not None:
                        self.gate.wait(WAIT_S)
                    yield c
                answer._text = reply  # what the route sets as its stream ends (`Answer.text`)
                answer.finish_reason = self.finish
            finally:
                self.closed += 1

        answer._steps = pieces()
        return answer


@pytest.fixture
def store(p2p_home):
    s = Store()
    import_demo(s)
    yield s
    s.close()


@pytest.fixture
def fake(store):
    # Rating replies are cut at the first newline, so "4!!!..." streams as is and stays "4!!!...".
    return FakeSession(store)


async def until(pilot, cond, what: str) -> None:
    """Let the app run until `cond()` holds (fails after WAIT_S: the flow is stuck, not slow)."""
    end = time.monotonic() + WAIT_S
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for: {what}")
        await pilot.pause(0.02)


def chat(app) -> ChatScreen:
    return app.chat


async def send(pilot, text: str) -> None:
    screen = chat(pilot.app)
    screen.query_one(ChatInput).load_text(text)
    await pilot.press("enter")
    await until(pilot, lambda: not screen.busy and not screen.query(".streaming"), "the reply to finish")
    await pilot.pause()


def replies(app) -> list[MessageView]:
    return [v for v in chat(app).query(MessageView) if v.role == "assistant"]


# --- pure helpers ---------------------------------------------------------------------------------
def test_visible_text_cuts_at_stops_and_holds_back_partial_stops():
    assert visible_text("Hi there\nUser: more", ("\nUser:",)) == ("Hi there", True)
    assert visible_text("Hi there\nUs", ("\nUser:",)) == ("Hi there", False)  # may become a stop
    assert visible_text("Hi there\n", ("\nUser:", "\n\n\n")) == ("Hi there", False)
    assert visible_text("4", ("\n",)) == ("4", False)
    assert visible_text("4\nMovie", ("\n",)) == ("4", True)
    assert visible_text("plain", ()) == ("plain", False)


def test_stars_and_snippet():
    assert stars("4") == "★★★★☆"
    assert stars("x") == "" and stars("7") == ""
    s = snippet("a " * 100 + "needle in the haystack " + "b " * 100, "needle")
    assert "needle" in s and s.startswith("…")


def test_pick_profile_imports_the_demo_into_an_empty_store(p2p_home):
    from p2p_local.commands.chat import pick_profile

    with Store() as s:
        assert pick_profile(s, None, demo=False) == DEMO_PROFILE
        assert s.profiles.get_profile(DEMO_PROFILE).n_items == 119
        assert s.profiles.get_profile(DEMO_PROFILE).task == "movielens-rating"
        s.profiles.create_profile("alice", task="popquorn-offensiveness")
        conv = s.conversations.new_conversation("alice", "hi")
        s.conversations.add_message(conv, "user", "hi")
        assert pick_profile(s, None, demo=False) == "alice"  # the one used last
        assert pick_profile(s, None, demo=True) == DEMO_PROFILE
        with pytest.raises(Exception, match="no profile named"):
            pick_profile(s, "bob", demo=False)


def test_chat_command_is_registered():
    from p2p_local.cli import build_parser

    args = build_parser().parse_args(["chat", "--profile", "demo", "--task", "movielens-rating", "--compare"])
    assert args.profile == "demo" and args.task == "movielens-rating" and args.compare and callable(args.func)


# --- the app ---------------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_send_streams_a_reply_and_stores_it(fake, store):
    fake.gate = threading.Event()
    app = ChatApp(fake, first_run=False, profile=DEMO_PROFILE)
    async with app.run_test(size=SIZE) as pilot:
        screen = chat(app)
        assert screen.task_name == "movielens-rating"  # the profile's default task
        await until(pilot, lambda: fake.personalized_profiles, "the adapter to be prepared")
        assert fake.personalized_profiles[0] == (DEMO_PROFILE, "movielens-rating")
        # the input's placeholder: how to send and add a line first (narrow terminals show it), then the card's sample
        placeholder = screen.query_one(ChatInput).placeholder
        assert placeholder.startswith("⏎ send · ^j new line") and placeholder.endswith(
            f"movielens-rating: {screen.card.samples[0]}")
        screen.query_one(ChatInput).load_text("Zodiac (2007) | Genres: Crime|Drama|Thriller")
        await pilot.press("enter")
        # Halfway through, the reply is already on screen while the model still "generates".
        await until(pilot, lambda: replies(app) and replies(app)[-1].text, "the first streamed text")
        view = replies(app)[-1]
        assert screen.busy and view.has_class("streaming")
        assert 0 < len(view.text) < len("4" + "!" * 20)
        assert screen.query_one(ChatInput).text == ""  # the input was cleared on send
        fake.gate.set()
        await until(pilot, lambda: not screen.busy, "the reply to finish")
        await pilot.pause()
        assert view.text == "4" + "!" * 20
        assert not view.has_class("streaming")
        call = fake.calls[-1]
        assert call["text"] == "Zodiac (2007) | Genres: Crime|Drama|Thriller"
        assert call["task"] == "movielens-rating" and call["personalized"] and call["scale"] == 1.0
        msgs = store.conversations.messages(screen.conversation_id)
        assert [m.role for m in msgs] == ["user", "assistant"]
        assert msgs[1].content == view.text
        assert msgs[1].meta["mode"] == "personalized" and msgs[1].meta["scale"] == 1.0
        assert msgs[0].meta["task"] == "movielens-rating"


@pytest.mark.asyncio
async def test_enter_sends_but_ctrl_j_adds_a_line(fake):
    app = ChatApp(fake, first_run=False, profile=DEMO_PROFILE, task=FREE_CHAT)
    async with app.run_test(size=SIZE) as pilot:
        inp = chat(app).query_one(ChatInput)
        await pilot.press("h", "i", "ctrl+j", "y", "o")
        assert inp.text == "hi\nyo"
        assert not fake.calls
        await pilot.press("enter")
        await until(pilot, lambda: fake.calls and not chat(app).busy, "the reply")
        assert fake.calls[0]["text"] == "hi\nyo" and fake.calls[0]["task"] == "chat"


@pytest.mark.asyncio
async def test_escape_cancels_the_reply(fake, store):
    fake.endless = True
    app = ChatApp(fake, first_run=False, profile=DEMO_PROFILE, task=FREE_CHAT)
    async with app.run_test(size=SIZE) as pilot:
        screen = chat(app)
        screen.query_one(ChatInput).load_text("tell me a long story")
        await pilot.press("enter")
        await until(pilot, lambda: replies(app) and replies(app)[-1].text, "streamed text")
        assert screen.busy
        await pilot.press("escape")
        await until(pilot, lambda: not screen.busy, "the reply to stop")
        await pilot.pause()
        assert fake.closed == 1  # the generator was closed: llama.cpp stops there
        view = replies(app)[-1]
        assert view.has_class("stopped") and "stopped" in str(view.query_one(".title").render())
        msgs = store.conversations.messages(screen.conversation_id)
        assert msgs[-1].role == "assistant" and msgs[-1].meta["stopped"] is True
        assert msgs[-1].content.startswith("more")
        # The chat goes on after a cancel.
        fake.endless = False
        await send(pilot, "and now?")
        assert replies(app)[-1].text == "Hello there, I am a small model."


@pytest.mark.asyncio
async def test_free_chat_passes_the_transcript_and_cuts_at_the_next_turn(fake, store):
    app = ChatApp(fake, first_run=False, profile=DEMO_PROFILE, task=FREE_CHAT)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "hi")
        assert fake.calls[-1]["task"] == "chat" and fake.calls[-1]["transcript"] == []
        assert replies(app)[-1].text == "Hello there, I am a small model."  # cut at "\nUser:"
        await send(pilot, "who are you?")
        assert fake.calls[-1]["text"] == "who are you?"
        assert fake.calls[-1]["transcript"] == [("user", "hi"), ("assistant", "Hello there, I am a small model.")]
        # Task turns are not part of the free-chat transcript.
        await pilot.press("ctrl+t")
        options = pilot.app.screen.query_one(OptionList)
        options.highlighted = [options.get_option_at_index(i).id for i in range(options.option_count)].index(
            "movielens-rating")
        await pilot.press("enter")
        await send(pilot, "Heat (1995) | Genres: Action")
        assert fake.calls[-1]["task"] == "movielens-rating" and fake.calls[-1]["transcript"] is None
        await pilot.press("ctrl+t")
        pilot.app.screen.query_one(OptionList).highlighted = 0
        await pilot.press("enter")
        await send(pilot, "and?")
        assert [r for r, _ in fake.calls[-1]["transcript"]] == ["user", "assistant"] * 2


@pytest.mark.asyncio
async def test_personalization_toggle_and_scale_keys(fake, store):
    app = ChatApp(fake, first_run=False, profile=DEMO_PROFILE)
    async with app.run_test(size=SIZE) as pilot:
        screen = chat(app)
        await pilot.press("ctrl+g")
        assert screen.personalized is False
        await send(pilot, "Frozen (2013) | Genres: Animation")
        assert fake.calls[-1]["personalized"] is False
        assert replies(app)[-1].text.startswith("3")
        assert store.conversations.messages(screen.conversation_id)[-1].meta["mode"] == "base"
        await pilot.press("ctrl+g", "ctrl+up", "ctrl+up")
        assert screen.personalized and screen.scale == 1.5
        await pilot.press(*["ctrl+up"] * 5)
        assert screen.scale == 2.0  # clamped
        await pilot.press(*["ctrl+down"] * 9)
        assert screen.scale == 0.25  # clamped at one step: x0 would be the base model
        await pilot.press("ctrl+up")
        await send(pilot, "Heat (1995) | Genres: Action|Crime")
        assert fake.calls[-1]["personalized"] is True and fake.calls[-1]["scale"] == 0.5
        assert "×0.50" in str(screen.query_one("#status").render())


@pytest.mark.asyncio
async def test_side_by_side_view(fake, store):
    app = ChatApp(fake, first_run=False, profile=DEMO_PROFILE)
    async with app.run_test(size=SIZE) as pilot:
        screen = chat(app)
        await pilot.press("ctrl+b")
        assert screen.compare
        await send(pilot, "Zodiac (2007) | Genres: Crime|Drama|Thriller")
        pair = screen.query_one(ComparePair)
        assert pair.personal.text.startswith("4") and pair.base.text.startswith("3")
        assert [c["personalized"] for c in fake.calls] == [True, False]
        msgs = store.conversations.messages(screen.conversation_id)
        assert [(m.role, m.meta.get("mode")) for m in msgs] == [
            ("user", None), ("assistant", "personalized"), ("assistant", "base")]
        assert all(m.meta.get("compare") for m in msgs[1:])
        # A resumed conversation shows the pair again.
        await screen.load_conversation(screen.conversation_id)
        await pilot.pause()
        pair = screen.query_one(ComparePair)
        assert pair.personal.text.startswith("4") and pair.base.text.startswith("3")


@pytest.mark.asyncio
async def test_loaded_conversation_continues_with_its_task(fake, store):
    app = ChatApp(fake, first_run=False, profile=DEMO_PROFILE)
    async with app.run_test(size=SIZE) as pilot:
        screen = chat(app)
        await send(pilot, "Zodiac (2007) | Genres: Crime|Drama|Thriller")
        conv = screen.conversation_id
        screen.task_name = None  # the user moved on to free chat ...
        await screen.load_conversation(conv)  # ... then reopened the rating conversation (ctrl+f)
        await pilot.pause()
        assert screen.task_name == "movielens-rating"
        assert store.conversations.messages(conv)[0].meta["task"] == "movielens-rating"


@pytest.mark.asyncio
async def test_task_picker(fake):
    app = ChatApp(fake, first_run=False, profile=DEMO_PROFILE)
    async with app.run_test(size=SIZE) as pilot:
        screen = chat(app)
        await pilot.press("ctrl+t")
        assert isinstance(app.screen, PickerScreen)
        options = app.screen.query_one(OptionList)
        ids = [options.get_option_at_index(i).id for i in range(options.option_count)]
        assert ids[0] == "free chat" and "popquorn-email-rewrite" in ids
        options.highlighted = ids.index("popquorn-email-rewrite")
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, ChatScreen) and screen.task_name == "popquorn-email-rewrite"
        await until(pilot, lambda: (DEMO_PROFILE, "popquorn-email-rewrite") in fake.personalized_profiles,
                    "an adapter for the new task")
        await pilot.press("ctrl+t", "escape")
        assert screen.task_name == "popquorn-email-rewrite"


@pytest.mark.asyncio
async def test_switch_profile(fake, store):
    store.profiles.create_profile("alice", task="popquorn-offensiveness")
    store.profiles.add_item("alice", None, "you are all idiots", "4")
    app = ChatApp(fake, first_run=False, profile=DEMO_PROFILE)
    async with app.run_test(size=SIZE) as pilot:
        screen = chat(app)
        await send(pilot, "Zodiac (2007) | Genres: Crime|Drama|Thriller")
        demo_conv = screen.conversation_id
        await pilot.press("ctrl+r")
        picker = app.screen
        assert isinstance(picker, PickerScreen)
        options = picker.query_one(OptionList)
        ids = [options.get_option_at_index(i).id for i in range(options.option_count)]
        assert ids == ["alice", DEMO_PROFILE, "(none)"]
        options.highlighted = 0
        await pilot.press("enter")
        await until(pilot, lambda: screen.profile == "alice", "the switch")
        assert screen.task_name == "popquorn-offensiveness"  # alice's default task
        assert screen.conversation_id is None and not replies(app)  # alice has no conversation yet
        await until(pilot, lambda: ("alice", "popquorn-offensiveness") in fake.personalized_profiles, "adapter")
        await send(pilot, "what a lovely day")
        assert fake.calls[-1]["profile"] == "alice"
        assert store.conversations.all("alice")[0].id == screen.conversation_id
        # Back to demo: its last conversation comes back.
        await screen.switch_profile(DEMO_PROFILE)
        await pilot.pause()
        assert screen.conversation_id == demo_conv and replies(app)[-1].text.startswith("4")
        # No profile: base model only, personalization keys are off.
        await screen.switch_profile(None)
        await send(pilot, "Heat (1995) | Genres: Action")
        assert fake.calls[-1]["personalized"] is False and fake.calls[-1]["profile"] is None


@pytest.mark.asyncio
async def test_profile_panel_add_and_forget_an_item(fake, store):
    app = ChatApp(fake, first_run=False, profile=DEMO_PROFILE)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: fake.personalized_profiles, "first adapter")
        n_adapters = len(fake.personalized_profiles)
        await pilot.press("ctrl+o")
        panel = app.screen
        assert isinstance(panel, ProfileScreen)
        table = panel.query_one("#item-table", DataTable)
        assert table.row_count == 119
        encoder_text = panel.query_one("#encoder-text", TextArea).text
        assert encoder_text == fake.profile_text(DEMO_PROFILE, "movielens-rating").text  # exactly the encoder's
        summary = fake.profile_text(DEMO_PROFILE, "movielens-rating").summary
        assert summary and str(panel.query_one("#summary-text").render()).startswith(summary.split("\n")[0])

        card = fake.task_cards()["movielens-rating"]  # the add row shows the task's own sample and labels
        assert panel.query_one("#new-input", Input).placeholder == f"input, e.g. {card.samples[0]}"
        assert panel.query_one("#new-output", Input).placeholder == "output (1-5)"
        await pilot.press("a")
        assert panel.focused is panel.query_one("#new-input", Input)
        await pilot.press(*"Heat (1995) | Genres: Action|Crime|Thriller", "enter")
        await pilot.press("9", "enter")  # not a 1-5 rating: refused
        assert store.profiles.get_profile(DEMO_PROFILE).n_items == 119
        panel.query_one("#new-output", Input).value = ""
        await pilot.press("5", "enter")
        await pilot.pause()
        assert store.profiles.get_profile(DEMO_PROFILE).n_items == 120
        newest = store.profiles.items(DEMO_PROFILE, limit=1)[0]
        assert (newest.input, newest.output) == ("Heat (1995) | Genres: Action|Crime|Thriller", "5")
        assert table.row_count == 120
        assert panel.query_one("#encoder-text", TextArea).text == fake.profile_text(DEMO_PROFILE, "movielens-rating").text

        table.focus()
        table.move_cursor(row=0)  # newest first: the item just added
        await pilot.press("delete")
        await pilot.pause()
        assert store.profiles.get_profile(DEMO_PROFILE).n_items == 119
        assert newest.id not in {it.id for it in store.profiles.items(DEMO_PROFILE)}
        assert table.row_count == 119

        await pilot.press("escape")
        assert isinstance(app.screen, ChatScreen)
        # The history changed, so a new adapter is made.
        await until(pilot, lambda: len(fake.personalized_profiles) > n_adapters, "a new adapter")


def test_export_markdown_says_how_each_reply_was_made(p2p_home):
    with Store() as s:
        s.profiles.create_profile("alice", task="t")
        conv = s.conversations.new_conversation("alice", "Weekend films")
        s.conversations.add_message(conv, "user", "Which thriller should I watch tonight?")
        s.conversations.add_message(conv, "assistant", "Try Heat (1995).", {"mode": "personalized", "scale": 1.0, "adapter": "x"})
        md = conversation_markdown(s, conv)
        assert md.startswith("# Weekend films")
        assert "**Assistant** (free chat, personalized x1):" in md and "Try Heat (1995)." in md
        s.conversations.add_message(conv, "user", "Heat (1995)", {"task": "movielens-rating"})
        s.conversations.add_message(conv, "assistant", "4", {"mode": "personalized", "scale": 0.5, "task": "movielens-rating",
                                               "dist": {"1": 0.1, "2": 0.1, "3": 0.2, "4": 0.4, "5": 0.2}})
        s.conversations.add_message(conv, "assistant", "I like horror.", {"mode": "personalized", "free_chat": "summary",
                                                            "task": None, "scale": None})
        md = conversation_markdown(s, conv)
        assert "**You** (movielens-rating):" in md and "**Assistant** (movielens-rating, personalized x0.5):" in md
        assert "_label distribution: 1: 10% · 2: 10% · 3: 20% · 4: 40% · 5: 20%_" in md
        assert "**Assistant** (free chat, base model + profile summary):" in md  # never "(personalized)"


@pytest.mark.asyncio
async def test_search_export_copy_and_resume(fake, store):
    app = ChatApp(fake, first_run=False, profile=DEMO_PROFILE)
    async with app.run_test(size=SIZE) as pilot:
        screen = chat(app)
        await send(pilot, "Zodiac (2007) | Genres: Crime|Drama|Thriller")
        first = screen.conversation_id
        await pilot.press("ctrl+n")
        assert screen.conversation_id is None and not replies(app)
        await send(pilot, "Frozen (2013) | Genres: Animation")
        second = screen.conversation_id
        assert second != first

        # Copy the last reply, and a focused message with `c`.
        await pilot.press("ctrl+l")
        assert app.clipboard == replies(app)[-1].text
        user_msg = [v for v in screen.query(MessageView) if v.role == "user"][-1]
        user_msg.focus()
        await pilot.press("c")
        assert app.clipboard == "Frozen (2013) | Genres: Animation"
        screen.query_one(ChatInput).focus()

        # Search finds the first conversation; choosing the hit opens it.
        await pilot.press("ctrl+f")
        history = app.screen
        assert isinstance(history, HistoryScreen)
        results = history.query_one("#results", OptionList)
        assert results.option_count == 2  # empty query: both conversations
        await pilot.press(*"zodiac")
        await pilot.pause()
        assert results.option_count == 1
        await pilot.press("down", "enter")
        await until(pilot, lambda: screen.conversation_id == first, "the first conversation to open")
        assert isinstance(app.screen, ChatScreen)
        assert [v.text for v in screen.query(MessageView) if v.role == "user"] == [
            "Zodiac (2007) | Genres: Crime|Drama|Thriller"]

        await pilot.press("ctrl+s")
        out = paths.data_dir() / "exports" / f"conversation-{first}.md"
        text = out.read_text(encoding="utf-8")
        assert "Zodiac (2007)" in text and "(movielens-rating, personalized x1, gemma3-270m)" in text
        assert "_label distribution: " in text  # the rating's bars, as numbers
        assert out.stat().st_mode & 0o777 == 0o600 and out.parent.stat().st_mode & 0o777 == 0o700

    # A new app resumes the last conversation of the profile.
    app2 = ChatApp(fake, first_run=False, profile=DEMO_PROFILE)
    async with app2.run_test(size=SIZE) as pilot:
        assert chat(app2).conversation_id == second
        assert [v.text for v in chat(app2).query(MessageView) if v.role == "user"] == [
            "Frozen (2013) | Genres: Animation"]
    app3 = ChatApp(fake, first_run=False, profile=DEMO_PROFILE, resume=False)
    async with app3.run_test(size=SIZE) as pilot:
        assert chat(app3).conversation_id is None


@pytest.mark.asyncio
async def test_a_failing_answer_is_shown_not_fatal(fake, store):
    from p2p_local.errors import EngineError

    def broken(*a, **kw):
        raise EngineError("prompt does not fit the context", hint="shorten it")

    fake.answer = broken
    app = ChatApp(fake, first_run=False, profile=DEMO_PROFILE)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "Zodiac (2007) | Genres: Crime")
        view = replies(app)[-1]
        assert "does not fit" in view.text and "error" in str(view.query_one(".title").render())
        assert app.is_running


@pytest.mark.asyncio
async def test_new_conversation_while_streaming_keeps_the_reply_in_its_own_conversation(fake, store):
    fake.endless = True
    app = ChatApp(fake, first_run=False, profile=DEMO_PROFILE, task=FREE_CHAT)
    async with app.run_test(size=SIZE) as pilot:
        screen = chat(app)
        screen.query_one(ChatInput).load_text("a long one please")
        await pilot.press("enter")
        await until(pilot, lambda: replies(app) and replies(app)[-1].text, "streamed text")
        old = screen.conversation_id
        await pilot.press("ctrl+n")
        await until(pilot, lambda: not screen.busy, "the reply to stop")
        assert screen.conversation_id is None and not replies(app)
        msgs = store.conversations.messages(old)
        assert [m.role for m in msgs] == ["user", "assistant"] and msgs[1].meta["stopped"] is True


@pytest.mark.asyncio
async def test_resumed_side_by_side_survives_a_missing_half(fake, store):
    conv = store.conversations.new_conversation(DEMO_PROFILE, "pairs")
    store.conversations.add_message(conv, "user", "q1", {"task": "movielens-rating"})
    store.conversations.add_message(conv, "assistant", "4", {"mode": "personalized", "compare": True, "scale": 1.0})
    store.conversations.add_message(conv, "user", "q2", {"task": "movielens-rating"})
    store.conversations.add_message(conv, "assistant", "5", {"mode": "personalized", "compare": True, "scale": 1.0})
    store.conversations.add_message(conv, "assistant", "2", {"mode": "base", "compare": True})
    app = ChatApp(fake, first_run=False, profile=DEMO_PROFILE)
    async with app.run_test(size=SIZE):
        screen = chat(app)
        assert screen.conversation_id == conv
        shown = [type(w).__name__ for w in screen.messages.children]
        assert shown == ["MessageView", "MessageView", "MessageView", "ComparePair"]
        pair = screen.query_one(ComparePair)
        assert (pair.personal.text, pair.base.text) == ("5", "2")
        assert "★★★★★" in str(pair.personal.body.source)


# --- issue 10/12: the session protocol, honest free chat, the first run, the profile panel, rating charts,
# --- bare movie titles ------------------------------------------------------------------------------
def notes_of(app) -> list[tuple[str, str]]:
    """Record the app's notifications as (title, message) (the toasts themselves time out)."""
    notes: list[tuple[str, str]] = []
    real = app.notify

    def notify(message, *, title="", **kw):
        notes.append((title, str(message)))
        return real(message, title=title, **kw)

    app.notify = notify
    return notes


def test_the_session_protocol(fake):
    from p2p_local.personalize import Session
    from p2p_local.tui.session import AdapterResult, ChatSession

    assert isinstance(fake, ChatSession)
    assert isinstance(fake.personalize(DEMO_PROFILE, "movielens-rating"), AdapterResult)
    members = [n for n in vars(ChatSession) if not n.startswith("_")]
    assert {"store", "answer", "about", "free_chat_adapter"} <= set(members)
    assert all(hasattr(Session, n) for n in members)  # the real one: isinstance in tests/test_tui_real.py


def test_bar_chart_and_title_catalogue(store):
    from p2p_local.tui.titles import Catalogue, needs_completion
    from p2p_local.tui.widgets import bar, dist_chart

    assert bar(1.0, 4) == "████" and bar(0.0, 4) == "    " and bar(0.5, 3) == "█▌ "
    lines = dist_chart(DISTS[True], "4").plain.split("\n")
    assert [ln.split()[0] for ln in lines] == ["5", "4", "3", "2", "1"] and lines[1].endswith("40%")

    card = builtin_card("movielens-rating")
    assert needs_completion(card, "Frozen") and not needs_completion(card, "Frozen (2013) | Genres: Animation")
    assert not needs_completion(builtin_card("popquorn-offensiveness"), "Frozen") and not needs_completion(None, "x")
    cat = Catalogue(store, builtin_card("movielens-rating"))
    assert [m.text for m in cat.lookup("toy story")] == [
        "Toy Story (1995) | Genres: Adventure|Animation|Children|Comedy|Fantasy"]
    assert [m.title for m in cat.lookup("The Matrix")] == ["Matrix, The (1999)"]  # articles either end
    assert len(cat.lookup("Star Wars")) == 4  # no exact title: the titles that begin so
    assert [m.title for m in cat.lookup("Star Wars (1980)")] == [
        "Star Wars: Episode V - The Empire Strikes Back (1980)"]
    assert cat.lookup("Frozen") == []
    # Another profile's movies count too, the profile's own first; a new item is seen at once.
    store.profiles.create_profile("alice", task="movielens-rating")
    store.profiles.add_item("alice", None, "Frozen (2013) | Genres: Adventure|Animation|Comedy", "2")
    assert [m.title for m in cat.lookup("frozen", "demo")] == ["Frozen (2013)"]


@pytest.mark.asyncio
async def test_free_chat_says_it_is_the_base_model_with_the_profile_summary(fake, store):
    app = ChatApp(fake, first_run=False, profile=DEMO_PROFILE, task=FREE_CHAT)
    async with app.run_test(size=SIZE) as pilot:
        screen = chat(app)
        assert app.sub_title == "demo · free chat + your profile summary · gemma3-270m"  # the model, named
        status = str(screen.query_one("#status").render())
        assert "base model + your profile summary" in status and "personalized" not in status
        await until(pilot, lambda: screen.adapter_note == "no adapter in free chat", "the adapter note")
        assert fake.personalized_profiles == []  # no task adapter is made for free chat
        await send(pilot, "hi")
        title = str(replies(app)[-1].query_one(".title").render())
        assert title.startswith("base model + your profile summary") and "personalized" not in title
        msg = store.conversations.messages(screen.conversation_id)[-1]
        assert msg.meta["free_chat"] == "summary" and msg.meta["scale"] is None
        assert "dist" not in msg.meta and fake.dist_reads == []
        await pilot.press("ctrl+up")
        assert screen.scale == 1.0  # no adapter: no strength to set
        # Side by side: the base model alone vs the base model with the summary.
        await pilot.press("ctrl+b")
        await send(pilot, "and?")
        pair = screen.query_one(ComparePair)
        assert str(pair.personal.query_one(".title").render()).startswith("base model + your profile summary")
        assert str(pair.base.query_one(".title").render()).startswith("base model ·")
        await pilot.press("ctrl+g", "ctrl+b")  # personalization off: the base model, and it says so
        assert app.sub_title == "demo · free chat · gemma3-270m"
        assert "base model" in str(screen.query_one("#status").render())

    fake.chat_adapter = True  # a bundle trained for free chat: its adapter, and the title says so
    app = ChatApp(fake, first_run=False, profile=DEMO_PROFILE, task=FREE_CHAT, resume=False)
    async with app.run_test(size=SIZE) as pilot:
        assert app.sub_title == "demo · free chat · free-chat adapter · gemma3-270m"
        await until(pilot, lambda: (DEMO_PROFILE, "chat") in fake.personalized_profiles, "the free-chat adapter")
        await send(pilot, "hi")
        assert str(replies(app)[-1].query_one(".title").render()).startswith("personalized ×1.00")


@pytest.mark.asyncio
async def test_rating_answers_show_their_label_distribution(fake, store):
    from p2p_local.tui.widgets import DistChart

    app = ChatApp(fake, first_run=False, profile=DEMO_PROFILE, compare=True)
    async with app.run_test(size=SIZE) as pilot:
        screen = chat(app)
        await send(pilot, "Zodiac (2007) | Genres: Crime|Drama|Thriller")
        pair = screen.query_one(ComparePair)
        # Each reply's own distribution: read right after it, under the adapter it was answered with.
        assert pair.personal.dist == DISTS[True] and pair.base.dist == DISTS[False]
        assert fake.dist_reads == [("Zodiac (2007) | Genres: Crime|Drama|Thriller", "movielens-rating")] * 2
        chart = pair.personal.query_one(DistChart)
        assert chart.has_class("-shown") and "40%" in str(chart.render())
        msgs = store.conversations.messages(screen.conversation_id)
        assert [m.meta.get("dist") for m in msgs[1:]] == [DISTS[True], DISTS[False]]
        # A resumed conversation shows the charts again.
        await screen.load_conversation(screen.conversation_id)
        await pilot.pause()
        assert screen.query_one(ComparePair).personal.query_one(DistChart).has_class("-shown")
        # A generation task has no chart.
        screen.task_name = "popquorn-email-rewrite"
        await pilot.press("ctrl+b")
        await send(pilot, "hey, send me the file")
        assert not replies(app)[-1].query(DistChart) and len(fake.dist_reads) == 2


@pytest.mark.asyncio
async def test_a_bare_movie_title_is_completed_from_the_profiles_movies(fake, store):
    app = ChatApp(fake, first_run=False, profile=DEMO_PROFILE)
    async with app.run_test(size=SIZE) as pilot:
        notes = notes_of(app)
        screen = chat(app)
        await send(pilot, "toy story")  # one match: completed at once, and said so
        toy = "Toy Story (1995) | Genres: Adventure|Animation|Children|Comedy|Fantasy"
        assert fake.calls[-1]["text"] == toy and fake.dist_reads[-1][0] == toy
        assert store.conversations.messages(screen.conversation_id)[-2].content == toy
        assert notes[-1] == ("completed from your movies", toy)

        screen.query_one(ChatInput).load_text("Star Wars")  # several: a picker
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, PickerScreen), "the picker")
        options = app.screen.query_one(OptionList)
        ids = [options.get_option_at_index(i).id for i in range(options.option_count)]
        assert len(ids) == 5 and all("Star Wars" in i and "| Genres:" in i for i in ids[:4]) and ids[4] == "(send as typed)"
        options.highlighted = 1
        await pilot.press("enter")
        await until(pilot, lambda: fake.calls[-1]["text"] == ids[1] and not screen.busy, "the chosen movie's answer")

        screen.query_one(ChatInput).load_text("Star Wars")  # Esc: back to the input, nothing sent
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, PickerScreen), "the picker")
        n = len(fake.calls)
        await pilot.press("escape")
        await pilot.pause()
        assert len(fake.calls) == n and screen.query_one(ChatInput).text == "Star Wars"
        screen.query_one(ChatInput).clear()

        await send(pilot, "Frozen")  # unknown: sent as typed, with a notice
        assert fake.calls[-1]["text"] == "Frozen" and notes[-1][0] == "no match"
        await send(pilot, "Heat (1995) | Genres: Action|Crime|Thriller")  # a full query is left alone
        assert fake.calls[-1]["text"] == "Heat (1995) | Genres: Action|Crime|Thriller"

        await pilot.press("ctrl+t")
        app.screen.query_one(OptionList).highlighted = 0  # free chat: a title is just text
        await pilot.press("enter")
        await send(pilot, "toy story")
        assert fake.calls[-1]["text"] == "toy story"


@pytest.mark.asyncio
async def test_first_run_offers_the_demo_git_and_a_file(fake, store, tmp_path):
    import os
    import subprocess

    from p2p_local.tui.first_run_screen import FirstRunScreen

    # Only the demo: the first-run screen opens; `d` goes on with the demo.
    app = ChatApp(fake, profile=DEMO_PROFILE)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, FirstRunScreen), "the first-run screen")
        await pilot.press("d")
        await until(pilot, lambda: isinstance(app.screen, ChatScreen), "the chat")
        assert chat(app).profile == DEMO_PROFILE and not [p for p in store.profiles.list_profiles() if p.name != "demo"]

    # A git repository: `g`, the path, Enter.
    repo = tmp_path / "proj"
    repo.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "Ada", "GIT_AUTHOR_EMAIL": "ada@example.org", "GIT_COMMITTER_NAME": "Ada",
           "GIT_COMMITTER_EMAIL": "ada@example.org", "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(tmp_path)}

    def git(*args):
        subprocess.run(["git", "-C", str(repo), *args], env=env, check=True, capture_output=True)

    git("init", "-q")
    git("config", "user.email", "ada@example.org")
    for i in range(3):
        (repo / f"f{i}.py").write_text(f"x = {i}\n")
        git("add", "-A")
        git("commit", "-q", "-m", f"Add module {i}")
    assert not ChatApp(fake, profile=DEMO_PROFILE).first_run  # answered once: the chat opens next time
    app = ChatApp(fake, profile=DEMO_PROFILE, first_run=True)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, FirstRunScreen), "the first-run screen")
        screen = app.screen
        await pilot.press("g")
        assert screen.focused is screen.query_one("#git-path", Input) and screen.focused.value == "."
        screen.focused.value = str(tmp_path / "nope")
        await pilot.press("enter")
        await until(pilot, lambda: "nope" in str(screen.query_one("#first-run-status").render()), "the error")
        assert not store.profiles.profile_exists("me") and app.screen is screen  # nothing left behind
        screen.query_one("#git-path", Input).value = str(repo)
        screen.query_one("#git-path", Input).focus()
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, ChatScreen), "the chat")
        assert chat(app).profile == "me" and chat(app).task_name == "commit-subject"
        assert store.profiles.get_profile("me").n_items == 3

    # Now there is a profile of one's own: no first-run screen, but the palette's "Import history" opens it.
    # A file: `f`, the path, Enter (into another profile name).
    data = tmp_path / "mine.jsonl"
    data.write_text('{"user_id": "u", "task": "movielens-rating", "items": ['
                    '{"input": "Heat (1995) | Genres: Action|Crime|Thriller", "output": "5", "time": 1}]}\n')
    app = ChatApp(fake, profile="me")
    async with app.run_test(size=SIZE) as pilot:
        assert isinstance(app.screen, ChatScreen)
        chat(app).action_import()
        await until(pilot, lambda: isinstance(app.screen, FirstRunScreen), "the import screen")
        await pilot.pause()
        screen = app.screen
        screen.query_one("#profile-name", Input).value = "films"
        await pilot.press("f")
        assert screen.focused is screen.query_one("#file-path", Input)
        await pilot.press(*str(data), "enter")
        await until(pilot, lambda: isinstance(app.screen, ChatScreen), "the chat")
        assert chat(app).profile == "films" and chat(app).task_name == "movielens-rating"
        assert [it.input for it in store.profiles.items("films")] == ["Heat (1995) | Genres: Action|Crime|Thriller"]


@pytest.mark.asyncio
async def test_profile_panel_shows_what_the_adapter_is_built_from_exports_and_forgets(fake, store, monkeypatch):
    from p2p_local import adapter_export as adapter_cmd
    from p2p_local.tui.ask_screen import AskScreen
    from p2p_local.tui.first_run_screen import FirstRunScreen

    exports = []

    def export_adapter(session, profile, to, *, task=None, query=None, fmt="gguf", mode=0o600):
        exports.append((session, profile, to, task))
        return adapter_cmd.Export(to / "x.gguf", to / "x.README.md", task, profile, "f" * 16, to)

    monkeypatch.setattr(adapter_cmd, "export_adapter", export_adapter)
    app = ChatApp(fake, first_run=False, profile=DEMO_PROFILE)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+o")
        panel = app.screen
        head = str(panel.query_one("#profile-head").render())
        assert "119 items (movielens-rating 119)" in head and "last change 20" in head
        assert "adapter for movielens-rating: built from 119 items · none made yet" in head

        await pilot.press("e")  # export: the folder is asked, prefilled
        assert isinstance(app.screen, AskScreen)
        assert app.screen.query_one(Input).value == str(paths.data_dir() / "exports")
        await pilot.press("enter")
        await until(pilot, lambda: exports, "the export")
        assert exports == [(fake, DEMO_PROFILE, paths.data_dir() / "exports", "movielens-rating")]

        await pilot.press("ctrl+x")  # forget: the name must be typed
        assert isinstance(app.screen, AskScreen)
        await pilot.press(*"demx", "enter")
        await pilot.pause()
        assert app.screen is panel and store.profiles.profile_exists(DEMO_PROFILE)
        await pilot.press("ctrl+x", *DEMO_PROFILE, "enter")
        # Gone; no profile of one's own is left: the chat goes on without one and offers an import.
        await until(pilot, lambda: isinstance(app.screen, FirstRunScreen), "the first-run screen")
        assert not store.profiles.profile_exists(DEMO_PROFILE) and chat(app).profile is None
        await pilot.press("escape")
        assert isinstance(app.screen, ChatScreen)
