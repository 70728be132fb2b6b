#!/usr/bin/env bash
# Builds the Dockerfile's runtime stage from a locally built static binary and runs it, since no
# registry (and so no base image) is reachable here: `--build-arg ROOTFS=prebuilt` replaces the
# `source` stage by the host's build, laid out by the same scripts/container-rootfs.sh.
# Asserts: the image is at most 15 MB and declares a non-root user, port 3001, a volume and a
# HEALTHCHECK; `--version` works; the process runs as uid 65532; the health check turns healthy;
# the bundled flags are served (local mode); SIGTERM ends an open SSE stream cleanly and the
# container exits 0 within the shutdown timeout; configured by environment as in the pattern
# (ROLLGATE_API_KEY, ROLLGATE_BASE_URL) it relays the mock upstream, persists the snapshot in
# the volume, and a new container on that volume is ready from it while upstream is down; the
# key never shows in the logs; with a mounted certificate it serves HTTPS and its health check
# speaks TLS; docker-compose.yml runs the image (compose v1, when it can run).
# Starts dockerd (Debian's docker.io, installed when missing) if none is running, talks to the
# containers over --network host on 127.0.0.1, and removes everything it created on exit.
# Usage: ./scripts/test-container.sh   (a step of ./scripts/test.sh; needs root on a fresh machine)
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=x86_64-unknown-linux-musl
PROFILE=container
BIN=target/$TARGET/$PROFILE/rollgate-proxy
ROOTFS=target/container/rootfs
MAX_IMAGE_BYTES=15000000
# The image's ROLLGATE_PROXY_SHUTDOWN_TIMEOUT (Dockerfile), in seconds.
SHUTDOWN_TIMEOUT=8
KEY=rg_server_CONTAINER-s3cr3t-41c9e2
TAG=rollgate-proxy:test-$$
PREFIX=rollgate-proxy-test-$$
VOLUME=$PREFIX-data
work=$(mktemp -d)
mkdir -p "$work/tls"
containers=()
pids=()
started_dockerd=
compose_project=

log() { printf -- '-- %s\n' "$*"; }
fail() {
  echo "FAIL: $*" >&2
  exit 1
}

