//! The `interpose` command: argument parsing and wiring of the library crates, nothing else.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// `println!` that returns the error instead of panicking: a reader that stopped early
/// (`| head`) ends the command quietly (see `main`).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($arg)*)
    }};
}

mod blk_cmd;
mod image_cmd;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use interpose_fs::filter::Chain;
use interpose_fs::{filters, MountConfig, Options};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

#[derive(Parser)]
#[command(
    name = "interpose",
    version,
    about = "Put a user-mode program between applications and their data"
)]
struct Cli {
    /// Log level (error, warn, info, debug, trace) or a tracing filter; also RUST_LOG.
    #[arg(long, global = true, default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The filter file system (FUSE).
    #[command(subcommand)]
    Fs(FsCommand),
    /// Pending changes of an isolated mount: status, log, commit, discard.
    #[command(subcommand)]
    Isolation(IsolationCommand),
    /// Compressed disk images with bad-block information: create, info, verify, extract.
    #[command(subcommand)]
    Image(image_cmd::ImageCommand),
    /// Read-only block devices from images and raw files: an NBD server, loop devices.
    #[command(subcommand)]
    Blk(blk_cmd::BlkCommand),
}

#[derive(Subcommand)]
enum IsolationCommand {
    /// Last sequence number, pending changes, files and bytes held, store size, committed-up-to.
    Status {
        store: PathBuf,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The pending changes with their sequence numbers (a --write-through store: every
    /// change, all of them applied already).
    Log {
        store: PathBuf,
        /// A JSON array of the changes instead of text lines.
        #[arg(long)]
        json: bool,
        /// Only changes after this sequence number.
        #[arg(long, default_value_t = 0)]
        since: u64,
    },
    /// Apply pending changes up to N (default: all) to the backing directory.
    Commit {
        store: PathBuf,
        /// The last change to apply (default: the last one).
        #[arg(long, value_name = "N")]
        upto: Option<u64>,
    },
    /// Throw pending changes away: all, or those after N. On a journal damaged in the
    /// middle (which every other command refuses, naming the last whole change), N up to
    /// that change cuts the damage off too, keeping a copy of the bytes from the damage on
    /// beside the journal.
    Discard {
        store: PathBuf,
        /// Keep changes up to N, discard those after it (default: discard all).
        #[arg(long, value_name = "N")]
        after: Option<u64>,
    },
}

#[derive(Subcommand)]
enum FsCommand {
    /// Mount a filtered view of BACKING at MOUNTPOINT; runs in the foreground until
    /// unmounted or sent SIGINT, SIGTERM or SIGHUP (then unmounts and exits 0).
    Mount(MountArgs),
    /// Unmount a mount made by `interpose fs mount` (also one whose daemon died).
    Unmount {
        mountpoint: PathBuf,
        /// Detach now even if files on it are still in use (they are cut off when closed).
        #[arg(long)]
        lazy: bool,
    },
}

#[derive(Args)]
struct MountArgs {
    backing: PathBuf,
    mountpoint: PathBuf,
    /// A filter, in order: `audit=FILE` (`-` for stderr; `;io=off` leaves data to the kernel),
    /// `deny=GLOB:OPS:ERRNO[:uid=N][;...]`; any takes `;under=SUBTREE`. Repeatable.
    #[arg(long = "filter", value_name = "SPEC")]
    filters: Vec<String>,
    /// Serve all file data from the daemon instead of the kernel's FUSE passthrough.
    #[arg(long)]
    no_passthrough: bool,
    /// Threads reading requests from the kernel [default: 4; see docs/guide.md].
    #[arg(long)]
    threads: Option<usize>,
    /// Seconds the kernel may cache attributes, names and absent names.
    #[arg(long, default_value_t = 1.0)]
    cache_timeout: f64,
    /// Most descriptors kept open for inodes.
    #[arg(long, default_value_t = 1024)]
    fd_cache: usize,
    /// Only the mounting user may use the mount (default: everyone, with normal permission checks).
    #[arg(long)]
    private: bool,
    /// Serve requests over io_uring where the kernel offers it (Linux 6.14+, with
    /// /sys/module/fuse/parameters/enable_uring set to Y): metadata-heavy work is faster,
    /// fsync-heavy work slower (see docs/guide.md). Default: /dev/fuse.
    #[arg(long)]
    io_uring: bool,
    /// Isolate: keep every change in the store directory STORE (made if missing or empty);
    /// BACKING is left untouched until `interpose isolation commit STORE`.
    #[arg(long, value_name = "STORE")]
    isolate: Option<PathBuf>,
    /// With --isolate: isolate only paths (relative to BACKING) matching GLOB, with their
    /// subtrees; changes elsewhere go to BACKING as without isolation. Repeatable.
    #[arg(long, value_name = "GLOB", requires = "isolate")]
    isolate_path: Vec<String>,
    /// With --isolate: apply every change to BACKING at once as well as recording it in
    /// STORE (an audit trail with sequence numbers; nothing is pending).
    #[arg(long, requires = "isolate", conflicts_with = "isolate_path")]
    write_through: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| format!("{},fuser=error", cli.log));
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| "info".into()),
        )
        .with_writer(|| LogWriter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    // Past RLIMIT_FSIZE a write fails with EFBIG, reported like any error, instead of
    // SIGXFSZ killing the daemon (and the mount with it) or a half-built image.
    if let Err(e) = signal_hook::flag::register(
        signal_hook::consts::SIGXFSZ,
        std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
    ) {
        tracing::debug!("cannot catch SIGXFSZ: {e}");
    }
    // An image or a disk written to a pipe whose reader stopped is cut short: a failure.
    let writes_data = matches!(
        &cli.command,
        Command::Image(
            image_cmd::ImageCommand::Create { .. } | image_cmd::ImageCommand::Extract { .. }
        )
    );
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // A reader that stopped reading a listing (`interpose isolation log STORE | head`)
        // is not a failure of ours.
        Err(err) if !writes_data && err.chain().any(is_broken_pipe) => ExitCode::SUCCESS,
        Err(err) => {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "interpose: {}", report(&err));
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(err: &(dyn std::error::Error + 'static)) -> bool {
    err.downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}

/// Standard error for log lines, dropping a line it cannot write: a daemon whose log reader
/// has gone away (a pipe nobody reads) must go on serving and stop cleanly on a signal.
/// tracing-subscriber would report the failed write with `eprintln!`, which panics the
/// thread that logged.
struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// The error and its causes, each once: the libraries' errors name their cause in their
/// own message already (they are also shown alone, over the control socket), so a cause
/// whose text an earlier message holds is not repeated.
fn report(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Fs(FsCommand::Mount(args)) => fs_mount(args),
        Command::Fs(FsCommand::Unmount { mountpoint, lazy }) => fs_unmount(&mountpoint, lazy),
        Command::Isolation(cmd) => isolation(cmd),
        Command::Image(cmd) => image_cmd::run(cmd),
        Command::Blk(cmd) => blk_cmd::run(cmd),
    }
}

fn fs_mount(args: MountArgs) -> Result<()> {
    check_audit_files(&args.filters, &args.mountpoint)?;
    let chain = std::sync::Arc::new(Chain::new(
        args.filters
            .iter()
            .map(|spec| filters::parse_spec(spec).with_context(|| format!("--filter {spec}")))
            .collect::<Result<_>>()?,
    ));
    for spec in &args.filters {
        for path in filters::spec_paths(spec) {
            check_anchor(&args.backing, &format!("--filter {spec}: {path:?}"), &path)?;
        }
    }
    for glob in &args.isolate_path {
        check_anchor(&args.backing, &format!("--isolate-path {glob:?}"), glob)?;
    }
    let names = chain.names();
    if !(0.0..=86_400.0).contains(&args.cache_timeout) {
        bail!("--cache-timeout must be between 0 and 86400 seconds");
    }
    let ttl = Duration::from_secs_f64(args.cache_timeout);
    let mut options = Options {
        attr_timeout: ttl,
        entry_timeout: ttl,
        negative_timeout: ttl,
        passthrough: !args.no_passthrough,
        fd_cache: args.fd_cache,
        allow_other: !args.private,
        io_uring: args.io_uring,
        ..Options::default()
    };
    if let Some(t) = args.threads {
        options.threads = t.clamp(1, 256);
    }
    check_layout(&args.backing, &args.mountpoint, args.isolate.as_deref())?;
    match mounted_type(&args.mountpoint).as_deref() {
        Some("fuse.interpose") => bail!(
            "{} is an interpose mount already (a second mount would hide it); \
             unmount it first: interpose fs unmount {}",
            args.mountpoint.display(),
            args.mountpoint.display()
        ),
        Some(other) => tracing::warn!(
            "{} is a mount point already ({other}); the new mount hides it until unmounted",
            args.mountpoint.display()
        ),
        None => {}
    }
    raise_fd_limit();
    // Signals first, so a SIGTERM that races the mount still unmounts.
    let mut signals =
        Signals::new([SIGINT, SIGTERM, SIGHUP]).context("installing signal handlers")?;
    let (mounted, _isolated) = match &args.isolate {
        None => (
            interpose_fs::mount(MountConfig {
                backing: args.backing.clone(),
                mountpoint: args.mountpoint.clone(),
                chain: chain.clone(),
                options,
            })?,
            None,
        ),
        Some(store) => {
            let mode = if args.write_through {
                interpose_isolation::view::Mode::WriteThrough
            } else if args.isolate_path.is_empty() {
                interpose_isolation::view::Mode::Isolated
            } else {
                let mut set = globset::GlobSetBuilder::new();
                for g in &args.isolate_path {
                    let g = g.trim_start_matches('/');
                    set.add(
                        globset::GlobBuilder::new(g)
                            .literal_separator(true)
                            .build()
                            .with_context(|| format!("--isolate-path {g}"))?,
                    );
                }
                interpose_isolation::view::Mode::Paths(set.build()?)
            };
            let mut check = JournalCheckShown::new(store);
            let iso = interpose_isolation::mount(
                &args.backing,
                &args.mountpoint,
                store,
                mode,
                interpose_isolation::fs::Options {
                    ttl,
                    passthrough: !args.no_passthrough,
                    chain: chain.clone(),
                },
                options.serving(),
                &mut |c| check.update(c),
            )
            .with_context(|| format!("isolated mount of {}", args.backing.display()))?;
            let interpose_isolation::IsolatedMount { mounted, guard, .. } = iso;
            (mounted, Some(guard))
        }
    };
    let filters = match names.is_empty() {
        true => "no filters".to_owned(),
        false => format!("filters: {}", names.join(", ")),
    };
    let filters = match &args.isolate {
        Some(store) if args.write_through => {
            format!(
                "write-through, changes recorded in {}; {filters}",
                store.display()
            )
        }
        Some(store) => format!("isolated, changes kept in {}; {filters}", store.display()),
        None => filters,
    };
    let transport = if mounted.io_uring {
        "FUSE over io_uring"
    } else {
        if args.io_uring {
            io_uring_hint();
        }
        "FUSE over /dev/fuse"
    };
    // Before the readiness line: whoever unmounts it from then on waits for this process.
    match mount_at(&args.mountpoint) {
        Some(m) if m.fs_type == "fuse.interpose" => interpose_fs::running::hold(&m.dev),
        _ => tracing::debug!("no mount of ours found at {}", args.mountpoint.display()),
    }
    // The readiness line: scripts and tests wait for it. A reader that has gone away is
    // no reason to stop serving (println! would panic and leave the mount dead).
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "mounted {} at {} ({filters}; {transport}); Ctrl-C to unmount",
            args.backing.display(),
            args.mountpoint.display()
        )
        .and_then(|()| out.flush());
    }
    let mut unmounter = mounted.unmounter();
    let handle = signals.handle();
    let mountpoint = args.mountpoint.clone();
    let filters_to_close = chain.clone();
    let waiter = std::thread::spawn(move || {
        let mut signals = signals.forever();
        if let Some(sig) = signals.next() {
            tracing::info!("signal {sig}: unmounting {}", mountpoint.display());
            if let Err(err) = unmounter.unmount() {
                if err.raw_os_error() == Some(libc::EBUSY) {
                    tracing::warn!(
                        "{} is busy; detaching it lazily: it is served until its last user \
                         leaves (a second signal stops serving at once)",
                        mountpoint.display()
                    );
                    let _ =
                        rustix::mount::unmount(&mountpoint, rustix::mount::UnmountFlags::DETACH);
                } else {
                    tracing::error!("unmount failed: {err}");
                }
            }
        }
        // A second signal while the detached mount is still in use: stop now. Programs
        // still in it get ENOTCONN; what they had fsync'ed is kept (as after a crash).
        if let Some(sig) = signals.next() {
            tracing::warn!(
                "signal {sig} again: stopping while {} is still in use",
                mountpoint.display()
            );
            close_filters_for(&filters_to_close, Duration::from_secs(5));
            std::process::exit(1);
        }
    });
    let res = mounted.join();
    handle.close();
    let _ = waiter.join();
    res.context("FUSE session")?;
    tracing::info!("unmounted {}", args.mountpoint.display());
    Ok(())
}

