#!/usr/bin/env python3
"""SQLite in WAL mode on an isolated mount, committed while the database stays open.

Usage: iso_sqlite_commit.py DB STORE INTERPOSE

One connection (WAL, mmap I/O) writes rounds of rows; after each round `INTERPOSE
isolation commit STORE` runs while the connection is open, in alternate rounds with a
read transaction of a second connection held across the commit. After every commit the
database must pass integrity_check, hold exactly the rows written, and the held read
transaction must still see its snapshot. Exits 1 with a message on the first violation;
on success prints a JSON summary.
"""

import json
import sqlite3
import subprocess
import sys

ROUNDS = 6
ROWS = 400


def fail(msg):
    sys.stderr.write(f"iso_sqlite_commit: FAIL: {msg}\n")
    sys.exit(1)


def eq(got, want, what):
    if got != want:
        fail(f"{what}: got {got!r}, expected {want!r}")


def commit(binary, store, upto=None):
    cmd = [binary, "isolation", "commit", store]
    if upto is not None:
        cmd += ["--upto", str(upto)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        fail(f"{' '.join(cmd)}: status {p.returncode}: {p.stderr.strip()}")
    return p.stdout


def status(binary, store):
    p = subprocess.run([binary, "isolation", "status", store, "--json"], capture_output=True, text=True)
    if p.returncode != 0:
        fail(f"status: {p.stderr.strip()}")
    return json.loads(p.stdout)


def main(db, store, binary):
    con = sqlite3.connect(db, timeout=30, isolation_level=None)
    eq(con.execute("PRAGMA journal_mode=WAL").fetchone()[0], "wal", "journal_mode")
    con.execute("PRAGMA mmap_size=67108864")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, round INTEGER NOT NULL, v TEXT NOT NULL)")
    reader = sqlite3.connect(db, timeout=30, isolation_level=None)
    commits = 0
    for r in range(ROUNDS):
        con.execute("BEGIN IMMEDIATE")
        con.executemany(
            "INSERT INTO t(round, v) VALUES (?, ?)",
            [(r, f"round {r} row {i} " + "x" * (i % 97)) for i in range(ROWS)],
        )
        con.execute("COMMIT")
        held = r % 2 == 1
        if held:
            reader.execute("BEGIN")
            before = reader.execute("SELECT count(*) FROM t").fetchone()[0]
            eq(before, (r + 1) * ROWS + sum(1 for k in range(r) if k % 2 == 1), f"round {r}: the reader's snapshot")
        if r == 2:
            # Part of the pending changes only: up to the middle of what is pending.
            st = status(binary, store)
            mid = (st["committed_upto"] + st["last_seq"]) // 2
            commit(binary, store, mid)
            st2 = status(binary, store)
            eq(st2["committed_upto"], mid, "committed_upto after commit --upto")
        else:
            commit(binary, store)
            st2 = status(binary, store)
            eq(st2["pending_changes"], 0, f"round {r}: pending changes after commit")
        commits += 1
        if held:
            # The writer adds rows while the snapshot is held; the reader still sees its own.
            con.execute("INSERT INTO t(round, v) VALUES (?, 'during a held read')", (r,))
            eq(reader.execute("SELECT count(*) FROM t").fetchone()[0], before, f"round {r}: snapshot after commit")
            reader.execute("COMMIT")
        eq(con.execute("PRAGMA integrity_check").fetchone()[0], "ok", f"round {r}: integrity_check after commit")
        extra = sum(1 for k in range(r + 1) if k % 2 == 1)
        eq(con.execute("SELECT count(*) FROM t").fetchone()[0], (r + 1) * ROWS + extra, f"round {r}: rows")
    eq(con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone(), (0, 0, 0), "final checkpoint")
    summary = con.execute("SELECT count(*), sum(round), sum(length(v)) FROM t").fetchone()
    reader.close()
    con.close()
    json.dump({"commits": commits, "rows": summary[0], "sum_round": summary[1], "sum_len": summary[2]}, sys.stdout, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: iso_sqlite_commit.py DB STORE INTERPOSE")
    main(*sys.argv[1:])
