//! Helpers for the tests that run real programs on a mount and on a plain directory and
//! compare: tree manifests, Python, running as another user, temp dirs other users can use.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::ffi::{CString, OsStr};
use std::fmt::Write as _;
use std::fs;
use std::hash::Hasher;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common::test_root;

/// The uid/gid the non-root tests run as.
pub const NOBODY: u32 = 65534;

/// Python 3 for scripts: the system one, which every user can run (a pyenv shim under
/// /root cannot be used by uid 65534).
pub fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/scripts")
        .join(name)
}

/// Whether a program is on PATH.
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program} >/dev/null"))
        .status()
        .is_ok_and(|s| s.success())
}

/// A fresh temporary directory that every user can traverse (mode 0755).
pub fn plain_dir(prefix: &str) -> tempfile::TempDir {
    let tmp = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(test_root())
        .unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    tmp
}

/// Opens `path` (a directory the test made, e.g. [`crate::common::Mount::dir`]) to
/// everyone (mode 0755), and checks that every user can reach it: its ancestors are not
/// the test's to change, so a test directory below a private one fails loudly here.
pub fn make_traversable(path: &Path) {
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
    for p in path.ancestors().skip(1) {
        let mode = fs::metadata(p).unwrap().permissions().mode();
        assert!(
            mode & 0o001 != 0,
            "{} (mode {mode:o}) is not searchable by other users, so uid {NOBODY} cannot \
             reach {}; point INTERPOSE_TEST_DIR at a directory everyone can reach",
            p.display(),
            path.display()
        );
    }
}

/// `setpriv` prefix running a command as `uid:gid` with exactly `groups` as supplementary
/// groups.
pub fn as_user(uid: u32, gid: u32, groups: &[u32]) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"));
    if groups.is_empty() {
        cmd.arg("--clear-groups");
    } else {
        let list: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        cmd.arg(format!("--groups={}", list.join(",")));
    }
    cmd.arg("--");
    cmd
}

/// Runs a command and returns its output without judging the exit status.
pub fn output(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

pub fn describe(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// What to put into a manifest besides type, mode, owner, size, content, link target,
/// link counts and hard-link grouping, xattrs and sparseness.
#[derive(Clone, Copy, Default)]
pub struct ManifestOpts {
    /// Modification times (nanoseconds) of everything but directories.
    pub mtime: bool,
    /// Owners (uid, gid).
    pub owner: bool,
}

/// One line per object under `root` (not `root` itself), sorted by path: relative path,
/// type, mode, owner, size, content hash, symlink target, nlink, hard-link group (the first
/// path of the group), xattrs (names and values) and whether a regular file has holes.
/// Ignores times (unless asked) and inode numbers. Does not follow symlinks.
pub fn manifest(root: &Path, opts: ManifestOpts) -> Vec<String> {
    let mut entries: Vec<(PathBuf, fs::Metadata)> = Vec::new();
    walk(root, Path::new(""), &mut entries);
    entries.sort_by(|a, b| a.0.as_os_str().as_bytes().cmp(b.0.as_os_str().as_bytes()));
    // Hard-link groups: the first path (in sort order) of each inode with nlink > 1.
    let mut first: HashMap<(u64, u64), PathBuf> = HashMap::new();
    for (rel, md) in &entries {
        if !md.is_dir() && md.nlink() > 1 {
            first
                .entry((md.dev(), md.ino()))
                .or_insert_with(|| rel.clone());
        }
    }
    entries
        .iter()
        .map(|(rel, md)| {
            let full = root.join(rel);
            let ft = md.file_type();
            let kind = if ft.is_dir() {
                "dir"
            } else if ft.is_symlink() {
                "symlink"
            } else if ft.is_file() {
                "file"
            } else if ft.is_fifo() {
                "fifo"
            } else if ft.is_socket() {
                "socket"
            } else if ft.is_char_device() {
                "chardev"
            } else {
                "blockdev"
            };
            let mut line = format!(
                "{} {kind} mode={:04o}",
                esc(rel.as_os_str().as_bytes()),
                md.mode() & 0o7777
            );
            if opts.owner {
                write!(line, " owner={}:{}", md.uid(), md.gid()).unwrap();
            }
            write!(line, " nlink={}", md.nlink()).unwrap();
            if ft.is_file() {
                write!(
                    line,
                    " size={} hash={:016x} holes={}",
                    md.len(),
                    hash_file(&full),
                    md.blocks() * 512 < md.len()
                )
                .unwrap();
            }
            if ft.is_symlink() {
                let target = fs::read_link(&full).unwrap();
                write!(line, " -> {}", esc(target.as_os_str().as_bytes())).unwrap();
            }
            if ft.is_char_device() || ft.is_block_device() {
                write!(line, " rdev={:x}", md.rdev()).unwrap();
            }
            if !md.is_dir() && md.nlink() > 1 {
                let group = &first[&(md.dev(), md.ino())];
                write!(line, " linkgroup={}", esc(group.as_os_str().as_bytes())).unwrap();
            }
            if opts.mtime && !md.is_dir() {
                let ns = md.mtime() as i128 * 1_000_000_000 + md.mtime_nsec() as i128;
                write!(line, " mtime={ns}").unwrap();
            }
            for (name, value) in xattrs(&full) {
                write!(line, " xattr:{}={}", esc(&name), esc(&value)).unwrap();
            }
            line
        })
        .collect()
}

fn walk(root: &Path, rel: &Path, out: &mut Vec<(PathBuf, fs::Metadata)>) {
    let dir = root.join(rel);
    for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display())) {
        let entry = entry.unwrap();
        let rel = rel.join(entry.file_name());
        let md = fs::symlink_metadata(root.join(&rel)).unwrap();
        let is_dir = md.is_dir();
        out.push((rel.clone(), md));
        if is_dir {
            walk(root, &rel, out);
        }
    }
}

