#!/usr/bin/env bash
# Polling throughput side by side in one run (a benchmark, not a test): wrk against release
# `rollgate-proxy` builds in local mode on a generated rules file of 100 flags × 3 rules × 3
# conditions, and against a bare HTTP server returning the same anonymous body (the floor), in
# alternation, for `rounds` rounds; prints each figure's median and its ratio to the floor.
# Routes: `GET /api/flags` (anonymous, pre-serialized), per-user polls with a different user on
# every request (wrk Lua), and the same user polling again.
# Needs `wrk` and python3.
# Usage: ./scripts/bench-polls.sh [seconds=5] [connections=64] [rounds=3]
#   ROLLGATE_PROXY_BIN=path  the build to measure (default: this tree's release build)
#   BEFORE_BIN=path          another build measured in the same run (e.g. an older commit's)
#   FLOOR_BIN=path           `FLOOR_BIN <port> <body-file>` serves the body on 127.0.0.1:<port>
#                            for every request (a bare hyper server); no floor column without it
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
conns=${2:-64}
rounds=${3:-3}
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
bin=${ROLLGATE_PROXY_BIN:-}
if [ -z "$bin" ]; then
  cargo build --release -p rollgate-proxy-server --locked --quiet
  bin=./target/release/rollgate-proxy
fi
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# The rules file: flag i has rules 0 and 1 passing two conditions and failing on the third,
# rule 2 matching for even i with a partial rollout, as core/benches/evaluate.rs.
python3 - "$work/flags.json" <<'EOF'
import json, sys
def cond(a, op, v): return {"attribute": a, "operator": op, "value": v}
flags = {}
for i in range(100):
    email = cond("email", "regex", r"^[a-z.]+@example\.com$") if i % 3 == 0 else cond("email", "ends_with", "@EXAMPLE.com")
    rollout = i * 7 % 101
    flags[f"flag-{i:03}"] = {
        "key": f"flag-{i:03}", "enabled": True, "rollout": rollout,
        "targetUsers": [f"vip-{i}", "vip-ops"],
        "rules": [
            {"id": f"r{i}-0", "enabled": True, "rollout": 100, "conditions": [
                cond("country", "in", "us, ca, gb, de, fr"), email, cond("plan", "equals", "enterprise")]},
            {"id": f"r{i}-1", "enabled": True, "rollout": 100, "conditions": [
                cond("age", "greater_than", str(i % 30)), cond("email", "starts_with", "alice"),
                cond("beta", "equals", "false")]},
            {"id": f"r{i}-2", "enabled": True, "rollout": rollout, "conditions": [
                cond("plan", "in", "pro,team"), cond("country", "equals", "DE"),
                cond("id", "starts_with", "user-" if i % 2 == 0 else "admin-")]},
        ],
    }
json.dump({"version": "bench", "flags": flags}, open(sys.argv[1], "w"))
EOF
query='email=alice.smith%40example.com&attr.age=34&attr.beta=true&attr.country=de&attr.plan=Pro'
cat > "$work/users.lua" <<EOF
-- A different user on every request (each wrk thread starts at its own offset).
local n = 0
function init(args) n = math.random(1, 1000000000) end
function request()
  n = n + 1
  return wrk.format("GET", "/api/flags?user_id=user-" .. n .. "&$query")
end
EOF

wait_ready() {
  for _ in $(seq 1 100); do
    curl -sf -o /dev/null "http://127.0.0.1:$1$2" && return 0
    sleep 0.1
  done
  echo "server on port $1 did not come up" >&2
  exit 1
}
start_proxy() {
  timeout 3600 "$1" --bind 127.0.0.1 --port "$2" --snapshot-file "" --flags-file "$work/flags.json" \
    --log-level warn >/dev/null 2>&1 &
  pids+=($!)
  wait_ready "$2" /ready
}
names=(after)
ports=(39201)
start_proxy "$bin" 39201
if [ -n "${BEFORE_BIN:-}" ]; then
  start_proxy "$BEFORE_BIN" 39202
  names+=(before)
  ports+=(39202)
fi
curl -sf -o "$work/body.json" http://127.0.0.1:39201/api/flags
if [ -n "${FLOOR_BIN:-}" ]; then
  timeout 3600 "$FLOOR_BIN" 39203 "$work/body.json" >/dev/null 2>&1 &
  pids+=($!)
  wait_ready 39203 /
fi
echo "anonymous body: $(wc -c <"$work/body.json") bytes; headers of the measured build:"
curl -s -D - -o /dev/null http://127.0.0.1:39201/api/flags | sed 's/^/  /'
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"

rps() {
  timeout $((secs + 30)) wrk -t2 -c"$conns" -d"${secs}s" "$@" | awk '/Requests\/sec/{print $2}'
}
declare -A results
for round in $(seq 1 "$rounds"); do
  if [ -n "${FLOOR_BIN:-}" ]; then
    results[floor,anon]+="$(rps http://127.0.0.1:39203/api/flags) "
  fi
  for i in "${!names[@]}"; do
    name=${names[$i]}
    port=${ports[$i]}
    results[$name,anon]+="$(rps "http://127.0.0.1:$port/api/flags") "
    results[$name,users]+="$(rps -s "$work/users.lua" "http://127.0.0.1:$port/api/flags") "
    results[$name,same]+="$(rps "http://127.0.0.1:$port/api/flags?user_id=user-4821&$query") "
  done
  echo "round $round done, load average $(cut -d' ' -f1-3 /proc/loadavg)"
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END{print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
floor=""
if [ -n "${FLOOR_BIN:-}" ]; then
  floor=$(echo "${results[floor,anon]}" | median)
  echo
  echo "floor  GET /api/flags: ${results[floor,anon]}-> median $floor req/s"
fi
for name in "${names[@]}"; do
  echo
  for route in anon users same; do
    m=$(echo "${results[$name,$route]}" | median)
    line="$name  $route: ${results[$name,$route]}-> median $m req/s"
    [ -n "$floor" ] && line+=" ($(awk -v a="$m" -v b="$floor" 'BEGIN{printf "%.2f", a/b}')× floor)"
    [ "$route" != anon ] && line+=" ($(awk -v a="$m" -v b="$(echo "${results[$name,anon]}" | median)" 'BEGIN{printf "%.2f", a/b}')× its anonymous route)"
    echo "$line"
  done
done
echo
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
