//! The processes the bench starts, and what it reads about them.
//!
//! Every process is started in its own process group and its pid is
//! registered until it is known to be gone; so are the generations baton
//! starts (each leads its own group; the bench learns their pids from
//! baton's log). Guards stop their process when dropped, also on error;
//! [`kill_started`] is the last resort at the end of `main`, on Ctrl-C and
//! from the panic hook (release builds abort on panic, so no destructor
//! would run).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::{Arc, Mutex, TryLockError};
use std::time::{Duration, Instant, SystemTime};

use baton::control::{Reply, Request, StatusDoc};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::{sleep, timeout};

use crate::{Context, Error, Result};

/// Process groups to kill if nothing else does.
static STARTED: Mutex<Vec<i32>> = Mutex::new(Vec::new());

/// Variables that would make hello or baton think they were socket
/// activated (if the bench itself runs under systemd) or configure hello.
const INHERITED: &[&str] = &[
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "LISTEN_PIDFDID",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "BATON_GENERATION",
    "BATON_CONFIG",
    "HELLO_ADDR",
    "HELLO_FAIL",
    "HELLO_BOOT_DELAY_MS",
    "HELLO_EXPECT_FDNAMES",
];

/// How long baton may take to stop gracefully before it gets SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Bounds every exchange on baton's control socket.
const CONTROL_LIMIT: Duration = Duration::from_secs(60);

fn register(pid: i32) {
    started().push(pid);
}

fn unregister(pid: i32) {
    started().retain(|&p| p != pid);
}

fn started() -> std::sync::MutexGuard<'static, Vec<i32>> {
    STARTED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// SIGKILLs every registered process group that still exists.
pub fn kill_started() {
    // try_lock: the panic hook may run while this thread holds the lock.
    let mut started = match STARTED.try_lock() {
        Ok(guard) => guard,
        Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
        Err(TryLockError::WouldBlock) => return,
    };
    for pid in started.drain(..) {
        kill_group(pid);
    }
}

/// SIGKILLs the process group led by `pid`, if `pid` still leads one: a pid
/// that was reaped may have been reused by a process that is not ours.
fn kill_group(pid: i32) {
    if leads_own_group(pid) {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

fn leads_own_group(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
    let fields = stat.rsplit_once(')').map(|(_, rest)| rest);
    fields.and_then(|f| f.split_whitespace().nth(2)) == Some(pid.to_string().as_str())
}

/// Kills everything started and removes `scratch` when the bench panics.
pub fn install_panic_hook(scratch: PathBuf) {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        kill_started();
        let _ = std::fs::remove_dir_all(&scratch);
    }));
}

/// Removes what the parent's environment would wrongly pass on.
fn clean_env(command: &mut Command) {
    for name in INHERITED {
        command.env_remove(name);
    }
}

/// Spawns `command` as the leader of a new process group and registers it.
fn spawn(command: &mut Command, what: &str) -> Result<(Child, i32)> {
    // Its own group: a Ctrl-C in the terminal reaches only the bench, which
    // then stops everything in order; and killpg reaches what it forks.
    let child = command
        .process_group(0)
        .spawn()
        .context(|| format!("cannot start {what}"))?;
    let pid = i32::try_from(child.id()).expect("pids fit in i32");
    register(pid);
    Ok((child, pid))
}

// ---------------------------------------------------------------------------
// The example app, run directly (Scenario A's restarts, D's "app alone")
// ---------------------------------------------------------------------------

/// hello binding `HELLO_ADDR` itself. SIGKILLed on drop unless it exited.
pub struct App {
    child: Child,
    pid: i32,
    exited: bool,
}

