#!/usr/bin/env bash
# The whole test suite: installs what it needs, checks format and lints, runs every test
# against the real kernel (FUSE mounts, real programs). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
scripts/setup.sh

if ! cargo nextest --version >/dev/null 2>&1; then
    echo "test: installing cargo-nextest" >&2
    cargo install --locked cargo-nextest
fi

echo "== cargo fmt --check" >&2
cargo fmt --all --check
echo "== cargo clippy --all-targets -- -D warnings" >&2
cargo clippy --workspace --all-targets --locked -q -- -D warnings
echo "== tests" >&2
cargo nextest run --workspace --locked --profile ci "$@"

# Nothing may be left behind: no interpose mounts, no daemons.
# Test mounts live under directories named interpose-test-*.
if grep -q 'interpose-test-' /proc/self/mountinfo; then
    echo "test: test mounts left behind:" >&2
    grep 'interpose-test-' /proc/self/mountinfo >&2
    exit 1
fi
if pgrep -x interpose >/dev/null; then
    echo "test: interpose processes left behind: $(pgrep -x interpose | tr '\n' ' ')" >&2
    exit 1
fi
echo "test: all green, nothing left behind" >&2
