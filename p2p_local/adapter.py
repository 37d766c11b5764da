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
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from p2p_local import __version__
from p2p_local.errors import AdapterError, P2PError
from p2p_local.files import atomic_write, atomic_write_with
from p2p_local.paths import regular_file

# --- format constants, in the format's own vocabulary -------------------------------------------
KEY_GENERAL_TYPE = gguf.Keys.General.TYPE
KEY_ARCH = gguf.Keys.General.ARCHITECTURE
KEY_ADAPTER_TYPE = gguf.Keys.Adapter.TYPE
KEY_LORA_ALPHA = gguf.Keys.Adapter.LORA_ALPHA
# p2p-local's own metadata (llama.cpp ignores unknown keys).
KEY_BASE_SHA256 = "p2p.base.sha256"
KEY_RANK = "p2p.lora.rank"
KEY_TARGETS = "p2p.lora.targets"
KEY_GENERATOR_NAME = "p2p.generator.name"
KEY_GENERATOR_VERSION = "p2p.generator.version"
KEY_PROFILE_FINGERPRINT = "p2p.profile.fingerprint"
KEY_CREATED = "p2p.created"
KEY_ALIGNMENT = gguf.Keys.General.ALIGNMENT
KEY_ALORA_TOKENS = gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS

SUFFIX_A = ".lora_a"
SUFFIX_B = ".lora_b"
DTYPES = {"f32": np.float32, "f16": np.float16}
ACCEPTED_TYPES = {
    gguf.GGMLQuantizationType.F32,
    gguf.GGMLQuantizationType.F16,
    gguf.GGMLQuantizationType.BF16,
    gguf.GGMLQuantizationType.Q8_0,
}
GGML_MAX_NAME = 64  # ggml.h: tensor names are char[64], NUL included
GGML_MAX_DIMS = 4
# Sane ranges, checked before llama.cpp sees an adapter: the shipped hypernetwork writes alpha / rank = 2
# and values below 0.3; an alpha of 1e30 or weights x1e5 are no personalization, they wreck every answer.
MAX_LORA_SCALE = 64.0  # alpha / rank
MAX_LORA_VALUE = 100.0  # |A|, |B| entries
MAX_ADAPTER_BYTES = 2 << 30  # far above any rank a base of this size allows; bounds what we map
_CORRUPT = "the file is corrupt or was not written by a GGUF LoRA exporter; regenerate it"
# Modules llama.cpp can adapt on the architectures we know (GGUF short names).
TARGET_MODULES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
_TARGET_NAME = re.compile(r"blk\.(0|[1-9][0-9]{0,3})\.(?:" + "|".join(TARGET_MODULES) + r")\.weight")
_TENSOR_NAME = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")


def tensor_name(layer: int, module: str) -> str:
    """The GGUF name of a block's weight: (3, "attn_q") -> "blk.3.attn_q.weight" (the one spelling)."""
    return f"blk.{layer}.{module}.weight"


