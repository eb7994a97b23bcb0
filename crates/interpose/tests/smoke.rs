//! The mount comes up, shows the backing tree, and goes away cleanly.

mod common;
use common::*;

#[test]
fn mount_shows_backing_and_unmounts_cleanly() {
    let m = Mount::new(&[]);
    std::fs::write(m.backing.join("hello.txt"), b"hi\n").unwrap();
    assert_eq!(std::fs::read(m.mnt.join("hello.txt")).unwrap(), b"hi\n");
    std::fs::write(m.mnt.join("new.txt"), b"through the mount").unwrap();
    assert_eq!(
        std::fs::read(m.backing.join("new.txt")).unwrap(),
        b"through the mount"
    );
    m.stop();
}

#[test]
fn killed_daemon_leaves_a_mount_that_unmount_removes() {
    let mut m = Mount::new(&[]);
    std::fs::write(m.mnt.join("f"), b"x").unwrap();
    m.kill();
    assert!(is_mounted(&m.mnt));
    m.cleanup_dead();
    let m2 = Mount::start(&m.backing, &m.mnt, &[]);
    assert_eq!(std::fs::read(m2.mnt.join("f")).unwrap(), b"x");
    m2.stop();
}
