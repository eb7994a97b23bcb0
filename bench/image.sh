#!/usr/bin/env bash
# bench/image.sh: compressed-image benchmark (issue 4): `interpose image create` against
# `qemu-img convert -c -O qcow2 -o compression_type=zstd` and `zstd -T0`, and the image
# library's read speed (crates/image/examples/read_bench.rs).
#
# Run as root on Debian 12:   bench/image.sh
# It installs what it needs (qemu-utils, zstd, e2fsprogs, jq, python3), builds
# target/release/interpose and the read_bench example, makes (or reuses) the mixed image with
# bench/make-mixed-image.sh: an ext4 file system of BENCH_SIZE holding about equal parts text,
# binaries and random data, ~75% full, cached in BENCH_IMAGE_DIR. Then, in one run, on it:
#
# Creation (repetitions interleaved: each one runs the tools round-robin, starting one
# later each time; every step starts with `sync; echo 3 > /proc/sys/vm/drop_caches`, so each
# tool reads the raw image cold from disk; each step's time includes a final `sync`, so each
# pays for getting its output to disk: interpose fsyncs its output itself, qemu-img convert
# writes with cache=unsafe by default and zstd does not sync):
#   interpose   interpose image create RAW -o X.img       (defaults: 64 KiB chunks, zstd level 3,
#                                                          threads = nproc)
#   interpose-lz4  the same with --codec lz4 (LZ4 fast mode; for information, no target)
#   qemu-img    qemu-img convert -c -O qcow2 -o compression_type=zstd RAW X.qcow2
#                                                         (defaults: 64 KiB clusters, qemu's
#                                                          zstd level, i.e. zstd's default 3)
#   zstd        zstd -T0 RAW -o X.zst                     (default level 3, one worker per core)
# In the first repetition, untimed, every output is checked against RAW (interpose image
# verify + extract | cmp, qemu-img compare, zstd -dc | cmp).
#
# Library reads (the image interpose made; same repetitions, rows round-robin), each row one
# `read_bench IMAGE --threads T --span S --seconds BENCH_SECONDS MODE` run:
#   random4k  warm cache (sized to hold every non-zero chunk), random 4 KiB-aligned 4 KiB
#             reads; reads/s of all threads
#   seq       each thread reads its part of the image in 1 MiB reads (whole chunks), the image
#             file in the page cache; GB/s (10^9 bytes) of decompressed output
#   span image: the whole image (zero chunks included); span data: only chunks holding data
# Rows: random4k and seq at 2 threads (span image: the targets; span data: stricter, for
# information) and at 1 thread (span image, reference); seq-2t-data and random4k-2t-data again
# on the LZ4 image (for information).
#
# Environment:
#   BENCH_SIZE=1G                   size of the mixed image (e.g. 128M for a smoke run)
#   BENCH_REPS=5                    repetitions
#   BENCH_SECONDS=5                 duration of each read_bench run
#   BENCH_DIR=/var/tmp/interpose-image-bench  scratch directory (removed on exit)
#   BENCH_IMAGE_DIR=/var/tmp/interpose-bench-images  where the mixed image is kept between runs
#   BENCH_BIN=PATH                  use this interpose binary instead of building one
#   BENCH_READ_BENCH=PATH           use this read_bench binary instead of building one
# Output: a markdown report on stdout and in bench/out/image-<date>.md (raw samples in .tsv,
# the progress log in .log). Missed targets are marked, never an error exit.
set -euo pipefail

umask 022
export LC_ALL=C

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/lib.sh
source "$REPO/bench/lib.sh"
COMMAND_LINE=""
for v in BENCH_SIZE BENCH_REPS BENCH_SECONDS BENCH_DIR BENCH_IMAGE_DIR BENCH_BIN BENCH_READ_BENCH; do
    if [[ -n ${!v:-} ]]; then COMMAND_LINE+="$(printf '%s=%q' "$v" "${!v}") "; fi
done
COMMAND_LINE+="$0${*:+ $*}"

bench_preamble image.sh "dropping caches, installing packages" "$@"

