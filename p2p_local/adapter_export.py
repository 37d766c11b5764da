"""A profile's adapter exported under a readable, stable name, for every llama.cpp tool (and PEFT).

The adapter cache keeps only the newest few files per profile, so a cached path handed to `llama-server`
can vanish; an export is the user's own copy. The GGUF says what it is (`general.name`,
`general.base_model.0.*`, `adapter.lora.task_name`, `adapter.lora.prompt_prefix`), and a README beside
it gives the exact llama.cpp and Ollama commands, with the prompt and the decoding rule, so an answer of
`p2p ask` can be reproduced outside the app. Called by `p2p adapter export` and the chat's profile panel.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2p_local.exports import export_name
from p2p_local.files import quoted


@dataclass
class Export:
    path: Path  # the .gguf file, or the PEFT folder
    readme: Path
    task: str
    profile: str
    fingerprint: str
    source: Path  # the cached adapter it copies


def export_adapter(session: Any, profile: str, to: Path | str, *, task: str | None = None, query: str | None = None,
                   fmt: str = "gguf", mode: int = 0o600) -> Export:
    """Make the profile's adapter (the route `Session.answer` takes, run up to the attached adapter: what
    `p2p ask QUERY` would answer with) and copy it to `to`."""
    from p2p_local.errors import UsageError
    from p2p_local.files import refuse_special

    to = Path(to)
    refuse_special(to, UsageError)  # `--to /dev/null`: not a folder to write into
    # A `forget` of the profile waits for the export, then removes it. The route's lock first, as an answer
    # takes them (the route, then the profile while it writes the adapter): never the other way round.
    with session.route.lock, session.store.profile_lock(profile):
        return _export(session, profile, to, task, query, fmt, mode)


def _export(session: Any, profile: str, to: Path, task: str | None, query: str | None, fmt: str, mode: int) -> Export:
    from p2p_local.adapter import read_adapter, write_adapter
    from p2p_local.errors import UsageError
    from p2p_local.files import atomic_write, refuse_special

    with session.answer(query or "", profile=profile, task=task) as answer:
        r = answer.prepare().personalization
    if r is None:
        raise UsageError(f"no adapter for free chat from profile {profile!r}", hint="name a task: --task TASK")
    card = answer.request.card
    prompt = app_prompt(session, answer.request if query else session.request(_example(card), profile, r.task))
    stem = export_name(profile, r.task, query)
    if fmt == "peft":
        _make_folder(to, mode)
        out = write_peft(session, profile, r, card, to / stem, query, mode)
        return Export(out, out / "README.md", r.task, profile, r.fingerprint, r.adapter_path)
    adapter = read_adapter(r.adapter_path)
    spec, base_path = _base(session)
    dest, readme, modelfile = to / f"{stem}.gguf", to / f"{stem}.README.md", to / f"{stem}.Modelfile"
    for target in (dest, readme, modelfile):  # checked before any is written: all three or none
        refuse_special(target, UsageError)
    modelfile_text = ollama_modelfile(dest, base_path, card)  # refuses a path no Modelfile can carry
    _make_folder(to, mode)
    write_adapter(dest, adapter.tensors, alpha=adapter.alpha, base=session.engine.base, dtype="f16",
                  generator=str(adapter.meta.get("p2p.generator.name") or "p2p-local"),
                  profile_fingerprint=r.fingerprint, name=f"p2p-local {profile} {r.task}", task_name=r.task,
                  prompt_prefix=card.prefix, base_model=spec.base_model_meta())
    dest.chmod(mode)
    atomic_write(readme, usage(dest, base_path, card, query, prompt), mode=mode)
    atomic_write(modelfile, modelfile_text, mode=mode)
    return Export(dest, readme, r.task, profile, r.fingerprint, r.adapter_path)


def write_peft(session: Any, profile: str, r: Any, card: Any, out_dir: Path, query: str | None = None,
               mode: int | None = None) -> Path:
    """The personalization `r`'s adapter as a PEFT folder at `out_dir`, with its model card (`peft_card`): what
    `p2p adapter export --format peft` and `p2p personalize --peft-out` write. `mode`: the files' (the folder
    gets x where it has r); None leaves `export_peft`'s (private files)."""
    from p2p_local.adapter import read_adapter
    from p2p_local.peft_export import export_peft

    adapter = read_adapter(r.adapter_path)
    spec = _base(session)[0]
    out = export_peft(adapter, out_dir, spec.hf_id or spec.name, card=peft_card(profile, r, card, adapter, spec, query))
    if mode is not None:
        _chmod_tree(out, mode)
    return out


