//! Writing an image back out as a raw image, with its bad ranges filled as asked.

use std::io::Write;

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
    let size = src.size();
    // A whole number of chunks per read, so chunks decode straight into the buffer.
    let step = (4u64 << 20).max(src.preferred_block_size() as u64);
    let mut buf = vec![0u8; step.min(size) as usize];
    let mut pos = 0u64;
    let mut bad_all: Vec<BadExtent> = Vec::new();
    while pos < size {
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
        out.write_all(b)
            .map_err(|e| Error::io("writing the raw image", e))?;
        pos += n as u64;
        progress(pos);
    }
    out.flush()
        .map_err(|e| Error::io("writing the raw image", e))?;
    Ok(bad_all)
}
