//! Building an image in one sequential pass over the source: one thread reads, the
//! workers compress chunks in parallel, one thread writes them in order, builds the
//! index and hashes the readable bytes. The output is a temporary file renamed into
//! place only when complete (or a stream whose sealed trailer comes last), so an
//! interrupted run never leaves anything that opens as a valid image.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::format::{
    self, BadExtent, Codec, Entry, Header, Kind, Metadata, Section, DATA_OFFSET, FLAG_SEALED,
    HEADER_SIZE, MAX_CHUNK_SHIFT, MIN_CHUNK_SHIFT,
};
use crate::mapfile;
use crate::source::bad_within;

/// How to build an image.
#[derive(Clone, Debug)]
pub struct Options {
    pub chunk_shift: u32,
    pub codec: Codec,
    /// Compression level of the codec (`Codec::levels`); `None` is the codec's default.
    pub level: Option<i32>,
    pub threads: usize,
    /// What the metadata calls the source (default: its path).
    pub source_name: Option<String>,
    pub mapfile: Option<PathBuf>,
    /// Free-form KEY=VALUE pairs for the metadata.
    pub user: BTreeMap<String, String>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            chunk_shift: format::DEFAULT_CHUNK_SHIFT,
            codec: Codec::Zstd,
            level: None,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            source_name: None,
            mapfile: None,
            user: BTreeMap::new(),
        }
    }
}

/// Parses a chunk size such as `65536`, `64K`, `64KiB` or `1M` (a power of two, 4 KiB
/// to 1 MiB) into its shift.
pub fn parse_chunk_size(s: &str) -> Result<u32> {
    let t = s.trim();
    let (num, mult) = match t.trim_end_matches(['B', 'b']).trim_end_matches(['i', 'I']) {
        x if x.ends_with(['k', 'K']) => (&x[..x.len() - 1], 1u64 << 10),
        x if x.ends_with(['m', 'M']) => (&x[..x.len() - 1], 1u64 << 20),
        x => (x, 1),
    };
    let bytes = num
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| Error::Invalid(format!("chunk size {s:?}: not a size")))?;
    if !bytes.is_power_of_two()
        || !(1u64 << MIN_CHUNK_SHIFT..=1u64 << MAX_CHUNK_SHIFT).contains(&bytes)
    {
        return Err(Error::Invalid(format!(
            "chunk size {s:?}: must be a power of two from 4 KiB to 1 MiB"
        )));
    }
    Ok(bytes.trailing_zeros())
}

/// Where the image goes.
pub enum Output<'a> {
    /// A file, written as a temporary next to it and renamed when complete.
    Path(&'a Path),
    /// A stream (e.g. stdout): header first (unsealed), sealed trailer last.
    Stream(Box<dyn Write + Send + 'a>),
}

/// What a finished build says.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    pub virtual_size: u64,
    pub file_len: u64,
    pub chunks: u64,
    pub zero_chunks: u64,
    pub raw_chunks: u64,
    pub compressed_chunks: u64,
    pub bad_extents: usize,
    pub bad_bytes: u64,
    pub blake3: String,
}

/// One chunk's worth of work and its result.
/// Consecutive chunks handed to a worker together (one channel round trip per batch,
/// not per chunk): about 1 MiB.
struct Job {
    batch: u64,
    /// Image offset of the first byte of `data`.
    start: u64,
    /// The chunks' bytes, bad bytes zeroed; kept for hashing and raw storage.
    data: Vec<u8>,
    /// Bad extents within the batch.
    bad: Vec<BadExtent>,
}

/// A compressed batch.
struct Done {
    job: Job,
    /// Compressed chunks, back to back (see `chunks`).
    packed: Vec<u8>,
    chunks: Vec<ChunkOut>,
}

struct ChunkOut {
    kind: Kind,
    /// Range in `packed` (compressed) or in the job's data (raw).
    stored: std::ops::Range<usize>,
    crc: u32,
}

