//! Isolation (`interpose fs mount BACKING MNT --isolate STORE`) with the real binary, real
//! programs and the real `interpose isolation` commands:
//!
//! - git, sqlite3 in WAL mode, `rm -rf` of a large tree and a make+gcc build on an
//!   isolated mount: BACKING is untouched (every inode, size, time and byte) until commit,
//!   and afterwards holds exactly what the mount showed; a database kept open, and a
//!   writer appending, while mounted commits run under them; four writers that check
//!   every read and listing against exact models while commits run again and again;
//!   an `rm -rf` committed with a few syncs, and resumed after kills at its removals;
//! - a one-byte write into a 10 GiB sparse file costs a block, and SEEK_DATA/SEEK_HOLE
//!   show the right regions before and after commit (python's os.lseek);
//! - status and log of a known sequence of changes; commit --upto and discard --after, on
//!   a mounted store (the mount shows the result at once, caches, open descriptors and
//!   modification times included) and on an unmounted one (then remounted); cuts between
//!   the changes of a renamed directory; a commit that fails half-way, run again;
//! - remount, a store of another backing directory, a directory that is not a store or
//!   lies inside BACKING, a corrupt record, a torn last record, a store on another file
//!   system, a store on a full file system, a write that fails right after an fsync (the
//!   sync's mark stays, so later damage before it is refused, not cut);
//! - two descriptors and a shared mapping of one isolated file, also across a discard;
//! - files read, closed and at once rewritten or truncated (8 threads, so the kernel's
//!   release of the passthrough open is still in flight), and a file held open read-only
//!   refusing writers with ETXTBSY until closed;
//! - listings with attributes (READDIRPLUS) agree with lstat, and every entry sent is a
//!   lookup the daemon later forgets (`status`'s view_nodes);
//! - `--isolate-path` (only matching subtrees isolated, the rest straight to BACKING) and
//!   `--write-through` (every change applied at once and recorded), and files open while
//!   changes straight to BACKING rename over them or unlink them; an unchanged file open
//!   many times at once, and `git init`, in each mode; chmod of a file with an ACL;
//!   descriptors across a discard that brings a replaced file back; readers and writers
//!   of one file at once where nothing is isolated.

mod common;
mod support;
use common::*;
use support::*;

use std::fs::{self, File, OpenOptions};
use std::hash::Hasher;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{symlink, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

const NO_MTIME: ManifestOpts = ManifestOpts {
    mtime: false,
    owner: true,
};
const FULL: ManifestOpts = ManifestOpts {
    mtime: true,
    owner: true,
};

// ---------------------------------------------------------------------------------------
// Helpers

/// A temporary directory holding `backing/`, `mnt/` and (once mounted) `store/`. Named like
/// the harness's, so scripts/test.sh notices a mount left behind.
struct Dirs {
    tmp: tempfile::TempDir,
    backing: PathBuf,
    mnt: PathBuf,
    store: PathBuf,
}

fn dirs() -> Dirs {
    let tmp = plain_dir("interpose-test-iso-");
    let backing = tmp.path().join("backing");
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&backing).unwrap();
    fs::create_dir(&mnt).unwrap();
    let store = tmp.path().join("store");
    Dirs {
        tmp,
        backing,
        mnt,
        store,
    }
}

impl Dirs {
    /// `interpose fs mount BACKING MNT --isolate STORE`, waiting for its readiness line.
    fn mount(&self) -> Mount {
        self.mount_with(&[])
    }

    /// [`Dirs::mount`] with more `fs mount` arguments.
    fn mount_with(&self, extra: &[&str]) -> Mount {
        let mut args = vec!["--isolate", s(&self.store)];
        args.extend_from_slice(extra);
        Mount::start(&self.backing, &self.mnt, &args)
    }
}

/// `interpose isolation SUB STORE EXTRA...`, which must fail; its stderr.
fn iso_fails(sub: &str, store: &Path, extra: &[&str]) -> String {
    let out = output(
        Command::new(bin())
            .args(["isolation", sub])
            .arg(store)
            .args(extra),
    );
    assert!(
        !out.status.success(),
        "interpose isolation {sub} {extra:?} succeeded where it must fail: {}",
        describe(&out)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn status(store: &Path) -> Value {
    let out = iso("status", store, &["--json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json: {e}:\n{out}"))
}

fn num(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no number {key:?} in {v:#}"))
}

/// The fields of `status --json` that describe the changes (not the store's size).
fn status_summary(v: &Value) -> String {
    format!(
        "last_seq={} committed_upto={} pending_changes={} files={} data_bytes={} interrupted_commit={} mounted={}",
        v["last_seq"],
        v["committed_upto"],
        v["pending_changes"],
        v["files"],
        v["data_bytes"],
        v["interrupted_commit"],
        v["mounted"]
    )
}

/// `isolation log --json --since N`, each entry as "SEQ OP PATH[ -> TO][ kind=K]
/// [size=S bytes=B]".
fn log_json(store: &Path, since: u64) -> Vec<String> {
    let out = iso("log", store, &["--json", "--since", &since.to_string()]);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("log --json: {e}:\n{out}"));
    v.as_array()
        .unwrap_or_else(|| panic!("log --json is not an array: {v:#}"))
        .iter()
        .map(|e| {
            let str_of = |k: &str| match &e[k] {
                Value::String(t) => t.clone(),
                Value::Null => "-".into(),
                other => other.to_string(),
            };
            let mut line = format!("{} {}", e["seq"], str_of("op"));
            if e.get("path").is_some() {
                line += &format!(" {}", str_of("path"));
            } else {
                line += &format!(" {} -> {}", str_of("from"), str_of("to"));
            }
            if let Some(k) = e.get("kind") {
                let k = match k {
                    Value::String(t) => t.clone(),
                    Value::Object(o) => o.keys().next().cloned().unwrap_or_default(),
                    other => other.to_string(),
                };
                line += &format!(" kind={k}");
            }
            if str_of("op") == "data" {
                line += &format!(
                    " size={} bytes={}",
                    e["size"],
                    e.get("data_bytes").and_then(Value::as_u64).unwrap_or(0)
                );
            }
            line
        })
        .collect()
}

/// `isolation log` (the text form), whitespace squeezed.
fn log_text(store: &Path, since: u64) -> Vec<String> {
    iso("log", store, &["--since", &since.to_string()])
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

fn commit(store: &Path, upto: Option<u64>) -> String {
    let n = upto.map(|n| n.to_string());
    let extra: Vec<&str> = match &n {
        Some(n) => vec!["--upto", n],
        None => vec![],
    };
    let out = iso("commit", store, &extra);
    assert!(out.contains("committed up to change"), "commit said: {out}");
    out
}

fn discard(store: &Path, after: Option<u64>) -> String {
    let n = after.map(|n| n.to_string());
    let extra: Vec<&str> = match &n {
        Some(n) => vec!["--after", n],
        None => vec![],
    };
    let out = iso("discard", store, &extra);
    assert!(out.contains("discarded"), "discard said: {out}");
    out
}

/// The data regions of a file, by SEEK_DATA/SEEK_HOLE.
fn data_regions(f: &File) -> Vec<(u64, u64)> {
    let size = f.metadata().unwrap().len();
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut off = 0u64;
    while off < size {
        // SAFETY: lseek on a descriptor we own.
        let d = unsafe { libc::lseek(fd, off as i64, libc::SEEK_DATA) };
        if d < 0 {
            let e = std::io::Error::last_os_error();
            assert_eq!(e.raw_os_error(), Some(libc::ENXIO), "SEEK_DATA: {e}");
            break;
        }
        // SAFETY: as above.
        let h = unsafe { libc::lseek(fd, d, libc::SEEK_HOLE) };
        assert!(h > d, "SEEK_HOLE from {d}: {h}");
        out.push((d as u64, h as u64));
        off = h as u64;
    }
    out
}

/// Everything about a tree that a change to it would alter: for every object, the root
/// included, its path, type, mode, owner, link count, inode number, size, blocks, mtime and
/// ctime (ns), symlink target, xattrs, and for files the data regions and a hash of their
/// bytes (cheap for a huge sparse file). Access times are left out: reading sets them.
fn fingerprint(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fingerprint_into(root, Path::new(""), &mut out);
    out
}

fn fingerprint_into(root: &Path, rel: &Path, out: &mut Vec<String>) {
    let full = root.join(rel);
    let md = fs::symlink_metadata(&full).unwrap();
    let mut line = format!(
        "/{} mode={:o} owner={}:{} nlink={} ino={} size={} blocks={} mtime={}.{:09} ctime={}.{:09}",
        esc(rel.as_os_str().as_encoded_bytes()),
        md.mode(),
        md.uid(),
        md.gid(),
        md.nlink(),
        md.ino(),
        md.size(),
        md.blocks(),
        md.mtime(),
        md.mtime_nsec(),
        md.ctime(),
        md.ctime_nsec()
    );
    if md.file_type().is_symlink() {
        line += &format!(" -> {}", fs::read_link(&full).unwrap().display());
    }
    if md.is_file() {
        let f = File::open(&full).unwrap();
        let regions = data_regions(&f);
        let mut h = std::hash::DefaultHasher::new();
        let mut buf = vec![0u8; 1 << 20];
        for &(a, b) in &regions {
            let mut off = a;
            while off < b {
                let n = ((b - off) as usize).min(buf.len());
                f.read_exact_at(&mut buf[..n], off).unwrap();
                h.write(&buf[..n]);
                off += n as u64;
            }
        }
        line += &format!(" regions={regions:?} hash={:016x}", h.finish());
    }
    for (name, value) in xattrs(&full) {
        line += &format!(" xattr:{}={}", esc(&name), esc(&value));
    }
    out.push(line);
    if md.is_dir() {
        let mut names: Vec<_> = fs::read_dir(&full)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for n in names {
            fingerprint_into(root, &rel.join(n), out);
        }
    }
}

/// Asserts `backing` is exactly as fingerprinted before.
fn assert_untouched(backing: &Path, before: &[String], when: &str) {
    assert_same(
        &format!("the backing directory {when}"),
        "before",
        before,
        "now",
        &fingerprint(backing),
    );
}

/// Inode number and mtime (ns) of every object under `root` (root included).
fn inodes_and_times(root: &Path) -> (Vec<String>, Vec<String>) {
    let mut inos = Vec::new();
    let mut times = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let md = fs::symlink_metadata(root.join(&rel)).unwrap();
        let name = esc(rel.as_os_str().as_encoded_bytes());
        inos.push(format!("/{name} ino={}", md.ino()));
        times.push(format!(
            "/{name} mtime={}.{:09}",
            md.mtime(),
            md.mtime_nsec()
        ));
        if md.is_dir() {
            for e in fs::read_dir(root.join(&rel)).unwrap() {
                stack.push(rel.join(e.unwrap().file_name()));
            }
        }
    }
    inos.sort();
    times.sort();
    (inos, times)
}

/// Runs `interpose fs mount BACKING MNT --isolate STORE`, which must fail; returns its
/// stderr.
fn mount_fails(backing: &Path, mnt: &Path, store: &Path) -> String {
    mount_refused(backing, mnt, &["--isolate", s(store)])
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2_654_435_761)
                .rotate_left(seed as u32 % 32) as u8
                ^ seed
        })
        .collect()
}

/// Opens `p` for reading and writing.
fn open_rw(p: &Path) -> File {
    OpenOptions::new().read(true).write(true).open(p).unwrap()
}

fn read(p: &Path) -> Vec<u8> {
    fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn read_str(p: &Path) -> String {
    String::from_utf8(read(p)).unwrap()
}

fn mode_of(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

// ---------------------------------------------------------------------------------------
// Real programs

const GIT_ORIGIN: &str = r#"
set -eu
g() { git -c user.name=Tester -c user.email=tester@example.invalid -c init.defaultBranch=main "$@"; }
g init -q origin
cd origin
mkdir -p src/sub docs
printf 'int main(void) { return 0; }\n' > src/main.c
printf 'one\n' > src/sub/a.txt
printf '# Readme\n' > docs/README.md
printf '#!/bin/sh\necho run\n' > run.sh
chmod +x run.sh
ln -s docs/README.md README
g add -A
g commit -q -m first
g tag first
printf 'two\n' > src/sub/a.txt
g mv docs/README.md docs/GUIDE.md
ln -sfn docs/GUIDE.md README
seq 1 40000 > numbers.txt
g rm -q run.sh
g add -A
g commit -q -m second
mkdir -p deep/a/b/c
for i in $(seq 1 40); do echo "file $i" > deep/a/b/c/f$i; done
g add -A
g commit -q -m third
"#;

fn git(dir: &Path, home: &Path, args: &[&str]) -> String {
    run(Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("HOME", home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("LC_ALL", "C"))
}

#[test]
fn git_clone_and_checkout_on_an_isolated_mount_then_commit() {
    let plain = plain_dir("interpose-iso-git-");
    let home = plain.path().join("home");
    fs::create_dir(&home).unwrap();
    run(Command::new("sh")
        .arg("-c")
        .arg(GIT_ORIGIN)
        .current_dir(plain.path())
        .env("HOME", &home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_DATE", "2020-01-02T03:04:05Z")
        .env("GIT_COMMITTER_DATE", "2020-01-02T03:04:05Z"));
    let origin = plain.path().join("origin");
    let first = git(&origin, &home, &["rev-parse", "first"]);

    let d = dirs();
    fs::create_dir(d.backing.join("existing")).unwrap();
    fs::write(d.backing.join("existing/notes.txt"), b"kept as is\n").unwrap();
    let before = fingerprint(&d.backing);
    let m = d.mount();

    git(&d.mnt, &home, &["clone", "-q", s(&origin), "repo"]);
    let repo = d.mnt.join("repo");
    assert_eq!(read_str(&repo.join("src/sub/a.txt")), "two\n");
    assert!(repo.join("deep/a/b/c/f40").exists());
    git(&repo, &home, &["checkout", "-q", "first"]);
    assert_eq!(git(&repo, &home, &["rev-parse", "HEAD"]), first);
    assert_eq!(
        git(&repo, &home, &["status", "--porcelain"]),
        "",
        "git status after checkout of the first commit"
    );
    assert_eq!(read_str(&repo.join("src/sub/a.txt")), "one\n");
    assert!(!repo.join("deep").exists(), "deep/ left after checkout");
    assert!(!repo.join("numbers.txt").exists());
    assert_eq!(
        fs::read_link(repo.join("README")).unwrap(),
        Path::new("docs/README.md")
    );
    assert_eq!(mode_of(&repo.join("run.sh")), 0o755);
    git(
        &repo,
        &home,
        &["fsck", "--full", "--strict", "--no-progress"],
    );
    // A branch with a commit made in the mount; gc packs and prunes (many renames and
    // unlinks); then back to the first commit.
    git(&repo, &home, &["checkout", "-q", "-b", "work", "main"]);
    fs::write(repo.join("src/sub/a.txt"), "three\n").unwrap();
    let id = ["-c", "user.name=T", "-c", "user.email=t@example.invalid"];
    git(
        &repo,
        &home,
        &[&id[..], &["commit", "-q", "-am", "in the mount"]].concat(),
    );
    let work = git(&repo, &home, &["rev-parse", "HEAD"]);
    git(&repo, &home, &["gc", "-q", "--prune=now"]);
    let counts = git(&repo, &home, &["count-objects", "-v"]);
    assert!(
        counts.starts_with("count: 0\n"),
        "loose objects after gc:\n{counts}"
    );
    git(
        &repo,
        &home,
        &["fsck", "--full", "--strict", "--no-progress"],
    );
    git(&repo, &home, &["checkout", "-q", "first"]);
    assert_eq!(git(&repo, &home, &["rev-parse", "HEAD"]), first);
    assert_eq!(git(&repo, &home, &["status", "--porcelain"]), "");
    assert_eq!(read_str(&repo.join("src/sub/a.txt")), "one\n");
    assert_untouched(
        &d.backing,
        &before,
        "after git clone, checkout, commit and gc",
    );

    let view = manifest(&d.mnt, NO_MTIME);
    commit(&d.store, None);
    assert_same(
        "git repo after commit",
        "the view before commit",
        &view,
        "backing",
        &manifest(&d.backing, NO_MTIME),
    );
    assert_same(
        "git repo after commit",
        "the view before commit",
        &view,
        "the view after commit",
        &manifest(&d.mnt, NO_MTIME),
    );
    let st = status(&d.store);
    assert_eq!(num(&st, "pending_changes"), 0, "{st:#}");
    m.stop();
    let brepo = d.backing.join("repo");
    assert_eq!(git(&brepo, &home, &["rev-parse", "HEAD"]), first);
    assert_eq!(git(&brepo, &home, &["rev-parse", "work"]), work);
    assert_eq!(
        git(&brepo, &home, &["show", "work:src/sub/a.txt"]),
        "three\n"
    );
    assert_eq!(
        git(&brepo, &home, &["status", "--porcelain"]),
        "",
        "git status in the committed backing directory"
    );
    git(
        &brepo,
        &home,
        &["fsck", "--full", "--strict", "--no-progress"],
    );
    assert_eq!(read(&d.backing.join("existing/notes.txt")), b"kept as is\n");
}

/// Runs the sqlite3 shell on `db` with `sql` on stdin.
fn sqlite(db: &Path, sql: &str) -> String {
    let mut child = Command::new("sqlite3")
        .arg("-batch")
        .arg("-bail")
        .arg(db)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(sql.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "sqlite3 {}: {}",
        db.display(),
        describe(&out)
    );
    String::from_utf8(out.stdout).unwrap()
}

const SQL_SETUP: &str = "
PRAGMA journal_mode=WAL;
CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT NOT NULL, n INTEGER NOT NULL);
WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000)
  INSERT INTO t SELECT x, printf('orig-%d', x), x FROM c;
PRAGMA wal_checkpoint(TRUNCATE);
";

const SQL_WORK: &str = "
PRAGMA journal_mode;
PRAGMA mmap_size=67108864;
BEGIN;
WITH RECURSIVE c(x) AS (SELECT 1001 UNION ALL SELECT x + 1 FROM c WHERE x < 4000)
  INSERT INTO t SELECT x, printf('row-%d', x), x * x FROM c;
COMMIT;
BEGIN;
UPDATE t SET v = v || '-updated' WHERE id % 7 = 0;
DELETE FROM t WHERE id % 11 = 0;
COMMIT;
BEGIN;
INSERT INTO t VALUES (99999, 'rolled back', 0);
ROLLBACK;
CREATE INDEX t_v ON t(v);
PRAGMA integrity_check;
";

const SQL_MORE: &str = "
BEGIN;
INSERT INTO t VALUES (100000, 'after remount', 7);
UPDATE t SET n = n + 1 WHERE id % 3 = 0;
COMMIT;
PRAGMA integrity_check;
";

const SQL_CHECK: &str = "
PRAGMA journal_mode;
PRAGMA integrity_check;
SELECT count(*), sum(n), sum(length(v)), max(id) FROM t;
SELECT id, v, n FROM t WHERE id % 500 = 1 ORDER BY id;
";

#[test]
fn sqlite_wal_on_an_isolated_mount_survives_remount_then_commit() {
    let d = dirs();
    fs::create_dir(d.backing.join("db")).unwrap();
    let setup = sqlite(&d.backing.join("db/app.db"), SQL_SETUP);
    assert_eq!(setup, "wal\n0|0|0\n");
    let plain = plain_dir("interpose-iso-sqlite-");
    let plain_summary = run(Command::new(python())
        .arg(script("sqlite_wal.py"))
        .arg(plain.path().join("concurrent.db")));
    let before = fingerprint(&d.backing);

    let m = d.mount();
    let db = d.mnt.join("db/app.db");
    let orig = sqlite(&db, SQL_CHECK);
    assert!(orig.contains("\n1000|500500|"), "{orig}");
    let work = sqlite(&db, SQL_WORK);
    assert_eq!(work, "wal\n67108864\nok\n", "sqlite3 session on the mount");
    let after_work = sqlite(&db, SQL_CHECK);
    assert!(
        after_work.starts_with("wal\nok\n") && after_work.contains("|4000\n"),
        "{after_work}"
    );
    let concurrent = run(Command::new(python())
        .arg(script("sqlite_wal.py"))
        .arg(d.mnt.join("db/concurrent.db")));
    assert_eq!(
        concurrent, plain_summary,
        "sqlite_wal.py on the mount vs plain"
    );
    assert_untouched(&d.backing, &before, "after sqlite3 on the mount");
    m.stop();

    // Reopened after a remount: the same database, and it takes more transactions.
    let m = d.mount();
    assert_eq!(
        sqlite(&db, SQL_CHECK),
        after_work,
        "the database after remount"
    );
    assert_eq!(sqlite(&db, SQL_MORE), "ok\n");
    let final_check = sqlite(&db, SQL_CHECK);
    assert!(final_check.contains("|100000\n"), "{final_check}");
    assert_untouched(&d.backing, &before, "after remount and more sqlite3");

    let view = manifest(&d.mnt, NO_MTIME);
    commit(&d.store, None);
    assert_same(
        "sqlite after commit",
        "the view before commit",
        &view,
        "backing",
        &manifest(&d.backing, NO_MTIME),
    );
    m.stop();
    assert_eq!(
        sqlite(&d.backing.join("db/app.db"), SQL_CHECK),
        final_check,
        "the committed database read from the backing directory"
    );
    let c = sqlite(
        &d.backing.join("db/concurrent.db"),
        "PRAGMA integrity_check; SELECT count(*) FROM t;",
    );
    let rows: Value = serde_json::from_str(&plain_summary).unwrap();
    assert_eq!(c, format!("ok\n{}\n", rows["rows"]));
}

/// Four processes change trees of their own (files written in place, renamed, removed;
/// directories made, moved with their contents, removed), each checking every read,
/// listing and stat against an exact model, while the test commits the store again and
/// again, every other time all but the last 20 changes (tests/scripts/iso_commit_worker.py). Two trees are isolated, two are outside
/// `--isolate-path` and reach BACKING at once. Nothing a worker does may fail or see
/// anything else than it made; afterwards BACKING is what the mount shows, and the daemon
/// warned about nothing. `INTERPOSE_ISO_SEED=N` repeats the workers' operations.
#[test]
fn four_writers_see_exactly_their_own_changes_across_repeated_mounted_commits() {
    let seed = seed_from_env("INTERPOSE_ISO_SEED");
    eprintln!("mounted-commit stress: seed {seed} (INTERPOSE_ISO_SEED={seed} repeats it)");
    let d = dirs();
    for w in 1..=4 {
        fs::create_dir(d.backing.join(format!("w{w}"))).unwrap();
    }
    let m = d.mount_with(&["--isolate-path", "w1", "--isolate-path", "w3"]);
    let mut workers: Vec<std::process::Child> = (1..=4)
        .map(|w| {
            Command::new(python())
                .arg(script("iso_commit_worker.py"))
                .arg(&d.mnt)
                .arg(w.to_string())
                .arg(seed.to_string())
                .arg("1200")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut commits = 0;
    while workers.iter_mut().any(|c| c.try_wait().unwrap().is_none()) {
        // Every other commit leaves the last changes pending, so the view rebuilt after it
        // holds records too.
        let st = status(&d.store);
        let (last, done) = (num(&st, "last_seq"), num(&st, "committed_upto"));
        match commits % 2 {
            1 if last > done + 20 => commit(&d.store, Some(last - 20)),
            _ => commit(&d.store, None),
        };
        commits += 1;
    }
    let mut failed = Vec::new();
    for w in workers {
        let out = w.wait_with_output().unwrap();
        if !out.status.success() {
            failed.push(describe(&out));
        }
    }
    assert!(
        failed.is_empty(),
        "seed {seed}: workers failed during {commits} commits:\n{}",
        failed.join("\n")
    );
    assert!(
        commits >= 2,
        "only {commits} commits ran while the workers worked"
    );
    commit(&d.store, None);
    assert_same(
        &format!("seed {seed}: BACKING after the last commit"),
        "the mount",
        &committed_state(&d.mnt),
        "BACKING",
        &committed_state(&d.backing),
    );
    let err = m.stop();
    assert!(
        !err.contains("WARN") && !err.contains("ERROR"),
        "seed {seed}: the daemon warned:\n{err}"
    );
}

/// A number the kernel still holds for an object a mounted commit cannot carry (a file
/// removed outside the isolated paths, still held through an O_PATH descriptor, whose
/// contents are gone) stays that object's: the next object given its inode number by
/// BACKING gets another number. Given the same, the kernel, which held the two objects
/// under it (they differ in type), sent the old one's forget, which took the new one's
/// lookup, and the node went while in use: ESTALE (the four writers' test met it as a
/// failed mkdir, once in ten runs).
#[test]
fn numbers_the_kernel_holds_are_not_given_to_another_object_after_a_commit() {
    use rustix::fs::{AtFlags, Mode as FileMode, OFlags, StatxFlags};
    let d = dirs();
    // Its own ext4, which gives a freed inode number to the next object made.
    let fs_ = LoopFs::journaled(64);
    let backing = fs_.dir.join("backing");
    fs::create_dir_all(backing.join("pass")).unwrap();
    fs::create_dir_all(backing.join("iso")).unwrap();
    fs::write(backing.join("iso/kept"), b"k\n").unwrap();
    // Made before the mount: written through it, the file would be held (for passthrough)
    // until the kernel's release, a moment after close, and its number not free at once.
    fs::write(backing.join("pass/f"), b"gone\n").unwrap();
    let m = Mount::start(
        &backing,
        &d.mnt,
        &["--isolate", s(&d.store), "--isolate-path", "iso"],
    );
    let pass = d.mnt.join("pass");
    let held = rustix::fs::open(pass.join("f"), OFlags::PATH, FileMode::empty()).unwrap();
    let number = rustix::fs::fstat(&held).unwrap().st_ino;
    fs::remove_file(pass.join("f")).unwrap();
    // A change to commit that takes no inode (the commit would give it the number).
    fs::set_permissions(d.mnt.join("iso/kept"), fs::Permissions::from_mode(0o600)).unwrap();
    commit(&d.store, None);
    let reused = made_until_number(number, |i| {
        symlink("target", pass.join(format!("s{i}"))).unwrap();
        backing.join(format!("pass/s{i}"))
    });
    let link = pass.join(format!("s{reused}"));
    let new = rustix::fs::open(&link, OFlags::PATH | OFlags::NOFOLLOW, FileMode::empty()).unwrap();
    assert_ne!(
        rustix::fs::fstat(&new).unwrap().st_ino,
        number,
        "the symlink got the number the kernel still holds for the removed file"
    );
    // The old object's forget: it must not take the symlink's lookup.
    drop(held);
    for _ in 0..3 {
        let st = rustix::fs::statx(
            &new,
            "",
            AtFlags::EMPTY_PATH | AtFlags::STATX_FORCE_SYNC,
            StatxFlags::BASIC_STATS,
        )
        .unwrap_or_else(|e| panic!("statx of the symlink held open: {e}"));
        assert_eq!(u32::from(st.stx_mode) & libc::S_IFMT, libc::S_IFLNK);
    }
    assert_eq!(fs::read_link(&link).unwrap(), Path::new("target"));
    drop(new);
    let err = m.stop();
    assert!(
        !err.contains("WARN") && !err.contains("ERROR"),
        "the daemon warned:\n{err}"
    );
    drop(fs_);
}

/// A file the view changed, removed straight in BACKING, and a new file there that ext4
/// gives the removed one's inode number: the view shows the new file as it is, with a
/// number of its own, not the removed file's pending contents and mode under the new name
/// (the view took the same number for the same object when both were files). The commit
/// then stops at the first change to the removed file and says why, touching nothing.
#[test]
fn a_new_backing_file_with_a_removed_files_inode_number_is_not_taken_for_it() {
    use std::os::unix::fs::DirEntryExt;
    let d = dirs();
    // Its own ext4, which gives a freed inode number to the next object made.
    let fs_ = LoopFs::journaled(64);
    let backing = fs_.dir.join("backing");
    fs::create_dir_all(&backing).unwrap();
    fs::write(backing.join("old"), b"old\n").unwrap();
    fs::set_permissions(backing.join("old"), fs::Permissions::from_mode(0o600)).unwrap();
    let number = fs::metadata(backing.join("old")).unwrap().ino();
    let m = Mount::start(&backing, &d.mnt, &["--isolate", s(&d.store)]);
    fs::set_permissions(d.mnt.join("old"), fs::Permissions::from_mode(0o640)).unwrap();
    OpenOptions::new()
        .append(true)
        .open(d.mnt.join("old"))
        .unwrap()
        .write_all(b"changed in the view\n")
        .unwrap();
    fs::remove_file(backing.join("old")).unwrap();
    await_removed_files_closed(m.pid());
    let reused = made_until_number(number, |i| {
        let new = backing.join(format!("new{i}"));
        fs::write(&new, b"new\n").unwrap();
        new
    });
    let new = d.mnt.join(format!("new{reused}"));
    assert_eq!(
        read(&new),
        b"new\n",
        "the new file shows the removed one's contents"
    );
    let st = fs::metadata(&new).unwrap();
    assert_eq!(
        st.mode() & 0o7777,
        0o644,
        "the new file has the removed one's mode"
    );
    assert_eq!(st.len(), 4);
    // (A DirEntry keeps its directory open: only its number is kept.)
    let listed = fs::read_dir(&d.mnt)
        .unwrap()
        .map(|e| e.unwrap())
        .find(|e| e.path() == new)
        .map(|e| e.ino())
        .expect("the new file is listed");
    assert_eq!(listed, st.ino(), "the listing and stat disagree");

    // An unchanged file the kernel holds, removed in BACKING, and a new one given its
    // number: the held one keeps its own attributes.
    fs::write(backing.join("held"), b"ten bytes\n").unwrap();
    let number = fs::metadata(backing.join("held")).unwrap().ino();
    let held = rustix::fs::open(
        d.mnt.join("held"),
        rustix::fs::OFlags::PATH,
        rustix::fs::Mode::empty(),
    )
    .unwrap();
    fs::remove_file(backing.join("held")).unwrap();
    let reused = made_until_number(number, |i| {
        let new = backing.join(format!("big{i}"));
        fs::write(&new, [b'x'; 100]).unwrap();
        new
    });
    // Under its name, too.
    fs::rename(backing.join(format!("big{reused}")), backing.join("held")).unwrap();
    // (Past the kernel's attribute cache.)
    let now = rustix::fs::statx(
        &held,
        "",
        rustix::fs::AtFlags::EMPTY_PATH | rustix::fs::AtFlags::STATX_FORCE_SYNC,
        rustix::fs::StatxFlags::BASIC_STATS,
    )
    .unwrap();
    assert_eq!(
        now.stx_size, 10,
        "the removed file held open took the new one's size"
    );
    drop(held);
    let err = m.stop();
    assert!(
        !err.contains("WARN") && !err.contains("ERROR"),
        "the daemon warned:\n{err}"
    );
    let out = iso_fails("commit", &d.store, &[]);
    assert!(
        out.contains("changed behind the store's back"),
        "the commit's error does not say why: {out}"
    );
    assert_eq!(read(&backing.join(format!("new{reused}"))), b"new\n");
    drop(fs_);
}

/// A file with pending data replaced in BACKING, behind the store's back, by a FIFO or a
/// device: the commit refuses with what it found, before writing a byte. It used to open
/// the FIFO for writing and wait forever (with no reader), or write the data into the
/// device.
#[test]
fn a_commit_refuses_a_fifo_or_device_where_its_file_was() {
    for (kind, make) in [
        ("a FIFO", libc::S_IFIFO),
        ("a character device", libc::S_IFCHR),
    ] {
        let d = dirs();
        fs::write(d.backing.join("f"), b"original\n").unwrap();
        let m = d.mount();
        fs::write(d.mnt.join("f"), b"changed\n").unwrap();
        m.stop();
        let pending = num(&status(&d.store), "pending_changes");
        let f = d.backing.join("f");
        fs::remove_file(&f).unwrap();
        // (1:3 is /dev/null: nothing lost if it were written.)
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &f,
            rustix::fs::FileType::from_raw_mode(make),
            rustix::fs::Mode::from_raw_mode(0o666),
            rustix::fs::makedev(1, 3),
        )
        .unwrap();
        let mut commit = Command::new(bin())
            .args(["isolation", "commit"])
            .arg(&d.store)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let exit = wait_timeout(&mut commit, std::time::Duration::from_secs(30));
        if exit.is_none() {
            let _ = commit.kill();
            let _ = commit.wait();
            panic!("the commit hangs on {kind} where its file was");
        }
        let mut err = String::new();
        commit
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(
            !exit.unwrap().success()
                && err.contains(&format!("{kind} where the store has a regular file")),
            "commit with {kind} where its file was: {err}"
        );
        assert_eq!(
            fs::symlink_metadata(&f).unwrap().mode() & libc::S_IFMT,
            make,
            "{kind} replaced"
        );
        assert_eq!(num(&status(&d.store), "pending_changes"), pending);
    }
}

/// Blocks allocated past a file's end (fallocate with FALLOC_FL_KEEP_SIZE) stay allocated
/// in BACKING after a commit, as the view showed them: setting the file's size to what it
/// already was made ext4 free them.
#[test]
fn a_commit_keeps_blocks_allocated_past_the_end() {
    let d = dirs();
    fs::write(d.backing.join("f"), [b'x'; 100]).unwrap();
    let m = d.mount();
    let f = OpenOptions::new()
        .write(true)
        .open(d.mnt.join("f"))
        .unwrap();
    // SAFETY: a plain fallocate(2) on a descriptor this test owns.
    let r =
        unsafe { libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 64 << 10, 64 << 10) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    drop(f);
    let seen = fs::metadata(d.mnt.join("f")).unwrap();
    assert_eq!(seen.len(), 100);
    assert!(seen.blocks() >= 136, "the view: {} blocks", seen.blocks());
    iso("commit", &d.store, &[]);
    m.stop();
    let now = fs::metadata(d.backing.join("f")).unwrap();
    assert_eq!(
        (now.len(), now.blocks()),
        (100, seen.blocks()),
        "BACKING's size and blocks after the commit, against the view's"
    );
}

/// BACKING on overlayfs, which keeps an object's inode number when it copies it up to
/// its upper layer but gives it a new birth time: a directory copied up by a change
/// outside the isolated paths is still the view's directory, with the isolated names
/// made in it. (Birth times tell objects apart only where they are stable.)
#[test]
fn a_directory_copied_up_by_overlayfs_keeps_its_isolated_names() {
    let d = dirs();
    let (lower, upper, work) = (
        d.tmp.path().join("lower"),
        d.tmp.path().join("upper"),
        d.tmp.path().join("work"),
    );
    fs::create_dir_all(lower.join("d2")).unwrap();
    fs::write(lower.join("d2/old"), b"old\n").unwrap();
    fs::create_dir(&upper).unwrap();
    fs::create_dir(&work).unwrap();
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        s(&lower),
        s(&upper),
        s(&work)
    );
    run(Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &options])
        .arg(&d.backing));
    let _overlay = Undo("umount", "-l", d.backing.clone());
    // No cache: every path walk asks the daemon, as one does after the timeout.
    let m = d.mount_with(&["--isolate-path", "d2/iso*", "--cache-timeout", "0"]);
    let dir = d.mnt.join("d2");
    fs::write(dir.join("iso1"), b"v\n").unwrap();
    // Outside the isolated paths: made in BACKING, which copies d2 up.
    fs::write(dir.join("plain"), b"p\n").unwrap();
    assert!(upper.join("d2/plain").exists(), "d2 was not copied up");
    assert!(!d.backing.join("d2/iso1").exists());
    let mut names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["iso1", "old", "plain"], "d2 after the copy-up");
    assert_eq!(read(&dir.join("iso1")), b"v\n");
    m.stop();
}

/// Makes objects with `make(i)` (which returns the object's path in BACKING), i = 0, 1, …,
/// until the file system gives one inode `number` (a journaled ext4 gives a freed number
/// to the next object made); that one's `i`.
fn made_until_number(number: u64, mut make: impl FnMut(usize) -> PathBuf) -> usize {
    (0..200)
        .find(|&i| fs::symlink_metadata(make(i)).unwrap().ino() == number)
        .unwrap_or_else(|| panic!("BACKING gave inode {number} to none of 200 new objects"))
}

