"""One page over every evaluation report: reports/SUMMARY.md, summary.json and summary.png.

    p2p eval --summary                      # reads reports/<task>-<split>.json, writes the summary
    p2p eval --summary --card models/gemma3-270m-p2p   # also the bundle's evaluation card (EVAL.md)

The goal the product is held to (issue: evaluation): P2P beats Base, RAG, PAG, MT-LoRA and OPPU on every
task's held-out users, the true profile beats the shuffled one, and on rating tasks P2P beats the
user-mean reference. Each comparison is read off the report's paired difference (method - P2P on the
same users, 95% bootstrap CI over users): a win needs a CI that excludes 0 in P2P's favour; a CI
that holds 0 is a tie. Nothing here re-scores anything: it only gathers what the reports measured.
"""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from p2p_lab.eval.report import REFERENCE, fmt
from p2p_lab.plots import pyplot, save

SPLIT_ORDER = ("test", "ood", "val", "all")
# The comparisons the goal names, in the order it names them; classic references only for ratings.
GOAL = ("base", "rag", "pag", "all-history", "mt-lora", "oppu", "p2p-shuffled", "p2p-random")
GOAL_RATING = ("user-mean", "user-item-bias", "logreg")


def load_reports(out: Path) -> list[dict[str, Any]]:
    """Every per-task report in `out` (files <task>-<split>.json written by `p2p eval`)."""
    reps = []
    for path in sorted(out.glob("*.json")):
        if path.name.startswith("summary") or path.name.startswith("bench") or path.name.startswith("cost"):
            continue
        try:
            rep = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(rep, dict) and {"task", "split", "methods", "primary_metric"} <= set(rep):
            reps.append(rep)
    reps.sort(key=lambda r: (r["task"], SPLIT_ORDER.index(r["split"]) if r["split"] in SPLIT_ORDER else 9))
    return reps


def report_bundle(rep: dict[str, Any]) -> str | None:
    """The bundle a report measured (the first 16 hex digits of its sha256, the head of the p2p method's
    fingerprint); None when P2P did not run in it."""
    fp = (rep["methods"].get(REFERENCE) or {}).get("fingerprint") or ""
    head = fp.split(":", 1)[0][:16]
    return head if len(head) == 16 and all(c in "0123456789abcdef" for c in head) else None


