//! The Markdown report: what was run, on what, and the figures. No figure
//! is judged here; the reader compares.

use std::fmt::Write;
use std::path::Path;
use std::time::{Duration, SystemTime};

use hdrhistogram::Histogram;

use crate::scenarios::{
    pace_name, DeployRecord, Handoff, Measurements, Scale, Throughput, Trace, BOOT_DELAY,
    BROKEN_READINESS,
};
use crate::Plan;
use baton_testkit::load::{self, Stats, Tally};

/// One figure of a deploy, when it was measured.
type Figure = fn(&DeployRecord) -> Option<Duration>;
/// How a duration is printed (`us` or `ms`).
type Unit = fn(Duration) -> String;
/// One kind of client's figures in a tally.
type StatsOf = fn(&Tally) -> &Stats;

/// Appends one formatted line to a String (writing to a String cannot fail).
macro_rules! put {
    ($out:expr) => { $out.push('\n') };
    ($out:expr, $($arg:tt)*) => {{
        let _ = writeln!($out, $($arg)*);
    }};
}

pub struct Report<'a> {
    pub plan: &'a Plan,
    /// The command that reruns this.
    pub command: String,
    pub machine: Machine,
    pub started: SystemTime,
    pub took: Duration,
    pub measured: &'a Measurements,
}