/// Waits until daemon `pid` holds no descriptor of a removed file: the kernel releases a
/// closed file (and the daemon closes what it opened for it) a moment after close(2)
/// returns, and until then the file system cannot give the file's inode number to
/// another object. (Files that never had a name, such as the unnamed file the daemon
/// tries xattrs on, `#INODE (deleted)`, are not removed files.)
fn await_removed_files_closed(pid: u32) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let unnamed = |name: &str| {
        name.strip_prefix('#')
            .and_then(|n| n.strip_suffix(" (deleted)"))
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
    };
    loop {
        let held: Vec<PathBuf> = fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
            .filter(|target| target.to_string_lossy().ends_with(" (deleted)"))
            .filter(|target| {
                !target
                    .file_name()
                    .is_some_and(|n| unnamed(&n.to_string_lossy()))
            })
            .collect();
        if held.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon still holds {held:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Another file system mounted inside BACKING (a bind mount here; Btrfs subvolumes are
/// the same) numbers its inodes itself: an object there and one of BACKING with the same
/// inode number are two objects, each read as itself whichever was looked up first.
#[test]
fn objects_of_two_file_systems_with_one_inode_number_are_two_objects() {
    let d = dirs();
    // Two fresh file systems, which give their first objects the same numbers.
    let (outer, inner) = (LoopFs::journaled(64), LoopFs::journaled(64));
    let backing = outer.dir.join("backing");
    fs::create_dir_all(backing.join("sub")).unwrap();
    fs::write(backing.join("x"), b"x data\n").unwrap();
    let other = inner.dir.join("backing");
    fs::create_dir_all(other.join("d")).unwrap();
    fs::write(other.join("d/y"), b"y data\n").unwrap();
    let (x, y) = (
        fs::metadata(backing.join("x")).unwrap().ino(),
        fs::metadata(other.join("d/y")).unwrap().ino(),
    );
    assert_eq!(x, y, "the two file systems numbered x and y apart");
    run(Command::new("mount")
        .arg("--bind")
        .arg(other.join("d"))
        .arg(backing.join("sub")));
    let _bind = Undo("umount", "-l", backing.join("sub"));
    // No cache: every path walk asks the daemon.
    let m = Mount::start(
        &backing,
        &d.mnt,
        &["--isolate", s(&d.store), "--cache-timeout", "0"],
    );
    let (mx, my) = (d.mnt.join("x"), d.mnt.join("sub/y"));
    for round in 0..3 {
        assert_eq!(read(&my), b"y data\n", "sub/y, round {round}");
        assert_eq!(read(&mx), b"x data\n", "x, round {round}");
    }
    assert_ne!(
        fs::metadata(&mx).unwrap().ino(),
        fs::metadata(&my).unwrap().ino()
    );
    m.stop();
}

/// A file renamed over outside the isolated paths while the kernel still holds it (an
/// O_PATH descriptor) is gone from BACKING: opened again through that descriptor, it
/// gives ESTALE, never the file now at its old name. (Its passthrough was registered by
/// that name.)
#[test]
fn a_file_renamed_over_outside_the_isolated_paths_is_not_reopened_by_its_old_name() {
    use rustix::fs::{Mode as FileMode, OFlags};
    let d = dirs();
    fs::create_dir(d.backing.join("pass")).unwrap();
    fs::create_dir(d.backing.join("iso")).unwrap();
    fs::write(d.backing.join("pass/f"), b"old\n").unwrap();
    fs::write(d.backing.join("pass/g"), b"the other file\n").unwrap();
    let m = d.mount_with(&["--isolate-path", "iso"]);
    let pass = d.mnt.join("pass");
    let held = rustix::fs::open(pass.join("f"), OFlags::PATH, FileMode::empty()).unwrap();
    fs::rename(pass.join("g"), pass.join("f")).unwrap();
    let again = format!("/proc/self/fd/{}", held.as_raw_fd());
    let got = File::open(&again).and_then(|mut f| {
        let mut v = Vec::new();
        f.read_to_end(&mut v).map(|_| v)
    });
    match got {
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ESTALE), "{e}"),
        Ok(v) => panic!(
            "the file renamed over read {:?}",
            String::from_utf8_lossy(&v)
        ),
    }
    assert_eq!(read(&pass.join("f")), b"the other file\n");
    drop(held);
    m.stop();
}

/// A listing gives each entry the inode number stat gives it, also an entry whose
/// number in BACKING is still held for a removed file the kernel has not forgotten (the
/// lookup gives the entry a number of its own; the listing used to give BACKING's). The
/// kernel asks for a directory's first entries with their attributes (READDIRPLUS, one
/// lookup each), and for the rest of a long one without (READDIR): 600 names and 40
/// such entries put some of them in the rest.
#[test]
fn listings_agree_with_stat_where_backing_reused_a_number_the_kernel_holds() {
    use rustix::fs::{Mode as FileMode, OFlags};
    use std::collections::HashSet;
    use std::os::unix::fs::DirEntryExt;
    let d = dirs();
    // Its own ext4, which gives freed inode numbers to the next objects made.
    let fs_ = LoopFs::journaled(64);
    let backing = fs_.dir.join("backing");
    fs::create_dir_all(backing.join("pass/long")).unwrap();
    fs::create_dir(backing.join("iso")).unwrap();
    for i in 0..600 {
        fs::write(backing.join(format!("pass/long/p{i}")), b"").unwrap();
    }
    let m = Mount::start(
        &backing,
        &d.mnt,
        &["--isolate", s(&d.store), "--isolate-path", "iso"],
    );
    let pass = d.mnt.join("pass");
    let mut held = Vec::new();
    let mut numbers = HashSet::new();
    // All made before any is removed: each its own inode number.
    let files: Vec<PathBuf> = (0..40).map(|i| pass.join(format!("long/f{i}"))).collect();
    for f in &files {
        fs::write(f, b"gone\n").unwrap();
        let fd = rustix::fs::open(f, OFlags::PATH, FileMode::empty()).unwrap();
        numbers.insert(rustix::fs::fstat(&fd).unwrap().st_ino);
        held.push(fd);
    }
    for f in &files {
        fs::remove_file(f).unwrap();
    }
    // Made in BACKING itself (outside the isolated paths, the view shows them): no nodes.
    let mut reused = 0;
    for i in 0..400 {
        let p = backing.join(format!("pass/long/s{i}"));
        symlink("target", &p).unwrap();
        if numbers.contains(&fs::symlink_metadata(&p).unwrap().ino()) {
            reused += 1;
        }
    }
    assert!(
        reused >= 20,
        "BACKING gave only {reused} of the 40 held numbers again"
    );
    // Listed whole first: a lookup in the directory makes the kernel's next read of it a
    // READDIRPLUS again.
    let listed: Vec<(PathBuf, u64)> = fs::read_dir(pass.join("long"))
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| (e.path(), e.ino()))
        .collect();
    assert_eq!(listed.len(), 1000);
    let mut differ = Vec::new();
    for (path, ino) in listed {
        let stat = fs::symlink_metadata(&path).unwrap().ino();
        if ino != stat || numbers.contains(&stat) {
            differ.push(format!("{path:?}: listed {ino}, stat {stat}"));
        }
    }
    assert!(
        differ.is_empty(),
        "{} entries: {:?}",
        differ.len(),
        &differ[..differ.len().min(5)]
    );
    drop(held);
    m.stop();
    drop(fs_);
}

/// SEEK_DATA and SEEK_HOLE answer from the file's size as it is, also where writes go
/// straight to BACKING (--write-through, outside --isolate-path) and the view records no
/// size of its own: they used to answer from the size at the open (ENXIO for a file
/// created empty and written since).
#[test]
fn seek_data_and_hole_see_writes_made_straight_to_backing() {
    let script = "import os, sys\n\
        fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR, 0o644)\n\
        os.write(fd, b'x' * 65536)\n\
        print(os.lseek(fd, 0, os.SEEK_DATA), os.lseek(fd, 0, os.SEEK_HOLE))\n";
    for args in [&["--write-through"][..], &["--isolate-path", "iso"][..]] {
        let d = dirs();
        let m = d.mount_with(args);
        let out = run(Command::new(python())
            .args(["-c", script])
            .arg(d.mnt.join("f")));
        assert_eq!(out.trim(), "0 65536", "{args:?}");
        m.stop();
    }
}

/// An allocating fallocate over the holes of a sparse backing file allocates them, as on
/// BACKING: the view shows them as data and the commit allocates them in BACKING. Holes
/// of the backing file counted as data, so nothing was recorded.
#[test]
fn fallocate_over_a_sparse_backing_file_allocates_its_holes() {
    let d = dirs();
    File::create(d.backing.join("img"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let m = d.mount();
    let script = "import os, sys\n\
        fd = os.open(sys.argv[1], os.O_RDWR)\n\
        os.posix_fallocate(fd, 0, 1 << 20)\n\
        print(os.lseek(fd, 0, os.SEEK_DATA), os.lseek(fd, 0, os.SEEK_HOLE))\n";
    let out = run(Command::new(python())
        .args(["-c", script])
        .arg(d.mnt.join("img")));
    assert_eq!(
        out.trim(),
        format!("0 {}", 1 << 20),
        "SEEK_DATA, SEEK_HOLE in the view"
    );
    assert_eq!(num(&status(&d.store), "pending_changes"), 1);
    commit(&d.store, None);
    let md = fs::metadata(d.backing.join("img")).unwrap();
    assert_eq!(
        (md.len(), md.blocks() * 512 >= 1 << 20),
        (1 << 20, true),
        "{md:?}"
    );
    m.stop();
}

/// Reads served by the daemon plan under the view's lock and read the journal after
/// letting go of it; a mounted discard cuts the journal in place meanwhile, and the next
/// record written takes the offsets it gave back. Readers of a file whose changes are
/// discarded again and again, while another file's are written, see that file's bytes as
/// they were before or after a discard, never the other file's, and no error.
#[test]
fn reads_racing_mounted_discards_never_see_another_file_s_bytes() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let d = dirs();
    fs::write(d.backing.join("a"), vec![b'0'; 1 << 16]).unwrap();
    let m = d.mount();
    // Changed in the view before the readers open it: they are served by the daemon, not
    // passed through (which would keep the writer out, ETXTBSY).
    let write_a = || {
        let a = OpenOptions::new()
            .write(true)
            .open(d.mnt.join("a"))
            .unwrap();
        a.write_all_at(&[b'a'; 1 << 16], 0).unwrap();
    };
    write_a();
    let stop = AtomicBool::new(false);
    let (mut reads, mut bad) = (0u64, Vec::new());
    std::thread::scope(|sc| {
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (mnt, stop) = (&d.mnt, &stop);
                sc.spawn(move || {
                    // O_DIRECT: every read reaches the daemon, none is the page cache's.
                    let f = OpenOptions::new()
                        .read(true)
                        .custom_flags(libc::O_DIRECT)
                        .open(mnt.join("a"))
                        .unwrap();
                    // O_DIRECT wants an aligned buffer: a 4096-aligned window of a larger one.
                    let mut raw = vec![0u8; (1 << 16) + 4096];
                    let pad = raw.as_ptr().align_offset(4096);
                    let buf = &mut raw[pad..pad + (1 << 16)];
                    let (mut n, mut bad) = (0u64, Vec::new());
                    while !stop.load(Ordering::Relaxed) && bad.len() < 5 {
                        match f.read_at(buf, 0) {
                            Ok(len) => {
                                let got = &buf[..len];
                                if len != 1 << 16 || got.iter().any(|&b| b != b'0' && b != b'a') {
                                    bad.push(format!(
                                        "{len} bytes, first {:?}",
                                        &got[..len.min(8)]
                                    ));
                                }
                            }
                            Err(e) => bad.push(e.to_string()),
                        }
                        n += 1;
                    }
                    (n, bad)
                })
            })
            .collect();
        for _ in 0..40 {
            // In place: the size stays what the readers expect.
            write_a();
            discard(&d.store, Some(1));
            fs::write(d.mnt.join("b"), vec![b'b'; 1 << 16]).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            let (n, b) = r.join().unwrap();
            reads += n;
            bad.extend(b);
        }
    });
    assert!(bad.is_empty(), "after {reads} reads: {bad:?}");
    assert!(reads > 100, "only {reads} reads raced the discards");
    m.stop();
}

/// A database that stays open (a writer and a reader holding a snapshot) while the store
/// is committed under it, whole and in part, six times.
#[test]
fn sqlite_stays_open_and_consistent_across_mounted_commits() {
    let d = dirs();
    fs::create_dir(d.backing.join("db")).unwrap();
    let m = d.mount();
    let out = run(Command::new(python())
        .arg(script("iso_sqlite_commit.py"))
        .arg(d.mnt.join("db/live.db"))
        .arg(&d.store)
        .arg(bin()));
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(
        (
            v["commits"].as_u64(),
            v["rows"].as_u64(),
            v["sum_round"].as_u64()
        ),
        (Some(6), Some(6 * 400 + 3), Some(400 * 15 + 9)),
        "{v}"
    );
    let view = manifest(&d.mnt, NO_MTIME);
    commit(&d.store, None);
    assert_same(
        "sqlite after the last commit",
        "the view",
        &view,
        "backing",
        &manifest(&d.backing, NO_MTIME),
    );
    m.stop();
    assert_eq!(
        sqlite(
            &d.backing.join("db/live.db"),
            "PRAGMA integrity_check; SELECT count(*), sum(round), sum(length(v)) FROM t;"
        ),
        format!("ok\n{}|{}|{}\n", v["rows"], v["sum_round"], v["sum_len"]),
        "the committed database, read from the backing directory"
    );
}

/// What a listing of `dir` shows, by python's scandir: per entry its name, the type and
/// inode number the listing gave, and lstat's mode, size, links and inode, sorted by name.
fn listing(dir: &Path) -> Vec<String> {
    let script = "import os, sys\n\
        for e in sorted(os.scandir(sys.argv[1]), key=lambda e: e.name):\n\
        \x20   st = os.lstat(e.path)\n\
        \x20   kind = 'd' if e.is_dir(follow_symlinks=False) else 'l' if e.is_symlink() else 'f'\n\
        \x20   print(e.name, kind, e.inode() == st.st_ino, oct(st.st_mode), st.st_size, st.st_nlink)\n";
    run(Command::new(python()).args(["-c", script, s(dir)]))
        .lines()
        .map(str::to_owned)
        .collect()
}

/// `view_nodes` of a mounted store once the kernel has dropped every unused dentry and the
/// daemon has handled the forgets that follow (they arrive asynchronously): the same count
/// twice in a row, 50 ms apart, within 20 s.
fn view_nodes_at_rest(store: &Path) -> u64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut last = u64::MAX;
    loop {
        drop_dentries();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let n = num(&status(store), "view_nodes");
        if n == last {
            return n;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "view_nodes still moving: {last} -> {n}"
        );
        last = n;
    }
}

/// `view_nodes` of a mounted store once it satisfies `settled` after the kernel dropped its
/// dentries (the daemon gets the forgets asynchronously, late on a loaded machine), or the
/// last count after 20 s, for the caller's assertion to report.
fn view_nodes_once(store: &Path, settled: impl Fn(u64) -> bool) -> u64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        drop_dentries();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let n = num(&status(store), "view_nodes");
        if settled(n) || std::time::Instant::now() >= deadline {
            return n;
        }
    }
}

#[test]
fn files_removed_in_the_view_leave_no_node_behind() {
    // What the view removed lives on in the journal only: its node goes once nothing holds
    // it (a program making and removing temporary files does not grow the daemon), and a
    // file removed while open stays readable until closed.
    let d = dirs();
    fs::write(d.backing.join("old"), b"backing").unwrap();
    let m = d.mount();
    let resting = view_nodes_at_rest(&d.store);
    let tmp = d.mnt.join("tmp");
    for i in 0..500 {
        fs::write(&tmp, format!("temporary {i}")).unwrap();
        fs::remove_file(&tmp).unwrap();
    }
    fs::create_dir(d.mnt.join("dir")).unwrap();
    fs::remove_dir(d.mnt.join("dir")).unwrap();
    fs::write(d.mnt.join("old"), b"changed").unwrap();
    fs::remove_file(d.mnt.join("old")).unwrap();
    let held = d.mnt.join("held");
    fs::write(&held, b"held data").unwrap();
    let open = File::open(&held).unwrap();
    fs::remove_file(&held).unwrap();
    assert_eq!(
        view_nodes_once(&d.store, |n| n == resting + 1),
        resting + 1,
        "nodes after 502 files made or changed and removed, one of them still open"
    );
    let mut buf = Vec::new();
    (&open).read_to_end(&mut buf).unwrap();
    assert_eq!(
        buf, b"held data",
        "the removed file, read through its descriptor"
    );
    drop(open);
    assert_eq!(
        view_nodes_once(&d.store, |n| n == resting),
        resting,
        "after closing it"
    );
    let pending = num(&status(&d.store), "pending_changes");
    assert!(
        pending > 1000,
        "{pending} changes pending: the removed ones are recorded"
    );
    m.stop();
    commit(&d.store, None);
    let names: Vec<_> = fs::read_dir(&d.backing)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(names.is_empty(), "BACKING after the commit: {names:?}");
}

#[test]
fn a_discard_brings_back_a_directory_a_process_still_sits_in() {
    // rm -rf of a/b/c while a process has its working directory there, then a discard:
    // the kernel marked the removed directory's inode dead, so the directory the discard
    // brings back must be a new inode for it, with its contents; the process's directory
    // stays the removed one.
    let d = dirs();
    fs::create_dir_all(d.backing.join("a/b/c")).unwrap();
    fs::write(d.backing.join("a/b/c/file"), b"kept\n").unwrap();
    let m = d.mount();
    let c = d.mnt.join("a/b/c");
    /// Ends the process however the test ends, or the mount could not be unmounted.
    struct Holder(std::process::Child);
    impl Drop for Holder {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let holder = Holder(
        Command::new("sleep")
            .arg("60")
            .current_dir(&c)
            .spawn()
            .unwrap(),
    );
    fs::remove_dir_all(&c).unwrap();
    assert!(!c.exists());
    iso("discard", &d.store, &[]);
    let names: Vec<_> = fs::read_dir(&c)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["file"], "the directory brought back, listed");
    assert_eq!(read(&c.join("file")), b"kept\n");
    fs::write(c.join("new"), b"n").unwrap();
    let cwd = fs::read_link(format!("/proc/{}/cwd", holder.0.id())).unwrap();
    assert!(
        cwd.to_string_lossy().ends_with("(deleted)"),
        "the holder's directory: {cwd:?}"
    );
    drop(holder);
    m.stop();
}

#[test]
fn a_write_through_a_removed_name_reaches_the_other_hard_link_at_commit() {
    // a and sub/b are one file in BACKING. The view removes a while a descriptor of it is
    // open and has not met sub/b yet; writes and a chmod through the descriptor must be
    // recorded under sub/b (the file's remaining name), not kept in the view alone: after
    // a remount and after a commit, sub/b has them.
    let d = dirs();
    fs::write(d.backing.join("a"), b"hello world\n").unwrap();
    fs::create_dir(d.backing.join("sub")).unwrap();
    fs::hard_link(d.backing.join("a"), d.backing.join("sub/b")).unwrap();
    let mut m = d.mount();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(d.mnt.join("a"))
        .unwrap();
    fs::remove_file(d.mnt.join("a")).unwrap();
    f.write_all_at(b"XY", 0).unwrap();
    f.set_permissions(fs::Permissions::from_mode(0o600))
        .unwrap();
    drop(f);
    let b = d.mnt.join("sub/b");
    assert_eq!(read(&b), b"XYllo world\n", "through the mount");
    m.stop();
    m = d.mount();
    assert_eq!(read(&b), b"XYllo world\n", "after a remount");
    assert_eq!(mode_of(&b) & 0o7777, 0o600, "after a remount");
    m.stop();
    commit(&d.store, None);
    assert_eq!(
        read(&d.backing.join("sub/b")),
        b"XYllo world\n",
        "after the commit"
    );
    assert_eq!(mode_of(&d.backing.join("sub/b")) & 0o7777, 0o600);
    assert!(!d.backing.join("a").exists());
}

#[test]
fn directories_the_kernel_forgot_are_dropped_unless_something_below_is_held() {
    // 3,000 backing directories walked once: once the kernel forgets them the daemon
    // lets them go (in sweeps, so fewer than a sweep's worth may stay), except those on
    // the way to what the view changed or the kernel still holds.
    let d = dirs();
    for i in 0..30 {
        for j in 0..100 {
            let dir = d.backing.join(format!("t{i:02}/d{j:03}"));
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("f"), format!("{i} {j}")).unwrap();
        }
    }
    let m = d.mount();
    let resting = view_nodes_at_rest(&d.store);
    let changed = d.mnt.join("t07/d042/f");
    fs::write(&changed, b"changed").unwrap();
    let held = File::open(d.mnt.join("t29/d099/f")).unwrap();
    let walk = || {
        run(Command::new("find").arg(&d.mnt).args(["-type", "f"]))
            .lines()
            .count()
    };
    for round in 0..3 {
        assert_eq!(walk(), 3000, "round {round}: files found");
        let after = view_nodes_once(&d.store, |n| n < resting + 256 + 10);
        assert!(
            after < resting + 256 + 10,
            "round {round}: {after} nodes after the kernel forgot 3,030 directories (from {resting})"
        );
        assert_eq!(read(&changed), b"changed", "round {round}");
        let mut buf = String::new();
        (&held).read_to_string(&mut buf).unwrap();
        assert_eq!(buf, "29 99", "round {round}: the file held open");
        (&held).seek(std::io::SeekFrom::Start(0)).unwrap();
    }
    drop(held);
    m.stop();
    commit(&d.store, None);
    assert_eq!(read(&d.backing.join("t07/d042/f")), b"changed");
}

#[test]
fn listings_carry_the_views_attributes() {
    // Listings of an isolated mount come with attributes (READDIRPLUS), each entry sent
    // counting as a lookup. Checked: the attributes are the view's (changed, created,
    // removed and untouched entries) and agree with lstat, inode numbers included; a
    // directory of 3,000 entries, which takes many replies, lists completely; once the
    // kernel has dropped its dentries, the daemon holds as many nodes as before (`status`'s
    // view_nodes): every entry sent was one lookup, later forgotten, and entries that did
    // not fit in a reply were not counted; all of it four times over; a name removed after
    // opendir is listed but resolves to nothing.
    let d = dirs();
    let dir = d.backing.join("d");
    fs::create_dir_all(dir.join("sub")).unwrap();
    fs::write(dir.join("a"), b"hello").unwrap();
    fs::write(dir.join("b"), b"short").unwrap();
    fs::write(dir.join("gone"), b"x").unwrap();
    symlink("a", dir.join("link")).unwrap();
    let many = d.backing.join("many");
    fs::create_dir(&many).unwrap();
    for i in 0..3000 {
        fs::write(many.join(format!("file-{i:05}")), vec![b'x'; i % 7]).unwrap();
    }
    let before = fingerprint(&d.backing);

    let m = d.mount();
    let md = d.mnt.join("d");
    fs::write(md.join("b"), vec![b'b'; 9000]).unwrap();
    fs::set_permissions(md.join("a"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::remove_file(md.join("gone")).unwrap();
    fs::write(md.join("new"), b"new").unwrap();
    fs::set_permissions(md.join("new"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::remove_file(d.mnt.join("many/file-00100")).unwrap();
    fs::write(d.mnt.join("many/file-00200"), b"changed").unwrap();

    let expected = [
        "a f True 0o100600 5 1",
        "b f True 0o100644 9000 1",
        "link l True 0o120777 1 1",
        "new f True 0o100640 3 1",
        "sub d True 0o40755 4096 2",
    ];
    let mut many_expected: Vec<String> = (0..3000)
        .filter(|&i| i != 100)
        .map(|i| {
            let size = if i == 200 { 7 } else { i % 7 };
            format!("file-{i:05} f True 0o100644 {size} 1")
        })
        .collect();
    many_expected.sort();
    let nodes = || num(&status(&d.store), "view_nodes");
    let resting = view_nodes_at_rest(&d.store);
    for round in 0..4 {
        // No other test drops the kernel's dentries (and so the view's nodes) meanwhile.
        let kept = dentries_kept();
        assert_eq!(listing(&md), expected, "round {round}");
        assert_eq!(listing(&d.mnt.join("many")), many_expected, "round {round}");
        let listed = nodes();
        drop(kept);
        assert!(
            listed >= resting + 3000,
            "round {round}: {listed} nodes after listing 3,000 entries"
        );
        // The kernel forgets what it looked up, the listings' entries with it: every entry
        // sent was counted once, and entries that did not fit in a reply were not.
        let after = view_nodes_once(&d.store, |n| n == resting + 1);
        // `d/sub` stays once looked up: a forgotten directory waits for a sweep, which
        // one alone does not start (see the test of forgotten directories).
        assert_eq!(
            after,
            resting + 1,
            "round {round}: nodes in memory after the kernel dropped its dentries (from {listed})"
        );
    }
    let du = run(Command::new("du")
        .args(["-s", "--apparent-size", "-b"])
        .arg(&md));
    assert_eq!(
        du.split('\t').next(),
        Some((5 + 9000 + 1 + 3 + 4096 + 4096).to_string().as_str()),
        "du: {du}"
    );

    // A name removed after opendir: the listing taken at opendir still has it, sent
    // without attributes; nothing resolves it.
    let script = "import os, sys\n\
        fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)\n\
        os.unlink(os.path.join(sys.argv[1], 'new'))\n\
        names = sorted(os.listdir(fd))\n\
        print(' '.join(names), os.path.lexists(os.path.join(sys.argv[1], 'new')))\n";
    assert_eq!(
        run(Command::new(python()).args(["-c", script, s(&md)])).trim(),
        "a b link new sub False"
    );
    assert_eq!(
        listing(&md),
        expected
            .iter()
            .filter(|l| !l.starts_with("new "))
            .cloned()
            .collect::<Vec<_>>()
    );
    m.stop();
    assert_untouched(&d.backing, &before, "after listing an isolated mount");
}

#[test]
fn names_renamed_after_opendir_are_listed_without_their_nodes() {
    // The listing is taken at opendir; an entry whose name has gone by the time it is
    // read is sent without a node. fuser 0.18 sent the node of the attributes instead
    // (here: the old object, with all-zero attributes), and the kernel linked the old
    // name to it again: the directory's dentry moved back to its old name, the file took
    // a size of 0 (believed until the next clock tick, since the attributes came with no
    // lifetime), and the kernel counted a lookup the daemon never made. Found by the
    // isolated stress test while caches were dropped: a read of a complete file returned
    // nothing, and path walks failed with ESTALE. Only the directory is sure to show it.
    let d = dirs();
    let m = d.mount();
    let dir = d.mnt.join("d");
    fs::create_dir_all(dir.join("x")).unwrap();
    fs::write(dir.join("f"), b"hello").unwrap();
    let script = "import os, sys\n\
        d = sys.argv[1]\n\
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)\n\
        os.rename(os.path.join(d, 'x'), os.path.join(d, 'y'))\n\
        os.rename(os.path.join(d, 'f'), os.path.join(d, 'g'))\n\
        held = os.open(os.path.join(d, 'y'), os.O_PATH)\n\
        print(' '.join(sorted(os.listdir(fd))))\n\
        print(os.path.basename(os.readlink('/proc/self/fd/%d' % held)))\n\
        print(os.stat(os.path.join(d, 'g')).st_size)\n\
        print(open(os.path.join(d, 'g'), 'rb').read().decode())\n";
    let out = run(Command::new(python()).args(["-c", script, s(&dir)]));
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["f x", "y", "5", "hello"],
        "listing at opendir, the held directory's name, the file's size and contents"
    );
    assert_eq!(
        listing(&dir),
        ["g f True 0o100644 5 1", "y d True 0o40755 4096 2"]
    );
    let daemon_err = m.stop();
    assert!(!daemon_err.contains("WARN"), "{daemon_err}");
}

/// `os.rename(FROM, TO)` through python: "ok" or the errno's name.
fn py_rename(from: &Path, to: &Path) -> String {
    let script = "import errno, os, sys\n\
        try:\n\
        \x20   os.rename(sys.argv[1], sys.argv[2]); print('ok')\n\
        except OSError as e:\n\
        \x20   print(errno.errorcode[e.errno])\n";
    run(Command::new(python()).args(["-c", script, s(from), s(to)]))
        .trim()
        .to_owned()
}

#[test]
fn a_directory_whose_isolated_names_changed_is_removed_and_moved_in_isolation() {
    // d, top and outer are outside the isolated paths and look empty (or hold only
    // BACKING's names), but the journal holds changes to isolated names in them: removing
    // or moving them in BACKING at once would leave records naming a directory that is
    // gone, and the store could be neither mounted again nor committed. So the rmdir and
    // the renames are isolated too: BACKING keeps the directories until the commit, the
    // new names stay isolated until then, and a remount shows the same view.
    let d = dirs();
    fs::create_dir_all(d.backing.join("top/iso1")).unwrap();
    fs::create_dir_all(d.backing.join("top/keep")).unwrap();
    fs::create_dir_all(d.backing.join("outer/inner")).unwrap();
    fs::write(d.backing.join("outer/inner/iso_x"), b"x").unwrap();
    let args = ["--isolate-path", "**/iso*"];
    let mut m = d.mount_with(&args);
    let md = d.mnt.join("d");
    fs::create_dir(&md).unwrap();
    assert!(
        d.backing.join("d").is_dir(),
        "mkdir d reaches BACKING at once"
    );
    fs::write(md.join("iso1"), b"hi").unwrap();
    fs::remove_file(md.join("iso1")).unwrap();
    fs::remove_dir(&md).unwrap();
    fs::remove_dir(d.mnt.join("top/iso1")).unwrap();
    assert_eq!(py_rename(&d.mnt.join("top"), &d.mnt.join("top2")), "ok");
    // Changed names deeper down count too.
    fs::remove_file(d.mnt.join("outer/inner/iso_x")).unwrap();
    assert_eq!(py_rename(&d.mnt.join("outer"), &d.mnt.join("outer2")), "ok");
    // Below a name a pending change made, changes are isolated as well.
    fs::write(d.mnt.join("top2/keep/f"), b"f").unwrap();
    let in_backing = ["d", "top/keep", "outer/inner/iso_x"];
    for p in in_backing {
        assert!(
            d.backing.join(p).exists(),
            "{p} left BACKING before a commit"
        );
    }
    assert!(!d.backing.join("top2").exists() && !d.backing.join("top/keep/f").exists());
    let view = |mnt: &Path| {
        (
            mnt.join("d").exists(),
            mnt.join("top").exists(),
            names(&mnt.join("top2")),
            names(&mnt.join("top2/keep")),
            names(&mnt.join("outer2/inner")),
        )
    };
    let before = view(&d.mnt);
    assert_eq!(
        before,
        (false, false, vec!["keep".into()], vec!["f".into()], vec![])
    );
    m.stop();
    m = d.mount_with(&args);
    assert_eq!(view(&d.mnt), before, "after a remount");
    fs::write(d.mnt.join("top2/keep/g"), b"g").unwrap();
    assert!(
        !d.backing.join("top/keep/g").exists(),
        "isolated after a remount too"
    );
    m.stop();
    commit(&d.store, None);
    assert!(!d.backing.join("d").exists() && !d.backing.join("top").exists());
    assert_eq!(read(&d.backing.join("top2/keep/f")), b"f");
    assert!(!d.backing.join("outer2/inner/iso_x").exists());
    // Committed, the names are BACKING's again: changes to them go there at once.
    m = d.mount_with(&args);
    fs::write(d.mnt.join("top2/keep/h"), b"h").unwrap();
    assert_eq!(read(&d.backing.join("top2/keep/h")), b"h");
    assert_eq!(
        py_rename(&d.mnt.join("outer2"), &d.mnt.join("outer3")),
        "ok"
    );
    assert!(d.backing.join("outer3/inner").is_dir());
    m.stop();
}

#[test]
fn a_file_only_looked_up_when_its_name_went_is_dropped_at_a_commit_without_a_warning() {
    // Outside the isolated paths an unlink reaches BACKING at once; the kernel forgets the
    // file lazily, so at a mounted commit the view may still hold a file without a name
    // that nobody has open (here an O_PATH descriptor holds it, which opens nothing).
    // There is nothing to carry: no warning. A file really open keeps its data (below).
    let d = dirs();
    fs::create_dir_all(d.backing.join("iso")).unwrap();
    fs::create_dir_all(d.backing.join("plain")).unwrap();
    fs::write(d.backing.join("plain/held"), b"held\n").unwrap();
    fs::write(d.backing.join("plain/open"), b"open\n").unwrap();
    let m = d.mount_with(&["--isolate-path", "iso"]);
    let held = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(d.mnt.join("plain/held"))
        .unwrap();
    let mut open = File::open(d.mnt.join("plain/open")).unwrap();
    fs::remove_file(d.mnt.join("plain/held")).unwrap();
    fs::remove_file(d.mnt.join("plain/open")).unwrap();
    fs::write(d.mnt.join("iso/new"), b"new\n").unwrap();
    commit(&d.store, None);
    let mut got = String::new();
    open.read_to_string(&mut got).unwrap();
    assert_eq!(
        got, "open\n",
        "an open file without a name, after the commit"
    );
    drop((held, open));
    assert_eq!(read_str(&d.backing.join("iso/new")), "new\n");
    let err = m.stop();
    assert!(
        !err.contains("WARN"),
        "the daemon warned about a file nobody had open:\n{err}"
    );
}

#[test]
fn isolate_path_keeps_only_matching_subtrees_and_passes_the_rest_through() {
    // --isolate-path iso: changes under iso/ go to the store, every other change goes to
    // BACKING at once and is not recorded; a
    // large non-isolated tree whose nodes the daemon holds is removed (rm -rf) and made
    // again under the same names; commit then brings iso/ to BACKING.
    let d = dirs();
    fs::create_dir_all(d.backing.join("iso")).unwrap();
    fs::create_dir_all(d.backing.join("plain/tree/sub")).unwrap();
    fs::write(d.backing.join("iso/a"), b"one\n").unwrap();
    fs::write(d.backing.join("plain/b"), b"two\n").unwrap();
    fs::write(d.backing.join("plain/x"), b"x\n").unwrap();
    for i in 0..500 {
        fs::write(d.backing.join(format!("plain/tree/f{i}")), format!("{i}\n")).unwrap();
        fs::write(d.backing.join(format!("plain/tree/sub/g{i}")), b"g").unwrap();
    }
    let iso_before = fingerprint(&d.backing.join("iso"));

    let m = d.mount_with(&["--isolate-path", "iso"]);
    let (mi, mp) = (d.mnt.join("iso"), d.mnt.join("plain"));
    fs::write(mi.join("a"), b"changed\n").unwrap();
    fs::write(mi.join("new"), b"new\n").unwrap();
    fs::write(mp.join("b"), b"changed\n").unwrap();
    fs::write(mp.join("new2"), b"new2\n").unwrap();
    fs::rename(mp.join("x"), mp.join("y")).unwrap();
    assert_eq!(listing(&mp.join("tree")).len(), 501); // the daemon now holds its nodes
    run(Command::new("rm").arg("-rf").arg(mp.join("tree")));

    // Outside iso/: in BACKING at once.
    assert_eq!(read(&d.backing.join("plain/b")), b"changed\n");
    assert_eq!(read(&d.backing.join("plain/new2")), b"new2\n");
    assert_eq!(read(&d.backing.join("plain/y")), b"x\n");
    assert!(!d.backing.join("plain/x").exists() && !d.backing.join("plain/tree").exists());
    // The same names again, through the mount: they resolve to the new objects.
    fs::create_dir_all(mp.join("tree/sub")).unwrap();
    for i in 0..500 {
        fs::write(mp.join(format!("tree/f{i}")), format!("again {i}\n")).unwrap();
    }
    assert_eq!(read_str(&mp.join("tree/f7")), "again 7\n");
    assert_eq!(read_str(&d.backing.join("plain/tree/f7")), "again 7\n");
    assert_eq!(listing(&mp.join("tree")).len(), 501);
    assert_eq!(listing(&mp.join("tree/sub")), Vec::<String>::new());
    // Inside iso/: only in the view and the store.
    assert_untouched(
        &d.backing.join("iso"),
        &iso_before,
        "under the isolated path",
    );
    assert_eq!(read(&mi.join("a")), b"changed\n");
    assert_eq!(read(&mi.join("new")), b"new\n");
    assert_eq!(
        log_text(&d.store, 0),
        [
            "1 data /iso/a (size 0, 0 bytes of blocks)",
            "2 data /iso/a (size 8, 4096 bytes of blocks)",
            "3 create /iso/new",
            "4 data /iso/new (size 4, 4096 bytes of blocks)",
        ]
    );
    commit(&d.store, None);
    assert_eq!(read(&d.backing.join("iso/a")), b"changed\n");
    assert_eq!(read(&d.backing.join("iso/new")), b"new\n");
    m.stop();
}

/// The names in a directory, sorted.
/// Names and contents of a tree (directories as "dir", symlinks by target), with link counts.
fn contents(root: &Path) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    for e in walkdir(root) {
        let rel = e.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        let md = fs::symlink_metadata(&e).unwrap();
        let what = if md.is_dir() {
            "dir".to_owned()
        } else if md.is_symlink() {
            format!("-> {}", fs::read_link(&e).unwrap().display())
        } else {
            format!("{:?} nlink={}", read_str(&e), md.nlink())
        };
        out.insert(rel, what);
    }
    out
}

fn walkdir(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            out.extend(walkdir(&p));
        }
        out.push(p);
    }
    out
}

#[test]
fn renames_across_the_border_are_isolated_and_keep_the_outside_name_isolated() {
    // --isolate-path '*.conf': sed -i writes a temporary file next to app.conf (outside the
    // isolated paths, so in BACKING at once) and renames it over app.conf. The rename is
    // isolated: BACKING's app.conf is untouched and the temporary file stays in BACKING
    // until the commit renames it over app.conf; a discard brings it back. The same for a
    // program's atomic replace, a rename out of the isolated paths (whose new name then
    // takes changes in isolation) and a hard link across the border, also after a
    // remount; committed, the names pass through again.
    let d = dirs();
    fs::create_dir_all(d.backing.join("plain")).unwrap();
    fs::write(d.backing.join("app.conf"), b"a=1\n").unwrap();
    fs::write(d.backing.join("old.conf"), b"old\n").unwrap();
    fs::write(d.backing.join("plain/shared"), b"shared\n").unwrap();
    let args = ["--isolate-path", "*.conf"];
    let mut m = d.mount_with(&args);
    let sed = || {
        run(Command::new("sed")
            .arg("-i")
            .arg("s/1/2/")
            .arg(d.mnt.join("app.conf")))
    };
    let sed_temp = || -> Vec<String> {
        let names = names(&d.backing).into_iter();
        names.filter(|n| n.starts_with("sed")).collect()
    };
    sed();
    assert_eq!(read(&d.mnt.join("app.conf")), b"a=2\n");
    assert_eq!(read(&d.backing.join("app.conf")), b"a=1\n");
    let temp = sed_temp();
    assert_eq!(temp.len(), 1, "sed's temporary file in BACKING: {temp:?}");
    assert_eq!(names(&d.mnt), ["app.conf", "old.conf", "plain"]);
    discard(&d.store, None);
    assert_eq!(read(&d.mnt.join("app.conf")), b"a=1\n");
    assert_eq!(
        read(&d.mnt.join(&temp[0])),
        b"a=2\n",
        "discarded, sed's file is back"
    );
    fs::remove_file(d.mnt.join(&temp[0])).unwrap();
    assert!(sed_temp().is_empty(), "outside the isolated paths again");

    let before = contents(&d.backing);
    sed();
    let temp = sed_temp();
    let script = r#"
import os
with open('plain/new.tmp', 'w') as f:
    f.write('new\n'); f.flush(); os.fsync(f.fileno())
os.replace('plain/new.tmp', 'new.conf')
os.rename('old.conf', 'plain/old.bak')
open('plain/old.bak', 'a').write('more\n')
os.link('plain/shared', 'shared.conf')
open('plain/shared', 'a').write('through the outside name\n')
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .current_dir(&d.mnt)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let view = contents(&d.mnt);
    let expect = [
        ("app.conf", "\"a=2\\n\" nlink=1"),
        ("new.conf", "\"new\\n\" nlink=1"),
        ("plain", "dir"),
        ("plain/old.bak", "\"old\\nmore\\n\" nlink=1"),
        (
            "plain/shared",
            "\"shared\\nthrough the outside name\\n\" nlink=2",
        ),
        (
            "shared.conf",
            "\"shared\\nthrough the outside name\\n\" nlink=2",
        ),
    ];
    let expect: std::collections::BTreeMap<String, String> = expect
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(view, expect);
    // BACKING: only the temporary files, made outside the isolated paths, are new.
    let mut now = contents(&d.backing);
    assert!(now.remove(&temp[0]).is_some() && now.remove("plain/new.tmp").is_some());
    assert_eq!(now, before, "BACKING changed before a commit");
    m.stop();
    m = d.mount_with(&args);
    assert_eq!(contents(&d.mnt), view, "after a remount");
    let last = log_text(&d.store, 0).len() as u64;
    fs::write(d.mnt.join("plain/old.bak"), b"after the remount\n").unwrap();
    assert!(!d.backing.join("plain/old.bak").exists());
    discard(&d.store, Some(last));
    assert_eq!(contents(&d.mnt), view, "after discarding the write");
    m.stop();
    commit(&d.store, None);
    assert_eq!(contents(&d.backing), view, "BACKING after the commit");
    m = d.mount_with(&args);
    fs::write(d.mnt.join("plain/old.bak"), b"passes through\n").unwrap();
    assert_eq!(read(&d.backing.join("plain/old.bak")), b"passes through\n");
    m.stop();
}

