//! The IO shell: one task on a current_thread runtime owns the supervisor
//! core and turns the world into its events (signals, child exits, notify
//! datagrams, control requests, deadlines) and its actions into syscalls.
//! No locks: control connections talk to the loop through a channel and
//! carry their own reply channel.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::config::{notify_socket_for, Config, ConfigError};
use crate::control::{encode, parse_request, Reply, Request, StatusDoc, MAX_REQUEST};
use crate::core::{Action, Event, ExitStatus, Supervisor, WaiterId};
use crate::notify::{NotifySocket, UpstreamNotifier};
use crate::sockets::{bind_unix, Listeners, SocketError};
use crate::spawn;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error("cannot create the control socket {}: {source}", path.display())]
    Control {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create the notify socket {}: {source} (baton needs to create files in that directory, the control socket's)", path.display())]
    Notify {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the event loop: {0}")]
    Runtime(std::io::Error),
}

/// Variables systemd sets for baton itself; a child must not see baton's
/// values (it gets its own LISTEN_* and NOTIFY_SOCKET).
const SYSTEMD_VARS: &[&str] = &[
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "LISTEN_PIDFDID",
    "BATON_GENERATION",
];

/// How `baton run` was asked to behave beyond the config file.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Push the listeners into systemd's fd store (`FDSTORE=1`), so they
    /// survive a crash of baton itself. Also on when systemd says the store
    /// exists (`$FDSTORE`, systemd ≥ 254).
    pub fd_store: bool,
}

/// Runs the daemon until it is stopped. Returns the exit code.
pub fn run(config_path: &Path, options: Options) -> Result<i32, DaemonError> {
    let config = Arc::new(Config::load(config_path)?);
    // Orphans of the application (a daemonizing helper, say) are
    // reparented to baton instead of init, and reaped by its reaper: no
    // zombies, even when baton is PID 1 of an appliance image (where this
    // is implied).
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::warn!("cannot become a child subreaper: {e}");
    }
    // Everything read from the environment is read now, single-threaded.
    let upstream = UpstreamNotifier::from_env();
    let watchdog = crate::notify::watchdog_from_env();
    let fd_store = options.fd_store
        || std::env::var("FDSTORE").is_ok_and(|n| n.parse::<u32>().is_ok_and(|n| n > 0));
    let base_env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| !SYSTEMD_VARS.iter().any(|v| k == v))
        .collect();
    let control_path = config.control_socket.clone();
    let control = bind_control(&config)?;
    let listeners = match Listeners::open(&config) {
        Ok(listeners) => listeners,
        Err(e) => {
            let _ = std::fs::remove_file(&control_path);
            return Err(e.into());
        }
    };
    if let Some(upstream) = upstream.as_ref().filter(|_| fd_store) {
        listeners.store_in(upstream);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    runtime.block_on(async {
        let control = UnixListener::from_std(control).map_err(|source| DaemonError::Control {
            path: control_path.clone(),
            source,
        })?;
        let notify_path = notify_socket_for(&control_path);
        let notify = NotifySocket::bind(&notify_path).map_err(|source| DaemonError::Notify {
            path: notify_path.clone(),
            source,
        })?;
        let mut shell = Shell {
            supervisor: None,
            config,
            listeners,
            notify_path: notify_path.clone(),
            upstream,
            watchdog,
            base_env,
            waiters: HashMap::new(),
            next_waiter: 1,
            stop_waiters: Vec::new(),
            exit: None,
        };
        let code = shell.run(control, notify).await;
        shell.listeners.remove_files();
        let _ = std::fs::remove_file(&control_path);
        let _ = std::fs::remove_file(&notify_path);
        Ok(code)
    })
}

/// Binds the control socket: 0600, or 0660 owned by `[control] group`; its
/// directory is created. Bound first of all sockets, so a second baton on
/// the same config says so plainly.
fn bind_control(config: &Config) -> Result<std::os::unix::net::UnixListener, DaemonError> {
    let path = &config.control_socket;
    let err = |source| DaemonError::Control {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let mode = if config.control_group.is_some() {
        0o660
    } else {
        0o600
    };
    let socket = bind_unix(path, mode).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            err(std::io::Error::new(
                e.kind(),
                format!("{e}: another baton runs with this config (`baton status` asks it; stop it first)"),
            ))
        } else {
            err(e)
        }
    })?;
    if let Some(group) = &config.control_group {
        let gid = nix::unistd::Gid::from_raw(group.gid);
        nix::unistd::chown(path, None, Some(gid)).map_err(|e| err(e.into()))?;
    }
    socket.listen(64).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    Ok(std::os::unix::net::UnixListener::from(
        std::os::fd::OwnedFd::from(socket),
    ))
}

