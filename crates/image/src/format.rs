//! The on-disk layout of an interpose image (docs/FORMAT.md is the spec; this module is
//! its one implementation): the header and its trailer copy, chunk index entries, bad
//! extents and the metadata block, each encoded and decoded with every field checked.
//!
//! ```text
//! 0            header (512 bytes; SEALED once the image is complete)
//! 512          chunk data, in chunk order, each chunk compressed (zstd or LZ4) or raw
//! index_off    chunk index: one 16-byte entry per chunk
//! extents_off  bad extents: 24 bytes each, sorted, disjoint
//! meta_off     metadata: a UTF-8 JSON object
//! end - 512    trailer: the sealed header again
//! ```

use std::ops::Range;

use crate::error::{Error, Result};

pub const MAGIC: [u8; 8] = *b"IPOSEIMG";
pub const VERSION_MAJOR: u16 = 1;
pub const VERSION_MINOR: u16 = 1;
/// Size of the header and of the trailer.
pub const HEADER_SIZE: usize = 512;
/// Chunk data starts right after the header.
pub const DATA_OFFSET: u64 = HEADER_SIZE as u64;
pub const INDEX_ENTRY_SIZE: usize = 16;
pub const EXTENT_SIZE: usize = 24;
pub const MIN_CHUNK_SHIFT: u32 = 12;
pub const MAX_CHUNK_SHIFT: u32 = 20;
pub const DEFAULT_CHUNK_SHIFT: u32 = 16;
/// Larger metadata blocks are refused (it is read whole into memory).
pub const MAX_META_LEN: u64 = 16 << 20;
/// Offsets in index entries have 48 bits.
pub const MAX_OFFSET: u64 = (1 << 48) - 1;

/// Header flag: the image was completely written (tables and trailer in place).
pub const FLAG_SEALED: u32 = 1;
/// Incompatible feature bit (format 1.1): compressed chunks are LZ4 blocks (`codec` 2).
/// Set exactly when the codec is LZ4, so a 1.0 reader refuses such an image by its
/// feature bits and not only by the codec value.
pub const INCOMPAT_LZ4: u64 = 1;
/// Incompatible feature bits this version understands: a reader refuses an image with
/// any other bit set.
pub const INCOMPAT_KNOWN: u64 = INCOMPAT_LZ4;

/// The compression used for chunks stored compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// One zstd frame per chunk: the smaller images.
    Zstd = 1,
    /// One LZ4 block per chunk: faster to decode (1.4 to 2.1 times as fast here, the
    /// block check of a chunk's first decode included), larger images.
    Lz4 = 2,
}

impl Codec {
    pub fn name(self) -> &'static str {
        match self {
            Codec::Zstd => "zstd",
            Codec::Lz4 => "lz4",
        }
    }

    /// Parses a codec's name as `name` prints it.
    pub fn from_name(name: &str) -> Option<Codec> {
        match name {
            "zstd" => Some(Codec::Zstd),
            "lz4" => Some(Codec::Lz4),
            _ => None,
        }
    }

    /// The `incompat` bits an image of this codec carries.
    pub fn incompat_bits(self) -> u64 {
        match self {
            Codec::Zstd => 0,
            Codec::Lz4 => INCOMPAT_LZ4,
        }
    }

    /// The minor version an image of this codec is written with: the lowest that
    /// defines it, so a zstd image stays a 1.0 image that 1.0 readers take.
    pub fn version_minor(self) -> u16 {
        match self {
            Codec::Zstd => 0,
            Codec::Lz4 => 1,
        }
    }

    /// Compression levels the builder takes for this codec, and its default.
    pub fn levels(self) -> (std::ops::RangeInclusive<i32>, i32) {
        match self {
            Codec::Zstd => (zstd::compression_level_range(), 3),
            // 1 is LZ4's fast mode, 2..=12 its high-compression (HC) levels.
            Codec::Lz4 => (1..=12, 1),
        }
    }
}