#[test]
fn a_hard_link_is_recorded_under_the_name_the_view_met_first_and_its_directory_follows() {
    // --isolate-path iso: out/a/f and out/f are one file outside the isolated paths. A
    // link of out/f into iso/ reaches the daemon by inode, not by the name the program
    // used: the record names the file as the view first met it, out/a/f. Renaming out/a,
    // which no program named in an isolated change, is then recorded too (BACKING must
    // keep out/a/f until the link is committed), and the commit gives what the mount showed.
    let d = dirs();
    fs::create_dir(d.backing.join("iso")).unwrap();
    fs::create_dir(d.backing.join("out")).unwrap();
    let m = d.mount_with(&["--isolate-path", "iso"]);
    fs::create_dir(d.mnt.join("out/a")).unwrap();
    fs::write(d.mnt.join("out/a/f"), b"one\n").unwrap();
    // Held open, so that the kernel keeps the node and the view its first name.
    let held = File::open(d.mnt.join("out/a/f")).unwrap();
    fs::hard_link(d.mnt.join("out/a/f"), d.mnt.join("out/f")).unwrap();
    assert!(
        log_json(&d.store, 0).is_empty(),
        "outside: nothing recorded"
    );
    assert_eq!(fs::metadata(d.backing.join("out/f")).unwrap().nlink(), 2);
    fs::hard_link(d.mnt.join("out/f"), d.mnt.join("iso/f")).unwrap();
    assert_eq!(log_json(&d.store, 0), ["1 link out/a/f -> iso/f"]);
    fs::rename(d.mnt.join("out/a"), d.mnt.join("out/b")).unwrap();
    assert_eq!(
        log_json(&d.store, 0),
        ["1 link out/a/f -> iso/f", "2 rename out/a -> out/b"]
    );
    assert!(d.backing.join("out/a/f").exists(), "BACKING keeps out/a/f");
    let view = contents(&d.mnt);
    assert_eq!(view["iso/f"], "\"one\\n\" nlink=3");
    drop(held);
    m.stop();
    commit(&d.store, None);
    assert_eq!(contents(&d.backing), view, "BACKING after the commit");
}

#[test]
fn a_directory_outside_the_isolated_paths_keeps_its_times_across_a_remount_and_a_commit() {
    // e is outside the isolated paths: it shows BACKING's times, also once a pending
    // rename put a name into it and a utime set its mtime in BACKING. Renamed to f (the
    // rename is isolated: e holds a pending change), f shows that mtime; a remount, which
    // replays the records, and a commit must not stamp e with the records' times.
    let d = dirs();
    fs::create_dir_all(d.backing.join("iso")).unwrap();
    fs::create_dir_all(d.backing.join("e")).unwrap();
    fs::write(d.backing.join("iso/a"), b"a").unwrap();
    let args = ["--isolate-path", "iso"];
    let mut m = d.mount_with(&args);
    fs::rename(d.mnt.join("iso/a"), d.mnt.join("e/a")).unwrap();
    let set = std::time::UNIX_EPOCH + std::time::Duration::new(1_500_000_000, 123_456_789);
    File::open(d.mnt.join("e"))
        .unwrap()
        .set_modified(set)
        .unwrap();
    fs::rename(d.mnt.join("e"), d.mnt.join("f")).unwrap();
    let mtime = |p: &Path| fs::metadata(p).unwrap().modified().unwrap();
    assert_eq!(mtime(&d.mnt.join("f")), set);
    m.stop();
    m = d.mount_with(&args);
    assert_eq!(mtime(&d.mnt.join("f")), set, "after a remount");
    m.stop();
    commit(&d.store, None);
    assert_eq!(mtime(&d.backing.join("f")), set, "after the commit");
    assert_eq!(read(&d.backing.join("f/a")), b"a");
}

/// With `--isolate-path`, a file open for writing outside the isolated paths is written
/// through passthrough, straight to BACKING. Renamed or linked into the isolated paths
/// while still open, its writes would go on reaching BACKING unrecorded (and an open of
/// its new name failed with EIO): the rename or link waits for the writer to close, then
/// fails with ETXTBSY; once it is closed, it is made (and recorded).
#[test]
fn a_file_open_for_writing_outside_the_isolated_paths_enters_them_once_closed() {
    let d = dirs();
    fs::create_dir_all(d.backing.join("d1")).unwrap();
    fs::create_dir(d.backing.join("iso")).unwrap();
    fs::write(d.backing.join("d1/a"), b"outside\n").unwrap();
    let m = d.mount_with(&["--isolate-path", "iso"]);
    let writer = OpenOptions::new()
        .write(true)
        .open(d.mnt.join("d1/a"))
        .unwrap();
    let busy = |what: &str, r: std::io::Result<()>| {
        assert_eq!(
            r.map_err(|e| e.raw_os_error()),
            Err(Some(libc::ETXTBSY)),
            "{what} while a passthrough writer is open"
        )
    };
    busy(
        "rename",
        fs::rename(d.mnt.join("d1/a"), d.mnt.join("iso/a")),
    );
    busy(
        "link",
        fs::hard_link(d.mnt.join("d1/a"), d.mnt.join("iso/a")),
    );
    busy(
        "rename of its directory",
        fs::rename(d.mnt.join("d1"), d.mnt.join("iso/d1")),
    );
    // Still outside: its writes are BACKING's, as before.
    writer.write_all_at(b"OUT", 0).unwrap();
    assert_eq!(read(&d.backing.join("d1/a")), b"OUTside\n");
    drop(writer);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    // The kernel releases a closed file a moment after close(2) returns.
    while let Err(e) = fs::rename(d.mnt.join("d1/a"), d.mnt.join("iso/a")) {
        assert_eq!(e.raw_os_error(), Some(libc::ETXTBSY), "rename after close");
        assert!(
            std::time::Instant::now() < deadline,
            "the rename stayed refused after close"
        );
    }
    fs::write(d.mnt.join("iso/a"), b"inside\n").unwrap();
    assert_eq!(read(&d.mnt.join("iso/a")), b"inside\n");
    assert_eq!(
        read(&d.backing.join("d1/a")),
        b"OUTside\n",
        "BACKING untouched"
    );
    assert!(!d.backing.join("iso/a").exists());
    m.stop();
}

/// With `--isolate-path`, a file open for writing outside the isolated paths is written
/// through passthrough, straight to its backing file, and can enter the isolated paths
/// while open in ways no rename of its own makes wait: a hard link to it met there, or a
/// directory above it renamed in isolation (a pending change below it entangles the
/// rename). Its writes go on reaching the backing file, so its fallocate and ftruncate go
/// there too (they were recorded: the commit then punched away what the program wrote
/// after them), its other opens share that file (they failed with EIO), and its size is
/// that file's. The same holds for such a file unlinked while open, whose ftruncate waited
/// two seconds for its own descriptor to close and failed with ETXTBSY.
#[test]
fn a_file_written_through_passthrough_keeps_its_data_there_when_it_enters_the_isolated_paths() {
    let d = dirs();
    for dir in ["out", "iso", "dA"] {
        fs::create_dir(d.backing.join(dir)).unwrap();
    }
    fs::write(d.backing.join("out/f"), vec![b'A'; 8192]).unwrap();
    fs::hard_link(d.backing.join("out/f"), d.backing.join("iso/hl")).unwrap();
    fs::write(d.backing.join("dA/g"), vec![b'G'; 8192]).unwrap();
    fs::write(d.backing.join("out/u"), vec![b'U'; 8192]).unwrap();
    fs::write(d.backing.join("iso/x"), b"x").unwrap();
    let m = d.mount_with(&["--isolate-path", "iso"]);
    let rw = |p: &str| open_rw(&d.mnt.join(p));
    let punch = |f: &File, offset: u64, len: u64| {
        let mode = rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
        rustix::fs::fallocate(f, mode, offset, len).unwrap();
    };
    // What each file must hold: 10 bytes written over a punched first block, cut to 6000.
    let expect = |fill: u8| {
        let mut want = vec![0u8; 6000];
        want[..10].copy_from_slice(b"WWWWWWWWWW");
        want[4096..].fill(fill);
        want
    };
    let work = |f: &File, name: &str, fill: u8| {
        punch(f, 0, 4096);
        f.write_all_at(b"WWWWWWWWWW", 0).unwrap();
        f.set_len(6000).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 6000, "{name}: fstat");
        let mut buf = Vec::new();
        (&*f).seek(std::io::SeekFrom::Start(0)).unwrap();
        (&*f).read_to_end(&mut buf).unwrap();
        assert!(buf == expect(fill), "{name}: read back by its descriptor");
    };

    // A hard link met in the isolated paths while out/f is open for writing.
    let f = rw("out/f");
    fs::metadata(d.mnt.join("iso/hl")).unwrap();
    work(&f, "out/f, linked as iso/hl", b'A');
    for name in ["iso/hl", "out/f"] {
        let got = fs::read(d.mnt.join(name)).map_err(|e| e.raw_os_error());
        assert!(
            got == Ok(expect(b'A')),
            "{name} by another open while out/f is open"
        );
    }
    drop(f);

    // A directory above the file renamed in isolation while it is open for writing.
    let g = rw("dA/g");
    fs::rename(d.mnt.join("iso/x"), d.mnt.join("dA/x")).unwrap();
    fs::rename(d.mnt.join("dA"), d.mnt.join("dB")).unwrap();
    assert!(d.backing.join("dA/g").exists(), "the rename was isolated");
    work(&g, "dA/g, its directory renamed", b'G');
    drop(g);

    // A file unlinked while open for writing.
    let u = rw("out/u");
    fs::remove_file(d.mnt.join("out/u")).unwrap();
    let start = std::time::Instant::now();
    work(&u, "out/u, unlinked", b'U');
    assert!(
        start.elapsed() < std::time::Duration::from_secs(1),
        "out/u: its ftruncate waited for its own descriptor"
    );
    drop(u);

    m.stop();
    commit(&d.store, None);
    assert!(
        read(&d.backing.join("out/f")) == expect(b'A'),
        "out/f after the commit"
    );
    assert!(
        read(&d.backing.join("dB/g")) == expect(b'G'),
        "dB/g after the commit"
    );
    assert!(!d.backing.join("out/u").exists());
}

/// The same across a mounted commit or discard, which rebuild the view: a file written
/// through passthrough keeps its data in its backing file, and so does one unlinked
/// outside the isolated paths while open (a discard made it stale). And once its last
/// passthrough open is closed, the view's size of it (held where a change to it was
/// recorded, a chmod) is what the program wrote: a later recorded write carried the old
/// size, and the commit cut what passthrough had written.
#[test]
fn a_file_written_through_passthrough_keeps_its_data_there_across_commits_and_discards() {
    for step in ["commit", "discard"] {
        let d = dirs();
        for dir in ["out", "iso"] {
            fs::create_dir(d.backing.join(dir)).unwrap();
        }
        fs::write(d.backing.join("out/f"), vec![b'a'; 8192]).unwrap();
        fs::hard_link(d.backing.join("out/f"), d.backing.join("iso/hl")).unwrap();
        fs::write(d.backing.join("out/u"), vec![b'u'; 8192]).unwrap();
        let m = d.mount_with(&["--isolate-path", "iso", "--cache-timeout", "0"]);
        let f = open_rw(&d.mnt.join("out/f"));
        let u = open_rw(&d.mnt.join("out/u"));
        fs::remove_file(d.mnt.join("out/u")).unwrap();
        fs::metadata(d.mnt.join("iso/hl")).unwrap();
        fs::write(d.mnt.join("iso/new"), b"x").unwrap();
        match step {
            "commit" => drop(commit(&d.store, None)),
            _ => drop(discard(&d.store, None)),
        }
        // The hard link met again: isolated again.
        fs::metadata(d.mnt.join("iso/hl")).unwrap();
        rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, 16384).unwrap();
        f.write_all_at(&[b'Q'; 4096], 8192).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 16384, "{step}: fstat of out/f");
        let by_other = fs::read(d.mnt.join("iso/hl")).map_err(|e| e.raw_os_error());
        assert_eq!(by_other.map(|b| b.len()), Ok(16384), "{step}: iso/hl read");
        u.set_len(100).unwrap();
        assert_eq!(
            u.metadata().unwrap().len(),
            100,
            "{step}: fstat of unlinked out/u"
        );
        // A recorded change, then the last passthrough open closes.
        fs::set_permissions(d.mnt.join("out/f"), fs::Permissions::from_mode(0o600)).unwrap();
        f.write_all_at(&[b'R'; 4096], 16384).unwrap();
        drop((f, u));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        // The kernel releases the closed file a moment after close(2); the write that
        // follows waits for it (ETXTBSY only after 2 s).
        let w = loop {
            match OpenOptions::new().write(true).open(d.mnt.join("out/f")) {
                Ok(w) => break w,
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "{step}: writer refused"
                    )
                }
                Err(e) => panic!("{step}: {e}"),
            }
        };
        assert_eq!(
            fs::metadata(d.mnt.join("out/f")).unwrap().len(),
            20480,
            "{step}: size on the mount after the last close"
        );
        w.write_all_at(b"Z", 0).unwrap();
        drop(w);
        m.stop();
        commit(&d.store, None);
        let mut want = vec![b'a'; 20480];
        want[0] = b'Z';
        want[8192..12288].fill(b'Q');
        want[12288..16384].fill(0);
        want[16384..].fill(b'R');
        assert!(
            read(&d.backing.join("out/f")) == want,
            "{step}: out/f after the commit"
        );
    }
}

/// A mounted discard while a file unlinked outside the isolated paths is open with data
/// the view recorded for it (served by the daemon: no name in BACKING to write to) ends,
/// the mount answers and the file keeps its data: carrying that file across the discard
/// read its data from the journal the discard had just cut, and waited for it forever
/// with the view locked; then it went stale.
#[test]
fn a_mounted_discard_with_an_unlinked_file_holding_recorded_data_ends() {
    let d = dirs();
    fs::create_dir(d.backing.join("out")).unwrap();
    fs::write(d.backing.join("out/f"), b"original").unwrap();
    let m = d.mount_with(&["--isolate-path", "iso", "--no-passthrough"]);
    let f = open_rw(&d.mnt.join("out/f"));
    fs::remove_file(d.mnt.join("out/f")).unwrap();
    f.write_all_at(b"ACKNOWLEDGED", 0).unwrap();
    f.sync_all().unwrap();
    let mut child = Command::new(bin())
        .args(["isolation", "discard"])
        .arg(&d.store)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let status = wait_timeout(&mut child, std::time::Duration::from_secs(30));
    if status.is_none() {
        let _ = child.kill();
    }
    assert!(status.is_some_and(|s| s.success()), "discard: {status:?}");
    assert!(
        fs::metadata(&d.mnt).is_ok(),
        "the mount answers after the discard"
    );
    // And the file keeps what was written to it (copied out before the journal's cut).
    let mut back = [0u8; 12];
    f.read_exact_at(&mut back, 0).unwrap();
    assert_eq!(&back, b"ACKNOWLEDGED");
    f.write_all_at(b"!", 12).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 13);
    drop(f);
    m.stop();
}

/// A file open through the mount, unlinked there outside the isolated paths while it has
/// another name in BACKING the mount never looked up, keeps being read and written through
/// its descriptor across a mounted commit and a mounted discard. It was left out of what
/// they carry (it still had a link), and its descriptor went stale (ESTALE).
#[test]
fn a_file_unlinked_outside_the_isolated_paths_with_another_backing_name_survives_commit_and_discard(
) {
    for (round, passthrough) in [(0, true), (1, false)] {
        let d = dirs();
        fs::create_dir(d.backing.join("out")).unwrap();
        fs::create_dir(d.backing.join("iso")).unwrap();
        fs::write(d.backing.join("out/f"), b"original").unwrap();
        fs::hard_link(d.backing.join("out/f"), d.backing.join("out/never-seen")).unwrap();
        let mut args = vec!["--isolate-path", "iso"];
        if !passthrough {
            args.push("--no-passthrough");
        }
        let m = d.mount_with(&args);
        let f = open_rw(&d.mnt.join("out/f"));
        fs::remove_file(d.mnt.join("out/f")).unwrap();
        let what = |when: &str| format!("round {round} (passthrough {passthrough}), {when}");
        for (step, op) in ["commit", "discard"].into_iter().enumerate() {
            fs::write(d.mnt.join("iso/pending"), b"x").unwrap();
            let mut buf = [0u8; 8];
            f.read_exact_at(&mut buf, 0)
                .unwrap_or_else(|e| panic!("{}: {e}", what(&format!("before the {op}"))));
            if op == "commit" {
                commit(&d.store, None);
            } else {
                discard(&d.store, None);
            }
            let mut buf = [0u8; 8];
            f.read_exact_at(&mut buf, 0)
                .unwrap_or_else(|e| panic!("{}: {e}", what(&format!("read after the {op}"))));
            let want: &[u8] = if step == 0 { b"original" } else { b"ORIGINAL" };
            assert_eq!(&buf, want, "{}", what(&format!("after the {op}")));
            f.write_all_at(b"ORIGINAL", 0)
                .unwrap_or_else(|e| panic!("{}: {e}", what(&format!("write after the {op}"))));
            f.metadata()
                .unwrap_or_else(|e| panic!("{}: {e}", what(&format!("fstat after the {op}"))));
        }
        drop(f);
        m.stop();
    }
}

/// A file outside the isolated paths, unlinked through the mount while open, whose object
/// BACKING keeps under another name the mount never looked up: what is done through its
/// descriptor reaches that object, as on any file system, served by the daemon or passed
/// through, before and after mounted commits and discards, and recorded with
/// `--write-through`. The daemon used to keep a daemon-served one's writes in the view,
/// never applied.
#[test]
fn a_file_unlinked_outside_the_isolated_paths_is_still_its_other_backing_names_object() {
    let rounds: [(&[&str], &str); 4] = [
        (&["--isolate-path", "iso", "--no-passthrough"], "served"),
        (&["--isolate-path", "iso"], "passthrough"),
        (
            &["--write-through", "--no-passthrough"],
            "write-through, served",
        ),
        (&["--write-through"], "write-through, passthrough"),
    ];
    for (args, label) in rounds {
        let d = dirs();
        fs::create_dir(d.backing.join("out")).unwrap();
        fs::create_dir(d.backing.join("iso")).unwrap();
        fs::write(d.backing.join("out/f"), b"original").unwrap();
        let other = d.backing.join("out/never-seen");
        fs::hard_link(d.backing.join("out/f"), &other).unwrap();
        let m = d.mount_with(args);
        let f = open_rw(&d.mnt.join("out/f"));
        fs::remove_file(d.mnt.join("out/f")).unwrap();
        let logged = |d: &Dirs| log_json(&d.store, 0).len();
        let before = logged(&d);
        f.write_all_at(b"WRITTEN!", 0).unwrap();
        f.sync_all().unwrap();
        assert_eq!(
            read(&other),
            b"WRITTEN!",
            "{label}: the write reaches the object"
        );
        f.set_len(4).unwrap();
        assert_eq!(read(&other), b"WRIT", "{label}: so does a truncation");
        assert_eq!(f.metadata().unwrap().len(), 4, "{label}: fstat");
        let mut buf = [0u8; 4];
        f.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"WRIT", "{label}: and a read");
        if label.starts_with("write-through") {
            f.set_permissions(fs::Permissions::from_mode(0o600))
                .unwrap();
            assert_eq!(
                fs::metadata(&other).unwrap().mode() & 0o7777,
                0o600,
                "{label}"
            );
            let trail: Vec<String> = log_json(&d.store, 0)
                .iter()
                .map(|l| l.split(' ').take(3).collect::<Vec<_>>().join(" "))
                .collect();
            assert_eq!(
                trail[trail.len() - 3..],
                [
                    format!("{} data -", before + 1),
                    format!("{} data -", before + 2),
                    format!("{} setattr -", before + 3),
                ],
                "{label}: all three are in the trail: {trail:?}"
            );
        } else {
            let ops: [&str; 2] = ["commit", "discard"];
            for (step, op) in ops.into_iter().enumerate() {
                fs::write(d.mnt.join("iso/pending"), b"x").unwrap();
                if op == "commit" {
                    commit(&d.store, None);
                } else {
                    discard(&d.store, None);
                }
                let text = format!("after {op} {step}");
                f.write_all_at(text.as_bytes(), 0).unwrap();
                f.sync_all().unwrap();
                assert_eq!(read(&other), text.as_bytes(), "{label}: a write {op}");
                assert_eq!(
                    f.metadata().unwrap().len(),
                    text.len() as u64,
                    "{label}: {op}"
                );
            }
            assert_eq!(
                logged(&d),
                0,
                "{label}: the writes were not recorded as pending"
            );
        }
        drop(f);
        m.stop();
        if label.starts_with("write-through") {
            // The trail's records without a path replay (as nothing) on a remount.
            let m = d.mount_with(args);
            assert_eq!(
                read(&d.mnt.join("out/never-seen")),
                b"WRIT",
                "{label}: remounted"
            );
            m.stop();
        }
    }
}

/// The same file's attributes and xattrs, changed through its descriptor by its owner
/// (not root): the set-user-ID bit a write drops, fchmod, futimens and fsetxattr all reach
/// the object under its other name. The view kept them to itself, and through passthrough
/// the object kept its set-user-ID bit after a write by a user without CAP_FSETID.
#[test]
fn attributes_of_a_file_unlinked_outside_the_isolated_paths_reach_its_other_backing_name() {
    let script = r#"
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
os.unlink(sys.argv[1])
other = sys.argv[2]
os.pwrite(fd, b'data', 0)
os.fsync(fd)
print(oct(os.stat(other).st_mode & 0o7777), oct(os.fstat(fd).st_mode & 0o7777))
os.fchmod(fd, 0o700)
os.utime(fd, ns=(1_000_000_000, 2_000_000_000))
os.setxattr(fd, 'user.note', b'kept')
st = os.stat(other)
print(oct(st.st_mode & 0o7777), st.st_mtime_ns, os.getxattr(other, 'user.note').decode(), open(other, 'rb').read().decode())
"#;
    for (args, label) in [
        (&["--isolate-path", "iso", "--no-passthrough"][..], "served"),
        (&["--isolate-path", "iso"][..], "passthrough"),
    ] {
        let d = dirs();
        fs::create_dir(d.backing.join("out")).unwrap();
        fs::set_permissions(d.backing.join("out"), fs::Permissions::from_mode(0o777)).unwrap();
        fs::create_dir(d.backing.join("iso")).unwrap();
        let f = d.backing.join("out/f");
        fs::write(&f, b"original").unwrap();
        std::os::unix::fs::chown(&f, Some(1000), Some(1000)).unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o4755)).unwrap();
        let other = d.backing.join("out/never-seen");
        fs::hard_link(&f, &other).unwrap();
        let m = d.mount_with(args);
        let out = output(
            as_user(1000, 1000, &[])
                .arg(python())
                .arg("-c")
                .arg(script)
                .arg(d.mnt.join("out/f"))
                .arg(&other),
        );
        assert!(out.status.success(), "{label}: {}", describe(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "0o755 0o755\n0o700 2000000000 kept datainal",
            "{label}"
        );
        m.stop();
    }
}

/// Once the mount meets an isolated name of that object (a hard link in the isolated
/// paths), the file is isolated again: writes and truncations through the old descriptor
/// stay pending, BACKING keeps what reached it before, and a discard takes them back. And
/// a descriptor open for reading alone never keeps the object's other name from being run.
#[test]
fn an_isolated_name_met_after_the_unlink_isolates_the_file_again() {
    let d = dirs();
    fs::create_dir(d.backing.join("out")).unwrap();
    fs::create_dir(d.backing.join("iso")).unwrap();
    fs::write(d.backing.join("out/f"), b"original").unwrap();
    let isolated = d.backing.join("iso/link");
    fs::hard_link(d.backing.join("out/f"), &isolated).unwrap();
    fs::copy("/bin/true", d.backing.join("out/prog")).unwrap();
    fs::hard_link(d.backing.join("out/prog"), d.backing.join("out/prog-too")).unwrap();
    let m = d.mount_with(&["--isolate-path", "iso", "--no-passthrough"]);
    let f = open_rw(&d.mnt.join("out/f"));
    fs::remove_file(d.mnt.join("out/f")).unwrap();
    f.write_all_at(b"BEFORE", 0).unwrap();
    assert_eq!(
        read(&isolated),
        b"BEFOREal",
        "no isolated name met yet: BACKING's object"
    );
    assert_eq!(read(&d.mnt.join("iso/link")), b"BEFOREal");
    f.write_all_at(b"AFTER", 0).unwrap();
    f.set_len(5).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(d.mnt.join("iso/link"))
        .unwrap()
        .set_len(3)
        .unwrap();
    assert_eq!(
        read(&isolated),
        b"BEFOREal",
        "isolated again: BACKING untouched"
    );
    assert_eq!(read(&d.mnt.join("iso/link")), b"AFT");
    let mut buf = Vec::new();
    (&f).read_to_end(&mut buf).unwrap();
    assert_eq!(buf, b"AFT", "the descriptor reads what the mount shows");
    discard(&d.store, None);
    assert_eq!(
        read(&d.mnt.join("iso/link")),
        b"BEFOREal",
        "after the discard"
    );
    drop(f);

    let reader = File::open(d.mnt.join("out/prog")).unwrap();
    fs::remove_file(d.mnt.join("out/prog")).unwrap();
    let ran = Command::new(d.backing.join("out/prog-too"))
        .status()
        .unwrap();
    assert!(ran.success(), "the other name runs: {ran:?}");
    drop(reader);
    m.stop();
}

/// The same file carried across a mounted commit or discard is still its object: a lookup
/// of another name of it finds it (one inode, one page cache: a read through the other
/// name shows what the descriptor wrote), and meeting an isolated name isolates it again.
/// Carried, it was a node apart: the other name kept showing stale pages, and the
/// descriptor's writes went on reaching BACKING after an isolated name was met.
#[test]
fn a_file_unlinked_outside_the_isolated_paths_is_found_again_by_its_names_after_a_commit() {
    for op in ["commit", "discard"] {
        let d = dirs();
        fs::create_dir(d.backing.join("out")).unwrap();
        fs::create_dir(d.backing.join("iso")).unwrap();
        fs::write(d.backing.join("out/f"), b"original").unwrap();
        fs::hard_link(d.backing.join("out/f"), d.backing.join("out/other")).unwrap();
        fs::hard_link(d.backing.join("out/f"), d.backing.join("iso/link")).unwrap();
        let m = d.mount_with(&["--isolate-path", "iso", "--no-passthrough"]);
        let f = open_rw(&d.mnt.join("out/f"));
        fs::remove_file(d.mnt.join("out/f")).unwrap();
        fs::write(d.mnt.join("iso/pending"), b"x").unwrap();
        if op == "commit" {
            commit(&d.store, None);
        } else {
            discard(&d.store, None);
        }
        let other = d.mnt.join("out/other");
        assert_eq!(read(&other), b"original", "{op}");
        assert_eq!(
            fs::metadata(&other).unwrap().ino(),
            f.metadata().unwrap().ino(),
            "{op}: one object, one inode"
        );
        f.write_all_at(b"NEWDATA", 0).unwrap();
        assert_eq!(read(&other), b"NEWDATAl", "{op}: the other name");
        assert_eq!(
            read(&d.backing.join("out/other")),
            b"NEWDATAl",
            "{op}: BACKING"
        );
        let isolated = OpenOptions::new()
            .write(true)
            .open(d.mnt.join("iso/link"))
            .unwrap();
        isolated.set_len(3).unwrap();
        f.write_all_at(b"XY", 0).unwrap();
        assert_eq!(read(&d.mnt.join("iso/link")), b"XYW", "{op}: the mount");
        assert_eq!(
            read(&d.backing.join("iso/link")),
            b"NEWDATAl",
            "{op}: isolated again, BACKING untouched"
        );
        drop(isolated);
        discard(&d.store, None);
        assert_eq!(
            read(&d.mnt.join("iso/link")),
            b"NEWDATAl",
            "{op}: discarded"
        );
        drop(f);
        m.stop();
    }
}

/// A file written through passthrough outside the isolated paths, unlinked while open,
/// can be opened again for writing and truncated through /proc/self/fd at once, as on any
/// file system: both waited two seconds for the file's own passthrough descriptor to close,
/// then failed with ETXTBSY.
#[test]
fn an_unlinked_file_written_through_passthrough_can_be_reopened_for_writing_through_proc() {
    let d = dirs();
    fs::create_dir(d.backing.join("out")).unwrap();
    fs::create_dir(d.backing.join("iso")).unwrap();
    fs::write(d.backing.join("out/f"), b"0123456789").unwrap();
    let m = d.mount_with(&["--isolate-path", "iso"]);
    let script = r#"
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
os.unlink(sys.argv[1])
start = time.monotonic()
again = os.open('/proc/self/fd/%d' % fd, os.O_RDWR)
os.pwrite(again, b'AB', 0)
os.truncate('/proc/self/fd/%d' % fd, 6)
took = time.monotonic() - start
print(os.pread(fd, 100, 0).decode(), os.fstat(again).st_size, 'slow' if took > 1 else 'fast')
"#;
    let out = output(
        Command::new(python())
            .arg("-c")
            .arg(script)
            .arg(d.mnt.join("out/f")),
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "AB2345 6 fast");
    m.stop();
}

/// POSIX: after rewinddir, a directory stream shows the directory as it is then. The
/// isolated mount used to keep serving the listing taken when the directory was opened.
#[test]
fn a_directory_read_again_from_the_start_shows_what_was_made_since() {
    let d = dirs();
    fs::write(d.backing.join("old"), b"").unwrap();
    let m = d.mount();
    let script = r#"
import os
fd = os.open('.', os.O_RDONLY | os.O_DIRECTORY)
first = sorted(os.listdir(fd))
os.close(os.open('new', os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
os.unlink('old', dir_fd=fd)
os.lseek(fd, 0, os.SEEK_SET)    # rewinddir
print(first, sorted(os.listdir(fd)))
"#;
    let out = output(
        Command::new("python3")
            .args(["-c", script])
            .current_dir(&d.mnt),
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "['old'] ['new']"
    );
    m.stop();
}

#[test]
fn a_directory_empty_only_in_the_view_can_be_renamed_over() {
    // out is outside the isolated paths and empty in the view only (its one name was
    // isolated and removed): renaming another directory over it works as on a plain
    // directory, in isolation, since BACKING's out still has the name.
    let d = dirs();
    fs::create_dir_all(d.backing.join("out")).unwrap();
    fs::create_dir_all(d.backing.join("empty")).unwrap();
    fs::write(d.backing.join("out/a.conf"), b"a").unwrap();
    let m = d.mount_with(&["--isolate-path", "**/*.conf"]);
    fs::remove_file(d.mnt.join("out/a.conf")).unwrap();
    assert_eq!(py_rename(&d.mnt.join("empty"), &d.mnt.join("out")), "ok");
    assert_eq!(names(&d.mnt), ["out"]);
    assert_eq!(
        read(&d.backing.join("out/a.conf")),
        b"a",
        "BACKING before the commit"
    );
    assert_eq!(
        log_text(&d.store, 0),
        ["1 unlink /out/a.conf", "2 rename /empty -> /out"]
    );
    commit(&d.store, None);
    assert_eq!(names(&d.backing), ["out"]);
    assert_eq!(names(&d.backing.join("out")), Vec::<String>::new());
    m.stop();
}

/// Mount arguments for each mode, added to `--isolate STORE`: all isolated, only iso/
/// isolated (what the tests do elsewhere goes straight to BACKING), and write-through.
const EVERY_MODE: [&[&str]; 3] = [&[], &["--isolate-path", "iso"], &["--write-through"]];

#[test]
fn a_removed_working_directory_lists_empty_with_no_links() {
    // A process whose working directory is removed (rm -rf from elsewhere) sees it as on
    // any file system: an empty listing and a link count of 0, in every mode (where the
    // removal goes straight to BACKING too).
    let script = "import os, shutil, sys\n\
        shutil.rmtree(sys.argv[1])\n\
        print(len(os.listdir('.')), os.stat('.').st_nlink)\n";
    for extra in EVERY_MODE {
        let d = dirs();
        let m = d.mount_with(extra);
        for dir in ["x/y", "iso/y"] {
            let top = d.mnt.join(dir.split('/').next().unwrap());
            fs::create_dir_all(d.mnt.join(dir)).unwrap();
            fs::write(d.mnt.join(dir).join("f"), b"f").unwrap();
            let out = run(Command::new(python())
                .args(["-c", script, s(&top)])
                .current_dir(d.mnt.join(dir)));
            assert_eq!(out.trim(), "0 0", "{extra:?}: {dir}, removed while the cwd");
        }
        m.stop();
    }
}

#[test]
fn unchanged_files_open_many_times_at_once_read_right() {
    // An unchanged file opened read-only is passed through to the backing file; the kernel
    // takes one backing file per inode, so later opens while one is open must share it
    // (they got EIO). git init on a --write-through mount was one way to meet it.
    for extra in EVERY_MODE {
        let d = dirs();
        fs::write(d.backing.join("f"), b"data\n").unwrap();
        let m = d.mount_with(extra);
        let f = d.mnt.join("f");
        let first = File::open(&f).unwrap();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..50 {
                        assert_eq!(read(&f), b"data\n", "{extra:?}: another open");
                    }
                });
            }
        });
        let mut text = String::new();
        (&first).read_to_string(&mut text).unwrap();
        assert_eq!(text, "data\n", "{extra:?}: the first open");
        drop(first);
        run(Command::new("git")
            .args(["init", "-q"])
            .arg(d.mnt.join("repo")));
        m.stop();
    }
}

#[test]
fn a_discard_gives_open_descriptors_their_own_objects_back() {
    // A descriptor stays with its object across a discard: one of the backing file that a
    // rename had replaced reads it again once the discard brings it back; one of the file
    // the discard threw away goes stale (it used to be rebound by path to the backing
    // file, and a write through it then reached BACKING on the next commit).
    let d = dirs();
    fs::write(d.backing.join("f"), b"ORIGINAL").unwrap();
    let m = d.mount();
    let f = d.mnt.join("f");
    let rw = || OpenOptions::new().read(true).write(true).open(&f).unwrap();
    let original = rw();
    fs::write(d.mnt.join("tmp"), b"replacement").unwrap();
    fs::rename(d.mnt.join("tmp"), &f).unwrap();
    let replacement = rw();
    discard(&d.store, None);
    let mut buf = [0u8; 32];
    let n = original.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf[..n], b"ORIGINAL", "the backing file's descriptor");
    let err = replacement.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ESTALE),
        "the discarded file's descriptor"
    );
    let err = replacement.write_at(b"XX", 0).unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ESTALE),
        "a write to the discarded file"
    );
    commit(&d.store, None);
    assert_eq!(read(&d.backing.join("f")), b"ORIGINAL");
    drop((original, replacement));
    m.stop();
}

#[test]
fn chmod_keeps_an_access_acl_in_step_as_on_a_plain_directory() {
    // With an access ACL, chmod sets the ACL's mask (the group bits) and others too;
    // the view must do that itself, and the commit must give BACKING the same.
    let d = dirs();
    let plain = d.tmp.path().join("plain");
    fs::create_dir(&plain).unwrap();
    let m = d.mount();
    let steps = |dir: &Path| -> Vec<String> {
        let f = dir.join("f");
        fs::write(&f, b"x").unwrap();
        run(Command::new("setfacl").args(["-m", "u:1000:rw"]).arg(&f));
        let mut out = Vec::new();
        for mode in ["600", "664", "750"] {
            run(Command::new("chmod").arg(mode).arg(&f));
            out.push(run(Command::new("getfacl").args(["-cp"]).arg(&f)));
        }
        out
    };
    let want = steps(&plain);
    assert_eq!(steps(&d.mnt), want, "getfacl after each chmod on the mount");
    commit(&d.store, None);
    let backing = run(Command::new("getfacl")
        .args(["-cp"])
        .arg(d.backing.join("f")));
    assert_eq!(
        &backing,
        want.last().unwrap(),
        "getfacl in BACKING after the commit"
    );
    m.stop();
}

#[test]
fn readers_do_not_hold_up_writers_where_nothing_is_isolated() {
    // Outside the isolated paths a writer shares the readers' passthrough (and a truncate
    // reaches the file they read); --write-through passes nothing through. Either way a
    // file held open for reading does not make a writer wait and fail with ETXTBSY, as it
    // must where the file is isolated (see the test of that).
    for extra in [&["--isolate-path", "iso"][..], &["--write-through"][..]] {
        let d = dirs();
        fs::write(d.backing.join("log"), b"one\n").unwrap();
        let m = d.mount_with(extra);
        let log = d.mnt.join("log");
        let reader = File::open(&log).unwrap();
        let mut w = OpenOptions::new().append(true).open(&log).unwrap();
        w.write_all(b"two\n").unwrap();
        let mut buf = [0u8; 16];
        let n = reader.read_at(&mut buf, 0).unwrap();
        assert_eq!(
            &buf[..n],
            b"one\ntwo\n",
            "{extra:?}: the reader sees the append"
        );
        fs::write(&log, b"new\n").unwrap(); // O_TRUNC while the reader has it open
        let n = reader.read_at(&mut buf, 0).unwrap();
        assert_eq!(
            &buf[..n],
            b"new\n",
            "{extra:?}: the reader sees the rewrite"
        );
        assert_eq!(read(&d.backing.join("log")), b"new\n", "{extra:?}: BACKING");
        drop((reader, w));
        m.stop();
    }
}

