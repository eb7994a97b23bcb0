//! The FUSE front end: turns kernel requests into operations on the backing directory,
//! with the filter chain around each one.
//!
//! Every backing operation is relative to a directory descriptor with a single name
//! component and without following symlinks, so nothing in the tree (a symlink, a `..`,
//! a rename race) can make the daemon touch a path outside the backing directory.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::io::IoSlice;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackingId, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;
use rustix::fs::{AtFlags, Mode, OFlags, Stat, Timespec, Timestamps};
use rustix::io::ReadWriteFlags;

use crate::filter::{caller_of, Caller, Chain, Op, Request, Verdict};
use crate::inode::{kind_from_dtype, kind_from_mode, Found, Inodes};
use crate::pool::BlockingPool;
use crate::reply::{check_name, reply_empty, reply_xattr, without_setid_for};
use crate::sys;

/// Tunables of a mount.
#[derive(Clone, Debug)]
pub struct Options {
    /// How long the kernel may cache attributes and names.
    pub attr_timeout: Duration,
    pub entry_timeout: Duration,
    /// How long the kernel may remember that a name does not exist.
    pub negative_timeout: Duration,
    /// Use the kernel's FUSE passthrough for files no filter needs to see the data of.
    pub passthrough: bool,
    /// Threads reading requests from the kernel (see [`crate::pool`] for why 4).
    pub threads: usize,
    /// Threads for operations that wait on the disk (fsync).
    pub blocking_threads: usize,
    /// Most `O_PATH` descriptors kept open for inodes (see [`crate::inode`]).
    pub fd_cache: usize,
    /// Let users other than the mounting one use the mount (permission checks still apply).
    pub allow_other: bool,
    /// Serve over io_uring where the kernel offers it (see [`crate::Serving`]).
    pub io_uring: bool,
}

impl Options {
    /// How the mount talks to the kernel.
    pub fn serving(&self) -> crate::Serving {
        crate::Serving {
            threads: self.threads.max(1),
            allow_other: self.allow_other,
            io_uring: self.io_uring,
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            attr_timeout: Duration::from_secs(1),
            entry_timeout: Duration::from_secs(1),
            negative_timeout: Duration::from_secs(1),
            passthrough: true,
            threads: 4,
            blocking_threads: 4,
            fd_cache: 1024,
            allow_other: true,
            io_uring: false,
        }
    }
}

type Res<T> = Result<T, i32>;

fn errno_of(err: rustix::io::Errno) -> i32 {
    err.raw_os_error()
}

fn io_errno(err: std::io::Error) -> i32 {
    err.raw_os_error().unwrap_or(libc::EIO)
}

/// What a setattr changes (each `None` is left alone).
struct AttrChange {
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    size: Option<u64>,
    atime: Option<TimeOrNow>,
    mtime: Option<TimeOrNow>,
}

/// A looked-up object: node id, generation, attributes.
struct Entry {
    id: u64,
    generation: u64,
    st: Stat,
}

/// An open regular file.
struct OpenFile {
    node: u64,
    fd: OwnedFd,
    /// Set for passthrough opens; keeps the kernel's registration alive.
    backing: Option<Arc<BackingId>>,
    /// Served around the kernel's page cache ([`served_directly`]).
    direct: bool,
    /// Who opened it: the filters' caller for the writes the kernel makes from its page
    /// cache (a shared mapping written back), which carry no identity (uid 0, pid 0).
    opener: Caller,
}

/// An open directory and where its stream stands.
struct OpenDir {
    fd: OwnedFd,
    /// The directory's node: its entries' paths for the filters are taken from where it is
    /// at each read (it may have been renamed since it was opened).
    node: u64,
    state: Mutex<DirStream>,
}

struct DirStream {
    /// Offset of the next entry to deliver (what the kernel passes back to continue).
    pos: i64,
    pending: VecDeque<sys::DirEntry>,
    eof: bool,
}

/// The file system; hand it to [`crate::mount`].
pub struct FilterFs {
    inodes: Inodes,
    chain: Arc<Chain>,
    blocking: BlockingPool,
    /// Blocking calls running on request threads now (see [`Self::offload`]): over
    /// /dev/fuse, and over io_uring per queue (by CPU).
    blocking_inline: AtomicUsize,
    blocking_inline_per_queue: Box<[AtomicUsize]>,
    opts: Options,
    files: Mutex<HashMap<u64, Arc<OpenFile>>>,
    dirs: Mutex<HashMap<u64, Arc<OpenDir>>>,
    next_fh: AtomicU64,
    /// Serialises the passthrough decisions of opens and releases.
    open_decisions: Mutex<()>,
    passthrough: AtomicBool,
    dont_mask: AtomicBool,
    /// Some filter's answers depend on the caller somewhere ([`Chain::may_vary_by_caller`]):
    /// names and attributes it covers are not cached by the kernel.
    varies_by_caller: bool,
    /// For telling the kernel of changes it did not ask for; set once mounted.
    notifier: Arc<std::sync::OnceLock<fuser::Notifier>>,
}

thread_local! {
    static THREAD_FS_PRIVATE: Cell<bool> = const { Cell::new(false) };
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The filters' view of a request.
fn request(
    req: &fuser::Request,
    op: Op,
    paths: impl FnOnce() -> (PathBuf, Option<PathBuf>),
    detail: impl FnOnce(&mut Request),
) -> Request {
    let mut r = Request::of(req, op, paths());
    detail(&mut r);
    r
}

fn time_of(secs: i64, nsec: i64) -> SystemTime {
    crate::reply::system_time(secs, nsec as u32)
}

fn timespec(t: Option<TimeOrNow>) -> Timespec {
    match t {
        None => Timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(TimeOrNow::Now) => Timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(TimeOrNow::SpecificTime(t)) => {
            let (tv_sec, nsec) = crate::reply::kernel_time(t);
            Timespec {
                tv_sec,
                tv_nsec: nsec as i64,
            }
        }
    }
}

/// What a write by someone without CAP_FSETID does to a file's mode: the daemon writes as
/// root, so when the kernel says the caller would lose them, it takes them off itself.
/// Whether the mode changed.
fn kill_suid_sgid(fd: BorrowedFd<'_>, req: &fuser::Request) -> Res<bool> {
    let st = stat_fd(fd)?;
    let mode = without_setid_for(st.st_mode & 0o7777, st.st_gid, req);
    if mode == st.st_mode & 0o7777 {
        return Ok(false);
    }
    rustix::fs::fchmod(fd, Mode::from_raw_mode(mode)).map_err(errno_of)?;
    Ok(true)
}

/// What a creating operation made, for [`FilterFs::create_as_caller`]: a created file
/// comes with its descriptor; other objects are found by their name.
trait Made {
    fn fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

impl Made for () {}

impl Made for OwnedFd {
    fn fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.as_fd())
    }
}

fn stat_fd(fd: BorrowedFd<'_>) -> Res<Stat> {
    rustix::fs::statat(fd, "", AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW).map_err(errno_of)
}

/// Flags for reopening a backing file on behalf of the caller's open. Never O_APPEND:
/// every write the kernel sends carries its offset (for an append, the end the kernel
/// computed), and a write it sends to any other place through an append open (a shared
/// mapping's writeback, a write after `fcntl(F_SETFL)` dropped O_APPEND, the pieces of a
/// large O_DIRECT append) would otherwise land at the end, as pwrite(2) does on Linux.
fn reopen_flags(flags: i32, keep_direct: bool) -> OFlags {
    let mut strip = libc::O_CREAT
        | libc::O_EXCL
        | libc::O_NOCTTY
        | libc::O_TRUNC
        | libc::O_NOFOLLOW
        | libc::O_APPEND;
    if !keep_direct {
        strip |= libc::O_DIRECT;
    }
    OFlags::from_bits_retain(((flags & !strip) | libc::O_CLOEXEC) as u32)
}

