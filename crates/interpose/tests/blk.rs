//! `interpose blk serve` with the real binary and real NBD clients, none written here
//! (nbdinfo, nbdcopy, nbdsh/libnbd, qemu-img, qemu-io); only the malformed clients of
//! tests/scripts/nbd_badclient.py speak the protocol by hand.
//!
//! The fixture: an 8 MiB raw disk of text, random and zero regions, a GNU ddrescue
//! mapfile (written by hand) with bad sectors (single sectors, a whole 64 KiB chunk, a
//! range across a chunk boundary, the last sector) and an untried range, an image of the
//! disk made with that mapfile, a bad-free image (LZ4-compressed; the others zstd), an
//! image whose only bad sector lies in a zero chunk, and a sparse 48 MiB raw file; all served at once over a Unix socket
//! (`img`, `raw` = the raw file with the mapfile, `clean`, `zbad`, `big`). Tested:
//!
//! - `nbdinfo --list` (text and --json): every export, its size, read-only, the
//!   `base:allocation` and `x-interpose:bad` contexts, multi-conn, block sizes; default
//!   names are the file names and the first export is the default one; a TCP listener on
//!   port 0 names its bound port in the readiness line and serves there;
//! - `qemu-img compare` and `nbdcopy` of the bad-free export equal the raw file, while
//!   both fail with an I/O error on an export with bad sectors;
//! - `nbdinfo --map`: holes exactly at the image's zero chunks (none for a raw file);
//!   `--map=x-interpose:bad`: exactly the mapfile's bad (1) and untried (2) ranges;
//!   a range that fails reads is never reported as reading as zeros;
//! - nbdsh (libnbd): structured reads deliver the good bytes, holes for zero chunks and
//!   one EIO error chunk at exactly each bad offset (also from the middle of a bad
//!   range, and with DF); plain reads touching a bad sector fail with EIO while their
//!   neighbours succeed, with and without structured replies; writes, trims and
//!   write-zeroes get EPERM, reads out of range EINVAL, cache, flush and block status
//!   work; 8 connections x 200 random reads at once; a disconnect right after pipelined
//!   reads still gets every reply;
//! - qemu-io: `read -P 0` of a zero region, `read -v` of data compared with the file, a
//!   read of a bad range failing with an I/O error;
//! - malformed clients (handshake and request stream, and a seeded fuzz loop) are
//!   answered as proto.md says (its MUSTs and SHOULDs, e.g. EINVAL for a flag that
//!   does not apply to the command, a failed SET_META_CONTEXT still replacing the
//!   contexts) or dropped with a warning, every connection's end is logged, and a
//!   well-behaved client gets correct data after each; no panic; exit 0 on SIGTERM,
//!   socket removed;
//! - SIGTERM with clients connected (in transmission, stalled in a 32 MiB reply they
//!   do not read, mid-handshake, silent): prompt exit 0, the socket removed, the clients
//!   see the connection end;
//! - `--max-connections`: a client beyond the limit is refused (GO: NBD_REP_ERR_POLICY;
//!   EXPORT_NAME: hang-up) while listings still work, and served once a connection ends;
//! - a stale socket file is replaced; a second server refuses a live socket and leaves
//!   it alone;
//! - systemd socket activation (LISTEN_FDS/LISTEN_PID, with a wrapper that execs the
//!   server, and with systemd-socket-activate, which scripts/setup.sh installs).

mod common;
mod support;
use common::*;
use support::*;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// The images' chunk size (the default of `interpose image create`).
const CHUNK: u64 = 64 * KIB;
/// Size of the fixture disk.
const SIZE: u64 = 8 * MIB;
/// Size of the sparse `big` export.
const BIG: u64 = 48 * MIB;

/// The mapfile's bad and untried ranges: (offset, length, ddrescue status).
const BAD: &[(u64, u64, char)] = &[
    (51_200, 512, '-'),                // one sector of text
    (MIB, CHUNK, '-'),                 // a whole chunk of text
    (3 * MIB + 7 * 512, 512, '-'),     // one sector of random data
    (4 * MIB - 1024, 2048, '-'),       // across the chunk boundary at 4 MiB
    (6 * MIB + 4 * KIB, 8 * KIB, '?'), // untried, in text
    (SIZE - 512, 512, '-'),            // the last sector
];

/// The only bad sector of `zbad`: inside a chunk that is otherwise all zeros.
const ZBAD: (u64, u64, char) = (2 * MIB + CHUNK + 512, 512, '-');

fn random(len: u64, seed: u64) -> Vec<u8> {
    random_bytes(len as usize, seed)
}

fn text(len: u64, first_line: u64) -> Vec<u8> {
    text_lines(len as usize, first_line)
}

/// The disk: text, zeros, random, zeros, text, random, zeros (not chunk-aligned at its
/// start), random.
fn disk() -> Vec<u8> {
    let mut d = Vec::with_capacity(SIZE as usize);
    d.extend(text(2 * MIB, 0));
    d.extend(vec![0u8; MIB as usize]);
    d.extend(random(2 * MIB, 1));
    d.extend(vec![0u8; (MIB / 2) as usize]);
    d.extend(text(3 * MIB / 2, 1_000_000));
    d.extend(random(MIB / 2 - 3000, 2));
    d.extend(vec![0u8; (MIB / 2 + 3000 - CHUNK) as usize]);
    d.extend(random(CHUNK, 3));
    assert_eq!(d.len() as u64, SIZE);
    d
}

/// A mapfile in GNU ddrescue's format: every byte in one block, `+` between the given
/// ranges.
fn mapfile(bad: &[(u64, u64, char)], size: u64) -> String {
    let mut m = String::from(
        "# Mapfile. Created by GNU ddrescue version 1.27\n\
         # Command line: ddrescue /dev/sdx disk.raw disk.map\n\
         # current_pos  current_status  current_pass\n",
    );
    m += &format!("0x{:08X}     +               1\n", size - 512);
    m += "#      pos        size  status\n";
    let mut at = 0;
    for &(off, len, st) in bad {
        if off > at {
            m += &format!("0x{at:08X}  0x{:08X}  +\n", off - at);
        }
        m += &format!("0x{off:08X}  0x{len:08X}  {st}\n");
        at = off + len;
    }
    if size > at {
        m += &format!("0x{at:08X}  0x{:08X}  +\n", size - at);
    }
    m
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The files served, in a fresh temporary directory.
struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    data: Vec<u8>,
    raw: PathBuf,
    map: PathBuf,
    img: PathBuf,
    clean: PathBuf,
    zbad: PathBuf,
    big: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let tmp = plain_dir("interpose-test-blk-");
        let dir = tmp.path().to_path_buf();
        let data = disk();
        let raw = dir.join("disk.raw");
        fs::write(&raw, &data).unwrap();
        let map = dir.join("disk.map");
        fs::write(&map, mapfile(BAD, SIZE)).unwrap();
        let zmap = dir.join("zbad.map");
        fs::write(&zmap, mapfile(&[ZBAD], SIZE)).unwrap();
        let img = dir.join("bad.img");
        let clean = dir.join("clean.img");
        let zbad = dir.join("zbad.img");
        for (out, m) in [(&img, Some(&map)), (&clean, None), (&zbad, Some(&zmap))] {
            let mut c = Command::new(bin());
            c.args(["image", "create", s(&raw), "-o", s(out)]);
            if let Some(m) = m {
                c.args(["--mapfile", s(m)]);
            }
            if out == &clean {
                c.args(["--codec", "lz4"]);
            }
            run(&mut c);
        }
        // Sparse, with 64 KiB of data at 40 MiB.
        let big = dir.join("big.raw");
        let f = fs::File::create(&big).unwrap();
        f.set_len(BIG).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &random(CHUNK, 9), 40 * MIB).unwrap();
        Fixture {
            _tmp: tmp,
            dir,
            data,
            raw,
            map,
            img,
            clean,
            zbad,
            big,
        }
    }

    /// The sources in the order of [`EXPORTS`].
    fn sources(&self) -> Vec<String> {
        vec![
            s(&self.img).to_owned(),
            format!("{},mapfile={}", s(&self.raw), s(&self.map)),
            s(&self.clean).to_owned(),
            s(&self.zbad).to_owned(),
            s(&self.big).to_owned(),
        ]
    }

    /// Serves every export under the names of [`EXPORTS`] on a Unix socket.
    fn serve(&self) -> Server {
        self.serve_with(&[])
    }

    /// [`Fixture::serve`] with more options.
    fn serve_with(&self, options: &[&str]) -> Server {
        let sock = self.dir.join("nbd.sock");
        let mut c = Command::new(bin());
        c.args(["blk", "serve", "--log", "info"])
            .args(options)
            .args(self.sources())
            .arg("--unix")
            .arg(&sock);
        for name in EXPORTS {
            c.args(["--name", name]);
        }
        Server::spawn(c, Some(sock), &self.dir)
    }

    /// Whether byte range `off..off+len` touches a bad or untried range of `img`/`raw`.
    fn touches_bad(off: u64, len: u64) -> bool {
        BAD.iter().any(|&(b, l, _)| b < off + len && off < b + l)
    }

    /// The disk's all-zero chunks: where `clean` (and `img`, away from bad ranges) must
    /// report holes.
    fn zero_chunks(&self) -> Vec<u64> {
        (0..SIZE / CHUNK)
            .filter(|&i| {
                let r = (i * CHUNK) as usize..((i + 1) * CHUNK) as usize;
                self.data[r].iter().all(|&b| b == 0)
            })
            .collect()
    }
}

