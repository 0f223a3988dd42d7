//! The supervisor core: every deploy decision, as a transition function over
//! plain data. No I/O and no clock: time comes in as an argument and effects
//! go out as [`Action`]s that the IO shell (`daemon.rs`) carries out.
//!
//! Roles, at any instant (the invariants of `lib.rs`):
//! - at most one `current` generation: ready and serving;
//! - at most one `candidate`: started, not yet ready;
//! - any number of `draining` generations, each with a kill deadline, capped
//!   at [`MAX_DRAINING`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::config::{Config, ReadinessCheck, ACCEPTING_INTERVAL};
use crate::notice::{Cause, Drained, Notice, Summary};
pub(crate) use crate::notice::{ExitStatus, Failure, Outcome};
use crate::sd_notify::{Message, Upstream};

/// More draining generations than this and the oldest is killed at once, so
/// fast repeated deploys cannot pile up old processes.
pub(crate) const MAX_DRAINING: usize = 8;

/// Identifies a client waiting on a reload (`baton reload`).
pub(crate) type WaiterId = u64;

/// A client asking for a reload: it hears whether the reload was taken,
/// and, when it `follows` it, every step of the deploy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Waiter {
    pub id: WaiterId,
    /// `reload --wait`: stay until the deploy's outcome.
    pub follows: bool,
}

/// Which release a deploy runs (`{version}` in the config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Release {
    /// `reload`: the release that serves (else the config's `version`).
    Current,
    /// `deploy VERSION`.
    Version(String),
    /// `rollback`: the last release that served before the current one,
    /// or the one named; `[deploy] before` runs only `with_hooks`.
    Rollback {
        to: Option<String>,
        with_hooks: bool,
    },
}

/// `[deploy] before` (runs before a deploy's candidate starts) or `after`
/// (once it has passed, probation included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hook {
    Before,
    After,
}

/// What baton remembers of releases: the one serving, and those that
/// served, oldest first (each once, at its latest place).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Releases {
    pub current: Option<String>,
    pub served: Vec<String>,
}

/// Releases kept in [`Releases::served`].
const SERVED_KEPT: usize = 100;

/// One deploy (or start, or replacement) for the history.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Record {
    pub generation: u64,
    pub version: Option<String>,
    pub cause: Cause,
    pub rollback: bool,
    pub outcome: Outcome,
    /// When it began, and how long it took.
    pub began: Instant,
    pub took: Duration,
}

/// Inputs to the core.
#[derive(Debug)]
pub(crate) enum Event {
    /// Deploy the re-read config file (a SIGHUP, or `baton reload`), or
    /// `Err(why)` when it could not be read or is invalid. The core decides
    /// what follows either way (refusal, deploy, queue).
    Reload {
        config: Result<Arc<Config>, String>,
        waiter: Option<Waiter>,
        release: Release,
    },
    /// The shell started the process of `generation`. Always delivered
    /// before any `Exited` for that pid: the shell spawns synchronously and
    /// feeds this back before it reaps anything. `contained`: it runs in a
    /// cgroup of its own, so it is gone only once `Emptied` says so.
    Spawned {
        generation: u64,
        pid: Pid,
        contained: bool,
    },
    /// The cgroup of `generation` holds no process any more (it may come
    /// before the `Exited` of its main process, which is empty as a zombie).
    Emptied { generation: u64 },
    /// The shell could not start `generation` (fork, chdir or exec failed).
    SpawnFailed { generation: u64, error: String },
    /// A child was reaped. Pids the core does not know are ignored.
    Exited { pid: Pid, status: ExitStatus },
    /// A datagram on the notify socket, already authenticated by pid. It
    /// counts for a generation when `pid` is its main process, or was in
    /// its process group (`group`) or its cgroup (`cgroup`) when the shell
    /// looked, as the datagram arrived: a wrapper's `systemd-notify`.
    Notify {
        pid: Pid,
        group: Option<Pid>,
        cgroup: Option<u64>,
        message: Message,
    },
    /// The answer to an `Action::RunHook`: whether the hook exited 0, and
    /// the last lines it wrote (or why it failed).
    HookDone {
        generation: u64,
        hook: Hook,
        ok: bool,
        output: String,
    },
    /// The answer to an `Action::CheckReady`: whether the candidate is
    /// ready by its `[readiness]` check ("exec", "accepting").
    ReadyCheck { generation: u64, ok: bool },
    /// The answer to an `Action::Probe`: whether the generation passed its
    /// `[health]` checks, and why not.
    Probed {
        generation: u64,
        ok: bool,
        detail: String,
    },
    /// Graceful stop (drain everything) or fast stop (kill everything).
    Stop { fast: bool },
    /// Time passed: check deadlines against `now`.
    Tick,
}

/// Effects for the shell to carry out, in order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    Spawn {
        generation: u64,
        config: Arc<Config>,
    },
    Signal {
        pid: Pid,
        signal: Signal,
    },
    /// SIGKILL to what is left of `generation`: the process group its
    /// process `pid` leads, `pid` itself when it may still run (`leader`;
    /// never once reaped: the number may belong to another process by
    /// then), and processes baton adopted as subreaper that carry its
    /// `BATON_GENERATION` (a grandchild that left the group with setsid()).
    Kill {
        generation: u64,
        pid: Pid,
        leader: bool,
    },
    /// Check once whether the candidate `generation` (main process `pid`)
    /// is ready, by `config`'s `[readiness] check` ("exec" or
    /// "accepting"); the answer is an `Event::ReadyCheck`, always (a check
    /// is bounded in time).
    CheckReady {
        generation: u64,
        pid: Pid,
        config: Arc<Config>,
    },
    /// Run `config`'s `[deploy]` `hook` for `generation` once; the answer
    /// is an `Event::HookDone`, always (bounded by `before_timeout`).
    RunHook {
        generation: u64,
        hook: Hook,
        config: Arc<Config>,
    },
    /// Stop the hook running for `generation`, if one is (baton stops).
    CancelHook {
        generation: u64,
    },
    /// Probe `generation`'s health once, by `config`'s `[health]`; the
    /// answer is an `Event::Probed`, always (bounded by its timeout).
    Probe {
        generation: u64,
        pid: Pid,
        config: Arc<Config>,
    },
    Progress {
        waiter: WaiterId,
        progress: Progress,
    },
    Upstream(Upstream),
    /// Something to tell the operator (the log, `baton events`).
    Notice(Notice),
    /// A deploy ended: into the history, with the release that serves now.
    Record {
        record: Record,
        current: Option<String>,
    },
    /// Everything is stopped: exit the daemon with this code.
    Exit(i32),
}

/// How a candidate is started: why, with which release, and whether a
/// rollback asked for it.
#[derive(Debug, Clone)]
struct Start {
    kind: Cause,
    version: Option<String>,
    rollback: bool,
    /// Run `[deploy] before` first (deploys; rollbacks only when asked).
    hooks: bool,
}

/// What the history needs of a candidate whose deploy ended.
#[derive(Debug, Clone)]
struct Finished {
    generation: u64,
    version: Option<String>,
    kind: Cause,
    rollback: bool,
    began: Instant,
}

impl Finished {
    fn of(g: &Generation, kind: Cause, rollback: bool) -> Finished {
        Finished {
            generation: g.id,
            version: g.version.clone(),
            kind,
            rollback,
            began: g.started,
        }
    }
}

impl Start {
    /// A start of the serving release, not asked for by anyone: a restart
    /// after a crash, a wedged generation's replacement.
    fn same_release(kind: Cause, releases: &Releases) -> Start {
        Start {
            kind,
            version: releases.current.clone(),
            rollback: false,
            hooks: false,
        }
    }
}

/// Slack on top of a deadline for `EXTEND_TIMEOUT_USEC`: after the last
/// SIGKILL the exit still has to be reaped.
const EXTEND_SLACK: Duration = Duration::from_secs(5);

/// What a waiting client hears about its deploy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Progress {
    /// A reload that does not wait: the file was valid and the deploy runs.
    /// Ends the exchange.
    Accepted,
    /// The reload was refused and nothing changed. Ends the exchange.
    Refused(String),
    /// Another deploy runs; this one follows it.
    Queued,
    Started {
        generation: u64,
        pid: Pid,
    },
    Ready {
        generation: u64,
        after: Duration,
    },
    Draining {
        generation: u64,
        pid: Pid,
    },
    /// The deploy's outcome. Ends the exchange.
    Done(Outcome),
}

impl Progress {
    /// Whether this is the last message of its exchange.
    pub(crate) fn is_final(&self) -> bool {
        matches!(
            self,
            Progress::Accepted | Progress::Refused(_) | Progress::Done(_)
        )
    }
}

/// One process of the application, with the configuration it started with.
#[derive(Debug)]
struct Generation {
    id: u64,
    /// Its config, `{version}` filled in.
    config: Arc<Config>,
    /// Its release, when the config names one.
    version: Option<String>,
    /// `None` between `Action::Spawn` and `Event::Spawned`.
    pid: Option<Pid>,
    started: Instant,
    state: State,
    /// The child's latest `STATUS=` text.
    status: Option<String>,
    /// Its `[health]` checks, once it serves.
    health: Watch,
    /// It runs in a cgroup of its own (see `Event::Spawned`).
    contained: bool,
    /// Its cgroup is empty (`Event::Emptied`).
    emptied: bool,
}

impl Generation {
    /// The kill deadline of a draining generation not yet killed.
    fn drain_deadline(&self) -> Option<Instant> {
        match self.state {
            State::Draining {
                deadline,
                killed: false,
            } => Some(deadline),
            _ => None,
        }
    }

    /// When a killed generation whose process still has not been reaped is
    /// given up on (a process in uninterruptible sleep, say).
    fn give_up_deadline(&self) -> Option<Instant> {
        match self.state {
            State::Draining {
                deadline,
                killed: true,
            } => Some(deadline),
            _ => None,
        }
    }
}

/// When a generation is checked next (a readiness or health check), and
/// whether a check is in flight (one at a time; the shell always answers).
#[derive(Debug, Clone, Copy, Default)]
struct Watch {
    next: Option<Instant>,
    in_flight: bool,
    /// Health checks failed in a row.
    failures: u32,
    /// A health check has passed since it serves.
    passed: bool,
}

impl Watch {
    /// When a check is due, if one may start.
    fn due(&self) -> Option<Instant> {
        self.next.filter(|_| !self.in_flight)
    }
}

/// How long a killed process may take to be reaped before baton stops
/// waiting for it (and names it): `baton stop` always finishes.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// Lifecycle of a generation. A process may already have exited while its
/// generation is still in any of these states: the core learns it from
/// `Event::Exited`, which the shell delivers as soon as it reaps the pid.
#[derive(Debug, Clone, Copy)]
enum State {
    /// Candidate whose `[deploy] before` hook runs; it starts when the
    /// hook has passed, `deadline` bounds the wait.
    Preparing {
        deadline: Instant,
    },
    /// Candidate. `ready_at` is set for `check = "delay"`; `check` runs
    /// the "exec" and "accepting" checks.
    Starting {
        deadline: Instant,
        ready_at: Option<Instant>,
        check: Watch,
    },
    /// Candidate, ready, serving beside the current generation until
    /// `until`; it is promoted then unless it failed.
    Probation {
        until: Instant,
        latency: Duration,
    },
    Ready {
        since: Instant,
        latency: Duration,
    },
    /// `deadline`: the drain deadline, or once `killed`, when baton gives
    /// up waiting for the exit.
    Draining {
        deadline: Instant,
        killed: bool,
    },
}

#[derive(Debug)]
struct Candidate {
    generation: Generation,
    kind: Cause,
    /// A deploy asked for by `rollback`.
    rollback: bool,
    /// When it had to wait for its before hook: the readiness timeout
    /// counts from its spawn.
    waiters: Vec<WaiterId>,
}

/// A reload that arrived during a deploy: the latest config wins, every
/// waiter is told about the one follow-up deploy.
#[derive(Debug)]
struct Pending {
    config: Arc<Config>,
    /// Chosen when the deploy starts: a `reload` queued behind `deploy 2`
    /// redeploys 2, not what served when it was asked for.
    release: Release,
    waiters: Vec<WaiterId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Running,
    Stopping { fast: bool },
    Exited,
}

/// The last deploy's outcome, for `baton status`.
#[derive(Debug, Clone)]
pub(crate) struct LastDeploy {
    pub outcome: Outcome,
    pub finished: Instant,
    pub took: Duration,
}

pub(crate) struct Supervisor {
    current: Option<Generation>,
    candidate: Option<Candidate>,
    draining: Vec<Generation>,
    pending: Option<Pending>,
    /// The config baton started with: its `[[listen]]` and `[control]`
    /// settings hold until baton restarts.
    frozen: Arc<Config>,
    /// Config of the last generation that became ready; restarts use it.
    serving_config: Arc<Config>,
    next_id: u64,
    mode: Mode,
    /// Set while no generation serves and a restart waits out its backoff.
    restart_at: Option<Instant>,
    /// Consecutive failures to keep a generation up, for the backoff.
    failures: u32,
    /// READY=1 goes upstream once, when the first generation is ready.
    announced: bool,
    last_deploy: Option<LastDeploy>,
    /// Successful deploys whose old generation still drains: their summary
    /// line is logged when it has exited.
    drain_watch: Vec<DrainWatch>,
    /// Current generations replaced for failing their health checks.
    replaced: u32,
    releases: Releases,
    /// Contained generations whose main process has exited and whose
    /// cgroup still holds processes (killed, not yet gone), each with when
    /// baton stops waiting for them.
    ending: Vec<(u64, Instant)>,
    rng: fastrand::Rng,
}

