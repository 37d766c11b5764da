"""P2P trained with two different profile encoders, side by side: reports/encoders.{json,md,png}.

    python -m trainer.compare_encoders                 # `make encoders`; resumable (each variant checkpoints)
    python -m trainer.compare_encoders --steps 60      # quicker

Encoders: MiniLM (all-MiniLM-L6-v2, the device's ONNX graph) and the base model's own mean-pooled hidden
states through llama.cpp (`gemma-mean`, p2p_local.encoder.GemmaEncoder). Each is trained twice with the
same data, seed and steps: on the profile text alone (what the encoder contributes) and with the
structured feature vector beside it (the shipped design). Scored on held-out validation users by the
trainer's evaluation (PyTorch, the de-quantized base the device's GGUF comes from): target loss with
the true profile vs a shuffled one (another user's), and the label distribution's expected-value MAE.
Small on purpose (one rating task, a subset of users): the Gemma encoder costs ~0.5 s per profile on
2 cores, ~30x MiniLM.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from trainer.config import recipe
from trainer.train import Dist, load_data, train

TASK = "movielens-rating"
VARIANTS = {  # name -> overrides
    "minilm, text only": {"encoder": "minilm", "hyper": {"use_features": False}},
    "gemma-mean, text only": {"encoder": "gemma-mean", "hyper": {"use_features": False}},
    "minilm + features": {"encoder": "minilm", "hyper": {}},
    "gemma-mean + features": {"encoder": "gemma-mean", "hyper": {}},
}


def run(steps: int, out: Path, runs: Path, threads: int, variants: list[str] | None = None) -> dict:
    from trainer.base import load_base

    base = load_base()
    results = {}
    for name, ov in VARIANTS.items():
        if variants and name not in variants:
            continue
        slug = name.replace(", ", "-").replace(" + ", "-").replace(" ", "-")
        cfg = recipe("short", tasks=[TASK], steps=steps, max_users_train=100, max_items_per_user=3,
                     eval_users=40, eval_items_per_user=3, ckpt_every=20, threads=threads,
                     out_dir=str(runs / slug), encoder=ov["encoder"], hyper=ov["hyper"])
        t0 = time.time()
        print(f"== {name}: {steps} steps", flush=True)
        summary = train(cfg, base=base)
        ev = summary.get("eval") or _final_eval(Path(cfg.out_dir))
        _, val_sets, _ = load_data(cfg, base[1], Dist())  # cached: how far apart the encoder puts profiles
        results[name] = {"encoder": ov["encoder"], "features": ov["hyper"].get("use_features", True),
                         "steps": summary["steps"], "seconds": round(time.time() - t0, 1),
                         "val_mean_pairwise_cosine": mean_pairwise_cosine(val_sets[0].embeddings), **ev[TASK]}
    command = f"python -m trainer.compare_encoders --steps {steps}" + (
        " --variants '" + ";".join(variants) + "'" if variants else "")
    rep = {"task": TASK, "command": command,
           "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cpus",
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "variants": results}
    out.mkdir(parents=True, exist_ok=True)
    (out / "encoders.json").write_text(json.dumps(rep, indent=2) + "\n")
    (out / "encoders.md").write_text(to_markdown(rep))
    chart(rep, out / "encoders.png")
    return rep


def mean_pairwise_cosine(emb: np.ndarray) -> float:
    """Mean cosine between distinct profiles' embeddings: near 1 = the encoder maps every profile alike."""
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    c = e @ e.T
    iu = np.triu_indices(len(e), 1)
    return round(float(c[iu].mean()), 4)


def _final_eval(run_dir: Path) -> dict:
    """A finished run's final evaluation, from its metrics log (a re-run of a finished variant)."""
    for line in reversed((run_dir / "metrics.jsonl").read_text().splitlines()):
        row = json.loads(line)
        if row.get("final"):
            return row["eval"]
    raise RuntimeError(f"{run_dir} has no final evaluation")


def to_markdown(rep: dict) -> str:
    lines = [f"# Profile encoders compared: {rep['task']}", "",
             f"`{rep['command']}` on {rep['machine']}, {rep['created']}. Validation users, trainer-side "
             "evaluation (see the module docstring). Gap = shuffled-profile loss - true-profile loss "
             "(95% CI over users): > 0 means the hypernetwork uses this user's profile.", "",
             "| variant | steps | profiles' mean cosine | loss true | loss shuffled | gap [95% CI] | MAE(E) true | "
             "MAE(E) shuffled | MAE(E) no adapter |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rep["variants"].items():
        lo, hi = r["gap_loss_ci95"]
        lines.append(f"| {name} | {r['steps']} | {r['val_mean_pairwise_cosine']:.3f} | {r['loss_true']:.4f} | {r['loss_shuffled']:.4f} | "
                     f"{r['gap_loss']:.4f} [{lo:.4f}, {hi:.4f}] | {r['mae_expected_true']:.3f} | "
                     f"{r['mae_expected_shuffled']:.3f} | {r['mae_expected_base']:.3f} |")
    return "\n".join(lines) + "\n"


def chart(rep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    ax.set_title(f"{rep['task']}: what each profile encoder gives the hypernetwork", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.compare_encoders", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--out", type=Path, default=Path("reports"))
    ap.add_argument("--runs", type=Path, default=Path("runs") / "encoders")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--variants", help=f"';'-separated subset of: {'; '.join(VARIANTS)}")
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(";")] if args.variants else None
    unknown = [v for v in variants or [] if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    rep = run(args.steps, args.out, args.runs, args.threads, variants)
    print(to_markdown(rep))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
