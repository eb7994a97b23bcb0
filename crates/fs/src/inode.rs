//! The inode table: what the kernel's node ids stand for in the backing directory.
//!
//! Each node remembers its backing object by *file handle* (name_to_handle_at(2)), not by an
//! open descriptor, so a tree with millions of inodes costs a few dozen bytes per node the
//! kernel still references, and never one descriptor each. Descriptors are opened on demand
//! and kept in a bounded LRU cache. On a file system without file handles the node pins an
//! `O_PATH` descriptor instead (the classic passthrough design), with a warning at mount.
//!
//! Node ids are the backing inode numbers where possible, so `stat` shows the same numbers
//! through the mount as on the backing directory and hard links share one node.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Weak};

use fuser::{BackingId, FileType};
use lru::LruCache;
use parking_lot::Mutex;
use rustix::fs::{Mode, OFlags};

use crate::sys::{self, FileHandle};

pub const ROOT_ID: u64 = 1;
/// Node ids with this bit are synthetic: objects on other devices than the root's, or whose
/// inode number collides with the FUSE root id.
const SYNTHETIC: u64 = 1 << 63;
/// Synthetic ids with this bit too are counted out one by one and forgotten with their
/// node; those without it are derived from the object's device and inode number (see
/// [`DeviceNumbers`]), and stay the object's while the daemon runs.
const COUNTED: u64 = 1 << 62;
/// A derived id is the device's slot above this bit, the inode number below it.
const SLOT_SHIFT: u32 = 47;

/// Node ids for objects of file systems mounted inside BACKING, which number their inodes
/// themselves: the top bit, a number for the device (in the order devices are met), and
/// the object's inode number, so an object keeps its id while the daemon runs, also after
/// the kernel forgot it (programs compare inode numbers: hard links, `tar
/// --listed-incremental`, git's index). Bit 62 stays clear, for ids counted out.
#[derive(Clone, Debug, Default)]
pub struct DeviceNumbers {
    slots: HashMap<u64, u64>,
}

impl DeviceNumbers {
    /// The id of object `ino` of device `dev`. `add`: give the device a number if it has
    /// none. None for an inode number too large to fit, or past 32,767 devices: such an
    /// object needs an id of another kind.
    pub fn id(&mut self, dev: u64, ino: u64, add: bool) -> Option<u64> {
        if ino >> SLOT_SHIFT != 0 {
            return None;
        }
        let next = self.slots.len() as u64 + 1;
        let slot = match self.slots.get(&dev) {
            Some(&slot) => slot,
            None if add && next < 1 << (62 - SLOT_SHIFT) => {
                self.slots.insert(dev, next);
                next
            }
            None => return None,
        };
        Some(SYNTHETIC | slot << SLOT_SHIFT | ino)
    }
}

/// Where a node's backing object can be found again.
#[derive(Debug)]
pub enum Anchor {
    Handle(FileHandle),
    Pinned(Arc<OwnedFd>),
}

#[derive(Debug)]
pub struct Node {
    pub dev: u64,
    pub ino: u64,
    pub kind: FileType,
    pub anchor: Anchor,
    /// Last known parent and name (for filter paths; hard links keep the latest one).
    pub parent: u64,
    pub name: Box<OsStr>,
    /// Its other names met (hard links), latest last: what the object is called again
    /// when its latest name goes (a hard link made and removed), or when the kernel has
    /// forgotten a directory on the way to it (see [`Inodes::path`]).
    pub prev: Vec<(u64, Box<OsStr>)>,
    pub nlookup: u64,
    /// Changes when the inode number starts naming another object, so that the kernel
    /// does not mistake the new object for a stale cached one.
    pub generation: u64,
    /// The kernel passthrough registration shared by all passthrough opens of this inode.
    pub backing: Weak<BackingId>,
    pub passthrough_opens: u32,
    pub cached_opens: u32,
}

/// Other names of an object remembered besides its latest (see [`Node::prev`]): every
/// name the kernel can reach it by, short of an object with more hard links than this
/// that the kernel looked up by each.
const MAX_OTHER_NAMES: usize = 256;

/// Steps [`Inodes::path`] takes through other names before it gives up on a path.
const PATH_STEPS: u32 = 16_384;

/// Names in a path [`Inodes::path`] goes up to (a cycle of names, after changes made
/// outside the mount, ends there).
const MAX_DEPTH: usize = 4096;

