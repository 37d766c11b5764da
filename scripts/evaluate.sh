#!/usr/bin/env bash
# The shipped evaluation: every method on held-out users of every task, test and OOD splits, then the
# summary page, the bundle's evaluation card and the P2P-vs-OPPU deployment cost. `make report` runs it.
#
# Sized for a 2-core CPU in about an hour: a seeded subset of users per task (prefix-stable, so a
# larger --users extends a run instead of redoing it), each user's last Q items as queries, OPPU on
# the first few users only (it trains one LoRA per user). Results are stored per (method, user) under
# reports/runs/: an interrupted run continues where it stopped. Override the sizes with env vars, e.g.
#   USERS_RATING=122 QUERIES_RATING=10 scripts/evaluate.sh
set -euo pipefail
cd "$(dirname "$0")/.."
P2P=.venv/bin/p2p
OUT=${OUT:-reports}
MTLORA=${MTLORA:-$(.venv/bin/python -c 'from p2p_local.paths import data_dir; print(data_dir() / "baselines" / "mt-lora-all.gguf")' 2>/dev/null || true)}
USERS_RATING=${USERS_RATING:-40}; QUERIES_RATING=${QUERIES_RATING:-5}
USERS_OOD=${USERS_OOD:-24}
USERS_GEN=${USERS_GEN:-12}; QUERIES_GEN=${QUERIES_GEN:-3}
OPPU_USERS=${OPPU_USERS:-4}
N_CTX=${N_CTX:-1024}

common=(--out "$OUT" --n-ctx "$N_CTX" --oppu-train --oppu-users "$OPPU_USERS")
[ -n "$MTLORA" ] && [ -f "$MTLORA" ] && common+=(--mtlora "$MTLORA")

for split in test ood; do
  if [ "$split" = test ]; then ur=$USERS_RATING; ug=$USERS_GEN; else ur=$USERS_OOD; ug=$USERS_GEN; fi
  for task in movielens-rating popquorn-offensiveness; do
    $P2P eval --task "$task" --split "$split" --users "$ur" --queries "$QUERIES_RATING" "${common[@]}"
  done
  $P2P eval --task pytest-commit-subject --split "$split" --users "$ug" --queries "$QUERIES_GEN" "${common[@]}"
  # Email rewrites are long: the generation budget is capped so that every method gets the same 64 tokens.
  $P2P eval --task popquorn-email-rewrite --split "$split" --users "$ug" --queries "$QUERIES_GEN" \
    --max-tokens 64 "${common[@]}"
done
$P2P eval --summary --out "$OUT" --card models/gemma3-270m-p2p
$P2P bench cost --json-out "$OUT/cost.json"
