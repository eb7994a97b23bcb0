//! POSIX edge cases (tests/scripts/edge_cases.py) on a plain directory and on the mount, as
//! root and as an unprivileged user, with and without passthrough and with a filter that
//! sees every operation. Both runs must pass their own assertions, and the values the
//! script observes without asserting them exactly (errno choices, hole offsets, ACL
//! listings, ...) must be the same on the mount as on the plain directory.
//!
//! Plus minimal reproductions of the discrepancies the script found, one test each.

mod common;
mod support;
use common::*;
use support::*;

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};

/// Observations that may differ between a plain directory and the mount: the one other
/// value allowed on the mount, and why.
const MAY_DIFFER: &[(&str, &str, &str)] = &[
    (
        "special.chardev_open",
        "EACCES",
        "the mount is nodev, so opening a device node on it fails",
    ),
    (
        "caps.o_tmpfile",
        "ENOTSUP",
        "the daemon does not implement FUSE tmpfile",
    ),
    (
        "caps.fallocate_collapse_range",
        "ENOTSUP",
        "the kernel's FUSE forwards only KEEP_SIZE, PUNCH_HOLE and ZERO_RANGE",
    ),
    (
        "caps.fallocate_insert_range",
        "ENOTSUP",
        "the kernel's FUSE forwards only KEEP_SIZE, PUNCH_HOLE and ZERO_RANGE",
    ),
    (
        "caps.ioctl_getflags",
        "ENOTTY",
        "the daemon implements no ioctls (lsattr, chattr)",
    ),
    (
        "append.setfl_cleared",
        "103",
        "with passthrough the kernel's backing file keeps the open's O_APPEND: \
         fcntl(F_SETFL) does not reach it",
    ),
    (
        "append.rwf_noappend",
        "103",
        "with passthrough the kernel's backing file does not honour RWF_NOAPPEND \
         (nor does overlayfs on this kernel)",
    ),
];

struct ScriptRun {
    ok: bool,
    report: String,
    observations: serde_json::Map<String, serde_json::Value>,
}

/// Runs edge_cases.py on `dir` (as `user` if given). The script is fed on stdin so that
/// users who cannot read the source tree can run it too.
fn run_script(dir: &Path, user: Option<u32>, only: &[&str]) -> ScriptRun {
    let source = fs::read(script("edge_cases.py")).unwrap();
    let mut cmd = match user {
        Some(uid) => {
            let mut c = as_user(uid, uid, &[]);
            c.arg(python());
            c
        }
        None => Command::new(python()),
    };
    cmd.arg("-")
        .arg(dir)
        .args(only)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child.stdin.take().unwrap().write_all(&source).unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let observations = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .and_then(|v| v["observations"].as_object().cloned())
        .unwrap_or_default();
    ScriptRun {
        ok: out.status.success(),
        report: describe(&out),
        observations,
    }
}

/// Runs the script on a fresh plain directory and on `sub` of the mount, and checks both.
fn plain_and_mount(m: &Mount, user: Option<u32>, what: &str) {
    let plain = plain_dir("interpose-edge-plain-");
    let plain_dir = plain.path().join("edge");
    let mount_dir = m.mnt.join("edge");
    fs::create_dir(&plain_dir).unwrap();
    fs::create_dir(&mount_dir).unwrap();
    if let Some(uid) = user {
        make_traversable(&m.dir);
        make_traversable(plain.path());
        for d in [&plain_dir, &mount_dir] {
            std::os::unix::fs::chown(d, Some(uid), Some(uid)).unwrap();
        }
    }
    let p = run_script(&plain_dir, user, &[]);
    let r = run_script(&mount_dir, user, &[]);
    let mut problems = String::new();
    if !p.ok {
        problems += &format!(
            "--- on a plain directory the script failed:\n{}\n",
            p.report
        );
    }
    if !r.ok {
        problems += &format!("--- on the mount the script failed:\n{}\n", r.report);
    }
    let keys: std::collections::BTreeSet<&String> =
        p.observations.keys().chain(r.observations.keys()).collect();
    for key in keys {
        let (a, b) = (p.observations.get(key), r.observations.get(key));
        if let Some((_, allowed, _)) = MAY_DIFFER.iter().find(|(k, _, _)| k == key) {
            if b.and_then(|v| v.as_str()) == Some(*allowed) {
                continue;
            }
        }
        // A failed check records less; its failure is reported above.
        let explained = (a.is_none() || b.is_none()) && !(p.ok && r.ok);
        if a != b && !explained {
            problems += &format!("--- observation {key}: plain {a:?}, mount {b:?}\n");
        }
    }
    if !problems.is_empty() {
        panic!("edge cases {what}:\n{problems}");
    }
}