#[derive(Debug)]
struct DrainWatch {
    old: u64,
    new: u64,
    ready_after: Duration,
    since: Instant,
}

impl Supervisor {
    /// Starts supervising: spawns generation 1 at once.
    /// The release it starts is the one that served last (`releases`), else
    /// the config's `version`.
    pub(crate) fn new(
        config: Arc<Config>,
        releases: Releases,
        now: Instant,
        seed: u64,
    ) -> (Supervisor, Vec<Action>) {
        let version = releases.current.clone().or(config.app.version.clone());
        let mut s = Supervisor {
            current: None,
            candidate: None,
            draining: Vec::new(),
            pending: None,
            frozen: config.clone(),
            serving_config: config.clone(),
            next_id: 1,
            mode: Mode::Running,
            restart_at: None,
            failures: 0,
            announced: false,
            last_deploy: None,
            drain_watch: Vec::new(),
            replaced: 0,
            releases,
            ending: Vec::new(),
            rng: fastrand::Rng::with_seed(seed),
        };
        let mut actions = Vec::new();
        let start = Start {
            kind: Cause::Initial,
            version,
            rollback: false,
            hooks: false,
        };
        s.start_candidate(config, start, Vec::new(), now, &mut actions);
        (s, actions)
    }

    /// The transition function.
    pub(crate) fn handle(&mut self, event: Event, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        match event {
            Event::Reload {
                config,
                waiter,
                release,
            } => self.reload(config, waiter, release, now, &mut actions),
            Event::Spawned {
                generation,
                pid,
                contained,
            } => self.spawned(generation, pid, contained, &mut actions),
            Event::Emptied { generation } => self.emptied(generation, &mut actions),
            Event::SpawnFailed { generation, error } => {
                if self.is_candidate(generation) {
                    self.fail_candidate(Failure::SpawnFailed(error), now, &mut actions);
                }
            }
            Event::Exited { pid, status } => self.exited(pid, status, now, &mut actions),
            Event::Notify {
                pid,
                group,
                cgroup,
                message,
            } => self.notify(pid, group, cgroup, message, now, &mut actions),
            Event::HookDone {
                generation,
                hook,
                ok,
                output,
            } => self.hook_done(generation, hook, ok, output, now, &mut actions),
            Event::ReadyCheck { generation, ok } => {
                self.ready_checked(generation, ok, now, &mut actions)
            }
            Event::Probed {
                generation,
                ok,
                detail,
            } => self.probed(generation, ok, detail, now, &mut actions),
            Event::Stop { fast } => self.stop(fast, now, &mut actions),
            Event::Tick => self.tick(now, &mut actions),
        }
        self.exit_if_done(&mut actions);
        actions
    }