/// Says why a mount asked to use io_uring is not, and how to change that.
fn io_uring_hint() {
    let switch = interpose_fs::IO_URING_SWITCH;
    match std::fs::read_to_string(switch) {
        Ok(v) if v.trim() == "N" => tracing::info!(
            "FUSE over io_uring is off in this kernel ({switch} is N); serving /dev/fuse. \
             As root, `echo Y > {switch}` turns it on for mounts made afterwards"
        ),
        Ok(_) => tracing::warn!("the kernel did not take FUSE over io_uring; serving /dev/fuse"),
        Err(_) => tracing::info!(
            "this kernel has no FUSE over io_uring (Linux 6.14+ with CONFIG_FUSE_IO_URING); serving /dev/fuse"
        ),
    }
}

/// Closes the filters (writes out the audit records queued) before a stop without an
/// unmount, waiting at most `limit`: a log stuck in a write (a pipe nobody reads) must
/// not keep the process from stopping. Records of requests still being served then are
/// lost; their callers get ENOTCONN, as after a crash.
fn close_filters_for(chain: &std::sync::Arc<Chain>, limit: Duration) {
    let (done, closed) = std::sync::mpsc::channel();
    let chain = chain.clone();
    std::thread::spawn(move || {
        chain.close();
        let _ = done.send(());
    });
    if closed.recv_timeout(limit).is_err() {
        tracing::error!(
            "the filters did not close within {} s (an audit log that cannot be written?): \
             records still queued are lost",
            limit.as_secs()
        );
    }
}

