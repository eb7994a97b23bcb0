#!/usr/bin/env bash
# bench/blk.sh: block-device benchmark (issue 5): interpose's NBD server and kernel block
# device against qemu-nbd (zstd qcow2), nbdkit's file plugin and a plain loop device.
#
# Run as root on Debian 12:   bench/blk.sh
# It installs what it needs (fio, qemu-utils, nbdkit, libnbd-bin, e2fsprogs, jq, python3),
# builds target/release/interpose, makes (or reuses) the mixed image with
# bench/make-mixed-image.sh (an ext4 file system of BENCH_SIZE holding about equal parts text,
# binaries and random data, ~75% full, cached in BENCH_IMAGE_DIR; call it RAW), converts it
# once, untimed, into
#   IMG     interpose image create RAW -o IMG                  (defaults: 64 KiB chunks, zstd 3)
#   IMG_LZ4 interpose image create RAW -o IMG_LZ4 --codec lz4  (64 KiB chunks, LZ4 fast)
#   QCOW    qemu-img convert -c -O qcow2 -o compression_type=zstd,cluster_size=65536 RAW QCOW
# and measures, in one run, on the same data, these configurations:
#   interpose-img  (a) interpose blk serve IMG --unix SOCK --cache-mib C --threads T
#   interpose-lz4  (a') the same serving IMG_LZ4 (the image made for serving speed)
#   qemu-nbd       (b) qemu-nbd --read-only --persistent --shared=8 --cache=writeback
#                      --socket=SOCK -f qcow2 QCOW
#   nbdkit-raw     (c) nbdkit --exit-with-parent -P PIDFILE -U SOCK file RAW
#   interpose-raw  (d) interpose blk serve RAW --unix SOCK --cache-mib C --threads T
#   kernel-img     interpose blk attach IMG --cache-mib C: /dev/loopN over its FUSE file
#   kernel-raw     interpose blk attach RAW: the same over the raw file
#   loop-raw       losetup -r -f --show RAW: a plain loop device over the raw file (reference)
# Readiness: interpose prints a line (`serving ... on unix:SOCK`, or the device's path); nbdkit
# writes its pid file once it listens; qemu-nbd is polled with nbdinfo until it answers
# (60 s at most). Nothing sleeps for a fixed time.
#
# Caches. qemu's qcow2 driver has no cache of decompressed clusters (its one-cluster cache
# was removed in 2019); its metadata cache (l2-cache-size, default up to 1 MiB, enough for
# 8 GiB of image at 64 KiB clusters) holds every L2 table of this image already, so it is
# left at its default, and --cache=writeback (its default) reads the qcow2 file through the
# page cache as interpose reads IMG. nbdkit's file plugin keeps its defaults (cache=default,
# fadvise=normal: the page cache and readahead). interpose's decompressed-chunk cache is
# BENCH_CACHE_MIB; whole-chunk reads (nbdcopy's) bypass it, partial ones (4 KiB) fill it.
#
# Workloads, in this order within one server (or device) per configuration and repetition:
#   NBD exports (a)-(d), URI nbd+unix:///?socket=SOCK (the default export):
#     fullread       `sync; echo 3 > /proc/sys/vm/drop_caches`, then `nbdcopy URI null:`,
#                    timed (nbdcopy's defaults: up to 4 connections when the server allows
#                    multi-conn, 64 requests of 256 KiB in flight each, and it asks for
#                    base:allocation extents, so ranges a server reports as zero are not read);
#                    MB/s = export size / seconds (MB = 10^6 bytes)
#     fullread-noext the same with `nbdcopy --no-extents` (every byte read; for information:
#                    it separates server speed from what each server reports as holes)
#     randread-qd1   fio --ioengine=nbd --uri=URI --rw=randread --bs=4k --iodepth=1, time based
#                    (BENCH_SECONDS); IOPS
#     randread-qd32  the same at --iodepth=32
#   kernel devices (kernel-img, kernel-raw, loop-raw):
#     seqread        drop caches, then fio --filename=DEV --direct=1 --ioengine=libaio --rw=read
#                    --bs=1M --iodepth=4 over the whole device; MB/s
#     randread-qd32  fio --filename=DEV --direct=1 --ioengine=libaio --rw=randread --bs=4k
#                    --iodepth=32, time based; IOPS
# Caches are dropped only before fullread, fullread-noext and seqread, so those read the
# source files cold; nothing is warmed on purpose. The random reads follow them within the
# same server, so they find the source file in the page cache (as the full read left it) and
# interpose's chunk cache as the earlier steps left it (empty after fullread, filled by
# randread-qd1 for randread-qd32). Every server starts fresh in each repetition.
# fio uses the same random sequence (randrepeat) everywhere.
# After the workloads: the server's peak RSS (VmHWM), its CPU time per workload; in the first
# repetition, untimed, every export and device is read whole and its sha256 compared with
# RAW's, and each export's nbdinfo flags and `nbdinfo --map --totals` (zero share) recorded.
# Repetitions are interleaved: each repetition runs every configuration once, round-robin,
# starting one later each time. Reported values are medians.
#
# Targets (issue 5), each marked met or missed: full read (a)/(b) >= 2; random 4 KiB IOPS
# (a)/(b) >= 3 at iodepth 32 and >= 1.5 at iodepth 1; (d)/(c) >= 0.9 for the full read and
# both random depths; (a)'s peak RSS <= BENCH_CACHE_MIB + BENCH_RSS_ALLOWANCE_MIB. The
# compressed targets are checked for (a') against (b) as well.
#
# Environment:
#   BENCH_SIZE=1G                   size of the mixed image (e.g. 128M for a smoke run)
#   BENCH_REPS=5                    repetitions
#   BENCH_SECONDS=10                duration of each time-based fio run
#   BENCH_CACHE_MIB=256             interpose --cache-mib (serve and attach)
#   BENCH_THREADS=4                 interpose blk serve --threads (per connection)
#   BENCH_RSS_ALLOWANCE_MIB=64      what (a) may use beyond its cache: binary and libraries,
#                                   thread stacks, per-thread request and reply buffers,
#                                   zstd contexts, allocator slack
#   BENCH_CONFIGS="interpose-img interpose-lz4 qemu-nbd nbdkit-raw interpose-raw kernel-img kernel-raw loop-raw"
#                                   a subset, in this order
#   BENCH_DIR=/var/tmp/interpose-blk-bench  scratch directory (removed on exit, even on Ctrl-C)
#   BENCH_IMAGE_DIR=/var/tmp/interpose-bench-images  where the mixed image is kept between runs
#   BENCH_BIN=PATH                  use this interpose binary instead of building one
# Output: a markdown report on stdout and in bench/out/blk-<date>.md (raw samples in .tsv,
# the progress log in .log). Missed targets are marked, never an error exit.
# Duration: about 3 minutes per repetition at 1G and BENCH_SECONDS=10 (plus the first
# repetition's checks and making IMG and QCOW); a smoke run (BENCH_SIZE=128M BENCH_REPS=1
# BENCH_SECONDS=3) takes about a minute.
set -euo pipefail

