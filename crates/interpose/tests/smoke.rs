//! The mount comes up, shows the backing tree, and goes away cleanly.

mod common;
use common::*;

#[test]
fn mount_shows_backing_and_unmounts_cleanly() {
    let m = Mount::new(&[]);
    std::fs::write(m.backing.join("hello.txt"), b"hi\n").unwrap();
    assert_eq!(std::fs::read(m.mnt.join("hello.txt")).unwrap(), b"hi\n");
    std::fs::write(m.mnt.join("new.txt"), b"through the mount").unwrap();
    assert_eq!(
        std::fs::read(m.backing.join("new.txt")).unwrap(),
        b"through the mount"
    );
    m.stop();
}

#[test]
fn a_second_mount_on_an_interpose_mount_is_refused() {
    let m = Mount::new(&[]);
    let err = mount_refused(&m.backing, &m.mnt, &[]);
    assert!(err.contains("an interpose mount already"), "{err}");
    std::fs::write(m.backing.join("f"), b"x").unwrap();
    assert_eq!(
        std::fs::read(m.mnt.join("f")).unwrap(),
        b"x",
        "the first still serves"
    );
    m.stop();
}

/// A daemon whose log reader has gone away (its standard error a pipe nobody reads) goes
/// on serving, and unmounts and exits 0 on SIGTERM: a log line it cannot write is
/// dropped. The logger used to panic the thread that logged, the signal thread among them,
/// and the daemon then never unmounted.
#[test]
fn a_daemon_whose_log_reader_is_gone_still_serves_and_stops() {
    let mut m = Mount::new(&[]);
    m.close_stderr();
    std::fs::write(m.mnt.join("f"), b"x").unwrap();
    assert_eq!(std::fs::read(m.backing.join("f")).unwrap(), b"x");
    let err = m.stop();
    assert!(err.is_empty(), "{err}");
}

