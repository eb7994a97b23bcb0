#!/usr/bin/env bash
# bench/fs.sh: file-system benchmark of interpose against the native file system and bindfs.
#
# Run as root on Debian 12:   bench/fs.sh
# It installs what it needs (fio, bindfs, fuse3, jq, python3), builds target/release/interpose,
# and measures, in one run on the same data, these configurations:
#   native            the backing directory itself
#   bindfs            Debian's bindfs, default options, backing -> mount point
#   interpose         `interpose fs mount` with no filter (file data via FUSE passthrough)
#   interpose-uring   the same with --io-uring: requests served over io_uring (the script
#                     turns the kernel's switch for FUSE over io_uring on for the run, and
#                     back to what it was afterwards)
#   interpose-audit   `interpose fs mount --filter audit=FILE` (the daemon serves file data)
#   interpose-isolated `interpose fs mount --isolate STORE` (STORE: a fresh directory in the bench
#                     dir, outside the backing dir, removed after the mount): every change goes
#                     to STORE's journal, the backing directory stays untouched (checked)
# Workloads (in this order, within one mount per configuration and repetition):
#   seqread    fio sequential read, bs=1M (of a file written once before the runs); then
#              the same again with the file in the page cache (warm_MiB/s). First, so that
#              it reads a file no earlier workload of the same mount wrote around: on a VM
#              the host may still be writing back the 2 GiB seqwrite just wrote (which an
#              isolated store keeps, while the other configurations delete it), and the
#              cold rate measured the host's write-back instead of the file system
#   seqwrite   fio sequential write, bs=1M, end_fsync=1
#   randrw     fio 4k random read/write 70/30, numjobs=2, time based
#   fsyncw     fio 4k random write with fsync=1, time based
#   meta       untar a deterministic tree (>= 20,000 entries), find, du -s, rm -rf
#   commit     interpose-isolated only, after the others: store size and pending changes
#              (`interpose isolation status --json`); then the pending changes are discarded,
#              a 1 GiB file (quick: 256 MiB) is written through the mount (dd conv=fsync), and
#              `interpose isolation commit STORE; sync` is timed against `cp` of an equally
#              sized file within the bench dir plus `sync` (caches dropped before each)
# All fio jobs use ioengine=psync, direct=0. Before every workload the script runs
# `sync; echo 3 > /proc/sys/vm/drop_caches`, so every configuration starts cold.
# Repetitions are interleaved: each repetition mounts every configuration once, round-robin,
# starting with a different configuration each time. Reported values are medians.
#
# Environment:
#   BENCH_DIR=/var/tmp/interpose-bench   scratch directory (removed on exit, even on Ctrl-C)
#   BENCH_REPS=5                         repetitions (BENCH_QUICK=1: 2)
#   BENCH_QUICK=1                        small sizes and short runtimes: a smoke run
#   BENCH_RUNTIME=SECONDS                runtime of the time-based fio jobs (20; quick: 5)
#   BENCH_CONFIGS="native bindfs interpose interpose-uring interpose-audit interpose-isolated"
#                                        a subset, in this order
#   BENCH_BIN=PATH                       use this interpose binary instead of building one
#   BENCH_INTERPOSE_ARGS="..."           extra `interpose fs mount` options for all interpose
#                                        configurations (e.g. "--fd-cache 65536"); default none
# Output: a markdown report on stdout and in bench/out/fs-<date>.md (raw samples in .tsv,
# the progress log in .log). Missed targets are marked, never an error exit.
set -euo pipefail

umask 022
export LC_ALL=C

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/lib.sh
source "$REPO/bench/lib.sh"
COMMAND_LINE=""
for v in BENCH_DIR BENCH_REPS BENCH_QUICK BENCH_RUNTIME BENCH_CONFIGS BENCH_BIN BENCH_INTERPOSE_ARGS; do
    if [[ -n ${!v:-} ]]; then COMMAND_LINE+="$(printf '%s=%q' "$v" "${!v}") "; fi
done
COMMAND_LINE+="$0${*:+ $*}"

bench_preamble fs.sh "mounting, dropping caches, installing packages" "$@"

QUICK=${BENCH_QUICK:-0}
[[ $QUICK == 1 ]] || QUICK=0
if ((QUICK)); then
    REPS=${BENCH_REPS:-2}
    SEQ_SIZE_MB=256 # sequential read and write file
    RR_SIZE_MB=64   # per randrw job (2 jobs)
    FS_SIZE_MB=64   # fsync random-write file
    COMMIT_SIZE_MB=256 # written through the isolated mount, then committed
    RUNTIME=${BENCH_RUNTIME:-5}
    META_TOP=4 META_SUB=10 META_FILES=50 # 4 + 40 dirs, 2,000 files
else
    REPS=${BENCH_REPS:-5}
    SEQ_SIZE_MB=2048
    RR_SIZE_MB=512
    FS_SIZE_MB=256
    COMMIT_SIZE_MB=1024
    RUNTIME=${BENCH_RUNTIME:-20}
    META_TOP=20 META_SUB=20 META_FILES=50 # 20 + 400 dirs, 20,000 files
