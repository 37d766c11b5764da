"""Every method the evaluation compares, one small class each, all behind one interface.

A method answers `Query`s (one held-out item of a test user + only that user's strictly earlier
items) with a record of raw predictions: log-probabilities over the task's labels (rating / label
tasks) or greedy text (generation). Scores are computed later (stats.py), so records stay valid
when metrics change.

Lifecycle, driven by the runner: `prepare(ctx)` once (raise `Skip` when an input is missing: the
report says why, nothing is faked), then per user `start_user` -> `predict` per query -> `end_user`.

LLM methods: Base, RAG, PAG, AllHistory (prompt-side), MTLoRA, OPPU (trained adapters), P2P and its
controls P2PShuffled (another user's history) and P2PRandom (a random profile vector).
Classic references (no LLM): GlobalMean, UserMean, UserItemBias, LogReg.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from p2p_local import pipeline
from p2p_local.data.format import KINDS, LABELLED_KINDS, Item, TaskCard, User
from p2p_local.engine import default_threads
from p2p_local.errors import BundleError, P2PError


class Skip(Exception):
    """A method (or one user of it) cannot run here; the message says why and what would fix it."""


# --- queries and the shared context ---------------------------------------------------------------
@dataclass
class Query:
    user_id: str
    index: int  # position among this user's queries
    history: list[Item]  # strictly earlier items only
    item: Item  # the held-out item: input is shown, output is the target
    request: pipeline.Request | None = None  # built once, shared by every method (ctx.request): its profile too


@dataclass
class MethodOptions:
    n_ctx: int = 2048
    seed: int = 0
    bundle: str | None = None  # bundle dir/name; None = the default bundle
    mtlora: Path | None = None  # MT-LoRA GGUF; None = default location
    oppu_dir: Path | None = None  # dir of <user_id>.gguf; None = default location
    oppu_train: bool = False  # train missing OPPU adapters (needs torch + trainer/)
    oppu_users: int | None = None  # at most this many users get OPPU (training cost)
    oppu_max_items: int = 0  # OPPU trains on the user's latest N earlier items (0 = all of them, as the paper)
    rag_k: int = 2
    max_tokens: int | None = None  # generation; None = the app's rule (pipeline.generation_settings)
    logreg_users: int = 300  # training users whose samples fit LogReg (profiles cost time)
    branches: int | None = None  # one-line answers: first tokens tried; None = the app's (pipeline.CANDIDATE_BRANCHES)
    copy_margin: float | None = None  # one-line answers: the copy rule's margin; None = the app's (pipeline.COPY_MARGIN)


@dataclass
class EvalContext:
    """What every method may use: the task, training users, evaluated users' queries, the engine."""

    card: TaskCard
    train: list[User]
    users: list[User]  # the evaluated (test) users, in evaluation order
    queries: dict[str, list[Query]]
    options: MethodOptions
    run_dir: Path
    task: str = ""
    log: Any = print
    _engine: Any = None  # pass one in to share it (it is then not closed here)
    _owns_engine: bool = False

    @property
    def engine(self):
        """The base model, loaded on first use (classic references never load it)."""
        if self._engine is None:
            from p2p_local.engine import Engine
            from p2p_local.models import get_spec, prepare_base

            spec = get_spec()
            self._engine = Engine(prepare_base(spec), n_ctx=self.options.n_ctx, sha256=spec.sha256,
                                  seed=self.options.seed)
            self._owns_engine = True
        return self._engine

    def request(self, q: Query) -> pipeline.Request:
        """The query as the route's `Request` (the held-out item as `item`), one per query for every method."""
        if q.request is None:
            q.request = pipeline.Request(self.card, q.item.input, q.history, item=q.item)
        return q.request

    def profile(self, q: Query):
        return self.request(q).profile

    def close(self) -> None:
        if self._engine is not None and self._owns_engine:
            self._engine.close()
        self._engine = None


# --- the app's route (p2p_local.pipeline): the evaluation answers as the user's app does -------------
def make_profile(card: TaskCard, history: list[Item], item: Item):
    return pipeline.make_profile(card, history, item)


render_items = pipeline.render_items


