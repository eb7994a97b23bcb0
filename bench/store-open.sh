#!/usr/bin/env bash
# bench/store-open.sh: how long opening a large isolation store takes (issue 3), against
# reading its journal with cat.
#
# Run as root on Debian 12:   bench/store-open.sh
# It builds target/release/interpose, mounts an empty BACKING with `--isolate STORE`, writes
# BENCH_SIZE_MIB of data through the mount (dd bs=1M conv=fsync, one file), unmounts, and then
# measures, BENCH_REPS times interleaved (a different one first in each repetition), each
# after `sync; echo 3 > /proc/sys/vm/drop_caches`:
#   cat      cat STORE/journal > /dev/null: reading the file once (the reference)
#   status   interpose isolation status STORE: opening the store checks every record (CRC32C
#            over its data), then prints the status
#   mount    interpose fs mount BACKING MNT --isolate STORE up to its readiness line (the
#            check, then the replay of the records into the view); unmounted afterwards
# and prints the medians, the ratios to cat, and the daemon's log lines about the check.
#
# Settings (environment):
#   BENCH_DIR=/var/tmp/interpose-bench-open   where BACKING, MNT and STORE live (made; removed
#                                             at the end; needs BENCH_SIZE_MIB of room)
#   BENCH_SIZE_MIB=4096                       data written through the mount
#   BENCH_REPS=5
#   BENCH_BIN=PATH                            use this interpose binary instead of building one
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-/var/tmp/interpose-bench-open}
SIZE_MIB=${BENCH_SIZE_MIB:-4096}
REPS=${BENCH_REPS:-5}
MARKER=$BENCH_DIR/.interpose-bench
log() { echo "store-open: $*" >&2; }
# shellcheck source=bench/lib.sh
. "$REPO/bench/lib.sh"
bench_preamble store-open "drop_caches, FUSE mounts" "$@"
take_bench_lock store-open

BACKING=$BENCH_DIR/backing
MNT=$BENCH_DIR/mnt
STORE=$BENCH_DIR/store
DAEMON_PID=""
cleanup() {
    if [[ -n $DAEMON_PID ]]; then
        "$BIN" fs unmount "$MNT" >/dev/null 2>&1 || force_unmount "$MNT"
        wait_exit "$DAEMON_PID" 30 || kill -KILL "$DAEMON_PID" 2>/dev/null || true
    fi
    rm -rf --one-file-system "$BENCH_DIR"
    [[ -n ${LOCK:-} ]] && rm -f "$LOCK" "$LOCK.pid"
}
trap cleanup EXIT

interpose_binary

rm -rf --one-file-system "$BENCH_DIR"
mkdir -p "$BACKING" "$MNT"
touch "$MARKER"

# Mounts with --isolate and waits for the readiness line; sets DAEMON_PID. $1: log file.
start_mount() {
    local fifo=$BENCH_DIR/ready.fifo line=""
    rm -f "$fifo"
    mkfifo "$fifo"
    exec {READY_FD}<>"$fifo" # read-write: never blocks, and the daemon's stdout never breaks
    "$BIN" fs mount "$BACKING" "$MNT" --isolate "$STORE" >"$fifo" 2>"$1" &
    DAEMON_PID=$!
    while ! read -r -t 1 -u "$READY_FD" line || [[ $line != "mounted "* ]]; do
        if ! kill -0 "$DAEMON_PID" 2>/dev/null; then
            log "the mount failed: $(tail -n 3 "$1")"
            exit 1
        fi
    done
    exec {READY_FD}>&-
}

stop_mount() {
    "$BIN" fs unmount "$MNT" >/dev/null
    wait_exit "$DAEMON_PID" 60 || { log "daemon $DAEMON_PID did not exit"; exit 1; }
    DAEMON_PID=""
}

cold() { sync; echo 3 >/proc/sys/vm/drop_caches; }
now() { date +%s.%N; }

log "writing $SIZE_MIB MiB through an isolated mount"
start_mount "$BENCH_DIR/daemon-fill.log"
dd if=/dev/zero of="$MNT/data" bs=1M count="$SIZE_MIB" conv=fsync status=none
stop_mount
JOURNAL_BYTES=$(stat -c %s "$STORE/journal")

declare -A SAMPLES
run_one() {
    local what=$1 t0 t1
    cold
    case $what in
    cat)
        t0=$(now)
        cat "$STORE/journal" >/dev/null
        t1=$(now)
        ;;
    status)
        t0=$(now)
        "$BIN" isolation status "$STORE" >/dev/null 2>"$BENCH_DIR/status.log"
        t1=$(now)
        ;;
    mount)
        t0=$(now)
        start_mount "$BENCH_DIR/daemon-$CUR_REP.log"
        t1=$(now)
        stop_mount
        ;;
    esac
    SAMPLES[$what]+="$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }') "
}

for ((CUR_REP = 1; CUR_REP <= REPS; CUR_REP++)); do
    log "repetition $CUR_REP of $REPS"
    round_robin run_one cat status mount
done

python3 - "$JOURNAL_BYTES" "$SIZE_MIB" "${SAMPLES[cat]}" "${SAMPLES[status]}" "${SAMPLES[mount]}" <<'EOF'
import statistics, sys
journal, size_mib = int(sys.argv[1]), int(sys.argv[2])
runs = {k: [float(x) for x in v.split()] for k, v in zip(("cat", "status", "mount"), sys.argv[3:])}
med = {k: statistics.median(v) for k, v in runs.items()}
print(f"journal: {journal / 2**30:.2f} GiB ({size_mib} MiB written through the mount); medians of {len(runs['cat'])}, cold cache each")
print()
print("| what | median s | samples s | GiB/s | / cat |")
print("|---|---:|---|---:|---:|")
for k in ("cat", "status", "mount"):
    samples = ", ".join(f"{x:.2f}" for x in runs[k])
    print(f"| {k} | {med[k]:.2f} | {samples} | {journal / 2**30 / med[k]:.2f} | {med[k] / med['cat']:.2f} |")
EOF
echo
echo "daemon log of the last mount:"
cat "$BENCH_DIR/daemon-$REPS.log"
