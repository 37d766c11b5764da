"""The adapter validator is a superset of llama.cpp's checks, and the adapter cache verifies what it serves.

Each malformed adapter here is one llama.cpp either aborts on (SIGABRT in a GGML assert) or refuses
with no useful message; `validate_adapter` must refuse all of them with an AdapterError and a hint.
`test_llama_cpp_aborts_where_the_validator_refuses` shows, in a child process, that the rank-0 case
really kills the process when the validator is skipped.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest

from p2p_lab.robustness import write_raw_adapter
from p2p_local import paths
from p2p_local.adapter import BaseInfo, validate_adapter, write_adapter
from p2p_local.errors import AdapterError
from p2p_local.store import Store

SHAPES = {f"blk.{i}.{m}.weight": s for i in range(2) for m, s in (("attn_q", (16, 8)), ("attn_v", (4, 8)))}
SHAPES["token_embd.weight"] = (32, 8)  # in the base, but not a LoRA target llama.cpp multiplies as we do
BASE = BaseInfo(arch="gemma3", sha256="ab" * 32, shapes=SHAPES, n_layers=2)
RNG = np.random.default_rng(0)


def ab(rank: int, n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    return (RNG.normal(size=(rank, n_in)).astype(np.float32), RNG.normal(size=(n_out, rank)).astype(np.float32))


def raw(path: Path, tensors: dict[str, np.ndarray], *, kv: dict | None = None, alpha: bool = True) -> Path:
    """An adapter written with gguf directly: files our writer never makes."""
    return write_raw_adapter(path, {}, alpha=4.0 if alpha else None, extra=tensors, kv=kv)


def pairs(rank: int = 2, names=("blk.0.attn_q.weight", "blk.0.attn_v.weight")) -> dict[str, np.ndarray]:
    out = {}
    for n in names:
        a, b = ab(rank, *SHAPES[n])
        out[n + ".lora_a"], out[n + ".lora_b"] = a, b
    return out


def test_a_good_adapter_passes(tmp_path: Path) -> None:
    assert validate_adapter(raw(tmp_path / "a.gguf", pairs()), BASE).rank == 2


@pytest.mark.parametrize(
    "tensors, message",
    [
        # A rank-0 pair among normal ones: passes llama.cpp's shape checks, then GGML_ASSERT aborts.
        ({**pairs(), **{k.replace("blk.0", "blk.1"): v for k, v in pairs(0).items()}}, "rank 0"),
        # Different ranks per pair: llama.cpp takes them; p2p adapters never have them.
        ({**pairs(2), **{k.replace("blk.0", "blk.1"): v for k, v in pairs(3).items()}}, "different ranks"),
        # A rank above min(n_in, n_out) is not a low-rank update.
        (pairs(5, names=("blk.0.attn_v.weight",)), "rank 5 is outside"),
        # A 3-D A: llama.cpp checks ne[0], ne[1] only, then ggml_can_mul_mat aborts.
        ({"blk.0.attn_q.weight.lora_a": np.zeros((2, 2, 8), np.float32),
          "blk.0.attn_q.weight.lora_b": np.zeros((16, 2), np.float32)}, "must be matrices"),
        # Transposed / swapped pair.
        ({"blk.0.attn_q.weight.lora_a": np.zeros((8, 2), np.float32),
          "blk.0.attn_q.weight.lora_b": np.zeros((2, 16), np.float32)}, "transposed"),
        # token_embd exists in the base but is not a target we allow (llama.cpp flips A and B for it).
        (pairs(2, names=("token_embd.weight",)), "no counterpart"),
        # A layer the base does not have.
        ({k.replace("blk.0", "blk.7"): v for k, v in pairs().items()}, "no counterpart"),
        # Double suffix: llama.cpp's replace_all maps it to the base tensor; we refuse the ambiguity.
        ({"blk.0.attn_q.weight.lora_a.lora_a": ab(2, 16, 8)[0],
          "blk.0.attn_q.weight.lora_a.lora_b": ab(2, 16, 8)[1]}, "no counterpart"),
        # NaN in the values.
        ({"blk.0.attn_q.weight.lora_a": np.full((2, 8), np.nan, np.float32),
          "blk.0.attn_q.weight.lora_b": np.zeros((16, 2), np.float32)}, "NaN or Inf"),
        # A tensor that is neither half of a pair nor a norm.
        ({**pairs(), "blk.0.attn_q.weight": np.zeros((16, 8), np.float32)}, "unexpected tensor"),
        # An unsupported tensor type (F64).
        ({"blk.0.attn_q.weight.lora_a": np.zeros((2, 8), np.float64),
          "blk.0.attn_q.weight.lora_b": np.zeros((16, 2), np.float64)}, "unsupported type"),
    ],
    ids=["rank0-mixed", "mixed-ranks", "rank-too-big", "3d", "transposed", "token-embd", "layer-7",
         "double-suffix", "nan", "stray-tensor", "f64"],
)
def test_malformed_adapters_are_refused(tmp_path: Path, tensors: dict, message: str) -> None:
    with pytest.raises(AdapterError, match=message) as e:
        validate_adapter(raw(tmp_path / "bad.gguf", tensors), BASE)
    assert e.value.hint


@pytest.mark.parametrize(
    "kv, message",
    [
        # llama.cpp reads these with asserting getters: a wrong type aborts the process.
        ({"general.alignment": ("uint64", 32)}, "alignment"),
        ({"adapter.alora.invocation_tokens": ("array", ["x"])}, "array of UINT32"),
    ],
)
def test_metadata_of_the_wrong_type_is_refused(tmp_path: Path, kv: dict, message: str) -> None:
    with pytest.raises(AdapterError, match=message):
        validate_adapter(raw(tmp_path / "bad.gguf", pairs(), kv=kv), BASE)


def test_alpha_must_be_a_float32_scalar(tmp_path: Path) -> None:
    path = raw(tmp_path / "bad.gguf", pairs(), alpha=False, kv={"adapter.lora.alpha": ("array", [1.0, 2.0])})
    with pytest.raises(AdapterError, match="adapter.lora.alpha"):
        validate_adapter(path, BASE)


def test_misaligned_tensor_data_is_refused(tmp_path: Path) -> None:
    """Shift the second tensor's recorded offset: gguf.cpp refuses it, so must we (before mapping it)."""
    path = raw(tmp_path / "a.gguf", pairs(names=("blk.0.attn_q.weight",)))
    reader = gguf.GGUFReader(str(path))
    field = reader.tensors[1].field
    offset_at = field.offset + sum(p.nbytes for p in field.parts[:-1])
    data = bytearray(path.read_bytes())
    old = int.from_bytes(data[offset_at:offset_at + 8], "little")
    data[offset_at:offset_at + 8] = (old + 4).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="offset|truncated|not a readable"):
        validate_adapter(path, BASE)


