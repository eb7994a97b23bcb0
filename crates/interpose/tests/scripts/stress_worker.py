#!/usr/bin/env python3
"""One stress worker: random namespace and data operations in a directory shared with
other workers, for `tests/stress.rs`.

Usage: stress_worker.py ROOT WORKER SEED OPS

ROOT holds the fixed directories d0..d3 (made by the test). Below them, workers make and
remove the subdirectories s0..s3, and files of three classes that never mix (renames and
links stay within a class, so no legitimate EISDIR/ENOTDIR/EINVAL can happen):

- a*: written whole to a temporary name, then renamed into place; never modified in place,
  so every read must see one complete, self-checking content;
- m*: created, appended to, overwritten in the middle and truncated in place;
- l*: symbolic links whose target text is self-checking;
- ROOT/hot: like a*, one file that all workers keep opening and sometimes replace.

Errors that concurrent namespace changes legitimately cause (ENOENT, EEXIST, ENOTEMPTY) are
counted; any other error, or an inconsistent read, is a failure. Prints one JSON summary
line on stdout; exits 1 if anything failed.
"""

import errno
import json
import os
import random
import sys
import traceback
import zlib

ALLOWED = {errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY}
TOPS = ["d%d" % i for i in range(4)]
SUBS = ["s%d" % i for i in range(4)]


class Bad(Exception):
    """A read returned something no correct file system could have returned."""


def atomic_content(rng):
    n = rng.choice([0, 1, 17, 4095, 4096, 4097, 9000, rng.randrange(1, 70000)])
    payload = rng.randbytes(n)
    return b"A|%d|%08x\n" % (n, zlib.crc32(payload)) + payload


def check_atomic(path, data):
    head, sep, payload = data.partition(b"\n")
    parts = head.split(b"|")
    if not sep or len(parts) != 3 or parts[0] != b"A":
        raise Bad("%s: bad header %r (%d bytes)" % (path, data[:40], len(data)))
    n, crc = int(parts[1]), int(parts[2], 16)
    if len(payload) != n or zlib.crc32(payload) != crc:
        raise Bad(
            "%s: torn content: header says %d bytes crc %08x, got %d bytes crc %08x"
            % (path, n, crc, len(payload), zlib.crc32(payload))
        )


def link_target(rng):
    body = "%x" % rng.getrandbits(40)
    return "t-%s-%08x" % (body, zlib.crc32(body.encode()))


def check_link(path, target):
    parts = target.split("-")
    if len(parts) != 3 or parts[0] != "t" or "%08x" % zlib.crc32(parts[1].encode()) != parts[2]:
        raise Bad("%s: bad symlink target %r" % (path, target))


