"""A sample of the robustness catalogue (`python -m p2p_lab.robustness`, reports/robustness.md): two cases of
every class through the real CLI, in subprocesses with their own data dirs, under a minute. None may end in
a traceback, a native abort, a hang or a lost file."""

from __future__ import annotations

import os

import pytest

from p2p_lab import robustness as R


def test_a_sample_of_the_catalogue_fails_cleanly(base_model_path) -> None:
    cases = R.sample(R.catalogue(), per_class=2)
    assert {c.cls for c in cases} == set(R.CLASSES)
    results = R.run(cases, jobs=2)
    table = R.tally(results)
    total = table["total"]
    assert total["tried"] + total["skipped"] == len(cases) >= 2 * len(R.CLASSES)
    assert R.bad(results) == [], [(r.cls, r.name, r.outcome, r.lost, r.stderr_tail) for r in R.bad(results)]
    assert total["clean"] > 0 and total["unclear"] == 0


def test_the_classifier_sees_what_it_must() -> None:
    """What counts as clean, and what the report must flag."""
    res = R.Result("x", "y", "success", 0, 0.0)
    assert R._clean("error: no profile named 'x'\n  hint: create it\n")
    assert not R._clean("error: something\n")  # no hint: unclear
    assert R.bad([res]) == []
    for outcome in ("traceback", "abort", "hang"):
        assert R.bad([R.Result("x", "y", outcome, 1, 0.0)])
    assert R.bad([R.Result("x", "y", "clean", 1, 0.0, ["store: profile demo is gone"])])


@pytest.mark.parametrize("argv, outcome", [
    (["-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"], "abort"),
    (["-c", "raise RuntimeError('planted')"], "traceback"),
    (["-c", "import time; time.sleep(30)"], "hang"),
])
def test_planted_failures_are_counted(tmp_path, monkeypatch, argv, outcome) -> None:
    """Swap the CLI for a planted child: the runner must call it an abort, a traceback, a hang."""
    import shutil

    tpl = tmp_path / "tpl"
    (tpl / "home").mkdir(parents=True)
    (tpl / "work" / "keep").mkdir(parents=True)
    monkeypatch.setattr(R, "_rehome", lambda ctx: None)
    monkeypatch.setattr(R.sys, "executable", shutil.which("python3") or R.sys.executable)
    case = R.Case("CLI arguments", "planted", [], timeout=3)
    real_popen = R.subprocess.Popen

    def popen(cmd, *a, **k):
        return real_popen([cmd[0], *argv], *a, **k)

    monkeypatch.setattr(R.subprocess, "Popen", popen)
    r = R.run_case(case, tpl, tmp_path, tmp_path, can_mount=False)
    assert r.outcome == outcome


def _bare_template(tmp_path):
    tpl = tmp_path / "tpl"
    (tpl / "home").mkdir(parents=True)
    (tpl / "work" / "keep").mkdir(parents=True)
    return tpl


@pytest.mark.parametrize("plant", ["", "dry-run-writes"])
def test_a_case_check_counts_bad_data_accepted(tmp_path, monkeypatch, plant) -> None:
    """The issue-19 case `--dry-run on a new machine`, on the real CLI: clean as the app is; with the planted
    bug (the dry run opens the store for writing, as before) its check reports bad data accepted."""
    monkeypatch.setattr(R, "_rehome", lambda ctx: None)
    if plant:
        d = tmp_path / "plant"
        d.mkdir()
        (d / "sitecustomize.py").write_text("import p2p_local.commands.profile as p\n"
                                            "from p2p_local.store import Store\n"
                                            "p._import_store = lambda dry_run: Store()\n")
        monkeypatch.setenv("PYTHONPATH", f"{d}{os.pathsep}{R.REPO}")
    case = next(c for c in R.catalogue() if c.name == "--dry-run on a new machine")
    r = R.run_case(case, _bare_template(tmp_path), tmp_path, tmp_path, can_mount=False)
    assert r.outcome == "success" and (r.wrong.startswith("bad data accepted") == bool(plant)), r
    assert bool(r.wrong) == bool(plant)  # (the bare template has no store: `lost` says so, not checked here)


def test_every_case_watches_home(tmp_path, monkeypatch) -> None:
    """A command that leaves a file in $HOME (onnxruntime's telemetry did) is bad data accepted, whatever
    its exit code."""
    monkeypatch.setattr(R, "_rehome", lambda ctx: None)
    case = R.Case("privacy", "planted", [], shell='mkdir -p "$HOME/.cache/x" && touch "$HOME/.cache/x/deviceid"')
    r = R.run_case(case, _bare_template(tmp_path), tmp_path, tmp_path, can_mount=False)
    assert r.wrong.startswith("bad data accepted: wrote outside the data dir"), r
