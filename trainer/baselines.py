"""The trained-adapter baselines, with the same loss code and the same GGUF export as P2P.

- MT-LoRA: one LoRA trained on all training users, no profile (the training loop of trainer/train.py with
  method="mtlora"), written as one GGUF adapter.
- OPPU ("One PEFT Per User"): one LoRA per user, trained on that user's own items only (rank 8, lr 1e-4,
  2 epochs by default, as in the paper), written as that user's GGUF adapter.

    python -m trainer.baselines mtlora --task movielens-rating --out mt-lora.gguf [--recipe short] [--set k=v]
    python -m trainer.baselines oppu --task movielens-rating --user-data history.jsonl --out user.gguf [--init mt-lora.gguf]

Every adapter is written with alpha = s * r, so llama.cpp applies exactly the scale s the trainer used.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from p2p_local.adapter import parse_tensor_name, read_adapter, write_adapter
from p2p_local.data.format import Item, TaskCard, builtin_card, read_users_jsonl
from p2p_local.pipeline import prompt_input, served_query
from p2p_local.profile import FEATURE_DIM
from trainer.config import HyperConfig, recipe
from trainer.lora import FunctionalLoRA, SharedLoRA
from trainer.samples import SampleSet, target_text, truncate_prompt
from trainer.train import collate, parse_value, per_sample_loss, target_logits, train


@dataclass
class OPPUConfig:
    rank: int = 8
    scale: float = 2.0
    lr: float = 1e-4
    epochs: int = 2
    batch_size: int = 4
    weight_decay: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["attn_q", "attn_v"])
    max_prompt_tokens: int = 256
    max_target_tokens: int = 64
    max_items: int = 0  # 0 = all the user's items (the most recent when capped)
    seed: int = 0
    threads: int = 0


def item_samples(card: TaskCard, items: list[Item], tokenizer, max_prompt_tokens: int, max_target_tokens: int) -> SampleSet:
    """A user's own items as (prompt, target) samples; OPPU needs no profile (zero inputs)."""
    prompts, targets = [], []
    for it in items:
        t = tokenizer(target_text(card, it), add_special_tokens=False)["input_ids"]
        if card.labelled:
            t = t[:1]
        if not t:
            continue
        p = tokenizer(card.prompt(prompt_input(card, served_query(card, it))), add_special_tokens=True)["input_ids"]
        prompts.append(truncate_prompt(p, max_prompt_tokens))
        targets.append(t[:max_target_tokens])
    n = len(prompts)
    return SampleSet(card.name, card.kind, prompts, targets, ["user"] * n, np.zeros((n, 384), np.float32),
                     np.zeros((n, FEATURE_DIM), np.float32))


