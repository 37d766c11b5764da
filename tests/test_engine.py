"""The real llama.cpp runtime with the real Gemma 3 270M GGUF: generation, adapters, hot-swapping."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from p2p_local.adapter import write_adapter
from p2p_local.engine import Engine
from p2p_local.errors import AdapterError

PROMPT = "Movie: The Matrix (1999) | Genres: Action|Sci-Fi\nThe user's rating (1-5): "


def random_lora(engine: Engine, std: float = 0.05, seed: int = 0, zero_b: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for layer in range(engine.base.n_layers):
        for module in ("attn_q", "attn_v"):
            name = f"blk.{layer}.{module}.weight"
            n_out, n_in = engine.base.shapes[name]
            a = rng.normal(0, std, (8, n_in)).astype(np.float32)
            b = np.zeros((n_out, 8), np.float32) if zero_b else rng.normal(0, std, (n_out, 8)).astype(np.float32)
            out[name] = (a, b)
    return out


@pytest.fixture
def adapter_file(engine: Engine, tmp_path: Path) -> Path:
    return write_adapter(tmp_path / "a.gguf", random_lora(engine), alpha=16.0, base=engine.base)


def test_greedy_generation_is_deterministic_and_streams(engine: Engine) -> None:
    engine.use(None)
    pieces = list(engine.generate("The capital of France is", max_tokens=10))
    assert len(pieces) > 1, "tokens arrive as a stream, not one block"
    assert "".join(pieces) == engine.complete("The capital of France is", max_tokens=10)


def test_stop_strings_end_generation(engine: Engine) -> None:
    engine.use(None)
    text = engine.complete("1, 2, 3, 4,", max_tokens=30, stop=[","])
    assert "," not in text and text.strip()


def test_sampled_decoding_depends_on_seed(engine: Engine) -> None:
    engine.use(None)
    runs = {engine.complete("Once upon a time", max_tokens=20, temperature=1.0, seed=s) for s in range(4)}
    assert len(runs) > 1
    assert engine.complete("Once upon a time", max_tokens=20, temperature=1.0, seed=7) == \
        engine.complete("Once upon a time", max_tokens=20, temperature=1.0, seed=7)


def test_attach_switch_detach_without_reloading(engine: Engine, adapter_file: Path, tmp_path: Path) -> None:
    engine.use(None)
    base = engine.last_logits(PROMPT)
    a = engine.load_adapter(adapter_file)
    b = engine.load_adapter(write_adapter(tmp_path / "b.gguf", random_lora(engine, seed=1), alpha=16.0,
                                          base=engine.base))
    engine.use(a, 1.0)
    la = engine.last_logits(PROMPT)
    engine.use(b, 1.0)
    lb = engine.last_logits(PROMPT)
    assert np.abs(la - base).mean() > 0.5 and np.abs(lb - la).mean() > 0.5
    # switching back and forth is bitwise reproducible; detach and scale 0 give the base exactly
    for _ in range(3):
        engine.use(a, 1.0)
        np.testing.assert_array_equal(engine.last_logits(PROMPT), la)
        engine.use(None)
        np.testing.assert_array_equal(engine.last_logits(PROMPT), base)
    engine.use(a, 0.0)
    np.testing.assert_array_equal(engine.last_logits(PROMPT), base)
    # the scale matters: half strength lies between
    engine.use(a, 0.5)
    lh = engine.last_logits(PROMPT)
    assert 0 < np.abs(lh - base).mean() < np.abs(la - base).mean()
    engine.free_adapter(a)
    engine.free_adapter(b)
    assert engine.active[0] is None


def test_generation_after_switch_uses_new_adapter(engine: Engine, adapter_file: Path) -> None:
    """The prompt cache must not leak a prefix computed under the previous adapter."""
    engine.use(None)
    plain = engine.complete(PROMPT, max_tokens=8)
    a = engine.load_adapter(adapter_file)
    engine.use(a, 1.0)
    adapted = engine.complete(PROMPT, max_tokens=8)
    engine.use(None)
    assert engine.complete(PROMPT, max_tokens=8) == plain
    assert adapted != plain
    engine.free_adapter(a)


def test_zero_b_adapter_is_bitwise_neutral(engine: Engine, tmp_path: Path) -> None:
    engine.use(None)
    base = engine.last_logits(PROMPT)
    z = engine.load_adapter(write_adapter(tmp_path / "z.gguf", random_lora(engine, zero_b=True), alpha=16.0,
                                          base=engine.base))
    engine.use(z, 1.0)
    np.testing.assert_array_equal(engine.last_logits(PROMPT), base)
    engine.free_adapter(z)


def test_label_scores_are_a_distribution(engine: Engine) -> None:
    from p2p_local import pipeline

    engine.use(None)
    s = pipeline.label_scores(engine, PROMPT, pipeline.label_token_ids(engine, ["1", "2", "3", "4", "5"]))
    assert s["lp"].shape == (5,) and abs(np.exp(s["lp"]).sum() - 1) < 1e-9 and 0 < s["mass"] <= 1


def test_teacher_forced_logprobs_match_step_by_step(engine: Engine) -> None:
    """The batched continuation log-probabilities agree with decoding one token at a time (up to the
    kernels' batch-size rounding), and a continuation the model expects scores higher than noise."""
    engine.use(None)
    cont = engine.tokenize(" 1 2 3 4 5", add_bos=False)
    prompt = "Count: 0"
    lp = engine.continuation_logprobs(prompt, cont)
    ref = []
    for i, tok in enumerate(cont):
        x = engine.last_logits(engine.tokenize(prompt) + cont[:i]).astype(np.float64)
        ref.append(x[tok] - x.max() - np.log(np.exp(x - x.max()).sum()))
    assert np.abs(lp - np.array(ref)).max() < 0.2
    noise = engine.continuation_logprobs(prompt, engine.tokenize(" zebra quantum fjord ladle", add_bos=False))
    assert lp.mean() > noise.mean() + 1.0


def test_bad_adapter_raises_and_engine_keeps_working(engine: Engine, adapter_file: Path, tmp_path: Path) -> None:
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(adapter_file.read_bytes()[:5000])
    with pytest.raises(AdapterError):
        engine.load_adapter(trunc)
    engine.use(None)
    assert engine.complete("Hello", max_tokens=3)


DANGEROUS = textwrap.dedent(
    """
    import sys, gguf, numpy as np
    from p2p_local.engine import Engine
    from p2p_local.errors import P2PError
    model, kind, out = sys.argv[1], sys.argv[2], sys.argv[3]
    eng = Engine(model, n_ctx=256)
    name = "blk.0.attn_q.weight"
    n_out, n_in = eng.base.shapes[name]
    a, b = np.ones((8, n_in), np.float32), np.ones((n_out, 8), np.float32)
    w = gguf.GGUFWriter(out, "llama" if kind == "arch" else "gemma3")
    w.add_string("general.type", "adapter"); w.add_string("adapter.type", "lora")
    if kind == "int_alpha":
        w.add_uint32("adapter.lora.alpha", 16)
    else:
        w.add_float32("adapter.lora.alpha", 16.0)
    if kind == "nan":
        a[0, 0] = np.nan
    if kind == "shape":
        a = np.ones((8, n_in + 1), np.float32)
    if kind == "unknown":
        name = "blk.99.attn_q.weight"
    w.add_tensor(name + ".lora_a", a); w.add_tensor(name + ".lora_b", b)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    try:
        eng.load_adapter(out)
    except P2PError as e:
        print("REFUSED:", str(e).splitlines()[0])
        eng.use(None)
        print("STILL OK:", bool(eng.complete("Hi", max_tokens=2) is not None))
        sys.exit(0)
    print("LOADED")
    sys.exit(1)
    """
)


@pytest.mark.parametrize("kind", ["int_alpha", "nan", "shape", "unknown", "arch"])
def test_dangerous_adapters_never_reach_llama_cpp(kind: str, base_model_path: Path, tmp_path: Path) -> None:
    """Cases that can abort llama.cpp run in a subprocess: it must refuse in Python and exit cleanly."""
    proc = subprocess.run([sys.executable, "-c", DANGEROUS, str(base_model_path), kind, str(tmp_path / "x.gguf")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "REFUSED:" in proc.stdout and "STILL OK: True" in proc.stdout


def test_corrupt_model_file_raises_cleanly(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 1000)
    code = f"from p2p_local.engine import Engine\ntry:\n Engine({str(bad)!r})\nexcept Exception as e:\n print(type(e).__name__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "EngineError" in proc.stdout, proc.stdout + proc.stderr


def test_thread_count_defaults_to_all_cores_and_env_overrides(monkeypatch) -> None:
    import os

    from p2p_local.engine import default_threads

    monkeypatch.delenv("P2P_THREADS", raising=False)
    assert default_threads() == (os.cpu_count() or 1)
    monkeypatch.setenv("P2P_THREADS", "1")
    assert default_threads() == 1


def test_a_continuation_longer_than_a_batch_is_scored_in_pieces(engine: Engine) -> None:
    """llama.cpp aborts on a batch over n_batch tokens: a long continuation goes in pieces, same numbers."""
    engine.use(None)
    cont = engine.tokenize(" one two three" * 300, add_bos=False)[: engine.llm.n_batch + 40]
    lp = engine.continuation_logprobs("Count:", cont)
    assert lp.shape == (len(cont),) and np.isfinite(lp).all()
    head = engine.continuation_logprobs("Count:", cont[:20])
    assert np.abs(lp[:20] - head).max() < 0.2


def test_a_model_llama_cpp_cannot_load_is_refused_with_its_reason(tmp_path: Path) -> None:
    """A GGUF that Python reads but llama.cpp refuses (a hyperparameter missing): the error says llama.cpp's own
    reason. The load runs with llama.cpp's native logger first (no GIL per line), then again with the log kept."""
    import gguf

    from p2p_local.engine import Engine
    from p2p_local.errors import EngineError

    path = tmp_path / "no-norm-eps.gguf"
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(1)
    w.add_tensor("token_embd.weight", np.zeros((16, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(EngineError, match="key not found in model: gemma3.attention.layer_norm_rms_epsilon"):
        Engine(path, n_ctx=256)