    /// The earliest instant at which `Event::Tick` has work to do.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let candidate = self.candidate.as_ref().and_then(|c| {
            let g = &c.generation;
            match g.state {
                State::Starting {
                    deadline,
                    ready_at,
                    check,
                } => {
                    let check = check.due().filter(|_| g.pid.is_some());
                    [Some(deadline), ready_at, check]
                        .into_iter()
                        .flatten()
                        .min()
                }
                State::Preparing { deadline } => Some(deadline),
                State::Probation { until, .. } => {
                    g.health.due().map_or(Some(until), |d| Some(d.min(until)))
                }
                _ => None,
            }
        });
        let health = self
            .current
            .as_ref()
            .filter(|_| !self.on_probation())
            .and_then(|g| g.health.due());
        let draining = self
            .draining
            .iter()
            .filter_map(|g| g.drain_deadline().or(g.give_up_deadline()));
        let ending = self.ending.iter().map(|&(_, at)| at);
        candidate
            .into_iter()
            .chain(health)
            .chain(draining)
            .chain(ending)
            .chain(self.restart_at)
            .min()
    }

    fn generations(&self) -> impl Iterator<Item = &Generation> {
        self.current
            .iter()
            .chain(self.candidate.iter().map(|c| &c.generation))
            .chain(self.draining.iter())
    }

    fn generations_mut(&mut self) -> impl Iterator<Item = &mut Generation> {
        self.current
            .iter_mut()
            .chain(self.candidate.iter_mut().map(|c| &mut c.generation))
            .chain(self.draining.iter_mut())
    }

    /// Whether the candidate is ready and on probation.
    fn on_probation(&self) -> bool {
        self.candidate
            .as_ref()
            .is_some_and(|c| matches!(c.generation.state, State::Probation { .. }))
    }

    fn is_candidate(&self, id: u64) -> bool {
        self.candidate
            .as_ref()
            .is_some_and(|c| c.generation.id == id)
    }

    fn reload(
        &mut self,
        config: Result<Arc<Config>, String>,
        waiter: Option<Waiter>,
        release: Release,
        now: Instant,
        actions: &mut Vec<Action>,
    ) {
        if self.mode != Mode::Running {
            if let Some(waiter) = waiter {
                actions.push(progress(waiter.id, Progress::Done(Outcome::Cancelled)));
            }
            return;
        }
        // Refused at once when no release fits now; chosen again when a
        // queued deploy starts.
        let config = config
            .and_then(|c| self.admit(c, actions))
            .and_then(|c| self.release(&c, release.clone()).map(|_| c));
        let config = match config {
            Ok(config) => config,
            Err(reason) => return self.refuse(reason, waiter, actions),
        };
        let waiter = match waiter {
            Some(w) if !w.follows => {
                actions.push(progress(w.id, Progress::Accepted));
                None
            }
            other => other.map(|w| w.id),
        };
        if self.candidate.is_some() {
            // One deploy at a time: coalesce into a single follow-up.
            actions.push(Action::Notice(Notice::ReloadQueued));
            let pending = self.pending.get_or_insert_with(|| Pending {
                config: config.clone(),
                release: Release::Current,
                waiters: Vec::new(),
            });
            pending.config = config;
            // A reload deploys whichever release comes next; a deploy or
            // rollback that names another one replaces it, and whoever
            // waited for that one hears it was cancelled.
            if release != Release::Current && release != pending.release {
                if pending.release != Release::Current {
                    for waiter in pending.waiters.drain(..) {
                        actions.push(progress(waiter, Progress::Done(Outcome::Cancelled)));
                    }
                }
                pending.release = release;
            }
            if let Some(waiter) = waiter {
                pending.waiters.push(waiter);
                actions.push(progress(waiter, Progress::Queued));
            }
            return;
        }
        let waiters = waiter.into_iter().collect();
        self.deploy(config, release, waiters, now, actions);
    }

    /// Starts a deploy of `release`, chosen now; `waiters` hear a refusal
    /// when none fits any more.
    fn deploy(
        &mut self,
        config: Arc<Config>,
        release: Release,
        waiters: Vec<WaiterId>,
        now: Instant,
        actions: &mut Vec<Action>,
    ) {
        let rollback = matches!(release, Release::Rollback { .. });
        let hooks = !matches!(
            release,
            Release::Rollback {
                with_hooks: false,
                ..
            }
        );
        let version = match self.release(&config, release) {
            Ok(version) => version,
            Err(reason) => {
                let notice = Notice::ReloadRefused { reason };
                for waiter in waiters {
                    actions.push(progress(waiter, Progress::Refused(notice.to_string())));
                }
                return actions.push(Action::Notice(notice));
            }
        };
        // A restart waiting out its backoff is replaced by the deploy.
        self.restart_at = None;
        let start = Start {
            kind: Cause::Deploy,
            version,
            rollback,
            hooks,
        };
        self.start_candidate(config, start, waiters, now, actions);
    }

    /// The release a deploy of `config` runs, or why there is none.
    fn release(&self, config: &Config, release: Release) -> Result<Option<String>, String> {
        let version = match release {
            Release::Current => self
                .releases
                .current
                .clone()
                .or_else(|| config.app.version.clone()),
            Release::Version(v) => Some(v),
            Release::Rollback { to: Some(v), .. } => Some(v),
            Release::Rollback { to: None, .. } => {
                let current = self.releases.current.as_ref();
                let before = self
                    .releases
                    .served
                    .iter()
                    .rev()
                    .find(|v| Some(*v) != current);
                match before {
                    Some(v) => Some(v.clone()),
                    None => {
                        return Err(format!(
                            "nothing to roll back to: no release other than {} has served \
                             (see `baton history`); name one with --to VERSION",
                            current.map_or("none", |c| c.as_str())
                        ))
                    }
                }
            }
        };
        if version.is_none() && config.uses_version() {
            return Err(config.missing_version().to_string());
        }
        Ok(version)
    }

    /// What of a re-read file can change while baton runs: everything but
    /// `[control]` and `[app] cgroup`, which wait for a restart (a
    /// warning). Changed listeners are opened by the shell before the
    /// file reaches here.
    fn admit(&self, config: Arc<Config>, actions: &mut Vec<Action>) -> Result<Arc<Config>, String> {
        if self.frozen.control_socket != config.control_socket
            || self.frozen.control_group != config.control_group
        {
            actions.push(Action::Notice(Notice::ControlChangeDeferred));
        }
        if self.frozen.app.cgroup != config.app.cgroup {
            actions.push(Action::Notice(Notice::CgroupChangeDeferred));
        }
        Ok(config)
    }

    /// A reload that cannot be deployed: nothing changes. Under
    /// `Type=notify-reload` systemd waits for RELOADING=1 and READY=1 after
    /// its SIGHUP, so a serving baton ends that reload with the reason;
    /// before the first READY=1 systemd is still starting the unit and must
    /// hear nothing (a READY=1 would end its start with nothing serving).
    fn refuse(&mut self, reason: String, waiter: Option<Waiter>, actions: &mut Vec<Action>) {
        let notice = Notice::ReloadRefused { reason };
        if self.announced {
            actions.push(Action::Upstream(Upstream::Reloading));
            actions.push(Action::Upstream(Upstream::Reloaded {
                status: notice.to_string(),
            }));
        }
        if let Some(waiter) = waiter {
            actions.push(progress(waiter.id, Progress::Refused(notice.to_string())));
        }
        actions.push(Action::Notice(notice));
    }

    fn start_candidate(
        &mut self,
        config: Arc<Config>,
        start: Start,
        waiters: Vec<WaiterId>,
        now: Instant,
        actions: &mut Vec<Action>,
    ) {
        let Start {
            kind,
            version,
            rollback,
            hooks,
        } = start;
        let config = Arc::new(config.render(version.as_deref()));
        let id = self.next_id;
        self.next_id += 1;
        // A deploy may run on past readiness by its probation, and before
        // it by its hook.
        let probation = match kind {
            Cause::Deploy | Cause::Replace => config.health.probation,
            _ => Duration::ZERO,
        };
        let before = config
            .hooks
            .before
            .as_ref()
            .filter(|_| hooks && kind == Cause::Deploy);
        let hook_time = before.map_or(Duration::ZERO, |_| config.hooks.before_timeout);
        actions.push(Action::Notice(Notice::Starting {
            generation: id,
            cause: kind,
            version: version.clone(),
        }));
        // Before the first READY=1 systemd is still starting the unit: a
        // RELOADING=1/READY=1 pair would end its start with nothing serving.
        if kind == Cause::Deploy && self.announced {
            actions.push(Action::Upstream(Upstream::Reloading));
            actions.push(Action::Upstream(Upstream::ExtendTimeout(
                config
                    .readiness
                    .timeout
                    .saturating_add(probation)
                    .saturating_add(hook_time)
                    .saturating_add(EXTEND_SLACK),
            )));
        }
        let state = match before {
            Some(_) => {
                actions.push(Action::RunHook {
                    generation: id,
                    hook: Hook::Before,
                    config: config.clone(),
                });
                // The shell bounds the hook by before_timeout; this bounds
                // the wait for its answer.
                State::Preparing {
                    deadline: deadline(now, hook_time.saturating_add(EXTEND_SLACK)),
                }
            }
            None => {
                actions.push(Action::Spawn {
                    generation: id,
                    config: config.clone(),
                });
                starting(&config, now)
            }
        };
        self.candidate = Some(Candidate {
            generation: Generation {
                id,
                config,
                version,
                pid: None,
                started: now,
                state,
                status: None,
                health: Watch::default(),
                contained: false,
                emptied: false,
            },
            kind,
            rollback,
            waiters,
        });
    }

    /// The answer to an `Action::RunHook`.
    fn hook_done(
        &mut self,
        id: u64,
        hook: Hook,
        ok: bool,
        output: String,
        now: Instant,
        actions: &mut Vec<Action>,
    ) {
        match hook {
            Hook::Before => {
                let Some(c) = self.candidate.as_mut().filter(|c| c.generation.id == id) else {
                    return;
                };
                if !matches!(c.generation.state, State::Preparing { .. }) {
                    return;
                }
                if !ok {
                    let reason = Failure::HookFailed {
                        hook: "before".into(),
                        detail: output,
                    };
                    return self.fail_candidate(reason, now, actions);
                }
                // Its readiness is timed from now, when it starts.
                let g = &mut c.generation;
                g.started = now;
                g.state = starting(&g.config, now);
                actions.push(Action::Spawn {
                    generation: id,
                    config: g.config.clone(),
                });
            }
            Hook::After if !ok => actions.push(Action::Notice(Notice::AfterHookFailed {
                generation: id,
                detail: output,
            })),
            Hook::After => actions.push(Action::Notice(Notice::AfterHookPassed { generation: id })),
        }
    }

    fn spawned(&mut self, id: u64, pid: Pid, contained: bool, actions: &mut Vec<Action>) {
        let Some(candidate) = self.candidate.as_mut().filter(|c| c.generation.id == id) else {
            return;
        };
        candidate.generation.pid = Some(pid);
        candidate.generation.contained = contained;
        actions.push(Action::Notice(Notice::Started {
            generation: id,
            pid: pid.as_raw(),
        }));
        for &waiter in &candidate.waiters {
            actions.push(progress(
                waiter,
                Progress::Started {
                    generation: id,
                    pid,
                },
            ));
        }
    }

    /// A generation's cgroup is empty: an ending one is gone; a live one
    /// (its main process a zombie not yet reaped) is gone at its exit.
    fn emptied(&mut self, id: u64, actions: &mut Vec<Action>) {
        if let Some(i) = self.ending.iter().position(|&(g, _)| g == id) {
            self.ending.remove(i);
            actions.push(Action::Notice(Notice::Gone { generation: id }));
            return;
        }
        if let Some(g) = self.generations_mut().find(|g| g.id == id) {
            g.emptied = true;
        }
    }

    /// The main process of `g` has exited and `g` leaves the core's roles:
    /// a contained generation whose cgroup still holds processes ends only
    /// when it is empty (or baton gives up on it).
    fn ended(&mut self, g: &Generation, now: Instant, actions: &mut Vec<Action>) {
        if g.contained && !g.emptied {
            self.ending.push((g.id, deadline(now, KILL_GRACE)));
        } else if g.contained {
            actions.push(Action::Notice(Notice::Gone { generation: g.id }));
        }
    }

    fn notify(
        &mut self,
        pid: Pid,
        group: Option<Pid>,
        cgroup: Option<u64>,
        message: Message,
        now: Instant,
        actions: &mut Vec<Action>,
    ) {
        let Some(generation) = self.generation_mut(pid, group, cgroup) else {
            actions.push(Action::Notice(Notice::ForeignNotify {
                pid: pid.as_raw(),
                ready: message.ready,
            }));
            return;
        };
        let id = generation.id;
        if let Some(status) = message.status {
            generation.status = Some(status.clone());
            actions.push(Action::Notice(Notice::AppStatus {
                generation: id,
                status,
            }));
        }
        if message.stopping {
            actions.push(Action::Notice(Notice::AppStopping { generation: id }));
        }
        // Apps written for systemd often name themselves; only another
        // pid is worth a warning (baton tracks the process it started).
        let names_another = |p: &String| p.trim().parse::<i32>() != Ok(pid.as_raw());
        if message.mainpid.as_ref().is_some_and(names_another) {
            actions.push(Action::Notice(Notice::MainPidIgnored {
                generation: id,
                pid: pid.as_raw(),
            }));
        }
        // READY=1 is the readiness check only where it was asked for.
        let notify = generation.config.readiness.check == ReadinessCheck::Notify;
        if message.ready && notify && self.is_candidate(id) {
            self.ready(now, actions);
        }
    }

    /// The answer to an `Action::CheckReady`.
    fn ready_checked(&mut self, id: u64, ok: bool, now: Instant, actions: &mut Vec<Action>) {
        let Some(c) = self.candidate.as_mut().filter(|c| c.generation.id == id) else {
            return;
        };
        let interval = match &c.generation.config.readiness.check {
            ReadinessCheck::Exec { interval, .. } => *interval,
            _ => ACCEPTING_INTERVAL,
        };
        if let State::Starting { check, .. } = &mut c.generation.state {
            check.in_flight = false;
            check.next = Some(deadline(now, interval));
            if ok {
                self.ready(now, actions);
            }
        }
    }

    /// The answer to an `Action::Probe`. Enough failures in a row stop a
    /// candidate on probation, or replace the current generation.
    fn probed(
        &mut self,
        id: u64,
        ok: bool,
        detail: String,
        now: Instant,
        actions: &mut Vec<Action>,
    ) {
        let on_probation = self.on_probation() && self.is_candidate(id);
        let candidate = self.candidate.as_mut().map(|c| &mut c.generation);
        let Some(g) = candidate
            .into_iter()
            .chain(self.current.as_mut())
            .find(|g| g.id == id)
        else {
            return;
        };
        let health = &g.config.health;
        let (of, interval) = (health.failures, health.interval);
        g.health.in_flight = false;
        g.health.next = Some(deadline(now, interval));
        if ok {
            // On probation a pass may have been the old generation's (the
            // probes reach the service address): it does not clear the
            // new one's failures, which count through the probation.
            if !on_probation {
                g.health.failures = 0;
                g.health.passed = true;
            }
            return;
        }
        g.health.failures = g.health.failures.saturating_add(1);
        let (failures, passed) = (g.health.failures, g.health.passed);
        actions.push(Action::Notice(Notice::HealthFailed {
            generation: id,
            failures,
            of,
            detail: detail.clone(),
        }));
        if failures < of {
            return;
        }
        if self.is_candidate(id) {
            let reason = Failure::Unhealthy { failures, detail };
            return self.fail_candidate(reason, now, actions);
        }
        // The current generation is wedged: a fresh one of its release
        // takes over through the usual handoff, unless a deploy runs. One
        // that never passed is not wedged: its check (or the release) is
        // wrong, and replacing it would go on forever.
        if !passed {
            if failures == of {
                actions.push(Action::Notice(Notice::HealthNeverPassed {
                    generation: id,
                    detail,
                }));
            }
            return;
        }
        if self.candidate.is_some() || self.mode != Mode::Running {
            return;
        }
        if let Some(g) = self.current.as_mut() {
            g.health.failures = 0;
        }
        self.replaced = self.replaced.saturating_add(1);
        actions.push(Action::Notice(Notice::Replacing {
            generation: id,
            failures,
            detail,
        }));
        let config = self.serving_config.clone();
        let start = Start::same_release(Cause::Replace, &self.releases);
        self.start_candidate(config, start, Vec::new(), now, actions);
    }

    /// The generation `pid` belongs to: its main process, else one of its
    /// process group or its cgroup.
    fn generation_mut(
        &mut self,
        pid: Pid,
        group: Option<Pid>,
        cgroup: Option<u64>,
    ) -> Option<&mut Generation> {
        let belongs = |g: &Generation| {
            g.pid
                .is_some_and(|leader| leader == pid || Some(leader) == group)
                || Some(g.id) == cgroup && g.contained
        };
        let leader = |g: &Generation| g.pid == Some(pid);
        // The main process itself first: a pid may lead one group and sit
        // in another generation's cgroup only in a race.
        let all = || {
            self.current
                .iter()
                .chain(self.candidate.iter().map(|c| &c.generation))
                .chain(self.draining.iter())
        };
        let id = all()
            .find(|g| leader(g))
            .or_else(|| all().find(|g| belongs(g)))
            .map(|g| g.id)?;
        self.generations_mut().find(|g| g.id == id)
    }

    /// The candidate is ready. With `[health] probation` and a generation
    /// to fall back to, it serves beside that one on probation first;
    /// else it is promoted at once.
    fn ready(&mut self, now: Instant, actions: &mut Vec<Action>) {
        let Some(c) = self.candidate.as_mut() else {
            return;
        };
        let g = &mut c.generation;
        if !matches!(g.state, State::Starting { .. }) {
            return;
        }
        let (id, latency) = (g.id, now - g.started);
        actions.push(Action::Notice(Notice::Ready {
            generation: id,
            after: latency,
        }));
        for &waiter in &c.waiters {
            actions.push(progress(
                waiter,
                Progress::Ready {
                    generation: id,
                    after: latency,
                },
            ));
        }
        let probation = g.config.health.probation;
        let beside = self.current.as_ref().map(|current| current.id);
        match beside {
            Some(beside) if !probation.is_zero() && c.kind != Cause::Initial => {
                g.state = State::Probation {
                    until: deadline(now, probation),
                    latency,
                };
                if g.config.health.checks() {
                    g.health.next = Some(now);
                }
                actions.push(Action::Notice(Notice::Probation {
                    generation: id,
                    beside,
                    probation,
                }));
            }
            _ => self.promote(latency, now, actions),
        }
    }

    /// The candidate, ready `latency` after its start (and through its
    /// probation, if it had one), becomes current; the old current drains.
    fn promote(&mut self, latency: Duration, now: Instant, actions: &mut Vec<Action>) {
        let Some(Candidate {
            mut generation,
            kind,
            rollback,
            waiters,
        }) = self.candidate.take()
        else {
            return;
        };
        let id = generation.id;
        let started = generation.started;
        let version = generation.version.clone();
        if let Some(v) = &version {
            let served = &mut self.releases.served;
            served.retain(|s| s != v);
            served.push(v.clone());
            if served.len() > SERVED_KEPT {
                served.remove(0);
            }
            self.releases.current = Some(v.clone());
        }
        generation.state = State::Ready {
            since: now,
            latency,
        };
        if generation.config.health.checks() && generation.health.next.is_none() {
            generation.health.next = Some(now);
        }
        if kind == Cause::Deploy && generation.config.hooks.after.is_some() {
            actions.push(Action::RunHook {
                generation: id,
                hook: Hook::After,
                config: generation.config.clone(),
            });
        }
        self.serving_config = generation.config.clone();
        let old = self.current.replace(generation);
        if kind == Cause::Deploy {
            match &old {
                Some(old) => self.drain_watch.push(DrainWatch {
                    old: old.id,
                    new: id,
                    ready_after: latency,
                    since: now,
                }),
                None => actions.push(Action::Notice(Notice::DeploySummary(Summary {
                    generation: id,
                    ok: true,
                    ready: Some(latency),
                    drained: None,
                    reason: None,
                    took: latency,
                }))),
            }
        }
        if let Some(old) = old {
            for &waiter in &waiters {
                if let Some(pid) = old.pid {
                    let progress_msg = Progress::Draining {
                        generation: old.id,
                        pid,
                    };
                    actions.push(progress(waiter, progress_msg));
                }
            }
            self.drain(old, now, actions);
        }
        let outcome = Outcome::Succeeded {
            generation: id,
            ready_after: latency,
        };
        let status = format!("generation {id} serving");
        if !self.announced {
            self.announced = true;
            actions.push(Action::Upstream(Upstream::Ready { status }));
        } else if kind == Cause::Deploy {
            actions.push(Action::Upstream(Upstream::Reloaded { status }));
        } else {
            actions.push(Action::Upstream(Upstream::Status(status)));
        }
        let finished = Finished {
            generation: id,
            version,
            kind,
            rollback,
            began: started,
        };
        self.finish_deploy(finished, outcome, latency, waiters, now, actions);
    }

    /// The history's record of a deploy that ended `now`.
    fn record(&self, finished: Finished, outcome: Outcome, now: Instant) -> Action {
        Action::Record {
            record: Record {
                generation: finished.generation,
                version: finished.version,
                cause: finished.kind,
                rollback: finished.rollback,
                outcome,
                began: finished.began,
                took: now.saturating_duration_since(finished.began),
            },
            current: self.releases.current.clone(),
        }
    }

    /// Records the outcome, answers the waiters and starts a queued reload.
    fn finish_deploy(
        &mut self,
        finished: Finished,
        outcome: Outcome,
        took: Duration,
        waiters: Vec<WaiterId>,
        now: Instant,
        actions: &mut Vec<Action>,
    ) {
        let kind = finished.kind;
        // Restarts after a crash are not deploys: the history has them not.
        if kind != Cause::Restart {
            actions.push(self.record(finished, outcome.clone(), now));
        }
        if kind == Cause::Deploy {
            actions.push(Action::Notice(Notice::DeployFinished {
                outcome: outcome.clone(),
                took,
            }));
            self.last_deploy = Some(LastDeploy {
                outcome: outcome.clone(),
                finished: now,
                took,
            });
        }
        for waiter in waiters {
            actions.push(progress(waiter, Progress::Done(outcome.clone())));
        }
        if let Some(Pending {
            config,
            release,
            waiters,
        }) = self.pending.take()
        {
            self.deploy(config, release, waiters, now, actions);
        }
    }

    /// The candidate failed. The current generation is untouched.
    fn fail_candidate(&mut self, reason: Failure, now: Instant, actions: &mut Vec<Action>) {
        let Some(Candidate {
            generation,
            kind,
            rollback,
            waiters,
        }) = self.candidate.take()
        else {
            return;
        };
        let id = generation.id;
        let took = now - generation.started;
        let finished = Finished::of(&generation, kind, rollback);
        match (&reason, generation.pid) {
            // It may already have accepted connections from the shared
            // queue (and on probation it served): stop it like a draining
            // generation.
            (Failure::NotReady(_) | Failure::Unhealthy { .. }, Some(_)) => {
                self.drain(generation, now, actions)
            }
            // Exited: clean up whatever it left in its process group.
            (Failure::Exited(_) | Failure::ExitedInProbation(_), Some(pid)) => {
                actions.push(Action::Kill {
                    generation: id,
                    pid,
                    leader: false,
                });
                self.ended(&generation, now, actions);
            }
            _ => {}
        }
        let serving = self.current.as_ref().map(|g| g.id);
        let failed = Notice::CandidateFailed {
            generation: id,
            reason: reason.clone(),
            serving,
        };
        let status = failed.to_string();
        actions.push(Action::Notice(failed));
        if kind == Cause::Deploy {
            actions.push(Action::Notice(Notice::DeploySummary(Summary {
                generation: id,
                ok: false,
                ready: None,
                drained: None,
                reason: Some(reason.clone()),
                took,
            })));
        }
        let outcome = Outcome::Failed {
            generation: id,
            reason,
        };
        if kind == Cause::Deploy && self.announced {
            actions.push(Action::Upstream(Upstream::Reloaded {
                status: status.clone(),
            }));
        } else {
            actions.push(Action::Upstream(Upstream::Status(status.clone())));
        }
        if serving.is_none() && self.mode == Mode::Running {
            self.schedule_restart(now, actions);
        }
        self.finish_deploy(finished, outcome, took, waiters, now, actions);
    }

    fn schedule_restart(&mut self, now: Instant, actions: &mut Vec<Action>) {
        let restart = self.serving_config.restart;
        self.failures = self.failures.saturating_add(1);
        let exp = restart
            .backoff_initial
            .saturating_mul(1u32 << (self.failures - 1).min(20));
        let capped = exp.min(restart.backoff_max);
        // Full backoff would make every crashed instance of a fleet restart
        // in lockstep; jitter spreads them over [delay/2, delay].
        let delay = capped.mul_f64(0.5 + self.rng.f64() * 0.5);
        actions.push(Action::Notice(Notice::RestartScheduled {
            after: delay,
            failures: self.failures,
        }));
        self.restart_at = Some(deadline(now, delay));
    }

    fn drain(&mut self, mut generation: Generation, now: Instant, actions: &mut Vec<Action>) {
        let drain = generation.config.drain;
        generation.state = State::Draining {
            deadline: deadline(now, drain.timeout),
            killed: false,
        };
        if let Some(pid) = generation.pid {
            actions.push(Action::Notice(Notice::Draining {
                generation: generation.id,
                pid: pid.as_raw(),
                signal: drain.signal.as_str().to_owned(),
            }));
            actions.push(Action::Signal {
                pid,
                signal: drain.signal,
            });
        }
        self.draining.push(generation);
        let live = |g: &Generation| g.drain_deadline().is_some();
        if self.draining.iter().filter(|g| live(g)).count() > MAX_DRAINING {
            let oldest = self.draining.iter_mut().find(|g| live(g));
            if let Some(oldest) = oldest {
                actions.push(Action::Notice(Notice::TooManyDraining {
                    generation: oldest.id,
                    limit: MAX_DRAINING,
                }));
                kill(oldest, now, actions);
            }
        }
    }

    fn exited(&mut self, pid: Pid, status: ExitStatus, now: Instant, actions: &mut Vec<Action>) {
        if let Some(c) = self
            .candidate
            .as_ref()
            .filter(|c| c.generation.pid == Some(pid))
        {
            let reason = match c.generation.state {
                State::Probation { .. } => Failure::ExitedInProbation(status),
                _ => Failure::Exited(status),
            };
            self.fail_candidate(reason, now, actions);
            return;
        }
        if let Some(i) = self.draining.iter().position(|g| g.pid == Some(pid)) {
            let g = self.draining.remove(i);
            actions.push(Action::Notice(Notice::Exited {
                generation: g.id,
                pid: pid.as_raw(),
                status,
            }));
            if let Some(w) = self.drain_watch.iter().position(|w| w.old == g.id) {
                let w = self.drain_watch.remove(w);
                let drain = now.saturating_duration_since(w.since);
                actions.push(Action::Notice(Notice::DeploySummary(Summary {
                    generation: w.new,
                    ok: true,
                    ready: Some(w.ready_after),
                    drained: Some(Drained {
                        generation: w.old,
                        after: drain,
                        status,
                    }),
                    reason: None,
                    took: w.ready_after + drain,
                })));
            }
            // KillMode=mixed: what the main process left behind goes too.
            actions.push(Action::Kill {
                generation: g.id,
                pid,
                leader: false,
            });
            self.ended(&g, now, actions);
            return;
        }
        if let Some(g) = self.current.take_if(|g| g.pid == Some(pid)) {
            actions.push(Action::Notice(Notice::Crashed {
                generation: g.id,
                pid: pid.as_raw(),
                status,
            }));
            actions.push(Action::Kill {
                generation: g.id,
                pid,
                leader: false,
            });
            self.ended(&g, now, actions);
            let stable = match g.state {
                State::Ready { since, .. } => now - since >= g.config.restart.backoff_max,
                _ => false,
            };
            if stable {
                self.failures = 0;
            }
            actions.push(Action::Upstream(Upstream::Status(format!(
                "generation {} {status}; restarting",
                g.id
            ))));
            // A running deploy's candidate will take over; otherwise restart.
            // One still waiting for its before hook started nothing and may
            // wait minutes: that deploy is cancelled (its hook runs on, a
            // migration is not cut short) and the serving release restarts.
            let preparing = self
                .candidate
                .as_ref()
                .is_some_and(|c| matches!(c.generation.state, State::Preparing { .. }));
            if preparing {
                let reason = Failure::HookFailed {
                    hook: "before".into(),
                    detail: "the serving generation crashed while it ran: the deploy is \
                             cancelled and the serving release restarts (the hook runs on)"
                        .into(),
                };
                self.fail_candidate(reason, now, actions);
            } else if self.candidate.is_none() {
                self.schedule_restart(now, actions);
            }
        }
    }

    fn tick(&mut self, now: Instant, actions: &mut Vec<Action>) {
        if let Some(c) = self.candidate.as_mut() {
            let g = &mut c.generation;
            match &mut g.state {
                State::Preparing { deadline } if *deadline <= now => {
                    let reason = Failure::HookFailed {
                        hook: "before".into(),
                        detail: "no answer from the hook in time".into(),
                    };
                    self.fail_candidate(reason, now, actions);
                }
                State::Starting {
                    deadline,
                    ready_at,
                    check,
                } => {
                    if ready_at.is_some_and(|r| r <= now) && g.pid.is_some() {
                        self.ready(now, actions);
                    } else if *deadline <= now {
                        let timeout = g.config.readiness.timeout;
                        self.fail_candidate(Failure::NotReady(timeout), now, actions);
                    } else if let Some(pid) =
                        g.pid.filter(|_| check.due().is_some_and(|d| d <= now))
                    {
                        check.in_flight = true;
                        actions.push(Action::CheckReady {
                            generation: g.id,
                            pid,
                            config: g.config.clone(),
                        });
                    }
                }
                State::Probation { until, latency } => {
                    if *until <= now {
                        let latency = *latency;
                        self.promote(latency, now, actions);
                    } else {
                        probe_if_due(g, now, actions);
                    }
                }
                _ => {}
            }
        }
        // The current generation's probes pause while a candidate is on
        // probation: they reach the service address, so either generation
        // may answer, and a failure is blamed on the new one.
        if !self.on_probation() {
            if let Some(g) = self.current.as_mut() {
                probe_if_due(g, now, actions);
            }
        }
        for g in &mut self.draining {
            if let Some(deadline) = g.drain_deadline() {
                if deadline <= now {
                    actions.push(Action::Notice(Notice::DrainTimedOut {
                        generation: g.id,
                        pid: g.pid.map(Pid::as_raw),
                        timeout: g.config.drain.timeout,
                    }));
                    kill(g, now, actions);
                }
            }
        }
        let given_up = |g: &Generation| g.give_up_deadline().is_some_and(|d| d <= now);
        for g in self.draining.iter().filter(|g| given_up(g)) {
            actions.push(Action::Notice(Notice::GivenUp {
                generation: g.id,
                pid: g.pid.map(Pid::as_raw),
                waited: KILL_GRACE,
                lingering: Vec::new(),
            }));
        }
        self.draining.retain(|g| !given_up(g));
        let (gone, ending): (Vec<_>, Vec<_>) = self.ending.iter().partition(|&&(_, at)| at <= now);
        self.ending = ending;
        for (generation, _) in gone {
            actions.push(Action::Notice(Notice::GivenUp {
                generation,
                pid: None,
                waited: KILL_GRACE,
                lingering: Vec::new(),
            }));
        }
        if self.restart_at.is_some_and(|t| t <= now) && self.candidate.is_none() {
            self.restart_at = None;
            let config = self.serving_config.clone();
            let start = Start::same_release(Cause::Restart, &self.releases);
            self.start_candidate(config, start, Vec::new(), now, actions);
        }
    }

    fn stop(&mut self, fast: bool, now: Instant, actions: &mut Vec<Action>) {
        match self.mode {
            Mode::Stopping { fast: true } | Mode::Exited => return,
            Mode::Stopping { fast: false } if !fast => return,
            Mode::Stopping { .. } => {}
            Mode::Running => actions.push(Action::Upstream(Upstream::Stopping)),
        }
        actions.push(Action::Notice(Notice::Stopping { fast }));
        self.mode = Mode::Stopping { fast };
        self.restart_at = None;
        let mut waiters: Vec<WaiterId> = self.pending.take().map(|p| p.waiters).unwrap_or_default();
        if let Some(c) = self.candidate.take() {
            waiters.extend(c.waiters);
            if c.kind != Cause::Restart {
                let finished = Finished::of(&c.generation, c.kind, c.rollback);
                actions.push(self.record(finished, Outcome::Cancelled, now));
            }
            match c.generation.pid {
                Some(_) => self.drain(c.generation, now, actions),
                // Its before hook runs: nothing was started.
                None => actions.push(Action::CancelHook {
                    generation: c.generation.id,
                }),
            }
        }
        if let Some(current) = self.current.take() {
            self.drain(current, now, actions);
        }
        for waiter in waiters {
            actions.push(progress(waiter, Progress::Done(Outcome::Cancelled)));
        }
        if fast {
            for g in &mut self.draining {
                if g.drain_deadline().is_some() {
                    kill(g, now, actions);
                }
            }
        } else if let Some(last) = self
            .draining
            .iter()
            .filter_map(Generation::drain_deadline)
            .max()
        {
            let left = last.saturating_duration_since(now);
            actions.push(Action::Upstream(Upstream::ExtendTimeout(
                left.saturating_add(EXTEND_SLACK),
            )));
        }
    }

    fn exit_if_done(&mut self, actions: &mut Vec<Action>) {
        let none_left = self.generations().next().is_none() && self.ending.is_empty();
        if matches!(self.mode, Mode::Stopping { .. }) && none_left {
            actions.push(Action::Notice(Notice::AllExited));
            self.mode = Mode::Exited;
            actions.push(Action::Exit(0));
        }
    }

    /// A snapshot for `baton status`.
    pub(crate) fn status(&self, now: Instant) -> Status {
        let generations = self
            .generations()
            .map(|g| {
                let (state, latency) = match g.state {
                    State::Preparing { .. } => ("preparing", None),
                    State::Starting { .. } => ("starting", None),
                    State::Probation { latency, .. } => ("probation", Some(latency)),
                    State::Ready { latency, .. } => ("ready", Some(latency)),
                    State::Draining { .. } => ("draining", None),
                };
                let probation_left = match g.state {
                    State::Probation { until, .. } => Some(until.saturating_duration_since(now)),
                    _ => None,
                };
                GenerationStatus {
                    generation: g.id,
                    pid: g.pid.map(|p| p.as_raw()),
                    state,
                    age: now.saturating_duration_since(g.started),
                    ready_after: latency,
                    command: g.config.app.command.join(" "),
                    status: g.status.clone(),
                    probation_left,
                    health_failures: g.health.failures,
                    health_passed: g.config.health.checks().then_some(g.health.passed),
                }
            })
            .collect();
        Status {
            generations,
            deploying: self
                .candidate
                .as_ref()
                .is_some_and(|c| c.kind == Cause::Deploy),
            queued: self.pending.is_some(),
            restarting_in: self.restart_at.map(|t| t.saturating_duration_since(now)),
            last_deploy: self.last_deploy.clone().map(|l| (l, now)),
            stopping: self.mode != Mode::Running,
            replaced: self.replaced,
        }
    }
}

