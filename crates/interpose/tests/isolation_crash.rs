//! Crash tests of isolation (`interpose fs mount BACKING MNT --isolate STORE`), with the
//! real binary and scripts/iso_crash.py (which uses iso_model.py's operations):
//!
//! - SIGKILL of the daemon at random points under a writer doing random operations with
//!   periodic fsync: the dead mount can be unmounted, the same store mounted again, and
//!   the view is the reference after some prefix of the operations that holds at least
//!   every fsync-acknowledged one and no torn one; the journal ends exactly there; BACKING
//!   is untouched throughout; one chain of kills and remounts, committed at the end;
//! - SIGKILL of an offline `interpose isolation commit` at random points: running commit
//!   again (or mounting, which finishes it) leaves BACKING exactly the tree after the
//!   operations committed, nothing doubled or lost.
//!
//! Seeds are printed; `INTERPOSE_ISO_SEED=N` repeats the operations and the kill schedule
//! (the daemon's kill timing itself cannot be repeated exactly; the commit's can, as it is
//! killed by strace at a given system call). For narrowing a failure down (never in a
//! normal run), `INTERPOSE_ISO_EXCLUDE=a,b` leaves kinds of operations out (see
//! iso_model.py), and `commitstate` in it the kill between making the commit state and
//! writing it.

mod common;
mod isomodel;
use common::*;
use isomodel::*;

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_else(|e| format!("<{}: {e}>", path.display()))
}

type Dirs = ModelDirs;

impl ModelDirs {
    fn compare(&self, checked: &Path, reference: &Path) {
        self.model(&[
            "compare".as_ref(),
            checked.as_os_str(),
            reference.as_os_str(),
            self.oplog.as_os_str(),
        ]);
    }

    /// `interpose isolation SUB STORE EXTRA...`, which must succeed; its stdout.
    fn iso(&self, sub: &str, extra: &[&str]) -> String {
        self.iso_when(sub, extra, "")
    }

