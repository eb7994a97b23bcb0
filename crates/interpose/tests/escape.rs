//! The daemon never creates or changes anything outside BACKING: not through symlinks in
//! the tree that point outside (the kernel resolves those in the caller's namespace, which
//! is the caller's business), and not when someone swaps a directory or a name for a
//! symlink on the backing side under the mount's feet (which only the daemon could follow).
//!
//! Each test watches an "outside" directory full of names the operations use, and checks
//! that its manifest (entries, modes, owners, sizes, contents, mtimes, xattrs) and its own
//! attributes are unchanged afterwards.

mod common;
mod support;
use common::*;
use support::*;

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// A directory outside every backing directory, filled with the names the tests use.
struct Outside {
    dir: tempfile::TempDir,
    before: (Vec<String>, String),
}

impl Outside {
    fn new(mode: u32) -> Outside {
        let dir = tempfile::Builder::new()
            .prefix("interpose-outside-")
            .tempdir_in(test_root())
            .unwrap();
        let p = dir.path();
        for name in ["existing", "file2", "victim", "x", "new"] {
            fs::write(p.join(name), format!("outside {name}\n")).unwrap();
        }
        for name in ["sub", "newdir", "dir"] {
            fs::create_dir(p.join(name)).unwrap();
            fs::write(p.join(name).join("inner"), b"outside inner\n").unwrap();
        }
        set_xattr(&p.join("victim"), "user.v", b"untouched");
        for e in fs::read_dir(p).unwrap() {
            let e = e.unwrap().path();
            if !e.is_dir() {
                set_times(&e, 1_000_000_000_000_000_000, 1_000_000_000_000_000_000);
            }
        }
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
        let mut o = Outside {
            dir,
            before: (Vec::new(), String::new()),
        };
        o.before = o.state();
        o
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn state(&self) -> (Vec<String>, String) {
        let md = fs::symlink_metadata(self.path()).unwrap();
        let own = format!(
            "mode={:o} owner={}:{} mtime={}.{} nlink={} xattrs={:?}",
            md.mode(),
            md.uid(),
            md.gid(),
            md.mtime(),
            md.mtime_nsec(),
            md.nlink(),
            xattrs(self.path())
        );
        let opts = ManifestOpts {
            mtime: true,
            owner: true,
        };
        (manifest(self.path(), opts), own)
    }

    fn assert_untouched(&self, what: &str, outcomes: &[(&str, String)]) {
        let (now, own) = self.state();
        let table: String = outcomes
            .iter()
            .map(|(op, res)| format!("  {op}: {res}\n"))
            .collect();
        assert_eq!(
            own,
            self.before.1,
            "{what}: the outside directory {} itself changed; outcomes:\n{table}",
            self.path().display()
        );
        if now != self.before.0 {
            assert_same(
                &format!(
                    "{what}: the outside directory {} changed; outcomes:\n{table}",
                    self.path().display()
                ),
                "before",
                &self.before.0,
                "after",
                &now,
            );
        }
    }
}

fn open_excl(p: &Path) -> std::io::Result<fs::File> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(p)
}

fn open_create(p: &Path) -> std::io::Result<fs::File> {
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(p)
}

fn open_trunc(p: &Path) -> std::io::Result<fs::File> {
    fs::OpenOptions::new().write(true).truncate(true).open(p)
}

