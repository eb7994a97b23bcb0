//! Reading images: open (every table checked before anything is served), read any range
//! through a bounded, sharded cache of decompressed chunks, verify everything.

use std::cell::RefCell;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::format::{
    self, BadExtent, Codec, Entry, Header, Kind, Metadata, Section, DATA_OFFSET, HEADER_SIZE,
    INDEX_ENTRY_SIZE,
};
use crate::source::{bad_within, check_range, file_name, zero_bad, BlockSource, ReadOutcome};

/// Default bound of the decompressed-chunk cache.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;
const SHARDS: usize = 16;

/// An open image. Cheap to share between threads (`&Image` is all a read needs).
pub struct Image {
    file: File,
    path: PathBuf,
    header: Header,
    /// The chunk index as stored (entries decoded on use; all checked at open).
    index: Vec<u8>,
    extents: Vec<BadExtent>,
    meta: Metadata,
    cache: Cache,
    /// One bit per chunk, set once it was checked: a raw chunk whose checksum matched, so
    /// that parts of it can be read straight from the file (see
    /// [`Image::copy_from_chunk`]); an LZ4 chunk whose block passed [`lz4_block_check`]
    /// (and its checksum), which later decodes of it skip.
    checked: Box<[AtomicU64]>,
}

/// Counts of chunks by how they are stored.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ChunkStats {
    pub total: u64,
    pub zero: u64,
    pub raw: u64,
    pub compressed: u64,
    /// Chunks with at least one bad or untried byte (of any kind above).
    pub bad: u64,
    /// Of those, chunks with no real byte at all.
    pub all_bad: u64,
    /// Bytes of chunk data stored.
    pub stored_bytes: u64,
}

/// What [`Image::verify`] found.
#[derive(Debug, Default)]
pub struct VerifyReport {
    /// Chunks that failed (bad checksum, undecodable, ...), with what is wrong.
    pub damaged: Vec<Error>,
    /// The whole-image hash matches the header's and the metadata's.
    pub hash_ok: bool,
    pub computed_blake3: String,
    pub problems: Vec<String>,
}

impl VerifyReport {
    pub fn intact(&self) -> bool {
        self.damaged.is_empty() && self.hash_ok && self.problems.is_empty()
    }
}

/// A vector of `len` default values for the image's `what`, or an error where the memory
/// cannot be had: a file's length bounds what an image asks for, but a sparse file is as
/// long as it claims to be (a 64 GiB index in 8 KiB of disk aborted the process). More
/// than the memory available now is refused before asking: the kernel may grant more
/// (it overcommits), and filling it would end in the OOM killer.
fn alloc<T: Default + Clone>(len: u64, what: &str) -> Result<Vec<T>> {
    let bytes = len.saturating_mul(std::mem::size_of::<T>() as u64);
    let mut v = Vec::new();
    usize::try_from(len)
        .ok()
        .filter(|_| available_memory().is_none_or(|available| bytes <= available))
        .and_then(|n| v.try_reserve_exact(n).ok().map(|()| n))
        .map(|n| {
            v.resize(n, T::default());
            v
        })
        .ok_or_else(|| {
            Error::Unsupported(format!(
                "its {what} needs {:.1} GiB of memory, more than can be had here",
                bytes as f64 / (1u64 << 30) as f64
            ))
        })
}

/// The `Frame_Content_Size` a zstd frame's header carries, if any (RFC 8878 §3.1.1.1).
/// `frame` starts with the magic number and is a whole frame.
fn zstd_content_size(frame: &[u8]) -> Option<u64> {
    let descriptor = *frame.get(4)?;
    let single_segment = descriptor & 0x20 != 0;
    let field_len = match descriptor >> 6 {
        0 if single_segment => 1,
        0 => return None,
        1 => 2,
        2 => 4,
        _ => 8,
    };
    let dictionary_id_len = [0, 1, 2, 4][(descriptor & 3) as usize];
    let at = 5 + usize::from(!single_segment) + dictionary_id_len;
    let field = frame.get(at..at + field_len)?;
    let mut bytes = [0u8; 8];
    bytes[..field_len].copy_from_slice(field);
    let value = u64::from_le_bytes(bytes);
    // A two-byte field holds the size less 256.
    Some(if field_len == 2 { value + 256 } else { value })
}

