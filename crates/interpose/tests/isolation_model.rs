//! Model-based tests of isolated mounts (`interpose fs mount BACKING MNT --isolate STORE`),
//! with the real binary and scripts/iso_model.py:
//!
//! - thousands of random operations (writes at any offset and length, truncates, hole
//!   punching and other fallocate modes, creates, mkdir, mkfifo, symlinks, hard links,
//!   unlink, rmdir, renames of files and directories with RENAME_NOREPLACE and
//!   RENAME_EXCHANGE, chmod, chown, utime, user.* xattrs, and reads) on the mount and on a
//!   plain reference directory: every operation gives the same result or errno on both,
//!   records changes exactly when it changes something, and the trees stay equal;
//! - BACKING is untouched (every inode, mode, owner, size, time, byte and xattr) until the
//!   first commit, also across an unmount and remount, which shows the same view;
//! - `commit --upto S` for the sequence number S after a random operation k leaves BACKING
//!   equal to the initial tree with operations 1..k replayed on it, while the mount still
//!   shows everything; `discard --after` a later point and committing the rest leave both
//!   equal to the replay up to that point. Once through the daemon's control socket, once
//!   on an unmounted store (and a mount without passthrough).
//!
//! - with `--write-through`, BACKING equals the reference after the operations, every
//!   change is in the log and none is pending; with `--isolate-path d1/d2`, changes below
//!   d1/d2 are isolated (BACKING's d1/d2 untouched until commit), all others reach BACKING
//!   at once and record nothing unless entangled with pending changes (see iso_model.py),
//!   renames and links across the border are recorded, and after a commit BACKING is what
//!   the mount showed; with filters (audit, and a deny rule for another uid that keeps
//!   the kernel from caching anything), the same, and every kind of operation audited.
//!
//! The seed is printed; `INTERPOSE_ISO_SEED=N` repeats a run, `INTERPOSE_ISO_OPS=N` sets
//! the number of operations. For narrowing a failure down (never in a normal run),
//! `INTERPOSE_ISO_EXCLUDE=a,b` leaves kinds of operations out (see iso_model.py).

mod common;
mod isomodel;
use common::*;
use isomodel::*;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde_json::Value;

fn op_count() -> u64 {
    match std::env::var("INTERPOSE_ISO_OPS") {
        Ok(s) => s.parse().expect("INTERPOSE_ISO_OPS must be a number"),
        Err(_) => 2400,
    }
}

type Model = ModelDirs;