/// Export names of [`Fixture::serve`].
const EXPORTS: [&str; 5] = ["img", "raw", "clean", "zbad", "big"];

/// A running `interpose blk serve`: stopped (SIGTERM, then SIGKILL) when dropped.
struct Server {
    child: Option<Child>,
    _stdout: BufReader<ChildStdout>,
    /// Its readiness line.
    line: String,
    socket: Option<PathBuf>,
    /// Its standard error (a file: a pipe nobody reads could fill and stall it).
    log: PathBuf,
}

impl Server {
    /// Starts `cmd` and waits for its readiness line.
    fn spawn(mut cmd: Command, socket: Option<PathBuf>, dir: &Path) -> Server {
        let log = (0..)
            .map(|i| dir.join(format!("server-{i}.log")))
            .find(|p| !p.exists())
            .unwrap();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        let _ = stdout.read_line(&mut line);
        if !line.starts_with("serving ") {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "no readiness line from {cmd:?}: {line:?}\nstderr:\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
        if let Some(sock) = &socket {
            let ft = fs::symlink_metadata(sock).map(|m| m.file_type());
            assert!(
                ft.is_ok_and(|t| t.is_socket()),
                "{} is not a socket after the readiness line",
                sock.display()
            );
        }
        Server {
            child: Some(child),
            _stdout: stdout,
            line: line.trim_end().to_owned(),
            socket,
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn uri(&self, name: &str) -> String {
        format!(
            "nbd+unix:///{name}?socket={}",
            s(self.socket.as_ref().unwrap())
        )
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("the server exited: {status}\nstderr:\n{}", self.stderr());
        }
    }

    /// SIGTERM; the server must exit 0 within `within` and remove its socket. Its stderr.
    fn stop_within(mut self, within: Duration) -> String {
        let mut child = self.child.take().unwrap();
        let started = Instant::now();
        signal(&child, libc::SIGTERM);
        let status = wait_timeout(&mut child, within);
        let took = started.elapsed();
        let err = self.stderr();
        let Some(status) = status else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the server did not exit within {within:?} of SIGTERM\nstderr:\n{err}");
        };
        assert!(
            status.success(),
            "exit status {status} after SIGTERM ({took:?})\nstderr:\n{err}"
        );
        if let Some(sock) = &self.socket {
            assert!(
                !sock.exists(),
                "{} is still there after the server exited",
                sock.display()
            );
        }
        assert!(!err.contains("panicked"), "the server panicked:\n{err}");
        err
    }

    fn stop(self) -> String {
        self.stop_within(Duration::from_secs(10))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, libc::SIGTERM);
            if wait_timeout(&mut child, Duration::from_secs(5)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// A client program's output; `what` names it in failure messages.
fn client(what: &str, cmd: &mut Command) -> Output {
    let out = output(cmd);
    if std::env::var_os("INTERPOSE_TEST_VERBOSE").is_some() {
        eprintln!("{what}: {}", describe(&out));
    }
    out
}

/// A client program's standard output; it must succeed.
fn client_bytes(what: &str, cmd: &mut Command) -> Vec<u8> {
    let out = client(what, cmd);
    assert!(out.status.success(), "{what} failed: {}", describe(&out));
    out.stdout
}

fn client_ok(what: &str, cmd: &mut Command) -> String {
    String::from_utf8(client_bytes(what, cmd)).unwrap()
}

fn nbdinfo(args: &[&str]) -> String {
    client_ok(
        &format!("nbdinfo {args:?}"),
        Command::new("nbdinfo").args(args),
    )
}

fn nbdinfo_json(args: &[&str]) -> Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let out = nbdinfo(&a);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("nbdinfo {a:?}: {e}\n{out}"))
}

/// `nbdinfo --map[=CONTEXT] --json`, as (offset, length, type) with neighbours of the
/// same type merged.
fn map(uri: &str, context: Option<&str>) -> Vec<(u64, u64, u64)> {
    let flag = match context {
        Some(c) => format!("--map={c}"),
        None => "--map".to_owned(),
    };
    let v = nbdinfo_json(&[&flag, uri]);
    let mut out: Vec<(u64, u64, u64)> = Vec::new();
    for e in v
        .as_array()
        .unwrap_or_else(|| panic!("nbdinfo {flag}: {v}"))
    {
        let (o, l, t) = (
            e["offset"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            e["type"].as_u64().unwrap(),
        );
        match out.last_mut() {
            Some(last) if last.2 == t && last.0 + last.1 == o => last.1 += l,
            _ => out.push((o, l, t)),
        }
    }
    out
}

/// nbdsh (the system Python's libnbd binding) running `code` after [`NBDSH_PRELUDE`],
/// with the fixture described in its environment.
fn nbdsh(fx: &Fixture, server: &Server, code: &str) -> Output {
    let mut cmd = nbdsh_cmd(fx, server);
    cmd.args(["-c", NBDSH_PRELUDE, "-c", code]);
    client("nbdsh", &mut cmd)
}

/// nbdsh with the fixture's environment (see [`NBDSH_PRELUDE`]), no script yet.
fn nbdsh_cmd(fx: &Fixture, server: &Server) -> Command {
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    let bad: Vec<Value> = BAD
        .iter()
        .map(|&(o, l, st)| serde_json::json!([o, l, st.to_string()]))
        .collect();
    let mut cmd = Command::new("nbdsh");
    // nbdsh runs `python3` from PATH: the system one, which has the binding.
    cmd.env("PATH", path)
        .env("RAW", &fx.raw)
        .env("BAD", Value::Array(bad).to_string())
        .env("SIZE", SIZE.to_string())
        .env("CHUNK", CHUNK.to_string());
    for name in EXPORTS {
        cmd.env(format!("URI_{}", name.to_uppercase()), server.uri(name));
    }
    cmd
}

fn nbdsh_ok(fx: &Fixture, server: &Server, code: &str) -> String {
    let out = nbdsh(fx, server, code);
    assert!(
        out.status.success(),
        "nbdsh script failed: {}",
        describe(&out)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Helpers every nbdsh script gets.
const NBDSH_PRELUDE: &str = r#"
import errno, json, os, random, threading
RAW = open(os.environ["RAW"], "rb").read()
BAD = [(o, l, st) for o, l, st in json.loads(os.environ["BAD"])]
SIZE = int(os.environ["SIZE"])
CHUNK = int(os.environ["CHUNK"])
URI = {k[4:].lower(): v for k, v in os.environ.items() if k.startswith("URI_")}

def bad_in(off, n):
    """The bad ranges a read touches, clipped to it."""
    return [(max(o, off), min(o + l, off + n)) for o, l, _ in BAD if o < off + n and off < o + l]

def handle(name, structured=True, contexts=()):
    g = nbd.NBD()
    g.set_request_structured_replies(structured)
    for c in contexts:
        g.add_meta_context(c)
    g.connect_uri(URI[name])
    return g

def fails(what, want, f, *args):
    try:
        f(*args)
    except nbd.Error as e:
        assert e.errno == want, f"{what}: failed with {e.errno} ({e}), expected {want}"
        return
    raise AssertionError(f"{what}: succeeded, expected {want}")

def structured(g, off, n, flags=0):
    """pread_structured: (error or None, bytes, [(offset, length, status, errno)])."""
    seen = []
    def chunk(sub, o, status, err):
        seen.append((o, len(sub), status, err.value, bytes(sub)))
        return 0
    try:
        buf = g.pread_structured(n, off, chunk, flags)
        e = None
    except nbd.Error as x:
        buf, e = None, x.errno
    return e, buf, sorted(seen)
"#;

// -------------------------------------------------------------------------------------

#[test]
fn exports_are_listed_with_sizes_read_only_flags_and_contexts() {
    let fx = Fixture::new();
    // Default names (the file names), and a TCP listener on a port of the kernel's choice.
    let sock = fx.dir.join("list.sock");
    let mut c = Command::new(bin());
    c.args(["blk", "serve"])
        .args(fx.sources())
        .arg("--unix")
        .arg(&sock)
        .args(["--tcp", "127.0.0.1:0"]);
    let server = Server::spawn(c, Some(sock.clone()), &fx.dir);
    let names = ["bad.img", "disk.raw", "clean.img", "zbad.img", "big.raw"];
    assert!(
        server
            .line
            .starts_with(&format!("serving {}", names.join(", "))),
        "readiness line {:?}",
        server.line
    );
    let port: u16 = server
        .line
        .split("tcp:127.0.0.1:")
        .nth(1)
        .and_then(|p| p.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no tcp:127.0.0.1:PORT in {:?}", server.line));
    assert_ne!(port, 0, "{:?}", server.line);
    assert!(
        server.line.contains(&format!("unix:{}", s(&sock))),
        "{:?}",
        server.line
    );

    let unix_list = format!("nbd+unix:///?socket={}", s(&sock));
    let tcp_list = format!("nbd://127.0.0.1:{port}");
    for uri in [&unix_list, &tcp_list] {
        let text = nbdinfo(&["--list", uri]);
        for n in names {
            assert!(
                text.contains(&format!("export=\"{n}\"")),
                "{uri}: no {n}:\n{text}"
            );
        }
        assert_eq!(
            text.matches("is_read_only: true").count(),
            names.len(),
            "{uri}: every export is read-only:\n{text}"
        );
        let v = nbdinfo_json(&["--list", uri]);
        assert_eq!(v["protocol"], "newstyle-fixed", "{v:#}");
        assert_eq!(v["structured"], true, "{v:#}");
        let exports = v["exports"].as_array().unwrap();
        let got: Vec<&str> = exports
            .iter()
            .map(|e| e["export-name"].as_str().unwrap())
            .collect();
        assert_eq!(got, names, "{uri}: exports in the order given");
        for e in exports {
            let n = e["export-name"].as_str().unwrap();
            let size = if n == "big.raw" { BIG } else { SIZE };
            assert_eq!(e["export-size"], size, "{n}: {e:#}");
            for (k, want) in [
                ("is_read_only", true),
                ("can_multi_conn", true),
                ("can_trim", false),
                ("can_zero", false),
                ("can_fua", false),
                ("can_df", true),
                ("can_cache", true),
                ("can_flush", true),
            ] {
                assert_eq!(e[k], want, "{n}: {k} in {e:#}");
            }
            let ctx: Vec<&str> = e["contexts"]
                .as_array()
                .unwrap_or_else(|| panic!("{n}: no contexts in {e:#}"))
                .iter()
                .map(|c| c.as_str().unwrap())
                .collect();
            assert!(
                ctx.contains(&"base:allocation") && ctx.contains(&"x-interpose:bad"),
                "{n}: contexts {ctx:?}"
            );
            let desc = e["description"].as_str().unwrap_or_default();
            assert!(desc.contains(n), "{n}: description {desc:?}");
            let (min, pref, max) = (
                e["block_size_minimum"].as_u64().unwrap(),
                e["block_size_preferred"].as_u64().unwrap(),
                e["block_size_maximum"].as_u64().unwrap(),
            );
            assert!(
                min.is_power_of_two() && min <= 512,
                "{n}: minimum block size {min}"
            );
            assert!(
                pref.is_power_of_two() && pref >= 512 && pref >= min,
                "{n}: preferred block size {pref}"
            );
            assert!(
                max >= 32 * MIB && max % min == 0,
                "{n}: maximum block size {max}"
            );
            if n.ends_with(".img") {
                assert_eq!(pref, CHUNK, "{n}: an image prefers whole chunks");
            }
        }
    }
    // The empty name is the first export.
    let v = nbdinfo_json(&[&format!("nbd+unix:///?socket={}", s(&sock))]);
    let e = &v["exports"][0];
    assert_eq!(e["export-size"], SIZE, "{v:#}");
    assert!(
        e["description"]
            .as_str()
            .unwrap_or_default()
            .contains("bad.img"),
        "the default export is not the first one: {v:#}"
    );
    // Over TCP the data is there too.
    let out = client_bytes(
        "nbdcopy over TCP",
        Command::new("nbdcopy")
            .arg(format!("{tcp_list}/clean.img"))
            .arg("-"),
    );
    assert!(out == fx.data, "nbdcopy over TCP: wrong bytes");
    // nbdinfo --list ends with NBD_OPT_ABORT and closes without reading the ACK: a normal
    // end, not a connection dropped with a warning.
    let err = server.stop();
    assert!(!err.contains("WARN") && !err.contains("ERROR"), "{err}");
}

#[test]
fn the_bad_free_export_equals_the_raw_file_and_bad_sectors_fail_whole_copies() {
    let fx = Fixture::new();
    let server = fx.serve();
    let out = client_ok(
        "qemu-img compare",
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(server.uri("clean"))
            .arg(&fx.raw),
    );
    assert!(out.contains("Images are identical"), "{out}");
    let copy = fx.dir.join("copy.raw");
    client_bytes(
        "nbdcopy",
        Command::new("nbdcopy").arg(server.uri("clean")).arg(&copy),
    );
    assert!(
        fs::read(&copy).unwrap() == fx.data,
        "nbdcopy: the copy differs from the raw file"
    );
    // An export with bad sectors cannot be copied or compared whole: EIO, not zeros.
    for name in ["img", "raw"] {
        let out = client(
            "nbdcopy of an export with bad sectors",
            Command::new("nbdcopy").arg(server.uri(name)).arg("-"),
        );
        assert!(
            !out.status.success()
                && String::from_utf8_lossy(&out.stderr).contains("Input/output error"),
            "nbdcopy of {name} must fail with an I/O error: {}",
            describe(&out).chars().take(2000).collect::<String>()
        );
        let out = client(
            "qemu-img compare of an export with bad sectors",
            Command::new("qemu-img")
                .args(["compare", "-f", "raw", "-F", "raw"])
                .arg(server.uri(name))
                .arg(&fx.raw),
        );
        assert!(
            !out.status.success()
                && String::from_utf8_lossy(&out.stderr).contains("Input/output error"),
            "qemu-img compare of {name} must fail with an I/O error: {}",
            describe(&out)
        );
    }
    server.stop();
}

#[test]
fn allocation_map_has_holes_exactly_at_zero_chunks_and_the_bad_map_is_the_mapfile() {
    let fx = Fixture::new();
    let server = fx.serve();
    let zero = fx.zero_chunks();
    assert!(zero.len() > 20, "the fixture has zero chunks: {zero:?}");
    for name in ["img", "clean"] {
        let m = map(&server.uri(name), None);
        assert_eq!(
            m.iter().map(|e| e.1).sum::<u64>(),
            SIZE,
            "{name}: the map covers the export: {m:?}"
        );
        for chunk in 0..SIZE / CHUNK {
            let (cs, ce) = (chunk * CHUNK, (chunk + 1) * CHUNK);
            if name == "img" && Fixture::touches_bad(cs, CHUNK) {
                continue; // see a_range_that_fails_reads_is_never_reported_as_zeros
            }
            let types: Vec<u64> = m
                .iter()
                .filter(|e| e.0 < ce && cs < e.0 + e.1)
                .map(|e| e.2)
                .collect();
            let want = if zero.contains(&chunk) { 3 } else { 0 };
            assert_eq!(
                types,
                [want],
                "{name}: chunk {chunk} ({cs}..{ce}) is {}: base:allocation says {types:?}\n{m:?}",
                if want == 3 { "all zeros" } else { "data" }
            );
        }
    }
    // A raw file has no holes the server knows of: all data.
    let m = map(&server.uri("raw"), None);
    assert_eq!(m, [(0, SIZE, 0)], "raw: base:allocation");

    // x-interpose:bad: 1 = bad, 2 = untried, exactly as in the mapfile.
    let mut want = Vec::new();
    let mut at = 0;
    for &(o, l, st) in BAD {
        if o > at {
            want.push((at, o - at, 0));
        }
        want.push((o, l, if st == '?' { 2 } else { 1 }));
        at = o + l;
    }
    if at < SIZE {
        want.push((at, SIZE - at, 0));
    }
    for name in ["img", "raw"] {
        assert_eq!(
            map(&server.uri(name), Some("x-interpose:bad")),
            want,
            "{name}: x-interpose:bad"
        );
    }
    assert_eq!(
        map(&server.uri("clean"), Some("x-interpose:bad")),
        [(0, SIZE, 0)],
        "clean: x-interpose:bad"
    );
    assert_eq!(
        map(&server.uri("zbad"), Some("x-interpose:bad")),
        [
            (0, ZBAD.0, 0),
            (ZBAD.0, ZBAD.1, 1),
            (ZBAD.0 + ZBAD.1, SIZE - ZBAD.0 - ZBAD.1, 0)
        ],
        "zbad: x-interpose:bad"
    );
    // Text output too.
    let text = nbdinfo(&["--map=x-interpose:bad", &server.uri("img")]);
    let lines: Vec<Vec<u64>> = text
        .lines()
        .map(|l| {
            l.split_whitespace()
                .take(3)
                .map(|w| w.parse().unwrap())
                .collect()
        })
        .collect();
    let flat: Vec<(u64, u64, u64)> = lines.iter().map(|v| (v[0], v[1], v[2])).collect();
    assert_eq!(flat, want, "nbdinfo --map=x-interpose:bad text:\n{text}");
    server.stop();
}

#[test]
fn a_range_that_fails_reads_is_never_reported_as_reading_as_zeros() {
    // proto.md, base:allocation: "NBD_STATE_ZERO (bit 1): if set, the block contents
    // read as all zeroes". A bad sector does not read as zeroes: it fails with EIO, and a
    // copy tool trusting the map would write zeros and report success.
    let fx = Fixture::new();
    let server = fx.serve();
    let mut problems = Vec::new();
    for (name, bad) in [("img", BAD.to_vec()), ("zbad", vec![ZBAD])] {
        let m = map(&server.uri(name), None);
        for &(o, l, _) in &bad {
            for e in m.iter().filter(|e| e.0 < o + l && o < e.0 + e.1) {
                if e.2 & 2 != 0 {
                    problems.push(format!(
                        "{name}: base:allocation extent {}..{} has NBD_STATE_ZERO (type {}) \
                         but covers the bad range {o}..{}",
                        e.0,
                        e.0 + e.1,
                        e.2,
                        o + l
                    ));
                }
            }
        }
    }
    // The consequence: nbdcopy (which skips zero extents) copies `zbad` "successfully".
    let out = client(
        "nbdcopy of zbad",
        Command::new("nbdcopy").arg(server.uri("zbad")).arg("-"),
    );
    if out.status.success() {
        problems.push(format!(
            "nbdcopy of zbad succeeded (exit 0) although its sector at {} fails reads with EIO",
            ZBAD.0
        ));
    }
    let out = client(
        "qemu-io read of the bad sector of zbad",
        Command::new("qemu-io")
            .args(["-r", "-f", "raw"])
            .arg(server.uri("zbad"))
            .args(["-c", &format!("read {} 512", ZBAD.0)]),
    );
    assert!(
        !out.status.success(),
        "zbad: reading the bad sector succeeded: {}",
        describe(&out)
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    server.stop();
}

#[test]
fn structured_reads_give_good_bytes_holes_and_an_eio_chunk_at_each_bad_offset() {
    let fx = Fixture::new();
    let server = fx.serve();
    nbdsh_ok(
        &fx,
        &server,
        r#"
def check(name, off, n, flags=0):
    g = handle(name)
    assert g.get_structured_replies_negotiated()
    err, buf, seen = structured(g, off, n, flags)
    what = f"{name} {off}+{n}"
    bad = bad_in(off, n)
    errors = sorted(o for o, _, st, _, _ in seen if st == nbd.READ_ERROR)
    want = sorted(b for b, _ in bad)
    assert errors == want, f"{what}: error chunks at {errors}, bad ranges start at {want}"
    for o, _, st, e, _ in seen:
        if st == nbd.READ_ERROR:
            assert e == errno.EIO, f"{what}: error chunk at {o} with errno {e}, not EIO"
    if bad:
        assert err == "EIO", f"{what}: the read touching {bad} ended with {err}"
    else:
        assert err is None, f"{what}: failed with {err}"
        assert buf == RAW[off:off + n], f"{what}: wrong bytes"
    # Content chunks: the good bytes exactly, once each, right.
    covered = []
    for o, l, st, _, sub in seen:
        if st in (nbd.READ_DATA, nbd.READ_HOLE):
            assert off <= o and o + l <= off + n, f"{what}: chunk {o}+{l} outside the read"
            assert sub == RAW[o:o + l], f"{what}: chunk {o}+{l} ({st}) has wrong bytes"
            covered.append((o, o + l))
    covered.sort()
    for a, b in zip(covered, covered[1:]):
        assert a[1] <= b[0], f"{what}: chunks {a} and {b} overlap"
    good, at = [], off
    for b, e in sorted(bad):
        if b > at:
            good.append((at, b))
        at = e
    if at < off + n:
        good.append((at, off + n))
    merged = []
    for a, b in covered:
        if merged and merged[-1][1] == a:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    if flags & nbd.CMD_FLAG_DF:
        content = [c for c in seen if c[2] in (nbd.READ_DATA, nbd.READ_HOLE)]
        assert len(content) <= 1, f"{what}: DF, but {len(content)} content chunks"
        assert all(c[2] == nbd.READ_DATA for c in content), f"{what}: DF, but a hole chunk"
        if not bad:
            assert merged == good, f"{what}: DF read covers {merged}"
    else:
        assert merged == good, f"{what}: content chunks cover {merged}, the good bytes are {good}"
    g.shutdown()
    return seen

for name in ("img", "raw"):
    check(name, 0, 65536)
    check(name, 3 * 1048576 + 65536, 131072)
    for o, l, _ in BAD:
        lo = max(0, o - 4096)
        check(name, lo, min(SIZE, o + l + 4096) - lo)
        check(name, o, l)
    check(name, 4 * 1048576 - 512, 4096)      # from the middle of a bad range
    check(name, 1048576 + 4096, 8192)         # inside the bad chunk
    check(name, 0, SIZE)                      # everything at once
    check(name, 51200 - 4096, 8192, nbd.CMD_FLAG_DF)
    check(name, 2 * 1048576 - 65536, 131072, nbd.CMD_FLAG_DF)  # data and zeros: one chunk

# The image's zero chunks come as holes.
seen = check("img", 2 * 1048576, 1048576)
assert seen and all(st == nbd.READ_HOLE for _, _, st, _, _ in seen), f"zero chunks: {seen}"
seen = check("clean", 5 * 1048576 - 4096, 8192)
assert [st for _, _, st, _, _ in seen] == [nbd.READ_DATA, nbd.READ_HOLE], f"data then a hole: {seen}"
print("ok")
"#,
    );
    server.stop();
}

#[test]
fn plain_reads_touching_a_bad_sector_fail_with_eio_with_or_without_structured_replies() {
    let fx = Fixture::new();
    let server = fx.serve();
    nbdsh_ok(
        &fx,
        &server,
        r#"
for structured_replies in (True, False):
    for name in ("img", "raw"):
        g = handle(name, structured=structured_replies)
        assert g.get_structured_replies_negotiated() == structured_replies
        what = f"{name} (structured replies: {structured_replies})"
        for o, l, st in BAD:
            fails(f"{what}: read of the {st} range {o}+{l}", "EIO", g.pread, l, o)
            fails(f"{what}: read of its first sector", "EIO", g.pread, 512, o)
            fails(f"{what}: read of its last sector", "EIO", g.pread, 512, o + l - 512)
            lo = max(0, o - 65536)
            fails(f"{what}: read {lo}+{min(SIZE, o + l + 65536) - lo} across it", "EIO", g.pread, min(SIZE, o + l + 65536) - lo, lo)
            # The neighbours read fine, and the session goes on after each error.
            if o >= 4096:
                assert g.pread(512, o - 512) == RAW[o - 512:o], f"{what}: sector before {o}"
                assert g.pread(4096, o - 4096) == RAW[o - 4096:o], f"{what}: 4 KiB before {o}"
            if o + l < SIZE:
                assert g.pread(512, o + l) == RAW[o + l:o + l + 512], f"{what}: sector after {o + l}"
        # Zero regions read as zeros; data as data.
        for off, n in ((2 * 1048576, 1048576), (5 * 1048576, 524288), (7 * 1048576 + 524288 - 3000, 3000 + 65536)):
            assert g.pread(n, off) == bytes(n), f"{what}: zeros at {off}+{n}"
        assert g.pread(524288, 5 * 1048576 + 524288) == RAW[5 * 1048576 + 524288:6 * 1048576], f"{what}: text" 
        g.shutdown()
print("ok")
"#,
    );
    server.stop();
}

#[test]
fn writes_get_eperm_out_of_range_gets_einval_and_cache_flush_block_status_work() {
    let fx = Fixture::new();
    let server = fx.serve();
    nbdsh_ok(
        &fx,
        &server,
        r#"
for name in ("img", "raw", "clean"):
    g = handle(name, contexts=("base:allocation", "x-interpose:bad"))
    assert g.is_read_only() and not g.can_trim() and not g.can_zero()
    # libnbd refuses these itself unless told not to: send them to the server.
    g.set_strict_mode(0)
    fails(f"{name}: pwrite", "EPERM", g.pwrite, b"x" * 4096, 0)
    fails(f"{name}: trim", "EPERM", g.trim, 4096, 0)
    fails(f"{name}: zero", "EPERM", g.zero, 4096, 0)
    fails(f"{name}: read past the end", "EINVAL", g.pread, 1024, SIZE - 512)
    fails(f"{name}: read at the end", "EINVAL", g.pread, 512, SIZE)
    fails(f"{name}: cache past the end", "EINVAL", g.cache, 1024, SIZE - 512)
    fails(f"{name}: block status past the end", "EINVAL", g.block_status, 1024, SIZE - 512, lambda *a: 0)
    assert g.pread(4096, 0) == RAW[:4096], f"{name}: a read after the errors"
    g.cache(1048576, 0)
    g.cache(65536, 1048576)  # a bad chunk: a hint, not an error
    g.flush()
    seen = {}
    def extents(ctx, off, entries, err):
        seen.setdefault(ctx, []).append((off, list(entries)))
        return 0
    lo = 51200 - 512
    g.block_status(2048, lo, extents)
    bad = seen["x-interpose:bad"][0]
    if name == "clean":
        assert bad == (lo, [2048, 0]), f"{name}: {seen}"
    else:
        assert bad == (lo, [512, 0, 512, 1, 1024, 0]), f"{name}: x-interpose:bad {seen}"
    assert seen["base:allocation"][0] == (lo, [2048, 0]), f"{name}: base:allocation {seen}"
    seen.clear()
    g.block_status(1048576, 2 * 1048576, extents, nbd.CMD_FLAG_REQ_ONE)
    for ctx, got in seen.items():
        assert len(got) == 1 and len(got[0][1]) == 2, f"{name}: REQ_ONE: {seen}"
        assert got[0][1][0] <= 1048576, f"{name}: REQ_ONE extent longer than asked: {seen}"
    g.shutdown()
print("ok")
"#,
    );
    server.stop();
}

#[test]
fn eight_connections_reading_at_once_get_the_raw_files_bytes() {
    let fx = Fixture::new();
    let server = fx.serve();
    let out = nbdsh_ok(
        &fx,
        &server,
        r#"
errors = []
counts = {"ok": 0, "eio": 0}
lock = threading.Lock()
def worker(i):
    try:
        name = ("img", "raw")[i % 2]
        g = handle(name)
        assert g.can_multi_conn(), f"{name}: no multi-conn"
        r = random.Random(i)
        for _ in range(200):
            n = r.choice([512, 4096, 65536, 200 * 512, 262144])
            off = r.randrange(0, SIZE - n + 1, 512)
            if bad_in(off, n):
                fails(f"{name} {off}+{n}", "EIO", g.pread, n, off)
                k = "eio"
            else:
                assert g.pread(n, off) == RAW[off:off + n], f"{name}: wrong bytes at {off}+{n}"
                k = "ok"
            with lock:
                counts[k] += 1
        g.shutdown()
    except Exception as e:
        with lock:
            errors.append(f"thread {i}: {e!r}")
threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert not errors, "\n".join(errors)
assert counts["ok"] + counts["eio"] == 1600 and counts["eio"] > 10, counts
print(counts)
"#,
    );
    assert!(out.contains("'ok'"), "{out}");
    server.stop();
}

/// Many small reads in flight at once through a cache of 16 chunks (the image has 128):
/// the server answers cheap ones (zeros, cached, checked raw chunks) on its reading thread
/// and batches their replies, and hands the others to workers; every reply must carry the
/// right bytes, with and without structured replies.
#[test]
fn pipelined_small_reads_through_a_tiny_cache_get_the_right_bytes() {
    let fx = Fixture::new();
    let server = fx.serve_with(&["--cache-mib", "1"]);
    let out = nbdsh_ok(
        &fx,
        &server,
        r#"
for structured in (True, False):
    g = handle("clean", structured=structured)
    r = random.Random(int(structured))
    pending, wrong, answered = {}, [], 0
    def submit():
        n = r.choice([1, 512, 4096, 4096, 4096, 5000, 65536, 131079])
        off = r.randrange(0, SIZE - n + 1)
        if r.random() < 0.7:
            off -= off % 4096
        b = nbd.Buffer(n)
        pending[g.aio_pread(b, off)] = (b, off, n)
    for _ in range(64):
        submit()
    sent = 64
    while pending:
        g.poll(-1)
        for cookie in [c for c in pending if g.aio_command_completed(c)]:
            b, off, n = pending.pop(cookie)
            answered += 1
            if b.to_bytearray() != RAW[off:off + n]:
                wrong.append(f"{off}+{n}")
            if sent < 6000:
                submit()
                sent += 1
    assert not wrong, f"structured={structured}: {len(wrong)} reads with wrong bytes: {wrong[:10]}"
    assert answered == 6000, answered
    g.shutdown()
print("ok")
"#,
    );
    assert!(out.contains("ok"), "{out}");
    server.stop();
}

#[test]
fn a_disconnect_right_after_pipelined_reads_still_answers_every_read() {
    // proto.md, NBD_CMD_DISC: "The server MUST handle all outstanding requests, shut down
    // the TLS session (if one is running), and close the TCP session."
    let fx = Fixture::new();
    let server = fx.serve();
    nbdsh_ok(
        &fx,
        &server,
        r#"
for attempt in range(3):
    g = handle("clean")
    reads = []
    for i in range(16):
        b = nbd.Buffer(1048576)
        off = (i % 8) * 1048576
        reads.append((g.aio_pread(b, off), b, off))
    g.aio_disconnect()
    while not (g.aio_is_closed() or g.aio_is_dead()):
        g.poll(-1)
    lost = []
    for cookie, b, off in reads:
        try:
            if not g.aio_command_completed(cookie):
                lost.append(f"{off}: not completed")
            elif b.to_bytearray() != RAW[off:off + 1048576]:
                lost.append(f"{off}: wrong bytes")
        except nbd.Error as e:
            lost.append(f"{off}: {e}")
    assert not lost, f"attempt {attempt}: {len(lost)} of 16 reads sent before NBD_CMD_DISC were not answered: {lost}"
print("ok")
"#,
    );
    server.stop();
}

#[test]
fn qemu_io_reads_zeros_and_data_and_fails_on_bad_sectors() {
    let fx = Fixture::new();
    let server = fx.serve();
    let qemu_io = |name: &str, cmd: &str| {
        client(
            &format!("qemu-io {name} {cmd}"),
            Command::new("qemu-io")
                .args(["-r", "-f", "raw"])
                .arg(server.uri(name))
                .args(["-c", cmd]),
        )
    };
    for name in ["img", "raw", "clean"] {
        for (off, len) in [
            (2 * MIB, MIB),
            (5 * MIB, MIB / 2),
            (7 * MIB + MIB / 2 - 3000, 3000),
        ] {
            let out = qemu_io(name, &format!("read -P 0 {off} {len}"));
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                out.status.success()
                    && text.contains(&format!("read {len}/{len} bytes at offset {off}")),
                "{name}: read -P 0 {off} {len}: {}",
                describe(&out)
            );
        }
        for (off, len) in [(0, 4096), (3 * MIB + 65536, 8192), (SIZE - 4096, 3584)] {
            let out = qemu_io(name, &format!("read -v {off} {len}"));
            assert!(
                out.status.success(),
                "{name}: read -v {off} {len}: {}",
                describe(&out)
            );
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let mut got = Vec::new();
            for l in text.lines() {
                // "00000000:  6c 69 6e ...  line.0.."
                let Some((addr, rest)) = l.split_once(":  ") else {
                    continue;
                };
                if u64::from_str_radix(addr, 16).is_err() {
                    continue;
                }
                got.extend(
                    rest.split(' ')
                        .take(16)
                        .map_while(|h| u8::from_str_radix(h, 16).ok()),
                );
            }
            assert!(
                got == fx.data[off as usize..(off + len) as usize],
                "{name}: read -v {off} {len} shows other bytes than the file ({} bytes parsed)",
                got.len()
            );
        }
        if name == "clean" {
            continue;
        }
        for &(o, l, _) in BAD {
            for (off, len) in [
                (o, l),
                (
                    o.saturating_sub(4096),
                    8192.min(SIZE - o.saturating_sub(4096)),
                ),
            ] {
                let out = qemu_io(name, &format!("read {off} {len}"));
                let all = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                assert!(
                    !out.status.success() && all.contains("Input/output error"),
                    "{name}: read {off} {len} touches the bad range {o}+{l}: {}",
                    describe(&out)
                );
            }
            if o >= 512 {
                let out = qemu_io(
                    name,
                    &format!("read -P {} {} 1", fx.data[o as usize - 1], o - 1),
                );
                // The byte just before a bad range reads fine.
                assert!(
                    out.status.success(),
                    "{name}: the byte before {o}: {}",
                    describe(&out)
                );
            }
        }
    }
    server.stop();
}

/// Runs tests/scripts/nbd_badclient.py against `server`: the `FAIL` lines and the
/// number of connections it says the server had to drop.
fn badclient(fx: &Fixture, server: &mut Server, fuzz: u32, cases: &[&str]) -> (Vec<String>, usize) {
    let out = client(
        "nbd_badclient.py",
        Command::new(python())
            .arg(script("nbd_badclient.py"))
            .arg(server.socket.as_ref().unwrap())
            .arg(&fx.raw)
            .args(["clean", "big", &fuzz.to_string()])
            .args(cases)
            .env("NBD_SERVER_PID", server.pid().to_string()),
    );
    server.assert_running();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut failed: Vec<String> = stdout
        .lines()
        .filter(|l| l.starts_with("FAIL"))
        .map(str::to_owned)
        .collect();
    if !out.status.success() && failed.is_empty() {
        failed.push(format!("nbd_badclient.py failed: {}", describe(&out)));
    }
    let dropped = stdout
        .lines()
        .find_map(|l| l.strip_prefix("dropped "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no `dropped N` line: {}", describe(&out)));
    // A fresh well-behaved client still gets the right bytes.
    let copy = client_bytes(
        "nbdcopy after the malformed clients",
        Command::new("nbdcopy").arg(server.uri("clean")).arg("-"),
    );
    assert!(
        copy == fx.data,
        "nbdcopy after the malformed clients: wrong bytes"
    );
    (failed, dropped)
}

#[test]
fn clients_beyond_max_connections_are_refused_with_a_reason_and_served_once_one_leaves() {
    let fx = Fixture::new();
    let server = fx.serve_with(&["--max-connections", "2"]);
    let mut cmd_env = nbdsh_cmd(&fx, &server);
    cmd_env
        .env("SERVER_LOG", &server.log)
        .env("SOCK", server.socket.as_ref().unwrap());
    let out = client(
        "nbdsh",
        cmd_env.args([
            "-c",
            NBDSH_PRELUDE,
            "-c",
            r#"
import re, socket, struct, time
LOG = os.environ["SERVER_LOG"]
def wait_ended(n):
    # The server's log lines: a connection's place is given back before its end is logged.
    deadline = time.monotonic() + 20
    while ended() < n:
        assert time.monotonic() < deadline, f"the server logged {ended()} connection ends, not {n}"
        time.sleep(0.02)

def ended():
    # Lines the server logs when a connection ends, however it ends.
    ends = re.compile(r"connection \d+(?: closed|: client went away| from .* dropped)")
    return sum(1 for l in open(LOG) if ends.search(l))

a = handle("img")
b = handle("clean")  # the limit is the server's, across exports
try:
    handle("img")
    raise AssertionError("a third connection was served")
except nbd.Error as e:
    assert "policy" in str(e), f"refused for another reason: {e}"

# Asking again on the same connection is refused again (and logged once).
g = nbd.NBD()
g.set_opt_mode(True)
g.connect_uri(URI["img"])
for _ in range(3):
    try:
        g.opt_go()
        raise AssertionError("a GO beyond the limit was served")
    except nbd.Error:
        pass  # (libnbd's opt_go calls NBD_REP_ERR_POLICY "not supported")
g.opt_abort()

# NBD_OPT_EXPORT_NAME has no error reply: the server hangs up.
s = socket.socket(socket.AF_UNIX)
s.settimeout(20)
s.connect(os.environ["SOCK"])
hello = s.recv(18, socket.MSG_WAITALL)
assert len(hello) == 18, hello
s.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 1, 3) + b"img")
assert s.recv(1) == b"", "the server answered NBD_OPT_EXPORT_NAME beyond the limit"
s.close()

# Options other than GO are still answered: a listing works while the server is full.
names = []
g = nbd.NBD()
g.set_opt_mode(True)
g.connect_uri(URI["img"])
g.opt_list(lambda name, desc: names.append(name) or 0)
g.opt_abort()
assert "img" in names and "clean" in names, names

# The two served connections still read; then one leaves and its place is free.
assert a.pread(4096, 0) == RAW[:4096]
assert b.pread(4096, 0) == RAW[:4096]
# Ended so far: the refused handle, the one that asked three times, the EXPORT_NAME
# socket and the listing.
wait_ended(4)
a.shutdown()
wait_ended(5)
c = handle("img")
assert c.pread(4096, 4096) == RAW[4096:8192]
print("ok")
"#,
        ]),
    );
    assert!(
        out.status.success(),
        "nbdsh script failed: {}",
        describe(&out)
    );
    let err = server.stop();
    assert_eq!(
        err.matches("refused its NBD_OPT_GO").count(),
        2,
        "refusals of NBD_OPT_GO logged, once per connection:\n{}",
        tail(&err, 20)
    );
    assert!(
        err.contains("refused: too many connections"),
        "the refusal of NBD_OPT_EXPORT_NAME was not logged:\n{}",
        tail(&err, 20)
    );
}

#[test]
fn a_stopping_server_answers_the_reads_in_flight_then_exits() {
    // SIGTERM while 39 reads of 1 MiB are in flight (tests/scripts/nbd_badclient.py sends
    // it after the first reply): every reply arrives whole, then the server exits 0.
    let fx = Fixture::new();
    let server = fx.serve();
    let case = "in_flight_reads_are_answered_when_the_server_stops";
    let out = client(
        case,
        Command::new(python())
            .arg(script("nbd_badclient.py"))
            .arg(server.socket.as_ref().unwrap())
            .arg(&fx.raw)
            .args(["clean", "big", "0", case])
            .env("NBD_SERVER_PID", server.pid().to_string()),
    );
    assert!(out.status.success(), "{case}: {}", describe(&out));
    server.stop_within(Duration::from_secs(20));
}

#[test]
fn malformed_clients_are_dropped_and_the_others_keep_being_served() {
    let fx = Fixture::new();
    // Every case once, then the server is stopped so that its log is complete. (A short
    // handshake deadline, for the case of a client that drips its options.)
    let mut server = fx.serve_with(&["--handshake-timeout", "3"]);
    let (mut failed, dropped) = badclient(&fx, &mut server, 0, &[]);
    let err = server.stop();
    // The clients cut at the deadline: the log says so, not "Resource temporarily
    // unavailable" (the socket timeout's EAGAIN).
    if !err.contains("the handshake took too long (--handshake-timeout)")
        || err.contains("Resource temporarily unavailable")
    {
        failed.push(format!(
            "the handshake deadline is not named in the log:\n{}",
            tail(&err, 60)
        ));
    }
    let warned = err
        .lines()
        .filter(|l| (l.contains("WARN") || l.contains("ERROR")) && l.contains("connection"))
        .count();
    if warned < dropped {
        failed.push(format!(
            "{dropped} connections broke the protocol, but only {warned} warnings about \
             connections were logged:\n{}",
            tail(&err, 60)
        ));
    }
    failed.extend(connections_without_an_end(&err));
    // The seeded fuzz loop, on a fresh server.
    let mut server = fx.serve();
    let (fuzz_failed, _) = badclient(&fx, &mut server, 300, &["random_garbage"]);
    failed.extend(fuzz_failed);
    let err = server.stop();
    failed.extend(connections_without_an_end(&err));
    assert!(
        failed.is_empty(),
        "malformed-client cases failed:\n{}\n\nserver stderr (tail):\n{}",
        failed.join("\n"),
        tail(&err, 30)
    );
}

/// Connections the log shows accepted (`connection N from ...`) but never ended: every
/// connection, well-behaved or not, must get a line of its own after those saying where
/// it came from and which export it chose.
fn connections_without_an_end(log: &str) -> Vec<String> {
    let mut open: Vec<String> = Vec::new();
    for line in log.lines() {
        let Some(rest) = line.split("connection ").nth(1) else {
            continue;
        };
        let id: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if id.is_empty() {
            continue;
        }
        let after = &rest[id.len()..];
        if after.starts_with(" from ") && !after.contains("dropped") {
            open.push(id);
        } else if !after.starts_with(": export ") {
            open.retain(|o| *o != id);
        }
    }
    open.iter()
        .map(|id| format!("connection {id} has no log line saying how it ended"))
        .collect()
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// An nbdsh process holding a connection: it reads, runs `then` (Python), prints
/// `ready`, then waits for a line on stdin and tries another read.
struct HeldClient {
    child: Child,
}

impl HeldClient {
    fn start(fx: &Fixture, server: &Server, name: &str, then: &str) -> HeldClient {
        let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
        let mut child = Command::new("nbdsh")
            .env("PATH", path)
            .args(["-u", &server.uri(name), "-c"])
            .arg(format!(
                "import sys\n\
                 assert h.pread(4096, 0) == open({:?}, 'rb').read(4096)\n\
                 {then}\n\
                 print('ready', flush=True)\n\
                 sys.stdin.readline()\n\
                 try:\n    h.pread(4096, 0)\n    print('still served')\n\
                 except nbd.Error as e:\n    print('closed:', e)\n",
                s(if name == "big" { &fx.big } else { &fx.raw })
            ))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nbdsh");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        if line.trim() != "ready" {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("nbdsh did not connect: {line:?} {}", describe(&out));
        }
        HeldClient { child }
    }

    /// Lets it try its second read; what it printed.
    fn finish(mut self) -> String {
        let _ = self.child.stdin.take().unwrap().write_all(b"go\n");
        let status = wait_timeout(&mut self.child, Duration::from_secs(20));
        let mut out = String::new();
        let _ = self.child.stdout.take().unwrap().read_to_string(&mut out);
        let mut err = String::new();
        let _ = self.child.stderr.take().unwrap().read_to_string(&mut err);
        assert!(
            status.is_some(),
            "an nbdsh client hung after the server exited\n{out}\n{err}"
        );
        format!("{out}{err}")
    }
}

impl Drop for HeldClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn sigterm_with_clients_connected_exits_promptly_and_removes_the_socket() {
    let fx = Fixture::new();
    let server = fx.serve();
    let sock = server.socket.clone().unwrap();
    let pid = server.pid();
    let mut held: Vec<HeldClient> = ["img", "raw", "clean"]
        .iter()
        .map(|n| HeldClient::start(&fx, &server, n, "pass"))
        .collect();
    // One that asked for 32 MiB and does not read the reply: the server's writes stall.
    held.push(HeldClient::start(
        &fx,
        &server,
        "big",
        "b = nbd.Buffer(32 << 20); h.aio_pread(b, 0)",
    ));
    // One client in the middle of the handshake: it read the greeting and went quiet;
    // and 20 that connected and sent nothing.
    let mut mid = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let mut greeting = [0u8; 18];
    mid.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    let idle: Vec<_> = (0..20)
        .map(|_| std::os::unix::net::UnixStream::connect(&sock).unwrap())
        .collect();
    // They do not keep others out.
    let v = nbdinfo_json(&[&server.uri("clean")]);
    assert_eq!(v["exports"][0]["export-size"], SIZE, "{v:#}");
    let started = Instant::now();
    server.stop_within(Duration::from_secs(5));
    let took = started.elapsed();
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "process {pid} is still there"
    );
    mid.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rest = Vec::new();
    let r = mid.read_to_end(&mut rest);
    assert!(
        r.is_ok()
            || r.as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "the mid-handshake client was not disconnected: {r:?}"
    );
    drop(idle);
    for h in held {
        let out = h.finish();
        assert!(
            out.contains("closed:"),
            "a client's read after the server exited: {out}"
        );
    }
    assert!(took < Duration::from_secs(5), "SIGTERM took {took:?}");
}

#[test]
fn a_stale_socket_is_replaced_and_a_live_one_is_not_taken_over() {
    let fx = Fixture::new();
    // A socket file nobody listens on: what a killed server leaves.
    let sock = fx.dir.join("nbd.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let server = fx.serve();
    let v = nbdinfo_json(&[&server.uri("clean")]);
    assert_eq!(v["exports"][0]["export-size"], SIZE, "{v:#}");
    // A second server on the live socket must refuse, and leave the first one alone.
    let out = client(
        "a second server on a live socket",
        Command::new(bin())
            .args(["blk", "serve", s(&fx.clean), "--unix"])
            .arg(&sock)
            .stdin(Stdio::null()),
    );
    assert!(
        !out.status.success() && !out.stdout.starts_with(b"serving"),
        "a second server took over a live socket: {}",
        describe(&out)
    );
    assert!(
        sock.exists(),
        "the failed second server removed the live socket"
    );
    let v = nbdinfo_json(&[&server.uri("clean")]);
    assert_eq!(v["exports"][0]["export-size"], SIZE, "{v:#}");
    server.stop();
    // A file that is not a socket is never taken for a stale one (and removed).
    let precious = fx.dir.join("precious.txt");
    std::fs::write(&precious, b"keep me\n").unwrap();
    let out = client(
        "a server asked to listen on a regular file",
        Command::new(bin())
            .args(["blk", "serve", s(&fx.clean), "--unix"])
            .arg(&precious)
            .stdin(Stdio::null()),
    );
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not a socket"),
        "{}",
        describe(&out)
    );
    assert_eq!(std::fs::read(&precious).unwrap(), b"keep me\n");
    // At exit the path is removed only if it is still the server's socket: a file put
    // there meanwhile, or a second server's socket once the first's was removed, stays.
    let moved = fx.dir.join("moved.sock");
    let serve_at = |sock: &Path| {
        let mut c = Command::new(bin());
        c.args(["blk", "serve", s(&fx.clean), "--unix"]).arg(sock);
        Server::spawn(c, None, &fx.dir)
    };
    let first = serve_at(&moved);
    std::fs::remove_file(&moved).unwrap();
    std::fs::write(&moved, b"not the server's\n").unwrap();
    first.stop();
    assert_eq!(std::fs::read(&moved).unwrap(), b"not the server's\n");
    std::fs::remove_file(&moved).unwrap();
    let first = serve_at(&moved);
    std::fs::remove_file(&moved).unwrap();
    let second = serve_at(&moved);
    first.stop();
    let uri = format!("nbd+unix:///?socket={}", s(&moved));
    assert_eq!(nbdinfo_json(&[&uri])["exports"][0]["export-size"], SIZE);
    second.stop();
    // An image whose header lost its magic (one bit) is not served as a raw disk (its
    // compressed bytes, with no error): its trailer says what it is.
    let mut bytes = std::fs::read(&fx.clean).unwrap();
    bytes[0] ^= 0x20;
    let damaged = fx.dir.join("damaged.img");
    std::fs::write(&damaged, &bytes).unwrap();
    let out = client(
        "a server given an image with a damaged header",
        // (`timeout`: served after all, it would serve until stopped.)
        Command::new("timeout")
            .args(["20", bin(), "blk", "serve", s(&damaged), "--unix"])
            .arg(fx.dir.join("damaged.sock"))
            .stdin(Stdio::null()),
    );
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("a damaged image"),
        "{}",
        describe(&out)
    );
}

#[test]
fn socket_activation_serves_through_listen_fds() {
    let fx = Fixture::new();
    // A wrapper that binds the socket, puts it on fd 3, sets LISTEN_PID to its own pid
    // and execs the server (exec keeps the pid), as systemd does.
    let sock = fx.dir.join("activated.sock");
    let mut c = Command::new(python());
    c.arg("-c")
        .arg(
            "import os, socket, sys\n\
             s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
             s.bind(sys.argv[1]); s.listen(16)\n\
             os.dup2(s.fileno(), 3); os.set_inheritable(3, True)\n\
             os.environ['LISTEN_FDS'] = '1'; os.environ['LISTEN_PID'] = str(os.getpid())\n\
             os.execv(sys.argv[2], sys.argv[2:])\n",
        )
        .arg(&sock)
        .arg(bin())
        .args(["blk", "serve", "--name", "clean"])
        .arg(&fx.clean);
    let server = Server::spawn(c, None, &fx.dir);
    assert!(
        server.line.contains("1 systemd socket")
            && !server.line.contains("1 systemd sockets")
            && !server.line.contains("tcp:"),
        "readiness line {:?}: the passed socket only",
        server.line
    );
    let uri = format!("nbd+unix:///clean?socket={}", s(&sock));
    let out = client_bytes("nbdcopy", Command::new("nbdcopy").arg(&uri).arg("-"));
    assert!(out == fx.data, "nbdcopy through the activated socket");
    server.stop();

    assert!(
        have("systemd-socket-activate"),
        "systemd-socket-activate is needed (apt-get install systemd; scripts/setup.sh installs it)"
    );
    // systemd-socket-activate listens, and on the first connection execs the server.
    let sock = fx.dir.join("ssa.sock");
    let log = fx.dir.join("ssa.log");
    let child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&sock)
        .arg(bin())
        .args(["blk", "serve", "--name", "img"])
        .arg(&fx.img)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("systemd-socket-activate");
    let mut child = ChildGuard(child);
    let mut stderr = BufReader::new(child.0.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert!(
        line.contains("Listening on"),
        "systemd-socket-activate: {line:?}"
    );
    let uri = format!("nbd+unix:///img?socket={}", s(&sock));
    let v = nbdinfo_json(&[&uri]);
    assert_eq!(v["exports"][0]["export-size"], SIZE, "{v:#}");
    let mut ready = String::new();
    BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert!(
        ready.starts_with("serving img on 1 systemd socket"),
        "readiness line {ready:?}"
    );
    let m = map(&uri, Some("x-interpose:bad"));
    assert_eq!(m.iter().filter(|e| e.2 != 0).count(), BAD.len(), "{m:?}");
    signal(&child.0, libc::SIGTERM);
    let status = wait_timeout(&mut child.0, Duration::from_secs(10));
    let mut rest = String::new();
    if status.is_some() {
        let _ = stderr.read_to_string(&mut rest);
    }
    let _ = fs::write(&log, &rest);
    let status = status.unwrap_or_else(|| panic!("no exit after SIGTERM\n{rest}"));
    assert!(
        status.success(),
        "exit {status} after SIGTERM (the exec'd server's pid)\n{rest}"
    );
    assert!(!rest.contains("panicked"), "{rest}");
}

/// A child killed and reaped when dropped (a no-op once it has been waited for).
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn nbdfuse_shows_the_export_as_a_file_with_eio_only_on_bad_pages() {
    let fx = Fixture::new();
    let server = fx.serve();
    let clean = NbdFuse::start(&fx.dir.join("nbdfuse"), [server.uri("clean")]);
    let got = fs::read(clean.file()).unwrap();
    assert!(
        got == fx.data,
        "the clean export read through nbdfuse differs"
    );
    drop(clean);
    let bad = NbdFuse::start(&fx.dir.join("nbdfuse"), [server.uri("img")]);
    let f = fs::File::open(bad.file()).unwrap();
    // Page by page (the kernel's page cache reads whole pages): pages holding a bad or
    // untried byte fail with EIO, every other page reads the disk's bytes.
    let mut failed = 0;
    for page in 0..SIZE / 4096 {
        let mut b = vec![0u8; 4096];
        let off = page * 4096;
        match std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, off) {
            Ok(()) => {
                assert!(
                    !Fixture::touches_bad(off, 4096),
                    "page at {off} touches a bad range but read fine"
                );
                assert!(
                    b == fx.data[off as usize..off as usize + 4096],
                    "page at {off}"
                );
            }
            Err(e) => {
                assert!(
                    Fixture::touches_bad(off, 4096),
                    "page at {off} failed but has no bad byte: {e}"
                );
                assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
                failed += 1;
            }
        }
    }
    assert!(failed > 0, "no page failed");
}

/// `blk serve RAW` on `sock` with at most `nofile` descriptors and a handshake timeout of
/// 600 s (no silent client is closed while a test counts).
fn serve_with_nofile(nofile: u32, raw: &Path, sock: &Path, dir: &Path) -> Server {
    let mut cmd = Command::new("prlimit");
    cmd.arg(format!("--nofile={nofile}:{nofile}"))
        .args([bin(), "blk", "serve", "--log", "info"])
        .args(["--handshake-timeout", "600"])
        .arg(raw)
        .arg("--unix")
        .arg(sock);
    Server::spawn(cmd, Some(sock.to_path_buf()), dir)
}

/// `n` clients connected to `sock` that say nothing.
fn silent_clients(sock: &Path, n: usize) -> Vec<std::os::unix::net::UnixStream> {
    (0..n)
        .map(|_| std::os::unix::net::UnixStream::connect(sock).unwrap())
        .collect()
}

/// A server out of descriptors (RLIMIT_NOFILE) or threads (RLIMIT_NPROC, for a non-root
/// server) refuses or delays the connections it cannot take, says so once, and serves
/// the others and the next ones. It used to spin on accept, logging each failure
/// (millions of lines), and a failed thread start ended the whole server.
#[test]
fn a_server_out_of_descriptors_or_threads_serves_on() {
    let t = plain_dir("interpose-test-blklimits-");
    let dir = t.path();
    // Readable and writable by the unprivileged server below.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o777)).unwrap();
    let raw = dir.join("r.raw");
    fs::write(&raw, random(1 << 20, 3)).unwrap();
    fs::set_permissions(&raw, fs::Permissions::from_mode(0o644)).unwrap();
    let sock = dir.join("s.sock");
    let uri = format!("nbd+unix:///?socket={}", s(&sock));
    let read_ok = |what: &str| {
        let out = client_bytes(what, Command::new("nbdcopy").arg(&uri).arg("-"));
        assert!(out == fs::read(&raw).unwrap(), "{what}: wrong bytes");
    };

    // Descriptors: 100 clients that connect and stall in the handshake. Two limits, one
    // odd and one even: a server that took two descriptors per connection (the accepted
    // one and a copy) ran out on the copy at one of them, and closed each waiting client
    // at once instead of leaving the backlog to wait (seen in CI).
    for nofile in [40, 41] {
        let server = serve_with_nofile(nofile, &raw, &sock, dir);
        let stalled = silent_clients(&sock, 100);
        let log_has = |what: &str| {
            let deadline = Instant::now() + Duration::from_secs(20);
            while !server.stderr().contains(what) {
                assert!(
                    Instant::now() < deadline,
                    "nofile {nofile}: no {what:?} in the log:\n{}",
                    tail(&server.stderr(), 10)
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        log_has("accept: Too many open files");
        // Long enough for a spinning accept loop to log many thousands of lines. Nothing
        // closes meanwhile: one episode, one line.
        std::thread::sleep(Duration::from_secs(1));
        let accept_lines = |log: &str| log.lines().filter(|l| l.contains("accept:")).count();
        let before = accept_lines(&server.stderr());
        assert_eq!(
            before, 1,
            "nofile {nofile}: {before} log lines about failed accepts while nothing closed"
        );
        drop(stalled);
        read_ok("a client once the stalled ones had gone");
        let err = server.stop();
        // The stalled clients' backlog, accepted once they went, can start more episodes
        // of running out, as many as the scheduler makes (a few seen): a loose bound.
        let after = accept_lines(&err);
        assert!(
            after < 100,
            "nofile {nofile}: {after} log lines about failed accepts"
        );
        assert!(
            !err.contains("; closed"),
            "nofile {nofile}: a waiting client was closed:\n{}",
            tail(&err, 10)
        );
    }

    // Threads: the server unprivileged, with 30 threads for its user (one no other test
    // uses: the limit counts every process of the user); each connection takes a reader
    // and 4 workers.
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=64123", "--regid=64123", "--clear-groups"])
        .args([
            "prlimit",
            "--nproc=30:30",
            bin(),
            "blk",
            "serve",
            "--log",
            "info",
        ])
        .arg(&raw)
        .arg("--unix")
        .arg(&sock);
    let mut server = Server::spawn(cmd, Some(sock.clone()), dir);
    let pid = server.pid();
    let threads = || -> usize {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("Threads:")).unwrap();
        line["Threads:".len()..].trim().parse().unwrap()
    };
    let idle_threads = threads();
    let opened = output(
        Command::new("timeout")
            .args(["60", python(), "-c"])
            .arg(format!(
                "import nbd\n\
             hs, refused = [], 0\n\
             for i in range(12):\n\
             \x20   h = nbd.NBD()\n\
             \x20   try:\n\
             \x20       h.connect_uri({uri:?}); h.pread(4096, 0); hs.append(h)\n\
             \x20   except nbd.Error:\n\
             \x20       refused += 1\n\
             print(len(hs), refused)\n"
            )),
    );
    assert!(opened.status.success(), "{}", describe(&opened));
    let counts = String::from_utf8_lossy(&opened.stdout).trim().to_owned();
    server.assert_running();
    assert!(
        counts != "12 0",
        "all 12 connections were served: the thread limit was never reached"
    );
    // The client's connections are closed; their threads end when the server sees that.
    // Until they have, a new client could find no thread again.
    let deadline = Instant::now() + Duration::from_secs(20);
    while threads() > idle_threads {
        assert!(
            Instant::now() < deadline,
            "the served connections' threads did not end: {} left, {idle_threads} idle",
            threads()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    read_ok("a client after the thread limit was reached");
    let err = server.stop();
    assert!(
        err.contains("no thread to serve it") || err.contains("worker threads"),
        "nothing logged about the thread limit:\n{}",
        tail(&err, 20)
    );
}

/// Clients that connect and say nothing cannot shut others out: past 128 connections in
/// their handshake the oldest is closed for the newest, so a real client gets through
/// though 400 silent ones are still connected and the server's descriptors could not
/// hold them all (before, it waited for their handshake timeout, here 600 s).
#[test]
fn silent_connections_cannot_lock_out_a_real_client() {
    let t = plain_dir("interpose-test-blksilent-");
    let dir = t.path();
    let raw = dir.join("r.raw");
    fs::write(&raw, random(1 << 20, 5)).unwrap();
    let sock = dir.join("s.sock");
    let uri = format!("nbd+unix:///?socket={}", s(&sock));
    let server = serve_with_nofile(256, &raw, &sock, dir);
    let silent = silent_clients(&sock, 400);
    let out = client_bytes(
        "a client among 400 silent ones",
        Command::new("timeout").args(["20", "nbdcopy", &uri, "-"]),
    );
    assert!(out == fs::read(&raw).unwrap(), "wrong bytes");
    drop(silent);
    let err = server.stop();
    // (Under load the threads of closed connections may still hold their descriptors
    // for a moment: a passing "Too many open files" is not the point.)
    assert!(err.contains("still in its handshake"), "{}", tail(&err, 20));
}

/// Options a client could not use are refused at start with a reason: an empty export
/// name but for the first (the empty name is the first export's), a name over the
/// protocol's 4,096 bytes. A handshake timeout past the clock's range is taken as none,
/// and export descriptions name the file, not the server's directories.
#[test]
fn unusable_export_names_are_refused_and_any_timeout_works() {
    let t = plain_dir("interpose-test-blkopts-");
    let dir = t.path();
    let raw = dir.join("r.raw");
    fs::write(&raw, random(1 << 16, 9)).unwrap();
    let sock = dir.join("s.sock");
    for (names, says) in [
        (vec!["a", ""], "empty name"),
        (vec![&*"n".repeat(4097)], "4,096 bytes"),
    ] {
        // (A server that took them would serve until killed.)
        let mut cmd = Command::new("timeout");
        cmd.args(["10", bin(), "blk", "serve"])
            .arg(&raw)
            .arg(&raw)
            .arg("--unix")
            .arg(&sock);
        for n in names {
            cmd.args(["--name", n]);
        }
        let out = output(&mut cmd);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says),
            "{says}: {}",
            describe(&out)
        );
        assert!(!sock.exists());
    }
    let mut cmd = Command::new(bin());
    cmd.args(["blk", "serve", "--handshake-timeout", &u64::MAX.to_string()])
        .arg(&raw)
        .arg("--unix")
        .arg(&sock);
    let server = Server::spawn(cmd, Some(sock.clone()), dir);
    let v = nbdinfo_json(&[&format!("nbd+unix:///?socket={}", s(&sock))]);
    assert_eq!(v["exports"][0]["export-size"], 1 << 16, "{v:#}");
    let desc = v["exports"][0]["description"].as_str().unwrap_or_default();
    assert!(
        desc.starts_with("raw r.raw (") && !desc.contains(s(dir)),
        "description {desc:?}"
    );
    server.stop();
}