/// Who may use the control socket: root, baton's own user, and members of
/// `[control] group` (primary or supplementary).
fn peer_allowed(cred: &tokio::net::unix::UCred, group: Option<u32>) -> bool {
    if cred.uid() == 0 || cred.uid() == nix::unistd::geteuid().as_raw() {
        return true;
    }
    let Some(gid) = group else { return false };
    if cred.gid() == gid {
        return true;
    }
    // Supplementary groups, from the peer's /proc entry.
    let groups = cred
        .pid()
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .unwrap_or_default();
    groups
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .is_some_and(|list| list.split_whitespace().any(|g| g == gid.to_string()))
}

/// A control request on its way to the loop, with its reply channel.
struct ControlCommand {
    request: Request,
    reply: mpsc::UnboundedSender<Reply>,
}

struct Shell {
    /// Set once the loop's event sources exist (the first spawn needs them).
    supervisor: Option<Supervisor>,
    /// The latest valid config (what SIGHUP compares the file against).
    config: Arc<Config>,
    listeners: Listeners,
    notify_path: PathBuf,
    upstream: Option<UpstreamNotifier>,
    /// systemd's watchdog interval; pinged at half of it from the loop, so
    /// a wedged loop is noticed.
    watchdog: Option<std::time::Duration>,
    base_env: Vec<(OsString, OsString)>,
    waiters: HashMap<WaiterId, mpsc::UnboundedSender<Reply>>,
    next_waiter: WaiterId,
    /// `baton stop` clients: their connections close when baton exits.
    stop_waiters: Vec<mpsc::UnboundedSender<Reply>>,
    exit: Option<i32>,
}

