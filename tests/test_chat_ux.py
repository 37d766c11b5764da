"""The chat as users of oterm and Ollama expect it (the issue "the chat as a new user finds it"), driven headless
with Textual's Pilot on tests/test_tui.py's FakeSession: the model is named in the header, on each reply and in
the export, and a switch leaves a note; Esc and Ctrl-C stop an answer (the partial text kept, marked); ↑/↓
recall earlier prompts; the footer fits 80 columns; every cut carries one mark (chat, `p2p ask`, export); a
profile without items of the task answers from the base and says why; conversations are renamed, deleted
(store rows, search index and export gone) and keep their own system prompt and strength.
"""

from __future__ import annotations

import json
import sqlite3
import types

import pytest
from textual.widgets import Footer, Input, OptionList

from p2p_local import paths, pipeline
from p2p_local.data.format import builtin_card
from p2p_local.demo import DEMO_PROFILE, import_demo
from p2p_local.pipeline import CUT_MARKS, Answer, Request, cut_mark
from p2p_local.store import Store
from p2p_local.store.conversations import conversation_export_path
from p2p_local.tui import ChatApp
from p2p_local.tui.ask_screen import AskScreen
from p2p_local.tui.chat_export import conversation_markdown
from p2p_local.tui.chat_screen import FREE_CHAT, ChatScreen
from p2p_local.tui.history_screen import HistoryScreen
from p2p_local.tui.picker_screen import PickerScreen
from p2p_local.tui.widgets import ChatInput, MessageView
from tests.test_tui import SIZE, FakeSession, chat, notes_of, replies, send, until

EMAIL = "popquorn-email-rewrite"


@pytest.fixture
def store(p2p_home):
    s = Store()
    import_demo(s)
    yield s
    s.close()


@pytest.fixture
def fake(store):
    return FakeSession(store)


def title_of(view: MessageView) -> str:
    return str(view.query_one(".title").render())


def footer_keys(app) -> dict:
    return {k.key: k for k in app.screen.query_one(Footer).query("FooterKey")}


async def answer_question(pilot, question: str, value: str) -> None:
    """Type `value` into the AskScreen that is open (replacing its text) and press Enter."""
    await until(pilot, lambda: isinstance(pilot.app.screen, AskScreen) and pilot.app.screen.query(Input),
                f"the question {question!r}")
    pilot.app.screen.query_one(Input).value = value
    await pilot.press("enter")
    await pilot.pause()


