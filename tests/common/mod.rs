//! Test harness: starts the real `baton` binary supervising the example app
//! (`examples/hello.rs`, which speaks the child contract and takes fault
//! injection from HELLO_* variables), talks to it through its CLI, and
//! drives an HTTP load against the shared port. Every process started here
//! is killed on drop, also when a test fails.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const BATON: &str = env!("CARGO_BIN_EXE_baton");

/// The example app. `cargo test` builds it with the tests; a narrower run
/// (`cargo test --test deploy`) does not, so it is built here once if
/// missing.
pub fn hello() -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    let path = Path::new(BATON).parent().unwrap().join("examples/hello");
    BUILT.call_once(|| {
        if !path.exists() {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .args(["build", "--example", "hello"])
                .status()
                .expect("running cargo to build the example app");
            assert!(status.success(), "cargo build --example hello failed");
        }
    });
    assert!(
        path.exists(),
        "{} missing: run `cargo build --example hello`",
        path.display()
    );
    path
}

/// What goes into the generated config file.
#[derive(Clone)]
pub struct Setup {
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Extra `[[listen]]` tables after the TCP one.
    pub extra_listen: String,
    pub readiness: String,
    pub drain_timeout: String,
    /// More `[app]` keys.
    pub extra_app: String,
    pub extra: String,
}

impl Default for Setup {
    fn default() -> Setup {
        Setup {
            command: vec![hello().display().to_string()],
            env: BTreeMap::new(),
            extra_listen: String::new(),
            readiness: "timeout = \"20s\"".into(),
            drain_timeout: "20s".into(),
            extra_app: String::new(),
            extra: String::new(),
        }
    }
}

impl Setup {
    pub fn env(mut self, key: &str, value: &str) -> Setup {
        self.env.insert(key.into(), value.into());
        self
    }

    fn render(&self, control: &Path, address: &str) -> String {
        let command: Vec<String> = self.command.iter().map(|c| format!("{c:?}")).collect();
        let env: Vec<String> = self
            .env
            .iter()
            .map(|(k, v)| format!("{k} = {v:?}"))
            .collect();
        format!(
            "[[listen]]\nname = \"http\"\naddress = \"{address}\"\n{}\n\
             [app]\ncommand = [{}]\nenv = {{ {} }}\n{}\
             [readiness]\n{}\n\
             [drain]\ntimeout = \"{}\"\n\
             [restart]\nbackoff_initial = \"50ms\"\nbackoff_max = \"500ms\"\n\
             [control]\nsocket = \"{}\"\n{}\n",
            self.extra_listen,
            command.join(", "),
            env.join(", "),
            self.extra_app,
            self.readiness,
            self.drain_timeout,
            control.display(),
            self.extra,
        )
    }
}

/// A running `baton run` with its own temp dir, config and port.
pub struct Baton {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub port: u16,
    address: String,
    lines: mpsc::Receiver<String>,
    /// Every stderr line so far (baton's and the children's).
    pub log: Arc<Mutex<Vec<String>>>,
    /// Pids of generations baton reported starting, killed on drop.
    pids: Vec<i32>,
}

impl Baton {
    /// Starts baton on an ephemeral port and waits for generation 1.
    pub fn start(setup: Setup) -> Baton {
        let mut baton = Baton::spawn(setup, "127.0.0.1:0", &[]);
        baton.wait_log("generation 1 is ready", Duration::from_secs(20));
        baton.port = baton.bound_port();
        baton
    }

    /// Starts baton without waiting for anything.
    pub fn spawn(setup: Setup, address: &str, extra_env: &[(&str, &str)]) -> Baton {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("app.toml");
        let control = dir.path().join("baton.sock");
        std::fs::write(&config, setup.render(&control, address)).unwrap();
        Baton::spawn_with(dir, config, address, BATON, &["run", "-c"], extra_env)
    }

    /// Starts `program args... <config>` (baton itself, or a wrapper that
    /// execs it) with stderr captured.
    pub fn spawn_with(
        dir: tempfile::TempDir,
        config: PathBuf,
        address: &str,
        program: &str,
        args: &[&str],
        extra_env: &[(&str, &str)],
    ) -> Baton {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .arg(&config)
            .env("BATON_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("BATON_TEST_VERBOSE").is_some() {
                    eprintln!("{line}");
                }
                log2.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        Baton {
            child,
            dir,
            config,
            port: 0,
            address: address.to_owned(),
            lines,
            log,
            pids: Vec::new(),
        }
    }

