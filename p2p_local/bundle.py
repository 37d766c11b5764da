"""A hypernetwork bundle: `manifest.json` + `hypernet.onnx`, run with onnxruntime (no torch on the device).

The bundle turns a profile (embedding [B, E] + structured features [B, F]) into one LoRA adapter per
row, in GGUF tensor names, ready for `adapter.write_adapter(..., alpha=bundle.alpha)`.

ONNX interface (written by `trainer/export.py`):
- inputs  `embedding` float32 [B, E] (L2-normalised encoder output), `features` float32 [B, F];
- outputs per target module m, in the manifest's order: `{m}.lora_a` [B, L, r, n_in] and
  `{m}.lora_b` [B, L, n_out, r], where L runs over `manifest["lora"]["layers"]`.

A bundle is made for exactly one base model (sha256 + arch) and one profile encoder (id + sha256):
`check()` refuses anything else, because an adapter for another base is noise at best.

It also records the task cards it was trained on (`cards`: {task: `card_hash`}). A card changed since
is flagged, not refused (`card_status`): the adapter still answers, made for another prompt.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from p2p_local.adapter import MAX_LORA_SCALE, lora_value_problem, tensor_name
from p2p_local.data.format import TaskCard, canonical_task, card_hash
from p2p_local.errors import BundleError
from p2p_local.paths import data_dir, repo_root

DEFAULT_BUNDLE = "gemma3-270m-p2p"
MANIFEST = "manifest.json"
FORMAT = "p2p-hypernet-bundle"
FORMAT_VERSION = 1
INPUT_EMBEDDING = "embedding"
INPUT_FEATURES = "features"


def output_names(module: str) -> tuple[str, str]:
    """The ONNX output names of one target module's A and B."""
    return f"{module}.lora_a", f"{module}.lora_b"


def bundle_dirs() -> list[Path]:
    """Where bundles are looked up by name: the user's data dir first (a bundle they trained or
    installed overrides), then the one shipped in the source checkout."""
    return [data_dir() / "bundles", repo_root() / "models"]


def find_bundle(name: str = DEFAULT_BUNDLE) -> Path:
    for d in bundle_dirs():
        if (d / name / MANIFEST).is_file():
            return d / name
    raise BundleError(
        f"hypernetwork bundle {name!r} not found (looked in {', '.join(str(d) for d in bundle_dirs())})",
        hint="the source checkout ships models/gemma3-270m-p2p; or train one: `make train && make export`",
    )


def installed_bundles() -> list[Path]:
    """Every bundle directory in `bundle_dirs()`, in lookup order (a name may appear twice: the first wins)."""
    return [d for root in bundle_dirs() if root.is_dir()
            for d in sorted(root.iterdir()) if (d / MANIFEST).is_file()]


def read_manifest(directory: Path) -> tuple[bytes, dict[str, Any]]:
    """A bundle directory's manifest (bytes and checked JSON); BundleError if missing or malformed."""
    manifest_path = directory / MANIFEST
    try:
        manifest_bytes = manifest_path.read_bytes()
        manifest = json.loads(manifest_bytes)
    except FileNotFoundError as e:
        raise BundleError(f"{manifest_path} is missing", hint="a bundle is a directory with manifest.json and hypernet.onnx") from e
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: "[[[[..." nested too deep
        raise BundleError(f"{manifest_path} is not valid JSON ({e})", hint="the bundle is corrupt: re-export or reinstall it") from e
    _check_manifest(manifest, manifest_path)
    return manifest_bytes, manifest


def trained_cards(manifest: Mapping[str, Any]) -> dict[str, str] | None:
    """{task: card_hash} of the cards a bundle was trained on (current task names); None: not recorded."""
    cards = manifest.get("cards")
    return {canonical_task(k): v for k, v in cards.items()} if isinstance(cards, dict) else None


def card_status(manifest: Mapping[str, Any], card: TaskCard) -> str:
    """How `card` relates to what the bundle was trained on:
    "same": trained on this card's prompt (equal `card_hash`);
    "different": trained on this task with another prompt (e.g. the card shows examples or diffs since);
    "untrained": the bundle records its cards and this task is not among them (a user's own task);
    "unknown": the bundle records no cards (exported before they were recorded)."""
    cards = trained_cards(manifest)
    if cards is None:
        return "unknown"
    trained = cards.get(canonical_task(card.name))
    return "untrained" if trained is None else "same" if trained == card_hash(card) else "different"