/// The file that opening `path` for writing reaches: its directory resolved, and a
/// symlink followed also where the file it names is not made yet (`log -> mnt/a.jsonl`).
/// None where a directory is missing or the links go round.
fn written_at(path: &std::path::Path) -> Option<PathBuf> {
    let mut path = path.to_path_buf();
    for _ in 0..40 {
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
        let dir = std::fs::canonicalize(parent.unwrap_or(std::path::Path::new("."))).ok()?;
        let full = dir.join(path.file_name()?);
        match std::fs::read_link(&full) {
            Ok(target) => path = dir.join(target),
            Err(_) => return Some(full),
        }
    }
    None
}

/// Refuses an audit log inside the mount point: it would be written into the directory
/// the mount hides, where nobody sees it while mounted.
fn check_audit_files(specs: &[String], mountpoint: &std::path::Path) -> Result<()> {
    let Ok(m) = std::fs::canonicalize(mountpoint) else {
        return Ok(());
    };
    for file in specs.iter().filter_map(|s| filters::audit_file(s)) {
        let Some(at) = written_at(&file) else {
            continue; // the audit filter says what is wrong with it
        };
        if at.starts_with(&m) {
            bail!(
                "the audit log {} is inside the mount point {}: it would be written under the \
                 mount, hidden while mounted; put it elsewhere",
                file.display(),
                m.display()
            );
        }
    }
    Ok(())
}