# --- 1. the model is part of the conversation -----------------------------------------------------------
@pytest.mark.asyncio
async def test_the_model_is_named_in_the_header_on_each_reply_and_a_switch_leaves_a_note(fake, store):
    app = ChatApp(fake, first_run=False, profile=DEMO_PROFILE, task=FREE_CHAT)
    async with app.run_test(size=SIZE) as pilot:
        screen = chat(app)
        assert app.sub_title.endswith("· gemma3-270m")
        await send(pilot, "hi")
        first = replies(app)[-1]
        assert "gemma3-270m" in title_of(first) and title_of(first).startswith("base model + your profile summary")
        assert store.conversations.messages(screen.conversation_id)[-1].meta["model"] == "gemma3-270m"

        await pilot.press("f2")  # the model picker lists the registered models, the current one marked
        picker = app.screen
        assert isinstance(picker, PickerScreen) and picker.current == "gemma3-270m"
        options = picker.query_one(OptionList)
        ids = [options.get_option_at_index(i).id for i in range(options.option_count)]
        assert ids == ["gemma3-270m", "smollm2-135m"]
        options.highlighted = 1
        await pilot.press("enter")
        await until(pilot, lambda: fake.model_switches == ["smollm2-135m"], "the model switch")
        await until(pilot, lambda: app.sub_title.endswith("· smollm2-135m"), "the header to name the new model")
        # The switch is marked in the conversation, and stored with its messages.
        note = store.conversations.messages(screen.conversation_id)[-1]
        assert note.role == "system" and note.meta == {"note": "model", "model": "smollm2-135m",
                                                       "previous": "gemma3-270m"}
        assert "smollm2-135m" in [v for v in screen.query(MessageView) if v.role == "system"][-1].text

        await send(pilot, "and now?")
        reply = replies(app)[-1]
        assert title_of(reply).startswith("chat model + your profile summary · smollm2-135m")
        meta = store.conversations.messages(screen.conversation_id)[-1].meta
        assert meta["model"] == "smollm2-135m" and meta["chat_model"] is True
        assert "gemma3-270m" in title_of(first)  # the earlier reply still says who answered it
        # Task answers stay on the bundle's base, and say so.
        screen.task_name = "movielens-rating"
        screen.refresh_status()
        assert app.sub_title == "demo · movielens-rating · gemma3-270m"
        await send(pilot, "Heat (1995) | Genres: Action|Crime|Thriller")
        assert "personalized ×1.00 · gemma3-270m" in title_of(replies(app)[-1])
        conv = screen.conversation_id
        md = conversation_markdown(store, conv)
        assert "(free chat, base model + profile summary, gemma3-270m)" in md
        assert "(free chat, chat model + profile summary, smollm2-135m)" in md
        assert "(movielens-rating, personalized x1, gemma3-270m)" in md and "**Note**:" in md

    # Resumed, the conversation shows the switch note where it happened.
    app = ChatApp(fake, first_run=False, profile=DEMO_PROFILE, task=FREE_CHAT)
    async with app.run_test(size=SIZE) as pilot:
        notes = [v for v in chat(app).query(MessageView) if v.role == "system"]
        assert chat(app).conversation_id == conv and [title_of(v) for v in notes] == ["note · model"]


@pytest.mark.asyncio
async def test_a_resumed_conversation_notes_the_other_model_before_its_next_reply(fake, store):
    app = ChatApp(fake, first_run=False, profile=DEMO_PROFILE, task=FREE_CHAT)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "hi")  # answered by the base
    fake.chat_model = "smollm2-135m"  # `p2p chat --model smollm2-135m` the next day
    app = ChatApp(fake, first_run=False, profile=DEMO_PROFILE, task=FREE_CHAT)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "hello again")
        roles = [(m.role, m.meta.get("model")) for m in store.conversations.messages(chat(app).conversation_id)]
        assert roles == [("user", None), ("assistant", "gemma3-270m"), ("system", "smollm2-135m"), ("user", None),
                         ("assistant", "smollm2-135m")]


def test_chat_model_opens_free_chat_unless_a_task_is_given(fake, store, monkeypatch):
    import argparse
    import contextlib

    from p2p_local import personalize, tui
    from p2p_local.commands import chat as chat_cmd

    opened = []

    class App:
        def __init__(self, session, **kw):
            opened.append(kw)

        def run(self):
            pass

    monkeypatch.setattr(chat_cmd, "_on_a_terminal", lambda: True)
    monkeypatch.setattr(personalize.Session, "open", classmethod(lambda cls, **kw: contextlib.nullcontext(fake)))
    monkeypatch.setattr(tui, "ChatApp", App)
    args = dict(profile=None, demo=False, base=False, compare=False, new=False)
    assert chat_cmd.run(argparse.Namespace(model="smollm2-135m", task=None, **args)) == 0
    assert chat_cmd.run(argparse.Namespace(model="smollm2-135m", task="movielens-rating", **args)) == 0
    assert chat_cmd.run(argparse.Namespace(model=None, task=None, **args)) == 0
    assert [kw["task"] for kw in opened] == [FREE_CHAT, "movielens-rating", None]


