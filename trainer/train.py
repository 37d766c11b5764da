"""Train the Profile-to-PEFT hypernetwork end to end against the frozen base (de-quantized from the app's GGUF).

    python -m trainer.train --recipe tiny                      # minutes on a laptop CPU
    python -m trainer.train --recipe full                      # the shipped bundle (`make train`; the default)
    torchrun --nproc-per-node 2 -m trainer.train --recipe short   # data-parallel (gloo on CPU, nccl on GPU)
    python -m trainer.train --recipe short --set lr=5e-4 --set hyper.use_embedding=false

Each step: sample a batch (tasks in proportion to sqrt(size)); the hypernetwork turns EACH sample's own
profile into its LoRA; the LoRAs are applied functionally inside the frozen base; the loss is the
cross-entropy of the target tokens only (the LM head runs at target positions only: the 262k-word
vocabulary would dominate the step otherwise), averaged per sample, so a 1-token rating counts as
much as a 20-token subject line. Gradients reach the hypernetwork only. Autograd keeps no activations
below the first adapted layer (nothing there needs a gradient), so adapting only upper layers
(`hyper.layers`) makes the backward pass cheaper by itself, and the frozen layers below it run once per
sample: their output is cached (`cache_hidden`) and later steps run the adapted layers only.

Throughput (reports/train-bench.md, `make bench-train`): the hypernetwork runs once per micro-batch, then
the base runs on length buckets of it (`bucket`): a 1-token rating is no longer padded to the length of
the email beside it. Same samples, same per-sample losses, same gradient: only the padding goes.

Checkpoints (`<out_dir>/last.pt`: model, optimiser, scheduler, sampler position, step, RNG states) are
written every `ckpt_every` steps; re-running the same command resumes exactly where it stopped
(dropout noise is re-seeded from (seed, step, rank), so a resumed run is bitwise the straight run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import platform
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from p2p_local.files import atomic_write_with
from p2p_local.pipeline import median_index
from p2p_local.profile import FEATURE_NAMES
from trainer.base import hidden_entering, lower_layers_skipped
from trainer.config import RECIPES, TrainConfig, recipe
from trainer.hypernet import HyperNet
from trainer.lora import FunctionalLoRA, SharedLoRA
from trainer.samples import SampleSet, cached_samples, load_encoder, load_task, task_names

# ------------------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_dist() -> Dist:
    """torchrun sets RANK/WORLD_SIZE; plain `python -m` runs as a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world == 1:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, torch.device(f"cuda:{local}" if cuda else "cpu"))


# ------------------------------------------------------------------------------------- sampling


class TaskMixture:
    """Deterministic batches: tasks drawn in proportion to size ** power (sqrt by default; 0 = balanced), samples walk a per-task
    permutation (re-shuffled each pass). The whole state is a few integers, so resume is exact."""

    def __init__(self, sizes: Sequence[int], seed: int, power: float = 0.5) -> None:
        self.sizes = list(sizes)
        w = np.asarray(self.sizes, dtype=np.float64) ** power * (np.asarray(self.sizes) > 0)
        self.weights = w / w.sum()
        self.seed = seed
        self.pos = [0] * len(sizes)
        self.epoch = [0] * len(sizes)
        self._perm: dict[int, tuple[int, np.ndarray]] = {}

    def _order(self, t: int) -> np.ndarray:
        cached = self._perm.get(t)
        if cached is None or cached[0] != self.epoch[t]:
            rng = np.random.default_rng([self.seed, t, self.epoch[t]])
            cached = (self.epoch[t], rng.permutation(self.sizes[t]))
            self._perm[t] = cached
        return cached[1]

    def batch(self, step: int, n: int) -> list[tuple[int, int]]:
        """The global batch of step `step`: n (task, sample) pairs. Call once per step, in order."""
        tasks = np.random.default_rng([self.seed, 7919, step]).choice(len(self.sizes), size=n, p=self.weights)
        out = []
        for t in tasks.tolist():
            out.append((t, int(self._order(t)[self.pos[t]])))
            self.pos[t] += 1
            if self.pos[t] == self.sizes[t]:
                self.pos[t], self.epoch[t] = 0, self.epoch[t] + 1
        return out

    def state_dict(self) -> dict:
        return {"pos": list(self.pos), "epoch": list(self.epoch)}

    def load_state_dict(self, d: dict) -> None:
        self.pos, self.epoch = list(d["pos"]), list(d["epoch"])


# ------------------------------------------------------------------------------------- batches and loss


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] right-padded
    attention_mask: torch.Tensor  # [B, T]
    embedding: torch.Tensor  # [B, E] each sample's own profile
    features: torch.Tensor  # [B, F]
    tgt_b: torch.Tensor  # [N] sample of each target token
    tgt_pos: torch.Tensor  # [N] position whose output predicts it
    tgt_ids: torch.Tensor  # [N]
    n_samples: int
    hidden: torch.Tensor | None = None  # [B, T, H] cached frozen hidden states entering layer `start`
    start: int = 0

    def to(self, device: torch.device) -> Batch:
        return Batch(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()})


