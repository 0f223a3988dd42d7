//! `hello`: a tiny HTTP/1.1 server that shows how to adapt an app to baton.
//!
//! # The child contract
//!
//! baton starts each generation of the app with the protocol of systemd
//! socket activation, so any app that supports that already works:
//!
//! * The listening sockets are inherited as fds 3, 4, ... and described by
//!   `LISTEN_FDS=<count>`, `LISTEN_PID=<pid>` and `LISTEN_FDNAMES=<a:b:...>`.
//!   `LISTEN_PID` must be exactly our own pid: if it is not, the variables
//!   were meant for another process (we inherited them by mistake), so we
//!   refuse to start and exit with code 86, as gunicorn and lighttpd do.
//!   We serve every passed fd that is a stream listener (TCP or Unix) and
//!   ignore the others. Without `LISTEN_FDS` we bind `HELLO_ADDR`
//!   (default `127.0.0.1:8080`) ourselves, so the example also runs alone.
//! * We register the listeners with our event loop (epoll) only when we
//!   are about to accept, after our boot, never while we boot or fail: the
//!   socket is shared with the generation that serves meanwhile, and a
//!   registered listener wakes us for every connection it gets (issue 13:
//!   ~8,400 wake-ups a second, 820 ms of CPU in a 4 s boot, taken from the
//!   serving generation on a small machine). Until then we only hold them.
//! * Once we accept connections we send `READY=1` to `NOTIFY_SOCKET`
//!   (a datagram socket path, or an abstract name when it starts with `@`).
//!   baton only retires the old generation after that.
//! * SIGTERM or SIGINT means "drain": stop accepting, close our copy of the
//!   listeners (never `shutdown()` them: the socket is shared with baton and
//!   the next generation), finish the requests in flight (also one whose
//!   head was still arriving), then exit 0. We send `STOPPING=1` when the
//!   drain starts. Every response from then on says `Connection: close`.
//!   An idle keep-alive connection gets a short grace (`DRAIN_IDLE_GRACE`,
//!   500 ms): a request that starts arriving in it is answered (and the
//!   connection closed), one still idle at its end is closed. Closing it
//!   at once raced the client's next request (wrk with keep-alive saw ~48
//!   read errors per deploy).
//!
//!   A race remains, and no server can remove it: a client that sends on
//!   an idle connection just as the grace ends gets the connection closed
//!   under it. RFC 9112 §9.3.1 (retrying requests) lets a client retry an
//!   idempotent request on a new connection then; a new connection reaches
//!   the next generation through the shared accept queue.
//! * `BATON_GENERATION=<n>` numbers the generations; we echo it in every
//!   response (`X-Generation` header and the body) so tests can tell which
//!   generation answered.
//!
//! Other settings: `HELLO_EXPECT_FDNAMES`, when set, must equal
//! `LISTEN_FDNAMES` exactly (else exit 86). `HELLO_DRAIN_IDLE_MS=N` sets the
//! drain's grace for idle keep-alive connections to N ms (0: close them at
//! once), so tests need not wait 500 ms.
//!
//! # Timing lines
//!
//! For the benchmark, which times the handoff as the apps see it (not
//! between two of baton's own records), we log two lines, each in one
//! write(2) like every line of ours, with U the wall-clock time
//! (`CLOCK_REALTIME`, the clock of baton's log timestamps) in microseconds
//! since the Unix epoch:
//!
//! * `hello: generation G pid P ready-sent at U` once the `READY=1`
//!   datagram was sent, U taken just before sending it;
//! * `hello: generation G pid P drain-signal at U` right after a drain
//!   signal (SIGTERM/SIGINT) reached us, whatever we were doing.
//!
//! # HTTP
//!
//! Just enough for requests without a body: every request gets
//! `generation=<G> pid=<P>`; `/slow?ms=N` (N <= 60000, else 400) waits
//! N ms first, to keep a request in flight across a drain. `/healthz`
//! answers `200 ok`, or as `HELLO_HEALTH` says (below). Connections are
//! kept alive unless the client asks otherwise or a drain has begun. Every
//! wait on a client is bounded, so is the drain: a request head must arrive
//! within 30 s (`HEAD_TIMEOUT`), an idle connection within the grace, and
//! after our last response we wait 1 s at most (`LINGER`) for the client
//! to hang up.
//!
//! # Fault injection for baton's tests
//!
//! * `HELLO_BOOT_DELAY_MS=N`: sleep N ms after taking the sockets, before
//!   accepting and becoming ready (a slow boot).
//! * `HELLO_BOOT_GATE=DIR`: after the boot delay, log `waiting for
//!   DIR/<BATON_GENERATION> before becoming ready`, wait until that file
//!   exists (checked every 5 ms), then accept and become ready: a boot that
//!   ends exactly when a test says so.
//! * `HELLO_FAIL=crash`: after the boot delay, exit with code 3 without
//!   ever becoming ready.
//! * `HELLO_FAIL=never-ready`: hold the sockets but never register them,
//!   never accept and never send `READY=1` (an app stuck in its init);
//!   exit 0 on SIGTERM/SIGINT.
//! * `HELLO_FAIL=exit-after-ready`: send `READY=1` but never serve, then
//!   exit with code 3 after `HELLO_EXIT_AFTER_MS` (default 1000): a release
//!   that says it is ready and then dies, as gunicorn's arbiter does when
//!   its workers fail to import the app.
//! * `HELLO_HEALTH=fail`: `/healthz` answers `500`; `HELLO_HEALTH=hang`:
//!   it never answers (the connection stays open until the client gives
//!   up or the drain ends it). Other paths are served as usual: a release
//!   that serves but is unhealthy.
//! * `HELLO_WEDGE_GATE=DIR`: `/healthz` hangs once the file
//!   `DIR/<BATON_GENERATION>-wedged` exists (checked at each request): a
//!   generation that wedges while it serves, when a test says so.
//! * `HELLO_FAIL=ignore-term`: serve and become ready, but ignore
//!   SIGTERM/SIGINT, so the supervisor has to SIGKILL us.
//!
//! Exit codes: 0 after a drain, 1 on an I/O error at startup, 2 on a bad
//! `HELLO_*`/`BATON_GENERATION` setting, 3 for `HELLO_FAIL=crash`, 86 when
//! the socket-activation environment is not meant for us or unusable.

