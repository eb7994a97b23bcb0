//! The built-in filters on a real mount: audit lines, deny rules, scoping, and the
//! passthrough decision (files no filter inspects never send their data to the daemon).

mod common;
mod support;
use common::*;
use support::{as_user, describe, make_traversable, output, python, NOBODY};

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn audit_lines(path: &Path) -> Vec<serde_json::Value> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

/// A mount with the audit filter logging to a file in a temporary directory (kept alive
/// by the first value); `options` follow the file name in the filter spec.
fn audited_mount(options: &str) -> (tempfile::TempDir, std::path::PathBuf, Mount) {
    let tmp = tempfile::tempdir_in(test_root()).unwrap();
    let log = tmp.path().join("audit.jsonl");
    let m = Mount::new(&["--filter", &format!("audit={}{options}", log.display())]);
    (tmp, log, m)
}

/// A second signal stops a busy mount at once, but the audit records of what was served
/// until then are written first (they were dropped with the process: a third of them).
#[test]
fn a_second_signal_writes_out_the_audit_records_before_stopping() {
    use std::io::{BufRead, BufReader, Write};
    let (_tmp, log, m) = audited_mount("");
    // A program that keeps the mount busy, looks up names when told, and says when done.
    let mut user = Command::new(python())
        .args([
            "-c",
            "import os, sys\n\
             sys.stdin.readline()\n\
             for i in range(2000):\n\
             \x20   os.path.exists(f'n{i}')\n\
             print('done', flush=True)\n\
             sys.stdin.readline()",
        ])
        .current_dir(&m.mnt)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    m.signal(libc::SIGTERM);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while is_mounted(&m.mnt) {
        assert!(std::time::Instant::now() < deadline, "not detached");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let mut stdin = user.stdin.take().unwrap();
    writeln!(stdin, "go").unwrap();
    let mut line = String::new();
    BufReader::new(user.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "done\n");
    m.signal(libc::SIGTERM);
    let status = m.wait_exit(std::time::Duration::from_secs(20));
    drop(stdin);
    let _ = user.wait();
    assert!(status.is_some_and(|s| !s.success()), "{status:?}");
    let lookups = audit_lines(&log)
        .iter()
        .filter(|l| l["op"] == "lookup" && l["path"].as_str().is_some_and(|p| p.starts_with("/n")))
        .count();
    assert_eq!(lookups, 2000, "lookups in the audit log");
}

/// A program waiting for room in a full audit log can still be stopped, by Ctrl-C or
/// SIGKILL: the kernel interrupts its request, and the daemon lets the operation through
/// (it ignored interrupts, and the program waited, unkillable, until there was room). No
/// record is lost: the signalled operations' records wait beyond the limit.
#[test]
fn a_program_waiting_on_a_full_audit_log_can_be_stopped() {
    use std::time::{Duration, Instant};
    let tmp = tempfile::tempdir_in(test_root()).unwrap();
    let log_dir = tmp.path().join("log");
    fs::create_dir(&log_dir).unwrap();
    let _log_fs = Tmpfs::mount(&log_dir, 1);
    let log = log_dir.join("audit.jsonl");
    // Declared before the mount so that, on failure, the mount goes first: a program held
    // by the daemon cannot be reaped before.
    let mut programs = Reaper::default();
    let mut m = Mount::new(&["--filter", &format!("audit={}", log.display())]);
    let daemon_says = m.stderr_lines();
    // Looks up one new name after another (a record each) until stopped. (Not run in
    // the mount: its chdir there could wait for room; -I: nothing is looked up in the
    // current directory.)
    let looker = |first: u64| {
        Command::new(python())
            .args([
                "-I",
                "-c",
                "import os, sys\n\
                 i, mnt = int(sys.argv[1]), sys.argv[2]\n\
                 while True:\n\
                 \x20   os.path.exists(f'{mnt}/name-{i}')\n\
                 \x20   i += 1",
                &first.to_string(),
            ])
            .arg(&m.mnt)
            .spawn()
            .unwrap()
    };
    let first = programs.add(looker(0));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match daemon_says.recv_timeout(left) {
            Ok(line) if line.contains("records wait to be written") => break,
            Ok(_) => {}
            Err(e) => panic!("the daemon never said that operations wait ({e})"),
        }
    }
    // From here every operation waits (the log has no room), so a program found waiting
    // on the mount waits for room.
    await_waiting_on_fuse(programs.0[first].id());
    signal(&programs.0[first], libc::SIGINT);
    assert!(
        wait_timeout(&mut programs.0[first], Duration::from_secs(20)).is_some(),
        "a program waiting on the full audit log ignored Ctrl-C"
    );
    let second = programs.add(looker(1_000_000));
    await_waiting_on_fuse(programs.0[second].id());
    signal(&programs.0[second], libc::SIGKILL);
    assert!(
        wait_timeout(&mut programs.0[second], Duration::from_secs(20)).is_some(),
        "a program waiting on the full audit log survived SIGKILL"
    );
    // Room again: every record kept is written, in order.
    run(Command::new("mount")
        .args(["-o", "remount,size=64m"])
        .arg(&log_dir));
    m.stop();
    let mut firsts = Vec::new();
    let mut seconds = Vec::new();
    for line in audit_lines(&log) {
        let Some(n) = line["path"].as_str().and_then(|p| p.strip_prefix("/name-")) else {
            continue;
        };
        let n: u64 = n.parse().unwrap();
        if n < 1_000_000 {
            firsts.push(n);
        } else {
            seconds.push(n);
        }
    }
    let expected = |from: u64, got: &[u64]| (from..from + got.len() as u64).collect::<Vec<_>>();
    assert!(
        firsts.len() > 10_000,
        "{} records of the first program",
        firsts.len()
    );
    assert_eq!(firsts, expected(0, &firsts), "records of the first program");
    // (It may have been killed in the lookup of the mount point, before its first name.)
    assert_eq!(
        seconds,
        expected(1_000_000, &seconds),
        "records of the second program"
    );
}