impl App {
    /// Starts hello on `address`; `generation` goes into its answers.
    pub fn start(
        hello: &Path,
        address: SocketAddr,
        generation: Option<u64>,
        boot_delay: Duration,
    ) -> Result<App> {
        let mut command = Command::new(hello);
        clean_env(&mut command);
        command
            .env("HELLO_ADDR", address.to_string())
            .env("HELLO_BOOT_DELAY_MS", boot_delay.as_millis().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(generation) = generation {
            command.env("BATON_GENERATION", generation.to_string());
        }
        let (child, pid) = spawn(&mut command, "the example app")?;
        Ok(App {
            child,
            pid,
            exited: false,
        })
    }

    pub fn terminate(&self) -> Result<()> {
        kill(Pid::from_raw(self.pid), Signal::SIGTERM)
            .map_err(|e| Error::Bench(format!("cannot send SIGTERM to hello {}: {e}", self.pid)))
    }

    /// An error if the app has exited (it should be serving).
    pub fn check_running(&mut self) -> Result<()> {
        match self.try_wait()? {
            Some(status) => Err(Error::Bench(format!(
                "the example app (pid {}) {status}; is its port taken?",
                self.pid
            ))),
            None => Ok(()),
        }
    }

    /// Waits until the app has exited; when it was seen gone.
    pub async fn wait_exit(&mut self, limit: Duration) -> Result<Instant> {
        let deadline = Instant::now() + limit;
        loop {
            if self.try_wait()?.is_some() {
                return Ok(Instant::now());
            }
            if Instant::now() >= deadline {
                return Err(Error::Bench(format!(
                    "the example app (pid {}) did not exit within {limit:?} of SIGTERM",
                    self.pid
                )));
            }
            sleep(Duration::from_millis(1)).await;
        }
    }

    fn try_wait(&mut self) -> Result<Option<std::process::ExitStatus>> {
        let status = self.child.try_wait().context(|| "waitpid")?;
        if status.is_some() && !self.exited {
            self.exited = true;
            unregister(self.pid);
        }
        Ok(status)
    }
}

impl Drop for App {
    fn drop(&mut self) {
        if !self.exited {
            let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
            let _ = self.child.wait();
            unregister(self.pid);
        }
    }
}

// ---------------------------------------------------------------------------
// baton
// ---------------------------------------------------------------------------

/// What goes into a baton config file.
#[derive(Debug, Clone)]
pub struct Setup {
    pub hello: PathBuf,
    /// TCP listeners on 127.0.0.1, each on a port the kernel picks.
    pub listeners: usize,
    pub boot_delay: Duration,
    /// `HELLO_FAIL`: "crash" or "never-ready" for a broken release.
    pub fail: Option<&'static str>,
    pub readiness_timeout: Duration,
}

impl Setup {
    fn render(&self, control: &Path) -> String {
        let mut toml = String::new();
        for i in 0..self.listeners {
            toml += &format!("[[listen]]\nname = \"l{i}\"\naddress = \"127.0.0.1:0\"\n\n");
        }
        let mut env = format!("HELLO_BOOT_DELAY_MS = \"{}\"", self.boot_delay.as_millis());
        if let Some(fail) = self.fail {
            env += &format!(", HELLO_FAIL = \"{fail}\"");
        }
        toml += &format!(
            "[app]\ncommand = [{:?}]\nenv = {{ {env} }}\n\n\
             [readiness]\ntimeout = \"{}ms\"\n\n\
             [drain]\ntimeout = \"10s\"\n\n\
             [control]\nsocket = {:?}\n",
            self.hello.display().to_string(),
            self.readiness_timeout.as_millis(),
            control.display().to_string(),
        );
        toml
    }
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
    /// The process is gone: "generation N (pid P) exited ..." or, for a
    /// candidate that died before it was ready, "generation N failed:
    /// exited ..." / "... failed: killed by ...".
    Exited,
}

impl Mark {
    /// The one place that knows baton's log wording.
    fn matches(self, generation: u64, message: &str) -> bool {
        let g = generation;
        match self {
            Mark::Starting => message == format!("starting generation {g}"),
            Mark::Spawned => message.starts_with(&format!("generation {g} started as pid ")),
            Mark::Ready => message.starts_with(&format!("generation {g} is ready after ")),
            Mark::Draining => message.starts_with(&format!("draining generation {g} (pid ")),
            Mark::Exited => {
                message.starts_with(&format!("generation {g} (pid "))
                    || message.starts_with(&format!("generation {g} failed: exited "))
                    || message.starts_with(&format!("generation {g} failed: killed "))
            }
        }
    }
}

/// One line of baton's JSON log.
#[derive(Debug, Clone)]
pub struct LogLine {
    pub at: SystemTime,
    pub message: String,
}

#[derive(Debug, Default)]
struct Log {
    lines: Vec<LogLine>,
    /// The pid of every generation baton started.
    generations: BTreeMap<u64, i32>,
}

/// `baton run --log-format json` on a config of its own. On drop: SIGTERM,
/// then SIGKILL after [`STOP_GRACE`], then SIGKILL to every generation's
/// process group that is left.
pub struct Baton {
    child: Child,
    pid: i32,
    exited: bool,
    config: PathBuf,
    control: PathBuf,
    log: Arc<Mutex<Log>>,
}

/// Replies to one control request, with the bench's clock.
pub struct Exchange {
    /// Just before the request was written.
    pub sent: SystemTime,
    pub replies: Vec<(SystemTime, Reply)>,
}

impl Exchange {
    /// The candidate's generation and pid.
    pub fn started(&self) -> Option<(u64, i32)> {
        self.replies.iter().find_map(|(_, r)| match r {
            Reply::Started { generation, pid } => Some((*generation, *pid)),
            _ => None,
        })
    }

