"""The on-device path on real components: profile -> ONNX encoder -> ONNX hypernetwork -> GGUF -> llama.cpp."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from p2p_local import pipeline
from p2p_local.bundle import Bundle
from p2p_local.cli import main
from p2p_local.encoder import Encoder
from p2p_local.errors import BundleError, StoreError
from p2p_local.personalize import Personalizer, Session

Q = "Heat (1995) | Genres: Action|Crime|Thriller"


def test_personalize_writes_caches_and_regenerates_when_stale(session: Session) -> None:
    r1 = session.personalize("demo", query=Q)
    assert not r1.cached and r1.adapter_path.is_file() and r1.n_items > 50
    assert {"encode_ms", "hypernet_ms", "write_ms", "load_attach_ms", "total_ms"} <= set(r1.timings_ms)
    assert session.engine.active[0].path == r1.adapter_path
    r2 = session.personalize("demo", query=Q)
    assert r2.cached and r2.adapter_path == r1.adapter_path
    session.store.profiles.add_item("demo", "movielens-rating", "Alien (1979) | Genres: Horror|Sci-Fi", "5", time=2e9)
    assert session.store.profiles.get_profile("demo").adapter_stale
    r3 = session.personalize("demo", query=Q)
    assert not r3.cached and r3.fingerprint != r1.fingerprint
    assert not session.store.profiles.get_profile("demo").adapter_stale


def test_adapter_matches_what_the_bundle_generates(session: Session) -> None:
    from p2p_local.adapter import read_adapter

    r = session.personalize("demo", query=Q, force=True)
    tensors, _ = session.personalizer.tensors(r.profile)
    back = read_adapter(r.adapter_path)
    assert back.alpha == pytest.approx(session.bundle.alpha) and set(back.tensors) == set(tensors)
    for name, (a, b) in tensors.items():  # stored as F16
        np.testing.assert_allclose(back.tensors[name][0], a, atol=2e-3, rtol=2e-3)
        np.testing.assert_allclose(back.tensors[name][1], b, atol=2e-3, rtol=2e-3)


def test_empty_profile_gets_the_neutral_adapter_and_says_so(session: Session) -> None:
    session.store.profiles.create_profile("newbie", task="movielens-rating")
    r = session.personalize("newbie", query=Q)
    assert r.empty and r.n_items == 0 and r.adapter_path.is_file()


def test_label_answers_come_from_the_label_distribution(session: Session) -> None:
    answer = session.answer(Q, profile="demo", task="movielens-rating")
    text = answer.text  # reading the text runs the answer (no iteration asked)
    dist = answer.distribution
    assert list(dist) == ["1", "2", "3", "4", "5"] and abs(sum(dist.values()) - 1) < 1e-5
    assert text in dist and answer.personalization is not None and answer.adapter.is_file()
    assert text == pipeline.decode_label(session.card("movielens-rating"), answer.scores["lp"])
    base = session.answer(Q, profile="demo", task="movielens-rating", personalized=False)
    assert base.text in dist and list(base.distribution) == list(dist)
    assert base.personalization is None and session.engine.active == (None, 0.0)


def test_free_chat_and_generation_answers_stream_text(session: Session) -> None:
    """Generated answers stream real pieces (free chat, a generation task), personalized and base."""
    from p2p_local.personalize import FREE_CHAT

    pieces = list(session.answer("The capital of France is", profile="demo", task=FREE_CHAT, max_tokens=8))
    assert pieces and "".join(pieces).strip()
    subject = "".join(session.answer("files: src/_pytest/python.py\nFix the fixture scope error message.",
                                     task="commit-subject", max_tokens=12))
    assert subject.strip() and session.engine.active == (None, 0.0)


def test_free_chat_never_uses_a_task_adapter(session: Session) -> None:
    """A movie-rating adapter answers in its own format ("3 3 3 3 ..."): free chat answers with the base
    model and the profile's summary in the prompt instead (the shipped bundle has no free-chat task)."""
    from p2p_local.personalize import FREE_CHAT

    answer = session.answer("What kind of movies do I like?", profile="demo", task=FREE_CHAT, max_tokens=24)
    reply = "".join(answer)
    assert answer.personalization is None and session.engine.active == (None, 0.0)
    assert not re.fullmatch(r"(\s*\d\s*){3,}.*", reply, flags=re.S), reply
    prompt = answer.prompt
    assert prompt.startswith("About the user: ") and "Rates highest genres" in prompt


def test_unknown_profile_and_task_are_clear_errors(session: Session) -> None:
    with pytest.raises(StoreError, match="nobody"):
        session.personalize("nobody")
    with pytest.raises(Exception, match="unknown task"):
        session.personalize("demo", task="no-such-task")


def test_bundle_for_another_base_is_refused(engine, tmp_path: Path) -> None:
    src = Bundle.load().directory
    dst = tmp_path / "other"
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["base"]["sha256"] = "0" * 64
    (dst / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="base"):
        Personalizer(Bundle.load(dst), Encoder.load(), engine.base)


def test_cli_personalize_and_ask_json(engine, p2p_home: Path, capsys, tmp_path: Path) -> None:
    from p2p_local.demo import demo_path

    assert main(["profile", "create", "alice", "--task", "movielens-rating"]) == 0
    assert main(["profile", "import", "alice", str(demo_path())]) == 0
    capsys.readouterr()
    assert main(["personalize", "alice", "--query", Q, "--json", "--peft-out", str(tmp_path / "peft")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["items"] > 50 and Path(out["adapter"]).is_file() and out["timings_ms"]["total_ms"] > 0
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    assert main(["ask", Q, "--profile", "alice", "--task", "movielens-rating", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"] in {"1", "2", "3", "4", "5"} and out["adapter"]
    assert main(["ask", Q, "--profile", "alice", "--task", "movielens-rating", "--base", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["adapter"] is None
    assert main(["personalize", "nobody"]) == StoreError.exit_code


def test_a_cached_adapter_llama_cpp_would_refuse_is_made_again(session: Session) -> None:
    """A cached file whose checksum matches (it was recorded so) but that the validator refuses — say,
    written by an older version — is regenerated once from the profile, with a warning."""
    first = session.personalize("demo", "movielens-rating", query=Q)
    session.route.loaded.clear()
    session.engine.use(None)
    bad = first.adapter_path
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    session.store.adapters.record_adapter("demo", first.fingerprint, session.bundle.sha256, bad)  # checksum of the bad bytes
    with pytest.warns(UserWarning, match="regenerated"):
        again = session.personalize("demo", "movielens-rating", query=Q)
    assert not again.cached and again.adapter_path.stat().st_size > 1000
    assert session.engine.active[0] is not None
