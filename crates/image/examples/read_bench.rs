//! Read benchmark of the image library (bench/image.sh runs it).
//!
//! ```text
//! cargo run --release -p interpose-image --example read_bench -- IMAGE \
//!     [--threads 2] [--seconds 5] [--cache-mib auto|N] [--span image|data] [--seed N] MODE
//! ```
//!
//! MODE:
//! - `random4k`: warm cache. First every non-zero chunk of the working set is read once
//!   (a 4 KiB read at its start: a partial read, so the chunk goes into the cache), then
//!   each thread does 4 KiB reads at random 4 KiB-aligned offsets of the working set for
//!   the duration. Rate: reads/s, all threads together.
//! - `seq`: each thread reads its part of the image (1/threads of it, 1 MiB-aligned)
//!   sequentially in 1 MiB reads (whole chunks, decoded straight into the buffer, no cache),
//!   over and over for the duration, after one untimed pass that warms the page cache (the
//!   rate is decompression, not the disk). Rate: GB/s (10^9 bytes) of decompressed output,
//!   all threads together.
//!
//! `--span image` (default): the whole image, zero chunks included (reading those is a
//! memset). `--span data`: only chunks with stored data (`random4k`: offsets in non-zero
//! chunks only; `seq`: the runs of non-zero chunks, split evenly by bytes between the
//! threads, read in up to 1 MiB pieces) — the stricter figure.
//!
//! `--cache-mib auto` (default) sizes the chunk cache to hold every non-zero chunk of the
//! image (plus a margin for uneven shards), up to half of MemAvailable. When the cache is
//! smaller than that (or `--cache-mib N` is), `random4k`'s working set is cut to as many
//! non-zero chunks as fit in 80% of the cache (minus 64 chunks), evenly spread over the image
//! (with `--span image`, plus the same share of the zero chunks); the output says so
//! (`working_set_restricted`, `working_set_bytes`).
//!
//! Output: one JSON line on stdout (mode, threads, ops, bytes, seconds, rate, rate_unit and
//! what was measured); progress notes on stderr. Uses std threads only.

use std::hint::black_box;
use std::path::PathBuf;
use std::process::exit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use interpose_image::format::Kind;
use interpose_image::Image;

const BLOCK: u64 = 4096;
const SEQ_READ: u64 = 1 << 20;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Random4k,
    Seq,
}

#[derive(Clone, Copy, PartialEq)]
enum Span {
    Image,
    Data,
}

struct Args {
    image: PathBuf,
    threads: usize,
    seconds: f64,
    /// None: auto.
    cache_mib: Option<u64>,
    span: Span,
    seed: u64,
    mode: Mode,
}

fn usage(msg: &str) -> ! {
    if !msg.is_empty() {
        eprintln!("read_bench: {msg}");
    }
    eprintln!(
        "usage: read_bench IMAGE [--threads N] [--seconds S] [--cache-mib auto|N] \
         [--span image|data] [--seed N] random4k|seq"
    );
    exit(2)
}

fn parse_args() -> Args {
    let mut image = None;
    let mut mode = None;
    let mut a = Args {
        image: PathBuf::new(),
        threads: 2,
        seconds: 5.0,
        cache_mib: None,
        span: Span::Image,
        seed: 1,
        mode: Mode::Seq,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .unwrap_or_else(|| usage(&format!("{name} needs a value")))
        };
        match arg.as_str() {
            "-h" | "--help" => usage(""),
            "--threads" => {
                a.threads = value("--threads")
                    .parse()
                    .ok()
                    .filter(|&n| (1..=1024).contains(&n))
                    .unwrap_or_else(|| usage("--threads: 1 to 1024"))
            }
            "--seconds" => {
                a.seconds = value("--seconds")
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s > 0.0)
                    .unwrap_or_else(|| usage("--seconds: a positive number"))
            }
            "--cache-mib" => {
                let v = value("--cache-mib");
                a.cache_mib = if v == "auto" {
                    None
                } else {
                    Some(
                        v.parse()
                            .ok()
                            .filter(|&n| n > 0)
                            .unwrap_or_else(|| usage("--cache-mib: auto or a positive number")),
                    )
                }
            }
            "--span" => {
                a.span = match value("--span").as_str() {
                    "image" => Span::Image,
                    "data" => Span::Data,
                    _ => usage("--span: image or data"),
                }
            }
            "--seed" => {
                a.seed = value("--seed")
                    .parse()
                    .unwrap_or_else(|_| usage("--seed: a number"))
            }
            "random4k" if mode.is_none() && image.is_some() => mode = Some(Mode::Random4k),
            "seq" if mode.is_none() && image.is_some() => mode = Some(Mode::Seq),
            s if s.starts_with('-') => usage(&format!("unknown option {s}")),
            s if image.is_none() => image = Some(PathBuf::from(s)),
            s => usage(&format!("unexpected argument {s}")),
        }
    }
    a.image = image.unwrap_or_else(|| usage("no IMAGE"));
    a.mode = mode.unwrap_or_else(|| usage("no MODE (random4k or seq)"));
    a
}

