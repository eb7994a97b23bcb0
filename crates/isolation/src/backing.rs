//! The backing directory, reached only beneath its root: every path is resolved with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, so neither a symlink nor `..` in the
//! tree can make the daemon or a commit touch anything outside it. Also: applying one
//! recorded change to the backing directory (what commit does, change by change).

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{
    AtFlags, Mode, OFlags, ResolveFlags, Stat, Statx, StatxFlags, Timespec, Timestamps,
};

use crate::change::{Change, NewKind, RawPath, BLOCK};

pub struct Backing {
    root: OwnedFd,
    path: PathBuf,
    dev: u64,
    ino: u64,
    /// Its file system keeps an object's birth time for the object's life (see
    /// [`Backing::birth_of`]).
    stable_births: bool,
    /// The most links a file may have there, where the file system has a limit a view
    /// could pass (see [`Backing::link_max`]).
    link_max: Option<u32>,
}

fn errno(e: rustix::io::Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

/// The longest path [`Backing::open_at`] gives one call, short of PATH_MAX.
const PIECE: usize = 4000;

/// Opens `rel` beneath directory `dir`, never following a symlink nor leaving `dir`.
fn open_beneath(dir: &OwnedFd, rel: &Path, flags: OFlags, mode: u32) -> io::Result<OwnedFd> {
    loop {
        match rustix::fs::openat2(
            dir,
            rel,
            flags | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::from_raw_mode(mode),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        ) {
            Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => continue,
            r => return r.map_err(errno),
        }
    }
}

/// Splits a relative path into its parent and last component.
pub fn split(rel: &Path) -> (&Path, &OsStr) {
    match (rel.parent(), rel.file_name()) {
        (Some(p), Some(n)) => (p, n),
        _ => (Path::new(""), rel.as_os_str()),
    }
}

impl Backing {
    pub fn open(path: &Path) -> io::Result<Backing> {
        let root = rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let st = rustix::fs::fstat(&root)?;
        // (f_type's type differs between architectures.)
        #[allow(clippy::unnecessary_cast)]
        let f_type = rustix::fs::fstatfs(&root).map(|f| f.f_type as i64).ok();
        let stable_births = f_type.is_some_and(|t| STABLE_BIRTHS.contains(&t));
        let link_max = LINK_MAX
            .iter()
            .find(|(t, _)| Some(*t) == f_type)
            .map(|(_, max)| *max);
        Ok(Backing {
            root,
            path: path.to_path_buf(),
            dev: st.st_dev,
            ino: st.st_ino,
            stable_births,
            link_max,
        })
    }

    /// The most links a file may have on BACKING's file system, where that is few enough
    /// for a view to pass (ext4 65,000, Btrfs 65,535): a link the view took beyond it
    /// would stop the commit (EMLINK).
    pub fn link_max(&self) -> Option<u32> {
        self.link_max
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The backing file system's statistics, through the root descriptor: by path they
    /// would ask the mount itself where it is mounted over BACKING (and wait for the
    /// request being served).
    pub fn statvfs(&self) -> io::Result<rustix::fs::StatVfs> {
        rustix::fs::fstatvfs(&self.root).map_err(errno)
    }
    pub fn dev(&self) -> u64 {
        self.dev
    }
    pub fn root_ino(&self) -> u64 {
        self.ino
    }

    /// Opens `rel` (relative, "" for the root) beneath the root, never following a symlink.
    /// A path longer than one call takes (PATH_MAX, 4096 bytes, which a deep tree's paths
    /// pass while each name stays short) is walked a piece at a time under the same rules.
    pub fn open_at(&self, rel: &Path, flags: OFlags, mode: u32) -> io::Result<OwnedFd> {
        let rel: &Path = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        if rel.as_os_str().len() < PIECE {
            return open_beneath(&self.root, rel, flags, mode);
        }
        let mut dir: Option<OwnedFd> = None;
        let mut piece = PathBuf::new();
        let mut names = rel.components().peekable();
        while let Some(name) = names.next() {
            piece.push(name);
            let full = names
                .peek()
                .is_some_and(|n| piece.as_os_str().len() + 1 + n.as_os_str().len() >= PIECE);
            if full {
                let from = dir.as_ref().unwrap_or(&self.root);
                let next = open_beneath(from, &piece, OFlags::PATH | OFlags::DIRECTORY, 0)?;
                dir = Some(next);
                piece.clear();
            }
        }
        open_beneath(dir.as_ref().unwrap_or(&self.root), &piece, flags, mode)
    }

    /// The directory holding `rel`, and `rel`'s last name.
    pub fn parent_of<'a>(&self, rel: &'a Path) -> io::Result<(OwnedFd, &'a OsStr)> {
        let (parent, name) = split(rel);
        Ok((
            self.open_at(parent, OFlags::PATH | OFlags::DIRECTORY, 0)?,
            name,
        ))
    }

    pub fn lstat(&self, rel: &Path) -> io::Result<Stat> {
        let fd = self.open_at(rel, OFlags::PATH, 0)?;
        rustix::fs::fstat(&fd).map_err(errno)
    }

    /// [`Backing::lstat`] with the birth time where the file system keeps one (see
    /// [`Backing::birth_of`]).
    pub fn statx(&self, rel: &Path) -> io::Result<Statx> {
        let fd = self.open_at(rel, OFlags::PATH, 0)?;
        statx_at(&fd, "", AtFlags::EMPTY_PATH)
    }

    /// When the object was made, where BACKING's file system keeps that for the object's
    /// life: an inode number names one object only until it is removed (ext4 gives a
    /// freed number to the next object made), and the birth time tells an object from a
    /// later one with its number. None elsewhere (then the number has to do): overlayfs,
    /// for one, keeps an object's number but gives it a new birth time when it copies it
    /// up to its upper layer.
    pub fn birth_of(&self, st: &Statx) -> Option<crate::change::Time> {
        (self.stable_births && st.stx_mask & StatxFlags::BTIME.bits() != 0)
            .then_some((st.stx_btime.tv_sec, st.stx_btime.tv_nsec))
    }

    /// A regular file's contents for reading.
    pub fn open_read(&self, rel: &Path) -> io::Result<File> {
        self.open_regular(rel, OFlags::RDONLY)
    }

    pub fn open_rw(&self, rel: &Path) -> io::Result<File> {
        self.open_regular(rel, OFlags::RDWR)
    }

    /// Opens `rel`, which the store knows as a regular file, for its contents. Whatever
    /// else stands there now (put there behind the store's back, or named by a journal
    /// that is not the daemon's) is refused before it is opened: a FIFO would block the
    /// open, a device would take the data (or do what opening it does). So the object is
    /// looked at through an O_PATH descriptor first, then reopened through it.
    pub fn open_regular(&self, rel: &Path, flags: OFlags) -> io::Result<File> {
        let fd = self.open_at(rel, OFlags::PATH, 0)?;
        let st = rustix::fs::fstat(&fd).map_err(errno)?;
        let kind = match st.st_mode & libc::S_IFMT {
            libc::S_IFREG => {
                let f = rustix::fs::open(proc_path(&fd), flags | OFlags::CLOEXEC, Mode::empty());
                return f.map(File::from).map_err(errno);
            }
            libc::S_IFDIR => return Err(io::Error::from_raw_os_error(libc::EISDIR)),
            libc::S_IFIFO => "a FIFO",
            libc::S_IFCHR => "a character device",
            libc::S_IFBLK => "a block device",
            libc::S_IFSOCK => "a socket",
            _ => "an object of unknown type",
        };
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{kind} where the store has a regular file"),
        ))
    }

    /// What `accept` makes of the first name of inode `ino` beneath the root (a hard link)
    /// other than `known` that it takes: those in `known`'s directory first, then the rest
    /// of the tree, breadth first, looking at `limit` entries at most.
    pub fn find_name_of<T>(
        &self,
        ino: u64,
        known: &Path,
        limit: usize,
        mut accept: impl FnMut(&Path) -> Option<T>,
    ) -> Option<T> {
        let near = known.parent().unwrap_or(Path::new(""));
        let mut seen = 0usize;
        // (directory, whether to descend): `near` alone first, then the whole tree (which
        // lists `near` again: none of its names was taken).
        let mut queue = std::collections::VecDeque::new();
        if !near.as_os_str().is_empty() {
            queue.push_back((near.to_path_buf(), false));
        }
        queue.push_back((PathBuf::new(), true));
        while let Some((dir, walk)) = queue.pop_front() {
            let Ok(fd) = self.open_at(&dir, OFlags::RDONLY | OFlags::DIRECTORY, 0) else {
                continue;
            };
            let Ok(entries) = rustix::fs::Dir::read_from(&fd) else {
                continue;
            };
            for e in entries.flatten() {
                let name = OsStr::from_bytes(e.file_name().to_bytes());
                if name == "." || name == ".." {
                    continue;
                }
                seen += 1;
                if seen > limit {
                    return None;
                }
                if e.ino() == ino && e.file_type() != rustix::fs::FileType::Directory {
                    let path = dir.join(name);
                    if path != known {
                        if let Some(t) = accept(&path) {
                            return Some(t);
                        }
                    }
                } else if walk && e.file_type() == rustix::fs::FileType::Directory {
                    queue.push_back((dir.join(name), true));
                }
            }
        }
        None
    }
}