impl Report<'_> {
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.intro(&mut out);
        self.at_a_glance(&mut out);
        self.machine.render(&mut out);
        self.method(&mut out);
        self.restarts_and_deploys(&mut out);
        self.cross_check(&mut out);
        self.broken(&mut out);
        self.lying(&mut out);
        throughput(&mut out, &self.measured.throughput);
        self.scale(&mut out);
        supervisor(&mut out, self.measured, &self.measured.throughput);
        timeline(&mut out);
        out
    }

    fn intro(&self, out: &mut String) {
        let mode = if self.plan.quick { "quick" } else { "full" };
        put!(out, "# baton: zero-downtime benchmark\n");
        put!(out, "Reproduce with:\n\n```sh\n{}\n```\n", self.command);
        put!(
            out,
            "Mode **{mode}**, started {} UTC, took {:.0} s. Figures, not assertions: \
             nothing here is judged against a threshold, and a noisy machine moves the \
             timings. The request counts are what they are.\n",
            humantime::format_rfc3339_seconds(self.started),
            self.took.as_secs_f64()
        );
    }

    fn at_a_glance(&self, out: &mut String) {
        let m = self.measured;
        put!(out, "## At a glance\n");
        put!(
            out,
            "Every failed request counts, keep-alive ones included. \"Retrying client\": what a \
             client sees that sends a request once more on a new connection when a reused \
             keep-alive connection closed under it (RFC 9112 §9.3.1); the bench's keep-alive \
             clients do, and both counts are given. Ratios set the phase with restarts or \
             deploys against a steady phase of the same running setup, in the same run.\n"
        );
        put!(
            out,
            "| scenario | load | restarts / deploys | answered | **failed** | of which keep-alive | \
             keep-alive retries (answered) | failed for a retrying client | longest silence | \
             p99 ÷ steady | max ÷ steady |"
        );
        put!(
            out,
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"
        );
        for h in &m.handoffs {
            let t = &h.trace.tally;
            put!(
                out,
                "| {} ({}) | {} | {} of {} | {} | **{}** | {} | {} ({}) | {} | {} | {} | {} |",
                h.way.label(),
                h.way.describe(),
                pace_name(h.pace),
                h.cycles(),
                h.planned,
                t.ok(),
                t.failed(),
                t.keep_alive.failed(),
                t.retried,
                t.recovered,
                t.failed_after_retry(),
                silence(&h.trace, h.way.cycle()),
                ratio(h, 0.99),
                ratio(h, 1.0)
            );
        }
        put!(out);
        let broken = &m.broken;
        let failed_deploys = broken.releases.iter().filter(|r| !r.record.ok).count();
        let kept = broken
            .releases
            .iter()
            .filter(|r| !r.record.ok && r.serving_before == r.serving_after)
            .count();
        put!(
            out,
            "- C: {failed_deploys} broken releases refused, the serving generation kept in \
             {kept} of them; {} requests failed during C.",
            broken.tally.failed()
        );
        for run in &m.lying {
            put!(
                out,
                "- F: a release that lies (READY=1, then dies), probation {}: {} failed \
                 requests; the deploy {}.",
                secs(run.probation),
                run.trace.tally.failed(),
                if run.ok { "was taken" } else { "was cancelled" }
            );
        }
        let d = &m.throughput;
        put!(
            out,
            "- D: throughput under baton / alone = **{:.2}** ({:.0} vs {:.0} requests/s).",
            rate(&d.under_baton) / rate(&d.alone),
            rate(&d.under_baton),
            rate(&d.alone)
        );
        match &m.wrk {
            Ok(passes) => {
                for p in passes {
                    put!(
                        out,
                        "- wrk ({}), {} deploys: {} errors in {} requests ({} steady: {} in {}); \
                         p99 ÷ steady {}, max ÷ steady {}.",
                        wrk_mode(p.deploys.keep_alive),
                        p.deployed,
                        p.deploys.errors(),
                        p.deploys.requests,
                        secs_f(p.steady.seconds),
                        p.steady.errors(),
                        p.steady.requests,
                        duration_ratio(p.deploys.p99, p.steady.p99),
                        duration_ratio(p.deploys.max, p.steady.max)
                    );
                }
            }
            Err(why) => put!(out, "- wrk cross-check: not run: {why}."),
        }
        let records = m.deploys().map_or(&[][..], |b| &b.records[..]);
        let app = spread(records.iter().filter_map(DeployRecord::app_handoff));
        let ready_to_drain = spread(records.iter().filter_map(DeployRecord::ready_to_drain));
        let idle = &m.idle;
        put!(
            out,
            "- baton: the new generation sends READY=1 → the old one has its drain signal, \
             p50 {} as the apps see it ({} inside baton); {} CPU per deploy (p50); {} CPU in \
             {:.0} s idle; RSS {} → {} and {} → {} open fds over {} deploys.\n",
            app.map_or("-".into(), |s| us(s.p50)),
            ready_to_drain.map_or("-".into(), |s| us(s.p50)),
            spread(records.iter().map(|r| r.cpu)).map_or("-".into(), |s| us(s.p50)),
            us(idle.cpu),
            idle.over.as_secs_f64(),
            kib(idle.before.rss_kib),
            kib(idle.after.rss_kib),
            idle.before.fds,
            idle.after.fds,
            records.len()
        );
    }

    fn method(&self, out: &mut String) {
        let p = self.plan;
        let m = self.measured;
        put!(out, "## Method\n");
        put!(
            out,
            "- Load on 127.0.0.1: {} clients each sending `GET /` on a fresh connection \
             (`Connection: close`) and {} keep-alive clients (a third). Every request has a {} s \
             timeout. **Closed loop**: a client sends when its last request has finished; after \
             a failure it waits {} ms (as a retrying client would), so failure counts measure \
             how long an outage lasts, not how fast a refused `connect()` returns. **Open \
             loop**: {:.0} requests/s in all ({:.0}% of the {:.0}/s the app alone answered \
             closed-loop at the start of this run), each client on a fixed schedule: a \
             fresh-connection client sends each request when it is due even while earlier ones \
             are unanswered (up to 64 at once), a keep-alive client as soon as its connection \
             is free; latency counts from when a request was due, so a stall shows in full (no \
             coordinated omission), and no pause after a failure.",
            p.load.mix.fresh,
            p.load.mix.keep_alive,
            p.load.request_timeout.as_secs(),
            p.load.failure_pause.as_millis(),
            m.open_rate,
            crate::scenarios::OPEN_SHARE * 100.0,
            m.calibration
        );
        put!(
            out,
            "- Outcomes: ok (`200` with `generation=<n>`), refused, reset (reset or closed before \
             a complete response), timed out, wrong (another answer), other (a local error). \
             Every failure is counted. A keep-alive request that fails on a reused connection \
             before any byte of the response is then sent once more on a new connection; that \
             retry is counted as a request of its own, and how many such retries were answered \
             is reported apart."
        );
        put!(
            out,
            "- The app is `examples/hello` with a {} ms boot delay (`HELLO_BOOT_DELAY_MS`). \
             A: it binds its port itself; each restart sends SIGTERM, waits for the exit and \
             starts it again, like `systemctl restart`. A′: the same, but the bench holds the \
             listening socket (backlog 1024, as baton's) across the restarts and passes it in \
             as fd 3 (`LISTEN_FDS`), as systemd does for a socket-activated service. B: it runs \
             under `baton run`; each deploy is `baton reload --wait` (spoken directly on the \
             control socket). On its drain signal hello stops accepting, answers what it has \
             received with `Connection: close` and closes an idle keep-alive connection after a \
             500 ms grace.",
            BOOT_DELAY.as_millis()
        );
        put!(
            out,
            "- Each of A, A′ and B first runs {} steady (the same running setup, nothing \
             changing), then its restarts / deploys with {} of load between them; the ratios \
             divide the second phase's p99 and max latency by the steady phase's. Latencies are \
             of answered requests, in HDR histograms.",
            secs(p.steady),
            secs(p.spacing)
        );
        let pinned = m
            .handoffs
            .first()
            .and_then(|h| h.trace.tally.pinned)
            .map_or("not pinned (one CPU)".into(), |c| {
                format!("pinned to CPU {c}")
            });
        put!(
            out,
            "- The load generator runs on a thread of its own, {pinned}; the orchestration \
             (restarts, deploys) runs on another, unpinned, as are the processes it starts. A \
             heartbeat task measures how late the load's event loop wakes up: a silence or a \
             latency no longer than that may be the bench's own, not the server's."
        );
        put!(
            out,
            "- Handoff latency from the apps' side: hello logs, with a wall-clock µs timestamp, \
             when it has sent READY=1 and when its drain signal arrived; from the new one's to \
             the old one's line is the whole handoff (the datagram, baton, the signal). baton's \
             own figures come from its JSON log (`--log-format json`, µs timestamps) on the same \
             clock; its CPU time from `/proc/<pid>/task/*/schedstat` (ns), RSS from `VmRSS`, fds \
             from `/proc/<pid>/fd`."
        );
        put!(
            out,
            "- Cross-check: where `wrk` is installed, one wrk run per mode (keep-alive, and \
             `Connection: close` on every request) against the app under baton, {} connections, \
             {} steady and then {} with deploys {} apart; its own error counts are reported.\n",
            p.load.mix.fresh + p.load.mix.keep_alive,
            secs(p.steady),
            secs(p.wrk_for),
            secs(p.spacing)
        );
    }

    fn restarts_and_deploys(&self, out: &mut String) {
        let m = self.measured;
        put!(
            out,
            "## A, A′ and B: requests, steady and during restarts / deploys\n"
        );
        put!(out, "| scenario | load | phase | client | ok | refused | reset | timed out | wrong | other | latency p50 / p99 / p99.9 / max |");
        put!(
            out,
            "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
        );
        for h in &m.handoffs {
            let name = h.way.label();
            let load = pace_name(h.pace);
            let cycles = format!("{}s", h.way.cycle());
            for (phase, tally) in [("steady", &h.steady), (cycles.as_str(), &h.trace.tally)] {
                stats_row(out, name, &load, phase, "fresh connection", &tally.fresh);
                stats_row(out, name, &load, phase, "keep-alive", &tally.keep_alive);
            }
        }
        put!(out);
        for h in &m.handoffs {
            let all = h.trace.tally.all();
            put!(
                out,
                "{} ({}): answered after more than {} ms: {} (steady: {}); the load generator \
                 itself held up for at most {} (steady: {}).\n",
                h.way.label(),
                pace_name(h.pace),
                SLOW.as_millis(),
                slower_than(&all.latency, SLOW),
                slower_than(&h.steady.all().latency, SLOW),
                stall(&h.trace.tally),
                stall(&h.steady)
            );
            if let Some(outage) = spread(h.outages.iter().copied()) {
                put!(
                    out,
                    "{} ({}), from SIGTERM to the new process answering: p50 {}, max {} (of which \
                     {} ms is the app's boot delay).\n",
                    h.way.label(),
                    pace_name(h.pace),
                    ms(outage.p50),
                    ms(outage.max),
                    BOOT_DELAY.as_millis()
                );
            }
        }
        for h in &m.handoffs {
            let name = format!("{} ({})", h.way.label(), pace_name(h.pace));
            errors(out, &name, &h.trace.tally);
        }
    }

    fn cross_check(&self, out: &mut String) {
        put!(out, "## wrk cross-check (under baton)\n");
        let passes = match &self.measured.wrk {
            Ok(passes) => passes,
            Err(why) => {
                put!(out, "Not run: {why}.\n");
                return;
            }
        };
        put!(out, "| mode | phase | deploys | requests | connect / read / write / timeout errors | non-2xx | latency p50 / p99 / max |");
        put!(out, "| --- | --- | ---: | ---: | --- | ---: | --- |");
        for p in passes {
            for (phase, r, deploys) in [
                ("steady", &p.steady, 0),
                ("deploys", &p.deploys, p.deployed),
            ] {
                put!(
                    out,
                    "| {} | {phase} | {deploys} | {} | {} / {} / {} / {} | {} | {} / {} / {} |",
                    wrk_mode(p.deploys.keep_alive),
                    r.requests,
                    r.connect_errors,
                    r.read_errors,
                    r.write_errors,
                    r.timeouts,
                    r.non_2xx,
                    opt_ms(r.p50),
                    opt_ms(r.p99),
                    opt_ms(r.max)
                );
            }
        }
        put!(out);
        let failed: usize = passes.iter().map(|p| p.deploys_failed).sum();
        put!(
            out,
            "Deploys that failed during the wrk runs: {failed}. wrk counts a read error when a \
             connection closes under a request, so keep-alive errors here are what clients that \
             do not retry would see.\n"
        );
    }

    fn broken(&self, out: &mut String) {
        let c = &self.measured.broken;
        put!(out, "## C: broken releases under baton\n");
        put!(
            out,
            "Readiness deadline {} s. `crash` exits with code 3 after its boot delay; \
             `never-ready` holds the sockets and never sends READY=1.\n",
            BROKEN_READINESS.as_secs()
        );
        put!(out, "| release | outcome (baton's words) | reload → outcome | serving generation before → after |");
        put!(out, "| --- | --- | ---: | --- |");
        for r in &c.releases {
            put!(
                out,
                "| {} | {} | {} | {} → {} |",
                r.name,
                r.record.outcome,
                r.record.took().map_or("-".into(), ms),
                generation(r.serving_before),
                generation(r.serving_after)
            );
        }
        put!(out);
        put!(
            out,
            "Requests during C: {} answered, {} failed (refused {}, reset {}, timed out {}, wrong \
             {}, other {}), {} keep-alive retries.\n",
            c.tally.ok(),
            c.tally.failed(),
            c.tally.all().refused,
            c.tally.all().reset,
            c.tally.all().timed_out,
            c.tally.all().wrong,
            c.tally.all().other,
            c.tally.retried
        );
        errors(out, "C", &c.tally);
    }

    fn lying(&self, out: &mut String) {
        put!(out, "## F: a lying release (READY=1, then it dies)\n");
        put!(
            out,
            "The release sends READY=1 and exits {} ms later without serving, as gunicorn's \
             arbiter does when its workers cannot import the app. It is deployed under the \
             closed-loop load; {} s later a good release is deployed again. Without probation \
             baton believes the READY=1, drains the old generation, and the lying release \
             crash-restarts until the good deploy; with probation the old generation serves \
             beside it until it dies, and the deploy is cancelled.\n",
            crate::scenarios::LIE_FOR.as_millis(),
            crate::scenarios::LIE_WATCH.as_secs()
        );
        put!(out, "| probation | the lying deploy's outcome (baton's words) | answered | **failed** | longest silence |");
        put!(out, "| --- | --- | ---: | ---: | --- |");
        for run in &self.measured.lying {
            put!(
                out,
                "| {} | {} | {} | **{}** | {} |",
                if run.probation.is_zero() {
                    "none".to_owned()
                } else {
                    secs(run.probation)
                },
                run.outcome,
                run.trace.tally.ok(),
                run.trace.tally.failed(),
                silence(&run.trace, "deploy")
            );
        }
        put!(out);
        for run in &self.measured.lying {
            errors(
                out,
                &format!("F (probation {})", secs(run.probation)),
                &run.trace.tally,
            );
        }
    }

    fn scale(&self, out: &mut String) {
        put!(out, "## E: scale with the number of listeners\n");
        put!(
            out,
            "Workers per generation: 1 (baton runs one process per generation). The app boots at \
             once and no load is applied: what grows is baton's own work. {} deploys per row.\n",
            self.plan.scale_deploys
        );
        put!(out, "| listeners | bound / answering | reload → outcome p50 / max | request → spawned p50 | READY → drain p50 | baton CPU per deploy p50 | baton RSS | baton fds |");
        put!(out, "| ---: | --- | --- | ---: | ---: | ---: | --- | --- |");
        for run in &self.measured.scale {
            scale_row(out, run);
        }
        put!(out);
    }
}

