//! The journal's data read ahead for a commit: one thread reads the span of the journal
//! the commit needs, front to back, in large aligned reads with `O_DIRECT` where the
//! file system takes it, while the commit writes what was read into BACKING.
//!
//! Why not `copy_file_range` from the journal, as `cp` does: a record's data starts
//! wherever its header ends, not on a page boundary, and the kernel's copy from an
//! unaligned offset costs half as much CPU again as an aligned one. Reading through the
//! page cache also fills it with journal pages that are evicted at once when the
//! compacted journal replaces the old one (0.2 s for 1 GiB on the bench VM, all in the
//! commit's time). Direct reads into a buffer, then one `pwrite` per run, skip both.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{mpsc, Arc};

/// Bytes per read (a single request on the bench VM's disk, whose largest is 4 MiB).
const CHUNK: usize = 4 << 20;
/// Alignment of offsets, lengths and buffers for `O_DIRECT` (a page: enough for any
/// logical block size this will meet).
const ALIGN: u64 = 4096;
/// Reading threads, each taking every READERS-th chunk: reads in flight. A single
/// synchronous reader leaves the disk idle between its reads.
const READERS: usize = 2;

/// A read: the journal's bytes `start..start + len` at `buf[pad..]`.
struct Chunk {
    start: u64,
    buf: Vec<u8>,
    pad: usize,
    len: usize,
}

impl Chunk {
    fn end(&self) -> u64 {
        self.start + self.len as u64
    }
    fn bytes(&self) -> &[u8] {
        &self.buf[self.pad..self.pad + self.len]
    }
}

/// A reading thread's channels: chunks read (one waiting at most), buffers to use again.
struct Reader {
    read: mpsc::Receiver<io::Result<Chunk>>,
    spent: mpsc::Sender<Vec<u8>>,
}

/// The consumer's side: asks for ranges in increasing order. Holds at most the chunks
/// that the range asked for last spans, one waiting and one being read per reader
/// (about 24 MiB for records of up to 4 MiB).
pub struct Ahead {
    readers: Vec<Reader>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Chunks taken so far (chunk k comes from reader k % READERS).
    taken: usize,
    window: VecDeque<Chunk>,
}

