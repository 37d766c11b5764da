"""GGUF LoRA adapters: write, read back, and validate against a base model before llama.cpp sees one.

llama.cpp aborts the whole process on some malformed adapters, so everything it would trip over is
checked here first: header, KV types, tensor names and pairs, shapes, dtypes, finiteness, truncation.

Format (what llama.cpp's `llama_adapter_lora_init` accepts):
- KV `general.type = "adapter"`, `general.architecture = <base arch>`, `adapter.type = "lora"`,
  `adapter.lora.alpha` as FLOAT32 (an integer alpha aborts llama.cpp).
- tensors `<base tensor name>.lora_a` with numpy shape (r, n_in) and `.lora_b` with (n_out, r).
- effect: W_eff = W + scale * (alpha / r) * B @ A.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from p2p_local import __version__
from p2p_local.errors import AdapterError

# --- format constants, in the format's own vocabulary -------------------------------------------
KEY_GENERAL_TYPE = "general.type"
KEY_ARCH = "general.architecture"
KEY_ADAPTER_TYPE = "adapter.type"
KEY_LORA_ALPHA = "adapter.lora.alpha"
# p2p-local's own metadata (llama.cpp ignores unknown keys).
KEY_BASE_SHA256 = "p2p.base.sha256"
KEY_RANK = "p2p.lora.rank"
KEY_TARGETS = "p2p.lora.targets"
KEY_GENERATOR_NAME = "p2p.generator.name"
KEY_GENERATOR_VERSION = "p2p.generator.version"
KEY_PROFILE_FINGERPRINT = "p2p.profile.fingerprint"
KEY_CREATED = "p2p.created"

SUFFIX_A = ".lora_a"
SUFFIX_B = ".lora_b"
DTYPES = {"f32": np.float32, "f16": np.float16}
ACCEPTED_TYPES = {
    gguf.GGMLQuantizationType.F32,
    gguf.GGMLQuantizationType.F16,
    gguf.GGMLQuantizationType.BF16,
    gguf.GGMLQuantizationType.Q8_0,
}
# Modules llama.cpp can adapt on the architectures we know (GGUF short names).
TARGET_MODULES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@dataclass(frozen=True)
class BaseInfo:
    """What an adapter must agree with: the base model's architecture, hash, and weight shapes.

    `shapes` maps a GGUF tensor name (e.g. "blk.0.attn_q.weight") to numpy-order (n_out, n_in).
    """

    arch: str
    sha256: str
    shapes: Mapping[str, tuple[int, int]]
    n_layers: int

    @classmethod
    def from_gguf(cls, path: str | Path, sha256: str) -> BaseInfo:
        """Read arch, layer count and weight shapes. Cached beside the model file, keyed by (size, mtime):
        gguf's reader parses the 262k-entry vocabulary in Python, seconds on every engine start."""
        path = Path(path)
        st = path.stat()
        cache = path.with_name(path.name + ".baseinfo.json")
        key = [st.st_size, st.st_mtime_ns]
        try:
            c = json.loads(cache.read_text())
            if c["key"] == key:
                return cls(arch=c["arch"], sha256=sha256, n_layers=c["n_layers"],
                           shapes={k: tuple(v) for k, v in c["shapes"].items()})
        except (OSError, ValueError, KeyError, TypeError):
            pass
        info = cls._read(path, sha256)
        try:
            cache.write_text(json.dumps({"key": key, "arch": info.arch, "n_layers": info.n_layers,
                                         "shapes": info.shapes}))
        except OSError:
            pass  # read-only location: just slower next time
        return info

    @classmethod
    def _read(cls, path: Path, sha256: str) -> BaseInfo:
        try:
            reader = gguf.GGUFReader(str(path), "r")
        except Exception as e:  # truncated / not a GGUF
            raise AdapterError(f"cannot read base model {path}: {e}") from e
        arch = _kv_str(reader, KEY_ARCH) or "?"
        n_layers = int(_kv_scalar(reader, f"{arch}.block_count") or 0)
        shapes = {}
        for t in reader.tensors:
            if len(t.shape) == 2:
                n_in, n_out = (int(x) for x in t.shape)  # GGUF ne order is [n_in, n_out]
                shapes[t.name] = (n_out, n_in)
        return cls(arch=arch, sha256=sha256, shapes=shapes, n_layers=n_layers)

    def target_name(self, layer: int, module: str) -> str:
        return f"blk.{layer}.{module}.weight"


