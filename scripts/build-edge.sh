#!/usr/bin/env bash
# Builds the Cloudflare Worker (edge-worker/) offline with pinned tools:
#   worker-build 0.8.7 and wasm-bindgen-cli = the wasm-bindgen version in Cargo.lock (installed
#   with `cargo install` when missing), wrangler/esbuild/wasm-opt from package-lock.json (npm ci).
# Output: edge-worker/build/{index.js,index_bg.wasm}. Usage: scripts/build-edge.sh [--no-npm] [--no-opt]
set -euo pipefail
cd "$(dirname "$0")/.."

npm_step=1
opt=1
for arg in "$@"; do
  case "$arg" in
    --no-npm) npm_step=0 ;;   # wrangler's [build] runs us with node_modules already installed
    --no-opt) opt=0 ;;        # skip wasm-opt: faster, bigger wasm with its name section
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

WB_VER=0.8.7
WBG_VER=$(awk '/^name = "wasm-bindgen"$/{getline; gsub(/[^0-9.]/,""); print; exit}' Cargo.lock)
if [ -z "$WBG_VER" ]; then
  echo "wasm-bindgen is not in Cargo.lock" >&2
  exit 1
fi

rustup target add wasm32-unknown-unknown >/dev/null 2>&1 || true
if ! { command -v worker-build >/dev/null && [ "$(worker-build --version 2>/dev/null)" = "$WB_VER" ]; }; then
  echo "==> installing worker-build $WB_VER (a few minutes, once)"
  cargo install worker-build --version "$WB_VER"
fi
if ! { command -v wasm-bindgen >/dev/null && wasm-bindgen --version | grep -qx "wasm-bindgen $WBG_VER"; }; then
  echo "==> installing wasm-bindgen-cli $WBG_VER (a few minutes, once)"
  # Not --locked: its lock pins a webpki-roots the registry index here does not have.
  cargo install wasm-bindgen-cli --version "$WBG_VER"
fi

if [ "$npm_step" = 1 ] || [ ! -x node_modules/.bin/wasm-opt ]; then
  npm ci --no-audit --no-fund --loglevel=error
fi

# worker-build would otherwise download these from GitHub releases (unreachable offline).
export WASM_BINDGEN_BIN=wasm-bindgen
export WASM_OPT_BIN="$PWD/node_modules/.bin/wasm-opt"
export ESBUILD_BIN="$PWD/node_modules/.bin/esbuild"
# binaryen's wasm-opt is a node program: make sure a node is on PATH for it.
export PATH="$PWD/node_modules/.bin:$PATH"

# worker-build's own wasm-opt step always adds `--debuginfo` (keeps the ~300 KB name section), so
# it is skipped and wasm-opt runs here instead, on the final build/index_bg.wasm.
(cd edge-worker && worker-build --profile wasm-release --no-opt)

wasm=edge-worker/build/index_bg.wasm
if [ "$opt" = 1 ]; then
  # The same feature set worker-build enables (what workerd supports; no newer encodings), -Oz
  # for size, and no name/DWARF/producers sections: panics still trap and reset the instance,
  # only wasm stack traces lose their function names. `--converge` reruns -Oz until the size stops
  # falling (~0.6 KB gzip less; a few seconds more).
  wasm-opt -Oz --converge \
    --enable-mutable-globals --enable-sign-ext --enable-nontrapping-float-to-int \
    --enable-bulk-memory --enable-multivalue --enable-reference-types --enable-exception-handling \
    --strip-debug --strip-producers \
    "$wasm" -o "$wasm.opt"
  mv "$wasm.opt" "$wasm"
fi
raw=$(wc -c <"$wasm")
gz=$(gzip -9 -c "$wasm" | wc -c)
echo "==> $wasm: $raw bytes raw, $gz bytes gzip -9"
# Issue 5's budget for the optimised wasm: 300 kB (300,000 B) gzipped; 267,459 B when this
# was written.
budget=300000
if [ "$opt" = 1 ] && [ "$gz" -gt "$budget" ]; then
  echo "warning: $wasm is over the $budget-byte gzip budget" >&2
fi
