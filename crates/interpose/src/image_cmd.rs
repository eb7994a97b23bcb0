//! `interpose image ...`: argument parsing, progress bars and printing around
//! interpose-image.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Subcommand, ValueEnum};
use interpose_image::extract::Fill;
use interpose_image::format::{self, BadExtent, Codec};
use interpose_image::{create, extract, Image};

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Build an image from SOURCE (a file or block device, read once, in order).
    Create {
        source: PathBuf,
        /// The image to write (`-`: standard output, streamed).
        #[arg(short, long, value_name = "OUT")]
        output: PathBuf,
        /// GNU ddrescue mapfile of SOURCE: its bad and untried areas are recorded and
        /// not read.
        #[arg(long, value_name = "MAPFILE")]
        mapfile: Option<PathBuf>,
        /// Chunk size: a power of two from 4K to 1M.
        #[arg(long, value_name = "SIZE", default_value = "64K")]
        chunk_size: String,
        /// Compression of chunks: zstd (smaller images) or lz4 (faster to decode, so
        /// faster to serve; larger images).
        #[arg(long, value_name = "CODEC", default_value = "zstd", value_parser = ["zstd", "lz4"])]
        codec: String,
        /// Compression level [default: 3 for zstd (1..=22, negative: its fast modes);
        /// 1 for lz4 (1: fast, 2..=12: high compression)].
        #[arg(long, value_name = "N", allow_hyphen_values = true)]
        level: Option<i32>,
        /// Compression threads [default: the number of CPUs].
        #[arg(long, value_name = "N")]
        threads: Option<usize>,
        /// What the metadata calls the source [default: SOURCE as given].
        #[arg(long, value_name = "NAME")]
        source_name: Option<String>,
        /// A free-form KEY=VALUE for the metadata (repeatable).
        #[arg(long = "meta", value_name = "KEY=VALUE")]
        meta: Vec<String>,
    },
    /// Sizes, ratio, chunk counts, bad extents and metadata of an image.
    Info {
        image: PathBuf,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check every checksum and the whole-image hash; exit status 0 only if intact.
    Verify { image: PathBuf },
    /// Write the raw image back out; bad ranges are filled as asked and listed on stderr.
    Extract {
        image: PathBuf,
        /// The raw file to write (`-`: standard output).
        #[arg(short, long, value_name = "RAW")]
        output: PathBuf,
        /// What bad ranges read as: zero bytes, or (pattern) the 16-byte marker
        /// "<BAD SECTOR>\xde\xad\xbe\xef" repeated, aligned to image offsets.
        #[arg(long, value_enum, default_value_t = BadFill::Zero)]
        bad_fill: BadFill,
    },
}

// (No doc comments on the values: clap would switch the whole help to its long layout.)
#[derive(Clone, Copy, ValueEnum)]
pub enum BadFill {
    Zero,
    Pattern,
}

/// A byte-count progress bar on a terminal; nothing otherwise.
pub(crate) fn bar(what: &str, total: u64) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let b = indicatif::ProgressBar::new(total);
    b.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what} [{{bar:30}}] {{bytes}}/{{total_bytes}} {{binary_bytes_per_sec}} eta {{eta}}"
        ))
        .expect("valid template"),
    );
    Some(b)
}

