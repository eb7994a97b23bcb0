//! Hostile images and mapfiles (issue 4): truncated, corrupt or crafted input gives a
//! clear error naming what is wrong, never a panic, never an allocation the file does
//! not justify.
//!
//! - targeted corruptions of real images built with the library, each with the exact
//!   error it must give (tables re-sealed with valid CRCs where the point is to get past
//!   them);
//! - a bounded, seeded mutation loop: every mutant fails to open, or opens and every
//!   read succeeds or errors; a mutant that verifies intact reads the original bytes;
//! - malformed mapfiles given to `create` name their line.
//!
//! A counting global allocator records the largest single allocation made by the
//! library calls under test (per thread), so "no huge allocation" is asserted, not
//! hoped for.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

mod common;
use common::{create_image_with, Rng};
use interpose_image::create::{create, Options, Output};
use interpose_image::format::{
    self, Codec, Entry, Header, Kind, DATA_OFFSET, EXTENT_SIZE, HEADER_SIZE, INDEX_ENTRY_SIZE,
};
use interpose_image::{Error, Image};

// ---------------------------------------------------------------------------------------
// The largest single allocation, per thread.

struct Peak;

thread_local! {
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = PEAK.try_with(|p| {
        if size > p.get() {
            p.set(size)
        }
    });
}

unsafe impl GlobalAlloc for Peak {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Peak = Peak;

/// Runs `f` and returns what it returned and the largest single allocation it made.
fn peak<T>(f: impl FnOnce() -> T) -> (T, usize) {
    PEAK.with(|p| p.set(0));
    let t = f();
    (t, PEAK.with(|p| p.get()))
}

/// What a library call on a file of `file_len` bytes with chunks of up to `chunk` bytes
/// may allocate at once: a chunk, a table of the file, and fixed overheads (zstd's
/// context, the cache's shards).
fn justified(file_len: usize, chunk: usize) -> usize {
    file_len + chunk + (512 << 10)
}

// ---------------------------------------------------------------------------------------
// Sample images, built with the library.

/// Compressible but not trivially so.
fn text(len: usize, seed: u64) -> Vec<u8> {
    let words: [&[u8]; 6] = [
        b"block ", b"sector ", b"image ", b"rescue ", b"zstd ", b"\n",
    ];
    let mut r = Rng::new(seed);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(words[r.below(words.len())]);
    }
    out.truncate(len);
    out
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut b = vec![0u8; len];
    Rng::new(seed).fill(&mut b);
    b
}

/// A built image: its bytes, header, and what reading all of it gives.
struct Sample {
    name: &'static str,
    bytes: Vec<u8>,
    header: Header,
    /// The source with bad bytes zeroed: what `read_at` of the whole image returns.
    expected: Vec<u8>,
}

const MAP_A: &str = "\
# Mapfile. Created by GNU ddrescue version 1.27
# current_pos  current_status  current_pass
0x00003000     +               1
#      pos        size  status
0x00000000  0x00001200  +
0x00001200  0x00000200  -
0x00001400  0x00001C00  +
0x00003000  0x00000800  /
0x00003800  0x00001700  +
0x00004F00  0x00000200  ?
0x00005100  0x000003D2  +
";

const MAP_F: &str = "0 + 1\n0 0x1000 +\n0x1000 0x1000 -\n0x2000 0x1000 +\n";

fn build(dir: &Path, name: &'static str, data: &[u8], shift: u32, map: Option<&str>) -> Sample {
    build_with(dir, name, data, shift, map, Codec::Zstd)
}

fn build_with(
    dir: &Path,
    name: &'static str,
    data: &[u8],
    shift: u32,
    map: Option<&str>,
    codec: Codec,
) -> Sample {
    let out = create_image_with(dir, name, data, shift, map, codec);
    let bytes = std::fs::read(&out).unwrap();
    let header = Header::decode(&bytes).unwrap();
    let img = Image::open(&out).unwrap();
    let mut expected = vec![0u8; data.len()];
    img.read_at(&mut expected, 0).unwrap();
    assert!(img.verify(&mut |_| {}).unwrap().intact(), "{name}");
    // The bad bytes read as zero, the others as they were.
    let mut want = data.to_vec();
    for x in img.extents() {
        want[x.offset as usize..x.end() as usize].fill(0);
    }
    assert_eq!(expected, want, "{name}");
    Sample {
        name,
        bytes,
        header,
        expected,
    }
}

/// Image A: 4 KiB chunks, compressed, zero and raw chunks, a short last chunk, and bad
/// extents (one in the zero chunk, one across two chunks); B: 8 KiB chunks, no mapfile;
/// C: one byte; D: empty; E: 1 MiB chunks, one short chunk; F: a wholly bad chunk;
/// G: A's bytes and bad extents in an LZ4 image.
fn samples(dir: &Path) -> Vec<Sample> {
    let mut a = Vec::new();
    a.extend(text(4096, 1)); // 0: compressed
    a.extend(vec![0u8; 4096]); // 1: zero (partly bad)
    a.extend(random(4096, 2)); // 2: raw
    a.extend(text(4096, 3)); // 3: compressed, partly bad
    a.extend(random(4096, 4)); // 4: partly untried, so (barely) compressed
    a.extend(text(1234, 5)); // 5: short, compressed, partly untried
    let mut b = Vec::new();
    b.extend(vec![0u8; 8192]);
    b.extend(text(8192, 6));
    b.extend(random(8192, 7));
    b.extend(text(100, 8));
    let mut f = Vec::new();
    f.extend(text(4096, 9));
    f.extend(random(4096, 10)); // all bad: stored as a zero chunk
    f.extend(text(4096, 11));
    let s = vec![
        build(dir, "a", &a, 12, Some(MAP_A)),
        build(dir, "b", &b, 13, None),
        build(dir, "c", b"x", 12, None),
        build(dir, "d", b"", 12, None),
        build(dir, "e", &text(5000, 12), 20, None),
        build(dir, "f", &f, 12, Some(MAP_F)),
        build_with(dir, "g", &a, 12, Some(MAP_A), Codec::Lz4),
    ];
    // Image A has what the corruptions below rely on.
    let kinds: Vec<Kind> = (0..6).map(|i| entry(&s[0], &s[0].bytes, i).kind).collect();
    assert_eq!(
        kinds,
        [
            Kind::Compressed,
            Kind::Zero,
            Kind::Raw,
            Kind::Compressed,
            Kind::Compressed,
            Kind::Compressed
        ]
    );
    assert_eq!(s[0].header.extents.len, 3 * EXTENT_SIZE as u64);
    assert_eq!(entry(&s[5], &s[5].bytes, 1).flags, 3);
    // Image G is A's layout in LZ4: chunk 2 raw, 0 and 3 compressed.
    assert_eq!(s[6].header.codec, Codec::Lz4);
    assert_eq!(s[6].header.incompat, format::INCOMPAT_LZ4);
    let kinds: Vec<Kind> = (0..4).map(|i| entry(&s[6], &s[6].bytes, i).kind).collect();
    assert_eq!(
        kinds,
        [Kind::Compressed, Kind::Zero, Kind::Raw, Kind::Compressed]
    );
    s
}

// ---------------------------------------------------------------------------------------
// Editing images.

fn entry_at(s: &Sample, i: u64) -> usize {
    (s.header.index.offset + i * INDEX_ENTRY_SIZE as u64) as usize
}

fn entry(s: &Sample, bytes: &[u8], i: u64) -> Entry {
    let at = entry_at(s, i);
    Entry::decode(&bytes[at..at + INDEX_ENTRY_SIZE], i, &s.header).unwrap()
}

