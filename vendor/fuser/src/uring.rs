//! FUSE over io_uring (Linux 6.14+, with `/sys/module/fuse/parameters/enable_uring` on).
//!
//! Over /dev/fuse the kernel hands each request to whichever daemon thread has waited
//! longest, which the scheduler usually wakes on another CPU than the caller's: a request
//! and its reply each cost a cross-CPU wake-up. Over io_uring the kernel keeps one queue
//! per CPU and puts a request into an entry registered for the caller's CPU. A worker
//! thread pinned to that CPU serves it and hands the reply back together with the fetch
//! of its next request, in the one `io_uring_enter` it waits in.
//!
//! The /dev/fuse threads keep running beside the workers: the kernel still sends FORGET
//! and INTERRUPT there, and every request until each queue has an entry registered.
//!
//! Protocol (`include/uapi/linux/fuse.h`, 7.42): an entry is a header area (the
//! `fuse_in_header` or `fuse_out_header`, the operation's fixed-size argument, and a
//! small in/out record) and a payload area (the remaining arguments, or the reply's
//! data). `FUSE_IO_URING_CMD_REGISTER` offers an entry to the kernel; its completion
//! means a request is in it. `FUSE_IO_URING_CMD_COMMIT_AND_FETCH` returns the reply and
//! offers the entry again. Between a completion and the commit the entry's memory is the
//! daemon's; otherwise the kernel's.

use std::cell::UnsafeCell;
use std::io;
use std::io::IoSlice;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::thread::ThreadId;

use io_uring::IoUring;
use io_uring::cqueue;
use io_uring::opcode;
use io_uring::squeue;
use io_uring::types;
use log::error;
use log::warn;
use parking_lot::Mutex;

use crate::Filesystem;
use crate::ReplyEmpty;
use crate::dev_fuse::DevFuse;
use crate::ll;
use crate::reply::ReplySender;
use crate::request::RequestWithSender;
use crate::session::SessionEventLoop;

const IN_OUT_SZ: usize = 128;
const OP_IN_SZ: usize = 128;
const IN_HEADER_LEN: usize = 40;
const OUT_HEADER_LEN: usize = 16;
const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;
/// `user_data` of the no-op that tells a worker to stop.
const STOP: u64 = u64::MAX;

#[repr(C)]
struct EntInOut {
    flags: u64,
    commit_id: u64,
    payload_sz: u32,
    padding: u32,
    reserved: u64,
}

#[repr(C)]
struct ReqHeader {
    in_out: [u8; IN_OUT_SZ],
    op_in: [u8; OP_IN_SZ],
    ent: EntInOut,
}

/// How many workers and entries serve each of the kernel's per-CPU queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UringConfig {
    /// Worker threads per queue, each with its own ring. More than one lets a request that
    /// waits (an fsync) not hold up the next one from the same CPU.
    pub threads_per_queue: usize,
    /// Entries each worker registers: requests the kernel can hand it at once.
    pub entries_per_thread: usize,
}

impl Default for UringConfig {
    fn default() -> Self {
        UringConfig {
            // interpose: an entry stays taken until its request is answered, also while
            // the request waits on another thread (a long fsync handed to a pool), and a
            // worker's other entries wait while it serves one: with two workers of one
            // entry, two such requests took a CPU's every entry. With three, one may wait
            // on its worker and another be handed on, and a third worker stays free.
            threads_per_queue: 3,
            entries_per_thread: 1,
        }
    }
}

/// interpose: a worker thread serving one CPU's queue, as [`uring_worker`] tells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UringWorker {
    /// The queue (the CPU) it serves.
    pub queue: usize,
    /// How many workers serve that queue, each with its entries: the kernel gives a
    /// request from that CPU to a free entry of any of them, unlike over /dev/fuse, where
    /// any free thread takes it. A worker busy with one request holds up what reaches
    /// its other entries.
    pub workers: usize,
}

thread_local! {
    static WORKER: std::cell::Cell<Option<UringWorker>> = const { std::cell::Cell::new(None) };
}

/// The io_uring queue the calling thread serves, if it is one of its workers (a file
/// system hands a call that may wait long elsewhere rather than take the queue's last
/// free worker).
pub fn uring_worker() -> Option<UringWorker> {
    WORKER.get()
}

