"""The evaluation report: reports/<task>-<split>.json (everything), .md (tables) and .png (main chart).

Every number comes with its 95% bootstrap CI over users; paired differences are against P2P on the
users both methods have. The exact command and the machine (platform, CPUs, memory, library
versions, git commit) are recorded so a number can be traced to what produced it.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np

from p2p_lab.eval.stats import (
    HIGHER_IS_BETTER,
    METRIC_DOC,
    PRIMARY,
    Scorer,
    metric_names,
    paired_difference,
    summarize,
)
from p2p_lab.plots import pyplot, save
from p2p_local.data.format import LABELLED_KINDS, TaskCard, User

REFERENCE = "p2p"  # paired differences are taken against this method
ACTIVITY_BUCKETS = ((2, 5), (6, 10), (11, 20), (21, 50), (51, 100), (101, 300), (301, None))


def machine_info() -> dict[str, Any]:
    import psutil

    versions = {}
    for pkg in ("p2p-local", "numpy", "llama_cpp_python", "onnxruntime", "scikit-learn", "rouge-score", "bm25s"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "cpu_physical": psutil.cpu_count(logical=False),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "versions": versions,
        "git_commit": _git_commit(),
    }


def _git_commit() -> str | None:
    from p2p_local.paths import repo_root

    if not (repo_root() / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(repo_root()), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _user_sums(scorer: Scorer, rows: dict[str, dict], user_ids: list[str]) -> np.ndarray:
    return np.stack([
        np.sum([scorer.query_stats(r) for r in rows[u]["records"]], axis=0) if rows[u]["records"]
        else np.zeros(len(scorer.keys))
        for u in user_ids
    ]) if user_ids else np.zeros((0, len(scorer.keys)))


def bucket_name(lo: int, hi: int | None) -> str:
    return f"{lo}+ items" if hi is None else f"{lo}-{hi} items"


def build_report(*, card: TaskCard, task: str, cfg, users: list[User], n_split_users: int, n_queries: int,
                 results: dict[str, dict[str, dict]], meta: dict, source: str, engine: dict | None,
                 seconds: float, run_dir: Path) -> dict[str, Any]:
    scorer = Scorer(card)
    metrics = metric_names(card.kind)
    primary = PRIMARY[card.kind]
    order = [u.user_id for u in users]
    n_items = {u.user_id: len(u.items) for u in users}
    sums: dict[str, tuple[list[str], np.ndarray]] = {}
    methods: dict[str, Any] = {}
    for name, res in meta.items():
        entry: dict[str, Any] = {"status": res.status, "description": _description(name)}
        if res.status != "ok":
            entry["reason"] = res.reason
            methods[name] = entry
            continue
        rows = results.get(name, {})
        ids = [u for u in order if u in rows]
        if not ids:
            entry.update(status="skipped", reason="no user could be evaluated: " + "; ".join(
                sorted(set(res.skipped_users.values()))[:3]))
            methods[name] = entry
            continue
        s = _user_sums(scorer, rows, ids)
        sums[name] = (ids, s)
        recs = [r for u in ids for r in rows[u]["records"]]
        est = summarize(scorer, s, metrics, cfg.bootstrap, cfg.seed)
        entry.update(
            n_users=len(ids), n_queries=len(recs),
            metrics={m: e.to_dict() for m, e in est.items()},
            unparseable=int(sum(bool(r.get("unparseable")) for r in recs)),
            seconds=round(sum(rows[u].get("seconds", 0.0) for u in ids), 1),
            fingerprint=res.fingerprint, notes=list(res.notes),
        )
        masses = [r["mass"] for r in recs if "mass" in r]
        if masses:
            entry["label_mass"] = round(float(np.mean(masses)), 4)
        if res.skipped_users:
            entry["skipped_users"] = res.skipped_users
            entry["notes"].append(f"{len(res.skipped_users)} of {len(order)} users not evaluated "
                                  f"(listed in skipped_users)")
        methods[name] = entry

    paired: dict[str, Any] = {}
    if REFERENCE in sums:
        ref_ids, ref_s = sums[REFERENCE]
        ref_pos = {u: i for i, u in enumerate(ref_ids)}
        for name, (ids, s) in sums.items():
            if name == REFERENCE:
                continue
            common = [u for u in ids if u in ref_pos]
            if not common:
                continue
            a = s[[ids.index(u) for u in common]]
            b = ref_s[[ref_pos[u] for u in common]]
            d = paired_difference(scorer, a, b, metrics, cfg.bootstrap, cfg.seed)
            paired[name] = {"n_users": len(common), "metrics": {m: e.to_dict() for m, e in d.items()}}

    activity = []
    for lo, hi in ACTIVITY_BUCKETS:
        in_bucket = {u for u in order if n_items[u] >= lo and (hi is None or n_items[u] <= hi)}
        if not in_bucket:
            continue
        row: dict[str, Any] = {"bucket": bucket_name(lo, hi), "n_users": len(in_bucket), "methods": {}}
        for name, (ids, s) in sums.items():
            keep = [i for i, u in enumerate(ids) if u in in_bucket]
            if keep:
                e = summarize(scorer, s[keep], [primary], cfg.bootstrap, cfg.seed)[primary]
                row["methods"][name] = {"n_users": len(keep), primary: e.to_dict()}
        activity.append(row)

    o = cfg.options
    return {
        "task": task,
        "split": cfg.split,
        "kind": card.kind,
        "labels": card.labels,
        "primary_metric": primary,
        "higher_is_better": {m: HIGHER_IS_BETTER[m] for m in metrics},
        "metric_doc": {m: METRIC_DOC[m] for m in metrics},
        "command": cfg.command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),
        "engine": engine,
        "data": {"source": source, "n_split_users": n_split_users, "n_users": len(order),
                 "queries_per_user": cfg.queries, "n_queries": n_queries,
                 "users": order},
        "config": {"seed": cfg.seed, "bootstrap": cfg.bootstrap, "n_ctx": o.n_ctx, "rag_k": o.rag_k,
                   "max_tokens": o.max_tokens, "decoding": "greedy (temperature 0)", "run_dir": str(run_dir)},
        "seconds": round(seconds, 1),
        "methods": methods,
        "paired_vs_" + REFERENCE: paired,
        "by_activity": activity,
    }


def _description(name: str) -> str:
    from p2p_lab.eval.methods import METHODS

    cls = METHODS.get(name)
    return cls.description if cls else ""


# --- writing -------------------------------------------------------------------------------------------
def write_report(rep: dict[str, Any], out: Path, log=print) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{rep['task']}-{rep['split']}"
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    paths[0].write_text(json.dumps(rep, indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
    paths[1].write_text(to_markdown(rep), encoding="utf-8")
    png = write_chart(rep, out / f"{stem}.png", log)
    if png:
        paths.append(png)
    log("wrote " + ", ".join(str(p) for p in paths))
    return paths


def fmt(est: dict | None, digits: int = 3) -> str:
    if not est or est.get("value") is None:
        return "-"
    lo, hi = est.get("ci") or (None, None)
    v = f"{est['value']:.{digits}f}"
    if lo is None or hi is None:
        return v
    return f"{v} [{lo:.{digits}f}, {hi:.{digits}f}]"


def to_markdown(rep: dict[str, Any]) -> str:
    kind, primary = rep["kind"], rep["primary_metric"]
    metrics = list(rep["higher_is_better"])
    d, m = rep["data"], rep["machine"]
    arrow = lambda k: "↑" if rep["higher_is_better"][k] else "↓"  # noqa: E731
    lines = [
        f"# Evaluation: {rep['task']} ({rep['split']} split)",
        "",
        f"- command: `{rep['command']}`",
        f"- data: {d['source']}; {d['n_users']} of {d['n_split_users']} {rep['split']} users, "
        f"their last {d['queries_per_user']} items each as queries ({d['n_queries']} queries), "
        "each with only earlier items as profile",
        f"- machine: {m['platform']}, {m['cpu_count']} CPUs, {m['memory_gb']} GB; python {m['python']}; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
        + (f"; git {m['git_commit']}" if m.get("git_commit") else ""),
        f"- decoding: greedy; {'label distribution from the label tokens' if kind != 'generation' else 'bounded generation'}; "
        f"95% CIs: bootstrap over users ({rep['config']['bootstrap']} resamples, seed {rep['config']['seed']})",
        f"- created {rep['created']}: this run {rep['seconds']:.0f} s; the results it reports took "
        f"{sum(e.get('seconds', 0.0) for e in rep['methods'].values()):.0f} s to compute (runs resume from stored results)",
        "",
        "## Main comparison",
        "",
        "| method | users | queries | " + " | ".join(f"{k} {arrow(k)}" for k in metrics) + " | unparseable |",
        "| --- | --- | --- | " + " | ".join("---" for _ in metrics) + " | --- |",
    ]
    skipped = []
    for name, e in rep["methods"].items():
        if e["status"] != "ok":
            skipped.append(f"- **{name}**: {e.get('reason', '')}")
            continue
        cells = [fmt(e["metrics"].get(k)) for k in metrics]
        lines.append(f"| {name} | {e['n_users']} | {e['n_queries']} | " + " | ".join(cells) + f" | {e['unparseable']} |")
    lines += ["", "Metrics: " + "; ".join(f"**{k}** = {v}" for k, v in rep["metric_doc"].items()) + "."]
    if kind in LABELLED_KINDS:
        lines.append("Unparseable = queries where the model's most likely next token (full vocabulary) is not a "
                     "label, i.e. free decoding would not have produced an answer; scores use the label "
                     "distribution regardless.")
    else:
        lines.append("Unparseable = empty outputs.")
    paired = rep.get("paired_vs_" + REFERENCE) or {}
    lines += ["", f"## Paired differences vs {REFERENCE} (method - {REFERENCE}, same users)", ""]
    if paired:
        lines.append("| method | users | " + " | ".join(metrics) + " |")
        lines.append("| --- | --- | " + " | ".join("---" for _ in metrics) + " |")
        for name, p in paired.items():
            lines.append(f"| {name} | {p['n_users']} | " + " | ".join(fmt(p["metrics"].get(k)) for k in metrics) + " |")
        lines.append("")
        lines.append(f"A CI that excludes 0 is a difference; for {primary} "
                     f"{'positive' if rep['higher_is_better'][primary] else 'negative'} favours the method over {REFERENCE}.")
    else:
        lines.append(f"({REFERENCE} was not evaluated.)")
    if rep["by_activity"]:
        names = [n for n, e in rep["methods"].items() if e["status"] == "ok"]
        lines += ["", f"## By user activity ({primary}, users bucketed by their number of items)", "",
                  "| bucket | users | " + " | ".join(names) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in names) + " |"]
        for row in rep["by_activity"]:
            cells = [fmt(row["methods"].get(n, {}).get(primary)) for n in names]
            lines.append(f"| {row['bucket']} | {row['n_users']} | " + " | ".join(cells) + " |")
    notes = [f"- **{n}**: {note}" for n, e in rep["methods"].items() for note in e.get("notes", [])]
    if notes:
        lines += ["", "## Notes", "", *notes]
    if skipped:
        lines += ["", "## Not evaluated", "", *skipped]
    lines += ["", "## Methods", ""]
    lines += [f"- **{n}**: {e.get('description', '')}" for n, e in rep["methods"].items()]
    return "\n".join(lines) + "\n"


def write_chart(rep: dict[str, Any], path: Path, log=print) -> Path | None:
    """A bar chart of the primary metric with 95% CIs. matplotlib is optional (not an app dependency)."""
    if find_spec("matplotlib") is None:
        log("matplotlib is not installed: skipping the chart (pip install matplotlib to get it)")
        return None
    primary = rep["primary_metric"]
    rows = [(n, e["metrics"][primary]) for n, e in rep["methods"].items()
            if e["status"] == "ok" and e["metrics"].get(primary, {}).get("value") is not None]
    if not rows:
        return None
    names = [n for n, _ in rows]
    vals = np.array([e["value"] for _, e in rows])
    lo = np.array([e["ci"][0] if e["ci"][0] is not None else e["value"] for _, e in rows])
    hi = np.array([e["ci"][1] if e["ci"][1] is not None else e["value"] for _, e in rows])
    with pyplot(path.parent) as plt:
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.5))
        colors = ["#c0392b" if n == REFERENCE else "#7f8c8d" if n.startswith(REFERENCE + "-") else "#2c7fb8"
                  for n in names]
        y = np.arange(len(rows))[::-1]
        ax.barh(y, vals, xerr=[vals - lo, hi - vals], color=colors, capsize=3)
        ax.set_yticks(y, names)
        better = "higher" if rep["higher_is_better"][primary] else "lower"
        ax.set_xlabel(f"{primary} ({better} is better), 95% CI over users")
        ax.set_title(f"{rep['task']} ({rep['split']}): {rep['data']['n_users']} users, "
                     f"{rep['data']['n_queries']} queries")
        if not math.isnan(float(vals.min())) and primary in ("mae", "rmse", "ce"):
            ax.set_xlim(left=0)
        return save(fig, path, dpi=120)