/// `now + wait`, without a panic on overflow: the config bounds every
/// duration (`config::MAX_DURATION`), and a wait beyond what `Instant` can
/// hold is as good as that bound.
fn deadline(now: Instant, wait: Duration) -> Instant {
    now.checked_add(wait)
        .or_else(|| now.checked_add(crate::config::MAX_DURATION))
        .unwrap_or(now)
}

/// A candidate's state once its process is started at `now`: its
/// readiness deadline, its delay, its checks.
fn starting(config: &Config, now: Instant) -> State {
    let readiness = &config.readiness;
    let ready_at = match readiness.check {
        ReadinessCheck::Delay(d) => Some(deadline(now, d)),
        _ => None,
    };
    // Checked as soon as the process exists (`Event::Spawned`).
    let check = match readiness.check {
        ReadinessCheck::Accepting | ReadinessCheck::Exec { .. } => Watch {
            next: Some(now),
            ..Watch::default()
        },
        _ => Watch::default(),
    };
    State::Starting {
        deadline: deadline(now, readiness.timeout),
        ready_at,
        check,
    }
}

/// Starts a health probe of `g` if one is due and none is in flight.
fn probe_if_due(g: &mut Generation, now: Instant, actions: &mut Vec<Action>) {
    let Some(pid) = g.pid else { return };
    if g.health.due().is_some_and(|d| d <= now) {
        g.health.in_flight = true;
        actions.push(Action::Probe {
            generation: g.id,
            pid,
            config: g.config.clone(),
        });
    }
}