SIZE_ARG=${BENCH_SIZE:-1G}
SIZE=$(numfmt --from=iec "$SIZE_ARG" 2>/dev/null) || { echo "image.sh: BENCH_SIZE=$SIZE_ARG is not a size (1G, 128M, ...)" >&2; exit 2; }
REPS=${BENCH_REPS:-5}
SECONDS_PER_READ=${BENCH_SECONDS:-5}
[[ $REPS =~ ^[1-9][0-9]*$ ]] || { echo "image.sh: BENCH_REPS must be a positive integer" >&2; exit 2; }
[[ $SECONDS_PER_READ =~ ^[1-9][0-9]*$ ]] || { echo "image.sh: BENCH_SECONDS must be a positive integer" >&2; exit 2; }

BENCH_DIR=$(realpath -m "${BENCH_DIR:-/var/tmp/interpose-image-bench}")
IMAGE_DIR=$(realpath -m "${BENCH_IMAGE_DIR:-/var/tmp/interpose-bench-images}")
OUT=$BENCH_DIR/work
MARKER=$BENCH_DIR/.interpose-bench
STAMP=$(date +%Y-%m-%d-%H%M%S)
RESULTS=$REPO/bench/out
REPORT=$RESULTS/image-$STAMP.md
SAMPLES=$RESULTS/image-$STAMP.tsv
LOG=$RESULTS/image-$STAMP.log

mkdir -p "$RESULTS"
: >"$LOG"
log() { printf '%s %s\n' "$(date +%T)" "$*" | tee -a "$LOG" >&2; }

# ---------------------------------------------------------------- cleanup (also on Ctrl-C)

CREATED_DIR=0
LOCK=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    set +e
    ((CREATED_DIR)) && rm -rf --one-file-system "$BENCH_DIR"
    [[ -n $LOCK ]] && rm -f "$LOCK" "$LOCK.pid"
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM HUP

# ---------------------------------------------------------------- one run per bench dir

take_bench_lock bench/image.sh

# ---------------------------------------------------------------- dependencies and build

need_pkgs=()
command -v qemu-img >/dev/null || need_pkgs+=(qemu-utils)
command -v zstd >/dev/null || need_pkgs+=(zstd)
command -v mke2fs >/dev/null || need_pkgs+=(e2fsprogs)
command -v jq >/dev/null || need_pkgs+=(jq)
command -v python3 >/dev/null || need_pkgs+=(python3)
install_packages "${need_pkgs[@]}"

if [[ -z ${BENCH_BIN:-} || -z ${BENCH_READ_BENCH:-} ]]; then
    [[ -x $HOME/.cargo/bin/cargo ]] && PATH=$HOME/.cargo/bin:$PATH
    command -v cargo >/dev/null || { log "cargo not found: install Rust 1.85 or newer (rustup), or set BENCH_BIN and BENCH_READ_BENCH"; exit 1; }
fi
if [[ -n ${BENCH_BIN:-} ]]; then
    BIN=$(realpath "$BENCH_BIN")
else
    log "building interpose (cargo build --release)"
    (cd "$REPO" && cargo build --release --locked -p interpose 2>&1 | tail -n 3 >&2)
    BIN=$REPO/target/release/interpose
fi
if [[ -n ${BENCH_READ_BENCH:-} ]]; then
    RB=$(realpath "$BENCH_READ_BENCH")
else
    log "building read_bench (cargo build --release -p interpose-image --example read_bench)"
    (cd "$REPO" && cargo build --release --locked -p interpose-image --example read_bench 2>&1 | tail -n 3 >&2)
    RB=$REPO/target/release/examples/read_bench
fi
[[ -x $BIN ]] || { log "no interpose binary at $BIN"; exit 1; }
[[ -x $RB ]] || { log "no read_bench binary at $RB"; exit 1; }
# What is measured, noted now: the tree may change while the benchmark runs.
MI_COMMIT="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [[ -n $(git -C "$REPO" status --porcelain -- 'crates/*/src' crates/image/examples Cargo.toml Cargo.lock 2>/dev/null || true) ]]; then
    MI_COMMIT+=" (with uncommitted source changes)"
fi
[[ -n ${BENCH_BIN:-} ]] && MI_COMMIT="$BIN (BENCH_BIN; the tree is at $MI_COMMIT)"
MI_COMMIT+=", interpose sha256 $(sha256sum "$BIN" | cut -c1-16), read_bench sha256 $(sha256sum "$RB" | cut -c1-16)"

