//! The one reader of baton's stderr.
//!
//! baton runs with `--log-format json` under the kit: each of its records
//! carries the typed [`Notice`] it reports (its `notice` field), and the
//! kit waits on those, never on a log line's wording. Lines of another
//! shape (the example app's `hello: ...` on the same stderr, or baton's
//! human format where a test asks for it) are kept whole, stamped with the
//! time they were read; but the example app's two timing lines (`hello:
//! generation G pid P ready-sent at U`, `... drain-signal at U`) are marks
//! too ([`Mark::AppReadySent`], [`Mark::AppDrainSignal`]), stamped with
//! their own U (µs since the epoch, by the same wall clock as baton's).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use baton::notice::{Failure, Notice};

use crate::procs;

/// One line of baton's stderr.
#[derive(Debug, Clone)]
pub struct LogLine {
    /// baton's timestamp for JSON lines; the app's own for its timing
    /// lines; when it was read for others.
    pub at: SystemTime,
    /// The message of a JSON line; the whole line otherwise.
    pub text: String,
    /// The notice a JSON record carries.
    pub notice: Option<Notice>,
    /// The generation and the mark an app's timing line records.
    pub app_mark: Option<(u64, Mark)>,
    /// The line as written.
    pub raw: String,
}

impl LogLine {
    /// Whether this line records `mark` of `generation`: baton's notice
    /// for its marks, the app's timing line for the app's.
    pub fn is_mark(&self, generation: u64, mark: Mark) -> bool {
        self.app_mark == Some((generation, mark))
            || self
                .notice
                .as_ref()
                .is_some_and(|n| mark.matches(generation, n))
    }
}

/// A moment of a generation's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// The deploy (or first start) began: [`Notice::Starting`].
    Starting,
    /// fork/exec returned: [`Notice::Started`].
    Spawned,
    /// baton processed its READY=1: [`Notice::Ready`].
    Ready,
    /// The drain signal is sent: [`Notice::Draining`].
    Draining,
    /// The process is gone: [`Notice::Exited`], [`Notice::Crashed`], or a
    /// candidate that died before it was ready.
    Exited,
    /// The app sent READY=1, by its own clock: its line `hello:
    /// generation G pid P ready-sent at U`.
    AppReadySent,
    /// The drain signal reached the app, by its own clock: its line
    /// `hello: generation G pid P drain-signal at U`.
    AppDrainSignal,
}

impl Mark {
    /// Whether `notice` records this moment of `generation`. Never for the
    /// app's marks, which are lines of the app's: see [`LogLine::is_mark`].
    pub fn matches(self, generation: u64, notice: &Notice) -> bool {
        let g = generation;
        match (self, notice) {
            (Mark::Starting, Notice::Starting { generation, .. })
            | (Mark::Spawned, Notice::Started { generation, .. })
            | (Mark::Ready, Notice::Ready { generation, .. })
            | (Mark::Draining, Notice::Draining { generation, .. })
            | (Mark::Exited, Notice::Exited { generation, .. })
            | (Mark::Exited, Notice::Crashed { generation, .. }) => *generation == g,
            (
                Mark::Exited,
                Notice::CandidateFailed {
                    generation,
                    reason: Failure::Exited(_) | Failure::ExitedInProbation(_),
                    ..
                },
            ) => *generation == g,
            _ => false,
        }
    }
}

/// The generation, the mark and the time (its U) of one of the example
/// app's timing lines: `hello: generation G pid P ready-sent at U` or
/// `... drain-signal at U`, U in µs since the Unix epoch.
fn parse_app_mark(raw: &str) -> Option<(u64, Mark, SystemTime)> {
    let words: Vec<&str> = raw.strip_prefix("hello: generation ")?.split(' ').collect();
    let [generation, "pid", pid, what, "at", micros] = words[..] else {
        return None;
    };
    let mark = match what {
        "ready-sent" => Mark::AppReadySent,
        "drain-signal" => Mark::AppDrainSignal,
        _ => return None,
    };
    pid.parse::<i32>().ok()?;
    let at = UNIX_EPOCH + Duration::from_micros(micros.parse().ok()?);
    Some((generation.parse().ok()?, mark, at))
}