def untrained_note(task: str) -> str:
    """What `ask`, `personalize` and the chat say of an adapter for a task the bundle was never trained on
    (`card_status` "untrained": a user's own card): it still answers, from the nearest task it learned."""
    return (f"the adapter was not trained on task {task}: answers come from the hypernetwork's nearest "
            "behaviour (the tasks it was trained on)")


class Bundle:
    """A loaded hypernetwork bundle. `generate()` is thread-safe (onnxruntime sessions are)."""

    def __init__(self, directory: Path, manifest: dict[str, Any], onnx_path: Path, sha256: str,
                 session: Any) -> None:
        self.directory = directory
        self.manifest = manifest
        self.onnx_path = onnx_path
        self.sha256 = sha256  # of manifest + onnx bytes: the adapter cache key
        self._session = session
        lora = manifest["lora"]
        self.rank: int = int(lora["rank"])
        self.alpha: float = float(lora["alpha"])
        self.targets: list[str] = list(lora["targets"])
        self.layers: list[int] = [int(x) for x in lora["layers"]]
        self.shapes: dict[str, tuple[int, int]] = {m: tuple(s) for m, s in lora["shapes"].items()}
        self.encoder_id: str | None = manifest["encoder"].get("id")
        self.encoder_sha256: str | None = manifest["encoder"].get("sha256")
        self.embedding_dim: int = int(manifest["encoder"]["dim"])
        self.feature_dim: int = int(manifest["feature_dim"])
        self.feature_version = manifest.get("feature_version")
        self.feature_names = manifest.get("feature_names")
        self.neutral: bool = bool(manifest.get("neutral", False))
        self.base_sha256: str = manifest["base"]["sha256"]
        self.base_arch: str = manifest["base"]["arch"]

    @property
    def name(self) -> str:
        return str(self.manifest.get("name", self.directory.name))

    @property
    def scale(self) -> float:
        """What llama.cpp multiplies B @ A by at user scale 1.0 (= the trainer's LoRA scale)."""
        return self.alpha / self.rank

    # --- loading ----------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path | None = None, *, threads: int | None = None) -> Bundle:
        """Load a bundle directory (or its manifest.json, or a bundle name); default: the shipped one."""
        if path is None:
            directory = find_bundle(DEFAULT_BUNDLE)
        else:
            p = Path(path)
            if p.name == MANIFEST:
                directory = p.parent
            elif p.is_dir():
                directory = p
            elif len(p.parts) == 1:  # a bare name: look it up
                directory = find_bundle(str(p))
            else:
                raise BundleError(f"no hypernetwork bundle at {p}", hint="pass a bundle directory holding manifest.json")
        manifest_bytes, manifest = read_manifest(directory)
        onnx_path = directory / manifest["onnx"]["file"]
        if not onnx_path.is_file():
            raise BundleError(f"{onnx_path} is missing", hint="the bundle is incomplete: re-export or reinstall it")
        onnx_bytes = onnx_path.read_bytes()
        expected = manifest["onnx"].get("sha256")
        onnx_sha = hashlib.sha256(onnx_bytes).hexdigest()
        if expected and expected != onnx_sha:
            raise BundleError(f"{onnx_path} does not match its manifest (sha256 {onnx_sha[:12]}..., expected {expected[:12]}...)",
                              hint="the file is corrupt or was replaced: re-export the bundle with `make export`")
        session = _session(onnx_bytes, onnx_path, threads)
        sha = hashlib.sha256(manifest_bytes + onnx_bytes).hexdigest()
        bundle = cls(directory, manifest, onnx_path, sha, session)
        bundle._check_session()
        return bundle

    def _check_session(self) -> None:
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name for o in self._session.get_outputs()}
        for name, dim in ((INPUT_EMBEDDING, self.embedding_dim), (INPUT_FEATURES, self.feature_dim)):
            if name not in inputs:
                raise BundleError(f"{self.onnx_path} has no input {name!r}", hint="re-export the bundle")
            shape = inputs[name].shape
            if len(shape) != 2 or (isinstance(shape[1], int) and shape[1] != dim):
                raise BundleError(f"{self.onnx_path}: input {name} has shape {shape}, manifest says [B, {dim}]",
                                  hint="manifest and hypernet.onnx come from different exports: re-export")
        missing = [n for m in self.targets for n in output_names(m) if n not in outputs]
        if missing:
            raise BundleError(f"{self.onnx_path} lacks outputs {missing}", hint="re-export the bundle")

    # --- compatibility ----------------------------------------------------------------------------
    def trained_card(self, task: str) -> str | None:
        """The `card_hash` of the card `task` was trained on; None where the bundle records none."""
        return (trained_cards(self.manifest) or {}).get(canonical_task(task))

    def card_status(self, card: TaskCard) -> str:
        """One of "same", "different", "untrained", "unknown": see the module's `card_status`."""
        return card_status(self.manifest, card)

    def check_features(self) -> None:
        """Refuse a bundle trained on another feature contract (version + names) than this code computes."""
        from p2p_local.profile import FEATURE_NAMES, FEATURE_VERSION

        if self.feature_version != FEATURE_VERSION or self.feature_names != list(FEATURE_NAMES):
            got = (f"version {self.feature_version!r} with {len(self.feature_names or [])} named features"
                   if self.feature_version is not None else "no recorded feature contract")
            raise BundleError(
                f"bundle {self.name} was trained on profile features {got}; this p2p-local computes "
                f"version {FEATURE_VERSION} with {len(FEATURE_NAMES)} features",
                hint="the hypernetwork would read the wrong numbers: use a bundle exported by this version "
                     "(`make train` + `make export`) or the p2p-local version the bundle came with")

    def check(self, base: Any, encoder: Any | None = None) -> None:
        """Refuse a base model (adapter.BaseInfo), profile encoder (.id/.sha256) or feature contract the
        bundle was not made for."""
        self.check_features()
        if base.arch != self.base_arch:
            raise BundleError(
                f"bundle {self.name} was trained for a {self.base_arch!r} model, the loaded base is {base.arch!r}",
                hint="use the base model the bundle was trained for, or train a bundle for this base (`make train`)")
        if base.sha256 != self.base_sha256:
            raise BundleError(
                f"bundle {self.name} was trained for base sha256 {self.base_sha256[:12]}..., "
                f"the loaded base is {base.sha256[:12]}...",
                hint="a hypernetwork only fits the exact base it was trained on: "
                     "load that base (`p2p models prepare`) or train a bundle for this one")
        for layer in self.layers:
            for m in self.targets:
                name = tensor_name(layer, m)
                if tuple(base.shapes.get(name, ())) != self.shapes[m]:
                    raise BundleError(f"bundle {self.name}: base tensor {name} has shape {base.shapes.get(name)}, "
                                      f"the bundle expects {self.shapes[m]}", hint="the bundle was made for another base")
        if encoder is not None and self.encoder_sha256 and not self.neutral:
            if getattr(encoder, "sha256", None) != self.encoder_sha256:
                raise BundleError(
                    f"bundle {self.name} was trained with encoder {self.encoder_id} ({self.encoder_sha256[:12]}...), "
                    f"the loaded encoder is {getattr(encoder, 'id', '?')} ({str(getattr(encoder, 'sha256', ''))[:12]}...)",
                    hint="profile embeddings from another encoder are meaningless to this hypernetwork: "
                         "rebuild the encoder (`p2p models prepare`) or re-train the bundle")

    # --- running ----------------------------------------------------------------------------------
    def run(self, embedding: np.ndarray, features: np.ndarray) -> dict[str, np.ndarray]:
        """The raw ONNX outputs ({m}.lora_a [B, L, r, n_in], {m}.lora_b [B, L, n_out, r])."""
        emb = np.ascontiguousarray(embedding, dtype=np.float32)
        feats = np.ascontiguousarray(features, dtype=np.float32)
        if emb.ndim == 1:
            emb = emb[None]
        if feats.ndim == 1:
            feats = feats[None]
        if emb.shape[1:] != (self.embedding_dim,) or feats.shape[1:] != (self.feature_dim,) or len(emb) != len(feats):
            raise BundleError(f"bundle {self.name} expects embedding [B, {self.embedding_dim}] and features "
                              f"[B, {self.feature_dim}], got {emb.shape} and {feats.shape}",
                              hint="the profile encoder or feature builder does not match this bundle")
        if not (np.isfinite(emb).all() and np.isfinite(feats).all()):
            raise BundleError("profile embedding/features hold NaN or Inf", hint="rebuild the profile")
        try:
            names = [n for m in self.targets for n in output_names(m)]
            values = self._session.run(names, {INPUT_EMBEDDING: emb, INPUT_FEATURES: feats})
        except Exception as e:  # onnxruntime raises its own exception types
            raise BundleError(f"running {self.onnx_path.name} failed: {e}", hint="the bundle may be corrupt: re-export it") from e
        return dict(zip(names, values, strict=True))

    def generate(self, embedding: np.ndarray, features: np.ndarray) -> list[dict[str, tuple[np.ndarray, np.ndarray]]]:
        """One adapter per row: {"blk.{l}.{m}.weight": (A (r, n_in), B (n_out, r))}, float32."""
        out = self.run(embedding, features)
        batch = next(iter(out.values())).shape[0]
        adapters: list[dict[str, tuple[np.ndarray, np.ndarray]]] = [{} for _ in range(batch)]
        for m in self.targets:
            a_all, b_all = (out[n] for n in output_names(m))
            n_out, n_in = self.shapes[m]
            if a_all.shape[1:] != (len(self.layers), self.rank, n_in) or b_all.shape[1:] != (len(self.layers), n_out, self.rank):
                raise BundleError(f"{self.onnx_path.name}: {m} outputs have shapes {a_all.shape}/{b_all.shape}, "
                                  "which do not match the manifest", hint="re-export the bundle")
            for i in range(batch):
                for j, layer in enumerate(self.layers):
                    adapters[i][tensor_name(layer, m)] = (a_all[i, j], b_all[i, j])
        for ad in adapters:
            for name, (a, b) in ad.items():
                if not (np.isfinite(a).all() and np.isfinite(b).all()):
                    raise BundleError(f"the hypernetwork produced NaN/Inf for {name}", hint="the bundle is broken: retrain or re-export")
                problem = lora_value_problem(a, b)
                if problem:
                    raise BundleError(f"the hypernetwork produced {problem} for {name}",
                                      hint="the bundle is broken: retrain or re-export")
        return adapters


