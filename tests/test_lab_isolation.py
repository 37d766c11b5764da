"""The lab never writes over what ships or what the user owns (issue 24): `p2p bench` and `p2p eval`, run
against a user's data dir holding a profile with cached adapters, leave every cached adapter (file and row)
and every tracked report unchanged; `p2p eval` without --out writes under the data dir."""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
from pathlib import Path

from p2p_lab.data.converters import convert
from p2p_local import paths
from p2p_local.cli import main
from p2p_local.data.format import builtin_card, write_users_jsonl
from p2p_local.demo import demo_path

REPO = Path(__file__).resolve().parents[1]


def digests(files: list[Path]) -> dict[str, str]:
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


def users_state(home: Path) -> tuple[dict[str, str], list[tuple]]:
    """The user's adapter cache: every file under adapters/ and every row of the store's adapter table."""
    files = digests(sorted((home / "adapters").rglob("*")))
    con = sqlite3.connect(home / "p2p.sqlite3")
    try:
        rows = sorted(con.execute("SELECT profile_id, fingerprint, bundle_hash, path, sha256 FROM adapters"))
    finally:
        con.close()
    return files, rows


def test_bench_and_eval_leave_the_users_adapters_and_the_tracked_reports_alone(p2p_home: Path, tmp_path: Path,
                                                                               monkeypatch) -> None:
    monkeypatch.delenv("P2P_CACHE", raising=False)
    assert main(["profile", "create", "demo", "--task", "movielens-rating"]) == 0
    assert main(["profile", "import", "demo", str(demo_path())]) == 0
    for q in ("Heat (1995) | Genres: Action|Crime|Thriller", "Toy Story (1995) | Genres: Animation|Comedy",
              "Alien (1979) | Genres: Horror|Sci-Fi"):
        assert main(["ask", q, "--profile", "demo", "--task", "movielens-rating"]) == 0
    before = users_state(p2p_home)
    assert len(before[0]) == 3 and len(before[1]) == 3  # three query-aware adapters cached
    tracked = [REPO / f for f in subprocess.run(["git", "ls-files", "reports", "models"], cwd=REPO, check=True,
                                                capture_output=True, text=True).stdout.split()]
    reports_before = digests(tracked)

    assert main(["bench", "personalize", "--json"]) == 0
    data, card = tmp_path / "users.jsonl", tmp_path / "card.json"
    write_users_jsonl(data, convert("popquorn-offensiveness").users[:10])
    builtin_card("popquorn-offensiveness").save(card)
    assert main(["eval", "--data", str(data), "--task-card", str(card), "--task", "mine", "--split", "all",
                 "--methods", "base,p2p,user-mean", "--users", "2", "--queries", "1", "--bootstrap", "50"]) == 0

    assert users_state(p2p_home) == before  # `bench personalize` once wrote its store's profile-1 adapters here
    assert digests(tracked) == reports_before
    assert (paths.data_dir() / "eval" / "mine-all.json").is_file()  # the default --out: inside the data dir
