//! Stress, crash and resource-bound tests of the real daemon:
//!
//! - several processes racing namespace and data operations in one directory, while the
//!   kernel keeps dropping its dentries: no errors but the ones the backing file system
//!   itself gives under such races, no torn reads, and afterwards the mount shows exactly
//!   the backing tree;
//! - SIGKILL of the daemon under a client that fsyncs: the dead mount can be unmounted,
//!   remounted, and every acknowledged record is there;
//! - a tree far larger than the daemon's descriptor limit: walking, statting and reading
//!   all of it works, within a bounded number of descriptors and memory.
//!
//! `STRESS_SEED=N` repeats a stress run; the seed in use is printed.

mod common;
use common::*;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/scripts")
        .join(name)
}

/// The daemon's process state letter from /proc/PID/stat (`Z` for a zombie), if it exists.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.trim_start().chars().next()
}

fn assert_daemon_alive(m: &Mount) {
    let state = proc_state(m.pid());
    assert!(
        matches!(state, Some(s) if s != 'Z' && s != 'X'),
        "daemon {} is gone (state {state:?})",
        m.pid()
    );
    assert!(is_mounted(&m.mnt), "mount vanished while the daemon runs");
    std::fs::metadata(&m.mnt).expect("stat of the mount root");
}

/// The daemon's log has no panics, errors, or any of `also`.
fn assert_quiet_daemon(stderr: &str, also: &[&str]) {
    for bad in ["panicked", "ERROR"].iter().chain(also) {
        assert!(!stderr.contains(bad), "daemon logged {bad:?}:\n{stderr}");
    }
}

fn read_to_string_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_else(|e| format!("<{}: {e}>", path.display()))
}

// ---------------------------------------------------------------------------------------
// Tree snapshots

#[derive(Debug, PartialEq, Eq)]
enum Content {
    Dir,
    File(Vec<u8>),
    Symlink(PathBuf),
    Other,
}

#[derive(Debug, PartialEq, Eq)]
struct Node {
    mode: u32,
    size: u64,
    nlink: u64,
    ino: u64,
    content: Content,
}