umask 022
export LC_ALL=C

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/lib.sh
source "$REPO/bench/lib.sh"
COMMAND_LINE=""
for v in BENCH_SIZE BENCH_REPS BENCH_SECONDS BENCH_CACHE_MIB BENCH_THREADS BENCH_RSS_ALLOWANCE_MIB \
    BENCH_CONFIGS BENCH_DIR BENCH_IMAGE_DIR BENCH_BIN; do
    if [[ -n ${!v:-} ]]; then COMMAND_LINE+="$(printf '%s=%q' "$v" "${!v}") "; fi
done
COMMAND_LINE+="$0${*:+ $*}"

bench_preamble blk.sh "loop devices, FUSE mounts, dropping caches, installing packages" "$@"

SIZE_ARG=${BENCH_SIZE:-1G}
SIZE=$(numfmt --from=iec "$SIZE_ARG" 2>/dev/null) || { echo "blk.sh: BENCH_SIZE=$SIZE_ARG is not a size (1G, 128M, ...)" >&2; exit 2; }
REPS=${BENCH_REPS:-5}
RUNTIME=${BENCH_SECONDS:-10}
CACHE_MIB=${BENCH_CACHE_MIB:-256}
THREADS=${BENCH_THREADS:-4}
RSS_ALLOW_MIB=${BENCH_RSS_ALLOWANCE_MIB:-64}
for v in REPS RUNTIME CACHE_MIB THREADS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "blk.sh: $v (BENCH_*) must be a positive integer" >&2; exit 2; }
done
[[ $RSS_ALLOW_MIB =~ ^[0-9]+$ ]] || { echo "blk.sh: BENCH_RSS_ALLOWANCE_MIB must be an integer" >&2; exit 2; }
ALL_CONFIGS=(interpose-img interpose-lz4 qemu-nbd nbdkit-raw interpose-raw kernel-img kernel-raw loop-raw)
read -r -a CONFIGS <<<"${BENCH_CONFIGS:-${ALL_CONFIGS[*]}}"
for c in "${CONFIGS[@]}"; do
    [[ " ${ALL_CONFIGS[*]} " == *" $c "* ]] || { echo "blk.sh: unknown configuration $c" >&2; exit 2; }
done
# Per workload: a hung server is reported, not waited on (a cold full read of a slow disk
# plus slack).
WL_TIMEOUT=$((RUNTIME + 120 + SIZE / 1048576))

BENCH_DIR=$(realpath -m "${BENCH_DIR:-/var/tmp/interpose-blk-bench}")
IMAGE_DIR=$(realpath -m "${BENCH_IMAGE_DIR:-/var/tmp/interpose-bench-images}")
OUT=$BENCH_DIR/work
MARKER=$BENCH_DIR/.interpose-bench
SOCK=$OUT/nbd.sock
URI="nbd+unix:///?socket=$SOCK"
STAMP=$(date +%Y-%m-%d-%H%M%S)
RESULTS=$REPO/bench/out
REPORT=$RESULTS/blk-$STAMP.md
SAMPLES=$RESULTS/blk-$STAMP.tsv
LOG=$RESULTS/blk-$STAMP.log

mkdir -p "$RESULTS"
: >"$LOG"
log() { printf '%s %s\n' "$(date +%T)" "$*" | tee -a "$LOG" >&2; }

# ---------------------------------------------------------------- cleanup (also on Ctrl-C)

SERVER_PID=""   # the current server: interpose serve/attach, qemu-nbd or nbdkit
WL_PID=""       # the subshell running the current workload (fio, nbdcopy, ...)
SERVER_LOG=""
READY_FD=""     # our read-write end of interpose's readiness fifo
DEV=""          # the current block device (interpose attach or our losetup)
DEV_KIND=""     # attach | loop
CREATED_DIR=0
LOCK=""
BLK_RUN_DIR=/run/interpose/blk # crates/blkdev: an attached device's FUSE mount is BLK_RUN_DIR/<pid>

