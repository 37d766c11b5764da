"""Profile -> encoder -> hypernetwork -> GGUF adapter -> attached to the running base: the whole path.

`Personalizer` is the pure pipeline (no store, no engine state): it turns a `Profile` into adapter
tensors and a file, timing each stage. `Session` is what the CLI and the chat hold: one engine, one
bundle, one encoder, the store, and a small cache of adapters already loaded into llama.cpp.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from p2p_local.adapter import BaseInfo, write_adapter
from p2p_local.bundle import Bundle
from p2p_local.data.format import Item, TaskCard, builtin_card, builtin_cards
from p2p_local.data.metrics import decode_distribution
from p2p_local.encoder import Encoder
from p2p_local.engine import Adapter, Engine
from p2p_local.errors import DataError, StoreError
from p2p_local.models import get_spec, prepare_base
from p2p_local.profile import Profile, build_profile
from p2p_local.store import Store

MAX_LOADED_ADAPTERS = 8  # llama.cpp handles kept alive for instant switching
KEEP_ADAPTER_FILES = 32  # cached adapter files per profile (~0.7 MB each for the default bundle)
FREE_CHAT = "chat"  # the pseudo-task: plain transcript, no task template


@dataclass
class PersonalizeResult:
    """What `personalize` made, and what the user waited for (ms per stage)."""

    adapter_path: Path
    fingerprint: str
    cached: bool
    neutral: bool  # the bundle is the untrained stand-in: the adapter changes nothing
    empty: bool  # the profile had no items: the adapter is the hypernetwork's neutral (population) one
    task: str
    n_items: int
    timings_ms: dict[str, float] = field(default_factory=dict)
    profile: Profile | None = None


class Personalizer:
    """The on-device pipeline, one forward pass per profile. Checks bundle/base/encoder agree up front."""

    def __init__(self, bundle: Bundle, encoder: Encoder, base: BaseInfo) -> None:
        bundle.check(base, encoder)
        self.bundle, self.encoder, self.base = bundle, encoder, base

    def tensors(self, profile: Profile) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, float]]:
        t0 = time.perf_counter()
        emb = self.encoder.embed([profile.text])
        t1 = time.perf_counter()
        (tensors,) = self.bundle.generate(emb, profile.features[None].astype(np.float32))
        t2 = time.perf_counter()
        return tensors, {"encode_ms": (t1 - t0) * 1e3, "hypernet_ms": (t2 - t1) * 1e3}

    def write(self, profile: Profile, path: Path) -> dict[str, float]:
        tensors, timings = self.tensors(profile)
        t0 = time.perf_counter()
        write_adapter(path, tensors, alpha=self.bundle.alpha, base=self.base, dtype="f16",
                      generator=f"p2p-local/{self.bundle.name}", profile_fingerprint=profile.fingerprint)
        timings["write_ms"] = (time.perf_counter() - t0) * 1e3
        return timings


def to_data_items(items: list) -> list[Item]:
    """Store items -> the generic per-user format the profile builder reads (time-ordered)."""
    out = [Item(input=i.input, output=i.output, time=i.time, meta=dict(i.meta or {})) for i in items]
    return sorted(out, key=lambda i: (i.time is None, i.time or 0.0))


class Session:
    """The app's working set: engine + bundle + encoder + store.

    Thread-safe, so the chat can personalize and stream from worker threads: each thread gets its own
    SQLite connection to the same store (WAL allows that), and one lock serialises the engine's users.
    """

    threadsafe = True

    def __init__(self, engine: Engine, bundle: Bundle, encoder: Encoder, store: Store) -> None:
        self.engine, self.bundle, self.encoder = engine, bundle, encoder
        self._store_path = store.path
        self._local = threading.local()
        self._local.store = store
        self._stores = [store]
        self.lock = threading.RLock()
        self.last_result: PersonalizeResult | None = None  # what the last personalized answer used
        self.personalizer = Personalizer(bundle, encoder, engine.base)
        self._loaded: OrderedDict[Path, Adapter] = OrderedDict()
        self._cards = {name: builtin_card(name) for name in builtin_cards()}

    @classmethod
    def open(cls, *, model: str | None = None, bundle: str | Path | None = None, n_ctx: int = 2048,
             store_path: Path | None = None) -> Session:
        spec = get_spec(model)
        engine = Engine(prepare_base(spec), n_ctx=n_ctx, sha256=spec.sha256)
        try:
            return cls(engine, Bundle.load(bundle), Encoder.load(), Store(store_path))
        except BaseException:
            engine.close()
            raise

    @property
    def store(self) -> Store:
        """This thread's connection to the profile store."""
        store = getattr(self._local, "store", None)
        if store is None:
            store = self._local.store = Store(self._store_path)
            self._stores.append(store)
        return store

    # --- what there is -----------------------------------------------------------------------------
    def task_cards(self) -> dict[str, TaskCard]:
        return dict(self._cards)

    def card(self, task: str) -> TaskCard:
        if task not in self._cards:
            raise DataError(f"unknown task {task!r}", hint=f"known tasks: {', '.join(self._cards)}")
        return self._cards[task]

    def profiles(self) -> list:
        return self.store.list_profiles()

    def default_task(self, profile: str) -> str:
        """The profile's own task, else the task most of its items belong to."""
        p = self.store.get_profile(profile)
        if p.task in self._cards:
            return p.task
        counts = {t: n for t, n in self.store.task_counts(profile).items() if t in self._cards}
        if not counts:
            raise StoreError(f"profile {profile!r} has no items of a known task",
                             hint=f"add items with --task one of: {', '.join(self._cards)}")
        return max(counts, key=counts.get)

    def profile_text(self, profile: str, task: str | None = None, query: str | None = None) -> Profile:
        """The profile as the encoder sees it (summary, retrieved items, exact text, features)."""
        task = task or self.default_task(profile)
        history = to_data_items(self.store.items(profile, task=task))
        q = Item(input=query, output="") if query else None
        return build_profile(self.card(task), history, q)

    # --- personalize -------------------------------------------------------------------------------
    def personalize(self, profile: str, task: str | None = None, query: str | None = None,
                    force: bool = False, scale: float = 1.0) -> PersonalizeResult:
        """Generate (or reuse) the adapter for a profile and attach it at `scale`.

        `query` makes the profile query-aware (BM25 retrieval, query-conditional features), as the
        method does; the adapter cache is keyed by the profile fingerprint, so a repeat is free.
        """
        with self.lock:
            return self._personalize(profile, task, query, force, scale)

    def _personalize(self, profile: str, task: str | None, query: str | None, force: bool,
                     scale: float) -> PersonalizeResult:
        t0 = time.perf_counter()
        task = task or self.default_task(profile)
        prof = self.profile_text(profile, task, query)
        t1 = time.perf_counter()
        timings = {"profile_ms": (t1 - t0) * 1e3}
        cached = None if force else self.store.cached_adapter(profile, prof.fingerprint, self.bundle.sha256)
        if cached is not None:
            path = cached
        else:
            path = self.store.adapter_dir(profile) / f"{task}-{prof.fingerprint[:16]}-{self.bundle.sha256[:8]}.gguf"
            timings.update(self.personalizer.write(prof, path))
            self.store.record_adapter(profile, prof.fingerprint, self.bundle.sha256, path)
            self.store.mark_stale(profile, False)
            # Query-aware adapters differ per question: keep the newest few files, not one per question ever asked.
            self.store.prune_adapters(profile, keep=KEEP_ADAPTER_FILES)
        t2 = time.perf_counter()
        self._attach(path, scale)
        timings["load_attach_ms"] = (time.perf_counter() - t2) * 1e3
        timings["total_ms"] = (time.perf_counter() - t0) * 1e3
        return PersonalizeResult(adapter_path=path, fingerprint=prof.fingerprint, cached=cached is not None,
                                 neutral=self.bundle.neutral, empty=prof.empty, task=task,
                                 n_items=prof.n_history, timings_ms=timings, profile=prof)

    def _attach(self, path: Path, scale: float) -> None:
        adapter = self._loaded.get(path)
        if adapter is None:
            adapter = self.engine.load_adapter(path)
            self._loaded[path] = adapter
            while len(self._loaded) > MAX_LOADED_ADAPTERS:
                _, old = self._loaded.popitem(last=False)
                self.engine.free_adapter(old)
        self._loaded.move_to_end(path)
        self.engine.use(adapter, scale)

    # --- answer ------------------------------------------------------------------------------------
    def prompt(self, text: str, task: str | None = None, transcript: list[tuple[str, str]] | None = None) -> str:
        """Prompts for a base model with no chat template: the task card's template, or a plain transcript."""
        if task and task != FREE_CHAT:
            return self.card(task).prompt(text)
        turns = "".join(f"{'User' if role == 'user' else 'Assistant'}: {content}\n"
                        for role, content in (transcript or [])[-6:])
        return f"{turns}User: {text}\nAssistant:"

    def decoding(self, task: str | None, text: str = "", profile: str | None = None) -> dict:
        """Per-task decoding: a label is a token or two; free chat stops at the next turn.

        Generation as evaluated (`eval.methods.generation_setup`): a one-line task (the profile's outputs
        have no line breaks, e.g. commit subjects) stops at the newline; a multi-line one (email
        rewrites, whose paragraphs are separated by blank lines) stops where a new example would begin,
        with room for 1.5x the input. With no outputs to go by, the card's answer header decides
        ("Subject line:" is one line).
        """
        if not task or task == FREE_CHAT:
            return {"max_tokens": 160, "stop": ["\nUser:", "\n\n\n"]}
        card = self.card(task)
        if card.kind in ("rating", "label"):
            return {"max_tokens": 4, "stop": ["\n"]}
        outputs = [i.output.strip() for i in self.store.items(profile, task=task, limit=500)] if profile else []
        if outputs:
            one_line = sum("\n" in o for o in outputs) < 0.05 * len(outputs)
        else:
            one_line = "line" in card.template.split("{input}")[-1].lower()
        if one_line:
            return {"max_tokens": 48, "stop": ["\n"]}
        head = card.template.split("{input}")[0].strip().splitlines()
        stop = (["\n" + head[0]] if head and head[0] else []) + ["\n\n\n"]
        n_in = len(self.engine.tokenize(text, add_bos=False)) if text else 0
        return {"max_tokens": max(96, math.ceil(1.5 * n_in)), "stop": stop}

    def label_distribution(self, text: str, task: str) -> dict[str, float]:
        """The model's probabilities over the task's labels (under whatever adapter is attached)."""
        card = self.card(task)
        probs = np.exp(self.engine.label_logprobs(card.prompt(text), card.labels))
        return dict(zip(card.labels, probs.tolist(), strict=True))

    def choose_label(self, text: str, task: str) -> str:
        """Rating/label answers are read off the distribution over the labels, never free text: the median
        for ratings (the MAE-optimal choice, as in evaluation), the most likely label otherwise."""
        card = self.card(task)
        dist = self.label_distribution(text, task)
        how = "median" if card.kind == "rating" else "argmax"
        return decode_distribution(card, np.array([list(dist.values())]), how)[0]

    def answer(self, text: str, *, profile: str | None = None, task: str | None = None, personalized: bool = True,
               scale: float = 1.0, temperature: float = 0.0, max_tokens: int | None = None,
               transcript: list[tuple[str, str]] | None = None) -> Iterator[str]:
        """Stream an answer. With a profile and `personalized`, its adapter is attached at `scale`.

        The session lock is held until the stream is exhausted or closed (closing cancels).
        """
        with self.lock:
            yield from self._answer(text, profile, task, personalized, scale, temperature, max_tokens, transcript)

    def _answer(self, text: str, profile: str | None, task: str | None, personalized: bool, scale: float,
                temperature: float, max_tokens: int | None, transcript: list[tuple[str, str]] | None) -> Iterator[str]:
        task = task or (self.default_task(profile) if profile else FREE_CHAT)
        self.last_result = None
        if profile and personalized and scale > 0:
            card_task = task if task != FREE_CHAT else self.default_task(profile)
            query = text if task != FREE_CHAT else None
            self.last_result = self._personalize(profile, card_task, query, False, scale)
        else:
            self.engine.use(None)
        if task != FREE_CHAT and self.card(task).kind in ("rating", "label"):
            yield self.choose_label(text, task)
            return
        kw = self.decoding(task, text, profile)
        if max_tokens:
            kw["max_tokens"] = max_tokens
        yield from self.engine.generate(self.prompt(text, task, transcript), temperature=temperature, **kw)

    def close(self) -> None:
        self._loaded.clear()
        self.engine.close()
        for store in self._stores:
            try:
                store.close()
            except Exception:  # a worker thread's connection cannot be closed from here; GC does it
                pass

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
