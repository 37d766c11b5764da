"""Data-parallel training: `torchrun --nproc-per-node 2 -m trainer.train` on CPU (gloo).

Both ranks must end with identical weights, and those weights must equal a single-process run over the
same global batches (gradient accumulation instead of a second process), up to float summation order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ARGS = ["--recipe", "tiny", "--tasks", "popquorn-offensiveness", "--steps", "3",
        "--set", "batch_size=4", "--set", "micro_batch=2", "--set", "max_users_train=8",
        "--set", "max_items_per_user=2", "--set", "eval_users=0", "--set", "max_prompt_tokens=40",
        "--set", "save_rank_weights=true", "--set", "hyper.dropout=0.0", "--set", "hyper.d_hidden=32",
        "--set", "hyper.d_profile=32"]


def run(cmd: list[str], env: dict, cwd) -> None:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


@pytest.fixture(scope="module")
def real_hf_cache(base_model_path):
    """The de-quantized base cache of the real data dir (made once; the runs below only read it)."""
    from p2p_local.models import DEFAULT_BASE
    from trainer.base import hf_cache_dir, load_base

    load_base(base_model_path)
    return hf_cache_dir(DEFAULT_BASE.sha256).parent


@pytest.mark.slow
def test_two_cpu_ranks_stay_identical(real_hf_cache, p2p_home, tmp_path):
    from p2p_local.paths import repo_root

    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "hf").symlink_to(real_hf_cache)  # no second de-quantization (~45 s)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "P2P_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": str(repo_root())}
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "trainer.train", *ARGS, "--out-dir", str(ddp_dir)], env, repo_root())
    r0 = torch.load(ddp_dir / "weights-rank0.pt")
    r1 = torch.load(ddp_dir / "weights-rank1.pt")
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks diverged on {k}"
    assert r0["heads.attn_v.weight"].abs().sum() > 0  # training happened

    run([sys.executable, "-m", "trainer.train", *ARGS, "--out-dir", str(single_dir)], env, repo_root())
    # Same global batches: the same loss and pre-clip gradient norm at every step (a rank that trained on
    # its half alone, or summed instead of averaged gradients, changes both) ...
    ddp_log = [json.loads(line) for line in (ddp_dir / "metrics.jsonl").read_text().splitlines()]
    single_log = [json.loads(line) for line in (single_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [(r["loss"], r["grad_norm"]) for r in ddp_log if "loss" in r]
    assert len(steps) == 3
    for (l1, g1), (l2, g2) in zip(steps, [(r["loss"], r["grad_norm"]) for r in single_log if "loss" in r], strict=True):
        assert l1 == pytest.approx(l2, rel=1e-4) and g1 == pytest.approx(g2, rel=1e-4)
    # ... and the same weights, up to float summation order (Adam turns 1e-7 gradient noise on near-zero
    # gradients into part of one lr-sized update, so the bound is a fraction of lr = 1e-3).
    s = torch.load(single_dir / "weights-rank0.pt")
    for k in r0:
        torch.testing.assert_close(r0[k], s[k], atol=3e-4, rtol=0, msg=f"DDP != single process on {k}")
