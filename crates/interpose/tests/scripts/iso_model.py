#!/usr/bin/env python3
"""Model-based checking of isolated mounts (tests/isolation_model.rs, isolation_crash.rs).

Every operation is applied to the isolated mount and to a reference directory (a plain
directory on the same kind of file system, holding what the mount must show); both must
give the same result or the same errno, and the trees must stay equal. Operations are
chosen by a RNG seeded with (SEED, operation number) from the reference's current tree, so
a run is replayable, and every operation is logged with its arguments, result and the
daemon's last sequence number after it (read from STORE/control.sock).

  iso_model.py build DIR
        make the initial tree in DIR (deterministic: the same every time)
  iso_model.py manifest DIR OUT
        write everything about DIR (inodes, modes, owners, sizes, contents, link targets,
        all xattrs, mtime and ctime in ns) to OUT, for "nothing touched it" checks
  iso_model.py same-manifest DIR OUT
        exit 1, naming the differences, unless DIR still matches the manifest OUT
  iso_model.py run MNT REF STORE SEED FIRST COUNT OPLOG [--full-every K]
        operations FIRST..FIRST+COUNT-1 on MNT and REF, appended to OPLOG (JSON lines);
        prints a summary {"ok": {op: n}, "err": {op: n}, "last_seq": N} on success
  iso_model.py replay DIR OPLOG K
        apply the logged mutating operations 1..K to DIR, each of which must give the
        result it gave when logged
  iso_model.py compare A B OPLOG
        exit 1, naming the differences, unless the trees A and B are equal

Trees are compared by type, permission bits, owner, size (not of directories), link count,
contents, symlink targets, user.* xattrs, which names share an inode, and modification
times where the reference shows one set explicitly by a logged utime operation (others may
differ: the view stamps its own times). INTERPOSE_ISO_EXCLUDE=op,op leaves operations out
(for narrowing a failure down; the tests never set it); "bigxattr" in it keeps xattr
values small, "root" leaves the root directory alone,
"longname" makes no names over 255 bytes, "fifosuid" no set-ID bits on fifos.

INTERPOSE_ISO_BORDER=SUBTREE: the mount isolates only SUBTREE (`--isolate-path SUBTREE`);
everything else goes straight to BACKING. A change that names a path inside SUBTREE must be
recorded, also a rename or link between the two sides; the outside paths a recorded change
names (the "spread", kept in the oplog) are isolated from then on, with everything below
them, and so are renames and removals of directories above them or holding a name of an
object a recorded change touched (the records of a file with several names may name any of
them), and every change to an object a recorded change touched or with a name among them
(through any of its names).
Changes that name none of these must record nothing. Operations that would rename or remove a directory above
SUBTREE are not generated (BACKING still holds what the view has removed below it until
commit).
"""

import ctypes
import errno
import hashlib
import json
import os
import random
import socket
import stat
import sys

os.umask(0o022)

libc = ctypes.CDLL(None, use_errno=True)
libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                           ctypes.c_uint]
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10

# Operations that change nothing (they must not record a change either).
READ_ONLY = {"read", "listdir", "stat", "readlink", "getxattr", "listxattr"}
# Operations that, when they succeed, always record at least one change.
MUST_RECORD = {"create", "mkdir", "mkfifo", "symlink", "link", "unlink", "rmdir", "chmod",
               "chown", "utime", "setxattr", "removexattr", "truncate"}
# Errors meaning the mount's daemon is gone.
# ECANCELED: a request the kernel was handing to the daemon's io_uring when it died.
GONE = {"ENOTCONN", "ECONNABORTED", "ECANCELED"}

NAMES = [f"n{j}" for j in range(10)] + ["d", "e", "x"]
XATTRS = ["user.a", "user.b", "user.c", "user.big"]
OWNERS = [0, 1000, 1001, 65534]
FILE_MODES = [0o644, 0o600, 0o755, 0o700, 0o444, 0o000, 0o4755, 0o2755, 0o6755, 0o2745, 0o1644]
DIR_MODES = [0o755, 0o700, 0o2775, 0o1777, 0o555, 0o2755, 0o750]


def short(op):
    """An operation for messages: long values cut."""
    s = json.dumps(op)
    if len(s) > 400:
        s = json.dumps({k: (v[:40] + f"...({len(v) // 2} bytes)" if k == "value" else v)
                        for k, v in op.items()})
    return s


def fail(msg):
    sys.stderr.write(msg.rstrip() + "\n")
    sys.exit(1)


def P(base, rel):
    return os.path.join(base, rel) if rel else base


def gen(dseed, n):
    return random.Random(dseed).randbytes(n)


def checked(r):
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


# ---------------------------------------------------------------------------------------
# The initial tree