def parse_tensor_name(name: str) -> tuple[int, str]:
    """ "blk.3.attn_q.weight" -> (3, "attn_q"); anything else is an AdapterError."""
    m = _TENSOR_NAME.match(name)
    if not m:
        raise AdapterError(f"{name!r} is not a per-layer GGUF weight name (blk.N.module.weight)")
    return int(m.group(1)), m.group(2)


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
            atomic_write(cache, json.dumps({"key": key, "arch": info.arch, "n_layers": info.n_layers,
                                            "shapes": info.shapes}))
        except (OSError, P2PError):
            pass  # read-only location: just slower next time
        return info

    @classmethod
    def _read(cls, path: Path, sha256: str) -> BaseInfo:
        try:
            reader = gguf.GGUFReader(str(path), "r")
        except Exception as e:  # truncated / not a GGUF
            raise AdapterError(f"cannot read base model {path}: {e}", hint="the model file is damaged: run `p2p models prepare`") from e
        arch = _kv_str(reader, KEY_ARCH) or "?"
        n_layers = int(_kv_scalar(reader, gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)) or 0)
        shapes = {}
        for t in reader.tensors:
            if len(t.shape) == 2:
                n_in, n_out = (int(x) for x in t.shape)  # GGUF ne order is [n_in, n_out]
                shapes[t.name] = (n_out, n_in)
        return cls(arch=arch, sha256=sha256, shapes=shapes, n_layers=n_layers)


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
    name: str = "",
    task_name: str = "",
    prompt_prefix: str = "",
    base_model: Mapping[str, str] | None = None,
) -> Path:
    """Write a GGUF LoRA adapter atomically (temporary file in the same dir, fsync, rename).

    `tensors` maps base tensor names (e.g. "blk.3.attn_q.weight") to (A, B). Shapes are checked
    against `base` first, so a bad adapter is never written. What the file says it is, as llama.cpp's
    tools read it: `general.name` (`name`, else `generator`), `general.base_model.0.*` (`base_model`:
    name, organization, repo_url, as llama.cpp's converter writes them), `adapter.lora.task_name` and
    `adapter.lora.prompt_prefix` (llama-server's `/lora-adapters` lists them).
    """
    path = Path(path)
    general_name = name or generator  # before the loops below reuse `name`
    if dtype not in DTYPES:
        raise AdapterError(f"unsupported adapter dtype {dtype!r}", hint=f"use one of {sorted(DTYPES)}")
    if not tensors:
        raise AdapterError("an adapter needs at least one (A, B) pair", hint="the generator produced no targets")
    np_dtype = DTYPES[dtype]
    ranks = set()
    targets = set()
    # Check the values as they will be stored: a float32 that overflows float16 becomes Inf in the file.
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, as an AdapterError
        tensors = {name: (np.ascontiguousarray(a, dtype=np_dtype), np.ascontiguousarray(b, dtype=np_dtype))
                   for name, (a, b) in tensors.items()}
    if not (isinstance(alpha, (int, float)) and np.isfinite(alpha) and alpha > 0):
        raise AdapterError(f"alpha must be a positive finite number, got {alpha!r}", hint="check the bundle's alpha")
    for name, (a, b) in tensors.items():
        _check_pair(name, a, b, base)
        ranks.add(a.shape[0])
        targets.add(parse_tensor_name(name)[1] if _TENSOR_NAME.match(name) else name)
    if len(ranks) != 1:
        raise AdapterError(f"all pairs must share one rank, got {sorted(ranks)}", hint="one rank per adapter")
    rank = ranks.pop()
    check_lora_scale(str(path), float(alpha), rank)

    def write(tmp: Path) -> None:
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
        w.add_string(gguf.Keys.General.NAME, general_name)
        if task_name:
            w.add_string(gguf.Keys.Adapter.LORA_TASK_NAME, task_name)
        if prompt_prefix:
            w.add_string(gguf.Keys.Adapter.LORA_PROMPT_PREFIX, prompt_prefix)
        if base_model:
            w.add_uint32(gguf.Keys.General.BASE_MODEL_COUNT, 1)
            for key, value in (("name", gguf.Keys.General.BASE_MODEL_NAME),
                               ("organization", gguf.Keys.General.BASE_MODEL_ORGANIZATION),
                               ("repo_url", gguf.Keys.General.BASE_MODEL_REPO_URL)):
                if base_model.get(key):
                    w.add_string(value.format(id=0), str(base_model[key]))
        for tname in sorted(tensors):
            a, b = tensors[tname]
            w.add_tensor(tname + SUFFIX_A, np.ascontiguousarray(a, dtype=np_dtype))
            w.add_tensor(tname + SUFFIX_B, np.ascontiguousarray(b, dtype=np_dtype))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    atomic_write_with(path, write)
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
        raise AdapterError(f"{path} has no {KEY_LORA_ALPHA}", hint=_CORRUPT)
    if alpha_field.types != [gguf.GGUFValueType.FLOAT32]:
        raise AdapterError(
            f"{path}: {KEY_LORA_ALPHA} must be FLOAT32, found {alpha_field.types[0].name}",
            hint="llama.cpp aborts on a non-float alpha; re-export the adapter",
        )
    alpha = float(alpha_field.contents())
    halves: dict[str, dict[str, np.ndarray]] = {}
    for t in reader.tensors:
        if t.name.endswith(SUFFIX_A):
            halves.setdefault(t.name[: -len(SUFFIX_A)], {})["a"] = _tensor_values(t)
        elif t.name.endswith(SUFFIX_B):
            halves.setdefault(t.name[: -len(SUFFIX_B)], {})["b"] = _tensor_values(t)
        elif t.name.endswith("_norm.weight"):
            continue  # llama.cpp ignores norms in adapters
        else:
            raise AdapterError(f"{path}: unexpected tensor {t.name!r} (not .lora_a/.lora_b)", hint=_CORRUPT)
    tensors = {}
    for name, pair in halves.items():
        if set(pair) != {"a", "b"}:
            raise AdapterError(f"{path}: tensor {name!r} has only half a LoRA pair", hint=_CORRUPT)
        tensors[name] = (pair["a"], pair["b"])
    if not tensors:
        raise AdapterError(f"{path} holds no LoRA tensors", hint=_CORRUPT)
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
        raise AdapterError(f"{path}: alpha must be a positive finite float, got {adapter.alpha}", hint=_CORRUPT)
    for name, (a, b) in adapter.tensors.items():
        _check_pair(name, a, b, base)
    _check_ranks(path, adapter)
    return adapter


