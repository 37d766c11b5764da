"""Variants of P2P training side by side on one task: reports/<set>.{json,md,png}.

    python -m trainer.compare                        # `make encoders`: the profile-encoder comparison
    python -m trainer.compare --set recipes          # `make recipes`: training-recipe changes that might help
    python -m trainer.compare --steps 60             # quicker; resumable (each variant checkpoints)

Set `encoders`: MiniLM (all-MiniLM-L6-v2, the device's ONNX graph) and the base model's own mean-pooled
hidden states through llama.cpp (`gemma-mean`, p2p_lab.gemma_encoder.GemmaEncoder). Each is trained twice
with the same data, seed and steps: on the profile text alone (what the encoder contributes) and with
the structured feature vector beside it (the shipped design).

Set `recipes`: the shipped design (MiniLM + features) against one change at a time, the levers the
evaluation's shortfalls point at (issue 5: training length, learning rate, targets, rank, profile
input): does any of them close the gap to the user-mean reference?

Scored on held-out validation users by the trainer's evaluation (PyTorch, the de-quantized base the
device's GGUF comes from): target loss with the true profile vs a shuffled one (another user's), the
label distribution's MAE (median decoding, as `p2p eval` reports it) and the user-mean reference's MAE
on the same queries. Small on purpose (one rating task, a subset of users): the Gemma encoder costs
~0.5 s per profile on 2 cores, ~30x MiniLM.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
from pathlib import Path

import numpy as np

from p2p_lab.eval.summary import vs_user_mean
from p2p_lab.plots import pyplot, save
from trainer.config import recipe
from trainer.train import Dist, load_data, train

TASK = "movielens-rating"
SHIPPED = {"encoder": "minilm", "hyper": {}}
SETS: dict[str, dict[str, dict]] = {  # set -> variant name -> overrides of the short recipe
    "encoders": {
        "minilm, text only": {"encoder": "minilm", "hyper": {"use_features": False}},
        "gemma-mean, text only": {"encoder": "gemma-mean", "hyper": {"use_features": False}},
        "minilm + features": SHIPPED,
        "gemma-mean + features": {"encoder": "gemma-mean", "hyper": {}},
    },
    "recipes": {
        "reference": SHIPPED,  # = encoders' "minilm + features"
        "lr x4 (2e-3)": {**SHIPPED, "lr": 2e-3},
        "features only": {**SHIPPED, "hyper": {"use_embedding": False}},
        # The comparison's default data is 100 users x 3 queries (300 samples; 100 steps = 5 epochs).
        # (Training length is measured on the shipped recipe itself: runs/full continued to 720 steps.)
        "all training users": {**SHIPPED, "max_users_train": 0, "max_items_per_user": 8},
        "all training users, features only": {**SHIPPED, "max_users_train": 0, "max_items_per_user": 8,
                                              "hyper": {"use_embedding": False}},
        "+ attn_output, ffn_down": {**SHIPPED, "hyper": {"targets": ["attn_q", "attn_v", "attn_output", "ffn_down"]}},
        "rank 16": {**SHIPPED, "hyper": {"rank": 16}},
    },
}
TITLES = {"encoders": "Profile encoders compared", "recipes": "Training recipes compared"}


def slug(name: str) -> str:
    """A variant's run folder: "minilm + features" -> minilm-features."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run(which: str, steps: int, out: Path, runs: Path, threads: int, variants: list[str] | None = None) -> dict:
    from trainer.base import load_base

    base = load_base()
    results: dict[str, dict] = {}
    command = f"python -m trainer.compare --set {which} --steps {steps}" + (
        " --variants '" + ";".join(variants) + "'" if variants else "")
    for name, ov in SETS[which].items():
        if variants and name not in variants:
            continue
        kw = dict(tasks=[TASK], max_users_train=100, max_items_per_user=3, eval_users=40, eval_items_per_user=3,
                  ckpt_every=20, threads=threads, out_dir=str(runs / which / slug(name)))
        cfg = recipe("short", **{**kw, **ov, "steps": steps})
        print(f"== {name}: {steps} steps", flush=True)
        summary = train(cfg, base=base)  # a finished run is only re-evaluated
        ev = summary["eval"]
        _, val_sets, _ = load_data(cfg, base[1], Dist())  # cached: how far apart the encoder puts profiles
        results[name] = {"encoder": cfg.encoder, "features": cfg.hyper.use_features, "steps": summary["steps"],
                         "seconds": _train_seconds(Path(cfg.out_dir)),
                         "val_mean_pairwise_cosine": mean_pairwise_cosine(val_sets[0].embeddings), **ev[TASK]}
        write(which, command, results, out)  # after every variant: an interrupted comparison keeps its results
    return write(which, command, results, out)