    /// Waits for a stderr line containing `needle`; returns it.
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.note_pid(&line);
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no log line containing {needle:?} within {timeout:?}; log:\n{}",
                    self.log.lock().unwrap().join("\n")
                ),
            }
        }
    }

    /// Waits until generation `old` has exited after a deploy (its
    /// summary line): until then it may still accept, as it should.
    pub fn wait_drained(&mut self, old: u64) {
        self.wait_log(
            &format!("generation {old} drained in"),
            Duration::from_secs(30),
        );
    }

    fn note_pid(&mut self, line: &str) {
        if let Some(rest) = line.split(" started as pid ").nth(1) {
            if let Ok(pid) = rest.split_whitespace().next().unwrap_or("").parse() {
                self.pids.push(pid);
            }
        }
    }

    pub fn log_contains(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    /// Runs `baton <args> -c <config>`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BATON)
            .args(args)
            .arg("-c")
            .arg(&self.config)
            .output()
            .unwrap()
    }

    /// `baton reload --wait`: (exit code, stdout, stderr).
    pub fn reload_wait(&self) -> (i32, String, String) {
        let out = self.cli(&["reload", "--wait", "--timeout", "60s"]);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn status(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--json"]);
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// (generation, state) of every generation, current first.
    pub fn generations(&self) -> Vec<(u64, String)> {
        self.status()["generations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| {
                (
                    g["generation"].as_u64().unwrap(),
                    g["state"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    pub fn current_pid(&self) -> i32 {
        let status = self.status();
        let current = status["generations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["state"] == "ready")
            .expect("a ready generation");
        current["pid"].as_i64().unwrap() as i32
    }

    fn bound_port(&self) -> u16 {
        let status = self.status();
        let address = status["listeners"][0]["address"].as_str().unwrap();
        address.parse::<SocketAddr>().unwrap().port()
    }

    /// Rewrites the config file (for the next reload).
    pub fn rewrite(&self, setup: &Setup) {
        let control = self.dir.path().join("baton.sock");
        std::fs::write(&self.config, setup.render(&control, &self.address)).unwrap();
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits for baton to exit; its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("baton did not exit within {timeout:?}");
    }

    /// Sends `signal` to baton.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal).unwrap();
    }
}

impl Baton {
    /// SIGKILL to baton and to every generation it started: a crash.
    pub fn kill_all(&mut self) {
        use nix::sys::signal::{kill, killpg, Signal};
        use nix::unistd::Pid;
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = kill(Pid::from_raw(self.pid()), Signal::SIGKILL);
            let _ = self.child.wait();
        }
        // Each generation leads its own process group; end the ones we saw,
        // also those logged after the last wait_log (the reader thread may
        // still be catching up: give it a moment, bounded).
        for _ in 0..10_000 {
            match self.lines.recv_timeout(Duration::from_millis(50)) {
                Ok(line) => self.note_pid(&line),
                Err(_) => break,
            }
        }
        for pid in &self.pids {
            let _ = killpg(Pid::from_raw(*pid), Signal::SIGKILL);
        }
    }
}

impl Drop for Baton {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// True while a process with this pid exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// How many sockets process `pid` has open.
pub fn socket_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|target| target.to_string_lossy().starts_with("socket:"))
                .count()
        })
        .unwrap_or(0)
}

/// Polls `condition` every 10 ms until it holds or `timeout` passes. For
/// states with no event to wait on (a pid disappearing).
pub fn eventually(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    condition()
}

// ---------------------------------------------------------------------------
// Load generator

#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub ok: u64,
    pub refused: u64,
    pub reset: u64,
    pub timed_out: u64,
    pub bad_response: u64,
    pub other: u64,
    /// Keep-alive requests resent once because the connection closed before
    /// any byte of the response (what real HTTP clients do).
    pub retried: u64,
    /// Responses by the generation that answered.
    pub by_generation: BTreeMap<u64, u64>,
    /// When each generation's first response arrived.
    pub first_seen: BTreeMap<u64, Instant>,
    pub errors: Vec<String>,
}

impl Tally {
    pub fn failed(&self) -> u64 {
        self.refused + self.reset + self.timed_out + self.bad_response + self.other
    }

    fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        self.refused += other.refused;
        self.reset += other.reset;
        self.timed_out += other.timed_out;
        self.bad_response += other.bad_response;
        self.other += other.other;
        self.retried += other.retried;
        for (g, n) in other.by_generation {
            *self.by_generation.entry(g).or_default() += n;
        }
        for (g, at) in other.first_seen {
            let first = self.first_seen.entry(g).or_insert(at);
            *first = (*first).min(at);
        }
        self.errors.extend(other.errors.into_iter().take(10));
    }

    fn record(&mut self, result: Result<u64, Failure>) {
        match result {
            Ok(generation) => {
                self.ok += 1;
                *self.by_generation.entry(generation).or_default() += 1;
                self.first_seen
                    .entry(generation)
                    .or_insert_with(Instant::now);
            }
            Err(f) => {
                match f.kind {
                    FailKind::Refused => self.refused += 1,
                    FailKind::Reset => self.reset += 1,
                    FailKind::TimedOut => self.timed_out += 1,
                    FailKind::Bad => self.bad_response += 1,
                    FailKind::Other => self.other += 1,
                }
                if self.errors.len() < 10 {
                    self.errors.push(f.detail);
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailKind {
    Refused,
    Reset,
    TimedOut,
    Bad,
    Other,
}

#[derive(Debug)]
pub struct Failure {
    kind: FailKind,
    detail: String,
    /// No byte of the response had arrived.
    before_response: bool,
}

fn io_failure(e: std::io::Error, before_response: bool) -> Failure {
    let kind = match e.kind() {
        ErrorKind::ConnectionRefused => FailKind::Refused,
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
            FailKind::Reset
        }
        ErrorKind::TimedOut | ErrorKind::WouldBlock => FailKind::TimedOut,
        _ => FailKind::Other,
    };
    Failure {
        kind,
        detail: e.to_string(),
        before_response,
    }
}

const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A closed-loop load: `clients` threads each doing one request per fresh
/// connection, plus one keep-alive client. Bounded: stops on `stop()`, or
/// after `max` time, whichever is first.
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Tally>>,
}

impl Load {
    pub fn start(port: u16, clients: usize, max: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let deadline = Instant::now() + max;
        let mut threads = Vec::new();
        for _ in 0..clients {
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                let mut tally = Tally::default();
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    tally.record(fresh_request(port));
                }
                tally
            }));
        }
        let stop2 = stop.clone();
        threads.push(std::thread::spawn(move || {
            keep_alive_client(port, &stop2, deadline)
        }));
        Load { stop, threads }
    }

    pub fn stop(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = Tally::default();
        for t in self.threads {
            total.merge(t.join().unwrap());
        }
        total
    }
}

/// One GET on a fresh connection; the generation that answered.
pub fn fresh_request(port: u16) -> Result<u64, Failure> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| io_failure(e, true))?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .map_err(|e| io_failure(e, true))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| io_failure(e, response.is_empty()))?;
    parse_generation(&response)
}

/// A GET over a unix socket listener; the generation that answered.
pub fn unix_get_generation(path: &Path) -> u64 {
    let mut s = std::os::unix::net::UnixStream::connect(path).expect("connect");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut response = Vec::new();
    s.read_to_end(&mut response).unwrap();
    parse_generation(&response).expect("a 200 response with a generation")
}

/// A plain GET; the generation that answered (for simple checks).
pub fn get_generation(port: u16) -> u64 {
    fresh_request(port).expect("GET failed")
}

fn parse_generation(response: &[u8]) -> Result<u64, Failure> {
    let text = String::from_utf8_lossy(response);
    let bad = || Failure {
        kind: FailKind::Bad,
        detail: format!("bad response: {text:?}"),
        before_response: response.is_empty(),
    };
    if !text.starts_with("HTTP/1.1 200") {
        return Err(bad());
    }
    let body = text.split("\r\n\r\n").nth(1).ok_or_else(bad)?;
    body.strip_prefix("generation=")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|g| g.parse().ok())
        .ok_or_else(bad)
}

/// A keep-alive client, retrying an idempotent request once when (and only
/// when) the connection closed before any byte of the response.
fn keep_alive_client(port: u16, stop: &AtomicBool, deadline: Instant) -> Tally {
    let mut tally = Tally::default();
    let mut conn: Option<BufReader<TcpStream>> = None;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let mut result = keep_alive_request(port, &mut conn);
        if let Err(f) = &result {
            if f.before_response && f.kind != FailKind::Refused {
                tally.retried += 1;
                conn = None;
                result = keep_alive_request(port, &mut conn);
            }
        }
        if result.is_err() {
            conn = None;
        }
        tally.record(result);
    }
    tally
}

fn keep_alive_request(port: u16, conn: &mut Option<BufReader<TcpStream>>) -> Result<u64, Failure> {
    if conn.is_none() {
        let stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| io_failure(e, true))?;
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        *conn = Some(BufReader::new(stream));
    }
    let reader = conn.as_mut().unwrap();
    reader
        .get_mut()
        .write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        .map_err(|e| io_failure(e, true))?;
    // Headers.
    let mut head = String::new();
    let mut content_length = 0usize;
    let mut close = false;
    loop {
        let mut line = String::new();
        let n = reader
            .read_line(&mut line)
            .map_err(|e| io_failure(e, head.is_empty()))?;
        if n == 0 {
            return Err(Failure {
                kind: if head.is_empty() {
                    FailKind::Reset
                } else {
                    FailKind::Bad
                },
                detail: "connection closed".into(),
                before_response: head.is_empty(),
            });
        }
        head.push_str(&line);
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            content_length = v.trim().parse().unwrap_or(0);
        }
        if lower.starts_with("connection:") && lower.contains("close") {
            close = true;
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0u8; content_length];
    reader
        .read_exact(&mut body)
        .map_err(|e| io_failure(e, false))?;
    if close {
        *conn = None;
    }
    let mut whole = head.into_bytes();
    whole.extend_from_slice(&body);
    parse_generation(&whole)
}
