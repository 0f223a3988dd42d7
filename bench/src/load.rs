//! The closed-loop load generator. `fresh` clients send each request on a
//! new connection (`Connection: close`); `keep_alive` clients reuse one
//! connection. Closed loop: a client sends its next request when the last
//! one has finished, so the load follows what the server answers.
//!
//! Every request is bounded by [`REQUEST_TIMEOUT`] and every client by the
//! load's deadline. Results are counted by outcome (ok, refused,
//! reset/closed, timed out, wrong answer, other), latencies of answered
//! requests go into HDR histograms, and every request lands in a 10 ms
//! window of the [`Timeline`], under the generation that answered it.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{self, ErrorKind};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout};

/// No request may take longer; it then counts as timed out.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// After a failure a client waits this long before its next request, as a
/// real client's retry would. The failure count then measures how long an
/// outage lasted, not how fast a refused `connect()` returns.
pub const FAILURE_PAUSE: Duration = Duration::from_millis(10);
/// Width of one window of the timeline.
pub const WINDOW: Duration = Duration::from_millis(10);

const FRESH_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";
const KEEP_ALIVE_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";
/// hello's responses are ~150 bytes; anything much longer is wrong.
const MAX_RESPONSE: u64 = 64 * 1024;
/// How often the heartbeat checks that the bench's own event loop runs.
const HEARTBEAT: Duration = Duration::from_millis(5);
/// Distinct error texts kept for the report.
const MAX_ERROR_KINDS: usize = 20;

/// How many clients of each kind.
#[derive(Debug, Clone, Copy)]
pub struct Mix {
    pub fresh: usize,
    pub keep_alive: usize,
}

/// How a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// `connect()` refused: nobody listened on the port.
    Refused,
    /// The connection was reset or closed before a complete response.
    Reset,
    /// No complete response within [`REQUEST_TIMEOUT`].
    TimedOut,
    /// A complete response, but not `200` with `generation=<n>`.
    Wrong,
    /// Anything else (e.g. no local port left).
    Other,
}

/// A failed request and what the client saw.
struct Failed {
    kind: Failure,
    detail: String,
    /// No byte of the response had arrived.
    before_response: bool,
}

impl Failed {
    fn io(e: io::Error, before_response: bool) -> Failed {
        let kind = match e.kind() {
            ErrorKind::ConnectionRefused => Failure::Refused,
            ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
            | ErrorKind::UnexpectedEof => Failure::Reset,
            _ => Failure::Other,
        };
        Failed {
            kind,
            detail: e.to_string(),
            before_response,
        }
    }

    fn closed(before_response: bool) -> Failed {
        Failed {
            kind: Failure::Reset,
            detail: "connection closed before a complete response".into(),
            before_response,
        }
    }

    fn wrong(detail: String) -> Failed {
        Failed {
            kind: Failure::Wrong,
            detail,
            before_response: false,
        }
    }
}

/// Counts and latencies of one kind of client.
#[derive(Debug, Clone)]
pub struct Stats {
    pub ok: u64,
    pub refused: u64,
    pub reset: u64,
    pub timed_out: u64,
    pub wrong: u64,
    pub other: u64,
    /// Microseconds from the start of a request to its complete response,
    /// answered requests only (a keep-alive retry included).
    pub latency: Histogram<u64>,
}

impl Default for Stats {
    fn default() -> Stats {
        Stats {
            ok: 0,
            refused: 0,
            reset: 0,
            timed_out: 0,
            wrong: 0,
            other: 0,
            // 1 µs to 60 s at 3 significant digits.
            latency: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
        }
    }
}

impl Stats {
    pub fn failed(&self) -> u64 {
        self.refused + self.reset + self.timed_out + self.wrong + self.other
    }

    fn count(&mut self, failure: Failure) {
        match failure {
            Failure::Refused => self.refused += 1,
            Failure::Reset => self.reset += 1,
            Failure::TimedOut => self.timed_out += 1,
            Failure::Wrong => self.wrong += 1,
            Failure::Other => self.other += 1,
        }
    }

    pub fn merge(&mut self, other: &Stats) {
        self.ok += other.ok;
        self.refused += other.refused;
        self.reset += other.reset;
        self.timed_out += other.timed_out;
        self.wrong += other.wrong;
        self.other += other.other;
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
    }
}

