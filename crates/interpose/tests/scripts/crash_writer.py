#!/usr/bin/env python3
"""Durable-write client for the crash test in `tests/stress.rs`.

Usage: crash_writer.py DIR NFILES

Appends records to DIR/log0 .. DIR/log{NFILES-1} in turn (record i goes to log{i % NFILES}),
calling fsync after each, and reports each record whose fsync returned as "R i" on
stdout. Every 8th record it also makes a whole new file the durable way (write to a
temporary name, fsync it, rename it into place, fsync the directory) and reports it as
"F name" once all of that returned. Runs until an error (the test kills the daemon under
it, so an ENOTCONN is expected) and then exits 1.
"""

import os
import sys
import zlib


def record(i, nfiles):
    """Record i: one line that checks itself; its length varies with i."""
    body = ("%d:" % i) * (1 + (i * 7919) % 97)
    return b"%08d %d %08x %s\n" % (i, i % nfiles, zlib.crc32(body.encode()), body.encode())


def new_file_content(name):
    return ("%s\n" % name).encode() * 50


def main():
    root, nfiles = sys.argv[1], int(sys.argv[2])
    out = sys.stdout.fileno()
    try:
        fds = [
            os.open(os.path.join(root, "log%d" % f), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            for f in range(nfiles)
        ]
        dirfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        i = 0
        while True:
            fd = fds[i % nfiles]
            rec = record(i, nfiles)
            if os.write(fd, rec) != len(rec):
                raise RuntimeError("short write of record %d" % i)
            os.fsync(fd)
            os.write(out, b"R %d\n" % i)
            if i % 8 == 7:
                name = "new%d" % (i // 8)
                tmp = os.path.join(root, name + ".tmp")
                data = new_file_content(name)
                tfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    if os.write(tfd, data) != len(data):
                        raise RuntimeError("short write of %s" % tmp)
                    os.fsync(tfd)
                finally:
                    os.close(tfd)
                os.rename(tmp, os.path.join(root, name))
                os.fsync(dirfd)
                os.write(out, b"F %s\n" % name.encode())
            i += 1
    except OSError as e:
        sys.stderr.write("crash_writer: %s\n" % e)
        sys.exit(1)


if __name__ == "__main__":
    main()
