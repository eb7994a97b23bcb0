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
    #[serde(rename = "setattr")]
    Attr {
        path: RawPath,
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
        path: RawPath,
        name: RawPath,
        value: Vec<u8>,
    },
    #[serde(rename = "removexattr")]
    RemoveXattr {
        path: RawPath,
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
            Change::Data { path, .. } => (path.as_ref(), None),
            Change::Create { path, .. }
            | Change::Unlink { path }
            | Change::Rmdir { path }
            | Change::Attr { path, .. }
            | Change::SetXattr { path, .. }
            | Change::RemoveXattr { path, .. } => (Some(path), None),
            Change::Link { from, to } | Change::Rename { from, to, .. } => (Some(from), Some(to)),
        }
    }

    /// Bytes of block data the change carries in the journal.
    pub fn data_len(&self) -> u64 {
        match self {
            Change::Data { runs, .. } => runs
                .iter()
                .filter(|r| !r.hole && !r.alloc)
                .map(|r| r.count * BLOCK)
                .sum(),
            _ => 0,
        }
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
    use super::*;

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
