//! The IO shell: one task on a current_thread runtime owns the supervisor
//! core and turns the world into its events (signals, child exits, notify
//! datagrams, control requests, deadlines) and its actions into syscalls.
//! No locks: control connections talk to the loop through a channel and
//! carry their own reply channel.

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::AsFd;
use std::os::unix::fs::DirBuilderExt;
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

use crate::cgroup::{Containment, Watcher};
use crate::checks::{Checks, Subject};
use crate::config::{notify_socket_for, Config, ConfigError};
use crate::control::{encode, parse_request, Reply, Request, StatusDoc, MAX_REQUEST};
use crate::core::{Action, Event, ExitStatus, Release, Supervisor, Waiter, WaiterId};
use crate::history::History;
use crate::notice::{Level, Notice};
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
    /// The file asks for what this baton cannot do (a user, as non-root).
    #[error("{0}")]
    Unrunnable(String),
}

/// How often the listeners are checked for a child's `shutdown()`.
const LISTENER_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// Ended generations whose escapees the sweep still looks for, and for how
/// long after the generation's main process exited.
const ENDED_KEPT: usize = 64;
const ESCAPEE_WATCH: std::time::Duration = std::time::Duration::from_secs(30);

/// How long the control socket stops accepting after accept() failed.
const ACCEPT_BACKOFF_MIN: std::time::Duration = std::time::Duration::from_millis(50);
const ACCEPT_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(1);

/// Control connections served at once; more are refused with an error
/// line, so idle clients cannot exhaust baton's fds.
const MAX_CONTROL_CONNECTIONS: usize = 64;

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
    /// Log records are JSON: each notice's record carries the notice
    /// itself (a `notice` field), for log shippers and tests.
    pub json_notices: bool,
}

/// Runs the daemon until it is stopped. Returns the exit code.
pub fn run(config_path: &Path, options: Options) -> Result<i32, DaemonError> {
    let config = Arc::new(Config::load(config_path)?);
    runnable(&config, None).map_err(DaemonError::Unrunnable)?;
    // The release last serving comes back after a restart (or a reboot).
    let (history, history_problem) = crate::history::load(&config.state_dir, true);
    let named = history.current.is_some() || config.app.version.is_some();
    if config.uses_version() && !named {
        return Err(DaemonError::Config(config.missing_version()));
    }
    // Orphans of the application (a daemonizing helper, say) are
    // reparented to baton instead of init, and reaped by its reaper: no
    // zombies, even when baton is PID 1 of an appliance image (where this
    // is implied).
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::warn!("cannot become a child subreaper: {e}");
    }
    // Idle control clients, a burst of deploys: baton's own fds must not run
    // out first. The children get the original soft limit back.
    let nofile = raise_nofile();
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
    // After the control socket: a second baton on this config is told so,
    // not that the first one's cgroups hold processes.
    let containment = Containment::open(&config.app.cgroup, &config.app.cgroup_limits)
        .map_err(DaemonError::Unrunnable);
    let opened = containment.and_then(|c| match Listeners::open(&config) {
        Ok(listeners) => Ok((c, listeners)),
        Err(e) => {
            if let Some(cgroups) = c.cgroups() {
                cgroups.close();
            }
            Err(e.into())
        }
    });
    let (containment, listeners) = match opened {
        Ok(opened) => opened,
        Err(e) => {
            let _ = std::fs::remove_file(&control_path);
            return Err(e);
        }
    };
    if let Some(upstream) = upstream.as_ref().filter(|_| fd_store) {
        listeners.store_in(upstream, None);
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
        let watcher = match containment.cgroups() {
            None => None,
            Some(_) => Some(
                Watcher::new()
                    .and_then(crate::sys::register_watcher)
                    .map_err(DaemonError::Runtime)?,
            ),
        };
        let (check_results, results) = mpsc::unbounded_channel();
        let mut shell = Shell {
            supervisor: None,
            latest: config.listeners.clone(),
            held: HashMap::new(),
            fd_store,
            history,
            state_dir: config.state_dir.clone(),
            checks: Checks::new(check_results),
            check_results: Some(results),
            containment,
            watcher,
            unremoved: Vec::new(),
            config_path: config.path.clone(),
            control_group: config.control_group.as_ref().map(|g| g.gid),
            listeners,
            notify_path: notify_path.clone(),
            notify,
            upstream,
            watchdog,
            base_env,
            waiters: HashMap::new(),
            next_waiter: 1,
            stop_waiters: Vec::new(),
            subscribers: Vec::new(),
            ended: std::collections::VecDeque::new(),
            nofile,
            connections: Arc::new(tokio::sync::Semaphore::new(MAX_CONTROL_CONNECTIONS)),
            throttle: Throttle::default(),
            json_notices: options.json_notices,
            exit: None,
        };
        if let Some(problem) = history_problem {
            shell.notice(Notice::HistoryUnusable { problem });
        }
        let code = shell.run(config.clone(), control).await;
        shell.listeners.remove_files();
        if let Some(cgroups) = shell.containment.cgroups() {
            cgroups.close();
        }
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
        socket_directory(dir).map_err(err)?;
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

/// What a valid file may still ask of this baton that it cannot do; with
/// the `containment` a running baton has, the cgroup limits too (and the
/// controllers they need are enabled).
fn runnable(config: &Config, containment: Option<&Containment>) -> Result<(), String> {
    let me = nix::unistd::geteuid();
    if let Some(user) = &config.app.user {
        if !me.is_root() && user.uid != me.as_raw() {
            return Err(format!(
                "{}: [app] user = \"{}\" needs baton to run as root (it runs as uid {me}); \
                 remove the setting or start baton as root",
                config.path.display(),
                user.name
            ));
        }
    }
    let limits = &config.app.cgroup_limits;
    match containment {
        Some(Containment::ProcessGroups(why)) if !limits.is_empty() => Err(format!(
            "{}: [app] {} needs a cgroup, and this baton runs without one ({why}); \
             restart baton with a cgroup to use it",
            config.path.display(),
            limits[0].key
        )),
        Some(Containment::Cgroups(cgroups)) => cgroups
            .enable(limits)
            .map_err(|e| format!("{}: {e}", config.path.display())),
        _ => Ok(()),
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard one; returns the limits as
/// they were, `None` if they could not be read.
fn raise_nofile() -> Option<(u64, u64)> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            tracing::warn!("cannot raise the open-file limit from {soft} to {hard}: {e}");
        }
    }
    Some((soft, hard))
}