fn set_entry(s: &Sample, bytes: &mut [u8], i: u64, e: &Entry) {
    let at = entry_at(s, i);
    bytes[at..at + INDEX_ENTRY_SIZE].copy_from_slice(&e.encode());
}

/// Writes `h` (CRCs of its tables recomputed from `bytes`) as header and trailer.
fn seal(bytes: &mut [u8], h: &Header) {
    let mut h = h.clone();
    for s in [&mut h.index, &mut h.extents, &mut h.meta] {
        if let Some(end) = s
            .offset
            .checked_add(s.len)
            .filter(|&e| e <= bytes.len() as u64)
        {
            s.crc = crc32c::crc32c(&bytes[s.offset as usize..end as usize]);
        }
    }
    let enc = h.encode();
    bytes[..HEADER_SIZE].copy_from_slice(&enc);
    let n = bytes.len();
    if n >= 2 * HEADER_SIZE {
        bytes[n - HEADER_SIZE..].copy_from_slice(&enc);
    }
}

/// The same on raw bytes whatever they hold (the mutation loop's re-sealing): section
/// CRCs from the header's fields when in range, the header's CRC, the trailer.
fn reseal_raw(b: &mut [u8]) {
    let n = b.len();
    if n < HEADER_SIZE {
        return;
    }
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    for at in [96, 120, 144] {
        let (off, len) = (u64_at(b, at), u64_at(b, at + 8));
        if let Some(end) = off.checked_add(len).filter(|&e| e <= n as u64) {
            let crc = crc32c::crc32c(&b[off as usize..end as usize]);
            b[at + 16..at + 20].copy_from_slice(&crc.to_le_bytes());
        }
    }
    let crc = crc32c::crc32c(&b[..HEADER_SIZE - 4]);
    b[HEADER_SIZE - 4..HEADER_SIZE].copy_from_slice(&crc.to_le_bytes());
    if n >= 2 * HEADER_SIZE {
        let head: [u8; HEADER_SIZE] = b[..HEADER_SIZE].try_into().unwrap();
        b[n - HEADER_SIZE..].copy_from_slice(&head);
    }
}

/// A scratch file for the images under test.
struct Scratch {
    path: PathBuf,
}

impl Scratch {
    fn put(&self, bytes: &[u8]) -> &Path {
        std::fs::write(&self.path, bytes).unwrap();
        &self.path
    }

    /// Opens `bytes` as an image, which must fail; checks the allocations.
    fn open_err(&self, bytes: &[u8], what: &str) -> Error {
        let path = self.put(bytes);
        let (r, most) = peak(|| Image::open(path));
        assert!(
            most <= justified(bytes.len(), 0),
            "{what}: opening a {}-byte file allocated {most} bytes at once",
            bytes.len()
        );
        match r {
            Ok(_) => panic!("{what}: the image opened"),
            Err(e) => e,
        }
    }

    fn open_ok(&self, bytes: &[u8], what: &str) -> Image {
        let path = self.put(bytes);
        Image::open(path).unwrap_or_else(|e| panic!("{what}: {e}"))
    }
}

/// Asserts the error is of the pattern's variant and its message holds every needle.
macro_rules! assert_error {
    ($e:expr, $pat:pat, $what:expr, [$($needle:expr),* $(,)?]) => {{
        let e: Error = $e;
        assert!(matches!(e, $pat), "{}: wrong error {e:?}", $what);
        let msg = e.to_string();
        assert!(!msg.is_empty(), "{}: empty message", $what);
        $(assert!(msg.contains($needle), "{}: `{msg}` does not say `{}`", $what, $needle);)*
    }};
}

fn setup() -> (tempfile::TempDir, Vec<Sample>, Scratch) {
    let dir = tempfile::tempdir().unwrap();
    let samples = samples(dir.path());
    let scratch = Scratch {
        path: dir.path().join("under-test.img"),
    };
    (dir, samples, scratch)
}

// ---------------------------------------------------------------------------------------
// Targeted corruptions.

#[test]
fn not_images_and_versions() {
    let (_dir, s, sc) = setup();
    let a = &s[0];
    for len in [0usize, 1, 7, 8, 100, 511] {
        let mut b = a.bytes[..len].to_vec();
        if len >= 8 {
            b[0] ^= 0x20;
        }
        assert_error!(sc.open_err(&b, "short"), Error::NotAnImage, len, []);
    }
    // Magic but shorter than a header.
    for len in [8usize, 9, 100, 511] {
        let e = sc.open_err(&a.bytes[..len], "short with magic");
        assert_error!(e, Error::Truncated(_), len, ["header", &len.to_string()]);
    }
    let mut b = a.bytes.clone();
    b[..8].copy_from_slice(b"IPOSEIMH");
    assert_error!(sc.open_err(&b, "magic"), Error::NotAnImage, "magic", []);
    assert_error!(
        sc.open_err(&vec![0u8; 4096], "zeros"),
        Error::NotAnImage,
        "zeros",
        []
    );

    // Version 2.0, written in header and trailer (the version is checked before the CRC).
    let mut b = a.bytes.clone();
    b[8..10].copy_from_slice(&2u16.to_le_bytes());
    let n = b.len();
    b[n - HEADER_SIZE + 8..n - HEADER_SIZE + 10].copy_from_slice(&2u16.to_le_bytes());
    let e = sc.open_err(&b, "version 2.0");
    assert_error!(e, Error::Unsupported(_), "version 2.0", ["version 2.0"]);

    // A minor version this reader does not know is fine (compatible by definition).
    let mut h = a.header.clone();
    h.version_minor = 7;
    let mut b = a.bytes.clone();
    seal(&mut b, &h);
    sc.open_ok(&b, "minor version 7");

    // Unknown incompatible feature bits, with valid CRCs.
    for bit in [1u32, 5, 63] {
        let mut h = a.header.clone();
        h.incompat = 1 << bit;
        let mut b = a.bytes.clone();
        seal(&mut b, &h);
        let e = sc.open_err(&b, "incompat");
        assert_error!(
            e,
            Error::Unsupported(_),
            bit,
            ["incompatible features", &format!("{:#x}", 1u64 << bit)]
        );
    }
    // Unknown compatible bits are not an error.
    let mut h = a.header.clone();
    h.compat = u64::MAX;
    let mut b = a.bytes.clone();
    seal(&mut b, &h);
    sc.open_ok(&b, "compat bits");

    // Bit 0 (LZ4) and codec 2 go together: either alone is corrupt, not unsupported.
    let mut h = a.header.clone();
    h.incompat = 1;
    let mut b = a.bytes.clone();
    seal(&mut b, &h);
    let e = sc.open_err(&b, "LZ4 bit on a zstd image");
    assert_error!(e, Error::Corrupt(_), "bit 0", ["codec zstd", "0x1"]);
    let mut b = a.bytes.clone();
    b[44..48].copy_from_slice(&2u32.to_le_bytes());
    reseal_raw(&mut b);
    let e = sc.open_err(&b, "codec 2 without bit 0");
    assert_error!(e, Error::Corrupt(_), "codec 2", ["codec lz4", "0x0"]);

    // Codec 3, chunk shifts out of range, header size, data offset.
    let mut b = a.bytes.clone();
    b[44..48].copy_from_slice(&3u32.to_le_bytes());
    reseal_raw(&mut b);
    assert_error!(
        sc.open_err(&b, "codec"),
        Error::Unsupported(_),
        "codec",
        ["codec 3"]
    );
    for shift in [0u32, 11, 21, 63, u32::MAX] {
        let mut b = a.bytes.clone();
        b[40..44].copy_from_slice(&shift.to_le_bytes());
        reseal_raw(&mut b);
        let e = sc.open_err(&b, "shift");
        assert_error!(e, Error::Corrupt(_), shift, ["chunk size", "outside"]);
    }
    let mut b = a.bytes.clone();
    b[12..16].copy_from_slice(&1024u32.to_le_bytes());
    reseal_raw(&mut b);
    let e = sc.open_err(&b, "header size");
    assert_error!(e, Error::Corrupt(_), "header size", ["header size 1024"]);
    let mut b = a.bytes.clone();
    b[80..88].copy_from_slice(&1024u64.to_le_bytes());
    reseal_raw(&mut b);
    let e = sc.open_err(&b, "data offset");
    assert_error!(e, Error::Corrupt(_), "data offset", ["data offset 1024"]);
}