/// The memory available now in bytes (`MemAvailable` of /proc/meminfo), if it can be read.
fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse::<u64>()
        .ok()?;
    kib.checked_mul(1024)
}

fn read_section(file: &File, path: &Path, s: &Section, name: &str) -> Result<Vec<u8>> {
    // The length was checked against the file's size, which a sparse file can fake.
    let mut buf = alloc::<u8>(s.len, name)?;
    file.read_exact_at(&mut buf, s.offset)
        .map_err(|e| Error::io(format!("reading the {name} of {}", path.display()), e))?;
    let crc = crc32c::crc32c(&buf);
    if crc != s.crc {
        return Err(Error::Corrupt(format!(
            "{name} checksum mismatch (stored {:08x}, computed {crc:08x})",
            s.crc
        )));
    }
    Ok(buf)
}

impl Image {
    pub fn open(path: &Path) -> Result<Image> {
        Image::open_with_cache(path, DEFAULT_CACHE_BYTES)
    }

    /// Opens an image whose decompressed-chunk cache holds at most about `cache_bytes`.
    pub fn open_with_cache(path: &Path, cache_bytes: usize) -> Result<Image> {
        let file = File::open(path).map_err(|e| Error::io(format!("{}", path.display()), e))?;
        let file_len = file
            .metadata()
            .map_err(|e| Error::io(format!("{}", path.display()), e))?
            .len();
        let header = Image::read_header(&file, path, file_len)?;
        header.check_layout(file_len)?;
        let index = read_section(&file, path, &header.index, "chunk index")?;
        let extents_raw = read_section(&file, path, &header.extents, "bad-extent table")?;
        let extents = format::decode_extents(&extents_raw, header.virtual_size)?;
        let bad_bytes: u64 = extents.iter().map(|e| e.length).sum();
        if bad_bytes != header.bad_bytes {
            return Err(Error::Corrupt(format!(
                "the bad extents cover {bad_bytes} bytes, the header says {}",
                header.bad_bytes
            )));
        }
        let meta = Metadata::decode(&read_section(&file, path, &header.meta, "metadata")?)?;
        let image = Image {
            file,
            path: path.to_path_buf(),
            cache: Cache::new(cache_bytes, header.chunk_size() as usize),
            checked: alloc::<u64>(header.chunk_count.div_ceil(64), "table of checked chunks")?
                .into_iter()
                .map(AtomicU64::new)
                .collect(),
            header,
            index,
            extents,
            meta,
        };
        image.check_index()?;
        Ok(image)
    }

    /// The header at 0 if sealed (then the trailer must be the same bytes), otherwise
    /// the trailer (an image streamed where the header could not be rewritten).
    fn read_header(file: &File, path: &Path, file_len: u64) -> Result<Header> {
        let mut head = [0u8; HEADER_SIZE];
        if file_len < HEADER_SIZE as u64 {
            let mut magic = vec![0u8; file_len as usize];
            let _ = file.read_exact_at(&mut magic, 0);
            if magic.len() < 8 || magic[..8] != format::MAGIC {
                return Err(Error::NotAnImage);
            }
            return Err(Error::Truncated(format!(
                "the header: the file has {file_len} bytes"
            )));
        }
        file.read_exact_at(&mut head, 0)
            .map_err(|e| Error::io(format!("reading the header of {}", path.display()), e))?;
        let h = Header::decode(&head)?;
        if file_len < 2 * HEADER_SIZE as u64 {
            return Err(if h.sealed() {
                Error::Truncated(format!(
                    "no room for the trailer: the file has {file_len} bytes (was it cut short?)"
                ))
            } else {
                Error::Incomplete
            });
        }
        let mut tail = [0u8; HEADER_SIZE];
        file.read_exact_at(&mut tail, file_len - HEADER_SIZE as u64)
            .map_err(|e| Error::io(format!("reading the trailer of {}", path.display()), e))?;
        if h.sealed() {
            if tail != head {
                return Err(match Header::decode(&tail) {
                    Err(Error::NotAnImage) => no_trailer(&h, file_len),
                    Err(Error::Corrupt(e)) => Error::Corrupt(format!("the trailer: {e}")),
                    Err(e) => Error::Corrupt(format!("the trailer: {e}")),
                    Ok(_) => Error::Corrupt("the trailer differs from the header".into()),
                });
            }
            return Ok(h);
        }
        let t = match Header::decode(&tail) {
            Ok(t) => t,
            Err(Error::NotAnImage) => return Err(Error::Incomplete),
            Err(Error::Corrupt(e)) => return Err(Error::Corrupt(format!("the trailer: {e}"))),
            Err(e) => return Err(Error::Corrupt(format!("the trailer: {e}"))),
        };
        if !t.sealed()
            || t.uuid != h.uuid
            || t.virtual_size != h.virtual_size
            || t.chunk_shift != h.chunk_shift
            || t.codec != h.codec
        {
            return Err(Error::Corrupt(
                "the trailer does not belong to this image's header".into(),
            ));
        }
        Ok(t)
    }