/// The fixed header (and trailer). Offsets are absolute file offsets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version_minor: u16,
    pub incompat: u64,
    pub compat: u64,
    pub flags: u32,
    pub virtual_size: u64,
    pub chunk_shift: u32,
    pub codec: Codec,
    pub uuid: [u8; 16],
    pub chunk_count: u64,
    pub data_len: u64,
    pub index: Section,
    pub extents: Section,
    pub meta: Section,
    /// BLAKE3 of the readable bytes of the image in order (bad bytes left out).
    pub blake3: [u8; 32],
    /// Bytes covered by bad or untried extents.
    pub bad_bytes: u64,
}

/// Where a table lies and the CRC32C of its bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Section {
    pub offset: u64,
    pub len: u64,
    pub crc: u32,
}

impl Section {
    pub fn range(&self) -> Range<u64> {
        self.offset..self.offset + self.len
    }
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}
fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn corrupt(what: impl Into<String>) -> Error {
    Error::Corrupt(what.into())
}

impl Header {
    pub fn chunk_size(&self) -> u64 {
        1 << self.chunk_shift
    }

    pub fn sealed(&self) -> bool {
        self.flags & FLAG_SEALED != 0
    }

    /// Length of chunk `i` (the last one may be short).
    pub fn chunk_len(&self, i: u64) -> usize {
        let start = i << self.chunk_shift;
        (self.virtual_size - start).min(self.chunk_size()) as usize
    }

    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&VERSION_MAJOR.to_le_bytes());
        b[10..12].copy_from_slice(&self.version_minor.to_le_bytes());
        b[12..16].copy_from_slice(&(HEADER_SIZE as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.incompat.to_le_bytes());
        b[24..32].copy_from_slice(&self.compat.to_le_bytes());
        b[32..40].copy_from_slice(&self.virtual_size.to_le_bytes());
        b[40..44].copy_from_slice(&self.chunk_shift.to_le_bytes());
        b[44..48].copy_from_slice(&(self.codec as u32).to_le_bytes());
        b[48..64].copy_from_slice(&self.uuid);
        b[64..72].copy_from_slice(&self.chunk_count.to_le_bytes());
        b[72..76].copy_from_slice(&self.flags.to_le_bytes());
        // 76..80 reserved
        b[80..88].copy_from_slice(&DATA_OFFSET.to_le_bytes());
        b[88..96].copy_from_slice(&self.data_len.to_le_bytes());
        for (at, s) in [(96, &self.index), (120, &self.extents), (144, &self.meta)] {
            b[at..at + 8].copy_from_slice(&s.offset.to_le_bytes());
            b[at + 8..at + 16].copy_from_slice(&s.len.to_le_bytes());
            b[at + 16..at + 20].copy_from_slice(&s.crc.to_le_bytes());
            // at+20..at+24 reserved
        }
        b[168..200].copy_from_slice(&self.blake3);
        b[200..208].copy_from_slice(&self.bad_bytes.to_le_bytes());
        let crc = crc32c::crc32c(&b[..HEADER_SIZE - 4]);
        b[HEADER_SIZE - 4..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks a header on its own (not yet against the file's size).
    pub fn decode(b: &[u8]) -> Result<Header> {
        if b.len() < HEADER_SIZE {
            return Err(Error::Truncated("the header".into()));
        }
        let b = &b[..HEADER_SIZE];
        if b[0..8] != MAGIC {
            return Err(Error::NotAnImage);
        }
        let major = le_u16(b, 8);
        let minor = le_u16(b, 10);
        if major != VERSION_MAJOR {
            return Err(Error::Unsupported(format!(
                "format version {major}.{minor} (this is {VERSION_MAJOR}.{VERSION_MINOR})"
            )));
        }
        let stored = le_u32(b, HEADER_SIZE - 4);
        let crc = crc32c::crc32c(&b[..HEADER_SIZE - 4]);
        if stored != crc {
            return Err(corrupt(format!(
                "header checksum mismatch (stored {stored:08x}, computed {crc:08x})"
            )));
        }
        if le_u32(b, 12) as usize != HEADER_SIZE {
            return Err(corrupt(format!("header size {} is not 512", le_u32(b, 12))));
        }
        let incompat = le_u64(b, 16);
        if incompat & !INCOMPAT_KNOWN != 0 {
            return Err(Error::Unsupported(format!(
                "incompatible features {:#x}",
                incompat & !INCOMPAT_KNOWN
            )));
        }
        let chunk_shift = le_u32(b, 40);
        if !(MIN_CHUNK_SHIFT..=MAX_CHUNK_SHIFT).contains(&chunk_shift) {
            return Err(corrupt(format!(
                "chunk size 2^{chunk_shift} outside 4 KiB..1 MiB"
            )));
        }
        let codec = match le_u32(b, 44) {
            1 => Codec::Zstd,
            2 => Codec::Lz4,
            c => return Err(Error::Unsupported(format!("codec {c}"))),
        };
        if incompat & INCOMPAT_LZ4 != codec.incompat_bits() {
            return Err(corrupt(format!(
                "codec {} with incompatible features {incompat:#x} (LZ4 and bit 0 go together)",
                codec.name()
            )));
        }
        let virtual_size = le_u64(b, 32);
        let chunk_count = le_u64(b, 64);
        let want_chunks = virtual_size.div_ceil(1 << chunk_shift);
        if chunk_count != want_chunks {
            return Err(corrupt(format!(
                "chunk count {chunk_count} does not match the size {virtual_size} (want {want_chunks})"
            )));
        }
        if le_u64(b, 80) != DATA_OFFSET {
            return Err(corrupt(format!(
                "data offset {} is not {DATA_OFFSET}",
                le_u64(b, 80)
            )));
        }
        let section = |at: usize| Section {
            offset: le_u64(b, at),
            len: le_u64(b, at + 8),
            crc: le_u32(b, at + 16),
        };
        let h = Header {
            version_minor: minor,
            incompat,
            compat: le_u64(b, 24),
            flags: le_u32(b, 72),
            virtual_size,
            chunk_shift,
            codec,
            uuid: b[48..64].try_into().unwrap(),
            chunk_count,
            data_len: le_u64(b, 88),
            index: section(96),
            extents: section(120),
            meta: section(144),
            blake3: b[168..200].try_into().unwrap(),
            bad_bytes: le_u64(b, 200),
        };
        Ok(h)
    }

    /// Checks a sealed header's sections against each other and the file's length:
    /// data, index, extents, metadata and trailer follow each other without gaps or
    /// overlaps, so a table can never be read from outside its place.
    pub fn check_layout(&self, file_len: u64) -> Result<()> {
        if !self.sealed() {
            return Err(Error::Incomplete);
        }
        let want_index = self
            .chunk_count
            .checked_mul(INDEX_ENTRY_SIZE as u64)
            .ok_or_else(|| corrupt("chunk count overflows"))?;
        if self.index.len != want_index {
            return Err(corrupt(format!(
                "index length {} is not {} chunks x {INDEX_ENTRY_SIZE}",
                self.index.len, self.chunk_count
            )));
        }
        if !self.extents.len.is_multiple_of(EXTENT_SIZE as u64) {
            return Err(corrupt(format!(
                "bad-extent table length {} is not a multiple of {EXTENT_SIZE}",
                self.extents.len
            )));
        }
        if self.meta.len > MAX_META_LEN {
            return Err(corrupt(format!(
                "metadata length {} over the limit {MAX_META_LEN}",
                self.meta.len
            )));
        }
        let mut at = DATA_OFFSET;
        for (name, start, len) in [
            ("chunk data", DATA_OFFSET, self.data_len),
            ("chunk index", self.index.offset, self.index.len),
            ("bad-extent table", self.extents.offset, self.extents.len),
            ("metadata", self.meta.offset, self.meta.len),
        ] {
            if start != at {
                return Err(corrupt(format!(
                    "{name} at offset {start}, expected {at} (sections overlap or leave gaps)"
                )));
            }
            at = start
                .checked_add(len)
                .filter(|&e| e <= file_len)
                .ok_or_else(|| {
                    Error::Truncated(format!(
                        "{name} ({len} bytes at {start}) runs past the end of the file ({file_len} bytes)"
                    ))
                })?;
        }
        let want_len = at + HEADER_SIZE as u64;
        if file_len != want_len {
            return Err(if file_len < want_len {
                Error::Truncated(format!(
                    "the trailer: file is {file_len} bytes, the header says {want_len}"
                ))
            } else {
                corrupt(format!(
                    "{} bytes after the trailer (file is {file_len} bytes, the header says {want_len})",
                    file_len - want_len
                ))
            });
        }
        if self.data_len > MAX_OFFSET {
            return Err(corrupt("chunk data region over 2^48 bytes"));
        }
        Ok(())
    }
}

/// How a chunk is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// All zero (or wholly bad): no data stored.
    Zero = 0,
    /// Stored as is (`len` = the chunk's length).
    Raw = 1,
    /// Compressed with the image's codec.
    Compressed = 2,
}

/// Chunk flag: some bytes of the chunk are in bad or untried extents.
pub const CHUNK_PARTLY_BAD: u8 = 1;
/// Chunk flag: every byte of the chunk is in bad or untried extents.
pub const CHUNK_ALL_BAD: u8 = 2;

/// One chunk index entry (16 bytes):
/// `u64 offset (bits 0..48) | kind << 48 | flags << 56`, `u32 stored length`,
/// `u32 CRC32C of the chunk's uncompressed bytes` (0 for zero chunks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub offset: u64,
    pub len: u32,
    pub crc: u32,
    pub kind: Kind,
    pub flags: u8,
}

