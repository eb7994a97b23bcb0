#!/usr/bin/env python3
"""SQLite in WAL mode with a reader and a writer in two processes, asserted.

Usage: sqlite_wal.py DB             the reader, which also drives the writer
       sqlite_wal.py --writer DB    the writer (started by the reader; commands on stdin)

The two processes share the WAL index (DB-shm, mmap'ed by both). Synchronisation is by
pipes only. Checks snapshot isolation in lockstep (a read transaction keeps its snapshot
while the writer commits), then lets the writer commit freely while the reader checks
that every snapshot it sees is consistent, then checkpoints and checks integrity.

Exits 1 with a message on the first violation; on success prints a JSON summary that is
the same for every correct file system.
"""

import hashlib
import json
import os
import select
import sqlite3
import subprocess
import sys

BATCH = 100


def fail(msg):
    sys.stderr.write(f"sqlite_wal: FAIL: {msg}\n")
    sys.exit(1)


def eq(got, want, what):
    if got != want:
        fail(f"{what}: got {got!r}, expected {want!r}")


def sum_squares(n):
    """Sum of i*i for i in 1..=n: the n column of rows 1..=n."""
    return n * (n + 1) * (2 * n + 1) // 6


def insert(con, start, n):
    con.execute("BEGIN IMMEDIATE")
    con.executemany(
        "INSERT INTO t(id, v, n) VALUES (?, ?, ?)",
        [(i, f"row-{i}-" + "x" * (i % 50), i * i) for i in range(start, start + n)],
    )
    con.execute("UPDATE meta SET cnt = cnt + ?", (n,))
    con.execute("COMMIT")


def writer(db):
    con = sqlite3.connect(db, timeout=60, isolation_level=None)
    eq(con.execute("PRAGMA journal_mode").fetchone()[0], "wal", "writer's journal mode")
    out = sys.stdout
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "batch":
            start, n = int(cmd[1]), int(cmd[2])
            insert(con, start, n)
            out.write(f"done {start + n - 1}\n")
        elif cmd[0] == "run":
            # Free-running: batches back to back, with passive checkpoints among them.
            start, batches = int(cmd[1]), int(cmd[2])
            for b in range(batches):
                insert(con, start + b * BATCH, BATCH)
                if b % 7 == 6:
                    busy = con.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[0]
                    if busy not in (0, 1):
                        fail(f"passive checkpoint returned busy={busy}")
            out.write(f"finished {start + batches * BATCH - 1}\n")
        elif cmd[0] == "quit":
            break
        else:
            fail(f"writer: unknown command {line!r}")
        out.flush()
    con.close()


class Writer:
    def __init__(self, db):
        self.p = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--writer", db],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.buf = b""

    def send(self, line):
        self.p.stdin.write(line.encode() + b"\n")
        self.p.stdin.flush()

    def line(self, block=True):
        """The next line from the writer, or None if none is ready and not block."""
        fd = self.p.stdout.fileno()
        while b"\n" not in self.buf:
            if not block and not select.select([fd], [], [], 0)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                fail(f"writer exited early (status {self.p.wait()})")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()


def snapshot(con):
    """(count, meta count, sum of n, max id) in one read transaction."""
    con.execute("BEGIN")
    try:
        c = con.execute("SELECT count(*), coalesce(sum(n), 0), coalesce(max(id), 0) FROM t").fetchone()
        m = con.execute("SELECT cnt FROM meta").fetchone()[0]
    finally:
        con.execute("COMMIT")
    return c[0], m, c[1], c[2]


def check_snapshot(s, what):
    count, meta, total, top = s
    eq(meta, count, f"{what}: meta count vs rows (a torn snapshot)")
    eq(top, count, f"{what}: max id vs rows")
    eq(total, sum_squares(count), f"{what}: sum of n")
    if count % BATCH:
        fail(f"{what}: {count} rows is not a whole number of {BATCH}-row transactions")