    /// Every entry valid, and chunk data in chunk order without overlaps: a hostile index
    /// cannot make two chunks share bytes or point outside the data region.
    fn check_index(&self) -> Result<()> {
        let mut next = DATA_OFFSET;
        for i in 0..self.header.chunk_count {
            let e = self.entry(i)?;
            if e.kind == Kind::Zero {
                continue;
            }
            if e.offset < next {
                return Err(Error::Corrupt(format!(
                    "chunk {i}: data at {} overlaps or precedes the previous chunk's (ending at {next})",
                    e.offset
                )));
            }
            next = e.offset + e.len as u64;
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn metadata(&self) -> &Metadata {
        &self.meta
    }

    pub fn extents(&self) -> &[BadExtent] {
        &self.extents
    }

    pub fn entry(&self, i: u64) -> Result<Entry> {
        if i >= self.header.chunk_count {
            return Err(Error::OutOfRange {
                offset: i << self.header.chunk_shift,
                len: 0,
                size: self.header.virtual_size,
            });
        }
        let at = i as usize * INDEX_ENTRY_SIZE;
        Entry::decode(&self.index[at..at + INDEX_ENTRY_SIZE], i, &self.header)
    }

    /// Size of the image file.
    pub fn file_len(&self) -> u64 {
        self.header.meta.offset + self.header.meta.len + HEADER_SIZE as u64
    }

    pub fn chunk_stats(&self) -> Result<ChunkStats> {
        let mut s = ChunkStats {
            total: self.header.chunk_count,
            ..ChunkStats::default()
        };
        for i in 0..self.header.chunk_count {
            let e = self.entry(i)?;
            match e.kind {
                Kind::Zero => s.zero += 1,
                Kind::Raw => s.raw += 1,
                Kind::Compressed => s.compressed += 1,
            }
            if e.flags & (format::CHUNK_PARTLY_BAD | format::CHUNK_ALL_BAD) != 0 {
                s.bad += 1;
            }
            if e.flags & format::CHUNK_ALL_BAD != 0 {
                s.all_bad += 1;
            }
            s.stored_bytes += e.len as u64;
        }
        Ok(s)
    }

    fn chunk_range(&self, i: u64) -> (u64, u64) {
        let start = i << self.header.chunk_shift;
        (start, start + self.header.chunk_len(i) as u64)
    }

    fn damaged(&self, i: u64, what: String) -> Error {
        let (start, end) = self.chunk_range(i);
        Error::Chunk {
            chunk: i,
            start,
            end,
            what,
        }
    }

    /// Decodes one zstd-compressed chunk into `out`; returns the bytes it produced.
    fn unzstd(&self, i: u64, stored: &[u8], out: &mut [u8]) -> Result<usize> {
        // Exactly one zstd frame filling the stored bytes (libzstd would also take
        // several frames, or skippable ones).
        match zstd::zstd_safe::find_frame_compressed_size(stored) {
            Ok(n) if n == stored.len() && stored.starts_with(&ZSTD_MAGIC) => {}
            _ => return Err(self.damaged(i, "stored bytes are not exactly one zstd frame".into())),
        }
        // libzstd reads a content size of 2^64-1 as "not given" and checks no other.
        match zstd_content_size(stored) {
            Some(size) if size != out.len() as u64 => {
                return Err(self.damaged(
                    i,
                    format!(
                        "the zstd frame claims {size} bytes of content, the chunk has {}",
                        out.len()
                    ),
                ))
            }
            _ => {}
        }
        DECOMPRESSOR.with(|d| {
            d.borrow_mut()
                .decompress_to_buffer(stored, out)
                .map_err(|err| self.damaged(i, format!("zstd: {err}")))
        })
    }

    /// Decodes chunk `i` into `out` (exactly the chunk's length), checking its CRC.
    fn decode_chunk(&self, i: u64, e: &Entry, out: &mut [u8]) -> Result<()> {
        // An LZ4 block walked now (§8.2), to be marked once its CRC matched.
        let mut walked = false;
        match e.kind {
            Kind::Zero => {
                out.fill(0);
                return Ok(());
            }
            Kind::Raw => {
                self.file
                    .read_exact_at(out, e.offset)
                    .map_err(|err| Error::io(format!("reading chunk {i}"), err))?;
            }
            Kind::Compressed => {
                STORED.with(|stored| -> Result<()> {
                    let mut stored = stored.borrow_mut();
                    stored.resize(e.len as usize, 0);
                    self.file
                        .read_exact_at(&mut stored, e.offset)
                        .map_err(|err| Error::io(format!("reading chunk {i}"), err))?;
                    let n = match self.header.codec {
                        Codec::Zstd => self.unzstd(i, &stored, out)?,
                        // A bare LZ4 block, checked against FORMAT.md §8.2 first: liblz4's
                        // safe decoder never writes past `out`, but takes offset 0 and
                        // some blocks that break the end rules.
                        Codec::Lz4 => {
                            if !self.is_checked(i) {
                                lz4_block_check(&stored, out.len())
                                    .map_err(|what| self.damaged(i, what))?;
                                walked = true;
                            }
                            let want = out.len() as i32;
                            lz4::block::decompress_to_buffer(&stored, Some(want), out)
                                .map_err(|err| self.damaged(i, format!("lz4: {err}")))?
                        }
                    };
                    if n != out.len() {
                        return Err(self.damaged(
                            i,
                            format!("decompressed to {n} bytes, the chunk has {}", out.len()),
                        ));
                    }
                    Ok(())
                })?;
            }
        }
        let crc = crc32c::crc32c(out);
        if crc != e.crc {
            return Err(self.damaged(
                i,
                format!(
                    "checksum mismatch (stored {:08x}, computed {crc:08x})",
                    e.crc
                ),
            ));
        }
        if walked {
            // Only then: every later decode would write the shared bitmap otherwise.
            self.mark_checked(i);
        }
        Ok(())
    }

    /// Copies `out.len()` bytes at `at` within chunk `i` out of the cache, decoding the
    /// chunk into it first if needed.
    ///
    /// Raw chunks cost no decoding, only their checksum: once a raw chunk was read whole
    /// and its checksum matched, parts of it are read straight from the file, and it
    /// enters the cache only while the cache has room. A full cache then holds the chunks
    /// that are expensive to get again (compressed ones) rather than copies of bytes the
    /// page cache has anyway.
    fn copy_from_chunk(&self, i: u64, e: &Entry, at: usize, out: &mut [u8]) -> Result<()> {
        if self.cache.copy(i, at, out) {
            return Ok(());
        }
        let raw = e.kind == Kind::Raw;
        if raw && self.is_checked(i) {
            return self
                .file
                .read_exact_at(out, e.offset + at as u64)
                .map_err(|err| Error::io(format!("reading chunk {i}"), err));
        }
        // Decoded into a buffer the cache evicted earlier, when there is one: once the
        // cache is full, misses allocate nothing (and the heap does not fragment).
        let len = self.header.chunk_len(i);
        let mut buf = self
            .cache
            .spare(i, len)
            .unwrap_or_else(|| vec![0u8; len].into_boxed_slice());
        if let Err(err) = self.decode_chunk(i, e, &mut buf) {
            self.cache.recycle(i, buf);
            return Err(err);
        }
        out.copy_from_slice(&buf[at..at + out.len()]);
        if raw {
            self.mark_checked(i);
            self.cache.put_if_room(i, buf);
        } else {
            self.cache.put(i, buf);
        }
        Ok(())
    }

    fn is_checked(&self, i: u64) -> bool {
        self.checked[(i / 64) as usize].load(Ordering::Relaxed) & (1 << (i % 64)) != 0
    }

    fn mark_checked(&self, i: u64) {
        self.checked[(i / 64) as usize].fetch_or(1 << (i % 64), Ordering::Relaxed);
    }

    /// Reads `buf.len()` bytes at `offset`. Whole chunks are decoded straight into `buf`
    /// (a long sequential read does not churn the cache); parts of chunks go through it.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<ReadOutcome> {
        check_range(offset, buf.len(), self.header.virtual_size)?;
        let shift = self.header.chunk_shift;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let i = pos >> shift;
            let (start, end) = self.chunk_range(i);
            let n = ((end - pos) as usize).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            let e = self.entry(i)?;
            if e.kind == Kind::Zero {
                out.fill(0);
            } else if pos == start && n as u64 == end - start {
                // A whole chunk: from the cache if there, else decoded straight into
                // the caller's buffer without filling the cache.
                if !self.cache.copy(i, 0, out) {
                    self.decode_chunk(i, &e, out)?;
                }
            } else {
                self.copy_from_chunk(i, &e, (pos - start) as usize, out)?;
            }
            done += n;
        }
        let bad = bad_within(&self.extents, offset, buf.len() as u64);
        // Stored bad bytes are zero already; this keeps that promise for any image.
        zero_bad(buf, offset, &bad);
        Ok(ReadOutcome { bad })
    }

