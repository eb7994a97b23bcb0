# Shared by the bench scripts (sourced). Needs BENCH_DIR, MARKER and a `log` function;
# sets LOCK (removed by the caller's cleanup) and LOCK_FD.

# One run per bench directory: another run on the same directory would delete this
# one's files. Also refuses a non-empty directory that a bench script did not make.
take_bench_lock() {
    local script=$1
    local lock_dir=/run/lock
    [[ -d $lock_dir && -w $lock_dir ]] || lock_dir=${TMPDIR:-/tmp}
    LOCK=$lock_dir/interpose-bench.$(printf '%s' "$BENCH_DIR" | md5sum | cut -c1-12).lock
    exec {LOCK_FD}>"$LOCK"
    if ! flock -n "$LOCK_FD"; then
        log "another $script run is using $BENCH_DIR (lock $LOCK held by pid $(cat "$LOCK.pid" 2>/dev/null || echo '?'))"
        LOCK="" # not ours to remove
        exit 1
    fi
    echo $$ >"$LOCK.pid"
    if [[ -e $BENCH_DIR && -n $(ls -A "$BENCH_DIR") && ! -e $MARKER ]]; then
        log "$BENCH_DIR exists and is not ours (no .interpose-bench marker): refusing to use it"
        exit 1
    fi
}

# Usage: bench_preamble NAME WHY "$@": prints the script's header comment for --help,
# refuses arguments (settings come from BENCH_* variables) and requires root (WHY says
# what for).
bench_preamble() {
    local name=$1 why=$2
    shift 2
    if [[ ${1:-} == -h || ${1:-} == --help ]]; then
        sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
        exit 0
    fi
    if (($#)); then
        echo "$name: takes no arguments (see --help); settings come from BENCH_* variables" >&2
        exit 2
    fi
    if ((EUID != 0)); then
        echo "$name: run as root ($why)" >&2
        exit 2
    fi
}

# Usage: round_robin FUNC ITEM...: runs FUNC on every ITEM once, starting one later in
# each repetition (CUR_REP, from 1), so no item always runs first.
round_robin() {
    local fn=$1
    shift
    local items=("$@") n=$# k
    for ((k = 0; k < n; k++)); do
        "$fn" "${items[(k + CUR_REP - 1) % n]}"
    done
}