impl Entry {
    pub fn encode(&self) -> [u8; INDEX_ENTRY_SIZE] {
        let mut b = [0u8; INDEX_ENTRY_SIZE];
        let word = self.offset | (self.kind as u64) << 48 | (self.flags as u64) << 56;
        b[0..8].copy_from_slice(&word.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..16].copy_from_slice(&self.crc.to_le_bytes());
        b
    }

    /// Decodes entry `i` and checks it against the header: known kind and flags, a
    /// stored length that fits the chunk, data inside the chunk data region.
    pub fn decode(b: &[u8], i: u64, h: &Header) -> Result<Entry> {
        let word = le_u64(b, 0);
        let offset = word & MAX_OFFSET;
        let kind = match (word >> 48) & 0xff {
            0 => Kind::Zero,
            1 => Kind::Raw,
            2 => Kind::Compressed,
            k => return Err(corrupt(format!("chunk {i}: unknown kind {k}"))),
        };
        let flags = (word >> 56) as u8;
        if flags & !(CHUNK_PARTLY_BAD | CHUNK_ALL_BAD) != 0 {
            return Err(corrupt(format!("chunk {i}: unknown flags {flags:#x}")));
        }
        let e = Entry {
            offset,
            len: le_u32(b, 8),
            crc: le_u32(b, 12),
            kind,
            flags,
        };
        let chunk_len = h.chunk_len(i) as u64;
        match kind {
            Kind::Zero if e.len != 0 || e.offset != 0 => {
                return Err(corrupt(format!(
                    "chunk {i}: zero chunk with data ({} bytes at {})",
                    e.len, e.offset
                )))
            }
            Kind::Raw if e.len as u64 != chunk_len => {
                return Err(corrupt(format!(
                    "chunk {i}: raw chunk of {} bytes, the chunk has {chunk_len}",
                    e.len
                )))
            }
            Kind::Compressed if e.len == 0 || e.len as u64 > compress_bound(chunk_len) => {
                return Err(corrupt(format!(
                    "chunk {i}: compressed length {} impossible for a {chunk_len}-byte chunk",
                    e.len
                )))
            }
            _ => {}
        }
        if kind != Kind::Zero {
            let end = DATA_OFFSET + h.data_len;
            if e.offset < DATA_OFFSET || e.offset + e.len as u64 > end {
                return Err(corrupt(format!(
                    "chunk {i}: data at {}..{} outside the chunk data region {DATA_OFFSET}..{end}",
                    e.offset,
                    e.offset + e.len as u64
                )));
            }
        }
        Ok(e)
    }
}