fn fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("read_bench: {msg}");
    exit(1)
}

/// splitmix64: small, fast, good enough to pick offsets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (n > 0), by multiply-high.
    fn below(&mut self, n: u64) -> u64 {
        ((self.next() as u128 * n as u128) >> 64) as u64
    }
}

fn mem_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// What a worker did.
struct Tally {
    ops: u64,
    bytes: u64,
    elapsed: Duration,
}

/// Runs `work(thread)` on `threads` threads started together; stops them after
/// `seconds` (each checks the flag); returns their tallies.
fn run_timed<F>(threads: usize, seconds: f64, work: F) -> Vec<Tally>
where
    F: Fn(usize, &AtomicBool, &Barrier) -> Result<Tally, String> + Sync,
{
    let stop = AtomicBool::new(false);
    let barrier = Barrier::new(threads + 1);
    let results: Vec<Result<Tally, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (work, stop, barrier) = (&work, &stop, &barrier);
                s.spawn(move || {
                    let r = work(t, stop, barrier);
                    if r.is_err() {
                        stop.store(true, Ordering::Relaxed);
                    }
                    r
                })
            })
            .collect();
        barrier.wait();
        let deadline = Instant::now() + Duration::from_secs_f64(seconds);
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            std::thread::sleep((deadline - now).min(Duration::from_millis(50)));
        }
        stop.store(true, Ordering::Relaxed);
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("a thread panicked".into())))
            .collect()
    });
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| fail(e)))
        .collect()
}

/// Runs `work(thread)` on `threads` threads to completion (untimed passes).
fn run_all<F>(threads: usize, work: F)
where
    F: Fn(usize) -> Result<(), String> + Sync,
{
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let work = &work;
                s.spawn(move || work(t))
            })
            .collect();
        for h in handles {
            if let Err(e) = h.join().unwrap_or_else(|_| Err("a thread panicked".into())) {
                fail(e);
            }
        }
    });
}