#[test]
fn audit_logs_every_operation_with_caller_and_result() {
    let (_tmp, log, m) = audited_mount("");
    fs::write(m.mnt.join("a.txt"), b"hello").unwrap();
    assert_eq!(fs::read(m.mnt.join("a.txt")).unwrap(), b"hello");
    assert_eq!(
        fs::metadata(m.mnt.join("missing")).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    fs::rename(m.mnt.join("a.txt"), m.mnt.join("b.txt")).unwrap();
    let odd: &std::ffi::OsStr = std::os::unix::ffi::OsStrExt::from_bytes(b"bad\xffname");
    fs::write(m.mnt.join(odd), b"x").unwrap();
    let odd_xattr: &std::ffi::OsStr = std::os::unix::ffi::OsStrExt::from_bytes(b"user.x\xfe");
    rustix::fs::setxattr(
        m.mnt.join("b.txt").as_path(),
        odd_xattr,
        b"v",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    m.stop(); // flushes the log

    let lines = audit_lines(&log);
    let find = |op: &str, path: &str| {
        lines
            .iter()
            .find(|l| l["op"] == op && l["path"] == path)
            .unwrap_or_else(|| panic!("no {op} of {path} in {lines:#?}"))
    };
    let create = find("create", "/a.txt");
    assert_eq!(create["result"], "ok");
    assert_eq!(create["uid"], 0);
    assert!(create["pid"].as_u64().unwrap() > 0);
    for key in ["time", "gid", "exe", "latency_us", "bytes", "errno"] {
        assert!(create.get(key).is_some(), "{key} missing in {create}");
    }
    let write = find("write", "/a.txt");
    assert_eq!(write["bytes"], 5);
    let read = find("read", "/a.txt");
    assert_eq!(read["bytes"], 5);
    let miss = find("lookup", "/missing");
    assert_eq!(miss["result"], "ENOENT");
    assert_eq!(miss["errno"], libc::ENOENT);
    let rename = find("rename", "/a.txt");
    assert_eq!(rename["path2"], "/b.txt");
    let odd = lines
        .iter()
        .find(|l| l["op"] == "create" && l.get("path_hex").is_some())
        .expect("non-UTF-8 create");
    assert!(odd["path_hex"]
        .as_str()
        .unwrap()
        .ends_with(&hex(b"bad\xffname")));
    let set = find("setxattr", "/b.txt");
    assert_eq!(set["xattr_hex"], hex(b"user.x\xfe"), "{set}");
}

#[test]
fn audit_lines_name_the_file_where_it_is_now_and_the_program_after_exec() {
    // A write through a descriptor opened before its directory was renamed is logged
    // under the new path; a shell that execs a program (`exec cat`, `cmd > file`) is
    // logged as that program, not as the shell whose pid it kept.
    let (_tmp, log, m) = audited_mount("");
    fs::create_dir(m.backing.join("d1")).unwrap();
    fs::write(m.backing.join("x"), b"x\n").unwrap();
    let script = "exec 7>>d1/f; mv d1 d2; echo via-old-fd >&7; test -e x; exec cat x";
    let out = Command::new("bash")
        .args(["-c", script])
        .current_dir(&m.mnt)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    m.stop();
    let lines = audit_lines(&log);
    let write = lines
        .iter()
        .find(|l| l["op"] == "write")
        .unwrap_or_else(|| panic!("no write in {lines:#?}"));
    assert_eq!(write["path"], "/d2/f", "{write}");
    let cat = lines
        .iter()
        .find(|l| l["op"] == "read" && l["path"] == "/x")
        .unwrap_or_else(|| panic!("no read of /x in {lines:#?}"));
    assert_eq!(cat["exe"], "/usr/bin/cat", "{cat}");
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn passthrough_keeps_data_out_of_the_daemon_unless_a_filter_wants_it() {
    let tmp = tempfile::tempdir_in(test_root()).unwrap();
    for (io, expect_data_ops) in [("off", false), ("on", true)] {
        let log = tmp.path().join(format!("audit-{io}.jsonl"));
        let m = Mount::new(&["--filter", &format!("audit={};io={io}", log.display())]);
        fs::write(m.backing.join("data"), vec![7u8; 256 * 1024]).unwrap();
        assert_eq!(fs::read(m.mnt.join("data")).unwrap(), vec![7u8; 256 * 1024]);
        fs::write(m.mnt.join("data"), b"new").unwrap();
        assert_eq!(fs::read(m.backing.join("data")).unwrap(), b"new");
        m.stop();
        let lines = audit_lines(&log);
        let data_ops = lines
            .iter()
            .filter(|l| l["op"] == "read" || l["op"] == "write")
            .count();
        assert_eq!(
            data_ops > 0,
            expect_data_ops,
            "io={io}: {data_ops} data ops logged"
        );
        assert!(
            lines
                .iter()
                .any(|l| l["op"] == "open" && l["path"] == "/data"),
            "opens are always logged"
        );
    }
}

/// A program that starts another (posix_spawn, as Rust, Go and Java programs and cargo
/// do) while it has a file on an audited mount open with O_CLOEXEC: the kernel flushes
/// that file as the child execs, holding a lock that reading the child's
/// /proc/PID/exe waits for. The audit filter read it to log the flush, so the flush, the
/// exec and the program all hung.
#[test]
fn spawning_a_program_with_a_file_of_the_audited_mount_open_does_not_hang() {
    let (_tmp, log, m) = audited_mount("");
    fs::write(m.mnt.join("held"), b"x").unwrap();
    let out = output(
        Command::new("timeout")
            .args(["20", "python3", "-c"])
            .arg(
                "import os, sys\n\
                 fd = os.open(sys.argv[1], os.O_RDONLY | os.O_CLOEXEC)\n\
                 for _ in range(3):\n\
                 \x20   pid = os.posix_spawn('/bin/true', ['true'], os.environ)\n\
                 \x20   assert os.waitpid(pid, 0)[1] == 0\n\
                 print('spawned')\n",
            )
            .arg(m.mnt.join("held")),
    );
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("spawned"),
        "posix_spawn with a file of the mount open: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    m.stop();
    let flushes = audit_lines(&log)
        .into_iter()
        .filter(|l| l["op"] == "flush" && l["path"] == "/held")
        .count();
    assert!(flushes >= 3, "{flushes} flushes of /held logged");
}

/// A write-only open a filter sees the data of goes around the kernel's page cache: its
/// writes leave no cached pages (they used to be copied into pages first, which made cp
/// or dd onto an audited mount several times slower), each is logged, and a reader with
/// the file open and cached sees them at once.
#[test]
fn write_only_opens_the_daemon_serves_bypass_the_page_cache() {
    use std::os::unix::fs::FileExt;
    let (_tmp, log, m) = audited_mount(";io=on");
    let p = m.mnt.join("f");
    let write_only = || {
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&p)
            .unwrap()
    };
    write_only().write_all_at(&vec![1u8; 4 << 20], 0).unwrap();
    assert_eq!(resident_pages(&p), 0, "pages cached by a write-only open");
    let reader = fs::File::open(&p).unwrap();
    let mut buf = vec![0u8; 64 << 10];
    reader.read_exact_at(&mut buf, 0).unwrap(); // cached now (an open without
                                                // FOPEN_KEEP_CACHE would drop them again)
    let w = write_only();
    w.write_all_at(b"NEW", 4096).unwrap();
    let mut got = [0u8; 3];
    reader.read_exact_at(&mut got, 4096).unwrap();
    assert_eq!(&got, b"NEW", "the reader after the write");
    drop((reader, w));
    m.stop();
    let writes = audit_lines(&log)
        .iter()
        .filter(|l| l["op"] == "write" && l["path"] == "/f")
        .count();
    assert!(writes >= 2, "{writes} writes logged");
}

/// A synchronous write through a write-only open the daemon serves (around the page cache,
/// where the kernel sends no FSYNC after it) is durable when it returns: per write
/// (RWF_DSYNC, RWF_SYNC) and through O_DSYNC and O_SYNC opens. The daemon used to take
/// the per-write ones for plain writes.
#[test]
fn synchronous_writes_through_a_write_only_open_reach_the_disk() {
    let fs_ = LoopFs::new(64);
    let tmp = tempfile::tempdir_in(test_root()).unwrap();
    let backing = fs_.dir.join("backing");
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&backing).unwrap();
    fs::create_dir(&mnt).unwrap();
    let log = tmp.path().join("audit.jsonl");
    let m = Mount::start(
        &backing,
        &mnt,
        &["--filter", &format!("audit={};io=on", log.display())],
    );
    assert_synchronous_writes_flush(&fs_, &mnt.join("f"));
    m.stop();
}

#[test]
fn deny_makes_a_subtree_read_only_and_hides_a_file() {
    let m = Mount::new(&["--filter", "deny=docs/**:write:EROFS;secret.txt:all:ENOENT"]);
    fs::create_dir(m.backing.join("docs")).unwrap();
    fs::write(m.backing.join("docs/a"), b"doc").unwrap();
    fs::write(m.backing.join("secret.txt"), b"s").unwrap();
    fs::write(m.backing.join("open.txt"), b"o").unwrap();

    assert_eq!(fs::read(m.mnt.join("docs/a")).unwrap(), b"doc");
    let erofs =
        |r: std::io::Result<()>| assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EROFS));
    erofs(fs::write(m.mnt.join("docs/a"), b"x"));
    erofs(fs::write(m.mnt.join("docs/new"), b"x"));
    erofs(fs::remove_file(m.mnt.join("docs/a")));
    erofs(fs::create_dir(m.mnt.join("docs/sub")));
    erofs(fs::rename(m.mnt.join("open.txt"), m.mnt.join("docs/moved")));
    erofs(fs::set_permissions(
        m.mnt.join("docs/a"),
        fs::Permissions::from_mode(0o600),
    ));
    assert_eq!(fs::read(m.backing.join("docs/a")).unwrap(), b"doc");
    // A copy out of the subtree only reads it (cp copies with copy_file_range).
    let src = fs::File::open(m.mnt.join("docs/a")).unwrap();
    let dst = fs::File::create(m.mnt.join("copy")).unwrap();
    assert_eq!(
        rustix::fs::copy_file_range(&src, None, &dst, None, 100),
        Ok(3)
    );
    drop((src, dst));
    assert_eq!(fs::read(m.mnt.join("copy")).unwrap(), b"doc");

    assert_eq!(
        fs::metadata(m.mnt.join("secret.txt")).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    let names: Vec<_> = fs::read_dir(&m.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        !names.iter().any(|n| n == "secret.txt"),
        "hidden file listed: {names:?}"
    );
    assert!(names.iter().any(|n| n == "open.txt"));
    // Writes elsewhere are untouched by the rules.
    fs::write(m.mnt.join("open.txt"), b"changed").unwrap();
    m.stop();
}

