"""Export a trained hypernetwork as a device bundle: `hypernet.onnx` + `manifest.json` (read by p2p_local.bundle).

    python -m trainer.export                                          # runs/full/last.pt -> models/gemma3-270m-p2p/
    python -m trainer.export --checkpoint runs/short/last.pt --out /tmp/bundle
    python -m trainer.export --neutral                                # untrained stand-in (zero adapter)

The big head matrices are stored as float16 initializers with a Cast to float32 in the graph: half the
file size (the bundle ships in the repo, <= 25 MB) for an A/B error far below the 1e-3 parity bound.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import os
import platform
import subprocess
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from p2p_local.adapter import tensor_name
from p2p_local.bundle import (
    DEFAULT_BUNDLE,
    FORMAT,
    FORMAT_VERSION,
    INPUT_EMBEDDING,
    INPUT_FEATURES,
    MANIFEST,
    output_names,
)
from p2p_local.files import replacing_dir
from p2p_local.paths import repo_root
from trainer.config import HyperConfig, TrainConfig, contract_feature_dim
from trainer.hypernet import HyperNet, count_params

ONNX_FILE = "hypernet.onnx"
OPSET = 17
FP16_MIN_ELEMENTS = 1 << 16  # initializers at least this big are stored as float16
MAX_BUNDLE_BYTES = 25 * 1024 * 1024


class _OnnxWrapper(torch.nn.Module):
    """Flattens HyperNet's dict output into the bundle's ordered output list."""

    def __init__(self, net: HyperNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, embedding: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.net(embedding, features)
        return tuple(t for m in self.net.cfg.targets for t in out[m])


def to_onnx(net: HyperNet, fp16_weights: bool = True) -> bytes:
    """The hypernetwork as ONNX bytes (dynamic batch), large weights optionally stored as float16."""
    cfg = net.cfg
    net = net.eval().float()
    names = [n for m in cfg.targets for n in output_names(m)]
    dummy = (torch.randn(2, cfg.embedding_dim), torch.randn(2, cfg.feature_dim))
    buf = io.BytesIO()
    dynamic = {INPUT_EMBEDDING: {0: "batch"}, INPUT_FEATURES: {0: "batch"}, **{n: {0: "batch"} for n in names}}
    with torch.no_grad():
        torch.onnx.export(_OnnxWrapper(net).eval(), dummy, buf, input_names=[INPUT_EMBEDDING, INPUT_FEATURES],
                          output_names=names, dynamic_axes=dynamic, opset_version=OPSET, dynamo=False,
                          do_constant_folding=True)
    model = onnx.load_from_string(buf.getvalue())
    if fp16_weights:
        _store_fp16(model)
    model.producer_name = "p2p-local trainer.export"
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _store_fp16(model: onnx.ModelProto) -> None:
    """Replace big float32 initializers by float16 ones + a Cast node (same tensor name downstream)."""
    graph = model.graph
    casts = []
    for init in list(graph.initializer):
        if init.data_type != TensorProto.FLOAT or int(np.prod(init.dims)) < FP16_MIN_ELEMENTS:
            continue
        arr = numpy_helper.to_array(init)
        half = numpy_helper.from_array(arr.astype(np.float16), name=init.name + "__fp16")
        graph.initializer.remove(init)
        graph.initializer.append(half)
        casts.append(helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT, name=init.name + "__cast"))
    for i, node in enumerate(casts):  # casts first: nodes must stay topologically sorted
        graph.node.insert(i, node)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root(), capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_root(),
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def base_info(gguf_path: Path | None = None):
    """(BaseInfo, ModelSpec-like name) of the base the hypernetwork was trained for (default: DEFAULT_BASE)."""
    from p2p_local.adapter import BaseInfo
    from p2p_local.files import sha256_file
    from p2p_local.models import DEFAULT_BASE, prepare_base

    if gguf_path is None:
        return BaseInfo.from_gguf(prepare_base(DEFAULT_BASE), DEFAULT_BASE.sha256), DEFAULT_BASE.name
    return BaseInfo.from_gguf(gguf_path, sha256_file(Path(gguf_path))), Path(gguf_path).stem


def encoder_info() -> dict:
    """The profile encoder the bundle expects (the one the device runs)."""
    from p2p_local import encoder

    return {"id": encoder.ENCODER_ID, "sha256": encoder.SOURCE_SHA256, "dim": encoder.Encoder.dim}


def trained_cards(tasks: list[dict] | None, training: dict | None) -> dict[str, str]:
    """{task: card_hash} of the cards a run trained on: the hash the trainer recorded per task (`card` in
    `tasks` or `training["data"]`) where it did; else the app's card (p2p_lab's prepared card for a task
    not built in), its `examples` kept only where the run showed them (`training["prompt_examples"]`,
    else the recipe's default)."""
    from p2p_local.data.format import TaskCard, builtin_card, builtin_cards, canonical_task, card_hash
    from p2p_local.errors import DataError
    from trainer.config import RECIPES

    training = training or {}
    shows = training.get("prompt_examples", RECIPES.get(training.get("recipe"), {}).get("prompt_examples", False))
    recorded = {t["name"]: t["card"] for t in [*training.get("data", []), *(tasks or [])] if t.get("card")}
    out: dict[str, str] = {}
    for name in [t["name"] for t in tasks or []]:
        if name in recorded:
            out[name] = recorded[name]
            continue
        try:
            if canonical_task(name) in builtin_cards():
                card = builtin_card(name)
            else:
                from p2p_lab.data.prepare import task_dir  # the trainer's card for a task of its own

                card = TaskCard.load(task_dir(name) / "card.json")
        except (ImportError, DataError) as e:  # no record for it: the app says "untrained", never refuses
            print(f"warning: no card recorded for task {name!r} ({e})")
            continue
        out[name] = card_hash(card if shows else TaskCard.from_dict({**card.to_dict(), "examples": 0}))
    return out


def inherit_tasks(init_bundle: str | Path, tasks: list[dict], training: dict) -> tuple[list[dict], dict[str, str]]:
    """A warm start's tasks and cards: its own run's, then those of the bundle it started from that it did not
    train again. Their weights came from that bundle and their prompts were its (its recorded card hashes,
    not today's cards); the rows measured with the warm start say how far the shared weights moved for them.
    `training` gains `init_bundle` (its name, ONNX hash and the inherited tasks)."""
    path = Path(init_bundle) if Path(init_bundle).is_absolute() else repo_root() / init_bundle
    parent = json.loads((path / MANIFEST).read_text())
    own = {t["name"] for t in tasks}
    cards = trained_cards(tasks, training)
    kept = [t for t in parent.get("tasks", []) if t.get("name") not in own]
    record = {"name": parent.get("name", path.name), "onnx_sha256": parent["onnx"]["sha256"],
              "inherited_tasks": [t["name"] for t in kept]}
    before = parent.get("training", {})
    if before.get("init_bundle") and all(before.get(k) == training.get(k) for k in ("recipe", "steps", "wall_time_s")):
        record = before["init_bundle"]  # that folder now holds this run's own export (shipped): keep its record
    parent_cards = parent.get("cards") or {}
    cards.update({t["name"]: parent_cards[t["name"]] for t in kept if t["name"] in parent_cards})
    training["init_bundle"] = record
    return [*tasks, *kept], cards


def export_bundle(
    net: HyperNet,
    out_dir: str | Path,
    *,
    base=None,
    base_name: str = "gemma3-270m",
    neutral: bool = False,
    tasks: list[dict] | None = None,
    training: dict | None = None,
    evaluation: dict | None = None,
    feature_names: list[str] | None = None,
    fp16_weights: bool = True,
    cards: dict[str, str] | None = None,
) -> Path:
    """Write `out_dir/{hypernet.onnx, manifest.json}` atomically (a temp dir renamed into place).
    `cards`: {task: card_hash} trained on (default: `trained_cards(tasks, training)`; none when neutral)."""
    cfg = net.cfg
    if base is None:
        base, base_name = base_info()
    for layer in cfg.layers:
        for m in cfg.targets:
            got = tuple(base.shapes.get(tensor_name(layer, m), ()))
            if got != tuple(cfg.shapes[m]):
                raise ValueError(f"hypernetwork shape {cfg.shapes[m]} for {m} does not match base tensor {got}")
    data = to_onnx(net, fp16_weights=fp16_weights)
    if len(data) > MAX_BUNDLE_BYTES:
        print(f"warning: hypernet.onnx is {len(data) / 2**20:.1f} MiB, over the {MAX_BUNDLE_BYTES / 2**20:.0f} MiB budget")
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": Path(out_dir).name,
        "neutral": neutral,
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": git_commit(),
        "base": {"name": base_name, "sha256": base.sha256, "arch": base.arch, "n_layers": base.n_layers},
        "encoder": encoder_info(),
        "feature_dim": cfg.feature_dim,
        # The feature contract (p2p_local.profile): Bundle.check refuses a bundle whose contract differs.
        "feature_version": feature_version(),
        "feature_names": feature_names or default_feature_names(),
        "inputs": {"embedding": "float32 [B, E], the L2-normalised mean of the profile's pooled items, each embedded "
                                "alone by the encoder (p2p_local.pipeline.profile_embedding)",
                   "features": "float32 [B, F], raw profile features"},
        "lora": {"rank": cfg.rank, "alpha": float(cfg.scale * cfg.rank), "scale": cfg.scale, "targets": list(cfg.targets),
                 "layers": list(cfg.layers), "shapes": {m: list(cfg.shapes[m]) for m in cfg.targets},
                 "outputs": {m: list(output_names(m)) for m in cfg.targets}},
        "onnx": {"file": ONNX_FILE, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "opset": OPSET,
                 "fp16_weights": fp16_weights},
        "hypernet": {"config": cfg.to_dict(), "params": count_params(net)},
        "tasks": tasks or [],
        # The cards trained on: the app flags an answer on a card changed since (p2p_local.bundle.card_status).
        "cards": {} if neutral else cards if cards is not None else trained_cards(tasks, training),
        "training": training or {},
        "evaluation": evaluation or {},
    }
    out_dir = Path(out_dir)
    with replacing_dir(out_dir) as tmp:  # an ordinary shipped folder (0755), swapped in whole
        (tmp / ONNX_FILE).write_bytes(data)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir


def hypernet_from_bundle(bundle_dir: str | Path) -> HyperNet:
    """The hypernetwork a bundle holds, back in torch (to_onnx's inverse): a warm start for training when the
    checkpoint it came from is elsewhere (the shipped bundle was trained on a GPU machine). Its config is the
    manifest's; weights come from the ONNX initializers: float16 ones cast back, a MatMul's constant input is
    the Linear's weight transposed (named by the node's module scope), and the two embedding tables were
    folded into the rows their lookups give (all layers of module 0, then of module 1 ...). Checked by
    `tests/test_export.py` against onnxruntime on the same inputs."""
    bundle_dir = Path(bundle_dir)
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    net = HyperNet(HyperConfig.from_dict(manifest["hypernet"]["config"]))
    cfg = net.cfg
    model = onnx.load(str(bundle_dir / manifest["onnx"]["file"]))
    consts = {init.name.removesuffix("__fp16"): torch.from_numpy(numpy_helper.to_array(init).astype(np.float32))
              for init in model.graph.initializer}
    # Named initializers first; the graph's nodes then name what the exporter renamed or merged (identical
    # constants, e.g. two LayerNorms' untrained weights, are stored once under one name).
    state = {name.removeprefix("net."): value for name, value in consts.items() if name.startswith("net.")}
    linear = set()
    for node in model.graph.node:
        scope = _module_name(node.name)
        key = f"heads.{scope}" if scope in cfg.targets else scope
        const = [consts.get(i) for i in node.input]
        if node.op_type in ("Identity", "Cast") and const[0] is not None:  # a merged constant, a float16 one
            consts[node.output[0]] = const[0]
        elif node.op_type == "MatMul" and const[1] is not None:  # x @ W.T, W.T folded into a constant
            state[f"{key}.weight"] = const[1].T.contiguous()
            linear.add(scope)
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            state[f"{key}.weight"] = const[1] if trans_b else const[1].T.contiguous()
            state[f"{key}.bias"] = const[2]
        elif node.op_type == "Add" and scope in linear and any(c is not None for c in const):
            state[f"{key}.bias"] = next(c for c in const if c is not None)
        elif node.op_type == "LayerNormalization":
            state[f"{key}.weight"], state[f"{key}.bias"] = const[1], const[2]
            if scope == "layer_norm":  # its input: the layer table's rows, all layers of module 0, then module 1 ..
                state["layer_emb.weight"] = _embedding_rows(const[0][:len(cfg.layers)], cfg.layers, cfg.n_layers)
            elif scope == "module_norm":
                state["module_emb.weight"] = const[0][::len(cfg.layers)]
    net.load_state_dict(state)
    return net.eval()