#[test]
fn open_files_keep_their_object_when_their_name_goes() {
    // A file open through the mount keeps reading, writing and stat'ing its own object
    // after another file is renamed over it, or after it is unlinked and a new file is made
    // under its name, and takes fchmod, fchown, futimens, fsetxattr and flistxattr, as on
    // any file system; the names reach the new files at once. Isolated, and where changes
    // go straight to BACKING (outside --isolate-path, --write-through).
    for extra in EVERY_MODE {
        let isolated = extra.is_empty();
        let d = dirs();
        let m = d.mount_with(extra);
        let by_fd = |file: &File, want: &[u8], what: &str| {
            let mut buf = [0u8; 16];
            let n = file.read_at(&mut buf, 0).unwrap();
            assert_eq!(&buf[..n], want, "{extra:?}: {what}, by its descriptor");
            let size = file.metadata().unwrap().len();
            assert_eq!(size, want.len() as u64, "{extra:?}: {what}, fstat");
        };
        let by_name = |name: &str, want: &[u8]| {
            assert_eq!(
                read(&d.mnt.join(name)),
                want,
                "{extra:?}: {name} on the mount"
            );
            if !isolated {
                let what = format!("{extra:?}: {name} in BACKING");
                assert_eq!(read(&d.backing.join(name)), want, "{what}");
            }
        };
        let (f, g, h) = (d.mnt.join("f"), d.mnt.join("g"), d.mnt.join("h"));
        fs::write(&f, b"AAAA").unwrap();
        fs::write(&g, b"BBBB").unwrap();
        let over = OpenOptions::new().read(true).write(true).open(&f).unwrap();
        fs::rename(&g, &f).unwrap();
        over.write_at(b"XX", 0).unwrap();
        over.sync_all().unwrap();
        by_fd(&over, b"XXAA", "the file renamed over");
        by_name("f", b"BBBB");
        fs::write(&h, b"HHHHHHHH").unwrap();
        let unlinked = OpenOptions::new().read(true).write(true).open(&h).unwrap();
        fs::remove_file(&h).unwrap();
        fs::write(&h, b"NEW!").unwrap();
        unlinked.write_at(b"YY", 0).unwrap();
        by_fd(&unlinked, b"YYHHHHHH", "the file unlinked");
        by_name("h", b"NEW!");
        unlinked
            .set_permissions(fs::Permissions::from_mode(0o640))
            .unwrap();
        std::os::unix::fs::fchown(&unlinked, Some(1), Some(2)).unwrap();
        unlinked.set_modified(std::time::UNIX_EPOCH).unwrap();
        let fd = std::os::fd::AsFd::as_fd(&unlinked);
        rustix::fs::fsetxattr(fd, "user.k", b"v", rustix::fs::XattrFlags::empty()).unwrap();
        let st = unlinked.metadata().unwrap();
        let got = (st.mode() & 0o7777, st.uid(), st.gid(), st.mtime());
        assert_eq!(
            got,
            (0o640, 1, 2, 0),
            "{extra:?}: fstat after fchmod, fchown, futimens"
        );
        let mut names = [0u8; 64];
        let n = rustix::fs::flistxattr(fd, &mut names).unwrap();
        assert_eq!(&names[..n], b"user.k\0", "{extra:?}: flistxattr");
        drop((over, unlinked));
        m.stop();
    }
}

#[test]
fn a_file_held_open_opens_again_after_its_mode_or_links_change() {
    // An unchanged file of BACKING is read through passthrough; while one descriptor holds
    // it, a chmod, a hard link, a rename and a removed name change it in the view but not
    // its contents. Opening it again must work: the kernel fails with EIO an open the
    // daemon serves itself of a file it holds through passthrough. With a mounted commit
    // in between too (the committed file is BACKING's again).
    for extra in EVERY_MODE {
        let d = dirs();
        fs::write(d.backing.join("f"), b"contents").unwrap();
        let m = d.mount_with(extra);
        let f = d.mnt.join("f");
        let held = File::open(&f).unwrap();
        let again = |name: &str, what: &str| {
            let got = fs::read(d.mnt.join(name))
                .unwrap_or_else(|e| panic!("{extra:?}: opening {name} after {what}: {e}"));
            assert_eq!(got, b"contents", "{extra:?}: {name} after {what}");
        };
        fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
        again("f", "a chmod");
        fs::hard_link(&f, d.mnt.join("g")).unwrap();
        again("g", "a hard link");
        fs::rename(&f, d.mnt.join("h")).unwrap();
        again("h", "a rename");
        fs::remove_file(d.mnt.join("g")).unwrap();
        again("h", "removing another name");
        if extra.is_empty() {
            commit(&d.store, None);
            fs::set_permissions(d.mnt.join("h"), fs::Permissions::from_mode(0o640)).unwrap();
            again("h", "a mounted commit and a chmod");
        }
        let mut buf = Vec::new();
        (&held).read_to_end(&mut buf).unwrap();
        assert_eq!(buf, b"contents", "{extra:?}: the descriptor held all along");
        drop(held);
        drop(m);
    }
}

/// Outside the isolated paths of `--isolate-path`, an unlink or a rename over an open
/// file goes straight to BACKING; the file must still be carried across a mounted commit
/// like an isolated one. The view kept counting the name BACKING no longer had, so the
/// commit did not see the file was nameless, dropped it, and its descriptors failed with
/// ESTALE.
#[test]
fn files_outside_the_isolated_paths_open_without_a_name_survive_a_mounted_commit() {
    let d = dirs();
    fs::create_dir(d.backing.join("iso")).unwrap();
    fs::write(d.backing.join("old"), b"OLD").unwrap();
    let m = d.mount_with(&["--isolate-path", "iso"]);
    let open_rw = |p: &Path| OpenOptions::new().read(true).write(true).open(p).unwrap();
    let f_old = open_rw(&d.mnt.join("old"));
    let f_made = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(d.mnt.join("made"))
        .unwrap();
    f_made.write_all_at(b"MADE", 0).unwrap();
    let f_over = {
        fs::write(d.mnt.join("over"), b"OVER").unwrap();
        open_rw(&d.mnt.join("over"))
    };
    fs::remove_file(d.mnt.join("old")).unwrap();
    fs::remove_file(d.mnt.join("made")).unwrap();
    fs::write(d.mnt.join("new"), b"NEW").unwrap();
    fs::rename(d.mnt.join("new"), d.mnt.join("over")).unwrap();
    fs::write(d.mnt.join("iso/pending"), b"p").unwrap(); // something to commit
    iso("commit", &d.store, &[]);
    for (f, want, what) in [
        (&f_old, &b"OLD"[..], "a file of BACKING, unlinked"),
        (&f_made, b"MADE", "a file made through the mount, unlinked"),
        (&f_over, b"OVER", "a file renamed over"),
    ] {
        let st = f
            .metadata()
            .unwrap_or_else(|e| panic!("{what}: fstat after the commit: {e}"));
        assert_eq!(st.nlink(), 0, "{what}: nlink");
        let mut buf = vec![0u8; want.len()];
        f.read_exact_at(&mut buf, 0)
            .unwrap_or_else(|e| panic!("{what}: read after the commit: {e}"));
        assert_eq!(buf, want, "{what}: contents after the commit");
        f.write_all_at(b"!", want.len() as u64)
            .unwrap_or_else(|e| panic!("{what}: write after the commit: {e}"));
        let mut buf = vec![0u8; want.len() + 1];
        f.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[want.len()..], b"!", "{what}: its write");
    }
    assert_eq!(read(&d.backing.join("over")), b"NEW");
    assert!(!d.backing.join("old").exists() && !d.backing.join("made").exists());
    drop((f_old, f_made, f_over));
    m.stop();
}

#[test]
fn files_open_without_a_name_read_and_write_the_same_across_mounted_commits() {
    // A mounted commit rebuilds the view from BACKING and the records left, where nothing
    // leads to a file that lost its last name while open. Its descriptors must go on as on
    // any file system: reading what they read before, taking writes, fstat right. Each
    // kind: one of BACKING (its unlink pending, then committed), one made in the view
    // (renamed over), one never opened but written (sparse, 8 MiB hole); one of BACKING
    // never written before its unlink was committed. The files span several blocks: a
    // write into one block after the commit used to make the others read as zeros.
    let d = dirs();
    let with_tail = |head: &[u8], seed: u8| [head, &pattern(20_000, seed)].concat();
    let mut old_want = with_tail(b"OLD-CONTENT", 1);
    let mut made_want = with_tail(b"MADE-IN-VIEW", 2);
    let mut kept_want = with_tail(b"KEPT", 3);
    fs::write(d.backing.join("old"), &old_want).unwrap();
    fs::write(d.backing.join("kept"), &kept_want).unwrap();
    let m = d.mount();
    let (old, made, sparse) = (d.mnt.join("old"), d.mnt.join("made"), d.mnt.join("sparse"));
    let kept = d.mnt.join("kept");
    fs::write(&made, &made_want).unwrap();
    let open_rw = |p: &Path| OpenOptions::new().read(true).write(true).open(p).unwrap();
    let (f_old, f_made, f_kept) = (open_rw(&old), open_rw(&made), open_rw(&kept));
    let f_sparse = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&sparse)
        .unwrap();
    f_sparse.write_at(b"TAIL", 8 << 20).unwrap();
    let write = |f: &File, want: &mut Vec<u8>, data: &[u8], at: usize| {
        f.write_at(data, at as u64).unwrap();
        if want.len() < at + data.len() {
            want.resize(at + data.len(), 0);
        }
        want[at..at + data.len()].copy_from_slice(data);
    };
    write(&f_old, &mut old_want, b"o", 0);
    let before_unlinks = num(&status(&d.store), "last_seq");
    fs::remove_file(&old).unwrap();
    fs::remove_file(&kept).unwrap();
    fs::write(d.mnt.join("other"), b"x").unwrap();
    fs::rename(d.mnt.join("other"), &made).unwrap();
    fs::remove_file(&sparse).unwrap();
    let check = |when: &str, old_want: &[u8], made_want: &[u8], kept_want: &[u8]| {
        let read_all = |f: &File| {
            // What the daemon serves, not the pages the kernel kept.
            // SAFETY: posix_fadvise only reads its integer arguments; the descriptor is open.
            let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            assert_eq!(r, 0, "posix_fadvise");
            let mut buf = vec![0u8; f.metadata().unwrap().len() as usize];
            f.read_exact_at(&mut buf, 0)
                .unwrap_or_else(|e| panic!("{when}: read by descriptor: {e}"));
            buf
        };
        assert!(read_all(&f_old) == old_want, "{when}: the unlinked file");
        assert!(
            read_all(&f_made) == made_want,
            "{when}: the file renamed over"
        );
        assert!(
            read_all(&f_kept) == kept_want,
            "{when}: the unlinked unchanged file"
        );
        let tail = read_all(&f_sparse);
        assert_eq!(tail.len(), (8 << 20) + 4, "{when}: the sparse file's size");
        assert_eq!(&tail[8 << 20..], b"TAIL", "{when}: the sparse file's tail");
        assert!(tail[..8 << 20].iter().all(|&b| b == 0), "{when}: its hole");
        assert_eq!(
            f_old.metadata().unwrap().nlink(),
            0,
            "{when}: fstat's nlink"
        );
    };
    check("before any commit", &old_want, &made_want, &kept_want);
    // Up to before the unlinks, then everything: the unlinks pending, then applied.
    iso("commit", &d.store, &["--upto", &before_unlinks.to_string()]);
    check(
        "after a commit of what came before the unlinks",
        &old_want,
        &made_want,
        &kept_want,
    );
    write(&f_old, &mut old_want, b"O", 1);
    write(&f_made, &mut made_want, b"m", 0);
    iso("commit", &d.store, &[]);
    check(
        "after the commit of everything",
        &old_want,
        &made_want,
        &kept_want,
    );
    let end = made_want.len();
    write(&f_made, &mut made_want, b"!", end);
    write(&f_old, &mut old_want, b"#", 5000);
    write(&f_kept, &mut kept_want, b"k", 0);
    check("after writes", &old_want, &made_want, &kept_want);
    iso("commit", &d.store, &[]);
    check("after another commit", &old_want, &made_want, &kept_want);
    assert!(
        !d.backing.join("old").exists() && !d.backing.join("kept").exists(),
        "the unlinks reached BACKING"
    );
    assert_eq!(
        read(&d.backing.join("made")),
        b"x",
        "the rename reached BACKING"
    );
    drop((f_old, f_made, f_sparse, f_kept));
    let left: Vec<_> = fs::read_dir(&d.store)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    m.stop();
    assert!(
        !left.iter().any(|n| n.to_string_lossy().contains("orphan")),
        "copies of files open without a name left in the store: {left:?}"
    );
}

#[test]
fn a_directory_holding_an_isolated_path_counts_its_subdirectories() {
    // p is outside the isolated paths, p/iso* inside: p's link count must follow both the
    // subdirectories made straight in BACKING and those the view makes or removes, also
    // after a remount (the view rebuilt from the journal) and after a commit.
    let d = dirs();
    fs::create_dir_all(d.backing.join("p/iso_b")).unwrap();
    let mut m = d.mount_with(&["--isolate-path", "p/iso*"]);
    let p = d.mnt.join("p");
    let nlink = || fs::metadata(&p).unwrap().nlink();
    assert_eq!(nlink(), 3, "BACKING's p/iso_b");
    fs::create_dir(p.join("iso")).unwrap();
    assert_eq!(nlink(), 4, "after mkdir p/iso (isolated)");
    fs::create_dir(p.join("other")).unwrap();
    assert_eq!(nlink(), 5, "after mkdir p/other (straight to BACKING)");
    fs::remove_dir(p.join("iso")).unwrap();
    assert_eq!(nlink(), 4, "after rmdir p/iso");
    fs::remove_dir(p.join("iso_b")).unwrap();
    assert_eq!(nlink(), 3, "after rmdir p/iso_b (still in BACKING)");
    fs::write(p.join("iso_b"), b"a file now\n").unwrap();
    fs::create_dir(p.join("iso_c")).unwrap();
    assert_eq!(nlink(), 4, "after a file p/iso_b and mkdir p/iso_c");
    for round in ["remount", "commit"] {
        m.stop();
        if round == "commit" {
            commit(&d.store, None);
        }
        m = d.mount_with(&["--isolate-path", "p/iso*"]);
        assert_eq!(nlink(), 4, "after the {round}");
    }
    assert_eq!(fs::metadata(d.backing.join("p")).unwrap().nlink(), 4);
    m.stop();
}

#[test]
fn write_through_applies_every_change_at_once_and_records_it() {
    // --write-through: each change is in BACKING when the call returns, and in the store
    // with its sequence number; nothing is pending, so commit and discard refuse, and the
    // store refuses to be mounted as an isolating one.
    let d = dirs();
    fs::create_dir(d.backing.join("d")).unwrap();
    fs::write(d.backing.join("d/a"), b"one\n").unwrap();
    fs::write(d.backing.join("x"), b"x\n").unwrap();
    let m = d.mount_with(&["--write-through"]);
    fs::write(d.mnt.join("d/a"), b"changed\n").unwrap();
    assert_eq!(read(&d.backing.join("d/a")), b"changed\n");
    fs::create_dir(d.mnt.join("e")).unwrap();
    assert!(d.backing.join("e").is_dir());
    fs::rename(d.mnt.join("x"), d.mnt.join("e/y")).unwrap();
    assert_eq!(read(&d.backing.join("e/y")), b"x\n");
    fs::set_permissions(d.mnt.join("d/a"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(mode_of(&d.backing.join("d/a")) & 0o7777, 0o600);
    set_xattr(&d.mnt.join("d/a"), "user.k", b"v");
    assert_eq!(
        xattrs(&d.backing.join("d/a")).get(b"user.k".as_slice()),
        Some(&b"v".to_vec())
    );
    fs::remove_file(d.mnt.join("e/y")).unwrap();
    assert!(!d.backing.join("e/y").exists());
    assert_eq!(
        log_text(&d.store, 0),
        [
            "1 data /d/a (size 0, 0 bytes of blocks)",
            "2 data /d/a (size 8, 4096 bytes of blocks)",
            "3 mkdir /e",
            "4 rename /x -> /e/y",
            "5 setattr /d/a",
            "6 setxattr /d/a",
            "7 unlink /e/y",
        ]
    );
    let st = status(&d.store);
    assert_eq!(
        (
            num(&st, "last_seq"),
            num(&st, "committed_upto"),
            num(&st, "pending_changes")
        ),
        (7, 7, 0)
    );
    assert!(iso_fails("commit", &d.store, &[]).contains("nothing to commit"));
    assert!(iso_fails("discard", &d.store, &[]).contains("cannot discard"));
    // Refused, they leave the mount as it was: it takes changes, and shows BACKING (its
    // view was once rebuilt from the trail, whose mkdir no longer fitted: EROFS).
    fs::write(d.mnt.join("d/a"), b"after\n").unwrap();
    assert_eq!(read(&d.mnt.join("d/a")), b"after\n");
    assert_eq!(read(&d.backing.join("d/a")), b"after\n");
    fs::create_dir(d.mnt.join("e2")).unwrap();
    m.stop();
    let err = mount_fails(&d.backing, &d.mnt, &d.store);
    assert!(err.contains("made for --write-through"), "{err}");
}

/// A commit reads the journal ahead in large reads on threads of its own (4 MiB each,
/// two at a time) and writes each record's data from them: records of every size, with
/// changes without data between them, must land whole wherever the reads split them.
#[test]
fn a_commit_applies_every_record_whole_wherever_its_reads_of_the_journal_split_it() {
    let d = dirs();
    fs::write(d.backing.join("meta"), b"m").unwrap();
    let m = d.mount();
    let new_file = |name: &str| File::create(d.mnt.join(name)).unwrap();
    let (big, small) = (new_file("big"), new_file("small"));
    // Writes of uneven sizes (whole blocks and parts of them, up to the 1 MiB a FUSE
    // write carries, so up to 256 blocks a record), with a small write and a chmod (a
    // record without data) between them: about 14 MiB of journal.
    let sizes = [
        1 << 20,
        3 * 4096 + 17,
        (700 << 10) + 5,
        4096,
        1 << 20,
        65_536 - 1,
    ];
    let (mut at, mut i) = (0u64, 0usize);
    while at < 14 << 20 {
        let n = sizes[i % sizes.len()];
        big.write_all_at(&pattern(n, i as u8), at).unwrap();
        small
            .write_all_at(&pattern(100, i as u8), (i as u64 * 7919) % (1 << 20))
            .unwrap();
        fs::set_permissions(
            d.mnt.join("meta"),
            fs::Permissions::from_mode(0o600 | ((i as u32 % 2) * 0o44)),
        )
        .unwrap();
        at += n as u64 + if i % 5 == 0 { 8192 } else { 0 };
        i += 1;
    }
    big.set_len(at - 1000).unwrap();
    big.sync_all().unwrap();
    drop((big, small));
    // Bytes, holes and modes (times and inode numbers are other tests' business).
    type FileState = (String, Vec<u8>, Vec<(u64, u64)>, u32);
    let state = |root: &Path| -> Vec<FileState> {
        ["big", "small", "meta"]
            .iter()
            .map(|n| {
                let p = root.join(n);
                let regions = data_regions(&File::open(&p).unwrap());
                (n.to_string(), read(&p), regions, mode_of(&p))
            })
            .collect()
    };
    let want = state(&d.mnt);
    assert!(want[0].2.len() > 5, "too few holes in big: {:?}", want[0].2);
    let last = num(&status(&d.store), "last_seq");
    assert!(last > 3 * 30, "only {last} changes");
    // Half through the daemon, the rest without it.
    commit(&d.store, Some(last / 2));
    assert!(
        state(&d.mnt) == want,
        "the mount changed with a commit of half"
    );
    m.stop();
    commit(&d.store, None);
    let got = state(&d.backing);
    for (g, w) in got.iter().zip(&want) {
        assert!(
            g.1 == w.1,
            "{}: other bytes in BACKING after the commit",
            g.0
        );
        assert_eq!((&g.2, g.3), (&w.2, w.3), "{}: holes and mode", g.0);
    }
}

#[test]
fn rm_rf_of_a_large_tree_is_isolated_until_commit() {
    let d = dirs();
    let (dirs_n, files_n) = (30, 50);
    for i in 0..dirs_n {
        let dir = d.backing.join(format!("tree/d{i}/sub"));
        fs::create_dir_all(&dir).unwrap();
        for j in 0..files_n {
            fs::write(
                d.backing.join(format!("tree/d{i}/f{j}")),
                format!("{i}/{j}\n"),
            )
            .unwrap();
            fs::write(dir.join(format!("g{j}")), b"x").unwrap();
        }
    }
    fs::write(d.backing.join("keep.txt"), b"keep\n").unwrap();
    let files = dirs_n * files_n * 2;
    let dirs_total = dirs_n * 2 + 1;
    let before = fingerprint(&d.backing);
    assert_eq!(before.len(), 1 + 1 + files + dirs_total);

    let m = d.mount();
    run(Command::new("rm").arg("-rf").arg(d.mnt.join("tree")));
    assert!(!d.mnt.join("tree").exists(), "tree still on the mount");
    assert_eq!(
        fs::read_dir(&d.mnt)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect::<Vec<_>>(),
        vec!["keep.txt"]
    );
    assert_untouched(&d.backing, &before, "after rm -rf on the mount");
    let st = status(&d.store);
    let changes = (files + dirs_total) as u64;
    assert_eq!(
        status_summary(&st),
        format!(
            "last_seq={changes} committed_upto=0 pending_changes={changes} files={changes} data_bytes=0 interrupted_commit=null mounted=true"
        )
    );
    let log = log_json(&d.store, 0);
    let count = |op: &str| {
        log.iter()
            .filter(|l| l.split(' ').nth(1) == Some(op))
            .count()
    };
    assert_eq!(
        (count("unlink"), count("rmdir"), log.len()),
        (files, dirs_total, changes as usize)
    );
    assert_eq!(log.last().unwrap(), &format!("{changes} rmdir tree"));

    commit(&d.store, None);
    assert!(
        !d.backing.join("tree").exists(),
        "tree still in backing after commit"
    );
    assert_eq!(read(&d.backing.join("keep.txt")), b"keep\n");
    assert!(
        !d.mnt.join("tree").exists(),
        "tree back on the mount after commit"
    );
    let before_commit = st;
    let st = status(&d.store);
    assert_eq!(
        status_summary(&st),
        format!(
            "last_seq={changes} committed_upto={changes} pending_changes=0 files=0 data_bytes=0 interrupted_commit=null mounted=true"
        )
    );
    assert!(
        num(&st, "store_bytes") + 100_000 < num(&before_commit, "store_bytes"),
        "the store did not shrink by the committed journal: {before_commit:#} -> {st:#}"
    );
    m.stop();
}

/// Path, type, mode, size, mtime (ns) and contents of everything under `root`: what a
/// commit must make the same however often it was interrupted (not inode numbers or
/// ctimes, which a fresh run gives new ones).
fn committed_state(root: &Path) -> Vec<String> {
    let mut out: Vec<String> = walkdir(root)
        .into_iter()
        .chain([root.to_path_buf()])
        .map(|p| {
            let md = fs::symlink_metadata(&p).unwrap();
            let what = if md.is_file() {
                let mut h = std::hash::DefaultHasher::new();
                h.write(&read(&p));
                format!("{:016x}", h.finish())
            } else {
                String::new()
            };
            format!(
                "/{} mode={:o} size={} mtime={}.{:09} {what}",
                p.strip_prefix(root).unwrap().display(),
                md.mode(),
                if md.is_dir() { 0 } else { md.size() },
                md.mtime(),
                md.mtime_nsec()
            )
        })
        .collect();
    out.sort();
    out
}

/// Runs `interpose isolation commit STORE` under strace, tracing `call` and, with
/// `kill_at`, killing it with SIGKILL at that call's n-th use: whether it was killed, and
/// how many times it made the call.
fn commit_traced(store: &Path, call: &str, kill_at: Option<u64>, trace: &Path) -> (bool, usize) {
    let mut cmd = Command::new("strace");
    cmd.args(["-f", "-qq", "-o"])
        .arg(trace)
        .arg(format!("--trace={call}"));
    if let Some(n) = kill_at {
        cmd.arg(format!("--inject={call}:signal=KILL:when={n}"));
    }
    let out = output(cmd.args(["--", bin(), "isolation", "commit"]).arg(store));
    let killed = out.status.signal() == Some(libc::SIGKILL);
    assert!(
        killed || (out.status.success() && kill_at.is_none()),
        "commit (kill at {call} {kill_at:?}): {}",
        describe(&out)
    );
    let calls = fs::read_to_string(trace)
        .unwrap()
        .lines()
        .filter(|l| l.contains(&format!("{call}(")))
        .count();
    (killed, calls)
}

#[test]
fn a_removed_tree_is_committed_with_few_syncs_and_resumes_after_a_kill_at_any_removal() {
    // The commit fences a change that removes or moves a name with a sync of BACKING
    // before and after it. A run of removals (rm -rf) is fenced once as a whole: run again,
    // each removal finds its name, or its directory, gone. Changes before and after the
    // run (a file written, a rename) keep their fences.
    let d = dirs();
    for i in 0..4 {
        fs::create_dir_all(d.backing.join(format!("tree/d{i}/sub"))).unwrap();
        for j in 0..10 {
            fs::write(
                d.backing.join(format!("tree/d{i}/f{j}")),
                format!("{i}/{j}"),
            )
            .unwrap();
        }
        for j in 0..3 {
            fs::write(d.backing.join(format!("tree/d{i}/sub/g{j}")), b"g").unwrap();
        }
    }
    fs::write(d.backing.join("keep.txt"), b"keep\n").unwrap();
    let removals = 4 * (10 + 3) + 4 * 2 + 1;
    let m = d.mount();
    fs::write(d.mnt.join("before.txt"), b"before\n").unwrap();
    run(Command::new("rm").arg("-rf").arg(d.mnt.join("tree")));
    fs::write(d.mnt.join("after.txt"), b"after\n").unwrap();
    fs::rename(d.mnt.join("keep.txt"), d.mnt.join("kept.txt")).unwrap();
    let shown = committed_state(&d.mnt);
    m.stop();

    let pristine = d.tmp.path().join("pristine");
    fs::create_dir(&pristine).unwrap();
    // Contents only: the store knows BACKING by its inode, which must stay.
    let copy = |from: &Path, to: &Path| {
        if to.exists() {
            for e in fs::read_dir(to).unwrap() {
                let p = e.unwrap().path();
                match fs::symlink_metadata(&p).unwrap().is_dir() {
                    true => fs::remove_dir_all(&p).unwrap(),
                    false => fs::remove_file(&p).unwrap(),
                }
            }
        }
        run(Command::new("cp").arg("-a").arg(from.join(".")).arg(to));
    };
    copy(&d.backing, &pristine.join("backing"));
    copy(&d.store, &pristine.join("store"));
    let restore = || {
        copy(&pristine.join("backing"), &d.backing);
        copy(&pristine.join("store"), &d.store);
    };
    let trace = d.tmp.path().join("strace.out");

    let (_, syncs) = commit_traced(&d.store, "syncfs", None, &trace);
    // Fences: before the run (before.txt was written), after it, before and after the
    // rename, and the last one. One per removal would be over 60.
    assert_eq!(
        syncs, 5,
        "syncs of BACKING to commit {removals} removals and 4 other changes"
    );
    let want = committed_state(&d.backing);
    assert_same(
        "BACKING after the commit",
        "the mount showed",
        &shown,
        "BACKING",
        &want,
    );

    // Killed at removals throughout the run (rm -rf removes a directory's files, then
    // the directory: the 14th removal is the first rmdir, so later kills replay removals
    // whose directory is gone), then run again. (The n-th `unlinkat` is the n-th removal
    // because the store removes its own files with `unlink`, a call of its own on x86_64.)
    for k in [1, 2, 13, 14, 15, 30, removals - 1, removals] {
        restore();
        let (killed, _) = commit_traced(&d.store, "unlinkat", Some(k), &trace);
        assert!(killed, "the commit ended before its removal {k}");
        let st = status(&d.store);
        assert!(
            st["interrupted_commit"].as_u64().is_some(),
            "after a kill at removal {k}: {st:#}"
        );
        commit(&d.store, None);
        assert_same(
            &format!("BACKING after a commit killed at removal {k}, run again"),
            "uninterrupted",
            &want,
            "resumed",
            &committed_state(&d.backing),
        );
    }

    // A discard may not throw away removals a killed commit may have made already: only
    // from the end of their run on.
    restore();
    let run_end: u64 = log_json(&d.store, 0)
        .iter()
        .find_map(|l| l.strip_suffix(" rmdir tree"))
        .and_then(|seq| seq.parse().ok())
        .expect("the rmdir of tree in the log");
    let (killed, _) = commit_traced(&d.store, "unlinkat", Some(30), &trace);
    assert!(killed, "the commit ended before its removal 30");
    let applied = status(&d.store)["interrupted_commit_applied"]
        .as_u64()
        .expect("an interrupted commit");
    assert!(
        applied < run_end,
        "applied {applied}, the run ends at {run_end}"
    );
    let err = iso_fails("discard", &d.store, &["--after", &applied.to_string()]);
    assert!(
        err.contains("was removing names") && err.contains(&format!("--after {run_end} or later")),
        "discard --after {applied} in the middle of a killed commit's removals: {err}"
    );
    discard(&d.store, Some(run_end));
    commit(&d.store, None);
    assert_eq!(
        names(&d.backing),
        ["before.txt", "keep.txt"],
        "BACKING after the removals were committed and the rest discarded"
    );
}

/// A killed commit may have applied changes after the last it recorded, up to its next
/// fence (before a rename): a discard may not throw those away (BACKING may hold them,
/// and a mount replaying them over BACKING found their names taken), only the changes
/// after them. The commit stays, its target down to them; a mount finishes it.
#[test]
fn a_discard_keeps_what_a_killed_commit_may_have_applied() {
    let d = dirs();
    let m = d.mount();
    for i in 1..=3 {
        fs::write(d.mnt.join(format!("f{i}")), format!("file {i}\n")).unwrap();
    }
    fs::rename(d.mnt.join("f1"), d.mnt.join("g1")).unwrap(); // change 7
    for i in 4..=5 {
        fs::write(d.mnt.join(format!("f{i}")), format!("file {i}\n")).unwrap();
    }
    m.stop();
    let trace = d.tmp.path().join("strace.out");
    // Killed at its fourth write (the first is the journal's sync mark as it opens it, the
    // second its state), f2's data: f1 is in BACKING, and f2, empty; neither is recorded.
    let (killed, _) = commit_traced(&d.store, "pwrite64", Some(4), &trace);
    assert!(killed, "the commit ended before its fourth write");
    assert_eq!(read(&d.backing.join("f1")), b"file 1\n");
    let st = status(&d.store);
    assert_eq!(st["interrupted_commit_applied"], 0, "{st:#}");
    assert!(st.get("interrupted_commit_stopped").is_none(), "{st:#}");
    for after in ["0", "3", "5"] {
        let err = iso_fails("discard", &d.store, &["--after", after]);
        assert!(
            err.contains("may have made some") && err.contains("--after 6 or later"),
            "discard --after {after} after a killed commit: {err}"
        );
    }
    discard(&d.store, Some(6));
    let st = status(&d.store);
    assert_eq!(st["interrupted_commit"], 6, "{st:#}");
    let m = d.mount();
    assert_eq!(names(&d.mnt), ["f1", "f2", "f3"]);
    m.stop();
    assert_eq!(names(&d.backing), ["f1", "f2", "f3"]);
    for i in 1..=3 {
        assert_eq!(
            read(&d.backing.join(format!("f{i}"))),
            format!("file {i}\n").as_bytes()
        );
    }
    assert_eq!(
        status_summary(&status(&d.store)),
        "last_seq=6 committed_upto=6 pending_changes=0 files=0 data_bytes=0 interrupted_commit=null mounted=false"
    );
}

/// Files f1..=fN ("file I\n") written through a mount, then an unmounted commit killed at
/// the `at`-th use of `call`.
fn small_files_then_a_commit_killed(d: &Dirs, files: u32, call: &str, at: u64) {
    let m = d.mount();
    for i in 1..=files {
        fs::write(d.mnt.join(format!("f{i}")), format!("file {i}\n")).unwrap();
    }
    m.stop();
    let trace = d.tmp.path().join("strace.out");
    let (killed, _) = commit_traced(&d.store, call, Some(at), &trace);
    assert!(killed, "the commit ended before its {call} number {at}");
}

/// Damage to a record that an interrupted commit still has to apply cannot be cut off by
/// a discard (it would be refused): the refusal says so instead of naming one.
#[test]
fn damage_an_interrupted_commit_reaches_is_refused_without_naming_a_discard() {
    let d = dirs();
    small_files_then_a_commit_killed(&d, 4, "pwrite64", 3);
    let jpath = d.store.join("journal");
    let mut j = read(&jpath);
    let recs = journal_records(&j);
    assert_eq!(recs.len(), 8, "create + data for each of 4 files");
    let (off, _, data_off, _) = recs[5]; // f3's data, with f4's records after it
    j[data_off + 2] ^= 0x40;
    fs::write(&jpath, &j).unwrap();
    let err = iso_fails("status", &d.store, &[]);
    assert!(
        err.contains(&format!("offset {off} (seq 6)"))
            && err.contains("interrupted commit up to change 8")
            && !err.contains("isolation discard"),
        "status of a damaged store with an interrupted commit over the damage:\n{err}"
    );
    let err = iso_fails("discard", &d.store, &["--after", "5"]);
    assert!(
        err.contains(&format!("offset {off}")) && err.contains("interrupted commit up to change 8"),
        "{err}"
    );
    assert_eq!(read(&jpath), j, "the damaged journal was changed");
    let left: Vec<_> = fs::read_dir(&d.store)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("journal.cut"))
        .collect();
    assert!(left.is_empty(), "a refused discard left {left:?}");
}

const MAKEFILE: &str = "CC = gcc
CFLAGS = -O0 -Wall -Werror
app: main.o greet.o
\t$(CC) -o app main.o greet.o
%.o: %.c greet.h
\t$(CC) $(CFLAGS) -c -o $@ $<
";

#[test]
fn make_and_gcc_build_on_an_isolated_mount_then_commit() {
    let d = dirs();
    let proj = d.backing.join("proj");
    fs::create_dir(&proj).unwrap();
    fs::write(proj.join("Makefile"), MAKEFILE).unwrap();
    fs::write(proj.join("greet.h"), "const char *greet(void);\n").unwrap();
    fs::write(
        proj.join("main.c"),
        "#include <stdio.h>\n#include \"greet.h\"\nint main(void) { printf(\"%s\\n\", greet()); return 0; }\n",
    )
    .unwrap();
    fs::write(
        proj.join("greet.c"),
        "#include \"greet.h\"\nconst char *greet(void) { return \"hello, version 1\"; }\n",
    )
    .unwrap();
    let before = fingerprint(&d.backing);

    let m = d.mount();
    let mproj = d.mnt.join("proj");
    let out = run(Command::new("make")
        .arg("--no-print-directory")
        .current_dir(&mproj));
    assert!(out.contains("main.c") && out.contains("greet.c"), "{out}");
    assert_eq!(
        run(&mut Command::new(mproj.join("app"))),
        "hello, version 1\n"
    );
    // Edit a source through the mount: make rebuilds only what depends on it.
    fs::write(
        mproj.join("greet.c"),
        "#include \"greet.h\"\nconst char *greet(void) { return \"hello, version 2\"; }\n",
    )
    .unwrap();
    let out = run(Command::new("make")
        .arg("--no-print-directory")
        .current_dir(&mproj));
    assert!(
        out.contains("greet.c") && !out.contains("main.c"),
        "second make:\n{out}"
    );
    assert_eq!(
        run(&mut Command::new(mproj.join("app"))),
        "hello, version 2\n"
    );
    let out = run(Command::new("make")
        .arg("--no-print-directory")
        .current_dir(&mproj));
    assert!(out.contains("is up to date"), "third make:\n{out}");
    assert_untouched(&d.backing, &before, "after the build on the mount");
    assert!(!proj.join("app").exists());

    let view = manifest(&d.mnt, NO_MTIME);
    commit(&d.store, None);
    assert_same(
        "the build after commit",
        "the view before commit",
        &view,
        "backing",
        &manifest(&d.backing, NO_MTIME),
    );
    m.stop();
    assert_eq!(
        run(&mut Command::new(proj.join("app"))),
        "hello, version 2\n"
    );
    assert_eq!(mode_of(&proj.join("app")) & 0o111, 0o111);
}

// ---------------------------------------------------------------------------------------
// Sparse files

fn seek_report(file: &Path, offsets: &[u64]) -> Value {
    let out = run(Command::new(python())
        .arg(script("iso_seek.py"))
        .arg(file)
        .args(offsets.iter().map(u64::to_string)));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("iso_seek.py: {e}:\n{out}"))
}