#[test]
fn deny_rules_have_no_way_round_them() {
    // Ways round the rules a probe found, each a real program's or a shell's:
    // - a read-only subtree renamed away, written and renamed back, or a directory above
    //   it renamed (the rename of a directory moves every path below it);
    // - a read rule and an O_RDWR open (whose reads pass through the kernel);
    // - a lookup rule and `ls -l`, which fills the kernel's cache of names without a
    //   lookup, and per-uid rules and that cache (one user's lookup used by the next);
    // - a name hidden by a lookup rule "created" again, truncating the hidden file.
    let m = Mount::new(&[
        "--filter",
        "deny=proj/docs/**:write:EROFS;secret/**:read:EACCES;priv:lookup:EACCES;\
         hidden.txt:lookup:ENOENT;mine/**:lookup:EACCES:uid=65534;moved/s.txt:lookup:ENOENT",
    ]);
    fs::set_permissions(&m.dir, fs::Permissions::from_mode(0o755)).unwrap();
    for d in ["proj/docs", "secret", "priv", "mine", "free"] {
        fs::create_dir_all(m.backing.join(d)).unwrap();
    }
    for (f, text) in [
        ("proj/docs/intro.txt", "intro"),
        ("secret/k.txt", "TOPSECRET"),
        ("priv/s.txt", "SECRET"),
        ("hidden.txt", "PRECIOUS"),
        ("mine/m.txt", "MINE"),
        ("free/f.txt", "free"),
    ] {
        fs::write(m.backing.join(f), text).unwrap();
        fs::set_permissions(m.backing.join(f), fs::Permissions::from_mode(0o644)).unwrap();
    }
    let errno = |r: std::io::Result<()>| r.unwrap_err().raw_os_error();
    let mnt = |p: &str| m.mnt.join(p);

    assert_eq!(
        errno(fs::rename(mnt("proj/docs"), mnt("proj/d2"))),
        Some(libc::EROFS)
    );
    assert_eq!(errno(fs::rename(mnt("proj"), mnt("p2"))), Some(libc::EROFS));
    assert_eq!(
        errno(fs::set_permissions(
            mnt("proj/docs"),
            fs::Permissions::from_mode(0o777)
        )),
        Some(libc::EROFS)
    );
    fs::rename(mnt("free"), mnt("free2")).unwrap(); // nothing protected below it
    assert_eq!(
        fs::read(m.backing.join("proj/docs/intro.txt")).unwrap(),
        b"intro"
    );

    let rdwr = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(mnt("secret/k.txt"));
    assert_eq!(rdwr.unwrap_err().raw_os_error(), Some(libc::EACCES));

    // (ls fails: it cannot stat priv, which it lists.)
    let ls = Command::new("ls").arg("-l").arg(&m.mnt).output().unwrap();
    assert!(
        String::from_utf8_lossy(&ls.stdout).contains("secret"),
        "{ls:?}"
    );
    assert_eq!(
        fs::read(mnt("priv/s.txt")).unwrap_err().raw_os_error(),
        Some(libc::EACCES),
        "after ls -l"
    );
    assert_eq!(fs::read(mnt("mine/m.txt")).unwrap(), b"MINE"); // root first
    let out = output(
        as_user(NOBODY, NOBODY, &[])
            .arg("cat")
            .arg(mnt("mine/m.txt")),
    );
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("denied"),
        "uid 65534 after root: {out:?}"
    );
    let out = output(
        as_user(NOBODY, NOBODY, &[])
            .arg("cat")
            .arg(mnt("free2/f.txt")),
    );
    assert!(out.status.success(), "{out:?}");

    assert_eq!(
        errno(fs::write(mnt("hidden.txt"), b"new")),
        Some(libc::EACCES)
    );
    assert_eq!(errno(fs::create_dir(mnt("hidden.txt"))), Some(libc::EACCES));
    assert_eq!(
        errno(fs::rename(mnt("free2/f.txt"), mnt("hidden.txt"))),
        Some(libc::EACCES)
    );
    assert_eq!(fs::read(m.backing.join("hidden.txt")).unwrap(), b"PRECIOUS");

    // A listing read through a descriptor opened before its directory moved hides what
    // the directory's new place hides.
    fs::create_dir(m.backing.join("d")).unwrap();
    fs::write(m.backing.join("d/s.txt"), b"s").unwrap();
    let script = "import os, sys\n\
        fd = os.open('d', os.O_RDONLY | os.O_DIRECTORY)\n\
        os.rename('d', 'moved')\n\
        print(sorted(os.listdir(fd)))\n";
    let out = Command::new("python3")
        .args(["-c", script])
        .current_dir(&m.mnt)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]", "{out:?}");
    m.stop();
}