#[test]
fn edge_cases_as_root_with_passthrough() {
    let m = Mount::new(&[]);
    plain_and_mount(&m, None, "as root, passthrough");
    m.stop();
}

#[test]
fn edge_cases_as_root_without_passthrough() {
    let m = Mount::new(&["--no-passthrough"]);
    plain_and_mount(&m, None, "as root, --no-passthrough");
    m.stop();
}

#[test]
fn edge_cases_as_root_with_audit_filter() {
    let logs = plain_dir("interpose-edge-audit-");
    let log = logs.path().join("audit.jsonl");
    let m = Mount::new(&["--filter", &format!("audit={}", log.display())]);
    plain_and_mount(&m, None, "as root, with an audit filter");
    m.stop();
    let text = fs::read_to_string(&log).unwrap();
    let mut ops = std::collections::BTreeSet::new();
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("audit line {line:?}: {e}"));
        ops.insert(v["op"].as_str().unwrap_or("?").to_owned());
    }
    for op in [
        "create", "rename", "link", "setxattr", "read", "write", "lseek",
    ] {
        assert!(
            ops.contains(op),
            "no {op} in the audit log; ops seen: {ops:?}"
        );
    }
}

#[test]
fn edge_cases_as_root_uncached_with_a_tiny_descriptor_cache() {
    // Every name is looked up again and most nodes must be reopened from what the daemon
    // remembers of them.
    let m = Mount::new(&["--cache-timeout", "0", "--fd-cache", "16"]);
    plain_and_mount(&m, None, "as root, --cache-timeout 0 --fd-cache 16");
    m.stop();
}

#[test]
fn edge_cases_as_unprivileged_user() {
    let m = Mount::new(&[]);
    plain_and_mount(&m, Some(NOBODY), "as uid 65534");
    m.stop();
}

// Minimal reproductions of what the script found, so a failure names the bug.

#[test]
fn xattr_values_and_lists_read_back_through_the_mount() {
    let m = Mount::new(&[]);
    let f = m.mnt.join("f");
    fs::write(&f, b"x").unwrap();
    set_xattr(&f, "user.greeting", b"hello");
    assert_eq!(
        xattrs(&m.backing.join("f")).get(&b"user.greeting"[..]),
        Some(&b"hello".to_vec()),
        "setxattr through the mount did not reach the backing file"
    );
    let seen = xattrs(&f);
    assert_eq!(
        seen.get(&b"user.greeting"[..]).map(|v| esc(v)),
        Some("hello".to_owned()),
        "listxattr/getxattr through the mount: {seen:?}"
    );
    m.stop();
}

#[test]
fn times_before_1970_are_set_exactly() {
    let m = Mount::new(&[]);
    let f = m.mnt.join("old");
    fs::write(&f, b"x").unwrap();
    // -1.5 s is tv_sec = -2, tv_nsec = 500000000.
    set_times(&f, -1_500_000_000, -1_500_000_000);
    let md = fs::metadata(m.backing.join("old")).unwrap();
    assert_eq!(
        (md.mtime(), md.mtime_nsec()),
        (-2, 500_000_000),
        "mtime of -1.5 s set through the mount, as stored in the backing file"
    );
    m.stop();
}

#[test]
fn nodes_evicted_from_the_descriptor_cache_still_work() {
    // The kernel keeps its entries (long cache timeout) while the daemon's descriptor cache
    // (at most 16) must drop and later reopen most of the 64 directories.
    let m = Mount::new(&["--fd-cache", "16", "--cache-timeout", "600"]);
    let dirs: Vec<_> = (0..64).map(|i| m.mnt.join(format!("d{i:02}"))).collect();
    for d in &dirs {
        fs::create_dir(d).unwrap();
    }
    let mut failures = Vec::new();
    for d in &dirs {
        if let Err(e) = fs::write(d.join("f"), b"x") {
            failures.push(format!("{}: {e}", d.display()));
        }
    }
    assert!(
        failures.is_empty(),
        "creating a file in a directory whose descriptor was evicted failed for {} of 64:\n{}",
        failures.len(),
        failures.join("\n")
    );
    for d in &dirs {
        fs::set_permissions(d, fs::Permissions::from_mode(0o700)).unwrap();
    }
    m.stop();
}

