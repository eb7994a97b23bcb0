//! A read-only kernel block device served by this process, on a kernel without the nbd
//! or ublk modules: the block source appears as the one file `disk` of a small FUSE
//! file system, and a read-only loop device is attached to that file. Reads of the
//! device become FUSE reads of exactly the requested ranges (the file is opened with
//! direct I/O, so no page cache rounds them up), answered from the source; a read that
//! touches a bad sector fails with EIO, and only such reads do.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen,
};
use interpose_image::BlockSource;

pub mod watchdog;

/// Where attached devices keep their FUSE mount: `RUN_DIR/<pid>/disk`.
pub const RUN_DIR: &str = "/run/interpose/blk";

/// The directory of the attach process `pid`: its FUSE mount, whose one file the loop
/// device reads.
pub fn run_dir(pid: u32) -> PathBuf {
    Path::new(RUN_DIR).join(pid.to_string())
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// What was being done; the I/O error is the source (printed after it by anyhow).
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("mounting the device file: {0}")]
    Mount(#[from] interpose_fs::MountError),
    #[error("{0}")]
    Losetup(String),
    #[error("{0} is not a device attached by interpose")]
    NotOurs(PathBuf),
    #[error("{0} is in use (mounted?); unmount it first")]
    Busy(PathBuf),
    #[error(
        "{} is still open by another program: it goes, and its attach process {pid} ends, once \
         that program closes it",
        device.display()
    )]
    StillOpen { device: PathBuf, pid: u32 },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

const ROOT: u64 = 1;
const DISK: u64 = 2;
const TTL: Duration = Duration::from_secs(3600);

/// The FUSE side: a directory holding one read-only file, `disk`.
struct DiskFs {
    source: Arc<dyn BlockSource>,
}

