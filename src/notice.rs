//! What baton tells the world, as types: the [`Notice`]s the core (and the
//! shell, for its sockets) emits, and the outcome vocabulary they carry.
//!
//! The shell turns each notice into one log line (human, journald or JSON;
//! the JSON record carries the notice itself in its `notice` field) and
//! streams it to `baton events` clients. Tests and the benchmark wait on
//! these types, never on a log line's wording, so the wording can change
//! freely; the serialized form is part of the control protocol (fields may
//! be added, never renamed).

use std::fmt;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

/// How a child process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitStatus {
    Code(i32),
    Signal(#[serde(with = "signal_name")] Signal),
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exited with code {c}"),
            ExitStatus::Signal(s) => write!(f, "killed by signal {}", s.as_str()),
        }
    }
}

/// How a deploy ended. A failed deploy is an outcome, not an error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Succeeded {
        generation: u64,
        #[serde(rename = "ready_after_ms", with = "millis")]
        ready_after: Duration,
    },
    Failed {
        generation: u64,
        reason: Failure,
    },
    /// baton is stopping; the deploy did not run or was abandoned.
    Cancelled,
}

impl Outcome {
    pub fn succeeded(&self) -> bool {
        matches!(self, Outcome::Succeeded { .. })
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Succeeded {
                generation,
                ready_after,
            } => write!(
                f,
                "generation {generation} is serving (ready after {})",
                secs(*ready_after)
            ),
            Outcome::Failed { generation, reason } => {
                write!(f, "generation {generation} failed: {reason}")
            }
            Outcome::Cancelled => f.write_str("cancelled: baton is stopping"),
        }
    }
}

/// Why a candidate failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Failure {
    Exited(ExitStatus),
    SpawnFailed(String),
    /// Not ready within the readiness timeout (in milliseconds on the wire).
    NotReady(#[serde(with = "millis")] Duration),
    /// Ready, then its main process ended during probation.
    ExitedInProbation(ExitStatus),
    /// Ready, then failed this many health checks in a row during
    /// probation; `detail` is the last failure.
    Unhealthy {
        failures: u32,
        detail: String,
    },
    /// A `[deploy]` hook (`before`) failed; nothing was started. `detail`
    /// ends with the last lines it wrote.
    HookFailed {
        hook: String,
        detail: String,
    },
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Exited(status) => write!(f, "{status} before it was ready"),
            Failure::SpawnFailed(e) => f.write_str(e),
            Failure::NotReady(t) => write!(f, "not ready within {}", secs(*t)),
            Failure::ExitedInProbation(status) => write!(f, "{status} during probation"),
            Failure::Unhealthy { failures, detail } => write!(
                f,
                "health check failed {failures} times during probation: {detail}"
            ),
            Failure::HookFailed { hook, detail } => {
                write!(f, "[deploy] {hook} failed, nothing was started: {detail}")
            }
        }
    }
}

/// How severe a notice is: its log level and journald priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error,
    Warn,
    Info,
    Debug,
}

