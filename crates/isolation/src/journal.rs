//! The journal: one append-only file holding every pending change in sequence order, each
//! with the blocks of data it wrote, each protected by a CRC32C.
//!
//! ```text
//! file header (64 bytes)
//!   0  magic "IPJOURN1"      8  version u32 = 1   12 reserved u32
//!   16 base_seq u64 (changes up to it were committed before this file was written)
//!   24 store id [16]         40 reserved [20]     60 crc32c of bytes 0..60
//! record (at 64, then back to back)
//!   0  len u32 (whole record)   4 crc32c of bytes 8..len
//!   8  seq u64   16 meta_len u32   20 data_len u32
//!   24 meta: the change as JSON   24+meta_len: data (data_len bytes, whole blocks)
//! sync mark (16 bytes, after the last record, overwritten by the next)
//!   0  magic "IPSYNCED"         8 its own offset u64
//! ```
//! Every record's JSON says (`synced`) up to where the journal was durable when it was
//! written; every sync writes the mark before its `fdatasync`, so that a mark after the
//! last record says the same of what is before it.
//!
//! A sync mark where a record should start is where the journal ends; so are zeros there,
//! a record whose length runs past the end of the file, or a record that fails its checks,
//! with no good record or mark after it: a write cut short by a crash (never acknowledged
//! by fsync: an fsync after a later record would have made this one durable too), or
//! space written ahead (below). So is a bad record followed by good ones that all say the
//! journal was durable only up to the bad one or less, and no mark: a power cut kept later
//! unsynced writes and lost an earlier one. Opening the journal to repair it (a mount, an
//! unmounted commit or discard) cuts it off (in the second case keeping a copy of what it
//! cuts, [`keep_from`]). A bad record with a good record after it that says the bad one
//! was durable (or does not say), or a mark after it, is damage: opening refuses, naming
//! the offset and the last whole change, after which a discard may cut it off
//! ([`Journal::open_up_to_damage`]).
//!
//! Space written ahead: when a program's fsync finds less than [`TAIL_LOW`] bytes of zeros
//! after the last record, it first writes [`TAIL_AHEAD`] bytes of zeros there, so that the
//! appends the following fsyncs make durable are overwrites of allocated blocks inside the
//! file's size: an fdatasync then writes the data without committing the file system's
//! metadata (on ext4: 10,500 against 6,800 syncs per second on the bench disk). Journals
//! that programs never fsync (bulk writes) get no zeros written ahead, and neither does
//! the sync of an unmount.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::behind::{self, Flight, Job, ALIGN, BEHIND_MIN};
use crate::change::{Change, RawPath, Time};
use crate::Error;

pub const HEADER_LEN: u64 = 64;
const MAGIC: &[u8; 8] = b"IPJOURN1";
const VERSION: u32 = 1;
const RECORD_HEADER: u64 = 24;
/// Largest record accepted when reading: a change carries at most a few MiB of data.
const MAX_RECORD: u64 = 64 << 20;
/// Zeros written after the last record by a sync that finds less than [`TAIL_LOW`] there.
pub const TAIL_AHEAD: u64 = 1 << 20;
pub const TAIL_LOW: u64 = 256 << 10;
/// Blocks allocated at a time ahead of records written behind.
const ALLOCATE_STEP: u64 = 16 << 20;
/// How many bytes of records [`Journal::open_reporting`] reads between two reports.
const PROGRESS_STEP: u64 = 64 << 20;
/// A sync mark: the magic, then the offset it is written at (see the module documentation).
const MARK_MAGIC: &[u8; 8] = b"IPSYNCED";
const MARK_LEN: u64 = 16;
/// [`Journal::synced`] when not known: records then claim nothing (see [`Entry::synced`]).
const SYNCED_UNKNOWN: u64 = u64::MAX;

/// The sync mark for offset `at`.
fn sync_mark(at: u64) -> [u8; MARK_LEN as usize] {
    let mut m = [0u8; MARK_LEN as usize];
    m[..8].copy_from_slice(MARK_MAGIC);
    m[8..].copy_from_slice(&at.to_le_bytes());
    m
}

/// Writes the sync mark for offset `at` there (made durable by the sync that follows).
pub(crate) fn write_sync_mark(file: &File, at: u64) -> io::Result<()> {
    file.write_all_at(&sync_mark(at), at)
}

/// [`write_sync_mark`] where a sync stands without it (the mark only lets a later opening
/// tell damage from a power cut's unsynced writes): on a full disk it may need a block
/// there is not.
fn put_sync_mark(file: &File, path: &Path, at: u64) {
    if let Err(e) = write_sync_mark(file, at) {
        tracing::debug!("{}: writing the sync mark: {e}", path.display());
    }
}

/// Whether `bytes` start with the sync mark for offset `at`.
fn is_sync_mark(bytes: &[u8], at: u64) -> bool {
    bytes.starts_with(MARK_MAGIC) && bytes.get(8..MARK_LEN as usize) == Some(&at.to_le_bytes()[..])
}

/// What a record's JSON holds: the change and when it was made.
#[derive(serde::Serialize, serde::Deserialize)]
struct Entry<C> {
    at: Time,
    #[serde(flatten)]
    change: C,
    /// Directories outside the isolated paths whose entries the change changes: the mount
    /// showed BACKING's times for them, so a commit keeps those (see docs/ISOLATION.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    keep_times: Vec<RawPath>,
    /// Every byte of the journal before this offset had been made durable when the record
    /// was written (absent in records of older versions, and when not known): what tells
    /// a power cut's unsynced writes from damage (see the module documentation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    synced: Option<u64>,
}

/// The one field of a record's JSON that [`later_evidence`] needs.
#[derive(serde::Deserialize)]
struct SyncedOnly {
    #[serde(default)]
    synced: Option<u64>,
}

/// A record as found in the journal.
#[derive(Clone, Debug)]
pub struct Record {
    pub seq: u64,
    /// When the change was made.
    pub at: Time,
    /// File offset of the record.
    pub offset: u64,
    /// File offset of the record's data.
    pub data_offset: u64,
    pub change: Change,
    /// Directories whose times a commit leaves as they were (see [`Journal::append_keeping`]).
    pub keep_times: Vec<RawPath>,
}

impl Record {
    pub fn end(&self) -> u64 {
        self.data_offset + self.change.data_len()
    }
}

/// An open journal file.
pub struct Journal {
    path: PathBuf,
    file: Arc<File>,
    end: u64,
    /// The file holds zeros written by us from `end` up to here (if beyond `end`).
    zeroed_end: u64,
    base_seq: u64,
    last_seq: u64,
    /// How many times the file was cut short in place ([`Journal::truncate`]): a reader of
    /// a [`Journal::snapshot`] taken before may have read bytes that are gone.
    truncations: u64,
    /// How many times the file was cut short in place, shared with every snapshot and
    /// every reader of the file outside the view's lock (see [`Journal::cuts`]).
    cuts: Arc<AtomicU64>,
    /// Appends fail with EROFS: the journal was replaced under a view that could not be
    /// rebuilt (see [`Journal::refuse_appends`]).
    refusing: bool,
    /// Records in flight to the file (see [`crate::behind`]), shared with snapshots and
    /// readers.
    flight: Arc<Flight>,
    /// The thread writing them, started by the first record written behind; only the
    /// journal appended to has one.
    writer: Option<std::thread::JoinHandle<()>>,
    /// Blocks are allocated in the file up to here (by `fallocate`, keeping the size, for
    /// records written behind; by writes below): at least `end`.
    allocated_end: u64,
    /// Large records may be written behind: an appendable journal on a file system that
    /// allocates ahead.
    behind: bool,
    /// The process's file size limit (RLIMIT_FSIZE) when the journal was opened.
    size_limit: u64,
    /// The journal's bytes before this offset are durable, and a sync mark follows them
    /// if it is `end` ([`SYNCED_UNKNOWN`] when not known). Records carry it.
    synced: AtomicU64,
}

/// The journal's file and its records in flight, for reading records' data outside the
/// view's lock, as planned under it.
#[derive(Clone)]
pub struct Reader {
    pub file: Arc<File>,
    flight: Arc<Flight>,
    /// The journal's count of cuts in place, and its value when the read was planned.
    cuts: Arc<AtomicU64>,
    planned: u64,
}

impl Reader {
    /// Waits until the bytes up to `end` are in the file, or the journal was cut since the
    /// read was planned (the reader finds that out and plans again; see [`Journal::cuts`]).
    pub fn wait_written(&self, end: u64) -> io::Result<()> {
        self.flight.wait_written(end, &self.cuts, self.planned)
    }
}

fn crc_of(parts: &[&[u8]]) -> u32 {
    parts.iter().fold(0, |c, p| crc32c::crc32c_append(c, p))
}

fn corrupt(path: &Path, what: String) -> Error {
    Error::Corrupt {
        path: path.to_path_buf(),
        what,
    }
}

/// Damage to the record at `offset`, after whole records up to sequence `last_good`.
fn damaged(path: &Path, offset: u64, last_good: u64, what: String) -> Error {
    Error::Damaged {
        path: path.to_path_buf(),
        offset,
        last_good,
        what,
    }
}

