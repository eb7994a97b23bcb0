//! The reader's cache policy seen from outside: with a cache far smaller than the image,
//! partial reads of every kind of chunk return the right bytes, raw chunks are checked
//! once before their parts are read straight from the file, and `read_is_cheap` says true
//! only for reads that need no decoding.

mod common;
use common::{create_image, Rng};
use interpose_image::source::BlockSource;
use interpose_image::{Error, Image};

const CHUNK: usize = 4096; // chunk_shift 12

/// 48 chunks in a repeating pattern: random (stored raw), text (compressed), zeros.
fn source() -> Vec<u8> {
    let mut r = Rng::new(0x5eed);
    let mut data = Vec::new();
    for c in 0..48 {
        match c % 3 {
            0 => data.extend((0..CHUNK).map(|_| r.next() as u8)),
            1 => data.extend((0..CHUNK).map(|i| b"sector block image rescue\n"[(i + c) % 26])),
            _ => data.extend(std::iter::repeat_n(0u8, CHUNK)),
        }
    }
    data
}

#[test]
fn partial_reads_through_a_tiny_cache_return_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let data = source();
    let path = create_image(dir.path(), "src", &data, 12, None);
    let stats = Image::open(&path).unwrap().chunk_stats().unwrap();
    assert_eq!((stats.raw, stats.compressed, stats.zero), (16, 16, 16));
    // Room for two chunks (the cache keeps at least one per shard).
    let img = Image::open_with_cache(&path, 2 * CHUNK).unwrap();
    let mut r = Rng::new(7);
    for _ in 0..20_000 {
        let off = r.below(data.len());
        let len = 1 + r.below((data.len() - off).min(3 * CHUNK));
        let mut buf = vec![0xAAu8; len];
        img.read_at(&mut buf, off as u64).unwrap();
        assert!(buf == data[off..off + len], "read of {len} at {off}");
    }
}

#[test]
fn read_is_cheap_only_when_no_decoding_is_needed() {
    let dir = tempfile::tempdir().unwrap();
    let data = source();
    let path = create_image(dir.path(), "src", &data, 12, None);
    let img = Image::open_with_cache(&path, 64 * CHUNK).unwrap();
    let chunk = |c: usize| (c * CHUNK) as u64;
    // Zero chunks: always. Raw and compressed chunks: not before they were read.
    assert!(img.read_is_cheap(chunk(2), CHUNK));
    assert!(!img.read_is_cheap(chunk(0), 512));
    assert!(!img.read_is_cheap(chunk(1), 512));
    // After a partial read each is cached (or, raw, checked): cheap.
    let mut buf = [0u8; 512];
    img.read_at(&mut buf, chunk(0) + 100).unwrap();
    img.read_at(&mut buf, chunk(1) + 100).unwrap();
    assert!(img.read_is_cheap(chunk(0), CHUNK));
    assert!(img.read_is_cheap(chunk(1), CHUNK));
    assert!(img.read_is_cheap(chunk(0), 2 * CHUNK));
    assert!(img.read_is_cheap(chunk(1) + 10, 2 * CHUNK - 10));
    // A range reaching a chunk never read is not; nor is a long one (copying it is work
    // too), nor are empty or out-of-range ones.
    assert!(!img.read_is_cheap(chunk(2), 2 * CHUNK));
    assert!(!img.read_is_cheap(chunk(0), 3 * CHUNK));
    assert!(!img.read_is_cheap(chunk(0), 0));
    assert!(!img.read_is_cheap(data.len() as u64, 1));
    assert!(!img.read_is_cheap(u64::MAX - 1, 10));
}

#[test]
fn a_damaged_raw_chunk_fails_its_first_partial_read() {
    let dir = tempfile::tempdir().unwrap();
    let data = source();
    let path = create_image(dir.path(), "src", &data, 12, None);
    // Flip one byte inside raw chunk 3's stored bytes (raw chunks are stored as is, so
    // the source's bytes are found in the file).
    let mut bytes = std::fs::read(&path).unwrap();
    let needle = &data[3 * CHUNK..3 * CHUNK + 64];
    let at = bytes.windows(64).position(|w| w == needle).unwrap();
    bytes[at + 2000] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    let img = Image::open_with_cache(&path, 2 * CHUNK).unwrap();
    // A small read far from the damaged byte still checks the whole chunk.
    let mut buf = [0u8; 16];
    match img.read_at(&mut buf, (3 * CHUNK) as u64) {
        Err(Error::Chunk { chunk: 3, .. }) => {}
        other => panic!("expected a damaged chunk 3, got {other:?}"),
    }
    // It stays an error (the chunk was not marked as checked), and other chunks read.
    assert!(img.read_at(&mut buf, (3 * CHUNK + 100) as u64).is_err());
    assert!(!img.read_is_cheap((3 * CHUNK) as u64, 16));
    img.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, data[..16]);
}

/// Resident memory of this process, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The cache size is a bound, not memory taken at open: a 1 TiB bound on a 48-chunk image
/// opens in little memory (it used to size its maps for 2^28 chunks up front: about 9 GB
/// asked for, hundreds of MiB touched, an abort where memory was limited).
#[test]
fn a_large_cache_bound_takes_no_memory_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let data = source();
    let path = create_image(dir.path(), "src", &data, 12, None);
    let before = rss_kib();
    let img = Image::open_with_cache(&path, 1 << 40).unwrap();
    let mut buf = vec![0u8; data.len()];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf == data);
    let grown = rss_kib().saturating_sub(before);
    assert!(grown < 64 << 10, "opening grew the process by {grown} KiB");
}