# ---------------------------------------------------------------- the mixed image

RAW=$IMAGE_DIR/mixed-$SIZE_ARG.ext4
log "mixed image $RAW (made once, then reused)"
"$REPO/bench/make-mixed-image.sh" "$RAW" "$SIZE" 2>&1 | tee -a "$LOG" >&2
[[ -s $RAW ]] || { log "no mixed image at $RAW"; exit 1; }

# ---------------------------------------------------------------- scratch directory

if [[ -e $BENCH_DIR ]]; then
    rm -rf --one-file-system "$BENCH_DIR" # ours (marker checked above) and left by a killed run
fi
mkdir -p "$BENCH_DIR"
CREATED_DIR=1
: >"$MARKER"
mkdir -p "$OUT"
# Private copies: a rebuild during the run must not change what is measured.
cp "$BIN" "$OUT/interpose"
cp "$RB" "$OUT/read_bench"
BIN=$OUT/interpose
RB=$OUT/read_bench

need_mb=$((SIZE * 5 / 2 / 1048576 + 512)) # four outputs (each well under the raw size) + extract check
avail_mb=$(($(stat -f -c '%a * %S' "$BENCH_DIR") / 1048576))
if ((avail_mb < need_mb)); then
    log "$BENCH_DIR has ${avail_mb} MiB free; the benchmark needs about ${need_mb} MiB"
    exit 1
fi

DROP_OK=1
drop_caches() {
    sync
    if ! echo 3 >/proc/sys/vm/drop_caches 2>/dev/null; then
        ((DROP_OK)) && log "WARNING: cannot drop caches; the raw image is not read cold"
        DROP_OK=0
    fi
}

# ---------------------------------------------------------------- measurement helpers

printf 'rep\tconfig\tmetric\tvalue\n' >"$SAMPLES"
ERRORS=$OUT/errors.tsv
: >"$ERRORS"
CUR_REP=0 CUR_CFG=""
sample() { printf '%s\t%s\t%s\t%s\n' "$CUR_REP" "$CUR_CFG" "$1" "$2" >>"$SAMPLES"; }
error() {
    printf '%s\t%s\t%s\n' "$CUR_REP" "$CUR_CFG" "$1" >>"$ERRORS"
    log "ERROR rep $CUR_REP $CUR_CFG: $1"
}

TOOLS=(interpose interpose-lz4 qemu-img zstd)
declare -A OUTFILE=([interpose]=$OUT/x.img [interpose-lz4]=$OUT/x-lz4.img [qemu-img]=$OUT/x.qcow2 [zstd]=$OUT/x.zst)
tool_cmd() { # the command line of a tool, in CMD
    case $1 in
    interpose) CMD=("$BIN" image create "$RAW" -o "${OUTFILE[interpose]}") ;;
    interpose-lz4) CMD=("$BIN" image create "$RAW" -o "${OUTFILE[interpose-lz4]}" --codec lz4) ;;
    qemu-img) CMD=(qemu-img convert -c -O qcow2 -o compression_type=zstd "$RAW" "${OUTFILE[qemu-img]}") ;;
    zstd) CMD=(zstd -q -T0 "$RAW" -o "${OUTFILE[zstd]}") ;;
    esac
}

create_step() { # tool: one timed creation, caches dropped first, sync included
    local tool=$1 t errf=$OUT/step.err
    CUR_CFG=$tool
    tool_cmd "$tool"
    rm -f "${OUTFILE[$tool]}"
    drop_caches
    sample loadavg_1m "$(cut -d' ' -f1 /proc/loadavg)"
    local TIMEFORMAT='%3R %3U %3S' rc=0
    set +e
    t=$({ time { "${CMD[@]}" >"$OUT/step.out" 2>"$errf" && sync; }; } 2>&1)
    rc=$?
    set -e
    if ((rc)) || [[ ! -s ${OUTFILE[$tool]} ]]; then
        error "exit $rc: $(tail -n 3 "$errf" | tr '\n' ' ')"
        return 0
    fi
    local real user sys
    read -r real user sys <<<"$(tail -n 1 <<<"$t")"
    sample seconds "$real"
    sample cpu_seconds "$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.3f", u + s }')"
    sample output_bytes "$(stat -c %s "${OUTFILE[$tool]}")"
    log "rep $CUR_REP/$REPS $tool: ${real}s (user $user, sys $sys), $(stat -c %s "${OUTFILE[$tool]}") bytes"
}