use std::env;
use std::fmt::Display;
use std::io;
use std::os::fd::AsFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use listenfd::ListenFd;
use nix::sys::socket::{getsockopt, sockopt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;
use tokio::time::{sleep, timeout};

/// Logs one line to stderr in a single write(2). stderr is shared with
/// baton and the other generations, and `eprintln!` may split one line into
/// several writes that interleave with theirs, garbling both.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let line = format!("hello: {}\n", format_args!($($arg)*));
        let _ = std::io::stderr().write_all(line.as_bytes());
    }};
}

/// Exit code when the socket-activation variables are not for us.
const EXIT_NOT_FOR_US: i32 = 86;
/// Largest request head (request line + headers) we accept.
const MAX_HEAD: usize = 16 * 1024;
/// How long a client may take to send a whole request head, so a silent
/// client cannot hold up a drain forever.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long we wait for the client to hang up after our last response.
const LINGER: Duration = Duration::from_secs(1);
/// How long, once the drain has begun, an idle keep-alive connection may
/// still bring its next request (`HELLO_DRAIN_IDLE_MS` overrides it). A
/// client that sent it just before our drain, or sends it before it sees
/// our close, then gets an answer instead of a closed connection. Short: it
/// holds the drain up when the client has nothing more to send.
const DRAIN_IDLE_GRACE: Duration = Duration::from_millis(500);
/// Longest `/slow` delay we agree to.
const MAX_SLOW_MS: u64 = 60_000;
/// How often a boot gate (`HELLO_BOOT_GATE`) is checked.
const GATE_POLL: Duration = Duration::from_millis(5);

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // First of all: from here on SIGTERM/SIGINT no longer kill us, so a drain
    // that arrives while we boot is never fatal.
    let mut signals = DrainSignals::install()
        .unwrap_or_else(|e| die(1, format_args!("cannot install signal handlers: {e}")));

    let config = Config::from_env();
    let app = Arc::new(App {
        generation: config.generation,
        pid: nix::unistd::getpid().as_raw(),
        drain_idle_grace: config.drain_idle_grace,
        health: config.health,
        wedge: env::var_os("HELLO_WEDGE_GATE")
            .map(|dir| PathBuf::from(dir).join(format!("{}-wedged", config.generation))),
    });

    // Must run before `ListenFd::from_env()`, which deletes LISTEN_PID.
    check_activation_env();
    // Held, not yet registered with the event loop: through the boot and
    // the fault paths below, connections queue in the kernel without waking
    // us (`StdListener::register` says why that matters).
    let listeners = take_listeners();

    let ignore_signals = config.fault == Fault::IgnoreTerm;
    let boot = async {
        sleep(config.boot_delay).await;
        if let Some(gate) = &config.boot_gate {
            say!("{app} waiting for {} before becoming ready", gate.display());
            while !gate.exists() {
                sleep(GATE_POLL).await;
            }
        }
    };
    tokio::select! {
        () = boot => {}
        name = next_drain_signal(&mut signals, &app, ignore_signals) => {
            // Nothing is in flight yet, so draining is just leaving.
            say!("{name} during boot, exiting");
            return;
        }
    }

    match config.fault {
        Fault::Crash => die(3, "HELLO_FAIL=crash: crashing before becoming ready"),
        Fault::NeverReady => {
            // Held until we exit, and never registered: an app stuck in its
            // init costs the serving generation nothing.
            say!("HELLO_FAIL=never-ready: holding the sockets, never ready");
            let name = next_drain_signal(&mut signals, &app, false).await;
            say!("{name} while never ready, exiting");
            drop(listeners);
        }
        Fault::None | Fault::IgnoreTerm => serve(listeners, app, signals, ignore_signals).await,
        Fault::ExitAfterReady => {
            // Like gunicorn's arbiter when its workers fail to boot: it
            // says READY=1, never serves, and exits.
            notify("READY=1");
            let exit_after = config.exit_after;
            tokio::select! {
                () = sleep(exit_after) => {}
                name = next_drain_signal(&mut signals, &app, false) => {
                    say!("{name} before exiting, exiting");
                    return;
                }
            }
            drop(listeners);
            die(
                3,
                format_args!(
                    "HELLO_FAIL=exit-after-ready: exiting {} ms after READY=1",
                    exit_after.as_millis()
                ),
            )
        }
    }
}