def build(d):
    """The initial tree: files of many sizes (sparse ones, ones over 64 KiB), directories,
    a hard-linked pair, symlinks, a fifo, user.* xattrs, odd modes and owners."""
    rnd = random.Random(20240611)
    os.makedirs(d, exist_ok=True)
    for sub in ["d1", "d1/d2", "d3", "empty", "d1/d2/deep"]:
        os.mkdir(os.path.join(d, sub))
    sizes = {"f_empty": 0, "f_small": 100, "f_4k": 4096, "f_5000": 5000, "f_big": 70000,
             "f_huge": 300001, "d1/g": 5000, "d1/d2/h": 70001, "d3/i": 1, "d1/d2/deep/j": 8191}
    for name, n in sizes.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(rnd.randbytes(n))
    # Sparse files: an island in a hole, data-hole-data, and nothing but a hole.
    with open(os.path.join(d, "sp1"), "wb") as f:
        f.truncate(1 << 20)
        f.seek(300000)
        f.write(b"island")
    with open(os.path.join(d, "d3/sp2"), "wb") as f:
        f.write(rnd.randbytes(4096))
        f.seek(200000)
        f.write(rnd.randbytes(5000))
        f.truncate(500000)
    with open(os.path.join(d, "sp3"), "wb") as f:
        f.truncate(100000)
    os.link(os.path.join(d, "f_small"), os.path.join(d, "d3/hard"))
    os.link(os.path.join(d, "f_big"), os.path.join(d, "d1/big_link"))
    os.symlink("f_small", os.path.join(d, "ln_file"))
    os.symlink("d1", os.path.join(d, "ln_dir"))
    os.symlink("d2/h", os.path.join(d, "d1/ln_rel"))
    os.symlink("nowhere", os.path.join(d, "ln_dangling"))
    os.symlink("/nonexistent-interpose-model/x", os.path.join(d, "ln_abs"))
    os.mkfifo(os.path.join(d, "fifo1"), 0o640)
    os.setxattr(os.path.join(d, "f_small"), "user.a", b"v1")
    os.setxattr(os.path.join(d, "d1"), "user.b", b"\x00\x01bin")
    os.setxattr(os.path.join(d, "f_big"), "user.big", rnd.randbytes(2000))
    os.setxattr(os.path.join(d, "sp1"), "user.c", b"")
    os.chmod(os.path.join(d, "f_4k"), 0o600)
    os.chmod(os.path.join(d, "d1/g"), 0o4755)
    os.chmod(os.path.join(d, "f_5000"), 0o2775)
    os.chmod(os.path.join(d, "d3"), 0o2775)
    os.chown(os.path.join(d, "d1/g"), 1000, 1000)
    os.chown(os.path.join(d, "d3"), 0, 1001)
    os.chown(os.path.join(d, "ln_file"), 1001, 1001, follow_symlinks=False)
    os.utime(os.path.join(d, "f_5000"), ns=(1_000_000_000_123_456_789, 1_100_000_000_987_654_321))


# ---------------------------------------------------------------------------------------
# Trees


def kind_of(mode):
    if stat.S_ISREG(mode):
        return "f"
    if stat.S_ISDIR(mode):
        return "d"
    if stat.S_ISLNK(mode):
        return "l"
    if stat.S_ISFIFO(mode):
        return "p"
    return "?"


def user_xattrs(p):
    out = {}
    for n in sorted(os.listxattr(p, follow_symlinks=False)):
        if n.startswith("user."):
            out[n] = os.getxattr(p, n, follow_symlinks=False).hex()
    return out


def file_hash(p):
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def describe(base, rel, contents=True):
    """What the comparison looks at for one object (None if it does not exist)."""
    p = P(base, rel)
    try:
        st = os.lstat(p)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        return {"kind": "error", "error": f"lstat: {errno.errorcode.get(e.errno, e.errno)}"}
    k = kind_of(st.st_mode)
    d = {"kind": k, "perm": oct(stat.S_IMODE(st.st_mode)), "uid": st.st_uid,
         "gid": st.st_gid, "nlink": st.st_nlink, "mtime_ns": st.st_mtime_ns,
         "ino": st.st_ino}
    try:
        d["xattrs"] = user_xattrs(p)
        if k != "d":
            d["size"] = st.st_size
        if k == "f" and contents:
            d["sha"] = file_hash(p)
        if k == "l":
            d["target"] = os.readlink(p)
        if k == "d":
            d["entries"] = sorted(os.listdir(p))
    except OSError as e:
        # Something listed or statted that cannot be read: a difference in itself.
        d["error"] = errno.errorcode.get(e.errno, str(e.errno))
    return d


def snapshot(base):
    out = {"": describe(base, "")}

    def rec(rel):
        try:
            names = sorted(os.listdir(P(base, rel)))
        except OSError:
            return  # recorded by describe()
        for name in names:
            r = os.path.join(rel, name) if rel else name
            d = describe(base, r)
            out[r] = d
            if d and d["kind"] == "d" and "error" not in d:
                rec(r)

    rec("")
    return out


def link_groups(snap):
    by_ino = {}
    for rel, d in snap.items():
        if d and d["kind"] not in ("d", "error"):
            by_ino.setdefault(d["ino"], []).append(rel)
    return sorted(sorted(g) for g in by_ino.values())


