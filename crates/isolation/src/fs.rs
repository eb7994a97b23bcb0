//! The FUSE front end of an isolated mount: every request is answered from the [`View`],
//! every change goes through it into the journal. Files that are unchanged and opened
//! only for reading use the kernel's FUSE passthrough to the backing file (reads never
//! enter the daemon); a file open that way cannot be opened for writing at the same time
//! (ETXTBSY), since the kernel cannot switch an open file away from passthrough. As the
//! kernel sends RELEASE after close(2) has returned, a writer first waits a moment for
//! passthrough opens that are already closed to be released.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, TimeOrNow, WriteFlags,
};
use parking_lot::{Condvar, Mutex, MutexGuard};

use interpose_fs::filter::{being_killed, caller_of, Caller, Chain, Op, Request, Verdict};
use interpose_fs::reply::{check_name, reply_empty, reply_xattr};

use crate::change::{NewKind, RawPath, Time};
use crate::view::{self, Attr, Mode, Res, View, ROOT};

/// Options of an isolated mount.
#[derive(Clone, Debug)]
pub struct Options {
    pub ttl: Duration,
    pub passthrough: bool,
    /// The filters every request passes through, with the view's paths, before it
    /// reaches the view (see `interpose_fs::filter`).
    pub chain: Arc<Chain>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            ttl: Duration::from_secs(1),
            passthrough: true,
            chain: Arc::default(),
        }
    }
}

struct OpenFile {
    node: u64,
    write: bool,
    /// Who opened it: a shared mapping's writeback, which the kernel sends as root,
    /// counts as theirs for the filters.
    opener: Caller,
    /// Opened by execve (a running program's file: the kernel lets no one write it).
    exec: bool,
    /// Set for passthrough opens; keeps the kernel's registration alive.
    backing: Option<Arc<BackingId>>,
    /// Served around the kernel's page cache ([`interpose_fs::served_directly`]).
    direct: bool,
}

struct OpenDir {
    entries: Vec<view::DirEntry>,
    /// Taken by opendir and not read yet: the first read from the start uses it as is;
    /// any later one (rewinddir) takes the listing again, as POSIX requires.
    fresh: AtomicBool,
}

/// State shared by the FUSE threads and the control socket.
pub struct Shared {
    pub view: Mutex<View>,
    pub notifier: Mutex<Option<fuser::Notifier>>,
    /// Signalled when a passthrough open is released (see [`IsolatedFs::await_passthrough_closed`]).
    passthrough_released: Condvar,
    files: Mutex<HashMap<u64, Arc<OpenFile>>>,
    /// The backing file registered for each node open with passthrough: the kernel takes
    /// one backing file per inode, so every passthrough open of the node shares it.
    /// Whether it is open for writing too (a node outside the isolated paths).
    backing_ids: Mutex<HashMap<u64, (Weak<BackingId>, bool)>>,
    dirs: Mutex<HashMap<u64, Arc<OpenDir>>>,
    next_fh: AtomicU64,
    passthrough: AtomicBool,
    opts: Options,
}

impl Shared {
    pub fn new(mut view: View, opts: Options) -> Arc<Shared> {
        view.note_lookups = !opts.chain.is_empty();
        Arc::new(Shared {
            view: Mutex::new(view),
            notifier: Mutex::new(None),
            passthrough_released: Condvar::new(),
            files: Mutex::new(HashMap::new()),
            backing_ids: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            passthrough: AtomicBool::new(false),
            opts,
        })
    }
}

pub struct IsolatedFs(pub Arc<Shared>);

/// The kernel's FMODE_EXEC, which it sends in the flags of the open execve makes.
const FMODE_EXEC: i32 = 0x20;

/// How long a writer waits for passthrough opens to be released before ETXTBSY. Releases
/// of files already closed arrive within milliseconds; this only bounds the wait behind a
/// reader that really keeps the file open.
const PASSTHROUGH_RELEASE_WAIT: Duration = Duration::from_secs(2);

/// The path filters see for node `id`: the view's, from the mount's root (of a hard-linked
/// file, the name the kernel last looked up); for a file open after it lost its last
/// name, that name, as on the plain mount; `/?` for a node the view knows nothing of.
fn filter_path(v: &View, id: u64) -> PathBuf {
    match v.path_looked_up(id) {
        Some(p) => Path::new("/").join(p),
        None => match v.node(id).ok().and_then(|n| n.gone_as.clone()) {
            Some(p) => p,
            None => PathBuf::from("/?"),
        },
    }
}

/// The filters' paths of a request about node `id`.
fn at_node(id: u64) -> impl FnOnce(&View) -> (PathBuf, Option<PathBuf>) {
    move |v| (filter_path(v, id), None)
}

/// The filters' paths of a request about `name` in directory `parent`.
fn at_child(parent: u64, name: &OsStr) -> impl FnOnce(&View) -> (PathBuf, Option<PathBuf>) + '_ {
    move |v| (filter_path(v, parent).join(name), None)
}

/// After a name went (unlinked, or renamed over): if `victim` (the node that had it, and
/// the path) had its last name there, filters go on judging it by that path.
fn note_gone(v: &mut View, victim: Option<(u64, PathBuf)>) {
    let Some((id, gone)) = victim else { return };
    if v.path_of(id).is_none() {
        if let Ok(n) = v.node_mut(id) {
            n.gone_as = Some(gone);
        }
    }
}

fn systime((s, n): Time) -> SystemTime {
    interpose_fs::reply::system_time(s, n)
}

fn time_of(t: TimeOrNow) -> Time {
    match t {
        TimeOrNow::Now => view::now(),
        TimeOrNow::SpecificTime(t) => interpose_fs::reply::kernel_time(t),
    }
}

fn file_type(mode: u32) -> FileType {
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

fn fattr(id: u64, a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(id),
        size: a.size,
        blocks: a.blocks,
        atime: systime(a.atime),
        mtime: systime(a.mtime),
        ctime: systime(a.ctime),
        crtime: UNIX_EPOCH,
        kind: file_type(a.mode),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev as u32,
        blksize: 4096,
        flags: 0,
    }
}

fn err(reply_err: i32) -> Errno {
    Errno::from_i32(reply_err)
}

