//! The configuration file: parsed into raw serde types, then validated into
//! [`Config`], which holds real durations, addresses, signals and argv.
//! Nothing downstream sees raw strings. Every error names the file, line and
//! column and says what to do.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde::Deserialize;
use toml::Spanned;

/// Where `baton run`, `baton check` and the other commands look by default.
pub const DEFAULT_PATH: &str = "/etc/baton/baton.toml";

/// The validated configuration of one supervised application.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file this was read from.
    pub(crate) path: PathBuf,
    /// Listening sockets, in fd order (3, 4, ...).
    pub(crate) listeners: Vec<Listener>,
    pub(crate) app: App,
    pub(crate) readiness: Readiness,
    pub(crate) health: Health,
    pub(crate) drain: Drain,
    pub(crate) restart: Restart,
    /// Path of the control socket (`baton reload`, `status`, `stop`).
    pub(crate) control_socket: PathBuf,
    /// Members of this group may use the control socket too (mode 0660).
    pub(crate) control_group: Option<Group>,
    /// Where the current release and the deploy history are kept.
    pub(crate) state_dir: PathBuf,
    /// `[deploy]`: commands run around a deploy.
    pub(crate) hooks: Hooks,
    /// Where the first `{version}` placeholder is (line, column), when the
    /// file has one: a release must then be named.
    pub(crate) version_needed: Option<(usize, usize)>,
}

/// `[deploy] before` / `after`: run once per deploy, before the candidate
/// starts and after it passed (probation included).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Hooks {
    pub(crate) before: Option<Vec<String>>,
    pub(crate) before_timeout: Duration,
    pub(crate) after: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Group {
    pub(crate) name: String,
    pub(crate) gid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Listener {
    /// Goes into `LISTEN_FDNAMES`; also the name matched when adopting
    /// sockets from systemd.
    pub(crate) name: String,
    pub(crate) address: Address,
    /// `listen(2)` backlog for stream sockets.
    pub(crate) backlog: i32,
    /// File mode of a unix socket, applied after bind.
    pub(crate) mode: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Address {
    Tcp(SocketAddr),
    Udp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp(a) => write!(f, "{a}"),
            Address::Udp(a) => write!(f, "udp:{a}"),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct App {
    /// argv; `command[0]` is resolved on PATH at spawn time.
    pub(crate) command: Vec<String>,
    pub(crate) workdir: Option<PathBuf>,
    /// Added to baton's own environment for every child.
    pub(crate) env: BTreeMap<String, String>,
    /// Run the children as this user (and group), not as baton's.
    pub(crate) user: Option<Credentials>,
    /// The children's umask (`[app] umask`); baton's own otherwise.
    pub(crate) umask: Option<u32>,
    /// Resource limits set in each child (soft = hard = the value).
    pub(crate) limits: Vec<Limit>,
    /// The release to run when no history names one (`{version}`).
    pub(crate) version: Option<String>,
    /// Where each generation's cgroup goes (`[app] cgroup`).
    pub(crate) cgroup: CgroupPlace,
    /// Written into each generation's cgroup (`memory_max`, `cpu_max`,
    /// `pids_max`); they need a cgroup.
    pub(crate) cgroup_limits: Vec<CgroupLimit>,
}

/// `[app] cgroup`: which cgroup v2 directory holds the generations' cgroups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CgroupPlace {
    /// baton's own cgroup, when it is the only process there and may write
    /// it (a systemd service with `Delegate=yes`, a container's init);
    /// else none.
    Auto,
    /// No cgroups: process groups, and escapees found by their environment.
    Off,
    /// This directory (made if missing; its parent must be a cgroup v2
    /// directory).
    At(PathBuf),
}

/// One resource limit of a generation's cgroup: `value` goes into `file`,
/// which exists once `controller` is enabled for the cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CgroupLimit {
    /// The key in `[app]`, for messages.
    pub(crate) key: &'static str,
    pub(crate) controller: &'static str,
    pub(crate) file: &'static str,
    pub(crate) value: String,
}

/// Who the children run as: looked up when the file is validated, so the
/// child only makes raw syscalls (setgroups, setgid, setuid).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Credentials {
    pub(crate) name: String,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    /// Supplementary groups, as initgroups(3) would set them.
    pub(crate) groups: Vec<u32>,
    pub(crate) home: PathBuf,
}

/// One `[app] limits` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limit {
    pub(crate) resource: LimitResource,
    /// `None`: unlimited.
    pub(crate) value: Option<u64>,
}

/// The resources `[app] limits` may set (setrlimit(2)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LimitResource {
    Nofile,
    Nproc,
    Core,
    Memlock,
    Stack,
    As,
    Cpu,
    Fsize,
    Data,
}

