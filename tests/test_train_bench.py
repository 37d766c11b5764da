"""trainer/bench.py and the faster training step: the old step (read from git at LEGACY_COMMIT) and today's
step compute the same update on the same batch (buckets remove padding, not samples), and the cached
frozen lower layers give the same losses as running them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from p2p_local.profile import FEATURE_DIM
from trainer.bench import legacy_trainer, new_arm, old_arm
from trainer.config import recipe
from trainer.samples import SampleSet
from trainer.train import LowerCache, length_buckets, micro_batch_losses


def two_tasks(tok) -> list[SampleSet]:
    """A rating task (1-token targets) and a generation task (long targets) of different lengths."""
    rng = np.random.default_rng(0)
    words = "the a movie film email subject commit fix bug test rating great poor long short".split()
    sets = []
    for t, (kind, n_tgt) in enumerate([("rating", 1), ("generation", 9)]):
        prompts, targets = [], []
        for _ in range(4):
            n = int(rng.integers(4, 30 if t else 12))
            prompts.append(tok(" ".join(rng.choice(words, n)) + "\nAnswer:")["input_ids"])
            targets.append(tok(" ".join(rng.choice(words, n_tgt)), add_special_tokens=False)["input_ids"][:n_tgt])
        sets.append(SampleSet(f"task{t}", kind, prompts, targets, [f"u{i}" for i in range(4)],
                              rng.standard_normal((4, 384)).astype(np.float32),
                              rng.standard_normal((4, FEATURE_DIM)).astype(np.float32)))
    return sets


def test_length_buckets_minimise_padding():
    assert length_buckets([10, 88, 12, 80, 65, 11], 16) == [[0, 5, 2], [4], [3, 1]]
    assert length_buckets([10, 88, 12], 1000) == [[0, 2, 1]]  # one pass is cheaper than any padding saved
    assert sorted(i for g in length_buckets(list(range(30, 0, -1)), 4) for i in g) == list(range(30))


@pytest.mark.slow
@pytest.mark.parametrize("bucket", [False, True])
def test_new_step_equals_the_old_step(torch_base, tmp_path, bucket):
    """The same init, batch and gradient: bit for bit without buckets; with them, up to float summation
    order (unpadded shapes take other matmul paths). Compared before Adam, which turns 1e-9 noise on a
    near-zero gradient into a full lr-sized step."""
    model, tok = torch_base
    sets = two_tasks(tok)
    L = legacy_trainer(dest=tmp_path)
    small = dict(tasks=["x"], batch_size=8, micro_batch=8, l2_ab=1e-3, label_smoothing=0.1,
                 hyper=dict(d_profile=32, d_hidden=32, d_layer=8, d_module=8, n_blocks=1, dropout=0.0))
    old = old_arm(L, model, sets, L.recipe("tiny", **small))
    new, _ = new_arm("new", recipe("tiny", bucket=bucket, bucket_overhead=0, **small), model, sets)
    try:
        for a, b in zip(old.net.state_dict().values(), new.net.state_dict().values(), strict=True):
            assert torch.equal(a, b)  # the same init
        picks = [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2), (0, 3), (1, 3)]
        old.run(picks)
        new.run(picks)
        for (k, a), b in zip(old.net.named_parameters(), new.net.parameters(), strict=True):
            if not bucket:
                assert torch.equal(a.grad, b.grad), k
            scale = float(a.grad.abs().max()) + 1e-12
            torch.testing.assert_close(a.grad / scale, b.grad / scale, atol=1e-3, rtol=0, msg=k)
        assert sum(float(p.grad.abs().sum()) for p in old.net.parameters()) > 0
    finally:
        old.close()
        new.close()


@pytest.mark.slow
def test_cached_lower_layers_give_the_same_losses(torch_base):
    from trainer.config import HyperConfig
    from trainer.hypernet import HyperNet
    from trainer.lora import FunctionalLoRA

    model, tok = torch_base
    sets = two_tasks(tok)
    h = HyperConfig(embedding_dim=384, feature_dim=FEATURE_DIM, layers=list(range(12, 18)), d_profile=32, d_hidden=32)
    torch.manual_seed(0)
    net = HyperNet(h).eval()
    for head in net.heads.values():
        torch.nn.init.normal_(head.weight, std=0.02)  # a non-zero adapter
    lora = FunctionalLoRA(model, h.targets, h.layers, h.scale)
    cache = LowerCache(model, 12, torch.device("cpu"), 2**30)
    picks = [(0, 0), (1, 1), (0, 2), (1, 3)]
    try:
        with torch.no_grad():
            ref, _ = micro_batch_losses(net, lora, model, sets, picks, torch.device("cpu"), bucket_overhead=None)
            for _ in range(2):  # fill, then reuse
                got, _ = micro_batch_losses(net, lora, model, sets, picks, torch.device("cpu"), cache=cache)
                torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)
    finally:
        lora.remove()
    assert cache.computed == 4 and len(cache.store) == 4