/// Makes the directory of baton's sockets if missing and checks it.
/// Others may pass through (members of [control] group to the control
/// socket, the children's user to the notify socket: each socket's own mode
/// decides), not list or write.
fn socket_directory(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(dir)?;
    safe_directory(dir)
}

/// Refuses a directory for baton's sockets that another user could have
/// made or can write: they could replace the sockets with their own
/// (issue 8: another user created `/tmp/baton-<uid>` 0777 first and
/// answered `reload --wait` with a fake success).
fn safe_directory(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    // Not followed: a symlink another user planted could be re-pointed.
    let meta = std::fs::symlink_metadata(dir)?;
    let me = nix::unistd::geteuid().as_raw();
    let problem = if meta.file_type().is_symlink() {
        Some("is a symlink".to_owned())
    } else if meta.uid() != me && meta.uid() != 0 {
        Some(format!(
            "is owned by uid {}, not by baton's uid {me} or root",
            meta.uid()
        ))
    } else if meta.mode() & 0o022 != 0 && meta.mode() & 0o1000 == 0 {
        Some(format!(
            "can be written by other users (mode {:o})",
            meta.mode() & 0o7777
        ))
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(problem) => Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "directory {} {problem}: another user could take over the control socket; \
                 remove it, or set [control] socket to a path in a directory only you can write",
                dir.display()
            ),
        )),
    }
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
    /// The listeners of the config last handed to the core.
    latest: Vec<crate::config::Listener>,
    /// The listeners each started generation holds, by its main pid; a
    /// listener no longer in `latest` is closed once none holds it.
    held: HashMap<Pid, Vec<crate::config::Listener>>,
    /// Listeners go into systemd's fd store (and leave it when closed).
    fd_store: bool,
    /// The deploy history, as on disk in `state_dir` (fixed at start).
    history: History,
    state_dir: PathBuf,
    /// Readiness and health checks in flight.
    checks: Checks,
    /// Their answers that come later; taken by the loop.
    check_results: Option<mpsc::UnboundedReceiver<Event>>,
    /// Cgroups per generation, or process groups (fixed at start).
    containment: Containment,
    /// Which generations' cgroups changed; with cgroups only.
    watcher: Option<tokio::io::unix::AsyncFd<Watcher>>,
    /// Emptied generation cgroups whose removal failed (a dying process
    /// still counted); tried again as processes are reaped.
    unremoved: Vec<u64>,
    /// The file a reload re-reads. The core owns every config read from it.
    config_path: PathBuf,
    /// `[control] group` as the control socket was made at start: a
    /// reload cannot change who may connect (the socket's mode and group
    /// stay as they were until baton restarts).
    control_group: Option<u32>,
    listeners: Listeners,
    notify_path: PathBuf,
    /// Re-created when its file disappears (a /tmp cleaner), before a spawn.
    notify: NotifySocket,
    upstream: Option<UpstreamNotifier>,
    /// systemd's watchdog interval; pinged at half of it from the loop, so
    /// a wedged loop is noticed.
    watchdog: Option<std::time::Duration>,
    base_env: Vec<(OsString, OsString)>,
    waiters: HashMap<WaiterId, mpsc::UnboundedSender<Reply>>,
    next_waiter: WaiterId,
    /// `baton stop` clients: their connections close when baton exits.
    stop_waiters: Vec<mpsc::UnboundedSender<Reply>>,
    /// `baton events` clients: every notice from now on.
    subscribers: Vec<mpsc::UnboundedSender<Reply>>,
    /// The latest generations whose main process has exited (with its pid,
    /// and when), for the escapee sweep.
    ended: std::collections::VecDeque<(u64, Pid, Instant)>,
    /// RLIMIT_NOFILE as baton found it (soft, hard), for the children.
    nofile: Option<(u64, u64)>,
    /// Permits for control connections being served.
    connections: Arc<tokio::sync::Semaphore>,
    /// Limits notices that others can cause at will (foreign notify
    /// datagrams, refused connections, an app's STATUS= flood).
    throttle: Throttle,
    json_notices: bool,
    exit: Option<i32>,
}