/// Refuses a glob or subtree written as an absolute path inside BACKING (it is matched
/// relative to BACKING, so it would never match: a deny rule without effect), and warns
/// about one whose leading literal components name nothing in BACKING yet.
fn check_anchor(backing: &std::path::Path, what: &str, glob: &str) -> Result<()> {
    // Paths are matched inside BACKING: one that is empty or climbs out matches nothing,
    // and a mount that isolates or filters nothing where asked to must not start.
    if glob.is_empty() || glob.split('/').any(|c| c == "..") {
        bail!("{what} never matches: globs and subtrees are paths inside BACKING, relative to it, without `..`");
    }
    let anchor = filters::glob_anchor(glob);
    if anchor.as_os_str().is_empty() || backing.join(&anchor).symlink_metadata().is_ok() {
        return Ok(());
    }
    let absolute = format!("/{}", glob.trim_start_matches('/'));
    if let Ok(b) = std::fs::canonicalize(backing) {
        let b = b.to_string_lossy();
        if let Some(rel) = absolute.strip_prefix(&format!("{}/", b.trim_end_matches('/'))) {
            bail!(
                "{what} names a path of BACKING by its absolute path, which never matches: \
                 globs and subtrees are relative to BACKING; write {rel:?}"
            );
        }
    }
    tracing::warn!(
        "{what} matches nothing yet: BACKING has no {} (globs and subtrees are relative to BACKING)",
        anchor.display()
    );
    Ok(())
}

