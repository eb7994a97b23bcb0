//! How the kernel's requests reach the daemon: over /dev/fuse by default, over io_uring with
//! `--io-uring` where the kernel offers it (scripts/test.sh turns
//! `/sys/module/fuse/parameters/enable_uring` on for the run). The file system tests run over
//! both (see `common::transport_args`); these check that the transport is the one asked for.

mod common;
use common::*;

use std::path::Path;

const SWITCH: &str = "/sys/module/fuse/parameters/enable_uring";

fn require_switch_on() {
    let v = std::fs::read_to_string(SWITCH)
        .unwrap_or_else(|e| panic!("{SWITCH}: {e} (this kernel has no FUSE over io_uring)"));
    assert_eq!(
        v.trim(),
        "Y",
        "{SWITCH} is off; scripts/test.sh turns it on for the test run"
    );
}

/// (thread name, nanoseconds on a CPU so far) of every thread of `pid`.
fn thread_times(pid: u32) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("schedstat")),
        ) else {
            continue; // the thread ended meanwhile
        };
        let ns = stat.split_whitespace().next().unwrap().parse().unwrap();
        out.push((comm.trim().to_owned(), ns));
    }
    out
}

/// CPU time of `pid`'s io_uring workers and of its /dev/fuse threads while `work` runs.
fn cpu_during(pid: u32, work: impl FnOnce()) -> (u64, u64) {
    // (io_uring workers, /dev/fuse threads)
    let split = |times: &[(String, u64)]| {
        times.iter().fold((0, 0), |(uring, dev), (name, t)| {
            if name.starts_with("fuser-uring-") {
                (uring + t, dev)
            } else if name.starts_with("fuser-") {
                (uring, dev + t)
            } else {
                (uring, dev)
            }
        })
    };
    let before = split(&thread_times(pid));
    work();
    let after = split(&thread_times(pid));
    (after.0 - before.0, after.1 - before.1)
}

/// 5,000 lookups the kernel cannot answer from its caches (the mount caches nothing).
fn stat_storm(dir: &Path) {
    for i in 0..5_000 {
        let _ = std::fs::symlink_metadata(dir.join(format!("f{}", i % 50)));
    }
}

/// `--io-uring` unless the io_uring pass of the suite adds it already.
fn with_io_uring<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut v = args.to_vec();
    if transport_args().is_empty() {
        v.push("--io-uring");
    }
    v
}

#[test]
fn io_uring_serves_the_requests_when_asked_for_and_offered() {
    require_switch_on();
    let m = Mount::new_with_prefix(&[], &with_io_uring(&["--cache-timeout", "0"]));
    assert!(m.ready.contains("FUSE over io_uring"), "{}", m.ready);
    for i in 0..50 {
        std::fs::write(m.backing.join(format!("f{i}")), b"x").unwrap();
    }
    let names: Vec<String> = thread_times(m.pid()).into_iter().map(|(n, _)| n).collect();
    let cpus = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap();
    assert!(
        names.iter().any(|n| n.starts_with("fuser-uring-0-")),
        "no worker for queue 0 (CPUs {cpus:?}): {names:?}"
    );
    // (No other test makes the kernel forget this mount's nodes meanwhile: those forgets
    // would be /dev/fuse work.)
    let kept = dentries_kept();
    let (uring, dev) = cpu_during(m.pid(), || stat_storm(&m.mnt));
    drop(kept);
    // The io_uring workers did the work; the /dev/fuse threads (which the kernel still
    // sends FORGET and INTERRUPT) next to nothing.
    assert!(
        uring > 10 * dev,
        "io_uring workers ran {uring} ns, /dev/fuse threads {dev} ns"
    );
    m.stop();
}

#[test]
fn the_default_is_dev_fuse_only() {
    let m = Mount::new_with_prefix(&[], &["--cache-timeout", "0"]);
    if !transport_args().is_empty() {
        // The io_uring pass of the suite asked for it.
        assert!(m.ready.contains("FUSE over io_uring"), "{}", m.ready);
        m.stop();
        return;
    }
    assert!(m.ready.contains("FUSE over /dev/fuse"), "{}", m.ready);
    for i in 0..50 {
        std::fs::write(m.backing.join(format!("f{i}")), b"x").unwrap();
    }
    let names: Vec<String> = thread_times(m.pid()).into_iter().map(|(n, _)| n).collect();
    assert!(
        !names.iter().any(|n| n.starts_with("fuser-uring-")),
        "{names:?}"
    );
    let (_, dev) = cpu_during(m.pid(), || stat_storm(&m.mnt));
    assert!(dev > 0, "the /dev/fuse threads did nothing");
    m.stop();
}

