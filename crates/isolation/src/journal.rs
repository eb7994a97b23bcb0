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
//! ```
//! A record whose length runs past the end of the file, or the last record when its CRC
//! fails, is a write cut short by a crash: it was never acknowledged by fsync, and opening
//! the journal for writing cuts it off. A bad record with good data after it is corruption:
//! opening refuses, naming the offset.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::change::{Change, Time};
use crate::Error;

pub const HEADER_LEN: u64 = 64;
const MAGIC: &[u8; 8] = b"IPJOURN1";
const VERSION: u32 = 1;
const RECORD_HEADER: u64 = 24;
/// Largest record accepted when reading: a change carries at most a few MiB of data.
const MAX_RECORD: u64 = 64 << 20;

/// What a record's JSON holds: the change and when it was made.
#[derive(serde::Serialize, serde::Deserialize)]
struct Entry<C> {
    at: Time,
    #[serde(flatten)]
    change: C,
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
    base_seq: u64,
    last_seq: u64,
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
        file.sync_all().map_err(|e| Error::io(path, e))?;
        Ok(Journal {
            path: path.to_path_buf(),
            file: Arc::new(file),
            end: HEADER_LEN,
            base_seq,
            last_seq: base_seq,
        })
    }

    /// Opens and scans a journal. With `repair`, a torn last record is cut off (it was
    /// never acknowledged); without, the journal is left as it is and the torn record
    /// ignored.
    pub fn open(
        path: &Path,
        store_id: [u8; 16],
        repair: bool,
    ) -> Result<(Journal, Vec<Record>), Error> {
        let file = OpenOptions::new()
            .read(true)
            .write(repair)
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
        let mut records = Vec::new();
        let mut off = HEADER_LEN;
        let mut last_seq = base_seq;
        let mut buf = Vec::new();
        while off < len {
            let torn = |why: String| -> Result<(), Error> {
                tracing::warn!(
                    "{}: cutting off an unfinished last record at offset {off} ({why})",
                    path.display()
                );
                Ok(())
            };
            if len - off < RECORD_HEADER {
                torn(format!("{} bytes of a record header", len - off))?;
                break;
            }
            let mut rh = [0u8; RECORD_HEADER as usize];
            file.read_exact_at(&mut rh, off)
                .map_err(|e| Error::io(path, e))?;
            let rlen = u32::from_le_bytes(rh[0..4].try_into().unwrap()) as u64;
            let rcrc = u32::from_le_bytes(rh[4..8].try_into().unwrap());
            let seq = u64::from_le_bytes(rh[8..16].try_into().unwrap());
            let meta_len = u32::from_le_bytes(rh[16..20].try_into().unwrap()) as u64;
            let data_len = u32::from_le_bytes(rh[20..24].try_into().unwrap()) as u64;
            if !(RECORD_HEADER..=MAX_RECORD).contains(&rlen) {
                if rlen == 0 && rh.iter().all(|&b| b == 0) {
                    // Zeros where a record should start: space allocated but never written.
                    torn("zeros".into())?;
                    break;
                }
                return Err(corrupt(
                    path,
                    format!("record at offset {off}: impossible length {rlen}"),
                ));
            }
            if off + rlen > len {
                torn(format!("record of {rlen} bytes, {} in the file", len - off))?;
                break;
            }
            buf.resize(rlen as usize, 0);
            file.read_exact_at(&mut buf, off)
                .map_err(|e| Error::io(path, e))?;
            let crc_ok = crc_of(&[&buf[8..]]) == rcrc;
            let shape_ok = RECORD_HEADER + meta_len + data_len == rlen;
            if !crc_ok || !shape_ok {
                if off + rlen == len {
                    torn("checksum mismatch in the last record".into())?;
                    break;
                }
                return Err(corrupt(
                    path,
                    format!("record at offset {off} (seq {seq}): checksum mismatch, with records after it"),
                ));
            }
            if seq != last_seq + 1 {
                return Err(corrupt(
                    path,
                    format!("record at offset {off}: sequence {seq} follows {last_seq}"),
                ));
            }
            let meta = &buf[RECORD_HEADER as usize..(RECORD_HEADER + meta_len) as usize];
            let Entry { at, change }: Entry<Change> = serde_json::from_slice(meta)
                .map_err(|e| corrupt(path, format!("record at offset {off} (seq {seq}): {e}")))?;
            if change.data_len() != data_len {
                return Err(corrupt(
                    path,
                    format!("record at offset {off} (seq {seq}): {data_len} bytes of data for {} bytes of blocks", change.data_len()),
                ));
            }
            records.push(Record {
                seq,
                at,
                offset: off,
                data_offset: off + RECORD_HEADER + meta_len,
                change,
            });
            last_seq = seq;
            off += rlen;
        }
        if repair && off < len {
            file.set_len(off).map_err(|e| Error::io(path, e))?;
            file.sync_all().map_err(|e| Error::io(path, e))?;
        }
        Ok((
            Journal {
                path: path.to_path_buf(),
                file: Arc::new(file),
                end: off,
                base_seq,
                last_seq,
            },
            records,
        ))
    }

    /// Appends a change with its data; returns its sequence number and data offset.
    /// Written to the file (so visible to readers) but durable only after [`Journal::sync`].
    pub fn append(
        &mut self,
        change: &Change,
        at: Time,
        data: &[&[u8]],
    ) -> Result<(u64, u64), Error> {
        let meta = serde_json::to_vec(&Entry { at, change }).expect("changes serialise");
        let data_len: u64 = data.iter().map(|d| d.len() as u64).sum();
        debug_assert_eq!(data_len, change.data_len());
        let len = RECORD_HEADER + meta.len() as u64 + data_len;
        if len > MAX_RECORD {
            return Err(Error::TooLarge(len));
        }
        let seq = self.last_seq + 1;
        let mut head = Vec::with_capacity(RECORD_HEADER as usize + meta.len());
        head.extend_from_slice(&(len as u32).to_le_bytes());
        head.extend_from_slice(&[0; 4]);
        head.extend_from_slice(&seq.to_le_bytes());
        head.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        head.extend_from_slice(&(data_len as u32).to_le_bytes());
        head.extend_from_slice(&meta);
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
            // Leave no partial record behind: the next append would follow garbage.
            let _ = self.file.set_len(start);
            Error::io(&self.path, e)
        })?;
        self.end = start + len;
        self.last_seq = seq;
        Ok((seq, start + head.len() as u64))
    }

    pub fn sync(&self) -> Result<(), Error> {
        self.file.sync_data().map_err(|e| Error::io(&self.path, e))
    }

    /// The file, for reading data blocks (kept alive by readers across a compaction).
    pub fn file(&self) -> &Arc<File> {
        &self.file
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
    pub fn is_empty(&self) -> bool {
        self.last_seq == self.base_seq
    }

    /// Cuts the journal after the record ending at `end` (whose sequence is `seq`).
    pub fn truncate(&mut self, end: u64, seq: u64) -> Result<(), Error> {
        self.file
            .set_len(end)
            .map_err(|e| Error::io(&self.path, e))?;
        self.file.sync_all().map_err(|e| Error::io(&self.path, e))?;
        self.end = end;
        self.last_seq = seq;
        Ok(())
    }
}

fn write_all_vectored_at(
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
        assert_eq!(std::fs::metadata(&p).unwrap().len(), good_end);
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
    }
}
