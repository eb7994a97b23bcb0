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
# The harness notes every mount's life here; shown below for anything left behind.
# Tests make their directories here (interpose-test-*) and must take them away again.
TEST_DIR_ROOT="${INTERPOSE_TEST_DIR:-${TMPDIR:-/tmp}}"
dirs_before="$(find "$TEST_DIR_ROOT" -maxdepth 1 -type d -name 'interpose-test-*' | sort)"
INTERPOSE_TEST_EVENTS="$(mktemp /tmp/interpose-test-events.XXXXXX)"
export INTERPOSE_TEST_EVENTS
status=0
# FUSE over io_uring (`fs mount --io-uring`) needs a kernel switch, off by default: on for
# this run, back to what it was afterwards. The suite runs over /dev/fuse (the default);
# the file system tests then run once more over io_uring.
URING_SWITCH=/sys/module/fuse/parameters/enable_uring
uring_was=""
if [ -w "$URING_SWITCH" ]; then
    uring_was="$(cat "$URING_SWITCH")"
    echo Y >"$URING_SWITCH"
    trap 'echo "$uring_was" >"$URING_SWITCH"' EXIT
else
    echo "test: $URING_SWITCH is missing or read-only: this kernel has no FUSE over io_uring" >&2
fi
cargo nextest run --workspace --locked --profile ci "$@" || status=$?
if [ "$#" = 0 ]; then
    echo "== file system tests again, over io_uring (--io-uring)" >&2
    INTERPOSE_TEST_IO_URING=1 cargo nextest run --workspace --locked --profile ci \
        -E 'binary(durability) | binary(edge_cases) | binary(escape) | binary(filters) | binary(fsx) | binary(nonroot) | binary(programs) | binary(smoke) | binary(stress) | binary(transport) | binary(/^isolation/)' \
        || status=$?
fi
# nextest does not run documentation examples.
if [ "$#" = 0 ]; then
    cargo test --workspace --locked --doc -q || status=$?
fi

# Nothing may be left behind: no interpose mounts, no daemons. Test mounts live under
# directories named interpose-test-*. Anything found is reported, then cleaned up.
leftover=0
mounts="$(awk '$5 ~ /interpose-test-/ {print $5}' /proc/self/mountinfo)"
if [ -n "$mounts" ]; then
    leftover=1
    echo "test: test mounts left behind:" >&2
    grep 'interpose-test-' /proc/self/mountinfo >&2
    for m in $mounts; do
        echo "test: the harness's notes on $m:" >&2
        grep -F -- "$m" "$INTERPOSE_TEST_EVENTS" >&2 || echo "  (none)" >&2
    done
fi
if pgrep -x interpose >/dev/null; then
    leftover=1
    echo "test: interpose processes left behind:" >&2
    ps -o pid,ppid,etimes,args -p "$(pgrep -x interpose | paste -sd,)" >&2
    pkill -KILL -x interpose || true
fi
for m in $mounts; do
    umount -l "$m" || true
done
loops="$(losetup --list --noheadings --output NAME,BACK-FILE | awk '$2 ~ /interpose-test-/ {print $1}')"
if [ -n "$loops" ]; then
    leftover=1
    echo "test: loop devices left behind: $loops" >&2
    for l in $loops; do losetup -d "$l" || true; done
fi
dirs_after="$(find "$TEST_DIR_ROOT" -maxdepth 1 -type d -name 'interpose-test-*' | sort)"
left_dirs="$(comm -13 <(echo "$dirs_before") <(echo "$dirs_after") | grep . || true)"
if [ -n "$left_dirs" ]; then
    leftover=1
    echo "test: test directories left behind:" >&2
    echo "$left_dirs" >&2
    echo "$left_dirs" | while read -r d; do rm -rf --one-file-system -- "$d"; done
fi
rm -f "$INTERPOSE_TEST_EVENTS"
if [ "$status" != 0 ]; then
    exit "$status"
fi
if [ "$leftover" = 1 ]; then
    exit 1
fi
echo "test: all green, nothing left behind" >&2
