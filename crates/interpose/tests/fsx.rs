//! A random-operation integrity test in the manner of fsx, the classic file system exerciser.
//!
//! Hundreds of thousands of mixed operations hit ONE file through the mount: pwrite (also
//! beyond EOF, leaving holes), pread (also through a fresh descriptor), ftruncate up and
//! down, fallocate in five modes, mmap reads and writes (`MAP_SHARED`, then `msync`),
//! `copy_file_range` from a second file, `SEEK_DATA`/`SEEK_HOLE`, fsync, fstat/stat and
//! close/reopen (sometimes with `O_TRUNC`). Every result is checked against an in-memory
//! model of both files (content and size); now and then, and at the end, the whole file is
//! compared with the model, through the mount and in the backing directory.
//!
//! The seed is printed at the start; a failure prints the seed, the op number, the last
//! ops, a diagnosis of the first bad byte and the command that replays the run.
//!
//! - `INTERPOSE_FSX_SEED=N` (decimal or `0x` hex) replays a run (default: a random seed);
//! - `INTERPOSE_FSX_OPS=N` sets the number of ops of every test here.

mod common;
use common::*;

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// The main file never grows beyond this.
const MAX_SIZE: u64 = 4 << 20;
/// The copy source never grows beyond this.
const SRC_MAX: u64 = 1 << 20;
/// Size of the pool of random bytes that writes take their data from.
const POOL: usize = 8 << 20;
/// Ops shown in a failure report.
const HISTORY: usize = 20;
/// Ranges remembered for diagnosing a bad byte.
const TOUCHES: usize = 4096;
const MAIN: &str = "fsx.main";
const SRC: &str = "fsx.src";

/// The model against a plain directory: a failure here is a bug in this test, not in
/// the file system.
#[test]
fn fsx_plain_dir_self_check() {
    let tmp = tempfile::tempdir_in(test_root()).unwrap();
    fsx_dir("fsx_plain_dir_self_check", tmp.path(), None, 20_000);
}

/// Default mount: the kernel's FUSE passthrough moves the data, the daemon never sees it.
#[test]
fn fsx_default_mount_passthrough() {
    let m = Mount::new(&[]);
    fsx_dir(
        "fsx_default_mount_passthrough",
        &m.mnt,
        Some(&m.backing),
        200_000,
    );
    let log = m.stop();
    if log.contains("no FUSE passthrough") {
        eprintln!("note: this kernel has no FUSE passthrough; the daemon served the data");
    }
}

/// The daemon serves every read and write (through the kernel's page cache).
#[test]
fn fsx_no_passthrough() {
    let m = Mount::new(&["--no-passthrough"]);
    fsx_dir("fsx_no_passthrough", &m.mnt, Some(&m.backing), 100_000);
    m.stop();
}

/// An isolated mount: every write, truncate and fallocate lands in the store's block maps
/// and the journal, BACKING stays untouched, and a commit then brings BACKING the file the
/// mount showed.
#[test]
fn fsx_isolated_mount_then_commit() {
    let tmp = tempfile::tempdir_in(test_root()).unwrap();
    let (backing, mnt, store) = (
        tmp.path().join("backing"),
        tmp.path().join("mnt"),
        tmp.path().join("store"),
    );
    std::fs::create_dir(&backing).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    let m = Mount::start(&backing, &mnt, &["--isolate", store.to_str().unwrap()]);
    fsx_dir("fsx_isolated_mount_then_commit", &mnt, None, 60_000);
    assert!(
        !backing.join(MAIN).exists(),
        "the isolated mount wrote {MAIN} into BACKING before any commit"
    );
    let shown = std::fs::read(mnt.join(MAIN)).unwrap();
    m.stop();
    run(Command::new(bin())
        .args(["isolation", "commit"])
        .arg(&store));
    let committed = std::fs::read(backing.join(MAIN)).unwrap();
    assert_eq!(committed.len(), shown.len(), "size after the commit");
    if let Some(at) = committed.iter().zip(&shown).position(|(a, b)| a != b) {
        panic!(
            "after the commit, BACKING's {MAIN} differs from what the mount showed at byte {at:#x}"
        );
    }
}

/// An audit filter that wants the data: the daemon serves it and logs each read and write.
#[test]
fn fsx_audit_io_filter() {
    let logs = tempfile::tempdir_in(test_root()).unwrap();
    let log = logs.path().join("audit.jsonl");
    let spec = format!("audit={};io=on", log.display());
    let m = Mount::new(&["--filter", &spec]);
    let stats = fsx_dir("fsx_audit_io_filter", &m.mnt, Some(&m.backing), 100_000);
    m.stop();
    // Every pwrite reached the daemon as at least one write, and each was logged.
    let text = std::fs::read_to_string(&log).unwrap();
    let mut writes = 0u64;
    for line in text.lines() {
        if line.contains(r#""op":"write""#) {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {line}"));
            if v["op"] == "write" && v["result"] == "ok" {
                writes += 1;
            }
        }
    }
    assert!(
        writes >= stats.pwrites,
        "audit log has {writes} successful writes, the test made {} pwrites",
        stats.pwrites
    );
}

