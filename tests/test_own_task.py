"""A user's own task card works in the app, end to end (issue 27): a fifth task, from a card and a users file
written here, through the real CLI (llama.cpp, the shipped bundle): `profile create --task-card`, `profile
import`, `personalize`, `ask` (and `--json` says the bundle never trained on it), `adapter export`, the chat's
header, and `p2p eval --data --task-card` on the same files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from p2p_local.cli import main
from p2p_local.data.format import Item, TaskCard, User, builtin_card, write_users_jsonl
from p2p_local.errors import DataError, StoreError, UsageError
from p2p_local.store import Store

pytestmark = pytest.mark.real

TASK = "book-rating"
CARD = {
    "name": TASK, "kind": "rating", "labels": ["1", "2", "3", "4", "5"], "value_range": [1, 5],
    "template": "Book: {input}\nRating (1-5): ", "metrics": ["mae", "rmse"],
    "description": "how a reader rates books from 1 to 5",
    "input_fields": {"genres": {"after": " | Genres: ", "split": "|"}},
    "samples": ["Dune (1965) | Genres: Science fiction|Adventure"],
}
BOOKS = [("Dune (1965)", "Science fiction|Adventure"), ("Emma (1815)", "Romance|Classic"),
         ("Neuromancer (1984)", "Science fiction|Cyberpunk"), ("Persuasion (1817)", "Romance|Classic"),
         ("Foundation (1951)", "Science fiction"), ("Middlemarch (1871)", "Classic"),
         ("Hyperion (1989)", "Science fiction|Adventure"), ("Jane Eyre (1847)", "Romance|Gothic")]
QUERY = "Solaris (1961) | Genres: Science fiction"


def _users() -> list[User]:
    """Two readers with opposite tastes: one loves science fiction, the other the classics."""
    users = []
    for uid, loves in (("sf-fan", "Science fiction"), ("classic-fan", "Classic")):
        items = [Item(f"{title} | Genres: {genres}", "5" if loves in genres else "2", 1.7e9 + 86400 * i,
                      {"genres": genres.split("|")}) for i, (title, genres) in enumerate(BOOKS)]
        users.append(User(uid, items))
    return users


@pytest.fixture
def files(tmp_path: Path, p2p_home: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    monkeypatch.delenv("P2P_CACHE", raising=False)  # the evaluation's caches under the private P2P_HOME
    card, users = tmp_path / "card.json", tmp_path / "users.jsonl"
    card.write_text(json.dumps(CARD), encoding="utf-8")
    write_users_jsonl(users, _users())
    return card, users


def test_a_fifth_task_from_the_users_own_card_end_to_end(files, tmp_path: Path, capsys) -> None:
    card, users = files
    assert main(["profile", "create", "reader", "--task-card", str(card)]) == 0
    assert "stored in this data dir" in capsys.readouterr().out
    with Store() as s:
        assert s.profiles.get_profile("reader").task == TASK and s.task_cards.task_card(TASK) == TaskCard.load(card)
        assert TASK in s.task_cards.task_names()
    assert main(["profile", "import", "reader", str(users), "--user", "sf-fan"]) == 0
    assert f"task {TASK}" in capsys.readouterr().out
    with Store() as s:
        assert s.profiles.count_items("reader", task=TASK) == len(BOOKS)

    assert main(["personalize", "reader", "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["task"] == TASK and made["items"] == len(BOOKS) and made["card"] == "untrained"

    assert main(["ask", QUERY, "--profile", "reader", "--task", TASK, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["task"] == TASK and out["card"] == "untrained" and out["adapter"]
    assert list(out["distribution"]) == CARD["labels"] and out["text"] in CARD["labels"]
    assert out["query"] == QUERY
    # Text output: the answer on stdout, one plain line on stderr (the profile's own task, no --task).
    assert main(["ask", QUERY, "--profile", "reader"]) == 0
    said = capsys.readouterr()
    assert said.out.strip() in CARD["labels"]
    assert f"the adapter was not trained on task {TASK}" in said.err and len(said.err.strip().splitlines()) == 1

    assert main(["adapter", "export", "reader", "--to", str(tmp_path / "out"), "--json"]) == 0
    ex = json.loads(capsys.readouterr().out)
    assert ex["task"] == TASK and Path(ex["path"]).is_file() and Path(ex["path"]).name == f"reader-{TASK}.gguf"
    assert "Book: " in Path(ex["readme"]).read_text()  # the README shows the user's own template

    out_dir = tmp_path / "reports"
    assert main(["eval", "--data", str(users), "--task-card", str(card), "--split", "all", "--users", "2",
                 "--queries", "1", "--methods", "base,p2p", "--out", str(out_dir), "--n-ctx", "512",
                 "--bootstrap", "100"]) == 0
    (report,) = out_dir.glob(f"{TASK}-all.json")
    rep = json.loads(report.read_text())
    for method in ("base", "p2p"):
        assert rep["methods"][method]["status"] == "ok" and rep["methods"][method]["n_queries"] == 2, method


def test_a_users_card_is_checked_and_cannot_take_a_builtin_name(files, tmp_path: Path, capsys) -> None:
    card, users = files
    taken = tmp_path / "taken.json"
    taken.write_text(json.dumps({**CARD, "name": "movielens-rating"}), encoding="utf-8")
    assert main(["profile", "create", "x", "--task-card", str(taken)]) == UsageError.exit_code
    assert "built-in task" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**CARD, "template": "no input here"}), encoding="utf-8")
    assert main(["profile", "create", "x", "--task-card", str(bad)]) == DataError.exit_code  # TaskCard's rules
    assert "{input}" in capsys.readouterr().err
    with Store() as s:
        assert not s.profiles.profile_exists("x") and s.task_cards.stored_cards() == {}  # neither card nor profile was kept

    assert main(["profile", "create", "a", "--task-card", str(card)]) == 0
    assert main(["profile", "create", "b", "--task-card", str(card)]) == 0  # the same card again: shared
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**CARD, "template": "Title: {input}\nStars: "}), encoding="utf-8")
    assert main(["profile", "create", "c", "--task-card", str(other)]) == StoreError.exit_code
    capsys.readouterr()
    with Store() as s:
        assert not s.profiles.profile_exists("c")
    # The card's labels hold at import as for a built-in rating task.
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"user_id": "u", "items": [{"input": "Emma", "output": "7"}]}) + "\n")
    assert main(["profile", "import", "a", str(wrong)]) == DataError.exit_code
    assert f"{TASK} answers are one of 1, 2, 3, 4, 5" in capsys.readouterr().err
    # An unknown name is still refused before any model loads; the stored one is offered.
    with pytest.raises(SystemExit) as e:
        main(["ask", "Emma", "--task", "book-ratings"])
    assert e.value.code == 2 and TASK in capsys.readouterr().err
    # The card goes with the last profile that uses it.
    assert main(["profile", "forget", "a", "--yes"]) == 0
    with Store() as s:
        assert s.task_cards.task_card(TASK).name == TASK
    assert main(["profile", "forget", "b", "--yes"]) == 0
    with Store() as s:
        assert s.task_cards.stored_cards() == {}
        with pytest.raises(UsageError, match="unknown task"):
            s.task_cards.task_card(TASK)
        assert s.task_cards.task_card("movielens-rating") == builtin_card("movielens-rating")


@pytest.mark.asyncio
async def test_the_chat_says_the_adapter_never_learned_the_task(files, engine) -> None:
    from p2p_local.bundle import Bundle
    from p2p_local.encoder import Encoder
    from p2p_local.personalize import Session
    from p2p_local.tui import ChatApp

    card, users = files
    assert main(["profile", "create", "reader", "--task-card", str(card)]) == 0
    assert main(["profile", "import", "reader", str(users), "--user", "classic-fan"]) == 0
    s = Session(engine, Bundle.load(), Encoder.load(), Store())
    try:
        app = ChatApp(s, first_run=False, profile="reader")
        async with app.run_test(size=(120, 40)) as pilot:
            screen = app.chat
            for _ in range(2400):  # the adapter is made off the UI thread: wait for it (at most 2 min)
                if screen.adapter_note not in ("", "making adapter …"):
                    break
                await pilot.pause(0.05)
            assert screen.task_name == TASK and TASK in app.cards and screen.adapter_note != "no adapter"
            assert "adapter not trained on this task" in app.sub_title
            assert f"not trained on task {TASK}" in screen.welcome_text()
    finally:
        engine.use(None)
        s.store.close()
