"""A second, research profile encoder: the base model's own mean-pooled hidden states (llama.cpp).

Used by the encoder comparison (`make encoders`); the app embeds with MiniLM (`p2p_local.encoder`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from p2p_local.encoder import PREP_HINT
from p2p_local.errors import ModelError
from p2p_local.files import sha256_file


class GemmaEncoder:
    """Mean-pooled last hidden states of a GGUF base model (default: Gemma 3 270M), L2-normalised.

    Same interface as `Encoder`. A decoder's causal hidden states are a weaker sentence embedding than
    MiniLM's, but cost no extra model on disk and see the text with the base model's own tokenizer.
    Texts longer than `n_ctx` tokens are truncated. Cost: llama.cpp marks every token as an output in
    embedding mode, so the 262k-vocabulary head runs on every token: about twice a plain prompt eval
    (~1 s for a 250-token profile on 2 cores, vs ~30 ms for MiniLM). Fine for offline comparisons
    with cached embeddings; not for the interactive path.
    """

    def __init__(self, gguf_path: Path | None = None, n_ctx: int = 1024, threads: int | None = None,
                 sha256: str | None = None) -> None:
        import llama_cpp

        if gguf_path is None:
            from p2p_local.models import DEFAULT_BASE, prepare_base

            gguf_path, sha256 = prepare_base(DEFAULT_BASE), DEFAULT_BASE.sha256  # prepare_base verified it
        self.path = Path(gguf_path)
        if not self.path.is_file():
            raise ModelError(f"base model not found: {self.path}", hint=PREP_HINT)
        self._llm = llama_cpp.Llama(
            str(self.path), embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
            n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,  # mean pooling needs a whole sequence per ubatch
            n_threads=threads or os.cpu_count() or 1, verbose=False,
        )
        self.dim = self._llm.n_embd()
        self.id = f"gguf-mean:{self.path.name}"
        self._sha256 = sha256

    @property
    def sha256(self) -> str:
        if self._sha256 is None:  # hashing 250 MB takes ~0.5 s: only when asked
            self._sha256 = sha256_file(self.path)
        return self._sha256

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("GemmaEncoder.embed takes a list of texts, not a single string")
        # One text per call: llama-cpp-python's batched embed packs sequences up to n_batch tokens.
        rows = [self._llm.embed([t], normalize=True, truncate=True)[0] for t in texts]
        return np.asarray(rows, np.float32).reshape(len(rows), self.dim)

    def close(self) -> None:
        self._llm.close()