fn progress(waiter: WaiterId, progress: Progress) -> Action {
    Action::Progress { waiter, progress }
}

fn kill(g: &mut Generation, now: Instant, actions: &mut Vec<Action>) {
    if let State::Draining { killed, deadline } = &mut g.state {
        *killed = true;
        *deadline = self::deadline(now, KILL_GRACE);
    }
    if let Some(pid) = g.pid {
        actions.push(Action::Kill {
            generation: g.id,
            pid,
            leader: true,
        });
    }
}

/// What `baton status` shows.
#[derive(Debug, Clone)]
pub(crate) struct Status {
    pub generations: Vec<GenerationStatus>,
    pub deploying: bool,
    /// A reload is queued behind the running deploy.
    pub queued: bool,
    pub restarting_in: Option<Duration>,
    /// The last deploy and the instant the snapshot was taken.
    pub last_deploy: Option<(LastDeploy, Instant)>,
    pub stopping: bool,
    /// Current generations replaced for failing their health checks.
    pub replaced: u32,
}

#[derive(Debug, Clone)]
pub(crate) struct GenerationStatus {
    pub generation: u64,
    pub pid: Option<i32>,
    pub state: &'static str,
    pub age: Duration,
    pub ready_after: Option<Duration>,
    pub command: String,
    pub status: Option<String>,
    /// On probation: how long until it is promoted.
    pub probation_left: Option<Duration>,
    /// Health checks failed in a row.
    pub health_failures: u32,
    /// With `[health]` checks: whether one has passed since it serves.
    pub health_passed: Option<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const BASE: &str = r#"
[app]
command = ["/bin/app"]
[readiness]
timeout = "5s"
[drain]
timeout = "10s"
[restart]
backoff_initial = "100ms"
backoff_max = "1s"
"#;

    fn config(text: &str) -> Arc<Config> {
        Arc::new(Config::parse(Path::new("/etc/baton/test.toml"), text).unwrap())
    }

    /// Drives a supervisor through events at chosen instants. Notices are
    /// kept apart (`notices`), so tests compare effects exactly; every
    /// upstream message so far is in `upstream`.
    struct Harness {
        s: Supervisor,
        t0: Instant,
        now: Instant,
        config: Arc<Config>,
        notices: Vec<Notice>,
        upstream: Vec<Upstream>,
        /// History records, with the serving release after each.
        records: Vec<(Record, Option<String>)>,
    }

