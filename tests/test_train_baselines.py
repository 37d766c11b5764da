"""trainer/baselines.py: MT-LoRA and OPPU train with the shared loss code and export valid GGUF adapters
that llama.cpp loads (alpha = s * r)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from p2p_lab.data.converters import convert
from p2p_local.adapter import validate_adapter
from p2p_local.data.format import User, builtin_card, write_users_jsonl
from trainer.baselines import OPPUConfig, run_mtlora, train_oppu

TASK = "popquorn-offensiveness"



@pytest.fixture(scope="module")
def a_user() -> User:
    return convert(TASK).users[3]


@pytest.mark.slow
def test_oppu_fits_one_user(torch_base, a_user, engine, tmp_path):
    model, tok = torch_base
    cfg = OPPUConfig(lr=2e-3, epochs=3, max_items=8, batch_size=4)
    tensors, stats = train_oppu(builtin_card(TASK), a_user.items, model, tok, cfg)
    assert stats["items"] == 8 and stats["steps"] == 6
    assert stats["last_loss"] < stats["first_loss"]  # it fits the user's own items
    assert len(tensors) == 2 * model.config.num_hidden_layers
    assert any(np.abs(b).max() > 0 for _, b in tensors.values())
    assert all(p.grad is None for p in model.parameters())  # base untouched
    from trainer.baselines import write_gguf

    path = write_gguf(tmp_path / "u.gguf", tensors, cfg.scale, cfg.rank, "test")
    adapter = validate_adapter(path, engine.base)
    assert adapter.scale == pytest.approx(cfg.scale)  # alpha = s * r
    handle = engine.load_adapter(path)  # llama.cpp accepts it
    engine.free_adapter(handle)


@pytest.mark.slow
def test_oppu_cli_as_the_eval_calls_it(p2p_home, a_user, tmp_path, engine):
    """`python -m trainer.baselines oppu --task T --user-data F --out X` (p2p_local/eval/methods.py)."""
    from p2p_local.paths import repo_root

    data = tmp_path / "h.jsonl"
    write_users_jsonl(data, [User(a_user.user_id, a_user.items[:6])])
    out = tmp_path / "oppu.gguf"
    proc = subprocess.run([sys.executable, "-m", "trainer.baselines", "oppu", "--task", TASK, "--user-data", str(data),
                           "--out", str(out), "--epochs", "1"], cwd=repo_root(), capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["items"] == 6 and report["config"]["lr"] == 1e-4 and report["config"]["rank"] == 8
    validate_adapter(out, engine.base)


@pytest.mark.slow
def test_mtlora_trains_with_the_p2p_loop(p2p_home, torch_base, tmp_path, engine):
    out = tmp_path / "mt-lora.gguf"
    summary = run_mtlora(TASK, out, "tiny", {"steps": 3, "batch_size": 4, "micro_batch": 4, "max_users_train": 6,
                                             "max_items_per_user": 2, "eval_users": 4, "eval_items_per_user": 1,
                                             "max_prompt_tokens": 40}, run_dir=tmp_path / "run",
                         base=torch_base)
    assert summary["steps"] == 3
    ev = summary["eval"][TASK]
    assert ev["loss_true"] == pytest.approx(ev["loss_shuffled"], abs=1e-5)  # no profile: controls coincide
    adapter = validate_adapter(out, engine.base)
    assert adapter.rank == 8 and adapter.scale == pytest.approx(2.0)
    assert any(np.abs(b).max() > 0 for _, b in adapter.tensors.values())