/// One thing that happened, for the log, `baton events`, tests and the
/// benchmark. Generations are numbered from 1; pids are the process ids
/// baton started (each leads its own process group).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "notice", rename_all = "snake_case")]
pub enum Notice {
    /// A listener is open: bound by baton, or adopted from systemd's
    /// `LISTEN_FDS` (`adopted_fd`).
    Listening {
        name: String,
        address: String,
        adopted_fd: Option<i32>,
    },
    /// A listener a reload removed is closed: no generation holds it any
    /// more.
    ListenerClosed {
        name: String,
        address: String,
    },
    /// A listener had stopped listening because a child called
    /// `shutdown()` on its copy (it must `close()` it): baton listened
    /// again (or could not: `error`). `generations` were running then;
    /// one of them did it.
    ListenerRestored {
        name: String,
        address: String,
        generations: Vec<u64>,
        error: Option<String>,
    },
    /// accept() on the control socket failed (out of fds, say): baton
    /// stops accepting for `pause`.
    ControlAcceptPaused {
        error: String,
        #[serde(rename = "pause_ms", with = "millis")]
        pause: Duration,
    },
    /// A control connection from someone not allowed to use it.
    ControlRefused {
        uid: u32,
        pid: Option<i32>,
    },
    /// A reload was refused before anything changed (invalid file, changed
    /// listeners).
    ReloadRefused {
        reason: String,
    },
    /// `[control]` changed in the file; it takes effect at restart.
    ControlChangeDeferred,
    /// `[app] cgroup` changed in the file; it takes effect at restart.
    CgroupChangeDeferred,
    /// How generations are contained, decided at start: each in a cgroup
    /// of its own under `cgroup`, or by process group (`reason`: why no
    /// cgroup).
    Containment {
        cgroup: Option<String>,
        reason: Option<String>,
    },
    /// A reload arrived during a deploy: it follows as one more deploy.
    ReloadQueued,
    /// A generation is being started (its pid follows in `Started`), with
    /// its release when the config names one.
    Starting {
        generation: u64,
        cause: Cause,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<String>,
    },
    Started {
        generation: u64,
        pid: i32,
    },
    /// The candidate is ready and becomes the current generation.
    Ready {
        generation: u64,
        #[serde(rename = "after_ms", with = "millis")]
        after: Duration,
    },
    /// The candidate is ready and on probation: the old generation
    /// (`beside`) serves with it for `probation`, and is drained only if
    /// the candidate passes.
    Probation {
        generation: u64,
        beside: u64,
        #[serde(rename = "probation_ms", with = "millis")]
        probation: Duration,
    },
    /// A health check of `generation` failed (`failures` in a row, of the
    /// `of` that make baton act).
    HealthFailed {
        generation: u64,
        failures: u32,
        of: u32,
        detail: String,
    },
    /// The current generation failed `failures` health checks in a row:
    /// baton replaces it with a fresh one of the same release.
    Replacing {
        generation: u64,
        failures: u32,
        detail: String,
    },
    /// The current generation fails its health checks and never passed
    /// one: baton does not replace it (that would loop); fix the check.
    HealthNeverPassed {
        generation: u64,
        detail: String,
    },
    /// `[deploy] after` passed for `generation`.
    AfterHookPassed {
        generation: u64,
    },
    /// The candidate failed; `serving` is the generation still serving.
    CandidateFailed {
        generation: u64,
        reason: Failure,
        serving: Option<u64>,
    },
    /// A generation was sent its drain signal.
    Draining {
        generation: u64,
        pid: i32,
        signal: String,
    },
    /// A draining (or failed) generation's process has exited.
    Exited {
        generation: u64,
        pid: i32,
        status: ExitStatus,
    },
    /// The current generation's process exited while serving.
    Crashed {
        generation: u64,
        pid: i32,
        status: ExitStatus,
    },
    /// Nothing serves; a restart follows after the backoff.
    RestartScheduled {
        #[serde(rename = "in_ms", with = "millis")]
        after: Duration,
        failures: u32,
    },
    /// A draining generation outlived its drain timeout: its process group
    /// gets SIGKILL.
    DrainTimedOut {
        generation: u64,
        pid: Option<i32>,
        #[serde(rename = "timeout_ms", with = "millis")]
        timeout: Duration,
    },
    /// A killed generation's process was not reaped within `waited`: baton
    /// stops waiting for it (it may be stuck in the kernel).
    GivenUp {
        generation: u64,
        pid: Option<i32>,
        #[serde(rename = "waited_ms", with = "millis")]
        waited: Duration,
        /// With a cgroup: the processes still in it (the shell fills this
        /// in; the core does not know them).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        lingering: Vec<i32>,
    },
    /// Every process of a contained `generation` has exited: its cgroup
    /// is empty.
    Gone {
        generation: u64,
    },
    /// A process that left `generation`'s process group (setsid) and
    /// outlived it was killed.
    EscapeeKilled {
        generation: u64,
        pid: i32,
    },
    /// The notify socket's file was gone (a cleaner): it was made again
    /// (or could not be: `error`).
    NotifySocketRestored {
        path: String,
        error: Option<String>,
    },
    /// More than the allowed number of generations drain: the oldest gets
    /// SIGKILL now.
    TooManyDraining {
        generation: u64,
        limit: usize,
    },
    /// A deploy ended (either way).
    DeployFinished {
        outcome: Outcome,
        #[serde(rename = "took_ms", with = "millis")]
        took: Duration,
    },
    /// One line per deploy, once its old generation has gone (or at once
    /// when it failed or there was nothing to drain).
    DeploySummary(Summary),
    /// A notify datagram from a pid baton does not supervise.
    ForeignNotify {
        pid: i32,
        ready: bool,
    },
    /// The application's `STATUS=` text.
    AppStatus {
        generation: u64,
        status: String,
    },
    /// The application said `STOPPING=1`.
    AppStopping {
        generation: u64,
    },
    /// The application sent `MAINPID=`, which baton ignores.
    MainPidIgnored {
        generation: u64,
        pid: i32,
    },
    /// `[deploy] after` failed for `generation` (which serves: a failed
    /// after hook is no rollback).
    AfterHookFailed {
        generation: u64,
        detail: String,
    },
    /// The deploy history in `[state] dir` could not be used (unreadable,
    /// corrupt): baton started without it.
    HistoryUnusable {
        problem: String,
    },
    /// The deploy history could not be written.
    HistoryNotSaved {
        path: String,
        error: String,
    },
    /// A stop began: drain (`fast: false`) or kill every generation.
    Stopping {
        fast: bool,
    },
    /// Every generation has exited; baton exits.
    AllExited,
}