def collate(sets: Sequence[SampleSet], picks: Sequence[tuple[int, int]], pad_id: int = 0,
            profile_from: Sequence[tuple[int, int]] | None = None) -> Batch:
    """Build a batch; `profile_from` (controls) takes each sample's profile from another sample."""
    profile_from = profile_from or picks
    seqs = [sets[t].prompt_ids[i] + sets[t].target_ids[i] for t, i in picks]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    tb, tp, tt = [], [], []
    for b, ((t, i), seq) in enumerate(zip(picks, seqs, strict=True)):
        ids[b, : len(seq)] = torch.tensor(seq)
        mask[b, : len(seq)] = 1
        n_prompt = len(sets[t].prompt_ids[i])
        for k, tok in enumerate(sets[t].target_ids[i]):
            tb.append(b)
            tp.append(n_prompt - 1 + k)
            tt.append(tok)
    emb = torch.from_numpy(np.stack([sets[t].embeddings[i] for t, i in profile_from]))
    feats = torch.from_numpy(np.stack([sets[t].features[i] for t, i in profile_from]))
    return Batch(ids, mask, emb, feats, torch.tensor(tb), torch.tensor(tp), torch.tensor(tt), len(picks))


def target_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Logits [N, V] at the target positions only (the LM head never sees the other positions). With
    `batch.hidden` the layers below `batch.start` are skipped: their output is given."""
    if batch.hidden is not None:
        with lower_layers_skipped(model, batch.start):
            hidden = model.model(inputs_embeds=batch.hidden, attention_mask=batch.attention_mask,
                                 use_cache=False).last_hidden_state
    else:
        hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             use_cache=False).last_hidden_state
    return model.lm_head(hidden[batch.tgt_b, batch.tgt_pos])


def length_buckets(lengths: Sequence[int], overhead: int) -> list[list[int]]:
    """Split samples into groups, each padded to its own longest, minimising sum(group size x longest)
    + overhead per group (the fixed cost of one more forward pass, in tokens). Optimal over the sorted
    lengths (a small dynamic programme: n is a micro-batch)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    srt = [lengths[i] for i in order]
    best = [0.0] + [math.inf] * len(srt)
    cut = [0] * (len(srt) + 1)
    for j in range(1, len(srt) + 1):
        for i in range(j):
            c = best[i] + (j - i) * srt[j - 1] + overhead
            if c < best[j]:
                best[j], cut[j] = c, i
    groups, j = [], len(srt)
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


class LowerCache:
    """The frozen base's hidden states entering the first adapted layer, per training sample: computed
    once, each sample alone (so the value does not depend on the batch it first came in: resume stays
    exact), then reused whenever the sample comes back. Up to `max_bytes`; beyond that, recomputed."""

    def __init__(self, model: nn.Module, start: int, device: torch.device, max_bytes: float) -> None:
        self.model, self.start, self.device, self.max_bytes = model, start, device, max_bytes
        self.store: dict[tuple[int, int], torch.Tensor] = {}
        self.bytes = 0
        self.computed = 0

    def hidden(self, sets: Sequence[SampleSet], picks: Sequence[tuple[int, int]], width: int) -> torch.Tensor:
        rows = []
        for t, i in picks:
            h = self.store.get((t, i))
            if h is None:
                ids = torch.tensor([sets[t].prompt_ids[i] + sets[t].target_ids[i]], device=self.device)
                h = hidden_entering(self.model, ids, self.start)[0]
                self.computed += 1
                size = h.numel() * h.element_size()
                if self.bytes + size <= self.max_bytes:
                    self.store[(t, i)] = h
                    self.bytes += size
            rows.append(h)
        out = rows[0].new_zeros((len(rows), width, rows[0].shape[-1]))
        for b, h in enumerate(rows):
            out[b, : h.shape[0]] = h
        return out


def adapters_rows(adapters: dict[str, tuple[torch.Tensor, torch.Tensor]], rows: Sequence[int]):
    idx = torch.as_tensor(list(rows), device=next(iter(adapters.values()))[0].device)
    return {m: (a.index_select(0, idx), b.index_select(0, idx)) for m, (a, b) in adapters.items()}


