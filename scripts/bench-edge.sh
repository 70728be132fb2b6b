#!/usr/bin/env bash
# Measures the Worker under `wrangler dev` with the Rust mock upstream (loopback only):
#   1. SSE fan-out: N clients on /api/stream with a 2,000-flag rules set (~129 KB frame), one
#      change upstream: time to the last delivery, workerd RSS growth.
#   1b. The same over the WebSocket transport (hibernatable shard sockets, relay pushes): a fresh
#      `wrangler dev`, so the RSS figures do not include phase 1's.
#   2. Per-user polling in rules mode: share of requests that reached the relay object.
#   3. Change latency, upstream → client, with a small flag set; then the same measure through
#      a native `rollgate-proxy` (release build) on the same mock, as the yardstick: it shares
#      every fixed cost of the chain (the control request, the mock's own work, the load
#      client), so the difference is what the Worker's hops add (BENCH_LATENCY_NATIVE=0 skips it).
#      Each line has p50/p90 from the control request that makes the change, and upstream_p50/p90
#      from the moment the mock queued the event on its stream (the target's upstream → client).
#   4. (`devcost`, not in the default phases) What `wrangler dev` itself keeps per request: the
#      workerd RSS growth over 1,000 requests to a one-line JS Worker, then to this Worker's
#      `/live` (answered by the front alone), as a yardstick for the RSS figures above.
#   5. (`floor`, not in the default phases) Phase 1's measurement on a minimal JS Durable Object
#      (scripts/bench-edge-floor/) that holds the N streams and pushes one shared frame of
#      BENCH_FLOOR_FRAME_BYTES (5,700: about phase 1's gzip-coded change, 5,665 B per stream)
#      to all, BENCH_FLOOR_BATCH at a time (25, as the shards do; 0: all at once): what any
#      Worker pays under `wrangler dev`, with no code of this project. BENCH_FLOOR_SOURCE=pull,
#      BENCH_FLOOR_CODING=gzip and BENCH_FLOOR_HEADERS=proxy make its streams look like the
#      shards' (pull-based, gzip-coded, this proxy's headers); BENCH_FLOOR_HEAD=1 sends a small
#      first chunk before the first frame, as the shards' `retry:` preamble.
#   6. (`floorlatency`, not in the default phases) Phase 3's measure through a minimal JS Worker
#      with this proxy's topology and nothing else (scripts/bench-edge-floor/): one relay object
#      holding the upstream stream, N shard objects passing each chunk on, then the relay holding
#      the clients itself; BENCH_FLOOR_SOURCE=pull makes those streams pull-based, as ours are.
# Usage: scripts/bench-edge.sh [clients=2000] [shards=4]   (BENCH_PHASES="sse ws poll latency" picks)
# Knobs of phases 1/1b: BENCH_CHANGES (changes measured, 1), BENCH_ROUNDS (the phase again with
# new clients on the same wrangler dev, 1), BENCH_SETTLE_MS (idle time of the
# connected clients before the baseline, 1000), BENCH_ACCEPT_ENCODING (the SSE clients' header,
# a browser's by default; `identity` for uncompressed streams; with gzip in it the WebSocket
# clients ask `?coding=gzip`, as the JS client does), BENCH_WARMUP_CHANGES (changes made before
# any client connects, 0), BENCH_SSE_DECODE (`all` gzip-coded SSE bodies decoded by the load
# client, the default, or `first`: only the first three, the others counting a frame when its
# member arrives, as the WebSocket clients do). BENCH_WORKER_LOG=<file> keeps wrangler dev's
# output (the Worker's console errors). The RSS is also printed per
# workerd process (`rss_by_process_mib`): wrangler dev runs its proxy beside the Worker's.
# Run scripts/build-edge.sh first. The mock upstream is the release build (built here, like the
# native proxy of phase 3'): it stands for Rollgate, whose own time per change a debug build
# would add to every figure (~100 ms of each 2,000-flag change, BENCHMARKS.md).
# Every process runs under `timeout` and is stopped by its recorded pid; results go to stdout
# with the load average.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
clients=${1:-2000}
shards=${2:-4}
phases=${BENCH_PHASES:-sse ws poll latency}
key=bench-server-key
mock_port=${BENCH_MOCK_PORT:-19311}
control_port=${BENCH_CONTROL_PORT:-19312}
worker_port=${BENCH_WORKER_PORT:-19313}
inspector_port=${BENCH_INSPECTOR_PORT:-19314}
mock_bin=${MOCK_UPSTREAM_BIN:-$ROOT/target/release/mock-upstream}
native_bin=$ROOT/target/release/rollgate-proxy
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true; done
  if [ -n "${BENCH_WORKER_LOG:-}" ]; then cp "$work/worker.log" "$BENCH_WORKER_LOG" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

