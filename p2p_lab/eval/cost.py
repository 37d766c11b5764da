"""Deployment cost per user: P2P's whole path vs OPPU's per-user training, side by side, same machine.

P2P, timed end to end in this process: history -> profile -> encoder -> hypernetwork -> GGUF write ->
load + attach in llama.cpp (what a user waits for; the paper's figure timed the hypernetwork only).
Peak memory: tracemalloc (Python + numpy allocations of the path) and the process's max RSS.

OPPU: the same user's history -> `python -m trainer.baselines oppu ...` in a subprocess (torch never
enters the app's process) -> load + attach the adapter it wrote. Peak memory: the subprocess's own
max RSS (os.wait4 reports exactly that child's rusage).

`measure_cost()` returns a JSON-ready dict (for `p2p bench cost --json`); the ratio is OPPU / P2P.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from p2p_local.data.format import User, write_users_jsonl

Log = Callable[[str], None]


def _maxrss_mb(ru_maxrss: int) -> float:
    # Linux reports KiB, macOS bytes.
    return ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def oppu_available() -> str | None:
    """None when OPPU can be trained here, else why not."""
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed (OPPU trains a LoRA per user with PyTorch: pip install '.[train]')"
    if importlib.util.find_spec("trainer.baselines") is None:
        return "trainer/baselines.py is not available (run from a source checkout)"
    return None


# Why a launcher: a child's ru_maxrss starts at its PARENT's RSS (the kernel carries the high-water
# mark of the forked/vforked address space across exec), so measured straight from this process
# (which holds the base model) OPPU would be charged for our memory. A fresh small interpreter forks
# the command and reports that grandchild's own rusage (bias: the launcher's ~10 MB).
_LAUNCHER = """
import json, os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"code": os.waitstatus_to_exitcode(status), "maxrss": ru.ru_maxrss}, f)
"""


def run_subprocess_rusage(cmd: list[str], timeout: float | None = None, env: dict | None = None
                          ) -> tuple[int, float, float, str]:
    """Run cmd; return (exit code, wall seconds, the command's own max RSS in MB, stderr tail)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "rusage.json"
        errpath = Path(tmp) / "stderr"
        t0 = time.perf_counter()
        with errpath.open("wb") as err:
            proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(result), *cmd], stdout=subprocess.DEVNULL,
                                    stderr=err, env=env, start_new_session=True)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)  # the launcher and the command
                proc.wait()
        wall = time.perf_counter() - t0
        tail = errpath.read_bytes()[-2000:].decode("utf-8", errors="replace")
        if not result.is_file():
            return (proc.returncode or -9), wall, 0.0, tail + ("\n(timed out)" if proc.returncode in (-9, None) else "")
        r = json.loads(result.read_text())
    return int(r["code"]), wall, _maxrss_mb(int(r["maxrss"])), tail


def oppu_train_command(task: str, history_jsonl: Path, out: Path, extra: list[str] | None = None) -> list[str]:
    from p2p_lab.eval.methods import oppu_command

    return oppu_command(task, history_jsonl, out) + list(extra or [])


def pick_users(task: str, n: int, seed: int = 0) -> tuple[Any, list[User]]:
    from p2p_lab.data import load_task
    from p2p_lab.eval.runner import subset

    td = load_task(task)
    users = [u for u in td.test if len(u.items) >= 2]
    return td.card, subset(users, n, seed)


def measure_cost(task: str = "movielens-rating", users: int = 3, *, bundle: str | None = None, oppu: bool = True,
                 oppu_extra: list[str] | None = None, oppu_timeout: float | None = 1800, p2p_repeat: int = 5,
                 seed: int = 0, log: Log = _stderr) -> dict[str, Any]:
    """Per-user deployment cost of P2P and OPPU on the same `users` test users (history = all but the
    last item, query = the last item). Returns medians, per-user figures, peak memory and the ratio.

    One-time costs are reported apart, not in the per-user figures: P2P's bundle + encoder load
    (`startup_s`), OPPU's first load of the base into PyTorch (`one_time_setup_s`: de-quantizing
    the GGUF into the trainer's cache). Each OPPU user still pays its own process start, torch
    import and base load, as an on-device trainer started for that user would."""
    from p2p_local.bundle import Bundle
    from p2p_local.encoder import Encoder
    from p2p_local.engine import Engine
    from p2p_local.models import get_spec, prepare_base
    from p2p_local.personalize import Personalizer

    card, chosen = pick_users(task, users, seed)
    out: dict[str, Any] = {"task": task, "n_users": len(chosen), "users": [u.user_id for u in chosen],
                           "history_items": [len(u.items) - 1 for u in chosen]}
    spec = get_spec()
    with Engine(prepare_base(spec), n_ctx=512, sha256=spec.sha256) as eng, tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        b, enc = Bundle.load(bundle), Encoder.load()
        pz = Personalizer(b, enc, eng.base)
        startup_s = time.perf_counter() - t0
        # Warm-up once (imports, onnxruntime arenas), not counted.
        _p2p_once(pz, eng, card, chosen[0], Path(tmp) / "warm.gguf")
        per_user = []
        for u in chosen:  # the median of `p2p_repeat` runs per user: the path is short and the machine noisy
            runs = [_p2p_once(pz, eng, card, u, Path(tmp) / f"p2p-{k}.gguf") for k in range(p2p_repeat)]
            per_user.append(min(runs, key=lambda r: abs(r["total_s"] - statistics.median(x["total_s"] for x in runs))))
        out["p2p"] = {
            "status": "ok", "bundle": b.name, "bundle_neutral": b.neutral,
            "startup_s": round(startup_s, 3),  # once per app start: bundle + encoder load
            "per_user_s": round(statistics.median(r["total_s"] for r in per_user), 4),
            "stages_median_s": {k: round(statistics.median(r[k] for r in per_user), 4)
                                for k in per_user[0] if k.endswith("_s")},
            "path_peak_alloc_mb": round(max(r["peak_alloc_mb"] for r in per_user), 2),
            "process_max_rss_mb": round(_maxrss_mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss), 1),
            "per_user": per_user,
        }
        log(f"p2p: {out['p2p']['per_user_s']:.3f} s per user (median of {len(per_user)})")
        why = oppu_available() if oppu else "not requested"
        if why:
            out["oppu"] = {"status": "skipped", "reason": why}
        else:
            out["oppu"] = _oppu(task, chosen, eng, Path(tmp), oppu_extra, oppu_timeout, log)
    p, o = out["p2p"], out["oppu"]
    out["ratio_oppu_over_p2p"] = round(o["per_user_s"] / p["per_user_s"], 1) if o.get("status") == "ok" else None
    out["machine"] = {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)}
    return out