/// Drops the set-ID bits a write or truncation by the caller of `req` without CAP_FSETID
/// drops (see [`interpose_fs::reply::without_setid_for`]), recorded as a change like any
/// chmod; whether the mode changed.
fn kill_suid_sgid(v: &mut View, id: u64, req: &fuser::Request) -> Res<bool> {
    let a = v.attr(id)?;
    if a.is_dir() {
        return Ok(false);
    }
    let m = interpose_fs::reply::without_setid_for(a.mode & 0o7777, a.gid, req);
    if m == a.mode & 0o7777 {
        return Ok(false);
    }
    v.set_attr(id, Some(m), None, None, None, None)?;
    Ok(true)
}

impl IsolatedFs {
    fn chain(&self) -> &Arc<Chain> {
        &self.0.opts.chain
    }

    /// Runs `body` with the filter chain around it; `paths` are taken from the view
    /// (under its lock, released before `body`). Without filters, no path is built.
    fn filtered<T>(
        &self,
        req: &fuser::Request,
        op: Op,
        paths: impl FnOnce(&View) -> (PathBuf, Option<PathBuf>),
        detail: impl FnOnce(&mut Request),
        body: impl FnOnce() -> Res<T>,
        bytes: impl FnOnce(&T) -> u64,
    ) -> Res<T> {
        if !matches!(op, Op::Release | Op::Releasedir) {
            self.wait_for_view(req)?;
        }
        let request = || {
            let mut r = Request::of(req, op, paths(&self.0.view.lock()));
            detail(&mut r);
            r
        };
        self.chain().around(request, body, bytes)
    }

    /// Waits until the view is free (a mounted commit or discard holds it as long as it
    /// runs), unless the caller is killed meanwhile: then EINTR, and nothing done. The
    /// kernel waits for the answer to a request the daemon has taken even for SIGKILL, so
    /// a program would live until the commit ended; one that only got a signal it
    /// handles waits on, as it would for a disk. (A commit that starts after this gate
    /// can still hold the operation up at its next lock.) Releases never come here: their
    /// file handles must always be closed.
    fn wait_for_view(&self, req: &fuser::Request) -> Res<()> {
        /// How often a waiting request looks whether its caller is being killed.
        const POLL: Duration = Duration::from_millis(20);
        if self.0.view.try_lock().is_some() {
            return Ok(());
        }
        loop {
            if self.0.view.try_lock_for(POLL).is_some() {
                return Ok(());
            }
            if fuser::was_interrupted(req.unique()) && being_killed(req.pid()) {
                return Err(libc::EINTR);
            }
        }
    }

    /// [`IsolatedFs::filtered`] of an operation on node `id` that moves no bytes.
    fn on_node<T>(
        &self,
        req: &fuser::Request,
        op: Op,
        id: u64,
        body: impl FnOnce() -> Res<T>,
    ) -> Res<T> {
        self.filtered(req, op, at_node(id), |_| {}, body, |_| 0)
    }

    /// How long the kernel may keep the name and attributes at `path`: not at all where a
    /// filter's answer depends on the caller (each access is asked again).
    fn ttl(&self, path: impl FnOnce() -> PathBuf) -> Duration {
        let chain = self.chain();
        if chain.may_vary_by_caller() && chain.varies_by_caller(&path()) {
            Duration::ZERO
        } else {
            self.0.opts.ttl
        }
    }

    fn ttl_of(&self, id: u64) -> Duration {
        self.ttl(|| filter_path(&self.0.view.lock(), id))
    }

