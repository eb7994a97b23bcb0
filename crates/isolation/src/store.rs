//! The store directory: `store.json` (which backing directory it belongs to), `journal`
//! (pending changes), `commit` (present only while a commit is under way), `lock` (held by
//! the one process using the store), `control.sock` (the mounted daemon's socket) and
//! `reserve` (room held back so that a store whose file system filled up can still be
//! committed).

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ahead::Ahead;
use crate::backing::{self, Backing};
use crate::change::{Change, RawPath};
use crate::journal::{Journal, Record, HEADER_LEN};
use crate::Error;

const META: &str = "store.json";
const JOURNAL: &str = "journal";
const JOURNAL_NEW: &str = "journal.new";
const COMMIT: &str = "commit";
const LOCK: &str = "lock";
/// store.json while it is written (renamed into place when whole).
const META_TMP: &str = "store.json.tmp";
pub const SOCKET: &str = "control.sock";
/// Blocks held back for a commit on a file system the store filled: its state and the
/// compacted journal's first block need room before the commit frees any.
const RESERVE: &str = "reserve";
const RESERVE_LEN: u64 = 64 << 10;
const FORMAT: &str = "interpose-isolation-store";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Meta {
    pub format: String,
    pub version: u32,
    /// 32 hex digits; also in the journal's header.
    pub id: String,
    /// The backing directory, absolute.
    #[serde(with = "crate::change::raw_path_buf")]
    pub backing: PathBuf,
    pub backing_dev: u64,
    pub backing_ino: u64,
    pub created: String,
    /// Changes are applied to the backing directory as they happen; the journal is a
    /// trail of them, never pending.
    #[serde(default)]
    pub write_through: bool,
}

impl Meta {
    /// The id as the journal header holds it.
    pub fn id_bytes(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(self.id.get(2 * i..2 * i + 2).unwrap_or("00"), 16).unwrap_or(0);
        }
        out
    }
}

/// What `isolation status` reports.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    #[serde(with = "crate::change::raw_path_buf")]
    pub store: PathBuf,
    #[serde(with = "crate::change::raw_path_buf")]
    pub backing: PathBuf,
    /// Sequence number of the last change (0: none ever).
    pub last_seq: u64,
    /// Changes up to this number are in the backing directory.
    pub committed_upto: u64,
    pub pending_changes: u64,
    /// Distinct paths with pending changes.
    pub files: u64,
    /// Bytes of file data held for pending changes.
    pub data_bytes: u64,
    /// Bytes the store takes on disk.
    pub store_bytes: u64,
    /// Of `store_bytes`, zeros written ahead after the journal's last record (at most
    /// about 1.25 MiB; see docs/ISOLATION.md).
    #[serde(default)]
    pub journal_ahead_bytes: u64,
    /// A commit was interrupted and must be run again (up to this number).
    pub interrupted_commit: Option<u64>,
    /// Of that commit, the changes up to this number are in BACKING already.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interrupted_commit_applied: Option<u64>,
    /// That commit stopped on an error before the change after `interrupted_commit_applied`
    /// (rather than being cut short): a discard may throw away any change after it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub interrupted_commit_stopped: bool,
    pub mounted: bool,
    /// Mounted: files and directories the daemon's view holds in memory (those with
    /// changes, and those the kernel has looked up and not yet forgotten).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub view_nodes: Option<u64>,
    /// Copies of journal bytes cut off (a power cut's unsynced records, or a discard of
    /// damage) kept in the store, by name: to read, then delete.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kept_cuts: Vec<String>,
}

/// Journal bytes a discard cut off, kept in a copy: where they started, and the copy.
pub struct KeptCut {
    pub at: u64,
    pub copy: PathBuf,
}

/// One line of `isolation log`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LogEntry {
    pub seq: u64,
    /// When the change was made (seconds and nanoseconds since the epoch).
    #[serde(default)]
    pub at: crate::change::Time,
    #[serde(flatten)]
    pub change: Change,
    #[serde(skip_serializing_if = "is_zero", default)]
    pub data_bytes: u64,
    /// Directories whose times a commit keeps (see [`Record::keep_times`]).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub keep_times: Vec<RawPath>,
}

/// What `status` counts of the pending records, one record at a time.
#[derive(Default)]
pub struct Tally {
    paths: BTreeSet<RawPath>,
    data: u64,
    changes: u64,
}

impl Tally {
    pub fn add(&mut self, r: &Record) {
        if let (Some(p), _) = r.change.paths() {
            if !self.paths.contains(p) {
                self.paths.insert(p.clone());
            }
        }
        self.data += r.change.data_len();
        self.changes += 1;
    }
}

/// [`LogEntry`] borrowing its change from a record: serialises the same.
#[derive(Serialize)]
pub struct LogEntryRef<'a> {
    pub seq: u64,
    pub at: crate::change::Time,
    #[serde(flatten)]
    pub change: &'a Change,
    #[serde(skip_serializing_if = "is_zero")]
    pub data_bytes: u64,
    #[serde(skip_serializing_if = "<[RawPath]>::is_empty")]
    pub keep_times: &'a [RawPath],
}