pub(crate) fn human(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// "1 chunk", "2 chunks".
fn counted(n: impl Into<u64>, what: &str) -> String {
    let n = n.into();
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

fn open(path: &Path) -> Result<Image> {
    Image::open(path).with_context(|| format!("{}", path.display()))
}

pub fn run(cmd: ImageCommand) -> Result<()> {
    match cmd {
        ImageCommand::Create {
            source,
            output,
            mapfile,
            chunk_size,
            codec,
            level,
            threads,
            source_name,
            meta,
        } => {
            let mut user = BTreeMap::new();
            for kv in &meta {
                let Some((k, v)) = kv.split_once('=') else {
                    bail!("--meta {kv:?}: expected KEY=VALUE");
                };
                if k.is_empty() {
                    bail!("--meta {kv:?}: empty key");
                }
                user.insert(k.to_owned(), v.to_owned());
            }
            let opts = create::Options {
                chunk_shift: create::parse_chunk_size(&chunk_size)?,
                codec: Codec::from_name(&codec).context("--codec: zstd or lz4")?,
                level,
                threads: threads.unwrap_or(create::Options::default().threads),
                source_name,
                mapfile,
                user,
            };
            // Ctrl-C or SIGTERM stops the build; the partial output is removed.
            let cancel = stop_on_signals()?;
            let pb = bar("create", 0);
            let progress = |done: u64, total: u64| {
                if let Some(b) = &pb {
                    b.set_length(total);
                    b.set_position(done);
                }
            };
            let out = if output.as_os_str() == "-" {
                if std::io::stdout().is_terminal() {
                    bail!("not writing an image to a terminal; redirect standard output");
                }
                create::Output::Stream(Box::new(std::io::stdout()))
            } else {
                create::Output::Path(&output)
            };
            let report = create::create(&source, out, &opts, &progress, &cancel)
                .with_context(|| format!("creating an image of {}", source.display()));
            if let Some(b) = pb {
                b.finish_and_clear();
            }
            let report = report?;
            eprintln!(
                "{}: {} -> {} ({:.2}:1); {}: {} zero, {} raw, {} compressed; {} ({} bytes)",
                output.display(),
                human(report.virtual_size),
                human(report.file_len),
                report.virtual_size as f64 / report.file_len.max(1) as f64,
                counted(report.chunks, "chunk"),
                report.zero_chunks,
                report.raw_chunks,
                report.compressed_chunks,
                counted(report.bad_extents as u64, "bad extent"),
                report.bad_bytes
            );
            Ok(())
        }
        ImageCommand::Info { image, json } => info(&image, json),
        ImageCommand::Verify { image } => verify(&image),
        ImageCommand::Extract {
            image,
            output,
            bad_fill,
        } => {
            let img = open(&image)?;
            let fill = match bad_fill {
                BadFill::Zero => Fill::Zero,
                BadFill::Pattern => Fill::Pattern,
            };
            let pb = bar("extract", img.header().virtual_size);
            let mut progress = |done: u64| {
                if let Some(b) = &pb {
                    b.set_position(done);
                }
            };
            // Ctrl-C or SIGTERM stops the extract; a file being written is removed.
            let cancel = stop_on_signals()?;
            let bad = if output.as_os_str() == "-" {
                if std::io::stdout().is_terminal() {
                    bail!("not writing a disk to a terminal; redirect standard output");
                }
                let out = Cancellable(std::io::stdout().lock(), &cancel);
                let mut out = std::io::BufWriter::with_capacity(1 << 20, out);
                extract::extract(&img, &mut out, fill, &mut progress)
                    .map_err(anyhow::Error::from)
                    .and_then(|bad| {
                        out.flush()?;
                        Ok(bad)
                    })
            } else {
                extract_to(&img, &image, &output, fill, &mut progress, &cancel)
            }
            .with_context(|| format!("extracting {}", image.display()))?;
            if let Some(b) = pb {
                b.finish_and_clear();
            }
            for x in &bad {
                eprintln!(
                    "{} {}..{} ({} bytes) filled with {}",
                    x.state.name(),
                    x.offset,
                    x.end(),
                    x.length,
                    match fill {
                        Fill::Zero => "zeros",
                        Fill::Pattern => "the pattern",
                    }
                );
            }
            Ok(())
        }
    }
}

/// A flag SIGINT and SIGTERM set, for the work to stop and clean up; a second signal, when
/// the first has not ended it (a read from a pipe that never ends, say), exits at once
/// (status 128 + the signal), leaving at most a temporary file.
fn stop_on_signals() -> Result<Arc<AtomicBool>> {
    let cancel = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // In this order: the exit looks at the flag before the first signal sets it.
        signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, cancel.clone())
            .and_then(|_| signal_hook::flag::register(sig, cancel.clone()))
            .context("installing signal handlers")?;
    }
    Ok(cancel)
}

/// A writer that fails once `cancel` is set (by a signal), so that a long write ends.
struct Cancellable<'a, W>(W, &'a AtomicBool);

impl<W: Write> Write for Cancellable<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.1.load(std::sync::atomic::Ordering::Relaxed) {
            // Not ErrorKind::Interrupted, which write_all would retry.
            return Err(std::io::Error::other("interrupted by a signal"));
        }
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Writes the disk in `img` (the image at `image`) to `output`. A regular file, new or
/// existing, is written as a temporary file next to it, synced and renamed over it when
/// complete: an extract that fails or is interrupted leaves the old file or none, never
/// part of a disk under the name. A block device is written in place and synced; a FIFO
/// or a character device (/dev/null) in place. A symlink is followed.
fn extract_to(
    img: &Image,
    image: &Path,
    output: &Path,
    fill: Fill,
    progress: &mut dyn FnMut(u64),
    cancel: &AtomicBool,
) -> Result<Vec<BadExtent>> {
    use std::os::unix::fs::FileTypeExt;
    let target = match std::fs::symlink_metadata(output) {
        Ok(m) if m.file_type().is_symlink() => match std::fs::metadata(output) {
            // A pipe or a device behind it (/dev/stdout, `>(cmd)`): written through it.
            Ok(t) if !t.is_file() => output.to_path_buf(),
            // A file: replaced where it is.
            Ok(_) => std::fs::canonicalize(output)
                .with_context(|| format!("following {}", output.display()))?,
            // Dangling: the file it names is made.
            Err(_) => {
                let link = std::fs::read_link(output)
                    .with_context(|| format!("following {}", output.display()))?;
                output.parent().unwrap_or(Path::new("")).join(link)
            }
        },
        _ => output.to_path_buf(),
    };
    let existing = std::fs::metadata(&target).ok();
    if existing.as_ref().is_some_and(|m| m.is_file())
        && rustix::fs::access(&target, rustix::fs::Access::WRITE_OK).is_err()
    {
        bail!("{}: not writable", output.display());
    }
    if create::same_file(&target, image) {
        bail!(
            "{}: is the image; the disk would overwrite it",
            output.display()
        );
    }
    let run = |f: &std::fs::File, progress: &mut dyn FnMut(u64)| -> Result<Vec<BadExtent>> {
        let mut out = std::io::BufWriter::with_capacity(1 << 20, Cancellable(f, cancel));
        let bad = extract::extract(img, &mut out, fill, progress)?;
        out.flush()?;
        Ok(bad)
    };
    match existing {
        Some(m) if !m.is_file() => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&target)
                .with_context(|| format!("opening {}", target.display()))?;
            let bad = run(&f, progress)?;
            // A disk restored to a device is on it only once synced; a pipe or
            // /dev/null has nothing to sync.
            if m.file_type().is_block_device() {
                f.sync_all()
                    .with_context(|| format!("syncing {}", target.display()))?;
            }
            Ok(bad)
        }
        _ => {
            // A new file: zero chunks become holes.
            let temp = create::TempOut::new(&target)?;
            let bad = extract::extract_sparse(img, temp.file(), fill, progress, cancel)?;
            temp.commit()?;
            Ok(bad)
        }
    }
}