/// Builds an image of `source` (a file or block device, read once, in order).
/// `progress` gets bytes read so far; `cancel` stops the build (error Interrupted).
pub fn create(
    source: &Path,
    out: Output,
    opts: &Options,
    progress: &(dyn Fn(u64, u64) + Sync),
    cancel: &AtomicBool,
) -> Result<Report> {
    if !(MIN_CHUNK_SHIFT..=MAX_CHUNK_SHIFT).contains(&opts.chunk_shift) {
        return Err(Error::Invalid(format!(
            "chunk size 2^{} outside 4 KiB..1 MiB",
            opts.chunk_shift
        )));
    }
    let (levels, default_level) = opts.codec.levels();
    let level = opts.level.unwrap_or(default_level);
    if !levels.contains(&level) {
        return Err(Error::Invalid(format!(
            "level {level} outside {}'s {}..={}",
            opts.codec.name(),
            levels.start(),
            levels.end()
        )));
    }
    // Only these have a size to read to; a character device (/dev/zero) says 0. Asked
    // before the open too, which would wait for a writer on a named pipe.
    let not_a_disk = |kind: std::fs::FileType| {
        (!(kind.is_file() || kind.is_block_device())).then(|| {
            Error::Invalid(format!(
                "{}: not a regular file or a block device",
                source.display()
            ))
        })
    };
    if let Some(e) = std::fs::metadata(source)
        .ok()
        .and_then(|m| not_a_disk(m.file_type()))
    {
        return Err(e);
    }
    let mut src = File::open(source).map_err(|e| Error::io(format!("{}", source.display()), e))?;
    let kind = src
        .metadata()
        .map_err(|e| Error::io(format!("{}", source.display()), e))?
        .file_type();
    if let Some(e) = not_a_disk(kind) {
        return Err(e);
    }
    if let Output::Path(dest) = &out {
        check_output(dest, source, opts.mapfile.as_deref())?;
    }
    let file_size = src
        .seek(SeekFrom::End(0))
        .and_then(|s| src.seek(SeekFrom::Start(0)).map(|_| s))
        .map_err(|e| Error::io(format!("size of {}", source.display()), e))?;
    // (With a mapfile the disk may be longer than the copy: its tail was never read.)
    let (size, extents) = match &opts.mapfile {
        Some(m) => mapfile::read(m)?.extents_for(file_size)?,
        None => (file_size, Vec::new()),
    };
    let chunk_size = 1u64 << opts.chunk_shift;
    let chunk_count = size.div_ceil(chunk_size);
    // The chunk index is held in memory until it is written at the end (it grows by
    // doubling): a disk that needs more than a quarter of the machine's memory for it is
    // refused now, not after hours of work or an abort on a failed allocation. (A mapfile
    // of a few bytes can describe a disk of 2^50 bytes.)
    let index_bytes = chunk_count.saturating_mul(format::INDEX_ENTRY_SIZE as u64);
    let memory = memory_total();
    if index_bytes > memory / 4 {
        return Err(Error::Invalid(format!(
            "a disk of {size} bytes in {} KiB chunks needs a chunk index of {} MiB, held in \
             memory while the image is made: more than a quarter of the {} MiB this process may use; \
             a larger --chunk-size (up to 1M) makes it smaller",
            chunk_size >> 10,
            index_bytes >> 20,
            memory >> 20
        )));
    }
    let mut uuid = [0u8; 16];
    rand::Rng::fill(&mut rand::thread_rng(), &mut uuid[..]);
    uuid[6] = (uuid[6] & 0x0f) | 0x40; // version 4
    uuid[8] = (uuid[8] & 0x3f) | 0x80; // RFC 4122 variant
    let mut header = Header {
        version_minor: opts.codec.version_minor(),
        incompat: opts.codec.incompat_bits(),
        compat: 0,
        flags: 0,
        virtual_size: size,
        chunk_shift: opts.chunk_shift,
        codec: opts.codec,
        uuid,
        chunk_count,
        data_len: 0,
        index: Section::default(),
        extents: Section::default(),
        meta: Section::default(),
        blake3: [0; 32],
        bad_bytes: extents.iter().map(|e| e.length).sum(),
    };

    let (sink, temp) = match out {
        Output::Path(p) => {
            let temp = TempOut::new(p)?;
            let f = temp.file.try_clone().map_err(|e| Error::io("output", e))?;
            (Sink::new(Box::new(f)), Some(temp))
        }
        Output::Stream(w) => (Sink::new(w), None),
    };
    let mut sink = sink;
    sink.write(&header.encode())?;

    let threads = opts.threads.clamp(1, 256);
    // Batch buffers in circulation: the reader waits for one to come back, so memory
    // stays at a few MiB per worker whatever the source size.
    let buffers = threads * 4 + 4;
    let (free_tx, free_rx) = sync_channel::<Vec<u8>>(buffers);
    for _ in 0..buffers {
        let _ = free_tx.try_send(Vec::new());
    }
    let (job_tx, job_rx) = sync_channel::<Job>(buffers);
    let (done_tx, done_rx) = sync_channel::<Result<Done>>(buffers);
    // One receiver per worker and no other: once the workers are gone (the writer
    // failed), the reader's send fails instead of blocking forever.
    let job_rx = Arc::new(Mutex::new(job_rx));
    let worker_rx: Vec<_> = (0..threads).map(|_| job_rx.clone()).collect();
    drop(job_rx);

    let written = std::thread::scope(|scope| -> Result<Written> {
        for job_rx in worker_rx {
            let done_tx = done_tx.clone();
            let codec = opts.codec;
            let shift = opts.chunk_shift;
            scope.spawn(move || worker(job_rx, done_tx, codec, level, shift));
        }
        drop(done_tx);
        let shift = opts.chunk_shift;
        let sink = &mut sink;
        let writer = scope.spawn(move || write_chunks(sink, done_rx, free_tx, shift));
        let read = read_chunks(
            &mut src, source, size, chunk_size, &extents, job_tx, free_rx, progress, cancel,
        );
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(Error::Invalid("the writer thread panicked".into())));
        read?;
        written
    })?;
    if written.index.len() as u64 != chunk_count * format::INDEX_ENTRY_SIZE as u64 {
        return Err(Error::Invalid(format!(
            "only {} of {chunk_count} chunks were written",
            written.index.len() / format::INDEX_ENTRY_SIZE
        )));
    }
    let Written {
        data_len,
        blake3,
        index,
        stats,
    } = written;
    let mut report = Report {
        virtual_size: size,
        file_len: 0,
        chunks: chunk_count,
        zero_chunks: stats[0],
        raw_chunks: stats[1],
        compressed_chunks: stats[2],
        bad_extents: extents.len(),
        bad_bytes: header.bad_bytes,
        blake3: format::hex(&blake3),
    };

    header.data_len = data_len;
    header.blake3 = blake3;
    let mut at = DATA_OFFSET + data_len;
    // Tables follow the chunk data in this order, each where the previous one ends.
    let mut put = |bytes: &[u8]| -> Result<Section> {
        sink.write(bytes)?;
        let s = Section {
            offset: at,
            len: bytes.len() as u64,
            crc: crc32c::crc32c(bytes),
        };
        at += bytes.len() as u64;
        Ok(s)
    };
    header.index = put(&index)?;
    let ext: Vec<u8> = extents.iter().flat_map(|e| e.encode()).collect();
    header.extents = put(&ext)?;
    let meta = Metadata {
        source: opts
            .source_name
            .clone()
            .unwrap_or_else(|| source.display().to_string()),
        created: interpose_core::audit::rfc3339_now(),
        tool: format!("interpose {}", env!("CARGO_PKG_VERSION")),
        blake3: format::hex(&blake3),
        user: opts.user.clone(),
    };
    header.meta = put(&serde_json::to_vec_pretty(&meta).expect("metadata serialises"))?;
    header.flags |= FLAG_SEALED;
    let sealed = header.encode();
    sink.write(&sealed)?;
    sink.flush()?;
    report.file_len = at + HEADER_SIZE as u64;
    if let Some(temp) = temp {
        temp.file
            .write_all_at(&sealed, 0)
            .map_err(|e| Error::io("sealing the header", e))?;
        temp.commit()?;
    }
    Ok(report)
}

