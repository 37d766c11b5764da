"""The hypernetwork (trainer/hypernet.py) and the functional per-sample LoRA (trainer/lora.py).

The LoRA hooks are checked against the merged-weight reference (trainer.base.merged_lora, which the parity
test ties to llama.cpp) on a small random Gemma 3 built by transformers itself, so the test runs in seconds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.base import merged_lora
from trainer.config import HyperConfig
from trainer.hypernet import HyperNet, count_params
from trainer.lora import FunctionalLoRA, to_gguf_tensors

SMALL_SHAPES = {"attn_q": (64, 32), "attn_v": (16, 32), "attn_k": (16, 32), "ffn_up": (48, 32)}


def small_gemma3(n_layers: int = 3):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=n_layers,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                           sliding_window=16)
    return Gemma3ForCausalLM(cfg).eval().requires_grad_(False)


def small_cfg(**kw) -> HyperConfig:
    base = dict(embedding_dim=12, feature_dim=5, n_layers=3, layers=[0, 1, 2], targets=["attn_q", "attn_v"],
                shapes=SMALL_SHAPES, rank=4, d_profile=16, d_layer=8, d_module=8, d_hidden=16, n_blocks=2)
    return HyperConfig(**{**base, **kw})


def profiles(n: int, cfg: HyperConfig, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(n, cfg.embedding_dim, generator=g), dim=-1)
    return emb, torch.randn(n, cfg.feature_dim, generator=g)


def perturb_heads(net: HyperNet, std: float = 0.05, seed: int = 1) -> None:
    """Stand-in for training: non-zero heads make the adapters depend on the profile."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in net.heads.values():
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) * std)


def test_shapes_and_zero_delta_at_init():
    cfg = small_cfg()
    net = HyperNet(cfg).eval()
    out = net(*profiles(3, cfg))
    assert list(out) == ["attn_q", "attn_v"]
    for m, (a, b) in out.items():
        n_out, n_in = SMALL_SHAPES[m]
        assert a.shape == (3, 3, 4, n_in) and b.shape == (3, 3, n_out, 4)
        assert torch.count_nonzero(b) == 0  # every user starts at delta W = 0
        assert a.abs().max() <= 1 / np.sqrt(n_in) + 1e-6 and a.std() > 0  # A: kaiming-uniform LoRA init
        assert not torch.allclose(a[0, 0], a[0, 1])  # a distinct init per layer
        assert torch.allclose(a[0], a[2])  # ... and the same for every profile


