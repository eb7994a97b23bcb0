//! `interpose blk attach` / `detach` with the real kernel: an ext4 image (mke2fs -d) made
//! into an interpose image with bad sectors from a mapfile, attached as /dev/loopN over
//! the FUSE file this process serves, mounted read-only with mount(8): files whose
//! blocks are readable read back exactly, files touching bad sectors fail with EIO (and
//! only those); sector-exact direct reads of the device fail exactly on the bad sectors;
//! detach is refused while mounted and afterwards removes the device and ends the
//! process; SIGTERM and a raw source with a mapfile do the same; a killed attach's
//! watchdog removes its device.

mod common;
mod support;
use common::*;
use support::*;

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A running `interpose blk attach`; on drop: SIGTERM, then the device must be gone.
struct Attach {
    child: Option<Child>,
    device: PathBuf,
    pid: u32,
}

impl Attach {
    fn start(source: &str) -> Attach {
        let mut child = Command::new(bin())
            .args(["blk", "attach", source])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let line = BufReader::new(child.stdout.take().unwrap()).lines().next();
        let device = match line {
            Some(Ok(l)) if l.starts_with("/dev/loop") => PathBuf::from(l),
            other => {
                let _ = child.kill();
                let _ = child.wait();
                let mut err = String::new();
                let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                panic!("blk attach did not print a device: {other:?}\n{err}");
            }
        };
        Attach {
            pid: child.id(),
            child: Some(child),
            device,
        }
    }

    /// Whether the loop device still reads this attach's file (another test's attach may
    /// have taken the same device since).
    fn loop_attached(&self) -> bool {
        let name = self.device.file_name().unwrap().to_str().unwrap();
        let ours = Path::new("/run/interpose/blk")
            .join(self.pid.to_string())
            .join("disk");
        fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
            .is_ok_and(|f| Path::new(f.trim()) == ours)
    }

    /// Sends `sig`; the process must end cleanly, its device go, and its watchdog end
    /// with it (reaped by it: no orphan).
    fn ends_cleanly_on(&mut self, sig: i32, name: &str) {
        let watchdog = watchdog_of(self.pid);
        let mut child = self.child.take().unwrap();
        signal(&child, sig);
        assert!(
            wait_timeout(&mut child, Duration::from_secs(20)).is_some_and(|st| st.success()),
            "blk attach did not end cleanly on {name}"
        );
        assert!(
            !Path::new(&format!("/proc/{watchdog}")).exists(),
            "the watchdog outlived an attach that ended cleanly on {name}"
        );
        assert!(
            within_10s(|| !self.loop_attached()),
            "{} still attached after {name}",
            self.device.display()
        );
    }

    /// Waits for the process to end by itself; its exit status.
    fn wait(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        wait_timeout(&mut child, Duration::from_secs(20)).expect("blk attach did not end")
    }
}

impl Drop for Attach {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, libc::SIGTERM);
            if wait_timeout(&mut child, Duration::from_secs(20)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Reads `len` bytes at `offset` of the device with O_DIRECT (no page cache rounding).
fn direct_read(dev: &Path, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)?;
    // O_DIRECT wants an aligned buffer: take a 4096-aligned window of a larger one.
    let mut raw = vec![0u8; len + 4096];
    let pad = raw.as_ptr().align_offset(4096);
    let buf = &mut raw[pad..pad + len];
    f.read_exact_at(buf, offset)?;
    Ok(buf.to_vec())
}

