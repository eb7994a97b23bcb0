//! Isolation for the interpose file system.
//!
//! Mounted with isolation, the file system shows the backing directory plus every change
//! made through the mount since the last commit, while the backing directory itself stays
//! untouched. Every change (data, names, attributes, xattrs) gets the next sequence
//! number and is appended to a journal in the store directory; file data is held per
//! 4 KiB block. `commit --upto N` replays changes 1..=N onto the backing directory,
//! crash-safely; `discard --after N` throws changes away. See docs/ISOLATION.md.
//!
//! Layers: [`change`] (what is recorded), [`journal`] (how it is stored), [`backing`]
//! (safe access to the backing directory and applying a change to it), [`blockmap`] (which
//! blocks of a changed file the view holds, as extents), [`view`] (the
//! in-memory picture of the isolated tree), [`store`] (the store directory: open,
//! status, log, commit, discard), [`fs`] (the FUSE front end) and [`control`] (the
//! running daemon's control socket); [`ahead`] reads the journal ahead of a commit.

pub mod ahead;
pub mod backing;
mod behind;
pub mod blockmap;
pub mod change;
pub mod control;
pub mod fs;
pub mod journal;
pub mod store;
pub mod view;

use std::io;
use std::path::{Path, PathBuf};

pub use store::{CommitProgress, JournalCheck, LogEntry, Status, Store};

/// Everything that can go wrong with a store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: corrupt: {what}", path.display())]
    Corrupt { path: PathBuf, what: String },
    /// A damaged journal record with records after it: the changes before it are whole.
    #[error("{}: corrupt: {what}; the changes up to {last_good} are whole: `interpose isolation discard STORE --after {last_good}`, with the store unmounted, cuts the journal there (keeping a copy of the bytes from there on)", path.display())]
    Damaged {
        path: PathBuf,
        /// Where the damaged record starts.
        offset: u64,
        /// The sequence number of the last whole record before it.
        last_good: u64,
        what: String,
    },
    #[error("store {} belongs to backing directory {recorded}, not {given}", store.display())]
    ForeignBacking {
        store: PathBuf,
        recorded: String,
        given: String,
    },
    #[error("{} is not an isolation store (no store.json); to make one, mount with --isolate", .0.display())]
    NotAStore(PathBuf),
    #[error("store {} is in use by another process (a mount of it, or a commit or discard running on it)", .0.display())]
    Busy(PathBuf),
    #[error("change {seq} ({op} {path}): {source}")]
    Apply {
        seq: u64,
        op: &'static str,
        path: String,
        source: io::Error,
    },
    #[error("replaying change {seq} ({op} {path}) onto the view failed: {what}; the backing directory changed behind the store's back?")]
    Replay {
        seq: u64,
        op: &'static str,
        path: String,
        what: String,
    },
    #[error("a change of {0} bytes is too large for one journal record")]
    TooLarge(u64),
    #[error("sequence number {asked} is out of range: {}", seq_range(*.committed, *.last))]
    BadSeq {
        asked: u64,
        committed: u64,
        last: u64,
    },
    #[error("{0}")]
    Control(String),
}

/// What a sequence number may be, for [`Error::BadSeq`].
fn seq_range(committed: u64, last: u64) -> String {
    if last <= committed {
        format!("nothing is pending (committed up to {committed})")
    } else {
        format!(
            "committed up to {committed}, pending {}..={last}, so {committed}..={last}",
            committed + 1
        )
    }
}

impl Error {
    pub fn io(path: &Path, source: io::Error) -> Error {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// The errno to give a FUSE caller for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } | Error::Apply { source, .. } => {
                source.raw_os_error().unwrap_or(libc::EIO)
            }
            Error::TooLarge(_) => libc::EFBIG,
            _ => libc::EIO,
        }
    }
}

/// A running isolated mount: the FUSE session, the store (and its lock), the control socket.
pub struct IsolatedMount {
    pub mounted: interpose_fs::Mounted,
    pub shared: std::sync::Arc<fs::Shared>,
    /// Keep it while the mount runs: it holds the store's lock and control socket.
    pub guard: Guard,
}

/// The store's lock and the control socket (removed when dropped).
pub struct Guard {
    _control: control::Listening,
    _store: std::sync::Arc<Store>,
}

/// Mounts the isolated view of `backing` at `mountpoint`, keeping changes in `store_dir`
/// (made if missing or empty). An interrupted commit is finished first. `check` hears how
/// far the check of the store's journal has come.
pub fn mount(
    backing: &Path,
    mountpoint: &Path,
    store_dir: &Path,
    mode: view::Mode,
    opts: fs::Options,
    serving: interpose_fs::Serving,
    check: &mut dyn FnMut(JournalCheck),
) -> Result<IsolatedMount, Error> {
    let write_through = matches!(mode, view::Mode::WriteThrough);
    let store = Store::open_or_create(store_dir, backing, write_through)?;
    let b = std::sync::Arc::new(store.backing()?);
    if let Some(t) = store.interrupted_commit()? {
        tracing::info!("finishing an interrupted commit up to change {t}");
        let (j, recs) = store.journal(check)?;
        let done = store.commit(&b, &j, &recs, Some(t), &mut |_| {});
        // The replaced journal closed first: its room is back for the reserve.
        drop(j);
        if let Err(e) = done {
            // The view is still right (applied changes are left out of it); say so.
            tracing::warn!("the interrupted commit could not finish: {e}; mounting with it pending (commit again, or discard)");
        }
        store.keep_reserve();
    }
    let (journal, records) = store.journal(check)?;
    let mut view = view::View::new(b.clone(), journal)?;
    // The mode first: with --isolate-path, replaying notes which paths pending changes
    // keep isolated.
    view.mode = mode;
    if !write_through {
        view.replay(&records)?;
    }
    match view::XattrProbes::new(b.path(), store.dir()) {
        Ok(p) => view.xattr_probe = Some(std::sync::Arc::new(p)),
        Err(e) => tracing::warn!(
            "no file to try xattrs on ({e}): the view takes any, and a commit may refuse some"
        ),
    }
    let shared = fs::Shared::new(view, opts);
    let mounted = interpose_fs::mount_filesystem(
        fs::IsolatedFs(shared.clone()),
        b.path(),
        mountpoint,
        serving,
    )
    .map_err(|e| Error::Control(e.to_string()))?;
    *shared.notifier.lock() = Some(mounted.notifier());
    let store = std::sync::Arc::new(store);
    let control = match control::start(store.clone(), shared.clone()) {
        Ok(c) => c,
        Err(e) => {
            mounted.abandon();
            return Err(e);
        }
    };
    Ok(IsolatedMount {
        mounted,
        shared,
        guard: Guard {
            _control: control,
            _store: store,
        },
    })
}