#[test]
fn every_header_bit_flip_is_a_header_error() {
    let (_dir, s, sc) = setup();
    let a = &s[0];
    for byte in 0..HEADER_SIZE {
        for bit in [0, 7] {
            let mut b = a.bytes.clone();
            b[byte] ^= 1 << bit;
            let what = format!("header byte {byte} bit {bit}");
            let e = sc.open_err(&b, &what);
            match byte {
                0..=7 => assert_error!(e, Error::NotAnImage, what, []),
                8..=9 => assert_error!(e, Error::Unsupported(_), what, ["format version"]),
                _ => assert_error!(e, Error::Corrupt(_), what, ["header checksum mismatch"]),
            }
            // The same flip in the trailer only: the trailer differs.
            let mut b = a.bytes.clone();
            let n = b.len();
            b[n - HEADER_SIZE + byte] ^= 1 << bit;
            let e = sc.open_err(&b, &what);
            if byte < 8 {
                // No magic at the end, where the header says the trailer is.
                assert_error!(e, Error::Corrupt(_), what, ["trailer is damaged"]);
            } else {
                assert_error!(e, Error::Corrupt(_), what, ["trailer"]);
            }
        }
    }
}

#[test]
fn absurd_sizes_are_refused_without_allocating_them() {
    // The instrument sees a large allocation (so a pass below means something).
    let (_, most) = peak(|| std::hint::black_box(vec![0u8; 8 << 20]).len());
    assert!(most >= 8 << 20, "{most}");
    let (_dir, s, sc) = setup();
    let a = &s[0];
    for (shift, size) in [
        (12u32, 1u64 << 62),
        (20, 1 << 62),
        (12, u64::MAX),
        (20, 1 << 40),
    ] {
        // The size alone: the chunk count no longer matches.
        let mut h = a.header.clone();
        h.virtual_size = size;
        h.chunk_shift = shift;
        let mut b = a.bytes.clone();
        seal(&mut b, &h);
        let e = sc.open_err(&b, "size");
        assert_error!(e, Error::Corrupt(_), size, ["chunk count"]);
        // Size and chunk count agree: the index would not fit.
        h.chunk_count = size.div_ceil(1 << shift);
        seal(&mut b, &h);
        let e = sc.open_err(&b, "size and count");
        assert_error!(e, Error::Corrupt(_), size, ["index length"]);
        // ... and the index length too: it runs past the end of the file.
        h.index.len = h.chunk_count * INDEX_ENTRY_SIZE as u64;
        seal(&mut b, &h);
        let e = sc.open_err(&b, "size, count and index length");
        assert_error!(
            e,
            Error::Truncated(_),
            size,
            ["chunk index", "past the end of the file"]
        );
    }
    // Sections with absurd lengths and offsets.
    for len in [1u64 << 40, u64::MAX - 600, u64::MAX] {
        let mut h = a.header.clone();
        h.data_len = len;
        let mut b = a.bytes.clone();
        seal(&mut b, &h);
        let e = sc.open_err(&b, "data length");
        assert_error!(e, Error::Truncated(_), len, ["chunk data", "past the end"]);

        let mut h = a.header.clone();
        h.meta.len = len;
        seal(&mut b, &h);
        let e = sc.open_err(&b, "metadata length");
        assert_error!(
            e,
            Error::Corrupt(_),
            len,
            ["metadata length", "over the limit"]
        );

        let mut h = a.header.clone();
        h.extents.len = len - len % EXTENT_SIZE as u64;
        seal(&mut b, &h);
        let e = sc.open_err(&b, "extent table length");
        assert_error!(
            e,
            Error::Truncated(_),
            len,
            ["bad-extent table", "past the end"]
        );
    }
    // Metadata of 16 MiB claimed in a small file.
    let mut h = a.header.clone();
    h.meta.len = format::MAX_META_LEN;
    let mut b = a.bytes.clone();
    seal(&mut b, &h);
    let e = sc.open_err(&b, "metadata 16 MiB");
    assert_error!(e, Error::Truncated(_), "meta", ["metadata", "past the end"]);
}

/// A sparse file is as long as its header claims: a chunk index of 8 TiB in a few KiB of
/// disk is refused with a clear error (the allocation failed and aborted the process; more
/// than the memory available is refused before it is asked for).
#[test]
fn an_index_larger_than_memory_is_refused() {
    let (_dir, s, sc) = setup();
    let mut h = s[0].header.clone();
    h.chunk_shift = 12;
    h.chunk_count = 1 << 39;
    h.virtual_size = h.chunk_count << 12;
    h.data_len = 0;
    h.bad_bytes = 0;
    h.index = format::Section {
        offset: DATA_OFFSET,
        len: h.chunk_count * INDEX_ENTRY_SIZE as u64,
        crc: 0,
    };
    let end = h.index.offset + h.index.len;
    h.extents = format::Section {
        offset: end,
        len: 0,
        crc: 0,
    };
    h.meta = h.extents;
    let header = h.encode();
    let f = std::fs::File::create(&sc.path).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&header, 0).unwrap();
    f.write_all_at(&header, end).unwrap();
    drop(f);
    let e = Image::open(&sc.path).err().expect("the image opened");
    assert_error!(
        e,
        Error::Unsupported(_),
        "8 TiB index",
        ["chunk index", "8192.0 GiB of memory"]
    );
}

fn section_mut(h: &mut Header, k: usize) -> &mut format::Section {
    match k {
        0 => &mut h.index,
        1 => &mut h.extents,
        _ => &mut h.meta,
    }
}

