//! interpose's file-system layer: a FUSE stackable file system that shows a backing
//! directory and passes every operation through a chain of [`filter::Filter`]s.
//!
//! ```no_run
//! use interpose_fs::{filter::Chain, filters, mount, MountConfig, Options};
//! let chain = Chain::new(vec![filters::parse_spec("audit=/tmp/audit.jsonl").unwrap()]);
//! let mounted = mount(MountConfig {
//!     backing: "/srv/data".into(),
//!     mountpoint: "/mnt/view".into(),
//!     chain: chain.into(),
//!     options: Options::default(),
//! }).unwrap();
//! // ... later, from any thread:
//! mounted.unmounter().unmount().unwrap();
//! mounted.join().unwrap();
//! ```
//!
//! Files that no filter needs to see the data of are opened with the kernel's FUSE
//! passthrough: their reads, writes and mmaps never enter the daemon.

pub mod filter;
pub mod filters;
mod fs;
mod inode;
mod pool;
pub mod reply;
pub mod running;
mod sys;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::Mutex;

pub use fs::{served_directly, served_open_flags, write_must_sync, FilterFs, Options};
pub use inode::DeviceNumbers;
pub use sys::return_free_memory;

/// What to mount where.
pub struct MountConfig {
    pub backing: PathBuf,
    pub mountpoint: PathBuf,
    /// Shared, so the caller can still close the filters (flush an audit log) when it
    /// stops without an unmount.
    pub chain: std::sync::Arc<filter::Chain>,
    pub options: Options,
}

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("backing directory {path}: {source}")]
    Backing { path: PathBuf, source: io::Error },
    #[error("mount point {path}: {source}")]
    Mountpoint { path: PathBuf, source: io::Error },
    #[error("cannot mount at {path}: {source}")]
    Mount { path: PathBuf, source: io::Error },
    /// This user may not open /dev/fuse (on some machines it is root's only).
    #[error("cannot open /dev/fuse: {0}; this user may not use FUSE here (root may, or make /dev/fuse mode 666 as most distributions do)")]
    DevFuse(io::Error),
    #[error("cannot start the FUSE session thread: {0}")]
    Thread(io::Error),
}

/// How a mount talks to the kernel; the same for all of interpose's file systems.
#[derive(Clone, Copy, Debug)]
pub struct Serving {
    /// Threads reading requests from /dev/fuse (see [`crate::pool`] for why 4).
    pub threads: usize,
    /// Let users other than the mounting one use the mount (permission checks still apply).
    pub allow_other: bool,
    /// Also serve requests over io_uring where the kernel offers it (Linux 6.14+ with
    /// `/sys/module/fuse/parameters/enable_uring` on): a request is served on the CPU that
    /// made it, by a thread pinned there, instead of waking a thread on another CPU. Off by
    /// default: on a 2-CPU VM metadata-heavy work ran 1.5x faster, fsync-heavy work 20%
    /// slower (bench/RESULTS.md).
    pub io_uring: bool,
}

/// Where the kernel's fuse module says whether it offers FUSE over io_uring.
pub const IO_URING_SWITCH: &str = "/sys/module/fuse/parameters/enable_uring";

/// A live mount; the session runs on its own thread until unmounted.
pub struct Mounted {
    unmounter: Arc<Mutex<fuser::SessionUnmounter>>,
    session: JoinHandle<io::Result<()>>,
    notifier: fuser::Notifier,
    pub mountpoint: PathBuf,
    /// Requests are served over io_uring (the kernel took it at the handshake).
    pub io_uring: bool,
}

/// Unmounts a mount from any thread.
#[derive(Clone)]
pub struct Unmounter(Arc<Mutex<fuser::SessionUnmounter>>);

impl Unmounter {
    /// Unmounts; fails with EBUSY while files on the mount are in use.
    pub fn unmount(&mut self) -> io::Result<()> {
        self.0.lock().unmount()
    }
}

impl Mounted {
    pub fn unmounter(&self) -> Unmounter {
        Unmounter(self.unmounter.clone())
    }

    /// Tells the kernel to drop cached names, attributes or data.
    pub fn notifier(&self) -> fuser::Notifier {
        self.notifier.clone()
    }

