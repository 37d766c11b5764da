"""trainer/export.py: the exported bundle computes what the PyTorch hypernetwork computes (onnxruntime vs
torch, max abs error <= 1e-3 on A and B for real profiles), in a file that fits the 25 MB budget."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from p2p_local.adapter import BaseInfo
from p2p_local.bundle import Bundle
from p2p_local.models import DEFAULT_BASE
from trainer.config import HyperConfig
from trainer.export import MAX_BUNDLE_BYTES, export_bundle
from trainer.hypernet import HyperNet

PARITY_ATOL = 1e-3


@pytest.fixture(scope="module")
def real_profiles(base_model_path):
    """Profiles of real MovieLens users (their last item as the query), embedded by the device encoder."""
    from p2p_lab.data.converters import convert
    from p2p_local.data.format import builtin_card
    from p2p_local.profile import build_profile
    from trainer.samples import load_encoder

    card = builtin_card("movielens-rating")
    users = convert("movielens-rating").users[:6]
    profs = [build_profile(card, u.items[:-1], u.items[-1]) for u in users]
    emb = load_encoder().embed([p.text for p in profs])
    return emb.astype(np.float32), np.stack([p.features for p in profs]).astype(np.float32)


@pytest.fixture(scope="module")
def trained_like(real_profiles) -> HyperNet:
    """The default architecture with non-zero heads (B entries ~0.03, like a trained one)."""
    from p2p_local.profile import FEATURE_DIM

    torch.manual_seed(0)
    net = HyperNet(HyperConfig(feature_dim=FEATURE_DIM))
    feats = torch.from_numpy(real_profiles[1])
    net.set_feature_stats(feats.mean(0), feats.std(0))
    with torch.no_grad():
        for head in net.heads.values():
            head.weight.normal_(0, 0.002)
    return net.eval()


@pytest.mark.parametrize("fp16", [True, False])
def test_onnx_matches_torch(tmp_path, base_model_path, real_profiles, trained_like, fp16):
    base = BaseInfo.from_gguf(base_model_path, DEFAULT_BASE.sha256)
    out = export_bundle(trained_like, tmp_path / "b", base=base, tasks=[{"name": "movielens-rating"}],
                        training={"steps": 0}, fp16_weights=fp16)
    size = (out / "hypernet.onnx").stat().st_size
    if fp16:
        assert size <= MAX_BUNDLE_BYTES
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["neutral"] is False and manifest["base"]["sha256"] == DEFAULT_BASE.sha256
    assert manifest["lora"]["alpha"] == pytest.approx(trained_like.cfg.scale * trained_like.cfg.rank)
    assert manifest["encoder"]["sha256"] and manifest["tasks"][0]["name"] == "movielens-rating"

    bundle = Bundle.load(out)
    bundle.check(base)
    emb, feats = real_profiles
    with torch.no_grad():
        ref = trained_like(torch.from_numpy(emb), torch.from_numpy(feats))
    for n in (1, len(emb)):  # dynamic batch
        got = bundle.run(emb[:n], feats[:n])
        worst = 0.0
        for m, (a, b) in ref.items():
            worst = max(worst, float(np.abs(got[f"{m}.lora_a"] - a[:n].numpy()).max()),
                        float(np.abs(got[f"{m}.lora_b"] - b[:n].numpy()).max()))
        print(f"fp16={fp16} batch={n}: max |onnx - torch| = {worst:.2e}, onnx {size / 2**20:.1f} MiB")
        assert worst <= (PARITY_ATOL if fp16 else 1e-5)
    # the adapters really differ between users (so the parity check is not comparing zeros)
    b0 = ref["attn_q"][1]
    assert float((b0[0] - b0[1]).abs().max()) > 1e-3


def test_export_refuses_a_base_with_other_shapes(tmp_path, base_model_path, trained_like):
    import dataclasses

    base = BaseInfo.from_gguf(base_model_path, DEFAULT_BASE.sha256)
    shapes = dict(base.shapes)
    shapes["blk.3.attn_v.weight"] = (512, 640)
    with pytest.raises(ValueError, match="attn_v"):
        export_bundle(trained_like, tmp_path / "b", base=dataclasses.replace(base, shapes=shapes))
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("shipped", [True, False])
def test_a_bundle_reads_back_into_torch(tmp_path, base_model_path, real_profiles, trained_like, shipped):
    """hypernet_from_bundle (the warm start) inverts the export: the shipped bundle, and a fresh export of a
    net with a layer left out (so a folded embedding table is read back by layer, not by row), give in torch
    what onnxruntime gives, and the fresh one's weights are the exported ones (up to float16)."""
    import dataclasses

    from p2p_local.bundle import find_bundle
    from trainer.export import hypernet_from_bundle

    if shipped:
        folder, original = find_bundle(), None
    else:
        original = HyperNet(dataclasses.replace(trained_like.cfg, layers=[0, 2, 5]))
        original.load_state_dict({k: v for k, v in trained_like.state_dict().items() if not k.startswith("base.")},
                                 strict=False)
        with torch.no_grad():
            original.layer_emb.weight.normal_()
        original.eval()
        base = BaseInfo.from_gguf(base_model_path, DEFAULT_BASE.sha256)
        folder = export_bundle(original, tmp_path / "b", base=base, tasks=[{"name": "movielens-rating"}],
                               training={"steps": 0})
    net = hypernet_from_bundle(folder)
    emb, feats = real_profiles
    got = Bundle.load(folder).run(emb, feats)
    with torch.no_grad():
        ref = net(torch.from_numpy(emb), torch.from_numpy(feats))
    worst = max(float(np.abs(got[f"{m}.lora_{ab}"] - t.numpy()).max())
                for m, pair in ref.items() for ab, t in zip("ab", pair, strict=True))
    assert worst <= 1e-5, worst
    if original is not None:
        for name, value in original.state_dict().items():
            if name != "layer_emb.weight":
                torch.testing.assert_close(net.state_dict()[name], value, atol=2e-3, rtol=1e-2, msg=name)
        adapted = torch.tensor(original.cfg.layers)
        torch.testing.assert_close(net.layer_emb.weight[adapted], original.layer_emb.weight[adapted])