impl LimitResource {
    const NAMES: [(&'static str, LimitResource); 9] = [
        ("nofile", LimitResource::Nofile),
        ("nproc", LimitResource::Nproc),
        ("core", LimitResource::Core),
        ("memlock", LimitResource::Memlock),
        ("stack", LimitResource::Stack),
        ("as", LimitResource::As),
        ("cpu", LimitResource::Cpu),
        ("fsize", LimitResource::Fsize),
        ("data", LimitResource::Data),
    ];
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ReadinessCheck {
    /// Ready when a process of the generation sends `READY=1` on
    /// `NOTIFY_SOCKET`.
    Notify,
    /// Ready once the child has been running this long.
    Delay(Duration),
    /// Ready when a process of the generation waits for connections on
    /// every stream listener (epoll, accept, poll, select), seen in /proc.
    Accepting,
    /// Ready when `command` exits 0; run every `interval`, each run
    /// bounded by it.
    Exec {
        command: Vec<String>,
        interval: Duration,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Readiness {
    pub(crate) check: ReadinessCheck,
    /// A candidate not ready by then is stopped; the old generation keeps serving.
    pub(crate) timeout: Duration,
}

/// How often [`ReadinessCheck::Accepting`] looks (the issue's bound: at
/// most 20 ms).
pub(crate) const ACCEPTING_INTERVAL: Duration = Duration::from_millis(20);

/// `[health]`: probes of a serving generation, and probation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Health {
    pub(crate) probe: Option<Probe>,
    /// Replace a generation whose memory stays above this (bytes).
    pub(crate) max_rss: Option<u64>,
    pub(crate) interval: Duration,
    /// Per probe.
    pub(crate) timeout: Duration,
    /// Consecutive failed checks before baton acts.
    pub(crate) failures: u32,
    /// After a candidate is ready, how long the old generation serves
    /// beside it before it is drained (zero: none).
    pub(crate) probation: Duration,
}

impl Health {
    /// Whether anything is checked at all.
    pub(crate) fn checks(&self) -> bool {
        self.probe.is_some() || self.max_rss.is_some()
    }
}

/// One health probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Probe {
    /// `GET path` on `address` (HTTP/1.1, `Host: host`): a 2xx or 3xx
    /// status passes.
    Http {
        address: SocketAddr,
        host: String,
        path: String,
    },
    /// A TCP connect passes.
    Tcp(SocketAddr),
    /// Exit 0 passes.
    Exec(Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Drain {
    pub(crate) signal: Signal,
    /// After this the generation's process group gets SIGKILL.
    pub(crate) timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Restart {
    pub(crate) backoff_initial: Duration,
    pub(crate) backoff_max: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}:{column}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let bytes = std::fs::read(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let text = std::str::from_utf8(&bytes).map_err(|e| {
            // Position of the first bad byte, counted in the valid part.
            let valid = std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default();
            let (line, column) = line_column(valid, valid.len());
            ConfigError::Invalid {
                path: path.to_owned(),
                line,
                column,
                message: format!(
                    "invalid UTF-8 at byte {}: the file must be UTF-8 text",
                    e.valid_up_to()
                ),
            }
        })?;
        Config::parse(path, text)
    }

    /// Validates `text` as if read from `path` (used for error positions and
    /// for the default control socket name).
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let at = |span: Option<Range<usize>>, message: String| {
            let (line, column) = line_column(text, span.map_or(0, |s| s.start));
            ConfigError::Invalid {
                path: path.to_owned(),
                line,
                column,
                message,
            }
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let message = e.message().trim_end().to_owned();
            at(e.span(), message)
        })?;
        let (mut config, needs_version) = raw
            .validate(path)
            .map_err(|Invalid { span, message }| at(Some(span), message))?;
        config.version_needed = needs_version.map(|span| line_column(text, span.start));
        Ok(config)
    }

    /// A file that uses `{version}` needs a release to start with: the one
    /// the history in `[state] dir` says serves, else `[app] version`.
    /// `baton check` and `baton run` refuse it otherwise (the position of
    /// the first `{version}` in the error).
    pub fn check_release(&self) -> Result<(), ConfigError> {
        if !self.uses_version() || self.app.version.is_some() {
            return Ok(());
        }
        match crate::history::load(&self.state_dir, false).0.current {
            Some(_) => Ok(()),
            None => Err(self.missing_version()),
        }
    }

    /// Whether the file names its release with `{version}`.
    pub(crate) fn uses_version(&self) -> bool {
        self.version_needed.is_some()
    }

    /// The error for a file that uses `{version}` when no release is named
    /// (no `[app] version`, no history, no `deploy VERSION`).
    pub(crate) fn missing_version(&self) -> ConfigError {
        let (line, column) = self.version_needed.unwrap_or((1, 1));
        ConfigError::Invalid {
            path: self.path.clone(),
            line,
            column,
            message: "{version} needs a release to run and none is named: set [app] version = \
                      \"1.0.0\", or start a deploy with `baton deploy VERSION`"
                .into(),
        }
    }

    /// This config with `version` in every `{version}`, and `BATON_VERSION`
    /// in the app's environment. `version` is valid ([`valid_version`]).
    pub(crate) fn render(&self, version: Option<&str>) -> Config {
        let mut c = self.clone();
        let Some(v) = version else { return c };
        let fill = |t: &mut String| *t = t.replace("{version}", v);
        let fill_all = |argv: &mut Vec<String>| argv.iter_mut().for_each(fill);
        fill_all(&mut c.app.command);
        if let Some(dir) = &mut c.app.workdir {
            *dir = PathBuf::from(dir.to_string_lossy().replace("{version}", v));
        }
        c.app.env.values_mut().for_each(fill);
        c.app.env.insert("BATON_VERSION".into(), v.to_owned());
        if let ReadinessCheck::Exec { command, .. } = &mut c.readiness.check {
            fill_all(command);
        }
        if let Some(Probe::Exec(command)) = &mut c.health.probe {
            fill_all(command);
        }
        for hook in [&mut c.hooks.before, &mut c.hooks.after]
            .into_iter()
            .flatten()
        {
            fill_all(hook);
        }
        c
    }

    /// One line for `baton check`: what the file sets up.
    pub fn summary(&self) -> String {
        let user = self
            .app
            .user
            .as_ref()
            .map_or_else(String::new, |u| format!("; as user {}", u.name));
        format!(
            "{} listener(s); command: {}{user}; control socket: {}",
            self.listeners.len(),
            self.app.command.join(" "),
            self.control_socket.display()
        )
    }
}

/// The control socket named by the file at `path`, found without requiring
/// the whole file to be valid: `baton reload` must reach the daemon to hear
/// the daemon's own verdict on a broken file. Without `[control] socket`,
/// the default, or else `/run/baton/<stem>/baton.sock` where the packaged
/// `baton@<stem>.service` puts it.
pub fn control_socket_of(path: &Path) -> PathBuf {
    let from_file = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .and_then(|t| t.get("control")?.get("socket")?.as_str().map(PathBuf::from));
    if let Some(socket) = from_file {
        return socket;
    }
    let default = default_control_socket(path);
    // Outside the unit (an operator's shell) RUNTIME_DIRECTORY is unset; the
    // packaged baton@.service puts the socket in /run/baton/<instance>/.
    let stem = path.file_stem().unwrap_or_default();
    let unit_layout = Path::new("/run/baton").join(stem).join("baton.sock");
    if std::env::var_os("RUNTIME_DIRECTORY").is_none() && !default.exists() && unit_layout.exists()
    {
        return unit_layout;
    }
    default
}

/// `$RUNTIME_DIRECTORY/baton.sock` if set (systemd `RuntimeDirectory=`), else
/// `/run/baton/<stem>.sock` as root, else `$XDG_RUNTIME_DIR/baton/<stem>.sock`
/// (or `/tmp/baton-<uid>/<stem>.sock` without XDG_RUNTIME_DIR).
pub(crate) fn default_control_socket(config_path: &Path) -> PathBuf {
    if let Some(dir) = std::env::var_os("RUNTIME_DIRECTORY").filter(|d| !d.is_empty()) {
        // systemd may list several directories separated by ':'.
        let first = dir
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or("")
            .to_owned();
        return Path::new(&first).join("baton.sock");
    }
    let stem = config_path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "baton".to_owned());
    let uid = nix::unistd::getuid();
    let dir = if uid.is_root() {
        PathBuf::from("/run/baton")
    } else if let Some(xdg) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Path::new(&xdg).join("baton")
    } else {
        PathBuf::from(format!("/tmp/baton-{uid}"))
    };
    dir.join(format!("{stem}.sock"))
}

