"""A bundle from ten minutes of a GPU machine that can fetch nothing (scripts/gpu_bundle.sh wraps this).

    python -m trainer.gpu split [--recipe full] [--carry runs/gpu-carry]      # here
    python -m trainer.gpu run --carry DIR --out OUT [--budget 480]              # there

`split` (here, where the data and the prepared base are): the sample sets of the recipe are built (or read
from the trainer's cache) and pickled, and that file, the base GGUF (253 MB) and wheels of the packages
the trainer needs beyond torch and transformers are cut into parts of at most 60 MiB, with a manifest of
sha256 per part and per whole file. Each part fits one transfer of at most 64 MiB.

`run` (there, with all parts gathered in one folder): the files are reassembled and verified against the
manifest, missing packages are installed from the wheels (no index), the base is de-quantized with
transformers, the recipe trains (bf16 autocast on CUDA, float32 on CPU) until its steps are done or the
wall-clock budget is spent, train()'s own validation runs, and the bundle is exported into OUT (with the
run's metrics and summary). On a machine without a GPU the same path runs on the CPU (the CI test runs
it with the tiny recipe and a budget of seconds): the project never needs a GPU.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

# One device call carries at most CALL_BYTES, the checkout's working tree included (~16 MB tracked): a part
# is what is left after the tree and a margin, so that every call of the plan fits (tests/test_gpu_script.py).
CALL_BYTES = 64 * 2**20
MARGIN_BYTES = 3 * 2**20
MANIFEST = "MANIFEST.json"
DATA_FILE = "samples.pkl.z"
WHEELS = "wheels"
# Imported by trainer.train / trainer.export beyond torch, transformers (and their numpy, safetensors,
# tokenizers, tqdm, pyyaml): module name -> distribution.
NEEDED = {"gguf": "gguf", "onnx": "onnx", "ml_dtypes": "ml_dtypes", "google.protobuf": "protobuf",
          "platformdirs": "platformdirs", "yaml": "pyyaml", "requests": "requests"}
# What the lent nvidia-h200 image lacks of NEEDED (its package list: .library/device/KINDS.md): only these
# travel by default, every MiB of a call being precious (`split --wheel NAME` adds others).
CARRIED_WHEELS = ("gguf", "platformdirs")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_bytes(repo: Path | None = None) -> int:
    """Bytes of what a device call sends besides its carry: tracked files and untracked, unignored ones."""
    repo = repo or Path(__file__).resolve().parents[1]
    out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True).stdout
    return sum((repo / p).stat().st_size for p in out.decode().split("\0") if p and (repo / p).is_file())


def part_budget(repo: Path | None = None) -> int:
    """The largest part that fits one call beside the working tree (whole MiB)."""
    free = CALL_BYTES - tree_bytes(repo) - MARGIN_BYTES
    if free < 4 * 2**20:
        raise SystemExit(f"the working tree leaves {free / 2**20:.1f} MiB of a {CALL_BYTES / 2**20:.0f} MiB call: too little")
    return free // 2**20 * 2**20


def call_plan(files: list[dict], budget: int) -> list[list[str]]:
    """Parts grouped into calls: each call's parts sum to at most `budget` bytes (first fit, in order)."""
    calls: list[list[str]] = []
    sizes: list[int] = []
    for entry in files:
        for p in entry["parts"]:
            for k, used in enumerate(sizes):
                if used + p["size"] <= budget:
                    calls[k].append(p["file"])
                    sizes[k] += p["size"]
                    break
            else:
                calls.append([p["file"]])
                sizes.append(p["size"])
    return calls