#[test]
fn misplaced_and_overlapping_sections() {
    let (_dir, s, sc) = setup();
    let a = &s[0];
    let n = a.bytes.len() as u64;
    // The index past the end of the file.
    for off in [n, n + 4096, 1 << 47, u64::MAX - 8] {
        let mut h = a.header.clone();
        h.index.offset = off;
        let mut b = a.bytes.clone();
        seal(&mut b, &h);
        let e = sc.open_err(&b, "index offset");
        assert_error!(
            e,
            Error::Corrupt(_),
            off,
            ["chunk index at offset", "overlap"]
        );
    }
    // Each table moved onto the one before, or one byte off.
    let names = ["chunk index", "bad-extent table", "metadata"];
    for (k, name) in names.into_iter().enumerate() {
        for delta in [-1i64, 1, -16, -(a.header.data_len as i64)] {
            let mut h = a.header.clone();
            let sec = section_mut(&mut h, k);
            sec.offset = (sec.offset as i64 + delta) as u64;
            let mut b = a.bytes.clone();
            seal(&mut b, &h);
            let what = format!("{name} moved by {delta}");
            let e = sc.open_err(&b, &what);
            assert_error!(e, Error::Corrupt(_), what, [name, "overlap or leave gaps"]);
        }
    }
    // The extent table on top of the index.
    let mut h = a.header.clone();
    h.extents.offset = h.index.offset;
    let mut b = a.bytes.clone();
    seal(&mut b, &h);
    let e = sc.open_err(&b, "extents over index");
    assert_error!(
        e,
        Error::Corrupt(_),
        "extents over index",
        ["bad-extent table"]
    );
    // A byte of a table flipped: its CRC no longer matches.
    for (k, name) in names.into_iter().enumerate() {
        let mut h = a.header.clone();
        let at = section_mut(&mut h, k).offset as usize;
        let mut b = a.bytes.clone();
        b[at] ^= 1;
        let e = sc.open_err(&b, name);
        assert_error!(e, Error::Corrupt(_), name, [name, "checksum mismatch"]);
    }
    // Metadata that is not a JSON object, or not JSON, with a valid CRC.
    let mut b = a.bytes.clone();
    b[a.header.meta.offset as usize] = b'[';
    seal(&mut b, &a.header);
    let e = sc.open_err(&b, "metadata");
    assert_error!(e, Error::Corrupt(_), "metadata", ["not a JSON object"]);
    let mut b = a.bytes.clone();
    b[(a.header.meta.offset + a.header.meta.len - 1) as usize] = b'x';
    seal(&mut b, &a.header);
    let e = sc.open_err(&b, "metadata");
    assert_error!(e, Error::Corrupt(_), "metadata", ["metadata is not valid"]);
    // The extent table length not a multiple of an extent.
    let mut h = a.header.clone();
    h.extents.len -= 1;
    let mut b = a.bytes.clone();
    seal(&mut b, &h);
    let e = sc.open_err(&b, "extent length");
    assert_error!(
        e,
        Error::Corrupt(_),
        "extent length",
        ["not a multiple of 24"]
    );
}

#[test]
fn hostile_index_entries() {
    let (_dir, s, sc) = setup();
    let a = &s[0];
    let end = DATA_OFFSET + a.header.data_len;
    let e0 = entry(a, &a.bytes, 0);
    let e2 = entry(a, &a.bytes, 2);
    let cases: Vec<(&str, u64, Entry, &[&str])> = vec![
        (
            "outside the data region",
            2,
            Entry {
                offset: end - 100,
                ..e2
            },
            &["chunk 2", "outside the chunk data region"],
        ),
        (
            "before the data region",
            2,
            Entry { offset: 0, ..e2 },
            &["chunk 2", "outside the chunk data region"],
        ),
        (
            "at the 48-bit limit",
            2,
            Entry {
                offset: format::MAX_OFFSET,
                ..e2
            },
            &["chunk 2", "outside the chunk data region"],
        ),
        (
            "overlapping the chunk before",
            2,
            Entry {
                offset: e0.offset,
                ..e2
            },
            &["chunk 2", "overlaps or precedes"],
        ),
        (
            "compressed, longer than the chunk",
            0,
            Entry { len: 4097, ..e0 },
            &["chunk 0", "compressed length 4097"],
        ),
        (
            "compressed, u32::MAX long",
            0,
            Entry {
                len: u32::MAX,
                ..e0
            },
            &["chunk 0", "compressed length"],
        ),
        (
            "compressed, empty",
            0,
            Entry { len: 0, ..e0 },
            &["chunk 0", "compressed length 0"],
        ),
        (
            "raw, short",
            2,
            Entry { len: 4095, ..e2 },
            &["chunk 2", "raw chunk of 4095 bytes"],
        ),
        (
            "zero with data",
            2,
            Entry {
                kind: Kind::Zero,
                ..e2
            },
            &["chunk 2", "zero chunk with data"],
        ),
        (
            "zero with an offset",
            1,
            Entry {
                offset: 600,
                ..entry(a, &a.bytes, 1)
            },
            &["chunk 1", "zero chunk with data"],
        ),
    ];
    for (what, i, e, needles) in cases {
        let mut b = a.bytes.clone();
        set_entry(a, &mut b, i, &e);
        seal(&mut b, &a.header);
        let err = sc.open_err(&b, what);
        let msg = err.to_string();
        assert!(matches!(err, Error::Corrupt(_)), "{what}: {err:?}");
        for n in needles {
            assert!(msg.contains(n), "{what}: `{msg}` does not say `{n}`");
        }
    }
    // Two chunks swapped in the index (unsorted data).
    let mut b = a.bytes.clone();
    set_entry(
        a,
        &mut b,
        0,
        &Entry {
            offset: e2.offset,
            ..e0
        },
    );
    set_entry(
        a,
        &mut b,
        2,
        &Entry {
            offset: e0.offset,
            ..e2
        },
    );
    seal(&mut b, &a.header);
    let e = sc.open_err(&b, "swapped");
    assert_error!(
        e,
        Error::Corrupt(_),
        "swapped",
        ["chunk 2", "overlaps or precedes"]
    );
    // Unknown kinds and flags, raw words.
    for (word_hi, needle) in [
        (3u64 << 48, "unknown kind 3"),
        (0x80u64 << 56, "unknown flags"),
    ] {
        let mut b = a.bytes.clone();
        let at = entry_at(a, 0);
        let w = u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
        let w = (w & format::MAX_OFFSET) | word_hi;
        b[at..at + 8].copy_from_slice(&w.to_le_bytes());
        seal(&mut b, &a.header);
        let e = sc.open_err(&b, needle);
        assert_error!(e, Error::Corrupt(_), needle, ["chunk 0", needle]);
    }
}

#[test]
fn hostile_extent_tables() {
    let (_dir, s, sc) = setup();
    let a = &s[0];
    let x = |offset: u64, length: u64, state: u32| {
        let mut b = [0u8; EXTENT_SIZE];
        b[0..8].copy_from_slice(&offset.to_le_bytes());
        b[8..16].copy_from_slice(&length.to_le_bytes());
        b[16..20].copy_from_slice(&state.to_le_bytes());
        b
    };
    let size = a.header.virtual_size;
    type Case = (
        &'static str,
        [[u8; EXTENT_SIZE]; 3],
        &'static [&'static str],
    );
    let cases: [Case; 7] = [
        (
            "unsorted",
            [
                x(0x3000, 0x800, 1),
                x(0x1200, 0x200, 1),
                x(0x4F00, 0x200, 2),
            ],
            &["bad extent 1", "overlaps or precedes"],
        ),
        (
            "overlapping",
            [
                x(0x1200, 0x200, 1),
                x(0x1300, 0x800, 1),
                x(0x4F00, 0x200, 2),
            ],
            &["bad extent 1", "overlaps or precedes"],
        ),
        (
            "outside",
            [x(0x1200, 0x200, 1), x(0x3000, 0x800, 1), x(size, 0x200, 2)],
            &["bad extent 2", "outside the image"],
        ),
        (
            "overflowing",
            [x(0x1200, 0x200, 1), x(0x3000, 0x800, 1), x(u64::MAX, 2, 2)],
            &["bad extent 2", "outside the image"],
        ),
        (
            "empty",
            [x(0x1200, 0x200, 1), x(0x3000, 0, 1), x(0x4F00, 0x200, 2)],
            &["bad extent 1", "empty"],
        ),
        (
            "unknown state",
            [
                x(0x1200, 0x200, 1),
                x(0x3000, 0x800, 9),
                x(0x4F00, 0x200, 2),
            ],
            &["bad extent 1", "unknown state 9"],
        ),
        (
            "bad bytes disagree",
            [
                x(0x1200, 0x200, 1),
                x(0x3000, 0x801, 1),
                x(0x4F00, 0x200, 2),
            ],
            &["bad extents cover", "header says"],
        ),
    ];
    for (what, table, needles) in cases {
        let mut b = a.bytes.clone();
        let at = a.header.extents.offset as usize;
        for (k, e) in table.iter().enumerate() {
            b[at + k * EXTENT_SIZE..at + (k + 1) * EXTENT_SIZE].copy_from_slice(e);
        }
        seal(&mut b, &a.header);
        let err = sc.open_err(&b, what);
        let msg = err.to_string();
        assert!(matches!(err, Error::Corrupt(_)), "{what}: {err:?}");
        for n in needles {
            assert!(msg.contains(n), "{what}: `{msg}` does not say `{n}`");
        }
    }
    // Reserved field.
    let mut b = a.bytes.clone();
    b[a.header.extents.offset as usize + 20] = 1;
    seal(&mut b, &a.header);
    let e = sc.open_err(&b, "reserved");
    assert_error!(
        e,
        Error::Corrupt(_),
        "reserved",
        ["bad extent 0", "reserved"]
    );
}