/// Reads the source in order into chunk jobs. Stops early if the writer went away (its
/// error is the one reported) or on cancel.
#[allow(clippy::too_many_arguments)]
fn read_chunks(
    src: &mut File,
    path: &Path,
    size: u64,
    chunk_size: u64,
    extents: &[BadExtent],
    jobs: SyncSender<Job>,
    free: Receiver<Vec<u8>>,
    progress: &(dyn Fn(u64, u64) + Sync),
    cancel: &AtomicBool,
) -> Result<()> {
    // Whole chunks per batch, about 1 MiB.
    let batch_len = chunk_size.max(1 << 20);
    // A sparse source's holes are zeros: not read (a 10 GiB file holding a few bytes was
    // read whole before).
    let holes = crate::source::find_holes(src, size);
    // (Which moved the file's offset.)
    src.seek(SeekFrom::Start(0))
        .map_err(|e| Error::io(format!("{}", path.display()), e))?;
    let mut pos = 0u64;
    let mut batch = 0u64;
    while pos < size {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Interrupted);
        }
        let len = batch_len.min(size - pos) as usize;
        let Ok(mut data) = free.recv() else {
            return Ok(()); // the writer stopped; it reports why
        };
        data.resize(len, 0);
        let bad = bad_within(extents, pos, len as u64);
        let skip = unread(&bad, &holes, pos, len as u64);
        read_full(src, &mut data, pos, &skip).map_err(|e| {
            Error::io(
                format!(
                    "reading {} at {pos}{}",
                    path.display(),
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        " (the source got shorter while it was read)"
                    } else if extents.is_empty() {
                        " (a source with unreadable sectors needs a ddrescue copy and its --mapfile)"
                    } else {
                        ""
                    }
                ),
                e,
            )
        })?;
        let job = Job {
            batch,
            start: pos,
            data,
            bad,
        };
        if jobs.send(job).is_err() {
            return Ok(());
        }
        pos += len as u64;
        batch += 1;
        progress(pos, size);
    }
    Ok(())
}