def micro_batch_losses(net: nn.Module, lora: FunctionalLoRA, model: nn.Module, sets: Sequence[SampleSet],
                       picks: Sequence[tuple[int, int]], device: torch.device, *, label_smoothing: float = 0.0,
                       bucket_overhead: int | None = 16, cache: LowerCache | None = None):
    """(per-sample losses [B] in `picks` order, adapters) for one micro-batch: the hypernetwork once, then
    the base on each length bucket (`bucket_overhead` None: one padded batch, as before buckets)."""
    first = collate(sets, picks)
    adapters = net(first.embedding.to(device), first.features.to(device))
    lengths = [len(sets[t].prompt_ids[i]) + len(sets[t].target_ids[i]) for t, i in picks]
    groups = [] if bucket_overhead is None else length_buckets(lengths, bucket_overhead)
    if len(groups) <= 1:  # one padded batch
        groups = [list(range(len(picks)))]
    losses = torch.zeros(len(picks), device=device)
    for g in groups:
        sub = [picks[k] for k in g]
        batch = first if len(groups) == 1 else collate(sets, sub)
        if cache is not None:
            batch.hidden, batch.start = cache.hidden(sets, sub, batch.input_ids.shape[1]), cache.start
        batch = batch.to(device)
        with lora.applied(adapters if len(groups) == 1 else adapters_rows(adapters, g)):
            logits = target_logits(model, batch)
        losses = losses.index_put((torch.as_tensor(g, device=device),), per_sample_loss(logits, batch, label_smoothing))
    return losses, adapters


def per_sample_loss(logits: torch.Tensor, batch: Batch, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean target-token cross-entropy of each sample [B]."""
    tok = F.cross_entropy(logits.float(), batch.tgt_ids, reduction="none", label_smoothing=label_smoothing)
    total = torch.zeros(batch.n_samples, device=tok.device).index_add(0, batch.tgt_b, tok)
    count = torch.zeros(batch.n_samples, device=tok.device).index_add(0, batch.tgt_b, torch.ones_like(tok))
    return total / count.clamp_min(1)


def l2_penalty(adapters: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    sq = [t.float().pow(2).mean() for pair in adapters.values() for t in pair]
    return torch.stack(sq).mean()


def autocast(device: torch.device, bf16: bool, cpu: bool = False):
    """bf16 autocast on CUDA; a no-op on CPU (float32) unless `cpu` (TrainConfig.bf16_cpu). One code path."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=bf16 and (device.type == "cuda" or cpu))


# ------------------------------------------------------------------------------------- evaluation


def shuffled_profiles(user_ids: Sequence[str]) -> np.ndarray:
    """For each sample, the index of a sample of ANOTHER user (a deterministic derangement by user)."""
    order = np.argsort(np.asarray(user_ids), kind="stable")
    groups = {}
    for u in user_ids:
        groups[u] = groups.get(u, 0) + 1
    if len(groups) < 2:
        return np.arange(len(user_ids))
    shift = max(groups.values())
    src = np.empty(len(user_ids), dtype=np.int64)
    src[order] = np.roll(order, shift)
    return src


def user_bootstrap_ci(values: np.ndarray, user_ids: Sequence[str], n_boot: int = 1000, seed: int = 0) -> list[float]:
    """95% CI of the mean of per-sample `values`, resampling users (samples of one user are not independent)."""
    users = sorted(set(user_ids))
    idx = {u: [i for i, x in enumerate(user_ids) if x == u] for u in users}
    sums = np.array([values[idx[u]].sum() for u in users])
    counts = np.array([len(idx[u]) for u in users])
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(users), size=(n_boot, len(users)))
    means = sums[pick].sum(1) / counts[pick].sum(1)
    return [round(float(np.percentile(means, 2.5)), 4), round(float(np.percentile(means, 97.5)), 4)]


def user_median_errors(s: SampleSet) -> np.ndarray:
    """Per-sample absolute error of the user-mean reference: each user's history median (the profile's
    r_median feature), snapped down to a label, as the eval's user-mean method decodes its distribution."""
    vals = np.array([float(x) for x in s.card_labels])
    lo, hi = vals.min(), vals.max()
    med = s.features[:, FEATURE_NAMES.index("r_median")] * max((hi - lo) / 2, 1e-6) + (lo + hi) / 2
    snapped = vals[np.clip(np.searchsorted(vals, med + 1e-6, side="right") - 1, 0, len(vals) - 1)]
    return np.abs(snapped - np.array([float(x) for x in s.labels]))