    /// Which names in directory `dir` the filters hide from the caller of `req` (a lookup
    /// refused with ENOENT): left out of its listings.
    fn hidden_in(&self, req: &fuser::Request, dir: u64) -> impl Fn(&OsStr) -> bool + '_ {
        let base = (!self.chain().is_empty()).then(|| filter_path(&self.0.view.lock(), dir));
        let who = caller_of(req);
        move |name| {
            let dots = name == "." || name == "..";
            !dots
                && base.as_ref().is_some_and(|base| {
                    let r = Request::new(Op::Lookup, base.join(name), who);
                    self.chain().before(&r) == Verdict::Deny(libc::ENOENT)
                })
        }
    }

    /// For a rename of the object `id` from `from` to `to`: if it is a directory and a
    /// filter guards paths below it ([`Chain::guards_below`]), asks the filters about the
    /// rename of every object below it, and gives the first refusal.
    fn check_below(&self, who: Caller, flags: u32, id: u64, from: &Path, to: &Path) -> Res<()> {
        // Each object below moves one way only, also in an exchange (whose other side is
        // checked on its own).
        let flags = (flags & !libc::RENAME_EXCHANGE) as i32;
        let rename = |from: &Path, to: &Path| {
            let mut r = Request::new(Op::Rename, from, who);
            r.path2 = Some(to.to_path_buf());
            r.flags = Some(flags);
            r
        };
        if !self.chain().guards_below(from, &rename(from, to)) {
            return Ok(());
        }
        // Depth first, one directory under the view's lock at a time (a big tree must not
        // hold every other request up), asked without it. A tree deeper than this is
        // refused rather than moved unchecked.
        const MAX_DEPTH: usize = 512;
        let mut todo = vec![(id, PathBuf::new(), 0)];
        let mut res = Ok(());
        while let Some((dir, rel, depth)) = todo.pop() {
            let listed = {
                let mut v = self.0.view.lock();
                // A directory met earlier in the walk that the view dropped since (nothing
                // held it) is found again by its path.
                let dir = match v.node(dir) {
                    Err(_) if dir != id => from
                        .strip_prefix("/")
                        .map_err(|_| libc::ENOENT)
                        .and_then(|top| v.resolve(&top.join(&rel)))
                        .unwrap_or(dir),
                    _ => dir,
                };
                let listed = match v.node(dir) {
                    Ok(n) if n.attr.is_dir() => v.subdirs_of(dir),
                    Ok(_) => Ok(Vec::new()),
                    Err(e) => Err(e),
                };
                if dir != id {
                    v.maybe_drop(dir);
                }
                listed
            };
            let step = listed.and_then(|entries| {
                for (name, sub) in entries {
                    let rel = rel.join(&name);
                    let r = rename(&from.join(&rel), &to.join(&rel));
                    if let Verdict::Deny(errno) = self.chain().before(&r) {
                        return Err(errno);
                    }
                    if let Some(sub) = sub {
                        if depth + 1 >= MAX_DEPTH {
                            return Err(libc::ELOOP);
                        }
                        todo.push((sub, rel, depth + 1));
                    }
                }
                Ok(())
            });
            if let Err(e) = step {
                res = Err(e);
                break;
            }
        }
        // Directories met for the walk and not walked go again.
        let mut v = self.0.view.lock();
        for (dir, ..) in todo {
            v.maybe_drop(dir);
        }
        res
    }

    /// With filters, the node `name` in `parent` names and that path, before the name goes
    /// (see [`note_gone`]).
    fn victim(&self, v: &mut View, parent: u64, name: &OsStr) -> Option<(u64, PathBuf)> {
        if self.chain().is_empty() {
            return None;
        }
        let id = v.child(parent, name).ok()?;
        Some((id, filter_path(v, parent).join(name)))
    }

    /// Makes the kernel fetch the attributes of node `ino` again (it caches them for the
    /// attribute timeout), after a change it did not ask for.
    fn forget_attributes(&self, ino: INodeNo) {
        if let Some(n) = self.0.notifier.lock().clone() {
            // Offset -1: the attributes only, not the cached data.
            let _ = n.inval_inode(ino, -1, 0);
        }
    }

    /// Directory `ino`'s entries as the view has them now, `.` and `..` first. (Names
    /// the filters hide are left out by each read, for its caller: a descriptor may pass
    /// to another user.)
    fn listing(&self, ino: u64) -> Res<Vec<view::DirEntry>> {
        let mut v = self.0.view.lock();
        let mut entries = v.readdir(ino)?;
        let parent = if ino == ROOT {
            ROOT
        } else {
            v.node(ino)?.links.first().map(|l| l.0).unwrap_or(ROOT)
        };
        let dir = |name: &str, ino| view::DirEntry {
            name: name.into(),
            ino,
            kind: libc::S_IFDIR,
        };
        entries.splice(0..0, [dir(".", ino), dir("..", parent)]);
        Ok(entries)
    }

    /// The listing a read of open directory `fh` works on: a read from the start after
    /// the first one (rewinddir) takes it again, so that it shows what was made since.
    fn open_dir(&self, fh: u64, ino: u64, offset: u64) -> Res<Arc<OpenDir>> {
        let d = self.0.dirs.lock().get(&fh).cloned().ok_or(libc::EBADF)?;
        if offset != 0 || d.fresh.swap(false, Ordering::Relaxed) {
            return Ok(d);
        }
        let d = Arc::new(OpenDir {
            entries: self.listing(ino)?,
            fresh: AtomicBool::new(false),
        });
        self.0.dirs.lock().insert(fh, d.clone());
        Ok(d)
    }

    fn entry(&self, reply: ReplyEntry, res: Res<(u64, Attr)>) {
        match res {
            Ok((id, a)) => {
                let ttl = self.ttl_of(id);
                reply.entry_with_ttls(&ttl, &ttl, &fattr(id, &a), Generation(0))
            }
            Err(e) => reply.error(err(e)),
        }
    }

    /// Makes `name` in `parent`. The filters see it as `op` with the mode the kernel sent
    /// when it is not part of a create, whose filtering covers the open too.
    #[allow(clippy::too_many_arguments)]
    fn make(
        &self,
        req: &fuser::Request,
        op: Option<(Op, u32)>,
        parent: INodeNo,
        name: &OsStr,
        kind: NewKind,
        mode: u32,
        umask: u32,
    ) -> Res<(u64, Attr)> {
        let target = match &kind {
            NewKind::Symlink { target } => Some(target.to_path_buf()),
            _ => None,
        };
        let body = || {
            check_name(name)?;
            let mut v = self.0.view.lock();
            let id = v.create(parent.0, name, kind, mode, umask, req.uid(), req.gid())?;
            // The lookup the create counted is not the kernel's if the reply is an error.
            v.attr(id).map(|a| (id, a)).inspect_err(|_| v.forget(id, 1))
        };
        let Some((op, sent_mode)) = op else {
            return body();
        };
        self.filtered(
            req,
            op,
            |v| (filter_path(v, parent.0).join(name), target),
            |r| {
                if op != Op::Symlink {
                    r.mode = Some(sent_mode);
                }
            },
            body,
            |_| 0,
        )
    }

    fn file(&self, fh: FileHandle) -> Res<Arc<OpenFile>> {
        self.0.files.lock().get(&fh.0).cloned().ok_or(libc::EBADF)
    }

    /// Waits until `id` has no passthrough open, or ETXTBSY after [`PASSTHROUGH_RELEASE_WAIT`].
    /// close(2) returns before the kernel sends RELEASE, so a program that reads a file,
    /// closes it and then writes it would otherwise race its own release.
    fn await_passthrough_closed(&self, v: &mut MutexGuard<'_, View>, id: u64) -> Res<()> {
        let deadline = Instant::now() + PASSTHROUGH_RELEASE_WAIT;
        while v.node(id)?.passthrough_opens > 0 {
            if self
                .0
                .passthrough_released
                .wait_until(v, deadline)
                .timed_out()
            {
                if v.node(id)?.passthrough_opens > 0 {
                    // The kernel would fail a write to it with EIO; say why instead.
                    return Err(libc::ETXTBSY);
                }
                break;
            }
        }
        Ok(())
    }

    /// With `--isolate-path`, a file a program writes through passthrough (opened outside
    /// the isolated paths) must not enter them while that descriptor is open: its writes
    /// would go on reaching BACKING unrecorded. Waits for such writers as an open for
    /// writing waits for passthrough readers, then ETXTBSY.
    fn await_direct_writers(
        &self,
        v: &mut MutexGuard<'_, View>,
        id: u64,
        to_parent: u64,
        to_name: &OsStr,
    ) -> Res<()> {
        let deadline = Instant::now() + PASSTHROUGH_RELEASE_WAIT;
        loop {
            let writing = v.direct_writers_entering(id, to_parent, to_name);
            if writing.is_empty() {
                return Ok(());
            }
            if self
                .0
                .passthrough_released
                .wait_until(v, deadline)
                .timed_out()
                && !v.direct_writers_entering(id, to_parent, to_name).is_empty()
            {
                return Err(libc::ETXTBSY);
            }
        }
    }

    /// How the kernel handles an open the daemon serves ([`interpose_fs::served_open_flags`]),
    /// its cache kept between opens (the daemon tells it when a commit or discard changes
    /// the file).
    fn open_flags(flags: i32) -> FopenFlags {
        let direct = interpose_fs::served_open_flags(flags);
        if direct.is_empty() {
            FopenFlags::FOPEN_KEEP_CACHE
        } else {
            direct
        }
    }

    /// The truncation of an open with O_TRUNC, by the caller of `req`; `kill_suidgid`:
    /// the kernel's FUSE_OPEN_KILL_SUIDGID (the caller has no CAP_FSETID).
    fn truncate_on_open(
        &self,
        v: &mut MutexGuard<'_, View>,
        id: u64,
        req: &fuser::Request,
        kill_suidgid: bool,
    ) -> Res<()> {
        let setid = v.attr(id)?.mode & (libc::S_ISUID | libc::S_ISGID) != 0;
        let kills = setid && kill_suidgid;
        if kills {
            v.reserve(view::RESERVE_FOR_SEVERAL)?;
        }
        v.truncate(id, 0)?;
        // (The kernel learns the size from the open, not the mode.)
        if kills && kill_suid_sgid(v, id, req)? {
            self.forget_attributes(INodeNo(id));
        }
        Ok(())
    }

    /// Registers an open; decides passthrough. `truncate_for`: the open truncates the file
    /// (O_TRUNC of an existing file, which FUSE_ATOMIC_O_TRUNC leaves to the open), for
    /// this caller, dropping set-ID bits or not (see [`IsolatedFs::truncate_on_open`]).
    /// `served`: a filter wants to see the data, so the open is not passed through unless
    /// the kernel already holds the file open that way (it then requires every open of it
    /// to share that registration).
    fn open_node(
        &self,
        id: u64,
        opener: Caller,
        flags: i32,
        served: bool,
        truncate_for: Option<(&fuser::Request, bool)>,
        reply_backing: impl FnOnce(&File) -> std::io::Result<BackingId>,
    ) -> Res<(u64, Option<Arc<BackingId>>)> {
        let write = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let mut v = self.0.view.lock();
        let truncate_for = truncate_for.filter(|_| v.node(id).is_ok_and(|n| n.attr.is_file()));
        let passthrough = self.0.passthrough.load(Ordering::Relaxed);
        // Outside the isolated paths nothing is recorded: writers may be passed through
        // too, sharing a backing file open for writing with the readers. So may a file
        // written that way that lost its name since (reopened through /proc/self/fd),
        // whose writes already go to that file.
        let nameless_writer = v
            .node(id)
            .is_ok_and(|n| n.detached && n.passthrough_file.is_some());
        let direct = passthrough && (v.is_direct(id) || nameless_writer);
        let shared = |ids: &HashMap<u64, (Weak<BackingId>, bool)>| {
            let (b, writable) = ids.get(&id)?;
            Some((b.upgrade()?, *writable))
        };
        if truncate_for.is_some() && !write {
            // The kernel refuses a running program's file to writers, but checks an open
            // for reading that truncates only after the open: here, before the truncation
            // (and before waiting for passthrough opens, such as the program's own).
            let running = self.0.files.lock().values().any(|f| f.node == id && f.exec);
            if running {
                return Err(libc::ETXTBSY);
            }
        }
        if write || truncate_for.is_some() {
            if v.node(id)?.attr.is_dir() {
                return Err(libc::EISDIR);
            }
            let read_only = shared(&self.0.backing_ids.lock()).is_some_and(|(_, w)| !w);
            if !direct || read_only {
                self.await_passthrough_closed(&mut v, id)?;
            }
        }
        if let Some((req, kill_suidgid)) = truncate_for {
            // Before passthrough is decided: the truncated file is the view's (even opened
            // for reading only, as O_RDONLY|O_TRUNC is), so its reads come from the daemon.
            self.truncate_on_open(&mut v, id, req, kill_suidgid)?;
        }
        let backing = v.backing.clone();
        let n = v.node_mut(id)?;
        let cached_opens = n.opens - n.passthrough_opens;
        let mut bid = None;
        // Its contents are BACKING's (`data` is None): other changes (a mode, a link, a
        // rename) leave reads to the backing file. A node the kernel holds open through
        // passthrough must not get an open served by the daemon, which the kernel fails
        // with EIO, and a change of its attributes does not close those opens.
        if passthrough
            && n.attr.is_file()
            && n.data.is_none()
            && cached_opens == 0
            && (direct || (!write && (n.writers == 0 || n.passthrough_file.is_some())))
        {
            let mut ids = self.0.backing_ids.lock();
            match (shared(&ids), &n.origin) {
                (Some((b, writable)), _) if writable || !write => bid = Some(b),
                // Not by the name of a detached node: another object's now, or nothing's.
                (None, Some(origin)) if !n.detached && !served => {
                    match register_backing(&backing, origin, direct, write, reply_backing) {
                        Ok((b, f, writable)) => {
                            let b = Arc::new(b);
                            ids.insert(id, (Arc::downgrade(&b), writable));
                            bid = Some(b);
                            if writable {
                                let f = Arc::new(f);
                                n.origin_file.get_or_insert_with(|| f.clone());
                                n.passthrough_file = Some(f);
                            }
                        }
                        Err(e) => {
                            tracing::debug!("passthrough refused, serving from the daemon: {e}")
                        }
                    }
                }
                _ => {}
            }
        }
        n.opens += 1;
        if write {
            n.writers += 1;
        }
        if bid.is_some() {
            n.passthrough_opens += 1;
        }
        let needs_origin = bid.is_none()
            && n.attr.is_file()
            && n.origin.is_some()
            && !n.detached
            && n.origin_file.is_none()
            && n.data.as_ref().is_none_or(|d| d.origin_limit > 0);
        if needs_origin {
            // Opened now, kept while open: out of descriptors, the open fails (EMFILE),
            // where programs expect it, not a read or write later.
            if let Err(e @ (libc::EMFILE | libc::ENFILE)) = v.origin_file_pub(id) {
                let n = v.node_mut(id)?;
                n.opens -= 1;
                if write {
                    n.writers -= 1;
                }
                return Err(e);
            }
        }
        let fh = self.0.next_fh.fetch_add(1, Ordering::Relaxed);
        self.0.files.lock().insert(
            fh,
            Arc::new(OpenFile {
                node: id,
                write,
                opener,
                exec: flags & FMODE_EXEC != 0,
                direct: bid.is_none() && interpose_fs::served_directly(flags),
                backing: bid.clone(),
            }),
        );
        Ok((fh, bid))
    }

    /// Forgets open `fh`: counts, passthrough registrations, the node if now unused.
    fn release_open(&self, fh: FileHandle) -> Res<()> {
        let f = self.0.files.lock().remove(&fh.0).ok_or(libc::EBADF)?;
        let pt = f.backing.is_some();
        let mut v = self.0.view.lock();
        if let Ok(n) = v.node_mut(f.node) {
            n.opens = n.opens.saturating_sub(1);
            if f.write {
                n.writers = n.writers.saturating_sub(1);
            }
            let mut last_passthrough = false;
            if pt {
                n.passthrough_opens = n.passthrough_opens.saturating_sub(1);
                last_passthrough = n.passthrough_opens == 0;
                if last_passthrough {
                    self.0.backing_ids.lock().remove(&f.node);
                }
                self.0.passthrough_released.notify_all();
            }
            // A detached file is reached through nothing else, should the kernel open it
            // again before it forgets it (an open racing the loss of its last name).
            if n.opens == 0 && !n.detached {
                n.origin_file = None;
            }
            if last_passthrough && n.passthrough_file.is_some() {
                // The size and times the kernel left in that file, for a node whose
                // attributes the view holds (see `Node::passthrough_file`); then it is the
                // view's again.
                let _ = v.attr(f.node);
                if let Ok(n) = v.node_mut(f.node) {
                    n.passthrough_file = None;
                }
            }
        } else if v.release_stale(f.node) && pt {
            // No open of a stale number comes again to share the registration.
            self.0.backing_ids.lock().remove(&f.node);
        }
        v.maybe_drop(f.node);
        Ok(())
    }
}

