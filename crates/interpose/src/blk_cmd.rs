//! `interpose blk ...`: serving block sources over NBD (wiring around interpose-nbd).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use interpose_image::{BlockSource, Image, RawSource};
use interpose_nbd::server::{systemd_listeners, SocketPath};
use interpose_nbd::{Config, Export, Listener, Server};

#[derive(Subcommand)]
pub enum BlkCommand {
    /// Serve read-only NBD exports until SIGINT/SIGTERM/SIGHUP. Each SOURCE is an interpose
    /// image, or a raw file or block device written `PATH[,mapfile=MAPFILE]` (its
    /// ddrescue mapfile marks bad sectors). Without --unix or --tcp (and no systemd
    /// sockets), listens on 127.0.0.1:10809.
    Serve {
        #[arg(required = true, value_name = "SOURCE")]
        sources: Vec<String>,
        /// Listen on this Unix socket (made; removed at exit).
        #[arg(long, value_name = "PATH")]
        unix: Option<PathBuf>,
        /// Listen on this TCP address.
        #[arg(long, value_name = "ADDR:PORT")]
        tcp: Option<String>,
        /// Export names, in the order of the sources [default: the file names; the first
        /// export is also the default one, asked for by the empty name].
        #[arg(long = "name", value_name = "NAME")]
        names: Vec<String>,
        /// Bound of each image's decompressed-chunk cache, MiB.
        #[arg(long, value_name = "MIB", default_value_t = 256)]
        cache_mib: usize,
        /// Threads answering requests on each connection.
        #[arg(long, value_name = "N", default_value_t = 4)]
        threads: usize,
        /// Seconds a client has for the whole handshake (option haggling).
        #[arg(long, value_name = "SECONDS", default_value_t = 30)]
        handshake_timeout: u64,
        /// Connections served at once; a client beyond them is refused with a message
        /// (0: no limit). Each may hold up to 64 MiB of replies its client has not read.
        #[arg(long, value_name = "N", default_value_t = interpose_nbd::server::DEFAULT_MAX_CONNECTIONS)]
        max_connections: usize,
    },
    /// Make a read-only kernel block device (/dev/loopN over a FUSE file served by
    /// this process) from SOURCE (as for serve), print its path, and serve it until
    /// SIGINT/SIGTERM/SIGHUP or `interpose blk detach`; the device goes away with the process.
    Attach {
        #[arg(value_name = "SOURCE")]
        source: String,
        /// Bound of an image's decompressed-chunk cache, MiB.
        #[arg(long, value_name = "MIB", default_value_t = 256)]
        cache_mib: usize,
    },
    /// Remove a device made by `interpose blk attach` (refused while it is mounted).
    Detach {
        #[arg(value_name = "DEVICE")]
        device: PathBuf,
        /// Seconds to wait for a device another program holds open to be let go; after
        /// that, detach fails and the device goes once that program closes it
        #[arg(long, value_name = "SECONDS", default_value_t = 30)]
        wait: u64,
    },
    /// Internal: the watchdog an attach starts; removes what attach process PID leaves
    /// if it ends without cleaning up (interpose_blkdev::watchdog).
    #[command(hide = true)]
    Watchdog {
        #[arg(value_name = "PID")]
        pid: u32,
    },
}

/// Opens `PATH[,mapfile=MAP]`: an image if it has the image magic, a raw source otherwise.
fn open_source(spec: &str, cache: usize) -> Result<Arc<dyn BlockSource>> {
    let mut parts = spec.split(',');
    let path = PathBuf::from(parts.next().unwrap_or_default());
    let mut mapfile = None;
    for p in parts {
        match p.split_once('=') {
            Some(("mapfile", m)) => mapfile = Some(PathBuf::from(m)),
            _ => bail!("{spec}: unknown option {p:?} (expected mapfile=MAPFILE)"),
        }
    }
    if std::fs::metadata(&path).is_ok_and(|m| m.is_dir()) {
        bail!(
            "{}: a directory, not an image or a raw file",
            path.display()
        );
    }
    let (head, tail) = image_magic(&path);
    if tail && !head {
        // Served as a raw disk, a damaged image would be its compressed bytes, silently.
        bail!(
            "{}: ends with an interpose image trailer but does not start with an image \
             header: a damaged image, not served (`interpose image info` tells more)",
            path.display()
        );
    }
    if head {
        if mapfile.is_some() {
            bail!("{spec}: an image carries its own bad extents; mapfile= is for raw files");
        }
        Ok(Arc::new(
            Image::open_with_cache(&path, cache).with_context(|| path.display().to_string())?,
        ))
    } else {
        Ok(Arc::new(
            RawSource::open(&path, mapfile.as_deref())
                .with_context(|| path.display().to_string())?,
        ))
    }
}