fn info(path: &Path, json: bool) -> Result<()> {
    let img = open(path)?;
    let h = img.header();
    let stats = img.chunk_stats()?;
    let meta = img.metadata();
    let file_len = img.file_len();
    let ratio = h.virtual_size as f64 / file_len as f64;
    let uuid = format::hex(&h.uuid);
    let uuid = format!(
        "{}-{}-{}-{}-{}",
        &uuid[0..8],
        &uuid[8..12],
        &uuid[12..16],
        &uuid[16..20],
        &uuid[20..32]
    );
    if json {
        let v = serde_json::json!({
            "image": path,
            "format_version": format!("{}.{}", format::VERSION_MAJOR, h.version_minor),
            "codec": h.codec.name(),
            "chunk_size": h.chunk_size(),
            "virtual_size": h.virtual_size,
            "file_size": file_len,
            "ratio": ratio,
            "uuid": uuid,
            "chunks": stats,
            "bad_bytes": h.bad_bytes,
            "bad_extents": img.extents(),
            "metadata": meta,
        });
        outln!("{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    outln!("image:        {}", path.display())?;
    outln!(
        "format:       interpose image {}.{}, {}, {} chunks",
        format::VERSION_MAJOR,
        h.version_minor,
        h.codec.name(),
        human(h.chunk_size())
    )?;
    outln!(
        "virtual size: {} bytes ({})",
        h.virtual_size,
        human(h.virtual_size)
    )?;
    outln!(
        "file size:    {} bytes ({}), ratio {ratio:.2}:1",
        file_len,
        human(file_len)
    )?;
    outln!(
        "chunks:       {} ({} zero, {} raw, {} compressed); {} with bad bytes, {} wholly bad",
        stats.total,
        stats.zero,
        stats.raw,
        stats.compressed,
        stats.bad,
        stats.all_bad
    )?;
    outln!(
        "bad extents:  {} ({} bytes)",
        img.extents().len(),
        h.bad_bytes
    )?;
    print_extents(img.extents())?;
    outln!("source:       {}", printable(&meta.source))?;
    outln!("created:      {}", printable(&meta.created))?;
    outln!("tool:         {}", printable(&meta.tool))?;
    outln!("blake3:       {}", meta.blake3)?;
    outln!("uuid:         {uuid}")?;
    for (k, v) in &meta.user {
        outln!("meta:         {}={}", printable(k), printable(v))?;
    }
    Ok(())
}

/// Metadata as text for a terminal: control characters escaped (`\u{1b}`, `\r`), so that
/// an image cannot send escape sequences or fake lines of output (FORMAT.md §19).
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// One line per extent.
fn print_extents(extents: &[BadExtent]) -> std::io::Result<()> {
    for x in extents {
        outln!(
            "  {:>14}..{:<14} {:>12} bytes  {}",
            x.offset,
            x.end(),
            x.length,
            x.state.name()
        )?;
    }
    Ok(())
}

fn verify(path: &Path) -> Result<()> {
    let img = open(path)?;
    let pb = bar("verify", img.header().virtual_size);
    let report = img.verify(&mut |done| {
        if let Some(b) = &pb {
            b.set_position(done);
        }
    });
    if let Some(b) = pb {
        b.finish_and_clear();
    }
    let report = report?;
    for d in &report.damaged {
        eprintln!("damaged: {}", chain(d));
    }
    for p in &report.problems {
        eprintln!("problem: {p}");
    }
    if !report.hash_ok {
        eprintln!(
            "hash mismatch: the readable data hashes to {}, the image says {}",
            report.computed_blake3,
            img.metadata().blake3
        );
    }
    if report.intact() {
        outln!(
            "{}: intact (blake3 {})",
            path.display(),
            report.computed_blake3
        )?;
        Ok(())
    } else {
        bail!(
            "{}: NOT intact ({} damaged chunks{})",
            path.display(),
            report.damaged.len(),
            if report.hash_ok {
                ""
            } else {
                ", hash mismatch"
            }
        )
    }
}

/// An error and its sources, as anyhow prints them.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
