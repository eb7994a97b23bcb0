//! The few system calls the server needs beyond std, through rustix (and libc for
//! malloc_trim); the unsafe blocks borrow or take a descriptor, or trim the allocator.

use std::io;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};

use rustix::event::{poll, PollFd, PollFlags};
use rustix::net::{sockopt, AddressFamily};

use crate::server::Listener;

/// Waits until one of `fds` is readable, or `timeout` has passed; which ones are.
pub fn poll_readable(
    fds: &[BorrowedFd],
    timeout: Option<std::time::Duration>,
) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<PollFd> = fds
        .iter()
        .map(|fd| PollFd::new(fd, PollFlags::IN))
        .collect();
    let timeout = timeout.map(|t| rustix::event::Timespec {
        tv_sec: t.as_secs() as i64,
        tv_nsec: t.subsec_nanos() as i64,
    });
    loop {
        match poll(&mut pfds, timeout.as_ref()) {
            Ok(_) => break,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(pfds.iter().map(|p| !p.revents().is_empty()).collect())
}

/// Gives the allocator's free memory back to the system: a connection's large reply
/// buffers, once freed, would otherwise stay in its threads' arenas.
pub fn return_free_memory() {
    // SAFETY: malloc_trim only rearranges the allocator's free lists; no pointer we hold
    // is affected.
    unsafe { libc::malloc_trim(0) };
}

/// The pid of the process at the other end of a Unix socket.
pub fn peer_pid(fd: RawFd) -> Option<i32> {
    // SAFETY: `fd` belongs to a socket the caller holds open for this call's duration.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    sockopt::socket_peercred(fd)
        .ok()
        .map(|c| c.pid.as_raw_nonzero().get())
}

/// A listening socket systemd passed as descriptor `fd`.
pub fn listener_from_fd(fd: RawFd) -> io::Result<Listener> {
    // SAFETY: systemd's LISTEN_FDS protocol hands descriptors 3.. to this process, and
    // the caller takes each exactly once (the variables are removed afterwards).
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    if !sockopt::socket_acceptconn(&owned)? {
        return Err(io::Error::other(format!(
            "descriptor {fd} from systemd is not a listening socket"
        )));
    }
    Ok(match sockopt::socket_domain(&owned)? {
        AddressFamily::UNIX => Listener::Unix(owned.into()),
        AddressFamily::INET | AddressFamily::INET6 => Listener::Tcp(owned.into()),
        other => {
            return Err(io::Error::other(format!(
                "descriptor {fd} from systemd has address family {other:?}"
            )))
        }
    })
}
