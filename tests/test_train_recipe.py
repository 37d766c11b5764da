"""The tiny CPU recipe end to end: train a few steps on real users, export the bundle, and check that the
adapter the exported ONNX generates moves llama.cpp's logits the way the PyTorch model predicts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from p2p_local.adapter import write_adapter
from p2p_local.bundle import Bundle
from trainer.config import recipe
from trainer.export import export_bundle, load_checkpoint
from trainer.lora import FunctionalLoRA
from trainer.train import result_checkpoint, train, val_score

# Trained for 10 steps the adapter is weak; attaching it at user scale AMPLIFY on both sides (llama.cpp's
# scale argument, and s * AMPLIFY in torch) lifts the logit deltas well above llama.cpp's quantization noise.
AMPLIFY = 8.0
MIN_CORR = 0.9
SLOPE_TOL = 0.25



@pytest.fixture(scope="module")
def tiny_run(torch_base, tmp_path_factory):
    """The tiny recipe in a private data dir (module-scoped: trained once for the checks below)."""
    import os
    from unittest import mock

    from p2p_local import paths

    root = tmp_path_factory.mktemp("tiny")
    with mock.patch.dict(os.environ, P2P_MODELS=str(paths.models_dir()), P2P_HOME=str(root / "home"),
                         P2P_CACHE=str(root / "cache")):
        cfg = recipe("tiny", out_dir=str(root / "run"), eval_every=5)  # a mid-run validation: selection runs
        summary = train(cfg, base=torch_base)
        yield cfg, summary, root


@pytest.mark.slow
def test_tiny_recipe_learns(tiny_run):
    cfg, summary, root = tiny_run
    assert summary["finished"] and summary["steps"] == cfg.steps
    ev = summary["eval"]["popquorn-offensiveness"]
    print(json.dumps(ev, indent=1))
    # the adapter beats the untouched base on held-out users' target tokens
    assert ev["loss_true"] < ev["loss_base"] - 0.05
    # MAE as `p2p eval` decodes it (the distribution's median), beside the user-mean reference on the same queries
    # Both decode to labels, so n x MAE is a whole number; the label CE renormalises the first-token
    # distribution over the labels, so it can never exceed the full-vocabulary loss of the same token.
    for key in ("mae_median_true", "mae_user_median"):
        assert abs(ev[key] * ev["n"] - round(ev[key] * ev["n"])) < 1e-6, key
    assert ev["label_ce_true"] <= ev["loss_true"] + 1e-6
    log = [json.loads(x) for x in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == cfg.steps and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < losses[0]
    # Checkpoint selection: step 5 was validated; the result is best.pt only when it beat the last step.
    mid = [r for r in log if r.get("step") == 5 and "eval" in r]
    assert mid and mid[0]["val_score"] == pytest.approx(val_score(mid[0]["eval"]))
    chosen = result_checkpoint(root / "run")
    if summary.get("selected"):
        assert chosen.name == "best.pt" and summary["selected"]["step"] == 5
        assert summary["selected"]["val_score"] < summary["selected"]["last_val_score"]
    else:
        assert chosen.name == "last.pt" and not (root / "run" / "best.pt").exists()


@pytest.mark.slow
def test_exported_adapter_moves_llama_cpp_like_torch(tiny_run, torch_base, engine, tmp_path):
    cfg, _, root = tiny_run
    net, ckpt = load_checkpoint(root / "run" / "last.pt")
    meta = ckpt["export_meta"]
    out = export_bundle(net, tmp_path / "bundle", base=engine.base, tasks=meta["tasks"], training=meta["training"],
                        evaluation=meta.get("evaluation"), feature_names=meta["feature_names"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["training"]["steps"] == cfg.steps and manifest["evaluation"]["tasks"]
    bundle = Bundle.load(out)
    bundle.check(engine.base)

    # real held-out profiles, as the trainer cached them
    import os
    import pickle

    from trainer.samples import SampleSet

    cache = root / "cache" / "trainer"
    val_file = next(p for p in os.listdir(cache) if "-val-" in p)
    val: SampleSet = pickle.loads((cache / val_file).read_bytes())
    rows = [0, len(val) - 1]
    emb, feats = val.embeddings[rows], val.features[rows]

    model, _ = torch_base
    lora = FunctionalLoRA(model, net.cfg.targets, net.cfg.layers, net.cfg.scale * AMPLIFY)
    with torch.no_grad():
        adapters = net(torch.from_numpy(emb), torch.from_numpy(feats))
    generated = bundle.generate(emb, feats)
    stats = []
    try:
        for k, row in enumerate(rows):
            ids = val.prompt_ids[row]
            x = torch.tensor([ids])
            with torch.no_grad():
                base_logits = model(input_ids=x).logits[0, -1].numpy()
                with lora.applied({m: (a[k:k + 1], b[k:k + 1]) for m, (a, b) in adapters.items()}):
                    lora_logits = model(input_ids=x).logits[0, -1].numpy()
            path = write_adapter(tmp_path / f"u{k}.gguf", generated[k], alpha=bundle.alpha, base=engine.base)
            handle = engine.load_adapter(path)
            try:
                engine.use(None)
                llama_base = engine.last_logits(ids)
                engine.use(handle, AMPLIFY)
                llama_lora = engine.last_logits(ids)
            finally:
                engine.use(None)
                engine.free_adapter(handle)
            t, g = (lora_logits - base_logits).astype(np.float64), (llama_lora - llama_base).astype(np.float64)
            tc, gc = t - t.mean(), g - g.mean()
            stats.append((float(np.corrcoef(t, g)[0, 1]), float(tc @ gc / (tc @ tc)), float(t.std())))
            # the rating the adapter favours is the same on both sides
            lab = val.label_ids
            assert int(np.argmax(lora_logits[lab])) == int(np.argmax(llama_lora[lab]))
    finally:
        lora.remove()
    print("pearson, slope, torch delta std:", stats)
    for r, slope, std in stats:
        assert std > 0.5  # a real change, well above quantization noise
        assert r >= MIN_CORR and abs(slope - 1) <= SLOPE_TOL


def test_user_median_reference_from_the_profile_features():
    """The trainer's user-mean reference reads the history median off the r_median feature and snaps it down
    to a label (a 3.5 median decodes as 3, as the eval's user-mean distribution does)."""
    from p2p_local.profile import FEATURE_DIM, FEATURE_NAMES
    from trainer.samples import SampleSet
    from trainer.train import user_median_errors

    medians, gold = [1.0, 3.5, 5.0, 2.0], ["2", "3", "5", "4"]
    feats = np.zeros((4, FEATURE_DIM), np.float32)
    feats[:, FEATURE_NAMES.index("r_median")] = [(m - 3.0) / 2.0 for m in medians]  # -1..1 over 1..5
    s = SampleSet("t", "rating", [[1]] * 4, [[2]] * 4, ["a", "b", "c", "d"], np.zeros((4, 3), np.float32), feats,
                  gold, [0, 1, 2, 3, 4], ["1", "2", "3", "4", "5"])
    assert user_median_errors(s).mean() == pytest.approx((1 + 0 + 0 + 2) / 4)
