#!/usr/bin/env bash
# Runs every test of rollgate-proxy on a fresh machine: installs what it needs, then checks
# formatting, lints, the core's wasm build and dependency rules, and runs every test suite.
# Usage: ./scripts/test.sh        (the README's test command; .ci/run calls it)
set -euo pipefail
cd "$(dirname "$0")/.."

suites=0
step() { printf '\n==> %s\n' "$*"; }

step "toolchain (rust-toolchain.toml pins the version and the wasm32 target)"
rustup show active-toolchain >/dev/null 2>&1 || rustup toolchain install
rustup target add wasm32-unknown-unknown >/dev/null

step "format"
cargo fmt --all -- --check

step "lint"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "lint the Worker's wasm-only modules (they build only for wasm32)"
cargo clippy -p rollgate-proxy-edge --target wasm32-unknown-unknown --locked -- -D warnings

step "core builds for wasm32-unknown-unknown"
cargo build -p rollgate-proxy-core --target wasm32-unknown-unknown --locked

step "core's dependency tree has no runtime or HTTP stack"
forbidden=$(cargo tree -p rollgate-proxy-core -e normal --prefix none --locked \
  | awk '{print $1}' | grep -E -x 'tokio|hyper|reqwest|axum|worker|mio' | sort -u || true)
if [ -n "$forbidden" ]; then
  echo "core depends on forbidden crates: $forbidden" >&2
  exit 1
fi
echo "ok: no tokio, hyper, reqwest, axum or worker under rollgate-proxy-core"

step "build the binaries the e2e suite starts (the same command as its one-time setup, so no scenario waits on a build)"
cargo build --locked -p rollgate-proxy-server --bin rollgate-proxy
cargo build --locked -p rollgate-proxy-tests --bin mock-upstream

step "Rust tests: core unit/property/golden/simulation, server, mock upstream, e2e black-box"
cargo test --workspace --locked
suites=$((suites + 1))

step "deploy recipes: alert rules (promtool), systemd unit, Kubernetes schemas, compose/dashboard checks"
./scripts/check-deploy.sh

step "container: build the image's runtime stage from the static binary, run it, check it"
./scripts/test-container.sh
suites=$((suites + 1))

step "JS client tests (clients/js, pinned by its package-lock.json)"
(cd clients/js && npm ci --no-audit --no-fund --loglevel=error && npm test)
suites=$((suites + 1))

step "edge worker: build with pinned worker-build / wasm-bindgen / wrangler, then its specs"
./scripts/build-edge.sh
npm run --silent test:edge
suites=$((suites + 1))

step "edge worker: wrangler deploy --dry-run with the real wrangler.toml (routes, observability)"
WRANGLER_SEND_METRICS=false npx wrangler deploy --dry-run --outdir target/wrangler-dry-run

step "the same e2e suite against the Worker (wrangler dev + the Rust mock), and native/Worker parity"
E2E_TARGET=edge cargo test -p rollgate-proxy-tests --test e2e --locked
suites=$((suites + 1))

step "real clients: official Python SDK, OpenFeature OFREP providers, Chromium on the demo page"
./scripts/test-clients.sh
suites=$((suites + 1))

echo
echo "all suites: ${suites} passed, 0 failed"
