"""The base model on the PyTorch side: transformers' Gemma 3 de-quantized from the SAME GGUF llama.cpp runs.

Training against the exact weights the app deploys (Q4_K_M, de-quantized) keeps trainer and runtime in
parity (tests/test_parity.py checks it). transformers converts the GGUF's tokenizer (~15 s) and
de-quantizes its tensors (~30 s) on every load, so the result is cached once per GGUF under
`cache_dir()/hf/<sha256[:16]>/` (safetensors + config + tokenizer) and later loads take seconds.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from p2p_local.adapter import parse_tensor_name, tensor_name
from p2p_local.errors import ModelError, StoreError
from p2p_local.files import replacing_dir
from p2p_local.paths import cache_dir
from p2p_local.peft_export import gguf_to_hf_modules, hf_module_name

__all__ = ["load_base", "default_base_path", "hf_cache_dir", "hf_module_name", "hf_gguf_module_map", "linear",
           "merged_lora", "hidden_entering", "lower_layers_skipped"]

SOURCE_FILE = "p2p_source.json"  # what the cache was made from


def default_base_path() -> Path:
    """The prepared default base model (assembled from its PyPI package on first use)."""
    from p2p_local.models import DEFAULT_BASE, prepare_base

    return prepare_base(DEFAULT_BASE)


def _sha256_of(gguf_path: Path) -> str:
    """The registered (verified) hash when the file is a known base, else hash it."""
    from p2p_local.files import sha256_file
    from p2p_local.models import known_models, verify

    for spec in known_models().values():
        if spec.filename == gguf_path.name and gguf_path.stat().st_size == spec.size:
            verify(gguf_path, spec)  # cached by (size, mtime): cheap after the first time
            return spec.sha256
    return sha256_file(gguf_path)


def hf_cache_dir(sha256: str) -> Path:
    return cache_dir() / "hf" / sha256[:16]


def load_base(
    gguf_path: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    sha256: str | None = None,
) -> tuple[nn.Module, object]:
    """(model, tokenizer) for a GGUF base: frozen, eval mode, de-quantized weights cast to `dtype`.

    The first call per GGUF converts it with transformers and caches the result (float32, exact
    de-quantized values); later calls load the cache.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path) if gguf_path is not None else default_base_path()
    if not gguf_path.is_file():
        raise ModelError(f"base model not found: {gguf_path}", hint="run `p2p models prepare`")
    sha256 = sha256 or _sha256_of(gguf_path)
    cached = hf_cache_dir(sha256)
    if not (cached / SOURCE_FILE).is_file():
        _convert(gguf_path, sha256, cached)
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(cached)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def load_tokenizer(gguf_path: str | Path | None = None, *, sha256: str | None = None) -> object:
    """The base's tokenizer alone (what sample building needs), from the same converted folder."""
    from transformers import AutoTokenizer

    gguf_path = Path(gguf_path) if gguf_path is not None else default_base_path()
    cached = hf_cache_dir(sha256 or _sha256_of(gguf_path))
    if not (cached / SOURCE_FILE).is_file():
        return load_base(gguf_path, sha256=sha256)[1]
    return AutoTokenizer.from_pretrained(cached)


class _FinishedFirst(Exception):
    """Leaves `replacing_dir` without its swap: a concurrent converter's complete folder stays in place."""