# Built every run (a no-op when current): a stale binary would measure older code.
[ -n "${MOCK_UPSTREAM_BIN:-}" ] || cargo build --release -q -p rollgate-proxy-tests --bin mock-upstream --locked
if [[ " $phases " == *" latency "* ]] && [ "${BENCH_LATENCY_NATIVE:-1}" != 0 ]; then
  # Before any phase: a build never runs between measurements.
  cargo build --release -q -p rollgate-proxy-server --bin rollgate-proxy --locked
fi
[ -f edge-worker/build/index.js ] || { echo "run scripts/build-edge.sh first" >&2; exit 1; }

# Rules payloads: 2,000 flags with long names (the anonymous frame is ~129 KB), and 7 flags.
python3 - "$work" <<'EOF'
import json, sys
work = sys.argv[1]
def rules(n, width):
    flags = {}
    for i in range(n):
        k = f"checkout-experiment-{i:05d}-" + "x" * width
        flags[k] = {"key": k, "enabled": i % 3 != 0, "rollout": 100, "targetUsers": [f"user-{i}"],
                    "rules": [{"id": f"r{i}", "enabled": True, "rollout": 100,
                               "conditions": [{"attribute": "plan", "operator": "equals", "value": "pro"}]}]}
    return {"version": "bench", "flags": flags}
for name, n, width in (("big", 2000, 31), ("small", 7, 0)):
    with open(f"{work}/{name}.json", "w") as f:
        json.dump(rules(n, width), f)
EOF