    /// The generation told to drain, and its pid.
    pub fn draining(&self) -> Option<(u64, i32)> {
        self.replies.iter().find_map(|(_, r)| match r {
            Reply::Draining { generation, pid } => Some((*generation, *pid)),
            _ => None,
        })
    }

    /// When the outcome arrived, whether the deploy succeeded, and baton's
    /// words for it.
    pub fn done(&self) -> Option<(SystemTime, bool, String)> {
        self.replies.iter().find_map(|(at, r)| match r {
            Reply::Done { ok, message } => Some((*at, *ok, message.clone())),
            _ => None,
        })
    }
}

impl Baton {
    /// Writes `dir/baton.toml`, starts baton on it and waits until its
    /// first generation is ready.
    pub async fn start(baton: &Path, dir: &Path, setup: &Setup) -> Result<Baton> {
        std::fs::create_dir_all(dir).context(|| format!("cannot create {}", dir.display()))?;
        let config = dir.join("baton.toml");
        let control = dir.join("baton.sock");
        let mut command = Command::new(baton);
        clean_env(&mut command);
        command
            .args(["run", "--log-format", "json", "-c"])
            .arg(&config)
            .env("BATON_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        write_config(&config, &control, setup)?;
        let (mut child, pid) = spawn(&mut command, "baton")?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::<Mutex<Log>>::default();
        let reader_log = log.clone();
        std::thread::spawn(move || read_log(stderr, &reader_log));
        let mut baton = Baton {
            child,
            pid,
            exited: false,
            config,
            control,
            log,
        };
        baton
            .wait_mark(1, Mark::Ready, Duration::from_secs(15))
            .await?;
        Ok(baton)
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Rewrites the config file; the next reload deploys it.
    pub fn rewrite(&self, setup: &Setup) -> Result<()> {
        write_config(&self.config, &self.control, setup)
    }

    /// `baton reload --wait` over the control socket.
    pub async fn reload(&mut self) -> Result<Exchange> {
        let exchange = self.request(&Request::Reload { wait: true }).await?;
        for (_, reply) in &exchange.replies {
            if let Reply::Error { message } = reply {
                return Err(self.failure(&format!("reload refused: {message}")));
            }
        }
        Ok(exchange)
    }

    /// `baton status --json` over the control socket.
    pub async fn status(&mut self) -> Result<StatusDoc> {
        let exchange = self.request(&Request::Status).await?;
        let status = exchange.replies.into_iter().find_map(|(_, r)| match r {
            Reply::Status(doc) => Some(doc),
            _ => None,
        });
        status.ok_or_else(|| self.failure("no status in the reply"))
    }

    /// The addresses baton bound, in config order.
    pub async fn addresses(&mut self) -> Result<Vec<SocketAddr>> {
        let status = self.status().await?;
        let addresses = status.listeners.iter().map(|l| l.address.parse());
        addresses
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| self.failure(&format!("a listener address does not parse: {e}")))
    }

    /// The generation in state "ready", if any.
    pub async fn serving(&mut self) -> Result<Option<u64>> {
        let status = self.status().await?;
        let ready = status.generations.iter().find(|g| g.state == "ready");
        Ok(ready.map(|g| g.generation))
    }

    async fn request(&mut self, request: &Request) -> Result<Exchange> {
        let exchange = timeout(CONTROL_LIMIT, exchange(&self.control, request)).await;
        match exchange {
            Ok(Ok(exchange)) => Ok(exchange),
            Ok(Err(e)) => Err(self.failure(&format!("control socket: {e}"))),
            Err(_) => Err(self.failure(&format!("no reply within {CONTROL_LIMIT:?}"))),
        }
    }

    /// When baton logged `mark` for `generation`, if it has.
    pub fn mark(&self, generation: u64, mark: Mark) -> Option<SystemTime> {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let line = log
            .lines
            .iter()
            .find(|l| mark.matches(generation, &l.message));
        line.map(|l| l.at)
    }

    /// Waits until baton logs `mark` for `generation`.
    pub async fn wait_mark(
        &mut self,
        generation: u64,
        mark: Mark,
        limit: Duration,
    ) -> Result<SystemTime> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(at) = self.mark(generation, mark) {
                return Ok(at);
            }
            if let Some(status) = self.child.try_wait().context(|| "waitpid")? {
                self.exited = true;
                unregister(self.pid);
                return Err(self.failure(&format!("baton {status}")));
            }
            if Instant::now() >= deadline {
                let what = format!("no {mark:?} of generation {generation} within {limit:?}");
                return Err(self.failure(&what));
            }
            sleep(Duration::from_millis(2)).await;
        }
    }