impl Journal {
    /// Writes a new, empty journal at `path` (replacing nothing: the file must not exist).
    pub fn create(path: &Path, base_seq: u64, store_id: [u8; 16]) -> Result<Journal, Error> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        let mut h = [0u8; HEADER_LEN as usize];
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[16..24].copy_from_slice(&base_seq.to_le_bytes());
        h[24..40].copy_from_slice(&store_id);
        let crc = crc_of(&[&h[..60]]);
        h[60..64].copy_from_slice(&crc.to_le_bytes());
        file.write_all_at(&h, 0).map_err(|e| Error::io(path, e))?;
        write_sync_mark(&file, HEADER_LEN).map_err(|e| Error::io(path, e))?;
        file.sync_all().map_err(|e| Error::io(path, e))?;
        let j = Journal::with(path, file, HEADER_LEN, base_seq, base_seq, true);
        j.synced.store(HEADER_LEN, Ordering::Release);
        Ok(j)
    }

    /// Opens and scans a journal, checking every record's checksum. With `repair`, a torn
    /// last record is cut off (it was never acknowledged); without, the journal is left as
    /// it is (and opened read-only) and the torn record ignored.
    pub fn open(
        path: &Path,
        store_id: [u8; 16],
        repair: bool,
    ) -> Result<(Journal, Vec<Record>), Error> {
        Journal::open_with(path, store_id, repair, repair, true, false, &mut |_, _| {})
            .map(|(j, recs, _)| (j, recs))
    }

    /// [`Journal::open`], calling `progress(bytes_checked, bytes_total)` as it reads:
    /// checking every record's data takes a while on a journal of gigabytes.
    pub fn open_reporting(
        path: &Path,
        store_id: [u8; 16],
        repair: bool,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(Journal, Vec<Record>), Error> {
        Journal::open_with(path, store_id, repair, repair, true, false, progress)
            .map(|(j, recs, _)| (j, recs))
    }

    /// [`Journal::open_reporting`] for cutting the journal (a discard): a damaged record
    /// with records after it ends the journal here instead of failing the open, and its
    /// offset comes back with the records before it. The file is left as it is (a torn
    /// end too); the journal's length is where the damage starts, for the cut.
    pub fn open_up_to_damage(
        path: &Path,
        store_id: [u8; 16],
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(Journal, Vec<Record>, Option<u64>), Error> {
        Journal::open_with(path, store_id, true, false, true, true, progress)
    }

    /// Opens for appending a journal whose records were all checked or written by this
    /// process: the one a commit or discard just wrote, copying records checked before.
    /// Reads only the records' headers and changes, not their data again.
    pub fn open_checked_before(
        path: &Path,
        store_id: [u8; 16],
    ) -> Result<(Journal, Vec<Record>), Error> {
        Journal::open_with(path, store_id, true, false, false, false, &mut |_, _| {})
            .map(|(j, recs, _)| (j, recs))
    }

    fn open_with(
        path: &Path,
        store_id: [u8; 16],
        write: bool,
        repair: bool,
        verify_data: bool,
        stop_at_damage: bool,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(Journal, Vec<Record>, Option<u64>), Error> {
        let file = OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut h = [0u8; HEADER_LEN as usize];
        if len < HEADER_LEN {
            return Err(corrupt(path, format!("file of {len} bytes has no header")));
        }
        file.read_exact_at(&mut h, 0)
            .map_err(|e| Error::io(path, e))?;
        if &h[0..8] != MAGIC {
            return Err(corrupt(path, "not an interpose journal (bad magic)".into()));
        }
        let crc = u32::from_le_bytes(h[60..64].try_into().unwrap());
        if crc != crc_of(&[&h[..60]]) {
            return Err(corrupt(path, "header checksum mismatch".into()));
        }
        let version = u32::from_le_bytes(h[8..12].try_into().unwrap());
        if version != VERSION {
            return Err(corrupt(
                path,
                format!("journal version {version}, this build reads {VERSION}"),
            ));
        }
        if h[24..40] != store_id {
            return Err(corrupt(path, "journal belongs to another store".into()));
        }
        let base_seq = u64::from_le_bytes(h[16..24].try_into().unwrap());
        if base_seq > i64::MAX as u64 {
            // Sequence numbers count changes: this many were never made.
            return Err(corrupt(path, format!("base sequence number {base_seq}")));
        }
        let mut records = Vec::new();
        // Reported every 64 MiB or so, and once at the end.
        let mut reported = 0;
        let scanned = scan(&file, path, len, base_seq, verify_data, &mut |r| {
            if r.end() - reported >= PROGRESS_STEP {
                reported = r.end();
                progress(reported, len);
            }
            records.push(r);
            Ok(())
        });
        // `damage`: where whole records are cut off, for a discard to keep a copy of.
        let (off, last_seq, damage) = match scanned {
            Ok(sc) => (sc.end, sc.last_seq, sc.unsynced_after.then_some(sc.end)),
            Err(Error::Damaged {
                offset, last_good, ..
            }) if stop_at_damage => (offset, last_good, Some(offset)),
            Err(e) => return Err(e),
        };
        if reported != len {
            progress(len, len);
        }
        let journal = Journal::with(path, file, off, base_seq, last_seq, write);
        if write && !stop_at_damage {
            if let (true, Some(at)) = (repair, damage) {
                // Without the copy, nothing is cut: the discard that the error names
                // makes it with the store's reserve (a full disk is the likely cause).
                let copy = keep_from(path, at).map_err(|e| Error::Damaged {
                    path: path.to_path_buf(),
                    offset: at,
                    last_good: last_seq,
                    what: format!(
                        "the records from offset {at} on were never synced and one of them is torn (a power cut), but the bytes to cut off could not be kept aside: {e}"
                    ),
                })?;
                tracing::warn!(
                    "{}: the records from offset {at} on were never synced and one of them is torn (a power cut): cut off, kept in {}",
                    path.display(),
                    copy.display()
                );
            }
            // Cuts what follows the last record (a torn one, zeros written ahead, the last
            // sync's mark; blocks allocated past the end for records written behind) and
            // marks the rest synced. The records may still be only in the page cache (a
            // killed daemon's): durable before anything relies on them, such as a commit
            // that records its target and then applies them, or records appended now,
            // which say they follow durable ones.
            let f = &journal.file;
            if repair {
                f.set_len(off).map_err(|e| Error::io(path, e))?;
            }
            put_sync_mark(f, path, off);
            f.sync_all().map_err(|e| Error::io(path, e))?;
            journal.synced.store(off, Ordering::Release);
        }
        Ok((journal, records, damage))
    }

    fn with(
        path: &Path,
        file: File,
        end: u64,
        base_seq: u64,
        last_seq: u64,
        writable: bool,
    ) -> Journal {
        let file = Arc::new(file);
        Journal {
            path: path.to_path_buf(),
            flight: Flight::new(file.clone(), end),
            file,
            end,
            zeroed_end: end,
            base_seq,
            last_seq,
            truncations: 0,
            cuts: Arc::default(),
            refusing: false,
            writer: None,
            allocated_end: end,
            behind: writable,
            size_limit: rustix::process::getrlimit(rustix::process::Resource::Fsize)
                .current
                .unwrap_or(u64::MAX),
            synced: AtomicU64::new(SYNCED_UNKNOWN),
        }
    }

    /// A read-only copy of this journal as it is now (sharing the open file), for
    /// [`Journal::for_each_record`] without holding up the one being appended to. Its
    /// records are in the file: it waits for those in flight.
    pub fn snapshot(&self) -> Journal {
        self.settle();
        Journal {
            path: self.path.clone(),
            file: self.file.clone(),
            end: self.end,
            zeroed_end: self.zeroed_end,
            base_seq: self.base_seq,
            last_seq: self.last_seq,
            truncations: self.truncations,
            cuts: self.cuts.clone(),
            refusing: self.refusing,
            flight: self.flight.clone(),
            writer: None,
            allocated_end: self.allocated_end,
            behind: false,
            size_limit: self.size_limit,
            synced: AtomicU64::new(self.synced.load(Ordering::Acquire)),
        }
    }

    /// Waits until the file holds this journal's records (for a snapshot, those appended
    /// before it was taken, not any since), or the journal was cut since (see
    /// [`Journal::cuts`]); the failure of a write of one of them, if any.
    fn written(&self) -> Result<(), Error> {
        self.flight
            .wait_written(self.end, &self.cuts, self.truncations)
            .map_err(|e| Error::io(&self.path, e))
    }

    /// [`Journal::written`] for a reader of the whole file. A failed write is not reported
    /// here: reading its bytes finds them missing, and appends and syncs report it.
    fn settle(&self) {
        let _ = self.written();
    }

    /// Waits for the records in flight; the failure of one, if any.
    fn drain(&self) -> Result<(), Error> {
        self.flight.drain().map_err(|e| Error::io(&self.path, e))
    }

    /// Whether `snap` (a [`Journal::snapshot`] of this journal) still describes a prefix
    /// of it: same file, not cut short since.
    pub fn extends(&self, snap: &Journal) -> bool {
        Arc::ptr_eq(&self.file, &snap.file) && self.truncations == snap.truncations
    }

    /// The records, read again from the file one at a time, without keeping them and
    /// without reading or checking their data (checked when the journal was opened or
    /// the records appended).
    pub fn for_each_record(
        &self,
        f: &mut dyn FnMut(Record) -> Result<(), Error>,
    ) -> Result<(), Error> {
        self.written()?;
        let last_seq = scan(&self.file, &self.path, self.end, self.base_seq, false, f)?.last_seq;
        if last_seq != self.last_seq {
            return Err(corrupt(
                &self.path,
                format!(
                    "read up to sequence {last_seq}, the journal has {}",
                    self.last_seq
                ),
            ));
        }
        Ok(())
    }

    /// The records, from their headers and changes (see [`Journal::for_each_record`]).
    pub fn records(&self) -> Result<Vec<Record>, Error> {
        let mut recs = Vec::new();
        self.for_each_record(&mut |r| {
            recs.push(r);
            Ok(())
        })?;
        Ok(recs)
    }

    /// Appends a change with its data; returns its sequence number and data offset.
    /// Written to the file (so visible to readers) but durable only after [`Journal::sync`].
    pub fn append(
        &mut self,
        change: &Change,
        at: Time,
        data: &[&[u8]],
    ) -> Result<(u64, u64), Error> {
        self.append_keeping(change, at, data, &[])
    }

    /// [`Journal::append`] of a change to the entries of directories outside the isolated
    /// paths, `keep_times`, whose times a commit must leave as they are: the mount shows
    /// BACKING's for them.
    pub fn append_keeping(
        &mut self,
        change: &Change,
        at: Time,
        data: &[&[u8]],
        keep_times: &[RawPath],
    ) -> Result<(u64, u64), Error> {
        if self.refusing {
            return Err(Error::io(
                &self.path,
                io::Error::from_raw_os_error(libc::EROFS),
            ));
        }
        let idle = self.flight.idle().map_err(|e| Error::io(&self.path, e))?;
        let synced = self.synced.load(Ordering::Acquire);
        let entry = Entry {
            at,
            change,
            keep_times: keep_times.to_vec(),
            synced: (synced != SYNCED_UNKNOWN).then_some(synced),
        };
        let mut meta = serde_json::to_vec(&entry).expect("changes serialise");
        let data_len: u64 = data.iter().map(|d| d.len() as u64).sum();
        debug_assert_eq!(data_len, change.data_len());
        let behind = self.behind && data_len >= BEHIND_MIN;
        if behind {
            // Spaces after the change (JSON allows them) put the data on a page boundary
            // of the file, for O_DIRECT.
            let head_end = self.end + RECORD_HEADER + meta.len() as u64;
            let pad = head_end.next_multiple_of(ALIGN) - head_end;
            meta.resize(meta.len() + pad as usize, b' ');
        }
        let len = RECORD_HEADER + meta.len() as u64 + data_len;
        if len > MAX_RECORD {
            return Err(Error::TooLarge(len));
        }
        let queue = behind || !idle;
        if queue && self.end + len > self.size_limit {
            // Past the daemon's file size limit a write fails with EFBIG, which must come
            // back to the program that made it: written at once, after those in flight.
            self.drain()?;
        } else if queue {
            match self.allocate(self.end + len) {
                Ok(()) => return self.append_behind(meta, data, len),
                // A file system that cannot allocate ahead gets every record written at
                // once from now on (the padding does no harm).
                Err(Error::Io { source, .. })
                    if source.raw_os_error() == Some(libc::EOPNOTSUPP) =>
                {
                    self.behind = false;
                    self.drain()?;
                }
                Err(e) => return Err(e),
            }
        }
        let seq = self.last_seq + 1;
        let mut head = record_head(len, seq, &meta, data_len);
        let mut crc = crc_of(&[&head[8..]]);
        for d in data {
            crc = crc32c::crc32c_append(crc, d);
        }
        head[4..8].copy_from_slice(&crc.to_le_bytes());
        let start = self.end;
        let mut bufs: Vec<io::IoSlice> = Vec::with_capacity(1 + data.len());
        bufs.push(io::IoSlice::new(&head));
        bufs.extend(data.iter().map(|d| io::IoSlice::new(d)));
        write_all_vectored_at(&self.file, &mut bufs, start).map_err(|e| {
            // Leave no partial record behind: the next append would follow garbage. The
            // last sync's mark, if the record began over it, is put back (in the room it
            // had: no block to allocate), as no sync may come to write it again.
            let marked = self.synced.load(Ordering::Acquire) == start;
            let _ = self.file.set_len(start + if marked { MARK_LEN } else { 0 });
            if marked {
                put_sync_mark(&self.file, &self.path, start);
            }
            self.zeroed_end = start;
            self.allocated_end = start;
            Error::io(&self.path, e)
        })?;
        self.end = start + len;
        self.allocated_end = self.allocated_end.max(self.end);
        self.last_seq = seq;
        self.flight.written_to(self.end);
        Ok((seq, start + head.len() as u64))
    }

    /// Queues a record for the writing thread (see [`crate::behind`]); room for it is
    /// allocated in the file.
    fn append_behind(
        &mut self,
        meta: Vec<u8>,
        data: &[&[u8]],
        len: u64,
    ) -> Result<(u64, u64), Error> {
        let start = self.end;
        if self.writer.is_none() {
            let handle = behind::spawn(&self.flight).map_err(|e| Error::io(&self.path, e))?;
            self.writer = Some(handle);
        }
        let data_len = (len - RECORD_HEADER) as usize - meta.len();
        let (mut buf, data_at) = self
            .flight
            .buffer(data_len)
            .map_err(|e| Error::io(&self.path, e))?;
        let mut at = data_at;
        for d in data {
            buf[at..at + d.len()].copy_from_slice(d);
            at += d.len();
        }
        let seq = self.last_seq + 1;
        // The checksum is filled in by the writing thread.
        let head = record_head(len, seq, &meta, data_len as u64);
        let data_offset = start + head.len() as u64;
        self.flight.push(Job {
            offset: start,
            head,
            buf,
            data_at,
            data_len,
        });
        self.end = start + len;
        self.last_seq = seq;
        Ok((seq, data_offset))
    }

    /// Makes sure blocks are allocated in the file up to `want` (keeping its size), so
    /// that a record written behind cannot fail for want of room after its write was
    /// answered: a full disk fails it here, with nothing queued. Allocates ahead in steps
    /// of [`ALLOCATE_STEP`], or only what is needed when that much is not free.
    fn allocate(&mut self, want: u64) -> Result<(), Error> {
        let from = self.allocated_end.max(self.zeroed_end).max(self.end);
        if want <= from {
            return Ok(());
        }
        use rustix::fs::{fallocate, FallocateFlags};
        use std::os::fd::AsFd;
        let keep = FallocateFlags::KEEP_SIZE;
        let mut step = (want - from).max(ALLOCATE_STEP);
        let mut res = fallocate(self.file.as_fd(), keep, from, step);
        // ENOSPC, or EDQUOT under a quota: perhaps this record fits all the same.
        if res.is_err() && step > want - from {
            step = want - from;
            res = fallocate(self.file.as_fd(), keep, from, step);
        }
        res.map_err(|e| Error::io(&self.path, e.into()))?;
        self.allocated_end = from + step;
        Ok(())
    }

    /// Whether appends fail (see [`Journal::refuse_appends`]).
    pub fn is_refusing(&self) -> bool {
        self.refusing
    }

    /// Whether this journal is still the file at `path` (not replaced by another).
    pub fn is_at(&self, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (self.file.metadata(), std::fs::metadata(path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }

    /// From now on, every append fails with EROFS: for a view left over a journal a commit
    /// replaced (its changes would go into a file no longer in the store).
    pub fn refuse_appends(&mut self) {
        self.refusing = true;
    }

    /// Makes sure records of `bytes` more bytes can be appended without the file system
    /// running out of room (they overwrite zeros written ahead, in blocks already
    /// allocated): an operation recorded as several changes (a create and the ACL it
    /// inherits, a truncate and a chmod) then lands whole or, on a full disk, not at all.
    pub fn reserve(&mut self, bytes: u64) -> Result<(), Error> {
        let want = self.end + bytes;
        if self.zeroed_end >= want {
            return Ok(());
        }
        // (Not over the last sync's mark, which may be at `end`.)
        let from = self.zeroed_end.max(self.end + MARK_LEN);
        let to = want.next_multiple_of(4096);
        if let Err(e) = write_zeros(&self.file, from, to) {
            // Nothing half-written stays past what was zeroed before (nor, on ext4, what
            // was allocated ahead).
            let _ = self.file.set_len(from);
            self.allocated_end = from;
            return Err(Error::io(&self.path, e));
        }
        self.zeroed_end = to;
        Ok(())
    }

    /// Makes every appended record durable.
    pub fn sync(&self) -> Result<(), Error> {
        self.drain()?;
        self.sync_marked()
    }

    /// Writes the sync mark after the last record, then `fdatasync`: the mark becomes
    /// durable with the records before it, and says so (see the module documentation).
    fn sync_marked(&self) -> Result<(), Error> {
        put_sync_mark(&self.file, &self.path, self.end);
        self.file
            .sync_data()
            .map_err(|e| Error::io(&self.path, e))?;
        self.synced.store(self.end, Ordering::Release);
        Ok(())
    }

    /// [`Journal::sync`] for a program's fsync: writes zeros ahead first if few are left
    /// (see the module documentation), as more fsyncs are likely to follow.
    pub fn sync_ahead(&mut self) -> Result<(), Error> {
        self.drain()?;
        if self.zeroed_end < self.end + TAIL_LOW {
            let from = self.zeroed_end.max(self.end + MARK_LEN);
            let to = (self.end + TAIL_AHEAD).next_multiple_of(4096);
            match write_zeros(&self.file, from, to) {
                Ok(()) => self.zeroed_end = to,
                // Only an optimisation: on a full disk, sync what there is.
                Err(e) => tracing::debug!("{}: writing ahead: {e}", self.path.display()),
            }
        }
        self.sync_marked()
    }

    /// The file, for reading records or data blocks (kept alive by readers across a
    /// compaction), once every record appended so far is in it.
    pub fn file(&self) -> &Arc<File> {
        self.settle();
        &self.file
    }

    /// The file and its records in flight, for reading records' data outside the view's
    /// lock without waiting for more than the bytes read (see [`Reader::wait_written`]).
    pub fn reader(&self) -> Reader {
        Reader {
            file: self.file.clone(),
            flight: self.flight.clone(),
            cuts: self.cuts.clone(),
            planned: self.cuts.load(Ordering::Acquire),
        }
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn base_seq(&self) -> u64 {
        self.base_seq
    }
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }
    pub fn len(&self) -> u64 {
        self.end
    }

    /// Bytes the file holds after the records, not counting the last sync's mark: zeros
    /// written ahead (a mounted journal's, with records in flight: up to the last written).
    pub fn ahead_len(&self) -> u64 {
        let marked = self.synced.load(Ordering::Acquire) == self.end;
        let after = self.end + if marked { MARK_LEN } else { 0 };
        self.file
            .metadata()
            .map(|m| m.len().saturating_sub(after))
            .unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.last_seq == self.base_seq
    }

    /// The count of cuts of the file in place and its value now. A reader that planned
    /// what to read from the journal under the view's lock and reads it after letting go
    /// compares: a cut meanwhile (a mounted discard) may have taken those bytes away, or
    /// given their offsets to another file's records since.
    pub fn cuts(&self) -> (Arc<AtomicU64>, u64) {
        (self.cuts.clone(), self.cuts.load(Ordering::Acquire))
    }

    /// Cuts the journal after the record ending at `end` (whose sequence is `seq`).
    pub fn truncate(&mut self, end: u64, seq: u64) -> Result<(), Error> {
        // Nothing queued or being written may land after the cut (waiting for the bytes
        // up to `end` would not say so). A failed write is no obstacle: what it left is
        // cut off, if it is after `end`.
        let _ = self.flight.drain();
        // Counted first, and both counts together even if the cut fails below (readers
        // compare them): a reader that finds the bytes gone finds the count changed.
        self.cuts.fetch_add(1, Ordering::AcqRel);
        self.truncations += 1;
        self.file
            .set_len(end)
            .map_err(|e| Error::io(&self.path, e))?;
        put_sync_mark(&self.file, &self.path, end);
        self.file.sync_all().map_err(|e| Error::io(&self.path, e))?;
        self.synced.store(end, Ordering::Release);
        self.end = end;
        self.zeroed_end = end;
        self.allocated_end = end;
        self.last_seq = seq;
        self.flight.cut_to(end);
        Ok(())
    }

    /// For the daemon's exit: lets the records in flight reach the file, ends the writing
    /// thread and frees the blocks allocated ahead of the last record. (Not on drop: a
    /// view rebuilt after a failed commit has a second journal on the same file, which
    /// counts on them.)
    pub fn close(&mut self) {
        self.stop_writer();
        if self.allocated_end > self.end {
            // Keeping the last sync's mark, if it follows the last record.
            let marked = self.synced.load(Ordering::Acquire) == self.end;
            let _ = self
                .file
                .set_len(self.end + if marked { MARK_LEN } else { 0 });
            self.allocated_end = self.end;
        }
    }

    fn stop_writer(&mut self) {
        if let Some(writer) = self.writer.take() {
            self.flight.stop();
            let _ = writer.join();
        }
    }
}

impl Drop for Journal {
    /// Lets the records in flight reach the file and ends the writing thread.
    fn drop(&mut self) {
        self.stop_writer();
    }
}

/// A record's header and change, its checksum left zero.
fn record_head(len: u64, seq: u64, meta: &[u8], data_len: u64) -> Vec<u8> {
    let mut head = Vec::with_capacity(RECORD_HEADER as usize + meta.len());
    head.extend_from_slice(&(len as u32).to_le_bytes());
    head.extend_from_slice(&[0; 4]);
    head.extend_from_slice(&seq.to_le_bytes());
    head.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    head.extend_from_slice(&(data_len as u32).to_le_bytes());
    head.extend_from_slice(meta);
    head
}

/// Whether a whole record as read (its bytes in order, in one or more pieces) is as long
/// as it says and passes its checksum.
pub fn record_checks_out(parts: &[&[u8]]) -> bool {
    let (mut head, mut got, mut crc, mut total) = ([0u8; 8], 0, 0u32, 0usize);
    for p in parts {
        let take = (8 - got).min(p.len());
        head[got..got + take].copy_from_slice(&p[..take]);
        got += take;
        crc = crc32c::crc32c_append(crc, &p[take..]);
        total += p.len();
    }
    let u32_at = |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().unwrap());
    got == 8 && u32_at(0) as usize == total && u32_at(4) == crc
}

/// The fixed fields at the start of a record (see the module documentation).
struct RecordHeader {
    len: u64,
    crc: u32,
    seq: u64,
    meta_len: u64,
    data_len: u64,
}

impl RecordHeader {
    fn parse(h: &[u8; RECORD_HEADER as usize]) -> RecordHeader {
        let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().unwrap());
        RecordHeader {
            len: u32_at(0) as u64,
            crc: u32_at(4),
            seq: u64::from_le_bytes(h[8..16].try_into().unwrap()),
            meta_len: u32_at(16) as u64,
            data_len: u32_at(20) as u64,
        }
    }

    fn plausible_len(&self) -> bool {
        (RECORD_HEADER..=MAX_RECORD).contains(&self.len)
    }

    /// The lengths add up.
    fn shape_ok(&self) -> bool {
        RECORD_HEADER + self.meta_len + self.data_len == self.len
    }
}

/// Reads the records of `file` from its header up to `len`, handing each to `sink`:
/// (where the last whole one ends, its sequence). A torn last record is left out (with a warning); damage
/// with good records after it is an error. `verify_data`: read each record whole and
/// check its checksum; else read only headers and changes.
fn scan(
    file: &File,
    path: &Path,
    len: u64,
    base_seq: u64,
    verify_data: bool,
    sink: &mut dyn FnMut(Record) -> Result<(), Error>,
) -> Result<Scanned, Error> {
    let mut off = HEADER_LEN;
    let mut last_seq = base_seq;
    let mut buf = Vec::new();
    let mut unsynced_after = false;
    while off < len {
        let mut rh = [0u8; RECORD_HEADER as usize];
        let have = (len - off).min(RECORD_HEADER) as usize;
        file.read_exact_at(&mut rh[..have], off)
            .map_err(|e| Error::io(path, e))?;
        if is_sync_mark(&rh[..have], off) {
            // The last sync's mark: nothing after it was synced, or it would be gone.
            break;
        }
        if rh[..have].iter().all(|&b| b == 0) {
            // Zeros where a record should start: the end (written ahead, or allocated and
            // never written) if nothing follows; else a record lost, as a bad one is.
            // (Nothing stale follows the end: every cut of the journal cuts the file.)
            unsynced_after = bad_record(
                file,
                path,
                (off, off + 1, len),
                last_seq,
                None,
                format!("record at offset {off}: zeros where its header should be, with records after it"),
            )?;
            break;
        }
        if have < RECORD_HEADER as usize {
            unsynced_after = bad_record(
                file,
                path,
                (off, off + 1, len),
                last_seq,
                Some(format!("{have} bytes of a record header")),
                format!("record at offset {off}: {have} bytes of a record header, with a sync mark after it"),
            )?;
            break;
        }
        let h = RecordHeader::parse(&rh);
        let (rlen, seq, meta_len, data_len) = (h.len, h.seq, h.meta_len, h.data_len);
        if !h.plausible_len() {
            unsynced_after = bad_record(
                file,
                path,
                (off, off + 1, len),
                last_seq,
                Some(format!("a record header of impossible length {rlen}")),
                format!("record at offset {off}: impossible length {rlen}, with records after it"),
            )?;
            break;
        }
        if off + rlen > len {
            // Torn if nothing follows; a damaged length if records do. A header whose
            // lengths add up is whole: its payload is not searched (a torn one's is cut).
            let from = if h.shape_ok() { off + rlen } else { off + 1 };
            unsynced_after = bad_record(
                file,
                path,
                (off, from, len),
                last_seq,
                Some(format!("record of {rlen} bytes, {} in the file", len - off)),
                format!(
                    "record at offset {off} (seq {seq}): length {rlen} runs past the end of the file, with records after it"
                ),
            )?;
            break;
        }
        // Without `verify_data`, only the header and the change are read.
        let read_len = if verify_data {
            rlen
        } else {
            (RECORD_HEADER + meta_len).min(rlen)
        };
        buf.resize(read_len as usize, 0);
        file.read_exact_at(&mut buf, off)
            .map_err(|e| Error::io(path, e))?;
        let crc_ok = !verify_data || crc_of(&[&buf[8..]]) == h.crc;
        let shape_ok = h.shape_ok();
        if !crc_ok || !shape_ok {
            // Look after its payload if the header is whole, else at every byte.
            let from = if shape_ok { off + rlen } else { off + 1 };
            unsynced_after = bad_record(
                file,
                path,
                (off, from, len),
                last_seq,
                Some("checksum mismatch in the last record".into()),
                format!(
                    "record at offset {off} (seq {seq}): checksum mismatch, with records after it"
                ),
            )?;
            break;
        }
        if last_seq.checked_add(1) != Some(seq) {
            return Err(damaged(
                path,
                off,
                last_seq,
                format!("record at offset {off}: sequence {seq} follows {last_seq}"),
            ));
        }
        let meta = &buf[RECORD_HEADER as usize..(RECORD_HEADER + meta_len) as usize];
        let Entry {
            at,
            change,
            keep_times,
            ..
        }: Entry<Change> = serde_json::from_slice(meta).map_err(|e| {
            damaged(
                path,
                off,
                last_seq,
                format!("record at offset {off} (seq {seq}): {e}"),
            )
        })?;
        if let Err(what) = change
            .check()
            .and_then(|()| crate::change::check_time(at))
            .and_then(|()| {
                keep_times
                    .iter()
                    .try_for_each(|p| crate::change::check_path(p, true))
            })
        {
            return Err(damaged(
                path,
                off,
                last_seq,
                format!("record at offset {off} (seq {seq}): {what}"),
            ));
        }
        if change.data_len() != data_len {
            return Err(damaged(
                path,
                off,
                last_seq,
                format!("record at offset {off} (seq {seq}): {data_len} bytes of data for {} bytes of blocks", change.data_len()),
            ));
        }
        sink(Record {
            seq,
            at,
            offset: off,
            data_offset: off + RECORD_HEADER + meta_len,
            change,
            keep_times,
        })?;
        last_seq = seq;
        off += rlen;
    }
    Ok(Scanned {
        end: off,
        last_seq,
        unsynced_after,
    })
}

/// What a bad record at `at` is, from what follows it in `from..len` ([`later_evidence`]):
/// the end of the journal, torn (`Ok(false)`, logged as `torn_why`; not logged without,
/// for zeros written ahead) or with unsynced records after it (`Ok(true)`), or damage
/// (the error, saying `what`).
fn bad_record(
    file: &File,
    path: &Path,
    (at, from, len): (u64, u64, u64),
    last_seq: u64,
    torn_why: Option<String>,
    what: String,
) -> Result<bool, Error> {
    let p = path.display();
    match later_evidence(file, from, len, last_seq, at).map_err(|e| Error::io(path, e))? {
        After::Nothing => {
            if let Some(why) = torn_why {
                tracing::warn!("{p}: cutting off an unfinished last record at offset {at} ({why})");
            }
            Ok(false)
        }
        After::Unsynced => {
            tracing::warn!(
                "{p}: the journal ends at offset {at}: a record there is torn, and the records after it were never synced (a power cut)"
            );
            Ok(true)
        }
        After::Synced => Err(damaged(path, at, last_seq, what)),
    }
}

/// Where [`scan`] found the journal to end.
struct Scanned {
    /// The end of the last whole record.
    end: u64,
    last_seq: u64,
    /// Whole records follow a torn one, none of them synced (a power cut's work).
    unsynced_after: bool,
}

/// What follows a bad record (at `bad_at`) in `from..len`, which tells a journal's torn
/// end from damage in its middle.
#[derive(Debug, PartialEq)]
enum After {
    /// No record that passes every check: the bad one is a torn end.
    Nothing,
    /// Whole records (with sequence numbers after `after_seq`), each written when the
    /// journal was durable only up to `bad_at` or less, and no sync mark: the bad one and
    /// they were never synced, so a power cut may have kept them and lost it (the disk
    /// writes what is not synced in any order). The journal ends at the bad one.
    Unsynced,
    /// A record written once the bad one was durable, one that does not say (an older
    /// version's), or a sync mark after it: the bad one had been synced, so it is damage.
    Synced,
}

/// Looks at every byte offset in `from..len` for a sync mark or a record that passes
/// every check (skipping the data of those found): see [`After`]. Reads the rest of the
/// file once; only on a bad record. Garbage can look like many record headers, each
/// asking for a CRC of up to 64 MiB: after 4,096 of them that fail it, it answers
/// [`After::Synced`], so the journal is refused as damaged rather than cut (the cautious
/// side).
fn later_evidence(
    file: &File,
    from: u64,
    len: u64,
    after_seq: u64,
    bad_at: u64,
) -> io::Result<After> {
    const WINDOW: usize = 1 << 20;
    const MAX_CANDIDATES: usize = 4096;
    let mut candidates = 0;
    let mut found = false;
    let head = RECORD_HEADER as usize;
    let mut buf = vec![0u8; WINDOW + head];
    let mut record = Vec::new();
    let mut base = from;
    'windows: while base + MARK_LEN <= len {
        let n = ((len - base) as usize).min(buf.len());
        file.read_exact_at(&mut buf[..n], base)?;
        // Offsets in this window where a mark fits (records are longer).
        let positions = (n - MARK_LEN as usize + 1).min(WINDOW);
        for p in 0..positions {
            let at = base + p as u64;
            if is_sync_mark(&buf[p..n], at) {
                return Ok(After::Synced);
            }
            if p + head > n {
                continue;
            }
            let h = RecordHeader::parse(buf[p..p + head].try_into().unwrap());
            if !h.plausible_len() || at + h.len > len || h.seq <= after_seq || !h.shape_ok() {
                continue;
            }
            record.resize(h.len as usize, 0);
            file.read_exact_at(&mut record, at)?;
            if crc_of(&[&record[8..]]) != h.crc {
                // (Only lookalikes count: the good records are the file's own, read once.)
                candidates += 1;
                if candidates > MAX_CANDIDATES {
                    return Ok(After::Synced);
                }
                continue;
            }
            let meta = &record[head..head + h.meta_len as usize];
            match serde_json::from_slice::<SyncedOnly>(meta)
                .ok()
                .and_then(|m| m.synced)
            {
                Some(synced) if synced <= bad_at => {
                    found = true;
                    base = at + h.len;
                    continue 'windows;
                }
                _ => return Ok(After::Synced),
            }
        }
        base += positions as u64;
    }
    Ok(if found {
        After::Unsynced
    } else {
        After::Nothing
    })
}

/// Copies the bytes of the journal at `path` from `at` on to `journal.cut-at-AT` beside
/// it (`.2`, `.3`, … after the name if that exists), durably, before they are cut off:
/// they may be worth reading by hand. Returns the copy's path.
pub fn keep_from(path: &Path, at: u64) -> io::Result<PathBuf> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = format!("journal.cut-at-{at}");
    let mut copy = dir.join(&name);
    let mut n = 1;
    while copy.symlink_metadata().is_ok() {
        n += 1;
        copy = dir.join(format!("{name}.{n}"));
    }
    let kept = (|| {
        let mut from = File::open(path)?;
        io::Seek::seek(&mut from, io::SeekFrom::Start(at))?;
        let mut to = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&copy)?;
        io::copy(&mut from, &mut to)?;
        to.sync_all()?;
        File::open(dir)?.sync_all()
    })();
    if let Err(e) = kept {
        let _ = std::fs::remove_file(&copy);
        return Err(e);
    }
    Ok(copy)
}

