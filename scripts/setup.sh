#!/usr/bin/env bash
# Installs what interpose needs on Debian 12 (as root) and builds it in release mode.
# Idempotent: packages already present are not reinstalled.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(fuse3 attr acl libcap2-bin sqlite3 git python3 jq util-linux e2fsprogs tar coreutils findutils procps strace make gcc
    nbdkit libnbd-bin gddrescue zstd qemu-utils python3-zstandard b3sum python3-libnbd systemd)
if [[ "${INTERPOSE_BENCH_DEPS:-0}" == 1 ]]; then
    APT_PACKAGES+=(fio bindfs)
fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
    echo "setup: cargo not found; install Rust (1.85 or newer) with rustup first" >&2
    exit 1
fi
[[ -e /dev/fuse ]] || { echo "setup: /dev/fuse is missing (modprobe fuse)" >&2; exit 1; }

cargo build --release --locked -q -p interpose
echo "setup: built $(pwd)/target/release/interpose" >&2
