//! Hostile journals: records whose checksums are right but whose changes the daemon never
//! writes (huge or overflowing block runs and sizes, paths that climb out with `..` or
//! start at `/`, unknown kinds and flags, values of the wrong type). Whatever a store
//! holds, `status`, `log`, a mount (and every read through it) and `commit` must answer
//! with a result or a clear error: no panic, no hang, and nothing outside BACKING touched.
//!
//! The journal is made by a real mount, then one field of one record is replaced and the
//! record's checksum written again. Cases are listed (`TARGETED`) and drawn at random
//! (`INTERPOSE_HOSTILE_SEED=N` replays the random ones of one seed).

mod common;
mod support;

use common::*;
use serde_json::{json, Value};
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use support::plain_dir;

const HEADER: usize = 64;
const RECORD_HEADER: usize = 24;

struct Record {
    seq: u64,
    meta: Value,
    data: Vec<u8>,
}

fn read_journal(path: &Path) -> (Vec<u8>, Vec<Record>) {
    let bytes = fs::read(path).unwrap();
    let header = bytes[..HEADER].to_vec();
    let mut recs = Vec::new();
    let mut off = HEADER;
    while off + RECORD_HEADER <= bytes.len() {
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap()) as usize;
        let len = u32_at(off);
        if len == 0 || bytes[off..].starts_with(b"IPSYNCED") {
            break; // zeros written ahead, or the last sync's mark
        }
        let seq = u64::from_le_bytes(bytes[off + 8..off + 16].try_into().unwrap());
        let meta_len = u32_at(off + 16);
        let meta_at = off + RECORD_HEADER;
        let meta = serde_json::from_slice(&bytes[meta_at..meta_at + meta_len]).unwrap();
        let data = bytes[meta_at + meta_len..off + len].to_vec();
        recs.push(Record { seq, meta, data });
        off += len;
    }
    (header, recs)
}

/// Writes the records back with their lengths and checksums made right; `data_len` as the
/// runs ask (wrapping, as a careless reader would compute it), the data cut or padded.
fn write_journal(path: &Path, header: &[u8], recs: &[Record]) {
    let mut out = header.to_vec();
    for r in recs {
        let meta = serde_json::to_vec(&r.meta).unwrap();
        let want = claimed_data_len(&r.meta);
        let mut data = r.data.clone();
        // Keep hostile sizes from making the file huge: a record longer than the reader's
        // limit is a torn or corrupt record, which other tests cover.
        data.resize(want.min(1 << 20) as usize, 0xa5);
        let len = RECORD_HEADER + meta.len() + data.len();
        let mut rec = Vec::with_capacity(len);
        rec.extend_from_slice(&(len as u32).to_le_bytes());
        rec.extend_from_slice(&[0; 4]);
        rec.extend_from_slice(&r.seq.to_le_bytes());
        rec.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        rec.extend_from_slice(&(want as u32).to_le_bytes());
        rec.extend_from_slice(&meta);
        rec.extend_from_slice(&data);
        let crc = crc32c::crc32c(&rec[8..]);
        rec[4..8].copy_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&rec);
    }
    fs::write(path, out).unwrap();
}

fn claimed_data_len(meta: &Value) -> u64 {
    let Some(runs) = meta["runs"].as_array() else {
        return 0;
    };
    runs.iter()
        .filter(|r| r["hole"] != json!(true) && r["alloc"] != json!(true))
        .map(|r| r["count"].as_u64().unwrap_or(0).wrapping_mul(4096))
        .fold(0u64, u64::wrapping_add)
}

/// The pristine case: BACKING with a few files, and a store holding every kind of change.
struct Base {
    _tmp: tempfile::TempDir,
    backing: PathBuf,
    store: PathBuf,
}