    /// Ranges of zero chunks inside `range`, merged.
    pub fn zero_chunk_ranges(&self, range: Range<u64>) -> Result<Vec<Range<u64>>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        let range = range.start..range.end.min(self.header.virtual_size);
        if range.start >= range.end {
            return Ok(out);
        }
        let shift = self.header.chunk_shift;
        let last = (range.end - 1).min(self.header.virtual_size.saturating_sub(1)) >> shift;
        for i in range.start >> shift..=last {
            if self.entry(i)?.kind != Kind::Zero {
                continue;
            }
            let (s, e) = self.chunk_range(i);
            let (s, e) = (s.max(range.start), e.min(range.end));
            match out.last_mut() {
                Some(r) if r.end == s => r.end = e,
                _ => out.push(s..e),
            }
        }
        Ok(out)
    }

    /// Checks every chunk and the whole-image hash; `progress` gets bytes done so far.
    /// Damage to the header or tables fails [`Image::open`] already.
    pub fn verify(&self, progress: &mut dyn FnMut(u64)) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; self.header.chunk_size() as usize];
        for i in 0..self.header.chunk_count {
            let (start, end) = self.chunk_range(i);
            let out = &mut buf[..(end - start) as usize];
            let e = self.entry(i)?;
            let bad = bad_within(&self.extents, start, end - start);
            let flags_ok = match (bad.is_empty(), bad.iter().map(|x| x.length).sum::<u64>()) {
                (true, _) => e.flags == 0,
                (false, n) if n == end - start => {
                    e.flags == format::CHUNK_PARTLY_BAD | format::CHUNK_ALL_BAD
                }
                (false, _) => e.flags == format::CHUNK_PARTLY_BAD,
            };
            if !flags_ok {
                report.damaged.push(self.damaged(
                    i,
                    format!(
                        "bad-sector flags {:#x} disagree with the bad extents",
                        e.flags
                    ),
                ));
            }
            match self.decode_chunk(i, &e, out) {
                Ok(()) => crate::create::hash_readable(&mut hasher, out, start, &bad),
                Err(err) => {
                    report.damaged.push(err);
                    // Keep going; the hash cannot match any more.
                    hasher.update(b"damaged");
                }
            }
            progress(end);
        }
        let computed = hasher.finalize();
        report.computed_blake3 = computed.to_hex().to_string();
        report.hash_ok = computed.as_bytes() == &self.header.blake3;
        if self.meta.blake3 != format::hex(&self.header.blake3) {
            report.problems.push(format!(
                "the metadata's blake3 {} differs from the header's {}",
                self.meta.blake3,
                format::hex(&self.header.blake3)
            ));
        }
        Ok(report)
    }
}

