//! The five scenarios. Each starts what it needs, drives it and returns its
//! figures; the guards stop what it started when it returns, also on error.
//! Every loop is bounded in count (the plan) and in time (`plan.limit`):
//! a scenario past its time stops early and the report says how far it got.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime};

use baton_testkit::app::held_listener;
use baton_testkit::load::{self, Load, Pace, Spec, Tally};
use baton_testkit::procs::{cpu_time, Footprint};
use baton_testkit::{App, Baton, Listen, Mark, Setup};

use crate::wrk::{WrkResult, WrkRun, WrkSpec};

use crate::report::ms;
use baton_testkit::Context;

use crate::{Env, Error, Result};

/// The example app's boot time in A, B and C (`HELLO_BOOT_DELAY_MS`): real
/// apps are not ready at once, and it makes the overlap of two generations
/// during a deploy visible on the timeline.
pub const BOOT_DELAY: Duration = Duration::from_millis(200);
/// Readiness deadline in Scenario C (a never-ready release waits it out).
pub const BROKEN_READINESS: Duration = Duration::from_secs(1);
/// Readiness deadline everywhere else.
pub const READINESS: Duration = Duration::from_secs(10);
/// Listeners per baton in Scenario E.
pub const LISTENER_COUNTS: [usize; 3] = [1, 8, 64];
/// Bounds on single waits: a process starting, exiting, a log line.
const START_LIMIT: Duration = Duration::from_secs(15);
const EXIT_LIMIT: Duration = Duration::from_secs(15);
const MARK_LIMIT: Duration = Duration::from_secs(5);
/// Bounds one GET outside a load.
const PROBE_LIMIT: Duration = Duration::from_secs(5);
/// Load clients stop by themselves this long after a scenario's limit, in
/// case nobody stops them.
const LOAD_SLACK: Duration = Duration::from_secs(60);

/// The plan's load at `pace`, bounded by `limit` and some slack.
fn spec(plan: &crate::Plan, pace: Pace, limit: Duration) -> Spec {
    Spec {
        limit: limit + LOAD_SLACK,
        pace,
        ..plan.load
    }
}

/// Relates both clocks to one origin: the load's windows count on the
/// monotonic clock, baton's log carries wall-clock timestamps.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub origin: Instant,
    wall: SystemTime,
}

impl Clock {
    pub fn start() -> Clock {
        Clock {
            origin: Instant::now(),
            wall: SystemTime::now(),
        }
    }

    /// Seconds from the origin to `at`.
    pub fn since(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.origin).as_secs_f64()
    }

    /// Seconds from the origin to a wall-clock moment (negative if before).
    pub fn wall(&self, at: SystemTime) -> f64 {
        match at.duration_since(self.wall) {
            Ok(after) => after.as_secs_f64(),
            Err(before) => -before.duration().as_secs_f64(),
        }
    }
}

/// One restart (A) or deploy (B), in seconds since the load's origin.
#[derive(Debug, Clone)]
pub struct Cycle {
    /// SIGTERM sent (A) or reload requested (B).
    pub start: f64,
    /// The new process answers (A) or baton got its READY=1 (B).
    pub ready: Option<f64>,
    /// The old process has exited.
    pub drain_end: Option<f64>,
}

/// One process's life, in seconds since the load's origin.
#[derive(Debug, Clone)]
pub struct Lifespan {
    pub generation: u64,
    pub spawned: f64,
    pub ready: Option<f64>,
    /// Told to stop (SIGTERM).
    pub drain: Option<f64>,
    pub exited: Option<f64>,
}

/// What the timeline of A or B shows.
#[derive(Debug, Clone)]
pub struct Trace {
    pub tally: Tally,
    pub cycles: Vec<Cycle>,
    pub lifespans: Vec<Lifespan>,
    /// Seconds from the origin (the start of the load) to its stop.
    pub end: f64,
}

impl Trace {
    /// The longest time in which no request was answered, if there was
    /// one: when it began (seconds) and how long it lasted.
    pub fn longest_silence(&self) -> Option<(f64, Duration)> {
        let window = load::WINDOW.as_secs_f64();
        // Whole windows only: the one the load stopped in is cut short.
        let end = (self.end / window) as u32;
        let (first, windows) = self.tally.timeline.longest_silence(0, end)?;
        Some((f64::from(first) * window, load::WINDOW * windows))
    }

