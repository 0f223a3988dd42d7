//! A running `baton run` with a temp dir, config and control socket of its
//! own, supervising the example app (`examples/hello.rs`, which speaks the
//! child contract and takes fault injection from `HELLO_*` variables).
//!
//! The harness talks to baton through its CLI (what the tests check) and
//! through the control socket (typed replies with the harness's clock, for
//! the bench), and reads its stderr through the one [`Log`] reader. baton
//! and every generation it started are killed when the [`Baton`] drops,
//! also when a test fails.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime};

use baton::control::{encode, Reply, Request, StatusDoc};
use baton::notice::Notice;
use nix::sys::signal::Signal;

use crate::log::{Log, LogLine, Mark};
use crate::{activate, procs, Binaries, Context, Error, Result};

/// How long baton may take to start its first generation.
const START_LIMIT: Duration = Duration::from_secs(20);
/// Bounds every exchange on baton's control socket.
const CONTROL_LIMIT: Duration = Duration::from_secs(60);
/// How many of baton's last log lines an error shows.
const TAIL: usize = 15;

/// One `[[listen]]` table.
#[derive(Debug, Clone)]
pub struct Listen {
    pub name: String,
    /// `127.0.0.1:0`, `unix:/path`, ...
    pub address: String,
    /// More keys of the table, e.g. `mode = "0600"`.
    pub options: String,
}

impl Listen {
    pub fn new(name: &str, address: impl Into<String>) -> Listen {
        Listen {
            name: name.to_owned(),
            address: address.into(),
            options: String::new(),
        }
    }

    /// A unix socket listener at `path`.
    pub fn unix(name: &str, path: &Path) -> Listen {
        Listen::new(name, format!("unix:{}", path.display()))
    }

    /// Adds keys to the table.
    pub fn with(mut self, options: &str) -> Listen {
        self.options = options.to_owned();
        self
    }
}

/// Which baton to run, and what goes into its config file.
#[derive(Debug, Clone)]
pub struct Setup {
    pub baton: PathBuf,
    /// In config order; the first one's port is [`Baton::port`].
    pub listeners: Vec<Listen>,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// More lines of `[app]` (user, umask, limits, ...).
    pub app: String,
    /// The body of `[readiness]`.
    pub readiness: String,
    pub drain_timeout: String,
    /// More lines of `[control]` (its socket is the harness's).
    pub control: String,
    /// The body of `[health]` (none when empty).
    pub health: String,
    /// More tables, at the end of the file (`[state]`, `[deploy]`).
    pub extra: String,
}

impl Setup {
    /// baton running the example app, one TCP listener `http` on
    /// 127.0.0.1 at a port the kernel picks, 20 s to become ready, 20 s to
    /// drain.
    pub fn new(binaries: &Binaries) -> Setup {
        Setup {
            baton: binaries.baton.clone(),
            listeners: vec![Listen::new("http", "127.0.0.1:0")],
            command: vec![binaries.hello.display().to_string()],
            env: BTreeMap::new(),
            app: String::new(),
            readiness: "timeout = \"20s\"".into(),
            drain_timeout: "20s".into(),
            control: String::new(),
            health: String::new(),
            extra: String::new(),
        }
    }

    /// Sets a variable of the app's environment (`[app] env`).
    pub fn env(mut self, key: &str, value: &str) -> Setup {
        self.env.insert(key.into(), value.into());
        self
    }

    /// Adds a listener after the others.
    pub fn listen(mut self, listen: Listen) -> Setup {
        self.listeners.push(listen);
        self
    }

    pub fn readiness_timeout(mut self, timeout: Duration) -> Setup {
        self.readiness = format!("timeout = \"{}ms\"", timeout.as_millis());
        self
    }

    pub fn drain_timeout(mut self, timeout: Duration) -> Setup {
        self.drain_timeout = format!("{}ms", timeout.as_millis());
        self
    }

    /// The config file, with its control socket at `control`.
    pub fn render(&self, control: &Path) -> String {
        let quoted = |items: &mut dyn Iterator<Item = String>| items.collect::<Vec<_>>().join(", ");
        let mut toml = String::new();
        for l in &self.listeners {
            toml += &format!(
                "[[listen]]\nname = {:?}\naddress = {:?}\n{}\n",
                l.name, l.address, l.options
            );
        }
        toml += &format!(
            "[app]\ncommand = [{}]\nenv = {{ {} }}\n{}\n\
             [readiness]\n{}\n\n\
             [drain]\ntimeout = {:?}\n\n\
             [restart]\nbackoff_initial = \"50ms\"\nbackoff_max = \"500ms\"\n\n\
             [control]\nsocket = {:?}\n{}\n",
            quoted(&mut self.command.iter().map(|c| format!("{c:?}"))),
            quoted(&mut self.env.iter().map(|(k, v)| format!("{k} = {v:?}"))),
            self.app,
            self.readiness,
            self.drain_timeout,
            control.display().to_string(),
            self.control,
        );
        if !self.health.is_empty() {
            toml += &format!("\n[health]\n{}\n", self.health);
        }
        toml += &self.extra;
        toml
    }
}