/// Writes zeros over `from..to` of `file`.
fn write_zeros(file: &File, mut from: u64, to: u64) -> io::Result<()> {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    while from < to {
        let n = ((to - from) as usize).min(ZEROS.len());
        file.write_all_at(&ZEROS[..n], from)?;
        from += n as u64;
    }
    Ok(())
}

pub(crate) fn write_all_vectored_at(
    file: &File,
    bufs: &mut [io::IoSlice<'_>],
    mut off: u64,
) -> io::Result<()> {
    use std::os::fd::AsFd;
    let mut bufs = &mut bufs[..];
    while !bufs.is_empty() {
        let n = match rustix::io::pwritev(file.as_fd(), bufs, off) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        off += n as u64;
        io::IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{RawPath, Run, BLOCK};

    fn data_change(n: u64) -> Change {
        Change::Data {
            path: Some(RawPath(b"f".to_vec())),
            size: n * BLOCK,
            runs: vec![Run {
                block: 0,
                count: n,
                hole: false,
                alloc: false,
            }],
        }
    }

    fn records_of(j: &Journal) -> Vec<Record> {
        let mut records = Vec::new();
        j.for_each_record(&mut |r| {
            records.push(r);
            Ok(())
        })
        .unwrap();
        records
    }

    #[test]
    fn a_snapshot_reads_the_records_appended_before_it_and_knows_a_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let id = [7; 16];
        let mut j = Journal::create(&p, 0, id).unwrap();
        let block = vec![0xab; BLOCK as usize];
        for n in 1..=3 {
            j.append(&data_change(n), (1, 0), &[&block.repeat(n as usize)])
                .unwrap();
        }
        let snap = j.snapshot();
        let end_of_two = records_of(&j)[1].end();
        // Appended after the snapshot: not in it, and the snapshot still holds.
        j.append(&data_change(1), (1, 0), &[&block]).unwrap();
        assert!(j.extends(&snap));
        let read = records_of(&snap);
        let opened = Journal::open(&p, id, false).unwrap().1;
        assert_eq!(read.len(), 3);
        for (a, b) in read.iter().zip(&opened) {
            assert_eq!(
                (a.seq, a.offset, a.data_offset),
                (b.seq, b.offset, b.data_offset)
            );
            assert_eq!(a.change, b.change);
        }
        j.truncate(end_of_two, 2).unwrap();
        assert!(!j.extends(&snap), "a truncation since the snapshot");
        assert_eq!(records_of(&j).len(), 2);
    }

    #[test]
    fn append_reopen_and_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let id = [7; 16];
        let mut j = Journal::create(&p, 10, id).unwrap();
        let block = vec![0xab; BLOCK as usize];
        let (s1, d1) = j.append(&data_change(1), (1, 0), &[&block]).unwrap();
        let (s2, _) = j
            .append(
                &Change::Unlink {
                    path: RawPath(b"x".to_vec()),
                },
                (1, 0),
                &[],
            )
            .unwrap();
        assert_eq!((s1, s2), (11, 12));
        let good_end = j.len();
        let (s3, _) = j
            .append(&data_change(2), (1, 0), &[&block, &block])
            .unwrap();
        assert_eq!(s3, 13);
        drop(j);
        // Tear the last record.
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        let full = f.metadata().unwrap().len();
        f.set_len(full - 100).unwrap();
        let (j, recs) = Journal::open(&p, id, true).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].data_offset, d1);
        assert_eq!(j.len(), good_end);
        // Followed by the sync mark of the opening.
        assert_eq!(std::fs::metadata(&p).unwrap().len(), good_end + MARK_LEN);
        // Another store's id is refused.
        assert!(Journal::open(&p, [8; 16], false).is_err());
        // Corruption in the middle is refused, not cut off.
        let mut j = j;
        j.append(&data_change(1), (1, 0), &[&block]).unwrap();
        drop(j);
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0x55], d1 + 5).unwrap();
        let err = Journal::open(&p, id, true).err().unwrap().to_string();
        assert!(err.contains("checksum mismatch"), "{err}");
        // For a discard it opens up to the damage, the file left as it is.
        let before = std::fs::read(&p).unwrap();
        let (j, recs, damage) = Journal::open_up_to_damage(&p, id, &mut |_, _| {}).unwrap();
        assert_eq!(recs.len(), 0, "the damaged record is the first one");
        assert_eq!(damage, Some(HEADER_LEN));
        assert_eq!((j.len(), j.last_seq()), (HEADER_LEN, 10));
        assert_eq!(
            std::fs::read(&p).unwrap(),
            before,
            "opening changed the file"
        );
    }

    /// A power cut can keep later records whole and lose part of an earlier one, none of
    /// them synced (the disk writes what is not synced in any order): the journal ends at
    /// the torn one, and what is cut off is kept in a copy. Damage to a record that had
    /// been synced is refused instead, whether a record written after the sync or the
    /// sync's own mark says so, and so is damage before records that do not say (older
    /// versions').
    #[test]
    fn records_after_a_torn_one_are_cut_if_unsynced_and_damage_if_synced() {
        let dir = tempfile::tempdir().unwrap();
        let (p, id, block, mut j) = one_record_synced_ahead(dir.path());
        let synced_end = j.len();
        let mut data_at = Vec::new();
        for n in 0..3 {
            data_at.push(j.append(&data_change(1), (1, n), &[&block]).unwrap().1);
        }
        let end = j.len();
        drop(j);
        let before = std::fs::read(&p).unwrap();
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        // The first unsynced record's data never reached the disk; the two after did.
        f.write_all_at(&vec![0; BLOCK as usize], data_at[0])
            .unwrap();
        // Read-only: ends there, the file as it is.
        let (j, recs) = Journal::open(&p, id, false).unwrap();
        assert_eq!((recs.len(), j.len()), (1, synced_end));
        drop(j);
        // To write: cut there, and the bytes cut off kept beside.
        let (j, recs) = Journal::open(&p, id, true).unwrap();
        assert_eq!((recs.len(), j.len()), (1, synced_end));
        assert_eq!(file_len(&p), synced_end + MARK_LEN);
        let copy = dir.path().join(format!("journal.cut-at-{synced_end}"));
        let mut want = before[synced_end as usize..end as usize].to_vec();
        want[(data_at[0] - synced_end) as usize..][..BLOCK as usize].fill(0);
        assert!(
            std::fs::read(&copy).unwrap()[..want.len()] == want[..],
            "the copy"
        );
        drop(j);

        // Its header torn instead (an impossible length): found by a search, the same.
        let mut j = Journal::open(&p, id, true).unwrap().0;
        let torn_at = j.len();
        for n in 0..3 {
            j.append(&data_change(1), (1, n), &[&block]).unwrap();
        }
        drop(j);
        f.write_all_at(&[0xff; 8], torn_at).unwrap();
        let (j, recs) = Journal::open(&p, id, true).unwrap();
        assert_eq!((recs.len(), j.len()), (1, torn_at));
        assert!(dir
            .path()
            .join(format!("journal.cut-at-{torn_at}"))
            .exists());
        drop(j);

        // A record appended after a sync says the one before it was durable: damage.
        let mut j = Journal::open(&p, id, true).unwrap().0;
        let (_, d) = j.append(&data_change(1), (1, 0), &[&block]).unwrap();
        j.sync().unwrap();
        j.append(&data_change(1), (1, 1), &[&block]).unwrap();
        j.append(&data_change(1), (1, 2), &[&block]).unwrap();
        drop(j);
        assert_damage_at(&p, id, d);
        // So does the mark of a sync after the last record.
        std::fs::remove_file(&p).unwrap();
        let (_, _, _, mut j) = one_record_synced_ahead(dir.path());
        let (_, d) = j.append(&data_change(1), (1, 0), &[&block]).unwrap();
        j.append(&data_change(1), (1, 1), &[&block]).unwrap();
        j.sync().unwrap();
        drop(j);
        assert_damage_at(&p, id, d);
        // Records that do not say whether it was synced: damage (the cautious side).
        std::fs::remove_file(&p).unwrap();
        let (_, _, _, mut j) = one_record_synced_ahead(dir.path());
        j.synced.store(SYNCED_UNKNOWN, Ordering::Release);
        let (_, d) = j.append(&data_change(1), (1, 0), &[&block]).unwrap();
        j.append(&data_change(1), (1, 1), &[&block]).unwrap();
        drop(j);
        assert_damage_at(&p, id, d);
    }

    /// Zeros where a record's header should be, or a length that runs past the end of the
    /// file, with records after them: judged as a record that fails its CRC, not taken for
    /// the zeros written ahead or a torn end (which would drop the records after them).
    #[test]
    fn zeros_or_a_length_past_the_end_before_good_records_are_judged_as_a_bad_record() {
        let dir = tempfile::tempdir().unwrap();
        let (p, id, block, mut j) = one_record_synced_ahead(dir.path());
        let synced_end = j.len();
        for n in 0..3 {
            j.append(&data_change(1), (1, n), &[&block]).unwrap();
        }
        drop(j);
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        // Never synced: a power cut's, cut off with a copy.
        f.write_all_at(&[0; RECORD_HEADER as usize], synced_end)
            .unwrap();
        let (j, recs) = Journal::open(&p, id, true).unwrap();
        assert_eq!((recs.len(), j.len()), (1, synced_end));
        let copy = dir.path().join(format!("journal.cut-at-{synced_end}"));
        assert!(copy.exists());
        std::fs::remove_file(&copy).unwrap();
        drop(j);

        // Synced records after them: damage, both ways.
        let mut j = Journal::open(&p, id, true).unwrap().0;
        let at = j.len();
        j.append(&data_change(1), (1, 0), &[&block]).unwrap();
        j.sync_ahead().unwrap();
        j.append(&data_change(1), (1, 1), &[&block]).unwrap();
        j.sync_ahead().unwrap();
        drop(j);
        let mut head = [0u8; RECORD_HEADER as usize];
        File::open(&p)
            .unwrap()
            .read_exact_at(&mut head, at)
            .unwrap();
        f.write_all_at(&[0; RECORD_HEADER as usize], at).unwrap();
        let err = Journal::open(&p, id, true).err().unwrap();
        assert!(
            matches!(err, Error::Damaged { offset, .. } if offset == at),
            "{err}"
        );
        f.write_all_at(&head, at).unwrap();
        f.write_all_at(&[head[3] ^ 1], at + 3).unwrap();
        let err = Journal::open(&p, id, true).err().unwrap();
        assert!(
            matches!(err, Error::Damaged { offset, .. } if offset == at),
            "{err}"
        );
        // Whole again: every record back, nothing was cut.
        f.write_all_at(&head, at).unwrap();
        let (_, recs) = Journal::open(&p, id, true).unwrap();
        assert_eq!(recs.len(), 3);
    }

    /// Flips a byte of the data at `data_at` in the journal at `p`, whose opening must
    /// then refuse it as damage.
    fn assert_damage_at(p: &Path, id: [u8; 16], data_at: u64) {
        let f = OpenOptions::new().write(true).open(p).unwrap();
        f.write_all_at(&[0x55], data_at + 3).unwrap();
        let err = Journal::open(p, id, true).err().unwrap();
        assert!(matches!(err, Error::Damaged { .. }), "{err}");
    }

    /// A sync's mark ends the journal where it is, and the next record overwrites it.
    /// Should that record's first bytes not reach the disk (a power cut), the mark is
    /// still there, and the journal ends at it: the records after it were never synced,
    /// and nothing is damaged, so nothing is kept aside.
    #[test]
    fn a_sync_mark_ends_the_journal_until_a_record_overwrites_it() {
        let dir = tempfile::tempdir().unwrap();
        let (p, id, block, j) = one_record_synced_ahead(dir.path());
        let end = j.len();
        drop(j);
        let mut head = [0u8; MARK_LEN as usize];
        File::open(&p)
            .unwrap()
            .read_exact_at(&mut head, end)
            .unwrap();
        assert_eq!(head, sync_mark(end));
        let (mut j, recs) = Journal::open(&p, id, true).unwrap();
        assert_eq!((recs.len(), j.len()), (1, end));
        j.append(&data_change(1), (1, 0), &[&block]).unwrap();
        j.append(&data_change(1), (1, 1), &[&block]).unwrap();
        let end2 = j.len();
        drop(j);
        let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
        let mut whole = vec![0u8; (end2 - end) as usize];
        f.read_exact_at(&mut whole, end).unwrap();
        f.write_all_at(&sync_mark(end), end).unwrap();
        let (j, recs) = Journal::open(&p, id, true).unwrap();
        assert_eq!((recs.len(), j.len()), (1, end), "the mark ends the journal");
        let kept: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().starts_with("journal.cut"))
            .collect();
        assert!(kept.is_empty(), "{kept:?}");
        drop(j);
        // (Opening cut the file at the mark; the records written back are whole again.)
        f.write_all_at(&whole, end).unwrap();
        let (j, recs) = Journal::open(&p, id, true).unwrap();
        assert_eq!((recs.len(), j.len()), (3, end2));
    }

    /// Many unsynced records after a torn one (an untar's, say) are still a power cut's
    /// work: only lookalike headers count towards the search's limit, not good records.
    #[test]
    fn thousands_of_unsynced_records_after_a_torn_one_are_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (p, id, _, mut j) = one_record_synced_ahead(dir.path());
        let synced_end = j.len();
        for n in 0..5000 {
            let unlink = Change::Unlink {
                path: RawPath(format!("f{n}").into_bytes()),
            };
            j.append(&unlink, (1, 0), &[]).unwrap();
        }
        drop(j);
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0x55], synced_end + 30).unwrap();
        let (j, recs) = Journal::open(&p, id, true).unwrap();
        assert_eq!((recs.len(), j.len()), (1, synced_end));
    }

    /// A new journal in `dir` with one record of one block, synced with zeros ahead.
    fn one_record_synced_ahead(dir: &Path) -> (PathBuf, [u8; 16], Vec<u8>, Journal) {
        let (p, id, block) = (dir.join("j"), [7; 16], vec![0xcd; BLOCK as usize]);
        let mut j = Journal::create(&p, 0, id).unwrap();
        j.append(&data_change(1), (1, 0), &[&block]).unwrap();
        j.sync_ahead().unwrap();
        (p, id, block, j)
    }

    fn file_len(p: &Path) -> u64 {
        std::fs::metadata(p).unwrap().len()
    }

    #[test]
    fn a_sync_writes_zeros_ahead_and_reopening_ends_the_journal_there() {
        let dir = tempfile::tempdir().unwrap();
        let (p, id, block, mut j) = one_record_synced_ahead(dir.path());
        let ahead = file_len(&p);
        assert!(
            ahead >= j.len() + TAIL_AHEAD - 4096,
            "{ahead} after {}",
            j.len()
        );
        // Appends fill the zeros; the file grows again only when they run low.
        let mut last_end = j.len();
        for _ in 0..(TAIL_AHEAD - TAIL_LOW) / (2 * BLOCK) {
            j.append(&data_change(1), (1, 0), &[&block]).unwrap();
            j.sync_ahead().unwrap();
            last_end = j.len();
        }
        assert_eq!(file_len(&p), ahead, "no growth while zeros remain");
        drop(j);
        let (j, recs) = Journal::open(&p, id, false).unwrap();
        assert_eq!(recs.len() as u64, 1 + (TAIL_AHEAD - TAIL_LOW) / (2 * BLOCK));
        assert_eq!(j.len(), last_end);
        assert_eq!(file_len(&p), ahead, "a read-only open changes nothing");
        drop(j);
        let (j, _) = Journal::open(&p, id, true).unwrap();
        assert_eq!(
            file_len(&p),
            last_end + MARK_LEN,
            "opening for writing cuts the zeros off (and marks the end synced)"
        );
        assert_eq!(j.len(), last_end);
    }

    /// A record cut short inside the zeros written ahead is the torn end, not corruption,
    /// however much of the file follows it; a bad record with a good one after it is
    /// corruption.
    #[test]
    fn a_torn_record_before_zeros_is_the_end_and_a_bad_one_before_a_good_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let (p, id, block, mut j) = one_record_synced_ahead(dir.path());
        let good_end = j.len();
        let (_, d2) = j
            .append(&data_change(2), (1, 0), &[&block, &block])
            .unwrap();
        drop(j);
        assert!(file_len(&p) > good_end + 3 * BLOCK);
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        // Its second block never reached the disk.
        f.write_all_at(&vec![0; BLOCK as usize], d2 + BLOCK)
            .unwrap();
        let (j, recs) = Journal::open(&p, id, false).unwrap();
        assert_eq!((recs.len(), j.len()), (1, good_end));
        // Only its header reached the disk, torn: impossible length, zeros after.
        f.write_all_at(&[0xff; 8], good_end).unwrap();
        f.write_all_at(&vec![0; 2 * BLOCK as usize], good_end + 8)
            .unwrap();
        let (j, recs) = Journal::open(&p, id, true).unwrap();
        assert_eq!((recs.len(), j.len()), (1, good_end));
        assert_eq!(file_len(&p), good_end + MARK_LEN);
        drop((j, f));

        // The same shapes with a good record after them are corruption.
        let mut j = Journal::open(&p, id, true).unwrap().0;
        let (_, d2) = j.append(&data_change(1), (1, 0), &[&block]).unwrap();
        j.append(&data_change(1), (1, 0), &[&block]).unwrap();
        j.sync_ahead().unwrap();
        drop(j);
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0], d2 + 10).unwrap();
        let err = Journal::open(&p, id, true).err().unwrap().to_string();
        assert!(err.contains("with records after it"), "{err}");
        f.write_all_at(&[0xff; 8], good_end).unwrap();
        let err = Journal::open(&p, id, true).err().unwrap().to_string();
        assert!(err.contains("impossible length"), "{err}");
    }

    /// Garbage that looks like thousands of record headers after a bad record is not
    /// checked without end: past a bound the journal is refused, not cut.
    #[test]
    fn endless_lookalike_headers_after_a_bad_record_are_refused_not_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (p, id, _, j) = one_record_synced_ahead(dir.path());
        let good_end = j.len();
        drop(j);
        let mut fake = Vec::new();
        for _ in 0..5000 {
            // A whole empty record by shape, with a later sequence number and a wrong CRC.
            fake.extend_from_slice(&24u32.to_le_bytes());
            fake.extend_from_slice(&1u32.to_le_bytes());
            fake.extend_from_slice(&99u64.to_le_bytes());
            fake.extend_from_slice(&[0; 8]);
        }
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0xff; 8], good_end).unwrap();
        f.write_all_at(&fake, good_end + 24).unwrap();
        let err = Journal::open(&p, id, true).err().unwrap().to_string();
        assert!(err.contains("impossible length"), "{err}");
        // With fewer of them, none good, it is a torn end.
        f.set_len(good_end + 24 + 100 * 24).unwrap();
        let (j, recs) = Journal::open(&p, id, true).unwrap();
        assert_eq!((recs.len(), j.len()), (1, good_end));
    }

    /// An empty journal in a temporary directory (gone with the first value), and its path.
    fn new_journal() -> (tempfile::TempDir, PathBuf, Journal) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let j = Journal::create(&p, 0, [7; 16]).unwrap();
        (dir, p, j)
    }

    /// Data of `blocks` blocks, different for every `seed`.
    fn blocks_of(blocks: u64, seed: u8) -> Vec<u8> {
        (0..blocks * BLOCK)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    /// A read planned past the journal's end (which only a bug makes) fails instead of
    /// waiting forever for bytes nothing will write, also after records written behind.
    #[test]
    fn a_wait_for_bytes_past_the_journal_s_end_fails_at_once() {
        let (_dir, _p, mut j) = new_journal();
        let data = blocks_of(1, 1);
        let (_, at) = j.append(&data_change(1), (1, 0), &[&data]).unwrap();
        let r = j.reader();
        r.wait_written(at + data.len() as u64).unwrap();
        let err = r.wait_written(j.end + BLOCK).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        let big = blocks_of(BEHIND_MIN / BLOCK, 2);
        let (_, at) = j
            .append(&data_change(BEHIND_MIN / BLOCK), (1, 0), &[&big])
            .unwrap();
        let r = j.reader();
        r.wait_written(at + big.len() as u64).unwrap();
        let err = r.wait_written(at + big.len() as u64 + BLOCK).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        j.close();
    }

    /// Large records go to the file behind the appends, small ones behind them in order:
    /// every record's data reads back as soon as it is appended (a reader waits for it),
    /// a snapshot, a reopening and a cut find them all whole, and the room allocated
    /// ahead is given back when the journal goes.
    #[test]
    fn records_written_behind_read_back_at_once_and_reopen_whole() {
        let (_dir, p, mut j) = new_journal();
        let id = [7; 16];
        let big = BEHIND_MIN / BLOCK;
        // Large, small behind a large one, large ones back to back, large and small.
        let sizes = [big, 1, 2, big * 4, big, 3, big * 16, 1, big + 1, 1];
        let mut appended = Vec::new();
        for (n, &blocks) in sizes.iter().enumerate() {
            let data = blocks_of(blocks, n as u8);
            let (seq, at) = j.append(&data_change(blocks), (1, 0), &[&data]).unwrap();
            assert_eq!(seq, n as u64 + 1);
            if blocks >= big {
                assert!(at.is_multiple_of(ALIGN), "data of record {seq} at {at}");
            }
            let r = j.reader();
            r.wait_written(at + data.len() as u64).unwrap();
            let mut back = vec![0; data.len()];
            r.file.read_exact_at(&mut back, at).unwrap();
            assert!(back == data, "record {seq} read back other data");
            appended.push((at, data));
        }
        let snap = j.snapshot();
        assert_eq!(records_of(&snap).len(), sizes.len());
        j.sync().unwrap();
        j.close();
        drop((j, snap));
        let len = std::fs::metadata(&p).unwrap().len();
        let used = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&p).unwrap()) * 512;
        assert!(
            used < len + ALLOCATE_STEP / 2,
            "{used} bytes allocated for a journal of {len} after it was closed"
        );
        let (mut j, recs) = Journal::open(&p, id, true).unwrap();
        assert_eq!(recs.len(), sizes.len());
        for (r, (at, data)) in recs.iter().zip(&appended) {
            assert_eq!(r.data_offset, *at);
            let mut back = vec![0; data.len()];
            j.file().read_exact_at(&mut back, *at).unwrap();
            assert!(back == *data, "record {} changed on reopening", r.seq);
        }
        // More written behind, then cut after the first record: none of it lands past the
        // cut.
        for n in 0..4 {
            let data = blocks_of(big * 8, 100 + n);
            j.append(&data_change(big * 8), (1, 0), &[&data]).unwrap();
        }
        j.truncate(recs[0].end(), 1).unwrap();
        drop(j);
        let (j, recs) = Journal::open(&p, id, true).unwrap();
        assert_eq!((recs.len(), j.len()), (1, recs[0].end()));
        assert_eq!(
            std::fs::metadata(&p).unwrap().len(),
            recs[0].end() + MARK_LEN
        );
    }

    /// Records queued while the writer is busy go out together, in one write of whole
    /// pages (each head in the page before its data), as long as they follow one another
    /// page-aligned; a small record ends the run, and the next large one, starting off a
    /// page boundary, is written on its own. All of them reopen whole.
    #[test]
    fn records_queued_together_are_written_in_one_call_and_reopen_whole() {
        // Beside the sources (a disk file system that takes O_DIRECT), not in /tmp (which
        // may be a tmpfs): the batch must go out the direct way to prove anything.
        let dir = tempfile::tempdir_in(".").unwrap();
        let p = dir.path().join("j");
        let mut j = Journal::create(&p, 0, [7; 16]).unwrap();
        let big = BEHIND_MIN / BLOCK;
        // The first large record, after the file header, does not start on a page; the
        // ones after it do.
        let sizes = [big, big * 2, big, big * 4, 1, big * 2, big];
        j.flight.hold(true);
        let mut appended = Vec::new();
        for (n, &blocks) in sizes.iter().enumerate() {
            let data = blocks_of(blocks, 40 + n as u8);
            let (_, at) = j.append(&data_change(blocks), (1, 0), &[&data]).unwrap();
            appended.push((at, data));
        }
        j.flight.hold(false);
        j.sync().unwrap();
        // The first alone (off a page), three together, the small one, the large one after
        // it (off a page again, so head and data are written apart), and the last one (on a
        // page, but after a record that is not whole pages).
        assert_eq!(j.flight.batches(), [1, 3, 1, 1, 1]);
        assert!(
            j.flight.writes_direct(),
            "the records were not written with O_DIRECT"
        );
        drop(j);
        let (j, recs) = Journal::open(&p, [7; 16], true).unwrap();
        assert_eq!(recs.len(), sizes.len());
        for (r, (at, data)) in recs.iter().zip(&appended) {
            assert_eq!(r.data_offset, *at);
            let mut back = vec![0; data.len()];
            j.file().read_exact_at(&mut back, *at).unwrap();
            assert!(back == *data, "record {} read back other data", r.seq);
        }
    }

    /// A sync waits for the records in flight (a program's fsync acknowledges them), and
    /// so does a reader of their data, while a reader of data already written does not.
    #[test]
    fn a_sync_waits_for_the_records_in_flight() {
        let (_dir, _, mut j) = new_journal();
        let big = BEHIND_MIN / BLOCK;
        let first = blocks_of(big, 1);
        let (_, first_at) = j.append(&data_change(big), (1, 0), &[&first]).unwrap();
        j.sync().unwrap();
        j.flight.hold(true);
        for n in 0..3 {
            let data = blocks_of(big * 2, n);
            j.append(&data_change(big * 2), (1, 0), &[&data]).unwrap();
        }
        // Written before the hold: read at once.
        let r = j.reader();
        r.wait_written(first_at + first.len() as u64).unwrap();
        let end = j.len();
        let j = Arc::new(j);
        let (done_tx, done) = std::sync::mpsc::channel();
        let syncing = {
            let j = j.clone();
            std::thread::spawn(move || {
                j.sync().unwrap();
                done_tx.send(j.file.metadata().unwrap().len()).unwrap();
            })
        };
        // While the writer is held, the sync cannot be done: if it says it is, it did not
        // wait (the bound only keeps a broken build from hanging here).
        let early = done.recv_timeout(std::time::Duration::from_millis(300));
        assert!(early.is_err(), "a sync returned with records in flight");
        j.flight.hold(false);
        let len_at_sync = done.recv().unwrap();
        syncing.join().unwrap();
        // The records, and the sync's mark after them.
        assert_eq!(
            len_at_sync,
            end + MARK_LEN,
            "the file's length when the sync returned"
        );
    }

    /// A snapshot (what `status` and `log` of a mounted store read) waits for the records
    /// appended before it was taken, not for those appended since: a program writing on
    /// does not hold up `status`.
    #[test]
    fn a_snapshot_does_not_wait_for_records_appended_after_it() {
        let (_dir, _, mut j) = new_journal();
        let big = BEHIND_MIN / BLOCK;
        for n in 0..2 {
            let data = blocks_of(big, n);
            j.append(&data_change(big), (1, 0), &[&data]).unwrap();
        }
        let snap = j.snapshot();
        j.flight.hold(true);
        let data = blocks_of(big, 9);
        j.append(&data_change(big), (1, 0), &[&data]).unwrap();
        let (tx, read) = std::sync::mpsc::channel();
        let reading = std::thread::spawn(move || {
            tx.send(records_of(&snap).len()).unwrap();
        });
        // Bounded only so that a broken build fails instead of hanging.
        let got = read.recv_timeout(std::time::Duration::from_secs(20));
        j.flight.hold(false);
        reading.join().unwrap();
        assert_eq!(
            got.ok(),
            Some(2),
            "the snapshot's records, read while a later one waits"
        );
    }
}