def test_not_regular_files_are_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)
    with pytest.raises(AdapterError, match="not a regular file"):
        validate_adapter(fifo, BASE)  # would block forever if it were opened
    with pytest.raises(AdapterError, match="directory"):
        validate_adapter(tmp_path, BASE)


def test_values_are_checked_after_the_f16_cast(tmp_path: Path) -> None:
    """1e5 is a finite float32 but Inf in float16: the writer must refuse, not write and cache Inf."""
    t = {n: ab(2, *SHAPES[n]) for n in ("blk.0.attn_q.weight",)}
    t["blk.0.attn_q.weight"][1][0, 0] = 1e5
    with pytest.raises(AdapterError, match="NaN or Inf"):
        write_adapter(tmp_path / "a.gguf", t, alpha=4.0, base=BASE, dtype="f16")
    assert not (tmp_path / "a.gguf").exists()
    with pytest.raises(AdapterError, match="magnitude 1e\\+05"):  # finite in float32, but no sane adapter value
        write_adapter(tmp_path / "a.gguf", t, alpha=4.0, base=BASE, dtype="f32")


@pytest.mark.parametrize("alpha, times, problem", [(1e30, 1.0, "LoRA scale"), (4.0, 1e5, "magnitude"),
                                                   (2.0 * 64 + 1, 1.0, "LoRA scale")])
def test_insane_values_are_refused_on_write_and_on_read(tmp_path: Path, alpha: float, times: float,
                                                        problem: str) -> None:
    """alpha 1e30 or weights x1e5 reach llama.cpp as a wrecked model, never as a personalization: refused
    when written, and when a file holding them (written by someone else) is validated before loading."""
    import gguf

    t = {n: ab(2, *SHAPES[n]) for n in ("blk.0.attn_q.weight",)}
    t = {n: (a * times, b) for n, (a, b) in t.items()}
    with pytest.raises(AdapterError, match=problem):
        write_adapter(tmp_path / "a.gguf", t, alpha=alpha, base=BASE, dtype="f32")
    write_adapter(tmp_path / "ok.gguf", {n: ab(2, *SHAPES[n]) for n in t}, alpha=4.0, base=BASE, dtype="f32")
    # The same file with the values planted: what the validator reads before llama.cpp does.
    r = gguf.GGUFReader(tmp_path / "ok.gguf", "r+")
    r.fields["adapter.lora.alpha"].parts[-1][0] = alpha
    for tensor in r.tensors:
        if tensor.name.endswith("lora_a"):
            tensor.data[...] *= times
    del r
    with pytest.raises(AdapterError, match=problem):
        validate_adapter(tmp_path / "ok.gguf", BASE, check_base_hash=False)