    /// Every generation baton started (whose pid it logged).
    pub fn generations(&self) -> Vec<u64> {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.generations.keys().copied().collect()
    }

    /// An error naming `what`, with the end of baton's log.
    fn failure(&self, what: &str) -> Error {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let tail: Vec<&str> = log
            .lines
            .iter()
            .rev()
            .take(15)
            .map(|l| l.message.as_str())
            .collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        Error::Bench(format!(
            "baton (pid {}): {what}\nits last log lines:\n  {}",
            self.pid,
            tail.join("\n  ")
        ))
    }
}

impl Drop for Baton {
    fn drop(&mut self) {
        if !self.exited {
            // Graceful first, so its generations drain and exit by themselves.
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGTERM);
            if !wait_blocking(&mut self.child, STOP_GRACE) {
                let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
                let _ = self.child.wait();
            }
            unregister(self.pid);
        }
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        for &pid in log.generations.values() {
            kill_group(pid);
            unregister(pid);
        }
    }
}

fn write_config(config: &Path, control: &Path, setup: &Setup) -> Result<()> {
    std::fs::write(config, setup.render(control))
        .context(|| format!("cannot write {}", config.display()))
}

/// Polls `child` for up to `limit`; true once it has exited.
fn wait_blocking(child: &mut Child, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// One request on the control socket: the replies until the last one.
async fn exchange(control: &Path, request: &Request) -> std::io::Result<Exchange> {
    let stream = UnixStream::connect(control).await?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    let sent = SystemTime::now();
    write.write_all(line.as_bytes()).await?;
    let mut lines = tokio::io::BufReader::new(read).lines();
    let mut replies = Vec::new();
    while let Some(line) = lines.next_line().await? {
        let reply: Reply = serde_json::from_str(&line)?;
        let last = matches!(
            reply,
            Reply::Done { .. } | Reply::Error { .. } | Reply::Status(_) | Reply::Accepted
        );
        replies.push((SystemTime::now(), reply));
        if last {
            break;
        }
    }
    Ok(Exchange { sent, replies })
}

/// Reads baton's stderr until it closes: JSON lines are kept, the
/// generations' own lines (hello writes to the same stderr) are skipped.
fn read_log(stderr: ChildStderr, log: &Mutex<Log>) {
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        let Some((entry, started)) = parse_log_line(&line) else {
            continue;
        };
        let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((generation, pid)) = started {
            register(pid);
            log.generations.insert(generation, pid);
        }
        log.lines.push(entry);
    }
}