check_outputs() { # untimed, first repetition: every output reproduces RAW
    for CUR_CFG in interpose interpose-lz4; do
        if ! "$BIN" image verify "${OUTFILE[$CUR_CFG]}" >"$OUT/verify.out" 2>&1; then
            error "image verify: $(tail -n 3 "$OUT/verify.out" | tr '\n' ' ')"
        elif ! "$BIN" image extract "${OUTFILE[$CUR_CFG]}" -o - 2>"$OUT/extract.err" | cmp -s - "$RAW"; then
            error "image extract differs from the raw image $(tr '\n' ' ' <"$OUT/extract.err")"
        fi
    done
    CUR_CFG=qemu-img
    qemu-img compare -q -f raw -F qcow2 "$RAW" "${OUTFILE[qemu-img]}" || error "qemu-img compare: the qcow2 differs from the raw image"
    CUR_CFG=zstd
    zstd -q -dc "${OUTFILE[zstd]}" | cmp -s - "$RAW" || error "zstd -dc differs from the raw image"
    log "rep 1: outputs checked against the raw image"
}

# read rows: name mode threads span [image: zstd (default) or lz4]
ROWS=(
    "random4k-2t random4k 2 image"
    "random4k-2t-data random4k 2 data"
    "random4k-1t random4k 1 image"
    "seq-2t seq 2 image"
    "seq-2t-data seq 2 data"
    "seq-1t seq 1 image"
    "random4k-2t-data-lz4 random4k 2 data lz4"
    "seq-2t-data-lz4 seq 2 data lz4"
)
read_step() { # row
    local name mode threads span codec json img
    read -r name mode threads span codec <<<"$1"
    img=$IMG
    [[ ${codec:-} == lz4 ]] && img=$IMG_LZ4
    CUR_CFG=$name
    sample loadavg_1m "$(cut -d' ' -f1 /proc/loadavg)"
    if ! json=$("$RB" "$img" --threads "$threads" --span "$span" --seconds "$SECONDS_PER_READ" "$mode" 2>"$OUT/rb.err"); then
        error "read_bench: $(tail -n 3 "$OUT/rb.err" | tr '\n' ' ')"
        return 0
    fi
    sample rate "$(jq -r .rate <<<"$json")"
    sample ops "$(jq -r .ops <<<"$json")"
    sample warmup_seconds "$(jq -r .warmup_seconds <<<"$json")"
    ((CUR_REP == 1)) && printf '%s\t%s\n' "$name" "$json" >>"$OUT/rb-first.tsv"
    log "rep $CUR_REP/$REPS $name: $(jq -r '"\(.rate) \(.rate_unit)"' <<<"$json")"
}

# ---------------------------------------------------------------- the runs

log "bench dir $BENCH_DIR ($(findmnt -no FSTYPE -T "$BENCH_DIR")); raw image $RAW ($SIZE bytes); reps=$REPS"
RAW_SHA=$(sha256sum "$RAW" | cut -c1-16)
RAW_INFO=$(cat "$RAW.info" 2>/dev/null || echo "(no $RAW.info)")
T_START=$SECONDS
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
for ((rep = 1; rep <= REPS; rep++)); do
    CUR_REP=$rep
    round_robin create_step "${TOOLS[@]}"
    ((rep == 1)) && check_outputs