@torch.no_grad()
def evaluate(net: HyperNet | None, lora: FunctionalLoRA, model: nn.Module, sets: Sequence[SampleSet],
             device: torch.device, bf16: bool, batch_size: int = 32, controls: bool = True) -> dict:
    """Per task: target loss with the true profile, a shuffled (another user's) profile and no adapter;
    for rating tasks also the label distribution's MAE (argmax and expected value) and label CE."""
    was_training = net.training if net is not None else False
    if net is not None:
        net.eval()
    results = {}
    for t, s in enumerate(sets):
        n = len(s)
        if n == 0:
            continue
        shuf = shuffled_profiles(s.user_ids)
        modes = ["true", "shuffled", "base"] if controls and net is not None else (["true"] if net is not None else ["base"])
        res: dict[str, float] = {"n": n, "users": len(set(s.user_ids))}
        per_sample: dict[str, np.ndarray] = {}
        abs_err: dict[str, np.ndarray] = {}
        for mode in modes:
            losses, lab_lp = [], []
            for lo in range(0, n, batch_size):
                picks = [(t, i) for i in range(lo, min(n, lo + batch_size))]
                src = [(t, int(shuf[i])) for _, i in picks] if mode == "shuffled" else None
                batch = collate(sets, picks, profile_from=src).to(device)
                with autocast(device, bf16):
                    if mode == "base":
                        logits = target_logits(model, batch)
                    else:
                        with lora.applied(net(batch.embedding, batch.features)):
                            logits = target_logits(model, batch)
                losses.append(per_sample_loss(logits, batch).cpu())
                if s.label_ids:
                    lab_lp.append(torch.log_softmax(logits.float()[:, s.label_ids], dim=-1).cpu())
            per_sample[mode] = torch.cat(losses).numpy()
            res[f"loss_{mode}"] = float(per_sample[mode].mean())
            if s.label_ids and s.kind == "rating":
                lp = torch.cat(lab_lp).numpy()
                values = np.array([float(x) for x in s.labels])
                label_vals = np.array([float(x) for x in s.card_labels])
                gold_idx = np.array([s.card_labels.index(x) for x in s.labels])
                p = np.exp(lp)
                res[f"mae_argmax_{mode}"] = float(np.abs(label_vals[lp.argmax(1)] - values).mean())
                res[f"mae_expected_{mode}"] = float(np.abs(p @ label_vals - values).mean())
                med = label_vals[[median_index(row) for row in p]]  # the deployed eval's MAE decoding
                abs_err[mode] = np.abs(med - values)
                res[f"mae_median_{mode}"] = float(abs_err[mode].mean())
                res[f"label_ce_{mode}"] = float(-lp[np.arange(n), gold_idx].mean())
        if s.label_ids and s.kind == "rating":
            ref = user_median_errors(s)
            res["mae_user_median"] = float(ref.mean())
            if "true" in abs_err:  # > 0: P2P's MAE is above the reference's
                res["mae_true_minus_user_median_ci95"] = user_bootstrap_ci(abs_err["true"] - ref, s.user_ids)
        if "loss_shuffled" in res:
            res["gap_loss"] = res["loss_shuffled"] - res["loss_true"]
            res["gap_loss_ci95"] = user_bootstrap_ci(per_sample["shuffled"] - per_sample["true"], s.user_ids)
        results[s.task] = res
    if net is not None and was_training:
        net.train()
    return results


# ------------------------------------------------------------------------------------- the run


def optimizer_step(cfg: TrainConfig, ddp_net: nn.Module, net: nn.Module, lora: FunctionalLoRA, model: nn.Module,
                   sets: Sequence[SampleSet], picks: Sequence[tuple[int, int]], opt, sched, d: Dist, *,
                   micro: int, cache: LowerCache | None = None) -> tuple[float, float]:
    """One optimiser step on this rank's `picks` (micro-batches of `micro`, gradients accumulated; DDP
    syncs on the last): returns (loss, pre-clip gradient norm)."""
    per_rank = len(picks)
    n_micro = math.ceil(per_rank / micro)
    opt.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for k in range(n_micro):
        mb = picks[k * micro:(k + 1) * micro]
        sync = k == n_micro - 1 or d.world == 1
        ctx = ddp_net.no_sync() if (d.world > 1 and not sync) else _null()
        with ctx, autocast(d.device, cfg.bf16, cfg.bf16_cpu):
            losses, adapters = micro_batch_losses(ddp_net, lora, model, sets, mb, d.device,
                                                  label_smoothing=cfg.label_smoothing, cache=cache,
                                                  bucket_overhead=cfg.bucket_overhead if cfg.bucket else None)
            loss = losses.mean()
            if cfg.l2_ab:
                loss = loss + cfg.l2_ab * l2_penalty(adapters)
            (loss * len(mb) / per_rank).backward()
        loss_sum += float(loss.detach()) * len(mb) / per_rank
    grad_norm = float(torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip))
    opt.step()
    sched.step()
    return loss_sum, grad_norm


