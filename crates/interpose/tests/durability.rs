//! Every way a program asks for durability reaches the disk before the call returns:
//! fsync, fdatasync, fsync of a directory, a write through an O_DSYNC open or with
//! RWF_DSYNC, msync of a shared mapping, and (isolated) a clean unmount; and a commit has
//! written what it applied to BACKING's disk before it returns, as `image create` and
//! `image extract` their output. The crash tests
//! kill the daemon, which leaves the page cache in place, so they cannot tell a sync from
//! none; here BACKING or the store lies on a loop device's ext4 without a journal, whose
//! flush requests are counted (nothing but a sync sends one).
//!
//! Not covered, because the kernel does not ask: `syncfs(2)` (`sync -f`) of the mount sends
//! the daemon nothing (the kernel's FUSE sends FUSE_SYNCFS only to virtio-fs), so it makes
//! nothing durable; see the guide.

mod common;
mod support;

use common::*;
use std::fs;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::process::Command;

fn rw(path: &Path, custom: i32) -> fs::File {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(custom)
        .open(path)
        .unwrap()
}

fn every_way(fs_: &LoopFs, mnt: &Path, config: &str) {
    let f = rw(&mnt.join("file"), 0);
    let block = [5u8; 4096];
    let write = |off: u64| f.write_all_at(&block, off).unwrap();
    assert_flushes(
        fs_,
        &format!("{config}: fsync"),
        || write(0),
        || f.sync_all().unwrap(),
    );
    assert_flushes(
        fs_,
        &format!("{config}: fdatasync"),
        || write(4096),
        || f.sync_data().unwrap(),
    );
    let dir = fs::File::open(mnt).unwrap();
    assert_flushes(
        fs_,
        &format!("{config}: fsync of the directory after a create"),
        || drop(rw(&mnt.join("made"), 0)),
        || dir.sync_all().unwrap(),
    );
    assert_flushes(
        fs_,
        &format!("{config}: fsync of the directory after a rename"),
        || fs::rename(mnt.join("made"), mnt.join("renamed")).unwrap(),
        || dir.sync_all().unwrap(),
    );
    let dsync = rw(&mnt.join("file"), libc::O_DSYNC);
    assert_flushes(
        fs_,
        &format!("{config}: a write through an O_DSYNC open"),
        || {},
        || dsync.write_all_at(&block, 8192).unwrap(),
    );
    assert_flushes(
        fs_,
        &format!("{config}: pwritev2 RWF_DSYNC"),
        || write(0),
        || {
            let n = rustix::io::pwritev2(
                f.as_fd(),
                &[std::io::IoSlice::new(&block)],
                12288,
                rustix::io::ReadWriteFlags::DSYNC,
            )
            .unwrap();
            assert_eq!(n, block.len());
        },
    );
    // A shared mapping: its pages go back through the daemon (or the backing file).
    let len = 4 * 4096;
    f.set_len(len as u64).unwrap();
    // SAFETY: a fresh shared mapping of a file this test owns, unmapped below; nothing else
    // refers to it.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
        )
    };
    assert_ne!(map, libc::MAP_FAILED, "{config}: mmap");
    assert_flushes(
        fs_,
        &format!("{config}: msync(MS_SYNC) of a shared mapping"),
        // SAFETY: `map` is a live mapping of `len` bytes.
        || unsafe { std::ptr::write_bytes(map.cast::<u8>(), 9, len) },
        // SAFETY: the same mapping.
        || assert_eq!(unsafe { libc::msync(map, len, libc::MS_SYNC) }, 0, "msync"),
    );
    // SAFETY: the mapping made above, used no more.
    assert_eq!(unsafe { libc::munmap(map, len) }, 0);
    assert_synchronous_writes_flush(fs_, &mnt.join("write-only"));
}

/// A plain mount over BACKING on the loop device, mounted with `args`.
fn plain_mount(args: &[&str], config: &str) {
    let fs_ = LoopFs::new(64);
    let backing = fs_.dir.join("backing");
    fs::create_dir(&backing).unwrap();
    let tmp = tempfile::tempdir_in(test_root()).unwrap();
    let m = Mount::start(&backing, tmp.path(), args);
    every_way(&fs_, tmp.path(), config);
    m.stop();
}