fn stats_row(out: &mut String, scenario: &str, load: &str, phase: &str, client: &str, s: &Stats) {
    put!(
        out,
        "| {scenario} | {load} | {phase} | {client} | {} | {} | {} | {} | {} | {} | {} |",
        s.ok,
        s.refused,
        s.reset,
        s.timed_out,
        s.wrong,
        s.other,
        latency(&s.latency)
    );
}

fn errors(out: &mut String, scenario: &str, tally: &Tally) {
    if tally.errors.is_empty() {
        return;
    }
    let mut errors: Vec<(&String, &u64)> = tally.errors.iter().collect();
    errors.sort_by(|x, y| y.1.cmp(x.1));
    put!(out, "Errors seen in {scenario}, most frequent first:\n");
    for (error, n) in errors.iter().take(6) {
        put!(out, "- {n} × {error}");
    }
    put!(out);
}

fn throughput(out: &mut String, d: &Throughput) {
    put!(out, "## D: throughput, the app alone vs under baton\n");
    put!(
        out,
        "Both run at the same time; the load alternates between them, round by round, in \
         ABBA order. baton is not in the data path: the app accepts from the kernel directly.\n"
    );
    put!(out, "| | app alone | app under baton | ratio |");
    put!(out, "| --- | ---: | ---: | ---: |");
    put!(
        out,
        "| answered requests/s | {:.0} | {:.0} | **{:.2}** |",
        rate(&d.alone),
        rate(&d.under_baton),
        rate(&d.under_baton) / rate(&d.alone)
    );
    let rows: [(&str, StatsOf); 2] = [
        ("fresh connection", |t| &t.fresh),
        ("keep-alive", |t| &t.keep_alive),
    ];
    for (name, stats) in rows {
        let (alone, baton) = (stats(&d.alone), stats(&d.under_baton));
        for (q, label) in [(0.5, "p50"), (0.99, "p99"), (0.999, "p99.9")] {
            let (x, y) = (quantile(&alone.latency, q), quantile(&baton.latency, q));
            put!(
                out,
                "| {name} latency {label} | {} | {} | {:.2} |",
                ms(x),
                ms(y),
                y.as_secs_f64() / x.as_secs_f64().max(1e-9)
            );
        }
    }
    put!(
        out,
        "| failed requests | {} | {} | |",
        d.alone.failed(),
        d.under_baton.failed()
    );
    put!(out);
    let rounds: Vec<String> = d
        .rounds
        .iter()
        .map(|(alone, baton)| format!("{alone:.0} / {baton:.0}"))
        .collect();
    put!(
        out,
        "Requests/s per round (alone / under baton): {}.\n",
        rounds.join(", ")
    );
}

