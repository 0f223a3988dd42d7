//! The one reader of baton's stderr.
//!
//! Everything the kit learns from baton's log goes through here: waiting
//! for a line, the moments of a generation's life ([`Mark`]) and the pids of
//! the generations baton started. Log wording is known in this file only,
//! so moving to typed notices changes one place.
//!
//! baton's stderr is shared with its generations (the example app writes
//! `hello: ...` lines to it). Lines in baton's JSON format
//! (`--log-format json`) carry baton's timestamp and message; any other
//! line is kept whole, stamped with the time it was read.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use crate::procs;

/// One line of baton's stderr.
#[derive(Debug, Clone)]
pub struct LogLine {
    /// baton's timestamp for JSON lines; when it was read for others.
    pub at: SystemTime,
    /// The message of a JSON line; the whole line otherwise.
    pub text: String,
    /// The line as written.
    pub raw: String,
}

/// A moment of a generation's life, as baton logs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// The deploy (or first start) began: "starting generation N".
    Starting,
    /// fork/exec returned: "generation N started as pid P".
    Spawned,
    /// baton processed its READY=1: "generation N is ready after T".
    Ready,
    /// The drain signal is sent: "draining generation N (pid P) with SIG".
    Draining,
    /// The process is gone: "generation N (pid P) exited ..." / "... killed
    /// by ...", or, for a candidate that died before it was ready,
    /// "generation N failed: exited ..." / "... failed: killed by ...".
    Exited,
}

impl Mark {
    /// Whether `text` (a message, or a whole line with a prefix) records
    /// this moment of `generation`. The one place that knows baton's log
    /// wording for a generation's life.
    pub fn matches(self, generation: u64, text: &str) -> bool {
        let g = generation;
        match self {
            Mark::Starting => {
                let needle = format!("starting generation {g}");
                text.match_indices(&needle).any(|(i, _)| {
                    let next = text[i + needle.len()..].chars().next();
                    !next.is_some_and(|c| c.is_ascii_digit())
                })
            }
            Mark::Spawned => text.contains(&format!("generation {g} started as pid ")),
            Mark::Ready => text.contains(&format!("generation {g} is ready after ")),
            Mark::Draining => text.contains(&format!("draining generation {g} (pid ")),
            Mark::Exited => {
                let gone = |rest: &str| rest.starts_with("exited ") || rest.starts_with("killed ");
                let own = format!("generation {g} (pid ");
                let exited = text.match_indices(&own).any(|(i, _)| {
                    let before = &text[..i];
                    let after = &text[i + own.len()..];
                    let rest = after.split_once(") ").map_or("", |(_, rest)| rest);
                    !before.ends_with("draining ") && gone(rest)
                });
                let failed = format!("generation {g} failed: ");
                exited
                    || text
                        .match_indices(&failed)
                        .any(|(i, _)| gone(&text[i + failed.len()..]))
            }
        }
    }
}

/// The generation and pid a "generation N started as pid P" line names.
fn started(text: &str) -> Option<(u64, i32)> {
    let (before, after) = text.split_once(" started as pid ")?;
    let generation = before.rsplit_once("generation ")?.1.parse().ok()?;
    let pid = after
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    Some((generation, pid))
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
        Some((at, message))
    });
    match fields {
        Some((at, text)) => LogLine { at, text, raw },
        None => LogLine {
            at: SystemTime::now(),
            text: raw.clone(),
            raw,
        },
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
        if let Some((generation, pid)) = started(&line.text) {
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

    /// When baton logged `mark` for `generation`, if it has.
    pub fn mark(&self, generation: u64, mark: Mark) -> Option<SystemTime> {
        self.find(|l| mark.matches(generation, &l.text))
            .map(|l| l.at)
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

    #[test]
    fn json_lines_keep_baton_s_time_and_message() {
        let raw = r#"{"timestamp":"2026-11-27T21:05:17.788809Z","level":"INFO","fields":{"message":"generation 1 started as pid 26545","generation":1,"pid":"26545"}}"#;
        let line = parse(raw.to_owned());
        assert_eq!(line.text, "generation 1 started as pid 26545");
        assert_eq!(
            line.at,
            humantime::parse_rfc3339("2026-11-27T21:05:17.788809Z").unwrap()
        );
        assert_eq!(started(&line.text), Some((1, 26545)));
        let hello = parse("hello: generation 1 pid 26545 serving".to_owned());
        assert_eq!(hello.text, hello.raw);
        assert_eq!(started(&hello.text), None);
    }

    #[test]
    fn pids_are_learned_from_every_format() {
        let human = "2026-11-28T11:05:01.939700Z  INFO generation 12 started as pid 9115 generation=12 pid=9115";
        assert_eq!(started(human), Some((12, 9115)));
        assert_eq!(started("<6>generation 3 started as pid 77"), Some((3, 77)));
    }

    #[test]
    fn marks_match_their_generation_only() {
        let human = "2026-11-28T11:05:01.931675Z  INFO starting generation 1 generation=1";
        assert!(Mark::Starting.matches(1, human));
        assert!(!Mark::Starting.matches(1, "starting generation 12"));
        assert!(Mark::Starting.matches(12, "starting generation 12"));
        assert!(Mark::Spawned.matches(1, "generation 1 started as pid 26545"));
        assert!(!Mark::Spawned.matches(11, "generation 1 started as pid 26545"));
        assert!(Mark::Ready.matches(2, "<6>generation 2 is ready after 2.3 ms"));
        assert!(Mark::Draining.matches(1, "draining generation 1 (pid 9) with SIGTERM"));
    }

    #[test]
    fn exits_are_recognised_in_every_wording() {
        assert!(Mark::Exited.matches(6, "generation 6 (pid 99) exited with code 0"));
        assert!(Mark::Exited.matches(
            6,
            "2026-11-28T11:05:02Z  INFO generation 6 (pid 99) killed by signal SIGKILL generation=6"
        ));
        assert!(Mark::Exited.matches(
            3,
            "generation 3 failed: exited with code 3 before it was ready"
        ));
        assert!(!Mark::Exited.matches(13, "generation 3 failed: exited with code 3"));
        assert!(!Mark::Exited.matches(3, "generation 3 failed: not ready within 1.0 s"));
        assert!(!Mark::Exited.matches(6, "draining generation 6 (pid 99) with SIGTERM"));
        assert!(!Mark::Draining.matches(6, "generation 6 (pid 99) exited with code 0"));
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
