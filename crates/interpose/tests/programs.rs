//! Real programs on the mount, compared with the same programs on a plain directory:
//! `cp -a`, `tar` with xattrs and ACLs, a git workflow, SQLite in WAL mode with a
//! concurrent reader. Trees are compared with manifests (type, mode, owner, size, content,
//! symlink target, link counts and hard-link groups, xattrs, holes, mtimes).

mod common;
mod support;
use common::*;
use support::*;

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{symlink, FileExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};

const FULL: ManifestOpts = ManifestOpts {
    mtime: true,
    owner: true,
};

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Builds the sample tree at `root` (created here): nested directories with special
/// modes, files of awkward sizes, symlinks of every kind, hard links, xattrs and ACLs, a
/// sparse file, a FIFO, non-UTF-8 names, foreign owners, fixed mtimes.
fn build_tree(root: &Path) {
    fs::create_dir(root).unwrap();
    let p = |rel: &str| root.join(rel);
    fs::create_dir_all(p("a/b/c")).unwrap();
    fs::create_dir(p("empty")).unwrap();
    fs::create_dir(p("sticky")).unwrap();
    mode(&p("sticky"), 0o1777);
    fs::create_dir(p("setgid")).unwrap();
    lchown(&p("setgid"), 0, 1234);
    mode(&p("setgid"), 0o2775);
    fs::create_dir(p("private")).unwrap();
    mode(&p("private"), 0o700);
    fs::create_dir(p("hl")).unwrap();
    fs::write(p("a/zero"), b"").unwrap();
    fs::write(p("a/one"), b"1").unwrap();
    fs::write(p("a/b/page"), pseudo_random(4096, 1)).unwrap();
    fs::write(p("a/b/c/big"), pseudo_random((1 << 20) + 3, 2)).unwrap();
    mode(&p("a/b/c/big"), 0o640);
    fs::write(p("exec.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    mode(&p("exec.sh"), 0o755);
    fs::write(p("readonly"), b"ro").unwrap();
    mode(&p("readonly"), 0o444);
    fs::write(p("setuid"), b"su").unwrap();
    mode(&p("setuid"), 0o4755);
    fs::write(p("private/owned"), b"nobody's").unwrap();
    lchown(&p("private/owned"), NOBODY, NOBODY);
    fs::write(p("owned2"), b"1234:5678").unwrap();
    lchown(&p("owned2"), 1234, 5678);
    mode(&p("owned2"), 0o600);
    fs::write(p("sticky/f"), b"in sticky").unwrap();
    fs::write(p("setgid/f"), b"in setgid").unwrap();
    // Symlinks.
    symlink("a/one", p("rel")).unwrap();
    symlink("/etc/hostname", p("abs")).unwrap();
    symlink("nowhere", p("dangling")).unwrap();
    symlink("a/b", p("dirlink")).unwrap();
    symlink("rel", p("chain")).unwrap();
    symlink("../../outside-the-tree", p("a/up")).unwrap();
    lchown(&p("chain"), NOBODY, NOBODY);
    // Hard links: three names for a/one, two for a/b/page.
    fs::hard_link(p("a/one"), p("hl/one-again")).unwrap();
    fs::hard_link(p("a/one"), p("hl/one-third")).unwrap();
    fs::hard_link(p("a/b/page"), p("page-link")).unwrap();
    // Extended attributes and ACLs.
    set_xattr(&p("a/one"), "user.comment", b"hello");
    set_xattr(&p("a/b"), "user.bin", &[0, 1, 2, 255, 0]);
    set_xattr(&p("exec.sh"), "user.empty", b"");
    if have("setfacl") {
        run(Command::new("setfacl")
            .args(["-m", "u:65534:r,g:1234:rw"])
            .arg(p("a/b/page")));
        run(Command::new("setfacl")
            .args(["-d", "-m", "u:65534:rwx"])
            .arg(p("setgid")));
    }
    // A sparse file: data at 0 and at 5 MiB, 8 MiB long.
    let f = fs::File::create(p("sparse")).unwrap();
    f.write_all_at(&pseudo_random(4096, 3), 0).unwrap();
    f.write_all_at(&pseudo_random(4096, 4), 5 << 20).unwrap();
    f.set_len(8 << 20).unwrap();
    drop(f);
    mkfifo(&p("fifo"), 0o640);
    // Names that are not UTF-8.
    fs::write(root.join(os(b"\xff\xfe name")), b"odd").unwrap();
    fs::create_dir(root.join(os(b"caf\xe9"))).unwrap();
    fs::write(root.join(os(b"caf\xe9/na\xefve")), b"odder").unwrap();
    // Fixed, distinct mtimes on everything but directories (whose times change as entries
    // are added), including symlinks.
    let mut all = Vec::new();
    collect(root, &mut all);
    all.sort();
    for (i, path) in all.iter().enumerate() {
        let md = fs::symlink_metadata(path).unwrap();
        if !md.is_dir() {
            let t = 1_600_000_000_000_000_000 + i as i64 * 1_000_000_007;
            set_times(path, t, t);
        }
    }
}

fn collect(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        let is_dir = fs::symlink_metadata(&path).unwrap().is_dir();
        out.push(path.clone());
        if is_dir {
            collect(&path, out);
        }
    }
}

#[test]
fn cp_a_onto_and_off_the_mount_matches_a_plain_copy() {
    let plain = plain_dir("interpose-programs-");
    let src = plain.path().join("src");
    build_tree(&src);
    let want = manifest(&src, FULL);
    assert!(want.len() > 30, "sample tree too small: {want:#?}");
    let m = Mount::new(&[]);

    run(Command::new("cp")
        .arg("-a")
        .arg(&src)
        .arg(plain.path().join("copy")));
    run(Command::new("cp")
        .arg("-a")
        .arg(&src)
        .arg(m.mnt.join("copy")));
    let plain_copy = manifest(&plain.path().join("copy"), FULL);
    assert_same("cp -a src", "source", &want, "plain copy", &plain_copy);
    let mount_copy = manifest(&m.mnt.join("copy"), FULL);
    assert_same(
        "cp -a src",
        "plain copy",
        &plain_copy,
        "mount copy",
        &mount_copy,
    );
    let backing_copy = manifest(&m.backing.join("copy"), FULL);
    assert_same(
        "cp -a src",
        "mount copy",
        &mount_copy,
        "its backing files",
        &backing_copy,
    );

    // Off the mount again, and from the mount to itself (copy_file_range within it).
    run(Command::new("cp")
        .arg("-a")
        .arg(m.mnt.join("copy"))
        .arg(plain.path().join("back")));
    assert_same(
        "cp -a mnt/copy back",
        "source",
        &want,
        "copy back",
        &manifest(&plain.path().join("back"), FULL),
    );
    run(Command::new("cp")
        .arg("-a")
        .arg(m.mnt.join("copy"))
        .arg(m.mnt.join("copy2")));
    assert_same(
        "cp -a mnt/copy mnt/copy2",
        "source",
        &want,
        "copy within the mount",
        &manifest(&m.mnt.join("copy2"), FULL),
    );
    m.stop();
}

const TAR_CREATE: &[&str] = &[
    "--create",
    "--format=posix",
    "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
    "--xattrs",
    "--xattrs-include=*",
    "--acls",
    "--sort=name",
    "--numeric-owner",
];
const TAR_EXTRACT: &[&str] = &[
    "--extract",
    "--xattrs",
    "--xattrs-include=*",
    "--acls",
    "--same-permissions",
    "--same-owner",
    "--numeric-owner",
];

/// With `sparse`, holes are found with SEEK_HOLE/SEEK_DATA and stored as such (the
/// archive then names a per-process directory, so it differs from run to run).
fn tar_create(archive: &Path, dir: &Path, sparse: bool) {
    run(Command::new("tar")
        .args(TAR_CREATE)
        .args(sparse.then_some("--sparse"))
        .arg("-f")
        .arg(archive)
        .arg("-C")
        .arg(dir)
        .arg("."));
}

fn tar_extract(archive: &Path, dir: &Path) {
    fs::create_dir(dir).unwrap();
    run(Command::new("tar")
        .args(TAR_EXTRACT)
        .arg("-f")
        .arg(archive)
        .arg("-C")
        .arg(dir));
}

fn tar_listing(archive: &Path) -> String {
    run(Command::new("tar")
        .args([
            "--list",
            "--verbose",
            "--full-time",
            "--numeric-owner",
            "-f",
        ])
        .arg(archive))
}

#[test]
fn tar_with_xattrs_onto_and_off_the_mount_matches_a_plain_directory() {
    let plain = plain_dir("interpose-programs-");
    let src = plain.path().join("src");
    build_tree(&src);
    let want = manifest(&src, FULL);
    let archive = plain.path().join("src.tar");
    tar_create(&archive, &src, true);
    let m = Mount::new(&[]);

    tar_extract(&archive, &plain.path().join("x"));
    tar_extract(&archive, &m.mnt.join("x"));
    let plain_x = manifest(&plain.path().join("x"), FULL);
    assert_same("tar x", "source", &want, "plain extraction", &plain_x);
    assert_same(
        "tar x",
        "plain extraction",
        &plain_x,
        "mount extraction",
        &manifest(&m.mnt.join("x"), FULL),
    );
    assert_same(
        "tar x",
        "plain extraction",
        &plain_x,
        "backing of the mount extraction",
        &manifest(&m.backing.join("x"), FULL),
    );

    // Archives made from the two extractions are the same, byte for byte.
    let from_plain = plain.path().join("from-plain.tar");
    let from_mount = plain.path().join("from-mount.tar");
    tar_create(&from_plain, &plain.path().join("x"), false);
    tar_create(&from_mount, &m.mnt.join("x"), false);
    let (lp, lm) = (tar_listing(&from_plain), tar_listing(&from_mount));
    let (lp, lm): (Vec<String>, Vec<String>) = (
        lp.lines().map(str::to_owned).collect(),
        lm.lines().map(str::to_owned).collect(),
    );
    assert_same("tar tv", "archive of plain", &lp, "archive of mount", &lm);
    assert!(
        fs::read(&from_plain).unwrap() == fs::read(&from_mount).unwrap(),
        "tar archives of the plain and the mount extraction differ in bytes (listings agree)"
    );

    // Streaming through a pipe onto the mount, archive written to the mount.
    fs::create_dir(m.mnt.join("piped")).unwrap();
    run(Command::new("sh").arg("-c").arg(format!(
        "tar {} --sparse -f - -C '{}' . | tar {} -f - -C '{}'",
        TAR_CREATE.join(" ").replace('*', "'*'"),
        src.display(),
        TAR_EXTRACT.join(" ").replace('*', "'*'"),
        m.mnt.join("piped").display()
    )));
    assert_same(
        "tar c | tar x",
        "source",
        &want,
        "piped onto the mount",
        &manifest(&m.mnt.join("piped"), FULL),
    );
    // A sparse archive made from the mount (holes found by SEEK_HOLE on the mount) and
    // written onto it, extracted to a plain directory.
    tar_create(&m.mnt.join("sparse.tar"), &m.mnt.join("x"), true);
    tar_extract(&m.mnt.join("sparse.tar"), &plain.path().join("y"));
    assert_same(
        "tar c --sparse on the mount, tar x off it",
        "source",
        &want,
        "extraction",
        &manifest(&plain.path().join("y"), FULL),
    );
    // Without --sparse, an archive written onto the mount is the same as written elsewhere.
    tar_create(&m.mnt.join("on-mount.tar"), &src, false);
    tar_create(&plain.path().join("plain.tar"), &src, false);
    assert!(
        fs::read(m.mnt.join("on-mount.tar")).unwrap()
            == fs::read(plain.path().join("plain.tar")).unwrap(),
        "an archive written onto the mount differs from the same archive written to a plain dir"
    );
    m.stop();
}

/// The git workflow: prints everything that must be identical on any correct file system
/// (commit ids are fixed by fixed dates and identities).
const GIT_SCRIPT: &str = r#"
set -eu
g() { git -c user.name=Tester -c user.email=tester@example.invalid -c init.defaultBranch=main -c core.fsync=all "$@"; }
g init -q repo
cd repo
mkdir -p src/sub docs
printf 'fn main() {}\n' > src/main.rs
printf 'pub fn f() -> u32 { 1 }\n' > src/sub/lib.rs
printf '# Title\n' > docs/README.md
printf '#!/bin/sh\necho run\n' > run.sh
chmod +x run.sh
ln -s docs/README.md README
head -c 300000 /dev/zero | tr '\0' 'z' > big.txt
g add -A
g commit -q -m initial
g checkout -q -b feature
printf 'pub fn f() -> u32 { 2 }\n' > src/sub/lib.rs
g mv docs/README.md docs/GUIDE.md
ln -sfn docs/GUIDE.md README
g rm -q big.txt
printf 'new\n' > src/new.rs
g add -A
g commit -q -m feature
g branch other main
g switch -q other
test ! -e src/new.rs
test -e big.txt
printf 'other\n' > other.txt
g add other.txt
g commit -q -m other
g switch -q feature
test -e src/new.rs
test ! -e other.txt
g merge -q --no-edit other
g switch -q main
g status --porcelain=v2 --branch
echo --- diff-files; g diff-files --name-status
echo --- log; g log --all --format='%H %T %s' --topo-order
echo --- show; g show --stat --format=%s feature
echo --- fsck; g fsck --full --strict --no-progress 2>&1
g gc -q --prune=now
echo --- after gc; g count-objects -v | grep -E '^(count|in-pack|garbage)'
g fsck --full --strict --no-progress 2>&1
g switch -q feature
g status --porcelain=v2 --branch
echo --- files; g ls-files -s
"#;

fn git_cmd(dir: &Path, home: &Path) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(GIT_SCRIPT)
        .current_dir(dir)
        .env("HOME", home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_DATE", "2020-01-02T03:04:05Z")
        .env("GIT_COMMITTER_DATE", "2020-01-02T03:04:05Z")
        .env("LC_ALL", "C")
        .env("TZ", "UTC");
    cmd
}

/// `git status` and `git diff-files` (which trusts the index's stat data: inode numbers,
/// sizes, times) must find the work tree clean.
fn git_clean(repo: &Path, home: &Path) -> String {
    run(Command::new("sh")
        .arg("-c")
        .arg("git diff-files --quiet && git status --porcelain=v2 --branch")
        .current_dir(repo)
        .env("HOME", home)
        .env("GIT_CONFIG_NOSYSTEM", "1"))
}

fn worktree(repo: &Path) -> Vec<String> {
    manifest(repo, ManifestOpts::default())
        .into_iter()
        .filter(|l| !l.starts_with(".git"))
        .collect()
}

#[test]
fn git_workflow_on_the_mount_matches_a_plain_directory() {
    let plain = plain_dir("interpose-programs-");
    let home = plain.path().join("home");
    fs::create_dir(&home).unwrap();
    fs::create_dir(plain.path().join("p")).unwrap();
    let want = run(&mut git_cmd(&plain.path().join("p"), &home));
    assert!(
        want.contains("--- fsck") && want.contains("# branch.head main"),
        "unexpected git output:\n{want}"
    );

    // Our own backing and mount point, to remount the same backing afterwards (named like
    // the harness's, which scripts/test.sh checks for mounts left behind).
    let tmp = plain_dir("interpose-test-git-");
    let (backing, mnt) = (tmp.path().join("backing"), tmp.path().join("mnt"));
    fs::create_dir(&backing).unwrap();
    fs::create_dir(&mnt).unwrap();
    let m = Mount::start(&backing, &mnt, &[]);
    let got = run(&mut git_cmd(&mnt, &home));
    let lines = |s: &str| s.lines().map(str::to_owned).collect::<Vec<_>>();
    assert_same(
        "git workflow output",
        "plain",
        &lines(&want),
        "mount",
        &lines(&got),
    );
    let plain_repo = plain.path().join("p/repo");
    assert_same(
        "git work tree",
        "plain",
        &worktree(&plain_repo),
        "mount",
        &worktree(&mnt.join("repo")),
    );
    let clean = git_clean(&plain_repo, &home);
    assert_eq!(git_clean(&mnt.join("repo"), &home), clean);
    m.stop();

    // After a remount the index's stat data (inode numbers!) must still match.
    let m = Mount::start(&backing, &mnt, &[]);
    assert_eq!(
        git_clean(&mnt.join("repo"), &home),
        clean,
        "work tree not clean after remounting"
    );
    run(Command::new("git")
        .args(["fsck", "--full", "--strict", "--no-progress"])
        .current_dir(mnt.join("repo"))
        .env("HOME", &home));
    m.stop();
}

/// The sqlite3 shell part: WAL mode, a few thousand rows in transactions, mmap I/O,
/// checkpoint, integrity check; then a second process reads back and dumps.
const SQL_WRITE: &str = "
PRAGMA journal_mode=WAL;
PRAGMA mmap_size=67108864;
CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT NOT NULL, n INTEGER NOT NULL, b BLOB);
BEGIN;
WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1500)
  INSERT INTO t(id, v, n, b) SELECT x, printf('row-%d', x), x * x, zeroblob(x % 300) FROM c;