/// A daemon whose mount was unmounted from outside leaves alone whatever is mounted there
/// by the time it exits. It used to unmount the mount point once more on its way out
/// (fuser took the connection's POLLERR for "still mounted"), which took away a mount made
/// there in between: a remount right after an unmount could lose its mount.
/// The first daemon is stopped while it is unmounted and the second mounts, so that it
/// exits after.
#[test]
fn a_daemon_unmounted_from_outside_leaves_the_next_mount_alone() {
    let dir = tempfile::Builder::new()
        .prefix("interpose-test-")
        .tempdir_in(test_root())
        .unwrap();
    let (backing, mnt) = (dir.path().join("backing"), dir.path().join("mnt"));
    std::fs::create_dir(&backing).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    let first = Mount::start(&backing, &mnt, &[]);
    first.signal(libc::SIGSTOP);
    // umount2(2) itself: `fs unmount` would wait for the stopped daemon, and umount(8)
    // looks at the mount point first, which the stopped daemon would have to answer.
    let path = std::ffi::CString::new(mnt.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; umount2 has no memory effects.
    let r = unsafe { libc::umount2(path.as_ptr(), 0) };
    assert_eq!(r, 0, "umount2: {}", std::io::Error::last_os_error());
    let second = Mount::start(&backing, &mnt, &[]);
    first.signal(libc::SIGCONT);
    let status = first
        .wait_exit_leaving_the_mount_point(std::time::Duration::from_secs(20))
        .expect("the first daemon did not exit after its unmount");
    assert!(status.success(), "the first daemon: {status:?}");
    assert!(
        is_mounted(&mnt),
        "the first daemon took away the second mount"
    );
    std::fs::write(backing.join("f"), b"x").unwrap();
    assert_eq!(std::fs::read(mnt.join("f")).unwrap(), b"x");
    second.stop();
}

/// `fs unmount` returns once the daemon has exited, not only the kernel's mount: a
/// command right after it (a remount of the same isolation store, a commit, reading the
/// audit log) used to find the daemon still holding the store ("in use by another
/// process") or the last records unwritten. The daemon is stopped across the unmount, so
/// that it cannot be done before the mount is gone.
#[test]
fn unmount_returns_once_the_daemon_has_exited() {
    let dir = tempfile::Builder::new()
        .prefix("interpose-test-")
        .tempdir_in(test_root())
        .unwrap();
    let (backing, mnt, store) = (
        dir.path().join("backing"),
        dir.path().join("mnt"),
        dir.path().join("store"),
    );
    std::fs::create_dir(&backing).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    let store_arg = store.to_str().unwrap();
    let m = Mount::start(&backing, &mnt, &["--isolate", store_arg]);
    std::fs::write(mnt.join("f"), b"x").unwrap();
    m.signal(libc::SIGSTOP);
    let mut unmount = std::process::Command::new(bin())
        .args(["fs", "unmount"])
        .arg(&mnt)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while is_mounted(&mnt) {
        assert!(
            std::time::Instant::now() < deadline,
            "the mount is still there"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(
        unmount.try_wait().unwrap().is_none(),
        "fs unmount returned while its daemon was still running"
    );
    m.signal(libc::SIGCONT);
    let status = wait_timeout(&mut unmount, std::time::Duration::from_secs(20))
        .expect("fs unmount did not return after its daemon went on");
    assert!(status.success(), "fs unmount: {status:?}");
    assert!(
        m.wait_exit_leaving_the_mount_point(std::time::Duration::ZERO)
            .is_some(),
        "fs unmount returned before its daemon exited"
    );
    let m = Mount::start(&backing, &mnt, &["--isolate", store_arg]);
    assert_eq!(std::fs::read(mnt.join("f")).unwrap(), b"x");
    m.stop();
}

#[test]
fn killed_daemon_leaves_a_mount_that_unmount_removes() {
    let mut m = Mount::new(&[]);
    std::fs::write(m.mnt.join("f"), b"x").unwrap();
    m.kill();
    assert!(is_mounted(&m.mnt));
    m.cleanup_dead();
    let m2 = Mount::start(&m.backing, &m.mnt, &[]);
    assert_eq!(std::fs::read(m2.mnt.join("f")).unwrap(), b"x");
    m2.stop();
}

/// The first SIGTERM on a busy mount detaches it lazily and serves on until its last user
/// leaves; a second stops the daemon at once (it used to be ignored: only SIGKILL ended a
/// daemon whose mount a shell sat in).
#[test]
fn a_second_signal_stops_a_daemon_whose_mount_is_busy() {
    let m = Mount::new(&[]);
    let mut user = std::process::Command::new("sleep")
        .arg("300")
        .current_dir(&m.mnt)
        .spawn()
        .unwrap();
    m.signal(libc::SIGTERM);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while is_mounted(&m.mnt) {
        assert!(
            std::time::Instant::now() < deadline,
            "the busy mount was not detached"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    m.signal(libc::SIGTERM);
    let status = m.wait_exit(std::time::Duration::from_secs(20));
    let _ = user.kill();
    let _ = user.wait();
    let status = status.expect("the daemon did not stop on a second SIGTERM");
    assert!(
        !status.success(),
        "{status}: a forced stop is not a clean exit"
    );
}

/// An error names its cause once (it used to print the OS error twice: once in the
/// library's message and again as the message's cause).
#[test]
fn an_error_names_its_cause_once() {
    let out = std::process::Command::new(bin())
        .args(["fs", "mount", "/nonexistent-backing-dir", "/tmp"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert_eq!(err.matches("os error 2").count(), 1, "{err}");
}

/// `fs unmount` unmounts interpose's mounts only (it used to unmount anything).
#[test]
fn unmount_refuses_a_mount_that_is_not_interposes() {
    let dir = tempfile::Builder::new()
        .prefix("interpose-test-tmpfs-")
        .tempdir_in(test_root())
        .unwrap();
    run(std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "none"])
        .arg(dir.path()));
    let out = std::process::Command::new(bin())
        .args(["fs", "unmount"])
        .arg(dir.path())
        .output()
        .unwrap();
    let still = is_mounted(dir.path());
    let _ = std::process::Command::new("umount")
        .arg(dir.path())
        .status();
    assert!(!out.status.success(), "fs unmount of a tmpfs succeeded");
    assert!(still, "fs unmount removed a tmpfs mount");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not interpose's"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A mount point whose name is not UTF-8 hides no mount: `fs unmount` read mountinfo as
/// text, and with one such name anywhere on the machine said "not a mount point" of every
/// mount (and `fs mount` stacked a second mount on a mounted point).
#[test]
fn a_mount_point_whose_name_is_not_utf8_hides_no_mount() {
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::Builder::new()
        .prefix("interpose-test-bytes-")
        .tempdir_in(test_root())
        .unwrap();
    let backing = tmp.path().join("backing");
    let mnt = tmp.path().join(std::ffi::OsStr::from_bytes(b"mnt-\xfd"));
    std::fs::create_dir(&backing).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    let m = Mount::start(&backing, &mnt, &[]);
    let refused = mount_refused(&backing, &mnt, &[]);
    assert!(
        refused.contains("already"),
        "a second mount there: {refused}"
    );
    let out = std::process::Command::new(bin())
        .args(["fs", "unmount"])
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fs unmount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!is_mounted(&mnt), "still mounted");
    let status = m.wait_exit(std::time::Duration::from_secs(20));
    assert!(status.is_some_and(|s| s.success()), "daemon: {status:?}");
}

/// The file a daemon holds locked while it runs (/run/interpose/fs/MAJOR:MINOR) is its
/// user's only: anyone who can open it can flock it, even read-only, and held up the
/// mount's start by 10 s and every unmount of it by 30 s ("daemon still finishing").
#[test]
fn the_lock_a_daemon_holds_is_root_s_only() {
    use std::os::unix::fs::PermissionsExt;
    // As earlier versions left them (the files stay; the next mount with the same device
    // number takes its file). Only those no running daemon holds.
    for e in std::fs::read_dir("/run/interpose/fs")
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(f) = std::fs::File::open(e.path()) else {
            continue;
        };
        let free = rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockShared);
        if free.is_ok() {
            let _ = f.set_permissions(std::fs::Permissions::from_mode(0o644));
        }
    }
    let m = Mount::new(&[]);
    let dev = mount_at(&m.mnt).unwrap().dev;
    let lock = std::path::Path::new("/run/interpose/fs").join(&dev);
    let mode = std::fs::metadata(&lock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{}", lock.display());
    m.stop();
}