fi
[[ $REPS =~ ^[1-9][0-9]*$ ]] || { echo "fs.sh: BENCH_REPS must be a positive integer" >&2; exit 2; }
[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || { echo "fs.sh: BENCH_RUNTIME must be a positive integer" >&2; exit 2; }
META_ENTRIES=$((1 + META_TOP + META_TOP * META_SUB + META_TOP * META_SUB * META_FILES))
ALL_CONFIGS=(native bindfs interpose interpose-uring interpose-audit interpose-isolated)
read -r -a CONFIGS <<<"${BENCH_CONFIGS:-${ALL_CONFIGS[*]}}"
for c in "${CONFIGS[@]}"; do
    [[ " ${ALL_CONFIGS[*]} " == *" $c "* ]] || { echo "fs.sh: unknown configuration $c" >&2; exit 2; }
done
WORKLOADS=(seqread seqwrite randrw fsyncw meta)
read -r -a INTERPOSE_ARGS <<<"${BENCH_INTERPOSE_ARGS:-}"
WL_TIMEOUT=$((QUICK ? 600 : 1800)) # per workload; a hung file system is reported, not waited on

BENCH_DIR=${BENCH_DIR:-/var/tmp/interpose-bench}
BENCH_DIR=$(realpath -m "$BENCH_DIR")
BACKING=$BENCH_DIR/backing
MNT=$BENCH_DIR/mnt
OUT=$BENCH_DIR/work # tarball, audit log, fio json, daemon logs: same disk as the backing dir
MARKER=$BENCH_DIR/.interpose-bench
STORE=$BENCH_DIR/store # interpose-isolated: a fresh one per mount, outside BACKING
STAMP=$(date +%Y-%m-%d-%H%M%S)
((QUICK)) && STAMP+=-quick
RESULTS=$REPO/bench/out
REPORT=$RESULTS/fs-$STAMP.md
SAMPLES=$RESULTS/fs-$STAMP.tsv
LOG=$RESULTS/fs-$STAMP.log

mkdir -p "$RESULTS"
: >"$LOG"
log() { printf '%s %s\n' "$(date +%T)" "$*" | tee -a "$LOG" >&2; }

# ---------------------------------------------------------------- cleanup (also on Ctrl-C)

DAEMON_PID=""   # interpose daemon of the current session
READY_FD=""     # our read-write end of its readiness fifo
BINDFS_PID=""   # bindfs daemon of the current session
CREATED_DIR=0
LOCK=""
URING_SWITCH=/sys/module/fuse/parameters/enable_uring
URING_WAS=""    # the switch's value before the run, restored on exit

cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    set +e
    if [[ -n $DAEMON_PID ]] && kill -0 "$DAEMON_PID" 2>/dev/null; then
        kill -TERM "$DAEMON_PID" 2>/dev/null
        wait_exit "$DAEMON_PID" 20 || { force_unmount "$MNT"; kill -KILL "$DAEMON_PID" 2>/dev/null; }
        wait "$DAEMON_PID" 2>/dev/null
    fi
    [[ -n $READY_FD ]] && exec {READY_FD}<&-
    force_unmount "$MNT"
    if [[ -n $BINDFS_PID ]] && kill -0 "$BINDFS_PID" 2>/dev/null; then
        wait_exit "$BINDFS_PID" 10 || kill -KILL "$BINDFS_PID" 2>/dev/null
    fi
    if ((CREATED_DIR)) && ! mounted "$MNT"; then
        rm -rf --one-file-system "$BENCH_DIR"
    elif ((CREATED_DIR)); then
        echo "fs.sh: $MNT is still mounted; left $BENCH_DIR in place" >&2
    fi
    [[ -n $LOCK ]] && rm -f "$LOCK" "$LOCK.pid"
    [[ -n $URING_WAS ]] && echo "$URING_WAS" >"$URING_SWITCH"
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM HUP

# ---------------------------------------------------------------- one run per bench dir

take_bench_lock bench/fs.sh

# ---------------------------------------------------------------- dependencies and build

need_pkgs=()
command -v fio >/dev/null || need_pkgs+=(fio)
command -v bindfs >/dev/null || need_pkgs+=(bindfs)
command -v fusermount3 >/dev/null || need_pkgs+=(fuse3)
command -v jq >/dev/null || need_pkgs+=(jq)
command -v python3 >/dev/null || need_pkgs+=(python3)
command -v findmnt >/dev/null || need_pkgs+=(util-linux)
install_packages "${need_pkgs[@]}"
[[ -e /dev/fuse ]] || modprobe fuse 2>/dev/null || true
[[ -e /dev/fuse ]] || { log "/dev/fuse is missing (modprobe fuse)"; exit 1; }

interpose_binary
# What is measured, noted now: the tree may change while the benchmark runs.
MI_COMMIT="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [[ -n $(git -C "$REPO" status --porcelain -- 'crates/*/src' Cargo.toml Cargo.lock 2>/dev/null || true) ]]; then
    MI_COMMIT+=" (with uncommitted source changes)"
fi
[[ -n ${BENCH_BIN:-} ]] && MI_COMMIT="$BIN (BENCH_BIN; the tree is at $MI_COMMIT)"
MI_COMMIT+=", binary sha256 $(sha256sum "$BIN" | cut -c1-16)"

# ---------------------------------------------------------------- scratch directory

if mounted "$MNT"; then force_unmount "$MNT"; fi # left over by a killed run
if [[ -e $BENCH_DIR ]]; then
    rm -rf --one-file-system "$BENCH_DIR" # ours (marker checked above) and left by a killed run
fi
mkdir -p "$BENCH_DIR"
CREATED_DIR=1
: >"$MARKER"
mkdir -p "$BACKING" "$MNT" "$OUT"
AUDIT_LOG=$OUT/audit.jsonl
# A private copy: a rebuild of target/release during the run must not change what is measured.
cp "$BIN" "$OUT/interpose"
BIN=$OUT/interpose

need_mb=$((SEQ_SIZE_MB * 2 + RR_SIZE_MB * 2 + FS_SIZE_MB + 2048))
ISOLATED=0
[[ " ${CONFIGS[*]} " == *" interpose-isolated "* ]] && ISOLATED=1
# The store keeps every write (seqwrite's file too, though removed), plus the commit file
# (source, journal, committed copy, cp's copy).
((ISOLATED)) && need_mb=$((need_mb + SEQ_SIZE_MB + RR_SIZE_MB * 4 + FS_SIZE_MB + COMMIT_SIZE_MB * 3))
avail_mb=$(($(stat -f -c '%a * %S' "$BENCH_DIR") / 1048576))
if ((avail_mb < need_mb)); then
    log "$BENCH_DIR has ${avail_mb} MiB free; the benchmark needs about ${need_mb} MiB"
    exit 1
fi

# The block device under the bench dir: its read/write counters show what reached the disk.
DEVSTAT=/sys/class/block/$(basename "$(realpath "$(findmnt -no SOURCE -T "$BENCH_DIR")" 2>/dev/null)" 2>/dev/null)/stat
[[ -r $DEVSTAT ]] || DEVSTAT=""
dev_sectors() { # sectors read, sectors written (512 bytes each)
    if [[ -n $DEVSTAT ]]; then awk '{ print $3, $7 }' "$DEVSTAT"; else echo "0 0"; fi
}

DROP_OK=1
drop_caches() {
    sync
    if ! echo 3 >/proc/sys/vm/drop_caches 2>/dev/null; then
        ((DROP_OK)) && log "WARNING: cannot drop caches; reads are not cold"
        DROP_OK=0
    fi
}

# FUSE over io_uring: a kernel switch, off by default. On for the run (interpose-uring asks
# for it), back to what it was on exit.
URING_STATE="not in this kernel"
if [[ -w $URING_SWITCH ]]; then
    URING_WAS=$(cat "$URING_SWITCH")
    echo Y >"$URING_SWITCH"
    URING_STATE="on for the run (was $URING_WAS)"
fi
log "FUSE over io_uring: $URING_STATE"

# ---------------------------------------------------------------- data, made once

log "bench dir $BENCH_DIR ($(findmnt -no FSTYPE -T "$BENCH_DIR")); reps=$REPS quick=$QUICK configs: ${CONFIGS[*]}"
FIO_COMMON=(--ioengine=psync --direct=0 --group_reporting --output-format=json)
# shellcheck disable=SC2016 # $jobnum is fio's, not ours
RR_ARGS=(--name=randrw --filename_format='randrw.$jobnum' --rw=randrw --rwmixread=70 --bs=4k
    --size="${RR_SIZE_MB}m" --numjobs=2 --time_based --runtime="$RUNTIME")
FS_ARGS=(--name=fsyncw --filename=fsyncw.dat --rw=randwrite --bs=4k --size="${FS_SIZE_MB}m"
    --fsync=1 --time_based --runtime="$RUNTIME")
SR_ARGS=(--name=seqread --filename=seqread.dat --rw=read --bs=1M --size="${SEQ_SIZE_MB}m")
SW_ARGS=(--name=seqwrite --filename=seqwrite.dat --rw=write --bs=1M --size="${SEQ_SIZE_MB}m" --end_fsync=1)

log "laying out fio files in the backing directory"
for args in SR_ARGS RR_ARGS FS_ARGS; do
    declare -n a=$args
    (cd "$BACKING" && fio "${FIO_COMMON[@]}" "${a[@]}" --create_only=1 --output=/dev/null)
    unset -n a
done
COMMIT_SRC=$OUT/commit-src.dat # commit workload: written through the isolated mount, and cp's source
if ((ISOLATED)); then
    # (rw=read: fio lays the file out with data, not as a hole)
    (cd "$OUT" && fio "${FIO_COMMON[@]}" --name=commitsrc --filename="${COMMIT_SRC##*/}" --rw=read \
        --bs=1M --size="${COMMIT_SIZE_MB}m" --create_only=1 --output=/dev/null)
    [[ $(stat -c %s "$COMMIT_SRC") == $((COMMIT_SIZE_MB * 1048576)) ]] || { log "fio did not lay out $COMMIT_SRC"; exit 1; }
fi

log "generating the metadata tree ($META_ENTRIES entries)"
python3 - "$OUT/gen/tree" "$META_TOP" "$META_SUB" "$META_FILES" <<'EOF'
import os, sys
root, ntop, nsub, nfiles = sys.argv[1], *map(int, sys.argv[2:])
state = 20240601
def rnd():
    global state
    state = (state * 1103515245 + 12345) % 2**31
    return state >> 8
words = ("interpose filter audit passthrough kernel inode dentry lookup getattr open read "
         "write flush release fsync rename unlink mkdir rmdir readdir statfs").split()
for t in range(ntop):
    for s in range(nsub):
        d = os.path.join(root, f"d{t:02d}", f"s{s:02d}")
        os.makedirs(d)
        for f in range(nfiles):
            # mostly small text files, one in ten up to 32 KiB, some empty
            size = rnd() % (32768 if f % 10 == 9 else 4096)
            if f % 25 == 0:
                size = 0
            name = f"d{t:02d}/s{s:02d}/f{f:03d}.txt"
            chunks, n, line = [], 0, 0
            while n < size:
                text = f"{name} line {line}: " + " ".join(
                    words[rnd() % len(words)] for _ in range(8)) + "\n"
                chunks.append(text)
                n += len(text)
                line += 1
            with open(os.path.join(d, f"f{f:03d}.txt"), "w") as fh:
                fh.write("".join(chunks)[:size])
EOF
TARBALL=$OUT/tree.tar
tar --sort=name --mtime=@1700000000 --owner=0 --group=0 --numeric-owner --format=gnu \
    -cf "$TARBALL" -C "$OUT/gen" tree
rm -rf "$OUT/gen"
TAR_SHA=$(sha256sum "$TARBALL" | cut -c1-16)
TAR_MB=$(du -m "$TARBALL" | cut -f1)
sync

# ---------------------------------------------------------------- measurement helpers

: >"$SAMPLES"
printf 'rep\tconfig\tworkload\tmetric\tvalue\n' >>"$SAMPLES"
ERRORS=$OUT/errors.tsv
: >"$ERRORS"
CUR_REP=0 CUR_CFG=""

sample() { printf '%s\t%s\t%s\t%s\t%s\n' "$CUR_REP" "$CUR_CFG" "$1" "$2" "$3" >>"$SAMPLES"; }
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

run_fio() { # dir, json, fio args...
    local dir=$1 json=$2
    shift 2
    (cd "$dir" && timeout -k 10 "$WL_TIMEOUT" fio "${FIO_COMMON[@]}" --output="$json" "$@" >/dev/null)
    [[ $(jq '.jobs[0].error' "$json") == 0 ]] || { echo "fio reported error $(jq '.jobs[0].error' "$json")" >&2; return 1; }
}
fio_mibs() { jq -r ".jobs[0].$2.bw_bytes / 1048576 | . * 100 | round / 100" "$1"; }
fio_iops() { jq -r ".jobs[0].$2.iops | round" "$1"; }

wl_seqwrite() {
    local j=$OUT/seqwrite.json
    run_fio "$1" "$j" "${SW_ARGS[@]}"
    sample seqwrite MiB/s "$(fio_mibs "$j" write)"
    rm -f "$1/seqwrite.dat"
}
wl_seqread() {
    local j=$OUT/seqread.json
    run_fio "$1" "$j" "${SR_ARGS[@]}"
    [[ $(jq '.jobs[0].read.io_bytes' "$j") == $((SEQ_SIZE_MB * 1048576)) ]] || { echo "short read" >&2; return 1; }
    sample seqread MiB/s "$(fio_mibs "$j" read)"
    # The same read again, the file now in the page cache: the file system's path without
    # the disk, whose cold-read rate swings by 2x between runs on this VM. --invalidate=0:
    # fio otherwise drops the file's cached pages first (which, through FUSE, reaches only
    # the mount's own cache, not the backing file's: unequal between configurations).
    run_fio "$1" "$OUT/seqread-warm.json" "${SR_ARGS[@]}" --invalidate=0
    sample seqread warm_MiB/s "$(fio_mibs "$OUT/seqread-warm.json" read)"
}
wl_randrw() {
    local j=$OUT/randrw.json
    run_fio "$1" "$j" "${RR_ARGS[@]}"
    local r w
    r=$(fio_iops "$j" read) w=$(fio_iops "$j" write)
    sample randrw read_IOPS "$r"
    sample randrw write_IOPS "$w"
    sample randrw total_IOPS $((r + w))
}
wl_fsyncw() {
    local j=$OUT/fsyncw.json
    run_fio "$1" "$j" "${FS_ARGS[@]}"
    sample fsyncw IOPS "$(fio_iops "$j" write)"
}
wl_meta() {
    local dir=$1/meta t0 t1 t2 t3 t4 n kb
    mkdir "$dir"
    t0=$(now)
    timeout -k 10 "$WL_TIMEOUT" tar -xf "$TARBALL" -C "$dir"
    t1=$(now)
    n=$(timeout -k 10 "$WL_TIMEOUT" find "$dir/tree" | wc -l)
    t2=$(now)
    kb=$(timeout -k 10 "$WL_TIMEOUT" du -sk "$dir/tree" | cut -f1)
    t3=$(now)
    timeout -k 10 "$WL_TIMEOUT" rm -rf "$dir/tree"
    t4=$(now)
    sample meta untar_s "$(elapsed "$t0" "$t1")"
    sample meta find_s "$(elapsed "$t1" "$t2")"
    sample meta du_s "$(elapsed "$t2" "$t3")"
    sample meta rm_s "$(elapsed "$t3" "$t4")"
    sample meta total_s "$(elapsed "$t0" "$t4")"
    sample meta du_kB "$kb"
    sample meta entries "$n"
    ((n == META_ENTRIES)) || { echo "find saw $n entries, expected $META_ENTRIES" >&2; return 1; }
    [[ -z $(ls -A "$dir") ]] || { echo "rm -rf left entries behind" >&2; return 1; }
    rmdir "$dir"
}
wl_verify() { # untimed, first repetition only: does the tree read back exactly?
    local dir=$1/verify
    mkdir "$dir"
    tar -xf "$TARBALL" -C "$dir"
    if ! (cd "$dir" && tar -df "$TARBALL" >"$OUT/verify.diff" 2>&1); then
        rm -rf "$dir"
        echo "tar -d: the extracted tree differs from the tarball in $(wc -l <"$OUT/verify.diff") ways:" \
            "$(sed 's/^[^:]*: //' "$OUT/verify.diff" | sort | uniq -c | sort -rn | head -n 4 | awk '{ $1 = $1 "×"; print }' | paste -sd ';')" >&2
        return 1
    fi
    rm -rf "$dir"
}

# interpose-isolated only, after the five workloads: isocheck, commitprep, then commit and cp
# (order alternating between repetitions), then in the first repetition commitverify.
iso() { timeout -k 5 600 "$BIN" isolation "$@"; } # status, discard, commit STORE ...
backing_state() { # what a change to BACKING would alter (atimes excepted)
    find "$BACKING" -printf '%P\t%y\t%s\t%m\t%U:%G\t%n\t%i\t%T@\t%C@\n' | sort
}
wl_isocheck() { # untimed: the store after the workloads; BACKING must be as before the mount
    local st
    st=$(iso status "$STORE" --json)
    sample store store_MiB "$(jq -r '.store_bytes / 1048576 | . * 100 | round / 100' <<<"$st")"
    sample store data_MiB "$(jq -r '.data_bytes / 1048576 | . * 100 | round / 100' <<<"$st")"
    sample store pending_changes "$(jq -r '.pending_changes' <<<"$st")"
    backing_state >"$OUT/backing.after"
    if ! cmp -s "$OUT/backing.before" "$OUT/backing.after"; then
        echo "BACKING changed under the isolated mount (path, type, size, mode, owner, links, inode," \
            "mtime, ctime): $(diff "$OUT/backing.before" "$OUT/backing.after" | grep -c '^[<>]') lines differ;" \
            "first: $(diff "$OUT/backing.before" "$OUT/backing.after" | grep '^[<>]' | head -n 2 | tr '\t' ' ' | paste -sd ';')" >&2
        return 1
    fi
}
wl_commitprep() { # untimed: drop what the workloads left pending, write the commit file, fsync'ed
    local t0 t1 st
    iso discard "$STORE" >/dev/null
    t0=$(now)
    timeout -k 10 "$WL_TIMEOUT" dd if="$COMMIT_SRC" of="$1/commit.dat" bs=1M conv=fsync status=none
    t1=$(now)
    sample commit write_MiB/s "$(awk -v n="$COMMIT_SIZE_MB" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", n / (b - a) }')"
    st=$(iso status "$STORE" --json)
    [[ $(jq -r '.data_bytes' <<<"$st") == $((COMMIT_SIZE_MB * 1048576)) && $(jq -r '.files' <<<"$st") == 1 ]] ||
        { echo "after discard + dd the store holds $(jq -c '{pending_changes, files, data_bytes}' <<<"$st")," \
            "expected 1 file of $((COMMIT_SIZE_MB * 1048576)) bytes" >&2; return 1; }
}
wl_commit() { # `interpose isolation commit STORE` (mounted), sync included
    local t0 t1 st
    st=$(iso status "$STORE" --json)
    # never commit what the workloads left (commitprep failed): it would change BACKING for good
    [[ $(jq -r '.data_bytes' <<<"$st") == $((COMMIT_SIZE_MB * 1048576)) && $(jq -r '.files' <<<"$st") == 1 ]] ||
        { echo "not committing: the store holds $(jq -c '{pending_changes, files, data_bytes}' <<<"$st")" >&2; return 1; }
    t0=$(now)
    timeout -k 10 "$WL_TIMEOUT" "$BIN" isolation commit "$STORE" >"$OUT/commit.out"
    sync
    t1=$(now)
    sample commit commit_s "$(elapsed "$t0" "$t1")"
    st=$(iso status "$STORE" --json)
    [[ $(jq -r '.pending_changes' <<<"$st") == 0 ]] ||
        { echo "after commit: $(jq -c '{pending_changes, files, data_bytes}' <<<"$st") ($(cat "$OUT/commit.out"))" >&2; return 1; }
    [[ $(stat -c %s "$BACKING/commit.dat") == $((COMMIT_SIZE_MB * 1048576)) ]] ||
        { echo "after commit: $BACKING/commit.dat has $(stat -c %s "$BACKING/commit.dat") bytes" >&2; return 1; }
}
wl_cp() { # the baseline: cp of an equally sized file within the bench dir, sync included
    local t0 t1
    rm -f "$OUT/commit-cp.dat"
    t0=$(now)
    timeout -k 10 "$WL_TIMEOUT" cp "$COMMIT_SRC" "$OUT/commit-cp.dat"
    sync
    t1=$(now)
    sample commit cp_s "$(elapsed "$t0" "$t1")"
    rm -f "$OUT/commit-cp.dat"
}
wl_commitverify() { # untimed, first repetition only: BACKING and the view hold the bytes written
    cmp "$COMMIT_SRC" "$BACKING/commit.dat" >&2
    cmp "$COMMIT_SRC" "$1/commit.dat" >&2
}