fn base() -> Base {
    let tmp = plain_dir("interpose-test-hostile-");
    let backing = tmp.path().join("backing");
    let mnt = tmp.path().join("mnt");
    let store = tmp.path().join("store");
    fs::create_dir_all(backing.join("dir/sub")).unwrap();
    fs::write(backing.join("keep.txt"), b"kept\n").unwrap();
    fs::write(backing.join("dir/inner"), vec![3u8; 3 * 4096 + 100]).unwrap();
    fs::create_dir(&mnt).unwrap();
    let m = Mount::start(&backing, &mnt, &["--isolate", store.to_str().unwrap()]);
    let p = |n: &str| mnt.join(n);
    fs::create_dir(p("made")).unwrap();
    fs::write(p("made/f"), vec![7u8; 2 * 4096 + 10]).unwrap();
    let f = fs::OpenOptions::new()
        .write(true)
        .open(p("dir/inner"))
        .unwrap();
    f.write_all_at(b"one block changed", 4096).unwrap();
    f.set_len(5000).unwrap();
    drop(f);
    std::os::unix::fs::symlink("made/f", p("link")).unwrap();
    fs::hard_link(p("made/f"), p("made/hard")).unwrap();
    support::mkfifo(&p("fifo"), 0o644);
    fs::set_permissions(p("keep.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    support::set_times(&p("keep.txt"), 1_000_000_000, 1_500_000_000);
    support::set_xattr(&p("made/f"), "user.note", b"value");
    fs::rename(p("made/hard"), p("dir/moved")).unwrap();
    fs::remove_file(p("dir/moved")).unwrap();
    fs::remove_dir(p("dir/sub")).unwrap();
    rustix::fs::removexattr(p("made/f").as_path(), "user.note").unwrap();
    m.stop();
    Base {
        _tmp: tmp,
        backing,
        store,
    }
}

/// Values put in place of a field: numbers at the edges, paths that climb out or are not
/// paths, runs that overflow or overlap, things of the wrong type.
fn hostile_values() -> Vec<Value> {
    let long = "x/".repeat(3000);
    vec![
        json!(0),
        json!(1),
        json!(4096),
        json!(u32::MAX),
        json!(1u64 << 32),
        json!(1u64 << 52),
        json!(1u64 << 62),
        json!(i64::MAX as u64),
        json!(u64::MAX),
        json!(-1),
        json!(""),
        json!("."),
        json!(".."),
        json!("../outside/x"),
        json!("made/../../outside"),
        json!("/etc/passwd"),
        json!("made//f"),
        json!("made/f/"),
        json!("made/f/deeper"),
        json!("link/through"),
        json!(long),
        json!({"raw": [0]}),
        json!({"raw": [46, 46, 47, 111]}),
        json!({"raw": []}),
        json!([]),
        json!([{"block": u64::MAX, "count": 1}]),
        json!([{"block": 0, "count": 1u64 << 52}]),
        json!([{"block": (1u64 << 52) - 1, "count": 2}]),
        json!([{"block": 3, "count": 0}]),
        json!([{"block": 0, "count": 1, "hole": true, "alloc": true}]),
        json!([{"block": 0, "count": 2}, {"block": 1, "count": 2}]),
        json!([{"block": 9, "count": 1}, {"block": 2, "count": 1}]),
        json!([{"block": 1u64 << 40, "count": 1u64 << 40, "hole": true}]),
        json!([{"block": 0, "count": 1u64 << 40, "alloc": true}]),
        json!([i64::MIN, 0]),
        json!([0, 2_000_000_000u32]),
        json!([i64::MAX, 999_999_999]),
        json!("file"),
        json!("dir"),
        json!({"symlink": {"target": ""}}),
        json!({"symlink": {"target": "/etc/passwd"}}),
        json!({"node": {"rdev": u64::MAX}}),
        json!({"unknown": {}}),
        json!(0o170777),
        json!(0o140755),
        json!(0o060644),
        json!(0o020644),
        json!(0o777),
        json!(u32::MAX),
        json!("system.posix_acl_access"),
        json!("trusted.x"),
        json!("security.capability"),
        json!([1, 2, 3]),
        json!(vec![0u8; 70_000]),
        json!(null),
        json!(true),
        json!({}),
        json!("data"),
        json!("rename"),
        json!("no-such-op"),
    ]
}

/// Every place in `v` a value can be put: JSON pointers to its fields, recursively.
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let p = format!("{at}/{k}");
                out.push(p.clone());
                pointers(x, p, out);
            }
        }
        Value::Array(a) if a.len() <= 8 => {
            for (i, x) in a.iter().enumerate() {
                let p = format!("{at}/{i}");
                out.push(p.clone());
                pointers(x, p, out);
            }
        }
        _ => {}
    }
}

fn same_type(a: &Value, b: &Value) -> bool {
    std::mem::discriminant(a) == std::mem::discriminant(b)
}