fn regions_of(v: &Value) -> Vec<(u64, u64)> {
    v["regions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r[0].as_u64().unwrap(), r[1].as_u64().unwrap()))
        .collect()
}

/// Adds [a, b) to sorted, disjoint regions, merging.
fn with_region(mut rs: Vec<(u64, u64)>, a: u64, b: u64) -> Vec<(u64, u64)> {
    rs.push((a, b));
    rs.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (x, y) in rs {
        match out.last_mut() {
            Some(last) if x <= last.1 => last.1 = last.1.max(y),
            _ => out.push((x, y)),
        }
    }
    out
}

/// What SEEK_DATA and SEEK_HOLE from each offset answer for a file of `size` bytes with
/// data in `regions`, as iso_seek.py reports it.
fn expected_probes(regions: &[(u64, u64)], size: u64, offsets: &[u64]) -> Value {
    let mut out = serde_json::Map::new();
    for &o in offsets {
        let answer = if o >= size {
            serde_json::json!(["ENXIO", "ENXIO"])
        } else {
            let data = regions
                .iter()
                .find(|r| r.1 > o)
                .map(|r| serde_json::json!(r.0.max(o)))
                .unwrap_or_else(|| serde_json::json!("ENXIO"));
            let hole = match regions.iter().find(|r| r.0 <= o && o < r.1) {
                Some(r) => r.1,
                None => o,
            };
            serde_json::json!([data, hole])
        };
        out.insert(o.to_string(), answer);
    }
    Value::Object(out)
}

/// Removes [a, b) from sorted, disjoint regions.
fn without_region(rs: Vec<(u64, u64)>, a: u64, b: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for (x, y) in rs {
        if x < a {
            out.push((x, y.min(a)));
        }
        if y > b {
            out.push((x.max(b), y));
        }
    }
    out
}

fn read_at(p: &Path, off: u64, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    File::open(p).unwrap().read_exact_at(&mut b, off).unwrap();
    b
}

/// A write-only open of an isolated file goes around the kernel's page cache: what it
/// writes leaves no cached pages behind (it used to be copied into pages first, which
/// made cp or dd onto the mount several times slower), and a reader that has the file
/// open with cached pages sees each of its writes at once.
#[test]
fn write_only_opens_bypass_the_page_cache_and_readers_see_their_writes() {
    let d = dirs();
    fs::write(d.backing.join("f"), pattern(64 << 10, 1)).unwrap();
    let m = d.mount();
    let write_only = |p: &Path| {
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(p)
            .unwrap()
    };
    let g = d.mnt.join("g");
    let data = pattern(4 << 20, 2);
    {
        let w = write_only(&g);
        w.write_all_at(&data, 0).unwrap();
        w.sync_all().unwrap();
    }
    assert_eq!(resident_pages(&g), 0, "pages cached by a write-only open");
    assert!(read(&g) == data, "what the write-only open wrote");
    // A changed file (served by the daemon, cached) read while a writer writes it.
    let f = d.mnt.join("f");
    write_only(&f).write_all_at(b"first", 0).unwrap();
    let reader = File::open(&f).unwrap();
    let mut buf = vec![0u8; 64 << 10];
    reader.read_exact_at(&mut buf, 0).unwrap();
    assert!(
        resident_pages(&f) > 0,
        "the reader's pages are not cached: no test"
    );
    let w = write_only(&f);
    for (at, what) in [
        (0u64, &b"AAAA"[..]),
        (4096 + 10, b"BBBB"),
        (60 << 10, b"CCCC"),
    ] {
        w.write_all_at(what, at).unwrap();
        let mut got = vec![0u8; what.len()];
        reader.read_exact_at(&mut got, at).unwrap();
        assert_eq!(got, what, "the reader after a write at {at}");
    }
    drop((reader, w));
    m.stop();
}

/// A file of BACKING whose last block is partial, grown through the mount: its data
/// regions are those the same growth gives on the backing file system (data to the end of
/// that block), before the commit and after it. The view used to put a hole right after
/// the old size.
#[test]
fn a_grown_file_has_the_data_regions_of_the_same_file_grown_natively() {
    let d = dirs();
    let native = plain_dir("interpose-test-grown-");
    for dir in [&d.backing, &native.path().to_path_buf()] {
        fs::write(dir.join("f"), pattern(5000, 4)).unwrap();
        fs::write(dir.join("g"), pattern(4096, 5)).unwrap();
    }
    let grow = |dir: &Path| {
        for (name, size) in [("f", 1 << 20), ("g", 3 * 4096)] {
            OpenOptions::new()
                .write(true)
                .open(dir.join(name))
                .unwrap()
                .set_len(size)
                .unwrap();
        }
    };
    grow(native.path());
    let m = d.mount();
    grow(&d.mnt);
    let offsets = [0, 4999, 5000, 8191, 8192, 4096, 4097];
    for name in ["f", "g"] {
        let want = seek_report(&native.path().join(name), &offsets);
        let got = seek_report(&d.mnt.join(name), &offsets);
        assert_eq!(
            got, want,
            "{name} on the mount against the same growth natively"
        );
    }
    iso("commit", &d.store, &[]);
    for name in ["f", "g"] {
        let want = seek_report(&native.path().join(name), &offsets);
        let got = seek_report(&d.mnt.join(name), &offsets);
        assert_eq!(got, want, "{name} on the mount after the commit");
    }
    m.stop();
}

/// st_blocks of an isolated file counts the blocks the store holds for it (in 512-byte
/// units) plus what still shows through from BACKING, through writes, overwrites and
/// truncation.
#[test]
fn st_blocks_of_an_isolated_file_follows_its_stored_blocks() {
    let d = dirs();
    fs::write(d.backing.join("old"), pattern(3 * 4096, 9)).unwrap();
    let m = d.mount();
    let blocks = |name: &str| fs::metadata(d.mnt.join(name)).unwrap().blocks();
    let new = d.mnt.join("new");
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&new)
        .unwrap();
    f.write_all_at(&pattern(3 * 4096, 1), 0).unwrap();
    assert_eq!(blocks("new"), 3 * 8, "three blocks written");
    f.write_all_at(&pattern(4096, 2), 4096).unwrap();
    assert_eq!(blocks("new"), 3 * 8, "one of them written again");
    f.write_all_at(b"x", 10 * 4096 + 5).unwrap();
    assert_eq!(blocks("new"), 4 * 8, "one more, after a hole");
    f.set_len(2 * 4096 + 100).unwrap();
    assert_eq!(
        blocks("new"),
        3 * 8,
        "cut to three blocks (the last one partly)"
    );
    f.set_len(4096).unwrap();
    assert_eq!(blocks("new"), 8, "cut to one block");
    f.set_len(0).unwrap();
    assert_eq!(blocks("new"), 0, "empty");
    drop(f);
    // A file from BACKING: its 3 blocks show through until written over or cut.
    assert_eq!(blocks("old"), 3 * 8);
    let f = OpenOptions::new()
        .write(true)
        .open(d.mnt.join("old"))
        .unwrap();
    f.write_all_at(&pattern(4096, 3), 0).unwrap();
    assert_eq!(
        blocks("old"),
        3 * 8,
        "one block written over: three, as before"
    );
    f.set_len(0).unwrap();
    assert_eq!(blocks("old"), 0, "nothing stored nor showing through");
    drop(f);
    // A short file of BACKING takes a whole block; a block allocated past a hole counts
    // (ext4 says 16 after this: the file's block and the allocated one).
    fs::write(d.backing.join("short"), b"twenty bytes of text").unwrap();
    let f = OpenOptions::new()
        .write(true)
        .open(d.mnt.join("short"))
        .unwrap();
    // SAFETY: fallocate only reads its integer arguments; the descriptor is open.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 2 * 4096, 4096) };
    assert_eq!(r, 0, "fallocate: {}", std::io::Error::last_os_error());
    assert_eq!(blocks("short"), 2 * 8, "its block and the allocated one");
    drop(f);
    // A sparse file from BACKING stays sparse with a byte written into it, so that cp
    // copies its data only (it copies every zero of a file whose st_blocks says dense).
    let sparse = File::create(d.backing.join("sparse")).unwrap();
    sparse.set_len(256 << 20).unwrap();
    let f = OpenOptions::new()
        .write(true)
        .open(d.mnt.join("sparse"))
        .unwrap();
    f.write_all_at(b"x", 100 << 20).unwrap();
    drop(f);
    assert_eq!(
        blocks("sparse"),
        8,
        "one block written into 256 MiB of hole"
    );
    let before = num(&status(&d.store), "data_bytes");
    run(Command::new("cp")
        .arg(d.mnt.join("sparse"))
        .arg(d.mnt.join("copy")));
    let stored = num(&status(&d.store), "data_bytes") - before;
    assert!(
        stored <= 64 << 10,
        "cp of the sparse file stored {stored} bytes: it copied zeros"
    );
    m.stop();
}

#[test]
fn one_byte_written_into_a_10_gib_sparse_file_costs_one_block() {
    const SIZE: u64 = 10 << 30;
    const AT: u64 = 5_000_000_000;
    const HIGH: u64 = 8 << 30;
    let block = AT / 4096 * 4096;
    let d = dirs();
    let big = d.backing.join("big");
    let f = File::create(&big).unwrap();
    f.set_len(SIZE).unwrap();
    f.write_all_at(&pattern(4096, 1), 0).unwrap();
    f.write_all_at(&pattern(4096, 2), HIGH).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let probes = [
        0,
        4096,
        block - 1,
        AT,
        block + 4096,
        HIGH - 1,
        HIGH,
        SIZE - 1,
        SIZE,
        SIZE + 4096,
    ];
    let backing_seek = seek_report(&big, &probes);
    let backing_regions = regions_of(&backing_seek);
    assert_eq!(backing_regions.first().map(|r| r.0), Some(0));
    assert!(
        backing_regions
            .iter()
            .all(|r| r.1 <= block || r.0 >= block + 4096),
        "the backing file has data near {AT}: {backing_regions:?}"
    );
    let before = fingerprint(&d.backing);

    let m = d.mount();
    let mbig = d.mnt.join("big");
    assert_eq!(
        seek_report(&mbig, &probes),
        backing_seek,
        "SEEK_DATA/SEEK_HOLE through the mount before the write"
    );
    let s0 = status(&d.store);
    let f = OpenOptions::new().write(true).open(&mbig).unwrap();
    f.write_all_at(&[0xAB], AT).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let s1 = status(&d.store);
    let data_growth = num(&s1, "data_bytes") - num(&s0, "data_bytes");
    // The fsync wrote zeros ahead of the journal (bounded, whatever was written; see
    // docs/ISOLATION.md); the rest is what the write added.
    let ahead = num(&s1, "journal_ahead_bytes");
    assert!(ahead <= (1280 << 10) + 4096, "{s1:#}");
    let store_growth = (num(&s1, "store_bytes") - ahead)
        .saturating_sub(num(&s0, "store_bytes") - num(&s0, "journal_ahead_bytes"));
    assert!(
        (1..=2 * 4096).contains(&data_growth),
        "data_bytes grew by {data_growth} for a one-byte write: {s0:#} -> {s1:#}"
    );
    assert!(
        store_growth <= 4 * 4096,
        "store_bytes grew by {store_growth} for a one-byte write: {s0:#} -> {s1:#}"
    );
    assert_eq!(fs::metadata(&mbig).unwrap().len(), SIZE);

    let mut around = [0u8; 3];
    File::open(&mbig)
        .unwrap()
        .read_exact_at(&mut around, AT - 1)
        .unwrap();
    assert_eq!(around, [0, 0xAB, 0], "bytes around the write, read back");
    let want_regions = with_region(backing_regions.clone(), block, block + 4096);
    let after = seek_report(&mbig, &probes);
    assert_eq!(
        regions_of(&after),
        want_regions,
        "data regions through the mount"
    );
    assert_eq!(after["bytes"][AT.to_string()], 0xAB);
    assert_eq!(after["bytes"][(SIZE - 1).to_string()], 0);
    assert_eq!(
        after["probes"][(block - 1).to_string()],
        serde_json::json!([block, block - 1]),
        "SEEK_DATA/SEEK_HOLE just before the written block"
    );
    assert_eq!(
        after["probes"],
        expected_probes(&want_regions, SIZE, &probes),
        "SEEK_DATA/SEEK_HOLE probes through the mount after the write"
    );
    assert_eq!(
        after["probes"][AT.to_string()],
        serde_json::json!([AT, block + 4096]),
        "SEEK_DATA/SEEK_HOLE inside the written block"
    );
    assert_untouched(&d.backing, &before, "after a write into the sparse file");

    // A hole punched where the backing file has data, and a new sparse file.
    let f = OpenOptions::new().write(true).open(&mbig).unwrap();
    // SAFETY: fallocate(2) on a descriptor we own.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            4096,
        )
    };
    assert_eq!(
        rc,
        0,
        "punching a hole: {}",
        std::io::Error::last_os_error()
    );
    drop(f);
    let want_regions = without_region(want_regions, 0, 4096);
    let punched = seek_report(&mbig, &probes);
    assert_eq!(
        regions_of(&punched),
        want_regions,
        "data regions through the mount after punching out the first block"
    );
    assert_eq!(
        punched["probes"],
        expected_probes(&want_regions, SIZE, &probes),
        "SEEK_DATA/SEEK_HOLE probes through the mount after punching a hole"
    );
    assert_eq!(read_at(&mbig, 0, 4096), vec![0; 4096]);
    assert_eq!(read_at(&mbig, HIGH, 4096), pattern(4096, 2));
    const FRESH_AT: u64 = (100 << 20) + 10;
    let fresh = d.mnt.join("fresh");
    let f = File::create(&fresh).unwrap();
    f.set_len(1 << 30).unwrap();
    f.write_all_at(b"fresh", FRESH_AT).unwrap();
    drop(f);
    let fresh_regions = vec![(100 << 20, (100 << 20) + 4096)];
    assert_eq!(
        regions_of(&seek_report(&fresh, &[])),
        fresh_regions,
        "data regions of a new sparse file through the mount"
    );
    assert_untouched(&d.backing, &before, "after punching a hole");

    commit(&d.store, None);
    m.stop();
    let committed = seek_report(&d.backing.join("fresh"), &[FRESH_AT]);
    assert_eq!(committed["size"], 1u64 << 30);
    assert_eq!(committed["bytes"][FRESH_AT.to_string()], b'f');
    assert_eq!(
        regions_of(&committed),
        fresh_regions,
        "data regions of the committed new file"
    );
    let committed = seek_report(&big, &probes);
    assert_eq!(committed["bytes"][AT.to_string()], 0xAB);
    assert_eq!(committed["size"], SIZE);
    assert_eq!(
        regions_of(&committed),
        want_regions,
        "data regions of the committed file"
    );
    assert_eq!(
        committed["probes"],
        expected_probes(&want_regions, SIZE, &probes),
        "SEEK_DATA/SEEK_HOLE probes of the committed file"
    );
    let blocks = fs::metadata(&big).unwrap().blocks() * 512;
    assert!(
        blocks < 1 << 20,
        "the committed file takes {blocks} bytes: no longer sparse"
    );
    let st = status(&d.store);
    assert_eq!(num(&st, "data_bytes"), 0, "{st:#}");
}

/// The daemon's peak resident memory in KiB (VmHWM of /proc/PID/status).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Block maps are extents: 80 GiB allocated, a hole punched in the middle and a byte
/// written cost the daemon a few entries, not one per 4 KiB block (20 million of them
/// would be well over a GiB), and SEEK_DATA/SEEK_HOLE step over them at once.
#[test]
fn eighty_gib_allocated_and_punched_costs_a_few_extents() {
    const SIZE: u64 = 80 << 30;
    const HOLE: (u64, u64) = (20 << 30, 40 << 30);
    const AT: u64 = (60 << 30) + 5;
    let d = dirs();
    let m = d.mount();
    let big = d.mnt.join("big");
    let f = File::create(&big).unwrap();
    for (mode, off, len) in [
        (0, 0, SIZE),
        (
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            HOLE.0,
            HOLE.1 - HOLE.0,
        ),
    ] {
        // SAFETY: fallocate(2) on a descriptor we own.
        let rc = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) };
        assert_eq!(
            rc,
            0,
            "fallocate mode {mode:#x}: {}",
            std::io::Error::last_os_error()
        );
    }
    f.write_all_at(b"x", AT).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let probes = [0, HOLE.0 - 1, HOLE.0, HOLE.1 - 1, HOLE.1, AT, SIZE - 1];
    let report = seek_report(&big, &probes);
    let want = vec![(0, HOLE.0), (HOLE.1, SIZE)];
    assert_eq!(regions_of(&report), want, "data regions through the mount");
    assert_eq!(report["probes"], expected_probes(&want, SIZE, &probes));
    assert_eq!(read_at(&big, AT - 1, 3), [0, b'x', 0]);
    let peak = peak_rss_kib(m.pid());
    assert!(
        peak < 64 << 10,
        "the daemon peaked at {peak} KiB holding the block map of an 80 GiB file"
    );
    let st = status(&d.store);
    assert!(num(&st, "data_bytes") <= 2 * 4096, "{st:#}");
    m.stop();
}

// ---------------------------------------------------------------------------------------
// Status, log, commit --upto, discard --after

/// The backing tree the known sequence starts from.
fn known_backing(backing: &Path) {
    fs::write(backing.join("a.txt"), b"alpha\n").unwrap();
    fs::create_dir(backing.join("keep")).unwrap();
    fs::write(backing.join("keep/k"), b"kay\n").unwrap();
    fs::write(backing.join("keep/other"), b"other, as in backing\n").unwrap();
    fs::write(backing.join("gone.txt"), b"gone\n").unwrap();
}

/// What the known sequence records, as [`log_json`] shows it.
const KNOWN_LOG: &[&str] = &[
    "1 create n1 kind=file",
    "2 data n1 size=4 bytes=4096",
    "3 data a.txt size=0 bytes=0",
    "4 data a.txt size=14 bytes=4096",
    "5 create d kind=dir",
    "6 rename n1 -> d/n1",
    "7 unlink keep/k",
    "8 setattr a.txt",
    "9 setxattr d",
    "10 create d/link kind=symlink",
    "11 link a.txt -> d/a-link",
    "12 data keep/other size=0 bytes=0",
    "13 data keep/other size=8 bytes=4096",
    "14 unlink gone.txt",
    "15 create n2 kind=file",
    "16 data n2 size=4 bytes=4096",
    "17 setattr keep",
];

/// The same, as the text log shows it.
const KNOWN_TEXT_LOG: &[&str] = &[
    "1 create /n1",
    "2 data /n1 (size 4, 4096 bytes of blocks)",
    "3 data /a.txt (size 0, 0 bytes of blocks)",
    "4 data /a.txt (size 14, 4096 bytes of blocks)",
    "5 mkdir /d",
    "6 rename /n1 -> /d/n1",
    "7 unlink /keep/k",
    "8 setattr /a.txt",
    "9 setxattr /d",
    "10 symlink /d/link",
    "11 link /a.txt -> /d/a-link",
    "12 data /keep/other (size 0, 0 bytes of blocks)",
    "13 data /keep/other (size 8, 4096 bytes of blocks)",
    "14 unlink /gone.txt",
    "15 create /n2",
    "16 data /n2 (size 4, 4096 bytes of blocks)",
    "17 setattr /keep",
];

/// The views after changes 6 and 9 and 17 (manifests without mtimes).
struct Snapshots {
    at6: Vec<String>,
    at9: Vec<String>,
    at17: Vec<String>,
}

