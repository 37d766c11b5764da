"""The Profile-to-PEFT hypernetwork: a profile in, a whole LoRA adapter (every layer, every target) out.

    profile  = [ normalise(embedding) * sqrt(E) ; standardise(features) ]  -> Linear -> LayerNorm   (u)
    row(l,m) = [ u ; LN(layer_emb[l]) ; LN(module_emb[m]) ]                -> Linear -> residual MLP (h)
    A, B     = head_m(h) + base_m[l]      (head_m: one Linear per module type, zero-initialised)

All (layer, module) rows go through the trunk in one batched pass; only the per-module heads (output
sizes differ) loop, over 2 modules by default. `base_m[l]` is a per-layer LoRA initialised as a standard
LoRA (A kaiming-uniform, B = 0): it plays the role of the reference's head bias, so at step 0 every user
gets delta W = 0, and during training it becomes a shared (multi-task) LoRA that the profile-dependent
head output moves per user. Why structured features: a frozen sentence embedding of a templated profile
alone did not personalize in the measured CPU run (notes/cpu-feasibility.md); numeric features did.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import HyperConfig


class ResBlock(nn.Module):
    """Pre-norm residual MLP block: x + Dropout(W2 SiLU(W1 LN(x)))."""

    def __init__(self, d: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.fc2(F.silu(self.fc1(self.norm(x)))))


class HyperNet(nn.Module):
    def __init__(self, cfg: HyperConfig) -> None:
        super().__init__()
        if not (cfg.use_embedding or cfg.use_features):
            raise ValueError("the hypernetwork needs the embedding, the features, or both")
        self.cfg = cfg
        n_rows_layers = len(cfg.layers)
        in_dim = cfg.embedding_dim * cfg.use_embedding + cfg.feature_dim * cfg.use_features
        # Feature standardisation is part of the model (fitted on training profiles, exported in the ONNX).
        self.register_buffer("feat_mean", torch.zeros(cfg.feature_dim))
        self.register_buffer("feat_std", torch.ones(cfg.feature_dim))
        self.profile = nn.Sequential(nn.Linear(in_dim, cfg.d_profile), nn.LayerNorm(cfg.d_profile))
        self.layer_emb = nn.Embedding(cfg.n_layers, cfg.d_layer)
        self.layer_norm = nn.LayerNorm(cfg.d_layer)
        self.module_emb = nn.Embedding(len(cfg.targets), cfg.d_module)
        self.module_norm = nn.LayerNorm(cfg.d_module)
        self.trunk_in = nn.Linear(cfg.d_profile + cfg.d_layer + cfg.d_module, cfg.d_hidden)
        self.blocks = nn.ModuleList(ResBlock(cfg.d_hidden, cfg.dropout) for _ in range(cfg.n_blocks))
        self.trunk_norm = nn.LayerNorm(cfg.d_hidden)
        self.heads = nn.ModuleDict()
        self.base = nn.ParameterDict()
        gen = torch.Generator().manual_seed(cfg.init_seed)
        for m in cfg.targets:
            n_out, n_in = cfg.shapes[m]
            size = cfg.rank * (n_in + n_out)
            self.heads[m] = nn.Linear(cfg.d_hidden, size, bias=False)
            nn.init.zeros_(self.heads[m].weight)
            # Standard LoRA init per layer: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(n_in), 1/sqrt(n_in)), B = 0.
            bound = 1.0 / math.sqrt(n_in)
            a = (torch.rand(n_rows_layers, cfg.rank * n_in, generator=gen) * 2 - 1) * bound
            self.base[m] = nn.Parameter(torch.cat([a, torch.zeros(n_rows_layers, cfg.rank * n_out)], dim=1))
        # Row indices: all layers of module 0, then all layers of module 1, ...
        layer_idx = torch.tensor(cfg.layers * len(cfg.targets))
        module_idx = torch.arange(len(cfg.targets)).repeat_interleave(n_rows_layers)
        self.register_buffer("layer_idx", layer_idx, persistent=False)
        self.register_buffer("module_idx", module_idx, persistent=False)

    def encode_profile(self, embedding: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The profile vector u [B, d_profile]."""
        parts = []
        if self.cfg.use_embedding:
            parts.append(F.normalize(embedding, dim=-1) * math.sqrt(self.cfg.embedding_dim))
        if self.cfg.use_features:
            parts.append(((features - self.feat_mean) / self.feat_std).clamp(-8.0, 8.0))
        u = self.profile(torch.cat(parts, dim=-1))
        # Keep both graph inputs alive in the export even when an ablation ignores one (adds exactly 0).
        if not self.cfg.use_embedding:
            u = u + 0.0 * embedding[:, :1]
        if not self.cfg.use_features:
            u = u + 0.0 * features[:, :1]
        return u

    def forward(self, embedding: torch.Tensor, features: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{module: (A [B, L, r, n_in], B [B, L, n_out, r])} for the layers in cfg.layers."""
        cfg = self.cfg
        u = self.encode_profile(embedding, features)  # [B, P]
        batch, n_rows = u.shape[0], self.layer_idx.shape[0]
        rows = torch.cat([self.layer_norm(self.layer_emb(self.layer_idx)),
                          self.module_norm(self.module_emb(self.module_idx))], dim=-1)  # [R, d_l + d_m]
        x = torch.cat([u[:, None, :].expand(batch, n_rows, -1), rows[None].expand(batch, -1, -1)], dim=-1)
        h = self.trunk_in(x)
        for block in self.blocks:
            h = block(h)
        h = self.trunk_norm(h)  # [B, R, H]
        out = {}
        n_l = len(cfg.layers)
        for i, m in enumerate(cfg.targets):
            n_out, n_in = cfg.shapes[m]
            flat = self.heads[m](h[:, i * n_l:(i + 1) * n_l]) + self.base[m]  # [B, L, r*(n_in+n_out)]
            a = flat[..., : cfg.rank * n_in].reshape(batch, n_l, cfg.rank, n_in)
            b = flat[..., cfg.rank * n_in:].reshape(batch, n_l, n_out, cfg.rank)
            out[m] = (a, b)
        return out

    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.feat_mean.copy_(mean)
        self.feat_std.copy_(std.clamp_min(1e-3))

    def param_groups(self, lr: float, weight_decay: float, head_lr_mult: float = 0.0) -> list[dict]:
        """AdamW groups. The heads get a smaller learning rate (default 1/sqrt(d_hidden)): Adam moves every
        head weight by ~lr at once, so a head output moves by ~lr * |h|_1 ~ lr * d_hidden per step -- the
        gradient-norm spike seen in the first CPU run. No decay on norms, embeddings and the base LoRA."""
        head_mult = head_lr_mult or 1.0 / math.sqrt(self.cfg.d_hidden)
        heads = [p for p in self.heads.parameters()]
        head_ids = {id(p) for p in heads}
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if id(p) in head_ids:
                continue
            (decay if p.ndim == 2 and not name.startswith(("base.", "layer_emb", "module_emb")) else no_decay).append(p)
        return [{"params": heads, "weight_decay": weight_decay, "lr": lr * head_mult},
                {"params": decay, "weight_decay": weight_decay, "lr": lr},
                {"params": no_decay, "weight_decay": 0.0, "lr": lr}]


def count_params(model: nn.Module) -> dict[str, int]:
    heads = sum(p.numel() for p in model.heads.parameters())
    base = sum(p.numel() for p in model.base.parameters())
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "heads": heads, "base_lora": base, "trunk": total - heads - base}
