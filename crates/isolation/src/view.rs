//! The isolated view in memory: the backing directory plus every pending change.
//!
//! A node is a file, directory or other object of the view. A node that still is exactly
//! what the backing directory holds ("backed" and unchanged) is only a cache and is
//! dropped when the kernel forgets it; a changed or new node lives until commit or
//! discard. Directories keep an overlay of the names that differ from the backing
//! directory: a name bound to a node, or a whiteout that hides the backing name. A file's
//! changed contents are a map from block number to where that block now lives (the
//! journal, or nowhere: a hole); blocks not in the map come from the backing file, up to
//! `origin_limit` (the backing file's size, lowered by truncation), and read as zeros
//! beyond it.
//!
//! Node numbers: a backed node is numbered by its backing inode number (so hard links
//! stay one inode), the root is 1, and new nodes count up from 2^62.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::backing::Backing;
pub use crate::blockmap::{BlockMap, Loc};
use crate::change::{Change, NewKind, RawPath, Run, Time, BLOCK};
use crate::journal::{self, Journal, Record};
use crate::Error;

pub const ROOT: u64 = 1;
/// Directories [`View::on_backing_fs`] goes up through at most.
const MAX_DEPTH_WALKED: usize = 4096;
const FIRST_NEW_ID: u64 = 1 << 62;

pub type Res<T> = Result<T, i32>;

pub fn now() -> Time {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos())
}

/// A node's attributes as the view shows them.
#[derive(Clone, Debug)]
pub struct Attr {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    pub nlink: u32,
    pub rdev: u64,
    /// 512-byte units allocated (an estimate for changed files).
    pub blocks: u64,
}

/// The (device, inode number) by which the view knows a backing object.
fn key_of(st: &rustix::fs::Statx) -> (u64, u64) {
    (
        rustix::fs::makedev(st.stx_dev_major, st.stx_dev_minor),
        st.stx_ino,
    )
}

/// Whether two birth times may be one object's: equal, or one of them unknown.
fn same_birth(a: Option<Time>, b: Option<Time>) -> bool {
    a.is_none() || b.is_none() || a == b
}

/// Forgets that the backing object `key` (device, inode number) is node `id`, unless the
/// key maps to another node by now (a newer object that got the same number).
fn unmap_ino(by_ino: &mut HashMap<(u64, u64), u64>, key: (u64, u64), id: u64) {
    if by_ino.get(&key) == Some(&id) {
        by_ino.remove(&key);
    }
}

impl Attr {
    /// Attributes that say nothing but the kind (`mode` holds only S_IFMT bits): for
    /// negative entries and listing entries sent without attributes.
    pub fn zeroed(mode: u32) -> Attr {
        Attr {
            mode,
            uid: 0,
            gid: 0,
            size: 0,
            atime: (0, 0),
            mtime: (0, 0),
            ctime: (0, 0),
            nlink: 0,
            rdev: 0,
            blocks: 0,
        }
    }

    fn from_stat(st: &rustix::fs::Stat) -> Attr {
        Attr {
            mode: st.st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
            size: st.st_size as u64,
            atime: (st.st_atime, st.st_atime_nsec as u32),
            mtime: (st.st_mtime, st.st_mtime_nsec as u32),
            ctime: (st.st_ctime, st.st_ctime_nsec as u32),
            nlink: st.st_nlink as u32,
            rdev: st.st_rdev,
            blocks: st.st_blocks as u64,
        }
    }
    fn from_statx(st: &rustix::fs::Statx) -> Attr {
        let time = |t: rustix::fs::StatxTimestamp| (t.tv_sec, t.tv_nsec);
        Attr {
            mode: st.stx_mode.into(),
            uid: st.stx_uid,
            gid: st.stx_gid,
            size: st.stx_size,
            atime: time(st.stx_atime),
            mtime: time(st.stx_mtime),
            ctime: time(st.stx_ctime),
            nlink: st.stx_nlink,
            rdev: rustix::fs::makedev(st.stx_rdev_major, st.stx_rdev_minor),
            blocks: st.stx_blocks,
        }
    }
    pub fn kind(&self) -> u32 {
        self.mode & libc::S_IFMT
    }
    pub fn is_dir(&self) -> bool {
        self.kind() == libc::S_IFDIR
    }
    pub fn is_file(&self) -> bool {
        self.kind() == libc::S_IFREG
    }
}

#[derive(Clone, Debug, Default)]
pub struct Data {
    pub blocks: BlockMap,
    /// Bytes of the backing file that still show through (below blocks not in the map).
    pub origin_limit: u64,
    /// 512-byte blocks the backing file had allocated (its st_blocks).
    pub origin_blocks: u64,
    /// Blocks below `origin_limit` the map covers (the backing file's there no longer
    /// show), kept as the map changes so that st_blocks costs no walk over it.
    pub origin_covered: u64,
}

#[derive(Clone, Debug, Default)]
pub struct Overlay {
    /// The backing directory's names do not show through (a directory made in the view).
    pub opaque: bool,
    /// Names that differ from the backing directory: bound to a node, or hidden (None).
    pub entries: BTreeMap<OsString, Option<u64>>,
    /// Not opaque: the subdirectories `entries` show minus the backing subdirectories
    /// they stand for. Kept by `set_entry` so that the link count of a directory outside
    /// the isolated paths costs no walk over its entries.
    pub subdir_delta: i64,
}

#[derive(Debug)]
pub struct Node {
    pub id: u64,
    /// Path of the backing object this node started as ("" is the root), or a name it
    /// has in BACKING now (see `detached`).
    pub origin: Option<PathBuf>,
    /// `origin` no longer names the object: its name went with a change made straight to
    /// BACKING (outside --isolate-path, --write-through) and no other name of it is known.
    /// Then the object is reached only through `origin_file`, kept while it is open.
    pub detached: bool,
    pub attr: Attr,
    /// Differs from the backing object in attributes, xattrs, data or links.
    pub changed: bool,
    /// Contents, once they differ from the backing file.
    pub data: Option<Data>,
    /// All xattrs, once they differ from the backing object's.
    pub xattrs: Option<BTreeMap<Vec<u8>, Vec<u8>>>,
    /// Target of a symlink made in the view.
    pub target: Option<Vec<u8>>,
    pub overlay: Option<Overlay>,
    /// The names the view knows for this node (directories have exactly one).
    pub links: Vec<(u64, OsString)>,
    /// Of a file with several names, the one the kernel last looked up (see
    /// [`View::path_looked_up`]); kept only for filters ([`View::note_lookups`]).
    pub looked_up_as: Option<(u64, OsString)>,
    /// The path a file open without a name had when it lost its last one, for filters,
    /// which judge it by that path (set by the front end).
    pub gone_as: Option<PathBuf>,
    /// Overlay entries bound to this node.
    pub refs: u32,
    /// The kernel's references (lookups not yet forgotten).
    pub lookups: u64,
    pub opens: u32,
    pub writers: u32,
    pub passthrough_opens: u32,
    /// The backing file, open for reading while the node is open.
    pub origin_file: Option<Arc<File>>,
    /// The backing file registered, open for writing, for the kernel's passthrough (a node
    /// outside the isolated paths when it was opened), while any passthrough open lasts.
    /// The kernel reads and writes the node's data there, not through the view, also if
    /// the node enters the isolated paths meanwhile (a hard link met there, a directory
    /// above it renamed in isolation): so the view's own changes to its data (truncate,
    /// fallocate) go there too, and its size and times are that file's.
    pub passthrough_file: Option<Arc<File>>,
    /// The backing inode number `by_ino` knows this node under (nodes made from a
    /// backing object), so that dropping the node finds its entry without a scan.
    pub backing_ino: Option<u64>,
    /// The device of that inode: BACKING's, or another file system's mounted in it (a
    /// bind mount, a Btrfs subvolume), whose inode numbers are its own.
    pub backing_dev: u64,
    /// That object's birth time, where BACKING's file system keeps one: the inode number
    /// alone may be a later object's (see [`crate::backing::Backing::birth_of`]).
    pub backing_birth: Option<Time>,
}

impl Node {
    /// Its contents rest on a file below the view's own data: the backing file at its name
    /// in BACKING, or, with no name there, the file it holds open (a detached object, or
    /// one carried across a commit without a name). Blocks the view has not written read
    /// from it; a first write must not take them for zeros.
    fn has_base(&self) -> bool {
        self.origin.is_some() || self.origin_file.is_some()
    }

    /// Nothing holds it: no kernel reference, no open, no overlay entry bound to it.
    fn unused(&self) -> bool {
        self.refs == 0 && self.lookups == 0 && self.opens == 0
    }

    /// Remembers the name the kernel reached a file with several names by.
    pub fn note_looked_up(&mut self, parent: u64, name: &OsStr) {
        if self.attr.nlink > 1 && !self.attr.is_dir() {
            self.looked_up_as = Some((parent, name.to_owned()));
        }
    }

    /// Whether the backing object `st` (born `birth`, see
    /// [`crate::backing::Backing::birth_of`]) is the one this node stands for, not another
    /// that has its name or number now.
    fn stands_for(&self, st: &rustix::fs::Statx, birth: Option<Time>) -> bool {
        u32::from(st.stx_mode) & libc::S_IFMT == self.attr.kind()
            && self
                .backing_ino
                .is_none_or(|ino| (self.backing_dev, ino) == key_of(st))
            && same_birth(self.backing_birth, birth)
    }

    /// Only a cache of its backing object: the view changed nothing of it.
    fn cache_only(&self) -> bool {
        !self.changed && self.overlay.is_none()
    }

    fn new(id: u64, origin: Option<PathBuf>, attr: Attr) -> Node {
        Node {
            id,
            origin,
            detached: false,
            attr,
            changed: false,
            data: None,
            xattrs: None,
            target: None,
            overlay: None,
            links: Vec::new(),
            looked_up_as: None,
            gone_as: None,
            refs: 0,
            lookups: 0,
            opens: 0,
            writers: 0,
            passthrough_opens: 0,
            origin_file: None,
            passthrough_file: None,
            backing_ino: None,
            backing_dev: 0,
            backing_birth: None,
        }
    }
}

/// One piece of a read: where `len` bytes come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seg {
    Journal { offset: u64, len: u64 },
    Origin { offset: u64, len: u64 },
    Zero { len: u64 },
}

/// A node the kernel holds, as carried over a rebuild of the view.
pub struct Known {
    pub id: u64,
    /// Its path in the view (None: removed while open).
    pub path: Option<PathBuf>,
    /// The backing object it stands for, if any: its inode number (and birth time) and its
    /// name in BACKING.
    pub backing_ino: Option<u64>,
    pub backing_dev: u64,
    pub backing_birth: Option<Time>,
    pub origin: Option<PathBuf>,
    pub kind: u32,
    /// Its attributes (what a directory removed in the view keeps showing, see
    /// [`View::adopt`]).
    pub attr: Attr,
    pub lookups: u64,
    pub opens: u32,
    pub writers: u32,
    pub passthrough_opens: u32,
    /// [`Node::passthrough_file`].
    pub passthrough_file: Option<Arc<File>>,
}

/// A directory entry of the view.
pub struct DirEntry {
    pub name: OsString,
    pub ino: u64,
    /// S_IFMT bits.
    pub kind: u32,
}

/// Which changes the view keeps for later and which go to the backing directory at once.
#[derive(Clone, Debug, Default)]
pub enum Mode {
    /// Every change is kept in the journal until commit.
    #[default]
    Isolated,
    /// Only changes under paths matching these globs (or their subtrees) are kept; the
    /// others go straight to the backing directory, unrecorded.
    Paths(globset::GlobSet),
    /// Every change is recorded in the journal and applied to the backing directory at once.
    WriteThrough,
}

enum Route {
    Keep,
    Direct,
    Trail,
}

/// The nodes a change's paths name, where the caller has resolved them (a rename: the
/// node renamed, and the one at the destination if any), so that a change made straight
/// to BACKING updates just those instead of searching every node.
#[derive(Clone, Copy, Default)]
struct Named {
    first: Option<u64>,
    second: Option<u64>,
}

pub struct View {
    /// The time changes being applied happened (their journal record's time on replay),
    /// so a remount or a rebuilt view shows the same times.
    clock: Option<Time>,
    pub mode: Mode,
    /// Where xattrs are tried before they are recorded (see [`XattrProbes`]).
    pub xattr_probe: Option<Arc<XattrProbes>>,
    /// Filters judge requests by path: remember the name a hard-linked file was last
    /// looked up by ([`Node::looked_up_as`]).
    pub note_lookups: bool,
    pub backing: Arc<Backing>,
    pub journal: Journal,
    nodes: HashMap<u64, Node>,
    /// Node of each backing object the view knows, by (device, inode number).
    by_ino: HashMap<(u64, u64), u64>,
    next_new: u64,
    /// Numbers of objects of devices other than BACKING's (file systems mounted inside it).
    devices: interpose_fs::DeviceNumbers,
    /// Journal appends not yet made durable.
    pub unsynced: bool,
    /// Unchanged directories the kernel forgot: dropped by [`View::sweep_dirs`] once no
    /// node names one of them as its parent.
    dir_candidates: HashSet<u64>,
    /// [`View::sweep_dirs`] runs when `dir_candidates` reaches this size.
    sweep_at: usize,
    /// With `--isolate-path`: the paths outside the isolated ones that pending changes name
    /// (a rename or link across the border, a change entangled with pending ones). They and
    /// everything below them stay isolated until those changes are committed or
    /// discarded: BACKING still has there what the changes will replace.
    spread: HashSet<PathBuf>,
    /// While a record is replayed: the directories whose times it keeps (its
    /// `keep_times`), which showed BACKING's times when the change was made.
    keep_dirs: Vec<u64>,
    /// Only while [`View::adopt`] looks up the paths of the nodes the kernel holds.
    adopting: Option<AdoptCache>,
    /// Numbers the kernel still holds for objects a commit or discard could not carry
    /// into the view built after it (see [`View::adopt`]): every request on one gets
    /// ESTALE, and no other object gets one until the kernel has forgotten it. Given to
    /// another object at once, the kernel's forget of the old one took the new one's
    /// references, and the node went while the kernel still used it: where the two
    /// differ in type, the kernel holds both inodes under the one number.
    stale: HashMap<u64, StaleRef>,
}

/// What the kernel holds of a number in [`View::stale`].
#[derive(Clone, Copy, Debug)]
struct StaleRef {
    lookups: u64,
    opens: u32,
}

impl StaleRef {
    /// The kernel holds nothing of it any more: the number is free.
    fn unused(&self) -> bool {
        self.lookups == 0 && self.opens == 0
    }
}

/// What [`View::adopt`] remembers while it resolves the paths of the nodes the kernel
/// holds, which share their directories: it runs under the view's lock, with every
/// request waiting, so a lookup once made stands until it ends.
#[derive(Default)]
struct AdoptCache {
    /// (directory node, name) → the node found there.
    found: HashMap<(u64, OsString), u64>,
    /// BACKING directories of nodes looked in (at most [`ADOPT_DIRS`]), opened with the
    /// checks of every path: a plain name looked up in one cannot lead out of it.
    dirs: HashMap<u64, OwnedFd>,
}

/// Directory descriptors [`AdoptCache`] keeps: more than a path is deep.
const ADOPT_DIRS: usize = 64;

/// Whether `path` is isolated: it or a directory above it matches the globs, or is one of
/// the `spread` paths pending changes name (see [`View`]).
fn isolates(set: &globset::GlobSet, spread: &HashSet<PathBuf>, path: &Path) -> bool {
    path.ancestors()
        .filter(|a| !a.as_os_str().is_empty())
        .any(|a| set.is_match(a) || spread.contains(a))
}

/// How many BACKING entries [`View::name_of`] looks at, at most, for another name.
const NAME_SEARCH_LIMIT: usize = 200_000;

/// The fewest forgotten directories worth a sweep over every node.
const SWEEP_MIN: usize = 256;

/// The whole blocks in `from..to` that are holes in `f` (SEEK_HOLE/SEEK_DATA), as (first
/// block, count) runs; none where the file system cannot say.
fn backing_holes(f: &File, from: u64, to: u64) -> Vec<(u64, u64)> {
    use rustix::fs::SeekFrom;
    let mut out = Vec::new();
    let (mut pos, end) = (from * BLOCK, to * BLOCK);
    while pos < end {
        let Ok(hole) = rustix::fs::seek(f, SeekFrom::Hole(pos)) else {
            break;
        };
        if hole >= end {
            break;
        }
        let data = match rustix::fs::seek(f, SeekFrom::Data(hole)) {
            Ok(d) => d.min(end),
            // No data after it: a hole to the end of the file, and past it.
            Err(_) => end,
        };
        let (first, stop) = (hole.div_ceil(BLOCK), data / BLOCK);
        if first < stop {
            out.push((first, stop - first));
        }
        if data <= pos {
            break;
        }
        pos = data;
    }
    out
}