/// File systems (statfs f_type) whose birth times stay with an object for its life: ext4,
/// XFS, Btrfs, tmpfs, F2FS, bcachefs.
const STABLE_BIRTHS: [i64; 6] = [
    0xEF53,
    0x5846_5342,
    0x9123_683E,
    0x0102_1994,
    0xF2F5_2010,
    0xCA45_1A4E,
];

/// File systems (statfs f_type) and the most links they let a file have.
const LINK_MAX: [(i64, u32); 2] = [(0xEF53, 65_000), (0x9123_683E, 65_535)];

/// What [`Backing::statx`] asks for: lstat's fields and the birth time.
pub fn statx_at(
    dir: impl std::os::fd::AsFd,
    name: impl AsRef<Path>,
    flags: AtFlags,
) -> io::Result<Statx> {
    rustix::fs::statx(
        dir,
        name.as_ref(),
        flags | AtFlags::SYMLINK_NOFOLLOW,
        StatxFlags::BASIC_STATS | StatxFlags::BTIME,
    )
    .map_err(errno)
}

/// The path `/proc/self/fd/N` of an `O_PATH` descriptor, for the xattr calls that take a
/// path (they refuse `O_PATH` descriptors themselves), and to open the object for I/O. Use the following variants
/// (`getxattr`, not `lgetxattr`): following the magic link reaches the object itself, even
/// a symlink; not following it would act on the link in /proc.
pub fn proc_path(fd: &impl std::os::fd::AsRawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// All of an object's xattrs, as (name, value).
pub fn read_xattrs(fd: &OwnedFd) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let p = proc_path(fd);
    let mut names = vec![0u8; 4096];
    let n = loop {
        match rustix::fs::listxattr(&p, &mut names) {
            Ok(n) => break n,
            Err(rustix::io::Errno::RANGE) => names.resize(names.len() * 4, 0),
            Err(rustix::io::Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(errno(e)),
        }
    };
    let mut out = Vec::new();
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let mut v = vec![0u8; 256];
        let len = loop {
            match rustix::fs::getxattr(&p, OsStr::from_bytes(name), &mut v) {
                Ok(len) => break Some(len),
                Err(rustix::io::Errno::RANGE) => v.resize(v.len() * 16, 0),
                Err(rustix::io::Errno::NODATA) => break None,
                Err(e) => return Err(errno(e)),
            }
        };
        if let Some(len) = len {
            v.truncate(len);
            out.push((name.to_vec(), v));
        }
    }
    Ok(out)
}