def _module_name(node_name: str) -> str:
    """`/net/blocks.0/fc1/MatMul` -> `blocks.0.fc1`; a Sequential's child is scoped by its full name
    (`/net/profile/profile.0/Gemm` -> `profile.0`)."""
    out: list[str] = []
    for part in node_name.removeprefix("/net/").split("/")[:-1]:
        if out and part.startswith(out[-1] + "."):
            out[-1] = part
        else:
            out.append(part)
    return ".".join(out)


def _embedding_rows(rows: torch.Tensor, layers: list[int], n_layers: int) -> torch.Tensor:
    """The layer-embedding table from the rows of the adapted layers (a layer not adapted keeps zeros: unused)."""
    table = torch.zeros(n_layers, rows.shape[1])
    table[torch.tensor(layers)] = rows
    return table


def neutral_hypernet(feature_dim: int | None = None) -> HyperNet:
    """The untrained hypernetwork (zero heads, B = 0): generates the zero adapter for every profile."""
    torch.manual_seed(0)
    return HyperNet(HyperConfig(feature_dim=feature_dim or contract_feature_dim())).eval()


def feature_version() -> int:
    from p2p_local.profile import FEATURE_VERSION

    return int(FEATURE_VERSION)


def default_feature_names() -> list[str]:
    from p2p_local.profile import FEATURE_NAMES

    return list(FEATURE_NAMES)