def app_prompt(session: Any, request: Any) -> str:
    """The prompt `p2p ask` builds for `request` (the route's own step: the card's template around the query
    as the task reads it, after the profile's retrieved examples where the card shows them)."""
    from p2p_local.pipeline import Personalization

    profile = request.profile if request.card is not None else None
    p = Personalization(profile, profile.fingerprint, request.task) if profile is not None else None
    return session.route.prompt(request, p)


def _fence(text: str) -> str:
    """A Markdown code block holding `text` whole (a diff in a prompt may hold a fence of its own)."""
    ticks = "```"
    while ticks in text:
        ticks += "`"
    return f"{ticks}\n{text}{'' if text.endswith(chr(10)) else chr(10)}{ticks}"


def usage(adapter: Path, base: Path, card: Any, query: str | None, prompt: str | None = None) -> str:
    """The README beside an exported GGUF adapter: exact commands for llama.cpp's tools and Ollama, with the
    prompt `p2p ask` builds (`app_prompt`; without one, the card's template around its first sample)."""
    example = query or _example(card)
    prompt = prompt or card.prompt(example)
    rating = card.labelled
    n = 1 if rating else 32
    from p2p_local.pipeline import lora_scale, stop_strings

    base_q, adapter_q = quoted(str(base)), quoted(str(adapter))
    stops = [] if rating else stop_strings(card)
    stop = {"stop": stops} if stops else {}
    labels = ", ".join(card.labels)
    decode = (f"""
## Reading the answer ({card.kind} task)

`p2p ask` never samples a {card.kind}: it reads the model's next-token distribution over the labels
({labels}), normalised over the labels alone, and answers """
              + ("the **median** of that distribution (the first label whose cumulative probability reaches "
                 "1/2: the choice that minimises the expected absolute error)." if card.kind == "rating"
                 else "the most likely label.") + f"""
With llama-server, ask for the top tokens of the one next token and do the same:

```sh
curl -s http://127.0.0.1:8080/completion -d {quoted(json.dumps({"prompt": prompt, "n_predict": 1, "n_probs": 20, "temperature": 0, "lora": [{"id": 0, "scale": 1.0}], "cache_prompt": False}))}
```
""") if rating else f"""
## Reading the answer

`p2p ask` decodes greedily (temperature 0) and stops at {' or '.join(json.dumps(x) for x in stops)}
(the task card's stop rule; the llama-server request and the Modelfile above carry it too), or where the
answer starts repeating itself. `llama-completion` has no stop string: read its output up to the first
{json.dumps(stops[0]) if stops else 'stop'}.
"""
    shots = (f" after the {card.examples} earlier items of the profile nearest the query (in the card's own format)"
             if card.examples else "")
    change = " The query reads a change as `p2p ask -` reads a piped diff (its files and compact diff)." if card.diff_chars else ""
    one_line = ("" if not card.one_line else "\n`p2p ask` chooses the answer among greedy lines started by the model's "
                "likeliest first tokens, and puts a line equal to one of the user's earlier outputs below any other "
                "that scores close: plain greedy decoding, as below, gives its first line, which is the app's answer "
                "unless that line is such a copy.\n")
    whose = ("the query this adapter was made for (`--query`): with this adapter, the same prompt `p2p ask` answers"
             if query else "the card's example input, with the examples this profile would show. `p2p ask` makes "
             "an adapter per question (query-aware): export with `--query` for the exact one")
    return f"""# {adapter.name}

A LoRA adapter made by p2p-local for task `{card.name}` ({card.description}).
Base model: `{base}` (sha256 recorded in the adapter as `p2p.base.sha256`). Only this base fits it.

The prompt is the one `p2p ask` builds: the task card's template around the input{shots}, no chat
template.{change} Here it is for {whose}:

{_fence(prompt)}
{one_line}
## llama.cpp

```sh
llama-completion -m {base_q} --lora {adapter_q} -p {quoted(prompt)} -n {n} --temp 0
llama-completion -m {base_q} --lora-scaled {quoted(f"{adapter}:{lora_scale(0.5):g}")} -p {quoted(prompt)} -n {n} --temp 0   # the app's x0.5
```
(`llama-cli -no-cnv ...` in builds before llama-completion existed.)

## llama-server

```sh
llama-server -m {base_q} --lora {adapter_q} --lora-init-without-apply
curl -s http://127.0.0.1:8080/lora-adapters          # shows task_name and prompt_prefix of each adapter
curl -s http://127.0.0.1:8080/completion -d {quoted(json.dumps({"prompt": prompt, "n_predict": n, "temperature": 0, **stop, "lora": [{"id": 0, "scale": 1.0}], "cache_prompt": False}))}
curl -s http://127.0.0.1:8080/completion -d {quoted(json.dumps({"prompt": prompt, "n_predict": n, "temperature": 0, **stop, "lora": [{"id": 0, "scale": 0.0}], "cache_prompt": False}))}   # the base model
```
The per-request `lora` list picks adapters by id and scale. For the base model send the adapter with scale 0
(leaving the list out keeps the adapter on in some llama.cpp builds: ggml-org/llama.cpp#28674), and send
`"cache_prompt": false` whenever the adapter or its scale changes between requests (a prompt cached under
another adapter mixes the two answers: #26207).
The app's strength xS is llama.cpp scale `2S - 1` at or above x1 (x2: 3) and `0.01 ** (1 - S)` below it
(x0.5: 0.1), since the adapter's effect saturates early.

## Ollama (before 0.34.1)

`{adapter.stem}.Modelfile` beside this file. Ollama 0.34.1 and later refuse its `ADAPTER` line at create time:
there, use llama-server (above) or `p2p serve`.

```
{ollama_modelfile(adapter, base, card)}```
```sh
ollama create {quoted(adapter.stem)} -f {quoted(str(adapter.with_suffix('.Modelfile')))}
ollama run {quoted(adapter.stem)} {quoted(prompt)}
```
{decode}"""