#[test]
fn truncated_appended_and_unsealed() {
    let (_dir, s, sc) = setup();
    for smp in &s {
        let n = smp.bytes.len();
        for k in 0..16 {
            let len = n * k / 16;
            let e = sc.open_err(&smp.bytes[..len], "truncated");
            let what = format!("{} cut to {len} of {n}", smp.name);
            if len < 8 {
                assert_error!(e, Error::NotAnImage, what, []);
            } else {
                assert_error!(e, Error::Truncated(_), what, []);
            }
        }
        for cut in [1, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 1] {
            let e = sc.open_err(&smp.bytes[..n - cut], "cut");
            let what = format!("{} less {cut} bytes", smp.name);
            assert_error!(e, Error::Truncated(_), what, ["cut short"]);
        }
        for garbage in [&[0u8][..], &[0xAB; 511], &[0; 512], &[0x5A; 4096]] {
            let mut b = smp.bytes.clone();
            b.extend_from_slice(garbage);
            let what = format!("{} + {} bytes", smp.name, garbage.len());
            let e = sc.open_err(&b, &what);
            assert_error!(e, Error::Corrupt(_), what, ["no trailer", "appended"]);
        }
        // Appended bytes ending in a copy of the trailer.
        let mut b = smp.bytes.clone();
        b.extend_from_slice(&smp.bytes[n - 4096.min(n)..]);
        let e = sc.open_err(&b, "trailer twice");
        assert_error!(e, Error::Corrupt(_), smp.name, ["bytes after the trailer"]);
    }
    // Never sealed: no trailer (as an interrupted creation leaves it).
    let a = &s[0];
    let mut h = a.header.clone();
    h.flags = 0;
    let mut b = a.bytes.clone();
    b[..HEADER_SIZE].copy_from_slice(&h.encode());
    let n = b.len();
    b[n - HEADER_SIZE..].fill(0);
    assert_error!(
        sc.open_err(&b, "unsealed"),
        Error::Incomplete,
        "unsealed",
        []
    );
    // Unsealed header, sealed trailer of another image.
    let mut b = a.bytes.clone();
    b[..HEADER_SIZE].copy_from_slice(&h.encode());
    let mut other = a.header.clone();
    other.uuid[0] ^= 1;
    b[n - HEADER_SIZE..].copy_from_slice(&other.encode());
    let e = sc.open_err(&b, "foreign trailer");
    assert_error!(e, Error::Corrupt(_), "foreign trailer", ["does not belong"]);
    // Unsealed header of the same uuid but another disk size (same chunk count): the
    // trailer does not describe the disk the header announced.
    let mut b = a.bytes.clone();
    let mut resized = h.clone();
    resized.virtual_size -= 1;
    assert_eq!(
        resized.virtual_size.div_ceil(1 << resized.chunk_shift),
        h.chunk_count
    );
    b[..HEADER_SIZE].copy_from_slice(&resized.encode());
    let e = sc.open_err(&b, "resized");
    assert_error!(e, Error::Corrupt(_), "resized", ["does not belong"]);
    // Unsealed header, its own sealed trailer: a streamed image, fine.
    let mut b = a.bytes.clone();
    b[..HEADER_SIZE].copy_from_slice(&h.encode());
    let img = sc.open_ok(&b, "streamed");
    let mut all = vec![0u8; a.expected.len()];
    img.read_at(&mut all, 0).unwrap();
    assert_eq!(all, a.expected);
}

/// Replaces chunk `i` of image A (stored, with room enough for `frame`)
/// with `frame` stored compressed, index and header re-sealed; opens it.
fn with_frame(a: &Sample, sc: &Scratch, i: u64, frame: &[u8]) -> Image {
    let e = entry(a, &a.bytes, i);
    assert_ne!(e.kind, Kind::Zero);
    assert!(frame.len() <= e.len as usize, "{} bytes", frame.len());
    let mut b = a.bytes.clone();
    let at = e.offset as usize;
    b[at..at + frame.len()].copy_from_slice(frame);
    let c = Entry {
        kind: Kind::Compressed,
        len: frame.len() as u32,
        ..e
    };
    set_entry(a, &mut b, i, &c);
    seal(&mut b, &a.header);
    sc.open_ok(&b, "frame")
}

/// A zstd frame header claiming `size` bytes, then `blocks` RLE blocks of 128 KiB.
fn claimed_frame(size: u64, blocks: usize) -> Vec<u8> {
    let mut f = 0xFD2F_B528u32.to_le_bytes().to_vec();
    f.push(0xE0); // 8-byte content size, single segment
    f.extend_from_slice(&size.to_le_bytes());
    for k in 0..blocks {
        let last = (k + 1 == blocks) as u32;
        let h = last | 1 << 1 | (128 << 10) << 3; // RLE, 128 KiB
        f.extend_from_slice(&h.to_le_bytes()[..3]);
        f.push(0);
    }
    f
}

/// `frame` with its header's content size replaced by an 8-byte 2^64-1.
fn claiming_u64_max(frame: &[u8]) -> Vec<u8> {
    let descriptor = frame[4];
    let single_segment = descriptor & 0x20 != 0;
    let size_len = match descriptor >> 6 {
        0 => usize::from(single_segment),
        1 => 2,
        2 => 4,
        _ => 8,
    };
    let kept = 5 + usize::from(!single_segment) + [0, 1, 2, 4][(descriptor & 3) as usize];
    let mut f = frame[..4].to_vec();
    f.push(descriptor | 0xC0);
    f.extend_from_slice(&frame[5..kept]);
    f.extend_from_slice(&u64::MAX.to_le_bytes());
    f.extend_from_slice(&frame[kept + size_len..]);
    f
}