start_mock() { # $1: rules file
  setsid timeout 900 "$mock_bin" --port "$mock_port" --control-port "$control_port" \
    --api-key "$key" --flags-file "$1" >"$work/mock.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 100); do grep -q "listening on" "$work/mock.log" && return 0; sleep 0.1; done
  echo "mock-upstream did not start" >&2; exit 1
}
start_worker() {
  setsid timeout 900 scripts/edge-dev.sh "$worker_port" "http://127.0.0.1:$mock_port" "$key" \
    --var "ROLLGATE_PROXY_SSE_SHARDS:$shards" --inspector-port "$inspector_port" >"$work/worker.log" 2>&1 &
  worker_pid=$!
  pids+=($worker_pid)
  for _ in $(seq 1 300); do grep -q "listening on" "$work/worker.log" && return 0; sleep 0.1; done
  echo "wrangler dev did not start" >&2; cat "$work/worker.log" >&2; exit 1
}
start_js_worker() { # $1: a directory with a JS Worker's wrangler.toml, answering "ok" on /
  # Its own process group (as start_worker's), so workerd_pids finds it and stop_all ends it.
  PATH="$ROOT/node_modules/.bin:$PATH" WRANGLER_SEND_METRICS=false CI=true \
    setsid timeout 900 bash -c 'cd "$1" && exec wrangler dev --ip 127.0.0.1 --port "$2" \
      --inspector-port "$3" --show-interactive-dev-session=false --log-level warn \
      --persist-to "$4"' \
    js-worker "$1" "$worker_port" "$inspector_port" "$work/js-worker-state" >"$work/worker.log" 2>&1 &
  worker_pid=$!
  pids+=($worker_pid)
  for _ in $(seq 1 300); do [ "$(curl -sf "$w/" 2>/dev/null)" = ok ] && return 0; sleep 0.2; done
  echo "the JS Worker in $1 did not start" >&2; cat "$work/worker.log" >&2; exit 1
}
workerd_pids() { # workerd processes in the worker's process group
  ps -o pid=,comm= -g "$worker_pid" | awk '$2 ~ /workerd/ {print $1}' | paste -sd, -
}
rss_kib() { # summed VmRSS of the workerd processes in the worker's process group
  local total=0 pid kib
  for pid in $(workerd_pids | tr ',' ' '); do
    kib=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
    total=$(( total + ${kib:-0} )) # none for a process that is gone or a zombie
  done
  echo "$total"
}
requests_growth() { # $1: url; prints the RSS growth over 1,000 requests, 8 at a time
  local before after
  before=$(rss_kib)
  seq 1 1000 | timeout 300 xargs -P 8 -I{} curl -s -m 10 -o /dev/null "$1?n={}"
  sleep 2
  after=$(rss_kib)
  echo "+$(( (after - before) / 1024 )) MiB, $(( (after - before) / 1000 )) KiB per request"
}
stop_all() {
  for pid in "${pids[@]}"; do kill -- "-$pid" 2>/dev/null || true; done
  pids=()
  # The next phase binds the same port: wait until nothing answers there (at most 30 s).
  for _ in $(seq 1 150); do
    curl -s -o /dev/null -m 1 "http://127.0.0.1:$worker_port/" || [ $? -ne 7 ] || break
    sleep 0.2
  done
}
w="http://127.0.0.1:$worker_port"
c="http://127.0.0.1:$control_port"
# The load client reads the isolates' heap from the inspector (see isolateMemory).
export BENCH_INSPECTOR="http://127.0.0.1:$inspector_port"
bigkey=$(python3 -c "import json;print(next(iter(json.load(open('$work/big.json'))['flags'])))")
smallkey=$(python3 -c "import json;print(next(iter(json.load(open('$work/small.json'))['flags'])))")

has() { [[ " $phases " == *" $1 "* ]]; }
# Until the server on $w answers /api/flags (upstream connected, rules loaded): at most 20 s.
wait_flags() {
  for _ in $(seq 1 100); do curl -sf "$w/api/flags" -o /dev/null && return 0; sleep 0.2; done
  echo "   no answer on $w/api/flags within 20 s; measuring anyway" >&2
}
echo "== load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
if has sse || has ws || has poll; then
  start_mock "$work/big.json"
  start_worker
  # Warm the relay (upstream connected, rules loaded) before measuring.
  wait_flags
  echo "   snapshot: $(curl -s -m 5 "$w/api/flags" | wc -c) bytes of flags JSON"
fi
if has sse; then
  echo "== 1. SSE fan-out: $clients clients, $shards shards, 2,000-flag rules set"
  BENCH_RULES_FILE="$work/big.json" timeout 300 node scripts/bench-edge.mjs sse "$w" "$c" "$clients" "$bigkey" "$(workerd_pids)"
  echo "   load average $(cut -d' ' -f1-3 /proc/loadavg)"
fi
if has ws; then
  if has sse; then
    stop_all
    start_mock "$work/big.json"
    start_worker
    wait_flags
  fi
  echo "== 1b. WebSocket fan-out: $clients clients, $shards shards, 2,000-flag rules set"
  BENCH_RULES_FILE="$work/big.json" timeout 300 node scripts/bench-edge.mjs ws "$w" "$c" "$clients" "$bigkey" "$(workerd_pids)"
  echo "   load average $(cut -d' ' -f1-3 /proc/loadavg)"
fi
if has poll; then
  echo "== 2. per-user polling (rules mode): 2,000 users × 2 rounds, 32 at a time"
  # relay_flag_requests counts answers the Relay made; its revision checks (≤ 1 per
  # ROLLGATE_PROXY_EDGE_CACHE_TTL = 1 s per isolate) are bounded by the run's seconds.
  timeout 300 node scripts/bench-edge.mjs poll "$w" 2000 2 32
  echo "   load average $(cut -d' ' -f1-3 /proc/loadavg)"
fi
stop_all

