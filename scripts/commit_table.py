"""The commit-subject table of README.md and the evaluation card, read from the reports `p2p eval` wrote.

    python scripts/commit_table.py [reports]

Prints Markdown: one row per method and split (NLL with its CI, ROUGE-L, first-word match, case agreement for
one-case authors) and the paired differences against P2P that the floor is judged by.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ORDER = ("p2p", "p2p-alone", "p2p-shuffled", "p2p-random", "p2p-rag", "mt-lora", "rag", "pag", "all-history", "base",
         "oppu")
LABEL = {"p2p": "**p2p** (adapter + 2 own commits, the app's default)", "p2p-alone": "p2p adapter alone",
         "p2p-shuffled": "p2p, shuffled profile", "p2p-random": "p2p, random profile", "p2p-rag": "p2p + rag_k examples"}
PAIRED = ("p2p-shuffled", "p2p-random", "p2p-alone", "mt-lora", "rag", "pag", "all-history", "base", "oppu")


def _v(m: dict, key: str, ci: bool = False) -> str:
    x = m["metrics"].get(key)
    if x is None:
        return "-"
    s = f"{x['value']:.3f}"
    return s + (f" [{x['ci'][0]:.3f}, {x['ci'][1]:.3f}]" if ci and x.get("ci") else "")


def table(reports: Path) -> str:
    rows = ["| split | method | NLL ↓ [95% CI] | ROUGE-L ↑ | first word ↑ | case_hist ↑ |", "| --- | --- | --- | --- | --- | --- |"]
    paired = []
    for split in ("test", "ood"):
        d = json.loads((reports / f"commit-subject-{split}.json").read_text())
        first = True
        for name in ORDER:
            m = d["methods"].get(name)
            if not m or m.get("status") != "ok":
                continue
            users = f" ({m['n_users']})" if m["n_users"] != d["data"]["n_users"] else ""
            head = f"{split} ({d['data']['n_users']})" if first else ""
            first = False
            rows.append(f"| {head} | {LABEL.get(name, name)}{users} | {_v(m, 'nll', True)} | {_v(m, 'rougeL')} | "
                        f"{_v(m, 'first_word')} | {_v(m, 'case_hist')} |")
        diffs = []
        for name in PAIRED:
            p = d["paired_vs_p2p"].get(name)
            if p and "nll" in p["metrics"]:
                x = p["metrics"]["nll"]
                diffs.append(f"{name} {x['value']:+.3f} [{x['ci'][0]:+.3f}, {x['ci'][1]:+.3f}]")
        paired.append(f"- {split}, NLL method − p2p (paired over authors): " + "; ".join(diffs))
        paired.append(f"  (`{d['command']}`, git {d['machine'].get('git_commit')}, {d['machine']['cpu_count']} CPUs)")
    return "\n".join(rows + [""] + paired)


if __name__ == "__main__":
    print(table(Path(sys.argv[1] if len(sys.argv) > 1 else "reports")))
