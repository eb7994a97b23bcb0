#!/usr/bin/env python3
"""Crash tests of isolated mounts (tests/isolation_crash.rs), with iso_model.py's
operations, trees and comparisons.

  iso_crash.py writer MNT REF STORE SEED FIRST OPLOG
        operations FIRST, FIRST+1, ... on MNT and on the reference REF until the mount goes
        away, each one that makes at most one change (so none can be half there after a
        crash); every few operations an fsync (of a directory or of a file open for
        writing) on the mount. OPLOG (outside the mount) gets {"i", "op"} before an
        operation starts, {"i", "res", "seq"} when it returned, {"i", "gone"} when it
        failed because the daemon died, {"sync": i} when an fsync covering operations 1..i
        returned. stdout gets "B i" as operation i starts on the mount, "D i" when it is done,
        "S i" per fsync. Exits 3
        when the mount is gone, 1 when the mount and REF disagree.
  iso_crash.py verify MNT REF STORE OPLOG WORK
        after the daemon was killed and the store mounted again: the view must be REF after
        some prefix 1..p of the logged operations, where p is at least the last operation
        covered by an acknowledged fsync (or seen after an earlier remount) and at most the
        last one begun; anything else (a lost acknowledged operation, a torn one, or
        something never done) fails. Leaves REF at that state and OPLOG cut to it, and
        prints {"p", "completed", "synced", "inflight", "last_seq"}.
"""

import errno
import json
import os
import random
import shutil
import subprocess
import sys

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import iso_model as M  # noqa: E402

# ECANCELED: a request the kernel was handing to the daemon's io_uring when it died.
GONE = {"ENOTCONN", "ECONNABORTED", "ECANCELED"}


def mount_gone(mnt):
    try:
        os.lstat(mnt)
        os.listdir(mnt)
        return False
    except OSError as e:
        return e.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.ECANCELED)


def seq_or_none(store):
    try:
        return M.last_seq(store)
    except (OSError, RuntimeError):
        return None


def cmd_writer(mnt, ref, store, seed, first, oplog):
    log = open(oplog, "a")

    def put(v):
        log.write(json.dumps(v) + "\n")
        log.flush()

    def gone(i, why):
        put({"i": i, "gone": why})
        sys.stderr.write(f"iso_crash writer: the mount is gone at operation {i} ({why})\n")
        sys.exit(3)

    rnd = random.Random(f"{seed}:fsync:{first}")
    explicit = M.explicit_mtimes(M.read_oplog(oplog))
    next_sync = first + rnd.randrange(0, 8)
    i = first
    while True:
        op = M.gen_op(seed, i, ref, atomic=True)
        put({"i": i, "op": op})
        print(f"B {i}", flush=True)
        rm = M.apply_op(mnt, op)
        if rm[0] == "err" and rm[1] in GONE:
            gone(i, rm[1])
        rr = M.apply_op(ref, op)
        if rm != rr:
            if mount_gone(mnt):
                gone(i, f"{rm[1]} from a dying daemon")
            M.fail(f"writer: operation {i} {M.short(op)}: the mount gave {rm}, "
                   f"the reference {rr}")
        seq = seq_or_none(store)
        put({"i": i, "res": rm, "seq": seq})
        if op["op"] == "utime" and rm[0] == "ok":
            explicit.add(op["mtime"])
        diffs = []
        for rel in M.op_paths(op):
            diffs += M.diff_obj(rel, M.describe(mnt, rel), M.describe(ref, rel), explicit)
        if diffs:
            if mount_gone(mnt):
                gone(i + 1, "while checking")
            M.fail(f"writer: after operation {i} {M.short(op)} (result {rm}), the mount "
                   f"differs from the reference:\n" + "\n".join(diffs))
        print(f"D {i}", flush=True)
        if i >= next_sync:
            next_sync = i + rnd.randrange(1, 9)
            try:
                if rnd.random() < 0.5:
                    fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
                else:
                    files = sorted(r for r, (k, _) in M.scan(ref).items() if k == "f")
                    target = M.P(mnt, rnd.choice(files)) if files else mnt
                    flags = os.O_WRONLY | os.O_NONBLOCK if files else os.O_RDONLY
                    fd = os.open(target, flags)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as e:
                name = errno.errorcode.get(e.errno, str(e.errno))
                if name in GONE or mount_gone(mnt):
                    gone(i + 1, f"fsync: {name}")
                M.fail(f"writer: fsync after operation {i}: {e}")
            put({"sync": i})
            print(f"S {i}", flush=True)
        i += 1