/// How baton is started, beyond its config.
#[derive(Default)]
pub struct Launch<'a> {
    /// Options of `baton run` before `-c CONFIG`, e.g. `--log-format json`.
    pub args: Vec<String>,
    /// baton's environment on top of the harness's (cleaned of what would
    /// make it think it was socket activated or supervised).
    pub env: Vec<(String, String)>,
    /// Sockets passed to baton as systemd passes them (fds 3.. and
    /// `LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID`), by name.
    pub sockets: Vec<(&'a str, BorrowedFd<'a>)>,
    /// A program (and its arguments) that execs baton's command line,
    /// appended to it, e.g. `systemd-socket-activate --listen=...`.
    pub wrapper: Vec<String>,
    /// Where baton's temp dir goes (default: the system's temp dir).
    pub parent: Option<PathBuf>,
}

impl<'a> Launch<'a> {
    pub fn arg(mut self, arg: &str) -> Launch<'a> {
        self.args.push(arg.to_owned());
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Launch<'a> {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn socket(mut self, name: &'a str, fd: BorrowedFd<'a>) -> Launch<'a> {
        self.sockets.push((name, fd));
        self
    }

    pub fn wrapper(mut self, argv: &[&str]) -> Launch<'a> {
        self.wrapper = argv.iter().map(|a| a.to_string()).collect();
        self
    }

    pub fn parent(mut self, dir: &Path) -> Launch<'a> {
        self.parent = Some(dir.to_owned());
        self
    }
}

/// A running `baton run`. On drop it is frozen, its children noted, and
/// everything SIGKILLed: baton, its generations' process groups, and any
/// orphan it had adopted.
pub struct Baton {
    child: Child,
    pid: i32,
    exited: Option<ExitStatus>,
    baton: PathBuf,
    dir: tempfile::TempDir,
    config: PathBuf,
    control: PathBuf,
    port: u16,
    log: Arc<Log>,
    /// Where the next [`Baton::wait_log`] starts reading.
    cursor: usize,
}

impl Baton {
    /// Starts baton on `setup` and waits until its first generation is
    /// ready.
    pub fn start(setup: &Setup) -> Result<Baton> {
        Baton::start_with(setup, Launch::default())
    }

    /// [`Baton::start`], started as `launch` says.
    pub fn start_with(setup: &Setup, launch: Launch) -> Result<Baton> {
        let mut baton = Baton::launch(setup, launch)?;
        baton.wait_ready(1, START_LIMIT)?;
        baton.port = baton
            .status_doc()?
            .listeners
            .first()
            .and_then(|l| l.address.parse::<SocketAddr>().ok())
            .map_or(0, |a| a.port());
        Ok(baton)
    }

    /// Starts baton without waiting for anything.
    pub fn launch(setup: &Setup, launch: Launch) -> Result<Baton> {
        let dir = match &launch.parent {
            Some(parent) => tempfile::Builder::new().prefix("baton-").tempdir_in(parent),
            None => tempfile::Builder::new().prefix("baton-").tempdir(),
        }
        .context(|| "cannot create a temp dir")?;
        let config = dir.path().join("app.toml");
        let control = dir.path().join("baton.sock");
        write_config(&config, &control, setup)?;
        let mut run: Vec<OsString> = vec!["run".into()];
        // JSON records carry typed notices, which the kit waits on.
        if !launch.args.iter().any(|a| a.starts_with("--log-format")) {
            run.extend(["--log-format".into(), "json".into()]);
        }
        run.extend(launch.args.iter().map(OsString::from));
        run.extend(["-c".into(), config.clone().into_os_string()]);
        let mut command = if !launch.sockets.is_empty() {
            activate::command(&setup.baton, &run, &launch.sockets)
                .context(|| "cannot pass the sockets")?
        } else if let Some((program, args)) = launch.wrapper.split_first() {
            let mut command = Command::new(program);
            procs::clean_env(&mut command);
            command.args(args).arg(&setup.baton).args(&run);
            command
        } else {
            let mut command = Command::new(&setup.baton);
            procs::clean_env(&mut command);
            command.args(&run);
            command
        };
        command
            .env("BATON_LOG", "info")
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let (mut child, pid) = procs::spawn(&mut command, "baton")?;
        let stderr = child.stderr.take().expect("stderr is piped");
        Ok(Baton {
            child,
            pid,
            exited: None,
            baton: setup.baton.clone(),
            dir,
            config,
            control,
            port: 0,
            log: Log::read(stderr),
            cursor: 0,
        })
    }