/// Reads chunk `bomb` of image A, which must fail with a Chunk error naming it, while
/// the others read as before; verify names it; nothing allocates more than a chunk.
fn check_damaged_chunk(a: &Sample, img: &Image, bomb: u64, needle: &str, what: &str) {
    let n = img.header().virtual_size;
    let justified = justified(a.bytes.len(), 4096);
    // Whole chunk (straight into the buffer), part of it (through the cache), a range
    // across its start.
    let start = bomb << 12;
    for (off, len) in [(start, 4096usize), (start + 100, 200), (start - 512, 1024)] {
        let mut buf = vec![0u8; len];
        let (r, most) = peak(|| img.read_at(&mut buf, off));
        assert!(most <= justified, "{what}: read allocated {most} bytes");
        match r {
            Err(Error::Chunk {
                chunk,
                start: s,
                what: w,
                ..
            }) => {
                assert_eq!(chunk, bomb, "{what}");
                assert_eq!(s, start, "{what}");
                assert!(w.contains(needle), "{what}: `{w}` does not say `{needle}`");
            }
            other => panic!("{what}: read at {off} gave {other:?}"),
        }
    }
    for i in (0..a.header.chunk_count).filter(|&i| i != bomb) {
        let (s, e) = (i << 12, ((i + 1) << 12).min(n));
        let mut buf = vec![0u8; (e - s) as usize];
        img.read_at(&mut buf, s)
            .unwrap_or_else(|e| panic!("{what}: chunk {i}: {e}"));
        assert_eq!(buf, a.expected[s as usize..e as usize], "{what}: chunk {i}");
    }
    let (report, most) = peak(|| img.verify(&mut |_| {}).unwrap());
    assert!(most <= justified, "{what}: verify allocated {most} bytes");
    assert!(!report.intact() && !report.hash_ok, "{what}");
    assert_eq!(report.damaged.len(), 1, "{what}: {:?}", report.damaged);
    assert!(
        matches!(report.damaged[0], Error::Chunk { chunk, .. } if chunk == bomb),
        "{what}: {:?}",
        report.damaged
    );
}

#[test]
fn decompression_bombs_and_damaged_chunks() {
    let (_dir, s, sc) = setup();
    let a = &s[0];
    // 64 MiB of zeros in a 2 KiB zstd frame stored as a 4 KiB chunk.
    let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 1).unwrap();
    assert!(bomb.len() < 4096, "{}", bomb.len());
    let img = with_frame(a, &sc, 2, &bomb);
    check_damaged_chunk(a, &img, 2, "zstd", "64 MiB bomb");
    // A frame claiming 1 TiB, and one claiming u64::MAX bytes.
    for size in [1u64 << 40, u64::MAX] {
        let img = with_frame(a, &sc, 4, &claimed_frame(size, 8));
        check_damaged_chunk(a, &img, 4, "zstd", "claimed size");
    }
    // The chunk's own bytes in a frame that claims 2^64-1 bytes of content (libzstd
    // reads that as "not given"; FORMAT.md §8.1 says it must equal the chunk's length).
    let (i, frame) = (1..a.header.chunk_count - 1)
        .filter(|&i| entry(a, &a.bytes, i).kind == Kind::Compressed)
        .map(|i| {
            let own = &a.expected[(i << 12) as usize..((i + 1) << 12) as usize];
            (i, claiming_u64_max(&zstd::bulk::compress(own, 19).unwrap()))
        })
        .find(|(i, f)| f.len() <= entry(a, &a.bytes, *i).len as usize)
        .expect("a compressed chunk with room for the frame");
    let img = with_frame(a, &sc, i, &frame);
    check_damaged_chunk(a, &img, i, "claims 18446744073709551615 bytes", "2^64-1");
    // A frame one byte too long, one byte short, and the chunk's own bytes under
    // another chunk's CRC.
    let words = text(4097, 77);
    let img = with_frame(a, &sc, 2, &zstd::bulk::compress(&words, 3).unwrap());
    check_damaged_chunk(a, &img, 2, "zstd", "one byte long");
    let img = with_frame(a, &sc, 2, &zstd::bulk::compress(&words[..4095], 3).unwrap());
    check_damaged_chunk(a, &img, 2, "4095 bytes", "one byte short");
    let img = with_frame(a, &sc, 2, &zstd::bulk::compress(&words[..2048], 3).unwrap());
    check_damaged_chunk(a, &img, 2, "2048 bytes", "half");
    let img = with_frame(
        a,
        &sc,
        2,
        &zstd::bulk::compress(&vec![7u8; 4096], 3).unwrap(),
    );
    check_damaged_chunk(a, &img, 2, "checksum mismatch", "other bytes");
    let img = with_frame(a, &sc, 2, b"not zstd at all");
    check_damaged_chunk(a, &img, 2, "zstd", "not zstd");

    // One byte of a raw chunk's data flipped: no table changes, only that chunk fails.
    let e2 = entry(a, &a.bytes, 2);
    let mut b = a.bytes.clone();
    b[e2.offset as usize + 1000] ^= 0x10;
    let img = sc.open_ok(&b, "raw flip");
    check_damaged_chunk(a, &img, 2, "checksum mismatch", "raw flip");
    // The same in a compressed chunk: zstd or the CRC catches it.
    let e3 = entry(a, &a.bytes, 3);
    for at in [0usize, 5, e3.len as usize / 2, e3.len as usize - 1] {
        let mut b = a.bytes.clone();
        b[e3.offset as usize + at] ^= 0x01;
        let img = sc.open_ok(&b, "compressed flip");
        let mut buf = vec![0u8; 4096];
        match img.read_at(&mut buf, 3 << 12) {
            Err(Error::Chunk { chunk: 3, .. }) => {}
            other => panic!("compressed chunk flipped at {at}: {other:?}"),
        }
        let report = img.verify(&mut |_| {}).unwrap();
        assert_eq!(report.damaged.len(), 1, "{at}");
    }

    // Reads past the end are errors, whatever the image.
    for smp in &s {
        let img = sc.open_ok(&smp.bytes, smp.name);
        let n = img.header().virtual_size;
        for (off, len) in [
            (n, 1usize),
            (n.saturating_sub(1), 2),
            (u64::MAX, 1),
            (0, n as usize + 1),
        ] {
            let mut buf = vec![0u8; len];
            match img.read_at(&mut buf, off) {
                Err(Error::OutOfRange { .. }) => {}
                other => panic!("{}: read {len} at {off}: {other:?}", smp.name),
            }
        }
        let mut empty = [0u8; 0];
        img.read_at(&mut empty, n).unwrap();
    }
}

/// One LZ4 sequence: `literals`, then (if given) a match of `len` bytes at `offset`.
fn lz4_seq(literals: &[u8], one_match: Option<(u16, usize)>) -> Vec<u8> {
    fn more(out: &mut Vec<u8>, mut n: usize) {
        while n >= 255 {
            out.push(255);
            n -= 255;
        }
        out.push(n as u8);
    }
    let ll = literals.len();
    let ml = one_match.map_or(0, |(_, len)| len - 4);
    let mut b = vec![(ll.min(15) as u8) << 4 | ml.min(15) as u8];
    if ll >= 15 {
        more(&mut b, ll - 15);
    }
    b.extend_from_slice(literals);
    if let Some((offset, _)) = one_match {
        b.extend_from_slice(&offset.to_le_bytes());
        if ml >= 15 {
            more(&mut b, ml - 15);
        }
    }
    b
}

/// An LZ4 block: 4 literals, one match of `len` bytes at `offset`, then `tail` literals.
fn lz4_block(offset: u16, len: usize, tail: usize) -> Vec<u8> {
    [
        lz4_seq(b"abcd", Some((offset, len))),
        lz4_seq(&vec![b'z'; tail], None),
    ]
    .concat()
}