/// Registers the listeners with the event loop, accepts on every one until
/// a drain signal, then waits for the connections in flight to finish.
async fn serve(
    listeners: Vec<StdListener>,
    app: Arc<App>,
    mut signals: DrainSignals,
    ignore: bool,
) {
    let listeners = listeners
        .into_iter()
        .map(StdListener::register)
        .collect::<io::Result<Vec<_>>>()
        .unwrap_or_else(|e| die(1, format_args!("cannot register the listeners: {e}")));
    // Every accept loop and connection holds a receiver: it learns from it
    // that the drain began, and when the last one is dropped all are done.
    let (drain_tx, drain_rx) = watch::channel(false);
    let count = listeners.len();
    for listener in listeners {
        tokio::spawn(accept_loop(listener, app.clone(), drain_rx.clone()));
    }
    drop(drain_rx);

    say!("{app} serving {count} listener(s)");
    // The listeners are already listening: connections made from now on wait
    // in the kernel's backlog until the accept loops pick them up.
    let ready = format!("READY=1\nSTATUS=serving generation {}", app.generation);
    // For the benchmark: when READY=1 leaves us, by the clock of baton's
    // log (its `Ready` is when baton had processed it). Taken before the
    // send: taken after, a descheduling between the two could put it past
    // the old generation's receipt of its drain signal.
    let sending = wall_clock_micros();
    if notify(&ready) {
        say!("{app} ready-sent at {sending}");
    }

    let name = next_drain_signal(&mut signals, &app, ignore).await;
    say!("{app} draining after {name}");
    notify("STOPPING=1");
    drain_tx.send_replace(true);
    drain_tx.closed().await;
    say!("{app} exiting");
}

/// What every connection needs to know about this process.
struct App {
    generation: u64,
    pid: i32,
    /// How long an idle keep-alive connection may still bring a request
    /// once the drain has begun.
    drain_idle_grace: Duration,
    /// What `/healthz` answers.
    health: Health,
    /// `/healthz` hangs once this file exists.
    wedge: Option<PathBuf>,
}

impl Display for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "generation {} pid {}", self.generation, self.pid)
    }
}