def user_samples(user: User, last_n: int) -> list[tuple[list[Item], Item]]:
    from p2p_lab.data.splits import samples

    return samples(user, last_n=last_n)


# --- engine helpers -------------------------------------------------------------------------------
def label_record(scores: dict[str, Any]) -> dict[str, Any]:
    """An answer's `pipeline.label_scores`, rounded for the result store."""
    return {"lp": [round(float(x), 5) for x in scores["lp"]], "mass": round(scores["mass"], 5),
            "unparseable": scores["unparseable"]}


def target_nll(ctx: EvalContext, prompt: str, item: Item) -> dict[str, Any]:
    """The user's real output, teacher-forced after `prompt` (as trained: the output and its newline):
    summed negative log-likelihood and token count, a low-noise metric beside ROUGE."""
    ids = ctx.engine.tokenize(item.output.strip() + "\n", add_bos=False)
    room = ctx.engine.n_ctx - len(ctx.engine.tokenize(prompt)) - 1
    ids = ids[: max(0, room)]
    if not ids:
        return {}
    lp = ctx.engine.continuation_logprobs(prompt, ids)
    return {"nll_sum": round(float(-lp.sum()), 5), "n_tok": len(ids)}


def reserve_tokens(ctx: EvalContext, request: pipeline.Request) -> int:
    """Tokens kept free after the prompt: the answer (1 label token, or the generation budget)."""
    return ctx.options.max_tokens or pipeline.answer_tokens(ctx.engine, ctx.card, request.text)


def fit_prompt(ctx: EvalContext, request: pipeline.Request, header: str, shots: list[str]) -> tuple[str, int]:
    """The app's `pipeline.fit_prompt` for a query (as the app shows it: `Request.query`), with this run's
    answer budget kept free."""
    return pipeline.fit_prompt(ctx.engine, ctx.card, request.query, header, shots, reserve_tokens(ctx, request))


# --- the interface --------------------------------------------------------------------------------
class Method:
    name = ""
    kinds = KINDS
    description = ""

    def prepare(self, ctx: EvalContext) -> None:
        """Load inputs; raise Skip(reason) when they are missing."""

    def fingerprint(self) -> str:
        """Identifies the inputs (adapter / bundle bytes) so resumed results are never mixed across them."""
        return ""

    def user_fingerprint(self, user: User) -> str:
        """The fingerprint of the inputs one user's results depend on (per-user adapters differ)."""
        return self.fingerprint()

    def excludes(self, user: User) -> str | None:
        """Why this method does not evaluate `user` (checked before stored results are reused), else None."""
        return None

    def start_user(self, ctx: EvalContext, user: User, queries: list[Query]) -> None:
        pass

    def predict(self, ctx: EvalContext, q: Query) -> dict[str, Any]:
        raise NotImplementedError

    def end_user(self, ctx: EvalContext) -> None:
        pass

    def close(self, ctx: EvalContext) -> None:
        pass

    @property
    def notes(self) -> list[str]:
        return []


class LLMMethod(Method, pipeline.Route):
    """A method is the app's route (`pipeline.Route.answer`) with the steps it changes overridden: the prompt
    (RAG, PAG...), the profile (the controls) or the adapter (MT-LoRA, OPPU); the base model unless
    `personalized`."""

    personalized = False
    personalizer: Any = None

    def __init__(self) -> None:
        """Nothing yet: the route is set up in `prepare`, once the run's engine exists."""

    def prepare(self, ctx: EvalContext) -> None:
        pipeline.Route.__init__(self, ctx.engine, self.personalizer, ctx.run_dir / "tmp" / f"{self.name}.gguf")
        self.ctx = ctx
        # The one-line decoding rule (proposals, no parroting) and the change shown: part of every result's key.
        if ctx.options.branches is not None:
            self.branches = ctx.options.branches
        if ctx.options.copy_margin is not None:
            self.copy_margin = ctx.options.copy_margin
        self.decoding = (f"branches={self.branches}:margin={self.copy_margin:g}:diff={ctx.card.diff_chars}"
                         f":ex_diff={ctx.card.example_diff_chars}" if ctx.card.one_line else "")

    def fingerprint(self) -> str:
        return getattr(self, "decoding", "")

    def predict(self, ctx: EvalContext, q: Query) -> dict[str, Any]:
        a = self.answer(ctx.request(q), personalized=self.personalized, seed=ctx.options.seed,
                        max_tokens=ctx.options.max_tokens).finish()
        if ctx.card.kind == "generation":
            rec = {"text": a.text, "unparseable": not a.text, **target_nll(ctx, a.prompt, q.item)}
            if a.candidates:  # every line the answer was chosen among: other rules can be scored offline
                rec["candidates"] = [[c.text, round(c.logprob, 4), c.copy, c.branch] for c in a.candidates]
            return rec
        return label_record(a.scores)

    def close(self, ctx: EvalContext) -> None:
        if hasattr(self, "engine"):
            self.release()