def lr_lambda(cfg: TrainConfig, clock: dict | None = None):
    """Warmup then cosine over the planned steps; with `clock["progress"]` set (a wall-clock budget whose
    step count is unknown ahead, as on a lent GPU) the same shape over the fraction of time spent."""
    warm = max(1, int(cfg.warmup_frac * cfg.steps))

    def f(step: int) -> float:
        t = None if clock is None else clock.get("progress")
        if t is not None:
            if t < cfg.warmup_frac:
                return max(t / cfg.warmup_frac, 1e-3)
            progress = min(1.0, (t - cfg.warmup_frac) / max(1e-9, 1 - cfg.warmup_frac))
            return cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, cfg.steps - warm))
        return cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def load_data(cfg: TrainConfig, tokenizer, d: Dist) -> tuple[list[SampleSet], list[SampleSet], list[dict]]:
    """Training and validation sample sets per task (rank 0 builds and caches, the others read the cache)."""
    names = task_names(cfg.tasks)
    train_sets, val_sets, cards = [], [], []
    if not d.main:
        d.barrier()  # wait until rank 0 has built (and cached) everything, then read the caches
    encoder = load_encoder(cfg.encoder, cfg.threads)
    common = dict(max_prompt_tokens=cfg.max_prompt_tokens, max_target_tokens=cfg.max_target_tokens,
                  max_history=cfg.max_history, workers=cfg.workers, log=_progress if d.main else None)
    for name in names:
        td = load_task(name)
        users = td.train[: cfg.max_users_train] if cfg.max_users_train else td.train
        # Only where the card shows examples: other samples keep their cache key (and their cached files).
        kw = dict(common, prompt_examples=True) if cfg.prompt_examples and td.card.examples else common
        train_sets.append(cached_samples(td.card, users, tokenizer, encoder, split="train",
                                         items_per_user=cfg.max_items_per_user, last=False, seed=cfg.seed, **kw))
        val_sets.append(cached_samples(td.card, td.val[: cfg.eval_users], tokenizer, encoder, split="val",
                                       items_per_user=cfg.eval_items_per_user, last=True, seed=cfg.seed, **kw))
        cards.append({"name": td.card.name, "kind": td.card.kind, "description": td.card.description,
                      "train_users": len(users), "train_samples": len(train_sets[-1]),
                      "val_users": len(set(val_sets[-1].user_ids)), "val_samples": len(val_sets[-1])})
    if d.main:
        d.barrier()
    return train_sets, val_sets, cards


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_hypernet(cfg: TrainConfig, model: nn.Module, train_sets: list[SampleSet]) -> nn.Module:
    """The model being trained: the hypernetwork (method "p2p"), or one shared LoRA ("mtlora" baseline)."""
    h = cfg.hyper
    h.embedding_dim = max(int(s.embeddings.shape[1]) for s in train_sets)  # the encoder's width (MiniLM 384, Gemma 640); an empty set has 0
    h.n_layers = model.config.num_hidden_layers
    h.layers = [x for x in h.layers if x < h.n_layers]
    torch.manual_seed(cfg.seed)
    if cfg.method == "mtlora":
        return SharedLoRA(h)
    if cfg.method != "p2p":
        raise ValueError(f"unknown method {cfg.method!r} (p2p | mtlora)")
    if cfg.init_bundle:  # its own feature statistics: the weights were trained on them
        from trainer.export import hypernet_from_bundle

        net = hypernet_from_bundle(cfg.init_bundle).train()
        if (net.cfg.embedding_dim, net.cfg.layers, net.cfg.targets) != (h.embedding_dim, h.layers, h.targets):
            raise ValueError(f"{cfg.init_bundle} was trained for another encoder width, layers or targets")
        cfg.hyper = net.cfg
        return net
    net = HyperNet(h)
    feats = torch.from_numpy(np.concatenate([s.features for s in train_sets]))
    net.set_feature_stats(feats.mean(0), feats.std(0))
    return net


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write_with(path, lambda tmp: torch.save(state, tmp), mode=0o644)  # never a half-written last.pt


# What may change when a run is resumed; everything else (data, model, optimiser) comes from the checkpoint.
RUNTIME_FIELDS = ("steps", "stop_after", "threads", "eval_every", "ckpt_every", "log_every", "out_dir",
                  "save_rank_weights", "eval_users", "eval_items_per_user", "bf16", "bucket", "bucket_overhead",
                  "cache_hidden", "cache_hidden_gb", "max_wall_s", "samples_file", "workers", "time_schedule",
                  "eval_every_s")


def result_checkpoint(out_dir: str | Path) -> Path:
    """The run's result: best.pt (an earlier step validated better than the last) or else last.pt."""
    best = Path(out_dir) / "best.pt"
    return best if best.is_file() else Path(out_dir) / "last.pt"


def resume_config(current: TrainConfig, saved: TrainConfig, verbose: bool = True) -> TrainConfig:
    """The checkpoint's config with the current run-time settings: resuming with a newer default recipe
    must not silently change the data or the model mid-run."""
    merged = saved.to_dict()
    cur = current.to_dict()
    ignored = [k for k in cur if k not in RUNTIME_FIELDS and k != "hyper" and cur[k] != merged[k]]
    for k in RUNTIME_FIELDS:
        merged[k] = cur[k]
    if verbose and ignored:
        print(f"resuming with the checkpoint's settings for {', '.join(ignored)} (use --fresh to start over)")
    return TrainConfig.from_dict(merged)


def train(cfg: TrainConfig, resume: bool = True, base: tuple | None = None) -> dict:
    """Run (or resume) a training run; returns a summary. Writes <out_dir>/{last.pt, metrics.jsonl, config.json}.
    `base` = (model, tokenizer) already loaded (tests reuse one), else trainer.base.load_base()."""
    run = setup_run(cfg, resume, base)
    run_steps(run)
    return finish_run(run)


