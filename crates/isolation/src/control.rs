//! The mounted daemon's control socket (`STORE/control.sock`, mode 0600, callers checked
//! with SO_PEERCRED: root or the daemon's own user), and the client side the `interpose
//! isolation` commands use. One request per connection, one JSON object per line:
//!
//! ```text
//! → {"cmd":"status"} | {"cmd":"log","since":N} | {"cmd":"commit","upto":N} | {"cmd":"discard","after":N}
//! ← {"progress":{...}}* or {"entry":{...}}* (log)  then  {"ok":VALUE} or {"error":"MESSAGE"}
//! ```
//! While a commit or discard runs, file-system requests wait: the view never shows a
//! half-done state. After a discard the kernel's caches of the view are invalidated.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::fs::Shared;
use crate::journal::{Journal, Record};
use crate::store::{CommitProgress, LogEntryRef, Store, Tally};
use crate::view::View;
use crate::Error;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Request {
    pub cmd: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upto: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
}

/// A line of a log's answer.
#[derive(Serialize)]
struct Line<'a> {
    entry: LogEntryRef<'a>,
}

/// Listens on the store's socket; serves requests on their own threads until the
/// process ends. The socket file is removed by [`Listening`]'s drop.
pub struct Listening {
    path: std::path::PathBuf,
}

impl Drop for Listening {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

pub fn start(store: Arc<Store>, shared: Arc<Shared>) -> Result<Listening, Error> {
    let path = Store::socket_path(store.dir());
    let _ = std::fs::remove_file(&path); // a stale socket of a killed daemon (we hold the lock)
    let listener = UnixListener::bind(&path).map_err(|e| Error::io(&path, e))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(&path, e))?;
    let me = rustix::process::geteuid().as_raw();
    std::thread::Builder::new()
        .name("isolation-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (store, shared) = (store.clone(), shared.clone());
                let _ = std::thread::Builder::new()
                    .name("isolation-request".into())
                    .spawn(move || {
                        let peer = rustix::net::sockopt::socket_peercred(&conn);
                        match peer {
                            Ok(c) if c.uid.as_raw() == 0 || c.uid.as_raw() == me => {}
                            _ => {
                                tracing::warn!("control socket: refused a caller ({peer:?})");
                                return;
                            }
                        }
                        if let Err(e) = serve(&conn, &store, &shared) {
                            tracing::debug!("control connection: {e}");
                        }
                    });
            }
        })
        .map_err(|e| Error::io(&path, e))?;
    Ok(Listening { path })
}

fn send(mut conn: &UnixStream, v: Value) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(&v).expect("serialises");
    line.push(b'\n');
    conn.write_all(&line)
}

/// The longest request line taken; real ones are some tens of bytes.
const MAX_REQUEST: u64 = 64 << 10;

fn serve(conn: &UnixStream, store: &Store, shared: &Shared) -> std::io::Result<()> {
    // A caller that never finishes its line must not hold a thread for ever.
    conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn);
    let mut line = Vec::new();
    (&mut reader)
        .take(MAX_REQUEST)
        .read_until(b'\n', &mut line)?;
    if line.len() as u64 == MAX_REQUEST && line.last() != Some(&b'\n') {
        send(
            conn,
            json!({"error": format!("bad request: longer than {MAX_REQUEST} bytes")}),
        )?;
        // Closing with unread data would reset the connection, and the caller might
        // lose the answer: read on (a bounded amount) until it closes.
        conn.shutdown(std::net::Shutdown::Write)?;
        let _ = std::io::copy(&mut reader.take(64 << 20), &mut std::io::sink());
        return Ok(());
    }
    let req: Request = match serde_json::from_slice(&line) {
        Ok(r) => r,
        Err(e) => return send(conn, json!({"error": format!("bad request: {e}")})),
    };
    match handle(conn, store, shared, &req) {
        Ok(v) => send(conn, json!({ "ok": v })),
        Err(e) => send(conn, json!({ "error": e.to_string() })),
    }
}