    /// The number (from 1) of the restart or deploy in progress at some
    /// point of `[from, to]` seconds, if any.
    pub fn cycle_during(&self, from: f64, to: f64) -> Option<usize> {
        let resolution = load::WINDOW.as_secs_f64();
        let position = self.cycles.iter().position(|c| {
            let end = [c.ready, c.drain_end]
                .into_iter()
                .flatten()
                .fold(c.start, f64::max);
            c.start <= to + resolution && end + resolution >= from
        });
        position.map(|i| i + 1)
    }
}

/// What one deploy looked like, from the bench and from baton's log.
#[derive(Debug, Clone)]
pub struct DeployRecord {
    pub ok: bool,
    /// baton's words for the outcome.
    pub outcome: String,
    /// The bench's clock just before the reload request went out.
    pub requested: SystemTime,
    /// The outcome arrived (where `baton reload --wait` returns).
    pub done: SystemTime,
    pub starting: Option<SystemTime>,
    pub spawned: Option<SystemTime>,
    pub ready: Option<SystemTime>,
    /// The drain signal went to the generation that had to go.
    pub drain_sent: Option<SystemTime>,
    /// The generation that had to go has exited: the old one after a
    /// success, the candidate after a failure.
    pub gone: Option<SystemTime>,
    /// baton's CPU time from just before the request until `gone`.
    pub cpu: Duration,
    /// The app's side (its own log lines): the new generation sent READY=1,
    /// and the drain signal reached the old one.
    pub app_ready_sent: Option<SystemTime>,
    pub app_drain_signal: Option<SystemTime>,
}

impl DeployRecord {
    pub fn took(&self) -> Option<Duration> {
        between(self.requested, Some(self.done))
    }

    /// From the bench's request to fork/exec returning in baton.
    pub fn request_to_spawn(&self) -> Option<Duration> {
        between(self.requested, self.spawned)
    }

    /// Inside baton: deciding to start → fork/exec returned.
    pub fn fork_exec(&self) -> Option<Duration> {
        between(self.starting?, self.spawned)
    }

    /// Inside baton: READY=1 processed → drain signal sent.
    pub fn ready_to_drain(&self) -> Option<Duration> {
        between(self.ready?, self.drain_sent)
    }

    /// The apps' side: the new one sent READY=1 → the drain signal reached
    /// the old one (the datagram, baton, and the signal's delivery).
    pub fn app_handoff(&self) -> Option<Duration> {
        between(self.app_ready_sent?, self.app_drain_signal)
    }

    /// Drain signal → the drained process exited.
    pub fn drain(&self) -> Option<Duration> {
        between(self.drain_sent?, self.gone)
    }

    fn cycle(&self, clock: &Clock) -> Cycle {
        Cycle {
            start: clock.wall(self.requested),
            ready: self.ready.map(|at| clock.wall(at)),
            drain_end: self.gone.map(|at| clock.wall(at)),
        }
    }
}

fn between(from: SystemTime, to: Option<SystemTime>) -> Option<Duration> {
    to?.duration_since(from).ok()
}

/// How the app changes version in a handoff scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// A: the app binds its port itself and is restarted stop-then-start
    /// (what `systemctl restart` does): the socket closes in between.
    Restart,
    /// A′: stop-then-start, but the socket is held across it by someone
    /// else (the bench, as systemd does for a socket-activated service):
    /// connections wait in its queue instead of being refused.
    HeldRestart,
    /// B: the app under baton, deployed with `baton reload --wait`.
    Deploy,
}

impl Way {
    pub fn label(self) -> &'static str {
        match self {
            Way::Restart => "A",
            Way::HeldRestart => "A′",
            Way::Deploy => "B",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Way::Restart => "stop-then-start, socket closed",
            Way::HeldRestart => "stop-then-start, socket held",
            Way::Deploy => "baton deploys",
        }
    }

    /// What one cycle is called.
    pub fn cycle(self) -> &'static str {
        match self {
            Way::Restart | Way::HeldRestart => "restart",
            Way::Deploy => "deploy",
        }
    }
}