@dataclass
class Run:
    """What a run holds from its setup through its steps to its result (rank-local)."""

    cfg: TrainConfig
    d: Dist
    out: Path
    model: nn.Module
    net: nn.Module
    ddp_net: nn.Module
    lora: FunctionalLoRA
    cache: LowerCache | None
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    clock: dict  # {"progress": fraction of max_wall_s spent} under a wall-clock schedule, else None
    sampler: TaskMixture
    train_sets: list[SampleSet]
    val_sets: list[SampleSet]
    cards: list[dict]
    step: int = 0
    elapsed_before: float = 0.0  # seconds trained before a resume
    best: dict = field(default_factory=lambda: {"score": math.inf, "step": 0})
    last: dict = field(default_factory=dict)  # the last step's metrics
    log: IO[str] | None = None  # metrics.jsonl, rank 0 only
    t_start: float = 0.0
    wall_stop: bool = False

    @property
    def ckpt_path(self) -> Path:
        return self.out / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.out / "best.pt"

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.t_start

    def validate(self) -> dict:
        batch = 128 if self.d.device.type == "cuda" else 32
        return evaluate(self.net, self.lora, self.model, self.val_sets, self.d.device, self.cfg.bf16, batch_size=batch)

    def state(self) -> dict:
        return _state(self.cfg, self.net, self.opt, self.sched, self.sampler, self.step, self.elapsed(), self.cards,
                      self.last)


def setup_run(cfg: TrainConfig, resume: bool = True, base: tuple | None = None) -> Run:
    """Everything before the first step: processes, the checkpoint to resume (its config, but for the run-time
    settings), the base, the data, the model, optimiser, schedule and sampler (restored when resuming)."""
    d = setup_dist()
    out = Path(cfg.out_dir)
    ckpt_path = out / "last.pt"
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=False) if resume and ckpt_path.is_file() else None
    if ck is not None:
        cfg = resume_config(cfg, TrainConfig.from_dict(ck["config"]), verbose=d.main)
    if d.device.type == "cpu" and cfg.threads:
        torch.set_num_threads(cfg.threads)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    from trainer.base import load_base

    if base is None:
        if not d.main:
            d.barrier()  # rank 0 converts (and caches) the GGUF first; the others then read the cache
        base = load_base()
        if d.main:
            d.barrier()
    model, tokenizer = base
    model.to(d.device)
    if cfg.samples_file:
        with open(cfg.samples_file, "rb") as f:  # prebuilt elsewhere (scripts/gpu_bundle.sh)
            train_sets, val_sets, cards = pickle.load(f)
    else:
        train_sets, val_sets, cards = load_data(cfg, tokenizer, d)
    net = build_hypernet(cfg, model, train_sets).to(d.device)
    lora = FunctionalLoRA(model, cfg.hyper.targets, cfg.hyper.layers, cfg.hyper.scale)
    start_layer = min(cfg.hyper.layers)
    cache = (LowerCache(model, start_layer, d.device, cfg.cache_hidden_gb * 2**30)
             if cfg.cache_hidden and start_layer > 0 else None)
    ddp_net = nn.parallel.DistributedDataParallel(net) if d.world > 1 else net
    opt = torch.optim.AdamW(net.param_groups(cfg.lr, cfg.weight_decay, cfg.head_lr_mult), lr=cfg.lr, betas=(0.9, 0.99))
    clock: dict = {"progress": 0.0 if cfg.time_schedule and cfg.max_wall_s else None}
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, clock))
    sampler = TaskMixture([len(s) for s in train_sets], cfg.seed, cfg.task_power)
    run = Run(cfg, d, out, model, net, ddp_net, lora, cache, opt, sched, clock, sampler, train_sets, val_sets, cards)
    if ck is not None:
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        sampler.load_state_dict(ck["sampler"])
        run.step, run.elapsed_before = ck["step"], ck.get("elapsed", 0.0)
        run.best = ck.get("best", run.best)
        torch.set_rng_state(ck["rng"]["torch"])
        np.random.set_state(ck["rng"]["numpy"])
        random.setstate(ck["rng"]["python"])
        if d.main:
            print(f"resumed {ckpt_path} at step {run.step}")
    if d.main:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        n_params = sum(p.numel() for p in net.parameters())
        tasks = ", ".join(f"{c['name']} ({c['train_samples']} samples)" for c in cards)
        print(f"tasks: {tasks}; {cfg.method} {n_params / 1e6:.2f}M params; device {d.device}, world {d.world}")
    if cfg.batch_size % d.world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of processes {d.world}")
    if d.main:
        if run.step == 0:
            (out / "metrics.jsonl").unlink(missing_ok=True)  # a fresh run starts a fresh log
        run.log = open(out / "metrics.jsonl", "a")
    return run


