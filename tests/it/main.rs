//! Integration tests: the real `baton` binary supervising the real example
//! app (`examples/hello.rs`), through the test kit (`testkit/`, shared with
//! the benchmark). One test binary, one module per theme:
//!
//! - `deploy`: deploys under load, broken releases, deadlines (issue 2).
//! - `lifecycle`: start, stop, restart, config errors, the child contract.
//! - `control`: the control socket: who may use it, and what a misbehaving
//!   client gets (issue 3).
//! - `cgroups`: a cgroup per generation: containment, kill, limits (issue
//!   8; as root).
//! - `health`: probation, health checks, readiness without code in the app
//!   (issue 9).
//! - `hardening`: processes that try to escape the kill, hostile or careless
//!   children and clients, children as another user (issue 8).
//! - `listeners`: `[[listen]]` changed by reload (issue 10).
//! - `releases`: `{version}`, deploy, rollback, history, the serving
//!   release across restarts (issue 9).
//! - `systemd`: socket activation, the fd store, and the sd_notify messages
//!   baton sends to its own service manager.
//! - `keepalive`: the app's side of a handoff: boot, keep-alive (issue 13).

mod cgroups;
mod control;
mod deploy;
mod hardening;
mod health;
mod keepalive;
mod lifecycle;
mod listeners;
mod releases;
mod systemd;

use std::path::Path;
use std::time::Duration;

use baton_testkit::{load, Baton, Binaries, Setup};

/// The binary under test.
pub const BATON: &str = env!("CARGO_BIN_EXE_baton");

/// How long a single GET may take.
const GET_LIMIT: Duration = Duration::from_secs(10);

/// baton and the example app, built in the same profile.
pub fn binaries() -> &'static Binaries {
    Binaries::for_tests(BATON)
}

/// baton supervising the example app on one listener at 127.0.0.1.
pub fn setup() -> Setup {
    Setup::new(binaries())
}

/// Starts baton on `setup` and waits until its first generation is ready.
pub fn start(setup: &Setup) -> Baton {
    Baton::start(setup).unwrap()
}

/// One GET on 127.0.0.1:`port`; the generation that answered.
pub fn get_generation(port: u16) -> u64 {
    let target = ([127, 0, 0, 1], port).into();
    load::probe(target, GET_LIMIT).unwrap_or_else(|e| panic!("GET on port {port}: {e}"))
}

/// One GET over a unix socket listener; the generation that answered.
pub fn unix_get_generation(path: &Path) -> u64 {
    load::probe_unix(path, GET_LIMIT).unwrap_or_else(|e| panic!("GET on {}: {e}", path.display()))
}