/// One handoff scenario under one kind of load: a steady phase, then the
/// same running setup through its restarts or deploys.
pub struct Handoff {
    pub way: Way,
    pub pace: Pace,
    /// The setup serving, nothing changing, for `plan.steady`.
    pub steady: Tally,
    /// The phase with the restarts or deploys.
    pub trace: Trace,
    pub planned: usize,
    /// A, A′: per restart, SIGTERM sent → the new process answers.
    pub outages: Vec<Duration>,
    /// B: per deploy.
    pub records: Vec<DeployRecord>,
}

impl Handoff {
    /// Restarts or deploys done.
    pub fn cycles(&self) -> usize {
        self.outages.len() + self.records.len()
    }

    pub fn open(&self) -> bool {
        matches!(self.pace, Pace::Open { .. })
    }
}

/// baton at rest, measured before B's closed-loop run.
pub struct Idle {
    /// baton's CPU time while nothing happened, and over how long.
    pub cpu: Duration,
    pub over: Duration,
    /// baton before the first deploy and after the last.
    pub before: Footprint,
    pub after: Footprint,
}

/// Everything measured, for the report.
pub struct Measurements {
    /// Closed-loop answers per second of the app alone, measured first;
    /// the open-loop runs send half of it.
    pub calibration: f64,
    pub open_rate: f64,
    /// A, A′ and B, closed loop then open loop.
    pub handoffs: Vec<Handoff>,
    pub idle: Idle,
    /// The wrk cross-check under baton, or why it did not run.
    pub wrk: Result<Vec<WrkPass>, String>,
    pub broken: Broken,
    /// F: a lying release, without and with probation.
    pub lying: Vec<LyingRun>,
    pub throughput: Throughput,
    pub scale: Vec<Scale>,
}

impl Measurements {
    pub fn handoff(&self, way: Way, open: bool) -> Option<&Handoff> {
        self.handoffs
            .iter()
            .find(|h| h.way == way && h.open() == open)
    }

    /// B's closed-loop run: the deploys whose baton figures the report
    /// gives.
    pub fn deploys(&self) -> Option<&Handoff> {
        self.handoff(Way::Deploy, false)
    }
}

/// Share of the app's closed-loop throughput the open-loop runs send.
pub const OPEN_SHARE: f64 = 0.5;

pub fn run_all(env: &Env) -> Result<Measurements> {
    let plan = &env.plan;
    println!(
        "calibrating: the app alone, closed loop, {}",
        crate::report::secs(plan.steady)
    );
    let calibration = calibrate(env)?;
    let open_rate = (calibration * OPEN_SHARE).max(100.0);
    println!("   {calibration:.0} answers/s; open-loop runs send {open_rate:.0} requests/s");
    let mut handoffs = Vec::new();
    let mut idle = None;
    for pace in [Pace::Closed, Pace::Open { rate: open_rate }] {
        for way in [Way::Restart, Way::HeldRestart, Way::Deploy] {
            println!(
                "{} ({}), {}: {} steady, then {} {}s",
                way.label(),
                way.describe(),
                pace_name(pace),
                crate::report::secs(plan.steady),
                if way == Way::Deploy {
                    plan.deploys
                } else {
                    plan.restarts
                },
                way.cycle()
            );
            let handoff = match way {
                Way::Deploy => {
                    let (handoff, measured) = deploys(env, pace, idle.is_none())?;
                    idle = idle.or(measured);
                    handoff
                }
                _ => restarts(env, way, pace)?,
            };
            println!(
                "   steady: {}
   {}s: {}",
                summary(&handoff.steady),
                way.cycle(),
                summary(&handoff.trace.tally)
            );
            handoffs.push(handoff);
        }
    }
    let idle = idle.ok_or_else(|| Error::Bench("B measured no idle baton".into()))?;
    let wrk = cross_check(env)?;
    println!(
        "C: broken releases under baton, {} of each kind",
        plan.broken_each
    );
    let broken = broken(env)?;
    println!("   {}", summary(&broken.tally));
    println!("F: a lying release (READY=1, then it dies), without and with probation");
    let lying = LYING_PROBATION
        .into_iter()
        .map(|probation| lying(env, probation))
        .collect::<Result<Vec<_>>>()?;
    println!(
        "D: throughput, app alone vs under baton, {} rounds",
        plan.rounds
    );
    let throughput = throughput(env)?;
    println!(
        "E: scale: {LISTENER_COUNTS:?} listeners, {} deploys each",
        plan.scale_deploys
    );
    let scale = scale(env)?;
    Ok(Measurements {
        calibration,
        open_rate,
        handoffs,
        idle,
        wrk,
        broken,
        lying,
        throughput,
        scale,
    })
}