def _check_pair(name: str, a: np.ndarray, b: np.ndarray, base: BaseInfo) -> None:
    """One (A, B) pair against the base: an allowed target, llama.cpp's shape checks, a usable rank, finite."""
    _check_target(name, base)
    n_out, n_in = base.shapes[name]
    if a.ndim != 2 or b.ndim != 2:
        raise AdapterError(f"{name}: A and B must be matrices, got {a.shape} and {b.shape}", hint=_CORRUPT)
    r = a.shape[0]
    # llama.cpp: model ne[0] == A ne[0] (n_in), model ne[1] == B ne[1] (n_out), A ne[1] == B ne[0] (rank).
    if a.shape != (r, n_in) or b.shape != (n_out, r):
        raise AdapterError(
            f"{name}: expected A {(r, n_in)} and B {(n_out, r)} for base weight {(n_out, n_in)}, "
            f"got A {a.shape} and B {b.shape}",
            hint="A is (rank, n_in) and B is (n_out, rank); was the pair swapped or transposed?",
        )
    # Rank 0 passes llama.cpp's shape checks, then divides by zero in alpha / rank and trips GGML's
    # asserts on zero-sized tensors; a rank above min(n_in, n_out) is no low-rank update at all.
    if not 1 <= r <= min(n_in, n_out):
        raise AdapterError(f"{name}: rank {r} is outside 1..{min(n_in, n_out)} for base weight {(n_out, n_in)}",
                           hint="the adapter is degenerate; regenerate it")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise AdapterError(f"{name}: the adapter holds NaN or Inf values", hint="the generator diverged; retrain")
    problem = lora_value_problem(a, b)
    if problem:
        raise AdapterError(f"{name}: {problem}", hint="the generator diverged or the file was tampered with; regenerate it")


def lora_value_problem(a: np.ndarray, b: np.ndarray) -> str | None:
    """What is wrong with the size of a pair's values (None: within MAX_LORA_VALUE)."""
    big = max(float(np.abs(a).max(initial=0.0)), float(np.abs(b).max(initial=0.0)))
    return f"a value of magnitude {big:.3g} (sane adapters stay below {MAX_LORA_VALUE:g})" if big > MAX_LORA_VALUE else None


def check_lora_scale(where: str, alpha: float, rank: int) -> None:
    """alpha / rank within MAX_LORA_SCALE (the update's multiplier in llama.cpp)."""
    if not (math.isfinite(alpha) and 0 < alpha / rank <= MAX_LORA_SCALE):
        raise AdapterError(f"{where}: alpha {alpha:g} over rank {rank} is a LoRA scale of {alpha / rank:.3g}, "
                           f"outside (0, {MAX_LORA_SCALE:g}]", hint="regenerate the adapter with a sane alpha")


def _check_target(name: str, base: BaseInfo) -> None:
    """Only the projection weights of a transformer block: what llama.cpp's LoRA path multiplies with."""
    m = _TARGET_NAME.fullmatch(name)
    if name not in base.shapes or m is None:
        raise AdapterError(
            f"adapter tensor {name!r} has no counterpart in the base model ({base.arch})",
            hint=f"the adapter targets modules this base does not have (allowed: {', '.join(TARGET_MODULES)})",
        )
    if base.n_layers and int(m.group(1)) >= base.n_layers:
        raise AdapterError(f"adapter tensor {name!r} is beyond the base's {base.n_layers} layers",
                           hint="the adapter was made for a deeper model")


def _check_ranks(path: str | Path, adapter: LoraAdapter) -> None:
    """p2p adapters have one rank; mixed ranks (degenerate pairs among normal ones) are refused."""
    ranks = {a.shape[0] for a, _ in adapter.tensors.values()}
    if len(ranks) != 1:
        raise AdapterError(f"{path}: pairs have different ranks {sorted(ranks)}", hint="regenerate the adapter")
    check_lora_scale(str(path), adapter.alpha, adapter.rank)