# --- 2. keys as in oterm and a shell ------------------------------------------------------------------
@pytest.mark.asyncio
async def test_ctrl_c_stops_the_answer_and_keeps_the_partial_text_marked(fake, store):
    fake.endless = True
    app = ChatApp(fake, first_run=False, profile=DEMO_PROFILE, task=FREE_CHAT)
    async with app.run_test(size=(80, 24)) as pilot:
        notes = notes_of(app)
        screen = chat(app)
        screen.query_one(ChatInput).load_text("tell me a long story")
        await pilot.press("enter")
        await until(pilot, lambda: replies(app) and replies(app)[-1].text, "streamed text")
        keys = footer_keys(app)  # while streaming: how to stop, not how to send
        assert "escape" in keys and "enter" not in keys
        await pilot.press("ctrl+c")
        await until(pilot, lambda: not screen.busy, "the reply to stop")
        await pilot.pause()
        assert fake.closed == 1 and app.is_running  # llama.cpp stopped, the app did not quit
        view = replies(app)[-1]
        assert view.text.startswith("more") and view.body.source.endswith(CUT_MARKS["stopped"])
        assert view.has_class("stopped") and "stopped" in title_of(view)
        stored = store.conversations.messages(screen.conversation_id)[-1]
        assert stored.meta["stopped"] is True and stored.meta["cut"] == "stopped"
        assert stored.content == view.text  # the mark is shown, never part of the text (copied: the answer alone)
        # Nothing streaming: Ctrl-C is Textual's own again (it tells how to quit), the app goes on.
        assert "escape" not in footer_keys(app) and "enter" in footer_keys(app)
        await pilot.press("ctrl+c")
        await pilot.pause()
        assert app.is_running and any("ctrl+q" in text for _, text in notes), notes
        fake.endless = False
        await send(pilot, "and now?")
        assert replies(app)[-1].text == "Hello there, I am a small model."


@pytest.mark.asyncio
async def test_up_and_down_recall_earlier_prompts_of_the_conversation(fake, store):
    app = ChatApp(fake, first_run=False, profile=DEMO_PROFILE, task=FREE_CHAT)
    async with app.run_test(size=SIZE) as pilot:
        inp = chat(app).query_one(ChatInput)
        await send(pilot, "first question")
        await send(pilot, "second\nof two lines")
        await pilot.press("up")
        assert inp.text == "second\nof two lines"
        await pilot.press("up")
        assert inp.text == "first question"
        await pilot.press("up")  # the oldest stays
        assert inp.text == "first question"
        await pilot.press("down", "down")
        assert inp.text == ""  # past the newest: the (empty) draft
        await pilot.press(*"dra", "up")
        assert inp.text == "second\nof two lines"
        await pilot.press("down")
        assert inp.text == "dra"  # the draft comes back
        inp.load_text("two\nlines")  # a multi-line text of one's own: ↑ moves the cursor
        inp.move_cursor((1, 0))
        await pilot.press("up")
        assert inp.text == "two\nlines" and inp.cursor_location[0] == 0
        inp.clear()
    # Reopened, the conversation's prompts are there to recall; a new conversation starts with none.
    app = ChatApp(fake, first_run=False, profile=DEMO_PROFILE, task=FREE_CHAT)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("up")
        assert chat(app).query_one(ChatInput).text == "second\nof two lines"
        chat(app).query_one(ChatInput).clear()
        await pilot.press("ctrl+n", "up")
        assert chat(app).query_one(ChatInput).text == ""


