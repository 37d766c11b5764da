"""Carry stored results over to a bundle that differs only in what its manifest records (its name, dates, the
tasks and cards it lists, its training notes), not in anything that computes an answer.

    python -m p2p_lab.eval.relabel OLD_BUNDLE NEW_BUNDLE RUN_DIR [RUN_DIR ...]

Why: a result's fingerprint carries the bundle's hash, which covers the whole manifest (it is also the adapter
cache key), so a re-export that only corrects the record would otherwise re-measure every row (hours on a CPU).
Checked first: the same ONNX bytes and the same manifest everywhere outside `RECORD`. Then each stored result
whose fingerprint opens with OLD's hash is appended again under NEW's (the store is append-only: the old lines
stay, and `p2p eval` with NEW then finds its rows). Re-measuring a few users with NEW is the check that it holds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from p2p_lab.eval.runner import ResultStore
from p2p_local.bundle import Bundle, read_manifest
from p2p_local.data.format import FREE_CHAT
from p2p_local.errors import P2PError

# The manifest's record of a bundle: read by `p2p models list`, `ask --json` and the notes, never by the
# hypernetwork, the adapter or the prompt. One exception, kept below: a bundle that lists free chat among its tasks
# gets an adapter in free chat (`Session.free_chat_adapter`).
RECORD = frozenset({"name", "created", "git_commit", "tasks", "cards", "training", "evaluation"})


def computing_fields(manifest: dict) -> dict:
    out = {k: v for k, v in manifest.items() if k not in RECORD}
    out["free chat adapter"] = any(isinstance(t, dict) and t.get("name") == FREE_CHAT for t in manifest.get("tasks", []))
    return out


def check_same_answers(old: Path, new: Path) -> None:
    """Raise ValueError unless OLD and NEW compute the same adapters: same ONNX bytes, same manifest outside
    RECORD."""
    (_, old_m), (_, new_m) = read_manifest(old), read_manifest(new)
    if old_m["onnx"]["sha256"] != new_m["onnx"]["sha256"]:
        raise ValueError(f"{old} and {new} hold different hypernetworks: re-measure, do not relabel")
    a, b = computing_fields(old_m), computing_fields(new_m)
    if a != b:
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise ValueError(f"the manifests differ in {', '.join(keys)}, which compute the answer: re-measure")


def relabel(old: Path, new: Path, run_dirs: list[Path]) -> int:
    """Append OLD's stored results under NEW's fingerprint in each run dir; return how many were added."""
    check_same_answers(old, new)
    old_h, new_h = (Bundle.load(p, threads=1).sha256[:16] for p in (old, new))
    added = 0
    for run_dir in run_dirs:
        store = ResultStore(run_dir / "results.jsonl")
        for row in list(store.rows.values()):
            fp = row.get("fingerprint", "")
            if fp.startswith(old_h) and not store.get(row["method"], row["user_id"], new_h + fp[16:],
                                                      row.get("data", "")):
                store.put({**row, "fingerprint": new_h + fp[16:]})
                added += 1
    return added


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m p2p_lab.eval.relabel", description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path, help="the bundle the results were measured with")
    ap.add_argument("new", type=Path, help="the same hypernetwork with a corrected manifest")
    ap.add_argument("run_dirs", type=Path, nargs="+", help="p2p eval run dirs (OUT/runs/<task>-<split>-<key>)")
    args = ap.parse_args(argv)
    try:
        n = relabel(args.old, args.new, args.run_dirs)
    except (ValueError, P2PError) as e:  # a refused manifest or bundle too: said, not a traceback
        print(f"error: {str(e).splitlines()[0]}")
        return 1
    print(json.dumps({"added": n, "run_dirs": [str(d) for d in args.run_dirs]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
