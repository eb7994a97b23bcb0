//! Filters on an isolated mount (`--isolate STORE --filter ...`), with the real binary:
//!
//! - the audit filter sees every operation with the paths the view shows (a file renamed
//!   in isolation is read under its new name), reads of unchanged files included, which
//!   are then served by the daemon; with `;io=off` they are passed through again;
//! - deny rules hold on the view: refused changes reach neither the store nor BACKING,
//!   what is allowed is recorded and commits as usual;
//! - a hidden name is absent from lookups and listings, cannot be made, and is hidden from
//!   one user only while another still sees it (no name cached across callers);
//! - renaming a directory above a protected path is refused, also where that path exists
//!   only in the view.

mod common;
mod support;
use common::*;
use support::*;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

struct Dirs {
    _tmp: tempfile::TempDir,
    backing: PathBuf,
    mnt: PathBuf,
    store: PathBuf,
    audit: PathBuf,
}

fn dirs() -> Dirs {
    let tmp = plain_dir("interpose-test-isofilt-");
    let backing = tmp.path().join("backing");
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&backing).unwrap();
    fs::create_dir(&mnt).unwrap();
    Dirs {
        store: tmp.path().join("store"),
        audit: tmp.path().join("audit.jsonl"),
        backing,
        mnt,
        _tmp: tmp,
    }
}

impl Dirs {
    fn mount(&self, filters: &[String]) -> Mount {
        let mut args = vec!["--isolate".to_owned(), s(&self.store).to_owned()];
        for f in filters {
            args.push("--filter".into());
            args.push(f.clone());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Mount::start(&self.backing, &self.mnt, &args)
    }

    /// The audit lines written so far (complete once the mount has stopped).
    fn audit_lines(&self) -> Vec<Value> {
        fs::read_to_string(&self.audit)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }
}

/// The paths `isolation log --json` names, each as "OP PATH" or "OP FROM -> TO".
fn logged(store: &Path) -> Vec<String> {
    let out = iso("log", store, &["--json"]);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("log --json: {e}:\n{out}"));
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| match e.get("path") {
            Some(p) => format!("{} {}", e["op"].as_str().unwrap(), p.as_str().unwrap()),
            None => format!(
                "{} {} -> {}",
                e["op"].as_str().unwrap(),
                e["from"].as_str().unwrap(),
                e["to"].as_str().unwrap()
            ),
        })
        .collect()
}

