//! The changes isolation records: one per operation that alters the view, each applied to
//! the view at once and to the backing directory at commit.
//!
//! Paths are relative to the backing directory and name the object as the view showed it
//! when the change was made; `None` means the object had no name any more (a file written
//! after it was unlinked), so the change matters to nobody after that file is closed.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Size of the blocks data is held in.
pub const BLOCK: u64 = 4096;

/// A path or name that need not be UTF-8: a JSON string when it is, else `{"raw": [bytes]}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct RawPath(pub Vec<u8>);

impl RawPath {
    pub fn from_path(p: &Path) -> Self {
        RawPath(p.as_os_str().as_bytes().to_vec())
    }
    pub fn as_path(&self) -> &Path {
        Path::new(OsStr::from_bytes(&self.0))
    }
    pub fn to_path_buf(&self) -> PathBuf {
        PathBuf::from(OsString::from_vec(self.0.clone()))
    }
    /// For messages: lossy, never fails.
    pub fn display(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }

    /// For a line of text a terminal shows: exact, and one line. Control characters, a
    /// backslash and bytes that are not UTF-8 are escaped (`\n`, `\\`, `\xff`), so a
    /// name can neither forge another line nor send the terminal escape sequences, and
    /// two names never print the same.
    pub fn escaped(&self) -> String {
        let mut out = String::with_capacity(self.0.len());
        for chunk in self.0.utf8_chunks() {
            for c in chunk.valid().chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\t' => out.push_str("\\t"),
                    c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
                    c => out.push(c),
                }
            }
            for b in chunk.invalid() {
                out.push_str(&format!("\\x{b:02x}"));
            }
        }
        out
    }
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum RawRepr {
    Text(String),
    Raw { raw: Vec<u8> },
}

impl Serialize for RawPath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(&self.0) {
            Ok(t) => RawRepr::Text(t.to_owned()).serialize(s),
            Err(_) => RawRepr::Raw {
                raw: self.0.clone(),
            }
            .serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for RawPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match RawRepr::deserialize(d)? {
            RawRepr::Text(t) => RawPath(t.into_bytes()),
            RawRepr::Raw { raw } => RawPath(raw),
        })
    }
}

/// serde of a `PathBuf` that need not be UTF-8 as a [`RawPath`] (a string when it is):
/// `#[serde(with = "crate::change::raw_path_buf")]`.
pub mod raw_path_buf {
    use super::RawPath;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::path::{Path, PathBuf};

    pub fn serialize<S: Serializer>(p: &Path, s: S) -> Result<S::Ok, S::Error> {
        RawPath::from_path(p).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
        Ok(RawPath::deserialize(d)?.to_path_buf())
    }
}

/// A run of consecutive blocks in a data change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    /// First block (offset / 4096).
    pub block: u64,
    pub count: u64,
    /// Blocks that read as zeros and hold no data (punched holes); otherwise the change's
    /// data carries `count` blocks for this run, in run order.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hole: bool,
    /// Blocks that read as zeros but are allocated (fallocate, FALLOC_FL_ZERO_RANGE): data
    /// for SEEK_DATA, no bytes in the journal.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub alloc: bool,
}

/// A point in time as (seconds, nanoseconds) since the epoch.
pub type Time = (i64, u32);

/// The largest file size Linux allows (MAX_LFS_FILESIZE): offsets are signed 64-bit.
pub const MAX_SIZE: u64 = i64::MAX as u64;
/// The kernel's FUSE passes no longer name (FUSE_NAME_MAX); the backing file system may
/// allow more than the usual 255 bytes.
const NAME_MAX: usize = 1024;
const PATH_MAX: usize = 4096;
const XATTR_NAME_MAX: usize = 255;
const XATTR_SIZE_MAX: usize = 65536;

/// A time as the kernel passes one: nanoseconds below a second.
pub fn check_time(t: Time) -> Result<(), String> {
    if t.1 >= 1_000_000_000 {
        return Err(format!(
            "time {}.{:09}: nanoseconds beyond a second",
            t.0, t.1
        ));
    }
    Ok(())
}