@dataclass
class LoraAdapter:
    """A LoRA adapter in memory. `tensors` maps base tensor name -> (A (r, n_in), B (n_out, r))."""

    tensors: dict[str, tuple[np.ndarray, np.ndarray]]
    alpha: float
    arch: str
    meta: dict[str, object] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        a, _ = next(iter(self.tensors.values()))
        return int(a.shape[0])

    @property
    def scale(self) -> float:
        """The factor llama.cpp multiplies B @ A by at user scale 1.0."""
        return self.alpha / self.rank


def profile_fingerprint(text: str) -> str:
    """A stable hash of a profile (never its content) to record in adapters and cache keys."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def write_adapter(
    path: str | Path,
    tensors: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    alpha: float,
    base: BaseInfo,
    dtype: str = "f16",
    generator: str = "p2p-local",
    generator_version: str = __version__,
    profile_fingerprint: str = "",
) -> Path:
    """Write a GGUF LoRA adapter atomically (temporary file in the same dir, fsync, rename).

    `tensors` maps base tensor names (e.g. "blk.3.attn_q.weight") to (A, B). Shapes are checked
    against `base` first, so a bad adapter is never written.
    """
    path = Path(path)
    if dtype not in DTYPES:
        raise AdapterError(f"unsupported adapter dtype {dtype!r}", hint=f"use one of {sorted(DTYPES)}")
    if not tensors:
        raise AdapterError("an adapter needs at least one (A, B) pair")
    np_dtype = DTYPES[dtype]
    ranks = set()
    targets = set()
    for name, (a, b) in tensors.items():
        _check_pair(name, np.asarray(a), np.asarray(b), base)
        ranks.add(a.shape[0])
        targets.add(name.split(".")[2] if name.startswith("blk.") else name)
    if len(ranks) != 1:
        raise AdapterError(f"all pairs must share one rank, got {sorted(ranks)}")
    rank = ranks.pop()

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, base.arch)
        w.add_string(KEY_GENERAL_TYPE, "adapter")
        w.add_string(KEY_ADAPTER_TYPE, "lora")
        w.add_float32(KEY_LORA_ALPHA, float(alpha))
        w.add_string(KEY_BASE_SHA256, base.sha256)
        w.add_uint32(KEY_RANK, int(rank))
        w.add_array(KEY_TARGETS, sorted(targets))
        w.add_string(KEY_GENERATOR_NAME, generator)
        w.add_string(KEY_GENERATOR_VERSION, generator_version)
        w.add_string(KEY_PROFILE_FINGERPRINT, profile_fingerprint)
        w.add_string(KEY_CREATED, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        for name in sorted(tensors):
            a, b = tensors[name]
            w.add_tensor(name + SUFFIX_A, np.ascontiguousarray(a, dtype=np_dtype))
            w.add_tensor(name + SUFFIX_B, np.ascontiguousarray(b, dtype=np_dtype))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_adapter(path: str | Path) -> LoraAdapter:
    """Read an adapter back exactly (values as stored, upcast to float32). Structural checks only."""
    reader = _open(path)
    general_type = _kv_str(reader, KEY_GENERAL_TYPE)
    if general_type != "adapter" or _kv_str(reader, KEY_ADAPTER_TYPE) != "lora":
        raise AdapterError(
            f"{path} is not a LoRA adapter (general.type={general_type!r})",
            hint="pass a file written by `p2p personalize` or another GGUF LoRA adapter",
        )
    alpha_field = reader.fields.get(KEY_LORA_ALPHA)
    if alpha_field is None:
        raise AdapterError(f"{path} has no {KEY_LORA_ALPHA}")
    if alpha_field.types != [gguf.GGUFValueType.FLOAT32]:
        raise AdapterError(
            f"{path}: {KEY_LORA_ALPHA} must be FLOAT32, found {alpha_field.types[0].name}",
            hint="llama.cpp aborts on a non-float alpha; re-export the adapter",
        )
    alpha = float(alpha_field.parts[alpha_field.data[0]][0])
    halves: dict[str, dict[str, np.ndarray]] = {}
    for t in reader.tensors:
        if t.name.endswith(SUFFIX_A):
            halves.setdefault(t.name[: -len(SUFFIX_A)], {})["a"] = _tensor_values(t)
        elif t.name.endswith(SUFFIX_B):
            halves.setdefault(t.name[: -len(SUFFIX_B)], {})["b"] = _tensor_values(t)
        elif t.name.endswith("_norm.weight"):
            continue  # llama.cpp ignores norms in adapters
        else:
            raise AdapterError(f"{path}: unexpected tensor {t.name!r} (not .lora_a/.lora_b)")
    tensors = {}
    for name, pair in halves.items():
        if set(pair) != {"a", "b"}:
            raise AdapterError(f"{path}: tensor {name!r} has only half a LoRA pair")
        tensors[name] = (pair["a"], pair["b"])
    if not tensors:
        raise AdapterError(f"{path} holds no LoRA tensors")
    meta: dict[str, object] = {}
    for key in (KEY_BASE_SHA256, KEY_GENERATOR_NAME, KEY_GENERATOR_VERSION, KEY_PROFILE_FINGERPRINT, KEY_CREATED):
        v = _kv_str(reader, key)
        if v is not None:
            meta[key] = v
    return LoraAdapter(tensors=tensors, alpha=alpha, arch=_kv_str(reader, KEY_ARCH) or "?", meta=meta)


def validate_adapter(path: str | Path, base: BaseInfo, *, check_base_hash: bool = True) -> LoraAdapter:
    """Everything llama.cpp would trip over, checked in Python. Returns the adapter on success."""
    adapter = read_adapter(path)
    if adapter.arch != base.arch:
        raise AdapterError(
            f"{path} was made for architecture {adapter.arch!r}, the loaded base is {base.arch!r}",
            hint="generate the adapter with a hypernetwork bundle trained for this base model",
        )
    made_for = adapter.meta.get(KEY_BASE_SHA256)
    if check_base_hash and made_for and made_for != base.sha256:
        raise AdapterError(
            f"{path} was made for another base model (sha256 {str(made_for)[:12]}..., loaded {base.sha256[:12]}...)",
            hint="regenerate it for this base (`p2p personalize`) or load the base it was made for",
        )
    if not np.isfinite(adapter.alpha) or adapter.alpha <= 0:
        raise AdapterError(f"{path}: alpha must be a positive finite float, got {adapter.alpha}")
    for name, (a, b) in adapter.tensors.items():
        _check_pair(name, a, b, base)
    return adapter


def _check_pair(name: str, a: np.ndarray, b: np.ndarray, base: BaseInfo) -> None:
    if name not in base.shapes:
        raise AdapterError(
            f"adapter tensor {name!r} has no counterpart in the base model ({base.arch})",
            hint="the adapter targets modules this base does not have",
        )
    n_out, n_in = base.shapes[name]
    if a.ndim != 2 or b.ndim != 2:
        raise AdapterError(f"{name}: A and B must be matrices, got {a.shape} and {b.shape}")
    r = a.shape[0]
    if a.shape != (r, n_in) or b.shape != (n_out, r):
        raise AdapterError(
            f"{name}: expected A {(r, n_in)} and B {(n_out, r)} for base weight {(n_out, n_in)}, "
            f"got A {a.shape} and B {b.shape}",
            hint="A is (rank, n_in) and B is (n_out, rank); was the pair swapped or transposed?",
        )
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise AdapterError(f"{name}: the adapter holds NaN or Inf values", hint="the generator diverged; retrain")


def _open(path: str | Path) -> gguf.GGUFReader:
    p = Path(path)
    if not p.is_file():
        raise AdapterError(f"adapter file not found: {p}")
    try:
        reader = gguf.GGUFReader(str(p), "r")
    except Exception as e:
        raise AdapterError(f"{p} is not a readable GGUF file ({type(e).__name__}: {e})",
                           hint="the file is corrupt or truncated; regenerate it") from e
    # GGUFReader maps lazily: make sure every tensor's bytes are really in the file.
    size = p.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise AdapterError(f"{p} is truncated (tensor {t.name} runs past the end)",
                               hint="the write was interrupted; regenerate the adapter")
        if t.tensor_type not in ACCEPTED_TYPES:
            raise AdapterError(f"{p}: tensor {t.name} has unsupported type {t.tensor_type.name}",
                               hint="use F32, F16, BF16 or Q8_0")
    return reader


def _tensor_values(t: gguf.ReaderTensor) -> np.ndarray:
    shape = tuple(int(x) for x in reversed(t.shape))  # numpy order (n_rows, n_cols)
    if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return np.asarray(t.data, dtype=np.float32).reshape(shape)
    return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)


def _kv_str(reader: gguf.GGUFReader, key: str) -> str | None:
    f = reader.fields.get(key)
    if f is None or not f.types or f.types[0] != gguf.GGUFValueType.STRING:
        return None
    return bytes(f.parts[f.data[0]]).decode("utf-8", errors="replace")


def _kv_scalar(reader: gguf.GGUFReader, key: str) -> float | None:
    f = reader.fields.get(key)
    if f is None or not f.data:
        return None
    return f.parts[f.data[0]][0]