/// Requests per [`WINDOW`] since the load's origin.
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    /// Answers per (window, generation that answered).
    pub answered: BTreeMap<(u32, u64), u32>,
    /// Failures per window.
    pub failed: BTreeMap<u32, u32>,
}

impl Timeline {
    fn merge(&mut self, other: &Timeline) {
        for (&key, &n) in &other.answered {
            *self.answered.entry(key).or_default() += n;
        }
        for (&window, &n) in &other.failed {
            *self.failed.entry(window).or_default() += n;
        }
    }

    /// The longest run of consecutive windows in `[from, to)` in which no
    /// request was answered: its first window and its length, if any.
    pub fn longest_silence(&self, from: u32, to: u32) -> Option<(u32, u32)> {
        let mut answered: Vec<u32> = self.answered.keys().map(|&(w, _)| w).collect();
        answered.dedup(); // sorted by window already
        let mut longest: Option<(u32, u32)> = None;
        let mut next = from; // the first window after the last answered one
        let ends = answered
            .into_iter()
            .filter(|&w| w >= from && w < to)
            .chain([to]);
        for w in ends {
            let gap = w - next;
            if gap > 0 && longest.is_none_or(|(_, len)| gap > len) {
                longest = Some((next, gap));
            }
            next = w + 1;
        }
        longest
    }
}

/// Everything a load measured.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub fresh: Stats,
    pub keep_alive: Stats,
    /// Keep-alive requests sent again on a new connection because the
    /// reused one closed before any byte of the response.
    pub retried: u64,
    pub timeline: Timeline,
    /// Error texts and how often each was seen.
    pub errors: BTreeMap<String, u64>,
    /// How long the load ran.
    pub elapsed: Duration,
    /// The longest the load generator itself was held up.
    pub stall: Stall,
}

/// The longest the bench's own event loop was held up (descheduled on a
/// busy machine, or busy itself), and when. No request completes in that
/// time: a silence no longer than this may be the bench's, not the server's.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stall {
    /// Seconds from the load's origin.
    pub at: f64,
    pub late: Duration,
}

impl Tally {
    pub fn ok(&self) -> u64 {
        self.fresh.ok + self.keep_alive.ok
    }

    pub fn failed(&self) -> u64 {
        self.fresh.failed() + self.keep_alive.failed()
    }

    /// Both kinds of client together.
    pub fn all(&self) -> Stats {
        let mut all = self.fresh.clone();
        all.merge(&self.keep_alive);
        all
    }

    /// Adds `other`'s counts; `elapsed` is left to the caller.
    pub fn merge(&mut self, other: &Tally) {
        self.fresh.merge(&other.fresh);
        self.keep_alive.merge(&other.keep_alive);
        self.retried += other.retried;
        self.timeline.merge(&other.timeline);
        if other.stall.late > self.stall.late {
            self.stall = other.stall;
        }
        for (error, n) in &other.errors {
            if self.errors.len() < MAX_ERROR_KINDS || self.errors.contains_key(error) {
                *self.errors.entry(error.clone()).or_default() += n;
            }
        }
    }

    fn record(&mut self, kind: Kind, result: Result<u64, Failed>, began: Instant, origin: Instant) {
        let window = window_of(origin, Instant::now());
        let stats = match kind {
            Kind::Fresh => &mut self.fresh,
            Kind::KeepAlive => &mut self.keep_alive,
        };
        match result {
            Ok(generation) => {
                stats.ok += 1;
                stats.latency.saturating_record(micros(began.elapsed()));
                *self
                    .timeline
                    .answered
                    .entry((window, generation))
                    .or_default() += 1;
            }
            Err(failed) => {
                stats.count(failed.kind);
                *self.timeline.failed.entry(window).or_default() += 1;
                if self.errors.len() < MAX_ERROR_KINDS || self.errors.contains_key(&failed.detail) {
                    *self.errors.entry(failed.detail).or_default() += 1;
                }
            }
        }
    }
}

/// The window `at` falls in, counted from `origin`.
pub fn window_of(origin: Instant, at: Instant) -> u32 {
    let ms = at.saturating_duration_since(origin).as_millis();
    u32::try_from(ms / WINDOW.as_millis()).unwrap_or(u32::MAX)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Fresh,
    KeepAlive,
}

/// A running load. Dropping it tells the clients to stop.
pub struct Load {
    stop: Arc<AtomicBool>,
    clients: Vec<JoinHandle<Tally>>,
    heartbeat: Option<JoinHandle<Stall>>,
    started: Instant,
}

