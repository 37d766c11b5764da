"""GGUF LoRA adapter I/O: exact round trips and every malformed file refused before llama.cpp sees it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from p2p_lab.robustness import write_raw_adapter
from p2p_local.adapter import BaseInfo, read_adapter, validate_adapter, write_adapter
from p2p_local.errors import AdapterError

SHAPES = {f"blk.{i}.{m}.weight": s for i in range(2) for m, s in (("attn_q", (16, 8)), ("attn_v", (4, 8)))}
BASE = BaseInfo(arch="gemma3", sha256="ab" * 32, shapes=SHAPES, n_layers=2)


def lora(rank: int = 2, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {n: (rng.normal(size=(rank, n_in)).astype(np.float32), rng.normal(size=(n_out, rank)).astype(np.float32))
            for n, (n_out, n_in) in SHAPES.items()}


def test_f32_round_trip_is_exact(tmp_path: Path) -> None:
    t = lora()
    path = write_adapter(tmp_path / "a.gguf", t, alpha=4.0, base=BASE, dtype="f32", profile_fingerprint="fp1")
    back = validate_adapter(path, BASE)
    assert back.alpha == 4.0 and back.rank == 2 and back.scale == 2.0 and back.arch == "gemma3"
    assert back.meta["p2p.profile.fingerprint"] == "fp1"
    assert back.meta["p2p.base.sha256"] == BASE.sha256
    for name, (a, b) in t.items():
        np.testing.assert_array_equal(back.tensors[name][0], a)
        np.testing.assert_array_equal(back.tensors[name][1], b)


def test_f16_round_trip_within_half_precision(tmp_path: Path) -> None:
    t = lora()
    back = read_adapter(write_adapter(tmp_path / "a.gguf", t, alpha=4.0, base=BASE))
    for name, (a, b) in t.items():
        np.testing.assert_array_equal(back.tensors[name][0], a.astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(back.tensors[name][1], b.astype(np.float16).astype(np.float32))


def test_write_is_atomic_and_leaves_no_temp_file_on_failure(tmp_path: Path) -> None:
    good = write_adapter(tmp_path / "a.gguf", lora(), alpha=4.0, base=BASE)
    before = good.read_bytes()
    bad = lora()
    bad["blk.0.attn_q.weight"] = (bad["blk.0.attn_q.weight"][0], np.full((16, 2), np.nan, np.float32))
    with pytest.raises(AdapterError, match="NaN"):
        write_adapter(good, bad, alpha=4.0, base=BASE)
    assert good.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf"]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: t.update({"blk.9.attn_q.weight": t["blk.0.attn_q.weight"]}), "no counterpart"),
        (lambda t: t.update({"blk.0.attn_q.weight": (t["blk.0.attn_q.weight"][1].T, t["blk.0.attn_q.weight"][0].T)}),
         "swapped or transposed"),
        (lambda t: t.update({"blk.0.attn_v.weight": (t["blk.0.attn_v.weight"][0], np.full((4, 2), np.inf, np.float32))}),
         "NaN or Inf"),
    ],
)
def test_bad_tensors_are_refused_at_write(tmp_path: Path, mutate, message: str) -> None:
    t = lora()
    mutate(t)
    with pytest.raises(AdapterError, match=message):
        write_adapter(tmp_path / "a.gguf", t, alpha=4.0, base=BASE)


def raw_adapter(path: Path, *, alpha=None, arch="gemma3", tensors=None, general_type="adapter") -> Path:
    """Write an adapter with gguf directly, to make files our writer never would."""
    return write_raw_adapter(path, {}, alpha=alpha, arch=arch, alpha_as_int=isinstance(alpha, int), extra=tensors,
                             general_type=general_type)


def pair(name: str = "blk.0.attn_q.weight") -> dict[str, np.ndarray]:
    a, b = lora()[name]
    return {name + ".lora_a": a, name + ".lora_b": b}


def test_integer_alpha_is_refused(tmp_path: Path) -> None:
    path = raw_adapter(tmp_path / "a.gguf", alpha=16, tensors=pair())
    with pytest.raises(AdapterError, match="FLOAT32"):
        validate_adapter(path, BASE)


def test_half_pair_is_refused(tmp_path: Path) -> None:
    a = pair()
    del a["blk.0.attn_q.weight.lora_b"]
    with pytest.raises(AdapterError, match="half a LoRA pair"):
        validate_adapter(raw_adapter(tmp_path / "a.gguf", alpha=4.0, tensors=a), BASE)


def test_other_architecture_and_other_base_are_refused(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="architecture 'llama'"):
        validate_adapter(raw_adapter(tmp_path / "a.gguf", alpha=4.0, arch="llama", tensors=pair()), BASE)
    path = write_adapter(tmp_path / "b.gguf", lora(), alpha=4.0, base=BASE)
    other = BaseInfo(arch="gemma3", sha256="cd" * 32, shapes=SHAPES, n_layers=2)
    with pytest.raises(AdapterError, match="another base model"):
        validate_adapter(path, other)
    validate_adapter(path, other, check_base_hash=False)  # explicit opt-out works


def test_not_an_adapter_truncated_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="not a LoRA adapter"):
        validate_adapter(raw_adapter(tmp_path / "m.gguf", alpha=4.0, general_type="model", tensors=pair()), BASE)
    good = write_adapter(tmp_path / "a.gguf", lora(), alpha=4.0, base=BASE)
    data = good.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 40):  # the last 16 bytes may be alignment padding
        trunc = tmp_path / f"t{cut}.gguf"
        trunc.write_bytes(data[:cut])
        with pytest.raises(AdapterError):
            validate_adapter(trunc, BASE)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 100)
    with pytest.raises(AdapterError, match="not a readable GGUF"):
        validate_adapter(junk, BASE)
    with pytest.raises(AdapterError, match="not found"):
        validate_adapter(tmp_path / "nope.gguf", BASE)