/// Listed cases: (op of the record, field, value); each applied to the first record of
/// that op. These are the ones an overflow or a path that climbs out would show in.
const TARGETED: &[(&str, &str, usize)] = &[
    ("data", "/runs", 25),
    ("data", "/runs", 26),
    ("data", "/runs", 27),
    ("data", "/runs", 28),
    ("data", "/runs", 29),
    ("data", "/runs", 30),
    ("data", "/runs", 31),
    ("data", "/runs", 32),
    ("data", "/runs", 33),
    ("data", "/size", 6),
    ("data", "/size", 7),
    ("data", "/size", 8),
    ("data", "/path", 13),
    ("data", "/path", 14),
    ("data", "/path", 15),
    ("create", "/path", 12),
    ("create", "/path", 13),
    ("create", "/path", 15),
    ("create", "/path", 19),
    ("create", "/path", 10),
    ("create", "/mode", 44),
    ("create", "/mode", 45),
    ("create", "/kind", 42),
    ("mkdir", "/path", 14),
    ("symlink", "/kind", 41),
    ("link", "/from", 13),
    ("link", "/to", 15),
    ("rename", "/from", 16),
    ("rename", "/to", 13),
    ("rename", "/flags", 49),
    ("unlink", "/path", 13),
    ("unlink", "/path", 12),
    ("rmdir", "/path", 12),
    ("rmdir", "/path", 14),
    ("setattr", "/path", 14),
    ("setattr", "/mode", 44),
    ("setattr", "/mtime", 35),
    ("setattr", "/mtime", 36),
    ("setattr", "/atime", 37),
    ("setxattr", "/name", 50),
    ("setxattr", "/name", 10),
    ("setxattr", "/value", 54),
    ("removexattr", "/path", 15),
    ("data", "/at", 35),
    ("data", "/op", 58),
];

fn op_of(meta: &Value) -> String {
    let op = meta["op"].as_str().unwrap_or("?");
    match (op, &meta["kind"]) {
        ("create", Value::String(k)) if k == "dir" => "mkdir".into(),
        ("create", Value::Object(k)) if k.contains_key("symlink") => "symlink".into(),
        _ => op.into(),
    }
}

/// One case: the base store with `edit` made to record `index`, run through every command.
fn run_case(base: &Base, what: &str, index: usize, pointer: &str, value: &Value) {
    let case = plain_dir("interpose-test-hostile-case-");
    let backing = case.path().join("backing");
    let store = case.path().join("store");
    let mnt = case.path().join("mnt");
    let outside = case.path().join("outside");
    run(Command::new("cp")
        .arg("-a")
        .arg(&base.backing)
        .arg(&backing));
    fs::create_dir(&store).unwrap();
    fs::copy(base.store.join("journal"), store.join("journal")).unwrap();
    // The store, made for the base's BACKING, now belongs to this copy of it.
    let mut meta: Value =
        serde_json::from_slice(&fs::read(base.store.join("store.json")).unwrap()).unwrap();
    let st = fs::metadata(&backing).unwrap();
    meta["backing"] = json!(backing.to_str().unwrap());
    meta["backing_dev"] = json!(std::os::unix::fs::MetadataExt::dev(&st));
    meta["backing_ino"] = json!(std::os::unix::fs::MetadataExt::ino(&st));
    fs::write(store.join("store.json"), meta.to_string()).unwrap();
    fs::create_dir(&mnt).unwrap();
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("x"), b"outside\n").unwrap();
    let (header, mut recs) = read_journal(&store.join("journal"));
    let meta = &mut recs[index].meta;
    // The field, or a new one of that name (a setattr that sets no mtime gets one).
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    match meta.pointer_mut(parent) {
        Some(Value::Object(fields)) => {
            fields.insert(key.to_string(), value.clone());
        }
        Some(Value::Array(items)) => items[key.parse::<usize>().unwrap()] = value.clone(),
        _ => panic!("{what}: no {parent} in {meta}"),
    }
    let edited = meta.to_string();
    write_journal(&store.join("journal"), &header, &recs);
    let label = format!(
        "{what}: record {index} (seq {}) with {pointer} = {}",
        recs[index].seq,
        short(&value.to_string())
    );
    let outside_before = listing(case.path(), &outside);

    for args in [&["status"][..], &["log", "--json"][..]] {
        let mut c = Command::new(bin());
        c.arg("isolation").arg(args[0]).arg(&store).args(&args[1..]);
        finishes_cleanly(&label, &mut c);
    }
    let mounted = mount_and_read_everything(&label, &backing, &mnt, &store);
    let mut c = Command::new(bin());
    c.args(["isolation", "commit"]).arg(&store);
    let committed = finishes_cleanly(&label, &mut c);
    event(format_args!(
        "hostile case: mounted {mounted}, committed {committed}: {label}"
    ));
    assert_eq!(
        listing(case.path(), &outside),
        outside_before,
        "{label}: something outside BACKING changed\nthe record: {}",
        short(&edited)
    );
}

fn short(s: &str) -> String {
    if s.len() > 160 {
        format!("{}... ({} bytes)", &s[..160], s.len())
    } else {
        s.to_string()
    }
}