done
# The image the reads use: interpose's output of the last repetition (kept apart, so nothing
# else touches it).
IMG=$OUT/read.img
CUR_CFG=interpose
[[ -s ${OUTFILE[interpose]} ]] || "$BIN" image create "$RAW" -o "${OUTFILE[interpose]}" >/dev/null
mv "${OUTFILE[interpose]}" "$IMG"
IMG_LZ4=$OUT/read-lz4.img
[[ -s ${OUTFILE[interpose-lz4]} ]] || "$BIN" image create "$RAW" -o "${OUTFILE[interpose-lz4]}" --codec lz4 >/dev/null
mv "${OUTFILE[interpose-lz4]}" "$IMG_LZ4"
"$BIN" image info --json "$IMG" >"$OUT/info.json"
QCOW_CLUSTER=$( [[ -s ${OUTFILE[qemu-img]} ]] && qemu-img info --output=json "${OUTFILE[qemu-img]}" | jq -r '."cluster-size"' || echo "?")
rm -f "${OUTFILE[qemu-img]}" "${OUTFILE[zstd]}"
for ((rep = 1; rep <= REPS; rep++)); do
    CUR_REP=$rep
    round_robin read_step "${ROWS[@]}"
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
MI_VERSIONS="$(qemu-img --version | head -n 1), zstd $(zstd --version | grep -o 'v[0-9.]*' | head -n 1), $(mke2fs -V 2>&1 | head -n 1), $(. /etc/os-release && echo "$PRETTY_NAME")"
export LOAD_START LOAD_END REPS SIZE SIZE_ARG SECONDS_PER_READ DROP_OK T_TOTAL COMMAND_LINE STAMP \
    MI_NPROC MI_KERNEL MI_CPU MI_MEM MI_FS MI_VERSIONS MI_COMMIT RAW RAW_SHA RAW_INFO QCOW_CLUSTER

python3 - "$SAMPLES" "$ERRORS" "$OUT/info.json" "$OUT/rb-first.tsv" <<'EOF' | tee "$REPORT"
import csv, json, os, statistics, sys
from collections import defaultdict

samples_path, errors_path, info_path, rb_path = sys.argv[1:5]
env = os.environ
vals = defaultdict(list)  # (config, metric) -> [values], in repetition order
with open(samples_path) as f:
    for row in csv.DictReader(f, delimiter="\t"):
        try:
            vals[(row["config"], row["metric"])].append(float(row["value"]))
        except (TypeError, ValueError):
            pass
errors = [line.rstrip("\n").split("\t", 2) for line in open(errors_path) if line.strip()]
try:
    info = json.load(open(info_path))
except (OSError, ValueError):
    info = {}
first = {}
if os.path.exists(rb_path):
    for line in open(rb_path):
        name, js = line.rstrip("\n").split("\t", 1)
        first[name] = json.loads(js)

def med(c, m):
    v = vals.get((c, m))
    return statistics.median(v) if v else None

def ratio(a, b):
    return None if a is None or not b else a / b

size = int(env["SIZE"])
reps = int(env["REPS"])
print(f"# interpose image benchmark, {env['STAMP']}\n")
print(f"Command: `{env['COMMAND_LINE']}`\n")
print("| machine | |\n|---|---|")
for k, v in [("nproc", env["MI_NPROC"]), ("CPU", env["MI_CPU"]), ("kernel", env["MI_KERNEL"]),
             ("memory", env["MI_MEM"]), ("file systems", env["MI_FS"]), ("tools", env["MI_VERSIONS"]),
             ("interpose", env["MI_COMMIT"])]:
    print(f"| {k} | {v} |")

print(f"\n**Raw image**: `{env['RAW']}`, {size} bytes ({env['SIZE_ARG']}), sha256 {env['RAW_SHA']}…, made by "
      "bench/make-mixed-image.sh (ext4 from `mke2fs -d`; its text and binaries come from this "
      "machine's packages, so the image differs between machines).")
for line in env["RAW_INFO"].splitlines():
    print(f"- {line}")
ch = info.get("chunks", {})
if ch:
    print(f"- as interpose stores it ({info.get('chunk_size', 0) >> 10} KiB chunks): {ch.get('total')} chunks, "
          f"{ch.get('zero')} zero, {ch.get('raw')} stored raw (incompressible), {ch.get('compressed')} compressed")

loads = [v for (c, m), vs in vals.items() if m == "loadavg_1m" for v in vs]
busy = bool(loads) and max(loads) > int(env["MI_NPROC"])
print(f"\nMedians of {reps} repetition{'s' if reps != 1 else ''}; measurement time {env['T_TOTAL']} s. Load average (1, 5, 15 min) "
      f"at the start {env['LOAD_START']}, at the end {env['LOAD_END']}"
      + (f"; 1-min load before steps: median {statistics.median(loads):.1f}, max {max(loads):.1f}" if loads else "")
      + (". **The machine was busy with other work: expect noisy numbers.**" if busy else "."))

