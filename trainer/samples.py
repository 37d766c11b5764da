"""Task data -> training samples: token ids, and the profile (embedding + features) each sample is conditioned on.

A sample is one (user, query item): the prompt is the task card's template around the query's input, the
target the query's output, and the profile is built ONLY from that user's items before the query (the
same `build_profile` the device runs) and embedded by the same ONNX encoder the device runs, so training
sees exactly what deployment sees. Embedding is the slow part, so built sample sets are cached on disk
under cache_dir()/trainer/ (keyed by everything that shapes them).

Targets: rating/label tasks train the label's first token (what the evaluation scores with
`pipeline.label_scores`); generation tasks train the output followed by "\n" (the evaluation stops
one-line tasks at the newline).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from p2p_local.data.format import Item, TaskCard, User, builtin_cards
from p2p_local.files import atomic_open
from p2p_local.paths import cache_dir
from p2p_local.pipeline import (
    PROMPT_SLACK,
    examples,
    fit_prompt,
    make_profile,
    pool_embeddings,
    prompt_input,
    served_query,
)
from p2p_local.profile import FEATURE_DIM

CACHE_MODE = 0o644  # derived from the shared data sets, as before (the umask's default)
CACHE_VERSION = 6  # 6: the commit query is served_query + prompt_input (files + diff). Bump when the sample construction below changes


@dataclass
class TaskSplits:
    card: TaskCard
    train: list[User]
    val: list[User]
    test: list[User]
    ood: list[User]


@dataclass
class SampleSet:
    """Samples of one task and split. Row i of `embeddings`/`features` is sample i's own profile."""

    task: str
    kind: str
    prompt_ids: list[list[int]]
    target_ids: list[list[int]]
    user_ids: list[str]
    embeddings: np.ndarray  # [n, E] float32, L2-normalised
    features: np.ndarray  # [n, F] float32
    labels: list[str] = field(default_factory=list)  # rating/label tasks: the gold label per sample
    label_ids: list[int] = field(default_factory=list)  # rating/label tasks: each label's first token id
    card_labels: list[str] = field(default_factory=list)  # the card's labels, in label_ids' order

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def subset(self, idx: Sequence[int]) -> SampleSet:
        idx = list(idx)
        return SampleSet(self.task, self.kind, [self.prompt_ids[i] for i in idx], [self.target_ids[i] for i in idx],
                         [self.user_ids[i] for i in idx], self.embeddings[idx], self.features[idx],
                         [self.labels[i] for i in idx] if self.labels else [], self.label_ids, self.card_labels)


def task_names(tasks: Sequence[str]) -> list[str]:
    """Expand "all" into every built-in task."""
    out: list[str] = []
    for t in tasks:
        for name in (builtin_cards() if t == "all" else [t]):
            if name not in out:
                out.append(name)
    return out


def load_task(name: str) -> TaskSplits:
    """The task's card and user-disjoint splits (p2p_local.data's loader; converter + split as fallback)."""
    try:
        from p2p_lab.data import load_task as data_load_task  # the data helper's entry point
    except ImportError:
        data_load_task = None
    if data_load_task is not None:
        td = data_load_task(name)
        return TaskSplits(td.card, td.train, td.val, td.test, td.ood)
    from p2p_lab.data.converters import convert
    from p2p_lab.data.splits import split_users
    from p2p_local.data.format import builtin_card

    card = builtin_card(name)
    s = split_users(convert(name).users, card)
    return TaskSplits(card, s.train, s.val, s.test, s.ood)


def pick_queries(user: User, n: int, rng: np.random.Generator, min_history: int = 2, last: bool = False) -> list[int]:
    """Indices of the user's items used as queries: `n` random ones (training) or the last `n` (evaluation)."""
    pos = list(range(min(min_history, len(user.items) - 1), len(user.items)))
    if last or n <= 0 or n >= len(pos):
        return pos[-n:] if n > 0 else pos
    return sorted(rng.choice(pos, size=n, replace=False).tolist())


def target_text(card: TaskCard, item: Item) -> str:
    return item.output if card.labelled else item.output.strip() + "\n"