def split_file(src: Path, dest: Path, name: str, part_bytes: int) -> dict:
    """Cut `src` into dest/<name>.NNN parts; {name, size, sha256, parts: [{file, sha256}]}."""
    whole, parts = hashlib.sha256(), []
    with open(src, "rb") as f:
        k = 0
        while chunk := f.read(part_bytes):
            whole.update(chunk)
            part = dest / f"{name}.{k:03d}"
            part.write_bytes(chunk)
            parts.append({"file": part.name, "sha256": hashlib.sha256(chunk).hexdigest(), "size": len(chunk)})
            k += 1
    return {"name": name, "size": src.stat().st_size, "sha256": whole.hexdigest(), "parts": parts}


def join_files(carry: Path, dest: Path) -> dict[str, Path]:
    """Reassemble every file of carry/MANIFEST.json into dest, verifying each part and each whole file."""
    manifest = json.loads((carry / MANIFEST).read_text())
    out = {}
    dest.mkdir(parents=True, exist_ok=True)
    for entry in manifest["files"]:
        target = dest / entry["name"]
        target.parent.mkdir(parents=True, exist_ok=True)
        whole = hashlib.sha256()
        with open(target, "wb") as f:
            for p in entry["parts"]:
                path = carry / p["file"]
                if not path.is_file():
                    raise SystemExit(f"missing part {p['file']} (carry every part listed in {MANIFEST})")
                data = path.read_bytes()
                if hashlib.sha256(data).hexdigest() != p["sha256"]:
                    raise SystemExit(f"part {p['file']} is corrupt (sha256 mismatch)")
                whole.update(data)
                f.write(data)
        if whole.hexdigest() != entry["sha256"]:
            raise SystemExit(f"{entry['name']}: sha256 mismatch after reassembly")
        out[entry["name"]] = target
    return out


# ------------------------------------------------------------------------------------- split (here)