/// The notify socket lives beside the control socket: `x.sock` → `x.notify`.
pub(crate) fn notify_socket_for(control_socket: &Path) -> PathBuf {
    control_socket.with_extension("notify")
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

// ---------------------------------------------------------------------------
// Raw serde types: exactly the file's shape, with spans for error positions.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    listen: Vec<RawListen>,
    app: RawApp,
    #[serde(default)]
    readiness: RawReadiness,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    drain: RawDrain,
    #[serde(default)]
    restart: RawRestart,
    #[serde(default)]
    control: RawControl,
    #[serde(default)]
    state: RawState,
    #[serde(default)]
    deploy: RawDeploy,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawState {
    dir: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDeploy {
    before: Option<Spanned<Vec<String>>>,
    before_timeout: RawDuration,
    after: Option<Spanned<Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    name: Spanned<String>,
    address: Spanned<String>,
    backlog: Option<Spanned<i64>>,
    mode: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApp {
    command: Spanned<Vec<String>>,
    workdir: Option<Spanned<String>>,
    env: Option<Spanned<BTreeMap<String, String>>>,
    user: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
    umask: Option<Spanned<String>>,
    limits: Option<Spanned<BTreeMap<String, RawLimit>>>,
    cgroup: Option<Spanned<String>>,
    memory_max: Option<Spanned<RawLimit>>,
    cpu_max: Option<Spanned<String>>,
    pids_max: Option<Spanned<RawLimit>>,
    version: Option<Spanned<String>>,
}

/// A limit: a number, or "unlimited".
#[derive(Deserialize)]
#[serde(untagged)]
enum RawLimit {
    Number(i64),
    Word(String),
}

type RawDuration = Option<Spanned<String>>;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawReadiness {
    check: Option<Spanned<String>>,
    delay: RawDuration,
    timeout: RawDuration,
    command: Option<Spanned<Vec<String>>>,
    interval: RawDuration,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    check: Option<Spanned<String>>,
    url: Option<Spanned<String>>,
    address: Option<Spanned<String>>,
    command: Option<Spanned<Vec<String>>>,
    interval: RawDuration,
    timeout: RawDuration,
    failures: Option<Spanned<i64>>,
    probation: RawDuration,
    max_rss: Option<Spanned<RawLimit>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDrain {
    signal: Option<Spanned<String>>,
    timeout: RawDuration,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRestart {
    backoff_initial: RawDuration,
    backoff_max: RawDuration,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawControl {
    socket: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
}

/// A validation failure at a span of the file.
struct Invalid {
    span: Range<usize>,
    message: String,
}

fn invalid<T>(span: Range<usize>, message: impl Into<String>) -> Result<T, Invalid> {
    Err(Invalid {
        span,
        message: message.into(),
    })
}

const DEFAULT_BACKLOG: i32 = 1024;

impl RawConfig {
    fn validate(self, path: &Path) -> Result<(Config, Option<Range<usize>>), Invalid> {
        let needs_version = self.placeholders()?;
        let mut listeners: Vec<Listener> = Vec::with_capacity(self.listen.len());
        let mut names = HashSet::with_capacity(self.listen.len());
        let mut unix_paths = Vec::with_capacity(self.listen.len());
        for raw in self.listen {
            if !names.insert(raw.name.get_ref().clone()) {
                return invalid(
                    raw.name.span(),
                    format!(
                        "duplicate listener name `{}`: each [[listen]] needs its own name",
                        raw.name.get_ref()
                    ),
                );
            }
            let span = raw.address.span();
            listeners.push(raw.validate()?);
            unix_paths.push(span);
        }
        let control_span = self.control.socket.as_ref().map_or(0..0, |s| s.span());
        let control_socket = match &self.control.socket {
            Some(s) => absolute_path(s, "control socket")?,
            None => default_control_socket(path),
        };
        if control_socket.extension().is_some_and(|e| e == "notify") {
            return invalid(
                control_span,
                "the control socket's name must not end in `.notify`: baton puts its notify \
                 socket beside it under that name",
            );
        }
        let notify_socket = notify_socket_for(&control_socket);
        for (what, path) in [
            ("control socket", &control_socket),
            ("notify socket", &notify_socket),
        ] {
            unix_path_fits(path, what).map_err(|message| Invalid {
                span: control_span.clone(),
                message,
            })?;
        }
        for (l, span) in listeners.iter().zip(unix_paths) {
            let Address::Unix(p) = &l.address else {
                continue;
            };
            if *p == control_socket || *p == notify_socket {
                return invalid(
                    span,
                    format!(
                        "listener `{}` is at {}, where baton's own control or notify socket \
                         is: give it another path (or move [control] socket)",
                        l.name,
                        p.display()
                    ),
                );
            }
        }
        let control_group = match &self.control.group {
            None => None,
            Some(raw) => Some(lookup_group(raw)?),
        };
        let streams = listeners
            .iter()
            .any(|l| !matches!(l.address, Address::Udp(_)));
        let check_span = self.readiness.check.as_ref().map_or(0..0, |c| c.span());
        let readiness = self.readiness.validate()?;
        if readiness.check == ReadinessCheck::Accepting && !streams {
            let span = check_span;
            return invalid(
                span,
                "check = \"accepting\" needs a stream listener ([[listen]] with a TCP or unix \
                 address) to watch: use \"notify\", \"exec\" or \"delay\"",
            );
        }
        let state_dir = match &self.state.dir {
            Some(dir) => absolute_path(dir, "[state] dir")?,
            None => default_state_dir(path),
        };
        let config = Config {
            path: path.to_owned(),
            control_group,
            listeners,
            app: self.app.validate()?,
            readiness,
            health: self.health.validate()?,
            drain: self.drain.validate()?,
            restart: self.restart.validate()?,
            control_socket,
            state_dir,
            hooks: self.deploy.validate()?,
            version_needed: None,
        };
        Ok((config, needs_version))
    }

    /// Checks every `{...}` in the fields that take `{version}`; the span
    /// of the first `{version}`, if there is one.
    fn placeholders(&self) -> Result<Option<Range<usize>>, Invalid> {
        let app = &self.app;
        let mut fields: Vec<(Range<usize>, &str)> = Vec::new();
        fn argv(raw: &Spanned<Vec<String>>) -> Vec<(Range<usize>, &str)> {
            raw.get_ref()
                .iter()
                .map(|a| (raw.span(), a.as_str()))
                .collect()
        }
        fields.extend(argv(&app.command));
        if let Some(w) = &app.workdir {
            fields.push((w.span(), w.get_ref()));
        }
        if let Some(env) = &app.env {
            fields.extend(env.get_ref().values().map(|v| (env.span(), v.as_str())));
        }
        for raw in [&self.readiness.command, &self.health.command]
            .into_iter()
            .flatten()
        {
            fields.extend(argv(raw));
        }
        for raw in [&self.deploy.before, &self.deploy.after]
            .into_iter()
            .flatten()
        {
            fields.extend(argv(raw));
        }
        let mut first = None;
        for (span, text) in fields {
            if holds_version(text).map_err(|message| Invalid {
                span: span.clone(),
                message,
            })? && first.is_none()
            {
                first = Some(span);
            }
        }
        Ok(first)
    }
}

/// Whether `text` holds `{version}`. A near miss (`{verison}`,
/// `{Version}`: within two edits of it) is an error, not text; any other
/// braces are text (`${HOME}` in a shell command, `$SIG{TERM}` in perl,
/// JSON).
fn holds_version(text: &str) -> Result<bool, String> {
    let mut uses = false;
    let mut rest = text;
    let mut before = None;
    while let Some(open) = rest.find('{') {
        let dollar = rest[..open].chars().last().or(before) == Some('$');
        before = Some('{');
        rest = &rest[open + 1..];
        let Some(close) = rest.find(['}', '{']) else {
            break;
        };
        if rest.as_bytes()[close] == b'{' {
            continue;
        }
        let name = &rest[..close];
        if name == "version" {
            uses = true;
        } else if !dollar && near("version", &name.to_ascii_lowercase()) {
            return Err(format!(
                "unknown placeholder `{{{name}}}` in `{text}`: did you mean {{version}}?"
            ));
        }
    }
    Ok(uses)
}

/// Whether `b` is within two single-character edits of `a` (Levenshtein).
fn near(a: &str, b: &str) -> bool {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    if a.len().abs_diff(b.len()) > 2 || b.is_empty() {
        return false;
    }
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let current = row[j + 1];
            row[j + 1] = (previous + usize::from(ca != cb))
                .min(row[j] + 1)
                .min(current + 1);
            previous = current;
        }
    }
    row[b.len()] <= 2
}

/// A release's name: what `{version}` becomes in paths, so no `/`, no
/// leading `.` or `-`, at most 128 of `A-Z a-z 0-9 . _ + ~ -`.
pub fn valid_version(version: &str) -> Result<(), String> {
    let ok = !version.is_empty()
        && version.len() <= 128
        && !version.starts_with(['.', '-'])
        && version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '~' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "release `{version}` is not a valid version: use 1 to 128 of A-Z a-z 0-9 . _ + ~ - \
             (not starting with . or -), e.g. \"1.4.2\""
        ))
    }
}

impl RawDeploy {
    fn validate(self) -> Result<Hooks, Invalid> {
        let hook = |raw: &Option<Spanned<Vec<String>>>, what: &str| -> Result<_, Invalid> {
            match raw {
                None => Ok(None),
                Some(raw) => argv(Some(raw), raw.span(), what).map(Some),
            }
        };
        Ok(Hooks {
            before: hook(&self.before, "[deploy] before")?,
            before_timeout: duration(&self.before_timeout, Duration::from_secs(300))?,
            after: hook(&self.after, "[deploy] after")?,
        })
    }
}

/// `$STATE_DIRECTORY` (systemd `StateDirectory=`), else
/// `/var/lib/baton/<stem>` as root, else `$XDG_STATE_HOME/baton/<stem>`
/// (`~/.local/state/baton/<stem>` without it).
pub(crate) fn default_state_dir(config_path: &Path) -> PathBuf {
    if let Some(dir) = std::env::var_os("STATE_DIRECTORY").filter(|d| !d.is_empty()) {
        let first = dir
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or("")
            .to_owned();
        return PathBuf::from(first);
    }
    let stem = config_path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "baton".to_owned());
    if nix::unistd::getuid().is_root() {
        return Path::new("/var/lib/baton").join(stem);
    }
    let base = std::env::var_os("XDG_STATE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join("baton").join(stem)
}

impl RawListen {
    fn validate(self) -> Result<Listener, Invalid> {
        let name = self.name.get_ref();
        let name_ok = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !name_ok {
            return invalid(
                self.name.span(),
                format!("listener name `{name}` must be non-empty and use only A-Z a-z 0-9 _ . -"),
            );
        }
        let address = parse_address(&self.address)?;
        let backlog = match self.backlog {
            None => DEFAULT_BACKLOG,
            Some(b) => match i32::try_from(*b.get_ref()) {
                Ok(v) if v > 0 => v,
                _ => return invalid(b.span(), "backlog must be a positive integer, e.g. 1024"),
            },
        };
        let mode = match self.mode {
            None => None,
            Some(m) if !matches!(address, Address::Unix(_)) => {
                return invalid(m.span(), "mode applies only to unix: addresses");
            }
            Some(m) => match u32::from_str_radix(m.get_ref(), 8) {
                Ok(v) if v <= 0o777 => Some(v),
                _ => {
                    return invalid(
                        m.span(),
                        format!(
                            "mode `{}` is not an octal file mode like \"0660\"",
                            m.get_ref()
                        ),
                    )
                }
            },
        };
        Ok(Listener {
            name: name.clone(),
            address,
            backlog,
            mode,
        })
    }
}

fn parse_address(raw: &Spanned<String>) -> Result<Address, Invalid> {
    let text = raw.get_ref().as_str();
    let ip = |s: &str| {
        SocketAddr::from_str(s).map_err(|_| Invalid {
            span: raw.span(),
            message: format!(
                "bad address `{text}`: use an IP address and port like \"127.0.0.1:8080\" or \
                 \"[::1]:8080\", \"udp:0.0.0.0:53\", or \"unix:/run/app/app.sock\""
            ),
        })
    };
    if let Some(path) = text.strip_prefix("unix:") {
        let path = Path::new(path);
        if !path.is_absolute() {
            return invalid(
                raw.span(),
                format!("unix socket path in `{text}` must be absolute, e.g. \"unix:/run/app/app.sock\""),
            );
        }
        unix_path_fits(path, "unix socket").map_err(|message| Invalid {
            span: raw.span(),
            message,
        })?;
        return Ok(Address::Unix(path.to_owned()));
    }
    if let Some(rest) = text.strip_prefix("udp:") {
        return ip(rest).map(Address::Udp);
    }
    ip(text.strip_prefix("tcp:").unwrap_or(text)).map(Address::Tcp)
}

/// The user (and group, else the user's own) the children run as, with the
/// supplementary groups initgroups(3) would give them.
fn lookup_user(
    raw: &Spanned<String>,
    group: Option<&Spanned<String>>,
) -> Result<Credentials, Invalid> {
    let name = raw.get_ref();
    let user = match nix::unistd::User::from_name(name) {
        Ok(Some(u)) => u,
        Ok(None) => {
            return invalid(
                raw.span(),
                format!("user `{name}` does not exist: create it (useradd --system {name}) or remove the setting"),
            )
        }
        Err(e) => return invalid(raw.span(), format!("cannot look up user `{name}`: {e}")),
    };
    let gid = match group {
        Some(g) => lookup_group(g)?.gid,
        None => user.gid.as_raw(),
    };
    let cname = std::ffi::CString::new(name.as_bytes()).map_err(|_| Invalid {
        span: raw.span(),
        message: "user name contains a NUL byte".into(),
    })?;
    let gid_t = nix::unistd::Gid::from_raw(gid);
    let groups = nix::unistd::getgrouplist(&cname, gid_t).map_err(|e| Invalid {
        span: raw.span(),
        message: format!("cannot list the groups of user `{name}`: {e}"),
    })?;
    Ok(Credentials {
        name: name.clone(),
        uid: user.uid.as_raw(),
        gid,
        groups: groups.into_iter().map(|g| g.as_raw()).collect(),
        home: user.dir,
    })
}

fn parse_limits(raw: &Spanned<BTreeMap<String, RawLimit>>) -> Result<Vec<Limit>, Invalid> {
    let mut limits = Vec::new();
    for (name, value) in raw.get_ref() {
        let Some(&(_, resource)) = LimitResource::NAMES.iter().find(|(n, _)| n == name) else {
            let known: Vec<&str> = LimitResource::NAMES.iter().map(|(n, _)| *n).collect();
            return invalid(
                raw.span(),
                format!("unknown limit `{name}`: use one of {}", known.join(", ")),
            );
        };
        let value = match value {
            RawLimit::Number(n) if *n >= 0 => Some(*n as u64),
            RawLimit::Word(w) if w == "unlimited" || w == "infinity" => None,
            _ => {
                return invalid(
                    raw.span(),
                    format!("limit `{name}` must be a number ≥ 0 or \"unlimited\""),
                )
            }
        };
        limits.push(Limit { resource, value });
    }
    Ok(limits)
}

fn lookup_group(raw: &Spanned<String>) -> Result<Group, Invalid> {
    let name = raw.get_ref();
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(Group {
            name: name.clone(),
            gid: g.gid.as_raw(),
        }),
        Ok(None) => invalid(
            raw.span(),
            format!(
                "group `{name}` does not exist: create it (groupadd {name}) or remove the setting"
            ),
        ),
        Err(e) => invalid(raw.span(), format!("cannot look up group `{name}`: {e}")),
    }
}

