"""`p2p adapter export NAME --to DIR`: a profile's adapter under a readable, stable name, for every llama.cpp tool.

The adapter cache keeps only the newest few files per profile, so a cached path handed to `llama-server`
can vanish; an export is the user's own copy. The GGUF says what it is (`general.name`,
`general.base_model.0.*`, `adapter.lora.task_name`, `adapter.lora.prompt_prefix`), and a README beside
it gives the exact llama.cpp and Ollama commands, with the prompt and the decoding rule, so an answer of
`p2p ask` can be reproduced outside the app.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2p_local.exports import export_name

EPILOG = """examples:
  p2p adapter export me --to ~/adapters                       # ~/adapters/me-<task>.gguf + README
  p2p adapter export alice --to out/ --task movielens-rating --query 'Heat (1995) | Genres: Action|Crime'
  p2p adapter export me --to out/ --format peft               # a PEFT folder (transformers, vLLM) + model card
  p2p adapter export me --to /srv/llama --mode 644            # world-readable, for a server run by another user
"""

# What llama.cpp's converter records of the base (general.base_model.0.*); the default base only.
BASE_MODELS = {"gemma3-270m": {"name": "Gemma 3 270m", "organization": "Google",
                               "repo_url": "https://huggingface.co/google/gemma-3-270m"}}
HF_BASE = {"gemma3-270m": "google/gemma-3-270m"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("adapter", help="export a profile's adapter for llama.cpp, llama-server, Ollama or PEFT",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    asub = p.add_subparsers(dest="adapter_command", metavar="ACTION")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
    ex = asub.add_parser("export", help="write the profile's adapter under a stable name, with usage notes",
                         epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ex.add_argument("profile")
    ex.add_argument("--to", type=Path, required=True, metavar="DIR", help="folder to write into (created)")
    ex.add_argument("--task", help="task card (default: the profile's task)")
    ex.add_argument("--query", help="a query-aware adapter for this query (what `p2p ask QUERY` uses)")
    ex.add_argument("--format", choices=("gguf", "peft"), default="gguf")
    ex.add_argument("--mode", default="600", help="file mode in octal (default 600: private; 644: world-readable)")
    ex.add_argument("--bundle", help="hypernetwork bundle (default: the shipped one)")
    ex.add_argument("--json", action="store_true")
    ex.set_defaults(func=cmd_export)


@dataclass
class Export:
    path: Path  # the .gguf file, or the PEFT folder
    readme: Path
    task: str
    profile: str
    fingerprint: str
    source: Path  # the cached adapter it copies


def cmd_export(args: argparse.Namespace) -> int:
    from p2p_local.personalize import Session

    mode = _mode(args.mode)
    with Session.open(bundle=args.bundle) as s:
        ex = export_adapter(s, args.profile, args.to, task=args.task, query=args.query, fmt=args.format, mode=mode)
    if args.json:
        print(json.dumps({k: str(v) for k, v in ex.__dict__.items()}))
        return 0
    print(f"{args.profile}: {ex.task} adapter -> {ex.path}")
    print(f"  how to use it (llama.cpp, llama-server, Ollama{', PEFT' if args.format == 'peft' else ''}): {ex.readme}")
    return 0


def export_adapter(session: Any, profile: str, to: Path | str, *, task: str | None = None, query: str | None = None,
                   fmt: str = "gguf", mode: int = 0o600) -> Export:
    """Make the profile's adapter (`Session.personalize`, as `p2p ask` / `p2p personalize` do) and copy it to `to`."""
    from p2p_local.adapter import read_adapter, write_adapter
    from p2p_local.errors import UsageError
    from p2p_local.files import atomic_write, refuse_special

    to = Path(to)
    refuse_special(to, UsageError)  # `--to /dev/null`: not a folder to write into
    r = session.personalize(profile, task, query=query)
    card = session.card(r.task)
    stem = export_name(profile, r.task, query)
    adapter = read_adapter(r.adapter_path)
    spec_name, base_path = _base(session)
    if fmt == "peft":
        from p2p_local.peft_export import export_peft

        _make_folder(to, mode)
        out = export_peft(adapter, to / stem, HF_BASE.get(spec_name, spec_name),
                          card=_peft_card(profile, r, card, adapter, spec_name, query))
        readme = out / "README.md"
        _chmod_tree(out, mode)
        return Export(out, readme, r.task, profile, r.fingerprint, r.adapter_path)
    dest, readme, modelfile = to / f"{stem}.gguf", to / f"{stem}.README.md", to / f"{stem}.Modelfile"
    for target in (dest, readme, modelfile):  # checked before any is written: all three or none
        refuse_special(target, UsageError)
    _make_folder(to, mode)
    write_adapter(dest, adapter.tensors, alpha=adapter.alpha, base=session.engine.base, dtype="f16",
                  generator=str(adapter.meta.get("p2p.generator.name") or "p2p-local"),
                  profile_fingerprint=r.fingerprint, name=f"p2p-local {profile} {r.task}", task_name=r.task,
                  prompt_prefix=card.template.split("{input}")[0], base_model=BASE_MODELS.get(spec_name))
    dest.chmod(mode)
    atomic_write(readme, usage(dest, base_path, card, query), mode=mode)
    atomic_write(modelfile, ollama_modelfile(dest, base_path, card), mode=mode)
    return Export(dest, readme, r.task, profile, r.fingerprint, r.adapter_path)