def diff_obj(rel, a, b, explicit):
    """Differences between two describe() results; b is the reference."""
    if a is None and b is None:
        return []
    if a is None or b is None:
        return [f"{rel or '.'}: {'missing' if a is None else 'present'} on the checked side, "
                f"{'missing' if b is None else 'present'} in the reference"
                f" ({json.dumps(a if b is None else b)[:300]})"]
    out = []
    for k in sorted(set(a) | set(b)):
        if k in ("ino",):
            continue
        if k == "mtime_ns" and k in a and k in b:
            if b["mtime_ns"] in explicit and a["mtime_ns"] != b["mtime_ns"]:
                out.append(f"{rel or '.'}: mtime {a['mtime_ns']} but the reference has "
                           f"{b['mtime_ns']}, set by utime")
            continue
        if a.get(k) != b.get(k):
            out.append(f"{rel or '.'}: {k} is {str(a.get(k))[:200]}, reference has "
                       f"{str(b.get(k))[:200]}")
    return out


def diff_trees(a, b, explicit):
    out = []
    for rel in sorted(set(a) | set(b)):
        out += diff_obj(rel, a.get(rel), b.get(rel), explicit)
    ga, gb = link_groups(a), link_groups(b)
    if ga != gb:
        multi = lambda g: [x for x in g if len(x) > 1]
        out.append(f"hard links differ: checked side {multi(ga)}, reference {multi(gb)}")
    return out


def first_content_diff(pa, pb):
    try:
        with open(pa, "rb") as f:
            x = f.read()
        with open(pb, "rb") as f:
            y = f.read()
    except OSError as e:
        return str(e)
    at = next((i for i in range(min(len(x), len(y))) if x[i] != y[i]), None)
    return f"sizes {len(x)} vs {len(y)}, first differing byte at {at}"


def explain(a_base, b_base, diffs):
    """Adds where file contents first differ."""
    out = []
    for d in diffs:
        out.append(d)
        if ": sha is" in d:
            rel = d.split(": sha is")[0]
            out.append("    " + first_content_diff(P(a_base, rel), P(b_base, rel)))
    return out


def manifest(base):
    out = {}

    def one(rel):
        p = P(base, rel)
        st = os.lstat(p)
        d = {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid, "ino": st.st_ino,
             "nlink": st.st_nlink, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
             "ctime_ns": st.st_ctime_ns,
             "xattrs": {n: os.getxattr(p, n, follow_symlinks=False).hex()
                        for n in sorted(os.listxattr(p, follow_symlinks=False))}}
        if stat.S_ISREG(st.st_mode):
            d["sha"] = file_hash(p)
        if stat.S_ISLNK(st.st_mode):
            d["target"] = os.readlink(p)
        out[rel] = d
        if stat.S_ISDIR(st.st_mode):
            for name in sorted(os.listdir(p)):
                one(os.path.join(rel, name) if rel else name)

    one("")
    return out


# ---------------------------------------------------------------------------------------
# Operations


def fd_open(p, flags, mode=0o644):
    return os.open(p, flags | os.O_NONBLOCK | os.O_CLOEXEC, mode)


def apply_op(base, op):
    """Applies one operation below base: ["ok", value] or ["err", "ENAME"]."""
    try:
        return ["ok", _apply(base, op)]
    except OSError as e:
        return ["err", errno.errorcode.get(e.errno, str(e.errno))]


