#!/usr/bin/env bash
# How the commit answer avoids parroting, chosen by measurement on the VALIDATION authors (never the test ones):
# the app's answer (p2p) with each example's diff shown in full (800 characters, the query's budget), cut to
# 200, or left out, and the answer before issue 23 (p2p-before), on the first USERS validation authors' last
# commit; then every copy-rule margin scored offline from the lines each answer was chosen among
# (python -m p2p_lab.eval.anticopy). Writes reports/commit-anticopy.md (+ .json/.png per variant).
# About 25 minutes on 2 cores (P2P_THREADS=1 runs two variants at once).
set -euo pipefail
cd "$(dirname "$0")/.."
P2P=.venv/bin/p2p
USERS=${USERS:-60}
OUT=${OUT:-/tmp/p2p-anticopy}
REPORT=reports/commit-anticopy
run() {  # run EXAMPLE_DIFF_CHARS METHODS
  $P2P eval --task commit-subject --split val --methods "$2" --users "$USERS" --queries 1 --n-ctx 2048 \
    --out "$OUT/ex$1" --card-field "examples_diff_chars=$1"
}
if [ "${REPORT_ONLY:-0}" != 1 ]; then  # REPORT_ONLY=1: the tables again from the stored runs
  run 800 p2p,p2p-before & run 200 p2p; run 0 p2p; wait
fi
mkdir -p "$REPORT"
{
  echo "# Commit answers: how much of each example's diff, and the copy rule (validation authors)"
  echo
  echo "Command: \`scripts/commit_anticopy.sh\` (USERS=$USERS); machine: $(uname -sm), $(nproc) CPUs; $(date -u +%F)."
  echo "The query always shows 800 characters of its own compact diff; examples are the author's 2 BM25-nearest"
  echo "earlier commits. The card's choice: examples_diff_chars 0, margin 1 (p2p_local/data/cards, pipeline.COPY_MARGIN)."
  for v in 800 200 0; do
    echo
    echo "## examples show $v characters of their diff"
    echo
    .venv/bin/python -m p2p_lab.eval.anticopy "$OUT/ex$v"/runs/commit-subject-val-* --out "$REPORT/ex$v" | tail -n +3
  done
  echo
  echo "## the answer before issue 23 (files-only query, greedy line) on the same authors"
  echo
  grep -E '^\| (method|---|p2p-before) ' "$OUT/ex800/commit-subject-val.md" | head -3
} > "$REPORT.md"
echo "wrote $REPORT.md"
