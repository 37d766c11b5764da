"""One terminal rule (`p2p_local.terminal`) for everything printed from user data or model output: an item or
an answer holding ESC, OSC, C1, CR, BS and RLO reaches stdout (or the chat's screen) without any of them, in
`profile show / list / history / import / export`, `ask` (text, proposals, JSON) and the chat."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from p2p_local import pipeline
from p2p_local.engine import Engine

# Clear screen (CSI), set the window title (OSC), C1 CSI, carriage return, backspace, right-to-left override.
HOSTILE = "fix \x1b[2Jthe\x1b]0;pwned\x07 bug\x9b31m in\rparser\x08s\u202eoof"
UNSAFE = ["\x1b", "\x07", "\x9b", "\r", "\x08", "\u202e"]


def clean(out: str) -> bool:
    return not any(c in out for c in UNSAFE)


def p2p(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "p2p_local.cli", *args], input=stdin, capture_output=True,
                          text=True, encoding="utf-8", timeout=120)


def test_profile_commands_print_no_control_characters(p2p_home: Path, tmp_path: Path) -> None:
    assert p2p("profile", "create", "eve", "--task", "commit-subject").returncode == 0
    added = p2p("profile", "add", "eve", "--input", HOSTILE, "--output", HOSTILE, "--task", "commit-subject")
    assert added.returncode == 0, added.stderr
    data = tmp_path / "items.jsonl"
    data.write_text(json.dumps({"input": HOSTILE + " 2", "output": HOSTILE, "time": 1.0}) + "\n", encoding="utf-8")
    outputs = {
        "import": p2p("profile", "import", "eve", str(data), "--task", "commit-subject"),
        "list": p2p("profile", "list"),
        "show": p2p("profile", "show", "eve"),
        "show --json": p2p("profile", "show", "eve", "--json"),
        "history": p2p("profile", "history", "eve", "1"),
        "export": p2p("profile", "export", "eve"),
    }
    for what, proc in outputs.items():
        assert proc.returncode == 0, (what, proc.stderr)
        assert clean(proc.stdout), (what, proc.stdout)
    assert "fix the bug in parsers" in outputs["show"].stdout.replace("  ", " ")  # the text itself is kept
    # The JSON ones are the same values, the unsafe characters escaped (\u001b...), never dropped.
    shown = json.loads(outputs["show --json"].stdout)
    assert {it["output"] for it in shown["items"]} == {HOSTILE}
    exported = json.loads(outputs["export"].stdout)
    assert {it["output"] for it in exported["items"]} == {HOSTILE}


@pytest.fixture
def hostile_model(monkeypatch):
    """The real route, with the model's stream and proposals replaced by a hostile answer (a model repeating
    what an imported item held)."""
    monkeypatch.setattr(Engine, "generate", lambda self, prompt, **kw: iter([HOSTILE[:6], HOSTILE[6:], "\nmore"]))

    def proposals(engine, card, prompt, earlier, max_tokens, branches, margin):
        return [pipeline.Candidate(HOSTILE, -1.0, False, 0), pipeline.Candidate(HOSTILE + " 2", -2.0, False, 1)], "stop"

    monkeypatch.setattr(pipeline, "one_line_candidates", proposals)


def test_ask_prints_no_control_characters(p2p_home, hostile_model, capsys) -> None:
    from p2p_local.cli import main

    assert main(["ask", "hello", "--base"]) == 0  # free chat on the base model: a streamed answer
    out = capsys.readouterr().out
    assert clean(out) and "fix the bug" in out and "\nmore" in out  # line breaks are kept
    assert main(["ask", "parser.py", "--task", "commit-subject", "--base", "--candidates", "2"]) == 0
    out = capsys.readouterr().out
    assert clean(out) and len(out.strip().splitlines()) == 2  # two proposals, one a line
    assert main(["ask", "parser.py", "--task", "commit-subject", "--base", "--candidates", "2", "--json"]) == 0
    out = capsys.readouterr().out
    got = json.loads(out)
    assert clean(out) and got["text"] == HOSTILE and got["candidates"][1]["text"] == HOSTILE + " 2"


@pytest.mark.asyncio
async def test_the_chat_shows_no_control_characters(p2p_home) -> None:
    from p2p_local.demo import import_demo
    from p2p_local.store import Store
    from tests.test_tui import DEMO_PROFILE, FREE_CHAT, SIZE, ChatApp, FakeSession, replies, send

    store = Store()
    import_demo(store)
    fake = FakeSession(store)
    fake.free_reply = HOSTILE
    app = ChatApp(fake, first_run=False, profile=DEMO_PROFILE, task=FREE_CHAT)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "say \x1b[2Jsomething\u202e")
        views = [v for v in app.chat.query("MessageView")]
        assert replies(app)[-1].text == HOSTILE  # kept as answered (the store, the export)...
        for v in views:  # ...shown without what a terminal would act on
            body = v.query_one(".body")
            rendered = body.source if hasattr(body, "source") else str(body.render())
            assert clean(rendered), rendered
    store.close()
