"""`p2p eval --summary` builds the README's headline from the reports, and only from reports of the shipped
bundle: every number in the spliced table equals the report it came from; a report measured with another
bundle is left out (and listed as such)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from p2p_lab.eval.summary import HEADLINE, README_BEGIN, README_END, report_bundle
from p2p_local.bundle import Bundle
from p2p_local.cli import main

REPORTS = Path(__file__).resolve().parents[1] / "reports"


def test_the_headline_numbers_are_the_reports(tmp_path: Path) -> None:
    for f in sorted(REPORTS.glob("*-test.json")) + sorted(REPORTS.glob("*-ood.json")):
        shutil.copy(f, tmp_path / f.name)
    # A report of another bundle: must not reach the headline.
    stale = json.loads((tmp_path / "commit-subject-test.json").read_text())
    stale["task"], stale["methods"]["p2p"]["fingerprint"] = "stale-task", "0123456789abcdef:examples=2"
    (tmp_path / "stale-task-test.json").write_text(json.dumps(stale))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_BEGIN}\nold\n{README_END}\nrest\n")
    assert main(["eval", "--summary", "--out", str(tmp_path), "--readme", str(readme)]) == 0

    block = readme.read_text().split(README_BEGIN)[1].split(README_END)[0]
    rows = [r for r in block.splitlines() if r.startswith("| ") and "(" in r.split("|")[1] and "task (" not in r]
    shipped = Bundle.load().sha256[:16]
    reports = {(r["task"], r["split"]): r for r in map(lambda f: json.loads(f.read_text()), tmp_path.glob("*-*.json"))
               if "task" in r}
    current = {k for k, r in reports.items() if report_bundle(r) == shipped}
    assert current, "no report of the shipped bundle in reports/"
    seen = set()
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        task, split, metric = re.fullmatch(r"(\S+) \((\w+), (\w+) [↑↓]\)", cells[0]).groups()
        rep = reports[(task, split)]
        seen.add((task, split))
        assert int(cells[1]) == rep["data"]["n_users"]
        for name, cell in zip(HEADLINE, cells[2:2 + len(HEADLINE)], strict=True):
            m = rep["methods"].get(name)
            if cell == "-":
                assert m is None or m["status"] != "ok" or m["metrics"][metric]["value"] is None
                continue
            value = float(cell.strip("*").split(" ")[0])
            assert abs(value - m["metrics"][metric]["value"]) < 5e-4, (task, split, name)
        assert shipped[:8] in cells[-1]
    assert seen == current  # every current report has its row; the stale one none
    assert "stale-task" in (tmp_path / "SUMMARY.md").read_text().split("Left out")[1]
    # How long it took: the methods' own seconds in the current reports, summed (stated beside the headline).
    hours = sum(e.get("seconds", 0.0) for k in current for e in reports[k]["methods"].values()) / 3600
    assert f"took {hours:.1f} core-hours" in block
    oppu = [reports[k]["methods"]["oppu"] for k in current if reports[k]["methods"].get("oppu", {}).get("status") == "ok"]
    if oppu:  # OPPU's per-user training is timed inside its rows: the line says how much of the total it is
        assert f"{sum(e['seconds'] for e in oppu) / 3600:.1f} core-hours for {sum(e['n_users'] for e in oppu)} users" in block
    else:
        assert "no OPPU" in block
    # What a new bundle re-measures: the methods whose fingerprint starts with the bundle's hash (p2p and its controls).
    ours = [e for k in current for e in reports[k]["methods"].values() if (e.get("fingerprint") or "").startswith(shipped)]
    assert any(e is reports[k]["methods"]["p2p"] for k in current for e in ours)
    assert not any(e is reports[k]["methods"].get("base") for k in current for e in ours)
    assert f"only the methods that read it: {sum(e['seconds'] for e in ours) / 3600:.1f} core-hours" in block