impl<'a> LogEntryRef<'a> {
    pub fn of(r: &'a Record) -> LogEntryRef<'a> {
        LogEntryRef {
            seq: r.seq,
            at: r.at,
            change: &r.change,
            data_bytes: r.change.data_len(),
            keep_times: &r.keep_times,
        }
    }
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Progress of the check of a store's journal as it is opened, for a progress bar.
#[derive(Clone, Copy, Debug, Default)]
pub struct JournalCheck {
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// Progress of a commit, for a progress bar.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct CommitProgress {
    pub changes_done: u64,
    pub changes_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// Where an interrupted commit stands (file `commit`, 48 bytes, rewritten in place).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct CommitState {
    target: u64,
    applied: u64,
    /// What the change under way, number `noted_seq`, noted before it began, to be run
    /// again right: a RENAME_EXCHANGE the inode then at `from`; a change to the data of a
    /// file its owner had to be let write the mode to put back (see
    /// `backing::apply_lifting`).
    noted_seq: u64,
    noted: u64,
    /// The commit stopped on an error before change `applied + 1`: nothing after it was
    /// touched (but that change, in part). Otherwise (killed) it may have gone on
    /// without recording it, up to its next fence (see `unrecorded_end`).
    stopped: bool,
}

/// Version 1 had no flags (and its checksum covered bytes 0..40); it is still read.
const STATE_MAGIC_V1: &[u8; 8] = b"IPCOMIT1";
const STATE_MAGIC: &[u8; 8] = b"IPCOMIT2";
const STATE_STOPPED: u32 = 1;

impl CommitState {
    fn encode(&self) -> [u8; 48] {
        let mut b = [0u8; 48];
        b[0..8].copy_from_slice(STATE_MAGIC);
        b[8..16].copy_from_slice(&self.target.to_le_bytes());
        b[16..24].copy_from_slice(&self.applied.to_le_bytes());
        b[24..32].copy_from_slice(&self.noted_seq.to_le_bytes());
        b[32..40].copy_from_slice(&self.noted.to_le_bytes());
        let flags = if self.stopped { STATE_STOPPED } else { 0 };
        b[40..44].copy_from_slice(&flags.to_le_bytes());
        let crc = crc32c::crc32c(&b[..44]);
        b[44..48].copy_from_slice(&crc.to_le_bytes());
        b
    }
    fn decode(b: &[u8]) -> Option<CommitState> {
        if b.len() < 48 {
            return None;
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        let flags = match &b[0..8] {
            m if m == STATE_MAGIC && u32_at(44) == crc32c::crc32c(&b[..44]) => u32_at(40),
            m if m == STATE_MAGIC_V1 && u32_at(40) == crc32c::crc32c(&b[..40]) => 0,
            _ => return None,
        };
        let u = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        Some(CommitState {
            target: u(8),
            applied: u(16),
            noted_seq: u(24),
            noted: u(32),
            stopped: flags & STATE_STOPPED != 0,
        })
    }
}

pub struct Store {
    dir: PathBuf,
    meta: Meta,
    _lock: StoreLock,
}

fn rfc3339_now() -> String {
    let (s, _) = crate::view::now();
    interpose_time(s)
}

fn interpose_time(secs: i64) -> String {
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Bytes allocated to `f`.
fn allocated(f: &File) -> u64 {
    use std::os::unix::fs::MetadataExt;
    f.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
}

/// A store is used only by the user who owns its directory, and only if no one else may
/// write there. Anyone who could put files in it could make its user write what they
/// chose into BACKING at the commit (a journal of their making), or into files of their
/// choosing through symlinks named like the store's files.
fn refuse_unless_own(dir: &Path) -> Result<(), Error> {
    use std::os::unix::fs::MetadataExt;
    let md = match std::fs::metadata(dir) {
        Ok(md) => md,
        // Said by what opens it, in its own words.
        Err(_) => return Ok(()),
    };
    let me = rustix::process::geteuid().as_raw();
    if md.uid() != me {
        return Err(Error::Control(format!(
            "the store {} belongs to uid {}, not to this user (uid {me}): a store is used \
             only by its owner; run this as its owner, or give it to this user (chown -R)",
            dir.display(),
            md.uid()
        )));
    }
    if md.mode() & 0o022 != 0 {
        return Err(Error::Control(format!(
            "the store {} may be written by other users (mode {:o}); make it its owner's \
             only: chmod 700 {}",
            dir.display(),
            md.mode() & 0o7777,
            dir.display()
        )));
    }
    Ok(())
}

/// The locks a process holds on a store while it uses it (see [`Store::lock`]).
#[derive(Debug)]
struct StoreLock {
    _dir: File,
    _file: File,
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

impl Store {
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn meta(&self) -> &Meta {
        &self.meta
    }
    pub fn socket_path(dir: &Path) -> PathBuf {
        dir.join(SOCKET)
    }

    /// Takes the store for this process: flock(2) on the directory itself, which no one
    /// can delete while it holds a store (a lock file alone, deleted by a cleaner of temp
    /// files, let a commit run beside the mount), and on `lock` (what older versions
    /// take).
    fn lock(dir: &Path) -> Result<StoreLock, Error> {
        let d = File::open(dir).map_err(|e| Error::io(dir, e))?;
        match rustix::fs::flock(&d, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => return Err(Error::Busy(dir.to_path_buf())),
            Err(e) => return Err(Error::io(dir, e.into())),
        }
        Ok(StoreLock {
            _dir: d,
            _file: Self::lock_file(dir)?,
        })
    }

    fn lock_file(dir: &Path) -> Result<File, Error> {
        use std::os::unix::fs::OpenOptionsExt;
        let p = dir.join(LOCK);
        // (Never through a symlink: that would be someone else's file.)
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&p)
            .map_err(|e| Error::io(&p, e))?;
        match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(f),
            Err(rustix::io::Errno::WOULDBLOCK) => Err(Error::Busy(dir.to_path_buf())),
            Err(e) => Err(Error::io(&p, e.into())),
        }
    }

    /// Opens the store for `backing`, making it if `dir` does not exist or is empty.
    pub fn open_or_create(dir: &Path, backing: &Path, write_through: bool) -> Result<Store, Error> {
        let backing = backing.canonicalize().map_err(|e| Error::io(backing, e))?;
        let st = std::fs::metadata(&backing).map_err(|e| Error::io(&backing, e))?;
        use std::os::unix::fs::MetadataExt;
        // Refuse a store inside BACKING before creating anything there.
        let abs = std::path::absolute(dir).map_err(|e| Error::io(dir, e))?;
        let mut existing = abs.as_path();
        while !existing.exists() {
            existing = existing.parent().unwrap_or(Path::new("/"));
        }
        // The part still to be made is made one directory at a time, so its `..` is the
        // directory made before it; a name on the way that exists after a `..`
        // (`new/../link`) is followed where it leads.
        let mut real = existing
            .canonicalize()
            .map_err(|e| Error::io(existing, e))?;
        let mut rest: std::collections::VecDeque<std::ffi::OsString> = abs
            .strip_prefix(existing)
            .unwrap_or(Path::new(""))
            .iter()
            .map(|c| c.to_owned())
            .collect();
        let mut links = 0;
        while let Some(name) = rest.pop_front() {
            match name.to_str() {
                Some("..") => {
                    real.pop();
                }
                Some(".") => {}
                _ => {
                    real.push(&name);
                    if let Ok(resolved) = real.canonicalize() {
                        real = resolved;
                    } else if real.is_symlink() {
                        // Dangling: what gets made is where it points.
                        links += 1;
                        let target = std::fs::read_link(&real)
                            .ok()
                            .filter(|_| links <= 40)
                            .ok_or_else(|| {
                                Error::Control(format!(
                                    "the store {}: too many symbolic links, or one that cannot be read, on the way",
                                    dir.display()
                                ))
                            })?;
                        real.pop();
                        if target.is_absolute() {
                            real = PathBuf::from("/");
                        }
                        for (i, c) in target.iter().filter(|c| *c != "/").enumerate() {
                            rest.insert(i, c.to_owned());
                        }
                    }
                }
            }
        }
        refuse_inside(dir, &backing, &real)?;
        let fresh = match std::fs::read_dir(dir) {
            // Empty, or what a creation that failed half-way (a full disk) left: the
            // files made before store.json, which is made last; no change is recorded
            // before it exists.
            Ok(it) => {
                // Before anything in it is opened or removed.
                refuse_unless_own(dir)?;
                let names: Vec<_> = it.flatten().map(|e| e.file_name()).collect();
                let leftover = names
                    .iter()
                    .all(|n| [JOURNAL, LOCK, META_TMP, RESERVE].iter().any(|m| n == *m));
                if leftover && !names.is_empty() {
                    // Under the lock: another process may be making it right now.
                    let _lock = Self::lock(dir)?;
                    for name in [JOURNAL, META_TMP] {
                        let _ = std::fs::remove_file(dir.join(name));
                    }
                }
                leftover
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Its owner's only: it holds the data of every file changed in the view.
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(|e| Error::io(dir, e))?;
                true
            }
            Err(e) => return Err(Error::io(dir, e)),
        };
        let dir = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
        refuse_inside(&dir, &backing, &dir)?;
        if fresh {
            let lock = Self::lock(&dir)?;
            let id: [u8; 16] = rand::random();
            let meta = Meta {
                format: FORMAT.into(),
                version: 1,
                id: id.iter().map(|b| format!("{b:02x}")).collect(),
                backing: backing.clone(),
                backing_dev: st.dev(),
                backing_ino: st.ino(),
                created: rfc3339_now(),
                write_through,
            };
            let made = (|| {
                Journal::create(&dir.join(JOURNAL), 0, id)?;
                let tmp = dir.join(META_TMP);
                let mut f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
                f.write_all(&serde_json::to_vec_pretty(&meta).expect("serialises"))
                    .and_then(|_| f.sync_all())
                    .map_err(|e| Error::io(&tmp, e))?;
                std::fs::rename(&tmp, dir.join(META)).map_err(|e| Error::io(&tmp, e))?;
                sync_dir(&dir)
            })();
            if let Err(e) = made {
                // Nothing half-made stays: the same command works once there is room.
                // (The lock file stays: another process may be waiting on it.)
                for name in [JOURNAL, META_TMP] {
                    let _ = std::fs::remove_file(dir.join(name));
                }
                return Err(e);
            }
            let store = Store {
                dir,
                meta,
                _lock: lock,
            };
            store.keep_reserve();
            return Ok(store);
        }
        let store = Self::open(&dir).map_err(|e| match e {
            // Mounting with --isolate is what the user did: the directory is the trouble.
            Error::NotAStore(d) => Error::Control(format!(
                "{} is neither an isolation store (no store.json) nor empty; give --isolate \
                 a new or empty directory",
                d.display()
            )),
            e => e,
        })?;
        if store.meta.write_through != write_through {
            return Err(Error::Control(format!(
                "store {} was made {}; mount it {}",
                dir.display(),
                if store.meta.write_through {
                    "for --write-through"
                } else {
                    "for isolation"
                },
                if store.meta.write_through {
                    "with --write-through"
                } else {
                    "without --write-through"
                },
            )));
        }
        if store.meta.backing != backing
            || store.meta.backing_dev != st.dev()
            || store.meta.backing_ino != st.ino()
        {
            return Err(Error::ForeignBacking {
                store: dir,
                recorded: format!(
                    "{} (device {}, inode {})",
                    store.meta.backing.display(),
                    store.meta.backing_dev,
                    store.meta.backing_ino
                ),
                given: format!(
                    "{} (device {}, inode {})",
                    backing.display(),
                    st.dev(),
                    st.ino()
                ),
            });
        }
        store.keep_reserve();
        Ok(store)
    }

    /// Opens an existing store and takes its lock ([`Error::Busy`] if a mount holds it).
    pub fn open(dir: &Path) -> Result<Store, Error> {
        refuse_unless_own(dir)?;
        let p = dir.join(META);
        // A few hundred bytes; read no more than this of whatever is there (a link to
        // /dev/zero was read until memory ran out).
        const META_MAX: u64 = 1 << 20;
        let text = match File::open(&p).and_then(|f| {
            let mut text = Vec::new();
            use std::io::Read;
            f.take(META_MAX + 1).read_to_end(&mut text).map(|_| text)
        }) {
            Ok(t) if t.len() as u64 > META_MAX => {
                return Err(Error::Corrupt {
                    path: p,
                    what: format!("larger than {} MiB", META_MAX >> 20),
                })
            }
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotAStore(dir.to_path_buf()))
            }
            Err(e) => return Err(Error::io(&p, e)),
        };
        let meta: Meta = serde_json::from_slice(&text).map_err(|e| Error::Corrupt {
            path: p.clone(),
            what: e.to_string(),
        })?;
        if meta.format != FORMAT || meta.version != 1 {
            return Err(Error::Corrupt {
                path: p,
                what: format!(
                    "format {} version {}, this build reads {FORMAT} 1",
                    meta.format, meta.version
                ),
            });
        }
        let lock = Self::lock(dir)?;
        Ok(Store {
            dir: dir.to_path_buf(),
            meta,
            _lock: lock,
        })
    }

    /// Opens the backing directory, checking it is still the one the store belongs to.
    pub fn backing(&self) -> Result<Backing, Error> {
        let b = Backing::open(&self.meta.backing).map_err(|e| Error::io(&self.meta.backing, e))?;
        if b.dev() != self.meta.backing_dev || b.root_ino() != self.meta.backing_ino {
            return Err(Error::ForeignBacking {
                store: self.dir.clone(),
                recorded: format!(
                    "{} (device {}, inode {})",
                    self.meta.backing.display(),
                    self.meta.backing_dev,
                    self.meta.backing_ino
                ),
                given: format!(
                    "what is there now (device {}, inode {})",
                    b.dev(),
                    b.root_ino()
                ),
            });
        }
        Ok(b)
    }

    /// The journal and its records; a torn last record is cut off.
    /// Records an interrupted commit applied already are left out: they are in BACKING.
    /// Every record's data is read to check it, gigabytes in a large store: `progress`
    /// hears how far that has come.
    pub fn journal(
        &self,
        progress: &mut dyn FnMut(JournalCheck),
    ) -> Result<(Journal, Vec<Record>), Error> {
        let _ = std::fs::remove_file(self.dir.join(JOURNAL_NEW));
        let opened = Journal::open_reporting(
            &self.dir.join(JOURNAL),
            self.meta.id_bytes(),
            true,
            &mut |bytes_done, bytes_total| {
                progress(JournalCheck {
                    bytes_done,
                    bytes_total,
                })
            },
        )
        .map_err(|e| self.damage_beyond_cut(e))?;
        self.pending(opened)
    }

    /// A [`Error::Damaged`] journal that the discard the error names cannot cut (see
    /// [`Store::why_no_cut`]) is plain corruption, to be dealt with by hand.
    fn damage_beyond_cut(&self, e: Error) -> Error {
        match e {
            Error::Damaged {
                path,
                offset,
                last_good,
                what,
            } => match self.why_no_cut(offset, last_good) {
                Some(why) => Error::Corrupt {
                    path,
                    what: format!("{what}; {why}"),
                },
                None => Error::Damaged {
                    path,
                    offset,
                    last_good,
                    what,
                },
            },
            e => e,
        }
    }

    /// Why a discard cannot cut the journal at damage at `offset` after change
    /// `last_good`, if it cannot: a --write-through store does not discard, and an
    /// interrupted commit whose target is past `last_good` forbids it, unless it stopped
    /// on an error (the damage, say) at or before `last_good`: nothing after it was
    /// touched, and a discard ends it (see [`Store::discard`]).
    fn why_no_cut(&self, offset: u64, last_good: u64) -> Option<String> {
        if self.meta.write_through {
            return Some(format!(
                "a --write-through store cannot discard (its changes are in BACKING already), so nothing here cuts it off: keep a copy of the journal, then `truncate -s {offset}` it, which keeps the changes up to {last_good}"
            ));
        }
        match self.read_state() {
            Ok(Some(st)) if st.target > last_good && !(st.stopped && st.applied <= last_good) => Some(format!(
                "an interrupted commit up to change {} (applied up to {}) reaches past it, so it cannot be cut off by a discard: keep a copy of the store before anything else",
                st.target, st.applied
            )),
            _ => None,
        }
    }

    /// [`Store::journal`] for a discard: a damaged record with records after it (which
    /// [`Store::journal`] refuses) ends the journal there, and its offset comes back too,
    /// so that a discard after the changes before it can cut the damage off.
    pub fn journal_up_to_damage(
        &self,
        progress: &mut dyn FnMut(JournalCheck),
    ) -> Result<(Journal, Vec<Record>, Option<u64>), Error> {
        let _ = std::fs::remove_file(self.dir.join(JOURNAL_NEW));
        let (j, recs, damage) = Journal::open_up_to_damage(
            &self.dir.join(JOURNAL),
            self.meta.id_bytes(),
            &mut |bytes_done, bytes_total| {
                progress(JournalCheck {
                    bytes_done,
                    bytes_total,
                })
            },
        )?;
        if let Some(at) = damage {
            if let Some(why) = self.why_no_cut(at, j.last_seq()) {
                return Err(Error::Corrupt {
                    path: j.path().to_path_buf(),
                    what: format!("record at offset {at}; {why}"),
                });
            }
            // A commit that stopped before the damage (on it, say) comes down to the
            // changes before it, which the discard keeps or ends (see `why_no_cut`).
            if let Ok(Some(st)) = self.read_state() {
                if st.stopped && st.applied <= j.last_seq() {
                    self.lower_target(&st, j.last_seq())?;
                }
            }
        }
        let (j, recs) = self.pending((j, recs))?;
        Ok((j, recs, damage))
    }

    /// [`crate::journal::keep_from`] of the store's journal.
    fn keep_journal_from(&self, at: u64) -> Result<PathBuf, Error> {
        let path = self.dir.join(JOURNAL);
        crate::journal::keep_from(&path, at).map_err(|e| Error::io(&path, e))
    }

    /// [`Store::journal`] after this process wrote it (a commit or discard compacting
    /// records it had checked): the records' data is not read and checked again.
    pub fn journal_checked_before(&self) -> Result<(Journal, Vec<Record>), Error> {
        let opened = Journal::open_checked_before(&self.dir.join(JOURNAL), self.meta.id_bytes())?;
        self.pending(opened)
    }

    /// An opened journal with the records an interrupted commit applied left out.
    fn pending(
        &self,
        (j, mut recs): (Journal, Vec<Record>),
    ) -> Result<(Journal, Vec<Record>), Error> {
        if let Some(st) = self.read_state()? {
            // A commit writes its state before it applies anything and compacts the
            // journal only up to what it applied, so the journal always holds its span.
            let (base, last) = (j.base_seq(), j.last_seq());
            // (Not `noted_seq`: a discard lowering the target keeps it, stale.)
            let fits = base <= st.applied && st.applied <= st.target && st.target <= last;
            if !fits {
                return Err(Error::Corrupt {
                    path: self.dir.join(COMMIT),
                    what: format!(
                        "an interrupted commit up to change {} that applied up to {} does not fit the journal, which holds changes {}..={last} (remove it only knowing what BACKING holds)",
                        st.target,
                        st.applied,
                        base + 1,
                    ),
                });
            }
            recs.retain(|r| r.seq > st.applied);
        }
        Ok((j, recs))
    }

    /// The records of `records` (the journal's, as they are) a `discard --after` would
    /// leave pending, without discarding anything: to see first that they still make a
    /// view (a change that no longer fits BACKING cannot be kept).
    pub fn kept_by_discard(
        &self,
        records: &[Record],
        after: Option<u64>,
    ) -> Result<Vec<Record>, Error> {
        let applied = self.read_state()?.map_or(0, |st| st.applied);
        let after = after.unwrap_or(0);
        Ok(records
            .iter()
            .filter(|r| r.seq > applied && r.seq <= after)
            .cloned()
            .collect())
    }

    fn read_state(&self) -> Result<Option<CommitState>, Error> {
        let p = self.dir.join(COMMIT);
        match std::fs::read(&p) {
            Ok(b) => CommitState::decode(&b).map(Some).ok_or(Error::Corrupt {
                path: p,
                what: "unreadable commit state".into(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&p, e)),
        }
    }

    /// The target of an interrupted commit, if one is waiting to be run again.
    pub fn interrupted_commit(&self) -> Result<Option<u64>, Error> {
        Ok(self.read_state()?.map(|s| s.target))
    }

    /// The status, from the pending records counted into `tally`.
    pub fn status(&self, journal: &Journal, tally: &Tally, mounted: bool) -> Result<Status, Error> {
        let (paths, data) = (&tally.paths, tally.data);
        let (mut store_bytes, mut kept_cuts) = (0, Vec::new());
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            use std::os::unix::fs::MetadataExt;
            for e in rd.flatten() {
                if let Ok(m) = e.metadata() {
                    store_bytes += m.blocks() * 512;
                }
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("journal.cut-at-") {
                    kept_cuts.push(name);
                }
            }
        }
        kept_cuts.sort();
        journal.file(); // (waits for the records in flight)
        let journal_ahead_bytes = journal.ahead_len();
        let wt = self.meta.write_through;
        let state = self.read_state()?;
        Ok(Status {
            // Absolute, as the mounted daemon (which made the store) reports it.
            store: std::fs::canonicalize(&self.dir).unwrap_or_else(|_| self.dir.clone()),
            backing: self.meta.backing.clone(),
            last_seq: journal.last_seq(),
            committed_upto: if wt {
                journal.last_seq()
            } else {
                journal.base_seq()
            },
            pending_changes: if wt { 0 } else { tally.changes },
            files: paths.len() as u64,
            data_bytes: data,
            store_bytes,
            journal_ahead_bytes,
            interrupted_commit: state.map(|s| s.target),
            interrupted_commit_applied: state.map(|s| s.applied),
            interrupted_commit_stopped: state.is_some_and(|s| s.stopped),
            mounted,
            view_nodes: None,
            kept_cuts,
        })
    }

    /// Brings an interrupted commit's target (`st`) down to `target`, durably, if above.
    fn lower_target(&self, st: &CommitState, target: u64) -> Result<(), Error> {
        if st.target <= target {
            return Ok(());
        }
        let sp = self.dir.join(COMMIT);
        let sf = OpenOptions::new()
            .write(true)
            .open(&sp)
            .map_err(|e| Error::io(&sp, e))?;
        // A note of a change beyond the new target goes with it: a later change may get
        // that number once the journal is cut there.
        let noted_seq = if st.noted_seq > target {
            0
        } else {
            st.noted_seq
        };
        self.write_state(
            &sf,
            &CommitState {
                target,
                noted_seq,
                ..*st
            },
        )
    }

    /// Makes sure the store holds its reserve ([`RESERVE_LEN`] allocated bytes), as far
    /// as its file system has room: called when the store is opened for a mount, after a
    /// commit took part of it, and after each commit or discard once the replaced journal
    /// is closed. Allocated a block at a time, so that what fits stays, also where a
    /// failed allocation gives back all it took (tmpfs).
    pub fn keep_reserve(&self) {
        let p = self.dir.join(RESERVE);
        let made = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .and_then(|f| {
                let mut at = allocated(&f);
                while at < RESERVE_LEN {
                    match rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), at, 4096) {
                        Ok(()) => {}
                        // Written, where the file system cannot allocate without writing.
                        Err(rustix::io::Errno::OPNOTSUPP) => f.write_all_at(&[0; 4096], at)?,
                        Err(e) => return Err(e.into()),
                    }
                    at += 4096;
                }
                Ok(())
            });
        if let Err(e) = made {
            tracing::debug!("{}: {e}", p.display());
        }
    }

    /// Runs `make` (which writes a file in the store, leaving nothing behind when it
    /// fails), again after giving the reserve back if the file system was full.
    fn with_reserve<T>(&self, make: impl Fn() -> Result<T, Error>) -> Result<T, Error> {
        match make() {
            Err(e) if e.errno() == libc::ENOSPC => {
                let p = self.dir.join(RESERVE);
                let held = File::open(&p).map(|f| allocated(&f)).unwrap_or(0);
                if held == 0 || std::fs::remove_file(&p).is_err() {
                    return Err(e);
                }
                tracing::info!(
                    "the store's file system is full: using its reserve ({} KiB)",
                    held >> 10
                );
                let made = make();
                // What is left stays held back, for the next step (BACKING may share
                // the file system, and a commit's changes would take it).
                self.keep_reserve();
                made
            }
            other => other,
        }
    }

    fn write_state(&self, f: &File, s: &CommitState) -> Result<(), Error> {
        write_commit_state(f, s).map_err(|e| Error::io(&self.dir.join(COMMIT), e))
    }

    /// Applies pending changes up to `upto` (default: all) to the backing directory and
    /// drops them from the journal. Finishes an interrupted commit first. Returns the new
    /// journal and the records still pending.
    pub fn commit(
        &self,
        backing: &Backing,
        journal: &Journal,
        records: &[Record],
        upto: Option<u64>,
        progress: &mut dyn FnMut(CommitProgress),
    ) -> Result<(Journal, Vec<Record>), Error> {
        self.refuse_if_write_through(true)?;
        let (first, last) = (journal.base_seq(), journal.last_seq());
        let pending = self.read_state()?;
        let asked = upto.unwrap_or(last);
        if asked > last || (asked < first && pending.is_none()) {
            return Err(Error::BadSeq {
                asked,
                committed: first,
                last,
            });
        }
        // A commit cut short may have applied changes up to here without recording them
        // (one that stopped on an error: the change it stopped in, in part).
        // (`killed_run_upto`: what a run killed before may have applied unrecorded.)
        let (may_be_done_upto, killed_run_upto) = match &pending {
            None => (first, 0),
            Some(st) if st.stopped => (st.applied + 1, 0),
            Some(st) => {
                let end = unrecorded_end(records, st).unwrap_or(st.applied);
                (end, end)
            }
        };
        let target = pending.map_or(asked, |s| s.target.max(asked));
        let mut state = pending.unwrap_or(CommitState {
            target,
            applied: first,
            ..Default::default()
        });
        state.target = target;
        let sp = self.dir.join(COMMIT);
        if pending.is_none() {
            // Made whole under another name, then renamed: never seen empty or torn.
            let tmp = self.dir.join("commit.tmp");
            self.with_reserve(|| {
                let made = File::create(&tmp)
                    .and_then(|f| write_commit_state(&f, &state))
                    .and_then(|_| std::fs::rename(&tmp, &sp));
                made.map_err(|e| {
                    // A full store, say: nothing was applied, and nothing is left behind.
                    let _ = std::fs::remove_file(&tmp);
                    Error::io(&tmp, e)
                })
            })?;
            sync_dir(&self.dir)?;
        }
        let sf = OpenOptions::new()
            .write(true)
            .open(&sp)
            .map_err(|e| Error::io(&sp, e))?;
        if state.stopped {
            // Going on again: from here it may be killed past what it records.
            state.stopped = false;
            self.write_state(&sf, &state)?;
        }
        let todo: Vec<&Record> = records
            .iter()
            .filter(|r| r.seq > state.applied && r.seq <= target)
            .collect();
        let mut prog = CommitProgress {
            changes_total: todo.len() as u64,
            bytes_total: todo.iter().map(|r| r.change.data_len()).sum(),
            ..Default::default()
        };
        progress(prog);
        let jfile = journal.file().clone();
        let root = backing
            .open_at(
                Path::new(""),
                rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY,
                0,
            )
            .map_err(|e| Error::io(backing.path(), e))?;
        let barrier = |state: &mut CommitState, applied: u64| -> Result<(), Error> {
            rustix::fs::syncfs(&root).map_err(|e| Error::io(backing.path(), e.into()))?;
            state.applied = applied;
            if state.noted_seq <= applied {
                // Its change is done: nothing to run again right.
                (state.noted_seq, state.noted) = (0, 0);
            }
            self.write_state(&sf, state)
        };
        // Stopping on an error before change `seq`: everything before it is applied and
        // this run touched nothing after it (it itself may be, in part); the state says
        // so, so that a discard may throw away any change after it (see
        // [`Store::discard`]). Not within what a run cut short before may have applied:
        // left as cut short, the next run (and a discard) still allow for that.
        let stop = |state: &mut CommitState, seq: u64| {
            state.stopped = seq > killed_run_upto;
            let _ = barrier(state, seq - 1);
        };
        let mut dirty = false;
        // The records, read ahead of them (see [`crate::ahead`]).
        let jpath = journal.path();
        let mut ahead = match (todo.first(), todo.last()) {
            (Some(a), Some(b)) => {
                Some(Ahead::start(&jfile, a.offset, b.end()).map_err(|e| Error::io(jpath, e))?)
            }
            _ => None,
        };
        for (i, r) in todo.iter().enumerate() {
            let c = &r.change;
            if c.is_destructive() && dirty {
                barrier(&mut state, r.seq - 1)?;
            }
            let a = ahead.as_mut().expect("started for the records to apply");
            // Checked again before anything of it is applied: the daemon checked the
            // record when it opened the journal or wrote it, but what goes into BACKING is
            // what is on disk now.
            let whole = a
                .get(r.offset, r.end() - r.offset)
                .map(|parts| crate::journal::record_checks_out(&parts));
            if !matches!(whole, Ok(true)) {
                stop(&mut state, r.seq);
                return Err(match whole {
                    Err(e) => Error::io(jpath, e),
                    _ => Error::Corrupt {
                        path: jpath.to_path_buf(),
                        what: format!(
                            "record at offset {} (seq {}): checksum mismatch; the commit stopped before it",
                            r.offset, r.seq
                        ),
                    },
                });
            }
            let mut skip = false;
            if let Change::Rename { from, flags, .. } = c {
                if flags & libc::RENAME_EXCHANGE != 0 {
                    let ino = backing.lstat(from.as_path()).map(|s| s.st_ino).unwrap_or(0);
                    if state.noted_seq == r.seq {
                        // Resumed: done if `from` holds another object than it did.
                        skip = ino != state.noted;
                    } else {
                        state.noted_seq = r.seq;
                        state.noted = ino;
                        self.write_state(&sf, &state)?;
                    }
                }
            }
            if !skip {
                // Directories outside the isolated paths keep the times the mount showed.
                let kept: Vec<_> = r
                    .keep_times
                    .iter()
                    .filter_map(|dir| {
                        let st = backing.lstat(dir.as_path()).ok()?;
                        Some((dir.as_path(), (st.st_mtime, st.st_mtime_nsec as u32)))
                    })
                    .collect();
                // Resumed within a change to a file's data that lifted the file's mode:
                // the mode it had, which it may still lack.
                let lifted = (state.noted_seq == r.seq && matches!(c, Change::Data { .. }))
                    .then_some(state.noted as u32);
                let note = |mode: u32| {
                    state.noted_seq = r.seq;
                    state.noted = mode.into();
                    write_commit_state(&sf, &state)
                };
                let applied = match a.get(r.data_offset, c.data_len()) {
                    Ok(parts) => {
                        let done = backing::apply_lifting(
                            backing,
                            c,
                            &parts,
                            r.seq <= may_be_done_upto,
                            note,
                        );
                        // Put back whether this run got through or not: one that stops on
                        // an error must not leave BACKING a mode the view never showed.
                        let put_back =
                            lifted.map_or(Ok(()), |mode| backing::put_back_mode(backing, c, mode));
                        done.and(put_back)
                    }
                    Err(e) => {
                        stop(&mut state, r.seq);
                        return Err(Error::io(jpath, e));
                    }
                };
                // A removal whose directory is gone was done, as one whose name is gone
                // (backing::apply takes that as done, so ENOENT here is the directory): a
                // commit cut short in a run of removals may have removed the directory too
                // (also when a discard kept that run pending).
                let applied = match applied {
                    Err(e) if c.is_removal() && e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
                    other => other,
                };
                if let Err(source) = applied {
                    stop(&mut state, r.seq);
                    let path = match c.paths() {
                        (Some(from), Some(to)) => format!("{} -> {}", from.display(), to.display()),
                        (from, _) => from.map(RawPath::display).unwrap_or_default(),
                    };
                    // A name the view made that BACKING has now, or one it moved that
                    // BACKING lost: changed there since (apply touched nothing).
                    let behind_our_back = match (c, source.raw_os_error()) {
                        (Change::Create { .. } | Change::Link { .. }, Some(libc::EEXIST)) => true,
                        (Change::Rename { flags, .. }, Some(libc::EEXIST)) => {
                            flags & libc::RENAME_NOREPLACE != 0
                        }
                        // An object the view changed that BACKING no longer has (these
                        // open it by name before anything else).
                        (
                            Change::Rename { .. }
                            | Change::Data { .. }
                            | Change::Attr { .. }
                            | Change::SetXattr { .. }
                            | Change::RemoveXattr { .. },
                            Some(libc::ENOENT),
                        ) => true,
                        _ => false,
                    };
                    let source = if behind_our_back {
                        std::io::Error::new(
                            source.kind(),
                            format!("{source}: the backing directory changed behind the store's back; nothing of this change was applied"),
                        )
                    } else {
                        source
                    };
                    return Err(Error::Apply {
                        seq: r.seq,
                        op: c.name(),
                        path,
                        source,
                    });
                }
                // Times are not worth stopping a commit for (one not run as the owner may
                // not set them).
                if let Err(e) = backing::stamp(backing, c, r.at) {
                    tracing::debug!("change {}: setting its times: {e}", r.seq);
                }
                for (dir, mtime) in kept {
                    if let Err(e) = backing::set_times(backing, dir, mtime, false) {
                        tracing::debug!("change {}: keeping the times of {dir:?}: {e}", r.seq);
                    }
                }
            }
            dirty = !c.is_destructive();
            // A run of removals (an `rm -rf`) shares the fence after its last one: run
            // again, each finds its name or its directory gone (above) or removes it,
            // since names only go away within such a run.
            let run_goes_on =
                c.is_removal() && todo.get(i + 1).is_some_and(|n| n.change.is_removal());
            if c.is_destructive() && !run_goes_on {
                barrier(&mut state, r.seq)?;
            }
            prog.changes_done += 1;
            prog.bytes_done += c.data_len();
            if prog.changes_done.is_multiple_of(256) || c.data_len() > 0 {
                progress(prog);
            }
        }
        drop(ahead);
        barrier(&mut state, target)?;
        progress(prog);
        self.finish_at(journal, records, target, u64::MAX)?;
        self.journal_checked_before()
    }

    /// Ends a commit whose changes up to `target` are durably in BACKING: the records after
    /// it, up to `keep_upto` (a discard throws the others away), are copied verbatim into
    /// a new journal, which replaces the old one, and the commit state goes.
    fn finish_at(
        &self,
        journal: &Journal,
        records: &[Record],
        target: u64,
        keep_upto: u64,
    ) -> Result<(), Error> {
        let jfile = journal.file().clone();
        let sp = self.dir.join(COMMIT);
        let rest: Vec<&Record> = records
            .iter()
            .filter(|r| r.seq > target && r.seq <= keep_upto)
            .collect();
        let newp = self.dir.join(JOURNAL_NEW);
        let copy = || {
            let _ = std::fs::remove_file(&newp);
            let copied = self.copy_rest(journal, &jfile, &rest, target, &newp);
            if copied.is_err() {
                // A full disk, most likely: the half-made copy must not keep the room.
                let _ = std::fs::remove_file(&newp);
            }
            copied
        };
        self.with_reserve(copy)?;
        let jp = self.dir.join(JOURNAL);
        std::fs::rename(&newp, &jp).map_err(|e| Error::io(&jp, e))?;
        sync_dir(&self.dir)?;
        std::fs::remove_file(&sp).map_err(|e| Error::io(&sp, e))?;
        sync_dir(&self.dir)?;
        Ok(())
    }

    /// The records `rest` (those after `target`, in order, back to back) copied verbatim
    /// into a new, synced journal at `newp`.
    fn copy_rest(
        &self,
        journal: &Journal,
        jfile: &File,
        rest: &[&Record],
        target: u64,
        newp: &Path,
    ) -> Result<(), Error> {
        let new = Journal::create(newp, target, self.meta.id_bytes())?;
        let shift = rest.first().map(|r| r.offset).unwrap_or(journal.len());
        let end = rest.last().map(|r| r.end()).unwrap_or(journal.len());
        if end > shift {
            let dst = new.file();
            let (mut so, mut d_o) = (shift, HEADER_LEN);
            use std::os::fd::AsFd;
            while so < end {
                let want = (end - so) as usize;
                let n = rustix::fs::copy_file_range(
                    jfile.as_fd(),
                    Some(&mut so),
                    dst.as_fd(),
                    Some(&mut d_o),
                    want,
                )
                .map_err(|e| Error::io(newp, e.into()))?;
                if n == 0 {
                    return Err(Error::io(newp, std::io::ErrorKind::UnexpectedEof.into()));
                }
            }
            // The copied records say how far their old journal was durable, not this one:
            // the mark says all of them are (see crate::journal).
            crate::journal::write_sync_mark(dst, d_o).map_err(|e| Error::io(newp, e))?;
            dst.sync_all().map_err(|e| Error::io(newp, e))?;
        }
        Ok(())
    }

    /// The error a commit (`commit`) or a discard of a --write-through store gets: every
    /// change is in the backing directory already. Asked first, before a mounted store's
    /// view is touched (which holds none of its records).
    pub fn refuse_if_write_through(&self, commit: bool) -> Result<(), Error> {
        if !self.meta.write_through {
            return Ok(());
        }
        Err(Error::Control(if commit {
            "a --write-through store has nothing to commit: every change is in the backing directory already".into()
        } else {
            "a --write-through store cannot discard: its changes are in the backing directory"
                .into()
        }))
    }

    /// Whether a discard after `after` may run, without changing anything: the sequence
    /// number it means and the commit state, or why it is refused.
    fn check_discard(
        &self,
        journal: &Journal,
        records: &[Record],
        after: Option<u64>,
    ) -> Result<(u64, Option<CommitState>), Error> {
        self.refuse_if_write_through(false)?;
        let (first, last) = (journal.base_seq(), journal.last_seq());
        let after = after.unwrap_or(first);
        let state = self.read_state()?;
        // (Before the range: after an interrupted commit, what it applied is not pending.)
        if let Some(st) = state
            .as_ref()
            .filter(|st| after < st.applied && after <= last)
        {
            return Err(Error::Control(format!(
                "changes up to {} are in the backing directory already (an interrupted commit); discard --after {} or later",
                st.applied, st.applied
            )));
        }
        if after < first || after > last {
            return Err(Error::BadSeq {
                asked: after,
                committed: first,
                last,
            });
        }
        if let Some(end) = state.as_ref().and_then(|st| unrecorded_end(records, st)) {
            if after < end {
                let st = state.as_ref().expect("checked");
                let what = if records
                    .iter()
                    .any(|r| r.seq == st.applied + 1 && r.change.is_removal())
                {
                    "was removing names"
                } else {
                    "was applying changes"
                };
                return Err(Error::Control(format!(
                    "an interrupted commit {what} (changes {} to {end}) and may have made some before it could record it; run commit again to finish them, or discard --after {end} or later",
                    st.applied + 1
                )));
            }
        }
        Ok((after, state))
    }

    /// [`Store::discard`] of a journal opened by [`Store::journal_up_to_damage`], whose
    /// damage starts at `damage_at` (if any): once the discard is known to be allowed, the
    /// journal's bytes from there on are copied to `journal.cut-at-OFFSET` in the store
    /// (they may be worth reading by hand), then the discard cuts them off with the
    /// changes after `after`. Returns the changes kept, and the copy if one was made.
    pub fn discard_damaged(
        &self,
        journal: &mut Journal,
        records: &[Record],
        after: Option<u64>,
        damage_at: Option<u64>,
    ) -> Result<(Vec<Record>, Option<KeptCut>), Error> {
        let copy = match damage_at {
            Some(at) => {
                self.check_discard(journal, records, after)?;
                let copy = self.with_reserve(|| self.keep_journal_from(at))?;
                Some(KeptCut { at, copy })
            }
            None => None,
        };
        // The copy stays whatever happens next: the discard may fail after its cut.
        let kept = self.discard(journal, records, after)?;
        Ok((kept, copy))
    }

    /// Throws away pending changes after `after` (default: all of them).
    pub fn discard(
        &self,
        journal: &mut Journal,
        records: &[Record],
        after: Option<u64>,
    ) -> Result<Vec<Record>, Error> {
        let (after, state) = self.check_discard(journal, records, after)?;
        if let Some(st) = state {
            if let Some(end) = unrecorded_end(records, &st) {
                // A commit cut short (killed) may have applied changes after `applied`
                // without recording them, up to its next fence: those cannot be thrown
                // away, BACKING may hold them (`check_discard` refuses to). The commit
                // stays, its target down to them: run again (by commit, or a mount) it
                // finishes them, and the changes after them stay pending or go.
                self.lower_target(&st, end)?;
                journal.truncate(cut_after(journal, records, after), after)?;
                return Ok(records
                    .iter()
                    .filter(|r| r.seq > st.applied && r.seq <= after)
                    .cloned()
                    .collect());
            }
            // The commit stopped on an error (or had nothing left): nothing after
            // `applied` was touched, but the change it failed on, in part. End it there,
            // keeping only the changes up to `after`. What goes is cut off first, so
            // that a full store is emptied this way: the copy then has room. The
            // commit's target comes down first, so that a crash in between leaves a
            // commit that can be run.
            self.lower_target(&st, after)?;
            journal.truncate(cut_after(journal, records, after), after)?;
            self.finish_at(journal, records, st.applied, after)?;
            let (j, recs) = self.journal_checked_before()?;
            *journal = j;
            return Ok(recs);
        }
        journal.truncate(cut_after(journal, records, after), after)?;
        Ok(records.iter().filter(|r| r.seq <= after).cloned().collect())
    }
}