/// Fills `data` from the source at `pos`. Bytes in bad extents are skipped over (a
/// device would fail on them) and left zero.
/// The ranges of `pos..pos + len` not to read: bad extents and holes, sorted and merged
/// (as extents, the form [`read_full`] takes).
fn unread(bad: &[BadExtent], holes: &[std::ops::Range<u64>], pos: u64, len: u64) -> Vec<BadExtent> {
    let end = pos + len;
    let first = holes.partition_point(|h| h.end <= pos);
    let mut ranges: Vec<(u64, u64)> = bad
        .iter()
        .map(|x| (x.offset, x.end()))
        .chain(
            holes[first..]
                .iter()
                .take_while(|h| h.start < end)
                .map(|h| (h.start.max(pos), h.end.min(end))),
        )
        .collect();
    ranges.sort_unstable();
    let mut out: Vec<BadExtent> = Vec::new();
    for (a, b) in ranges {
        match out.last_mut() {
            Some(last) if a <= last.end() => last.length = last.length.max(b - last.offset),
            _ => out.push(BadExtent {
                offset: a,
                length: b - a,
                state: crate::format::ExtentState::Bad,
            }),
        }
    }
    out
}

fn read_full(src: &mut File, data: &mut [u8], pos: u64, bad: &[BadExtent]) -> std::io::Result<()> {
    if bad.is_empty() {
        return src.read_exact(data);
    }
    let mut at = pos;
    let end = pos + data.len() as u64;
    let mut good = |from: u64, to: u64, data: &mut [u8]| -> std::io::Result<()> {
        if to > from {
            src.seek(SeekFrom::Start(from))?;
            src.read_exact(&mut data[(from - pos) as usize..(to - pos) as usize])?;
        }
        Ok(())
    };
    for x in bad {
        good(at, x.offset, data)?;
        data[(x.offset - pos) as usize..(x.end() - pos) as usize].fill(0);
        at = x.end();
    }
    good(at, end, data)?;
    src.seek(SeekFrom::Start(end))?;
    Ok(())
}

