"""Run every method on the same held-out users and queries, resumably, then write the report.

Queries: each evaluated user's last `queries` items (default 10), each with ONLY that user's strictly
earlier items as history (`data.splits.samples`). Every method sees exactly the same queries.
Determinism: greedy decoding, seeded user subset / shuffle pairing / random profiles / bootstrap.

Resumable: after each (method, user) the user's records are appended as one JSON line to
`<out>/runs/<task>-<split>-<key>/results.jsonl` (key = a hash of everything that changes predictions).
A re-run skips (method, user) pairs already there whose inputs (adapter / bundle fingerprint, the
user's data) are unchanged, so an interrupted evaluation continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from p2p_lab.eval.methods import (
    METHODS,
    EvalContext,
    MethodOptions,
    MethodResult,
    Query,
    Skip,
    default_methods,
    user_samples,
)
from p2p_local import pipeline
from p2p_local.data.format import TASK_NAME, Item, TaskCard, User, check_outputs
from p2p_local.errors import DataError, P2PError, UsageError

SPLITS = ("test", "ood", "val", "all")
RECORDS_VERSION = 3  # bump when prompts or stored records change: earlier results are then not reused (2: one route, NLL; 3: the history's case style)
Log = Callable[[str], None]


@dataclass
class EvalConfig:
    task: str | None = None  # a built-in task, or the name for --data/--task-card
    split: str = "test"
    methods: list[str] | None = None  # None = every method that applies to the task kind
    users: int | None = None  # at most this many users (a seeded, prefix-stable subset)
    queries: int = 10
    out: Path = Path("reports")
    data: Path | None = None  # bring-your-own users JSONL (generic format)
    task_card: Path | None = None
    card_fields: dict[str, Any] = field(default_factory=dict)  # the task card with these fields changed (a study)
    seed: int = 0
    bootstrap: int = 1000
    fresh: bool = False  # ignore stored results
    options: MethodOptions = field(default_factory=MethodOptions)
    command: str = ""  # the command line that produced the report


@dataclass
class Loaded:
    card: TaskCard
    train: list[User]
    users: list[User]  # evaluated users, after the subset
    n_split_users: int
    source: str


def _log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- data ------------------------------------------------------------------------------------------
def load(cfg: EvalConfig) -> Loaded:
    """The task card, training users and the evaluated users of the chosen split."""
    if cfg.split not in SPLITS:
        raise DataError(f"unknown split {cfg.split!r}", hint=f"use one of {', '.join(SPLITS)}")
    if cfg.data is not None:
        from p2p_lab.data.splits import SplitConfig, split_users
        from p2p_local.data.format import read_users_jsonl

        if cfg.task_card is None:
            raise DataError("--data needs --task-card (a JSON task card)", hint="see docs/DATA.md")
        if cfg.task is not None and not TASK_NAME.match(cfg.task):  # it names the report files under --out
            raise UsageError(f"--task {cfg.task[:70]!r} is not a task name",
                             hint="use 1-64 letters, digits or . _ @ + - (starting with a letter or digit)")
        card = TaskCard.load(cfg.task_card)
        users = read_users_jsonl(cfg.data)
        check_outputs(card, users, str(cfg.data))  # every user's, before the split and the run
        if cfg.split == "all":
            train, split_list = [], users
        else:
            s = split_users(users, card, SplitConfig(seed=cfg.seed))
            train, split_list = s.train, getattr(s, cfg.split)
        source = str(cfg.data)
        everyone = users
    else:
        from p2p_lab.data import load_task

        if not cfg.task:
            raise DataError("no task given", hint="pass --task NAME (or --data FILE --task-card CARD)")
        if cfg.task_card is not None:
            raise DataError("--task-card goes with --data", hint="drop --task-card, or pass your data with --data")
        td = load_task(cfg.task)
        card = td.card
        train = list(td.train)
        split_list = list(td.test) + list(td.ood) + list(td.val) + train if cfg.split == "all" else list(getattr(td, cfg.split))
        if cfg.split == "all":
            train = []
        source = f"built-in task {cfg.task}"
        everyone = train + split_list
    if cfg.card_fields:  # a study of the card itself (e.g. how much of each example's diff is shown)
        known = set(TaskCard.__dataclass_fields__) - {"name", "kind"}
        if set(cfg.card_fields) - known:
            raise DataError(f"--card-field: no card field {sorted(set(cfg.card_fields) - known)}",
                            hint=f"fields: {', '.join(sorted(known))}")
        card = replace(card, **cfg.card_fields)
        check_outputs(card, everyone, source)  # the changed card's labels
    users = [u for u in split_list if len(u.items) >= 2]  # one item has no earlier history to query with
    if not users:
        raise DataError(f"the {cfg.split} split has no user with 2+ items", hint="try another split or more data")
    return Loaded(card, train, subset(users, cfg.users, cfg.seed), len(users), source)


def subset(users: list[User], n: int | None, seed: int) -> list[User]:
    """A seeded random subset that is prefix-stable (n=10 contains n=5), kept in user-id order."""
    if n is None or n >= len(users):
        return sorted(users, key=lambda u: u.user_id)
    order = np.random.default_rng(seed).permutation(len(users))[:n]
    return sorted((users[int(i)] for i in order), key=lambda u: u.user_id)


def build_queries(users: list[User], n: int, card: TaskCard | None = None) -> dict[str, list[Query]]:
    """Each user's last `n` items as queries, as the app receives them (`pipeline.served_query`: a commit is
    asked at commit time, its files and diff, before any body is written)."""
    def served(item: Item) -> Item:
        return pipeline.served_query(card, item) if card is not None else item

    return {
        u.user_id: [Query(u.user_id, i, history, served(item)) for i, (history, item) in enumerate(user_samples(u, n))]
        for u in users
    }


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_key(cfg: EvalConfig, card: TaskCard, source: str) -> str:
    """The run dir's key: what every method's results depend on. The card's `examples` is left out: only the
    methods that show them depend on it, and their fingerprints carry it (so the others' rows stay valid)."""
    o = cfg.options
    card_d = {k: v for k, v in card.keyed_dict().items() if k != "examples"}  # run dirs made before samples/split stay
    return _hash({"version": RECORDS_VERSION, "card": card_d, "source": source, "split": cfg.split, "queries": cfg.queries,
                  "seed": cfg.seed, "n_ctx": o.n_ctx, "rag_k": o.rag_k, "max_tokens": o.max_tokens,
                  "logreg_users": o.logreg_users})


def user_data_hash(user: User) -> str:
    return _hash(user.to_dict())


# --- stored results ------------------------------------------------------------------------------------
class ResultStore:
    """Append-only JSONL of (method, user) results, one per input fingerprint (adapter / bundle / data):
    a run with a retrained bundle adds rows beside the old ones, and going back to a bundle reuses its rows.
    The last valid line per (method, user, fingerprint, data) wins."""

    def __init__(self, path: Path, fresh: bool = False) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if fresh and path.exists():
            path.unlink()
        self.rows: dict[tuple[str, str, str, str], dict] = {}
        if path.exists():
            text = path.read_text(encoding="utf-8")
            if text and not text.endswith("\n"):  # a line cut by an interruption: end it
                with path.open("a", encoding="utf-8") as fh:
                    fh.write("\n")
            for line in text.splitlines():
                try:
                    row = json.loads(line)
                    self.rows[self._key(row)] = row
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                    continue  # a line cut by an interruption

    @staticmethod
    def _key(row: dict) -> tuple[str, str, str, str]:
        return row["method"], row["user_id"], row.get("fingerprint", ""), row.get("data", "")

    def get(self, method: str, user_id: str, fingerprint: str, data: str) -> dict | None:
        return self.rows.get((method, user_id, fingerprint, data))

    def put(self, row: dict) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
        self.rows[self._key(row)] = row


# --- the run ----------------------------------------------------------------------------------------
@dataclass
class RunOutput:
    report: dict
    paths: list[Path]
    run_dir: Path


def run_eval(cfg: EvalConfig, log: Log = _log_stderr) -> RunOutput:
    """Evaluate, write reports/<task>-<split>.{json,md,png}, and return the report."""
    from p2p_lab.eval import report as report_mod

    started = time.time()
    unknown = [m for m in cfg.methods or [] if m not in METHODS]
    if unknown:  # before loading anything
        raise P2PError(f"unknown method(s): {', '.join(unknown)}", hint=f"known: {', '.join(METHODS)}")
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise UsageError(f"--out {cfg.out} is not a folder", hint="give a folder for the reports (made if missing)")
    loaded = load(cfg)
    card = loaded.card
    task = cfg.task or card.name
    names = cfg.methods or default_methods(card.kind)
    key = run_key(cfg, card, loaded.source)
    run_dir = Path(cfg.out) / "runs" / f"{task}-{cfg.split}-{key}"
    store = ResultStore(run_dir / "results.jsonl", fresh=cfg.fresh)
    (run_dir / "config.json").write_text(json.dumps(
        {"task": task, "split": cfg.split, "queries": cfg.queries, "seed": cfg.seed, "source": loaded.source,
         "options": asdict(cfg.options)}, indent=2, default=str) + "\n")
    queries = build_queries(loaded.users, cfg.queries, loaded.card)
    users = [u for u in loaded.users if queries[u.user_id]]
    n_q = sum(len(queries[u.user_id]) for u in users)
    log(f"eval {task} [{cfg.split}]: {len(users)} of {loaded.n_split_users} users, {n_q} queries, "
        f"methods: {', '.join(names)}\n  run dir {run_dir}")
    ctx = EvalContext(card=card, train=loaded.train, users=users, queries=queries, options=cfg.options,
                      run_dir=run_dir, task=task, log=log)
    results: dict[str, dict[str, dict]] = {}
    meta: dict[str, MethodResult] = {}
    try:
        for name in names:
            m, res = METHODS[name](), MethodResult(name)
            meta[name] = res
            if card.kind not in m.kinds:
                res.status, res.reason = "skipped", f"does not apply to {card.kind} tasks"
                log(f"[{name}] skipped: {res.reason}")
                continue
            try:
                m.prepare(ctx)
            except Skip as e:
                res.status, res.reason = "skipped", str(e)
                log(f"[{name}] skipped: {e}")
                continue
            res.fingerprint = m.fingerprint()
            results[name] = _run_method(ctx, m, res, users, queries, store, log)
            res.notes = m.notes
            m.close(ctx)
    finally:
        engine_info = _engine_info(ctx)
        ctx.close()
    rep = report_mod.build_report(
        card=card, task=task, cfg=cfg, users=users, n_split_users=loaded.n_split_users, n_queries=n_q, results=results,
        meta=meta, source=loaded.source, engine=engine_info, seconds=time.time() - started, run_dir=run_dir,
    )
    paths = report_mod.write_report(rep, Path(cfg.out), log=log)
    return RunOutput(rep, paths, run_dir)


def _engine_info(ctx: EvalContext) -> dict[str, Any] | None:
    e = ctx._engine
    if e is None:
        return None
    return {"model": e.model_path.name, "sha256": e.base.sha256, "n_ctx": e.n_ctx, "n_threads": e.n_threads,
            "n_gpu_layers": e.n_gpu_layers}


def history_lower_share(history: list) -> float | None:
    """Share of the latest history outputs (the profile's window) that open in lower case."""
    from p2p_local.profile import MAX_SUMMARY_ITEMS, starts_lowercase

    outs = [it.output.strip() for it in history[-MAX_SUMMARY_ITEMS:] if it.output.strip()]
    return sum(starts_lowercase(o) for o in outs) / len(outs) if outs else None


def _run_method(ctx: EvalContext, m, res: MethodResult, users: list[User], queries: dict[str, list[Query]],
                store: ResultStore, log: Log) -> dict[str, dict]:
    out: dict[str, dict] = {}
    t0 = time.time()
    done_new = 0
    reused = 0
    for k, user in enumerate(users, start=1):
        qs = queries[user.user_id]
        why = m.excludes(user)
        if why:  # e.g. beyond --oppu-users: not evaluated, even where an earlier run stored a result
            res.skipped_users[user.user_id] = why
            continue
        fp = m.user_fingerprint(user)
        data = user_data_hash(user)
        row = store.get(m.name, user.user_id, fp, data)
        if row is None:
            ts = time.time()
            try:
                m.start_user(ctx, user, qs)
                records = []
                for q in qs:
                    rec = m.predict(ctx, q)
                    rec.update(i=q.index, n_hist=len(q.history), target=q.item.output)
                    if ctx.card.kind == "generation":  # the history's case style (stats: case_hist)
                        rec["hist_lower"] = history_lower_share(q.history)
                        earlier = {pipeline.copy_key(it.output) for it in q.history}
                        rec["copy"] = pipeline.copy_key(rec.get("text") or "") in earlier  # an earlier output, verbatim
                        rec["real_copy"] = pipeline.copy_key(q.item.output) in earlier  # the user's own rate
                    records.append(rec)
            except Skip as e:
                res.skipped_users[user.user_id] = str(e)
                continue
            finally:
                m.end_user(ctx)
            row = {"method": m.name, "user_id": user.user_id, "fingerprint": m.user_fingerprint(user),
                   "data": data, "n_items": len(user.items), "records": records,
                   "seconds": round(time.time() - ts, 3)}
            store.put(row)
            done_new += 1
        else:
            reused += 1
        out[user.user_id] = row
        _progress(log, m.name, k, len(users), t0, done_new, reused)
    return out


def _progress(log: Log, name: str, k: int, n: int, t0: float, done_new: int, reused: int) -> None:
    """One line per ~10% of users (and the last); an ETA from the users computed in this session."""
    step = max(1, n // 10)
    if k % step and k != n:
        return
    elapsed = time.time() - t0
    eta = elapsed / done_new * (n - k) if done_new else 0.0
    extra = f", {reused} from earlier runs" if reused else ""
    log(f"[{name}] {k}/{n} users ({elapsed:.0f} s{extra}" + (f", ~{eta:.0f} s left)" if k < n else ")"))
