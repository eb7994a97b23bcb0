#!/usr/bin/env python3
"""The data regions of a file as SEEK_DATA/SEEK_HOLE report them, and probes.

Usage: iso_seek.py FILE [OFFSET...]

Prints one JSON object: {"size": N, "regions": [[start, end], ...], "probes": {OFFSET:
[SEEK_DATA answer or "ENXIO", SEEK_HOLE answer or "ENXIO"], ...}, "bytes": {OFFSET:
byte}}. The regions are found by walking SEEK_DATA then SEEK_HOLE from offset 0; each
OFFSET is probed with both whences and its byte read with pread.
"""

import errno
import json
import os
import sys


def seek(fd, off, whence):
    try:
        return os.lseek(fd, off, whence)
    except OSError as e:
        if e.errno == errno.ENXIO:
            return "ENXIO"
        raise


def main(path, offsets):
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        regions = []
        off = 0
        while off < size:
            d = seek(fd, off, os.SEEK_DATA)
            if d == "ENXIO":
                break
            h = seek(fd, d, os.SEEK_HOLE)
            if h == "ENXIO" or h <= d:
                sys.exit(f"iso_seek: SEEK_HOLE from data at {d} answered {h}")
            regions.append([d, h])
            off = h
        probes = {}
        data = {}
        for o in offsets:
            probes[str(o)] = [seek(fd, o, os.SEEK_DATA), seek(fd, o, os.SEEK_HOLE)]
            b = os.pread(fd, 1, o)
            data[str(o)] = b[0] if b else None
    finally:
        os.close(fd)
    json.dump({"size": size, "regions": regions, "probes": probes, "bytes": data}, sys.stdout, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: iso_seek.py FILE [OFFSET...]")
    main(sys.argv[1], [int(a) for a in sys.argv[2:]])
