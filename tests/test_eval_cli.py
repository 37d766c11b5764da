"""`p2p eval` end to end through the CLI on a tiny real subset, so the harness cannot rot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from p2p_lab.data.converters import convert
from p2p_local.cli import main
from p2p_local.data.format import builtin_card, write_users_jsonl


@pytest.fixture
def home(p2p_home, monkeypatch):
    monkeypatch.delenv("P2P_CACHE", raising=False)  # prepared task sets go under the private P2P_HOME
    return p2p_home


def _numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, float | int) and not isinstance(obj, bool):
        yield obj


def _results_lines(out: Path) -> int:
    (f,) = out.glob("runs/*/results.jsonl")
    return len(f.read_text().splitlines())


def test_eval_builtin_task_end_to_end_and_resume(home, tmp_path, capsys):
    assert main(["data", "prepare", "--tasks", "movielens-rating", "--no-encoder", "--quiet"]) == 0
    out = tmp_path / "reports"
    args = ["eval", "--task", "movielens-rating", "--methods", "base,user-mean,mt-lora", "--users", "3",
            "--queries", "2", "--out", str(out), "--bootstrap", "200", "--n-ctx", "512",
            "--mtlora", str(tmp_path / "missing.gguf")]
    assert main(args) == 0
    rep = json.loads((out / "movielens-rating-test.json").read_text())
    md = (out / "movielens-rating-test.md").read_text()
    assert rep["data"]["n_users"] == 3 and rep["data"]["n_queries"] == 6
    for name in ("base", "user-mean"):
        e = rep["methods"][name]
        assert e["status"] == "ok" and e["n_users"] == 3 and e["n_queries"] == 6
        for k in ("mae", "rmse", "mae_argmax", "mae_ev", "ce", "acc"):
            v, (lo, hi) = e["metrics"][k]["value"], e["metrics"][k]["ci"]
            assert math.isfinite(v) and lo <= v <= hi, (name, k)
        assert f"| {name} | 3 | 6 |" in md
    assert rep["methods"]["mt-lora"]["status"] == "skipped"
    assert "missing.gguf" in rep["methods"]["mt-lora"]["reason"] and "missing.gguf" in md
    assert all(math.isfinite(x) for x in _numbers(rep))
    assert rep["command"].startswith("p2p eval --task movielens-rating") and rep["machine"]["cpu_count"] >= 1
    assert rep["by_activity"] and sum(b["n_users"] for b in rep["by_activity"]) == 3
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not (out / "movielens-rating-test.png").exists()
    else:
        assert (out / "movielens-rating-test.png").stat().st_size > 1000
    assert _results_lines(out) == 6  # (base, user-mean) x 3 users

    # Interrupted mid-write: the last (method, user) line is cut. A re-run reuses the 5 complete ones,
    # recomputes only the cut one, and reports the same numbers.
    (results,) = out.glob("runs/*/results.jsonl")
    lines = results.read_text().splitlines()
    results.write_text("\n".join(lines[:5]) + "\n" + lines[5][:40])
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "[base] 3/3 users" in err and "3 from earlier runs" in err and "2 from earlier runs" in err
    again = json.loads((out / "movielens-rating-test.json").read_text())
    for name in ("base", "user-mean"):
        assert again["methods"][name]["metrics"] == rep["methods"][name]["metrics"]


def test_eval_bring_your_own_data(home, tmp_path):
    users = [u for u in convert("popquorn-offensiveness").users[:40]]
    data = tmp_path / "users.jsonl"
    write_users_jsonl(data, users)
    card = tmp_path / "card.json"
    builtin_card("popquorn-offensiveness").save(card)
    out = tmp_path / "r"
    assert main(["eval", "--data", str(data), "--task-card", str(card), "--task", "mine",
                 "--methods", "global-mean,user-mean,user-item-bias", "--queries", "4", "--out", str(out),
                 "--bootstrap", "100"]) == 0
    rep = json.loads((out / "mine-test.json").read_text())
    assert rep["data"]["n_users"] == 8 and rep["data"]["source"] == str(data)  # 20% of 40 users held out
    for e in rep["methods"].values():
        assert e["status"] == "ok" and math.isfinite(e["metrics"]["mae"]["value"])


def test_eval_rejects_bad_arguments(home, tmp_path, capsys):
    assert main(["eval", "--task", "movielens-rating", "--methods", "nope", "--out", str(tmp_path)]) != 0
    assert main(["eval", "--data", str(tmp_path / "x.jsonl")]) != 0
    err = capsys.readouterr().err
    assert "unknown method" in err and "--task-card" in err


def test_eval_p2p_then_summary_and_card(home, tmp_path):
    """P2P on the deployed path (shipped bundle -> ONNX -> GGUF -> llama.cpp) next to Base, then the summary
    page and the bundle's evaluation card gathered from the report."""
    assert main(["data", "prepare", "--tasks", "popquorn-offensiveness", "--no-encoder", "--quiet"]) == 0
    out = tmp_path / "reports"
    assert main(["eval", "--task", "popquorn-offensiveness", "--methods", "base,p2p,user-mean", "--users", "3",
                 "--queries", "2", "--out", str(out), "--bootstrap", "200", "--n-ctx", "512"]) == 0
    rep = json.loads((out / "popquorn-offensiveness-test.json").read_text())
    assert rep["methods"]["p2p"]["status"] == "ok" and rep["methods"]["p2p"]["n_queries"] == 6
    card = tmp_path / "bundle"
    card.mkdir()
    assert main(["eval", "--summary", "--out", str(out), "--card", str(card)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    (t,) = summary["tasks"]
    goal = {g["method"]: g for g in t["goal"]}
    # The verdict is read off the report's paired difference, never decided here.
    # Both compared methods: the verdict must be the one their interval implies (a verdict merely being one
    # of the three words would pass a summary that mixed them up).
    for method in ("base", "user-mean"):
        d = rep["paired_vs_p2p"][method]["metrics"]["mae"]
        assert goal[method]["diff"] == d
        lo, hi = d["ci"]
        assert goal[method]["verdict"] == ("win" if lo > 0 else "loss" if hi < 0 else "tie"), method
    assert set(goal) == {"base", "user-mean"}  # only what was evaluated is compared
    md = (out / "SUMMARY.md").read_text()
    assert "| **p2p** | 3 |" in md and "Scoreboard" in md
    assert (card / "EVAL.md").read_text().startswith("# Evaluation card: bundle")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- summary:begin -->\nold\n<!-- summary:end -->\noutro\n")
    assert main(["eval", "--summary", "--out", str(out), "--readme", str(readme)]) == 0
    text = readme.read_text()
    p2p_mae = rep["methods"]["p2p"]["metrics"]["mae"]["value"]
    assert "old" not in text and text.startswith("intro") and text.endswith("outro\n")
    assert f"**{p2p_mae:.3f}**" in text  # the figure the report measured, nothing else
    assert main(["eval", "--summary", "--out", str(tmp_path / "empty")]) != 0  # nothing to gather: an error


@pytest.mark.parametrize("ci,hib,expected", [((0.1, 0.3), False, "win"), ((-0.3, -0.1), False, "loss"),
                                             ((-0.1, 0.2), False, "tie"), ((-0.3, -0.1), True, "win"),
                                             ((0.1, 0.3), True, "loss")])
def test_summary_verdict(ci, hib, expected):
    from p2p_lab.eval.summary import verdict

    assert verdict({"value": sum(ci) / 2, "ci": list(ci)}, hib) == expected


def test_eval_trains_oppu_per_user_and_scores_it(home, tmp_path):
    """OPPU on the real path: a LoRA trained for the user in a subprocess (torch stays out of the app's
    process), written as GGUF, attached in llama.cpp and scored; capped to the user's latest 4 items."""
    assert main(["data", "prepare", "--tasks", "popquorn-offensiveness", "--no-encoder", "--quiet"]) == 0
    out = tmp_path / "reports"
    oppu_dir = tmp_path / "oppu"
    assert main(["eval", "--task", "popquorn-offensiveness", "--methods", "oppu", "--users", "2", "--queries", "2",
                 "--out", str(out), "--bootstrap", "100", "--n-ctx", "512", "--oppu-train", "--oppu-users", "1",
                 "--oppu-max-items", "4", "--oppu-dir", str(oppu_dir)]) == 0
    rep = json.loads((out / "popquorn-offensiveness-test.json").read_text())
    e = rep["methods"]["oppu"]
    assert e["status"] == "ok" and e["n_users"] == 1 and e["n_queries"] == 2  # the other user is outside --oppu-users
    assert "--oppu-max-items 4" in rep["command"] and len(list(oppu_dir.glob("*.gguf"))) == 1
    assert not list(oppu_dir.glob("*.history.jsonl"))  # the user's items handed to the trainer are removed

    def oppu_users(n: int) -> int:
        assert main(["eval", "--task", "popquorn-offensiveness", "--methods", "oppu", "--users", "2", "--queries", "2",
                     "--out", str(out), "--bootstrap", "100", "--n-ctx", "512", "--oppu-train", "--oppu-users", str(n),
                     "--oppu-max-items", "4", "--oppu-dir", str(oppu_dir)]) == 0
        return json.loads((out / "popquorn-offensiveness-test.json").read_text())["methods"]["oppu"]["n_users"]

    assert oppu_users(2) == 2 and len(list(oppu_dir.glob("*.gguf"))) == 2  # the second user is trained now
    assert oppu_users(1) == 1  # a stored result beyond --oppu-users is not reported


def test_summary_shows_the_training_comparisons(tmp_path):
    """The summary's "what was tried" tables come from trainer.compare's committed reports, figure for figure."""
    import shutil

    from p2p_lab.eval.summary import experiment_lines, load_experiments

    root = Path(__file__).resolve().parents[1] / "reports"
    shutil.copy(root / "encoders.json", tmp_path / "encoders.json")
    (tmp_path / "recipes.json").write_text("{not json")  # a broken file is skipped, not fatal
    (exp,) = load_experiments(tmp_path)
    lines = "\n".join(experiment_lines([exp]))
    for name, r in exp["variants"].items():
        assert f"| {name} | {r['steps']} | {r['gap_loss']:.3f} " in lines
    assert experiment_lines([]) == []


def test_result_store_keeps_a_row_per_fingerprint(tmp_path):
    """A retrained bundle adds rows beside the old ones: going back to the old bundle reuses its results."""
    from p2p_lab.eval.runner import ResultStore

    path = tmp_path / "results.jsonl"
    store = ResultStore(path)
    store.put({"method": "p2p", "user_id": "u1", "fingerprint": "old", "data": "d", "records": [1]})
    store.put({"method": "p2p", "user_id": "u1", "fingerprint": "new", "data": "d", "records": [2]})
    again = ResultStore(path)  # as a later run reads it
    assert again.get("p2p", "u1", "old", "d")["records"] == [1]
    assert again.get("p2p", "u1", "new", "d")["records"] == [2]
    assert again.get("p2p", "u1", "new", "other-data") is None  # the user's data changed: recompute
    assert again.get("base", "u1", "old", "d") is None