/// Refuses layouts in which the daemon would reach its own mount through the paths it
/// serves from: every request thread could end up waiting on the mount it serves (a
/// `find` through a mount point inside BACKING; a commit of a store inside the mount).
/// A path that does not exist is left to the checks that report it.
fn check_layout(
    backing: &std::path::Path,
    mountpoint: &std::path::Path,
    store: Option<&std::path::Path>,
) -> Result<()> {
    let (Ok(b), Ok(m)) = (
        std::fs::canonicalize(backing),
        std::fs::canonicalize(mountpoint),
    ) else {
        return Ok(());
    };
    if m != b && m.starts_with(&b) {
        bail!(
            "the mount point {} is inside BACKING {}: the mount would show inside itself, \
             and a walk through it would wait on itself; mount it elsewhere",
            m.display(),
            b.display()
        );
    }
    if let Some(store) = store {
        // A store not made yet: where it would be made.
        let s = std::fs::canonicalize(store)
            .ok()
            .or_else(|| written_at(store));
        if let Some(s) = s.filter(|s| s.starts_with(&m)) {
            bail!(
                "the store {} is inside the mount point {}: its journal would be written \
                 through the mount it records; put it elsewhere",
                s.display(),
                m.display()
            );
        }
    }
    Ok(())
}

/// A file server holds many descriptors: lift the soft limit to the hard one.
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        if let Err(err) = setrlimit(Resource::Nofile, limit) {
            tracing::debug!("cannot raise RLIMIT_NOFILE: {err}");
        }
    }
}

/// The file system type mounted at `path` (its last mount there), from mountinfo.
fn mounted_type(path: &std::path::Path) -> Option<String> {
    mount_at(path).map(|m| m.fs_type)
}

/// The mount at `path` (the last one made there), if one is.
fn mount_at(path: &std::path::Path) -> Option<interpose_core::mountinfo::Mount> {
    let path = std::fs::canonicalize(path).ok()?;
    let mounts = interpose_core::mountinfo::mounts().ok()?;
    mounts.into_iter().rev().find(|m| m.mount_point == path)
}