    fn pid(n: i32) -> Pid {
        Pid::from_raw(n)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    impl Harness {
        fn with(text: &str) -> (Harness, Vec<Action>) {
            Harness::with_releases(text, Releases::default())
        }

        /// Started with `releases` remembered (as from the history).
        fn with_releases(text: &str, releases: Releases) -> (Harness, Vec<Action>) {
            let config = config(text);
            let t0 = Instant::now();
            let (s, actions) = Supervisor::new(config.clone(), releases, t0, 1);
            let mut h = Harness {
                s,
                t0,
                now: t0,
                config,
                notices: Vec::new(),
                upstream: Vec::new(),
                records: Vec::new(),
            };
            let actions = h.sort(actions);
            (h, actions)
        }

        /// Generation 1 running as pid 100 and ready.
        fn serving() -> Harness {
            let (mut h, _) = Harness::with(BASE);
            h.on(Event::Spawned {
                generation: 1,
                pid: pid(100),
                contained: false,
            });
            h.on(ready(100));
            h
        }

        fn at(&mut self, offset: Duration) -> &mut Self {
            self.now = self.t0 + offset;
            self
        }

        fn on(&mut self, event: Event) -> Vec<Action> {
            let actions = self.s.handle(event, self.now);
            self.sort(actions)
        }

        /// Keeps the notices apart; returns the other actions.
        fn sort(&mut self, actions: Vec<Action>) -> Vec<Action> {
            let mut effects = Vec::new();
            for action in actions {
                match action {
                    Action::Notice(n) => self.notices.push(n),
                    Action::Record { record, current } => self.records.push((record, current)),
                    Action::Upstream(u) => {
                        self.upstream.push(u.clone());
                        effects.push(Action::Upstream(u));
                    }
                    other => effects.push(other),
                }
            }
            effects
        }

        /// A reload of the same file; `waiter` follows the deploy.
        fn reload(&mut self, waiter: Option<WaiterId>) -> Vec<Action> {
            let config = Ok(self.config.clone());
            let waiter = waiter.map(|id| Waiter { id, follows: true });
            self.on(Event::Reload {
                config,
                waiter,
                release: Release::Current,
            })
        }

        /// Notices since the last call.
        fn take_notices(&mut self) -> Vec<Notice> {
            std::mem::take(&mut self.notices)
        }

        fn states(&self) -> Vec<(u64, &'static str)> {
            let status = self.s.status(self.now);
            status
                .generations
                .iter()
                .map(|g| (g.generation, g.state))
                .collect()
        }
    }

    fn ready(p: i32) -> Event {
        Event::Notify {
            pid: pid(p),
            group: None,
            cgroup: None,
            message: Message::parse(b"READY=1"),
        }
    }

    fn exited(p: i32, code: i32) -> Event {
        Event::Exited {
            pid: pid(p),
            status: ExitStatus::Code(code),
        }
    }

    fn spawns(actions: &[Action]) -> Vec<u64> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Spawn { generation, .. } => Some(*generation),
                _ => None,
            })
            .collect()
    }

    fn done(actions: &[Action], waiter: WaiterId) -> Option<&Outcome> {
        actions.iter().find_map(|a| match a {
            Action::Progress {
                waiter: w,
                progress: Progress::Done(outcome),
            } if *w == waiter => Some(outcome),
            _ => None,
        })
    }

    fn term(p: i32) -> Action {
        Action::Signal {
            pid: pid(p),
            signal: Signal::SIGTERM,
        }
    }

    /// SIGKILL at a deadline: the process (still running) and its group.
    /// Tests give generation n the pid n * 100.
    fn kill(p: i32) -> Action {
        Action::Kill {
            generation: p as u64 / 100,
            pid: pid(p),
            leader: true,
        }
    }

    /// Cleanup after the process has exited: its group, never its pid.
    fn cleanup(p: i32) -> Action {
        Action::Kill {
            generation: p as u64 / 100,
            pid: pid(p),
            leader: false,
        }
    }

    #[test]
    fn first_generation_starts_and_announces_ready() {
        let (mut h, actions) = Harness::with(BASE);
        assert_eq!(spawns(&actions), [1]);
        assert_eq!(h.states(), [(1, "starting")]);
        h.on(Event::Spawned {
            generation: 1,
            pid: pid(100),
            contained: false,
        });
        let actions = h.at(ms(40)).on(ready(100));
        assert_eq!(
            actions,
            [Action::Upstream(Upstream::Ready {
                status: "generation 1 serving".into()
            })]
        );
        assert_eq!(h.states(), [(1, "ready")]);
    }

    #[test]
    fn deploy_success_drains_old_only_after_new_is_ready() {
        let mut h = Harness::serving();
        let actions = h.at(ms(1000)).reload(Some(7));
        assert_eq!(actions[0], Action::Upstream(Upstream::Reloading));
        assert_eq!(spawns(&actions), [2]);
        let actions = h.on(Event::Spawned {
            generation: 2,
            pid: pid(200),
            contained: false,
        });
        assert_eq!(
            actions,
            [Action::Progress {
                waiter: 7,
                progress: Progress::Started {
                    generation: 2,
                    pid: pid(200)
                }
            }]
        );
        // Not ready yet: the old generation is untouched.
        assert_eq!(h.states(), [(1, "ready"), (2, "starting")]);
        let actions = h.at(ms(1300)).on(ready(200));
        let signal_at = actions.iter().position(|a| *a == term(100)).unwrap();
        let ready_at = actions
            .iter()
            .position(|a| {
                matches!(
                    a,
                    Action::Progress {
                        progress: Progress::Ready { .. },
                        ..
                    }
                )
            })
            .unwrap();
        assert!(ready_at < signal_at);
        assert_eq!(
            done(&actions, 7),
            Some(&Outcome::Succeeded {
                generation: 2,
                ready_after: ms(300)
            })
        );
        assert!(actions.contains(&Action::Upstream(Upstream::Reloaded {
            status: "generation 2 serving".into()
        })));
        assert_eq!(h.states(), [(2, "ready"), (1, "draining")]);
        // The old one exits by itself: its group is cleaned, nothing else.
        assert_eq!(h.on(exited(100, 0)), [cleanup(100)]);
        assert_eq!(h.states(), [(2, "ready")]);
        assert!(h.s.next_deadline().is_none(), "idle means no wake-ups");
    }

    #[test]
    fn candidate_exiting_before_ready_fails_and_old_keeps_serving() {
        let mut h = Harness::serving();
        h.reload(Some(1));
        h.on(Event::Spawned {
            generation: 2,
            pid: pid(200),
            contained: false,
        });
        let actions = h.on(exited(200, 3));
        assert_eq!(
            done(&actions, 1),
            Some(&Outcome::Failed {
                generation: 2,
                reason: Failure::Exited(ExitStatus::Code(3))
            })
        );
        assert!(!actions.iter().any(|a| matches!(a, Action::Signal { .. })));
        assert_eq!(h.states(), [(1, "ready")]);
        let status = h.s.status(h.now);
        let (last, _) = status.last_deploy.unwrap();
        assert_eq!(
            last.outcome.to_string(),
            "generation 2 failed: exited with code 3 before it was ready"
        );
    }

    #[test]
    fn candidate_not_ready_in_time_is_drained_then_killed() {
        let mut h = Harness::serving();
        h.at(ms(1000)).reload(Some(1));
        h.on(Event::Spawned {
            generation: 2,
            pid: pid(200),
            contained: false,
        });
        assert_eq!(h.s.next_deadline(), Some(h.t0 + ms(6000)));
        assert!(h.at(ms(5999)).on(Event::Tick).is_empty());
        let actions = h.at(ms(6000)).on(Event::Tick);
        assert!(actions.contains(&term(200)), "{actions:?}");
        assert!(!actions.contains(&term(100)));
        assert_eq!(
            done(&actions, 1),
            Some(&Outcome::Failed {
                generation: 2,
                reason: Failure::NotReady(ms(5000))
            })
        );
        assert_eq!(h.states(), [(1, "ready"), (2, "draining")]);
        // It ignores the drain signal: killed at its drain deadline.
        assert_eq!(h.s.next_deadline(), Some(h.t0 + ms(16000)));
        assert_eq!(h.at(ms(16000)).on(Event::Tick), [kill(200)]);
        h.on(Event::Exited {
            pid: pid(200),
            status: ExitStatus::Signal(Signal::SIGKILL),
        });
        assert_eq!(h.states(), [(1, "ready")]);
    }

    #[test]
    fn exec_failure_is_reported_and_nothing_is_signalled() {
        let mut h = Harness::serving();
        h.reload(Some(1));
        let actions = h.on(Event::SpawnFailed {
            generation: 2,
            error: "exec failed: ENOENT".into(),
        });
        assert_eq!(
            done(&actions, 1),
            Some(&Outcome::Failed {
                generation: 2,
                reason: Failure::SpawnFailed("exec failed: ENOENT".into())
            })
        );
        assert!(!actions
            .iter()
            .any(|a| matches!(a, Action::Signal { .. } | Action::Kill { .. })));
        assert_eq!(h.states(), [(1, "ready")]);
    }

    #[test]
    fn reloads_during_a_deploy_coalesce_into_one_follow_up() {
        let mut h = Harness::serving();
        h.reload(Some(1));
        h.on(Event::Spawned {
            generation: 2,
            pid: pid(200),
            contained: false,
        });
        for waiter in [2, 3] {
            let actions = h.reload(Some(waiter));
            assert_eq!(
                actions,
                [Action::Progress {
                    waiter,
                    progress: Progress::Queued
                }]
            );
        }
        h.reload(None); // a SIGHUP joins the same follow-up
        assert!(h.s.status(h.now).queued);
        let actions = h.on(ready(200));
        assert!(done(&actions, 1).unwrap().succeeded());
        assert_eq!(done(&actions, 2), None);
        assert_eq!(spawns(&actions), [3], "exactly one follow-up deploy");
        h.on(Event::Spawned {
            generation: 3,
            pid: pid(300),
            contained: false,
        });
        let actions = h.on(ready(300));
        assert!(done(&actions, 2).unwrap().succeeded());
        assert!(done(&actions, 3).unwrap().succeeded());
        assert!(spawns(&actions).is_empty());
        assert_eq!(h.states(), [(3, "ready"), (1, "draining"), (2, "draining")]);
    }

    #[test]
    fn stop_during_deploy_drains_everything_then_exits() {
        let mut h = Harness::serving();
        h.reload(Some(1));
        h.on(Event::Spawned {
            generation: 2,
            pid: pid(200),
            contained: false,
        });
        let actions = h.on(Event::Stop { fast: false });
        assert_eq!(actions[0], Action::Upstream(Upstream::Stopping));
        assert!(actions.contains(&term(100)) && actions.contains(&term(200)));
        assert_eq!(done(&actions, 1), Some(&Outcome::Cancelled));
        // A reload while stopping is refused.
        let actions = h.reload(Some(2));
        assert_eq!(done(&actions, 2), Some(&Outcome::Cancelled));
        assert!(!h.on(exited(100, 0)).contains(&Action::Exit(0)));
        assert_eq!(h.on(exited(200, 0)), [cleanup(200), Action::Exit(0)]);
    }

    /// Generation 1 as pid 100 in a cgroup of its own, ready.
    fn serving_contained() -> Harness {
        let (mut h, _) = Harness::with(BASE);
        h.on(Event::Spawned {
            generation: 1,
            pid: pid(100),
            contained: true,
        });
        h.on(ready(100));
        h.take_notices();
        h
    }

    /// Issue 8: with cgroups, a generation is gone only when its cgroup is
    /// empty: what its main process left behind (a setsid'd grandchild)
    /// keeps `stop` waiting until the cgroup's kill has emptied it.
    #[test]
    fn contained_generation_is_gone_when_its_cgroup_is_empty() {
        let mut h = serving_contained();
        h.on(Event::Stop { fast: false });
        // The main process exits; its leftovers are killed, not yet gone.
        assert_eq!(h.on(exited(100, 0)), [cleanup(100)]);
        assert_eq!(h.s.next_deadline(), Some(h.t0 + KILL_GRACE));
        assert!(h.at(ms(10)).on(Event::Tick).is_empty());
        h.take_notices();
        assert_eq!(h.on(Event::Emptied { generation: 1 }), [Action::Exit(0)]);
        assert_eq!(
            h.take_notices(),
            [Notice::Gone { generation: 1 }, Notice::AllExited]
        );
    }

    /// The cgroup may empty before the main process (a zombie) is reaped.
    #[test]
    fn cgroup_emptied_before_the_exit_is_reaped() {
        let mut h = serving_contained();
        h.on(Event::Stop { fast: false });
        h.take_notices();
        assert!(h.on(Event::Emptied { generation: 1 }).is_empty());
        assert_eq!(h.on(exited(100, 0)), [cleanup(100), Action::Exit(0)]);
        assert_eq!(
            h.take_notices(),
            [
                Notice::Exited {
                    generation: 1,
                    pid: 100,
                    status: ExitStatus::Code(0)
                },
                Notice::Gone { generation: 1 },
                Notice::AllExited
            ]
        );
    }

    /// A cgroup that never empties (a process stuck in the kernel) is given
    /// up on after the grace: stop always finishes.
    #[test]
    fn stop_finishes_when_a_cgroup_never_empties() {
        let mut h = serving_contained();
        h.on(Event::Stop { fast: true });
        h.on(Event::Exited {
            pid: pid(100),
            status: ExitStatus::Signal(Signal::SIGKILL),
        });
        h.take_notices();
        assert_eq!(h.at(KILL_GRACE).on(Event::Tick), [Action::Exit(0)]);
        assert_eq!(
            h.take_notices(),
            [
                Notice::GivenUp {
                    generation: 1,
                    pid: None,
                    waited: KILL_GRACE,
                    lingering: Vec::new()
                },
                Notice::AllExited
            ]
        );
    }

    /// A crashed or failed contained generation is cleaned up beside the
    /// next one, which does not wait for it.
    #[test]
    fn crash_of_a_contained_generation_restarts_at_once() {
        let mut h = serving_contained();
        assert_eq!(
            h.on(exited(100, 1)),
            [
                cleanup(100),
                Action::Upstream(Upstream::Status(
                    "generation 1 exited with code 1; restarting".into()
                ))
            ]
        );
        let restart = h.s.next_deadline().unwrap();
        assert!(restart < h.t0 + KILL_GRACE);
        assert_eq!(spawns(&h.at(restart - h.t0).on(Event::Tick)), [2]);
        h.on(Event::Emptied { generation: 1 });
        assert!(h.take_notices().contains(&Notice::Gone { generation: 1 }));
    }

    #[test]
    fn fast_stop_kills_every_group() {
        let mut h = Harness::serving();
        let actions = h.on(Event::Stop { fast: true });
        assert!(actions.contains(&kill(100)));
        let actions = h.on(Event::Exited {
            pid: pid(100),
            status: ExitStatus::Signal(Signal::SIGKILL),
        });
        assert_eq!(actions.last(), Some(&Action::Exit(0)));
    }

    #[test]
    fn graceful_stop_escalates_to_fast_on_second_request() {
        let mut h = Harness::serving();
        h.on(Event::Stop { fast: false });
        assert!(h.on(Event::Stop { fast: false }).is_empty());
        assert_eq!(h.on(Event::Stop { fast: true }), [kill(100)]);
    }

    #[test]
    fn drain_timeout_kills_the_old_generation() {
        let mut h = Harness::serving();
        h.reload(None);
        h.on(Event::Spawned {
            generation: 2,
            pid: pid(200),
            contained: false,
        });
        h.at(ms(500)).on(ready(200));
        assert_eq!(h.s.next_deadline(), Some(h.t0 + ms(10_500)));
        assert_eq!(h.at(ms(10_500)).on(Event::Tick), [kill(100)]);
        assert_eq!(h.states(), [(2, "ready"), (1, "draining")]);
        // Killed, it is not killed again; it is waited for, within limits.
        assert_eq!(h.s.next_deadline(), Some(h.t0 + ms(15_500)));
        assert!(h.at(ms(15_000)).on(Event::Tick).is_empty());
        assert_eq!(h.states(), [(2, "ready"), (1, "draining")]);
    }

    /// Issue 8: a process that survives SIGKILL's delivery (stuck in the
    /// kernel) kept `baton stop` waiting forever.
    #[test]
    fn stop_finishes_even_when_a_killed_process_lingers() {
        let mut h = Harness::serving();
        assert!(h.on(Event::Stop { fast: true }).contains(&kill(100)));
        h.take_notices();
        assert_eq!(h.s.next_deadline(), Some(h.t0 + KILL_GRACE));
        let actions = h.at(KILL_GRACE).on(Event::Tick);
        assert_eq!(actions, [Action::Exit(0)]);
        assert_eq!(
            h.take_notices(),
            [
                Notice::GivenUp {
                    generation: 1,
                    pid: Some(100),
                    waited: KILL_GRACE,
                    lingering: Vec::new()
                },
                Notice::AllExited
            ]
        );
    }

    #[test]
    fn crash_outside_a_deploy_restarts_with_growing_capped_backoff() {
        let mut h = Harness::serving();
        let actions = h.at(ms(10)).on(exited(100, 1));
        assert!(actions.contains(&cleanup(100)));
        assert!(h.states().is_empty());
        let mut expected = ms(100);
        let mut last_pid = 100;
        for round in 0..6u64 {
            let wait = h.s.next_deadline().unwrap() - h.now;
            assert!(
                wait >= expected / 2 && wait <= expected,
                "round {round}: {wait:?} vs {expected:?}"
            );
            let at = h.now - h.t0 + wait;
            let actions = h.at(at).on(Event::Tick);
            let generation = 2 + round;
            assert_eq!(spawns(&actions), [generation]);
            last_pid += 100;
            h.on(Event::Spawned {
                generation,
                pid: pid(last_pid),
                contained: false,
            });
            // It crashes again before becoming ready.
            h.on(exited(last_pid, 1));
            expected = (expected * 2).min(ms(1000));
        }
        // Once one comes up and stays up, the backoff resets.
        let at = h.s.next_deadline().unwrap() - h.t0;
        h.at(at).on(Event::Tick);
        h.on(Event::Spawned {
            generation: 8,
            pid: pid(800),
            contained: false,
        });
        let actions = h.on(ready(800));
        assert!(actions.contains(&Action::Upstream(Upstream::Status(
            "generation 8 serving".into()
        ))));
        h.at(at + ms(5000)).on(exited(800, 1));
        let wait = h.s.next_deadline().unwrap() - h.now;
        assert!(wait <= ms(100), "{wait:?}");
    }

    #[test]
    fn reload_during_restart_backoff_deploys_at_once() {
        let mut h = Harness::serving();
        h.on(exited(100, 1));
        let actions = h.reload(Some(1));
        assert_eq!(spawns(&actions), [2]);
        h.on(Event::Spawned {
            generation: 2,
            pid: pid(200),
            contained: false,
        });
        let actions = h.on(ready(200));
        assert!(done(&actions, 1).unwrap().succeeded());
        assert!(h.s.next_deadline().is_none());
    }

    #[test]
    fn failed_first_generation_is_retried() {
        let (mut h, _) = Harness::with(BASE);
        h.on(Event::SpawnFailed {
            generation: 1,
            error: "exec failed: ENOENT".into(),
        });
        assert!(h.s.next_deadline().is_some());
        let at = h.s.next_deadline().unwrap() - h.t0;
        assert_eq!(spawns(&h.at(at).on(Event::Tick)), [2]);
    }

    #[test]
    fn no_ready_upstream_before_anything_served() {
        let (mut h, _) = Harness::with(BASE);
        h.on(exited(100, 1)); // unknown pid: ignored
        h.on(Event::SpawnFailed {
            generation: 1,
            error: "exec failed".into(),
        });
        let actions = h.reload(Some(1));
        assert!(
            !actions.contains(&Action::Upstream(Upstream::Reloading)),
            "{actions:?}"
        );
        h.on(Event::Spawned {
            generation: 2,
            pid: pid(200),
            contained: false,
        });
        let actions = h.on(exited(200, 3));
        assert!(
            !actions.iter().any(|a| matches!(
                a,
                Action::Upstream(Upstream::Reloaded { .. } | Upstream::Ready { .. })
            )),
            "{actions:?}"
        );
        assert!(
            !h.upstream
                .iter()
                .any(|u| matches!(u, Upstream::Ready { .. } | Upstream::Reloaded { .. })),
            "{:?}",
            h.upstream
        );
    }

    #[test]
    fn notify_from_an_unsupervised_pid_is_ignored() {
        let mut h = Harness::serving();
        h.reload(Some(1));
        h.on(Event::Spawned {
            generation: 2,
            pid: pid(200),
            contained: false,
        });
        h.take_notices();
        assert!(h.on(ready(999)).is_empty());
        assert_eq!(h.states(), [(1, "ready"), (2, "starting")]);
        assert_eq!(
            h.take_notices(),
            [Notice::ForeignNotify {
                pid: 999,
                ready: true
            }]
        );
    }

    /// Issue 8: `READY=1\nMAINPID=<its own pid>` warned on every deploy.
    #[test]
    fn mainpid_naming_the_sender_itself_is_not_a_warning() {
        let mut h = Harness::serving();
        h.take_notices();
        let notify = |text: &[u8]| Event::Notify {
            pid: pid(100),
            group: None,
            cgroup: None,
            message: Message::parse(text),
        };
        h.on(notify(b"MAINPID=100"));
        assert_eq!(h.take_notices(), []);
        h.on(notify(b"MAINPID=4242"));
        assert_eq!(
            h.take_notices(),
            [Notice::MainPidIgnored {
                generation: 1,
                pid: 100
            }]
        );
    }

    /// Issue 7: a refused reload was announced by the shell with an
    /// unconditional RELOADING=1/READY=1, so with a slow first boot systemd
    /// heard READY=1 before anything served.
    #[test]
    fn refused_reload_before_first_ready_tells_systemd_nothing() {
        let (mut h, _) = Harness::with(BASE);
        h.on(Event::Spawned {
            generation: 1,
            pid: pid(100),
            contained: false,
        });
        let actions = h.on(Event::Reload {
            config: Err("app.toml:3:1: bad".into()),
            waiter: Some(Waiter {
                id: 7,
                follows: true,
            }),
            release: Release::Current,
        });
        assert_eq!(
            actions,
            [progress(
                7,
                Progress::Refused("reload refused, nothing changed: app.toml:3:1: bad".into())
            )]
        );
        assert!(h.upstream.is_empty(), "{:?}", h.upstream);
        assert_eq!(h.states(), [(1, "starting")]);

        // Once serving, systemd (Type=notify-reload) hears the reload end.
        h.on(ready(100));
        let actions = h.on(Event::Reload {
            config: Err("app.toml:3:1: bad".into()),
            waiter: None,
            release: Release::Current,
        });
        assert_eq!(
            actions,
            [
                Action::Upstream(Upstream::Reloading),
                Action::Upstream(Upstream::Reloaded {
                    status: "reload refused, nothing changed: app.toml:3:1: bad".into()
                })
            ]
        );
        assert!(h.take_notices().contains(&Notice::ReloadRefused {
            reason: "app.toml:3:1: bad".into()
        }));
        assert_eq!(h.states(), [(1, "ready")]);
    }

    #[test]
    fn changed_listeners_are_deployed_changed_control_is_deferred() {
        let listen = "[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:8080\"\n";
        let (mut h, _) = Harness::with(&format!("{listen}{BASE}"));
        up(&mut h, 1);
        // Issue 10: a changed [[listen]] is a deploy like any other (the
        // shell has opened the new sockets before the file reaches here).
        let moved = config(&format!("{}{BASE}", listen.replace("8080", "8081")));
        let actions = h.on(Event::Reload {
            config: Ok(moved),
            waiter: None,
            release: Release::Current,
        });
        assert_eq!(spawns(&actions), [2]);
        up(&mut h, 2);
        let control = config(&format!(
            "{listen}{BASE}[control]\nsocket = \"/run/other.sock\"\n"
        ));
        let actions = h.on(Event::Reload {
            config: Ok(control),
            waiter: None,
            release: Release::Current,
        });
        assert_eq!(spawns(&actions), [3]);
        assert!(h.take_notices().contains(&Notice::ControlChangeDeferred));
    }

    #[test]
    fn reload_without_wait_hears_only_that_it_was_accepted() {
        let mut h = Harness::serving();
        let actions = h.on(Event::Reload {
            config: Ok(h.config.clone()),
            waiter: Some(Waiter {
                id: 3,
                follows: false,
            }),
            release: Release::Current,
        });
        assert_eq!(actions[0], progress(3, Progress::Accepted));
        assert_eq!(spawns(&actions), [2]);
        h.on(Event::Spawned {
            generation: 2,
            pid: pid(200),
            contained: false,
        });
        let actions = h.on(ready(200));
        assert!(
            !actions.iter().any(|a| matches!(a, Action::Progress { .. })),
            "{actions:?}"
        );
    }

    #[test]
    fn a_deploy_tells_its_story_in_typed_notices() {
        let mut h = Harness::serving();
        h.take_notices();
        h.at(ms(1000)).reload(None);
        h.on(Event::Spawned {
            generation: 2,
            pid: pid(200),
            contained: false,
        });
        h.at(ms(1300)).on(ready(200));
        h.at(ms(1350)).on(exited(100, 0));
        let ready = ms(300);
        assert_eq!(
            h.take_notices(),
            [
                Notice::Starting {
                    generation: 2,
                    cause: Cause::Deploy,
                    version: None,
                },
                Notice::Started {
                    generation: 2,
                    pid: 200
                },
                Notice::Ready {
                    generation: 2,
                    after: ready
                },
                Notice::Draining {
                    generation: 1,
                    pid: 100,
                    signal: "SIGTERM".into()
                },
                Notice::DeployFinished {
                    outcome: Outcome::Succeeded {
                        generation: 2,
                        ready_after: ready
                    },
                    took: ready
                },
                Notice::Exited {
                    generation: 1,
                    pid: 100,
                    status: ExitStatus::Code(0)
                },
                Notice::DeploySummary(Summary {
                    generation: 2,
                    ok: true,
                    ready: Some(ready),
                    drained: Some(Drained {
                        generation: 1,
                        after: ms(50),
                        status: ExitStatus::Code(0)
                    }),
                    reason: None,
                    took: ms(350),
                }),
            ]
        );
    }

    #[test]
    fn delay_readiness_promotes_after_the_delay() {
        let text = format!("{BASE}\n").replace(
            "timeout = \"5s\"",
            "check = \"delay\"\ndelay = \"1s\"\ntimeout = \"5s\"",
        );
        let (mut h, _) = Harness::with(&text);
        h.on(Event::Spawned {
            generation: 1,
            pid: pid(100),
            contained: false,
        });
        assert_eq!(h.s.next_deadline(), Some(h.t0 + ms(1000)));
        let actions = h.at(ms(1000)).on(Event::Tick);
        assert!(matches!(
            actions[0],
            Action::Upstream(Upstream::Ready { .. })
        ));
        assert_eq!(h.states(), [(1, "ready")]);
    }

    /// `BASE` with a `[health]` table.
    fn with_health(health: &str) -> String {
        format!("{BASE}\n[health]\n{health}\n")
    }

    /// Generation 1 (pid 100) serving under `text`, and a deploy (waiter 1)
    /// whose candidate 2 (pid 200) is ready at 500 ms.
    fn deploy_ready_at_500ms(text: &str) -> (Harness, Vec<Action>) {
        let (mut h, _) = Harness::with(text);
        h.on(Event::Spawned {
            generation: 1,
            pid: pid(100),
            contained: false,
        });
        h.on(ready(100));
        h.reload(Some(1));
        h.on(Event::Spawned {
            generation: 2,
            pid: pid(200),
            contained: false,
        });
        h.take_notices();
        let actions = h.at(ms(500)).on(ready(200));
        (h, actions)
    }

    fn probes(actions: &[Action]) -> Vec<u64> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Probe { generation, .. } => Some(*generation),
                _ => None,
            })
            .collect()
    }

    fn failed(p: u64, detail: &str) -> Event {
        Event::Probed {
            generation: p,
            ok: false,
            detail: detail.into(),
        }
    }

    /// Issue 9: on probation the old generation serves beside the new one
    /// and is drained only when the probation is over.
    #[test]
    fn probation_keeps_the_old_generation_serving_until_it_passes() {
        let (mut h, actions) = deploy_ready_at_500ms(&with_health("probation = \"10s\""));
        assert!(!actions.contains(&term(100)), "{actions:?}");
        assert_eq!(done(&actions, 1), None);
        assert_eq!(h.states(), [(1, "ready"), (2, "probation")]);
        assert_eq!(
            h.take_notices(),
            [
                Notice::Ready {
                    generation: 2,
                    after: ms(500)
                },
                Notice::Probation {
                    generation: 2,
                    beside: 1,
                    probation: ms(10_000)
                }
            ]
        );
        let status = h.s.status(h.t0 + ms(2500));
        assert_eq!(status.generations[1].probation_left, Some(ms(8000)));
        // A reload meanwhile waits for the deploy, probation included.
        h.reload(Some(2));
        assert_eq!(h.s.next_deadline(), Some(h.t0 + ms(10_500)));
        let actions = h.at(ms(10_500)).on(Event::Tick);
        assert!(actions.contains(&term(100)));
        assert_eq!(
            done(&actions, 1),
            Some(&Outcome::Succeeded {
                generation: 2,
                ready_after: ms(500)
            })
        );
        assert_eq!(spawns(&actions), [3], "the queued reload follows");
    }

    /// Issue 9: a release that says READY=1 and then dies was promoted and
    /// the old generation drained: an outage. On probation the deploy is
    /// cancelled and the old one simply goes on serving.
    #[test]
    fn exit_during_probation_cancels_the_deploy() {
        let (mut h, _) = deploy_ready_at_500ms(&with_health("probation = \"10s\""));
        let actions = h.at(ms(1500)).on(exited(200, 3));
        assert!(actions.contains(&cleanup(200)));
        assert!(!actions.contains(&term(100)));
        assert_eq!(
            done(&actions, 1),
            Some(&Outcome::Failed {
                generation: 2,
                reason: Failure::ExitedInProbation(ExitStatus::Code(3))
            })
        );
        assert_eq!(
            done(&actions, 1).unwrap().to_string(),
            "generation 2 failed: exited with code 3 during probation"
        );
        assert_eq!(h.states(), [(1, "ready")]);
        assert!(spawns(&actions).is_empty(), "no restart: 1 serves");
        assert_eq!(h.s.next_deadline(), None);
    }

    /// Issue 9: failed health checks during probation cancel the deploy;
    /// meanwhile only the candidate is probed (the probes reach the
    /// service address, and failures are blamed on the new generation).
    #[test]
    fn failing_health_checks_during_probation_cancel_it() {
        let health = "check = \"http\"\nurl = \"http://127.0.0.1:8080/healthz\"\n\
                      failures = 2\ninterval = \"1s\"\nprobation = \"10s\"";
        let (mut h, actions) = deploy_ready_at_500ms(&with_health(health));
        assert!(probes(&actions).is_empty());
        assert_eq!(h.s.next_deadline(), Some(h.t0 + ms(500)));
        assert_eq!(probes(&h.on(Event::Tick)), [2]);
        // In flight: no second probe until the answer.
        assert!(probes(&h.on(Event::Tick)).is_empty());
        assert!(h
            .at(ms(600))
            .on(failed(2, "GET /healthz: HTTP 500"))
            .is_empty());
        assert_eq!(h.s.next_deadline(), Some(h.t0 + ms(1600)));
        assert_eq!(probes(&h.at(ms(1600)).on(Event::Tick)), [2]);
        let actions = h.at(ms(1700)).on(failed(2, "GET /healthz: HTTP 500"));
        assert!(actions.contains(&term(200)), "drained: it served");
        assert!(!actions.contains(&term(100)));
        let outcome = done(&actions, 1).unwrap();
        assert_eq!(
            outcome.to_string(),
            "generation 2 failed: health check failed 2 times during probation: \
             GET /healthz: HTTP 500"
        );
        assert_eq!(h.states(), [(1, "ready"), (2, "draining")]);
        // The serving generation's own probes go on.
        assert_eq!(probes(&h.at(ms(1700)).on(Event::Tick)), [1]);
    }

    /// Issue 9: a current generation that stops passing its health checks
    /// (wedged, not crashed) is replaced through the usual handoff.
    #[test]
    fn wedged_current_generation_is_replaced() {
        let health = "check = \"tcp\"\naddress = \"127.0.0.1:8080\"\nfailures = 2\n\
                      interval = \"1s\"";
        let (mut h, _) = Harness::with(&with_health(health));
        h.on(Event::Spawned {
            generation: 1,
            pid: pid(100),
            contained: false,
        });
        h.on(ready(100));
        assert_eq!(probes(&h.on(Event::Tick)), [1]);
        h.on(Event::Probed {
            generation: 1,
            ok: true,
            detail: String::new(),
        });
        assert_eq!(probes(&h.at(ms(1000)).on(Event::Tick)), [1]);
        h.on(failed(1, "connect to 127.0.0.1:8080: timed out"));
        assert_eq!(probes(&h.at(ms(2000)).on(Event::Tick)), [1]);
        h.take_notices();
        let actions = h.on(failed(1, "connect to 127.0.0.1:8080: timed out"));
        assert_eq!(spawns(&actions), [2]);
        let notices = h.take_notices();
        assert!(notices.contains(&Notice::Starting {
            generation: 2,
            cause: Cause::Replace,
            version: None,
        }));
        assert!(matches!(
            notices[1],
            Notice::Replacing {
                generation: 1,
                failures: 2,
                ..
            }
        ));
        h.on(Event::Spawned {
            generation: 2,
            pid: pid(200),
            contained: false,
        });
        let actions = h.at(ms(2500)).on(ready(200));
        assert!(actions.contains(&term(100)));
        assert_eq!(h.states(), [(2, "ready"), (1, "draining")]);
        assert_eq!(h.s.status(h.now).replaced, 1);
    }

    /// Issue 9: `check = "exec"` asks the shell to run the check each
    /// interval until it passes; READY=1 does not count then.
    #[test]
    fn exec_readiness_is_checked_each_interval() {
        let text = BASE.replace(
            "timeout = \"5s\"",
            "check = \"exec\"\ncommand = [\"/bin/ready\"]\ninterval = \"200ms\"\ntimeout = \"5s\"",
        );
        let (mut h, _) = Harness::with(&text);
        h.on(Event::Spawned {
            generation: 1,
            pid: pid(100),
            contained: false,
        });
        let check = |actions: &[Action]| {
            actions
                .iter()
                .any(|a| matches!(a, Action::CheckReady { generation: 1, .. }))
        };
        assert!(check(&h.on(Event::Tick)));
        assert!(h.on(ready(100)).is_empty(), "READY=1 is not the check");
        h.on(Event::ReadyCheck {
            generation: 1,
            ok: false,
        });
        assert_eq!(h.s.next_deadline(), Some(h.t0 + ms(200)));
        assert!(check(&h.at(ms(200)).on(Event::Tick)));
        let actions = h.at(ms(250)).on(Event::ReadyCheck {
            generation: 1,
            ok: true,
        });
        assert!(matches!(
            actions[0],
            Action::Upstream(Upstream::Ready { .. })
        ));
        assert_eq!(h.states(), [(1, "ready")]);
    }

    /// Issue 9: a wrapper's `systemd-notify --ready` (another pid of the
    /// candidate's process group) makes it ready; a stranger's does not.
    #[test]
    fn ready_from_a_process_of_the_group_counts() {
        let (mut h, _) = Harness::with(BASE);
        h.on(Event::Spawned {
            generation: 1,
            pid: pid(100),
            contained: false,
        });
        let from = |group: Option<Pid>| Event::Notify {
            pid: pid(555),
            group,
            cgroup: None,
            message: Message::parse(b"READY=1"),
        };
        h.on(from(Some(pid(999))));
        assert_eq!(h.states(), [(1, "starting")]);
        h.on(from(Some(pid(100))));
        assert_eq!(h.states(), [(1, "ready")]);
    }

    /// `BASE` whose command names its release.
    const RELEASED: &str = r#"
