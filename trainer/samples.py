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

import hashlib
import json
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from p2p_local.data.format import Item, TaskCard, User, builtin_cards
from p2p_local.paths import cache_dir
from p2p_local.pipeline import make_profile
from p2p_local.profile import FEATURE_DIM

CACHE_VERSION = 4  # bump when the sample construction below changes


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
    return item.output if card.kind != "generation" else item.output.strip() + "\n"


def truncate_prompt(ids: list[int], max_tokens: int, keep_head: int = 8) -> list[int]:
    """Cut the middle of an over-long prompt: keep its first `keep_head` tokens (BOS + template head)
    and its end (the part right before the answer)."""
    if len(ids) <= max_tokens:
        return ids
    return ids[:keep_head] + ids[len(ids) - (max_tokens - keep_head):]


def build_samples(
    card: TaskCard,
    users: list[User],
    tokenizer,
    embed: Callable[[list[str]], np.ndarray],
    *,
    items_per_user: int,
    last: bool,
    seed: int,
    max_prompt_tokens: int,
    max_target_tokens: int,
    max_history: int = 0,
    min_history: int = 2,
) -> SampleSet:
    """Samples for `users` (uncached; see `cached_samples`)."""
    rng = np.random.default_rng(seed)
    prompts, targets, uids, texts, feats, labels = [], [], [], [], [], []
    for user in users:
        for i in pick_queries(user, items_per_user, rng, min_history, last):
            query = user.items[i]
            history = user.items[:i] if max_history <= 0 else user.items[max(0, i - max_history):i]
            profile = make_profile(card, history, query)  # the app's route (p2p_local.pipeline)
            p_ids = tokenizer(card.prompt(query.input), add_special_tokens=True)["input_ids"]
            t_ids = tokenizer(target_text(card, query), add_special_tokens=False)["input_ids"]
            if card.kind != "generation":
                t_ids = t_ids[:1]  # the label's first token, as the evaluation scores it
            if not t_ids:
                continue
            prompts.append(truncate_prompt(p_ids, max_prompt_tokens))
            targets.append(t_ids[:max_target_tokens])
            uids.append(user.user_id)
            texts.append(profile.text)
            feats.append(profile.features)
            labels.append(query.output)
    emb = np.asarray(embed(texts), dtype=np.float32) if texts else np.zeros((0, 0), np.float32)
    label_ids = []
    if card.kind != "generation":
        label_ids = [tokenizer(lab, add_special_tokens=False)["input_ids"][0] for lab in card.labels]
    return SampleSet(card.name, card.kind, prompts, targets, uids, emb,
                     np.asarray(feats, dtype=np.float32).reshape(-1, FEATURE_DIM),
                     labels if card.kind != "generation" else [], label_ids, list(card.labels))


def cached_samples(card: TaskCard, users: list[User], tokenizer, encoder, *, split: str, **kw) -> SampleSet:
    """`build_samples` through an on-disk cache keyed by task, users, settings, tokenizer and encoder."""
    key = {
        "v": CACHE_VERSION, "task": card.to_dict(), "split": split, "encoder": encoder.sha256,
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
    samples = build_samples(card, users, tokenizer, encoder.embed, **kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        pickle.dump(samples, f)
    os.replace(tmp, path)
    return samples


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