fn scale_row(out: &mut String, run: &Scale) {
    let took = spread(run.records.iter().filter_map(DeployRecord::took));
    let p50 =
        |f: Figure| spread(run.records.iter().filter_map(f)).map_or("-".into(), |s| us(s.p50));
    put!(
        out,
        "| {} | {} / {} | {} | {} | {} | {} | {} → {} | {} → {} |",
        run.listeners,
        run.bound,
        run.answering,
        took.map_or("-".into(), |s| format!("{} / {}", ms(s.p50), ms(s.max))),
        p50(DeployRecord::request_to_spawn),
        p50(DeployRecord::ready_to_drain),
        p50(|r| Some(r.cpu)),
        kib(run.start.rss_kib),
        kib(run.end.rss_kib),
        run.start.fds,
        run.end.fds
    );
}

fn supervisor(out: &mut String, m: &Measurements, d: &Throughput) {
    put!(out, "## baton's own figures (from B, closed loop)\n");
    put!(out, "| per deploy | p50 | p99 | max | n |");
    put!(out, "| --- | ---: | ---: | ---: | ---: |");
    let records = m.deploys().map_or(&[][..], |b| &b.records[..]);
    let b = &m.idle;
    let rows: [(&str, Figure, Unit); 7] = [
        (
            "reload request → candidate spawned (fork/exec returned)",
            DeployRecord::request_to_spawn,
            us,
        ),
        (
            "of which inside baton: deploy start → spawned",
            DeployRecord::fork_exec,
            us,
        ),
        (
            "**the new app sent READY=1 → the old app has its drain signal** (the apps' clocks)",
            DeployRecord::app_handoff,
            us,
        ),
        (
            "of which inside baton: READY=1 processed → drain signal sent",
            DeployRecord::ready_to_drain,
            us,
        ),
        (
            "reload request → outcome (`reload --wait` returns; includes the app's boot)",
            DeployRecord::took,
            ms,
        ),
        (
            "drain signal → old generation exited",
            DeployRecord::drain,
            ms,
        ),
        (
            "baton CPU time, request → old generation reaped",
            |r| Some(r.cpu),
            us,
        ),
    ];
    for (name, figure, unit) in rows {
        match spread(records.iter().filter_map(figure)) {
            Some(s) => put!(
                out,
                "| {name} | {} | {} | {} | {} |",
                unit(s.p50),
                unit(s.p99),
                unit(s.max),
                s.n
            ),
            None => put!(out, "| {name} | - | - | - | 0 |"),
        }
    }
    put!(out);
    put!(out, "| baton process | |");
    put!(out, "| --- | ---: |");
    put!(
        out,
        "| CPU time over {:.1} s idle (app serving, no load, no deploy) | {} |",
        b.over.as_secs_f64(),
        us(b.cpu)
    );
    put!(
        out,
        "| CPU time during D ({:.0} s; its app under load half of it, no deploy) | {} |",
        d.baton_over.as_secs_f64(),
        us(d.baton_cpu)
    );
    put!(
        out,
        "| RSS before → after {} deploys | {} → {} |",
        records.len(),
        kib(b.before.rss_kib),
        kib(b.after.rss_kib)
    );
    put!(
        out,
        "| open fds before → after {} deploys | {} → {} |\n",
        records.len(),
        b.before.fds,
        b.after.fds
    );
    put!(
        out,
        "\"READY=1 processed\" is when baton logs \"generation N is ready\", i.e. when it has \
         read the datagram; the apps' figure runs from the new app's `READY=1` send to the old \
         app's receipt of SIGTERM, both timed by the apps.\n"
    );
}