/// Op counts and times of a finished run.
#[derive(Default, Debug)]
struct Stats {
    counts: [u64; KINDS.len()],
    time: [Duration; KINDS.len()],
    pwrites: u64,
    /// Fallocate modes (of [`FALLOC_MODES`]) that the file system underneath lacks.
    falloc_unsupported: [bool; FALLOC_MODES.len()],
}

/// Runs the exerciser on `dir/fsx.main` (with `dir/fsx.src` as the copy source). When
/// `backing` is given, the file is also compared there, bypassing the mount.
fn fsx_dir(name: &str, dir: &Path, backing: Option<&Path>, default_ops: u64) -> Stats {
    let seed = match std::env::var("INTERPOSE_FSX_SEED") {
        Ok(s) => parse_u64(&s).unwrap_or_else(|| panic!("bad INTERPOSE_FSX_SEED {s:?}")),
        Err(_) => rand::random(),
    };
    let ops = match std::env::var("INTERPOSE_FSX_OPS") {
        Ok(s) => parse_u64(&s).unwrap_or_else(|| panic!("bad INTERPOSE_FSX_OPS {s:?}")),
        Err(_) => default_ops,
    };
    eprintln!(
        "fsx {name}: seed {seed} ({ops} ops on {}); replay with INTERPOSE_FSX_SEED={seed}",
        dir.display()
    );
    let start = Instant::now();
    let mut fsx = Fsx::new(name, seed, dir, backing);
    for _ in 0..ops {
        fsx.op += 1;
        if let Err(msg) = fsx.step() {
            panic!("{}", fsx.report(&msg));
        }
    }
    // Whole-file checks at the end, again after a reopen.
    fsx.op += 1;
    let res = fsx
        .full_check("final check")
        .and_then(|()| fsx.reopen(false))
        .and_then(|()| fsx.full_check("final check after reopen"))
        .and_then(|()| fsx.check_src());
    if let Err(msg) = res {
        panic!("{}", fsx.report(&msg));
    }
    let elapsed = start.elapsed();
    let mut summary = String::new();
    for (i, kind) in KINDS.iter().enumerate() {
        let _ = write!(
            summary,
            " {}={} ({:.1}s)",
            kind.name(),
            fsx.stats.counts[i],
            fsx.stats.time[i].as_secs_f64()
        );
    }
    eprintln!(
        "fsx {name}: {ops} ops in {:.1}s ({:.0} ops/s), final size {:#x}:{summary}",
        elapsed.as_secs_f64(),
        ops as f64 / elapsed.as_secs_f64(),
        fsx.model.len()
    );
    std::mem::take(&mut fsx.stats)
}

fn parse_u64(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// splitmix64: a well-mixed 64-bit hash.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    MapRead,
    MapWrite,
    Truncate,
    Fallocate,
    Copy,
    SrcWrite,
    SrcTruncate,
    Stat,
    Seek,
    Fsync,
    Reopen,
    FullCheck,
}

const KINDS: [Kind; 14] = [
    Kind::Read,
    Kind::Write,
    Kind::MapRead,
    Kind::MapWrite,
    Kind::Truncate,
    Kind::Fallocate,
    Kind::Copy,
    Kind::SrcWrite,
    Kind::SrcTruncate,
    Kind::Stat,
    Kind::Seek,
    Kind::Fsync,
    Kind::Reopen,
    Kind::FullCheck,
];

impl Kind {
    /// How often the op is picked, relative to the others.
    fn weight(self) -> u32 {
        match self {
            Kind::Read => 200,
            Kind::Write => 200,
            Kind::MapRead => 50,
            Kind::MapWrite => 50,
            Kind::Truncate => 10,
            Kind::Fallocate => 100,
            Kind::Copy => 60,
            Kind::SrcWrite => 25,
            Kind::SrcTruncate => 5,
            Kind::Stat => 40,
            Kind::Seek => 20,
            Kind::Fsync => 2,
            Kind::Reopen => 8,
            Kind::FullCheck => 1,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Read => "read",
            Kind::Write => "write",
            Kind::MapRead => "mapread",
            Kind::MapWrite => "mapwrite",
            Kind::Truncate => "truncate",
            Kind::Fallocate => "fallocate",
            Kind::Copy => "copy",
            Kind::SrcWrite => "srcwrite",
            Kind::SrcTruncate => "srctruncate",
            Kind::Stat => "stat",
            Kind::Seek => "seek",
            Kind::Fsync => "fsync",
            Kind::Reopen => "reopen",
            Kind::FullCheck => "fullcheck",
        }
    }
}

/// The fallocate modes used. The model: mode 0 zero-extends the file to off+len;
/// `KEEP_SIZE` changes nothing visible; `PUNCH_HOLE` zeroes the range within the size;
/// `ZERO_RANGE` zeroes the range and, without `KEEP_SIZE`, extends the file to off+len.
const FALLOC_MODES: [(i32, &str); 5] = [
    (0, "0"),
    (libc::FALLOC_FL_KEEP_SIZE, "KEEP_SIZE"),
    (
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        "PUNCH_HOLE|KEEP_SIZE",
    ),
    (libc::FALLOC_FL_ZERO_RANGE, "ZERO_RANGE"),
    (
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        "ZERO_RANGE|KEEP_SIZE",
    ),
];

/// A range of the main file that an op set, remembered to explain a bad byte.
struct Touch {
    op: u64,
    what: &'static str,
    off: u64,
    len: u64,
    /// For data from [`Fsx::pattern`] (pwrite, mmap write): the salt that placed it.
    salt: Option<u64>,
}

