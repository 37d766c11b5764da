#!/usr/bin/env bash
# The shipped evaluation: every method on held-out users of every task, test and OOD splits, then the
# summary page, the bundle's evaluation card and the P2P-vs-OPPU deployment cost. `make report` runs it.
#
# Sized as the shipped reports: every held-out user of each task and split (commit OOD: a seeded 200 of 499),
# each user's last Q items as queries, OPPU on the first 12 users of each row (it trains one LoRA per user,
# minutes each on one core). `p2p eval --summary` states how long the rows took beside the README's headline;
# on 2 cores run two processes, one row each (ONLY=, P2P_THREADS=1). Results are stored per (method, user)
# under reports/runs/: an interrupted run continues where it stopped, and a run of the same sizes after it only
# rebuilds the reports.
# Sizes are "users:queries:oppu_users" per task and split, overridable, e.g.
#   ML_TEST=40:5:4 scripts/evaluate.sh  (a quicker, smaller row)
# ONLY="commit-subject:test commit-subject:ood" runs only those task:split rows.
# COST=0 skips the deployment-cost run (OPPU trains a LoRA per user: ~20 min on 2 cores).
# METHODS=a,b,... runs only those methods (those that do not apply to a task's kind are skipped);
# SUMMARY=0 skips the summary page, the bundle card and the README splice (e.g. a partial re-run into another OUT).
# BUNDLE=DIR measures a candidate bundle instead of the shipped one, e.g. only the methods that read it, into
# another OUT: BUNDLE=lab-out/B OUT=lab-out/B-eval METHODS=p2p,p2p-shuffled,... SUMMARY=0 COST=0 scripts/evaluate.sh
set -euo pipefail
cd "$(dirname "$0")/.."
P2P=.venv/bin/p2p
OUT=${OUT:-reports}
N_CTX=${N_CTX:-1024}
OPPU_MAX_ITEMS=${OPPU_MAX_ITEMS:-64}  # the latest 64 items per user (minutes saved per user on a CPU)
# The MT-LoRA baseline ships beside the bundle (trained with it: trainer.gpu run --mtlora-budget).
MTLORA=${MTLORA:-models/gemma3-270m-p2p/mt-lora.gguf}
ML_TEST=${ML_TEST:-122:5:12};   ML_OOD=${ML_OOD:-64:5:12}
OFF_TEST=${OFF_TEST:-52:5:12};  OFF_OOD=${OFF_OOD:-32:5:12}
GIT_TEST=${GIT_TEST:-210:1:12}; GIT_OOD=${GIT_OOD:-200:1:12}  # every test author; OOD: 200 of 499; the last commit each
MAIL_TEST=${MAIL_TEST:-45:3:12}; MAIL_OOD=${MAIL_OOD:-29:3:12}

run() {  # run TASK SPLIT USERS:QUERIES:OPPU [extra args]
  local task=$1 split=$2 users queries oppu
  # ONLY="task:split ..." runs just those rows (e.g. two processes, one per split, on a 2-core machine).
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $task:$split "* ]]; then return 0; fi
  IFS=: read -r users queries oppu <<<"$3"
  shift 3
  local args=(--task "$task" --split "$split" --users "$users" --queries "$queries" --out "$OUT" --n-ctx "$N_CTX")
  [ -f "$MTLORA" ] && args+=(--mtlora "$MTLORA")
  [ -n "${METHODS:-}" ] && args+=(--methods "$METHODS")
  [ -n "${BUNDLE:-}" ] && args+=(--bundle "$BUNDLE")
  if [ "$oppu" -gt 0 ]; then args+=(--oppu-train --oppu-users "$oppu" --oppu-max-items "$OPPU_MAX_ITEMS"); fi
  $P2P eval "${args[@]}" "$@"
}

run movielens-rating test "$ML_TEST"
run popquorn-offensiveness test "$OFF_TEST"
run commit-subject test "$GIT_TEST"
# Email rewrites are long: every method gets the same 64-token generation budget.
run popquorn-email-rewrite test "$MAIL_TEST" --max-tokens 64
run movielens-rating ood "$ML_OOD"
run popquorn-offensiveness ood "$OFF_OOD"
run commit-subject ood "$GIT_OOD"
run popquorn-email-rewrite ood "$MAIL_OOD" --max-tokens 64
if [ "${SUMMARY:-1}" != 0 ]; then $P2P eval --summary --out "$OUT" --card models/gemma3-270m-p2p --readme README.md; fi
if [ "${COST:-1}" != 0 ]; then $P2P bench cost --json-out "$OUT/cost.json"; fi