use std::io::Read;

fn handle(
    conn: &UnixStream,
    store: &Store,
    shared: &Shared,
    req: &Request,
) -> Result<Value, Error> {
    let jpath = store.dir().join("journal");
    // (Checked again under the lock each command then holds: another command may make
    // the view refuse while this one waits for it.)
    refuse_if_broken(&shared.view.lock())?;
    match req.cmd.as_str() {
        "status" => {
            // Read without holding up the mount for the journal's length (seconds for
            // some GiB); a commit or discard that cut the journal meanwhile makes it read
            // again, the third time under the view's lock.
            for attempt in 1..=3 {
                let v = shared.view.lock();
                let (snap, nodes) = (v.journal.snapshot(), v.node_count() as u64);
                let held = (attempt == 3).then_some(v);
                let mut tally = Tally::default();
                let read = snap.for_each_record(&mut |r| {
                    tally.add(&r);
                    Ok(())
                });
                if held.is_some() || shared.view.lock().journal.extends(&snap) {
                    read?;
                    let mut status = store.status(&snap, &tally, true)?;
                    status.view_nodes = Some(nodes);
                    return Ok(serde_json::to_value(status).expect("serialises"));
                }
            }
            unreachable!("the third attempt returns")
        }
        "log" => {
            // One line per change, written as the journal is read: a log of millions of
            // changes is never in memory. A discard that cuts the journal meanwhile
            // does not touch the snapshot's bytes before the cut; the log is as it was.
            let snap = shared.view.lock().journal.snapshot();
            let since = req.since.unwrap_or(0);
            let mut w = std::io::BufWriter::with_capacity(1 << 16, conn);
            let mut entries = 0u64;
            let path = snap.path().to_path_buf();
            snap.for_each_record(&mut |r| {
                if r.seq <= since {
                    return Ok(());
                }
                entries += 1;
                serde_json::to_writer(
                    &mut w,
                    &Line {
                        entry: LogEntryRef::of(&r),
                    },
                )
                .map_err(std::io::Error::other)
                .and_then(|()| w.write_all(b"\n"))
                .map_err(|e| Error::io(&path, e))
            })?;
            w.flush().map_err(|e| Error::io(&path, e))?;
            Ok(json!({ "entries": entries }))
        }
        "commit" => {
            // Its view replays no records: rebuilt after a refused commit, it would.
            store.refuse_if_write_through(true)?;
            let mut v = shared.view.lock();
            refuse_if_broken(&v)?;
            v.sync()
                .map_err(|e| Error::io(&jpath, std::io::Error::from_raw_os_error(e)))?;
            let recs = v.journal.records()?;
            v.hold_nameless_origins();
            let backing = v.backing.clone();
            let mut progress = |p: CommitProgress| {
                let _ = send(conn, json!({ "progress": p }));
            };
            // Whatever happened, the view is rebuilt from what the store now says: the
            // journal the commit opened again, or (after a failure) the one on disk.
            let (answer, opened) =
                match store.commit(&backing, &v.journal, &recs, req.upto, &mut progress) {
                    Ok((j, rest)) => (
                        Ok(json!({"committed_upto": j.base_seq(), "pending_changes": rest.len()})),
                        Some((j, rest)),
                    ),
                    Err(e) => (Err(e), None),
                };
            // A commit that failed before replacing the journal leaves the old view right:
            // what it applied is in BACKING and still in the view.
            let replaced = opened.is_some() || !v.journal.is_at(&jpath);
            let rebuilt = match rebuild(store, &mut v, true, opened) {
                Err(e) if !replaced => {
                    tracing::warn!("the view could not be rebuilt after the failed commit: {e}; it stays as it was");
                    Ok(())
                }
                other => refuse_unless_rebuilt(&mut v, other),
            };
            // Under the view's lock, before changes can take the room the commit gave back.
            store.keep_reserve();
            drop(v);
            match (answer, rebuilt) {
                (Ok(a), Ok(())) => Ok(a),
                (Ok(_), Err(e)) => Err(Error::Control(format!("the commit is done, but {e}"))),
                (Err(e), Ok(())) => Err(e),
                (Err(e), Err(re)) => Err(Error::Control(format!("{e}; and {re}"))),
            }
        }
        "discard" => {
            store.refuse_if_write_through(false)?;
            let (kept, stale) = {
                let mut v = shared.view.lock();
                refuse_if_broken(&v)?;
                v.sync()
                    .map_err(|e| Error::io(&jpath, std::io::Error::from_raw_os_error(e)))?;
                let recs = v.journal.records()?;
                // The view the discard would leave, first: a change kept that no longer
                // replays onto BACKING (changed behind the store's back) refuses the
                // discard before it cuts anything. Cut first, the mount kept showing the
                // discarded changes, over a journal that no longer held them.
                let mut trial = View::new(v.backing.clone(), v.journal.snapshot())?;
                trial.mode = v.mode.clone();
                trial
                    .replay(&store.kept_by_discard(&recs, req.after)?)
                    .map_err(|e| {
                        Error::Control(format!(
                            "{e}; nothing was discarded: discard after an earlier change, \
                             before the one that no longer fits"
                        ))
                    })?;
                drop(trial);
                let mut stale: Vec<(u64, Option<(u64, std::ffi::OsString)>)> =
                    v.ids().into_iter().map(|i| (i, None)).collect();
                stale.extend(v.bound_names().into_iter().map(|(p, n)| (p, Some((p, n)))));
                // Whatever happened, the view is rebuilt from what the store now says: a
                // discard that failed part-way (no room for its copy of the journal) may
                // have cut the journal already, and a view left as it was went on
                // showing, and recording against, the changes it no longer held.
                v.copy_out_detached_data(store.dir());
                let kept = store.discard(&mut v.journal, &recs, req.after);
                let rebuilt = rebuild(store, &mut v, false, None);
                let rebuilt = refuse_unless_rebuilt(&mut v, rebuilt);
                store.keep_reserve();
                stale.extend(v.bound_names().into_iter().map(|(p, n)| (p, Some((p, n)))));
                let answer = match (kept, rebuilt) {
                    (Ok(kept), Ok(())) => Ok(kept.len()),
                    (Ok(_), Err(e)) => Err(Error::Control(format!("the discard is done, but {e}"))),
                    (Err(e), Ok(())) => Err(e),
                    (Err(e), Err(re)) => Err(Error::Control(format!("{e}; and {re}"))),
                };
                (answer, stale)
            };
            // Outside the lock: the kernel may call back into us while invalidating.
            if let Some(n) = shared.notifier.lock().clone() {
                for (id, name) in stale {
                    let r = match name {
                        None => n.inval_inode(fuser::INodeNo(id), 0, 0),
                        Some((p, name)) => n.inval_entry(fuser::INodeNo(p), &name),
                    };
                    if let Err(e) = r {
                        if e.raw_os_error() != Some(libc::ENOENT) {
                            tracing::debug!("invalidate: {e}");
                        }
                    }
                }
            }
            Ok(json!({ "pending_changes": kept? }))
        }
        other => Err(Error::Control(format!("unknown command {other:?}"))),
    }
}

