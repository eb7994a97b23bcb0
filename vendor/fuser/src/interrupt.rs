//! interpose: FUSE_INTERRUPT.
//!
//! When a program waiting for the answer to a request gets a signal, the kernel sends an
//! INTERRUPT naming the request, then waits on (uninterruptibly once the request has
//! reached the daemon) until the request is answered. Answering an INTERRUPT with ENOSYS,
//! as fuser did, makes the kernel send no more of them; a program waiting on a request the
//! daemon holds (one waiting for room in a full audit log, say) could then not be killed,
//! even by SIGKILL, until the daemon answered.
//!
//! Here interrupts are remembered, and a file system asks [`was_interrupted`] where it
//! waits on something that may take long, answering the request sooner. INTERRUPTs are
//! not answered: the kernel needs no answer, and EAGAIN (asking it to send the INTERRUPT
//! again) would spin between the kernel and the daemon for requests answered from
//! another thread.
//!
//! The ids of the last [`REMEMBERED`] interrupted requests are kept, for all sessions of
//! the process. A request is asked about while it waits, so only a burst of more
//! interrupts than that between two questions loses one (the program then waits as
//! before, until the next signal or the answer). Ids are counted per connection, so with
//! two mounts in one process a request can be taken for interrupted by another mount's
//! interrupt; a file system should only ever answer such a request sooner, not otherwise.

use parking_lot::Mutex;

use crate::ll::RequestId;

/// How many interrupted request ids are kept.
const REMEMBERED: usize = 256;

struct Ring {
    ids: [u64; REMEMBERED],
    next: usize,
}

static INTERRUPTED: Mutex<Ring> = Mutex::new(Ring {
    ids: [0; REMEMBERED],
    next: 0,
});

/// Notes that the kernel interrupted request `id`.
pub(crate) fn note(id: RequestId) {
    if id.0 == 0 {
        return; // 0 stands for an empty slot
    }
    let mut ring = INTERRUPTED.lock();
    let next = ring.next;
    ring.ids[next] = id.0;
    ring.next = (next + 1) % REMEMBERED;
}

/// Whether the kernel has interrupted request `id` (the program waiting for it got a
/// signal). A file system that waits on something slow for a request may answer it sooner
/// then; it must still answer it, and truthfully: with what the operation did (EINTR if
/// nothing).
pub fn was_interrupted(id: RequestId) -> bool {
    id.0 != 0 && INTERRUPTED.lock().ids.contains(&id.0)
}
