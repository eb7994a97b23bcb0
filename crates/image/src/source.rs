//! Read-only block sources: what the block-device service serves. An [`crate::Image`] is
//! one; a raw file (or block device) with an optional ddrescue mapfile is another.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::format::BadExtent;
use crate::mapfile;

/// What a read found besides the bytes: the parts of the range that are not real data
/// (their bytes in the buffer are zero).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadOutcome {
    /// Bad or untried extents clipped to the range read, in order.
    pub bad: Vec<BadExtent>,
}

impl ReadOutcome {
    /// Every byte read is real data.
    pub fn is_clean(&self) -> bool {
        self.bad.is_empty()
    }
}

/// A read-only disk image anyone can read any range of, from any thread.
pub trait BlockSource: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// Fills `buf` with the bytes at `offset`; bytes that are not real data are zero and
    /// named in the outcome. Errors: out of range, I/O, a damaged image.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<ReadOutcome>;

    /// All bad or untried extents, sorted and disjoint.
    fn bad_extents(&self) -> &[BadExtent];

    /// Ranges inside `range` known to read as zeros without being stored (holes, zero
    /// chunks), sorted and disjoint, never overlapping a bad extent (bad bytes cannot be
    /// read, so they must not be reported as reading as zeros; see [`without_bad`]). A
    /// source that cannot tell says none.
    fn zero_ranges(&self, range: Range<u64>) -> Result<Vec<Range<u64>>> {
        let _ = range;
        Ok(Vec::new())
    }

    /// The smallest read that costs no more than any smaller one (a chunk, a page).
    fn preferred_block_size(&self) -> u32 {
        4096
    }

    /// Whether reading `len` bytes at `offset` needs no decoding now (zeros, cached or
    /// stored plain), so that a server may answer it on the spot rather than hand it to
    /// a worker thread. A hint only; `false` is always safe.
    fn read_is_cheap(&self, offset: u64, len: usize) -> bool {
        let _ = (offset, len);
        false
    }

    /// One line for logs and listings.
    fn describe(&self) -> String;
}

/// The last component of `path`, for descriptions sent to clients, which need not learn
/// where the server keeps its files.
pub fn file_name(path: &std::path::Path) -> String {
    path.file_name()
        .unwrap_or(path.as_os_str())
        .to_string_lossy()
        .into_owned()
}

/// Checks that `len` bytes at `offset` lie inside a source of `size` bytes.
pub fn check_range(offset: u64, len: usize, size: u64) -> Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange {
            offset,
            len: len as u64,
            size,
        }),
    }
}

/// The extents of a sorted, disjoint list that meet `offset..offset+len`, clipped to it.
pub fn bad_within(extents: &[BadExtent], offset: u64, len: u64) -> Vec<BadExtent> {
    if len == 0 {
        return Vec::new(); // no byte to be bad (not an empty extent)
    }
    let end = offset + len;
    let first = extents.partition_point(|e| e.end() <= offset);
    extents[first..]
        .iter()
        .take_while(|e| e.offset < end)
        .map(|e| {
            let start = e.offset.max(offset);
            BadExtent {
                offset: start,
                length: e.end().min(end) - start,
                state: e.state,
            }
        })
        .collect()
}

/// `ranges` (sorted, disjoint) with every byte of a bad extent taken out.
pub fn without_bad(ranges: Vec<Range<u64>>, extents: &[BadExtent]) -> Vec<Range<u64>> {
    if ranges.is_empty() || extents.is_empty() {
        return ranges;
    }
    let mut out = Vec::with_capacity(ranges.len());
    for r in ranges {
        let mut at = r.start;
        for b in bad_within(extents, r.start, r.end - r.start) {
            if b.offset > at {
                out.push(at..b.offset);
            }
            at = b.end();
        }
        if r.end > at {
            out.push(at..r.end);
        }
    }
    out
}

/// Zeroes the bytes of `buf` (which holds the range starting at `offset`) that `bad`
/// (clipped to that range) names.
pub fn zero_bad(buf: &mut [u8], offset: u64, bad: &[BadExtent]) {
    for e in bad {
        let a = (e.offset - offset) as usize;
        buf[a..a + e.length as usize].fill(0);
    }
}

