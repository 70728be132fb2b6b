#!/usr/bin/env bash
# bench/run.sh: the side-by-side figures of BENCHMARKS.md (issue 9), measured in ONE run against
# the proxy, a bare hyper server returning the same bytes (`floor`) and the original pattern's
# Express proxy (bench/express). Not run by the test command.
#
#   bench/run.sh [section ...]     sections: poll peruser routes compression rss fanout slow
#                                  (default: all)
#
# Knobs (environment): PROXY_BIN (target/release/rollgate-proxy) the proxy measured;
# BEFORE_BIN (none) a second proxy build measured in the same run (poll: e.g. the build before a
# change; peruser: in alternation with PROXY_BIN in every round); PORT_BASE (9010) the mock's
# port, the others follow it (two runs can share the box); ROUNDS (3) wrk rounds per figure,
# medians reported; DUR (5) seconds per
# wrk run; CONNS (64) wrk connections; STREAMS (19000) streams for the RSS figure; FANOUT
# (100000) clients over REPLICAS (6) proxy processes; FANOUT_ROUNDS (3) changes per mode;
# SLOW (2000) never-reading clients; CHANGES (50) changes of the large set.
# Every process runs under `timeout`, every loop is bounded, only recorded PIDs are stopped, and
# the sysctls changed for the large runs are restored on exit (machine-limits §3, §5).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DUR=${DUR:-5}
CONNS=${CONNS:-64}
STREAMS=${STREAMS:-19000}
FANOUT=${FANOUT:-100000}
REPLICAS=${REPLICAS:-6}
FANOUT_ROUNDS=${FANOUT_ROUNDS:-3}
SLOW=${SLOW:-2000}
CHANGES=${CHANGES:-50}
SECTIONS=${*:-poll peruser routes compression rss fanout slow}
BIN=target/release
PROXY_BIN=${PROXY_BIN:-$BIN/rollgate-proxy}
TMP=$(mktemp -d)
PIDS=()
# PORT_BASE moves every port (9000-9100 are reserved while the script runs).
P=${PORT_BASE:-9010}
MOCK_PORT=$P CONTROL_PORT=$((P + 1)) PROXY_PORT=$((P + 10)) FLOOR_PORT=$((P + 11))
EXPRESS_PORT=$((P + 12)) LOCAL_PORT=$((P + 13)) BEFORE_PORT=$((P + 14))
KEY=test-api-key

SYSCTLS=(net/core/somaxconn net/ipv4/tcp_mem net/ipv4/ip_local_reserved_ports)
declare -A SAVED
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    for s in "${!SAVED[@]}"; do echo "${SAVED[$s]}" > "/proc/sys/$s" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT
# Only the large runs need them (a polling run leaves the machine's settings alone).
if [ -w /proc/sys/net/core/somaxconn ] && [[ " $SECTIONS " =~ \ (rss|fanout|slow)\  ]]; then
    for s in "${SYSCTLS[@]}"; do SAVED[$s]=$(cat "/proc/sys/$s"); done
    echo 65535 > /proc/sys/net/core/somaxconn
    echo "1048576 1572864 2097152" > /proc/sys/net/ipv4/tcp_mem
    echo "9000-9100" > /proc/sys/net/ipv4/ip_local_reserved_ports
fi

for bin in rollgate-proxy mock-upstream floor sse-load; do
    [ -x "$BIN/$bin" ] || { echo "missing $BIN/$bin: cargo build --release --locked -p rollgate-proxy-server -p rollgate-proxy-tests -p rollgate-proxy-bench" >&2; exit 1; }
done
[ -d bench/express/node_modules ] || (cd bench/express && npm ci --no-audit --no-fund >/dev/null)