/// Makes the 17 changes of [`KNOWN_LOG`] through `mnt`, checking the sequence number after
/// each step, and reads some files (so the kernel caches them).
fn known_sequence(mnt: &Path, store: &Path) -> Snapshots {
    let last = || num(&status(store), "last_seq");
    fs::write(mnt.join("n1"), b"one\n").unwrap();
    assert_eq!(last(), 2);
    fs::write(mnt.join("a.txt"), b"ALPHA CHANGED\n").unwrap();
    assert_eq!(last(), 4);
    fs::create_dir(mnt.join("d")).unwrap();
    fs::rename(mnt.join("n1"), mnt.join("d/n1")).unwrap();
    assert_eq!(last(), 6);
    let at6 = manifest(mnt, NO_MTIME);
    fs::remove_file(mnt.join("keep/k")).unwrap();
    fs::set_permissions(mnt.join("a.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    set_xattr(&mnt.join("d"), "user.color", b"blue");
    assert_eq!(last(), 9);
    let at9 = manifest(mnt, NO_MTIME);
    symlink("../a.txt", mnt.join("d/link")).unwrap();
    fs::hard_link(mnt.join("a.txt"), mnt.join("d/a-link")).unwrap();
    fs::write(mnt.join("keep/other"), b"changed\n").unwrap();
    fs::remove_file(mnt.join("gone.txt")).unwrap();
    fs::write(mnt.join("n2"), b"two\n").unwrap();
    fs::set_permissions(mnt.join("keep"), fs::Permissions::from_mode(0o700)).unwrap();
    assert_eq!(last(), 17);
    let at17 = manifest(mnt, NO_MTIME);
    // Into the kernel's caches: contents, attributes, names and an absent name.
    assert_eq!(read(&mnt.join("keep/other")), b"changed\n");
    assert_eq!(read(&mnt.join("n2")), b"two\n");
    assert_eq!(read(&mnt.join("d/a-link")), b"ALPHA CHANGED\n");
    assert!(!mnt.join("gone.txt").exists());
    assert_eq!(fs::metadata(mnt.join("a.txt")).unwrap().nlink(), 2);
    Snapshots { at6, at9, at17 }
}

fn check_known_log_and_status(store: &Path, mounted: bool) {
    let want: Vec<String> = KNOWN_LOG.iter().map(|l| l.to_string()).collect();
    assert_same("log --json", "expected", &want, "got", &log_json(store, 0));
    assert_eq!(log_json(store, 0), want, "log --json order");
    assert_eq!(
        log_json(store, 14),
        want[14..].to_vec(),
        "log --json --since 14"
    );
    assert_eq!(log_json(store, 17), Vec::<String>::new(), "log --since 17");
    let text: Vec<String> = KNOWN_TEXT_LOG.iter().map(|l| l.to_string()).collect();
    assert_eq!(log_text(store, 0), text, "the text log");
    assert_eq!(
        log_text(store, 10),
        text[10..].to_vec(),
        "the text log --since 10"
    );
    // Paths with pending changes: n1 a.txt d keep/k d/link keep/other gone.txt n2 keep.
    let st = status(store);
    assert_eq!(
        status_summary(&st),
        format!(
            "last_seq=17 committed_upto=0 pending_changes=17 files=9 data_bytes=16384 interrupted_commit=null mounted={mounted}"
        )
    );
    assert!(num(&st, "store_bytes") >= 16384, "{st:#}");
}

/// After commit --upto 6 the backing directory is the view as it was after change 6.
fn check_backing_at6(backing: &Path, at6: &[String]) {
    assert_same(
        "commit --upto 6",
        "the view after change 6",
        at6,
        "backing",
        &manifest(backing, NO_MTIME),
    );
    assert_eq!(read(&backing.join("d/n1")), b"one\n");
    assert_eq!(read(&backing.join("a.txt")), b"ALPHA CHANGED\n");
    assert_eq!(mode_of(&backing.join("a.txt")), 0o644);
    assert_eq!(read(&backing.join("keep/k")), b"kay\n");
    assert!(!backing.join("n1").exists());
}

fn check_view_at9(mnt: &Path, at9: &[String]) {
    assert_eq!(
        read(&mnt.join("keep/other")),
        b"other, as in backing\n",
        "keep/other read right after discard (its changed contents were cached)"
    );
    assert_eq!(fs::metadata(mnt.join("keep/other")).unwrap().len(), 21);
    assert!(
        mnt.join("gone.txt").exists(),
        "gone.txt not back after discard"
    );
    assert_eq!(read(&mnt.join("gone.txt")), b"gone\n");
    assert!(!mnt.join("n2").exists(), "n2 still there after discard");
    assert!(
        fs::symlink_metadata(mnt.join("d/link")).is_err(),
        "d/link still there after discard"
    );
    assert!(
        !mnt.join("d/a-link").exists(),
        "d/a-link still there after discard"
    );
    assert_eq!(fs::metadata(mnt.join("a.txt")).unwrap().nlink(), 1);
    assert_eq!(mode_of(&mnt.join("keep")), 0o755);
    assert_eq!(mode_of(&mnt.join("a.txt")), 0o600);
    assert_eq!(read(&mnt.join("d/n1")), b"one\n");
    assert!(!mnt.join("keep/k").exists());
    assert_same(
        "discard --after 9",
        "the view after change 9",
        at9,
        "the view after discard",
        &manifest(mnt, NO_MTIME),
    );
}

#[test]
fn status_log_commit_upto_and_discard_after_on_a_mounted_store() {
    let d = dirs();
    known_backing(&d.backing);
    let before = fingerprint(&d.backing);
    let m = d.mount();
    let st = status(&d.store);
    assert_eq!(
        status_summary(&st),
        "last_seq=0 committed_upto=0 pending_changes=0 files=0 data_bytes=0 interrupted_commit=null mounted=true"
    );
    let err = iso_fails("commit", &d.store, &["--upto", "1"]);
    assert!(
        err.contains("sequence number 1 is out of range: nothing is pending (committed up to 0)"),
        "{err}"
    );
    let snaps = known_sequence(&d.mnt, &d.store);
    check_known_log_and_status(&d.store, true);
    assert_untouched(&d.backing, &before, "before commit");

    // Out of range: nothing happens.
    let range = "committed up to 0, pending 1..=17, so 0..=17";
    let err = iso_fails("commit", &d.store, &["--upto", "18"]);
    assert!(
        err.contains(&format!("18 is out of range: {range}")),
        "{err}"
    );
    let err = iso_fails("discard", &d.store, &["--after", "18"]);
    assert!(
        err.contains(&format!("18 is out of range: {range}")),
        "{err}"
    );
    assert_untouched(&d.backing, &before, "after refused commands");

    // Descriptors held across the commit and the discard (read-write: not passthrough).
    let rw = |p: &str| open_rw(&d.mnt.join(p));
    let (held_n1, held_other) = (rw("d/n1"), rw("keep/other"));
    let read_held = |f: &File| {
        let mut b = vec![0u8; 64];
        let n = f.read_at(&mut b, 0).unwrap();
        b.truncate(n);
        b
    };

    let out = commit(&d.store, Some(6));
    assert!(out.contains("11 changes pending"), "{out}");
    check_backing_at6(&d.backing, &snaps.at6);
    assert_eq!(
        read_held(&held_n1),
        b"one\n",
        "a descriptor of d/n1 held across its commit"
    );
    assert_eq!(
        read_held(&held_other),
        b"changed\n",
        "a descriptor held across the commit"
    );
    assert_same(
        "commit --upto 6",
        "the view before",
        &snaps.at17,
        "the view right after",
        &manifest(&d.mnt, NO_MTIME),
    );
    assert_eq!(read(&d.mnt.join("keep/other")), b"changed\n");
    let st = status(&d.store);
    assert_eq!(
        status_summary(&st),
        "last_seq=17 committed_upto=6 pending_changes=11 files=8 data_bytes=8192 interrupted_commit=null mounted=true"
    );
    let want: Vec<String> = KNOWN_LOG[6..].iter().map(|l| l.to_string()).collect();
    assert_eq!(log_json(&d.store, 0), want, "log after commit --upto 6");
    let err = iso_fails("discard", &d.store, &["--after", "5"]);
    assert!(
        err.contains("5 is out of range: committed up to 6, pending 7..=17, so 6..=17"),
        "{err}"
    );

    let out = discard(&d.store, Some(9));
    assert!(out.contains("3 changes pending"), "{out}");
    check_view_at9(&d.mnt, &snaps.at9);
    assert_eq!(
        read_held(&held_other),
        b"other, as in backing\n",
        "a descriptor of keep/other held across the discard of its changes"
    );
    assert_eq!(read_held(&held_n1), b"one\n");
    drop((held_n1, held_other));
    let st = status(&d.store);
    assert_eq!(
        status_summary(&st),
        "last_seq=9 committed_upto=6 pending_changes=3 files=3 data_bytes=0 interrupted_commit=null mounted=true"
    );
    check_backing_at6(&d.backing, &snaps.at6);

    // New changes continue the numbering after the discard.
    fs::write(d.mnt.join("n3"), b"three\n").unwrap();
    assert_eq!(
        log_json(&d.store, 9),
        vec!["10 create n3 kind=file", "11 data n3 size=6 bytes=4096"]
    );
    // Everything else, committed: backing is the view.
    let view = manifest(&d.mnt, NO_MTIME);
    commit(&d.store, None);
    assert_same(
        "commit of the rest",
        "the view",
        &view,
        "backing",
        &manifest(&d.backing, NO_MTIME),
    );
    assert_eq!(get_xattr(&d.backing.join("d"), "user.color"), b"blue");
    m.stop();
}

/// A commit gives BACKING the modification times the mount showed: those of when each
/// change was made, not of the commit (make compares them: a source edited after its
/// object was built must stay newer). Mounted, partly then wholly; the mount's own times
/// do not move either.
#[test]
fn a_commit_gives_backing_the_times_the_mount_showed() {
    let d = dirs();
    fs::create_dir(d.backing.join("src")).unwrap();
    fs::write(d.backing.join("src/old.c"), b"old\n").unwrap();
    fs::write(d.backing.join("src/gone.c"), b"gone\n").unwrap();
    let m = d.mount();
    let src = d.mnt.join("src");
    fs::write(src.join("main.c"), b"int main;\n").unwrap();
    fs::write(src.join("main.o"), b"object\n").unwrap();
    fs::create_dir(d.mnt.join("build")).unwrap();
    fs::write(src.join("old.c"), b"edited after the object\n").unwrap();
    fs::remove_file(src.join("gone.c")).unwrap();
    fs::rename(src.join("main.o"), d.mnt.join("build/main.o")).unwrap();
    std::os::unix::fs::symlink("../src/main.c", d.mnt.join("build/link")).unwrap();
    fs::hard_link(src.join("main.c"), d.mnt.join("build/hard.c")).unwrap();
    let view = manifest(&d.mnt, FULL);
    let last = num(&status(&d.store), "last_seq");
    // The log says when each change was made: here, the time the mount shows for old.c.
    let out = iso("log", &d.store, &["--json"]);
    let log: Value = serde_json::from_str(&out).unwrap();
    let edit = log
        .as_array()
        .unwrap()
        .iter()
        .rfind(|e| e["op"] == "data" && e["path"] == "src/old.c")
        .unwrap_or_else(|| panic!("no data change of src/old.c in {out}"));
    let shown = fs::metadata(src.join("old.c")).unwrap();
    assert_eq!(
        (edit["at"][0].as_i64(), edit["at"][1].as_i64()),
        (Some(shown.mtime()), Some(shown.mtime_nsec())),
        "log --json: the time of the last write of src/old.c"
    );
    commit(&d.store, Some(last / 2));
    assert_same(
        "a commit of half",
        "the mount before",
        &view,
        "the mount after",
        &manifest(&d.mnt, FULL),
    );
    commit(&d.store, None);
    assert_same(
        "the commit of the rest",
        "the mount before",
        &view,
        "the mount after",
        &manifest(&d.mnt, FULL),
    );
    m.stop();
    assert_same(
        "the commit of the rest",
        "the mount",
        &view,
        "backing",
        &manifest(&d.backing, FULL),
    );
    let mtime = |p: &str| fs::metadata(d.backing.join(p)).unwrap().modified().unwrap();
    assert!(
        mtime("src/old.c") > mtime("build/main.o"),
        "the source edited last is newer than the object in BACKING"
    );
}

/// "The view after commit is the view before it", modification times included, for the
/// objects whose changes stay pending; and a discard leaves the changes it keeps as they
/// were.
#[test]
fn a_mounted_commit_or_discard_keeps_the_times_of_pending_changes() {
    let d = dirs();
    fs::create_dir(d.backing.join("keep")).unwrap();
    fs::write(d.backing.join("keep/k"), b"k\n").unwrap();
    fs::write(d.backing.join("keep/other"), b"other\n").unwrap();
    let m = d.mount();
    fs::write(d.mnt.join("one"), b"1\n").unwrap();
    fs::write(d.mnt.join("two"), b"2\n").unwrap();
    fs::remove_file(d.mnt.join("keep/k")).unwrap();
    fs::write(d.mnt.join("keep/other"), b"changed\n").unwrap();
    assert_eq!(num(&status(&d.store), "last_seq"), 7);
    let pending = ["two", "keep", "keep/other"];
    let before = fresh_mtimes(&d.mnt, &pending);
    commit(&d.store, Some(2));
    let after = fresh_mtimes(&d.mnt, &pending);
    let kept = ["two", "keep"];
    let before_discard = fresh_mtimes(&d.mnt, &kept);
    discard(&d.store, Some(5));
    let after_discard = fresh_mtimes(&d.mnt, &kept);
    m.stop();
    assert_same(
        "mtimes of objects with pending changes, across a mounted commit --upto 2",
        "before",
        &before,
        "right after",
        &after,
    );
    assert_same(
        "mtimes of objects with kept changes, across a mounted discard --after 5",
        "before",
        &before_discard,
        "right after",
        &after_discard,
    );
}

/// Modification times of `paths` under `root`, asked of the file system itself
/// (AT_STATX_FORCE_SYNC: not from the kernel's attribute cache).
fn fresh_mtimes(root: &Path, paths: &[&str]) -> Vec<String> {
    use std::os::unix::ffi::OsStrExt;
    paths
        .iter()
        .map(|p| {
            let c = std::ffi::CString::new(root.join(p).as_os_str().as_bytes()).unwrap();
            // SAFETY: a zeroed statx is a valid buffer for statx(2) to fill.
            let mut st: libc::statx = unsafe { std::mem::zeroed() };
            // SAFETY: a NUL-terminated path and a buffer of the right type.
            let rc = unsafe {
                libc::statx(
                    libc::AT_FDCWD,
                    c.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW | libc::AT_STATX_FORCE_SYNC,
                    libc::STATX_MTIME,
                    &mut st,
                )
            };
            assert_eq!(rc, 0, "statx {p}: {}", std::io::Error::last_os_error());
            format!(
                "{p} mtime={}.{:09}",
                st.stx_mtime.tv_sec, st.stx_mtime.tv_nsec
            )
        })
        .collect()
}

fn get_xattr(p: &Path, name: &str) -> Vec<u8> {
    xattrs(p)
        .remove(name.as_bytes())
        .unwrap_or_else(|| panic!("no xattr {name} on {}", p.display()))
}

/// `isolation log STORE | head -1`: the reader goes away with most of the log unwritten,
/// and the log ends quietly and successfully (it used to say "Broken pipe" and fail).
#[test]
fn a_log_whose_reader_stops_early_ends_quietly() {
    let d = dirs();
    let m = d.mount();
    let made = output(
        Command::new("python3")
            .arg("-c")
            .arg("import sys\nfor i in range(3000): open(sys.argv[1] + '/f%d' % i, 'w').close()")
            .arg(&d.mnt),
    );
    assert!(made.status.success(), "{}", describe(&made));
    m.stop();
    for json in [false, true] {
        let mut log = Command::new(bin());
        log.args(["isolation", "log"]).arg(&d.store);
        if json {
            log.arg("--json");
        }
        // The pipe is closed after one line, 3,000 changes before the end of the log.
        let (first, status, err) = first_line_then_close(&mut log);
        assert!(!first.is_empty());
        assert!(
            status.success() && err.is_empty(),
            "json {json}: {status}: {err}"
        );
    }
}

#[test]
fn status_log_commit_upto_and_discard_after_on_an_unmounted_store() {
    let d = dirs();
    known_backing(&d.backing);
    let before = fingerprint(&d.backing);
    let m = d.mount();
    let snaps = known_sequence(&d.mnt, &d.store);
    m.stop();
    assert!(
        !d.store.join("control.sock").exists(),
        "control socket left after a clean unmount"
    );
    check_known_log_and_status(&d.store, false);
    assert_untouched(&d.backing, &before, "before commit");

    let out = commit(&d.store, Some(6));
    assert!(out.contains("11 changes pending"), "{out}");
    check_backing_at6(&d.backing, &snaps.at6);
    let out = discard(&d.store, Some(9));
    assert!(out.contains("3 changes pending"), "{out}");
    let st = status(&d.store);
    assert_eq!(
        status_summary(&st),
        "last_seq=9 committed_upto=6 pending_changes=3 files=3 data_bytes=0 interrupted_commit=null mounted=false"
    );
    let want: Vec<String> = KNOWN_LOG[6..9].iter().map(|l| l.to_string()).collect();
    assert_eq!(log_json(&d.store, 0), want);
    check_backing_at6(&d.backing, &snaps.at6);

    let m = d.mount();
    check_view_at9(&d.mnt, &snaps.at9);
    assert_eq!(num(&status(&d.store), "last_seq"), 9);
    m.stop();
    // Discard of everything left, offline: the view is the backing directory again.
    discard(&d.store, None);
    let m = d.mount();
    assert_same(
        "discard of everything",
        "backing",
        &manifest(&d.backing, NO_MTIME),
        "the view",
        &manifest(&d.mnt, NO_MTIME),
    );
    m.stop();
}

/// Commit and discard cutting between the changes to a directory that is renamed, and a
/// file written after it lost its name; then names that are not UTF-8.
#[test]
fn commit_and_discard_split_renames_and_writes_to_an_unlinked_file() {
    let d = dirs();
    fs::create_dir(d.backing.join("old")).unwrap();
    fs::write(d.backing.join("old/keep.txt"), b"keep\n").unwrap();
    fs::write(d.backing.join("x.txt"), b"x\n").unwrap();
    let before = fingerprint(&d.backing);
    let m = d.mount();
    let mnt = &d.mnt;
    let last = || num(&status(&d.store), "last_seq");

    fs::create_dir(mnt.join("a")).unwrap();
    fs::write(mnt.join("a/f"), b"v1\n").unwrap();
    assert_eq!(last(), 3);
    let x = OpenOptions::new()
        .read(true)
        .write(true)
        .open(mnt.join("x.txt"))
        .unwrap();
    fs::remove_file(mnt.join("x.txt")).unwrap();
    x.write_all_at(b"written after unlink\n", 0).unwrap();
    let mut buf = vec![0u8; 64];
    let n = x.read_at(&mut buf, 0).unwrap();
    assert_eq!(
        &buf[..n],
        b"written after unlink\n",
        "an unlinked file, read back"
    );
    drop(x);
    assert_eq!(last(), 5);
    let at5 = manifest(mnt, NO_MTIME);
    fs::rename(mnt.join("a"), mnt.join("b")).unwrap();
    OpenOptions::new()
        .write(true)
        .open(mnt.join("b/f"))
        .unwrap()
        .write_all_at(b"v2, longer\n", 0)
        .unwrap();
    assert_eq!(last(), 7);
    let at7 = manifest(mnt, NO_MTIME);
    fs::rename(mnt.join("old"), mnt.join("old2")).unwrap();
    fs::write(mnt.join("old2/keep.txt"), b"changed in old2\n").unwrap();
    assert_eq!(last(), 10);
    let at10 = manifest(mnt, NO_MTIME);
    assert_eq!(
        log_json(&d.store, 0),
        vec![
            "1 create a kind=dir",
            "2 create a/f kind=file",
            "3 data a/f size=3 bytes=4096",
            "4 unlink x.txt",
            "5 data - size=21 bytes=4096",
            "6 rename a -> b",
            "7 data b/f size=11 bytes=4096",
            "8 rename old -> old2",
            "9 data old2/keep.txt size=0 bytes=0",
            "10 data old2/keep.txt size=16 bytes=4096",
        ]
    );
    assert_eq!(
        log_text(&d.store, 4)[0],
        "5 data (unlinked) (size 21, 4096 bytes of blocks)"
    );
    assert_untouched(&d.backing, &before, "before commit");

    commit(&d.store, Some(5));
    assert_same(
        "commit --upto 5",
        "the view after change 5",
        &at5,
        "backing",
        &manifest(&d.backing, NO_MTIME),
    );
    assert_same(
        "commit --upto 5",
        "the view before",
        &at10,
        "the view right after",
        &manifest(mnt, NO_MTIME),
    );
    assert_eq!(read(&mnt.join("b/f")), b"v2, longer\n");
    assert_eq!(read(&mnt.join("old2/keep.txt")), b"changed in old2\n");

    discard(&d.store, Some(7));
    assert_same(
        "discard --after 7",
        "the view after change 7",
        &at7,
        "the view right after",
        &manifest(mnt, NO_MTIME),
    );
    assert_eq!(read(&mnt.join("old/keep.txt")), b"keep\n");
    assert!(!mnt.join("old2").exists());
    commit(&d.store, None);
    assert_same(
        "commit of the rest",
        "the view after change 7",
        &at7,
        "backing",
        &manifest(&d.backing, NO_MTIME),
    );
    m.stop();
    let m = d.mount();
    assert_same(
        "remount after commit",
        "the view after change 7",
        &at7,
        "the view",
        &manifest(mnt, NO_MTIME),
    );

    // Names that are not UTF-8: logged as raw bytes, committed as they are.
    let (cafe, dir) = (os(b"caf\xe9"), os(b"d\xff"));
    fs::create_dir(mnt.join(dir)).unwrap();
    fs::write(mnt.join(dir).join(cafe), b"bytes\n").unwrap();
    let out = iso("log", &d.store, &["--json", "--since", "7"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v[0]["path"],
        serde_json::json!({"raw": [b'd', 0xff]}),
        "{out}"
    );
    assert_eq!(
        v[1]["path"],
        serde_json::json!({"raw": [b'd', 0xff, b'/', b'c', b'a', b'f', 0xe9]}),
        "{out}"
    );
    commit(&d.store, None);
    assert_eq!(read(&d.backing.join(dir).join(cafe)), b"bytes\n");
    m.stop();
}

// ---------------------------------------------------------------------------------------
// The store: remount, another backing, corruption, a torn record

/// Changes of every kind through `mnt`.
fn assorted_changes(mnt: &Path) {
    fs::write(mnt.join("new.txt"), b"new file\n").unwrap();
    fs::write(mnt.join("a.txt"), b"rewritten\n").unwrap();
    fs::create_dir_all(mnt.join("dir/sub")).unwrap();
    fs::write(mnt.join("dir/sub/deep"), pattern(10_000, 3)).unwrap();
    fs::rename(mnt.join("b.txt"), mnt.join("dir/b-moved")).unwrap();
    symlink("sub/deep", mnt.join("dir/link")).unwrap();
    fs::hard_link(mnt.join("new.txt"), mnt.join("dir/new-link")).unwrap();
    fs::set_permissions(mnt.join("dir/sub/deep"), fs::Permissions::from_mode(0o640)).unwrap();
    set_xattr(&mnt.join("a.txt"), "user.note", b"value");
    set_times(
        &mnt.join("new.txt"),
        1_500_000_000_000_000_000,
        1_500_000_000_123_456_789,
    );
    let f = OpenOptions::new()
        .write(true)
        .open(mnt.join("big"))
        .unwrap();
    f.write_all_at(b"middle", 300_000).unwrap();
    f.set_len(500_000).unwrap();
    drop(f);
    fs::remove_file(mnt.join("c.txt")).unwrap();
}

fn assorted_backing(backing: &Path) {
    fs::write(backing.join("a.txt"), b"a\n").unwrap();
    fs::write(backing.join("b.txt"), b"b\n").unwrap();
    fs::write(backing.join("c.txt"), b"c\n").unwrap();
    fs::write(backing.join("big"), pattern(400_000, 4)).unwrap();
}

#[test]
fn remount_of_the_same_store_shows_the_same_view() {
    let d = dirs();
    assorted_backing(&d.backing);
    let before = fingerprint(&d.backing);
    let m = d.mount();
    assorted_changes(&d.mnt);
    let view = manifest(&d.mnt, FULL);
    let view_plain = manifest(&d.mnt, NO_MTIME);
    let (inos, times) = inodes_and_times(&d.mnt);
    let st = status(&d.store);
    m.stop();
    assert_untouched(&d.backing, &before, "after changes and unmount");
    for round in 1..=2 {
        let m = d.mount();
        assert_same(
            &format!("remount {round}"),
            "before",
            &view_plain,
            "after",
            &manifest(&d.mnt, NO_MTIME),
        );
        assert_eq!(
            status_summary(&status(&d.store)),
            status_summary(&st),
            "status after remount {round}"
        );
        let (inos2, times2) = inodes_and_times(&d.mnt);
        assert_same(
            &format!("inode numbers, remount {round}"),
            "before",
            &inos,
            "after",
            &inos2,
        );
        assert_same(
            &format!("modification times, remount {round}"),
            "before",
            &times,
            "after",
            &times2,
        );
        assert_same(
            &format!("remount {round} (with mtimes)"),
            "before",
            &view,
            "after",
            &manifest(&d.mnt, FULL),
        );
        m.stop();
    }
    assert_untouched(&d.backing, &before, "after remounts");
}

/// Opening a store reads every record's data to check it: seconds for a journal of
/// gigabytes. A large journal's check is said, by a mount and by a command on the
/// unmounted store, so the wait has a reason on screen; a small one's is not.
#[test]
fn the_check_of_a_large_journal_is_said() {
    let d = dirs();
    let m = d.mount();
    // 288 MiB through the mount: a journal past the 256 MiB whose check is said.
    let f = File::create(d.mnt.join("big")).unwrap();
    let block = vec![0x5au8; 1 << 20];
    for i in 0..288u64 {
        f.write_all_at(&block, i << 20).unwrap();
    }
    drop(f);
    let small = m.stop();
    assert!(
        !small.contains("checking the journal"),
        "the mount of a new store said it checked its journal:\n{small}"
    );
    let checking = format!("checking the journal of {}", d.store.display());
    let large = d.mount().stop();
    assert!(
        large.contains(&checking) && large.contains("journal checked in"),
        "the mount of a store with a 288 MiB journal did not say it checked it:\n{large}"
    );
    let out = output(
        Command::new(bin())
            .args(["isolation", "status"])
            .arg(&d.store),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "status: {}", describe(&out));
    assert!(
        err.contains(&checking) && err.contains("journal checked in"),
        "status of an unmounted store with a 288 MiB journal did not say it checked it:\n{err}"
    );
}

#[test]
fn a_store_refuses_another_backing_directory() {
    let d = dirs();
    fs::write(d.backing.join("f"), b"original\n").unwrap();
    let m = d.mount();
    fs::write(d.mnt.join("f"), b"isolated\n").unwrap();
    m.stop();
    let other = d.tmp.path().join("other");
    fs::create_dir(&other).unwrap();
    fs::write(other.join("f"), b"other\n").unwrap();
    let other_before = fingerprint(&other);
    let err = mount_fails(&other, &d.mnt, &d.store);
    for want in [s(&d.store), s(&d.backing), s(&other)] {
        assert!(err.contains(want), "the error does not name {want}:\n{err}");
    }
    assert!(err.contains("store"), "{err}");
    assert_untouched(
        &other,
        &other_before,
        "(the other one) after the refused mount",
    );
    // The store is intact and still works with its own backing directory.
    let m = d.mount();
    assert_eq!(read(&d.mnt.join("f")), b"isolated\n");
    assert_eq!(read(&d.backing.join("f")), b"original\n");
    m.stop();

    // A directory made anew at the backing directory's path is another directory too:
    // neither a mount nor an offline commit touches it.
    let moved = d.tmp.path().join("backing-moved");
    fs::rename(&d.backing, &moved).unwrap();
    fs::create_dir(&d.backing).unwrap();
    fs::write(d.backing.join("f"), b"impostor\n").unwrap();
    let impostor = fingerprint(&d.backing);
    let err = mount_fails(&d.backing, &d.mnt, &d.store);
    assert!(
        err.contains(s(&d.store)) && err.contains("inode"),
        "mount over a new directory at the old path:\n{err}"
    );
    let err = iso_fails("commit", &d.store, &[]);
    assert!(
        err.contains(s(&d.store)) && err.contains(s(&d.backing)),
        "offline commit onto a new directory at the old path:\n{err}"
    );
    assert_untouched(&d.backing, &impostor, "(a new one at the old path)");
    fs::remove_dir_all(&d.backing).unwrap();
    fs::rename(&moved, &d.backing).unwrap();
    assert_eq!(num(&status(&d.store), "pending_changes"), 2);
}

/// A journal record as [`journal_records`] finds it: offset, length, data offset, data length.
type JournalRecord = (usize, usize, usize, usize);

/// The journal's records.
fn journal_records(journal: &[u8]) -> Vec<JournalRecord> {
    let u32_at = |o: usize| u32::from_le_bytes(journal[o..o + 4].try_into().unwrap()) as usize;
    let mut out = Vec::new();
    let mut off = 64;
    while off + 16 <= journal.len() {
        if journal[off..].starts_with(b"IPSYNCED") {
            // The last sync's mark (the offset it is at, then zeros written ahead, if any).
            assert_eq!(journal[off + 8..off + 16], (off as u64).to_le_bytes());
            off += 16;
            break;
        }
        if off + 24 > journal.len() {
            break;
        }
        let len = u32_at(off);
        if len == 0 {
            // Zeros written ahead by an fsync end the records.
            assert!(
                journal[off..].iter().all(|&b| b == 0),
                "garbage after {off}"
            );
            break;
        }
        let meta = u32_at(off + 16);
        let data = u32_at(off + 20);
        assert_eq!(24 + meta + data, len, "record at {off}");
        out.push((off, len, off + 24 + meta, data));
        off += len;
    }
    assert!(
        off == journal.len() || journal[off..].iter().all(|&b| b == 0),
        "journal does not end at a record boundary"
    );
    out
}

/// A directory that is not a store, and a store inside the backing directory: refused,
/// and nothing is changed in either.
#[test]
fn a_mount_refused_for_its_store_changes_nothing() {
    let d = dirs();
    fs::write(d.backing.join("f"), b"original\n").unwrap();
    let not_a_store = d.tmp.path().join("not-a-store");
    fs::create_dir(&not_a_store).unwrap();
    fs::write(not_a_store.join("precious"), b"data\n").unwrap();
    let err = mount_fails(&d.backing, &d.mnt, &not_a_store);
    assert!(
        err.contains("neither an isolation store (no store.json) nor empty")
            && err.contains("a new or empty directory")
            && err.contains(s(&not_a_store)),
        "{err}"
    );
    assert_eq!(
        fs::read_dir(&not_a_store).unwrap().count(),
        1,
        "files added to a directory that is not a store"
    );
    let backing_before = fingerprint(&d.backing);
    let inside = d.backing.join("sub/store");
    let err = mount_fails(&d.backing, &d.mnt, &inside);
    assert!(err.contains("must not be inside"), "{err}");
    assert_untouched(
        &d.backing,
        &backing_before,
        "after a mount refused for a store inside it",
    );
    // Also reached by another way in: a bind mount of a directory of BACKING.
    fs::create_dir(d.backing.join("sub")).unwrap();
    let backing_before = fingerprint(&d.backing);
    let bound = ScratchFs::bind(&d.backing.join("sub"), d.tmp.path().join("elsewhere"));
    let err = mount_fails(&d.backing, &d.mnt, &bound.0.join("store"));
    assert!(
        err.contains("must not be inside") && err.contains("sub/store there"),
        "{err}"
    );
    // Also by a path through a directory not made yet and `..`.
    let roundabout = d.tmp.path().join("not-yet/../elsewhere/store");
    let err = mount_fails(&d.backing, &d.mnt, &roundabout);
    assert!(err.contains("sub/store there"), "{err}");
    assert!(
        !d.tmp.path().join("not-yet").exists(),
        "made before the refusal"
    );
    // And through a symlink met after such a `..`: followed, not taken by its name.
    symlink(d.backing.join("sub"), d.tmp.path().join("link")).unwrap();
    let err = mount_fails(
        &d.backing,
        &d.mnt,
        &d.tmp.path().join("not-yet/../link/store"),
    );
    assert!(err.contains("must not be inside"), "{err}");
    assert!(
        !d.tmp.path().join("not-yet").exists(),
        "made before the refusal"
    );
    // A symlink to a directory of BACKING not made yet: where the store would be made.
    symlink(
        d.backing.join("not-made/deeper"),
        d.tmp.path().join("dangling"),
    )
    .unwrap();
    let err = mount_fails(
        &d.backing,
        &d.mnt,
        &d.tmp.path().join("not-yet/../dangling/store"),
    );
    assert!(err.contains("must not be inside"), "{err}");
    assert!(!d.tmp.path().join("not-yet").exists());
    assert_untouched(
        &d.backing,
        &backing_before,
        "after a mount refused for a store inside it through a bind mount or a symlink",
    );
    drop(bound);
    // An isolated path written as BACKING's absolute path would never match: the whole
    // change would go to BACKING unrecorded.
    let abs = fs::canonicalize(&d.backing).unwrap().join("*.conf");
    let err = mount_refused(
        &d.backing,
        &d.mnt,
        &["--isolate", s(&d.store), "--isolate-path", s(&abs)],
    );
    assert!(err.contains(r#"write "*.conf""#), "{err}");
    // Nor would one that is empty or climbs out of BACKING.
    for path in ["", "../etc/*.conf", "a/../../b"] {
        let err = mount_refused(
            &d.backing,
            &d.mnt,
            &["--isolate", s(&d.store), "--isolate-path", path],
        );
        assert!(err.contains("never matches"), "{path:?}: {err}");
    }
    assert!(!d.store.exists(), "a store made for a refused mount");
}

/// Three files of 8 KiB written through a mount (with `extra` options) and unmounted, then
/// a byte of the second record's data (f0's) flipped: the journal's path, its bytes now
/// and its records (see [`journal_records`]).
fn three_files_then_the_second_record_damaged(
    d: &Dirs,
    extra: &[&str],
) -> (PathBuf, Vec<u8>, Vec<JournalRecord>) {
    let m = d.mount_with(extra);
    for i in 0..3 {
        fs::write(d.mnt.join(format!("f{i}")), pattern(8192, i as u8)).unwrap();
    }
    m.stop();
    let jpath = d.store.join("journal");
    let mut j = read(&jpath);
    let recs = journal_records(&j);
    assert_eq!(recs.len(), 6, "create + data for each of 3 files");
    let (_, _, data_off, data_len) = recs[1];
    assert_eq!(data_len, 8192);
    j[data_off + 100] ^= 0x40;
    fs::write(&jpath, &j).unwrap();
    (jpath, j, recs)
}

#[test]
fn a_corrupt_record_in_the_middle_is_refused_and_backing_is_untouched() {
    let d = dirs();
    fs::write(d.backing.join("x"), b"x\n").unwrap();
    let before = fingerprint(&d.backing);
    let (jpath, j, recs) = three_files_then_the_second_record_damaged(&d, &[]);

    // The offset and sequence number of the bad record are named.
    let where_ = format!("offset {} (seq 2)", recs[1].0);
    for sub in ["status", "log", "commit"] {
        let err = iso_fails(sub, &d.store, &[]);
        assert!(
            err.contains("corrupt") && err.contains("journal") && err.contains(&where_),
            "isolation {sub} on a corrupt journal (want \"corrupt\", the journal and {where_:?}):\n{err}"
        );
    }
    let err = mount_fails(&d.backing, &d.mnt, &d.store);
    assert!(
        err.contains("corrupt") && err.contains(&where_),
        "mount of a corrupt store (want \"corrupt\" and {where_:?}):\n{err}"
    );
    assert_eq!(read(&jpath), j, "the corrupt journal was changed");
    assert_untouched(&d.backing, &before, "after attempts on a corrupt store");

    // The refusals name the way out: a discard after the last whole change, 1.
    assert!(
        err.contains("discard STORE --after 1"),
        "the refusal does not say how to cut the damage off:\n{err}"
    );
    // Not after a change at or past the damage: those are not whole.
    let err = iso_fails("discard", &d.store, &["--after", "2"]);
    assert!(err.contains("out of range"), "{err}");
    assert_eq!(read(&jpath), j, "a refused discard changed the journal");
    let copy = d.store.join(format!("journal.cut-at-{}", recs[1].0));
    assert!(!copy.exists(), "a refused discard left a copy");
    // After 1: the damaged record and everything after it go, kept in a copy beside the
    // journal, and the store opens with change 1 (f0 created, empty).
    let out = output(
        Command::new(bin())
            .args(["isolation", "discard"])
            .arg(&d.store)
            .args(["--after", "1"]),
    );
    let said = describe(&out);
    assert!(out.status.success(), "discard --after 1: {said}");
    assert!(
        said.contains(&format!("offset {}", recs[1].0)) && said.contains(s(&copy)),
        "discard does not say what it cut and where the copy is: {said}"
    );
    assert!(
        read(&copy) == j[recs[1].0..],
        "the copy is not what was cut off"
    );
    assert_eq!(
        read(&jpath).len(),
        recs[1].0 + 16,
        "the journal was not cut at the damage (and marked synced there)"
    );
    let st = status(&d.store);
    assert_eq!(
        (num(&st, "last_seq"), num(&st, "pending_changes")),
        (1, 1),
        "{st:#}"
    );
    assert_untouched(&d.backing, &before, "after the discard");
    let m = d.mount();
    let names: Vec<_> = fs::read_dir(&d.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(names, ["f0", "x"], "the mount after the cut");
    assert_eq!(
        read(&d.mnt.join("f0")),
        b"",
        "f0 holds data of the cut record"
    );
    m.stop();
}

/// A --write-through store cannot discard, so its damage refusal does not name a discard:
/// it says how to cut the journal by hand.
#[test]
fn a_damaged_write_through_store_is_told_how_to_cut_it_by_hand() {
    let d = dirs();
    let (_, _, recs) = three_files_then_the_second_record_damaged(&d, &["--write-through"]);
    let off = recs[1].0;
    let err = iso_fails("status", &d.store, &[]);
    assert!(
        err.contains(&format!("offset {off}"))
            && err.contains("cannot discard")
            && err.contains(&format!("truncate -s {off}"))
            && !err.contains("isolation discard"),
        "{err}"
    );
}

/// The daemon checks the journal when it opens it; a record damaged on disk after that
/// (here: a byte of its data flipped behind the daemon's back) must not go into BACKING:
/// a mounted commit checks each record again before applying it, and stops there.
#[test]
fn a_record_damaged_while_mounted_stops_the_commit_before_it() {
    let d = dirs();
    let m = d.mount();
    for i in 0..3 {
        fs::write(d.mnt.join(format!("f{i}")), pattern(8192, i as u8)).unwrap();
    }
    let jpath = d.store.join("journal");
    let recs = journal_records(&read(&jpath));
    assert_eq!(recs.len(), 6, "create + data for each of 3 files");
    let (off, _, data_off, _) = recs[3]; // f1's data, seq 4
    let j = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&jpath)
        .unwrap();
    let mut b = [0u8; 1];
    j.read_exact_at(&mut b, data_off as u64 + 100).unwrap();
    j.write_all_at(&[b[0] ^ 0x40], data_off as u64 + 100)
        .unwrap();
    drop(j);
    let err = iso_fails("commit", &d.store, &[]);
    let where_ = format!("offset {off} (seq 4)");
    assert!(
        err.contains("corrupt") && err.contains(&where_),
        "mounted commit of a damaged record (want \"corrupt\" and {where_:?}):\n{err}"
    );
    // Changes 1..=3 went in (f0 whole, f1 created), nothing of 4 and after.
    assert_eq!(read(&d.backing.join("f0")), pattern(8192, 0));
    assert_eq!(
        read(&d.backing.join("f1")),
        b"",
        "f1 got data from the damaged record"
    );
    assert!(
        !d.backing.join("f2").exists(),
        "f2 went in after the damaged record"
    );
    let st = status(&d.store);
    assert_eq!(num(&st, "last_seq"), 6, "{st:#}");
    m.stop();
}

#[test]
fn a_torn_last_record_is_cut_off_and_the_rest_shows() {
    let d = dirs();
    let before = fingerprint(&d.backing);
    let m = d.mount();
    for i in 0..3 {
        fs::write(d.mnt.join(format!("f{i}")), format!("contents {i}\n")).unwrap();
    }
    m.stop();
    let jpath = d.store.join("journal");
    let j = read(&jpath);
    let recs = journal_records(&j);
    assert_eq!(recs.len(), 6);
    let last = recs[5].0;
    // The last record (f2's data) cut 3 bytes short, cut inside its header, and a whole
    // journal followed by zeros (space allocated but never written): each is a write a
    // crash cut short.
    let mut zeros = j.clone();
    zeros.resize(j.len() + 4096, 0);
    // (The journal ends with the unmount's sync mark, 16 bytes.)
    let variants: [(&str, &[u8], u64, usize); 3] = [
        ("zeros after the last record", &zeros, 6, j.len() - 16),
        ("cut inside the record header", &j[..last + 10], 5, last),
        ("3 bytes short", &j[..j.len() - 16 - 3], 5, last),
    ];
    let mut m = None;
    for (what, bytes, last_seq, cut_at) in variants {
        if let Some(m) = m.take() {
            Mount::stop(m);
        }
        fs::write(&jpath, bytes).unwrap();
        let st = status(&d.store);
        let data = if last_seq == 6 { 12288 } else { 8192 };
        assert_eq!(
            status_summary(&st),
            format!("last_seq={last_seq} committed_upto=0 pending_changes={last_seq} files=3 data_bytes={data} interrupted_commit=null mounted=false"),
            "{what}"
        );
        assert_eq!(
            fs::metadata(&jpath).unwrap().len(),
            cut_at as u64 + 16,
            "{what}: the journal was not cut back to the last whole record (and marked)"
        );
        let mm = d.mount();
        assert_eq!(read(&d.mnt.join("f0")), b"contents 0\n", "{what}");
        assert_eq!(read(&d.mnt.join("f1")), b"contents 1\n", "{what}");
        let f2: &[u8] = if last_seq == 6 { b"contents 2\n" } else { b"" };
        assert_eq!(read(&d.mnt.join("f2")), f2, "{what}: f2");
        m = Some(mm);
    }
    let m = m.unwrap();
    // The store goes on from there.
    OpenOptions::new()
        .write(true)
        .open(d.mnt.join("f2"))
        .unwrap()
        .write_all_at(b"again\n", 0)
        .unwrap();
    assert_eq!(log_json(&d.store, 5), vec!["6 data f2 size=6 bytes=4096"]);
    assert_eq!(read(&d.mnt.join("f2")), b"again\n");
    m.stop();
    assert_untouched(&d.backing, &before, "after a torn journal");
}

// ---------------------------------------------------------------------------------------
// A full store

/// A small file system (a tmpfs, a ramfs) or a bind mount, unmounted when dropped
/// (declare it before the mount that uses it).
struct ScratchFs(PathBuf);

impl ScratchFs {
    fn new(path: PathBuf, size: &str) -> ScratchFs {
        ScratchFs::mount(path, "tmpfs", &format!("size={size},mode=0700"))
    }

    /// A ramfs, which takes no extended attributes at all.
    fn ramfs(path: PathBuf) -> ScratchFs {
        ScratchFs::mount(path, "ramfs", "mode=0700")
    }

    /// `from` bind-mounted at `path`.
    fn bind(from: &Path, path: PathBuf) -> ScratchFs {
        fs::create_dir(&path).unwrap();
        run(Command::new("mount").arg("--bind").arg(from).arg(&path));
        ScratchFs(path)
    }

    fn mount(path: PathBuf, fstype: &str, opts: &str) -> ScratchFs {
        fs::create_dir(&path).unwrap();
        run(Command::new("mount")
            .args(["-t", fstype, "-o", opts, fstype])
            .arg(&path));
        ScratchFs(path)
    }
}

impl Drop for ScratchFs {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let ok = Command::new("umount")
                .arg(&self.0)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&self.0).status();
            }
        }
    }
}

/// A store on a file system without xattrs (ramfs) takes the xattrs BACKING's takes:
/// they are tried on a file of BACKING's file system before they are recorded, not on one
/// in the store (every setxattr failed with EOPNOTSUPP, and a create in a directory with
/// a default ACL failed but stayed recorded). The commit gives BACKING what the mount
/// showed.
#[test]
fn xattrs_are_tried_where_the_commit_sets_them_not_in_the_store() {
    let d = dirs();
    let ramfs = ScratchFs::ramfs(d.tmp.path().join("ram"));
    let store = ramfs.0.join("store");
    fs::create_dir(d.backing.join("inh")).unwrap();
    run(Command::new("setfacl")
        .args(["-d", "-m", "u:1000:rwx"])
        .arg(d.backing.join("inh")));
    fs::write(d.backing.join("f"), b"f").unwrap();
    fs::create_dir(d.backing.join("dir")).unwrap();
    let m = Mount::start(&d.backing, &d.mnt, &["--isolate", s(&store)]);
    let set = |p: &Path, name: &str| {
        rustix::fs::setxattr(p, name, b"v", rustix::fs::XattrFlags::empty())
            .map_err(|e| e.raw_os_error())
    };
    assert_eq!(set(&d.mnt.join("f"), "user.a"), Ok(()), "user.a on a file");
    assert_eq!(
        set(&d.mnt.join("dir"), "user.b"),
        Ok(()),
        "user.b on a directory"
    );
    fs::write(d.mnt.join("inh/new"), b"n").unwrap();
    fs::create_dir(d.mnt.join("inh/sub")).unwrap();
    let acl = |p: &Path| run(Command::new("getfacl").args(["-cpn"]).arg(p));
    let on_mount = [acl(&d.mnt.join("inh/new")), acl(&d.mnt.join("inh/sub"))];
    assert!(on_mount[0].contains("user:1000:rwx"), "{}", on_mount[0]);
    assert!(
        on_mount[1].contains("default:user:1000:rwx"),
        "{}",
        on_mount[1]
    );
    m.stop();
    commit(&store, None);
    let get = |p: &Path, name: &str| rustix::fs::getxattr(p, name, &mut [0u8; 8]).ok();
    assert_eq!(get(&d.backing.join("f"), "user.a"), Some(1));
    assert_eq!(get(&d.backing.join("dir"), "user.b"), Some(1));
    assert_eq!(acl(&d.backing.join("inh/new")), on_mount[0]);
    assert_eq!(acl(&d.backing.join("inh/sub")), on_mount[1]);
    drop(ramfs);

    // The other way round: BACKING on ramfs refuses what the store's ext4 would take, as
    // ramfs itself does (a default ACL was taken, then every create below it failed, and
    // so did the commit).
    let d = dirs();
    let ramfs = ScratchFs::ramfs(d.tmp.path().join("ram"));
    let backing = ramfs.0.join("backing");
    fs::create_dir_all(backing.join("dir")).unwrap();
    let m = Mount::start(&backing, &d.mnt, &["--isolate", s(&d.store)]);
    let native = set(&backing.join("dir"), "user.b");
    assert_eq!(
        set(&d.mnt.join("dir"), "user.b"),
        native,
        "user.b, as on ramfs"
    );
    let setfacl = |p: &Path| {
        let out = output(
            Command::new("setfacl")
                .args(["-d", "-m", "u:1000:rwx"])
                .arg(p),
        );
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).contains("not supported"),
        )
    };
    assert_eq!(setfacl(&d.mnt.join("dir")), setfacl(&backing.join("dir")));
    assert_eq!(setfacl(&d.mnt.join("dir")), (false, true), "a default ACL");
    fs::write(d.mnt.join("dir/new"), b"n").unwrap();
    m.stop();
    commit(&d.store, None);
    assert_eq!(fs::read(backing.join("dir/new")).unwrap(), b"n");
    drop(ramfs);
}

/// Past the daemon's RLIMIT_FSIZE the journal cannot grow: the writer gets EFBIG from the
/// write that does not fit (not later, from an fsync: 64 KiB writes are written behind,
/// crates/isolation/src/behind.rs, but not past the limit), and the daemon lives on
/// (SIGXFSZ used to kill it, and the mount with it).
#[test]
fn a_file_size_limit_gives_efbig_and_the_daemon_lives_on() {
    let d = dirs();
    let m = Mount::start_with_prefix(
        &["prlimit", "--fsize=1048576", "--"],
        &d.backing,
        &d.mnt,
        &["--isolate", s(&d.store)],
    );
    let f = File::create(d.mnt.join("f")).unwrap();
    let chunk = vec![7u8; 64 << 10];
    let (call, err) = (0..64u64)
        .find_map(|i| {
            let write = f.write_all_at(&chunk, i * chunk.len() as u64);
            let res = write.map_err(|e| ("write", e));
            res.and_then(|_| f.sync_all().map_err(|e| ("fsync", e)))
                .err()
        })
        .expect("writes of 4 MiB under a 1 MiB file size limit all succeeded");
    assert_eq!(
        (call, err.raw_os_error()),
        ("write", Some(libc::EFBIG)),
        "{err}"
    );
    assert!(fs::metadata(d.mnt.join("f")).is_ok(), "the mount answers");
    drop(f);
    m.stop();
}

/// A store's file system filling up under large writes (written behind the program's
/// write, crates/isolation/src/behind.rs) fails the write that does not fit, with ENOSPC,
/// and nothing else: not a later fsync, not the writes before it, which read back, and
/// read back the same after a remount.
#[test]
fn large_writes_into_a_full_store_fail_with_enospc_and_lose_nothing() {
    let d = dirs();
    let tmpfs = ScratchFs::new(d.tmp.path().join("small"), "8m");
    let store = tmpfs.0.join("store");
    let m = Mount::start(&d.backing, &d.mnt, &["--isolate", s(&store)]);
    let data = pattern(256 << 10, 1);
    let mut f = File::create(d.mnt.join("f")).unwrap();
    let mut written = 0;
    let err = loop {
        match f.write_all(&data) {
            Ok(()) => written += 1,
            Err(e) => break e,
        }
        assert!(written < 64, "16 MiB written into a store on 8 MiB");
    };
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    assert!(
        written >= 8,
        "only {written} writes of 256 KiB fit in 8 MiB"
    );
    f.sync_all()
        .expect("an fsync after the write that did not fit");
    drop(f);
    let expected = data.repeat(written);
    let back = fs::read(d.mnt.join("f")).unwrap();
    assert_eq!(back.len(), expected.len(), "length after the failed write");
    assert!(
        back == expected,
        "the writes before the failed one read back other data"
    );
    m.stop();
    let m = Mount::start(&d.backing, &d.mnt, &["--isolate", s(&store)]);
    assert!(
        fs::read(d.mnt.join("f")).unwrap() == expected,
        "after a remount, the file holds other data"
    );
    m.stop();
    drop(tmpfs);
}

/// A synchronous write through a write-only open (served around the page cache, where the
/// kernel sends no FSYNC after it) makes the journal durable before it returns: per write
/// (RWF_DSYNC, RWF_SYNC) and through O_DSYNC and O_SYNC opens. The daemon used to take the
/// per-write ones for plain writes.
#[test]
fn synchronous_writes_through_a_write_only_open_reach_the_store_s_disk() {
    let d = dirs();
    let fs_ = LoopFs::new(64);
    let store = fs_.dir.join("store");
    let m = Mount::start(&d.backing, &d.mnt, &["--isolate", s(&store)]);
    assert_synchronous_writes_flush(&fs_, &d.mnt.join("f"));
    m.stop();
    drop(fs_);
}

/// Large writes reach the store's journal behind the program's write, from a thread of the
/// daemon's (crates/isolation/src/behind.rs, with O_DIRECT): a file read back right after
/// its writes reads their data (a read of data on its way waits for it), and data fsync'ed
/// right before a SIGKILL of the daemon is all there after a remount. (That a sync waits
/// for writes still queued is checked by the journal's unit tests: here the writing thread
/// keeps up.)
#[test]
fn large_writes_fsynced_right_before_a_sigkill_survive_it() {
    let d = dirs();
    let mut m = Mount::start(&d.backing, &d.mnt, &["--isolate", s(&d.store)]);
    let data: Vec<u8> = (0..64u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    // Write-only opens reach the daemon with each write as it is made (no page cache).
    let mut g = File::create(d.mnt.join("g")).unwrap();
    g.write_all(&data).unwrap();
    assert!(
        fs::read(d.mnt.join("g")).unwrap() == data,
        "a file read back right after its writes read other data"
    );
    let mut f = File::create(d.mnt.join("f")).unwrap();
    for chunk in data.chunks(1 << 20) {
        f.write_all(chunk).unwrap();
    }
    f.sync_all().unwrap();
    m.kill();
    drop((f, g));
    m.cleanup_dead();
    let m = Mount::start(&d.backing, &d.mnt, &["--isolate", s(&d.store)]);
    let back = fs::read(d.mnt.join("f")).unwrap();
    assert_eq!(
        back.len(),
        data.len(),
        "length of the file fsync'ed before the SIGKILL"
    );
    assert!(
        back == data,
        "the file fsync'ed before the SIGKILL holds other data"
    );
    m.stop();
}

/// A power cut can leave later unsynced records on disk and lose part of an earlier one
/// (a disk writes what is not synced in any order). The records say how far the journal
/// was durable when they were written, so the mount tells this from damage: it ends the
/// journal at the torn record, keeping the bytes it cuts off, and shows everything that
/// was fsync'ed. (The power cut is played on the journal file the killed daemon left:
/// the kernel here cannot drop unsynced writes of a real disk.)
#[test]
fn a_power_cut_that_kept_later_records_and_lost_an_earlier_one_is_cut_not_refused() {
    let d = dirs();
    let before = fingerprint(&d.backing);
    let mut m = Mount::start(&d.backing, &d.mnt, &["--isolate", s(&d.store)]);
    let mut f0 = File::create(d.mnt.join("f0")).unwrap();
    f0.write_all(&pattern(8192, 0)).unwrap();
    f0.sync_all().unwrap();
    for i in 1..3 {
        fs::write(d.mnt.join(format!("f{i}")), pattern(8192, i)).unwrap();
    }
    m.kill();
    drop(f0);
    m.cleanup_dead();
    let jpath = d.store.join("journal");
    let mut j = read(&jpath);
    let recs = journal_records(&j);
    assert_eq!(recs.len(), 6, "create + data for each of 3 files");
    // f1's data never reached the disk; f2's records did.
    let (cut_at, _, data_off, data_len) = recs[3];
    j[data_off..data_off + data_len].fill(0);
    fs::write(&jpath, &j).unwrap();

    let m = Mount::start(&d.backing, &d.mnt, &["--isolate", s(&d.store)]);
    assert_eq!(
        read(&d.mnt.join("f0")),
        pattern(8192, 0),
        "the fsync'ed file"
    );
    assert_eq!(
        read(&d.mnt.join("f1")),
        b"",
        "f1: created, its data cut off"
    );
    assert!(!d.mnt.join("f2").exists(), "f2 came after the torn record");
    let log = m.stop();
    assert!(
        log.contains("never synced"),
        "the cut is not logged:\n{log}"
    );
    let copy = d.store.join(format!("journal.cut-at-{cut_at}"));
    assert!(
        read(&copy)[..j.len() - cut_at] == j[cut_at..],
        "the bytes cut off are not kept in {copy:?}"
    );
    let st = status(&d.store);
    assert_eq!(num(&st, "last_seq"), 3, "{st:#}");
    assert_eq!(
        st["kept_cuts"],
        serde_json::json!([format!("journal.cut-at-{cut_at}")]),
        "status names the copy: {st:#}"
    );
    let text = iso("status", &d.store, &[]);
    assert!(
        text.contains(&format!("kept aside:       journal.cut-at-{cut_at}")),
        "{text}"
    );
    assert_untouched(&d.backing, &before, "after the power cut");
}

/// Allocations cost the store nothing, so the view asks BACKING's file system for room
/// as the file system itself would (a `fallocate` of 1 GiB on 64 MiB: ENOSPC, nothing
/// recorded); and a commit that runs out of room while allocating (BACKING filled since)
/// fails without keeping the blocks it got (they were left allocated past the file's
/// end, unseen), then goes through once there is room.
#[test]
fn allocations_need_room_in_backing_and_a_failed_one_gives_it_back() {
    let d = dirs();
    let fs_ = LoopFs::new(64);
    let backing = fs_.dir.join("backing");
    fs::create_dir(&backing).unwrap();
    let m = Mount::start(&backing, &d.mnt, &["--isolate", s(&d.store)]);
    let free = || {
        let st = rustix::fs::statvfs(&backing).unwrap();
        st.f_bfree * st.f_frsize
    };
    let huge = File::create(d.mnt.join("huge")).unwrap();
    let err = rustix::fs::fallocate(&huge, rustix::fs::FallocateFlags::empty(), 0, 1 << 30);
    assert_eq!(
        err,
        Err(rustix::io::Errno::NOSPC),
        "fallocate of 1 GiB on 64 MiB"
    );
    drop(huge);
    assert_eq!(fs::metadata(d.mnt.join("huge")).unwrap().len(), 0);
    let zeroed = File::create(d.mnt.join("zeroed")).unwrap();
    let err = rustix::fs::fallocate(&zeroed, rustix::fs::FallocateFlags::ZERO_RANGE, 0, 1 << 30);
    assert_eq!(
        err,
        Err(rustix::io::Errno::NOSPC),
        "zero range of 1 GiB on 64 MiB"
    );
    drop(zeroed);
    let pre = File::create(d.mnt.join("pre")).unwrap();
    rustix::fs::fallocate(&pre, rustix::fs::FallocateFlags::empty(), 0, 24 << 20)
        .expect("fallocate of 24 MiB on 64 MiB");
    drop(pre);
    // BACKING fills up behind the store's back.
    let filler = backing.join("filler");
    let mut f = File::create(&filler).unwrap();
    let block = vec![7u8; 1 << 20];
    while free() > 16 << 20 {
        f.write_all(&block).unwrap();
        f.sync_all().unwrap();
    }
    drop(f);
    let before = free();
    let err = iso_fails("commit", &d.store, &[]);
    assert!(err.contains("No space left"), "{err}");
    assert!(
        free() + (1 << 20) >= before,
        "the failed commit kept {} KiB of BACKING",
        (before - free()) >> 10
    );
    fs::remove_file(&filler).unwrap();
    commit(&d.store, None);
    let pre = backing.join("pre");
    assert_eq!(fs::metadata(&pre).unwrap().len(), 24 << 20);
    assert!(read(&pre).iter().all(|&b| b == 0), "pre is not zeros");
    m.stop();

    // Mounted over BACKING itself, the room is asked of BACKING, not of the mount (by
    // path, the daemon asked itself, and waited for its own answer: a hung mount).
    let store2 = d.tmp.path().join("store2");
    let m = Mount::start(&backing, &backing, &["--isolate", s(&store2)]);
    for cmd in [
        vec!["fallocate", "-l", "1M", s(&backing.join("over"))],
        vec!["stat", "-f", s(&backing)],
    ] {
        let out = output(Command::new("timeout").args(["-k", "5", "20"]).args(&cmd));
        assert!(out.status.success(), "{cmd:?}: {}", describe(&out));
    }
    m.stop();
    drop(fs_);
}

/// open(O_CREAT) without O_EXCL of a name the kernel believed free but the view has
/// opens it, as on any file system; it failed with EEXIST. Here the name is made in BACKING
/// behind the store's back while the mount caches its absence; a discard that brings a
/// name back races the same way (found by a stress run). With O_EXCL it is EEXIST.
#[test]
fn open_o_creat_of_a_name_that_came_back_opens_it() {
    let d = dirs();
    let m = Mount::start(
        &d.backing,
        &d.mnt,
        &["--isolate", s(&d.store), "--cache-timeout", "60"],
    );
    for name in ["g", "h"] {
        assert!(!d.mnt.join(name).exists());
        fs::write(d.backing.join(name), b"behind\n").unwrap();
    }
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(d.mnt.join("g"))
        .expect("open(O_CREAT) of a name that came back");
    f.write_all_at(b"x", 0).unwrap();
    drop(f);
    assert_eq!(read(&d.mnt.join("g")), b"xehind\n");
    assert_eq!(read(&d.backing.join("g")), b"behind\n");
    let excl = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(d.mnt.join("h"));
    assert_eq!(
        excl.map(|_| ()).map_err(|e| e.raw_os_error()),
        Err(Some(libc::EEXIST))
    );
    m.stop();
}

/// A mounted discard that would keep a change no longer fitting BACKING (a name made there
/// behind the store's back) is refused before it cuts anything: it used to cut the
/// journal, fail to rebuild the view, and leave the mount showing the discarded changes
/// (reads of them EIO) over a journal that no longer held them.
#[test]
fn a_mounted_discard_that_cannot_rebuild_the_view_discards_nothing() {
    let d = dirs();
    let m = d.mount();
    fs::write(d.mnt.join("a"), b"a\n").unwrap();
    fs::write(d.mnt.join("x"), b"x\n").unwrap();
    fs::write(d.mnt.join("y"), b"y\n").unwrap();
    fs::write(d.mnt.join("y"), b"y, changed\n").unwrap();
    fs::write(d.backing.join("x"), b"made behind the store's back\n").unwrap();
    let err = iso_fails("commit", &d.store, &[]);
    assert!(err.contains("behind the store's back"), "{err}");
    let last = num(&status(&d.store), "last_seq");
    let err = iso_fails("discard", &d.store, &["--after", &(last - 1).to_string()]);
    assert!(err.contains("nothing was discarded"), "{err}");
    assert_eq!(
        num(&status(&d.store), "last_seq"),
        last,
        "the journal was cut"
    );
    assert_eq!(read(&d.mnt.join("y")), b"y, changed\n");
    fs::write(d.mnt.join("z"), b"z\n").unwrap();
    fs::remove_file(d.backing.join("x")).unwrap();
    let view = manifest(&d.mnt, NO_MTIME);
    commit(&d.store, None);
    assert_same(
        "after the commit",
        "the view",
        &view,
        "backing",
        &manifest(&d.backing, NO_MTIME),
    );
    m.stop();
}

/// A mounted discard that fails part-way for want of room (its copy of the journal, after
/// it cut the journal) still leaves the mount showing what the store holds: the view used
/// to stay as it was, showing the discarded change (reads EIO) and recording new ones
/// against it, which wedged the store's later commits (found by a stress run).
#[test]
fn a_discard_that_runs_out_of_room_leaves_the_view_as_the_store_says() {
    let d = dirs();
    let tmpfs = ScratchFs::new(d.tmp.path().join("small"), "8m");
    let store = tmpfs.0.join("store");
    let m = Mount::start(&d.backing, &d.mnt, &["--isolate", s(&store)]);
    fs::write(d.mnt.join("first"), b"first\n").unwrap();
    let mut written = Vec::new();
    for i in 0..16 {
        let name = format!("f{i}");
        let data = pattern(1 << 20, i as u8);
        let ok = File::create(d.mnt.join(&name))
            .and_then(|mut f| f.write_all(&data).and_then(|()| f.sync_all()));
        if ok.is_err() {
            break;
        }
        written.push((name, data));
    }
    assert!(written.len() >= 3, "{} files fit", written.len());
    // A commit of the first change must copy the rest into a new journal: no room.
    let err = iso_fails("commit", &store, &["--upto", "2"]);
    assert!(err.contains("No space left"), "{err}");
    // Discarding the last change cuts little; copying the others finds no room either.
    let last = num(&status(&store), "last_seq");
    let err = iso_fails("discard", &store, &["--after", &(last - 1).to_string()]);
    assert!(err.contains("No space left"), "{err}");
    // Whatever the store now holds, the mount shows it, readable.
    let view = manifest(&d.mnt, NO_MTIME);
    let (last_name, _) = written.last().unwrap();
    let _ = fs::read(d.mnt.join(last_name)).map_err(|e| {
        assert_ne!(
            e.raw_os_error(),
            Some(libc::EIO),
            "{last_name} reads EIO: {e}"
        )
    });
    m.stop();
    let m = Mount::start(&d.backing, &d.mnt, &["--isolate", s(&store)]);
    assert_same(
        "after the failed discard",
        "the mount before",
        &view,
        "the mount rebuilt from the store",
        &manifest(&d.mnt, NO_MTIME),
    );
    m.stop();
    drop(tmpfs);
}

/// A commit allocates zeros on a file system without ZERO_RANGE (tmpfs) by punching and
/// allocating: the file has the view's bytes and its allocated blocks.
#[test]
fn allocations_commit_to_a_file_system_without_zero_range() {
    let d = dirs();
    let tmpfs = ScratchFs::new(d.tmp.path().join("backing-tmpfs"), "16m");
    let backing = tmpfs.0.join("backing");
    fs::create_dir(&backing).unwrap();
    fs::write(backing.join("old"), pattern(3 << 20, 4)).unwrap();
    let m = Mount::start(&backing, &d.mnt, &["--isolate", s(&d.store)]);
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(d.mnt.join("new"))
        .unwrap();
    f.write_all_at(b"head", 0).unwrap();
    rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, 2 << 20).unwrap();
    drop(f);
    let old = OpenOptions::new()
        .write(true)
        .open(d.mnt.join("old"))
        .unwrap();
    rustix::fs::fallocate(
        &old,
        rustix::fs::FallocateFlags::ZERO_RANGE,
        1 << 20,
        1 << 20,
    )
    .unwrap();
    drop(old);
    let view = manifest(&d.mnt, NO_MTIME);
    commit(&d.store, None);
    assert_same(
        "after a commit to tmpfs",
        "the view",
        &view,
        "backing",
        &manifest(&backing, NO_MTIME),
    );
    let new = fs::metadata(backing.join("new")).unwrap();
    assert_eq!(new.len(), 2 << 20);
    assert!(
        new.blocks() * 512 >= 2 << 20,
        "{} blocks allocated",
        new.blocks()
    );
    let mut want = pattern(3 << 20, 4);
    want[1 << 20..2 << 20].fill(0);
    assert!(
        read(&backing.join("old")) == want,
        "old after the zeroed range"
    );
    m.stop();
    drop(tmpfs);
}

