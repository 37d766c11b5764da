"""The copy rule, chosen by measurement: every one-line answer of a `p2p eval` run stores the lines it was
chosen among (`candidates`: text, mean token log-probability, copy, branch), so any margin of
`pipeline.rank_candidates` can be scored offline on the same queries, without running the model again.

    python -m p2p_lab.eval.anticopy RUN_DIR [RUN_DIR ...] --out reports/commit-anticopy

For each margin: the copy rate (answers equal to one of the author's earlier subjects), the authors' own
rate, ROUGE-L against the real subject, and the paired ROUGE-L difference to the plain greedy line (branch 0),
with bootstrap CIs over users. Writes OUT.md, OUT.json and OUT.png.

`--query-overlap` adds a re-ranking studied for issue 23: after the app's copy rule, the lines it keeps first
ordered by mean log-probability plus WEIGHT x the share of their words found in the query (files + diff, as
the prompt shows it), and the ceiling: the best of the lines for each query, chosen knowing the real subject.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from p2p_lab.plots import pyplot, save
from p2p_local.data.format import builtin_card
from p2p_local.pipeline import Candidate, demoted, rank_candidates

MARGINS = (0.0, 0.25, 0.5, 1.0, 2.0, math.inf)
OVERLAP_WEIGHTS = (0.25, 0.5, 1.0, 2.0)  # nats/token per unit of the query-overlap share (--query-overlap)


def load(run_dir: Path, method: str = "p2p", with_candidates: bool = True) -> list[dict[str, Any]]:
    """The method's records (only those that carry candidates, unless told otherwise): one per query, with the
    user's id."""
    rows: dict[str, dict] = {}
    for line in (run_dir / "results.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("method") == method:
            rows[row["user_id"]] = row  # the last line per user wins, as in the result store
    return [{**rec, "user": uid} for uid, row in rows.items() for rec in row["records"]
            if rec.get("candidates") or not with_candidates]


def queries(run_dir: Path) -> dict[tuple[str, int], str]:
    """(user, query index) -> the query as the prompt showed it, rebuilt from the run's config (built-in tasks)."""
    from p2p_lab.eval.runner import EvalConfig, build_queries
    from p2p_lab.eval.runner import load as load_split
    from p2p_local.pipeline import prompt_input

    cfg = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    loaded = load_split(EvalConfig(task=cfg["task"], split=cfg["split"]))
    built = build_queries(loaded.users, cfg["queries"], loaded.card)
    return {(uid, q.index): prompt_input(loaded.card, q.item) for uid, qs in built.items() for q in qs}


def words(text: str) -> set[str]:
    """The words that can name what a change touched: identifiers split at '_' and camelCase, lower-cased, 3+ characters."""
    parts = (p for w in re.findall(r"[A-Za-z0-9_]+", text) for p in re.split(r"_|(?<=[a-z])(?=[A-Z])", w))
    return {p.lower() for p in parts if len(p) >= 3}


def overlap(line: str, query_words: set[str]) -> float:
    """The share of the line's words found in the query."""
    w = words(line)
    return len(w & query_words) / len(w) if w else 0.0


def choose(rec: dict[str, Any], margin: float | None, weight: float = 0.0) -> str:
    """The answer under `margin` (None: the plain greedy line, branch 0); `weight` > 0: the lines the copy rule
    keeps first, re-ordered by mean log-probability + weight x `overlap` with the record's `query`."""
    cands = sorted((Candidate(t, lp, cp, b) for t, lp, cp, b in rec["candidates"]), key=lambda c: c.branch)
    if margin is None:
        return cands[0].text if cands and cands[0].branch == 0 else rec["text"]
    ranked = rank_candidates(cands, margin)
    if weight and ranked:
        kept = [c for c in ranked if not demoted(c, cands, margin)] or ranked
        qw = words(rec["query"])
        return max(kept, key=lambda c: c.logprob + weight * overlap(c.text, qw)).text
    return ranked[0].text if ranked else ""


def user_mean(owner: np.ndarray, num: np.ndarray, den: np.ndarray, draws: np.ndarray) -> dict[str, Any]:
    """sum(num) / sum(den) over queries, with a 95% CI from resampling users (`owner[q]`: query q's user index;
    `draws`: [boot, users] resampled user indices)."""
    n_users = draws.shape[1]
    n, d = (np.bincount(owner, weights=x, minlength=n_users) for x in (num, den))
    b = n[draws].sum(1) / d[draws].sum(1)
    return {"value": float(num.sum() / den.sum()), "ci": [float(np.quantile(b, 0.025)), float(np.quantile(b, 0.975))]}


def evaluate(records: list[dict[str, Any]], boot: int = 1000, seed: int = 0, query_overlap: bool = False) -> dict[str, Any]:
    from p2p_lab.metrics import example_scores

    card = builtin_card("commit-subject")
    users = sorted({r["user"] for r in records})
    uix = {u: i for i, u in enumerate(users)}
    targets = [r["target"] for r in records]
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(users), size=(boot, len(users)))

    owner = np.array([uix[r["user"]] for r in records])

    def ci(values: np.ndarray) -> dict[str, Any]:
        return user_mean(owner, values, np.ones(len(values)), draws)

    rules: list[tuple[str, float | None, float]] = [("greedy line (no rule)", None, 0.0)]
    rules += [(f"margin {m:g}", m, 0.0) for m in MARGINS]
    if query_overlap:
        rules += [(f"margin 1 + overlap x{w:g}", 1.0, w) for w in OVERLAP_WEIGHTS]
    greedy_rl = np.array(example_scores(card, [choose(r, None) for r in records], targets)["rougeL"])
    out = {"queries": len(records), "users": len(users), "real_copy": ci(np.array([float(r.get("real_copy", 0)) for r in records])),
           "rules": []}

    def row(label: str, texts: list[str], margin: Any) -> None:
        copies = np.array([float(any(t == c[0] and c[2] for c in r["candidates"])) for t, r in zip(texts, records, strict=True)])
        rl = np.array(example_scores(card, texts, targets)["rougeL"])
        out["rules"].append({"rule": label, "margin": margin, "copy": ci(copies), "rougeL": ci(rl),
                             "rougeL_vs_greedy": ci(rl - greedy_rl)})

    for label, m, w in rules:
        row(label, [choose(r, m, w) for r in records], None if m is None else (m if math.isfinite(m) else "inf"))
    if query_overlap:  # the ceiling of any re-ranking of these lines: the best one, knowing the real subject
        best = [max((c[0] for c in r["candidates"]), key=lambda t, g=r["target"]: example_scores(card, [t], [g])["rougeL"][0])
                for r in records]
        row("best line (knows the answer)", best, None)
    return out