def test_each_profile_gets_its_own_adapter():
    cfg = small_cfg()
    net = HyperNet(cfg).eval()
    perturb_heads(net)
    emb, feats = profiles(4, cfg)
    out = net(emb, feats)
    for i in range(4):  # the batched pass equals one profile at a time
        single = net(emb[i:i + 1], feats[i:i + 1])
        for m in cfg.targets:
            torch.testing.assert_close(single[m][0][0], out[m][0][i], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(single[m][1][0], out[m][1][i], atol=1e-6, rtol=1e-5)
    assert (out["attn_q"][1][0] - out["attn_q"][1][1]).abs().max() > 1e-3


@pytest.mark.parametrize("which", ["embedding", "features"])
def test_ablations_ignore_their_input(which):
    cfg = small_cfg(use_embedding=which == "embedding", use_features=which == "features")
    net = HyperNet(cfg).eval()
    perturb_heads(net)
    emb, feats = profiles(2, cfg)
    emb2, feats2 = profiles(2, cfg, seed=5)
    a = net(emb, feats)["attn_v"][1]
    # swap the ignored input: same output; swap the used one: different output
    same = net(emb, feats2)["attn_v"][1] if which == "embedding" else net(emb2, feats)["attn_v"][1]
    diff = net(emb2, feats)["attn_v"][1] if which == "embedding" else net(emb, feats2)["attn_v"][1]
    assert torch.equal(a, same)
    assert (a - diff).abs().max() > 1e-4


def test_gradients_reach_heads_and_trunk():
    cfg = small_cfg()
    net = HyperNet(cfg).train()
    perturb_heads(net)
    out = net(*profiles(2, cfg))
    sum(t.pow(2).sum() for pair in out.values() for t in pair).backward()
    assert net.heads["attn_q"].weight.grad.abs().sum() > 0
    assert net.trunk_in.weight.grad.abs().sum() > 0
    assert net.profile[0].weight.grad.abs().sum() > 0


def test_default_size_fits_the_bundle_budget():
    """The shipped default (Gemma 3 270M, q+v, rank 8) stays under 25 MB with fp16 head storage."""
    net = HyperNet(HyperConfig(feature_dim=43))
    n = count_params(net)
    assert n["heads"] / n["total"] > 0.8  # the heads dominate, as in the paper
    fp16_bytes = 2 * (n["heads"] + n["base_lora"]) + 4 * n["trunk"]
    assert fp16_bytes < 25 * 2**20


def test_feature_standardisation():
    cfg = small_cfg(use_embedding=False)
    net = HyperNet(cfg).eval()
    perturb_heads(net)
    emb, feats = profiles(3, cfg)
    before = net(emb, feats)["attn_q"][1]
    net.set_feature_stats(torch.full((cfg.feature_dim,), 3.0), torch.full((cfg.feature_dim,), 2.0))
    after = net(emb, feats * 2 + 3)["attn_q"][1]  # the same standardised input
    torch.testing.assert_close(before, after, atol=1e-5, rtol=1e-4)


# --- functional LoRA ------------------------------------------------------------------------------------
def test_hooks_match_merged_weights_per_sample():
    """Two samples with two different LoRAs in one batch == each sample run alone with its LoRA merged."""
    model = small_gemma3()
    cfg = small_cfg()
    net = HyperNet(cfg).eval()
    perturb_heads(net, std=0.3)
    adapters = net(*profiles(2, cfg))
    scale = 1.5
    ids = torch.tensor([[2, 5, 9, 11, 7], [2, 40, 41, 3, 8]])
    lora = FunctionalLoRA(model, cfg.targets, cfg.layers, scale)
    with torch.no_grad(), lora.applied(adapters):
        hooked = model(input_ids=ids).logits
    base = model(input_ids=ids).logits
    for i in range(2):
        tensors = to_gguf_tensors(adapters, cfg.layers, index=i)
        with torch.no_grad(), merged_lora(model, tensors, scale):
            merged = model(input_ids=ids[i:i + 1]).logits[0]
        torch.testing.assert_close(hooked[i], merged, atol=2e-5, rtol=1e-4)
        assert (hooked[i] - base[i]).abs().max() > 1e-3  # the LoRA really did something
    lora.remove()
    torch.testing.assert_close(model(input_ids=ids).logits, base)  # hooks gone: the base again


def test_hooks_inactive_outside_context_and_need_all_modules():
    model = small_gemma3()
    cfg = small_cfg()
    lora = FunctionalLoRA(model, cfg.targets, cfg.layers, 2.0)
    ids = torch.tensor([[2, 5, 9]])
    base = model(input_ids=ids).logits
    torch.testing.assert_close(model(input_ids=ids).logits, base)
    adapters = HyperNet(cfg)(*profiles(1, cfg))
    with pytest.raises(KeyError):
        with lora.applied({"attn_q": adapters["attn_q"]}):
            pass
    lora.remove()


def test_gradient_flows_through_hooks_into_hypernet():
    model = small_gemma3()
    cfg = small_cfg()
    net = HyperNet(cfg).train()
    lora = FunctionalLoRA(model, cfg.targets, cfg.layers, 2.0)
    with lora.applied(net(*profiles(2, cfg))):
        loss = model(input_ids=torch.tensor([[2, 5, 9], [2, 6, 7]])).logits[:, -1].logsumexp(-1).sum()
    loss.backward()
    assert net.base["attn_q"].grad.abs().sum() > 0  # B's part of the base LoRA (A's gets 0 while B = 0)
    assert net.heads["attn_v"].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())  # the base stays frozen
    lora.remove()