def split_stale(reps: list[dict[str, Any]], bundle: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(current, stale): a report measured with another bundle than `bundle` (the shipped one) is stale and
    kept out of every table; None accepts all (no bundle to compare with)."""
    if bundle is None:
        return reps, []
    current = [r for r in reps if report_bundle(r) == bundle[:16]]
    return current, [r for r in reps if r not in current]


def copy_rates(rep: dict[str, Any]) -> dict[str, float] | None:
    """A generation task's copy rates: P2P's answers equal to one of the user's earlier outputs, and the real
    outputs' own rate (`copy_real`); None where the report has no copy metric."""
    m = ((rep["methods"].get(REFERENCE) or {}).get("metrics") or {})
    if "copy" not in m:
        return None
    return {"p2p": m["copy"]["value"], "real": (m.get("copy_real") or {}).get("value")}


def measured(rep: dict[str, Any]) -> str:
    """When, at which commit and with which bundle a report was measured."""
    git = (rep.get("machine") or {}).get("git_commit") or "?"
    return f"{str(rep.get('created', '?'))[:10]} · {git} · bundle {(report_bundle(rep) or '?')[:8]}"


def verdict(diff: dict | None, higher_is_better: bool) -> str:
    """'win' / 'tie' / 'loss' for P2P from a (method - P2P) difference estimate with its CI."""
    if not diff or diff.get("value") is None:
        return "n/a"
    lo, hi = diff.get("ci") or (None, None)
    if lo is None or hi is None:
        return "n/a"
    # method - p2p: for a lower-is-better metric P2P wins when the method is higher (lo > 0).
    if higher_is_better:
        return "win" if hi < 0 else "loss" if lo > 0 else "tie"
    return "win" if lo > 0 else "loss" if hi < 0 else "tie"


def goal_rows(rep: dict[str, Any]) -> list[dict[str, Any]]:
    primary = rep["primary_metric"]
    hib = rep["higher_is_better"][primary]
    paired = rep.get("paired_vs_" + REFERENCE) or {}
    names = list(GOAL) + (list(GOAL_RATING) if rep["kind"] == "rating" else [])
    rows = []
    for name in names:
        e = rep["methods"].get(name)
        if e is None:
            continue
        if e["status"] != "ok" or name not in paired:
            rows.append({"method": name, "verdict": "not evaluated", "reason": e.get("reason", "")})
            continue
        d = paired[name]["metrics"].get(primary)
        rows.append({"method": name, "n_users": paired[name]["n_users"], "diff": d, "verdict": verdict(d, hib)})
    return rows


EXPERIMENTS = ("encoders", "recipes")  # trainer.compare's reports (<set>.json), shown beside the evaluation


def load_experiments(out: Path) -> list[dict[str, Any]]:
    """The training comparisons in `out` (`python -m trainer.compare --set S` writes S.json)."""
    exps = []
    for name in EXPERIMENTS:
        try:
            rep = json.loads((out / f"{name}.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(rep, dict) and isinstance(rep.get("variants"), dict) and rep["variants"]:
            exps.append({"set": name, **rep})
    return exps


def vs_user_mean(r: dict[str, Any]) -> str:
    """A training variant's MAE minus the user-mean reference's, with its bootstrap CI ('-' if not measured)."""
    ci = r.get("mae_true_minus_user_median_ci95")
    if not ci:
        return "-"
    return f"{r['mae_median_true'] - r['mae_user_median']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"


def experiment_lines(exps: list[dict[str, Any]]) -> list[str]:
    """A compact table per training comparison: does the profile matter, and how close to user-mean."""
    if not exps:
        return []
    lines = ["## What was tried in training", "",
             "Trainer-side scores on validation users (PyTorch, the de-quantized base), one change at a time; "
             "the full tables are in the linked reports. Gap = shuffled - true profile loss (> 0: the profile "
             "is used).", ""]
    for e in exps:
        lines += [f"### {e['set']} ({e['task']}; [{e['set']}.md]({e['set']}.md))", "", f"`{e['command']}`", "",
                  "| variant | steps | gap [95% CI] | MAE true | MAE shuffled | MAE user-mean | true - user-mean [95% CI] |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, r in e["variants"].items():
            lo, hi = r.get("gap_loss_ci95", [float("nan")] * 2)
            mae = [f"{r[k]:.3f}" if k in r else "-" for k in ("mae_median_true", "mae_median_shuffled", "mae_user_median")]
            mae.append(vs_user_mean(r))
            lines.append(f"| {name} | {r.get('steps', '-')} | {r['gap_loss']:.3f} [{lo:.3f}, {hi:.3f}] | " + " | ".join(mae) + " |")
        lines.append("")
    return lines


def build_summary(reps: list[dict[str, Any]]) -> dict[str, Any]:
    tasks = []
    for rep in reps:
        primary = rep["primary_metric"]
        tasks.append({
            "task": rep["task"], "split": rep["split"], "kind": rep["kind"], "primary_metric": primary,
            "higher_is_better": rep["higher_is_better"][primary], "n_users": rep["data"]["n_users"],
            "n_queries": rep["data"]["n_queries"], "command": rep["command"],
            "methods": {n: {"n_users": e["n_users"], primary: e["metrics"][primary]}
                        for n, e in rep["methods"].items() if e["status"] == "ok"},
            "goal": goal_rows(rep), "copy": copy_rates(rep),
            "machine": rep["machine"], "measured": measured(rep), "bundle": report_bundle(rep),
            "compute_s": round(sum(e.get("seconds", 0.0) for e in rep["methods"].values()), 1),
            "oppu_s": round(rep["methods"].get("oppu", {}).get("seconds", 0.0), 1),
            "bundle_s": round(bundle_seconds(rep), 1),
        })
    wins = [g for t in tasks for g in t["goal"] if g["verdict"] in ("win", "tie", "loss")]
    return {"tasks": tasks, "counts": {v: sum(g["verdict"] == v for g in wins) for v in ("win", "tie", "loss")},
            "compute_s": round(sum(t["compute_s"] for t in tasks), 1), "oppu_s": round(sum(t["oppu_s"] for t in tasks), 1),
            "bundle_s": round(sum(t["bundle_s"] for t in tasks), 1),
            "oppu_users": sum(t["methods"].get("oppu", {}).get("n_users", 0) for t in tasks)}


def bundle_seconds(rep: dict[str, Any]) -> float:
    """The seconds of the methods that read the bundle (their fingerprint starts with its hash): what a new bundle
    re-measures. The other methods' results do not depend on it, and the runner reuses them."""
    head = report_bundle(rep)
    return sum(e.get("seconds", 0.0) for e in rep["methods"].values()
               if head and (e.get("fingerprint") or "").startswith(head))


def cost_line(summary: dict[str, Any]) -> str:
    """How long the evaluation took: the methods' own seconds (each row ran on one core, P2P_THREADS=1)."""
    hours, oppu_hours = summary["compute_s"] / 3600, summary["oppu_s"] / 3600
    # OPPU trains in the per-user step the runner times, so its training is inside its methods' seconds.
    oppu = (f"OPPU's training of one LoRA per user included ({oppu_hours:.1f} core-hours for {summary['oppu_users']} "
            "users)" if summary["oppu_users"] else "no OPPU")
    return (f"The rows above took {hours:.1f} core-hours to compute (the sum of each method's time in the reports, "
            f"one core per row): about {hours / 2:.1f} h on a 2-core machine running two rows at a time "
            f"(`scripts/evaluate.sh` with `ONLY=`), {oppu}. A new bundle re-measures only the methods that read "
            f"it: {summary['bundle_s'] / 3600:.1f} core-hours of these (the others' results are reused).")


HEADLINE = ("p2p", "base", "rag", "pag", "all-history", "mt-lora", "oppu", "p2p-shuffled", "user-mean")


def headline_table(summary: dict[str, Any]) -> list[str]:
    """One row per task and split: the primary metric of the main methods (point estimates; CIs below)."""
    lines = ["| task (split, metric) | users | " + " | ".join(HEADLINE) + " | p2p copies (real) | measured |",
             "| --- | --- | " + " | ".join("---" for _ in HEADLINE) + " | --- | --- |"]
    for t in summary["tasks"]:
        pm = t["primary_metric"]
        cells = []
        for name in HEADLINE:
            m = t["methods"].get(name)
            v = m[pm].get("value") if m else None
            cell = "-" if v is None else (f"**{v:.3f}**" if name == REFERENCE else f"{v:.3f}")
            if m and v is not None and m["n_users"] != t["n_users"]:
                cell += f" ({m['n_users']} users)"  # e.g. OPPU: not comparable at a glance; see the paired rows
            cells.append(cell)
        arrow = "↑" if t["higher_is_better"] else "↓"
        c = t.get("copy")
        copies = "-" if not c else f"{c['p2p']:.1%}" + (f" ({c['real']:.1%})" if c.get("real") is not None else "")
        lines.append(f"| {t['task']} ({t['split']}, {pm} {arrow}) | {t['n_users']} | " + " | ".join(cells)
                     + f" | {copies} | {t['measured']} |")
    return lines


def to_markdown(summary: dict[str, Any], title: str = "Evaluation summary") -> str:
    lines = [f"# {title}", "",
             "Every figure below is read from the per-task reports in this folder (`<task>-<split>.md`), which "
             "hold the full tables, the command, the machine and the git commit. Primary metric per task, "
             "95% bootstrap CI over users. `p2p eval --summary` writes this page.", "",
             *headline_table(summary), "",
             "OPPU trains one LoRA per user, so it ran on the first few users only: compare it through the paired "
             "differences below (same users), not this row. A '-' is a method not run on that split.", ""]
    for split in SPLIT_ORDER:
        ts = [t for t in summary["tasks"] if t["split"] == split]
        if not ts:
            continue
        lines += [f"## {split} split", ""]
        for t in ts:
            arrow = "higher is better" if t["higher_is_better"] else "lower is better"
            lines += [f"### {t['task']} ({t['primary_metric']}, {arrow}; {t['n_users']} users, {t['n_queries']} queries)",
                      "", f"`{t['command']}`", "", "| method | users | " + t["primary_metric"] + " |", "| --- | --- | --- |"]
            for name, m in t["methods"].items():
                lines.append(f"| {'**' + name + '**' if name == REFERENCE else name} | {m['n_users']} | "
                             f"{fmt(m[t['primary_metric']])} |")
            lines += ["", "P2P against each comparison (method - P2P, same users):", "",
                      "| vs | users | difference | P2P |", "| --- | --- | --- | --- |"]
            for g in t["goal"]:
                if "diff" in g:
                    lines.append(f"| {g['method']} | {g['n_users']} | {fmt(g['diff'])} | {g['verdict']} |")
                else:
                    lines.append(f"| {g['method']} | - | - | not evaluated |")
            lines.append("")
    if summary.get("stale"):
        lines += ["## Left out: measured with another bundle", "",
                  "These reports are older than the shipped bundle; no figure above comes from them.", ""]
        lines += [f"- {r['task']} ({r['split']}): {r['measured']}" for r in summary["stale"]] + [""]
    c = summary["counts"]
    lines += ["## Scoreboard", "",
              f"Across every task, split and comparison above: P2P **wins {c['win']}**, ties {c['tie']}, "
              f"loses {c['loss']} (win = the CI of the paired difference excludes 0 in P2P's favour).", "",
              cost_line(summary), ""]
    lines += experiment_lines(summary.get("experiments", []))
    return "\n".join(lines) + "\n"


def write_chart(summary: dict[str, Any], path: Path) -> Path | None:
    """One panel per task (test split, else the first split): primary metric per method with 95% CIs."""
    if find_spec("matplotlib") is None:
        return None
    seen, panels = set(), []
    for t in sorted(summary["tasks"], key=lambda t: SPLIT_ORDER.index(t["split"]) if t["split"] in SPLIT_ORDER else 9):
        if t["task"] not in seen:
            seen.add(t["task"])
            panels.append(t)
    if not panels:
        return None
    with pyplot(path.parent) as plt:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.6), squeeze=False)
        for ax, t in zip(axes[0], panels, strict=True):
            pm = t["primary_metric"]
            rows = [(n, m[pm]) for n, m in t["methods"].items() if m[pm].get("value") is not None]
            names = [n for n, _ in rows]
            vals = [e["value"] for _, e in rows]
            lo = [e["value"] - (e["ci"][0] if e["ci"][0] is not None else e["value"]) for _, e in rows]
            hi = [(e["ci"][1] if e["ci"][1] is not None else e["value"]) - e["value"] for _, e in rows]
            colors = ["#c0392b" if n == REFERENCE else "#7f8c8d" if n.startswith(REFERENCE + "-") else "#2c7fb8"
                      for n in names]
            y = list(range(len(rows)))[::-1]
            ax.barh(y, vals, xerr=[lo, hi], color=colors, capsize=3)
            ax.set_yticks(y, names)
            ax.set_title(f"{t['task']} ({t['split']})", fontsize=10)
            ax.set_xlabel(f"{pm} ({'higher' if t['higher_is_better'] else 'lower'} is better)")
        fig.suptitle("P2P (red), its controls (grey) and every other method; 95% CI over users", fontsize=10)
        return save(fig, path)


README_BEGIN, README_END = "<!-- summary:begin -->", "<!-- summary:end -->"


def splice_readme(path: Path, summary: dict[str, Any]) -> None:
    """Replace the block between the README's summary markers with the headline table (so the README's
    figures are exactly what the reports measured)."""
    text = path.read_text(encoding="utf-8")
    if README_BEGIN not in text or README_END not in text:
        from p2p_local.errors import DataError

        raise DataError(f"{path} has no {README_BEGIN} ... {README_END} block", hint="add the two markers")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    c = summary["counts"]
    block = "\n".join(["", *headline_table(summary), "",
                       f"P2P against every comparison, all tasks and splits: wins {c['win']}, ties {c['tie']}, "
                       f"loses {c['loss']} (paired 95% CIs over users; details in `reports/SUMMARY.md`). "
                       + cost_line(summary), ""])
    path.write_text(head + README_BEGIN + block + README_END + tail, encoding="utf-8")


def write_summary(out: Path, card_dir: Path | None = None, log=print, readme: Path | None = None) -> list[Path]:
    """Write SUMMARY.md / summary.json / summary.png into `out` (EVAL.md into `card_dir`; the headline
    table into `readme`'s summary block)."""
    from p2p_local.bundle import Bundle

    # The bundle the reports must have measured: the one --card names when it is a bundle, else the shipped one.
    bundle_dir = card_dir if card_dir is not None and (Path(card_dir) / "manifest.json").is_file() else None
    reps, stale = split_stale(load_reports(out), Bundle.load(bundle_dir).sha256)
    if not reps:
        from p2p_local.errors import DataError

        raise DataError(f"no evaluation reports of the shipped bundle in {out}"
                        + (f" ({len(stale)} measured with another bundle)" if stale else ""),
                        hint="run `p2p eval --task T` (scripts/evaluate.sh runs them all)")
    summary = build_summary(reps)
    summary["stale"] = [{"task": r["task"], "split": r["split"], "measured": measured(r)} for r in stale]
    summary["experiments"] = [{k: e[k] for k in ("set", "task", "command", "variants")} for e in load_experiments(out)]
    paths = [out / "summary.json", out / "SUMMARY.md"]
    paths[0].write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths[1].write_text(to_markdown(summary), encoding="utf-8")
    png = write_chart(summary, out / "summary.png")
    if png:
        paths.append(png)
    if card_dir is not None:
        card = Path(card_dir) / "EVAL.md"
        card.write_text(to_markdown(summary, f"Evaluation card: {Path(card_dir).name}"), encoding="utf-8")
        paths.append(card)
    if readme is not None:
        splice_readme(Path(readme), summary)
        paths.append(Path(readme))
    log("wrote " + ", ".join(str(p) for p in paths))
    return paths