    /// Waits until the file system is unmounted (by us or by anyone else). If the session
    /// ended any other way (an error, a panic), the mount is detached before returning, so
    /// that no dead mount outlives the daemon.
    pub fn join(self) -> io::Result<()> {
        let res = match self.session.join() {
            Ok(res) => res,
            Err(_) => Err(io::Error::other("FUSE session thread panicked")),
        };
        if res.is_err() {
            detach(&self.unmounter, &self.mountpoint);
        }
        res
    }

    /// Unmounts (lazily if busy) and waits for the session to end: for giving up on a
    /// mount that was made but cannot be used.
    pub fn abandon(self) {
        detach(&self.unmounter, &self.mountpoint);
        let _ = self.session.join();
    }
}

fn detach(unmounter: &Mutex<fuser::SessionUnmounter>, mountpoint: &std::path::Path) {
    if let Err(e) = unmounter.lock().unmount() {
        tracing::warn!("unmounting {}: {e}; detaching it", mountpoint.display());
        let _ = rustix::mount::unmount(mountpoint, rustix::mount::UnmountFlags::DETACH);
    }
}

/// Mounts the file system; returns once the mount exists (requests made from then on are
/// served, queued in the kernel until the session thread picks them up).
pub fn mount(config: MountConfig) -> Result<Mounted, MountError> {
    let MountConfig {
        backing,
        mountpoint,
        chain,
        options,
    } = config;
    let meta = std::fs::metadata(&backing).map_err(|source| MountError::Backing {
        path: backing.clone(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(MountError::Backing {
            path: backing,
            source: io::Error::from_raw_os_error(libc::ENOTDIR),
        });
    }
    let mp_meta = std::fs::metadata(&mountpoint).map_err(|source| MountError::Mountpoint {
        path: mountpoint.clone(),
        source,
    })?;
    if !mp_meta.is_dir() {
        return Err(MountError::Mountpoint {
            path: mountpoint,
            source: io::Error::from_raw_os_error(libc::ENOTDIR),
        });
    }
    let serving = options.serving();
    let fs = FilterFs::new(&backing, chain, options).map_err(|source| MountError::Backing {
        path: backing.clone(),
        source,
    })?;
    let notifier = fs.notifier_slot();
    let mounted = mount_filesystem(fs, &backing, &mountpoint, serving)?;
    let _ = notifier.set(mounted.notifier());
    Ok(mounted)
}

/// Mounts any of interpose's file systems (the filter file system, the isolated view) at
/// `mountpoint` with the options they share: named after `backing`, kernel permission
/// checks, request threads each with its own /dev/fuse clone, io_uring where offered.
pub fn mount_filesystem<F: fuser::Filesystem + Send + Sync + 'static>(
    fs: F,
    backing: &std::path::Path,
    mountpoint: &std::path::Path,
    serving: Serving,
) -> Result<Mounted, MountError> {
    let mountpoint = mountpoint.to_path_buf();
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        fuser::MountOption::FSName(backing.to_string_lossy().into_owned()),
        fuser::MountOption::Subtype("interpose".into()),
        fuser::MountOption::DefaultPermissions,
    ];
    if serving.allow_other {
        cfg.acl = fuser::SessionACL::All;
    }
    cfg.n_threads = Some(serving.threads.max(1));
    cfg.clone_fd = true;
    if serving.io_uring {
        cfg.io_uring = Some(fuser::UringConfig::default());
    }
    let mut session =
        fuser::Session::new(fs, &mountpoint, &cfg).map_err(|source| match source.kind() {
            io::ErrorKind::PermissionDenied => match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/fuse")
            {
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => MountError::DevFuse(e),
                _ => MountError::Mount {
                    path: mountpoint.clone(),
                    source,
                },
            },
            _ => MountError::Mount {
                path: mountpoint.clone(),
                source,
            },
        })?;
    let io_uring = session.io_uring();
    let unmounter = Arc::new(Mutex::new(session.unmount_callable()));
    let notifier = session.notifier();
    // Return once the serving threads are up (so that, with io_uring, requests made from
    // then on take it); if the session ends first, `recv` fails and `join` says why.
    let (serving_tx, serving_rx) = std::sync::mpsc::channel();
    session.on_serving(move || {
        let _ = serving_tx.send(());
    });
    let session = std::thread::Builder::new()
        .name("fuse-session".into())
        .spawn(move || session.run())
        .map_err(MountError::Thread)?;
    let _ = serving_rx.recv();
    Ok(Mounted {
        unmounter,
        session,
        notifier,
        mountpoint,
        io_uring,
    })
}