run_workload() { # name, path: runs in a subshell with errexit; failures are recorded
    # Never call this where errexit is ignored (after if, ||, &&, !): the subshell's set -e
    # would be ignored too.
    local wl=$1 path=$2 rc=0 errf=$OUT/wl.err r0 w0 r1 w1
    drop_caches
    read -r r0 w0 < <(dev_sectors)
    set +e
    (
        set -e
        "wl_$wl" "$path"
    ) 2>"$errf"
    rc=$?
    set -e
    read -r r1 w1 < <(dev_sectors)
    if [[ -n $DEVSTAT && ! $wl =~ ^(verify|isocheck|commitverify)$ ]]; then
        sample "$wl" dev_read_MiB "$(awk -v a="$r0" -v b="$r1" 'BEGIN { printf "%.0f", (b - a) / 2048 }')"
        sample "$wl" dev_write_MiB "$(awk -v a="$w0" -v b="$w1" 'BEGIN { printf "%.0f", (b - a) / 2048 }')"
    fi
    if ((rc)); then
        local n kinds
        n=$(wc -l <"$errf")
        # "tar: some/path: Cannot open: Bad file descriptor" -> counted by "tar: Cannot open: ..."
        kinds=$(sed -E "s/^([a-z]+): ('[^']*'|[^:']*): /\1: /" "$errf" | sort | uniq -c | sort -rn | head -n 4 |
            awk '{ n = $1; $1 = ""; printf "%s%d×%s", (NR > 1 ? "; " : ""), n, $0 }')
        if ((n <= 1)); then
            error "$wl" "exit $rc: $(cat "$errf")"
        else
            error "$wl" "exit $rc, $n stderr lines: $kinds; first: $(head -n 1 "$errf")"
        fi
        # leftovers would break the next workloads: remove them on the backing side
        rm -rf --one-file-system "$BACKING/meta" "$BACKING/verify" "$BACKING/seqwrite.dat"
    fi
    return 0
}