// ---------------------------------------------------------------------------
// Configuration and the socket-activation contract
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    Crash,
    NeverReady,
    IgnoreTerm,
    ExitAfterReady,
}

/// What `/healthz` does (`HELLO_HEALTH`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Health {
    Ok,
    Fail,
    Hang,
}

struct Config {
    generation: u64,
    boot_delay: Duration,
    /// The file whose existence ends the boot.
    boot_gate: Option<PathBuf>,
    drain_idle_grace: Duration,
    fault: Fault,
    health: Health,
    /// `HELLO_FAIL=exit-after-ready`: how long after READY=1.
    exit_after: Duration,
}

impl Config {
    /// Reads our settings, exiting with code 2 on a malformed one.
    fn from_env() -> Config {
        let fault = match env::var("HELLO_FAIL").ok().as_deref() {
            None => Fault::None,
            Some("crash") => Fault::Crash,
            Some("never-ready") => Fault::NeverReady,
            Some("ignore-term") => Fault::IgnoreTerm,
            Some("exit-after-ready") => Fault::ExitAfterReady,
            Some(other) => die(2, format_args!("unknown HELLO_FAIL={other}")),
        };
        let health = match env::var("HELLO_HEALTH").ok().as_deref() {
            None | Some("ok") => Health::Ok,
            Some("fail") => Health::Fail,
            Some("hang") => Health::Hang,
            Some(other) => die(2, format_args!("unknown HELLO_HEALTH={other}")),
        };
        let generation = number_from_env("BATON_GENERATION");
        let boot_gate = env::var_os("HELLO_BOOT_GATE")
            .map(|dir| PathBuf::from(dir).join(generation.to_string()));
        let drain_idle_grace = match env::var_os("HELLO_DRAIN_IDLE_MS") {
            Some(_) => Duration::from_millis(number_from_env("HELLO_DRAIN_IDLE_MS")),
            None => DRAIN_IDLE_GRACE,
        };
        Config {
            generation,
            boot_delay: Duration::from_millis(number_from_env("HELLO_BOOT_DELAY_MS")),
            boot_gate,
            drain_idle_grace,
            fault,
            health,
            exit_after: match env::var_os("HELLO_EXIT_AFTER_MS") {
                None => Duration::from_secs(1),
                Some(_) => Duration::from_millis(number_from_env("HELLO_EXIT_AFTER_MS")),
            },
        }
    }
}

/// Parses a numeric variable; unset means 0.
fn number_from_env(name: &str) -> u64 {
    match env::var(name) {
        Err(env::VarError::NotPresent) => 0,
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| die(2, format_args!("{name}={value} is not a number"))),
        Err(env::VarError::NotUnicode(_)) => die(2, format_args!("{name} is not a number")),
    }
}