loop_backing() { # $1: /dev/loopN; its backing file, or nothing when detached
    local n=${1##*/}
    cat "/sys/block/$n/loop/backing_file" 2>/dev/null || true
}

# Removes what the current configuration left: the server process, the loop device (only if
# still ours: backed by RAW, or by the FUSE file of the attach process we started) and that
# process's FUSE mount.
teardown() {
    local pid=$SERVER_PID errexit=$-
    set +e
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null
        wait_exit "$pid" 30 || kill -KILL "$pid" 2>/dev/null
    fi
    [[ -n $pid ]] && wait "$pid" 2>/dev/null
    if [[ -n $DEV ]]; then
        local b
        b=$(loop_backing "$DEV")
        if [[ $DEV_KIND == loop && $b == "$RAW" ]] ||
            [[ $DEV_KIND == attach && -n $pid && $b == "$BLK_RUN_DIR/$pid/disk"* ]]; then
            losetup -d "$DEV" 2>/dev/null
        fi
    fi
    if [[ $DEV_KIND == attach && -n $pid ]]; then
        force_unmount "$BLK_RUN_DIR/$pid"
        rmdir "$BLK_RUN_DIR/$pid" 2>/dev/null
    fi
    [[ -n $READY_FD ]] && exec {READY_FD}<&-
    SERVER_PID="" READY_FD="" DEV="" DEV_KIND=""
    rm -f "$SOCK"
    [[ $errexit == *e* ]] && set -e
    return 0
}

stop_workload() { # an interrupted workload: its commands (timeout, fio, nbdcopy, ...), then itself
    local pid=$WL_PID
    [[ -n $pid ]] || return 0
    WL_PID=""
    pkill -TERM -P "$pid" 2>/dev/null # its children, by parent pid (timeout passes it on to fio)
    kill -TERM "$pid" 2>/dev/null
    wait_exit "$pid" 15 || { pkill -KILL -P "$pid" 2>/dev/null; kill -KILL "$pid" 2>/dev/null; }
    wait "$pid" 2>/dev/null
    return 0
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    set +e
    stop_workload
    teardown
    ((CREATED_DIR)) && rm -rf --one-file-system "$BENCH_DIR"
    [[ -n $LOCK ]] && rm -f "$LOCK" "$LOCK.pid"
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM HUP

# ---------------------------------------------------------------- one run per bench dir

take_bench_lock bench/blk.sh

# ---------------------------------------------------------------- dependencies and build

need_pkgs=()
command -v fio >/dev/null || need_pkgs+=(fio)
command -v qemu-img >/dev/null || need_pkgs+=(qemu-utils)
command -v qemu-nbd >/dev/null || need_pkgs+=(qemu-utils)
command -v nbdkit >/dev/null || need_pkgs+=(nbdkit)
command -v nbdcopy >/dev/null || need_pkgs+=(libnbd-bin)
command -v nbdinfo >/dev/null || need_pkgs+=(libnbd-bin)
command -v mke2fs >/dev/null || need_pkgs+=(e2fsprogs)
command -v jq >/dev/null || need_pkgs+=(jq)
command -v python3 >/dev/null || need_pkgs+=(python3)
command -v losetup >/dev/null || need_pkgs+=(mount)
command -v fusermount3 >/dev/null || need_pkgs+=(fuse3)
install_packages "${need_pkgs[@]}"
fio --enghelp=nbd >/dev/null 2>&1 || { log "this fio has no nbd engine (fio --enghelp=nbd)"; exit 1; }
KERNEL_CONFIGS=0
for c in "${CONFIGS[@]}"; do [[ $c == kernel-* || $c == loop-raw ]] && KERNEL_CONFIGS=1; done
if ((KERNEL_CONFIGS)); then
    [[ -e /dev/fuse ]] || modprobe fuse 2>/dev/null || true
    [[ -e /dev/fuse ]] || { log "/dev/fuse is missing (modprobe fuse)"; exit 1; }
    [[ -e /dev/loop-control ]] || modprobe loop 2>/dev/null || true
    [[ -e /dev/loop-control ]] || { log "/dev/loop-control is missing (modprobe loop)"; exit 1; }
fi

interpose_binary
# What is measured, noted now: the tree may change while the benchmark runs.
MI_COMMIT="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [[ -n $(git -C "$REPO" status --porcelain -- 'crates/*/src' Cargo.toml Cargo.lock 2>/dev/null || true) ]]; then
    MI_COMMIT+=" (with uncommitted source changes)"
fi
[[ -n ${BENCH_BIN:-} ]] && MI_COMMIT="$BIN (BENCH_BIN; the tree is at $MI_COMMIT)"
MI_COMMIT+=", binary sha256 $(sha256sum "$BIN" | cut -c1-16)"

# ---------------------------------------------------------------- the mixed image

RAW=$IMAGE_DIR/mixed-$SIZE_ARG.ext4
log "mixed image $RAW (made once, then reused)"
"$REPO/bench/make-mixed-image.sh" "$RAW" "$SIZE" 2>&1 | tee -a "$LOG" >&2
[[ -s $RAW ]] || { log "no mixed image at $RAW"; exit 1; }
RAW=$(realpath "$RAW") # the loop device reports its backing file by its real path

# ---------------------------------------------------------------- scratch directory

if [[ -e $BENCH_DIR ]]; then
    rm -rf --one-file-system "$BENCH_DIR" # ours (marker checked above) and left by a killed run
fi
mkdir -p "$BENCH_DIR"
CREATED_DIR=1
: >"$MARKER"
mkdir -p "$OUT"
# A private copy: a rebuild of target/release during the run must not change what is measured.
cp "$BIN" "$OUT/interpose"
BIN=$OUT/interpose

need_mb=$((SIZE * 2 / 1048576 + 512)) # IMG, IMG_LZ4 and QCOW (each under the raw size in practice)
avail_mb=$(($(stat -f -c '%a * %S' "$BENCH_DIR") / 1048576))
if ((avail_mb < need_mb)); then
    log "$BENCH_DIR has ${avail_mb} MiB free; the benchmark needs about ${need_mb} MiB"
    exit 1
fi

DROP_OK=1
drop_caches() {
    sync
    if ! echo 3 >/proc/sys/vm/drop_caches 2>/dev/null; then
        ((DROP_OK)) && log "WARNING: cannot drop caches; the full reads are not cold"
        DROP_OK=0
    fi
}

# ---------------------------------------------------------------- the compressed copies (untimed)

IMG=$OUT/mixed.img
IMG_LZ4=$OUT/mixed-lz4.img
QCOW=$OUT/mixed.qcow2
log "bench dir $BENCH_DIR ($(findmnt -no FSTYPE -T "$BENCH_DIR")); raw image $RAW ($SIZE bytes); reps=$REPS, ${RUNTIME}s per fio run; configs: ${CONFIGS[*]}"
log "making $IMG, $IMG_LZ4 and $QCOW from the raw image (untimed; bench/image.sh times this)"
"$BIN" image create "$RAW" -o "$IMG" >"$OUT/create.out" 2>&1 || { log "interpose image create: $(tail -n 3 "$OUT/create.out")"; exit 1; }
"$BIN" image create "$RAW" -o "$IMG_LZ4" --codec lz4 >"$OUT/create.out" 2>&1 ||
    { log "interpose image create --codec lz4: $(tail -n 3 "$OUT/create.out")"; exit 1; }
qemu-img convert -c -O qcow2 -o compression_type=zstd,cluster_size=65536 "$RAW" "$QCOW" ||
    { log "qemu-img convert failed"; exit 1; }
"$BIN" image info --json "$IMG" >"$OUT/info.json"
qemu-img info --output=json "$QCOW" >"$OUT/qcow-info.json"
RAW_SHA=$(sha256sum "$RAW" | cut -d' ' -f1)
RAW_INFO=$(cat "$RAW.info" 2>/dev/null || echo "(no $RAW.info)")
RAW_ALLOC=$(($(stat -c '%b * %B' "$RAW"))) # bytes allocated: the raw file is sparse where ext4 is unused
IMG_BYTES=$(stat -c %s "$IMG")
IMG_LZ4_BYTES=$(stat -c %s "$IMG_LZ4")
QCOW_BYTES=$(stat -c %s "$QCOW")
QCOW_CLUSTER=$(jq -r '."cluster-size"' "$OUT/qcow-info.json")
QCOW_CTYPE=$(jq -r '."format-specific".data."compression-type" // "?"' "$OUT/qcow-info.json")
sync

# ---------------------------------------------------------------- measurement helpers

printf 'rep\tconfig\tworkload\tmetric\tvalue\n' >"$SAMPLES"
ERRORS=$OUT/errors.tsv
: >"$ERRORS"
FIRST=$OUT/first.tsv # rep 1: config, key, value (nbdinfo flags, map totals)
: >"$FIRST"
CUR_REP=0 CUR_CFG=""

sample() { printf '%s\t%s\t%s\t%s\t%s\n' "$CUR_REP" "$CUR_CFG" "$1" "$2" "$3" >>"$SAMPLES"; }
first() { printf '%s\t%s\t%s\n' "$CUR_CFG" "$1" "$2" >>"$FIRST"; }
error() { # workload, message
    printf '%s\t%s\t%s\t%s\n' "$CUR_REP" "$CUR_CFG" "$1" "$2" >>"$ERRORS"
    log "ERROR rep $CUR_REP $CUR_CFG $1: $2"
}
now() { echo "$EPOCHREALTIME"; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }

CLK_TCK=$(getconf CLK_TCK)
cpu_seconds() { # utime + stime of a process (all its threads), in seconds
    local stat f
    stat=$(<"/proc/$1/stat") || return 1
    stat=${stat##*) }
    read -r -a f <<<"$stat"
    awk -v u="${f[11]}" -v s="${f[12]}" -v t="$CLK_TCK" 'BEGIN { printf "%.2f", (u + s) / t }'
}

FIO_COMMON=(--group_reporting --output-format=json --randrepeat=1)
run_fio() { # json, fio args...
    local json=$1
    shift
    # fio's nbd engine prints "connected" on stdout: the JSON goes to its own file.
    timeout -k 10 "$WL_TIMEOUT" fio "${FIO_COMMON[@]}" --output="$json" "$@" >/dev/null
    [[ $(jq '.jobs[0].error' "$json") == 0 ]] || { echo "fio reported error $(jq '.jobs[0].error' "$json")" >&2; return 1; }
}
fio_iops() { jq -r '.jobs[0].read.iops | round' "$1"; }
fio_mbs() { jq -r '.jobs[0].read.bw_bytes / 1e6 | . * 10 | round / 10' "$1"; }

# ---- workloads; $1 is the URI (NBD) or the device (kernel)

wl_fullread() { # nbdcopy URI null:, after dropping caches (done by run_workload)
    local t0 t1 s
    t0=$(now)
    timeout -k 10 "$WL_TIMEOUT" nbdcopy "$1" null:
    t1=$(now)
    s=$(elapsed "$t0" "$t1")
    sample fullread seconds "$s"
    sample fullread MB/s "$(awk -v n="$SIZE" -v s="$s" 'BEGIN { printf "%.1f", n / 1e6 / s }')"
}
wl_fullread_noext() {
    local t0 t1 s
    t0=$(now)
    timeout -k 10 "$WL_TIMEOUT" nbdcopy --no-extents "$1" null:
    t1=$(now)
    s=$(elapsed "$t0" "$t1")
    sample fullread-noext seconds "$s"
    sample fullread-noext MB/s "$(awk -v n="$SIZE" -v s="$s" 'BEGIN { printf "%.1f", n / 1e6 / s }')"
}
nbd_randread() { # uri, iodepth
    local j=$OUT/randread-qd$2.json
    run_fio "$j" --name="randread-qd$2" --ioengine=nbd --uri="$1" --rw=randread --bs=4k \
        --iodepth="$2" --time_based --runtime="$RUNTIME"
    sample "randread-qd$2" IOPS "$(fio_iops "$j")"
    sample "randread-qd$2" lat_p99_us "$(jq -r '.jobs[0].read.clat_ns.percentile["99.000000"] / 1000 | round' "$j")"
}
wl_randread_qd1() { nbd_randread "$1" 1; }
wl_randread_qd32() { nbd_randread "$1" 32; }
wl_seqread() { # the whole device in 1 MiB direct reads, after dropping caches
    local j=$OUT/seqread.json
    run_fio "$j" --name=seqread --filename="$1" --direct=1 --ioengine=libaio --rw=read --bs=1M --iodepth=4
    [[ $(jq '.jobs[0].read.io_bytes' "$j") == "$SIZE" ]] || { echo "short read: $(jq '.jobs[0].read.io_bytes' "$j") bytes" >&2; return 1; }
    sample seqread MB/s "$(fio_mbs "$j")"
}
wl_kernel_randread_qd32() {
    local j=$OUT/kernel-randread.json
    run_fio "$j" --name=randread-qd32 --filename="$1" --direct=1 --ioengine=libaio --rw=randread \
        --bs=4k --iodepth=32 --time_based --runtime="$RUNTIME"
    sample randread-qd32 IOPS "$(fio_iops "$j")"
    sample randread-qd32 lat_p99_us "$(jq -r '.jobs[0].read.clat_ns.percentile["99.000000"] / 1000 | round' "$j")"
}

# ---- untimed checks, first repetition
wl_nbdcheck() { # the whole export against RAW; nbdinfo's view of the server
    local sha info
    sha=$(timeout -k 10 "$WL_TIMEOUT" nbdcopy "$1" - | sha256sum | cut -d' ' -f1)
    [[ $sha == "$RAW_SHA" ]] || { echo "the export's sha256 $sha differs from the raw image's" >&2; return 1; }
    info=$(nbdinfo --json "$1")
    first multi_conn "$(jq -r '.exports[0].can_multi_conn' <<<"$info")"
    first structured "$(jq -r '.structured' <<<"$info")"
    first block_sizes "$(jq -r '.exports[0] | "\(.block_size_minimum // "-")/\(.block_size_preferred // "-")/\(.block_size_maximum // "-")"' <<<"$info")"
    first zero_bytes "$(nbdinfo --map --totals --json "$1" | jq '[.[] | select(.type >= 2) | .size] | add // 0')"
}
wl_devcheck() {
    local sha
    sha=$(timeout -k 10 "$WL_TIMEOUT" sha256sum "$1" | cut -d' ' -f1)
    [[ $sha == "$RAW_SHA" ]] || { echo "the device's sha256 $sha differs from the raw image's" >&2; return 1; }
}

run_workload() { # name, target: runs in a subshell with errexit; failures are recorded
    # Never call this where errexit is ignored (after if, ||, &&, !): the subshell's set -e
    # would be ignored too.
    local wl=$1 target=$2 rc=0 errf=$OUT/wl.err
    [[ $wl == fullread* || $wl == seqread ]] && drop_caches
    set +e
    # In the background, then `wait`: a SIGINT/SIGTERM to this script runs its trap at once.
    # (A foreground child that catches SIGINT itself, as fio does, would make bash drop it.)
    (
        set -e
        "wl_${wl//-/_}" "$target"
    ) 2>"$errf" &
    WL_PID=$!
    wait "$WL_PID"
    rc=$?
    WL_PID=""
    set -e
    if ((rc)); then
        error "$wl" "exit $rc: $(head -n 3 "$errf" | tr '\n' ' ')"
    fi
    return 0
}

# ---------------------------------------------------------------- servers and devices

start_interpose() { # kind (serve|attach), args...: sets SERVER_PID (and DEV for attach)
    local kind=$1 fifo=$OUT/ready.fifo line="" deadline=$((SECONDS + 60))
    shift
    SERVER_LOG=$OUT/server-$CUR_CFG-$CUR_REP.log
    rm -f "$fifo"
    mkfifo "$fifo"
    exec {READY_FD}<>"$fifo" # read-write: never blocks, and the server's stdout never breaks
    [[ $kind == attach ]] && DEV_KIND=attach
    "$BIN" blk "$kind" "$@" >"$fifo" 2>"$SERVER_LOG" &
    SERVER_PID=$!
    while :; do
        if read -r -t 1 -u "$READY_FD" line; then
            if [[ $kind == serve && $line == "serving "*" on "*"unix:$SOCK"* ]]; then
                break
            elif [[ $kind == attach && $line =~ ^/dev/loop[0-9]+$ ]]; then
                DEV=$line
                break
            fi
        elif ! kill -0 "$SERVER_PID" 2>/dev/null || ((SECONDS > deadline)); then
            error start "no readiness line; log: $(tail -n 5 "$SERVER_LOG" | tr '\n' ' ')"
            teardown
            return 1
        fi
    done
    log "  $line (pid $SERVER_PID)"
}

start_qemu_nbd() {
    local deadline=$((SECONDS + 60))
    SERVER_LOG=$OUT/server-$CUR_CFG-$CUR_REP.log
    qemu-nbd --read-only --persistent --shared=8 --cache=writeback --socket="$SOCK" -f qcow2 "$QCOW" \
        >"$SERVER_LOG" 2>&1 &
    SERVER_PID=$!
    # Ready when it answers the handshake.
    until [[ -S $SOCK ]] && nbdinfo --size "$URI" >/dev/null 2>&1; do
        if ! kill -0 "$SERVER_PID" 2>/dev/null || ((SECONDS > deadline)); then
            error start "qemu-nbd not answering; log: $(tail -n 5 "$SERVER_LOG" | tr '\n' ' ')"
            teardown
            return 1
        fi
        sleep 0.05 # polling interval
    done
    log "  qemu-nbd answers on $SOCK (pid $SERVER_PID)"
}

start_nbdkit() {
    local pidf=$OUT/nbdkit.pid deadline=$((SECONDS + 60))
    SERVER_LOG=$OUT/server-$CUR_CFG-$CUR_REP.log
    rm -f "$pidf"
    # --exit-with-parent (implies --foreground): it goes if this script is killed outright.
    nbdkit --exit-with-parent -P "$pidf" -U "$SOCK" file "$RAW" >"$SERVER_LOG" 2>&1 &
    SERVER_PID=$!
    # nbdkit writes the pid file once it listens.
    until [[ -s $pidf ]]; do
        if ! kill -0 "$SERVER_PID" 2>/dev/null || ((SECONDS > deadline)); then
            error start "nbdkit wrote no pid file; log: $(tail -n 5 "$SERVER_LOG" | tr '\n' ' ')"
            teardown
            return 1
        fi
        sleep 0.02 # polling interval
    done
    [[ $(<"$pidf") == "$SERVER_PID" ]] || log "  note: nbdkit's pid file says $(<"$pidf"), we started $SERVER_PID"
    log "  nbdkit listens on $SOCK (pid $SERVER_PID)"
}

start_loop() {
    DEV_KIND=loop
    DEV=$(losetup -r -f --show "$RAW" 2>"$OUT/losetup.err") || {
        error start "losetup: $(cat "$OUT/losetup.err")"
        DEV=""
        return 1
    }
    log "  $DEV over $RAW (losetup -r)"
}

stop_current() { # orderly end of the current configuration; errors recorded
    local pid=$SERVER_PID rc=0
    if [[ -n $pid ]]; then
        kill -TERM "$pid" 2>/dev/null || true
        if ! wait_exit "$pid" 30; then
            error stop "still running 30 s after SIGTERM; killing"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" || rc=$?
        # interpose ends on SIGTERM with status 0; qemu-nbd and nbdkit with 0 or 143
        local ok=0
        case $CUR_CFG in
        interpose-* | kernel-*) ((rc == 0)) && ok=1 ;;
        *) ((rc == 0 || rc == 143)) && ok=1 ;;
        esac
        ((ok)) || error stop "exit status $rc after SIGTERM; log: $(tail -n 3 "$SERVER_LOG" | tr '\n' ' ')"
        if [[ $CUR_CFG == interpose-* || $CUR_CFG == kernel-* ]] && grep -qE ' (ERROR|WARN) ' "$SERVER_LOG"; then
            error server-log "$(grep -E ' (ERROR|WARN) ' "$SERVER_LOG" | sed 's/\x1b\[[0-9;]*m//g' | sort | uniq -c | sort -rn | head -n 3 | tr '\n' ' ')"
        fi
    fi
    if [[ -n $DEV ]]; then
        if [[ $DEV_KIND == loop ]]; then
            losetup -d "$DEV" || error stop "losetup -d $DEV failed"
        elif [[ -n $(loop_backing "$DEV") && $(loop_backing "$DEV") == "$BLK_RUN_DIR/$pid/disk"* ]]; then
            error stop "$DEV still attached after the attach process ended"
        fi
        if [[ $DEV_KIND == attach ]] && mounted "$BLK_RUN_DIR/$pid"; then
            error stop "$BLK_RUN_DIR/$pid still mounted after the attach process ended"
        fi
    fi
    teardown # whatever is left (nothing, normally)
}

session() { # one configuration, one repetition
    local cfg=$1 target wl wls pid c0 c1
    CUR_CFG=$cfg
    sample session loadavg_1m "$(cut -d' ' -f1 /proc/loadavg)"
    log "rep $CUR_REP/$REPS: $cfg (load average $(cut -d' ' -f1-3 /proc/loadavg))"
    case $cfg in
    interpose-img) start_interpose serve "$IMG" --unix "$SOCK" --cache-mib "$CACHE_MIB" --threads "$THREADS" || return 0 ;;
    interpose-lz4) start_interpose serve "$IMG_LZ4" --unix "$SOCK" --cache-mib "$CACHE_MIB" --threads "$THREADS" || return 0 ;;
    interpose-raw) start_interpose serve "$RAW" --unix "$SOCK" --cache-mib "$CACHE_MIB" --threads "$THREADS" || return 0 ;;
    qemu-nbd) start_qemu_nbd || return 0 ;;
    nbdkit-raw) start_nbdkit || return 0 ;;
    kernel-img) start_interpose attach "$IMG" --cache-mib "$CACHE_MIB" || return 0 ;;
    kernel-raw) start_interpose attach "$RAW" --cache-mib "$CACHE_MIB" || return 0 ;;
    loop-raw) start_loop || return 0 ;;
    esac
    pid=$SERVER_PID
    if [[ -n $DEV ]]; then
        target=$DEV
        wls=(seqread kernel-randread-qd32)
        local devsize
        devsize=$(blockdev --getsize64 "$DEV" 2>/dev/null || echo "?")
        [[ $devsize == "$SIZE" ]] || error start "$DEV has $devsize bytes, expected $SIZE"
    else
        target=$URI
        wls=(fullread fullread-noext randread-qd1 randread-qd32)
    fi
    for wl in "${wls[@]}"; do
        [[ -n $pid ]] && { c0=$(cpu_seconds "$pid") || c0=0; }
        run_workload "$wl" "$target"
        if [[ -n $pid ]]; then
            c1=$(cpu_seconds "$pid") || { error "$wl" "server $pid is gone"; break; }
            sample "${wl#kernel-}" server_cpu_s "$(elapsed "$c0" "$c1")"
        fi
    done
    if [[ -n $pid && -r /proc/$pid/status ]]; then # after the workloads, before the checks
        sample server VmHWM_MiB "$(awk '/^VmHWM:/ { printf "%.1f", $2 / 1024 }' "/proc/$pid/status")"
        sample server VmRSS_MiB "$(awk '/^VmRSS:/ { printf "%.1f", $2 / 1024 }' "/proc/$pid/status")"
        sample server cpu_total_s "$(cpu_seconds "$pid")"
    fi
    if ((CUR_REP == 1)); then
        if [[ -n $DEV ]]; then run_workload devcheck "$DEV"; else run_workload nbdcheck "$URI"; fi
    fi
    stop_current
    return 0
}

