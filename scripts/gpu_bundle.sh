#!/usr/bin/env bash
# A device bundle from about ten minutes of a GPU machine that can fetch nothing (issue 11, item 7).
#
#   scripts/gpu_bundle.sh split [--recipe full] [--set KEY=VALUE ...]
#       HERE: build the recipe's sample sets, then cut them, the base GGUF (253 MB) and wheels of the
#       packages the trainer needs beyond torch/transformers into parts of <= 60 MiB under runs/gpu-carry/
#       (ignored), with a sha256 manifest. Carry each part over (one transfer of <= 64 MiB each) into one
#       folder there, e.g. `mkdir -p /tmp/p2p-carry && cp runs/gpu-carry/* /tmp/p2p-carry/`.
#
#   BUDGET=480 OUT=/path/out scripts/gpu_bundle.sh run /tmp/p2p-carry [--steps N] [--set KEY=VALUE ...]
#       THERE: reassemble and verify every file, install missing packages from the carried wheels,
#       train (bf16 on CUDA) for at most $BUDGET seconds, evaluate, export the bundle into $OUT/bundle
#       (with $OUT/summary.json and metrics.jsonl). Without a GPU the same path runs on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
phase=${1:-}
shift || true
case "$phase" in
  split) exec "$PY" -m trainer.gpu split "$@" ;;
  run)
    carry=${1:?usage: scripts/gpu_bundle.sh run CARRY_DIR [options]}
    shift
    exec "$PY" -m trainer.gpu run --carry "$carry" --out "${OUT:-gpu-out}" --budget "${BUDGET:-480}" "$@" ;;
  *) sed -n '2,16p' "$0"; exit 2 ;;
esac
