"""The commit-subject table of README.md and the evaluation card, read from the reports `p2p eval` wrote.

    python scripts/commit_table.py [reports]

Prints Markdown: one row per method and split (NLL with its CI, ROUGE-L with its CI, first-word match, case
agreement for one-case authors, copy rate: answers equal to one of the author's earlier subjects) and the
paired differences against P2P (NLL, ROUGE-L) that the floor is judged by.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ORDER = ("p2p", "p2p-before", "p2p-alone", "p2p-shuffled", "p2p-random", "p2p-rag", "mt-lora", "rag", "pag",
         "all-history", "base", "oppu")
LABEL = {"p2p": "**p2p** (the app: adapter, 2 own commits, the diff, copy rule)",
         "p2p-before": "p2p before (files-only query, greedy line)", "p2p-alone": "p2p adapter alone",
         "p2p-shuffled": "p2p, shuffled profile", "p2p-random": "p2p, random profile", "p2p-rag": "p2p + rag_k examples"}
PAIRED = ("p2p-before", "p2p-shuffled", "p2p-random", "p2p-alone", "mt-lora", "rag", "pag", "all-history", "base",
          "oppu")


def _v(m: dict, key: str, ci: bool = False) -> str:
    x = m["metrics"].get(key)
    if x is None:
        return "-"
    s = f"{x['value']:.3f}"
    return s + (f" [{x['ci'][0]:.3f}, {x['ci'][1]:.3f}]" if ci and x.get("ci") else "")


def table(reports: Path) -> str:
    rows = ["| split | method | NLL ↓ [95% CI] | ROUGE-L ↑ [95% CI] | first word ↑ | case_hist ↑ | copy rate |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    paired = []
    for split in ("test", "ood"):
        d = json.loads((reports / f"commit-subject-{split}.json").read_text())
        first, real = True, None
        for name in ORDER:
            m = d["methods"].get(name)
            if not m or m.get("status") != "ok":
                continue
            users = f" ({m['n_users']})" if m["n_users"] != d["data"]["n_users"] else ""
            head = f"{split} ({d['data']['n_users']})" if first else ""
            first = False
            rows.append(f"| {head} | {LABEL.get(name, name)}{users} | {_v(m, 'nll', True)} | {_v(m, 'rougeL', True)} | "
                        f"{_v(m, 'first_word')} | {_v(m, 'case_hist')} | {_v(m, 'copy')} |")
            real = m["metrics"].get("copy_real")
        if real:
            rows.append(f"| | *the authors' real subjects* | | | | | {real['value']:.3f} |")
        for metric in ("nll", "rougeL"):
            diffs = []
            for name in PAIRED:
                p = d["paired_vs_p2p"].get(name)
                if p and metric in p["metrics"]:
                    x = p["metrics"][metric]
                    diffs.append(f"{name} {x['value']:+.3f} [{x['ci'][0]:+.3f}, {x['ci'][1]:+.3f}]")
            paired.append(f"- {split}, {metric} method − p2p (paired over authors): " + "; ".join(diffs))
        paired.append(f"  (`{d['command']}`, git {d['machine'].get('git_commit')}, {d['machine']['cpu_count']} CPUs)")
    return "\n".join(rows + [""] + paired)


if __name__ == "__main__":
    print(table(Path(sys.argv[1] if len(sys.argv) > 1 else "reports")))