fn fs_unmount(mountpoint: &std::path::Path, lazy: bool) -> Result<()> {
    use rustix::mount::{unmount, UnmountFlags};
    // `blk attach` serves its loop device's file from a mount of its own (RUN_DIR/PID):
    // unmounted, the device would read nothing and no longer be known as interpose's.
    let attach_pid = || {
        let p = std::fs::canonicalize(mountpoint).ok()?;
        (p.parent()? == std::path::Path::new(interpose_blkdev::RUN_DIR))
            .then(|| p.file_name()?.to_str()?.parse::<u32>().ok())
            .flatten()
    };
    let entry = mount_at(mountpoint);
    match entry
        .as_ref()
        .map(|m| (m.fs_type.as_str(), m.source.as_encoded_bytes()))
    {
        Some((t, source)) if t == "fuse.interpose" && source == b"interpose-blk" => {
            match (attach_pid(), interpose_blkdev::device_of(mountpoint)) {
                (None, _) => {}
                (Some(_), Some(dev)) => bail!(
                    "{} holds the file of a loop device of `interpose blk attach`; \
                     detach the device instead: interpose blk detach {}",
                    mountpoint.display(),
                    dev.display()
                ),
                (Some(pid), None) => bail!(
                    "{} holds the file of `interpose blk attach` (pid {pid}); \
                     end that process instead: kill {pid}",
                    mountpoint.display()
                ),
            }
        }
        Some(("fuse.interpose", _)) => {}
        Some((t, _)) => bail!(
            "{} is a {t} mount, not interpose's; unmount it with umount",
            mountpoint.display()
        ),
        None => bail!("{} is not a mount point", mountpoint.display()),
    }
    let flags = if lazy {
        UnmountFlags::DETACH
    } else {
        UnmountFlags::empty()
    };
    let unmounted = match unmount(mountpoint, flags) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::PERM) => {
            // Not root: the setuid helper may unmount FUSE mounts of the calling user.
            let mut cmd = std::process::Command::new("fusermount3");
            cmd.arg("-u");
            if lazy {
                cmd.arg("-z");
            }
            let status = cmd
                .arg("--") // a mount point named like an option
                .arg(mountpoint)
                .status()
                .context("running fusermount3")?;
            if !status.success() {
                bail!("fusermount3 -u {} failed", mountpoint.display());
            }
            Ok(())
        }
        Err(rustix::io::Errno::BUSY) => bail!(
            "{} is busy (files open on it); use --lazy to detach anyway",
            mountpoint.display()
        ),
        Err(rustix::io::Errno::INVAL) => bail!("{} is not a mount point", mountpoint.display()),
        Err(e) => Err(std::io::Error::from(e))
            .with_context(|| format!("unmounting {}", mountpoint.display())),
    };
    unmounted?;
    // Done once the daemon is: its audit log written, an isolation store's lock let go,
    // so that a remount or commit right after finds it gone. (Detached, it serves on
    // until the mount's last user leaves.)
    if let (Some(m), false) = (entry, lazy) {
        if let Err(pid) = interpose_fs::running::wait_gone(&m.dev, Duration::from_secs(30)) {
            let who = pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
            eprintln!(
                "interpose: unmounted {}; its daemon{who} is still finishing after 30 s",
                mountpoint.display()
            );
        }
    }
    Ok(())
}

/// Journals at least this large get their check shown: a few seconds' reading.
const LARGE_JOURNAL: u64 = 256 << 20;

/// Shows how far the check of a large store journal has come (every record's data is
/// read): a bar on a terminal, and one log line, so a mount or command that waits on it
/// says why.
struct JournalCheckShown<'a> {
    store: &'a std::path::Path,
    bar: Option<indicatif::ProgressBar>,
    started: Option<std::time::Instant>,
}

impl<'a> JournalCheckShown<'a> {
    fn new(store: &'a std::path::Path) -> Self {
        JournalCheckShown {
            store,
            bar: None,
            started: None,
        }
    }

    fn update(&mut self, c: interpose_isolation::JournalCheck) {
        if c.bytes_total < LARGE_JOURNAL {
            return;
        }
        if self.started.is_none() && c.bytes_done < c.bytes_total {
            self.started = Some(std::time::Instant::now());
            tracing::info!(
                "checking the journal of {}: {}",
                self.store.display(),
                image_cmd::human(c.bytes_total)
            );
            self.bar = image_cmd::bar("journal check", c.bytes_total);
        }
        if let Some(b) = &self.bar {
            b.set_position(c.bytes_done);
        }
        if c.bytes_done >= c.bytes_total {
            if let Some(b) = self.bar.take() {
                b.finish_and_clear();
            }
            if let Some(t) = self.started.take() {
                tracing::info!("journal checked in {:.1} s", t.elapsed().as_secs_f64());
            }
        }
    }
}