fn timeline(out: &mut String) {
    put!(out, "## Timeline\n");
    put!(
        out,
        "![requests per 10 ms window during restarts (A, A′) and deploys (B)](timeline.svg)\n"
    );
    put!(
        out,
        "Requests answered per {} ms window, one colour per generation that answered; failed \
         requests in red below the axis. Vertical lines: restart / deploy start (grey), new \
         process ready (green), old process exited (black). Under each chart, every process's \
         life: booting (pale), serving (full colour), draining (middle). At most the first {} \
         restarts / deploys are drawn; the tables count all of them.",
        load::WINDOW.as_millis(),
        crate::plot::SHOWN_CYCLES
    );
}

/// Figures for stdout at the end of a run.
impl Report<'_> {
    pub fn headline(&self) -> String {
        let m = self.measured;
        let mut lines = Vec::new();
        for h in &m.handoffs {
            let t = &h.trace.tally;
            lines.push(format!(
                "{:<2} {:<31} {:<20} {} failed ({} keep-alive, {} for a retrying client) in {} \
                 {}s; p99/max ÷ steady {} / {}; longest silence {}",
                h.way.label(),
                h.way.describe(),
                pace_name(h.pace),
                t.failed(),
                t.keep_alive.failed(),
                t.failed_after_retry(),
                h.cycles(),
                h.way.cycle(),
                ratio(h, 0.99),
                ratio(h, 1.0),
                silence(&h.trace, h.way.cycle())
            ));
        }
        if let Ok(passes) = &m.wrk {
            for p in passes {
                lines.push(format!(
                    "wrk ({}): {} errors in {} requests with {} deploys",
                    wrk_mode(p.deploys.keep_alive),
                    p.deploys.errors(),
                    p.deploys.requests,
                    p.deployed
                ));
            }
        }
        for run in &m.lying {
            lines.push(format!(
                "F lying release, probation {}: {} failed requests ({})",
                secs(run.probation),
                run.trace.tally.failed(),
                run.outcome
            ));
        }
        let d = &m.throughput;
        lines.push(format!(
            "C broken releases: {} failed requests; D throughput under baton / alone: {:.2}",
            m.broken.tally.failed(),
            rate(&d.under_baton) / rate(&d.alone)
        ));
        let records = m.deploys().map_or(&[][..], |b| &b.records[..]);
        let app = spread(records.iter().filter_map(DeployRecord::app_handoff));
        lines.push(format!(
            "handoff READY=1 sent → drain signal received p50 {}; baton idle CPU {} in {:.0} s",
            app.map_or("-".into(), |s| us(s.p50)),
            us(m.idle.cpu),
            m.idle.over.as_secs_f64()
        ));
        lines.join("\n")
    }
}

