"""The copy rule, chosen by measurement: every one-line answer of a `p2p eval` run stores the lines it was
chosen among (`candidates`: text, mean token log-probability, copy, branch), so any margin of
`pipeline.rank_candidates` can be scored offline on the same queries, without running the model again.

    python -m p2p_lab.eval.anticopy RUN_DIR [RUN_DIR ...] --out reports/commit-anticopy

For each margin: the copy rate (answers equal to one of the author's earlier subjects), the authors' own
rate, ROUGE-L against the real subject, and the paired ROUGE-L difference to the plain greedy line (branch 0),
with bootstrap CIs over users. Writes OUT.md, OUT.json and OUT.png.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from p2p_lab.plots import pyplot, save
from p2p_local.data.format import builtin_card
from p2p_local.pipeline import Candidate, rank_candidates

MARGINS = (0.0, 0.25, 0.5, 1.0, 2.0, math.inf)


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


def choose(rec: dict[str, Any], margin: float | None) -> str:
    """The answer under `margin` (None: the plain greedy line, branch 0)."""
    cands = sorted((Candidate(t, lp, cp, b) for t, lp, cp, b in rec["candidates"]), key=lambda c: c.branch)
    if margin is None:
        return cands[0].text if cands and cands[0].branch == 0 else rec["text"]
    ranked = rank_candidates(cands, margin)
    return ranked[0].text if ranked else ""


def user_mean(owner: np.ndarray, num: np.ndarray, den: np.ndarray, draws: np.ndarray) -> dict[str, Any]:
    """sum(num) / sum(den) over queries, with a 95% CI from resampling users (`owner[q]`: query q's user index;
    `draws`: [boot, users] resampled user indices)."""
    n_users = draws.shape[1]
    n, d = (np.bincount(owner, weights=x, minlength=n_users) for x in (num, den))
    b = n[draws].sum(1) / d[draws].sum(1)
    return {"value": float(num.sum() / den.sum()), "ci": [float(np.quantile(b, 0.025)), float(np.quantile(b, 0.975))]}


def evaluate(records: list[dict[str, Any]], boot: int = 1000, seed: int = 0) -> dict[str, Any]:
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

    rules: list[tuple[str, float | None]] = [("greedy line (no rule)", None)] + [(f"margin {m:g}", m) for m in MARGINS]
    greedy_rl = np.array(example_scores(card, [choose(r, None) for r in records], targets)["rougeL"])
    out = {"queries": len(records), "users": len(users), "real_copy": ci(np.array([float(r.get("real_copy", 0)) for r in records])),
           "rules": []}
    for label, m in rules:
        texts = [choose(r, m) for r in records]
        copies = np.array([float(any(t == c[0] and c[2] for c in r["candidates"])) for t, r in zip(texts, records, strict=True)])
        rl = np.array(example_scores(card, texts, targets)["rougeL"])
        out["rules"].append({"rule": label, "margin": None if m is None else (m if math.isfinite(m) else "inf"),
                             "copy": ci(copies), "rougeL": ci(rl), "rougeL_vs_greedy": ci(rl - greedy_rl)})
    return out


def markdown(res: dict[str, Any], runs: list[str]) -> str:
    from p2p_lab.eval.report import fmt as f

    lines = [f"# The copy rule, measured ({res['users']} authors, {res['queries']} queries)", "",
             f"- command: `python -m p2p_lab.eval.anticopy {' '.join(runs)}`",
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
    args = ap.parse_args(argv)
    records = [r for run in args.runs for r in load(run)]
    res = evaluate(records)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    args.out.with_suffix(".md").write_text(markdown(res, [str(r) for r in args.runs]), encoding="utf-8")
    plot(res, args.out.with_suffix(".png"))
    print(markdown(res, [str(r) for r in args.runs]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
