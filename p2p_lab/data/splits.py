"""User-disjoint splits and (history, query) samples.

- `split_users`: a seeded random train/val/test split by user, plus an out-of-distribution (OOD)
  test split made of whole small, isolated k-means clusters of users (clustered on profile
  embeddings, or on the structured profile features when no encoder is available).
- `samples`: for each query item, the history is the user's items strictly before it (earlier time,
  or earlier position when times tie or are missing); never the query itself or anything later.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from p2p_local.data.format import Item, TaskCard, User

EVAL_LAST_N = 10  # evaluation: each held-out user's last 10 items, each with only earlier items as profile

Embed = Callable[[list[str]], np.ndarray]


def samples(
    user: User, last_n: int | None = None, min_history: int = 1, max_history: int | None = None
) -> list[tuple[list[Item], Item]]:
    """(history, query) pairs, oldest query first. `last_n` keeps the last n queries; `max_history`
    keeps only the most recent earlier items in each history (bounded memory for huge users)."""
    items = user.items
    start = max(min_history, 0)
    if last_n is not None:
        start = max(start, len(items) - last_n)
    out = []
    for i in range(start, len(items)):
        lo = 0 if max_history is None else max(0, i - max_history)
        out.append((items[lo:i], items[i]))
    return out


def eval_samples(user: User, n: int = EVAL_LAST_N) -> list[tuple[list[Item], Item]]:
    """The evaluation samples of a held-out user: their last n items."""
    return samples(user, last_n=n)


def count_samples(user: User, last_n: int | None = None, min_history: int = 1) -> int:
    start = max(min_history, 0)
    if last_n is not None:
        start = max(start, len(user.items) - last_n)
    return max(0, len(user.items) - start)


@dataclass
class SplitConfig:
    seed: int = 0
    test_frac: float = 0.2
    val_frac: float = 0.1
    ood_frac: float = 0.1  # target share of users held out as whole OOD clusters
    n_clusters: int | None = None  # default: clamp(round(sqrt(n_users / 2)), 4, 20)
    min_users_for_ood: int = 20


@dataclass
class Splits:
    train: list[User]
    val: list[User]
    test: list[User]
    ood: list[User]
    info: dict[str, Any] = field(default_factory=dict)


def profile_texts(card: TaskCard, users: list[User]) -> list[str]:
    """One whole-history profile text per user (what clustering embeds)."""
    from p2p_local.profile import build_profile

    return [build_profile(card, u.items).text for u in users]


def profile_features(card: TaskCard, users: list[User]) -> np.ndarray:
    from p2p_local.profile import build_profile

    return np.stack([build_profile(card, u.items).features for u in users])


def _ood_clusters(x: np.ndarray, cfg: SplitConfig) -> tuple[np.ndarray, list[int], dict[str, Any]]:
    """k-means labels, the held-out cluster ids and a record of why they were chosen."""
    from sklearn.cluster import KMeans

    n = len(x)
    k = cfg.n_clusters or int(np.clip(round(math.sqrt(n / 2)), 4, 20))
    k = min(k, n)
    km = KMeans(n_clusters=k, n_init=10, random_state=cfg.seed).fit(x)
    labels, cent = km.labels_, km.cluster_centers_
    sizes = np.bincount(labels, minlength=k)
    # Isolation: distance to the nearest other centroid over the cluster's own mean radius.
    d = np.linalg.norm(cent[:, None, :] - cent[None, :, :], axis=-1)
    np.fill_diagonal(d, np.inf)
    radius = np.array([np.linalg.norm(x[labels == c] - cent[c], axis=1).mean() for c in range(k)])
    # A singleton (or tiny, tight) cluster has radius ~0: floor it at the median so ratios stay sane.
    radius = np.maximum(radius, np.median(radius[sizes > 1]) if (sizes > 1).any() else 1.0)
    isolation = d.min(axis=1) / (radius + 1e-9)
    target = max(1, round(cfg.ood_frac * n))
    chosen: list[int] = []
    total = 0
    for c in sorted(range(k), key=lambda c: (-isolation[c], c)):  # most isolated first
        if total >= target:
            break
        if total + sizes[c] <= math.ceil(1.25 * target):  # only small clusters fit
            chosen.append(int(c))
            total += int(sizes[c])
    if not chosen:  # every cluster is bigger than the budget: take the smallest if it is not huge
        c = int(np.argmin(sizes))
        if sizes[c] <= 2 * target:
            chosen = [c]
    info = {
        "k": k,
        "cluster_sizes": sizes.tolist(),
        "isolation": [round(float(v), 3) for v in isolation],
        "held_out_clusters": sorted(chosen),
        "target_users": target,
    }
    return labels, chosen, info


def split_users(
    users: list[User], card: TaskCard, cfg: SplitConfig | None = None, embed: Embed | None = None
) -> Splits:
    """Split users (never items) into train/val/test/ood. Deterministic for a given seed and input.

    `embed(texts) -> [n, d]` embeds profile texts for the OOD clustering; without it the structured
    profile features (standardised) are clustered instead. `info["ood_space"]` records which.
    """
    cfg = cfg or SplitConfig()
    users = sorted(users, key=lambda u: u.user_id)  # independent of input order
    n = len(users)
    info: dict[str, Any] = {"seed": cfg.seed, "n_users": n}
    ood_idx: set[int] = set()
    if n >= cfg.min_users_for_ood and cfg.ood_frac > 0:
        if embed is not None:
            # Rounded: tiny float differences between machines must not move users between clusters.
            x = np.round(np.asarray(embed(profile_texts(card, users)), dtype=np.float64), 4)
            info["ood_space"] = "embedding"
        else:
            f = profile_features(card, users).astype(np.float64)
            x = (f - f.mean(0)) / (f.std(0) + 1e-6)
            info["ood_space"] = "features"
        labels, chosen, cinfo = _ood_clusters(x, cfg)
        info.update(cinfo)
        ood_idx = {i for i in range(n) if labels[i] in chosen}
    else:
        info["ood_space"] = None
        info["ood_skipped"] = (
            f"fewer than {cfg.min_users_for_ood} users" if cfg.ood_frac > 0 else "ood_frac=0"
        )
    rest = [i for i in range(n) if i not in ood_idx]
    order = np.random.default_rng(cfg.seed).permutation(len(rest))
    rest = [rest[j] for j in order]
    n_test, n_val = round(cfg.test_frac * n), round(cfg.val_frac * n)
    n_test = min(n_test, len(rest))
    n_val = min(n_val, len(rest) - n_test)
    pick = lambda idx: [users[i] for i in sorted(idx)]  # noqa: E731  (keep user-id order in each split)
    return Splits(
        train=pick(rest[n_test + n_val :]),
        val=pick(rest[n_test : n_test + n_val]),
        test=pick(rest[:n_test]),
        ood=pick(ood_idx),
        info=info,
    )


@dataclass
class RepoSplitConfig:
    """The commit task's split: whole repositories held out as the OOD split, then a random user split."""

    ood_repos: tuple[str, ...] = ("ansible/ansible", "tox-dev/tox")
    n_test: int = 210
    n_val: int = 105
    seed: int = 0


