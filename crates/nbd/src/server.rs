//! The server: listeners, the option haggling of one connection (an explicit state
//! machine over [`Phase`]), and the transmission phase, where a few threads per
//! connection take turns reading requests and answer them out of order.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use interpose_image::{BlockSource, ExtentState};
use parking_lot::{Condvar, Mutex};

use crate::proto::{self, *};

/// One export: a name clients ask for and the source behind it.
pub struct Export {
    pub name: String,
    pub description: String,
    pub source: Arc<dyn BlockSource>,
}

/// Tunables.
#[derive(Clone, Debug)]
pub struct Config {
    /// Threads answering requests on each connection.
    pub threads_per_connection: usize,
    /// How long a client may take over the handshake.
    pub handshake_timeout: Duration,
    /// Connections served at once (0: no limit). Each may hold up to 64 MiB of large
    /// replies its client has not read yet, plus up to 1 MiB per thread, so this bounds
    /// the server's memory; a client beyond it is refused in the handshake, with a
    /// message saying why.
    pub max_connections: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            threads_per_connection: 4,
            handshake_timeout: Duration::from_secs(30),
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// The default of [`Config::max_connections`]: more than the clients that open several
/// connections to one export use (nbdcopy: 4), few enough that their replies' memory
/// stays near a gigabyte.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16;

/// A socket the server accepts connections on.
pub enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    fn accept(&self) -> io::Result<Conn> {
        match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| Conn::Unix(Arc::new(s))),
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Conn::Tcp(Arc::new(s))
            }),
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Unix(l) => l.as_fd(),
            Listener::Tcp(l) => l.as_fd(),
        }
    }
}

/// A client connection, either kind. Copies share one descriptor (a socket is read and
/// written from different threads through `&`): a connection costs the server one
/// descriptor, and making a copy cannot fail. With a `dup` per copy, a server out of
/// descriptors accepted each waiting client only to close it, at once, for want of the
/// copy, instead of leaving the backlog to wait.
#[derive(Clone)]
pub enum Conn {
    Unix(Arc<UnixStream>),
    Tcp(Arc<TcpStream>),
}

impl Conn {
    fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Conn::Unix(s) => s.shutdown(how),
            Conn::Tcp(s) => s.shutdown(how),
        };
    }

    fn set_read_timeout(&self, t: Option<Duration>) {
        let _ = match self {
            Conn::Unix(s) => s.set_read_timeout(t),
            Conn::Tcp(s) => s.set_read_timeout(t),
        };
    }

    fn set_write_timeout(&self, t: Option<Duration>) {
        let _ = match self {
            Conn::Unix(s) => s.set_write_timeout(t),
            Conn::Tcp(s) => s.set_write_timeout(t),
        };
    }

    fn peer(&self) -> String {
        match self {
            Conn::Unix(s) => match crate::sys::peer_pid(s.as_raw_fd()) {
                Some(pid) => format!("unix pid {pid}"),
                None => "unix".into(),
            },
            Conn::Tcp(s) => s
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp".into()),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => (&**s).read(buf),
            Conn::Tcp(s) => (&**s).read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => (&**s).write(buf),
            Conn::Tcp(s) => (&**s).write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The server: its exports and counters.
pub struct Server {
    exports: Vec<Export>,
    config: Config,
    stop: AtomicBool,
    wake: (UnixStream, UnixStream),
    next_conn: AtomicU64,
    /// Signalled when a connection ends (for the drain at shutdown).
    ended: Condvar,
    /// Connections past their handshake: what [`Config::max_connections`] bounds.
    serving: Arc<AtomicUsize>,
    /// Connections still in their handshake, oldest first (see [`MAX_HANDSHAKING`]).
    handshaking: Mutex<std::collections::VecDeque<u64>>,
}

/// Connections in their handshake at once. Each costs a thread and a descriptor until
/// it ends or its handshake times out, and clients that connect and say nothing would
/// otherwise hold the server's descriptors until no one else can connect. Past this, the
/// oldest is closed for the newest: a real client is through in milliseconds, so a flood
/// of silent connections keeps out only clients slower than the flood.
const MAX_HANDSHAKING: usize = 128;

/// A connection's place among those served ([`Config::max_connections`]); given back
/// when the connection ends, however it ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How long a stopping server lets its connections answer what they have read.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(10);

/// The options this server implements: those `Server::option` answers other than with
/// NBD_REP_ERR_UNSUP (which STARTTLS gets).
const IMPLEMENTED_OPTIONS: [u32; 8] = [
    OPT_EXPORT_NAME,
    OPT_ABORT,
    OPT_LIST,
    OPT_INFO,
    OPT_GO,
    OPT_STRUCTURED_REPLY,
    OPT_LIST_META_CONTEXT,
    OPT_SET_META_CONTEXT,
];

/// A connection in the handshake: every read and write must end by one deadline for the
/// whole handshake (a read timeout alone would let a client that sends a byte now and
/// then, or never reads the replies to its options, hold the connection for ever).
struct Timed<'a> {
    conn: &'a mut Conn,
    deadline: Instant,
}

impl<'a> Timed<'a> {
    fn new(conn: &'a mut Conn, deadline: Instant) -> Timed<'a> {
        Timed { conn, deadline }
    }

    /// The time left, or the error that says it is up.
    fn left(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(too_long());
        }
        Ok(left)
    }
}

fn too_long() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "the handshake took too long (--handshake-timeout)",
    )
}