impl Ahead {
    /// Starts reading `path` (the journal, also open as `file`) from `from` to `to` on
    /// threads that end when they reach `to` or the reader is dropped.
    pub fn start(path: &Path, file: &Arc<File>, from: u64, to: u64) -> io::Result<Ahead> {
        let first = from - from % ALIGN;
        let to = to.next_multiple_of(ALIGN);
        let mut ahead = Ahead {
            readers: Vec::with_capacity(READERS),
            threads: Vec::with_capacity(READERS),
            taken: 0,
            window: VecDeque::new(),
        };
        for r in 0..READERS {
            let (tx, read) = mpsc::sync_channel(1);
            let (spent, reuse) = mpsc::channel::<Vec<u8>>();
            // A file system without O_DIRECT: read through the page cache.
            let mut direct = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(path)
                .ok();
            let file = file.clone();
            let thread = std::thread::Builder::new()
                .name("commit-read".into())
                .spawn(move || {
                    let mut pos = first + (r * CHUNK) as u64;
                    while pos < to {
                        let want = CHUNK.min((to - pos) as usize);
                        let mut buf = reuse
                            .try_recv()
                            .unwrap_or_else(|_| vec![0u8; CHUNK + ALIGN as usize]);
                        let pad = buf.as_ptr().align_offset(ALIGN as usize);
                        let read = read_full(&mut direct, &file, &mut buf[pad..pad + want], pos);
                        let sent = match read {
                            Ok(len) => tx.send(Ok(Chunk {
                                start: pos,
                                buf,
                                pad,
                                len,
                            })),
                            Err(e) => tx.send(Err(e)),
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
        while self.window.front().is_some_and(|c| c.end() <= off) {
            let c = self.window.pop_front().expect("checked");
            let reader = (self.taken - self.window.len() - 1) % READERS;
            let _ = self.readers[reader].spent.send(c.buf);
        }
        while self.window.back().is_none_or(|c| c.end() < off + len) {
            if self.window.back().is_some_and(|c| c.len < CHUNK) {
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
                parts.push(&c.bytes()[(lo - c.start) as usize..(hi - c.start) as usize]);
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

/// Fills `buf` from `pos` up to the end of the file; the bytes read. Reads directly while
/// the file system takes it (`direct`), else through `file`.
fn read_full(
    direct: &mut Option<File>,
    file: &File,
    buf: &mut [u8],
    pos: u64,
) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let at = pos + done as u64;
        let r = match direct {
            // A direct read needs an aligned offset and length: after a short read
            // (the end of the file) there is nothing more to read anyway.
            Some(d) if (done as u64).is_multiple_of(ALIGN) => d.read_at(&mut buf[done..], at),
            _ => file.read_at(&mut buf[done..], at),
        };
        match r {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && direct.is_some() => {
                tracing::debug!("reading the journal without O_DIRECT: {e}");
                *direct = None;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of `len` bytes that differ from their neighbours, in a directory on the
    /// temporary directory's file system (ext4 or tmpfs: both take O_DIRECT).
    fn sample(len: usize) -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
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
        (dir, p, bytes)
    }

    fn joined(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    #[test]
    fn ranges_come_back_as_in_the_file_across_reads_and_readers() {
        let len = 3 * CHUNK + 12_345;
        let (_d, p, bytes) = sample(len);
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
        let file = Arc::new(File::open(&p).unwrap());
        let mut a = Ahead::start(&p, &file, ranges[0].0, len as u64).unwrap();
        for (off, n) in ranges {
            let parts = a.get(off, n).unwrap();
            assert_eq!(
                joined(&parts),
                &bytes[off as usize..(off + n) as usize],
                "range {off}+{n}"
            );
        }
    }

    #[test]
    fn a_range_past_the_end_of_the_file_is_an_error_not_a_wait() {
        let (_d, p, _) = sample(CHUNK + 100);
        let file = Arc::new(File::open(&p).unwrap());
        let mut a = Ahead::start(&p, &file, 0, 3 * CHUNK as u64).unwrap();
        let err = a.get(CHUNK as u64, 4096).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
    }

    #[test]
    fn a_commit_that_stops_early_stops_the_readers() {
        // Dropped after the first range of a long span: the drop must end the readers,
        // not wait for ever on those blocked on a full channel.
        let (_d, p, bytes) = sample(6 * CHUNK);
        let file = Arc::new(File::open(&p).unwrap());
        let mut a = Ahead::start(&p, &file, 0, 6 * CHUNK as u64).unwrap();
        assert_eq!(joined(&a.get(10, 10).unwrap()), &bytes[10..20]);
        drop(a);
    }

    #[test]
    fn a_direct_read_refused_goes_on_through_the_page_cache() {
        let (_d, p, bytes) = sample(3 * ALIGN as usize);
        let file = File::open(&p).unwrap();
        let mut direct = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&p)
            .ok();
        assert!(direct.is_some(), "O_DIRECT open in the temporary directory");
        // A buffer one byte off its alignment: the direct read gets EINVAL.
        let mut buf = vec![0u8; 2 * ALIGN as usize + 1];
        let pad = buf.as_ptr().align_offset(ALIGN as usize);
        let at = if pad == 0 { 1 } else { 0 };
        let n = read_full(&mut direct, &file, &mut buf[at..at + ALIGN as usize], ALIGN).unwrap();
        assert_eq!(n, ALIGN as usize);
        assert_eq!(&buf[at..at + n], &bytes[ALIGN as usize..2 * ALIGN as usize]);
        assert!(direct.is_none(), "still reading directly after EINVAL");
    }
}
