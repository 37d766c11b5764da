"""`python -m p2p_lab.eval.relabel`: stored results follow a manifest-only correction, and nothing else."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from p2p_lab.eval.relabel import main
from p2p_lab.eval.runner import ResultStore
from p2p_local.bundle import DEFAULT_BUNDLE, Bundle
from p2p_local.paths import repo_root

SHIPPED = repo_root() / "models" / DEFAULT_BUNDLE


def _bundle(dest: Path, **changes) -> Path:
    shutil.copytree(SHIPPED, dest, ignore=shutil.ignore_patterns("*.gguf", "*.md"))
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest.update(changes)
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dest


def test_results_follow_a_record_only_change_and_nothing_else(tmp_path, capsys) -> None:
    old = _bundle(tmp_path / "old")
    new = _bundle(tmp_path / "new", name="renamed", cards={}, tasks=[])
    old_h, new_h = (Bundle.load(p, threads=1).sha256[:16] for p in (old, new))
    assert old_h != new_h
    run = tmp_path / "run"
    store = ResultStore(run / "results.jsonl")
    store.put({"method": "p2p", "user_id": "u1", "fingerprint": old_h + ":examples=2", "data": "d", "records": [1]})
    store.put({"method": "base", "user_id": "u1", "fingerprint": "other", "data": "d", "records": [2]})

    assert main([str(old), str(new), str(run)]) == 0
    assert json.loads(capsys.readouterr().out)["added"] == 1
    again = ResultStore(run / "results.jsonl")
    assert again.get("p2p", "u1", new_h + ":examples=2", "d")["records"] == [1]
    assert again.get("p2p", "u1", old_h + ":examples=2", "d")["records"] == [1]  # kept
    assert main([str(old), str(new), str(run)]) == 0  # twice adds nothing
    assert json.loads(capsys.readouterr().out)["added"] == 0

    lora = json.loads((old / "manifest.json").read_text())["lora"]
    scaled = _bundle(tmp_path / "scaled", lora={**lora, "scale": lora["scale"] * 2})
    assert main([str(old), str(scaled), str(run)]) == 1
    assert "lora" in capsys.readouterr().out
    (tmp_path / "other").mkdir()
    other = _bundle(tmp_path / "other" / "b")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["onnx"]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    assert main([str(old), str(other), str(run)]) == 1
    assert "different hypernetworks" in capsys.readouterr().out
    chat = _bundle(tmp_path / "chat", tasks=[{"name": "chat", "kind": "generation"}])
    assert main([str(old), str(chat), str(run)]) == 1  # free chat would get an adapter: answers change
    assert "free chat adapter" in capsys.readouterr().out
    assert main([str(old), str(tmp_path / "missing"), str(run)]) == 1
    assert capsys.readouterr().out.startswith("error: ")