def write(which: str, command: str, results: dict, out: Path) -> dict:
    rep = {"set": which, "task": TASK, "command": command,
           "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cpus",
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "variants": results}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{which}.json").write_text(json.dumps(rep, indent=2) + "\n")
    (out / f"{which}.md").write_text(to_markdown(rep))
    chart(rep, out / f"{which}.png")
    return rep


def mean_pairwise_cosine(emb: np.ndarray) -> float:
    """Mean cosine between distinct profiles' embeddings: near 1 = the encoder maps every profile alike."""
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    c = e @ e.T
    iu = np.triu_indices(len(e), 1)
    return round(float(c[iu].mean()), 4)


def _train_seconds(run_dir: Path) -> float:
    """The run's training wall time (its log's last `elapsed`), also when this call only re-evaluated it."""
    for line in reversed((run_dir / "metrics.jsonl").read_text().splitlines()):
        row = json.loads(line)
        if "elapsed" in row:
            return row["elapsed"]
    raise RuntimeError(f"{run_dir}/metrics.jsonl logs no training step")


def to_markdown(rep: dict) -> str:
    lines = [f"# {TITLES[rep['set']]}: {rep['task']}", "",
             f"`{rep['command']}` on {rep['machine']}, {rep['created']}. Validation users, trainer-side "
             "evaluation (see trainer/compare.py). Gap = shuffled-profile loss - true-profile loss "
             "(95% CI over users): > 0 means the hypernetwork uses this user's profile. MAE decodes the label "
             "distribution's median (as `p2p eval`); user-mean is that reference's MAE on the same queries.", "",
             "| variant | steps | s | profiles' mean cosine | loss true | loss shuffled | gap [95% CI] | MAE true | "
             "MAE shuffled | MAE no adapter | MAE user-mean | MAE true - user-mean [95% CI] |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    na = "-"
    for name, r in rep["variants"].items():
        lo, hi = r["gap_loss_ci95"]
        mae = [f"{r[k]:.3f}" if k in r else na for k in
               ("mae_median_true", "mae_median_shuffled", "mae_median_base", "mae_user_median")]
        mae.append(vs_user_mean(r))
        lines.append(f"| {name} | {r['steps']} | {r['seconds']:.0f} | {r['val_mean_pairwise_cosine']:.3f} | "
                     f"{r['loss_true']:.4f} | {r['loss_shuffled']:.4f} | {r['gap_loss']:.4f} [{lo:.4f}, {hi:.4f}] | "
                     + " | ".join(mae) + " |")
    return "\n".join(lines) + "\n"


def chart(rep: dict, path: Path) -> None:
    with pyplot(path.parent) as plt:
        names = list(rep["variants"])
        gaps = [rep["variants"][n]["gap_loss"] for n in names]
        lo = [g - rep["variants"][n]["gap_loss_ci95"][0] for n, g in zip(names, gaps, strict=True)]
        hi = [rep["variants"][n]["gap_loss_ci95"][1] - g for n, g in zip(names, gaps, strict=True)]
        fig, ax = plt.subplots(figsize=(7, 3))
        y = list(range(len(names)))[::-1]
        ax.barh(y, gaps, xerr=[lo, hi], color="#2c7fb8", capsize=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(y, names)
        ax.set_xlabel("shuffled - true profile loss (nats; > 0: the profile is used)")
        ax.set_title(f"{rep['task']}: {TITLES[rep['set']].lower()} (what the profile gives the hypernetwork)",
                     fontsize=10)
        save(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.compare", description=__doc__.splitlines()[0])
    ap.add_argument("--set", dest="which", choices=list(SETS), default="encoders")
    ap.add_argument("--steps", type=int, default=100, help="per variant")
    ap.add_argument("--out", type=Path, default=Path("reports"))
    ap.add_argument("--runs", type=Path, default=Path("runs") / "compare")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--variants", help="';'-separated subset of the set's variant names")
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(";")] if args.variants else None
    unknown = [v for v in variants or [] if v not in SETS[args.which]]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; known in {args.which}: {list(SETS[args.which])}")
    rep = run(args.which, args.steps, args.out, args.runs, args.threads, variants)
    print(to_markdown(rep))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