    /// baton's pid (the wrapper's, which execs baton, when there is one).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// baton's temp dir: its config, control socket and notify socket.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config(&self) -> &Path {
        &self.config
    }

    pub fn control(&self) -> &Path {
        &self.control
    }

    /// The port of the first listener, once [`Baton::start`] learnt it.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Rewrites the config file; the next reload deploys it.
    pub fn rewrite(&self, setup: &Setup) -> Result<()> {
        write_config(&self.config, &self.control, setup)
    }

    /// Sends `signal` to baton.
    pub fn signal(&self, signal: Signal) {
        procs::signal(self.pid, signal);
    }

    // -----------------------------------------------------------------
    // The log

    /// Waits for a line of baton's stderr (its own or its generations')
    /// containing `needle`, after the one the previous `wait_log` returned;
    /// returns it whole.
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let what = format!("a log line containing {needle:?}");
        let (i, line) = self.wait_line(self.cursor, &what, timeout, |l| l.raw.contains(needle))?;
        self.cursor = i + 1;
        Ok(line.raw)
    }

    /// Waits for a notice satisfying `matches`, after the line the previous
    /// wait returned; returns it.
    pub fn wait_notice(
        &mut self,
        what: &str,
        timeout: Duration,
        mut matches: impl FnMut(&Notice) -> bool,
    ) -> Result<Notice> {
        let (i, line) = self.wait_line(self.cursor, what, timeout, |l| {
            l.notice.as_ref().is_some_and(&mut matches)
        })?;
        self.cursor = i + 1;
        Ok(line.notice.expect("matched a notice"))
    }

    /// Waits for a notice satisfying `matches` logged at any time since
    /// baton started (the cursor of [`Baton::wait_notice`] is neither used
    /// nor moved): for what may come before or after another awaited
    /// notice.
    pub fn wait_notice_ever(
        &self,
        what: &str,
        timeout: Duration,
        mut matches: impl FnMut(&Notice) -> bool,
    ) -> Result<Notice> {
        let (_, line) = self.wait_line(0, what, timeout, |l| {
            l.notice.as_ref().is_some_and(&mut matches)
        })?;
        Ok(line.notice.expect("matched a notice"))
    }

    /// Waits until generation `generation` is ready (from the cursor of
    /// [`Baton::wait_notice`], which it moves past that line).
    pub fn wait_ready(&mut self, generation: u64, timeout: Duration) -> Result<()> {
        let what = format!("generation {generation} ready");
        self.wait_notice(&what, timeout, |n| Mark::Ready.matches(generation, n))
            .map(drop)
    }

    /// Waits until generation `old` has exited (after a deploy, until then
    /// it may still accept, as it should).
    pub fn wait_drained(&mut self, old: u64) -> Result<()> {
        self.wait_mark(old, Mark::Exited, Duration::from_secs(30))
            .map(drop)
    }

    /// Waits until `mark` of `generation` is logged (at any time since baton
    /// started); when it happened, by baton's clock for its marks, by the
    /// app's for the app's ([`Mark::AppReadySent`], [`Mark::AppDrainSignal`]).
    pub fn wait_mark(&self, generation: u64, mark: Mark, timeout: Duration) -> Result<SystemTime> {
        let what = format!("{mark:?} of generation {generation}");
        let (_, line) = self.wait_line(0, &what, timeout, |l| l.is_mark(generation, mark))?;
        Ok(line.at)
    }

    /// When `mark` of `generation` happened, if it is logged (see
    /// [`Baton::wait_mark`]).
    pub fn mark(&self, generation: u64, mark: Mark) -> Option<SystemTime> {
        self.log.mark(generation, mark)
    }

    /// Whether any line so far contains `needle`.
    pub fn log_contains(&self, needle: &str) -> bool {
        self.log.find(|l| l.raw.contains(needle)).is_some()
    }

    /// Every notice baton logged so far.
    pub fn notices(&self) -> Vec<Notice> {
        self.log.notices()
    }

    /// Every generation baton logged starting, with its pid.
    pub fn started_generations(&self) -> BTreeMap<u64, i32> {
        self.log.generations()
    }

    fn wait_line(
        &self,
        from: usize,
        what: &str,
        timeout: Duration,
        matches: impl FnMut(&LogLine) -> bool,
    ) -> Result<(usize, LogLine)> {
        let deadline = Instant::now() + timeout;
        self.log
            .wait(from, deadline, matches)
            .ok_or_else(|| self.failure(&format!("no {what} within {timeout:?}")))
    }

    /// An error naming `what`, with the end of baton's log.
    pub fn failure(&self, what: &str) -> Error {
        Error::Failed(format!(
            "baton (pid {}): {what}\nits last log lines:\n  {}",
            self.pid,
            self.log.tail(TAIL).join("\n  ")
        ))
    }

    // -----------------------------------------------------------------
    // The CLI (what the tests check; failures to run it panic)

    /// Runs `baton <args> -c <config>`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(&self.baton)
            .args(args)
            .arg("-c")
            .arg(&self.config)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.baton.display()))
    }

    /// Starts `baton <args> -c <config>` in the background.
    pub fn cli_start(&self, args: &[&str]) -> Cli {
        let mut command = Command::new(&self.baton);
        command
            .args(args)
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let (mut child, pid) =
            procs::spawn(&mut command, "the baton CLI").unwrap_or_else(|e| panic!("{e}"));
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout is piped");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut stderr = child.stderr.take().expect("stderr is piped");
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        Cli {
            child,
            pid,
            lines,
            stdout: Vec::new(),
            stderr: Some(stderr),
        }
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

    /// `baton status --json`.
    pub fn status(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--json"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{}",
            self.failure(&format!("status failed: {stderr}"))
        );
        serde_json::from_slice(&out.stdout).expect("status --json prints JSON")
    }

    /// (generation, state) of every generation, current first.
    pub fn generations(&self) -> Vec<(u64, String)> {
        let status = self.status();
        let generations = status["generations"].as_array().expect("generations");
        generations
            .iter()
            .map(|g| {
                let generation = g["generation"].as_u64().expect("a generation number");
                (generation, g["state"].as_str().expect("a state").to_owned())
            })
            .collect()
    }

    /// The pid of the ready generation.
    pub fn current_pid(&self) -> i32 {
        let status = self.status();
        let generations = status["generations"].as_array().expect("generations");
        let current = generations.iter().find(|g| g["state"] == "ready");
        let pid = current.and_then(|g| g["pid"].as_i64());
        let pid = pid.unwrap_or_else(|| panic!("no ready generation: {status}"));
        i32::try_from(pid).expect("pids fit in i32")
    }

    // -----------------------------------------------------------------
    // The control socket (typed, timed; for the bench)

    /// A reload with `wait` over the control socket; an error if baton
    /// refused it.
    pub fn reload(&self) -> Result<Exchange> {
        let exchange = self.request(&Request::Reload { wait: true })?;
        for (_, reply) in &exchange.replies {
            if let Reply::Error { message } = reply {
                return Err(self.failure(&format!("reload refused: {message}")));
            }
        }
        Ok(exchange)
    }

    /// The status document over the control socket.
    pub fn status_doc(&self) -> Result<StatusDoc> {
        let exchange = self.request(&Request::Status)?;
        let status = exchange.replies.into_iter().find_map(|(_, r)| match r {
            Reply::Status(doc) => Some(doc),
            _ => None,
        });
        status.ok_or_else(|| self.failure("no status in the reply"))
    }

    /// The TCP addresses baton bound, in config order.
    pub fn addresses(&self) -> Result<Vec<SocketAddr>> {
        let status = self.status_doc()?;
        let addresses = status.listeners.iter().map(|l| l.address.parse());
        addresses
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| self.failure(&format!("a listener address does not parse: {e}")))
    }

    /// The generation in state "ready", if any.
    pub fn serving(&self) -> Result<Option<u64>> {
        let status = self.status_doc()?;
        let ready = status.generations.iter().find(|g| g.state == "ready");
        Ok(ready.map(|g| g.generation))
    }

    fn request(&self, request: &Request) -> Result<Exchange> {
        exchange(&self.control, request, CONTROL_LIMIT)
            .map_err(|e| self.failure(&format!("control socket: {e}")))
    }

    // -----------------------------------------------------------------
    // The end

    /// Waits for baton to exit; its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<i32>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Ok(status.code());
            }
            if Instant::now() >= deadline {
                return Err(self.failure(&format!("still running after {timeout:?}")));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// SIGKILL to baton and to everything it started: a crash. baton is
    /// stopped first, so it forks nothing while its children are listed.
    pub fn kill_all(&mut self) {
        let mut children = Vec::new();
        if self.try_wait().is_none() {
            procs::signal(self.pid, Signal::SIGSTOP);
            children = procs::children(self.pid);
            procs::signal(self.pid, Signal::SIGKILL);
            self.exited = self.child.wait().ok();
        }
        procs::unregister(self.pid);
        for pid in children {
            procs::kill_group(pid);
            // An adopted orphan may lead no group of its own.
            procs::signal(pid, Signal::SIGKILL);
        }
        // Generations baton reported gone were reaped: their pids may
        // belong to another test's processes by now.
        let notices = self.log.notices();
        let gone = |g: u64| notices.iter().any(|n| Mark::Exited.matches(g, n));
        for (generation, pid) in self.log.generations() {
            if !gone(generation) {
                procs::kill_group(pid);
            }
            procs::unregister(pid);
        }
    }
}

