"""`p2p models add`: a name is never a path, nothing is replaced silently, and a base llama.cpp would
abort on is loaded once in a child process and refused with a clear error."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from p2p_local import models
from p2p_local.errors import ModelError, UsageError


@pytest.fixture
def models_home(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("P2P_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("P2P_MODELS", str(tmp_path / "models"))
    return tmp_path / "models"


@pytest.mark.parametrize("name", ["../evil", "/tmp/x", "a/b", "..", ".hidden", "x\n", "", "gemma3-270m",
                                  "gemma-3-270m-q4_k_m", "x" * 65])
def test_model_names_are_names(models_home: Path, name: str) -> None:
    with pytest.raises(UsageError):
        models.check_model_name(name)


def test_an_existing_model_is_not_replaced_without_replace(models_home: Path) -> None:
    models_home.mkdir(parents=True, exist_ok=True)
    (models_home / "mine.gguf").write_bytes(b"x")
    with pytest.raises(UsageError, match="--replace"):
        models.check_model_name("mine")
    assert models.check_model_name("mine", replace=True) == "mine"


def test_a_damaged_registry_is_a_clear_error(models_home: Path) -> None:
    models_home.mkdir(parents=True, exist_ok=True)
    for bad in ("{", "[1]", '[{"name": "../x", "filename": "../x.gguf", "sha256": "", "arch": "", "size": 1}]',
                "[" * 10_000):
        (models_home / "registry.json").write_text(bad)
        with pytest.raises(ModelError, match="registry"):
            models.known_models()


def test_a_base_llama_cpp_cannot_load_is_refused_in_a_child(models_home: Path, tmp_path: Path) -> None:
    """block_count 0 trips `GGML_ASSERT(hparams.n_layer_all > 0)` (or an earlier load error): either
    way the child dies, not us, and nothing is registered."""
    path = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(0)
    w.add_context_length(128)
    w.add_embedding_length(8)
    w.add_tensor("token_embd.weight", np.zeros((16, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelError, match="llama.cpp") as e:
        models.add_model(path, "badbase")
    assert "not registered" in e.value.hint
    assert "badbase" not in models.known_models() and not (models_home / "badbase.gguf").exists()
