#!/usr/bin/env bash
# Real clients this project did not write, against real rollgate-proxy and mock-upstream processes
# on 127.0.0.1: the official Rollgate Python SDK (PyPI rollgate==1.2.3, pytest), the OpenFeature
# OFREP providers (server + web, node --test) and headless Chromium on the demo page
# (playwright-core driving Debian's chromium). Installs what it needs, pinned:
#   tests/sdk/requirements.txt (hashes) → .venv-clients/, tests/clients/package-lock.json → npm ci,
#   chromium from Debian when /usr/bin/chromium is missing.
# Runs every suite even when one fails; exits non-zero if any failed.
# Usage: ./scripts/test-clients.sh            (scripts/test.sh calls it)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

step() { printf '\n==> %s\n' "$*"; }

step "build rollgate-proxy and mock-upstream (debug)"
cargo build -p rollgate-proxy-server -p rollgate-proxy-tests --bins --locked
export ROLLGATE_PROXY_BIN="$ROOT/target/debug/rollgate-proxy"
export MOCK_UPSTREAM_BIN="$ROOT/target/debug/mock-upstream"

step "chromium (Debian package)"
if [ ! -x /usr/bin/chromium ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
/usr/bin/chromium --version

step "Python SDK venv (.venv-clients, tests/sdk/requirements.txt with hashes)"
VENV="$ROOT/.venv-clients"
REQ="$ROOT/tests/sdk/requirements.txt"
stamp=$(sha256sum "$REQ" | cut -d' ' -f1)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.requirements.sha256" 2>/dev/null)" != "$stamp" ]; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --require-hashes --no-deps -r "$REQ"
  "$VENV/bin/pip" check
  echo "$stamp" >"$VENV/.requirements.sha256"
fi
"$VENV/bin/python" -c 'import importlib.metadata as m; print("rollgate", m.version("rollgate"), "pytest", m.version("pytest"))'

step "Node client packages (tests/clients/package-lock.json)"
lockstamp=$(sha256sum tests/clients/package-lock.json | cut -d' ' -f1)
if [ "$(cat tests/clients/node_modules/.lock.sha256 2>/dev/null)" != "$lockstamp" ]; then
  (cd tests/clients && npm ci --no-audit --no-fund --loglevel=error && echo "$lockstamp" >node_modules/.lock.sha256)
fi

mkdir -p test-artifacts
failed=()

step "official Rollgate Python SDK → proxy (pytest)"
if ! timeout 600 "$VENV/bin/python" -m pytest tests/sdk -p no:cacheprovider -rA -q; then
  failed+=("python-sdk")
fi

step "OpenFeature OFREP providers → proxy, Chromium → demo page (node --test)"
if ! (cd tests/clients && timeout 600 node --test --test-concurrency=1 --test-timeout=120000 \
  --test-reporter=spec ofrep/*.test.js browser/*.test.js); then
  failed+=("node-clients")
fi

echo
if [ ${#failed[@]} -gt 0 ]; then
  echo "client suites failed: ${failed[*]} (process logs: test-artifacts/logs/)" >&2
  exit 1
fi
echo "client suites passed (screenshots: test-artifacts/*.png)"