/// The memory of one ring entry (see the module comment for who may touch it when).
struct Slot {
    header: Box<UnsafeCell<ReqHeader>>,
    payload: *mut u8,
    _payload_owner: Box<[u8]>,
    iov: Box<UnsafeCell<[libc::iovec; 2]>>,
    commit_id: AtomicU64,
    /// Set once the request in the entry has been answered (a reply is sent once).
    replied: AtomicBool,
}

/// One io_uring instance with its entries, all registered for one kernel queue.
pub(crate) struct Ring {
    uring: IoUring<squeue::Entry128, cqueue::Entry>,
    /// Held while pushing to the submission queue (replies come from any thread).
    sq: Mutex<()>,
    slots: Vec<Slot>,
    dev: Arc<DevFuse>,
    qid: u16,
    payload_cap: usize,
    /// The worker thread: its replies are submitted by its next wait, not a syscall each.
    worker: OnceLock<ThreadId>,
    stopping: AtomicBool,
}

// SAFETY: the entries' memory is used by one party at a time (the kernel, the worker, or
// the holder of the reply; see the module comment); the submission queue is only pushed
// to under `sq`, and the completion queue is only read by the worker thread.
unsafe impl Send for Ring {}
// SAFETY: as above.
unsafe impl Sync for Ring {}

/// Sends the reply to a request that came in through a ring entry.
#[derive(Clone)]
pub(crate) struct UringSender {
    ring: Arc<Ring>,
    slot: usize,
}

impl std::fmt::Debug for UringSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "UringSender(queue {}, entry {})",
            self.ring.qid, self.slot
        )
    }
}

impl UringSender {
    pub(crate) fn dev(&self) -> &Arc<DevFuse> {
        &self.ring.dev
    }

    pub(crate) fn send(&self, data: &[IoSlice<'_>]) -> io::Result<()> {
        let ring = &self.ring;
        let slot = &ring.slots[self.slot];
        if slot.replied.swap(true, Ordering::AcqRel) {
            return Err(io::Error::other("second reply to one request"));
        }
        let total: usize = data.iter().map(|d| d.len()).sum();
        // SAFETY: the entry is ours until the commit below; the request being answered
        // was copied out of it (`Ring::serve`), so nothing else refers to this memory.
        let header = unsafe { &mut *slot.header.get() };
        // SAFETY: as above; `payload` points to `payload_cap` bytes owned by the slot.
        let payload = unsafe { std::slice::from_raw_parts_mut(slot.payload, ring.payload_cap) };
        if total < OUT_HEADER_LEN || total - OUT_HEADER_LEN > ring.payload_cap {
            error!("FUSE reply of {total} bytes does not fit the ring entry; answering EIO");
            let unique = slot.commit_id.load(Ordering::Relaxed);
            write_out_header(&mut header.in_out, unique, -libc::EIO);
            header.ent.payload_sz = 0;
        } else {
            let mut at = 0usize;
            for piece in data {
                let mut piece: &[u8] = piece;
                if at < OUT_HEADER_LEN {
                    let n = piece.len().min(OUT_HEADER_LEN - at);
                    header.in_out[at..at + n].copy_from_slice(&piece[..n]);
                    at += n;
                    piece = &piece[n..];
                }
                if !piece.is_empty() {
                    let p = at - OUT_HEADER_LEN;
                    payload[p..p + piece.len()].copy_from_slice(piece);
                    at += piece.len();
                }
            }
            header.ent.payload_sz = (total - OUT_HEADER_LEN) as u32;
        }
        ring.commit(self.slot)
    }
}

fn write_out_header(to: &mut [u8; IN_OUT_SZ], unique: u64, error: i32) {
    to[0..4].copy_from_slice(&(OUT_HEADER_LEN as u32).to_ne_bytes());
    to[4..8].copy_from_slice(&error.to_ne_bytes());
    to[8..16].copy_from_slice(&unique.to_ne_bytes());
}

impl Ring {
    fn new(
        dev: Arc<DevFuse>,
        qid: u16,
        entries: usize,
        payload_cap: usize,
    ) -> io::Result<Arc<Ring>> {
        let uring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .build(((entries + 1) as u32).next_power_of_two().max(8))?;
        let slots = (0..entries.max(1))
            .map(|_| {
                let header = Box::new(UnsafeCell::new(ReqHeader {
                    in_out: [0; IN_OUT_SZ],
                    op_in: [0; OP_IN_SZ],
                    ent: EntInOut {
                        flags: 0,
                        commit_id: 0,
                        payload_sz: 0,
                        padding: 0,
                        reserved: 0,
                    },
                }));
                let mut owner = vec![0u8; payload_cap].into_boxed_slice();
                let payload = owner.as_mut_ptr();
                let iov = Box::new(UnsafeCell::new([
                    libc::iovec {
                        iov_base: header.get().cast(),
                        iov_len: std::mem::size_of::<ReqHeader>(),
                    },
                    libc::iovec {
                        iov_base: payload.cast(),
                        iov_len: payload_cap,
                    },
                ]));
                Slot {
                    header,
                    payload,
                    _payload_owner: owner,
                    iov,
                    commit_id: AtomicU64::new(0),
                    replied: AtomicBool::new(true),
                }
            })
            .collect();
        Ok(Arc::new(Ring {
            uring,
            sq: Mutex::new(()),
            slots,
            dev,
            qid,
            payload_cap,
            worker: OnceLock::new(),
            stopping: AtomicBool::new(false),
        }))
    }