/// The longest path a unix socket can be bound at: `sun_path` holds 108
/// bytes, the last one the terminating NUL (unix(7)).
const MAX_UNIX_PATH: usize = 107;

fn unix_path_fits(path: &Path, what: &str) -> Result<(), String> {
    let len = path.as_os_str().len();
    if len > MAX_UNIX_PATH {
        return Err(format!(
            "{what} path {} is {len} bytes long; a unix socket path holds at most \
             {MAX_UNIX_PATH}: choose a shorter one",
            path.display()
        ));
    }
    Ok(())
}

/// A NUL byte cannot be passed to exec, to open or to bind: reject it here,
/// not at the first spawn.
fn no_nul(span: &Range<usize>, what: &str, text: &str) -> Result<(), Invalid> {
    if text.contains('\0') {
        return invalid(
            span.clone(),
            format!("{what} contains a NUL byte (\\u0000), which no program can receive"),
        );
    }
    Ok(())
}

fn absolute_path(raw: &Spanned<String>, what: &str) -> Result<PathBuf, Invalid> {
    no_nul(&raw.span(), &format!("{what} path"), raw.get_ref())?;
    let path = PathBuf::from(raw.get_ref());
    if !path.is_absolute() {
        return invalid(
            raw.span(),
            format!("{what} path `{}` must be absolute", raw.get_ref()),
        );
    }
    Ok(path)
}

/// The longest duration any setting takes. Deadlines are instants in the
/// future; a bound keeps every one of them representable (issue 8: a
/// timeout of 2^63 s passed `check` and aborted the daemon at its first
/// drain).
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

fn duration(raw: &RawDuration, default: Duration) -> Result<Duration, Invalid> {
    let Some(raw) = raw else { return Ok(default) };
    match humantime::parse_duration(raw.get_ref()) {
        Ok(d) if d > MAX_DURATION => invalid(
            raw.span(),
            format!(
                "duration `{}` is too long: at most 30 days (\"30d\")",
                raw.get_ref()
            ),
        ),
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => invalid(raw.span(), "duration must be greater than zero"),
        Err(e) => invalid(
            raw.span(),
            format!(
                "bad duration `{}` ({e}): write e.g. \"500ms\", \"30s\" or \"2m\"",
                raw.get_ref()
            ),
        ),
    }
}

