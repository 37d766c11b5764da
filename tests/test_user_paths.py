"""What a new user runs into on the on-device path: the CLI and the session, on the real components."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from p2p_local import pipeline
from p2p_local.adapter import LoraAdapter
from p2p_local.cli import main
from p2p_local.data.format import builtin_card
from p2p_local.errors import AdapterError, DataError, StoreError
from p2p_local.files import atomic_write
from p2p_local.peft_export import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE, export_peft
from p2p_local.personalize import KEEP_ADAPTER_FILES, Session
from p2p_local.store import Store


def _tiny_adapter() -> LoraAdapter:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 8)).astype(np.float32), rng.standard_normal((8, 2)).astype(np.float32)
    return LoraAdapter(tensors={"blk.0.attn_q.weight": (a, b)}, alpha=2.0, arch="gemma3")


def test_peft_export_never_replaces_a_folder_of_other_files(tmp_path: Path, monkeypatch) -> None:
    """`--peft-out ~/Documents` used to rmtree the folder; `--peft-out .` crashed with a traceback."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "thesis.txt").write_text("precious")
    with pytest.raises(AdapterError, match="not a PEFT export"):
        export_peft(_tiny_adapter(), docs)
    assert (docs / "thesis.txt").read_text() == "precious"
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(AdapterError, match="not a PEFT export"):
        export_peft(_tiny_adapter(), tmp_path / "file.txt")
    out = export_peft(_tiny_adapter(), tmp_path / "peft")
    assert export_peft(_tiny_adapter(), out) == out  # an earlier export is replaced
    empty = tmp_path / "here"
    empty.mkdir()
    monkeypatch.chdir(empty)
    assert sorted(p.name for p in export_peft(_tiny_adapter(), ".").iterdir()) == [MANIFEST_FILE, CONFIG_FILE,
                                                                                  WEIGHTS_FILE]


@pytest.mark.parametrize("user_file", ["README.md", "adapter_config.json", "notes.txt"])
def test_peft_export_keeps_a_folder_the_app_did_not_write(tmp_path: Path, user_file: str) -> None:
    """A folder holding only a file with one of the export's own names is still the user's: the app
    replaces a folder only when its manifest lists every file there, unchanged."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / user_file).write_text("the user's own")
    with pytest.raises(AdapterError, match="not a PEFT export"):
        export_peft(_tiny_adapter(), mine)
    assert (mine / user_file).read_text() == "the user's own"
    out = export_peft(_tiny_adapter(), tmp_path / "peft")
    (out / CONFIG_FILE).write_text("{}  # edited by the user")  # changed since the export: theirs now
    with pytest.raises(AdapterError, match="not a PEFT export"):
        export_peft(_tiny_adapter(), out)
    assert (out / CONFIG_FILE).read_text().startswith("{}  # edited")


@pytest.mark.parametrize("kind", ["fifo", "link-to-fifo", "device"])
def test_writes_refuse_to_replace_special_files(tmp_path: Path, kind: str) -> None:
    """A device node, a FIFO or a link to one is never replaced by a regular file (as root, `-o /dev/null`
    made /dev/null a file holding the profile); a link to a regular file or a new name is written."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    target = {"fifo": fifo, "device": Path("/dev/null"), "link-to-fifo": tmp_path / "link"}[kind]
    if kind == "link-to-fifo":
        target.symlink_to(fifo)
    with pytest.raises(StoreError, match="refusing to replace it"):
        atomic_write(target, b"profile")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert os.path.islink(target) == (kind == "link-to-fifo")
    regular = tmp_path / "regular"
    regular.write_text("old")
    (tmp_path / "to-regular").symlink_to(regular)
    atomic_write(tmp_path / "to-regular", b"new")  # a link to a regular file: written as before


def test_generation_decoding_matches_the_task_shape(session: Session) -> None:
    """A commit subject is one line (it used to run on for 96 tokens of 'Description: ...'); an email
    rewrite keeps its paragraphs (it used to stop at the first blank line)."""
    subject = pipeline.generation_settings(session.engine, builtin_card("commit-subject"),
                                           "Fix the fixture scope error message.")
    assert subject["stop"] == ["\n"]
    email = "hey\n\ncan u send me the report by friday thx " * 20
    rewrite = pipeline.generation_settings(session.engine, builtin_card("popquorn-email-rewrite"), email)
    assert "\n\n" not in rewrite["stop"] and "\nEmail:" in rewrite["stop"]
    assert rewrite["max_tokens"] >= 1.5 * len(session.engine.tokenize(email, add_bos=False))


def test_query_aware_adapters_do_not_pile_up(session: Session, monkeypatch) -> None:
    """Every question makes its own adapter file (~0.7 MB): only the newest few are kept."""
    monkeypatch.setattr("p2p_local.personalize.KEEP_ADAPTER_FILES", 2)
    for title in ("Heat (1995)", "Alien (1979)", "Fargo (1996)", "Se7en (1995)"):
        session.personalize("demo", query=f"{title} | Genres: Crime|Thriller")
    files = list(session.store.adapters.adapter_dir("demo").glob("*.gguf"))
    assert len(files) == 2 == len(session.store.adapters.all("demo"))
    assert session.engine.active[0].path in files
    assert KEEP_ADAPTER_FILES >= 8


def test_cli_refuses_items_that_personalization_would_ignore(p2p_home: Path, capsys) -> None:
    """A movielens-rating item with output '7' or '3.5' was stored, counted, and silently skipped."""
    assert main(["profile", "create", "alice", "--task", "movielens-rating"]) == 0
    assert main(["profile", "add", "alice", "--input", "Heat (1995) | Genres: Action", "--output", "7"]) == \
        DataError.exit_code
    assert main(["profile", "add", "alice", "--input", "Heat (1995) | Genres: Action", "--output", "4",
                 "--json"]) == 0
    capsys.readouterr()
    item = Store().profiles.items("alice")[0]
    assert main(["profile", "edit", "alice", str(item.id), "--output", "3.5"]) == DataError.exit_code
    assert main(["profile", "edit", "alice", str(item.id), "--output", "5"]) == 0
    assert main(["profile", "create", "dev", "--task", "commit-subject"]) == 0
    assert main(["profile", "add", "dev", "--input", "body", "--output", "Fix the thing"]) == 0  # free text


def test_cli_import_create_is_all_or_nothing(p2p_home: Path, tmp_path: Path, capsys) -> None:
    """A failed `import --create` used to leave an empty profile behind."""
    f = tmp_path / "items.csv"
    f.write_text("input,output\nHeat (1995) | Genres: Action,5\n")
    assert main(["profile", "import", "erin", str(f), "--create"]) == StoreError.exit_code  # no task anywhere
    assert not Store().profiles.profile_exists("erin")
    assert main(["profile", "import", "erin", str(f), "--create", "--task", "movielens-rating"]) == 0
    assert Store().profiles.count_items("erin") == 1


def test_cli_ask_json_names_the_task_it_used(engine, p2p_home: Path, capsys) -> None:
    from p2p_local.demo import demo_path

    assert main(["profile", "create", "alice", "--task", "movielens-rating"]) == 0
    assert main(["profile", "import", "alice", str(demo_path())]) == 0
    capsys.readouterr()
    assert main(["ask", "Heat (1995) | Genres: Action|Crime|Thriller", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["task"] == "movielens-rating" and out["text"] in {"1", "2", "3", "4", "5"}
