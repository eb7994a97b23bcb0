//! The process on whose behalf an operation runs.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Identity of the process that caused an operation, as the kernel reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Answers about pids remembered for `ttl`, at most `capacity` of them (so a fork storm
/// cannot grow it without limit).
#[derive(Debug)]
struct Remembered<V> {
    entries: Mutex<HashMap<u32, (Instant, V)>>,
    ttl: Duration,
    capacity: usize,
}

impl<V: Clone> Remembered<V> {
    fn new(ttl: Duration, capacity: usize) -> Self {
        Remembered {
            entries: Mutex::new(HashMap::new()),
            ttl,
            capacity,
        }
    }

    fn get(&self, pid: u32) -> Option<V> {
        let entries = self.entries.lock();
        let (at, v) = entries.get(&pid)?;
        (at.elapsed() < self.ttl).then(|| v.clone())
    }

    fn put(&self, pid: u32, v: V) {
        let now = Instant::now();
        let mut entries = self.entries.lock();
        if entries.len() >= self.capacity {
            let ttl = self.ttl;
            entries.retain(|_, (at, _)| now.duration_since(*at) < ttl);
            if entries.len() >= self.capacity {
                entries.clear();
            }
        }
        entries.insert(pid, (now, v));
    }
}

/// Resolves pids to executables through `/proc/PID/exe`, remembering answers for `ttl`.
///
/// The default remembers nothing: a process that calls exec keeps its pid and changes
/// its executable (`cmd > file` in a shell, and every `exec` in a script), and a pid
/// can be reused, so only a fresh read is right.
#[derive(Debug)]
pub struct ExeCache(Remembered<Option<Arc<PathBuf>>>);

impl Default for ExeCache {
    fn default() -> Self {
        Self::new(Duration::ZERO, 4096)
    }
}

impl ExeCache {
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        ExeCache(Remembered::new(ttl, capacity))
    }

    /// The executable of `pid`, or `None` when it cannot be read (gone, kernel thread).
    pub fn exe(&self, pid: u32) -> Option<Arc<PathBuf>> {
        if pid == 0 {
            return None;
        }
        if let Some(exe) = self.0.get(pid) {
            return exe;
        }
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .map(Arc::new);
        if !self.0.ttl.is_zero() {
            self.0.put(pid, exe.clone());
        }
        exe
    }
}

/// Resolves thread ids to the id of their process: the kernel's FUSE requests carry the
/// calling thread's id. Read from `/proc/TID/status` and remembered for a minute (a
/// thread's process never changes, and the kernel does not go through its millions of
/// ids that fast).
#[derive(Debug)]
pub struct ProcessCache(Remembered<u32>);

impl Default for ProcessCache {
    fn default() -> Self {
        ProcessCache(Remembered::new(Duration::from_secs(60), 4096))
    }
}

impl ProcessCache {
    /// The process of thread `tid`, or `None` when it cannot be read (gone).
    pub fn process_of(&self, tid: u32) -> Option<u32> {
        if let Some(pid) = self.remembered(tid) {
            return Some(pid);
        }
        let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
        let pid: u32 = status
            .lines()
            .find_map(|l| l.strip_prefix("Tgid:"))?
            .trim()
            .parse()
            .ok()?;
        self.0.put(tid, pid);
        Some(pid)
    }

    /// Only what is remembered, reading nothing: for a caller whose /proc files must not
    /// be read now (see the audit filter's flush).
    pub fn remembered(&self, tid: u32) -> Option<u32> {
        self.0.get(tid)
    }
}

/// Whether the thread `tid` is being killed: SIGKILL is pending for it. The kernel also
/// marks every thread of a process with a pending SIGKILL when a signal whose default
/// action ends it without a core dump (SIGINT, SIGTERM) arrives, unless it is traced; a
/// core-dumping signal (SIGQUIT, SIGABRT) does not count. Unknown (tid 0, from another pid
/// namespace; /proc unreadable): not killed.
pub fn being_killed(tid: u32) -> bool {
    const SIGKILL_BIT: u64 = 1 << (libc::SIGKILL - 1);
    if tid == 0 {
        return false;
    }
    let Ok(status) = std::fs::read_to_string(format!("/proc/{tid}/status")) else {
        return false;
    };
    status
        .lines()
        .filter_map(|l| {
            l.strip_prefix("SigPnd:")
                .or_else(|| l.strip_prefix("ShdPnd:"))
        })
        .filter_map(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .any(|mask| mask & SIGKILL_BIT != 0)
}
