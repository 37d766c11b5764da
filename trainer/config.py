"""Plain dataclasses for the hypernetwork and its training run. Recipes are named presets of TrainConfig."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# Gemma 3 270M, numpy (n_out, n_in) per GGUF module (see notes/llama-cpp-lora.md).
GEMMA3_270M_SHAPES: dict[str, tuple[int, int]] = {
    "attn_q": (1024, 640), "attn_k": (256, 640), "attn_v": (256, 640), "attn_output": (640, 1024),
    "ffn_gate": (2048, 640), "ffn_up": (2048, 640), "ffn_down": (640, 2048),
}


def contract_feature_dim() -> int:
    """The structured profile features' width: the feature contract's (`p2p_local.profile.FEATURE_DIM`)."""
    from p2p_local.profile import FEATURE_DIM

    return int(FEATURE_DIM)


@dataclass
class HyperConfig:
    """The hypernetwork's shape. `shapes` and `n_layers` come from the base model."""

    embedding_dim: int = 384  # profile encoder output (MiniLM)
    feature_dim: int = field(default_factory=contract_feature_dim)  # structured profile features
    use_embedding: bool = True  # ablations: text embedding and/or features feed the profile vector
    use_features: bool = True
    n_layers: int = 18  # of the base model (size of the layer-depth embedding table)
    layers: list[int] = field(default_factory=lambda: list(range(18)))  # adapted layers
    targets: list[str] = field(default_factory=lambda: ["attn_q", "attn_v"])
    shapes: dict[str, tuple[int, int]] = field(default_factory=lambda: dict(GEMMA3_270M_SHAPES))
    rank: int = 8
    scale: float = 2.0  # LoRA scale s: delta W = s * B @ A; exported as alpha = s * rank
    d_profile: int = 256  # profile projection
    d_layer: int = 32  # layer-depth embedding
    d_module: int = 32  # module-type embedding
    d_hidden: int = 256  # trunk width (the heads' input; heads dominate the size)
    n_blocks: int = 2  # residual MLP blocks
    dropout: float = 0.05
    init_seed: int = 0  # the per-layer LoRA init (A kaiming-uniform) is drawn from this seed

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> HyperConfig:
        d = dict(d)
        d["shapes"] = {k: tuple(v) for k, v in d.get("shapes", {}).items()} or dict(GEMMA3_270M_SHAPES)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class TrainConfig:
    """One training run. `python -m trainer.train --recipe tiny|short|full [--key value ...]`."""

    recipe: str = "short"
    method: str = "p2p"  # p2p (hypernetwork) | mtlora (one shared LoRA, the baseline; profile ignored)
    encoder: str = "minilm"  # profile text encoder: minilm (the device's ONNX MiniLM) | gemma-mean (see samples.py)
    tasks: list[str] = field(default_factory=lambda: ["movielens-rating"])
    out_dir: str = "runs/p2p"
    seed: int = 1337
    steps: int = 200
    batch_size: int = 16  # samples per optimiser step (global, across DDP ranks)
    micro_batch: int = 16  # samples per forward pass (gradient accumulation when smaller)
    lr: float = 1e-3
    head_lr_mult: float = 0.0  # heads' lr = lr * this; 0 = 1/sqrt(hyper.d_hidden) (see HyperNet.param_groups)
    lr_min_ratio: float = 0.1  # cosine decay to lr * this
    warmup_frac: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    label_smoothing: float = 0.0
    l2_ab: float = 0.0  # L2 penalty on generated (A, B), mean of squares
    max_prompt_tokens: int = 96  # short prompts: the input text is cut from the left, the target kept
    max_target_tokens: int = 24
    # The card's `examples` (the user's retrieved earlier items) before the query, fitted within
    # max_prompt_tokens by the app's rule (pipeline.fit_prompt): the prompt trained on is the prompt answered.
    prompt_examples: bool = False
    max_history: int = 0  # cap on the history a sample's profile is built from; 0 = all of it, as on the device
    max_users_train: int = 0  # 0 = all training users
    workers: int = 2  # processes building samples (profiles and item embeddings); the result does not depend on it
    task_power: float = 0.5  # tasks drawn in proportion to size ** task_power (0: equal shares, 1: by size)
    max_items_per_user: int = 8  # queries drawn per training user (the latest, each with its own earlier history)
    eval_users: int = 60  # held-out (val) users for the true-vs-shuffled check
    eval_items_per_user: int = 4
    eval_every: int = 0  # 0 = only at the end
    eval_every_s: float = 0.0  # also (or instead) every this many seconds: a budgeted run's step count is unknown
    ckpt_every: int = 50
    select_best: bool = True  # with eval_every: keep best.pt, the checkpoint of lowest validation loss (export uses it)
    log_every: int = 10
    stop_after: int = 0  # run at most this many steps in this invocation, then checkpoint and exit (0 = to the end)
    save_rank_weights: bool = False  # tests: each DDP rank saves its final weights
    bf16: bool = True  # CUDA only: autocast bf16 (CPU runs float32)
    bf16_cpu: bool = False  # training steps autocast to bf16 on CPU too (measured in reports/train-bench.md)
    threads: int = 0  # torch threads on CPU; 0 = leave torch's default
    # Throughput (none of these changes what is computed, only how; see reports/train-bench.md):
    bucket: bool = True  # split each micro-batch into length buckets (no padding of short samples to long ones)
    bucket_overhead: int = 16  # cost of one more forward pass, in padded tokens (the bucketing's trade-off)
    cache_hidden: bool = True  # adapted layers start above 0: compute the frozen layers below once per sample
    cache_hidden_gb: float = 6.0  # memory cap of that cache (samples beyond it are recomputed each time)
    time_schedule: bool = False  # with max_wall_s: warmup + cosine over the wall-clock budget, not the steps
    max_wall_s: float = 0.0  # stop training after this many seconds of this invocation, then evaluate (0 = off)
    samples_file: str = ""  # prebuilt (train_sets, val_sets, cards) pickle (trainer.gpu); "" = build/cache here
    # Warm start: the hypernetwork (weights, feature statistics, shape) of this bundle folder instead of a fresh
    # init (trainer.export.hypernet_from_bundle); "" = fresh. A resumed run takes its checkpoint's weights.
    init_bundle: str = ""
    hyper: HyperConfig = field(default_factory=HyperConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        hyper = HyperConfig.from_dict(d.pop("hyper", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(hyper=hyper, **{k: v for k, v in d.items() if k in known})


# Named recipes: overrides of TrainConfig's defaults (nested "hyper" keys allowed).
RECIPES: dict[str, dict] = {
    # A few minutes on 2 CPU cores: proves the loop learns and exports (tests/test_train_recipe.py).
    "tiny": dict(tasks=["popquorn-offensiveness"], steps=10, batch_size=8, micro_batch=8, lr=1e-3, warmup_frac=0.2,
                 max_users_train=40, max_items_per_user=4, max_prompt_tokens=64, eval_users=12, eval_items_per_user=2,
                 ckpt_every=5, log_every=1,
                 hyper=dict(d_profile=64, d_hidden=64, d_layer=16, d_module=16, n_blocks=1)),
    # ~10-20 min on 2 CPU cores: enough to see the true-vs-shuffled profile gap.
    "short": dict(steps=200, batch_size=16, micro_batch=16, lr=5e-4, max_users_train=0,
                  max_items_per_user=8, eval_users=80, eval_items_per_user=4, ckpt_every=50),
    # The shipped bundle: all tasks, every training item a sample (~180k: commits of 984 authors in nine
    # repositories, MovieLens, POPQUORN), each profile from the author's latest 256 earlier items. On the
    # 2-core CPU a step of 16 takes ~8 s (prompts cut to 64 tokens, targets to 24): `make train` runs in the
    # background and resumes; the GPU path (scripts/gpu_bundle.sh) raises batch and steps. The checkpoint
    # kept is the one of lowest validation loss (eval_every), never simply the last.
    "full": dict(tasks=["all"], steps=360, batch_size=16, micro_batch=16, lr=1e-3, max_items_per_user=0,
                 max_history=256, max_prompt_tokens=64, max_target_tokens=24, eval_users=105, eval_items_per_user=4,
                 eval_every=60, ckpt_every=30),
}
# The shipped recipe with the app's prompt: commit subjects are answered after the author's two nearest
# earlier commits (commit-subject.json `examples`), so they are trained that way; 320 tokens hold both.
RECIPES["full-examples"] = {**RECIPES["full"], "prompt_examples": True, "max_prompt_tokens": 320}
# What the app serves since issue 23: the query reads the change (its files and 800 characters of compact diff,
# no body: asked at commit time) after the author's two nearest earlier commits (files + subject, no diff);
# 512 tokens hold that prompt whole nearly always (fit_prompt drops the farthest example first).
RECIPES["full-diff"] = {**RECIPES["full-examples"], "max_prompt_tokens": 512}
# Issue 23 without a GPU: the shipped bundle, trained further on the commit task's served prompt (the diff and
# two examples) within an hour or so of a 2-core CPU: a few hundred queries, at a tenth of the full recipe's lr.
RECIPES["warm-diff"] = {**RECIPES["full-diff"], "tasks": ["commit-subject"], "init_bundle": "models/gemma3-270m-p2p",
                        "lr": 1e-4, "steps": 120, "batch_size": 8, "micro_batch": 8, "max_items_per_user": 2,
                        "eval_users": 60, "eval_items_per_user": 2, "eval_every": 30, "ckpt_every": 10}


def recipe(name: str, **overrides) -> TrainConfig:
    """A TrainConfig from a named recipe plus explicit overrides."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    d = TrainConfig().to_dict()
    merged = {**RECIPES[name], **overrides}
    merged["hyper"] = {**RECIPES[name].get("hyper", {}), **overrides.get("hyper", {})}
    for k, v in merged.items():
        if k == "hyper":
            d["hyper"].update(v)
        else:
            d[k] = v
    d["recipe"] = name
    return TrainConfig.from_dict(d)