/// Why a generation is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// The first generation at start-up.
    Initial,
    /// Replacing a crashed current generation (or a failed initial one).
    Restart,
    /// A deploy asked for by a reload.
    Deploy,
    /// Replacing a current generation that failed its health checks (or
    /// outgrew `[health] max_rss`), with the same release.
    Replace,
}

/// The one-line account of a deploy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub generation: u64,
    pub ok: bool,
    /// Success: how long the new generation took to be ready.
    #[serde(rename = "ready_ms", with = "millis_opt")]
    pub ready: Option<Duration>,
    /// Success: the generation it replaced, how long that took to drain and
    /// how it ended.
    pub drained: Option<Drained>,
    /// Failure: why, and after how long.
    pub reason: Option<Failure>,
    #[serde(rename = "took_ms", with = "millis")]
    pub took: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Drained {
    pub generation: u64,
    #[serde(rename = "after_ms", with = "millis")]
    pub after: Duration,
    pub status: ExitStatus,
}

impl Notice {
    pub fn level(&self) -> Level {
        use Notice::*;
        match self {
            ReloadRefused { .. } | CandidateFailed { .. } | Crashed { .. } => Level::Error,
            ListenerRestored { error: Some(_), .. } => Level::Error,
            ListenerRestored { .. } => Level::Warn,
            ControlRefused { .. }
            | ControlAcceptPaused { .. }
            | ControlChangeDeferred
            | CgroupChangeDeferred
            | RestartScheduled { .. }
            | DrainTimedOut { .. }
            | TooManyDraining { .. }
            | MainPidIgnored { .. }
            | HealthFailed { .. }
            | Replacing { .. }
            | HealthNeverPassed { .. }
            | HistoryUnusable { .. }
            | AfterHookFailed { .. }
            | HistoryNotSaved { .. } => Level::Warn,
            GivenUp { .. } | NotifySocketRestored { error: Some(_), .. } => Level::Error,
            EscapeeKilled { .. } | NotifySocketRestored { .. } => Level::Warn,
            ForeignNotify { ready, .. } if *ready => Level::Warn,
            ForeignNotify { .. } | AppStatus { .. } => Level::Debug,
            _ => Level::Info,
        }
    }

    /// Whether others can cause this notice at will (a flood of forged
    /// notify datagrams, of refused connections, an app's STATUS= stream):
    /// such notices are rate-limited in the log. Deploy notices never are.
    pub fn floods(&self) -> bool {
        matches!(
            self,
            Notice::ForeignNotify { .. }
                | Notice::ControlRefused { .. }
                | Notice::AppStatus { .. }
                | Notice::MainPidIgnored { .. }
        )
    }