/// Parses one line of stderr.
fn parse(raw: String) -> LogLine {
    let json = raw
        .starts_with('{')
        .then(|| serde_json::from_str::<serde_json::Value>(&raw).ok())
        .flatten();
    let fields = json.as_ref().and_then(|value| {
        let at = humantime::parse_rfc3339(value["timestamp"].as_str()?).ok()?;
        let message = value["fields"]["message"].as_str()?.to_owned();
        let notice = value["fields"]["notice"]
            .as_str()
            .and_then(|n| serde_json::from_str(n).ok());
        Some((at, message, notice))
    });
    match fields {
        Some((at, text, notice)) => LogLine {
            at,
            text,
            notice,
            app_mark: None,
            raw,
        },
        None => {
            let app_mark = parse_app_mark(&raw);
            LogLine {
                at: app_mark.map_or_else(SystemTime::now, |(_, _, at)| at),
                text: raw.clone(),
                notice: None,
                app_mark: app_mark.map(|(generation, mark, _)| (generation, mark)),
                raw,
            }
        }
    }
}

#[derive(Default)]
struct Lines {
    lines: Vec<LogLine>,
    /// The pid of every generation baton started.
    generations: BTreeMap<u64, i32>,
    /// The reader saw the end of the stream.
    closed: bool,
}

/// baton's stderr as read so far, shared with the reader thread.
#[derive(Default)]
pub struct Log {
    lines: Mutex<Lines>,
    grew: Condvar,
}