/// The last change an interrupted commit (`st`) may have made without recording it, if it
/// may have made any. A commit records what it applied at its fences only: before and
/// after each change that removes or moves a name (a run of removals as one). Killed, it
/// may have gone on after `applied` up to the change before the next such change (which
/// is fenced first, recording them), or through it if it comes right after `applied`
/// (through the whole run, for removals); up to its target if there is none. None when
/// it stopped on an error (it records where) or had nothing left.
fn unrecorded_end(records: &[Record], st: &CommitState) -> Option<u64> {
    let (applied, target) = (st.applied, st.target);
    if st.stopped || target <= applied {
        return None;
    }
    let mut rest = records
        .iter()
        .filter(|r| r.seq > applied && r.seq <= target);
    let first = rest.clone().next()?.seq;
    let Some(fence) = rest.find(|r| r.change.is_destructive()) else {
        return Some(target);
    };
    if fence.seq > first {
        return Some(fence.seq - 1);
    }
    if !fence.change.is_removal() {
        return Some(fence.seq);
    }
    let run = rest.take_while(|r| r.change.is_removal()).last();
    Some(run.map_or(fence.seq, |r| r.seq))
}

/// Writes the commit state at the start of `f`, durably.
fn write_commit_state(f: &File, s: &CommitState) -> std::io::Result<()> {
    f.write_all_at(&s.encode(), 0).and_then(|_| f.sync_data())
}