    /// The generation this notice is about, if any.
    pub fn generation(&self) -> Option<u64> {
        use Notice::*;
        match self {
            Starting { generation, .. }
            | Started { generation, .. }
            | Ready { generation, .. }
            | Probation { generation, .. }
            | HealthFailed { generation, .. }
            | Replacing { generation, .. }
            | HealthNeverPassed { generation, .. }
            | AfterHookPassed { generation }
            | AfterHookFailed { generation, .. }
            | CandidateFailed { generation, .. }
            | Draining { generation, .. }
            | Exited { generation, .. }
            | Crashed { generation, .. }
            | DrainTimedOut { generation, .. }
            | TooManyDraining { generation, .. }
            | GivenUp { generation, .. }
            | Gone { generation }
            | EscapeeKilled { generation, .. }
            | AppStatus { generation, .. }
            | AppStopping { generation }
            | MainPidIgnored { generation, .. } => Some(*generation),
            DeploySummary(s) => Some(s.generation),
            DeployFinished { outcome, .. } => match outcome {
                Outcome::Succeeded { generation, .. } | Outcome::Failed { generation, .. } => {
                    Some(*generation)
                }
                Outcome::Cancelled => None,
            },
            _ => None,
        }
    }

    /// The notice as one JSON object (`{"notice":"ready",...}`).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("notices serialize")
    }
}