    /// [`Dirs::iso`], saying `when` if it fails.
    fn iso_when(&self, sub: &str, extra: &[&str], when: &str) -> String {
        let out = Command::new(bin())
            .args(["isolation", sub])
            .arg(&self.store)
            .args(extra)
            .output()
            .unwrap();
        let when = if when.is_empty() {
            format!("seed {}", self.seed)
        } else {
            when.to_owned()
        };
        assert!(
            out.status.success(),
            "{when}: interpose isolation {sub} {extra:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn status(&self) -> Value {
        self.status_when("")
    }

    fn status_when(&self, when: &str) -> Value {
        let out = self.iso_when("status", &["--json"], when);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json: {e}:\n{out}"))
    }
}

fn stop(mnt: Mount) {
    let err = mnt.stop();
    for bad in ["panicked", "ERROR"] {
        assert!(!err.contains(bad), "the daemon logged {bad:?}:\n{err}");
    }
}

// ---------------------------------------------------------------------------------------
// (a) SIGKILL of the daemon under a writer

const DAEMON_KILLS: u64 = 32;

#[test]
fn crash_daemon_sigkill_keeps_fsynced_operations() {
    let seed = seed();
    eprintln!("daemon kills: seed {seed} (INTERPOSE_ISO_SEED={seed} repeats the schedule)");
    let mut rng = Rng(seed ^ 0xdead);
    let d = Dirs::new("interpose-test-isocrash-", seed);
    let work = d.root.join("work");
    std::fs::create_dir(&work).unwrap();
    let started = Instant::now();
    // An Option: the old Mount must be gone before the new one is made, as its Drop would
    // unmount whatever is mounted at MNT.
    let mut mnt = Some(d.mount());
    let mut first = 1u64;
    let (mut at_completed, mut at_inflight, mut lost, mut mid_op) = (0, 0, 0, 0);
    for kill in 0..DAEMON_KILLS {
        let what = format!("seed {seed}, kill {kill}");
        let writer_err = work.join(format!("writer-{kill}.err"));
        let mut reaper = Reaper::default();
        let mut writer = Command::new("python3")
            .arg(script("iso_crash.py"))
            .arg("writer")
            .arg(&d.mnt)
            .arg(&d.reference)
            .arg(&d.store)
            .arg(seed.to_string())
            .arg(first.to_string())
            .arg(&d.oplog)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&writer_err).unwrap())
            .spawn()
            .expect("python3");
        let stdout = writer.stdout.take().unwrap();
        reaper.0.push(writer);
        // A thread reads the writer's progress, so that a hung writer cannot hang the test.
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Kill after a random number of finished operations: a random moment later, or
        // (as often) just as the next operation reaches the mount.
        let target = rng.range(1, 40);
        let in_op = rng.range(0, 1) == 1;
        let mut done = 0;
        loop {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(line) if line.starts_with("D ") => done += 1,
                Ok(line) if line.starts_with("B ") && in_op && done >= target => break,
                Ok(_) => {}
                Err(e) => panic!(
                    "{what}: the writer stopped after {done} operations ({e:?}):\n{}",
                    read_lossy(&writer_err)
                ),
            }
            if done >= target && !in_op {
                break;
            }
        }
        let spin = Duration::from_micros(rng.range(0, if in_op { 300 } else { 3000 }));
        let t = Instant::now();
        while t.elapsed() < spin {
            std::hint::spin_loop();
        }
        mnt.as_mut().unwrap().kill();
        // The writer notices the dead daemon by itself (errors, not a hang) and stops.
        let status = wait_timeout(&mut reaper.0[0], Duration::from_secs(20));
        assert!(
            status.is_some(),
            "{what}: the writer hangs on the dead mount; wait channel {}",
            read_lossy(Path::new(&format!("/proc/{}/wchan", reaper.0[0].id())))
        );
        assert_eq!(
            status.unwrap().code(),
            Some(3),
            "{what}: the writer did not end because the mount went away:\n{}",
            read_lossy(&writer_err)
        );
        reader.join().unwrap();
        assert!(
            is_mounted(&d.mnt),
            "{what}: the dead mount vanished by itself"
        );
        run(Command::new(bin())
            .args(["fs", "unmount", "--lazy"])
            .arg(&d.mnt));
        assert!(!is_mounted(&d.mnt), "{what}: still mounted after unmount");
        drop(mnt.take());
        d.assert_backing_untouched(&what);

        mnt = Some(d.mount());
        let out = d.python(
            "iso_crash.py",
            &[
                "verify".as_ref(),
                d.mnt.as_os_str(),
                d.reference.as_os_str(),
                d.store.as_os_str(),
                d.oplog.as_os_str(),
                work.as_os_str(),
            ],
        );
        let v: Value = serde_json::from_str(out.trim()).unwrap();
        let p = v["p"].as_u64().unwrap();
        let completed = v["completed"].as_u64().unwrap();
        let synced = v["synced"].as_u64().unwrap();
        if !v["inflight"].is_null() {
            mid_op += 1;
        }
        assert!(
            p >= synced && p + 1 >= first,
            "{what}: the view lost fsynced operations: {v}"
        );
        match p.cmp(&completed) {
            std::cmp::Ordering::Equal => at_completed += 1,
            std::cmp::Ordering::Greater => at_inflight += 1,
            std::cmp::Ordering::Less => lost += 1,
        }
        let s = d.status();
        assert_eq!(s["last_seq"], v["last_seq"], "{what}: status {s:#}");
        assert_eq!(s["committed_upto"], Value::from(0), "{what}: status {s:#}");
        assert_eq!(s["interrupted_commit"], Value::Null, "{what}: status {s:#}");
        first = p + 1;
    }
    eprintln!(
        "{DAEMON_KILLS} kills in {:.1?} ({mid_op} during an operation), {} operations kept: \
         the view showed every returned operation {at_completed} times, also the one under \
         way {at_inflight} times, lost unsynced ones {lost} times",
        started.elapsed(),
        first - 1
    );
    assert!(
        first > DAEMON_KILLS,
        "seed {seed}: hardly any operations ran"
    );
    // Everything kept goes to BACKING in one commit.
    d.assert_backing_untouched("after all the kills");
    d.iso("commit", &[]);
    d.compare(&d.backing, &d.reference);
    d.compare(&d.mnt, &d.reference);
    stop(mnt.unwrap());
}

// ---------------------------------------------------------------------------------------
// (b) SIGKILL of an offline commit

const COMMIT_ROUNDS: u64 = 5;
const OPS_PER_ROUND: u64 = 350;
const MIN_COMMIT_KILLS: u64 = 20;

