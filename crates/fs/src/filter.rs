//! The filter chain: hooks that see each file-system operation before and after it
//! reaches the backing directory.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use interpose_core::{being_killed, Caller};

/// Every operation the file system serves, as filters see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Lookup,
    Getattr,
    Setattr,
    Readlink,
    Mknod,
    Mkdir,
    Unlink,
    Rmdir,
    Symlink,
    Rename,
    Link,
    Open,
    Create,
    Read,
    Write,
    Flush,
    Release,
    Fsync,
    Opendir,
    Readdir,
    Releasedir,
    Fsyncdir,
    Statfs,
    Setxattr,
    Getxattr,
    Listxattr,
    Removexattr,
    Access,
    Fallocate,
    Lseek,
    CopyFileRange,
}

impl Op {
    pub const ALL: [Op; 31] = [
        Op::Lookup,
        Op::Getattr,
        Op::Setattr,
        Op::Readlink,
        Op::Mknod,
        Op::Mkdir,
        Op::Unlink,
        Op::Rmdir,
        Op::Symlink,
        Op::Rename,
        Op::Link,
        Op::Open,
        Op::Create,
        Op::Read,
        Op::Write,
        Op::Flush,
        Op::Release,
        Op::Fsync,
        Op::Opendir,
        Op::Readdir,
        Op::Releasedir,
        Op::Fsyncdir,
        Op::Statfs,
        Op::Setxattr,
        Op::Getxattr,
        Op::Listxattr,
        Op::Removexattr,
        Op::Access,
        Op::Fallocate,
        Op::Lseek,
        Op::CopyFileRange,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::Lookup => "lookup",
            Op::Getattr => "getattr",
            Op::Setattr => "setattr",
            Op::Readlink => "readlink",
            Op::Mknod => "mknod",
            Op::Mkdir => "mkdir",
            Op::Unlink => "unlink",
            Op::Rmdir => "rmdir",
            Op::Symlink => "symlink",
            Op::Rename => "rename",
            Op::Link => "link",
            Op::Open => "open",
            Op::Create => "create",
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Release => "release",
            Op::Fsync => "fsync",
            Op::Opendir => "opendir",
            Op::Readdir => "readdir",
            Op::Releasedir => "releasedir",
            Op::Fsyncdir => "fsyncdir",
            Op::Statfs => "statfs",
            Op::Setxattr => "setxattr",
            Op::Getxattr => "getxattr",
            Op::Listxattr => "listxattr",
            Op::Removexattr => "removexattr",
            Op::Access => "access",
            Op::Fallocate => "fallocate",
            Op::Lseek => "lseek",
            Op::CopyFileRange => "copy_file_range",
        }
    }

    pub fn from_name(name: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.name() == name)
    }

    /// Whether the operation changes the tree (data, names or attributes). An `Open`
    /// or `Create` counts when it asks for write access; see [`Request::mutates`].
    pub fn always_mutates(self) -> bool {
        matches!(
            self,
            Op::Setattr
                | Op::Mknod
                | Op::Mkdir
                | Op::Unlink
                | Op::Rmdir
                | Op::Symlink
                | Op::Rename
                | Op::Link
                | Op::Create
                | Op::Write
                | Op::Setxattr
                | Op::Removexattr
                | Op::Fallocate
                | Op::CopyFileRange
        )
    }
}

/// One operation as it reaches the filters.
///
/// Paths are relative to the mount's root and start with `/` (the root itself is `/`).
#[derive(Clone, Debug)]
pub struct Request {
    pub op: Op,
    pub path: PathBuf,
    /// The second path of `rename`, `link` and `copy_file_range`, or a symlink's target.
    pub path2: Option<PathBuf>,
    pub caller: Caller,
    /// Open flags of `open`/`create`/`opendir` (O_ACCMODE, O_TRUNC, ...).
    pub flags: Option<i32>,
    pub offset: Option<u64>,
    /// Requested length of a read, write, fallocate or copy.
    pub size: Option<u64>,
    /// Mode of a create/mkdir/mknod, or the new mode of a chmod.
    pub mode: Option<u32>,
    /// Name of the extended attribute of the xattr operations.
    pub xattr: Option<OsString>,
    /// The new owner and group of a `setattr` (chown), each if it changes.
    pub owner: Option<u32>,
    pub group: Option<u32>,
    /// The new access and modification times of a `setattr`, each if it changes.
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
    /// The kernel's id of the FUSE request, if the operation came as one.
    pub fuse_request: Option<fuser::RequestId>,
}

