#!/usr/bin/env python3
"""One worker for `tests/isolation.rs`'s mounted-commit stress: random operations in a
directory of its own, checked against an exact model of that directory, while the test
commits the store over and over.

Usage: iso_commit_worker.py ROOT WORKER SEED OPS

The worker owns ROOT/wWORKER and nothing else touches it, so every operation must succeed
and every read, listing and stat must agree with the model: creates, in-place writes,
renames of files and of whole directories, unlinks, mkdir and rmdir. At the end every
file is read again. Prints one JSON summary line; exits 1 on any error or disagreement
(the first few are listed).
"""

import errno
import json
import os
import random
import sys

root, worker, seed, ops = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed * 1000 + worker)
base = os.path.join(root, f"w{worker}")
os.makedirs(base, exist_ok=True)
files = {}  # path relative to base -> contents
dirs = {""}
problems = []


def full(rel):
    return os.path.join(base, rel) if rel else base


def below(d, x):
    return x.startswith(d + "/")


def problem(what):
    problems.append(what)


def step():
    global files, dirs
    k = rng.random()
    if k < 0.2 or not files:
        n = os.path.join(rng.choice(sorted(dirs)), f"f{rng.randrange(1000)}")
        if n in files or n in dirs:
            return
        data = rng.randbytes(rng.choice([10, 4096, 70000]))
        with open(full(n), "wb") as f:
            f.write(data)
        files[n] = data
    elif k < 0.3:
        n = os.path.join(rng.choice(sorted(dirs)), f"d{rng.randrange(100)}")
        if n in files or n in dirs:
            return
        os.mkdir(full(n))
        dirs.add(n)
    elif k < 0.45:
        n = rng.choice(sorted(files))
        with open(full(n), "rb") as f:
            if f.read() != files[n]:
                problem(f"read {n}: other contents")
    elif k < 0.55:
        n = rng.choice(sorted(files))
        off, b = rng.randrange(len(files[n]) + 1), rng.randbytes(100)
        with open(full(n), "r+b") as f:
            f.seek(off)
            f.write(b)
        new = bytearray(files[n])
        new.extend(b"\0" * max(0, off + 100 - len(new)))
        new[off:off + 100] = b
        files[n] = bytes(new)
    elif k < 0.65:
        n = rng.choice(sorted(files))
        m = os.path.join(rng.choice(sorted(dirs)), f"r{rng.randrange(1000)}")
        if m in files or m in dirs:
            return
        os.rename(full(n), full(m))
        files[m] = files.pop(n)
    elif k < 0.75:
        n = rng.choice(sorted(files))
        os.unlink(full(n))
        del files[n]
    elif k < 0.8:
        taken = set(files) | dirs
        empty = sorted(d for d in dirs if d and not any(below(d, x) for x in taken))
        if empty:
            d = rng.choice(empty)
            os.rmdir(full(d))
            dirs.discard(d)
    elif k < 0.85:
        movable = sorted(d for d in dirs if d)
        if not movable:
            return
        d = rng.choice(movable)
        parents = sorted(x for x in dirs if x != d and not below(d, x))
        m = os.path.join(rng.choice(parents), f"m{rng.randrange(100)}")
        if m in files or m in dirs:
            return
        os.rename(full(d), full(m))

        def moved(x):
            return m + x[len(d):] if x == d or below(d, x) else x

        dirs = {moved(x) for x in dirs}
        files = {moved(x): v for x, v in files.items()}
    else:
        d = rng.choice(sorted(dirs))
        got = set(os.listdir(full(d)))
        want = {os.path.basename(x) for x in set(files) | dirs if x and os.path.dirname(x) == d}
        if got != want:
            problem(f"listing {d!r}: extra {sorted(got - want)[:3]}, missing {sorted(want - got)[:3]}")
        for x in got:
            st = os.lstat(os.path.join(full(d), x))
            rel = os.path.join(d, x)
            if rel in files and st.st_size != len(files[rel]):
                problem(f"lstat {rel}: size {st.st_size}, not {len(files[rel])}")


for i in range(ops):
    try:
        step()
    except OSError as e:
        problem(f"operation {i}: {errno.errorcode.get(e.errno, e.errno)} {e}")
    if len(problems) > 5:
        break
for n, v in sorted(files.items()):
    try:
        with open(full(n), "rb") as f:
            if f.read() != v:
                problem(f"final read {n}: other contents")
    except OSError as e:
        problem(f"final read {n}: {e}")
print(json.dumps({"worker": worker, "files": len(files), "dirs": len(dirs), "problems": problems[:6]}))
sys.exit(1 if problems else 0)
