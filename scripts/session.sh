#!/usr/bin/env bash
# Records the README's example session: real commands in a throwaway data dir, output as Markdown.
# Usage: scripts/session.sh > docs/session.md   (run after `make prepare`)
set -euo pipefail
cd "$(dirname "$0")/.."
P2P_MODELS="$(.venv/bin/python -c 'from p2p_local.paths import models_dir; print(models_dir())')"
export P2P_MODELS
P2P_HOME="$(mktemp -d)"
export P2P_HOME
trap 'rm -rf "$P2P_HOME"' EXIT
ML=../shared/data/movielens-latest-small/ratings.csv
run() {
  echo "\$ p2p $*" | sed "s#$PWD/##g"
  .venv/bin/p2p "$@" 2>&1 | sed "s#$P2P_HOME#~/.local/share/p2p-local#g; s#$P2P_MODELS#~/.local/share/p2p-local/models#g"
}
echo '```console'
run profile create alice --task movielens-rating
run profile import alice "$ML" --user 76
run personalize alice --query "Heat (1995) | Genres: Action|Crime|Thriller"
run ask "Heat (1995) | Genres: Action|Crime|Thriller" --profile alice --task movielens-rating
run ask "Heat (1995) | Genres: Action|Crime|Thriller" --profile alice --task movielens-rating --base
run ask "Toy Story (1995) | Genres: Adventure|Animation|Children|Comedy|Fantasy" --profile alice --task movielens-rating
run ask "Toy Story (1995) | Genres: Adventure|Animation|Children|Comedy|Fantasy" --profile alice --task movielens-rating --base
run profile forget alice --yes
echo '```'
echo
echo "Recorded by \`scripts/session.sh\` on $(uname -sm), $(nproc) CPUs, $(date -u +%Y-%m-%d)."