def markdown(res: dict[str, Any], runs: list[str], flags: str = "") -> str:
    from p2p_lab.eval.report import fmt as f

    lines = [f"# The copy rule, measured ({res['users']} authors, {res['queries']} queries)", "",
             f"- command: `python -m p2p_lab.eval.anticopy {' '.join(runs)}{flags}`",
             "- the answers of `p2p` in those runs, re-ranked offline from the lines each was chosen among",
             f"- the authors' own subjects repeat an earlier one in {f(res['real_copy'])} of queries", "",
             "| rule | copy rate ↓ | ROUGE-L ↑ | ROUGE-L − greedy line |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['rule']} | {f(r['copy'])} | {f(r['rougeL'])} | {f(r['rougeL_vs_greedy'])} |" for r in res["rules"]]
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    with pyplot(path.parent) as plt:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in res["rules"]:
            ax.errorbar(r["copy"]["value"], r["rougeL"]["value"], fmt="o",
                        xerr=[[r["copy"]["value"] - r["copy"]["ci"][0]], [r["copy"]["ci"][1] - r["copy"]["value"]]],
                        yerr=[[r["rougeL"]["value"] - r["rougeL"]["ci"][0]],
                              [r["rougeL"]["ci"][1] - r["rougeL"]["value"]]])
            ax.annotate(r["rule"], (r["copy"]["value"], r["rougeL"]["value"]), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
        ax.axvline(res["real_copy"]["value"], ls="--", c="grey", lw=1, label="authors' own copy rate")
        ax.set_xlabel("copy rate (answer = an earlier subject)")
        ax.set_ylabel("ROUGE-L vs the real subject")
        ax.legend(fontsize=8)
        save(fig, path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="p2p eval run folders (OUT/runs/commit-subject-SPLIT-KEY)")
    ap.add_argument("--out", type=Path, required=True, help="write OUT.md, OUT.json and OUT.png")
    ap.add_argument("--query-overlap", action="store_true",
                    help="also re-rank by overlap with the query, and show the ceiling (rebuilds the queries from the data)")
    args = ap.parse_args(argv)
    records = []
    for run in args.runs:
        shown = queries(run) if args.query_overlap else {}
        records += [{**r, "query": shown.get((r["user"], r["i"]), "")} for r in load(run)]
    res = evaluate(records, query_overlap=args.query_overlap)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    md = markdown(res, [str(r) for r in args.runs], " --query-overlap" if args.query_overlap else "")
    args.out.with_suffix(".md").write_text(md, encoding="utf-8")
    plot(res, args.out.with_suffix(".png"))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