impl Shell {
    async fn run(&mut self, control: UnixListener, notify: NotifySocket) -> i32 {
        // Handlers first: a child may exit, or systemd may send SIGHUP, as
        // soon as the first generation is started.
        let install = |kind| signal(kind).expect("installing a signal handler");
        let mut sigchld = install(SignalKind::child());
        let mut sighup = install(SignalKind::hangup());
        let mut sigterm = install(SignalKind::terminate());
        let mut sigint = install(SignalKind::interrupt());
        let mut sigquit = install(SignalKind::quit());
        let (commands_tx, mut commands) = mpsc::unbounded_channel::<ControlCommand>();

        let clock = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        let seed = u64::from(std::process::id()) ^ clock.map_or(0, |d| d.as_nanos() as u64);
        let (supervisor, actions) = Supervisor::new(self.config.clone(), Instant::now(), seed);
        self.supervisor = Some(supervisor);
        self.execute(actions);

        let mut watchdog = self
            .watchdog
            .map(|interval| tokio::time::interval(interval / 2));
        while self.exit.is_none() {
            let deadline = self.supervisor().next_deadline();
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = sigchld.recv() => self.reap(),
                _ = sighup.recv() => {
                    tracing::info!("SIGHUP: reloading");
                    self.reload(None, false);
                }
                _ = sigterm.recv() => self.event(Event::Stop { fast: false }),
                _ = sigint.recv() => self.event(Event::Stop { fast: false }),
                _ = sigquit.recv() => self.event(Event::Stop { fast: true }),
                received = notify.recv() => match received {
                    Ok((pid, message)) => self.event(Event::Notify { pid, message }),
                    Err(e) => tracing::warn!("notify socket: {e}"),
                },
                Some(command) = commands.recv() => self.control(command),
                accepted = control.accept() => match accepted {
                    Ok((stream, _)) => {
                        let group = self.config.control_group.as_ref().map(|g| g.gid);
                        tokio::spawn(serve_connection(stream, group, commands_tx.clone()));
                    }
                    Err(e) => tracing::warn!("control socket: {e}"),
                },
                _ = sleep => {
                    // Exits first: a candidate that died just as its
                    // `delay` ran out must not be promoted.
                    self.reap();
                    self.event(Event::Tick);
                }
                _ = async { watchdog.as_mut().expect("checked").tick().await }, if watchdog.is_some() => {
                    if let Some(upstream) = &self.upstream {
                        upstream.send_text("WATCHDOG=1");
                    }
                }
            }
        }
        self.exit.unwrap_or(0)
    }

    fn supervisor(&mut self) -> &mut Supervisor {
        self.supervisor
            .as_mut()
            .expect("supervisor is set before the loop")
    }

    fn event(&mut self, event: Event) {
        let actions = self.supervisor().handle(event, Instant::now());
        self.execute(actions);
    }

    /// Reaps every exited child. baton is the only reaper in its process
    /// (no tokio::process), so `waitpid(-1)` steals nobody's status; pids the
    /// core does not know (orphans, when baton is PID 1) are just reaped.
    fn reap(&mut self) {
        loop {
            let (pid, status) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, ExitStatus::Code(code)),
                Ok(WaitStatus::Signaled(pid, signal, _)) => (pid, ExitStatus::Signal(signal)),
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            };
            self.event(Event::Exited { pid, status });
            self.listeners.relisten_if_shut_down();
        }
    }

    /// Re-reads the config file and asks the core to deploy it. A waiting
    /// client hears every step; one that does not wait hears `Accepted`
    /// once the file was found valid.
    fn reload(&mut self, reply: Option<mpsc::UnboundedSender<Reply>>, wait: bool) {
        let config = match Config::load(&self.config.path) {
            Ok(config) => config,
            Err(e) => {
                let message = format!("reload refused, nothing changed: {e}");
                return self.refuse(reply, message);
            }
        };
        if self.config.listeners_differ(&config) {
            let message = format!(
                "reload refused, nothing changed: {} changes the [[listen]] sockets; \
                 changing listeners needs a restart of baton",
                self.config.path.display()
            );
            return self.refuse(reply, message);
        }
        if config.control_socket != self.config.control_socket {
            tracing::warn!("[control] socket changes take effect when baton restarts");
        }
        let config = Arc::new(config);
        self.config = config.clone();
        let reply = match reply {
            Some(reply) if !wait => {
                let _ = reply.send(Reply::Accepted);
                None
            }
            other => other,
        };
        let waiter = reply.map(|reply| {
            let id = self.next_waiter;
            self.next_waiter += 1;
            self.waiters.insert(id, reply);
            id
        });
        self.event(Event::Reload { config, waiter });
    }

    fn refuse(&mut self, reply: Option<mpsc::UnboundedSender<Reply>>, message: String) {
        tracing::error!("{message}");
        // Under Type=notify-reload systemd waits for RELOADING=1 and READY=1
        // after its SIGHUP: end that reload, with the reason.
        if let Some(upstream) = &self.upstream {
            upstream.send(&crate::sd_notify::Upstream::Reloading);
            upstream.send(&crate::sd_notify::Upstream::Reloaded {
                status: message.clone(),
            });
        }
        if let Some(reply) = reply {
            let _ = reply.send(Reply::Error { message });
        }
    }

    fn control(&mut self, ControlCommand { request, reply }: ControlCommand) {
        match request {
            Request::Reload { wait } => self.reload(Some(reply), wait),
            Request::Status => {
                let status = self.supervisor().status(Instant::now());
                let doc = StatusDoc::new(status, &self.config.path, self.listeners.describe());
                let _ = reply.send(Reply::Status(doc));
            }
            Request::Stop => {
                let _ = reply.send(Reply::Stopping);
                self.stop_waiters.push(reply);
                self.event(Event::Stop { fast: false });
            }
        }
    }

    /// Carries out actions in order; a spawn's result goes straight back
    /// into the core, and its actions join the queue.
    fn execute(&mut self, actions: Vec<Action>) {
        let mut queue = std::collections::VecDeque::from(actions);
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Spawn { generation, config } => {
                    let event = match self.spawn(generation, &config) {
                        Ok(pid) => Event::Spawned { generation, pid },
                        Err(e) => Event::SpawnFailed {
                            generation,
                            error: e.to_string(),
                        },
                    };
                    queue.extend(self.supervisor().handle(event, Instant::now()));
                }
                Action::Signal { pid, signal } => {
                    if let Err(e) = kill(pid, signal) {
                        tracing::debug!("kill({pid}, {}): {e}", signal.as_str());
                    }
                }
                Action::KillGroup { pgid } => {
                    // ESRCH: the group is already empty, the usual case.
                    let _ = killpg(pgid, Signal::SIGKILL);
                }
                Action::Progress { waiter, progress } => {
                    let done = matches!(progress, crate::core::Progress::Done(_));
                    if let Some(reply) = self.waiters.get(&waiter) {
                        let _ = reply.send(progress.into());
                    }
                    if done {
                        self.waiters.remove(&waiter);
                    }
                }
                Action::Upstream(message) => {
                    if let Some(upstream) = &self.upstream {
                        upstream.send(&message);
                    }
                }
                Action::Exit(code) => self.exit = Some(code),
            }
        }
    }

    fn spawn(&self, generation: u64, config: &Config) -> Result<Pid, spawn::SpawnError> {
        let env = child_env(
            &self.base_env,
            config,
            generation,
            &self.listeners,
            &self.notify_path,
        );
        let fds = self.listeners.fds();
        spawn::spawn(&spawn::Command {
            argv: &config.app.command,
            env,
            workdir: config.app.workdir.as_deref(),
            listeners: &fds,
        })
    }
}