#[test]
fn inode_numbers_are_the_backing_inode_numbers() {
    let m = Mount::new(&[]);
    fs::create_dir_all(m.mnt.join("a/b")).unwrap();
    fs::write(m.mnt.join("a/f"), b"x").unwrap();
    fs::hard_link(m.mnt.join("a/f"), m.mnt.join("a/b/g")).unwrap();
    std::os::unix::fs::symlink("f", m.mnt.join("a/l")).unwrap();
    fs::write(m.backing.join("made-behind"), b"y").unwrap();
    for rel in ["a", "a/b", "a/f", "a/b/g", "a/l", "made-behind"] {
        let ino = |base: &Path| fs::symlink_metadata(base.join(rel)).unwrap().ino();
        assert_eq!(ino(&m.mnt), ino(&m.backing), "st_ino of {rel}");
    }
    m.stop();
}

/// An object on a file system mounted inside BACKING keeps its inode number through the
/// mount after the kernel forgot it, and its hard links share it, as on that file system.
/// It used to get a new number at every lookup after a forget: `tar --listed-incremental`
/// took every directory there for renamed, git's index every file for changed.
#[test]
fn inode_numbers_on_a_submount_stay_after_the_kernel_forgets_them() {
    let m = Mount::new(&[]);
    let sub = m.backing.join("sub");
    fs::create_dir(&sub).unwrap();
    let tmpfs = Tmpfs::mount(&sub, 1);
    fs::create_dir(m.mnt.join("sub/d")).unwrap();
    fs::write(m.mnt.join("sub/a"), b"x").unwrap();
    fs::hard_link(m.mnt.join("sub/a"), m.mnt.join("sub/d/b")).unwrap();
    let ino = |rel: &str| fs::symlink_metadata(m.mnt.join(rel)).unwrap().ino();
    let first = [ino("sub/a"), ino("sub/d/b"), ino("sub/d"), ino("sub")];
    assert_eq!(first[0], first[1], "hard links share a number");
    // Every node of the submount forgotten: the daemon then lets go of it.
    drop_dentries_until_released(
        m.pid(),
        |p| p.starts_with(&sub),
        "the kernel forgets the submount's nodes",
    );
    let again = [ino("sub/d/b"), ino("sub/a"), ino("sub/d"), ino("sub")];
    assert_eq!(again, [first[1], first[0], first[2], first[3]]);
    // Gone before the mount takes its directories away, `sub` among them.
    drop(tmpfs);
    m.stop();
}

/// A listing gives each entry the inode number stat gives it, `.` and `..` included, also
/// on a file system mounted inside BACKING (programs compare the two: `find`, `ls -i`,
/// getcwd's fallback). Listings gave the backing file system's numbers: the mount root's
/// `.` was BACKING's number, not 1, and the submount's entries their unmapped numbers.
#[test]
fn listings_give_the_inode_numbers_stat_gives() {
    let stores = tempfile::tempdir_in(test_root()).unwrap();
    let store = stores.path().join("store");
    for args in [&[][..], &["--isolate", store.to_str().unwrap()][..]] {
        let m = Mount::new(args);
        let sub = m.backing.join("sub");
        fs::create_dir(&sub).unwrap();
        let tmpfs = Tmpfs::mount(&sub, 1);
        // Many entries the mount has not met: the kernel lists them without lookups
        // after its first batch.
        fs::create_dir(sub.join("many")).unwrap();
        for i in 0..2000 {
            fs::write(sub.join("many").join(format!("f{i}")), b"").unwrap();
        }
        for dir in ["d", "sub/d"] {
            fs::create_dir(m.mnt.join(dir)).unwrap();
            fs::write(m.mnt.join(dir).join("f"), b"x").unwrap();
        }
        for round in 0..2 {
            for dir in ["sub/many", "", "d", "sub", "sub/d"] {
                let path = m.mnt.join(dir);
                let fd = rustix::fs::open(&path, rustix::fs::OFlags::RDONLY, 0.into()).unwrap();
                // The whole listing first: lookups between its batches change how the
                // kernel asks for the next.
                let listed: Vec<(String, u64)> = rustix::fs::Dir::read_from(&fd)
                    .unwrap()
                    .map(|e| e.unwrap())
                    .map(|e| (e.file_name().to_str().unwrap().to_owned(), e.ino()))
                    // The root's parent is outside the mount, and a mount point lists the
                    // number of the directory it covers (as without interpose).
                    .filter(|(name, _)| !dir.is_empty() || (name != ".." && name != "sub"))
                    .collect();
                assert!(listed.len() >= 2, "{dir}: {listed:?}");
                for (name, listed_ino) in &listed {
                    let stat = fs::symlink_metadata(path.join(name)).unwrap().ino();
                    assert_eq!(*listed_ino, stat, "{args:?}, round {round}: {dir}/{name}");
                }
            }
        }
        drop(tmpfs);
        m.stop();
    }
}