def _convert(gguf_path: Path, sha256: str, dest: Path) -> None:
    """De-quantize the GGUF with transformers and save it as a plain HF folder, atomically."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    except Exception as e:
        raise ModelError(f"transformers could not load {gguf_path.name}: {type(e).__name__}: {e}",
                         hint="the PyTorch trainer supports the GGUF architectures transformers can de-quantize") from e
    # The saved folder is an ordinary float32 checkpoint: drop the GGUF "quantization" marker so the
    # cached load does not go through the GGUF path again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    try:
        with replacing_dir(dest) as tmp:  # a stale, incomplete cache (no SOURCE_FILE) is replaced whole
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            source = {"gguf": gguf_path.name, "sha256": sha256, "transformers": transformers.__version__,
                      "arch": model.config.model_type}
            (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
            if (dest / SOURCE_FILE).is_file():
                raise _FinishedFirst  # another process or rank converted it meanwhile: keep the folder it reads
    except _FinishedFirst:
        pass
    except StoreError:
        if not (dest / SOURCE_FILE).is_file():  # not a concurrent writer that finished first
            raise


def hf_gguf_module_map(model: nn.Module, arch: str = "gemma3") -> dict[str, str]:
    """GGUF weight name -> module name, for every adaptable Linear the loaded model really has.

    Built from the model's own module names through gguf's name map (as transformers' GGUF loader
    does), so it can be checked against `p2p_local.peft_export`'s torch-free mapping.
    """
    import gguf

    from p2p_local.peft_export import arch_enum

    n_layers = model.config.num_hidden_layers
    name_map = gguf.get_tensor_name_map(arch_enum(arch), n_layers)
    wanted = {tensor_name(layer, m) for layer in range(n_layers) for m in gguf_to_hf_modules(arch)}
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        mapped = name_map.get_name(name)
        if mapped and f"{mapped}.weight" in wanted:
            out[f"{mapped}.weight"] = name
    return out


def linear(model: nn.Module, tensor_name: str, arch: str = "gemma3") -> nn.Linear:
    """The nn.Linear holding a GGUF weight, e.g. "blk.3.attn_q.weight" -> model.layers[3].self_attn.q_proj."""
    layer, module = parse_tensor_name(tensor_name)
    return model.get_submodule(hf_module_name(layer, module, arch))


@contextlib.contextmanager
def merged_lora(
    model: nn.Module, tensors: Mapping[str, tuple[np.ndarray, np.ndarray]], scale: float
) -> Iterator[nn.Module]:
    """Temporarily W += scale * B @ A for GGUF-named (A (r, n_in), B (n_out, r)) pairs; restored on exit.

    The reference for what llama.cpp computes with the same pairs at `scale = alpha / r`.
    """
    saved = {}
    try:
        with torch.no_grad():
            for name, (a, b) in tensors.items():
                weight = linear(model, name).weight
                saved[name] = weight.detach().clone()
                delta = torch.as_tensor(np.asarray(b), dtype=torch.float32) @ torch.as_tensor(np.asarray(a), dtype=torch.float32)
                weight += (scale * delta).to(weight.device, weight.dtype)
        yield model
    finally:
        with torch.no_grad():
            for name, w in saved.items():
                linear(model, name).weight.copy_(w)


# ------------------------------------------------------------------------------------- frozen lower layers
# When only upper layers are adapted, the frozen base's hidden states entering the first adapted layer
# depend on the sample alone: the trainer computes them once per sample (`hidden_entering`) and later runs
# only the upper layers on them (`lower_layers_skipped` + `inputs_embeds`), through the model's own forward
# (its masks, rotary embeddings and layer types), so the upper layers see exactly what they would see.


class _PassThrough(nn.Module):
    """Stands in for a skipped decoder layer: hands the hidden states on unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


class _Stop(Exception):
    pass


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


@torch.no_grad()
def hidden_entering(model: nn.Module, input_ids: torch.Tensor, layer: int) -> torch.Tensor:
    """The hidden states [B, T, H] entering decoder layer `layer` (0 = the scaled token embeddings); the
    layers from `layer` up are not run. Unpadded input: no attention mask."""
    captured: dict[str, torch.Tensor] = {}

    def grab(mod, args, kwargs):
        captured["h"] = args[0] if args else kwargs["hidden_states"]
        raise _Stop

    handle = _decoder_layers(model)[layer].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model.model(input_ids=input_ids, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["h"]


@contextlib.contextmanager
def lower_layers_skipped(model: nn.Module, layer: int) -> Iterator[None]:
    """Decoder layers below `layer` hand their input on unchanged: pass the hidden states entering
    `layer` as `inputs_embeds` and the model runs only the layers from `layer` up."""
    layers = _decoder_layers(model)
    saved = [layers[i] for i in range(layer)]
    try:
        for i in range(layer):
            layers[i] = _PassThrough()
        yield
    finally:
        for i, mod in enumerate(saved):
            layers[i] = mod
