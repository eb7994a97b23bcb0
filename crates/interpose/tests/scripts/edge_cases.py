#!/usr/bin/env python3
"""POSIX file-system edge cases, asserted.

Usage: edge_cases.py DIR [CHECK...]

Runs every check (or the named ones, e.g. `readdir locks`) in a new subdirectory of DIR
named after it; DIR must exist and be writable. A failing check is reported on stderr
with a clear message; the script then goes on with the next check and finally exits 1
if any failed.

It always prints one JSON object on stdout: "failed" (the failed checks) and
"observations", values that are not asserted exactly (errno choices, hole offsets,
getfacl output, optional features, ...) but must be the same for the same script on the
same kind of backing file system. Callers compare the observations of a run on a plain
directory with those of a run on a mount.

Adapts to the effective user: root-only checks (chown to others, device nodes) are
skipped otherwise, and permission expectations follow the euid.
"""

import collections
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import json
import mmap
import os
import select
import shutil
import stat
import subprocess
import sys
import threading
import time
import traceback

ROOT = os.geteuid() == 0
PAGE = mmap.PAGESIZE
OBS = {}
PY = sys.executable or "/usr/bin/python3"

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2


class Failure(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Failure(msg)


def eq(got, want, what):
    if got != want:
        raise Failure(f"{what}: got {got!r}, expected {want!r}")


def ename(e):
    return errno.errorcode.get(e, str(e))


def expect_errno(fn, *allowed, what):
    """Runs fn, which must fail with one of `allowed`; returns the errno name seen."""
    try:
        res = fn()
    except OSError as e:
        if e.errno in allowed:
            return ename(e.errno)
        raise Failure(
            f"{what}: failed with {ename(e.errno)} ({e}), expected "
            + "/".join(ename(a) for a in allowed)
        ) from None
    raise Failure(
        f"{what}: succeeded (returned {res!r}), expected "
        + "/".join(ename(a) for a in allowed)
    )


def outcome(fn):
    """'ok' or the errno name: for observations."""
    try:
        fn()
        return "ok"
    except OSError as e:
        return ename(e.errno)


def j(*parts):
    return os.path.join(*parts)


def write(path, data, mode=0o644):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
    finally:
        os.close(fd)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def oserror():
    e = ctypes.get_errno()
    return OSError(e, os.strerror(e))


def renameat2(old, new, flags):
    if hasattr(libc, "renameat2"):
        fn = libc.renameat2
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        rc = fn(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags)
    else:  # x86_64 syscall number
        fn = libc.syscall
        fn.argtypes = [ctypes.c_long] * 6
        rc = fn(316, AT_FDCWD, ctypes.c_char_p(os.fsencode(old)), AT_FDCWD,
                ctypes.c_char_p(os.fsencode(new)), flags)
    if rc != 0:
        raise oserror()


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def utimensat(path, atime, mtime, flags=0):
    """atime/mtime: (sec, nsec) tuples; nsec may be UTIME_NOW or UTIME_OMIT."""
    times = (Timespec * 2)(Timespec(*atime), Timespec(*mtime))
    fn = libc.utimensat
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(Timespec), ctypes.c_int]
    if fn(AT_FDCWD, os.fsencode(path), times, flags) != 0:
        raise oserror()


def fallocate(fd, mode, offset, length):
    fn = libc.fallocate
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    if fn(fd, mode, offset, length) != 0:
        raise oserror()


def c_getxattr(path, name, size):
    """getxattr(2) with an explicit buffer size: returns the length or raises."""
    fn = libc.getxattr
    fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
    fn.restype = ctypes.c_ssize_t
    buf = ctypes.create_string_buffer(max(size, 1))
    n = fn(os.fsencode(path), name.encode(), buf if size else None, size)
    if n < 0:
        raise oserror()
    return n


