//! wrk, a third-party load generator, as a cross-check of the kit's own:
//! while deploys run, wrk hammers the address, and the failures it counts
//! are reported beside ours. If both say zero, it is not our client that is
//! blind.
//!
//! What wrk counts, from its source (wrk 4.1, `src/wrk.c`,
//! <https://github.com/wg/wrk/blob/4.1.0/src/wrk.c>), so the figures are
//! read right:
//!
//! - It runs whole seconds (`-d` and `--timeout` take no fractions):
//!   [`WrkSpec`]'s durations are rounded up, to at least 1 s.
//! - It must connect once before it starts: nothing listening at
//!   [`WrkRun::start`] makes it exit 1 ("unable to connect"), which
//!   [`WrkRun::finish`] reports as an error. Later refusals are counted.
//! - A "timeout" is a response slower than `--timeout`; such a response is
//!   left out of the latencies. A request still unanswered when the run
//!   ends is counted nowhere.
//! - "Non-2xx or 3xx responses" counts statuses above 399 only.
//! - Each thread gets `connections / threads` connections, so the spec
//!   must divide evenly.
//! - Latencies are after wrk's correction for coordinated omission
//!   (`stats_correct`): a stall adds the samples a steady client would
//!   have seen.

use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use baton_testkit::{eventually, procs, Context};

use crate::{Error, Result};

/// How long [`WrkRun::finish`] waits beyond the run's duration before it
/// kills wrk.
const SLACK: Duration = Duration::from_secs(30);

/// wrk's path if it is installed (on PATH), else None.
pub fn find() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("wrk"))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
}

/// How a wrk pass runs.
#[derive(Debug, Clone)]
pub struct WrkSpec {
    /// Open connections in all; a multiple of `threads`.
    pub connections: usize,
    /// wrk's threads, at least 1.
    pub threads: usize,
    /// How long wrk sends requests; rounded up to whole seconds.
    pub duration: Duration,
    /// False: every request carries `Connection: close`, so each one opens a
    /// connection of its own (as the kit's fresh-connection clients do).
    pub keep_alive: bool,
    /// A response slower than this is a timeout; rounded up to whole seconds.
    pub timeout: Duration,
}

/// A running wrk child process (killed and reaped on drop if not finished).
pub struct WrkRun {
    child: Child,
    pid: i32,
    keep_alive: bool,
    /// The run's duration plus [`SLACK`], from the start.
    limit: Duration,
    deadline: Instant,
    /// Everything wrk printed, one message per stream at its end.
    output: Receiver<(Stream, std::io::Result<String>)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Stdout,
    Stderr,
}