/// An error if the view refuses changes (see [`refuse_unless_rebuilt`]): its journal may
/// be one a commit replaced, and what a command would read or do from it is stale (a
/// commit would apply changes again).
fn refuse_if_broken(v: &View) -> Result<(), Error> {
    if v.journal.is_refusing() {
        return Err(Error::Control(
            "the mount's view could not be rebuilt after a commit or discard and takes no \
             more changes; unmount it, then use the store unmounted"
                .into(),
        ));
    }
    Ok(())
}

/// `rebuilt`, the result of [`rebuild`] after a commit or discard that changed the
/// journal: if the view could not be rebuilt, the old one takes no more changes, which
/// would be recorded in a journal replaced or cut since, and lost. The error says what to
/// do.
fn refuse_unless_rebuilt(v: &mut View, rebuilt: Result<(), Error>) -> Result<(), Error> {
    rebuilt.map_err(|e| {
        tracing::error!(
            "the view could not be rebuilt from the store: {e}; taking no more changes"
        );
        v.journal.refuse_appends();
        Error::Control(format!(
            "the mount's view could not be rebuilt from the store ({e}): the mount takes no \
             more changes (EROFS); unmount it, and mount it again once the pending changes fit \
             the backing directory, or discard them"
        ))
    })
}

/// Replaces the view with one built from the store, keeping the node numbers the kernel
/// knows for the objects that still exist (see [`View::adopt`]); `committed`: after a
/// commit, else after a discard. `opened`: the store's journal and pending records if
/// the caller has them already, else they are read.
fn rebuild(
    store: &Store,
    v: &mut View,
    committed: bool,
    opened: Option<(Journal, Vec<Record>)>,
) -> Result<(), Error> {
    let started = std::time::Instant::now();
    let (journal, records) = match opened {
        Some(o) => o,
        None => store.journal_checked_before()?,
    };
    let mut fresh = View::new(v.backing.clone(), journal)?;
    // New nodes must not take numbers the kernel still holds for others.
    fresh.set_next_new(v.next_new());
    fresh.keep_device_numbers_of(v);
    fresh.keep_stale_of(v);
    fresh.mode = v.mode.clone();
    fresh.replay(&records)?;
    fresh.xattr_probe = v.xattr_probe.clone();
    fresh.note_lookups = v.note_lookups;
    let replayed = started.elapsed();
    // A commit changes nothing the mount shows: files open without a name stay readable.
    // A discard may throw such a file away (its removal was recorded: it comes back with
    // its name, or it was made in the view and goes; then its number goes stale), but not
    // one whose name went straight to BACKING, which no record names.
    let orphans = v.take_orphans(store.dir(), !committed);
    let known = v.known();
    let listed = started.elapsed();
    let count = known.len();
    fresh.adopt(known, v.next_new(), committed);
    fresh.install_orphans(orphans);
    tracing::debug!(
        "rebuilt the view: {} records replayed in {replayed:?}, {count} nodes the kernel holds listed by {listed:?}, adopted by {:?}",
        records.len(),
        started.elapsed()
    );
    // After a commit, this closes the old journal's last descriptor, which gives its room
    // back before the commit answers (a full store takes changes again at once).
    *v = fresh;
    Ok(())
}