def usage(adapter: Path, base: Path, card: Any, query: str | None) -> str:
    """The README beside an exported GGUF adapter: exact commands for llama.cpp's tools and Ollama."""
    example = query or _example(card)
    prompt = card.prompt(example)
    rating = card.kind in ("rating", "label")
    n = 1 if rating else 32
    from p2p_local.pipeline import lora_scale, stop_strings

    base_q, adapter_q = _sh(str(base)), _sh(str(adapter))
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
curl -s http://127.0.0.1:8080/completion -d {_sh(json.dumps({"prompt": prompt, "n_predict": 1, "n_probs": 20, "temperature": 0, "lora": [{"id": 0, "scale": 1.0}]}))}
```
""") if rating else f"""
## Reading the answer

`p2p ask` decodes greedily (temperature 0) and stops at {' or '.join(json.dumps(x) for x in stops)}
(the task card's stop rule; the llama-server request and the Modelfile above carry it too), or where the
answer starts repeating itself. `llama-completion` has no stop string: read its output up to the first
{json.dumps(stops[0]) if stops else 'stop'}.
"""
    return f"""# {adapter.name}

A LoRA adapter made by p2p-local for task `{card.name}` ({card.description}).
Base model: `{base}` (sha256 recorded in the adapter as `p2p.base.sha256`). Only this base fits it.

The prompt is the task card's template around your input (no chat template):

```
{prompt}```
{"(for a query-aware adapter, the query it was made for)" if query else "(an example input)"}

## llama.cpp

```sh
llama-completion -m {base_q} --lora {adapter_q} -p {_sh(prompt)} -n {n} --temp 0
llama-completion -m {base_q} --lora-scaled {_sh(f"{adapter}:{lora_scale(0.5):g}")} -p {_sh(prompt)} -n {n} --temp 0   # the app's x0.5
```
(`llama-cli -no-cnv ...` in builds before llama-completion existed.)

## llama-server

```sh
llama-server -m {base_q} --lora {adapter_q} --lora-init-without-apply
curl -s http://127.0.0.1:8080/lora-adapters          # shows task_name and prompt_prefix of each adapter
curl -s http://127.0.0.1:8080/completion -d {_sh(json.dumps({"prompt": prompt, "n_predict": n, "temperature": 0, **stop, "lora": [{"id": 0, "scale": 1.0}]}))}
```
The per-request `lora` list picks adapters by id and scale (scale 0 or leaving it out: the base model).
The app's strength xS is llama.cpp scale S at or above x1 and `0.01 ** (1 - S)` below it (x0.5: 0.1),
since the adapter's effect saturates early.

## Ollama

`{adapter.stem}.Modelfile` beside this file:

```
{ollama_modelfile(adapter, base, card)}```
```sh
ollama create {_sh(adapter.stem)} -f {_sh(str(adapter.with_suffix('.Modelfile')))}
ollama run {_sh(adapter.stem)} {_sh(prompt)}
```
{decode}"""


def ollama_modelfile(adapter: Path, base: Path, card: Any = None) -> str:
    """FROM the base + ADAPTER; the raw prompt passes through (the base has no chat template to apply);
    a generation task's stop rule as `PARAMETER stop` (in triple quotes: a stop may be a newline)."""
    from p2p_local.pipeline import stop_strings

    stops = stop_strings(card) if card is not None and card.kind == "generation" else []
    return (f"FROM {base}\nADAPTER {adapter}\nTEMPLATE \"\"\"{{{{ .Prompt }}}}\"\"\"\n"
            "PARAMETER temperature 0\n" + "".join(f'PARAMETER stop """{x}"""\n' for x in stops))


def _peft_card(profile: str, r: Any, card: Any, adapter: Any, spec_name: str, query: str | None) -> str:
    hf = HF_BASE.get(spec_name, spec_name)
    return f"""---
base_model: {hf}
library_name: peft
tags: [lora, p2p-local, {card.name}]
---

# p2p-local adapter: {profile} / {card.name}

A rank-{adapter.rank} LoRA (alpha {adapter.alpha:g}, targets {', '.join(sorted({n.split('.')[2] for n in adapter.tensors}))})
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
{"Answers are read off the distribution over the labels " + ", ".join(card.labels) + (" (median)." if card.kind == "rating" else " (most likely).") if card.kind != "generation" else "Answers are decoded greedily; the first line is kept." if card.one_line else "Answers are decoded greedily."}
"""


EXAMPLES = {"movielens-rating": "Heat (1995) | Genres: Action|Crime|Thriller",
            "popquorn-email-rewrite": "hey, can u send me the file by tmrw? thx",
            "popquorn-offensiveness": "This is the worst take I have read all week."}


def _example(card: Any) -> str:
    return EXAMPLES.get(card.name, "files: src/app.py")


def _base(session: Any) -> tuple[str, Path]:
    from p2p_local.models import known_models

    path = Path(session.engine.model_path).resolve()
    name = next((s.name for s in known_models().values() if s.filename == path.name), path.stem)
    return name, path


def _mode(text: str) -> int:
    from p2p_local.errors import UsageError

    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777 or not mode & 0o400:
        raise UsageError(f"--mode {text!r} is not a file mode the owner can read", hint="e.g. 600 (private) or 644")
    return mode


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


def _sh(text: str) -> str:
    import shlex

    return shlex.quote(text)