impl FilterFs {
    /// Opens the backing directory. `root` must be a directory.
    pub fn new(backing: &Path, chain: Arc<Chain>, opts: Options) -> std::io::Result<Self> {
        let root = rustix::fs::open(
            backing,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let st = stat_fd(root.as_fd()).map_err(std::io::Error::from_raw_os_error)?;
        let inodes = Inodes::new(root, st.st_dev, st.st_ino, opts.fd_cache)?;
        Ok(FilterFs {
            inodes,
            varies_by_caller: chain.may_vary_by_caller(),
            chain,
            blocking: BlockingPool::new(opts.blocking_threads),
            blocking_inline: AtomicUsize::new(0),
            blocking_inline_per_queue: (0..std::thread::available_parallelism()
                .map_or(64, |n| n.get()))
                .map(|_| AtomicUsize::new(0))
                .collect(),
            opts,
            files: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            open_decisions: Mutex::new(()),
            passthrough: AtomicBool::new(false),
            dont_mask: AtomicBool::new(false),
            notifier: Arc::default(),
        })
    }

    /// Whether some open of node `node` may write.
    fn open_for_writing(&self, node: u64) -> bool {
        self.files.lock().values().any(|f| {
            f.node == node
                && rustix::fs::fcntl_getfl(&f.fd)
                    .is_ok_and(|fl| fl.contains(OFlags::WRONLY) || fl.contains(OFlags::RDWR))
        })
    }

    /// Where the mount puts its notifier once the session exists.
    pub(crate) fn notifier_slot(&self) -> Arc<std::sync::OnceLock<fuser::Notifier>> {
        self.notifier.clone()
    }

    /// Makes the kernel fetch the attributes of node `ino` again (it caches them for the
    /// attribute timeout), after a change it did not ask for.
    fn forget_attributes(&self, ino: INodeNo) {
        if let Some(n) = self.notifier.get() {
            // Offset -1: the attributes only, not the cached data.
            if let Err(e) = n.inval_inode(ino, -1, 0) {
                tracing::debug!("invalidating the attributes of {ino:?}: {e}");
            }
        }
    }

    fn attr(&self, id: u64, st: &Stat) -> FileAttr {
        FileAttr {
            ino: INodeNo(id),
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: time_of(st.st_atime, st.st_atime_nsec as i64),
            mtime: time_of(st.st_mtime, st.st_mtime_nsec as i64),
            ctime: time_of(st.st_ctime, st.st_ctime_nsec as i64),
            crtime: UNIX_EPOCH,
            kind: kind_from_mode(st.st_mode),
            perm: (st.st_mode & 0o7777) as u16,
            nlink: st.st_nlink as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
            blksize: st.st_blksize as u32,
            flags: 0,
        }
    }

    /// Runs `body` with the filter chain around it. Without filters, no path is built.
    fn filtered<T>(
        &self,
        req: &fuser::Request,
        op: Op,
        paths: impl FnOnce() -> (PathBuf, Option<PathBuf>),
        detail: impl FnOnce(&mut Request),
        body: impl FnOnce() -> Res<T>,
        bytes: impl FnOnce(&T) -> u64,
    ) -> Res<T> {
        sys::act_for(req.uid());
        self.chain
            .around(|| request(req, op, paths, detail), body, bytes)
    }

    /// Like [`Self::filtered`] for a call that may wait on the disk: the filters' `before`
    /// runs here; the call, the `after` hooks and the reply run here too while another
    /// request thread stays free (over io_uring: two other workers of this CPU's queue),
    /// else on the blocking pool. Handing every call to the pool
    /// cost a wake-up and a context switch each: fio's write+fsync loop ran 13–18% slower
    /// that way on the 2-core VM (bench/RESULTS.md).
    fn offload(
        &self,
        req: &fuser::Request,
        op: Op,
        paths: impl FnOnce() -> (PathBuf, Option<PathBuf>),
        body: impl FnOnce() -> Res<()> + Send + 'static,
        reply: ReplyEmpty,
    ) {
        self.offload_with(
            req,
            op,
            paths,
            |_| {},
            body,
            |()| 0,
            move |res| reply_empty(reply, res),
        );
    }

    /// [`Self::offload`] of a call with a result: `bytes` says how many bytes a success
    /// moved (for the filters), `answer` replies.
    #[allow(clippy::too_many_arguments)]
    fn offload_with<T: 'static>(
        &self,
        req: &fuser::Request,
        op: Op,
        paths: impl FnOnce() -> (PathBuf, Option<PathBuf>),
        detail: impl FnOnce(&mut Request),
        body: impl FnOnce() -> Res<T> + Send + 'static,
        bytes: impl FnOnce(&T) -> u64 + Send + 'static,
        answer: impl FnOnce(Res<T>) + Send + 'static,
    ) {
        let admitted = if self.chain.is_empty() {
            None
        } else {
            match self.chain.admit(request(req, op, paths, detail)) {
                Ok(admitted) => Some(admitted),
                Err(errno) => return answer(Err(errno)),
            }
        };
        let uid = req.uid();
        let job = move || {
            sys::act_for(uid);
            let res = body();
            if let Some(admitted) = admitted {
                admitted.finish(res.as_ref().map(bytes).map_err(|e| *e));
            }
            answer(res);
        };
        // Over io_uring each CPU has its own few workers, whose entries the kernel gives
        // that CPU's requests to, and an entry stays taken while its request is served
        // anywhere: a call stays on a worker only while two other workers of its queue are
        // free, so that one handed on still leaves one. (Two copies or fsyncs from one CPU
        // held up its stats for their whole length.)
        let (inline, limit) = match fuser::uring_worker() {
            Some(w) => (
                &self.blocking_inline_per_queue[w.queue % self.blocking_inline_per_queue.len()],
                w.workers.saturating_sub(2),
            ),
            None => (&self.blocking_inline, self.opts.threads.saturating_sub(1)),
        };
        if inline.fetch_add(1, Ordering::AcqRel) < limit {
            job();
        } else {
            self.blocking.run(job);
        }
        inline.fetch_sub(1, Ordering::AcqRel);
    }