/// The case directory's entries and the outside file's contents and mode.
fn listing(dir: &Path, outside: &Path) -> String {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let meta = fs::symlink_metadata(outside.join("x"));
    format!(
        "{names:?} {:?} {:?} {:?}",
        fs::read(outside.join("x")).ok(),
        meta.as_ref().map(|m| m.permissions().mode()).ok(),
        fs::read_dir(outside).map(|d| d.count()).ok()
    )
}

/// Runs a command to its end (at most 60 s): it may fail, but with exit status 1 and a
/// message, not a panic, a signal or a hang.
fn finishes_cleanly(label: &str, c: &mut Command) -> bool {
    let mut child = c
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_timeout(&mut child, Duration::from_secs(60));
    let status = match status {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{label}: {c:?} did not finish in 60 s");
        }
    };
    let err = stderr_of(&mut child);
    assert!(
        !err.contains("panicked") && matches!(status.code(), Some(0 | 1)),
        "{label}: {c:?} ended with {status}:\n{err}"
    );
    if status.code() == Some(1) {
        assert!(!err.trim().is_empty(), "{label}: {c:?} failed silently");
    }
    status.success()
}

/// Mounts the store (which may be refused, clearly), reads everything the view shows, and
/// checks the daemon is still there to unmount cleanly.
fn mount_and_read_everything(label: &str, backing: &Path, mnt: &Path, store: &Path) -> bool {
    let mut child = Command::new(bin())
        .args(["fs", "mount"])
        .arg(backing)
        .arg(mnt)
        .args(transport_args())
        .arg("--isolate")
        .arg(store)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let first = BufReader::new(child.stdout.take().unwrap()).lines().next();
    if !matches!(&first, Some(Ok(l)) if l.starts_with("mounted ")) {
        let status = wait_timeout(&mut child, Duration::from_secs(30));
        let err = stderr_of(&mut child);
        assert!(
            status.is_some_and(|s| s.code() == Some(1)) && !err.contains("panicked"),
            "{label}: the mount neither mounted nor refused cleanly ({status:?}):\n{err}"
        );
        assert!(!is_mounted(mnt), "{label}: refused, yet mounted");
        return false;
    }
    event(format_args!("mounted pid {} {}", child.id(), mnt.display()));
    walk(mnt);
    let alive = child.try_wait().unwrap().is_none();
    signal(&child, libc::SIGTERM);
    let status = wait_timeout(&mut child, Duration::from_secs(30));
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    if is_mounted(mnt) {
        let _ = Command::new("umount").arg("-l").arg(mnt).status();
    }
    event(format_args!("stop {}: {status:?}", mnt.display()));
    assert!(
        alive && status.is_some_and(|s| s.success()) && !err.contains("panicked"),
        "{label}: the daemon did not survive reading the view (alive after reading: {alive}, exit {status:?}):\n{err}"
    );
    true
}

/// Every entry: its attributes, its contents or target, its extended attributes, and
/// where its data lies (SEEK_DATA / SEEK_HOLE). Errors are answers too; only a dead
/// daemon (ENOTCONN) is not.
fn walk(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries {
        let Ok(e) = e else { continue };
        let p = e.path();
        let Ok(m) = fs::symlink_metadata(&p) else {
            continue;
        };
        let _ = rustix::fs::llistxattr(&p, &mut [0u8; 4096][..]);
        if m.is_dir() {
            walk(&p);
        } else if m.file_type().is_symlink() {
            let _ = fs::read_link(&p);
        } else if m.is_file() {
            if let Ok(mut f) = fs::File::open(&p) {
                let mut buf = vec![0u8; 1 << 20];
                let mut total = 0u64;
                // Enough to touch every extent of a sane file; a hostile size is not read
                // to its end.
                while total < 64 << 20 {
                    match f.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => total += n as u64,
                    }
                }
                for whence in [rustix::fs::SeekFrom::Data(0), rustix::fs::SeekFrom::Hole(0)] {
                    let _ = rustix::fs::seek(&f, whence);
                }
            }
        }
    }
    let probe = fs::metadata(dir);
    assert!(
        !matches!(&probe, Err(e) if e.raw_os_error() == Some(libc::ENOTCONN)),
        "the mount is dead (ENOTCONN)"
    );
}