#[test]
fn hostile_lz4_blocks_are_damaged_chunks() {
    let (_dir, s, sc) = setup();
    let g = &s[6];
    let lz4 = |data: &[u8]| lz4::block::compress(data, None, false).unwrap();
    let words = text(4097, 77);
    // The same block, fine: 4 + 4000 + 92 bytes.
    let fine = lz4_block(4, 4000, 92);
    let first = lz4_seq(b"abcd", Some((4, 4000)));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        // 900 KiB of one byte from a 3.6 KB block (LZ4 cannot say more in 4 KiB): it
        // is refused before anything is decoded.
        (
            "900 KiB bomb",
            lz4_block(1, 900 << 10, 92),
            "past the chunk's 4096 bytes",
        ),
        // liblz4 would take this one, as a copy of zeros.
        (
            "offset 0",
            lz4_block(0, 4000, 92),
            "match offset 0 with 4 bytes",
        ),
        (
            "offset before the output",
            lz4_block(5, 4000, 92),
            "match offset 5",
        ),
        // LZ4's end rules: the last 5 bytes literals, the last match 12 bytes or more
        // before the end.
        (
            "4 literals at the end",
            lz4_block(4, 4088, 4),
            "too near the chunk's end",
        ),
        (
            "a match at the very end",
            lz4_block(4, 4092, 0),
            "too near the chunk's end",
        ),
        (
            "a match starting 11 bytes before the end",
            [
                lz4_seq(b"abcd", Some((4, 4081))),
                lz4_seq(b"", Some((1, 6))),
                lz4_seq(b"zzzzz", None),
            ]
            .concat(),
            "too near the chunk's end",
        ),
        (
            "ends after a match",
            first.clone(),
            "where a sequence should start",
        ),
        (
            "ends inside an offset",
            first[..6].to_vec(),
            "inside a match offset",
        ),
        (
            "ends inside a match length",
            first[..8].to_vec(),
            "inside a match length",
        ),
        (
            "ends inside a length",
            lz4_seq(&[b'x'; 20], None)[..1].to_vec(),
            "inside a literal length",
        ),
        ("one byte long", lz4(&words), "past the chunk's 4096 bytes"),
        (
            "one byte short",
            lz4(&words[..4095]),
            "decompressed to 4095 bytes",
        ),
        ("half", lz4(&words[..2048]), "decompressed to 2048"),
        ("other bytes", lz4(&[7u8; 4096]), "checksum mismatch"),
        (
            "input left over",
            [lz4(&words[..4096]), vec![0]].concat(),
            "lz4",
        ),
        (
            "cut inside literals",
            lz4(&words[..4096])[..40].to_vec(),
            "lz4",
        ),
        ("not lz4 at all", b"\xff\xff\xff\xffnot lz4".to_vec(), "lz4"),
        // A zstd frame of the right bytes is not an LZ4 block.
        (
            "a zstd frame",
            zstd::bulk::compress(&words[..4096], 3).unwrap(),
            "lz4",
        ),
    ];
    for (what, block, needle) in cases {
        let img = with_frame(g, &sc, 2, &block);
        check_damaged_chunk(g, &img, 2, needle, what);
        spec_reader_refuses_chunk_2(&sc.path, needle, what);
    }
    // The well-formed block decodes (and fails only its CRC, being other bytes).
    let img = with_frame(g, &sc, 2, &fine);
    check_damaged_chunk(g, &img, 2, "checksum mismatch", "a well-formed block");
    spec_reader_refuses_chunk_2(&sc.path, "checksum mismatch", "a well-formed block");

    // A flipped bit anywhere in a compressed chunk: LZ4 or the CRC catches it, unless
    // the block still decodes to the same bytes (a match offset moved to equal bytes,
    // such as the zeros of its bad sectors): never other bytes.
    let e = entry(g, &g.bytes, 3);
    assert_eq!(e.kind, Kind::Compressed);
    let mut caught = 0;
    for at in 0..e.len as usize {
        let mut b = g.bytes.clone();
        b[e.offset as usize + at] ^= 1 << (at % 8);
        let img = sc.open_ok(&b, "lz4 flip");
        let mut buf = vec![0u8; 4096];
        match img.read_at(&mut buf, 3 << 12) {
            Err(Error::Chunk { chunk: 3, .. }) => caught += 1,
            Ok(_) => assert!(
                buf == g.expected[3 << 12..4 << 12],
                "LZ4 chunk flipped at {at} read other bytes"
            ),
            other => panic!("LZ4 chunk flipped at {at}: {other:?}"),
        }
    }
    assert!(caught > e.len as usize * 9 / 10, "{caught} of {}", e.len);
}

/// The reader written from FORMAT.md alone (crates/interpose/tests/scripts/img_reader.py)
/// refuses the image at `path` for its chunk 2 too, for the same kind of reason as ours
/// (`needle`: our message): the two readers agree on what a hostile LZ4 block is. (It
/// needs no zstd module for an LZ4 image.)
fn spec_reader_refuses_chunk_2(path: &Path, needle: &str, what: &str) {
    // Its words for the same findings.
    let theirs = if needle.contains("checksum mismatch") || needle.contains("decompressed to") {
        needle
    } else {
        "LZ4"
    };
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../interpose/tests/scripts/img_reader.py");
    let python = if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    let out = std::process::Command::new(python)
        .arg(&script)
        .arg("check")
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("{what}: {python} {}: {e}", script.display()));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1)
            && err.contains("chunk 2 (bytes 8192..12288)")
            && err.contains(theirs),
        "{what}: img_reader.py check gave {:?}:\n{err}",
        out.status
    );
}

// ---------------------------------------------------------------------------------------
// Seeded random mutations.

/// What exercising a mutant found.
#[derive(Default)]
struct Tally {
    refused: usize,
    opened: usize,
    intact: usize,
    damaged_reads: usize,
}

/// Applies one random mutation to `b`, and says which.
fn mutate(b: &mut Vec<u8>, r: &mut Rng, tables: usize) -> String {
    let n = b.len();
    // Aim at the header, the tables and trailer, or anywhere.
    let at = match r.below(3) {
        0 => r.below(HEADER_SIZE.min(n).max(1)),
        1 => tables.min(n) + r.below(n.saturating_sub(tables).max(1)),
        _ => r.below(n.max(1)),
    };
    let interesting = [
        0u64,
        1,
        0x7f,
        0xff,
        4096,
        65536,
        n as u64,
        n as u64 - n.min(512) as u64,
        1 << 31,
        u32::MAX as u64,
        1 << 48,
        1 << 62,
        u64::MAX,
    ];
    match r.below(7) {
        0 if at < n => {
            let bit = r.below(8);
            b[at] ^= 1 << bit;
            format!("flip bit {bit} of byte {at}")
        }
        1 if at < n => {
            let v = [0u8, 0xff, 0x80, 1, r.next() as u8][r.below(5)];
            b[at] = v;
            format!("set byte {at} to {v:#x}")
        }
        2 => {
            b.truncate(at);
            format!("truncate to {at}")
        }
        3 => {
            let mut ins = vec![0u8; 1 + r.below(16)];
            r.fill(&mut ins);
            let len = ins.len();
            b.splice(at..at, ins);
            format!("insert {len} bytes at {at}")
        }
        4 => {
            let end = (at + 1 + r.below(64)).min(n);
            b[at.min(end)..end].fill(0);
            format!("zero {at}..{end}")
        }
        5 if at + 8 <= n => {
            let at = at & !7;
            let v = interesting[r.below(interesting.len())];
            b[at..at + 8].copy_from_slice(&v.to_le_bytes());
            format!("set u64 at {at} to {v:#x}")
        }
        _ if at + 4 <= n => {
            let at = at & !3;
            let v = interesting[r.below(interesting.len())] as u32;
            b[at..at + 4].copy_from_slice(&v.to_le_bytes());
            format!("set u32 at {at} to {v:#x}")
        }
        _ => "nothing".into(),
    }
}