impl WrkRun {
    /// Starts `wrk` against http://ADDRESS/ ; with keep_alive == false every
    /// request carries `Connection: close` (-H).
    ///
    /// Refuses an address that is not loopback (the bench's traffic stays on
    /// this machine) and a spec wrk would silently alter. Something must be
    /// listening at `address` now (see the module doc).
    pub fn start(wrk: &Path, address: SocketAddr, spec: &WrkSpec) -> Result<WrkRun> {
        if !address.ip().is_loopback() {
            return Err(Error::Bench(format!(
                "wrk: {address} is not a loopback address"
            )));
        }
        if spec.threads == 0 || spec.connections < spec.threads {
            return Err(Error::Bench(format!(
                "wrk: {} connections on {} threads: each thread needs at least one",
                spec.connections, spec.threads
            )));
        }
        if spec.connections % spec.threads != 0 {
            // wrk would open connections / threads per thread and print
            // the number asked for.
            return Err(Error::Bench(format!(
                "wrk: {} connections do not divide among {} threads",
                spec.connections, spec.threads
            )));
        }
        let seconds = whole_seconds(spec.duration);
        let mut command = Command::new(wrk);
        command
            .arg("--connections")
            .arg(spec.connections.to_string())
            .arg("--threads")
            .arg(spec.threads.to_string())
            .arg("--duration")
            .arg(format!("{seconds}s"))
            .arg("--timeout")
            .arg(format!("{}s", whole_seconds(spec.timeout)))
            .arg("--latency");
        if !spec.keep_alive {
            command.arg("--header").arg("Connection: close");
        }
        command
            .arg(format!("http://{address}/"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Its own process group, registered with the kit: should the bench
        // abort, `kill_started` stops it too.
        let (mut child, pid) = procs::spawn(&mut command, "wrk")?;
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let (tx, output) = mpsc::channel();
        let limit = Duration::from_secs(seconds) + SLACK;
        // From here on, Drop kills wrk whatever fails.
        let run = WrkRun {
            child,
            pid,
            keep_alive: spec.keep_alive,
            limit,
            deadline: Instant::now() + limit,
            output,
        };
        // A thread per pipe: wrk blocks if a pipe it writes fills up.
        if let Some(pipe) = stdout {
            read_all(pipe, Stream::Stdout, tx.clone())?;
        }
        if let Some(pipe) = stderr {
            read_all(pipe, Stream::Stderr, tx)?;
        }
        Ok(run)
    }

    /// Waits for wrk to finish (bounded: spec.duration + a slack of 30 s,
    /// then it is killed and that is an error) and parses what it printed.
    ///
    /// wrk exiting non-zero (nothing listening at the start, a bad
    /// argument) is an error carrying what it wrote on stderr.
    pub fn finish(mut self) -> Result<WrkResult> {
        let (mut stdout, mut stderr) = (None, None);
        while stdout.is_none() || stderr.is_none() {
            let left = self.deadline.saturating_duration_since(Instant::now());
            match self.output.recv_timeout(left) {
                Ok((stream, text)) => {
                    let text = text.context(|| format!("cannot read wrk's {stream:?}"))?;
                    match stream {
                        Stream::Stdout => stdout = Some(text),
                        Stream::Stderr => stderr = Some(text),
                    }
                }
                Err(RecvTimeoutError::Timeout) => return Err(self.kill("did not finish")),
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(self.kill("lost its output (a reader thread died)"))
                }
            }
        }
        // Both pipes closed: wrk has exited, or is about to.
        let left = self.deadline.saturating_duration_since(Instant::now());
        let mut exit: Option<std::io::Result<ExitStatus>> = None;
        eventually(left.max(Duration::from_secs(1)), || {
            exit = self.child.try_wait().transpose();
            exit.is_some()
        });
        let status = match exit {
            Some(status) => status.context(|| format!("cannot wait for wrk (pid {})", self.pid))?,
            None => return Err(self.kill("closed its output but did not exit")),
        };
        if !status.success() {
            return Err(Error::Bench(format!(
                "wrk (pid {}) exited with {status}: {}",
                self.pid,
                stderr.unwrap_or_default().trim()
            )));
        }
        parse(&stdout.unwrap_or_default(), self.keep_alive)
    }

    /// Kills and reaps wrk; the error says why, naming its pid.
    fn kill(&mut self, why: &str) -> Error {
        let _ = self.child.kill();
        let _ = self.child.wait();
        Error::Bench(format!(
            "wrk (pid {}) {why} within {:?} (its run plus {:?}); killed",
            self.pid, self.limit, SLACK
        ))
    }
}

impl Drop for WrkRun {
    fn drop(&mut self) {
        // Reaped already (finish) or exited: nothing to kill, and the pid,
        // not yet reaped otherwise, cannot have been reused.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        procs::unregister(self.pid);
    }
}

/// Reads `pipe` to its end on a thread of its own and sends what it held.
fn read_all(
    mut pipe: impl Read + Send + 'static,
    stream: Stream,
    tx: Sender<(Stream, std::io::Result<String>)>,
) -> Result<()> {
    std::thread::Builder::new()
        .name(format!("wrk-{stream:?}").to_lowercase())
        .spawn(move || {
            let mut bytes = Vec::new();
            let text = pipe
                .read_to_end(&mut bytes)
                .map(|_| String::from_utf8_lossy(&bytes).into_owned());
            // The receiver is gone only if the run was dropped.
            let _ = tx.send((stream, text));
        })
        .context(|| "cannot start a thread reading wrk's output")?;
    Ok(())
}

/// `duration` in whole seconds, rounded up, at least 1: what wrk takes.
fn whole_seconds(duration: Duration) -> u64 {
    let seconds = duration.as_secs() + u64::from(duration.subsec_nanos() > 0);
    seconds.max(1)
}

/// What wrk reported.
#[derive(Debug, Clone, Default)]
pub struct WrkResult {
    /// Responses received (any status, timeouts included).
    pub requests: u64,
    /// How long the run took, as wrk measured it.
    pub seconds: f64,
    pub connect_errors: u64,
    /// Connections that broke or closed before a whole response.
    pub read_errors: u64,
    pub write_errors: u64,
    /// Responses slower than the spec's timeout.
    pub timeouts: u64,
    /// Responses with a status above 399 (wrk's "Non-2xx or 3xx").
    pub non_2xx: u64,
    /// Latencies; None when wrk recorded none (every response timed out,
    /// or there was none).
    pub p50: Option<Duration>,
    pub p99: Option<Duration>,
    pub max: Option<Duration>,
    /// Whether the connections were kept alive (the spec's, for the report).
    pub keep_alive: bool,
}

impl WrkResult {
    /// Every failure wrk saw: socket errors of all kinds plus error statuses.
    pub fn errors(&self) -> u64 {
        self.connect_errors + self.read_errors + self.write_errors + self.timeouts + self.non_2xx
    }
}

/// Reads wrk's report (stdout, run with `--latency`). The lines it needs:
///
/// ```text
///   Thread Stats   Avg      Stdev     Max   +/- Stdev
///     Latency   218.12us  110.93us   2.29ms   77.63%
///   Latency Distribution
///      50%  210.00us
///      99%  531.00us
///   12641 requests in 2.10s, 1.49MB read
///   Socket errors: connect 0, read 5, write 614, timeout 0
///   Non-2xx or 3xx responses: 3
/// ```
///
/// The last two are printed only when their counts are not all zero.
fn parse(output: &str, keep_alive: bool) -> Result<WrkResult> {
    let mut result = WrkResult {
        keep_alive,
        ..WrkResult::default()
    };
    let mut requests_line = false;
    // (max, whether wrk recorded any latency at all)
    let mut latency = None;
    let (mut p50, mut p99) = (None, None);
    for line in output.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Latency", _mean, _stdev, max, within] => {
                // The share within one stdev is 0/0, printed "-nan%", exactly
                // when wrk's latency histogram is empty (stats.c,
                // stats_within_stdev).
                latency = Some((duration(max, line)?, !within.contains("nan")));
            }
            ["50%", value] => p50 = Some(duration(value, line)?),
            ["99%", value] => p99 = Some(duration(value, line)?),
            [count, "requests", "in", took, ..] => {
                result.requests = number(count, line)?;
                result.seconds = duration(took.trim_end_matches(','), line)?.as_secs_f64();
                requests_line = true;
            }
            ["Socket", "errors:", "connect", connect, "read", read, "write", write, "timeout", timeout] =>
            {
                result.connect_errors = number(connect.trim_end_matches(','), line)?;
                result.read_errors = number(read.trim_end_matches(','), line)?;
                result.write_errors = number(write.trim_end_matches(','), line)?;
                result.timeouts = number(timeout, line)?;
            }
            ["Non-2xx", "or", "3xx", "responses:", count] => result.non_2xx = number(count, line)?,
            _ => {}
        }
    }
    let missing = |what: &str| {
        Error::Bench(format!(
            "wrk's output has no {what}:\n{}",
            output.trim_end()
        ))
    };
    if !requests_line {
        return Err(missing("\"N requests in T\" line"));
    }
    let (max, recorded) = latency.ok_or_else(|| missing("\"Latency\" line in its thread stats"))?;
    let (p50, p99) = p50
        .zip(p99)
        .ok_or_else(|| missing("50% and 99% latencies (was it run with --latency?)"))?;
    if recorded {
        result.max = Some(max);
        result.p50 = Some(p50);
        result.p99 = Some(p99);
    }
    Ok(result)
}

