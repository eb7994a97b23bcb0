//! Parses the input as a GNU ddrescue mapfile (as text, and as a file through
//! `mapfile::read`, which also takes non-UTF-8 comments), and asks the bad extents of
//! sources of several sizes, one of them taken from the input.
//!
//! Beyond "no panic": errors are Error::Mapfile with a line inside the file; the bad
//! extents are non-empty, inside the source, sorted, disjoint and merged.

#![no_main]

use std::path::Path;

use interpose_image::mapfile::{self, Mapfile};
use interpose_image::{BadExtent, Error};
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    let lines = data.split(|&b| b == b'\n').count();
    let path = Path::new("fuzz.map");
    if let Ok(text) = std::str::from_utf8(data) {
        check(mapfile::parse(text, path), data, lines);
    }
    let (_file, p) = common::memfile(data);
    check(mapfile::read(&p), data, lines);
});

fn line_ok(r: &Result<impl Sized, Error>, lines: usize) {
    match r {
        Ok(_) => {}
        Err(Error::Mapfile { line, message, .. }) => {
            assert!(*line >= 1 && *line <= lines, "line {line} of {lines}");
            assert!(!message.is_empty() && message.len() < 1000, "{message}");
        }
        Err(e) => panic!("not a mapfile error: {e:?}"),
    }
}

fn check(r: Result<Mapfile, Error>, data: &[u8], lines: usize) {
    line_ok(&r, lines);
    let Ok(m) = r else { return };
    let end = m.blocks.last().map_or(0, |b| b.pos + b.size);
    // A size taken from the input: its first 8 bytes, up to twice the mapfile's end.
    let mut from_input = [0u8; 8];
    let k = data.len().min(8);
    from_input[..k].copy_from_slice(&data[..k]);
    let from_input = u64::from_le_bytes(from_input) % (end.saturating_mul(2).max(1) + 1);
    for size in [
        0,
        1,
        512,
        end / 2,
        end.saturating_sub(1),
        end,
        end + 4096,
        from_input,
        u64::MAX,
    ] {
        let r = m.bad_extents(size);
        match &r {
            // bad_extents names the line of a block, which exists.
            Err(Error::Mapfile { line, .. }) => assert!(*line >= 1 && *line <= lines),
            Err(e) => panic!("not a mapfile error: {e:?}"),
            Ok(x) => extents_ok(x, size),
        }
        // Whatever the size, a mapfile reaching to it has no error.
        if size >= end {
            assert!(r.is_ok(), "size {size} >= the mapfile's end {end}: {r:?}");
        }
    }
}

fn extents_ok(x: &[BadExtent], size: u64) {
    let mut prev: Option<&BadExtent> = None;
    for e in x {
        assert!(
            e.length > 0
                && e.offset
                    .checked_add(e.length)
                    .is_some_and(|end| end <= size),
            "{e:?} of {size}"
        );
        if let Some(p) = prev {
            assert!(p.end() <= e.offset, "{p:?} then {e:?}");
            assert!(
                p.end() != e.offset || p.state != e.state,
                "unmerged {p:?} {e:?}"
            );
        }
        prev = Some(e);
    }
}
