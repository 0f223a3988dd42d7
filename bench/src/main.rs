//! `baton-bench`: the zero-downtime proof, a benchmark anyone can rerun.
//!
//! ```text
//! cargo run --release -p baton-bench -- [--quick] --out DIR
//! ```
//!
//! writes `DIR/report.md` and `DIR/timeline.svg`. Under a closed-loop load
//! on 127.0.0.1 (fresh connection per request, plus keep-alive clients):
//!
//! - A: the example app alone, restarted stop-then-start (what
//!   `systemctl restart` does) N times: the baseline.
//! - B: the same app under baton, N deploys.
//! - C: broken releases under baton (crash before ready, never ready).
//! - D: throughput and latency of the app alone vs under baton,
//!   interleaved in one run.
//! - E: deploy time and baton's CPU, memory and fds with 1, 8 and 64
//!   listeners (one process per generation: baton supports no more).
//!
//! plus baton's own figures: spawn latency, READY-to-drain overhead, CPU
//! per deploy and when idle, RSS and open fds (from its JSON log and /proc).
//! `--quick` takes about a minute on 2 cores; the full run a few minutes.
//!
//! # Rules
//!
//! Figures, not assertions: the bench prints numbers and never fails on a
//! timing. It fails (exit 1) only when it cannot measure: a binary missing,
//! baton not starting, an expected reply or log line not arriving in time.
//! Every loop is bounded in count and in time; all traffic goes to
//! loopback; every process it starts is stopped by pid at the end, also on
//! error, Ctrl-C or panic.
//!
//! The processes, baton's log and the load generator come from the test
//! kit (`testkit/`), shared with the integration tests. The scenarios run
//! on the main thread; each load runs on a thread of its own.
//!
//! # Binaries
//!
//! `baton` and the example app are taken from this executable's directory
//! (`target/release/baton`, `target/release/examples/hello`). Under
//! `cargo run` (`CARGO` is set) the bench first runs
//! `cargo build -p baton --bin baton --example hello` in its own profile
//! (and target directory): `cargo run -p baton-bench` builds neither, and a
//! stale `baton` would be measured without a word. Started any other way
//! it only checks that they exist and names the command that builds them.

mod plot;
mod report;
mod scenarios;
mod soak;
mod wrk;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use baton_testkit::binaries::Profile;
use baton_testkit::harness::Launch;
use baton_testkit::{Binaries, Context, Mix, Pace, Setup, Spec};
use clap::Parser;

/// Zero-downtime benchmark of baton: writes DIR/report.md and DIR/timeline.svg.
#[derive(Parser)]
#[command(name = "baton-bench", version)]
struct Args {
    /// About a minute on 2 cores: few deploys, short throughput rounds.
    #[arg(long)]
    quick: bool,
    /// Directory for report.md and timeline.svg (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Only a soak: N deploys back to back under load, with baton's fds,
    /// memory, children and zombies before and after (DIR/soak.md).
    #[arg(long, value_name = "N", conflicts_with = "quick")]
    soak: Option<usize>,
}

/// How much of everything: the only difference between the two modes.
#[derive(Debug, Clone)]
pub struct Plan {
    pub quick: bool,
    /// The load's clients and timeouts; its limit is set per scenario.
    pub load: Spec,
    /// Each handoff scenario's steady phase (and the calibration).
    pub steady: Duration,
    /// A, A′: restarts.
    pub restarts: usize,
    /// B: deploys.
    pub deploys: usize,
    /// The wrk cross-check's run with deploys (its steady run takes
    /// `steady`).
    pub wrk_for: Duration,
    /// Load between two restarts or deploys (A, B, C).
    pub spacing: Duration,
    /// B prints every n-th deploy.
    pub print_every: usize,
    /// C: releases of each broken kind.
    pub broken_each: usize,
    /// D: rounds, each measuring both sides for `round`.
    pub rounds: usize,
    pub round: Duration,
    /// E: deploys per listener count.
    pub scale_deploys: usize,
    /// How long baton's idle CPU is measured.
    pub idle: Duration,
    /// Time bound on each scenario's loop.
    pub limit: Duration,
}

/// 16 fresh-connection clients and 8 keep-alive clients (a third); 5 s
/// per request. The pace is set per run.
const LOAD: Spec = Spec {
    mix: Mix {
        fresh: 16,
        keep_alive: 8,
    },
    request_timeout: Duration::from_secs(5),
    failure_pause: Duration::from_millis(10),
    limit: Duration::from_secs(300),
    pace: Pace::Closed,
};

const QUICK: Plan = Plan {
    quick: true,
    load: LOAD,
    steady: Duration::from_secs(2),
    restarts: 5,
    deploys: 5,
    wrk_for: Duration::from_secs(3),
    spacing: Duration::from_millis(800),
    print_every: 1,
    broken_each: 2,
    rounds: 2,
    round: Duration::from_secs(3),
    scale_deploys: 3,
    idle: Duration::from_secs(10),
    limit: Duration::from_secs(60),
};

const FULL: Plan = Plan {
    quick: false,
    load: LOAD,
    steady: Duration::from_secs(8),
    restarts: 20,
    deploys: 100,
    // At least 100 deploys (0.5 s apart, each ~0.25 s) under each wrk run.
    wrk_for: Duration::from_secs(90),
    spacing: Duration::from_millis(500),
    print_every: 10,
    broken_each: 5,
    rounds: 6,
    round: Duration::from_secs(8),
    scale_deploys: 10,
    idle: Duration::from_secs(10),
    limit: Duration::from_secs(240),
};