print("\n## Creation\n")
print("Repetitions interleaved (the tools round-robin, starting one later each repetition). "
      + ("Before each step `sync; echo 3 > /proc/sys/vm/drop_caches`: every tool reads the raw image "
         "cold. " if env["DROP_OK"] == "1" else "**Caches could not be dropped: the raw image was read warm.** ")
      + "Each step's time includes a `sync` after the tool exits (interpose fsyncs its output; "
      "qemu-img convert writes with cache=unsafe and zstd without syncing, so the `sync` is where "
      "they pay for it). Outputs written to the same disk. "
      f"qcow2 cluster size: {env['QCOW_CLUSTER']} bytes (qemu's default, 64 KiB; qemu sets no zstd "
      "level, so zstd's default 3 applies); interpose: default options (64 KiB chunks, level 3, "
      f"{env['MI_NPROC']} compression threads); zstd: level 3, -T0 ({env['MI_NPROC']} workers). "
      "In the first repetition every output was checked against the raw image (interpose image verify "
      "and extract | cmp, qemu-img compare, zstd -dc | cmp).\n")
cmds = {
    "interpose": "interpose image create RAW -o X.img",
    "interpose-lz4": "interpose image create RAW -o X.img --codec lz4",
    "qemu-img": "qemu-img convert -c -O qcow2 -o compression_type=zstd RAW X.qcow2",
    "zstd": "zstd -T0 RAW -o X.zst",
}
print("| tool | command | seconds ↓ | MB/s of raw input ↑ | CPU s (user+sys) | output bytes ↓ | ratio raw/output ↑ |")
print("|---|---|---:|---:|---:|---:|---:|")
for t, c in cmds.items():
    s, cpu, b = med(t, "seconds"), med(t, "cpu_seconds"), med(t, "output_bytes")
    n = len(vals.get((t, "seconds"), []))
    print(f"| {t} | `{c}` | " + ("–" if s is None else f"{s:.3f}" + (f" (n={n})" if n != reps else ""))
          + " | " + ("–" if not s else f"{size / 1e6 / s:.0f}")
          + " | " + ("–" if cpu is None else f"{cpu:.2f}")
          + " | " + ("–" if b is None else f"{b:.0f}")
          + " | " + ("–" if not b else f"{size / b:.3f}") + " |")

print("\n## Library reads\n")
print(f"`read_bench` (crates/image/examples/read_bench.rs) on the image interpose made, {env['SECONDS_PER_READ']} s "
      "per run, rows round-robin in each repetition. random4k: the chunk cache sized to hold every "
      "non-zero chunk, each warmed by one read first, then 4 KiB reads at random 4 KiB-aligned offsets. "
      "seq: each thread reads its part of the image (1/threads) in 1 MiB reads (whole chunks, "
      "decoded straight into the buffer), over and over; the image file in the page cache (one "
      "untimed pass first). span image: the whole image, zero chunks included; span data: only "
      "chunks with stored data (stricter). GB = 10^9 bytes.\n")
rows = [("random4k-2t", "random4k", 2, "image", "reads/s"), ("random4k-2t-data", "random4k", 2, "data", "reads/s"),
        ("random4k-1t", "random4k", 1, "image", "reads/s"), ("seq-2t", "seq", 2, "image", "GB/s"),
        ("seq-2t-data", "seq", 2, "data", "GB/s"), ("seq-1t", "seq", 1, "image", "GB/s"),
        ("random4k-2t-data-lz4", "random4k", 2, "data, LZ4 image", "reads/s"),
        ("seq-2t-data-lz4", "seq", 2, "data, LZ4 image", "GB/s")]

def rfmt(x, unit):
    if x is None:
        return "–"
    return f"{x:,.0f}" if unit == "reads/s" else f"{x:.3f}"

print("| mode | threads | span | median | unit | notes | samples |")
print("|---|---:|---|---:|---|---|---|")
for name, mode, th, span, unit in rows:
    x = med(name, "rate")
    f = first.get(name, {})
    if mode == "random4k" and f:
        note = (f"working set {f['working_set_bytes'] / 2**20:.0f} MiB"
                + (f" ({f['working_set_zero_fraction'] * 100:.0f}% in zero chunks)" if f.get("working_set_zero_fraction") else "")
                + (" **restricted to fit the cache**" if f.get("working_set_restricted") else "")
                + f", {f['cached_chunks']} chunks cached")
    elif f:
        note = f"{f['pass_bytes'] / 2**20:.0f} MiB per pass; image {f['image_zero_fraction'] * 100:.0f}% zero chunks"
    else:
        note = ""
    samples = ", ".join(rfmt(v, unit) for v in vals.get((name, "rate"), []))
    print(f"| {mode} | {th} | {span} | {rfmt(x, unit)} | {unit} | {note} | {samples} |")