def _apply(base, a):
    k = a["op"]
    p = P(base, a.get("path", ""))
    if k == "write":
        fd = fd_open(p, os.O_WRONLY | (os.O_APPEND if a.get("append") else 0))
        try:
            data = gen(a["dseed"], a["len"])
            return os.write(fd, data) if a.get("append") else os.pwrite(fd, data, a["off"])
        finally:
            os.close(fd)
    if k == "truncate":
        if a["how"] == "path":
            os.truncate(p, a["size"])
        else:
            fd = fd_open(p, os.O_WRONLY)
            try:
                os.ftruncate(fd, a["size"])
            finally:
                os.close(fd)
        return None
    if k == "fallocate":
        fd = fd_open(p, os.O_WRONLY)
        try:
            checked(libc.fallocate(fd, a["mode"], a["off"], a["len"]))
        finally:
            os.close(fd)
        return None
    if k == "create":
        fd = fd_open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, a["mode"])
        try:
            return os.write(fd, gen(a["dseed"], a["len"])) if a["len"] else 0
        finally:
            os.close(fd)
    if k == "mkdir":
        return os.mkdir(p, a["mode"])
    if k == "mkfifo":
        return os.mkfifo(p, a["mode"])
    if k == "symlink":
        return os.symlink(a["target"], p)
    if k == "link":
        return os.link(P(base, a["src"]), P(base, a["dst"]), follow_symlinks=a["follow"])
    if k == "unlink":
        return os.unlink(p)
    if k == "rmdir":
        return os.rmdir(p)
    if k == "rename":
        src, dst = P(base, a["src"]), P(base, a["dst"])
        if a["flags"] == 0 and a.get("plain"):
            return os.rename(src, dst)
        return checked(libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst),
                                      a["flags"]))
    if k == "chmod":
        return os.chmod(p, a["mode"])
    if k == "chown":
        return os.chown(p, a["uid"], a["gid"], follow_symlinks=a["follow"])
    if k == "utime":
        return os.utime(p, ns=(a["atime"], a["mtime"]), follow_symlinks=a["follow"])
    if k == "setxattr":
        return os.setxattr(p, a["name"], bytes.fromhex(a["value"]), a["flags"],
                           follow_symlinks=a["follow"])
    if k == "removexattr":
        return os.removexattr(p, a["name"], follow_symlinks=a["follow"])
    # Read-only operations: their results are compared too.
    if k == "read":
        fd = fd_open(p, os.O_RDONLY)
        try:
            return hashlib.sha256(os.pread(fd, a["len"], a["off"])).hexdigest()
        finally:
            os.close(fd)
    if k == "listdir":
        return sorted(os.listdir(p))
    if k == "stat":
        st = os.lstat(p)
        size = None if stat.S_ISDIR(st.st_mode) else st.st_size
        return [oct(st.st_mode), st.st_uid, st.st_gid, size, st.st_nlink]
    if k == "readlink":
        return os.readlink(p)
    if k == "getxattr":
        return os.getxattr(p, a["name"], follow_symlinks=a["follow"]).hex()
    if k == "listxattr":
        return sorted(n for n in os.listxattr(p, follow_symlinks=a["follow"])
                      if n.startswith("user."))
    raise ValueError(f"unknown operation {k}")


def op_paths(a):
    """The paths an operation names, for the check right after it."""
    out = [a[k] for k in ("path", "src", "dst") if k in a]
    for r in list(out):
        out.append(os.path.dirname(r))
    return sorted(set(out))


def scan(base):
    """rel -> (kind, size) of everything below base."""
    out = {}

    def rec(rel):
        with os.scandir(P(base, rel)) as it:
            for de in it:
                r = os.path.join(rel, de.name) if rel else de.name
                st = de.stat(follow_symlinks=False)
                k = kind_of(st.st_mode)
                out[r] = (k, st.st_size)
                if k == "d":
                    rec(r)

    rec("")
    return out


WEIGHTS = {
    "write": 16, "truncate": 6, "fallocate": 6, "create": 6, "mkdir": 4, "mkfifo": 1,
    "symlink": 3, "link": 4, "unlink": 5, "rmdir": 3, "rename": 11, "chmod": 4, "chown": 3,
    "utime": 4, "setxattr": 4, "removexattr": 3, "read": 4, "listdir": 2, "stat": 2,
    "readlink": 1, "getxattr": 1, "listxattr": 1,
}


def with_xattr(rnd, ref, by, path, name, excluded):
    """An object that has a user.* xattr, and that name (else path and name as given)."""
    have = []
    for r in by["f"] + by["d"]:
        if not r and "root" in excluded:
            continue
        try:
            have += [(r, n) for n in sorted(os.listxattr(P(ref, r))) if n.startswith("user.")]
        except OSError:
            pass
    return rnd.choice(have) if have else (path, name)


