//! baton's test kit: what the integration tests (`tests/it`) and the
//! benchmark (`bench/`) share. Never published, never a dependency of the
//! daemon.
//!
//! - [`binaries`]: where `baton` and the example app are, and building the
//!   example app in the profile of the `baton` under test.
//! - [`harness`]: a running `baton run` on a config of its own: start it,
//!   talk to it (CLI and control socket), wait for what it logs, and stop
//!   everything it started.
//! - [`log`]: the one reader of baton's stderr. Every wait for a log line
//!   and every pid of a generation baton started comes from here.
//! - [`app`]: the example app run alone, binding its own port.
//! - [`load`]: the HTTP load generator (on a thread of its own) and single
//!   requests.
//! - [`procs`]: processes started by the kit, killed on drop and by
//!   [`kill_started`] as a last resort; what `/proc` says about a process.
//! - [`activate`]: starting a program with sockets passed the way systemd
//!   passes them (`LISTEN_FDS`), and receiving fds as systemd's fd store does.
//!
//! Rules the kit keeps: every process it starts leads its own process group
//! and is killed by pid (never by name) when its guard drops; every wait has
//! a deadline; traffic goes to loopback only.

pub mod activate;
pub mod app;
pub mod binaries;
pub mod harness;
pub mod load;
pub mod log;
pub mod procs;

pub use app::App;
pub use baton::notice::{ExitStatus, Failure, Notice};
pub use binaries::Binaries;
pub use harness::{Baton, Launch, Listen, Setup};
pub use load::{Load, Mix, Pace, Spec, Tally};
pub use log::Mark;
pub use procs::{alive, eventually, kill_started};

use std::io::Write;

/// Something the kit needed did not happen. `Debug` prints the same text
/// as `Display`, so `unwrap()` in a test shows the whole story (a log tail
/// included) instead of an escaped string.
pub enum Error {
    Io {
        context: String,
        source: std::io::Error,
    },
    Failed(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Io { context, source } => write!(f, "{context}: {source}"),
            Error::Failed(what) => f.write_str(what),
        }
    }
}

impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            Error::Failed(_) => None,
        }
    }
}

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

/// Says that a test did not run, and why, on the real stderr: the test
/// harness captures `eprintln!` of passing tests, and a skip must never
/// look like a pass. `.ci/run` lists these lines.
pub fn skip(test: &str, why: &str) {
    let line = format!("SKIPPED {test}: {why}\n");
    // Straight to fd 2: libtest's capture sees only the print macros.
    let _ = std::io::stderr().write_all(line.as_bytes());
}