// ---------------------------------------------------------------------------
// The machine
// ---------------------------------------------------------------------------

pub struct Machine {
    cpu: String,
    cores: usize,
    memory: String,
    kernel: String,
    load: String,
    baton: String,
}

impl Machine {
    /// Read before the bench loads the machine (for the load average).
    pub fn describe(baton: &Path) -> Machine {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map_or("unknown", |v| v.trim_start_matches([' ', '\t', ':']));
        let memory = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .map_or("unknown".into(), kib);
        let load = read("/proc/loadavg");
        let load: Vec<&str> = load.split_whitespace().take(3).collect();
        Machine {
            cpu: cpu.to_owned(),
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            memory,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            load: load.join(" "),
            baton: baton_version(baton),
        }
    }

    fn render(&self, out: &mut String) {
        put!(out, "## Machine\n");
        put!(out, "| | |\n| --- | --- |");
        put!(out, "| CPU | {} |", self.cpu);
        put!(out, "| cores available | {} |", self.cores);
        put!(out, "| memory | {} |", self.memory);
        put!(out, "| kernel | Linux {} |", self.kernel);
        put!(
            out,
            "| load average before the run (1, 5, 15 min) | {} |",
            self.load
        );
        put!(out, "| baton | {} |\n", self.baton);
    }
}