/// One worker's compressor.
enum Compressor {
    Zstd(zstd::bulk::Compressor<'static>),
    Lz4(lz4::block::CompressionMode),
}

impl Compressor {
    fn new(codec: Codec, level: i32) -> Result<Compressor> {
        Ok(match codec {
            Codec::Zstd => Compressor::Zstd(
                zstd::bulk::Compressor::new(level)
                    .map_err(|e| Error::Invalid(format!("zstd level {level}: {e}")))?,
            ),
            Codec::Lz4 if level <= 1 => Compressor::Lz4(lz4::block::CompressionMode::DEFAULT),
            Codec::Lz4 => Compressor::Lz4(lz4::block::CompressionMode::HIGHCOMPRESSION(level)),
        })
    }

    /// Compresses `chunk` into `out`; `None` when it does not fit (store the chunk raw).
    fn compress(&mut self, chunk: &[u8], out: &mut [u8]) -> Option<usize> {
        match self {
            Compressor::Zstd(c) => c.compress_to_buffer(chunk, out).ok(),
            // A bare LZ4 block, no size prefix: the chunk's length is known.
            Compressor::Lz4(mode) => {
                lz4::block::compress_to_buffer(chunk, Some(*mode), false, out).ok()
            }
        }
    }
}

fn worker(
    jobs: Arc<Mutex<Receiver<Job>>>,
    done: SyncSender<Result<Done>>,
    codec: Codec,
    level: i32,
    shift: u32,
) {
    let mut compressor = match Compressor::new(codec, level) {
        Ok(c) => c,
        Err(e) => {
            let _ = done.send(Err(e));
            return;
        }
    };
    let chunk_size = 1usize << shift;
    loop {
        let job = match jobs.lock().recv() {
            Ok(j) => j,
            Err(_) => return,
        };
        let mut packed = Vec::with_capacity(job.data.len());
        let mut chunks = Vec::with_capacity(job.data.len().div_ceil(chunk_size));
        for (k, chunk) in job.data.chunks(chunk_size).enumerate() {
            let at = k * chunk_size;
            let out = if is_zero(chunk) {
                ChunkOut {
                    kind: Kind::Zero,
                    stored: 0..0,
                    crc: 0,
                }
            } else {
                let crc = crc32c::crc32c(chunk);
                // Compress into the spare room of `packed`; anything not smaller than
                // the chunk is stored raw.
                let from = packed.len();
                packed.reserve(chunk.len());
                let mut room = std::mem::take(&mut packed);
                let res = {
                    let spare_start = room.len();
                    room.resize(spare_start + chunk.len(), 0);
                    let r = compressor.compress(chunk, &mut room[spare_start..]);
                    match r {
                        Some(n) if n < chunk.len() => {
                            room.truncate(spare_start + n);
                            Some(n)
                        }
                        _ => {
                            room.truncate(spare_start);
                            None
                        }
                    }
                };
                packed = room;
                match res {
                    Some(n) => ChunkOut {
                        kind: Kind::Compressed,
                        stored: from..from + n,
                        crc,
                    },
                    None => ChunkOut {
                        kind: Kind::Raw,
                        stored: at..at + chunk.len(),
                        crc,
                    },
                }
            };
            chunks.push(out);
        }
        if done
            .send(Ok(Done {
                job,
                packed,
                chunks,
            }))
            .is_err()
        {
            return;
        }
    }
}

fn is_zero(data: &[u8]) -> bool {
    // OR-folding 64-byte blocks vectorises; stop at the first block with a set bit.
    let mut blocks = data.chunks_exact(64);
    blocks
        .by_ref()
        .all(|b| b.iter().fold(0u8, |a, &x| a | x) == 0)
        && blocks.remainder().iter().all(|&x| x == 0)
}

/// Writes finished batches in order; returns the data length, the hash, the index and
/// the counts of zero/raw/compressed chunks.
fn write_chunks(
    sink: &mut Sink,
    done: Receiver<Result<Done>>,
    free: SyncSender<Vec<u8>>,
    chunk_shift: u32,
) -> Result<Written> {
    let mut pending: HashMap<u64, Done> = HashMap::new();
    let mut next = 0u64;
    // Grows with the chunks actually written (never sized from a number alone).
    let mut index = Vec::new();
    let mut hasher = blake3::Hasher::new();
    let mut data_len = 0u64;
    let mut stats = [0u64; 3];
    // Ends when the workers are gone: all batches sent (or the reader stopped, which
    // it reports).
    while let Ok(d) = done.recv() {
        let d = d?;
        pending.insert(d.job.batch, d);
        while let Some(d) = pending.remove(&next) {
            let Done {
                job,
                packed,
                chunks,
            } = d;
            let chunk_size = 1usize << chunk_shift;
            for (k, c) in chunks.iter().enumerate() {
                let start = job.start + (k * chunk_size) as u64;
                let raw = &job.data[k * chunk_size..((k + 1) * chunk_size).min(job.data.len())];
                let bad = bad_within(&job.bad, start, raw.len() as u64);
                let bad_len: u64 = bad.iter().map(|x| x.length).sum();
                let flags = if bad.is_empty() {
                    0
                } else if bad_len == raw.len() as u64 {
                    format::CHUNK_PARTLY_BAD | format::CHUNK_ALL_BAD
                } else {
                    format::CHUNK_PARTLY_BAD
                };
                let stored: &[u8] = match c.kind {
                    Kind::Zero => &[],
                    Kind::Raw => &job.data[c.stored.clone()],
                    Kind::Compressed => &packed[c.stored.clone()],
                };
                let offset = if c.kind == Kind::Zero {
                    0
                } else {
                    DATA_OFFSET + data_len
                };
                if offset + stored.len() as u64 > format::MAX_OFFSET {
                    return Err(Error::Invalid(
                        "the image would hold more than 2^48 bytes of chunk data".into(),
                    ));
                }
                sink.write(stored)?;
                data_len += stored.len() as u64;
                stats[c.kind as usize] += 1;
                let entry = Entry {
                    offset,
                    len: stored.len() as u32,
                    crc: c.crc,
                    kind: c.kind,
                    flags,
                };
                index.extend_from_slice(&entry.encode());
                hash_readable(&mut hasher, raw, start, &bad);
            }
            let _ = free.try_send(job.data);
            next += 1;
        }
    }
    Ok(Written {
        data_len,
        blake3: *hasher.finalize().as_bytes(),
        index,
        stats,
    })
}

/// The memory this process may use, in bytes: the machine's (MemTotal), or its cgroup's
/// limit (v2 `memory.max`) where lower; 16 GiB if /proc does not say.
fn memory_total() -> u64 {
    let machine = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib.saturating_mul(1024))
        })
        .unwrap_or(16 << 30);
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|c| {
            let path = c.lines().find_map(|l| l.strip_prefix("0::"))?;
            let max = std::fs::read_to_string(format!("/sys/fs/cgroup{path}/memory.max")).ok()?;
            max.trim().parse::<u64>().ok() // "max": no limit
        })
        .unwrap_or(u64::MAX);
    machine.min(cgroup)
}