/// Checks that `block` is one LZ4 block as FORMAT.md §8.2 allows, decoding to exactly
/// `out_len` bytes, without decoding it: a walk over its sequences that skips the
/// literals. liblz4's safe decoder checks its bounds but takes an offset of 0 (as
/// zeros) and some blocks that break LZ4's end rules; this refuses them.
fn lz4_block_check(block: &[u8], out_len: usize) -> std::result::Result<(), String> {
    /// Why a block is refused; kept out of the loop.
    #[cold]
    fn refuse(why: Lz4Fault, op: usize, len: usize, out_len: usize) -> String {
        match why {
            Lz4Fault::Cut(what) => format!("lz4: block ends {what}"),
            Lz4Fault::Offset => format!("lz4: match offset {len} with {op} bytes decoded"),
            Lz4Fault::Match if op.saturating_add(len) > out_len => {
                format!("lz4: block decodes past the chunk's {out_len} bytes")
            }
            Lz4Fault::Match => {
                format!("lz4: a match of {len} bytes at {op} too near the chunk's end ({out_len})")
            }
            Lz4Fault::Size if op > out_len => {
                format!("lz4: block decodes past the chunk's {out_len} bytes")
            }
            Lz4Fault::Size => format!("decompressed to {op} bytes, the chunk has {out_len}"),
        }
    }
    let n = block.len();
    let (mut ip, mut op) = (0usize, 0usize);
    // The bytes of a length whose 4 bits are all set: added up to one below 255.
    macro_rules! more {
        ($len:ident, $what:expr) => {
            if $len == 15 {
                loop {
                    let Some(&b) = block.get(ip) else {
                        return Err(refuse(Lz4Fault::Cut($what), op, 0, out_len));
                    };
                    ip += 1;
                    $len += b as usize;
                    if b != 255 {
                        break;
                    }
                }
            }
        };
    }
    loop {
        let Some(&token) = block.get(ip) else {
            let at = "where a sequence should start";
            return Err(refuse(Lz4Fault::Cut(at), op, 0, out_len));
        };
        ip += 1;
        let mut literals = (token >> 4) as usize;
        more!(literals, "inside a literal length");
        if literals > n - ip {
            return Err(refuse(Lz4Fault::Cut("inside literals"), op, 0, out_len));
        }
        ip += literals;
        op += literals;
        if ip == n {
            break; // the last sequence: literals only
        }
        let (Some(&lo), Some(&hi)) = (block.get(ip), block.get(ip + 1)) else {
            let at = "inside a match offset";
            return Err(refuse(Lz4Fault::Cut(at), op, 0, out_len));
        };
        ip += 2;
        let offset = u16::from_le_bytes([lo, hi]) as usize;
        if offset == 0 || offset > op {
            return Err(refuse(Lz4Fault::Offset, op, offset, out_len));
        }
        let mut len = (token & 15) as usize;
        more!(len, "inside a match length");
        len += 4;
        // LZ4's end rules: a match starts at least 12 bytes and ends at least 5 bytes
        // before the end (op + len cannot overflow: both are bounded by the block's size
        // times 255).
        if op + 12 > out_len || op + len + 5 > out_len {
            return Err(refuse(Lz4Fault::Match, op, len, out_len));
        }
        op += len;
    }
    if op != out_len {
        return Err(refuse(Lz4Fault::Size, op, 0, out_len));
    }
    Ok(())
}