/// The most a chunk of `len` bytes may take compressed: the chunk's own length (a
/// writer stores a chunk raw unless compressing makes it strictly smaller; readers
/// accept up to equal).
pub fn compress_bound(len: u64) -> u64 {
    len
}

/// What is known about a range of bytes that is not good data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExtentState {
    /// Tried and failed (ddrescue `-`, `/`, `*`).
    Bad = 1,
    /// Never read (ddrescue `?`).
    Untried = 2,
}

impl ExtentState {
    pub fn name(self) -> &'static str {
        match self {
            ExtentState::Bad => "bad",
            ExtentState::Untried => "untried",
        }
    }
}

/// A byte range of the image whose contents are not real data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BadExtent {
    pub offset: u64,
    pub length: u64,
    pub state: ExtentState,
}

impl BadExtent {
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }

    pub fn encode(&self) -> [u8; EXTENT_SIZE] {
        let mut b = [0u8; EXTENT_SIZE];
        b[0..8].copy_from_slice(&self.offset.to_le_bytes());
        b[8..16].copy_from_slice(&self.length.to_le_bytes());
        b[16..20].copy_from_slice(&(self.state as u32).to_le_bytes());
        b
    }
}

/// Decodes the bad-extent table: every extent non-empty, inside the image, sorted and
/// disjoint from the one before.
pub fn decode_extents(b: &[u8], virtual_size: u64) -> Result<Vec<BadExtent>> {
    let mut out: Vec<BadExtent> = Vec::with_capacity(b.len() / EXTENT_SIZE);
    for (i, e) in b.chunks_exact(EXTENT_SIZE).enumerate() {
        let state = match le_u32(e, 16) {
            1 => ExtentState::Bad,
            2 => ExtentState::Untried,
            s => return Err(corrupt(format!("bad extent {i}: unknown state {s}"))),
        };
        if le_u32(e, 20) != 0 {
            return Err(corrupt(format!("bad extent {i}: reserved field set")));
        }
        let x = BadExtent {
            offset: le_u64(e, 0),
            length: le_u64(e, 8),
            state,
        };
        if x.length == 0
            || x.offset
                .checked_add(x.length)
                .is_none_or(|end| end > virtual_size)
        {
            return Err(corrupt(format!(
                "bad extent {i} ({} bytes at {}) empty or outside the image ({virtual_size} bytes)",
                x.length, x.offset
            )));
        }
        if let Some(prev) = out.last() {
            if x.offset < prev.end() {
                return Err(corrupt(format!(
                    "bad extent {i} at {} overlaps or precedes the one before (ending at {})",
                    x.offset,
                    prev.end()
                )));
            }
        }
        out.push(x);
    }
    Ok(out)
}

