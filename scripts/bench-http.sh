#!/usr/bin/env bash
# Prints HTTP throughput figures for the native server (a benchmark, not a test): wrk against a
# release `rollgate-proxy` in local mode on 127.0.0.1, for the default-context body, its 304, and
# a per-user evaluation (rules mode, 11 flags). Needs `wrk` (Debian package).
# Usage: ./scripts/bench-http.sh [seconds=10] [connections=64]
#        ROLLGATE_PROXY_BIN=path/to/rollgate-proxy ./scripts/bench-http.sh   (another build, e.g.
#        an older commit's, for a side-by-side comparison in one sitting)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
conns=${2:-64}
port=39181
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
bin=${ROLLGATE_PROXY_BIN:-}
if [ -z "$bin" ]; then
  cargo build --release -p rollgate-proxy-server --locked --quiet
  bin=./target/release/rollgate-proxy
fi
"$bin" --bind 127.0.0.1 --port "$port" --snapshot-file "" \
  --log-level warn >/dev/null 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break
  sleep 0.1
done
etag=$(curl -sfI "http://127.0.0.1:$port/api/flags" | awk -F': ' 'tolower($1)=="etag"{print $2}' | tr -d '\r')
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
run() {
  local name=$1; shift
  printf '\n--- %s\n' "$name"
  timeout $((secs + 30)) wrk -t2 -c"$conns" -d"${secs}s" --latency "$@" | grep -E 'Requests/sec|Latency  |50%|99%|Non-2xx'
}
run "GET /api/flags (default context, pre-serialized body)" "http://127.0.0.1:$port/api/flags"
run "GET /api/flags with If-None-Match (304)" -H "If-None-Match: $etag" "http://127.0.0.1:$port/api/flags"
run "GET /api/flags/new-checkout" "http://127.0.0.1:$port/api/flags/new-checkout"
run "GET /api/flags?user_id=… (rules evaluated per request)" "http://127.0.0.1:$port/api/flags?user_id=user-42&attr.plan=pro"
echo
echo "server RSS: $(awk '/VmRSS/{print $2, $3}' "/proc/$pid/status")"