/// The socket's timeout says EAGAIN: say what ran out instead.
fn timed_out(e: io::Error) -> io::Error {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => too_long(),
        _ => e,
    }
}

impl Read for Timed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.conn.set_read_timeout(Some(left));
        self.conn.read(buf).map_err(timed_out)
    }
}

impl Write for Timed<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.conn.set_write_timeout(Some(left));
        self.conn.write(buf).map_err(timed_out)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.conn.flush()
    }
}

/// Why a connection ended early: logged, never fatal to the server.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("refused: {0}")]
    Refused(String),
}

/// The reader sends the replies it made itself once this much has gathered (or when no
/// request is waiting).
const BATCH_FLUSH_BYTES: usize = 256 << 10;

/// Empties a reply buffer for the next reply; a large one is let go, so that one big reply
/// does not pin its memory for the connection's lifetime.
fn reuse(buf: &mut Vec<u8>) {
    buf.clear();
    if buf.capacity() > 1 << 20 {
        *buf = Vec::new();
    }
}

/// Replies up to this size are built without asking [`ReplyBudget`].
const SMALL_REPLY: usize = 1 << 20;

/// Bytes of large replies (reads up to the 32 MiB maximum) one connection may hold at
/// once. Without a bound a client that sends large reads and does not read the replies
/// held a full buffer on the reader and on every worker: 5 × 32 MiB per connection.
const CONN_REPLY_BUDGET: usize = 2 * MAX_REQUEST_LEN as usize;

/// A connection's allowance for large replies: a thread takes a share before it builds
/// one and gives it back once the reply is sent; others wait meanwhile. Only the
/// connection's own threads wait on it, so a client that does not read stalls itself.
struct ReplyBudget {
    left: Mutex<usize>,
    freed: Condvar,
    /// Whether any large reply was made (its memory is then given back at the end).
    used: AtomicBool,
}

impl ReplyBudget {
    fn new() -> ReplyBudget {
        ReplyBudget {
            left: Mutex::new(CONN_REPLY_BUDGET),
            freed: Condvar::new(),
            used: AtomicBool::new(false),
        }
    }

    /// Takes what a reply to `req` needs (nothing for small ones); returns the share.
    fn take(&self, req: &Request) -> usize {
        let n = match req.kind {
            CMD_READ | CMD_CACHE => req.length as usize,
            _ => 0,
        };
        if n <= SMALL_REPLY {
            return 0;
        }
        let n = n.min(CONN_REPLY_BUDGET);
        let mut left = self.left.lock();
        while *left < n {
            self.freed.wait(&mut left);
        }
        *left -= n;
        self.used.store(true, Ordering::Relaxed);
        n
    }

    fn give(&self, n: usize) {
        if n > 0 {
            *self.left.lock() += n;
            self.freed.notify_all();
        }
    }
}

