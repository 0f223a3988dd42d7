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
//!    killed and named in the log. With a cgroup per generation, "killed"
//!    means everything in its cgroup, and "gone" means the cgroup is empty.
//! 6. The supervisor never sits in the data path: children accept from the
//!    kernel directly.
//!
//! # Module map
//!
//! Dependencies point down this list; nothing below `daemon` does IO of
//! its own except `sockets`, `notify`, `cgroup`, `spawn` and `sys`, which
//! the daemon drives.
//!
//! - `main.rs` (the `baton` binary): the CLI; prints errors once and maps
//!   them to exit codes. Uses [`config`], [`control`] and [`daemon`].
//! - [`daemon`]: the IO shell. One task on a current-thread runtime owns
//!   the core and turns signals, child exits, notify datagrams, control
//!   requests and deadlines into its events, and its actions into
//!   syscalls. It logs [`notice`]s and streams them to `baton events`.
//! - `core`: the sans-IO state machine, `handle(Event, now) -> Vec<Action>`:
//!   every deploy decision, every message to systemd and to waiting
//!   clients, every notice. No IO, no clock.
//! - [`history`]: the release that serves and the deploy history, in
//!   `[state] dir` (written atomically, read leniently).
//! - [`notice`]: what baton tells the world, as types ([`notice::Notice`],
//!   outcomes, exit statuses); their serialized form is protocol.
//! - [`config`]: the TOML file, parsed into raw serde types and validated
//!   into [`config::Config`] (errors with file, line and column).
//! - [`control`]: the control protocol (newline-delimited JSON) and the
//!   CLI's client.
//! - `sd_notify`: sd_notify messages, parsed and rendered (no IO).
//! - `procfs`: what /proc says of a generation's processes: descendants,
//!   memory, CPU, and whether they wait on the listeners ("accepting").
//! - `notify`: the notify socket children report on, and the client of
//!   baton's own service manager.
//! - `sockets`: the listeners baton owns: bound (socket2) or adopted from
//!   systemd by name.
//! - `checks`: readiness and health checks the core asks for (exec, HTTP,
//!   TCP, /proc), each bounded and answered as an event.
//! - `cgroup`: a cgroup v2 directory per generation (made, limited,
//!   killed, watched until empty), where one is usable.
//! - `spawn`: starting a generation's process (prepare, fork/exec, read the
//!   exec report).
//! - `sys`: every `unsafe` block: the child side of fork/exec, and taking
//!   ownership of fds received over a socket.
//!
//! Outside this crate: `testkit/` (the harness and load generator shared by
//! the integration tests in `tests/it/` and the benchmark) and `bench/`
//! (`baton-bench`); both are `publish = false` workspace members, and
//! neither is a dependency of the `baton` binary.

#![warn(unreachable_pub)]

mod cgroup;
mod checks;
pub mod config;
pub mod control;
mod core;
pub mod daemon;
pub mod history;
pub mod notice;
mod notify;
mod procfs;
#[cfg(test)]
mod properties;
mod sd_notify;
mod sockets;
mod spawn;
mod sys;