def in_child(fn):
    """Runs fn() in a forked child; returns what it returned (a JSON-able value) or raises
    Failure with the child's error."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            out = {"ok": fn()}
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            out = {"err": f"{type(e).__name__}: {e}"}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    if not data:
        raise Failure("child process died without reporting")
    out = json.loads(data)
    if "err" in out:
        raise Failure(f"in child process: {out['err']}")
    return out["ok"]


# ---------------------------------------------------------------------------------------
# Checks. Each gets a fresh directory.


def check_hard_links(d):
    f, g = j(d, "f"), j(d, "g")
    write(f, b"data")
    os.link(f, g)
    sf, sg = os.stat(f), os.stat(g)
    eq(sg.st_ino, sf.st_ino, "st_ino of two hard links")
    eq(sf.st_nlink, 2, "nlink after link")
    os.mkdir(j(d, "sub"))
    h = j(d, "sub", "h")
    os.link(g, h)
    eq(os.stat(h).st_ino, sf.st_ino, "st_ino of a link in another directory")
    eq(os.stat(f).st_nlink, 3, "nlink after second link (through the first name)")
    with open(h, "r+b") as fh:
        fh.write(b"DA")
    eq(read(f), b"DAta", "data written through one link, read through another")
    os.unlink(g)
    eq(os.stat(f).st_nlink, 2, "nlink after unlink of one name")
    eq(os.stat(h).st_nlink, 2, "nlink after unlink, through the other name")
    check(not os.path.lexists(g), "unlinked name still exists")
    fd = os.open(f, os.O_RDWR)
    try:
        os.unlink(f)
        eq(os.stat(h).st_nlink, 1, "nlink after unlinking while open")
        os.unlink(h)
        eq(os.fstat(fd).st_nlink, 0, "fstat nlink of an open, fully unlinked file")
        eq(os.pread(fd, 4, 0), b"DAta", "read from an open, unlinked file")
        os.pwrite(fd, b"x", 10)
        eq(os.fstat(fd).st_size, 11, "size after writing to an open, unlinked file")
    finally:
        os.close(fd)
    # Renaming over one name of a linked file drops its link count.
    a, a2, b = j(d, "a"), j(d, "a2"), j(d, "b")
    write(a, b"A")
    os.link(a, a2)
    write(b, b"B")
    os.rename(b, a)
    eq(os.stat(a2).st_nlink, 1, "nlink of the survivor after rename over its sibling link")
    eq(read(a), b"B", "content after rename over a link")
    eq(read(a2), b"A", "content of the other link after rename over its sibling")
    expect_errno(lambda: os.link(a, a2), errno.EEXIST, what="link onto an existing name")
    expect_errno(
        lambda: os.link(j(d, "sub"), j(d, "sublink")), errno.EPERM, what="hard link to a directory"
    )
    expect_errno(
        lambda: os.link(j(d, "missing"), j(d, "x")), errno.ENOENT, what="link of a missing file"
    )
    # A hard link to a symlink itself (linkat without AT_SYMLINK_FOLLOW).
    os.symlink("a", j(d, "sl"))
    os.link(j(d, "sl"), j(d, "sl2"), follow_symlinks=False)
    st = os.lstat(j(d, "sl2"))
    check(stat.S_ISLNK(st.st_mode), "hard link to a symlink is not a symlink")
    eq(st.st_ino, os.lstat(j(d, "sl")).st_ino, "st_ino of hard-linked symlinks")
    eq(os.lstat(j(d, "sl")).st_nlink, 2, "nlink of a hard-linked symlink")
    eq(os.readlink(j(d, "sl2")), "a", "target of a hard-linked symlink")
    eq(os.stat(a).st_nlink, 1, "following symlink target's nlink unchanged by link of the link")
    # Many links, then remove them all but one.
    for i in range(20):
        os.link(a, j(d, f"many{i}"))
    eq(os.stat(a).st_nlink, 21, "nlink after 20 links")
    for i in range(20):
        os.unlink(j(d, f"many{i}"))
    eq(os.stat(a).st_nlink, 1, "nlink after removing 20 links")


def check_rename_flags(d):
    a, b, c = j(d, "a"), j(d, "b"), j(d, "c")
    write(a, b"A")
    write(b, b"B")
    expect_errno(
        lambda: renameat2(a, b, RENAME_NOREPLACE), errno.EEXIST, what="RENAME_NOREPLACE onto existing"
    )
    eq(read(a), b"A", "source after failed RENAME_NOREPLACE")
    eq(read(b), b"B", "target after failed RENAME_NOREPLACE")
    ino_a = os.stat(a).st_ino
    renameat2(a, c, RENAME_NOREPLACE)
    check(not os.path.lexists(a), "source still exists after RENAME_NOREPLACE")
    eq(read(c), b"A", "content after RENAME_NOREPLACE")
    eq(os.stat(c).st_ino, ino_a, "st_ino after rename")
    ino_b = os.stat(b).st_ino
    renameat2(c, b, RENAME_EXCHANGE)
    eq(read(c), b"B", "RENAME_EXCHANGE: first name")
    eq(read(b), b"A", "RENAME_EXCHANGE: second name")
    eq(os.stat(b).st_ino, ino_a, "RENAME_EXCHANGE: inode follows its content")
    eq(os.stat(c).st_ino, ino_b, "RENAME_EXCHANGE: inode follows its content (2)")
    # Exchange a file with a directory.
    dd = j(d, "dd")
    os.mkdir(dd)
    write(j(dd, "inner"), b"I")
    renameat2(b, dd, RENAME_EXCHANGE)
    check(os.path.isdir(b), "RENAME_EXCHANGE file<->dir: dir not at the file's name")
    eq(read(j(b, "inner")), b"I", "RENAME_EXCHANGE file<->dir: dir content")
    eq(read(dd), b"A", "RENAME_EXCHANGE file<->dir: file content")
    expect_errno(
        lambda: renameat2(c, j(d, "missing"), RENAME_EXCHANGE),
        errno.ENOENT,
        what="RENAME_EXCHANGE with a missing target",
    )
    expect_errno(
        lambda: renameat2(c, dd, RENAME_EXCHANGE | RENAME_NOREPLACE),
        errno.EINVAL,
        what="RENAME_EXCHANGE|RENAME_NOREPLACE",
    )
    OBS["rename.noreplace_onto_self"] = outcome(lambda: renameat2(c, c, RENAME_NOREPLACE))
    # Exchange across directories.
    x, y = j(d, "x"), j(d, "y")
    os.mkdir(x)
    os.mkdir(y)
    write(j(x, "f"), b"X")
    write(j(y, "g"), b"Y")
    renameat2(j(x, "f"), j(y, "g"), RENAME_EXCHANGE)
    eq(read(j(x, "f")), b"Y", "cross-directory RENAME_EXCHANGE (1)")
    eq(read(j(y, "g")), b"X", "cross-directory RENAME_EXCHANGE (2)")
    # Exchange two directories with different subdirectory counts: parent nlink unchanged.
    os.mkdir(j(x, "s1"))
    nx, ny = os.stat(x).st_nlink, os.stat(y).st_nlink
    renameat2(x, y, RENAME_EXCHANGE)
    eq(os.stat(j(d, "y")).st_nlink, nx, "nlink of exchanged directory")
    eq(os.stat(j(d, "x")).st_nlink, ny, "nlink of exchanged directory (2)")
    check(os.path.isdir(j(y, "s1")), "subdirectory follows its exchanged directory")


def check_rename_over(d):
    p, q = j(d, "p"), j(d, "q")
    write(p, b"old")
    write(q, b"new")
    fd = os.open(p, os.O_RDONLY)
    try:
        ino_q = os.stat(q).st_ino
        os.rename(q, p)
        eq(read(p), b"new", "content after rename over existing file")
        check(not os.path.lexists(q), "source name still exists after rename")
        eq(os.stat(p).st_ino, ino_q, "st_ino after rename over")
        eq(os.pread(fd, 3, 0), b"old", "replaced file still readable through an open fd")
        eq(os.fstat(fd).st_nlink, 0, "replaced open file has nlink 0")
    finally:
        os.close(fd)
    os.rename(p, p)
    eq(read(p), b"new", "rename onto itself")
    p2 = j(d, "p2")
    os.link(p, p2)
    os.rename(p, p2)  # two links to one file: POSIX says nothing happens
    check(os.path.exists(p) and os.path.exists(p2), "rename between two links of one file")
    # Directory renames.
    D, E, F, G = (j(d, n) for n in "DEFG")
    os.makedirs(j(D, "sub"))
    write(j(D, "sub", "f"), b"f")
    os.rename(D, E)
    eq(read(j(E, "sub", "f")), b"f", "content of renamed directory")
    check(not os.path.lexists(D), "old directory name still exists")
    os.mkdir(F)
    os.rename(E, F)
    eq(read(j(F, "sub", "f")), b"f", "directory renamed over an empty directory")
    check(not os.path.lexists(E), "old name after rename over empty dir")
    os.mkdir(G)
    write(j(G, "x"), b"x")
    OBS["rename.dir_over_nonempty"] = expect_errno(
        lambda: os.rename(F, G), errno.ENOTEMPTY, errno.EEXIST, what="rename dir over non-empty dir"
    )
    expect_errno(
        lambda: os.rename(F, j(F, "sub", "inside")), errno.EINVAL, what="rename dir into itself"
    )
    expect_errno(lambda: os.rename(p, G), errno.EISDIR, what="rename file over directory")
    expect_errno(lambda: os.rename(G, p), errno.ENOTDIR, what="rename directory over file")
    expect_errno(lambda: os.rename(j(d, "nope"), j(d, "x")), errno.ENOENT, what="rename missing")
    # Moving a subdirectory between parents updates both parents' link counts.
    P1, P2 = j(d, "P1"), j(d, "P2")
    os.makedirs(j(P1, "child"))
    os.mkdir(P2)
    n1, n2 = os.stat(P1).st_nlink, os.stat(P2).st_nlink
    os.rename(j(P1, "child"), j(P2, "child"))
    eq(os.stat(P1).st_nlink, n1 - 1, "old parent nlink after moving a subdirectory out")
    eq(os.stat(P2).st_nlink, n2 + 1, "new parent nlink after moving a subdirectory in")
    # A renamed file keeps its open descriptors working.
    r = j(d, "r")
    fd = os.open(r, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"12")
        os.rename(r, j(P2, "r-moved"))
        os.write(fd, b"34")
    finally:
        os.close(fd)
    eq(read(j(P2, "r-moved")), b"1234", "writes through an fd across a rename")


def check_seek_data_hole(d):
    f = j(d, "sparse")
    size = 2 << 20
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"a" * 4096, 0)
        os.pwrite(fd, b"b" * 4096, 1 << 20)
        os.ftruncate(fd, size)
        os.fsync(fd)
        eq(os.fstat(fd).st_size, size, "size of sparse file")
        eq(os.lseek(fd, 0, os.SEEK_DATA), 0, "SEEK_DATA at 0")
        h = os.lseek(fd, 0, os.SEEK_HOLE)
        OBS["seek.hole0"] = h
        if h == size:
            OBS["seek.no_holes"] = True
            return
        check(4096 <= h <= 1 << 20, f"first hole at {h}, expected within [4096, 1 MiB]")
        eq(os.lseek(fd, h, os.SEEK_DATA), 1 << 20, "SEEK_DATA from the first hole")
        eq(os.read(fd, 1), b"b", "read at the position SEEK_DATA moved to")
        h2 = os.lseek(fd, 1 << 20, os.SEEK_HOLE)
        OBS["seek.hole1"] = h2
        check((1 << 20) + 4096 <= h2 <= size, f"second hole at {h2}")
        if h2 < size:
            expect_errno(
                lambda: os.lseek(fd, h2, os.SEEK_DATA), errno.ENXIO, what="SEEK_DATA in the final hole"
            )
            eq(os.lseek(fd, size - 1, os.SEEK_HOLE), size - 1, "SEEK_HOLE inside a hole")
        expect_errno(lambda: os.lseek(fd, size, os.SEEK_DATA), errno.ENXIO, what="SEEK_DATA at EOF")
        expect_errno(lambda: os.lseek(fd, size, os.SEEK_HOLE), errno.ENXIO, what="SEEK_HOLE at EOF")
        check(os.fstat(fd).st_blocks * 512 < size, "sparse file is not sparse (st_blocks)")
        # Punch a hole where the first data was.
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096)
        eq(os.pread(fd, 4096, 0), b"\0" * 4096, "data after punching a hole")
        eq(os.fstat(fd).st_size, size, "size after punching a hole (KEEP_SIZE)")
        eq(os.lseek(fd, 0, os.SEEK_DATA), 1 << 20, "SEEK_DATA after punching the first block")
        # posix_fallocate extends the file.
        os.posix_fallocate(fd, 0, 3 << 20)
        eq(os.fstat(fd).st_size, 3 << 20, "size after posix_fallocate")
        eq(os.pread(fd, 4096, 1 << 20), b"b" * 4096, "data kept by posix_fallocate")
    finally:
        os.close(fd)
    # Through a second open file, the same answers.
    fd = os.open(f, os.O_RDONLY)
    try:
        eq(os.lseek(fd, 0, os.SEEK_DATA), 0, "SEEK_DATA after posix_fallocate")
        eq(os.lseek(fd, 0, os.SEEK_END), 3 << 20, "SEEK_END")
    finally:
        os.close(fd)


def check_xattrs(d):
    f = j(d, "f")
    write(f, b"x")
    os.setxattr(f, "user.a", b"1")
    eq(os.getxattr(f, "user.a"), b"1", "getxattr")
    binval = bytes(range(256)) * 4
    os.setxattr(f, "user.bin", binval)
    eq(os.getxattr(f, "user.bin"), binval, "binary xattr value with NULs")
    os.setxattr(f, "user.empty", b"")
    eq(os.getxattr(f, "user.empty"), b"", "empty xattr value")
    eq(sorted(os.listxattr(f)), ["user.a", "user.bin", "user.empty"], "listxattr")
    expect_errno(
        lambda: os.setxattr(f, "user.a", b"2", os.XATTR_CREATE), errno.EEXIST, what="XATTR_CREATE on existing"
    )
    expect_errno(
        lambda: os.setxattr(f, "user.nope", b"2", os.XATTR_REPLACE),
        errno.ENODATA,
        what="XATTR_REPLACE on missing",
    )
    os.setxattr(f, "user.a", b"22", os.XATTR_REPLACE)
    eq(os.getxattr(f, "user.a"), b"22", "value after XATTR_REPLACE")
    expect_errno(lambda: os.getxattr(f, "user.missing"), errno.ENODATA, what="getxattr of missing")
    eq(c_getxattr(f, "user.bin", 0), len(binval), "getxattr size query")
    expect_errno(lambda: c_getxattr(f, "user.bin", 10), errno.ERANGE, what="getxattr into a small buffer")
    os.removexattr(f, "user.a")
    expect_errno(lambda: os.getxattr(f, "user.a"), errno.ENODATA, what="getxattr after removexattr")
    expect_errno(lambda: os.removexattr(f, "user.a"), errno.ENODATA, what="removexattr of missing")
    eq(sorted(os.listxattr(f)), ["user.bin", "user.empty"], "listxattr after remove")
    # Through a descriptor.
    fd = os.open(f, os.O_RDONLY)
    try:
        os.setxattr(fd, "user.fd", b"via fd")
        eq(os.getxattr(fd, "user.fd"), b"via fd", "fgetxattr")
    finally:
        os.close(fd)
    eq(os.getxattr(f, "user.fd"), b"via fd", "fsetxattr seen by path")
    # Directories.
    os.mkdir(j(d, "dir"))
    os.setxattr(j(d, "dir"), "user.d", b"dir")
    eq(os.getxattr(j(d, "dir"), "user.d"), b"dir", "xattr on a directory")
    # Symlinks: user.* is not allowed on them, and the target must not be touched.
    os.symlink("f", j(d, "sl"))
    eq(os.listxattr(j(d, "sl"), follow_symlinks=False), [], "llistxattr of a symlink")
    expect_errno(
        lambda: os.setxattr(j(d, "sl"), "user.l", b"1", follow_symlinks=False),
        errno.EPERM,
        what="lsetxattr user.* on a symlink",
    )
    check("user.l" not in os.listxattr(f), "lsetxattr on a symlink changed its target")
    os.setxattr(j(d, "sl"), "user.via", b"1")  # follows to f
    eq(os.getxattr(f, "user.via"), b"1", "setxattr through a symlink reaches the target")
    OBS["xattr.bad_namespace"] = outcome(lambda: os.setxattr(f, "nonamespace", b"1"))
    OBS["xattr.big_value"] = outcome(lambda: os.setxattr(f, "user.big", b"v" * 65536))
    OBS["xattr.trusted"] = outcome(lambda: os.setxattr(f, "trusted.t", b"1"))
    OBS["xattr.list_final"] = sorted(os.listxattr(f))
    # Many attributes.
    for i in range(50):
        os.setxattr(j(d, "dir"), f"user.n{i:02}", str(i).encode())
    names = [n for n in os.listxattr(j(d, "dir")) if n.startswith("user.n")]
    eq(sorted(names), [f"user.n{i:02}" for i in range(50)], "listxattr of 50 attributes")


def run(cmd):
    p = subprocess.run(cmd, capture_output=True)
    if p.returncode != 0:
        raise Failure(f"{cmd} failed ({p.returncode}): {p.stderr.decode(errors='replace')}")
    return p.stdout.decode(errors="replace")


def check_acl(d):
    if not shutil.which("setfacl") or not shutil.which("getfacl"):
        raise Failure("setfacl/getfacl missing: install the acl package (scripts/setup.sh does)")
    f = j(d, "f")
    write(f, b"x", 0o640)
    os.chmod(f, 0o640)
    run(["setfacl", "-m", "u:65534:rw,g:65534:r", f])
    out = run(["getfacl", "-cn", f])
    OBS["acl.file"] = out
    check("user:65534:rw-" in out, f"getfacl lacks the user entry:\n{out}")
    check("mask::rw-" in out, f"getfacl lacks the mask:\n{out}")
    check(len(os.getxattr(f, "system.posix_acl_access")) > 0, "no system.posix_acl_access xattr")
    eq(stat.S_IMODE(os.stat(f).st_mode), 0o660, "mode group bits show the ACL mask")
    run(["setfacl", "-b", f])
    expect_errno(
        lambda: os.getxattr(f, "system.posix_acl_access"), errno.ENODATA, what="ACL xattr after setfacl -b"
    )
    OBS["acl.mode_after_b"] = oct(stat.S_IMODE(os.stat(f).st_mode))
    # Default ACLs are inherited and override the umask.
    D = j(d, "D")
    os.mkdir(D, 0o755)
    run(["setfacl", "-d", "-m", "u::rwx,g::rx,o::-,u:65534:rwx", D])
    out = run(["getfacl", "-cn", D])
    check("default:user:65534:rwx" in out, f"default ACL missing:\n{out}")
    old = os.umask(0o077)
    try:
        fd = os.open(j(D, "new"), os.O_CREAT | os.O_WRONLY, 0o666)
        os.close(fd)
        os.mkdir(j(D, "sub"), 0o777)
    finally:
        os.umask(old)
    out = run(["getfacl", "-cn", j(D, "new")])
    OBS["acl.inherited_file"] = out
    OBS["acl.inherited_file_mode"] = oct(stat.S_IMODE(os.stat(j(D, "new")).st_mode))
    check("user:65534:rwx" in out and "mask::rw-" in out, f"file did not inherit the default ACL:\n{out}")
    # umask 077 would give 0600; the default ACL gives group (mask) rw and other none.
    eq(stat.S_IMODE(os.stat(j(D, "new")).st_mode), 0o660, "mode of a file created under a default ACL")
    out = run(["getfacl", "-cn", j(D, "sub")])
    OBS["acl.inherited_dir"] = out
    check("default:user:65534:rwx" in out, f"subdirectory did not inherit the default ACL:\n{out}")
    eq(stat.S_IMODE(os.stat(j(D, "sub")).st_mode), 0o770, "mode of a dir created under a default ACL")
    # Removing an ACL that is not there succeeds (ext4 does so); an empty default ACL is
    # such a removal (what acl_set_file, and so tar --acls, sends for every directory).
    E = j(d, "acl_none")
    os.mkdir(E)
    write(j(E, "f"), b"")
    os.setxattr(E, "system.posix_acl_default", b"\x02\x00\x00\x00")
    os.removexattr(E, "system.posix_acl_default")
    os.removexattr(j(E, "f"), "system.posix_acl_access")
    expect_errno(lambda: os.removexattr(j(E, "f"), "user.none"), errno.ENODATA, what="removal of a user xattr not set")


def check_umask(d):
    old = os.umask(0o027)
    try:
        fd = os.open(j(d, "f"), os.O_CREAT | os.O_WRONLY, 0o777)
        os.close(fd)
        os.mkdir(j(d, "dir"), 0o777)
        os.mkfifo(j(d, "fifo"), 0o666)
        os.symlink("f", j(d, "sl"))
        os.umask(0)
        fd = os.open(j(d, "g"), os.O_CREAT | os.O_WRONLY, 0o777)
        os.close(fd)
        os.mkdir(j(d, "dir2"), 0o1777)
    finally:
        os.umask(old)
    mode = lambda n: stat.S_IMODE(os.lstat(j(d, n)).st_mode)  # noqa: E731
    eq(mode("f"), 0o750, "file created with umask 027")
    eq(mode("dir"), 0o750, "dir created with umask 027")
    eq(mode("fifo"), 0o640, "fifo created with umask 027")
    eq(mode("sl"), 0o777, "symlink mode")
    eq(mode("g"), 0o777, "file created with umask 0")
    eq(mode("dir2"), 0o1777, "sticky dir created with umask 0")


def check_open_flags(d):
    # O_APPEND
    f = j(d, "append")
    write(f, b"abc")
    fd = os.open(f, os.O_WRONLY | os.O_APPEND)
    fd2 = os.open(f, os.O_WRONLY | os.O_APPEND)
    fd3 = os.open(f, os.O_WRONLY)
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"def")
        eq(read(f), b"abcdef", "O_APPEND write after seeking to 0")
        os.write(fd2, b"g")
        os.write(fd, b"h")
        eq(read(f), b"abcdefgh", "interleaved O_APPEND writes through two fds")
        os.pwrite(fd, b"P", 0)
        eq(read(f), b"abcdefghP", "pwrite on an O_APPEND fd appends (Linux)")
        os.write(fd3, b"Z")
        os.write(fd2, b"i")
        eq(read(f), b"ZbcdefghPi", "plain write at 0 then append")
        OBS["append.pos_after_pwrite"] = os.lseek(fd, 0, os.SEEK_CUR)
    finally:
        os.close(fd)
        os.close(fd2)
        os.close(fd3)
    # O_EXCL
    expect_errno(
        lambda: os.open(f, os.O_CREAT | os.O_EXCL | os.O_WRONLY), errno.EEXIST, what="O_EXCL on existing file"
    )
    os.symlink("nothere", j(d, "dangling"))
    expect_errno(
        lambda: os.open(j(d, "dangling"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644),
        errno.EEXIST,
        what="O_EXCL on a dangling symlink",
    )
    check(not os.path.lexists(j(d, "nothere")), "O_EXCL through a dangling symlink created its target")
    os.close(os.open(j(d, "dangling"), os.O_CREAT | os.O_WRONLY, 0o644))
    check(os.path.isfile(j(d, "nothere")), "O_CREAT through a dangling symlink did not create the target")
    os.mkdir(j(d, "dir"))
    expect_errno(
        lambda: os.open(j(d, "dir"), os.O_CREAT | os.O_EXCL | os.O_WRONLY), errno.EEXIST, what="O_EXCL on a dir"
    )
    expect_errno(lambda: os.open(j(d, "dir"), os.O_WRONLY), errno.EISDIR, what="opening a dir for writing")
    expect_errno(
        lambda: os.open(j(d, "dangling"), os.O_RDONLY | os.O_NOFOLLOW), errno.ELOOP, what="O_NOFOLLOW on symlink"
    )
    expect_errno(lambda: os.open(f, os.O_RDONLY | os.O_DIRECTORY), errno.ENOTDIR, what="O_DIRECTORY on a file")
    expect_errno(lambda: os.open(j(f, "x"), os.O_RDONLY), errno.ENOTDIR, what="a file as a path component")
    expect_errno(lambda: os.open(j(d, "missing"), os.O_RDONLY), errno.ENOENT, what="open of a missing file")
    # Racing exclusive creates: exactly one winner per name.
    names = [j(d, f"race{i}") for i in range(20)]
    wins = collections.Counter()
    errors = []
    lock = threading.Lock()

    def racer():
        for n in names:
            try:
                os.close(os.open(n, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                with lock:
                    wins[n] += 1
            except FileExistsError:
                pass
            except OSError as e:  # pragma: no cover - reported below
                with lock:
                    errors.append(f"{n}: {e}")

    threads = [threading.Thread(target=racer) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    check(not errors, f"racing O_EXCL creates failed oddly: {errors[:3]}")
    for n in names:
        eq(wins[n], 1, f"winners of the O_EXCL race for {os.path.basename(n)}")
    # O_TRUNC
    t = j(d, "trunc")
    write(t, b"x" * 10000)
    r = os.open(t, os.O_RDONLY)
    try:
        eq(os.read(r, 2), b"xx", "read before truncation")
        fd = os.open(t, os.O_WRONLY | os.O_TRUNC)
        eq(os.fstat(fd).st_size, 0, "size after O_TRUNC")
        os.write(fd, b"Q")
        os.close(fd)
        eq(os.pread(r, 100, 0), b"Q", "a reader's view after another open truncated and wrote")
    finally:
        os.close(r)
    OBS["open.rdonly_trunc"] = outcome(lambda: os.close(os.open(t, os.O_RDONLY | os.O_TRUNC)))
    OBS["open.rdonly_trunc_size"] = os.stat(t).st_size
    # Writing to a read-only fd, reading a write-only fd.
    fd = os.open(t, os.O_RDONLY)
    try:
        expect_errno(lambda: os.write(fd, b"x"), errno.EBADF, what="write to an O_RDONLY fd")
    finally:
        os.close(fd)
    fd = os.open(t, os.O_WRONLY)
    try:
        expect_errno(lambda: os.read(fd, 1), errno.EBADF, what="read from an O_WRONLY fd")
    finally:
        os.close(fd)


def check_append_opens(d):
    # Writes the kernel sends to a given place through an O_APPEND open must land there:
    # a shared mapping's writeback, and the pieces of one large O_DIRECT append. (The
    # daemon's own descriptor kept O_APPEND, so pwrite(2) put them at the end.)
    f = j(d, "mapped")
    write(f, b"." * 8192)
    fd = os.open(f, os.O_RDWR | os.O_APPEND)
    try:
        m = mmap.mmap(fd, 8192)
        m[0:6] = b"MAPPED"
        m.flush()
        m.close()
    finally:
        os.close(fd)
    got = read(f)
    eq((len(got), got[:6]), (8192, b"MAPPED"), "shared mapping of an O_APPEND open")
    n = 8 << 20
    buf = mmap.mmap(-1, n)  # page-aligned, for O_DIRECT
    for i in range(n // 4096):
        buf[i * 4096 : (i + 1) * 4096] = (b"%08d" % i) * 512
    f = j(d, "direct")
    try:
        fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_DIRECT, 0o644)
    except OSError as e:
        OBS["append.o_direct"] = ename(e)  # a backing FS without O_DIRECT
    else:
        try:
            os.writev(fd, [buf])
        finally:
            os.close(fd)
        got = read(f)
        misplaced = sum(got[i * 4096 : i * 4096 + 8] != b"%08d" % i for i in range(n // 4096))
        eq((len(got), misplaced), (n, 0), "8 MiB through an O_CREAT|O_APPEND|O_DIRECT open")
    # Dropping O_APPEND later (fcntl) or for one write (RWF_NOAPPEND): observed, since
    # with passthrough the kernel's backing file keeps the open's flags.
    for key, how in [("append.setfl_cleared", "setfl"), ("append.rwf_noappend", "rwf")]:
        f = j(d, key)
        write(f, b"." * 100)
        fd = os.open(f, os.O_WRONLY | os.O_APPEND)
        try:
            if how == "setfl":
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_APPEND)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, b"AT0")
            else:
                os.pwritev(fd, [b"AT0"], 0, 0x20)  # RWF_NOAPPEND
        finally:
            os.close(fd)
        OBS[key] = str(len(read(f)))


def check_truncate(d):
    f = j(d, "f")
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"hello world")
        os.ftruncate(fd, 5)
        eq(os.pread(fd, 100, 0), b"hello", "content after shrinking ftruncate")
        os.ftruncate(fd, 10000)
        eq(os.fstat(fd).st_size, 10000, "size after growing ftruncate")
        eq(os.pread(fd, 100, 0), b"hello" + b"\0" * 95, "zero fill after growing ftruncate")
        eq(os.pread(fd, 10, 9995), b"\0" * 5, "read at the new end")
        OBS["truncate.negative"] = expect_errno(lambda: os.ftruncate(fd, -1), errno.EINVAL, what="ftruncate(-1)")
    finally:
        os.close(fd)
    os.truncate(f, 3)
    eq(read(f), b"hel", "content after truncate(path)")
    eq(os.stat(f).st_size, 3, "size after truncate(path)")
    fd = os.open(f, os.O_RDONLY)
    try:
        OBS["truncate.rdonly_fd"] = expect_errno(
            lambda: os.ftruncate(fd, 0), errno.EINVAL, errno.EBADF, what="ftruncate of an O_RDONLY fd"
        )
    finally:
        os.close(fd)
    expect_errno(lambda: os.truncate(d, 0), errno.EISDIR, what="truncate of a directory")
    # Data past a shrink point must be gone even from a second open file.
    g = j(d, "g")
    write(g, b"0123456789" * 1000)
    r = os.open(g, os.O_RDONLY)
    try:
        eq(os.pread(r, 10, 5000), b"0123456789", "data before shrink")
        os.truncate(g, 5005)
        eq(os.pread(r, 10, 5000), b"01234", "a second fd's read after shrink")
        os.truncate(g, 6000)
        eq(os.pread(r, 10, 5000), b"01234" + b"\0" * 5, "a second fd's read after regrow")
    finally:
        os.close(r)


def check_times(d):
    f = j(d, "f")
    write(f, b"x")
    os.utime(f, ns=(1_000_000_001, 2_000_000_002))
    st = os.stat(f)
    eq((st.st_atime_ns, st.st_mtime_ns), (1_000_000_001, 2_000_000_002), "exact ns times after utime")
    utimensat(f, (0, UTIME_OMIT), (3, 3))
    st = os.stat(f)
    eq(st.st_atime_ns, 1_000_000_001, "atime kept with UTIME_OMIT")
    eq(st.st_mtime_ns, 3_000_000_003, "mtime set next to UTIME_OMIT")
    before = time.time_ns()
    utimensat(f, (0, UTIME_NOW), (0, UTIME_OMIT))
    after = time.time_ns()
    st = os.stat(f)
    check(before - 2_000_000_000 <= st.st_atime_ns <= after + 2_000_000_000, f"UTIME_NOW atime {st.st_atime_ns} not now")
    eq(st.st_mtime_ns, 3_000_000_003, "mtime kept with UTIME_OMIT (2)")
    os.utime(f, ns=(5, 5))
    os.utime(f)  # both now
    st = os.stat(f)
    check(st.st_mtime_ns > before - 2_000_000_000, "utime(None) did not set mtime to now")
    check(st.st_atime_ns > before - 2_000_000_000, "utime(None) did not set atime to now")
    # Symlinks: follow_symlinks=False changes the link only.
    os.symlink("f", j(d, "sl"))
    os.utime(f, ns=(100_000_000_000, 100_000_000_000))
    os.utime(j(d, "sl"), ns=(7_000_000_007, 8_000_000_008), follow_symlinks=False)
    lst = os.lstat(j(d, "sl"))
    eq((lst.st_atime_ns, lst.st_mtime_ns), (7_000_000_007, 8_000_000_008), "lutimes on a symlink")
    eq(os.stat(f).st_mtime_ns, 100_000_000_000, "lutimes on a symlink changed its target")
    os.utime(j(d, "sl"), ns=(9, 9))  # follows
    eq(os.stat(f).st_mtime_ns, 9, "utime through a symlink")
    eq(os.lstat(j(d, "sl")).st_mtime_ns, 8_000_000_008, "utime through a symlink changed the link")
    # Directories and descriptors.
    os.utime(d, ns=(11, 12))
    eq(os.stat(d).st_mtime_ns, 12, "utime on a directory")
    fd = os.open(f, os.O_RDWR)
    try:
        os.utime(fd, ns=(13, 14))
        eq(os.fstat(fd).st_mtime_ns, 14, "futimens")
        # Writes and truncates advance mtime and ctime.
        c0 = os.fstat(fd).st_ctime_ns
        os.write(fd, b"more")
        st = os.fstat(fd)
        check(st.st_mtime_ns > 14, "write did not update mtime")
        check(st.st_ctime_ns >= c0, "write moved ctime backwards")
        os.utime(fd, ns=(13, 14))
        os.ftruncate(fd, 1)
        check(os.fstat(fd).st_mtime_ns > 14, "ftruncate did not update mtime")
    finally:
        os.close(fd)
    os.utime(f, ns=(13, 14))
    eq(os.stat(f).st_mtime_ns, 14, "mtime through the path after futimens and write")
    # Creating an entry changes the directory's mtime.
    os.utime(d, ns=(11, 12))
    write(j(d, "new"), b"")
    check(os.stat(d).st_mtime_ns > 12, "creating a file did not update the directory mtime")
    os.utime(d, ns=(11, 12))
    os.unlink(j(d, "new"))
    check(os.stat(d).st_mtime_ns > 12, "unlinking a file did not update the directory mtime")
    # The epoch, far future, before 1970 (negative tv_sec with positive tv_nsec).
    os.utime(f, ns=(0, 0))
    eq(os.stat(f).st_mtime_ns, 0, "mtime at the epoch")
    os.utime(f, ns=(-1_000_000_000, 7_258_118_400_123_456_789))
    st = os.stat(f)
    eq(st.st_atime_ns, -1_000_000_000, "atime of -1 s")
    eq(st.st_mtime_ns, 7_258_118_400_123_456_789, "mtime in the year 2200")
    os.utime(f, ns=(-1_500_000_000, -1))
    st = os.stat(f)
    eq(st.st_atime_ns, -1_500_000_000, "atime of -1.5 s")
    eq(st.st_mtime_ns, -1, "mtime of -1 ns")


def check_chmod_chown(d):
    f = j(d, "f")
    write(f, b"x")
    for m in (0o4755, 0o2755, 0o1644, 0o000, 0o777, 0o640):
        if m & 0o2000 and not ROOT and os.stat(f).st_gid not in os.getgroups() + [os.getegid()]:
            continue
        os.chmod(f, m)
        eq(stat.S_IMODE(os.stat(f).st_mode), m, f"mode after chmod {oct(m)}")
    os.mkdir(j(d, "dir"))
    os.chmod(j(d, "dir"), 0o1777)
    eq(stat.S_IMODE(os.stat(j(d, "dir")).st_mode), 0o1777, "sticky dir mode")
    fd = os.open(f, os.O_RDONLY)
    try:
        os.chmod(fd, 0o600)
        eq(stat.S_IMODE(os.fstat(fd).st_mode), 0o600, "fchmod")
    finally:
        os.close(fd)
    os.symlink("f", j(d, "sl"))
    os.chmod(j(d, "sl"), 0o604)  # follows
    eq(stat.S_IMODE(os.stat(f).st_mode), 0o604, "chmod through a symlink")
    eq(stat.S_IMODE(os.lstat(j(d, "sl")).st_mode), 0o777, "chmod through a symlink changed the link")
    uid, gid = os.geteuid(), os.getegid()
    os.chown(f, uid, gid)  # to oneself: always allowed
    os.chown(f, -1, -1)
    if ROOT:
        os.chown(f, 65534, 65534)
        st = os.stat(f)
        eq((st.st_uid, st.st_gid), (65534, 65534), "owner after chown")
        os.chown(f, -1, 123)
        st = os.stat(f)
        eq((st.st_uid, st.st_gid), (65534, 123), "owner after chown(-1, gid)")
        os.chmod(f, 0o6755)
        os.chown(f, 0, 0)
        OBS["chown.setid_cleared"] = oct(stat.S_IMODE(os.stat(f).st_mode))
        eq(stat.S_IMODE(os.stat(f).st_mode) & 0o6000, 0, "chown keeps set-id bits")
        os.chown(j(d, "sl"), 4321, 4321, follow_symlinks=False)
        eq(os.lstat(j(d, "sl")).st_uid, 4321, "lchown of a symlink")
        eq(os.stat(f).st_uid, 0, "lchown of a symlink changed its target")
        os.chown(j(d, "dir"), 1000, 1000)
        eq(os.stat(j(d, "dir")).st_uid, 1000, "chown of a directory")
        fd = os.open(f, os.O_RDONLY)
        try:
            os.chown(fd, 777, 778)
            eq((os.fstat(fd).st_uid, os.fstat(fd).st_gid), (777, 778), "fchown")
        finally:
            os.close(fd)
    else:
        expect_errno(lambda: os.chown(f, 0, -1), errno.EPERM, what="chown to root as a user")
        # Writing to one's own set-user-ID file clears the bit (no CAP_FSETID).
        os.chmod(f, 0o4755)
        with open(f, "ab") as fh:
            fh.write(b"more")
        eq(stat.S_IMODE(os.stat(f).st_mode) & 0o4000, 0, "write by a user kept the set-user-ID bit")
        os.chmod(f, 0o4755)
        os.truncate(f, 1)
        eq(stat.S_IMODE(os.stat(f).st_mode) & 0o4000, 0, "truncate by a user kept the set-user-ID bit")
    expect_errno(lambda: os.chmod(j(d, "missing"), 0o600), errno.ENOENT, what="chmod of a missing file")


def check_special_files(d):
    p = j(d, "fifo")
    os.mkfifo(p, 0o600)
    check(stat.S_ISFIFO(os.lstat(p).st_mode), "mkfifo did not make a FIFO")
    expect_errno(lambda: os.mkfifo(p), errno.EEXIST, what="mkfifo over an existing name")
    r = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
    w = os.open(p, os.O_WRONLY)
    try:
        os.write(w, b"ping")
        ready, _, _ = select.select([r], [], [], 10)
        check(ready, "FIFO on the directory did not become readable")
        eq(os.read(r, 4), b"ping", "data through a FIFO")
    finally:
        os.close(r)
        os.close(w)
    q = j(d, "fifo2")
    os.mknod(q, 0o640 | stat.S_IFIFO)
    st = os.lstat(q)
    check(stat.S_ISFIFO(st.st_mode), "mknod(S_IFIFO) did not make a FIFO")
    eq(stat.S_IMODE(st.st_mode), 0o640 & ~current_umask(), "mode of mknod'ed FIFO")
    reg = j(d, "reg")
    os.mknod(reg, 0o644 | stat.S_IFREG)
    check(stat.S_ISREG(os.lstat(reg).st_mode), "mknod(S_IFREG) did not make a regular file")
    eq(os.lstat(reg).st_size, 0, "size of mknod'ed file")
    write(reg, b"data")
    eq(read(reg), b"data", "writing a mknod'ed regular file")
    if ROOT:
        c = j(d, "null")
        os.mknod(c, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        st = os.lstat(c)
        check(stat.S_ISCHR(st.st_mode), "mknod(S_IFCHR) did not make a char device")
        eq(st.st_rdev, os.makedev(1, 3), "st_rdev of a char device")
        # The mount may be nodev: the outcome is an observation, compared by the caller.
        OBS["special.chardev_open"] = outcome(lambda: os.close(os.open(c, os.O_WRONLY)))
    else:
        expect_errno(
            lambda: os.mknod(j(d, "null"), 0o666 | stat.S_IFCHR, os.makedev(1, 3)),
            errno.EPERM,
            what="mknod of a char device as a user",
        )
    # A Unix socket bound on the directory works.
    import socket

    sp = j(d, "sock")
    if len(os.fsencode(sp)) < 100:
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            srv.bind(sp)
            srv.listen(1)
            check(stat.S_ISSOCK(os.lstat(sp).st_mode), "bound socket is not S_IFSOCK")
            cli = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            cli.connect(sp)
            conn, _ = srv.accept()
            cli.sendall(b"hello")
            eq(conn.recv(5), b"hello", "data through a Unix socket bound on the directory")
            conn.close()
            cli.close()
        finally:
            srv.close()
        expect_errno(
            lambda: socket.socket(socket.AF_UNIX).bind(sp), errno.EADDRINUSE, what="bind to an existing path"
        )


def current_umask():
    m = os.umask(0)
    os.umask(m)
    return m


def check_symlinks(d):
    sl = j(d, "sl")
    os.symlink("target", sl)
    eq(os.readlink(sl), "target", "readlink")
    eq(os.lstat(sl).st_size, 6, "lstat size of a symlink")
    check(not os.path.exists(sl) and os.path.lexists(sl), "dangling symlink exists/lexists")
    write(j(d, "target"), b"T")
    eq(read(sl), b"T", "read through a symlink once the target exists")
    os.symlink("/etc/passwd", j(d, "abs"))
    eq(os.readlink(j(d, "abs")), "/etc/passwd", "absolute symlink target")
    check(os.path.isfile(j(d, "abs")), "absolute symlink to /etc/passwd does not resolve")
    long_target = "x/" * 2000
    os.symlink(long_target, j(d, "long"))
    eq(os.readlink(j(d, "long")), long_target, "4000-byte symlink target")
    OBS["symlink.too_long"] = outcome(lambda: os.symlink("y" * 4096, j(d, "toolong")))
    os.symlink(b"\xff\xfe/x", os.fsencode(j(d, "bin")))
    eq(os.readlink(os.fsencode(j(d, "bin"))), b"\xff\xfe/x", "non-UTF-8 symlink target")
    os.symlink("b", j(d, "a"))
    os.symlink("a", j(d, "b"))
    expect_errno(lambda: os.stat(j(d, "a")), errno.ELOOP, what="stat of a symlink loop")
    expect_errno(lambda: os.readlink(j(d, "target")), errno.EINVAL, what="readlink of a file")
    expect_errno(lambda: os.symlink("x", sl), errno.EEXIST, what="symlink over an existing name")
    OBS["symlink.empty_target"] = outcome(lambda: os.symlink("", j(d, "empty")))
    os.mkdir(j(d, "realdir"))
    write(j(d, "realdir", "inside"), b"i")
    os.symlink("realdir", j(d, "dirlink"))
    eq(os.listdir(j(d, "dirlink") + "/"), ["inside"], "listing through a symlink to a directory")
    check(not os.path.isdir(j(d, "dirlink")) or os.path.islink(j(d, "dirlink")), "dirlink is a link")
    os.unlink(j(d, "dirlink"))
    check(os.path.isdir(j(d, "realdir")), "unlinking a symlink removed its target")
    # Replacing a symlink with another (cached target must not stick).
    os.symlink("one", j(d, "swap"))
    eq(os.readlink(j(d, "swap")), "one", "first target")
    os.symlink("two", j(d, "swap.tmp"))
    os.rename(j(d, "swap.tmp"), j(d, "swap"))
    eq(os.readlink(j(d, "swap")), "two", "target after replacing a symlink by rename")


def check_mmap(d):
    f = j(d, "f")
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    fd2 = os.open(f, os.O_RDONLY)
    fd3 = os.open(f, os.O_WRONLY)
    try:
        os.ftruncate(fd, 4 * PAGE)
        m = mmap.mmap(fd, 4 * PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            m[0:5] = b"hello"
            eq(os.pread(fd, 5, 0), b"hello", "mmap write seen by read on the same fd")
            eq(os.pread(fd2, 5, 0), b"hello", "mmap write seen by read on another fd")
            os.pwrite(fd, b"WORLD", PAGE)
            eq(m[PAGE:PAGE + 5], b"WORLD", "write seen through mmap")
            os.pwrite(fd3, b"abc", 10)
            eq(m[10:13], b"abc", "write through another fd seen through mmap")
            # A second mapping in another process.
            def child():
                cfd = os.open(f, os.O_RDWR)
                cm = mmap.mmap(cfd, 4 * PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                seen = cm[0:5]
                cm[2 * PAGE:2 * PAGE + 5] = b"child"
                cm.close()
                os.close(cfd)
                return seen.decode()

            eq(in_child(child), "hello", "another process's mapping sees our mmap write")
            eq(m[2 * PAGE:2 * PAGE + 5], b"child", "another process's mmap write seen in our mapping")
            eq(os.pread(fd2, 5, 2 * PAGE), b"child", "another process's mmap write seen by read")
            # Private mappings do not write back.
            p = mmap.mmap(fd, PAGE, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
            p[0:5] = b"PRIVT"
            p.close()
            eq(os.pread(fd, 5, 0), b"hello", "MAP_PRIVATE write leaked to the file")
            m.flush()
        finally:
            m.close()
        os.fsync(fd)
    finally:
        os.close(fd)
        os.close(fd2)
        os.close(fd3)
    data = read(f)
    eq(len(data), 4 * PAGE, "size after mmap")
    eq(data[0:5] + data[10:13] + data[PAGE:PAGE + 5] + data[2 * PAGE:2 * PAGE + 5], b"helloabcWORLDchild",
       "content after unmapping and closing")
    # A file grown by write, then mapped: the mapping shows the new data; a mapping made
    # before the growth sees it after remapping.
    g = j(d, "g")
    write(g, b"\0" * PAGE)
    fd = os.open(g, os.O_RDWR)
    try:
        m = mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            os.pwrite(fd, b"grown", PAGE)
            m[0:4] = b"head"
            m2 = mmap.mmap(fd, PAGE + 5, mmap.MAP_SHARED, mmap.PROT_READ)
            eq(m2[PAGE:PAGE + 5] + m2[0:4], b"grownhead", "new mapping after the file grew")
            m2.close()
        finally:
            m.close()
    finally:
        os.close(fd)


class Flock(ctypes.Structure):
    _fields_ = [
        ("l_type", ctypes.c_short),
        ("l_whence", ctypes.c_short),
        ("l_start", ctypes.c_long),
        ("l_len", ctypes.c_long),
        ("l_pid", ctypes.c_int),
    ]


def getlk(fd, typ, start, length):
    lk = Flock(typ, os.SEEK_SET, start, length, 0)
    buf = fcntl.fcntl(fd, fcntl.F_GETLK, bytes(lk))
    out = Flock.from_buffer_copy(buf)
    return out.l_type, out.l_pid, out.l_start, out.l_len


def check_locks(d):
    f = j(d, "lockfile")
    write(f, b"0123456789" * 10)
    os.link(f, j(d, "other-name"))
    fd = os.open(f, os.O_RDWR)
    wouldblock = (errno.EWOULDBLOCK, errno.EAGAIN)

    def child_flock(flags, path=f):
        def body():
            cfd = os.open(path, os.O_RDWR)
            try:
                fcntl.flock(cfd, flags)
                return "ok"
            except OSError as e:
                return ename(e.errno)
            finally:
                os.close(cfd)

        return in_child(body)

    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        check(child_flock(fcntl.LOCK_EX | fcntl.LOCK_NB) in ("EWOULDBLOCK", "EAGAIN"),
              "a second process got LOCK_EX while we hold LOCK_EX")
        check(child_flock(fcntl.LOCK_SH | fcntl.LOCK_NB) in ("EWOULDBLOCK", "EAGAIN"),
              "a second process got LOCK_SH while we hold LOCK_EX")
        check(child_flock(fcntl.LOCK_EX | fcntl.LOCK_NB, j(d, "other-name")) in ("EWOULDBLOCK", "EAGAIN"),
              "a second process got LOCK_EX through another hard link")
        fd2 = os.open(f, os.O_RDWR)
        try:
            expect_errno(lambda: fcntl.flock(fd2, fcntl.LOCK_EX | fcntl.LOCK_NB), *wouldblock,
                         what="flock on a second open file description in the same process")
        finally:
            os.close(fd2)
        fcntl.flock(fd, fcntl.LOCK_UN)
        eq(child_flock(fcntl.LOCK_EX | fcntl.LOCK_NB), "ok", "LOCK_EX after unlock")
        fcntl.flock(fd, fcntl.LOCK_SH)
        eq(child_flock(fcntl.LOCK_SH | fcntl.LOCK_NB), "ok", "LOCK_SH next to LOCK_SH")
        check(child_flock(fcntl.LOCK_EX | fcntl.LOCK_NB) in ("EWOULDBLOCK", "EAGAIN"),
              "a second process got LOCK_EX while we hold LOCK_SH")
        fcntl.flock(fd, fcntl.LOCK_UN)
        # A blocked waiter gets the lock when it is released (synchronised by pipes only).
        fcntl.flock(fd, fcntl.LOCK_EX)
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r1)
            os.close(w2)
            cfd = os.open(f, os.O_RDWR)
            try:
                fcntl.flock(cfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.write(w1, b"E")  # should have blocked
            except BlockingIOError:
                os.write(w1, b"B")
                fcntl.flock(cfd, fcntl.LOCK_EX)  # blocks until the parent unlocks
                os.write(w1, b"G")
            os._exit(0)
        os.close(w1)
        os.close(r2)
        os.close(w2)
        eq(os.read(r1, 1), b"B", "child's non-blocking attempt while we hold the lock")
        fcntl.flock(fd, fcntl.LOCK_UN)
        eq(os.read(r1, 1), b"G", "blocked child acquired the lock after release")
        os.close(r1)
        os.waitpid(pid, 0)

        # POSIX record locks.
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)  # bytes 0..9

        def child_lockf():
            cfd = os.open(f, os.O_RDWR)
            res = {}
            for name, kind, length, start in (
                ("w0_10", fcntl.LOCK_EX, 10, 0),
                ("r5_1", fcntl.LOCK_SH, 1, 5),
                ("w10_10", fcntl.LOCK_EX, 10, 10),
            ):
                try:
                    fcntl.lockf(cfd, kind | fcntl.LOCK_NB, length, start)
                    res[name] = "ok"
                except OSError as e:
                    res[name] = ename(e.errno)
            res["getlk"] = list(getlk(cfd, fcntl.F_WRLCK, 0, 100))
            os.close(cfd)
            return res

        res = in_child(child_lockf)
        check(res["w0_10"] in ("EAGAIN", "EACCES"), f"second process got a write lock on a locked range: {res}")
        check(res["r5_1"] in ("EAGAIN", "EACCES"), f"second process got a read lock inside a write lock: {res}")
        eq(res["w10_10"], "ok", "second process's lock on a disjoint range")
        eq(res["getlk"], [fcntl.F_WRLCK, os.getpid(), 0, 10], "F_GETLK reports our lock (type, pid, range)")
        # Closing ANY descriptor of the file drops the process's POSIX locks.
        os.close(os.open(j(d, "other-name"), os.O_RDONLY))
        res = in_child(child_lockf)
        eq(res["w0_10"], "ok", "POSIX lock survived closing another fd of the file")
        # OFD locks conflict between two open file descriptions of one process.
        if hasattr(fcntl, "F_OFD_SETLK"):
            a = os.open(f, os.O_RDWR)
            b = os.open(f, os.O_RDWR)
            try:
                fcntl.fcntl(a, fcntl.F_OFD_SETLK, bytes(Flock(fcntl.F_WRLCK, 0, 0, 10, 0)))
                expect_errno(
                    lambda: fcntl.fcntl(b, fcntl.F_OFD_SETLK, bytes(Flock(fcntl.F_WRLCK, 0, 0, 10, 0))),
                    errno.EAGAIN, errno.EACCES,
                    what="OFD lock on a range another open file description holds",
                )
            finally:
                os.close(a)
                os.close(b)
    finally:
        os.close(fd)


def check_large_file(d):
    f = j(d, "big")
    off = 5 << 30
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        eq(os.pwrite(fd, b"Z", off), 1, "pwrite at 5 GiB")
        eq(os.fstat(fd).st_size, off + 1, "size after a write at 5 GiB")
        eq(os.pread(fd, 1, off), b"Z", "read back at 5 GiB")
        eq(os.pread(fd, 4, off - 2), b"\0\0Z", "read across the written byte")
        eq(os.pread(fd, 10, (4 << 30) + 5), b"\0" * 10, "read in the hole above 4 GiB")
        os.pwrite(fd, b"ABCDEFGH", (4 << 30) - 4)
        eq(os.pread(fd, 8, (4 << 30) - 4), b"ABCDEFGH", "write across the 4 GiB boundary")
        eq(os.lseek(fd, 0, os.SEEK_END), off + 1, "SEEK_END of a 5 GiB file")
        OBS["large.data_at"] = os.lseek(fd, (4 << 30) + 4096, os.SEEK_DATA)
        check(os.fstat(fd).st_blocks * 512 < (1 << 20), "5 GiB sparse file allocates too much")
        os.ftruncate(fd, 6 << 30)
        eq(os.fstat(fd).st_size, 6 << 30, "size after ftruncate to 6 GiB")
    finally:
        os.close(fd)
    eq(os.stat(f).st_size, 6 << 30, "stat size of a 6 GiB file")
    with open(f, "rb") as fh:
        fh.seek(off)
        eq(fh.read(2), b"Z\0", "buffered read at 5 GiB")
    os.unlink(f)


def check_non_utf8_names(d):
    db = os.fsencode(d)
    name = b"\xff\xfe name"
    p = os.path.join(db, name)
    write(p, b"bytes")
    check(name in os.listdir(db), "non-UTF-8 name missing from listdir")
    eq([e.name for e in os.scandir(db)], [name], "scandir of non-UTF-8 name")
    eq(read(p), b"bytes", "content under non-UTF-8 name")
    q = os.path.join(db, b"caf\xe9")
    os.rename(p, q)
    eq(sorted(os.listdir(db)), [b"caf\xe9"], "rename to latin-1 name")
    sub = os.path.join(db, b"\x80dir")
    os.mkdir(sub)
    write(os.path.join(sub, b"\xc3\x28"), b"in")
    os.symlink(b"\xc3\x28", os.path.join(sub, b"link\xff"))
    eq(read(os.path.join(sub, b"link\xff")), b"in", "read through a non-UTF-8 symlink")
    odd = [b"a\nb", b"tab\tname", b"back\\slash", b"-dash", b"trailing space ", b"\x01ctrl", b"*?[]", b" "]
    for n in odd:
        write(os.path.join(db, n), n)
    for n in odd:
        eq(read(os.path.join(db, n)), n, f"content of {n!r}")
    longest = b"L" * 255
    write(os.path.join(db, longest), b"l")
    check(longest in os.listdir(db), "255-byte name")
    expect_errno(lambda: write(os.path.join(db, b"M" * 256), b""), errno.ENAMETOOLONG, what="256-byte name")
    expect_errno(lambda: os.mkdir(os.path.join(db, b"N" * 256)), errno.ENAMETOOLONG, what="256-byte dir name")
    for n in odd + [longest, b"caf\xe9"]:
        os.unlink(os.path.join(db, n))
    os.setxattr(os.path.join(sub, b"\xc3\x28"), b"user.\xffname", b"v")
    check(b"user.\xffname" in [os.fsencode(n) for n in os.listxattr(os.path.join(sub, b"\xc3\x28"))],
          "non-UTF-8 xattr name missing from listxattr")
    shutil.rmtree(sub)
    eq(os.listdir(db), [], "directory empty after removing the odd names")


class Dirent(ctypes.Structure):
    _fields_ = [
        ("d_ino", ctypes.c_uint64),
        ("d_off", ctypes.c_int64),
        ("d_reclen", ctypes.c_ushort),
        ("d_type", ctypes.c_ubyte),
        ("d_name", ctypes.c_char * 256),
    ]


def c_listdir_with_offsets(path):
    """[(telldir before the entry, name)] with libc's opendir/readdir/telldir."""
    libc.opendir.restype = ctypes.c_void_p
    libc.opendir.argtypes = [ctypes.c_char_p]
    libc.readdir.restype = ctypes.POINTER(Dirent)
    libc.readdir.argtypes = [ctypes.c_void_p]
    libc.telldir.restype = ctypes.c_long
    libc.telldir.argtypes = [ctypes.c_void_p]
    libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
    libc.closedir.argtypes = [ctypes.c_void_p]
    libc.rewinddir.argtypes = [ctypes.c_void_p]
    dirp = libc.opendir(os.fsencode(path))
    if not dirp:
        raise oserror()

    def read_all():
        out = []
        while True:
            pos = libc.telldir(dirp)
            ctypes.set_errno(0)
            ent = libc.readdir(dirp)
            if not ent:
                if ctypes.get_errno():
                    raise oserror()
                return out
            out.append((pos, ent.contents.d_name))

    return dirp, read_all