# ---------------------------------------------------------------- mounts

start_interpose() { # extra args...; sets DAEMON_PID, returns 1 on failure
    local fifo=$OUT/ready.fifo line="" deadline=$((SECONDS + 60))
    DAEMON_LOG=$OUT/daemon-$CUR_CFG-$CUR_REP.log
    rm -f "$fifo"
    mkfifo "$fifo"
    exec {READY_FD}<>"$fifo" # read-write: never blocks, and the daemon's stdout never breaks
    # (a higher descriptor limit, in case BENCH_INTERPOSE_ARGS raises --fd-cache)
    (
        ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)"
        exec "$BIN" fs mount "$BACKING" "$MNT" "${INTERPOSE_ARGS[@]}" "$@"
    ) >"$fifo" 2>"$DAEMON_LOG" &
    DAEMON_PID=$!
    while :; do
        if read -r -t 1 -u "$READY_FD" line; then
            [[ $line == "mounted "* ]] && break
        elif ! kill -0 "$DAEMON_PID" 2>/dev/null || ((SECONDS > deadline)); then
            error mount "no readiness line; daemon log: $(tail -n 5 "$DAEMON_LOG" | tr '\n' ' ')"
            abort_interpose
            return 1
        fi
    done
    if ! mounted "$MNT"; then
        error mount "readiness line printed but $MNT is not a mount point"
        abort_interpose
        return 1
    fi
    log "  $line"
}