/// What the writer thread produced.
struct Written {
    data_len: u64,
    blake3: [u8; 32],
    index: Vec<u8>,
    /// Chunks stored as zero, raw, compressed.
    stats: [u64; 3],
}

/// Hashes the bytes of `data` (which starts at image offset `start`) outside `bad`
/// (extents clipped to it, in order).
pub(crate) fn hash_readable(
    hasher: &mut blake3::Hasher,
    data: &[u8],
    start: u64,
    bad: &[BadExtent],
) {
    let mut at = start;
    for x in bad {
        hasher.update(&data[(at - start) as usize..(x.offset - start) as usize]);
        at = x.end();
    }
    hasher.update(&data[(at - start) as usize..]);
}

/// Counts bytes written; buffered.
struct Sink<'a> {
    w: BufWriter<Box<dyn Write + Send + 'a>>,
}

impl<'a> Sink<'a> {
    fn new(w: Box<dyn Write + Send + 'a>) -> Sink<'a> {
        Sink {
            w: BufWriter::with_capacity(1 << 20, w),
        }
    }
    fn write(&mut self, b: &[u8]) -> Result<()> {
        self.w
            .write_all(b)
            .map_err(|e| Error::io("writing the image", e))
    }
    fn flush(&mut self) -> Result<()> {
        self.w
            .flush()
            .map_err(|e| Error::io("writing the image", e))
    }
}

/// Whether `a` and `b` are the same file (following symlinks); false if either is not
/// there.
pub fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Refuses an output path that is not a new or regular file (the image is written next to
/// it and renamed over it, which would replace a device node, a FIFO or a symlink instead
/// of writing through it), or that is the source or the mapfile.
fn check_output(dest: &Path, source: &Path, mapfile: Option<&Path>) -> Result<()> {
    let Ok(md) = std::fs::symlink_metadata(dest) else {
        return Ok(());
    };
    if !md.is_file() {
        return Err(Error::Invalid(format!(
            "{}: exists and is not a regular file (the image is written to a new file \
             renamed over it); give a file path, or -o - and a redirection",
            dest.display()
        )));
    }
    if rustix::fs::access(dest, rustix::fs::Access::WRITE_OK).is_err() {
        return Err(Error::Invalid(format!("{}: not writable", dest.display())));
    }
    for (what, p) in [("source", Some(source)), ("mapfile", mapfile)] {
        if p.is_some_and(|p| same_file(dest, p)) {
            return Err(Error::Invalid(format!(
                "{}: is the {what}; the image would replace it",
                dest.display()
            )));
        }
    }
    Ok(())
}

/// An output file while it is being written: `.NAME.partial-PID-RANDOM` next to NAME,
/// synced and renamed over NAME by [`TempOut::commit`], removed if dropped before.
pub struct TempOut {
    file: File,
    temp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl TempOut {
    pub fn new(dest: &Path) -> Result<TempOut> {
        let name = dest
            .file_name()
            .ok_or_else(|| Error::Invalid(format!("{}: not a file name", dest.display())))?;
        // Not the pid alone: one left by a killed run would stop a later run given the
        // same pid (pid 1 in a container, every time).
        let temp = dest.with_file_name(format!(
            ".{}.partial-{}-{:08x}",
            name.to_string_lossy(),
            std::process::id(),
            rand::random::<u32>()
        ));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)
            .map_err(|e| Error::io(format!("creating {}", temp.display()), e))?;
        // A file it replaces keeps its mode and (if we may) its owner, as one written in
        // place would.
        if let Some(md) = std::fs::metadata(dest).ok().filter(|m| m.is_file()) {
            use std::os::unix::fs::{MetadataExt, PermissionsExt};
            let _ = std::os::unix::fs::fchown(&file, Some(md.uid()), Some(md.gid()));
            let _ = file.set_permissions(std::fs::Permissions::from_mode(md.mode() & 0o7777));
        }
        Ok(TempOut {
            file,
            temp,
            dest: dest.to_path_buf(),
            committed: false,
        })
    }

    /// The file being written.
    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn commit(mut self) -> Result<()> {
        self.file
            .sync_all()
            .map_err(|e| Error::io(format!("syncing {}", self.temp.display()), e))?;
        std::fs::rename(&self.temp, &self.dest)
            .map_err(|e| Error::io(format!("renaming to {}", self.dest.display()), e))?;
        self.committed = true;
        if let Some(dir) = self.dest.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

impl Drop for TempOut {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}