/// Where the journal ends when the records after `after` go.
fn cut_after(journal: &Journal, records: &[Record], after: u64) -> u64 {
    records
        .iter()
        .find(|r| r.seq > after)
        .map(|r| r.offset)
        .unwrap_or(journal.len())
}

/// Refuses the store `dir` (at `real`, absolute) inside `backing`, also where it is
/// reached by another way in (a bind mount of `backing`, or of a directory above or below it): by
/// where each lies on its file system.
fn refuse_inside(dir: &Path, backing: &Path, real: &Path) -> Result<(), Error> {
    if real.starts_with(backing) {
        return Err(Error::Control(format!(
            "the store {} must not be inside the backing directory {}",
            dir.display(),
            backing.display()
        )));
    }
    if let (Some((bdev, bpath)), Some((sdev, spath))) =
        (place_on_its_fs(backing), place_on_its_fs(real))
    {
        if bdev == sdev && spath.starts_with(&bpath) {
            return Err(Error::Control(format!(
                "the store {} must not be inside the backing directory {}: it is {} there, \
                 by another mount of that file system ({bdev})",
                dir.display(),
                backing.display(),
                backing
                    .join(spath.strip_prefix(&bpath).unwrap_or(&spath))
                    .display()
            )));
        }
    }
    Ok(())
}