impl Node {
    /// Drops `parent`/`name` from the object's other names.
    fn forget_name(&mut self, parent: u64, name: &OsStr) {
        self.prev.retain(|(p, n)| !(*p == parent && **n == *name));
    }

    /// Makes `parent`/`name` the latest name, keeping the one before among the others.
    fn take_name(&mut self, parent: u64, name: &OsStr) {
        let old = std::mem::replace(&mut self.name, name.into());
        self.prev
            .push((std::mem::replace(&mut self.parent, parent), old));
        if self.prev.len() > MAX_OTHER_NAMES {
            self.prev.remove(0);
        }
    }
}

#[derive(Default)]
struct Table {
    nodes: HashMap<u64, Node>,
    synthetic_ids: HashMap<(u64, u64), u64>,
    next_synthetic: u64,
    /// Ids of objects of devices other than the root's.
    devices: DeviceNumbers,
}

impl Table {
    /// A new synthetic id for the object (`dev`, `ino`), remembered for its next lookups
    /// while the kernel holds it.
    fn new_synthetic(&mut self, dev: u64, ino: u64) -> u64 {
        let id = SYNTHETIC | COUNTED | self.next_synthetic;
        self.next_synthetic += 1;
        self.synthetic_ids.insert((dev, ino), id);
        id
    }
}

/// Identity of a freshly looked-up backing object.
pub struct Found {
    pub dev: u64,
    pub ino: u64,
    pub kind: FileType,
}

pub struct Inodes {
    root: Arc<OwnedFd>,
    /// The root opened for reading: the mount reference for open_by_handle_at.
    handle_root: Arc<OwnedFd>,
    root_dev: u64,
    root_ino: u64,
    root_mount_id: i32,
    table: Mutex<Table>,
    fds: Mutex<LruCache<u64, Arc<OwnedFd>>>,
    /// A descriptor on each submount seen, for open_by_handle_at, with the number of
    /// nodes that need it: closed when the kernel has forgotten them all, so that the
    /// daemon does not keep the submount busy.
    mounts: Mutex<HashMap<i32, (Arc<OwnedFd>, usize)>>,
    pub handles_supported: bool,
}