/// Where to kill a commit.
#[derive(Clone, Copy, Debug)]
enum KillPoint {
    /// As it enters its N-th call of this system call (with strace, which counts each
    /// system call on its own).
    Syscall(&'static str, u64),
    /// After this long (without strace).
    After(Duration),
}

/// The system calls a commit of `pending` changes (`isolation log --json`) makes to
/// change something or make it durable, each with about how many times it makes it: the
/// places to kill it.
fn kill_points(pending: &[Value]) -> Vec<(&'static str, u64)> {
    let count = |ops: &[&str]| -> u64 {
        pending
            .iter()
            .filter(|c| ops.contains(&c["op"].as_str().unwrap_or("")))
            .count() as u64
    };
    let destructive = count(&["rename", "unlink", "rmdir"]);
    let made = count(&["create", "mkdir", "symlink", "mknod"]);
    let attrs = count(&["setattr"]);
    let data = count(&["data"]);
    let points = [
        // Barriers: sync BACKING, write the commit state, sync it.
        ("syncfs", destructive + 1),
        ("pwrite64", destructive + 3),
        ("fdatasync", destructive + 3),
        ("renameat2", count(&["rename"])),
        ("unlinkat", count(&["unlink", "rmdir"])),
        ("ftruncate", data),
        ("copy_file_range", data + 1),
        ("fallocate", data),
        ("fchownat", made + attrs),
        ("fchmodat", made + attrs),
        ("utimensat", attrs),
        ("mkdirat", count(&["mkdir"])),
        ("linkat", count(&["link"])),
        ("symlinkat", count(&["symlink"])),
        ("mknodat", count(&["mknod"])),
        ("setxattr", count(&["setxattr"])),
        ("removexattr", count(&["removexattr"])),
        // The lock, the journal, the commit state, new objects, the compacted journal.
        ("openat", made + 12),
        ("openat2", data + 12),
        // Compaction: the new journal renamed into place, the commit state removed.
        ("rename", 1),
        ("unlink", 1),
        ("fsync", 4),
    ];
    points.into_iter().filter(|(_, n)| *n > 0).collect()
}

fn have_strace() -> bool {
    Command::new("strace")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `interpose isolation commit STORE [--upto N]`, killed with SIGKILL at `kill`
/// unless it finishes before: whether it was killed (else it must have succeeded).
fn commit_killed(d: &Dirs, upto: Option<u64>, kill: KillPoint) -> bool {
    let mut cmd = match kill {
        KillPoint::Syscall(call, n) => {
            let mut c = Command::new("strace");
            c.args(["-f", "-qq", "-o", "/dev/null", "-e"])
                .arg(format!("trace={call}"))
                .arg("-e")
                .arg(format!("inject={call}:signal=KILL:when={n}"))
                .arg("--")
                .arg(bin());
            c
        }
        KillPoint::After(_) => Command::new(bin()),
    };
    cmd.args(["isolation", "commit"]).arg(&d.store);
    if let Some(n) = upto {
        cmd.args(["--upto", &n.to_string()]);
    }
    let err = d.root.join("commit.err");
    let mut reaper = Reaper::default();
    let started = Instant::now();
    reaper.0.push(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&err).unwrap())
            .spawn()
            .unwrap(),
    );
    let child = &mut reaper.0[0];
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        match kill {
            KillPoint::After(delay) if started.elapsed() >= delay => {
                signal(child, libc::SIGKILL);
                break child.wait().unwrap();
            }
            _ => {}
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "seed {}: commit hangs",
            d.seed
        );
        std::thread::sleep(Duration::from_micros(200));
    };
    // strace ends itself with the signal that ended the commit.
    if status.signal() == Some(libc::SIGKILL) {
        return true;
    }
    assert!(
        status.success(),
        "seed {}: commit (killed at {kill:?}) failed ({status}):\n{}",
        d.seed,
        read_lossy(&err)
    );
    false
}