def run_steps(run: Run) -> None:
    """The optimiser steps, until `steps`, `stop_after` steps or `max_wall_s`: metrics logged, the model
    validated (best.pt kept) and checkpointed (last.pt) on their cadences."""
    cfg, d = run.cfg, run.d
    bar = None
    if d.main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=run.step, desc=cfg.recipe, dynamic_ncols=True)
    micro = min(cfg.micro_batch, cfg.batch_size // d.world)
    run.t_start = last_eval = time.time()
    stop_at = min(cfg.steps, run.step + cfg.stop_after) if cfg.stop_after else cfg.steps
    if cfg.init_bundle and run.step == 0 and cfg.eval_every:  # the starting point validated: kept if never beaten
        _validate_mid_run(run)
    run.net.train()
    while run.step < stop_at:
        t0 = time.time()
        torch.manual_seed(cfg.seed * 1_000_003 + run.step * 1009 + d.rank)  # dropout noise: a function of (seed, step, rank)
        picks = run.sampler.batch(run.step, cfg.batch_size)[d.rank::d.world]
        if run.clock["progress"] is not None:
            run.clock["progress"] = min(1.0, (time.time() - run.t_start) / cfg.max_wall_s)
        loss_sum, grad_norm = optimizer_step(cfg, run.ddp_net, run.net, run.lora, run.model, run.train_sets, picks,
                                             run.opt, run.sched, d, micro=micro, cache=run.cache)
        run.step += 1
        step = run.step
        dt = time.time() - t0
        if d.world > 1:
            t = torch.tensor([loss_sum], device=d.device)
            dist.all_reduce(t)
            loss_sum = float(t) / d.world
        run.last = {"step": step, "loss": round(loss_sum, 5), "grad_norm": round(grad_norm, 4),
                    "lr": run.sched.get_last_lr()[-1], "s_per_step": round(dt, 3),
                    "samples_per_s": round(cfg.batch_size / dt, 2), "elapsed": round(run.elapsed(), 1)}
        if d.main:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}", gn=f"{grad_norm:.2f}", sps=f"{cfg.batch_size / dt:.1f}")
            if step % cfg.log_every == 0 or step == 1:
                run.log.write(json.dumps(run.last) + "\n")
                run.log.flush()
        eval_due = ((cfg.eval_every and step % cfg.eval_every == 0)
                    or (cfg.eval_every_s and time.time() - last_eval >= cfg.eval_every_s))
        if cfg.eval_every_s:  # a wall-clock cadence: every rank must agree on it
            eval_due = _agree(bool(eval_due), d)
        if eval_due and step < cfg.steps:
            last_eval = time.time()
            _validate_mid_run(run)
        if cfg.max_wall_s:  # every rank stops at the same step
            run.wall_stop = _agree(time.time() - run.t_start >= cfg.max_wall_s, d) and step < stop_at
        if d.main and (step % cfg.ckpt_every == 0 or step == stop_at or run.wall_stop):
            state = run.state()
            state["best"] = run.best
            save_checkpoint(run.ckpt_path, state)
        d.barrier()
        if run.wall_stop:
            break
    if bar is not None:
        bar.close()


def _validate_mid_run(run: Run) -> None:
    """Validate on rank 0, log it, and keep the model as best.pt when it beats every earlier validation."""
    if run.d.main:
        ev = run.validate()
        score = val_score(ev)
        run.log.write(json.dumps({"step": run.step, "eval": ev, "val_score": score}) + "\n")
        run.log.flush()
        print(_eval_line(ev) + f" | val loss sum {score:.4f}")
        if run.cfg.select_best and score < run.best["score"]:
            run.best = {"score": score, "step": run.step}
            save_checkpoint(run.best_path, {"config": run.cfg.to_dict(), "model": run.net.state_dict(),
                                            "step": run.step, "best": run.best,
                                            "export_meta": run.state()["export_meta"]})
    run.d.barrier()


def finish_run(run: Run) -> dict:
    """The summary; on rank 0 of a finished run the final validation and the result's selection
    (`select_result`), else a resume hint; then the LoRA hooks and the process group go."""
    cfg, d = run.cfg, run.d
    # A wall-clock budget ends the run as if it were complete: final evaluation and export metadata
    # (the checkpoint says how many steps it got; running the same command again trains on).
    summary = {"steps": run.step, "last": run.last, "cards": run.cards, "finished": run.step >= cfg.steps or run.wall_stop}
    if run.wall_stop:
        summary["stopped"] = f"max_wall_s={cfg.max_wall_s:g}"
    if run.cache is not None:
        summary["hidden_cache"] = {"samples": len(run.cache.store), "computed": run.cache.computed,
                                   "mib": round(run.cache.bytes / 2**20, 1)}
    if cfg.save_rank_weights:
        torch.save(run.net.state_dict(), run.out / f"weights-rank{d.rank}.pt")
    if d.main and not summary["finished"]:
        run.log.close()
        print(f"stopped at step {run.step}/{cfg.steps}; run the same command again to resume")
    elif d.main:
        select_result(run, summary)
    run.lora.remove()
    if d.world > 1:
        dist.destroy_process_group()
    return summary