/// A raw image file or block device, with the bad extents of a ddrescue mapfile.
pub struct RawSource {
    file: File,
    path: PathBuf,
    /// The disk's size: the file's, or longer if the mapfile says so.
    size: u64,
    file_size: u64,
    extents: Vec<BadExtent>,
    /// Holes of a sparse file (read once at open: asking per read would cost system calls).
    holes: Vec<Range<u64>>,
}

/// More holes than this (a badly fragmented sparse file) are not tracked.
const MAX_HOLES: usize = 1 << 20;

/// The holes of a file (SEEK_DATA/SEEK_HOLE); none for a block device, a file system
/// that cannot tell, or too many to keep.
pub(crate) fn find_holes(file: &File, size: u64) -> Vec<Range<u64>> {
    use rustix::fs::{seek, SeekFrom};
    let mut out = Vec::new();
    let mut at = 0;
    while at < size {
        let data = match seek(file, SeekFrom::Data(at)) {
            Ok(d) => d.min(size),
            // No data from here on: a hole to the end.
            Err(rustix::io::Errno::NXIO) => size,
            Err(_) => return Vec::new(),
        };
        if data > at {
            out.push(at..data);
            if out.len() > MAX_HOLES {
                return Vec::new();
            }
        }
        if data >= size {
            break;
        }
        at = match seek(file, SeekFrom::Hole(data)) {
            Ok(h) => h,
            Err(_) => break,
        };
    }
    out
}

impl RawSource {
    pub fn open(path: &Path, mapfile: Option<&Path>) -> Result<RawSource> {
        let mut file = File::open(path).map_err(|e| Error::io(format!("{}", path.display()), e))?;
        // The end, not metadata's length: block devices report 0 there.
        let file_size = file
            .seek(SeekFrom::End(0))
            .map_err(|e| Error::io(format!("size of {}", path.display()), e))?;
        // With a mapfile the disk may be longer than the copy (see Mapfile::extents_for).
        let (size, extents) = match mapfile {
            Some(m) => mapfile::read(m)?.extents_for(file_size)?,
            None => (file_size, Vec::new()),
        };
        let holes = without_bad(find_holes(&file, file_size), &extents);
        Ok(RawSource {
            file,
            path: path.to_path_buf(),
            size,
            file_size,
            extents,
            holes,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl BlockSource for RawSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<ReadOutcome> {
        check_range(offset, buf.len(), self.size)?;
        let bad = bad_within(&self.extents, offset, buf.len() as u64);
        // Past the copy's end the disk was never read: zeros, in bad or untried extents.
        let in_file = self.file_size.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[in_file..].fill(0);
        self.file
            .read_exact_at(&mut buf[..in_file], offset)
            .map_err(|e| {
                Error::io(
                    format!(
                        "reading {} bytes at {offset} of {}",
                        buf.len(),
                        self.path.display()
                    ),
                    e,
                )
            })?;
        zero_bad(buf, offset, &bad);
        Ok(ReadOutcome { bad })
    }

    fn bad_extents(&self) -> &[BadExtent] {
        &self.extents
    }

    /// The file system's holes of a sparse file, as found at open (bad extents taken out).
    fn zero_ranges(&self, range: Range<u64>) -> Result<Vec<Range<u64>>> {
        let first = self.holes.partition_point(|h| h.end <= range.start);
        Ok(self.holes[first..]
            .iter()
            .take_while(|h| h.start < range.end)
            .map(|h| h.start.max(range.start)..h.end.min(range.end))
            .collect())
    }

    fn describe(&self) -> String {
        format!(
            "raw {} ({} bytes, {} bad extents)",
            file_name(&self.path),
            self.size,
            self.extents.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::ExtentState;

    #[test]
    fn bad_within_clips_to_the_range() {
        let x = |offset, length| BadExtent {
            offset,
            length,
            state: ExtentState::Bad,
        };
        let all = [x(512, 512), x(4096, 1024), x(8192, 512)];
        assert_eq!(bad_within(&all, 0, 512), vec![]);
        assert_eq!(bad_within(&all, 0, 1024), vec![x(512, 512)]);
        assert_eq!(bad_within(&all, 700, 4000), vec![x(700, 324), x(4096, 604)]);
        assert_eq!(bad_within(&all, 5000, 3192), vec![x(5000, 120)]);
        assert_eq!(bad_within(&all, 9000, 100), vec![]);
        assert_eq!(bad_within(&all, 4100, 0), vec![], "an empty range");
    }
}