#[test]
fn plain_mount_passthrough() {
    plain_mount(&[], "passthrough");
}

#[test]
fn plain_mount_served_by_the_daemon() {
    plain_mount(&["--no-passthrough"], "--no-passthrough");
}

#[test]
fn isolated_mount_syncs_its_store() {
    let fs_ = LoopFs::new(64);
    let tmp = tempfile::tempdir_in(test_root()).unwrap();
    let (backing, mnt) = (tmp.path().join("backing"), tmp.path().join("mnt"));
    fs::create_dir(&backing).unwrap();
    fs::create_dir(&mnt).unwrap();
    let store = fs_.dir.join("store");
    let m = Mount::start(&backing, &mnt, &["--isolate", store.to_str().unwrap()]);
    every_way(&fs_, &mnt, "isolated");
    assert_flushes(
        &fs_,
        "isolated: a clean unmount",
        || fs::write(mnt.join("last"), b"unsynced").unwrap(),
        || drop(m.stop()),
    );
}

/// A commit, unmounted and mounted, returns only once the data it applied is on BACKING's
/// disk: it then compacts the journal, after which the store no longer has that data.
#[test]
fn a_commit_leaves_its_data_on_backing_s_disk() {
    let fs_ = LoopFs::new(128);
    let backing = fs_.dir.join("backing");
    fs::create_dir(&backing).unwrap();
    let tmp = tempfile::tempdir_in(test_root()).unwrap();
    let (mnt, store) = (tmp.path().join("mnt"), tmp.path().join("store"));
    fs::create_dir(&mnt).unwrap();
    let data = vec![0x5au8; 16 << 20];
    for mounted in [false, true] {
        let m = Mount::start(&backing, &mnt, &["--isolate", store.to_str().unwrap()]);
        fs::write(mnt.join(format!("f{mounted}")), &data).unwrap();
        let m = if mounted {
            Some(m)
        } else {
            drop(m.stop());
            None
        };
        let (before, flushed) = (fs_.bytes_written(), fs_.flushes());
        run(Command::new(bin())
            .args(["isolation", "commit"])
            .arg(&store));
        let written = fs_.bytes_written() - before;
        assert!(
            written >= data.len() as u64 && fs_.flushes() > flushed,
            "mounted {mounted}: the commit returned with {written} bytes written to BACKING's disk, of {}, and {} flushes",
            data.len(),
            fs_.flushes() - flushed
        );
        if let Some(m) = m {
            m.stop();
        }
        assert_eq!(fs::read(backing.join(format!("f{mounted}"))).unwrap(), data);
    }
}

/// `image create` and `image extract` return once their output is on its disk.
#[test]
fn images_and_extracted_disks_are_on_disk_when_the_command_returns() {
    let fs_ = LoopFs::new(128);
    let tmp = tempfile::tempdir_in(test_root()).unwrap();
    let src = tmp.path().join("disk.raw");
    // Data that does not compress away, so the image is about as large.
    let raw = support::random_bytes(16 << 20, 1);
    fs::write(&src, &raw).unwrap();
    let img = fs_.dir.join("disk.img");
    let back = fs_.dir.join("disk.back");
    for (what, args) in [
        (
            "image create",
            vec![src.as_os_str(), "-o".as_ref(), img.as_os_str()],
        ),
        (
            "image extract",
            vec![img.as_os_str(), "-o".as_ref(), back.as_os_str()],
        ),
    ] {
        let (before, flushed) = (fs_.bytes_written(), fs_.flushes());
        let sub = what.split(' ').nth(1).unwrap();
        run(Command::new(bin()).args(["image", sub]).args(args));
        let written = fs_.bytes_written() - before;
        assert!(
            written >= 15 << 20 && fs_.flushes() > flushed,
            "{what} returned with {written} bytes written to its output's disk and {} flushes",
            fs_.flushes() - flushed
        );
    }
    assert!(fs::read(&back).unwrap() == raw);
}