@pytest.mark.asyncio
@pytest.mark.parametrize("size", [(80, 24), (160, 48)])
async def test_the_footer_fits_and_says_how_to_add_a_line(fake, store, size):
    fake.endless = True
    app = ChatApp(fake, first_run=False, profile=DEMO_PROFILE)
    async with app.run_test(size=size) as pilot:
        await pilot.pause(0.2)
        screen = chat(app)
        await until(pilot, lambda: all(k.region.width > 0 for k in app.screen.query_one(Footer).query("FooterKey")),
                    "the footer laid out")

        def fits() -> list[str]:
            footer = app.screen.query_one(Footer)
            keys = sorted(footer.query("FooterKey"), key=lambda k: k.region.x)
            assert footer.virtual_size.width <= size[0], footer.virtual_size
            for a, b in zip(keys, keys[1:], strict=False):
                assert a.region.right <= b.region.x, (a.key, a.region, b.key, b.region)  # none overlaps
            assert all(k.region.width > 0 and k.region.right <= size[0] for k in keys)
            return [k.key for k in keys]

        shown = fits()
        assert {"enter", "ctrl+j", "ctrl+q", "ctrl+t", "f2", "ctrl+p"} <= set(shown), shown
        assert footer_keys(app)["ctrl+j"].description == "line"  # multi-line input, said in the footer
        assert "^j new line" in screen.query_one(ChatInput).placeholder  # ... and in the input
        screen.query_one(ChatInput).load_text("a long one")
        await pilot.press("enter")
        await until(pilot, lambda: screen.busy and "escape" in footer_keys(app), "the stop key")
        await until(pilot, lambda: all(k.region.width > 0 for k in app.screen.query_one(Footer).query("FooterKey")),
                    "the footer laid out again")  # a loaded machine lays the new key out a frame later
        assert "escape" in fits()
        await pilot.press("escape")
        await until(pilot, lambda: not screen.busy, "the reply to stop")


# --- 3. one mark for every cut ---------------------------------------------------------------------------
def test_one_mark_table():
    assert cut_mark("length") == pipeline.CUT_MARK == CUT_MARKS["length"]
    assert cut_mark("repeat") and cut_mark("stopped") and len(set(CUT_MARKS.values())) == 3
    assert cut_mark("stop") == "" and cut_mark(None) == ""  # an answer that ended by itself carries none


@pytest.mark.asyncio
async def test_a_repeat_cut_is_marked_in_the_chat_and_the_export(fake, store):
    fake.finish = "repeat"
    app = ChatApp(fake, first_run=False, profile=DEMO_PROFILE, task=EMAIL)
    async with app.run_test(size=SIZE) as pilot:
        screen = chat(app)
        await send(pilot, "hey, send me the file")
        view = replies(app)[-1]
        assert view.body.source.endswith(CUT_MARKS["repeat"]) and "cut: repeat" in title_of(view)
        stored = store.conversations.messages(screen.conversation_id)[-1]
        assert stored.meta["cut"] == "repeat" and not stored.content.endswith(CUT_MARKS["repeat"])
        md = conversation_markdown(store, screen.conversation_id)
        assert stored.content + CUT_MARKS["repeat"] in md and "cut: repeat)" in md
        await screen.load_conversation(screen.conversation_id)  # reopened: the same mark
        await pilot.pause()
        assert replies(app)[-1].body.source.endswith(CUT_MARKS["repeat"])


class _AskSession:
    """What `p2p ask` needs of a Session, answering free chat with scripted pieces (no model)."""

    def __init__(self, pieces, finish="stop", interrupt=False):
        self.pieces, self.finish, self.interrupt = pieces, finish, interrupt
        self.bundle = None
        self.card = builtin_card

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def answer(self, text, **kw):
        answer = Answer(Request(None, text))

        def steps():
            yield from self.pieces
            if self.interrupt:
                raise KeyboardInterrupt
            answer._text, answer.finish_reason = "".join(self.pieces).strip(), self.finish

        answer._steps = steps()
        return answer

    def model_of(self, answer):
        return "smollm2-135m"