type Res = Result<(), String>;

fn errno(what: &str, err: io::Error) -> String {
    format!("{what} failed: {err}")
}

fn open_rw(path: &Path, trunc: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(trunc)
        .open(path)
}

/// preads until `buf` is full or EOF; returns the bytes read.
fn read_full(f: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Sets `model[off..off + data.len()]`, zero-extending the model first if needed.
fn model_write(model: &mut Vec<u8>, zeros: &[u8], off: u64, data: &[u8]) {
    let (off, end) = (off as usize, off as usize + data.len());
    if end > model.len() {
        model.extend_from_slice(&zeros[..end - model.len()]);
    }
    model[off..end].copy_from_slice(data);
}

/// Truncates or zero-extends `model` to `size`.
fn model_resize(model: &mut Vec<u8>, zeros: &[u8], size: u64) {
    let size = size as usize;
    if size > model.len() {
        model.extend_from_slice(&zeros[..size - model.len()]);
    } else {
        model.truncate(size);
    }
}

/// Zeroes `model[off..off + len]` within its current size.
fn model_zero(model: &mut [u8], zeros: &[u8], off: u64, len: u64) {
    let size = model.len() as u64;
    if off < size {
        let end = (off + len).min(size) as usize;
        let off = off as usize;
        model[off..end].copy_from_slice(&zeros[..end - off]);
    }
}

/// A `MAP_SHARED` mapping of `len` bytes of a file from a page-aligned offset.
struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    fn new(f: &File, off: u64, len: usize, write: bool) -> io::Result<Mapping> {
        let prot = if write {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a new mapping placed by the kernel (addr NULL) of a descriptor we own;
        // it aliases no Rust object and is unmapped exactly once, in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                off as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { ptr, len })
    }

    /// The mapped bytes. Callers map only ranges below EOF, so no access raises SIGBUS.
    fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` is a live mapping of `len` readable bytes; only this
        // single-threaded test changes the file meanwhile, and never while this borrow
        // lives (writes through the mapping need `&mut self`).
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`; the mapping is writable (made with `write`), and
        // `&mut self` makes this the only reference into it.
        unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut u8, self.len) }
    }

    fn sync(&self, flags: i32) -> io::Result<()> {
        // SAFETY: msync on exactly our live mapping; it only schedules or does writeback.
        let r = unsafe { libc::msync(self.ptr, self.len, flags) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps our own mapping, once; no slice into it outlives `self`.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

struct Fsx {
    name: String,
    seed: u64,
    rng: StdRng,
    dir: PathBuf,
    backing: Option<PathBuf>,
    main: File,
    src: File,
    /// Expected content (and so size) of the main file.
    model: Vec<u8>,
    /// Expected content of the copy source.
    src_model: Vec<u8>,
    /// mmap stores not yet written back for sure (no `MS_SYNC`, fsync or close since).
    /// The file system may not know about them yet: SEEK_DATA and the backing file may
    /// lag, so those checks sync first.
    dirty: bool,
    /// Random bytes; each write takes its data from a place in here fixed by its salt.
    pool: Vec<u8>,
    zeros: Vec<u8>,
    buf: Vec<u8>,
    page: u64,
    op: u64,
    history: VecDeque<String>,
    touches: VecDeque<Touch>,
    stats: Stats,
    total_weight: u32,
}

impl Fsx {
    fn new(name: &str, seed: u64, dir: &Path, backing: Option<&Path>) -> Fsx {
        let main = open_rw(&dir.join(MAIN), true).expect("create the main file");
        let src = open_rw(&dir.join(SRC), true).expect("create the copy source");
        let mut pool = vec![0; POOL];
        StdRng::seed_from_u64(mix(seed)).fill_bytes(&mut pool);
        // SAFETY: sysconf has no memory effects.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
        Fsx {
            name: name.to_owned(),
            seed,
            rng: StdRng::seed_from_u64(seed),
            dir: dir.to_owned(),
            backing: backing.map(Path::to_owned),
            main,
            src,
            model: Vec::new(),
            src_model: Vec::new(),
            dirty: false,
            pool,
            zeros: vec![0; MAX_SIZE as usize],
            buf: vec![0; MAX_SIZE as usize + (2 << 20)],
            page,
            op: 0,
            history: VecDeque::new(),
            touches: VecDeque::new(),
            stats: Stats::default(),
            total_weight: KINDS.iter().map(|k| k.weight()).sum(),
        }
    }

    fn size(&self) -> u64 {
        self.model.len() as u64
    }

    /// Where in the pool the `len` bytes an op writes come from: fixed by (seed, salt), so
    /// that data found in the wrong place can be traced to the op that wrote it.
    fn pattern(&self, salt: u64, len: u64) -> Range<usize> {
        let start = (mix(self.seed ^ mix(salt)) % (POOL as u64 - len + 1)) as usize;
        start..start + len as usize
    }

    fn log(&mut self, what: String) {
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(format!("#{} {what}", self.op));
    }

    fn touch(&mut self, what: &'static str, off: u64, len: u64, salt: Option<u64>) {
        if len == 0 {
            return;
        }
        if self.touches.len() == TOUCHES {
            self.touches.pop_front();
        }
        self.touches.push_back(Touch {
            op: self.op,
            what,
            off,
            len,
            salt,
        });
    }

    /// An op length in 1..=max: mostly small to medium, sometimes large.
    fn pick_len(&mut self, max: u64) -> u64 {
        let len = match self.rng.gen_range(0..100) {
            0..=29 => self.rng.gen_range(1..=64),
            30..=90 => self.rng.gen_range(1..=64 << 10),
            91..=98 => self.rng.gen_range(1..=256 << 10),
            _ => self.rng.gen_range(1..=3 << 19),
        };
        len.clamp(1, max.max(1))
    }

    /// Sometimes rounds (off, len) out to page or sector boundaries.
    fn align(&mut self, off: u64, len: u64) -> (u64, u64) {
        let a = match self.rng.gen_range(0..10) {
            0..=1 => self.page,
            2 => 512,
            _ => return (off, len),
        };
        (off / a * a, len.div_ceil(a) * a)
    }

    /// An offset for an op of `len` bytes on a file of `size` bytes: mostly inside the
    /// file, sometimes up to `beyond` past its end; never with off + len > `max`.
    fn pick_off(&mut self, size: u64, len: u64, beyond: u64, max: u64) -> u64 {
        let off = if beyond == 0 || self.rng.gen_ratio(4, 5) {
            self.rng.gen_range(0..=size)
        } else {
            size + self.rng.gen_range(0..=beyond)
        };
        off.min(max.saturating_sub(len))
    }

    /// A range inside the file (for a mapping): (off, len) with len >= 1, off + len <= size.
    fn pick_inside(&mut self) -> (u64, u64) {
        let size = self.size();
        let len = self.pick_len(size);
        let off = self.rng.gen_range(0..=size - len);
        if self.rng.gen_ratio(1, 5) {
            let aoff = off / self.page * self.page;
            let alen = len.div_ceil(self.page) * self.page;
            if aoff + alen <= size {
                return (aoff, alen);
            }
        }
        (off, len)
    }

    fn step(&mut self) -> Res {
        let mut w = self.rng.gen_range(0..self.total_weight);
        let mut kind = 0;
        for (i, k) in KINDS.iter().enumerate() {
            if w < k.weight() {
                kind = i;
                break;
            }
            w -= k.weight();
        }
        let start = Instant::now();
        let res = self.run_op(KINDS[kind]);
        self.stats.counts[kind] += 1;
        self.stats.time[kind] += start.elapsed();
        res
    }

    fn run_op(&mut self, kind: Kind) -> Res {
        match kind {
            Kind::Read => self.op_read(),
            Kind::Write => self.op_write(),
            Kind::MapRead => self.op_mapread(),
            Kind::MapWrite => self.op_mapwrite(),
            Kind::Truncate => self.op_truncate(),
            Kind::Fallocate => self.op_fallocate(),
            Kind::Copy => self.op_copy(),
            Kind::SrcWrite => self.op_src_write(),
            Kind::SrcTruncate => self.op_src_truncate(),
            Kind::Stat => self.op_stat(),
            Kind::Seek => self.op_seek(),
            Kind::Fsync => self.op_fsync(),
            Kind::Reopen => {
                let trunc = self.rng.gen_ratio(1, 10);
                self.reopen(trunc)
            }
            Kind::FullCheck => self.full_check("full check"),
        }
    }

    /// preads `[off, off + len)` of the main file (or of `other`, another descriptor of
    /// it) and compares it with the model: bytes and count.
    fn check_range(&mut self, what: &str, other: Option<&File>, off: u64, len: u64) -> Res {
        let size = self.size();
        let file = other.unwrap_or(&self.main);
        let n = read_full(file, &mut self.buf[..len as usize], off)
            .map_err(|e| errno(&format!("{what}: pread {off:#x}+{len:#x}"), e))?;
        let want = off.min(size) as usize..(off + len).min(size) as usize;
        if n != want.len() {
            return Err(format!(
                "{what}: pread {off:#x}+{len:#x} returned {n:#x} bytes, expected {:#x} \
                 (model size {size:#x})",
                want.len()
            ));
        }
        if self.buf[..n] != self.model[want.clone()] {
            let got = self.buf[..n].to_vec();
            return Err(self.mismatch(what, want.start as u64, &got));
        }
        Ok(())
    }

    fn op_read(&mut self) -> Res {
        let size = self.size();
        let len = self.pick_len(MAX_SIZE);
        let off = self.pick_off(size, len, 64 << 10, MAX_SIZE + (64 << 10));
        let (off, len) = self.align(off, len);
        // Sometimes through a second descriptor, opened for this read only.
        let fresh = self.rng.gen_ratio(1, 10);
        self.log(format!(
            "read {off:#x}+{len:#x} (size {size:#x}){}",
            if fresh { " through a fresh open" } else { "" }
        ));
        if fresh {
            let f = File::open(self.dir.join(MAIN)).map_err(|e| errno("read: open", e))?;
            self.check_range("read (fresh open)", Some(&f), off, len)
        } else {
            self.check_range("read", None, off, len)
        }
    }

    fn op_write(&mut self) -> Res {
        let size = self.size();
        let len = self.pick_len(MAX_SIZE);
        let off = self.pick_off(size, len, 512 << 10, MAX_SIZE);
        let (off, len) = self.align(off, len);
        let off = off.min(MAX_SIZE - len);
        let data = self.pattern(self.op, len);
        let new = size.max(off + len);
        self.log(format!(
            "write {off:#x}+{len:#x} (size {size:#x} -> {new:#x})"
        ));
        self.main
            .write_all_at(&self.pool[data.clone()], off)
            .map_err(|e| errno("pwrite", e))?;
        self.stats.pwrites += 1;
        model_write(&mut self.model, &self.zeros, off, &self.pool[data]);
        self.touch("write", off, len, Some(self.op));
        Ok(())
    }

    /// fstat must agree with the model (also checked before each mapping relies on it).
    fn check_fstat(&self, what: &str) -> Res {
        let st = self
            .main
            .metadata()
            .map_err(|e| errno(&format!("{what}: fstat"), e))?;
        if st.len() != self.size() {
            return Err(format!(
                "{what}: fstat size {:#x}, model size {:#x}",
                st.len(),
                self.size()
            ));
        }
        Ok(())
    }

    fn op_mapread(&mut self) -> Res {
        let size = self.size();
        if size == 0 {
            self.log("mapread skipped (empty file)".into());
            return Ok(());
        }
        let (off, len) = self.pick_inside();
        self.log(format!("mapread {off:#x}+{len:#x} (size {size:#x})"));
        self.check_fstat("mapread")?;
        let moff = off / self.page * self.page;
        let map = Mapping::new(&self.main, moff, (off + len - moff) as usize, false)
            .map_err(|e| errno("mapread: mmap", e))?;
        let got = &map.bytes()[(off - moff) as usize..];
        if got != &self.model[off as usize..(off + len) as usize] {
            let got = got.to_vec();
            drop(map);
            return Err(self.mismatch("mapread", off, &got));
        }
        Ok(())
    }

    fn op_mapwrite(&mut self) -> Res {
        let mut size = self.size();
        // Like fsx, sometimes extend the file first (ftruncate) to map past the old EOF.
        if size < MAX_SIZE && self.rng.gen_ratio(1, 4) {
            let new = size + self.pick_len(MAX_SIZE - size);
            self.log(format!("mapwrite: ftruncate {size:#x} -> {new:#x} first"));
            self.main
                .set_len(new)
                .map_err(|e| errno("mapwrite: ftruncate", e))?;
            model_resize(&mut self.model, &self.zeros, new);
            self.touch("mapwrite-extend", size, new - size, None);
            size = new;
        }
        if size == 0 {
            self.log("mapwrite skipped (empty file)".into());
            return Ok(());
        }
        let (off, len) = self.pick_inside();
        let data = self.pattern(self.op, len);
        // msync(MS_SYNC) writes the pages back now; MS_ASYNC (a no-op on Linux) leaves
        // them dirty for later writeback, close or fsync.
        let (flags, flags_name) = if self.rng.gen_ratio(1, 4) {
            (libc::MS_SYNC, "MS_SYNC")
        } else {
            (libc::MS_ASYNC, "MS_ASYNC")
        };
        let check_before_sync = self.rng.gen_ratio(1, 2);
        self.log(format!(
            "mapwrite {off:#x}+{len:#x} (size {size:#x}), msync {flags_name}{}",
            if check_before_sync {
                ", pread before msync too"
            } else {
                ""
            }
        ));
        self.check_fstat("mapwrite")?;
        let moff = off / self.page * self.page;
        let mut map = Mapping::new(&self.main, moff, (off + len - moff) as usize, true)
            .map_err(|e| errno("mapwrite: mmap", e))?;
        map.bytes_mut()[(off - moff) as usize..].copy_from_slice(&self.pool[data.clone()]);
        model_write(&mut self.model, &self.zeros, off, &self.pool[data]);
        self.touch("mapwrite", off, len, Some(self.op));
        self.dirty = true;
        if check_before_sync {
            // One page cache: pread sees the stores even before msync.
            self.check_range("mapwrite: pread before msync", None, off, len)?;
        }
        map.sync(flags)
            .map_err(|e| errno(&format!("mapwrite: msync {flags_name}"), e))?;
        if flags == libc::MS_SYNC {
            self.dirty = false;
        }
        self.check_range("mapwrite: pread after msync", None, off, len)?;
        drop(map);
        Ok(())
    }

    fn op_truncate(&mut self) -> Res {
        let size = self.size();
        let new = match self.rng.gen_range(0..10) {
            0..=3 => self.rng.gen_range(0..=size),
            4..=7 => self.rng.gen_range(size..=(size + (1 << 20)).min(MAX_SIZE)),
            8 => self.rng.gen_range(0..=MAX_SIZE / self.page) * self.page,
            _ => 0,
        };
        self.log(format!("truncate {size:#x} -> {new:#x}"));
        self.main.set_len(new).map_err(|e| errno("ftruncate", e))?;
        model_resize(&mut self.model, &self.zeros, new);
        if new > size {
            self.touch("truncate-extend", size, new - size, None);
        }
        Ok(())
    }

    fn op_fallocate(&mut self) -> Res {
        let size = self.size();
        let which = self.rng.gen_range(0..FALLOC_MODES.len());
        let (mode, mode_name) = FALLOC_MODES[which];
        let len = self.pick_len(MAX_SIZE);
        let off = self.pick_off(size, len, 256 << 10, MAX_SIZE);
        let (off, len) = self.align(off, len);
        let off = off.min(MAX_SIZE - len);
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let new = if keep { size } else { size.max(off + len) };
        self.log(format!(
            "fallocate {mode_name} {off:#x}+{len:#x} (size {size:#x} -> {new:#x})"
        ));
        // SAFETY: fallocate(2) on a descriptor we own; no memory is passed.
        let r = unsafe {
            libc::fallocate(
                self.main.as_raw_fd(),
                mode,
                off as libc::off_t,
                len as libc::off_t,
            )
        };
        if r != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
                // Fine where the underlying file system lacks the mode (tmpfs has no
                // ZERO_RANGE); the file must be unchanged.
                return self.falloc_unsupported(which);
            }
            return Err(errno(
                &format!("fallocate {mode_name} {off:#x}+{len:#x}"),
                err,
            ));
        }
        if self.stats.falloc_unsupported[which] {
            return Err(format!(
                "fallocate {mode_name} worked, but gave EOPNOTSUPP before"
            ));
        }
        if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
            model_zero(&mut self.model, &self.zeros, off, len);
            let zeroed = len.min(size.saturating_sub(off));
            self.touch("fallocate-zero", off, zeroed, None);
        }
        if new > size {
            model_resize(&mut self.model, &self.zeros, new);
            self.touch("fallocate-extend", size, new - size, None);
        }
        Ok(())
    }

    /// A fallocate mode gave EOPNOTSUPP: accepted only if the file system underneath (the
    /// backing directory) refuses the mode too.
    fn falloc_unsupported(&mut self, which: usize) -> Res {
        let (mode, mode_name) = FALLOC_MODES[which];
        if self.stats.falloc_unsupported[which] {
            return Ok(());
        }
        let probe = self
            .backing
            .as_deref()
            .unwrap_or(&self.dir)
            .join("fsx.falloc-probe");
        let f = open_rw(&probe, true).map_err(|e| errno("fallocate probe: create", e))?;
        f.write_all_at(&[1; 8192], 0)
            .map_err(|e| errno("fallocate probe: write", e))?;
        // SAFETY: fallocate(2) on a descriptor we own; no memory is passed.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, 0, 4096) };
        let err = io::Error::last_os_error();
        drop(f);
        std::fs::remove_file(&probe).map_err(|e| errno("fallocate probe: remove", e))?;
        if r == 0 || err.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(format!(
                "fallocate {mode_name} gave EOPNOTSUPP, but works on the file system \
                 underneath ({})",
                if r == 0 {
                    "ok".to_owned()
                } else {
                    err.to_string()
                }
            ));
        }
        eprintln!(
            "fsx {}: fallocate {mode_name} is not supported here; expecting EOPNOTSUPP for it",
            self.name
        );
        self.stats.falloc_unsupported[which] = true;
        Ok(())
    }

    fn op_copy(&mut self) -> Res {
        let size = self.size();
        let src_size = self.src_model.len() as u64;
        let len = self.pick_len(MAX_SIZE);
        // Mostly from inside the source; sometimes from its end or past it (short copy).
        let off_in = if self.rng.gen_ratio(9, 10) {
            self.rng.gen_range(0..=src_size)
        } else {
            src_size + self.rng.gen_range(0..=4096)
        };
        let off_out = self.pick_off(size, len, 512 << 10, MAX_SIZE);
        let (off_out, len) = self.align(off_out, len);
        let off_out = off_out.min(MAX_SIZE - len);
        let expect = len.min(src_size.saturating_sub(off_in));
        self.log(format!(
            "copy_file_range src {off_in:#x} -> {off_out:#x} len {len:#x} \
             (src size {src_size:#x}, size {size:#x}, {expect:#x} to copy)"
        ));
        let (mut oi, mut oo) = (off_in as libc::loff_t, off_out as libc::loff_t);
        let mut done = 0u64;
        while done < len {
            // SAFETY: both descriptors are ours; the offsets are live locals that the
            // kernel updates; no buffer is passed.
            let r = unsafe {
                libc::copy_file_range(
                    self.src.as_raw_fd(),
                    &mut oi,
                    self.main.as_raw_fd(),
                    &mut oo,
                    (len - done) as usize,
                    0,
                )
            };
            if r < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(errno(
                    &format!("copy_file_range (after {done:#x} bytes)"),
                    err,
                ));
            }
            if r == 0 {
                break;
            }
            done += r as u64;
            if oi as u64 != off_in + done || oo as u64 != off_out + done {
                return Err(format!(
                    "copy_file_range returned {r:#x} (total {done:#x}) but moved the offsets \
                     to in {oi:#x}, out {oo:#x}"
                ));
            }
        }
        if done != expect {
            return Err(format!(
                "copy_file_range copied {done:#x} bytes, expected {expect:#x}"
            ));
        }
        if done > 0 {
            let from = off_in as usize..(off_in + done) as usize;
            model_write(&mut self.model, &self.zeros, off_out, &self.src_model[from]);
            self.touch("copy", off_out, done, None);
        }
        Ok(())
    }

    fn op_src_write(&mut self) -> Res {
        let size = self.src_model.len() as u64;
        let len = self.pick_len(256 << 10);
        let off = self.pick_off(size, len, 64 << 10, SRC_MAX);
        let data = self.pattern(self.op | 1 << 63, len);
        self.log(format!("src write {off:#x}+{len:#x} (src size {size:#x})"));
        self.src
            .write_all_at(&self.pool[data.clone()], off)
            .map_err(|e| errno("src pwrite", e))?;
        model_write(&mut self.src_model, &self.zeros, off, &self.pool[data]);
        Ok(())
    }

    fn op_src_truncate(&mut self) -> Res {
        let size = self.src_model.len() as u64;
        let new = self.rng.gen_range(0..=SRC_MAX);
        self.log(format!("src truncate {size:#x} -> {new:#x}"));
        self.src
            .set_len(new)
            .map_err(|e| errno("src ftruncate", e))?;
        model_resize(&mut self.src_model, &self.zeros, new);
        if self.rng.gen_ratio(1, 4) {
            self.check_src()?;
        }
        Ok(())
    }

    /// Reads the whole copy source and compares it with its model.
    fn check_src(&mut self) -> Res {
        let size = self.src_model.len();
        let n = read_full(&self.src, &mut self.buf[..size + 4096], 0)
            .map_err(|e| errno("source check: pread", e))?;
        if n != size {
            return Err(format!(
                "source check: read {n:#x} bytes, source model size {size:#x}"
            ));
        }
        if self.buf[..size] != self.src_model[..] {
            let i = (0..size)
                .find(|&i| self.buf[i] != self.src_model[i])
                .unwrap_or(0);
            return Err(format!(
                "source check: first bad byte at {i:#x}: got {:#04x}, expected {:#04x}",
                self.buf[i], self.src_model[i]
            ));
        }
        Ok(())
    }

    fn op_stat(&mut self) -> Res {
        let by_path = self.rng.gen_ratio(1, 3);
        self.log(format!(
            "{} (size {:#x})",
            if by_path { "stat" } else { "fstat" },
            self.size()
        ));
        if !by_path {
            return self.check_fstat("fstat");
        }
        let st = std::fs::metadata(self.dir.join(MAIN)).map_err(|e| errno("stat", e))?;
        if st.len() != self.size() {
            return Err(format!(
                "stat size {:#x}, model size {:#x}",
                st.len(),
                self.size()
            ));
        }
        Ok(())
    }

    /// Writes back pending mmap stores before a check that looks past the page cache.
    fn settle(&mut self, what: &str) -> Res {
        if self.dirty {
            self.main
                .sync_data()
                .map_err(|e| errno(&format!("{what}: fdatasync first"), e))?;
            self.dirty = false;
        }
        Ok(())
    }

    /// `SEEK_DATA`/`SEEK_HOLE` from a random offset. Where the holes are is up to the file
    /// system, but the answer must be in bounds, and a range SEEK_DATA skips must be zeros.
    fn op_seek(&mut self) -> Res {
        let size = self.size();
        let off = self.rng.gen_range(0..=size + 4096);
        let data = self.rng.gen_bool(0.5);
        let (whence, name) = if data {
            (libc::SEEK_DATA, "SEEK_DATA")
        } else {
            (libc::SEEK_HOLE, "SEEK_HOLE")
        };
        // A FUSE file system learns of mmap stores only at writeback: with stores pending,
        // either write them back first or check only the bounds of the answer.
        let sync = self.dirty && self.rng.gen_ratio(1, 3);
        let strict = !self.dirty || sync;
        self.log(format!(
            "lseek {name} {off:#x} (size {size:#x}){}",
            match (sync, strict) {
                (true, _) => ", fdatasync first",
                (false, false) => ", mmap stores pending: bounds only",
                _ => "",
            }
        ));
        if sync {
            self.settle(name)?;
        }
        // SAFETY: lseek(2) on our descriptor; only pread/pwrite are used here, and they
        // ignore the file position.
        let r = unsafe { libc::lseek(self.main.as_raw_fd(), off as libc::off_t, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENXIO) {
                return Err(errno(&format!("lseek {name} {off:#x}"), e));
            }
            if off >= size {
                return Ok(());
            }
            if !data {
                return Err(format!("SEEK_HOLE {off:#x} gave ENXIO inside the file"));
            }
            // No data at or after `off`: the rest must be zeros.
            return if strict {
                self.check_zeros(name, off, size)
            } else {
                Ok(())
            };
        }
        let r = r as u64;
        if off >= size {
            return Err(format!(
                "lseek {name} {off:#x} at or after EOF {size:#x} returned {r:#x}, not ENXIO"
            ));
        }
        if r < off || r > size || (data && r == size) {
            return Err(format!(
                "lseek {name} {off:#x} returned {r:#x}, out of bounds (size {size:#x})"
            ));
        }
        if data && strict {
            self.check_zeros(name, off, r)
        } else {
            Ok(())
        }
    }

    /// The model must hold only zeros in `[from, to)` (a range the file system calls a hole).
    fn check_zeros(&self, what: &str, from: u64, to: u64) -> Res {
        let range = &self.model[from as usize..to as usize];
        if range == &self.zeros[..range.len()] {
            return Ok(());
        }
        let i = range.iter().position(|&b| b != 0).unwrap_or(0);
        Err(format!(
            "{what} {from:#x} skipped to {to:#x}, but the model has data ({:#04x}) at {:#x}",
            range[i],
            from + i as u64
        ))
    }

    fn op_fsync(&mut self) -> Res {
        let data_only = self.rng.gen_bool(0.5);
        self.log(if data_only { "fdatasync" } else { "fsync" }.into());
        if data_only {
            self.main.sync_data().map_err(|e| errno("fdatasync", e))?;
        } else {
            self.main.sync_all().map_err(|e| errno("fsync", e))?;
        }
        self.dirty = false;
        Ok(())
    }

    /// Closes and reopens the main file (`O_TRUNC` when `trunc`), sometimes the source too.
    fn reopen(&mut self, trunc: bool) -> Res {
        let src_too = self.rng.gen_ratio(1, 4);
        self.log(format!(
            "close, reopen{}{} (size {:#x})",
            if trunc { " O_TRUNC" } else { "" },
            if src_too { "; the source too" } else { "" },
            self.size()
        ));
        // Close before opening, so that the new open is the only one.
        let path = self.dir.join(MAIN);
        drop(std::mem::replace(
            &mut self.main,
            File::open("/dev/null").unwrap(),
        ));
        // Closing wrote back pending mmap stores (FUSE flushes them on close).
        self.dirty = false;
        self.main = open_rw(&path, trunc).map_err(|e| errno("reopen", e))?;
        if trunc {
            let size = self.size();
            self.model.clear();
            self.touch("O_TRUNC", 0, size, None);
        }
        if src_too {
            drop(std::mem::replace(
                &mut self.src,
                File::open("/dev/null").unwrap(),
            ));
            self.src = open_rw(&self.dir.join(SRC), false).map_err(|e| errno("reopen src", e))?;
        }
        self.check_fstat("reopen")
    }

    /// Compares the whole main file with the model, through the mount and in the backing
    /// directory.
    fn full_check(&mut self, what: &str) -> Res {
        let size = self.size();
        self.log(format!("{what}: whole file (size {size:#x})"));
        self.check_fstat(what)?;
        self.check_range(what, None, 0, size + 4096)?;
        let Some(backing) = self.backing.clone() else {
            return Ok(());
        };
        self.settle(what)?;
        let got = std::fs::read(backing.join(MAIN))
            .map_err(|e| errno(&format!("{what}: read the backing file"), e))?;
        if got.len() != self.model.len() {
            return Err(format!(
                "{what}: the backing file has {:#x} bytes, the model {size:#x}",
                got.len()
            ));
        }
        if got != self.model {
            return Err(self.mismatch(&format!("{what} (backing file)"), 0, &got));
        }
        Ok(())
    }

    /// Describes how `got` (read at `off`) differs from the model.
    fn mismatch(&self, what: &str, off: u64, got: &[u8]) -> String {
        let want = &self.model[off as usize..off as usize + got.len()];
        let first = (0..got.len()).find(|&i| got[i] != want[i]).unwrap_or(0);
        let last = (first..got.len())
            .rev()
            .find(|&i| got[i] != want[i])
            .unwrap_or(first);
        let bad = (first..=last).filter(|&i| got[i] != want[i]).count();
        let pos = off + first as u64;
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let show = first..(first + 16).min(got.len());
        let mut msg = format!(
            "{what}: data mismatch: {bad:#x} bad bytes from file offset {pos:#x} to {:#x} \
             (page {:#x} + {:#x})\n  got      {}\n  expected {}\n",
            off + last as u64,
            pos / self.page,
            pos % self.page,
            hex(&got[show.clone()]),
            hex(&want[show.clone()]),
        );
        if got[show.clone()].iter().all(|&b| b == 0) {
            msg.push_str("  the bad bytes read as zeros (a hole, or lost data)\n");
        }
        // Which op set the expected byte, and whose data was read instead.
        let mut expected_from = None;
        let mut found_from = None;
        for t in self.touches.iter().rev() {
            if pos < t.off || pos >= t.off + t.len {
                continue;
            }
            expected_from = expected_from.or(Some(t));
            if let (None, Some(salt)) = (found_from, t.salt) {
                let data = &self.pool[self.pattern(salt, t.len)];
                let at = (pos - t.off) as usize;
                let k = show.len().min(data.len() - at);
                if data[at..at + k] == got[first..first + k] {
                    found_from = Some(t);
                }
            }
        }
        match expected_from {
            Some(t) => {
                let _ = writeln!(
                    msg,
                    "  the expected byte was set by op #{} ({} {:#x}+{:#x})",
                    t.op, t.what, t.off, t.len
                );
            }
            None => msg.push_str("  no remembered op set this byte\n"),
        }
        if let Some(t) = found_from {
            let _ = writeln!(
                msg,
                "  the bytes read are the data of op #{} ({} {:#x}+{:#x})",
                t.op, t.what, t.off, t.len
            );
        }
        msg
    }

    fn report(&self, msg: &str) -> String {
        let mut r = format!(
            "fsx {} FAILED at op {} (seed {}): {msg}\nlast ops:\n",
            self.name, self.op, self.seed
        );
        for h in &self.history {
            let _ = writeln!(r, "  {h}");
        }
        let _ = write!(
            r,
            "replay: INTERPOSE_FSX_SEED={} INTERPOSE_FSX_OPS={} \
             cargo nextest run -p interpose --test fsx {}",
            self.seed, self.op, self.name
        );
        r
    }
}