#[test]
fn an_attached_image_mounts_and_reads_fail_exactly_on_bad_sectors() {
    let _serial = one_at_a_time();
    let t = plain_dir("interpose-test-blkattach-");
    let d = t.path();
    let tree = d.join("tree");
    fs::create_dir_all(tree.join("sub")).unwrap();
    for i in 0..30 {
        let body: Vec<u8> = (0..20_000 + i * 777)
            .map(|k| (k as u8).wrapping_mul(i as u8 + 3))
            .collect();
        fs::write(tree.join(format!("sub/f{i}")), body).unwrap();
    }
    fs::write(tree.join("victim"), vec![0x5a; 256 * 1024]).unwrap();
    let raw = d.join("fs.raw");
    run(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-d"])
        .arg(&tree)
        .arg(&raw)
        .arg("16M"));
    // Which device blocks hold "victim"? debugfs says (4 KiB blocks).
    let blocks = run(Command::new("debugfs")
        .arg("-R")
        .arg("blocks /victim")
        .arg(&raw));
    let first: u64 = blocks
        .split_whitespace()
        .next()
        .and_then(|b| b.parse().ok())
        .unwrap_or_else(|| panic!("debugfs blocks: {blocks:?}"));
    // One bad 512-byte sector in the middle of victim's second block.
    let bad = (first + 1) * 4096 + 1024;
    let size = fs::metadata(&raw).unwrap().len();
    let map = d.join("fs.map");
    fs::write(
        &map,
        format!(
            "# Mapfile. Created by GNU ddrescue version 1.27\n0x00000000     +               1\n\
             0x00000000  {:#010X}  +\n{:#010X}  0x00000200  -\n{:#010X}  {:#010X}  +\n",
            bad,
            bad,
            bad + 512,
            size - bad - 512
        ),
    )
    .unwrap();
    let img = d.join("fs.img");
    run(Command::new(bin())
        .args(["image", "create"])
        .arg(&raw)
        .arg("-o")
        .arg(&img)
        .arg("--mapfile")
        .arg(&map));

    for source in [
        s(&img).to_owned(),
        format!("{},mapfile={}", s(&raw), s(&map)),
    ] {
        let mut a = Attach::start(&source);
        assert!(a.loop_attached(), "{source}: no loop device");
        // Sector-exact: the bad sector fails, its neighbours read the original bytes.
        let original = fs::read(&raw).unwrap();
        for (off, len, ok) in [
            (bad - 512, 512usize, true),
            (bad, 512, false),
            (bad + 512, 512, true),
            (bad - 4096, 8192, false),
            (0, 65536, true),
        ] {
            match direct_read(&a.device, off, len) {
                Ok(b) => {
                    assert!(ok, "{source}: read of {len} at {off} must fail");
                    assert!(
                        b == original[off as usize..off as usize + len],
                        "{source}: data at {off}"
                    );
                }
                Err(e) => {
                    assert!(!ok, "{source}: read of {len} at {off}: {e}");
                    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
                }
            }
        }

        // Mounted by the kernel: every file reads back but the one on the bad sector.
        let mnt = d.join("mnt");
        fs::create_dir_all(&mnt).unwrap();
        run(Command::new("mount")
            .args(["-t", "ext4", "-o", "ro,noload"])
            .arg(&a.device)
            .arg(&mnt));
        let m = Mounted(mnt.clone());
        for i in 0..30 {
            let p = format!("sub/f{i}");
            assert!(
                fs::read(mnt.join(&p)).unwrap() == fs::read(tree.join(&p)).unwrap(),
                "{source}: {p} differs"
            );
        }
        let e = fs::read(mnt.join("victim")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{source}: victim: {e}");
        // Detach is refused while mounted.
        let out = output(Command::new(bin()).args(["blk", "detach", s(&a.device)]));
        assert!(
            !out.status.success(),
            "detach of a mounted device succeeded"
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("in use"),
            "{}",
            describe(&out)
        );
        drop(m);
        if source.contains("mapfile") {
            // Now it works, and the serving process ends by itself; `--wait 0` only
            // leaves out waiting for a program that holds the device open.
            let out =
                output(Command::new(bin()).args(["blk", "detach", "--wait", "0", s(&a.device)]));
            assert!(out.status.success(), "{}", describe(&out));
        } else {
            // Held open by a program, not mounted: detach says so after its wait, not that
            // it detached (it said so after 30 s, device and attach still there), and the
            // device goes, with its attach process, once the program lets go.
            let held = fs::File::open(&a.device).unwrap();
            let out =
                output(Command::new(bin()).args(["blk", "detach", "--wait", "1", s(&a.device)]));
            assert!(
                !out.status.success()
                    && String::from_utf8_lossy(&out.stderr)
                        .contains("still open by another program"),
                "{}",
                describe(&out)
            );
            // (Its backing file's path changes as the attach detaches its mount lazily.)
            let name = a.device.file_name().unwrap().to_str().unwrap();
            assert!(
                Path::new(&format!("/sys/block/{name}/loop")).exists(),
                "{source}: gone while held open"
            );
            drop(held);
        }
        let status = a.wait();
        assert!(status.success(), "blk attach exited with {status}");
        assert!(
            within_10s(|| !a.loop_attached()),
            "{source}: loop device still attached"
        );
    }

    // SIGTERM also removes the device.
    Attach::start(s(&img)).ends_cleanly_on(libc::SIGTERM, "SIGTERM");
    // Not ours: refused.
    let out = output(Command::new(bin()).args(["blk", "detach", "/dev/null"]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a device attached by interpose"));
}

/// Holds the attach tests of this file one at a time (nextest runs each in its own
/// process, so a file lock): an attach sweeps what dead attaches left under
/// /run/interpose/blk, and one test plants such an entry on purpose.
fn one_at_a_time() -> fs::File {
    let f = fs::File::create(std::env::temp_dir().join("interpose-test-blk-attach.lock")).unwrap();
    rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive).unwrap();
    f
}

/// Whether `cond` holds within 10 s (a loop device's detach completes once whoever has it
/// open, udev's probe say, closes it: there is no event to wait for).
fn within_10s(cond: impl Fn() -> bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// Whether anything is mounted at `dir` (from /proc/self/mountinfo).
fn mounted_at(dir: &Path) -> bool {
    interpose_core::mountinfo::mounts()
        .unwrap()
        .iter()
        .any(|m| m.mount_point == dir)
}

/// The watchdog an attach process `pid` started (`interpose blk watchdog PID`, its child).
fn watchdog_of(pid: u32) -> u32 {
    let want = format!("watchdog\0{pid}\0");
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let stat = fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        // "pid (comm) state ppid ...": the fields after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|f| f.parse::<u32>().ok());
        let cmdline = fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
        if ppid == Some(pid) && String::from_utf8_lossy(&cmdline).contains(&want) {
            return p;
        }
    }
    panic!("attach process {pid} has no watchdog");
}

/// Makes this test process the one that inherits the orphans of its descendants: a
/// watchdog outlives the attach it watches, and this machine's init does not reap
/// orphans (they would stay zombies).
fn adopt_orphans() {
    rustix::process::set_child_subreaper(rustix::process::Pid::from_raw(std::process::id() as i32))
        .unwrap();
}

/// Waits (up to 20 s) for the orphaned watchdog `pid`, adopted by [`adopt_orphans`], to
/// end, and reaps it; whether it ended.
fn reap(pid: u32) -> bool {
    use rustix::process::{pidfd_open, waitpid, Pid, PidfdFlags, WaitOptions};
    let pid = Pid::from_raw(pid as i32).unwrap();
    // A pidfd becomes readable when the process ends.
    let Ok(fd) = pidfd_open(pid, PidfdFlags::empty()) else {
        return false;
    };
    let mut fds = [rustix::event::PollFd::new(
        &fd,
        rustix::event::PollFlags::IN,
    )];
    let timeout = rustix::event::Timespec {
        tv_sec: 20,
        tv_nsec: 0,
    };
    if rustix::event::poll(&mut fds, Some(&timeout)).unwrap_or(0) == 0 {
        return false;
    }
    waitpid(Some(pid), WaitOptions::empty()).is_ok()
}

/// SIGKILL of an attach process: its watchdog removes its dead FUSE mount and its
/// directory at once, and its loop device once nothing holds it (a held device reads EIO
/// until then). It used to all stay until `blk detach`.
#[test]
fn a_killed_attach_s_device_goes_with_its_watchdog() {
    let _serial = one_at_a_time();
    adopt_orphans();
    let t = plain_dir("interpose-test-blkwatch-");
    let raw = t.path().join("r.raw");
    fs::write(&raw, vec![0x6bu8; 1 << 20]).unwrap();
    for held in [false, true] {
        let mut a = Attach::start(s(&raw));
        let watchdog = watchdog_of(a.pid);
        let holder = held.then(|| fs::File::open(&a.device).unwrap());
        assert_eq!(
            direct_read(&a.device, 4096, 4096).unwrap(),
            vec![0x6b; 4096]
        );
        let mut child = a.child.take().unwrap();
        signal(&child, libc::SIGKILL);
        let _ = child.wait();
        assert!(reap(watchdog), "held {held}: the watchdog did not end");
        let dir = Path::new("/run/interpose/blk").join(a.pid.to_string());
        assert!(
            !mounted_at(&dir) && !dir.exists(),
            "held {held}: the watchdog left {}",
            dir.display()
        );
        // Its file, unmounted (lazily: the loop device holds it), is "/disk" now.
        let name = a.device.file_name().unwrap().to_str().unwrap().to_owned();
        let reads_dead_file = || {
            fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
                .is_ok_and(|f| f.trim() == "/disk")
        };
        if let Some(holder) = holder {
            assert!(reads_dead_file(), "a held device went while held");
            let autoclear = fs::read_to_string(format!("/sys/block/{name}/loop/autoclear"));
            assert_eq!(autoclear.unwrap().trim(), "1", "not set to go when let go");
            let err = direct_read(&a.device, 0, 4096).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
            drop(holder);
        }
        assert!(
            within_10s(|| !a.loop_attached() && !reads_dead_file()),
            "held {held}: the loop device stayed"
        );
    }
}

/// An attach process killed with SIGKILL together with its watchdog cannot clean up: its
/// loop device, its dead FUSE mount and its directory stay until `blk detach` of the
/// device, or the next `blk attach`, removes them. And detach signals no process that
/// merely has the dead one's pid now.
#[test]
fn what_a_killed_attach_left_is_removed_and_no_stranger_is_signalled() {
    let _serial = one_at_a_time();
    adopt_orphans();
    let t = plain_dir("interpose-test-blkdead-");
    let raw = t.path().join("zeros.raw");
    fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let leftovers = |a: &mut Attach| {
        let pid = a.child.as_ref().unwrap().id();
        let watchdog = watchdog_of(pid);
        // SAFETY: kill(2) has no memory effects.
        unsafe { libc::kill(watchdog as i32, libc::SIGKILL) };
        let mut child = a.child.take().unwrap();
        signal(&child, libc::SIGKILL);
        let _ = child.wait();
        assert!(reap(watchdog), "the watchdog did not die");
        let dir = Path::new("/run/interpose/blk").join(pid.to_string());
        assert!(a.loop_attached(), "the loop device went with SIGKILL");
        assert!(mounted_at(&dir), "no dead mount at {}", dir.display());
        dir
    };
    let assert_gone = |a: &Attach, dir: &Path, by: &str| {
        assert!(
            within_10s(|| !a.loop_attached()),
            "{by} left the loop device"
        );
        assert!(
            !mounted_at(dir) && !dir.exists(),
            "{by} left {}",
            dir.display()
        );
    };
    // Removed by detach of the device.
    let mut a = Attach::start(s(&raw));
    let dir = leftovers(&mut a);
    run(Command::new(bin()).args(["blk", "detach"]).arg(&a.device));
    assert_gone(&a, &dir, "detach");
    // Removed by the next attach (which may take the same loop device again).
    let mut a = Attach::start(s(&raw));
    let dir = leftovers(&mut a);
    let b = Attach::start(s(&raw));
    assert_gone(&a, &dir, "the next attach");
    drop(b);
    // A loop device that names a live process that is no attach (a pid reused).
    let mut stranger = Command::new("sleep").arg("300").spawn().unwrap();
    let dir = Path::new("/run/interpose/blk").join(stranger.id().to_string());
    fs::create_dir_all(&dir).unwrap();
    fs::copy(&raw, dir.join("disk")).unwrap();
    let dev = run(Command::new("losetup")
        .args(["--find", "--show", "--read-only"])
        .arg(dir.join("disk")));
    let dev = dev.trim();
    let out = output(Command::new(bin()).args(["blk", "detach", dev]));
    let alive = stranger.try_wait().unwrap().is_none();
    let _ = stranger.kill();
    let _ = stranger.wait();
    let _ = Command::new("losetup").args(["-d", dev]).status();
    let _ = fs::remove_dir_all(&dir);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        alive,
        "blk detach killed a process that only had a dead attach's pid"
    );
}

/// SIGHUP (a closed terminal) ends an attach as SIGTERM does, device removed (it used to
/// kill it, leaving the device and the mount); a directory is no source.
#[test]
fn sighup_detaches_and_a_directory_is_refused() {
    let _serial = one_at_a_time();
    let t = plain_dir("interpose-test-blkhup-");
    let raw = t.path().join("zeros.raw");
    fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    Attach::start(s(&raw)).ends_cleanly_on(libc::SIGHUP, "SIGHUP");
    let out = output(Command::new(bin()).args(["blk", "attach"]).arg(t.path()));
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("a directory"),
        "{}",
        describe(&out)
    );
}