#[test]
fn deny_rules_can_target_one_uid_and_filters_can_be_scoped() {
    let m = Mount::new(&[
        "--filter",
        "deny=**/*.key:open:EACCES:uid=65534",
        "--filter",
        "deny=**:unlink:EPERM;under=/keep",
    ]);
    fs::set_permissions(&m.dir, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(m.backing.join("id.key"), b"k").unwrap();
    fs::set_permissions(m.backing.join("id.key"), fs::Permissions::from_mode(0o644)).unwrap();
    // Root reads it, nobody does not.
    assert_eq!(fs::read(m.mnt.join("id.key")).unwrap(), b"k");
    let out = output(
        as_user(NOBODY, NOBODY, &[])
            .arg("cat")
            .arg(m.mnt.join("id.key")),
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{out:?}"
    );

    fs::create_dir(m.backing.join("keep")).unwrap();
    fs::write(m.backing.join("keep/f"), b"").unwrap();
    fs::write(m.backing.join("gone"), b"").unwrap();
    assert_eq!(
        fs::remove_file(m.mnt.join("keep/f"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EPERM)
    );
    fs::remove_file(m.mnt.join("gone")).unwrap();
    m.stop();
}

#[test]
fn bad_filter_specs_are_refused_with_a_clear_message() {
    let tmp = tempfile::tempdir_in(test_root()).unwrap();
    for (spec, needle) in [
        ("nosuch=1", "unknown filter kind"),
        ("deny=a:write", "expected GLOB:OPS:ERRNO"),
        ("deny=a:write:ENOPE", "unknown errno"),
        ("audit=/nonexistent-dir/x.jsonl", "cannot open audit log"),
    ] {
        let err = mount_refused(tmp.path(), tmp.path(), &["--filter", spec]);
        assert!(err.contains(needle), "{spec}: {err}");
        assert!(!is_mounted(tmp.path()));
    }
    // An audit log inside the mount point would be hidden by the mount.
    let (backing, mnt) = (tmp.path().join("b"), tmp.path().join("m"));
    fs::create_dir(&backing).unwrap();
    fs::create_dir(&mnt).unwrap();
    let spec = format!("audit={}", mnt.join("a.jsonl").display());
    let err = mount_refused(&backing, &mnt, &["--filter", &spec]);
    assert!(err.contains("inside the mount point"), "{err}");
    assert!(!mnt.join("a.jsonl").exists() && !is_mounted(&mnt));
    // Also by a symlink to a file not made yet (canonicalize cannot resolve it).
    std::os::unix::fs::symlink(mnt.join("a.jsonl"), tmp.path().join("link")).unwrap();
    let spec = format!("audit={}", tmp.path().join("link").display());
    let err = mount_refused(&backing, &mnt, &["--filter", &spec]);
    assert!(err.contains("inside the mount point"), "{err}");
    assert!(!mnt.join("a.jsonl").exists() && !is_mounted(&mnt));
    // Globs are relative to BACKING: one written as BACKING's absolute path would never
    // match, leaving the rule without effect.
    fs::create_dir(backing.join("secret")).unwrap();
    let abs = fs::canonicalize(&backing).unwrap().join("secret/**");
    let spec = format!("deny={}:read:EACCES", abs.display());
    let err = mount_refused(&backing, &mnt, &["--filter", &spec]);
    assert!(err.contains(r#"write "secret/**""#), "{err}");
    let spec = format!("audit=-;under={}", backing.join("secret").display());
    let err = mount_refused(&backing, &mnt, &["--filter", &spec]);
    assert!(err.contains(r#"write "secret""#), "{err}");
    // Nor would globs and subtrees that climb out of BACKING, and an audit needs its log.
    for (spec, says) in [
        ("deny=../etc/**:read:EACCES", "never matches"),
        (
            "audit=-;under=../etc",
            "expected a directory inside BACKING",
        ),
        ("audit=", "needs a log file"),
    ] {
        let err = mount_refused(&backing, &mnt, &["--filter", spec]);
        assert!(err.contains(says), "{spec}: {err}");
    }
    assert!(!is_mounted(&mnt));
}

#[test]
fn a_glob_naming_nothing_in_backing_is_reported() {
    let m = Mount::new(&[
        "--filter",
        "deny=secrets/**:read:EACCES;**/*.key:all:ENOENT",
    ]);
    fs::create_dir(m.backing.join("secret")).unwrap();
    let err = m.stop();
    assert!(
        err.contains(r#""secrets/**" matches nothing yet: BACKING has no secrets"#),
        "{err}"
    );
    // `**/*.key` can match anywhere: nothing to say about it.
    assert!(!err.contains("*.key\" matches"), "{err}");
}

/// Runs `sh -c SCRIPT` in `dir` as uid/gid 65534; the exit status and stderr.
fn nobody_sh(dir: &Path, script: &str) -> std::process::Output {
    output(
        as_user(NOBODY, NOBODY, &[])
            .args(["sh", "-c", script])
            .current_dir(dir),
    )
}

/// Runs `script` as nobody in `dir`; it must fail with "Permission denied".
fn refused_to_nobody(dir: &Path, script: &str) {
    let out = nobody_sh(dir, script);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("denied"),
        "{script}: {}",
        describe(&out)
    );
}

/// A caller kept from reading something cannot read it under another name: not by
/// renaming it (or a directory above it) out of the rule's paths, not by linking it
/// there, not after someone made and removed a second name for it, and not from the
/// kernel's cache of a symlink another caller read. A rule the kernel never asks about
/// (access) is refused at mount.
#[test]
fn read_rules_hold_across_renames_links_and_caches() {
    let m = Mount::new(&[
        "--filter",
        "deny=**/*.key:open:EACCES:uid=65534;home/rd/**:read:EACCES:uid=65534;\
         **/*.lnk:read:EACCES:uid=65534",
    ]);
    make_traversable(&m.dir);
    fs::set_permissions(&m.backing, fs::Permissions::from_mode(0o777)).unwrap();
    for d in ["pub", "home", "home/rd"] {
        fs::create_dir(m.backing.join(d)).unwrap();
        fs::set_permissions(m.backing.join(d), fs::Permissions::from_mode(0o777)).unwrap();
    }
    for f in ["pub/a.key", "pub/b.key", "home/rd/k"] {
        fs::write(m.backing.join(f), b"secret").unwrap();
        std::os::unix::fs::chown(m.backing.join(f), Some(NOBODY), Some(NOBODY)).unwrap();
    }
    std::os::unix::fs::symlink("pub/a.key", m.backing.join("x.lnk")).unwrap();
    let refused = |script: &str| refused_to_nobody(&m.mnt, script);
    refused("cat pub/a.key");
    refused("mv pub/b.key pub/b.txt");
    refused("ln pub/b.key pub/b.txt");
    refused("mv home/rd home/x");
    refused("mv home/rd/k home/k");
    // A second name made and removed by root: the first is the one that counts again.
    fs::hard_link(m.mnt.join("pub/a.key"), m.mnt.join("pub/tmp")).unwrap();
    fs::remove_file(m.mnt.join("pub/tmp")).unwrap();
    refused("cat pub/a.key");
    // Root reads the link first; nobody is still asked, and refused.
    assert_eq!(
        fs::read_link(m.mnt.join("x.lnk")).unwrap(),
        Path::new("pub/a.key")
    );
    refused("readlink x.lnk || { echo 'readlink: Permission denied' >&2; exit 1; }");
    // What is outside the rules still moves.
    assert!(nobody_sh(&m.mnt, "mv pub/a.key pub/c.key").status.success());
    m.stop();

    let out = output(Command::new(bin()).args([
        "fs",
        "mount",
        "/tmp",
        "/tmp",
        "--filter",
        "deny=x:access:EACCES",
    ]));
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("access(2)"),
        "{}",
        describe(&out)
    );
}

/// A read rule on a subtree (`b/**`) refuses listing `b` and reading what is below it,
/// not walking through `b`: the kernel reads a directory's ACL as the caller to check the
/// search, and the rule refused that too (stat b/k failed with EACCES).
#[test]
fn a_read_rule_on_a_subtree_lets_the_caller_walk_through_it() {
    let m = Mount::new(&["--filter", "deny=b/**:read:EACCES:uid=65534"]);
    make_traversable(&m.dir);
    fs::set_permissions(&m.backing, fs::Permissions::from_mode(0o755)).unwrap();
    fs::create_dir(m.backing.join("b")).unwrap();
    fs::set_permissions(m.backing.join("b"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(m.backing.join("b/k"), b"secret").unwrap();
    fs::set_permissions(m.backing.join("b/k"), fs::Permissions::from_mode(0o644)).unwrap();
    rustix::fs::setxattr(
        m.backing.join("b/k").as_path(),
        "user.x",
        b"v",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    let out = nobody_sh(&m.mnt, "stat -c %s b/k");
    assert!(out.status.success(), "stat b/k: {}", describe(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "6");
    refused_to_nobody(&m.mnt, "cat b/k");
    refused_to_nobody(&m.mnt, "ls b");
    let script = format!(
        "{} -c \"import os; os.getxattr('b/k', 'user.x')\"",
        python()
    );
    refused_to_nobody(&m.mnt, &script);
    m.stop();
}

/// Rules on both names of a hard link hold after the kernel has forgotten the directory
/// of the name the daemon met last: the daemon judges by another name it met, whose
/// directories the kernel still holds. (It called the file `/?/k`, which neither rule
/// matched.) Nobody holds `b/k` by an `O_PATH` descriptor and reopens it through
/// /proc/self/fd, which asks the daemon to open it with no lookup of a name.
#[test]
fn rules_on_both_names_of_a_hard_link_hold_after_the_kernel_forgets_a_directory() {
    use std::io::{BufRead, BufReader, Write};
    let m = Mount::new(&[
        "--filter",
        "deny=a/*:read:EACCES:uid=65534;b/*:read:EACCES:uid=65534",
    ]);
    make_traversable(&m.dir);
    fs::set_permissions(&m.backing, fs::Permissions::from_mode(0o755)).unwrap();
    for d in ["a", "b"] {
        fs::create_dir(m.backing.join(d)).unwrap();
        fs::set_permissions(m.backing.join(d), fs::Permissions::from_mode(0o755)).unwrap();
    }
    fs::write(m.backing.join("a/k"), b"secret").unwrap();
    fs::set_permissions(m.backing.join("a/k"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::hard_link(m.backing.join("a/k"), m.backing.join("b/k")).unwrap();
    let script = r#"
import os, sys
fd = os.open('b/k', os.O_PATH)
print('held', flush=True)
sys.stdin.readline()
try:
    os.open(f'/proc/self/fd/{fd}', os.O_RDONLY)
    print('opened')
except PermissionError:
    print('refused')
"#;
    let mut nobody = as_user(NOBODY, NOBODY, &[])
        .args([python(), "-c", script])
        .current_dir(&m.mnt)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(nobody.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "held");
    // The daemon meets a/k last; then the kernel forgets a, and the daemon closes what
    // it held of it.
    fs::metadata(m.mnt.join("a/k")).unwrap();
    let a = m.backing.join("a");
    let is_a = |t: &Path| t == a;
    assert!(
        daemon_holds(m.pid(), is_a),
        "the daemon holds a descriptor of a after the lookup"
    );
    drop_dentries_until_released(m.pid(), is_a, "the kernel did not forget a");
    let mut stdin = nobody.stdin.take().unwrap();
    stdin.write_all(b"go\n").unwrap();
    drop(stdin);
    assert_eq!(lines.next().unwrap().unwrap(), "refused");
    assert!(nobody.wait().unwrap().success());
    m.stop();
}

/// The audit line of a call from a thread names its process (and the thread), and a
/// setattr says what it set.
#[test]
fn audit_names_the_process_of_a_thread_and_what_a_setattr_sets() {
    let (_tmp, log, m) = audited_mount("");
    let script = "import os, sys, threading\n\
        d = sys.argv[1]\n\
        t = threading.Thread(target=lambda: open(os.path.join(d, 'f'), 'w').close())\n\
        t.start(); t.join()\n\
        os.chown(os.path.join(d, 'f'), 123, 456)\n\
        os.utime(os.path.join(d, 'f'), ns=(1_000_000_005, 2_000_000_007))\n\
        os.utime(os.path.join(d, 'f'))\n\
        os.chmod(os.path.join(d, 'f'), 0o640)\n\
        print(os.getpid())\n";
    let pid: u64 = run(Command::new(python()).args(["-c", script]).arg(&m.mnt))
        .trim()
        .parse()
        .unwrap();
    m.stop();
    let lines = audit_lines(&log);
    let create = lines
        .iter()
        .find(|l| l["op"] == "create" && l["path"] == "/f")
        .expect("a create line");
    assert_eq!(create["pid"], pid, "{create}");
    assert!(create["tid"].as_u64().is_some_and(|t| t != pid), "{create}");
    let setattrs: Vec<_> = lines
        .iter()
        .filter(|l| l["op"] == "setattr" && l["path"] == "/f" && l["pid"] == pid)
        .collect();
    let has = |key: &str, want: serde_json::Value| setattrs.iter().any(|l| l[key] == want);
    assert!(
        has("owner", 123.into()) && has("group", 456.into()),
        "{setattrs:#?}"
    );
    assert!(has("atime", serde_json::json!([1, 5])), "{setattrs:#?}");
    assert!(has("mtime", serde_json::json!([2, 7])), "{setattrs:#?}");
    assert!(has("mtime", "now".into()), "{setattrs:#?}");
    assert!(has("mode", "640".into()), "{setattrs:#?}");
}

/// Exchanging two directories moves each one way only: one with nothing a rule covers
/// below it, exchanged with one whose files only come under the rule, is no escape.
#[test]
fn exchanging_directories_is_judged_one_way_each() {
    let m = Mount::new(&["--filter", "deny=**/s/*/x/**:read:EACCES:uid=65534"]);
    make_traversable(&m.dir);
    fs::set_permissions(&m.backing, fs::Permissions::from_mode(0o777)).unwrap();
    for d in ["s", "s/d", "p", "p/e", "p/e/x"] {
        fs::create_dir(m.backing.join(d)).unwrap();
        std::os::unix::fs::chown(m.backing.join(d), Some(NOBODY), Some(NOBODY)).unwrap();
    }
    fs::write(m.backing.join("p/e/x/f"), b"f").unwrap();
    let exchange = "import ctypes, sys\n\
        libc = ctypes.CDLL(None, use_errno=True)\n\
        if libc.renameat2(-100, b's/d', -100, b'p/e', 2) != 0:\n\
        \x20   raise OSError(ctypes.get_errno(), 'renameat2')\n";
    let out = output(
        as_user(NOBODY, NOBODY, &[])
            .args([python(), "-c", exchange])
            .current_dir(&m.mnt),
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert!(m.backing.join("s/d/x/f").exists());
    m.stop();
}

/// An object reached through a descriptor is logged under a name it still has, whatever
/// was done to its other names (hard links made, moved, removed, replaced).
#[test]
fn audit_names_an_object_by_a_name_it_still_has_after_link_games() {
    let tmp = tempfile::tempdir_in(test_root()).unwrap();
    let log = tmp.path().join("audit.jsonl");
    let m = Mount::new(&[
        "--no-passthrough",
        "--filter",
        &format!("audit={}", log.display()),
    ]);
    let script = "import os, sys\n\
        os.chdir(sys.argv[1])\n\
        def game(tag, steps):\n\
        \x20   a = tag + 'a'\n\
        \x20   open(a, 'w').close()\n\
        \x20   fd = os.open(a, os.O_WRONLY)\n\
        \x20   for s in steps: s(tag)\n\
        \x20   os.write(fd, tag.encode()); os.close(fd)\n\
        L = lambda x, y: lambda t: os.link(t + x, t + y)\n\
        M = lambda x, y: lambda t: os.rename(t + x, t + y)\n\
        R = lambda x: lambda t: os.unlink(t + x)\n\
        def X(t): open(t + 'x', 'w').close(); os.rename(t + 'x', t + 'b')\n\
        game('one', [L('a', 'b'), M('a', 'c'), R('c')])\n\
        game('two', [L('a', 'b'), L('a', 'c'), R('c'), R('b')])\n\
        game('three', [L('a', 'b'), X])\n";
    run(Command::new(python()).args(["-c", script]).arg(&m.mnt));
    m.stop();
    let lines = audit_lines(&log);
    for (tag, name) in [("one", "/oneb"), ("two", "/twoa"), ("three", "/threea")] {
        let write = lines
            .iter()
            .find(|l| {
                l["op"] == "write"
                    && l["bytes"] == tag.len() as u64
                    && l["path"]
                        .as_str()
                        .is_some_and(|p| p.starts_with(&format!("/{tag}")))
            })
            .unwrap_or_else(|| panic!("no write line for {tag}"));
        assert_eq!(write["path"], name, "{tag}: {write}");
    }
}

/// The kernel sends some requests on its own, without the caller's identity (uid 0, pid
/// 0): the release of a directory, and the write-back of a shared mapping. A rule for
/// every uid but one must not refuse them for the one it lets through: a refused release
/// used to keep the directory open in the daemon (one descriptor per listing), and a
/// refused write-back lost the mapping's data with no error at close.
#[test]
fn requests_the_kernel_makes_on_its_own_are_judged_as_their_opener() {
    let tmp = tempfile::tempdir_in(test_root()).unwrap();
    let log = tmp.path().join("audit.jsonl");
    let m = Mount::new(&[
        "--filter",
        &format!("audit={}", log.display()),
        "--filter",
        "deny=secret/**:all:EACCES:uid!=65534",
    ]);
    make_traversable(&m.dir);
    fs::set_permissions(&m.backing, fs::Permissions::from_mode(0o777)).unwrap();
    for d in ["secret", "secret/d"] {
        fs::create_dir(m.backing.join(d)).unwrap();
        std::os::unix::fs::chown(m.backing.join(d), Some(NOBODY), Some(NOBODY)).unwrap();
    }
    fs::write(m.backing.join("secret/m"), vec![b'.'; 4096]).unwrap();
    std::os::unix::fs::chown(m.backing.join("secret/m"), Some(NOBODY), Some(NOBODY)).unwrap();

    let listings = 20;
    let out = nobody_sh(
        &m.mnt,
        &format!("for i in $(seq {listings}); do ls secret/d >/dev/null || exit 1; done"),
    );
    assert!(out.status.success(), "{}", describe(&out));
    // The releases are sent after `ls` has gone (the kernel does not wait for them).
    // (Open for listing, that is: the daemon may hold an O_PATH descriptor of the node.)
    let held = |dir: &Path| {
        let pid = m.pid();
        fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| {
                let e = e.unwrap();
                let info =
                    fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", e.file_name().to_str()?))
                        .ok()?;
                let flags = info.lines().find_map(|l| l.strip_prefix("flags:"))?.trim();
                let flags = i32::from_str_radix(flags, 8).ok()?;
                (fs::read_link(e.path()).ok()? == dir && flags & libc::O_PATH == 0).then_some(())
            })
            .count()
    };
    let dir = fs::canonicalize(m.backing.join("secret/d")).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while held(&dir) > 0 && std::time::Instant::now() < deadline {
        std::thread::yield_now();
    }
    assert_eq!(
        held(&dir),
        0,
        "the daemon still holds secret/d open after {listings} listings"
    );

    let script = "import mmap, os\n\
                  fd = os.open('secret/m', os.O_RDWR)\n\
                  with mmap.mmap(fd, 4096) as mm:\n\
                  \x20   mm[:6] = b'MAPPED'\n\
                  \x20   mm.flush()\n\
                  os.fsync(fd)\n\
                  os.close(fd)\n";
    let out = output(
        as_user(NOBODY, NOBODY, &[])
            .args([python(), "-c", script])
            .current_dir(&m.mnt),
    );
    assert!(
        out.status.success(),
        "write through a mapping: {}",
        describe(&out)
    );
    assert_eq!(
        &fs::read(m.backing.join("secret/m")).unwrap()[..6],
        b"MAPPED",
        "the mapping's data did not reach the backing file"
    );
    m.stop();
}

/// A rule scoped with `under=` cannot be left behind by moving what it guards out of its
/// subtree (where it no longer applies): renames and links out are refused as reads
/// are, a file the rule does not guard still moves out, and moves within stay allowed.
#[test]
fn a_scoped_rule_cannot_be_escaped_by_moving_out_of_its_subtree() {
    let m = Mount::new(&[
        "--filter",
        "deny=**/*.key:read:EACCES:uid=65534;under=home/a",
    ]);
    make_traversable(&m.dir);
    fs::set_permissions(&m.backing, fs::Permissions::from_mode(0o777)).unwrap();
    for d in ["home", "home/a", "home/a/sub", "tmp"] {
        fs::create_dir(m.backing.join(d)).unwrap();
        fs::set_permissions(m.backing.join(d), fs::Permissions::from_mode(0o777)).unwrap();
    }
    for f in [
        "home/a/x.key",
        "home/a/sub/y.key",
        "home/a/notes",
        "tmp/z.key",
    ] {
        fs::write(m.backing.join(f), b"secret").unwrap();
        std::os::unix::fs::chown(m.backing.join(f), Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let refused = |script: &str| refused_to_nobody(&m.mnt, script);
    refused("cat home/a/x.key");
    refused("mv home/a/x.key tmp/x.key");
    refused("ln home/a/x.key tmp/x.key");
    refused("mv home/a/sub tmp/sub");
    refused("mv home/a tmp/a");
    refused("mv home tmp/h");
    for ok in [
        "cat tmp/z.key",
        "mv home/a/x.key home/a/sub/x.key",
        "mv home/a/notes tmp/notes",
    ] {
        let out = nobody_sh(&m.mnt, ok);
        assert!(out.status.success(), "{ok}: {}", describe(&out));
    }
    assert!(m.backing.join("home/a/sub/x.key").exists());
    assert!(!m.backing.join("tmp/x.key").exists());
    m.stop();
}