@pytest.mark.real
def test_llama_cpp_aborts_where_the_validator_refuses(tmp_path: Path, base_model_path: Path) -> None:
    """The reason for the checks: a rank-0 pair next to a normal one, loaded by llama.cpp with the
    validator skipped, kills the process (SIGABRT). With the validator it is an AdapterError."""
    from p2p_local.models import DEFAULT_BASE

    bad = raw(tmp_path / "rank0.gguf", {
        "blk.0.attn_q.weight.lora_a": np.full((8, 640), 0.01, np.float32),
        "blk.0.attn_q.weight.lora_b": np.full((1024, 8), 0.01, np.float32),
        "blk.1.attn_q.weight.lora_a": np.zeros((0, 640), np.float32),
        "blk.1.attn_q.weight.lora_b": np.zeros((1024, 0), np.float32),
    })
    base = BaseInfo.from_gguf(base_model_path, DEFAULT_BASE.sha256)
    with pytest.raises(AdapterError, match="rank 0"):
        validate_adapter(bad, base)
    child = textwrap.dedent(f"""
        import ctypes, llama_cpp
        llm = llama_cpp.Llama({str(base_model_path)!r}, n_ctx=128, n_threads=1, verbose=False)
        ptr = llama_cpp.llama_adapter_lora_init(llm.model, {str(bad)!r}.encode())
        ptrs = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(ptr)
        llama_cpp.llama_set_adapters_lora(llm.ctx, ptrs, 1, (ctypes.c_float * 1)(1.0))
        llm.reset()
        llm.create_completion("Hello", max_tokens=2)
    """)
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=120,
                          env={**os.environ, "P2P_THREADS": "1"})
    assert proc.returncode < 0, f"llama.cpp survived a rank-0 adapter (rc {proc.returncode})"


# --- the adapter cache --------------------------------------------------------------------------
@pytest.fixture
def store(p2p_home: Path):
    s = Store()
    s.profiles.create_profile("alice", task="t")
    yield s
    s.close()


def cached_file(store: Store, name: str = "fp.gguf") -> Path:
    f = store.adapters.adapter_dir("alice") / name
    f.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    store.adapters.record_adapter("alice", "fp", "b", f)
    return f.resolve()


def test_cache_serves_an_intact_file(store: Store) -> None:
    f = cached_file(store)
    assert store.adapters.cached_adapter("alice", "fp", "b") == f


def test_cache_drops_a_file_with_flipped_bits_with_a_warning(store: Store, caplog) -> None:
    f = cached_file(store)
    data = bytearray(f.read_bytes())
    data[100] ^= 0x10
    f.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert store.adapters.cached_adapter("alice", "fp", "b") is None  # the caller regenerates it
    assert "checksum" in caplog.text and "regenerating" in caplog.text
    assert not f.exists() and store.adapters.all("alice") == []
    f2 = cached_file(store)  # regenerated once: served again
    assert store.adapters.cached_adapter("alice", "fp", "b") == f2


def test_cache_distrusts_rows_without_a_checksum(store: Store) -> None:
    f = cached_file(store)
    store.conn.execute("UPDATE adapters SET sha256 = NULL")  # a row from before upgrade 0003
    assert store.adapters.cached_adapter("alice", "fp", "b") is None
    assert not f.exists()


def test_cache_with_a_directory_in_place_of_the_file(store: Store) -> None:
    f = cached_file(store)
    f.unlink()
    f.mkdir()
    assert store.adapters.cached_adapter("alice", "fp", "b") is None
    assert not f.exists()  # the empty directory is cleared, so the regenerated file can take its place


def test_cache_with_a_missing_file(store: Store) -> None:
    cached_file(store).unlink()
    assert store.adapters.cached_adapter("alice", "fp", "b") is None


def test_checksum_upgrade_applies_to_an_old_store(p2p_home: Path) -> None:
    import sqlite3

    from p2p_local.store.migrations import migrate

    p2p_home.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(p2p_home / "old.sqlite3", isolation_level=None)
    migrate(conn, upto=2)
    assert "sha256" not in {r[1] for r in conn.execute("PRAGMA table_info(adapters)")}
    assert 3 in migrate(conn)
    assert "sha256" in {r[1] for r in conn.execute("PRAGMA table_info(adapters)")}
    conn.close()
    assert paths.data_dir() == p2p_home