/// The log line's text.
impl fmt::Display for Notice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Notice::*;
        match self {
            Listening {
                name,
                address,
                adopted_fd: None,
            } => write!(f, "listening on {address} ({name})"),
            Listening {
                name,
                address,
                adopted_fd: Some(fd),
            } => write!(
                f,
                "adopted socket `{name}` from systemd (fd {fd}, {address})"
            ),
            ListenerRestored {
                name,
                address,
                generations,
                error,
            } => {
                let who: Vec<String> = generations.iter().map(u64::to_string).collect();
                write!(
                    f,
                    "listener `{name}` ({address}) had stopped listening: a process of \
                     generation {} called shutdown() on it (it must close() its copy instead); ",
                    if who.is_empty() {
                        "?".to_owned()
                    } else {
                        who.join(" or ")
                    }
                )?;
                match error {
                    None => f.write_str("listening again"),
                    Some(e) => write!(f, "cannot listen again: {e}"),
                }
            }
            ListenerClosed { name, address } => write!(
                f,
                "closed listener `{name}` ({address}): the config no longer has it and no \
                 generation holds it"
            ),
            ControlAcceptPaused { error, pause } => write!(
                f,
                "control socket: {error}; not accepting for {}",
                secs(*pause)
            ),
            ControlRefused { uid, pid } => write!(
                f,
                "control connection from uid {uid} (pid {}) refused: not root, baton's user \
                 or [control] group",
                pid.unwrap_or(0)
            ),
            ReloadRefused { reason } => write!(f, "reload refused, nothing changed: {reason}"),
            ControlChangeDeferred => {
                f.write_str("[control] changes take effect when baton restarts")
            }
            CgroupChangeDeferred => {
                f.write_str("[app] cgroup changes take effect when baton restarts")
            }
            Containment {
                cgroup: Some(base), ..
            } => write!(
                f,
                "each generation runs in a cgroup of its own under {base}"
            ),
            Containment { reason, .. } => write!(
                f,
                "generations are contained by process group, not cgroup ({})",
                reason.as_deref().unwrap_or("no cgroup")
            ),
            ReloadQueued => f.write_str("reload requested during a deploy: queued to follow it"),
            Starting {
                generation,
                version: Some(version),
                ..
            } => write!(f, "starting generation {generation} (release {version})"),
            Starting { generation, .. } => write!(f, "starting generation {generation}"),
            Started { generation, pid } => {
                write!(f, "generation {generation} started as pid {pid}")
            }
            Ready { generation, after } => {
                write!(f, "generation {generation} is ready after {}", secs(*after))
            }
            Probation {
                generation,
                beside,
                probation,
            } => write!(
                f,
                "generation {generation} on probation for {}: generation {beside} serves beside \
                 it until then",
                secs(*probation)
            ),
            HealthFailed {
                generation,
                failures,
                of,
                detail,
            } => write!(
                f,
                "generation {generation}: health check failed ({failures} of {of} in a row): \
                 {detail}"
            ),
            Replacing {
                generation,
                failures,
                detail,
            } => write!(
                f,
                "generation {generation} failed {failures} health checks in a row ({detail}): \
                 replacing it with a fresh generation of the same release"
            ),
            CandidateFailed {
                generation,
                reason,
                serving,
            } => {
                write!(f, "generation {generation} failed: {reason}; ")?;
                match serving {
                    Some(old) => write!(f, "generation {old} still serving"),
                    None => f.write_str("nothing serving"),
                }
            }
            Draining {
                generation,
                pid,
                signal,
            } => write!(
                f,
                "draining generation {generation} (pid {pid}) with {signal}"
            ),
            Exited {
                generation,
                pid,
                status,
            } => write!(f, "generation {generation} (pid {pid}) {status}"),
            Crashed {
                generation,
                pid,
                status,
            } => write!(
                f,
                "generation {generation} (pid {pid}) {status} while serving"
            ),
            RestartScheduled { after, failures } => {
                write!(f, "restarting in {} (failure {failures})", secs(*after))
            }
            DrainTimedOut {
                generation,
                pid,
                timeout,
            } => write!(
                f,
                "generation {generation} (pid {}) still running after its drain timeout of {}: \
                 killing its process group",
                pid.map_or_else(|| "?".to_owned(), |p| p.to_string()),
                secs(*timeout)
            ),
            GivenUp {
                generation,
                pid: None,
                waited,
                lingering,
            } => {
                let pids: Vec<String> = lingering.iter().map(i32::to_string).collect();
                write!(
                    f,
                    "generation {generation}: processes still in its cgroup {} after SIGKILL \
                     (pids {}): no longer waiting for them (stuck in the kernel?)",
                    secs(*waited),
                    if pids.is_empty() {
                        "?".to_owned()
                    } else {
                        pids.join(" ")
                    }
                )
            }
            Gone { generation } => write!(
                f,
                "generation {generation} is gone: its cgroup holds no process"
            ),
            GivenUp {
                generation,
                pid,
                waited,
                ..
            } => write!(
                f,
                "generation {generation} (pid {}) still not gone {} after SIGKILL: no longer \
                 waiting for it (a process stuck in the kernel?); check it with `ps`",
                pid.map_or_else(|| "?".to_owned(), |p| p.to_string()),
                secs(*waited)
            ),
            EscapeeKilled { generation, pid } => write!(
                f,
                "killed pid {pid}: it left generation {generation}'s process group (setsid?) \
                 and outlived it"
            ),
            NotifySocketRestored { path, error: None } => {
                write!(
                    f,
                    "notify socket {path} was gone (removed by a cleaner?): made it again"
                )
            }
            NotifySocketRestored {
                path,
                error: Some(e),
            } => write!(
                f,
                "notify socket {path} is gone and cannot be made again: {e}"
            ),
            TooManyDraining { generation, limit } => write!(
                f,
                "more than {limit} generations draining: killing generation {generation}"
            ),
            DeployFinished { outcome, .. } => write!(f, "deploy: {outcome}"),
            DeploySummary(s) => s.fmt(f),
            ForeignNotify { pid, ready: true } => {
                write!(
                    f,
                    "ignoring READY=1 from pid {pid}: not a supervised process"
                )
            }
            ForeignNotify { pid, ready: false } => {
                write!(f, "ignoring notify message from unsupervised pid {pid}")
            }
            AppStatus { generation, status } => {
                write!(f, "generation {generation} status: {status}")
            }
            AppStopping { generation } => write!(f, "generation {generation} is stopping"),
            MainPidIgnored { generation, pid } => write!(
                f,
                "ignoring MAINPID= from pid {pid} (generation {generation}): baton tracks the \
                 process it started"
            ),
            Stopping { fast: true } => f.write_str("fast stop: killing every generation"),
            Stopping { fast: false } => f.write_str("graceful stop: draining every generation"),
            AllExited => f.write_str("every generation has exited"),
            HistoryUnusable { problem } => write!(f, "deploy history: {problem}"),
            HealthNeverPassed { generation, detail } => write!(
                f,
                "generation {generation} fails its health check and never passed it ({detail}): \
                 not replacing it, which would loop; check [health] (or deploy a fix)"
            ),
            AfterHookPassed { generation } => {
                write!(f, "[deploy] after passed for generation {generation}")
            }
            AfterHookFailed { generation, detail } => write!(
                f,
                "[deploy] after failed for generation {generation}, which serves on: {detail}"
            ),
            HistoryNotSaved { path, error } => write!(
                f,
                "cannot save the deploy history in {path}: {error} (baton goes on; a restart \
                 would not know the release that serves: check [state] dir)"
            ),
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let id = self.generation;
        match (&self.reason, &self.drained) {
            (Some(reason), _) => write!(
                f,
                "deploy summary: generation {id} failed after {}: {reason}",
                secs(self.took)
            ),
            (None, Some(d)) => write!(
                f,
                "deploy summary: generation {id} ok, ready in {}, generation {} drained in {} ({})",
                secs(self.ready.unwrap_or_default()),
                d.generation,
                secs(d.after),
                d.status
            ),
            (None, None) => write!(
                f,
                "deploy summary: generation {id} ok, ready in {}, nothing to drain",
                secs(self.ready.unwrap_or_default())
            ),
        }
    }
}