    fn entry_sqe(&self, slot: usize, cmd_op: u32, commit_id: u64) -> squeue::Entry128 {
        // struct fuse_uring_cmd_req { u64 flags (0); u64 commit_id; u16 qid; u8 pad[6]; }
        let mut bytes = [0u8; 80];
        bytes[8..16].copy_from_slice(&commit_id.to_ne_bytes());
        bytes[16..18].copy_from_slice(&self.qid.to_ne_bytes());
        let mut sqe = opcode::UringCmd80::new(types::Fd(self.dev.as_raw_fd()), cmd_op)
            .cmd(bytes)
            .addr(Some(self.slots[slot].iov.get() as u64))
            .build()
            .user_data(slot as u64);
        set_sqe_len(&mut sqe, 2);
        sqe
    }

    fn push(&self, sqe: &squeue::Entry128) -> io::Result<()> {
        let _guard = self.sq.lock();
        loop {
            // SAFETY: the submission queue is only used under `sq`; the SQE points at the
            // slot's iovecs and buffers, which live as long as the ring.
            let pushed = unsafe { self.uring.submission_shared().push(sqe).is_ok() };
            if pushed {
                return Ok(());
            }
            self.uring.submitter().submit()?;
        }
    }

    /// Hands entry `slot` back to the kernel with the reply that is in it.
    fn commit(&self, slot: usize) -> io::Result<()> {
        let commit_id = self.slots[slot].commit_id.load(Ordering::Relaxed);
        self.push(&self.entry_sqe(slot, CMD_COMMIT_AND_FETCH, commit_id))?;
        if self.worker.get() != Some(&std::thread::current().id()) {
            self.uring.submitter().submit()?;
        }
        Ok(())
    }

    /// Wakes the worker and makes it return.
    pub(crate) fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        let nop = opcode::Nop::new().build().user_data(STOP).into();
        if self.push(&nop).is_ok() {
            let _ = self.uring.submitter().submit();
        }
    }