impl RawApp {
    fn validate(self) -> Result<App, Invalid> {
        let cgroup = match &self.cgroup {
            None => CgroupPlace::Auto,
            Some(raw) => match raw.get_ref().as_str() {
                "auto" => CgroupPlace::Auto,
                "off" => CgroupPlace::Off,
                _ if raw.get_ref().starts_with('/') => {
                    CgroupPlace::At(absolute_path(raw, "cgroup")?)
                }
                other => {
                    return invalid(
                        raw.span(),
                        format!(
                            "cgroup `{other}` is neither \"auto\", \"off\" nor an absolute \
                             path like \"/sys/fs/cgroup/baton/app\""
                        ),
                    )
                }
            },
        };
        let cgroup_limits = self.cgroup_limits()?;
        if let (Some(first), CgroupPlace::Off) = (cgroup_limits.first(), &cgroup) {
            let span = self.cgroup.as_ref().map_or(0..0, |c| c.span());
            return invalid(
                span,
                format!(
                    "{} needs a cgroup, and cgroup = \"off\": remove one of the two",
                    first.key
                ),
            );
        }
        let span = self.command.span();
        let command = self.command.into_inner();
        if command.first().is_none_or(|c| c.is_empty()) {
            return invalid(
                span,
                "command must name a program: command = [\"/path/to/server\", \"--flag\"]",
            );
        }
        for arg in &command {
            no_nul(&span, "command", arg)?;
        }
        let workdir = match self.workdir {
            Some(w) => Some(absolute_path(&w, "workdir")?),
            None => None,
        };
        let (env_span, env) = match self.env {
            Some(env) => (env.span(), env.into_inner()),
            None => (span.clone(), BTreeMap::new()),
        };
        for (key, value) in &env {
            no_nul(&env_span, "env", &format!("{key}{value}"))?;
            if key.is_empty() || key.contains('=') {
                return invalid(
                    env_span,
                    format!("env name `{key}` must be non-empty and contain no `=`"),
                );
            }
        }
        // execve(2) fails with E2BIG past these; baton's own environment
        // comes on top, so leave it room.
        let longest = command.iter().map(String::len).max().unwrap_or(0);
        let longest = env
            .iter()
            .map(|(k, v)| k.len() + v.len() + 1)
            .fold(longest, usize::max);
        if longest >= MAX_ARG_STRLEN {
            return invalid(
                span,
                format!(
                    "an argument or env entry is {longest} bytes; the kernel takes at most \
                     {MAX_ARG_STRLEN} per string"
                ),
            );
        }
        let total: usize = command.iter().map(|a| a.len() + 1).sum::<usize>()
            + env
                .iter()
                .map(|(k, v)| k.len() + v.len() + 2)
                .sum::<usize>();
        let limit = arg_max() / 2;
        if total > limit {
            return invalid(
                span,
                format!(
                    "command and env take {total} bytes; at most {limit} fit (half of ARG_MAX, \
                     leaving room for baton's own environment): pass large data in a file"
                ),
            );
        }
        let user = match &self.user {
            None => {
                if let Some(group) = &self.group {
                    return invalid(group.span(), "group applies only with user = \"...\"");
                }
                None
            }
            Some(user) => Some(lookup_user(user, self.group.as_ref())?),
        };
        let umask = match &self.umask {
            None => None,
            Some(raw) => match u32::from_str_radix(raw.get_ref(), 8) {
                Ok(v) if v <= 0o777 => Some(v),
                _ => {
                    return invalid(
                        raw.span(),
                        format!(
                            "umask `{}` is not an octal mask like \"0027\"",
                            raw.get_ref()
                        ),
                    )
                }
            },
        };
        let limits = match &self.limits {
            None => Vec::new(),
            Some(raw) => parse_limits(raw)?,
        };
        let version = match &self.version {
            None => None,
            Some(raw) => {
                valid_version(raw.get_ref()).map_err(|message| Invalid {
                    span: raw.span(),
                    message,
                })?;
                Some(raw.get_ref().clone())
            }
        };
        Ok(App {
            command,
            workdir,
            env,
            user,
            umask,
            limits,
            version,
            cgroup,
            cgroup_limits,
        })
    }
}

/// A size in bytes: a number, or a string with a binary suffix ("512M",
/// "2G", "512MiB"), or "max" (`None`).
fn size(raw: &Spanned<RawLimit>, key: &str) -> Result<Option<u64>, Invalid> {
    match raw.get_ref() {
        RawLimit::Number(n) if *n > 0 => Ok(Some(*n as u64)),
        RawLimit::Number(_) => invalid(raw.span(), format!("{key} must be greater than zero")),
        RawLimit::Word(w) if w == "max" => Ok(None),
        RawLimit::Word(w) => parse_size::Config::new()
            .with_binary()
            .parse_size(w)
            .ok()
            .filter(|&b| b > 0)
            .map(Some)
            .ok_or_else(|| Invalid {
                span: raw.span(),
                message: format!(
                    "{key} `{w}` is not a size: write bytes, or e.g. \"512M\" or \"2G\" \
                     (powers of 1024), or \"max\""
                ),
            }),
    }
}

impl RawApp {
    /// `memory_max`, `cpu_max` and `pids_max`, in the kernel's formats.
    fn cgroup_limits(&self) -> Result<Vec<CgroupLimit>, Invalid> {
        let mut limits = Vec::new();
        if let Some(raw) = &self.memory_max {
            let bytes = size(raw, "memory_max")?;
            limits.push(CgroupLimit {
                key: "memory_max",
                controller: "memory",
                file: "memory.max",
                value: bytes.map_or_else(|| "max".to_owned(), |b| b.to_string()),
            });
        }
        if let Some(raw) = &self.cpu_max {
            // As systemd's CPUQuota=: a share of one CPU per 100 ms period.
            const PERIOD_US: u64 = 100_000;
            let text = raw.get_ref().trim();
            let value = if text == "max" {
                format!("max {PERIOD_US}")
            } else {
                let percent = text
                    .strip_suffix('%')
                    .and_then(|p| p.trim().parse::<f64>().ok())
                    .filter(|p| p.is_finite() && *p >= 1.0 && *p <= 100_000.0)
                    .ok_or_else(|| Invalid {
                        span: raw.span(),
                        message: format!(
                            "cpu_max `{text}` is not a CPU share: write a percentage of one CPU \
                             (at least 1%), e.g. \"50%\" or \"200%\" for two CPUs, or \"max\""
                        ),
                    })?;
                let quota = (percent / 100.0 * PERIOD_US as f64).round() as u64;
                format!("{quota} {PERIOD_US}")
            };
            limits.push(CgroupLimit {
                key: "cpu_max",
                controller: "cpu",
                file: "cpu.max",
                value,
            });
        }
        if let Some(raw) = &self.pids_max {
            let value = match raw.get_ref() {
                RawLimit::Number(n) if *n > 0 => n.to_string(),
                RawLimit::Word(w) if w == "max" => "max".to_owned(),
                _ => {
                    return invalid(
                        raw.span(),
                        "pids_max must be a number of processes greater than zero, or \"max\"",
                    )
                }
            };
            limits.push(CgroupLimit {
                key: "pids_max",
                controller: "pids",
                file: "pids.max",
                value,
            });
        }
        Ok(limits)
    }
}

/// The longest single argument or environment string (32 pages,
/// `MAX_ARG_STRLEN` in linux/binfmts.h).
const MAX_ARG_STRLEN: usize = 32 * 4096;

/// The kernel's limit on argv + envp, as `sysconf(_SC_ARG_MAX)` tells it.
fn arg_max() -> usize {
    nix::unistd::sysconf(nix::unistd::SysconfVar::ARG_MAX)
        .ok()
        .flatten()
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(128 * 1024)
}

impl RawReadiness {
    fn validate(self) -> Result<Readiness, Invalid> {
        let timeout = duration(&self.timeout, Duration::from_secs(30))?;
        let check = self
            .check
            .as_ref()
            .map(|c| (c.get_ref().as_str(), c.span()));
        let name = check.as_ref().map_or("notify", |(name, _)| name);
        let only = |key: &str, span: Range<usize>| -> Result<(), Invalid> {
            invalid(
                span,
                format!(
                    "{key} applies only to check = \"{}\"",
                    match key {
                        "delay" => "delay",
                        _ => "exec",
                    }
                ),
            )
        };
        if let (Some(delay), false) = (&self.delay, name == "delay") {
            only("delay", delay.span())?;
        }
        if name != "exec" {
            if let Some(command) = &self.command {
                only("command", command.span())?;
            }
            if let Some(interval) = &self.interval {
                only("interval", interval.span())?;
            }
        }
        let check = match check {
            None | Some(("notify", _)) => ReadinessCheck::Notify,
            Some(("delay", _)) => {
                let delay = duration(&self.delay, Duration::from_secs(1))?;
                if delay >= timeout {
                    let span = self.delay.as_ref().map_or(0..0, |d| d.span());
                    return invalid(span, "delay must be shorter than the readiness timeout");
                }
                ReadinessCheck::Delay(delay)
            }
            Some(("accepting", _)) => ReadinessCheck::Accepting,
            Some(("exec", span)) => {
                let command = argv(self.command.as_ref(), span, "[readiness] command")?;
                let interval = duration(&self.interval, Duration::from_millis(200))?;
                ReadinessCheck::Exec { command, interval }
            }
            Some((other, span)) => {
                return invalid(
                    span,
                    format!(
                        "unknown readiness check `{other}`: use \"notify\", \"accepting\", \
                         \"exec\" or \"delay\""
                    ),
                )
            }
        };
        Ok(Readiness { check, timeout })
    }
}

/// A command's argv from the file: present, naming a program, no NUL.
/// `span` is where to point when it is missing.
fn argv(
    raw: Option<&Spanned<Vec<String>>>,
    span: Range<usize>,
    what: &str,
) -> Result<Vec<String>, Invalid> {
    let Some(raw) = raw else {
        return invalid(
            span,
            format!("{what} is missing: command = [\"/path/to/program\", \"--flag\"]"),
        );
    };
    let command = raw.get_ref();
    if command.first().is_none_or(|c| c.is_empty()) {
        return invalid(
            raw.span(),
            format!("{what} must name a program: [\"/path/to/program\", \"--flag\"]"),
        );
    }
    for arg in command {
        no_nul(&raw.span(), what, arg)?;
    }
    Ok(command.clone())
}