impl ModelDirs {
    /// Operations first..first+count-1 on the mount and the reference; the script's summary.
    fn run_ops(&self, first: u64, count: u64) -> Value {
        let out = self.model(&[
            "run".as_ref(),
            self.mnt.as_os_str(),
            self.reference.as_os_str(),
            self.store.as_os_str(),
            self.seed.to_string().as_ref(),
            first.to_string().as_ref(),
            count.to_string().as_ref(),
            self.oplog.as_os_str(),
        ]);
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("summary {out:?}: {e}"))
    }

    /// seqs[i]: the daemon's last sequence number after operation i (seqs[0] = 0).
    fn seqs(&self) -> Vec<u64> {
        let text = std::fs::read_to_string(&self.oplog).unwrap();
        let mut out = vec![0];
        for (n, line) in text.lines().enumerate() {
            let v: Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["i"].as_u64(), Some(n as u64 + 1), "oplog line {n}");
            out.push(v["seq"].as_u64().expect("seq"));
        }
        out
    }

    /// A fresh initial tree with the logged operations 1..=k replayed on it.
    fn state_after(&self, k: u64) -> PathBuf {
        let dir = self.root.join(format!("after-{k}"));
        if !dir.exists() {
            self.model(&["build".as_ref(), dir.as_os_str()]);
            self.model(&[
                "replay".as_ref(),
                dir.as_os_str(),
                self.oplog.as_os_str(),
                k.to_string().as_ref(),
            ]);
        }
        dir
    }

    /// `checked` must equal `reference` (see iso_model.py compare).
    fn compare(&self, checked: &Path, reference: &Path, what: &str) {
        let out = Command::new("python3")
            .arg(script("iso_model.py"))
            .arg("compare")
            .arg(checked)
            .arg(reference)
            .arg(&self.oplog)
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "seed {}: {what}:\n{}",
            self.seed,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `interpose isolation SUB STORE EXTRA...`, which must succeed; its stdout.
    fn iso(&self, sub: &str, extra: &[&str]) -> String {
        let out = Command::new(bin())
            .args(["isolation", sub])
            .arg(&self.store)
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "seed {}: interpose isolation {sub} {extra:?} failed ({}):\n{}{}",
            self.seed,
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn status(&self) -> Value {
        let out = self.iso("status", &["--json"]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json: {e}:\n{out}"))
    }

    /// The sequence numbers `log --json` lists.
    fn logged_seqs(&self) -> Vec<u64> {
        let log: Value = serde_json::from_str(&self.iso("log", &["--json"])).unwrap();
        log.as_array()
            .expect("log --json is an array")
            .iter()
            .map(|e| e["seq"].as_u64().expect("seq"))
            .collect()
    }

    /// status --json says what it must; log --json lists exactly the pending changes.
    fn assert_status(&self, mounted: bool, last: u64, committed: u64, what: &str) {
        let s = self.status();
        let want = [
            ("last_seq", Value::from(last)),
            ("committed_upto", Value::from(committed)),
            ("pending_changes", Value::from(last - committed)),
            ("interrupted_commit", Value::Null),
            ("mounted", Value::from(mounted)),
        ];
        for (key, value) in want {
            assert_eq!(
                s[key], value,
                "seed {}: {what}: status --json {key}:\n{s:#}",
                self.seed
            );
        }
        assert_eq!(
            self.logged_seqs(),
            (committed + 1..=last).collect::<Vec<_>>(),
            "seed {}: {what}: log --json sequence numbers",
            self.seed
        );
    }
}

/// The directories of test `name`'s run, seeded with the run's seed plus `offset` (each
/// test its own sequence of operations); the seed is printed.
fn model_for(name: &str, offset: u64) -> Model {
    let base = seed();
    let seed = base.wrapping_add(offset);
    eprintln!("{name}: seed {seed} (INTERPOSE_ISO_SEED={base} repeats it)");
    let mut m = Model::new("interpose-test-isomodel-", seed);
    m.env_seed = base;
    m
}

/// Unmounts cleanly (SIGTERM); the daemon must not have panicked or logged errors.
fn stop(mnt: Mount) {
    let err = mnt.stop();
    for bad in ["panicked", "ERROR"] {
        assert!(!err.contains(bad), "the daemon logged {bad:?}:\n{err}");
    }
}

/// Every kind of change was made successfully at least once, and some failed as they must.
fn assert_coverage(seed: u64, summaries: &[Value]) {
    let count = |map: &str, op: &str| -> u64 {
        summaries
            .iter()
            .map(|s| s[map][op].as_u64().unwrap_or(0))
            .sum()
    };
    for op in [
        "write",
        "truncate",
        "fallocate",
        "create",
        "mkdir",
        "mkfifo",
        "symlink",
        "link",
        "unlink",
        "rmdir",
        "rename",
        "chmod",
        "chown",
        "utime",
        "setxattr",
        "removexattr",
        "read",
        "getxattr",
    ] {
        assert!(
            count("ok", op) > 0,
            "seed {seed}: no {op} ever succeeded: {summaries:?}"
        );
    }
    for op in ["rename", "rmdir", "link", "create"] {
        assert!(
            count("err", op) > 0,
            "seed {seed}: no {op} ever failed (the error paths went untested): {summaries:?}"
        );
    }
}

/// The common first part: operations in two halves with an unmount and remount between
/// them (the remount must show the same view). `check(when, last_seq, mounted)` runs after
/// the first half, again once unmounted, and after all operations. Returns the mount,
/// still up.
fn two_halves(m: &Model, mount_args: &[&str], check: impl Fn(&str, u64, bool)) -> Mount {
    two_halves_of(op_count(), m, mount_args, check)
}

/// [`two_halves`] with `n` operations.
fn two_halves_of(n: u64, m: &Model, mount_args: &[&str], check: impl Fn(&str, u64, bool)) -> Mount {
    let half = n / 2;
    let started = Instant::now();
    let mnt = m.mount_with(mount_args);
    let first = m.run_ops(1, half);
    let seqs = m.seqs();
    check("after the first half", seqs[half as usize], true);
    stop(mnt);
    check("unmounted after the first half", seqs[half as usize], false);
    let mnt = m.mount_with(mount_args);
    m.compare(
        &m.mnt,
        &m.reference,
        "remounted after the first half, the view differs from what it was",
    );
    let second = m.run_ops(half + 1, n - half);
    let seqs = m.seqs();
    eprintln!(
        "seed {}: {n} operations in {:.1?}, {} changes; first half {first}, second half {second}",
        m.seed,
        started.elapsed(),
        seqs[n as usize]
    );
    assert_coverage(m.seed, &[first, second]);
    check("after all operations", seqs[n as usize], true);
    mnt
}

/// [`two_halves`] on an isolating mount: BACKING untouched, every change pending.
fn run_in_two_halves(m: &Model, mount_args: &[&str]) -> Mount {
    run_in_two_halves_of(op_count(), m, mount_args)
}

/// [`run_in_two_halves`] with `n` operations.
fn run_in_two_halves_of(n: u64, m: &Model, mount_args: &[&str]) -> Mount {
    two_halves_of(n, m, mount_args, |when, last, mounted| {
        m.assert_backing_untouched(when);
        m.assert_status(mounted, last, 0, when);
    })
}

#[test]
fn model_mounted_commit_discard() {
    let m = model_for("model_mounted_commit_discard", 0);
    let mut rng = Rng(m.seed ^ 0x5eed);
    let n = op_count();
    let mnt = run_in_two_halves(&m, &[]);
    let seqs = m.seqs();
    let last = seqs[n as usize];

    // Commit up to after operation k, through the daemon.
    let k = rng.range(1, n - 2);
    let sk = seqs[k as usize];
    eprintln!("commit --upto {sk} (after operation {k} of {n})");
    m.iso("commit", &["--upto", &sk.to_string()]);
    m.assert_status(true, last, sk, "after commit --upto");
    let after_k = m.state_after(k);
    m.compare(
        &m.backing,
        &after_k,
        &format!(
            "after commit --upto {sk}, BACKING is not the initial tree with operations 1..={k}"
        ),
    );
    m.compare(
        &m.mnt,
        &m.reference,
        &format!("after commit --upto {sk}, the mount no longer shows every change"),
    );

    // Throw away what came after operation j, through the daemon.
    let j = rng.range(k, n - 1);
    let sj = seqs[j as usize];
    eprintln!("discard --after {sj} (after operation {j})");
    m.iso("discard", &["--after", &sj.to_string()]);
    m.assert_status(true, sj, sk, "after discard --after");
    let after_j = m.state_after(j);
    m.compare(
        &m.mnt,
        &after_j,
        &format!("after discard --after {sj}, the mount is not the tree after operation {j}"),
    );
    m.compare(
        &m.backing,
        &after_k,
        &format!("discard --after {sj} changed BACKING"),
    );

    // Commit the rest.
    m.iso("commit", &[]);
    m.assert_status(true, sj, sj, "after committing the rest");
    m.compare(
        &m.backing,
        &after_j,
        &format!(
            "after committing everything up to {sj}, BACKING is not the tree after operation {j}"
        ),
    );
    m.compare(
        &m.mnt,
        &after_j,
        "after committing the rest, the mount changed",
    );
    stop(mnt);
    let mnt = m.mount();
    m.compare(
        &m.mnt,
        &after_j,
        "remounted after the commit, the view is not BACKING",
    );
    m.assert_status(true, sj, sj, "remounted after the commit");
    stop(mnt);
}

#[test]
fn model_offline_commit_discard() {
    let m = model_for("model_offline_commit_discard", 1);
    let mut rng = Rng(m.seed ^ 0x0ff1);
    let n = op_count();
    let args = ["--no-passthrough"];
    let mnt = run_in_two_halves(&m, &args);
    stop(mnt);
    m.assert_backing_untouched("after the unmount");
    let seqs = m.seqs();
    let last = seqs[n as usize];

    // Commit up to after operation k on the unmounted store.
    let k = rng.range(1, n - 2);
    let sk = seqs[k as usize];
    eprintln!("offline commit --upto {sk} (after operation {k} of {n})");
    m.iso("commit", &["--upto", &sk.to_string()]);
    m.assert_status(false, last, sk, "after an offline commit --upto");
    let after_k = m.state_after(k);
    m.compare(
        &m.backing,
        &after_k,
        &format!("after an offline commit --upto {sk}, BACKING is not the initial tree with operations 1..={k}"),
    );
    let mnt = m.mount_with(&args);
    m.compare(
        &m.mnt,
        &m.reference,
        &format!("remounted after an offline commit --upto {sk}, the view is not what it was"),
    );
    stop(mnt);

    // Discard after operation j, unmounted.
    let j = rng.range(k, n - 1);
    let sj = seqs[j as usize];
    eprintln!("offline discard --after {sj} (after operation {j})");
    m.iso("discard", &["--after", &sj.to_string()]);
    m.assert_status(false, sj, sk, "after an offline discard --after");
    m.compare(
        &m.backing,
        &after_k,
        &format!("an offline discard --after {sj} changed BACKING"),
    );
    let after_j = m.state_after(j);
    let mnt = m.mount_with(&args);
    m.compare(
        &m.mnt,
        &after_j,
        &format!(
            "remounted after discard --after {sj}, the view is not the tree after operation {j}"
        ),
    );
    stop(mnt);

    // Commit the rest, unmounted.
    m.iso("commit", &[]);
    m.assert_status(false, sj, sj, "after an offline commit of the rest");
    m.compare(
        &m.backing,
        &after_j,
        &format!(
            "after committing everything up to {sj}, BACKING is not the tree after operation {j}"
        ),
    );
    let mnt = m.mount_with(&args);
    m.compare(
        &m.mnt,
        &after_j,
        "remounted after the last commit, the view is not BACKING",
    );
    stop(mnt);
}

/// A --write-through store: `last` changes, all of them in BACKING (committed, none
/// pending), and all of them in `log --json` (the audit trail).
fn assert_trail(m: &Model, last: u64, what: &str) {
    let s = m.status();
    for (key, want) in [
        ("last_seq", last),
        ("committed_upto", last),
        ("pending_changes", 0),
    ] {
        assert_eq!(
            s[key],
            Value::from(want),
            "seed {}: {what}: {key}:\n{s:#}",
            m.seed
        );
    }
    assert_eq!(
        m.logged_seqs(),
        (1..=last).collect::<Vec<_>>(),
        "seed {}: {what}: log --json",
        m.seed
    );
}

#[test]
fn model_with_filters() {
    // The same operations through the filter chain: the audit filter (which reads data, so
    // nothing is passed through) and a deny rule for another uid on every path (so no
    // name or attribute is cached). The view and a mounted commit are as without them,
    // and every operation is audited.
    let m = model_for("model_with_filters", 7);
    let audit = m.root.join("audit.jsonl");
    let audit_spec = format!("audit={}", audit.display());
    let args = [
        "--filter",
        &audit_spec,
        "--filter",
        "deny=**:all:EACCES:uid=4242",
    ];
    // Half the usual operations: the filters' own paths are few, and the run is the
    // slowest of the model tests (nothing is passed through), on both transports.
    let mnt = run_in_two_halves_of(op_count() / 2, &m, &args);
    m.iso("commit", &[]);
    m.compare(
        &m.backing,
        &m.reference,
        "after committing everything through a filtered mount, BACKING is not the reference",
    );
    stop(mnt);
    let text = std::fs::read_to_string(&audit).unwrap();
    let mut seen = std::collections::BTreeMap::<String, u64>::new();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        *seen
            .entry(v["op"].as_str().unwrap().to_owned())
            .or_default() += 1;
        assert_ne!(
            v["result"], "EACCES",
            "the rule for uid 4242 refused root: {line}"
        );
    }
    for op in [
        "create",
        "write",
        "read",
        "setattr",
        "mkdir",
        "mknod",
        "symlink",
        "link",
        "unlink",
        "rmdir",
        "rename",
        "setxattr",
        "removexattr",
        "getxattr",
        "fallocate",
        "open",
        "release",
        "readdir",
    ] {
        assert!(
            seen.get(op).is_some_and(|&n| n > 0),
            "no {op} audited: {seen:?}"
        );
    }
}

#[test]
fn model_write_through() {
    // --write-through: every operation is in BACKING when it returns (BACKING equals the
    // reference, not only the mount) and recorded with its sequence number; nothing is
    // pending; a remount shows the same tree.
    let m = model_for("model_write_through", 2);
    let mnt = two_halves(&m, &["--write-through"], |when, last, _| {
        assert_trail(&m, last, when);
        let what = format!("{when}, BACKING is not what the mount shows");
        m.compare(&m.backing, &m.reference, &what);
    });
    stop(mnt);
}

#[test]
fn model_isolate_path() {
    // --isolate-path d1/d2: operations inside d1/d2 are isolated (recorded, BACKING's
    // d1/d2 untouched until commit), all others go straight to BACKING and record nothing
    // unless entangled with pending changes, renames and links across the border are
    // recorded; a remount shows the same view;
    // after a commit BACKING is what the mount showed.
    let mut m = model_for("model_isolate_path", 3);
    m.border = Some("d1/d2");
    let initial = m.state_after(0);
    let mnt = two_halves(&m, &["--isolate-path", "d1/d2"], |when, last, mounted| {
        let what = format!("{when}, BACKING's d1/d2 (isolated) changed before any commit");
        m.compare(&m.backing.join("d1/d2"), &initial.join("d1/d2"), &what);
        m.assert_status(mounted, last, 0, when);
    });
    let last = m.seqs()[op_count() as usize];
    m.iso("commit", &[]);
    m.assert_status(true, last, last, "after the commit");
    m.compare(
        &m.backing,
        &m.reference,
        "after the commit, BACKING is not what the mount showed",
    );
    m.compare(&m.mnt, &m.reference, "after the commit, the mount changed");
    stop(mnt);
}

#[test]
fn model_isolate_path_names_of_a_hard_link() {
    // A seed model_isolate_path failed with (INTERPOSE_ISO_SEED=340688504): operation 935
    // links d1/n1 into a path a pending change made isolated; the daemon records the link
    // under the file's other name, d1/n0/n1, the one its view met first; operation 1099
    // renames d1/n0, which the daemon must then record (the model once took that for a
    // change outside everything pending). Pinned, as the operations come from the seed.
    isolate_path_pinned(340_688_507, 1100);
}

/// The operations 1..=`ops` of the model's `seed` on a `--isolate-path d1/d2` mount.
fn isolate_path_pinned(seed: u64, ops: u64) {
    let mut m = Model::new("interpose-test-isomodel-", seed);
    m.border = Some("d1/d2");
    let mnt = m.mount_with(&["--isolate-path", "d1/d2"]);
    m.run_ops(1, ops);
    stop(mnt);
}

#[test]
fn model_isolate_path_symlink_to_a_directory_with_two_names() {
    // A seed model_isolate_path failed with (INTERPOSE_ISO_SEED=124738675): operation 563
    // hard-links the symlink n1/n7 (to a directory) outside the isolated paths, operation
    // 619 exchanges the directory holding its second name with an isolated one, and
    // operation 672 unlinks n1/n7, which the daemon rightly records (the file has an
    // isolated name). The model looked for a file's other names among os.walk's files
    // only, where a symlink to a directory is not listed. Pinned, as the operations come
    // from the seed.
    isolate_path_pinned(124_738_678, 680);
}