/// Type, permissions, owner, size (not of directories), link target and link count of
/// every entry below `root`, with user./trusted./system. xattrs, sorted by path.
fn tree_listing(root: &Path) -> Vec<String> {
    use std::os::unix::ffi::OsStrExt;
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let md = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let target = fs::read_link(&p)
                .map(|t| t.to_string_lossy().into_owned())
                .unwrap_or_default();
            let size = if md.is_dir() { 0 } else { md.size() };
            let mut xattrs = Vec::new();
            if !md.file_type().is_symlink() {
                let mut names = xattr_names(&p);
                names.sort(); // listxattr(2) order is the file system's own
                for n in names {
                    let v = xattr_value(&p, &n);
                    xattrs.push(format!("{}={:?}", String::from_utf8_lossy(n.as_bytes()), v));
                }
            }
            out.push(format!(
                "{rel:?} {:o} {}:{} size={size} nlink={} -> {target:?} {xattrs:?}",
                md.mode(),
                md.uid(),
                md.gid(),
                md.nlink()
            ));
            if md.is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Fails with the lines only one side has.
fn assert_same(a: &[String], b: &[String], what: &str) {
    let (sa, sb): (std::collections::BTreeSet<_>, std::collections::BTreeSet<_>) =
        (a.iter().collect(), b.iter().collect());
    let mut diff: Vec<String> = sa.difference(&sb).map(|l| format!("< {l}")).collect();
    diff.extend(sb.difference(&sa).map(|l| format!("> {l}")));
    diff.sort_by(|x, y| x[2..].cmp(&y[2..]));
    let shown: Vec<String> = diff
        .iter()
        .take(30)
        .map(|l| l.chars().take(300).collect())
        .collect();
    assert!(
        diff.is_empty(),
        "{what}: {} lines differ:\n{}",
        diff.len(),
        shown.join("\n")
    );
}

fn xattr_names(p: &Path) -> Vec<std::ffi::OsString> {
    use std::os::unix::ffi::OsStrExt;
    let mut buf = vec![0u8; 65536];
    let n = rustix::fs::listxattr(p, &mut buf).unwrap_or(0);
    buf[..n]
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty() && !n.starts_with(b"security."))
        .map(|n| std::ffi::OsStr::from_bytes(n).to_owned())
        .collect()
}

fn xattr_value(p: &Path, name: &std::ffi::OsStr) -> Vec<u8> {
    let mut buf = vec![0u8; 65536];
    let n = rustix::fs::getxattr(p, name, &mut buf).unwrap_or(0);
    buf.truncate(n);
    buf
}

/// The edge cases on an isolated mount, then everything committed: the backing directory
/// must hold exactly what the mount showed, and it was untouched before the commit.
fn isolated_then_committed(user: Option<u32>, what: &str) {
    let stores = plain_dir("interpose-edge-store-");
    let store = stores.path().join("store");
    let m = Mount::new(&["--isolate", store.to_str().unwrap()]);
    let before = tree_listing(&m.backing);
    plain_and_mount(&m, user, what);
    assert_same(
        &tree_listing(&m.backing),
        &before,
        "the backing directory changed before commit",
    );
    let view = tree_listing(&m.mnt);
    let out = common::run(
        std::process::Command::new(common::bin())
            .args(["isolation", "commit"])
            .arg(&store),
    );
    assert!(out.contains("committed up to change"), "{out}");
    assert_same(
        &tree_listing(&m.backing),
        &view,
        "after commit, backing (<) vs the view (>)",
    );
    assert_same(
        &tree_listing(&m.mnt),
        &view,
        "the view after commit (<) vs before (>)",
    );
    m.stop();
}