pub fn pace_name(pace: Pace) -> String {
    match pace {
        Pace::Closed => "closed loop".into(),
        Pace::Open { rate } => format!("open loop at {rate:.0}/s"),
    }
}

fn summary(tally: &Tally) -> String {
    format!(
        "{} requests answered, {} failed ({} on keep-alive), {} keep-alive retries ({} answered)",
        tally.ok(),
        tally.failed(),
        tally.keep_alive.failed(),
        tally.retried,
        tally.recovered
    )
}

/// The app alone under the closed-loop load: its answers per second.
fn calibrate(env: &Env) -> Result<f64> {
    let plan = &env.plan;
    let address = free_port()?;
    let mut app = App::start(&env.binaries.hello, address, None, Duration::ZERO)?;
    wait_answering(&mut app, address)?;
    let tally = measure(address, spec(plan, Pace::Closed, plan.steady), plan.steady);
    Ok(tally.ok() as f64 / tally.elapsed.as_secs_f64().max(1e-9))
}

// ---------------------------------------------------------------------------
// A and A′: stop-then-start
// ---------------------------------------------------------------------------

/// The app restarted the way `systemctl restart` does it: stop, wait for
/// the exit, start. A: it binds the port itself; A′: the bench holds the
/// socket across the restart and passes it in (fd 3, `LISTEN_FDS`).
fn restarts(env: &Env, way: Way, pace: Pace) -> Result<Handoff> {
    let plan = &env.plan;
    let held = match way {
        Way::HeldRestart => Some(held_listener()?),
        _ => None,
    };
    let address = match &held {
        Some(listener) => listener.local_addr().context(|| "getsockname")?,
        None => free_port()?,
    };
    let start = |generation| match &held {
        Some(listener) => App::start_on(
            &env.binaries.hello,
            listener.as_fd(),
            Some(generation),
            BOOT_DELAY,
        ),
        None => App::start(&env.binaries.hello, address, Some(generation), BOOT_DELAY),
    };
    let mut app = start(1)?;
    wait_answering(&mut app, address)?;
    let steady = measure(address, spec(plan, pace, plan.steady), plan.steady);
    // The timeline starts with the load; the first process already serves.
    let clock = Clock::start();
    let mut lives = vec![lifespan(1, 0.0, Some(0.0))];
    let load = Load::start(address, clock.origin, spec(plan, pace, plan.limit));
    let deadline = Instant::now() + plan.limit;
    let (mut cycles, mut outages) = (Vec::new(), Vec::new());
    for restart in 1..=plan.restarts {
        sleep(plan.spacing);
        if Instant::now() >= deadline {
            break;
        }
        let stopped = Instant::now();
        app.terminate();
        let exited = app.wait_exit(EXIT_LIMIT)?;
        let generation = restart as u64 + 1;
        app = start(generation)?;
        let spawned = Instant::now();
        let answering = wait_answering(&mut app, address)?;
        if let Some(old) = lives.last_mut() {
            old.drain = Some(clock.since(stopped));
            old.exited = Some(clock.since(exited));
        }
        let ready = Some(clock.since(answering));
        lives.push(lifespan(generation, clock.since(spawned), ready));
        cycles.push(Cycle {
            start: clock.since(stopped),
            ready,
            drain_end: Some(clock.since(exited)),
        });
        outages.push(answering - stopped);
        if restart % plan.print_every == 0 || restart == plan.restarts {
            println!(
                "   restart {restart}/{}: answering again {} after SIGTERM",
                plan.restarts,
                ms(answering - stopped)
            );
        }
    }
    sleep(plan.spacing);
    let end = clock.since(Instant::now());
    let tally = load.stop();
    Ok(Handoff {
        way,
        pace,
        steady,
        trace: Trace {
            tally,
            cycles,
            lifespans: lives,
            end,
        },
        planned: plan.restarts,
        outages,
        records: Vec::new(),
    })
}

fn lifespan(generation: u64, spawned: f64, ready: Option<f64>) -> Lifespan {
    Lifespan {
        generation,
        spawned,
        ready,
        drain: None,
        exited: None,
    }
}

