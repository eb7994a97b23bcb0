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

/// When a pid was resolved, and to what.
type Resolved = (Instant, Option<Arc<PathBuf>>);

/// Resolves pids to executables through `/proc/PID/exe`, remembering answers for `ttl`.
///
/// The default remembers nothing: a process that calls exec keeps its pid and changes
/// its executable (`cmd > file` in a shell, and every `exec` in a script), and a pid
/// can be reused, so only a fresh read is right. With a `ttl`, the cache is bounded so a
/// fork storm cannot grow it without limit.
#[derive(Debug)]
pub struct ExeCache {
    entries: Mutex<HashMap<u32, Resolved>>,
    ttl: Duration,
    capacity: usize,
}

impl Default for ExeCache {
    fn default() -> Self {
        Self::new(Duration::ZERO, 4096)
    }
}

impl ExeCache {
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            ttl,
            capacity,
        }
    }

    /// The executable of `pid`, or `None` when it cannot be read (gone, kernel thread).
    pub fn exe(&self, pid: u32) -> Option<Arc<PathBuf>> {
        if pid == 0 {
            return None;
        }
        let read = || {
            std::fs::read_link(format!("/proc/{pid}/exe"))
                .ok()
                .map(Arc::new)
        };
        if self.ttl.is_zero() {
            return read();
        }
        let now = Instant::now();
        if let Some((at, exe)) = self.entries.lock().get(&pid) {
            if now.duration_since(*at) < self.ttl {
                return exe.clone();
            }
        }
        let exe = read();
        let mut entries = self.entries.lock();
        if entries.len() >= self.capacity {
            let ttl = self.ttl;
            entries.retain(|_, (at, _)| now.duration_since(*at) < ttl);
            if entries.len() >= self.capacity {
                entries.clear();
            }
        }
        entries.insert(pid, (now, exe.clone()));
        exe
    }
}
