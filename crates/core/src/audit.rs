//! Audit records and the sink that writes them as JSON lines.
//!
//! Writing happens on a dedicated thread so that a slow disk never stalls the request that
//! produced a record for longer than it takes to hand the record over. Producers append
//! their line to a shared buffer and do not wake the writer: it wakes every
//! [`FLUSH_EVERY`], or when [`WAKE_AT`] bytes are waiting, and writes everything at once.
//! Waking it for every record cost a context switch per file-system operation (fio's
//! write+fsync loop through an audited mount: about three futex calls per request). The
//! buffer is bounded: when the writer falls behind by [`MAX_QUEUED`] bytes, producers wait
//! (backpressure) rather than records being dropped. A write that fails (a full disk)
//! keeps what it did not write, ahead of newer lines, and is tried again every
//! [`RETRY_AFTER`]: no record is dropped and no line torn by another.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::{Condvar, Mutex};
use serde::Serialize;

/// Longest time a line waits in memory before it is written (`tail -f` sees it then).
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// Bytes waiting that make a producer wake the writer at once.
pub const WAKE_AT: usize = 256 << 10;
/// Bytes waiting that make producers wait for the writer.
pub const MAX_QUEUED: usize = 8 << 20;
/// How often a record waiting for room asks whether its caller was signalled.
const INTERRUPT_POLL: Duration = Duration::from_millis(20);

/// Where audit lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuditTarget {
    /// Append to a file (created 0600 when missing).
    File(PathBuf),
    /// Standard error (the spec `-`).
    Stderr,
}