/// A loopback address with a port nobody listens on right now. (The port
/// may be taken again before the app binds it; the app then exits and the
/// bench says so.)
fn free_port() -> Result<SocketAddr> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context(|| "cannot bind 127.0.0.1:0")?;
    Ok(listener.local_addr().context(|| "getsockname")?)
}

/// Polls with GETs until the app answers one; when it did.
fn wait_answering(app: &mut App, address: SocketAddr) -> Result<Instant> {
    let deadline = Instant::now() + START_LIMIT;
    loop {
        let answer = load::probe(address, PROBE_LIMIT);
        if answer.is_ok() {
            return Ok(Instant::now());
        }
        app.check_running()?;
        if Instant::now() >= deadline {
            return Err(Error::Bench(format!(
                "the example app did not answer on {address} within {START_LIMIT:?}: {answer:?}"
            )));
        }
        sleep(Duration::from_millis(2));
    }
}

// ---------------------------------------------------------------------------
// B: deploys under baton
// ---------------------------------------------------------------------------

/// B: a steady phase, then `plan.deploys` deploys, under `pace`. With
/// `idle`, baton's CPU at rest and its footprint are measured first.
fn deploys(env: &Env, pace: Pace, idle: bool) -> Result<(Handoff, Option<Idle>)> {
    let plan = &env.plan;
    let baton = Baton::start_with(&env.setup(BOOT_DELAY), env.launch())?;
    let address = first_address(&baton)?;
    let rest = match idle {
        true => {
            let started = Instant::now();
            let before = cpu_time(baton.pid())?;
            sleep(plan.idle);
            Some((
                cpu_time(baton.pid())?.saturating_sub(before),
                started.elapsed(),
                Footprint::of(baton.pid())?,
            ))
        }
        false => None,
    };
    let steady = measure(address, spec(plan, pace, plan.steady), plan.steady);
    let clock = Clock::start();
    let load = Load::start(address, clock.origin, spec(plan, pace, plan.limit));
    let deadline = Instant::now() + plan.limit;
    let mut records = Vec::new();
    for n in 1..=plan.deploys {
        sleep(plan.spacing);
        if Instant::now() >= deadline {
            break;
        }
        let record = deploy(&baton)?;
        if n % plan.print_every == 0 || n == plan.deploys {
            println!("   deploy {n}/{}: {}", plan.deploys, record.outcome);
        }
        records.push(record);
    }
    sleep(plan.spacing);
    let end = clock.since(Instant::now());
    let tally = load.stop();
    let idle = match rest {
        Some((cpu, over, before)) => Some(Idle {
            cpu,
            over,
            before,
            after: Footprint::of(baton.pid())?,
        }),
        None => None,
    };
    let handoff = Handoff {
        way: Way::Deploy,
        pace,
        steady,
        trace: Trace {
            tally,
            cycles: records.iter().map(|r| r.cycle(&clock)).collect(),
            lifespans: lifespans(&baton, &clock),
            end,
        },
        planned: plan.deploys,
        outages: Vec::new(),
        records,
    };
    Ok((handoff, idle))
}

fn first_address(baton: &Baton) -> Result<SocketAddr> {
    let addresses = baton.addresses()?;
    addresses
        .first()
        .copied()
        .ok_or_else(|| Error::Bench("baton reports no listener".into()))
}