/// Opens the mutant and reads all it can. Err: what went wrong (not a panic).
fn exercise(path: &Path, file_len: usize, orig: &Sample, t: &mut Tally) -> Result<(), String> {
    let (r, most) = peak(|| Image::open(path));
    if most > justified(file_len, 0) {
        return Err(format!("open allocated {most} bytes at once"));
    }
    let img = match r {
        Err(e) => {
            let msg = e.to_string();
            if msg.is_empty() || msg.len() > 1000 {
                return Err(format!("unclear error {e:?}"));
            }
            t.refused += 1;
            return Ok(());
        }
        Ok(img) => img,
    };
    t.opened += 1;
    let h = img.header().clone();
    let justified = justified(file_len, h.chunk_size() as usize);
    let (stats, most) = peak(|| img.chunk_stats());
    if most > justified {
        return Err(format!("chunk_stats allocated {most} bytes"));
    }
    stats.map_err(|e| format!("chunk_stats of an image that opened: {e}"))?;
    let n = h.virtual_size;
    let cs = h.chunk_size();
    // Whole chunks, parts, ranges across chunk boundaries, the last byte, all of it.
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for i in 0..h.chunk_count.min(64) {
        let s = i * cs;
        ranges.push((s, (s + cs).min(n) - s));
        ranges.push((s + 1, ((s + cs).min(n) - s).saturating_sub(2)));
        if s >= 512 {
            ranges.push((s - 512, 1024.min(n - (s - 512))));
        }
    }
    if n > 0 {
        ranges.push((n - 1, 1));
        ranges.push((0, n.min(4 << 20)));
    }
    let mut content: Vec<Option<Vec<u8>>> = Vec::new();
    for &(off, len) in &ranges {
        let mut buf = vec![0u8; len as usize];
        let (r, most) = peak(|| img.read_at(&mut buf, off));
        if most > justified {
            return Err(format!("read of {len} at {off} allocated {most} bytes"));
        }
        match r {
            Ok(_) => content.push(Some(buf)),
            Err(Error::OutOfRange { .. }) => return Err(format!("read {len} at {off} of {n}")),
            Err(_) => {
                t.damaged_reads += 1;
                content.push(None)
            }
        }
    }
    for (off, len) in [(n, 1usize), (n.saturating_sub(1), 2), (u64::MAX, 1)] {
        let mut buf = vec![0u8; len];
        match img.read_at(&mut buf, off) {
            Err(Error::OutOfRange { .. }) => {}
            other => return Err(format!("read {len} past the end at {off}: {other:?}")),
        }
    }
    let (z, most) = peak(|| img.zero_chunk_ranges(0..n));
    if most > justified {
        return Err(format!("zero_chunk_ranges allocated {most} bytes"));
    }
    z.map_err(|e| format!("zero_chunk_ranges: {e}"))?;
    let (report, most) = peak(|| img.verify(&mut |_| {}));
    if most > justified {
        return Err(format!("verify allocated {most} bytes"));
    }
    let report = report.map_err(|e| format!("verify of an image that opened: {e}"))?;
    if report.intact() {
        t.intact += 1;
        // A checksum hole would show here: intact, yet other bytes.
        if n != orig.expected.len() as u64 {
            return Err(format!(
                "verifies intact with size {n}, not {}",
                orig.expected.len()
            ));
        }
        for (&(off, len), c) in ranges.iter().zip(&content) {
            let want = &orig.expected[off as usize..(off + len) as usize];
            match c {
                Some(got) if got == want => {}
                Some(_) => return Err(format!("verifies intact, but {len} at {off} differ")),
                None => return Err(format!("verifies intact, but {len} at {off} fail")),
            }
        }
    }
    Ok(())
}

#[test]
fn random_mutations_never_panic_nor_pass_as_intact() {
    let (dir, s, _) = setup();
    let path = dir.path().join("mutant.img");
    const MUTANTS: u64 = 3_000;
    let mut t = Tally::default();
    let mut failures: Vec<String> = Vec::new();
    let mut resealed = 0;
    for seed in 0..MUTANTS {
        let mut r = Rng::new(seed + 1);
        let orig = &s[r.below(s.len())];
        let mut b = orig.bytes.clone();
        let mut log = Vec::new();
        for _ in 0..1 + r.below(3) {
            log.push(mutate(&mut b, &mut r, orig.header.index.offset as usize));
        }
        // A third of them get valid CRCs on the header and tables, to go past them.
        if r.below(3) == 0 {
            reseal_raw(&mut b);
            log.push("re-seal".into());
            resealed += 1;
        }
        std::fs::write(&path, &b).unwrap();
        let what = format!("seed {seed}, image {}: {}", orig.name, log.join(", "));
        match catch_unwind(AssertUnwindSafe(|| exercise(&path, b.len(), orig, &mut t))) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(format!("{what}: {e}")),
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failures.push(format!("{what}: PANIC {msg}"));
            }
        }
    }
    eprintln!(
        "{MUTANTS} mutants ({resealed} re-sealed): {} refused, {} opened ({} intact), {} damaged reads",
        t.refused, t.opened, t.intact, t.damaged_reads
    );
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The loop reaches past open often enough to mean something.
    assert!(t.opened > 200 && t.refused > 1000, "{} opened", t.opened);
}

// ---------------------------------------------------------------------------------------
// Malformed mapfiles through create.

#[test]
fn malformed_mapfiles_name_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    std::fs::write(&src, text(0x10000, 42)).unwrap();
    let cases: [(&[u8], usize, &[&str]); 10] = [
        (b"", 1, &["no status line"]),
        (b"# only\n# comments\n", 2, &["no status line"]),
        (b"\xef\xbb\xbf0 + 1\n", 1, &["byte-order mark"]),
        (b"0 + 1\n0 0x100 +\n0x200 0x100 -\n", 3, &["gap"]),
        (
            b"# c\n\n0x0 +\n0 0x1000 *\n0x1000 0x100 G\n",
            5,
            &["unknown block status `G`"],
        ),
        (b"0 + 1\n0 0x8000 +\n0x4000 0x100 -\n", 3, &["overlaps"]),
        (
            b"0 + 1\n# x\n0 0x20000 +\n",
            3,
            &[
                "is rescued (+) but the copy ends at 65536 bytes",
                "another file",
            ],
        ),
        (b"0 + 1\n0 0x100 +\n0x100 0x1\xff0 -\n", 3, &["UTF-8"]),
        (b"0 + 1\n0 99999999999999999999 +\n", 2, &["too large"]),
        (b"0 + 1\n0 0x100 + extra\n", 2, &["unexpected `extra`"]),
    ];
    for (k, (text, line, needles)) in cases.iter().enumerate() {
        let map = dir.path().join(format!("m{k}.map"));
        std::fs::write(&map, text).unwrap();
        let out = dir.path().join(format!("o{k}.img"));
        let opts = Options {
            chunk_shift: 12,
            threads: 1,
            mapfile: Some(map.clone()),
            ..Options::default()
        };
        let r = create(
            &src,
            Output::Path(&out),
            &opts,
            &|_, _| {},
            &AtomicBool::new(false),
        );
        let what = String::from_utf8_lossy(text);
        match r {
            Err(e @ Error::Mapfile { .. }) => {
                let msg = e.to_string();
                let Error::Mapfile {
                    path, line: got, ..
                } = &e
                else {
                    unreachable!()
                };
                assert_eq!(path, &map, "{what:?}");
                assert_eq!(got, line, "{what:?}: {msg}");
                assert!(
                    msg.starts_with(&format!("{}:{line}: ", map.display())),
                    "{msg}"
                );
                for n in needles.iter() {
                    assert!(msg.contains(n), "{what:?}: `{msg}` does not say `{n}`");
                }
            }
            other => panic!("{what:?}: {:?}", other.map(|r| r.file_len)),
        }
        assert!(!out.exists(), "{what:?}: an image was left behind");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("partial"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