/// A time a `setattr` sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetTime {
    /// The current time (`UTIME_NOW`, `touch`).
    Now,
    /// Seconds and nanoseconds since the epoch (negative seconds: before it).
    At(i64, u32),
}

impl Request {
    pub fn new(op: Op, path: impl Into<PathBuf>, caller: Caller) -> Self {
        Request {
            op,
            path: path.into(),
            path2: None,
            caller,
            flags: None,
            offset: None,
            size: None,
            mode: None,
            xattr: None,
            owner: None,
            group: None,
            atime: None,
            mtime: None,
            fuse_request: None,
        }
    }

    /// The FUSE request `req` as filters see it: `op` on the first path (and the second).
    pub fn of(req: &fuser::Request, op: Op, (path, path2): (PathBuf, Option<PathBuf>)) -> Self {
        let mut r = Request::new(op, path, caller_of(req));
        r.path2 = path2;
        r.fuse_request = Some(req.unique());
        r
    }

    /// Whether the program waiting for this operation got a signal meanwhile (the kernel
    /// interrupted its request). A filter that waits long for something, as the audit log
    /// does for room, stops waiting then: until the request is answered the program cannot
    /// even be killed.
    pub fn interrupted(&self) -> bool {
        self.fuse_request.is_some_and(fuser::was_interrupted)
    }

    /// Fills in what a `setattr` changes, as the kernel sent it.
    pub fn set_attributes(
        &mut self,
        mode: Option<u32>,
        owner: Option<u32>,
        group: Option<u32>,
        size: Option<u64>,
        atime: Option<fuser::TimeOrNow>,
        mtime: Option<fuser::TimeOrNow>,
    ) {
        // (The kernel sends the file type with a chmod's mode.)
        self.mode = mode.map(|m| m & 0o7777);
        self.size = size;
        self.owner = owner;
        self.group = group;
        let set = |t: Option<fuser::TimeOrNow>| {
            t.map(|t| match t {
                fuser::TimeOrNow::Now => SetTime::Now,
                fuser::TimeOrNow::SpecificTime(t) => {
                    let (s, ns) = crate::reply::kernel_time(t);
                    SetTime::At(s, ns)
                }
            })
        };
        self.atime = set(atime);
        self.mtime = set(mtime);
    }

    /// Whether this request is a rename that exchanges its two paths.
    pub fn is_exchange(&self) -> bool {
        self.op == Op::Rename
            && self
                .flags
                .is_some_and(|f| f & libc::RENAME_EXCHANGE as i32 != 0)
    }

    /// Whether this request would change anything.
    pub fn mutates(&self) -> bool {
        match self.op {
            Op::Open => self
                .flags
                .is_some_and(|f| f & libc::O_ACCMODE != libc::O_RDONLY || f & libc::O_TRUNC != 0),
            op => op.always_mutates(),
        }
    }
}

/// Who made a FUSE request.
pub fn caller_of(req: &fuser::Request) -> Caller {
    Caller {
        pid: req.pid(),
        uid: req.uid(),
        gid: req.gid(),
    }
}

/// What happened, for the `after` hooks.
#[derive(Clone, Copy, Debug)]
pub struct Outcome {
    /// Bytes moved (read, write, copy) or 0, or the errno the caller got.
    pub result: Result<u64, i32>,
    pub latency: Duration,
}

/// A filter's decision before an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Let the operation go on to the next filter and then the backing directory.
    Continue,
    /// Answer the caller with this errno; the backing directory is not touched.
    Deny(i32),
}

/// A hook between the kernel and the backing directory.
///
/// Filters run in the order given; `before` hooks first to last (the first `Deny` wins),
/// `after` hooks last to first. Hooks run on the file system's worker threads and must
/// not block for long.
pub trait Filter: Send + Sync {
    /// A short name for logs.
    fn name(&self) -> &str;

    fn before(&self, _req: &Request) -> Verdict {
        Verdict::Continue
    }

    fn after(&self, _req: &Request, _outcome: &Outcome) {}