fn isolation(cmd: IsolationCommand) -> Result<()> {
    use interpose_isolation::control::{request, Request};
    use interpose_isolation::{CommitProgress, Store};
    let (store_dir, req) = match &cmd {
        IsolationCommand::Status { store, .. } => (
            store,
            Request {
                cmd: "status".into(),
                upto: None,
                after: None,
                since: None,
            },
        ),
        IsolationCommand::Log { store, since, .. } => (
            store,
            Request {
                cmd: "log".into(),
                upto: None,
                after: None,
                since: Some(*since),
            },
        ),
        IsolationCommand::Commit { store, upto } => (
            store,
            Request {
                cmd: "commit".into(),
                upto: *upto,
                after: None,
                since: None,
            },
        ),
        IsolationCommand::Discard { store, after } => (
            store,
            Request {
                cmd: "discard".into(),
                upto: None,
                after: *after,
                since: None,
            },
        ),
    };
    let want_bar = matches!(cmd, IsolationCommand::Commit { .. })
        && std::io::IsTerminal::is_terminal(&std::io::stderr());
    // Made at the commit's first report, so its time and eta leave out opening the store.
    let mut bar: Option<indicatif::ProgressBar> = None;
    let mut progress = |p: CommitProgress| {
        if want_bar && bar.is_none() {
            let b = indicatif::ProgressBar::new(p.changes_total);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "commit [{bar:30}] {pos}/{len} changes, {msg} {elapsed_precise} eta {eta}",
                )
                .expect("valid template"),
            );
            bar = Some(b);
        }
        if let Some(b) = &bar {
            b.set_length(p.changes_total);
            b.set_position(p.changes_done);
            b.set_message(format!(
                "{}/{} MiB",
                p.bytes_done >> 20,
                p.bytes_total >> 20
            ));
        }
    };
    let json = match &cmd {
        IsolationCommand::Status { json, .. } | IsolationCommand::Log { json, .. } => *json,
        _ => false,
    };
    let mut log = LogPrinter::new(json);
    // A mounted store answers through its daemon (a log one entry at a time); otherwise
    // work on the store directly.
    let answer = match request(store_dir, &req, &mut progress, &mut |e| log.entry(e))? {
        Some(v) => v,
        None => {
            let store = Store::open(store_dir)?;
            let mut shown = JournalCheckShown::new(store_dir);
            let mut check = |c| shown.update(c);
            match &cmd {
                IsolationCommand::Status { .. } => {
                    let (j, recs) = store.journal(&mut check)?;
                    let mut tally = interpose_isolation::store::Tally::default();
                    recs.iter().for_each(|r| tally.add(r));
                    serde_json::to_value(store.status(&j, &tally, false)?)?
                }
                IsolationCommand::Log { since, .. } => {
                    let (_, recs) = store.journal(&mut check)?;
                    for r in recs.iter().filter(|r| r.seq > *since) {
                        log.entry(serde_json::to_value(
                            interpose_isolation::store::LogEntryRef::of(r),
                        )?);
                    }
                    serde_json::json!({})
                }
                IsolationCommand::Commit { upto, .. } => {
                    let backing = store.backing()?;
                    let (j, recs) = store.journal(&mut check)?;
                    let done = store.commit(&backing, &j, &recs, *upto, &mut progress);
                    // With the replaced journal closed: its room is back.
                    drop(j);
                    store.keep_reserve();
                    let (j, rest) = done?;
                    serde_json::json!({"committed_upto": j.base_seq(), "pending_changes": rest.len()})
                }
                IsolationCommand::Discard { after, .. } => {
                    // A journal damaged in the middle opens up to the damage, which the
                    // discard then cuts off, after keeping a copy: the way out the
                    // refusal of every other command names.
                    let (mut j, recs, damage) = store.journal_up_to_damage(&mut check)?;
                    let done = store.discard_damaged(&mut j, &recs, *after, damage);
                    drop(j);
                    store.keep_reserve();
                    let (kept, copy) = done?;
                    if let Some(c) = &copy {
                        tracing::warn!(
                            "cut off the journal from offset {} on (a damaged or torn record and the records after it); those bytes are kept in {}",
                            c.at,
                            c.copy.display()
                        );
                    }
                    serde_json::json!({
                        "pending_changes": kept.len(),
                        "damaged_at": copy.as_ref().map(|c| c.at),
                        "damaged_copy": copy.as_ref().map(|c| c.copy.display().to_string()),
                    })
                }
            }
        }
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if matches!(cmd, IsolationCommand::Log { .. }) {
        return log.finish();
    }
    if json {
        outln!("{}", serde_json::to_string_pretty(&answer)?)?;
        return Ok(());
    }
    match cmd {
        IsolationCommand::Status { .. } => {
            let s: interpose_isolation::Status = serde_json::from_value(answer)?;
            outln!("store:            {}", s.store.display())?;
            outln!("backing:          {}", s.backing.display())?;
            outln!("mounted:          {}", if s.mounted { "yes" } else { "no" })?;
            outln!("last change:      {}", s.last_seq)?;
            outln!("committed up to:  {}", s.committed_upto)?;
            outln!("pending changes:  {}", s.pending_changes)?;
            outln!("files changed:    {}", s.files)?;
            outln!("data held:        {} bytes", s.data_bytes)?;
            let ahead = match s.journal_ahead_bytes {
                0 => String::new(),
                n => format!(" ({n} of them zeros written ahead of the journal)"),
            };
            outln!("store on disk:    {} bytes{ahead}", s.store_bytes)?;
            if let Some(n) = s.view_nodes {
                outln!("in memory:        {n} files and directories (the mount's view)")?;
            }
            for name in &s.kept_cuts {
                outln!(
                    "kept aside:       {name} (journal bytes cut off after a power cut or by a discard of damage; read, then delete)"
                )?;
            }
            match (s.interrupted_commit, s.interrupted_commit_applied) {
                (Some(t), Some(a)) if s.interrupted_commit_stopped => outln!(
                    "interrupted commit up to {t}: it stopped on an error at change {} (changes \
                     up to {a} are in BACKING); run `interpose isolation commit` again, or \
                     discard --after {a} or later",
                    a + 1
                )?,
                (Some(t), applied) => {
                    let applied = applied
                        .map(|a| format!(", changes up to {a} in BACKING already"))
                        .unwrap_or_default();
                    outln!(
                        "interrupted commit up to {t}{applied}: run `interpose isolation commit` again"
                    )?
                }
                _ => {}
            }
        }
        IsolationCommand::Log { .. } => unreachable!("printed above"),
        IsolationCommand::Commit { .. } => outln!(
            "committed up to change {}; {}",
            answer["committed_upto"],
            pending(&answer["pending_changes"])
        )?,
        IsolationCommand::Discard { .. } => {
            outln!("discarded; {}", pending(&answer["pending_changes"]))?
        }
    }
    Ok(())
}