/// A commit up to a point must copy the later records into a new journal; when that copy
/// does not fit, the commit fails and leaves no half-made copy taking the room, and a
/// commit of everything (which copies nothing) then goes through.
#[test]
fn a_commit_whose_rest_does_not_fit_leaves_no_partial_journal() {
    let d = dirs();
    let tmpfs = ScratchFs::new(d.tmp.path().join("small"), "2m");
    let store = tmpfs.0.join("store");
    let m = Mount::start(&d.backing, &d.mnt, &["--isolate", s(&store)]);
    fs::write(d.mnt.join("first"), b"first\n").unwrap();
    let upto = num(&status(&store), "last_seq");
    let chunk = pattern(128 << 10, 3);
    let mut f = File::create(d.mnt.join("big")).unwrap();
    while f.write_all(&chunk).is_ok() {}
    drop(f);
    let view = manifest(&d.mnt, NO_MTIME);
    m.stop();
    let err = iso_fails("commit", &store, &["--upto", &upto.to_string()]);
    assert!(err.contains("No space left"), "{err}");
    let left: Vec<_> = fs::read_dir(&store)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !left.iter().any(|n| n.starts_with("journal.")),
        "a partial journal was left in the store: {left:?}"
    );
    iso("commit", &store, &[]);
    assert_same(
        "a commit of everything after the failed one",
        "the view",
        &view,
        "backing",
        &manifest(&d.backing, NO_MTIME),
    );
    drop(tmpfs);
}

/// With --write-through the journal is an audit trail of what BACKING took: a change
/// BACKING refused (a full disk) fails for the program and leaves no record behind.
#[test]
fn write_through_records_only_what_backing_took() {
    let d = dirs();
    let tmpfs = ScratchFs::new(d.tmp.path().join("small"), "1m");
    let backing = tmpfs.0.join("backing");
    fs::create_dir(&backing).unwrap();
    fs::write(backing.join("x"), b"x\n").unwrap();
    let m = Mount::start(
        &backing,
        &d.mnt,
        &["--isolate", s(&d.store), "--write-through"],
    );
    let ballast = pattern(64 << 10, 4);
    let mut b = File::create(backing.join("ballast")).unwrap();
    while b.write_all(&ballast).is_ok() {}
    drop(b);
    let before = log_json(&d.store, 0);
    let res = fs::write(d.mnt.join("new.bin"), pattern(256 << 10, 5));
    assert!(res.is_err(), "256 KiB written into a full BACKING");
    let mut f = OpenOptions::new()
        .append(true)
        .open(d.mnt.join("x"))
        .unwrap();
    assert!(
        f.write_all(&pattern(64 << 10, 6)).is_err(),
        "an append to a full BACKING"
    );
    drop(f);
    let after = log_json(&d.store, 0);
    let failed: Vec<_> = after
        .iter()
        .filter(|l| !before.contains(l) && l.contains(" data "))
        .filter(|l| {
            let size: u64 = l
                .split("size=")
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            let path = l.split(' ').nth(2).unwrap();
            fs::metadata(backing.join(path)).map_or(true, |m| m.len() < size)
        })
        .collect();
    assert!(
        failed.is_empty(),
        "the trail records writes BACKING does not hold: {failed:?}"
    );
    m.stop();
    drop(tmpfs);
}

/// Layouts in which the daemon would reach its own mount through what it serves from
/// are refused before anything is made: a store inside the mount point (its journal
/// written through the mount, a commit waiting on itself), a mount point inside BACKING
/// (a walk through it waits on itself). Both deadlocked the daemon.
#[test]
fn layouts_where_the_daemon_would_wait_on_itself_are_refused() {
    let d = dirs();
    for store in [d.mnt.clone(), d.mnt.join("store")] {
        let err = mount_fails(&d.backing, &d.mnt, &store);
        assert!(err.contains("inside the mount point"), "{err}");
    }
    let inner = d.backing.join("inner");
    fs::create_dir(&inner).unwrap();
    let err = mount_fails(&d.backing, &inner, &d.store);
    assert!(err.contains("inside BACKING"), "{err}");
    assert!(!d.store.exists(), "a store was made for a refused mount");
}

/// Out of descriptors, an isolated mount fails the open (EMFILE), where programs expect
/// it; every file it did open reads and writes (reads and writes failed with EMFILE, as
/// the backing file was opened only then).
#[test]
fn out_of_descriptors_the_open_fails_not_the_reads_and_writes() {
    let d = dirs();
    for i in 0..100 {
        fs::write(d.backing.join(format!("f{i}")), format!("file {i}\n")).unwrap();
    }
    let m = Mount::start_with_prefix(
        &["prlimit", "--nofile=64:64", "--"],
        &d.backing,
        &d.mnt,
        &["--isolate", s(&d.store)],
    );
    let mut open = Vec::new();
    let mut refused = 0;
    for i in 0..100 {
        match OpenOptions::new()
            .read(true)
            .write(true)
            .open(d.mnt.join(format!("f{i}")))
        {
            Ok(f) => open.push((i, f)),
            Err(e) if e.raw_os_error() == Some(libc::EMFILE) => refused += 1,
            Err(e) => panic!("open of f{i}: {e}"),
        }
    }
    assert!(
        refused > 0,
        "100 files open through a daemon limited to 64 descriptors"
    );
    for (i, f) in &open {
        let want = format!("file {i}\n");
        let mut buf = vec![0u8; want.len()];
        f.read_exact_at(&mut buf, 0)
            .unwrap_or_else(|e| panic!("read of f{i}, open: {e}"));
        assert_eq!(buf, want.as_bytes());
        f.write_all_at(b"F", 0)
            .unwrap_or_else(|e| panic!("write of f{i}, open: {e}"));
    }
    drop(open);
    m.stop();
}

/// A store that cannot be made (its file system full) leaves nothing half-made: the same
/// mount works once there is room (it used to say the directory was not a store).
#[test]
fn a_store_made_on_a_full_disk_can_be_made_again_once_there_is_room() {
    let d = dirs();
    let tmpfs = ScratchFs::new(d.tmp.path().join("small"), "1m");
    let store = tmpfs.0.join("store");
    let ballast = tmpfs.0.join("ballast");
    let mut b = File::create(&ballast).unwrap();
    while b.write_all(&[0u8; 4096]).is_ok() {}
    drop(b);
    let err = mount_fails(&d.backing, &d.mnt, &store);
    assert!(err.contains("No space left"), "{err}");
    fs::remove_file(&ballast).unwrap();
    let m = Mount::start(&d.backing, &d.mnt, &["--isolate", s(&store)]);
    fs::write(d.mnt.join("f"), b"made\n").unwrap();
    m.stop();
    assert_eq!(num(&status(&store), "pending_changes"), 2);
    drop(tmpfs);
}

/// A discard after a commit that stopped half-way (BACKING full) needs no room for what
/// it throws away: it empties a full store (it used to copy the changes it was about to
/// drop first, and failed with ENOSPC exactly then).
#[test]
fn a_discard_after_an_interrupted_commit_empties_a_full_store() {
    let d = dirs();
    let small = ScratchFs::new(d.tmp.path().join("small"), "1m");
    let store_fs = ScratchFs::new(d.tmp.path().join("storefs"), "2m");
    let backing = small.0.join("backing");
    fs::create_dir(&backing).unwrap();
    let store = store_fs.0.join("store");
    let m = Mount::start(&backing, &d.mnt, &["--isolate", s(&store)]);
    for i in 0..3 {
        fs::write(d.mnt.join(format!("f{i}")), pattern(600 << 10, i)).unwrap();
    }
    m.stop();
    let err = iso_fails("commit", &store, &[]);
    assert!(err.contains("No space left"), "{err}");
    // "change N (...): No space left on device": everything before N was applied.
    let failed: u64 = err
        .split("change ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("which change failed? {err}"));
    let applied = failed - 1;
    let st = status(&store);
    assert_eq!(
        st["interrupted_commit_applied"].as_u64(),
        Some(applied),
        "status tells how far the interrupted commit got: {st:#}"
    );
    assert_eq!(st["interrupted_commit_stopped"], true, "{st:#}");
    let text = iso("status", &store, &[]);
    assert!(
        text.contains(&format!("stopped on an error at change {failed}"))
            && text.contains(&format!("discard --after {applied} or later")),
        "{text}"
    );
    let mut filler = File::create(store_fs.0.join("filler")).unwrap();
    while filler.write_all(&[0u8; 4096]).is_ok() {}
    drop(filler);
    iso("discard", &store, &["--after", &applied.to_string()]);
    assert_eq!(num(&status(&store), "pending_changes"), 0);
    assert_eq!(read(&backing.join("f0")), pattern(600 << 10, 0));
    drop((small, store_fs));
}

/// A commit on a store whose file system is full to the last byte (here filled from
/// outside) starts with the room the store held back (its reserve); without a reserve it
/// fails before applying anything, names the file it could not write, and leaves nothing
/// behind; it works once there is room, and the reserve is back.
#[test]
fn a_commit_that_cannot_start_leaves_no_state_behind() {
    let d = dirs();
    let tmpfs = ScratchFs::new(d.tmp.path().join("small"), "1m");
    let store = tmpfs.0.join("store");
    let m = Mount::start(&d.backing, &d.mnt, &["--isolate", s(&store)]);
    fs::write(d.mnt.join("f"), b"f\n").unwrap();
    let f_seq = num(&status(&store), "last_seq");
    fs::write(d.mnt.join("g"), b"g\n").unwrap();
    m.stop();
    assert!(reserve_held(&store), "no reserve in a new store");
    let filler = tmpfs.0.join("filler");
    let fill = || {
        let mut f = File::create(&filler).unwrap();
        while f.write_all(&[0u8; 4096]).is_ok() {}
        assert_eq!(
            free_bytes(&tmpfs.0),
            0,
            "the store's file system is not full"
        );
    };
    fill();
    iso("commit", &store, &["--upto", &f_seq.to_string()]);
    assert_eq!(read(&d.backing.join("f")), b"f\n");
    assert!(!d.backing.join("g").exists(), "committed past --upto");
    // No reserve: the commit cannot start.
    fs::remove_file(&filler).unwrap();
    let _ = fs::remove_file(store.join("reserve"));
    fill();
    let err = iso_fails("commit", &store, &[]);
    assert!(
        err.contains("commit.tmp") && err.contains("No space left"),
        "{err}"
    );
    assert!(!store.join("commit.tmp").exists(), "commit.tmp left behind");
    assert!(
        !d.backing.join("g").exists(),
        "a change applied by a commit that failed"
    );
    fs::remove_file(&filler).unwrap();
    iso("commit", &store, &[]);
    assert_eq!(read(&d.backing.join("g")), b"g\n");
    assert!(reserve_held(&store), "the reserve was not made again");
    drop(tmpfs);
}

/// A commit that has applied everything and has nothing to keep, on a store whose file
/// system has no block left (its reserve gone too), fails on the new journal's header
/// with a clear error and leaves the store as it was: it finishes once there is room, and
/// status reads the store meanwhile.
#[test]
fn a_commit_with_no_room_at_all_fails_and_finishes_once_there_is_room() {
    let d = dirs();
    let tmpfs = ScratchFs::new(d.tmp.path().join("small"), "1m");
    let store = tmpfs.0.join("store");
    let m = Mount::start(&d.backing, &d.mnt, &["--isolate", s(&store)]);
    fs::write(d.mnt.join("a"), pattern(200 << 10, 1)).unwrap();
    fs::write(d.mnt.join("x"), b"x\n").unwrap();
    m.stop();
    // A commit stopped part-way (a name made behind the store's back), then the name gone
    // again, and the store's file system full to the last block, reserve and all.
    fs::write(d.backing.join("x"), b"behind\n").unwrap();
    let err = iso_fails("commit", &store, &[]);
    assert!(err.contains("behind the store's back"), "{err}");
    fs::remove_file(d.backing.join("x")).unwrap();
    fs::remove_file(store.join("reserve")).unwrap();
    let filler = tmpfs.0.join("filler");
    let mut f = File::create(&filler).unwrap();
    while f.write_all(&[0u8; 4096]).is_ok() {}
    drop(f);
    assert_eq!(
        free_bytes(&tmpfs.0),
        0,
        "the store's file system is not full"
    );
    let err = iso_fails("commit", &store, &[]);
    assert!(
        err.contains("journal.new") && err.contains("No space left"),
        "{err}"
    );
    let st = status(&store);
    assert!(!st["interrupted_commit"].is_null(), "{st:#}");
    fs::remove_file(&filler).unwrap();
    iso("commit", &store, &[]);
    let st = status(&store);
    assert_eq!(num(&st, "pending_changes"), 0, "{st:#}");
    assert!(st["interrupted_commit"].is_null(), "{st:#}");
    assert_eq!(read(&d.backing.join("a")), pattern(200 << 10, 1));
    assert_eq!(read(&d.backing.join("x")), b"x\n");
    let m = Mount::start(&d.backing, &d.mnt, &["--isolate", s(&store)]);
    fs::write(d.mnt.join("after"), b"after\n").unwrap();
    assert_eq!(read(&d.mnt.join("after")), b"after\n");
    m.stop();
    drop(tmpfs);
}

/// Files open without a name whose contents the view changed are carried across a commit
/// of a full store: their copy goes to BACKING's file system (unnamed) when the store has
/// no room for it. They used to read and write ESTALE afterwards (found by a full-store
/// stress run).
#[test]
fn files_open_without_a_name_survive_a_commit_of_a_full_store() {
    let d = dirs();
    fs::write(d.backing.join("old"), pattern(300 << 10, 1)).unwrap();
    let listing = || {
        let mut names: Vec<_> = fs::read_dir(&d.backing)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    };
    let tmpfs = ScratchFs::new(d.tmp.path().join("small"), "2m");
    let store = tmpfs.0.join("store");
    let m = Mount::start(&d.backing, &d.mnt, &["--isolate", s(&store)]);
    let old = OpenOptions::new()
        .read(true)
        .write(true)
        .open(d.mnt.join("old"))
        .unwrap();
    let old_data = pattern(400 << 10, 2);
    old.write_all_at(&old_data, 0).unwrap();
    let new = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(d.mnt.join("new"))
        .unwrap();
    let new_data = pattern(300 << 10, 3);
    new.write_all_at(&new_data, 0).unwrap();
    fs::remove_file(d.mnt.join("old")).unwrap();
    fs::remove_file(d.mnt.join("new")).unwrap();
    let mut fill = File::create(d.mnt.join("fill")).unwrap();
    while fill.write_all(&[7u8; 65536]).is_ok() {}
    drop(fill);
    commit(&store, None);
    // The copy has no name in BACKING.
    assert_eq!(listing(), ["fill"]);
    for (what, f, want) in [("old", &old, &old_data), ("new", &new, &new_data)] {
        let mut got = vec![0u8; want.len() + 10];
        let n = f
            .read_at(&mut got, 0)
            .unwrap_or_else(|e| panic!("reading {what} after the commit: {e}"));
        assert!(
            got[..n] == want[..],
            "{what}: {n} bytes, not what was written"
        );
        f.write_all_at(b"zz", 0)
            .unwrap_or_else(|e| panic!("writing {what} after the commit: {e}"));
    }
    drop((old, new));
    m.stop();
    drop(tmpfs);
}

/// Whether `store` holds its whole reserve (64 KiB allocated).
fn reserve_held(store: &Path) -> bool {
    fs::metadata(store.join("reserve")).is_ok_and(|m| m.blocks() * 512 >= 64 << 10)
}

/// Bytes free on the file system of `p` (for root too).
fn free_bytes(p: &Path) -> u64 {
    let st = rustix::fs::statvfs(p).unwrap();
    st.f_bfree * st.f_frsize
}

/// A store that filled its file system to the last block through the mount (4 KiB writes,
/// then names, until not even a name fits) commits, mounted and unmounted, with the room
/// it held back: the commit's state and the new journal need room before the commit frees
/// any, and a store full to the last block used to refuse the commit (ENOSPC on
/// commit.tmp) until something else made room. After it the mount takes changes again and
/// the reserve is back.
#[test]
fn a_store_full_to_the_last_block_commits_mounted_and_unmounted() {
    for mounted in [true, false] {
        let d = dirs();
        let tmpfs = ScratchFs::new(d.tmp.path().join("small"), "2m");
        let store = tmpfs.0.join("store");
        let m = Mount::start(&d.backing, &d.mnt, &["--isolate", s(&store)]);
        let block = pattern(4096, 3);
        let mut f = File::create(d.mnt.join("big")).unwrap();
        let mut written = 0usize;
        while f.write_all(&block).is_ok() {
            written += block.len();
            assert!(written <= 4 << 20, "4 MiB written into a 2 MiB store");
        }
        drop(f);
        let mut names = 0;
        while File::create(d.mnt.join(format!("n{names}"))).is_ok() {
            names += 1;
            assert!(names < 100_000, "names never filled the store");
        }
        assert_eq!(
            free_bytes(&tmpfs.0),
            0,
            "mounted {mounted}: the store's file system is not full after {written} bytes and {names} names"
        );
        let view = manifest(&d.mnt, NO_MTIME);
        let m = if mounted {
            Some(m)
        } else {
            m.stop();
            None
        };
        iso("commit", &store, &[]);
        assert_eq!(
            num(&status(&store), "pending_changes"),
            0,
            "mounted {mounted}"
        );
        assert_same(
            &format!("a commit of a full store, mounted {mounted}"),
            "the view",
            &view,
            "backing",
            &manifest(&d.backing, NO_MTIME),
        );
        assert!(
            reserve_held(&store),
            "mounted {mounted}: the reserve was not made again"
        );
        let m = m.unwrap_or_else(|| Mount::start(&d.backing, &d.mnt, &["--isolate", s(&store)]));
        fs::write(d.mnt.join("after"), &block).expect("a write after the commit");
        assert_eq!(read(&d.mnt.join("after")), block);
        m.stop();
        drop(tmpfs);
    }
}

/// A mounted commit whose changes are done but whose view cannot be rebuilt (a change
/// kept pending no longer fits BACKING: a name made there behind the store's back) says
/// so, and the mount takes no more changes (EROFS): they used to be recorded in the journal
/// the commit had replaced, which no remount would see. The store can then be discarded
/// (or the name removed) and mounted again.
#[test]
fn a_mounted_commit_whose_view_cannot_be_rebuilt_takes_no_more_changes() {
    let d = dirs();
    let m = d.mount();
    fs::write(d.mnt.join("a"), b"a\n").unwrap();
    let upto = num(&status(&d.store), "last_seq");
    fs::write(d.mnt.join("x"), b"x\n").unwrap();
    fs::write(d.backing.join("x"), b"made behind the store's back\n").unwrap();
    let err = iso_fails("commit", &d.store, &["--upto", &upto.to_string()]);
    assert!(
        err.contains("the commit is done") && err.contains("takes no more changes"),
        "{err}"
    );
    assert_eq!(read(&d.backing.join("a")), b"a\n");
    let res = fs::write(d.mnt.join("z"), b"z\n");
    assert_eq!(
        res.as_ref().map_err(|e| e.raw_os_error()),
        Err(Some(libc::EROFS)),
        "a change after the view could not be rebuilt: {res:?}"
    );
    assert_eq!(read(&d.mnt.join("a")), b"a\n", "reads go on");
    // Nor does it commit or report from the journal the commit replaced (a commit from it
    // would apply change 1 again).
    for sub in ["commit", "discard", "status"] {
        let err = iso_fails(sub, &d.store, &[]);
        assert!(err.contains("unmount it"), "{sub}: {err}");
    }
    m.stop();
    assert_eq!(num(&status(&d.store), "committed_upto"), upto);
    let err = mount_fails(&d.backing, &d.mnt, &d.store);
    assert!(
        err.contains("(create x)") && err.contains("exists"),
        "{err}"
    );
    iso("discard", &d.store, &[]);
    let m = d.mount();
    assert_eq!(read(&d.mnt.join("x")), b"made behind the store's back\n");
    fs::write(d.mnt.join("z"), b"z\n").unwrap();
    assert_eq!(read(&d.mnt.join("z")), b"z\n");
    m.stop();
}

/// A create in a directory with a default ACL is recorded as the create and the ACL it
/// inherits: when the journal cannot grow (here its file size limit, at ten different
/// points), the create fails whole; it used to be able to leave the file without its ACL
/// (its group then had the mode's bits, not the ACL's mask).
#[test]
fn a_create_and_its_inherited_acl_land_whole_or_not_at_all() {
    for k in 0..10u64 {
        let d = dirs();
        let limit = 20_000 + 41 * k;
        let m = Mount::start_with_prefix(
            &["prlimit", &format!("--fsize={limit}"), "--"],
            &d.backing,
            &d.mnt,
            &["--isolate", s(&d.store)],
        );
        let dir = d.mnt.join("acl");
        fs::create_dir(&dir).unwrap();
        run(Command::new("setfacl")
            .args(["-d", "-m", "u:1:r,g::r,m::r"])
            .arg(&dir));
        let mut made = 0;
        let failed = loop {
            let f = dir.join(format!("f{made}"));
            match File::create(&f) {
                Ok(_) => made += 1,
                Err(e) => break (f, e),
            }
            assert!(made < 10_000, "the journal never filled up");
        };
        let (f, err) = failed;
        assert!(
            matches!(err.raw_os_error(), Some(libc::EFBIG) | Some(libc::ENOSPC)),
            "limit {limit}: {err}"
        );
        // From a listing (the kernel caches the name's absence from before the create).
        let name = f.file_name().unwrap().to_owned();
        assert!(
            !fs::read_dir(&dir)
                .unwrap()
                .any(|e| e.unwrap().file_name() == name),
            "limit {limit}: the create failed, but {} exists (without its ACL)",
            f.display()
        );
        m.stop();
    }
}

/// A write recorded right after an fsync begins over that sync's mark (the journal's
/// "durable up to here"). When it fails half-written (here the daemon's file size limit,
/// lowered under it; a full disk does the same), the mark is put back where it was: no
/// sync comes to write it again before a crash. Without it, damage found later in the
/// record the program had fsync'ed would look like a power cut's torn end and be cut off
/// instead of refused.
#[test]
fn a_write_that_fails_after_an_fsync_leaves_the_sync_mark_in_place() {
    let d = dirs();
    let mut m = d.mount();
    let chunk = pattern(3000, 5);
    let mut f = File::create(d.mnt.join("f")).unwrap();
    for _ in 0..4 {
        f.write_all(&chunk).unwrap();
        f.sync_all().unwrap();
    }
    let jpath = d.store.join("journal");
    let j = read(&jpath);
    let recs = journal_records(&j);
    let &(last, last_len, last_data, _) = recs.last().unwrap();
    let synced_end = last + last_len;
    assert_eq!(
        &j[synced_end..synced_end + 8],
        b"IPSYNCED",
        "no mark after the last fsync'ed record"
    );
    // The next record would start at the mark and end past the limit.
    run(Command::new("prlimit")
        .arg(format!("--pid={}", m.pid()))
        .arg(format!("--fsize={}", synced_end + 100)));
    let err = f.write_all(&chunk).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EFBIG), "{err}");
    drop(f);
    // A crash: nothing more is written to the journal (a clean stop would sync and mark).
    m.kill();
    m.cleanup_dead();
    let mut j = read(&jpath);
    assert_eq!(
        j.len(),
        synced_end + 16,
        "the failed record was not cut back to the mark"
    );
    assert_eq!(
        journal_records(&j).len(),
        recs.len(),
        "records changed by the failed write"
    );
    assert_eq!(
        &j[synced_end..synced_end + 8],
        b"IPSYNCED",
        "the mark the failed write began over was not put back"
    );

    // Damage in the last fsync'ed record is refused, not cut like a torn end.
    j[last_data + 10] ^= 0x01;
    fs::write(&jpath, &j).unwrap();
    let err = iso_fails("status", &d.store, &[]);
    assert!(
        err.contains("corrupt") && err.contains(&format!("offset {last}")),
        "damage before the mark was not refused:\n{err}"
    );
    assert_eq!(read(&jpath), j, "the refusal changed the journal");
    // Mended, the store holds every write that was fsync'ed.
    j[last_data + 10] ^= 0x01;
    fs::write(&jpath, &j).unwrap();
    let m = d.mount();
    assert_eq!(read(&d.mnt.join("f")), chunk.repeat(4));
    m.stop();
}

#[test]
fn a_full_store_gives_enospc_and_the_mount_recovers() {
    let d = dirs();
    fs::write(d.backing.join("existing"), b"existing\n").unwrap();
    let before = fingerprint(&d.backing);
    let tmpfs = ScratchFs::new(d.tmp.path().join("small"), "2m");
    let store = tmpfs.0.join("store");
    let m = Mount::start(&d.backing, &d.mnt, &["--isolate", s(&store)]);

    let keep = pattern(64 << 10, 7);
    let mut f = File::create(d.mnt.join("keep")).unwrap();
    f.write_all(&keep).unwrap();
    f.sync_all().unwrap();
    drop(f);

    let chunk = pattern(128 << 10, 8);
    let mut f = File::create(d.mnt.join("big")).unwrap();
    let mut written = 0usize;
    let err = loop {
        match f.write_all(&chunk) {
            Ok(()) => written += chunk.len(),
            Err(e) => break e,
        }
        assert!(
            written <= 8 << 20,
            "8 MiB written into a store on a 2 MiB tmpfs"
        );
    };
    drop(f);
    assert!(
        matches!(err.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EFBIG)),
        "the writer got {err} (after {written} bytes), not ENOSPC or EFBIG"
    );
    assert!(is_mounted(&d.mnt));
    let st = status(&store);
    assert_eq!(st["mounted"], true, "{st:#}");
    assert_eq!(
        read(&d.mnt.join("keep")),
        keep,
        "fsync'ed file after ENOSPC"
    );
    assert_eq!(read(&d.mnt.join("existing")), b"existing\n");
    assert!(
        written >= 1 << 20,
        "only {written} bytes went into a 2 MiB store before {err}"
    );
    // The store is full: more data does not fit (this is not slack left by the failed write).
    let small = pattern(512 << 10, 9);
    let res = fs::write(d.mnt.join("probe"), &small);
    assert!(
        res.as_ref()
            .is_err_and(|e| e.raw_os_error() == Some(libc::ENOSPC)),
        "writing 512 KiB more into the full store: {res:?}"
    );
    fs::remove_file(d.mnt.join("probe")).unwrap();
    // The big file holds what was acknowledged, perhaps more, and nothing else.
    let got = read(&d.mnt.join("big"));
    assert!(
        got.len() >= written,
        "big holds {} bytes, {written} were acknowledged",
        got.len()
    );
    let bad = (0..got.len()).find(|&i| got[i] != chunk[i % chunk.len()]);
    assert_eq!(
        bad, None,
        "big differs from what was written at that offset"
    );
    // What the mount shows after the failed writes is what the journal holds: a remount
    // shows the same.
    let full_view = manifest(&d.mnt, NO_MTIME);
    m.stop();
    let m = Mount::start(&d.backing, &d.mnt, &["--isolate", s(&store)]);
    assert_same(
        "a remount of the full store",
        "the view before",
        &full_view,
        "after",
        &manifest(&d.mnt, NO_MTIME),
    );

    // Deleted, the big file is gone; the mount takes small changes at once.
    fs::remove_file(d.mnt.join("big")).expect("deleting the big file on a full store");
    assert!(!d.mnt.join("big").exists());
    let tiny = pattern(8 << 10, 10);
    let mut f = File::create(d.mnt.join("tiny")).expect("creating a file after deleting big");
    f.write_all(&tiny)
        .expect("writing 8 KiB after deleting big");
    f.sync_all().expect("fsync after deleting big");
    drop(f);
    assert_eq!(read(&d.mnt.join("tiny")), tiny);
    assert_eq!(read(&d.mnt.join("keep")), keep);
    assert_untouched(&d.backing, &before, "after a full store");
    m.stop();
    // What was acknowledged is there after a remount.
    let m = Mount::start(&d.backing, &d.mnt, &["--isolate", s(&store)]);
    assert_eq!(read(&d.mnt.join("keep")), keep);
    assert_eq!(read(&d.mnt.join("tiny")), tiny);
    assert!(!d.mnt.join("big").exists());
    // The journal keeps every version until commit (commit --upto N needs them), so the
    // room the big file took comes back with a commit: then half a MiB fits (before, with
    // the big file's data held, it did not).
    let out = Command::new(bin())
        .args(["isolation", "commit"])
        .arg(&store)
        .output()
        .unwrap();
    assert!(out.status.success(), "commit on a full store: {out:?}");
    let mut f = File::create(d.mnt.join("after")).unwrap();
    f.write_all(&small).expect(
        "writing 512 KiB after deleting the big file (which held more than 1 MiB of the store)",
    );
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(read(&d.mnt.join("after")), small);
    m.stop();
    drop(tmpfs);
}

