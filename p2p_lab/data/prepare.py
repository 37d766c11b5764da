"""Build and load the prepared task sets: cache_dir()/data/<task>/{train,val,test,ood}.jsonl + card.json + stats.json.

`prepare_task` converts the raw data, splits it by user and writes the set; `load_task` reads it back
(building it first when it is missing or was built by an older version of this code). stats.json is
written last, so a set without it is incomplete and gets rebuilt.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from p2p_lab.data.converters import CONVERTERS, convert
from p2p_lab.data.splits import (
    EVAL_LAST_N,
    Embed,
    RepoSplitConfig,
    SplitConfig,
    count_samples,
    split_by_repo,
    split_users,
)
from p2p_local import paths
from p2p_local.data.format import (
    TaskCard,
    User,
    builtin_card,
    builtin_cards,
    canonical_task,
    card_hash,
    read_users_jsonl,
    write_users_jsonl,
)
from p2p_local.errors import DataError, P2PError
from p2p_local.files import atomic_write

DATA_VERSION = 4  # 4: commits carry their compact diff (meta["diff"], p2p_local.diffs); bump when conversion or splitting changes: cached sets are rebuilt
TASKS: tuple[str, ...] = tuple(CONVERTERS)
SPLITS = ("train", "val", "test", "ood")

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class TaskData:
    card: TaskCard
    train: list[User]
    val: list[User]
    test: list[User]
    ood: list[User]
    stats: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> list[User]:
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}", hint=f"one of {', '.join(SPLITS)}")
        return getattr(self, name)


def task_dir(task: str) -> Path:
    return paths.cache_dir() / "data" / canonical_task(task)


def default_embedder(log: Log = _stderr) -> tuple[Embed | None, str]:
    """The MiniLM profile encoder's `embed`, or (None, reason) when it is not available."""
    try:
        from p2p_local.encoder import Encoder

        enc = Encoder.load()
    except (ImportError, P2PError, OSError) as e:
        reason = str(e).splitlines()[0]
        log(f"  profile encoder not available ({reason}); clustering on profile features instead")
        return None, reason

    def embed(texts: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), 64):  # batches, with progress: ~1k profiles take a while on 2 cores
            out.append(enc.embed(texts[i : i + 64]))
            log(f"  embedded {min(i + 64, len(texts))}/{len(texts)} profiles")
        return np.concatenate(out) if out else np.zeros((0, 384), np.float32)

    return embed, "minilm"


def _split_stats(users: list[User], name: str) -> dict[str, int]:
    last_n = None if name == "train" else EVAL_LAST_N
    return {
        "users": len(users),
        "items": sum(len(u.items) for u in users),
        "samples": sum(count_samples(u, last_n=last_n) for u in users),
    }


def prepare_task(
    task: str,
    seed: int = 0,
    src: Path | None = None,
    embed: Embed | None | str = "auto",
    log: Log = _stderr,
    embed_name: str = "custom",
) -> dict[str, Any]:
    """Convert, split and write one task set. Returns its stats (also written to stats.json).

    `embed="auto"` uses the MiniLM encoder when prepared, else profile features (recorded in stats);
    `embed_name` names a given `embed` in the stats.
    """
    t0 = time.perf_counter()
    card = builtin_card(task)
    log(f"[{task}] converting")
    conv = convert(task, src)
    log(f"[{task}] {len(conv.users)} users, {sum(len(u.items) for u in conv.users)} items")
    encoder = embed_name
    if card.split == "repository":  # the card's rule: whole repositories held out, no clustering, no encoder needed
        embed, encoder = None, "none (repository split)"
        log(f"[{task}] splitting by repository (OOD) and by user")
        sp = split_by_repo(conv.users, RepoSplitConfig(seed=seed))
    else:
        if embed == "auto":
            embed, encoder = default_embedder(log)
        log(f"[{task}] splitting by user (OOD clusters on {'embeddings' if embed else 'features'})")
        sp = split_users(conv.users, card, SplitConfig(seed=seed), embed=embed)
    out = task_dir(task)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stats.json").unlink(missing_ok=True)  # incomplete until written again below
    for name in SPLITS:
        write_users_jsonl(out / f"{name}.jsonl", getattr(sp, name))
    card.save(out / "card.json")
    stats = {
        "version": DATA_VERSION,
        "task": task,
        "seed": seed,
        "card": card_hash(card),
        "sources": sources_fingerprint(src),
        "encoder": encoder if embed else None,  # None: clustered on profile features
        "encoder_unavailable": None if embed else (encoder or "not requested"),
        "conversion": dict(sorted(conv.stats.items())),
        "splits": {name: _split_stats(getattr(sp, name), name) for name in SPLITS},
        "eval_last_n": EVAL_LAST_N,
        "split_info": sp.info,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    atomic_write(out / "stats.json", json.dumps(stats, indent=2) + "\n", mode=0o644)  # as the .jsonl beside it
    s = stats["splits"]
    log(
        f"[{task}] train {s['train']['users']} / val {s['val']['users']} / test {s['test']['users']} / "
        f"ood {s['ood']['users']} users, {stats['seconds']} s -> {out}"
    )
    return stats


def sources_fingerprint(src: Path | None = None) -> str:
    """What the prepared sets are built from, in one hash: every file under the shared data dir (path, size,
    modification time). A set built from the same sources, seed, card and code is current."""
    import hashlib

    root = Path(src) if src is not None else paths.shared_data_dir()
    h = hashlib.sha256()
    for f in sorted(root.rglob("*")) if root.is_dir() else []:
        if f.is_file():
            st = f.stat()
            h.update(f"{f.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def is_current(task: str, seed: int = 0, sources: str | None = None) -> bool:
    """Whether the prepared set of `task` was built by this code from the same sources, seed and card."""
    stats = read_stats(task)
    return bool(stats and stats.get("seed") == seed and stats.get("card") == card_hash(builtin_card(task))
                and stats.get("sources") == (sources or sources_fingerprint()))


def read_stats(task: str) -> dict[str, Any] | None:
    """The stats of a prepared set, or None if it is missing, incomplete or from an older version."""
    p = task_dir(task) / "stats.json"
    try:
        stats = json.loads(p.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if stats.get("version") != DATA_VERSION:
        return None
    return stats


def load_task(task: str, build: bool = True, log: Log = _stderr) -> TaskData:
    """A prepared task set (card + user splits), building it first when missing or stale."""
    task = canonical_task(task)
    stats = read_stats(task)
    if stats is None:
        if not build:
            raise DataError(
                f"task set {task!r} is not prepared", hint=f"run `p2p data prepare --tasks {task}`"
            )
        stats = prepare_task(task, log=log)
    d = task_dir(task)
    # The app's card, not the copy saved with the data: a card changed since (e.g. its `examples`) must
    # reach the evaluation and the trainer as it reaches the app.
    card = builtin_card(task) if task in builtin_cards() else TaskCard.load(d / "card.json")
    splits = {name: read_users_jsonl(d / f"{name}.jsonl") for name in SPLITS}
    return TaskData(card=card, stats=stats, **splits)