def _p2p_once(pz, eng, card, user: User, path: Path) -> dict[str, Any]:
    """The route's personalization step (`pipeline.Route.personalize`: profile -> adapter file -> attached)."""
    from p2p_local.pipeline import Request, Route

    route = Route(eng, pz, scratch=path)
    request = Request(card, user.items[-1].input, user.items[:-1], item=user.items[-1])
    tracemalloc.start()
    t = route.personalize(request).timings_ms
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    route.release()
    return {"user_id": user.user_id, "profile_s": t["profile_ms"] / 1e3, "encode_s": t["encode_ms"] / 1e3,
            "hypernet_s": t["hypernet_ms"] / 1e3, "write_s": t["write_ms"] / 1e3,
            "load_attach_s": t["load_attach_ms"] / 1e3, "total_s": t["total_ms"] / 1e3, "peak_alloc_mb": peak / 2**20}


def _oppu(task: str, chosen: list[User], eng, tmp: Path, extra: list[str] | None, timeout: float | None,
          log: Log) -> dict[str, Any]:
    log("oppu: one-time setup (the base model into the trainer's cache) ...")
    code, setup_s, _, err = run_subprocess_rusage([sys.executable, "-c", "from trainer.base import load_base; load_base()"],
                                                  timeout)
    if code != 0:
        return {"status": "failed", "reason": f"loading the base into PyTorch failed: {err.strip()[-500:]}"}
    per_user = []
    for k, u in enumerate(chosen):
        data = tmp / f"oppu-{k}.jsonl"
        gguf = tmp / f"oppu-{k}.gguf"
        write_users_jsonl(data, [User(u.user_id, u.items[:-1])])
        cmd = oppu_train_command(task, data, gguf, extra)
        log(f"oppu: training user {u.user_id} ({len(u.items) - 1} items) ...")
        code, wall, rss, err = run_subprocess_rusage(cmd, timeout)
        if code != 0 or not gguf.is_file():
            return {"status": "failed", "reason": f"`{' '.join(cmd)}` exited {code}: {err.strip()[-500:]}",
                    "per_user": per_user}
        t0 = time.perf_counter()
        handle = eng.load_adapter(gguf)
        eng.use(handle, 1.0)
        attach = time.perf_counter() - t0
        eng.free_adapter(handle)
        per_user.append({"user_id": u.user_id, "train_s": wall, "load_attach_s": attach, "total_s": wall + attach,
                         "max_rss_mb": rss})
        log(f"oppu: {wall + attach:.1f} s, max RSS {rss:.0f} MB")
    return {
        "status": "ok",
        "command": " ".join(oppu_train_command(task, Path("USER.jsonl"), Path("OUT.gguf"), extra)),
        "per_user_s": round(statistics.median(r["total_s"] for r in per_user), 3),
        "one_time_setup_s": round(setup_s, 1),
        "train_median_s": round(statistics.median(r["train_s"] for r in per_user), 3),
        "subprocess_max_rss_mb": round(max(r["max_rss_mb"] for r in per_user), 1),
        "per_user": per_user,
    }


def table(res: dict[str, Any]) -> str:
    """A readable side-by-side summary."""
    p, o = res["p2p"], res["oppu"]
    lines = [f"deployment cost per user, {res['task']}, {res['n_users']} users "
             f"(history {int(np.median(res['history_items']))} items median)",
             f"  P2P  {p['per_user_s']:.3f} s  (profile+encode+hypernet+write+attach; "
             f"path peak alloc {p['path_peak_alloc_mb']:.1f} MB, process max RSS {p['process_max_rss_mb']:.0f} MB)"]
    if o.get("status") == "ok":
        lines.append(f"  OPPU {o['per_user_s']:.1f} s  (train subprocess max RSS {o['subprocess_max_rss_mb']:.0f} MB)")
        lines.append(f"  OPPU / P2P = {res['ratio_oppu_over_p2p']}x")
    else:
        lines.append(f"  OPPU {o['status']}: {o.get('reason', '')}")
    return "\n".join(lines)
