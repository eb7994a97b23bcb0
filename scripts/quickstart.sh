#!/usr/bin/env bash
# Quick start: install, build, and mount an audited view of a demo directory.
# The audit log streams to this terminal; Ctrl-C unmounts cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

demo="${INTERPOSE_DEMO_DIR:-/tmp/interpose-demo}"
mkdir -p "$demo/data/docs" "$demo/view"
[[ -e "$demo/data/README.txt" ]] || {
    echo "This directory is seen through interpose at $demo/view." > "$demo/data/README.txt"
    printf 'line %s\n' $(seq 1 100) > "$demo/data/docs/numbers.txt"
}
if mountpoint -q "$demo/view"; then
    target/release/interpose fs unmount "$demo/view" || umount -l "$demo/view"
fi

cat >&2 <<MSG
interpose: mounting $demo/data at $demo/view with the audit filter.
  Try in another terminal:   ls -l $demo/view; cat $demo/view/README.txt; echo hi > $demo/view/new.txt
  Each operation prints one JSON line here. Ctrl-C unmounts.
MSG
exec target/release/interpose fs mount "$demo/data" "$demo/view" --filter audit=-