def truncate_prompt(ids: list[int], max_tokens: int, keep_head: int = 8) -> list[int]:
    """Cut the middle of an over-long prompt: keep its first `keep_head` tokens (BOS + template head)
    and its end (the part right before the answer)."""
    if len(ids) <= max_tokens:
        return ids
    return ids[:keep_head] + ids[len(ids) - (max_tokens - keep_head):]


class PromptTokens:
    """The trainer's tokenizer behind the engine methods `pipeline.fit_prompt` calls, with a context of
    `max_prompt_tokens` (+ the app's slack): the sample's prompt is fitted by the app's own rule."""

    def __init__(self, tokenizer, max_prompt_tokens: int) -> None:
        self.tokenizer, self.n_ctx = tokenizer, max_prompt_tokens + PROMPT_SLACK

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_bos)["input_ids"]

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


def sample_prompt(card: TaskCard, query: Item, profile, tokenizer, max_prompt_tokens: int,
                  prompt_examples: bool) -> str:
    """The text a sample is trained on: the card's prompt around the query; with `prompt_examples`, after
    the card's `examples` (the user's retrieved earlier items), as the app answers (`Route.prompt`)."""
    shots = examples(card, profile) if prompt_examples else []
    text = prompt_input(card, query)  # a commit: its files and compact diff, as the app shows them
    if not shots:
        return card.prompt(text)
    return fit_prompt(PromptTokens(tokenizer, max_prompt_tokens), card, text, shots=shots, reserve=0)[0]


def _user_samples(card: TaskCard, user: User, tokenizer, *, items_per_user: int, last: bool, seed: int,
                  max_prompt_tokens: int, max_target_tokens: int, max_history: int, min_history: int,
                  prompt_examples: bool = False) -> list[tuple]:
    """One user's samples: (prompt ids, target ids, user id, item texts, features, label). The profile is the
    app's (pipeline.make_profile) over the user's items before the query; with `max_history` only the latest
    that many are read (the true count still sets the count feature, as the store's bounded read does)."""
    rng = np.random.default_rng([seed, *user.user_id.encode()])  # per user: independent of worker order
    out = []
    for i in pick_queries(user, items_per_user, rng, min_history, last):
        query = served_query(card, user.items[i])  # as the app is asked: a commit at commit time (no body)
        history = user.items[:i] if max_history <= 0 else user.items[max(0, i - max_history):i]
        profile = make_profile(card, history, query, n_total=i)  # the app's route (p2p_local.pipeline)
        text = sample_prompt(card, query, profile, tokenizer, max_prompt_tokens, prompt_examples)
        p_ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        t_ids = tokenizer(target_text(card, query), add_special_tokens=False)["input_ids"]
        if card.labelled:
            t_ids = t_ids[:1]  # the label's first token, as the evaluation scores it
        if not t_ids:
            continue
        out.append((truncate_prompt(p_ids, max_prompt_tokens), t_ids[:max_target_tokens], user.user_id,
                    profile.item_texts, profile.features, query.output))
    return out


_FORK_STATE: dict = {}


def _worker(chunk: list[User]) -> list[tuple]:
    card, tokenizer, kw = _FORK_STATE["args"]
    return [row for u in chunk for row in _user_samples(card, u, tokenizer, **kw)]


def _fork_map(work: Callable, pieces: list, workers: int) -> Iterator:
    """`work` over `pieces`, results in order: here, or in `workers` forked processes (which inherit
    _FORK_STATE as it is when the pool starts)."""
    if workers <= 1 or len(pieces) < 2:
        yield from map(work, pieces)
        return
    import multiprocessing as mp

    with mp.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(work, pieces)


def _map_users(card: TaskCard, users: list[User], tokenizer, kw: dict, workers: int, log: Callable[[str], None]) -> list[tuple]:
    """Samples of every user, in user order; `workers` forked processes share the profile building."""
    chunks = [users[i:i + 8] for i in range(0, len(users), 8)]
    rows: list[tuple] = []
    t0 = time.time()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _FORK_STATE["args"] = (card, tokenizer, kw)
    try:
        for k, part in enumerate(_fork_map(_worker, chunks, workers), 1):
            rows.extend(part)
            if k % 20 == 0 or k == len(chunks):
                log(f"  [{card.name}] profiles: {min(k * 8, len(users))}/{len(users)} users, {len(rows)} samples, "
                    f"{time.time() - t0:.0f} s")
    finally:
        _FORK_STATE.pop("args", None)
    return rows