fn number(word: &str, line: &str) -> Result<u64> {
    word.parse()
        .map_err(|_| Error::Bench(format!("wrk: {word:?} is not a count, in {line:?}")))
}

/// A time as wrk prints it (units.c, format_time_us): two decimals and a
/// unit of us, ms, s or m (`512.00us`, `1.23ms`, `2.01s`, `0.92m`).
fn duration(word: &str, line: &str) -> Result<Duration> {
    let bad = || Error::Bench(format!("wrk: {word:?} is not a time, in {line:?}"));
    let split = word
        .find(|c: char| c.is_ascii_alphabetic())
        .ok_or_else(bad)?;
    let (value, unit) = word.split_at(split);
    let seconds_per_unit = match unit {
        "us" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(bad()),
    };
    let value: f64 = value.parse().map_err(|_| bad())?;
    Duration::try_from_secs_f64(value * seconds_per_unit).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::io::Write;
    use std::net::{Ipv4Addr, TcpListener, TcpStream};

    /// wrk 4.1.0 (Debian 4.1.0-3+b2), `-c 4 -t 2 -d 2s --latency` against
    /// the example app on 127.0.0.1, keep-alive.
    const KEEP_ALIVE: &str = "\
Running 2s test @ http://127.0.0.1:53039/
  2 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    71.62us   91.51us   3.98ms   98.91%
    Req/Sec    25.70k     3.06k   30.87k    57.14%
  Latency Distribution
     50%   62.00us
     75%   82.00us
     90%  108.00us
     99%  166.00us
  107288 requests in 2.10s, 10.74MB read
Requests/sec:  51089.38
Transfer/sec:      5.12MB
";

    /// The same with `-H 'Connection: close'`, the app SIGKILLed after
    /// 1 s: the refused reconnections are write errors.
    const KILLED: &str = "\
Running 2s test @ http://127.0.0.1:33971/
  2 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   218.12us  110.93us   2.29ms   77.63%
    Req/Sec     6.36k   580.41     7.36k    60.00%
  Latency Distribution
     50%  210.00us
     75%  275.00us
     90%  338.00us
     99%  531.00us
  12641 requests in 2.10s, 1.49MB read
  Socket errors: connect 0, read 5, write 614, timeout 0
Requests/sec:   6018.82
Transfer/sec:    728.84KB
";

    /// `/slow?ms=1500` with `--timeout 1s`: every response timed out, so
    /// wrk recorded no latency.
    const ALL_TIMED_OUT: &str = "\
Running 3s test @ http://127.0.0.1:33971/slow?ms=1500
  2 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.00us    0.00us   0.00us    -nan%
    Req/Sec     1.00      0.00     1.00    100.00%
  Latency Distribution
     50%    0.00us
     75%    0.00us
     90%    0.00us
     99%    0.00us
  8 requests in 3.01s, 840.00B read
  Socket errors: connect 0, read 0, write 0, timeout 8
Requests/sec:      2.66
Transfer/sec:     279.42B
";

    /// `/slow` without `ms=`: the app answers 400 to every request.
    const BAD_REQUESTS: &str = "\
Running 1s test @ http://127.0.0.1:33971/slow
  2 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    64.30us   66.45us   2.10ms   97.44%
    Req/Sec    27.67k     2.50k   29.73k    90.00%
  Latency Distribution
     50%   54.00us
     75%   71.00us
     90%  104.00us
     99%  154.00us
  55048 requests in 1.00s, 6.40MB read
  Non-2xx or 3xx responses: 55048
Requests/sec:  55028.30
Transfer/sec:      6.40MB
";

    /// Written by hand in wrk's format (wrk.c's printf lines): every error
    /// kind, latencies in seconds, a run of over 51 s printed in minutes.
    const BY_HAND: &str = "\
Running 1m test @ http://127.0.0.1:8080/
  8 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   512.00us    1.23ms   2.01s    99.10%
    Req/Sec     1.20k   100.00     2.00k    70.00%
  Latency Distribution
     50%  412.00us
     75%  600.00us
     90%  850.00us
     99%    1.50s
  4000000 requests in 1.00m, 400.00MB read
  Socket errors: connect 12, read 3, write 4, timeout 5
  Non-2xx or 3xx responses: 6
Requests/sec:  66666.67
Transfer/sec:      6.67MB
";

    fn us(n: u64) -> Option<Duration> {
        Some(Duration::from_micros(n))
    }

    #[test]
    fn reads_a_run_without_errors() {
        let r = parse(KEEP_ALIVE, true).unwrap();
        assert_eq!(r.requests, 107_288);
        assert!((r.seconds - 2.10).abs() < 1e-9);
        assert_eq!(r.errors(), 0);
        assert_eq!((r.p50, r.p99, r.max), (us(62), us(166), us(3_980)));
        assert!(r.keep_alive);
    }

    #[test]
    fn reads_socket_errors() {
        let r = parse(KILLED, false).unwrap();
        assert_eq!(r.requests, 12_641);
        assert_eq!(
            (r.connect_errors, r.read_errors, r.write_errors, r.timeouts),
            (0, 5, 614, 0)
        );
        assert_eq!(r.errors(), 619);
        assert_eq!((r.p50, r.p99, r.max), (us(210), us(531), us(2_290)));
        assert!(!r.keep_alive);
    }

    #[test]
    fn no_latency_when_every_response_timed_out() {
        let r = parse(ALL_TIMED_OUT, true).unwrap();
        assert_eq!((r.requests, r.timeouts, r.errors()), (8, 8, 8));
        assert_eq!((r.p50, r.p99, r.max), (None, None, None));
    }

    #[test]
    fn reads_error_statuses() {
        let r = parse(BAD_REQUESTS, true).unwrap();
        assert_eq!(
            (r.requests, r.non_2xx, r.errors()),
            (55_048, 55_048, 55_048)
        );
    }

    #[test]
    fn reads_every_error_kind_and_unit() {
        let r = parse(BY_HAND, true).unwrap();
        assert_eq!(r.requests, 4_000_000);
        assert!((r.seconds - 60.0).abs() < 1e-9);
        assert_eq!(
            (
                r.connect_errors,
                r.read_errors,
                r.write_errors,
                r.timeouts,
                r.non_2xx
            ),
            (12, 3, 4, 5, 6)
        );
        assert_eq!(r.errors(), 30);
        assert_eq!(r.p50, us(412));
        assert_eq!(r.p99, Some(Duration::from_millis(1_500)));
        assert_eq!(r.max, Some(Duration::from_millis(2_010)));
    }

    #[test]
    fn refuses_output_without_its_figures() {
        let refused = "unable to connect to 127.0.0.1:53039 Connection refused\n";
        assert!(parse(refused, true).is_err());
        assert!(parse("", true).is_err());
        let without_distribution: String = KEEP_ALIVE
            .lines()
            .filter(|l| !l.trim_start().starts_with("50%"))
            .map(|l| format!("{l}\n"))
            .collect();
        let e = parse(&without_distribution, true).unwrap_err().to_string();
        assert!(e.contains("--latency"), "{e}");
        let garbled = KILLED.replace("read 5,", "read five,");
        assert!(parse(&garbled, true).is_err());
    }

    #[test]
    fn times_in_every_unit() {
        let t = |w| duration(w, "").unwrap();
        assert_eq!(t("512.00us"), Duration::from_micros(512));
        assert_eq!(t("1.23ms"), Duration::from_micros(1_230));
        assert_eq!(t("2.01s"), Duration::from_millis(2_010));
        assert_eq!(t("0.92m"), Duration::from_millis(55_200));
        for bad in ["", "12", "ms", "1.0xs", "-1.00s", "nanus"] {
            assert!(duration(bad, "").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn wrk_gets_whole_seconds() {
        assert_eq!(whole_seconds(Duration::ZERO), 1);
        assert_eq!(whole_seconds(Duration::from_millis(300)), 1);
        assert_eq!(whole_seconds(Duration::from_secs(2)), 2);
        assert_eq!(whole_seconds(Duration::from_millis(2_001)), 3);
    }

    fn spec(keep_alive: bool) -> WrkSpec {
        WrkSpec {
            connections: 2,
            threads: 1,
            duration: Duration::from_secs(1),
            keep_alive,
            timeout: Duration::from_secs(2),
        }
    }

    #[test]
    fn refuses_what_wrk_would_alter_and_other_hosts() {
        let wrk = Path::new("/nonexistent/wrk");
        let local = SocketAddr::from((Ipv4Addr::LOCALHOST, 1));
        let odd = WrkSpec {
            connections: 3,
            threads: 2,
            ..spec(true)
        };
        let few = WrkSpec {
            connections: 1,
            threads: 2,
            ..spec(true)
        };
        for bad in [odd, few] {
            let e = WrkRun::start(wrk, local, &bad).err().unwrap().to_string();
            assert!(e.contains("threads"), "{e}");
        }
        let remote = SocketAddr::from((Ipv4Addr::new(192, 0, 2, 1), 80));
        let e = WrkRun::start(wrk, remote, &spec(true)).err().unwrap();
        assert!(e.to_string().contains("loopback"), "{e}");
    }

    /// A minimal HTTP/1.1 server on 127.0.0.1: "ok" to every request,
    /// closing the connection when the request asks. Its threads end with
    /// their connections; the accept loop with the test process.
    fn serve() -> SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let address = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                std::thread::spawn(move || answer(stream));
            }
        });
        address
    }

    fn answer(mut stream: TcpStream) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let close = head.contains("connection: close");
                buf.drain(..end + 4);
                let reply: &[u8] = if close {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
                } else {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"
                };
                if stream.write_all(reply).is_err() || close {
                    return;
                }
            }
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn wrk_or_skip(test: &str) -> Option<PathBuf> {
        let wrk = find();
        if wrk.is_none() {
            baton_testkit::skip(test, "wrk is not installed (apt-get install wrk)");
        }
        wrk
    }

    #[test]
    fn a_real_wrk_run_with_fresh_connections() {
        let Some(wrk) = wrk_or_skip("wrk::a_real_wrk_run_with_fresh_connections") else {
            return;
        };
        let r = WrkRun::start(&wrk, serve(), &spec(false))
            .unwrap()
            .finish()
            .unwrap();
        assert!(r.requests > 0, "{r:?}");
        assert_eq!(r.errors(), 0, "{r:?}");
        assert!(r.p50.is_some() && r.p99 <= r.max, "{r:?}");
        assert!(!r.keep_alive);
    }

    #[test]
    fn a_real_wrk_run_kept_alive() {
        let Some(wrk) = wrk_or_skip("wrk::a_real_wrk_run_kept_alive") else {
            return;
        };
        let r = WrkRun::start(&wrk, serve(), &spec(true))
            .unwrap()
            .finish()
            .unwrap();
        assert!(r.requests > 0 && r.errors() == 0, "{r:?}");
        assert!(r.keep_alive);
    }

    #[test]
    fn wrk_failing_to_start_is_an_error_with_its_words() {
        let Some(wrk) = wrk_or_skip("wrk::wrk_failing_to_start_is_an_error_with_its_words") else {
            return;
        };
        // A port nobody listens on (freed just before).
        let address = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap();
        let e = WrkRun::start(&wrk, address, &spec(true))
            .unwrap()
            .finish()
            .unwrap_err()
            .to_string();
        assert!(e.contains("unable to connect"), "{e}");
    }

    #[test]
    fn dropping_a_run_kills_wrk() {
        let Some(wrk) = wrk_or_skip("wrk::dropping_a_run_kills_wrk") else {
            return;
        };
        let long = WrkSpec {
            duration: Duration::from_secs(60),
            ..spec(true)
        };
        let run = WrkRun::start(&wrk, serve(), &long).unwrap();
        let pid = run.pid;
        assert!(baton_testkit::alive(pid));
        drop(run);
        // Reaped by the drop: the pid is gone, not a zombie.
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    }
}