/// Where the absolute, symlink-free `path` lies on its file system: the file system
/// (`MAJOR:MINOR`, from /proc/self/mountinfo) and the path from that file system's root,
/// by the mount that covers it. None where mountinfo cannot be read.
fn place_on_its_fs(path: &Path) -> Option<(String, PathBuf)> {
    let mut best: Option<(usize, String, PathBuf)> = None;
    for m in interpose_core::mountinfo::mounts().ok()? {
        let Ok(rest) = path.strip_prefix(&m.mount_point) else {
            continue;
        };
        // The deepest mount point; of mounts on the same one, the last (on top).
        let depth = m.mount_point.components().count();
        if best.as_ref().is_none_or(|(d, _, _)| depth >= *d) {
            best = Some((depth, m.dev, m.root.join(rest)));
        }
    }
    best.map(|(_, dev, place)| (dev, place))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_state_round_trip() {
        let s = CommitState {
            target: 9,
            applied: 4,
            noted_seq: 5,
            noted: 77,
            stopped: true,
        };
        assert_eq!(CommitState::decode(&s.encode()), Some(s));
        for at in [10, 40] {
            let mut b = s.encode();
            b[at] ^= 1;
            assert_eq!(CommitState::decode(&b), None, "a flipped bit at {at}");
        }
        // Version 1: no flags, the checksum over bytes 0..40.
        let mut v1 = s.encode();
        v1[0..8].copy_from_slice(STATE_MAGIC_V1);
        let crc = crc32c::crc32c(&v1[..40]);
        v1[40..44].copy_from_slice(&crc.to_le_bytes());
        v1[44..48].fill(0);
        let old = CommitState::decode(&v1).expect("a version 1 state");
        assert_eq!((old.target, old.applied, old.stopped), (9, 4, false));
    }

    #[test]
    fn dates() {
        assert_eq!(interpose_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(interpose_time(1_795_000_000), "2026-11-18T11:06:40Z");
    }
}