#[test]
fn crash_offline_commit_sigkill_resumes() {
    let seed = seed().wrapping_add(7);
    eprintln!(
        "commit kills: seed {seed} (INTERPOSE_ISO_SEED={} repeats it)",
        seed.wrapping_sub(7)
    );
    let strace = have_strace();
    let skip_state_write = std::env::var("INTERPOSE_ISO_EXCLUDE")
        .is_ok_and(|v| v.split(',').any(|t| t == "commitstate"));
    if !strace {
        eprintln!("no strace: killing commits at random moments instead of system calls");
    }
    let mut rng = Rng(seed ^ 0xc0ffee);
    let started = Instant::now();
    let mut kills = 0u64;
    let mut round = 0;
    while round < COMMIT_ROUNDS || (kills < MIN_COMMIT_KILLS && round < 3 * COMMIT_ROUNDS) {
        let mut d = Dirs::new("interpose-test-isocrash-", seed.wrapping_add(round));
        d.env_seed = seed.wrapping_sub(7);
        let mnt = d.mount();
        let out = d.model(&[
            "run".as_ref(),
            d.mnt.as_os_str(),
            d.reference.as_os_str(),
            d.store.as_os_str(),
            d.seed.to_string().as_ref(),
            "1".as_ref(),
            OPS_PER_ROUND.to_string().as_ref(),
            d.oplog.as_os_str(),
        ]);
        stop(mnt);
        let summary: Value = serde_json::from_str(out.trim()).unwrap();
        let last = summary["last_seq"].as_u64().unwrap();
        let seqs: Vec<u64> = std::iter::once(0)
            .chain(std::fs::read_to_string(&d.oplog).unwrap().lines().map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["seq"]
                    .as_u64()
                    .unwrap()
            }))
            .collect();
        // Commit in three steps: up to two random operations, then the rest.
        let mut cuts = [
            rng.range(OPS_PER_ROUND / 8, OPS_PER_ROUND / 2),
            rng.range(OPS_PER_ROUND / 2, OPS_PER_ROUND * 7 / 8),
        ];
        cuts.sort();
        let mut targets: Vec<(Option<u64>, u64)> =
            cuts.iter().map(|&k| (Some(seqs[k as usize]), k)).collect();
        targets.push((None, OPS_PER_ROUND));
        let mut committed_before = 0;
        for (upto, k) in targets {
            let target = upto.unwrap_or(last);
            let what = format!("seed {}, round {round}, commit up to {target}", d.seed);
            let log: Value = serde_json::from_str(&d.iso("log", &["--json"])).unwrap();
            let pending: Vec<Value> = log
                .as_array()
                .unwrap()
                .iter()
                .filter(|c| c["seq"].as_u64().unwrap() <= target)
                .cloned()
                .collect();
            let points = kill_points(&pending);
            let mut finished = false;
            for attempt in 0..10 {
                let kill = if !strace {
                    KillPoint::After(Duration::from_micros(rng.range(500, 15_000)))
                } else if rng.range(0, if attempt == 0 { 1 } else { 5 }) == 0 {
                    // The start: the lock, the journal, the commit state made and synced
                    // (the program's own first openat calls load its libraries).
                    let early = [
                        ("openat", rng.range(6, 10)),
                        // INTERPOSE_ISO_EXCLUDE=commitstate: not between making the commit
                        // state and writing it (for narrowing a failure down).
                        ("pwrite64", if skip_state_write { 2 } else { 1 }),
                        ("fdatasync", 1),
                        ("fsync", 1),
                        ("openat2", 1),
                    ];
                    let (call, n) = early[rng.range(0, early.len() as u64 - 1) as usize];
                    KillPoint::Syscall(call, n)
                } else {
                    let (call, most) = points[rng.range(0, points.len() as u64 - 1) as usize];
                    // Mostly in the first part: a resumed commit starts again at the
                    // last barrier, so it makes fewer calls than counted.
                    KillPoint::Syscall(call, rng.range(1, (most * 2).div_ceil(3)))
                };
                if !commit_killed(&d, upto, kill) {
                    finished = true;
                    break;
                }
                kills += 1;
                let s = d.status_when(&format!("{what}, after a commit killed at {kill:?}"));
                let interrupted = s["interrupted_commit"].as_u64();
                let committed = s["committed_upto"].as_u64().unwrap();
                assert!(
                    interrupted == Some(target)
                        || (interrupted.is_none()
                            && (committed == target || committed == committed_before)),
                    "{what}: after a commit killed at {kill:?}, status --json says {s:#}"
                );
                assert_eq!(s["last_seq"], Value::from(last), "{what}: {s:#}");
                if round == 2 && upto.is_none() && interrupted.is_some() {
                    // Mounting finishes an interrupted commit first.
                    let mnt = d.mount();
                    d.compare(&d.mnt, &d.reference);
                    stop(mnt);
                    finished = true;
                    break;
                }
            }
            if !finished {
                let n = upto.map(|n| n.to_string());
                let extra: Vec<&str> = match &n {
                    Some(n) => vec!["--upto", n],
                    None => vec![],
                };
                d.iso("commit", &extra);
            }
            committed_before = target;
            let s = d.status();
            assert_eq!(s["committed_upto"], Value::from(target), "{what}: {s:#}");
            assert_eq!(s["interrupted_commit"], Value::Null, "{what}: {s:#}");
            assert_eq!(
                s["pending_changes"],
                Value::from(last - target),
                "{what}: {s:#}"
            );
            let want = if upto.is_some() {
                let dir = d.root.join(format!("after-{k}"));
                d.model(&["build".as_ref(), dir.as_os_str()]);
                d.model(&[
                    "replay".as_ref(),
                    dir.as_os_str(),
                    d.oplog.as_os_str(),
                    k.to_string().as_ref(),
                ]);
                dir
            } else {
                d.reference.clone()
            };
            d.compare(&d.backing, &want);
        }
        let mnt = d.mount();
        d.compare(&d.mnt, &d.reference);
        stop(mnt);
        round += 1;
    }
    eprintln!(
        "{kills} commits killed in {round} rounds, {:.1?}",
        started.elapsed()
    );
    assert!(
        kills >= MIN_COMMIT_KILLS,
        "seed {seed}: only {kills} commits were killed before they finished"
    );
}