#[test]
fn hostile_records_get_an_answer_or_a_clear_error_never_a_panic() {
    let base = base();
    let (_, recs) = read_journal(&base.store.join("journal"));
    let ops: Vec<String> = recs.iter().map(|r| op_of(&r.meta)).collect();
    let values = hostile_values();
    for (op, pointer, value) in TARGETED {
        let index = ops
            .iter()
            .position(|o| o == op)
            .unwrap_or_else(|| panic!("no {op} record in the base journal: {ops:?}"));
        run_case(&base, "targeted", index, pointer, &values[*value]);
    }
    let seed = seed_from_env("INTERPOSE_HOSTILE_SEED");
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    for case in 0..60 {
        use rand::Rng;
        let index = rng.gen_range(0..recs.len());
        let mut ptrs = Vec::new();
        pointers(&recs[index].meta, String::new(), &mut ptrs);
        let pointer = &ptrs[rng.gen_range(0..ptrs.len())];
        // Mostly a value of the field's own type, which gets past parsing.
        let old = recs[index].meta.pointer(pointer).unwrap();
        let same: Vec<&Value> = values.iter().filter(|v| same_type(v, old)).collect();
        let value = if !same.is_empty() && rng.gen_range(0..5) > 0 {
            same[rng.gen_range(0..same.len())]
        } else {
            &values[rng.gen_range(0..values.len())]
        };
        run_case(
            &base,
            &format!("seed {seed} (INTERPOSE_HOSTILE_SEED={seed}), case {case}"),
            index,
            pointer,
            value,
        );
    }
}

/// A journal header (checksum right) whose base sequence number leaves no room to count
/// on is refused; a large one that does is taken.
#[test]
fn sequence_numbers_at_the_end_of_the_range_are_refused_not_wrapped() {
    let base = base();
    let (mut header, mut recs) = read_journal(&base.store.join("journal"));
    for (start, works) in [
        (u64::MAX, false),
        (u64::MAX - 1, false),
        (1u64 << 63, false),
        (1u64 << 40, true),
    ] {
        header[16..24].copy_from_slice(&start.to_le_bytes());
        let crc = crc32c::crc32c(&header[..60]);
        header[60..64].copy_from_slice(&crc.to_le_bytes());
        for (i, r) in recs.iter_mut().enumerate() {
            r.seq = start.wrapping_add(i as u64 + 1);
        }
        let store = plain_dir("interpose-test-hostile-seq-");
        fs::copy(
            base.store.join("store.json"),
            store.path().join("store.json"),
        )
        .unwrap();
        write_journal(&store.path().join("journal"), &header, &recs);
        let mut c = Command::new(bin());
        c.args(["isolation", "status"]).arg(store.path());
        let label = format!("base sequence {start}");
        assert_eq!(finishes_cleanly(&label, &mut c), works, "{label}");
    }
}

/// The state of an interrupted commit (checksum right) that does not fit the journal (its
/// target or what it applied outside the journal's changes, what it applied beyond its
/// target) is refused by every command, which leave BACKING and
/// the journal as they were: taken at its word it would skip changes or compact the
/// journal past its end. One that fits is finished.
#[test]
fn an_interrupted_commit_that_does_not_fit_the_journal_is_refused() {
    let base = base();
    let (_, recs) = read_journal(&base.store.join("journal"));
    let last = recs.last().unwrap().seq;
    let state = |target: u64, applied: u64, exchange: u64| {
        let mut b = [0u8; 48];
        b[0..8].copy_from_slice(b"IPCOMIT1");
        for (i, v) in [target, applied, exchange, 0].into_iter().enumerate() {
            b[8 + 8 * i..16 + 8 * i].copy_from_slice(&v.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b[..40]);
        b[40..44].copy_from_slice(&crc.to_le_bytes());
        b
    };
    let before = support::manifest(
        &base.backing,
        support::ManifestOpts {
            mtime: true,
            owner: true,
        },
    );
    let journal = fs::read(base.store.join("journal")).unwrap();
    let mnt = base._tmp.path().join("mnt");
    for (target, applied, exchange) in [
        (u64::MAX, 0, 0),
        (last, u64::MAX, 0),
        (2, 4, 0),
        (last + 1, 0, 0),
    ] {
        fs::write(base.store.join("commit"), state(target, applied, exchange)).unwrap();
        let label = format!("commit state target {target}, applied {applied}, exchange {exchange}");
        for args in [
            &["isolation", "status"][..],
            &["isolation", "commit"][..],
            &["isolation", "discard"][..],
        ] {
            let mut c = Command::new(bin());
            c.args(args).arg(&base.store);
            let out = support::output(&mut c);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.code() == Some(1) && err.contains("does not fit the journal"),
                "{label}: {args:?}: {}",
                support::describe(&out)
            );
        }
        let refused = mount_refused(
            &base.backing,
            &mnt,
            &["--isolate", base.store.to_str().unwrap()],
        );
        assert!(
            refused.contains("does not fit the journal"),
            "{label}: {refused}"
        );
        assert_eq!(
            fs::read(base.store.join("journal")).unwrap(),
            journal,
            "{label}: the journal changed"
        );
        support::assert_same(
            &label,
            "backing before",
            &before,
            "backing after",
            &support::manifest(
                &base.backing,
                support::ManifestOpts {
                    mtime: true,
                    owner: true,
                },
            ),
        );
    }
    // A discard giving up a commit interrupted in a name exchange lowers the target below
    // the exchange's number before it cuts the journal: that state is taken.
    fs::write(base.store.join("commit"), state(0, 0, 1)).unwrap();
    let mut c = Command::new(bin());
    c.args(["isolation", "status"]).arg(&base.store);
    assert!(finishes_cleanly(
        "a lowered target below an exchange",
        &mut c
    ));
    // One that fits: nothing applied yet, everything to go.
    fs::write(base.store.join("commit"), state(last, 0, 0)).unwrap();
    let mut c = Command::new(bin());
    c.args(["isolation", "commit"]).arg(&base.store);
    assert!(finishes_cleanly("a commit state that fits", &mut c));
    assert!(!base.store.join("commit").exists());
    assert!(fs::read(base.backing.join("made/f")).unwrap().len() == 2 * 4096 + 10);
}