impl RawHealth {
    fn validate(self) -> Result<Health, Invalid> {
        let check = self
            .check
            .as_ref()
            .map(|c| (c.get_ref().as_str(), c.span()));
        let name = check.as_ref().map(|(name, _)| *name);
        for (key, present, wanted) in [
            ("url", self.url.as_ref().map(|u| u.span()), "http"),
            ("address", self.address.as_ref().map(|a| a.span()), "tcp"),
            ("command", self.command.as_ref().map(|c| c.span()), "exec"),
        ] {
            if let Some(span) = present.filter(|_| name != Some(wanted)) {
                return invalid(span, format!("{key} applies only to check = \"{wanted}\""));
            }
        }
        let probe = match check {
            None => None,
            Some(("http", span)) => {
                let Some(url) = &self.url else {
                    return invalid(
                        span,
                        "check = \"http\" needs url = \"http://127.0.0.1:8080/healthz\"",
                    );
                };
                Some(http_probe(url)?)
            }
            Some(("tcp", span)) => {
                let Some(address) = &self.address else {
                    return invalid(span, "check = \"tcp\" needs address = \"127.0.0.1:8080\"");
                };
                let parsed = SocketAddr::from_str(address.get_ref()).map_err(|_| Invalid {
                    span: address.span(),
                    message: format!(
                        "bad address `{}`: use an IP address and port like \"127.0.0.1:8080\"",
                        address.get_ref()
                    ),
                })?;
                Some(Probe::Tcp(parsed))
            }
            Some(("exec", span)) => Some(Probe::Exec(argv(
                self.command.as_ref(),
                span,
                "[health] command",
            )?)),
            Some((other, span)) => {
                return invalid(
                    span,
                    format!("unknown health check `{other}`: use \"http\", \"tcp\" or \"exec\""),
                )
            }
        };
        let failures = match &self.failures {
            None => 3,
            Some(raw) => match u32::try_from(*raw.get_ref()) {
                Ok(n) if (1..=1000).contains(&n) => n,
                _ => return invalid(raw.span(), "failures must be a number from 1 to 1000"),
            },
        };
        let max_rss = match &self.max_rss {
            None => None,
            Some(raw) => Some(size(raw, "max_rss")?.ok_or_else(|| {
                Invalid {
                    span: raw.span(),
                    message: "max_rss must be a size such as \"512MiB\" (\"max\" means no limit: \
                          leave the key out)"
                        .into(),
                }
            })?),
        };
        let probation = match &self.probation {
            None => Duration::ZERO,
            Some(raw) if raw.get_ref().trim() == "0" => Duration::ZERO,
            Some(_) => duration(&self.probation, Duration::ZERO)?,
        };
        Ok(Health {
            probe,
            max_rss,
            interval: duration(&self.interval, Duration::from_secs(1))?,
            timeout: duration(&self.timeout, Duration::from_secs(1))?,
            failures,
            probation,
        })
    }
}

/// `url = "http://HOST[:PORT][/PATH]"`: HOST an IP address (IPv6 in
/// brackets) or `localhost`. Parsed here rather than with a URL crate: no
/// host name is resolved, so there is nothing for one to do but split.
fn http_probe(raw: &Spanned<String>) -> Result<Probe, Invalid> {
    let text = raw.get_ref().as_str();
    let bad = |why: &str| Invalid {
        span: raw.span(),
        message: format!(
            "bad health url `{text}`: {why}; write e.g. \"http://127.0.0.1:8080/healthz\""
        ),
    };
    let rest = text
        .strip_prefix("http://")
        .ok_or_else(|| bad("only http:// is supported"))?;
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let path = if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_owned()
    };
    if path.contains(char::is_whitespace) || path.contains('#') {
        return Err(bad("the path must not hold spaces or a #fragment"));
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !port.contains(']') => {
            let port = port
                .parse::<u16>()
                .map_err(|_| bad("the port is not a number"))?;
            (host, port)
        }
        _ => (authority, 80),
    };
    let ip = match host {
        "localhost" => std::net::Ipv4Addr::LOCALHOST.into(),
        _ => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .map_err(|_| bad("the host must be an IP address or localhost"))?,
    };
    Ok(Probe::Http {
        address: SocketAddr::new(ip, port),
        host: authority.to_owned(),
        path,
    })
}

impl RawDrain {
    fn validate(self) -> Result<Drain, Invalid> {
        let signal = match &self.signal {
            None => Signal::SIGTERM,
            Some(raw) => parse_signal(raw.get_ref()).ok_or_else(|| Invalid {
                span: raw.span(),
                message: format!(
                    "unknown signal `{}`: use a name like \"SIGTERM\", \"SIGINT\" or \"SIGQUIT\"",
                    raw.get_ref()
                ),
            })?,
        };
        if matches!(signal, Signal::SIGKILL | Signal::SIGSTOP) {
            let span = self.signal.as_ref().map_or(0..0, |s| s.span());
            return invalid(
                span,
                "the drain signal must be one the app can handle, not SIGKILL or SIGSTOP",
            );
        }
        Ok(Drain {
            signal,
            timeout: duration(&self.timeout, Duration::from_secs(30))?,
        })
    }
}

/// "SIGTERM", "TERM" and "sigterm" all name SIGTERM.
pub(crate) fn parse_signal(name: &str) -> Option<Signal> {
    let upper = name.to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    Signal::from_str(&full).ok()
}