def gen_op(seed, i, ref, atomic=False):
    """Operation i, from the reference tree as it is now. atomic: only operations that
    make at most one change (for crash tests: nothing an op does can be half there)."""
    rnd = random.Random(f"{seed}:{i}")
    tree = scan(ref)
    by = {"f": [], "d": [""], "l": [], "p": []}
    for r in sorted(tree):  # not directory order: that differs between trees
        by.setdefault(tree[r][0], []).append(r)
    every = sorted(tree) or ["missing"]
    size_of = lambda r: tree.get(r, ("?", 0))[1]
    excluded = set(filter(None, os.environ.get("INTERPOSE_ISO_EXCLUDE", "").split(",")))
    weights = dict(WEIGHTS)
    if len(tree) > 220:
        for k in ("unlink", "rmdir", "rename"):
            weights[k] *= 3
        for k in ("create", "mkdir", "symlink", "link", "mkfifo"):
            weights[k] = max(1, weights[k] // 3)
    names = [k for k in weights if k not in excluded]
    root_p = 0 if "root" in excluded else 0.03
    k = rnd.choices(names, weights=[weights[n] for n in names])[0]

    def pick(*kinds, other=0.06):
        """Mostly an object of these kinds; sometimes anything, or a missing name."""
        pool = [r for kd in kinds for r in by.get(kd, []) if r]
        x = rnd.random()
        if pool and x > other:
            return rnd.choice(pool)
        if x > other / 4:
            return rnd.choice(every)
        return rnd.choice(["missing", "d1/missing", "f_small/under_a_file", "missing/x"])

    def new_path():
        x = rnd.random()
        if x < 0.05:
            parent = pick("f")  # ENOTDIR
        elif x < 0.08:
            parent = "nodir"  # ENOENT
        else:
            parent = rnd.choice(by["d"])
        if rnd.random() < 0.1:
            name = rnd.choice(every).split("/")[-1]  # maybe EEXIST
        elif rnd.random() < 0.01:
            name = "L" * rnd.choice([255, 255 if "longname" in excluded else 256])
        else:
            name = rnd.choice(NAMES)
        return os.path.join(parent, name) if parent else name

    a = {"op": k}
    if k == "write":
        a["path"] = pick("f")
        size = size_of(a["path"])
        x = rnd.random()
        n = (rnd.randrange(1, 200) if x < 0.4 else
             4096 * rnd.randrange(1, 5) if x < 0.55 else
             rnd.randrange(1, 20000) if x < 0.8 else
             rnd.randrange(20000, 150000) if x < 0.95 else 0)
        y = rnd.random()
        off = (rnd.randrange(0, size + 1) if y < 0.3 else
               size if y < 0.45 else
               4096 * rnd.randrange(0, size // 4096 + 3) if y < 0.6 else
               size + rnd.randrange(1, 300000) if y < 0.72 else
               rnd.randrange(0, 200000))
        if size > (2 << 20):
            off = rnd.randrange(0, size)
        if atomic and off % 4096 + n > 4096:
            # The kernel sends a write that starts inside a page it does not hold and goes
            # past it as two requests (the partial page first): two changes, which a crash
            # may separate, as it may on any file system.
            off -= off % 4096
        a.update(off=off, len=n, dseed=f"{seed}:{i}:data")
        if rnd.random() < 0.1 and not atomic:
            a["append"] = True
    elif k == "truncate":
        a["path"] = pick("f")
        size = size_of(a["path"])
        x = rnd.random()
        a["size"] = (rnd.randrange(0, size + 1) if x < 0.35 else
                     size + rnd.randrange(1, 200000) if x < 0.55 else
                     0 if x < 0.65 else
                     size if x < 0.72 else
                     4096 * rnd.randrange(0, 60) if x < 0.82 else
                     rnd.randrange(0, 300000))
        a["how"] = rnd.choice(["path", "fd"])
    elif k == "fallocate":
        a["path"] = pick("f")
        size = size_of(a["path"])
        x = rnd.random()
        a["mode"] = (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE if x < 0.65 else
                     FALLOC_FL_ZERO_RANGE if x < 0.75 else
                     FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE if x < 0.82 else
                     FALLOC_FL_KEEP_SIZE if x < 0.9 else 0)
        y = rnd.random()
        a["off"] = (rnd.randrange(0, size + 1) if y < 0.5 else
                    4096 * rnd.randrange(0, size // 4096 + 2) if y < 0.8 else
                    rnd.randrange(0, size + 20000))
        a["len"] = (rnd.randrange(1, 10000) if rnd.random() < 0.5 else
                    4096 * rnd.randrange(1, 30) if rnd.random() < 0.5 else
                    rnd.randrange(1, 200000))
    elif k == "create":
        a["path"] = new_path()
        a["mode"] = rnd.choice(FILE_MODES)
        a["len"] = 0 if atomic or rnd.random() < 0.4 else rnd.randrange(1, 90000)
        a["dseed"] = f"{seed}:{i}:data"
    elif k in ("mkdir", "mkfifo"):
        a["path"] = new_path()
        a["mode"] = rnd.choice(DIR_MODES if k == "mkdir" else [0o644, 0o600, 0o640])
    elif k == "symlink":
        a["path"] = new_path()
        parent = os.path.dirname(a["path"])
        here = [r[len(parent) + 1:] if parent else r for r in every
                if r.startswith(parent + "/" if parent else "") and "/" in r[len(parent) + 1:]]
        siblings = [r.split("/")[-1] for r in every if os.path.dirname(r) == parent]
        x = rnd.random()
        a["target"] = (rnd.choice(siblings) if siblings and x < 0.45 else
                       rnd.choice(here) if here and x < 0.65 else
                       a["path"].split("/")[-1] if x < 0.72 else
                       "/nonexistent-interpose-model/t" if x < 0.8 else
                       rnd.choice(NAMES))
    elif k == "link":
        a["src"] = pick("f", "l", "p", other=0.1)
        a["dst"] = new_path()
        a["follow"] = rnd.random() < 0.3
    elif k == "unlink":
        a["path"] = pick("f", "l", "p", other=0.1)
    elif k == "rmdir":
        dirs = [d for d in by["d"] if d]
        a["path"] = rnd.choice(dirs) if dirs and rnd.random() < 0.9 else pick("f", "l")
    elif k == "rename":
        x = rnd.random()
        src = (rnd.choice([d for d in by["d"] if d] or ["missing"]) if x < 0.3 else
               pick("f", "l", "p", other=0.1))
        y = rnd.random()
        if y < 0.45:
            dst = new_path()
        elif y < 0.55 and src and src != "missing":
            # Into its own subtree (EINVAL for a directory).
            dst = os.path.join(src, rnd.choice(NAMES))
        else:
            same_kind = [r for r in every if tree[r][0] == tree.get(src, ("?",))[0]]
            dst = rnd.choice(same_kind if same_kind and rnd.random() < 0.6 else every)
        z = rnd.random()
        flags = 0 if z < 0.6 else RENAME_NOREPLACE if z < 0.75 else RENAME_EXCHANGE
        a.update(src=src, dst=dst, flags=flags)
        if flags == 0 and rnd.random() < 0.5:
            a["plain"] = True
    elif k == "chmod":
        a["path"] = pick("f", "d", "p", other=0.1) if rnd.random() > root_p else ""
        kind = tree.get(a["path"], ("d",))[0] if a["path"] else "d"
        a["mode"] = rnd.choice(DIR_MODES if kind == "d" else FILE_MODES)
        if kind == "p" and "fifosuid" in excluded:
            a["mode"] &= 0o1777
    elif k == "chown":
        a["path"] = pick("f", "d", "l", "p", other=0.1) if rnd.random() > root_p else ""
        a["uid"] = rnd.choice(OWNERS + [-1])
        a["gid"] = rnd.choice(OWNERS + [-1])
        a["follow"] = rnd.random() < 0.5
    elif k == "utime":
        a["path"] = pick("f", "d", "l", "p", other=0.1) if rnd.random() > root_p else ""
        a["atime"] = rnd.randrange(10 ** 18, 16 * 10 ** 17)
        a["mtime"] = (rnd.randrange(10 ** 18, 16 * 10 ** 17) if rnd.random() < 0.95 else
                      -rnd.randrange(10 ** 17, 10 ** 18))
        a["follow"] = rnd.random() < 0.5
    elif k in ("setxattr", "removexattr"):
        a["path"] = pick("f", "d", "l", "p", other=0.1) if rnd.random() > root_p else ""
        a["name"] = rnd.choice(XATTRS)
        if k == "removexattr" and rnd.random() < 0.7:
            a["path"], a["name"] = with_xattr(rnd, ref, by, a["path"], a["name"], excluded)
        a["follow"] = rnd.random() < 0.6
        if k == "setxattr":
            n = rnd.choice([0, 1, 17, 200, 3000])
            if "bigxattr" in excluded:
                n = min(n, 200)
            a["value"] = rnd.randbytes(n).hex()
            x = rnd.random()
            a["flags"] = 0 if x < 0.8 else os.XATTR_CREATE if x < 0.9 else os.XATTR_REPLACE
    elif k == "read":
        a["path"] = pick("f")
        a["off"] = rnd.randrange(0, size_of(a["path"]) + 5000)
        a["len"] = rnd.randrange(1, 70000)
    elif k == "listdir":
        a["path"] = pick("d")
    elif k == "stat":
        a["path"] = rnd.choice(every)
    elif k == "readlink":
        a["path"] = pick("l")
    elif k in ("getxattr", "listxattr"):
        a["path"] = pick("f", "d", "l", "p", other=0.1)
        a["follow"] = rnd.random() < 0.5
        if k == "getxattr":
            a["name"] = rnd.choice(XATTRS)
            if rnd.random() < 0.7:
                a["path"], a["name"] = with_xattr(rnd, ref, by, a["path"], a["name"], excluded)
    return a


# ---------------------------------------------------------------------------------------
# The daemon's control socket


def control(store, req):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(60)
        s.connect(os.path.join(store, "control.sock"))
        s.sendall(json.dumps(req).encode() + b"\n")
        f = s.makefile("rb")
        for line in f:
            v = json.loads(line)
            if "ok" in v:
                return v["ok"]
            if "error" in v:
                raise RuntimeError(f"control socket: {v['error']}")
        raise RuntimeError("control socket closed without an answer")
    finally:
        s.close()


def last_seq(store):
    return control(store, {"cmd": "status"})["last_seq"]


# ---------------------------------------------------------------------------------------
# Logs


def read_oplog(path):
    ops = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    ops.append(json.loads(line))
    return ops


def explicit_mtimes(ops):
    return {e["op"]["mtime"] for e in ops
            if "op" in e and e["op"]["op"] == "utime" and (e.get("res") or ["err"])[0] == "ok"}


# ---------------------------------------------------------------------------------------
# Commands


BORDER = os.environ.get("INTERPOSE_ISO_BORDER")


def inside(rel):
    return BORDER is not None and (rel == BORDER or rel.startswith(BORDER + "/"))


def under(rel, top):
    return rel == top or rel.startswith(top + "/")


def isolated(rel, spread):
    """Whether the mount must record a change naming rel (see INTERPOSE_ISO_BORDER)."""
    return inside(rel) or any(under(rel, s) for s in spread)


def entangled(rel, spread):
    """Whether the mount may record a change naming rel: isolated, or a directory with
    spread paths below it."""
    return isolated(rel, spread) or any(under(s, rel) for s in spread)


def inodes(ref, rels):
    out = set()
    for rel in rels:
        try:
            out.add(os.lstat(P(ref, rel)).st_ino)
        except OSError:
            pass
    return out


def inodes_below(ref, rels):
    """The reference inodes of everything below the directories among rels (not through
    symlinks). A file with several names may have its recorded changes under any of them
    (the daemon names a file by the first name its view met, as a link or a write
    reaches it by inode, not by the name the program used); renaming or removing a
    directory holding one of its names may therefore be recorded."""
    out = set()
    for rel in rels:
        top = P(ref, rel)
        try:
            if not stat.S_ISDIR(os.lstat(top).st_mode):
                continue
        except OSError:
            continue
        for root, dirs, files in os.walk(top):
            for name in dirs + files:
                try:
                    out.add(os.lstat(os.path.join(root, name)).st_ino)
                except OSError:
                    pass
    return out


def other_links(ref, rels):
    """The other names in ref of the files at rels that have several (a change to a file
    with an isolated name is isolated through every name)."""
    want = set()
    for rel in rels:
        try:
            st = os.lstat(P(ref, rel))
        except OSError:
            continue
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            want.add(st.st_ino)
    out = []
    if want:
        for root, dirs, files in os.walk(ref):
            # os.walk lists a symlink to a directory among the directories (and does not
            # enter it): such a symlink with two names is still one of the files wanted.
            for f in dirs + files:
                full = os.path.join(root, f)
                if os.lstat(full).st_ino in want:
                    out.append(os.path.relpath(full, ref))
    return out


# Operations that always follow a final symlink, and those that never do (python's
# os.link with follow_symlinks=True calls link(2), which on Linux does not follow).
FOLLOWS = {"write", "truncate", "fallocate", "chmod", "read", "listdir"}
NO_FOLLOW = {"rename", "unlink", "rmdir", "create", "mkdir", "mkfifo", "symlink", "stat",
             "readlink", "link"}


def effective_paths(ref, a):
    """The paths in ref an operation acts on once symlinks in them are resolved, as the
    daemon sees them (the kernel resolves every component but a final one not followed)."""
    out = []
    for key in ("path", "src", "dst"):
        if key not in a:
            continue
        full = P(ref, a[key])
        follow = key != "dst" and a["op"] not in NO_FOLLOW and (
            a["op"] in FOLLOWS or a.get("follow", False))
        if follow:
            r = os.path.realpath(full)
        else:
            r = os.path.join(os.path.realpath(os.path.dirname(full)), os.path.basename(full))
        rel = os.path.relpath(r, ref)
        out.append("" if rel == "." else rel)
    return out


def above_border(ref, a):
    """The operation would rename or remove the root or a directory above the border."""
    if BORDER is None or a["op"] not in ("rename", "rmdir"):
        return False
    parts = BORDER.split("/")
    ups = {"/".join(parts[:n]) for n in range(len(parts))}  # "" and each directory above
    return any(p in ups for p in effective_paths(ref, a))


def next_op(seed, i, ref):
    """Operation i; with a border, one that leaves the directories above it alone."""
    op = gen_op(seed, i, ref)
    tries = 0
    while above_border(ref, op):
        tries += 1
        op = gen_op(seed, f"{i}.{tries}", ref)
    return op


def cmd_run(mnt, ref, store, seed, first, count, oplog, full_every=250):
    logged = read_oplog(oplog)
    if logged and logged[-1]["i"] != first - 1:
        fail(f"{oplog} ends at operation {logged[-1]['i']}, not {first - 1}")
    explicit = explicit_mtimes(logged)
    prev = last_seq(store)
    if logged and logged[-1]["seq"] != prev:
        fail(f"the daemon's last sequence number is {prev}, but the log says "
             f"{logged[-1]['seq']} after operation {first - 1}")
    recent = logged[-8:]
    spread = {p for e in logged for p in e.get("spread", [])}
    # Reference inodes of the objects recorded changes touched: the mount may isolate
    # every later change to them, through any name.
    touched = {n for e in logged for n in e.get("inodes", [])}
    ok, err = {}, {}
    norecord = {}
    out = open(oplog, "a")

    def die(msg):
        ctx = "\n".join(f"{e['i']}: {short(e['op'])} -> {e['res']}, seq {e['seq']}"
                        for e in recent[-8:])
        fail(f"seed {seed}: {msg}\nthe operations before it, last one last:\n{ctx}")

    for i in range(first, first + count):
        op = next_op(seed, i, ref)
        paths = effective_paths(ref, op)
        links = other_links(ref, paths) if BORDER is not None else []
        before = inodes(ref, paths) if BORDER is not None else set()
        below = (inodes_below(ref, paths)
                 if BORDER is not None and op["op"] in ("rename", "rmdir") else set())
        rm = apply_op(mnt, op)
        rr = apply_op(ref, op)
        seq = last_seq(store)
        entry = {"i": i, "op": op, "res": rm, "seq": seq}
        if BORDER is not None and seq != prev:
            new = sorted({p for p in paths if not isolated(p, spread)})
            if new:
                entry["spread"] = new
            entry["inodes"] = sorted(before | inodes(ref, paths))
        recent.append(entry)
        if rm != rr:
            die(f"operation {i} {short(op)}: the mount gave {rm}, the reference {rr}")
        k = op["op"]
        (ok if rm[0] == "ok" else err)[k] = (ok if rm[0] == "ok" else err).get(k, 0) + 1
        if k in READ_ONLY and seq != prev:
            die(f"operation {i} {short(op)} only reads, but the last sequence number "
                f"went from {prev} to {seq}")
        if rm[0] == "err" and seq != prev:
            die(f"operation {i} {short(op)} failed with {rm[1]} everywhere, but the "
                f"daemon recorded changes {prev + 1}..={seq} for it")
        trivial = k == "chown" and op["uid"] == -1 and op["gid"] == -1
        if BORDER is not None and not any(entangled(p, spread) for p in paths + links) \
                and not (before | below) & touched and seq != prev:
            die(f"operation {i} {short(op)} acts outside the isolated {BORDER} and the paths "
                f"pending changes name ({sorted(spread)}), but the daemon recorded changes "
                f"{prev + 1}..={seq} for it")
        recorded = BORDER is None or any(isolated(p, spread) for p in paths)
        spread.update(entry.get("spread", []))
        touched.update(entry.get("inodes", []))
        if rm[0] == "ok" and k in MUST_RECORD and recorded and not trivial and seq == prev:
            die(f"operation {i} {short(op)} succeeded but recorded no change "
                f"(last sequence number still {seq})")
        if rm[0] == "ok" and k not in READ_ONLY and recorded and seq == prev:
            norecord[k] = norecord.get(k, 0) + 1
        if k == "utime" and rm[0] == "ok":
            explicit.add(op["mtime"])
        prev = seq
        out.write(json.dumps(entry) + "\n")
        out.flush()
        if k not in READ_ONLY:
            diffs = []
            for rel in op_paths(op):
                diffs += diff_obj(rel, describe(mnt, rel), describe(ref, rel), explicit)
            if diffs:
                die(f"after operation {i} {short(op)} (result {rm}), the mount differs "
                    f"from the reference:\n" + "\n".join(explain(mnt, ref, diffs)))
        if (i - first + 1) % full_every == 0 or i == first + count - 1:
            diffs = diff_trees(snapshot(mnt), snapshot(ref), explicit)
            if diffs:
                die(f"after operation {i}, the mount differs from the reference:\n"
                    + "\n".join(explain(mnt, ref, diffs)))
    out.close()
    print(json.dumps({"ok": ok, "err": err, "no_change_recorded": norecord, "last_seq": prev}))


def cmd_replay(d, oplog, k):
    for e in read_oplog(oplog):
        if e["i"] > k:
            break
        if e["op"]["op"] in READ_ONLY:
            continue
        r = apply_op(d, e["op"])
        if r != e["res"]:
            fail(f"replaying operation {e['i']} {json.dumps(e['op'])} onto {d} gave {r}, "
                 f"not {e['res']} as logged")


def cmd_compare(a, b, oplog):
    diffs = diff_trees(snapshot(a), snapshot(b), explicit_mtimes(read_oplog(oplog)))
    if diffs:
        fail(f"{a} differs from {b}:\n" + "\n".join(explain(a, b, diffs)))


def cmd_same_manifest(d, path):
    with open(path) as f:
        want = json.load(f)
    have = manifest(d)
    diffs = []
    for rel in sorted(set(want) | set(have)):
        w, h = want.get(rel), have.get(rel)
        if w != h:
            if w is None or h is None:
                diffs.append(f"{rel or '.'}: {'appeared' if w is None else 'vanished'}")
            else:
                diffs.append(f"{rel or '.'}: " + ", ".join(
                    f"{k} {w.get(k)} -> {h.get(k)}" for k in sorted(set(w) | set(h))
                    if w.get(k) != h.get(k)))
    if diffs:
        fail(f"{d} was changed:\n" + "\n".join(diffs))


def main(argv):
    cmd = argv[1]
    if cmd == "build":
        build(argv[2])
    elif cmd == "manifest":
        with open(argv[3], "w") as f:
            json.dump(manifest(argv[2]), f)
    elif cmd == "same-manifest":
        cmd_same_manifest(argv[2], argv[3])
    elif cmd == "run":
        mnt, ref, store, seed, first, count, oplog = argv[2:9]
        full_every = int(argv[10]) if len(argv) > 10 and argv[9] == "--full-every" else 250
        cmd_run(mnt, ref, store, seed, int(first), int(count), oplog, full_every)
    elif cmd == "replay":
        cmd_replay(argv[2], argv[3], int(argv[4]))
    elif cmd == "compare":
        cmd_compare(argv[2], argv[3], argv[4])
    else:
        fail(f"unknown command {cmd}")


if __name__ == "__main__":
    main(sys.argv)