/// Whether `path` starts with the image magic, and whether its trailer (the last 512
/// bytes) does.
fn image_magic(path: &std::path::Path) -> (bool, bool) {
    use std::os::unix::fs::FileExt;
    let Ok(f) = std::fs::File::open(path) else {
        return (false, false);
    };
    let magic_at = |at: u64| {
        let mut m = [0u8; 8];
        f.read_exact_at(&mut m, at).is_ok() && m == interpose_image::format::MAGIC
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let tail = len >= interpose_image::format::HEADER_SIZE as u64
        && magic_at(len - interpose_image::format::HEADER_SIZE as u64);
    (magic_at(0), tail)
}

pub fn run(cmd: BlkCommand) -> Result<()> {
    match cmd {
        BlkCommand::Attach { source, cache_mib } => attach(&source, cache_mib),
        BlkCommand::Watchdog { pid } => {
            // Signals meant for the attach (a service manager's SIGTERM to all its
            // processes, say) must not end its watchdog first: it ends when the attach does.
            for sig in [
                signal_hook::consts::SIGINT,
                signal_hook::consts::SIGTERM,
                signal_hook::consts::SIGHUP,
            ] {
                let ignored = Arc::new(std::sync::atomic::AtomicBool::new(false));
                signal_hook::flag::register(sig, ignored).context("installing signal handlers")?;
            }
            let dir = interpose_blkdev::run_dir(pid);
            if interpose_blkdev::watchdog::watch(&dir, std::io::stdin().lock()) {
                tracing::warn!(
                    "attach process {pid} ended without removing its device; removed what it left"
                );
            }
            Ok(())
        }
        BlkCommand::Detach { device, wait } => {
            let pid = interpose_blkdev::detach(&device, std::time::Duration::from_secs(wait))?;
            eprintln!("detached {} (served by pid {pid})", device.display());
            Ok(())
        }
        BlkCommand::Serve {
            sources,
            unix,
            tcp,
            names,
            cache_mib,
            threads,
            handshake_timeout,
            max_connections,
        } => {
            if names.len() > sources.len() {
                bail!("{} names for {} sources", names.len(), sources.len());
            }
            let mut exports = Vec::new();
            for (i, spec) in sources.iter().enumerate() {
                let source = open_source(spec, cache_mib.saturating_mul(1 << 20))?;
                let name = match names.get(i) {
                    Some(n) => n.clone(),
                    None => PathBuf::from(spec.split(',').next().unwrap_or_default())
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_else(|| format!("export{i}")),
                };
                if exports.iter().any(|e: &Export| e.name == name) {
                    bail!("two exports named {name:?}; give --name for each source");
                }
                exports.push(Export {
                    description: source.describe(),
                    name,
                    source,
                });
            }
            let mut listeners = systemd_listeners().context("systemd sockets")?;
            let mut where_ = Vec::new();
            if !listeners.is_empty() {
                let n = listeners.len();
                where_.push(format!(
                    "{n} systemd socket{}",
                    if n == 1 { "" } else { "s" }
                ));
            }
            let mut _socket_path = None;
            if let Some(path) = &unix {
                if let Ok(md) = std::fs::symlink_metadata(path) {
                    // A stale socket of a dead server is replaced; a live one is not, nor
                    // anything that is not a socket.
                    use std::os::unix::fs::FileTypeExt;
                    if !md.file_type().is_socket() {
                        bail!(
                            "{} exists and is not a socket; give --unix a path that is free",
                            path.display()
                        );
                    }
                    if std::os::unix::net::UnixStream::connect(path).is_ok() {
                        bail!("{} is in use by a running server", path.display());
                    }
                    std::fs::remove_file(path)
                        .with_context(|| format!("removing stale {}", path.display()))?;
                }
                let l = std::os::unix::net::UnixListener::bind(path)
                    .with_context(|| format!("listening on {}", path.display()))?;
                _socket_path = Some(
                    SocketPath::bound(path.clone())
                        .with_context(|| format!("listening on {}", path.display()))?,
                );
                listeners.push(Listener::Unix(l));
                where_.push(format!("unix:{}", path.display()));
            }
            let tcp = match (&tcp, listeners.is_empty()) {
                (Some(t), _) => Some(t.clone()),
                (None, true) => Some("127.0.0.1:10809".to_owned()),
                (None, false) => None,
            };
            if let Some(addr) = &tcp {
                let l = std::net::TcpListener::bind(addr)
                    .with_context(|| format!("listening on {addr}"))?;
                where_.push(format!("tcp:{}", l.local_addr()?));
                listeners.push(Listener::Tcp(l));
            }
            let config = Config {
                threads_per_connection: threads.clamp(1, 64),
                handshake_timeout: std::time::Duration::from_secs(handshake_timeout.max(1)),
                max_connections,
            };
            let server = Server::new(exports, config).context("starting the server")?;
            let mut signals = signal_hook::iterator::Signals::new([
                signal_hook::consts::SIGINT,
                signal_hook::consts::SIGTERM,
                signal_hook::consts::SIGHUP,
            ])
            .context("installing signal handlers")?;
            let s2 = server.clone();
            std::thread::spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    tracing::info!("signal {sig}: shutting down");
                    s2.shutdown();
                }
            });
            // The readiness line: scripts and tests wait for it.
            {
                use std::io::Write;
                let names: Vec<&str> = server.exports().iter().map(|e| e.name.as_str()).collect();
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "serving {} on {}", names.join(", "), where_.join(", "))
                    .and_then(|()| out.flush());
            }
            server.serve(listeners).context("serving")?;
            Ok(())
        }
    }
}