cleanup() {
  local status=$?
  set +e
  if [ -n "$compose_project" ]; then
    ROLLGATE_PROXY_IMAGE=$TAG docker-compose -p "$compose_project" down -v --remove-orphans \
      >/dev/null 2>&1
  fi
  for c in "${containers[@]}"; do
    if [ "$status" -ne 0 ]; then
      echo "---- logs of $c ----" >&2
      "$DOCKER" logs --tail 40 "$c" >&2 2>&1
    fi
    "$DOCKER" rm -f "$c" >/dev/null 2>&1
  done
  for p in "${pids[@]}"; do
    kill "$p" 2>/dev/null
    wait "$p" 2>/dev/null
  done
  if [ -n "${DOCKER:-}" ]; then
    "$DOCKER" volume rm -f "$VOLUME" >/dev/null 2>&1
    "$DOCKER" rmi -f "$TAG" >/dev/null 2>&1
  fi
  if [ -n "$started_dockerd" ]; then
    kill "$started_dockerd" 2>/dev/null
    for _ in $(seq 1 100); do
      kill -0 "$started_dockerd" 2>/dev/null || break
      sleep 0.2
    done
  fi
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT

# wait_for <what> <seconds> <command...>: polls every 0.2 s until the command succeeds.
wait_for() {
  local what=$1 seconds=$2
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@"; do
    [ "$SECONDS" -lt "$deadline" ] || fail "timed out after ${seconds}s waiting for $what"
    sleep 0.2
  done
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

need_apt() {
  [ "$(id -u)" -eq 0 ] || fail "install Debian's $1 package (or run as root)"
  if [ -z "${apt_updated:-}" ]; then
    apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

log "docker daemon"
command -v dockerd >/dev/null || need_apt docker.io
# Debian's client speaks BuildKit to its daemon without the buildx plugin.
DOCKER=docker
[ -x /usr/bin/docker ] && DOCKER=/usr/bin/docker
if ! "$DOCKER" info >/dev/null 2>&1; then
  [ "$(id -u)" -eq 0 ] || fail "no docker daemon running, and starting one needs root"
  mkdir -p target/container
  dockerd >target/container/dockerd.log 2>&1 &
  started_dockerd=$!
  wait_for "dockerd (log: target/container/dockerd.log)" 60 "$DOCKER" info >/dev/null 2>&1
  echo "started dockerd (pid $started_dockerd)"
fi

log "static binary ($TARGET, profile $PROFILE)"
rustup target add "$TARGET" >/dev/null
# ring compiles C: musl-gcc (Debian's musl-tools) targets musl's headers.
command -v musl-gcc >/dev/null || need_apt musl-tools
CC_x86_64_unknown_linux_musl=musl-gcc \
  cargo build --locked --profile "$PROFILE" --target "$TARGET" -p rollgate-proxy-server --bin rollgate-proxy
# Static: no program interpreter (the scratch image has no dynamic loader or libc).
if readelf -l "$BIN" | grep -q 'program interpreter'; then
  fail "$BIN is dynamically linked"
fi
scripts/container-rootfs.sh "$BIN" "$ROOTFS"

log "image: the Dockerfile's runtime stage from the prebuilt rootfs"
DOCKER_BUILDKIT=1 "$DOCKER" build --quiet --build-arg ROOTFS=prebuilt --target runtime -t "$TAG" . >/dev/null
size=$("$DOCKER" image inspect -f '{{.Size}}' "$TAG")
echo "image $TAG: $size bytes"
[ "$size" -le "$MAX_IMAGE_BYTES" ] || fail "image is $size bytes, more than $MAX_IMAGE_BYTES"
inspect() { "$DOCKER" image inspect -f "$1" "$TAG"; }
[ "$(inspect '{{.Config.User}}')" = "65532:65532" ] || fail "image user: $(inspect '{{.Config.User}}')"
[ "$(inspect '{{json .Config.ExposedPorts}}')" = '{"3001/tcp":{}}' ] || fail "exposed ports"
[ "$(inspect '{{json .Config.Volumes}}')" = '{"/data":{}}' ] || fail "volumes"
[ "$(inspect '{{json .Config.Healthcheck.Test}}')" = '["CMD","/rollgate-proxy","healthcheck"]' ] \
  || fail "health check: $(inspect '{{json .Config.Healthcheck.Test}}')"

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
out=$("$DOCKER" run --rm --network none "$TAG" --version)
[ "$out" = "rollgate-proxy $version" ] || fail "--version printed: $out"
echo "--version: $out"

# run_proxy <name> <docker run args...>: starts a container on the host network.
run_proxy() {
  local name=$1
  shift
  containers+=("$name")
  "$DOCKER" run -d --name "$name" --network host "$@" "$TAG" >/dev/null
}
health() { "$DOCKER" inspect -f '{{.State.Health.Status}}' "$1" 2>/dev/null; }
is_healthy() {
  local state
  state=$("$DOCKER" inspect -f '{{.State.Status}}' "$1")
  [ "$state" = running ] || fail "container $1 is $state"
  [ "$(health "$1")" = healthy ]
}

log "local mode: non-root, healthy, the bundled flags, SIGTERM"
port=$(free_port)
name=$PREFIX-local
run_proxy "$name" -e PORT="$port" -e ROLLGATE_PROXY_BIND=127.0.0.1
# The first check runs one --interval (10s) after the start.
wait_for "$name to turn healthy" 60 is_healthy "$name"
pid=$("$DOCKER" inspect -f '{{.State.Pid}}' "$name")
uid=$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")
[ "$uid" = 65532 ] || fail "the proxy runs as uid $uid"
echo "healthy; runs as uid $uid"
curl -fsS "http://127.0.0.1:$port/api/flags" > "$work/flags.json"
python3 - "$work/flags.json" examples/flags.json <<'PY'
import json, sys
served = json.load(open(sys.argv[1]))["flags"]
bundled = json.load(open(sys.argv[2]))["flags"]
assert set(served) == set(bundled), (sorted(served), sorted(bundled))
print(f"serves the {len(served)} bundled flags")
PY
: > "$work/sse.txt"
curl -sN --max-time 60 "http://127.0.0.1:$port/api/stream" > "$work/sse.txt" &
sse_pid=$!
wait_for "the SSE snapshot" 10 grep -q '^event: flags' "$work/sse.txt"
start=$(date +%s%N)
"$DOCKER" stop -t 30 "$name" >/dev/null
took_ms=$((($(date +%s%N) - start) / 1000000))
code=$("$DOCKER" inspect -f '{{.State.ExitCode}}' "$name")
[ "$code" = 0 ] || fail "exit code $code after SIGTERM"
[ "$took_ms" -lt $((SHUTDOWN_TIMEOUT * 1000)) ] || fail "SIGTERM took ${took_ms} ms"
sse_status=0
wait "$sse_pid" || sse_status=$?
[ "$sse_status" = 0 ] || fail "the SSE stream did not end cleanly (curl exit $sse_status)"
# The daemon copies a container's output into its log asynchronously: right after the exit,
# under load, the last lines may not be there yet.
logs_have() { "$DOCKER" logs "$1" 2>&1 | grep -q "$2"; }
wait_for "'SIGTERM received' in the logs of $name" 30 logs_have "$name" "SIGTERM received"
echo "SIGTERM: exit 0 after ${took_ms} ms, the open stream ended cleanly"

log "TLS: HTTPS with a mounted certificate; the health check speaks TLS too"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=rollgate-proxy-test -addext subjectAltName=DNS:flags.example.com \
  -addext basicConstraints=critical,CA:FALSE \
  -keyout "$work/tls/key.pem" -out "$work/tls/cert.pem" 2>/dev/null || fail "openssl req"
# The proxy's user reads the mounted key (a test key; a real one comes from a Secret).
chmod 0644 "$work/tls/key.pem"
port=$(free_port)
name=$PREFIX-tls
run_proxy "$name" -e PORT="$port" -e ROLLGATE_PROXY_BIND=127.0.0.1 -v "$work/tls:/tls:ro" \
  -e ROLLGATE_PROXY_TLS_CERT=/tls/cert.pem -e ROLLGATE_PROXY_TLS_KEY=/tls/key.pem
wait_for "$name to turn healthy over TLS" 60 is_healthy "$name"
curl -fsS --cacert "$work/tls/cert.pem" --resolve "flags.example.com:$port:127.0.0.1" \
  "https://flags.example.com:$port/api/flags" | grep -q '"new-checkout"' || fail "HTTPS /api/flags"
"$DOCKER" stop -t 30 "$name" >/dev/null
echo "healthy over TLS (the certificate does not name 127.0.0.1: the probe pins it); HTTPS serves"

log "upstream mode by environment, snapshot volume, restart while upstream is down"
cargo build --locked -q -p rollgate-proxy-tests --bin mock-upstream
target/debug/mock-upstream --port 0 --api-key "$KEY" > "$work/mock.txt" &
mock_pid=$!
pids+=("$mock_pid")
wait_for "the mock upstream" 10 grep -q '^listening on ' "$work/mock.txt"
mock_url=$(sed -n 's/^listening on //p' "$work/mock.txt" | head -1)
"$DOCKER" volume create "$VOLUME" >/dev/null
port=$(free_port)
name=$PREFIX-upstream
run_proxy "$name" -e ROLLGATE_API_KEY="$KEY" -e ROLLGATE_BASE_URL="$mock_url" \
  -e PORT="$port" -e ROLLGATE_PROXY_BIND=127.0.0.1 -v "$VOLUME:/data"
wait_for "$name to turn healthy" 60 is_healthy "$name"
curl -fsS "http://127.0.0.1:$port/api/flags" > "$work/relayed.json"
curl -fsS -H "Authorization: Bearer $KEY" "$mock_url/api/v1/sdk/flags" > "$work/upstream.json"
python3 - "$work/relayed.json" "$work/upstream.json" <<'PY'
import json, sys
relayed = json.load(open(sys.argv[1]))["flags"]
upstream = json.load(open(sys.argv[2]))["flags"]
assert relayed == upstream, (relayed, upstream)
print(f"relays the mock's {len(relayed)} flags")
PY
mountpoint=$("$DOCKER" volume inspect -f '{{.Mountpoint}}' "$VOLUME")
wait_for "the snapshot in the volume" 15 test -s "$mountpoint/snapshot.json"
owner=$(stat -c %u "$mountpoint/snapshot.json")
[ "$owner" = 65532 ] || fail "snapshot owned by uid $owner"
"$DOCKER" stop -t 30 "$name" >/dev/null
kill "$mock_pid"
wait "$mock_pid" 2>/dev/null || true
name=$PREFIX-restarted
run_proxy "$name" -e ROLLGATE_API_KEY="$KEY" -e ROLLGATE_BASE_URL="$mock_url" \
  -e PORT="$port" -e ROLLGATE_PROXY_BIND=127.0.0.1 -v "$VOLUME:/data"
wait_for "$name to turn healthy from the snapshot" 60 is_healthy "$name"
curl -fsS "http://127.0.0.1:$port/api/flags" > "$work/restored.json"
python3 - "$work/restored.json" "$work/upstream.json" <<'PY'
import json, sys
assert json.load(open(sys.argv[1]))["flags"] == json.load(open(sys.argv[2]))["flags"]
print("a new container serves the persisted snapshot while upstream is down")
PY
for c in "$PREFIX-upstream" "$PREFIX-restarted"; do
  if "$DOCKER" logs "$c" 2>&1 | grep -qF "$KEY"; then
    fail "the server key appears in the logs of $c"
  fi
done
"$DOCKER" stop -t 30 "$name" >/dev/null

log "docker-compose.yml"
if command -v docker-compose >/dev/null || { [ "$(id -u)" -eq 0 ] && need_apt docker-compose; }; then
  # The compose file's own settings, with the test image and a free loopback port.
  compose_project=rgtest$$
  port=$(free_port)
  export ROLLGATE_PROXY_IMAGE=$TAG ROLLGATE_PROXY_PUBLISH=127.0.0.1:$port ROLLGATE_API_KEY=
  docker-compose -p "$compose_project" config -q
  # The only override: this machine cannot raise RLIMIT_NOFILE (the file's 65536 would fail
  # to apply), so the test runs with the host's own hard limit.
  nofile=$(ulimit -Hn)
  printf 'services:\n  rollgate-proxy:\n    ulimits:\n      nofile: {soft: %s, hard: %s}\n' \
    "$nofile" "$nofile" > "$work/compose.override.yml"
  compose() { docker-compose -p "$compose_project" -f docker-compose.yml -f "$work/compose.override.yml" "$@"; }
  compose up -d --no-build 2>"$work/compose.txt" \
    || { cat "$work/compose.txt" >&2; fail "docker-compose up"; }
  cid=$(compose ps -q rollgate-proxy)
  [ "$("$DOCKER" inspect -f '{{.HostConfig.RestartPolicy.Name}}' "$cid")" = unless-stopped ] \
    || fail "compose restart policy"
  wait_for "the compose service to answer on 127.0.0.1:$port" 30 \
    curl -fsS -o /dev/null "http://127.0.0.1:$port/ready"
  curl -fsS "http://127.0.0.1:$port/api/flags" | grep -q '"new-checkout"' || fail "compose: flags"
  [ "$("$DOCKER" inspect -f '{{json .Config.Healthcheck.Test}}' "$cid")" = '["CMD","/rollgate-proxy","healthcheck"]' ] \
    || fail "compose: health check"
  echo "compose: up with the published port, restart policy unless-stopped, serving"
  compose down -v --remove-orphans >/dev/null 2>&1
  compose_project=
else
  echo "skipped: docker-compose is not installed (checked statically by scripts/check-deploy.sh)"
fi

echo "ok: container image built, run and checked"
