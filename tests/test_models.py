"""Model registry: prepare is idempotent, wrong bytes are refused with a message that says what to do."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from p2p_local import models
from p2p_local.cli import main
from p2p_local.errors import ModelError


def test_prepare_places_and_verifies_the_default(base_model_path: Path) -> None:
    assert base_model_path.stat().st_size == models.DEFAULT_BASE.size
    assert models.read_arch(base_model_path) == "gemma3"
    assert models.prepare_base(models.DEFAULT_BASE) == base_model_path  # second call: cached check


def test_wrong_hash_size_and_arch_are_refused(base_model_path: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("P2P_MODELS", str(tmp_path))
    copy = tmp_path / models.DEFAULT_BASE.filename
    shutil.copyfile(base_model_path, copy)
    with open(copy, "r+b") as f:  # flip bytes inside the weights: same size, other hash
        f.seek(200_000_000)
        f.write(b"\xff" * 64)
    with pytest.raises(ModelError, match="sha256") as e:
        models.verify(copy, models.DEFAULT_BASE)
    assert "p2p models prepare" in str(e.value)
    with pytest.raises(ModelError, match="bytes, expected"):
        models.verify(copy, replace(models.DEFAULT_BASE, size=123))
    copy.unlink()
    shutil.copyfile(base_model_path, copy)
    with pytest.raises(ModelError, match="is a 'gemma3' model, expected 'llama'"):
        models.verify(copy, replace(models.DEFAULT_BASE, arch="llama"))
    with pytest.raises(ModelError, match="not prepared"):
        models.verify(tmp_path / "missing.gguf", models.DEFAULT_BASE)


def test_truncated_model_is_reported_not_crashed(base_model_path: Path, tmp_path: Path) -> None:
    trunc = tmp_path / "t.gguf"
    with open(base_model_path, "rb") as f:
        trunc.write_bytes(f.read(4096))
    with pytest.raises(ModelError, match="not a readable GGUF"):
        models.read_arch(trunc)


def test_models_cli_list_add_and_prepare(base_model_path: Path, p2p_home: Path, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("P2P_MODELS", str(tmp_path / "m"))
    assert main(["models", "list", "--json"]) == 0
    assert '"not prepared"' in capsys.readouterr().out
    assert main(["models", "add", str(base_model_path), "--name", "my-gemma"]) == 0
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "my-gemma" in out and "ready" in out
    assert main(["models", "prepare", "nonexistent"]) == models.ModelError.exit_code


def test_models_list_shows_the_encoder_and_each_models_template(capsys) -> None:
    from p2p_local.cli import main

    assert main(["models", "list", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["encoder"]["status"] == "ready" and "MiniLM" in got["encoder"]["id"]
    by_name = {m["name"]: m for m in got["models"]}
    assert by_name["gemma3-270m"]["template"] == "none"  # a pretrained base
    assert by_name["smollm2-135m"]["template"] == "chat"


def test_a_missing_encoder_is_said_before_the_base_is_assembled_and_base_needs_none(p2p_home, tmp_path, monkeypatch,
                                                                                     capsys) -> None:
    """Issue 26: with an empty models dir, a personalized ask says the encoder is missing at once (the base is
    not assembled first: half a minute); `ask --base` needs no encoder."""
    import time

    from p2p_local.cli import main
    from p2p_local.models import DEFAULT_BASE, model_path, prepare_base

    real = prepare_base(DEFAULT_BASE)
    empty = tmp_path / "models"
    empty.mkdir()
    monkeypatch.setenv("P2P_MODELS", str(empty))
    assert main(["profile", "create", "me", "--task", "movielens-rating"]) == 0
    assert main(["profile", "add", "me", "--input", "Heat (1995) | Genres: Action", "--output", "4"]) == 0
    t0 = time.perf_counter()
    assert main(["ask", "Heat (1995) | Genres: Action", "--profile", "me"]) == 3
    assert time.perf_counter() - t0 < 10 and "encoder is not prepared" in capsys.readouterr().err
    assert not model_path(DEFAULT_BASE).exists()  # nothing assembled
    # The base model in place (linked, with its verified record), still no encoder: --base answers.
    model_path(DEFAULT_BASE).symlink_to(real)
    stamp = real.with_name(real.name + ".verified.json")
    (empty / stamp.name).write_text(stamp.read_text())
    assert main(["ask", "Heat (1995) | Genres: Action", "--profile", "me", "--base", "--max-tokens", "4"]) == 0


def test_a_broken_bundle_is_said_before_the_base_is_assembled(p2p_home, tmp_path, monkeypatch) -> None:
    """Session.open loads the bundle beside the base model; when the base would first be assembled (half a
    minute), a broken bundle is still said at once and nothing is assembled."""
    import pytest

    from p2p_local.encoder import encoder_dir
    from p2p_local.errors import BundleError
    from p2p_local.models import DEFAULT_BASE, model_path
    from p2p_local.personalize import Session

    real_encoder = encoder_dir()
    empty = tmp_path / "models"
    empty.mkdir()
    (empty / "encoder").symlink_to(real_encoder)  # the encoder prepared, the base not
    monkeypatch.setenv("P2P_MODELS", str(empty))
    broken = tmp_path / "bundle"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError):
        Session.open(bundle=broken)
    assert not model_path(DEFAULT_BASE).exists()


def test_a_base_loading_for_the_session_is_closed_when_the_session_cannot_open(p2p_home, tmp_path) -> None:
    """The commit hook starts loading the base before it imports the rest (`Session.open(base=...)`): when the
    session then fails (a broken bundle, said before a chat model is prepared), that engine is closed, not left
    holding the model."""
    from concurrent.futures import Future

    import pytest

    from p2p_local.errors import BundleError
    from p2p_local.personalize import Session

    class LoadedBase:  # stands in for the Engine the hook's thread builds
        closed = False

        def close(self) -> None:
            self.closed = True

    engine, base = LoadedBase(), Future()
    base.set_result(engine)
    broken = tmp_path / "bundle"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError):
        Session.open(bundle=broken, base=base, chat_model="any")
    assert engine.closed