COMMIT;
BEGIN;
WITH RECURSIVE c(x) AS (SELECT 1501 UNION ALL SELECT x + 1 FROM c WHERE x < 3000)
  INSERT INTO t(id, v, n, b) SELECT x, printf('row-%d', x), x * x, zeroblob(x % 5) FROM c;
COMMIT;
CREATE INDEX t_v ON t(v);
BEGIN;
UPDATE t SET v = v || '-updated' WHERE id % 7 = 0;
DELETE FROM t WHERE id % 11 = 0;
COMMIT;
BEGIN;
INSERT INTO t(id, v, n) VALUES (99999, 'rolled back', 0);
ROLLBACK;
PRAGMA wal_checkpoint(TRUNCATE);
PRAGMA integrity_check;
SELECT count(*), sum(n), sum(length(v)), sum(length(b)) FROM t;
";

const SQL_READ: &str = "
PRAGMA journal_mode;
PRAGMA integrity_check;
SELECT count(*), sum(n), max(id), min(v), max(v) FROM t;
SELECT id, v FROM t WHERE id % 500 = 1 ORDER BY id;
.dump
";

/// Runs the sqlite3 shell on `db` with `sql` (which may contain dot commands) on stdin.
fn sqlite(db: &Path, sql: &str) -> String {
    let mut child = Command::new("sqlite3")
        .arg("-batch")
        .arg("-bail")
        .arg(db)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(sql.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "sqlite3 {}: {}",
        db.display(),
        describe(&out)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn sqlite_run(dir: &Path) -> (String, String) {
    let db = dir.join("test.db");
    let written = sqlite(&db, SQL_WRITE);
    assert!(
        fs::metadata(dir.join("test.db-wal")).map_or(true, |m| m.len() == 0),
        "WAL not truncated by the checkpoint"
    );
    let read = sqlite(&db, SQL_READ);
    (written, read)
}

#[test]
fn sqlite_wal_on_the_mount_matches_a_plain_directory() {
    let plain = plain_dir("interpose-programs-");
    let m = Mount::new(&[]);
    let (pw, pr) = sqlite_run(plain.path());
    assert!(
        pw.starts_with("wal\n") && pw.contains("\nok\n"),
        "unexpected sqlite3 output:\n{pw}"
    );
    let (mw, mr) = sqlite_run(&m.mnt);
    assert_eq!(mw, pw, "sqlite3 write session output");
    let lines = |s: &str| s.lines().map(str::to_owned).collect::<Vec<_>>();
    assert_same(
        "sqlite3 read session and .dump",
        "plain",
        &lines(&pr),
        "mount",
        &lines(&mr),
    );

    // A reader and a writer process sharing the WAL index.
    let py = |dir: &Path| {
        run(Command::new(python())
            .arg(script("sqlite_wal.py"))
            .arg(dir.join("concurrent.db")))
    };
    let plain_summary = py(plain.path());
    assert!(plain_summary.contains("\"rows\""), "{plain_summary}");
    assert_eq!(
        py(&m.mnt),
        plain_summary,
        "concurrent reader/writer summary"
    );
    m.stop();
}
