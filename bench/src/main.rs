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
//! # Binaries
//!
//! `baton` and the example app are taken from this executable's directory
//! (`target/release/baton`, `target/release/examples/hello`). Under
//! `cargo run` (`CARGO` is set) the bench first runs
//! `cargo build -p baton --bin baton --example hello` with its own profile:
//! `cargo run -p baton-bench` builds neither, and a stale `baton` would
//! be measured without a word. Started any other way it only checks that
//! they exist and names the command that builds them.

mod load;
mod plot;
mod procs;
mod report;
mod scenarios;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant, SystemTime};

use clap::Parser;

use crate::load::Mix;
use crate::procs::Setup;

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
}

/// How much of everything: the only difference between the two modes.
#[derive(Debug, Clone)]
pub struct Plan {
    pub quick: bool,
    pub mix: Mix,
    /// A: restarts.
    pub restarts: usize,
    /// B: deploys.
    pub deploys: usize,
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

const QUICK: Plan = Plan {
    quick: true,
    mix: Mix {
        fresh: 24,
        keep_alive: 1,
    },
    restarts: 5,
    deploys: 5,
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
    mix: Mix {
        fresh: 24,
        keep_alive: 1,
    },
    restarts: 20,
    deploys: 100,
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
    pub baton: PathBuf,
    pub hello: PathBuf,
    /// Private scratch directory (configs, control sockets).
    pub scratch: PathBuf,
    pub plan: Plan,
}

impl Env {
    /// A baton setup running the example app on one listener.
    pub fn setup(&self, boot_delay: Duration) -> Setup {
        Setup {
            hello: self.hello.clone(),
            listeners: 1,
            boot_delay,
            fail: None,
            readiness_timeout: scenarios::READINESS,
        }
    }

    /// A directory of the scratch space for one baton.
    pub fn dir(&self, name: &str) -> PathBuf {
        self.scratch.join(name)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    /// Something needed for a measurement did not happen.
    #[error("{0}")]
    Bench(String),
    #[error("interrupted by {0}; everything started was stopped")]
    Interrupted(&'static str),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds what was being done to an I/O error.
pub trait Context<T> {
    fn context<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T>;
}

impl<T> Context<T> for std::io::Result<T> {
    fn context<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: what().into(),
            source,
        })
    }
}

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
    let (baton, hello) = binaries()?;
    std::fs::create_dir_all(&args.out)
        .context(|| format!("cannot create {}", args.out.display()))?;
    let scratch = Scratch::create()?;
    procs::install_panic_hook(scratch.0.clone());
    let env = Env {
        baton,
        hello,
        scratch: scratch.0.clone(),
        plan,
    };
    let machine = report::Machine::describe();
    let (started, clock) = (SystemTime::now(), Instant::now());
    println!(
        "baton-bench ({} mode), scratch in {}",
        mode(&env.plan),
        scratch.0.display()
    );
    let measured = run(&env);
    // Whatever happened: nothing the bench started outlives it.
    procs::kill_started();
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

/// Runs the scenarios on a single-threaded runtime until done or until a
/// Ctrl-C/SIGTERM; dropping the scenario future then drops its guards.
fn run(env: &Env) -> Result<scenarios::Measurements> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context(|| "cannot start the tokio runtime")?;
    runtime.block_on(async {
        tokio::select! {
            measured = scenarios::run_all(env) => measured,
            name = interrupted() => Err(Error::Interrupted(name)),
        }
    })
}

async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
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
    format!(
        "cargo run --release -p baton-bench -- {}",
        args.join(" ")
    )
}

/// `baton` and the example app, built first when run by cargo.
fn binaries() -> Result<(PathBuf, PathBuf)> {
    let exe = std::env::current_exe().context(|| "cannot find the bench's own executable")?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    let (baton, hello) = (dir.join("baton"), dir.join("examples").join("hello"));
    let release = !cfg!(debug_assertions);
    if let Some(cargo) = std::env::var_os("CARGO") {
        let mut build = Command::new(cargo);
        build
            .args([
                "build",
                "-p",
                "baton",
                "--bin",
                "baton",
                "--example",
                "hello",
                "--manifest-path",
            ])
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml"));
        if release {
            build.arg("--release");
        }
        let status = build.status().context(|| "cannot run cargo")?;
        if !status.success() {
            return Err(Error::Bench(format!(
                "building baton and the example app failed ({status})"
            )));
        }
    }
    for path in [&baton, &hello] {
        if !path.exists() {
            let profile = if release { " --release" } else { "" };
            return Err(Error::Bench(format!(
                "{} is missing (the bench looks next to its own executable): \
                 build it with `cargo build{profile} -p baton --bin baton --example hello`",
                path.display()
            )));
        }
    }
    Ok((baton, hello))
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