impl Drop for Baton {
    fn drop(&mut self) {
        self.kill_all();
    }
}

fn write_config(config: &Path, control: &Path, setup: &Setup) -> Result<()> {
    std::fs::write(config, setup.render(control))
        .context(|| format!("cannot write {}", config.display()))
}

/// A `baton` CLI command running in the background, its output read as it
/// comes. Killed on drop unless it finished.
pub struct Cli {
    child: Child,
    pid: i32,
    lines: mpsc::Receiver<String>,
    /// Its stdout lines so far.
    stdout: Vec<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Cli {
    /// Waits for a line of its stdout containing `needle`; returns it.
    pub fn wait_line(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.stdout.push(line.clone());
                    if line.contains(needle) {
                        return Ok(line);
                    }
                }
                Err(_) => {
                    return Err(Error::Failed(format!(
                        "the CLI (pid {}) printed no line containing {needle:?} within \
                         {timeout:?}; its stdout:\n{}",
                        self.pid,
                        self.stdout.join("\n")
                    )))
                }
            }
        }
    }

    /// Waits until it exits: (exit code, stdout, stderr).
    pub fn finish(mut self, timeout: Duration) -> Result<(i32, String, String)> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().context(|| "waitpid")? {
                break status;
            }
            if Instant::now() >= deadline {
                return Err(Error::Failed(format!(
                    "the CLI (pid {}) still runs after {timeout:?}",
                    self.pid
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        procs::unregister(self.pid);
        // Its pipes are closed now that it exited (it forks nothing).
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(10)) {
            self.stdout.push(line);
        }
        let stderr = self.stderr.take().map(|t| t.join().unwrap_or_default());
        let mut stdout = self.stdout.join("\n");
        stdout.push('\n');
        Ok((
            status.code().unwrap_or(-1),
            stdout,
            stderr.unwrap_or_default(),
        ))
    }
}

impl Drop for Cli {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            procs::kill_group(self.pid);
            let _ = self.child.wait();
        }
        procs::unregister(self.pid);
    }
}