def main(db):
    con = sqlite3.connect(db, timeout=60, isolation_level=None)
    eq(con.execute("PRAGMA journal_mode=WAL").fetchone()[0], "wal", "journal_mode=WAL")
    con.execute("PRAGMA mmap_size=67108864")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT NOT NULL, n INTEGER NOT NULL)")
    con.execute("CREATE TABLE meta(cnt INTEGER NOT NULL)")
    con.execute("INSERT INTO meta VALUES (0)")
    w = Writer(db)
    try:
        # Lockstep: a read transaction keeps its snapshot while the writer commits.
        w.send("batch 1 1000")
        eq(w.line(), "done 1000", "writer's first batch")
        con.execute("BEGIN")
        eq(con.execute("SELECT count(*) FROM t").fetchone()[0], 1000, "rows at the start of a read transaction")
        w.send("batch 1001 500")
        eq(w.line(), "done 1500", "writer's second batch")
        eq(con.execute("SELECT count(*) FROM t").fetchone()[0], 1000, "rows later in the same read transaction")
        eq(con.execute("SELECT cnt FROM meta").fetchone()[0], 1000, "meta later in the same read transaction")
        con.execute("COMMIT")
        eq(con.execute("SELECT count(*) FROM t").fetchone()[0], 1500, "rows in a new read transaction")
        if os.path.getsize(db + "-wal") == 0:
            fail("the WAL file is empty after commits")
        if not os.path.exists(db + "-shm"):
            fail("no -shm file")
        # Free-running: every snapshot the reader sees must be a consistent one.
        batches = 30
        w.send(f"run 1501 {batches}")
        seen = set()
        checks = 0
        while True:
            line = w.line(block=False)
            if line is not None:
                eq(line, f"finished {1500 + batches * BATCH}", "writer's free run")
                break
            s = snapshot(con)
            check_snapshot(s, f"snapshot {checks}")
            seen.add(s[0])
            checks += 1
            if checks % 25 == 0:
                eq(con.execute("PRAGMA quick_check").fetchone()[0], "ok", "quick_check during writes")
        final = 1500 + batches * BATCH
        s = snapshot(con)
        check_snapshot(s, "after the free run")
        eq(s[0], final, "rows after the free run")
        w.send("quit")
        eq(w.p.wait(), 0, "writer exit status")
    finally:
        if w.p.poll() is None:
            w.p.kill()
            w.p.wait()
    # Checkpoint everything, then check and modify some more.
    eq(con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone(), (0, 0, 0), "wal_checkpoint(TRUNCATE)")
    eq(os.path.getsize(db + "-wal"), 0, "WAL size after a TRUNCATE checkpoint")
    eq(con.execute("PRAGMA integrity_check").fetchone()[0], "ok", "integrity_check")
    con.execute("CREATE INDEX t_n ON t(n)")
    con.execute("DELETE FROM t WHERE id % 13 = 0")
    con.execute("UPDATE t SET v = upper(v) WHERE id % 7 = 0")
    con.execute("VACUUM")
    eq(con.execute("PRAGMA integrity_check").fetchone()[0], "ok", "integrity_check after VACUUM")
    summary = con.execute(
        "SELECT count(*), sum(n), sum(length(v)), group_concat(id % 97, '') FROM (SELECT * FROM t ORDER BY id)"
    ).fetchone()
    con.close()
    # A new connection reads the same.
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    again = con.execute(
        "SELECT count(*), sum(n), sum(length(v)), group_concat(id % 97, '') FROM (SELECT * FROM t ORDER BY id)"
    ).fetchone()
    con.close()
    eq(again, summary, "a new connection's view")
    sys.stderr.write(f"sqlite_wal: {checks} concurrent snapshots checked, {len(seen)} distinct\n")
    json.dump(
        {
            "rows": summary[0],
            "sum_n": summary[1],
            "sum_len": summary[2],
            "ids_sha256": hashlib.sha256(summary[3].encode()).hexdigest(),
        },
        sys.stdout,
        sort_keys=True,
    )
    sys.stdout.write("\n")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--writer":
        writer(sys.argv[2])
    elif len(sys.argv) == 2:
        main(sys.argv[1])
    else:
        sys.exit("usage: sqlite_wal.py [--writer] DB")
