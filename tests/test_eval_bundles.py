"""p2p_lab.eval.bundles: a candidate bundle's answers against the shipped one's, paired by query (small fake run
dirs: the records `p2p eval` stores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from p2p_lab.eval.bundles import compare, main


def run_dir(root: Path, name: str, nll: float, shuffled: float, texts: dict[str, str]) -> Path:
    d = root / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"task": "commit-subject", "split": "test", "options": {"bundle": None}}))
    rows = []
    for method, per_token in (("p2p", nll), ("p2p-shuffled", shuffled)):
        for user, text in texts.items():
            rec = {"text": text, "target": "fix the parser", "nll_sum": per_token * 4, "n_tok": 4, "i": 0,
                   "copy": text == "old subject"}
            rows.append({"method": method, "user_id": user, "records": [rec]})
    (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_a_candidate_is_measured_against_the_shipped_bundle_on_the_same_queries(tmp_path: Path) -> None:
    shipped = run_dir(tmp_path, "a", 3.0, 3.5, {"u1": "old subject", "u2": "fix the parser", "u3": "docs"})
    candidate = run_dir(tmp_path, "b", 2.5, 3.2, {"u1": "fix parser", "u2": "fix the parser", "u3": "docs"})
    m = compare(shipped, candidate)["metrics"]
    assert m["nll"]["shipped"]["value"] == pytest.approx(3.0)
    assert m["nll"]["candidate - shipped"]["value"] == pytest.approx(-0.5)
    assert m["gap"]["candidate"]["value"] == pytest.approx(0.7) and m["gap"]["shipped"]["value"] == pytest.approx(0.5)
    assert m["copy"]["candidate - shipped"]["value"] == pytest.approx(-1 / 3)
    assert m["rougeL"]["candidate - shipped"]["value"] > 0
    assert compare(shipped, shipped)["metrics"]["nll"]["candidate - shipped"]["ci"] == [0.0, 0.0]
    assert main([str(shipped), str(candidate), "--out", str(tmp_path / "cmp")]) == 0
    assert "candidate − shipped" in (tmp_path / "cmp.md").read_text()
    assert json.loads((tmp_path / "cmp.json").read_text())["users"] == 3