impl Load {
    /// Starts the clients against `target`. Windows count from `origin`;
    /// the clients stop by themselves after `limit`.
    pub fn start(target: SocketAddr, mix: Mix, origin: Instant, limit: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let deadline = Instant::now() + limit;
        let kinds = std::iter::repeat_n(Kind::Fresh, mix.fresh)
            .chain(std::iter::repeat_n(Kind::KeepAlive, mix.keep_alive));
        let clients = kinds
            .map(|kind| tokio::spawn(client(kind, target, origin, deadline, stop.clone())))
            .collect();
        let heartbeat = tokio::spawn(heartbeat(origin, deadline, stop.clone()));
        Load {
            stop,
            clients,
            heartbeat: Some(heartbeat),
            started: Instant::now(),
        }
    }

    /// Stops the clients (each finishes its request in flight) and adds up
    /// what they measured.
    pub async fn stop(mut self) -> crate::Result<Tally> {
        let elapsed = self.started.elapsed();
        self.stop.store(true, Ordering::Relaxed);
        let mut total = Tally::default();
        let lost = |e| crate::Error::Bench(format!("a load client was lost: {e}"));
        for client in std::mem::take(&mut self.clients) {
            total.merge(&client.await.map_err(lost)?);
        }
        if let Some(heartbeat) = self.heartbeat.take() {
            total.stall = heartbeat.await.map_err(lost)?;
        }
        total.elapsed = elapsed;
        Ok(total)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One client's closed loop, until told to stop or past its deadline.
async fn client(
    kind: Kind,
    target: SocketAddr,
    origin: Instant,
    deadline: Instant,
    stop: Arc<AtomicBool>,
) -> Tally {
    let mut tally = Tally::default();
    let mut connection = None;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let began = Instant::now();
        let result = match kind {
            Kind::Fresh => bounded(fresh_request(target)).await,
            Kind::KeepAlive => {
                keep_alive_request(target, &mut connection, &mut tally.retried).await
            }
        };
        let failed = result.is_err();
        tally.record(kind, result, began, origin);
        if failed {
            sleep(FAILURE_PAUSE).await;
        }
    }
    tally
}

/// Wakes up every [`HEARTBEAT`] and notes how late it woke.
async fn heartbeat(origin: Instant, deadline: Instant, stop: Arc<AtomicBool>) -> Stall {
    let mut worst = Stall::default();
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let due = Instant::now() + HEARTBEAT;
        tokio::time::sleep_until(due.into()).await;
        let late = Instant::now().saturating_duration_since(due);
        if late > worst.late {
            let at = due.saturating_duration_since(origin).as_secs_f64();
            worst = Stall { at, late };
        }
    }
    worst
}

/// One GET on a fresh connection, for checks outside a load: the
/// generation that answered, or why not.
pub async fn probe(target: SocketAddr) -> Result<u64, String> {
    bounded(fresh_request(target)).await.map_err(|f| f.detail)
}

async fn bounded(request: impl Future<Output = Result<u64, Failed>>) -> Result<u64, Failed> {
    timeout(REQUEST_TIMEOUT, request).await.unwrap_or_else(|_| {
        Err(Failed {
            kind: Failure::TimedOut,
            detail: format!("no complete response within {REQUEST_TIMEOUT:?}"),
            before_response: false,
        })
    })
}

/// One GET with `Connection: close`: the generation that answered.
async fn fresh_request(target: SocketAddr) -> Result<u64, Failed> {
    let mut stream = TcpStream::connect(target)
        .await
        .map_err(|e| Failed::io(e, true))?;
    stream
        .write_all(FRESH_REQUEST)
        .await
        .map_err(|e| Failed::io(e, true))?;
    let mut response = Vec::with_capacity(256);
    let read = (&mut stream)
        .take(MAX_RESPONSE)
        .read_to_end(&mut response)
        .await;
    read.map_err(|e| Failed::io(e, response.is_empty()))?;
    if response.is_empty() {
        return Err(Failed::closed(true));
    }
    let text = String::from_utf8_lossy(&response);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Err(Failed::closed(false));
    };
    generation_of(head.lines().next().unwrap_or(""), body)
}

/// A kept-alive connection.
type Connection = BufReader<TcpStream>;