impl RawRestart {
    fn validate(self) -> Result<Restart, Invalid> {
        let backoff_initial = duration(&self.backoff_initial, Duration::from_millis(100))?;
        let backoff_max = duration(&self.backoff_max, Duration::from_secs(10))?;
        if backoff_max < backoff_initial {
            let span = self.backoff_max.as_ref().map_or(0..0, |d| d.span());
            return invalid(span, "backoff_max must not be shorter than backoff_initial");
        }
        Ok(Restart {
            backoff_initial,
            backoff_max,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/baton/t.toml"), text)
    }

    fn error(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    const MINIMAL: &str = "[app]\ncommand = [\"/bin/server\"]\n";

    /// Each file of `cases` (after `prefix`) is refused at `position`
    /// ("line:column") with a message containing `message`.
    fn refused(prefix: &str, cases: &[(&str, &str, &str)]) {
        for (text, position, message) in cases {
            let e = error(&format!("{prefix}{text}\n"));
            assert!(
                e.contains(&format!("t.toml:{position}: ")),
                "{position} in {e}"
            );
            assert!(e.contains(message), "{message} in {e}");
        }
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert!(c.listeners.is_empty());
        assert_eq!(c.app.command, ["/bin/server"]);
        assert_eq!(c.readiness.check, ReadinessCheck::Notify);
        assert_eq!(c.readiness.timeout, Duration::from_secs(30));
        assert_eq!(c.drain.signal, Signal::SIGTERM);
        assert_eq!(c.restart.backoff_initial, Duration::from_millis(100));
    }

    #[test]
    fn full_config() {
        let c = parse(
            r#"
[[listen]]
name = "http"
address = "127.0.0.1:8080"
backlog = 64
[[listen]]
name = "admin.sock"
address = "unix:/run/app/admin.sock"
mode = "0660"
[[listen]]
name = "dns"
address = "udp:[::1]:53"
[app]
command = ["server", "--flag"]
workdir = "/srv/app"
env = { RUST_LOG = "info" }
[readiness]
check = "delay"
delay = "500ms"
timeout = "5s"
[drain]
signal = "QUIT"
timeout = "2m"
[restart]
backoff_initial = "1s"
backoff_max = "1m"
[control]
socket = "/tmp/x.sock"
group = "root"
"#,
        )
        .unwrap();
        assert_eq!(c.listeners.len(), 3);
        assert_eq!(c.listeners[0].backlog, 64);
        assert_eq!(c.listeners[1].mode, Some(0o660));
        assert_eq!(
            c.listeners[1].address,
            Address::Unix("/run/app/admin.sock".into())
        );
        assert_eq!(
            c.listeners[2].address,
            Address::Udp("[::1]:53".parse().unwrap())
        );
        assert_eq!(
            c.readiness.check,
            ReadinessCheck::Delay(Duration::from_millis(500))
        );
        assert_eq!(c.drain.signal, Signal::SIGQUIT);
        assert_eq!(c.drain.timeout, Duration::from_secs(120));
        assert_eq!(c.app.env["RUST_LOG"], "info");
        assert_eq!(c.control_socket, Path::new("/tmp/x.sock"));
        assert_eq!(
            c.control_group,
            Some(Group {
                name: "root".into(),
                gid: 0
            })
        );
    }

    #[test]
    fn errors_name_file_line_and_column() {
        let e = error("[app]\ncommand = [\"/bin/x\"]\n[drain]\nsignal = \"SIGNOPE\"\n");
        assert!(
            e.starts_with("/etc/baton/t.toml:4:10: unknown signal `SIGNOPE`"),
            "{e}"
        );
    }

    /// Issue 8: `check` passed a 2^63 s timeout, and the daemon aborted on
    /// "overflow when adding duration to instant" at its first drain.
    #[test]
    fn durations_are_bounded() {
        for (table, key) in [
            ("drain", "timeout"),
            ("readiness", "timeout"),
            ("restart", "backoff_max"),
            ("restart", "backoff_initial"),
        ] {
            let text = format!("{MINIMAL}[{table}]\n{key} = \"10000000000000000000s\"\n");
            let e = error(&text);
            let column = key.len() + 4;
            assert!(
                e.starts_with(&format!("/etc/baton/t.toml:4:{column}: duration")),
                "{e}"
            );
            assert!(e.contains("at most 30 days"), "{e}");
        }
        let c = parse(&format!("{MINIMAL}[drain]\ntimeout = \"30d\"\n")).unwrap();
        assert_eq!(c.drain.timeout, MAX_DURATION);
    }

    #[test]
    fn unknown_key_is_an_error_with_position() {
        let e = error("[app]\ncommand = [\"/bin/x\"]\ncomand = 1\n");
        assert!(e.starts_with("/etc/baton/t.toml:3:1:"), "{e}");
        assert!(e.contains("comand"), "{e}");
    }

    #[test]
    fn syntax_error_has_position() {
        let e = error("[app\ncommand = []\n");
        assert!(e.starts_with("/etc/baton/t.toml:1:"), "{e}");
    }

    /// Issue 8, defect 7: each of these passed `check` and then failed at
    /// run, some as endless restart loops.
    #[test]
    fn check_rejects_what_run_would_fail_on() {
        let long = format!("/tmp/{}", "s".repeat(110));
        let big = "v".repeat(MAX_ARG_STRLEN);
        let many: Vec<String> = (0..arg_max() / 100_000 + 1)
            .map(|i| format!("K{i} = \"{}\"", "v".repeat(100_000)))
            .collect();
        let cases = [
            (
                "[app]\ncommand = [\"/bin/x\", \"a\\u0000b\"]\n".to_owned(),
                "2:11",
                "command contains a NUL byte",
            ),
            (
                "[app]\ncommand = [\"x\"]\nenv = { A = \"\\u0000\" }\n".to_owned(),
                "3:7",
                "env contains a NUL byte",
            ),
            (
                "[app]\ncommand = [\"x\"]\nworkdir = \"/srv\\u0000\"\n".to_owned(),
                "3:11",
                "workdir path contains a NUL byte",
            ),
            (
                format!("[[listen]]\nname = \"a\"\naddress = \"unix:{long}\"\n{MINIMAL}"),
                "3:11",
                "is 115 bytes long; a unix socket path holds at most 107",
            ),
            (
                format!("{MINIMAL}[control]\nsocket = \"{long}\"\n"),
                "4:10",
                "control socket path",
            ),
            (
                format!("{MINIMAL}[control]\nsocket = \"/run/x.notify\"\n"),
                "4:10",
                "must not end in `.notify`",
            ),
            (
                format!(
                    "[[listen]]\nname = \"a\"\naddress = \"unix:/run/b.notify\"\n{MINIMAL}\
                     [control]\nsocket = \"/run/b.sock\"\n"
                ),
                "3:11",
                "where baton's own control or notify socket is",
            ),
            (
                format!("[app]\ncommand = [\"x\", \"{big}\"]\n"),
                "2:11",
                "the kernel takes at most 131072 per string",
            ),
            (
                format!("[app]\ncommand = [\"x\"]\n[app.env]\n{}\n", many.join("\n")),
                "2:11",
                "half of ARG_MAX",
            ),
        ];
        for (text, position, message) in cases {
            let e = error(&text);
            assert!(
                e.contains(&format!("t.toml:{position}: ")),
                "{position} in {}",
                &e[..e.len().min(300)]
            );
            assert!(
                e.contains(message),
                "{message} in {}",
                &e[..e.len().min(300)]
            );
        }
    }

    #[test]
    fn app_user_umask_and_limits() {
        let c = parse(&format!(
            "{MINIMAL}user = \"root\"\numask = \"0027\"\n\
             limits = {{ nofile = 65536, core = 0, memlock = \"unlimited\" }}\n"
        ))
        .unwrap();
        let user = c.app.user.unwrap();
        assert_eq!((user.name.as_str(), user.uid, user.gid), ("root", 0, 0));
        assert!(user.groups.contains(&0));
        assert_eq!(user.home, Path::new("/root"));
        assert_eq!(c.app.umask, Some(0o027));
        assert_eq!(
            c.app.limits,
            [
                Limit {
                    resource: LimitResource::Core,
                    value: Some(0)
                },
                Limit {
                    resource: LimitResource::Memlock,
                    value: None
                },
                Limit {
                    resource: LimitResource::Nofile,
                    value: Some(65536)
                },
            ]
        );
        let cases = [
            (
                "user = \"no-such-user-baton\"",
                "3:8",
                "user `no-such-user-baton` does not exist",
            ),
            ("group = \"root\"", "3:9", "group applies only with user"),
            (
                "user = \"root\"\ngroup = \"no-such-group-baton\"",
                "4:9",
                "does not exist",
            ),
            ("umask = \"999\"", "3:9", "umask `999` is not an octal mask"),
            (
                "limits = { files = 1 }",
                "3:10",
                "unknown limit `files`: use one of nofile",
            ),
            (
                "limits = { core = -1 }",
                "3:10",
                "must be a number ≥ 0 or \"unlimited\"",
            ),
        ];
        refused(MINIMAL, &cases);
    }

    #[test]
    fn readiness_checks_and_health() {
        let c = parse(&format!(
            "[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:8080\"\n{MINIMAL}\
             [readiness]\ncheck = \"accepting\"\n\
             [health]\ncheck = \"http\"\nurl = \"http://localhost:8080/healthz?deep=1\"\n\
             failures = 5\nprobation = \"10s\"\nmax_rss = \"512MiB\"\n"
        ))
        .unwrap();
        assert_eq!(c.readiness.check, ReadinessCheck::Accepting);
        assert_eq!(
            c.health.probe,
            Some(Probe::Http {
                address: "127.0.0.1:8080".parse().unwrap(),
                host: "localhost:8080".into(),
                path: "/healthz?deep=1".into()
            })
        );
        assert_eq!(
            (c.health.failures, c.health.probation, c.health.max_rss),
            (5, Duration::from_secs(10), Some(512 << 20))
        );
        let c = parse(&format!(
            "{MINIMAL}[readiness]\ncheck = \"exec\"\ncommand = [\"true\"]\n\
             [health]\ncheck = \"tcp\"\naddress = \"[::1]:80\"\n"
        ))
        .unwrap();
        assert_eq!(
            c.readiness.check,
            ReadinessCheck::Exec {
                command: vec!["true".into()],
                interval: Duration::from_millis(200)
            }
        );
        assert_eq!(
            c.health.probe,
            Some(Probe::Tcp("[::1]:80".parse().unwrap()))
        );
        assert_eq!(c.health.probation, Duration::ZERO);
        let cases = [
            (
                "[readiness]\ncheck = \"accepting\"",
                "4:9",
                "needs a stream listener",
            ),
            (
                "[readiness]\ncheck = \"exec\"",
                "4:9",
                "[readiness] command is missing",
            ),
            (
                "[readiness]\ncommand = [\"x\"]",
                "4:11",
                "command applies only to check = \"exec\"",
            ),
            (
                "[health]\ncheck = \"http\"",
                "4:9",
                "check = \"http\" needs url",
            ),
            (
                "[health]\ncheck = \"http\"\nurl = \"https://x/\"",
                "5:7",
                "only http://",
            ),
            (
                "[health]\ncheck = \"http\"\nurl = \"http://db.internal/\"",
                "5:7",
                "an IP address or localhost",
            ),
            (
                "[health]\nurl = \"http://127.0.0.1/\"",
                "4:7",
                "url applies only to check = \"http\"",
            ),
            (
                "[health]\nfailures = 0",
                "4:12",
                "failures must be a number from 1",
            ),
            (
                "[health]\nmax_rss = \"max\"",
                "4:11",
                "max_rss must be a size",
            ),
            (
                "[health]\ncheck = \"ping\"",
                "4:9",
                "unknown health check `ping`",
            ),
        ];
        refused(MINIMAL, &cases);
    }

    #[test]
    fn releases_placeholders_state_and_hooks() {
        let c = parse(
            "[app]\ncommand = [\"/opt/app/releases/{version}/bin/server\", \"--json={\\\"a\\\":1}\"]\n\
             workdir = \"/opt/app/releases/{version}\"\nversion = \"1.4.2\"\n\
             [state]\ndir = \"/var/lib/baton/app\"\n\
             [deploy]\nbefore = [\"/opt/app/releases/{version}/bin/migrate\"]\nbefore_timeout = \"1m\"\n",
        )
        .unwrap();
        assert_eq!(c.version_needed, Some((2, 11)));
        assert_eq!(c.app.version.as_deref(), Some("1.4.2"));
        assert_eq!(c.state_dir, Path::new("/var/lib/baton/app"));
        assert_eq!(c.hooks.before_timeout, Duration::from_secs(60));
        let r = c.render(Some("2.0"));
        assert_eq!(
            r.app.command,
            ["/opt/app/releases/2.0/bin/server", "--json={\"a\":1}"]
        );
        assert_eq!(
            r.app.workdir.as_deref(),
            Some(Path::new("/opt/app/releases/2.0"))
        );
        assert_eq!(
            r.hooks.before.unwrap(),
            ["/opt/app/releases/2.0/bin/migrate"]
        );
        assert_eq!(r.app.env["BATON_VERSION"], "2.0");
        assert!(parse(MINIMAL).unwrap().version_needed.is_none());
        let cases = [
            (
                "[app]\ncommand = [\"/opt/{verison}/server\"]\n",
                "2:11",
                "unknown placeholder `{verison}` in `/opt/{verison}/server`: did you mean {version}?",
            ),
            (
                "[app]\ncommand = [\"/x\"]\nversion = \"../etc\"\n",
                "3:11",
                "release `../etc` is not a valid version",
            ),
            (
                "[app]\ncommand = [\"/x\"]\n[state]\ndir = \"state\"\n",
                "4:7",
                "[state] dir path `state` must be absolute",
            ),
            (
                "[app]\ncommand = [\"/x\"]\n[deploy]\nbefore = []\n",
                "4:10",
                "[deploy] before must name a program",
            ),
        ];
        refused("", &cases);
        // {version} with no release anywhere: refused where it is used.
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[app]\ncommand = [\"/opt/{{version}}/server\"]\n[state]\ndir = \"{}\"\n",
            dir.path().display()
        );
        let e = parse(&text)
            .unwrap()
            .check_release()
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/etc/baton/t.toml:2:11: {version} needs a release"),
            "{e}"
        );
    }

    #[test]
    fn only_version_and_its_near_misses_are_placeholders() {
        assert_eq!(holds_version("/opt/{version}/bin"), Ok(true));
        for text in [
            "${HOME}/bin",
            "$SIG{TERM} = 1",
            "{\"a\":{\"b\":1}}",
            "{x}",
            "${versio}",
        ] {
            assert_eq!(holds_version(text), Ok(false), "{text}");
        }
        for typo in [
            "{verison}",
            "{Version}",
            "{VERSION}",
            "{versions}",
            "{vresion}",
        ] {
            assert!(holds_version(typo).is_err(), "{typo}");
        }
    }

    #[test]
    fn app_cgroup_and_its_limits() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(
            (c.app.cgroup, c.app.cgroup_limits),
            (CgroupPlace::Auto, vec![])
        );
        let c = parse(&format!(
            "{MINIMAL}cgroup = \"/sys/fs/cgroup/baton/app\"\nmemory_max = \"512M\"\n\
             cpu_max = \"150%\"\npids_max = 64\n"
        ))
        .unwrap();
        assert_eq!(
            c.app.cgroup,
            CgroupPlace::At("/sys/fs/cgroup/baton/app".into())
        );
        let files: Vec<(&str, &str)> = c
            .app
            .cgroup_limits
            .iter()
            .map(|l| (l.file, l.value.as_str()))
            .collect();
        assert_eq!(
            files,
            [
                ("memory.max", "536870912"),
                ("cpu.max", "150000 100000"),
                ("pids.max", "64")
            ]
        );
        let c = parse(&format!(
            "{MINIMAL}memory_max = 1048576\ncpu_max = \"max\"\npids_max = \"max\"\ncgroup = \"off\"\n"
        ));
        let e = c.unwrap_err().to_string();
        assert!(
            e.contains("t.toml:6:10: memory_max needs a cgroup, and cgroup = \"off\""),
            "{e}"
        );
        let cases = [
            (
                "cgroup = \"sys/fs/cgroup\"",
                "3:10",
                "neither \"auto\", \"off\" nor an absolute path",
            ),
            (
                "memory_max = \"lots\"",
                "3:14",
                "memory_max `lots` is not a size",
            ),
            (
                "memory_max = 0",
                "3:14",
                "memory_max must be greater than zero",
            ),
            (
                "cpu_max = \"1.5\"",
                "3:11",
                "cpu_max `1.5` is not a CPU share",
            ),
            ("cpu_max = \"0.5%\"", "3:11", "at least 1%"),
            (
                "pids_max = -1",
                "3:12",
                "pids_max must be a number of processes",
            ),
        ];
        refused(MINIMAL, &cases);
    }

    #[test]
    fn invalid_utf8_is_reported_with_its_position() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, b"[app]\ncommand = [\"/bin/\xff\"]\n").unwrap();
        let e = Config::load(&path).unwrap_err().to_string();
        assert!(e.contains("bad.toml:2:18: invalid UTF-8 at byte 23"), "{e}");
    }

    #[test]
    fn rejects_what_an_operator_would_get_wrong() {
        let cases = [
            ("[app]\ncommand = []\n", "2:11", "command must name a program"),
            (
                "[[listen]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\n[[listen]]\nname = \"a\"\naddress = \"127.0.0.1:2\"\n[app]\ncommand = [\"x\"]\n",
                "5:8",
                "duplicate listener name `a`",
            ),
            (
                "[[listen]]\nname = \"a\"\naddress = \"localhost\"\n[app]\ncommand = [\"x\"]\n",
                "3:11",
                "bad address `localhost`",
            ),
            (
                "[[listen]]\nname = \"a\"\naddress = \"unix:app.sock\"\n[app]\ncommand = [\"x\"]\n",
                "3:11",
                "must be absolute",
            ),
            (
                "[[listen]]\nname = \"a b\"\naddress = \"127.0.0.1:1\"\n[app]\ncommand = [\"x\"]\n",
                "2:8",
                "listener name `a b`",
            ),
            ("[app]\ncommand = [\"x\"]\n[readiness]\ntimeout = \"soon\"\n", "4:11", "bad duration `soon`"),
            ("[app]\ncommand = [\"x\"]\n[readiness]\ncheck = \"http\"\n", "4:9", "unknown readiness check"),
            ("[app]\ncommand = [\"x\"]\n[drain]\nsignal = \"KILL\"\n", "4:10", "not SIGKILL"),
            ("[app]\ncommand = [\"x\"]\nworkdir = \"rel\"\n", "3:11", "workdir path `rel` must be absolute"),
            (
                "[app]\ncommand = [\"x\"]\n[control]\ngroup = \"no-such-group-baton\"\n",
                "4:9",
                "group `no-such-group-baton` does not exist",
            ),
        ];
        refused("", &cases);
    }

    #[test]
    fn signal_names() {
        assert_eq!(parse_signal("term"), Some(Signal::SIGTERM));
        assert_eq!(parse_signal("SIGHUP"), Some(Signal::SIGHUP));
        assert_eq!(parse_signal("NOPE"), None);
    }
}