/// How long the accept loop pauses when the process is out of descriptors or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// An accept error that says the process or system has run out of something (it lasts
/// until connections close), not that one connection failed.
fn out_of_resources(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

fn violation<T>(what: impl Into<String>) -> Result<T, ConnError> {
    Err(ConnError::Protocol(what.into()))
}

/// Where the handshake stands.
#[derive(PartialEq)]
enum Phase {
    /// Options may follow.
    Options,
    /// The client chose an export; transmission begins.
    Transmission(usize),
    /// The client aborted or the handshake ended without an export.
    Closed,
}

/// What the handshake settled.
struct Session {
    /// The connection's number in the log.
    id: u64,
    /// Whether its NBD_OPT_GO was refused for want of a place (logged once: a client
    /// may ask again and again).
    refused: bool,
    /// Held from the option that starts transmission until the connection ends.
    slot: Option<Slot>,
    export: usize,
    structured: bool,
    /// Negotiated metadata contexts: (id, which).
    contexts: Vec<(u32, Context)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Context {
    BaseAllocation,
    Bad,
}

impl Context {
    fn name(self) -> &'static str {
        match self {
            Context::BaseAllocation => CONTEXT_BASE_ALLOCATION,
            Context::Bad => CONTEXT_BAD,
        }
    }
    fn id(self) -> u32 {
        match self {
            Context::BaseAllocation => 1,
            Context::Bad => 2,
        }
    }
    const ALL: [Context; 2] = [Context::BaseAllocation, Context::Bad];
}

/// The contexts a query names: exact names, or a namespace prefix ("base:") in LIST.
fn contexts_matching(query: &str, list: bool) -> Vec<Context> {
    Context::ALL
        .into_iter()
        .filter(|c| {
            c.name() == query || (list && query.ends_with(':') && c.name().starts_with(query))
        })
        .collect()
}

impl Server {
    pub fn new(exports: Vec<Export>, config: Config) -> io::Result<Arc<Server>> {
        // The protocol's strings are at most 4,096 bytes (proto.md), and a name a client
        // cannot ask for is no export: the empty name is the first export's.
        for (i, e) in exports.iter().enumerate() {
            if e.name.len() > 4096 || e.description.len() > 4096 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "export {:?}: a name or description over 4,096 bytes",
                        e.name
                    ),
                ));
            }
            if i > 0 && e.name.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "only the first export can have the empty name (a client asking for it gets the first)",
                ));
            }
        }
        Ok(Arc::new(Server {
            exports,
            config,
            stop: AtomicBool::new(false),
            wake: UnixStream::pair()?,
            next_conn: AtomicU64::new(1),
            ended: Condvar::new(),
            serving: Arc::new(AtomicUsize::new(0)),
            handshaking: Mutex::new(Default::default()),
        }))
    }

    pub fn exports(&self) -> &[Export] {
        &self.exports
    }

    /// Stops accepting; [`Server::serve`] returns once open connections are closed.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = (&self.wake.0).write_all(b"x");
    }

    /// Accepts on every listener until [`Server::shutdown`]; each connection on its own
    /// threads. Returns after every connection has ended.
    pub fn serve(self: &Arc<Self>, listeners: Vec<Listener>) -> io::Result<()> {
        let live: Arc<Mutex<Vec<(u64, Conn)>>> = Arc::new(Mutex::new(Vec::new()));
        let starved = AtomicBool::new(false);
        std::thread::scope(|scope| -> io::Result<()> {
            while !self.stop.load(Ordering::SeqCst) {
                let mut fds: Vec<BorrowedFd> = listeners.iter().map(|l| l.fd()).collect();
                fds.push(self.wake.1.as_fd());
                let ready = crate::sys::poll_readable(&fds, None)?;
                for (i, l) in listeners.iter().enumerate() {
                    if !ready[i] {
                        continue;
                    }
                    let conn = match l.accept() {
                        Ok(c) => c,
                        Err(e) => {
                            if out_of_resources(&e) {
                                // The listener stays readable while the limit holds:
                                // accepting again at once would spin. Pause (a shutdown
                                // still ends the pause) and say so once per episode.
                                if !starved.swap(true, Ordering::Relaxed) {
                                    tracing::warn!(
                                        "accept: {e}; new connections wait until some close"
                                    );
                                }
                                crate::sys::poll_readable(
                                    &[self.wake.1.as_fd()],
                                    Some(ACCEPT_BACKOFF),
                                )?;
                            } else {
                                tracing::warn!("accept: {e}");
                            }
                            continue;
                        }
                    };
                    if starved.swap(false, Ordering::Relaxed) {
                        tracing::info!("accepting connections again");
                    }
                    let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
                    // Our copy closes it for a newer one, or at shutdown.
                    live.lock().push((id, conn.clone()));
                    let evicted = {
                        let mut h = self.handshaking.lock();
                        h.push_back(id);
                        (h.len() > MAX_HANDSHAKING).then(|| h.pop_front()).flatten()
                    };
                    if let Some(old) = evicted {
                        tracing::warn!(
                            "connection {old}: still in its handshake with {MAX_HANDSHAKING} newer ones; closed"
                        );
                        // Its thread sees the connection end; our copy goes now.
                        let mut l = live.lock();
                        if let Some(at) = l.iter().position(|(i, _)| *i == old) {
                            l.remove(at).1.shutdown(Shutdown::Both);
                        }
                    }
                    let live2 = live.clone();
                    let started = std::thread::Builder::new()
                        .name(format!("nbd-conn-{id}"))
                        .spawn_scoped(scope, move || {
                            // A bug that panics ends this connection, not the server
                            // (the scope would re-raise the panic when it ends).
                            let ran =
                                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                    self.connection(id, conn)
                                }));
                            if ran.is_err() {
                                tracing::error!("connection {id}: internal error (panic); closed");
                            }
                            self.handshake_over(id);
                            live2.lock().retain(|(i, _)| *i != id);
                            self.ended.notify_all();
                        });
                    if let Err(e) = started {
                        // A thread limit (RLIMIT_NPROC, a cgroup's pids.max): refuse this
                        // connection, keep serving the others.
                        tracing::warn!("connection {id}: no thread to serve it ({e}); closed");
                        self.handshake_over(id);
                        let mut l = live.lock();
                        if let Some(at) = l.iter().position(|(i, _)| *i == id) {
                            l.remove(at).1.shutdown(Shutdown::Both);
                        }
                    }
                }
            }
            // Shutting down (proto.md: a server SHOULD wait for inflight requests to be
            // serviced before it disconnects): stop reading from every connection, so
            // that each answers what it has read and closes; cut those that have not
            // done so after SHUTDOWN_DRAIN (a client that does not read its replies).
            let mut l = live.lock();
            for (_, c) in l.iter() {
                c.shutdown(Shutdown::Read);
            }
            let deadline = Instant::now() + SHUTDOWN_DRAIN;
            while !l.is_empty() && !self.ended.wait_until(&mut l, deadline).timed_out() {}
            for (_, c) in l.iter() {
                c.shutdown(Shutdown::Both);
            }
            Ok(())
        })
    }

    fn connection(&self, id: u64, conn: Conn) {
        let peer = conn.peer();
        tracing::info!("connection {id} from {peer}");
        match self.handle(id, conn) {
            Ok(()) => tracing::info!("connection {id} closed"),
            Err(ConnError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                tracing::info!("connection {id}: client went away")
            }
            Err(e) => tracing::warn!("connection {id} from {peer} dropped: {e}"),
        }
    }

    fn handle(&self, id: u64, mut conn: Conn) -> Result<(), ConnError> {
        // (Any timeout the configuration gives: one past the clock's range is none.)
        let now = Instant::now();
        let deadline = now
            .checked_add(self.config.handshake_timeout)
            .unwrap_or_else(|| now + Duration::from_secs(u32::MAX as u64));
        let shaken = self.handshake(id, &mut Timed::new(&mut conn, deadline));
        self.handshake_over(id);
        let Some(session) = shaken? else {
            return Ok(());
        };
        conn.set_read_timeout(None);
        conn.set_write_timeout(None);
        let e = &self.exports[session.export];
        tracing::info!(
            "connection {id}: export {:?} ({}structured replies{})",
            e.name,
            if session.structured { "" } else { "no " },
            session
                .contexts
                .iter()
                .map(|(_, c)| format!(", {}", c.name()))
                .collect::<String>()
        );
        self.transmission(conn, &session)
    }

    // -------------------------------------------------------------------------------
    // Handshake

    fn handshake(&self, id: u64, conn: &mut Timed<'_>) -> Result<Option<Session>, ConnError> {
        let mut hello = Vec::with_capacity(18);
        hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        conn.write_all(&hello)?;
        let mut b4 = [0u8; 4];
        conn.read_exact(&mut b4)?;
        let client_flags = u32::from_be_bytes(b4);
        if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return violation(format!("unknown client flags {client_flags:#x}"));
        }
        let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
        let mut session = Session {
            id,
            refused: false,
            slot: None,
            export: 0,
            structured: false,
            contexts: Vec::new(),
        };
        loop {
            let mut head = [0u8; 16];
            conn.read_exact(&mut head)?;
            let magic = u64::from_be_bytes(head[0..8].try_into().unwrap());
            if magic != IHAVEOPT {
                return violation(format!("option magic {magic:#x}, not IHAVEOPT"));
            }
            let option = u32::from_be_bytes(head[8..12].try_into().unwrap());
            let len = u32::from_be_bytes(head[12..16].try_into().unwrap());
            if len > MAX_OPTION_LEN {
                if option == OPT_EXPORT_NAME {
                    // Its only answers are the export's size and flags, or a closed
                    // connection (proto.md: no option reply may follow it).
                    return violation(format!("NBD_OPT_EXPORT_NAME of {len} bytes"));
                }
                // Not kept in memory: read past it (within the handshake's time) and say
                // why it is refused, as for any option this server does not implement.
                io::copy(&mut (&mut *conn).take(len as u64), &mut io::sink())?;
                let mut out = Vec::new();
                if option == OPT_ABORT {
                    // Its data is to be ignored; the ACK is due all the same.
                    option_reply(&mut out, option, REP_ACK, &[]);
                    let _ = conn.write_all(&out);
                    return Ok(None);
                }
                match IMPLEMENTED_OPTIONS.contains(&option) {
                    true => option_reply(&mut out, option, REP_ERR_TOO_BIG, b"option too long"),
                    false => option_reply(&mut out, option, REP_ERR_UNSUP, b"unknown option"),
                }
                conn.write_all(&out)?;
                continue;
            }
            let mut data = vec![0u8; len as usize];
            conn.read_exact(&mut data)?;
            let mut out = Vec::new();
            if self.stop.load(Ordering::SeqCst) && option != OPT_ABORT {
                // proto.md: a server shutting down errors further options.
                option_reply(
                    &mut out,
                    option,
                    REP_ERR_SHUTDOWN,
                    b"the server is stopping",
                );
                conn.write_all(&out)?;
                return Ok(None);
            }
            let phase = self.option(option, &data, &mut session, no_zeroes, &mut out)?;
            let sent = conn.write_all(&out);
            if phase == Phase::Closed {
                // After NBD_OPT_ABORT the client may close without reading the ACK
                // (nbdinfo --list does): not a failure of the connection.
                return Ok(None);
            }
            sent?;
            match phase {
                Phase::Options => continue,
                Phase::Transmission(export) => {
                    session.export = export;
                    return Ok(Some(session));
                }
                Phase::Closed => return Ok(None),
            }
        }
    }

    /// Connection `id` is out of its handshake (through it, or ended).
    fn handshake_over(&self, id: u64) {
        let mut h = self.handshaking.lock();
        if let Some(at) = h.iter().position(|&i| i == id) {
            h.remove(at);
        }
    }

    /// A place among the connections served, if [`Config::max_connections`] leaves one.
    fn take_slot(&self) -> Option<Slot> {
        let max = self.config.max_connections;
        self.serving
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (max == 0 || n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(self.serving.clone()))
    }

    /// Why a client is refused a place (logged, and sent in NBD_OPT_GO's error reply).
    fn full_message(&self) -> String {
        format!(
            "too many connections: this server serves at most {} at once (--max-connections)",
            self.config.max_connections
        )
    }

    fn find_export(&self, name: &str) -> Option<usize> {
        if name.is_empty() {
            return (!self.exports.is_empty()).then_some(0);
        }
        self.exports.iter().position(|e| e.name == name)
    }

    fn transmission_flags(&self, structured: bool) -> u16 {
        let mut f = FLAG_HAS_FLAGS
            | FLAG_READ_ONLY
            | FLAG_SEND_FLUSH
            | FLAG_CAN_MULTI_CONN
            | FLAG_SEND_CACHE;
        if structured {
            f |= FLAG_SEND_DF;
        }
        f
    }

    /// Answers one option into `out`; says what comes next.
    fn option(
        &self,
        option: u32,
        data: &[u8],
        session: &mut Session,
        no_zeroes: bool,
        out: &mut Vec<u8>,
    ) -> Result<Phase, ConnError> {
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(data);
                let Some(i) = self.find_export(&name) else {
                    // This option has no error reply: the protocol says hang up.
                    return violation(format!("NBD_OPT_EXPORT_NAME for unknown export {name:?}"));
                };
                let Some(slot) = self.take_slot() else {
                    // No error reply here either: hang up, and say why in the log.
                    return Err(ConnError::Refused(self.full_message()));
                };
                session.slot = Some(slot);
                out.extend_from_slice(&self.exports[i].source.size().to_be_bytes());
                out.extend_from_slice(&self.transmission_flags(session.structured).to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                Ok(Phase::Transmission(i))
            }
            OPT_ABORT => {
                option_reply(out, option, REP_ACK, &[]);
                Ok(Phase::Closed)
            }
            OPT_LIST => {
                if !data.is_empty() {
                    option_reply(out, option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data");
                    return Ok(Phase::Options);
                }
                for e in &self.exports {
                    let mut d = Vec::new();
                    d.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                    d.extend_from_slice(e.name.as_bytes());
                    d.extend_from_slice(e.description.as_bytes());
                    option_reply(out, option, REP_SERVER, &d);
                }
                option_reply(out, option, REP_ACK, &[]);
                Ok(Phase::Options)
            }
            OPT_STARTTLS => {
                option_reply(out, option, REP_ERR_UNSUP, b"TLS is not supported");
                Ok(Phase::Options)
            }
            OPT_INFO | OPT_GO => self.info_or_go(option, data, session, out),
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    option_reply(
                        out,
                        option,
                        REP_ERR_INVALID,
                        b"NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                } else {
                    session.structured = true;
                    option_reply(out, option, REP_ACK, &[]);
                }
                Ok(Phase::Options)
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(option, data, session, out);
                Ok(Phase::Options)
            }
            _ => {
                option_reply(out, option, REP_ERR_UNSUP, b"unknown option");
                Ok(Phase::Options)
            }
        }
    }

    fn info_or_go(
        &self,
        option: u32,
        data: &[u8],
        session: &mut Session,
        out: &mut Vec<u8>,
    ) -> Result<Phase, ConnError> {
        let mut p = Payload::new(data);
        let parsed = (|| {
            let name = p.string()?;
            let n = p.u16()?;
            let mut wanted = Vec::new();
            for _ in 0..n {
                wanted.push(p.u16()?);
            }
            p.is_empty().then_some((name, wanted))
        })();
        let Some((name, wanted)) = parsed else {
            option_reply(out, option, REP_ERR_INVALID, b"malformed request");
            return Ok(Phase::Options);
        };
        let Some(i) = self.find_export(name) else {
            option_reply(out, option, REP_ERR_UNKNOWN, b"no such export");
            return Ok(Phase::Options);
        };
        if option == OPT_GO {
            match self.take_slot() {
                Some(slot) => session.slot = Some(slot),
                None => {
                    // The client may try again later in the same handshake, or abort.
                    let why = self.full_message();
                    if !std::mem::replace(&mut session.refused, true) {
                        tracing::warn!("connection {}: {why}; refused its NBD_OPT_GO", session.id);
                    }
                    option_reply(out, option, REP_ERR_POLICY, why.as_bytes());
                    return Ok(Phase::Options);
                }
            }
        }
        let e = &self.exports[i];
        let mut d = Vec::new();
        d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        d.extend_from_slice(&e.source.size().to_be_bytes());
        d.extend_from_slice(&self.transmission_flags(session.structured).to_be_bytes());
        option_reply(out, option, REP_INFO, &d);
        // Block sizes are always sent: reads of any size work, whole chunks are best.
        let mut d = Vec::new();
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(
            &e.source
                .preferred_block_size()
                .clamp(512, MAX_REQUEST_LEN)
                .to_be_bytes(),
        );
        d.extend_from_slice(&MAX_REQUEST_LEN.to_be_bytes());
        option_reply(out, option, REP_INFO, &d);
        if wanted.contains(&INFO_NAME) {
            let mut d = INFO_NAME.to_be_bytes().to_vec();
            d.extend_from_slice(e.name.as_bytes());
            option_reply(out, option, REP_INFO, &d);
        }
        if wanted.contains(&INFO_DESCRIPTION) && !e.description.is_empty() {
            let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
            d.extend_from_slice(e.description.as_bytes());
            option_reply(out, option, REP_INFO, &d);
        }
        option_reply(out, option, REP_ACK, &[]);
        Ok(if option == OPT_GO {
            Phase::Transmission(i)
        } else {
            Phase::Options
        })
    }

    fn meta_context(&self, option: u32, data: &[u8], session: &mut Session, out: &mut Vec<u8>) {
        let set = option == OPT_SET_META_CONTEXT;
        if set {
            // proto.md: this replaces all previous contexts, also when it fails.
            session.contexts.clear();
        }
        if set && !session.structured {
            option_reply(
                out,
                option,
                REP_ERR_INVALID,
                b"negotiate structured replies first",
            );
            return;
        }
        let mut p = Payload::new(data);
        let parsed = (|| {
            let name = p.string()?;
            let n = p.u32()?;
            let mut queries = Vec::new();
            for _ in 0..n {
                queries.push(p.string()?);
            }
            p.is_empty().then_some((name, queries))
        })();
        let Some((name, queries)) = parsed else {
            option_reply(out, option, REP_ERR_INVALID, b"malformed request");
            return;
        };
        if self.find_export(name).is_none() {
            option_reply(out, option, REP_ERR_UNKNOWN, b"no such export");
            return;
        }
        let mut chosen: Vec<Context> = Vec::new();
        if queries.is_empty() && !set {
            chosen.extend(Context::ALL);
        }
        for q in &queries {
            for c in contexts_matching(q, !set) {
                if !chosen.contains(&c) {
                    chosen.push(c);
                }
            }
        }
        for c in &chosen {
            // proto.md: in a LIST reply the ID is reserved and SHOULD be zero.
            let id = if set { c.id() } else { 0 };
            let mut d = id.to_be_bytes().to_vec();
            d.extend_from_slice(c.name().as_bytes());
            option_reply(out, option, REP_META_CONTEXT, &d);
        }
        if set {
            session.contexts = chosen.iter().map(|c| (c.id(), *c)).collect();
        }
        option_reply(out, option, REP_ACK, &[]);
    }

    // -------------------------------------------------------------------------------
    // Transmission

    /// One thread reads requests (buffered, so a burst of pipelined requests costs one
    /// system call). It answers itself a request with nothing queued behind it, and any
    /// that is cheap (zeros, cached data): a hand-off between threads costs more than
    /// such a reply, and its replies to one burst leave in one write. Requests that take
    /// work (decoding) and arrive together go to a few worker threads and are answered
    /// concurrently, out of order.
    fn transmission(&self, conn: Conn, session: &Session) -> Result<(), ConnError> {
        let source = &*self.exports[session.export].source;
        let writer = std::sync::Mutex::new(conn.clone());
        let mut reader = io::BufReader::with_capacity(64 << 10, conn.clone());
        let failed = AtomicBool::new(false);
        let budget = ReplyBudget::new();
        let workers = self.config.threads_per_connection.max(1);
        let (tx, rx) = std::sync::mpsc::sync_channel::<Request>(workers * 16);
        let rx = std::sync::Mutex::new(rx);
        let res = std::thread::scope(|scope| {
            let mut started = 0;
            for i in 0..workers {
                let worker = std::thread::Builder::new()
                    .name(format!("nbd-worker-{i}"))
                    .spawn_scoped(scope, || {
                        let mut out = Vec::new();
                        loop {
                            let next = rx.lock().map(|r| r.recv());
                            let Ok(Ok(req)) = next else { return };
                            if !failed.load(Ordering::Relaxed) {
                                let share = budget.take(&req);
                                self.reply(
                                    source, session, &req, &mut out, &writer, &failed, &conn,
                                );
                                budget.give(share);
                            }
                        }
                    });
                match worker {
                    Ok(_) => started += 1,
                    Err(e) => {
                        // A thread limit: serve with fewer workers (with none, the reader
                        // answers every request itself).
                        tracing::warn!("{started} of {workers} worker threads ({e})");
                        break;
                    }
                }
            }
            // Replies the reader made itself, sent together once no request is waiting.
            let mut batch = Vec::new();
            let flush = |batch: &mut Vec<u8>| {
                self.send(batch, &writer, &failed, &conn);
                reuse(batch);
            };
            let res = (|| -> Result<(), ConnError> {
                loop {
                    if reader.buffer().len() < REQUEST_LEN && !batch.is_empty() {
                        flush(&mut batch); // the next read may wait for the client
                    }
                    let mut head = [0u8; REQUEST_LEN];
                    if !read_request(&mut reader, &mut head)? {
                        return Ok(()); // the client closed between requests
                    }
                    let Some(req) = Request::decode(&head) else {
                        return violation("request magic is wrong");
                    };
                    if req.kind == CMD_WRITE {
                        // The payload must be read to stay in step, and is thrown away.
                        if req.length > MAX_REQUEST_LEN {
                            return violation(format!("write of {} bytes", req.length));
                        }
                        if !batch.is_empty() {
                            flush(&mut batch);
                        }
                        io::copy(&mut (&mut reader).take(req.length as u64), &mut io::sink())?;
                    }
                    if req.kind == CMD_DISC {
                        flush(&mut batch);
                        return Ok(());
                    }
                    if failed.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    if started > 0
                        && reader.buffer().len() >= REQUEST_LEN
                        && !(req.kind == CMD_READ
                            && source.read_is_cheap(req.offset, req.length as usize))
                    {
                        // More requests are waiting and this one takes work (decoding):
                        // let a worker answer it. A cheap one costs less than the
                        // hand-off.
                        if tx.send(req).is_err() {
                            return Ok(());
                        }
                    } else {
                        let share = budget.take(&req);
                        self.answer(source, session, &req, &mut batch);
                        if batch.len() >= BATCH_FLUSH_BYTES || share > 0 {
                            flush(&mut batch);
                        }
                        budget.give(share);
                    }
                }
            })();
            // No more requests. On DISC or end of input the workers still answer what
            // they were given (the protocol requires outstanding requests to be
            // handled); after an error they drop it.
            if res.is_err() {
                failed.store(true, Ordering::Relaxed);
                conn.shutdown(Shutdown::Both);
            }
            drop(tx);
            res
        });
        conn.shutdown(Shutdown::Both);
        if budget.used.load(Ordering::Relaxed) {
            // Freed large buffers stay in the threads' malloc arenas otherwise.
            crate::sys::return_free_memory();
        }
        res
    }

    /// Answers one request and writes the reply whole.
    #[allow(clippy::too_many_arguments)]
    fn reply(
        &self,
        source: &dyn BlockSource,
        session: &Session,
        req: &Request,
        out: &mut Vec<u8>,
        writer: &std::sync::Mutex<Conn>,
        failed: &AtomicBool,
        conn: &Conn,
    ) {
        out.clear();
        self.answer(source, session, req, out);
        self.send(out, writer, failed, conn);
        reuse(out);
    }

    /// Writes whole replies; on failure stops the connection.
    fn send(&self, out: &[u8], writer: &std::sync::Mutex<Conn>, failed: &AtomicBool, conn: &Conn) {
        if out.is_empty() {
            return;
        }
        let written = match writer.lock() {
            Ok(mut w) => w.write_all(out),
            Err(_) => Err(io::Error::other("writer lock poisoned")),
        };
        if let Err(e) = written {
            // The client is gone or stuck: stop the whole connection.
            if !failed.swap(true, Ordering::Relaxed) {
                tracing::info!("writing a reply: {e}");
            }
            conn.shutdown(Shutdown::Both);
        }
    }

    /// Builds the reply to one request into `out`.
    fn answer(
        &self,
        source: &dyn BlockSource,
        session: &Session,
        req: &Request,
        out: &mut Vec<u8>,
    ) {
        // The flags each command may carry (proto.md: others are EINVAL, FAST_ZERO too
        // since NBD_FLAG_SEND_FAST_ZERO is not advertised). A writing command with valid
        // flags gets EPERM below.
        let allowed = match req.kind {
            CMD_READ if session.structured => CMD_FLAG_DF,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
            CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
            _ => 0,
        };
        let fail = |out: &mut Vec<u8>, errno: u32, msg: &str| {
            if session.structured {
                error_chunk(out, REPLY_FLAG_DONE, req.cookie, errno, msg, None);
            } else {
                simple_reply(out, errno, req.cookie);
            }
        };
        if req.flags & !allowed != 0 {
            return fail(
                out,
                EINVAL,
                "command flags that do not apply to this command",
            );
        }
        let in_range = req
            .offset
            .checked_add(req.length as u64)
            .is_some_and(|end| end <= source.size());
        match req.kind {
            CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES => fail(out, EPERM, "read-only export"),
            CMD_FLUSH => ok_reply(out, session, req.cookie),
            CMD_READ | CMD_CACHE | CMD_BLOCK_STATUS if !in_range => {
                fail(out, EINVAL, "request beyond the end of the export")
            }
            CMD_READ | CMD_CACHE if req.length > MAX_REQUEST_LEN => {
                fail(out, EINVAL, "longer than the maximum block size")
            }
            CMD_READ => self.read(source, session, req, out),
            CMD_CACHE => {
                // Warm the source's cache; errors here are not the client's concern.
                let mut buf = vec![0u8; req.length as usize];
                let _ = source.read_at(&mut buf, req.offset);
                ok_reply(out, session, req.cookie)
            }
            CMD_BLOCK_STATUS if !session.structured || session.contexts.is_empty() => {
                fail(out, EINVAL, "no metadata context negotiated")
            }
            CMD_BLOCK_STATUS if req.length == 0 => fail(out, EINVAL, "empty block status"),
            CMD_BLOCK_STATUS => self.block_status(source, session, req, out),
            _ => fail(out, EINVAL, "unknown command"),
        }
    }

    fn read(&self, source: &dyn BlockSource, session: &Session, req: &Request, out: &mut Vec<u8>) {
        let len = req.length as usize;
        let off = req.offset;
        let end = off + len as u64;
        // What is bad (and, for structured replies, what is zero) is known from the
        // source's tables before any byte is read.
        let bad = interpose_image::source::bad_within(source.bad_extents(), off, len as u64);
        if !session.structured {
            if !bad.is_empty() {
                simple_reply(out, EIO, req.cookie);
                return;
            }
            // Header, then the data in place after it.
            simple_reply(out, 0, req.cookie);
            let at = out.len();
            out.resize(at + len, 0);
            if let Err(e) = source.read_at(&mut out[at..], off) {
                tracing::warn!("read of {len} bytes at {off}: {e}");
                out.clear();
                simple_reply(out, EIO, req.cookie);
            }
            return;
        }
        let df = req.flags & CMD_FLAG_DF != 0;
        let zero = if df {
            Vec::new()
        } else {
            source.zero_ranges(off..end).unwrap_or_default()
        };
        // The good pieces between the bad extents, as data or holes.
        let mut pieces: Vec<(u64, u64, bool)> = Vec::new(); // (start, end, hole)
        let mut at = off;
        for b in bad.iter().map(|b| (b.offset, b.end())).chain([(end, end)]) {
            let mut p = at;
            let (lo, hi) = (at, b.0);
            for z in zero.iter().filter(|z| z.end > lo && z.start < hi) {
                let (zs, ze) = (z.start.max(p), z.end.min(hi));
                if zs > p {
                    pieces.push((p, zs, false));
                }
                pieces.push((zs, ze, true));
                p = ze;
            }
            if b.0 > p {
                pieces.push((p, b.0, false));
            }
            at = b.1;
            if df && !bad.is_empty() {
                break; // one content chunk at most: the good bytes before the first bad one
            }
        }
        // Where the last chunk starts: without errors it carries the DONE flag itself
        // (every byte was read before sending, so no error can follow), saving the
        // client a separate final chunk.
        let mut last_chunk = None;
        let mut errored = false;
        for (s, e, hole) in pieces {
            last_chunk = Some(out.len());
            if hole {
                chunk_header(out, 0, REPLY_TYPE_OFFSET_HOLE, req.cookie, 12);
                out.extend_from_slice(&s.to_be_bytes());
                out.extend_from_slice(&((e - s) as u32).to_be_bytes());
                continue;
            }
            let mark = out.len();
            chunk_header(
                out,
                0,
                REPLY_TYPE_OFFSET_DATA,
                req.cookie,
                8 + (e - s) as u32,
            );
            out.extend_from_slice(&s.to_be_bytes());
            let at = out.len();
            out.resize(at + (e - s) as usize, 0);
            if let Err(err) = source.read_at(&mut out[at..], s) {
                // A damaged image: no data for this piece, an error for it instead.
                tracing::warn!("read of {} bytes at {s}: {err}", e - s);
                out.truncate(mark);
                error_chunk(out, 0, req.cookie, EIO, &err.to_string(), Some(s));
                errored = true;
                continue;
            }
        }
        if bad.is_empty() && !errored {
            if let Some(at) = last_chunk {
                // The flags field follows the 4-byte magic.
                out[at + 4..at + 6].copy_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
                return;
            }
        }
        for b in &bad {
            let msg = format!(
                "{} sectors at {}..{}",
                match b.state {
                    ExtentState::Bad => "bad",
                    ExtentState::Untried => "unread (untried)",
                },
                b.offset,
                b.end()
            );
            error_chunk(out, 0, req.cookie, EIO, &msg, Some(b.offset));
        }
        chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.cookie, 0);
    }

    fn block_status(
        &self,
        source: &dyn BlockSource,
        session: &Session,
        req: &Request,
        out: &mut Vec<u8>,
    ) {
        let start = req.offset;
        let end = start + req.length as u64;
        let one = req.flags & CMD_FLAG_REQ_ONE != 0;
        let n = session.contexts.len();
        for (k, (id, ctx)) in session.contexts.iter().enumerate() {
            // (length, flags) descriptors covering start..end.
            let mut desc: Vec<(u64, u32)> = Vec::new();
            let mut push = |len: u64, flags: u32| match desc.last_mut() {
                Some(last) if last.1 == flags => last.0 += len,
                _ => desc.push((len, flags)),
            };
            match ctx {
                Context::BaseAllocation => {
                    let mut at = start;
                    for z in source.zero_ranges(start..end).unwrap_or_default() {
                        if z.start > at {
                            push(z.start - at, 0);
                        }
                        push(z.end - z.start, STATE_HOLE | STATE_ZERO);
                        at = z.end;
                    }
                    if end > at {
                        push(end - at, 0);
                    }
                }
                Context::Bad => {
                    let mut at = start;
                    for b in interpose_image::source::bad_within(
                        source.bad_extents(),
                        start,
                        end - start,
                    ) {
                        if b.offset > at {
                            push(b.offset - at, 0);
                        }
                        let f = match b.state {
                            ExtentState::Bad => STATE_BAD,
                            ExtentState::Untried => STATE_UNTRIED,
                        };
                        push(b.length, f);
                        at = b.end();
                    }
                    if end > at {
                        push(end - at, 0);
                    }
                }
            }
            if one {
                desc.truncate(1);
            }
            // A descriptor's length is 32 bits: requests are at most 4 GiB - 1.
            let flags = if k + 1 == n { REPLY_FLAG_DONE } else { 0 };
            let len = 4 + 8 * desc.len() as u32;
            chunk_header(out, flags, REPLY_TYPE_BLOCK_STATUS, req.cookie, len);
            out.extend_from_slice(&id.to_be_bytes());
            for (l, f) in desc {
                out.extend_from_slice(&(l as u32).to_be_bytes());
                out.extend_from_slice(&f.to_be_bytes());
            }
        }
    }
}