def item_repos(user: User) -> set[str]:
    return {str(it.meta.get("repo", "")) for it in user.items}


def split_by_repo(users: list[User], cfg: RepoSplitConfig | None = None) -> Splits:
    """OOD = authors whose every commit is in a held-out repository; authors with commits on both sides
    are dropped (they would carry the held-out repositories' style into training); the rest are split
    user-disjointly at random into test / val / train. Deterministic for a given seed and input."""
    cfg = cfg or RepoSplitConfig()
    held = set(cfg.ood_repos)
    users = sorted(users, key=lambda u: u.user_id)
    ood, rest, dropped = [], [], []
    for u in users:
        repos = item_repos(u)
        (ood if repos <= held else dropped if repos & held else rest).append(u)
    order = np.random.default_rng(cfg.seed).permutation(len(rest))
    n_test = min(cfg.n_test, len(rest))
    n_val = min(cfg.n_val, len(rest) - n_test)
    test = sorted((rest[j] for j in order[:n_test]), key=lambda u: u.user_id)
    val = sorted((rest[j] for j in order[n_test:n_test + n_val]), key=lambda u: u.user_id)
    train = sorted((rest[j] for j in order[n_test + n_val:]), key=lambda u: u.user_id)
    info = {"seed": cfg.seed, "n_users": len(users), "ood_space": "repository",
            "ood_repos": sorted(held), "users_dropped_both_sides": len(dropped),
            "dropped_items": sum(len(u.items) for u in dropped)}
    return Splits(train=train, val=val, test=test, ood=ood, info=info)
