#!/usr/bin/env bash
# Prints what precompressed bodies buy on a 2,000-flag set (a benchmark, not a test): bytes on the
# wire of the polling routes in identity, gzip and br, and wrk req/s of a br answer vs identity,
# against a release `rollgate-proxy` in front of a release `mock-upstream` on 127.0.0.1.
# Needs `wrk`, `curl` and `python3`.
# Usage: ./scripts/bench-compression.sh [seconds=8] [connections=64]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-8}
conns=${2:-64}
mock_port=39191
port=39192
key=rg_server_bench-compression
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
cargo build --release --locked --quiet -p rollgate-proxy-server -p rollgate-proxy-tests --bins
dir=$(mktemp -d)
# 2,000 flags with keys like real ones (team, area, variant, number) and a reason each: the same
# set as core/benches/snapshot.rs.
python3 - "$dir/flags.json" <<'PY'
import json, sys
teams = ["checkout", "search", "payments", "growth", "mobile", "platform", "ads", "infra"]
words = ["new-ui", "rollout", "beta", "experiment", "killswitch", "migration", "v2", "dark-launch"]
flags, reasons = {}, {}
for i in range(2000):
    key = f"{teams[i % 8]}-{words[(i // 8) % 8]}-{words[(i * 7 + 3) % 8]}-{i}"
    flags[key] = i % 3 == 0
    reasons[key] = [{"kind": "FALLTHROUGH"}, {"kind": "OFF"},
                    {"kind": "RULE_MATCH", "ruleId": f"rule-{i}", "ruleIndex": 0}][i % 3]
json.dump({"flags": flags, "reasons": reasons}, open(sys.argv[1], "w"))
PY
./target/release/mock-upstream --port "$mock_port" --api-key "$key" --flags-file "$dir/flags.json" \
  >/dev/null 2>&1 &
mock=$!
ROLLGATE_API_KEY=$key ROLLGATE_BASE_URL=http://127.0.0.1:$mock_port ROLLGATE_PROXY_LOG_LEVEL=warn \
  ./target/release/rollgate-proxy --bind 127.0.0.1 --port "$port" --snapshot-file "" >/dev/null 2>&1 &
pid=$!
trap 'kill "$pid" "$mock" 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break
  sleep 0.1
done
base=http://127.0.0.1:$port
echo "bytes on the wire (body), identity / gzip / br:"
for path in /api/flags /api/v1/sdk/flags '/api/v1/sdk/flags?withReasons=true'; do
  id=$(curl -s -o /dev/null -w '%{size_download}' "$base$path")
  gz=$(curl -s -o /dev/null -w '%{size_download}' -H 'Accept-Encoding: gzip' "$base$path")
  br=$(curl -s -o /dev/null -w '%{size_download}' -H 'Accept-Encoding: br' "$base$path")
  # The decoded answers are the identity bytes.
  cmp -s <(curl -s "$base$path") <(curl -s --compressed -H 'Accept-Encoding: br' "$base$path") \
    || { echo "br answer of $path differs from identity" >&2; exit 1; }
  printf '  %-36s %7s / %6s / %6s  (%.1fx / %.1fx)\n' "$path" "$id" "$gz" "$br" \
    "$(awk -v a="$id" -v b="$gz" 'BEGIN{print a/b}')" "$(awk -v a="$id" -v b="$br" 'BEGIN{print a/b}')"
done
echo "load average before wrk: $(cut -d' ' -f1-3 /proc/loadavg)"
run() {
  local name=$1; shift
  printf -- '--- %s: ' "$name"
  timeout $((secs + 30)) wrk -t2 -c"$conns" -d"${secs}s" --latency "$@" \
    | awk '/Requests\/sec/{r=$2} / 99%/{p=$2} /Transfer\/sec/{t=$2} END{print r " req/s, p99 " p ", " t "/s"}'
}
for path in /api/flags '/api/v1/sdk/flags?withReasons=true'; do
  run "$path identity" "$base$path"
  run "$path br" -H 'Accept-Encoding: br' "$base$path"
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
