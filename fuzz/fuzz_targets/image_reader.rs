//! Opens the input as an interpose image; if it opens, reads ranges of it (start,
//! middle, end, across a chunk boundary, some derived from the input, one past the end
//! which must fail) and verifies it. The input is tried as is and again with the
//! header's and tables' CRCs made valid (so that mutations reach past them).
//!
//! Beyond "no panic", it checks: a read past the end is OutOfRange; a range read in one
//! piece and in two gives the same bytes; an image that verifies intact reads without
//! error. libFuzzer's -malloc_limit_mb catches an allocation the input does not justify.

#![no_main]

use std::path::Path;

use interpose_image::{Error, Image};
use libfuzzer_sys::fuzz_target;

mod common;

const HEADER: usize = 512;
/// The most read at once (the buffers are the fuzzer's, not the library's).
const MAX_READ: u64 = 256 << 10;

fuzz_target!(|data: &[u8]| {
    check(data);
    if let Some(sealed) = reseal(data) {
        check(&sealed);
    }
});

fn check(data: &[u8]) {
    let (_file, path) = common::memfile(data);
    exercise(&path, data);
}

/// The header's CRC, the index, extent and metadata CRCs (from the header's own offsets,
/// when inside the input) made valid, and the trailer made a copy of the header. None if
/// that changes nothing or the input is too short to have a header.
fn reseal(data: &[u8]) -> Option<Vec<u8>> {
    if data.len() < HEADER || &data[..8] != b"IPOSEIMG" {
        return None;
    }
    let mut b = data.to_vec();
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    for at in [96, 120, 144] {
        let (off, len) = (u64_at(&b, at), u64_at(&b, at + 8));
        if let Some(end) = off.checked_add(len).filter(|&e| e <= b.len() as u64) {
            let crc = crc32c::crc32c(&b[off as usize..end as usize]);
            b[at + 16..at + 20].copy_from_slice(&crc.to_le_bytes());
        }
    }
    let crc = crc32c::crc32c(&b[..HEADER - 4]);
    b[HEADER - 4..HEADER].copy_from_slice(&crc.to_le_bytes());
    let n = b.len();
    if n >= 2 * HEADER {
        let head: [u8; HEADER] = b[..HEADER].try_into().unwrap();
        b[n - HEADER..].copy_from_slice(&head);
    }
    (b != data).then_some(b)
}

fn read(img: &Image, off: u64, len: u64) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    match img.read_at(&mut buf, off) {
        Ok(_) => Some(buf),
        Err(Error::OutOfRange { .. }) => {
            panic!(
                "read of {len} at {off} inside the image ({} bytes) is out of range",
                img.header().virtual_size
            )
        }
        Err(_) => None,
    }
}

fn exercise(path: &Path, data: &[u8]) {
    let img = match Image::open_with_cache(path, 1 << 20) {
        Ok(img) => img,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let _ = img.chunk_stats();
    let h = img.header().clone();
    let n = h.virtual_size;
    let cs = h.chunk_size();
    let span = |off: u64, len: u64| (off.min(n), len.min(n - off.min(n)).min(MAX_READ));
    // Start, middle, end, across the first chunk boundary, the last byte.
    let mut ranges = vec![
        span(0, 4096),
        span(n / 2, 4096),
        span(n.saturating_sub(4096), 4096),
        span(cs.saturating_sub(100), 200),
        span(n.saturating_sub(1), 1),
    ];
    // Derived from the input: its last 16 bytes pick an offset and a length.
    if data.len() >= 16 && n > 0 {
        let t = &data[data.len() - 16..];
        let off = u64::from_le_bytes(t[..8].try_into().unwrap()) % n;
        let len = u64::from_le_bytes(t[8..].try_into().unwrap()) % (2 * cs + 1);
        ranges.push(span(off, len));
    }
    let mut all_ok = true;
    for &(off, len) in &ranges {
        let whole = read(&img, off, len);
        all_ok &= whole.is_some();
        // The same range in two reads (the first through the cache when it is part of
        // a chunk): the same bytes.
        if len >= 2 {
            let half = len / 2;
            let (a, b) = (read(&img, off, half), read(&img, off + half, len - half));
            if let (Some(w), Some(a), Some(b)) = (&whole, a, b) {
                assert!(
                    w[..half as usize] == a[..] && w[half as usize..] == b[..],
                    "{len} bytes at {off} read differently in one piece and in two"
                );
            }
        }
    }
    // Past the end.
    for (off, len) in [(n, 1usize), (n.saturating_sub(1), 2), (u64::MAX, 1)] {
        let mut buf = vec![0u8; len];
        match img.read_at(&mut buf, off) {
            Err(Error::OutOfRange { .. }) => {}
            other => panic!("read of {len} at {off} past the end ({n} bytes): {other:?}"),
        }
    }
    let _ = img.zero_chunk_ranges(0..n);
    if let Ok(report) = img.verify(&mut |_| {}) {
        if report.intact() {
            assert!(all_ok, "the image verifies intact but a read failed");
        }
    }
}
