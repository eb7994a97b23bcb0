//! Test harness: runs the real `interpose` binary and mounts the real file system.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_interpose")
}

/// Notes a mount's life in $INTERPOSE_TEST_EVENTS (set by scripts/test.sh), which shows
/// them for any mount left behind: which test made it, by which daemon, what became of it.
pub fn event(what: std::fmt::Arguments) {
    use std::io::Write;
    let Some(path) = std::env::var_os("INTERPOSE_TEST_EVENTS") else {
        return;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let line = format!(
        "{}.{:06} [{}] {what}\n",
        now.as_secs(),
        now.subsec_micros(),
        std::thread::current().name().unwrap_or("?")
    );
    // One write with O_APPEND: lines of concurrent tests do not interleave.
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
    {
        let _ = f.write_all(line.as_bytes());
    }
}

/// Whether `path` is a mount point right now (from /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    mount_at(path).is_some()
}

/// The mount at `path` right now (the last one made there), from /proc/self/mountinfo.
pub fn mount_at(path: &Path) -> Option<interpose_core::mountinfo::Mount> {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    interpose_core::mountinfo::mounts()
        .unwrap()
        .into_iter()
        .rev()
        .find(|m| m.mount_point == path)
}

/// Waits until process `pid` waits for the answer to a FUSE request (its wait channel),
/// failing the test after 30 s.
pub fn await_waiting_on_fuse(pid: u32) {
    let wchan = format!("/proc/{pid}/wchan");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let at = std::fs::read_to_string(&wchan).unwrap_or_default();
        if at == "request_wait_answer" {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "process {pid} not waiting on the mount ({at:?})"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Extra `fs mount` arguments for the transport under test: scripts/test.sh runs the suite
/// over /dev/fuse (the default), then the file system tests once more with
/// `INTERPOSE_TEST_IO_URING=1`, over io_uring (`--io-uring`).
pub fn transport_args() -> &'static [&'static str] {
    if std::env::var_os("INTERPOSE_TEST_IO_URING").is_some() {
        &["--io-uring"]
    } else {
        &[]
    }
}

/// A running `interpose fs mount` over a fresh backing directory.
pub struct Mount {
    child: Option<Child>,
    /// The daemon's readiness line ("mounted ... (...; FUSE over io_uring); ...").
    pub ready: String,
    pub backing: PathBuf,
    pub mnt: PathBuf,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl Mount {
    /// Fresh temporary `backing/` and `mnt/` directories, mounted with `args` appended.
    pub fn new(args: &[&str]) -> Mount {
        Mount::new_with_prefix(&[], args)
    }

    /// Mounts an existing backing directory at an existing mount point.
    pub fn start(backing: &Path, mnt: &Path, args: &[&str]) -> Mount {
        Mount::start_with_prefix(&[], backing, mnt, args)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGTERM, then wait for a clean exit; asserts the mount is gone and exit status 0.
    pub fn stop(mut self) -> String {
        let mut child = self.child.take().unwrap();
        signal(&child, libc::SIGTERM);
        let pid = child.id();
        let status = wait_timeout(&mut child, Duration::from_secs(20))
            .expect("daemon did not exit after SIGTERM");
        let mounted = is_mounted(&self.mnt);
        event(format_args!(
            "stop pid {pid} {}: {status}, mounted afterwards: {mounted}",
            self.mnt.display()
        ));
        let err = stderr_of(&mut child);
        assert!(
            status.success(),
            "daemon exit status {status:?}\nstderr:\n{err}"
        );
        assert!(!mounted, "still mounted after clean exit");
        err
    }

    /// Closes the reading end of the daemon's standard error, as when whoever read its
    /// log has gone away.
    pub fn close_stderr(&mut self) {
        drop(self.child.as_mut().unwrap().stderr.take());
    }

    /// The daemon's standard error from now on, line by line, read on a thread (so that a
    /// test can wait for what the daemon says).
    pub fn stderr_lines(&mut self) -> std::sync::mpsc::Receiver<String> {
        use std::io::BufRead;
        let stderr = self.child.as_mut().unwrap().stderr.take().unwrap();
        let (lines_tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let _ = lines_tx.send(line);
            }
        });
        lines
    }

    /// Sends `sig` to the daemon.
    pub fn signal(&self, sig: i32) {
        signal(self.child.as_ref().unwrap(), sig);
    }

    /// Waits up to `timeout` for the daemon to end by itself; its exit status (None: it
    /// did not end, and was killed).
    pub fn wait_exit(mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take().unwrap();
        wait_or_kill(&mut child, timeout)
    }

    /// [`Mount::wait_exit`] for a daemon whose mount point holds another mount by then:
    /// that one is left alone (not unmounted as a leftover of this daemon's).
    pub fn wait_exit_leaving_the_mount_point(mut self, timeout: Duration) -> Option<ExitStatus> {
        self.mnt = PathBuf::new();
        self.wait_exit(timeout)
    }

    /// SIGKILL the daemon (a crash); the dead mount stays until [`Mount::cleanup_dead`].
    pub fn kill(&mut self) {
        let mut child = self.child.take().unwrap();
        signal(&child, libc::SIGKILL);
        let _ = child.wait();
        event(format_args!(
            "killed pid {} {}",
            child.id(),
            self.mnt.display()
        ));
    }

    /// Unmounts a mount whose daemon is dead, with the real `interpose fs unmount`.
    pub fn cleanup_dead(&self) {
        let status = Command::new(bin())
            .args(["fs", "unmount"])
            .arg(&self.mnt)
            .status()
            .unwrap();
        event(format_args!(
            "unmount of a dead mount {}: {status}",
            self.mnt.display()
        ));
        assert!(
            status.success(),
            "interpose fs unmount failed on a dead mount"
        );
        assert!(!is_mounted(&self.mnt));
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            event(format_args!(
                "dropped while running: pid {} {}",
                child.id(),
                self.mnt.display()
            ));
            signal(&child, libc::SIGTERM);
            if wait_timeout(&mut child, Duration::from_secs(10)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if is_mounted(&self.mnt) {
            event(format_args!(
                "dropped and still mounted, detaching {}",
                self.mnt.display()
            ));
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

pub fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid has no memory effects.
    unsafe { libc::kill(child.id() as i32, sig) };
}

pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// [`wait_timeout`], killing and reaping the child if it has not ended by then.
pub fn wait_or_kill(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let status = wait_timeout(child, timeout);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    status
}

/// The seed in environment variable `var`, or one from the clock (tests print it, so a
/// failure can be repeated).
pub fn seed_from_env(var: &str) -> u64 {
    match std::env::var(var) {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("{var} must be a number")),
        Err(_) => {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                % 1_000_000_007
        }
    }
}

/// Where test directories go: $INTERPOSE_TEST_DIR or the system temp dir.
pub fn test_root() -> PathBuf {
    std::env::var_os("INTERPOSE_TEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}

/// Runs `interpose fs mount BACKING MNT ARGS...`, which must refuse; its stderr.
/// A mount that is accepted after all is unmounted again before the test fails.
pub fn mount_refused(backing: &Path, mnt: &Path, args: &[&str]) -> String {
    let mounted_before = is_mounted(mnt);
    let mut child = Command::new(bin())
        .args(["fs", "mount"])
        .arg(backing)
        .arg(mnt)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A refusal comes before the mount; an accepted mount serves until told to stop.
    let status = wait_timeout(&mut child, Duration::from_secs(20));
    if status.is_none() {
        signal(&child, libc::SIGTERM);
        if wait_timeout(&mut child, Duration::from_secs(20)).is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    let err = stderr_of(&mut child);
    assert!(
        status.is_some_and(|s| !s.success()),
        "fs mount {args:?} accepted ({status:?}): {err}"
    );
    assert_eq!(
        is_mounted(mnt),
        mounted_before,
        "{}: a refused mount changed what is mounted there",
        mnt.display()
    );
    err
}

/// Runs `cmd`, reads the first line of its output and closes the pipe (as `| head -1`
/// does); then its exit status and standard error.
pub fn first_line_then_close(cmd: &mut Command) -> (String, ExitStatus, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let status = wait_timeout(&mut child, Duration::from_secs(20))
        .unwrap_or_else(|| panic!("{cmd:?} did not end after its reader went away"));
    (first, status, stderr_of(&mut child))
}

/// The rest of a child's standard error (empty if it was not piped or was taken).
pub fn stderr_of(child: &mut Child) -> String {
    let mut err = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        let _ = stderr.read_to_string(&mut err);
    }
    err
}

pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Mount {
    /// Like [`Mount::new`], but runs the daemon as `PREFIX... interpose fs mount ...`, e.g.
    /// with `prlimit --nofile=256:256 --`. The prefix must exec the binary in its own
    /// process, so that [`Mount::pid`] is the daemon's pid.
    pub fn new_with_prefix(prefix: &[&str], args: &[&str]) -> Mount {
        let tmp = tempfile::Builder::new()
            .prefix("interpose-test-")
            .tempdir_in(test_root())
            .unwrap();
        let backing = tmp.path().join("backing");
        let mnt = tmp.path().join("mnt");
        std::fs::create_dir(&backing).unwrap();
        std::fs::create_dir(&mnt).unwrap();
        let mut m = Mount::start_with_prefix(prefix, &backing, &mnt, args);
        m.dir = tmp.path().to_path_buf();
        m._tmp = Some(tmp);
        m
    }

    /// Like [`Mount::start`], with the daemon run under `prefix` (see [`Mount::new_with_prefix`]).
    pub fn start_with_prefix(prefix: &[&str], backing: &Path, mnt: &Path, args: &[&str]) -> Mount {
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        Mount::start_os(prefix, backing, mnt, &args)
    }

    /// [`Mount::start_with_prefix`] with arguments that need not be UTF-8.
    pub fn start_os(
        prefix: &[&str],
        backing: &Path,
        mnt: &Path,
        args: &[&std::ffi::OsStr],
    ) -> Mount {
        let mut command = match prefix.split_first() {
            Some((program, wrapper)) => {
                let mut c = Command::new(program);
                c.args(wrapper).arg(bin());
                c
            }
            None => Command::new(bin()),
        };
        let mut child = command
            .args(["fs", "mount"])
            .arg(backing)
            .arg(mnt)
            .args(transport_args())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start interpose (prefix {prefix:?}): {e}"));
        let stdout = child.stdout.take().unwrap();
        let ready = match BufReader::new(stdout).lines().next() {
            Some(Ok(line)) if line.starts_with("mounted ") => {
                event(format_args!(
                    "mounted pid {} {} {args:?}",
                    child.id(),
                    mnt.display()
                ));
                line
            }
            other => {
                let _ = child.kill();
                let _ = child.wait();
                let mut err = String::new();
                let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                panic!("interpose (under {prefix:?}) did not mount: {other:?}\nstderr:\n{err}");
            }
        };
        assert!(
            is_mounted(mnt),
            "{} not in mountinfo after readiness line",
            mnt.display()
        );
        Mount {
            child: Some(child),
            ready,
            backing: backing.into(),
            mnt: mnt.into(),
            dir: PathBuf::new(),
            _tmp: None,
        }
    }
}

/// How many of the file's pages the kernel holds in its page cache (fincore).
pub fn resident_pages(p: &Path) -> u64 {
    let out = Command::new("fincore")
        .args(["--raw", "--noheadings", "--output", "PAGES"])
        .arg(p)
        .output()
        .expect("fincore");
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("fincore {}: {text:?}", p.display()))
}

/// Held while a test counts on the kernel keeping the dentries it made: dropping them is
/// machine-wide and tests run in parallel, so [`drop_dentries`] waits for it.
pub fn dentries_kept() -> std::fs::File {
    let f =
        std::fs::File::create(std::env::temp_dir().join("interpose-test-dentries.lock")).unwrap();
    rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive).unwrap();
    f
}

/// Makes the kernel drop every unused dentry and inode, which sends the daemon FORGETs and
/// makes later path walks look names up again (not while a test holds [`dentries_kept`]).
pub fn drop_dentries() {
    let _kept = dentries_kept();
    std::fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
}

/// Whether daemon `pid` holds a descriptor whose path `held` picks.
pub fn daemon_holds(pid: u32, held: impl Fn(&Path) -> bool) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .any(|e| std::fs::read_link(e.unwrap().path()).is_ok_and(|t| held(&t)))
}

/// Drops the kernel's unused dentries until daemon `pid` holds no descriptor whose path
/// `held` picks: the kernel has forgotten those objects and the daemon has closed what it
/// held of them. Fails after 20 s, saying `what`.
pub fn drop_dentries_until_released(pid: u32, held: impl Fn(&Path) -> bool, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while daemon_holds(pid, &held) {
        drop_dentries();
        assert!(std::time::Instant::now() < deadline, "{what}");
    }
}

/// A small ext4 file system without a journal on a loop device, unmounted and detached when
/// dropped (declare it before the mounts that use it). Without a journal nothing sends its
/// device a flush but a sync of it (an `fsync`, or a `sync` somewhere on the machine).
pub struct LoopFs {
    pub dir: PathBuf,
    dev: PathBuf,
    _tmp: tempfile::TempDir,
}

impl LoopFs {
    pub fn new(mib: u64) -> LoopFs {
        LoopFs::make(mib, false)
    }

    /// [`LoopFs::new`] with a journal. Without one, ext4 gives an inode number freed in
    /// the last minute to no new object unless it was freed in the same second; with one,
    /// the next object made takes the lowest free number.
    pub fn journaled(mib: u64) -> LoopFs {
        LoopFs::make(mib, true)
    }

    fn make(mib: u64, journal: bool) -> LoopFs {
        let features = if journal {
            "has_journal"
        } else {
            "^has_journal"
        };
        LoopFs::made_by(mib, &["mkfs.ext4", "-q", "-F", "-O", features])
    }

    /// A file system of `mib` MiB made by the command `mkfs` (the image comes last).
    pub fn made_by(mib: u64, mkfs: &[&str]) -> LoopFs {
        let tmp = tempfile::Builder::new()
            .prefix("interpose-test-loop-")
            .tempdir_in(test_root())
            .unwrap();
        let image = tmp.path().join("fs.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(mib << 20)
            .unwrap();
        run(Command::new(mkfs[0]).args(&mkfs[1..]).arg(&image));
        let dev = PathBuf::from(
            run(Command::new("losetup")
                .args(["--find", "--show"])
                .arg(&image))
            .trim(),
        );
        let dir = tmp.path().join("fs");
        std::fs::create_dir(&dir).unwrap();
        let fs = LoopFs {
            dir,
            dev,
            _tmp: tmp,
        };
        run(Command::new("mount").arg(&fs.dev).arg(&fs.dir));
        fs
    }

    /// Flush requests the device has completed (field 16 of /sys/block/loopN/stat).
    pub fn flushes(&self) -> u64 {
        self.stat(15)
    }

    /// Bytes written to the device (field 7 of /sys/block/loopN/stat, in 512-byte sectors).
    pub fn bytes_written(&self) -> u64 {
        self.stat(6) * 512
    }

    fn stat(&self, field: usize) -> u64 {
        let name = self.dev.file_name().unwrap().to_str().unwrap();
        let stat = std::fs::read_to_string(format!("/sys/block/{name}/stat")).unwrap();
        stat.split_whitespace()
            .nth(field)
            .unwrap_or_else(|| panic!("no field {field} in {stat:?}"))
            .parse()
            .unwrap()
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if is_mounted(&self.dir) {
            let _ = Command::new("umount").arg(&self.dir).status();
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// Runs `sync` and asserts that the device under `fs` saw a flush meanwhile. `dirty` runs
/// first, outside the count: it leaves something unsynced (a daemon with nothing to sync
/// may skip the sync).
pub fn assert_flushes(fs: &LoopFs, label: &str, dirty: impl FnOnce(), sync: impl FnOnce()) {
    dirty();
    let before = fs.flushes();
    sync();
    let after = fs.flushes();
    assert!(
        after > before,
        "{label}: returned without a flush of the device ({before} flushes before, {after} after)"
    );
}

/// Writes to `path` through a write-only open (which the daemon serves around the page
/// cache) in each way a program asks for a synchronous write, and asserts that the device
/// under `fs` saw a flush before each write returned: per write with `RWF_DSYNC` and
/// `RWF_SYNC`, and through opens with `O_DSYNC` and `O_SYNC`.
pub fn assert_synchronous_writes_flush(fs: &LoopFs, path: &Path) {
    use rustix::io::ReadWriteFlags;
    use std::os::fd::AsFd;
    use std::os::unix::fs::OpenOptionsExt;
    let block = [7u8; 4096];
    let ways: [(&str, i32, ReadWriteFlags); 4] = [
        ("pwritev2 RWF_DSYNC", 0, ReadWriteFlags::DSYNC),
        ("pwritev2 RWF_SYNC", 0, ReadWriteFlags::SYNC),
        ("an O_DSYNC open", libc::O_DSYNC, ReadWriteFlags::empty()),
        ("an O_SYNC open", libc::O_SYNC, ReadWriteFlags::empty()),
    ];
    for (i, (way, custom, flags)) in ways.into_iter().enumerate() {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(custom)
            .open(path)
            .unwrap();
        assert_flushes(
            fs,
            &format!("a write through {way}"),
            // Something unsynced first, so that the sync has something to write.
            || {
                rustix::io::pwrite(f.as_fd(), &block, 0).unwrap();
            },
            || {
                let at = 4096 * (i as u64 + 1);
                let n =
                    rustix::io::pwritev2(f.as_fd(), &[std::io::IoSlice::new(&block)], at, flags)
                        .unwrap();
                assert_eq!(n, block.len());
            },
        );
    }
}

/// Kills and reaps child processes when dropped, so that a failing test leaves none
/// behind (and none holding files open on a mount that is being torn down).
#[derive(Default)]
pub struct Reaper(pub Vec<Child>);

impl Reaper {
    pub fn add(&mut self, child: Child) -> usize {
        self.0.push(child);
        self.0.len() - 1
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for child in &mut self.0 {
            // No-ops for children already reaped: std never signals a reaped pid.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs a command when dropped (also when the test fails): the undoing of a change the
/// test made outside its mount (a bind mount, a file flag) that would keep its directory.
pub struct Undo(pub &'static str, pub &'static str, pub PathBuf);

impl Drop for Undo {
    fn drop(&mut self) {
        let _ = Command::new(self.0).arg(self.1).arg(&self.2).status();
    }
}

/// `interpose isolation SUB STORE EXTRA...`, which must succeed; its stdout.
pub fn iso(sub: &str, store: &Path, extra: &[&str]) -> String {
    run(Command::new(bin())
        .args(["isolation", sub])
        .arg(store)
        .args(extra))
}

/// A tmpfs of `mib` MiB mounted on the existing directory `dir` (inside a test's BACKING,
/// say), unmounted when dropped.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, mib: u64) -> Tmpfs {
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "none"])
            .arg(dir));
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
