//! Unprivileged callers (uid 65534, via setpriv) on the mount: ownership of what they
//! create, permission checks (modes, groups, setgid directories, sticky directories,
//! ACLs), compared with the same operations on a plain directory prepared the same way.
//! The plain run gives the expected outcome; a few facts are also asserted outright.

mod common;
mod support;
use common::*;
use support::*;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};

const GROUP: u32 = 1234;
const OTHER_USER: u32 = 4242;

fn file(path: &Path, data: &[u8], uid: u32, gid: u32, mode: u32) {
    fs::write(path, data).unwrap();
    lchown(path, uid, gid);
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn dir(path: &Path, uid: u32, gid: u32, mode: u32) {
    fs::create_dir(path).unwrap();
    lchown(path, uid, gid);
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn setfacl(path: &Path, spec: &str) {
    run(Command::new("setfacl").args(["-m", spec]).arg(path));
}

/// The tree the unprivileged user works in, made by root (through the mount for the mount).
fn prepare(base: &Path) {
    let p = |rel: &str| base.join(rel);
    dir(&p("pub"), 0, 0, 0o777);
    file(&p("pub/rootowned"), b"r", 0, 0, 0o644);
    file(&p("pub/rootowned2"), b"r", 0, 0, 0o644);
    file(&p("rootfile"), b"root data", 0, 0, 0o644);
    set_xattr(&p("rootfile"), "user.tag", b"public");
    file(&p("secret"), b"secret", 0, 0, 0o600);
    set_xattr(&p("secret"), "user.tag", b"hidden");
    dir(&p("grp"), 0, GROUP, 0o770);
    dir(&p("sgid"), 0, GROUP, 0o2770);
    dir(&p("sgid_open"), 0, GROUP, 0o2777);
    file(&p("gfile"), b"group data", 0, GROUP, 0o660);
    dir(&p("sticky"), 0, 0, 0o1777);
    file(&p("sticky/rootf"), b"root's", 0, 0, 0o666);
    file(
        &p("sticky/other"),
        b"other's",
        OTHER_USER,
        OTHER_USER,
        0o666,
    );
    dir(&p("ro_dir"), 0, 0, 0o755);
    file(&p("ro_dir/existing"), b"e", 0, 0, 0o666);
    dir(&p("dirnox"), 0, 0, 0o744);
    file(&p("dirnox/f"), b"f", 0, 0, 0o644);
    dir(&p("own"), NOBODY, NOBODY, 0o755);
    file(&p("own/g1234"), b"g", NOBODY, GROUP, 0o644);
    file(&p("own/suid"), b"s", NOBODY, NOBODY, 0o4755);
    // ACLs: one granting the user what the mode bits deny, one denying what they grant.
    file(&p("aclfile"), b"acl granted", 0, 0, 0o600);
    file(&p("denyacl"), b"acl denied", 0, 0, 0o644);
    dir(&p("acldir"), 0, 0, 0o700);
    setfacl(&p("aclfile"), "u:65534:r");
    setfacl(&p("denyacl"), "u:65534:-");
    setfacl(&p("acldir"), "u:65534:rwx");
    symlink("rootfile", p("link-to-rootfile")).unwrap();
    // Set-ID bits: who may drop them, and which go. chown(f, -1, -1) reaches the daemon as
    // the same request as a write's dropping of them.
    dir(&p("setid"), 0, 0, 0o755);
    file(&p("setid/root_suid"), b"s", 0, 0, 0o4755);
    file(&p("setid/own_suid"), b"s", NOBODY, NOBODY, 0o4755);
    file(&p("setid/own_suid_appended"), b"s", NOBODY, NOBODY, 0o4755);
    file(
        &p("setid/own_sgid_foreign_group"),
        b"s",
        NOBODY,
        OTHER_USER,
        0o2775,
    );
    file(&p("setid/writable_suid"), b"s", 0, 0, 0o4777);
    file(&p("setid/truncated_suid"), b"s", 0, 0, 0o4777);
    file(&p("setid/otrunc_suid"), b"s", 0, 0, 0o4777);
    file(&p("setid/acl_writable_suid"), b"s", 0, 0, 0o4755);
    setfacl(&p("setid/acl_writable_suid"), "u:65534:rw");
    // Set-group-ID without group execute goes only for a writer outside the group.
    file(&p("setid/sgid_nogx_user"), b"s", 0, GROUP, 0o2766);
    file(&p("setid/sgid_nogx_member"), b"s", 0, GROUP, 0o2766);
    // A file capability on a file the user may write: writing must strip it.
    fs::copy("/bin/true", p("capfile")).unwrap();
    fs::set_permissions(p("capfile"), fs::Permissions::from_mode(0o777)).unwrap();
    // setcap comes with libcap2-bin, which scripts/setup.sh installs.
    run(Command::new("setcap")
        .arg("cap_net_raw+ep")
        .arg(p("capfile")));
}

/// Runs nonroot_ops.py PHASE on `base` as uid/gid 65534 with `groups`.
fn ops(base: &Path, phase: &str, groups: &[u32]) -> BTreeMap<String, String> {
    let mut cmd = as_user(NOBODY, NOBODY, groups);
    cmd.arg(python())
        .arg("-")
        .arg(base)
        .arg(phase)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&fs::read(script("nonroot_ops.py")).unwrap())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "nonroot_ops.py: {}", describe(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", describe(&out)))
}

/// Owner, mode and (for files) content length of what the operations left behind.
fn results(base: &Path) -> BTreeMap<String, String> {
    [
        "pub/new",
        "pub/dir",
        "pub/fifo",
        "pub/sl",
        "pub/new-renamed",
        "pub/sgidfile",
        "pub/rootowned",
        "pub/stolen",
        "rootfile",
        "secret",
        "grp/f",
        "grp/d",
        "grp/sgidfile",
        "sgid/f",
        "sgid/d",
        "sgid/sgidfile",
        "sgid_open/f",
        "sgid_open/n",
        "sgid_open/d",
        "sgid_open/chmodded",
        "sticky/rootf",
        "sticky/other",
        "sticky/mine",
        "sticky/mine2",
        "acldir/f",
        "own/g1234",
        "own/suid",
        "ro_dir/existing",
        "gfile",
        "capfile",
        "setid/root_suid",
        "setid/own_suid",
        "setid/writable_suid",
        "setid/truncated_suid",
        "setid/acl_writable_suid",
        "setid/sgid_nogx_user",
        "setid/sgid_nogx_member",
        "setid/own_sgid_foreign_group",
    ]
    .iter()
    .map(|rel| {
        let desc = match fs::symlink_metadata(base.join(rel)) {
            Ok(md) => format!(
                "{}:{} {:o} size={} xattrs={:?}",
                md.uid(),
                md.gid(),
                md.mode(),
                if md.is_dir() { 0 } else { md.len() },
                xattrs(&base.join(rel))
                    .keys()
                    .map(|k| esc(k))
                    .collect::<Vec<_>>()
            ),
            Err(e) => format!("{:?}", e.kind()),
        };
        (rel.to_string(), desc)
    })
    .collect()
}

fn diff(what: &str, plain: &BTreeMap<String, String>, mount: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    for (k, v) in plain {
        let m = mount.get(k).map(String::as_str).unwrap_or("(absent)");
        if m != v {
            out += &format!("  {what} {k}: plain {v}, mount {m}\n");
        }
    }
    out
}

#[test]
fn unprivileged_callers_get_the_same_permissions_and_ownership_as_on_a_plain_directory() {
    same_as_on_a_plain_directory(&[]);
}

/// Files the daemon serves (it drops set-ID bits itself, and must tell the kernel).
#[test]
fn unprivileged_callers_on_a_mount_without_passthrough_as_on_a_plain_directory() {
    same_as_on_a_plain_directory(&["--no-passthrough"]);
}

/// The isolated view keeps modes, owners and ACLs itself.
#[test]
fn unprivileged_callers_on_an_isolated_mount_as_on_a_plain_directory() {
    let stores = plain_dir("interpose-nonroot-store-");
    let store = stores.path().join("store");
    same_as_on_a_plain_directory(&["--isolate", store.to_str().unwrap()]);
}

fn same_as_on_a_plain_directory(mount_args: &[&str]) {
    if !have("setfacl") {
        panic!("setfacl is needed (apt-get install acl)");
    }
    let isolated = mount_args.contains(&"--isolate");
    let plain = plain_dir("interpose-nonroot-");
    make_traversable(plain.path());
    let m = Mount::new(mount_args);
    make_traversable(&m.dir);
    fs::set_permissions(&m.backing, fs::Permissions::from_mode(0o755)).unwrap();
    let (pb, mb) = (plain.path().join("base"), m.mnt.join("base"));
    dir(&pb, 0, 0, 0o755);
    dir(&mb, 0, 0, 0o755);
    prepare(&pb);
    prepare(&mb);

    let plain_user = ops(&pb, "user", &[]);
    let mount_user = ops(&mb, "user", &[]);
    let plain_group = ops(&pb, "group", &[GROUP]);
    let mount_group = ops(&mb, "group", &[GROUP]);
    let (plain_res, mount_res) = (results(&pb), results(&mb));
    let backing_res = results(&m.backing.join("base"));

    // The facts the comparison rests on hold on the plain directory.
    let sanity = [
        (&plain_user, "create_in_writable_dir", "ok"),
        (&plain_user, "write_root_0644", "EACCES"),
        (&plain_user, "read_root_0600", "EACCES"),
        (&plain_user, "create_in_group_dir", "EACCES"),
        (&plain_user, "sticky_unlink_other_users_file", "EPERM"),
        (&plain_user, "read_acl_granted", "ok"),
        (&plain_user, "read_acl_denied", "EACCES"),
        (&plain_group, "create_in_group_dir", "ok"),
        (&plain_group, "create_in_setgid_dir", "ok"),
    ];
    for (res, op, want) in sanity {
        assert_eq!(res[op], want, "on the plain directory, {op}");
    }
    assert!(plain_res["pub/new"].starts_with("65534:65534 100644 size=0 "));
    assert!(plain_res["grp/f"].starts_with("65534:1234 102755 size=0 ")); // chgrp, chmod g+s
    assert!(plain_res["sgid/f"].starts_with("65534:1234 "));
    assert!(plain_res["sgid/d"].starts_with("65534:1234 42"));
    assert_eq!(plain_user["chown_noop_root_setuid_file"], "EPERM");
    assert!(plain_res["setid/root_suid"].starts_with("0:0 104755 "));
    assert!(plain_res["setid/sgid_nogx_user"].starts_with("0:1234 100766 "));
    assert!(plain_res["setid/sgid_nogx_member"].starts_with("0:1234 102766 "));
    assert_eq!(plain_user["mode_right_after_write_setuid"], "100777");
    assert!(plain_res["setid/own_sgid_foreign_group"].starts_with("65534:4242 100775 "));

    let mut problems = diff("user op", &plain_user, &mount_user);
    problems += &diff("group op", &plain_group, &mount_group);
    problems += &diff("result", &plain_res, &mount_res);
    if !isolated {
        problems += &diff("backing result", &mount_res, &backing_res);
    }
    assert!(
        problems.is_empty(),
        "uid 65534 on the mount differs from a plain directory:\n{problems}"
    );
    m.stop();
}

#[test]
fn files_created_by_users_belong_to_them_on_the_backing_side() {
    let m = Mount::new(&[]);
    make_traversable(&m.dir);
    fs::set_permissions(&m.backing, fs::Permissions::from_mode(0o777)).unwrap();
    let mnt = m.mnt.display().to_string();
    run(as_user(NOBODY, NOBODY, &[]).args([
        "sh",
        "-c",
        &format!(
            "set -e; cd '{mnt}'; umask 022; echo hi > f; mkdir d; ln -s f l; mkfifo p; \
             echo more >> f; mv f g; ln g h; rm h"
        ),
    ]));
    for (name, mode) in [
        ("g", 0o100644),
        ("d", 0o40755),
        ("l", 0o120777),
        ("p", 0o10644),
    ] {
        for base in [&m.mnt, &m.backing] {
            let md = fs::symlink_metadata(base.join(name)).unwrap();
            assert_eq!(
                (md.uid(), md.gid(), md.mode()),
                (NOBODY, NOBODY, mode),
                "{} created by uid 65534",
                base.join(name).display()
            );
        }
    }
    assert_eq!(fs::read(m.backing.join("g")).unwrap(), b"hi\nmore\n");
    m.stop();
}

/// A commit run by a user (its store and BACKING theirs) applies the data of a file the
/// user made read-only and wrote through the descriptor that made it, as git writes its
/// objects: the user may not open it for writing again, so the commit lets its owner
/// write it for the while and puts the mode back. It used to stop there with EACCES,
/// every time it was run again.
#[test]
fn a_users_commit_writes_files_they_made_read_only() {
    let base = plain_dir("interpose-nonroot-commit-");
    make_traversable(base.path());
    let (backing, mnt, store) = (
        base.path().join("backing"),
        base.path().join("mnt"),
        base.path().join("store"),
    );
    fs::create_dir(&backing).unwrap();
    fs::create_dir(&mnt).unwrap();
    std::os::unix::fs::chown(&backing, Some(NOBODY), Some(NOBODY)).unwrap();
    let m = Mount::start(&backing, &mnt, &["--isolate", store.to_str().unwrap()]);
    fs::write(backing.join("junk"), b"").unwrap();
    // The removal between the create and the write: a commit run again after one killed
    // in the write starts at the write (the removal's fence), not at the create, whose
    // chmod would otherwise put the mode back by itself.
    let script = "import os, sys\n\
        fd = os.open(sys.argv[1] + '/tmp_obj', os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o444)\n\
        os.unlink(sys.argv[1] + '/junk')\n\
        os.write(fd, b'object contents')\n\
        os.close(fd)\n\
        os.rename(sys.argv[1] + '/tmp_obj', sys.argv[1] + '/obj')\n";
    run(as_user(NOBODY, NOBODY, &[])
        .args([python(), "-c", script])
        .arg(&mnt));
    m.stop();
    // The store handed to the user, as one their own daemon would have made.
    run(Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(&store));
    // Killed between letting the owner write the file and putting the mode back (chmods:
    // the create's, the lift, the putting back), the commit run again puts it back.
    let killed = output(
        as_user(NOBODY, NOBODY, &[])
            .args(["strace", "-f", "-qq", "-o", "/dev/null", "--trace=fchmodat"])
            .args(["--inject=fchmodat:signal=KILL:when=3", "--", bin()])
            .args(["isolation", "commit"])
            .arg(&store),
    );
    assert_eq!(
        killed.status.signal(),
        Some(libc::SIGKILL),
        "the commit was not killed at its third chmod: {}",
        String::from_utf8_lossy(&killed.stderr)
    );
    let lifted = fs::metadata(backing.join("tmp_obj")).unwrap().mode() & 0o7777;
    assert_eq!(lifted, 0o644, "killed while the file's owner may write it");
    let out = output(
        as_user(NOBODY, NOBODY, &[])
            .args([bin(), "isolation", "commit"])
            .arg(&store),
    );
    assert!(
        out.status.success(),
        "the user's commit failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let obj = backing.join("obj");
    assert_eq!(fs::read(&obj).unwrap(), b"object contents");
    let md = fs::metadata(&obj).unwrap();
    assert_eq!(
        (md.uid(), md.gid(), md.mode() & 0o7777),
        (NOBODY, NOBODY, 0o444),
        "owner and mode of the committed file"
    );
    assert!(!backing.join("tmp_obj").exists());
}

/// The kernel remembers a name's absence for a moment (a negative entry) and then sends
/// CREATE for an open with O_CREAT, checking no permission of its own: a file made in
/// BACKING meanwhile must be opened with the caller's permissions, as on BACKING (EACCES
/// for a file the caller may not write). The daemon used to open it as root, truncate
/// it, and give it to the caller.
#[test]
fn an_open_o_creat_of_a_file_made_in_backing_meanwhile_checks_the_callers_permission() {
    let m = Mount::new(&[]);
    make_traversable(&m.dir);
    fs::set_permissions(&m.backing, fs::Permissions::from_mode(0o777)).unwrap();
    let script = "import os, sys\n\
        mnt, backing = sys.argv[1:3]\n\
        try:\n    os.stat(mnt + '/x')\n    sys.exit('x exists already')\n\
        except FileNotFoundError:\n    pass\n\
        fd = os.open(backing + '/x', os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o400)\n\
        os.write(fd, b'kept')\n\
        os.close(fd)\n\
        try:\n    os.open(mnt + '/x', os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)\n    print('opened')\n\
        except PermissionError:\n    print('EACCES')\n";
    let out = run(as_user(NOBODY, NOBODY, &[])
        .args([python(), "-c", script])
        .arg(&m.mnt)
        .arg(&m.backing));
    assert_eq!(out.trim(), "EACCES");
    let md = fs::metadata(m.backing.join("x")).unwrap();
    assert_eq!((md.mode() & 0o7777, md.len()), (0o400, 4));
    assert_eq!(fs::read(m.backing.join("x")).unwrap(), b"kept");
    m.stop();
}

/// When the daemon drops set-ID bits for a write it serves, the kernel must not go on
/// showing the mode it cached before (for its attribute timeout): another process's stat
/// right after the write sees them gone, as on the backing file system.
#[test]
fn set_id_bits_a_served_write_drops_are_gone_at_once_for_every_process() {
    let stores = plain_dir("interpose-nonroot-store-");
    let store = stores.path().join("store");
    for args in [
        vec!["--no-passthrough"],
        vec!["--isolate", store.to_str().unwrap()],
    ] {
        let m = Mount::new(&args);
        make_traversable(&m.dir);
        fs::set_permissions(&m.mnt, fs::Permissions::from_mode(0o777)).unwrap();
        let f = m.mnt.join("f");
        file(&f, b"0123456789", NOBODY, NOBODY, 0o4755);
        assert_eq!(fs::metadata(&f).unwrap().mode() & 0o7777, 0o4755);
        run(as_user(NOBODY, NOBODY, &[])
            .args(["sh", "-c", "printf x >> \"$1\"", "sh"])
            .arg(&f));
        // stat(1) asks statx for the mode alone; the kernel refreshes on its own only the
        // size and times after a write.
        let mode = run(Command::new("stat").args(["-c", "%a"]).arg(&f));
        assert_eq!(mode.trim(), "755", "{args:?}: stale mode after the write");
        assert_eq!(fs::metadata(&f).unwrap().len(), 11, "{args:?}");
        m.stop();
    }
}

/// The whiteout that rename(RENAME_WHITEOUT) leaves at the old name belongs to the caller,
/// as on the backing file system (the daemon renames as root).
#[test]
fn a_whiteout_belongs_to_the_user_who_renamed() {
    let plain = plain_dir("interpose-nonroot-");
    make_traversable(plain.path());
    let m = Mount::new(&[]);
    make_traversable(&m.dir);
    let script = "import ctypes, os, sys\n\
        libc = ctypes.CDLL(None, use_errno=True)\n\
        d = sys.argv[1]\n\
        open(os.path.join(d, 'src'), 'w').close()\n\
        r = libc.renameat2(-100, os.path.join(d, 'src').encode(), -100,\n\
        \x20                  os.path.join(d, 'dst').encode(), 4)\n\
        if r != 0: raise OSError(ctypes.get_errno(), 'renameat2')\n";
    let mut owners = Vec::new();
    for base in [plain.path(), m.mnt.as_path()] {
        let d = base.join("wo");
        dir(&d, 0, 0, 0o777);
        run(as_user(NOBODY, NOBODY, &[])
            .args([python(), "-c", script])
            .arg(&d));
        let md = fs::symlink_metadata(d.join("src")).unwrap();
        assert_eq!(
            md.mode() & libc::S_IFMT,
            libc::S_IFCHR,
            "no whiteout in {d:?}"
        );
        owners.push((md.uid(), md.gid()));
    }
    let md = fs::symlink_metadata(m.backing.join("wo/src")).unwrap();
    owners.push((md.uid(), md.gid()));
    assert_eq!(owners, vec![(NOBODY, NOBODY); 3], "plain, mount, backing");
    m.stop();
}

/// A write through a descriptor opened while its caller could write goes through, and
/// drops the set-ID bits, also after a chmod took the caller's write permission away
/// (the kernel checked it at the open; the daemon must not refuse dropping the bits).
#[test]
fn a_write_through_a_descriptor_opened_before_a_chmod_drops_set_id_bits() {
    use std::io::{BufRead, BufReader};
    for args in [vec![], vec!["--no-passthrough"]] {
        let m = Mount::new(&args);
        make_traversable(&m.dir);
        let f = m.mnt.join("f");
        file(&f, b"0123456789", 0, GROUP, 0o6775);
        let script = "import os, sys\n\
            fd = os.open(sys.argv[1], os.O_WRONLY)\n\
            print('opened', flush=True)\n\
            sys.stdin.readline()\n\
            try:\n\
            \x20   os.write(fd, b'x'); print('ok')\n\
            except OSError as e:\n\
            \x20   print(e)\n";
        let mut child = as_user(NOBODY, NOBODY, &[GROUP])
            .args([python(), "-c", script])
            .arg(&f)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        assert_eq!(lines.next().unwrap().unwrap(), "opened");
        fs::set_permissions(&f, fs::Permissions::from_mode(0o4755)).unwrap();
        child.stdin.take().unwrap().write_all(b"go\n").unwrap();
        assert_eq!(lines.next().unwrap().unwrap(), "ok", "{args:?}");
        assert!(child.wait().unwrap().success());
        assert_eq!(fs::metadata(&f).unwrap().mode() & 0o7777, 0o755, "{args:?}");
        m.stop();
    }
}

/// A caller who is not root meets the limits it meets on BACKING's file system itself:
/// filling the disk through the mount leaves ext4's blocks reserved for root free, with
/// passthrough and without; root can still use them. (The daemon wrote with its own
/// CAP_SYS_RESOURCE, which lifts those limits, and quotas, for everyone.)
#[test]
fn a_caller_who_is_not_root_cannot_use_the_blocks_reserved_for_root() {
    for extra in [&[][..], &["--no-passthrough"][..]] {
        let disk = LoopFs::new(32);
        dir(&disk.dir.join("pub"), 0, 0, 0o777);
        let statvfs = || rustix::fs::statvfs(&disk.dir).unwrap();
        let st = statvfs();
        let reserved = (st.f_bfree - st.f_bavail) * st.f_frsize;
        assert!(reserved >= 1 << 20, "mkfs.ext4 reserved {reserved} bytes");
        let mnt = tempfile::Builder::new()
            .prefix("interpose-test-mnt-")
            .tempdir_in(test_root())
            .unwrap();
        make_traversable(mnt.path());
        let m = Mount::start(&disk.dir, mnt.path(), extra);
        let fill = |who: &mut Command, name: &str| {
            let out = output(
                who.args(["dd", "if=/dev/zero", "bs=64k", "conv=fsync"])
                    .arg(format!("of=pub/{name}"))
                    .current_dir(mnt.path()),
            );
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(
                !out.status.success() && err.contains("No space left"),
                "{extra:?}: {name}: {}",
                describe(&out)
            );
            fs::metadata(mnt.path().join("pub").join(name))
                .unwrap()
                .len()
        };
        fill(&mut as_user(NOBODY, NOBODY, &[]), "by-nobody");
        let left = statvfs().f_bfree * st.f_frsize;
        assert!(
            left >= reserved * 9 / 10,
            "{extra:?}: {left} bytes left of the {reserved} reserved for root"
        );
        // Nor through a shared mapping, whose pages the kernel writes back as root.
        let script = r#"
import mmap, os
fd = os.open('pub/mapped', os.O_RDWR | os.O_CREAT, 0o644)
size = 8 << 20
os.ftruncate(fd, size)
m = mmap.mmap(fd, size)
for off in range(0, size, 4096):
    m[off] = 1
try:
    m.flush()
except OSError:
    pass
"#;
        let out = output(
            as_user(NOBODY, NOBODY, &[])
                .args([python(), "-c", script])
                .current_dir(mnt.path()),
        );
        // (A page the full disk has no block for is SIGBUS, as on BACKING itself.)
        assert!(
            out.status.success() || out.status.signal() == Some(libc::SIGBUS),
            "{extra:?}: {}",
            describe(&out)
        );
        let left = statvfs().f_bfree * st.f_frsize;
        assert!(
            left >= reserved * 9 / 10,
            "{extra:?}: {left} bytes left of the {reserved} reserved for root after a mapping"
        );
        let by_root = fill(&mut Command::new("env"), "by-root");
        assert!(
            by_root >= reserved / 2,
            "{extra:?}: root wrote {by_root} of the {reserved} bytes reserved for it"
        );
        m.stop();
    }
}

/// A caller who is not root lists the xattrs of a file as on BACKING: without the
/// `trusted.*` ones, which the kernel keeps from callers without CAP_SYS_ADMIN (the
/// daemon, which has it, listed them to everyone), on a plain and on an isolated mount.
#[test]
fn trusted_xattrs_are_not_listed_to_callers_who_are_not_root() {
    for extra in [&[][..], &["--isolate"][..]] {
        let tmp = tempfile::Builder::new()
            .prefix("interpose-test-mnt-")
            .tempdir_in(test_root())
            .unwrap();
        make_traversable(tmp.path());
        let (backing, mnt) = (tmp.path().join("backing"), tmp.path().join("mnt"));
        fs::create_dir(&backing).unwrap();
        fs::create_dir(&mnt).unwrap();
        make_traversable(&backing);
        file(&backing.join("f"), b"f", 0, 0, 0o644);
        set_xattr(&backing.join("f"), "user.x", b"1");
        set_xattr(&backing.join("f"), "trusted.secret", b"2");
        let mut args = extra.to_vec();
        let store = tmp.path().join("store");
        if !extra.is_empty() {
            args.push(store.to_str().unwrap());
        }
        let m = Mount::start(&backing, &mnt, &args);
        let list = |dir: &Path, uid: u32| {
            let out = output(
                as_user(uid, uid, &[])
                    .args([
                        python(),
                        "-c",
                        "import os; print(sorted(os.listxattr('f')))",
                    ])
                    .current_dir(dir),
            );
            assert!(out.status.success(), "{}", describe(&out));
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        };
        assert_eq!(
            list(&backing, NOBODY),
            "['user.x']",
            "{extra:?}: on BACKING"
        );
        assert_eq!(list(&mnt, NOBODY), "['user.x']", "{extra:?}: on the mount");
        assert_eq!(
            list(&mnt, 0),
            "['trusted.secret', 'user.x']",
            "{extra:?}: root on the mount"
        );
        m.stop();
    }
}

/// A store another user made, or may write to, is refused before anything in it is
/// touched: its files named as symlinks made root create and pad files of the user's
/// choosing, and its journal would be the user's to write into BACKING at the commit. A
/// store the mount makes is its owner's only (mode 700): it holds the data of every file
/// changed in the view, 0600 ones among them.
#[test]
fn a_store_another_user_made_or_may_write_is_refused() {
    let base = tempfile::tempdir_in(test_root()).unwrap();
    let (backing, mnt) = (base.path().join("backing"), base.path().join("mnt"));
    fs::create_dir(&backing).unwrap();
    fs::create_dir(&mnt).unwrap();
    let victim = base.path().join("victim");
    fs::write(&victim, b"root's\n").unwrap();
    // Made by the user, with a trap in it.
    let planted = base.path().join("planted.store");
    dir(&planted, NOBODY, NOBODY, 0o755);
    symlink(&victim, planted.join("reserve")).unwrap();
    lchown(&planted.join("reserve"), NOBODY, NOBODY);
    let made = base.path().join("made-by-root");
    symlink(&made, planted.join("lock")).unwrap();
    lchown(&planted.join("lock"), NOBODY, NOBODY);
    let err = mount_refused(&backing, &mnt, &["--isolate", planted.to_str().unwrap()]);
    assert!(err.contains("belongs to uid 65534"), "{err}");
    assert_eq!(
        fs::read(&victim).unwrap(),
        b"root's\n",
        "the planted link was followed"
    );
    assert!(!made.exists(), "the planted lock link was followed");
    let out = output(
        Command::new(bin())
            .args(["isolation", "status"])
            .arg(&planted),
    );
    assert!(!out.status.success());
    // Root's, but anyone may write there.
    let open = base.path().join("open.store");
    dir(&open, 0, 0, 0o777);
    let err = mount_refused(&backing, &mnt, &["--isolate", open.to_str().unwrap()]);
    assert!(err.contains("chmod 700"), "{err}");
    // A store the mount makes.
    let store = base.path().join("deep/new.store");
    let m = Mount::start(&backing, &mnt, &["--isolate", store.to_str().unwrap()]);
    m.stop();
    assert_eq!(fs::metadata(&store).unwrap().mode() & 0o777, 0o700);
}

/// A user's own daemon mounts through fusermount3, which takes its options as one
/// comma-separated list: a BACKING named with a comma added options of its name (`b,ro`
/// made the mount read-only, `b,allow_other` opened a `--private` mount to every user).
#[test]
fn a_users_mount_of_a_backing_named_with_commas_takes_no_option_from_the_name() {
    use std::os::unix::ffi::OsStrExt;
    let _restore = users_may_open_dev_fuse();
    let (_base, backing, mnt) = nobodys_dirs("bk,ro,allow_other".as_ref(), "mnt".as_ref());
    let m = Mount::start_with_prefix(&AS_NOBODY, &backing, &mnt, &["--private"]);
    let entry = mount_at(&mnt).expect("the user's mount in mountinfo");
    assert_eq!(entry.source.as_bytes(), backing.as_os_str().as_bytes());
    assert!(entry.options.starts_with("rw,"), "{entry:?}");
    assert!(
        entry.super_options.starts_with("rw,") && !entry.super_options.contains("allow_other"),
        "{entry:?}"
    );
    run(as_user(NOBODY, NOBODY, &[])
        .args(["touch"])
        .arg(mnt.join("written")));
    m.stop();
    assert!(backing.join("written").exists());
}

/// A temporary directory others can reach (kept alive by the first value) holding a
/// backing directory and a mount point of uid 65534's, by these names.
fn nobodys_dirs(
    backing: &std::ffi::OsStr,
    mnt: &std::ffi::OsStr,
) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let base = tempfile::tempdir_in(test_root()).unwrap();
    make_traversable(base.path());
    let (backing, mnt) = (base.path().join(backing), base.path().join(mnt));
    dir(&backing, NOBODY, NOBODY, 0o755);
    dir(&mnt, NOBODY, NOBODY, 0o755);
    (base, backing, mnt)
}

/// `setpriv` arguments that run a command as uid and gid 65534, without other groups.
const AS_NOBODY: [&str; 5] = [
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "--",
];

/// A user's daemon mounts through fusermount3, which opens /dev/fuse as the user: where it
/// is root's only, users may open it until the returned value is dropped. (Tests doing so
/// take turns: one putting the mode back must not pull it from under another's mount.)
fn users_may_open_dev_fuse() -> (Undo, fs::File) {
    dev_fuse_mode_for_a_while(0o666)
}

/// /dev/fuse with mode `mode` until the returned value is dropped (see
/// [`users_may_open_dev_fuse`]).
fn dev_fuse_mode_for_a_while(mode: u32) -> (Undo, fs::File) {
    let turn = fs::File::create(std::env::temp_dir().join("interpose-test-dev-fuse.lock")).unwrap();
    rustix::fs::flock(&turn, rustix::fs::FlockOperation::LockExclusive).unwrap();
    let fuse_mode = fs::metadata("/dev/fuse").unwrap().mode() & 0o777;
    fs::set_permissions("/dev/fuse", fs::Permissions::from_mode(mode)).unwrap();
    let restore = Undo(
        "chmod",
        Box::leak(format!("{fuse_mode:o}").into_boxed_str()),
        "/dev/fuse".into(),
    );
    // (A tuple drops in order: the mode is back before the turn passes.)
    (restore, turn)
}

/// A user's daemon unmounts through `fusermount3 -u` when it stops: it gave it the mount
/// point's name made lossy, so a mount point named in bytes that are not UTF-8 stayed
/// mounted, dead ("Transport endpoint is not connected").
#[test]
fn a_users_daemon_unmounts_a_mount_point_named_in_bytes_when_it_stops() {
    use std::os::unix::ffi::OsStrExt;
    let _restore = users_may_open_dev_fuse();
    let (_base, backing, mnt) =
        nobodys_dirs("backing".as_ref(), std::ffi::OsStr::from_bytes(b"mnt-\xfe"));
    let m = Mount::start_with_prefix(&AS_NOBODY, &backing, &mnt, &["--private"]);
    let stopped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| m.stop()));
    if is_mounted(&mnt) {
        let _ = Command::new("umount").arg("-l").arg(&mnt).status();
        panic!("the mount stayed after its daemon stopped");
    }
    if let Err(panic) = stopped {
        std::panic::resume_unwind(panic);
    }
}

/// Where only root may open /dev/fuse, a user's mount says so (it blamed the mount point:
/// "cannot mount at mnt: Permission denied").
#[test]
fn a_user_who_may_not_open_dev_fuse_is_told_so() {
    let _root_only = dev_fuse_mode_for_a_while(0o600);
    let (_base, backing, mnt) = nobodys_dirs("backing".as_ref(), "mnt".as_ref());
    let out = output(
        as_user(NOBODY, NOBODY, &[])
            .arg(bin())
            .args(["fs", "mount"])
            .arg(&backing)
            .arg(&mnt)
            .arg("--private"),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "mounted: {err}");
    assert!(err.contains("cannot open /dev/fuse"), "{err}");
    assert!(!is_mounted(&mnt));
}
