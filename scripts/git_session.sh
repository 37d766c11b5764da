#!/usr/bin/env bash
# Records the README's "your own commits" transcript: import from git -> personalize -> a piped ask -> the hook.
# Real commands on a throwaway clone of this repository (its own history is the "user's" commits) and a
# throwaway data dir. Usage: scripts/git_session.sh > docs/git-session.md   (run after `make prepare`)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
P2P_MODELS="$(.venv/bin/python -c 'from p2p_local.paths import models_dir; print(models_dir())')"
export P2P_MODELS
P2P_HOME="$(mktemp -d)"
export P2P_HOME
WORK="$(mktemp -d)"
trap 'rm -rf "$P2P_HOME" "$WORK"' EXIT
git clone -q "$ROOT" "$WORK/p2p-local"
AUTHOR="$(git -C "$ROOT" log -1 --format=%aE)"
git -C "$WORK/p2p-local" config user.email "$AUTHOR"
git -C "$WORK/p2p-local" config user.name "$(git -C "$ROOT" log -1 --format=%aN)"
TASK=commit-subject
clean() { sed "s#$P2P_HOME#~/.local/share/p2p-local#g; s#$P2P_MODELS#~/.local/share/p2p-local/models#g; s#$WORK/##g; s#$AUTHOR#me@example.org#g"; }
show() { echo "\$ $*" | clean; }
p2p() { show "p2p $*"; "$ROOT/.venv/bin/p2p" "$@" 2>&1 | clean; }
echo '```console'
cd "$WORK/p2p-local"
p2p profile import me --git . --dry-run --create
p2p profile import me --git . --create
p2p profile import me --git .
p2p personalize me
echo "the profile's adapter, now for the change being committed:" > docs/NOTE.md
git add docs/NOTE.md
show "git diff --cached | p2p ask - --task $TASK --profile me --candidates 3"
git diff --cached | "$ROOT/.venv/bin/p2p" ask - --task "$TASK" --profile me --candidates 3 2>&1 | clean
show "git diff --cached | p2p ask - --task $TASK --profile me --json    # its \"read\" field:"
git diff --cached | "$ROOT/.venv/bin/p2p" ask - --task "$TASK" --profile me --json 2>&1 \
  | "$ROOT/.venv/bin/python" -c 'import json, sys; print(json.dumps(json.load(sys.stdin)["read"], separators=(",", ":")))'
p2p hook install --profile me
show "git commit        # the editor opens on the proposed subject; saved as it is"
GIT_EDITOR=true git commit -q 2>&1 | clean
show "head -4 .git/COMMIT_EDITMSG   # what the editor showed"
head -4 .git/COMMIT_EDITMSG
show "git log -1 --format=%s"
git log -1 --format=%s
p2p hook uninstall
echo '```'
echo
echo "Recorded by \`scripts/git_session.sh\` on $(uname -sm), $(nproc) CPUs, $(date -u +%Y-%m-%d)."