impl Shell {
    async fn run(&mut self, config: Arc<Config>, control: UnixListener) -> i32 {
        // Handlers first: a child may exit, or systemd may send SIGHUP, as
        // soon as the first generation is started.
        let install = |kind| signal(kind).expect("installing a signal handler");
        let mut sigchld = install(SignalKind::child());
        let mut sighup = install(SignalKind::hangup());
        let mut sigterm = install(SignalKind::terminate());
        let mut sigint = install(SignalKind::interrupt());
        let mut sigquit = install(SignalKind::quit());
        let (commands_tx, mut commands) = mpsc::unbounded_channel::<ControlCommand>();
        let mut check_results = self.check_results.take().expect("the loop runs once");

        let clock = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        let seed = u64::from(std::process::id()) ^ clock.map_or(0, |d| d.as_nanos() as u64);
        for (name, address, adopted_fd, _) in self.listeners.describe(&self.latest) {
            self.notice(Notice::Listening {
                name,
                address,
                adopted_fd,
            });
        }
        let containment = match &self.containment {
            Containment::Cgroups(c) => Notice::Containment {
                cgroup: Some(c.base().display().to_string()),
                reason: None,
            },
            Containment::ProcessGroups(why) => Notice::Containment {
                cgroup: None,
                reason: Some(why.clone()),
            },
        };
        self.notice(containment);
        let releases = self.history.releases();
        let (supervisor, actions) = Supervisor::new(config, releases, Instant::now(), seed);
        self.supervisor = Some(supervisor);
        self.execute(actions);

        // A child's shutdown() on a listener refuses every connection until
        // noticed: look at least once a second (and after each exit, before
        // each spawn).
        let mut accept_paused: Option<tokio::time::Instant> = None;
        let mut accept_backoff = ACCEPT_BACKOFF_MIN;
        let mut listener_check = tokio::time::interval(LISTENER_CHECK);
        listener_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut watchdog = self
            .watchdog
            .map(|interval| tokio::time::interval(interval / 2));
        while self.exit.is_none() {
            let deadline = [
                self.supervisor().next_deadline(),
                self.checks.next_deadline(),
            ]
            .into_iter()
            .flatten()
            .min();
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
                    self.reload(None, Release::Current);
                }
                _ = sigterm.recv() => self.event(Event::Stop { fast: false }),
                _ = sigint.recv() => self.event(Event::Stop { fast: false }),
                _ = sigquit.recv() => self.event(Event::Stop { fast: true }),
                received = self.notify.recv() => match received {
                    Ok((pid, message)) => {
                        let (group, cgroup) = self.origin(pid);
                        self.event(Event::Notify { pid, group, cgroup, message });
                    }
                    Err(e) => tracing::warn!("notify socket: {e}"),
                },
                Some(event) = check_results.recv() => self.event(event),
                Some(command) = commands.recv() => self.control(command),
                accepted = control.accept(), if accept_paused.is_none() => match accepted {
                    Ok((stream, _)) => {
                        accept_backoff = ACCEPT_BACKOFF_MIN;
                        self.accept(stream, &commands_tx);
                    }
                    Err(e) => {
                        // Out of fds (EMFILE/ENFILE), say: accept() would
                        // fail again at once. Pause, growing up to 1 s; one
                        // line per pause.
                        self.notice(Notice::ControlAcceptPaused {
                            error: e.to_string(),
                            pause: accept_backoff,
                        });
                        accept_paused = Some(tokio::time::Instant::now() + accept_backoff);
                        accept_backoff = (accept_backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    }
                },
                _ = async { tokio::time::sleep_until(accept_paused.expect("checked")).await },
                    if accept_paused.is_some() => accept_paused = None,
                _ = sleep => {
                    self.checks.expire(Instant::now());
                    // Exits first: a candidate that died just as its
                    // `delay` ran out must not be promoted.
                    self.reap();
                    self.event(Event::Tick);
                }
                _ = listener_check.tick() => {
                    self.check_listeners();
                    self.remove_cgroups();
                    // A process that left an ended generation's group is
                    // adopted by baton only when its own parent dies.
                    // Watched for a while only: the sweep reads /proc.
                    self.ended.retain(|&(_, _, at)| at.elapsed() < ESCAPEE_WATCH);
                    let ended: Vec<(u64, Pid)> = self.ended.iter().map(|&(g, p, _)| (g, p)).collect();
                    self.kill_escapees(&ended);
                }
                changed = async { self.watcher.as_mut().expect("checked").readable_mut().await }, if self.watcher.is_some() => {
                    if let Ok(mut guard) = changed {
                        let generations = guard.get_inner_mut().changed();
                        guard.clear_ready();
                        self.cgroups_changed(&generations);
                    }
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
            if let Some(answer) = self.checks.exited(pid, status) {
                self.event(answer);
                continue;
            }
            self.event(Event::Exited { pid, status });
            if self.held.remove(&pid).is_some() {
                self.close_unused_listeners();
            }
            self.check_listeners();
        }
        self.remove_cgroups();
    }

    /// Closes the listeners that neither the latest config names nor a
    /// live generation holds (a reload removed them, and the generations
    /// that had them are gone); under `--fd-store` they leave the store.
    fn close_unused_listeners(&mut self) {
        let (latest, held) = (&self.latest, &self.held);
        let needed = |l: &crate::config::Listener| {
            let named =
                |ls: &Vec<crate::config::Listener>| ls.iter().any(|x| crate::sockets::same(x, l));
            named(latest) || held.values().any(named)
        };
        for (name, address) in self.listeners.close_unless(needed) {
            if let Some(upstream) = self.upstream.as_ref().filter(|_| self.fd_store) {
                upstream.send_text(&format!("FDSTOREREMOVE=1\nFDNAME={name}"));
            }
            self.notice(Notice::ListenerClosed { name, address });
        }
    }

    /// Where the sender of a notify datagram was when it arrived: its
    /// process group, and the generation whose cgroup it is in. A sender
    /// that has exited already is found in neither (`systemd-notify` that
    /// exits at once races this, as it races systemd's own lookup).
    fn origin(&self, pid: Pid) -> (Option<Pid>, Option<u64>) {
        let group = nix::unistd::getpgid(Some(pid)).ok();
        let cgroup = self
            .containment
            .cgroups()
            .and_then(|c| c.generation_of(pid));
        (group, cgroup)
    }

    /// The processes of `generation` (main process `pid`): its cgroup's, or
    /// the main process and its descendants.
    fn processes(&self, generation: u64, pid: Pid) -> Vec<i32> {
        match self.containment.cgroups() {
            Some(cgroups) => cgroups.procs(generation),
            None => crate::procfs::descendants(pid.as_raw()),
        }
    }

    /// Generations whose cgroup changed: those now empty are gone (their
    /// cgroup is removed).
    fn cgroups_changed(&mut self, generations: &[u64]) {
        let Some(cgroups) = self.containment.cgroups() else {
            return;
        };
        let emptied: Vec<u64> = generations
            .iter()
            .copied()
            .filter(|&g| cgroups.populated(g) != Some(true))
            .collect();
        // Removed first, so that when the core says the generation is gone,
        // its directory is too (or is retried, should a dying process still
        // count).
        self.unremoved.extend(&emptied);
        self.remove_cgroups();
        for generation in emptied {
            self.event(Event::Emptied { generation });
        }
    }

    /// Removes the emptied generation cgroups (rmdir fails while the
    /// kernel still counts a dying process: tried again later).
    fn remove_cgroups(&mut self) {
        if let Some(cgroups) = self.containment.cgroups() {
            self.unremoved.retain(|&g| !cgroups.remove(g));
        }
    }

    /// Re-reads the config file and hands it, or why it is unusable, to
    /// the core, which decides what happens (and what the client hears).
    fn reload(&mut self, waiter: Option<(mpsc::UnboundedSender<Reply>, bool)>, release: Release) {
        let config = Config::load(&self.config_path)
            .map_err(|e| e.to_string())
            .and_then(|c| runnable(&c, Some(&self.containment)).map(|()| c))
            .and_then(|c| self.open_listeners(&c).map(|()| Arc::new(c)));
        let waiter = waiter.map(|(reply, follows)| {
            let id = self.next_waiter;
            self.next_waiter += 1;
            self.waiters.insert(id, reply);
            Waiter { id, follows }
        });
        self.event(Event::Reload {
            config,
            waiter,
            release,
        });
    }

    /// Opens the listeners a re-read `config` adds (before anything
    /// starts: a bind error refuses the reload, nothing changed), and
    /// makes its set the latest: the ones it removed close once no
    /// generation holds them.
    fn open_listeners(&mut self, config: &Config) -> Result<(), String> {
        let added = self
            .listeners
            .prepare(config)
            .map_err(|e| format!("{e}; nothing changed"))?;
        if let Some(upstream) = self.upstream.as_ref().filter(|_| self.fd_store) {
            self.listeners.store_in(upstream, Some(&added));
        }
        for (name, address, _, _) in self.listeners.describe(&config.listeners) {
            if added.contains(&name) {
                self.notice(Notice::Listening {
                    name,
                    address,
                    adopted_fd: None,
                });
            }
        }
        self.latest = config.listeners.clone();
        self.close_unused_listeners();
        Ok(())
    }

    /// A new control connection: refused at once unless its peer may use
    /// the socket, else served by its own task.
    fn accept(&mut self, stream: UnixStream, commands: &mpsc::UnboundedSender<ControlCommand>) {
        let cred = stream.peer_cred();
        if cred
            .as_ref()
            .is_ok_and(|c| peer_allowed(c, self.control_group))
        {
            match self.connections.clone().try_acquire_owned() {
                Ok(permit) => {
                    let commands = commands.clone();
                    tokio::spawn(async move {
                        serve_connection(stream, commands).await;
                        drop(permit);
                    });
                }
                Err(_) => {
                    let busy = format!(
                        "too many control connections ({MAX_CONTROL_CONNECTIONS} open): try again"
                    );
                    tokio::spawn(refuse_connection(stream, busy));
                }
            }
            return;
        }
        let (uid, pid) = cred.map_or((u32::MAX, None), |c| (c.uid(), c.pid()));
        self.notice(Notice::ControlRefused { uid, pid });
        let denied = "permission denied: only root, baton's own user and members of its \
                      [control] group may control it";
        tokio::spawn(refuse_connection(stream, denied.to_owned()));
    }

    /// Kills baton's adopted children that carry the `BATON_GENERATION` of
    /// one of `generations` (each with the pid of its main process) and
    /// left its process group.
    fn kill_escapees(&mut self, generations: &[(u64, Pid)]) {
        let found: Vec<(u64, Pid)> = escapees(generations)
            .into_iter()
            .filter(|&(_, p)| !self.checks.runs(p))
            .collect();
        for (generation, pid) in found {
            let _ = kill(pid, Signal::SIGKILL);
            self.notice(Notice::EscapeeKilled {
                generation,
                pid: pid.as_raw(),
            });
        }
    }

    /// Binds the notify socket again if its file is gone or replaced (a
    /// /tmp cleaner): a child would otherwise never reach it, and fail its
    /// readiness deadline.
    fn ensure_notify_socket(&mut self) {
        use std::os::unix::fs::FileTypeExt;
        let present =
            std::fs::symlink_metadata(&self.notify_path).is_ok_and(|m| m.file_type().is_socket());
        if present {
            return;
        }
        // The cleaner may have taken the directory too, and someone else
        // may have made it since: the same checks as at start.
        let rebound = self
            .notify_path
            .parent()
            .map_or(Ok(()), socket_directory)
            .and_then(|()| NotifySocket::bind(&self.notify_path));
        let error = match rebound {
            Ok(socket) => {
                self.notify = socket;
                None
            }
            Err(e) => Some(e.to_string()),
        };
        let path = self.notify_path.display().to_string();
        self.notice(Notice::NotifySocketRestored { path, error });
    }

    /// Listens again on any listener a child has shut down.
    fn check_listeners(&mut self) {
        let restored = self.listeners.relisten_if_shut_down();
        if restored.is_empty() {
            return;
        }
        let status = self.supervisor().status(Instant::now());
        let generations: Vec<u64> = status.generations.iter().map(|g| g.generation).collect();
        for (name, address, error) in restored {
            self.notice(Notice::ListenerRestored {
                name,
                address,
                generations: generations.clone(),
                error,
            });
        }
    }

    /// Logs a notice and streams it to `baton events` clients.
    fn notice(&mut self, notice: Notice) {
        if notice.floods() {
            match self.throttle.admit(&notice, std::time::Instant::now()) {
                Admit::Yes => {}
                Admit::No => return,
                Admit::AfterSuppressed(n) => {
                    tracing::warn!("{n} more like the next line were not logged in the last second")
                }
            }
        }
        log(&notice, self.json_notices);
        if !self.subscribers.is_empty() {
            let reply = Reply::Notice(notice);
            self.subscribers.retain(|s| s.send(reply.clone()).is_ok());
        }
    }

    fn control(&mut self, ControlCommand { request, reply }: ControlCommand) {
        match request {
            Request::Reload { wait } => self.reload(Some((reply, wait)), Release::Current),
            Request::Deploy { version, wait } => match crate::config::valid_version(&version) {
                Ok(()) => self.reload(Some((reply, wait)), Release::Version(version)),
                Err(message) => {
                    let _ = reply.send(Reply::Error { message });
                }
            },
            Request::Rollback {
                to,
                wait,
                with_hooks,
            } => match to.as_deref().map(crate::config::valid_version).transpose() {
                Ok(_) => {
                    let release = Release::Rollback { to, with_hooks };
                    self.reload(Some((reply, wait)), release)
                }
                Err(message) => {
                    let _ = reply.send(Reply::Error { message });
                }
            },
            Request::History => {
                let _ = reply.send(Reply::History(self.history.clone()));
            }
            Request::Status => {
                let status = self.supervisor().status(Instant::now());
                let listeners = self.listeners.describe(&self.latest).into_iter();
                let listeners = listeners
                    .map(|(name, address, _, kept)| (name, address, !kept))
                    .collect();
                let mut doc = StatusDoc::new(status, &self.config_path, listeners);
                self.describe_processes(&mut doc);
                let _ = reply.send(Reply::Status(doc));
            }
            Request::Stop => {
                let _ = reply.send(Reply::Stopping);
                self.stop_waiters.push(reply);
                self.event(Event::Stop { fast: false });
            }
            Request::Events => {
                if reply.send(Reply::Following).is_ok() {
                    self.subscribers.push(reply);
                }
            }
        }
    }

    /// What `status` shows beyond the core's view: how generations are
    /// contained, and each one's memory, CPU, cgroup or escapees.
    fn describe_processes(&self, doc: &mut crate::control::StatusDoc) {
        use crate::cgroup::Usage;
        doc.containment = Some(match &self.containment {
            Containment::Cgroups(c) => format!("cgroup {}", c.base().display()),
            Containment::ProcessGroups(why) => format!("process groups ({why})"),
        });
        let leaders: Vec<(u64, Pid)> = doc
            .generations
            .iter()
            .filter_map(|g| Some((g.generation, Pid::from_raw(g.pid?))))
            .collect();
        let cgroups = self.containment.cgroups();
        let escaped = match cgroups {
            Some(_) => Vec::new(),
            None => escapees(&leaders),
        };
        let escaped: Vec<(u64, Pid)> = escaped
            .into_iter()
            .filter(|&(_, p)| !self.checks.runs(p))
            .collect();
        for g in &mut doc.generations {
            let usage = match (cgroups, g.pid) {
                (Some(cgroups), _) => {
                    g.cgroup = Some(cgroups.dir(g.generation).display().to_string());
                    Some(cgroups.usage(g.generation))
                }
                (None, Some(pid)) => Some(Usage::of_process(pid as u32)),
                (None, None) => None,
            };
            if let Some(usage) = usage {
                g.memory_bytes = usage.memory_bytes;
                g.cpu_usec = usage.cpu_usec;
                g.processes = cgroups.map(|_| usage.processes);
            }
            g.escapees = escaped
                .iter()
                .filter(|(generation, _)| *generation == g.generation)
                .map(|(_, pid)| pid.as_raw())
                .collect();
        }
    }

    /// Carries out actions in order; a spawn's result goes straight back
    /// into the core, and its actions join the queue.
    fn execute(&mut self, actions: Vec<Action>) {
        let mut queue = std::collections::VecDeque::from(actions);
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Spawn { generation, config } => {
                    self.check_listeners();
                    let spawned = self.spawn(generation, &config);
                    if let Ok(pid) = spawned {
                        self.held.insert(pid, config.listeners.clone());
                    }
                    let event = match spawned {
                        Ok(pid) => Event::Spawned {
                            generation,
                            pid,
                            contained: self.containment.cgroups().is_some(),
                        },
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
                Action::Kill {
                    generation,
                    pid,
                    leader,
                } => {
                    // Everything in its cgroup, whatever its group or parent.
                    let cgroups = self.containment.cgroups();
                    if let Some(cgroups) = cgroups {
                        cgroups.kill(generation);
                    }
                    // ESRCH: the group is already empty, the usual case.
                    let _ = killpg(pid, Signal::SIGKILL);
                    // A leader that moved to another group is not in its
                    // own any more.
                    if leader {
                        let _ = kill(pid, Signal::SIGKILL);
                    } else if cgroups.is_none() {
                        // Its main process is gone: what of it is left are
                        // escapees, now and as their parents die.
                        self.ended.push_back((generation, pid, Instant::now()));
                        if self.ended.len() > ENDED_KEPT {
                            self.ended.pop_front();
                        }
                    }
                    if self.containment.cgroups().is_none() {
                        self.kill_escapees(&[(generation, pid)]);
                    }
                }
                Action::CheckReady {
                    generation,
                    pid,
                    config,
                } => {
                    let processes = self.processes(generation, pid);
                    let wanted = self.listeners.wanted(&config.listeners);
                    let subject = Subject {
                        generation,
                        pid: Some(pid),
                        config: &config,
                        env: &self.base_env,
                    };
                    let accepting = || crate::procfs::accepting(&processes, &wanted);
                    if let Some(answer) = self.checks.ready(&subject, accepting) {
                        queue.extend(self.supervisor().handle(answer, Instant::now()));
                    }
                }
                Action::RunHook {
                    generation,
                    hook,
                    config,
                } => {
                    let subject = Subject {
                        generation,
                        pid: None,
                        config: &config,
                        env: &self.base_env,
                    };
                    if let Some(answer) = self.checks.hook(&subject, hook) {
                        queue.extend(self.supervisor().handle(answer, Instant::now()));
                    }
                }
                Action::CancelHook { generation } => self.checks.cancel(generation),
                Action::Probe {
                    generation,
                    pid,
                    config,
                } => {
                    let memory =
                        config
                            .health
                            .max_rss
                            .and_then(|_| match self.containment.cgroups() {
                                Some(cgroups) => cgroups.usage(generation).memory_bytes,
                                None => self
                                    .processes(generation, pid)
                                    .into_iter()
                                    .map(|p| crate::procfs::rss_bytes(p as u32))
                                    .sum(),
                            });
                    let subject = Subject {
                        generation,
                        pid: Some(pid),
                        config: &config,
                        env: &self.base_env,
                    };
                    if let Some(answer) = self.checks.probe(&subject, memory) {
                        queue.extend(self.supervisor().handle(answer, Instant::now()));
                    }
                }
                Action::Progress { waiter, progress } => {
                    let last = progress.is_final();
                    if let Some(reply) = self.waiters.get(&waiter) {
                        let _ = reply.send(Reply::progress(progress));
                    }
                    if last {
                        self.waiters.remove(&waiter);
                    }
                }
                Action::Notice(Notice::GivenUp {
                    generation,
                    pid: None,
                    waited,
                    ..
                }) => {
                    // Name what lingers in its cgroup; its directory stays.
                    let cgroups = self.containment.cgroups();
                    let lingering = cgroups.map_or_else(Vec::new, |c| c.procs(generation));
                    self.notice(Notice::GivenUp {
                        generation,
                        pid: None,
                        waited,
                        lingering,
                    });
                }
                Action::Notice(notice) => self.notice(notice),
                Action::Record { record, current } => {
                    self.history.add(&record, current, record.began.elapsed());
                    if let Err(e) = crate::history::save(&self.state_dir, &self.history) {
                        self.notice(Notice::HistoryNotSaved {
                            path: self.state_dir.display().to_string(),
                            error: e.to_string(),
                        });
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

    fn spawn(&mut self, generation: u64, config: &Config) -> Result<Pid, spawn::SpawnError> {
        self.ensure_notify_socket();
        // Its listeners are open (a restart of an older config may need
        // one a reload closed since).
        self.listeners
            .prepare(config)
            .map_err(|e| spawn::SpawnError::Listeners(e.to_string()))?;
        let env = child_env(&self.base_env, config, generation, &self.notify_path);
        let fds = self.listeners.fds(&config.listeners);
        // The notify socket is writable by the children's user only. Not
        // through a symlink: lchown.
        let me = nix::unistd::geteuid();
        let owner = config.app.user.as_ref().map_or(me.as_raw(), |u| u.uid);
        use std::os::unix::fs::MetadataExt;
        let owned = std::fs::symlink_metadata(&self.notify_path).is_ok_and(|m| m.uid() == owner);
        if !owned {
            if let Err(e) = std::os::unix::fs::lchown(&self.notify_path, Some(owner), None) {
                tracing::warn!(
                    "cannot give the notify socket {} to uid {owner}: {e}",
                    self.notify_path.display()
                );
            }
        }
        // A non-root baton may run children as its own user only (checked
        // at start and reload): then there is nothing to switch.
        let user = config
            .app
            .user
            .as_ref()
            .filter(|u| me.is_root() || u.uid != me.as_raw());
        // Children get the fd limit baton started with (it raised its own),
        // unless [app] limits sets one.
        let mut limits = Vec::new();
        if let Some((soft, hard)) = self.nofile {
            limits.push((spawn::Resource::RLIMIT_NOFILE, Some(soft), Some(hard)));
        }
        limits.extend(
            config
                .app
                .limits
                .iter()
                .map(|l| (resource(l.resource), l.value, l.value)),
        );
        // Its cgroup, made and watched before the child exists: nothing it
        // starts can be outside, and its emptiness cannot be missed.
        let cgroup = match self.containment.cgroups() {
            None => None,
            Some(cgroups) => {
                let procs = cgroups.create(generation, &config.app.cgroup_limits)?;
                let dir = cgroups.dir(generation);
                if let Some(watcher) = self.watcher.as_mut() {
                    watcher.get_mut().watch(generation, &dir)?;
                }
                Some((procs, dir))
            }
        };
        let spawned = spawn::spawn(&spawn::Command {
            argv: &config.app.command,
            env,
            workdir: config.app.workdir.as_deref(),
            listeners: &fds,
            user,
            umask: config.app.umask,
            limits,
            cgroup: cgroup.as_ref().map(|(fd, dir)| (fd.as_fd(), dir.as_path())),
        });
        if spawned.is_err() {
            if let Some(cgroups) = self.containment.cgroups() {
                let _ = cgroups.remove(generation);
            }
        }
        spawned
    }
}

fn resource(r: crate::config::LimitResource) -> spawn::Resource {
    use crate::config::LimitResource as L;
    use spawn::Resource as R;
    match r {
        L::Nofile => R::RLIMIT_NOFILE,
        L::Nproc => R::RLIMIT_NPROC,
        L::Core => R::RLIMIT_CORE,
        L::Memlock => R::RLIMIT_MEMLOCK,
        L::Stack => R::RLIMIT_STACK,
        L::As => R::RLIMIT_AS,
        L::Cpu => R::RLIMIT_CPU,
        L::Fsize => R::RLIMIT_FSIZE,
        L::Data => R::RLIMIT_DATA,
    }
}

/// The child's environment: baton's own (less what systemd set for baton),
/// then `[app] env`, then the socket-activation contract.
fn child_env(
    base: &[(OsString, OsString)],
    config: &Config,
    generation: u64,
    notify_path: &Path,
) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = base
        .iter()
        .filter(|(k, _)| !config.app.env.contains_key(&*k.to_string_lossy()))
        .cloned()
        .collect();
    if let Some(user) = &config.app.user {
        // As login(1) and systemd's User= set them; [app] env may override.
        let own = |k: &str| !config.app.env.contains_key(k);
        env.retain(|(k, _)| !matches!(k.to_str(), Some("HOME" | "USER" | "LOGNAME")));
        for (key, value) in [
            ("HOME", user.home.as_os_str().to_owned()),
            ("USER", user.name.clone().into()),
            ("LOGNAME", user.name.clone().into()),
        ] {
            if own(key) {
                env.push((key.into(), value));
            }
        }
    }
    env.extend(config.app.env.iter().map(|(k, v)| (k.into(), v.into())));
    let listeners = &config.listeners;
    if !listeners.is_empty() {
        let names: Vec<&str> = listeners.iter().map(|l| l.name.as_str()).collect();
        env.push(("LISTEN_FDS".into(), listeners.len().to_string().into()));
        env.push(("LISTEN_FDNAMES".into(), names.join(":").into()));
    }
    env.push(("NOTIFY_SOCKET".into(), notify_path.into()));
    env.push(("BATON_GENERATION".into(), generation.to_string().into()));
    env
}

/// One control connection: read one request line (bounded in size and
/// time), hand it to the loop, stream the replies back.
async fn serve_connection(stream: UnixStream, commands: mpsc::UnboundedSender<ControlCommand>) {
    const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
    let (read, mut write) = stream.into_split();
    let send = |reply: &Reply| encode(reply);
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
    // A client that stops reading (an `events` stream behind Ctrl-Z) is
    // dropped after a while, so replies do not pile up for it.
    while let Some(reply) = replies.recv().await {
        let written =
            tokio::time::timeout(READ_TIMEOUT, write.write_all(send(&reply).as_bytes())).await;
        if !matches!(written, Ok(Ok(()))) {
            break;
        }
    }
}

/// Processes adopted by baton (it is a subreaper) that carry the
/// `BATON_GENERATION` of one of `generations` and are outside its process
/// group (led by its main process, whose pid comes with it), alive: the
/// descendants that left the group (setsid), which no killpg reaches, once
/// their parent has gone. Only baton's own unreaped children, so no pid here
/// can have been reused. A process that rewrote its environment is not
/// found.
fn escapees(generations: &[(u64, Pid)]) -> Vec<(u64, Pid)> {
    if generations.is_empty() {
        return Vec::new();
    }
    let me = std::process::id().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            // "pid (comm) state ppid pgrp ...": comm may hold spaces.
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let (_, rest) = stat.rsplit_once(')')?;
            let fields: Vec<&str> = rest.split_whitespace().take(3).collect();
            let (state, ppid, pgrp) = (*fields.first()?, *fields.get(1)?, *fields.get(2)?);
            (ppid == me && state != "Z").then_some((pid, pgrp.parse::<i32>().ok()?))
        })
        .filter_map(|(pid, pgrp)| {
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let generation = environ.split(|&b| b == 0).find_map(|var| {
                std::str::from_utf8(var.strip_prefix(b"BATON_GENERATION=")?)
                    .ok()?
                    .parse::<u64>()
                    .ok()
            })?;
            let (_, leader) = generations.iter().find(|(g, _)| *g == generation)?;
            let in_group = pid == leader.as_raw() || pgrp == leader.as_raw();
            (!in_group).then(|| (generation, Pid::from_raw(pid)))
        })
        .collect()
}

/// Tells a peer why it is not served, and closes (bounded: a peer that
/// does not read cannot hold the task).
async fn refuse_connection(mut stream: UnixStream, message: String) {
    let refusal = encode(&Reply::Error { message });
    let write = stream.write_all(refusal.as_bytes());
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), write).await;
}

/// One log line per notice, at the notice's level. With JSON logs the
/// record also carries the notice as JSON (its `notice` field): what log
/// shippers index and what tests wait on.
fn log(notice: &Notice, json: bool) {
    let text = notice.to_string();
    let text = crate::notice::printable(&text);
    macro_rules! at {
        ($level:ident) => {
            if json {
                tracing::$level!(
                    generation = notice.generation(),
                    notice = %notice.to_json(),
                    "{text}"
                )
            } else {
                tracing::$level!("{text}")
            }
        };
    }
    match notice.level() {
        Level::Error => at!(error),
        Level::Warn => at!(warn),
        Level::Info => at!(info),
        Level::Debug => at!(debug),
    }
}

/// At most [`Throttle::PER_SECOND`] notices of one kind a second; the rest
/// are counted and reported as one line when the next one is let through.
#[derive(Default)]
struct Throttle {
    kinds: HashMap<std::mem::Discriminant<Notice>, Window>,
}

#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    shown: u32,
    suppressed: u64,
}