@pytest.mark.parametrize("finish", ["repeat", "length", "stop"])
def test_ask_marks_every_cut_as_the_chat_does_and_names_the_model(p2p_home, monkeypatch, capsys, finish):
    from p2p_local import personalize
    from p2p_local.cli import main

    session = _AskSession([" Hello", " there."], finish)
    monkeypatch.setattr(personalize.Session, "open", classmethod(lambda cls, **kw: session))
    assert main(["ask", "hi", "--task", "chat", "--base"]) == 0
    out = capsys.readouterr()
    assert out.out == "Hello there." + cut_mark(finish) + "\n"  # no leading space from "Assistant: Hello"
    assert (finish == "stop") == (out.err == "")
    assert main(["ask", "hi", "--task", "chat", "--base", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["model"] == "smollm2-135m" and got["finish"] == finish
    assert got["cut"] == (None if finish == "stop" else finish)


def test_ask_ctrl_c_keeps_the_partial_answer_marked_stopped(p2p_home, monkeypatch, capsys):
    from p2p_local import personalize
    from p2p_local.cli import main

    session = _AskSession(["Once", " upon a time"], interrupt=True)
    monkeypatch.setattr(personalize.Session, "open", classmethod(lambda cls, **kw: session))
    assert main(["ask", "a story", "--task", "chat", "--base"]) == 130
    assert capsys.readouterr().out == "Once upon a time" + CUT_MARKS["stopped"] + "\n"


# --- 4. strength on an empty profile --------------------------------------------------------------------
class _Engine:
    """Just enough of `Engine` for the route's generation path: whitespace tokens, a scripted reply."""

    n_ctx, last_finish = 2048, "stop"

    def __init__(self):
        self.active, self.used = (None, 0.0), []

    def tokenize(self, text, add_bos=True, special=True):
        return text.split()

    def detokenize(self, tokens):
        return " ".join(tokens)

    def use(self, adapter, scale=1.0):
        self.used.append((adapter, scale))
        self.active = (adapter, scale if adapter is not None else 0.0)

    def generate(self, prompt, **kw):
        yield "Hi Sam, could you send me the file?"


def test_an_empty_profile_gets_no_adapter_above_x1_on_the_route():
    card = builtin_card(EMAIL)
    engine = _Engine()
    engine.active = ("an adapter attached before", 1.0)
    route = pipeline.Route(engine)  # no Personalizer: making an adapter would fail the test
    for scale in (1.25, 1.5, 2.0):
        answer = route.answer(Request(card, "hey send me the file", [], 0, "newbie"), scale=scale)
        assert answer.text == "Hi Sam, could you send me the file?"
        assert answer.personalization is not None and answer.personalization.empty
        assert answer.adapter is None and answer.scale == 0.0 and engine.active == (None, 0.0)


@pytest.mark.real
def test_ask_scale_2_on_an_empty_profile_is_the_base_answer_and_says_why(p2p_home, capsys):
    from p2p_local.cli import main

    with Store() as s:
        s.profiles.create_profile("newbie", task=EMAIL)
    query = "hey, cant make it to the meeting tmrw"
    assert main(["ask", query, "--profile", "newbie", "--scale", "2", "--json"]) == 0
    strong = json.loads(capsys.readouterr().out)
    assert strong["adapter"] is None and strong["scale"] == 0.0 and strong["model"] == "gemma3-270m"
    assert main(["ask", query, "--profile", "newbie", "--base", "--json"]) == 0
    assert strong["text"] == json.loads(capsys.readouterr().out)["text"]  # the base's answer, not noise
    assert main(["ask", query, "--profile", "newbie", "--scale", "2"]) == 0
    assert "no popquorn-email-rewrite items" in capsys.readouterr().err


@pytest.mark.asyncio
async def test_strength_on_a_task_without_items_shows_the_base_answered_and_why(fake, store):
    fake.empty_tasks = {EMAIL}
    app = ChatApp(fake, first_run=False, profile=DEMO_PROFILE, task=EMAIL)
    async with app.run_test(size=SIZE) as pilot:
        screen = chat(app)
        await pilot.press("ctrl+up", "ctrl+up", "ctrl+up", "ctrl+up")
        assert screen.scale == 2.0
        await send(pilot, "hey, send me the file")
        assert fake.calls[-1]["scale"] == 2.0 and fake.calls[-1]["personalized"]
        view = replies(app)[-1]
        assert title_of(view).startswith("base model · no items of this task in the profile · gemma3-270m")
        assert "personalized" not in title_of(view)
        assert "base model answers" in screen.adapter_note
        assert "base model answers" in str(screen.query_one("#status").render())
        assert store.conversations.messages(screen.conversation_id)[-1].meta["empty"] is True
        md = conversation_markdown(store, screen.conversation_id)
        assert "base model: no items of this task in the profile, no adapter" in md


# --- 5. conversations: rename, delete, system prompt and strength ----------------------------------------
@pytest.mark.asyncio
async def test_rename_and_delete_a_conversation_from_the_palette_and_the_list(fake, store):
    app = ChatApp(fake, first_run=False, profile=DEMO_PROFILE, task=FREE_CHAT)
    async with app.run_test(size=SIZE) as pilot:
        screen = chat(app)
        await send(pilot, "unique-word-kiwi in a first conversation")
        first = screen.conversation_id
        await pilot.press("ctrl+s")  # exported: the export goes with it
        assert conversation_export_path(first).is_file()
        screen.action_rename()
        await answer_question(pilot, "rename", "Fruit talk")
        assert store.conversations.get_conversation(first).title == "Fruit talk"

        screen.action_delete_conversation()
        await answer_question(pilot, "delete", "no")  # not confirmed: nothing happens
        assert store.conversations.get_conversation(first).n_messages == 2
        screen.action_delete_conversation()
        await answer_question(pilot, "delete", "yes")
        assert screen.conversation_id is None and not replies(app)
        assert all(c.id != first for c in store.conversations.all())
        n = store.conn.execute("SELECT COUNT(*) FROM messages WHERE conversation_id = ?", (first,)).fetchone()[0]
        assert n == 0 and store.conversations.search_messages("kiwi") == [] and not conversation_export_path(first).exists()

        # From the conversation list: F2 renames the highlighted one, Del deletes it (the open one too).
        await send(pilot, "second one")
        second = screen.conversation_id
        await pilot.press("ctrl+f")
        history = app.screen
        assert isinstance(history, HistoryScreen)
        await pilot.press("down")  # into the results
        await pilot.press("f2")
        await answer_question(pilot, "rename", "Renamed in the list")
        assert store.conversations.get_conversation(second).title == "Renamed in the list"
        assert app.screen is history and "Renamed in the list" in str(
            history.query_one("#results", OptionList).get_option_at_index(0).prompt)
        await pilot.press("delete")
        await answer_question(pilot, "delete", "yes")
        assert app.screen is history and store.conversations.all() == []
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, ChatScreen), "the chat")
        assert screen.conversation_id is None  # the open conversation was the one deleted


