"""trainer/train.py: exact resume, per-sample profiles, the task mixture, and the loss on target tokens only.

Real components: the base de-quantized from the real GGUF, real POPQUORN users, the device's ONNX encoder.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.config import recipe
from trainer.train import TaskMixture, collate, shuffled_profiles, train, user_bootstrap_ci

TASK = "popquorn-offensiveness"  # small real rating task: prepared in seconds


@pytest.fixture(scope="module")
def torch_base(base_model_path):
    from trainer.base import load_base

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: OpenMP threads spinning against other work are slower
    yield load_base(base_model_path)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One prepared-data cache for this module's runs (each run still writes into its own P2P_HOME)."""
    return tmp_path_factory.mktemp("trainer-cache")


@pytest.fixture
def home(p2p_home, shared_cache, monkeypatch):
    monkeypatch.setenv("P2P_CACHE", str(shared_cache))
    return p2p_home


def tiny_cfg(out_dir, **kw):
    base = dict(tasks=[TASK], steps=4, batch_size=2, micro_batch=1, max_users_train=6, max_items_per_user=2,
                eval_users=0, ckpt_every=2, max_prompt_tokens=40, lr=1e-3, warmup_frac=0.25, l2_ab=1e-4,
                label_smoothing=0.1, out_dir=str(out_dir),
                hyper=dict(d_profile=32, d_hidden=32, d_layer=8, d_module=8, n_blocks=1, dropout=0.1))
    return recipe("tiny", **{**base, **kw})


@pytest.mark.slow
def test_resume_is_exact(home, torch_base, tmp_path):
    """4 steps straight == 2 steps, stop, resume from the checkpoint, 2 more: identical weights and optimiser."""
    straight = train(tiny_cfg(tmp_path / "a"), base=torch_base)
    assert straight["finished"]
    first = train(tiny_cfg(tmp_path / "b", stop_after=2), base=torch_base)
    assert not first["finished"] and first["steps"] == 2
    second = train(tiny_cfg(tmp_path / "b"), base=torch_base)
    assert second["finished"]
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    assert a["sampler"] == b["sampler"]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        for k in sa:
            assert torch.equal(sa[k], sb[k])
    # training moved the weights (the comparison above is not between two untouched inits)
    init = torch.zeros_like(a["model"]["heads.attn_q.weight"])
    assert not torch.equal(a["model"]["heads.attn_q.weight"], init)
    assert straight["last"]["loss"] == second["last"]["loss"]


def test_task_mixture_is_sqrt_weighted_deterministic_and_resumable():
    m = TaskMixture([10_000, 100], seed=3)
    assert m.weights[0] / m.weights[1] == pytest.approx(10.0)
    picks = [m.batch(s, 64) for s in range(50)]
    share = np.mean([t == 1 for b in picks for t, _ in b])
    assert 0.05 < share < 0.14  # ~1/11
    small = [i for b in picks for t, i in b if t == 1]
    assert sorted(small[:100]) == list(range(100))  # one pass over the small task before any repeat
    again = TaskMixture([10_000, 100], seed=3)
    for s in range(25):
        again.batch(s, 64)
    resumed = TaskMixture([10_000, 100], seed=3)
    resumed.load_state_dict(again.state_dict())
    assert [resumed.batch(s, 64) for s in range(25, 50)] == picks[25:]


def test_each_sample_carries_its_own_profile():
    """The reference code conditioned every sample on sample 0's profile; here row i is sample i's."""
    from trainer.samples import SampleSet

    n = 5
    s = SampleSet("t", "rating", [[2, 10 + i, 11] for i in range(n)], [[7]] * n, [f"u{i // 2}" for i in range(n)],
                  np.arange(n * 4, dtype=np.float32).reshape(n, 4), np.arange(n * 3, dtype=np.float32).reshape(n, 3))
    batch = collate([s], [(0, 3), (0, 1), (0, 4)])
    assert batch.embedding[:, 0].tolist() == [12.0, 4.0, 16.0]
    assert batch.features[:, 0].tolist() == [9.0, 3.0, 12.0]
    # target positions: the last prompt position predicts the (single) target token
    assert batch.tgt_pos.tolist() == [2, 2, 2] and batch.tgt_ids.tolist() == [7, 7, 7]
    shuf = shuffled_profiles(s.user_ids)
    assert all(s.user_ids[j] != s.user_ids[i] for i, j in enumerate(shuf))


def test_loss_is_on_target_tokens_only(home, torch_base):
    """Per-sample loss == cross-entropy of the full model's logits at the target positions, and the prompt
    tokens do not enter it."""
    from trainer.samples import SampleSet
    from trainer.train import per_sample_loss, target_logits

    model, tok = torch_base
    p1 = tok("Comment: you are great\nHow offensive the user finds it (1-5): ")["input_ids"]
    p2 = tok("Commit:\nfix a bug\nSubject line:\n")["input_ids"]
    t2 = tok("Fix the bug\n", add_special_tokens=False)["input_ids"]
    s = SampleSet("t", "rating", [p1, p2], [tok("1", add_special_tokens=False)["input_ids"], t2], ["a", "b"],
                  np.zeros((2, 384), np.float32), np.zeros((2, 43), np.float32))
    batch = collate([s], [(0, 0), (0, 1)])
    with torch.no_grad():
        got = per_sample_loss(target_logits(model, batch), batch)
        for b, (p, t) in enumerate([(p1, s.target_ids[0]), (p2, t2)]):
            logits = model(input_ids=torch.tensor([p + t])).logits[0]
            ref = torch.nn.functional.cross_entropy(logits[len(p) - 1:len(p) - 1 + len(t)], torch.tensor(t))
            assert got[b].item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-4)


def test_user_bootstrap_ci():
    users = [f"u{i // 4}" for i in range(40)]
    vals = np.array([0.5 + (i // 4) * 0.01 for i in range(40)])
    lo, hi = user_bootstrap_ci(vals, users)
    assert lo < vals.mean() < hi and hi - lo < 0.1
    lo0, hi0 = user_bootstrap_ci(np.zeros(40), users)
    assert lo0 == hi0 == 0.0


def test_resume_keeps_the_checkpoints_data_and_model_settings():
    from trainer.train import resume_config

    saved = recipe("tiny", max_history=64, lr=1e-3, steps=100)
    now = recipe("tiny", lr=5e-4, steps=300, threads=1, hyper=dict(d_hidden=128))
    cfg = resume_config(now, saved, verbose=False)
    assert cfg.max_history == 64 and cfg.lr == 1e-3 and cfg.hyper.d_hidden == saved.hyper.d_hidden
    assert cfg.steps == 300 and cfg.threads == 1