    /// Whether this filter must see the reads and writes of the file at `path`. When no
    /// filter does, the file is opened with the kernel's FUSE passthrough and its data never
    /// enters the daemon (no `Read`/`Write` requests reach any filter for that open).
    fn wants_data(&self, _path: &Path) -> bool {
        false
    }

    /// Whether answers for `path` may depend on the caller or refuse a lookup: the kernel
    /// must then not cache its name or attributes, so that every access is asked again
    /// (a name looked up for one user would otherwise be used by the next).
    fn varies_by_caller(&self, _path: &Path) -> bool {
        false
    }

    /// Whether [`Filter::varies_by_caller`] may be true for any path.
    fn may_vary_by_caller(&self) -> bool {
        false
    }

    /// Whether `before` may refuse `req`, a rename of the directory `dir`, for some path
    /// below `dir`: then the file system asks `before` about every object below it too,
    /// with the paths they had and would have (moving a directory moves them all).
    fn guards_below(&self, _dir: &Path, _req: &Request) -> bool {
        false
    }

    /// Whether to refuse `req`, a rename or link that takes the object at `from` (inside
    /// the subtrees this filter is scoped to) out of them, where the filter no longer
    /// sees it: a filter that keeps the caller from reading the object refuses, or the
    /// caller would read it from the new name. Asked after `before` let the request go.
    fn before_leaving(&self, _req: &Request, _from: &Path) -> Verdict {
        Verdict::Continue
    }

    /// Called once at unmount, e.g. to flush logs.
    fn close(&self) {}
}

/// A filter applied only under some subtrees of the mount.
pub struct Scoped {
    filter: Box<dyn Filter>,
    /// Normalised subtree roots ("/a/b"); empty means the whole tree.
    under: Vec<PathBuf>,
}

impl Scoped {
    pub fn new(filter: Box<dyn Filter>, under: Vec<PathBuf>) -> Self {
        let under = under
            .into_iter()
            .map(|p| {
                let rel = p.strip_prefix("/").map(Path::to_path_buf).unwrap_or(p);
                Path::new("/").join(rel)
            })
            .filter(|p| p != Path::new("/"))
            .collect();
        Scoped { filter, under }
    }

    pub fn applies_to(&self, path: &Path) -> bool {
        self.under.is_empty() || self.under.iter().any(|root| path.starts_with(root))
    }

    fn applies(&self, req: &Request) -> bool {
        self.applies_to(&req.path) || req.path2.as_deref().is_some_and(|p| self.applies_to(p))
    }

    /// For a rename or link that takes an object from inside the subtrees to outside
    /// them (either way for an exchange): the object's path inside.
    fn leaving<'r>(&self, req: &'r Request) -> Option<&'r Path> {
        let (Op::Rename | Op::Link, Some(to)) = (req.op, req.path2.as_deref()) else {
            return None;
        };
        let from = req.path.as_path();
        if self.applies_to(from) && !self.applies_to(to) {
            Some(from)
        } else if req.is_exchange() && self.applies_to(to) && !self.applies_to(from) {
            Some(to)
        } else {
            None
        }
    }
}

/// An operation the `before` hooks let go on, waiting for its result.
pub struct Admitted {
    chain: Arc<Chain>,
    req: Request,
    start: Instant,
}

impl Admitted {
    pub fn request(&self) -> &Request {
        &self.req
    }

    /// Shows the result (bytes moved, or the errno) to the `after` hooks.
    pub fn finish(self, result: Result<u64, i32>) {
        let outcome = Outcome {
            result,
            latency: self.start.elapsed(),
        };
        self.chain.after(&self.req, &outcome);
    }
}