/// A path as changes name things: below BACKING, each component a name (no `..`, `.`,
/// empty or absolute components, no NUL); the root itself (empty) where `root_allowed`.
pub fn check_path(p: &RawPath, root_allowed: bool) -> Result<(), String> {
    if p.0.is_empty() {
        return if root_allowed {
            Ok(())
        } else {
            Err("names the root, which this kind of change cannot".into())
        };
    }
    for c in p.0.split(|&b| b == b'/') {
        if c.is_empty() || c == b"." || c == b".." || c.len() > NAME_MAX || c.contains(&0) {
            return Err(format!(
                "path {:?} does not name something below the backing directory",
                p.display()
            ));
        }
    }
    Ok(())
}

/// An owner the kernel passes: -1 is no user or group (chown(2)'s "leave as it is").
fn check_owner(uid: Option<u32>, gid: Option<u32>) -> Result<(), String> {
    if uid == Some(u32::MAX) || gid == Some(u32::MAX) {
        return Err("owner -1".into());
    }
    Ok(())
}

fn check_xattr_name(name: &RawPath) -> Result<(), String> {
    if name.0.is_empty() || name.0.len() > XATTR_NAME_MAX || name.0.contains(&0) {
        return Err(format!("extended attribute name {:?}", name.display()));
    }
    Ok(())
}

/// What kind of object a create makes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NewKind {
    File,
    Dir,
    Symlink {
        target: RawPath,
    },
    /// mknod: character or block device, fifo or socket; `mode` carries the type bits.
    Node {
        rdev: u64,
    },
}

/// One change, as journalled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Change {
    /// File contents: if `size` is below the old size the file is cut there first; then
    /// the runs are laid down; then the size is `size`.
    Data {
        path: Option<RawPath>,
        size: u64,
        runs: Vec<Run>,
    },
    Create {
        path: RawPath,
        kind: NewKind,
        /// Type and permission bits, after the caller's umask.
        mode: u32,
        uid: u32,
        gid: u32,
    },
    Link {
        from: RawPath,
        to: RawPath,
    },
    Unlink {
        path: RawPath,
    },
    Rmdir {
        path: RawPath,
    },
    Rename {
        from: RawPath,
        to: RawPath,
        /// RENAME_NOREPLACE / RENAME_EXCHANGE bits as given.
        #[serde(default)]
        flags: u32,
    },
    /// `path` None: a file without a name the view knows whose object still has one in
    /// BACKING, in a `--write-through` trail (see `Data`).
    #[serde(rename = "setattr")]
    Attr {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<RawPath>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mode: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        uid: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gid: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        atime: Option<Time>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mtime: Option<Time>,
    },
    #[serde(rename = "setxattr")]
    SetXattr {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<RawPath>,
        name: RawPath,
        value: Vec<u8>,
    },
    #[serde(rename = "removexattr")]
    RemoveXattr {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<RawPath>,
        name: RawPath,
    },
}