# ---------------------------------------------------------------- the runs

T_START=$SECONDS
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
for ((rep = 1; rep <= REPS; rep++)); do
    CUR_REP=$rep
    round_robin session "${CONFIGS[@]}"
done
T_TOTAL=$((SECONDS - T_START))
log "measurements done in ${T_TOTAL}s"

# ---------------------------------------------------------------- report

LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
MI_NPROC=$(nproc)
MI_KERNEL=$(uname -sr)
MI_CPU=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
MI_MEM=$(awk '/^MemTotal:/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
MI_FS="$(findmnt -no FSTYPE,SOURCE -T "$BENCH_DIR" | tr -s ' '), raw image on $(findmnt -no FSTYPE,SOURCE -T "$RAW" | tr -s ' ')"
# shellcheck disable=SC1091
MI_VERSIONS="$(fio --version), $(qemu-nbd --version | head -n 1), $(nbdkit --version | head -n 1), $(nbdcopy --version | head -n 1), $(. /etc/os-release && echo "$PRETTY_NAME")"
export LOAD_START LOAD_END REPS SIZE SIZE_ARG RUNTIME CACHE_MIB THREADS RSS_ALLOW_MIB DROP_OK T_TOTAL \
    COMMAND_LINE STAMP MI_NPROC MI_KERNEL MI_CPU MI_MEM MI_FS MI_VERSIONS MI_COMMIT RAW RAW_SHA RAW_INFO \
    RAW_ALLOC IMG_BYTES IMG_LZ4_BYTES QCOW_BYTES QCOW_CLUSTER QCOW_CTYPE
export CONFIGS_STR="${CONFIGS[*]}"

python3 - "$SAMPLES" "$ERRORS" "$OUT/info.json" "$FIRST" <<'EOF' | tee "$REPORT"
import csv, json, os, statistics, sys
from collections import defaultdict

samples_path, errors_path, info_path, first_path = sys.argv[1:5]
env = os.environ
configs = env["CONFIGS_STR"].split()
vals = defaultdict(list)  # (config, workload, metric) -> [values], in repetition order
with open(samples_path) as f:
    for row in csv.DictReader(f, delimiter="\t"):
        try:
            vals[(row["config"], row["workload"], row["metric"])].append(float(row["value"]))
        except (TypeError, ValueError):
            pass  # a failed measurement: reported under errors
errors = [line.rstrip("\n").split("\t", 3) for line in open(errors_path) if line.strip()]
try:
    info = json.load(open(info_path))
except (OSError, ValueError):
    info = {}
first = defaultdict(dict)
for line in open(first_path):
    c, k, v = line.rstrip("\n").split("\t", 2)
    first[c][k] = v

def med(c, w, m):
    v = vals.get((c, w, m))
    return statistics.median(v) if v else None

def ratio(a, b):
    return None if a is None or not b else a / b

def n_of(c, w, m):
    return len(vals.get((c, w, m), []))

size = int(env["SIZE"])
reps = int(env["REPS"])
cache = int(env["CACHE_MIB"])
allow = int(env["RSS_ALLOW_MIB"])

def fmt(x, m):
    if x is None:
        return "–"
    if m in ("IOPS", "lat_p99_us"):
        return f"{x:,.0f}"
    if m == "seconds":
        return f"{x:.3f}"
    if m.endswith("_s"):
        return f"{x:.2f}"
    return f"{x:.1f}" if abs(x) < 1000 else f"{x:,.0f}"

def cell(c, w, m):
    x = med(c, w, m)
    s = fmt(x, m)
    n = n_of(c, w, m)
    if x is not None and n != reps:
        s += f" (n={n})"
    return s

print(f"# interpose block-device benchmark, {env['STAMP']}\n")
print(f"Command: `{env['COMMAND_LINE']}`\n")
print("| machine | |\n|---|---|")
for k, v in [("nproc", env["MI_NPROC"]), ("CPU", env["MI_CPU"]), ("kernel", env["MI_KERNEL"]),
             ("memory", env["MI_MEM"]), ("file systems", env["MI_FS"]), ("tools", env["MI_VERSIONS"]),
             ("interpose", env["MI_COMMIT"])]:
    print(f"| {k} | {v} |")

print(f"\n**Raw image** (RAW): `{env['RAW']}`, {size} bytes ({env['SIZE_ARG']}), {int(env['RAW_ALLOC'])} bytes "
      f"allocated (sparse where ext4 is unused), sha256 {env['RAW_SHA'][:16]}…, made by bench/make-mixed-image.sh "
      "(its text and binaries come from this machine's packages, so the image differs between machines).")
for line in env["RAW_INFO"].splitlines():
    print(f"- {line}")
ch = info.get("chunks", {})
csize = info.get("chunk_size", 65536)
data_bytes = (ch.get("raw", 0) + ch.get("compressed", 0)) * csize
if ch:
    print(f"- IMG (`interpose image create RAW -o IMG`, defaults): {int(env['IMG_BYTES'])} bytes; {csize >> 10} KiB chunks: "
          f"{ch.get('total')} chunks, {ch.get('zero')} zero, {ch.get('raw')} stored raw, {ch.get('compressed')} compressed "
          f"({data_bytes / 2**20:.0f} MiB of non-zero chunks decompressed)")
print(f"- IMG_LZ4 (`interpose image create RAW -o IMG_LZ4 --codec lz4`): {int(env['IMG_LZ4_BYTES'])} bytes "
      f"({int(env['IMG_LZ4_BYTES']) / int(env['IMG_BYTES']):.2f} × IMG)")
print(f"- QCOW (`qemu-img convert -c -O qcow2 -o compression_type=zstd,cluster_size=65536 RAW QCOW`): "
      f"{int(env['QCOW_BYTES'])} bytes, cluster size {env['QCOW_CLUSTER']}, compression type {env['QCOW_CTYPE']}")

loads = [v for (c, w, m), vs in vals.items() if m == "loadavg_1m" for v in vs]
busy = bool(loads) and max(loads) > int(env["MI_NPROC"])
print(f"\nMedians of {reps} repetition{'s' if reps != 1 else ''}; {env['RUNTIME']} s per time-based fio run; "
      f"measurement time {env['T_TOTAL']} s. Load average (1, 5, 15 min) at the start {env['LOAD_START']}, "
      f"at the end {env['LOAD_END']}"
      + (f"; 1-min load before each configuration: median {statistics.median(loads):.1f}, max {max(loads):.1f}" if loads else "")
      + (". **The machine was busy with other work: expect noisy numbers.**" if busy else "."))
print("\nRepetitions interleaved: each runs every configuration once, round-robin, starting one later "
      "each time; every server (or device) is started fresh for each and ended with SIGTERM. "
      + ("Before each full read (`fullread`, `fullread-noext`, `seqread`) `sync; echo 3 > /proc/sys/vm/drop_caches`, "
         "so the source file (RAW, IMG or QCOW) is read cold; nothing else is dropped or warmed: the random "
         "reads that follow find the source file in the page cache and the server's own cache as the earlier "
         "steps left it. " if env["DROP_OK"] == "1" else
         "**Caches could not be dropped: the full reads were not cold.** ")
      + f"interpose: `--cache-mib {cache} --threads {env['THREADS']}`. qemu-nbd: `--cache=writeback` (its default; "
      "it has no cache of decompressed clusters, its L2 cache already covers the whole image). nbdkit file "
      "plugin: defaults (page cache, readahead).")

NBD = [("interpose-img", "(a) interpose blk serve IMG"), ("interpose-lz4", "(a') interpose blk serve IMG_LZ4"),
       ("qemu-nbd", "(b) qemu-nbd, qcow2 zstd"),
       ("nbdkit-raw", "(c) nbdkit file RAW"), ("interpose-raw", "(d) interpose blk serve RAW")]
KERN = [("kernel-img", "interpose blk attach IMG"), ("kernel-raw", "interpose blk attach RAW"),
        ("loop-raw", "losetup -r RAW")]

if any(c in configs for c, _ in NBD):
    print("\n## NBD exports\n")
    print("`nbdcopy URI null:` (fullread: nbdcopy's defaults, which skip ranges the server reports as zero; "
          "fullread-noext: `--no-extents`, every byte read); fio's nbd engine, 4 KiB random reads "
          "(`--rw=randread --bs=4k`) at iodepth 1 and 32, one connection. MB = 10^6 bytes. "
          "Server CPU: user+sys seconds of the server process during the step. Peak RSS: VmHWM after all steps.\n")
    print("| server | full read s ↓ | full read MB/s ↑ | no-extents MB/s ↑ | 4k qd1 IOPS ↑ | 4k qd32 IOPS ↑ | qd1 p99 µs | qd32 p99 µs | CPU s full / qd1 / qd32 | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for c, label in NBD:
        if c not in configs:
            continue
        cpu = " / ".join(fmt(med(c, w, "server_cpu_s"), "server_cpu_s") for w in ("fullread", "randread-qd1", "randread-qd32"))
        print(f"| {label} | {cell(c, 'fullread', 'seconds')} | {cell(c, 'fullread', 'MB/s')} | "
              f"{cell(c, 'fullread-noext', 'MB/s')} | {cell(c, 'randread-qd1', 'IOPS')} | {cell(c, 'randread-qd32', 'IOPS')} | "
              f"{cell(c, 'randread-qd1', 'lat_p99_us')} | {cell(c, 'randread-qd32', 'lat_p99_us')} | {cpu} | "
              f"{cell(c, 'server', 'VmHWM_MiB')} |")
    short = [c for c, _ in NBD if (med(c, "fullread", "seconds") or 99) < 2]
    if short:
        print(f"\n**Full reads under 2 s ({', '.join(short)}) swing with the machine's load from one repetition "
              "to the next (a few tens of ms of scheduling are several percent): compare the samples below, "
              "or use a larger BENCH_SIZE (e.g. 4G) for steadier figures.**")
    shown = [c for c, _ in NBD if c in configs and first.get(c)]
    if shown:
        print("\nWhat each server told nbdinfo (first repetition): multi-conn (nbdcopy then opens 4 connections), "
              "block sizes min/preferred/max, and the share of the export `nbdinfo --map --totals` reports as zero "
              "(what `fullread` skips):\n")
        print("| server | multi-conn | block sizes | reported zero |")
        print("|---|---|---|---:|")
        for c, label in NBD:
            f = first.get(c)
            if not f:
                continue
            z = f.get("zero_bytes")
            zs = "–" if z in (None, "", "null") else f"{int(z) / size * 100:.1f}%"
            print(f"| {label} | {f.get('multi_conn', '–')} | {f.get('block_sizes', '–')} | {zs} |")

if any(c in configs for c, _ in KERN):
    print("\n## Kernel block devices\n")
    print("fio on the device with `--direct=1 --ioengine=libaio`: seqread, the whole device in 1 MiB reads "
          "at iodepth 4 (caches dropped first); randread, 4 KiB at iodepth 32, time based. The interpose "
          "devices are loop devices over a one-file FUSE file system served by the `blk attach` process; "
          "loop-raw is a loop device straight over RAW (reads through the page cache).\n")
    print("| device | seq 1 MiB MB/s ↑ | 4k qd32 IOPS ↑ | qd32 p99 µs | server CPU s seq / rand | server peak RSS MiB |")
    print("|---|---:|---:|---:|---|---:|")
    for c, label in KERN:
        if c not in configs:
            continue
        cpu = " / ".join(fmt(med(c, w, "server_cpu_s"), "server_cpu_s") for w in ("seqread", "randread-qd32"))
        print(f"| {label} | {cell(c, 'seqread', 'MB/s')} | {cell(c, 'randread-qd32', 'IOPS')} | "
              f"{cell(c, 'randread-qd32', 'lat_p99_us')} | {cpu if c != 'loop-raw' else '– (in the kernel)'} | "
              f"{cell(c, 'server', 'VmHWM_MiB') if c != 'loop-raw' else '–'} |")

print("\n## Targets (issue 5)\n")
print("| target | value | required | result |")
print("|---|---:|---:|---|")

def check(name, value, op, limit, f):
    if value is None:
        res, v = "⚪ no data", "–"
    else:
        ok = value <= limit if op == "≤" else value >= limit
        res, v = ("✅ met" if ok else "❌ missed"), f(value)
    print(f"| {name} | {v} | {op} {f(limit)} | {res} |")

x2 = lambda v: f"{v:.2f}"
A, A4, B, C, D = "interpose-img", "interpose-lz4", "qemu-nbd", "nbdkit-raw", "interpose-raw"
for a, n in ((A, "(a)"), (A4, "(a')")):
    if a == A4 and a not in configs:
        continue
    check(f"compressed full read MB/s, {n} / (b)", ratio(med(a, "fullread", "MB/s"), med(B, "fullread", "MB/s")), "≥", 2.0, x2)
    check(f"compressed 4 KiB random IOPS, iodepth 32, {n} / (b)", ratio(med(a, "randread-qd32", "IOPS"), med(B, "randread-qd32", "IOPS")), "≥", 3.0, x2)
    check(f"compressed 4 KiB random IOPS, iodepth 1, {n} / (b)", ratio(med(a, "randread-qd1", "IOPS"), med(B, "randread-qd1", "IOPS")), "≥", 1.5, x2)
check("raw full read MB/s, (d) / (c)", ratio(med(D, "fullread", "MB/s"), med(C, "fullread", "MB/s")), "≥", 0.9, x2)
check("raw 4 KiB random IOPS, iodepth 1, (d) / (c)", ratio(med(D, "randread-qd1", "IOPS"), med(C, "randread-qd1", "IOPS")), "≥", 0.9, x2)
check("raw 4 KiB random IOPS, iodepth 32, (d) / (c)", ratio(med(D, "randread-qd32", "IOPS"), med(C, "randread-qd32", "IOPS")), "≥", 0.9, x2)
for a, n in ((A, "(a)"), (A4, "(a')")):
    rss = vals.get((a, "server", "VmHWM_MiB"))
    if rss or a == A:
        check(f"{n} peak RSS MiB (max of repetitions), ≤ cache {cache} + allowance {allow}", max(rss) if rss else None,
              "≤", float(cache + allow), lambda v: f"{v:.0f}")
if ch and data_bytes <= cache * 2**20:
    print(f"\nThe RSS bound is not exercised at this size: the image's non-zero chunks ({data_bytes / 2**20:.0f} MiB "
          f"decompressed) fit in the {cache} MiB cache. Use BENCH_SIZE=1G (or a smaller BENCH_CACHE_MIB).")
print(f"\nThe allowance ({allow} MiB, BENCH_RSS_ALLOWANCE_MIB) is what the server may use besides the cache: "
      "binary and libraries, thread stacks, per-thread request and reply buffers, zstd contexts, allocator slack.")

print("\nFor information (no target):\n")
print("| measure | value |")
print("|---|---:|")
for name, v in [
    ("no-extents full read MB/s, (a) / (b)", ratio(med(A, "fullread-noext", "MB/s"), med(B, "fullread-noext", "MB/s"))),
    ("no-extents full read MB/s, (d) / (c)", ratio(med(D, "fullread-noext", "MB/s"), med(C, "fullread-noext", "MB/s"))),
    ("full read MB/s, (a) / (d) (compressed vs raw, same server)", ratio(med(A, "fullread", "MB/s"), med(D, "fullread", "MB/s"))),
    ("full read MB/s, (a') / (a) (LZ4 vs zstd image, same server)", ratio(med(A4, "fullread", "MB/s"), med(A, "fullread", "MB/s"))),
    ("4k qd32 IOPS, (a') / (a)", ratio(med(A4, "randread-qd32", "IOPS"), med(A, "randread-qd32", "IOPS"))),
    ("4k qd32 IOPS, (a) / (d)", ratio(med(A, "randread-qd32", "IOPS"), med(D, "randread-qd32", "IOPS"))),
    ("kernel seq MB/s, attach IMG / loop RAW", ratio(med("kernel-img", "seqread", "MB/s"), med("loop-raw", "seqread", "MB/s"))),
    ("kernel seq MB/s, attach RAW / loop RAW", ratio(med("kernel-raw", "seqread", "MB/s"), med("loop-raw", "seqread", "MB/s"))),
    ("kernel 4k qd32 IOPS, attach IMG / loop RAW", ratio(med("kernel-img", "randread-qd32", "IOPS"), med("loop-raw", "randread-qd32", "IOPS"))),
    ("kernel 4k qd32 IOPS, attach RAW / loop RAW", ratio(med("kernel-raw", "randread-qd32", "IOPS"), med("loop-raw", "randread-qd32", "IOPS"))),
    ("kernel 4k qd32 IOPS, attach IMG / NBD (a) qd32", ratio(med("kernel-img", "randread-qd32", "IOPS"), med(A, "randread-qd32", "IOPS"))),
]:
    print(f"| {name} | {'–' if v is None else x2(v)} |")

print("\n## Errors and anomalies\n")
if not errors:
    print("None: every step completed in every repetition, and in the first every export and device read back "
          "exactly the raw image (sha256).")
for e in errors:
    rep, cfg, wl, msg = (e + ["", "", "", ""])[:4]
    print(f"- rep {rep}, {cfg}, {wl}: {msg.strip()}")

print("\n## All samples\n")
print("| configuration | step | metric | values (in repetition order) |")
print("|---|---|---|---|")
for c in configs:
    for (cc, w, m), v in sorted(vals.items()):
        if cc != c or m == "loadavg_1m":
            continue
        print(f"| {c} | {w} | {m} | {', '.join(fmt(x, m) for x in v)} |")
EOF
log "report: $REPORT (samples: $SAMPLES, log: $LOG)"
