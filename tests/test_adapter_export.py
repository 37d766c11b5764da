"""`p2p adapter export`: a stable, readable copy of the profile's adapter that llama.cpp's own loader
(llama_adapter_lora_init, through Engine.load_adapter) loads from the exported path, with the app's
effect; metadata that names what it is; README with exact commands; PEFT folder with a model card."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

import gguf
import numpy as np

from p2p_local import pipeline
from p2p_local.adapter import read_adapter
from p2p_local.adapter_export import export_adapter, export_name
from p2p_local.cli import main

TASK = "movielens-rating"
QUERY = "Heat (1995) | Genres: Action|Crime|Thriller"


def _kv(reader: gguf.GGUFReader, key: str):
    f = reader.fields[key]
    v = f.parts[f.data[0]]
    return bytes(v).decode() if f.types[0] == gguf.GGUFValueType.STRING else v[0]


def _attached_distribution(session, text: str) -> dict[str, float]:
    """The label distribution of `text` under whatever adapter is attached to the engine (by hand here)."""
    card = session.card(TASK)
    prompt = pipeline.task_prompt(session.engine, card, text)
    lp = pipeline.label_scores(session.engine, prompt, session.route.label_ids(card))["lp"]
    return dict(zip(card.labels, np.exp(lp).tolist(), strict=True))


def test_exported_adapter_loads_in_llama_cpp_with_the_apps_effect(session, tmp_path: Path):
    out = tmp_path / "exports"
    ex = export_adapter(session, "demo", out, task=TASK, query=QUERY)
    assert ex.path == out / f"{export_name('demo', TASK, QUERY)}.gguf" and ex.path.name.startswith("demo-movielens-rating-q")
    assert stat.S_IMODE(ex.path.stat().st_mode) == 0o600  # private unless asked

    # The app's answer: what `p2p ask QUERY --profile demo --task movielens-rating` computes.
    r = session.personalize("demo", TASK, query=QUERY)
    app = session.answer(QUERY, profile="demo", task=TASK).finish().distribution
    assert read_adapter(r.adapter_path).tensors.keys() == read_adapter(ex.path).tensors.keys()
    for name, (a, b) in read_adapter(r.adapter_path).tensors.items():
        a2, b2 = read_adapter(ex.path).tensors[name]
        assert np.array_equal(a, a2) and np.array_equal(b, b2)

    # llama.cpp's loader, at the exported path, attached alone: the same label log-probs.
    adapter = session.engine.load_adapter(ex.path)
    try:
        session.engine.use(adapter, 1.0)
        exported = _attached_distribution(session, QUERY)
        session.engine.use(None)
        base = _attached_distribution(session, QUERY)
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


def test_readme_commands_run_on_a_path_with_spaces_and_command_substitution(tmp_path: Path):
    """Every shell block of the export README, run by bash with the tools stubbed: each tool gets the real
    paths and the prompt as single arguments, and `$(...)` in a folder name is never executed."""
    import os
    import re
    import subprocess

    from p2p_local.adapter_export import usage
    from p2p_local.data.format import builtin_card

    folder = tmp_path / "my adapters $(touch PWNED) `touch PWNED2` it's"
    folder.mkdir()
    adapter, base = folder / "me-commit-subject.gguf", tmp_path / "base model.gguf"
    stubs = tmp_path / "bin"
    stubs.mkdir()
    log = tmp_path / "calls.jsonl"
    for tool in ("llama-completion", "llama-server", "curl", "ollama"):
        (stubs / tool).write_text('#!/usr/bin/env python3\nimport json, sys\n'
                                  f'open({str(log)!r}, "a").write(json.dumps(sys.argv) + "\\n")\n')
        (stubs / tool).chmod(0o755)
    for task in ("movielens-rating", "commit-subject"):
        card = builtin_card(task)
        readme = usage(adapter, base, card, None)
        blocks = re.findall(r"```sh\n(.*?)```", readme, flags=re.S)
        assert blocks
        log.unlink(missing_ok=True)
        for block in blocks:
            proc = subprocess.run(["bash", "-c", block], cwd=tmp_path, capture_output=True, text=True,
                                  env={**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}"})
            assert proc.returncode == 0, proc.stderr
        calls = [json.loads(line) for line in log.read_text().splitlines()]
        prompt = card.prompt(_example_of(card))
        completion = [c for c in calls if c[0].endswith("llama-completion")]
        assert completion and all(c[c.index("-m") + 1] == str(base) and c[c.index("-p") + 1] == prompt
                                  for c in completion)
        assert completion[0][completion[0].index("--lora") + 1] == str(adapter)
        server = next(c for c in calls if c[0].endswith("llama-server"))
        assert server[server.index("--lora") + 1] == str(adapter)
        posted = [json.loads(c[c.index("-d") + 1]) for c in calls if c[0].endswith("curl") and "-d" in c]
        assert posted and all(p["prompt"] == prompt for p in posted)
        ollama = [c for c in calls if c[0].endswith("ollama")]
        assert ollama[0][ollama[0].index("-f") + 1] == str(adapter.with_suffix(".Modelfile"))
    assert not list(tmp_path.rglob("PWNED*")), "the folder name's command substitution ran"


def _example_of(card) -> str:
    from p2p_local.adapter_export import _example

    return _example(card)


def test_export_names_never_collide():
    """Two profiles with non-Latin names (or differing only in case) used to share one file name."""
    names = ["Алиса", "Борис", "李雷", "韩梅梅", "me", "Me", "ME", "a_b", "a.b", "a-b", "_"]
    stems = [export_name(n, TASK, None) for n in names]
    assert len(set(stems)) == len(stems)
    assert len({s.lower() for s in stems}) == len(stems)  # also on a case-insensitive disk
    assert export_name("me", TASK, None) == "me-movielens-rating"  # plain names keep their readable name
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", s) for s in stems)


def test_export_refuses_special_files_and_forget_removes_exports(session, tmp_path: Path, capsys):
    """A FIFO (or a link to a device) where the export would go is left as it is, with a clear error;
    `forget` removes the profile's adapter exports in <data dir>/exports (their README holds the query)."""
    import os

    from p2p_local import paths

    to = tmp_path / "out"
    to.mkdir()
    os.mkfifo(to / "demo-movielens-rating.gguf")
    (to / "demo-movielens-rating.README.md").symlink_to("/dev/null")
    assert main(["adapter", "export", "demo", "--to", str(to)]) == 2
    assert "refusing to replace it" in capsys.readouterr().err
    assert stat.S_ISFIFO(os.stat(to / "demo-movielens-rating.gguf").st_mode)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    exports = paths.data_dir() / "exports"
    assert main(["adapter", "export", "demo", "--to", str(exports), "--query", QUERY]) == 0
    assert main(["adapter", "export", "demo", "--to", str(exports), "--format", "peft"]) == 0
    made = sorted(p.name for p in exports.iterdir())
    assert len(made) == 4, made  # gguf, README, Modelfile (query-aware) + the PEFT folder
    capsys.readouterr()
    assert main(["profile", "forget", "demo", "--yes"]) == 0
    assert list(exports.iterdir()) == []