CHURN = r"""
import os, select, sys
d = sys.argv[1]
i = 0
live = []
while True:
    n = os.path.join(d, "proc-%08d" % i)
    os.close(os.open(n, os.O_CREAT | os.O_WRONLY, 0o644))
    live.append(n)
    if len(live) > 40:
        os.unlink(live.pop(0))
    i += 1
    if i == 100:
        sys.stdout.write("ready\n"); sys.stdout.flush()
    if i > 100 and select.select([sys.stdin], [], [], 0)[0]:
        break
for n in live:
    os.unlink(n)
sys.stdout.write("%d\n" % i); sys.stdout.flush()
"""


def check_readdir(d):
    keep = {f"keep-{i:04}-" + "k" * 40 for i in range(1500)}
    for n in keep:
        os.close(os.open(j(d, n), os.O_CREAT | os.O_WRONLY, 0o644))
    os.mkdir(j(d, "a-subdir"))
    os.symlink("keep-0000", j(d, "a-symlink"))
    # d_type and d_ino agree with lstat.
    for e in os.scandir(d):
        st = os.lstat(e.path)
        eq(e.inode(), st.st_ino, f"d_ino of {e.name} vs st_ino")
        eq(e.is_dir(follow_symlinks=False), stat.S_ISDIR(st.st_mode), f"d_type dir of {e.name}")
        eq(e.is_symlink(), stat.S_ISLNK(st.st_mode), f"d_type symlink of {e.name}")
        eq(e.is_file(follow_symlinks=False), stat.S_ISREG(st.st_mode), f"d_type file of {e.name}")
    keep |= {"a-subdir", "a-symlink"}
    # telldir/seekdir: offsets stay valid across separate reads.
    dirp, read_all = c_listdir_with_offsets(d)
    try:
        entries = read_all()
        names = [n.decode() for _, n in entries]
        eq(sorted(n for n in names if n not in (".", "..")), sorted(keep), "readdir(3) names")
        for k in (len(entries) // 3, len(entries) - 5, 7):
            libc.seekdir(dirp, entries[k][0])
            rest = read_all()
            eq([n for _, n in rest], [n for _, n in entries[k:]], f"entries after seekdir to entry {k}")
        libc.rewinddir(dirp)
        eq([n for _, n in read_all()], [n for _, n in entries], "entries after rewinddir")
    finally:
        libc.closedir(dirp)
    # Concurrent change: a thread and a process create and delete other names while we list.
    stop = threading.Event()
    churn_errors = []

    def churn():
        i = 0
        live = []
        try:
            while not stop.is_set():
                n = j(d, f"thr-{i:08}")
                os.close(os.open(n, os.O_CREAT | os.O_WRONLY, 0o644))
                live.append(n)
                if len(live) > 40:
                    os.unlink(live.pop(0))
                i += 1
            for n in live:
                os.unlink(n)
        except OSError as e:
            churn_errors.append(e)

    proc = subprocess.Popen([PY, "-c", CHURN, d], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    t = threading.Thread(target=churn)
    try:
        eq(proc.stdout.readline().strip(), b"ready", "churn process readiness")
        t.start()
        dirp, read_all = c_listdir_with_offsets(d)
        try:
            for p in range(6):
                seen = collections.Counter(e.name for e in os.scandir(d))
                dup = [n for n, c in seen.items() if c > 1]
                check(not dup, f"pass {p}: names seen twice in one scandir: {dup[:5]}")
                missing = keep - set(seen)
                check(not missing, f"pass {p}: stable names missing from scandir: {sorted(missing)[:5]}")
                # And readdir(3) with seekdir back to a remembered offset.
                libc.rewinddir(dirp)
                entries = read_all()
                names = collections.Counter(n.decode() for _, n in entries)
                check(all(c == 1 for c in names.values()), f"pass {p}: duplicate in readdir(3)")
                check(keep <= set(names), f"pass {p}: readdir(3) missed stable names")
                k = len(entries) // 2
                libc.seekdir(dirp, entries[k][0])
                rest = [n.decode() for _, n in read_all()]
                want = {n.decode() for _, n in entries[k:]} & keep
                check(want <= set(rest), f"pass {p}: seekdir lost stable names: {sorted(want - set(rest))[:5]}")
                check(len(rest) == len(set(rest)), f"pass {p}: duplicates after seekdir")
        finally:
            libc.closedir(dirp)
    finally:
        stop.set()
        if t.is_alive():
            t.join()
        proc.stdin.close()
        tail = proc.stdout.read()
        proc.wait()
    check(not churn_errors, f"churn thread failed: {churn_errors}")
    eq(proc.returncode, 0, "churn process exit status")
    check(int(tail.strip() or 0) > 100, "churn process did no work")
    eq(set(os.listdir(d)), keep, "directory after the churn")


def check_statvfs(d):
    s = os.statvfs(d)
    check(s.f_bsize > 0 and s.f_frsize > 0, f"statvfs block sizes {s}")
    check(s.f_blocks > 0, "statvfs f_blocks is 0")
    check(s.f_bfree <= s.f_blocks and s.f_bavail <= s.f_bfree, f"statvfs free counts inconsistent: {s}")
    check(s.f_ffree <= s.f_files, f"statvfs inode counts inconsistent: {s}")
    check(s.f_namemax >= 255, f"f_namemax {s.f_namemax}")
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        t = os.fstatvfs(fd)
    finally:
        os.close(fd)
    eq((t.f_bsize, t.f_frsize, t.f_blocks, t.f_namemax), (s.f_bsize, s.f_frsize, s.f_blocks, s.f_namemax),
       "fstatvfs vs statvfs")
    OBS["statvfs"] = [s.f_bsize, s.f_frsize, s.f_blocks, s.f_files, s.f_namemax]


def check_access(d):
    modes = {"m000": 0o000, "m400": 0o400, "m200": 0o200, "m100": 0o100, "m755": 0o755, "m001": 0o001, "m070": 0o070}
    for n, m in modes.items():
        write(j(d, n), b"#!/bin/sh\n")
        os.chmod(j(d, n), m)
    os.mkdir(j(d, "dir000"))
    os.chmod(j(d, "dir000"), 0)
    res = {}
    for n in list(modes) + ["dir000"]:
        p = j(d, n)
        st = os.stat(p)
        for mask, label in ((os.R_OK, "r"), (os.W_OK, "w"), (os.X_OK, "x")):
            got = os.access(p, mask)
            res[f"{n}.{label}"] = got
            m = stat.S_IMODE(st.st_mode)
            if ROOT:
                want = True if label != "x" or stat.S_ISDIR(st.st_mode) else bool(m & 0o111)
            else:
                shift = 6 if st.st_uid == os.geteuid() else (3 if st.st_gid in os.getgroups() + [os.getegid()] else 0)
                bit = {"r": 4, "w": 2, "x": 1}[label]
                want = bool((m >> shift) & bit)
            eq(got, want, f"access({n}, {label})")
    check(os.access(j(d, "m755"), os.F_OK), "access F_OK of an existing file")
    check(not os.access(j(d, "missing"), os.F_OK), "access F_OK of a missing file")
    # The same answers from a real open.
    if not ROOT:
        expect_errno(lambda: os.open(j(d, "m000"), os.O_RDONLY), errno.EACCES, what="open of a 0000 file")
        expect_errno(lambda: os.open(j(d, "m400"), os.O_WRONLY), errno.EACCES, what="write-open of a 0400 file")
        expect_errno(lambda: os.listdir(j(d, "dir000")), errno.EACCES, what="listing a 0000 directory")
    OBS["access"] = res
    os.chmod(j(d, "dir000"), 0o755)


def check_copy_file_range(d):
    src, dst = j(d, "src"), j(d, "dst")
    data = os.urandom(3 << 20) + b"tail"
    write(src, data)
    s = os.open(src, os.O_RDONLY)
    t = os.open(dst, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        done = 0
        while done < len(data):
            n = os.copy_file_range(s, t, len(data) - done, done, done)
            check(n > 0, "copy_file_range copied nothing")
            done += n
        eq(hashlib.sha256(read(dst)).hexdigest(), hashlib.sha256(data).hexdigest(), "copy_file_range content")
        n = os.copy_file_range(s, t, 1000, 4097, 10)
        eq(n, 1000, "copy_file_range with offsets")
        eq(os.pread(t, 1000, 10), data[4097:5097], "copy_file_range with offsets: content")
        # Without offsets, the file positions move.
        os.lseek(s, 100, os.SEEK_SET)
        os.lseek(t, 0, os.SEEK_SET)
        eq(os.copy_file_range(s, t, 50), 50, "copy_file_range from file positions")
        eq(os.lseek(s, 0, os.SEEK_CUR), 150, "source position after copy_file_range")
        eq(os.lseek(t, 0, os.SEEK_CUR), 50, "target position after copy_file_range")
        eq(os.pread(t, 50, 0), data[100:150], "content copied from file positions")
    finally:
        os.close(s)
        os.close(t)
    shutil.copyfile(src, j(d, "copy"))
    eq(read(j(d, "copy")), data, "shutil.copyfile")


def check_big_io(d):
    f = j(d, "f")
    data = os.urandom(9 << 20)
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for off in range(0, len(data), 3 << 20):
            eq(os.pwrite(fd, data[off:off + (3 << 20)], off), min(3 << 20, len(data) - off), "3 MiB pwrite")
        os.fsync(fd)
        os.fdatasync(fd)
        got = bytearray()
        off = 0
        while True:
            chunk = os.pread(fd, 77777, off)
            if not chunk:
                break
            got += chunk
            off += len(chunk)
        check(bytes(got) == data, "9 MiB read back in 77777-byte pieces differs")
        os.pwrite(fd, b"X" * 5, (1 << 20) - 2)
        eq(os.pread(fd, 9, (1 << 20) - 4), data[(1 << 20) - 4:(1 << 20) - 2] + b"X" * 5 + data[(1 << 20) + 3:(1 << 20) + 5],
           "unaligned write across 1 MiB")
    finally:
        os.close(fd)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    # O_DIRECT with aligned buffers, where supported.
    g = j(d, "direct")
    try:
        fd = os.open(g, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError as e:
        OBS["odirect.open"] = ename(e.errno)
        return
    try:
        buf = mmap.mmap(-1, 8192)
        buf.write(b"D" * 8192)
        OBS["odirect.write"] = outcome(lambda: os.pwrite(fd, buf, 0))
        rbuf = mmap.mmap(-1, 8192)
        OBS["odirect.read"] = outcome(lambda: os.preadv(fd, [rbuf], 0))
        if OBS["odirect.read"] == "ok" and OBS["odirect.write"] == "ok":
            eq(rbuf[:], b"D" * 8192, "O_DIRECT read back")
    finally:
        os.close(fd)
    if OBS["odirect.write"] == "ok":
        eq(read(g), b"D" * 8192, "O_DIRECT write seen by a buffered read")


def check_dirs(d):
    a = j(d, "a")
    os.mkdir(a)
    n0 = os.stat(a).st_nlink
    os.mkdir(j(a, "b"))
    eq(os.stat(a).st_nlink, n0 + 1, "parent nlink after mkdir")
    expect_errno(lambda: os.mkdir(j(a, "b")), errno.EEXIST, what="mkdir of an existing name")
    write(j(a, "b", "f"), b"")
    expect_errno(lambda: os.rmdir(j(a, "b")), errno.ENOTEMPTY, errno.EEXIST, what="rmdir of a non-empty dir")
    expect_errno(lambda: os.rmdir(j(a, "b", "f")), errno.ENOTDIR, what="rmdir of a file")
    expect_errno(lambda: os.unlink(j(a, "b")), errno.EISDIR, what="unlink of a directory")
    OBS["dirs.rmdir_dot"] = expect_errno(lambda: os.rmdir(j(a, "b", ".")), errno.EINVAL, errno.EBUSY, what="rmdir .")
    os.unlink(j(a, "b", "f"))
    fd = os.open(j(a, "b"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rmdir(j(a, "b"))
        eq(os.stat(a).st_nlink, n0, "parent nlink after rmdir")
        eq(os.fstat(fd).st_nlink, 0, "nlink of a removed, still open directory")
        expect_errno(
            lambda: os.open(j(a, "b"), os.O_RDONLY), errno.ENOENT, what="open of a removed directory by name"
        )
        OBS["dirs.create_in_removed"] = outcome(
            lambda: os.close(os.open("x", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
        )
    finally:
        os.close(fd)
    # Deep trees.
    deep = d
    for i in range(40):
        deep = j(deep, f"level{i}")
    os.makedirs(deep)
    write(j(deep, "leaf"), b"leaf")
    eq(read(j(deep, "leaf")), b"leaf", "file 40 levels down")
    shutil.rmtree(j(d, "level0"))
    check(not os.path.lexists(j(d, "level0")), "rmtree of a deep tree")
    # setgid directories pass their group and the bit on.
    s = j(d, "sgid")
    os.mkdir(s)
    gid = 4242 if ROOT else os.getegid()
    if ROOT:
        os.chown(s, -1, gid)
    os.chmod(s, 0o2775)
    write(j(s, "f"), b"")
    os.mkdir(j(s, "sub"))
    eq(os.stat(j(s, "f")).st_gid, gid, "gid of a file in a setgid directory")
    eq(os.stat(j(s, "sub")).st_gid, gid, "gid of a dir in a setgid directory")
    check(os.stat(j(s, "sub")).st_mode & stat.S_ISGID, "setgid bit not inherited by a subdirectory")


def check_exec(d):
    """Programs run from the directory; a running program's file cannot be written."""
    sh = j(d, "script.sh")
    write(sh, b"#!/bin/sh\necho \"ran $1\"\n", 0o755)
    os.chmod(sh, 0o755)
    eq(subprocess.run([sh, "arg"], capture_output=True).stdout, b"ran arg\n", "running a shell script")
    cat = j(d, "cat")
    shutil.copyfile(shutil.which("cat") or "/bin/cat", cat)
    os.chmod(cat, 0o755)
    p = subprocess.Popen([cat], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        p.stdin.write(b"alive\n")
        p.stdin.flush()
        eq(p.stdout.readline(), b"alive\n", "a copied binary runs")
        # It is running now (it answered): its file is busy.
        expect_errno(lambda: os.open(cat, os.O_WRONLY), errno.ETXTBSY, what="opening a running program for writing")
    finally:
        p.stdin.close()
        p.wait()
    eq(p.returncode, 0, "exit status of the copied binary")
    os.close(os.open(cat, os.O_WRONLY))  # not busy any more
    os.chmod(sh, 0o644)
    OBS["exec.no_x_bit"] = outcome(lambda: subprocess.run([sh]))


def check_capabilities(d):
    """Optional features, observed only (the caller knows which may be missing where)."""
    OBS["caps.o_tmpfile"] = outcome(lambda: os.close(os.open(d, os.O_TMPFILE | os.O_WRONLY, 0o600)))
    f = j(d, "f")
    write(f, b"x" * 65536)
    fd = os.open(f, os.O_RDWR)
    try:
        for name, mode in (("collapse_range", 0x08), ("zero_range", 0x10), ("insert_range", 0x20)):
            OBS[f"caps.fallocate_{name}"] = outcome(lambda: fallocate(fd, mode, 4096, 4096))
        OBS["caps.size_after_fallocates"] = os.fstat(fd).st_size
        FS_IOC_GETFLAGS = 0x80086601
        OBS["caps.ioctl_getflags"] = outcome(lambda: fcntl.ioctl(fd, FS_IOC_GETFLAGS, b"\0" * 8))
    finally:
        os.close(fd)


CHECKS = [
    check_hard_links,
    check_rename_flags,
    check_rename_over,
    check_seek_data_hole,
    check_xattrs,
    check_acl,
    check_umask,
    check_open_flags,
    check_append_opens,
    check_truncate,
    check_times,
    check_chmod_chown,
    check_special_files,
    check_symlinks,
    check_mmap,
    check_locks,
    check_large_file,
    check_non_utf8_names,
    check_readdir,
    check_statvfs,
    check_access,
    check_copy_file_range,
    check_big_io,
    check_dirs,
    check_exec,
    check_capabilities,
]


def main():
    if len(sys.argv) < 2:
        sys.exit("usage: edge_cases.py DIR [CHECK...]")
    root = sys.argv[1]
    wanted = set(sys.argv[2:])
    known = {c.__name__[len("check_"):] for c in CHECKS}
    unknown = wanted - known
    if unknown:
        sys.exit(f"edge_cases: unknown checks {sorted(unknown)}; known: {sorted(known)}")
    failed = []
    timings = {}
    for c in CHECKS:
        name = c.__name__[len("check_"):]
        if wanted and name not in wanted:
            continue
        d = j(root, name)
        start = time.monotonic()
        try:
            os.mkdir(d)
            c(d)
        except Failure as e:
            failed.append(name)
            print(f"FAIL {name}: {e}", file=sys.stderr)
        except Exception as e:  # noqa: BLE001 - an unexpected error is a failure too
            failed.append(name)
            print(f"FAIL {name}: unexpected {type(e).__name__}: {e}", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
        timings[name] = round(time.monotonic() - start, 3)
    print(f"edge_cases: {len(timings) - len(failed)} passed, {len(failed)} failed"
          + (f": {', '.join(failed)}" if failed else "")
          + f" (times: {timings})", file=sys.stderr)
    json.dump({"observations": OBS, "failed": failed}, sys.stdout, sort_keys=True)
    sys.stdout.write("\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