/// A JSON log line, and (generation, pid) if it announces a started one.
fn parse_log_line(line: &str) -> Option<(LogLine, Option<(u64, i32)>)> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let at = humantime::parse_rfc3339(value["timestamp"].as_str()?).ok()?;
    let fields = &value["fields"];
    let message = fields["message"].as_str()?.to_owned();
    let started = match (fields["generation"].as_u64(), fields["pid"].as_str()) {
        (Some(g), Some(pid)) if Mark::Spawned.matches(g, &message) => {
            pid.parse().ok().map(|pid| (g, pid))
        }
        _ => None,
    };
    Some((LogLine { at, message }, started))
}

// ---------------------------------------------------------------------------
// /proc
// ---------------------------------------------------------------------------

/// CPU time of all threads of `pid`, from `/proc/<pid>/task/*/schedstat`
/// (its first field is nanoseconds on the CPU: far finer than the clock
/// ticks of `/proc/<pid>/stat`).
pub fn cpu_time(pid: i32) -> Result<Duration> {
    let tasks = format!("/proc/{pid}/task");
    let mut nanos = 0u64;
    for task in std::fs::read_dir(&tasks).context(|| format!("cannot list {tasks}"))? {
        let path = task
            .context(|| format!("cannot list {tasks}"))?
            .path()
            .join("schedstat");
        let text = std::fs::read_to_string(&path).unwrap_or_default(); // a thread may just have exited
        nanos += text
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
    }
    Ok(Duration::from_nanos(nanos))
}

/// Resident memory and open file descriptors of a process.
#[derive(Debug, Clone, Copy)]
pub struct Footprint {
    pub rss_kib: u64,
    pub fds: usize,
}

impl Footprint {
    pub fn of(pid: i32) -> Result<Footprint> {
        let path = format!("/proc/{pid}/status");
        let status = std::fs::read_to_string(&path).context(|| format!("cannot read {path}"))?;
        let rss = status.lines().find_map(|l| l.strip_prefix("VmRSS:"));
        let rss_kib = rss
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| Error::Bench(format!("no VmRSS in {path}")))?;
        let dir = format!("/proc/{pid}/fd");
        let fds = std::fs::read_dir(&dir)
            .context(|| format!("cannot list {dir}"))?
            .count();
        Ok(Footprint { rss_kib, fds })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_are_parsed_and_pids_learned() {
        let line = r#"{"timestamp":"2026-11-27T21:05:17.788809Z","level":"INFO","fields":{"message":"generation 1 started as pid 26545","generation":1,"pid":"26545"}}"#;
        let (entry, started) = parse_log_line(line).unwrap();
        assert_eq!(started, Some((1, 26545)));
        assert!(Mark::Spawned.matches(1, &entry.message));
        assert!(!Mark::Spawned.matches(11, &entry.message));
        assert!(parse_log_line("hello: generation 1 pid 26545 serving").is_none());
    }

    #[test]
    fn exits_are_recognised_in_every_wording() {
        assert!(Mark::Exited.matches(6, "generation 6 (pid 99) exited with code 0"));
        assert!(Mark::Exited.matches(
            3,
            "generation 3 failed: exited with code 3 before it was ready"
        ));
        assert!(!Mark::Exited.matches(3, "generation 3 failed: not ready within 1.0 s"));
        assert!(!Mark::Draining.matches(6, "generation 6 (pid 99) exited with code 0"));
    }

    #[test]
    fn config_renders_every_listener() {
        let setup = Setup {
            hello: "/x/hello".into(),
            listeners: 3,
            boot_delay: Duration::from_millis(200),
            fail: Some("crash"),
            readiness_timeout: Duration::from_secs(1),
        };
        let toml = setup.render(Path::new("/tmp/b.sock"));
        assert_eq!(toml.matches("[[listen]]").count(), 3);
        assert!(toml.contains("HELLO_FAIL = \"crash\""));
        assert!(toml.contains("timeout = \"1000ms\""));
    }
}