    /// Serves the request that arrived in entry `slot`.
    fn serve<FS: Filesystem>(
        self: &Arc<Self>,
        slot: usize,
        scratch: &mut [u64],
        se: &SessionEventLoop<FS>,
    ) {
        let s = &self.slots[slot];
        // SAFETY: the kernel completed the entry, so it is ours until we commit it. The
        // header is read into locals here and not referred to during the dispatch below
        // (whose reply writes it).
        let (in_header, op_in, payload_sz, commit_id) = unsafe {
            let h = &*s.header.get();
            let mut in_header = [0u8; IN_HEADER_LEN];
            in_header.copy_from_slice(&h.in_out[..IN_HEADER_LEN]);
            (
                in_header,
                h.op_in,
                h.ent.payload_sz as usize,
                h.ent.commit_id,
            )
        };
        s.commit_id.store(commit_id, Ordering::Relaxed);
        s.replied.store(false, Ordering::Release);
        let len = u32::from_ne_bytes(in_header[0..4].try_into().unwrap()) as usize;
        // The operation's fixed-size argument is in `op_in`, the rest in the payload; the
        // header's length counts all of them.
        let arg_len = len
            .checked_sub(IN_HEADER_LEN + payload_sz)
            .filter(|n| *n <= OP_IN_SZ && n % 8 == 0 && payload_sz <= self.payload_cap);
        let Some(arg_len) = arg_len else {
            error!(
                "malformed FUSE request from the io_uring queue {} (length {len}, payload {payload_sz}); answering EIO",
                self.qid
            );
            self.answer_errno(slot, commit_id, libc::EIO);
            return;
        };
        // The request is copied out of the entry (the reply is written into the same
        // memory, possibly while the request is still referred to).
        let bytes: &mut [u8] = bytemuck_u8(scratch);
        let msg_len = IN_HEADER_LEN + arg_len + payload_sz;
        bytes[..IN_HEADER_LEN].copy_from_slice(&in_header);
        bytes[IN_HEADER_LEN..IN_HEADER_LEN + arg_len].copy_from_slice(&op_in[..arg_len]);
        // SAFETY: the payload is ours (as above) and holds `payload_sz` request bytes.
        let payload = unsafe { std::slice::from_raw_parts(s.payload, payload_sz) };
        bytes[IN_HEADER_LEN + arg_len..msg_len].copy_from_slice(payload);
        let sender = ReplySender::Uring(UringSender {
            ring: self.clone(),
            slot,
        });
        match RequestWithSender::new(sender, &bytes[..msg_len]) {
            Some(req) => match req.request.operation() {
                Ok(ll::Operation::Forget(_) | ll::Operation::BatchForget(_)) => {
                    // These get no reply; the entry still has to go back.
                    req.dispatch(se);
                    self.answer_errno(slot, commit_id, 0);
                }
                Ok(ll::Operation::Destroy(_)) => req.reply::<ReplyEmpty>().ok(),
                _ => req.dispatch(se),
            },
            None => self.answer_errno(slot, commit_id, libc::EIO),
        }
    }

    fn answer_errno(&self, slot: usize, unique: u64, errno: i32) {
        let s = &self.slots[slot];
        if s.replied.swap(true, Ordering::AcqRel) {
            return;
        }
        // SAFETY: the entry is ours until the commit.
        let header = unsafe { &mut *s.header.get() };
        write_out_header(&mut header.in_out, unique, -errno);
        header.ent.payload_sz = 0;
        if let Err(err) = self.commit(slot) {
            error!("FUSE io_uring commit failed: {err}");
        }
    }
}

/// Views `words` as bytes (u64 storage keeps requests aligned for their headers).
fn bytemuck_u8(words: &mut [u64]) -> &mut [u8] {
    // SAFETY: u8 has no alignment or validity requirements; the length covers exactly the
    // same memory.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast(), words.len() * 8) }
}

/// Sets the SQE's `len` (the number of iovecs), which the io-uring crate does not expose
/// for `URING_CMD`.
fn set_sqe_len(sqe: &mut squeue::Entry128, len: u32) {
    const LEN_OFFSET: usize = 24; // opcode u8, flags u8, ioprio u16, fd i32, off u64, addr u64
    const _: () = assert!(std::mem::size_of::<squeue::Entry128>() == 128);
    // SAFETY: Entry128 is repr(C), an io_uring_sqe (whose `len` is the u32 at offset 24)
    // followed by the command area.
    unsafe {
        let p = (sqe as *mut squeue::Entry128).cast::<u8>().add(LEN_OFFSET);
        std::ptr::write_unaligned(p.cast::<u32>(), len);
    }
}

/// The kernel's queue count: one per possible CPU.
fn possible_cpus() -> io::Result<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let mut count = 0;
    for part in text.trim().split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let parse = |s: &str| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| io::Error::other(format!("unexpected CPU list {text:?}")))
        };
        count += parse(b)? + 1 - parse(a)?;
    }
    Ok(count)
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data, zeroed is an empty set; CPU_SET stays in bounds
    // for cpu < CPU_SETSIZE, checked first.
    unsafe {
        if cpu >= libc::CPU_SETSIZE as usize {
            return;
        }
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            warn!(
                "FUSE io_uring worker: cannot pin to CPU {cpu}: {}",
                io::Error::last_os_error()
            );
        }
    }
}