impl Inodes {
    /// `root` is an `O_PATH` descriptor of the backing directory. The descriptor cache holds
    /// at most `fd_cache` entries and never more than a quarter of RLIMIT_NOFILE, so that
    /// the daemon's own opens (files, directories) always have room.
    pub fn new(
        root: OwnedFd,
        root_dev: u64,
        root_ino: u64,
        fd_cache: usize,
    ) -> std::io::Result<Self> {
        // open_by_handle_at refuses O_PATH descriptors as its mount reference.
        let handle_root = rustix::fs::openat(
            &root,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let soft_limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(1 << 20);
        let fd_cache = fd_cache.min((soft_limit / 4) as usize).max(16);
        let (mount_id, handles_supported) = match sys::name_to_handle(root.as_fd()) {
            Ok(h) => (h.mount_id, true),
            Err(err) => {
                tracing::warn!(
                    "backing file system has no file handles ({err}); every inode the kernel remembers will pin a descriptor"
                );
                (-1, false)
            }
        };
        Ok(Inodes {
            root: Arc::new(root),
            handle_root: Arc::new(handle_root),
            root_dev,
            root_ino,
            root_mount_id: mount_id,
            table: Mutex::new(Table {
                next_synthetic: 1,
                ..Default::default()
            }),
            fds: Mutex::new(LruCache::new(
                std::num::NonZeroUsize::new(fd_cache.max(16)).unwrap(),
            )),
            mounts: Mutex::new(HashMap::new()),
            handles_supported,
        })
    }

    /// Closes half of the cached descriptors (after EMFILE), so the caller can retry.
    pub fn relieve(&self) {
        let mut fds = self.fds.lock();
        let n = fds.len() / 2;
        for _ in 0..n {
            fds.pop_lru();
        }
        // One warning per 10 s: a program holding every descriptor makes each request
        // land here (hundreds of lines a second otherwise).
        static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = LAST.load(std::sync::atomic::Ordering::Relaxed);
        if now >= last + 10
            && LAST
                .compare_exchange(
                    last,
                    now,
                    std::sync::atomic::Ordering::Relaxed,
                    std::sync::atomic::Ordering::Relaxed,
                )
                .is_ok()
        {
            tracing::warn!(
                "out of file descriptors: closed {n} cached inode descriptors (further such \
                 events in the next 10 s are logged at debug level)"
            );
        } else {
            tracing::debug!("out of file descriptors: closed {n} cached inode descriptors");
        }
    }

    /// An `O_PATH` descriptor for the node, from the cache or by reopening its handle.
    pub fn fd(&self, id: u64) -> Result<Arc<OwnedFd>, i32> {
        if id == ROOT_ID {
            return Ok(self.root.clone());
        }
        if let Some(fd) = self.fds.lock().get(&id) {
            return Ok(fd.clone());
        }
        let handle = {
            let table = self.table.lock();
            match &table.nodes.get(&id).ok_or(libc::ESTALE)?.anchor {
                Anchor::Pinned(fd) => return Ok(fd.clone()),
                Anchor::Handle(h) => h.clone(),
            }
        };
        let mount_fd = if handle.mount_id == self.root_mount_id {
            self.handle_root.clone()
        } else {
            self.mounts
                .lock()
                .get(&handle.mount_id)
                .map(|(fd, _)| fd.clone())
                .ok_or(libc::ESTALE)?
        };
        let open = || sys::open_by_handle(mount_fd.as_fd(), &handle, libc::O_PATH);
        let fd = match open() {
            Err(e) if e.raw_os_error() == Some(libc::EMFILE) => {
                self.relieve();
                open()
            }
            res => res,
        }
        .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        let fd = Arc::new(fd);
        self.fds.lock().put(id, fd.clone());
        Ok(fd)
    }

    fn node_id(&self, table: &mut Table, dev: u64, ino: u64) -> u64 {
        self.known_id(table, dev, ino, true)
            .unwrap_or_else(|| table.new_synthetic(dev, ino))
    }

    /// The id of the object `dev`/`ino` short of counting one out: the root's, one counted
    /// out for it before, its own inode number on BACKING's file system, or one made from
    /// its device's number (`add`: giving the device one if it has none). None: it needs
    /// a counted id.
    fn known_id(&self, table: &mut Table, dev: u64, ino: u64, add: bool) -> Option<u64> {
        if dev == self.root_dev && ino == self.root_ino {
            return Some(ROOT_ID);
        }
        // First: an object of the backing file system gets a synthetic id too when its
        // inode number was reused while the kernel held the old object (see `remember`).
        if let Some(id) = table.synthetic_ids.get(&(dev, ino)) {
            return Some(*id);
        }
        if dev == self.root_dev {
            return (ino != ROOT_ID && ino & SYNTHETIC == 0).then_some(ino);
        }
        table.devices.id(dev, ino, add)
    }

    /// Records one more kernel reference to the object `fd` (just opened `O_PATH` as
    /// `name` in `parent`) and returns its node id and generation.
    pub fn remember(&self, parent: u64, name: &OsStr, fd: OwnedFd, found: Found) -> (u64, u64) {
        let handle = if self.handles_supported {
            sys::name_to_handle(fd.as_fd()).ok()
        } else {
            None
        };
        // Objects on a submount need a readable descriptor on that mount to be reopened by
        // handle; the first object seen there is normally its root directory. Anything
        // else on a mount we hold no such descriptor for pins its own descriptor instead.
        let handle = handle.filter(|h| {
            if h.mount_id == self.root_mount_id || self.mounts.lock().contains_key(&h.mount_id) {
                return true;
            }
            if found.kind != FileType::Directory {
                return false;
            }
            match rustix::fs::openat(
                &fd,
                ".",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(dir) => {
                    self.mounts.lock().insert(h.mount_id, (Arc::new(dir), 0));
                    true
                }
                Err(_) => false,
            }
        });
        let fd = Arc::new(fd);
        let mut table = self.table.lock();
        let id = self.node_id(&mut table, found.dev, found.ino);
        if id == ROOT_ID {
            return (ROOT_ID, 0);
        }
        let anchor = match handle {
            Some(h) => Anchor::Handle(h),
            None => Anchor::Pinned(fd.clone()),
        };
        // The inode number was reused by a new object while the kernel still holds the old
        // one under this id. The new object gets an id of its own: the same id with a new
        // generation would make the kernel mark its old inode bad, and a program racing
        // through it (lstat of a name being replaced) would get EIO, where the backing file
        // system gives ENOENT or the new object.
        let reused = table.nodes.get(&id).is_some_and(|node| {
            let same = match (&node.anchor, &anchor) {
                (Anchor::Handle(a), Anchor::Handle(b)) => a == b,
                _ => true,
            };
            !same || node.kind != found.kind
        });
        let id = if reused {
            table.new_synthetic(found.dev, found.ino)
        } else {
            id
        };
        match table.nodes.get_mut(&id) {
            Some(node) => {
                node.nlookup += 1;
                if node.parent != parent || *node.name != *name {
                    node.forget_name(parent, name);
                    node.take_name(parent, name);
                }
                let generation = node.generation;
                drop(table);
                self.fds.lock().put(id, fd);
                return (id, generation);
            }
            None => {
                let mut anchor = anchor;
                if let Anchor::Handle(h) = &anchor {
                    if h.mount_id != self.root_mount_id {
                        match self.mounts.lock().get_mut(&h.mount_id) {
                            Some((_, nodes)) => *nodes += 1,
                            // Its descriptor went with the submount's last other node
                            // since the check above: this node pins its own.
                            None => anchor = Anchor::Pinned(fd.clone()),
                        }
                    }
                }
                table.nodes.insert(
                    id,
                    Node {
                        dev: found.dev,
                        ino: found.ino,
                        kind: found.kind,
                        anchor,
                        parent,
                        name: name.into(),
                        prev: Vec::new(),
                        nlookup: 1,
                        generation: 0,
                        backing: Weak::new(),
                        passthrough_opens: 0,
                        cached_opens: 0,
                    },
                );
            }
        }
        drop(table);
        self.fds.lock().put(id, fd);
        (id, 0)
    }

    /// Drops `n` kernel references; a node with none left is forgotten entirely.
    pub fn forget(&self, id: u64, n: u64) {
        if id == ROOT_ID {
            return;
        }
        let mut table = self.table.lock();
        // A node stays while the kernel holds a lookup of it: forgetting more than was
        // counted means a reply gave the kernel a node without counting it.
        let Some(node) = table.nodes.get_mut(&id) else {
            tracing::warn!("the kernel forgot {n} lookups of node {id}, which is gone: lookups were miscounted");
            return;
        };
        if node.nlookup < n {
            tracing::warn!(
                "the kernel forgot {n} lookups of node {id}, of which {} were counted: lookups were miscounted",
                node.nlookup
            );
        }
        node.nlookup = node.nlookup.saturating_sub(n);
        if node.nlookup == 0 && node.passthrough_opens == 0 && node.cached_opens == 0 {
            let node = table.nodes.remove(&id).expect("present");
            if table.synthetic_ids.get(&(node.dev, node.ino)) == Some(&id) {
                table.synthetic_ids.remove(&(node.dev, node.ino));
            }
            if let Anchor::Handle(h) = &node.anchor {
                let mut mounts = self.mounts.lock();
                if let Some((_, nodes)) = mounts.get_mut(&h.mount_id) {
                    *nodes = nodes.saturating_sub(1);
                    if *nodes == 0 {
                        mounts.remove(&h.mount_id);
                    }
                }
            }
            drop(table);
            self.fds.lock().pop(&id);
        }
    }

    /// Runs `f` on the node under the table lock.
    pub fn with_node<T>(&self, id: u64, f: impl FnOnce(&mut Node) -> T) -> Option<T> {
        self.table.lock().nodes.get_mut(&id).map(f)
    }

    /// The object `dev`/`ino` moved from `from` to `to` (parent, name): `to` is its latest
    /// name, and `from` none of its names.
    pub fn renamed(&self, dev: u64, ino: u64, from: (u64, &OsStr), to: (u64, &OsStr)) {
        self.with_object(dev, ino, |node| {
            node.forget_name(from.0, from.1);
            if node.parent == from.0 && *node.name == *from.1 {
                node.parent = to.0;
                node.name = to.1.into();
            } else {
                node.take_name(to.0, to.1);
            }
        });
    }

    /// Runs `f` on the node of the object `dev`/`ino`, if the kernel knows it.
    fn with_object(&self, dev: u64, ino: u64, f: impl FnOnce(&mut Node)) {
        let table = &mut *self.table.lock();
        let Some(id) = self.known_id(table, dev, ino, false) else {
            return;
        };
        if let Some(node) = table.nodes.get_mut(&id) {
            f(node);
        }
    }

    /// The name `parent`/`name` of the object `dev`/`ino` is gone (unlinked): if it was
    /// the one remembered, the object is called by its name before again.
    pub fn unlinked(&self, dev: u64, ino: u64, parent: u64, name: &OsStr) {
        self.with_object(dev, ino, |node| {
            if node.parent == parent && *node.name == *name {
                if let Some((p, n)) = node.prev.pop() {
                    node.parent = p;
                    node.name = n;
                }
            } else {
                node.forget_name(parent, name);
            }
        });
    }

    /// The inode number to list for the entry `name`, numbered `raw` by the backing file
    /// system, of the directory `dir`: the number a lookup of it gives (programs compare
    /// the two: `find`, `ls -i`, getcwd's fallback), without making a node. `.` is the
    /// directory, `..` its parent as the mount shows it (the root's: the root).
    pub fn listed_ino(&self, dir: u64, name: &[u8], raw: u64) -> u64 {
        let table = &mut *self.table.lock();
        let node = table.nodes.get(&dir);
        match name {
            b"." => return dir,
            b".." if dir == ROOT_ID => return ROOT_ID,
            b".." if node.is_some_and(|n| n.kind == FileType::Directory) => {
                return node.map_or(ROOT_ID, |n| n.parent);
            }
            _ => {}
        }
        let dev = match node {
            _ if dir == ROOT_ID => self.root_dev,
            Some(n) => n.dev,
            None => return raw,
        };
        self.known_id(table, dev, raw, true).unwrap_or(raw)
    }

    /// The node's path relative to the mount root, starting with `/`. By its latest name;
    /// where the kernel has forgotten a directory on that way (it keeps a directory while
    /// it holds a name in it, but the latest name of a hard link may not be the one it
    /// holds), by the latest other name whose directories it still holds.
    pub fn path(&self, id: u64) -> PathBuf {
        let table = self.table.lock();
        let mut names: Vec<&OsStr> = Vec::new();
        let mut steps = PATH_STEPS;
        let mut path = PathBuf::from("/");
        if !names_up_to_root(&table.nodes, id, &mut names, &mut steps) {
            // None known all the way (changes made outside the mount): say so rather than
            // invent a path.
            names.clear();
            let mut cur = id;
            while let Some(node) = table.nodes.get(&cur).filter(|_| names.len() < MAX_DEPTH) {
                names.push(&node.name);
                cur = node.parent;
                if cur == ROOT_ID {
                    break;
                }
            }
            path.push("?");
        }
        for name in names.iter().rev() {
            path.push(name);
        }
        path
    }

    pub fn child_path(&self, parent: u64, name: &OsStr) -> PathBuf {
        let mut path = self.path(parent);
        path.push(name);
        path
    }
}

/// Pushes the names from node `id` up to the root onto `out` (the node's first), by the
/// first of its names, latest first, whose directories are all known, and so on up; false
/// if there is none within `steps`.
fn names_up_to_root<'a>(
    nodes: &'a HashMap<u64, Node>,
    id: u64,
    out: &mut Vec<&'a OsStr>,
    steps: &mut u32,
) -> bool {
    if id == ROOT_ID {
        return true;
    }
    let Some(node) = nodes.get(&id).filter(|_| out.len() < MAX_DEPTH) else {
        return false;
    };
    let names = std::iter::once((node.parent, &*node.name))
        .chain(node.prev.iter().rev().map(|(p, n)| (*p, &**n)));
    for (parent, name) in names {
        if *steps == 0 {
            return false;
        }
        *steps -= 1;
        let len = out.len();
        out.push(name);
        if names_up_to_root(nodes, parent, out, steps) {
            return true;
        }
        out.truncate(len);
    }
    false
}

/// Converts a `d_type`/`st_mode` file type to fuser's.
pub fn kind_from_mode(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

pub fn kind_from_dtype(d_type: u8) -> FileType {
    match d_type {
        libc::DT_DIR => FileType::Directory,
        libc::DT_LNK => FileType::Symlink,
        libc::DT_FIFO => FileType::NamedPipe,
        libc::DT_SOCK => FileType::Socket,
        libc::DT_CHR => FileType::CharDevice,
        libc::DT_BLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}