/// Opens the backing file at `origin` and registers it for passthrough; the file, and
/// whether it is open for writing too. Outside the isolated paths (`direct`) it is opened
/// for reading and writing, to be shared by readers and writers, falling back to reading
/// only for a reader (a running program's file cannot be opened for writing).
fn register_backing(
    backing: &crate::backing::Backing,
    origin: &Path,
    direct: bool,
    write: bool,
    reply_backing: impl FnOnce(&File) -> std::io::Result<BackingId>,
) -> std::io::Result<(BackingId, File, bool)> {
    let (f, writable) = if !direct {
        (backing.open_read(origin)?, false)
    } else {
        match backing.open_rw(origin) {
            Ok(f) => (f, true),
            Err(e) if write => return Err(e),
            Err(_) => (backing.open_read(origin)?, false),
        }
    };
    Ok((reply_backing(&f)?, f, writable))
}

impl Filesystem for IsolatedFs {
    fn init(&mut self, _req: &fuser::Request, config: &mut KernelConfig) -> std::io::Result<()> {
        for flag in [
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_PARALLEL_DIROPS,
            // Listings carry the entries' attributes when the kernel expects them to be
            // used (ls -l, du, rm -rf): one request per batch instead of one per entry.
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            // No security.capability lookup before every write; set-ID bits are ours.
            InitFlags::FUSE_HANDLE_KILLPRIV_V2,
            // The kernel checks ACLs; the view keeps the mode and the ACL mask in step.
            InitFlags::FUSE_POSIX_ACL,
            // Modes come unmasked with the caller's umask: a default ACL replaces the umask.
            InitFlags::FUSE_DONT_MASK,
            // O_TRUNC comes with the open: one request instead of two, and an open for
            // reading that truncates is not passed through to the untruncated file.
            InitFlags::FUSE_ATOMIC_O_TRUNC,
        ] {
            // A symlink the filters may refuse to some callers is read each time.
            if flag == InitFlags::FUSE_CACHE_SYMLINKS && self.chain().may_vary_by_caller() {
                continue;
            }
            let _ = config.add_capabilities(flag);
        }
        // --write-through records every write, so a file open for writing is served by the
        // daemon, and the kernel lets no other open of it be passed through meanwhile:
        // readers passed through would make writers wait (ETXTBSY). So no passthrough.
        let write_through = matches!(self.0.view.lock().mode, Mode::WriteThrough);
        if self.0.opts.passthrough && !write_through {
            let ok = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            self.0.passthrough.store(ok, Ordering::Relaxed);
        }
        let _ = config.set_max_write(1 << 20);
        Ok(())
    }