/// `fs unmount` of the mount that serves an attached device's file is refused and names
/// the device to detach: unmounted (`--lazy` got that far), the device read nothing and was
/// no longer known as interpose's, so neither `blk detach` nor the attach could remove it.
#[test]
fn fs_unmount_of_an_attach_mount_points_to_blk_detach() {
    let _serial = one_at_a_time();
    let t = plain_dir("interpose-test-blkfsunmount-");
    let raw = t.path().join("data.raw");
    let data = random_bytes(1 << 20, 31);
    fs::write(&raw, &data).unwrap();
    let mut a = Attach::start(s(&raw));
    let dir = Path::new("/run/interpose/blk").join(a.pid.to_string());
    for lazy in [false, true] {
        let mut cmd = Command::new(bin());
        cmd.args(["fs", "unmount"]).arg(&dir);
        if lazy {
            cmd.arg("--lazy");
        }
        let out = output(&mut cmd);
        let err = String::from_utf8_lossy(&out.stderr);
        let want = format!("interpose blk detach {}", a.device.display());
        assert!(
            !out.status.success() && err.contains(&want),
            "lazy {lazy}: {}",
            describe(&out)
        );
    }
    assert!(mounted_at(&dir), "the attach's mount went");
    let mut buf = vec![0u8; 4096];
    fs::File::open(&a.device)
        .unwrap()
        .read_exact_at(&mut buf, 8192)
        .unwrap();
    assert!(buf == data[8192..8192 + 4096], "the device reads wrong");
    a.ends_cleanly_on(libc::SIGTERM, "SIGTERM");

    // A filter mount whose BACKING was given as a relative `interpose-blk` has that source
    // too: it is no attach's, and unmounts.
    fs::create_dir(t.path().join("interpose-blk")).unwrap();
    let mnt = t.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let dir_arg = s(t.path());
    let m = Mount::start_with_prefix(
        &["env", "-C", dir_arg],
        Path::new("interpose-blk"),
        &mnt,
        &[],
    );
    let out = output(Command::new(bin()).args(["fs", "unmount"]).arg(&mnt));
    assert!(out.status.success(), "{}", describe(&out));
    let status = m.wait_exit(Duration::from_secs(20));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

/// An attach asked to end while its device is held (opened, mounted) serves until it is
/// let go; a second signal stops it at once (it used to be ignored), and its watchdog
/// removes what it leaves (the device once let go).
#[test]
fn a_second_signal_stops_an_attach_whose_device_is_held() {
    let _serial = one_at_a_time();
    let t = plain_dir("interpose-test-blkheld-");
    let raw = t.path().join("zeros.raw");
    fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    adopt_orphans();
    let mut a = Attach::start(s(&raw));
    let watchdog = watchdog_of(a.pid);
    let holder = fs::File::open(&a.device).unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let stderr = a.child.as_mut().unwrap().stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    signal(a.child.as_ref().unwrap(), libc::SIGTERM);
    // Two signals close together are one to a process that has not yet taken the first:
    // the second goes once the attach says it took the first.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains("signal 15: detaching") => break,
            Ok(_) => {}
            Err(e) => panic!("no word of the first SIGTERM from the attach ({e})"),
        }
    }
    let mut child = a.child.take().unwrap();
    assert!(
        wait_timeout(&mut child, Duration::from_millis(500)).is_none(),
        "the attach ended while its device was held"
    );
    signal(&child, libc::SIGTERM);
    let status = wait_timeout(&mut child, Duration::from_secs(20));
    drop(holder);
    let status = status.expect("the attach did not stop on a second SIGTERM");
    assert!(
        !status.success(),
        "{status}: a forced stop is not a clean exit"
    );
    assert!(reap(watchdog), "the watchdog did not end");
    let dir = Path::new("/run/interpose/blk").join(a.pid.to_string());
    assert!(
        !mounted_at(&dir) && !dir.exists(),
        "the watchdog left {}",
        dir.display()
    );
    assert!(
        within_10s(|| !a.loop_attached()),
        "the loop device stayed once let go"
    );
}
