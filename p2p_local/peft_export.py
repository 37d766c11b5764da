"""The same LoRA adapter as a Hugging Face PEFT folder (`adapter_config.json` + `adapter_model.safetensors`).

Also home of the name mapping between GGUF tensors (`blk.3.attn_q.weight`) and transformers modules
(`model.layers.3.self_attn.q_proj`), used by the exporter here and by the PyTorch trainer.

Why the scales agree: PEFT multiplies B @ A by `lora_alpha / r`, llama.cpp by `alpha / r` (at user
scale 1.0), so writing `lora_alpha = alpha` gives the same W + (alpha / r) B @ A on both sides.
PEFT stores A as `lora_A.weight` (r, n_in) and B as `lora_B.weight` (n_out, r): the same orientation as
our GGUF adapters, so the arrays are written as they are. numpy only (no torch, see ARCHITECTURE.md).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import save_file

from p2p_local.adapter import LoraAdapter, parse_tensor_name, read_adapter
from p2p_local.errors import AdapterError
from p2p_local.files import PRIVATE_FILE, atomic_write, atomic_write_with, replacing_dir, sha256_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CARD_FILE = "README.md"  # the model card (Hugging Face convention)
# What the export wrote, with each file's sha256: a later export replaces the folder only when it holds
# exactly these files, unchanged (anything else there is the user's and must not be deleted).
MANIFEST_FILE = ".p2p-local-export.json"
# What the hypernetwork was trained against: the GGUF's weights, de-quantized (said in the card and the metadata).
TRAINED_ON = "the de-quantized Q4_K_M GGUF weights of the base (valid for them; untested on full precision)"
# PEFT saves LoRA weights under the PeftModel's path to the module with the adapter name dropped:
# PeftModel.base_model (LoraModel) .model (Gemma3ForCausalLM) .model.layers... (checked in tests).
PEFT_KEY_PREFIX = "base_model.model."

# The Linear modules of one decoder layer in transformers' Gemma 3 (the Llama-family layout), relative
# to the layer. Which GGUF tensor each one is comes from gguf's tensor-name map (the table llama.cpp's
# own HF -> GGUF converter uses), not from a table of ours.
HF_LAYER = "model.layers.{bid}"
HF_LAYER_LINEARS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)


@functools.cache
def arch_enum(arch: str) -> gguf.MODEL_ARCH:
    """gguf's enum for an architecture name ("gemma3" -> MODEL_ARCH.GEMMA3)."""
    by_name = {name: enum for enum, name in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in by_name:
        raise AdapterError(f"gguf does not know the architecture {arch!r}")
    return by_name[arch]


@functools.cache
def gguf_to_hf_modules(arch: str = "gemma3") -> dict[str, str]:
    """GGUF module short name -> transformers module path inside a layer, e.g. "attn_q" -> "self_attn.q_proj"."""
    name_map = gguf.get_tensor_name_map(arch_enum(arch), 1)
    out: dict[str, str] = {}
    for leaf in HF_LAYER_LINEARS:
        mapped = name_map.get_name(f"{HF_LAYER.format(bid=0)}.{leaf}")  # e.g. "blk.0.attn_q"
        if mapped is None or not mapped.startswith("blk.0."):
            raise AdapterError(f"gguf's name map has no {arch} tensor for {leaf}")
        out[mapped.removeprefix("blk.0.")] = leaf
    return out


def hf_module_name(layer: int, module: str, arch: str = "gemma3") -> str:
    """transformers module path for a GGUF module of one layer: (3, "attn_q") -> "model.layers.3.self_attn.q_proj"."""
    modules = gguf_to_hf_modules(arch)
    if module not in modules:
        raise AdapterError(f"no transformers module for GGUF module {module!r}", hint=f"known: {sorted(modules)}")
    return f"{HF_LAYER.format(bid=layer)}.{modules[module]}"


def gguf_to_hf_name(tensor_name: str, arch: str = "gemma3") -> str:
    """ "blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj" (the module owning that weight)."""
    layer, module = parse_tensor_name(tensor_name)
    return hf_module_name(layer, module, arch)


def peft_config(adapter: LoraAdapter, base_model_name: str) -> dict[str, object]:
    """adapter_config.json for `adapter`: LoRA, r, lora_alpha = alpha, targets as short HF names."""
    layers_of: dict[str, set[int]] = {}  # short HF name ("q_proj") -> layers it is adapted on
    for name in adapter.tensors:
        layer, _ = parse_tensor_name(name)
        layers_of.setdefault(gguf_to_hf_name(name, adapter.arch).rsplit(".", 1)[-1], set()).add(layer)
    layer_sets = {frozenset(s) for s in layers_of.values()}
    if len(layer_sets) == 1:
        # One layer set for every module: short names plus the layer list (PEFT adds LoRA nowhere else).
        target_modules: list[str] | str = sorted(layers_of)
        layers_to_transform: list[int] | None = sorted(next(iter(layer_sets)))
    else:
        # Modules on different layers: PEFT takes a string target as a full-match regex over module names.
        names = sorted(gguf_to_hf_name(n, adapter.arch) for n in adapter.tensors)
        target_modules = "|".join(re.escape(n) for n in names)
        layers_to_transform = None
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name,
        "r": adapter.rank,
        "lora_alpha": float(adapter.alpha),
        "lora_dropout": 0.0,
        "target_modules": target_modules,
        "layers_to_transform": layers_to_transform,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def peft_state_dict(adapter: LoraAdapter, dtype: str = "f32") -> dict[str, np.ndarray]:
    """{"base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight": A (r, n_in), ...lora_B: B (n_out, r)}."""
    np_dtype = {"f32": np.float32, "f16": np.float16}[dtype]
    out = {}
    for name, (a, b) in adapter.tensors.items():
        module = PEFT_KEY_PREFIX + gguf_to_hf_name(name, adapter.arch)
        out[f"{module}.lora_A.weight"] = np.ascontiguousarray(a, dtype=np_dtype)
        out[f"{module}.lora_B.weight"] = np.ascontiguousarray(b, dtype=np_dtype)
    return out


def export_peft(
    adapter: LoraAdapter | str | Path,
    out_dir: str | Path,
    base_model_name: str | None = None,  # None: the default base's Hugging Face id
    *,
    dtype: str = "f32",
    card: str | None = None,
) -> Path:
    """Write `adapter` (in memory, or a GGUF adapter file) as a PEFT folder at `out_dir`, atomically.

    The folder is built beside `out_dir` and renamed into place, so readers never see half of one;
    an existing `out_dir` is replaced only if it is empty or an earlier PEFT export whose files are
    unchanged (`MANIFEST_FILE`; never a folder holding anything else: that would delete the user's
    files). `card`: a model card, written as README.md.
    """
    if not isinstance(adapter, LoraAdapter):
        adapter = read_adapter(adapter)
    if dtype not in ("f32", "f16"):
        raise AdapterError(f"unsupported PEFT dtype {dtype!r}", hint="use f32 or f16")
    out_dir = Path(out_dir).resolve()  # "." has no name to build the temp folder from
    if out_dir.exists() and not _replaceable(out_dir):
        raise AdapterError(f"{out_dir} exists and is not a PEFT export of p2p-local left unchanged: it would be replaced",
                           hint="pass a new folder, e.g. --peft-out alice-peft/ (or move that one away)")
    parent = out_dir.parent
    if parent.exists() and not parent.is_dir():
        raise AdapterError(f"cannot export into {parent}: it is a file, not a folder", hint="pass a folder")
    if base_model_name is None:
        from p2p_local.models import DEFAULT_BASE

        base_model_name = DEFAULT_BASE.hf_id or DEFAULT_BASE.name
    config = peft_config(adapter, base_model_name)
    tensors = peft_state_dict(adapter, dtype)
    with replacing_dir(out_dir) as tmp:  # an ordinary folder (0755), swapped in whole
        # Each file through the one atomic write (fsync'd, private 0600: the weights are the profile's);
        # `p2p adapter export --mode` widens them on request.
        atomic_write(tmp / CONFIG_FILE, json.dumps(config, indent=2) + "\n", mode=PRIVATE_FILE)
        atomic_write_with(tmp / WEIGHTS_FILE, lambda p: save_file(
            tensors, str(p), metadata={"format": "pt", "p2p.trained_on": TRAINED_ON}), mode=PRIVATE_FILE)  # "pt": PEFT
        if card is not None:
            atomic_write(tmp / CARD_FILE, card, mode=PRIVATE_FILE)
        written = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        atomic_write(tmp / MANIFEST_FILE, json.dumps({"files": written}, indent=1) + "\n", mode=PRIVATE_FILE)
    return out_dir


def _replaceable(folder: Path) -> bool:
    """True for an empty folder, or one holding exactly what an earlier export wrote, unchanged."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    entries = {p.name: p for p in folder.iterdir()}
    if not entries:
        return True
    try:
        written = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))["files"]
        if set(entries) != set(written) | {MANIFEST_FILE}:
            return False
        return all(entries[n].is_file() and not entries[n].is_symlink() and sha256_file(entries[n]) == h
                   for n, h in written.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