    fn destroy(&mut self) {
        let mut v = self.0.view.lock();
        if let Err(e) = v.sync() {
            tracing::error!("syncing the journal at unmount: errno {e}");
        }
        v.journal.close();
        drop(v);
        self.chain().close();
    }

    fn lookup(&self, req: &fuser::Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let res = self.filtered(
            req,
            Op::Lookup,
            at_child(parent.0, name),
            |_| {},
            || {
                check_name(name)?;
                self.0.view.lock().lookup_attr(parent.0, name)
            },
            |_| 0,
        );
        let negative = |res: &Res<(u64, Attr)>| {
            // Not where a filter may hide the name from some callers only.
            matches!(res, Err(libc::ENOENT))
                && !self
                    .ttl(|| filter_path(&self.0.view.lock(), parent.0).join(name))
                    .is_zero()
        };
        match res {
            res if negative(&res) => {
                let mut a = fattr(0, &Attr::zeroed(0));
                a.ino = INodeNo(0);
                reply.entry_with_ttls(&Duration::ZERO, &self.0.opts.ttl, &a, Generation(0));
            }
            res => self.entry(reply, res),
        }
    }

    fn forget(&self, _req: &fuser::Request, ino: INodeNo, nlookup: u64) {
        self.0.view.lock().forget(ino.0, nlookup);
    }