def _open(path: str | Path) -> gguf.GGUFReader:
    """Open an adapter file and check its layout as llama.cpp's gguf loader would, before any value is read."""
    p = regular_file(path, "adapter file", MAX_ADAPTER_BYTES, AdapterError)
    try:
        reader = gguf.GGUFReader(str(p), "r")
    except Exception as e:
        raise AdapterError(f"{p} is not a readable GGUF file ({type(e).__name__}: {e})",
                           hint="the file is corrupt or truncated; regenerate it") from e
    _check_keys(p, reader)
    _check_tensor_layout(p, reader)
    return reader


def _check_keys(p: Path, reader: gguf.GGUFReader) -> None:
    # gguf.cpp asserts (aborts) on an empty key; llama.cpp reads these KVs with asserting getters:
    # a wrong type is an abort there, so each must be exactly a scalar of the type it expects.
    for name in reader.fields:
        if not name:
            raise AdapterError(f"{p} has a metadata key with an empty name", hint=_CORRUPT)
    for key, want in ((KEY_GENERAL_TYPE, gguf.GGUFValueType.STRING), (KEY_ARCH, gguf.GGUFValueType.STRING),
                      (KEY_ADAPTER_TYPE, gguf.GGUFValueType.STRING), (KEY_LORA_ALPHA, gguf.GGUFValueType.FLOAT32),
                      (KEY_ALIGNMENT, gguf.GGUFValueType.UINT32)):
        f = reader.fields.get(key)
        if f is not None and list(f.types) != [want]:
            found = "/".join(t.name for t in f.types) or "nothing"
            raise AdapterError(f"{p}: {key} must be a single {want.name}, found {found}",
                               hint="llama.cpp aborts on this; re-export the adapter")
    tokens = reader.fields.get(KEY_ALORA_TOKENS)
    if tokens is not None and list(tokens.types) != [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32]:
        raise AdapterError(f"{p}: {KEY_ALORA_TOKENS} must be an array of UINT32", hint=_CORRUPT)


def _check_tensor_layout(p: Path, reader: gguf.GGUFReader) -> None:
    """Names, dimensions, types, block sizes, alignment and offsets, as gguf.cpp requires them."""
    size = p.stat().st_size
    align = int(getattr(reader, "alignment", 32) or 32)
    expected = 0  # gguf.cpp: each tensor starts where the previous one's padded data ends
    data_start = None
    for t in reader.tensors:
        if len(t.name.encode("utf-8")) >= GGML_MAX_NAME:
            raise AdapterError(f"{p}: tensor name {t.name[:40]!r}... is longer than llama.cpp allows", hint=_CORRUPT)
        if not 1 <= len(t.shape) <= GGML_MAX_DIMS:
            raise AdapterError(f"{p}: tensor {t.name} has {len(t.shape)} dimensions", hint=_CORRUPT)
        if t.tensor_type not in ACCEPTED_TYPES:
            raise AdapterError(f"{p}: tensor {t.name} has unsupported type {t.tensor_type.name}",
                               hint="use F32, F16, BF16 or Q8_0")
        block = gguf.GGML_QUANT_SIZES[t.tensor_type][0]
        if int(t.shape[0]) % block:
            raise AdapterError(f"{p}: tensor {t.name} has rows of {int(t.shape[0])} values, "
                               f"not a multiple of {t.tensor_type.name}'s block of {block}",
                               hint="Q8_0 needs the rank and the input width to be multiples of 32")
        rel = int(t.field.parts[-1][0])  # offset relative to the data section
        data_start = t.data_offset - rel if data_start is None else data_start
        if rel != expected or t.data_offset - rel != data_start or t.data_offset % align:
            raise AdapterError(f"{p}: tensor {t.name} is at offset {rel}, expected {expected} "
                               f"(alignment {align})", hint=_CORRUPT)
        if t.data_offset + t.n_bytes > size:
            raise AdapterError(f"{p} is truncated (tensor {t.name} runs past the end)",
                               hint="the write was interrupted; regenerate the adapter")
        expected += -(-int(t.n_bytes) // align) * align


def _tensor_values(t: gguf.ReaderTensor) -> np.ndarray:
    shape = tuple(int(x) for x in reversed(t.shape))  # numpy order (n_rows, n_cols)
    if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return np.asarray(t.data, dtype=np.float32).reshape(shape)
    return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)


def _kv_str(reader: gguf.GGUFReader, key: str) -> str | None:
    f = reader.fields.get(key)
    if f is None or f.types != [gguf.GGUFValueType.STRING]:
        return None
    return bytes(f.parts[f.data[0]]).decode("utf-8", errors="replace")  # contents() would raise on bad bytes


def _kv_scalar(reader: gguf.GGUFReader, key: str) -> float | None:
    f = reader.fields.get(key)
    return f.contents() if f is not None and f.data else None
