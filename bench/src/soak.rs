//! `--soak N` (issue 8): N deploys back to back under load, and what baton
//! holds before and after: its fds and resident memory, its children and
//! zombies, and the requests that failed. Growth in any of them is a leak.
//! Figures, never a pass/fail.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use baton_testkit::procs::{children, Footprint};
use baton_testkit::{alive, eventually, Baton, Load, Spec, Tally};

use crate::{Env, Error, Result};

/// What baton holds at one moment, with no deploy running.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    pub fds: usize,
    pub rss_kib: u64,
    pub children: usize,
    pub zombies: usize,
}

impl Snapshot {
    fn of(baton: &Baton) -> Result<Snapshot> {
        let footprint = Footprint::of(baton.pid())?;
        let kids = children(baton.pid());
        // Listed as children, so present: not alive means a zombie.
        let zombies = kids.iter().filter(|&&pid| !alive(pid)).count();
        Ok(Snapshot {
            fds: footprint.fds,
            rss_kib: footprint.rss_kib,
            children: kids.len(),
            zombies,
        })
    }
}

pub struct Soak {
    pub planned: usize,
    pub deploys: usize,
    pub failed_deploys: usize,
    pub took: Duration,
    pub before: Snapshot,
    pub after: Snapshot,
    pub tally: Tally,
}

/// How long the whole soak may take, whatever N is.
const LIMIT: Duration = Duration::from_secs(3600);

pub fn run(env: &Env, planned: usize) -> Result<Soak> {
    let baton = Baton::start_with(&env.setup(Duration::ZERO), env.launch())?;
    let address = *baton
        .addresses()?
        .first()
        .ok_or_else(|| Error::Bench("baton reports no listener".into()))?;
    let spec = Spec {
        limit: LIMIT + Duration::from_secs(60),
        ..env.plan.load
    };
    let load = Load::start(address, Instant::now(), spec);
    settle(&baton)?;
    let before = Snapshot::of(&baton)?;
    println!(
        "soak: {planned} deploys under load; before: {}",
        line(&before)
    );
    let started = Instant::now();
    let (mut deploys, mut failed_deploys) = (0, 0);
    let every = (planned / 10).max(1);
    while deploys < planned && started.elapsed() < LIMIT {
        let exchange = baton.reload()?;
        let (_, ok, outcome) = exchange
            .done()
            .ok_or_else(|| Error::Bench("reload: no outcome".into()))?;
        deploys += 1;
        if !ok {
            failed_deploys += 1;
            println!("   deploy {deploys}: {outcome}");
        }
        if deploys % every == 0 {
            println!(
                "   {deploys}/{planned} deploys, {:.0} s",
                started.elapsed().as_secs_f64()
            );
        }
    }
    let took = started.elapsed();
    settle(&baton)?;
    let after = Snapshot::of(&baton)?;
    let tally = load.stop();
    println!("soak: after:  {}", line(&after));
    println!(
        "soak: {} requests answered, {} failed, {} keep-alive retries",
        tally.ok(),
        tally.failed(),
        tally.retried
    );
    Ok(Soak {
        planned,
        deploys,
        failed_deploys,
        took,
        before,
        after,
        tally,
    })
}

/// Waits until every old generation has drained: one live child left (a
/// zombie would be a leak, counted in the snapshot, not waited for).
fn settle(baton: &Baton) -> Result<()> {
    let live = || {
        let kids = children(baton.pid());
        kids.iter().filter(|&&pid| alive(pid)).count()
    };
    if eventually(Duration::from_secs(60), || live() == 1) {
        Ok(())
    } else {
        Err(baton
            .failure("old generations still running 60 s after the last deploy")
            .into())
    }
}

fn line(s: &Snapshot) -> String {
    format!(
        "{} fds, {:.1} MiB RSS, {} children, {} zombies",
        s.fds,
        s.rss_kib as f64 / 1024.0,
        s.children,
        s.zombies
    )
}

impl Soak {
    /// The soak's report: a table of before and after.
    pub fn render(&self, command: &str) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# baton soak: {} deploys under load\n", self.deploys);
        let _ = writeln!(out, "Command: `{command}`\n");
        let _ = writeln!(
            out,
            "{} of {} planned deploys in {:.0} s ({:.1} ms each), {} failed deploys; \
             {} requests answered, **{} failed**, {} keep-alive retries.\n",
            self.deploys,
            self.planned,
            self.took.as_secs_f64(),
            self.took.as_secs_f64() * 1000.0 / self.deploys.max(1) as f64,
            self.failed_deploys,
            self.tally.ok(),
            self.tally.failed(),
            self.tally.retried
        );
        let _ = writeln!(out, "| baton | before | after | growth |");
        let _ = writeln!(out, "| --- | ---: | ---: | ---: |");
        let mib = |kib: u64| kib as f64 / 1024.0;
        let rows = [
            ("open fds", self.before.fds as f64, self.after.fds as f64),
            (
                "RSS (MiB)",
                mib(self.before.rss_kib),
                mib(self.after.rss_kib),
            ),
            (
                "children",
                self.before.children as f64,
                self.after.children as f64,
            ),
            (
                "zombies",
                self.before.zombies as f64,
                self.after.zombies as f64,
            ),
        ];
        for (name, before, after) in rows {
            let _ = writeln!(
                out,
                "| {name} | {before:.1} | {after:.1} | {:+.1} |",
                after - before
            );
        }
        out
    }
}