/// Where each record of a journal's bytes starts, with its sequence number (up to the
/// zeros written ahead or the last sync's mark).
fn record_starts(bytes: &[u8]) -> Vec<(usize, u64)> {
    let mut starts = Vec::new();
    let mut off = HEADER;
    while off + RECORD_HEADER <= bytes.len() {
        let len = u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
        if len == 0 || bytes[off..].starts_with(b"IPSYNCED") {
            break;
        }
        starts.push((
            off,
            u64::from_le_bytes(bytes[off + 8..off + 16].try_into().unwrap()),
        ));
        off += len;
    }
    starts
}

/// A temporary directory named `prefix`* (kept alive by the first value) holding empty
/// `backing/` and `mnt/`, and the path of a `store` not yet made.
fn store_dirs(prefix: &str) -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let tmp = plain_dir(prefix);
    let (backing, mnt) = (tmp.path().join("backing"), tmp.path().join("mnt"));
    fs::create_dir(&backing).unwrap();
    fs::create_dir(&mnt).unwrap();
    let store = tmp.path().join("store");
    (tmp, backing, mnt, store)
}

/// `interpose isolation SUB STORE EXTRA...`: exit code, stdout and stderr.
fn iso_run(sub: &str, store: &Path, extra: &[&str]) -> (Option<i32>, String, String) {
    let out = support::output(
        Command::new(bin())
            .args(["isolation", sub])
            .arg(store)
            .args(extra),
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn backing_manifest(backing: &Path) -> Vec<String> {
    support::manifest(
        backing,
        support::ManifestOpts {
            mtime: true,
            owner: true,
        },
    )
}

/// A store made through a real mount: twelve small files, each fsync'ed, so that every
/// record after the first says the ones before it were durable. Then `damage` is done to
/// the journal (given its bytes and record starts; it returns the index of the record
/// it damaged, which must have records after it). Every command must refuse the store
/// as damaged at that record, naming the discard that cuts it; BACKING stays as it was;
/// and that discard keeps every byte it cuts in `journal.cut-at-OFFSET`. (A damaged
/// record taken for the journal's torn end or for its zeros ahead would lose the
/// synced changes after it, without a copy.)
fn synced_changes_after_damage_are_refused_not_dropped(
    label: &str,
    damage: impl FnOnce(&mut Vec<u8>, &[(usize, u64)]) -> usize,
) {
    let (_tmp, backing, mnt, store) = store_dirs("interpose-test-hostile-damage-");
    fs::write(backing.join("kept"), b"kept\n").unwrap();
    let m = Mount::start(&backing, &mnt, &["--isolate", store.to_str().unwrap()]);
    for i in 0..12u8 {
        let mut f = fs::File::create(mnt.join(format!("f{i}"))).unwrap();
        std::io::Write::write_all(&mut f, &[b'a' + i; 100]).unwrap();
        f.sync_all().unwrap();
    }
    m.stop();
    let before = backing_manifest(&backing);
    let jpath = store.join("journal");
    let mut j = fs::read(&jpath).unwrap();
    let starts = record_starts(&j);
    let last = starts.last().unwrap().1;
    let (code, st, err) = iso_run("status", &store, &["--json"]);
    assert_eq!(code, Some(0), "{label}: status of the intact store: {err}");
    let st: Value = serde_json::from_str(&st).unwrap();
    assert_eq!(
        st["last_seq"],
        json!(last),
        "{label}: the intact store: {st:#}"
    );

    let k = damage(&mut j, &starts);
    assert!(0 < k && k + 1 < starts.len(), "{label}: damaged record {k}");
    fs::write(&jpath, &j).unwrap();
    let (at, last_good) = (starts[k].0, starts[k - 1].1);
    let discard = format!("discard STORE --after {last_good}");
    let named = |err: &str| {
        err.contains("corrupt") && err.contains(&format!("offset {at}")) && err.contains(&discard)
    };
    for args in [
        &["status", "--json"][..],
        &["status"],
        &["log"],
        &["commit"],
    ] {
        let (code, out, err) = iso_run(args[0], &store, &args[1..]);
        assert!(
            code == Some(1) && named(&err),
            "{label}: {args:?} must refuse the store as damaged at offset {at}, naming `{discard}` (exit {code:?}):\nstdout:\n{out}\nstderr:\n{err}"
        );
    }
    let refused = mount_refused(&backing, &mnt, &["--isolate", store.to_str().unwrap()]);
    assert!(named(&refused), "{label}: the mount's refusal:\n{refused}");
    assert!(
        fs::read(&jpath).unwrap() == j,
        "{label}: the refusals changed the journal"
    );
    support::assert_same(
        label,
        "backing before",
        &before,
        "backing after",
        &backing_manifest(&backing),
    );

    // The way out the refusal names: the damage and everything after it cut off, kept.
    let (code, out, err) = iso_run("discard", &store, &["--after", &last_good.to_string()]);
    assert_eq!(code, Some(0), "{label}: {discard}:\n{out}\n{err}");
    let copy = store.join(format!("journal.cut-at-{at}"));
    assert!(
        fs::read(&copy).is_ok_and(|c| c == j[at..]),
        "{label}: {copy:?} does not hold the bytes cut off"
    );
    let (code, st, err) = iso_run("status", &store, &["--json"]);
    assert_eq!(code, Some(0), "{label}: status after the discard: {err}");
    let st: Value = serde_json::from_str(&st).unwrap();
    assert_eq!(st["last_seq"], json!(last_good), "{label}: {st:#}");
    support::assert_same(
        label,
        "backing before",
        &before,
        "backing after",
        &backing_manifest(&backing),
    );
}

/// A bit flipped in a record's length: it runs past the end of the file, as a torn last
/// record's does, but synced records and the last sync's mark follow it.
#[test]
fn a_record_length_damaged_to_run_past_the_end_is_refused_not_cut_as_torn() {
    synced_changes_after_damage_are_refused_not_dropped(
        "a length run past the end",
        |j, starts| {
            let k = starts.len() / 2;
            j[starts[k].0 + 3] ^= 0x01; // 16 MiB more: a possible length, past the end
            assert!(starts[k].0 + (16 << 20) > j.len());
            k
        },
    );
}

/// Zeros over one record's header, synced records after it: not the zeros written ahead
/// after the last record.
#[test]
fn zeros_over_a_record_header_in_the_middle_are_refused_not_taken_for_the_end() {
    synced_changes_after_damage_are_refused_not_dropped("a zeroed header", |j, starts| {
        let k = starts.len() / 2;
        j[starts[k].0..starts[k].0 + RECORD_HEADER].fill(0);
        k
    });
}

/// A block's worth of zeros from a record's start (a lost block of the disk), covering
/// its header and more, synced records after it.
#[test]
fn a_zeroed_block_from_a_record_start_is_refused_not_taken_for_the_end() {
    synced_changes_after_damage_are_refused_not_dropped("a zeroed block", |j, starts| {
        let k = starts.len() / 2;
        assert!(
            starts[k].0 + 4096 < starts[k + 2].0,
            "records after the block"
        );
        j[starts[k].0..starts[k].0 + 4096].fill(0);
        k
    });
}

/// A mounted store's lock file and control socket deleted (a cleaner of temp files, say):
/// a commit still finds the store in use. It took a new lock file, ran beside the mount,
/// and the changes made through the mount afterwards went into the journal it had
/// replaced, and were lost at the unmount.
#[test]
fn a_mounted_store_whose_lock_file_was_deleted_is_still_in_use() {
    let (_dir, backing, mnt, store) = store_dirs("interpose-test-isolock-");
    let m = Mount::start(&backing, &mnt, &["--isolate", store.to_str().unwrap()]);
    fs::write(mnt.join("f"), b"pending\n").unwrap();
    fs::remove_file(store.join("lock")).unwrap();
    fs::remove_file(store.join("control.sock")).unwrap();
    let out = Command::new(bin())
        .args(["isolation", "commit"])
        .arg(&store)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the commit ran beside the mount");
    assert!(err.contains("in use"), "{err}");
    assert!(!backing.join("f").exists(), "BACKING changed");
    m.stop();
    let out = iso("commit", &store, &[]);
    assert!(out.contains("committed up to change"), "{out}");
    assert_eq!(fs::read(backing.join("f")).unwrap(), b"pending\n");
}

/// A store.json replaced by a link to /dev/zero is refused as corrupt at once: it was
/// read until memory ran out (3.7 GB in 6 s).
#[test]
fn a_store_json_that_never_ends_is_refused() {
    let (_dir, backing, mnt, store) = store_dirs("interpose-test-isometa-");
    Mount::start(&backing, &mnt, &["--isolate", store.to_str().unwrap()]).stop();
    fs::remove_file(store.join("store.json")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", store.join("store.json")).unwrap();
    let mut status = Command::new(bin())
        .args(["isolation", "status"])
        .arg(&store)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ended = wait_or_kill(&mut status, Duration::from_secs(20))
        .expect("status still reading store.json after 20 s");
    let err = stderr_of(&mut status);
    assert!(!ended.success());
    assert!(
        err.contains("corrupt") && err.contains("larger than"),
        "{err}"
    );
}

/// A mounted commit that stops at a damaged record (it checks each record just before
/// applying it) leaves a commit state that stopped there. The discard the refusal names
/// then cuts the damage off and ends that commit: it was refused for the state ("cannot
/// be cut off by a discard") although nothing after the damage had been touched, and the
/// store could be neither committed, discarded nor mounted.
#[test]
fn a_commit_stopped_by_damage_can_be_ended_by_the_discard_it_names() {
    let (_tmp, backing, mnt, store) = store_dirs("interpose-test-hostile-stopped-");
    let m = Mount::start(&backing, &mnt, &["--isolate", store.to_str().unwrap()]);
    for i in 0..4u8 {
        let mut f = fs::File::create(mnt.join(format!("f{i}"))).unwrap();
        std::io::Write::write_all(&mut f, &[b'a' + i; 100]).unwrap();
        f.sync_all().unwrap();
    }
    // A byte of the data of a record in the middle, changed behind the daemon's back.
    let jpath = store.join("journal");
    let j = fs::read(&jpath).unwrap();
    let starts = record_starts(&j);
    let data_len = |at: usize| u32::from_le_bytes(j[at + 20..at + 24].try_into().unwrap());
    let k = (1..starts.len() - 1)
        .find(|&k| data_len(starts[k].0) > 0 && k >= starts.len() / 2)
        .expect("a data record in the middle");
    let (at, last_good) = (starts[k].0, starts[k - 1].1);
    let end = starts[k + 1].0;
    let f = fs::OpenOptions::new().write(true).open(&jpath).unwrap();
    f.write_all_at(&[j[end - 1] ^ 0xff], (end - 1) as u64)
        .unwrap();
    let (code, _, err) = iso_run("commit", &store, &[]);
    assert_eq!(
        code,
        Some(1),
        "the mounted commit went past the damage: {err}"
    );
    m.stop();
    let discard = format!("discard STORE --after {last_good}");
    let (code, _, err) = iso_run("status", &store, &[]);
    assert!(
        code == Some(1) && err.contains(&format!("offset {at}")) && err.contains(&discard),
        "status must name `{discard}` (exit {code:?}):\n{err}"
    );
    let (code, out, err) = iso_run("discard", &store, &["--after", &last_good.to_string()]);
    assert_eq!(code, Some(0), "{discard}:\n{out}\n{err}");
    assert!(store.join(format!("journal.cut-at-{at}")).exists());
    let (code, st, err) = iso_run("status", &store, &["--json"]);
    assert_eq!(code, Some(0), "status after the discard: {err}");
    let st: Value = serde_json::from_str(&st).unwrap();
    assert_eq!(
        (st["committed_upto"].clone(), st["pending_changes"].clone()),
        (json!(last_good), json!(0)),
        "{st:#}"
    );
    assert!(
        st.get("interrupted_commit").is_none_or(Value::is_null),
        "{st:#}"
    );
    // What was committed before the damage is in BACKING: each file whole, or empty
    // where its data was the damaged change or came after it.
    for i in 0..4u8 {
        if let Ok(got) = fs::read(backing.join(format!("f{i}"))) {
            assert!(got.is_empty() || got == [b'a' + i; 100], "f{i}: {got:?}");
        }
    }
    Mount::start(&backing, &mnt, &["--isolate", store.to_str().unwrap()]).stop();
}