fn main() {
    let args = parse_args();
    let path = &args.image;

    // The index first (a small cache: nothing is read through it) to size the real cache.
    let probe = Image::open_with_cache(path, 1 << 20)
        .unwrap_or_else(|e| fail(format!("{}: {e}", path.display())));
    let h = probe.header().clone();
    let chunk = h.chunk_size();
    let size = h.virtual_size;
    let chunks = h.chunk_count;
    let mut zero = vec![false; chunks as usize];
    for i in 0..chunks {
        let e = probe
            .entry(i)
            .unwrap_or_else(|e| fail(format!("chunk {i}: {e}")));
        zero[i as usize] = e.kind == Kind::Zero;
    }
    drop(probe);
    let data_chunks = zero.iter().filter(|&&z| !z).count() as u64;

    // random4k keeps its working set to 80% of the cache, minus 64 chunks (see `budget`).
    let auto_cache = ((data_chunks + 64) * 5).div_ceil(4) * chunk;
    let cache_bytes = match args.cache_mib {
        Some(m) => m << 20,
        None => auto_cache.min(mem_available().map_or(u64::MAX, |m| m / 2)),
    }
    .max(chunk);
    let img = Image::open_with_cache(path, cache_bytes as usize)
        .unwrap_or_else(|e| fail(format!("{}: {e}", path.display())));
    let img = &img;
    let chunk_len = |i: u64| h.chunk_len(i) as u64;

    let mut out = serde_json::Map::new();
    let mode_name = match args.mode {
        Mode::Random4k => "random4k",
        Mode::Seq => "seq",
    };
    out.insert("mode".into(), mode_name.into());
    out.insert("threads".into(), args.threads.into());
    out.insert(
        "span".into(),
        match args.span {
            Span::Image => "image",
            Span::Data => "data",
        }
        .into(),
    );

    match args.mode {
        Mode::Random4k => {
            let cache_chunks = cache_bytes / chunk;
            let budget = (cache_chunks * 4 / 5).saturating_sub(64).max(1);
            let restricted = data_chunks > budget;
            // The working set: chunks with at least one whole 4 KiB block. When the cache
            // cannot hold every non-zero chunk, `budget` of them, evenly spread over the image
            // (and, with --span image, the same share of the zero chunks, evenly spread too:
            // the mix stays the image's).
            // the n-th (from 0) of a kind is kept when the running share budget/data_chunks
            // passes an integer there: exactly `budget` of the non-zero chunks
            let pick = |n: u64| {
                !restricted || ((n + 1) * budget) / data_chunks > (n * budget) / data_chunks
            };
            let mut ws: Vec<u64> = Vec::new();
            let (mut n_data, mut n_zero) = (0u64, 0u64);
            for i in 0..chunks {
                let keep = if zero[i as usize] {
                    n_zero += 1;
                    args.span == Span::Image && pick(n_zero - 1)
                } else {
                    n_data += 1;
                    pick(n_data - 1)
                };
                if keep && chunk_len(i) >= BLOCK {
                    ws.push(i);
                }
            }
            if ws.is_empty() {
                fail("no chunk to read (an empty or all-zero image with --span data?)");
            }
            let ws_bytes: u64 = ws.iter().map(|&i| chunk_len(i)).sum();
            let ws_zero: u64 = ws
                .iter()
                .filter(|&&i| zero[i as usize])
                .map(|&i| chunk_len(i))
                .sum();
            let warm: Vec<u64> = ws.iter().copied().filter(|&i| !zero[i as usize]).collect();
            if restricted {
                eprintln!(
                    "read_bench: the cache ({} MiB) holds fewer than the image's {data_chunks} \
                     non-zero chunks: random reads cover {} MiB of chunks spread over the image \
                     ({} of them with data)",
                    cache_bytes >> 20,
                    ws_bytes >> 20,
                    warm.len()
                );
            }
            if chunk <= BLOCK {
                eprintln!(
                    "read_bench: 4 KiB chunks: every 4 KiB read is a whole chunk, decoded \
                     without the cache (the warm-up only warms the page cache)"
                );
            }

            // Warm-up: a partial read of every non-zero chunk puts it in the cache.
            let t0 = Instant::now();
            let per = warm.len().div_ceil(args.threads);
            run_all(args.threads, |t| {
                let mut buf = vec![0u8; BLOCK as usize];
                for &i in warm.iter().skip(t * per).take(per) {
                    img.read_at(&mut buf, i * chunk)
                        .map_err(|e| format!("warm-up read of chunk {i}: {e}"))?;
                }
                Ok(())
            });
            let warmup = t0.elapsed();

            let shift = h.chunk_shift;
            let seed = args.seed;
            let ws = &ws;
            let tallies = run_timed(args.threads, args.seconds, |t, stop, barrier| {
                let mut rng = Rng(seed.wrapping_mul(0x1000_0000_01b3) ^ (t as u64 + 1));
                let mut buf = vec![0u8; BLOCK as usize];
                let mut ops = 0u64;
                barrier.wait();
                let start = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..256 {
                        let c = ws[rng.below(ws.len() as u64) as usize];
                        let blocks = chunk_len(c) / BLOCK;
                        let off = (c << shift) + rng.below(blocks) * BLOCK;
                        img.read_at(&mut buf, off)
                            .map_err(|e| format!("read at {off}: {e}"))?;
                        black_box(&mut buf);
                    }
                    ops += 256;
                }
                Ok(Tally {
                    ops,
                    bytes: ops * BLOCK,
                    elapsed: start.elapsed(),
                })
            });
            let (ops, bytes, secs) = totals(&tallies);
            out.insert("ops".into(), ops.into());
            out.insert("bytes".into(), bytes.into());
            out.insert("seconds".into(), round(secs, 3).into());
            out.insert("rate".into(), round(ops as f64 / secs, 0).into());
            out.insert("rate_unit".into(), "reads/s".into());
            out.insert(
                "warmup_seconds".into(),
                round(warmup.as_secs_f64(), 3).into(),
            );
            out.insert("working_set_bytes".into(), ws_bytes.into());
            out.insert(
                "working_set_zero_fraction".into(),
                round(ws_zero as f64 / ws_bytes as f64, 4).into(),
            );
            out.insert("working_set_restricted".into(), restricted.into());
            out.insert("cached_chunks".into(), (warm.len() as u64).into());
        }
        Mode::Seq => {
            // Each thread's requests: (offset, length), whole chunks, at most 1 MiB.
            let mut reqs: Vec<Vec<(u64, u64)>> = vec![Vec::new(); args.threads];
            let per_read_chunks = (SEQ_READ / chunk).max(1);
            match args.span {
                Span::Image => {
                    let part = size.div_ceil(args.threads as u64).div_ceil(SEQ_READ) * SEQ_READ;
                    for (t, r) in reqs.iter_mut().enumerate() {
                        let (a, b) = (
                            (t as u64 * part).min(size),
                            ((t as u64 + 1) * part).min(size),
                        );
                        let mut at = a;
                        while at < b {
                            let n = SEQ_READ.min(b - at);
                            r.push((at, n));
                            at += n;
                        }
                    }
                }
                Span::Data => {
                    let data: Vec<u64> = (0..chunks).filter(|&i| !zero[i as usize]).collect();
                    let per = data.len().div_ceil(args.threads);
                    for (t, r) in reqs.iter_mut().enumerate() {
                        let mine = data.iter().skip(t * per).take(per);
                        // runs of consecutive chunks, cut at 1 MiB boundaries of the image
                        let mut run: Option<(u64, u64)> = None; // first chunk, count
                        for &i in mine {
                            run = match run {
                                Some((f, n)) if f + n == i && i % per_read_chunks != 0 => {
                                    Some((f, n + 1))
                                }
                                Some((f, n)) => {
                                    r.push((f * chunk, (f + n) * chunk - f * chunk));
                                    Some((i, 1))
                                }
                                None => Some((i, 1)),
                            };
                        }
                        if let Some((f, n)) = run {
                            r.push((f * chunk, ((f + n) * chunk).min(size) - f * chunk));
                        }
                    }
                }
            }
            // (only the last chunk of the image can be short, and it ends the last run)
            if reqs.iter().all(|r| r.is_empty()) {
                fail("nothing to read (an empty or all-zero image with --span data?)");
            }
            let pass_bytes: u64 = reqs.iter().flatten().map(|&(_, n)| n).sum();
            let zero_bytes: u64 = (0..chunks)
                .filter(|&i| zero[i as usize])
                .map(chunk_len)
                .sum();
            let reqs = &reqs;

            // One untimed pass: the image file in the page cache, buffers faulted in.
            let t0 = Instant::now();
            run_all(args.threads, |t| {
                let mut buf = vec![0u8; SEQ_READ as usize];
                for &(off, n) in &reqs[t] {
                    img.read_at(&mut buf[..n as usize], off)
                        .map_err(|e| format!("read at {off}: {e}"))?;
                }
                Ok(())
            });
            let warmup = t0.elapsed();

            let tallies = run_timed(args.threads, args.seconds, |t, stop, barrier| {
                let mut buf = vec![0u8; SEQ_READ as usize];
                let (mut ops, mut bytes) = (0u64, 0u64);
                let mine = &reqs[t];
                barrier.wait();
                let start = Instant::now();
                'outer: while !mine.is_empty() {
                    for &(off, n) in mine {
                        if stop.load(Ordering::Relaxed) {
                            break 'outer;
                        }
                        img.read_at(&mut buf[..n as usize], off)
                            .map_err(|e| format!("read at {off}: {e}"))?;
                        black_box(&mut buf);
                        ops += 1;
                        bytes += n;
                    }
                }
                Ok(Tally {
                    ops,
                    bytes,
                    elapsed: start.elapsed(),
                })
            });
            let (ops, bytes, secs) = totals(&tallies);
            out.insert("ops".into(), ops.into());
            out.insert("bytes".into(), bytes.into());
            out.insert("seconds".into(), round(secs, 3).into());
            out.insert("rate".into(), round(bytes as f64 / secs / 1e9, 3).into());
            out.insert("rate_unit".into(), "GB/s".into());
            out.insert(
                "warmup_seconds".into(),
                round(warmup.as_secs_f64(), 3).into(),
            );
            out.insert("pass_bytes".into(), pass_bytes.into());
            out.insert(
                "image_zero_fraction".into(),
                round(zero_bytes as f64 / size.max(1) as f64, 4).into(),
            );
        }
    }
    out.insert("image".into(), path.display().to_string().into());
    out.insert("virtual_size".into(), size.into());
    out.insert("chunk_size".into(), chunk.into());
    out.insert("data_chunks".into(), data_chunks.into());
    out.insert("chunks".into(), chunks.into());
    out.insert("cache_bytes".into(), cache_bytes.into());
    println!("{}", serde_json::Value::Object(out));
}

/// Total operations and bytes, and the wall time: the longest thread's.
fn totals(t: &[Tally]) -> (u64, u64, f64) {
    let ops = t.iter().map(|x| x.ops).sum();
    let bytes = t.iter().map(|x| x.bytes).sum();
    let secs = t
        .iter()
        .map(|x| x.elapsed.as_secs_f64())
        .fold(0.0, f64::max)
        .max(1e-9);
    (ops, bytes, secs)
}

fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}
