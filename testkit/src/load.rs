//! The HTTP load generator, closed- or open-loop, and single requests.
//!
//! `fresh` clients send each request on a new connection (`Connection:
//! close`); `keep_alive` clients reuse one connection. [`Pace::Closed`]: a
//! client sends its next request when the last one has finished, so the
//! load follows what the server answers (and an outage shows as a few slow
//! requests). [`Pace::Open`]: requests go out on a fixed schedule (as wrk2
//! sends them), and a request's latency counts from when it was *due*, so a
//! stall shows in full in the latencies (no coordinated omission).
//!
//! Every failure counts. A keep-alive request that fails on a reused
//! connection is a failure; the client then sends it again, once, on a new
//! connection, as HTTP clients retry idempotent requests (RFC 9112
//! §9.3.1): that retry is a request of its own, and [`Tally::retried`] and
//! [`Tally::recovered`] say how many there were and how many got an answer
//! (what a client that retries would not have seen fail).
//!
//! A load runs on a thread of its own (a current-thread tokio runtime, all
//! clients as tasks), apart from whatever drives the deploys, and pinned to
//! the last CPU it may use when there are several: a busy orchestration
//! never holds the clients up, and the heartbeat measures only the load's
//! own event loop.
//!
//! Every request is bounded by [`Spec::request_timeout`] and every client
//! by the load's deadline. Results are counted by outcome (ok, refused,
//! reset/closed, timed out, wrong answer, other), latencies of answered
//! requests go into HDR histograms, and every request lands in a
//! [`WINDOW`] of the [`Timeline`], under the generation that answered it.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::io::{self, ErrorKind};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::{sleep, timeout};

/// Width of one window of the timeline.
pub const WINDOW: Duration = Duration::from_millis(10);

const FRESH_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: load\r\nConnection: close\r\n\r\n";
const KEEP_ALIVE_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: load\r\n\r\n";
/// hello's responses are ~150 bytes; anything much longer is wrong.
const MAX_RESPONSE: u64 = 64 * 1024;
/// How often the heartbeat checks that the load's own event loop runs.
const HEARTBEAT: Duration = Duration::from_millis(5);
/// Distinct error texts kept for the report.
const MAX_ERROR_KINDS: usize = 20;

/// What a load does.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub mix: Mix,
    /// No request may take longer; it then counts as timed out.
    pub request_timeout: Duration,
    /// After a failure a client waits this long before its next request,
    /// as a real client's retry would. The failure count then measures how
    /// long an outage lasted, not how fast a refused `connect()` returns.
    pub failure_pause: Duration,
    /// The clients stop by themselves this long after the start, in case
    /// nobody stops them.
    pub limit: Duration,
    pub pace: Pace,
}

/// When clients send.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// Each client sends its next request when the last one finished.
    Closed,
    /// `rate` requests a second in all, spread evenly over the clients,
    /// each on its own fixed schedule; a request's latency counts from its
    /// due time. A fresh-connection client sends each request when due,
    /// even while earlier ones wait for an answer; a keep-alive client
    /// (one connection, one request at a time) behind its schedule sends
    /// at once. No pause after a failure either.
    Open { rate: f64 },
}

impl Default for Spec {
    /// The integration tests' load: 16 fresh-connection clients and 8
    /// keep-alive clients, closed loop, 10 s per request, at most two
    /// minutes.
    fn default() -> Spec {
        Spec {
            mix: Mix {
                fresh: 16,
                keep_alive: 8,
            },
            request_timeout: Duration::from_secs(10),
            failure_pause: Duration::from_millis(10),
            limit: Duration::from_secs(120),
            pace: Pace::Closed,
        }
    }
}

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
    /// No complete response within [`Spec::request_timeout`].
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
    /// Microseconds from the start of a request (open loop: from when it
    /// was due) to its complete response, answered requests only.
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
    /// reused one closed before any byte of the response (each such first
    /// attempt is counted as failed).
    pub retried: u64,
    /// Of those, the retries that got an answer.
    pub recovered: u64,
    pub timeline: Timeline,
    /// When each generation's first answer arrived.
    pub first_answer: BTreeMap<u64, Instant>,
    /// Error texts and how often each was seen.
    pub errors: BTreeMap<String, u64>,
    /// How long the load ran.
    pub elapsed: Duration,
    /// The longest the load generator itself was held up.
    pub stall: Stall,
    /// The CPU the load's thread was pinned to, if it was.
    pub pinned: Option<usize>,
}