/// Sends a request to a mounted store's daemon. `Ok(None)`: no daemon listens.
pub fn request(
    store_dir: &Path,
    req: &Request,
    progress: &mut dyn FnMut(CommitProgress),
    entry: &mut dyn FnMut(Value),
) -> Result<Option<Value>, Error> {
    let path = Store::socket_path(store_dir);
    let conn = match UnixStream::connect(&path) {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT) | Some(libc::ECONNREFUSED)
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(Error::io(&path, e)),
    };
    send(&conn, serde_json::to_value(req).expect("serialises")).map_err(|e| Error::io(&path, e))?;
    for line in BufReader::new(&conn).lines() {
        let line = line.map_err(|e| Error::io(&path, e))?;
        let mut v: Value = serde_json::from_str(&line)
            .map_err(|e| Error::Control(format!("bad reply from the daemon: {e}")))?;
        drop(line);
        if let Some(e) = v.get_mut("entry") {
            entry(e.take());
        } else if let Some(p) = v.get_mut("progress") {
            if let Ok(p) = serde_json::from_value(p.take()) {
                progress(p);
            }
        } else if let Some(ok) = v.get_mut("ok") {
            // Taken, not copied: a log's answer can be large.
            return Ok(Some(ok.take()));
        } else if let Some(e) = v.get("error") {
            return Err(Error::Control(e.as_str().unwrap_or("error").to_owned()));
        }
    }
    Err(Error::Control(
        "the daemon closed the connection without an answer".into(),
    ))
}
