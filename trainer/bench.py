"""Training throughput: today's training step against the step as it was at commit 6d4f086, side by side.

    python -m trainer.bench                       # `make bench-train`: reports/train-bench.{json,md,png}
    python -m trainer.bench --pairs 2 --no-quality   # quicker

The old step is the old code itself: trainer/{train,config,lora,hypernet,base}.py are read from git at
LEGACY_COMMIT into a temporary package (`legacy_trainer`) and its own collate / target_logits / loss run
the old loop body; the sample sets are the same for both. Old and new steps alternate on the same
batches (old, new, old, new, ...), so whatever else loads the machine hits both alike; the figure that
matters is the RATIO of their times. Every candidate is measured against the shipped recipe's old step
(`full`: all tasks mixed, 16 samples a step, prompts <= 64 and targets <= 24 tokens, q/v in all 18 layers).

`--quality` adds equal-samples training runs (old code, new code, and the new code adapting only the
upper 12 / 9 / 6 layers): the same batches, then train()'s own final validation (true vs shuffled profile).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from p2p_lab.plots import pyplot, save
from p2p_local.files import atomic_write
from p2p_local.paths import repo_root
from trainer.config import TrainConfig, recipe
from trainer.samples import SampleSet, truncate_prompt
from trainer.train import Dist, LowerCache, TaskMixture, build_hypernet, load_data, lr_lambda, optimizer_step

LEGACY_COMMIT = "6d4f086"
LEGACY_FILES = ("train.py", "config.py", "lora.py", "hypernet.py", "base.py")
REFERENCE_SAMPLES = 240_000  # the method's reference run (issue 11)
SHIPPED_SAMPLES = 5_760  # the shipped bundle: 360 steps x 16
# The app's names the legacy files import that have moved since LEGACY_COMMIT (old line -> today's line).
LEGACY_RENAMES = {
    "from p2p_local.peft_export import gguf_to_hf_modules, hf_module_name, split_tensor_name":
        "from p2p_local.peft_export import gguf_to_hf_modules, hf_module_name\n"
        "from p2p_local.adapter import parse_tensor_name as split_tensor_name",
}


def legacy_trainer(commit: str = LEGACY_COMMIT, dest: Path | None = None):
    """The trainer as it was at `commit`, importable as `legacy_trainer.*` (samples stay today's)."""
    dest = Path(dest or tempfile.mkdtemp(prefix="legacy-trainer-"))
    pkg = dest / "legacy_trainer"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    for name in LEGACY_FILES:
        src = subprocess.run(["git", "show", f"{commit}:trainer/{name}"], cwd=repo_root(), check=True,
                             capture_output=True, text=True).stdout
        src = re.sub(r"\btrainer\.(train|config|lora|hypernet|base)\b", r"legacy_trainer.\1", src)
        for old, new in LEGACY_RENAMES.items():
            src = src.replace(old, new)
        (pkg / name).write_text(src)
    sys.path.insert(0, str(dest))
    importlib.invalidate_caches()
    return importlib.import_module("legacy_trainer.train")


# ------------------------------------------------------------------------------------- the two steps


@dataclass
class Arm:
    """One side of a comparison: a model being trained, its optimiser, and how one step runs."""

    name: str
    step: Callable[[list[tuple[int, int]]], None]
    close: Callable[[], None]
    threads: int = 0
    net: torch.nn.Module | None = None

    def run(self, picks: list[tuple[int, int]]) -> float:
        saved = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        t0 = time.perf_counter()
        self.step(picks)
        dt = time.perf_counter() - t0
        torch.set_num_threads(saved)
        return dt


def old_arm(L, model, sets: Sequence[SampleSet], cfg=None) -> Arm:
    """The shipped recipe's step as the old code ran it (world 1: its loop body, verbatim in substance)."""
    cfg = cfg or L.recipe("full")
    net = L.build_hypernet(cfg, model, list(sets))
    lora = L.FunctionalLoRA(model, cfg.hyper.targets, cfg.hyper.layers, cfg.hyper.scale)
    opt = torch.optim.AdamW(net.param_groups(cfg.lr, cfg.weight_decay, cfg.head_lr_mult), lr=cfg.lr, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, L.lr_lambda(cfg))
    net.train()

    def step(picks):
        per_rank = cfg.batch_size
        micro = min(cfg.micro_batch, per_rank)
        opt.zero_grad(set_to_none=True)
        for k in range(math.ceil(per_rank / micro)):
            mb = picks[k * micro:(k + 1) * micro]
            batch = L.collate(sets, mb)
            adapters = net(batch.embedding, batch.features)
            with lora.applied(adapters):
                logits = L.target_logits(model, batch)
            loss = L.per_sample_loss(logits, batch, cfg.label_smoothing).mean()
            if cfg.l2_ab:
                loss = loss + cfg.l2_ab * L.l2_penalty(adapters)
            (loss * len(mb) / per_rank).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()

    return Arm("old", step, lora.remove, net=net)


def new_arm(name: str, cfg: TrainConfig, model, sets: Sequence[SampleSet], threads: int = 0) -> tuple[Arm, LowerCache | None]:
    from trainer.lora import FunctionalLoRA

    net = build_hypernet(cfg, model, list(sets))
    lora = FunctionalLoRA(model, cfg.hyper.targets, cfg.hyper.layers, cfg.hyper.scale)
    opt = torch.optim.AdamW(net.param_groups(cfg.lr, cfg.weight_decay, cfg.head_lr_mult), lr=cfg.lr, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    start = min(cfg.hyper.layers)
    cache = LowerCache(model, start, torch.device("cpu"), cfg.cache_hidden_gb * 2**30) if cfg.cache_hidden and start > 0 else None
    net.train()
    d = Dist()

    def step(picks):
        optimizer_step(cfg, net, net, lora, model, sets, picks, opt, sched, d, micro=min(cfg.micro_batch, len(picks)),
                       cache=cache)

    return Arm(name, step, lora.remove, threads, net=net), cache


def shorter(sets: Sequence[SampleSet], max_prompt: int) -> list[SampleSet]:
    """The same samples with prompts cut to `max_prompt` tokens (as samples.truncate_prompt cuts them)."""
    out = []
    for s in sets:
        c = s.subset(range(len(s)))
        c.prompt_ids = [truncate_prompt(p, max_prompt) for p in s.prompt_ids]
        out.append(c)
    return out


# ------------------------------------------------------------------------------------- candidates


def candidates(quick: bool) -> list[dict]:
    """name, what changes, TrainConfig overrides of the shipped recipe, and extras (threads, prompt cut)."""
    up = lambda n: dict(layers=list(range(18 - n, 18)))  # noqa: E731 - the upper n layers adapted
    c = [
        dict(name="buckets", what="length-bucketed sub-batches (no cross-task padding); same samples, same gradient",
             set=dict(bucket=True)),
        dict(name="one-task batches", what="each step's batch is ONE task (buckets too); changes the sampling",
             set=dict(bucket=True), one_task=True),
        dict(name="buckets, 1 thread", what="buckets; torch pinned to 1 thread (the machine is shared)",
             set=dict(bucket=True), threads=1),
        dict(name="buckets, prompts <= 32", what="buckets; prompts cut to 32 tokens (data change)",
             set=dict(bucket=True), prompt=32),
        dict(name="buckets, bf16 on CPU", what="buckets; bf16 autocast on the CPU (AVX512-BF16); changes precision",
             set=dict(bucket=True, bf16_cpu=True)),
        dict(name="upper 12 layers, cached", what="buckets; q/v in layers 6-17; frozen layers 0-5 cached per sample",
             set=dict(bucket=True, hyper=up(12))),
        dict(name="upper 9 layers, cached", what="buckets; q/v in layers 9-17; frozen layers 0-8 cached per sample",
             set=dict(bucket=True, hyper=up(9))),
        dict(name="upper 9 layers, no cache", what="buckets; q/v in layers 9-17; frozen layers run every step",
             set=dict(bucket=True, cache_hidden=False, hyper=up(9))),
        dict(name="upper 6 layers, cached", what="buckets; q/v in layers 12-17; frozen layers 0-11 cached per sample",
             set=dict(bucket=True, hyper=up(6))),
    ]
    return [x for x in c if x["name"] in ("buckets", "upper 9 layers, cached", "upper 6 layers, cached")] if quick else c


def task_batches(sets: Sequence[SampleSet], n: int, batch: int, seed: int) -> list[list[list[tuple[int, int]]]]:
    """Per task, n batches of `batch` samples of that task alone."""
    out = []
    for t, s in enumerate(sets):
        perm = np.random.default_rng([seed, t]).permutation(len(s))
        out.append([[(t, int(i)) for i in perm[k * batch:(k + 1) * batch]] for k in range(n)])
    return out


def measure(old: Arm, new: Arm, batches: list[list[tuple[int, int]]], warmup: int = 1,
            cache: LowerCache | None = None, sets=None) -> dict:
    """Interleaved: old, new, old, new ... on the same batches; the first `warmup` pairs are not counted.
    A cache is filled for the measured batches first (steady state; the fill is timed separately)."""
    fill_s, filled = 0.0, 0
    if cache is not None:
        t0 = time.perf_counter()
        for b in batches:
            for t, i in b:
                if (t, i) not in cache.store:
                    cache.hidden(sets, [(t, i)], 1 + len(sets[t].prompt_ids[i]) + len(sets[t].target_ids[i]))
                    filled += 1
        fill_s = time.perf_counter() - t0
    t_old, t_new = [], []
    for k, b in enumerate(batches):
        a = old.run(b)
        n = new.run(b)
        if k >= warmup:
            t_old.append(a)
            t_new.append(n)
    n_samples = sum(len(b) for b in batches[warmup:])
    res = {"pairs": len(t_old), "samples": n_samples, "old_s": [round(x, 3) for x in t_old],
           "new_s": [round(x, 3) for x in t_new],
           "old_sps": round(n_samples / sum(t_old), 3), "new_sps": round(n_samples / sum(t_new), 3),
           "ratio": round(sum(t_old) / sum(t_new), 3),
           "pair_ratios": [round(a / b, 2) for a, b in zip(t_old, t_new, strict=True)]}
    if cache is not None and filled:
        res["cache_fill_s_per_sample"] = round(fill_s / filled, 4)
    return res


def amortised(r: dict, n_train: int) -> dict:
    """With a cache, the first visit of each training sample costs the fill: samples/s over a run of S
    samples = S / (S / new_sps + min(S, n_train) * fill)."""
    if "cache_fill_s_per_sample" not in r:
        return {}
    out = {}
    for label, s in (("shipped_5760", SHIPPED_SAMPLES), ("reference_240k", REFERENCE_SAMPLES)):
        new_t = s / r["new_sps"] + min(s, n_train) * r["cache_fill_s_per_sample"]
        out[label] = {"new_sps": round(s / new_t, 3), "ratio": round(new_t and (s / r["old_sps"]) / new_t, 3)}
    return out


# ------------------------------------------------------------------------------------- equal-samples quality


def quality(L, model, tok, steps: int, eval_users: int, out_root: Path) -> list[dict]:
    """Equal samples (the same `steps` x 16 batches): the old code, the new code, the new code adapting
    only the upper 12 / 9 / 6 layers; train()'s own final validation per task (true and shuffled profile)."""
    from trainer.train import train

    common = dict(steps=steps, eval_users=eval_users, eval_items_per_user=2, ckpt_every=steps, log_every=steps)
    runs = [("old code (18 layers)", None), ("new code (18 layers)", {}),
            ("new, upper 12 layers", {"layers": list(range(6, 18))}),
            ("new, upper 9 layers", {"layers": list(range(9, 18))}),
            ("new, upper 6 layers", {"layers": list(range(12, 18))})]
    rows = []
    for name, hyper in runs:
        out_dir = out_root / re.sub(r"\W+", "-", name).strip("-")
        t0 = time.perf_counter()
        if hyper is None:
            summary = L.train(L.recipe("full", out_dir=str(out_dir), **common), resume=False, base=(model, tok))
        else:
            summary = train(recipe("full", out_dir=str(out_dir), hyper=hyper, **common), resume=False, base=(model, tok))
        wall = time.perf_counter() - t0
        ev = summary["eval"]
        row = {"run": name, "samples": steps * 16, "wall_s": round(wall, 1), "tasks": {}}
        for task, r in ev.items():
            row["tasks"][task] = {k: round(r[k], 4) for k in ("loss_true", "loss_shuffled", "loss_base") if k in r}
            if "mae_median_true" in r:
                row["tasks"][task]["mae_median_true"] = round(r["mae_median_true"], 4)
        row["mean_loss_true"] = round(float(np.mean([r["loss_true"] for r in ev.values()])), 4)
        row["mean_loss_shuffled"] = round(float(np.mean([r["loss_shuffled"] for r in ev.values()])), 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# ------------------------------------------------------------------------------------- report


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cpus, torch {torch.__version__}, {torch.get_num_threads()} torch threads"


def write_markdown(rep: dict, path: Path) -> None:
    lines = [
        "# Training throughput: today's step vs the step at " + rep["old_commit"],
        "",
        f"Command: `{rep['command']}`  ",
        f"Machine: {rep['machine']}; load average {rep['load_before']} before, {rep['load_after']} after "
        "(a shared machine: only the ratios, measured interleaved, are comparable).",
        "",
        "Old = the shipped recipe (`full`: all tasks mixed, 16 samples a step, prompts <= 64 / targets <= 24 "
        "tokens, q/v rank 8 in all 18 layers) as the old code ran it; new = today's `optimizer_step` with the "
        "candidate's settings. Forward + backward + optimiser step, samples per second; ratio = old time / new time "
        f"over the same batches ({rep['pairs']} measured pairs each, after one warm-up pair).",
        "",
        "## Candidates (mixed-task batches, the sampler's real batches)",
        "",
        "| candidate | what changes | old samples/s | new samples/s | ratio | per-pair ratios |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for c in rep["candidates"]:
        r = c["result"]
        lines.append(f"| {c['name']} | {c['what']} | {r['old_sps']:.2f} | {r['new_sps']:.2f} | **{r['ratio']:.2f}x** | "
                     f"{', '.join(f'{x:.2f}' for x in r['pair_ratios'])} |")
    cached = [c for c in rep["candidates"] if c.get("amortised")]
    if cached:
        lines += ["", "Cached candidates above are steady state (every sample's frozen layers already cached). "
                  f"The first visit of each of the {rep['n_train']} training samples pays the fill once:", "",
                  "| candidate | fill s/sample | ratio over 5,760 samples (shipped run) | ratio over 240,000 samples (reference run) |",
                  "| --- | --- | --- | --- |"]
        for c in cached:
            a = c["amortised"]
            lines.append(f"| {c['name']} | {c['result']['cache_fill_s_per_sample']} | {a['shipped_5760']['ratio']:.2f}x | "
                         f"{a['reference_240k']['ratio']:.2f}x |")
    if rep.get("per_task"):
        lines += ["", f"## Per task (batches of one task; new = {rep['per_task_config']})", "",
                  "| task | old samples/s | new samples/s | ratio |", "| --- | --- | --- | --- |"]
        for task, r in rep["per_task"].items():
            lines.append(f"| {task} | {r['old_sps']:.2f} | {r['new_sps']:.2f} | {r['ratio']:.2f}x |")
    if rep.get("quality"):
        tasks = list(rep["quality"][0]["tasks"])
        lines += ["", f"## Validation at equal samples ({rep['quality'][0]['samples']} training samples, the same batches)",
                  "", "train()'s own final evaluation on held-out users: target loss with the true profile / "
                  "another user's (shuffled) profile; lower is better, true < shuffled = personalised.", "",
                  "| run | wall s | mean loss true | mean loss shuffled | " + " | ".join(f"{t} true / shuffled" for t in tasks) + " |",
                  "| --- | --- | --- | --- | " + " | ".join("---" for _ in tasks) + " |"]
        for q in rep["quality"]:
            cells = [f"{q['tasks'][t]['loss_true']:.4f} / {q['tasks'][t]['loss_shuffled']:.4f}" for t in tasks]
            lines.append(f"| {q['run']} | {q['wall_s']} | {q['mean_loss_true']:.4f} | {q['mean_loss_shuffled']:.4f} | "
                         + " | ".join(cells) + " |")
    if rep.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in rep["notes"]]
    atomic_write(path, "\n".join(lines) + "\n", mode=0o644)


def write_png(rep: dict, path: Path) -> None:
    with pyplot(path.parent) as plt:
        names = [c["name"] for c in rep["candidates"]]
        ratios = [c["result"]["ratio"] for c in rep["candidates"]]
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.2))
        ax.barh(names[::-1], ratios[::-1], color="#4a7fb5")
        ax.axvline(1.0, color="k", lw=0.8)
        ax.axvline(5.0, color="#b54a4a", lw=0.8, ls="--", label="5x target")
        for y, r in enumerate(ratios[::-1]):
            ax.text(r, y, f" {r:.2f}x", va="center", fontsize=8)
        ax.set_xlabel("training samples/s, new / old (interleaved, same batches)")
        ax.legend(loc="lower right", fontsize=8)
        save(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3, help="measured (old, new) step pairs per candidate")
    ap.add_argument("--task-pairs", type=int, default=2, help="measured pairs per task (0: skip the per-task table)")
    ap.add_argument("--quick", action="store_true", help="three candidates only")
    ap.add_argument("--only", help="candidate names separated by ';'")
    ap.add_argument("--quality", dest="quality", action="store_true", default=True)
    ap.add_argument("--no-quality", dest="quality", action="store_false")
    ap.add_argument("--quality-steps", type=int, default=20)
    ap.add_argument("--quality-users", type=int, default=16, help="validation users per task in the quality runs")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both sides (0: torch's default)")
    ap.add_argument("--quality-only", action="store_true", help="only the equal-samples runs: {'quality': rows} to --out")
    ap.add_argument("--quality-json", type=Path, help="take the quality rows from this file (a --quality-only run)")
    ap.add_argument("--out", type=Path, default=repo_root() / "reports" / "train-bench.json")
    args = ap.parse_args(argv)
    if args.quality_json and args.out.is_file() and args.pairs == 0:  # re-render an existing report with them
        rep = json.loads(args.out.read_text())
        rep["quality"] = json.loads(args.quality_json.read_text())["quality"]
        return _write(rep, args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    from trainer.base import load_base

    load_before = round(os.getloadavg()[0], 2)
    L = legacy_trainer()
    model, tok = load_base()
    if args.quality_only:
        with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
            rows = quality(L, model, tok, args.quality_steps, args.quality_users, Path(tmp))
        atomic_write(args.out, json.dumps({"quality": rows}, indent=1) + "\n", mode=0o644)
        return 0
    cfg0 = recipe("full")
    sets, _, cards = load_data(cfg0, tok, Dist())
    n_train = sum(len(s) for s in sets)
    print(f"{n_train} training samples: " + ", ".join(f"{c['name']} {c['train_samples']}" for c in cards), flush=True)
    mixture = TaskMixture([len(s) for s in sets], cfg0.seed)
    mixed = [mixture.batch(k, cfg0.batch_size) for k in range(args.pairs + 1)]
    rng = np.random.default_rng(cfg0.seed)
    rep: dict = {"command": "python -m trainer.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
                 "machine": machine(), "old_commit": LEGACY_COMMIT, "load_before": load_before,
                 "pairs": args.pairs, "n_train": n_train, "candidates": [], "notes": []}
    chosen = candidates(args.quick)
    if args.only:
        keep = {x.strip() for x in args.only.split(";")}
        chosen = [c for c in chosen if c["name"] in keep]
    for c in chosen:
        cfg = recipe("full", **c["set"])
        new_sets = shorter(sets, c["prompt"]) if c.get("prompt") else sets
        batches = mixed
        if c.get("one_task"):  # a batch of one task, drawn in the mixture's proportions
            tasks = rng.choice(len(sets), size=len(mixed), p=mixture.weights)
            batches = [[(int(t), int(i)) for i in rng.choice(len(sets[t]), size=cfg0.batch_size, replace=False)]
                       for t in tasks]
        old = old_arm(L, model, sets)
        new, cache = new_arm(c["name"], cfg, model, new_sets, c.get("threads", 0))
        try:
            res = measure(old, new, batches, cache=cache, sets=new_sets)
        finally:
            old.close()
            new.close()
        entry = {"name": c["name"], "what": c["what"], "result": res}
        if cache is not None:
            entry["amortised"] = amortised(res, n_train)
        rep["candidates"].append(entry)
        print(json.dumps(entry), flush=True)
    best = max(rep["candidates"], key=lambda e: e["result"]["ratio"]) if rep["candidates"] else None
    if args.task_pairs and best is not None:
        c = next(x for x in chosen if x["name"] == best["name"])
        rep["per_task_config"] = best["name"]
        rep["per_task"] = {}
        for t, tb in enumerate(task_batches(sets, args.task_pairs + 1, cfg0.batch_size, cfg0.seed)):
            old = old_arm(L, model, sets)
            new, cache = new_arm(c["name"], recipe("full", **c["set"]), model,
                                 shorter(sets, c["prompt"]) if c.get("prompt") else sets, c.get("threads", 0))
            try:
                rep["per_task"][sets[t].task] = measure(old, new, tb, cache=cache, sets=sets)
            finally:
                old.close()
                new.close()
            print(sets[t].task, json.dumps(rep["per_task"][sets[t].task]), flush=True)
    if args.quality_json:
        rep["quality"] = json.loads(args.quality_json.read_text())["quality"]
    elif args.quality:
        with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
            rep["quality"] = quality(L, model, tok, args.quality_steps, args.quality_users, Path(tmp))
    rep["load_after"] = round(os.getloadavg()[0], 2)
    return _write(rep, args.out)


def _write(rep: dict, out: Path) -> int:
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, json.dumps(rep, indent=1) + "\n", mode=0o644)
    write_markdown(rep, out.with_suffix(".md"))
    write_png(rep, out.with_suffix(".png"))
    print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
