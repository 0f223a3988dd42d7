//! baton: a zero-downtime socket-handoff process supervisor for Linux.
//!
//! baton owns the listening sockets of one application and passes them to
//! it as systemd socket activation does (`LISTEN_FDS`). A deploy starts the
//! new version beside the old one and drains the old one only once the new
//! one is ready.
//!
//! # Invariants
//!
//! 1. The supervisor owns every listening socket for its whole life. A
//!    child's exit, crash or shutdown never closes one; the kernel accept
//!    queue is shared by all generations, so a connection waiting in it is
//!    taken by whichever process accepts next.
//! 2. At any time there is at most one *current* generation (ready, serving)
//!    and at most one *candidate* (starting). Draining generations are
//!    bounded in number ([`core::MAX_DRAINING`]) and each has a kill deadline.
//! 3. The old generation is told to drain only after the candidate is
//!    ready. A candidate that fails (exits, fails to exec, misses its
//!    readiness deadline) is stopped and the current generation keeps
//!    serving: a failed deploy is an outcome, never an outage.
//! 4. One deploy runs at a time. A reload asked for during a deploy is
//!    coalesced into one follow-up deploy, never dropped and never run in
//!    parallel.
//! 5. Every wait has a deadline; every child that outlives its deadline is
//!    killed and named in the log.
//! 6. The supervisor never sits in the data path: children accept from the
//!    kernel directly.
//!
//! # Layout
//!
//! - [`config`]: the TOML file, validated into [`config::Config`].
//! - [`core`]: the sans-IO state machine, `handle(Event, now) -> Vec<Action>`.
//! - [`daemon`]: the IO shell that feeds it events and carries out actions.
//! - [`spawn`]: starting a generation's process, with the sockets at fds 3..
//! - `sys`: all the code the compiler cannot check: the child side of
//!   fork/exec, and taking ownership of fds received over a socket.
//! - [`sd_notify`]: the sd_notify messages, parsed and rendered (no IO).
//! - [`sockets`], [`notify`], [`control`]: the sockets baton owns, the
//!   sd_notify sockets, and the control protocol of the CLI.

pub mod config;
pub mod control;
pub mod core;
pub mod daemon;
pub mod notice;
pub mod notify;
pub mod sd_notify;
pub mod sockets;
pub mod spawn;
mod sys;
