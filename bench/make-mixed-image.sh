#!/usr/bin/env bash
# bench/make-mixed-image.sh: builds the "mixed image" bench/image.sh measures: a raw ext4 file
# system image holding roughly equal parts text, binaries and random data, about 75% full.
#
# Usage:   bench/make-mixed-image.sh OUT [SIZE]        (SIZE: 1G by default; 128M, 2G, bytes...)
# OUT is kept: when it exists already, nothing is rebuilt (delete it to rebuild). A build goes to
# OUT.partial-PID and is renamed into place only when complete; OUT.info says what is in it.
#
# Made with `mke2fs -t ext4 -d DIR` (no mounting, no root needed). DIR is filled, in one
# interleaved sequence (so the three kinds alternate along the image), with:
#   text      decompressed man pages, plain files of /usr/share/doc, /usr/include headers,
#             Python and Perl sources (taken round-robin from these, sorted by path); when the
#             machine has too little, generated text (fixed seed) makes up the rest
#   binaries  ELF files of /usr/bin, /usr/sbin, /usr/libexec and /usr/lib/x86_64-linux-gnu
#             (round-robin, sorted by path, files over 32 MiB skipped)
#   random    files of SHAKE-256 output (fixed seeds, sizes 4 KiB to 4 MiB from a fixed seed)
# each about a third of 76% of the empty file system's free blocks (counted in 4 KiB blocks).
#
# Determinism: the random files, the generated text, the file names, the file system UUID and
# hash seed, and every file's mode, owner and mtime are fixed. The text and binaries come from
# this machine's installed packages, so the image differs between machines (and after package
# updates); so do the inode change/creation times mke2fs 1.47.0 takes from the clock (a few
# bytes per inode). Sizes and the mix are what matter for bench/image.sh.
#
# Needs: mke2fs (e2fsprogs), python3, coreutils.
set -euo pipefail
umask 022
export LC_ALL=C