def test_the_readme_example_is_the_cards_first_sample() -> None:
    from p2p_local.adapter_export import NO_SAMPLE, _example
    from p2p_local.data.format import TaskCard, builtin_card

    card = builtin_card("popquorn-email-rewrite")
    assert _example(card) == card.samples[0]
    assert _example(TaskCard.from_dict(card.to_dict() | {"samples": []})) == NO_SAMPLE


def test_the_readme_prompt_is_the_one_ask_builds(session, tmp_path: Path) -> None:
    """Issue 25: the exported README's prompt reproduces the app's (the examples it shows, the change it reads),
    on every task the demo profile holds: copying it into llama.cpp with the adapter asks what `p2p ask` asks."""
    import re

    from p2p_local.adapter_export import export_adapter
    from p2p_local.data.format import builtin_card, builtin_cards

    for task in builtin_cards():  # the demo holds ratings only: a few items of every other task, from its card
        card = builtin_card(task)
        if not session.store.profiles.count_items("demo", task=task):
            for i in range(4):
                out = card.labels[i % len(card.labels)] if card.labelled else f"Reword the note, take {i}"
                session.store.profiles.add_item("demo", task, card.samples[i % len(card.samples)] + f" {i}", out,
                                       time=1.0e9 + i)
    for task in builtin_cards():
        card = builtin_card(task)
        query = card.samples[0]
        ex = export_adapter(session, "demo", tmp_path / task, task=task, query=query)
        readme = ex.readme.read_text()
        after = readme.split("Here it is for", 1)[1]
        m = re.search(r"\n(`{3,})\n(.*?)\n\1\n", after, flags=re.S)
        shown = m.group(2) + "\n"
        answer = session.answer(query, profile="demo", task=task).finish()
        assert shown in (answer.prompt, answer.prompt + "\n"), task
        assert answer.adapter is not None and read_adapter(ex.path).meta.get("p2p.profile.fingerprint") == \
            read_adapter(answer.adapter).meta.get("p2p.profile.fingerprint")  # the same adapter as the answer's
        assert '"cache_prompt": false' in readme and '"scale": 0.0' in readme and "before 0.34.1" in readme
