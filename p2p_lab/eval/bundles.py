"""Two bundles on the same queries: a candidate (a retrain, a warm start) against the shipped one, paired.

    python -m p2p_lab.eval.bundles SHIPPED_RUN_DIR CANDIDATE_RUN_DIR --out reports/warm-diff

Each run dir is one `p2p eval` run (`--bundle` picks the candidate) with `p2p` and `p2p-shuffled` on the same
task, split, users and queries. Per bundle: the answer's NLL of the real output, ROUGE-L, copy rate, and the
shuffled-profile gap (shuffled − true NLL: how much the profile matters); then candidate − shipped, paired by
query, with bootstrap CIs over users. Writes OUT.md and OUT.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from p2p_lab.eval.anticopy import load, user_mean
from p2p_lab.eval.report import fmt
from p2p_lab.metrics import example_scores
from p2p_local.bundle import DEFAULT_BUNDLE, MANIFEST, find_bundle
from p2p_local.data.format import builtin_card


def per_query(run_dir: Path) -> dict[tuple[str, int], dict[str, tuple[float, float]]]:
    """(user, query index) -> {measure: (numerator, denominator)} of the run's p2p answer: NLL and the shuffled
    gap per token of the real output (as the reports weigh them), ROUGE-L and copy per query."""
    card = builtin_card(json.loads((run_dir / "config.json").read_text())["task"])
    true, shuffled = load(run_dir, "p2p", with_candidates=False), load(run_dir, "p2p-shuffled", with_candidates=False)
    shuffled_nll = {(r["user"], r["i"]): r["nll_sum"] for r in shuffled}
    rouge = example_scores(card, [r["text"] for r in true], [r["target"] for r in true])["rougeL"]
    return {(r["user"], r["i"]): {"nll": (r["nll_sum"], r["n_tok"]),
                                  "gap": (shuffled_nll[(r["user"], r["i"])] - r["nll_sum"], r["n_tok"]),
                                  "rougeL": (float(rl), 1.0), "copy": (float(r["copy"]), 1.0)}
            for r, rl in zip(true, rouge, strict=True) if (r["user"], r["i"]) in shuffled_nll}


def compare(shipped: Path, candidate: Path, boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    a, b = per_query(shipped), per_query(candidate)
    keys = sorted(set(a) & set(b))
    users = sorted({u for u, _ in keys})
    uix = np.array([users.index(u) for u, _ in keys])
    draws = np.random.default_rng(seed).integers(0, len(users), size=(boot, len(users)))

    def estimate(num: np.ndarray, den: np.ndarray) -> dict[str, Any]:
        return user_mean(uix, num, den, draws)

    out: dict[str, Any] = {"queries": len(keys), "users": len(users), "bundles": {}, "metrics": {}}
    for side, run in (("shipped", shipped), ("candidate", candidate)):
        folder = json.loads((run / "config.json").read_text())["options"].get("bundle")
        where = Path(folder) if folder and (Path(folder) / MANIFEST).is_file() else find_bundle(folder or DEFAULT_BUNDLE)
        training = json.loads((where / MANIFEST).read_text()).get("training", {})
        out["bundles"][side] = {"bundle": folder or "the shipped one", "machine": training.get("machine"),
                                **{k: training.get(k) for k in ("recipe", "steps", "batch_size", "lr", "wall_time_s")}}
    for m in ("nll", "gap", "rougeL", "copy"):
        (na, da), (nb, db) = (np.array([side[k][m] for k in keys]).T for side in (a, b))
        # Paired per query: the candidate's rate minus the shipped one's, over the shipped one's weights.
        out["metrics"][m] = {"shipped": estimate(na, da), "candidate": estimate(nb, db),
                             "candidate - shipped": estimate(nb / db * da - na, da)}
    return out


LABELS = {"nll": "NLL of the real output ↓", "gap": "shuffled − true NLL ↑", "rougeL": "ROUGE-L ↑",
          "copy": "copy rate"}


def markdown(res: dict[str, Any], runs: list[str]) -> str:
    lines = [f"# Candidate bundle against the shipped one ({res['users']} users, {res['queries']} queries)", "",
             f"- command: `python -m p2p_lab.eval.bundles {' '.join(runs)}`",
             "- each run: `p2p eval` with `p2p` and `p2p-shuffled` on the same queries; 95% CIs over users",
             *[f"- {side}: {b['bundle']}, trained with recipe `{b['recipe']}`, {b['steps']} steps of {b['batch_size']} "
               f"at lr {b['lr']} on {b['machine']} ({b['wall_time_s']} s)" for side, b in res["bundles"].items()], "",
             "| measure | shipped | candidate | candidate − shipped |", "| --- | --- | --- | --- |"]
    lines += [f"| {LABELS[m]} | {fmt(e['shipped'])} | {fmt(e['candidate'])} | {fmt(e['candidate - shipped'])} |"
              for m, e in res["metrics"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m p2p_lab.eval.bundles", description=__doc__.splitlines()[0])
    ap.add_argument("shipped", type=Path)
    ap.add_argument("candidate", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="writes OUT.md and OUT.json")
    args = ap.parse_args(argv)
    res = compare(args.shipped, args.candidate)
    from p2p_local.files import atomic_write

    text = markdown(res, [str(args.shipped), str(args.candidate)])
    atomic_write(args.out.with_suffix(".md"), text)
    atomic_write(args.out.with_suffix(".json"), json.dumps(res, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