/// The rings of a session and their workers.
pub(crate) struct Workers {
    rings: Vec<Arc<Ring>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    /// Registers entries on every queue and starts their workers.
    pub(crate) fn start<FS: Filesystem + 'static>(
        dev: Arc<DevFuse>,
        config: UringConfig,
        payload_cap: usize,
        make_loop: impl Fn(String) -> SessionEventLoop<FS>,
    ) -> io::Result<Workers> {
        let queues = possible_cpus()?;
        let mut workers = Workers {
            rings: Vec::new(),
            threads: Vec::new(),
        };
        for qid in 0..queues {
            for t in 0..config.threads_per_queue.max(1) {
                let ring = Ring::new(
                    dev.clone(),
                    qid as u16,
                    config.entries_per_thread,
                    payload_cap,
                )?;
                let name = format!("fuser-uring-{qid}-{t}");
                let se = make_loop(name.clone());
                let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
                let worker_ring = ring.clone();
                let per_queue = config.threads_per_queue.max(1);
                let thread = std::thread::Builder::new().name(name).spawn(move || {
                    WORKER.set(Some(UringWorker {
                        queue: qid,
                        workers: per_queue,
                    }));
                    run_worker(worker_ring, se, qid, ready_tx)
                })?;
                workers.rings.push(ring);
                workers.threads.push(thread);
                match ready_rx.recv() {
                    Ok(Ok(())) => {}
                    Ok(Err(err)) => {
                        workers.stop();
                        return Err(err);
                    }
                    Err(_) => {
                        workers.stop();
                        return Err(io::Error::other("FUSE io_uring worker ended early"));
                    }
                }
            }
        }
        Ok(workers)
    }

    pub(crate) fn stop(&mut self) {
        for ring in &self.rings {
            ring.stop();
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn run_worker<FS: Filesystem>(
    ring: Arc<Ring>,
    se: SessionEventLoop<FS>,
    cpu: usize,
    ready: std::sync::mpsc::SyncSender<io::Result<()>>,
) {
    let _ = ring.worker.set(std::thread::current().id());
    pin_to_cpu(cpu);
    let registered = (|| {
        for slot in 0..ring.slots.len() {
            ring.push(&ring.entry_sqe(slot, CMD_REGISTER, 0))?;
        }
        ring.uring.submitter().submit().map(|_| ())
    })();
    let failed = registered.is_err();
    let _ = ready.send(registered);
    if failed {
        return;
    }
    let words = (IN_HEADER_LEN + OP_IN_SZ + ring.payload_cap).div_ceil(8);
    let mut scratch = vec![0u64; words];
    let mut done: Vec<(u64, i32)> = Vec::new();
    loop {
        match ring.uring.submit_and_wait(1) {
            Ok(_) => {}
            Err(err) if err.raw_os_error() == Some(libc::EINTR) => continue,
            Err(err) => {
                error!("FUSE io_uring worker {}: {err}", ring.qid);
                return;
            }
        }
        // SAFETY: only this thread reads the completion queue.
        done.extend(unsafe { ring.uring.completion_shared() }.map(|c| (c.user_data(), c.result())));
        for (i, (user_data, result)) in done.drain(..).enumerate() {
            if i > 0 {
                // A reply made by this thread waits for its next io_uring_enter; do not
                // let it wait for the next request of the batch too.
                if let Err(err) = ring.uring.submit() {
                    error!("FUSE io_uring worker {}: {err}", ring.qid);
                }
            }
            if user_data == STOP {
                return;
            }
            if result < 0 {
                // The connection ends (unmount, abort): every entry completes with an error.
                if !ring.stopping.load(Ordering::Acquire)
                    && ![libc::ENOTCONN, libc::ECANCELED, libc::ENODEV].contains(&-result)
                {
                    error!(
                        "FUSE io_uring queue {}: entry failed: {}",
                        ring.qid,
                        io::Error::from_raw_os_error(-result)
                    );
                }
                return;
            }
            match usize::try_from(user_data) {
                Ok(slot) if slot < ring.slots.len() => ring.serve(slot, &mut scratch, &se),
                _ => error!("FUSE io_uring: completion for unknown entry {user_data}"),
            }
        }
    }
}
