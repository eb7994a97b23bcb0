# Shared by the bench scripts (sourced). Needs BENCH_DIR, MARKER, REPO and a `log` function;
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

mounted() { # is $1 a mount point? (reads mountinfo: never touches a possibly hung mount)
    awk -v m="$1" '$5 == m { found = 1 } END { exit !found }' /proc/self/mountinfo
}

force_unmount() { # $1: mount point
    local mp=$1 minor
    mounted "$mp" || return 0
    umount "$mp" 2>/dev/null && return 0
    # A FUSE daemon that no longer answers: abort its connection, then detach.
    minor=$(awk -v m="$mp" '$5 == m { split($3, d, ":"); print d[2]; exit }' /proc/self/mountinfo)
    if [[ -n $minor && -w /sys/fs/fuse/connections/$minor/abort ]]; then
        echo 1 >"/sys/fs/fuse/connections/$minor/abort" 2>/dev/null || true
    fi
    umount "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null || true
}

wait_exit() { # $1: pid, $2: timeout seconds; 0 when it has exited
    timeout "$2" tail --pid="$1" -s 0.05 -f /dev/null 2>/dev/null
    ! kill -0 "$1" 2>/dev/null
}

# Usage: install_packages PKG...: installs the Debian packages given (duplicates allowed),
# if any.
install_packages() {
    (($#)) || return 0
    local pkgs
    read -r -a pkgs <<<"$(printf '%s\n' "$@" | sort -u | tr '\n' ' ')"
    log "installing ${pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
}

# Sets BIN: BENCH_BIN if given, else target/release/interpose built from REPO now.
interpose_binary() {
    if [[ -n ${BENCH_BIN:-} ]]; then
        BIN=$(realpath "$BENCH_BIN")
    else
        [[ -x $HOME/.cargo/bin/cargo ]] && PATH=$HOME/.cargo/bin:$PATH
        command -v cargo >/dev/null || { log "cargo not found: install Rust 1.85 or newer (rustup), or set BENCH_BIN"; exit 1; }
        log "building interpose (cargo build --release)"
        (cd "$REPO" && cargo build --release --locked -p interpose 2>&1 | tail -n 3 >&2)
        BIN=$REPO/target/release/interpose
    fi
    [[ -x $BIN ]] || { log "no interpose binary at $BIN"; exit 1; }
}