def select_result(run: Run, summary: dict) -> None:
    """Validate the last step; keep best.pt as the result only if it validated better (training past it
    overfit), else remove it; record the evaluation in the result's export metadata and in `summary`."""
    cfg, best = run.cfg, run.best
    ev = run.validate() if cfg.eval_users else {}
    final_score = val_score(ev) if ev else math.inf
    if cfg.select_best and run.best_path.is_file() and best["score"] < final_score:
        bk = torch.load(run.best_path, map_location="cpu", weights_only=False)
        run.net.load_state_dict(bk["model"])
        ev = run.validate()
        bk["export_meta"]["evaluation"] = {"split": "val", "tasks": ev}
        bk["export_meta"]["training"]["selected"] = {"step": best["step"], "of": run.step, "by": "validation loss",
                                                     "val_score": best["score"], "last_val_score": final_score}
        save_checkpoint(run.best_path, bk)
        summary["selected"] = bk["export_meta"]["training"]["selected"]
        print(f"selected step {best['step']} (validation loss sum {best['score']:.4f} < last {final_score:.4f})")
    else:
        run.best_path.unlink(missing_ok=True)  # the last step is the best: export it
    summary["eval"] = ev
    run.log.write(json.dumps({"step": run.step, "eval": ev, "final": True}) + "\n")
    run.log.close()
    if ev:
        print(_eval_line(ev))
    ck = torch.load(run.ckpt_path, map_location="cpu", weights_only=False)
    ck["export_meta"]["evaluation"] = {"split": "val", "tasks": ev}
    if run.wall_stop:
        ck["export_meta"]["training"]["stopped"] = summary["stopped"]
    save_checkpoint(run.ckpt_path, ck)


def val_score(ev: dict) -> float:
    """What checkpoint selection minimises: the validation target loss with the true profile, summed over tasks."""
    return float(sum(r["loss_true"] for r in ev.values() if "loss_true" in r))


def _state(cfg, net, opt, sched, sampler, step, elapsed, cards, last) -> dict:
    return {
        "config": cfg.to_dict(), "model": net.state_dict(), "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(), "sampler": sampler.state_dict(), "step": step, "elapsed": elapsed,
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        "export_meta": {
            "tasks": [{"name": c["name"], "kind": c["kind"], "description": c["description"]} for c in cards],
            "training": {"recipe": cfg.recipe, "steps": step, "batch_size": cfg.batch_size, "lr": cfg.lr,
                         "wall_time_s": round(elapsed, 1), "s_per_step": round(elapsed / max(1, step), 3),
                         "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cpus, "
                                    f"{'cuda ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}",
                         "data": cards, "last": last},
            "feature_names": _feature_names(),
        },
    }


def _feature_names() -> list[str]:
    from p2p_local.profile import FEATURE_NAMES

    return list(FEATURE_NAMES)


def _eval_line(ev: dict) -> str:
    parts = []
    for task, r in ev.items():
        s = f"{task}: loss true {r['loss_true']:.4f} shuffled {r.get('loss_shuffled', float('nan')):.4f} base {r.get('loss_base', float('nan')):.4f}"
        if "mae_expected_true" in r:
            s += f" | MAE(E) true {r['mae_expected_true']:.3f} shuffled {r['mae_expected_shuffled']:.3f} base {r['mae_expected_base']:.3f}"
        parts.append(s)
    return "\n".join(parts)


def _agree(flag: bool, d: Dist) -> bool:
    """True on every rank when rank 0 says so (clocks differ across processes)."""
    if d.world == 1:
        return flag
    t = torch.tensor([float(flag)], device=d.device)
    dist.broadcast(t, 0)
    return bool(t.item())


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def parse_value(v: str):
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    if v.startswith("["):
        return json.loads(v)
    return v


def config_from_args(argv: list[str] | None = None) -> tuple[TrainConfig, bool]:
    ap = argparse.ArgumentParser(prog="python -m trainer.train", description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="full", choices=sorted(RECIPES),
                    help="tiny: minutes (smoke test); short: ~10-20 min on a laptop CPU; full (default): the shipped bundle")
    ap.add_argument("--out-dir", help="run directory (default runs/<recipe>)")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--tasks", help="comma-separated task names, or 'all'")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override any TrainConfig field (hyper.* for the hypernetwork), repeatable")
    ap.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in the run directory")
    ap.add_argument("--stop-after", type=int, help="run at most this many steps now, then checkpoint and exit (resumable)")
    args = ap.parse_args(argv)
    overrides: dict = {"hyper": {}}
    for kv in args.set:
        k, _, v = kv.partition("=")
        if k.startswith("hyper."):
            overrides["hyper"][k[6:]] = parse_value(v)
        else:
            overrides[k] = parse_value(v)
    if args.steps:
        overrides["steps"] = args.steps
    if args.stop_after:
        overrides["stop_after"] = args.stop_after
    if args.tasks:
        overrides["tasks"] = args.tasks.split(",")
    overrides["out_dir"] = args.out_dir or f"runs/{args.recipe}"
    return recipe(args.recipe, **overrides), not args.fresh


def main(argv: list[str] | None = None) -> int:
    cfg, resume = config_from_args(argv)
    summary = train(cfg, resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"steps": summary["steps"], "last": summary["last"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