fn kind_of_dtype(t: rustix::fs::FileType) -> u32 {
    use rustix::fs::FileType as T;
    match t {
        T::RegularFile => libc::S_IFREG,
        T::Directory => libc::S_IFDIR,
        T::Symlink => libc::S_IFLNK,
        T::Fifo => libc::S_IFIFO,
        T::Socket => libc::S_IFSOCK,
        T::CharacterDevice => libc::S_IFCHR,
        T::BlockDevice => libc::S_IFBLK,
        T::Unknown => 0,
    }
}

impl View {
    /// An empty view of `backing` (no changes), writing new changes to `journal`.
    pub fn new(backing: Arc<Backing>, journal: Journal) -> Result<View, Error> {
        let st = backing
            .lstat(Path::new(""))
            .map_err(|e| Error::io(backing.path(), e))?;
        let mut root = Node::new(ROOT, Some(PathBuf::new()), Attr::from_stat(&st));
        root.refs = 1; // never dropped
        root.backing_ino = Some(st.st_ino);
        root.backing_dev = st.st_dev;
        let mut nodes = HashMap::new();
        nodes.insert(ROOT, root);
        let mut by_ino = HashMap::new();
        by_ino.insert((st.st_dev, st.st_ino), ROOT);
        Ok(View {
            clock: None,
            mode: Mode::Isolated,
            xattr_probe: None,
            note_lookups: false,
            backing,
            journal,
            nodes,
            by_ino,
            next_new: FIRST_NEW_ID,
            devices: Default::default(),
            unsynced: false,
            dir_candidates: HashSet::new(),
            sweep_at: SWEEP_MIN,
            spread: HashSet::new(),
            keep_dirs: Vec::new(),
            adopting: None,
            stale: HashMap::new(),
        })
    }

    /// Replays journalled changes onto the view (at mount, after commit or discard).
    pub fn replay(&mut self, records: &[Record]) -> Result<(), Error> {
        for r in records {
            self.clock = Some(r.at);
            let keep: Vec<u64> = (r.keep_times.iter())
                .filter_map(|dir| self.resolve(dir.as_path()).ok())
                .collect();
            self.keep_dirs = keep;
            let res = self.apply_recorded(&r.change, r.data_offset);
            self.keep_dirs.clear();
            self.clock = None;
            if res.is_ok() {
                self.note_isolated(&r.change);
            }
            res.map_err(|what| Error::Replay {
                seq: r.seq,
                op: r.change.name(),
                path: r.change.paths().0.map(|p| p.display()).unwrap_or_default(),
                what,
            })?;
        }
        Ok(())
    }

    fn clock(&self) -> Time {
        self.clock.unwrap_or_else(now)
    }

    /// New nodes are numbered from here (a rebuilt view continues the old numbering).
    /// Whether node `id` is (or, made in the view, will be) on BACKING's own file system,
    /// not on one mounted inside it: the probes answer for that one only.
    fn on_backing_fs(&self, id: u64) -> bool {
        let mut id = id;
        for _ in 0..MAX_DEPTH_WALKED {
            let Some(n) = self.nodes.get(&id) else {
                return true;
            };
            if n.backing_ino.is_some() || id == ROOT {
                return n.backing_dev == self.backing.dev();
            }
            match n.links.first() {
                Some(&(parent, _)) => id = parent,
                None => return true,
            }
        }
        true
    }

    /// Numbers the objects of other devices (file systems mounted inside BACKING) as `v`
    /// does, for a view rebuilt from `v`'s store.
    pub fn keep_device_numbers_of(&mut self, v: &View) {
        self.devices = v.devices.clone();
    }

    pub fn set_next_new(&mut self, next: u64) {
        self.next_new = self.next_new.max(next);
    }

    pub fn node(&self, id: u64) -> Res<&Node> {
        self.nodes.get(&id).ok_or(libc::ESTALE)
    }