/// Every object below `root` by relative path, with type, size, link count, inode number
/// and content. Any error (nothing changes the tree while this runs) is a failure.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Node> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Node>) {
        let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let entry = entry.unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
            let path = entry.path();
            let md = std::fs::symlink_metadata(&path)
                .unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()));
            let ft = md.file_type();
            let content = if ft.is_dir() {
                walk(root, &path, out);
                Content::Dir
            } else if ft.is_file() {
                Content::File(
                    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display())),
                )
            } else if ft.is_symlink() {
                Content::Symlink(
                    std::fs::read_link(&path)
                        .unwrap_or_else(|e| panic!("readlink {}: {e}", path.display())),
                )
            } else {
                assert!(
                    ft.is_fifo() || ft.is_socket() || ft.is_char_device() || ft.is_block_device()
                );
                Content::Other
            };
            out.insert(
                path.strip_prefix(root).unwrap().to_path_buf(),
                Node {
                    mode: md.mode(),
                    size: md.size(),
                    nlink: md.nlink(),
                    ino: md.ino(),
                    content,
                },
            );
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Describes how two snapshots differ (empty if they are equal).
fn diff_snapshots(mount: &BTreeMap<PathBuf, Node>, backing: &BTreeMap<PathBuf, Node>) -> String {
    let brief = |n: &Node| {
        let content = match &n.content {
            Content::File(data) => format!("file of {} bytes", data.len()),
            other => format!("{other:?}"),
        };
        format!(
            "mode {:o} size {} nlink {} ino {} {content}",
            n.mode, n.size, n.nlink, n.ino
        )
    };
    let mut out = String::new();
    let paths: BTreeSet<&PathBuf> = mount.keys().chain(backing.keys()).collect();
    for path in paths {
        let line = match (mount.get(path), backing.get(path)) {
            (Some(a), Some(b)) if a == b => continue,
            (Some(a), Some(b)) => {
                let data = match (&a.content, &b.content) {
                    (Content::File(x), Content::File(y)) if x != y => {
                        let at = x.iter().zip(y).position(|(p, q)| p != q);
                        format!(" (contents differ, first at byte {at:?})")
                    }
                    _ => String::new(),
                };
                format!(
                    "{}: mount has {}, backing has {}{data}",
                    path.display(),
                    brief(a),
                    brief(b)
                )
            }
            (Some(a), None) => format!("{}: only on the mount: {}", path.display(), brief(a)),
            (None, Some(b)) => format!("{}: only in backing: {}", path.display(), brief(b)),
            (None, None) => unreachable!(),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

// ---------------------------------------------------------------------------------------
// 1. Concurrent namespace and data operations

const WORKERS: u64 = 4;

/// Runs the workers on `m` and checks what they report; returns the seed.
fn run_workers(m: &Mount, args: &[&str], ops_per_worker: u64) -> u64 {
    let seed = seed_from_env("STRESS_SEED");
    eprintln!("stress {args:?}: seed {seed} (STRESS_SEED={seed} repeats it)");
    let shared = m.mnt.join("shared");
    for d in 0..4 {
        std::fs::create_dir_all(shared.join(format!("d{d}"))).unwrap();
    }
    let logs = m.dir.join("logs");
    std::fs::create_dir(&logs).unwrap();

    // Meanwhile the kernel keeps dropping its dentries and inodes, as under memory
    // pressure: FORGETs race lookups, listings and renames, and path walks look names up
    // again instead of finding them cached (this found a listing that gave the kernel a
    // name's old node).
    let dropping = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let dropper = {
        let dropping = dropping.clone();
        std::thread::spawn(move || {
            while dropping.load(std::sync::atomic::Ordering::Relaxed) {
                drop_dentries();
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let started = Instant::now();
    let mut workers = Reaper::default();
    for w in 0..WORKERS {
        let child = Command::new("python3")
            .arg(script("stress_worker.py"))
            .arg(&shared)
            .arg(w.to_string())
            .arg((seed + w).to_string())
            .arg(ops_per_worker.to_string())
            .stdin(Stdio::null())
            .stdout(File::create(logs.join(format!("{w}.out"))).unwrap())
            .stderr(File::create(logs.join(format!("{w}.err"))).unwrap())
            .spawn()
            .expect("python3");
        workers.add(child);
    }

    let deadline = Instant::now() + Duration::from_secs(120);
    let mut failures = Vec::new();
    let mut ok_ops: BTreeMap<String, u64> = BTreeMap::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for (w, child) in workers.0.iter_mut().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        let status = wait_timeout(child, left);
        let out = read_to_string_lossy(&logs.join(format!("{w}.out")));
        let err = read_to_string_lossy(&logs.join(format!("{w}.err")));
        match status {
            None => failures.push(format!(
                "worker {w} still running after 120 s (hung on the mount?); its wait channel: {}",
                read_to_string_lossy(Path::new(&format!("/proc/{}/wchan", child.id())))
            )),
            Some(s) if !s.success() => failures.push(format!("worker {w} failed ({s}):\n{err}")),
            Some(_) => {
                let summary: serde_json::Value = serde_json::from_str(out.trim())
                    .unwrap_or_else(|e| panic!("worker {w} summary {out:?}: {e}"));
                for (op, n) in summary["ok"].as_object().unwrap() {
                    *ok_ops.entry(op.clone()).or_default() += n.as_u64().unwrap();
                }
                for (errno, n) in summary["errors"].as_object().unwrap() {
                    *errors.entry(errno.clone()).or_default() += n.as_u64().unwrap();
                }
            }
        }
    }
    let elapsed = started.elapsed();
    dropping.store(false, std::sync::atomic::Ordering::Relaxed);
    dropper.join().unwrap();
    if !failures.is_empty() {
        drop(workers);
        // The mount is stopped when the caller's `Mount` is dropped during the unwind.
        panic!(
            "seed {seed}: {}\n(daemon pid {}, alive: {:?})",
            failures.join("\n"),
            m.pid(),
            proc_state(m.pid())
        );
    }
    eprintln!(
        "{} ops in {elapsed:.1?}; succeeded: {ok_ops:?}; expected race errors: {errors:?}",
        WORKERS * ops_per_worker
    );
    // The run did exercise every kind of operation, not just fail on absent names.
    for op in [
        "put_atomic",
        "create_mutable",
        "append",
        "overwrite",
        "truncate",
        "read",
        "rename",
        "link",
        "unlink",
        "symlink",
        "readlink",
        "mkdir",
        "rmdir",
        "rmtree",
        "rename_dir",
        "scan",
        "put_hot",
        "read_hot",
    ] {
        assert!(
            ok_ops.get(op).copied().unwrap_or(0) > 0,
            "seed {seed}: no {op} ever succeeded: {ok_ops:?}"
        );
    }

    assert_daemon_alive(m);
    seed
}

fn stress(args: &[&str], ops_per_worker: u64) {
    let m = Mount::new(args);
    let seed = run_workers(&m, args, ops_per_worker);
    let through_mount = snapshot(&m.mnt);
    let in_backing = snapshot(&m.backing);
    assert!(
        through_mount.len() > 20,
        "seed {seed}: suspiciously small tree: {:?}",
        through_mount.keys().collect::<Vec<_>>()
    );
    let diff = diff_snapshots(&through_mount, &in_backing);
    assert!(
        diff.is_empty(),
        "seed {seed}: the mount and the backing directory differ after the run:\n{diff}"
    );
    let daemon_err = m.stop();
    assert_quiet_daemon(&daemon_err, &["miscounted"]);
}

#[test]
fn stress_concurrent_namespace_and_data_ops() {
    stress(&[], 3000);
}

#[test]
fn stress_concurrent_namespace_and_data_ops_no_passthrough() {
    stress(&["--no-passthrough"], 3000);
}

/// `snapshot` with inode numbers replaced by the first path of their hard-link group, so
/// that two trees with different numbering but the same links compare equal.
fn links_by_path(tree: BTreeMap<PathBuf, Node>) -> BTreeMap<PathBuf, Node> {
    let mut first: BTreeMap<u64, u64> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for (n, (path, mut node)) in tree.into_iter().enumerate() {
        node.ino = *first.entry(node.ino).or_insert(n as u64);
        out.insert(path, node);
    }
    out
}

/// The same workers on an isolated mount: BACKING stays empty while they run; a mounted
/// commit of the first half of the changes, then one of the rest, make BACKING exactly
/// what the mount showed (names, contents, modes, link counts and which names are links
/// of one file), and the mount shows the same throughout.
#[test]
fn stress_concurrent_namespace_and_data_ops_isolated() {
    let store = tempfile::Builder::new()
        .prefix("interpose-test-store-")
        .tempdir_in(test_root())
        .unwrap();
    let store_arg = store.path().join("store");
    let args = ["--isolate", store_arg.to_str().unwrap()];
    let m = Mount::new(&args);
    let seed = run_workers(&m, &args, 2000);
    let view = links_by_path(snapshot(&m.mnt));
    assert!(
        view.len() > 20,
        "seed {seed}: suspiciously small tree: {:?}",
        view.keys().collect::<Vec<_>>()
    );
    let untouched = snapshot(&m.backing);
    assert!(
        untouched.is_empty(),
        "seed {seed}: BACKING changed before the commit: {:?}",
        untouched.keys().collect::<Vec<_>>()
    );
    let status: serde_json::Value = serde_json::from_str(&run(Command::new(bin())
        .args(["isolation", "status", "--json"])
        .arg(&store_arg)))
    .unwrap();
    let half = status["last_seq"].as_u64().unwrap() / 2;
    for upto in [Some(half), None] {
        let mut commit = Command::new(bin());
        commit.args(["isolation", "commit"]).arg(&store_arg);
        if let Some(n) = upto {
            commit.args(["--upto", &n.to_string()]);
        }
        run(&mut commit);
        let diff = diff_snapshots(&view, &links_by_path(snapshot(&m.mnt)));
        assert!(
            diff.is_empty(),
            "seed {seed}: the mount changed across the commit up to {upto:?}:\n{diff}"
        );
    }
    let diff = diff_snapshots(&view, &links_by_path(snapshot(&m.backing)));
    assert!(
        diff.is_empty(),
        "seed {seed}: BACKING after the commit differs from what the mount showed:\n{diff}"
    );
    let daemon_err = m.stop();
    assert_quiet_daemon(&daemon_err, &["miscounted"]);
}

#[test]
fn stress_concurrent_namespace_and_data_ops_uncached_with_filter() {
    // No kernel caching: every path resolution reaches the daemon, racing the renames; the
    // audit filter makes the daemon build a path for every operation; the smallest
    // descriptor cache makes it reopen most objects by file handle.
    stress(
        &[
            "--cache-timeout",
            "0",
            "--filter",
            "audit=/dev/null",
            "--fd-cache",
            "16",
        ],
        1500,
    );
}

// ---------------------------------------------------------------------------------------
// 2. SIGKILL of the daemon under a client that fsyncs

const LOG_FILES: u64 = 3;

/// CRC-32 (IEEE), as Python's zlib.crc32.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Record `i` exactly as crash_writer.py writes it.
fn record(i: u64) -> Vec<u8> {
    let body = format!("{i}:").repeat(1 + ((i * 7919) % 97) as usize);
    format!(
        "{i:08} {} {:08x} {body}\n",
        i % LOG_FILES,
        crc32(body.as_bytes())
    )
    .into_bytes()
}

fn new_file_content(name: &str) -> Vec<u8> {
    format!("{name}\n").repeat(50).into_bytes()
}

/// What the writer had acknowledged when it died.
struct Acked {
    /// Records 0..records had their fsync return.
    records: u64,
    /// New files whose rename and directory fsync returned.
    files: BTreeSet<String>,
}

impl Acked {
    /// The new-file step that may have been under way at the kill (after the last record).
    fn pending_file(&self) -> Option<String> {
        let last = self.records.checked_sub(1)?;
        let name = format!("new{}", last / 8);
        (last % 8 == 7 && !self.files.contains(&name)).then_some(name)
    }
}

/// Checks the writer's directory after the crash: every acknowledged record and file is
/// present and intact, and nothing is there that the writer had not at least started.
fn verify_crash_dir(dir: &Path, acked: &Acked, what: &str) {
    let pending_file = acked.pending_file();
    // With a new-file step under way, the next record was not begun.
    let max_present = if pending_file.is_some() {
        acked.records.checked_sub(1)
    } else {
        Some(acked.records)
    };
    let mut seen_files = BTreeSet::new();
    let names: BTreeSet<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{what}: {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    for name in &names {
        let path = dir.join(name);
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{what}: {name}: {e}"));
        if let Some(f) = name.strip_prefix("log").and_then(|n| n.parse::<u64>().ok()) {
            assert!(f < LOG_FILES, "{what}: unexpected {name}");
            let mut rest = &data[..];
            let mut next = f;
            while !rest.is_empty() {
                let want = record(next);
                if rest.len() < want.len() && want.starts_with(rest) {
                    break; // a torn tail is only allowed for an unacknowledged record
                }
                assert!(
                    rest.starts_with(&want),
                    "{what}: {name}: record {next} is corrupt or missing: found {:?}",
                    String::from_utf8_lossy(&rest[..rest.len().min(80)])
                );
                rest = &rest[want.len()..];
                next += LOG_FILES;
            }
            let torn = !rest.is_empty();
            // `next` is the first record of this file not complete in it.
            assert!(
                next >= acked.records,
                "{what}: {name}: acknowledged record {next} (of {}) is missing",
                acked.records
            );
            let last_present = if torn {
                Some(next)
            } else {
                next.checked_sub(LOG_FILES)
            };
            if let Some(last) = last_present {
                assert!(
                    max_present.is_some_and(|max| last <= max),
                    "{what}: {name}: record {last} is present, but only {} were acknowledged{}",
                    acked.records,
                    if pending_file.is_some() {
                        " and a new-file step was under way"
                    } else {
                        ""
                    }
                );
            }
        } else if let Some(tmp) = name.strip_suffix(".tmp") {
            assert_eq!(
                Some(tmp),
                pending_file.as_deref(),
                "{what}: leftover {name}, but that step was not under way at the kill"
            );
        } else if name.starts_with("new") {
            assert!(
                acked.files.contains(name) || pending_file.as_deref() == Some(name),
                "{what}: {name} exists but was never begun"
            );
            assert_eq!(
                data,
                new_file_content(name),
                "{what}: {name} has the wrong content"
            );
            seen_files.insert(name.clone());
        } else {
            panic!("{what}: unexpected entry {name}");
        }
    }
    for f in 0..LOG_FILES.min(acked.records) {
        assert!(
            names.contains(&format!("log{f}")),
            "{what}: log{f} is missing"
        );
    }
    let missing: Vec<_> = acked.files.difference(&seen_files).collect();
    assert!(
        missing.is_empty(),
        "{what}: acknowledged new files are missing: {missing:?}"
    );
}

/// One crash: the writer runs until `kill_after` records are acknowledged, the daemon is
/// SIGKILLed, and the data is checked in the backing directory and through a new mount.
fn crash_once(args: &[&str], kill_after: u64) {
    let what = format!("{args:?}, kill after {kill_after} records");
    let mut m = Mount::new(args);
    let work = m.mnt.join("work");
    std::fs::create_dir(&work).unwrap();
    let writer_err = m.dir.join("writer.err");
    let mut reaper = Reaper::default();
    let mut writer = Command::new("python3")
        .arg(script("crash_writer.py"))
        .arg(&work)
        .arg(LOG_FILES.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(File::create(&writer_err).unwrap())
        .spawn()
        .expect("python3");
    let stdout = writer.stdout.take().unwrap();
    let writer = reaper.add(writer);
    // A thread reads the acknowledgements, so that a hung writer cannot hang the test.
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut acked = Acked {
        records: 0,
        files: BTreeSet::new(),
    };
    let take = |line: String, acked: &mut Acked| match line.split_once(' ') {
        Some(("R", n)) => {
            let n: u64 = n.parse().unwrap();
            assert_eq!(n, acked.records, "{what}: acknowledgements out of order");
            acked.records += 1;
        }
        Some(("F", name)) => {
            acked.files.insert(name.to_owned());
        }
        _ => panic!("{what}: bad line from the writer: {line:?}"),
    };
    while acked.records < kill_after {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => take(line, &mut acked),
            Err(e) => panic!(
                "{what}: writer stopped after {} records ({e:?}):\n{}",
                acked.records,
                read_to_string_lossy(&writer_err)
            ),
        }
    }

    m.kill();
    // The writer must notice the dead daemon by itself (errors, not a hang) and stop.
    let status = wait_timeout(&mut reaper.0[writer], Duration::from_secs(20));
    let err = read_to_string_lossy(&writer_err);
    assert!(
        status.is_some(),
        "{what}: writer hangs on the dead mount; wait channel {}",
        read_to_string_lossy(Path::new(&format!("/proc/{}/wchan", reaper.0[writer].id())))
    );
    assert!(
        err.starts_with("crash_writer: "),
        "{what}: writer died unexpectedly ({status:?}):\n{err}"
    );
    reader.join().unwrap();
    // Everything it printed before it died was acknowledged too.
    while let Ok(line) = rx.try_recv() {
        take(line, &mut acked);
    }
    eprintln!(
        "{what}: {} records and {} files acknowledged; writer ended with {}",
        acked.records,
        acked.files.len(),
        err.trim()
    );

    assert!(
        is_mounted(&m.mnt),
        "{what}: the dead mount vanished by itself"
    );
    m.cleanup_dead();
    verify_crash_dir(&m.backing.join("work"), &acked, &format!("{what}, backing"));

    let m2 = Mount::start(&m.backing, &m.mnt, args);
    verify_crash_dir(&work, &acked, &format!("{what}, remounted"));
    // The new mount is fully usable.
    std::fs::write(work.join("after"), b"after the crash").unwrap();
    assert_eq!(
        std::fs::read(m.backing.join("work/after")).unwrap(),
        b"after the crash"
    );
    m2.stop();
}

/// Kill points, in acknowledged records: the very first, around a new-file step, and later.
const KILL_POINTS: [u64; 5] = [1, 8, 13, 40, 97];

#[test]
fn crash_keeps_acknowledged_writes() {
    for n in KILL_POINTS {
        crash_once(&[], n);
    }
}

#[test]
fn crash_keeps_acknowledged_writes_no_passthrough() {
    for n in KILL_POINTS {
        crash_once(&["--no-passthrough"], n);
    }
}

// ---------------------------------------------------------------------------------------
// 3. Bounded descriptors and memory over a large tree

const NOFILE: usize = 256;
const FILES_PER_DIR: usize = 200;
const MAX_RSS_KIB: u64 = 64 * 1024;

fn daemon_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("daemon's /proc/PID/fd")
        .count()
}

/// A field of /proc/PID/status in KiB (VmRSS, VmHWM).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn file_content(d: usize, f: usize) -> Vec<u8> {
    format!("dir {d} file {f}\n").repeat(1 + f % 5).into_bytes()
}

/// Fails the test on any error, naming EMFILE/ENFILE specially.
fn no_error<T>(res: std::io::Result<T>, what: &str, path: &Path) -> T {
    res.unwrap_or_else(|e| {
        let hint = match e.raw_os_error() {
            Some(libc::EMFILE) | Some(libc::ENFILE) => " (the daemon ran out of descriptors?)",
            _ => "",
        };
        panic!("{what} {}: {e}{hint}", path.display())
    })
}

fn bounded_resources(args: &[&str], dirs: usize) {
    let limit = format!("--nofile={NOFILE}:{NOFILE}");
    let m = Mount::new_with_prefix(&["prlimit", &limit, "--"], args);
    let pid = m.pid();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    assert!(
        limits.lines().any(|l| l.starts_with("Max open files")
            && l.split_whitespace().nth(3) == Some(&NOFILE.to_string())),
        "the daemon does not run with the low limit:\n{limits}"
    );

    let started = Instant::now();
    for d in 0..dirs {
        let dir = m.backing.join(format!("d{d:03}"));
        std::fs::create_dir(&dir).unwrap();
        for f in 0..FILES_PER_DIR {
            std::fs::write(dir.join(format!("f{f:03}")), file_content(d, f)).unwrap();
        }
    }
    let created = started.elapsed();

    // Sampled after each directory: the descriptors the daemon holds.
    let mut max_fds = daemon_fds(pid);
    let started = Instant::now();
    for d in 0..dirs {
        for f in 0..FILES_PER_DIR {
            let path = m.mnt.join(format!("d{d:03}/f{f:03}"));
            let md = no_error(std::fs::symlink_metadata(&path), "stat", &path);
            assert!(md.is_file(), "{}: not a file", path.display());
            assert_eq!(
                md.len(),
                file_content(d, f).len() as u64,
                "{}",
                path.display()
            );
        }
        max_fds = max_fds.max(daemon_fds(pid));
    }
    let statted = started.elapsed();
    let started = Instant::now();
    for d in 0..dirs {
        for f in 0..FILES_PER_DIR {
            let path = m.mnt.join(format!("d{d:03}/f{f:03}"));
            let data = no_error(std::fs::read(&path), "read", &path);
            assert_eq!(data, file_content(d, f), "{}", path.display());
        }
        max_fds = max_fds.max(daemon_fds(pid));
    }
    let read = started.elapsed();
    let started = Instant::now();
    // find(1) reads every directory and (for %s) stats every entry by name.
    let out = Command::new("find")
        .arg(&m.mnt)
        .args(["-mindepth", "1", "-printf", "%y %s %P\\n"])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "find failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = String::from_utf8(out.stdout).unwrap();
    let (found_dirs, found): (Vec<&str>, Vec<&str>) =
        listing.lines().partition(|l| l.starts_with("d "));
    assert_eq!(found_dirs.len(), dirs, "directories found by find");
    let found: BTreeSet<String> = found.into_iter().map(str::to_owned).collect();
    let want: BTreeSet<String> = (0..dirs)
        .flat_map(|d| {
            (0..FILES_PER_DIR)
                .map(move |f| format!("f {} d{d:03}/f{f:03}", file_content(d, f).len()))
        })
        .collect();
    assert!(
        found == want,
        "find saw {} files, {} wrong or missing, e.g. {:?}",
        found.len(),
        want.difference(&found).count(),
        want.difference(&found).next()
    );
    let found_in = started.elapsed();
    max_fds = max_fds.max(daemon_fds(pid));

    assert_daemon_alive(&m);
    let rss = status_kib(pid, "VmRSS");
    let hwm = status_kib(pid, "VmHWM");
    eprintln!(
        "{args:?}: created {} files in {created:.1?}; through the mount: stat {statted:.1?}, read {read:.1?}, find {found_in:.1?}; daemon: at most {max_fds} fds (limit {NOFILE}), VmRSS {rss} KiB, peak {hwm} KiB",
        dirs * FILES_PER_DIR
    );
    assert!(
        max_fds < NOFILE,
        "daemon reached its descriptor limit: {max_fds} open"
    );
    assert!(
        hwm < MAX_RSS_KIB,
        "daemon memory peaked at {hwm} KiB (> {MAX_RSS_KIB} KiB)"
    );
    let daemon_err = m.stop();
    assert_quiet_daemon(
        &daemon_err,
        &["Too many open files", "EMFILE", "miscounted"],
    );
}

#[test]
fn bounded_fds_and_memory_on_a_large_tree() {
    bounded_resources(&[], 100);
}

#[test]
fn bounded_fds_and_memory_on_a_large_tree_uncached() {
    // No kernel caching: every access looks its names up again (and the kernel may forget
    // nodes early). Fewer files, as each access costs several requests.
    bounded_resources(&["--cache-timeout", "0"], 50);
}