fn timespec(t: Option<(i64, u32)>) -> Timespec {
    match t {
        Some((s, n)) => Timespec {
            tv_sec: s,
            tv_nsec: n as _,
        },
        None => Timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
    }
}

/// Sets the modification time of `rel` (and its access time if `access_too`) to `at`.
pub fn set_times(
    backing: &Backing,
    rel: &Path,
    at: crate::change::Time,
    access_too: bool,
) -> io::Result<()> {
    // Through an O_PATH descriptor, so the root ("") and symlinks work like any path.
    let fd = backing.open_at(rel, OFlags::PATH, 0)?;
    let times = Timestamps {
        last_access: timespec(access_too.then_some(at)),
        last_modification: timespec(Some(at)),
    };
    rustix::fs::utimensat(rustix::fs::CWD, proc_path(&fd), &times, AtFlags::empty()).map_err(errno)
}

/// After [`apply`] in a commit: gives what the change touched the modification time the
/// view gave it, the time the change was made rather than the commit's (what the mount
/// showed is what a build tool comparing times must find in BACKING): a written file, a
/// made object (and its access time), the directories whose entries changed.
pub fn stamp(backing: &Backing, change: &Change, at: crate::change::Time) -> io::Result<()> {
    let set = |rel: &Path, access_too: bool| set_times(backing, rel, at, access_too);
    let path = |r: &RawPath| r.to_path_buf();
    let parent = |r: &RawPath| split(&r.to_path_buf()).0.to_path_buf();
    match change {
        Change::Data {
            path: Some(file), ..
        } => set(&path(file), false),
        Change::Create { path: made, .. } => {
            set(&path(made), true)?;
            set(&parent(made), false)
        }
        Change::Link { to, .. } => set(&parent(to), false),
        Change::Unlink { path: gone } | Change::Rmdir { path: gone } => set(&parent(gone), false),
        Change::Rename { from, to, .. } => {
            set(&parent(from), false)?;
            set(&parent(to), false)
        }
        _ => Ok(()),
    }
}