[app]
command = ["/opt/app/releases/{version}/bin/server"]
env = { APP_VERSION = "{version}" }
[readiness]
timeout = "5s"
[drain]
timeout = "10s"
[restart]
backoff_initial = "100ms"
backoff_max = "1s"
"#;

    fn release(h: &mut Harness, release: Release, waiter: WaiterId) -> Vec<Action> {
        let config = Ok(h.config.clone());
        let waiter = Some(Waiter {
            id: waiter,
            follows: true,
        });
        h.on(Event::Reload {
            config,
            waiter,
            release,
        })
    }

    fn spawned_command(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .find_map(|a| match a {
                Action::Spawn { config, .. } => Some(config.app.command.clone()),
                _ => None,
            })
            .unwrap_or_default()
    }

    /// Generation `n` (pid n*100) spawned and ready.
    fn up(h: &mut Harness, n: u64) -> Vec<Action> {
        h.on(Event::Spawned {
            generation: n,
            pid: pid(n as i32 * 100),
            contained: false,
        });
        h.on(ready(n as i32 * 100))
    }

    /// Issue 9: releases. `deploy VERSION` fills `{version}`; `rollback`
    /// goes back to the one that served before; a restart keeps the
    /// serving release; the history hears every deploy.
    #[test]
    fn deploy_rollback_and_restart_keep_track_of_releases() {
        let releases = Releases {
            current: Some("1".into()),
            served: vec!["1".into()],
        };
        let (mut h, actions) = Harness::with_releases(RELEASED, releases);
        assert_eq!(
            spawned_command(&actions),
            ["/opt/app/releases/1/bin/server"]
        );
        up(&mut h, 1);
        let actions = release(&mut h, Release::Version("2".into()), 1);
        assert_eq!(
            spawned_command(&actions),
            ["/opt/app/releases/2/bin/server"]
        );
        let spawn_env = actions.iter().find_map(|a| match a {
            Action::Spawn { config, .. } => Some(config.app.env.clone()),
            _ => None,
        });
        let env = spawn_env.unwrap();
        assert_eq!(
            (env["APP_VERSION"].as_str(), env["BATON_VERSION"].as_str()),
            ("2", "2")
        );
        up(&mut h, 2);
        // 3 is broken: its exec fails, 2 keeps serving.
        release(&mut h, Release::Version("3".into()), 2);
        h.on(Event::SpawnFailed {
            generation: 3,
            error: "exec failed: ENOENT".into(),
        });
        let actions = release(
            &mut h,
            Release::Rollback {
                to: None,
                with_hooks: false,
            },
            3,
        );
        assert_eq!(
            spawned_command(&actions),
            ["/opt/app/releases/1/bin/server"]
        );
        up(&mut h, 4);
        type Row<'a> = (u64, Option<&'a str>, bool, bool, Option<&'a str>);
        let summary: Vec<Row> = h
            .records
            .iter()
            .map(|(r, current)| {
                (
                    r.generation,
                    r.version.as_deref(),
                    r.outcome.succeeded(),
                    r.rollback,
                    current.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (1, Some("1"), true, false, Some("1")),
                (2, Some("2"), true, false, Some("2")),
                (3, Some("3"), false, false, Some("2")),
                (4, Some("1"), true, true, Some("1")),
            ]
        );
        // Rolling back again goes to 2, the one before 1's return.
        let actions = release(
            &mut h,
            Release::Rollback {
                to: None,
                with_hooks: false,
            },
            4,
        );
        assert_eq!(
            spawned_command(&actions),
            ["/opt/app/releases/2/bin/server"]
        );
        up(&mut h, 5);
        // A crash restarts the serving release, and is not a deploy.
        h.at(ms(100)).on(exited(500, 1));
        let wait = h.s.next_deadline().unwrap();
        let actions = h.at(wait - h.t0).on(Event::Tick);
        assert_eq!(
            spawned_command(&actions),
            ["/opt/app/releases/2/bin/server"]
        );
        up(&mut h, 6);
        assert_eq!(h.records.len(), 5);
    }

    /// Issue 9: a file with `{version}` and no release named is refused,
    /// and so is a rollback with nothing to go back to.
    #[test]
    fn missing_release_or_rollback_target_is_refused() {
        let releases = Releases {
            current: Some("7".into()),
            served: vec!["7".into()],
        };
        let (mut h, _) = Harness::with_releases(RELEASED, releases);
        let t0 = h.t0;
        up(&mut h, 1);
        let actions = release(
            &mut h,
            Release::Rollback {
                to: None,
                with_hooks: false,
            },
            1,
        );
        let refused = actions.iter().find_map(|a| match a {
            Action::Progress {
                progress: Progress::Refused(why),
                ..
            } => Some(why.clone()),
            _ => None,
        });
        let refused = refused.unwrap();
        assert!(
            refused.contains("nothing to roll back to: no release other than 7 has served"),
            "{refused}"
        );
        assert!(spawns(&actions).is_empty());
        // Without history and without [app] version: no release at all.
        let (mut s, actions) = Supervisor::new(h.config.clone(), Releases::default(), t0, 1);
        assert_eq!(
            spawned_command(&actions),
            ["/opt/app/releases/{version}/bin/server"]
        );
        let refused = s.handle(
            Event::Reload {
                config: Ok(h.config.clone()),
                waiter: None,
                release: Release::Current,
            },
            t0,
        );
        assert!(refused.iter().any(|a| matches!(
            a,
            Action::Notice(Notice::ReloadRefused { reason }) if reason.contains("{version} needs a release")
        )));
    }

    /// Issue 9: `[deploy] before` runs first; the candidate starts only if
    /// it passes, and its failure (with its output) fails the deploy with
    /// nothing started. A rollback skips it unless asked; `after` runs once
    /// the new generation has taken over.
    #[test]
    fn before_and_after_hooks() {
        let text =
            format!("{BASE}\n[deploy]\nbefore = [\"/bin/migrate\"]\nafter = [\"/bin/announce\"]\n");
        let (mut h, _) = Harness::with(&text);
        up(&mut h, 1);
        let hooks = |actions: &[Action]| -> Vec<(u64, Hook)> {
            actions
                .iter()
                .filter_map(|a| match a {
                    Action::RunHook {
                        generation, hook, ..
                    } => Some((*generation, *hook)),
                    _ => None,
                })
                .collect()
        };
        let actions = h.reload(Some(1));
        assert_eq!(hooks(&actions), [(2, Hook::Before)]);
        assert!(
            spawns(&actions).is_empty(),
            "nothing starts before the hook"
        );
        assert_eq!(h.states()[1], (2, "preparing"));
        let actions = h.at(ms(300)).on(Event::HookDone {
            generation: 2,
            hook: Hook::Before,
            ok: true,
            output: String::new(),
        });
        assert_eq!(spawns(&actions), [2]);
        h.on(Event::Spawned {
            generation: 2,
            pid: pid(200),
            contained: false,
        });
        let actions = h.at(ms(500)).on(ready(200));
        assert_eq!(hooks(&actions), [(2, Hook::After)]);
        let ready = h.take_notices().into_iter().find_map(|n| match n {
            Notice::Ready {
                generation: 2,
                after,
            } => Some(after),
            _ => None,
        });
        assert_eq!(ready, Some(ms(200)), "timed from its start, after the hook");
        // A failing before hook: nothing started, its output is the reason.
        let actions = h.reload(Some(2));
        let actions = [
            actions,
            h.on(Event::HookDone {
                generation: 3,
                hook: Hook::Before,
                ok: false,
                output: "`/bin/migrate` exited with code 1; its last lines:\nno such table".into(),
            }),
        ]
        .concat();
        assert!(spawns(&actions).is_empty());
        assert_eq!(
            done(&actions, 2).unwrap().to_string(),
            "generation 3 failed: [deploy] before failed, nothing was started: `/bin/migrate` \
             exited with code 1; its last lines:\nno such table"
        );
        assert_eq!(h.states(), [(2, "ready"), (1, "draining")]);
        // A rollback does not run it, unless asked.
        let config = Ok(h.config.clone());
        let actions = h.on(Event::Reload {
            config,
            waiter: None,
            release: Release::Rollback {
                to: Some("x".into()),
                with_hooks: false,
            },
        });
        assert!(hooks(&actions).is_empty());
        assert_eq!(spawns(&actions), [4]);
    }

    /// Review of issue 9: a reload queued behind `deploy 2` redeploys 2
    /// (the release is chosen when the queued deploy starts), and a second
    /// release named while one is queued cancels the first one's waiter.
    #[test]
    fn queued_deploys_choose_their_release_when_they_start() {
        let releases = Releases {
            current: Some("1".into()),
            served: vec!["1".into()],
        };
        let (mut h, _) = Harness::with_releases(RELEASED, releases);
        up(&mut h, 1);
        release(&mut h, Release::Version("2".into()), 1);
        let queued = release(&mut h, Release::Current, 2);
        assert!(spawns(&queued).is_empty());
        let actions = up(&mut h, 2);
        assert_eq!(
            spawned_command(&actions),
            ["/opt/app/releases/2/bin/server"]
        );
        // While 4 runs, 5 is queued, then 6 replaces it: 5's waiter hears
        // it was cancelled, 6 is what follows.
        up(&mut h, 3);
        release(&mut h, Release::Version("4".into()), 4);
        release(&mut h, Release::Version("5".into()), 5);
        let actions = release(&mut h, Release::Version("6".into()), 6);
        assert_eq!(done(&actions, 5), Some(&Outcome::Cancelled));
        let actions = up(&mut h, 4);
        assert_eq!(
            spawned_command(&actions),
            ["/opt/app/releases/6/bin/server"]
        );
    }

    /// Review of issue 9: the serving generation crashing while a deploy
    /// waits for its before hook left nothing serving for as long as the
    /// hook took. That deploy is cancelled and the serving release restarts.
    #[test]
    fn crash_during_a_before_hook_restarts_the_serving_release() {
        let text = format!("{BASE}\n[deploy]\nbefore = [\"/bin/migrate\"]\n");
        let (mut h, _) = Harness::with(&text);
        up(&mut h, 1);
        h.reload(Some(1));
        assert_eq!(h.states()[1], (2, "preparing"));
        let actions = h.at(ms(100)).on(exited(100, 1));
        let outcome = done(&actions, 1).unwrap().to_string();
        assert!(
            outcome.contains("the serving generation crashed while it ran"),
            "{outcome}"
        );
        let restart = h.s.next_deadline().unwrap();
        assert!(
            restart < h.t0 + ms(1100),
            "a restart, not the hook's 5 minutes"
        );
        assert_eq!(spawns(&h.at(restart - h.t0).on(Event::Tick)), [3]);
        // The hook's late answer is ignored.
        assert!(h
            .on(Event::HookDone {
                generation: 2,
                hook: Hook::Before,
                ok: true,
                output: String::new(),
            })
            .is_empty());
    }

    /// Review of issue 9: a health check that never passed (a wrong URL)
    /// replaced the generation over and over. It is reported, not acted on.
    #[test]
    fn a_check_that_never_passed_replaces_nothing() {
        let health = "check = \"tcp\"\naddress = \"127.0.0.1:1\"\nfailures = 2";
        let (mut h, _) = Harness::with(&with_health(health));
        up(&mut h, 1);
        for round in 0..4u64 {
            assert_eq!(probes(&h.at(ms(1000 * round)).on(Event::Tick)), [1]);
            let actions = h.on(failed(1, "connect to 127.0.0.1:1: refused"));
            assert!(spawns(&actions).is_empty());
        }
        let never = h
            .take_notices()
            .into_iter()
            .filter(|n| matches!(n, Notice::HealthNeverPassed { generation: 1, .. }))
            .count();
        assert_eq!(never, 1, "said once");
        assert_eq!(h.s.status(h.now).replaced, 0);
    }

    /// Issue 8: deadlines past what `Instant` holds aborted the daemon.
    /// The config bounds durations; the core must not panic regardless.
    #[test]
    fn huge_waits_do_not_panic() {
        let mut text = (*config(BASE)).clone();
        text.drain.timeout = Duration::MAX;
        text.readiness.timeout = Duration::MAX;
        text.restart.backoff_max = Duration::MAX;
        text.restart.backoff_initial = Duration::MAX;
        let huge = Arc::new(text);
        let t0 = Instant::now();
        let (mut s, _) = Supervisor::new(huge.clone(), Releases::default(), t0, 1);
        s.handle(
            Event::Spawned {
                generation: 1,
                pid: pid(100),
                contained: false,
            },
            t0,
        );
        s.handle(ready(100), t0);
        s.handle(
            Event::Reload {
                config: Ok(huge),
                waiter: None,
                release: Release::Current,
            },
            t0,
        );
        s.handle(
            Event::Spawned {
                generation: 2,
                pid: pid(200),
                contained: false,
            },
            t0,
        );
        s.handle(exited(100, 1), t0); // crash while a deploy runs
        s.handle(Event::Stop { fast: false }, t0);
        assert!(s.next_deadline().is_some_and(|d| d > t0));
    }

    #[test]
    fn draining_generations_are_capped() {
        let mut h = Harness::serving();
        let mut killed = Vec::new();
        for n in 2..=(MAX_DRAINING as i32 + 3) {
            h.reload(None);
            h.on(Event::Spawned {
                generation: n as u64,
                pid: pid(n * 100),
                contained: false,
            });
            for a in h.on(ready(n * 100)) {
                if let Action::Kill { pid, .. } = a {
                    killed.push(pid.as_raw());
                }
            }
        }
        // 10 old generations drain; the two oldest were killed.
        assert_eq!(killed, [100, 200]);
    }
}