def build_samples(
    card: TaskCard,
    users: list[User],
    tokenizer,
    embed_items: Callable[[list[str]], np.ndarray],
    *,
    items_per_user: int,
    last: bool,
    seed: int,
    max_prompt_tokens: int,
    max_target_tokens: int,
    max_history: int = 0,
    min_history: int = 2,
    prompt_examples: bool = False,
    workers: int = 1,
    log: Callable[[str], None] | None = None,
) -> SampleSet:
    """Samples for `users` (uncached; see `cached_samples`). Each profile's items are embedded once per
    distinct text (`embed_items`, the encoder's `embed_each`: one text at a time, so a vector never depends
    on its batch) and pooled with the app's `pool_embeddings`: the embedding equals the device's bit for bit."""
    log = log or (lambda msg: None)
    kw = dict(items_per_user=items_per_user, last=last, seed=seed, max_prompt_tokens=max_prompt_tokens,
              max_target_tokens=max_target_tokens, max_history=max_history, min_history=min_history,
              prompt_examples=prompt_examples)
    rows = _map_users(card, users, tokenizer, kw, workers, log)
    vectors = embed_items(sorted({t for r in rows for t in r[3]})) if rows else {}
    if not isinstance(vectors, dict):
        raise TypeError("embed_items must return {text: vector}")
    emb = (np.concatenate([pool_embeddings(np.stack([vectors[t] for t in r[3]])) for r in rows])
           if rows else np.zeros((0, 0), np.float32))
    label_ids = []
    if card.labelled:
        label_ids = [tokenizer(lab, add_special_tokens=False)["input_ids"][0] for lab in card.labels]
    return SampleSet(card.name, card.kind, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], emb,
                     np.asarray([r[4] for r in rows], dtype=np.float32).reshape(-1, FEATURE_DIM),
                     [r[5] for r in rows] if card.labelled else [], label_ids, list(card.labels))


class ItemVectors:
    """The per-item embedding cache: {text: vector} for one encoder, on disk under cache_dir()/trainer/.
    Every distinct item text is embedded once (`Encoder.embed_each`), in `workers` processes, with progress."""

    def __init__(self, encoder, workers: int = 1, log: Callable[[str], None] | None = None) -> None:
        self.encoder, self.workers = encoder, workers
        self.log = log or (lambda msg: None)
        self.path = cache_dir() / "trainer" / f"items-{encoder.sha256[:16]}.pkl"
        self.table: dict[str, np.ndarray] = {}
        if self.path.is_file():
            try:
                with open(self.path, "rb") as f:
                    self.table = pickle.load(f)
            except (OSError, pickle.UnpicklingError, EOFError):
                self.table = {}

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        missing = [t for t in dict.fromkeys(texts) if t not in self.table]
        if missing:
            self.log(f"  embedding {len(missing)} new item texts ({len(self.table)} cached)")
            self.table.update(zip(missing, _embed_parallel(self.encoder, missing, self.workers, self.log), strict=True))
            with atomic_open(self.path, CACHE_MODE) as f:
                pickle.dump(self.table, f, protocol=pickle.HIGHEST_PROTOCOL)
        return {t: self.table[t] for t in texts}


def _embed_worker(texts: list[str]) -> np.ndarray:
    enc = _FORK_STATE.get("encoder")
    if enc is None:
        from p2p_local.encoder import Encoder

        enc = _FORK_STATE["encoder"] = Encoder.load(threads=1)
    return enc.embed_each(texts)