enum Admit {
    Yes,
    No,
    /// Yes, after this many were suppressed.
    AfterSuppressed(u64),
}

impl Throttle {
    const PER_SECOND: u32 = 10;

    fn admit(&mut self, notice: &Notice, now: Instant) -> Admit {
        let window = self
            .kinds
            .entry(std::mem::discriminant(notice))
            .or_insert(Window {
                start: now,
                shown: 0,
                suppressed: 0,
            });
        if now.saturating_duration_since(window.start) >= std::time::Duration::from_secs(1) {
            let suppressed = window.suppressed;
            *window = Window {
                start: now,
                shown: 1,
                suppressed: 0,
            };
            return match suppressed {
                0 => Admit::Yes,
                n => Admit::AfterSuppressed(n),
            };
        }
        if window.shown < Self::PER_SECOND {
            window.shown += 1;
            Admit::Yes
        } else {
            window.suppressed += 1;
            Admit::No
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 8: another user's /tmp/baton-<uid> (0777, or theirs) must not
    /// hold baton's control socket.
    #[test]
    fn socket_directories_others_can_write_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        assert!(safe_directory(dir.path()).is_ok());
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path(), &link).unwrap();
        let e = safe_directory(&link).unwrap_err().to_string();
        assert!(e.contains("is a symlink"), "{e}");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = safe_directory(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("can be written by other users (mode 777)"),
            "{e}"
        );
        // /tmp itself is sticky: every user's own entries stay theirs.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(safe_directory(dir.path()).is_ok());
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        if nix::unistd::geteuid().is_root() {
            let other = Some(nix::unistd::Uid::from_raw(4242));
            nix::unistd::chown(dir.path(), other, None).unwrap();
            let e = safe_directory(dir.path()).unwrap_err().to_string();
            assert!(e.contains("is owned by uid 4242"), "{e}");
        } else {
            eprintln!("skipped the other-owner half of this test: needs root to chown");
        }
    }

    /// Issue 8: a flood of 100k forged notify datagrams wrote 100k lines.
    #[test]
    fn a_flood_is_logged_as_a_few_lines_and_a_count() {
        let mut t = Throttle::default();
        let t0 = Instant::now();
        let foreign = Notice::ForeignNotify {
            pid: 1,
            ready: true,
        };
        let shown = (0..100_000)
            .filter(|_| matches!(t.admit(&foreign, t0), Admit::Yes))
            .count();
        assert_eq!(shown, Throttle::PER_SECOND as usize);
        // Another kind has its own budget.
        let refused = Notice::ControlRefused { uid: 7, pid: None };
        assert!(matches!(t.admit(&refused, t0), Admit::Yes));
        let later = t0 + std::time::Duration::from_secs(1);
        assert!(matches!(
            t.admit(&foreign, later),
            Admit::AfterSuppressed(99_990)
        ));
        assert!(matches!(t.admit(&foreign, later), Admit::Yes));
    }
}