def _session(onnx_bytes: bytes, onnx_path: Path, threads: int | None) -> Any:
    import onnxruntime as ort  # imported here: loading a bundle is the only place it is needed

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or max(1, os.cpu_count() or 1)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(onnx_bytes, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise BundleError(f"{onnx_path} is not a loadable ONNX model ({type(e).__name__}: {str(e)[:200]})",
                          hint="the file is corrupt or truncated: re-export (`make export`) or reinstall the bundle") from e


_REQUIRED: Mapping[str, tuple[str, ...]] = {
    "base": ("sha256", "arch"),
    "encoder": ("dim",),
    "lora": ("rank", "alpha", "targets", "layers", "shapes"),
    "onnx": ("file",),
}


def _check_manifest(manifest: Any, path: Path) -> None:
    """Every field the loader and the app read, with its type and range: a wrong one is a BundleError
    naming the field, never a TypeError or KeyError later on."""
    hint = "the manifest is corrupt or from an incompatible version: re-export the bundle"
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: the manifest must be a JSON object", hint=hint)
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{path} is not a p2p hypernetwork bundle manifest (format={manifest.get('format')!r})", hint=hint)
    version = manifest.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise BundleError(f"{path}: bundle format version {version!r}, this p2p-local reads {FORMAT_VERSION}",
                          hint="upgrade p2p-local or re-export the bundle")
    for section, keys in _REQUIRED.items():
        if not isinstance(manifest.get(section), dict):
            raise BundleError(f"{path}: missing section {section!r}", hint=hint)
        for key in keys:
            if key not in manifest[section]:
                raise BundleError(f"{path}: missing {section}.{key}", hint=hint)
    if "feature_dim" not in manifest:
        raise BundleError(f"{path}: missing feature_dim", hint=hint)

    def bad(field: str, value: Any, want: str) -> BundleError:
        return BundleError(f"{path}: {field} must be {want}, got {_short(value)}", hint=hint)

    def check(field: str, value: Any, ok: bool, want: str) -> None:
        if not ok:
            raise bad(field, value, want)

    def is_int(v: Any, lo: int, hi: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi

    def is_text(v: Any) -> bool:
        return isinstance(v, str) and bool(v.strip())

    base, encoder, lora, onnx = manifest["base"], manifest["encoder"], manifest["lora"], manifest["onnx"]
    check("base.sha256", base["sha256"], is_text(base["sha256"]), "a sha256 string")
    check("base.arch", base["arch"], is_text(base["arch"]), "an architecture name")
    check("encoder.dim", encoder["dim"], is_int(encoder["dim"], 1, _MAX_DIM), f"an integer in 1..{_MAX_DIM}")
    for key in ("id", "sha256"):
        value = encoder.get(key)
        check(f"encoder.{key}", value, value is None or isinstance(value, str), "a string")
    check("feature_dim", manifest["feature_dim"], is_int(manifest["feature_dim"], 1, _MAX_DIM),
          f"an integer in 1..{_MAX_DIM}")
    names = manifest.get("feature_names")
    check("feature_names", names, names is None or (isinstance(names, list) and all(isinstance(n, str) for n in names)),
          "a list of strings")
    fv = manifest.get("feature_version")
    check("feature_version", fv, fv is None or is_int(fv, 0, 1 << 31) or isinstance(fv, str), "an integer")
    check("neutral", manifest.get("neutral"), isinstance(manifest.get("neutral", False), bool), "true or false")
    check("name", manifest.get("name"), isinstance(manifest.get("name", ""), str), "a string")
    tasks = manifest.get("tasks", [])
    check("tasks", tasks, isinstance(tasks, list), "a list")
    cards = manifest.get("cards", {})
    check("cards", cards, isinstance(cards, dict) and all(isinstance(v, str) for v in cards.values()),
          "an object of task name to card hash")

    check("lora.rank", lora["rank"], is_int(lora["rank"], 1, _MAX_RANK), f"an integer in 1..{_MAX_RANK}")
    alpha = lora["alpha"]
    check("lora.alpha", alpha, isinstance(alpha, int | float) and not isinstance(alpha, bool)
          and math.isfinite(alpha) and alpha > 0
          and (not is_int(lora["rank"], 1, _MAX_RANK) or alpha / lora["rank"] <= MAX_LORA_SCALE),
          f"a positive number at most {MAX_LORA_SCALE:g} x rank")
    targets = lora["targets"]
    check("lora.targets", targets, isinstance(targets, list) and bool(targets) and len(set(map(str, targets))) == len(targets)
          and all(is_text(t) for t in targets), "a non-empty list of distinct module names")
    layers = lora["layers"]
    check("lora.layers", layers, isinstance(layers, list) and bool(layers) and len(set(map(str, layers))) == len(layers)
          and all(is_int(x, 0, _MAX_LAYER) for x in layers), f"a non-empty list of distinct integers in 0..{_MAX_LAYER}")
    shapes = lora["shapes"]
    check("lora.shapes", shapes, isinstance(shapes, dict), "an object of [n_out, n_in] per target")
    for m in targets:
        s = shapes.get(m)
        check(f"lora.shapes.{m}", s, isinstance(s, list) and len(s) == 2 and all(is_int(x, 1, _MAX_DIM) for x in s),
              f"[n_out, n_in], two integers in 1..{_MAX_DIM}")

    file = onnx["file"]
    check("onnx.file", file, is_text(file) and file == Path(file).name and file not in (".", ".."),
          "a file name inside the bundle directory")
    sha = onnx.get("sha256")
    check("onnx.sha256", sha, sha is None or isinstance(sha, str), "a sha256 string")


_MAX_DIM = 1 << 20  # far above any real width: bounds what a manifest can make us allocate
_MAX_RANK = 4096
_MAX_LAYER = 10_000


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