print("\n## Targets (issue 4)\n")
print("| target | value | required | result |")
print("|---|---:|---:|---|")

def check(name, value, op, limit, fmt):
    if value is None:
        res = "⚪ no data"
        v = "–"
    else:
        ok = value <= limit if op == "≤" else value >= limit
        res = "✅ met" if ok else "❌ missed"
        v = fmt(value)
    print(f"| {name} | {v} | {op} {fmt(limit)} | {res} |")

x2 = lambda v: f"{v:.3f}"
check("creation time, interpose / qemu-img", ratio(med("interpose", "seconds"), med("qemu-img", "seconds")), "≤", 0.5, x2)
check("output size, interpose / qcow2-zstd", ratio(med("interpose", "output_bytes"), med("qemu-img", "output_bytes")), "≤", 1.0, x2)
check("random 4 KiB reads/s, warm cache, 2 threads", med("random4k-2t", "rate"), "≥", 1_000_000, lambda v: f"{v:,.0f}")
check("sequential GB/s, 2 threads", med("seq-2t", "rate"), "≥", 2.0, x2)
print()
print("For information (no target):\n")
print("| measure | value |")
print("|---|---:|")
for name, v, f in [
    ("creation time, interpose / zstd -T0", ratio(med("interpose", "seconds"), med("zstd", "seconds")), x2),
    ("creation time, interpose --codec lz4 / qemu-img", ratio(med("interpose-lz4", "seconds"), med("qemu-img", "seconds")), x2),
    ("output size, interpose --codec lz4 / qcow2-zstd", ratio(med("interpose-lz4", "output_bytes"), med("qemu-img", "output_bytes")), x2),
    ("output size, interpose --codec lz4 / interpose (zstd)", ratio(med("interpose-lz4", "output_bytes"), med("interpose", "output_bytes")), x2),
    ("sequential GB/s, 2 threads, data chunks only, LZ4 / zstd image", ratio(med("seq-2t-data-lz4", "rate"), med("seq-2t-data", "rate")), x2),
    ("output size, interpose / zstd -T0", ratio(med("interpose", "output_bytes"), med("zstd", "output_bytes")), x2),
    ("creation time, zstd -T0 / qemu-img", ratio(med("zstd", "seconds"), med("qemu-img", "seconds")), x2),
    ("random 4 KiB reads/s, 2 threads, data chunks only (vs ≥ 1,000,000)", med("random4k-2t-data", "rate"), lambda v: f"{v:,.0f}"),
    ("sequential GB/s, 2 threads, data chunks only (vs ≥ 2)", med("seq-2t-data", "rate"), x2),
    ("random 4 KiB reads/s, 2 threads / 1 thread", ratio(med("random4k-2t", "rate"), med("random4k-1t", "rate")), x2),
    ("sequential GB/s, 2 threads / 1 thread", ratio(med("seq-2t", "rate"), med("seq-1t", "rate")), x2),
]:
    print(f"| {name} | {'–' if v is None else f(v)} |")

print("\n## Errors and anomalies\n")
if not errors:
    print("None: every step completed in every repetition and every output matched the raw image.")
for e in errors:
    rep, cfg, msg = (e + ["", "", ""])[:3]
    print(f"- rep {rep}, {cfg}: {msg.strip()}")

print("\n## All creation samples\n")
print("| tool | metric | values (in repetition order) |")
print("|---|---|---|")
for t in cmds:
    for m in ("seconds", "cpu_seconds", "output_bytes"):
        v = vals.get((t, m))
        if v:
            print(f"| {t} | {m} | {', '.join(f'{x:.3f}' if m != 'output_bytes' else f'{x:.0f}' for x in v)} |")
EOF
log "report: $REPORT (samples: $SAMPLES, log: $LOG)"
