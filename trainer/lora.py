"""Per-sample LoRA inside the frozen HF base model, applied functionally with forward hooks.

For each adapted Linear (GGUF name blk.{l}.{m}.weight) and each sample b of the batch:

    y[b] = W x[b] + s * (x[b] @ A[b]^T) @ B[b]^T        A[b] (r, n_in), B[b] (n_out, r)

computed with two batched einsums (no per-token copies of A/B). `s` is the one LoRA scale used everywhere:
the exported GGUF adapter carries alpha = s * r, so llama.cpp's alpha / r applies exactly s.

Usage:
    lora = FunctionalLoRA(model, targets=["attn_q", "attn_v"], layers=range(18), scale=2.0)
    with lora.applied(adapters):          # adapters: {m: (A [B, L, r, n_in], B [B, L, n_out, r])}
        out = model(...)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from p2p_local.adapter import tensor_name
from trainer.base import hf_module_name

Adapters = dict[str, tuple[torch.Tensor, torch.Tensor]]


class FunctionalLoRA:
    """Forward hooks on the target Linears, reading the current batch's adapters from `self._current`."""

    def __init__(self, model: nn.Module, targets: Iterable[str], layers: Iterable[int], scale: float,
                 arch: str = "gemma3") -> None:
        self.model = model
        self.targets = list(targets)
        self.layers = list(layers)
        self.scale = float(scale)
        self._current: Adapters | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for m in self.targets:
            for j, layer in enumerate(self.layers):
                linear = model.get_submodule(hf_module_name(layer, m, arch))
                if not isinstance(linear, nn.Linear):
                    raise TypeError(f"{hf_module_name(layer, m, arch)} is not an nn.Linear")
                self._handles.append(linear.register_forward_hook(self._hook(m, j)))

    def _hook(self, module_name: str, j: int):
        def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
            if self._current is None:
                return None
            a, b = self._current[module_name]
            x = inputs[0]  # [B, T, n_in]
            xa = torch.einsum("bti,bri->btr", x, a[:, j].to(x.dtype))
            return output + self.scale * torch.einsum("btr,bor->bto", xa, b[:, j].to(x.dtype))

        return hook

    @contextlib.contextmanager
    def applied(self, adapters: Adapters) -> Iterator[None]:
        """Adapters active for the forward passes inside the block (batch dim = the model input's)."""
        missing = set(self.targets) - set(adapters)
        if missing:
            raise KeyError(f"adapters lack modules {sorted(missing)}")
        self._current = adapters
        try:
            yield
        finally:
            self._current = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def to_gguf_tensors(adapters: Adapters, layers: list[int], index: int = 0) -> dict[str, tuple]:
    """One sample's adapters as {"blk.{l}.{m}.weight": (A, B)} numpy float32, ready for adapter.write_adapter."""
    out = {}
    for m, (a, b) in adapters.items():
        for j, layer in enumerate(layers):
            out[tensor_name(layer, m)] = (a[index, j].detach().float().cpu().numpy(),
                                          b[index, j].detach().float().cpu().numpy())
    return out


class SharedLoRA(nn.Module):
    """One LoRA for everyone (MT-LoRA) or for one user (OPPU): the same (A, B) for every sample.

    Same interface as HyperNet (`forward(embedding, features)` -> adapters, `cfg`, `param_groups`) so the
    training loop and loss code are shared; the profile inputs are ignored. Standard init: A kaiming-uniform
    (U(-1/sqrt(n_in), 1/sqrt(n_in))), B = 0.
    """

    def __init__(self, cfg, init: dict[str, tuple] | None = None) -> None:
        super().__init__()
        import math

        self.cfg = cfg
        gen = torch.Generator().manual_seed(cfg.init_seed)
        self.a = nn.ParameterDict()
        self.b = nn.ParameterDict()
        for m in cfg.targets:
            n_out, n_in = cfg.shapes[m]
            bound = 1.0 / math.sqrt(n_in)
            a = (torch.rand(len(cfg.layers), cfg.rank, n_in, generator=gen) * 2 - 1) * bound
            b = torch.zeros(len(cfg.layers), n_out, cfg.rank)
            if init is not None:  # start from an existing adapter (GGUF names -> numpy (A, B))
                for j, layer in enumerate(cfg.layers):
                    a0, b0 = init[tensor_name(layer, m)]
                    a[j], b[j] = torch.as_tensor(a0), torch.as_tensor(b0)
            self.a[m], self.b[m] = nn.Parameter(a), nn.Parameter(b)

    def forward(self, embedding: torch.Tensor, features: torch.Tensor | None = None) -> Adapters:
        n = embedding.shape[0]
        return {m: (self.a[m].expand(n, *self.a[m].shape), self.b[m].expand(n, *self.b[m].shape))
                for m in self.cfg.targets}

    def param_groups(self, lr: float, weight_decay: float, head_lr_mult: float = 0.0) -> list[dict]:
        return [{"params": list(self.parameters()), "weight_decay": weight_decay, "lr": lr}]

    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        pass  # no profile input

    def tensors(self) -> dict[str, tuple]:
        """{"blk.{l}.{m}.weight": (A, B)} numpy float32 for adapter.write_adapter."""
        return to_gguf_tensors({m: (self.a[m][None], self.b[m][None]) for m in self.cfg.targets}, self.cfg.layers)