    fn getattr(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        _fh: Option<FileHandle>,
        reply: ReplyAttr,
    ) {
        match self.on_node(req, Op::Getattr, ino.0, || self.0.view.lock().attr(ino.0)) {
            Ok(a) => reply.attr(&self.ttl_of(ino.0), &fattr(ino.0, &a)),
            Err(e) => reply.error(err(e)),
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
        let id = ino.0;
        let body = || {
            let mut v = self.0.view.lock();
            let records = [
                size.is_some(),
                mode.is_some() || uid.is_some() || gid.is_some(),
                atime.is_some() || mtime.is_some(),
            ];
            if records.iter().filter(|&&r| r).count() > 1 {
                // Several records for one setattr: all or none.
                v.reserve(view::RESERVE_FOR_SEVERAL)?;
            }
            if let Some(size) = size {
                // (Outside the isolated paths the truncation reaches the backing file that
                // passthrough opens use: nothing to wait for. Nor through such an open,
                // whose file it truncates, wherever its node is now: see
                // `Node::passthrough_file`.)
                let n = v.node(id)?;
                let through_passthrough = n.passthrough_file.is_some()
                    && (n.detached
                        || fh.is_some_and(|fh| self.file(fh).is_ok_and(|f| f.backing.is_some())));
                if !v.is_direct(id) && !through_passthrough {
                    self.await_passthrough_closed(&mut v, id)?;
                }
                if size != v.node(id)?.attr.size || v.node(id)?.attr.is_file() {
                    v.truncate(id, size)?;
                }
            }
            let (atime, mtime) = (atime.map(time_of), mtime.map(time_of));
            let nothing = mode.is_none()
                && uid.is_none()
                && gid.is_none()
                && atime.is_none()
                && mtime.is_none();
            if !nothing {
                v.set_attr(id, mode, uid, gid, atime, mtime)?;
            }
            // FUSE_HANDLE_KILLPRIV_V2: dropping set-ID bits is ours (see interpose-fs): a
            // truncation by a caller without CAP_FSETID, a write by one (a setattr that
            // changes nothing) or chown(f, -1, -1) (the same request). The kernel checked
            // no permission for the last two: the caller must own the file or be able to
            // write it, else anyone could strip the bits of any file.
            if nothing && size.is_none() {
                let a = v.attr(id)?;
                let uid = req.uid();
                if uid != 0
                    && uid != a.uid
                    && !a.is_dir()
                    && interpose_fs::reply::without_setid_for(a.mode & 0o7777, a.gid, req)
                        != a.mode & 0o7777
                    && !v.may_write(id, uid, |g| interpose_fs::reply::in_group(req, g))?
                {
                    return Err(libc::EPERM);
                }
                kill_suid_sgid(&mut v, id, req)?;
            } else if kill_suidgid && size.is_some() && mode.is_none() {
                kill_suid_sgid(&mut v, id, req)?;
            }
            v.attr(id)
        };
        let res = self.filtered(
            req,
            Op::Setattr,
            at_node(id),
            |r| r.set_attributes(mode, uid, gid, size, atime, mtime),
            body,
            |_| 0,
        );
        match res {
            Ok(a) => reply.attr(&self.ttl_of(id), &fattr(id, &a)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn readlink(&self, req: &fuser::Request, ino: INodeNo, reply: ReplyData) {
        match self.on_node(req, Op::Readlink, ino.0, || {
            self.0.view.lock().readlink(ino.0)
        }) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(err(e)),
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
        let kind = match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => NewKind::File,
            _ => NewKind::Node { rdev: rdev as u64 },
        };
        let sent = mode;
        let mode = if mode & libc::S_IFMT == 0 {
            mode | libc::S_IFREG
        } else {
            mode
        };
        let res = self.make(
            req,
            Some((Op::Mknod, sent)),
            parent,
            name,
            kind,
            mode,
            umask,
        );
        self.entry(reply, res);
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
        let res = self.make(
            req,
            Some((Op::Mkdir, mode)),
            parent,
            name,
            NewKind::Dir,
            libc::S_IFDIR | (mode & 0o7777),
            umask,
        );
        self.entry(reply, res);
    }

    fn unlink(&self, req: &fuser::Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let res = self.filtered(
            req,
            Op::Unlink,
            at_child(parent.0, name),
            |_| {},
            || {
                check_name(name)?;
                let mut v = self.0.view.lock();
                let victim = self.victim(&mut v, parent.0, name);
                v.remove(parent.0, name, false)?;
                note_gone(&mut v, victim);
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
            at_child(parent.0, name),
            |_| {},
            || check_name(name).and_then(|_| self.0.view.lock().remove(parent.0, name, true)),
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
        let kind = NewKind::Symlink {
            target: RawPath::from_path(target),
        };
        let res = self.make(
            req,
            Some((Op::Symlink, 0)),
            parent,
            link_name,
            kind,
            libc::S_IFLNK | 0o777,
            0,
        );
        self.entry(reply, res);
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
        let exchange = flags.bits() & libc::RENAME_EXCHANGE != 0;
        let paths = |v: &View| {
            (
                filter_path(v, parent.0).join(name),
                filter_path(v, newparent.0).join(newname),
            )
        };
        let body = || {
            check_name(name)?;
            check_name(newname)?;
            if !self.chain().is_empty() {
                let (from, to) = paths(&self.0.view.lock());
                let (id, other) = {
                    let mut v = self.0.view.lock();
                    let other = exchange
                        .then(|| v.child(newparent.0, newname))
                        .transpose()?;
                    (v.child(parent.0, name)?, other)
                };
                self.check_below(caller_of(req), flags.bits(), id, &from, &to)?;
                if let Some(other) = other {
                    self.check_below(caller_of(req), flags.bits(), other, &to, &from)?;
                }
            }
            let mut v = self.0.view.lock();
            let id = v.child(parent.0, name)?;
            self.await_direct_writers(&mut v, id, newparent.0, newname)?;
            if exchange {
                let other = v.child(newparent.0, newname)?;
                self.await_direct_writers(&mut v, other, parent.0, name)?;
            }
            let replaced = (!exchange)
                .then(|| self.victim(&mut v, newparent.0, newname))
                .flatten();
            v.rename(parent.0, name, newparent.0, newname, flags.bits())?;
            note_gone(&mut v, replaced);
            Ok(())
        };
        let res = self.filtered(
            req,
            Op::Rename,
            |v| {
                let (from, to) = paths(v);
                (from, Some(to))
            },
            |r| r.flags = Some(flags.bits() as i32),
            body,
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
        let res = self.filtered(
            req,
            Op::Link,
            |v| {
                let to = filter_path(v, newparent.0).join(newname);
                (filter_path(v, ino.0), Some(to))
            },
            |_| {},
            || {
                check_name(newname)?;
                let mut v = self.0.view.lock();
                self.await_direct_writers(&mut v, ino.0, newparent.0, newname)?;
                v.link(ino.0, newparent.0, newname)?;
                let a = v.attr(ino.0)?;
                if v.note_lookups {
                    v.node_mut(ino.0)?.note_looked_up(newparent.0, newname);
                }
                Ok((ino.0, a))
            },
            |_| 0,
        );
        self.entry(reply, res);
    }

    fn open(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        flags: OpenFlags,
        kill_suidgid: bool,
        reply: ReplyOpen,
    ) {
        let truncate_for = (flags.0 & libc::O_TRUNC != 0).then_some((req, kill_suidgid));
        let served = std::cell::Cell::new(false);
        let res = self.filtered(
            req,
            Op::Open,
            |v| {
                let path = filter_path(v, ino.0);
                served.set(self.chain().wants_data(&path));
                (path, None)
            },
            |r| r.flags = Some(flags.0),
            || {
                let open = || {
                    let (who, served) = (caller_of(req), served.get());
                    self.open_node(ino.0, who, flags.0, served, truncate_for, |f| {
                        reply.open_backing(f)
                    })
                };
                // FUSE_ATOMIC_O_TRUNC brings the truncation inside the open: the filters
                // see it as the setattr the plain mount gets, and may refuse it.
                let truncates = truncate_for.is_some()
                    && !self.chain().is_empty()
                    && self
                        .0
                        .view
                        .lock()
                        .node(ino.0)
                        .is_ok_and(|n| n.attr.is_file());
                if !truncates {
                    return open();
                }
                self.filtered(
                    req,
                    Op::Setattr,
                    at_node(ino.0),
                    |r| r.size = Some(0),
                    open,
                    |_| 0,
                )
            },
            |_| 0,
        );
        match res {
            Ok((fh, Some(b))) => reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &b),
            Ok((fh, None)) => reply.opened(FileHandle(fh), Self::open_flags(flags.0)),
            Err(e) => reply.error(err(e)),
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
        let body = || {
            let (id, a) = self.make(
                req,
                None,
                parent,
                name,
                NewKind::File,
                libc::S_IFREG | (mode & 0o7777),
                umask,
            )?;
            // (A new file is served by the daemon: its data is the view's.)
            let (fh, _) = self
                .open_node(id, caller_of(req), flags, true, None, |_| {
                    Err(std::io::ErrorKind::Unsupported.into())
                })
                .inspect_err(|_| self.0.view.lock().forget(id, 1))?;
            Ok((id, a, fh))
        };
        let res = self.filtered(
            req,
            Op::Create,
            at_child(parent.0, name),
            |r| {
                r.flags = Some(flags);
                r.mode = Some(mode);
            },
            body,
            |_| 0,
        );
        match res {
            Ok((id, a, fh)) => reply.created(
                &self.ttl_of(id),
                &fattr(id, &a),
                Generation(0),
                FileHandle(fh),
                Self::open_flags(flags),
            ),
            // The kernel sends CREATE for a name it believed free; a discard may have
            // brought it back since. Without O_EXCL the program asked to open it then:
            // ESTALE makes the kernel look the name up again and open what it finds (its
            // own permission checks, O_TRUNC and all), as it does for any stale entry.
            Err(libc::EEXIST)
                if flags & libc::O_EXCL == 0
                    && self.0.view.lock().child(parent.0, name).is_ok() =>
            {
                reply.error(err(libc::ESTALE))
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn read(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let res = || {
            let (segs, journal, origin, (cuts, planned)) = {
                let mut v = self.0.view.lock();
                let segs = v.plan_read(ino.0, offset, size as u64)?;
                let origin = if segs.iter().any(|s| matches!(s, view::Seg::Origin { .. })) {
                    v.origin_file_pub(ino.0)?
                } else {
                    None
                };
                (segs, v.journal_reader(), origin, v.journal.cuts())
            };
            let total: u64 = segs
                .iter()
                .map(|s| match *s {
                    view::Seg::Journal { len, .. }
                    | view::Seg::Origin { len, .. }
                    | view::Seg::Zero { len } => len,
                })
                .sum();
            let mut buf = vec![0u8; total as usize];
            let filled = view::fill(&segs, &mut buf, &journal, origin.as_deref());
            if cuts.load(Ordering::Acquire) != planned {
                return Ok(None);
            }
            buf.truncate(filled?);
            Ok(Some(buf))
        };
        // Planned again after a cut of the journal in place (a mounted discard) while the
        // bytes were read: they may be gone, or another file's. Cuts are rare; a reader
        // racing more than a few in a row is told to try again.
        let res = self.filtered(
            req,
            Op::Read,
            at_node(ino.0),
            |r| {
                r.offset = Some(offset);
                r.size = Some(size as u64);
            },
            || {
                (0..8)
                    .find_map(|_| res().transpose())
                    .unwrap_or(Err(libc::EAGAIN))
            },
            |b| b.len() as u64,
        );
        match res {
            Ok(b) => reply.data(&b),
            Err(e) => reply.error(err(e)),
        }
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
        let body = || {
            let f = self.file(fh)?;
            if !f.write {
                return Err(libc::EBADF);
            }
            let mut v = self.0.view.lock();
            // The offset is the kernel's, also for an append (it computed the end): the
            // open's O_APPEND does not say this write appends (RWF_NOAPPEND, a shared
            // mapping's writeback).
            // Privileges go before the data, as the kernel drops them (each its own
            // change), so no commit point shows the data with them. A shared mapping's
            // writeback (FUSE_WRITE_CACHE) keeps them, as on other file systems.
            if !wf.contains(WriteFlags::FUSE_WRITE_CACHE) {
                v.drop_capabilities(ino.0)?;
            }
            if wf.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID)
                && kill_suid_sgid(&mut v, ino.0, req)?
            {
                self.forget_attributes(ino);
            }
            let n = v.write(ino.0, offset, data)?;
            if interpose_fs::write_must_sync(f.direct, flags.0) {
                v.fsync()?;
            }
            Ok(n)
        };
        let res = self.filtered(
            req,
            Op::Write,
            at_node(ino.0),
            |r| {
                r.offset = Some(offset);
                r.size = Some(data.len() as u64);
                // The writeback of a shared mapping comes as root: it is its opener's.
                if wf.contains(WriteFlags::FUSE_WRITE_CACHE) {
                    if let Ok(f) = self.file(fh) {
                        r.caller = f.opener;
                    }
                }
            },
            body,
            |n| *n as u64,
        );
        match res {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(err(e)),
        }
    }

    fn flush(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock: LockOwner,
        reply: ReplyEmpty,
    ) {
        if self.chain().is_empty() {
            // Nothing to do at close(2) without filters: ENOSYS makes the kernel stop
            // sending FLUSH at all, one round trip less per close.
            return reply.error(Errno::ENOSYS);
        }
        let res = self.on_node(req, Op::Flush, ino.0, || self.file(fh).map(drop));
        reply_empty(reply, res);
    }

    fn release(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // Released whatever the filters say: the kernel has closed it anyway.
        let _ = self.on_node(req, Op::Release, ino.0, || Ok(()));
        reply_empty(reply, self.release_open(fh));
    }

    fn fsync(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let res = self.on_node(req, Op::Fsync, ino.0, || self.0.view.lock().fsync());
        reply_empty(reply, res);
    }

    fn opendir(&self, req: &fuser::Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let body = || {
            let entries = self.listing(ino.0)?;
            let fh = self.0.next_fh.fetch_add(1, Ordering::Relaxed);
            let d = OpenDir {
                entries,
                fresh: AtomicBool::new(true),
            };
            self.0.dirs.lock().insert(fh, Arc::new(d));
            Ok(fh)
        };
        let res = self.filtered(
            req,
            Op::Opendir,
            at_node(ino.0),
            |r| r.flags = Some(flags.0),
            body,
            |_| 0,
        );
        match res {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(err(e)),
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
        let d = self.on_node(req, Op::Readdir, ino.0, || {
            self.open_dir(fh.0, ino.0, offset)
        });
        let d = match d {
            Ok(d) => d,
            Err(e) => return reply.error(err(e)),
        };
        let hidden = self.hidden_in(req, ino.0);
        // Offsets index the listing taken at the start: stable whatever changes meanwhile.
        for (i, e) in d.entries.iter().enumerate().skip(offset as usize) {
            if hidden(&e.name) {
                continue;
            }
            let kind = if e.kind == 0 {
                FileType::RegularFile
            } else {
                file_type(e.kind)
            };
            if reply.add(INodeNo(e.ino), (i + 1) as u64, kind, &e.name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let d = self.on_node(req, Op::Readdir, ino.0, || {
            self.open_dir(fh.0, ino.0, offset)
        });
        let d = match d {
            Ok(d) => d,
            Err(e) => return reply.error(err(e)),
        };
        let hidden = self.hidden_in(req, ino.0);
        let mut v = self.0.view.lock();
        for (i, e) in d.entries.iter().enumerate().skip(offset as usize) {
            if hidden(&e.name) {
                continue;
            }
            // (node sent, its attributes' lifetime, attributes, lookup taken). "." and ".."
            // take no kernel reference, so they are not lookups. Every other entry sent is
            // a lookup the kernel will forget; the listing is the one taken at opendir, so a
            // name gone since is sent without attributes (node 0).
            let (node, ttl, attr, looked_up) = if e.name == "." || e.name == ".." {
                let a = fattr(e.ino, &Attr::zeroed(libc::S_IFDIR));
                (e.ino, Duration::ZERO, a, None)
            } else {
                match v.lookup_attr(ino.0, &e.name) {
                    Ok((id, a)) => {
                        let ttl = self.ttl(|| filter_path(&v, id));
                        (id, ttl, fattr(id, &a), Some(id))
                    }
                    Err(_) => (0, Duration::ZERO, fattr(e.ino, &Attr::zeroed(e.kind)), None),
                }
            };
            let next = (i + 1) as u64;
            if reply.add(INodeNo(node), next, &e.name, &ttl, &attr, Generation(0)) {
                if let Some(id) = looked_up {
                    v.forget(id, 1); // not sent: the kernel holds no reference
                }
                break;
            }
        }
        drop(v);
        reply.ok();
    }

    fn releasedir(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        // Released whatever the filters say: the kernel has closed it anyway.
        let _ = self.on_node(req, Op::Releasedir, ino.0, || Ok(()));
        self.0.dirs.lock().remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let res = self.on_node(req, Op::Fsyncdir, ino.0, || self.0.view.lock().fsync());
        reply_empty(reply, res);
    }

    fn statfs(&self, req: &fuser::Request, ino: INodeNo, reply: ReplyStatfs) {
        let res = self.on_node(req, Op::Statfs, ino.0, || {
            let backing = self.0.view.lock().backing.clone();
            backing
                .statvfs()
                .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
        });
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
            Err(e) => reply.error(err(e)),
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
        let body = || {
            let mut v = self.0.view.lock();
            v.xattr_set(ino.0, name.as_bytes(), value, flags)?;
            // Setting an access ACL drops set-group-ID for a caller outside the file's
            // group (the kernel's posix_acl_update_mode).
            if name.as_bytes() == b"system.posix_acl_access" {
                let a = v.attr(ino.0)?;
                if let Some(m) = interpose_fs::reply::acl_drops_setgid(a.mode, a.gid, req) {
                    v.set_attr(ino.0, Some(m), None, None, None, None)?;
                    self.forget_attributes(ino);
                }
            }
            Ok(())
        };
        let res = self.filtered(
            req,
            Op::Setxattr,
            at_node(ino.0),
            |r| {
                r.xattr = Some(name.to_owned());
                r.size = Some(value.len() as u64);
            },
            body,
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
            at_node(ino.0),
            |r| r.xattr = Some(name.to_owned()),
            || self.0.view.lock().xattr_get(ino.0, name.as_bytes()),
            |_| 0,
        );
        reply_xattr(reply, size, res);
    }

    fn listxattr(&self, req: &fuser::Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let list = self.on_node(req, Op::Listxattr, ino.0, || {
            self.0.view.lock().xattr_list(ino.0)
        });
        let list = list.map(|l| interpose_fs::reply::listed_for(req, l));
        reply_xattr(reply, size, list);
    }

    fn removexattr(&self, req: &fuser::Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let res = self.filtered(
            req,
            Op::Removexattr,
            at_node(ino.0),
            |r| r.xattr = Some(name.to_owned()),
            || self.0.view.lock().xattr_remove(ino.0, name.as_bytes()),
            |_| 0,
        );
        reply_empty(reply, res);
    }

    fn access(&self, req: &fuser::Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let res = self.filtered(
            req,
            Op::Access,
            at_node(ino.0),
            |r| r.flags = Some(mask.bits()),
            || self.0.view.lock().node(ino.0).map(|_| ()),
            |_| 0,
        );
        reply_empty(reply, res);
    }

    fn fallocate(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let res = self.filtered(
            req,
            Op::Fallocate,
            at_node(ino.0),
            |r| {
                r.offset = Some(offset);
                r.size = Some(length);
                r.flags = Some(mode);
            },
            || self.0.view.lock().fallocate(ino.0, offset, length, mode),
            |_| 0,
        );
        reply_empty(reply, res);
    }

    fn lseek(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let body = || match whence {
            libc::SEEK_DATA | libc::SEEK_HOLE if offset >= 0 => self
                .0
                .view
                .lock()
                .seek(ino.0, offset as u64, whence == libc::SEEK_DATA)
                .map(|p| p as i64),
            libc::SEEK_DATA | libc::SEEK_HOLE => Err(libc::ENXIO),
            libc::SEEK_SET => Ok(offset),
            libc::SEEK_END => self
                .0
                .view
                .lock()
                .node(ino.0)
                .map(|n| n.attr.size as i64 + offset),
            _ => Err(libc::EINVAL),
        };
        let res = self.filtered(
            req,
            Op::Lseek,
            at_node(ino.0),
            |r| r.offset = Some(offset as u64),
            body,
            |_| 0,
        );
        match res {
            Ok(p) => reply.offset(p),
            Err(e) => reply.error(err(e)),
        }
    }
}