def split(recipe_name: str, carry: Path, sets: list[str], wheels: bool, wheel_names: Sequence[str] = CARRIED_WHEELS) -> dict:
    from trainer.base import default_base_path, load_tokenizer
    from trainer.config import recipe
    from trainer.samples import pack_samples
    from trainer.train import Dist, load_data

    cfg = recipe(recipe_name, **_overrides(sets))
    if carry.exists():
        shutil.rmtree(carry)
    carry.mkdir(parents=True)
    stage = carry / ".stage"
    stage.mkdir()
    gguf = default_base_path()
    data = load_data(cfg, load_tokenizer(gguf), Dist())
    (stage / DATA_FILE).write_bytes(pack_samples(data))
    budget = part_budget()
    files = [split_file(gguf, carry, gguf.name, budget), split_file(stage / DATA_FILE, carry, DATA_FILE, budget)]
    if wheels:
        wdir = stage / WHEELS
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wdir),
                               *sorted(set(wheel_names))], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"warning: pip download failed, no wheels travel:\n{proc.stderr[-2000:]}")
        for w in sorted(wdir.glob("*.whl")) if wdir.is_dir() else []:
            files.append(split_file(w, carry, f"{WHEELS}/{w.name}".replace("/", "__"), budget))
            files[-1]["name"] = f"{WHEELS}/{w.name}"
    shutil.rmtree(stage)
    manifest = {"recipe": recipe_name, "overrides": sets, "base": gguf.name, "data": DATA_FILE,
                "part_bytes": budget, "call_bytes": CALL_BYTES, "tree_bytes": tree_bytes(), "files": files,
                "samples": {c["name"]: c["train_samples"] for c in data[2]}}
    manifest["calls"] = call_plan(files, budget)
    manifest["calls"][-1].append(MANIFEST)  # a few KiB: rides with the last call
    (carry / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    parts = sorted(p for p in carry.iterdir() if p.name != MANIFEST)
    print(f"{len(parts)} parts in {carry} ({sum(p.stat().st_size for p in parts) / 2**20:.0f} MiB) in "
          f"{len(manifest['calls'])} calls of <= {budget / 2**20:.0f} MiB beside a {manifest['tree_bytes'] / 2**20:.1f} MiB "
          f"working tree; call k carries {carry}/<each file of calls[k]> and copies it to one folder there, then "
          f"`scripts/gpu_bundle.sh run <folder>`")
    for k, call in enumerate(manifest["calls"]):
        print(f"  call {k}: {' '.join(call)}")
    return manifest


# ------------------------------------------------------------------------------------- run (there)


def install_missing(wheel_dir: Path) -> list[str]:
    """pip install (no index, no deps) the carried wheels of the needed packages that do not import here;
    returns the distributions that were missing."""
    missing = [dist for mod, dist in NEEDED.items() if not _importable(mod)]
    wheels = [str(w) for w in (wheel_dir.glob("*.whl") if wheel_dir.is_dir() else [])
              if any(w.name.lower().startswith(d.lower().replace("-", "_") + "-") for d in missing)]
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "-q", *wheels], check=True)
        importlib.invalidate_caches()
    return missing


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def run(carry: Path, out: Path, budget: float, work: Path, sets: list[str], steps: int | None,
        mtlora_budget: float = 0.0, oppu: Sequence[str] = ()) -> dict:
    t0 = time.time()
    manifest = json.loads((carry / MANIFEST).read_text())
    work.mkdir(parents=True, exist_ok=True)
    files = join_files(carry, work / "files")
    installed = install_missing(work / "files" / WHEELS)
    models = work / "models"
    models.mkdir(exist_ok=True)
    gguf = models / manifest["base"]
    os.replace(files[manifest["base"]], gguf)
    # The app's paths, pointed at this work folder: the base is found "prepared", caches land here.
    os.environ["P2P_MODELS"] = str(models)
    os.environ.setdefault("P2P_HOME", str(work / "home"))
    os.environ.setdefault("P2P_CACHE", str(work / "cache"))
    import torch

    from trainer.samples import unpack_samples

    data_file = work / "samples.pkl"
    with open(data_file, "wb") as f:
        pickle.dump(unpack_samples(files[manifest["data"]].read_bytes()), f, protocol=pickle.HIGHEST_PROTOCOL)

    from trainer.base import load_base
    from trainer.config import recipe
    from trainer.export import export_bundle, load_checkpoint
    from trainer.train import result_checkpoint, train

    cuda = torch.cuda.is_available()
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    base = load_base(gguf)
    prep_s = time.time() - t0
    overrides = _overrides(manifest.get("overrides", []) + sets)
    overrides.setdefault("bf16", True)
    if cuda:  # one padded batch per micro-batch: a kernel launch costs more than padding on a GPU
        overrides.setdefault("bucket", False)
        overrides.setdefault("time_schedule", True)  # the budget, not a step count, ends the run
    if steps:
        overrides["steps"] = steps
    cfg = recipe(manifest["recipe"], out_dir=str(work / "run"), samples_file=str(data_file),
                 max_wall_s=float(budget), **overrides)
    summary = train(cfg, resume=False, base=base)
    net, ckpt = load_checkpoint(result_checkpoint(cfg.out_dir))
    meta = ckpt["export_meta"]
    meta["training"]["device"] = torch.cuda.get_device_name() if cuda else "cpu"
    meta["training"]["budget_s"] = budget
    out.mkdir(parents=True, exist_ok=True)
    bundle = export_bundle(net, out / "bundle", tasks=meta["tasks"], training=meta["training"],
                           evaluation=meta.get("evaluation"), feature_names=meta["feature_names"])
    shutil.copy(Path(cfg.out_dir) / "metrics.jsonl", out / "metrics.jsonl")
    report = {"steps": summary["steps"], "finished": summary["finished"], "stopped": summary.get("stopped"),
              "selected": summary.get("selected"),
              "samples": summary["steps"] * cfg.batch_size, "last": summary["last"], "device": meta["training"]["device"],
              "prep_s": round(prep_s, 1), "total_s": round(time.time() - t0, 1), "installed": installed,
              "bundle": str(bundle), "eval": summary.get("eval", {})}
    (out / "summary.json").write_text(json.dumps(report, indent=1) + "\n")  # a later stage may not finish
    if mtlora_budget > 0:  # the MT-LoRA baseline: one shared LoRA, same samples, loss and loop
        report["mtlora"] = train_mtlora(manifest["recipe"], overrides, data_file, work / "mtlora", mtlora_budget,
                                        base, out / "mt-lora.gguf")
        report["total_s"] = round(time.time() - t0, 1)
        (out / "summary.json").write_text(json.dumps(report, indent=1) + "\n")
    for spec in oppu:  # NAME:TASK:FILE -> OUT/oppu-NAME.tar, one adapter per user of FILE
        name, task, path = spec.split(":", 2)
        report.setdefault("oppu", {})[name] = train_oppu_users(task, Path(path), base, out / f"oppu-{name}.tar")
        (out / "summary.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "summary.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "eval"}))
    return report