fn attach(spec: &str, cache_mib: usize) -> Result<()> {
    let source = open_source(spec, cache_mib.saturating_mul(1 << 20))?;
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        // A closed terminal: clean up as for SIGTERM (the default kills, leaving the
        // loop device and the FUSE mount behind).
        signal_hook::consts::SIGHUP,
    ])
    .context("installing signal handlers")?;
    let watchdog = start_watchdog();
    let attached =
        interpose_blkdev::Attached::attach(source).with_context(|| format!("attaching {spec}"))?;
    // The readiness line: the device's path.
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", attached.device.display()).and_then(|()| out.flush());
    }
    tracing::info!(
        "{} serves {spec} read-only; Ctrl-C or `interpose blk detach {}` removes it",
        attached.device.display(),
        attached.device.display()
    );
    if let Some(sig) = signals.forever().next() {
        tracing::info!("signal {sig}: detaching {}", attached.device.display());
    }
    // The device goes once nothing holds it (a mount of it, say), and is served until
    // then; a second signal stops serving at once (its reads then fail with EIO; the next
    // attach or a detach removes what is left).
    let device = attached.device.clone();
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            tracing::warn!(
                "signal {sig} again: stopping while {} is still in use",
                device.display()
            );
            std::process::exit(1);
        }
    });
    drop(attached);
    drop(watchdog);
    Ok(())
}

/// Starts this program again as the watchdog of this attach process, which removes the
/// device if this process is killed; without one, a killed attach leaves its device.
fn start_watchdog() -> Option<interpose_blkdev::watchdog::Watchdog> {
    use std::os::unix::process::CommandExt;
    // The binary's own path, so that ps names the watchdog; /proc/self/exe if it is gone.
    let exe = std::env::current_exe()
        .ok()
        .filter(|p| p.exists())
        .unwrap_or_else(|| "/proc/self/exe".into());
    let mut cmd = std::process::Command::new(exe);
    cmd.arg0("interpose")
        .args(["blk", "watchdog", &std::process::id().to_string()]);
    match interpose_blkdev::watchdog::Watchdog::spawn(cmd) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(
                "cannot start a watchdog ({e}): if this process is killed, its device stays \
                 until `interpose blk detach` of it"
            );
            None
        }
    }
}
