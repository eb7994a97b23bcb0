#!/bin/bash
# A/B of two interpose binaries on fsync-bound writes over FUSE-over-io_uring: fio 4 KiB
# random writes with an fsync after each, 10 s per run on a fresh mount in /var/tmp,
# alternating which binary goes first. Prints IOPS per run and the medians.
#   bench/uring-fsync-ab.sh OLD_BINARY NEW_BINARY [ROUNDS]
# Needs root, fio, and a kernel with /sys/module/fuse/parameters/enable_uring (turned on
# for the run and put back afterwards).
set -euo pipefail
old=$1 new=$2 rounds=${3:-5}
switch=/sys/module/fuse/parameters/enable_uring
was=$(cat "$switch")
echo Y >"$switch"
trap 'echo "$was" >"$switch"' EXIT
run() {
    local bin=$1 d pid
    d=$(mktemp -d /var/tmp/uring-fsync-ab.XXXXXX)
    mkdir "$d/b" "$d/m"
    "$bin" fs mount "$d/b" "$d/m" --io-uring >"$d/out" 2>"$d/err" &
    pid=$!
    # The readiness line says the mount serves.
    for _ in $(seq 200); do grep -qs '^mounted' "$d/out" && break; sleep 0.05; done
    fio --name=f --directory="$d/m" --rw=randwrite --bs=4k --size=64m --fsync=1 \
        --time_based --runtime=10 --output-format=json 2>/dev/null |
        python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["write"]["iops"]))'
    kill -INT "$pid"
    wait "$pid" || true
    rm -rf "$d"
}
declare -a a b
for r in $(seq "$rounds"); do
    if ((r % 2)); then
        a+=("$(run "$old")"); b+=("$(run "$new")")
    else
        b+=("$(run "$new")"); a+=("$(run "$old")")
    fi
    echo "round $r: old ${a[-1]} new ${b[-1]} IOPS"
done
median() { printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
echo "median: old $(median "${a[@]}") new $(median "${b[@]}") IOPS"
