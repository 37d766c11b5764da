#!/usr/bin/env bash
# Records the README's `p2p serve` session: a temporary data dir holding the demo profile, the server on
# 127.0.0.1, then curl and the official openai client against it, and `p2p ask` for the same query beside them.
#   scripts/serve_session.sh > /tmp/serve-session.txt
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$PWD/.venv/bin/python
P2P="$PY -m p2p_local.cli"
P2P_MODELS=${P2P_MODELS:-$($PY -c 'from p2p_local.paths import models_dir; print(models_dir())')}
P2P_HOME=$(mktemp -d)
export P2P_HOME P2P_MODELS
PORT=${PORT:-8765}
PID=
trap '[ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$P2P_HOME"' EXIT
$P2P profile create demo --task movielens-rating >/dev/null
$P2P profile import demo p2p_local/demo/movielens-user76.jsonl >/dev/null
$P2P serve --port "$PORT" >"$P2P_HOME/serve.log" 2>&1 &
PID=$!
for _ in $(seq 120); do curl -sf "localhost:$PORT/v1/models" >/dev/null && break; sleep 0.5; done

run() { printf '$ %s\n' "$1"; bash -c "$1"; }
echo '$ p2p serve &       # http://127.0.0.1:8765/v1, this machine only'
run "curl -s localhost:$PORT/v1/models | jq -r '.data[].id'"
run "curl -s localhost:$PORT/v1/chat/completions -H 'Content-Type: application/json' -d '{\"model\": \"p2p/demo/movielens-rating\", \"messages\": [{\"role\": \"user\", \"content\": \"Heat (1995) | Genres: Action|Crime|Thriller\"}]}' | jq -c '{answer: .choices[0].message.content, p2p: .p2p | {profile, task, scale, distribution}}'"
echo "\$ p2p ask 'Heat (1995) | Genres: Action|Crime|Thriller' --profile demo --task movielens-rating   # the same answer"
$P2P ask 'Heat (1995) | Genres: Action|Crime|Thriller' --profile demo --task movielens-rating
cat >"$P2P_HOME/client.py" <<PYEOF
from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:$PORT/v1", api_key="unused")  # no key: loopback only
stream = client.chat.completions.create(model="p2p/base", stream=True, max_tokens=24,
                                        messages=[{"role": "user", "content": "Name a film for a rainy evening."}])
print("".join(chunk.choices[0].delta.content or "" for chunk in stream))
PYEOF
printf '$ python client.py\n'
sed 's/^/    /' "$P2P_HOME/client.py"
$PY "$P2P_HOME/client.py"
echo
echo "Recorded by scripts/serve_session.sh on $(uname -sm), $(nproc) CPUs, $(date -u +%Y-%m-%d)."
