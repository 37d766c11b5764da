"""`Session`: what the CLI and the chat hold — one engine, one bundle, one encoder, the store, and a
small cache of adapters already loaded into llama.cpp.

Every step from the stored history to the answer is `p2p_local.pipeline.Route.answer` (the route the
evaluation takes too); this module adds the store reads that make its `Request`, the adapter cache, and
the rule that picks the profile and the task when the user names fewer than both (`choose`).
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from p2p_local import pipeline
from p2p_local.bundle import Bundle
from p2p_local.data.format import (
    FREE_CHAT,
    Item,
    TaskCard,
    resolve_task,
)
from p2p_local.encoder import Encoder
from p2p_local.engine import Adapter, Engine
from p2p_local.errors import P2PError, StoreError, UsageError
from p2p_local.models import get_spec, known_models, model_path, prepare_base, prepare_chat_model
from p2p_local.pipeline import Answer, Personalization, Personalizer, Request
from p2p_local.profile import Profile
from p2p_local.store import Store

MAX_LOADED_ADAPTERS = 8  # llama.cpp handles kept alive for instant switching
KEEP_ADAPTER_FILES = 32  # cached adapter files per profile (~0.7 MB each for the default bundle)
__all__ = ["FREE_CHAT", "Answer", "Personalization", "Personalizer", "Session", "choose"]


def choose(store: Store, profile: str | None, task: str | None) -> tuple[str | None, str | None]:
    """The one rule for which profile answers which task (ask, chat, hook): an explicit profile (its own
    task unless one is named); else the only profile holding items of the task (of any task, when none is
    named); none at all: no profile (the base model); else a usage error naming the candidates. `task`:
    a task as `resolve_task` reads it (a card's name, or FREE_CHAT). Returns (profile, task); task None: the
    profile's own task."""
    if profile is not None:
        return store.profiles.get_profile(profile).name, task  # raises StoreError with a "did you mean" hint
    profiles = store.profiles.list_profiles()
    if task is None or task == FREE_CHAT:
        candidates = [p.name for p in profiles]
    else:
        candidates = [p.name for p in profiles if p.task == task or task in store.profiles.task_counts(p.name)]
    if len(candidates) == 1:
        return candidates[0], task
    if not candidates:
        if profiles:  # profiles exist, none for this task: answering from another task's history is wrong
            raise UsageError(f"no profile holds {task} items yet",
                             hint=f"p2p profile import NAME FILE --task {task}   (or --base for the base model)")
        return None, task
    what = f"hold {task} items" if task and task != FREE_CHAT else "exist"
    raise UsageError(f"several profiles {what}: {', '.join(candidates)}", hint="pass --profile NAME (or --base)")


def model_name(engine: Engine) -> str:
    """The name `p2p models list` knows an engine's model file by (its registry name), else the file's name."""
    path = Path(getattr(engine, "model_path", "") or "")
    try:
        return next((n for n, spec in known_models().items() if spec.filename == path.name), path.name)
    except P2PError:  # a damaged registry: the file's name still says which model it is
        return path.name


class _CachedRoute(pipeline.Route):
    """The route with the app's adapter cache: files in the store's adapter folder keyed by the profile's
    fingerprint, and the newest few kept loaded in llama.cpp for instant switching."""

    def __init__(self, session: Session) -> None:
        super().__init__(session.engine, session.personalizer)
        self.session = session
        self.loaded: OrderedDict[Path, Adapter] = OrderedDict()

    @property
    def chat_engine(self) -> Engine | None:  # type: ignore[override]
        return self.session.chat_engine

    def personalize(self, request: Request, scale: float = 1.0, force: bool = False) -> Personalization:
        """The route's step under the profile's lock: a `forget` waits until the adapter file is written,
        recorded and loaded, then removes it (or came first: then the profile is unknown, and nothing is made)."""
        if request.profile_name is None:
            return super().personalize(request, scale, force)
        with self.session.store.profile_lock(request.profile_name):
            return super().personalize(request, scale, force)

    def adapter_file(self, p: Personalization, request: Request, force: bool = False) -> Path:
        store, sha, name = self.session.store, self.session.bundle.sha256, request.profile_name
        cached = None if force or name is None else store.adapters.cached_adapter(name, p.fingerprint, sha)
        if cached is not None:
            p.cached = True
            return cached
        assert name is not None, "the app personalizes stored profiles"
        path = store.adapters.adapter_dir(name) / f"{p.task}-{p.fingerprint[:16]}-{sha[:8]}.gguf"
        self.write(p, path, request.card)
        store.adapters.record_adapter(name, p.fingerprint, sha, path)  # also clears "stale"
        # Query-aware adapters differ per question: keep the newest few files, not one per question ever asked.
        store.adapters.prune_adapters(name, keep=KEEP_ADAPTER_FILES)
        return path

    def attach(self, path: Path, scale: float) -> None:
        adapter = self.loaded.get(path)
        if adapter is None:
            adapter = self.engine.load_adapter(path)
            self.loaded[path] = adapter
            while len(self.loaded) > MAX_LOADED_ADAPTERS:
                _, old = self.loaded.popitem(last=False)
                self.engine.free_adapter(old)
        self.loaded.move_to_end(path)
        self.engine.use(adapter, pipeline.lora_scale(scale))


def _load_side(bundle: str | Path | None, encoder: bool) -> tuple[Bundle, Encoder | None]:
    """What `Session.open` loads beside the base: the bundle, the encoder, and BM25 (the first answer retrieves)."""
    import bm25s  # noqa: F401  (imported here, off the critical path, rather than at the first retrieval)

    return Bundle.load(bundle), Encoder.load() if encoder else None


class Session:
    """The app's working set: engine + bundle + encoder + store.

    Thread-safe, so the chat can personalize and stream from worker threads: each thread gets its own
    SQLite connection to the same store (WAL allows that), and one lock serialises the engine's users.
    """

    threadsafe = True

    def __init__(self, engine: Engine, bundle: Bundle, encoder: Encoder | None, store: Store,
                 chat_engine: Engine | None = None) -> None:
        self.engine, self.bundle, self.encoder = engine, bundle, encoder
        # Free chat on an instruct model of the user's choice (`--model`); None: the base, as before.
        self.chat_engine = chat_engine
        self._store_path = store.path
        self._local = threading.local()
        self._local.store = store
        self._stores = [store]
        # None without an encoder (`ask --base`): such a session answers from the base model only.
        self.personalizer = Personalizer(bundle, encoder, engine.base) if encoder is not None else None
        self.route = _CachedRoute(self)
        self.lock = self.route.lock
        self._model_names: dict[int, str] = {}  # engine id -> its registry name (the registry is read once)

    @classmethod
    def open(cls, *, model: str | None = None, bundle: str | Path | None = None, n_ctx: int = 2048,
             store_path: Path | None = None, chat_model: str | None = None, encoder: bool = True,
             base: Future[Engine] | None = None) -> Session:
        """`model`: the bundle's base (task answers); `chat_model`: an instruct model for free chat; `encoder`:
        False for a session that never personalizes (`ask --base`), which then needs no profile encoder;
        `base`: that base already loading, started by a caller with more to import meanwhile (the commit hook).
        What is cheap to check (the encoder, the bundle) is checked before the base model is assembled."""
        from p2p_local.encoder import check_prepared

        if encoder:
            check_prepared()  # missing: said now, not after half a minute of assembling the base
        spec = get_spec(model)
        # The bundle's and the encoder's ONNX sessions are built (and BM25 imported) while llama.cpp loads the
        # base: native work on two cores, and the commit hook waits for all of it at every `git commit`.
        with ThreadPoolExecutor(1) as pool, contextlib.ExitStack() as undo:  # undo: close what opened on failure
            if base is not None:
                undo.callback(lambda: base.exception() or base.result().close())
            side = pool.submit(_load_side, bundle, encoder)
            if chat_model is not None or (base is None and not model_path(spec).is_file()):
                side.result()  # a broken bundle or encoder is said before a model is assembled (half a minute)
            chat = None
            if chat_model is not None:
                chat_spec, chat_path = prepare_chat_model(chat_model)
                chat = Engine(chat_path, n_ctx=n_ctx, sha256=chat_spec.sha256)
                undo.callback(chat.close)
            engine = base.result() if base is not None else Engine(prepare_base(spec), n_ctx=n_ctx, sha256=spec.sha256)
            undo.callback(engine.close)
            loaded, enc = side.result()
            session = cls(engine, loaded, enc, Store(store_path), chat)
            undo.pop_all()  # the session owns the engines now
            return session

    @property
    def store(self) -> Store:
        """This thread's connection to the profile store."""
        store = getattr(self._local, "store", None)
        if store is None:
            store = self._local.store = Store(self._store_path)
            self._stores.append(store)
        return store

    # --- which model answers ------------------------------------------------------------------------
    def _name(self, engine: Engine) -> str:
        if id(engine) not in self._model_names:
            self._model_names[id(engine)] = model_name(engine)
        return self._model_names[id(engine)]

    @property
    def base_model(self) -> str:
        """The bundle's base: every task answer, and free chat when no chat model is chosen."""
        return self._name(self.engine)

    @property
    def chat_model(self) -> str | None:
        """The instruct model free chat runs on (`--model`, the chat's model picker); None: the base."""
        return self._name(self.chat_engine) if self.chat_engine is not None else None

    def model_of(self, answer: Answer) -> str:
        """The model that answered: the chat model for free chat without an adapter (the route's rule in
        `Route._steps`), else the bundle's base."""
        on_chat = answer.request.free_chat and self.chat_engine is not None and answer.adapter is None
        return self.chat_model if on_chat else self.base_model  # type: ignore[return-value]

    def chat_models(self) -> dict[str, str]:
        """The registered models (`p2p models list`) free chat may run on: name -> description."""
        return {name: spec.description for name, spec in known_models().items()}

    def use_chat_model(self, name: str | None) -> None:
        """Free chat on model `name` from now on (prepared, verified and loaded; the one before closed).
        None or the base's name: free chat on the base. Task answers stay on the base (the bundle's)."""
        engine = None
        if name is not None and name != self.base_model:
            spec, path = prepare_chat_model(name)  # refuses a model without a chat template
            engine = Engine(path, n_ctx=self.engine.n_ctx, sha256=spec.sha256)
            self._model_names[id(engine)] = spec.name
        with self.lock:  # never while an answer runs on the old one
            old, self.chat_engine = self.chat_engine, engine
        if old is not None:
            self._model_names.pop(id(old), None)
            old.close()

    # --- what there is -----------------------------------------------------------------------------
    def task_cards(self) -> dict[str, TaskCard]:
        """Every task's card: the built-in ones and the user's own stored in this data dir."""
        return self.store.task_cards.all()

    def card(self, task: str) -> TaskCard:
        """The task's card by the store's one resolver (`store.task_cards.task_card`: built-in, else the user's own)."""
        return self.store.task_cards.task_card(task)

    def default_task(self, profile: str) -> str:
        """The profile's own task, else the task most of its items belong to."""
        p = self.store.profiles.get_profile(profile)
        known = self.store.task_cards.task_names()
        if p.task in known:
            return p.task
        counts = {t: n for t, n in self.store.profiles.task_counts(profile).items() if t in known}
        if not counts:
            raise StoreError(f"profile {profile!r} has no items of a known task",
                             hint=f"add items with --task one of: {', '.join(known)}")
        return max(counts, key=counts.get)

    def choose(self, profile: str | None, task: str | None) -> tuple[str | None, str]:
        """`choose`'s profile and the task it answers (the profile's own, or free chat without a profile), for
        a task as the user named it (`resolve_task`)."""
        if task is not None:
            card = resolve_task(task, self.card)
            task = FREE_CHAT if card is None else card.name
        profile, task = choose(self.store, profile, task)
        return profile, task or (self.default_task(profile) if profile else FREE_CHAT)

    def history(self, profile: str, task: str) -> tuple[list[Item], int]:
        """The newest items a profile reads (time order) and how many the profile has in all."""
        card = self.card(task)
        rows = self.store.profiles.items(profile, task=task, limit=pipeline.HISTORY_READ)
        items = [pipeline.history_item(card, r.input, r.output, r.time, r.meta) for r in rows]
        return items, self.store.profiles.count_items(profile, task=task)

    def request(self, text: str, profile: str | None, task: str | None, *, personalized: bool = True,
                transcript: list[tuple[str, str]] | None = None, system: str = "") -> Request:
        """What the store knows for this question: the card (`task` as the user named it: `resolve_task`; None:
        the profile's own), the profile's history (when personalized). Free chat has no card, or free chat's
        own when the bundle was trained for it (`free_chat_adapter`); `system` (a conversation's system prompt)
        goes into its `about`, after the profile's summary."""
        card = resolve_task(task, self.card) if task else self.card(self.default_task(profile)) if profile else None
        personalized = personalized and profile is not None
        if card is None and personalized and self.free_chat_adapter():
            card = self.card(FREE_CHAT)
        if card is None:
            about = "\n".join(s for s in (self.about(profile) if personalized else "", system.strip()) if s)
            return Request(None, text, transcript=transcript or (), about=about)
        history, n_total = self.history(profile, card.name) if personalized else ([], None)
        about = system.strip() if card.name == FREE_CHAT else ""
        return Request(card, text, history, n_total, profile, transcript or (), about=about)

    def profile_text(self, profile: str, task: str | None = None, query: str | None = None) -> Profile:
        """The profile as the encoder sees it (summary, retrieved items, exact text, features)."""
        return self.request(query or "", profile, task).profile

    # --- the route ---------------------------------------------------------------------------------
    def answer(self, text: str, *, profile: str | None = None, task: str | None = None, personalized: bool = True,
               scale: float = 1.0, temperature: float = 0.0, max_tokens: int | None = None,
               transcript: list[tuple[str, str]] | None = None, system: str = "", seed: int | None = None) -> Answer:
        """The answer (`pipeline.Route.answer`): with a profile and `personalized`, its adapter attached at
        `scale`. Free chat never attaches a task adapter: the base model answers with the profile's summary
        in the prompt, unless the bundle was trained for free chat. Iterate it to stream; the session lock is
        held until the stream is exhausted or closed (closing cancels). `system`: free chat's system prompt.
        Stronger than x1, a profile without items of the task gets no adapter: the base answers (`Route._steps`)."""
        request = self.request(text, profile, task, personalized=personalized, transcript=transcript, system=system)
        return self.route.answer(request, personalized=personalized and profile is not None, scale=scale,
                                 temperature=temperature, max_tokens=max_tokens, seed=seed)

    def personalize(self, profile: str, task: str | None = None, query: str | None = None,
                    force: bool = False, scale: float = 1.0) -> Personalization:
        """Generate (or reuse) the adapter for a profile and attach it at `scale` (what an answer does first).

        `query` makes the profile query-aware (BM25 retrieval, query-conditional features), as the
        method does; the adapter cache is keyed by the profile fingerprint, so a repeat is free.
        """
        request = self.request(query or "", profile, task)
        if request.card is None:
            raise UsageError("free chat makes no adapter with this bundle (it was not trained for free chat)",
                             hint="name a task: p2p personalize PROFILE --task TASK")
        with self.lock:
            return self.route.personalize(request, scale, force)

    def about(self, profile: str) -> str:
        """What free chat tells the base model about the user: the summary of the profile's own task."""
        try:
            return self.profile_text(profile).summary
        except StoreError:
            return ""

    def free_chat_adapter(self) -> bool:
        """Free chat gets an adapter only from a bundle trained for it (a task adapter answers in its format)."""
        return any(isinstance(t, dict) and t.get("name") == FREE_CHAT for t in self.bundle.manifest.get("tasks", []))

    def close(self) -> None:
        self.route.loaded.clear()
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