/// The child's environment: baton's own (less what systemd set for baton),
/// then `[app] env`, then the socket-activation contract.
fn child_env(
    base: &[(OsString, OsString)],
    config: &Config,
    generation: u64,
    listeners: &Listeners,
    notify_path: &Path,
) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = base
        .iter()
        .filter(|(k, _)| !config.app.env.contains_key(&*k.to_string_lossy()))
        .cloned()
        .collect();
    env.extend(config.app.env.iter().map(|(k, v)| (k.into(), v.into())));
    if !listeners.is_empty() {
        env.push(("LISTEN_FDS".into(), listeners.len().to_string().into()));
        env.push(("LISTEN_FDNAMES".into(), listeners.names().into()));
    }
    env.push(("NOTIFY_SOCKET".into(), notify_path.into()));
    env.push(("BATON_GENERATION".into(), generation.to_string().into()));
    env
}

/// One control connection: read one request line (bounded in size and
/// time), hand it to the loop, stream the replies back.
async fn serve_connection(
    stream: UnixStream,
    group: Option<u32>,
    commands: mpsc::UnboundedSender<ControlCommand>,
) {
    const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
    let cred = stream.peer_cred();
    let allowed = cred.as_ref().is_ok_and(|c| peer_allowed(c, group));
    let (read, mut write) = stream.into_split();
    let send = |reply: &Reply| encode(reply);
    if !allowed {
        let who = cred.map_or_else(
            |_| "unknown peer".to_owned(),
            |c| format!("uid {} (pid {})", c.uid(), c.pid().unwrap_or(0)),
        );
        tracing::warn!(
            "control connection from {who} refused: not root, baton's user or [control] group"
        );
        let refusal = Reply::Error {
            message: "permission denied: only root, baton's own user and members of its \
                      [control] group may control it"
                .into(),
        };
        let _ = write.write_all(send(&refusal).as_bytes()).await;
        return;
    }
    let mut reader = BufReader::new(read).take(MAX_REQUEST as u64 + 1);
    let mut line = String::new();
    let read = tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line)).await;
    let request = match read {
        Err(_) => Err("no request within 10 s".to_owned()),
        Ok(Err(e)) => Err(format!("cannot read the request: {e}")),
        Ok(Ok(_)) if line.len() > MAX_REQUEST => Err("request longer than 64 KiB".to_owned()),
        Ok(Ok(_)) => parse_request(line.trim_end()),
    };
    let request = match request {
        Ok(r) => r,
        Err(message) => {
            let _ = write
                .write_all(send(&Reply::Error { message }).as_bytes())
                .await;
            return;
        }
    };
    let (reply_tx, mut replies) = mpsc::unbounded_channel();
    if commands
        .send(ControlCommand {
            request,
            reply: reply_tx,
        })
        .is_err()
    {
        return;
    }
    while let Some(reply) = replies.recv().await {
        if write.write_all(send(&reply).as_bytes()).await.is_err() {
            break;
        }
    }
}