impl Change {
    pub fn name(&self) -> &'static str {
        match self {
            Change::Data { .. } => "data",
            Change::Create { kind, .. } => match kind {
                NewKind::File => "create",
                NewKind::Dir => "mkdir",
                NewKind::Symlink { .. } => "symlink",
                NewKind::Node { .. } => "mknod",
            },
            Change::Link { .. } => "link",
            Change::Unlink { .. } => "unlink",
            Change::Rmdir { .. } => "rmdir",
            Change::Rename { .. } => "rename",
            Change::Attr { .. } => "setattr",
            Change::SetXattr { .. } => "setxattr",
            Change::RemoveXattr { .. } => "removexattr",
        }
    }

    /// The paths a change names, first the one it acts on.
    pub fn paths(&self) -> (Option<&RawPath>, Option<&RawPath>) {
        match self {
            Change::Data { path, .. }
            | Change::Attr { path, .. }
            | Change::SetXattr { path, .. }
            | Change::RemoveXattr { path, .. } => (path.as_ref(), None),
            Change::Create { path, .. } | Change::Unlink { path } | Change::Rmdir { path } => {
                (Some(path), None)
            }
            Change::Link { from, to } | Change::Rename { from, to, .. } => (Some(from), Some(to)),
        }
    }

    /// Bytes of block data the change carries in the journal (saturating: a record read
    /// from disk may claim any run).
    pub fn data_len(&self) -> u64 {
        match self {
            Change::Data { runs, .. } => runs
                .iter()
                .filter(|r| !r.hole && !r.alloc)
                .fold(0u64, |sum, r| {
                    sum.saturating_add(r.count.saturating_mul(BLOCK))
                }),
            _ => 0,
        }
    }

    /// Why a change read from a journal cannot be one this program wrote, if it cannot:
    /// its checksum only says the bytes are the ones written, and whoever wrote them. Paths
    /// must name something below BACKING (no `..`, `.`, empty or absolute components), runs
    /// must lie within the largest file size, kinds and modes must agree, names and values
    /// must be what the kernel would have passed. Everything downstream (the view, a
    /// commit) relies on this.
    pub fn check(&self) -> Result<(), String> {
        match self {
            Change::Data {
                path: p,
                size,
                runs,
            } => {
                if let Some(p) = p {
                    check_path(p, false)?;
                }
                if *size > MAX_SIZE {
                    return Err(format!("size {size} beyond the largest file size"));
                }
                for r in runs {
                    let end = r.block.checked_add(r.count);
                    if r.count == 0 || end.is_none_or(|e| e > MAX_SIZE.div_ceil(BLOCK)) {
                        return Err(format!("a run of {} blocks at block {}", r.count, r.block));
                    }
                    if r.hole && r.alloc {
                        return Err("a run that is both a hole and allocated".into());
                    }
                }
            }
            Change::Create {
                path: p,
                kind,
                mode,
                uid,
                gid,
            } => {
                check_path(p, false)?;
                check_owner(Some(*uid), Some(*gid))?;
                let ty = mode & libc::S_IFMT;
                let fits = match kind {
                    NewKind::File => ty == libc::S_IFREG,
                    NewKind::Dir => ty == libc::S_IFDIR,
                    NewKind::Symlink { target } => {
                        if target.0.is_empty()
                            || target.0.len() >= PATH_MAX
                            || target.0.contains(&0)
                        {
                            return Err(format!("symlink target {:?}", target.display()));
                        }
                        ty == libc::S_IFLNK
                    }
                    NewKind::Node { .. } => {
                        [libc::S_IFCHR, libc::S_IFBLK, libc::S_IFIFO, libc::S_IFSOCK].contains(&ty)
                    }
                };
                if !fits || mode & !(libc::S_IFMT | 0o7777) != 0 {
                    return Err(format!("mode {mode:o} for a {}", self.name()));
                }
            }
            Change::Link { from, to } | Change::Rename { from, to, .. } => {
                check_path(from, false)?;
                check_path(to, false)?;
                if let Change::Rename { flags, .. } = self {
                    let known = libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE;
                    if flags & !known != 0 || *flags == known {
                        return Err(format!("rename flags {flags:#x}"));
                    }
                }
            }
            Change::Unlink { path: p } | Change::Rmdir { path: p } => check_path(p, false)?,
            Change::Attr {
                path: p,
                mode,
                uid,
                gid,
                atime,
                mtime,
            } => {
                if let Some(p) = p {
                    check_path(p, true)?;
                }
                check_owner(*uid, *gid)?;
                if mode.is_some_and(|m| m & !(libc::S_IFMT | 0o7777) != 0) {
                    return Err(format!("mode {:o}", mode.unwrap_or_default()));
                }
                for t in [atime, mtime].into_iter().flatten() {
                    check_time(*t)?;
                }
            }
            Change::SetXattr {
                path: p,
                name,
                value,
            } => {
                if let Some(p) = p {
                    check_path(p, true)?;
                }
                check_xattr_name(name)?;
                if value.len() > XATTR_SIZE_MAX {
                    return Err(format!(
                        "an extended attribute value of {} bytes",
                        value.len()
                    ));
                }
            }
            Change::RemoveXattr { path: p, name } => {
                if let Some(p) = p {
                    check_path(p, true)?;
                }
                check_xattr_name(name)?;
            }
        }
        Ok(())
    }

    /// Whether it only takes a name away (unlink, rmdir): repeated, such a change finds
    /// its name gone, so a commit fences a run of them once.
    pub fn is_removal(&self) -> bool {
        matches!(self, Change::Unlink { .. } | Change::Rmdir { .. })
    }

    /// Changes that remove or move a name: applying one twice is not the same as once, so
    /// commit makes everything before it durable, and it itself, before going on.
    pub fn is_destructive(&self) -> bool {
        matches!(
            self,
            Change::Unlink { .. } | Change::Rmdir { .. } | Change::Rename { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    /// A name shown in `isolation log` cannot forge a line or reach the terminal as an
    /// escape sequence, and names that differ print differently.
    #[test]
    fn escaped_names_are_one_exact_line() {
        let shown = |b: &[u8]| super::RawPath(b.to_vec()).escaped();
        assert_eq!(shown(b"a\n99 unlink b"), "a\\n99 unlink b");
        assert_eq!(shown(b"\x1b[31mred"), "\\u{1b}[31mred");
        assert_eq!(shown(b"back\\slash\t"), "back\\\\slash\\t");
        assert_eq!(shown("caf\u{e9}".as_bytes()), "caf\u{e9}");
        assert_ne!(shown(b"x\xfe"), shown(b"x\xff"));
        assert_eq!(shown(b"x\xff"), "x\\xff");
    }

    use super::*;

    #[test]
    fn checks_accept_the_edges_the_kernel_allows_and_nothing_past_them() {
        let data = |block, count| Change::Data {
            path: Some(RawPath(b"f".to_vec())),
            size: MAX_SIZE,
            runs: vec![Run {
                block,
                count,
                hole: false,
                alloc: false,
            }],
        };
        let last = MAX_SIZE / BLOCK; // the block holding the largest file's last byte
        assert_eq!(data(last, 1).check(), Ok(()));
        assert!(data(last + 1, 1).check().is_err());
        assert!(data(last, 0).check().is_err());
        assert!(data(u64::MAX, 1).check().is_err());
        let chmod = |path: &[u8]| Change::Attr {
            path: Some(RawPath(path.to_vec())),
            mode: Some(libc::S_IFDIR | 0o700),
            uid: None,
            gid: None,
            atime: Some((i64::MIN, 999_999_999)),
            mtime: None,
        };
        assert_eq!(chmod(b"").check(), Ok(()), "the root's mode");
        assert_eq!(chmod(&[0xff, b'/', 0xfe]).check(), Ok(()), "not UTF-8");
        for bad in [
            &b"/a"[..],
            b"a/",
            b"a//b",
            b"a/./b",
            b"..",
            b"a/../b",
            b"a\0b",
        ] {
            assert!(
                chmod(bad).check().is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let unlink_root = Change::Unlink {
            path: RawPath::default(),
        };
        assert!(unlink_root.check().is_err());
    }

    #[test]
    fn non_utf8_paths_round_trip() {
        let c = Change::Unlink {
            path: RawPath(vec![b'a', 0xff, b'/', 0xfe]),
        };
        let j = serde_json::to_string(&c).unwrap();
        assert!(j.contains("raw"), "{j}");
        assert_eq!(serde_json::from_str::<Change>(&j).unwrap(), c);
        let c = Change::Unlink {
            path: RawPath(b"d/x y".to_vec()),
        };
        let j = serde_json::to_string(&c).unwrap();
        assert_eq!(j, r#"{"op":"unlink","path":"d/x y"}"#);
        assert_eq!(serde_json::from_str::<Change>(&j).unwrap(), c);
    }
}