/// Refuses socket-activation variables that were not meant for us.
///
/// Our parent may have been socket-activated itself and leaked its
/// variables to us; using those fds would be a bug, so we are strict.
fn check_activation_env() {
    if let Some(fds) = env::var_os("LISTEN_FDS") {
        let pid = nix::unistd::getpid().to_string();
        // Compare strings, not numbers: "0123" is not our pid 123.
        let listen_pid = env::var("LISTEN_PID").unwrap_or_else(|_| "(unset)".into());
        if listen_pid != pid {
            die(
                EXIT_NOT_FOR_US,
                format_args!("LISTEN_PID={listen_pid} is not my pid {pid}"),
            );
        }
        if fds.to_str().and_then(|n| n.parse::<u32>().ok()).is_none() {
            die(
                EXIT_NOT_FOR_US,
                format_args!("LISTEN_FDS={} is not a number", fds.to_string_lossy()),
            );
        }
    }
    if let Ok(expected) = env::var("HELLO_EXPECT_FDNAMES") {
        let names = env::var("LISTEN_FDNAMES").unwrap_or_else(|_| "(unset)".into());
        if names != expected {
            die(
                EXIT_NOT_FOR_US,
                format_args!("LISTEN_FDNAMES={names} is not HELLO_EXPECT_FDNAMES={expected}"),
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Listeners
// ---------------------------------------------------------------------------

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

enum Connection {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Listener {
    async fn accept(&self) -> io::Result<Connection> {
        Ok(match self {
            Listener::Tcp(l) => Connection::Tcp(l.accept().await?.0),
            Listener::Unix(l) => Connection::Unix(l.accept().await?.0),
        })
    }
}

/// A listener as we took it: open and checked, but not yet registered with
/// the event loop, so connections arriving on it do not wake us.
enum StdListener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

impl StdListener {
    /// Registers the listener with the event loop (epoll), ready to accept.
    /// Only right before serving: from here on every connection arriving on
    /// the socket wakes us, and the socket is shared with the generation
    /// that serves while we boot (issue 13: a booting generation woken
    /// ~8,400 times a second took 820 ms of CPU from it in a 4 s boot).
    fn register(self) -> io::Result<Listener> {
        // tokio requires non-blocking sockets; inherited ones usually are not.
        Ok(match self {
            StdListener::Tcp(listener) => {
                listener.set_nonblocking(true)?;
                Listener::Tcp(TcpListener::from_std(listener)?)
            }
            StdListener::Unix(listener) => {
                listener.set_nonblocking(true)?;
                Listener::Unix(UnixListener::from_std(listener)?)
            }
        })
    }
}

/// Takes the stream listeners baton passed us, or binds `HELLO_ADDR` when
/// we were started without any.
fn take_listeners() -> Vec<StdListener> {
    if env::var_os("LISTEN_FDS").is_none() {
        let addr = env::var("HELLO_ADDR").unwrap_or_else(|_| "127.0.0.1:8080".into());
        let listener = std::net::TcpListener::bind(&addr)
            .unwrap_or_else(|e| die(1, format_args!("cannot bind HELLO_ADDR={addr}: {e}")));
        return vec![StdListener::Tcp(listener)];
    }

    let mut fds = ListenFd::from_env();
    let mut listeners = Vec::new();
    for index in 0..fds.len() {
        if let Some(listener) = take_stream_listener(&mut fds, index) {
            listeners.push(listener);
        }
    }
    if listeners.is_empty() {
        die(EXIT_NOT_FOR_US, "LISTEN_FDS passed no stream listener");
    }
    listeners
}

/// Takes fd `3 + index` if it is a listening TCP or Unix stream socket.
fn take_stream_listener(fds: &mut ListenFd, index: usize) -> Option<StdListener> {
    if let Ok(Some(listener)) = fds.take_tcp_listener(index) {
        if is_listening(&listener) {
            return Some(StdListener::Tcp(listener));
        }
    } else if let Ok(Some(listener)) = fds.take_unix_listener(index) {
        if is_listening(&listener) {
            return Some(StdListener::Unix(listener));
        }
    }
    say!("ignoring fd {}: not a listening stream socket", 3 + index);
    None
}

/// listenfd checks the address family and socket type, not that the socket
/// listens; `accept()` on a connected socket would fail forever.
fn is_listening(socket: &impl AsFd) -> bool {
    getsockopt(socket, sockopt::AcceptConn).unwrap_or(false)
}

/// Accepts connections until the drain begins, then closes the listener.
async fn accept_loop(listener: Listener, app: Arc<App>, mut drain: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            // Drain first: once draining, connections we have not accepted
            // stay in the shared backlog for the next generation.
            biased;
            () = drain_started(&mut drain) => break,
            accepted = listener.accept() => match accepted {
                Ok(Connection::Tcp(s)) => {
                    tokio::spawn(serve_connection(s, app.clone(), drain.clone()));
                }
                Ok(Connection::Unix(s)) => {
                    tokio::spawn(serve_connection(s, app.clone(), drain.clone()));
                }
                Err(e) => {
                    // E.g. out of fds: back off instead of spinning.
                    say!("accept failed: {e}");
                    sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    // Dropping closes only our copy of the fd. Never shutdown() a listener:
    // that would stop the shared socket for baton and the next generation.
    drop(listener);
}

/// Completes once the drain has begun (at once if it already has).
async fn drain_started(drain: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which only happens at exit.
    let _ = drain.wait_for(|&draining| draining).await;
}

// ---------------------------------------------------------------------------
// Signals and readiness
// ---------------------------------------------------------------------------

/// The signals that ask us to drain.
struct DrainSignals {
    term: Signal,
    int: Signal,
}

impl DrainSignals {
    fn install() -> io::Result<DrainSignals> {
        Ok(DrainSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }
}

/// Waits for SIGTERM or SIGINT, logs when it came (`drain-signal at U`)
/// and returns its name. With `ignore`, logs each one and waits forever
/// (the handlers stay installed, so the signals do nothing).
async fn next_drain_signal(signals: &mut DrainSignals, app: &App, ignore: bool) -> &'static str {
    loop {
        let name = tokio::select! {
            _ = signals.term.recv() => "SIGTERM",
            _ = signals.int.recv() => "SIGINT",
        };
        if !ignore {
            // For the benchmark, before anything else: when the signal
            // reached us, by the clock of baton's log (its `Draining` is
            // when baton sent it).
            say!("{app} drain-signal at {}", wall_clock_micros());
            return name;
        }
        say!("HELLO_FAIL=ignore-term: ignoring {name}");
    }
}

/// Sends a state change to the supervisor, if it asked for them; whether
/// it was sent.
fn notify(state: &str) -> bool {
    let Some(path) = env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let sent = UnixDatagram::unbound().and_then(|socket| {
        match path.as_bytes().strip_prefix(b"@") {
            // A leading '@' names a socket in the abstract namespace.
            Some(name) => {
                socket.send_to_addr(state.as_bytes(), &SocketAddr::from_abstract_name(name)?)
            }
            None => socket.send_to(state.as_bytes(), &path),
        }
    });
    match sent {
        Ok(_) => true,
        Err(e) => {
            say!("cannot notify {path:?}: {e}");
            false
        }
    }
}

/// Now by the wall clock (CLOCK_REALTIME), in microseconds since the Unix
/// epoch: the clock of baton's log timestamps (RFC 3339, µs), so our
/// timing lines and its records compare.
fn wall_clock_micros() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_micros())
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

/// Serves requests on one connection until either side wants it closed.
async fn serve_connection<S>(mut stream: S, app: Arc<App>, mut drain: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = Vec::new();
    let mut first = true;
    loop {
        // The first request is always awaited: the client connected to send
        // it. Later ones are optional, so a drain may close an idle
        // connection (after its grace). Bytes already in `buf` are a
        // pipelined request.
        if !first
            && buf.is_empty()
            && !wait_for_request(&mut stream, &mut buf, &mut drain, app.drain_idle_grace).await
        {
            break;
        }
        first = false;

        let head = timeout(HEAD_TIMEOUT, read_head(&mut stream, &mut buf)).await;
        let (status, body, wants_close) = match head {
            Ok(Head::Complete(head)) => match parse_request(&head) {
                Some(request) => {
                    let (status, body) = respond(&request, &app).await;
                    (status, body, request.close)
                }
                None => (400, "bad request\n".to_string(), true),
            },
            Ok(Head::TooLarge) => (400, "request head too large\n".to_string(), true),
            Ok(Head::Closed) | Err(_) => break,
        };
        let close = wants_close || *drain.borrow();
        let response = render(status, &body, app.generation, close);
        if stream.write_all(response.as_bytes()).await.is_err() || close {
            break;
        }
    }
    close_gracefully(stream).await;
}

/// Waits on an idle keep-alive connection for the start of the next
/// request. Returns false if the connection should be closed instead: the
/// client hung up, or the drain began and no request started within
/// `grace` of it.
async fn wait_for_request<S>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    drain: &mut watch::Receiver<bool>,
    grace: Duration,
) -> bool
where
    S: AsyncRead + Unpin,
{
    let mut chunk = [0; 4096];
    let read = {
        // One read throughout: the bytes it waits for are the same before
        // and after the drain began.
        let next = stream.read(&mut chunk);
        tokio::pin!(next);
        tokio::select! {
            // Read first: a request that already arrived when the drain
            // began is served, not dropped.
            biased;
            read = &mut next => read,
            () = drain_started(drain) => {
                // The client cannot know we drain: it may have sent its
                // next request already, or send it any moment. Closing now
                // would race it (its request met by EOF or a reset), so
                // wait a little for it; it then gets `Connection: close`.
                match timeout(grace, &mut next).await {
                    Ok(read) => read,
                    Err(_) => return false,
                }
            }
        }
    };
    match read {
        Ok(n) if n > 0 => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
        _ => false,
    }
}

enum Head {
    /// The request line and headers, without the blank line.
    Complete(Vec<u8>),
    TooLarge,
    /// The client hung up or the connection broke.
    Closed,
}

/// Reads until the blank line ending the request head. Bytes after it stay
/// in `buf` for the next request.
async fn read_head<S>(stream: &mut S, buf: &mut Vec<u8>) -> Head
where
    S: AsyncRead + Unpin,
{
    let mut chunk = [0; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = buf[..end].to_vec();
            buf.drain(..end + 4);
            return Head::Complete(head);
        }
        if buf.len() >= MAX_HEAD {
            return Head::TooLarge;
        }
        match stream.read(&mut chunk).await {
            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return Head::Closed,
        }
    }
}

struct Request {
    target: String,
    /// Whether the connection must be closed after the response.
    close: bool,
}

/// Parses a request head, or returns None if it is malformed.
fn parse_request(head: &[u8]) -> Option<Request> {
    let head = std::str::from_utf8(head).ok()?;
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next()?.split(' ');
    let (_method, target, version) = (
        request_line.next()?,
        request_line.next()?,
        request_line.next()?,
    );
    if request_line.next().is_some() || !version.starts_with("HTTP/1.") {
        return None;
    }

    let mut close = version == "HTTP/1.0"; // HTTP/1.0 closes by default
    for line in lines {
        let (name, value) = line.split_once(':')?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("connection") {
            for option in value.split(',').map(str::trim) {
                if option.eq_ignore_ascii_case("close") {
                    close = true;
                } else if option.eq_ignore_ascii_case("keep-alive") {
                    close = false;
                }
            }
        }
        // We never read bodies, so after one we could not find where the
        // next request starts: answer, then close.
        let has_body = (name.eq_ignore_ascii_case("content-length") && value != "0")
            || name.eq_ignore_ascii_case("transfer-encoding");
        if has_body {
            close = true;
        }
    }
    Some(Request {
        target: target.to_string(),
        close,
    })
}

/// Produces the status and body of the response to a well-formed request.
async fn respond(request: &Request, app: &App) -> (u16, String) {
    let (path, query) = request
        .target
        .split_once('?')
        .unwrap_or((&request.target, ""));
    if path == "/slow" {
        match slow_delay(query) {
            Some(delay) => sleep(delay).await,
            None => return (400, format!("use /slow?ms=N with N <= {MAX_SLOW_MS}\n")),
        }
    }
    if path == "/healthz" {
        if app.wedge.as_ref().is_some_and(|w| w.exists()) {
            std::future::pending::<()>().await;
        }
        match app.health {
            Health::Ok => return (200, "ok\n".into()),
            Health::Fail => return (500, "HELLO_HEALTH=fail\n".into()),
            // Bounded by the client (and the drain): a wedged process.
            Health::Hang => std::future::pending::<()>().await,
        }
    }
    (
        200,
        format!("generation={} pid={}\n", app.generation, app.pid),
    )
}

/// The delay asked for by the query `ms=N`, if valid.
fn slow_delay(query: &str) -> Option<Duration> {
    let ms = query
        .split('&')
        .find_map(|param| param.strip_prefix("ms="))?
        .parse()
        .ok()?;
    (ms <= MAX_SLOW_MS).then(|| Duration::from_millis(ms))
}

fn render(status: u16, body: &str, generation: u64, close: bool) -> String {
    let reason = match status {
        200 => "OK",
        500 => "Internal Server Error",
        _ => "Bad Request",
    };
    let connection = if close { "Connection: close\r\n" } else { "" };
    format!(
        "HTTP/1.1 {status} {reason}\r\n\
         Content-Type: text/plain\r\n\
         Content-Length: {}\r\n\
         X-Generation: {generation}\r\n\
         {connection}\r\n\
         {body}",
        body.len()
    )
}

/// Closes a connection without a TCP reset.
///
/// Closing a socket that still has unread input makes the kernel send a
/// RST, which can destroy our last response before the client reads it. So
/// we send our FIN (shutting down a *connection* is fine, unlike a
/// listener), then read and discard until the client hangs up too.
async fn close_gracefully<S>(mut stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = stream.shutdown().await;
    let mut sink = [0; 4096];
    let discard_until_eof =
        async { while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {} };
    let _ = timeout(LINGER, discard_until_eof).await;
}

/// Prints `hello: <message>` and exits with `code`.
fn die(code: i32, message: impl Display) -> ! {
    say!("{message}");
    std::process::exit(code)
}