if has latency; then
  start_mock "$work/small.json"
  start_worker
  wait_flags
  echo "== 3. change latency upstream → client: 20 clients, 30 changes, 7 flags"
  BENCH_RULES_FILE="$work/small.json" timeout 300 node scripts/bench-edge.mjs latency "$w" "$c" 20 30 "$smallkey"
  echo "   load average $(cut -d' ' -f1-3 /proc/loadavg)"
  if [ "${BENCH_LATENCY_NATIVE:-1}" != 0 ]; then
    stop_all
    start_mock "$work/small.json"
    setsid timeout 900 "$native_bin" --api-key "$key" --base-url "http://127.0.0.1:$mock_port" \
      --bind 127.0.0.1 --port "$worker_port" --snapshot-file "$work/native-snapshot.json" \
      >"$work/native.log" 2>&1 &
    pids+=($!)
    wait_flags
    echo "== 3'. the same through a native rollgate-proxy (release) on the same mock: the yardstick"
    BENCH_RULES_FILE="$work/small.json" timeout 300 node scripts/bench-edge.mjs latency "$w" "$c" 20 30 "$smallkey"
    echo "   load average $(cut -d' ' -f1-3 /proc/loadavg)"
  fi
fi
if has devcost; then
  stop_all
  mkdir -p "$work/control"
  printf 'export default { fetch: () => new Response("ok") };\n' >"$work/control/index.js"
  printf 'name = "control"\nmain = "index.js"\ncompatibility_date = "2026-11-01"\n' >"$work/control/wrangler.toml"
  echo "== 4. what wrangler dev keeps per request (1,000 requests, 8 at a time)"
  start_js_worker "$work/control"
  sleep 2
  for round in 1 2; do echo "   one-line JS Worker, round $round: $(requests_growth "$w/")"; done
  stop_all
  start_mock "$work/small.json"
  start_worker
  wait_flags
  sleep 2
  for round in 1 2; do echo "   this Worker's /live, round $round: $(requests_growth "$w/live")"; done
  echo "   load average $(cut -d' ' -f1-3 /proc/loadavg)"
fi
if has floorlatency; then
  upstream="upstream=http://127.0.0.1:$mock_port&key=$key"
  # BENCH_FLOOR_SOURCE=pull: pull-based streams with no queue (the proxy's objects' shape).
  [ "${BENCH_FLOOR_SOURCE:-writer}" = pull ] && upstream="$upstream&source=pull"
  for chain in "$shards" 0; do
    # A fresh `wrangler dev` (and mock) for each shape: no subscriber of the other one is left.
    stop_all
    start_mock "$work/small.json"
    start_js_worker "$ROOT/scripts/bench-edge-floor"
    if [ "$chain" = 0 ]; then
      echo "== 6. the latency floor: phase 3's measure through a minimal JS relay object that holds the clients (no shards)"
    else
      echo "== 6. the latency floor: phase 3's measure through a minimal JS relay object and $chain shard objects that only pass bytes on"
    fi
    BENCH_STREAM_PATH="/api/stream?chain=$chain&$upstream" BENCH_RULES_FILE="$work/small.json" timeout 300 \
      node scripts/bench-edge.mjs latency "$w" "$c" 20 30 "$smallkey"
    echo "   load average $(cut -d' ' -f1-3 /proc/loadavg)"
  done
fi
if has floor; then
  stop_all
  echo "== 5. the floor: $clients SSE streams on a minimal JS Durable Object, one shared frame of ${BENCH_FLOOR_FRAME_BYTES:-5700} bytes pushed to all"
  start_js_worker "$ROOT/scripts/bench-edge-floor"
  sleep 2
  BENCH_FLOOR_FRAME_BYTES=${BENCH_FLOOR_FRAME_BYTES:-5700} BENCH_FLOOR_BATCH=${BENCH_FLOOR_BATCH:-25} timeout 300 \
    node scripts/bench-edge.mjs floor "$w" - "$clients" - "$(workerd_pids)"
  echo "   load average $(cut -d' ' -f1-3 /proc/loadavg)"
fi
