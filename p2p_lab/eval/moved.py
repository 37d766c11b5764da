"""Which figures moved: a re-run's reports (e.g. on the unified route) beside the reports they replace.

    python -m p2p_lab.eval.moved reports OLD_REPORTS     # writes OLD_REPORTS/MOVED.md

For every task/split report present in both folders and every method in both, the primary metric (and
the NLL / cross-entropy where both have it) before and after, the change, and whether the change lies
outside the earlier run's 95% CI. Same users and queries on both sides when the report sizes match.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from p2p_local.files import atomic_write

SECONDARY = {"rating": "ce", "label": "ce", "generation": "nll"}


def _load(folder: Path) -> dict[str, dict]:
    out = {}
    for p in sorted(folder.glob("*-*.json")):
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(d, dict) and "methods" in d and "primary_metric" in d:
            out[p.stem] = d
    return out


def _metric(entry: dict, name: str) -> tuple[float, list[float]] | None:
    m = entry.get("metrics", {}).get(name)
    if not m or m.get("value") is None:
        return None
    return float(m["value"]), list(m.get("ci") or [float("nan"), float("nan")])


def compare(before_dir: Path, after_dir: Path) -> str:
    before, after = _load(before_dir), _load(after_dir)
    lines = [f"# Which figures moved: `{after_dir}` against `{before_dir}`", "",
             f"Command: `python -m p2p_lab.eval.moved {before_dir} {after_dir}`. A change is marked **moved** when "
             "the new point estimate lies outside the earlier run's 95% CI over users; \"same users\" says whether both "
             "runs evaluated the same users (a re-prepared split can differ).", "",
             "| report | method | users (before → after) | same users | metric | before [95% CI] | after [95% CI] | change | |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key in sorted(set(before) & set(after)):
        b, a = before[key], after[key]
        same = "yes" if b.get("data", {}).get("users") == a.get("data", {}).get("users") else "**no**"
        metrics = [b["primary_metric"]]
        if SECONDARY.get(b.get("kind", "")):
            metrics.append(SECONDARY[b["kind"]])
        for method in a["methods"]:
            eb, ea = b["methods"].get(method), a["methods"][method]
            if not eb or eb.get("status") != "ok" or ea.get("status") != "ok":
                continue
            for name in metrics:
                mb, ma = _metric(eb, name), _metric(ea, name)
                if ma is None:
                    continue
                if mb is None:
                    lines.append(f"| {key} | {method} | {ea.get('n_users')} | {same} | {name} | - | {ma[0]:.3f} "
                                 f"[{ma[1][0]:.3f}, {ma[1][1]:.3f}] | new | |")
                    continue
                moved = not (mb[1][0] <= ma[0] <= mb[1][1])
                lines.append(
                    f"| {key} | {method} | {eb.get('n_users')} → {ea.get('n_users')} | {same} | {name} | {mb[0]:.3f} "
                    f"[{mb[1][0]:.3f}, {mb[1][1]:.3f}] | {ma[0]:.3f} [{ma[1][0]:.3f}, {ma[1][1]:.3f}] | "
                    f"{ma[0] - mb[0]:+.3f} | {'**moved**' if moved else ''} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    args = ap.parse_args(argv)
    text = compare(args.before, args.after)
    atomic_write(args.after / "MOVED.md", text, mode=0o644)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