fn fchmodat_nofollow(p: &Path, mode: u32) -> std::io::Result<()> {
    let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(p.as_os_str())).unwrap();
    // SAFETY: a NUL-terminated path.
    let rc = unsafe {
        libc::fchmodat(
            libc::AT_FDCWD,
            c.as_ptr(),
            mode as libc::mode_t,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[test]
fn symlinks_on_the_mount_pointing_outside_are_never_followed_by_the_daemon() {
    let m = Mount::new(&[]);
    let outside = Outside::new(0o755);
    let o = outside.path();
    let mnt = &m.mnt;
    symlink(o, mnt.join("out")).unwrap();
    symlink(o.join("victim"), mnt.join("outv")).unwrap();
    symlink("/etc", mnt.join("etc")).unwrap();
    symlink("../../..", mnt.join("up")).unwrap();
    symlink(o.join("new"), mnt.join("to-new")).unwrap();
    symlink(o.join("not-yet"), mnt.join("dangling")).unwrap();
    fs::write(mnt.join("plainfile"), b"mine").unwrap();

    // In order: each operation runs as its entry is built.
    let res: Vec<(&str, String)> = vec![
        (
            "lchown link",
            outcome(std::os::unix::fs::lchown(
                mnt.join("outv"),
                Some(NOBODY),
                Some(NOBODY),
            )),
        ),
        (
            "utimensat nofollow link",
            outcome(try_set_times(&mnt.join("outv"), 5, 5)),
        ),
        (
            "lsetxattr user.* on link",
            outcome(try_set_xattr(&mnt.join("outv"), "user.v", b"changed")),
        ),
        (
            "lsetxattr trusted.* on link",
            outcome(try_set_xattr(&mnt.join("outv"), "trusted.v", b"changed")),
        ),
        (
            "fchmodat nofollow link",
            outcome(fchmodat_nofollow(&mnt.join("outv"), 0o600)),
        ),
        (
            "open O_NOFOLLOW|O_TRUNC link",
            outcome(
                fs::OpenOptions::new()
                    .write(true)
                    .truncate(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(mnt.join("outv")),
            ),
        ),
        (
            "O_CREAT|O_EXCL dangling link",
            outcome(open_excl(&mnt.join("dangling"))),
        ),
        ("mkdir over link", outcome(fs::create_dir(mnt.join("out")))),
        ("rmdir link", outcome(fs::remove_dir(mnt.join("etc")))),
        (
            "mkfifo over link",
            outcome(try_mkfifo(&mnt.join("up"), 0o600)),
        ),
        (
            "hard link of link",
            outcome(fs::hard_link(mnt.join("outv"), mnt.join("outv-hard"))),
        ),
        (
            "rename link",
            outcome(fs::rename(mnt.join("out"), mnt.join("out-renamed"))),
        ),
        (
            "rename file over link",
            outcome(fs::rename(mnt.join("plainfile"), mnt.join("to-new"))),
        ),
        (
            "unlink hard link of link",
            outcome(fs::remove_file(mnt.join("outv-hard"))),
        ),
        ("unlink link", outcome(fs::remove_file(mnt.join("up")))),
    ];

    outside.assert_untouched("operations on symlinks pointing outside", &res);
    // The operations themselves did what they do on a plain directory.
    let lookup = |op: &str| res.iter().find(|(o, _)| *o == op).unwrap().1.clone();
    assert_eq!(lookup("lchown link"), "ok");
    assert_eq!(lookup("utimensat nofollow link"), "ok");
    assert_eq!(lookup("lsetxattr user.* on link"), "EPERM");
    assert_eq!(lookup("fchmodat nofollow link"), "EOPNOTSUPP");
    assert_eq!(lookup("open O_NOFOLLOW|O_TRUNC link"), "ELOOP");
    assert_eq!(lookup("O_CREAT|O_EXCL dangling link"), "EEXIST");
    assert_eq!(lookup("mkdir over link"), "EEXIST");
    assert_eq!(lookup("rmdir link"), "ENOTDIR");
    assert_eq!(lookup("mkfifo over link"), "EEXIST");
    let b = &m.backing;
    let md = fs::symlink_metadata(b.join("outv")).unwrap();
    assert!(md.file_type().is_symlink());
    assert_eq!((md.uid(), md.mtime(), md.mtime_nsec()), (NOBODY, 0, 5));
    assert_eq!(fs::read_link(b.join("out-renamed")).unwrap(), o);
    assert_eq!(fs::read(b.join("to-new")).unwrap(), b"mine");
    assert!(!b.join("up").exists() && !b.join("outv-hard").exists());
    assert_eq!(fs::read_link(b.join("etc")).unwrap(), Path::new("/etc"));
    m.stop();
}

/// Operations through the mount on entries of `d` (a directory the kernel still knows).
fn operate_in(mnt: &Path, d: &str) -> Vec<(&'static str, String)> {
    let p = |rel: &str| mnt.join(d).join(rel);
    vec![
        ("create new", outcome(open_excl(&p("new")))),
        ("create x (no O_EXCL)", outcome(open_create(&p("x")))),
        ("mkdir newdir", outcome(fs::create_dir(p("newdir")))),
        ("mkfifo fifo", outcome(try_mkfifo(&p("fifo"), 0o644))),
        ("symlink sl", outcome(symlink("target", p("sl")))),
        ("unlink existing", outcome(fs::remove_file(p("existing")))),
        ("rmdir dir", outcome(fs::remove_dir(p("dir")))),
        (
            "rename sub -> sub2",
            outcome(fs::rename(p("sub"), p("sub2"))),
        ),
        (
            "hard link file2 -> file2-link",
            outcome(fs::hard_link(p("file2"), p("file2-link"))),
        ),
        ("truncate victim", outcome(open_trunc(&p("victim")))),
        (
            "setxattr victim",
            outcome(try_set_xattr(&p("victim"), "user.v", b"changed")),
        ),
        (
            "chmod victim",
            outcome(fs::set_permissions(
                p("victim"),
                fs::Permissions::from_mode(0o600),
            )),
        ),
        ("utime victim", outcome(try_set_times(&p("victim"), 7, 7))),
        (
            "setxattr on the directory",
            outcome(try_set_xattr(&mnt.join(d), "user.d", b"changed")),
        ),
        (
            "rename victim out of the directory",
            outcome(fs::rename(p("victim"), mnt.join("stolen"))),
        ),
        // Last: the kernel drops its cached entry of a directory whose mode changes, and
        // from then on the caller itself follows the symlink now in its place.
        (
            "chmod the directory",
            outcome(fs::set_permissions(
                mnt.join(d),
                fs::Permissions::from_mode(0o700),
            )),
        ),
    ]
}

/// Makes `d` on the mount with the same names as the outside directory. The kernel learns
/// every name; the descriptors returned (O_PATH) keep those dentries in use, so that memory
/// pressure cannot make the kernel forget them while a test counts on them.
fn make_dir_like_outside(mnt: &Path, d: &str) -> Vec<fs::File> {
    let base = mnt.join(d);
    fs::create_dir(&base).unwrap();
    for name in ["existing", "file2", "victim"] {
        fs::write(base.join(name), format!("inside {name}\n")).unwrap();
    }
    for name in ["sub", "dir"] {
        fs::create_dir(base.join(name)).unwrap();
    }
    let pin = |p: &Path| {
        fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
            .open(p)
            .unwrap()
    };
    let mut pins = vec![pin(&base)];
    for e in fs::read_dir(&base).unwrap() {
        pins.push(pin(&e.unwrap().path()));
    }
    pins
}

enum Swap {
    /// `mv d d.old; ln -s OUTSIDE d`
    RenameAside,
    /// `rm -rf d; ln -s OUTSIDE d`
    Delete,
}

fn swap(backing: &Path, d: &str, outside: &Path, how: Swap) {
    let path = backing.join(d);
    match how {
        Swap::RenameAside => fs::rename(&path, backing.join(format!("{d}.old"))).unwrap(),
        Swap::Delete => fs::remove_dir_all(&path).unwrap(),
    }
    symlink(outside, &path).unwrap();
}

fn assert_still_symlink(backing: &Path, d: &str, outside: &Path) {
    let md = fs::symlink_metadata(backing.join(d)).unwrap();
    assert!(
        md.file_type().is_symlink(),
        "backing {d} is no longer the symlink"
    );
    assert_eq!(fs::read_link(backing.join(d)).unwrap(), outside);
}

#[test]
fn directory_renamed_aside_and_replaced_by_a_symlink_on_the_backing_side() {
    // What the kernel caches is the premise: no other test may drop it meanwhile.
    let _kept = dentries_kept();
    let m = Mount::new(&["--cache-timeout", "600"]);
    let outside = Outside::new(0o755);
    let pins = make_dir_like_outside(&m.mnt, "d");
    swap(&m.backing, "d", outside.path(), Swap::RenameAside);
    let res = operate_in(&m.mnt, "d");
    drop(pins);
    outside.assert_untouched("directory renamed aside, symlink swapped in", &res);
    assert_still_symlink(&m.backing, "d", outside.path());
    // Everything happened in the directory the kernel knew, which is now backing/d.old.
    let failed: Vec<_> = res.iter().filter(|(_, r)| r != "ok").collect();
    assert!(failed.is_empty(), "operations on d.old failed: {failed:?}");
    let old = m.backing.join("d.old");
    assert!(old.join("new").exists() && old.join("newdir").is_dir() && old.join("sub2").is_dir());
    assert!(!old.join("existing").exists() && m.backing.join("stolen").exists());
    assert_eq!(
        fs::metadata(&old).unwrap().permissions().mode() & 0o7777,
        0o700
    );
    m.stop();
}

#[test]
fn directory_deleted_and_replaced_by_a_symlink_on_the_backing_side() {
    // What the kernel caches is the premise: no other test may drop it meanwhile.
    let _kept = dentries_kept();
    let m = Mount::new(&["--cache-timeout", "600"]);
    let outside = Outside::new(0o755);
    let pins = make_dir_like_outside(&m.mnt, "d");
    swap(&m.backing, "d", outside.path(), Swap::Delete);
    let res = operate_in(&m.mnt, "d");
    drop(pins);
    outside.assert_untouched("directory deleted, symlink swapped in", &res);
    assert_still_symlink(&m.backing, "d", outside.path());
    m.stop();
}

#[test]
fn swapped_directory_whose_descriptor_the_daemon_must_reopen() {
    // A tiny descriptor cache: by the time the operations run, the daemon has dropped its
    // descriptor for d and must find d again from what it remembers.
    // What the kernel caches is the premise: no other test may drop it meanwhile.
    let _kept = dentries_kept();
    let m = Mount::new(&["--cache-timeout", "600", "--fd-cache", "16"]);
    let outside = Outside::new(0o755);
    let pins = make_dir_like_outside(&m.mnt, "d");
    swap(&m.backing, "d", outside.path(), Swap::RenameAside);
    for i in 0..64 {
        fs::create_dir(m.mnt.join(format!("evict{i}"))).unwrap();
    }
    let res = operate_in(&m.mnt, "d");
    drop(pins);
    outside.assert_untouched("swapped directory, descriptor evicted", &res);
    assert_still_symlink(&m.backing, "d", outside.path());
    m.stop();
}

#[test]
fn swapped_directory_used_by_an_unprivileged_caller_without_caching() {
    // No caching: the kernel sees the symlink at once and the caller follows it itself,
    // which uid 65534 cannot (the outside directory is root's, mode 0700); only the daemon
    // (root) could change anything there.
    let m = Mount::new(&["--cache-timeout", "0"]);
    make_traversable(&m.dir);
    fs::set_permissions(&m.backing, fs::Permissions::from_mode(0o755)).unwrap();
    let outside = Outside::new(0o700);
    drop(make_dir_like_outside(&m.mnt, "d"));
    let mnt_d = m.mnt.join("d");
    fs::set_permissions(&mnt_d, fs::Permissions::from_mode(0o777)).unwrap();
    for e in fs::read_dir(&mnt_d).unwrap() {
        let e = e.unwrap().path();
        fs::set_permissions(&e, fs::Permissions::from_mode(0o777)).unwrap();
    }
    swap(&m.backing, "d", outside.path(), Swap::RenameAside);
    let script = "cd \"$1\" && for op in 'echo new > d/new' 'mkdir d/newdir' 'rm d/existing' \
                  'mv d/sub d/sub2' 'ln d/file2 d/file2-link' ': > d/victim' \
                  'touch -h -d @7 d/victim' 'chmod 600 d/victim' 'mv d/victim stolen'; do \
                  sh -c \"$op\" 2>/dev/null && echo \"$op: ok\" || echo \"$op: failed\"; done";
    let out = run(as_user(NOBODY, NOBODY, &[])
        .args(["sh", "-c", script, "sh"])
        .arg(&m.mnt));
    let res: Vec<(&str, String)> = vec![("uid 65534 operations", out.clone())];
    outside.assert_untouched("uncached swap, unprivileged caller", &res);
    assert!(
        !out.contains(": ok"),
        "an operation through the swapped-in symlink succeeded for uid 65534:\n{out}"
    );
    assert_still_symlink(&m.backing, "d", outside.path());
    m.stop();
}

#[test]
fn dangling_symlinks_swapped_in_where_the_kernel_remembers_nothing() {
    // The kernel caches that d/x etc. do not exist; on the backing side they become
    // symlinks to names in the outside directory. Creating them through the mount must not
    // create (or open) anything outside.
    // What the kernel caches is the premise: no other test may drop it meanwhile.
    let _kept = dentries_kept();
    let m = Mount::new(&["--cache-timeout", "600"]);
    make_traversable(&m.dir);
    let outside = Outside::new(0o755);
    let o = outside.path();
    fs::create_dir(m.mnt.join("e")).unwrap();
    fs::set_permissions(m.mnt.join("e"), fs::Permissions::from_mode(0o777)).unwrap();
    let names = ["x", "y", "z", "w", "v", "u"];
    for n in names {
        assert!(fs::symlink_metadata(m.mnt.join("e").join(n)).is_err());
    }
    for n in names {
        symlink(o.join(format!("made-{n}")), m.backing.join("e").join(n)).unwrap();
    }
    symlink(o.join("victim"), m.backing.join("e/existing-victim")).unwrap();
    fs::write(m.mnt.join("src"), b"src").unwrap();
    let p = |n: &str| m.mnt.join("e").join(n);
    // An open with O_CREAT but not O_EXCL of a name found to exist is an open of what is
    // there: the daemon has the kernel look again (ESTALE), and the kernel follows the
    // symlink it finds, with the caller's rights, as on BACKING. So it is made by uid
    // 65534, who may not write in the outside directory: only the daemon (root) could.
    let open_x = "import os, sys\n\
        try:\n    os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)\n    print('ok')\n\
        except OSError as e:\n    print(os.strerror(e.errno))\n";
    let open_x = run(as_user(NOBODY, NOBODY, &[])
        .args([python(), "-c", open_x])
        .arg(p("x")));
    let res = vec![
        ("open O_CREAT x (uid 65534)", open_x.trim().to_owned()),
        ("open O_CREAT|O_EXCL y", outcome(open_excl(&p("y")))),
        ("mkdir z", outcome(fs::create_dir(p("z")))),
        ("mkfifo w", outcome(try_mkfifo(&p("w"), 0o644))),
        ("symlink v", outcome(symlink("t", p("v")))),
        (
            "link src -> u",
            outcome(fs::hard_link(m.mnt.join("src"), p("u"))),
        ),
    ];
    outside.assert_untouched("dangling symlinks swapped in", &res);
    // The names exist on the backing side: every creation must fail, none may follow.
    let succeeded: Vec<_> = res.iter().filter(|(_, r)| r == "ok").collect();
    assert!(
        succeeded.is_empty(),
        "creations over swapped-in symlinks succeeded: {succeeded:?}"
    );
    for n in names {
        assert!(
            !o.join(format!("made-{n}")).exists(),
            "made-{n} appeared outside"
        );
    }
    m.stop();
}