/// Printable form of bytes that keeps every byte distinguishable.
pub fn esc(b: &[u8]) -> String {
    b.escape_ascii().to_string().replace(' ', "\\x20")
}

fn hash_file(path: &Path) -> u64 {
    // Fixed keys: the same in every run of the same test binary.
    let mut h = std::hash::DefaultHasher::new();
    let mut f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.write(&buf[..n]);
    }
    h.finish()
}

fn cpath(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap()
}

/// The extended attributes of `path` itself (not following symlinks), sorted by name.
pub fn xattrs(path: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let p = cpath(path);
    let mut out = BTreeMap::new();
    let mut names = vec![0u8; 65536];
    // SAFETY: the buffer is valid for its length; the path is NUL-terminated.
    let n = unsafe { libc::llistxattr(p.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n < 0 {
        let err = std::io::Error::last_os_error();
        assert_eq!(
            err.raw_os_error(),
            Some(libc::ENOTSUP),
            "llistxattr {}: {err}",
            path.display()
        );
        return out;
    }
    names.truncate(n as usize);
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cname = CString::new(name).unwrap();
        let mut value = vec![0u8; 65536];
        // SAFETY: as above.
        let n = unsafe {
            libc::lgetxattr(
                p.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        assert!(
            n >= 0,
            "lgetxattr {} {}: {}",
            path.display(),
            esc(name),
            std::io::Error::last_os_error()
        );
        value.truncate(n as usize);
        out.insert(name.to_vec(), value);
    }
    out
}

/// lsetxattr(2).
pub fn try_set_xattr(path: &Path, name: &str, value: &[u8]) -> std::io::Result<()> {
    let p = cpath(path);
    let n = CString::new(name).unwrap();
    // SAFETY: valid NUL-terminated strings and a value buffer of the given length.
    let rc = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    try_set_xattr(path, name, value)
        .unwrap_or_else(|e| panic!("lsetxattr {} {name}: {e}", path.display()));
}

/// Asserts two manifests are equal, showing only the differing lines.
pub fn assert_same(what: &str, a_name: &str, a: &[String], b_name: &str, b: &[String]) {
    if a == b {
        return;
    }
    let only_a: Vec<&String> = a.iter().filter(|l| !b.contains(l)).collect();
    let only_b: Vec<&String> = b.iter().filter(|l| !a.contains(l)).collect();
    let mut msg = format!("{what}: {a_name} and {b_name} differ\n");
    for l in only_a {
        writeln!(msg, "  only in {a_name}: {l}").unwrap();
    }
    for l in only_b {
        writeln!(msg, "  only in {b_name}: {l}").unwrap();
    }
    panic!("{msg}");
}

/// lchown(2).
pub fn lchown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("lchown {}: {e}", path.display()));
}

/// Sets atime and mtime of `path` itself (not following symlinks), in nanoseconds.
pub fn set_times(path: &Path, atime_ns: i64, mtime_ns: i64) {
    try_set_times(path, atime_ns, mtime_ns)
        .unwrap_or_else(|e| panic!("utimensat {}: {e}", path.display()));
}

/// mkfifo(3).
pub fn try_mkfifo(path: &Path, mode: u32) -> std::io::Result<()> {
    let p = cpath(path);
    // SAFETY: a NUL-terminated path.
    if unsafe { libc::mkfifo(p.as_ptr(), mode as libc::mode_t) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub fn mkfifo(path: &Path, mode: u32) {
    try_mkfifo(path, mode).unwrap_or_else(|e| panic!("mkfifo {}: {e}", path.display()));
}

/// utimensat(2) with AT_SYMLINK_NOFOLLOW, as a result.
pub fn try_set_times(path: &Path, atime_ns: i64, mtime_ns: i64) -> std::io::Result<()> {
    let p = cpath(path);
    let ts = |ns: i64| libc::timespec {
        tv_sec: ns.div_euclid(1_000_000_000),
        tv_nsec: ns.rem_euclid(1_000_000_000),
    };
    let times = [ts(atime_ns), ts(mtime_ns)];
    // SAFETY: a NUL-terminated path and an array of two timespecs.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            p.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// "ok" or the errno name of a result: for tables of outcomes.
pub fn outcome<T>(res: std::io::Result<T>) -> String {
    match res {
        Ok(_) => "ok".into(),
        Err(e) => match e.raw_os_error() {
            Some(n) => errno_name(n),
            None => format!("{e}"),
        },
    }
}

pub fn errno_name(n: i32) -> String {
    let name = match n {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::EBADF => "EBADF",
        libc::EACCES => "EACCES",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::ENODATA => "ENODATA",
        libc::ESTALE => "ESTALE",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EROFS => "EROFS",
        _ => return format!("errno {n}"),
    };
    name.into()
}

pub fn os(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

/// nbdfuse (libnbd's FUSE client) serving one NBD export read-only as the file
/// `MNT/nbd`: `nbdfuse -r -P PIDFILE MNT ARGS...` (ARGS: a URI, or `--command nbdkit -s ...`).
/// Unmounted and reaped on drop.
pub struct NbdFuse {
    child: std::process::Child,
    pub mnt: PathBuf,
}

impl NbdFuse {
    pub fn start<I, S>(mnt: &Path, args: I) -> NbdFuse
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        fs::create_dir_all(mnt).unwrap();
        let pidfile = mnt.with_extension("pid");
        // A pid file left by an earlier mount would look like readiness.
        let _ = fs::remove_file(&pidfile);
        let child = Command::new("nbdfuse")
            .arg("-r")
            .arg("-P")
            .arg(&pidfile)
            .arg(mnt)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nbdfuse");
        let mut f = NbdFuse {
            child,
            mnt: mnt.to_path_buf(),
        };
        // nbdfuse writes its pid file once the file is served.
        let started = std::time::Instant::now();
        while !pidfile.exists() {
            if let Some(status) = f.child.try_wait().unwrap() {
                panic!("nbdfuse exited before serving: {status}");
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(30),
                "nbdfuse did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(
            crate::common::is_mounted(mnt),
            "nbdfuse wrote its pid but is not mounted"
        );
        f
    }

    /// The file that is the export.
    pub fn file(&self) -> PathBuf {
        self.mnt.join("nbd")
    }
}

impl Drop for NbdFuse {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.mnt)
            .status();
        if crate::common::wait_timeout(&mut self.child, std::time::Duration::from_secs(10))
            .is_none()
        {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if crate::common::is_mounted(&self.mnt) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift), the same for the same seed.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// `len` bytes of numbered text lines, the first numbered `first_line`.
pub fn text_lines(len: usize, first_line: u64) -> Vec<u8> {
    let mut t = Vec::with_capacity(len + 80);
    let mut i = first_line;
    while t.len() < len {
        t.extend_from_slice(
            format!(
                "line {i}: the quick brown fox jumps over the lazy dog {}\n",
                i * 7
            )
            .as_bytes(),
        );
        i += 1;
    }
    t.truncate(len);
    t
}

/// A test path as the `&str` an argument list takes.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// The names in `dir`, sorted.
pub fn names(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}