/// What [`lz4_block_check`] found wrong.
#[derive(Clone, Copy)]
enum Lz4Fault {
    /// The input ends early: where.
    Cut(&'static str),
    Offset,
    Match,
    Size,
}

/// The magic number a zstd frame starts with (little-endian 0xFD2FB528).
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

thread_local! {
    static STORED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static DECOMPRESSOR: RefCell<zstd::bulk::Decompressor<'static>> =
        RefCell::new(zstd::bulk::Decompressor::new().expect("zstd decompression context"));
}

impl BlockSource for Image {
    fn size(&self) -> u64 {
        self.header.virtual_size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<ReadOutcome> {
        Image::read_at(self, buf, offset)
    }

    fn bad_extents(&self) -> &[BadExtent] {
        &self.extents
    }

    fn zero_ranges(&self, range: Range<u64>) -> Result<Vec<Range<u64>>> {
        Ok(crate::source::without_bad(
            self.zero_chunk_ranges(range)?,
            &self.extents,
        ))
    }

    fn read_is_cheap(&self, offset: u64, len: usize) -> bool {
        let shift = self.header.chunk_shift;
        let end = offset
            .saturating_add(len as u64)
            .min(self.header.virtual_size);
        if len == 0 || offset >= end || len > 2 << shift {
            return false;
        }
        (offset >> shift..=(end - 1) >> shift).all(|i| match self.entry(i) {
            Ok(e) => match e.kind {
                Kind::Zero => true,
                Kind::Raw => self.is_checked(i) || self.cache.contains(i),
                Kind::Compressed => self.cache.contains(i),
            },
            Err(_) => false,
        })
    }

    fn preferred_block_size(&self) -> u32 {
        self.header.chunk_size() as u32
    }

    fn describe(&self) -> String {
        format!(
            "image {} ({} bytes, {} KiB chunks, {} bad extents)",
            file_name(&self.path),
            self.header.virtual_size,
            self.header.chunk_size() >> 10,
            self.extents.len()
        )
    }
}

/// A bounded cache of decompressed chunks, split in shards so that threads reading
/// different chunks rarely meet on a lock.
struct Cache {
    shards: Vec<Mutex<Shard>>,
}

struct Shard {
    /// Grown as chunks come, up to `cap`: the map is not sized for `cap` up front (a large
    /// `--cache-mib` is a bound, not memory taken at open).
    lru: lru::LruCache<u64, Box<[u8]>>,
    cap: usize,
    /// Buffers of evicted chunks, reused for the next miss.
    spare: Vec<Box<[u8]>>,
}

/// Evicted buffers kept per shard for reuse.
const SPARES: usize = 4;

impl Cache {
    fn new(bytes: usize, chunk_size: usize) -> Cache {
        let per_shard = (bytes / chunk_size / SHARDS).max(1);
        Cache {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        lru: lru::LruCache::unbounded(),
                        cap: per_shard,
                        spare: Vec::new(),
                    })
                })
                .collect(),
        }
    }

    fn shard(&self, i: u64) -> &Mutex<Shard> {
        &self.shards[(i as usize) % SHARDS]
    }

    /// Copies from chunk `i` if cached (under the shard's lock: no reference count
    /// traffic on the hot path).
    fn copy(&self, i: u64, at: usize, out: &mut [u8]) -> bool {
        match self.shard(i).lock().lru.get(&i) {
            Some(c) => {
                out.copy_from_slice(&c[at..at + out.len()]);
                true
            }
            None => false,
        }
    }

    /// Whether chunk `i` is cached (without making it recently used).
    fn contains(&self, i: u64) -> bool {
        self.shard(i).lock().lru.contains(&i)
    }

    fn put(&self, i: u64, c: Box<[u8]>) {
        let mut shard = self.shard(i).lock();
        let evicted = if shard.lru.len() >= shard.cap && !shard.lru.contains(&i) {
            shard.lru.pop_lru().map(|(_, old)| old)
        } else {
            None
        };
        let replaced = shard.lru.put(i, c);
        for old in evicted.into_iter().chain(replaced) {
            if shard.spare.len() < SPARES {
                shard.spare.push(old);
            }
        }
    }

    /// Caches chunk `i` only if that evicts nothing; otherwise keeps the buffer as a spare.
    fn put_if_room(&self, i: u64, c: Box<[u8]>) {
        let mut shard = self.shard(i).lock();
        if shard.lru.len() < shard.cap {
            shard.lru.put(i, c);
        } else if shard.spare.len() < SPARES {
            shard.spare.push(c);
        }
    }

    /// A spare buffer of exactly `len` bytes from chunk `i`'s shard, if any.
    fn spare(&self, i: u64, len: usize) -> Option<Box<[u8]>> {
        let mut shard = self.shard(i).lock();
        let at = shard.spare.iter().position(|b| b.len() == len)?;
        Some(shard.spare.swap_remove(at))
    }

    fn recycle(&self, i: u64, buf: Box<[u8]>) {
        let mut shard = self.shard(i).lock();
        if shard.spare.len() < SPARES {
            shard.spare.push(buf);
        }
    }
}

/// Why a sealed image has no trailer (no magic at `L − 512`), told from the length the
/// header at 0 gives the file (FORMAT.md §13.1, step 4): shorter, cut short; longer,
/// appended to; the same, the trailer itself is damaged.
fn no_trailer(h: &Header, file_len: u64) -> Error {
    let expected = h
        .meta
        .offset
        .checked_add(h.meta.len)
        .and_then(|end| end.checked_add(HEADER_SIZE as u64));
    match expected {
        Some(want) if file_len < want => Error::Truncated(format!(
            "the trailer is missing: the file has {file_len} bytes, the header says {want} \
             (was it cut short?)"
        )),
        Some(want) if file_len > want => Error::Corrupt(format!(
            "no trailer at the end: the file has {file_len} bytes, the header says {want} \
             (was something appended to it?)"
        )),
        Some(_) => Error::Corrupt(
            "the trailer is damaged (no IPOSEIMG magic where the header says it is)".into(),
        ),
        None => Error::Corrupt("the header's metadata section ends past 2^64".into()),
    }
}