/// One `reload --wait`, followed until the generation that had to go has
/// exited (baton reaps it: that is part of the deploy's CPU time).
pub fn deploy(baton: &Baton) -> Result<DeployRecord> {
    let cpu_before = cpu_time(baton.pid())?;
    let exchange = baton.reload()?;
    let (generation, _) = exchange.started().ok_or_else(|| {
        Error::Bench(format!(
            "reload: no candidate started ({} replies)",
            exchange.replies.len()
        ))
    })?;
    let (done, ok, outcome) = exchange
        .done()
        .ok_or_else(|| Error::Bench("reload: no outcome".into()))?;
    let leaving = if ok {
        exchange.draining().map(|(old, _)| old)
    } else {
        Some(generation)
    };
    let spawned = Some(baton.wait_mark(generation, Mark::Spawned, MARK_LIMIT)?);
    let gone = match leaving {
        Some(g) => Some(baton.wait_mark(g, Mark::Exited, EXIT_LIMIT)?),
        None => None,
    };
    let cpu = cpu_time(baton.pid())?.saturating_sub(cpu_before);
    // The app's own lines: it logs them when it sent READY=1 and when the
    // drain signal reached it (the old one has exited: its line is in).
    let (app_ready_sent, app_drain_signal) = match (ok, leaving) {
        (true, Some(old)) => (
            baton.mark(generation, Mark::AppReadySent),
            baton.mark(old, Mark::AppDrainSignal),
        ),
        _ => (None, None),
    };
    Ok(DeployRecord {
        ok,
        outcome,
        requested: exchange.sent,
        done,
        starting: baton.mark(generation, Mark::Starting),
        spawned,
        ready: baton.mark(generation, Mark::Ready),
        drain_sent: leaving.and_then(|g| baton.mark(g, Mark::Draining)),
        gone,
        cpu,
        app_ready_sent,
        app_drain_signal,
    })
}

