"""Training/deployment parity: a LoRA applied in PyTorch (transformers' Gemma 3 de-quantized from the same
GGUF) moves the logits the same way as that LoRA written as a GGUF adapter and attached in llama.cpp.

llama.cpp re-quantizes activations inside its matmuls, so logits never match bitwise; the LoRA is made
strong enough (logit deltas of 2-4 units, quantization noise ~0.2) that the deltas (adapter minus base)
at the last position must correlate (Pearson >= 0.9 on every prompt) with a least-squares slope of
1 +- 0.2. The same LoRA exported with mistakes shapes cannot catch must fail that check.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from p2p_lab.bench import random_qv_lora
from p2p_local.adapter import write_adapter
from p2p_local.peft_export import gguf_to_hf_name
from trainer.base import hf_gguf_module_map, linear, merged_lora

RANK = 8
SCALE = 0.5  # W + SCALE * B @ A on q/v of every layer: logit deltas with std 2-4
MIN_CORR = 0.9
SLOPE_TOL = 0.2
PROMPTS = [
    "The capital of France is",
    "Once upon a time, a small robot",
    "<start_of_turn>user\nRate this movie from 1 to 5: a dull, overlong sequel.<end_of_turn>\n<start_of_turn>model\n",
    "def fibonacci(n):\n    ",
    "Ingredients: flour, sugar, eggs, and",
]



@pytest.fixture(scope="module")
def token_ids(engine) -> list[list[int]]:
    """Tokenized once, by llama.cpp (BOS included); torch gets exactly these ids."""
    return [engine.tokenize(p) for p in PROMPTS]


@torch.no_grad()
def torch_last_logits(model, token_ids, pairs=None, scale: float = 0.0) -> np.ndarray:
    """Last-position logits [n_prompts, vocab] with W + scale * B @ A merged in (weights restored after)."""
    with merged_lora(model, pairs or {}, scale):
        return np.stack([model(torch.tensor([ids]), logits_to_keep=1).logits[0, -1].float().numpy()
                         for ids in token_ids])


def llama_last_logits(engine, token_ids, adapter_path=None) -> np.ndarray:
    handle = engine.load_adapter(adapter_path) if adapter_path else None
    try:
        engine.use(handle, 1.0)
        return np.stack([engine.last_logits(ids) for ids in token_ids])
    finally:
        engine.use(None)
        if handle is not None:
            engine.free_adapter(handle)


def agreement(torch_delta: np.ndarray, llama_delta: np.ndarray) -> list[tuple[float, float]]:
    """Per prompt: (Pearson r, least-squares slope of llama's delta on torch's delta)."""
    out = []
    for t, g in zip(torch_delta.astype(np.float64), llama_delta.astype(np.float64), strict=True):
        tc, gc = t - t.mean(), g - g.mean()
        out.append((float(np.corrcoef(t, g)[0, 1]), float(tc @ gc / (tc @ tc))))
    return out


def agrees(stats: list[tuple[float, float]]) -> bool:
    return all(r >= MIN_CORR and abs(slope - 1.0) <= SLOPE_TOL for r, slope in stats)


# --- same model, same tokens ---------------------------------------------------------------------------
def test_tokenizers_agree(torch_base, token_ids):
    """The trainer tokenizes with transformers, the app with llama.cpp: same ids, BOS and turn markers included."""
    _, tokenizer = torch_base
    assert token_ids[0][0] == tokenizer.bos_token_id == 2
    assert [tokenizer(p)["input_ids"] for p in PROMPTS] == token_ids
    assert 105 in token_ids[2] and 106 in token_ids[2]  # <start_of_turn>, <end_of_turn> as single tokens


def test_module_map_matches_model(torch_base, engine):
    """The torch-free GGUF -> transformers name map (peft_export) is the one the real model has."""
    model, _ = torch_base
    from_model = hf_gguf_module_map(model)
    expected = {n: gguf_to_hf_name(n) for n in engine.base.shapes if n.startswith("blk.") and
                n.split(".")[2] in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert len(expected) == 7 * engine.base.n_layers
    assert from_model == expected
    for name, (n_out, n_in) in engine.base.shapes.items():  # and the shapes agree: (n_out, n_in) both sides
        if name in expected:
            assert tuple(linear(model, name).weight.shape) == (n_out, n_in)


def test_base_logits_agree(torch_base, engine, token_ids):
    """The de-quantized weights are the deployed ones: same top token, near-identical logits."""
    t = torch_last_logits(torch_base[0], token_ids)
    g = llama_last_logits(engine, token_ids)
    # llama.cpp re-quantizes activations inside its matmuls (and the kernels differ by CPU build: AVX2 vs
    # AVX-512), so a near-tie may flip: torch's top token must be llama.cpp's top or a close second.
    top_t = t.argmax(1)
    gap = g.max(1) - g[np.arange(len(g)), top_t]
    assert (gap < 0.5).all(), gap
    assert (top_t == g.argmax(1)).mean() >= 0.8
    assert min(np.corrcoef(a, b)[0, 1] for a, b in zip(t, g, strict=True)) > 0.99


# --- the LoRA moves both the same way, and exporter mistakes are caught ----------------------------------
@pytest.fixture(scope="module")
def deltas(torch_base, engine, token_ids):
    """Torch's logit delta under the LoRA, and llama.cpp's base logits (computed once)."""
    pairs = random_qv_lora(engine.base, RANK, std=None)
    model = torch_base[0]
    torch_delta = torch_last_logits(model, token_ids, pairs, SCALE) - torch_last_logits(model, token_ids)
    assert np.std(torch_delta, axis=1).min() > 1.5  # well above llama.cpp's quantization noise (~0.2)
    return pairs, torch_delta, llama_last_logits(engine, token_ids)


def _reverse_layers(pairs, n_layers):
    out = {}
    for name, pair in pairs.items():
        _, layer, module, _ = name.split(".")
        out[f"blk.{n_layers - 1 - int(layer)}.{module}.weight"] = pair
    return out


# name -> (how the exporter gets it wrong, whether llama.cpp should still agree with torch)
VARIANTS = {
    "correct": (lambda pairs, n: (pairs, SCALE * RANK), True),
    # alpha written as the scale itself, forgetting * r: llama.cpp applies SCALE / 8.
    "alpha_without_rank": (lambda pairs, n: (pairs, SCALE), False),
    # layer i's pair written to layer n-1-i (e.g. iterating a reversed list): every shape still fits.
    "layers_reversed": (lambda pairs, n: (_reverse_layers(pairs, n), SCALE * RANK), False),
    # A's rank rows reordered but B's columns not (e.g. an SVD sorted on one side only).
    "rank_order_mismatch": (lambda pairs, n: ({k: (a[::-1].copy(), b) for k, (a, b) in pairs.items()},
                                              SCALE * RANK), False),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lora_parity(variant, deltas, engine, token_ids, tmp_path):
    pairs, torch_delta, llama_base = deltas
    make, should_agree = VARIANTS[variant]
    tensors, alpha = make(pairs, engine.base.n_layers)
    path = write_adapter(tmp_path / f"{variant}.gguf", tensors, alpha=alpha, base=engine.base, dtype="f32")
    llama_delta = llama_last_logits(engine, token_ids, path) - llama_base
    stats = agreement(torch_delta, llama_delta)
    print(variant, [(round(r, 3), round(s, 3)) for r, s in stats])
    assert agrees(stats) == should_agree, f"{variant}: (pearson, slope) per prompt = {stats}"
