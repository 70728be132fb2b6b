#!/usr/bin/env bash
# Fuzzes rollgate-proxy-core with cargo-fuzz (libFuzzer, nightly Rust); see FUZZING.md.
# Usage: scripts/fuzz.sh [target] [-- extra libFuzzer flags]
#   target       one of the targets below; default: all of them, one after the other
#   RUNS=N       executions per target (default 1000000; FUZZING.md's record used 10000000)
#   MAX_TIME=S   stop each target after S seconds instead (when set, RUNS is ignored)
#   TOOLCHAIN=T  the nightly toolchain to build with (default: nightly)
#   SANITIZER=S  cargo-fuzz --sanitizer (default: none; core forbids unsafe code, and without
#                AddressSanitizer a target runs about twice as fast; `address` checks the
#                dependencies' unsafe code too)
# Each target starts from its committed seeds in fuzz/corpus/<target>/; what a run learns is
# kept in fuzz/corpus-grown/<target>/ (ignored by git). A crash stops the run and is saved in
# fuzz/artifacts/<target>/: fix it, and copy the input to fuzz/regressions/<target>/ so the
# stable replay test (core/tests/fuzz_corpus.rs) keeps it fixed.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
TOOLCHAIN=${TOOLCHAIN:-nightly}
SANITIZER=${SANITIZER:-none}
TARGETS=(sse_decoder upstream_json evaluate downstream_request upstream_machine)

if [[ $# -gt 0 && $1 != -- ]]; then
    if [[ " ${TARGETS[*]} " != *" $1 "* ]]; then
        echo "unknown target $1; targets: ${TARGETS[*]}" >&2
        exit 2
    fi
    TARGETS=("$1")
    shift
fi
[[ ${1:-} == -- ]] && shift

if ! cargo fuzz --version 2>/dev/null | grep -qF " $CARGO_FUZZ_VERSION"; then
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi
rustup toolchain list | grep -q "^$TOOLCHAIN" || rustup toolchain install "$TOOLCHAIN" --profile minimal

if [[ -n ${MAX_TIME:-} ]]; then
    bound=(-max_total_time="$MAX_TIME")
else
    bound=(-runs="${RUNS:-1000000}")
fi

# Input size bounds, per target: the decoder's limits are themselves fuzzed down to a few bytes,
# so short streams reach every state (and a stream is decoded three times, once byte by byte);
# the machine's operations are capped at 64 per input anyway.
max_len() {
    case $1 in
        sse_decoder) echo 512 ;;
        upstream_machine) echo 2048 ;;
        *) echo 16384 ;;
    esac
}

for target in "${TARGETS[@]}"; do
    printf '\n==> %s\n' "$target"
    mkdir -p "fuzz/corpus-grown/$target"
    # -a: debug assertions (and overflow checks) on, so arithmetic overflow is a crash too.
    # New inputs go to the first corpus directory; the seeds are only read.
    cargo "+$TOOLCHAIN" fuzz run --fuzz-dir fuzz -a --sanitizer "$SANITIZER" "$target" \
        "fuzz/corpus-grown/$target" "fuzz/corpus/$target" -- \
        "${bound[@]}" -max_len="$(max_len "$target")" -print_final_stats=1 "$@"
done
