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
import time
from pathlib import Path

PART_BYTES = 60 * 2**20
MANIFEST = "MANIFEST.json"
DATA_FILE = "samples.pkl"
WHEELS = "wheels"
# Imported by trainer.train / trainer.export beyond torch, transformers (and their numpy, safetensors,
# tokenizers, tqdm, pyyaml): module name -> distribution.
NEEDED = {"gguf": "gguf", "onnx": "onnx", "ml_dtypes": "ml_dtypes", "google.protobuf": "protobuf",
          "platformdirs": "platformdirs", "yaml": "pyyaml", "requests": "requests"}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def split_file(src: Path, dest: Path, name: str, part_bytes: int = PART_BYTES) -> dict:
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


def split(recipe_name: str, carry: Path, sets: list[str], wheels: bool) -> dict:
    from trainer.base import default_base_path, load_base
    from trainer.config import recipe
    from trainer.train import Dist, load_data

    cfg = recipe(recipe_name, **_overrides(sets))
    if carry.exists():
        shutil.rmtree(carry)
    carry.mkdir(parents=True)
    stage = carry / ".stage"
    stage.mkdir()
    gguf = default_base_path()
    _, tok = load_base(gguf)
    data = load_data(cfg, tok, Dist())
    with open(stage / DATA_FILE, "wb") as f:
        pickle.dump(data, f)
    files = [split_file(gguf, carry, gguf.name), split_file(stage / DATA_FILE, carry, DATA_FILE)]
    if wheels:
        wdir = stage / WHEELS
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wdir),
                               *sorted(set(NEEDED.values()))], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"warning: pip download failed, no wheels travel:\n{proc.stderr[-2000:]}")
        for w in sorted(wdir.glob("*.whl")) if wdir.is_dir() else []:
            files.append(split_file(w, carry, f"{WHEELS}/{w.name}".replace("/", "__")))
            files[-1]["name"] = f"{WHEELS}/{w.name}"
    shutil.rmtree(stage)
    manifest = {"recipe": recipe_name, "overrides": sets, "base": gguf.name, "data": DATA_FILE,
                "part_bytes": PART_BYTES, "files": files,
                "samples": {c["name"]: c["train_samples"] for c in data[2]}}
    (carry / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    parts = sorted(p for p in carry.iterdir() if p.name != MANIFEST)
    print(f"{len(parts)} parts in {carry} ({sum(p.stat().st_size for p in parts) / 2**20:.0f} MiB), "
          f"each <= {PART_BYTES / 2**20:.0f} MiB; carry each part (and {MANIFEST}) to one folder there, then "
          f"`scripts/gpu_bundle.sh run <folder>`")
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


def run(carry: Path, out: Path, budget: float, work: Path, sets: list[str], steps: int | None) -> dict:
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

    from trainer.base import load_base
    from trainer.config import recipe
    from trainer.export import export_bundle, load_checkpoint
    from trainer.train import train

    cuda = torch.cuda.is_available()
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    base = load_base(gguf)
    prep_s = time.time() - t0
    overrides = _overrides(manifest.get("overrides", []) + sets)
    overrides.setdefault("bf16", True)
    if cuda:
        overrides.setdefault("bucket_overhead", 256)  # a kernel launch costs more than padding on a GPU
    if steps:
        overrides["steps"] = steps
    cfg = recipe(manifest["recipe"], out_dir=str(work / "run"), samples_file=str(files[manifest["data"]]),
                 max_wall_s=float(budget), **overrides)
    summary = train(cfg, resume=False, base=base)
    net, ckpt = load_checkpoint(Path(cfg.out_dir) / "last.pt")
    meta = ckpt["export_meta"]
    meta["training"]["device"] = torch.cuda.get_device_name() if cuda else "cpu"
    meta["training"]["budget_s"] = budget
    out.mkdir(parents=True, exist_ok=True)
    bundle = export_bundle(net, out / "bundle", tasks=meta["tasks"], training=meta["training"],
                           evaluation=meta.get("evaluation"), feature_names=meta["feature_names"])
    shutil.copy(Path(cfg.out_dir) / "metrics.jsonl", out / "metrics.jsonl")
    report = {"steps": summary["steps"], "finished": summary["finished"], "stopped": summary.get("stopped"),
              "samples": summary["steps"] * cfg.batch_size, "last": summary["last"], "device": meta["training"]["device"],
              "prep_s": round(prep_s, 1), "total_s": round(time.time() - t0, 1), "installed": installed,
              "bundle": str(bundle), "eval": summary.get("eval", {})}
    (out / "summary.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "eval"}))
    return report


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
    rp = sub.add_parser("run", help="there: reassemble, verify, train for the budget, export")
    rp.add_argument("--carry", type=Path, required=True, help="the folder holding every part and the manifest")
    rp.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-out")))
    rp.add_argument("--budget", type=float, default=float(os.environ.get("BUDGET", "480")),
                    help="training wall-clock seconds (default $BUDGET or 480)")
    rp.add_argument("--work", type=Path, default=Path(os.environ.get("WORK", "/tmp/p2p-gpu")))
    rp.add_argument("--steps", type=int, help="planned steps (the LR schedule's length; the budget may stop earlier)")
    rp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    if args.phase == "split":
        split(args.recipe, args.carry, args.set, not args.no_wheels)
    else:
        run(args.carry, args.out, args.budget, args.work, args.set, args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