/// Reads a request header; `false` at end of input before its first byte (a client
/// that closed between requests), an error for half a header.
fn read_request(r: &mut impl Read, head: &mut [u8; REQUEST_LEN]) -> io::Result<bool> {
    let mut got = 0;
    while got < head.len() {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the client closed after {got} bytes of a request"),
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// A successful reply without data.
fn ok_reply(out: &mut Vec<u8>, session: &Session, cookie: u64) {
    if session.structured {
        proto::chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
    } else {
        simple_reply(out, 0, cookie);
    }
}

/// Listeners passed by systemd (LISTEN_PID/LISTEN_FDS), taken over once.
pub fn systemd_listeners() -> io::Result<Vec<Listener>> {
    let pid_ok = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let n: i32 = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    if !pid_ok || n <= 0 {
        return Ok(Vec::new());
    }
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    (3..3 + n).map(crate::sys::listener_from_fd).collect()
}

/// Removes a Unix socket path when dropped, if it is still the socket this server bound:
/// something else put there meanwhile (a file, another server's socket after this one's
/// was removed) is not this server's to remove.
pub struct SocketPath {
    path: PathBuf,
    /// Device and inode number of the socket as bound.
    bound: (u64, u64),
}

impl SocketPath {
    /// Notes the socket just bound at `path`.
    pub fn bound(path: PathBuf) -> io::Result<SocketPath> {
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::symlink_metadata(&path)?;
        Ok(SocketPath {
            bound: (md.dev(), md.ino()),
            path,
        })
    }
}

impl Drop for SocketPath {
    fn drop(&mut self) {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        match std::fs::symlink_metadata(&self.path) {
            Ok(md) if md.file_type().is_socket() && (md.dev(), md.ino()) == self.bound => {
                let _ = std::fs::remove_file(&self.path);
            }
            Ok(_) => tracing::warn!(
                "{} is no longer this server's socket: left in place",
                self.path.display()
            ),
            Err(_) => {}
        }
    }
}