    pub fn node_mut(&mut self, id: u64) -> Res<&mut Node> {
        self.nodes.get_mut(&id).ok_or(libc::ESTALE)
    }
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }
    pub fn ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }
    /// The journal, for reading the data of a read planned now.
    pub fn journal_reader(&self) -> journal::Reader {
        self.journal.reader()
    }

    // ---- names ----

    /// The path the kernel last reached node `id` by, for a file with several names (the
    /// one a program opening it used: filters judge by it), else [`View::path_of`].
    pub fn path_looked_up(&self, id: u64) -> Option<PathBuf> {
        let n = self.nodes.get(&id)?;
        if let Some((parent, name)) = &n.looked_up_as {
            if n.links.iter().any(|(p, l)| p == parent && l == name) {
                return Some(self.path_of(*parent)?.join(name));
            }
        }
        self.path_of(id)
    }

    /// The view's path of a node, relative to the root ("" for the root), if it has a name.
    pub fn path_of(&self, id: u64) -> Option<PathBuf> {
        let mut parts: Vec<&OsStr> = Vec::new();
        let mut cur = id;
        let mut guard = 0;
        while cur != ROOT {
            let n = self.nodes.get(&cur)?;
            let (p, name) = n.links.first()?;
            parts.push(name);
            cur = *p;
            guard += 1;
            if guard > 4096 {
                return None;
            }
        }
        let mut path = PathBuf::new();
        for p in parts.iter().rev() {
            path.push(p);
        }
        Some(path)
    }

    /// [`View::find_name`], warning when there is none: a change made through a
    /// descriptor must be recorded under a name, or a commit or a remount would lose it.
    fn name_of(&mut self, id: u64) -> Option<PathBuf> {
        let found = self.find_name(id);
        if found.is_none() {
            if let Some(n) = self.nodes.get(&id) {
                if n.attr.nlink > 0 && n.attr.is_file() && !n.detached {
                    tracing::warn!(
                        "a change to {} (inode {:?}) is kept in the view only: no other name of it found",
                        n.origin.as_deref().unwrap_or(Path::new("?")).display(),
                        n.backing_ino
                    );
                }
            }
        }
        found
    }

    /// [`View::path_of`], or, for a file that lost every name the view knew of it but is
    /// still linked (a hard link in BACKING the view has not met), one of those other
    /// names as the view shows it.
    fn find_name(&mut self, id: u64) -> Option<PathBuf> {
        if let Some(p) = self.path_of(id) {
            return Some(p);
        }
        let n = self.nodes.get(&id)?;
        if n.attr.nlink == 0 || n.attr.is_dir() || n.detached {
            return None;
        }
        if n.backing_dev != self.backing.dev() {
            return None; // (The walk below looks at BACKING's own inode numbers.)
        }
        let (ino, origin) = (n.backing_ino?, n.origin.clone()?);
        let backing = self.backing.clone();
        backing.find_name_of(ino, &origin, NAME_SEARCH_LIMIT, |candidate| {
            self.view_name_of(candidate, id)
        })
    }

    /// Where the view shows BACKING's `backing_path`, if that is node `id`: the same name
    /// below the view's path of its nearest directory the view has a node of (found by
    /// inode number: a directory renamed in the view keeps its backing inode).
    fn view_name_of(&mut self, backing_path: &Path, id: u64) -> Option<PathBuf> {
        let mut below: Vec<&OsStr> = vec![backing_path.file_name()?];
        let mut dir = backing_path.parent()?;
        let base = loop {
            if dir.as_os_str().is_empty() {
                break PathBuf::new();
            }
            let st = self.backing.lstat(dir).ok()?;
            if let Some(&d) = self.by_ino.get(&(st.st_dev, st.st_ino)) {
                // Removed in the view: nothing below it shows.
                break self.path_of(d)?;
            }
            below.push(dir.file_name()?);
            dir = dir.parent()?;
        };
        let mut path = base;
        for name in below.iter().rev() {
            path.push(name);
        }
        // Through the view: the name must show this node (not be hidden or replaced).
        (self.resolve(&path) == Ok(id)).then_some(path)
    }

    fn child_path(&self, parent: u64, name: &OsStr) -> Res<RawPath> {
        let mut p = self.path_of(parent).ok_or(libc::ENOENT)?;
        p.push(name);
        Ok(RawPath::from_path(&p))
    }

    fn node_path(&self, id: u64) -> Res<RawPath> {
        self.path_of(id)
            .map(|p| RawPath::from_path(&p))
            .ok_or(libc::ENOENT)
    }

    /// The node a directory's name is bound to, discovering backing objects as needed.
    pub fn child(&mut self, parent: u64, name: &OsStr) -> Res<u64> {
        self.child_fresh(parent, name).map(|(id, _)| id)
    }

    /// [`View::child`], and whether the node's attributes are those of the lstat it just
    /// made (then [`View::attr`] need not make another).
    fn child_fresh(&mut self, parent: u64, name: &OsStr) -> Res<(u64, bool)> {
        if name.len() > 255 {
            return Err(libc::ENAMETOOLONG);
        }
        let dir = self.node(parent)?;
        if !dir.attr.is_dir() {
            return Err(libc::ENOTDIR);
        }
        if let Some(ov) = &dir.overlay {
            if let Some(e) = ov.entries.get(name) {
                return e.map(|id| (id, false)).ok_or(libc::ENOENT);
            }
            if ov.opaque {
                return Err(libc::ENOENT);
            }
        }
        let Some(origin) = dir.origin.clone() else {
            return Err(libc::ENOENT);
        };
        let rel = origin.join(name);
        let st =
            self.lstat_child(parent, &origin, name, &rel)
                .map_err(|e| match e.raw_os_error() {
                    Some(libc::ELOOP) | Some(libc::EXDEV) | None => libc::ENOENT,
                    Some(e) => e,
                })?;
        let birth = self.backing.birth_of(&st);
        let key = key_of(&st);
        if let Some(&id) = self.by_ino.get(&key) {
            let n = self.nodes.get_mut(&id).expect("by_ino is consistent");
            // Not: another object under the same number (the one the node stands for was
            // removed behind its back, straight in BACKING, and its inode reused).
            let same_object = n.stands_for(&st, birth);
            if same_object {
                // Known already (a hard link, or an earlier lookup).
                if !n.links.iter().any(|(p, nm)| *p == parent && nm == name) {
                    n.links.push((parent, name.to_owned()));
                }
                if n.origin.is_some() || n.detached {
                    // A name that surely reaches the object in BACKING now; the one kept
                    // may have gone with a change made straight to BACKING (or, carried
                    // across a commit, it had none: `take_orphans`).
                    n.origin = Some(rel);
                    n.detached = false;
                }
                // What `attr` would read again for an unchanged node.
                let fresh = !n.changed && n.origin.is_some();
                if fresh {
                    n.attr = Attr::from_statx(&st);
                }
                return Ok((id, fresh));
            }
            // The node stands for nothing in BACKING any more, and its name there is
            // another object's now: only a file it holds open still reaches it.
            n.backing_ino = None;
            n.detached = true;
            self.by_ino.remove(&key);
        }
        let id = self.own_number(key.0, key.1).unwrap_or_else(|| {
            self.next_new += 1;
            self.next_new - 1
        });
        let mut n = Node::new(id, Some(rel), Attr::from_statx(&st));
        (n.backing_dev, n.backing_ino) = (key.0, Some(key.1));
        n.backing_birth = birth;
        n.links.push((parent, name.to_owned()));
        self.nodes.insert(id, n);
        self.by_ino.insert(key, id);
        Ok((id, true))
    }

    /// The number of the backing object `dev`/`ino` short of counting one out: its own
    /// inode number, or on a file system mounted inside BACKING one made from the device's
    /// and its own. None where that is still taken by a node of a removed object that the
    /// kernel has not forgotten yet, is stale, or is one the view keeps for others.
    fn own_number(&mut self, dev: u64, ino: u64) -> Option<u64> {
        let id = if dev != self.backing.dev() {
            self.devices.id(dev, ino, true)?
        } else {
            Some(ino).filter(|&n| n != ROOT && n < FIRST_NEW_ID)?
        };
        (!self.nodes.contains_key(&id) && !self.stale.contains_key(&id)).then_some(id)
    }

    /// lstat of `name` in the BACKING directory `origin` of node `parent` (`rel` is the two
    /// joined): from the root with the same checks as every path, or, while
    /// [`View::adopt`] runs, relative to the directory, opened once with those checks. One
    /// plain name looked up there (`fstatat` without following it) cannot lead out of it.
    fn lstat_child(
        &mut self,
        parent: u64,
        origin: &Path,
        name: &OsStr,
        rel: &Path,
    ) -> std::io::Result<rustix::fs::Statx> {
        let plain = !name.is_empty()
            && name != "."
            && name != ".."
            && !name.as_encoded_bytes().contains(&b'/');
        let Some(cache) = self.adopting.as_mut().filter(|_| plain) else {
            return self.backing.statx(rel);
        };
        if !cache.dirs.contains_key(&parent) {
            if cache.dirs.len() >= ADOPT_DIRS {
                cache.dirs.clear();
            }
            let dir = self.backing.open_at(
                origin,
                rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY,
                0,
            )?;
            cache.dirs.insert(parent, dir);
        }
        crate::backing::statx_at(&cache.dirs[&parent], name, rustix::fs::AtFlags::empty())
    }

    /// The names in directory `dir`, each with its node if it is a directory (met for
    /// this: [`View::maybe_drop`] it once done with it), for a walk of a tree one
    /// directory at a time.
    pub fn subdirs_of(&mut self, dir: u64) -> Res<Vec<(OsString, Option<u64>)>> {
        let mut out = Vec::new();
        for e in self.readdir(dir)? {
            let sub = if e.kind == libc::S_IFDIR || e.kind == 0 {
                match self.child(dir, &e.name) {
                    Ok(c) if self.node(c)?.attr.is_dir() => Some(c),
                    Ok(c) => {
                        self.maybe_drop(c);
                        None
                    }
                    // Gone since it was listed: nothing below it.
                    Err(libc::ENOENT) => None,
                    Err(e) => return Err(e),
                }
            } else {
                None
            };
            out.push((e.name, sub));
        }
        Ok(out)
    }

    /// Resolves a view path ("" for the root).
    pub fn resolve(&mut self, path: &Path) -> Res<u64> {
        let mut cur = ROOT;
        for c in path.components() {
            match c {
                std::path::Component::Normal(name) if self.adopting.is_some() => {
                    let key = (cur, name.to_owned());
                    cur = match self.adopting.as_ref().and_then(|a| a.found.get(&key)) {
                        Some(&id) => id,
                        None => {
                            let id = self.child(cur, name)?;
                            if let Some(a) = self.adopting.as_mut() {
                                a.found.insert(key, id);
                            }
                            id
                        }
                    };
                }
                std::path::Component::Normal(name) => cur = self.child(cur, name)?,
                std::path::Component::CurDir => {}
                _ => return Err(libc::EINVAL),
            }
        }
        Ok(cur)
    }

    fn resolve_parent<'a>(&mut self, path: &'a RawPath) -> Res<(u64, &'a OsStr)> {
        let (parent, name) = crate::backing::split(path.as_path());
        Ok((self.resolve(parent)?, name))
    }

    /// The kernel looked a name up: count the reference.
    pub fn lookup(&mut self, parent: u64, name: &OsStr) -> Res<u64> {
        let id = self.child(parent, name)?;
        let note = self.note_lookups;
        let n = self.node_mut(id)?;
        n.lookups += 1;
        if note {
            n.note_looked_up(parent, name);
        }
        Ok(id)
    }

    /// [`View::lookup`] with the node's attributes: one lstat of BACKING, not two.
    pub fn lookup_attr(&mut self, parent: u64, name: &OsStr) -> Res<(u64, Attr)> {
        let (id, fresh) = self.child_fresh(parent, name)?;
        let note = self.note_lookups;
        let n = self.node_mut(id)?;
        n.lookups += 1;
        if note {
            n.note_looked_up(parent, name);
        }
        if fresh {
            return Ok((id, n.attr.clone()));
        }
        Ok((id, self.attr(id)?))
    }

    pub fn forget(&mut self, id: u64, count: u64) {
        // A node is kept while the kernel holds a lookup of it, so forgetting more than was
        // counted means a reply gave the kernel a node the view did not count: say so, as
        // nodes then go while the kernel still uses them.
        if let Some(s) = self.stale.get_mut(&id) {
            if s.lookups < count {
                tracing::warn!(
                    "the kernel forgot {count} lookups of stale node {id}, of which the view counted {}: lookups were miscounted",
                    s.lookups
                );
            }
            s.lookups = s.lookups.saturating_sub(count);
            if s.unused() {
                self.stale.remove(&id);
            }
            return;
        }
        let held = self.nodes.get_mut(&id).map(|n| {
            let held = n.lookups;
            n.lookups = held.saturating_sub(count);
            held
        });
        match held {
            None => tracing::warn!(
                "the kernel forgot {count} lookups of node {id}, which the view no longer holds: lookups were miscounted"
            ),
            Some(held) if held < count => tracing::warn!(
                "the kernel forgot {count} lookups of node {id}, of which the view counted {held}: lookups were miscounted"
            ),
            Some(_) => {}
        }
        self.maybe_drop(id);
    }

    /// The kernel released an open of a number in [`View::stale`]; whether it was one.
    pub fn release_stale(&mut self, id: u64) -> bool {
        let Some(s) = self.stale.get_mut(&id) else {
            return false;
        };
        s.opens = s.opens.saturating_sub(1);
        if s.unused() {
            self.stale.remove(&id);
        }
        true
    }

    /// Takes over the numbers `old` holds in [`View::stale`], before this view (one built
    /// to replace it) numbers any node.
    pub fn keep_stale_of(&mut self, old: &View) {
        self.stale = old.stale.clone();
    }

    /// Drops an unused node that is only a cache of the backing directory, or that lost
    /// every name in the view (its changes are in the journal; nothing can reach it).
    pub fn maybe_drop(&mut self, id: u64) {
        let Some(n) = self.nodes.get(&id) else { return };
        if id == ROOT || !n.unused() {
            return;
        }
        let removed = n.attr.nlink == 0 && n.links.is_empty();
        if !removed && !n.cache_only() {
            return;
        }
        if !removed && n.attr.is_dir() {
            // Nodes below it name it as their parent: dropped later, if none is left.
            self.dir_candidates.insert(id);
            if self.dir_candidates.len() >= self.sweep_at {
                self.sweep_dirs();
            }
            return;
        }
        self.drop_node(id);
    }

    fn drop_node(&mut self, id: u64) {
        if let Some(n) = self.nodes.remove(&id) {
            if let Some(ino) = n.backing_ino {
                unmap_ino(&mut self.by_ino, (n.backing_dev, ino), id);
            }
        }
    }

    /// Drops the forgotten unchanged directories that no node names as its parent any
    /// more, again and again as long as that frees more (a forgotten tree goes from the
    /// leaves up). Each sweep looks at every node, so the next one waits for a quarter as
    /// many candidates as there are nodes, and for twice as many as are left (directories
    /// kept by what is below them): a forget storm costs a few looks per node, not a
    /// sweep every few hundred forgets.
    fn sweep_dirs(&mut self) {
        let before = self.nodes.len();
        loop {
            let parents: HashSet<u64> = self
                .nodes
                .values()
                .flat_map(|n| n.links.iter().map(|(p, _)| *p))
                .collect();
            let nodes = &self.nodes;
            self.dir_candidates.retain(|id| {
                nodes
                    .get(id)
                    .is_some_and(|n| n.unused() && n.cache_only() && n.attr.is_dir())
            });
            let free: Vec<u64> = self
                .dir_candidates
                .iter()
                .copied()
                .filter(|id| !parents.contains(id))
                .collect();
            if free.is_empty() {
                break;
            }
            for id in free {
                self.dir_candidates.remove(&id);
                self.drop_node(id);
            }
        }
        if before - self.nodes.len() >= 4096 {
            // The maps keep the room of their largest size (a few hundred bytes a node).
            if self.nodes.capacity() > 4 * self.nodes.len() {
                self.nodes.shrink_to(2 * self.nodes.len());
                self.by_ino.shrink_to(2 * self.by_ino.len());
            }
            interpose_fs::return_free_memory();
        }
        self.sweep_at = (2 * self.dir_candidates.len())
            .max(self.nodes.len() / 4)
            .max(SWEEP_MIN);
    }

    /// Current attributes: fresh from the backing directory for an unchanged node.
    pub fn attr(&mut self, id: u64) -> Res<Attr> {
        let backing = self.backing.clone();
        let n = self.node_mut(id)?;
        if !n.changed {
            let st = match (&n.origin, &n.origin_file) {
                (_, Some(f)) if n.detached => {
                    crate::backing::statx_at(f.as_ref(), "", rustix::fs::AtFlags::EMPTY_PATH).ok()
                }
                (Some(origin), _) if !n.detached => backing.statx(origin).ok(),
                _ => None,
            };
            if let Some(st) = st.filter(|st| n.stands_for(st, backing.birth_of(st))) {
                n.attr = Attr::from_statx(&st);
            }
        } else if let Some(f) = &n.passthrough_file {
            // Its data is that file's (see `passthrough_file`), written by the kernel.
            let st = crate::backing::statx_at(f.as_ref(), "", rustix::fs::AtFlags::EMPTY_PATH);
            if let Ok(st) = st {
                let fresh = Attr::from_statx(&st);
                n.attr.size = fresh.size;
                n.attr.blocks = fresh.blocks;
                // Written since the view last changed it: the write's times.
                if fresh.ctime > n.attr.ctime {
                    n.attr.mtime = fresh.mtime;
                    n.attr.ctime = fresh.ctime;
                }
            }
        } else if n.attr.is_dir() && n.overlay.is_some() && self.is_direct(id) {
            self.refresh_direct_dir(id);
        }
        Ok(self.node(id)?.attr.clone())
    }

    /// A directory outside the isolated paths that holds isolated names (made, removed or
    /// replaced in the view): its attributes are BACKING's, which changes go straight to,
    /// with the link count of the subdirectories the view shows instead of BACKING's.
    fn refresh_direct_dir(&mut self, id: u64) {
        let n = &self.nodes[&id];
        let (Some(origin), Some(overlay)) = (&n.origin, &n.overlay) else {
            return;
        };
        let is_dir = |mode: u32| mode & libc::S_IFMT == libc::S_IFDIR;
        let Some(st) = self
            .backing
            .lstat(origin)
            .ok()
            .filter(|s| is_dir(s.st_mode))
        else {
            return;
        };
        let nlink = st.st_nlink as i64 + overlay.subdir_delta;
        let mut a = Attr::from_stat(&st);
        a.nlink = nlink.max(2) as u32;
        self.nodes.get_mut(&id).expect("checked above").attr = a;
    }

    pub fn readlink(&self, id: u64) -> Res<Vec<u8>> {
        let n = self.node(id)?;
        if n.attr.kind() != libc::S_IFLNK {
            return Err(libc::EINVAL);
        }
        if let Some(t) = &n.target {
            return Ok(t.clone());
        }
        let origin = n.origin.as_ref().ok_or(libc::EIO)?;
        let (dir, name) = self.backing.parent_of(origin).map_err(io_errno)?;
        rustix::fs::readlinkat(&dir, name, Vec::new())
            .map(|t| t.into_bytes())
            .map_err(|e| e.raw_os_error())
    }

    /// The directory's entries, merged: backing names not hidden, then the overlay's.
    pub fn readdir(&mut self, id: u64) -> Res<Vec<DirEntry>> {
        let n = self.node(id)?;
        if !n.attr.is_dir() {
            return Err(libc::ENOTDIR);
        }
        let overlay = n.overlay.clone().unwrap_or_default();
        let dev = n.backing_dev;
        let mut out = Vec::new();
        // A detached directory was removed straight in BACKING: it lists empty.
        if let (Some(origin), false, false) = (n.origin.clone(), overlay.opaque, n.detached) {
            let fd = self
                .backing
                .open_at(
                    &origin,
                    rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY,
                    0,
                )
                .map_err(io_errno)?;
            let dir = rustix::fs::Dir::read_from(&fd).map_err(|e| e.raw_os_error())?;
            for e in dir {
                let e = e.map_err(|e| e.raw_os_error())?;
                let name = OsStr::from_bytes(e.file_name().to_bytes());
                if name == "." || name == ".." || overlay.entries.contains_key(name) {
                    continue;
                }
                let ino = e.ino();
                // (An entry that is a mount point shows the number of the directory
                // under it, on the directory's device: a lookup gives it the mount's.)
                let ino = match self.by_ino.get(&(dev, ino)) {
                    Some(&known) => known,
                    // The number a lookup would give; where it would count one out, the
                    // lookup is made now, so that the listing agrees with stat.
                    None => match self.own_number(dev, ino) {
                        Some(n) => n,
                        None => self.child(id, name).unwrap_or(ino),
                    },
                };
                out.push(DirEntry {
                    name: name.to_owned(),
                    ino,
                    kind: kind_of_dtype(e.file_type()),
                });
            }
        }
        for (name, e) in &overlay.entries {
            if let Some(cid) = e {
                if let Some(c) = self.nodes.get(cid) {
                    out.push(DirEntry {
                        name: name.clone(),
                        ino: *cid,
                        kind: c.attr.kind(),
                    });
                }
            }
        }
        Ok(out)
    }

    fn is_empty_dir(&mut self, id: u64) -> Res<bool> {
        Ok(self.readdir(id)?.is_empty())
    }

    // ---- recording ----

    /// Room for the next records (see [`Journal::reserve`]).
    pub fn reserve(&mut self, bytes: u64) -> Res<()> {
        self.journal.reserve(bytes).map_err(|e| {
            tracing::error!("journal: {e}");
            e.errno()
        })
    }

    fn record(&mut self, change: &Change, data: &[&[u8]]) -> Res<u64> {
        let t = now();
        self.clock = Some(t);
        let keep = self.outside_parents(change);
        let (_, off) = self
            .journal
            .append_keeping(change, t, data, &keep)
            .map_err(|e| {
                tracing::error!("journal append failed: {e}");
                e.errno()
            })?;
        self.unsynced = true;
        self.note_isolated(change);
        Ok(off)
    }

    /// Whether changes to node `id` go straight to BACKING unrecorded (a node outside the
    /// isolated paths).
    pub fn is_direct(&self, id: u64) -> bool {
        match &self.mode {
            Mode::Paths(_) => self.path_of(id).is_some() && !self.isolated_node(id),
            _ => false,
        }
    }

    /// With `--isolate-path`: the files programs write through passthrough (opened outside
    /// the isolated paths) that a rename or link of node `id` to `to_parent`/`to_name`
    /// would bring into the isolated paths, `id` itself or, for a directory, below it.
    pub fn direct_writers_entering(&self, id: u64, to_parent: u64, to_name: &OsStr) -> Vec<u64> {
        let Mode::Paths(set) = &self.mode else {
            return Vec::new();
        };
        let dest = self.path_of(to_parent).map(|p| p.join(to_name));
        let (Some(dest), Some(src)) = (dest, self.path_of(id)) else {
            return Vec::new();
        };
        if !isolates(set, &self.spread, &dest) {
            return Vec::new();
        }
        let below = self.nodes.get(&id).is_some_and(|n| n.attr.is_dir());
        self.nodes
            .values()
            .filter(|n| n.writers > 0 && n.passthrough_opens > 0 && !n.attr.is_dir())
            .filter(|n| {
                n.id == id || (below && self.path_of(n.id).is_some_and(|p| p.starts_with(&src)))
            })
            .filter(|n| self.is_direct(n.id))
            .map(|n| n.id)
            .collect()
    }

    /// With `--isolate-path`, whether changes to node `id` are isolated whatever name they
    /// come through: it has a name the view knows among the isolated paths (a hard link
    /// across the border, or one whose other name a pending change moved), or it is not a
    /// directory and has pending changes (what the view shows of it is no longer
    /// BACKING's). Made in BACKING, such a change would not show in the view, or the view
    /// and the commit would part. (A directory outside the isolated paths whose names
    /// changed shows BACKING's attributes: see [`View::refresh_direct_dir`].)
    fn isolated_node(&self, id: u64) -> bool {
        let (Mode::Paths(set), Some(n)) = (&self.mode, self.nodes.get(&id)) else {
            return false;
        };
        (!n.attr.is_dir() && (n.changed || n.data.is_some()))
            || n.links.iter().any(|(parent, name)| {
                self.path_of(*parent)
                    .is_some_and(|p| isolates(set, &self.spread, &p.join(name)))
            })
    }

    /// With `--isolate-path`, reads again BACKING's attributes of unchanged nodes an
    /// isolated change is about to change (their link count): changes made straight to
    /// BACKING through other names (a hard link's) may have changed them.
    fn reread_backing_attrs(&mut self, ids: impl IntoIterator<Item = u64>) {
        if matches!(self.mode, Mode::Paths(_)) {
            for id in ids {
                let _ = self.attr(id);
            }
        }
    }

    /// [`View::pass`] for a change made to node `id` (its data, attributes or xattrs, or a
    /// new name for it).
    fn pass_node(&mut self, id: u64, change: &Change, data: &[&[u8]]) -> Res<bool> {
        if self.isolated_node(id) {
            return Ok(false);
        }
        self.pass(change, data)
    }

    /// The directories outside the isolated paths whose entries `change` changes: the
    /// mount shows BACKING's times for them, and a commit keeps those.
    fn outside_parents(&mut self, change: &Change) -> Vec<RawPath> {
        if !matches!(self.mode, Mode::Paths(_)) {
            return Vec::new();
        }
        let names = match change {
            Change::Create { path, .. } | Change::Unlink { path } | Change::Rmdir { path } => {
                vec![path]
            }
            Change::Link { to, .. } => vec![to],
            Change::Rename { from, to, .. } => vec![from, to],
            _ => Vec::new(),
        };
        let mut out: Vec<RawPath> = Vec::new();
        for name in names {
            let Some(dir) = name.as_path().parent() else {
                continue;
            };
            let dir = RawPath::from_path(dir);
            if out.contains(&dir) {
                continue;
            }
            if self
                .resolve(dir.as_path())
                .is_ok_and(|id| self.is_direct(id))
            {
                out.push(dir);
            }
        }
        out
    }

    /// Keeps the paths outside the isolated ones that a recorded change names isolated
    /// from now on (see `spread`).
    fn note_isolated(&mut self, change: &Change) {
        let Mode::Paths(set) = &self.mode else {
            return;
        };
        let (a, b) = change.paths();
        for p in [a, b].into_iter().flatten() {
            if !isolates(set, &self.spread, p.as_path()) {
                self.spread.insert(p.as_path().to_owned());
            }
        }
    }

    fn route(&self, change: &Change) -> Route {
        if let Change::Data { path: None, .. } = change {
            // A file without a name in BACKING any more (removed there while open): its
            // data can only be kept by the view, for as long as it is open.
            return Route::Keep;
        }
        match &self.mode {
            Mode::Isolated => Route::Keep,
            Mode::WriteThrough => Route::Trail,
            Mode::Paths(set) => {
                // A change that names an isolated path is isolated, also when its other
                // path is not (a rename or link across the border): BACKING keeps both
                // until commit, and the other path is isolated from then on.
                let (a, b) = change.paths();
                let iso = |p: &RawPath| isolates(set, &self.spread, p.as_path());
                if a.is_some_and(iso) || b.is_some_and(iso) {
                    Route::Keep
                } else {
                    Route::Direct
                }
            }
        }
    }

    /// The object in BACKING that a change to node `id`, which has no name in the view,
    /// belongs to: a file whose last name the view knew went straight to BACKING (outside
    /// the isolated paths, or with `--write-through`) while BACKING keeps another name for
    /// it that the view has not met, and of which the view holds nothing of its own. Its
    /// changes made through the mount (through a descriptor open before) reach that object,
    /// as on any file system. None: the changes are the view's to keep (a file removed for
    /// good, a copy carried across a commit, a file with pending changes of its own).
    fn linked_object(&self, id: u64) -> Option<Arc<File>> {
        if matches!(self.mode, Mode::Isolated) {
            return None;
        }
        let n = self.nodes.get(&id)?;
        if !n.detached || n.changed || n.data.is_some() || !n.attr.is_file() {
            return None;
        }
        let f = n.origin_file.clone()?;
        // Another name for it the view has met would have attached it again.
        let linked = crate::backing::statx_at(f.as_ref(), "", rustix::fs::AtFlags::EMPTY_PATH)
            .is_ok_and(|st| st.stx_nlink > 0);
        linked.then_some(f)
    }

    /// Makes a change to node `id`, which has no name in the view, to its object in
    /// BACKING if it belongs there ([`View::linked_object`]): true if so. With
    /// `--write-through` it is recorded too, without a path (the trail names objects by
    /// path, and this one's names are unknown).
    fn pass_to_object(&mut self, id: u64, change: &Change, data: &[&[u8]]) -> Res<bool> {
        let Some(object) = self.linked_object(id) else {
            return Ok(false);
        };
        let trail = matches!(self.mode, Mode::WriteThrough);
        let (end, seq) = (self.journal.len(), self.journal.last_seq());
        if trail {
            self.record(change, data)?;
        }
        let applied = crate::backing::apply_to_object(&object, change, data);
        if applied.is_err() && trail {
            if let Err(e) = self.journal.truncate(end, seq) {
                tracing::error!("taking back the record of a change that failed: {e}");
            }
        }
        applied.map_err(io_errno)?;
        // Unchanged, its attributes are read from the object again.
        self.attr(id)?;
        Ok(true)
    }

    /// Whether a change outside the isolated paths is entangled with pending changes, and
    /// must be isolated with them: the rename or removal of a directory with pending
    /// changes below it (their records name paths below it, which BACKING must still have
    /// when they are committed; a directory a rename replaces, empty in the view, may
    /// still have entries in BACKING), or of a name of an isolated node (the rename's
    /// victim too: its name goes).
    fn entangled(&self, change: &Change, named: Named) -> bool {
        let node = |id: Option<u64>| id.is_some_and(|id| self.isolated_node(id));
        match change {
            Change::Rename { from, to, .. } => {
                node(named.first)
                    || node(named.second)
                    || self.pending_below(from.as_path(), named.first)
                    || (named.second.is_some() && self.pending_below(to.as_path(), named.second))
            }
            Change::Rmdir { path } => {
                node(named.first) || self.pending_below(path.as_path(), named.first)
            }
            Change::Unlink { .. } => node(named.first),
            _ => false,
        }
    }

    /// Applies a change to the backing directory at once if the mode says so; then the
    /// view needs no state for it. Returns whether it did.
    fn pass(&mut self, change: &Change, data: &[&[u8]]) -> Res<bool> {
        self.pass_named(change, data, Named::default())
    }

    /// [`View::pass`] for a change whose paths the caller has resolved to nodes.
    fn pass_named(&mut self, change: &Change, data: &[&[u8]], named: Named) -> Res<bool> {
        let route = match self.route(change) {
            Route::Direct if self.entangled(change, named) => Route::Keep,
            r => r,
        };
        if matches!(route, Route::Keep) {
            return Ok(false);
        }
        self.hold_victim(change, named);
        let res = match route {
            Route::Keep => unreachable!("returned above"),
            Route::Direct => {
                crate::backing::apply_lifting(&self.backing, change, data, false, |_| Ok(()))
            }
            Route::Trail => {
                let (end, seq) = (self.journal.len(), self.journal.last_seq());
                self.record(change, data)?;
                // From the write's buffers, which the record now holds too.
                let applied =
                    crate::backing::apply_lifting(&self.backing, change, data, false, |_| Ok(()));
                if applied.is_err() {
                    // Not in BACKING (a full disk, say): not in the trail either.
                    if let Err(e) = self.journal.truncate(end, seq) {
                        tracing::error!("taking back the record of a change that failed: {e}");
                    }
                }
                applied
            }
        };
        res.map_err(io_errno)?;
        self.after_direct(change, named);
        Ok(true)
    }

    /// Whether the view holds pending changes below `path`, the path of node `id` (if
    /// known: a file has nothing below it, and then nothing is scanned): a changed node
    /// below it, or a directory at or below it whose names changed in the view (the
    /// names may be gone again, their records are not).
    fn pending_below(&self, path: &Path, id: Option<u64>) -> bool {
        let names_changed = |n: &Node| n.overlay.as_ref().is_some_and(|o| !o.entries.is_empty());
        if let Some(n) = id.and_then(|id| self.nodes.get(&id)) {
            if !n.attr.is_dir() {
                return false;
            }
            if names_changed(n) {
                return true;
            }
        }
        self.nodes.values().any(|n| {
            if n.id == ROOT || !(n.changed || names_changed(n)) {
                return false;
            }
            match id {
                Some(dir) => n.id != dir && self.is_ancestor(dir, n.id),
                None => self
                    .path_of(n.id)
                    .is_some_and(|p| p.starts_with(path) && (p != path || names_changed(n))),
            }
        })
    }

    /// Keeps cached nodes right after a change went straight to the backing directory.
    /// `named`: the nodes the change's paths named, if the caller knows them; an unlink,
    /// rmdir or rename of files then fixes only those nodes' names, not every node's
    /// (`rm -rf` of a big tree, renames in a tree of which the view holds many nodes).
    fn after_direct(&mut self, change: &Change, named: Named) {
        match change {
            Change::Unlink { path } | Change::Rmdir { path } => {
                let Ok((parent, name)) = self.resolve_parent(path) else {
                    return;
                };
                let name = name.to_owned();
                // `remove`, the only maker of these changes, always names the node.
                let Some(id) = named.first.filter(|id| self.nodes.contains_key(id)) else {
                    return;
                };
                let n = self.nodes.get_mut(&id).expect("checked above");
                n.links.retain(|(p, nm)| !(*p == parent && *nm == name));
                self.lost_name(id, path.as_path());
                let n = self.nodes.get_mut(&id).expect("checked above");
                // Its last name gone, the object is gone from BACKING and its inode
                // number may be reused by the next object made there.
                let gone = matches!(change, Change::Rmdir { .. }) || n.attr.nlink <= 1;
                if let Some(ino) = n.backing_ino.take_if(|_| gone) {
                    unmap_ino(&mut self.by_ino, (n.backing_dev, ino), n.id);
                }
                // Counted as BACKING counts it: a file left with no link is one a commit
                // must carry if it is still open (`nameless`).
                n.attr.nlink = n.attr.nlink.saturating_sub(1);
                if matches!(change, Change::Rmdir { .. }) {
                    // Still someone's working directory, maybe: removed, as rmdir leaves it.
                    n.attr.nlink = 0;
                }
            }
            Change::Rename { from, to, flags } => {
                let (Ok((p1, n1)), Ok((p2, n2))) =
                    (self.resolve_parent(from), self.resolve_parent(to))
                else {
                    return;
                };
                let exchange = flags & libc::RENAME_EXCHANGE != 0;
                let (n1, n2) = (n1.to_owned(), n2.to_owned());
                let (fromp, top) = (from.to_path_buf(), to.to_path_buf());
                // Where an origin below `from` (and, for an exchange, below `to`) is now.
                let moved = |o: &Path| -> Option<PathBuf> {
                    let (rest, base) = match o.strip_prefix(&fromp) {
                        Ok(rest) => (rest, &top),
                        Err(_) if exchange => (o.strip_prefix(&top).ok()?, &fromp),
                        Err(_) => return None,
                    };
                    // Not `join` for the renamed object itself: "to" joined with "" is
                    // "to/", which names only a directory.
                    Some(if rest.as_os_str().is_empty() {
                        base.clone()
                    } else {
                        base.join(rest)
                    })
                };
                // Names below a directory move with it; files have none.
                let is_dir = |id: &u64| self.nodes.get(id).is_some_and(|n| n.attr.is_dir());
                let ids: Vec<u64> = match (named.first, named.second) {
                    (Some(a), b) if !is_dir(&a) && !b.is_some_and(|b| is_dir(&b)) => {
                        [Some(a), b].into_iter().flatten().collect()
                    }
                    _ => self.nodes.keys().copied().collect(),
                };
                let mut displaced = Vec::new();
                for id in ids {
                    let Some(n) = self.nodes.get_mut(&id) else {
                        continue;
                    };
                    if !exchange && n.links.iter().any(|(p, nm)| *p == p2 && *nm == n2) {
                        n.links.retain(|(p, nm)| !(*p == p2 && *nm == n2));
                        displaced.push(n.id);
                    }
                    for l in n.links.iter_mut() {
                        if l.0 == p1 && l.1 == n1 {
                            *l = (p2, n2.clone());
                        } else if exchange && l.0 == p2 && l.1 == n2 {
                            *l = (p1, n1.clone());
                        }
                    }
                    if let Some(o) = n.origin.as_deref().and_then(moved) {
                        n.origin = Some(o);
                    }
                }
                for id in displaced {
                    let Some(n) = self.nodes.get_mut(&id) else {
                        continue;
                    };
                    if n.origin.as_ref() != Some(&top) {
                        continue; // the object renamed onto another name of itself
                    }
                    // Its last name gone, its inode number may be reused in BACKING.
                    if n.attr.is_dir() || n.attr.nlink <= 1 {
                        if let Some(ino) = n.backing_ino.take() {
                            unmap_ino(&mut self.by_ino, (n.backing_dev, ino), id);
                        }
                    }
                    n.attr.nlink = if n.attr.is_dir() {
                        0
                    } else {
                        n.attr.nlink.saturating_sub(1)
                    };
                    self.lost_name(id, &top);
                }
            }
            _ => {}
        }
    }

    /// Node `id` lost the name `path` in BACKING. If it was reached through that name,
    /// it is reached through another it still has, if one is known; else it is detached
    /// (the next lookup of another name of it attaches it again).
    fn lost_name(&mut self, id: u64, path: &Path) {
        let Some(n) = self.nodes.get(&id) else {
            return;
        };
        if n.origin.as_deref() != Some(path) {
            return;
        }
        let other = n.links.first().cloned();
        let origin = other.and_then(|(p, nm)| Some(self.nodes.get(&p)?.origin.as_ref()?.join(nm)));
        let n = self.nodes.get_mut(&id).expect("checked above");
        match origin {
            Some(o) => n.origin = Some(o),
            None => n.detached = true,
        }
    }

    /// Before a change made straight to BACKING takes a name away: a file open through
    /// the mount that may lose its last name keeps its object open, so that it can still
    /// be read and stat'ed (as a file unlinked or renamed over while open can).
    fn hold_victim(&mut self, change: &Change, named: Named) {
        let victim = match change {
            Change::Unlink { .. } => named.first,
            Change::Rename { flags, .. } if flags & libc::RENAME_EXCHANGE == 0 => named.second,
            _ => None,
        };
        if let Some(id) = victim {
            // Its link count as it is now, for telling whether this is its last name.
            let _ = self.attr(id);
            if self
                .nodes
                .get(&id)
                .is_some_and(|n| n.opens > 0 && n.attr.is_file())
            {
                if let Err(e) = self.origin_file(id) {
                    tracing::debug!("keeping node {id} open before it loses its name: errno {e}");
                }
            }
        }
    }

    /// Makes every change so far durable.
    pub fn sync(&mut self) -> Res<()> {
        self.sync_for(false)
    }

    /// [`View::sync`] for a program's fsync, fdatasync or fsyncdir: lets the journal write
    /// zeros ahead, since more are likely to follow (see [`crate::journal`]).
    pub fn fsync(&mut self) -> Res<()> {
        self.sync_for(true)
    }

    fn sync_for(&mut self, program: bool) -> Res<()> {
        if self.unsynced {
            if program {
                self.journal.sync_ahead()
            } else {
                self.journal.sync()
            }
            .map_err(|e| e.errno())?;
            self.unsynced = false;
        }
        if !matches!(self.mode, Mode::Isolated) {
            // Changes that went straight to BACKING: make them durable too.
            let root = self
                .backing
                .open_at(
                    Path::new(""),
                    rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY,
                    0,
                )
                .map_err(io_errno)?;
            rustix::fs::syncfs(&root).map_err(|e| e.raw_os_error())?;
        }
        Ok(())
    }

    // ---- applying (shared by live operations and replay) ----

    fn set_entry(&mut self, dir: u64, name: &OsStr, to: Option<u64>) {
        let clock = self.clock();
        let shows_dir = |bound: Option<u64>| {
            bound
                .and_then(|c| self.nodes.get(&c))
                .is_some_and(|c| c.attr.is_dir())
        };
        let d = &self.nodes[&dir];
        let delta = match (
            &d.origin,
            d.overlay.as_ref().and_then(|o| o.entries.get(name)),
        ) {
            (None, _) => 0,
            _ if d.overlay.as_ref().is_some_and(|o| o.opaque) => 0,
            (Some(_), Some(&was)) => shows_dir(to) as i64 - shows_dir(was) as i64,
            (Some(origin), None) => {
                // The first entry for this name: it stands for what BACKING has there.
                let there = self
                    .backing
                    .lstat(&origin.join(name))
                    .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR);
                shows_dir(to) as i64 - there as i64
            }
        };
        let d = self.nodes.get_mut(&dir).expect("dir exists");
        let opaque = d.origin.is_none();
        let ov = d.overlay.get_or_insert_with(|| Overlay {
            opaque,
            ..Default::default()
        });
        ov.subdir_delta += delta;
        let old = match (to, ov.opaque) {
            (None, true) => ov.entries.remove(name).flatten(),
            _ => ov.entries.insert(name.to_owned(), to).flatten(),
        };
        if !self.keep_dirs.contains(&dir) {
            d.attr.mtime = clock;
            d.attr.ctime = clock;
        }
        d.changed = true;
        if let Some(o) = old {
            if let Some(n) = self.nodes.get_mut(&o) {
                n.refs -= 1;
            }
        }
        if let Some(t) = to {
            if let Some(n) = self.nodes.get_mut(&t) {
                n.refs += 1;
            }
        }
    }

    fn unlink_node(&mut self, parent: u64, name: &OsStr, id: u64) {
        let clock = self.clock();
        if let Some(n) = self.nodes.get_mut(&id) {
            n.links.retain(|(p, nm)| !(*p == parent && nm == name));
            n.attr.nlink = n.attr.nlink.saturating_sub(1);
            n.attr.ctime = clock;
            n.changed = true;
            if n.attr.is_dir() {
                n.attr.nlink = 0;
            }
        }
    }

    fn dir_nlink(&mut self, dir: u64, delta: i32) {
        if let Some(d) = self.nodes.get_mut(&dir) {
            d.attr.nlink = (d.attr.nlink as i64 + delta as i64).max(1) as u32;
        }
    }

    fn do_create(
        &mut self,
        parent: u64,
        name: &OsStr,
        kind: &NewKind,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> u64 {
        let clock = self.clock();
        let id = self.next_new;
        self.next_new += 1;
        let t = clock;
        let is_dir = matches!(kind, NewKind::Dir);
        let mut n = Node::new(
            id,
            None,
            Attr {
                mode,
                uid,
                gid,
                size: 0,
                atime: t,
                mtime: t,
                ctime: t,
                nlink: if is_dir { 2 } else { 1 },
                rdev: match kind {
                    NewKind::Node { rdev } => *rdev,
                    _ => 0,
                },
                blocks: 0,
            },
        );
        n.changed = true;
        match kind {
            NewKind::File => n.data = Some(Data::default()),
            NewKind::Dir => {
                n.attr.size = BLOCK;
                n.attr.blocks = BLOCK / 512;
                n.overlay = Some(Overlay {
                    opaque: true,
                    ..Default::default()
                })
            }
            NewKind::Symlink { target } => {
                n.attr.size = target.0.len() as u64;
                n.target = Some(target.0.clone());
            }
            NewKind::Node { .. } => {}
        }
        n.links.push((parent, name.to_owned()));
        self.nodes.insert(id, n);
        self.set_entry(parent, name, Some(id));
        if is_dir {
            self.dir_nlink(parent, 1);
        }
        id
    }

    fn do_remove(&mut self, parent: u64, name: &OsStr, id: u64) {
        let is_dir = self.nodes.get(&id).is_some_and(|n| n.attr.is_dir());
        self.set_entry(parent, name, None);
        self.unlink_node(parent, name, id);
        if is_dir {
            self.dir_nlink(parent, -1);
        }
        self.maybe_drop(id);
    }

    fn do_link(&mut self, id: u64, parent: u64, name: &OsStr) {
        let clock = self.clock();
        if let Some(n) = self.nodes.get_mut(&id) {
            n.links.push((parent, name.to_owned()));
            n.attr.nlink += 1;
            n.attr.ctime = clock;
            n.changed = true;
        }
        self.set_entry(parent, name, Some(id));
    }

    #[allow(clippy::too_many_arguments)]
    fn do_rename(
        &mut self,
        p1: u64,
        n1: &OsStr,
        a: u64,
        p2: u64,
        n2: &OsStr,
        b: Option<u64>,
        flags: u32,
    ) {
        let clock = self.clock();
        let relink = |v: &mut View, id: u64, from: (u64, &OsStr), to: (u64, &OsStr)| {
            if let Some(n) = v.nodes.get_mut(&id) {
                if let Some(l) = n
                    .links
                    .iter_mut()
                    .find(|(p, nm)| *p == from.0 && nm == from.1)
                {
                    *l = (to.0, to.1.to_owned());
                } else {
                    n.links.insert(0, (to.0, to.1.to_owned()));
                }
                n.attr.ctime = clock;
                n.changed = true;
            }
        };
        let a_dir = self.nodes.get(&a).is_some_and(|n| n.attr.is_dir());
        if flags & libc::RENAME_EXCHANGE != 0 {
            let b = b.expect("exchange has two objects");
            let b_dir = self.nodes.get(&b).is_some_and(|n| n.attr.is_dir());
            // Pin both before rebinding so neither is dropped in between.
            self.set_entry(p2, n2, Some(a));
            self.set_entry(p1, n1, Some(b));
            relink(self, a, (p1, n1), (p2, n2));
            relink(self, b, (p2, n2), (p1, n1));
            if p1 != p2 && a_dir != b_dir {
                let d = if a_dir { 1 } else { -1 };
                self.dir_nlink(p2, d);
                self.dir_nlink(p1, -d);
            }
            return;
        }
        if let Some(b) = b {
            let b_dir = self.nodes.get(&b).is_some_and(|n| n.attr.is_dir());
            self.unlink_node(p2, n2, b);
            if b_dir {
                self.dir_nlink(p2, -1);
            }
        }
        self.set_entry(p2, n2, Some(a));
        self.set_entry(p1, n1, None);
        relink(self, a, (p1, n1), (p2, n2));
        if a_dir && p1 != p2 {
            self.dir_nlink(p1, -1);
            self.dir_nlink(p2, 1);
        }
        if let Some(b) = b {
            self.maybe_drop(b);
        }
    }

    /// A descriptor of node `id`'s backing object, for its xattrs: opened by its name, or
    /// (detached) the one kept open; None for an object made in the view.
    fn origin_fd(&self, id: u64) -> Res<Option<OwnedFd>> {
        let n = self.node(id)?;
        if n.detached {
            let f = n.origin_file.as_ref().ok_or(libc::ESTALE)?;
            return f.try_clone().map(|f| Some(f.into())).map_err(io_errno);
        }
        let Some(origin) = &n.origin else {
            return Ok(None);
        };
        let fd = self.backing.open_at(origin, rustix::fs::OFlags::PATH, 0);
        fd.map(Some).map_err(io_errno)
    }

    fn load_xattrs(&mut self, id: u64) -> Res<()> {
        if self.node(id)?.xattrs.is_some() {
            return Ok(());
        }
        let mut map = BTreeMap::new();
        if let Some(fd) = self.origin_fd(id)? {
            for (k, v) in crate::backing::read_xattrs(&fd).map_err(io_errno)? {
                map.insert(k, v);
            }
        }
        self.node_mut(id)?.xattrs = Some(map);
        Ok(())
    }

    fn ensure_data(&mut self, id: u64) -> Res<()> {
        let n = self.node_mut(id)?;
        if n.data.is_none() {
            let (limit, allocated) = match n.has_base() {
                true => (n.attr.size, n.attr.blocks),
                false => (0, 0),
            };
            n.data = Some(Data {
                blocks: BlockMap::default(),
                origin_limit: limit,
                origin_blocks: allocated,
                origin_covered: 0,
            });
        }
        Ok(())
    }

    fn do_data(&mut self, id: u64, size: u64, runs: &[Run], data_offset: u64) -> Res<()> {
        let clock = self.clock();
        self.ensure_data(id)?;
        let n = self.node_mut(id)?;
        let d = n.data.as_mut().expect("ensured");
        if size < n.attr.size {
            d.blocks.truncate(size.div_ceil(BLOCK));
            d.origin_limit = d.origin_limit.min(size);
            d.origin_covered = d.blocks.mapped_in(0, d.origin_limit.div_ceil(BLOCK));
        }
        let lim = d.origin_limit.div_ceil(BLOCK);
        let mut off = data_offset;
        for r in runs {
            let loc = if r.alloc {
                Loc::Zeros
            } else if r.hole {
                Loc::Hole
            } else {
                off += r.count * BLOCK;
                Loc::Journal(off - r.count * BLOCK)
            };
            let below = r.block.min(lim)..(r.block + r.count).min(lim);
            d.origin_covered +=
                (below.end - below.start) - d.blocks.mapped_in(below.start, below.end);
            d.blocks.set(r.block, r.count, loc);
        }
        n.attr.size = size;
        // The blocks the map holds (in the journal, or allocated zeros), and the backing
        // file's allocation (in whole blocks up to the bytes still read from it) less the
        // blocks the map covers: exact for a file appended to or rewritten; for a sparse
        // file written into its holes, the covered blocks were none of the backing file's,
        // and the count comes out low by at most its allocation. Never a sparse file
        // counted dense (cp copies only the data SEEK_DATA finds when st_blocks says there
        // are holes, and every zero otherwise).
        let from_origin = d
            .origin_blocks
            .min(d.origin_limit.div_ceil(BLOCK) * (BLOCK / 512));
        n.attr.blocks = d.blocks.allocated_blocks() * (BLOCK / 512)
            + from_origin.saturating_sub(d.origin_covered * (BLOCK / 512));
        let t = clock;
        n.attr.mtime = t;
        n.attr.ctime = t;
        n.changed = true;
        Ok(())
    }

    fn do_attr(
        &mut self,
        id: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        atime: Option<Time>,
        mtime: Option<Time>,
    ) -> Res<()> {
        let clock = self.clock();
        let n = self.node_mut(id)?;
        if let Some(m) = mode {
            n.attr.mode = (n.attr.mode & libc::S_IFMT) | (m & 0o7777);
        }
        if let Some(u) = uid {
            n.attr.uid = u;
        }
        if let Some(g) = gid {
            n.attr.gid = g;
        }
        if (uid.is_some() || gid.is_some()) && mode.is_none() && !n.attr.is_dir() {
            // chown(2) drops set-user-ID, and set-group-ID if group-executable.
            let kind = n.attr.mode & !0o7777;
            n.attr.mode = kind | interpose_fs::reply::without_setid(n.attr.mode & 0o7777);
        }
        if let Some(t) = atime {
            n.attr.atime = t;
        }
        if let Some(t) = mtime {
            n.attr.mtime = t;
        }
        n.attr.ctime = clock;
        n.changed = true;
        if let Some(m) = mode {
            // The access ACL follows the mode, as the kernel's posix_acl_chmod makes it.
            if let Ok(acl) = self.xattr_get(id, ACL_ACCESS) {
                if let Some(acl) = acl_chmod(&acl, m) {
                    self.load_xattrs(id)?;
                    let x = self.node_mut(id)?.xattrs.as_mut().expect("loaded");
                    x.insert(ACL_ACCESS.to_vec(), acl);
                }
            }
        }
        Ok(())
    }

    /// Applies a journalled change (replay): resolves its paths in the view.
    fn apply_recorded(&mut self, change: &Change, data_offset: u64) -> Result<(), String> {
        let e = |errno: i32| std::io::Error::from_raw_os_error(errno).to_string();
        match change {
            // Made to an object with no name known (see `pass_to_object`), in a trail.
            Change::Data { path: None, .. }
            | Change::Attr { path: None, .. }
            | Change::SetXattr { path: None, .. }
            | Change::RemoveXattr { path: None, .. } => {}
            Change::Data {
                path: Some(p),
                size,
                runs,
            } => {
                let id = self.resolve(p.as_path()).map_err(e)?;
                self.do_data(id, *size, runs, data_offset).map_err(e)?;
            }
            Change::Create {
                path,
                kind,
                mode,
                uid,
                gid,
            } => {
                let (parent, name) = self.resolve_parent(path).map_err(e)?;
                if self.child(parent, name).is_ok() {
                    return Err("the name exists already".into());
                }
                self.do_create(parent, name, kind, *mode, *uid, *gid);
            }
            Change::Link { from, to } => {
                let id = self.resolve(from.as_path()).map_err(e)?;
                let (parent, name) = self.resolve_parent(to).map_err(e)?;
                self.do_link(id, parent, name);
            }
            Change::Unlink { path } | Change::Rmdir { path } => {
                let (parent, name) = self.resolve_parent(path).map_err(e)?;
                let id = self.child(parent, name).map_err(e)?;
                self.do_remove(parent, name, id);
            }
            Change::Rename { from, to, flags } => {
                let (p1, n1) = self.resolve_parent(from).map_err(e)?;
                let a = self.child(p1, n1).map_err(e)?;
                let (p2, n2) = self.resolve_parent(to).map_err(e)?;
                let b = self.child(p2, n2).ok();
                if *flags & libc::RENAME_EXCHANGE != 0 && b.is_none() {
                    return Err("exchange with a missing name".into());
                }
                self.do_rename(p1, n1, a, p2, n2, b, *flags);
            }
            Change::Attr {
                path: Some(path),
                mode,
                uid,
                gid,
                atime,
                mtime,
            } => {
                let id = self.resolve(path.as_path()).map_err(e)?;
                self.do_attr(id, *mode, *uid, *gid, *atime, *mtime)
                    .map_err(e)?;
            }
            Change::SetXattr {
                path: Some(path),
                name,
                value,
            } => {
                let id = self.resolve(path.as_path()).map_err(e)?;
                self.load_xattrs(id).map_err(e)?;
                let n = self.node_mut(id).map_err(e)?;
                n.xattrs
                    .as_mut()
                    .expect("loaded")
                    .insert(name.0.clone(), value.clone());
                n.changed = true;
            }
            Change::RemoveXattr {
                path: Some(path),
                name,
            } => {
                let id = self.resolve(path.as_path()).map_err(e)?;
                self.load_xattrs(id).map_err(e)?;
                let n = self.node_mut(id).map_err(e)?;
                n.xattrs.as_mut().expect("loaded").remove(&name.0);
                n.changed = true;
            }
        }
        Ok(())
    }

    // ---- live operations: check, record, apply ----

    fn check_new_name(&mut self, parent: u64, name: &OsStr) -> Res<()> {
        if !self.node(parent)?.attr.is_dir() {
            return Err(libc::ENOTDIR);
        }
        if name.len() > 255 {
            return Err(libc::ENAMETOOLONG);
        }
        match self.child(parent, name) {
            Ok(_) => Err(libc::EEXIST),
            Err(libc::ENOENT) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// create, mkdir, mknod, symlink.
    /// create, mkdir, mknod, symlink. `mode` comes unmasked: `umask` applies unless the
    /// directory has a default ACL, which is inherited instead (as POSIX ACLs say).
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        &mut self,
        parent: u64,
        name: &OsStr,
        kind: NewKind,
        mode: u32,
        umask: u32,
        uid: u32,
        gid: u32,
    ) -> Res<u64> {
        self.check_new_name(parent, name)?;
        // Set-group-ID directories pass their group on, and the bit to subdirectories.
        let (mut mode, mut gid) = (mode, gid);
        let pattr = &self.node(parent)?.attr;
        if pattr.mode & libc::S_ISGID != 0 {
            gid = pattr.gid;
            if matches!(kind, NewKind::Dir) {
                mode |= libc::S_ISGID;
            }
        }
        let mut inherited = None;
        if matches!(kind, NewKind::Symlink { .. }) {
            mode = libc::S_IFLNK | 0o777;
        } else {
            match self.xattr_get(parent, ACL_DEFAULT) {
                Ok(acl) => {
                    let (access, perms, extended) = acl_create_masq(&acl, mode).ok_or(libc::EIO)?;
                    mode = (mode & !0o777) | perms;
                    inherited = Some((acl, extended.then_some(access)));
                }
                Err(_) => mode &= !(umask & 0o777),
            }
        }
        let change = Change::Create {
            path: self.child_path(parent, name)?,
            kind: kind.clone(),
            mode,
            uid,
            gid,
        };
        if let Some((default, access)) = &inherited {
            // Refused where the commit would refuse them: before the create is recorded.
            let dir = matches!(kind, NewKind::Dir);
            let mut acls = Vec::new();
            if let Some(access) = access {
                acls.push((ACL_ACCESS.to_vec(), access.clone()));
            }
            if dir {
                acls.push((ACL_DEFAULT.to_vec(), default.clone()));
            }
            self.xattrs_fit(dir, &acls)?;
            // The create and its ACLs are two or three records: all or none.
            self.reserve(RESERVE_FOR_SEVERAL)?;
        }
        let id = if self.pass(&change, &[])? {
            self.lookup(parent, name)?
        } else {
            self.record(&change, &[])?;
            let id = self.do_create(parent, name, &kind, mode, uid, gid);
            self.node_mut(id)?.lookups += 1;
            id
        };
        if let Some((default, access)) = inherited {
            if let Some(access) = access {
                self.xattr_set_raw(id, ACL_ACCESS, &access, 0)?;
            }
            if matches!(kind, NewKind::Dir) {
                self.xattr_set_raw(id, ACL_DEFAULT, &default, 0)?;
            }
        }
        Ok(id)
    }

    pub fn link(&mut self, id: u64, parent: u64, name: &OsStr) -> Res<()> {
        if self.node(id)?.attr.is_dir() {
            return Err(libc::EPERM);
        }
        self.check_new_name(parent, name)?;
        // As BACKING's file system would refuse it: recorded, it would stop the commit.
        if let Some(max) = self.backing.link_max().filter(|_| self.on_backing_fs(id)) {
            if self.attr(id)?.nlink >= max {
                return Err(libc::EMLINK);
            }
        }
        let change = Change::Link {
            from: self.node_path(id)?,
            to: self.child_path(parent, name)?,
        };
        if self.pass_node(id, &change, &[])? {
            self.lookup(parent, name)?;
            return Ok(());
        }
        self.reread_backing_attrs([id]);
        self.record(&change, &[])?;
        self.do_link(id, parent, name);
        self.node_mut(id)?.lookups += 1;
        Ok(())
    }

    pub fn remove(&mut self, parent: u64, name: &OsStr, dir: bool) -> Res<()> {
        let id = self.child(parent, name)?;
        let is_dir = self.node(id)?.attr.is_dir();
        if dir && !is_dir {
            return Err(libc::ENOTDIR);
        }
        if !dir && is_dir {
            return Err(libc::EISDIR);
        }
        if dir && !self.is_empty_dir(id)? {
            return Err(libc::ENOTEMPTY);
        }
        let path = self.child_path(parent, name)?;
        let change = if dir {
            Change::Rmdir { path }
        } else {
            Change::Unlink { path }
        };
        let named = Named {
            first: Some(id),
            second: None,
        };
        if self.pass_named(&change, &[], named)? {
            return Ok(());
        }
        self.reread_backing_attrs([id]);
        self.record(&change, &[])?;
        self.do_remove(parent, name, id);
        Ok(())
    }

    fn is_ancestor(&self, anc: u64, mut id: u64) -> bool {
        let mut guard = 0;
        while id != ROOT && guard < 4096 {
            if id == anc {
                return true;
            }
            match self.nodes.get(&id).and_then(|n| n.links.first()) {
                Some((p, _)) => id = *p,
                None => return false,
            }
            guard += 1;
        }
        id == anc
    }

    pub fn rename(&mut self, p1: u64, n1: &OsStr, p2: u64, n2: &OsStr, flags: u32) -> Res<()> {
        if flags & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0
            || flags == libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE
        {
            return Err(libc::EINVAL);
        }
        let a = self.child(p1, n1)?;
        let b = match self.child(p2, n2) {
            Ok(b) => Some(b),
            Err(libc::ENOENT) => None,
            Err(e) => return Err(e),
        };
        if !self.node(p2)?.attr.is_dir() {
            return Err(libc::ENOTDIR);
        }
        if n2.len() > 255 {
            return Err(libc::ENAMETOOLONG);
        }
        let a_dir = self.node(a)?.attr.is_dir();
        if b == Some(a) {
            return Ok(()); // same object: POSIX says do nothing
        }
        if flags & libc::RENAME_EXCHANGE != 0 {
            let b = b.ok_or(libc::ENOENT)?;
            let b_dir = self.node(b)?.attr.is_dir();
            if (a_dir && self.is_ancestor(a, p2)) || (b_dir && self.is_ancestor(b, p1)) {
                return Err(libc::EINVAL);
            }
        } else {
            if a_dir && self.is_ancestor(a, p2) {
                return Err(libc::EINVAL);
            }
            if let Some(b) = b {
                if flags & libc::RENAME_NOREPLACE != 0 {
                    return Err(libc::EEXIST);
                }
                let b_dir = self.node(b)?.attr.is_dir();
                match (a_dir, b_dir) {
                    (true, false) => return Err(libc::ENOTDIR),
                    (false, true) => return Err(libc::EISDIR),
                    (true, true) if !self.is_empty_dir(b)? => return Err(libc::ENOTEMPTY),
                    _ => {}
                }
            }
        }
        let change = Change::Rename {
            from: self.child_path(p1, n1)?,
            to: self.child_path(p2, n2)?,
            flags,
        };
        let named = Named {
            first: Some(a),
            second: b,
        };
        if self.pass_named(&change, &[], named)? {
            return Ok(());
        }
        self.reread_backing_attrs(std::iter::once(a).chain(b));
        self.record(&change, &[])?;
        self.do_rename(p1, n1, a, p2, n2, b, flags);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub fn set_attr(
        &mut self,
        id: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        atime: Option<Time>,
        mtime: Option<Time>,
    ) -> Res<()> {
        // As BACKING's file system will hold them (its range, its precision).
        let probe = self.xattr_probe.clone().filter(|_| self.on_backing_fs(id));
        let stored = |t: Option<Time>| match (&probe, t) {
            (Some(probe), Some(t)) => Some(probe.stored_time(t)),
            _ => t,
        };
        let (atime, mtime) = (stored(atime), stored(mtime));
        let change = |path| Change::Attr {
            path,
            mode,
            uid,
            gid,
            atime,
            mtime,
        };
        if self.pass_or_record(id, change)? {
            return Ok(());
        }
        self.do_attr(id, mode, uid, gid, atime, mtime)
    }

    /// Passes straight to BACKING (true) or records a change made to node `id` by its path.
    /// A node without a name (a file removed while open) has its change made in the view
    /// only, unrecorded: nothing of it can reach BACKING, and it lives while it is open.
    fn pass_or_record(
        &mut self,
        id: u64,
        change: impl FnOnce(Option<RawPath>) -> Change,
    ) -> Res<bool> {
        let Some(path) = self.name_of(id) else {
            return self.pass_to_object(id, &change(None), &[]);
        };
        let change = change(Some(RawPath::from_path(&path)));
        if self.pass_node(id, &change, &[])? {
            return Ok(true);
        }
        self.record(&change, &[])?;
        Ok(false)
    }

    pub fn xattr_get(&mut self, id: u64, name: &[u8]) -> Res<Vec<u8>> {
        let n = self.node(id)?;
        if let Some(x) = &n.xattrs {
            return x.get(name).cloned().ok_or(libc::ENODATA);
        }
        let fd = self.origin_fd(id)?.ok_or(libc::ENODATA)?;
        let p = crate::backing::proc_path(&fd);
        let mut v = vec![0u8; 256];
        loop {
            match rustix::fs::getxattr(&p, OsStr::from_bytes(name), &mut v) {
                Ok(n) => {
                    v.truncate(n);
                    return Ok(v);
                }
                Err(rustix::io::Errno::RANGE) => v.resize(v.len() * 16, 0),
                Err(e) => return Err(e.raw_os_error()),
            }
        }
    }

    pub fn xattr_list(&mut self, id: u64) -> Res<Vec<u8>> {
        let n = self.node(id)?;
        let names: Vec<Vec<u8>> = if let Some(x) = &n.xattrs {
            x.keys().cloned().collect()
        } else if let Some(fd) = self.origin_fd(id)? {
            crate::backing::read_xattrs(&fd)
                .map_err(io_errno)?
                .into_iter()
                .map(|(k, _)| k)
                .collect()
        } else {
            Vec::new()
        };
        let mut out = Vec::new();
        for n in names {
            out.extend_from_slice(&n);
            out.push(0);
        }
        Ok(out)
    }

    pub fn xattr_set(&mut self, id: u64, name: &[u8], value: &[u8], flags: i32) -> Res<()> {
        if name == ACL_ACCESS {
            if let Some((perms, equivalent)) = acl_mode(value) {
                // As the backing file system would: the mode shows the ACL (its mask as
                // the group bits), and an ACL the mode says all of is not kept.
                let old = self.node(id)?.attr.mode;
                let mode = (old & 0o7000) | perms;
                if equivalent {
                    if self.xattr_get(id, name).is_ok() {
                        self.xattr_remove(id, name)?;
                    }
                } else {
                    self.xattr_set_raw(id, name, value, flags)?;
                }
                if mode != old & 0o7777 {
                    self.set_attr(id, Some(mode), None, None, None, None)?;
                }
                return Ok(());
            }
        }
        self.xattr_set_raw(id, name, value, flags)
    }

    fn xattr_set_raw(&mut self, id: u64, name: &[u8], value: &[u8], flags: i32) -> Res<()> {
        let clock = self.clock();
        self.load_xattrs(id)?;
        let exists = self
            .node(id)?
            .xattrs
            .as_ref()
            .expect("loaded")
            .contains_key(name);
        if flags & libc::XATTR_CREATE != 0 && exists {
            return Err(libc::EEXIST);
        }
        if flags & libc::XATTR_REPLACE != 0 && !exists {
            return Err(libc::ENODATA);
        }
        if self.node(id)?.attr.kind() == libc::S_IFLNK && name.starts_with(b"user.") {
            return Err(libc::EPERM);
        }
        // The whole set as it would be: file systems limit the total, not each one.
        let mut set: Vec<(Vec<u8>, Vec<u8>)> = self
            .node(id)?
            .xattrs
            .as_ref()
            .map(|x| {
                x.iter()
                    .filter(|(k, _)| k.as_slice() != name)
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        set.push((name.to_vec(), value.to_vec()));
        self.xattrs_fit(self.node(id)?.attr.is_dir(), &set)?;
        let change = |path| Change::SetXattr {
            path,
            name: RawPath(name.to_vec()),
            value: value.to_vec(),
        };
        if self.pass_or_record(id, change)? {
            self.node_mut(id)?.xattrs = None;
            return Ok(());
        }
        let n = self.node_mut(id)?;
        n.xattrs
            .as_mut()
            .expect("loaded")
            .insert(name.to_vec(), value.to_vec());
        n.attr.ctime = clock;
        n.changed = true;
        Ok(())
    }

    /// Whether an object (a directory, or not) could hold the xattrs `set` where a commit
    /// sets them: the error the file system gives if not.
    fn xattrs_fit(&self, dir: bool, set: &[(Vec<u8>, Vec<u8>)]) -> Res<()> {
        let Some(probes) = &self.xattr_probe else {
            return Ok(());
        };
        // Default ACLs only a directory takes; the rest, a file of BACKING's file system.
        let (default, rest): (Vec<_>, Vec<_>) = set.iter().partition(|(k, _)| k == ACL_DEFAULT);
        try_xattrs(&probes.file, &rest)?;
        // A default ACL has an access ACL's form: BACKING's file system must take ACLs.
        for (_, value) in &default {
            try_xattrs(&probes.file, &[&(ACL_ACCESS.to_vec(), value.clone())])?;
        }
        if dir && !default.is_empty() {
            // With the rest, as the total counts; a store whose file system takes no
            // xattrs on directories cannot say (the kernel has checked the ACL's form).
            match try_xattrs(&probes.dir, &set.iter().collect::<Vec<_>>()) {
                Err(libc::EOPNOTSUPP) => {}
                r => r?,
            }
        }
        Ok(())
    }

    /// Whether a caller with uid `uid` (not root), in the groups `in_group` says, may write
    /// node `id`, by its mode bits and access ACL as the kernel checks them.
    pub fn may_write(&mut self, id: u64, uid: u32, in_group: impl Fn(u32) -> bool) -> Res<bool> {
        let a = self.attr(id)?;
        let acl = self.xattr_get(id, ACL_ACCESS).ok();
        if let Some(ok) = acl
            .as_deref()
            .and_then(|v| acl_permits(v, a.uid, a.gid, uid, &in_group, 2))
        {
            return Ok(ok);
        }
        let bits = if uid == a.uid {
            a.mode >> 6
        } else if in_group(a.gid) {
            a.mode >> 3
        } else {
            a.mode
        };
        Ok(bits & 2 != 0)
    }

    /// Removes a file's capabilities (`security.capability`) if it has any, as a write(2)
    /// does on any file system: with FUSE_HANDLE_KILLPRIV_V2 the kernel leaves that to us.
    pub fn drop_capabilities(&mut self, id: u64) -> Res<()> {
        const CAPABILITY: &[u8] = b"security.capability";
        // Loaded once, so that later writes ask the node, not BACKING. A backing file
        // system without extended attributes has no capabilities either.
        if self.load_xattrs(id).is_err() {
            return Ok(());
        }
        let n = self.node(id)?;
        if n.xattrs
            .as_ref()
            .is_some_and(|x| x.contains_key(CAPABILITY))
        {
            self.xattr_remove(id, CAPABILITY)?;
        }
        Ok(())
    }

    pub fn xattr_remove(&mut self, id: u64, name: &[u8]) -> Res<()> {
        let clock = self.clock();
        self.load_xattrs(id)?;
        if !self
            .node(id)?
            .xattrs
            .as_ref()
            .expect("loaded")
            .contains_key(name)
        {
            // Removing an ACL that is not there succeeds, as on ext4 (the kernel also
            // removes an ACL to set an empty one: tar --acls does for every directory).
            return match name {
                b"system.posix_acl_access" | b"system.posix_acl_default" => Ok(()),
                _ => Err(libc::ENODATA),
            };
        }
        let change = |path| Change::RemoveXattr {
            path,
            name: RawPath(name.to_vec()),
        };
        if self.pass_or_record(id, change)? {
            self.node_mut(id)?.xattrs = None;
            return Ok(());
        }
        let n = self.node_mut(id)?;
        n.xattrs.as_mut().expect("loaded").remove(name);
        n.attr.ctime = clock;
        n.changed = true;
        Ok(())
    }

    // ---- data ----

    /// The backing file of a node, open for reading (kept while the node is open).
    pub fn origin_file_pub(&mut self, id: u64) -> Res<Option<Arc<File>>> {
        self.origin_file(id)
    }

    fn origin_file(&mut self, id: u64) -> Res<Option<Arc<File>>> {
        let backing = self.backing.clone();
        let n = self.node_mut(id)?;
        if let Some(f) = &n.origin_file {
            return Ok(Some(f.clone()));
        }
        if n.detached {
            return Err(libc::ESTALE);
        }
        let Some(origin) = &n.origin else {
            return Ok(None);
        };
        let f = Arc::new(backing.open_read(origin).map_err(io_errno)?);
        if n.opens > 0 {
            n.origin_file = Some(f.clone());
        }
        Ok(Some(f))
    }

    /// The attributes data operations size themselves by. Where changes go straight to
    /// BACKING (outside --isolate-path, --write-through) an unchanged file may have been
    /// written there through another name, so they are read afresh; a fully isolated
    /// view holds them.
    fn live_attr(&mut self, id: u64) -> Res<Attr> {
        match self.mode {
            Mode::Isolated => Ok(self.node(id)?.attr.clone()),
            _ => self.attr(id),
        }
    }

    /// Where the bytes `[offset, offset + len)` come from (clipped to the size).
    pub fn plan_read(&mut self, id: u64, offset: u64, len: u64) -> Res<Vec<Seg>> {
        let size = self.live_attr(id)?.size;
        let n = self.node(id)?;
        if offset >= size || len == 0 {
            return Ok(Vec::new());
        }
        let end = size.min(offset + len);
        let Some(d) = &n.data else {
            return Ok(vec![Seg::Origin {
                offset,
                len: end - offset,
            }]);
        };
        let mut segs: Vec<Seg> = Vec::new();
        let mut push = |s: Seg| {
            if let Some(last) = segs.last_mut() {
                match (last, s) {
                    (Seg::Zero { len: a }, Seg::Zero { len: b }) => return *a += b,
                    (Seg::Origin { offset: o, len: a }, Seg::Origin { offset: o2, len: b })
                        if *o + *a == o2 =>
                    {
                        return *a += b
                    }
                    (Seg::Journal { offset: o, len: a }, Seg::Journal { offset: o2, len: b })
                        if *o + *a == o2 =>
                    {
                        return *a += b
                    }
                    _ => {}
                }
            }
            segs.push(s);
        };
        // One step per extent (or unmapped stretch), not per block.
        let mut pos = offset;
        while pos < end {
            let b = pos / BLOCK;
            let in_block = pos % BLOCK;
            match d.blocks.get(b) {
                Some((loc, run)) => {
                    let stop = end.min((b + run) * BLOCK);
                    let len = stop - pos;
                    push(match loc {
                        Loc::Journal(o) => Seg::Journal {
                            offset: o + in_block,
                            len,
                        },
                        Loc::Hole | Loc::Zeros => Seg::Zero { len },
                    });
                    pos = stop;
                }
                None => {
                    let next = d.blocks.next_mapped(b).map_or(u64::MAX, |m| m * BLOCK);
                    let stop = end.min(next);
                    if pos < d.origin_limit {
                        let from_origin = (stop - pos).min(d.origin_limit - pos);
                        push(Seg::Origin {
                            offset: pos,
                            len: from_origin,
                        });
                        pos += from_origin;
                    }
                    if pos < stop {
                        push(Seg::Zero { len: stop - pos });
                    }
                    pos = stop;
                }
            }
        }
        Ok(segs)
    }

    /// Reads `buf.len()` bytes at `offset` (zeros past the end), under the view's lock.
    fn read_into(&mut self, id: u64, offset: u64, buf: &mut [u8]) -> Res<()> {
        buf.fill(0);
        let segs = self.plan_read(id, offset, buf.len() as u64)?;
        let journal = self.journal_reader();
        let origin = if segs.iter().any(|s| matches!(s, Seg::Origin { .. })) {
            self.origin_file(id)?
        } else {
            None
        };
        fill(&segs, buf, &journal, origin.as_deref()).map(|_| ())
    }

    fn data_change(&mut self, id: u64, size: u64, runs: Vec<Run>, data: &[&[u8]]) -> Res<()> {
        if let Some(probe) = &self.xattr_probe {
            if self.on_backing_fs(id) {
                probe.size_fits(size)?;
            }
        }
        let change = Change::Data {
            path: self.name_of(id).map(|p| RawPath::from_path(&p)),
            size,
            runs: runs.clone(),
        };
        if matches!(change, Change::Data { path: None, .. })
            && self.pass_to_object(id, &change, data)?
        {
            return Ok(());
        }
        if self.pass_node(id, &change, data)? {
            return Ok(());
        }
        let off = self.record(&change, data)?;
        self.do_data(id, size, &runs, off)
    }

    pub fn write(&mut self, id: u64, offset: u64, data: &[u8]) -> Res<usize> {
        let a = self.live_attr(id)?;
        if !a.is_file() {
            return Err(libc::EINVAL);
        }
        if data.is_empty() {
            return Ok(0);
        }
        let len = data.len() as u64;
        let end = offset.checked_add(len).ok_or(libc::EFBIG)?;
        let size = a.size.max(end);
        let first = offset / BLOCK;
        let last = (end - 1) / BLOCK;
        let count = last - first + 1;
        let runs = vec![Run {
            block: first,
            count,
            hole: false,
            alloc: false,
        }];
        if offset.is_multiple_of(BLOCK) && len.is_multiple_of(BLOCK) {
            self.data_change(id, size, runs, &[data])?;
            return Ok(data.len());
        }
        let mut buf = vec![0u8; (count * BLOCK) as usize];
        let b = BLOCK as usize;
        if !offset.is_multiple_of(BLOCK) {
            self.read_into(id, first * BLOCK, &mut buf[..b])?;
        }
        if end % BLOCK != 0 && (last != first || offset.is_multiple_of(BLOCK)) {
            let at = ((count - 1) * BLOCK) as usize;
            self.read_into(id, last * BLOCK, &mut buf[at..])?;
        }
        let at = (offset - first * BLOCK) as usize;
        buf[at..at + data.len()].copy_from_slice(data);
        self.data_change(id, size, runs, &[&buf])?;
        Ok(data.len())
    }

    pub fn truncate(&mut self, id: u64, size: u64) -> Res<()> {
        if let Some(f) = self.node(id)?.passthrough_file.clone() {
            return f.set_len(size).map_err(io_errno);
        }
        let a = self.live_attr(id)?;
        if a.is_dir() {
            return Err(libc::EISDIR);
        }
        if !a.is_file() {
            return Err(libc::EINVAL);
        }
        let cur = a.size;
        if size < cur && !size.is_multiple_of(BLOCK) {
            // The block the new end falls in keeps only what is before it.
            let b = size / BLOCK;
            let mut buf = vec![0u8; BLOCK as usize];
            self.read_into(id, b * BLOCK, &mut buf)?;
            buf[(size % BLOCK) as usize..].fill(0);
            let run = Run {
                block: b,
                count: 1,
                hole: false,
                alloc: false,
            };
            return self.data_change(id, size, vec![run], &[&buf]);
        }
        self.data_change(id, size, Vec::new(), &[])
    }

    /// ENOSPC for an allocation of `blocks` blocks the backing file system has no room
    /// for, as it would give itself: recorded, an allocation costs the store nothing and
    /// would fail only at the commit (a `fallocate` of 1 TiB filled the disk there). Free
    /// blocks include root's reserve when the daemon is root, as its commits write as root.
    /// One call is judged alone: allocations pending together can still outgrow BACKING.
    fn room_for(&self, blocks: u64) -> Res<()> {
        if blocks == 0 {
            return Ok(());
        }
        let st = self
            .backing
            .statvfs()
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        let free = if rustix::process::geteuid().is_root() {
            st.f_bfree
        } else {
            st.f_bavail
        };
        if blocks.saturating_mul(BLOCK) > free.saturating_mul(st.f_frsize) {
            return Err(libc::ENOSPC);
        }
        Ok(())
    }

    /// The blocks in `first..=last` of node `id` that read as holes now (mapped as holes,
    /// past the backing file's bytes and unmapped, or unmapped over a hole of the backing
    /// file), as allocation runs.
    fn hole_runs(&mut self, id: u64, cur: u64, first: u64, last: u64) -> Res<Vec<Run>> {
        // (A file whose backing file cannot be read has no holes there to fill.)
        let origin = self.origin_file(id).ok().flatten();
        let origin_holes = |from: u64, to: u64| -> Vec<(u64, u64)> {
            origin
                .as_deref()
                .map_or_else(Vec::new, |f| backing_holes(f, from, to))
        };
        let n = self.node(id)?;
        let limit = n
            .data
            .as_ref()
            .map_or(if n.has_base() { cur } else { 0 }, |d| d.origin_limit);
        let empty = BlockMap::default();
        let blocks = n.data.as_ref().map_or(&empty, |d| &d.blocks);
        // Blocks past the backing file's bytes that nothing maps are holes too.
        let first_unbacked = limit.div_ceil(BLOCK);
        let mut runs: Vec<Run> = Vec::new();
        let mut hole = |block: u64, count: u64| match runs.last_mut() {
            Some(r) if r.block + r.count == block => r.count += count,
            _ => runs.push(Run {
                block,
                count,
                hole: false,
                alloc: true,
            }),
        };
        let mut b = first;
        while b <= last {
            let stop = match blocks.get(b) {
                Some((loc, run)) => {
                    let stop = (b + run).min(last + 1);
                    if loc == Loc::Hole {
                        hole(b, stop - b);
                    }
                    stop
                }
                None => {
                    let stop = blocks.next_mapped(b).unwrap_or(u64::MAX).min(last + 1);
                    for (hb, hc) in origin_holes(b, stop.min(first_unbacked)) {
                        hole(hb, hc);
                    }
                    let from = b.max(first_unbacked);
                    if from < stop {
                        hole(from, stop - from);
                    }
                    stop
                }
            };
            b = stop;
        }
        Ok(runs)
    }

    /// fallocate: mode 0 and KEEP_SIZE (allocation: only the size changes), PUNCH_HOLE and
    /// ZERO_RANGE; others are not supported in an isolated view.
    pub fn fallocate(&mut self, id: u64, offset: u64, len: u64, mode: i32) -> Res<()> {
        if let Some(f) = self.node(id)?.passthrough_file.clone() {
            let mode = rustix::fs::FallocateFlags::from_bits_retain(mode as u32);
            return rustix::fs::fallocate(f.as_ref(), mode, offset, len)
                .map_err(|e| e.raw_os_error());
        }
        let a = self.live_attr(id)?;
        if !a.is_file() {
            return Err(libc::ENODEV);
        }
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let end = offset.checked_add(len).ok_or(libc::EFBIG)?;
        let cur = a.size;
        let new_size = if keep { cur } else { cur.max(end) };
        let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
        let zero = mode & libc::FALLOC_FL_ZERO_RANGE != 0;
        let rest = mode
            & !(libc::FALLOC_FL_KEEP_SIZE
                | libc::FALLOC_FL_PUNCH_HOLE
                | libc::FALLOC_FL_ZERO_RANGE);
        if rest != 0 || (punch && !keep) || (punch && zero) {
            return Err(libc::EOPNOTSUPP);
        }
        if !punch && !zero {
            // Allocation: blocks that are holes now become allocated zeros.
            let runs = if len > 0 {
                self.hole_runs(id, cur, offset / BLOCK, (end - 1) / BLOCK)?
            } else {
                Vec::new()
            };
            self.room_for(runs.iter().map(|r| r.count).sum())?;
            if new_size != cur || !runs.is_empty() {
                self.data_change(id, new_size, runs, &[])?;
            }
            return Ok(());
        }
        // Zero [offset, min(end, size)): whole blocks become holes, partial ones rewritten.
        let zend = end.min(new_size);
        let mut runs = Vec::new();
        let mut data: Vec<Vec<u8>> = Vec::new();
        let mut pos = offset;
        while pos < zend {
            let b = pos / BLOCK;
            let bstart = b * BLOCK;
            let bend = bstart + BLOCK;
            if pos == bstart && zend >= bend {
                let count = (zend - bstart) / BLOCK;
                runs.push(Run {
                    block: b,
                    count,
                    hole: !zero,
                    alloc: zero,
                });
                pos = bstart + count * BLOCK;
            } else {
                let mut buf = vec![0u8; BLOCK as usize];
                self.read_into(id, bstart, &mut buf)?;
                let stop = zend.min(bend);
                buf[(pos - bstart) as usize..(stop - bstart) as usize].fill(0);
                runs.push(Run {
                    block: b,
                    count: 1,
                    hole: false,
                    alloc: false,
                });
                data.push(buf);
                pos = stop;
            }
        }
        if runs.is_empty() && new_size == cur {
            return Ok(());
        }
        if zero {
            // Whole blocks zeroed become allocated: new room for those that are holes now.
            let mut new_blocks = 0;
            for r in runs.iter().filter(|r| r.alloc) {
                let holes = self.hole_runs(id, cur, r.block, r.block + r.count - 1)?;
                new_blocks += holes.iter().map(|h| h.count).sum::<u64>();
            }
            self.room_for(new_blocks)?;
        }
        let slices: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
        self.data_change(id, new_size, runs, &slices)
    }

    /// SEEK_DATA / SEEK_HOLE in the view.
    pub fn seek(&mut self, id: u64, offset: u64, data: bool) -> Res<u64> {
        // As reads size themselves: writes straight to BACKING change what it holds.
        let size = self.live_attr(id)?.size;
        let n = self.node(id)?;
        if offset >= size {
            return Err(libc::ENXIO);
        }
        let origin = match &n.data {
            Some(d) if d.origin_limit == 0 => None,
            _ => self.origin_file(id)?,
        };
        let origin_seek = |pos: u64, data: bool| -> Option<u64> {
            use std::os::fd::AsFd;
            let f = origin.as_ref()?;
            let w = if data {
                rustix::fs::SeekFrom::Data(pos)
            } else {
                rustix::fs::SeekFrom::Hole(pos)
            };
            rustix::fs::seek(f.as_fd(), w).ok()
        };
        let Some(d) = &self.node(id)?.data else {
            // Unchanged file: the backing file answers.
            return match origin_seek(offset, data) {
                Some(p) if p < size || !data => Ok(p.min(size)),
                _ if data => Err(libc::ENXIO),
                _ => Ok(size),
            };
        };
        let limit = d.origin_limit.min(size);
        // The backing file's last block, if partial and holding data, is data up to its
        // end, as the file system that holds it says once the file is grown (ext4: a
        // 5000-byte file grown to 1 MiB has data up to 8192), and as BACKING says after
        // the commit.
        let tail = limit - limit % BLOCK;
        let rounded = limit % BLOCK != 0 && origin_seek(tail, true).is_some_and(|p| p < limit);
        let limit = if rounded {
            (tail + BLOCK).min(size)
        } else {
            limit
        };
        let origin_seek = |pos: u64, data: bool| match origin_seek(pos, data) {
            // The backing file's end is not a hole of the view, up to `limit`.
            Some(p) if rounded && !data && p >= d.origin_limit => Some(limit),
            None if rounded && pos >= tail && pos < limit => Some(if data { pos } else { limit }),
            other => other,
        };
        // Every turn returns or moves past an extent or an unmapped stretch.
        let mut pos = offset;
        while pos < size {
            let b = pos / BLOCK;
            if let Some((loc, run)) = d.blocks.get(b) {
                if (loc != Loc::Hole) == data {
                    return Ok(pos);
                }
                pos = (b + run) * BLOCK;
                continue;
            }
            // Not in the map: the backing file below `limit`, zeros above.
            let next_mapped = d.blocks.next_mapped(b).map(|m| m * BLOCK);
            if pos >= limit {
                if !data {
                    return Ok(pos);
                }
                // Hole up to the next mapped block.
                match next_mapped {
                    Some(m) => pos = m,
                    None => break,
                }
                continue;
            }
            let region_end = next_mapped.unwrap_or(u64::MAX).min(limit);
            let found = origin_seek(pos, data).unwrap_or(if data { u64::MAX } else { pos });
            if found < region_end {
                return Ok(found.max(pos));
            }
            pos = region_end;
            if !data && pos == limit && next_mapped != Some(limit) {
                return Ok(pos.min(size));
            }
        }
        if data {
            Err(libc::ENXIO)
        } else {
            Ok(size)
        }
    }

    // ---- rebuilding after commit or discard ----

    /// Paths, kernel references and opens of nodes the kernel knows, to carry over.
    pub fn known(&mut self) -> Vec<Known> {
        let ids: Vec<u64> = self
            .nodes
            .values()
            .filter(|n| n.id != ROOT && (n.lookups > 0 || n.opens > 0))
            .map(|n| n.id)
            .collect();
        ids.into_iter()
            .map(|id| {
                // A file that lost the names the view knew but is still linked is found
                // by another. One with several: by the name the kernel last used, which
                // filters go on judging it by (the kernel may hold that entry).
                let path = match self.path_looked_up(id) {
                    Some(p) => Some(p),
                    None => self.find_name(id),
                };
                let n = &self.nodes[&id];
                Known {
                    id,
                    path,
                    backing_ino: n.backing_ino,
                    backing_dev: n.backing_dev,
                    backing_birth: n.backing_birth,
                    origin: n.origin.clone().filter(|_| !n.detached),
                    kind: n.attr.kind(),
                    attr: n.attr.clone(),
                    lookups: n.lookups,
                    opens: n.opens,
                    writers: n.writers,
                    passthrough_opens: n.passthrough_opens,
                    passthrough_file: n.passthrough_file.clone(),
                }
            })
            .collect()
    }

    /// (parent, name) of every name bound in an overlay, for invalidating the kernel's
    /// cache after a discard.
    pub fn bound_names(&self) -> Vec<(u64, OsString)> {
        let mut out = Vec::new();
        for n in self.nodes.values() {
            if let Some(ov) = &n.overlay {
                for name in ov.entries.keys() {
                    out.push((n.id, name.clone()));
                }
            }
        }
        out
    }

    /// Gives the nodes the kernel knows the numbers the kernel knows them by, with their
    /// references and opens, when they stand for the same object: an object of BACKING is
    /// the node of the same backing inode, looked for at the kernel's path and at its name
    /// in BACKING; an object made in the view is the node at its path, if that is one made
    /// in the view too or, after a commit (`committed`), the one the commit made of it.
    /// The rest (objects that a discard threw away, or whose name went) are not carried:
    /// their numbers go stale ([`View::stale`]), and a node of this view that has one of
    /// the numbers the kernel holds gets another.
    pub fn adopt(&mut self, mut known: Vec<Known>, next_new: u64, committed: bool) {
        self.next_new = self.next_new.max(next_new);
        let mut remap: HashMap<u64, u64> = HashMap::new();
        let mut claimed: HashSet<u64> = HashSet::new();
        let mut carried = Vec::new();
        let mut lost = Vec::new();
        // Objects of BACKING first: their identity is certain, a path is not. By path
        // within each, so that the entries of a directory are looked up one after another.
        known.sort_by(|a, b| {
            (a.backing_ino.is_none(), &a.path).cmp(&(b.backing_ino.is_none(), &b.path))
        });
        let mut dead_dirs = Vec::new();
        self.adopting = Some(AdoptCache::default());
        for k in known {
            if k.path.is_none() && k.kind == libc::S_IFDIR {
                // A directory the view removed that the kernel still holds (a process's
                // working directory): the kernel has marked its inode dead, so its number
                // must not name the directory a discard brings back.
                tracing::debug!("adopt: directory {} has no name: dead", k.id);
                dead_dirs.push(k);
                continue;
            }
            let places = [
                k.path.clone(),
                k.origin.clone().filter(|_| k.backing_ino.is_some()),
            ];
            let found = places.into_iter().flatten().find_map(|path| {
                let id = self.resolve(&path).ok()?;
                let n = self.nodes.get(&id)?;
                let same = match k.backing_ino {
                    Some(ino) => {
                        (n.backing_dev, n.backing_ino) == (k.backing_dev, Some(ino))
                            && same_birth(n.backing_birth, k.backing_birth)
                    }
                    None => n.backing_ino.is_none() || committed,
                };
                (same && n.attr.kind() == k.kind && !claimed.contains(&id)).then_some(id)
            });
            match found {
                Some(id) => {
                    if id != k.id {
                        remap.insert(id, k.id);
                    }
                    claimed.insert(id);
                    carried.push(k);
                }
                None => {
                    tracing::debug!(
                        "adopt: {} ({:o}) not carried, its number goes stale: path {:?}, origin {:?}, backing inode {:?}",
                        k.id,
                        k.kind,
                        k.path,
                        k.origin,
                        k.backing_ino
                    );
                    lost.push(k);
                }
            }
        }
        self.adopting = None;
        // Every number the kernel holds names what it named, or nothing: a node found here
        // under one (the same inode number, another object) moves aside. The numbers are
        // distinct, so no node carried is in the way of another. (No node has a number
        // already stale: `child_fresh` gives none out.)
        for id in carried.iter().chain(&dead_dirs).chain(&lost).map(|k| k.id) {
            if self.nodes.contains_key(&id) && !claimed.contains(&id) {
                remap.insert(id, self.next_new);
                self.next_new += 1;
            }
        }
        self.renumber(&remap);
        for k in dead_dirs {
            let mut n = Node::new(k.id, None, k.attr);
            n.attr.nlink = 0;
            n.changed = true;
            n.lookups = k.lookups;
            n.opens = k.opens;
            self.nodes.insert(k.id, n);
        }
        for k in lost {
            let s = StaleRef {
                lookups: k.lookups,
                opens: k.opens,
            };
            self.stale.insert(k.id, s);
        }
        for k in carried {
            if let Some(n) = self.nodes.get_mut(&k.id) {
                n.lookups += k.lookups;
                n.opens += k.opens;
                n.writers += k.writers;
                n.passthrough_opens += k.passthrough_opens;
                if let Some(f) = k.passthrough_file {
                    n.origin_file.get_or_insert_with(|| f.clone());
                    n.passthrough_file = Some(f);
                }
            }
        }
    }

    /// Gives nodes other numbers: `remap` maps old numbers to new ones.
    fn renumber(&mut self, remap: &HashMap<u64, u64>) {
        if remap.is_empty() {
            return;
        }
        let nodes = std::mem::take(&mut self.nodes);
        let m = |id: u64| *remap.get(&id).unwrap_or(&id);
        for (id, mut n) in nodes {
            n.id = m(id);
            for l in &mut n.links {
                l.0 = m(l.0);
            }
            if let Some(ov) = &mut n.overlay {
                for v in ov.entries.values_mut().flatten() {
                    *v = m(*v);
                }
            }
            self.nodes.insert(n.id, n);
        }
        for v in self.by_ino.values_mut() {
            *v = m(*v);
        }
    }

    /// Takes out the objects the kernel holds that no name in the view reaches any more (a
    /// file still open after its unlink, or after a rename over it), made independent of
    /// the journal and of BACKING's names. A commit's new view is built from BACKING and
    /// the records left, where nothing leads to such an object, yet a program reading it
    /// must go on seeing what it saw: [`View::install_orphans`] puts them into that view. A
    /// file whose contents the view changed gets them copied into an unnamed file in `dir`
    /// (the store's directory, so the space shows there); an unchanged one keeps the
    /// backing file it holds open. One that cannot be carried (its backing file not open
    /// and gone, no room for the copy) is left behind, and its number goes stale.
    pub fn take_orphans(&mut self, dir: &Path, only_detached: bool) -> Vec<Orphan> {
        // For a discard, only what it cannot touch: objects whose name went straight to
        // BACKING and whose data the view holds none of (a discard has cut the journal
        // already, and data recorded for them may be gone with it).
        let nameless = self.nameless(|n| {
            (n.lookups > 0 || n.opens > 0) && (!only_detached || (n.detached && n.data.is_none()))
        });
        let mut out = Vec::new();
        for id in nameless {
            // Best effort: xattrs of an object of BACKING are read from it while it can be.
            let _ = self.load_xattrs(id);
            let n = &self.nodes[&id];
            // Held only by a lookup, it may still be opened: the kernel resolved its name
            // before the name went (an open racing an unlink, then this commit).
            let open = n.opens > 0;
            // (A file a passthrough open writes keeps that file: its data is there.)
            let copy = if n.attr.is_file()
                && n.passthrough_file.is_none()
                && (n.data.is_some() || n.origin_file.is_none())
            {
                let copied = match unnamed_file(dir).map_err(io_errno) {
                    Ok(f) => self.copy_out(id, f),
                    Err(e) => Err(e),
                };
                // No room in the store (a full store being committed, whose room comes
                // back only after this): an unnamed file on BACKING's file system, which
                // no listing shows and which goes with the last descriptor.
                let copied = match copied {
                    Err(libc::ENOSPC | libc::EDQUOT) => {
                        let backing = self.backing.path().to_path_buf();
                        match unnamed_file_only(&backing).map_err(io_errno) {
                            Ok(f) => self.copy_out(id, f),
                            Err(e) => Err(e),
                        }
                    }
                    other => other,
                };
                match copied {
                    Ok(f) => Some(Arc::new(f)),
                    Err(e) if open => {
                        tracing::warn!(
                            "a file open without a name cannot be kept across the commit or discard ({}); reading it will fail with ESTALE",
                            std::io::Error::from_raw_os_error(e)
                        );
                        continue;
                    }
                    // Only looked up, not open: the kernel had yet to forget a file whose
                    // name went (it does so lazily), the common case; an open racing the
                    // unlink and this commit would get ESTALE.
                    Err(e) => {
                        tracing::debug!(
                            "node {id}: an unopened file without a name is dropped at the commit ({})",
                            std::io::Error::from_raw_os_error(e)
                        );
                        continue;
                    }
                }
            } else {
                None
            };
            let n = self.nodes.get_mut(&id).expect("held above");
            let mut o = Node::new(id, None, n.attr.clone());
            o.detached = true;
            // A file whose name went straight to BACKING and of which the view held nothing
            // stays its object (see `linked_object`): attributes read from it, changes
            // made to it, and found again by a lookup of another name of it, as before
            // (`install_orphans`). Any other is the view's from now on.
            let live = copy.is_none() && n.detached && !n.changed && n.data.is_none();
            o.changed = !live;
            if live {
                (o.backing_dev, o.backing_ino) = (n.backing_dev, n.backing_ino);
                o.backing_birth = n.backing_birth;
            }
            o.xattrs = n.xattrs.take();
            o.gone_as = n.gone_as.take();
            o.target = n.target.take();
            o.origin_file = copy
                .or_else(|| n.origin_file.clone())
                .or_else(|| n.passthrough_file.clone());
            o.passthrough_file = n.passthrough_file.clone();
            o.lookups = std::mem::take(&mut n.lookups);
            o.opens = std::mem::take(&mut n.opens);
            o.writers = n.writers;
            o.passthrough_opens = n.passthrough_opens;
            out.push(Orphan(o));
        }
        out
    }

    /// Before a discard cuts the journal: each file the kernel holds whose name went
    /// straight to BACKING and whose data the view recorded (it has no name there to
    /// write to) gets that data copied into an unnamed file in `dir`, which it reads and
    /// writes over from then on, as [`View::take_orphans`] would have done had the data
    /// still been there to copy. One that cannot be copied (no room) goes stale at the
    /// discard, with a warning.
    pub fn copy_out_detached_data(&mut self, dir: &Path) {
        let ids = self.nameless(|n| {
            (n.lookups > 0 || n.opens > 0) && n.detached && n.data.is_some() && n.attr.is_file()
        });
        for id in ids {
            let copied = unnamed_file(dir)
                .map_err(io_errno)
                .and_then(|f| self.copy_out(id, f));
            match copied {
                Ok(f) => {
                    if let Some(n) = self.nodes.get_mut(&id) {
                        n.data = None;
                        n.origin_file = Some(Arc::new(f));
                    }
                }
                Err(e) => tracing::warn!(
                    "a file open without a name cannot be kept across the discard ({}); reading it will fail with ESTALE",
                    std::io::Error::from_raw_os_error(e)
                ),
            }
        }
    }

    /// Before a commit: each file the kernel holds that has no name in the view holds
    /// its backing file open, since the commit may take that file's last name in BACKING
    /// away before [`View::take_orphans`] copies what it needs.
    pub fn hold_nameless_origins(&mut self) {
        let ids = self.nameless(|n| {
            (n.lookups > 0 || n.opens > 0)
                && n.attr.is_file()
                && n.origin_file.is_none()
                && !n.detached
        });
        for id in ids {
            // A failure shows when it is read.
            if let Ok(Some(f)) = self.origin_file(id) {
                self.nodes.get_mut(&id).expect("listed above").origin_file = Some(f);
            }
        }
    }

    /// The objects other than directories that have no name left in the view and pass
    /// `with`. One the view still counts links of is not among them even when none of
    /// its names is known: carried apart, it would part from the named object. A detached
    /// one is (its name went straight to BACKING, and nothing in the view leads to it),
    /// also when BACKING has another name for it: carried unchanged, it goes on being that
    /// object ([`View::linked_object`]).
    fn nameless(&self, with: impl Fn(&Node) -> bool) -> Vec<u64> {
        self.nodes
            .values()
            .filter(|n| {
                n.id != ROOT && !n.attr.is_dir() && (n.attr.nlink == 0 || n.detached) && with(n)
            })
            .map(|n| n.id)
            .filter(|&id| self.path_of(id).is_none())
            .collect()
    }

    /// The contents of file `id` in an unnamed file in `dir`, holes kept.
    fn copy_out(&mut self, id: u64, f: File) -> Res<File> {
        let size = self.node(id)?.attr.size;
        let mut buf = vec![0u8; 1 << 20];
        let mut pos = 0;
        while pos < size {
            let start = match self.seek(id, pos, true) {
                Ok(s) => s,
                Err(libc::ENXIO) => break,
                Err(e) => return Err(e),
            };
            let end = self.seek(id, start, false)?.min(size);
            let mut at = start;
            while at < end {
                let n = ((end - at) as usize).min(buf.len());
                self.read_into(id, at, &mut buf[..n])?;
                f.write_all_at(&buf[..n], at).map_err(io_errno)?;
                at += n as u64;
            }
            pos = end;
        }
        f.set_len(size).map_err(io_errno)?;
        Ok(f)
    }

    /// Puts the objects [`View::take_orphans`] took from the view before a commit into
    /// the view built after it, under the numbers the kernel knows them by (a node of this
    /// view that has one of those numbers gets another).
    pub fn install_orphans(&mut self, orphans: Vec<Orphan>) {
        let mut remap = HashMap::new();
        for Orphan(o) in &orphans {
            if self.nodes.contains_key(&o.id) {
                remap.insert(o.id, self.next_new);
                self.next_new += 1;
            }
        }
        self.renumber(&remap);
        for Orphan(mut o) in orphans {
            if let Some(ino) = o.backing_ino {
                match self.by_ino.entry((o.backing_dev, ino)) {
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(o.id);
                    }
                    // The new view has a node of that object already (its pending changes
                    // name it): this one goes on with what it has, as the view's own.
                    std::collections::hash_map::Entry::Occupied(_) => {
                        o.backing_ino = None;
                        o.changed = true;
                    }
                }
            }
            self.nodes.insert(o.id, o);
        }
    }

    pub fn next_new(&self) -> u64 {
        self.next_new
    }
}

/// An object the kernel holds without a name in the view, carried across a commit (see
/// [`View::take_orphans`]).
pub struct Orphan(Node);

/// Objects on which the view tries extended attributes before it records them, so that it
/// refuses what the file system a commit sets them on would (a namespace it lacks, a value
/// or a set too large), whichever file system holds the store; and file sizes and times
/// (see [`XattrProbes::size_fits`], [`XattrProbes::stored_time`]).
pub struct XattrProbes {
    /// An unnamed file on BACKING's file system, or (no `O_TMPFILE` there) one in the store.
    file: File,
    /// A directory in the store, for default ACLs, which only directories take: BACKING
    /// gets no directory of the view's.
    dir: File,
    /// `file` is on BACKING's file system, so it may answer for sizes and times there.
    on_backing: bool,
    /// Sizes up to this one fit there (asked before).
    fits_up_to: std::sync::atomic::AtomicU64,
}

impl XattrProbes {
    /// The probes for `backing`, made in `store_dir` where they cannot be made there.
    pub fn new(backing: &Path, store_dir: &Path) -> std::io::Result<XattrProbes> {
        let (file, on_backing) = match unnamed_file_only(backing) {
            Ok(f) => (f, true),
            Err(_) => (unnamed_file(store_dir)?, false),
        };
        let dir_path = store_dir.join("xattr-probe.d");
        match std::fs::create_dir(&dir_path) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        Ok(XattrProbes {
            file,
            dir: File::open(dir_path)?,
            on_backing,
            fits_up_to: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// EFBIG if a file of `size` bytes is past what BACKING's file system takes (ext4
    /// 16 TiB, ext2 with 1 KiB blocks 16 GiB), as it would say at the write or truncation:
    /// recorded, it would stop the commit. Tried on the unnamed probe file, which stays
    /// empty (a size costs no blocks), with the next power of two first, so that growing
    /// files ask rarely. Not asked where the probe file is in the store.
    pub fn size_fits(&self, size: u64) -> Res<()> {
        use std::sync::atomic::Ordering;
        if !self.on_backing || size <= self.fits_up_to.load(Ordering::Relaxed) {
            return Ok(());
        }
        let fits = |len: u64| {
            let res = self.file.set_len(len);
            let _ = self.file.set_len(0);
            // Only the size limit is asked here.
            !matches!(res, Err(e) if e.raw_os_error() == Some(libc::EFBIG))
        };
        let rounded = size
            .checked_next_power_of_two()
            .filter(|&r| r <= i64::MAX as u64);
        let ok = match rounded {
            Some(r) if fits(r) => r,
            _ if fits(size) => size,
            _ => return Err(libc::EFBIG),
        };
        self.fits_up_to.fetch_max(ok, Ordering::Relaxed);
        Ok(())
    }

    /// The time `t` as the file system the commit writes stores it: clamped to its range,
    /// cut to its precision (ext4 with small inodes keeps 1901 to 2038, whole seconds), so
    /// that the mount shows before the commit what BACKING has after it. `t` itself where
    /// the probe fails or is in the store.
    pub fn stored_time(&self, t: Time) -> Time {
        if !self.on_backing {
            return t;
        }
        let ts = rustix::fs::Timespec {
            tv_sec: t.0,
            tv_nsec: t.1 as _,
        };
        let times = rustix::fs::Timestamps {
            last_access: ts,
            last_modification: ts,
        };
        if rustix::fs::futimens(&self.file, &times).is_err() {
            return t;
        }
        match rustix::fs::fstat(&self.file) {
            Ok(st) => (st.st_mtime, st.st_mtime_nsec as u32),
            Err(_) => t,
        }
    }
}

/// Sets the xattrs `set` on `probe` and takes them off again: the first error.
fn try_xattrs(probe: &File, set: &[&(Vec<u8>, Vec<u8>)]) -> Res<()> {
    let mut res = Ok(());
    for (k, v) in set {
        let r = rustix::fs::fsetxattr(
            probe,
            OsStr::from_bytes(k),
            v,
            rustix::fs::XattrFlags::empty(),
        );
        if let Err(e) = r {
            res = Err(e.raw_os_error());
            break;
        }
    }
    for (k, _) in set {
        let _ = rustix::fs::fremovexattr(probe, OsStr::from_bytes(k));
    }
    res
}

/// An `O_TMPFILE` in `dir`, never a name (for BACKING's file system, whose tree must not
/// change).
fn unnamed_file_only(dir: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
}

/// A file in `dir` without a name: gone when closed, also after a crash.
fn unnamed_file(dir: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true).write(true).mode(0o600);
    match opts.clone().custom_flags(libc::O_TMPFILE).open(dir) {
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP) | Some(libc::EISDIR)
            ) =>
        {
            // A file system without O_TMPFILE: a name, removed at once.
            let path = dir.join(format!("orphan-{}.tmp", std::process::id()));
            let f = opts.create(true).truncate(true).open(&path)?;
            std::fs::remove_file(&path)?;
            Ok(f)
        }
        other => other,
    }
}

/// What an operation recorded as several changes reserves in the journal first: far more
/// than a few records without data take (paths up to 4 KiB, ACLs of a few hundred bytes).
pub const RESERVE_FOR_SEVERAL: u64 = 64 << 10;

const ACL_ACCESS: &[u8] = b"system.posix_acl_access";
const ACL_DEFAULT: &[u8] = b"system.posix_acl_default";

/// A new object's access ACL from its directory's default ACL and the mode asked for
/// (the kernel's posix_acl_create_masq): the ACL, the permission bits, and whether the
/// ACL says more than those bits (else it is not kept).
fn acl_create_masq(v: &[u8], mode: u32) -> Option<(Vec<u8>, u32, bool)> {
    if v.len() < 4 || !(v.len() - 4).is_multiple_of(8) {
        return None;
    }
    let mut out = v.to_vec();
    let (mut owner, mut other) = (0, 0);
    let (mut group_at, mut mask_at) = (None, None);
    let mut extended = false;
    for (i, e) in v[4..].chunks_exact(8).enumerate() {
        let at = 4 + i * 8;
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let perm = u16::from_le_bytes([e[2], e[3]]) as u32;
        let set = |out: &mut Vec<u8>, p: u32| {
            out[at + 2..at + 4].copy_from_slice(&(p as u16).to_le_bytes())
        };
        match tag {
            0x01 => {
                owner = perm & (mode >> 6) & 7;
                set(&mut out, owner);
            }
            0x20 => {
                other = perm & mode & 7;
                set(&mut out, other);
            }
            0x04 => group_at = Some((at, perm)),
            0x10 => {
                mask_at = Some((at, perm));
                extended = true;
            }
            0x02 | 0x08 => extended = true,
            _ => return None,
        }
    }
    let (at, perm) = mask_at.or(group_at)?;
    let group = perm & (mode >> 3) & 7;
    out[at + 2..at + 4].copy_from_slice(&(group as u16).to_le_bytes());
    Some((out, (owner << 6) | (group << 3) | other, extended))
}

/// An access ACL after a chmod to `mode`, as the kernel's posix_acl_chmod makes it: the
/// owner, the mask (without one, the owning group) and others take the mode's bits.
fn acl_chmod(v: &[u8], mode: u32) -> Option<Vec<u8>> {
    if v.len() < 4 || !(v.len() - 4).is_multiple_of(8) {
        return None;
    }
    let tag = |e: &[u8]| u16::from_le_bytes([e[0], e[1]]);
    let has_mask = v[4..].chunks_exact(8).any(|e| tag(e) == 0x10);
    let mut out = v.to_vec();
    for (i, e) in v[4..].chunks_exact(8).enumerate() {
        let bits = match tag(e) {
            0x01 => (mode >> 6) & 7,
            0x10 => (mode >> 3) & 7,
            0x04 if !has_mask => (mode >> 3) & 7,
            0x20 => mode & 7,
            _ => continue,
        };
        let at = 4 + i * 8 + 2;
        out[at..at + 2].copy_from_slice(&(bits as u16).to_le_bytes());
    }
    Some(out)
}

/// Whether an access ACL grants `want` (bits of rwx) to a caller with uid `uid` in the
/// groups `in_group` says, on an object of `owner` and `group`, as the kernel's
/// posix_acl_permission decides; None if the ACL does not parse.
fn acl_permits(
    v: &[u8],
    owner: u32,
    group: u32,
    uid: u32,
    in_group: &dyn Fn(u32) -> bool,
    want: u32,
) -> Option<bool> {
    if v.len() < 4 || !(v.len() - 4).is_multiple_of(8) {
        return None;
    }
    let entries: Vec<(u16, u32, u32)> = v[4..]
        .chunks_exact(8)
        .map(|e| {
            let tag = u16::from_le_bytes([e[0], e[1]]);
            let perm = u16::from_le_bytes([e[2], e[3]]) as u32;
            (tag, perm, u32::from_le_bytes([e[4], e[5], e[6], e[7]]))
        })
        .collect();
    // An entry that matches, then the mask after it (if any) limits it.
    let masked = |i: usize| {
        let perm = entries[i].1;
        let mask = entries[i + 1..]
            .iter()
            .find(|e| e.0 == 0x10)
            .map_or(7, |e| e.1);
        perm & mask & want == want
    };
    let mut found = false;
    for (i, &(tag, perm, id)) in entries.iter().enumerate() {
        match tag {
            0x01 if owner == uid => return Some(perm & want == want),
            0x02 if id == uid => return Some(masked(i)),
            0x04 | 0x08 if in_group(if tag == 0x04 { group } else { id }) => {
                found = true;
                if perm & want == want {
                    return Some(masked(i));
                }
            }
            0x20 => return Some(!found && perm & want == want),
            0x01 | 0x02 | 0x04 | 0x08 | 0x10 => {}
            _ => return None,
        }
    }
    None
}

/// The permission bits an access ACL (Linux xattr format, version 2) stands for, and
/// whether the ACL says no more than they do.
fn acl_mode(v: &[u8]) -> Option<(u32, bool)> {
    if v.len() < 4
        || !(v.len() - 4).is_multiple_of(8)
        || u32::from_le_bytes(v[..4].try_into().ok()?) != 2
    {
        return None;
    }
    let (mut owner, mut group, mut other, mut mask) = (None, None, None, None);
    let mut extended = false;
    for e in v[4..].chunks_exact(8) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let perm = u16::from_le_bytes([e[2], e[3]]) as u32 & 7;
        match tag {
            0x01 => owner = Some(perm),
            0x04 => group = Some(perm),
            0x20 => other = Some(perm),
            0x10 => mask = Some(perm),
            0x02 | 0x08 => extended = true,
            _ => return None,
        }
    }
    let g = mask.or(group)?;
    Some((
        (owner? << 6) | (g << 3) | other?,
        !extended && mask.is_none(),
    ))
}

pub fn io_errno(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// Reads the planned segments into `buf`; returns the bytes filled.
pub fn fill(
    segs: &[Seg],
    buf: &mut [u8],
    journal: &journal::Reader,
    origin: Option<&File>,
) -> Res<usize> {
    let mut at = 0usize;
    for s in segs {
        match *s {
            Seg::Zero { len } => {
                buf[at..at + len as usize].fill(0);
                at += len as usize;
            }
            Seg::Journal { offset, len } => {
                journal.wait_written(offset + len).map_err(io_errno)?;
                journal
                    .file
                    .read_exact_at(&mut buf[at..at + len as usize], offset)
                    .map_err(io_errno)?;
                at += len as usize;
            }
            Seg::Origin { offset, len } => {
                let f = origin.ok_or(libc::EIO)?;
                let dst = &mut buf[at..at + len as usize];
                let mut done = 0;
                while done < dst.len() {
                    match f.read_at(&mut dst[done..], offset + done as u64) {
                        Ok(0) => {
                            // The backing file is shorter than it was: zeros, as after a truncate.
                            dst[done..].fill(0);
                            break;
                        }
                        Ok(n) => done += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(io_errno(e)),
                    }
                }
                at += len as usize;
            }
        }
    }
    Ok(at)
}
