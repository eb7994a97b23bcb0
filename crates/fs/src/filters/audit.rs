//! `audit=FILE`: one JSON line per operation, readable with jq.
//!
//! Fields: `time` (RFC 3339, UTC), `op`, `path`, `path2` (rename/link target, symlink
//! target), `pid`, `uid`, `gid`, `exe`, `result` (`"ok"` or the errno name), `errno`
//! (0 on success), `bytes` (moved by read/write/copy), `offset`, `size`, `flags`, `mode`
//! (octal; a chmod's permission bits), `xattr`, and a setattr's new `owner`, `group`,
//! `atime` and `mtime` (`"now"` or `[seconds, nanoseconds]`) when they apply, and
//! `latency_us`. `pid` is the calling process's; `tid` is added when a thread of it other
//! than its first made the call. `exe` is null when it cannot be known: the
//! process is gone, or the operation is a flush (see [`Audit::after`]). A path,
//! executable or xattr name that is not UTF-8 is written with U+FFFD replacements in its
//! field (`path`) and exactly, hex-encoded, in the same name with `_hex` (`path_hex`).

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use interpose_core::audit::{rfc3339_now, AuditSink, AuditTarget};
use interpose_core::{errno_name, ExeCache, ProcessCache};
use serde_json::{json, Map, Value};

use crate::filter::{Filter, Outcome, Request, SetTime};

pub struct Audit {
    sink: AuditSink,
    exes: ExeCache,
    processes: ProcessCache,
    io: bool,
}

impl Audit {
    /// `target` is a file path or `-` for standard error; `io` says whether reads and
    /// writes are served by the daemon so that each one is logged.
    pub fn open(target: &str, io: bool) -> Result<Self, interpose_core::audit::AuditError> {
        Ok(Audit {
            sink: AuditSink::open(&AuditTarget::parse(target))?,
            exes: ExeCache::default(),
            processes: ProcessCache::default(),
            io,
        })
    }
}

fn put_path(map: &mut Map<String, Value>, key: &str, path: &Path) {
    put_bytes(map, key, path.as_os_str().as_bytes());
}

fn put_bytes(map: &mut Map<String, Value>, key: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(s) => {
            map.insert(key.into(), Value::String(s.into()));
        }
        Err(_) => {
            map.insert(
                key.into(),
                Value::String(String::from_utf8_lossy(bytes).into_owned()),
            );
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            map.insert(format!("{key}_hex"), Value::String(hex));
        }
    }
}

impl Filter for Audit {
    fn name(&self) -> &str {
        "audit"
    }

    fn wants_data(&self, _path: &Path) -> bool {
        self.io
    }

    fn after(&self, req: &Request, outcome: &Outcome) {
        let mut map = Map::new();
        map.insert("time".into(), Value::String(rfc3339_now()));
        map.insert("op".into(), Value::String(req.op.name().into()));
        put_path(&mut map, "path", &req.path);
        if let Some(p) = &req.path2 {
            put_path(&mut map, "path2", p);
        }
        // Not from /proc for a flush: the kernel sends one for each descriptor a process
        // closes as it execs (close-on-exec), while holding the lock that reading its
        // /proc/PID/exe waits for, and it waits for our answer: reading it here hung the
        // request, and the program (posix_spawn of anything while a file on the mount is
        // open with O_CLOEXEC: cargo, rustc, Go and Java programs).
        let flush = req.op == crate::filter::Op::Flush;
        let tid = req.caller.pid;
        let pid = if flush {
            self.processes.remembered(tid)
        } else {
            self.processes.process_of(tid)
        }
        .unwrap_or(tid);
        map.insert("pid".into(), json!(pid));
        if pid != tid {
            map.insert("tid".into(), json!(tid));
        }
        map.insert("uid".into(), json!(req.caller.uid));
        map.insert("gid".into(), json!(req.caller.gid));
        let exe = if flush { None } else { self.exes.exe(tid) };
        match exe {
            Some(exe) => put_path(&mut map, "exe", &exe),
            None => {
                map.insert("exe".into(), Value::Null);
            }
        }
        let (result, errno, bytes) = match outcome.result {
            Ok(bytes) => ("ok".to_owned(), 0, bytes),
            Err(e) => (
                errno_name(e).map_or_else(|| format!("E{e}"), str::to_owned),
                e,
                0,
            ),
        };
        map.insert("result".into(), Value::String(result));
        map.insert("errno".into(), json!(errno));
        map.insert("bytes".into(), json!(bytes));
        if let Some(v) = req.offset {
            map.insert("offset".into(), json!(v));
        }
        if let Some(v) = req.size {
            map.insert("size".into(), json!(v));
        }
        if let Some(v) = req.flags {
            map.insert("flags".into(), json!(v));
        }
        if let Some(v) = req.mode {
            map.insert("mode".into(), Value::String(format!("{v:o}")));
        }
        if let Some(v) = &req.xattr {
            put_bytes(&mut map, "xattr", v.as_bytes());
        }
        if let Some(v) = req.owner {
            map.insert("owner".into(), json!(v));
        }
        if let Some(v) = req.group {
            map.insert("group".into(), json!(v));
        }
        for (key, t) in [("atime", req.atime), ("mtime", req.mtime)] {
            match t {
                Some(SetTime::Now) => {
                    map.insert(key.into(), json!("now"));
                }
                Some(SetTime::At(s, ns)) => {
                    map.insert(key.into(), json!([s, ns]));
                }
                None => {}
            }
        }
        map.insert(
            "latency_us".into(),
            json!(outcome.latency.as_micros() as u64),
        );
        self.sink
            .record_unless(&Value::Object(map), || req.interrupted());
    }

    fn close(&self) {
        self.sink.close();
    }
}