/// `text` with control characters escaped (`\0`, `\u{1b}`): an app's
/// `STATUS=` text must not write raw bytes into a terminal or split a log
/// line in two.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return text.into();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

/// "3.2 ms", "0.42 s", "30 s": short, for logs and progress lines.
pub fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 0.1 {
        format!("{:.1} ms", s * 1000.0)
    } else if s < 10.0 {
        format!("{s:.2} s")
    } else {
        format!("{s:.0} s")
    }
}

/// A duration on the wire: fractional milliseconds.
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64() * 1000.0)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let ms = f64::deserialize(d)?;
        Duration::try_from_secs_f64(ms / 1000.0).map_err(serde::de::Error::custom)
    }
}

mod millis_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&(d.as_secs_f64() * 1000.0)),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        Option::<f64>::deserialize(d)?
            .map(|ms| Duration::try_from_secs_f64(ms / 1000.0).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// A signal on the wire: its name ("SIGTERM").
mod signal_name {
    use nix::sys::signal::Signal;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(signal: &Signal, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(signal.as_str())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Signal, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_round_trip_through_json() {
        let notices = [
            Notice::Ready {
                generation: 7,
                after: Duration::from_micros(420_500),
            },
            Notice::Exited {
                generation: 6,
                pid: 3990,
                status: ExitStatus::Signal(Signal::SIGKILL),
            },
            Notice::DeploySummary(Summary {
                generation: 3,
                ok: false,
                ready: None,
                drained: None,
                reason: Some(Failure::Exited(ExitStatus::Code(3))),
                took: Duration::from_millis(12),
            }),
            Notice::AllExited,
        ];
        for notice in notices {
            let json = notice.to_json();
            let back: Notice = serde_json::from_str(&json).unwrap();
            assert_eq!(back, notice, "{json}");
        }
        assert_eq!(
            Notice::Started {
                generation: 2,
                pid: 41
            }
            .to_json(),
            r#"{"notice":"started","generation":2,"pid":41}"#
        );
        assert_eq!(
            Notice::Ready {
                generation: 2,
                after: Duration::from_micros(1500)
            }
            .to_json(),
            r#"{"notice":"ready","generation":2,"after_ms":1.5}"#
        );
        assert_eq!(
            serde_json::to_string(&ExitStatus::Signal(Signal::SIGTERM)).unwrap(),
            r#"{"signal":"SIGTERM"}"#
        );
    }

    /// Issue 8: a NUL byte in an app's STATUS= went raw into the log.
    #[test]
    fn control_characters_never_reach_the_log_raw() {
        assert_eq!(printable("ready"), "ready");
        assert_eq!(printable("a\0b\nc\u{1b}[31m"), "a\\u{0}b\\nc\\u{1b}[31m");
    }

    #[test]
    fn log_text_reads_as_before() {
        let summary = Notice::DeploySummary(Summary {
            generation: 2,
            ok: true,
            ready: Some(Duration::from_millis(420)),
            drained: Some(Drained {
                generation: 1,
                after: Duration::from_millis(3),
                status: ExitStatus::Code(0),
            }),
            reason: None,
            took: Duration::from_millis(425),
        });
        assert_eq!(
            summary.to_string(),
            "deploy summary: generation 2 ok, ready in 0.42 s, generation 1 drained in 3.0 ms \
             (exited with code 0)"
        );
    }
}