@pytest.mark.asyncio
async def test_deleting_the_conversation_while_it_streams_keeps_nothing_of_it(fake, store):
    fake.endless = True
    app = ChatApp(fake, first_run=False, profile=DEMO_PROFILE, task=FREE_CHAT)
    async with app.run_test(size=SIZE) as pilot:
        screen = chat(app)
        screen.query_one(ChatInput).load_text("a long one please")
        await pilot.press("enter")
        await until(pilot, lambda: replies(app) and replies(app)[-1].text, "streamed text")
        conv = screen.conversation_id
        screen.action_delete_conversation()
        await answer_question(pilot, "delete", "yes")
        await until(pilot, lambda: not screen.busy, "the reply to stop")
        assert fake.closed == 1 and screen.conversation_id is None and app.is_running
        assert all(c.id != conv for c in store.conversations.all())
        assert store.conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0


@pytest.mark.asyncio
async def test_system_prompt_and_strength_are_the_conversations_own(fake, store):
    app = ChatApp(fake, first_run=False, profile=DEMO_PROFILE, task=FREE_CHAT)
    async with app.run_test(size=SIZE) as pilot:
        screen = chat(app)
        screen.action_system_prompt()  # set before the first message: the conversation starts with it
        await answer_question(pilot, "system prompt", "Answer in French.")
        assert "system prompt" in str(screen.query_one("#status").render())
        await send(pilot, "hi")
        assert fake.calls[-1]["system"] == "Answer in French."
        conv = screen.conversation_id
        assert store.conversations.get_conversation(conv).system_prompt == "Answer in French."
        screen.task_name = "movielens-rating"  # task answers keep their task's prompt
        await send(pilot, "Heat (1995) | Genres: Action|Crime|Thriller")
        assert fake.calls[-1]["system"] == ""
        await pilot.press("ctrl+up")
        assert store.conversations.get_conversation(conv).scale == 1.25
        screen.action_system_prompt()  # changed within the conversation
        await answer_question(pilot, "system prompt", "Answer like a pirate.")
        assert store.conversations.get_conversation(conv).system_prompt == "Answer like a pirate."
        await pilot.press("ctrl+n")  # a new conversation starts without
        assert screen.system_prompt == ""
        screen.task_name = None
        await send(pilot, "hello")
        assert fake.calls[-1]["system"] == "" and store.conversations.get_conversation(screen.conversation_id).system_prompt == ""
        assert "(system prompt" not in conversation_markdown(store, screen.conversation_id)
        assert "_system prompt (free chat): Answer like a pirate._" in conversation_markdown(store, conv)
        await screen.load_conversation(conv)  # reopened: its own settings come back
        assert screen.system_prompt == "Answer like a pirate." and screen.scale == 1.25
        screen.task_name = None
        await send(pilot, "ahoy?")
        assert fake.calls[-1]["system"] == "Answer like a pirate." and fake.calls[-1]["scale"] == 1.25