def ollama_modelfile(adapter: Path, base: Path, card: Any = None) -> str:
    """FROM the base + ADAPTER; the raw prompt passes through (the base has no chat template to apply);
    a generation task's stop rule as `PARAMETER stop` (in triple quotes: a stop may be a newline)."""
    from p2p_local.pipeline import stop_strings

    stops = stop_strings(card) if card is not None and card.kind == "generation" else []
    return (f"FROM {quoted(base, 'modelfile')}\nADAPTER {quoted(adapter, 'modelfile')}\nTEMPLATE \"\"\"{{{{ .Prompt }}}}\"\"\"\n"
            "PARAMETER temperature 0\n" + "".join(f'PARAMETER stop """{x}"""\n' for x in stops))


def peft_card(profile: str, r: Any, card: Any, adapter: Any, spec: Any, query: str | None) -> str:
    """The model card (README.md) of a PEFT export."""
    from p2p_local.adapter import parse_tensor_name

    hf, spec_name = spec.hf_id or spec.name, spec.name
    return f"""---
base_model: {hf}
library_name: peft
tags: [lora, p2p-local, {card.name}]
---

# p2p-local adapter: {profile} / {card.name}

A rank-{adapter.rank} LoRA (alpha {adapter.alpha:g}, targets {', '.join(sorted({parse_tensor_name(n)[1] for n in adapter.tensors}))})
generated in one forward pass by a p2p-local hypernetwork from a private profile (fingerprint
`{r.fingerprint}`; the profile's content is not in this folder){' for the query it was asked' if query else ''}.

**Which weights it is valid for.** `base_model_name_or_path` names `{hf}` so that PEFT can load it, but the
hypernetwork was trained against the **de-quantized Q4_K_M** weights of that model (the GGUF llama.cpp runs:
`{spec_name}`). It is only known to be valid for those de-quantized Q4_K_M weights; on the full-precision
weights it is untested: test it before relying on it.

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{hf}"), "<this folder>")
```

Prompt (no chat template): {json.dumps(card.template)} with `{{input}}` replaced by the input.
{"Answers are read off the distribution over the labels " + ", ".join(card.labels) + (" (median)." if card.kind == "rating" else " (most likely).") if card.labelled else "Answers are decoded greedily; the first line is kept." if card.one_line else "Answers are decoded greedily."}
"""


NO_SAMPLE = "<your input>"  # a card without `samples`: the README shows where the input goes


def _example(card: Any) -> str:
    """The README's example input: the card's first sample."""
    return card.samples[0] if card.samples else NO_SAMPLE


def _base(session: Any) -> tuple[Any, Path]:
    """The session's base model: its registry entry (or a bare one named after the file) and its path."""
    from p2p_local.models import ModelSpec, known_models

    path = Path(session.engine.model_path).resolve()
    spec = next((s for s in known_models().values() if s.filename == path.name), None)
    return spec or ModelSpec(path.stem, path.name, "", "", 0), path


def _make_folder(folder: Path, mode: int) -> None:
    """The export folder, created with `mode` widened to folders (x where r) so that `--mode 644` is
    readable by others; private (0700) by default."""
    from p2p_local.files import disk_error

    try:
        folder.mkdir(mode=mode | ((mode & 0o444) >> 2), parents=True, exist_ok=True)
    except OSError as e:
        raise disk_error(e, folder) from e


def _chmod_tree(folder: Path, mode: int) -> None:
    folder.chmod(mode | ((mode & 0o444) >> 2))  # a folder needs x where it has r
    for f in folder.iterdir():
        f.chmod(mode)