impl DiskFs {
    fn attr(&self, ino: u64) -> FileAttr {
        let (kind, perm, size, nlink) = if ino == ROOT {
            (FileType::Directory, 0o500, 0, 2)
        } else {
            (FileType::RegularFile, 0o400, self.source.size(), 1)
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

impl Filesystem for DiskFs {
    fn lookup(&self, _req: &fuser::Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 == ROOT && name == "disk" {
            reply.entry(&TTL, &self.attr(DISK), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(
        &self,
        _req: &fuser::Request,
        ino: INodeNo,
        _fh: Option<FileHandle>,
        reply: ReplyAttr,
    ) {
        match ino.0 {
            ROOT | DISK => reply.attr(&TTL, &self.attr(ino.0)),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn open(
        &self,
        _req: &fuser::Request,
        ino: INodeNo,
        flags: OpenFlags,
        _kill_suidgid: bool,
        reply: ReplyOpen,
    ) {
        if ino.0 != DISK {
            return reply.error(Errno::EISDIR);
        }
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        // Direct I/O: every read reaches us with its own offset and length, so a bad
        // sector fails only the reads that touch it.
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &fuser::Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino.0 != DISK {
            return reply.error(Errno::EISDIR);
        }
        let end = (offset.saturating_add(size as u64)).min(self.source.size());
        if offset >= end {
            return reply.data(&[]);
        }
        let mut buf = vec![0u8; (end - offset) as usize];
        match self.source.read_at(&mut buf, offset) {
            Ok(o) if o.is_clean() => reply.data(&buf),
            Ok(o) => {
                tracing::debug!(
                    "read of {} bytes at {offset} touches {} bad extents: EIO",
                    buf.len(),
                    o.bad.len()
                );
                reply.error(Errno::EIO)
            }
            Err(e) => {
                tracing::warn!("read of {} bytes at {offset}: {e}", buf.len());
                reply.error(Errno::EIO)
            }
        }
    }

    fn readdir(
        &self,
        _req: &fuser::Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
            (DISK, FileType::RegularFile, "disk"),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// An attached device: the FUSE mount and the loop device over its file. Dropping it
/// detaches the loop device and unmounts.
pub struct Attached {
    pub device: PathBuf,
    dir: PathBuf,
    mounted: Option<interpose_fs::Mounted>,
}

impl Attached {
    /// Serves `source` as a read-only loop device.
    pub fn attach(source: Arc<dyn BlockSource>) -> Result<Attached, Error> {
        sweep_dead();
        let dir = run_dir(std::process::id());
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        let mounted = interpose_fs::mount_filesystem(
            DiskFs { source },
            Path::new("interpose-blk"),
            &dir,
            interpose_fs::Serving {
                threads: 2,
                allow_other: false,
                io_uring: false,
            },
        )?;
        let mut a = Attached {
            device: PathBuf::new(),
            dir,
            mounted: Some(mounted),
        };
        let out = Command::new("losetup")
            .args(["--find", "--show", "--read-only"])
            .arg(a.file())
            .output()
            .map_err(io("running losetup"))?;
        if !out.status.success() {
            return Err(Error::Losetup(format!(
                "losetup: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        a.device = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Ok(a)
    }

    /// The file the loop device reads.
    pub fn file(&self) -> PathBuf {
        self.dir.join("disk")
    }

    /// Whether the loop device is still attached to our file.
    pub fn still_attached(&self) -> bool {
        owner_of(&self.device).ok() == Some(std::process::id())
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if self.still_attached() {
            let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
        }
        if let Some(m) = self.mounted.take() {
            m.abandon();
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The pid of the interpose process serving a loop device (from its backing file,
/// `RUN_DIR/<pid>/disk`).
pub fn owner_of(device: &Path) -> Result<u32, Error> {
    let name = device
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| n.starts_with("loop"))
        .ok_or_else(|| Error::NotOurs(device.to_path_buf()))?;
    let backing = backing_file_of(name).ok_or_else(|| Error::NotOurs(device.to_path_buf()))?;
    let rest = backing
        .to_str()
        .and_then(|b| b.strip_prefix(RUN_DIR))
        .and_then(|r| r.strip_prefix('/'))
        .and_then(|r| r.strip_suffix("/disk"))
        .ok_or_else(|| Error::NotOurs(device.to_path_buf()))?;
    rest.parse()
        .map_err(|_| Error::NotOurs(device.to_path_buf()))
}

/// The loop device reading the file of the attach mount at `dir` (`RUN_DIR/<pid>`), if any.
pub fn device_of(dir: &Path) -> Option<PathBuf> {
    let dir = std::fs::canonicalize(dir).ok()?;
    loop_devices_of(&dir.join("disk")).into_iter().next()
}

/// Whether `pid` is an `interpose blk attach` process, and not another that took the pid
/// of one that died.
fn is_attach_process(pid: u32) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    args.windows(2)
        .any(|w| w[0] == b"blk".as_slice() && w[1] == b"attach".as_slice())
}

/// The file loop device `name` (`loopN`) reads, if it is attached.
fn backing_file_of(name: &str) -> Option<PathBuf> {
    let b = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    Some(PathBuf::from(b.trim_end_matches('\n')))
}

/// Loop devices whose backing file is `file`.
fn loop_devices_of(file: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
        .filter(|e| backing_file_of(&e.file_name().to_string_lossy()).as_deref() == Some(file))
        .map(|e| Path::new("/dev").join(e.file_name()))
        .collect()
}

/// Removes what an attach process that died without cleaning up (SIGKILL) left in
/// `dir` (`RUN_DIR/<pid>`): the loop devices over its file, its dead FUSE mount and
/// the directory. A loop device in use goes once its last user lets go.
fn remove_leftovers(dir: &Path) {
    for dev in loop_devices_of(&dir.join("disk")) {
        tracing::info!("detaching {}, left by a process that ended", dev.display());
        let _ = Command::new("losetup").arg("-d").arg(&dev).status();
    }
    let _ = rustix::mount::unmount(dir, rustix::mount::UnmountFlags::DETACH);
    let _ = std::fs::remove_dir(dir);
}

/// [`remove_leftovers`] for every attach process under [`RUN_DIR`] that is gone.
pub fn sweep_dead() {
    let Ok(entries) = std::fs::read_dir(RUN_DIR) else {
        return;
    };
    for e in entries.flatten() {
        let pid = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok());
        if pid.is_some_and(|pid| !is_attach_process(pid)) {
            remove_leftovers(&e.path());
        }
    }
}

/// Detaches a device made by [`Attached::attach`] in another process: refuses if it is
/// mounted, detaches the loop device, asks the serving process to end and waits up to
/// `wait` until it has (it ends once nothing holds the device open; past `wait`,
/// [`Error::StillOpen`]). If that process is gone (killed), what it left is removed, and
/// no process is signalled (its pid may be another's by now).
pub fn detach(device: &Path, wait: Duration) -> Result<u32, Error> {
    let pid = owner_of(device)?;
    let alive = is_attach_process(pid);
    // O_EXCL on a block device fails with EBUSY while it is mounted or otherwise claimed.
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags_excl()
        .open(device)
    {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            return Err(Error::Busy(device.to_path_buf()))
        }
        Err(e) => return Err(io(format!("opening {}", device.display()))(e)),
        Ok(_) => {}
    }
    let out = Command::new("losetup")
        .arg("-d")
        .arg(device)
        .output()
        .map_err(io("running losetup"))?;
    if !out.status.success() {
        return Err(Error::Losetup(format!(
            "losetup -d: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    if !alive {
        remove_leftovers(&run_dir(pid));
        return Ok(pid);
    }
    if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
        // A pidfd becomes readable when the process ends: wait on that, not on /proc.
        let pidfd = rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty());
        let _ = rustix::process::kill_process(p, rustix::process::Signal::TERM);
        if let Ok(fd) = pidfd {
            let ended = |within: Duration| {
                let mut fds = [rustix::event::PollFd::new(
                    &fd,
                    rustix::event::PollFlags::IN,
                )];
                // (Clamped: a year is forever here, and far from Timespec's limit.)
                let within = within.min(Duration::from_secs(365 * 86_400));
                let timeout = rustix::event::Timespec::try_from(within).unwrap_or_default();
                rustix::event::poll(&mut fds, Some(&timeout)).is_ok_and(|n| n > 0)
            };
            // A moment for the process to end and a short open (udev's probe) to end,
            // whatever `wait` is, then say what is waited for.
            let first = Duration::from_secs(1);
            if !ended(first) {
                tracing::info!(
                    "{} is open by another program; waiting up to {} s for it to be let go",
                    device.display(),
                    wait.as_secs()
                );
                if !ended(wait.saturating_sub(first)) {
                    return Err(Error::StillOpen {
                        device: device.to_path_buf(),
                        pid,
                    });
                }
            }
        }
    }
    Ok(pid)
}

trait ExclExt {
    fn custom_flags_excl(&mut self) -> &mut Self;
}

impl ExclExt for std::fs::OpenOptions {
    fn custom_flags_excl(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::custom_flags(self, libc::O_EXCL)
    }
}
