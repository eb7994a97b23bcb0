//! Writing an image back out as a raw image, with its bad ranges filled as asked.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};
use crate::format::BadExtent;
use crate::source::BlockSource;

/// What bad and untried bytes become in the raw output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    Zero,
    /// [`PATTERN`] repeated, aligned to image offsets (so any bad byte can be recognised
    /// and placed: byte `o` of the image is `PATTERN[o % 16]`).
    Pattern,
}

/// The 16-byte marker `--bad-fill pattern` writes over bad bytes.
pub const PATTERN: &[u8; 16] = b"<BAD SECTOR>\xde\xad\xbe\xef";

/// Fills `buf`, which holds the image bytes starting at `offset`, with the pattern.
pub fn fill_pattern(buf: &mut [u8], offset: u64) {
    for (k, b) in buf.iter_mut().enumerate() {
        *b = PATTERN[((offset + k as u64) % 16) as usize];
    }
}

/// Copies the whole source to `out`; returns the bad extents filled.
pub fn extract(
    src: &dyn BlockSource,
    out: &mut dyn Write,
    fill: Fill,
    progress: &mut dyn FnMut(u64),
) -> Result<Vec<BadExtent>> {
    let bad = each_read(src, fill, progress, None, &mut |b, _| {
        out.write_all(b)
            .map_err(|e| Error::io("writing the raw image", e))
    })?;
    out.flush()
        .map_err(|e| Error::io("writing the raw image", e))?;
    Ok(bad)
}

/// Like [`extract`], into `out`, a new, empty regular file: ranges the source knows to be
/// zeros (an image's zero chunks) are not written but left as holes, so a sparse disk comes
/// out as a sparse file, and fast. Stops with [`Error::Interrupted`] once `cancel` is set.
pub fn extract_sparse(
    src: &dyn BlockSource,
    out: &File,
    fill: Fill,
    progress: &mut dyn FnMut(u64),
    cancel: &AtomicBool,
) -> Result<Vec<BadExtent>> {
    let write = |data: &[u8], at: u64| {
        out.write_all_at(data, at)
            .map_err(|e| Error::io("writing the raw image", e))
    };
    let bad = each_read(src, fill, progress, Some(cancel), &mut |b, pos| {
        // (Zero ranges never cover bad bytes, which may hold the pattern.)
        let (mut at, end) = (pos, pos + b.len() as u64);
        for z in src.zero_ranges(pos..end)? {
            let (start, stop) = (z.start.max(at), z.end.min(end));
            if start < stop {
                write(&b[(at - pos) as usize..(start - pos) as usize], at)?;
                at = stop;
            }
        }
        write(&b[(at - pos) as usize..], at)
    })?;
    out.set_len(src.size())
        .map_err(|e| Error::io("writing the raw image", e))?;
    Ok(bad)
}

/// Reads the whole source in order, fills its bad bytes as asked, and hands each read to
/// `put` with its offset; returns the bad extents, joined across reads.
fn each_read(
    src: &dyn BlockSource,
    fill: Fill,
    progress: &mut dyn FnMut(u64),
    cancel: Option<&AtomicBool>,
    put: &mut dyn FnMut(&[u8], u64) -> Result<()>,
) -> Result<Vec<BadExtent>> {
    let size = src.size();
    // A whole number of chunks per read, so chunks decode straight into the buffer.
    let step = (4u64 << 20).max(src.preferred_block_size() as u64);
    let mut buf = vec![0u8; step.min(size) as usize];
    let mut pos = 0u64;
    let mut bad_all: Vec<BadExtent> = Vec::new();
    while pos < size {
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(Error::Interrupted);
        }
        let n = step.min(size - pos) as usize;
        let b = &mut buf[..n];
        let outcome = src.read_at(b, pos)?;
        for x in &outcome.bad {
            if fill == Fill::Pattern {
                let a = (x.offset - pos) as usize;
                fill_pattern(&mut b[a..a + x.length as usize], x.offset);
            }
            // Extents cut at read boundaries are joined back together for the listing.
            match bad_all.last_mut() {
                Some(last) if last.end() == x.offset && last.state == x.state => {
                    last.length += x.length
                }
                _ => bad_all.push(*x),
            }
        }
        put(b, pos)?;
        pos += n as u64;
        progress(pos);
    }
    Ok(bad_all)
}
