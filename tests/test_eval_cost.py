"""Deployment-cost measurement (p2p_lab.eval.cost): the P2P path on real users, subprocess rusage."""

from __future__ import annotations

import json
import sys

import pytest

from p2p_lab.eval.cost import measure_cost, run_subprocess_rusage, table
from p2p_local.cli import main


@pytest.fixture
def home(p2p_home, monkeypatch):
    monkeypatch.delenv("P2P_CACHE", raising=False)
    return p2p_home


def test_subprocess_max_rss_is_the_childs_own():
    # The parent holds 400 MB: a naive child ru_maxrss would start there (inherited across fork + exec).
    ballast = bytearray(400 * 2**20)
    ballast[::4096] = b"1" * len(ballast[::4096])
    code, wall, rss, _ = run_subprocess_rusage(
        [sys.executable, "-c", "x = bytearray(150 * 2**20); x[::4096] = b'1' * len(x[::4096])"])
    assert code == 0 and wall > 0
    assert 150 <= rss < 350, rss  # the child's 150 MB counts; the parent's 400 MB does not
    del ballast
    code, _, _, err = run_subprocess_rusage([sys.executable, "-c", "import sys; sys.exit('boom')"])
    assert code == 1 and "boom" in err
    code, wall, _, _ = run_subprocess_rusage([sys.executable, "-c", "import time; time.sleep(30)"], timeout=1)
    assert code != 0 and wall < 20


def test_measure_cost_p2p_path(home):
    assert main(["data", "prepare", "--tasks", "movielens-rating", "--no-encoder", "--quiet"]) == 0
    res = measure_cost("movielens-rating", users=2, oppu=False, log=lambda m: None)
    json.dumps(res, allow_nan=False)  # JSON-ready for `p2p bench cost --json`
    p = res["p2p"]
    assert res["n_users"] == 2 and len(p["per_user"]) == 2
    stages = p["stages_median_s"]
    assert set(stages) == {"profile_s", "encode_s", "hypernet_s", "write_s", "load_attach_s", "total_s"}
    for r in p["per_user"]:  # the total is the whole path, not the hypernetwork call alone
        parts = r["profile_s"] + r["encode_s"] + r["hypernet_s"] + r["write_s"] + r["load_attach_s"]
        assert parts <= r["total_s"] + 1e-6 and r["hypernet_s"] < r["total_s"]
        assert r["peak_alloc_mb"] > 0
    assert p["process_max_rss_mb"] > 100  # the base model is loaded in this process
    assert res["oppu"] == {"status": "skipped", "reason": "not requested"} and res["ratio_oppu_over_p2p"] is None
    assert "P2P" in table(res) and "OPPU skipped" in table(res)
