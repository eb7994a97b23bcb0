//! The journal's data read ahead for a commit: two threads read the span of the journal
//! the commit needs, front to back, in 4 MiB reads, while the commit writes what was read
//! into BACKING with `pwrite`.
//!
//! Why not `copy_file_range` from the journal, as `cp` does: the kernel's copy reads and
//! writes on the one thread, and from a record's data, which starts wherever its header
//! ends, not on a page boundary, it costs half as much CPU again as from an aligned
//! offset. Here the reading (and the kernel's readahead, which these reads trigger) runs
//! beside the writing. Reads with `O_DIRECT` were tried and were slower on the bench VM:
//! two synchronous 4 MiB reads in flight keep its disk less busy than readahead does.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{mpsc, Arc};

/// Bytes per read.
const CHUNK: usize = 4 << 20;
/// Reading threads, each taking every READERS-th chunk.
const READERS: usize = 2;

/// A read: the journal's bytes `start..start + buf.len()`.
struct Chunk {
    start: u64,
    buf: Vec<u8>,
}

impl Chunk {
    fn end(&self) -> u64 {
        self.start + self.buf.len() as u64
    }
}

/// A reading thread's channels: chunks read (one waiting at most), buffers to use again.
struct Reader {
    read: mpsc::Receiver<io::Result<Chunk>>,
    spent: mpsc::Sender<Vec<u8>>,
}

/// The consumer's side: asks for ranges in increasing order. Holds at most the chunks
/// that the range asked for last spans, and one waiting and one being read per reader:
/// about 24 MiB for records of up to 4 MiB (1 MiB writes make 1 MiB records), 80 MiB for
/// the largest a journal accepts (64 MiB).
pub struct Ahead {
    readers: Vec<Reader>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Chunks taken so far (chunk k comes from reader k % READERS).
    taken: usize,
    window: VecDeque<Chunk>,
}

impl Ahead {
    /// Starts reading `file` (the journal) from `from` to `to` on threads that end when
    /// they reach `to` or the reader is dropped.
    pub fn start(file: &Arc<File>, from: u64, to: u64) -> io::Result<Ahead> {
        let mut ahead = Ahead {
            readers: Vec::with_capacity(READERS),
            threads: Vec::with_capacity(READERS),
            taken: 0,
            window: VecDeque::new(),
        };
        for r in 0..READERS {
            let (tx, read) = mpsc::sync_channel(1);
            let (spent, reuse) = mpsc::channel::<Vec<u8>>();
            let file = file.clone();
            let thread = std::thread::Builder::new()
                .name("commit-read".into())
                .spawn(move || {
                    let mut pos = from + (r * CHUNK) as u64;
                    while pos < to {
                        let mut buf = reuse
                            .try_recv()
                            .unwrap_or_else(|_| Vec::with_capacity(CHUNK));
                        buf.resize(CHUNK.min((to - pos) as usize), 0);
                        let sent = match read_full(&file, &mut buf, pos) {
                            Ok(len) => {
                                buf.truncate(len);
                                tx.send(Ok(Chunk { start: pos, buf }))
                            }
                            Err(e) => {
                                let _ = tx.send(Err(e));
                                return; // the commit stops at this error
                            }
                        };
                        if sent.is_err() {
                            return; // the commit stopped
                        }
                        pos += (READERS * CHUNK) as u64;
                    }
                })?;
            ahead.readers.push(Reader { read, spent });
            ahead.threads.push(thread);
        }
        Ok(ahead)
    }

    /// The journal's `len` bytes at `off`, as the slices of the reads holding them.
    /// `off` must not be before an offset asked for earlier.
    pub fn get(&mut self, off: u64, len: u64) -> io::Result<Vec<&[u8]>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        while self.window.front().is_some_and(|c| c.end() <= off) {
            let c = self.window.pop_front().expect("checked");
            let reader = (self.taken - self.window.len() - 1) % READERS;
            let _ = self.readers[reader].spent.send(c.buf);
        }
        while self.window.back().is_none_or(|c| c.end() < off + len) {
            if self.window.back().is_some_and(|c| c.buf.len() < CHUNK) {
                // A short read: the end of the file.
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let reader = &self.readers[self.taken % READERS];
            match reader.read.recv() {
                Ok(Ok(c)) => self.window.push_back(c),
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(io::ErrorKind::UnexpectedEof.into()),
            }
            self.taken += 1;
        }
        let mut parts = Vec::with_capacity(2);
        for c in &self.window {
            let (lo, hi) = (off.max(c.start), (off + len).min(c.end()));
            if lo < hi {
                parts.push(&c.buf[(lo - c.start) as usize..(hi - c.start) as usize]);
            }
        }
        if parts.iter().map(|p| p.len() as u64).sum::<u64>() != len {
            // A range before the first one kept: a caller's mistake.
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(parts)
    }
}

impl Drop for Ahead {
    /// Stops the readers: with their channels gone, each ends after the read it is in.
    fn drop(&mut self) {
        self.readers.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Fills `buf` from `pos` up to the end of the file; the bytes read.
fn read_full(file: &File, buf: &mut [u8], pos: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], pos + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of `len` bytes that differ from their neighbours.
    fn sample(len: usize) -> (tempfile::TempDir, Arc<File>, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let mut x = 0x9e37_79b9u32;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        std::fs::write(&p, &bytes).unwrap();
        (dir, Arc::new(File::open(&p).unwrap()), bytes)
    }

    #[test]
    fn ranges_come_back_as_in_the_file_across_reads_and_readers() {
        let len = 3 * CHUNK + 12_345;
        let (_d, file, bytes) = sample(len);
        let c = CHUNK as u64;
        // Unaligned starts, a range inside one read, one across two and across three
        // (so from both readers), and the file's last bytes.
        let ranges = [
            (189, 1 << 20),
            ((1 << 20) + 189 + 24, 4096),
            (c - 100, 200),
            (2 * c - 5000, c + 10_000),
            (len as u64 - 7, 7),
        ];
        let mut a = Ahead::start(&file, ranges[0].0, len as u64).unwrap();
        for (off, n) in ranges {
            let parts = a.get(off, n).unwrap();
            assert_eq!(
                parts.concat(),
                &bytes[off as usize..(off + n) as usize],
                "range {off}+{n}"
            );
        }
    }

    #[test]
    fn a_range_past_the_end_of_the_file_is_an_error_not_a_wait() {
        let (_d, file, _) = sample(CHUNK + 100);
        let mut a = Ahead::start(&file, 0, 3 * CHUNK as u64).unwrap();
        let err = a.get(CHUNK as u64, 4096).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
    }

    #[test]
    fn a_commit_that_stops_early_stops_the_readers() {
        // Dropped after the first range of a long span: the drop must end the readers,
        // not wait for ever on those blocked on a full channel.
        let (_d, file, bytes) = sample(6 * CHUNK);
        let mut a = Ahead::start(&file, 0, 6 * CHUNK as u64).unwrap();
        assert_eq!(a.get(10, 10).unwrap().concat(), &bytes[10..20]);
        // Nothing asked at the end of what was read: no read past it.
        assert!(a.get(CHUNK as u64, 0).unwrap().is_empty());
        drop(a);
    }
}