def logged_evaluation(checkpoint: str | Path, step: int) -> dict | None:
    """The validation the run logged at `step` (metrics.jsonl beside the checkpoint), as the manifest's
    `evaluation`: a run stopped early (`--stop-after`) never reached the selection that writes it into the
    checkpoint."""
    log = Path(checkpoint).parent / "metrics.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    found = [r["eval"] for r in rows if r.get("step") == step and r.get("eval")]
    return {"split": "val", "tasks": found[-1]} if found else None


def load_checkpoint(path: str | Path) -> tuple[HyperNet, dict]:
    """(hypernetwork in eval mode, the checkpoint dict) from a trainer checkpoint."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    cfg = TrainConfig.from_dict(ckpt["config"])
    if cfg.method != "p2p":
        raise ValueError(f"{path} is a {cfg.method} checkpoint, not a hypernetwork (use trainer.baselines for it)")
    if cfg.encoder != "minilm":  # the device embeds profiles with MiniLM: another encoder's bundle would be garbage
        raise ValueError(f"{path} was trained on {cfg.encoder} embeddings; only MiniLM bundles run on the device")
    net = HyperNet(cfg.hyper)
    net.load_state_dict(ckpt["model"])
    return net.eval(), ckpt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, help="trainer checkpoint (runs/<run>/last.pt)")
    ap.add_argument("--neutral", action="store_true", help="export the untrained stand-in (zero adapter)")
    ap.add_argument("--out", type=Path, default=repo_root() / "models" / DEFAULT_BUNDLE)
    ap.add_argument("--fp32", action="store_true", help="store all weights as float32 (bigger file)")
    args = ap.parse_args(argv)
    if args.neutral and args.checkpoint:
        ap.error("pass --checkpoint or --neutral, not both")
    if not args.neutral and not args.checkpoint:
        from trainer.train import result_checkpoint

        args.checkpoint = result_checkpoint(repo_root() / "runs" / "full")  # what `make train` writes
        if not args.checkpoint.is_file():
            ap.error(f"no checkpoint at {args.checkpoint}: run `make train` first, or pass --checkpoint / --neutral")
    if args.neutral:
        net, extra = neutral_hypernet(), {}
    else:
        net, ckpt = load_checkpoint(args.checkpoint)
        extra = ckpt.get("export_meta", {})
        extra.setdefault("training", {}).setdefault("prompt_examples", bool(ckpt["config"].get("prompt_examples")))
        if not extra.get("evaluation"):
            extra["evaluation"] = logged_evaluation(args.checkpoint, ckpt.get("step", -1))
    if args.neutral:
        extra["feature_names"] = default_feature_names()
    training = extra.get("training", {})
    training.setdefault("machine", f"{platform.machine()} {platform.system()}, {os.cpu_count()} cpus")
    tasks, cards = extra.get("tasks"), None
    if not args.neutral and ckpt["config"].get("init_bundle"):  # a warm start keeps the tasks it did not retrain
        tasks, cards = inherit_tasks(ckpt["config"]["init_bundle"], tasks or [], training)
    out = export_bundle(net, args.out, neutral=args.neutral, tasks=tasks, training=training, cards=cards,
                        evaluation=extra.get("evaluation"), feature_names=extra.get("feature_names"),
                        fp16_weights=not args.fp32)
    size = (out / ONNX_FILE).stat().st_size
    print(f"wrote {out} ({size / 2**20:.1f} MiB onnx)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
