//! Whether the daemon of a mount is still running. A daemon holds a lock on
//! `RUN_DIR/MAJOR:MINOR` (its mount's device number) until it exits, so that
//! `interpose fs unmount` can wait until the daemon is done: its audit log written, an
//! isolation store's lock released. A command run right after the unmount (a remount of
//! the same store, a commit, reading the log) then finds the daemon gone. The unmount
//! itself returns as soon as the kernel has let go of the mount, before the daemon has
//! noticed.
//!
//! The files are lock objects only, never removed: a device number names one live mount
//! at a time, and its next mount takes the same file.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::{flock, FlockOperation};

pub const RUN_DIR: &str = "/run/interpose/fs";

fn lock_path(dev: &str) -> PathBuf {
    Path::new(RUN_DIR).join(dev)
}

/// Marks this process as the daemon of the mount with device number `dev` ("0:43", as
/// mountinfo gives it) until it exits: the lock's descriptor is never closed. Where that
/// cannot be done (no right to write under [`RUN_DIR`]), the unmount will not wait; says
/// why at debug level.
pub fn hold(dev: &str) {
    let p = lock_path(dev);
    let taken = std::fs::create_dir_all(RUN_DIR)
        .and_then(|()| {
            use std::os::unix::fs::OpenOptionsExt;
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(&p)
        })
        .and_then(|mut f| {
            // Readable by the daemon's user only: anyone who can open a lock file can
            // flock it (a read-only descriptor does), and would hold up this mount's
            // start and its unmounts. (Files made before were 0644.)
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            // The device number is reused as soon as the old mount is gone, which may be
            // before its daemon has exited: wait for that one a while.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match flock(&f, FlockOperation::NonBlockingLockExclusive) {
                    Ok(()) => break,
                    Err(rustix::io::Errno::WOULDBLOCK) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            f.set_len(0)?;
            write!(f, "{}", std::process::id())?;
            // A high descriptor: closed at exit after the others (an isolation store's
            // lock among them), which is when a waiter goes on.
            Ok(rustix::io::fcntl_dupfd_cloexec(&f, 4096)
                .map(File::from)
                .unwrap_or(f))
        });
    match taken {
        // Released by the kernel when the process ends.
        Ok(f) => std::mem::forget(f),
        Err(e) => tracing::debug!(
            "{}: {e}; an unmount will not wait for this daemon",
            p.display()
        ),
    }
}

/// Waits up to `timeout` for the daemon of the mount that had device number `dev` to
/// exit. `Err(pid)`: it is still running (its pid, if known). A mount no daemon marked
/// (see [`hold`]) counts as done.
pub fn wait_gone(dev: &str, timeout: Duration) -> Result<(), Option<u32>> {
    let Ok(mut f) = File::open(lock_path(dev)) else {
        return Ok(());
    };
    let deadline = Instant::now() + timeout;
    loop {
        match flock(&f, FlockOperation::NonBlockingLockShared) {
            Ok(()) => return Ok(()),
            Err(rustix::io::Errno::WOULDBLOCK) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let mut pid = String::new();
                let _ = f.read_to_string(&mut pid);
                return Err(pid.trim().parse().ok());
            }
            // Not a lock we can wait on: nothing to wait for.
            Err(_) => return Ok(()),
        }
    }
}