def train_oppu_users(task: str, users_file: Path, base, dest: Path) -> dict:
    """OPPU for every user of `users_file` (each user's items = what the evaluation trains on), the
    adapters (f16 GGUF, named as the evaluation looks them up) in one tar for the evaluation's --oppu-dir."""
    import tarfile

    from p2p_local.adapter import write_adapter
    from p2p_local.data.format import builtin_card, read_users_jsonl
    from trainer.baselines import OPPUConfig, train_oppu
    from trainer.export import base_info

    card, users = builtin_card(task), read_users_jsonl(users_file)
    model, tok = base
    info, _ = base_info()
    folder = Path(tempfile.mkdtemp(prefix="oppu-"))  # not under OUT: only the tar travels back
    stats, t0 = {}, time.time()
    cfg = OPPUConfig(max_items=0)  # the file holds exactly the items to train on
    for u in users:
        tensors, st = train_oppu(card, u.items, model, tok, cfg)
        write_adapter(folder / f"{_safe_name(u.user_id)}.gguf", tensors, alpha=cfg.scale * cfg.rank, base=info,
                      dtype="f16", generator="p2p-local oppu")
        stats[u.user_id] = st
    with tarfile.open(dest, "w") as tar:
        for f in sorted(folder.glob("*.gguf")):
            tar.add(f, arcname=f.name)
    return {"users": len(users), "seconds": round(time.time() - t0, 1), "per_user": stats}


def _safe_name(user_id: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]", "_", user_id)[:100]  # p2p_lab.eval.methods.safe_name's rule


def train_mtlora(recipe_name: str, overrides: dict, data_file: Path, run_dir: Path, budget: float, base,
                 dest: Path) -> dict:
    """Train the MT-LoRA baseline for `budget` seconds and write its GGUF adapter to `dest`."""
    import torch

    from trainer.baselines import write_gguf
    from trainer.config import recipe
    from trainer.lora import SharedLoRA
    from trainer.train import result_checkpoint, train

    cfg = recipe(recipe_name, **{**overrides, "method": "mtlora", "out_dir": str(run_dir),
                                 "samples_file": str(data_file), "max_wall_s": float(budget)})
    summary = train(cfg, resume=False, base=base)
    ck = torch.load(result_checkpoint(cfg.out_dir), map_location="cpu", weights_only=False)
    model = SharedLoRA(cfg.hyper)
    model.load_state_dict(ck["model"])
    write_gguf(dest, model.tensors(), cfg.hyper.scale, cfg.hyper.rank, "p2p-local mt-lora")
    shutil.copy(run_dir / "metrics.jsonl", dest.with_name("mtlora-metrics.jsonl"))
    return {"steps": summary["steps"], "selected": summary.get("selected"), "last": summary["last"],
            "eval": summary.get("eval", {})}