/// The extended attribute holding a file's capabilities.
const CAPABILITY: &str = "security.capability";

/// Applies one change to the backing directory. `may_be_done`: a commit cut short may have
/// applied this change already (see `Store::commit`); then a create that finds an object
/// of its type under its name, and a rename that finds its source gone, take that as
/// their own doing. Otherwise BACKING changed behind the store's back, and they fail
/// (EEXIST, ENOENT) without touching anything: taking someone else's file for ours would
/// hand it the view's owner, mode and data. Every other change can be applied twice
/// without harm. `data`: the change's block data, in one or more pieces (a write's
/// buffers, or the journal reads holding a record), in run order.
pub fn apply(
    backing: &Backing,
    change: &Change,
    data: &[&[u8]],
    may_be_done: bool,
) -> io::Result<()> {
    let p = |r: &RawPath| r.to_path_buf();
    match change {
        Change::Data { path: None, .. } => Ok(()),
        Change::Data {
            path: Some(path),
            size,
            runs,
        } => {
            let f = backing.open_regular(&p(path), OFlags::WRONLY)?;
            write_data(&f, *size, runs, data)
        }
        Change::Create {
            path,
            kind,
            mode,
            uid,
            gid,
        } => {
            let rel = p(path);
            let (dir, name) = backing.parent_of(&rel)?;
            let perm = Mode::from_raw_mode(mode & 0o7777);
            let made = match kind {
                NewKind::File => rustix::fs::openat(
                    &dir,
                    name,
                    OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::WRONLY
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    perm,
                )
                .map(drop),
                NewKind::Dir => rustix::fs::mkdirat(&dir, name, perm),
                NewKind::Symlink { target } => rustix::fs::symlinkat(target.as_path(), &dir, name),
                NewKind::Node { rdev } => rustix::fs::mknodat(
                    &dir,
                    name,
                    rustix::fs::FileType::from_raw_mode(*mode),
                    perm,
                    *rdev as _,
                ),
            };
            match made {
                Ok(()) => {}
                Err(rustix::io::Errno::EXIST) if may_be_done => {
                    // Made before a crash: the change was the object's creation, so an
                    // object of the same type there is ours.
                    let st =
                        rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(errno)?;
                    if st.st_mode & libc::S_IFMT != mode & libc::S_IFMT {
                        return Err(io::Error::from_raw_os_error(libc::EEXIST));
                    }
                }
                Err(e) => return Err(errno(e)),
            }
            rustix::fs::chownat(
                &dir,
                name,
                Some(rustix::fs::Uid::from_raw(*uid)),
                Some(rustix::fs::Gid::from_raw(*gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(errno)?;
            if !matches!(kind, NewKind::Symlink { .. }) {
                // After chown, which clears set-id bits; and exactly, whatever our umask.
                rustix::fs::chmodat(&dir, name, perm, AtFlags::empty()).map_err(errno)?;
            }
            Ok(())
        }
        Change::Link { from, to } => {
            let (from, to) = (p(from), p(to));
            let (fdir, fname) = backing.parent_of(&from)?;
            let (tdir, tname) = backing.parent_of(&to)?;
            match rustix::fs::linkat(&fdir, fname, &tdir, tname, AtFlags::empty()) {
                Ok(()) => Ok(()),
                Err(rustix::io::Errno::EXIST) => {
                    let a = rustix::fs::statat(&fdir, fname, AtFlags::SYMLINK_NOFOLLOW);
                    let b = rustix::fs::statat(&tdir, tname, AtFlags::SYMLINK_NOFOLLOW);
                    match (a, b) {
                        (Ok(a), Ok(b)) if a.st_ino == b.st_ino => Ok(()),
                        _ => Err(io::Error::from_raw_os_error(libc::EEXIST)),
                    }
                }
                Err(e) => Err(errno(e)),
            }
        }
        Change::Unlink { path } | Change::Rmdir { path } => {
            let rel = p(path);
            let (dir, name) = backing.parent_of(&rel)?;
            let flags = if matches!(change, Change::Rmdir { .. }) {
                AtFlags::REMOVEDIR
            } else {
                AtFlags::empty()
            };
            match rustix::fs::unlinkat(&dir, name, flags) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
                Err(e) => Err(errno(e)),
            }
        }
        Change::Rename { from, to, flags } => {
            let (from, to) = (p(from), p(to));
            let (fdir, fname) = backing.parent_of(&from)?;
            let (tdir, tname) = backing.parent_of(&to)?;
            match rustix::fs::renameat_with(
                &fdir,
                fname,
                &tdir,
                tname,
                rustix::fs::RenameFlags::from_bits_retain(*flags),
            ) {
                Ok(()) => Ok(()),
                // The source is gone: this rename happened before a crash.
                Err(rustix::io::Errno::NOENT)
                    if may_be_done
                        && *flags & libc::RENAME_EXCHANGE == 0
                        && rustix::fs::statat(&fdir, fname, AtFlags::SYMLINK_NOFOLLOW).is_err() =>
                {
                    Ok(())
                }
                Err(e) => Err(errno(e)),
            }
        }
        // Made to an object with no name known, in a `--write-through` trail: done then.
        Change::Attr { path: None, .. }
        | Change::SetXattr { path: None, .. }
        | Change::RemoveXattr { path: None, .. } => Ok(()),
        Change::Attr {
            path: Some(path), ..
        }
        | Change::SetXattr {
            path: Some(path), ..
        }
        | Change::RemoveXattr {
            path: Some(path), ..
        } => {
            // Through an O_PATH descriptor, so the root ("") works like any path.
            let fd = backing.open_at(&p(path), OFlags::PATH, 0)?;
            apply_to_fd(&fd, change)
        }
    }
}

/// [`apply`] for a change to an object the view knows no name of any more, made to the
/// object `file` is open on (a file of BACKING that keeps another name there): its data,
/// attributes or xattrs. The path the change names, if any, is not used. Creations and
/// changes of names have no object to be made to, and are refused (EINVAL).
pub fn apply_to_object(file: &File, change: &Change, data: &[&[u8]]) -> io::Result<()> {
    match change {
        Change::Data { size, runs, .. } => {
            // Opened for writing only while the change is made: held, the descriptor
            // would keep the file's other names from being run (ETXTBSY).
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(proc_path(file))?;
            write_data(&f, *size, runs, data)
        }
        _ => apply_to_fd(file, change),
    }
}

/// Makes a change of attributes or xattrs to the object `fd` is open on (`O_PATH` will
/// do); the path the change names is not used. Any other change: EINVAL.
fn apply_to_fd(
    fd: &(impl std::os::fd::AsFd + std::os::fd::AsRawFd),
    change: &Change,
) -> io::Result<()> {
    let proc = proc_path(fd);
    match change {
        Change::Attr {
            mode,
            uid,
            gid,
            atime,
            mtime,
            ..
        } => {
            // Owner first (chown drops set-ID bits), then mode, then times.
            if uid.is_some() || gid.is_some() {
                rustix::fs::chownat(
                    fd,
                    "",
                    uid.map(rustix::fs::Uid::from_raw),
                    gid.map(rustix::fs::Gid::from_raw),
                    AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(errno)?;
            }
            if let Some(mode) = mode {
                let st = rustix::fs::fstat(fd).map_err(errno)?;
                if st.st_mode & libc::S_IFMT != libc::S_IFLNK {
                    rustix::fs::chmod(&proc, Mode::from_raw_mode(mode & 0o7777)).map_err(errno)?;
                }
            }
            if atime.is_some() || mtime.is_some() {
                let times = Timestamps {
                    last_access: timespec(*atime),
                    last_modification: timespec(*mtime),
                };
                rustix::fs::utimensat(rustix::fs::CWD, &proc, &times, AtFlags::empty())
                    .map_err(errno)?;
            }
            Ok(())
        }
        Change::SetXattr { name, value, .. } => rustix::fs::setxattr(
            &proc,
            name.as_path().as_os_str(),
            value,
            rustix::fs::XattrFlags::empty(),
        )
        .map_err(errno),
        Change::RemoveXattr { name, .. } => {
            match rustix::fs::removexattr(&proc, name.as_path().as_os_str()) {
                Ok(()) | Err(rustix::io::Errno::NODATA) => Ok(()),
                Err(e) => Err(errno(e)),
            }
        }
        _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
    }
}

/// Lays a [`Change::Data`] down in the file `f` (open for writing): cut to `size` if it
/// was longer, the runs written, allocated or punched, then the size set.
fn write_data(f: &File, size: u64, runs: &[crate::change::Run], data: &[&[u8]]) -> io::Result<()> {
    // Writing or truncating as root drops the file's capabilities. The view drops
    // them for a write(2) as a change of its own, before the data, and keeps them
    // for a shared mapping's writeback, as the kernel does: so put back what
    // writing this change took away. (The kernel takes at most 24 bytes for them.)
    let mut caps = [0u8; 64];
    let caps = rustix::fs::fgetxattr(f, CAPABILITY, &mut caps[..])
        .ok()
        .map(|n| caps[..n].to_vec());
    let cur = f.metadata()?.len();
    if size < cur {
        f.set_len(size)?;
    }
    let applied = (|| -> io::Result<()> {
        let mut src = 0;
        for run in runs {
            let (off, len) = (run.block * BLOCK, run.count * BLOCK);
            if run.alloc {
                allocate_zeros(f, off, len)?;
            } else if run.hole {
                let punched = rustix::fs::fallocate(
                    f,
                    rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
                    off,
                    len,
                );
                zeros_unless_done(punched, f, off, len)?;
            } else {
                write_parts_at(f, data, src, len, off)?;
                src += len;
            }
        }
        Ok(())
    })();
    if let Err(e) = applied {
        // Blocks allocated past the end (KEEP_SIZE) before the failure (a full
        // disk) would stay taken, unseen; setting the size frees them, as the
        // set_len below does when all goes well. The change runs again whole.
        if let Ok(m) = f.metadata() {
            let _ = f.set_len(m.len());
        }
        return Err(e);
    }
    // (Not when it is the size already: ext4 would free blocks allocated past the
    // end, which the view shows as allocated.)
    if f.metadata()?.len() != size {
        f.set_len(size)?;
    }
    if let Some(caps) = caps {
        let now = rustix::fs::fgetxattr(f, CAPABILITY, &mut [0u8; 64][..]);
        if now == Err(rustix::io::Errno::NODATA) {
            rustix::fs::fsetxattr(f, CAPABILITY, &caps, rustix::fs::XattrFlags::CREATE)
                .map_err(errno)?;
        }
    }
    Ok(())
}

/// [`apply`], and where a change to a file's data is refused (EACCES) because its owner,
/// the daemon not running as root, may not write it now, again with the owner's write
/// bit added for the while, then the mode put back. Programs write files they may not
/// open for writing again through the descriptor that made them (git's 0444 objects),
/// and the change must reach BACKING all the same. `note` is told the mode to put back
/// before it is changed (a commit keeps it in its state, to put it back if it is cut
/// short in between).
pub fn apply_lifting(
    backing: &Backing,
    change: &Change,
    data: &[&[u8]],
    may_be_done: bool,
    note: impl FnOnce(u32) -> io::Result<()>,
) -> io::Result<()> {
    let first = apply(backing, change, data, may_be_done);
    let (
        Err(e),
        Change::Data {
            path: Some(path), ..
        },
    ) = (&first, change)
    else {
        return first;
    };
    if e.raw_os_error() != Some(libc::EACCES) {
        return first;
    }
    let rel = path.to_path_buf();
    let fd = backing.open_at(&rel, OFlags::PATH, 0)?;
    let st = rustix::fs::fstat(&fd).map_err(errno)?;
    let ours = st.st_mode & libc::S_IFMT == libc::S_IFREG
        && st.st_uid == rustix::process::geteuid().as_raw()
        && st.st_mode & 0o200 == 0;
    if !ours {
        return first;
    }
    let mode = st.st_mode & 0o7777;
    note(mode)?;
    set_mode(&fd, mode | 0o200)?;
    let again = apply(backing, change, data, may_be_done);
    let back = set_mode(&fd, mode);
    again.and(back)
}

/// Gives the file a change to its data writes the mode that [`apply_lifting`] noted for
/// it, for a commit run again after one cut short while the mode was lifted.
pub fn put_back_mode(backing: &Backing, change: &Change, mode: u32) -> io::Result<()> {
    match change {
        Change::Data {
            path: Some(path), ..
        } => set_mode(
            &backing.open_at(&path.to_path_buf(), OFlags::PATH, 0)?,
            mode,
        ),
        _ => Ok(()),
    }
}

/// chmod of the object `fd` (an O_PATH descriptor) holds.
fn set_mode(fd: &OwnedFd, mode: u32) -> io::Result<()> {
    rustix::fs::chmod(proc_path(fd), Mode::from_raw_mode(mode)).map_err(errno)
}

/// Writes bytes `src..src + len` of the concatenation of `parts` at `off`, from where
/// they are (a change's data in memory is a write's buffers, or the reads holding a
/// record: not copied together first).
fn write_parts_at(f: &File, parts: &[&[u8]], src: u64, len: u64, off: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let (mut start, mut written) = (0u64, 0u64);
    for part in parts {
        let end = start + part.len() as u64;
        let (lo, hi) = (src.max(start), (src + len).min(end));
        if lo < hi {
            f.write_all_at(
                &part[(lo - start) as usize..(hi - start) as usize],
                off + (lo - src),
            )?;
            written += hi - lo;
        }
        start = end;
    }
    if written != len {
        // Fewer bytes than the runs cover: the change and its data disagree.
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(())
}

/// Makes `len` bytes at `off` allocated zeros: ZERO_RANGE, else (tmpfs, say) a punched
/// hole allocated again, else zeros written.
fn allocate_zeros(f: &File, off: u64, len: u64) -> io::Result<()> {
    use rustix::fs::FallocateFlags as F;
    match rustix::fs::fallocate(f, F::ZERO_RANGE | F::KEEP_SIZE, off, len) {
        Err(rustix::io::Errno::OPNOTSUPP) => {}
        done => return zeros_unless_done(done, f, off, len),
    }
    match rustix::fs::fallocate(f, F::PUNCH_HOLE | F::KEEP_SIZE, off, len) {
        Ok(()) => {
            let allocated = rustix::fs::fallocate(f, F::KEEP_SIZE, off, len);
            zeros_unless_done(allocated, f, off, len)
        }
        Err(rustix::io::Errno::OPNOTSUPP) => write_zeros(f, off, len),
        Err(e) => Err(e.into()),
    }
}

/// After a `fallocate` that zeroes a range: done, or zeros written instead where the file
/// system has no such mode. Any other failure (no room, beyond its largest file) is the
/// change's error: writing zeros would only fill the disk before meeting it.
fn zeros_unless_done(
    fallocated: rustix::io::Result<()>,
    f: &File,
    off: u64,
    len: u64,
) -> io::Result<()> {
    match fallocated {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::OPNOTSUPP) => write_zeros(f, off, len),
        Err(e) => Err(e.into()),
    }
}

fn write_zeros(f: &File, off: u64, len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let zeros = vec![0u8; (len.min(1 << 20)) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..n], off + done)?;
        done += n as u64;
    }
    Ok(())
}