/// What every scenario needs.
pub struct Env {
    pub binaries: Binaries,
    /// Private scratch directory (configs, control sockets).
    pub scratch: PathBuf,
    pub plan: Plan,
}

impl Env {
    /// A baton setup running the example app on one listener.
    pub fn setup(&self, boot_delay: Duration) -> Setup {
        let mut setup = Setup::new(&self.binaries)
            .env("HELLO_BOOT_DELAY_MS", &boot_delay.as_millis().to_string())
            .readiness_timeout(scenarios::READINESS);
        setup.drain_timeout = "10s".into();
        setup
    }

    /// How the bench starts baton: JSON log (timestamps to the µs), its
    /// temp dir in the scratch space.
    pub fn launch(&self) -> Launch<'static> {
        Launch::default()
            .arg("--log-format")
            .arg("json")
            .parent(&self.scratch)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// What the kit reports already names what failed; I/O errors carry
    /// what was being done (`baton_testkit::Context`).
    #[error(transparent)]
    Kit(#[from] baton_testkit::Error),
    /// Something needed for a measurement did not happen.
    #[error("{0}")]
    Bench(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn main() -> ExitCode {
    let args = Args::parse();
    match bench(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("baton-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn bench(args: &Args) -> Result<()> {
    let plan = if args.quick { QUICK } else { FULL };
    let binaries = binaries()?;
    std::fs::create_dir_all(&args.out)
        .context(|| format!("cannot create {}", args.out.display()))?;
    let scratch = Scratch::create()?;
    install_panic_hook(scratch.0.clone());
    stop_on_signals(scratch.0.clone())?;
    let env = Env {
        binaries,
        scratch: scratch.0.clone(),
        plan,
    };
    if let Some(n) = args.soak {
        let soaked = soak::run(&env, n);
        baton_testkit::kill_started();
        let path = args.out.join("soak.md");
        std::fs::write(&path, soaked?.render(&command_line()))
            .context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
        return Ok(());
    }
    let machine = report::Machine::describe(&env.binaries.baton);
    let (started, clock) = (SystemTime::now(), Instant::now());
    println!(
        "baton-bench ({} mode), scratch in {}",
        mode(&env.plan),
        scratch.0.display()
    );
    let measured = scenarios::run_all(&env);
    // Whatever happened: nothing the bench started outlives it.
    baton_testkit::kill_started();
    let measured = measured?;
    let report = report::Report {
        plan: &env.plan,
        command: command_line(),
        machine,
        started,
        took: clock.elapsed(),
        measured: &measured,
    };
    let markdown = args.out.join("report.md");
    let svg = args.out.join("timeline.svg");
    std::fs::write(&markdown, report.render())
        .context(|| format!("cannot write {}", markdown.display()))?;
    plot::write(&svg, &measured).map_err(|e| Error::Bench(format!("timeline: {e}")))?;
    println!("\n{}", report.headline());
    println!("wrote {} and {}", markdown.display(), svg.display());
    Ok(())
}

/// Kills everything started and removes `scratch` when the bench panics.
fn install_panic_hook(scratch: PathBuf) {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        baton_testkit::kill_started();
        let _ = std::fs::remove_dir_all(&scratch);
    }));
}

/// On SIGINT or SIGTERM: kills everything started, removes `scratch` and
/// exits 130 or 143. A thread of its own waits for the signals (tokio's
/// handlers: nothing is blocked or ignored, so the processes the bench
/// starts inherit no signal state from it).
fn stop_on_signals(scratch: PathBuf) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context(|| "cannot start a runtime for signals")?;
    // Installed here, before any scenario starts: a signal from now on is
    // caught, not fatal.
    let (int, term) = runtime.block_on(async {
        (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        )
    });
    let mut int = int.context(|| "cannot handle SIGINT")?;
    let mut term = term.context(|| "cannot handle SIGTERM")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let (name, code) = runtime.block_on(async {
                tokio::select! {
                    _ = int.recv() => ("SIGINT", 130),
                    _ = term.recv() => ("SIGTERM", 143),
                }
            });
            eprintln!("baton-bench: interrupted by {name}; stopping everything it started");
            baton_testkit::kill_started();
            let _ = std::fs::remove_dir_all(&scratch);
            std::process::exit(code);
        })
        .context(|| "cannot start the signal thread")?;
    Ok(())
}

fn mode(plan: &Plan) -> &'static str {
    if plan.quick {
        "quick"
    } else {
        "full"
    }
}

/// The command that reruns this, and how it was run.
fn command_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    format!("cargo run --release -p baton-bench -- {}", args.join(" "))
}

/// `baton` and the example app, built first when run by cargo.
fn binaries() -> Result<Binaries> {
    let exe = std::env::current_exe().context(|| "cannot find the bench's own executable")?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    if std::env::var_os("CARGO").is_some() {
        Profile::of(dir).build(&["--bin", "baton", "--example", "hello"])?;
    }
    let binaries = Binaries::in_dir(dir);
    binaries.check()?;
    Ok(binaries)
}

/// The bench's private directory under the system temp dir, removed on drop
/// (and by the panic hook).
struct Scratch(PathBuf);

impl Scratch {
    fn create() -> Result<Scratch> {
        let path = std::env::temp_dir().join(format!("baton-bench-{}", std::process::id()));
        // A directory left by a killed run with our pid holds nothing of value.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).context(|| format!("cannot create {}", path.display()))?;
        Ok(Scratch(path))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