def _embed_parallel(encoder, texts: list[str], workers: int, log: Callable[[str], None]) -> list[np.ndarray]:
    """`encoder.embed_each` over many texts, in pieces with progress (forked workers load their own encoder,
    one thread each: an ONNX session is not shared across a fork)."""
    pieces = [texts[i:i + 512] for i in range(0, len(texts), 512)]
    out: list[np.ndarray] = []
    t0 = time.time()
    if workers <= 1:
        _FORK_STATE["encoder"] = encoder
    else:
        _FORK_STATE.pop("encoder", None)
    try:
        for k, vecs in enumerate(_fork_map(_embed_worker, pieces, workers), 1):
            out.extend(vecs)
            if k % 10 == 0 or k == len(pieces):
                log(f"  embedded {len(out)}/{len(texts)} item texts, {time.time() - t0:.0f} s")
    finally:
        _FORK_STATE.pop("encoder", None)
    return out


def cached_samples(card: TaskCard, users: list[User], tokenizer, encoder, *, split: str, workers: int = 1,
                   log: Callable[[str], None] | None = None, **kw) -> SampleSet:
    """`build_samples` through an on-disk cache keyed by task, users, settings, tokenizer and encoder."""
    key = {
        "v": CACHE_VERSION, "task": card.keyed_dict(), "split": split, "encoder": encoder.sha256,
        "tokenizer": len(tokenizer), "feature_dim": FEATURE_DIM,
        "users": hashlib.sha256("\n".join(f"{u.user_id}:{len(u.items)}:{u.items[-1].time if u.items else ''}"
                                          for u in users).encode()).hexdigest(),
        **kw,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    path = cache_dir() / "trainer" / f"samples-{card.name}-{split}-{digest}.pkl"
    if path.is_file():
        try:
            with open(path, "rb") as f:
                return pickle.load(f)
        except (OSError, pickle.UnpicklingError, EOFError):
            pass  # a broken cache file is rebuilt
    t0 = time.time()
    samples = build_samples(card, users, tokenizer, ItemVectors(encoder, workers, log), workers=workers, log=log, **kw)
    if log:
        log(f"  [{card.name}/{split}] {len(samples)} samples in {time.time() - t0:.0f} s")
    with atomic_open(path, CACHE_MODE) as f:
        pickle.dump(samples, f, protocol=pickle.HIGHEST_PROTOCOL)
    return samples


def pack_samples(data) -> bytes:
    """(train_sets, val_sets, cards) as compressed bytes for a device that cannot build them: embeddings
    travel as float16 (relative error ~5e-4; the hypernetwork L2-normalises them), the rest as it is."""
    import zlib

    def half(s: SampleSet) -> SampleSet:
        return dataclasses.replace(s, embeddings=s.embeddings.astype(np.float16))

    train_sets, val_sets, cards = data
    raw = pickle.dumps(([half(s) for s in train_sets], [half(s) for s in val_sets], cards),
                       protocol=pickle.HIGHEST_PROTOCOL)
    return zlib.compress(raw, 6)


def unpack_samples(blob: bytes):
    """`pack_samples`' bytes -> (train_sets, val_sets, cards) with float32 embeddings."""
    import zlib

    train_sets, val_sets, cards = pickle.loads(zlib.decompress(blob))
    for s in (*train_sets, *val_sets):
        s.embeddings = s.embeddings.astype(np.float32)
    return train_sets, val_sets, cards


ENCODERS = ("minilm", "gemma-mean")


def load_encoder(name: str = "minilm", threads: int = 0):
    """A profile text encoder: `minilm`, the device's ONNX MiniLM (prepared on first use), or `gemma-mean`,
    the base model's own mean-pooled hidden states through llama.cpp (a second, different encoder for
    the encoder comparison; ~30x slower per profile, so only cached offline runs use it)."""
    from p2p_lab.gemma_encoder import GemmaEncoder
    from p2p_local.encoder import Encoder, prepare_encoder
    from p2p_local.errors import ModelError

    if name == "gemma-mean":
        return GemmaEncoder(n_ctx=512, threads=threads or None)
    if name != "minilm":
        raise ValueError(f"unknown encoder {name!r} ({' | '.join(ENCODERS)})")
    try:
        return Encoder.load()
    except ModelError:
        prepare_encoder()
        return Encoder.load()


def samples_path_hint() -> Path:
    return cache_dir() / "trainer"