#[test]
fn edge_cases_as_root_on_an_isolated_mount_then_committed() {
    isolated_then_committed(None, "as root, isolated");
}

#[test]
fn edge_cases_as_unprivileged_user_on_an_isolated_mount_then_committed() {
    isolated_then_committed(Some(65534), "as uid 65534, isolated");
}

/// Makes `a/f` in `backing` and binds `a` at `b`; the guard unmounts `b` lazily (the daemon
/// may still hold a descriptor on it).
fn bind_a_at_b(backing: &Path) -> Undo {
    fs::create_dir(backing.join("a")).unwrap();
    fs::create_dir(backing.join("b")).unwrap();
    fs::write(backing.join("a/f"), b"f").unwrap();
    run(Command::new("mount")
        .arg("--bind")
        .arg(backing.join("a"))
        .arg(backing.join("b")));
    Undo("umount", "-l", backing.join("b"))
}

/// An object reached through two bind mounts of one file system inside BACKING is one
/// object, as on BACKING: one inode number through both, the same at every lookup. Its
/// file handles differ only in the mount they were taken through, which made every
/// lookup through the other mount take it for a new object under a new number.
#[test]
fn an_object_under_two_bind_mounts_in_backing_keeps_one_number() {
    // No caching: every stat is a lookup.
    let m = Mount::new(&["--cache-timeout", "0"]);
    let bound = bind_a_at_b(&m.backing);
    let native = fs::metadata(m.backing.join("a/f")).unwrap().ino();
    let ino = |p: &str| fs::symlink_metadata(m.mnt.join(p)).unwrap().ino();
    let seen: Vec<u64> = (0..3).flat_map(|_| [ino("a/f"), ino("b/f")]).collect();
    assert!(
        seen.iter().all(|&i| i == native),
        "a/f, b/f three times: {seen:?}; on BACKING {native}"
    );
    // First: the mount's directory goes with it, and cannot while b is a mount point.
    drop(bound);
    m.stop();
}

/// A file system mounted inside BACKING (a bind mount here) is not kept busy by the
/// daemon once the kernel has forgotten what the mount showed of it: it can be unmounted
/// while the daemon runs. The descriptor the daemon opens on it, to reopen its objects by
/// handle, was kept until the daemon ended, and umount failed with EBUSY.
#[test]
fn a_file_system_mounted_inside_backing_can_be_unmounted_once_forgotten() {
    let m = Mount::new(&[]);
    let bound = bind_a_at_b(&m.backing);
    assert_eq!(fs::read(m.mnt.join("b/f")).unwrap(), b"f");
    let b = m.backing.join("b");
    drop_dentries_until_released(
        m.pid(),
        |t| t.starts_with(&b),
        "the daemon still holds a descriptor on the bind mount",
    );
    let out = output(Command::new("umount").arg(&b));
    assert!(out.status.success(), "umount of b: {}", describe(&out));
    std::mem::forget(bound);
    m.stop();
}

/// An append-only file (chattr +a on BACKING) is appended to through the mount, and
/// refuses other writes, as on BACKING. The daemon reopens files without O_APPEND (writes
/// carry their offsets), which such a file refuses: appends failed with EPERM.
#[test]
fn an_append_only_file_is_appended_to_and_refuses_other_writes() {
    let m = Mount::new(&[]);
    let log = m.backing.join("log");
    fs::write(&log, b"a\n").unwrap();
    run(Command::new("chattr").arg("+a").arg(&log));
    let _flag = Undo("chattr", "-a", log.clone());
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(m.mnt.join("log"))
        .unwrap_or_else(|e| panic!("open O_APPEND of an append-only file: {e}"));
    f.write_all(b"b\n").unwrap();
    drop(f);
    let err = fs::OpenOptions::new()
        .write(true)
        .open(m.mnt.join("log"))
        .expect_err("an append-only file opened for writing without O_APPEND");
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    assert_eq!(fs::read(m.mnt.join("log")).unwrap(), b"a\nb\n");
    assert_eq!(fs::read(&log).unwrap(), b"a\nb\n");
    drop(_flag);
    m.stop();
}
