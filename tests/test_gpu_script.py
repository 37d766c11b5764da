"""scripts/gpu_bundle.sh: parts that fit one device call beside the working tree, with a sha256 manifest (split), and the `run` phase's CPU path
with the tiny recipe and a budget of seconds: reassemble, verify, train, stop at the budget, export."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from trainer.gpu import CALL_BYTES, MANIFEST, call_plan, join_files, part_budget, split_file, tree_bytes


def test_call_plan_fits_the_device_limit():
    budget = part_budget()
    assert tree_bytes() + budget <= CALL_BYTES  # the working tree travels with every call
    files = [{"parts": [{"file": f"a.{k}", "size": budget} for k in range(3)] + [{"file": "a.3", "size": 100}]},
             {"parts": [{"file": "b.0", "size": budget - 100}, {"file": "b.1", "size": 1}]}]
    calls = call_plan(files, budget)
    assert calls == [["a.0"], ["a.1"], ["a.2"], ["a.3", "b.0"], ["b.1"]]
    sizes = {p["file"]: p["size"] for f in files for p in f["parts"]}
    assert all(sum(sizes[x] for x in call) <= budget for call in calls)
    assert sorted(x for call in calls for x in call) == sorted(sizes)


def test_split_and_join_verify_every_part(tmp_path):
    src = tmp_path / "blob.bin"
    src.write_bytes(os.urandom(10_000))
    carry = tmp_path / "carry"
    carry.mkdir()
    entry = split_file(src, carry, "blob.bin", part_bytes=3_000)
    assert [p["size"] for p in entry["parts"]] == [3000, 3000, 3000, 1000]
    (carry / MANIFEST).write_text(json.dumps({"files": [entry]}))
    out = join_files(carry, tmp_path / "out")
    assert out["blob.bin"].read_bytes() == src.read_bytes()
    part = carry / entry["parts"][1]["file"]
    data = bytearray(part.read_bytes())
    data[0] ^= 1
    part.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match="corrupt"):
        join_files(carry, tmp_path / "again")


@pytest.fixture(scope="module")
def real_hf_cache(base_model_path):
    """The de-quantized base cache of the real data dir (made once; the run below only reads it)."""
    from p2p_local.models import DEFAULT_BASE
    from trainer.base import hf_cache_dir, load_base

    load_base(base_model_path)
    return hf_cache_dir(DEFAULT_BASE.sha256).parent


@pytest.mark.slow
def test_run_phase_on_cpu_with_the_tiny_recipe(real_hf_cache, base_model_path, p2p_home, tmp_path):
    from p2p_local.bundle import Bundle
    from p2p_local.paths import repo_root

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "hf").symlink_to(real_hf_cache)  # no second de-quantization (~45 s)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "P2P_CACHE": str(cache), "PYTHONPATH": str(repo_root())}
    carry, out = tmp_path / "carry", tmp_path / "out"
    small = ["--set", "max_users_train=16", "--set", "eval_users=6"]
    proc = subprocess.run(["bash", "scripts/gpu_bundle.sh", "split", "--recipe", "tiny", "--carry", str(carry),
                           "--no-wheels", *small], cwd=repo_root(), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((carry / MANIFEST).read_text())
    parts = [p for f in manifest["files"] for p in f["parts"]]
    assert all(sum((carry / x).stat().st_size for x in call) + manifest["tree_bytes"] <= CALL_BYTES
               for call in manifest["calls"])
    assert sorted(x for call in manifest["calls"] for x in call) == sorted([p["file"] for p in parts] + [MANIFEST])
    assert sum(f["size"] for f in manifest["files"] if f["name"] == manifest["base"]) == base_model_path.stat().st_size

    env_run = {**env, "BUDGET": "2", "OUT": str(out), "WORK": str(tmp_path / "work")}
    proc = subprocess.run(["bash", "scripts/gpu_bundle.sh", "run", str(carry), "--steps", "200"], cwd=repo_root(),
                          env=env_run, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"] == "cpu" and summary["stopped"] == "max_wall_s=2"
    assert 1 <= summary["steps"] < 200 and summary["finished"]
    assert summary["eval"]["popquorn-offensiveness"]["loss_true"] > 0
    bundle_manifest = json.loads((out / "bundle" / "manifest.json").read_text())
    assert bundle_manifest["training"]["stopped"] == "max_wall_s=2"
    assert bundle_manifest["training"]["steps"] == summary["steps"]
    Bundle.load(out / "bundle")
