"""`Session`: what the CLI and the chat hold — one engine, one bundle, one encoder, the store, and a
small cache of adapters already loaded into llama.cpp.

Every step from the stored history to the answer is a call into `p2p_local.pipeline` (the route the
evaluation and the trainer take too); this module adds the store, the adapter cache and locking.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from p2p_local import pipeline
from p2p_local.bundle import Bundle
from p2p_local.data.format import Item, TaskCard, builtin_card, builtin_cards, canonical_task
from p2p_local.encoder import Encoder
from p2p_local.engine import Adapter, Engine
from p2p_local.errors import AdapterError, StoreError, UsageError
from p2p_local.models import get_spec, prepare_base, prepare_chat_model
from p2p_local.pipeline import FREE_CHAT, Personalizer
from p2p_local.profile import Profile
from p2p_local.store import Store

MAX_LOADED_ADAPTERS = 8  # llama.cpp handles kept alive for instant switching
KEEP_ADAPTER_FILES = 32  # cached adapter files per profile (~0.7 MB each for the default bundle)
__all__ = ["FREE_CHAT", "Personalizer", "PersonalizeResult", "Session"]


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


class Session:
    """The app's working set: engine + bundle + encoder + store.

    Thread-safe, so the chat can personalize and stream from worker threads: each thread gets its own
    SQLite connection to the same store (WAL allows that), and one lock serialises the engine's users.
    """

    threadsafe = True

    def __init__(self, engine: Engine, bundle: Bundle, encoder: Encoder, store: Store,
                 chat_engine: Engine | None = None) -> None:
        self.engine, self.bundle, self.encoder = engine, bundle, encoder
        # Free chat on an instruct model of the user's choice (`--model`); None: the base, as before.
        self.chat_engine = chat_engine
        self._store_path = store.path
        self._local = threading.local()
        self._local.store = store
        self._stores = [store]
        self.lock = threading.RLock()
        self.last_result: PersonalizeResult | None = None  # what the last personalized answer used
        self.last_finish: str | None = None  # how the last generated answer ended (`pipeline.GuardedStream`)
        self.personalizer = Personalizer(bundle, encoder, engine.base)
        self._loaded: OrderedDict[Path, Adapter] = OrderedDict()
        self._cards = {name: builtin_card(name) for name in builtin_cards()}

    @classmethod
    def open(cls, *, model: str | None = None, bundle: str | Path | None = None, n_ctx: int = 2048,
             store_path: Path | None = None, chat_model: str | None = None) -> Session:
        """`model`: the bundle's base (task answers); `chat_model`: an instruct model for free chat."""
        chat = None
        if chat_model is not None:
            chat_spec, chat_path = prepare_chat_model(chat_model)
            chat = Engine(chat_path, n_ctx=n_ctx, sha256=chat_spec.sha256)
        spec = get_spec(model)
        try:
            engine = Engine(prepare_base(spec), n_ctx=n_ctx, sha256=spec.sha256)
        except BaseException:
            if chat is not None:
                chat.close()
            raise
        try:
            return cls(engine, Bundle.load(bundle), Encoder.load(), Store(store_path), chat)
        except BaseException:
            engine.close()
            if chat is not None:
                chat.close()
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
        task = canonical_task(task)
        if task not in self._cards:
            raise UsageError(f"unknown task {task!r}", hint=f"known tasks: {', '.join(self._cards)}")
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

    def history(self, profile: str, task: str) -> tuple[list[Item], int]:
        """The newest items a profile reads (time order) and how many the profile has in all."""
        card = self.card(task)
        rows = self.store.items(profile, task=task, limit=pipeline.HISTORY_READ)
        items = [pipeline.history_item(card, r.input, r.output, r.time, r.meta) for r in rows]
        return items, self.store.count_items(profile, task=task)

    def profile_text(self, profile: str, task: str | None = None, query: str | None = None) -> Profile:
        """The profile as the encoder sees it (summary, retrieved items, exact text, features)."""
        task = canonical_task(task) if task else self.default_task(profile)
        card = self.card(task)
        history, n_total = self.history(profile, task)
        q = pipeline.query_item(card, query) if query else None
        return pipeline.make_profile(card, history, q, n_total=n_total)

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
        task = canonical_task(task) if task else self.default_task(profile)
        prof = self.profile_text(profile, task, query)
        t1 = time.perf_counter()
        timings = {"profile_ms": (t1 - t0) * 1e3}
        cached = None if force else self.store.cached_adapter(profile, prof.fingerprint, self.bundle.sha256)
        path = cached or self._write(profile, task, prof, timings)
        t2 = time.perf_counter()
        try:
            self._attach(path, scale)
        except AdapterError as e:
            if cached is None:
                raise
            # A cached file that passed its checksum but not the validator (written by an older version):
            # made again once, from the profile, with a warning.
            warnings.warn(f"cached adapter {path.name} was refused ({str(e).splitlines()[0]}); regenerated", stacklevel=2)
            cached = None
            path = self._write(profile, task, prof, timings)
            self._attach(path, scale)
        timings["load_attach_ms"] = (time.perf_counter() - t2) * 1e3
        timings["total_ms"] = (time.perf_counter() - t0) * 1e3
        return PersonalizeResult(adapter_path=path, fingerprint=prof.fingerprint, cached=cached is not None,
                                 neutral=self.bundle.neutral, empty=prof.empty, task=task,
                                 n_items=prof.n_history, timings_ms=timings, profile=prof)

    def _write(self, profile: str, task: str, prof: Profile, timings: dict[str, float]) -> Path:
        """Make the profile's adapter, record it in the cache and keep the newest few files."""
        path = self.store.adapter_dir(profile) / f"{task}-{prof.fingerprint[:16]}-{self.bundle.sha256[:8]}.gguf"
        timings.update(self.personalizer.write(prof, path, self._cards.get(task)))
        self.store.record_adapter(profile, prof.fingerprint, self.bundle.sha256, path)  # also clears "stale"
        # Query-aware adapters differ per question: keep the newest few files, not one per question ever asked.
        self.store.prune_adapters(profile, keep=KEEP_ADAPTER_FILES)
        return path

    def _attach(self, path: Path, scale: float) -> None:
        """Attach at the user's strength `scale` (`pipeline.lora_scale`: x1 is the trained adapter)."""
        adapter = self._loaded.get(path)
        if adapter is None:
            adapter = self.engine.load_adapter(path)
            self._loaded[path] = adapter
            while len(self._loaded) > MAX_LOADED_ADAPTERS:
                _, old = self._loaded.popitem(last=False)
                self.engine.free_adapter(old)
        self._loaded.move_to_end(path)
        self.engine.use(adapter, pipeline.lora_scale(scale))

    # --- answer ------------------------------------------------------------------------------------
    def prompt(self, text: str, task: str | None = None, transcript: list[tuple[str, str]] | None = None,
               about: str = "") -> str:
        """The task card's prompt, or (free chat) a plain transcript after what is known of the user."""
        if task and task != FREE_CHAT:
            return pipeline.task_prompt(self.engine, self.card(task), text)
        return pipeline.chat_prompt(text, transcript or [], about)

    def decoding(self, task: str | None, text: str = "") -> dict:
        """max_tokens and stop strings of a generated answer (`pipeline.generation_settings`)."""
        card = self.card(task) if task and task != FREE_CHAT else None
        return pipeline.generation_settings(self.engine, card, text)

    def label_distribution(self, text: str, task: str) -> dict[str, float]:
        """The model's probabilities over the task's labels (under whatever adapter is attached)."""
        card = self.card(task)
        scores = pipeline.label_scores(self.engine, pipeline.task_prompt(self.engine, card, text),
                                       pipeline.label_token_ids(self.engine, card.labels))
        return dict(zip(card.labels, np.exp(scores["lp"]).tolist(), strict=True))

    def choose_label(self, text: str, task: str) -> str:
        """Rating/label answers are read off the distribution over the labels (`pipeline.decode_label`)."""
        dist = self.label_distribution(text, task)
        return pipeline.decode_label(self.card(task), np.log(np.array(list(dist.values()))))

    def about(self, profile: str) -> str:
        """What free chat tells the base model about the user: the summary of the profile's own task."""
        try:
            return self.profile_text(profile).summary
        except StoreError:
            return ""

    def free_chat_adapter(self) -> bool:
        """Free chat gets an adapter only from a bundle trained for it (a task adapter answers in its format)."""
        return any(isinstance(t, dict) and t.get("name") == FREE_CHAT for t in self.bundle.manifest.get("tasks", []))

    def answer(self, text: str, *, profile: str | None = None, task: str | None = None, personalized: bool = True,
               scale: float = 1.0, temperature: float = 0.0, max_tokens: int | None = None,
               transcript: list[tuple[str, str]] | None = None) -> Iterator[str]:
        """Stream an answer. With a profile and `personalized`, its adapter is attached at `scale`.

        Free chat (no task) never attaches a task adapter: the base model answers with the profile's
        summary in the prompt, unless the bundle was trained for free chat.
        The session lock is held until the stream is exhausted or closed (closing cancels).
        """
        with self.lock:
            yield from self._answer(text, profile, task, personalized, scale, temperature, max_tokens, transcript)

    def _answer(self, text: str, profile: str | None, task: str | None, personalized: bool, scale: float,
                temperature: float, max_tokens: int | None, transcript: list[tuple[str, str]] | None) -> Iterator[str]:
        task = canonical_task(task) if task else (self.default_task(profile) if profile else FREE_CHAT)
        self.last_result, self.last_finish = None, None
        about = ""
        if task == FREE_CHAT:
            if profile and personalized and scale > 0 and self.free_chat_adapter():
                self.last_result = self._personalize(profile, FREE_CHAT, None, False, scale)
            else:
                self.engine.use(None)
                about = self.about(profile) if profile and personalized else ""
        elif profile and personalized and scale > 0:
            self.last_result = self._personalize(profile, task, text, False, scale)
        else:
            self.engine.use(None)
        if task != FREE_CHAT and self.card(task).kind in ("rating", "label"):
            yield self.choose_label(text, task)
            return
        kw = self.decoding(task, text)
        if max_tokens:
            kw["max_tokens"] = max_tokens
        if task == FREE_CHAT and self.chat_engine is not None and self.last_result is None:
            stream = self._chat_model_stream(text, transcript, about, temperature, kw["max_tokens"])
        else:
            stream = pipeline.GuardedStream(self.engine, self.engine.generate(
                self.prompt(text, task, transcript, about), temperature=temperature, **kw))
        yield from stream
        self.last_finish = stream.finish

    def _chat_model_stream(self, text: str, transcript: list[tuple[str, str]] | None, about: str,
                           temperature: float, max_tokens: int) -> pipeline.GuardedStream:
        """Free chat on the chosen instruct model: its chat template, the profile summary as system prompt."""
        messages = pipeline.chat_messages(text, transcript or [], about)
        return pipeline.GuardedStream(self.chat_engine, self.chat_engine.chat(
            messages, max_tokens=max_tokens, temperature=temperature))

    def close(self) -> None:
        self._loaded.clear()
        if self.chat_engine is not None:
            self.chat_engine.close()
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