/// The longest the load's own event loop was held up (descheduled on a
/// busy machine), and when. No request completes in that time: a silence
/// no longer than this may be the load generator's, not the server's.
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

    /// The failures a client would have seen that retries a request once
    /// when a reused keep-alive connection closed under it.
    pub fn failed_after_retry(&self) -> u64 {
        self.failed().saturating_sub(self.recovered)
    }

    /// Answers per generation that gave them.
    pub fn by_generation(&self) -> BTreeMap<u64, u64> {
        let mut answers = BTreeMap::new();
        for (&(_, generation), &n) in &self.timeline.answered {
            *answers.entry(generation).or_default() += u64::from(n);
        }
        answers
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
        self.recovered += other.recovered;
        self.timeline.merge(&other.timeline);
        for (&generation, &at) in &other.first_answer {
            let first = self.first_answer.entry(generation).or_insert(at);
            *first = (*first).min(at);
        }
        if other.stall.late > self.stall.late {
            self.stall = other.stall;
        }
        self.pinned = self.pinned.or(other.pinned);
        for (error, n) in &other.errors {
            if self.errors.len() < MAX_ERROR_KINDS || self.errors.contains_key(error) {
                *self.errors.entry(error.clone()).or_default() += n;
            }
        }
    }

    /// Counts one request that began (or was due) at `began`.
    fn record(&mut self, kind: Kind, result: Result<u64, Failed>, began: Instant, origin: Instant) {
        self.record_at(kind, result, began, Instant::now(), origin);
    }

    /// Counts one request that began (or was due) at `began` and ended at
    /// `now`.
    fn record_at(
        &mut self,
        kind: Kind,
        result: Result<u64, Failed>,
        began: Instant,
        now: Instant,
        origin: Instant,
    ) {
        let window = window_of(origin, now);
        let stats = match kind {
            Kind::Fresh => &mut self.fresh,
            Kind::KeepAlive => &mut self.keep_alive,
        };
        match result {
            Ok(generation) => {
                stats.ok += 1;
                stats
                    .latency
                    .saturating_record(micros(now.saturating_duration_since(began)));
                *self
                    .timeline
                    .answered
                    .entry((window, generation))
                    .or_default() += 1;
                self.first_answer.entry(generation).or_insert(now);
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

/// One line for a test's output: counts, and the first errors seen.
impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let all = self.all();
        write!(
            f,
            "{} answered {:?}, {} failed (refused {}, reset {}, timed out {}, wrong {}, \
             other {}), {} keep-alive retries ({} answered) in {:.1} s",
            self.ok(),
            self.by_generation(),
            self.failed(),
            all.refused,
            all.reset,
            all.timed_out,
            all.wrong,
            all.other,
            self.retried,
            self.recovered,
            self.elapsed.as_secs_f64()
        )?;
        if !self.errors.is_empty() {
            write!(f, "; errors: {:?}", self.errors)?;
        }
        Ok(())
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

/// A running load on its own thread. Dropping it stops the clients and
/// waits for them (each finishes its request in flight).
pub struct Load {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Tally>>,
    started: Instant,
}

impl Load {
    /// Starts the clients against `target` and returns once they run.
    /// Windows count from `origin`; the clients stop by themselves after
    /// `spec.limit`.
    pub fn start(target: SocketAddr, origin: Instant, spec: Spec) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let deadline = Instant::now() + spec.limit;
        let flag = stop.clone();
        let (running, started) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("load".into())
            .spawn(move || {
                let pinned = pin_to_last_cpu();
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a tokio runtime for the load");
                let mut tally =
                    runtime.block_on(run(target, spec, origin, deadline, flag, running));
                tally.pinned = pinned;
                tally
            })
            .expect("a thread for the load");
        // Bounded: the thread reports at once, or has panicked (then its
        // sender is gone) and `stop` says so.
        let _ = started.recv_timeout(Duration::from_secs(10));
        Load {
            stop,
            thread: Some(thread),
            started: Instant::now(),
        }
    }

    /// Stops the clients and adds up what they measured.
    pub fn stop(mut self) -> Tally {
        let elapsed = self.started.elapsed();
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take().expect("stopped once");
        let mut tally = thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        tally.elapsed = elapsed;
        tally
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Pins the calling thread to the highest-numbered CPU it may run on, when
/// it may run on more than one; that CPU.
fn pin_to_last_cpu() -> Option<usize> {
    use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
    let me = nix::unistd::Pid::from_raw(0);
    let allowed = sched_getaffinity(me).ok()?;
    let cpus: Vec<usize> = (0..CpuSet::count())
        .filter(|&c| allowed.is_set(c).unwrap_or(false))
        .collect();
    let &last = cpus.last().filter(|_| cpus.len() > 1)?;
    let mut only = CpuSet::new();
    only.set(last).ok()?;
    sched_setaffinity(me, &only).ok()?;
    Some(last)
}

/// Every client and the heartbeat, on the load's runtime.
async fn run(
    target: SocketAddr,
    spec: Spec,
    origin: Instant,
    deadline: Instant,
    stop: Arc<AtomicBool>,
    running: std::sync::mpsc::Sender<()>,
) -> Tally {
    let kinds = std::iter::repeat_n(Kind::Fresh, spec.mix.fresh)
        .chain(std::iter::repeat_n(Kind::KeepAlive, spec.mix.keep_alive));
    let count = spec.mix.fresh + spec.mix.keep_alive;
    let start = Instant::now();
    let clients: Vec<_> = kinds
        .enumerate()
        .map(|(i, kind)| {
            let schedule = Schedule::new(spec.pace, start, i, count);
            let client = client(kind, target, spec, schedule, origin, deadline, stop.clone());
            tokio::spawn(client)
        })
        .collect();
    let heartbeat = tokio::spawn(heartbeat(origin, deadline, stop));
    let _ = running.send(());
    let mut total = Tally::default();
    for client in clients {
        match client.await {
            Ok(tally) => total.merge(&tally),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
    match heartbeat.await {
        Ok(stall) => total.stall = stall,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
    total
}

/// When one client's requests are due (open loop only).
struct Schedule {
    /// The next request's due time, and the time between two.
    next: Instant,
    interval: Duration,
}

impl Schedule {
    /// Client `i` of `count`: its share of the rate, its first request
    /// offset by its place, so the clients do not send in lockstep.
    fn new(pace: Pace, start: Instant, i: usize, count: usize) -> Option<Schedule> {
        let Pace::Open { rate } = pace else {
            return None;
        };
        let interval = Duration::from_secs_f64(count as f64 / rate.max(f64::MIN_POSITIVE));
        let offset = interval.mul_f64(i as f64 / count.max(1) as f64);
        Some(Schedule {
            next: start + offset,
            interval,
        })
    }

    /// Waits until the next request is due (not at all when behind) and
    /// returns its due time.
    async fn due(&mut self) -> Instant {
        let due = self.next;
        self.next += self.interval;
        tokio::time::sleep_until(due.into()).await;
        due
    }
}

/// One client's loop, until told to stop or past its deadline.
async fn client(
    kind: Kind,
    target: SocketAddr,
    spec: Spec,
    mut schedule: Option<Schedule>,
    origin: Instant,
    deadline: Instant,
    stop: Arc<AtomicBool>,
) -> Tally {
    let mut tally = Tally::default();
    let mut connection = None;
    let limit = spec.request_timeout;
    if let (Kind::Fresh, Some(schedule)) = (kind, schedule.as_mut()) {
        return open_fresh(target, limit, schedule, origin, deadline, stop).await;
    }
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let began = match schedule.as_mut() {
            Some(schedule) => schedule.due().await,
            None => Instant::now(),
        };
        let failed = match kind {
            Kind::Fresh => {
                let result = bounded(limit, fresh_request(target)).await;
                let failed = result.is_err();
                tally.record(kind, result, began, origin);
                failed
            }
            Kind::KeepAlive => {
                keep_alive_request(target, limit, &mut connection, &mut tally, began, origin).await
            }
        };
        if failed && schedule.is_none() {
            sleep(spec.failure_pause).await;
        }
    }
    tally
}

/// Requests a fresh-connection client may have in flight in open loop.
const OPEN_IN_FLIGHT: usize = 64;

/// An open-loop fresh-connection client: each request goes out when it is
/// due, on its own connection, whether or not the last one has been
/// answered (up to [`OPEN_IN_FLIGHT`] at once; past that, it waits, and the
/// wait counts in the latency). A stall of the server shows in full, and a
/// slow answer does not delay the requests after it.
async fn open_fresh(
    target: SocketAddr,
    limit: Duration,
    schedule: &mut Schedule,
    origin: Instant,
    deadline: Instant,
    stop: Arc<AtomicBool>,
) -> Tally {
    let mut tally = Tally::default();
    let mut in_flight = tokio::task::JoinSet::new();
    let count = |tally: &mut Tally, done: Result<(Result<u64, Failed>, Instant, Instant), _>| {
        if let Ok((result, due, ended)) = done {
            tally.record_at(Kind::Fresh, result, due, ended, origin);
        }
    };
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        while let Some(done) = in_flight.try_join_next() {
            count(&mut tally, done);
        }
        if in_flight.len() >= OPEN_IN_FLIGHT {
            if let Some(done) = in_flight.join_next().await {
                count(&mut tally, done);
            }
            continue;
        }
        let due = schedule.due().await;
        in_flight.spawn(async move {
            let result = bounded(limit, fresh_request(target)).await;
            (result, due, Instant::now())
        });
    }
    while let Some(done) = in_flight.join_next().await {
        count(&mut tally, done);
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

/// One GET on a fresh connection, outside a load: the generation that
/// answered, or why not. Blocks for at most `limit`.
pub fn probe(target: SocketAddr, limit: Duration) -> Result<u64, String> {
    block_on(bounded(limit, fresh_request(target))).map_err(|f| f.detail)
}

/// [`probe`] over a unix socket listener.
pub fn probe_unix(path: &Path, limit: Duration) -> Result<u64, String> {
    let request = async {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| Failed::io(e, true))?;
        get(stream).await
    };
    block_on(bounded(limit, request)).map_err(|f| f.detail)
}

/// Runs one request to completion on a runtime of its own.
fn block_on<T>(request: impl Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime for a request")
        .block_on(request)
}

async fn bounded(
    limit: Duration,
    request: impl Future<Output = Result<u64, Failed>>,
) -> Result<u64, Failed> {
    timeout(limit, request).await.unwrap_or_else(|_| {
        Err(Failed {
            kind: Failure::TimedOut,
            detail: format!("no complete response within {limit:?}"),
            before_response: false,
        })
    })
}

/// One GET with `Connection: close`: the generation that answered.
async fn fresh_request(target: SocketAddr) -> Result<u64, Failed> {
    let stream = TcpStream::connect(target)
        .await
        .map_err(|e| Failed::io(e, true))?;
    get(stream).await
}

/// One GET with `Connection: close` on a connected stream.
async fn get(mut stream: impl AsyncRead + AsyncWrite + Unpin) -> Result<u64, Failed> {
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

/// One GET on the kept-alive connection, opening one if there is none;
/// counts it in `tally`. Returns whether it failed in the end.
///
/// Like real HTTP clients, an idempotent request is sent again, once, on a
/// new connection when a *reused* connection closed before any byte of the
/// response: the server may close an idle connection just as the request
/// goes out. The first attempt is counted as a failure all the same; the
/// retry is a request of its own ([`Tally::retried`], [`Tally::recovered`]).
async fn keep_alive_request(
    target: SocketAddr,
    limit: Duration,
    connection: &mut Option<Connection>,
    tally: &mut Tally,
    began: Instant,
    origin: Instant,
) -> bool {
    let reused = connection.is_some();
    let mut result = bounded(limit, exchange(target, connection)).await;
    let retry = match &result {
        Err(failed) => reused && failed.before_response && failed.kind == Failure::Reset,
        Ok(_) => false,
    };
    if retry {
        *connection = None;
        tally.record(Kind::KeepAlive, result, began, origin);
        tally.retried += 1;
        result = bounded(limit, exchange(target, connection)).await;
        if result.is_ok() {
            tally.recovered += 1;
        }
    }
    let failed = result.is_err();
    if failed {
        *connection = None;
    }
    tally.record(Kind::KeepAlive, result, began, origin);
    failed
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