if [[ ${1:-} == -h || ${1:-} == --help || $# -lt 1 || $# -gt 2 ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    [[ ${1:-} == -h || ${1:-} == --help ]] && exit 0
    exit 2
fi
OUT=$1
SIZE_ARG=${2:-1G}
SIZE=$(numfmt --from=iec "$SIZE_ARG" 2>/dev/null) || { echo "make-mixed-image.sh: SIZE $SIZE_ARG: not a size (e.g. 1G, 128M)" >&2; exit 2; }
if ((SIZE < 32 * 1048576 || SIZE % 4096)); then
    echo "make-mixed-image.sh: SIZE must be at least 32M and a multiple of 4 KiB" >&2
    exit 2
fi

if [[ -s $OUT ]]; then
    if [[ $(stat -c %s "$OUT") != "$SIZE" ]]; then
        echo "make-mixed-image.sh: $OUT exists with $(stat -c %s "$OUT") bytes, not $SIZE: remove it to rebuild" >&2
        exit 1
    fi
    echo "make-mixed-image.sh: $OUT exists ($SIZE bytes): kept" >&2
    exit 0
fi
for t in mke2fs dumpe2fs python3; do
    command -v "$t" >/dev/null || { echo "make-mixed-image.sh: $t not found (apt-get install e2fsprogs python3)" >&2; exit 1; }
done

OUT_DIR=$(dirname "$OUT")
mkdir -p "$OUT_DIR"
WORK=$(mktemp -d "$OUT_DIR/.mixed-image.XXXXXX")
PARTIAL=$OUT.partial-$$
trap 'rm -rf "$WORK" "$PARTIAL"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

# Fixed identity: the same UUID and directory hash seed every time; E2FSPROGS_FAKE_TIME fixes
# the superblock's mkfs/check times.
MKFS=(mke2fs -q -F -t ext4 -b 4096 -m 0 -U 6d697865-642d-4265-6e63-682d696d6167
    -E hash_seed=6d697865-642d-4265-6e63-682d68617368,nodiscard)
export E2FSPROGS_FAKE_TIME=1700000000

# The empty file system first: how many blocks are free for data, how many inodes there are.
truncate -s "$SIZE" "$WORK/empty"
"${MKFS[@]}" "$WORK/empty"
read -r FREE_BLOCKS INODES < <(dumpe2fs -h "$WORK/empty" 2>/dev/null |
    awk -F: '/^Free blocks:/ { f = $2 } /^Inode count:/ { i = $2 } END { print f + 0, i + 0 }')
rm -f "$WORK/empty"
BUDGET=$((FREE_BLOCKS * 4096 * 76 / 100))
echo "make-mixed-image.sh: $SIZE bytes, $FREE_BLOCKS free 4 KiB blocks when empty; filling $((BUDGET >> 20)) MiB" >&2

mkdir "$WORK/root"
python3 - "$WORK/root" "$BUDGET" "$INODES" <<'EOF'
import gzip, hashlib, os, sys

root, budget, inodes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
BLOCK = 4096
quota = budget // 3

def alloc(n):
    return -(-n // BLOCK) * BLOCK

def walk(top, keep):
    out = []
    for d, dirs, files in os.walk(top):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(d, f)
            try:
                if os.path.isfile(p) and not os.path.islink(p) and keep(p):
                    out.append(p)
            except OSError:
                pass
    return out

def round_robin(lists):
    lists = [list(l) for l in lists]
    i = 0
    while any(lists):
        if lists[i % len(lists)]:
            yield lists[i % len(lists)].pop(0)
        i += 1

def is_elf(p):
    try:
        if os.path.getsize(p) > 32 << 20 or os.path.getsize(p) < 1024:
            return False
        with open(p, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False

# --- text
def man_pages():
    for p in walk("/usr/share/man", lambda p: p.endswith(".gz")):
        try:
            with gzip.open(p, "rb") as f:
                yield os.path.basename(p)[:-3], f.read()
        except (OSError, EOFError):
            pass

def plain(paths):
    for p in paths:
        try:
            with open(p, "rb") as f:
                data = f.read()
        except OSError:
            continue
        if data and b"\0" not in data[:8192]:
            yield os.path.basename(p), data

def gen_text():
    # words from a fixed list, a fixed LCG: the same text on every machine
    words = ("the of and to in is that for it as with was on be by this are at from or an "
             "block device image chunk sector read write kernel file system inode extent "
             "journal compress decompress cache thread buffer offset length checksum error "
             "mount filter audit passthrough request reply lookup getattr directory entry").split()
    state, n = 20240917, 0
    while True:
        lines = []
        for _ in range(2000):
            k = []
            for _ in range(12):
                state = (state * 6364136223846793005 + 1442695040888963407) % 2**64
                k.append(words[(state >> 33) % len(words)])
            lines.append(" ".join(k))
        yield f"generated-{n:05d}.txt", ("\n".join(lines) + "\n").encode()
        n += 1

def texts():
    doc = walk("/usr/share/doc", lambda p: not p.endswith((".gz", ".xz", ".bz2", ".zip", ".png",
                                                            ".jpg", ".gif", ".pdf", ".svgz")))
    inc = walk("/usr/include", lambda p: True)
    src = walk("/usr/lib/python3", lambda p: p.endswith(".py"))
    for v in sorted(x for x in os.listdir("/usr/lib") if x.startswith("python3.")):
        src += walk(os.path.join("/usr/lib", v), lambda p: p.endswith(".py"))
    perl = walk("/usr/share/perl", lambda p: p.endswith((".pm", ".pl", ".pod")))
    gens = [man_pages(), plain(doc), plain(inc), plain(src), plain(perl)]
    # round robin over the sources while they last
    while gens:
        for g in list(gens):
            try:
                yield next(g)
            except StopIteration:
                gens.remove(g)
    yield from gen_text()

# --- binaries
def binaries():
    lists = [walk(d, is_elf) for d in ("/usr/bin", "/usr/sbin", "/usr/libexec",
                                        "/usr/lib/x86_64-linux-gnu")]
    for p in round_robin(lists):
        try:
            with open(p, "rb") as f:
                yield os.path.basename(p), f.read()
        except OSError:
            pass

# --- random
def randoms():
    state, n = 77, 0
    while True:
        state = (state * 6364136223846793005 + 1442695040888963407) % 2**64
        # log-uniform size, 4 KiB .. 4 MiB, not block aligned
        size = int(4096 * 2 ** ((state >> 11) / 2**53 * 10)) + (state & 4095)
        yield f"random-{n:05d}.bin", hashlib.shake_256(b"interpose-mixed-image/%d" % n).digest(size)
        n += 1

kinds = {"text": texts(), "bin": binaries(), "rnd": randoms()}
used = {k: 0 for k in kinds}
counts = {k: 0 for k in kinds}
done = set()
seq = 0
gen_bytes = 0
while len(done) < len(kinds):
    # the kind with the fewest bytes so far goes next: the three stay interleaved
    k = min((k for k in kinds if k not in done), key=lambda k: used[k])
    try:
        name, data = next(kinds[k])
    except StopIteration:
        done.add(k)  # (only binaries can run out: text and random data are generated)
        continue
    if used[k] + alloc(len(data)) > quota:
        if quota - used[k] < 64 << 10:
            done.add(k)
            continue
        data = data[: quota - used[k]]  # the last file of a kind: cut to fit
    name = "".join(c if c.isalnum() or c in "._-+" else "_" for c in name)[:100]
    d = os.path.join(root, f"d{seq // 100:04d}")
    os.makedirs(d, exist_ok=True)
    p = os.path.join(d, f"{seq:06d}-{k}-{name}")
    with open(p, "wb") as f:
        f.write(data)
    os.utime(p, (1700000000, 1700000000))
    used[k] += alloc(len(data))
    if name.startswith("generated-"):
        gen_bytes += len(data)
    counts[k] += 1
    seq += 1
for d in os.listdir(root):
    os.utime(os.path.join(root, d), (1700000000, 1700000000))
os.utime(root, (1700000000, 1700000000))
if seq + seq // 100 + 16 > inodes:
    sys.exit(f"{seq} files need more inodes than the file system has ({inodes})")
short = {k: quota - used[k] for k in kinds if quota - used[k] > quota // 10}
names = {"text": "text", "bin": "binaries", "rnd": "random data"}
summary = ("contents: " + ", ".join(f"{names[k]} {used[k] / 2**20:.0f} MiB in {counts[k]} files" for k in kinds)
           + (f" (short of a third: {', '.join(f'{names[k]} by {v >> 20} MiB' for k, v in short.items())})" if short else "")
           + (f"; {gen_bytes / 2**20:.0f} MiB of the text generated" if gen_bytes else ""))
print(f"make-mixed-image.sh: {summary}", file=sys.stderr)
with open(os.path.join(os.path.dirname(root), "info"), "w") as f:
    f.write(summary + "\n")
EOF

# Fixed owner and modes (mke2fs -d copies them from DIR).
chown -R 0:0 "$WORK/root" 2>/dev/null || true
find "$WORK/root" -type d -exec chmod 755 {} + -o -type f -exec chmod 644 {} +
touch -d @1700000000 "$WORK/root"

truncate -s "$SIZE" "$PARTIAL"
"${MKFS[@]}" -d "$WORK/root" "$PARTIAL"
read -r BLOCKS FREE < <(dumpe2fs -h "$PARTIAL" 2>/dev/null |
    awk -F: '/^Block count:/ { b = $2 } /^Free blocks:/ { f = $2 } END { print b + 0, f + 0 }')
USAGE="ext4, $SIZE bytes, 4 KiB blocks, $(((BLOCKS - FREE) * 100 / BLOCKS))% of its blocks used (df-style, metadata included)"
# OUT.info: what is in it (bench/image.sh prints it); written before OUT appears.
{ cat "$WORK/info"; echo "$USAGE"; } >"$OUT.info"
mv "$PARTIAL" "$OUT"
echo "make-mixed-image.sh: $OUT: $USAGE" >&2