abort_interpose() { # after a failed start
    if kill -0 "$DAEMON_PID" 2>/dev/null; then
        kill -TERM "$DAEMON_PID" 2>/dev/null || true
        wait_exit "$DAEMON_PID" 20 || { force_unmount "$MNT"; kill -KILL "$DAEMON_PID" 2>/dev/null || true; }
    fi
    wait "$DAEMON_PID" 2>/dev/null || true
    DAEMON_PID=""
    exec {READY_FD}<&-
    READY_FD=""
    force_unmount "$MNT"
}

stop_interpose() {
    local rc=0
    kill -TERM "$DAEMON_PID"
    if ! wait_exit "$DAEMON_PID" 60; then
        error unmount "daemon still running 60 s after SIGTERM; forcing"
        force_unmount "$MNT"
        kill -KILL "$DAEMON_PID" 2>/dev/null || true
    fi
    wait "$DAEMON_PID" || rc=$?
    DAEMON_PID=""
    exec {READY_FD}<&-
    READY_FD=""
    ((rc == 0)) || error unmount "daemon exited $rc after SIGTERM; log: $(tail -n 5 "$DAEMON_LOG" | tr '\n' ' ')"
    if mounted "$MNT"; then
        error unmount "$MNT still mounted after the daemon exited"
        force_unmount "$MNT"
    fi
    if grep -qE ' (ERROR|WARN) ' "$DAEMON_LOG"; then
        error daemon-log "$(grep -E ' (ERROR|WARN) ' "$DAEMON_LOG" | sed 's/\x1b\[[0-9;]*m//g' | sort | uniq -c | sort -rn | head -n 3 | tr '\n' ' ')"
    fi
}

start_bindfs() {
    # Without -f, bindfs (fuse_main) returns only once the mount exists: no waiting needed.
    if ! bindfs "$BACKING" "$MNT" 2>"$OUT/bindfs.err"; then
        error mount "bindfs failed: $(tr '\n' ' ' <"$OUT/bindfs.err")"
        return 1
    fi
    mounted "$MNT" || { error mount "bindfs returned but $MNT is not a mount point"; return 1; }
    BINDFS_PID=""
    local p want
    want=$(printf 'bindfs\0%s\0%s\0' "$BACKING" "$MNT" | od -An -tx1 | tr -d ' \n')
    for p in /proc/[0-9]*; do
        if [[ $(od -An -tx1 "$p/cmdline" 2>/dev/null | tr -d ' \n') == "$want" ]]; then
            BINDFS_PID=${p#/proc/}
            break
        fi
    done
    return 0
}

stop_bindfs() {
    umount "$MNT" || { error unmount "umount failed"; force_unmount "$MNT"; }
    if [[ -n $BINDFS_PID ]]; then
        wait_exit "$BINDFS_PID" 30 || error unmount "bindfs $BINDFS_PID did not exit after umount"
    fi
    BINDFS_PID=""
}

session() { # one configuration, one repetition: mount, all workloads, unmount
    local cfg=$1 path=$MNT pid="" c0 c1 wl wls=("${WORKLOADS[@]}")
    CUR_CFG=$cfg
    # Other work on the machine skews everything: keep the load average as evidence.
    sample session loadavg_1m "$(cut -d' ' -f1 /proc/loadavg)"
    log "rep $CUR_REP/$REPS: $cfg (load average $(cut -d' ' -f1-3 /proc/loadavg))"
    case $cfg in
    native) path=$BACKING ;;
    bindfs) start_bindfs || return 0; pid=$BINDFS_PID ;;
    interpose) start_interpose || return 0; pid=$DAEMON_PID ;;
    interpose-uring) start_interpose --io-uring || return 0; pid=$DAEMON_PID ;;
    interpose-audit)
        : >"$AUDIT_LOG"
        start_interpose --filter "audit=$AUDIT_LOG" || return 0
        pid=$DAEMON_PID
        ;;
    interpose-isolated)
        rm -rf --one-file-system "$STORE" "$BACKING/commit.dat"
        mkdir "$STORE"
        backing_state >"$OUT/backing.before"
        start_interpose --isolate "$STORE" || { rm -rf --one-file-system "$STORE"; return 0; }
        pid=$DAEMON_PID
        wls+=(isocheck commitprep)
        if ((CUR_REP % 2)); then wls+=(commit cp); else wls+=(cp commit); fi
        if ((CUR_REP == 1)); then wls+=(commitverify); fi
        ;;
    esac
    if ((CUR_REP == 1)); then
        run_workload verify "$path"
        if [[ $cfg == interpose-isolated ]]; then
            # verify's tree must not count in the store measured after meta
            iso discard "$STORE" >/dev/null 2>"$OUT/wl.err" || error verify "isolation discard: $(cat "$OUT/wl.err")"
        fi
    fi
    for wl in "${wls[@]}"; do
        [[ -n $pid ]] && c0=$(cpu_seconds "$pid")
        run_workload "$wl" "$path"
        if [[ -n $pid ]]; then
            c1=$(cpu_seconds "$pid") || { error "$wl" "daemon $pid is gone"; break; }
            sample "$wl" daemon_cpu_s "$(elapsed "$c0" "$c1")"
            if [[ $wl == meta ]]; then # right after the metadata workload
                sample daemon VmHWM_MiB "$(awk '/^VmHWM:/ { printf "%.1f", $2 / 1024 }' "/proc/$pid/status")"
                sample daemon VmRSS_MiB "$(awk '/^VmRSS:/ { printf "%.1f", $2 / 1024 }' "/proc/$pid/status")"
                sample daemon threads "$(awk '/^Threads:/ { print $2 }' "/proc/$pid/status")"
                sample daemon open_fds "$(find "/proc/$pid/fd" -mindepth 1 -maxdepth 1 | wc -l)"
            fi
        fi
    done
    if [[ -n $pid ]] && [[ -r /proc/$pid/stat ]]; then
        sample daemon cpu_total_s "$(cpu_seconds "$pid")" # read before SIGTERM / umount
    fi
    case $cfg in
    bindfs) stop_bindfs ;;
    interpose | interpose-uring) stop_interpose ;;
    interpose-audit)
        stop_interpose
        sample daemon audit_lines "$(wc -l <"$AUDIT_LOG")"
        sample daemon audit_MiB "$(du -m "$AUDIT_LOG" | cut -f1)"
        : >"$AUDIT_LOG"
        ;;
    interpose-isolated)
        stop_interpose
        # the store and what the commit workload put into BACKING
        rm -rf --one-file-system "$STORE" "$BACKING/commit.dat"
        ;;
    esac
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
export LOAD_START LOAD_END
export CONFIGS_STR="${CONFIGS[*]}" REPS QUICK RUNTIME SEQ_SIZE_MB RR_SIZE_MB FS_SIZE_MB \
    META_TOP META_SUB META_FILES META_ENTRIES TAR_SHA TAR_MB DROP_OK T_TOTAL COMMAND_LINE STAMP \
    COMMIT_SIZE_MB