impl Log {
    /// Starts the reader thread on `stderr`. With `BATON_TEST_VERBOSE` set,
    /// every line is also echoed to the test's stderr.
    pub fn read(stderr: impl Read + Send + 'static) -> Arc<Log> {
        let log = Arc::new(Log::default());
        let reader = log.clone();
        let echo = std::env::var_os("BATON_TEST_VERBOSE").is_some();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if echo {
                    eprintln!("{line}");
                }
                reader.push(parse(line));
            }
            reader.lock().closed = true;
            reader.grew.notify_all();
        });
        log
    }

    fn lock(&self) -> MutexGuard<'_, Lines> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, line: LogLine) {
        let mut lines = self.lock();
        if let Some(Notice::Started { generation, pid }) = line.notice {
            procs::register(pid);
            lines.generations.insert(generation, pid);
        }
        lines.lines.push(line);
        drop(lines);
        self.grew.notify_all();
    }

    /// Waits until a line at index `from` or later satisfies `matches`;
    /// that line and its index. `None` when `deadline` passed or the stream
    /// ended first.
    pub fn wait(
        &self,
        from: usize,
        deadline: Instant,
        mut matches: impl FnMut(&LogLine) -> bool,
    ) -> Option<(usize, LogLine)> {
        let mut lines = self.lock();
        let mut next = from;
        loop {
            if let Some(i) = (next..lines.lines.len()).find(|&i| matches(&lines.lines[i])) {
                return Some((i, lines.lines[i].clone()));
            }
            next = next.max(lines.lines.len());
            let left = deadline.saturating_duration_since(Instant::now());
            if lines.closed || left.is_zero() {
                return None;
            }
            lines = self
                .grew
                .wait_timeout(lines, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The first line so far that satisfies `matches`.
    pub fn find(&self, mut matches: impl FnMut(&LogLine) -> bool) -> Option<LogLine> {
        self.lock().lines.iter().find(|l| matches(l)).cloned()
    }

    /// When `mark` of `generation` happened, if it is logged: by baton's
    /// clock for its marks, by the app's for the app's.
    pub fn mark(&self, generation: u64, mark: Mark) -> Option<SystemTime> {
        self.find(|l| l.is_mark(generation, mark)).map(|l| l.at)
    }

    /// Every notice so far, oldest first.
    pub fn notices(&self) -> Vec<Notice> {
        self.lock()
            .lines
            .iter()
            .filter_map(|l| l.notice.clone())
            .collect()
    }

    /// The pid of every generation baton logged starting, by generation.
    pub fn generations(&self) -> BTreeMap<u64, i32> {
        self.lock().generations.clone()
    }

    /// The last `n` lines, oldest first.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let lines = self.lock();
        let skip = lines.lines.len().saturating_sub(n);
        lines.lines[skip..].iter().map(|l| l.raw.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use baton::notice::ExitStatus;

    #[test]
    fn json_records_carry_baton_s_time_and_its_notice() {
        let raw = r#"{"timestamp":"2026-11-27T21:05:17.788809Z","level":"INFO","fields":{"message":"generation 1 started as pid 26545","generation":1,"notice":"{\"notice\":\"started\",\"generation\":1,\"pid\":26545}"}}"#;
        let line = parse(raw.to_owned());
        assert_eq!(line.text, "generation 1 started as pid 26545");
        assert_eq!(
            line.at,
            humantime::parse_rfc3339("2026-11-27T21:05:17.788809Z").unwrap()
        );
        assert_eq!(
            line.notice,
            Some(Notice::Started {
                generation: 1,
                pid: 26545
            })
        );
        let hello = parse("hello: generation 1 pid 26545 serving".to_owned());
        assert_eq!(hello.text, hello.raw);
        assert_eq!(hello.notice, None);
    }

    #[test]
    fn marks_match_their_generation_only() {
        let started = Notice::Started {
            generation: 1,
            pid: 9,
        };
        assert!(Mark::Spawned.matches(1, &started));
        assert!(!Mark::Spawned.matches(11, &started));
        assert!(!Mark::Ready.matches(1, &started));
        let exited = Notice::Exited {
            generation: 6,
            pid: 99,
            status: ExitStatus::Code(0),
        };
        assert!(Mark::Exited.matches(6, &exited));
        assert!(!Mark::Draining.matches(6, &exited));
        let failed = |reason| Notice::CandidateFailed {
            generation: 3,
            reason,
            serving: Some(2),
        };
        assert!(Mark::Exited.matches(3, &failed(Failure::Exited(ExitStatus::Code(3)))));
        let not_ready = failed(Failure::NotReady(std::time::Duration::from_secs(1)));
        assert!(!Mark::Exited.matches(3, &not_ready));
    }

    #[test]
    fn app_timing_lines_are_marks_at_their_own_time() {
        let ready = parse("hello: generation 7 pid 4242 ready-sent at 1795900000123456".to_owned());
        assert_eq!(ready.app_mark, Some((7, Mark::AppReadySent)));
        assert_eq!(
            ready.at,
            UNIX_EPOCH + Duration::from_micros(1_795_900_000_123_456)
        );
        assert!(ready.is_mark(7, Mark::AppReadySent));
        assert!(!ready.is_mark(7, Mark::AppDrainSignal));
        assert!(!ready.is_mark(77, Mark::AppReadySent));
        assert_eq!(ready.notice, None);
        let drain =
            parse("hello: generation 6 pid 4000 drain-signal at 1795900000000001".to_owned());
        assert_eq!(drain.app_mark, Some((6, Mark::AppDrainSignal)));
        assert_eq!(
            drain.at,
            UNIX_EPOCH + Duration::from_micros(1_795_900_000_000_001)
        );
        // Other lines of the app, and malformed timing lines, mark nothing.
        for other in [
            "hello: generation 6 pid 4000 draining after SIGTERM",
            "hello: generation 6 pid 4000 drain-signal at soon",
            "hello: generation 6 pid 4000 drain-signal at 1 2",
            "hello: generation x pid 4000 ready-sent at 1",
            "generation 6 pid 4000 ready-sent at 1",
        ] {
            assert_eq!(parse(other.to_owned()).app_mark, None, "{other}");
        }
        // baton's records mark only through their notices.
        let raw = r#"{"timestamp":"2026-11-27T21:05:17.788809Z","level":"INFO","fields":{"message":"hello: generation 1 pid 2 ready-sent at 3"}}"#;
        assert_eq!(parse(raw.to_owned()).app_mark, None);
        let log = Log::read(&b"hello: generation 2 pid 9 drain-signal at 5000000\n"[..]);
        let soon = Instant::now() + Duration::from_secs(10);
        assert!(log
            .wait(0, soon, |l| l.is_mark(2, Mark::AppDrainSignal))
            .is_some());
        assert_eq!(
            log.mark(2, Mark::AppDrainSignal),
            Some(UNIX_EPOCH + Duration::from_secs(5))
        );
        assert_eq!(log.mark(2, Mark::Draining), None);
    }

    #[test]
    fn waits_end_at_a_match_at_the_end_of_the_stream_or_at_the_deadline() {
        let log = Log::read(&b"one\nhello: two\nthree\n"[..]);
        let soon = Instant::now() + std::time::Duration::from_secs(10);
        let (i, line) = log.wait(0, soon, |l| l.text.contains("two")).unwrap();
        assert_eq!((i, line.raw.as_str()), (1, "hello: two"));
        assert!(log.wait(2, soon, |l| l.text.contains("two")).is_none());
        assert_eq!(log.tail(2), ["hello: two", "three"]);
        let log = Log::default();
        assert!(log.wait(0, Instant::now(), |_| true).is_none());
    }
}