def train_oppu(card: TaskCard, items: list[Item], model, tokenizer, cfg: OPPUConfig,
               init: dict[str, tuple] | None = None) -> tuple[dict[str, tuple], dict]:
    """One user's LoRA trained on their items. Returns ({gguf name: (A, B)}, stats)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    items = items[-cfg.max_items:] if cfg.max_items else items
    data = item_samples(card, items, tokenizer, cfg.max_prompt_tokens, cfg.max_target_tokens)
    if len(data) == 0:
        raise ValueError("the user has no usable items to train on")
    n_layers = model.config.num_hidden_layers
    shapes = {m: tuple(model.get_submodule(f"model.layers.0.{_hf_leaf(m)}").weight.shape) for m in cfg.targets}
    hcfg = HyperConfig(n_layers=n_layers, layers=list(range(n_layers)), targets=list(cfg.targets),
                       shapes=shapes, rank=cfg.rank, scale=cfg.scale, init_seed=cfg.seed)
    device = next(model.parameters()).device  # the GPU path trains every OPPU user on the loaded base
    lora_model = SharedLoRA(hcfg, init=init).to(device)
    hooks = FunctionalLoRA(model, hcfg.targets, hcfg.layers, hcfg.scale)
    opt = torch.optim.AdamW(lora_model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    losses, t0 = [], time.time()
    try:
        for _ in range(cfg.epochs):
            order = rng.permutation(len(data))
            for lo in range(0, len(order), cfg.batch_size):
                picks = [(0, int(i)) for i in order[lo:lo + cfg.batch_size]]
                batch = collate([data], picks).to(device)
                with hooks.applied(lora_model(batch.embedding)):
                    loss = per_sample_loss(target_logits(model, batch), batch).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
    finally:
        hooks.remove()
    stats = {"items": len(data), "steps": len(losses), "first_loss": losses[0], "last_loss": losses[-1],
             "seconds": round(time.time() - t0, 2)}
    return lora_model.tensors(), stats


def _hf_leaf(module: str) -> str:
    from p2p_local.peft_export import gguf_to_hf_modules

    return gguf_to_hf_modules("gemma3")[module]


def write_gguf(path: Path, tensors: dict[str, tuple], scale: float, rank: int, generator: str) -> Path:
    from trainer.export import base_info

    base, _ = base_info()
    return write_adapter(path, tensors, alpha=scale * rank, base=base, dtype="f32", generator=generator)


def run_mtlora(task: str, out: Path, recipe_name: str = "short", overrides: dict | None = None,
               run_dir: Path | None = None, base: tuple | None = None) -> dict:
    """Train MT-LoRA with the P2P training loop (same samples, loss, schedule) and write its GGUF."""
    overrides = dict(overrides or {})
    overrides.setdefault("out_dir", str(run_dir or Path("runs") / f"mtlora-{task}"))
    cfg = recipe(recipe_name, tasks=[task], method="mtlora", **overrides)
    summary = train(cfg, base=base)
    ck = torch.load(Path(cfg.out_dir) / "last.pt", map_location="cpu", weights_only=False)
    model = SharedLoRA(cfg.hyper)
    model.load_state_dict(ck["model"])
    write_gguf(out, model.tensors(), cfg.hyper.scale, cfg.hyper.rank, "p2p-local mt-lora")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.baselines", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="method", required=True)
    mt = sub.add_parser("mtlora", help="one LoRA trained on all training users of a task (no profile)")
    mt.add_argument("--task", required=True)
    mt.add_argument("--out", type=Path, required=True, help="GGUF adapter to write")
    mt.add_argument("--recipe", default="short")
    mt.add_argument("--run-dir", type=Path, help="checkpoint dir (default runs/mtlora-<task>; resumable)")
    mt.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    op = sub.add_parser("oppu", help="one LoRA trained on one user's own items")
    op.add_argument("--task", required=True)
    op.add_argument("--user-data", type=Path, required=True, help="users JSONL; the first user's items are used")
    op.add_argument("--out", type=Path, required=True, help="GGUF adapter to write")
    op.add_argument("--init", type=Path, help="start from this GGUF adapter (e.g. the MT-LoRA) instead of B = 0")
    for f in OPPUConfig.__dataclass_fields__.values():
        if f.name != "targets":
            op.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = ap.parse_args(argv)

    if args.method == "mtlora":
        overrides = {}
        for kv in args.set:
            k, _, v = kv.partition("=")
            if k.startswith("hyper."):
                overrides.setdefault("hyper", {})[k[6:]] = parse_value(v)
            else:
                overrides[k] = parse_value(v)
        summary = run_mtlora(args.task, args.out, args.recipe, overrides, args.run_dir)
        print(json.dumps({"out": str(args.out), "steps": summary["steps"], "last": summary["last"]}))
        return 0

    from trainer.base import load_base

    cfg = OPPUConfig(**{k: getattr(args, k) for k in OPPUConfig.__dataclass_fields__ if k != "targets"})
    users = read_users_jsonl(args.user_data)
    if not users:
        raise SystemExit(f"{args.user_data} holds no user")
    init = None
    if args.init:
        adapter = read_adapter(args.init)
        init = adapter.tensors
        cfg.rank, cfg.scale = adapter.rank, adapter.scale
        cfg.targets = sorted({parse_tensor_name(name)[1] for name in init})
    model, tokenizer = load_base()
    tensors, stats = train_oppu(builtin_card(args.task), users[0].items, model, tokenizer, cfg, init)
    write_gguf(args.out, tensors, cfg.scale, cfg.rank, "p2p-local oppu")
    print(json.dumps({"out": str(args.out), "user": users[0].user_id, **stats, "config": asdict(cfg)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
