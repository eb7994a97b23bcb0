//! Large records written behind the request: the data of a change of [`BEHIND_MIN`] bytes
//! or more is copied into a buffer and written to the journal by a thread of its own, so
//! the program's write is answered while the one before it goes to disk.
//!
//! Why: a program's buffered writes reach a FUSE daemon one request at a time, so a
//! sequential writer waits, for every 1 MiB, for the daemon to copy it into the journal's
//! page cache (the most expensive step on the bench VM, where every freshly used page of
//! memory costs a fault on the host). Here the writing thread puts the data on disk with
//! `O_DIRECT` (straight from the buffer: no page cache, no copy), while the request
//! thread takes the next write. Small records (a 4 KiB random write, a rename) are
//! written at once on the request thread as before, when nothing is queued ahead of them;
//! behind a queued record they queue too, as the journal is written strictly in order.
//!
//! What keeps this safe:
//! - Order: one write call at a time, in the order queued, so the file always holds a
//!   prefix of the records plus what one unfinished call wrote: what a SIGKILL leaves is
//!   the torn tail the journal's scan already cuts off. Records that are whole pages back
//!   to back (a sequential writer's, after the first) go out together, as one `O_DIRECT`
//!   `pwritev` with each header in the page before its data: one call per batch rather
//!   than two per record. A batch takes more records while it stays within
//!   [`BATCH_MAX`] bytes (a single larger record goes alone). A record that is not whole
//!   pages (the first of a stream, after the journal's small records): its header with
//!   `pwrite`, then its data.
//! - Readers: a read of journal bytes not written yet waits for them
//!   ([`Flight::wait_written`]); everything else that reads or cuts the file first waits
//!   for the queue to empty ([`Flight::drain`]). A program's fsync drains before it syncs.
//! - Room: the queued records' space is allocated (`fallocate`, keeping the size) before
//!   they are accepted, so a full disk fails the write that does not fit, as before,
//!   instead of a write already answered.
//! - Errors: should a queued write fail anyway (an I/O error), every later append, sync
//!   and read of unwritten bytes fails with it: the mount keeps what was written, and a
//!   remount cuts off what was not (it was never acknowledged by an fsync).
//! - Memory: at most [`QUEUED_MAX`] bytes wait; an append beyond that waits for room.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::journal::write_all_vectored_at;

use parking_lot::{Condvar, Mutex};

/// Changes with at least this much data are written behind (and their data aligned for
/// `O_DIRECT`); smaller ones, a 4 KiB random write say, cost less to write at once than to
/// hand to another thread.
pub const BEHIND_MIN: u64 = 64 << 10;
/// Alignment of a record's data written with `O_DIRECT`, in the file and in memory: the
/// page size, which every file system that takes `O_DIRECT` accepts.
pub const ALIGN: u64 = 4096;
/// Most bytes of data waiting to be written.
const QUEUED_MAX: usize = 32 << 20;
/// Most bytes of records written with one call.
const BATCH_MAX: u64 = 8 << 20;
/// Most bytes of spent buffers kept for reuse (a fresh buffer costs a page fault per page).
const POOL_MAX: usize = 16 << 20;

/// A record to write: `head` (its header, checksum not yet filled in, and its change) at
/// `offset`, then its data, `buf[data_at..data_at + data_len]`, right after the head.
pub struct Job {
    pub offset: u64,
    pub head: Vec<u8>,
    pub buf: Vec<u8>,
    pub data_at: usize,
    pub data_len: usize,
}

impl Job {
    fn end(&self) -> u64 {
        self.offset + (self.head.len() + self.data_len) as u64
    }

    /// Whether head and data together are whole pages of the file, the head fitting in
    /// the room before the data in the buffer: the record can be written with `O_DIRECT`.
    fn whole_pages(&self) -> bool {
        self.offset.is_multiple_of(ALIGN)
            && (self.head.len() as u64).is_multiple_of(ALIGN)
            && (self.data_len as u64).is_multiple_of(ALIGN)
            && self.head.len() <= self.data_at
    }
}

struct State {
    queue: VecDeque<Job>,
    /// A job is being written (taken off the queue).
    writing: bool,
    /// Every record ending at or before this offset is in the file.
    written_end: u64,
    queued_bytes: usize,
    /// The first failure of a queued write (raw OS error): sticky.
    error: Option<i32>,
    pool: Vec<Vec<u8>>,
    pool_bytes: usize,
    /// The journal is going: the writing thread ends once the queue is empty.
    stop: bool,
    /// Tests hold the writing thread to find out who waits for it.
    #[cfg(test)]
    held: bool,
    /// Tests count the writes of records written behind with one call each.
    #[cfg(test)]
    batches: Vec<usize>,
}

/// The queue of a journal's records in flight, shared by the journal, its writing thread,
/// its snapshots and every reader of its data.
pub struct Flight {
    state: Mutex<State>,
    changed: Condvar,
    file: Arc<File>,
    /// The journal opened again with `O_DIRECT` when the writing thread started, or `None`
    /// where the file system refuses it (or refused an aligned write once): then the data
    /// goes through the page cache.
    direct: Mutex<Option<Arc<File>>>,
}