    fn node_path(&self, id: u64) -> impl FnOnce() -> (PathBuf, Option<PathBuf>) + '_ {
        move || (self.inodes.path(id), None)
    }

    fn child_path<'a>(
        &'a self,
        parent: u64,
        name: &'a OsStr,
    ) -> impl FnOnce() -> (PathBuf, Option<PathBuf>) + 'a {
        move || (self.inodes.child_path(parent, name), None)
    }

    /// For a rename of `name` in `dir` from `from` to `to`: if it is a directory and a
    /// filter guards paths below it ([`Chain::guards_below`]), asks the filters about the
    /// rename of every object below it, and gives the first refusal.
    fn check_below(
        &self,
        who: Caller,
        flags: i32,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        from: &Path,
        to: &Path,
    ) -> Res<()> {
        // Each object below moves one way only, also in an exchange (whose other side
        // is checked on its own).
        let flags = flags & !(libc::RENAME_EXCHANGE as i32);
        let rename = |from: &Path, to: &Path| {
            let mut r = Request::new(Op::Rename, from, who);
            r.path2 = Some(to.to_path_buf());
            r.flags = Some(flags);
            r
        };
        if !self.chain.guards_below(from, &rename(from, to)) {
            return Ok(());
        }
        match open_dir(dir, name) {
            Ok(top) => self.check_tree(&rename, &top, from, to, 0),
            // Not a directory (a symlink: ELOOP): nothing below it.
            Err(rustix::io::Errno::NOTDIR | rustix::io::Errno::LOOP) => Ok(()),
            // Unchecked is refused (out of descriptors, say): it could move what a rule
            // protects.
            Err(e) => Err(errno_of(e)),
        }
    }

    /// [`Self::check_below`] of the objects in the open directory `dir`, depth first (one
    /// descriptor per level). A tree deeper than this is refused rather than moved
    /// unchecked.
    fn check_tree(
        &self,
        rename: &dyn Fn(&Path, &Path) -> Request,
        dir: &OwnedFd,
        from: &Path,
        to: &Path,
        depth: usize,
    ) -> Res<()> {
        const MAX_DEPTH: usize = 512;
        if depth >= MAX_DEPTH {
            return Err(libc::ELOOP);
        }
        let entries = rustix::fs::Dir::read_from(dir).map_err(errno_of)?;
        for e in entries {
            let e = e.map_err(errno_of)?;
            let bytes = e.file_name().to_bytes();
            if bytes == b"." || bytes == b".." {
                continue;
            }
            let child = OsStr::from_bytes(bytes);
            let (f, t) = (from.join(child), to.join(child));
            if let Verdict::Deny(errno) = self.chain.before(&rename(&f, &t)) {
                return Err(errno);
            }
            let dir_or_unknown = matches!(
                e.file_type(),
                rustix::fs::FileType::Directory | rustix::fs::FileType::Unknown
            );
            if dir_or_unknown {
                match open_dir(dir.as_fd(), child) {
                    Ok(sub) => self.check_tree(rename, &sub, &f, &t, depth + 1)?,
                    // Not a directory, or gone since it was listed: nothing below it.
                    Err(
                        rustix::io::Errno::NOTDIR
                        | rustix::io::Errno::LOOP
                        | rustix::io::Errno::NOENT,
                    ) => {}
                    Err(e) => return Err(errno_of(e)),
                }
            }
        }
        Ok(())
    }

    /// Whether the filters hide `path` from this caller (a lookup denied with ENOENT).
    fn hidden(&self, req: &fuser::Request, path: &Path) -> bool {
        let r = Request::new(Op::Lookup, path, caller_of(req));
        self.chain.before(&r) == Verdict::Deny(libc::ENOENT)
    }

    /// Looks `name` up in the directory `dir_fd` (node `parent`) and records the reference.
    fn lookup_at(&self, parent: u64, dir_fd: BorrowedFd<'_>, name: &OsStr) -> Res<Entry> {
        let fd = self.retry_emfile(|| {
            rustix::fs::openat(
                dir_fd,
                name,
                OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
        })?;
        let st = stat_fd(fd.as_fd())?;
        let (id, generation) = self.inodes.remember(
            parent,
            name,
            fd,
            Found {
                dev: st.st_dev,
                ino: st.st_ino,
                kind: kind_from_mode(st.st_mode),
            },
        );
        Ok(Entry { id, generation, st })
    }

    fn lookup_in(&self, parent: u64, name: &OsStr) -> Res<Entry> {
        let dir = self.inodes.fd(parent)?;
        self.lookup_at(parent, dir.as_fd(), name)
    }

    /// How long the kernel may keep the attributes and the name of the object at `path`:
    /// not at all where a filter's answer depends on the caller (each access is asked).
    fn ttls(&self, path: impl FnOnce() -> PathBuf) -> (Duration, Duration) {
        if self.varies_by_caller && self.chain.varies_by_caller(&path()) {
            (Duration::ZERO, Duration::ZERO)
        } else {
            (self.opts.attr_timeout, self.opts.entry_timeout)
        }
    }

    fn reply_entry(&self, reply: ReplyEntry, res: Res<Entry>) {
        match res {
            Ok(e) => {
                let attr = self.attr(e.id, &e.st);
                let (attr_ttl, entry_ttl) = self.ttls(|| self.inodes.path(e.id));
                reply.entry_with_ttls(&attr_ttl, &entry_ttl, &attr, Generation(e.generation))
            }
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }

    /// Runs a creating operation with the caller's group as file-system gid and the
    /// caller's umask, then gives the new object to the caller. The thread keeps its file
    /// capabilities meanwhile (see [`sys::act_for`]): the kernel already checked the
    /// caller's permission (default_permissions), and they keep supplementary-group access
    /// working on the backing side. The owner and mode are set
    /// through a descriptor of the object, never by its name, which someone writing in
    /// BACKING may have replaced meanwhile (a symlink the daemon would follow out of it).
    fn create_as_caller<T: Made>(
        &self,
        req: &fuser::Request,
        umask: u32,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        make: impl FnOnce() -> Res<T>,
    ) -> Res<T> {
        if !THREAD_FS_PRIVATE.get() {
            sys::unshare_thread_fs().map_err(io_errno)?;
            THREAD_FS_PRIVATE.set(true);
        }
        sys::set_thread_umask(if self.dont_mask.load(Ordering::Relaxed) {
            umask
        } else {
            0
        });
        let old_gid = sys::set_thread_fsgid(req.gid());
        let made = make();
        sys::set_thread_fsgid(old_gid);
        let made = made?;
        let uid = req.uid();
        if uid == rustix::process::geteuid().as_raw() {
            return Ok(made);
        }
        // A created file comes with its descriptor; anything else is opened once.
        let opened;
        let object = match made.fd() {
            Some(fd) => fd,
            None => {
                opened = rustix::fs::openat(
                    dir,
                    name,
                    OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(errno_of)?;
                opened.as_fd()
            }
        };
        let before = stat_fd(object)?;
        let owner = Some(rustix::fs::Uid::from_raw(uid));
        let empty = AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW;
        if let Err(e) = rustix::fs::chownat(object, "", owner, None, empty) {
            // Taken back by its name only while the name is still the object.
            let same = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
                .is_ok_and(|st| (st.st_dev, st.st_ino) == (before.st_dev, before.st_ino));
            if same {
                let is_dir = before.st_mode & libc::S_IFMT == libc::S_IFDIR;
                let how = if is_dir {
                    AtFlags::REMOVEDIR
                } else {
                    AtFlags::empty()
                };
                let _ = rustix::fs::unlinkat(dir, name, how);
            }
            return Err(errno_of(e));
        }
        // chown clears set-id bits; the caller asked for them on a file it owns.
        let setid = before.st_mode & (libc::S_ISUID | libc::S_ISGID);
        if setid != 0 && before.st_mode & libc::S_IFMT == libc::S_IFREG {
            let mode = Mode::from_raw_mode(before.st_mode & 0o7777);
            let _ = rustix::fs::chmod(sys::proc_fd_path(object), mode);
        }
        Ok(made)
    }

    /// Registers an open file handle; decides passthrough for it.
    fn open_file(
        &self,
        node: u64,
        fd: OwnedFd,
        flags: i32,
        opener: Caller,
        want_passthrough: bool,
        register: impl FnOnce(&OwnedFd) -> std::io::Result<BackingId>,
    ) -> (u64, Option<Arc<BackingId>>) {
        // Decision, registration and count must be one step, or two first opens racing
        // would register two backing files for one inode (the kernel fails the second).
        let _decide = self.open_decisions.lock();
        // The kernel requires every open of an inode that has a passthrough open to be
        // passthrough too (sharing one registration), and refuses passthrough while cached
        // opens exist. So the first open of an inode decides for all concurrent ones.
        let (cached, existing) = self
            .inodes
            .with_node(node, |n| {
                (
                    n.cached_opens,
                    if n.passthrough_opens > 0 {
                        n.backing.upgrade()
                    } else {
                        None
                    },
                )
            })
            .unwrap_or((0, None));
        let backing = match existing {
            Some(id) => {
                if !want_passthrough {
                    tracing::debug!("node {node} is open in passthrough mode; this open bypasses the filters' data hooks too");
                }
                Some(id)
            }
            None if want_passthrough && cached == 0 => match register(&fd) {
                Ok(id) => {
                    let id = Arc::new(id);
                    self.inodes
                        .with_node(node, |n| n.backing = Arc::downgrade(&id));
                    Some(id)
                }
                Err(err) => {
                    tracing::debug!(
                        "passthrough registration failed, serving from the daemon: {err}"
                    );
                    None
                }
            },
            None => None,
        };
        let is_pt = backing.is_some();
        self.inodes.with_node(node, |n| {
            if is_pt {
                n.passthrough_opens += 1
            } else {
                n.cached_opens += 1
            }
        });
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.files.lock().insert(
            fh,
            Arc::new(OpenFile {
                node,
                fd,
                direct: backing.is_none() && served_directly(flags),
                backing: backing.clone(),
                opener,
            }),
        );
        (fh, backing)
    }

    fn file(&self, fh: FileHandle) -> Res<Arc<OpenFile>> {
        self.files.lock().get(&fh.0).cloned().ok_or(libc::EBADF)
    }

    /// Opens the node for I/O with the given flags (through its `O_PATH` descriptor).
    fn reopen(&self, id: u64, flags: OFlags) -> Res<OwnedFd> {
        let fd = self.inodes.fd(id)?;
        self.retry_emfile(|| rustix::fs::open(sys::proc_fd_path(fd.as_fd()), flags, Mode::empty()))
    }

    /// Runs an open; on EMFILE closes cached inode descriptors and tries once more.
    fn retry_emfile<T>(&self, open: impl Fn() -> rustix::io::Result<T>) -> Res<T> {
        match open() {
            Err(rustix::io::Errno::MFILE) => {
                self.inodes.relieve();
                open().map_err(errno_of)
            }
            res => res.map_err(errno_of),
        }
    }

    /// The path of an open file's data operation: where the file is now (a directory above
    /// it may have been renamed since the open).
    fn data_path(&self, file: &OpenFile) -> impl FnOnce() -> (PathBuf, Option<PathBuf>) + '_ {
        let node = file.node;
        move || (self.inodes.path(node), None)
    }

    fn wants_passthrough(&self, path: Option<&Path>) -> bool {
        self.passthrough.load(Ordering::Relaxed)
            && match path {
                None => true,
                Some(p) => !self.chain.wants_data(p),
            }
    }

    fn do_setattr(
        &self,
        ino: u64,
        fh: Option<FileHandle>,
        change: AttrChange,
        req: &fuser::Request,
        kill_suidgid: bool,
    ) -> Res<Stat> {
        let AttrChange {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
        } = change;
        let path_fd = self.inodes.fd(ino)?;
        let open = fh.and_then(|fh| self.files.lock().get(&fh.0).cloned());
        let proc_path = sys::proc_fd_path(path_fd.as_fd());
        let nothing = mode.is_none()
            && uid.is_none()
            && gid.is_none()
            && size.is_none()
            && atime.is_none()
            && mtime.is_none();
        if nothing {
            return self.drop_setid_bits(ino, path_fd.as_fd(), req);
        }
        if let Some(mode) = mode {
            rustix::fs::chmod(&proc_path, Mode::from_raw_mode(mode & 0o7777)).map_err(errno_of)?;
        }
        if uid.is_some() || gid.is_some() {
            rustix::fs::chownat(
                path_fd.as_fd(),
                "",
                uid.map(rustix::fs::Uid::from_raw),
                gid.map(rustix::fs::Gid::from_raw),
                AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(errno_of)?;
        }
        if let Some(size) = size {
            match &open {
                Some(f)
                    if rustix::fs::fcntl_getfl(&f.fd).is_ok_and(|fl| {
                        fl.contains(OFlags::WRONLY) || fl.contains(OFlags::RDWR)
                    }) =>
                {
                    rustix::fs::ftruncate(&f.fd, size).map_err(errno_of)?
                }
                _ => {
                    let fd = rustix::fs::open(
                        &proc_path,
                        OFlags::WRONLY | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(errno_of)?;
                    rustix::fs::ftruncate(&fd, size).map_err(errno_of)?;
                }
            }
        }
        if atime.is_some() || mtime.is_some() {
            let times = Timestamps {
                last_access: timespec(atime),
                last_modification: timespec(mtime),
            };
            rustix::fs::utimensat(rustix::fs::CWD, &proc_path, &times, AtFlags::empty())
                .map_err(errno_of)?;
        }
        // With FUSE_HANDLE_KILLPRIV_V2 dropping set-ID bits is ours; the kernel asks for it
        // on a truncation by a caller without CAP_FSETID (a chown as root, above, drops
        // them by itself).
        if kill_suidgid && size.is_some() && mode.is_none() && uid.is_none() && gid.is_none() {
            let st = stat_fd(path_fd.as_fd())?;
            if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
                let m = without_setid_for(st.st_mode & 0o7777, st.st_gid, req);
                if m != st.st_mode & 0o7777 {
                    rustix::fs::chmod(&proc_path, Mode::from_raw_mode(m)).map_err(errno_of)?;
                }
            }
        }
        stat_fd(path_fd.as_fd())
    }

    /// A setattr that changes nothing: the kernel dropping set-ID bits, for a write by a
    /// caller without CAP_FSETID or for chown(f, -1, -1) (FUSE_HANDLE_KILLPRIV_V2 leaves
    /// it to us, and the two look alike). The kernel checked no permission for it, so
    /// the caller must be the owner (a chown's right), or able to write the file, or the
    /// file open for writing (a write's: through a descriptor opened while it could, say
    /// before a chmod): anyone else gets EPERM, as from chown(2) on the backing file
    /// system. Otherwise anyone could strip the set-ID bits of any file.
    fn drop_setid_bits(&self, node: u64, fd: BorrowedFd<'_>, req: &fuser::Request) -> Res<Stat> {
        let st = stat_fd(fd)?;
        let perm = st.st_mode & 0o7777;
        let m = without_setid_for(perm, st.st_gid, req);
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR || m == perm {
            // As chown(f, -1, -1) would, for the ctime (and the capabilities, as root).
            rustix::fs::chownat(fd, "", None, None, AtFlags::EMPTY_PATH).map_err(errno_of)?;
            return stat_fd(fd);
        }
        let (uid, gid) = (req.uid(), req.gid());
        if uid != 0 && uid != st.st_uid && !self.open_for_writing(node) {
            let groups = crate::reply::supplementary_groups(req.pid()).unwrap_or_default();
            if !sys::may_write_as(fd, uid, gid, &groups).map_err(io_errno)? {
                return Err(libc::EPERM);
            }
        }
        let proc_path = sys::proc_fd_path(fd);
        rustix::fs::chmod(&proc_path, Mode::from_raw_mode(m)).map_err(errno_of)?;
        stat_fd(fd)
    }

    fn fill_dir(
        &self,
        req: &fuser::Request,
        dir: &OpenDir,
        offset: u64,
        mut add: impl FnMut(&sys::DirEntry) -> Res<bool>,
    ) -> Res<()> {
        let base = (!self.chain.is_empty()).then(|| self.inodes.path(dir.node));
        let mut st = dir.state.lock();
        if offset as i64 != st.pos {
            rustix::fs::seek(&dir.fd, rustix::fs::SeekFrom::Start(offset)).map_err(errno_of)?;
            st.pos = offset as i64;
            st.pending.clear();
            st.eof = false;
        }
        loop {
            if st.pending.is_empty() {
                if st.eof {
                    break;
                }
                let mut batch = Vec::new();
                sys::read_dir_batch(dir.fd.as_fd(), &mut batch).map_err(io_errno)?;
                if batch.is_empty() {
                    st.eof = true;
                    break;
                }
                st.pending.extend(batch);
            }
            let entry = st.pending.front().expect("not empty");
            let skip = entry.name.as_bytes() != b"."
                && entry.name.as_bytes() != b".."
                && base
                    .as_ref()
                    .is_some_and(|p| self.hidden(req, &p.join(&*entry.name)));
            if !skip && add(entry)? {
                break; // reply buffer full; this entry comes first next time
            }
            let entry = st.pending.pop_front().expect("not empty");
            st.pos = entry.next_offset;
        }
        Ok(())
    }

    fn dir(&self, fh: FileHandle) -> Res<Arc<OpenDir>> {
        self.dirs.lock().get(&fh.0).cloned().ok_or(libc::EBADF)
    }
}

fn get_xattr(path: &Path, name: &OsStr) -> Res<Vec<u8>> {
    loop {
        let len = rustix::fs::getxattr_query(path, name).map_err(errno_of)?;
        let mut buf = vec![0u8; len];
        match rustix::fs::getxattr(path, name, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(rustix::io::Errno::RANGE) => continue,
            Err(e) => return Err(errno_of(e)),
        }
    }
}

fn list_xattr(path: &Path) -> Res<Vec<u8>> {
    loop {
        let len = rustix::fs::listxattr_query(path).map_err(errno_of)?;
        let mut buf = vec![0u8; len];
        match rustix::fs::listxattr(path, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(rustix::io::Errno::RANGE) => continue,
            Err(e) => return Err(errno_of(e)),
        }
    }
}

impl Filesystem for FilterFs {
    fn init(&mut self, _req: &fuser::Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let wanted = [
            InitFlags::FUSE_ASYNC_DIO,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_AUTO_INVAL_DATA,
            InitFlags::FUSE_POSIX_ACL,
            InitFlags::FUSE_DONT_MASK,
            // We clear set-user/group-ID bits on write ourselves (FUSE_WRITE_KILL_SUIDGID),
            // and passthrough writes have the backing file system do it; in exchange the
            // kernel stops asking for security.capability before every write.
            InitFlags::FUSE_HANDLE_KILLPRIV_V2,
        ];
        for flag in wanted {
            // A symlink's target, once cached, is given to every caller without asking:
            // not when a filter may answer callers differently.
            if flag == InitFlags::FUSE_CACHE_SYMLINKS && self.varies_by_caller {
                continue;
            }
            if config.add_capabilities(flag).is_err() {
                tracing::debug!("kernel lacks {flag:?}");
            }
        }
        self.dont_mask.store(
            config.capabilities().contains(InitFlags::FUSE_DONT_MASK),
            Ordering::Relaxed,
        );
        if self.opts.passthrough {
            let ok = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            if !ok {
                tracing::warn!(
                    "kernel has no FUSE passthrough; all file data goes through the daemon"
                );
            }
            self.passthrough.store(ok, Ordering::Relaxed);
        }
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn destroy(&mut self) {
        self.blocking.shutdown();
        self.chain.close();
    }

    fn lookup(&self, req: &fuser::Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let parent = parent.0;
        let res = self.filtered(
            req,
            Op::Lookup,
            self.child_path(parent, name),
            |_| {},
            || {
                check_name(name)?;
                self.lookup_in(parent, name)
            },
            |_| 0,
        );
        let remembered = || {
            let (_, entry_ttl) = self.ttls(|| self.inodes.child_path(parent, name));
            !entry_ttl.is_zero()
        };
        match res {
            Err(libc::ENOENT) if !self.opts.negative_timeout.is_zero() && remembered() => {
                // A negative entry: the kernel remembers the absence for a while.
                let mut attr = self.attr(0, &sys::zeroed_stat());
                attr.ino = INodeNo(0);
                reply.entry_with_ttls(
                    &Duration::ZERO,
                    &self.opts.negative_timeout,
                    &attr,
                    Generation(0),
                );
            }
            res => self.reply_entry(reply, res),
        }
    }

    fn forget(&self, _req: &fuser::Request, ino: INodeNo, nlookup: u64) {
        self.inodes.forget(ino.0, nlookup);
    }

    fn getattr(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        fh: Option<FileHandle>,
        reply: ReplyAttr,
    ) {
        let res = self.filtered(
            req,
            Op::Getattr,
            self.node_path(ino.0),
            |_| {},
            || {
                if let Some(f) = fh.and_then(|fh| self.files.lock().get(&fh.0).cloned()) {
                    return stat_fd(f.fd.as_fd());
                }
                stat_fd(self.inodes.fd(ino.0)?.as_fd())
            },
            |_| 0,
        );
        match res {
            Ok(st) => reply.attr(
                &self.ttls(|| self.inodes.path(ino.0)).0,
                &self.attr(ino.0, &st),
            ),
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }

    fn setattr(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        kill_suidgid: bool,
        reply: ReplyAttr,
    ) {
        let res = self.filtered(
            req,
            Op::Setattr,
            self.node_path(ino.0),
            |r| r.set_attributes(mode, uid, gid, size, atime, mtime),
            || {
                self.do_setattr(
                    ino.0,
                    fh,
                    AttrChange {
                        mode,
                        uid,
                        gid,
                        size,
                        atime,
                        mtime,
                    },
                    req,
                    kill_suidgid,
                )
            },
            |_| 0,
        );
        match res {
            Ok(st) => reply.attr(
                &self.ttls(|| self.inodes.path(ino.0)).0,
                &self.attr(ino.0, &st),
            ),
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }

    fn readlink(&self, req: &fuser::Request, ino: INodeNo, reply: ReplyData) {
        let res = self.filtered(
            req,
            Op::Readlink,
            self.node_path(ino.0),
            |_| {},
            || {
                let fd = self.inodes.fd(ino.0)?;
                rustix::fs::readlinkat(fd.as_fd(), "", Vec::new()).map_err(errno_of)
            },
            |_| 0,
        );
        match res {
            Ok(target) => reply.data(target.as_bytes()),
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }

    fn mknod(
        &self,
        req: &fuser::Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let parent = parent.0;
        let res = self.filtered(
            req,
            Op::Mknod,
            self.child_path(parent, name),
            |r| r.mode = Some(mode),
            || {
                check_name(name)?;
                let dir = self.inodes.fd(parent)?;
                self.create_as_caller(req, umask, dir.as_fd(), name, || {
                    let kind = rustix::fs::FileType::from_raw_mode(mode);
                    rustix::fs::mknodat(
                        dir.as_fd(),
                        name,
                        kind,
                        Mode::from_raw_mode(mode & 0o7777),
                        rdev as u64,
                    )
                    .map_err(errno_of)
                })?;
                self.lookup_at(parent, dir.as_fd(), name)
            },
            |_| 0,
        );
        self.reply_entry(reply, res);
    }

    fn mkdir(
        &self,
        req: &fuser::Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let parent = parent.0;
        let res = self.filtered(
            req,
            Op::Mkdir,
            self.child_path(parent, name),
            |r| r.mode = Some(mode),
            || {
                check_name(name)?;
                let dir = self.inodes.fd(parent)?;
                self.create_as_caller(req, umask, dir.as_fd(), name, || {
                    rustix::fs::mkdirat(dir.as_fd(), name, Mode::from_raw_mode(mode & 0o7777))
                        .map_err(errno_of)
                })?;
                self.lookup_at(parent, dir.as_fd(), name)
            },
            |_| 0,
        );
        self.reply_entry(reply, res);
    }

    fn unlink(&self, req: &fuser::Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let res = self.filtered(
            req,
            Op::Unlink,
            self.child_path(parent.0, name),
            |_| {},
            || {
                check_name(name)?;
                let dir = self.inodes.fd(parent.0)?;
                // Filters see paths: the object keeps a name it still has.
                let st = (!self.chain.is_empty())
                    .then(|| rustix::fs::statat(dir.as_fd(), name, AtFlags::SYMLINK_NOFOLLOW).ok())
                    .flatten();
                rustix::fs::unlinkat(dir.as_fd(), name, AtFlags::empty()).map_err(errno_of)?;
                if let Some(st) = st.filter(|st| st.st_nlink > 1) {
                    self.inodes.unlinked(st.st_dev, st.st_ino, parent.0, name);
                }
                Ok(())
            },
            |_| 0,
        );
        reply_empty(reply, res);
    }

    fn rmdir(&self, req: &fuser::Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let res = self.filtered(
            req,
            Op::Rmdir,
            self.child_path(parent.0, name),
            |_| {},
            || {
                check_name(name)?;
                let dir = self.inodes.fd(parent.0)?;
                rustix::fs::unlinkat(dir.as_fd(), name, AtFlags::REMOVEDIR).map_err(errno_of)
            },
            |_| 0,
        );
        reply_empty(reply, res);
    }

    fn symlink(
        &self,
        req: &fuser::Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let parent = parent.0;
        let res = self.filtered(
            req,
            Op::Symlink,
            || {
                (
                    self.inodes.child_path(parent, link_name),
                    Some(target.to_path_buf()),
                )
            },
            |_| {},
            || {
                check_name(link_name)?;
                let dir = self.inodes.fd(parent)?;
                self.create_as_caller(req, 0, dir.as_fd(), link_name, || {
                    rustix::fs::symlinkat(target, dir.as_fd(), link_name).map_err(errno_of)
                })?;
                self.lookup_at(parent, dir.as_fd(), link_name)
            },
            |_| 0,
        );
        self.reply_entry(reply, res);
    }

    fn rename(
        &self,
        req: &fuser::Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (parent, newparent) = (parent.0, newparent.0);
        let res = self.filtered(
            req,
            Op::Rename,
            || {
                (
                    self.inodes.child_path(parent, name),
                    Some(self.inodes.child_path(newparent, newname)),
                )
            },
            |r| r.flags = Some(flags.bits() as i32),
            || {
                check_name(name)?;
                check_name(newname)?;
                let old_dir = self.inodes.fd(parent)?;
                let new_dir = self.inodes.fd(newparent)?;
                if !self.chain.is_empty() {
                    let (from, to) = (
                        self.inodes.child_path(parent, name),
                        self.inodes.child_path(newparent, newname),
                    );
                    let flags = flags.bits() as i32;
                    let who = caller_of(req);
                    self.check_below(who, flags, old_dir.as_fd(), name, &from, &to)?;
                    if flags & libc::RENAME_EXCHANGE as i32 != 0 {
                        self.check_below(who, flags, new_dir.as_fd(), newname, &to, &from)?;
                    }
                }
                // An object the rename replaces loses that name.
                let replaced = (!self.chain.is_empty()
                    && flags.bits() & libc::RENAME_EXCHANGE == 0)
                    .then(|| {
                        rustix::fs::statat(new_dir.as_fd(), newname, AtFlags::SYMLINK_NOFOLLOW).ok()
                    })
                    .flatten();
                let rename = || {
                    rustix::fs::renameat_with(
                        old_dir.as_fd(),
                        name,
                        new_dir.as_fd(),
                        newname,
                        rustix::fs::RenameFlags::from_bits_retain(flags.bits()),
                    )
                    .map_err(errno_of)
                };
                if flags.bits() & libc::RENAME_WHITEOUT != 0 {
                    // The whiteout left at the old name is the caller's, as a create.
                    self.create_as_caller(req, 0, old_dir.as_fd(), name, rename)?;
                } else {
                    rename()?;
                }
                // Keep the remembered names right for filter paths.
                if let Some(st) = replaced.filter(|st| st.st_nlink > 1) {
                    self.inodes
                        .unlinked(st.st_dev, st.st_ino, newparent, newname);
                }
                let (from, to) = ((parent, name), (newparent, newname));
                if let Ok(st) =
                    rustix::fs::statat(new_dir.as_fd(), newname, AtFlags::SYMLINK_NOFOLLOW)
                {
                    self.inodes.renamed(st.st_dev, st.st_ino, from, to);
                }
                if flags.bits() & libc::RENAME_EXCHANGE != 0 {
                    if let Ok(st) =
                        rustix::fs::statat(old_dir.as_fd(), name, AtFlags::SYMLINK_NOFOLLOW)
                    {
                        self.inodes.renamed(st.st_dev, st.st_ino, to, from);
                    }
                }
                Ok(())
            },
            |_| 0,
        );
        reply_empty(reply, res);
    }

    fn link(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let newparent = newparent.0;
        let res = self.filtered(
            req,
            Op::Link,
            || {
                (
                    self.inodes.path(ino.0),
                    Some(self.inodes.child_path(newparent, newname)),
                )
            },
            |_| {},
            || {
                check_name(newname)?;
                let src = self.inodes.fd(ino.0)?;
                let dir = self.inodes.fd(newparent)?;
                rustix::fs::linkat(src.as_fd(), "", dir.as_fd(), newname, AtFlags::EMPTY_PATH)
                    .map_err(errno_of)?;
                self.lookup_at(newparent, dir.as_fd(), newname)
            },
            |_| 0,
        );
        self.reply_entry(reply, res);
    }

    /// (No FUSE_ATOMIC_O_TRUNC here: a truncation comes as a setattr after the open, which
    /// carries its own FATTR_KILL_SUIDGID.)
    fn open(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        flags: OpenFlags,
        _kill_suidgid: bool,
        reply: ReplyOpen,
    ) {
        let flags = flags.0;
        let path = (!self.chain.is_empty()).then(|| self.inodes.path(ino.0));
        let res = self.filtered(
            req,
            Op::Open,
            || (path.clone().expect("filters present"), None),
            |r| r.flags = Some(flags),
            || {
                let passthrough = self.wants_passthrough(path.as_deref());
                let oflags = reopen_flags(flags, passthrough);
                let fd = match self.reopen(ino.0, oflags) {
                    // An append-only file (chattr +a) opens for writing only with O_APPEND,
                    // kept then: every write to it lands at its end anyway.
                    Err(libc::EPERM) if flags & libc::O_APPEND != 0 => {
                        self.reopen(ino.0, oflags | OFlags::APPEND)
                    }
                    res => res,
                }?;
                Ok(
                    self.open_file(ino.0, fd, flags, caller_of(req), passthrough, |fd| {
                        reply.open_backing(fd)
                    }),
                )
            },
            |_| 0,
        );
        match res {
            Ok((fh, Some(backing))) => {
                reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &backing)
            }
            Ok((fh, None)) => reply.opened(FileHandle(fh), served_open_flags(flags)),
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }

    fn create(
        &self,
        req: &fuser::Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let parent = parent.0;
        let path = (!self.chain.is_empty()).then(|| self.inodes.child_path(parent, name));
        let res = self.filtered(
            req,
            Op::Create,
            || (path.clone().expect("filters present"), None),
            |r| {
                r.flags = Some(flags);
                r.mode = Some(mode);
            },
            || {
                check_name(name)?;
                let dir = self.inodes.fd(parent)?;
                let passthrough = self.wants_passthrough(path.as_deref());
                // Always exclusive: only a file made here is the caller's new file.
                let oflags = reopen_flags(flags, passthrough)
                    | OFlags::CREATE
                    | OFlags::NOFOLLOW
                    | OFlags::EXCL;
                let fd = self
                    .create_as_caller(req, umask, dir.as_fd(), name, || {
                        rustix::fs::openat(
                            dir.as_fd(),
                            name,
                            oflags,
                            Mode::from_raw_mode(mode & 0o7777),
                        )
                        .map_err(errno_of)
                    })
                    .map_err(|e| match e {
                        // The kernel sends CREATE for a name it believed free: one made in
                        // BACKING since is not opened here, where the kernel has checked no
                        // permission for it and would take it for the caller's new file.
                        // ESTALE makes it look the name up again and open what it finds
                        // with its own checks (O_TRUNC and all).
                        libc::EEXIST if flags & libc::O_EXCL == 0 => libc::ESTALE,
                        e => e,
                    })?;
                let entry = self.lookup_at(parent, dir.as_fd(), name)?;
                let (fh, backing) =
                    self.open_file(entry.id, fd, flags, caller_of(req), passthrough, |fd| {
                        reply.open_backing(fd)
                    });
                Ok((entry, fh, backing))
            },
            |_| 0,
        );
        match res {
            Ok((entry, fh, backing)) => {
                let attr = self.attr(entry.id, &entry.st);
                let (_, entry_ttl) = self.ttls(|| self.inodes.path(entry.id));
                match backing {
                    Some(b) => reply.created_passthrough(
                        &entry_ttl,
                        &attr,
                        Generation(entry.generation),
                        FileHandle(fh),
                        FopenFlags::empty(),
                        &b,
                    ),
                    None => reply.created(
                        &entry_ttl,
                        &attr,
                        Generation(entry.generation),
                        FileHandle(fh),
                        served_open_flags(flags),
                    ),
                }
            }
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }

    fn read(
        &self,
        req: &fuser::Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let file = match self.file(fh) {
            Ok(f) => f,
            Err(e) => return reply.error(Errno::from_i32(e)),
        };
        READ_BUF.with_borrow_mut(|buf| {
            // Grow only: zero-filling the whole buffer on every read costs more than the read.
            if buf.len() < size as usize {
                buf.resize(size as usize, 0);
            }
            let buf = &mut buf[..size as usize];
            let res = self.filtered(
                req,
                Op::Read,
                self.data_path(&file),
                |r| {
                    r.offset = Some(offset);
                    r.size = Some(size as u64);
                },
                || {
                    let mut done = 0;
                    while done < buf.len() {
                        match rustix::io::pread(&file.fd, &mut buf[done..], offset + done as u64) {
                            Ok(0) => break,
                            Ok(n) => done += n,
                            Err(rustix::io::Errno::INTR) => continue,
                            Err(e) => return Err(errno_of(e)),
                        }
                    }
                    Ok(done)
                },
                |n| *n as u64,
            );
            match res {
                Ok(n) => reply.data(&buf[..n]),
                Err(e) => reply.error(Errno::from_i32(e)),
            }
        });
    }

    fn write(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        wf: WriteFlags,
        flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let file = match self.file(fh) {
            Ok(f) => f,
            Err(e) => return reply.error(Errno::from_i32(e)),
        };
        let res = self.filtered(
            req,
            Op::Write,
            self.data_path(&file),
            |r| {
                r.offset = Some(offset);
                r.size = Some(data.len() as u64);
                if wf.contains(WriteFlags::FUSE_WRITE_CACHE) {
                    r.caller = file.opener;
                }
            },
            || {
                if wf.contains(WriteFlags::FUSE_WRITE_CACHE) {
                    // The write-back of a shared mapping comes as root: its opener's limits.
                    sys::act_for(file.opener.uid);
                }
                let sync = if !write_must_sync(file.direct, flags.0) {
                    ReadWriteFlags::empty()
                } else if flags.0 & libc::O_SYNC == libc::O_SYNC {
                    ReadWriteFlags::SYNC
                } else {
                    ReadWriteFlags::DSYNC
                };
                let mut done = 0;
                while done < data.len() {
                    let rest = [IoSlice::new(&data[done..])];
                    match rustix::io::pwritev2(&file.fd, &rest, offset + done as u64, sync) {
                        Ok(n) => done += n,
                        Err(rustix::io::Errno::INTR) => continue,
                        Err(e) if done == 0 => return Err(errno_of(e)),
                        Err(_) => break,
                    }
                }
                if wf.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID)
                    && kill_suid_sgid(file.fd.as_fd(), req)?
                {
                    // The kernel keeps the mode it has cached for the attribute timeout.
                    self.forget_attributes(ino);
                }
                Ok(done)
            },
            |n| *n as u64,
        );
        match res {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }

    fn flush(
        &self,
        req: &fuser::Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock: LockOwner,
        reply: ReplyEmpty,
    ) {
        if self.chain.is_empty() {
            // Nothing to learn from close(2) without filters: ENOSYS makes the kernel stop
            // sending FLUSH at all, one round trip less per close.
            return reply.error(Errno::ENOSYS);
        }
        let res = self.file(fh).and_then(|file| {
            self.filtered(
                req,
                Op::Flush,
                self.data_path(&file),
                |_| {},
                || {
                    // Like close(2) on the backing file, for file systems that act on close
                    // (NFS writes back, reports errors): close a duplicate.
                    drop(file.fd.try_clone().map_err(io_errno)?);
                    Ok(())
                },
                |_| 0,
            )
        });
        reply_empty(reply, res);
    }

    fn release(
        &self,
        req: &fuser::Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let Some(file) = self.files.lock().remove(&fh.0) else {
            return reply.error(Errno::EBADF);
        };
        let res = self.filtered(
            req,
            Op::Release,
            self.data_path(&file),
            |_| {},
            || Ok(()),
            |_| 0,
        );
        let is_pt = file.backing.is_some();
        let node = file.node;
        let decide = self.open_decisions.lock();
        drop(file);
        let gone = self.inodes.with_node(node, |n| {
            if is_pt {
                n.passthrough_opens -= 1
            } else {
                n.cached_opens -= 1
            }
            n.nlookup == 0 && n.passthrough_opens == 0 && n.cached_opens == 0
        });
        drop(decide);
        if gone == Some(true) {
            self.inodes.forget(node, 0);
        }
        reply_empty(reply, res);
    }

    fn fsync(
        &self,
        req: &fuser::Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let file = match self.file(fh) {
            Ok(f) => f,
            Err(e) => return reply.error(Errno::from_i32(e)),
        };
        let body_file = file.clone();
        let body = move || {
            if datasync {
                rustix::fs::fdatasync(&body_file.fd).map_err(errno_of)
            } else {
                rustix::fs::fsync(&body_file.fd).map_err(errno_of)
            }
        };
        self.offload(req, Op::Fsync, self.data_path(&file), body, reply);
    }

    fn opendir(&self, req: &fuser::Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let res = self.filtered(
            req,
            Op::Opendir,
            self.node_path(ino.0),
            |r| r.flags = Some(flags.0),
            || {
                let fd = self.inodes.fd(ino.0)?;
                let dir = rustix::fs::openat(
                    fd.as_fd(),
                    ".",
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(errno_of)?;
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                let state = Mutex::new(DirStream {
                    pos: 0,
                    pending: VecDeque::new(),
                    eof: false,
                });
                self.dirs.lock().insert(
                    fh,
                    Arc::new(OpenDir {
                        fd: dir,
                        node: ino.0,
                        state,
                    }),
                );
                Ok(fh)
            },
            |_| 0,
        );
        match res {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }

    fn readdir(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let res = self.dir(fh).and_then(|dir| {
            self.filtered(
                req,
                Op::Readdir,
                self.node_path(ino.0),
                |r| r.offset = Some(offset),
                || {
                    self.fill_dir(req, &dir, offset, |e| {
                        Ok(reply.add(
                            INodeNo(self.inodes.listed_ino(ino.0, e.name.as_bytes(), e.ino)),
                            e.next_offset as u64,
                            kind_from_dtype(e.d_type),
                            &e.name,
                        ))
                    })
                },
                |_| 0,
            )
        });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }

    fn readdirplus(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        // Entries sent are lookups the kernel holds: once some are in the reply, a failure
        // reading further (getdents on a network file system) ends the reply there, and
        // the kernel's next read meets it again; an error would drop counted entries.
        let added = Cell::new(false);
        let res = self.dir(fh).and_then(|dir| {
            self.filtered(
                req,
                Op::Readdir,
                self.node_path(ino.0),
                |r| r.offset = Some(offset),
                || {
                    self.fill_dir(req, &dir, offset, |e| {
                        let name = e.name.as_bytes();
                        if name == b"." || name == b".." {
                            let listed = self.inodes.listed_ino(ino.0, name, e.ino);
                            let mut attr = self.attr(listed, &sys::zeroed_stat());
                            attr.kind = FileType::Directory;
                            return Ok(reply.add(
                                INodeNo(listed),
                                e.next_offset as u64,
                                &e.name,
                                &Duration::ZERO,
                                &attr,
                                Generation(0),
                            ));
                        }
                        let entry = match self.lookup_at(ino.0, dir.fd.as_fd(), &e.name) {
                            Ok(found) => found,
                            Err(_) => return Ok(false), // vanished meanwhile: skip it
                        };
                        let attr = self.attr(entry.id, &entry.st);
                        let (_, ttl) = self.ttls(|| self.inodes.child_path(ino.0, &e.name));
                        let full = reply.add(
                            INodeNo(entry.id),
                            e.next_offset as u64,
                            &e.name,
                            &ttl,
                            &attr,
                            Generation(entry.generation),
                        );
                        if full {
                            self.inodes.forget(entry.id, 1); // not sent, so the kernel holds no reference
                        } else {
                            added.set(true);
                        }
                        Ok(full)
                    })
                },
                |_| 0,
            )
        });
        match res {
            Ok(()) => reply.ok(),
            Err(_) if added.get() => reply.ok(),
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }

    fn releasedir(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        // Closed whatever the filters say: the kernel has let go of the handle either
        // way (and sends its release without the caller's identity).
        let gone = self.dirs.lock().remove(&fh.0);
        let res = self.filtered(
            req,
            Op::Releasedir,
            self.node_path(ino.0),
            |_| {},
            || gone.map(drop).ok_or(libc::EBADF),
            |_| 0,
        );
        reply_empty(reply, res);
    }

    fn fsyncdir(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let dir = match self.dir(fh) {
            Ok(d) => d,
            Err(e) => return reply.error(Errno::from_i32(e)),
        };
        let body = move || {
            if datasync {
                rustix::fs::fdatasync(&dir.fd)
            } else {
                rustix::fs::fsync(&dir.fd)
            }
            .map_err(errno_of)
        };
        self.offload(req, Op::Fsyncdir, self.node_path(ino.0), body, reply);
    }

    fn statfs(&self, req: &fuser::Request, ino: INodeNo, reply: ReplyStatfs) {
        let res = self.filtered(
            req,
            Op::Statfs,
            self.node_path(ino.0),
            |_| {},
            || {
                let fd = self.inodes.fd(ino.0)?;
                rustix::fs::fstatvfs(fd.as_fd()).map_err(errno_of)
            },
            |_| 0,
        );
        match res {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }

    fn setxattr(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let res = self.filtered(
            req,
            Op::Setxattr,
            self.node_path(ino.0),
            |r| {
                r.xattr = Some(name.to_owned());
                r.size = Some(value.len() as u64);
            },
            || {
                let fd = self.inodes.fd(ino.0)?;
                let path = sys::proc_fd_path(fd.as_fd());
                rustix::fs::setxattr(
                    &path,
                    name,
                    value,
                    rustix::fs::XattrFlags::from_bits_retain(flags as u32),
                )
                .map_err(errno_of)?;
                // Setting an access ACL drops set-group-ID for a caller outside the file's
                // group (the kernel's posix_acl_update_mode); the daemon set it as root.
                if name.as_bytes() == b"system.posix_acl_access" {
                    let st = stat_fd(fd.as_fd())?;
                    if let Some(m) = crate::reply::acl_drops_setgid(st.st_mode, st.st_gid, req) {
                        rustix::fs::chmod(&path, Mode::from_raw_mode(m)).map_err(errno_of)?;
                        self.forget_attributes(ino);
                    }
                }
                Ok(())
            },
            |_| 0,
        );
        reply_empty(reply, res);
    }

    fn getxattr(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        name: &OsStr,
        size: u32,
        reply: ReplyXattr,
    ) {
        let res = self.filtered(
            req,
            Op::Getxattr,
            self.node_path(ino.0),
            |r| r.xattr = Some(name.to_owned()),
            || {
                let fd = self.inodes.fd(ino.0)?;
                get_xattr(&sys::proc_fd_path(fd.as_fd()), name)
            },
            |v| v.len() as u64,
        );
        reply_xattr(reply, size, res);
    }

    fn listxattr(&self, req: &fuser::Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let res = self.filtered(
            req,
            Op::Listxattr,
            self.node_path(ino.0),
            |_| {},
            || {
                let fd = self.inodes.fd(ino.0)?;
                list_xattr(&sys::proc_fd_path(fd.as_fd())).map(|l| crate::reply::listed_for(req, l))
            },
            |v| v.len() as u64,
        );
        reply_xattr(reply, size, res);
    }

    fn removexattr(&self, req: &fuser::Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let res = self.filtered(
            req,
            Op::Removexattr,
            self.node_path(ino.0),
            |r| r.xattr = Some(name.to_owned()),
            || {
                let fd = self.inodes.fd(ino.0)?;
                rustix::fs::removexattr(sys::proc_fd_path(fd.as_fd()), name).map_err(errno_of)
            },
            |_| 0,
        );
        reply_empty(reply, res);
    }

    fn access(&self, req: &fuser::Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        // With default_permissions the kernel has checked the mode bits and ACLs already;
        // this only gives filters their say and confirms the object still exists.
        let res = self.filtered(
            req,
            Op::Access,
            self.node_path(ino.0),
            |r| r.flags = Some(mask.bits()),
            || stat_fd(self.inodes.fd(ino.0)?.as_fd()).map(|_| ()),
            |_| 0,
        );
        reply_empty(reply, res);
    }

    fn fallocate(
        &self,
        req: &fuser::Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let res = self.file(fh).and_then(|file| {
            self.filtered(
                req,
                Op::Fallocate,
                self.data_path(&file),
                |r| {
                    r.offset = Some(offset);
                    r.size = Some(length);
                    r.flags = Some(mode);
                },
                || {
                    rustix::fs::fallocate(
                        &file.fd,
                        rustix::fs::FallocateFlags::from_bits_retain(mode as u32),
                        offset,
                        length,
                    )
                    .map_err(errno_of)
                },
                |_| 0,
            )
        });
        reply_empty(reply, res);
    }

    fn lseek(
        &self,
        req: &fuser::Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let res = self.file(fh).and_then(|file| {
            self.filtered(
                req,
                Op::Lseek,
                self.data_path(&file),
                |r| r.offset = Some(offset as u64),
                || {
                    let pos = match whence {
                        libc::SEEK_DATA => rustix::fs::SeekFrom::Data(offset as u64),
                        libc::SEEK_HOLE => rustix::fs::SeekFrom::Hole(offset as u64),
                        libc::SEEK_SET => rustix::fs::SeekFrom::Start(offset as u64),
                        libc::SEEK_END => rustix::fs::SeekFrom::End(offset),
                        _ => return Err(libc::EINVAL),
                    };
                    // pread/pwrite never move the shared position, so seeking our descriptor is safe.
                    rustix::fs::seek(&file.fd, pos).map_err(errno_of)
                },
                |_| 0,
            )
        });
        match res {
            Ok(pos) => reply.offset(pos as i64),
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }

    fn copy_file_range(
        &self,
        req: &fuser::Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let (src, dst) = match self.file(fh_in).and_then(|a| Ok((a, self.file(fh_out)?))) {
            Ok(files) => files,
            Err(e) => return reply.error(Errno::from_i32(e)),
        };
        // It waits on the disk as long as it copies (a GB takes seconds).
        self.offload_with(
            req,
            Op::CopyFileRange,
            {
                let (from, to) = (src.node, dst.node);
                move || (self.inodes.path(from), Some(self.inodes.path(to)))
            },
            |r| {
                r.offset = Some(offset_in);
                r.size = Some(len);
            },
            move || {
                let (mut oi, mut oo) = (offset_in, offset_out);
                rustix::fs::copy_file_range(
                    &src.fd,
                    Some(&mut oi),
                    &dst.fd,
                    Some(&mut oo),
                    len.min(u32::MAX as u64 & !0xfff) as usize,
                )
                .map_err(errno_of)
            },
            |n| *n as u64,
            move |res| match res {
                Ok(n) => reply.written(n as u32),
                Err(e) => reply.error(Errno::from_i32(e)),
            },
        );
    }
}

/// Opens the directory `name` in `at` for listing, not following a symlink.
fn open_dir(at: BorrowedFd<'_>, name: &OsStr) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(
        at,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// How the kernel should handle an open the daemon serves (an isolated file, a file a
/// filter sees the data of): directly for O_DIRECT and for write-only opens, through its
/// page cache otherwise (the caller adds FOPEN_KEEP_CACHE where it keeps the cache
/// right across opens). A write-only open cannot read or be mapped, so the cache serves
/// it nothing: through it each write was first copied into pages the kernel kept (cp,
/// dd, tar -x and compilers write this way). An open that reads too keeps the cache,
/// which a program rereading the file (a database) needs.
pub fn served_open_flags(flags: i32) -> FopenFlags {
    if served_directly(flags) {
        FopenFlags::FOPEN_DIRECT_IO
    } else {
        FopenFlags::empty()
    }
}

/// Whether [`served_open_flags`] sends an open around the page cache.
pub fn served_directly(flags: i32) -> bool {
    flags & libc::O_DIRECT != 0 || flags & libc::O_ACCMODE == libc::O_WRONLY
}

/// Whether the daemon itself must make a write durable before answering it. The kernel
/// marks a write that is to be synchronous (an O_DSYNC or O_SYNC open, or a per-write
/// RWF_DSYNC or RWF_SYNC) with O_DSYNC in its flags. Through the page cache it then sends
/// an FSYNC of its own after the write; on the direct path it sends nothing more, so
/// the daemon syncs.
pub fn write_must_sync(direct: bool, write_flags: i32) -> bool {
    direct && write_flags & libc::O_DSYNC != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_before_1970_undo_fusers_decoding() {
        // The kernel sends -1.5 s as (sec -2, nsec 500_000_000); fuser hands it to us as
        // epoch - 2.5 s.
        let from_fuser = UNIX_EPOCH - Duration::new(2, 500_000_000);
        let ts = timespec(Some(TimeOrNow::SpecificTime(from_fuser)));
        assert_eq!((ts.tv_sec, ts.tv_nsec), (-2, 500_000_000));
        let ts = timespec(Some(TimeOrNow::SpecificTime(
            UNIX_EPOCH + Duration::new(3, 7),
        )));
        assert_eq!((ts.tv_sec, ts.tv_nsec), (3, 7));
        assert_eq!(timespec(None).tv_nsec, libc::UTIME_OMIT);
        assert_eq!(timespec(Some(TimeOrNow::Now)).tv_nsec, libc::UTIME_NOW);
        // And attributes going back: (sec -2, nsec 5e8) is -1.5 s.
        assert_eq!(
            time_of(-2, 500_000_000),
            UNIX_EPOCH - Duration::from_millis(1500)
        );
    }

    #[test]
    fn reopen_never_follows_or_creates() {
        let f = reopen_flags(
            libc::O_RDWR
                | libc::O_APPEND
                | libc::O_CREAT
                | libc::O_EXCL
                | libc::O_TRUNC
                | libc::O_NOFOLLOW
                | libc::O_DIRECT,
            false,
        );
        assert_eq!(f, OFlags::RDWR | OFlags::CLOEXEC);
        assert!(reopen_flags(libc::O_WRONLY | libc::O_DIRECT, true).contains(OFlags::DIRECT));
    }
}