#[test]
fn a_daemon_killed_while_serving_over_io_uring_leaves_a_mount_that_unmounts() {
    require_switch_on();
    let mut m = Mount::new_with_prefix(&[], &with_io_uring(&["--cache-timeout", "0"]));
    assert!(m.ready.contains("FUSE over io_uring"), "{}", m.ready);
    std::fs::write(m.mnt.join("kept"), b"fsynced").unwrap();
    std::fs::File::open(m.mnt.join("kept"))
        .unwrap()
        .sync_all()
        .unwrap();
    // Kill while a reader keeps requests coming: it stats until the mount fails it.
    let (started_tx, started) = std::sync::mpsc::channel();
    let mnt = m.mnt.clone();
    let reader = std::thread::spawn(move || {
        for i in 0..10_000_000u64 {
            if let Err(e) = std::fs::symlink_metadata(mnt.join("kept")) {
                return Some(e.raw_os_error());
            }
            if i == 100 {
                started_tx.send(()).unwrap();
            }
        }
        None
    });
    started.recv().unwrap();
    m.kill();
    let errno = reader
        .join()
        .unwrap()
        .expect("the reader's stats never failed");
    // A request the kernel was handing to the daemon's ring as it died ends with ECANCELED,
    // one the daemon had when the connection was cut with ECONNABORTED, later ones with
    // ENOTCONN.
    let gone = [libc::ENOTCONN, libc::ECONNABORTED, libc::ECANCELED];
    assert!(
        errno.is_some_and(|e| gone.contains(&e)),
        "the reader's stat after the kill: {errno:?} ({})",
        m.ready
    );
    m.cleanup_dead();
    let m2 = Mount::start(&m.backing, &m.mnt, &[]);
    assert_eq!(std::fs::read(m2.mnt.join("kept")).unwrap(), b"fsynced");
    m2.stop();
}

/// Calls that wait on the disk as long as they copy or sync leave the other requests from
/// the same CPU served. Over io_uring only a CPU's own workers (two) take its requests, so
/// two such calls from one CPU held up everything else from it: a stat waited for the
/// copies. Here the copies wait on a frozen BACKING, for as long as the test likes.
#[test]
fn requests_from_a_cpu_whose_workers_wait_on_the_disk_are_served() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::Stdio;
    use std::time::Duration;
    let fs_ = LoopFs::new(64);
    let backing = fs_.dir.join("backing");
    std::fs::create_dir(&backing).unwrap();
    std::fs::write(backing.join("src"), vec![7u8; 1 << 20]).unwrap();
    let mnt = tempfile::Builder::new()
        .prefix("interpose-test-cpu-")
        .tempdir_in(test_root())
        .unwrap();
    let m = Mount::start(&backing, mnt.path(), &[]);
    let mut programs = Reaper::default();
    // Each opens its files, says so, and copies when told: made while BACKING can still
    // be written.
    let mut copiers = Vec::new();
    for i in 0..2 {
        let mut child = std::process::Command::new("taskset")
            .args(["-c", "0", "python3", "-I", "-c"])
            .arg(
                "import os, sys\n\
                 s = os.open(sys.argv[1] + '/src', os.O_RDONLY)\n\
                 d = os.open(sys.argv[1] + '/dst' + sys.argv[2], os.O_WRONLY | os.O_CREAT, 0o644)\n\
                 print('ready', flush=True)\n\
                 sys.stdin.readline()\n\
                 n = 0\n\
                 while n < 1 << 20:\n\
                 \x20   n += os.copy_file_range(s, d, (1 << 20) - n)\n",
            )
            .arg(mnt.path())
            .arg(i.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "ready\n");
        let stdin = child.stdin.take().unwrap();
        copiers.push((programs.add(child), stdin));
    }
    run(std::process::Command::new("fsfreeze")
        .arg("-f")
        .arg(&fs_.dir));
    let _thaw = Undo("fsfreeze", "-u", fs_.dir.clone());
    for (i, stdin) in &mut copiers {
        writeln!(stdin, "go").unwrap();
        await_waiting_on_fuse(programs.0[*i].id());
    }
    // A lookup from the same CPU (a name never looked up, so the daemon is asked).
    let mut probe = std::process::Command::new("taskset")
        .args(["-c", "0", "stat"])
        .arg(mnt.path().join("probe"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let answered = wait_timeout(&mut probe, Duration::from_secs(20));
    if answered.is_none() {
        let _ = probe.kill();
    }
    run(std::process::Command::new("fsfreeze")
        .arg("-u")
        .arg(&fs_.dir));
    let _ = probe.wait();
    for (i, _) in &copiers {
        let status = wait_timeout(&mut programs.0[*i], Duration::from_secs(60)).unwrap();
        assert!(status.success(), "copier {i}: {status}");
    }
    assert!(
        answered.is_some(),
        "a stat from the CPU of two waiting copies was not answered"
    );
    for i in 0..2 {
        assert_eq!(
            std::fs::read(backing.join(format!("dst{i}"))).unwrap(),
            vec![7u8; 1 << 20]
        );
    }
    m.stop();
}