/// Every generation's life, from baton's log.
fn lifespans(baton: &Baton, clock: &Clock) -> Vec<Lifespan> {
    let at = |g, mark| baton.mark(g, mark).map(|t| clock.wall(t));
    baton
        .started_generations()
        .into_keys()
        .filter_map(|g| {
            Some(Lifespan {
                generation: g,
                spawned: at(g, Mark::Spawned)?,
                ready: at(g, Mark::Ready),
                drain: at(g, Mark::Draining),
                exited: at(g, Mark::Exited),
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------
// The wrk cross-check
// ---------------------------------------------------------------------------

/// One wrk pass per mode against the app under baton: steady, then with
/// deploys every `plan.spacing`.
pub struct WrkPass {
    pub steady: WrkResult,
    pub deploys: WrkResult,
    /// Deploys done during the second run, and how many failed.
    pub deployed: usize,
    pub deploys_failed: usize,
}

/// A wrk run for `duration`, with as many connections as the bench's own
/// clients.
fn wrk_spec(env: &Env, keep_alive: bool, duration: Duration) -> WrkSpec {
    let mix = env.plan.load.mix;
    WrkSpec {
        connections: mix.fresh + mix.keep_alive,
        threads: 1,
        duration,
        keep_alive,
        timeout: env.plan.load.request_timeout,
    }
}

fn cross_check(env: &Env) -> Result<Result<Vec<WrkPass>, String>> {
    let Some(wrk) = crate::wrk::find() else {
        println!("wrk cross-check: skipped, wrk is not installed (apt-get install wrk)");
        return Ok(Err("wrk is not installed (`apt-get install wrk`)".into()));
    };
    let plan = &env.plan;
    let mut passes = Vec::new();
    for keep_alive in [true, false] {
        println!(
            "wrk cross-check ({}): {} steady, then {} with deploys",
            if keep_alive {
                "keep-alive"
            } else {
                "Connection: close"
            },
            crate::report::secs(plan.steady),
            crate::report::secs(plan.wrk_for)
        );
        let baton = Baton::start_with(&env.setup(BOOT_DELAY), env.launch())?;
        let address = first_address(&baton)?;
        let steady = WrkRun::start(&wrk, address, &wrk_spec(env, keep_alive, plan.steady))?;
        let steady = steady.finish()?;
        let run = WrkRun::start(&wrk, address, &wrk_spec(env, keep_alive, plan.wrk_for))?;
        let until = Instant::now() + plan.wrk_for;
        let (mut deployed, mut deploys_failed) = (0, 0);
        while Instant::now() + plan.spacing < until {
            sleep(plan.spacing);
            let record = deploy(&baton)?;
            deployed += 1;
            deploys_failed += usize::from(!record.ok);
        }
        let deploys = run.finish()?;
        println!(
            "   steady: {} requests, {} errors; with {deployed} deploys: {} requests, {} errors",
            steady.requests,
            steady.errors(),
            deploys.requests,
            deploys.errors()
        );
        passes.push(WrkPass {
            steady,
            deploys,
            deployed,
            deploys_failed,
        });
    }
    Ok(Ok(passes))
}

// ---------------------------------------------------------------------------
// C: broken releases
// ---------------------------------------------------------------------------

pub struct Broken {
    pub releases: Vec<Release>,
    pub tally: Tally,
}

pub struct Release {
    pub name: &'static str,
    pub record: DeployRecord,
    /// The generation in state "ready" before and after the deploy.
    pub serving_before: Option<u64>,
    pub serving_after: Option<u64>,
}

/// Releases that crash before ready or never become ready, then a good one
/// again, all under load.
fn broken(env: &Env) -> Result<Broken> {
    let plan = &env.plan;
    let good = env.setup(BOOT_DELAY).readiness_timeout(BROKEN_READINESS);
    let baton = Baton::start_with(&good, env.launch())?;
    let address = first_address(&baton)?;
    let clock = Clock::start();
    let load = Load::start(address, clock.origin, spec(plan, Pace::Closed, plan.limit));
    let deadline = Instant::now() + plan.limit;
    let kinds = [
        ("crash before ready", "crash"),
        ("never ready", "never-ready"),
    ];
    let broken = kinds
        .iter()
        .flat_map(|&kind| std::iter::repeat_n(kind, plan.broken_each));
    let mut releases = Vec::new();
    for (name, fail) in broken {
        if Instant::now() >= deadline {
            break;
        }
        let setup = good.clone().env("HELLO_FAIL", fail);
        releases.push(release(&baton, name, &setup, plan.spacing)?);
    }
    releases.push(release(
        &baton,
        "good release after them",
        &good,
        plan.spacing,
    )?);
    sleep(plan.spacing);
    let tally = load.stop();
    Ok(Broken { releases, tally })
}

fn release(baton: &Baton, name: &'static str, setup: &Setup, spacing: Duration) -> Result<Release> {
    sleep(spacing);
    baton.rewrite(setup)?;
    let serving_before = baton.serving()?;
    let record = deploy(baton)?;
    let serving_after = baton.serving()?;
    println!("   {name}: {}", record.outcome);
    Ok(Release {
        name,
        record,
        serving_before,
        serving_after,
    })
}

// ---------------------------------------------------------------------------
// F: a lying release
// ---------------------------------------------------------------------------

/// F's probation settings: none, and enough to see the lie.
pub const LYING_PROBATION: [Duration; 2] = [Duration::ZERO, Duration::from_secs(3)];
/// How long after READY=1 the lying release exits.
pub const LIE_FOR: Duration = Duration::from_secs(1);
/// How long F waits after the lying deploy before deploying a good release:
/// longer than a request's timeout, so an outage shows as failed requests.
pub const LIE_WATCH: Duration = Duration::from_secs(8);

pub struct LyingRun {
    pub probation: Duration,
    pub trace: Trace,
    /// The lying deploy's outcome, in baton's words.
    pub outcome: String,
    pub ok: bool,
}

/// A release that sends READY=1 and exits `LIE_FOR` later (as gunicorn's
/// arbiter does when its workers cannot import the app), deployed under
/// load; `LIE_WATCH` later a good release is deployed again.
fn lying(env: &Env, probation: Duration) -> Result<LyingRun> {
    let plan = &env.plan;
    let mut good = env.setup(BOOT_DELAY);
    if !probation.is_zero() {
        good.health = format!("probation = \"{}ms\"", probation.as_millis());
    }
    let lie = good
        .clone()
        .env("HELLO_FAIL", "exit-after-ready")
        .env("HELLO_EXIT_AFTER_MS", &LIE_FOR.as_millis().to_string());
    let baton = Baton::start_with(&good, env.launch())?;
    let address = first_address(&baton)?;
    let clock = Clock::start();
    let load = Load::start(address, clock.origin, spec(plan, Pace::Closed, plan.limit));
    sleep(plan.spacing);
    baton.rewrite(&lie)?;
    let lied = deploy(&baton)?;
    sleep(LIE_WATCH);
    baton.rewrite(&good)?;
    let good_again = deploy(&baton)?;
    sleep(plan.spacing);
    let end = clock.since(Instant::now());
    let tally = load.stop();
    println!(
        "   probation {}: {}; {}",
        crate::report::secs(probation),
        lied.outcome,
        summary(&tally)
    );
    Ok(LyingRun {
        probation,
        outcome: lied.outcome.clone(),
        ok: lied.ok,
        trace: Trace {
            tally,
            cycles: [&lied, &good_again]
                .iter()
                .map(|r| r.cycle(&clock))
                .collect(),
            lifespans: lifespans(&baton, &clock),
            end,
        },
    })
}

// ---------------------------------------------------------------------------
// D: throughput, alone vs under baton
// ---------------------------------------------------------------------------

pub struct Throughput {
    pub alone: Tally,
    pub under_baton: Tally,
    /// Answers per second in each round: (alone, under baton).
    pub rounds: Vec<(f64, f64)>,
    /// baton's CPU time over the whole scenario, and how long that was.
    pub baton_cpu: Duration,
    pub baton_over: Duration,
}

/// Both run at once, idle when not measured; the load alternates between
/// them (ABBA order) so drift on a noisy machine hits both alike.
fn throughput(env: &Env) -> Result<Throughput> {
    let plan = &env.plan;
    let alone_address = free_port()?;
    let mut app = App::start(&env.binaries.hello, alone_address, None, Duration::ZERO)?;
    wait_answering(&mut app, alone_address)?;
    let baton = Baton::start_with(&env.setup(Duration::ZERO), env.launch())?;
    let baton_address = first_address(&baton)?;
    let started = Instant::now();
    let cpu_before = cpu_time(baton.pid())?;

    let mut sides = [Tally::default(), Tally::default()];
    let mut rounds = Vec::new();
    for round in 0..plan.rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        let mut rps = [0.0; 2];
        for side in order {
            let address = [alone_address, baton_address][side];
            let tally = measure(address, spec(plan, Pace::Closed, plan.round), plan.round);
            rps[side] = tally.ok() as f64 / tally.elapsed.as_secs_f64();
            sides[side].merge(&tally);
            sides[side].elapsed += tally.elapsed;
        }
        println!(
            "   round {}/{}: alone {:.0} req/s, under baton {:.0} req/s",
            round + 1,
            plan.rounds,
            rps[0],
            rps[1]
        );
        rounds.push((rps[0], rps[1]));
    }
    let [alone, under_baton] = sides;
    Ok(Throughput {
        alone,
        under_baton,
        rounds,
        baton_cpu: cpu_time(baton.pid())?.saturating_sub(cpu_before),
        baton_over: started.elapsed(),
    })
}

/// The load `spec` for `over`, then stopped.
fn measure(address: SocketAddr, spec: Spec, over: Duration) -> Tally {
    let load = Load::start(address, Instant::now(), spec);
    sleep(over);
    load.stop()
}

// ---------------------------------------------------------------------------
// E: scale
// ---------------------------------------------------------------------------

pub struct Scale {
    pub listeners: usize,
    /// Listeners baton reports bound.
    pub bound: usize,
    /// Listeners that answered a GET after the deploys.
    pub answering: usize,
    pub records: Vec<DeployRecord>,
    /// baton after its first generation started, and after the deploys.
    pub start: Footprint,
    pub end: Footprint,
}

/// baton with 1, 8 and 64 listeners, deploying without load: what grows
/// with the number of sockets is baton's own work.
fn scale(env: &Env) -> Result<Vec<Scale>> {
    let plan = &env.plan;
    let mut runs = Vec::new();
    for listeners in LISTENER_COUNTS {
        let setup = Setup {
            listeners: (0..listeners)
                .map(|i| Listen::new(&format!("l{i}"), "127.0.0.1:0"))
                .collect(),
            ..env.setup(Duration::ZERO)
        };
        let baton = Baton::start_with(&setup, env.launch())?;
        // Before any control connection, which holds an fd while it lasts.
        let start = Footprint::of(baton.pid())?;
        let addresses = baton.addresses()?;
        let deadline = Instant::now() + plan.limit;
        let mut records = Vec::new();
        for _ in 0..plan.scale_deploys {
            if Instant::now() >= deadline {
                break;
            }
            sleep(Duration::from_millis(100));
            records.push(deploy(&baton)?);
        }
        let end = Footprint::of(baton.pid())?;
        let mut answering = 0;
        for &address in &addresses {
            answering += usize::from(load::probe(address, PROBE_LIMIT).is_ok());
        }
        println!(
            "   {listeners} listeners: {} deploys, {answering}/{} answering",
            records.len(),
            addresses.len()
        );
        runs.push(Scale {
            listeners,
            bound: addresses.len(),
            answering,
            records,
            start,
            end,
        });
    }
    Ok(runs)
}