/// The metadata block: a JSON object. `user` holds the --meta KEY=VALUE pairs.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Metadata {
    pub source: String,
    /// RFC 3339, UTC.
    pub created: String,
    /// "interpose VERSION".
    pub tool: String,
    /// BLAKE3 of the readable bytes, hex (the header holds the same in binary).
    pub blake3: String,
    #[serde(default)]
    pub user: std::collections::BTreeMap<String, String>,
}

impl Metadata {
    pub fn decode(b: &[u8]) -> Result<Metadata> {
        // All of it UTF-8, also the values of keys this version does not know.
        let text = std::str::from_utf8(b)
            .map_err(|e| corrupt(format!("metadata is not valid UTF-8: {e}")))?;
        // An object (FORMAT.md §10): serde would also take the fields as an array.
        if !text
            .trim_start_matches([' ', '\t', '\n', '\r'])
            .starts_with('{')
        {
            return Err(corrupt("metadata is not a JSON object"));
        }
        serde_json::from_str(text).map_err(|e| corrupt(format!("metadata is not valid: {e}")))
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            version_minor: 0,
            incompat: 0,
            compat: 0,
            flags: FLAG_SEALED,
            virtual_size: 100_000,
            chunk_shift: 16,
            codec: Codec::Zstd,
            uuid: [7; 16],
            chunk_count: 2,
            data_len: 1000,
            index: Section {
                offset: 1512,
                len: 32,
                crc: 1,
            },
            extents: Section {
                offset: 1544,
                len: 24,
                crc: 2,
            },
            meta: Section {
                offset: 1568,
                len: 10,
                crc: 3,
            },
            blake3: [9; 32],
            bad_bytes: 512,
        }
    }

    #[test]
    fn header_round_trip_and_every_bit_flip_is_caught() {
        let lz4 = Header {
            codec: Codec::Lz4,
            incompat: INCOMPAT_LZ4,
            version_minor: Codec::Lz4.version_minor(),
            ..header()
        };
        for h in [header(), lz4] {
            let b = h.encode();
            assert_eq!(Header::decode(&b).unwrap(), h);
            h.check_layout(1578 + 512).unwrap();
            for bit in 0..HEADER_SIZE * 8 {
                let mut c = b;
                c[bit / 8] ^= 1 << (bit % 8);
                assert!(
                    Header::decode(&c).is_err(),
                    "{:?}: flip of bit {bit} went unnoticed",
                    h.codec
                );
            }
        }
    }

    #[test]
    fn codec_names_levels_and_feature_bits() {
        for c in [Codec::Zstd, Codec::Lz4] {
            assert_eq!(Codec::from_name(c.name()), Some(c));
            let (levels, default) = c.levels();
            assert!(levels.contains(&default));
        }
        assert_eq!(Codec::from_name("gzip"), None);
        assert_eq!(
            Codec::Zstd.incompat_bits() | Codec::Lz4.incompat_bits(),
            INCOMPAT_KNOWN
        );
        assert_eq!(Codec::Lz4.version_minor(), VERSION_MINOR);
    }

    #[test]
    fn layout_errors_name_the_section() {
        let h = header();
        let e = h.check_layout(1520).unwrap_err().to_string();
        assert!(e.contains("chunk index"), "{e}");
        let e = h.check_layout(1578 + 600).unwrap_err().to_string();
        assert!(e.contains("after the trailer"), "{e}");
        let mut g = h.clone();
        g.extents.offset += 1;
        let e = g.check_layout(1578 + 512).unwrap_err().to_string();
        assert!(e.contains("bad-extent table"), "{e}");
    }

    #[test]
    fn entries_are_checked_against_the_header() {
        let h = header();
        let e = Entry {
            offset: 600,
            len: 300,
            crc: 5,
            kind: Kind::Compressed,
            flags: CHUNK_PARTLY_BAD,
        };
        assert_eq!(Entry::decode(&e.encode(), 0, &h).unwrap(), e);
        let far = Entry { offset: 1400, ..e };
        assert!(Entry::decode(&far.encode(), 0, &h).is_err());
        let raw_short = Entry {
            kind: Kind::Raw,
            ..e
        };
        assert!(Entry::decode(&raw_short.encode(), 0, &h).is_err());
    }

    #[test]
    fn extents_must_be_sorted_disjoint_and_inside() {
        let x = |offset, length| BadExtent {
            offset,
            length,
            state: ExtentState::Bad,
        };
        let enc = |v: &[BadExtent]| v.iter().flat_map(|e| e.encode()).collect::<Vec<u8>>();
        assert_eq!(
            decode_extents(&enc(&[x(0, 512), x(1024, 512)]), 4096)
                .unwrap()
                .len(),
            2
        );
        assert!(decode_extents(&enc(&[x(1024, 512), x(0, 512)]), 4096).is_err());
        assert!(decode_extents(&enc(&[x(0, 1024), x(512, 512)]), 4096).is_err());
        assert!(decode_extents(&enc(&[x(4000, 512)]), 4096).is_err());
        assert!(decode_extents(&enc(&[x(u64::MAX, 2)]), 4096).is_err());
        assert!(decode_extents(&enc(&[x(0, 0)]), 4096).is_err());
    }
    #[test]
    fn metadata_is_an_object_not_an_array_of_its_fields() {
        let m = Metadata {
            source: "disk.raw".into(),
            created: "2026-12-01T00:00:00Z".into(),
            tool: "interpose 0.1.0".into(),
            blake3: "00".repeat(32),
            user: Default::default(),
        };
        let object = serde_json::to_vec(&m).unwrap();
        assert_eq!(Metadata::decode(&object).unwrap(), m);
        let array = serde_json::to_vec(&(&m.source, &m.created, &m.tool, &m.blake3)).unwrap();
        let e = Metadata::decode(&array).unwrap_err().to_string();
        assert!(e.contains("not a JSON object"), "{e}");
        let e = Metadata::decode(b" \n{\"source\": 1}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("metadata is not valid"), "{e}");
    }
}
