#!/usr/bin/env bash
# Issue 23: can re-ranking the app's candidate lines carry more of the change? Measured on the VALIDATION
# authors (never the test ones): the app's answer (p2p) on every validation author's last 5 commits, then, offline
# from the lines each answer was chosen among (python -m p2p_lab.eval.anticopy --query-overlap), the copy-rule
# margins, the lines the rule keeps re-ordered by their overlap with the query (files + diff), and the ceiling
# (the best line for each query, chosen knowing the real subject). Writes reports/commit-rerank.{md,json,png}.
# About 17 minutes on 2 cores; REPORT_ONLY=1 rebuilds the report from the stored run.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/p2p-rerank}
REPORT=reports/commit-rerank
if [ "${REPORT_ONLY:-0}" != 1 ]; then
  .venv/bin/p2p eval --task commit-subject --split val --methods p2p --queries 5 --n-ctx 1024 --bootstrap 200 --out "$OUT"
fi
{
  echo "# Commit answers: re-ranking the candidate lines (validation authors)"
  echo
  echo "Command: \`scripts/commit_rerank.sh\`; machine: $(uname -sm), $(nproc) CPUs; $(date -u +%F)."
  echo "The app's answer is the first of up to 4 greedy lines (one per most likely first token), a line that repeats one"
  echo "of the author's earlier subjects moved below any other within 1 nat/token (pipeline.rank_candidates). Below,"
  echo "the same lines re-ranked offline; the app's rule is the row \"margin 1\". \"+ overlap xW\": the lines the rule keeps first,"
  echo "ordered by mean log-probability + W x the share of their words in the query (files + diff)."
  echo
  .venv/bin/python -m p2p_lab.eval.anticopy "$OUT"/runs/commit-subject-val-* --query-overlap --out "$REPORT" | tail -n +3
} > "$REPORT.md.tmp"
mv "$REPORT.md.tmp" "$REPORT.md"
echo "wrote $REPORT.md"
