//! The watchdog of an attach process: a second process that removes what an attach set
//! up in the kernel (the loop device, the FUSE mount of its file, its directory under
//! [`RUN_DIR`](crate::RUN_DIR)) when the attach ends without doing so itself: SIGKILL, a
//! crash, a forced stop on a second signal. Without it a killed attach left a loop device
//! that read EIO until someone ran `interpose blk detach`.
//!
//! The attach holds the writing end of a pipe that is the watchdog's standard input. The
//! kernel closes it however the attach ends; a clean end writes [`DONE`] first, and the
//! watchdog then leaves everything as it is. The watchdog is in a process group of its
//! own, so that Ctrl-C in a terminal, meant for the attach, does not end it first.
//!
//! A loop device still open or mounted when the watchdog runs is detached the way
//! `losetup -d` detaches a busy device: the kernel marks it to go when its last user lets
//! go (autoclear), and until then its reads fail with EIO.
//!
//! A watchdog that outlives its attach is an orphan, reaped by init; where init does not
//! reap orphans (some containers), it stays a zombie, which holds nothing.

use std::io::{self, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};

/// What an attach that cleaned up itself writes before it closes the pipe.
pub const DONE: &[u8] = b"done\n";

/// The attach's side: a running watchdog. Dropping it says [`DONE`] and waits for the
/// watchdog to end (a destructor runs only on a clean path, after [`crate::Attached`]'s
/// own has undone the attach).
pub struct Watchdog {
    pipe: Option<ChildStdin>,
    child: Child,
}

impl Watchdog {
    /// Starts `command` (this program, with the arguments that make it call [`watch`])
    /// as the watchdog: its standard input the pipe, its output discarded, its errors
    /// where ours go, its working directory `/` (so that it holds no mount busy).
    pub fn spawn(mut command: Command) -> io::Result<Watchdog> {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .current_dir("/")
            .process_group(0)
            .spawn()?;
        Ok(Watchdog {
            pipe: child.stdin.take(),
            child,
        })
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(mut pipe) = self.pipe.take() {
            let _ = pipe.write_all(DONE);
        }
        let _ = self.child.wait();
    }
}

/// The watchdog's side: waits until the attach that started it ends (`input`, the pipe,
/// reaches its end); unless it said [`DONE`], removes what it left in `dir`. Returns
/// whether it had to.
pub fn watch(dir: &Path, mut input: impl Read) -> bool {
    let mut said = Vec::new();
    // An error reading is the same as the end: the attach is gone either way.
    let _ = input.by_ref().take(64).read_to_end(&mut said);
    let _ = io::copy(&mut input, &mut io::sink());
    if said == DONE {
        return false;
    }
    crate::remove_leftovers(dir);
    true
}
