#!/usr/bin/env bash
# Starts the built Worker under `wrangler dev` for black-box suites (E2E_TARGET=edge):
#   scripts/edge-dev.sh PORT UPSTREAM_URL [API_KEY] [extra --var NAME:VALUE ...]
# Prints `listening on http://127.0.0.1:PORT` once it answers, then runs until killed (kill the
# process group). Run scripts/build-edge.sh first. State goes to a fresh temp dir unless
# EDGE_PERSIST_DIR is set (reuse it to test restarts).
set -euo pipefail
cd "$(dirname "$0")/.."
port=${1:?port}; upstream=${2:?upstream url}; key=${3:-}; shift $(( $# < 3 ? $# : 3 ))
persist=${EDGE_PERSIST_DIR:-$(mktemp -d)}
vars=(--var "ROLLGATE_BASE_URL:$upstream")
[ -n "$key" ] && vars+=(--var "ROLLGATE_API_KEY:$key")
export PATH="$PWD/node_modules/.bin:$PATH" WRANGLER_SEND_METRICS=false CI=true
wrangler dev -c wrangler.nobuild.toml --ip 127.0.0.1 --port "$port" --persist-to "$persist" \
  --show-interactive-dev-session=false --log-level warn "${vars[@]}" "$@" &
child=$!
trap 'kill "$child" 2>/dev/null || true' EXIT INT TERM
for _ in $(seq 1 150); do
  if curl -sf "http://127.0.0.1:$port/live" >/dev/null 2>&1; then
    echo "listening on http://127.0.0.1:$port"
    wait "$child"
    exit $?
  fi
  sleep 0.2
done
echo "wrangler dev did not start on port $port" >&2
exit 1
