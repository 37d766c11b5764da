#!/usr/bin/env bash
# Issue 23, tried as a new user would: an author's real commits replayed through `p2p ask -` on a repository of
# your choice (e.g. a clone of pallets/click, which training never saw). The profile is the author's history cut
# just before their last N commits (a worktree at the parent of the first of them); each of those commits' own
# diff is then piped in, as `git diff --cached | p2p ask -` would be. Prints the real subject, the three
# proposals and COPY where the first repeats an earlier subject of the author word for word; then a count.
#   scripts/commit_replay.sh REPO AUTHOR_EMAIL [N=10]     (run after `make prepare`; a throwaway data dir)
set -euo pipefail
REPO=$(cd "$1" && pwd); AUTHOR=$2; N=${3:-10}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
P2P="$ROOT/.venv/bin/p2p"; PY="$ROOT/.venv/bin/python"
P2P_MODELS=${P2P_MODELS:-$($PY -c 'from p2p_local.paths import models_dir; print(models_dir())')}
P2P_HOME=$(mktemp -d); WT=$(mktemp -d)
export P2P_HOME P2P_MODELS
trap 'git -C "$REPO" worktree remove --force "$WT" 2>/dev/null || true; rm -rf "$P2P_HOME" "$WT"' EXIT
mapfile -t HELD < <(git -C "$REPO" log --no-merges --author="$AUTHOR" --format=%H -n "$N")
git -C "$REPO" worktree add -q --detach "$WT" "${HELD[-1]}^"
"$P2P" profile import me --git "$WT" --author "$AUTHOR" --create | head -1
git -C "$WT" log --no-merges --author="$AUTHOR" --format=%s > "$P2P_HOME/earlier.txt"
copies=0
for h in $(printf '%s\n' "${HELD[@]}" | tac); do
  echo "real: $(git -C "$REPO" log -1 --format=%s "$h")"
  out=$(git -C "$REPO" diff "$h^" "$h" | "$P2P" ask - --task commit-subject --profile me --candidates 3 --json \
    | "$PY" -c '
import json, sys
earlier = {" ".join(line.split()).lower() for line in open(sys.argv[1], encoding="utf-8")}
lines = [c["text"] for c in json.load(sys.stdin)["candidates"]]
copy = " ".join(lines[0].split()).lower() in earlier
print(("COPY " if copy else "") + " | ".join(lines))' "$P2P_HOME/earlier.txt")
  [[ $out == COPY* ]] && copies=$((copies + 1))
  echo "  p2p: $out"
done
echo "first proposals repeating an earlier subject of the author: $copies of ${#HELD[@]}"