def oppu_users_file(task: str, split: str, users: int, queries: int, oppu_users: int, max_items: int,
                    dest: Path) -> list[str]:
    """The OPPU training data of an evaluation run (`p2p eval --task T --split S --users N --queries Q
    --oppu-users K --oppu-max-items M`): its first K users by id, each with the items before their first
    query (the latest M), written as users JSONL for `run --oppu`. Returns the user ids."""
    from p2p_lab.eval.runner import EvalConfig, build_queries, load
    from p2p_local.data.format import User, write_users_jsonl

    loaded = load(EvalConfig(task=task, split=split, users=users, queries=queries))
    qs = build_queries(loaded.users, queries)
    chosen = [u for u in loaded.users if qs[u.user_id]][:oppu_users]
    rows = []
    for u in chosen:
        history = qs[u.user_id][0].history
        rows.append(User(u.user_id, list(history[-max_items:] if max_items else history)))
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_users_jsonl(dest, rows)
    return [u.user_id for u in rows]


def write_report(run_dir: Path, command: str) -> Path:
    """A run's summary.json + metrics.jsonl -> README.md (throughput, the validation table, the selected
    step) and val-loss.png (true vs shuffled validation loss per task against samples seen)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    evals = [e for e in evals if not e.get("final")]  # the final line re-evaluates the selected weights
    batch = summary["samples"] // max(1, summary["steps"])
    sel = (summary.get("selected") or {}).get("step", summary["steps"])
    tasks = sorted(evals[0]["eval"]) if evals else []
    lines = [f"# GPU training run ({summary['device']})", "",
             f"Command: `{command}`", "",
             f"- {summary['steps']:,} steps of {batch} samples ({summary['samples']:,} samples) in "
             f"{summary['last']['elapsed']:.0f} s of training; {summary['last']['samples_per_s']:,.0f} samples/s at the end; "
             f"preparation (reassembly, install, de-quantizing the base) {summary['prep_s']:.0f} s.",
             f"- Selected: step {sel} by the validation loss summed over tasks"
             + (f" ({summary['selected']['val_score']:.3f} against {summary['selected']['last_val_score']:.3f} at the last step)."
                if summary.get("selected") else " (the last step)."), "",
             "Validation loss (nats/token; ratings: the label token) with the true profile / a shuffled one (another "
             "validation user's), and the gap's 95% CI over users:", "",
             "| step | samples | " + " | ".join(tasks) + " |", "| --- | --- | " + " | ".join("---" for _ in tasks) + " |"]
    for e in evals:
        cells = []
        for t in tasks:
            r = e["eval"][t]
            lo, hi = r.get("gap_loss_ci95", [float("nan")] * 2)
            cells.append(f"{r['loss_true']:.3f} / {r['loss_shuffled']:.3f} [{lo:+.2f}, {hi:+.2f}]")
        mark = " **(selected)**" if e["step"] == sel else ""
        lines.append(f"| {e['step']}{mark} | {e['step'] * batch:,} | " + " | ".join(cells) + " |")
    if evals:
        base = {t: evals[0]["eval"][t].get("loss_base") for t in tasks}
        lines += ["", "Base model (no adapter): " + ", ".join(f"{t} {v:.3f}" for t, v in base.items() if v is not None) + "."]
    mt = summary.get("mtlora")
    if mt:
        lines += ["", f"MT-LoRA (one shared LoRA, same samples and loop, {mt['steps']} steps of {batch}): "
                  + ", ".join(f"{t} {r['loss_true']:.3f}" for t, r in sorted(mt["eval"].items())) + "."]
    for name, o in (summary.get("oppu") or {}).items():
        lines += [f"OPPU ({name}): {o['users']} users trained in {o['seconds']:.0f} s."]
    (run_dir / "README.md").write_text("\n".join(lines) + "\n")
    if not _importable("matplotlib"):
        return run_dir / "README.md"
    from p2p_lab.plots import pyplot, save

    with pyplot(run_dir) as plt:
        fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.2), squeeze=False)
        x = [e["step"] * batch / 1000 for e in evals]
        for ax, t in zip(axes[0], tasks, strict=True):
            ax.plot(x, [e["eval"][t]["loss_true"] for e in evals], "o-", label="true profile")
            ax.plot(x, [e["eval"][t]["loss_shuffled"] for e in evals], "s--", label="shuffled profile")
            ax.axvline(sel * batch / 1000, color="grey", lw=1, ls=":")
            ax.set_title(t, fontsize=9)
            ax.set_xlabel("thousand samples seen")
        axes[0][0].set_ylabel("validation loss")
        axes[0][0].legend(fontsize=8)
        save(fig, run_dir / "val-loss.png")
    return run_dir / "README.md"


def _overrides(sets: list[str]) -> dict:
    from trainer.train import parse_value

    out: dict = {"hyper": {}}
    for kv in sets:
        k, _, v = kv.partition("=")
        if k.startswith("hyper."):
            out["hyper"][k[6:]] = parse_value(v)
        else:
            out[k] = parse_value(v)
    if not out["hyper"]:
        del out["hyper"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.gpu", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="phase", required=True)
    sp = sub.add_parser("split", help="here: parts of <= 60 MiB + manifest")
    sp.add_argument("--recipe", default="full")
    sp.add_argument("--carry", type=Path, default=Path("runs/gpu-carry"))
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="TrainConfig override (data too)")
    sp.add_argument("--no-wheels", action="store_true", help="carry no wheels (the machine has the packages)")
    sp.add_argument("--wheel", action="append", default=None, metavar="DIST",
                    help=f"a distribution to carry as a wheel (default: {', '.join(CARRIED_WHEELS)})")
    rp = sub.add_parser("run", help="there: reassemble, verify, train for the budget, export")
    rp.add_argument("--carry", type=Path, required=True, help="the folder holding every part and the manifest")
    rp.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-out")))
    rp.add_argument("--budget", type=float, default=float(os.environ.get("BUDGET", "480")),
                    help="training wall-clock seconds (default $BUDGET or 480)")
    rp.add_argument("--work", type=Path, default=Path(os.environ.get("WORK", "/tmp/p2p-gpu")))
    rp.add_argument("--steps", type=int, help="planned steps (the LR schedule's length; the budget may stop earlier)")
    rp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    rp.add_argument("--oppu", action="append", default=[], metavar="NAME:TASK:USERS_JSONL",
                    help="then train OPPU for each user of the file; adapters in OUT/oppu-NAME.tar")
    rp.add_argument("--mtlora-budget", type=float, default=float(os.environ.get("MTLORA_BUDGET", "0")),
                    help="then train the MT-LoRA baseline for this many seconds (0 = no)")
    wp = sub.add_parser("report", help="here: README.md + val-loss.png of a run's summary.json and metrics.jsonl")
    wp.add_argument("run_dir", type=Path)
    wp.add_argument("--command", default="scripts/gpu_bundle.sh run ...", help="the command to name in the report")
    op = sub.add_parser("oppu-data", help="here: an evaluation run's OPPU training data, for run --oppu")
    op.add_argument("--task", required=True)
    op.add_argument("--split", default="test")
    op.add_argument("--users", type=int, required=True)
    op.add_argument("--queries", type=int, required=True)
    op.add_argument("--oppu-users", type=int, required=True)
    op.add_argument("--max-items", type=int, default=64)
    op.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.phase == "report":
        print(write_report(args.run_dir, args.command))
        return 0
    if args.phase == "oppu-data":
        ids = oppu_users_file(args.task, args.split, args.users, args.queries, args.oppu_users, args.max_items, args.out)
        print(f"{len(ids)} users -> {args.out}")
        return 0
    if args.phase == "split":
        split(args.recipe, args.carry, args.set, not args.no_wheels, args.wheel or CARRIED_WHEELS)
    else:
        run(args.carry, args.out, args.budget, args.work, args.set, args.steps, args.mtlora_budget, args.oppu)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