class Base(LLMMethod):
    name = "base"
    description = "the base model, no personalization"



class RAG(Base):
    name = "rag"
    description = "top-k BM25-retrieved history items in the prompt"

    def prompt(self, request: pipeline.Request, p: pipeline.Personalization | None = None) -> str:
        retrieved = list(request.profile.retrieved)[: self.ctx.options.rag_k]
        shots = render_items(self.ctx.card, list(reversed(retrieved)))  # best last: nearest the query, dropped last
        return fit_prompt(self.ctx, request, "", shots)[0]


class PAG(Base):
    name = "pag"
    description = "profile summary + the top-1 retrieved item in the prompt"

    def prompt(self, request: pipeline.Request, p: pipeline.Personalization | None = None) -> str:
        profile = request.profile
        header = f"About this user: {profile.summary}" if profile.summary else ""
        return fit_prompt(self.ctx, request, header, render_items(self.ctx.card, list(profile.retrieved)[:1]))[0]


class AllHistory(Base):
    name = "all-history"
    description = "as many most-recent history items as fit in the context"

    def prompt(self, request: pipeline.Request, p: pipeline.Personalization | None = None) -> str:
        # Only the newest items can fit: render a bounded tail, fit_prompt drops the oldest first.
        tail = request.history[-max(1, self.engine.n_ctx // 8):]
        return fit_prompt(self.ctx, request, "", render_items(self.ctx.card, tail))[0]


class AdapterMethod(LLMMethod):
    """Answers under one GGUF adapter of its own (attached per run or per user), never one made per query."""

    personalized = True

    def load(self, path: Path) -> None:
        """This method's adapter file, loaded in llama.cpp (the one before freed); attached per answer."""
        self.release()
        self._loaded = self.engine.load_adapter(path)

    def personalize(self, request: pipeline.Request, scale: float = 1.0, force: bool = False) -> pipeline.Personalization:
        """The method's own adapter, never one made from the profile."""
        if self._loaded is None:
            raise Skip("no adapter loaded")
        if self.engine.active[0] is not self._loaded:
            self.engine.use(self._loaded, scale)
        return pipeline.Personalization(None, "", self.ctx.card.name, adapter_path=self._loaded.path)


def _file_id(path: Path) -> str:
    st = path.stat()
    return f"{path.name}:{st.st_size}:{int(st.st_mtime)}"


def default_baselines_dir(task: str) -> Path:
    from p2p_local.paths import data_dir

    return data_dir() / "baselines" / task


class MTLoRA(AdapterMethod):
    name = "mt-lora"
    description = "one LoRA trained on all training users (no profile)"

    def prepare(self, ctx: EvalContext) -> None:
        path = ctx.options.mtlora or default_baselines_dir(ctx.task) / "mt-lora.gguf"
        if not Path(path).is_file():
            shipped = _shipped_mtlora()
            hint = f"the shipped one: --mtlora {shipped}" if shipped else (
                f"train one with `python -m trainer.baselines mtlora --task {ctx.task} --out {path}` (needs torch)")
            raise Skip(f"no MT-LoRA adapter at {path}: pass {hint}")
        super().prepare(ctx)
        self.path = Path(path)
        self.load(self.path)

    def fingerprint(self) -> str:
        return _file_id(self.path) + super().fingerprint()


def _shipped_mtlora() -> Path | None:
    """The MT-LoRA adapter that ships beside the default bundle (trained with it), if any."""
    from p2p_local.bundle import find_bundle

    try:
        path = find_bundle() / "mt-lora.gguf"
    except P2PError:
        return None
    return path if path.is_file() else None


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None and importlib.util.find_spec("trainer.baselines") is not None


class OPPU(AdapterMethod):
    name = "oppu"
    description = "one LoRA trained per test user on their own earlier items"

    def prepare(self, ctx: EvalContext) -> None:
        o = ctx.options
        self.dir = Path(o.oppu_dir) if o.oppu_dir else default_baselines_dir(ctx.task) / "oppu"
        self.can_train = o.oppu_train and torch_available()
        have = sorted(self.dir.glob("*.gguf")) if self.dir.is_dir() else []
        if not have and not self.can_train:
            why = ("--oppu-train was given but torch or trainer/ is not installed" if o.oppu_train
                   else "pass --oppu-train to train them (needs torch; slow) or --oppu-dir DIR")
            raise Skip(f"no OPPU adapters in {self.dir}: {why}")
        ids = [u.user_id for u in ctx.users]
        self.allowed = set(ids[: o.oppu_users] if o.oppu_users else ids)
        self.max_items = o.oppu_max_items
        super().prepare(ctx)
        self._notes: list[str] = []
        if o.oppu_users and o.oppu_users < len(ids):
            self._notes.append(f"OPPU limited to the first {o.oppu_users} of {len(ids)} users by id (training cost)")

    def path_for(self, user_id: str) -> Path:
        return self.dir / f"{safe_name(user_id)}.gguf"

    def excludes(self, user: User) -> str | None:
        return None if user.user_id in self.allowed else "outside --oppu-users"

    def start_user(self, ctx: EvalContext, user: User, queries: list[Query]) -> None:
        path = self.path_for(user.user_id)
        if not path.is_file():
            if not self.can_train:
                raise Skip(f"no adapter {path}")
            # Train on the items before the user's first query only (never on a query's answer).
            train_oppu(ctx, user, len(queries[0].history) if queries else len(user.items), path,
                       ctx.options.oppu_max_items)
        self.load(path)

    def end_user(self, ctx: EvalContext) -> None:
        self.release()

    def fingerprint(self) -> str:
        return f"{self.dir}:max_items={self.max_items}" if self.max_items else str(self.dir)

    def user_fingerprint(self, user: User) -> str:
        path = self.path_for(user.user_id)
        return _file_id(path) if path.is_file() else ""

    @property
    def notes(self) -> list[str]:
        return getattr(self, "_notes", [])


def safe_name(user_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", user_id)[:100]


def train_oppu(ctx: EvalContext, user: User, n_items: int, out: Path, max_items: int = 0) -> None:
    """Train one user's LoRA in a subprocess (torch never enters the app's process)."""
    from p2p_local.data.format import write_users_jsonl

    out.parent.mkdir(parents=True, exist_ok=True)
    data = out.with_suffix(".history.jsonl")
    write_users_jsonl(data, [User(user.user_id, user.items[:n_items])])
    cmd = oppu_command(ctx.task, data, out) + (["--max-items", str(max_items)] if max_items else [])
    ctx.log(f"  training OPPU for user {user.user_id} ({n_items} items): {' '.join(cmd)}")
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(default_threads())})  # P2P_THREADS too
    data.unlink(missing_ok=True)
    if proc.returncode != 0 or not out.is_file():
        raise Skip(f"OPPU training failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")


def oppu_command(task: str, history_jsonl: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "trainer.baselines", "oppu", "--task", task,
            "--user-data", str(history_jsonl), "--out", str(out)]


# --- P2P and its controls ----------------------------------------------------------------------------
class P2P(LLMMethod):
    """The app's own route per query: `pipeline.Route.answer` (profile -> `Personalizer` -> GGUF ->
    llama.cpp -> the app's prompt and decoding); the adapter is written to a scratch file, not cached.
    Only the history's source differs from the app's."""

    name = "p2p"
    description = "hypernetwork: the user's profile -> a LoRA in one forward pass, per query"
    personalized = True
    uses_examples = True  # the prompt holds the card's retrieved examples (the run key leaves them out)
    examples = 0

    def prepare(self, ctx: EvalContext) -> None:
        from p2p_local.bundle import Bundle
        from p2p_local.encoder import Encoder

        try:
            bundle = Bundle.load(ctx.options.bundle)
        except BundleError as e:
            raise Skip(f"no hypernetwork bundle: {str(e).splitlines()[0]}") from None
        if bundle.neutral:
            raise Skip(f"bundle {bundle.name} is a neutral stand-in (zero adapter), not a trained hypernetwork")
        try:
            self.personalizer = pipeline.Personalizer(bundle, Encoder.load(), ctx.engine.base)
        except P2PError as e:
            raise Skip(str(e).splitlines()[0]) from None
        self.bundle = bundle
        self.examples = ctx.card.examples if self.uses_examples else 0
        super().prepare(ctx)
        self._rng = np.random.default_rng(ctx.options.seed)

    def fingerprint(self) -> str:
        return self.bundle.sha256[:16] + (f":examples={self.examples}" if self.examples else "") + self.decoding

    def personalization(self, request: pipeline.Request) -> pipeline.Personalization:
        profile = self.profile_for(request)
        return pipeline.Personalization(profile, profile.fingerprint, request.task)

    def profile_for(self, request: pipeline.Request):
        return request.profile

    def end_user(self, ctx: EvalContext) -> None:
        self.release()  # the last query's adapter: detached and freed


class P2PRAG(P2P):
    """P2P's adapter AND the RAG prompt: the user's top-k retrieved items as examples before the query."""

    name = "p2p-rag"
    description = "the P2P adapter plus the top-k BM25-retrieved history items in the prompt"
    uses_examples = False  # its own top-k (rag_k), whatever the card says

    def prepare(self, ctx: EvalContext) -> None:
        if ctx.card.examples == ctx.options.rag_k:
            raise Skip(f"the same as p2p: this task's card already shows the top {ctx.card.examples} BM25 items")
        super().prepare(ctx)

    def prompt(self, request: pipeline.Request, p: pipeline.Personalization | None = None) -> str:
        return RAG.prompt(self, request, p)


class P2PAlone(P2P):
    """P2P's adapter with the query alone: the app's default without the card's retrieved examples."""

    name = "p2p-alone"
    description = "ablation: the P2P adapter without the card's retrieved examples in the prompt"
    uses_examples = False

    def prepare(self, ctx: EvalContext) -> None:
        if not ctx.card.examples:
            raise Skip("the same as p2p: this task's card shows no examples")
        super().prepare(ctx)

    def prompt(self, request: pipeline.Request, p: pipeline.Personalization | None = None) -> str:
        return super().prompt(request, None)


class P2PBefore(P2P):
    """The app's answer before the change was read (issue 23): the query is the files line alone (no diff),
    examples and retrieval by the files, the plain greedy line (no proposals, no copy rule). Today's answer
    on the same queries, for the paired comparison."""

    name = "p2p-before"
    description = "the app's answer before the diff: files-only query and retrieval, plain greedy line"

    def prepare(self, ctx: EvalContext) -> None:
        if not ctx.card.diff_chars:
            raise Skip("the same as p2p: this task's card reads no change")
        self.card = replace(ctx.card, diff_chars=0)
        super().prepare(ctx)
        self.branches = 1
        self.decoding = "before-diff"

    def profile_for(self, request: pipeline.Request):
        return make_profile(self.card, request.history, request.item)

    def prompt(self, request: pipeline.Request, p: pipeline.Personalization | None = None) -> str:
        shots = pipeline.examples(self.card, p.profile if p is not None else None)
        return pipeline.task_prompt(self.engine, self.card, request.text, shots)


class P2PShuffled(P2P):
    name = "p2p-shuffled"
    description = "control: the same hypernetwork fed ANOTHER test user's history (same query)"

    def prepare(self, ctx: EvalContext) -> None:
        super().prepare(ctx)
        ids = [u.user_id for u in ctx.users]
        if len(ids) < 2:
            raise Skip("the shuffled control needs at least 2 test users")
        order = list(np.random.default_rng(ctx.options.seed + 1).permutation(len(ids)))
        # A cyclic shift of a random order: a derangement, nobody is paired with themselves.
        self.partner = {ids[order[i]]: ids[order[(i + 1) % len(ids)]] for i in range(len(ids))}

    def predict(self, ctx: EvalContext, q: Query) -> dict[str, Any]:
        self.q = q  # whose partner's history the profile is made of
        return super().predict(ctx, q)

    def profile_for(self, request: pipeline.Request):
        q, ctx = self.q, self.ctx
        other = ctx.queries[self.partner[q.user_id]]
        if other:
            history = other[min(q.index, len(other) - 1)].history
        else:
            history = next(u.items for u in ctx.users if u.user_id == self.partner[q.user_id])
        return make_profile(ctx.card, history, q.item)


class P2PRandom(P2P):
    name = "p2p-random"
    description = "control: the same hypernetwork fed a random profile (random unit embedding, random features)"
    uses_examples = False  # a random profile has no items to show

    def prepare(self, ctx: EvalContext) -> None:
        super().prepare(ctx)
        # Feature marginals from training samples, so random features have a realistic scale.
        rng = np.random.default_rng(ctx.options.seed + 2)
        pool = ctx.train or ctx.users
        picks = rng.choice(len(pool), size=min(64, len(pool)), replace=False) if pool else []
        feats = []
        for i in picks:
            u = pool[int(i)]
            if len(u.items) >= 2:
                feats.append(np.asarray(make_profile(ctx.card, u.items[:-1], u.items[-1]).features, dtype=np.float64))
        f = np.stack(feats) if feats else np.zeros((1, self.bundle.feature_dim))
        self.mu, self.sd = f.mean(0), f.std(0)

    def personalization(self, request: pipeline.Request) -> pipeline.Personalization:
        emb = self._rng.standard_normal((1, self.bundle.embedding_dim))
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        feats = self.mu + self.sd * self._rng.standard_normal((1, len(self.mu)))
        tensors = self.personalizer.tensors_from(emb.astype(np.float32), feats.astype(np.float32))
        return pipeline.Personalization(None, "random", request.task, tensors=tensors)


# --- classic references (no LLM) ------------------------------------------------------------------------
class Classic(Method):
    kinds = LABELLED_KINDS

    def prepare(self, ctx: EvalContext) -> None:
        if not ctx.train:
            raise Skip("needs training users (none in this data)")
        self.labels = list(ctx.card.labels)
        counts = Counter(it.output for u in ctx.train for it in u.items)
        self.prior = np.array([counts.get(x, 0) for x in self.labels], dtype=np.float64) + 1.0
        self.prior /= self.prior.sum()

    def record(self, p: np.ndarray) -> dict[str, Any]:
        p = np.clip(p, 1e-9, None)
        p = p / p.sum()
        return {"lp": [round(float(x), 5) for x in np.log(p)], "unparseable": False}


class GlobalMean(Classic):
    name = "global-mean"
    description = "reference: the training users' label distribution (its mean / median)"

    def predict(self, ctx: EvalContext, q: Query) -> dict[str, Any]:
        return self.record(self.prior)


class UserMean(Classic):
    name = "user-mean"
    description = "reference: this user's own label distribution, + 1 pseudo-count of the global one"

    def predict(self, ctx: EvalContext, q: Query) -> dict[str, Any]:
        counts = Counter(it.output for it in q.history)
        c = np.array([counts.get(x, 0) for x in self.labels], dtype=np.float64)
        return self.record(c + self.prior)


class UserItemBias(Classic):
    """r = mu + b_user + b_item (regularised biases, Koren 2008): the classic recommender baseline.
    Item biases come from training users only; the user bias from this user's earlier items.
    Its distribution is a discretised Normal with the spread of its own errors on training users."""

    name = "user-item-bias"
    kinds = ("rating",)
    description = "reference: global mean + regularised user and item biases"
    lam_item, lam_user = 25.0, 10.0

    def prepare(self, ctx: EvalContext) -> None:
        super().prepare(ctx)
        self.values = np.array([float(x) for x in self.labels])
        ratings = [(item_key(it), float(it.output)) for u in ctx.train for it in u.items if it.output in self.labels]
        self.mu = float(np.mean([r for _, r in ratings]))
        sums: dict[str, list[float]] = {}
        for key, r in ratings:
            s = sums.setdefault(key, [0.0, 0.0])
            s[0] += r - self.mu
            s[1] += 1
        self.b_item = {k: s / (self.lam_item + n) for k, (s, n) in sums.items()}
        # Residual spread on training users' last items, each predicted from the items before it.
        errs = []
        for u in ctx.train[:500]:
            rated = [it for it in u.items if it.output in self.labels]
            res = [float(it.output) - self.mu - self.b_item.get(item_key(it), 0.0) for it in rated]
            cum = np.concatenate([[0.0], np.cumsum(res)])
            for k in range(max(1, len(rated) - 10), len(rated)):
                b_user = cum[k] / (self.lam_user + k)
                x = np.clip(self.mu + b_user + self.b_item.get(item_key(rated[k]), 0.0), self.values.min(), self.values.max())
                errs.append(float(x) - float(rated[k].output))
        self.sigma = max(float(np.sqrt(np.mean(np.square(errs)))) if errs else 1.0, 0.1)

    def point(self, history: list[Item], item: Item) -> float:
        res = [float(h.output) - self.mu - self.b_item.get(item_key(h), 0.0) for h in history if h.output in self.labels]
        b_user = sum(res) / (self.lam_user + len(res))
        x = self.mu + b_user + self.b_item.get(item_key(item), 0.0)
        return float(np.clip(x, self.values.min(), self.values.max()))

    def predict(self, ctx: EvalContext, q: Query) -> dict[str, Any]:
        x = self.point(q.history, q.item)
        logp = -0.5 * ((self.values - x) / self.sigma) ** 2
        p = np.exp(logp - logp.max())
        rec = self.record(p)
        rec["point"] = round(x, 4)
        return rec


def item_key(item: Item) -> str:
    """What identifies the rated thing across users: meta item_id (converters set it), else the input."""
    iid = item.meta.get("item_id")
    return f"id:{iid}" if iid is not None else item.input


class LogReg(Classic):
    """Multinomial logistic regression on the structured profile features alone (sklearn)."""

    name = "logreg"
    description = "reference: logistic regression on the structured profile features"

    def prepare(self, ctx: EvalContext) -> None:
        super().prepare(ctx)
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        rng = np.random.default_rng(ctx.options.seed + 3)
        users = list(ctx.train)
        if len(users) > ctx.options.logreg_users:
            users = [users[int(i)] for i in rng.choice(len(users), ctx.options.logreg_users, replace=False)]
        X, y = [], []
        for u in users:
            for history, item in user_samples(u, 10):
                if item.output in self.labels:
                    X.append(np.asarray(make_profile(ctx.card, history, item).features, dtype=np.float64))
                    y.append(self.labels.index(item.output))
        if len(set(y)) < 2:
            raise Skip("too few training samples with two or more distinct labels")
        self.model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
        self.model.fit(np.stack(X), np.array(y))
        self.classes = list(self.model.classes_)
        self._notes = [f"fitted on {len(y)} samples of {len(users)} training users"]

    def predict(self, ctx: EvalContext, q: Query) -> dict[str, Any]:
        x = np.asarray(ctx.profile(q).features, dtype=np.float64)[None]
        proba = self.model.predict_proba(x)[0]
        p = np.zeros(len(self.labels))
        p[self.classes] = proba
        return self.record(p)

    @property
    def notes(self) -> list[str]:
        return getattr(self, "_notes", [])


METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (
    Base, RAG, PAG, AllHistory, MTLoRA, OPPU, P2P, P2PAlone, P2PBefore, P2PRAG, P2PShuffled, P2PRandom,
    GlobalMean, UserMean, UserItemBias, LogReg,
)}


def default_methods(kind: str) -> list[str]:
    return [name for name, cls in METHODS.items() if kind in cls.kinds]


@dataclass
class MethodResult:
    """What the runner knows about one method after running it (for the report)."""

    name: str
    status: str = "ok"  # ok | skipped
    reason: str = ""
    fingerprint: str = ""
    skipped_users: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