/// The version the measured binary reports, the git commit when the source
/// tree is at hand, and the build profile (a debug build's figures mean
/// little).
fn baton_version(baton: &Path) -> String {
    let version = std::process::Command::new(baton)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| format!("{} (no --version)", baton.display()));
    let git = std::process::Command::new("git")
        .args([
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "describe",
            "--always",
            "--dirty",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    let profile = if cfg!(debug_assertions) {
        "**debug build: rerun with --release**"
    } else {
        "release build"
    };
    match git {
        Some(commit) => format!("{version} (commit {commit}), {profile}"),
        None => format!("{version}, {profile}"),
    }
}

// ---------------------------------------------------------------------------
// Numbers
// ---------------------------------------------------------------------------

/// Nearest-rank percentiles of a few samples.
#[derive(Debug, Clone, Copy)]
pub struct Spread {
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    pub n: usize,
}

pub fn spread(values: impl Iterator<Item = Duration>) -> Option<Spread> {
    let mut values: Vec<Duration> = values.collect();
    if values.is_empty() {
        return None;
    }
    values.sort();
    let rank =
        |q: f64| values[((q * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1];
    Some(Spread {
        p50: rank(0.5),
        p99: rank(0.99),
        max: values[values.len() - 1],
        n: values.len(),
    })
}

/// A request slower than this was felt by its user, failed or not.
const SLOW: Duration = Duration::from_millis(100);

fn slower_than(h: &Histogram<u64>, limit: Duration) -> u64 {
    let limit = u64::try_from(limit.as_micros()).unwrap_or(u64::MAX);
    if h.max() <= limit {
        return 0;
    }
    h.count_between(limit + 1, h.max())
}

fn quantile(h: &Histogram<u64>, q: f64) -> Duration {
    Duration::from_micros(h.value_at_quantile(q))
}

fn latency(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "-".into();
    }
    format!(
        "{} / {} / {} / {}",
        ms(quantile(h, 0.5)),
        ms(quantile(h, 0.99)),
        ms(quantile(h, 0.999)),
        ms(Duration::from_micros(h.max()))
    )
}

/// Answered requests per second.
fn rate(tally: &Tally) -> f64 {
    tally.ok() as f64 / tally.elapsed.as_secs_f64().max(1e-9)
}

/// Latency at quantile `q` (1.0: the max) during the restarts / deploys,
/// over the same in the steady phase.
fn ratio(h: &Handoff, q: f64) -> String {
    let (during, steady) = (h.trace.tally.all().latency, h.steady.all().latency);
    if during.is_empty() || steady.is_empty() {
        return "-".into();
    }
    let at = |hist: &Histogram<u64>| {
        if q >= 1.0 {
            hist.max()
        } else {
            hist.value_at_quantile(q)
        }
    };
    format!("{:.2}×", at(&during) as f64 / at(&steady).max(1) as f64)
}

fn duration_ratio(during: Option<Duration>, steady: Option<Duration>) -> String {
    match (during, steady) {
        (Some(d), Some(s)) if !s.is_zero() => {
            format!("{:.2}×", d.as_secs_f64() / s.as_secs_f64())
        }
        _ => "-".into(),
    }
}

fn wrk_mode(keep_alive: bool) -> &'static str {
    if keep_alive {
        "keep-alive"
    } else {
        "`Connection: close`"
    }
}

fn opt_ms(d: Option<Duration>) -> String {
    d.map_or("-".into(), ms)
}

fn secs_f(s: f64) -> String {
    format!("{s:.1} s")
}

/// The longest silence of a trace, and whether a restart or deploy (`what`)
/// was in progress then.
fn silence(trace: &Trace, what: &str) -> String {
    let Some((at, length)) = trace.longest_silence() else {
        return format!(
            "none (every {} ms window had answers)",
            load::WINDOW.as_millis()
        );
    };
    let when = match trace.cycle_during(at, at + length.as_secs_f64()) {
        Some(n) => format!("during {what} {n}"),
        None => format!("between {what}s"),
    };
    format!("{} ms at {at:.2} s, {when}", length.as_millis())
}

fn stall(tally: &Tally) -> String {
    format!("{} (at {:.2} s)", ms(tally.stall.late), tally.stall.at)
}

fn generation(g: Option<u64>) -> String {
    g.map_or("none".into(), |g| g.to_string())
}

pub fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

pub fn us(d: Duration) -> String {
    format!("{} µs", d.as_micros())
}

pub fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

fn kib(kib: u64) -> String {
    if kib >= 10 * 1024 {
        format!("{:.0} MiB", kib as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", kib as f64 / 1024.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let ms = Duration::from_millis;
        let s = spread((1..=100).map(ms)).unwrap();
        assert_eq!((s.p50, s.p99, s.max, s.n), (ms(50), ms(99), ms(100), 100));
        let s = spread([ms(3), ms(1), ms(2)].into_iter()).unwrap();
        assert_eq!((s.p50, s.p99, s.max), (ms(2), ms(3), ms(3)));
        assert!(spread(std::iter::empty()).is_none());
    }
}