/// Paths longer than PATH_MAX (4096 bytes; names of 200 bytes, 25 deep): a tree that deep
/// in BACKING reads through an isolated mount, one made there commits, and one made
/// outside the isolated paths or with `--write-through` is made in BACKING. The daemon
/// gave BACKING whole paths, which the kernel refuses past PATH_MAX: ENAMETOOLONG on the
/// mount, or a commit stuck at the first such change.
#[test]
fn trees_deeper_than_path_max_read_commit_and_pass_through() {
    // Makes (or, with `check`, reads) `top`/D*25/f under `base`, a name at a time.
    let script = r#"
import os, sys
base, top, mode = sys.argv[1], sys.argv[2], sys.argv[3]
fd = os.open(base, os.O_RDONLY)
for name in [top] + ['D' * 200] * 25:
    if mode == 'make':
        os.mkdir(name, dir_fd=fd)
    fd = os.open(name, os.O_RDONLY, dir_fd=fd)
if mode == 'make':
    f = os.open('f', os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)
    os.write(f, top.encode())
    os.close(f)
f = os.open('f', os.O_RDONLY, dir_fd=fd)
print(os.read(f, 100).decode())
"#;
    let deep = |base: &Path, top: &str, mode: &str| {
        let out = output(
            Command::new(python())
                .arg("-c")
                .arg(script)
                .arg(base)
                .arg(top)
                .arg(mode),
        );
        assert!(
            out.status.success(),
            "{top} {mode} under {base:?}: {}",
            describe(&out)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    for args in [&["--isolate-path", "iso"][..], &["--write-through"][..]] {
        let d = dirs();
        fs::create_dir(d.backing.join("iso")).unwrap();
        deep(&d.backing, "before", "make");
        let m = d.mount_with(args);
        assert_eq!(deep(&d.mnt, "before", "read"), "before", "{args:?}");
        deep(&d.mnt.join("iso"), "isolated", "make");
        deep(&d.mnt, "outside", "make");
        assert_eq!(deep(&d.backing, "outside", "read"), "outside", "{args:?}");
        if args[0] == "--write-through" {
            assert_eq!(deep(&d.backing.join("iso"), "isolated", "read"), "isolated");
        } else {
            commit(&d.store, None);
            assert_eq!(deep(&d.backing.join("iso"), "isolated", "read"), "isolated");
            assert_eq!(deep(&d.mnt.join("iso"), "isolated", "read"), "isolated");
        }
        m.stop();
    }
}

/// BACKING's file system's limits hold on the isolated mount as they do on it: a file
/// size past its largest (EFBIG), a link past its most (EMLINK), times outside its range
/// (clamped, as it stores them). The view took all three; the commit then stopped at the
/// first, and the mount showed times BACKING did not get.
#[test]
fn the_backing_file_systems_limits_hold_on_an_isolated_mount() {
    let script = r#"
import errno, os, sys
d = sys.argv[1]
def res(f):
    try:
        f()
        return 'ok'
    except OSError as e:
        return errno.errorcode[e.errno]
fd = os.open(os.path.join(d, 'big'), os.O_CREAT | os.O_WRONLY, 0o644)
out = [res(lambda: os.pwrite(fd, b'x', (1 << 44) + 4096)), res(lambda: os.ftruncate(fd, 1 << 60))]
os.close(fd)
p = os.path.join(d, 'times')
open(p, 'w').close()
os.utime(p, ns=(-10**19, 2**34 * 10**9))
st = os.stat(p)
out.append(f'{st.st_atime_ns} {st.st_mtime_ns}')
for i in range(2):
    out.append(res(lambda: os.link(os.path.join(d, 'links/many'), os.path.join(d, f'extra{i}'))))
print(' '.join(out))
"#;
    let d = dirs();
    // And a tmpfs mounted inside BACKING, whose own limits (none of the three) hold there.
    let sub = d.backing.join("sub");
    fs::create_dir(&sub).unwrap();
    let _tmpfs = Tmpfs::mount(&sub, 16);
    for side in ["native", "iso", "sub/native", "sub/iso"] {
        let links = d.backing.join(side).join("links");
        fs::create_dir_all(&links).unwrap();
        fs::write(links.join("many"), b"").unwrap();
        // 64,999 links: the file systems with a lower limit than this are not BACKINGs.
        for i in 1..64_999 {
            fs::hard_link(links.join("many"), links.join(i.to_string())).unwrap();
        }
    }
    let run = |dir: &Path| {
        let out = output(Command::new(python()).arg("-c").arg(script).arg(dir));
        assert!(out.status.success(), "{dir:?}: {}", describe(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let native = run(&d.backing.join("native"));
    let sub_native = run(&d.backing.join("sub/native"));
    assert_ne!(
        native, sub_native,
        "the test needs file systems with other limits"
    );
    let m = d.mount();
    assert_eq!(
        run(&d.mnt.join("iso")),
        native,
        "the mount, as BACKING's file system"
    );
    assert_eq!(
        run(&d.mnt.join("sub/iso")),
        sub_native,
        "the mount, as the file system mounted inside BACKING"
    );
    m.stop();
    commit(&d.store, None);
    assert_eq!(
        fs::metadata(d.backing.join("iso/links/many"))
            .unwrap()
            .nlink(),
        fs::metadata(d.backing.join("native/links/many"))
            .unwrap()
            .nlink(),
        "committed"
    );
    let times = |side: &str| {
        let md = fs::metadata(d.backing.join(side).join("times")).unwrap();
        (md.atime(), md.mtime())
    };
    assert_eq!(times("iso"), times("native"), "committed");
}

/// Objects on file systems mounted inside BACKING keep their inode numbers through an
/// isolated mount after the kernel forgot them, also across a mounted commit, and hard
/// links share theirs. They had their own inode numbers where those were free, else new
/// ones: two submounts number their files alike, so which got its own depended on which
/// the kernel looked up first since it last forgot them.
#[test]
fn inode_numbers_on_submounts_stay_on_an_isolated_mount() {
    let d = dirs();
    let mut tmpfs = Vec::new();
    for sub in ["one", "two"] {
        let sub = d.backing.join(sub);
        fs::create_dir(&sub).unwrap();
        tmpfs.push(Tmpfs::mount(&sub, 1));
        fs::create_dir(sub.join("d")).unwrap();
        fs::write(sub.join("a"), b"x").unwrap();
        fs::hard_link(sub.join("a"), sub.join("d/b")).unwrap();
    }
    let m = d.mount();
    let ino = |rel: &str| fs::symlink_metadata(d.mnt.join(rel)).unwrap().ino();
    let names = ["one/a", "one/d/b", "two/a", "two/d/b"];
    let first: Vec<u64> = names.iter().map(|n| ino(n)).collect();
    assert_eq!(first[0], first[1], "hard links share a number");
    assert_eq!(first[2], first[3], "hard links share a number");
    assert_ne!(first[0], first[2], "two objects, two numbers");
    fs::write(d.mnt.join("pending"), b"x").unwrap();
    for step in ["forgotten", "forgotten and committed"] {
        view_nodes_at_rest(&d.store);
        if step != "forgotten" {
            // With nothing of the submounts held, the view the commit rebuilds meets
            // their devices only at the lookups below, in the other order.
            commit(&d.store, None);
        }
        // The other submount first this time.
        let mut again: Vec<u64> = names.iter().rev().map(|n| ino(n)).collect();
        again.reverse();
        assert_eq!(again, first, "{step}");
    }
    m.stop();
}

/// A BACKING whose largest file is small (ext2 with 1 KiB blocks: about 16 GiB): a
/// truncation past it gets EFBIG on the isolated mount as it does there. The view asked
/// only past 1 TiB, took it, and the commit stopped there.
#[test]
fn a_small_largest_file_size_holds_on_an_isolated_mount() {
    let small = LoopFs::made_by(64, &["mkfs.ext2", "-q", "-F", "-b", "1024"]);
    let d = dirs();
    let backing = small.dir.join("backing");
    fs::create_dir(&backing).unwrap();
    let native = File::create(backing.join("native")).unwrap();
    assert_eq!(
        native.set_len(20 << 30).map_err(|e| e.raw_os_error()),
        Err(Some(libc::EFBIG)),
        "the file system under the test"
    );
    let m = Mount::start(&backing, &d.mnt, &["--isolate", s(&d.store)]);
    let f = File::create(d.mnt.join("f")).unwrap();
    f.set_len(1 << 30).unwrap();
    assert_eq!(
        f.set_len(20 << 30).map_err(|e| e.raw_os_error()),
        Err(Some(libc::EFBIG)),
        "the mount"
    );
    drop(f);
    m.stop();
    commit(&d.store, None);
    assert_eq!(fs::metadata(backing.join("f")).unwrap().len(), 1 << 30);
}

/// A store on another file system than the backing directory (a tmpfs): commit copies
/// the data across.
#[test]
fn a_store_on_another_file_system_commits() {
    let d = dirs();
    fs::write(d.backing.join("old"), pattern(100_000, 1)).unwrap();
    let before = fingerprint(&d.backing);
    let tmpfs = ScratchFs::new(d.tmp.path().join("storefs"), "64m");
    let store = tmpfs.0.join("store");
    let m = Mount::start(&d.backing, &d.mnt, &["--isolate", s(&store)]);
    fs::write(d.mnt.join("new"), pattern(3 << 20, 2)).unwrap();
    OpenOptions::new()
        .write(true)
        .open(d.mnt.join("old"))
        .unwrap()
        .write_all_at(b"patched", 50_000)
        .unwrap();
    fs::create_dir(d.mnt.join("dir")).unwrap();
    fs::write(d.mnt.join("dir/small"), b"small\n").unwrap();
    assert_untouched(&d.backing, &before, "before commit");
    let view = manifest(&d.mnt, NO_MTIME);
    commit(&store, None);
    assert_same(
        "commit from a store on tmpfs",
        "the view",
        &view,
        "backing",
        &manifest(&d.backing, NO_MTIME),
    );
    m.stop();
    let mut want = pattern(100_000, 1);
    want[50_000..50_007].copy_from_slice(b"patched");
    assert_eq!(read(&d.backing.join("old")), want);
    assert_eq!(read(&d.backing.join("new")), pattern(3 << 20, 2));
    drop(tmpfs);
}

/// Mounted commits, whole and in part, while another thread appends to a file (fsyncing
/// now and then) and replaces files by rename: file-system requests wait for the commit,
/// nothing is lost or doubled, and the backing directory ends up as the view.
#[test]
fn mounted_commits_while_a_writer_appends_and_renames() {
    let d = dirs();
    fs::write(d.backing.join("log"), b"").unwrap();
    let m = d.mount();
    let mnt = d.mnt.clone();
    const LINES: usize = 3000;
    // The writer waits at a third and at two thirds for a commit to have ended, so that
    // at least two run while it writes however fast it is.
    let commits_done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let done = commits_done.clone();
    let writer = std::thread::spawn(move || {
        let mut log = OpenOptions::new()
            .append(true)
            .open(mnt.join("log"))
            .unwrap();
        for i in 0..LINES {
            for (at, want) in [(LINES / 3, 1), (2 * LINES / 3, 2)] {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
                while i == at && done.load(std::sync::atomic::Ordering::SeqCst) < want {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "no commit {want} within 60 s"
                    );
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            }
            log.write_all(format!("line {i}\n").as_bytes()).unwrap();
            if i % 100 == 0 {
                log.sync_data().unwrap();
            }
            if i % 150 == 0 {
                fs::write(mnt.join("tmp"), format!("version {i}\n")).unwrap();
                fs::rename(mnt.join("tmp"), mnt.join("current")).unwrap();
            }
        }
    });
    let mut commits = 0;
    while !writer.is_finished() {
        let st = status(&d.store);
        let (base, last) = (num(&st, "committed_upto"), num(&st, "last_seq"));
        if commits % 2 == 0 {
            commit(&d.store, Some((base + last) / 2));
        } else {
            commit(&d.store, None);
        }
        commits += 1;
        commits_done.store(commits, std::sync::atomic::Ordering::SeqCst);
    }
    writer.join().expect("the writer failed");
    eprintln!("{commits} commits ran while the writer wrote");
    assert!(
        commits >= 2,
        "only {commits} commits ran while the writer wrote"
    );
    let want: String = (0..LINES).map(|i| format!("line {i}\n")).collect();
    assert_eq!(
        read_str(&d.mnt.join("log")),
        want,
        "the appended file on the mount"
    );
    let last = (LINES - 1) / 150 * 150;
    assert_eq!(
        read_str(&d.mnt.join("current")),
        format!("version {last}\n")
    );
    let view = manifest(&d.mnt, NO_MTIME);
    commit(&d.store, None);
    assert_same(
        "after the last commit",
        "the view",
        &view,
        "backing",
        &manifest(&d.backing, NO_MTIME),
    );
    assert_eq!(read_str(&d.backing.join("log")), want);
    m.stop();
}

/// `chattr +i` on a directory, undone when dropped.
struct Immutable(PathBuf);

impl Immutable {
    fn new(p: &Path) -> Immutable {
        run(Command::new("chattr").arg("+i").arg(p));
        Immutable(p.to_path_buf())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

/// A mounted commit that cannot apply a change stops there, naming it, with what came
/// before in BACKING and the view as it was; run again, it finishes.
#[test]
fn a_failed_commit_stops_at_the_change_and_runs_again() {
    let d = dirs();
    fs::write(d.backing.join("y"), b"y\n").unwrap();
    fs::create_dir(d.backing.join("dir")).unwrap();
    let m = d.mount();
    fs::write(d.mnt.join("x"), b"xx\n").unwrap();
    OpenOptions::new()
        .append(true)
        .open(d.mnt.join("y"))
        .unwrap()
        .write_all(b"more\n")
        .unwrap();
    fs::write(d.mnt.join("dir/a"), b"aa\n").unwrap();
    fs::write(d.mnt.join("z"), b"zz\n").unwrap();
    assert_eq!(
        log_json(&d.store, 0)[3..5],
        ["4 create dir/a kind=file", "5 data dir/a size=3 bytes=4096"]
    );
    let view = manifest(&d.mnt, NO_MTIME);
    let immutable = Immutable::new(&d.backing.join("dir"));
    let err = iso_fails("commit", &d.store, &[]);
    assert!(
        err.contains("change 4") && err.contains("dir/a"),
        "the failed commit does not name change 4 (create dir/a):\n{err}"
    );
    assert_eq!(read(&d.backing.join("x")), b"xx\n");
    assert_eq!(read(&d.backing.join("y")), b"y\nmore\n");
    assert!(
        !d.backing.join("z").exists(),
        "z committed after the failed change"
    );
    assert_same(
        "a failed commit",
        "the view before",
        &view,
        "right after",
        &manifest(&d.mnt, NO_MTIME),
    );
    let st = status(&d.store);
    assert_eq!(st["interrupted_commit"], 7, "{st:#}");
    let err = iso_fails("discard", &d.store, &["--after", "2"]);
    assert!(err.contains("interrupted commit"), "{err}");
    // The mount goes on taking changes.
    fs::write(d.mnt.join("w"), b"ww\n").unwrap();
    let view = manifest(&d.mnt, NO_MTIME);
    drop(immutable);
    commit(&d.store, None);
    assert_same(
        "the commit run again",
        "the view",
        &view,
        "backing",
        &manifest(&d.backing, NO_MTIME),
    );
    assert_eq!(
        status_summary(&status(&d.store)),
        "last_seq=9 committed_upto=9 pending_changes=0 files=0 data_bytes=0 interrupted_commit=null mounted=true"
    );
    assert_same(
        "after the commit run again",
        "the view before",
        &view,
        "the view",
        &manifest(&d.mnt, NO_MTIME),
    );

    // Failed again, then unmounted: a mount tries to finish the interrupted commit first;
    // while it cannot, it mounts with the rest pending and the same view.
    fs::write(d.mnt.join("dir/b"), b"bb\n").unwrap();
    let view = manifest(&d.mnt, NO_MTIME);
    let immutable = Immutable::new(&d.backing.join("dir"));
    let err = iso_fails("commit", &d.store, &[]);
    assert!(err.contains("change 10"), "{err}");
    m.stop();
    let m = d.mount();
    assert_same(
        "a mount whose interrupted commit cannot finish",
        "the view before",
        &view,
        "the view",
        &manifest(&d.mnt, NO_MTIME),
    );
    let st = status(&d.store);
    assert_eq!(st["interrupted_commit"], 11, "{st:#}");
    m.stop();
    drop(immutable);
    let m = d.mount();
    let st = status(&d.store);
    assert_eq!(
        status_summary(&st),
        "last_seq=11 committed_upto=11 pending_changes=0 files=0 data_bytes=0 interrupted_commit=null mounted=true"
    );
    assert_same(
        "a mount that finished an interrupted commit",
        "the view before",
        &view,
        "the view",
        &manifest(&d.mnt, NO_MTIME),
    );
    assert_same(
        "a mount that finished an interrupted commit",
        "the view before",
        &view,
        "backing",
        &manifest(&d.backing, NO_MTIME),
    );
    m.stop();
}

// ---------------------------------------------------------------------------------------
// Open files

/// A shared read-write mapping of a whole file, unmapped when dropped.
struct Map {
    ptr: *mut u8,
    len: usize,
}

impl Map {
    fn new(f: &File, len: usize) -> Map {
        // SAFETY: a fresh shared mapping of an open file; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Map {
            ptr: ptr.cast(),
            len,
        }
    }
    fn get(&self, off: usize, n: usize) -> Vec<u8> {
        assert!(off + n <= self.len);
        // SAFETY: within the mapping; volatile, since other descriptors change the pages.
        (0..n)
            .map(|i| unsafe { std::ptr::read_volatile(self.ptr.add(off + i)) })
            .collect()
    }
    fn put(&self, off: usize, b: &[u8]) {
        assert!(off + b.len() <= self.len);
        for (i, &x) in b.iter().enumerate() {
            // SAFETY: within the mapping.
            unsafe { std::ptr::write_volatile(self.ptr.add(off + i), x) };
        }
    }
    fn sync(&self) {
        // SAFETY: the whole mapping.
        let rc = unsafe { libc::msync(self.ptr.cast(), self.len, libc::MS_SYNC) };
        assert_eq!(rc, 0, "msync: {}", std::io::Error::last_os_error());
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: our mapping, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

#[test]
fn two_descriptors_and_a_shared_mapping_see_each_others_writes() {
    let d = dirs();
    let len = 3 * 4096;
    let mut want = pattern(len, 5);
    fs::write(d.backing.join("shared"), &want).unwrap();
    let before = fingerprint(&d.backing);
    let m = d.mount();
    let p = d.mnt.join("shared");
    let rw = || OpenOptions::new().read(true).write(true).open(&p).unwrap();
    let (f1, f2, f3) = (rw(), rw(), rw());
    let map = Map::new(&f3, len);
    let read_at = |f: &File, off: usize, n: usize| {
        let mut b = vec![0u8; n];
        f.read_exact_at(&mut b, off as u64).unwrap();
        b
    };
    assert_eq!(map.get(0, len), want, "the mapping before any write");

    // A write through one descriptor: the other and the mapping see it.
    f1.write_all_at(b"first write", 100).unwrap();
    want[100..111].copy_from_slice(b"first write");
    assert_eq!(read_at(&f2, 100, 11), b"first write", "f2 after f1's write");
    assert_eq!(
        map.get(100, 11),
        b"first write",
        "the mapping after f1's write"
    );
    // A store into the mapping: both descriptors see it.
    map.put(5000, b"mapped store");
    want[5000..5012].copy_from_slice(b"mapped store");
    assert_eq!(
        read_at(&f1, 5000, 12),
        b"mapped store",
        "f1 after a store into the mapping"
    );
    assert_eq!(
        read_at(&f2, 5000, 12),
        b"mapped store",
        "f2 after a store into the mapping"
    );
    // The other way round, across a block boundary.
    f2.write_all_at(b"across the boundary", 8190).unwrap();
    want[8190..8209].copy_from_slice(b"across the boundary");
    assert_eq!(
        map.get(8190, 19),
        b"across the boundary",
        "the mapping after f2's write"
    );
    assert_eq!(
        read_at(&f1, 8190, 19),
        b"across the boundary",
        "f1 after f2's write"
    );
    // A descriptor opened now, read-only, sees it all.
    let f4 = File::open(&p).unwrap();
    assert_eq!(read_at(&f4, 0, len), want, "a new read-only descriptor");
    map.sync();
    assert_eq!(read(&p), want, "a new open after msync");
    assert_untouched(&d.backing, &before, "with the file open and mapped");

    // Discarded while open and mapped: every descriptor and the mapping see the backing
    // contents at once.
    let original = pattern(len, 5);
    let pending = read(&p);
    discard(&d.store, None);
    assert_eq!(map.get(0, len), original, "the mapping right after discard");
    assert_eq!(read_at(&f1, 0, len), original, "f1 right after discard");
    assert_eq!(read_at(&f4, 0, len), original, "f4 right after discard");
    assert_eq!(read(&p), original, "a new open right after discard");
    assert_eq!(pending, want);
    // And they go on sharing writes.
    f2.write_all_at(b"second round", 12000).unwrap();
    let mut want = original;
    want[12000..12012].copy_from_slice(b"second round");
    assert_eq!(
        map.get(12000, 12),
        b"second round",
        "the mapping after discard and a write"
    );
    assert_eq!(read_at(&f1, 12000, 12), b"second round");
    map.sync();
    drop(map);
    drop((f1, f2, f3, f4));
    assert_eq!(read(&p), want, "after closing everything");
    assert_untouched(&d.backing, &before, "before commit");
    commit(&d.store, None);
    assert_eq!(read(&d.backing.join("shared")), want, "the committed file");
    assert_eq!(read(&p), want, "the view after commit");
    m.stop();
}

/// Unchanged files opened read-only are served by the kernel's passthrough, and such a
/// file cannot be written while open that way. close(2) returns before the kernel
/// releases the file, so reading a file, closing it and rewriting it at once (what
/// editors and build tools do) must not trip over the release still in flight; a file
/// really held open for reading refuses writers with ETXTBSY, and accepts them once closed.
#[test]
fn a_file_read_then_closed_can_be_rewritten_at_once_and_one_held_open_refuses_writers() {
    let d = dirs();
    const FILES: usize = 400;
    for i in 0..FILES {
        fs::write(d.backing.join(format!("f{i}")), pattern(5000, i as u8)).unwrap();
    }
    fs::write(d.backing.join("held"), b"original").unwrap();
    let before = fingerprint(&d.backing);
    let m = d.mount();
    // Several at once, so that releases queue behind other requests as on a busy machine.
    const THREADS: usize = 8;
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let mnt = &d.mnt;
            scope.spawn(move || {
                for i in (t..FILES).step_by(THREADS) {
                    let p = mnt.join(format!("f{i}"));
                    assert_eq!(read(&p), pattern(5000, i as u8), "f{i} before the rewrite");
                    // Half by open(O_TRUNC), half by truncate(2) on the path, then a write.
                    if i % 2 == 0 {
                        fs::write(&p, format!("rewritten {i}")).unwrap_or_else(|e| {
                            panic!("rewriting f{i} right after reading it: {e}")
                        });
                    } else {
                        truncate_path(&p).unwrap_or_else(|e| {
                            panic!("truncating f{i} right after reading it: {e}")
                        });
                        OpenOptions::new()
                            .write(true)
                            .open(&p)
                            .unwrap()
                            .write_all(format!("rewritten {i}").as_bytes())
                            .unwrap();
                    }
                }
            });
        }
    });
    for i in 0..FILES {
        assert_eq!(
            read_str(&d.mnt.join(format!("f{i}"))),
            format!("rewritten {i}")
        );
    }

    // Held open for reading: writers are refused, with the reason, until it is closed.
    let held = d.mnt.join("held");
    let reader = File::open(&held).unwrap();
    let e = OpenOptions::new().write(true).open(&held).unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(libc::ETXTBSY),
        "opening for writing a file held open read-only: {e}"
    );
    let e = truncate_path(&held).unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(libc::ETXTBSY),
        "truncating a file held open read-only: {e}"
    );
    let mut got = String::new();
    (&reader).read_to_string(&mut got).unwrap();
    assert_eq!(got, "original", "the reader's view");
    drop(reader);
    fs::write(&held, b"replaced").expect("writing once the reader has closed");
    assert_eq!(read_str(&held), "replaced");
    assert_eq!(read_str(&d.backing.join("held")), "original");
    assert_untouched(&d.backing, &before, "before commit");
    m.stop();
}

/// open(O_RDONLY|O_TRUNC) truncates, as Linux does for a caller who may write the file:
/// that open is not passed through to the untruncated backing file (it used to be, then
/// wait for itself to close and fail with ETXTBSY). A descriptor open before an
/// O_WRONLY|O_TRUNC open sees the truncation and the write after it at once. Root keeps
/// set-ID bits, and a running program's file is refused (ETXTBSY) and left whole.
#[test]
fn an_open_for_reading_that_truncates_truncates() {
    let d = dirs();
    fs::write(d.backing.join("f"), b"original contents").unwrap();
    fs::write(d.backing.join("g"), b"0123456789").unwrap();
    let before = fingerprint(&d.backing);
    let m = d.mount();
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_TRUNC)
        .open(d.mnt.join("f"))
        .unwrap_or_else(|e| panic!("open(O_RDONLY|O_TRUNC): {e}"));
    assert_eq!(f.metadata().unwrap().len(), 0, "fstat after the open");
    let mut got = Vec::new();
    (&f).read_to_end(&mut got).unwrap();
    assert_eq!(got, b"", "read after open(O_RDONLY|O_TRUNC)");
    drop(f);
    assert_eq!(read(&d.mnt.join("f")), b"");

    let g = d.mnt.join("g");
    let early = OpenOptions::new().read(true).write(true).open(&g).unwrap();
    let mut got = String::new();
    (&early).read_to_string(&mut got).unwrap();
    assert_eq!(got, "0123456789");
    OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&g)
        .unwrap()
        .write_all(b"ab")
        .unwrap();
    assert_eq!(
        early.metadata().unwrap().len(),
        2,
        "fstat of the earlier descriptor"
    );
    let mut buf = [0u8; 16];
    let n = early.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf[..n], b"ab", "read through the earlier descriptor");
    drop(early);

    // Root (CAP_FSETID) keeps set-ID bits through a truncation, as on ext4.
    let su = d.mnt.join("su");
    fs::write(&su, b"x").unwrap();
    fs::set_permissions(&su, fs::Permissions::from_mode(0o4755)).unwrap();
    OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&su)
        .unwrap();
    assert_eq!(fs::metadata(&su).unwrap().mode() & 0o7777, 0o4755);
    // Root in a user namespace has no CAP_FSETID where it counts (the kernel decides).
    run(Command::new("unshare")
        .args(["-r", "--", python(), "-c"])
        .arg(format!(
            "import os; os.close(os.open({:?}, os.O_WRONLY | os.O_TRUNC))",
            s(&su)
        )));
    assert_eq!(
        fs::metadata(&su).unwrap().mode() & 0o7777,
        0o755,
        "truncated by root in a user namespace"
    );

    // A running program's file: the kernel refuses the truncation after the open, so the
    // open must not have truncated it.
    let prog = d.mnt.join("prog");
    fs::copy("/bin/sleep", &prog).unwrap();
    let mut running = Command::new(&prog).arg("60").spawn().unwrap();
    let refused = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_TRUNC)
        .open(&prog)
        .map(drop);
    let size = fs::metadata(&prog).unwrap().len();
    running.kill().unwrap();
    running.wait().unwrap();
    assert_eq!(
        refused.map_err(|e| e.raw_os_error()),
        Err(Some(libc::ETXTBSY))
    );
    assert_eq!(
        size,
        fs::metadata("/bin/sleep").unwrap().len(),
        "the program's file"
    );

    assert_untouched(&d.backing, &before, "before commit");
    m.stop();
    commit(&d.store, None);
    assert_eq!(read(&d.backing.join("f")), b"");
    assert_eq!(read(&d.backing.join("g")), b"ab");
}

/// truncate(2) of a path to length 0.
fn truncate_path(p: &Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(s(p)).unwrap();
    // SAFETY: truncate(2) reads the NUL-terminated path and shares no other memory.
    if unsafe { libc::truncate(c.as_ptr(), 0) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Sends `request` on the mounted store's control socket (then closes its sending side)
/// and returns every line the daemon answers; a reset connection fails the test.
fn control_exchange(store: &Path, request: &[u8]) -> Vec<Value> {
    use std::io::BufRead;
    use std::os::unix::net::UnixStream;
    let conn = UnixStream::connect(store.join("control.sock")).expect("connect");
    conn.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    // The daemon may answer before it has read all of a long request: send from another
    // thread, as a client that writes and reads at once.
    let sender = {
        let mut conn = conn.try_clone().unwrap();
        let request = request.to_vec();
        std::thread::spawn(move || {
            // EPIPE is fine once the daemon has answered and closed.
            let _ = conn.write_all(&request);
            let _ = conn.shutdown(std::net::Shutdown::Write);
        })
    };
    let lines: Vec<Value> = std::io::BufReader::new(&conn)
        .lines()
        .map(|l| {
            let l = l.unwrap_or_else(|e| panic!("reading the daemon's answer: {e}"));
            serde_json::from_str(&l).unwrap_or_else(|e| panic!("answer {l:?}: {e}"))
        })
        .collect();
    sender.join().unwrap();
    lines
}

/// A malformed request on the control socket gets an answer that says what is wrong, and
/// the daemon goes on serving the mount and later requests.
#[test]
fn malformed_control_requests_get_a_clear_error_and_change_nothing() {
    let d = dirs();
    let m = d.mount();
    fs::write(d.mnt.join("f"), b"kept").unwrap();
    let long = {
        let mut l = vec![b' '; 200 << 10];
        l.extend_from_slice(b"{\"cmd\":\"discard\"}\n");
        l
    };
    let cases: [(&str, &[u8], &str); 7] = [
        ("not JSON", b"hello\n", "bad request"),
        ("not UTF-8", b"{\"cmd\":\"\xff\xfe\"}\n", "bad request"),
        (
            "unknown command",
            b"{\"cmd\":\"frobnicate\"}\n",
            "unknown command",
        ),
        (
            "a number of the wrong type",
            b"{\"cmd\":\"commit\",\"upto\":\"all\"}\n",
            "bad request",
        ),
        (
            "no newline before the end",
            b"{\"cmd\":\"stat",
            "bad request",
        ),
        ("nothing at all", b"", "bad request"),
        ("a line over 64 KiB", &long, "longer than"),
    ];
    for (what, request, expect) in cases {
        eprintln!("case: {what}");
        let answer = control_exchange(&d.store, request);
        let [only] = &answer[..] else {
            panic!("{what}: expected one answer line, got {answer:?}")
        };
        let err = only["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: {only}"));
        assert!(
            err.contains(expect),
            "{what}: {err:?} does not say {expect:?}"
        );
    }
    // Nothing was discarded or committed, and the daemon still serves.
    let st = status(&d.store);
    assert_eq!(num(&st, "pending_changes"), 2, "{st:#}");
    assert_eq!(read(&d.mnt.join("f")), b"kept");
    assert!(!d.backing.join("f").exists());
    fs::write(d.mnt.join("g"), b"after").unwrap();
    let ok = control_exchange(&d.store, b"{\"cmd\":\"status\"}\n");
    assert_eq!(ok.len(), 1, "{ok:?}");
    assert_eq!(num(&ok[0]["ok"], "pending_changes"), 4, "{ok:?}");
    m.stop();
}

/// A file's capabilities (`security.capability`) go with a write(2) to it, as on any file
/// system, and stay through a shared mapping's writeback; a commit leaves BACKING the same,
/// though writing there as root would drop them every time.
#[test]
fn a_write_drops_file_capabilities_and_a_mapping_keeps_them_through_commit() {
    const CAP: &[u8] = b"security.capability";
    // vfs_cap_data, revision 2, effective: CAP_NET_RAW (13) permitted.
    let mut caps = vec![0u8; 20];
    caps[..4].copy_from_slice(&0x0200_0001u32.to_le_bytes());
    caps[4..8].copy_from_slice(&(1u32 << 13).to_le_bytes());
    let d = dirs();
    for name in ["written", "mapped"] {
        fs::write(d.backing.join(name), vec![b'a'; 8192]).unwrap();
        set_xattr(&d.backing.join(name), "security.capability", &caps);
    }
    let before = fingerprint(&d.backing);
    let m = d.mount();
    OpenOptions::new()
        .write(true)
        .open(d.mnt.join("written"))
        .unwrap()
        .write_all_at(b"b", 10)
        .unwrap();
    let mapped = "import mmap, os, sys\n\
        fd = os.open(sys.argv[1], os.O_RDWR)\n\
        m = mmap.mmap(fd, 8192)\n\
        m[10:11] = b'b'\n\
        m.flush()\n";
    run(Command::new(python()).args(["-c", mapped, s(&d.mnt.join("mapped"))]));
    let caps_of = |p: &Path| xattrs(p).get(CAP).cloned();
    assert_eq!(
        caps_of(&d.mnt.join("written")),
        None,
        "a write keeps capabilities"
    );
    assert_eq!(caps_of(&d.mnt.join("mapped")), Some(caps.clone()));
    assert_untouched(&d.backing, &before, "before commit");

    // The capabilities go before the data: no commit point has the data with them.
    commit(&d.store, Some(1));
    assert_eq!(caps_of(&d.backing.join("written")), None);
    assert_eq!(read(&d.backing.join("written"))[10], b'a');
    commit(&d.store, None);
    for name in ["written", "mapped"] {
        assert_eq!(read(&d.backing.join(name))[10], b'b', "{name}");
    }
    assert_eq!(caps_of(&d.backing.join("written")), None);
    assert_eq!(
        caps_of(&d.backing.join("mapped")),
        Some(caps),
        "the commit dropped capabilities the view kept"
    );
    m.stop();
}

/// A name the view created that BACKING got meanwhile, or a name it renamed that BACKING
/// lost, stops the commit there with an error that says so; the file BACKING has under
/// the name is not taken for the view's (it kept its owner, mode and data).
#[test]
fn a_commit_stops_at_names_changed_in_backing_meanwhile_and_takes_nothing_over() {
    let d = dirs();
    let victim = d.backing.join("victim");
    fs::write(&victim, b"someone else's data").unwrap();
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(&victim, Some(1000), Some(1000)).unwrap();
    fs::write(d.backing.join("old"), b"to be moved").unwrap();
    let m = d.mount();
    fs::write(d.mnt.join("new"), b"the view's").unwrap();
    m.stop();
    fs::hard_link(&victim, d.backing.join("new")).unwrap();
    let before = fingerprint(&d.backing);
    let err = iso_fails("commit", &d.store, &[]);
    assert!(
        err.contains("create new") && err.contains("changed behind the store's back"),
        "{err}"
    );
    assert_untouched(&d.backing, &before, "after the refused create");
    assert_eq!(num(&status(&d.store), "pending_changes"), 2);

    // Once the name is free again, the same commit goes on.
    fs::remove_file(d.backing.join("new")).unwrap();
    commit(&d.store, None);
    assert_eq!(read(&d.backing.join("new")), b"the view's");
    assert_eq!(read(&victim), b"someone else's data");

    let m = d.mount();
    fs::rename(d.mnt.join("old"), d.mnt.join("moved")).unwrap();
    m.stop();
    fs::remove_file(d.backing.join("old")).unwrap();
    let err = iso_fails("commit", &d.store, &[]);
    assert!(
        err.contains("rename old -> moved") && err.contains("changed behind the store's back"),
        "{err}"
    );
    assert_eq!(num(&status(&d.store), "pending_changes"), 1);
}

/// A read-only bind mount of a directory over itself, undone when dropped.
struct ReadOnly(PathBuf);

impl ReadOnly {
    fn new(dir: &Path) -> ReadOnly {
        run(Command::new("mount").arg("--bind").arg(dir).arg(dir));
        let guard = ReadOnly(dir.to_path_buf());
        run(Command::new("mount")
            .args(["-o", "remount,ro,bind"])
            .arg(dir));
        guard
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A commit run again after one was killed, that stops on an error before changes the
/// killed one may have applied (here all of them), leaves room for them: the run after
/// it still takes them as its own, and a discard before them is still refused.
#[test]
fn a_commit_that_stops_where_a_killed_one_had_gone_on_still_finishes() {
    let d = dirs();
    // Killed at its only fence, the one at its end: all six changes are in BACKING, and
    // none is recorded.
    small_files_then_a_commit_killed(&d, 3, "syncfs", 1);
    for i in 1..=3 {
        assert_eq!(
            read(&d.backing.join(format!("f{i}"))),
            format!("file {i}\n").as_bytes()
        );
    }
    {
        let _ro = ReadOnly::new(&d.backing);
        let err = iso_fails("commit", &d.store, &[]);
        assert!(
            err.contains("change 1") && err.contains("Read-only"),
            "{err}"
        );
    }
    let st = status(&d.store);
    assert!(st.get("interrupted_commit_stopped").is_none(), "{st:#}");
    let err = iso_fails("discard", &d.store, &["--after", "0"]);
    assert!(err.contains("may have made some"), "{err}");
    commit(&d.store, None);
    for i in 1..=3 {
        assert_eq!(
            read(&d.backing.join(format!("f{i}"))),
            format!("file {i}\n").as_bytes()
        );
    }
    assert_eq!(num(&status(&d.store), "pending_changes"), 0);
}

/// A program waiting on the mount while a mounted commit runs can be killed: the commit
/// holds the view as long as it runs, and the kernel waits for the answer to a request the
/// daemon has taken even for SIGKILL, so the program lived until the commit ended. One
/// that only gets a signal it handles waits on, and is then served.
#[test]
fn a_program_waiting_for_a_mounted_commit_can_be_killed() {
    use std::time::Duration;
    let d = dirs();
    let fs_ = LoopFs::new(64);
    let backing = fs_.dir.join("backing");
    fs::create_dir(&backing).unwrap();
    let m = Mount::start(&backing, &d.mnt, &["--isolate", s(&d.store)]);
    fs::write(d.mnt.join("f"), b"pending\n").unwrap();
    let mut programs = Reaper::default();
    // BACKING frozen: the commit stops at its first write there, holding the view. (Thawed
    // first when the test fails, so that what waits on the commit can end.)
    run(Command::new("fsfreeze").arg("-f").arg(&fs_.dir));
    let _thaw = Undo("fsfreeze", "-u", fs_.dir.clone());
    let committer = programs.add(
        Command::new(bin())
            .args(["isolation", "commit"])
            .arg(&d.store)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !d.store.join("commit").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the commit never began"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // A name never looked up: its lookup reaches the daemon, and waits for the commit.
    let doomed = programs.add(
        Command::new("stat")
            .arg(d.mnt.join("never-seen"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    await_waiting_on_fuse(programs.0[doomed].id());
    signal(&programs.0[doomed], libc::SIGKILL);
    assert!(
        wait_timeout(&mut programs.0[doomed], Duration::from_secs(20)).is_some(),
        "a program waiting for the mounted commit survived SIGKILL"
    );
    let patient = programs.add(
        Command::new(python())
            .args([
                "-c",
                "import signal, sys\n\
                 signal.signal(signal.SIGUSR1, lambda *_: None)\n\
                 print('ready', flush=True)\n\
                 sys.stdout.write(open(sys.argv[1]).read())",
            ])
            // (Not run in the mount: a chdir there would wait for the commit.)
            .arg(d.mnt.join("f"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut stdout = programs.0[patient].stdout.take().unwrap();
    let mut ready = [0u8; 6];
    stdout.read_exact(&mut ready).unwrap();
    await_waiting_on_fuse(programs.0[patient].id());
    signal(&programs.0[patient], libc::SIGUSR1);
    run(Command::new("fsfreeze").arg("-u").arg(&fs_.dir));
    let status = wait_timeout(&mut programs.0[committer], Duration::from_secs(60))
        .expect("the commit did not end after the thaw");
    let err = stderr_of(&mut programs.0[committer]);
    assert!(status.success(), "commit: {status}\n{err}");
    let mut out = String::new();
    stdout.read_to_string(&mut out).unwrap();
    let status = wait_timeout(&mut programs.0[patient], Duration::from_secs(20)).unwrap();
    assert!(status.success(), "the patient program: {status}");
    assert_eq!(out, "pending\n", "what the patient program read");
    assert_eq!(fs::read(backing.join("f")).unwrap(), b"pending\n");
    m.stop();
}

/// BACKING and STORE named in bytes that are not UTF-8: the store records them exactly
/// (store.json's `backing` is then `{"raw": [bytes]}`), and `status` says them so. The
/// mount panicked making the store, and `status` failed (mounted, the daemon's request
/// thread panicked).
#[test]
fn a_store_and_backing_named_in_bytes_that_are_not_utf8() {
    use std::os::unix::ffi::OsStrExt;
    let d = dirs();
    let backing = d
        .tmp
        .path()
        .join(std::ffi::OsStr::from_bytes(b"backing-\xff"));
    let store = d
        .tmp
        .path()
        .join(std::ffi::OsStr::from_bytes(b"store-\xfe"));
    fs::create_dir(&backing).unwrap();
    let m = Mount::start_os(
        &[],
        &backing,
        &d.mnt,
        &["--isolate".as_ref(), store.as_os_str()],
    );
    fs::write(d.mnt.join("f"), b"data\n").unwrap();
    let raw = |v: &Value| -> Vec<u8> {
        v["raw"]
            .as_array()
            .unwrap_or_else(|| panic!("not raw bytes: {v}"))
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect()
    };
    let mounted = status(&store);
    assert_eq!(raw(&mounted["store"]), store.as_os_str().as_bytes());
    assert_eq!(raw(&mounted["backing"]), backing.as_os_str().as_bytes());
    assert_eq!(mounted["pending_changes"], 2, "{mounted}");
    m.stop();
    let unmounted = status(&store);
    assert_eq!(raw(&unmounted["backing"]), backing.as_os_str().as_bytes());
    let text = run(Command::new(bin())
        .args(["isolation", "status"])
        .arg(&store));
    assert!(text.contains("backing-"), "{text}");
    let out = run(Command::new(bin())
        .args(["isolation", "commit"])
        .arg(&store));
    assert!(out.contains("committed up to change 2"), "{out}");
    assert_eq!(fs::read(backing.join("f")).unwrap(), b"data\n");
}