/// "N changes pending", "1 change pending".
fn pending(count: &serde_json::Value) -> String {
    let s = if count.as_u64() == Some(1) { "" } else { "s" };
    format!("{count} change{s} pending")
}

/// Prints `isolation log` entries as they come: text lines, or (`--json`) one JSON array.
struct LogPrinter {
    json: bool,
    count: u64,
    out: std::io::BufWriter<std::io::Stdout>,
    failed: Option<anyhow::Error>,
}

impl LogPrinter {
    fn new(json: bool) -> LogPrinter {
        LogPrinter {
            json,
            count: 0,
            out: std::io::BufWriter::new(std::io::stdout()),
            failed: None,
        }
    }

    fn entry(&mut self, v: serde_json::Value) {
        if self.failed.is_none() {
            if let Err(e) = self.write(v) {
                self.failed = Some(e);
            }
        }
    }

    fn write(&mut self, v: serde_json::Value) -> Result<()> {
        use std::io::Write;
        self.count += 1;
        if self.json {
            let sep = if self.count == 1 { "[\n" } else { ",\n" };
            let text = serde_json::to_string_pretty(&v)?;
            let indented: Vec<String> = text.lines().map(|l| format!("  {l}")).collect();
            write!(self.out, "{sep}{}", indented.join("\n"))?;
            return Ok(());
        }
        let e: interpose_isolation::LogEntry = serde_json::from_value(v)?;
        let (a, b) = e.change.paths();
        let show = |p: Option<&interpose_isolation::change::RawPath>| {
            p.map(|p| format!("/{}", p.escaped()))
                .unwrap_or_else(|| "(unlinked)".into())
        };
        let mut line = format!("{:>8}  {:<11} {}", e.seq, e.change.name(), show(a));
        if b.is_some() {
            line += &format!(" -> {}", show(b));
        }
        use interpose_isolation::change::Change;
        match &e.change {
            Change::Data { size, .. } => {
                line += &format!("  (size {size}, {} bytes of blocks)", e.data_bytes)
            }
            Change::Rename { flags, .. } if flags & libc::RENAME_EXCHANGE != 0 => {
                line += "  (exchange)"
            }
            Change::Rename { flags, .. } if flags & libc::RENAME_NOREPLACE != 0 => {
                line += "  (no replace)"
            }
            _ => {}
        }
        writeln!(self.out, "{line}")?;
        Ok(())
    }

    fn finish(mut self) -> Result<()> {
        use std::io::Write;
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        if self.json {
            writeln!(self.out, "{}", if self.count == 0 { "[]" } else { "\n]" })?;
        }
        self.out.flush()?;
        Ok(())
    }
}
