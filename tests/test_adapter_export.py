"""`p2p adapter export`: a stable, readable copy of the profile's adapter that llama.cpp's own loader
(llama_adapter_lora_init, through Engine.load_adapter) loads from the exported path, with the app's
effect; metadata that names what it is; README with exact commands; PEFT folder with a model card."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import gguf
import numpy as np

from p2p_local.adapter import read_adapter
from p2p_local.adapter_export import export_adapter, export_name
from p2p_local.cli import main

TASK = "movielens-rating"
QUERY = "Heat (1995) | Genres: Action|Crime|Thriller"


def _kv(reader: gguf.GGUFReader, key: str):
    f = reader.fields[key]
    v = f.parts[f.data[0]]
    return bytes(v).decode() if f.types[0] == gguf.GGUFValueType.STRING else v[0]


def test_exported_adapter_loads_in_llama_cpp_with_the_apps_effect(session, tmp_path: Path):
    out = tmp_path / "exports"
    ex = export_adapter(session, "demo", out, task=TASK, query=QUERY)
    assert ex.path == out / f"{export_name('demo', TASK, QUERY)}.gguf" and ex.path.name.startswith("demo-movielens-rating-q")
    assert stat.S_IMODE(ex.path.stat().st_mode) == 0o600  # private unless asked

    # The app's answer: what `p2p ask QUERY --profile demo --task movielens-rating` computes.
    r = session.personalize("demo", TASK, query=QUERY)
    app = session.label_distribution(QUERY, TASK)
    assert read_adapter(r.adapter_path).tensors.keys() == read_adapter(ex.path).tensors.keys()
    for name, (a, b) in read_adapter(r.adapter_path).tensors.items():
        a2, b2 = read_adapter(ex.path).tensors[name]
        assert np.array_equal(a, a2) and np.array_equal(b, b2)

    # llama.cpp's loader, at the exported path, attached alone: the same label log-probs.
    adapter = session.engine.load_adapter(ex.path)
    try:
        session.engine.use(adapter, 1.0)
        exported = session.label_distribution(QUERY, TASK)
        session.engine.use(None)
        base = session.label_distribution(QUERY, TASK)
    finally:
        session.engine.use(None)
        session.engine.free_adapter(adapter)
    np.testing.assert_allclose(np.log(list(exported.values())), np.log(list(app.values())), atol=1e-6)
    assert not np.allclose(list(exported.values()), list(base.values()), atol=1e-4)  # it does something

    reader = gguf.GGUFReader(ex.path)
    assert _kv(reader, gguf.Keys.General.NAME) == "p2p-local demo movielens-rating"
    assert _kv(reader, gguf.Keys.General.BASE_MODEL_COUNT) == 1
    assert _kv(reader, gguf.Keys.General.BASE_MODEL_NAME.format(id=0)) == "Gemma 3 270m"
    assert _kv(reader, gguf.Keys.General.BASE_MODEL_REPO_URL.format(id=0)).endswith("google/gemma-3-270m")
    assert _kv(reader, gguf.Keys.Adapter.LORA_TASK_NAME) == TASK
    assert _kv(reader, gguf.Keys.Adapter.LORA_PROMPT_PREFIX) == session.card(TASK).template.split("{input}")[0]
    assert _kv(reader, "p2p.profile.fingerprint") == ex.fingerprint

    readme = ex.readme.read_text()
    base_path = str(session.engine.model_path.resolve())
    for line in (f"--lora {ex.path}", f"--lora-scaled {ex.path}:0.1", '"lora": [{"id": 0, "scale": 1.0}]',
                 f"FROM {base_path}", f"ADAPTER {ex.path}", "median", "/lora-adapters"):
        assert line in readme, line
    assert (out / f"{ex.path.stem}.Modelfile").read_text().startswith(f"FROM {base_path}\nADAPTER {ex.path}\n")

    again = export_adapter(session, "demo", out, task=TASK, query=QUERY)  # stable: the same file, replaced
    assert again.path == ex.path and sorted(p.name for p in out.iterdir()) == sorted(
        [ex.path.name, ex.readme.name, f"{ex.path.stem}.Modelfile"])


def test_peft_export_has_a_model_card(session, tmp_path: Path):
    ex = export_adapter(session, "demo", tmp_path / "out", task=TASK, fmt="peft", mode=0o644)
    assert ex.path.is_dir() and ex.path.name == "demo-movielens-rating"
    card = (ex.path / "README.md").read_text()
    assert "base_model: google/gemma-3-270m" in card and "de-quantized Q4_K_M" in card and ex.fingerprint in card
    config = json.loads((ex.path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "google/gemma-3-270m"
    assert stat.S_IMODE((ex.path / "adapter_model.safetensors").stat().st_mode) == 0o644
    assert export_adapter(session, "demo", tmp_path / "out", task=TASK, fmt="peft").path == ex.path  # re-export


def test_cli_export(session, tmp_path: Path, capsys):
    assert main(["adapter", "export", "demo", "--to", str(tmp_path / "x"), "--mode", "644", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    path = Path(got["path"])
    assert path.name == "demo-movielens-rating.gguf" and stat.S_IMODE(path.stat().st_mode) == 0o644
    assert main(["adapter", "export", "demo", "--to", str(tmp_path / "x"), "--mode", "999"]) == 2