# Each sse-load run takes a fresh block of 24 source addresses: the previous run's TIME_WAIT
# sockets would otherwise slow the next run's port search (bind picks the port).
src() { echo "--first-source $(( (RANDOM % 10) * 24 + 2 ))"; }
load() { cut -d' ' -f1-3 /proc/loadavg; }
say() { echo "$* [load $(load)]"; }
stamp() { while IFS= read -r line; do echo "$line [load $(load)]"; done; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", (b > 0 ? a / b : 0)}'; }

# Waits (bounded) until a URL answers 200.
ready() {
    for _ in $(seq 1 300); do
        curl -sf -o /dev/null "$1" && return 0
        sleep 0.1
    done
    echo "not ready: $1" >&2
    return 1
}

# start NAME CMD...: starts a process in its own session under a timeout, records its PID.
start() {
    local name=$1
    shift
    setsid timeout 900 "$@" > "$TMP/$name.log" 2>&1 &
    PIDS+=($!)
    LAST_PID=$!
}
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
# The server process's own PID (under setsid+timeout, the child of `timeout`).
child_of() { for _ in $(seq 1 50); do local c; c=$(pgrep -P "$1" | head -1) && [ -n "$c" ] && { echo "$c"; return; }; sleep 0.1; done; }

mock() { # mock [args...]
    start mock "$BIN/mock-upstream" --port $MOCK_PORT --control-port $CONTROL_PORT "$@"
    MOCK_PID=$LAST_PID
    ready "http://127.0.0.1:$CONTROL_PORT/control/stats"
}
proxy() { # proxy PORT [args...]
    local port=$1
    shift
    start "proxy-$port" env ROLLGATE_API_KEY=$KEY ROLLGATE_BASE_URL=http://127.0.0.1:$MOCK_PORT \
        ROLLGATE_PROXY_LOG_LEVEL=warn "$PROXY_BIN" --bind 127.0.0.1 --port "$port" --snapshot-file "" "$@"
    ready "http://127.0.0.1:$port/api/flags"
}

# rps URL [wrk args...]: requests/s of one wrk run.
rps() {
    local url=$1
    shift
    timeout $((DUR + 20)) wrk -t2 -c"$CONNS" -d"${DUR}s" "$@" "$url" | awk '/Requests\/sec/ {print $2}'
}

# A flag set of N booleans (mock data file).
flags_file() {
    python3 - "$1" "$2" <<'EOF'
import json, sys
n, pad = int(sys.argv[1]), int(sys.argv[2])
print(json.dumps({"flags": {f"flag-{i:05d}-" + "x" * pad: i % 3 == 0 for i in range(n)}}))
EOF
}

# cpu_ticks PID: user + system CPU of a process so far, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# measure PID URL [wrk args...]: one wrk run; prints "req/s server-CPU-us-per-request" (the
# server's own user + system time over the requests wrk completed: less sensitive to the box's
# load than req/s, since it does not count time the server waited for a core).
measure() {
    local pid=$1 url=$2 before after out
    shift 2
    before=$(cpu_ticks "$pid")
    out=$(timeout $((DUR + 20)) wrk -t2 -c"$CONNS" -d"${DUR}s" "$@" "$url")
    after=$(cpu_ticks "$pid")
    echo "$out" | awk -v t=$((after - before)) -v hz="$(getconf CLK_TCK)" \
        '/requests in/ {n=$1} /Requests\/sec/ {r=$2} END {printf "%s %.2f\n", r, (n > 0 ? t / hz * 1e6 / n : 0)}'
}

section_poll() {
    echo "== GET /api/flags: proxy vs floor vs Express (wrk -t2 -c$CONNS -d${DUR}s, $ROUNDS rounds)"
    echo "proxy: $PROXY_BIN${BEFORE_BIN:+; before: $BEFORE_BIN}"
    flags_file 100 0 > "$TMP/flags100.json"
    mock --flags-file "$TMP/flags100.json"
    proxy $PROXY_PORT
    local pp bp="" fp ep
    pp=$(child_of "$LAST_PID")
    if [ -n "${BEFORE_BIN:-}" ]; then
        PROXY_BIN=$BEFORE_BIN proxy $BEFORE_PORT
        bp=$(child_of "$LAST_PID")
    fi
    curl -s "http://127.0.0.1:$PROXY_PORT/api/flags" > "$TMP/body.json"
    # Same size (the bodies differ only in `cachedAt`, the time each process fetched).
    if [ -n "$bp" ] && [ "$(curl -s "http://127.0.0.1:$BEFORE_PORT/api/flags" | wc -c)" != "$(wc -c < "$TMP/body.json")" ]; then
        echo "the two proxies answer bodies of different sizes" >&2
        return 1
    fi
    start floor "$BIN/floor" --listen 127.0.0.1:$FLOOR_PORT --body-file "$TMP/body.json"
    fp=$(child_of "$LAST_PID")
    ready "http://127.0.0.1:$FLOOR_PORT/"
    start express env -C bench/express PORT=$EXPRESS_PORT ROLLGATE_API_KEY=$KEY \
        ROLLGATE_BASE_URL=http://127.0.0.1:$MOCK_PORT node server.js
    ep=$(child_of "$LAST_PID")
    ready "http://127.0.0.1:$EXPRESS_PORT/api/flags"
    echo "body bytes: proxy $(wc -c < "$TMP/body.json"), Express $(curl -s "http://127.0.0.1:$EXPRESS_PORT/api/flags" | wc -c)"
    echo "header bytes: proxy $(curl -s -o /dev/null -D - "http://127.0.0.1:$PROXY_PORT/api/flags" | wc -c), floor $(curl -s -o /dev/null -D - "http://127.0.0.1:$FLOOR_PORT/api/flags" | wc -c)"
    local vf=() ve=() vb=() pb=() fe=() cp=() cb=() cf=()
    for r in $(seq 1 "$ROUNDS"); do
        # Alternate the order every round, so no server always runs right after another.
        local order=(proxy before floor express) name p="" b="" f="" e="" pc="" bc="" fc="" out
        [ $((r % 2)) -eq 0 ] && order=(express floor before proxy)
        for name in "${order[@]}"; do
            case $name in
                proxy) out=$(measure "$pp" "http://127.0.0.1:$PROXY_PORT/api/flags"); p=${out% *}; pc=${out#* } ;;
                before) [ -n "$bp" ] || continue
                    out=$(measure "$bp" "http://127.0.0.1:$BEFORE_PORT/api/flags"); b=${out% *}; bc=${out#* } ;;
                floor) out=$(measure "$fp" "http://127.0.0.1:$FLOOR_PORT/api/flags"); f=${out% *}; fc=${out#* } ;;
                express) out=$(measure "$ep" "http://127.0.0.1:$EXPRESS_PORT/api/flags"); e=${out% *} ;;
            esac
        done
        say "round $r: proxy $p req/s ($pc us CPU/req)${bp:+, before $b req/s ($bc us CPU/req)}, floor $f req/s ($fc us CPU/req), Express $e req/s"
        vf+=("$(ratio "$p" "$f")")
        ve+=("$(ratio "$p" "$e")")
        fe+=("$(ratio "$f" "$e")")
        cp+=("$pc")
        cf+=("$fc")
        if [ -n "$bp" ]; then
            vb+=("$(ratio "$b" "$f")")
            pb+=("$(ratio "$p" "$b")")
            cb+=("$bc")
        fi
    done
    say "median proxy/floor $(printf '%s\n' "${vf[@]}" | median)x (rounds: ${vf[*]}); proxy/Express $(printf '%s\n' "${ve[@]}" | median)x (rounds: ${ve[*]}); floor/Express $(printf '%s\n' "${fe[@]}" | median)x (rounds: ${fe[*]})"
    [ -n "$bp" ] && say "median before/floor $(printf '%s\n' "${vb[@]}" | median)x (rounds: ${vb[*]}); proxy/before $(printf '%s\n' "${pb[@]}" | median)x (rounds: ${pb[*]})"
    say "median server CPU per request: proxy $(printf '%s\n' "${cp[@]}" | median) us${bp:+, before $(printf '%s\n' "${cb[@]}" | median) us}, floor $(printf '%s\n' "${cf[@]}" | median) us"
    for pid in "${PIDS[@]}"; do stop "$pid"; done
    PIDS=()
}

section_peruser() {
    echo "== per-user polls, local rules (95 flags x 3 rules x 3 conditions): vs floor"
    python3 - > "$TMP/rules.json" <<'EOF'
import json
flags = {}
for i in range(95):
    key = f"flag-{i:03d}"
    rules = [{"id": f"r{j}", "name": f"rule {j}", "enabled": True, "rollout": 50,
              "conditions": [{"attribute": "plan", "operator": "equals", "value": f"plan-{j}"},
                             {"attribute": "country", "operator": "in", "value": "NL,DE,FR"},
                             {"attribute": "email", "operator": "ends_with", "value": f"@c{j}.example"}]}
             for j in range(3)]
    flags[key] = {"key": key, "enabled": True, "rollout": 30, "targetUsers": [], "rules": rules}
print(json.dumps({"version": "bench", "flags": flags}))
EOF
    cat > "$TMP/users.lua" <<'EOF'
request = function()
  return wrk.format("GET", "/api/flags?user_id=u-" .. math.random(1, 1000000000) .. "&attr.plan=plan-1&attr.country=NL&email=a%40c1.example")
end
EOF
    # PROXY_BIN is measured; with BEFORE_BIN too, both builds are measured in alternation in
    # every round (each against the same floor run of that round).
    local names=(proxy) bins=("$PROXY_BIN")
    if [ -n "${BEFORE_BIN:-}" ]; then names=(before after) bins=("$BEFORE_BIN" "$PROXY_BIN"); fi
    local i port spids=()
    for i in "${!bins[@]}"; do
        port=$((LOCAL_PORT + i))
        start "local-$i" "${bins[$i]}" --bind 127.0.0.1 --port $port --flags-file "$TMP/rules.json" --log-level warn
        spids+=("$(child_of "$LAST_PID")")
        ready "http://127.0.0.1:$port/api/flags"
    done
    curl -s "http://127.0.0.1:$LOCAL_PORT/api/flags" > "$TMP/anon.json"
    if [ -n "${BEFORE_BIN:-}" ]; then
        # Both builds answer a user with the same bytes (but for the load time in `cachedAt`).
        local u="/api/flags?user_id=u-7&attr.plan=plan-1&attr.country=NL&email=a%40c1.example"
        cmp -s <(curl -s "http://127.0.0.1:$LOCAL_PORT$u" | sed 's/"cachedAt":"[^"]*"//') \
            <(curl -s "http://127.0.0.1:$((LOCAL_PORT + 1))$u" | sed 's/"cachedAt":"[^"]*"//') \
            || { echo "before and after answer differently" >&2; exit 1; }
    fi
    start floor "$BIN/floor" --listen 127.0.0.1:$FLOOR_PORT --body-file "$TMP/anon.json"
    local fpid
    fpid=$(child_of "$LAST_PID")
    ready "http://127.0.0.1:$FLOOR_PORT/"
    # Besides req/s (which other load on the box moves a lot), the server's own CPU time per
    # request (`measure`): the floor's CPU per request over the proxy's is the ratio an idle
    # box would approach.
    declare -A vd vs vc
    local query="user_id=u-42&attr.plan=plan-1&attr.country=NL&email=a%40c1.example"
    for r in $(seq 1 "$ROUNDS"); do
        local f fc line="round $r:" order
        declare -A dd dc ss aa
        # Alternate which build goes first, so a load change within a round favours neither.
        order=("${!bins[@]}")
        if (( r % 2 == 0 )) && (( ${#bins[@]} == 2 )); then order=(1 0); fi
        for i in "${order[@]}"; do
            port=$((LOCAL_PORT + i))
            read -r dd[$i] dc[$i] < <(measure "${spids[$i]}" "http://127.0.0.1:$port" -s "$TMP/users.lua")
            ss[$i]=$(rps "http://127.0.0.1:$port/api/flags?$query")
            aa[$i]=$(rps "http://127.0.0.1:$port/api/flags")
        done
        read -r f fc < <(measure "$fpid" "http://127.0.0.1:$FLOOR_PORT/api/flags")
        for i in "${!bins[@]}"; do
            line+=" ${names[$i]}: different users ${dd[$i]} req/s (${dc[$i]} µs CPU each), same user ${ss[$i]} req/s, anonymous ${aa[$i]} req/s;"
            vd[$i]+="$(ratio "${dd[$i]}" "$f") "
            vs[$i]+="$(ratio "${ss[$i]}" "${aa[$i]}") "
            vc[$i]+="$(ratio "$fc" "${dc[$i]}") "
        done
        say "$line floor $f req/s ($fc µs CPU each)"
    done
    for i in "${!bins[@]}"; do
        # shellcheck disable=SC2086
        say "${names[$i]}: median different-user/floor $(printf '%s\n' ${vd[$i]} | median)x (${vd[$i]% }); by CPU per request $(printf '%s\n' ${vc[$i]} | median)x (${vc[$i]% }); same-user/anonymous $(printf '%s\n' ${vs[$i]} | median)x (${vs[$i]% })"
    done
    for pid in "${PIDS[@]}"; do stop "$pid"; done
    PIDS=()
}

# wrk_line [wrk args...]: "req/s, p50, p99" of one wrk run.
wrk_line() {
    timeout $((DUR + 20)) wrk -t2 -c"$CONNS" -d"${DUR}s" --latency "$@" \
        | awk '/Requests\/sec/ {r=$2} /^ +50%/ {m=$2} /^ +99%/ {p=$2} END {print r " req/s, p50 " m ", p99 " p}'
}

section_routes() {
    echo "== the native server's polling routes, local mode (examples/flags.json), wrk -t2 -c$CONNS -d${DUR}s"
    start routes "$PROXY_BIN" --bind 127.0.0.1 --port $LOCAL_PORT --snapshot-file "" --log-level warn
    local pid base=http://127.0.0.1:$LOCAL_PORT etag
    pid=$(child_of "$LAST_PID")
    ready "$base/ready"
    etag=$(curl -sfI "$base/api/flags" | awk -F': ' 'tolower($1)=="etag" {print $2}' | tr -d '\r')
    say "GET /api/flags (default context, pre-serialized body): $(wrk_line "$base/api/flags")"
    say "GET /api/flags with If-None-Match (304): $(wrk_line -H "If-None-Match: $etag" "$base/api/flags")"
    say "GET /api/flags/new-checkout: $(wrk_line "$base/api/flags/new-checkout")"
    say "GET /api/flags?user_id=...&attr.plan=pro (rules evaluated per request): $(wrk_line "$base/api/flags?user_id=user-42&attr.plan=pro")"
    say "server RSS after the runs: $(awk '/VmRSS/ {print $2, $3}' "/proc/$pid/status")"
    for p in "${PIDS[@]}"; do stop "$p"; done
    PIDS=()
}

section_compression() {
    echo "== precompressed bodies, a 2,000-flag set: bytes on the wire and wrk -t2 -c$CONNS -d${DUR}s, identity vs br"
    # 2,000 flags with keys like real ones and a reason each: the set of core/benches/snapshot.rs.
    python3 - "$TMP/large2000.json" <<'PY'
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
    mock --flags-file "$TMP/large2000.json"
    proxy $PROXY_PORT
    local base=http://127.0.0.1:$PROXY_PORT path id gz br
    for path in /api/flags /api/v1/sdk/flags '/api/v1/sdk/flags?withReasons=true'; do
        id=$(curl -s -o /dev/null -w '%{size_download}' "$base$path")
        gz=$(curl -s -o /dev/null -w '%{size_download}' -H 'Accept-Encoding: gzip' "$base$path")
        br=$(curl -s -o /dev/null -w '%{size_download}' -H 'Accept-Encoding: br' "$base$path")
        # The decoded answers are the identity bytes.
        if ! cmp -s <(curl -s "$base$path") <(curl -s --compressed -H 'Accept-Encoding: br' "$base$path"); then
            echo "the br answer of $path differs from identity" >&2
            return 1
        fi
        echo "bytes $path: identity $id, gzip $gz ($(ratio "$id" "$gz")x), br $br ($(ratio "$id" "$br")x)"
    done
    for path in /api/flags '/api/v1/sdk/flags?withReasons=true'; do
        say "$path identity: $(wrk_line "$base$path")"
        say "$path br: $(wrk_line -H 'Accept-Encoding: br' "$base$path")"
    done
    for p in "${PIDS[@]}"; do stop "$p"; done
    PIDS=()
}

section_rss() {
    echo "== RSS per idle /api/stream client and accept rate ($STREAMS streams, one proxy process)"
    mock
    proxy $PROXY_PORT
    local pid
    pid=$(child_of "$LAST_PID")
    timeout 300 "$BIN/sse-load" run $(src) --url "http://127.0.0.1:$PROXY_PORT/api/stream" \
        --clients "$STREAMS" --rounds 0 --pid "$pid" --timeout-secs 60 | stamp
    for p in "${PIDS[@]}"; do stop "$p"; done
    PIDS=()
}

section_fanout() {
    echo "== one change to $FANOUT clients over $REPLICAS proxy processes"
    mock
    local urls=() pids=()
    for i in $(seq 0 $((REPLICAS - 1))); do
        proxy $((P + 20 + i))
        urls+=(--url "http://127.0.0.1:$((P + 20 + i))/api/stream")
        pids+=(--pid "$(child_of "$LAST_PID")")
    done
    for mode in init flag-changed; do
        curl -sf -X PUT -H 'content-type: application/json' -d "{\"mode\":\"$mode\"}" \
            "http://127.0.0.1:$CONTROL_PORT/control/stream-mode" > /dev/null
        say "mock stream mode: $mode"
        timeout 300 "$BIN/sse-load" run $(src) "${urls[@]}" "${pids[@]}" --clients "$FANOUT" --rounds "$FANOUT_ROUNDS" \
            --control "http://127.0.0.1:$CONTROL_PORT" --flag "bench-$mode" --timeout-secs 60 \
            | stamp
    done
    for p in "${PIDS[@]}"; do stop "$p"; done
    PIDS=()
}

# p99 latency (ms) of polls while CHANGES changes of the large set are made.
polls_during_changes() {
    timeout 120 "$BIN/sse-load" trigger --control "http://127.0.0.1:$CONTROL_PORT" \
        --flag "slow-$1" --count "$CHANGES" --interval-ms 100 &
    local trig=$!
    timeout 60 wrk -t1 -c8 -d"$(( CHANGES / 10 + 2 ))s" --latency "http://127.0.0.1:$PROXY_PORT/api/flags" \
        | awk '/^ +99%/ {v=$2; if (v ~ /us$/) {sub("us","",v); v/=1000} else if (v ~ /ms$/) {sub("ms","",v)} else if (v ~ /s$/) {sub("s","",v); v*=1000}; print v}'
    wait "$trig" || true
}

section_slow() {
    echo "== $SLOW never-reading clients while a ~260 KB set changes $CHANGES times (polls' p99)"
    flags_file 2500 90 > "$TMP/large.json"
    mock --flags-file "$TMP/large.json"
    proxy $PROXY_PORT
    local pid
    pid=$(child_of "$LAST_PID")
    echo "body bytes: $(curl -s "http://127.0.0.1:$PROXY_PORT/api/flags" | wc -c)"
    local base=() with=()
    for r in $(seq 1 "$ROUNDS"); do base+=("$(polls_during_changes "base$r")"); done
    say "without non-readers: polls' p99 ${base[*]} ms; proxy RSS $(grep VmRSS /proc/"$pid"/status | awk '{print $2}') KiB"
    timeout 300 "$BIN/sse-load" run $(src) --url "http://127.0.0.1:$PROXY_PORT/api/stream" --clients "$SLOW" \
        --rounds 0 --no-read --hold-secs 200 --pid "$pid" > "$TMP/slow.log" 2>&1 &
    local holder=$!
    for _ in $(seq 1 300); do grep -q '^rss' "$TMP/slow.log" && break; sleep 0.1; done
    cat "$TMP/slow.log"
    for r in $(seq 1 "$ROUNDS"); do with+=("$(polls_during_changes "with$r")"); done
    say "with $SLOW non-readers: polls' p99 ${with[*]} ms; proxy RSS $(grep VmRSS /proc/"$pid"/status | awk '{print $2}') KiB"
    local b w
    b=$(printf '%s\n' "${base[@]}" | median)
    w=$(printf '%s\n' "${with[@]}" | median)
    say "median p99 with/without: $(ratio "$w" "$b")x ($w ms vs $b ms)"
    kill "$holder" 2>/dev/null || true
    wait "$holder" 2>/dev/null || true
    for p in "${PIDS[@]}"; do stop "$p"; done
    PIDS=()
}

echo "bench/run.sh $(date -u +%FT%TZ), $(nproc) cores, load $(load)"
for s in $SECTIONS; do "section_$s"; done