/// (operation, path, path2, bytes) of each audit line about paths under `prefix`.
fn ops_under(lines: &[Value], prefix: &str) -> Vec<(String, String, String, u64)> {
    lines
        .iter()
        .filter(|l| l["path"].as_str().is_some_and(|p| p.starts_with(prefix)))
        .map(|l| {
            (
                l["op"].as_str().unwrap().to_owned(),
                l["path"].as_str().unwrap().to_owned(),
                l["path2"].as_str().unwrap_or("").to_owned(),
                l["bytes"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

#[test]
fn the_audit_filter_sees_an_isolated_mount_s_operations_under_the_view_s_paths() {
    let d = dirs();
    fs::create_dir(d.backing.join("w")).unwrap();
    fs::write(d.backing.join("w/old.txt"), b"backing bytes\n").unwrap();
    let m = d.mount(&[format!("audit={}", s(&d.audit))]);
    assert!(
        m.ready.contains("isolated") && m.ready.contains("filters: audit"),
        "readiness line: {}",
        m.ready
    );
    // An unchanged file, read: with the audit filter's io on, its data goes through the
    // daemon (not passthrough), so the read is seen.
    assert_eq!(
        fs::read(d.mnt.join("w/old.txt")).unwrap(),
        b"backing bytes\n"
    );
    fs::write(d.mnt.join("w/new.txt"), b"0123456789").unwrap();
    fs::rename(d.mnt.join("w/new.txt"), d.mnt.join("w/moved.txt")).unwrap();
    assert_eq!(fs::read(d.mnt.join("w/moved.txt")).unwrap(), b"0123456789");
    fs::remove_file(d.mnt.join("w/old.txt")).unwrap();
    fs::create_dir(d.mnt.join("w/sub")).unwrap();
    m.stop();

    let lines = d.audit_lines();
    let ops = ops_under(&lines, "/w/");
    let has = |op: &str, path: &str, path2: &str, bytes: Option<u64>| {
        ops.iter().any(|(o, p, p2, b)| {
            o == op && p == path && p2 == path2 && bytes.is_none_or(|want| *b == want)
        })
    };
    for (op, path, path2, bytes) in [
        ("read", "/w/old.txt", "", Some(14)),
        ("create", "/w/new.txt", "", None),
        ("write", "/w/new.txt", "", Some(10)),
        ("rename", "/w/new.txt", "/w/moved.txt", None),
        // Served from the journal, under the name the view gave it.
        ("read", "/w/moved.txt", "", Some(10)),
        ("unlink", "/w/old.txt", "", None),
    ] {
        assert!(
            has(op, path, path2, bytes),
            "no audit line {op} {path} {path2} ({bytes:?} bytes) in:\n{ops:#?}"
        );
    }
    // A mode as the kernel sent it, as on the plain mount (no file type).
    let mkdir = lines
        .iter()
        .find(|l| l["op"] == "mkdir" && l["path"] == "/w/sub")
        .expect("mkdir audited");
    assert_eq!(mkdir["mode"], "777", "{mkdir}");
    // Every line is one the filter wrote whole, with the caller's identity.
    assert!(lines
        .iter()
        .all(|l| l["uid"] == 0 && l["pid"].as_u64().is_some()));
    // Isolated as ever: BACKING unchanged until the commit, then exactly the view.
    assert!(d.backing.join("w/old.txt").exists());
    assert!(!d.backing.join("w/moved.txt").exists());
    let out = iso("commit", &d.store, &[]);
    assert!(out.contains("committed up to change"), "commit said: {out}");
    assert!(!d.backing.join("w/old.txt").exists());
    assert_eq!(
        fs::read(d.backing.join("w/moved.txt")).unwrap(),
        b"0123456789"
    );
}

#[test]
fn with_the_audit_filter_s_io_off_unchanged_files_are_passed_through_again() {
    let d = dirs();
    fs::write(d.backing.join("big"), vec![7u8; 1 << 20]).unwrap();
    let m = d.mount(&[format!("audit={};io=off", s(&d.audit))]);
    assert_eq!(fs::read(d.mnt.join("big")).unwrap().len(), 1 << 20);
    fs::write(d.mnt.join("changed"), b"abc").unwrap();
    assert_eq!(fs::read(d.mnt.join("changed")).unwrap(), b"abc");
    m.stop();
    let lines = d.audit_lines();
    let ops = ops_under(&lines, "/");
    assert!(
        ops.iter().any(|(o, p, ..)| o == "open" && p == "/big"),
        "the open is audited: {ops:#?}"
    );
    // The kernel read the unchanged file itself; the daemon saw no read of it.
    assert!(
        !ops.iter().any(|(o, p, ..)| o == "read" && p == "/big"),
        "a read of /big reached the daemon with io=off: {ops:#?}"
    );
}

#[test]
fn deny_rules_hold_on_an_isolated_mount_and_refused_changes_are_never_recorded() {
    let d = dirs();
    fs::create_dir_all(d.backing.join("docs/sub")).unwrap();
    fs::write(d.backing.join("docs/a.txt"), b"a\n").unwrap();
    fs::write(d.backing.join("docs/sub/b.txt"), b"b\n").unwrap();
    fs::write(d.backing.join("free.txt"), b"f\n").unwrap();
    let before = manifest(&d.backing, ManifestOpts::default());
    let m = d.mount(&["deny=docs/**:write:EROFS".to_owned()]);
    let mnt = &d.mnt;
    let attempts = [
        ("write", outcome(fs::write(mnt.join("docs/a.txt"), b"x"))),
        ("create", outcome(fs::write(mnt.join("docs/new"), b"x"))),
        ("mkdir", outcome(fs::create_dir(mnt.join("docs/d")))),
        (
            "unlink",
            outcome(fs::remove_file(mnt.join("docs/sub/b.txt"))),
        ),
        (
            "rename in",
            outcome(fs::rename(mnt.join("free.txt"), mnt.join("docs/free.txt"))),
        ),
        (
            "rename out",
            outcome(fs::rename(mnt.join("docs/a.txt"), mnt.join("a.txt"))),
        ),
        (
            "rename dir",
            outcome(fs::rename(mnt.join("docs"), mnt.join("d2"))),
        ),
        (
            "chmod",
            outcome(fs::set_permissions(
                mnt.join("docs/a.txt"),
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )),
        ),
        (
            "link",
            outcome(fs::hard_link(mnt.join("docs/a.txt"), mnt.join("docs/l"))),
        ),
    ];
    for (what, got) in &attempts {
        assert_eq!(got, "EROFS", "{what} in docs/");
    }
    // Reads and changes elsewhere go on as usual.
    assert_eq!(fs::read(mnt.join("docs/sub/b.txt")).unwrap(), b"b\n");
    fs::write(mnt.join("free.txt"), b"changed\n").unwrap();
    let recorded = logged(&d.store);
    assert!(
        recorded.iter().all(|l| !l.contains("docs")),
        "a refused change was recorded: {recorded:#?}"
    );
    assert!(
        recorded.iter().any(|l| l.ends_with(" free.txt")),
        "the allowed change is recorded: {recorded:#?}"
    );
    m.stop();
    let out = iso("commit", &d.store, &[]);
    assert!(out.contains("committed up to change"), "commit said: {out}");
    let after = manifest(&d.backing, ManifestOpts::default());
    let changed: Vec<&String> = after.iter().filter(|l| !before.contains(l)).collect();
    assert_eq!(changed.len(), 1, "only free.txt changed: {changed:#?}");
    assert!(changed[0].starts_with("free.txt"), "{changed:#?}");
    assert_eq!(fs::read(d.backing.join("free.txt")).unwrap(), b"changed\n");
}

#[test]
fn a_hidden_name_is_left_out_of_an_isolated_mount_for_the_callers_it_is_hidden_from() {
    let d = dirs();
    fs::write(d.backing.join("secret"), b"s\n").unwrap();
    fs::write(d.backing.join("public"), b"p\n").unwrap();
    make_traversable(&d.backing);
    // Hidden from everyone in `all/`, from uid 65534 only at the top.
    fs::create_dir(d.backing.join("all")).unwrap();
    fs::write(d.backing.join("all/key"), b"k\n").unwrap();
    let rules = "all/key:all:ENOENT;all/looked:lookup:ENOENT;secret:lookup:ENOENT:uid=65534";
    let m = d.mount(&[format!("deny={rules}")]);
    let mnt = &d.mnt;
    assert_eq!(names(&mnt.join("all")), Vec::<String>::new());
    assert_eq!(outcome(fs::metadata(mnt.join("all/key"))), "ENOENT");
    assert_eq!(outcome(fs::write(mnt.join("all/key"), b"x")), "ENOENT");
    // Nothing can be made under a name hidden from lookups only, which would reach
    // the object.
    assert_eq!(outcome(fs::write(mnt.join("all/looked"), b"x")), "EACCES");
    assert_eq!(outcome(fs::create_dir(mnt.join("all/looked"))), "EACCES");
    // A name made in the view is hidden as well.
    fs::write(mnt.join("all/other"), b"o").unwrap();
    assert_eq!(names(&mnt.join("all")), vec!["other"]);

    // Root sees `secret`, then uid 65534 does not, then root again: no answer cached
    // for one caller is given to the next.
    let stat_as_nobody = |p: &Path| {
        output(
            as_user(65534, 65534, &[])
                .arg("stat")
                .arg("-c")
                .arg("%s")
                .arg(p),
        )
        .status
    };
    let ls_as_nobody = || {
        let out = output(as_user(65534, 65534, &[]).arg("ls").arg("-1").arg(mnt));
        assert!(out.status.success(), "{}", describe(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    for round in 0..2 {
        assert_eq!(
            fs::read(mnt.join("secret")).unwrap(),
            b"s\n",
            "root, round {round}"
        );
        assert!(
            !stat_as_nobody(&mnt.join("secret")).success(),
            "uid 65534 found the hidden name, round {round}"
        );
        assert!(stat_as_nobody(&mnt.join("public")).success());
        let listed = ls_as_nobody();
        assert!(
            !listed.lines().any(|l| l == "secret") && listed.lines().any(|l| l == "public"),
            "uid 65534 lists: {listed}"
        );
        assert!(names(mnt).contains(&"secret".to_owned()), "root lists it");
    }
    m.stop();
}

#[test]
fn renaming_a_directory_above_a_protected_path_is_refused_also_where_only_the_view_has_it() {
    let d = dirs();
    fs::create_dir_all(d.backing.join("top/inner")).unwrap();
    fs::write(d.backing.join("top/inner/f"), b"f").unwrap();
    fs::create_dir(d.backing.join("top/other")).unwrap();
    let m = d.mount(&["deny=top/inner/**:write:EROFS;**/*.key:rename,unlink:EPERM".to_owned()]);
    let mnt = &d.mnt;
    // BACKING's tree: `top` holds a protected path.
    assert_eq!(
        outcome(fs::rename(mnt.join("top"), mnt.join("top2"))),
        "EROFS"
    );
    fs::rename(mnt.join("top/other"), mnt.join("top/o2")).unwrap();
    // A tree made in the view only: x/y/z.key, three levels down.
    fs::create_dir_all(mnt.join("x/y")).unwrap();
    fs::write(mnt.join("x/y/z.key"), b"k").unwrap();
    assert_eq!(outcome(fs::rename(mnt.join("x"), mnt.join("x2"))), "EPERM");
    assert_eq!(
        outcome(fs::rename(mnt.join("x/y"), mnt.join("y2"))),
        "EPERM"
    );
    assert!(mnt.join("x/y/z.key").exists());
    // An exchange moves both sides: refused when either holds a protected path.
    fs::create_dir(mnt.join("empty")).unwrap();
    let exchange = Command::new(python())
        .arg("-c")
        .arg(
            "import ctypes, os, sys\n\
             libc = ctypes.CDLL(None, use_errno=True)\n\
             r = libc.renameat2(-100, sys.argv[1].encode(), -100, sys.argv[2].encode(), 2)\n\
             print(os.strerror(ctypes.get_errno()) if r else 'ok')",
        )
        .arg(mnt.join("empty"))
        .arg(mnt.join("x"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&exchange.stdout).trim(),
        "Operation not permitted"
    );
    // Without the key below it, the directory moves.
    fs::write(mnt.join("x/y/plain"), b"p").unwrap();
    fs::create_dir(mnt.join("free")).unwrap();
    fs::write(mnt.join("free/plain"), b"p").unwrap();
    fs::rename(mnt.join("free"), mnt.join("free2")).unwrap();
    let recorded = logged(&d.store);
    assert!(
        recorded
            .iter()
            .all(|l| !l.contains("top2") && !l.contains("x2")),
        "a refused rename was recorded: {recorded:#?}"
    );
    m.stop();
}

#[test]
fn a_rule_on_one_name_of_a_hard_linked_file_holds_after_the_other_name_was_used() {
    let d = dirs();
    fs::create_dir(d.backing.join("pub")).unwrap();
    fs::create_dir(d.backing.join("secret")).unwrap();
    fs::write(d.backing.join("pub/key"), b"k\n").unwrap();
    fs::hard_link(d.backing.join("pub/key"), d.backing.join("secret/key")).unwrap();
    let m = d.mount(&["deny=secret/**:read:EACCES".to_owned()]);
    let mnt = &d.mnt;
    // The view meets the file by its public name first; the protected name, used next,
    // is the one judged (a rule on it makes the kernel look it up each time).
    assert_eq!(fs::read(mnt.join("pub/key")).unwrap(), b"k\n");
    assert_eq!(outcome(fs::read(mnt.join("secret/key"))), "EACCES");
    // A name made in the view for a public file is judged the same way.
    fs::write(mnt.join("pub/other"), b"o\n").unwrap();
    assert_eq!(fs::read(mnt.join("pub/other")).unwrap(), b"o\n");
    fs::hard_link(mnt.join("pub/other"), mnt.join("secret/linked")).unwrap();
    assert_eq!(outcome(fs::read(mnt.join("secret/linked"))), "EACCES");
    m.stop();
}

/// `home/` owned by uid 65534, open to everyone, holding `a.key` and `pub.txt`: only the
/// filters stand between that user and the files.
fn home_of_nobody(d: &Dirs) {
    let home = d.backing.join("home");
    fs::create_dir(&home).unwrap();
    fs::write(home.join("a.key"), b"TOPSECRET\n").unwrap();
    fs::write(home.join("pub.txt"), b"public\n").unwrap();
    for p in [home.join("a.key"), home.join("pub.txt"), home.clone()] {
        lchown(&p, NOBODY, NOBODY);
        let mode = if p == home { 0o777 } else { 0o666 };
        fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
    }
}

/// Runs the Python `script` as uid 65534 with `args`; its standard output, which must
/// succeed.
fn python_as_nobody(script: &str, args: &[&Path]) -> String {
    let out = output(
        as_user(NOBODY, NOBODY, &[])
            .arg(python())
            .arg("-c")
            .arg(script)
            .args(args),
    );
    assert!(out.status.success(), "{}", describe(&out));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[test]
fn a_file_that_lost_its_name_while_open_is_judged_by_the_name_it_had() {
    let d = dirs();
    home_of_nobody(&d);
    fs::write(d.backing.join("home/b"), b"b\n").unwrap();
    lchown(&d.backing.join("home/b"), NOBODY, NOBODY);
    let m = d.mount(&["deny=**/*.key:read:EACCES:uid=65534".to_owned()]);
    // Open for writing (the rule is about reading), lose the name (unlink, or a rename
    // over it), then open the descriptor's file again for reading through /proc.
    let script = r#"
import os, sys
home, how = sys.argv[1], sys.argv[2]
fd = os.open(os.path.join(home, 'a.key'), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
os.write(fd, b'SECRET\n')
if how == 'unlink':
    os.unlink(os.path.join(home, 'a.key'))
else:
    os.rename(os.path.join(home, 'b'), os.path.join(home, 'a.key'))
try:
    print(open('/proc/self/fd/%d' % fd, 'rb').read())
except PermissionError:
    print('EACCES')
"#;
    let home = d.mnt.join("home");
    assert_eq!(
        python_as_nobody(script, &[&home, Path::new("unlink")]),
        "EACCES"
    );
    assert_eq!(
        python_as_nobody(script, &[&home, Path::new("rename")]),
        "EACCES"
    );
    m.stop();
}

#[test]
fn a_truncating_open_passes_the_rules_on_truncation() {
    let d = dirs();
    home_of_nobody(&d);
    let m = d.mount(&[
        "deny=home/pub.txt:setattr:EPERM".to_owned(),
        format!("audit={}", s(&d.audit)),
    ]);
    let got = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(d.mnt.join("home/pub.txt"));
    assert_eq!(outcome(got), "EPERM");
    assert_eq!(fs::read(d.mnt.join("home/pub.txt")).unwrap(), b"public\n");
    let recorded = logged(&d.store);
    assert!(recorded.is_empty(), "recorded: {recorded:#?}");
    m.stop();
    let lines = d.audit_lines();
    assert!(
        lines.iter().any(|l| l["op"] == "setattr"
            && l["path"] == "/home/pub.txt"
            && l["result"] == "EPERM"),
        "the truncation is audited as a setattr: {:#?}",
        ops_under(&lines, "/home/")
    );
}

#[test]
fn a_shared_mapping_s_writeback_counts_as_its_opener_s() {
    let d = dirs();
    home_of_nobody(&d);
    let m = d.mount(&[
        "deny=home/**:write:EROFS:uid!=65534".to_owned(),
        format!("audit={}", s(&d.audit)),
    ]);
    let script = r#"
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
m = mmap.mmap(fd, 6, mmap.MAP_SHARED)
m[0:6] = b'PUBLIC'
m.flush()
print('ok')
"#;
    let file = d.mnt.join("home/pub.txt");
    assert_eq!(python_as_nobody(script, &[&file]), "ok");
    assert_eq!(fs::read(&file).unwrap(), b"PUBLIC\n");
    let recorded = logged(&d.store);
    assert!(
        recorded.iter().any(|l| l == "data home/pub.txt"),
        "the write is recorded: {recorded:#?}"
    );
    m.stop();
    let lines = d.audit_lines();
    let writes: Vec<&Value> = lines
        .iter()
        .filter(|l| l["op"] == "write" && l["path"] == "/home/pub.txt")
        .collect();
    assert!(!writes.is_empty(), "no write audited");
    assert!(
        writes
            .iter()
            .all(|l| l["uid"] == NOBODY && l["result"] == "ok"),
        "{writes:#?}"
    );
}

#[test]
fn a_directory_opened_by_one_user_and_read_by_another_hides_what_the_reader_may_not_see() {
    let d = dirs();
    home_of_nobody(&d);
    let m = d.mount(&["deny=home/a.key:all:ENOENT:uid=65534".to_owned()]);
    // Opened by root, read after a switch to uid 65534 (a descriptor passed on).
    let script = r#"
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
print(' '.join(sorted(os.listdir(fd))))
"#;
    let out = output(
        Command::new(python())
            .arg("-c")
            .arg(script)
            .arg(d.mnt.join("home")),
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "pub.txt");
    assert_eq!(names(&d.mnt.join("home")), vec!["a.key", "pub.txt"]);
    m.stop();
}

#[test]
fn a_hard_linked_file_is_judged_by_the_same_name_after_mounted_commits_and_discards() {
    let d = dirs();
    home_of_nobody(&d);
    fs::hard_link(d.backing.join("home/a.key"), d.backing.join("home/pub2")).unwrap();
    let rules = "deny=**/*.key:open:EACCES:uid=65534";
    // Entries kept by the kernel for a minute: the opens below find them cached.
    let m = Mount::start(
        &d.backing,
        &d.mnt,
        &[
            "--isolate",
            s(&d.store),
            "--filter",
            rules,
            "--cache-timeout",
            "60",
        ],
    );
    let home = d.mnt.join("home");
    let cat_as_nobody = |p: &Path| {
        output(as_user(NOBODY, NOBODY, &[]).arg("cat").arg(p))
            .status
            .success()
    };
    for op in ["commit", "discard"] {
        fs::write(home.join("pending"), op).unwrap();
        // The view meets the file by its public name first.
        fs::metadata(home.join("pub2")).unwrap();
        assert!(!cat_as_nobody(&home.join("a.key")), "before the {op}");
        iso(op, &d.store, &[]);
        assert!(!cat_as_nobody(&home.join("a.key")), "after the {op}");
    }
    m.stop();
}
