"""Answers that end well: the task card's stop rule, the repetition guard and a visible mark when the
token budget cuts an answer; the exported adapter's Modelfile and README carry the same stop."""

from __future__ import annotations

import json
from pathlib import Path

from p2p_local import pipeline
from p2p_local.pipeline import GuardedStream, repeat_scan

# With the demo profile's adapter this email made the 270M base start its rewrite over and over.
LOOPING_EMAIL = "hey, cant make it to the meeting tmrw, something came up. sorry for the late notice"
EMAIL = "popquorn-email-rewrite"


def test_repeat_scan_cuts_at_the_first_verbatim_repeat() -> None:
    once = "I'm sorry for the late notice. I can't come tomorrow."
    assert repeat_scan(once) == (None, len(once))
    looped = once + " I'm sorry for the late notice. I can't"
    assert repeat_scan(looped)[0] == len(once)  # the answer ends before the second copy
    # An unfinished sentence that may be an earlier one starting over is held back, not shown yet.
    assert repeat_scan(once + " I'm sorry for")[1] == len(once)
    assert repeat_scan("Hi, I'm sorry for the late notice. I'm sorry for the late notice.")[0] == 34  # a tail of one
    assert repeat_scan("Thanks. Thanks. Thanks. ") == (None, 24)  # short units repeat legitimately
    assert repeat_scan("abc def ghi jkl " * 3)[0] == len("abc def ghi jkl ")  # a loop with no sentence end


class _Engine:
    def __init__(self, finish: str) -> None:
        self.last_finish = finish


def test_guarded_stream_says_how_the_answer_ended() -> None:
    pieces = ["Hello there, friend.", " See you soon.", " Hello there,", " friend.", " more"]
    closed = []

    def gen():
        try:
            yield from pieces
        finally:
            closed.append(True)

    g = GuardedStream(_Engine("length"), gen())
    assert "".join(g) == "Hello there, friend. See you soon." and g.finish == "repeat" and closed
    g = GuardedStream(_Engine("length"), iter(["One sentence.", " Another one"]))
    assert "".join(g) == "One sentence. Another one" and g.finish == "length"
    g = GuardedStream(_Engine("stop"), iter(["Done."]))
    assert "".join(g) == "Done." and g.finish == "stop"


def test_a_prompt_that_looped_now_ends_within_its_budget(session) -> None:
    card = session.card(EMAIL)
    kw = pipeline.generation_settings(session.engine, card, LOOPING_EMAIL)
    session.personalize("demo", EMAIL, query=LOOPING_EMAIL)
    # Unguarded, with room to show it, the answer starts over: the guard has something to do here.
    raw = session.engine.complete(pipeline.task_prompt(session.engine, card, LOOPING_EMAIL), temperature=0.0,
                                  max_tokens=3 * kw["max_tokens"], stop=kw["stop"])
    assert repeat_scan(raw)[0] is not None, f"the prompt no longer loops unguarded: {raw!r}"

    answer = session.answer(LOOPING_EMAIL, profile="demo", task=EMAIL)
    text = "".join(answer)
    assert answer.finish_reason in ("stop", "repeat", "length")
    assert repeat_scan(text)[0] is None, text  # no sentence twice
    assert len(session.engine.tokenize(text, add_bos=False)) <= kw["max_tokens"]
    assert text.strip() and raw.startswith(text.rstrip())


def test_ask_marks_an_answer_cut_by_its_budget(session, capsys) -> None:
    from p2p_local.cli import main

    session.engine.use(None)
    assert main(["ask", "Tell me about the weather in spring", "--task", "chat", "--base",
                 "--max-tokens", "3"]) == 0
    out = capsys.readouterr()
    assert out.out.rstrip("\n").endswith(pipeline.CUT_MARK) and "token budget" in out.err
    assert main(["ask", "Tell me about the weather in spring", "--task", "chat", "--base",
                 "--max-tokens", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["finish"] == "length"


def test_exported_modelfile_and_readme_carry_the_stop(session, tmp_path: Path) -> None:
    from p2p_local.adapter_export import export_adapter

    ex = export_adapter(session, "demo", tmp_path, task="commit-subject")
    modelfile = (tmp_path / f"{ex.path.stem}.Modelfile").read_text()
    assert 'PARAMETER stop """\n"""\n' in modelfile
    readme = ex.readme.read_text()
    assert '"stop": ["\\n"]' in readme and modelfile in readme
    ex = export_adapter(session, "demo", tmp_path, task=EMAIL)
    modelfile = (tmp_path / f"{ex.path.stem}.Modelfile").read_text()
    assert 'PARAMETER stop """\nEmail:"""' in modelfile and '"stop": ["\\nEmail:", "\\n\\n\\n"]' in ex.readme.read_text()