export MI_NPROC MI_KERNEL MI_FS MI_CPU MI_MEM MI_DEV MI_VERSIONS MI_COMMIT MI_URING
MI_NPROC=$(nproc)
MI_KERNEL=$(uname -sr)
MI_FS="$(findmnt -no FSTYPE,SOURCE,OPTIONS -T "$BENCH_DIR" | tr -s ' ')"
MI_CPU=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
MI_MEM=$(awk '/^MemTotal:/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
MI_DEV=$(findmnt -no SOURCE -T "$BENCH_DIR")
blk=$(lsblk -ndo PKNAME "$MI_DEV" 2>/dev/null || true)
[[ -n $blk ]] || blk=$(basename "$MI_DEV")
if [[ -r /sys/block/$blk/queue/rotational ]]; then
    MI_DEV+=" (rotational=$(cat "/sys/block/$blk/queue/rotational"), read_ahead_kb=$(cat "/sys/block/$blk/queue/read_ahead_kb"), scheduler: $(cat "/sys/block/$blk/queue/scheduler"))"
fi
# shellcheck disable=SC1091
MI_URING="$URING_STATE"
MI_VERSIONS="$(fio --version), bindfs $(bindfs --version 2>&1 | awk '{ print $2; exit }'), $(. /etc/os-release && echo "$PRETTY_NAME")"
MI_COMMIT+=", mount options: ${BENCH_INTERPOSE_ARGS:-defaults}"

python3 - "$SAMPLES" "$ERRORS" <<'EOF' | tee "$REPORT"
import csv, os, statistics, sys
from collections import defaultdict

samples_path, errors_path = sys.argv[1], sys.argv[2]
env = os.environ
configs = env["CONFIGS_STR"].split()
vals = defaultdict(list)  # (config, workload, metric) -> [values]
with open(samples_path) as f:
    for row in csv.DictReader(f, delimiter="\t"):
        try:
            vals[(row["config"], row["workload"], row["metric"])].append(float(row["value"]))
        except (TypeError, ValueError):
            pass  # a failed measurement: reported under errors
errors = [line.rstrip("\n").split("\t", 3) for line in open(errors_path) if line.strip()]

def med(c, w, m):
    v = vals.get((c, w, m))
    return statistics.median(v) if v else None

def fmt(x, m=""):
    if x is None:
        return "–"
    if m.endswith("_s") or m.endswith("MiB/s") or m.endswith("MiB"):
        return f"{x:.2f}" if abs(x) < 100 else f"{x:.0f}"
    return f"{x:.0f}"

def nrep(c, w, m):
    return len(vals.get((c, w, m), []))

reps = int(env["REPS"])
print(f"# interpose file-system benchmark, {env['STAMP']}\n")
print(f"Command: `{env['COMMAND_LINE']}`\n")
print("| machine | |\n|---|---|")
for k, v in [("nproc", env["MI_NPROC"]), ("kernel", env["MI_KERNEL"]), ("CPU", env["MI_CPU"]),
             ("memory", env["MI_MEM"]), ("bench dir fs", env["MI_FS"]), ("device", env["MI_DEV"] or "?"),
             ("tools", env["MI_VERSIONS"]), ("interpose", env["MI_COMMIT"]),
             ("FUSE over io_uring", env["MI_URING"])]:
    print(f"| {k} | {v} |")
quick = env["QUICK"] == "1"
print(f"\n{'**Quick (smoke) run: small sizes, not comparable with full runs.** ' if quick else ''}"
      f"Medians of {reps} interleaved repetitions (each repetition mounts every configuration once, "
      f"round-robin, starting one later each time); measurement time {env['T_TOTAL']} s. "
      f"fio: ioengine=psync, direct=0. "
      + ("Before every workload: `sync; echo 3 > /proc/sys/vm/drop_caches` (cold caches for everyone; "
         "for `meta` only before the untar phase)." if env["DROP_OK"] == "1" else
         "**Caches could not be dropped: reads may be warm.**"))
print()
loads = [v for (c, w, m), vs in vals.items() if m == "loadavg_1m" for v in vs]
if loads:
    busy = max(loads) > 2 * int(env["MI_NPROC"])
    print(f"- load average (1, 5, 15 min) at the start {env['LOAD_START']}, at the end {env['LOAD_END']}; "
          f"1-min load at session starts: median {statistics.median(loads):.1f}, max {max(loads):.1f} "
          "(this benchmark's own I/O accounts for a few)"
          + (". **The machine was busy with other work: expect noisy numbers.**" if busy else ""))
print(f"- seqwrite: 1 file of {env['SEQ_SIZE_MB']} MiB, bs=1M, end_fsync=1 (bandwidth includes the fsync)")
print(f"- seqread: 1 file of {env['SEQ_SIZE_MB']} MiB, bs=1M, laid out once before all runs")
print(f"- randrw: bs=4k, 70% reads, numjobs=2 × {env['RR_SIZE_MB']} MiB files, {env['RUNTIME']} s time based")
print(f"- fsyncw: bs=4k random writes, fsync=1, {env['FS_SIZE_MB']} MiB file, {env['RUNTIME']} s time based")
print(f"- meta: tar -xf of {env['META_ENTRIES']} entries ({env['META_TOP']}×{env['META_SUB']} dirs × "
      f"{env['META_FILES']} files, {env['TAR_MB']} MiB tar, sha256 {env['TAR_SHA']}…), find | wc -l, du -sk, rm -rf")
iso = "interpose-isolated" in configs
if iso:
    print("- interpose-isolated: `interpose fs mount BACKING MNT --isolate STORE`, a fresh empty STORE per "
          "mount (outside BACKING, removed after it); BACKING is checked unchanged (names, sizes, modes, "
          "inodes, mtimes, ctimes) after `meta`. store: `interpose isolation status --json` after `meta` "
          "(store on disk, block data held, pending changes)")
    print(f"- commit (interpose-isolated only, after `meta`): pending changes discarded, a {env['COMMIT_SIZE_MB']} MiB "
          "file written through the mount with `dd bs=1M conv=fsync` (write_MiB/s), then, in alternating order, "
          "commit_s: `interpose isolation commit STORE; sync` (mounted: through the daemon) and cp_s: "
          "`cp` of an equally sized file from and to the bench dir, then `sync`; caches dropped before each")
print("- daemon_cpu_s: the daemon's utime+stime during the workload; VmHWM/VmRSS: /proc/PID/status right "
      "after `meta`; cpu_total_s: whole mount, read just before unmounting")

rows = [
    ("seqwrite", "MiB/s", "↑"), ("seqread", "MiB/s", "↑"), ("seqread", "warm_MiB/s", "↑"),
    ("randrw", "read_IOPS", "↑"), ("randrw", "write_IOPS", "↑"), ("randrw", "total_IOPS", "↑"),
    ("fsyncw", "IOPS", "↑"),
    ("meta", "untar_s", "↓"), ("meta", "find_s", "↓"), ("meta", "du_s", "↓"), ("meta", "rm_s", "↓"),
    ("meta", "total_s", "↓"),
]
if iso:
    rows += [("commit", "write_MiB/s", "↑"), ("commit", "commit_s", "↓"), ("commit", "cp_s", "↓")]
print("\n## Medians\n")
print("| workload | metric | " + " | ".join(configs) + " |")
print("|---|---|" + "---:|" * len(configs))
for w, m, d in rows:
    cells = []
    for c in configs:
        x = med(c, w, m)
        n = nrep(c, w, m)
        v = vals.get((c, w, m), [])
        noisy = x and len(v) > 1 and (max(v) - min(v)) / x > 0.5
        cells.append(fmt(x, m) + (" ≈" if noisy else "") + (f" (n={n})" if x is not None and n != reps else ""))
    print(f"| {w} | {m} {d} | " + " | ".join(cells) + " |")
print("\n≈: the samples spread over more than half the median (see All samples); (n=…): "
      "repetitions that produced a value, when fewer than all.")

daemons = [c for c in configs if c != "native"]
if daemons:
    print("\n## Daemon resources (medians)\n")
    print("| metric | " + " | ".join(daemons) + " |")
    print("|---|" + "---:|" * len(daemons))
    drows = [(w, "daemon_cpu_s") for w in ("seqwrite", "seqread", "randrw", "fsyncw", "meta")] + \
        ([("commit", "daemon_cpu_s")] if iso else []) + [
        ("daemon", m) for m in ("cpu_total_s", "VmHWM_MiB", "VmRSS_MiB", "threads", "open_fds",
                                "audit_lines", "audit_MiB")] + \
        ([("store", m) for m in ("store_MiB", "data_MiB", "pending_changes")] if iso else [])
    for w, m in drows:
        label = f"{w} cpu s" if m == "daemon_cpu_s" else (f"{m} after meta" if w == "store" else m)
        print(f"| {label} | " + " | ".join(fmt(med(c, w, m), m) for c in daemons) + " |")

print("\n## Disk traffic during each workload (MiB read / written, medians)\n")
print("Counters of the bench dir's block device; writes still dirty when a workload ends are not "
      "counted. Reads far above what the workload asked for mean readahead; far below, cache hits.\n")
print("| workload | " + " | ".join(configs) + " |")
print("|---|" + "---:|" * len(configs))
for w in ("seqwrite", "seqread", "randrw", "fsyncw", "meta") + (("commit", "cp") if iso else ()):
    cells = []
    for c in configs:
        r, wr = med(c, w, "dev_read_MiB"), med(c, w, "dev_write_MiB")
        cells.append("–" if r is None else f"{r:.0f} / {wr:.0f}")
    print(f"| {w} | " + " | ".join(cells) + " |")

def ratio(a, b):
    return None if a is None or b in (None, 0) else a / b

def rfmt(r):
    return "–" if r is None else f"{r:.2f}×"

print("\n## Ratios (median / median)\n")
others = [c for c in configs if c != "native"]
iso_vs = iso and "interpose" in configs  # interpose-isolated / interpose
heads = [f"{c} / native" for c in others if "native" in configs] + \
        [f"{c} / bindfs" for c in others if c.startswith("interpose") and "bindfs" in configs] + \
        (["interpose-isolated / interpose"] if iso_vs else [])
if heads:
    print("| workload | metric | " + " | ".join(heads) + " |")
    print("|---|---|" + "---:|" * len(heads))
    for w, m, d in rows:
        if w == "commit":
            continue  # interpose-isolated only: commit_s / cp_s is under Targets
        cells = []
        if "native" in configs:
            cells += [rfmt(ratio(med(c, w, m), med("native", w, m))) for c in others]
        if "bindfs" in configs:
            cells += [rfmt(ratio(med(c, w, m), med("bindfs", w, m))) for c in others if c.startswith("interpose")]
        if iso_vs:
            cells.append(rfmt(ratio(med("interpose-isolated", w, m), med("interpose", w, m))))
        print(f"| {w} | {m} {d} | " + " | ".join(cells) + " |")
    print("\n↑: higher is better, so a ratio above 1 is faster. ↓: a time, so a ratio below 1 is faster.")

print("\n## Targets\n")
print("| target | configuration | value | required | result |")
print("|---|---|---:|---:|---|")
checks = []
def check(name, cfg, r, op, limit):
    if r is None:
        checks.append((name, cfg, "–", f"{op} {limit}", "⚪ no data"))
        return
    ok = r >= limit if op == "≥" else r <= limit
    checks.append((name, cfg, f"{r:.3f}", f"{op} {limit}", "✅ pass" if ok else "❌ FAIL"))
# the targets against native and bindfs are for the non-isolated mounts; interpose-isolated has
# its own, against interpose in the same run
ips = [c for c in configs if c in ("interpose", "interpose-uring", "interpose-audit")]
if "interpose" in configs and "native" in configs:
    check("seqread vs native", "interpose", ratio(med("interpose", "seqread", "MiB/s"), med("native", "seqread", "MiB/s")), "≥", 0.9)
    check("randrw read IOPS vs native", "interpose", ratio(med("interpose", "randrw", "read_IOPS"), med("native", "randrw", "read_IOPS")), "≥", 0.9)
    x = ratio(med("interpose", "seqread", "warm_MiB/s"), med("native", "seqread", "warm_MiB/s"))
    checks.append(("seqread vs native, page cache warm, info", "interpose", "–" if x is None else f"{x:.3f}", "(≥ 0.9)",
                   "⚪ no data" if x is None else ("✅ above" if x >= 0.9 else "⚠️ below")))
if "bindfs" in configs:
    for c in ips:
        for w, m in [("seqwrite", "MiB/s"), ("seqread", "MiB/s"), ("randrw", "total_IOPS"), ("fsyncw", "IOPS")]:
            check(f"{w} {m} vs bindfs", c, ratio(med(c, w, m), med("bindfs", w, m)), "≥", 1.2)
        check("meta time vs bindfs", c, ratio(med(c, "meta", "total_s"), med("bindfs", "meta", "total_s")), "≤", 0.8)
if "native" in configs:
    for c in ips:
        check("meta time vs native", c, ratio(med(c, "meta", "total_s"), med("native", "meta", "total_s")), "≤", 1.5)
for c in ips:
    x = med(c, "daemon", "VmRSS_MiB")
    meta_ok = med(c, "meta", "total_s") is not None
    checks.append(("daemon RSS after meta (MiB)", c, fmt(x, "MiB"), "≤ 64",
                   "⚪ no data" if x is None else
                   ("⚪ meta failed: not representative" if not meta_ok else
                    ("✅ pass" if x <= 64 else "❌ FAIL"))))
    x = med(c, "daemon", "VmHWM_MiB")
    checks.append(("daemon peak RSS, info (MiB)", c, fmt(x, "MiB"), "(≤ 64)",
                   "⚪ no data" if x is None else ("✅ under" if x <= 64 else "⚠️ over")))
if "interpose" in configs and "interpose-uring" in configs:
    # the transport alone: the same mount served over io_uring and over /dev/fuse
    for w, m, better in [("meta", "total_s", "≤"), ("fsyncw", "IOPS", "≥"), ("randrw", "total_IOPS", "≥"),
                         ("seqwrite", "MiB/s", "≥")]:
        x = ratio(med("interpose-uring", w, m), med("interpose", w, m))
        checks.append((f"{w} {m}, io_uring / /dev/fuse, info", "interpose-uring", "–" if x is None else f"{x:.3f}",
                       f"({better} 1)", "⚪ no data" if x is None else
                       ("✅ better" if (x < 1 if better == "≤" else x > 1) else "⚠️ not better")))
if iso:
    c = "interpose-isolated"
    if "interpose" in configs:
        for w, m, what, limit in [("seqread", "MiB/s", "untouched file", 0.9),
                                  ("randrw", "read_IOPS", "files untouched before", 0.9),
                                  ("seqwrite", "MiB/s", "", 0.7), ("fsyncw", "IOPS", "", 0.7),
                                  ("randrw", "write_IOPS", "", 0.7)]:
            check(f"{w} {m} vs interpose" + (f" ({what})" if what else ""), c,
                  ratio(med(c, w, m), med("interpose", w, m)), "≥", limit)
        x = ratio(med(c, "seqread", "warm_MiB/s"), med("interpose", "seqread", "warm_MiB/s"))
        checks.append(("seqread vs interpose (untouched file), page cache warm, info", c,
                       "–" if x is None else f"{x:.3f}", "(≥ 0.9)",
                       "⚪ no data" if x is None else ("✅ above" if x >= 0.9 else "⚠️ below")))
        check("meta throughput vs interpose (interpose total_s / this)", c,
              ratio(med("interpose", "meta", "total_s"), med(c, "meta", "total_s")), "≥", 0.7)
    check("commit time vs cp of the same size (sync in both)", c,
          ratio(med(c, "commit", "commit_s"), med(c, "commit", "cp_s")), "≤", 1.5)
    for m, what in (("VmRSS_MiB", "daemon RSS after meta, info (MiB)"), ("VmHWM_MiB", "daemon peak RSS, info (MiB)")):
        x = med(c, "daemon", m)
        checks.append((what, c, fmt(x, "MiB"), "(≤ 64)",
                       "⚪ no data" if x is None else ("✅ under" if x <= 64 else "⚠️ over")))
for row in checks:
    print("| " + " | ".join(row) + " |")
fails = sum(1 for r in checks if "FAIL" in r[4])
print(f"\n{fails} of {sum(1 for r in checks if 'pass' in r[4] or 'FAIL' in r[4])} targets missed.")

# consistency: the metadata tree must look the same through every configuration
kbs = {c: med(c, "meta", "du_kB") for c in configs if med(c, "meta", "du_kB") is not None}
notes = []
if len(set(kbs.values())) > 1:
    notes.append("du -sk of the extracted tree differs between configurations: "
                 + ", ".join(f"{c} {v:.0f} kB" for c, v in kbs.items()))
print("\n## Errors and anomalies\n")
if not errors and not notes:
    print("None: every workload completed in every repetition, every daemon exited 0 on SIGTERM.")
for e in errors:
    rep, cfg, wl, msg = (e + ["", "", "", ""])[:4]
    print(f"- rep {rep}, {cfg}, {wl}: {msg.strip()}")
    if cfg == "bindfs" and wl == "verify" and "Mod time differs" in msg and msg.count("×") == 1:
        print("  (only mtimes: bindfs ignores tar's `utimensat(fd, NULL, [UTIME_OMIT, mtime])`, so files "
              "keep their extraction time; file contents and sizes matched)")
for n in notes:
    print(f"- {n}")

print("\n## All samples\n")
print("| workload | metric | configuration | values (in repetition order) |")
print("|---|---|---|---|")
for w, m, d in rows:
    for c in configs:
        v = vals.get((c, w, m))
        if v:
            print(f"| {w} | {m} | {c} | {', '.join(fmt(x, m) for x in v)} |")
for c in daemons:
    for m in ("VmHWM_MiB", "VmRSS_MiB", "cpu_total_s"):
        v = vals.get((c, "daemon", m))
        if v:
            print(f"| daemon | {m} | {c} | {', '.join(fmt(x, m) for x in v)} |")
for m in ("store_MiB", "data_MiB", "pending_changes"):
    v = vals.get(("interpose-isolated", "store", m))
    if v:
        print(f"| store | {m} | interpose-isolated | {', '.join(fmt(x, m) for x in v)} |")
EOF
log "report: $REPORT (samples: $SAMPLES, log: $LOG)"