class Worker:
    def __init__(self, root, wid, seed):
        self.root = root
        self.wid = wid
        self.rng = random.Random(seed)
        self.tmp_counter = 0
        self.ok = {}
        self.errors = {}
        self.failures = []

    # Random names ---------------------------------------------------------------------

    def dir(self):
        """A directory path: a fixed top directory or one of its (maybe absent) subdirs."""
        top = self.rng.choice(TOPS)
        if self.rng.random() < 0.3:
            return os.path.join(self.root, top, self.rng.choice(SUBS))
        return os.path.join(self.root, top)

    def name(self, cls):
        return os.path.join(self.dir(), "%s%d" % (cls, self.rng.randrange(5)))

    def subdir(self):
        return os.path.join(self.root, self.rng.choice(TOPS), self.rng.choice(SUBS))

    # Operations -----------------------------------------------------------------------

    def op_put_atomic(self):
        self.tmp_counter += 1
        tmp = os.path.join(self.root, self.rng.choice(TOPS), "tmp-%d-%d" % (self.wid, self.tmp_counter))
        data = atomic_content(self.rng)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            self.write_all(fd, data, tmp)
        finally:
            os.close(fd)
        try:
            os.rename(tmp, self.name("a"))
        except OSError:
            os.unlink(tmp)
            raise

    def op_put_hot(self):
        """Replaces the one file every worker keeps opening."""
        self.tmp_counter += 1
        tmp = os.path.join(self.root, "tmp-%d-%d" % (self.wid, self.tmp_counter))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            self.write_all(fd, atomic_content(self.rng), tmp)
        finally:
            os.close(fd)
        os.rename(tmp, os.path.join(self.root, "hot"))

    def op_read_hot(self):
        """Concurrent first opens of one inode (the passthrough mode of an inode is decided
        by its first open)."""
        path = os.path.join(self.root, "hot")
        with open(path, "rb") as f:
            check_atomic(path, f.read())

    def op_create_mutable(self):
        flags = os.O_WRONLY | os.O_CREAT | self.rng.choice([os.O_TRUNC, os.O_EXCL, 0])
        path = self.name("m")
        fd = os.open(path, flags, 0o644)
        try:
            self.write_all(fd, self.rng.randbytes(self.rng.randrange(0, 20000)), path)
        finally:
            os.close(fd)

    def op_append(self):
        path = self.name("m")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            self.write_all(fd, self.rng.randbytes(self.rng.randrange(1, 6000)), path)
        finally:
            os.close(fd)

    def op_overwrite(self):
        path = self.name("m")
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            data = self.rng.randbytes(self.rng.randrange(1, 5000))
            off = self.rng.randrange(0, size + 1)
            if os.pwrite(fd, data, off) != len(data):
                raise Bad("%s: short pwrite" % path)
        finally:
            os.close(fd)

    def op_truncate(self):
        os.truncate(self.name("m"), self.rng.randrange(0, 30000))

    def op_read(self):
        cls = self.rng.choice("aam")
        path = self.name(cls)
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            chunks = []
            while True:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
            data = b"".join(chunks)
        finally:
            os.close(fd)
        if cls == "a":
            check_atomic(path, data)
            if len(data) != size:
                raise Bad("%s: fstat size %d but read %d bytes" % (path, size, len(data)))

    def op_rename(self):
        cls = self.rng.choice("aaml")
        os.rename(self.name(cls), self.name(cls))

    def op_link(self):
        cls = self.rng.choice("am")
        os.link(self.name(cls), self.name(cls))

    def op_unlink(self):
        os.unlink(self.name(self.rng.choice("aml")))

    def op_symlink(self):
        os.symlink(link_target(self.rng), self.name("l"))

    def op_readlink(self):
        path = self.name("l")
        check_link(path, os.readlink(path))

    def op_mkdir(self):
        os.mkdir(self.subdir())

    def op_rmdir(self):
        os.rmdir(self.subdir())

    def op_rmtree(self):
        """rm -r of a subdirectory, racing whoever is filling it."""
        d = self.subdir()
        for name in os.listdir(d):
            try:
                os.unlink(os.path.join(d, name))
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
        os.rmdir(d)

    def op_rename_dir(self):
        os.rename(self.subdir(), self.subdir())

    def op_scan(self):
        d = self.dir()
        for name in os.listdir(d):
            try:
                st = os.lstat(os.path.join(d, name))
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
                continue
            kind = name[0]
            ok = {
                "a": st.st_mode & 0o170000 == 0o100000,
                "m": st.st_mode & 0o170000 == 0o100000,
                "t": st.st_mode & 0o170000 == 0o100000,
                "l": st.st_mode & 0o170000 == 0o120000,
                "s": st.st_mode & 0o170000 == 0o040000,
            }.get(kind, False)
            if not ok:
                raise Bad("%s/%s: unexpected entry, mode %o" % (d, name, st.st_mode))

    OPS = [
        ("put_atomic", 14),
        ("create_mutable", 8),
        ("append", 6),
        ("overwrite", 4),
        ("truncate", 3),
        ("read", 14),
        ("put_hot", 1),
        ("read_hot", 10),
        ("rename", 14),
        ("link", 7),
        ("unlink", 10),
        ("symlink", 3),
        ("readlink", 3),
        ("mkdir", 4),
        ("rmdir", 2),
        ("rmtree", 1),
        ("rename_dir", 3),
        ("scan", 3),
    ]

    # Helpers --------------------------------------------------------------------------

    @staticmethod
    def write_all(fd, data, path):
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            if n <= 0:
                raise Bad("%s: write returned %d" % (path, n))
            view = view[n:]

    def run(self, ops):
        names = [n for n, _ in self.OPS]
        weights = [w for _, w in self.OPS]
        for i in range(ops):
            op = self.rng.choices(names, weights)[0]
            try:
                getattr(self, "op_" + op)()
                self.ok[op] = self.ok.get(op, 0) + 1
            except OSError as e:
                if e.errno in ALLOWED:
                    key = errno.errorcode.get(e.errno, str(e.errno))
                    self.errors[key] = self.errors.get(key, 0) + 1
                else:
                    self.fail(i, op, "%s: %s" % (errno.errorcode.get(e.errno, e.errno), e))
            except Bad as e:
                self.fail(i, op, str(e))
            if len(self.failures) >= 20:
                break

    def fail(self, i, op, what):
        msg = "worker %d op #%d %s: %s" % (self.wid, i, op, what)
        self.failures.append(msg)
        # The first tracebacks say which call of the operation failed.
        trace = traceback.format_exc() if len(self.failures) <= 3 else ""
        sys.stderr.write(msg + "\n" + trace)
        sys.stderr.flush()


def main():
    root, wid, seed, ops = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    w = Worker(root, wid, seed)
    w.op_put_hot()
    w.run(ops)
    print(json.dumps({"worker": wid, "ok": w.ok, "errors": w.errors, "failures": w.failures}))
    sys.exit(1 if w.failures else 0)


if __name__ == "__main__":
    main()