impl AuditTarget {
    pub fn parse(spec: &str) -> Self {
        if spec == "-" {
            Self::Stderr
        } else {
            Self::File(PathBuf::from(spec))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open audit log {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot start the audit writer thread: {0}")]
    Thread(io::Error),
}

/// Lines not yet written, and whether the sink is closing.
#[derive(Debug, Default)]
struct Pending {
    lines: Vec<u8>,
    closed: bool,
    /// The daemon has said that producers wait for space (once, and again only after a
    /// failing log works again).
    holding: bool,
}

#[derive(Debug, Default)]
struct Queue {
    pending: Mutex<Pending>,
    /// The writer waits here (woken early only for [`WAKE_AT`] bytes or close).
    wake_writer: Condvar,
    /// Producers wait here while [`MAX_QUEUED`] bytes are pending.
    space: Condvar,
}

/// A JSON-lines writer running on its own thread. Cloning is not needed: share it by `Arc`.
#[derive(Debug)]
pub struct AuditSink {
    queue: Arc<Queue>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl AuditSink {
    pub fn open(target: &AuditTarget) -> Result<Self, AuditError> {
        let out: Box<dyn Write + Send> = match target {
            AuditTarget::Stderr => Box::new(io::stderr()),
            AuditTarget::File(path) => Box::new(open_append(path)?),
        };
        Self::with_writer(out)
    }

    /// A sink that writes to any writer (tests use an in-memory one).
    pub fn with_writer(out: Box<dyn Write + Send>) -> Result<Self, AuditError> {
        let queue = Arc::new(Queue::default());
        let q = queue.clone();
        let writer = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || write_loop(&q, out))
            .map_err(AuditError::Thread)?;
        Ok(Self {
            queue,
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Queues one record; it is written as a single line (JSON escapes newlines).
    pub fn record<T: Serialize>(&self, record: &T) {
        self.record_unless(record, || false);
    }

    /// Queues one record like [`AuditSink::record`], but stops waiting for room once
    /// `interrupted` says so: the record then goes beyond [`MAX_QUEUED`] (still whole and
    /// in order). The file system asks whether the program waiting for the operation got a
    /// signal; it could not be killed while the daemon held its request. Each record let in
    /// so is one operation whose program was signalled, which keeps the excess small.
    pub fn record_unless<T: Serialize>(&self, record: &T, interrupted: impl Fn() -> bool) {
        let mut line = match serde_json::to_vec(record) {
            Ok(line) => line,
            Err(err) => {
                tracing::warn!("audit record not serializable: {err}");
                return;
            }
        };
        line.push(b'\n');
        let mut p = self.queue.pending.lock();
        while p.lines.len() >= MAX_QUEUED && !p.closed {
            if !p.holding {
                p.holding = true;
                tracing::warn!(
                    "audit log: {} MiB of records wait to be written; operations on the mount \
                     wait for it (a signal to a waiting program lets its operation through; \
                     a second signal to the daemon stops it)",
                    MAX_QUEUED >> 20
                );
            }
            if interrupted() {
                tracing::debug!(
                    "audit log: a signalled caller's record is queued beyond the limit"
                );
                break;
            }
            // Woken by room or close; the timeout is for the question above.
            self.queue.space.wait_for(&mut p, INTERRUPT_POLL);
        }
        if p.closed {
            return; // shutting down; nothing left to do
        }
        p.lines.extend_from_slice(&line);
        if p.lines.len() >= WAKE_AT {
            self.queue.wake_writer.notify_one();
        }
    }

    /// Writes out everything queued so far and stops the writer. Idempotent.
    pub fn close(&self) {
        self.queue.pending.lock().closed = true;
        self.queue.wake_writer.notify_one();
        self.queue.space.notify_all();
        if let Some(writer) = self.writer.lock().take() {
            let _ = writer.join();
        }
    }
}

impl Drop for AuditSink {
    fn drop(&mut self) {
        self.close();
    }
}

fn open_append(path: &Path) -> Result<std::fs::File, AuditError> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| AuditError::Open {
            path: path.to_owned(),
            source,
        })
}

/// How long the writer waits before trying again after a failed write.
const RETRY_AFTER: Duration = Duration::from_millis(100);

fn write_loop(queue: &Queue, mut out: Box<dyn Write + Send>) {
    // Bytes taken from the queue and not yet written. After a failed write (a full disk,
    // say) they are kept here and written first once it works again, whole and in order,
    // and no more is taken meanwhile: the queue stays bounded by MAX_QUEUED, producers
    // wait, and no record is dropped or torn.
    let mut batch: Vec<u8> = Vec::new();
    let mut failing = false;
    // The reader of a pipe (`audit=-` into a program that has ended) is gone for good:
    // records kept for it would only stop the file system once MAX_QUEUED bytes wait.
    let mut reader_gone = false;
    loop {
        let (closed, took_all) = {
            let mut p = queue.pending.lock();
            // Nothing held back from a failed write: take what is queued.
            let take = batch.is_empty();
            if take {
                if p.lines.len() < WAKE_AT && !p.closed {
                    queue.wake_writer.wait_for(&mut p, FLUSH_EVERY);
                }
                std::mem::swap(&mut p.lines, &mut batch);
                queue.space.notify_all();
            }
            // Records queued before close are taken by this round (close is set under
            // the lock after them, and `record` refuses after it).
            (p.closed, take)
        };
        if reader_gone {
            batch.clear();
        }
        if !batch.is_empty() {
            match write_counting(&mut *out, &batch) {
                Ok(()) => {
                    if failing {
                        queue.pending.lock().holding = false;
                        tracing::info!(
                            "audit log writable again: the records kept meanwhile are written"
                        );
                        failing = false;
                    }
                    batch.clear();
                }
                Err((written, err)) => {
                    batch.drain(..written);
                    if err.kind() == io::ErrorKind::BrokenPipe {
                        tracing::error!(
                            "audit log: its reader has gone away ({err}); records are dropped from now on"
                        );
                        reader_gone = true;
                        batch.clear();
                    } else if closed {
                        let queued = queue.pending.lock().lines.len();
                        tracing::error!(
                            "audit log write failed: {err}; {} bytes of records are lost at exit",
                            batch.len() + queued
                        );
                        break;
                    } else {
                        if !failing {
                            tracing::error!(
                                "audit log write failed: {err}; records are kept and written when it works again"
                            );
                            failing = true;
                        }
                        std::thread::sleep(RETRY_AFTER);
                        continue;
                    }
                }
            }
        }
        if closed && took_all {
            break;
        }
    }
}

/// `write_all` and `flush`, telling on failure how many bytes were written.
fn write_counting(out: &mut dyn Write, buf: &[u8]) -> Result<(), (usize, io::Error)> {
    let mut done = 0;
    while done < buf.len() {
        match out.write(&buf[done..]) {
            Ok(0) => return Err((done, io::ErrorKind::WriteZero.into())),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err((done, e)),
        }
    }
    out.flush().map_err(|e| (done, e))
}

/// Seconds since the epoch as an RFC 3339 UTC timestamp with microseconds.
pub fn rfc3339_now() -> String {
    rfc3339(SystemTime::now())
}

pub fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs() as i64;
    let micros = since.subsec_micros();
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    let (y, mo, d) = civil_from_days(days);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}.{micros:06}Z")
}

/// Howard Hinnant's days-to-civil conversion (proleptic Gregorian calendar).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        let t = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20.123456Z");
    }

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A writer that takes `room` bytes, then fails (a full disk) until given more.
    #[derive(Clone, Default)]
    struct Filling {
        out: Arc<Mutex<Vec<u8>>>,
        room: Arc<Mutex<usize>>,
    }
    impl Write for Filling {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut room = self.room.lock();
            if *room == 0 {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            let n = buf.len().min(*room);
            *room -= n;
            self.out.lock().extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A full disk loses no record and tears no line: what could not be written is
    /// written, whole and in order, once there is room.
    #[test]
    fn a_full_disk_keeps_records_until_there_is_room() {
        let disk = Filling::default();
        *disk.room.lock() = 100; // a line and a half
        let sink = AuditSink::with_writer(Box::new(disk.clone())).unwrap();
        for i in 0..1000 {
            sink.record(&serde_json::json!({"op": "write", "n": i, "path": "some/file"}));
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while disk.out.lock().len() < 100 {
            assert!(std::time::Instant::now() < deadline, "nothing written");
            std::thread::sleep(Duration::from_millis(5));
        }
        *disk.room.lock() = usize::MAX;
        sink.close();
        let out = String::from_utf8(disk.out.lock().clone()).unwrap();
        let ns: Vec<u64> = out
            .lines()
            .map(|l| {
                let v: serde_json::Value =
                    serde_json::from_str(l).unwrap_or_else(|e| panic!("torn line {l:?}: {e}"));
                v["n"].as_u64().unwrap()
            })
            .collect();
        assert_eq!(
            ns,
            (0..1000).collect::<Vec<_>>(),
            "records lost or out of order"
        );
    }

    /// While writes fail, what waits stays bounded: the writer keeps retrying what it took
    /// and takes no more, so producers wait at MAX_QUEUED bytes instead of the held bytes
    /// growing with every retry; once there is room everything is written in order.
    #[test]
    fn records_held_while_the_disk_is_full_stay_bounded() {
        #[derive(Clone, Default)]
        struct Full {
            disk: Filling,
            failures: Arc<Mutex<usize>>,
            largest: Arc<Mutex<usize>>,
        }
        impl Write for Full {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                let mut largest = self.largest.lock();
                *largest = (*largest).max(buf.len());
                let res = self.disk.write(buf);
                if res.is_err() {
                    *self.failures.lock() += 1;
                }
                res
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let full = Full::default();
        let sink = Arc::new(AuditSink::with_writer(Box::new(full.clone())).unwrap());
        let line_len = 1000;
        let records = 4 * MAX_QUEUED / line_len;
        let producer = {
            let sink = sink.clone();
            std::thread::spawn(move || {
                for n in 0..records {
                    sink.record(&serde_json::json!({"n": n, "path": "p".repeat(line_len)}));
                }
            })
        };
        // Many rounds of failed writes, each a chance for the held bytes to grow.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while *full.failures.lock() < 8 {
            assert!(
                std::time::Instant::now() < deadline,
                "the writer stopped trying"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        *full.disk.room.lock() = usize::MAX;
        producer.join().unwrap();
        sink.close();
        let largest = *full.largest.lock();
        assert!(
            largest <= MAX_QUEUED + 2 * line_len,
            "{largest} bytes held for a full disk (bound {MAX_QUEUED})"
        );
        let out = full.disk.out.lock();
        let ns: Vec<u64> = out
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| {
                serde_json::from_slice::<serde_json::Value>(l).unwrap()["n"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(ns, (0..records as u64).collect::<Vec<_>>());
    }

    /// A producer waiting for room stops waiting once told its caller was interrupted; its
    /// record goes beyond the limit, and is written in its place once there is room.
    #[test]
    fn an_interrupted_producer_stops_waiting_and_keeps_its_record() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let disk = Filling::default(); // no room at all
        let sink = Arc::new(AuditSink::with_writer(Box::new(disk.clone())).unwrap());
        let asked = Arc::new(AtomicUsize::new(0));
        let interrupted = Arc::new(AtomicBool::new(false));
        let line_len = 1000;
        // Records until one of them, waiting for room, is interrupted.
        let producer = {
            let (sink, asked, interrupted) = (sink.clone(), asked.clone(), interrupted.clone());
            std::thread::spawn(move || {
                for n in 0.. {
                    let record = serde_json::json!({"n": n, "path": "p".repeat(line_len)});
                    sink.record_unless(&record, || {
                        asked.fetch_add(1, Ordering::Relaxed);
                        interrupted.load(Ordering::Relaxed)
                    });
                    if interrupted.load(Ordering::Relaxed) {
                        return n;
                    }
                }
                unreachable!()
            })
        };
        // Asked only while waiting for room.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while asked.load(Ordering::Relaxed) < 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "never waited for room"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        interrupted.store(true, Ordering::Relaxed);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !producer.is_finished() {
            assert!(std::time::Instant::now() < deadline, "still waiting");
            std::thread::sleep(Duration::from_millis(5));
        }
        let last = producer.join().unwrap();
        assert!(
            last >= MAX_QUEUED / line_len,
            "interrupted after {last} records"
        );
        *disk.room.lock() = usize::MAX;
        sink.close();
        let out = String::from_utf8(disk.out.lock().clone()).unwrap();
        let ns: Vec<u64> = out
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["n"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(ns, (0..=last as u64).collect::<Vec<_>>());
    }

    /// A pipe whose reader has ended (`audit=-` into a program that is gone) takes no
    /// record ever again: producers must not wait for it once the queue is full, which
    /// would stop every operation on the mount.
    #[test]
    fn a_pipe_whose_reader_is_gone_does_not_stop_the_producers() {
        struct Gone;
        impl Write for Gone {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let sink = Arc::new(AuditSink::with_writer(Box::new(Gone)).unwrap());
        let (done, finished) = std::sync::mpsc::channel();
        let producer = {
            let sink = sink.clone();
            std::thread::spawn(move || {
                let path = "p".repeat(1000);
                for n in 0..4 * MAX_QUEUED / 1000 {
                    sink.record(&serde_json::json!({"n": n, "path": path}));
                }
                done.send(()).unwrap();
            })
        };
        let waited = finished.recv_timeout(Duration::from_secs(30));
        sink.close(); // lets a stuck producer go, so that the test ends either way
        producer.join().unwrap();
        assert!(waited.is_ok(), "producers waited for a reader that is gone");
    }

    /// Lines reach the writer without close and without filling the buffer (`tail -f`).
    #[test]
    fn lines_are_written_within_a_flush_interval_without_close() {
        let buf = Shared::default();
        let sink = AuditSink::with_writer(Box::new(buf.clone())).unwrap();
        sink.record(&serde_json::json!({"op": "open"}));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while buf.0.lock().is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "no line written 10 s after a record"
            );
            std::thread::sleep(FLUSH_EVERY / 5);
        }
        assert_eq!(&buf.0.lock()[..], b"{\"op\":\"open\"}\n");
        sink.close();
    }

    #[test]
    fn every_record_is_one_json_line() {
        let buf = Shared::default();
        let sink = AuditSink::with_writer(Box::new(buf.clone())).unwrap();
        // Enough to pass WAKE_AT and MAX_QUEUED several times over.
        for i in 0..500_000 {
            sink.record(&serde_json::json!({"op": "read", "n": i, "path": "a\nb"}));
        }
        sink.close();
        let text = String::from_utf8(buf.0.lock().clone()).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 500_000);
        for (i, line) in lines.iter().enumerate() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["n"], i);
        }
    }
}