/// Replies to one control request, with the harness's clock.
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

/// One request on the control socket: the replies until the last one, all
/// within `limit`.
fn exchange(control: &Path, request: &Request, limit: Duration) -> io::Result<Exchange> {
    let deadline = Instant::now() + limit;
    let mut stream = UnixStream::connect(control)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let sent = SystemTime::now();
    stream.write_all(encode(request).as_bytes())?;
    let mut replies = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no complete reply within {limit:?}"),
            ));
        }
        stream.set_read_timeout(Some(left))?;
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            break;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn binaries() -> Binaries {
        Binaries::in_dir(Path::new("/x"))
    }

    #[test]
    fn config_renders_every_listener_and_keeps_command_on_line_six() {
        let setup = Setup::new(&binaries())
            .env("HELLO_FAIL", "crash")
            .readiness_timeout(Duration::from_secs(1));
        let toml = setup.render(Path::new("/tmp/b.sock"));
        // Tests expect errors about `command` at app.toml:6.
        assert_eq!(
            toml.lines().nth(5),
            Some("command = [\"/x/examples/hello\"]")
        );
        assert!(toml.contains("env = { HELLO_FAIL = \"crash\" }"));
        assert!(toml.contains("timeout = \"1000ms\""));
        let setup = Setup {
            listeners: (0..3)
                .map(|i| Listen::new(&format!("l{i}"), "127.0.0.1:0"))
                .collect(),
            ..setup
        };
        let toml = setup.render(Path::new("/tmp/b.sock"));
        assert_eq!(toml.matches("[[listen]]").count(), 3);
    }
}