def cmd_verify(mnt, ref, store, oplog, work):
    begun, results, syncs = {}, {}, [0]
    with open(oplog) as f:
        for line in f:
            v = json.loads(line)
            if "sync" in v:
                syncs.append(v["sync"])
                continue
            if "op" in v:
                begun[v["i"]] = v["op"]
            if "res" in v:
                results[v["i"]] = v
    completed = max(results, default=0)
    if sorted(results) != list(range(1, completed + 1)):
        M.fail(f"{oplog}: results are not for operations 1..{completed}")
    last_begun = max(begun, default=0)
    inflight = last_begun if last_begun == completed + 1 else None
    synced = max(syncs)
    merged = [{"i": i, "op": begun[i], "res": results[i]["res"], "seq": results[i]["seq"]}
              for i in range(1, completed + 1)]
    explicit = M.explicit_mtimes(merged)
    if inflight and begun[inflight]["op"] == "utime":
        explicit.add(begun[inflight]["mtime"])
    seq_done = merged[-1]["seq"] if merged else 0
    last = M.last_seq(store)
    view = M.snapshot(mnt)
    tried = []

    def matches(base):
        diffs = M.diff_trees(view, M.snapshot(base), explicit)
        tried.append(diffs)
        return not diffs

    try_dir = os.path.join(work, "try")
    order = [completed, completed + 1] if inflight else [completed]
    if inflight and seq_done is not None and last > seq_done:
        order.reverse()  # the operation under way at the kill recorded its change
    p, inflight_res = None, None
    for cand in order:
        if cand == completed:
            if matches(ref):
                p = cand
                break
        else:
            shutil.rmtree(try_dir, ignore_errors=True)
            subprocess.run(["cp", "-a", "--", ref, try_dir], check=True)
            inflight_res = M.apply_op(try_dir, begun[inflight])
            if matches(try_dir):
                shutil.rmtree(ref)
                os.rename(try_dir, ref)
                p = cand
                break
    lost = False
    if p is None:
        # Operations that returned but were never fsynced may be lost: rebuild the
        # states before them from the initial tree.
        for cand in range(completed - 1, synced - 1, -1):
            shutil.rmtree(try_dir, ignore_errors=True)
            M.build(try_dir)
            for e in merged[:cand]:
                if e["op"]["op"] not in M.READ_ONLY:
                    r = M.apply_op(try_dir, e["op"])
                    if r != e["res"]:
                        M.fail(f"replaying operation {e['i']} gave {r}, not {e['res']}")
            if matches(try_dir):
                shutil.rmtree(ref)
                os.rename(try_dir, ref)
                p, lost = cand, True
                break
    if p is None:
        M.fail(f"after the crash, the view is no state between operation {synced} (the last "
               f"one acknowledged by fsync) and operation {last_begun} (the last one begun); "
               f"{completed} had returned. Against the state after operation {completed}:\n"
               + "\n".join(M.explain(mnt, ref, tried[0]))
               + (f"\nthe operation under way: {M.short(begun[inflight])}" if inflight else ""))
    # The journal ends exactly with the changes of the operations in that state.
    if not lost and seq_done is not None:
        want = {seq_done} if p == completed else {seq_done, seq_done + 1}
        if last not in want:
            M.fail(f"the view is the state after operation {p}, but the last sequence number "
                   f"is {last}; after operation {completed} it was {seq_done}")
    if p == completed + 1:
        merged.append({"i": p, "op": begun[p], "res": inflight_res, "seq": last})
    merged = merged[:p]
    with open(oplog, "w") as f:
        for e in merged:
            f.write(json.dumps(e) + "\n")
        # What the remounted view showed cannot be lost by a later crash of the daemon.
        f.write(json.dumps({"sync": p}) + "\n")
    print(json.dumps({"p": p, "completed": completed, "synced": synced, "inflight": inflight,
                      "lost": lost, "last_seq": last}))


def main(argv):
    cmd = argv[1]
    if cmd == "writer":
        mnt, ref, store, seed, first, oplog = argv[2:8]
        cmd_writer(mnt, ref, store, seed, int(first), oplog)
    elif cmd == "verify":
        cmd_verify(*argv[2:7])
    else:
        M.fail(f"unknown command {cmd}")


if __name__ == "__main__":
    main(sys.argv)