def test_the_system_prompt_reaches_free_chats_about():
    from p2p_local.personalize import Session

    stub = types.SimpleNamespace(card=builtin_card, free_chat_adapter=lambda: False,
                                 about=lambda profile: "Likes thrillers.")
    request = Session.request(stub, "hi", "demo", "chat", system=" Answer in French. ")
    assert request.card is None and request.about == "Likes thrillers.\nAnswer in French."
    assert "Answer in French." in pipeline.chat_messages(request.text, (), request.about)[0]["content"]
    assert "Answer in French." in pipeline.chat_prompt(request.text, (), request.about)
    assert Session.request(stub, "hi", None, "chat", system="Be brief.").about == "Be brief."
    assert Session.request(stub, "hi", "demo", "chat").about == "Likes thrillers."


def test_store_rename_settings_delete_and_the_upgrade(p2p_home):
    from p2p_local.store.migrations import available_upgrades, migrate

    assert available_upgrades()[-1].name == "conversation_settings"
    with Store() as s:
        s.profiles.create_profile("alice", task="movielens-rating")
        keep = s.conversations.new_conversation("alice", "keep")
        s.conversations.add_message(keep, "user", "keep this apple")
        conv = s.conversations.new_conversation("alice", "  two\nlines  ", system_prompt=" Be brief. ", scale=1.5)
        s.conversations.add_message(conv, "user", "an apple a day")
        s.conversations.add_message(conv, "assistant", "keeps the doctor away", {"model": "gemma3-270m"})
        got = s.conversations.get_conversation(conv)
        assert (got.title, got.system_prompt, got.scale) == ("two lines", "Be brief.", 1.5)
        s.conversations.rename_conversation(conv, "Apples")
        s.conversations.set_conversation_settings(conv, system_prompt="")
        s.conversations.set_conversation_settings(conv, scale=0.5)
        got = s.conversations.get_conversation(conv)
        assert (got.title, got.system_prompt, got.scale) == ("Apples", "", 0.5)
        with pytest.raises(Exception, match="strength"):
            s.conversations.set_conversation_settings(conv, scale=-1)
        path = conversation_export_path(conv)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("exported")
        assert s.conversations.delete_conversation(conv) == 2
        assert [c.id for c in s.conversations.all()] == [keep] and not path.exists()
        assert [m.content for m in s.conversations.search_messages("apple")] == ["keep this apple"]
        with pytest.raises(Exception, match="no conversation"):
            s.conversations.messages(conv)
    # A store of the version before: its conversations get the defaults.
    older = p2p_home / "older.db"
    con = sqlite3.connect(older, isolation_level=None)
    migrate(con, upto=5)
    con.execute("INSERT INTO conversations (profile_id, title, created) VALUES (NULL, 'old', 0)")
    migrate(con)
    assert con.execute("SELECT system_prompt, scale FROM conversations").fetchone() == ("", None)
    con.close()
    assert paths.data_dir().is_dir()