impl Flight {
    pub fn new(file: Arc<File>, end: u64) -> Arc<Flight> {
        Arc::new(Flight {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                writing: false,
                written_end: end,
                queued_bytes: 0,
                error: None,
                pool: Vec::new(),
                pool_bytes: 0,
                stop: false,
                #[cfg(test)]
                held: false,
                #[cfg(test)]
                batches: Vec::new(),
            }),
            changed: Condvar::new(),
            direct: Mutex::new(None),
            file,
        })
    }

    /// Whether nothing is queued or being written: a record can be written at once.
    pub fn idle(&self) -> io::Result<bool> {
        let st = self.state.lock();
        match st.error {
            Some(e) => Err(io::Error::from_raw_os_error(e)),
            None => Ok(st.queue.is_empty() && !st.writing),
        }
    }

    /// Notes that the file now holds every record up to `end` (written at once).
    pub fn written_to(&self, end: u64) {
        let mut st = self.state.lock();
        st.written_end = end;
        self.changed.notify_all();
    }

    /// Notes that the journal was cut at `end` (with nothing queued). Bytes a failed write
    /// left out before `end` stay unwritten: reading them fails, as before the cut.
    pub fn cut_to(&self, end: u64) {
        let mut st = self.state.lock();
        st.written_end = st.written_end.min(end);
        self.changed.notify_all();
    }

    /// A buffer for a job's data of `len` bytes, and where in it the data goes: at an
    /// aligned address with a page of room before it, where the writing thread puts the
    /// record's head so that head and data go out as one aligned write. Waits while the
    /// queue holds [`QUEUED_MAX`] bytes (unless it is empty).
    pub fn buffer(&self, len: usize) -> io::Result<(Vec<u8>, usize)> {
        let mut st = self.state.lock();
        while st.queued_bytes > 0 && st.queued_bytes + len > QUEUED_MAX && st.error.is_none() {
            self.changed.wait(&mut st);
        }
        if let Some(e) = st.error {
            return Err(io::Error::from_raw_os_error(e));
        }
        let want = len + 2 * ALIGN as usize;
        let buf = match st.pool.iter().position(|b| b.len() >= want) {
            Some(i) => {
                let b = st.pool.swap_remove(i);
                st.pool_bytes -= b.len();
                b
            }
            None => {
                drop(st);
                vec![0u8; want]
            }
        };
        let at = buf.as_ptr().align_offset(ALIGN as usize) + ALIGN as usize;
        Ok((buf, at))
    }

    /// Queues `job` (started by the journal with [`spawn`] beforehand).
    pub fn push(&self, job: Job) {
        let mut st = self.state.lock();
        st.queued_bytes += job.data_len;
        st.queue.push_back(job);
        self.changed.notify_all();
    }

    /// Waits until every queued record is in the file; the first failure of one, if any.
    /// The spent buffers go: a sync or a commit most often ends a run of large writes.
    pub fn drain(&self) -> io::Result<()> {
        let mut st = self.state.lock();
        while !st.queue.is_empty() || st.writing {
            self.changed.wait(&mut st);
        }
        st.pool = Vec::new();
        st.pool_bytes = 0;
        match st.error {
            Some(e) => Err(io::Error::from_raw_os_error(e)),
            None => Ok(()),
        }
    }

    /// Waits until the file holds every record up to `end`, or until the journal was cut
    /// in place since a reader planned its read (`cuts` is no longer `planned`: the reader
    /// looks again), or a queued write failed, or nothing queued or being written reaches
    /// `end` (EIO).
    pub fn wait_written(&self, end: u64, cuts: &AtomicU64, planned: u64) -> io::Result<()> {
        let mut st = self.state.lock();
        loop {
            if st.written_end >= end || cuts.load(Ordering::Acquire) != planned {
                return Ok(());
            }
            if let Some(e) = st.error {
                return Err(io::Error::from_raw_os_error(e));
            }
            if st.queue.is_empty() && !st.writing {
                // Nothing on the way will bring these bytes: a read planned past the
                // journal's end (a bug) fails rather than waiting forever with what it
                // holds.
                tracing::error!(
                    "journal: a read waits for bytes up to offset {end}, but the journal ends at {}; failing it",
                    st.written_end
                );
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            self.changed.wait(&mut st);
        }
    }

    /// Tells the writing thread to end once the queue is empty.
    pub fn stop(&self) {
        self.state.lock().stop = true;
        self.changed.notify_all();
    }

    /// Holds the writing thread before its next job, or lets it go on.
    #[cfg(test)]
    pub fn hold(&self, held: bool) {
        self.state.lock().held = held;
        self.changed.notify_all();
    }

    /// Whether the writing thread writes with `O_DIRECT` (it stops on the first refusal).
    #[cfg(test)]
    pub fn writes_direct(&self) -> bool {
        self.direct.lock().is_some()
    }

    /// How many records each write of the writing thread took, in order.
    #[cfg(test)]
    pub fn batches(&self) -> Vec<usize> {
        self.state.lock().batches.clone()
    }

    fn recycle(st: &mut State, mut buf: Vec<u8>) {
        if st.pool_bytes + buf.len() <= POOL_MAX {
            st.pool_bytes += buf.len();
            st.pool.push(std::mem::take(&mut buf));
        }
    }

    /// The writing thread's loop.
    fn run(&self) {
        let mut st = self.state.lock();
        loop {
            #[cfg(test)]
            if st.held {
                self.changed.wait(&mut st);
                continue;
            }
            let Some(first) = st.queue.pop_front() else {
                if st.stop {
                    return;
                }
                self.changed.wait(&mut st);
                continue;
            };
            if st.error.is_some() {
                // Nothing after a failed record may reach the file.
                st.queued_bytes -= first.data_len;
                Flight::recycle(&mut st, first.buf);
                self.changed.notify_all();
                continue;
            }
            // The records queued right after it go out with it, in one write, while they
            // are whole pages back to back.
            let mut batch = vec![first];
            let mut bytes = batch[0].end() - batch[0].offset;
            while let Some(next) = st.queue.front() {
                let last = &batch[batch.len() - 1];
                if !last.whole_pages() || !next.whole_pages() || next.offset != last.end() {
                    break;
                }
                bytes += next.end() - next.offset;
                if bytes > BATCH_MAX {
                    break;
                }
                batch.push(st.queue.pop_front().expect("front"));
            }
            st.writing = true;
            #[cfg(test)]
            st.batches.push(batch.len());
            drop(st);
            // A panic here would leave `writing` set and every sync waiting forever.
            let res =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.write(&mut batch)))
                    .unwrap_or_else(|_| Err(io::Error::from_raw_os_error(libc::EIO)));
            st = self.state.lock();
            st.writing = false;
            match res {
                Ok(()) => st.written_end = batch[batch.len() - 1].end(),
                Err(e) => {
                    tracing::error!(
                        "journal: writing the records from offset {}: {e}; the mount's later changes fail until it is mounted again",
                        batch[0].offset
                    );
                    st.error = Some(e.raw_os_error().unwrap_or(libc::EIO));
                }
            }
            for job in batch {
                st.queued_bytes -= job.data_len;
                Flight::recycle(&mut st, job.buf);
            }
            self.changed.notify_all();
        }
    }

    /// Writes the records of `batch`, which follow one another in the file.
    fn write(&self, batch: &mut [Job]) -> io::Result<()> {
        for job in batch.iter_mut() {
            let data = &job.buf[job.data_at..job.data_at + job.data_len];
            let crc = crc32c::crc32c_append(crc32c::crc32c(&job.head[8..]), data);
            job.head[4..8].copy_from_slice(&crc.to_le_bytes());
        }
        let direct = self.direct.lock().clone();
        if let Some(d) = direct.filter(|_| batch.iter().all(Job::whole_pages)) {
            // Each record's head goes into the page before its data: the batch is then
            // one run of whole pages, written with one `O_DIRECT` call.
            for job in batch.iter_mut() {
                let from = job.data_at - job.head.len();
                job.buf[from..job.data_at].copy_from_slice(&job.head);
            }
            let mut slices: Vec<io::IoSlice> = batch
                .iter()
                .map(|job| {
                    io::IoSlice::new(
                        &job.buf[job.data_at - job.head.len()..job.data_at + job.data_len],
                    )
                })
                .collect();
            match write_all_vectored_at(&d, &mut slices, batch[0].offset) {
                Ok(()) => return Ok(()),
                // Not for this file system after all (its alignment is larger, say):
                // from now on through the page cache.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::debug!("journal: O_DIRECT write refused ({e}); writing buffered");
                    *self.direct.lock() = None;
                }
                Err(e) => return Err(e),
            }
        }
        for job in batch.iter() {
            let data = &job.buf[job.data_at..job.data_at + job.data_len];
            // Header first: cut short after it, the record runs past the end of the file,
            // which the scan takes for a torn tail.
            self.file.write_all_at(&job.head, job.offset)?;
            let data_offset = job.offset + job.head.len() as u64;
            let direct = self.direct.lock().clone();
            if let Some(d) = direct.filter(|_| data_offset.is_multiple_of(ALIGN)) {
                match d.write_all_at(data, data_offset) {
                    Ok(()) => continue,
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        tracing::debug!("journal: O_DIRECT write refused ({e}); writing buffered");
                        *self.direct.lock() = None;
                    }
                    Err(e) => return Err(e),
                }
            }
            self.file.write_all_at(data, data_offset)?;
        }
        Ok(())
    }
}

/// Starts the writing thread of `flight`.
pub fn spawn(flight: &Arc<Flight>) -> io::Result<std::thread::JoinHandle<()>> {
    *flight.direct.lock() = open_direct(&flight.file);
    let f = flight.clone();
    std::thread::Builder::new()
        .name("journal-writer".into())
        .spawn(move || f.run())
}

/// The journal file opened again for writing with `O_DIRECT` (through /proc/self/fd, so
/// the same file even if a commit has put another at its path since).
fn open_direct(file: &File) -> Option<Arc<File>> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map(Arc::new)
        .ok()
}