/// One GET on the kept-alive connection, opening one if there is none.
///
/// Like real HTTP clients, an idempotent request is sent again, once, on a
/// new connection when a *reused* connection closed before any byte of the
/// response: the server may close an idle connection just as the request
/// goes out (hello closes idle connections when it drains).
async fn keep_alive_request(
    target: SocketAddr,
    connection: &mut Option<Connection>,
    retried: &mut u64,
) -> Result<u64, Failed> {
    let reused = connection.is_some();
    let mut result = bounded(exchange(target, connection)).await;
    if let Err(failed) = &result {
        if reused && failed.before_response && failed.kind == Failure::Reset {
            *retried += 1;
            *connection = None;
            result = bounded(exchange(target, connection)).await;
        }
    }
    if result.is_err() {
        *connection = None;
    }
    result
}

/// Sends one request on `connection` (connecting first if it is `None`)
/// and reads the response; leaves `None` when the server closes after it.
async fn exchange(target: SocketAddr, connection: &mut Option<Connection>) -> Result<u64, Failed> {
    let reader = match connection {
        Some(reader) => reader,
        None => {
            let stream = TcpStream::connect(target)
                .await
                .map_err(|e| Failed::io(e, true))?;
            connection.insert(BufReader::new(stream))
        }
    };
    reader
        .get_mut()
        .write_all(KEEP_ALIVE_REQUEST)
        .await
        .map_err(|e| Failed::io(e, true))?;
    let head = read_head(reader).await?;
    if head.body_length > MAX_RESPONSE as usize {
        return Err(Failed::wrong(format!("body of {} bytes", head.body_length)));
    }
    let mut body = vec![0; head.body_length];
    reader
        .read_exact(&mut body)
        .await
        .map_err(|e| Failed::io(e, false))?;
    if head.close {
        *connection = None;
    }
    generation_of(&head.status_line, &String::from_utf8_lossy(&body))
}

struct Head {
    status_line: String,
    body_length: usize,
    /// The server closes the connection after this response.
    close: bool,
}

/// Reads a response head up to its blank line.
async fn read_head(reader: &mut Connection) -> Result<Head, Failed> {
    let mut head = Head {
        status_line: String::new(),
        body_length: 0,
        close: false,
    };
    let mut first = true;
    // Bounded by the request timeout around us, and by this line count.
    for _ in 0..64 {
        let mut line = String::new();
        let read = reader.read_line(&mut line).await;
        if read.map_err(|e| Failed::io(e, first))? == 0 {
            return Err(Failed::closed(first));
        }
        let line = line.trim_end();
        if first {
            head.status_line = line.to_owned();
            first = false;
            continue;
        }
        if line.is_empty() {
            return Ok(head);
        }
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            head.body_length = value
                .parse()
                .map_err(|_| Failed::wrong(format!("bad Content-Length: {value:?}")))?;
        } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close") {
            head.close = true;
        }
    }
    Err(Failed::wrong("response head too long".into()))
}

/// hello answers `200` with the body `generation=<G> pid=<P>`.
fn generation_of(status_line: &str, body: &str) -> Result<u64, Failed> {
    if !status_line.starts_with("HTTP/1.1 200 ") {
        return Err(Failed::wrong(format!("status line {status_line:?}")));
    }
    body.strip_prefix("generation=")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|g| g.parse().ok())
        .ok_or_else(|| Failed::wrong(format!("body {body:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_silence_counts_empty_windows_between_answers() {
        let mut t = Timeline::default();
        for w in [0, 1, 5, 6, 9] {
            t.answered.insert((w, 1), 3);
        }
        // Empty: 2, 3, 4 (3 windows), 7, 8, then 10.. at the end.
        assert_eq!(t.longest_silence(0, 10), Some((2, 3)));
        assert_eq!(t.longest_silence(0, 15), Some((10, 5)));
        assert_eq!(t.longest_silence(5, 7), None);
        assert_eq!(Timeline::default().longest_silence(0, 4), Some((0, 4)));
    }

    #[test]
    fn answers_are_parsed_and_others_are_wrong() {
        assert_eq!(
            generation_of("HTTP/1.1 200 OK", "generation=7 pid=12\n").ok(),
            Some(7)
        );
        let wrong = generation_of("HTTP/1.1 503 Busy", "generation=7").unwrap_err();
        assert_eq!(wrong.kind, Failure::Wrong);
        let wrong = generation_of("HTTP/1.1 200 OK", "hello").unwrap_err();
        assert_eq!(wrong.kind, Failure::Wrong);
    }
}