/// The filters of one mount, in order.
#[derive(Default)]
pub struct Chain {
    filters: Vec<Scoped>,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl Chain {
    pub fn new(filters: Vec<Scoped>) -> Self {
        Chain { filters }
    }

    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    pub fn before(&self, req: &Request) -> Verdict {
        for scoped in &self.filters {
            if scoped.applies(req) {
                if let Verdict::Deny(errno) = scoped.filter.before(req) {
                    return Verdict::Deny(errno);
                }
                if let Some(from) = scoped.leaving(req) {
                    if let Verdict::Deny(errno) = scoped.filter.before_leaving(req, from) {
                        return Verdict::Deny(errno);
                    }
                }
            }
        }
        Verdict::Continue
    }

    /// Runs the `before` hooks on `req`. A refusal has already been shown to the `after`
    /// hooks when it is returned; otherwise hand the operation's result to
    /// [`Admitted::finish`].
    pub fn admit(self: &Arc<Self>, req: Request) -> Result<Admitted, i32> {
        let start = Instant::now();
        if let Verdict::Deny(errno) = self.before(&req) {
            let outcome = Outcome {
                result: Err(errno),
                latency: start.elapsed(),
            };
            self.after(&req, &outcome);
            return Err(errno);
        }
        Ok(Admitted {
            chain: self.clone(),
            req,
            start,
        })
    }

    /// Runs `body` between the hooks: refused, it does not run; `bytes` says how many
    /// bytes a success moved.
    pub fn around<T>(
        self: &Arc<Self>,
        req: impl FnOnce() -> Request,
        body: impl FnOnce() -> Result<T, i32>,
        bytes: impl FnOnce(&T) -> u64,
    ) -> Result<T, i32> {
        if self.is_empty() {
            return body();
        }
        let admitted = self.admit(req())?;
        let res = body();
        admitted.finish(res.as_ref().map(bytes).map_err(|e| *e));
        res
    }

    pub fn after(&self, req: &Request, outcome: &Outcome) {
        for scoped in self.filters.iter().rev() {
            if scoped.applies(req) {
                scoped.filter.after(req, outcome);
            }
        }
    }

    pub fn wants_data(&self, path: &Path) -> bool {
        self.filters
            .iter()
            .any(|s| s.applies_to(path) && s.filter.wants_data(path))
    }

    /// See [`Filter::varies_by_caller`].
    pub fn varies_by_caller(&self, path: &Path) -> bool {
        self.filters
            .iter()
            .any(|s| s.applies_to(path) && s.filter.varies_by_caller(path))
    }

    /// See [`Filter::may_vary_by_caller`].
    pub fn may_vary_by_caller(&self) -> bool {
        self.filters.iter().any(|s| s.filter.may_vary_by_caller())
    }

    /// See [`Filter::guards_below`]. Scopes are left to the requests about the objects
    /// below: a directory above a filter's subtree holds paths inside it.
    pub fn guards_below(&self, dir: &Path, req: &Request) -> bool {
        self.filters.iter().any(|s| s.filter.guards_below(dir, req))
    }

    pub fn close(&self) {
        for scoped in &self.filters {
            scoped.filter.close();
        }
    }

    pub fn names(&self) -> Vec<String> {
        self.filters
            .iter()
            .map(|s| s.filter.name().to_owned())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct DenyAll(i32);
    impl Filter for DenyAll {
        fn name(&self) -> &str {
            "deny-all"
        }
        fn before(&self, _req: &Request) -> Verdict {
            Verdict::Deny(self.0)
        }
    }

    #[test]
    fn scope_limits_a_filter_to_its_subtrees() {
        let chain = Chain::new(vec![Scoped::new(
            Box::new(DenyAll(libc::EPERM)),
            vec!["sub/dir".into()],
        )]);
        let caller = Caller {
            pid: 1,
            uid: 0,
            gid: 0,
        };
        let inside = Request::new(Op::Unlink, "/sub/dir/x", caller);
        let beside = Request::new(Op::Unlink, "/sub/dirx", caller);
        assert_eq!(chain.before(&inside), Verdict::Deny(libc::EPERM));
        assert_eq!(chain.before(&beside), Verdict::Continue);
        let mut rename_in = Request::new(Op::Rename, "/a", caller);
        rename_in.path2 = Some("/sub/dir/a".into());
        assert_eq!(chain.before(&rename_in), Verdict::Deny(libc::EPERM));
    }

    #[test]
    fn first_deny_wins() {
        let chain = Chain::new(vec![
            Scoped::new(Box::new(DenyAll(libc::EROFS)), vec![]),
            Scoped::new(Box::new(DenyAll(libc::EPERM)), vec![]),
        ]);
        let req = Request::new(
            Op::Write,
            "/f",
            Caller {
                pid: 1,
                uid: 0,
                gid: 0,
            },
        );
        assert_eq!(chain.before(&req), Verdict::Deny(libc::EROFS));
    }

    #[test]
    fn op_names_round_trip() {
        for op in Op::ALL {
            assert_eq!(Op::from_name(op.name()), Some(op));
        }
    }
}
