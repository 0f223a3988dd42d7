//! Processes the kit starts, and what `/proc` says about a process.
//!
//! Every process the kit starts leads its own process group and is
//! registered until it is known to be gone; so are the generations baton
//! starts (the [`log`](crate::log) reader learns their pids). Guards kill
//! their processes when dropped, also when a test fails; [`kill_started`]
//! is the last resort for the benchmark (on Ctrl-C, and from its panic hook:
//! release builds abort on panic, so no destructor would run).

use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

use crate::{Context, Result};

/// Process groups to kill if nothing else does.
static STARTED: Mutex<Vec<i32>> = Mutex::new(Vec::new());

/// Variables that would make baton or the example app think they were
/// socket activated or supervised (when the tests run under systemd, or
/// under baton), or that configure the example app.
const INHERITED: &[&str] = &[
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "LISTEN_PIDFDID",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "JOURNAL_STREAM",
    "BATON_GENERATION",
    "BATON_CONFIG",
    "BATON_LOG",
    "HELLO_ADDR",
    "HELLO_FAIL",
    "HELLO_BOOT_DELAY_MS",
    "HELLO_BOOT_GATE",
    "HELLO_EXPECT_FDNAMES",
    "HELLO_DRAIN_IDLE_MS",
    "HELLO_HEALTH",
    "HELLO_WEDGE_GATE",
    "HELLO_EXIT_AFTER_MS",
];

pub(crate) fn register(pid: i32) {
    started().push(pid);
}

/// Forgets `pid`: it has been reaped (its number may be reused).
pub fn unregister(pid: i32) {
    started().retain(|&p| p != pid);
}

fn started() -> MutexGuard<'static, Vec<i32>> {
    STARTED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// SIGKILLs every registered process group that still exists.
pub fn kill_started() {
    // try_lock: a panic hook may run while this thread holds the lock.
    let mut started = match STARTED.try_lock() {
        Ok(guard) => guard,
        Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
        Err(TryLockError::WouldBlock) => return,
    };
    for pid in started.drain(..) {
        kill_group(pid);
    }
}

/// SIGKILLs the process group led by `pid`, if `pid` still leads one: a pid
/// that was reaped may have been reused by a process that is not ours.
pub(crate) fn kill_group(pid: i32) {
    if leads_own_group(pid) {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

fn leads_own_group(pid: i32) -> bool {
    stat_field(pid, 2) == Some(pid.to_string())
}

/// Field `n` (from 0) after the command name of `/proc/<pid>/stat`:
/// 0 is the state, 1 the parent, 2 the process group.
fn stat_field(pid: i32, n: usize) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
    let (_, fields) = stat.rsplit_once(')')?;
    fields.split_whitespace().nth(n).map(str::to_owned)
}

/// Removes from `command`'s environment what the kit's own environment
/// would wrongly pass on.
pub(crate) fn clean_env(command: &mut Command) {
    for name in INHERITED {
        command.env_remove(name);
    }
}

/// Spawns `command` as the leader of a new process group and registers it
/// (for [`kill_started`]; [`unregister`] it once reaped).
pub fn spawn(command: &mut Command, what: &str) -> Result<(Child, i32)> {
    // Its own group: a Ctrl-C in the terminal reaches only the test or the
    // bench, and killpg reaches whatever the process forks.
    let child = command
        .process_group(0)
        .spawn()
        .context(|| format!("cannot start {what}"))?;
    let pid = i32::try_from(child.id()).expect("pids fit in i32");
    register(pid);
    Ok((child, pid))
}

/// Sends `signal` to `pid`, ignoring a process that is already gone.
pub fn signal(pid: i32, signal: Signal) {
    let _ = kill(Pid::from_raw(pid), signal);
}

/// True while a process with this pid exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    stat_field(pid, 0).is_some_and(|state| state != "Z")
}

/// The children of `pid` (of all its threads).
pub fn children(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut children: Vec<i32> = tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect();
    children.sort_unstable();
    children
}

/// How many sockets process `pid` has open.
pub fn socket_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|target| target.to_string_lossy().starts_with("socket:"))
                .count()
        })
        .unwrap_or(0)
}

/// Polls `condition` every 10 ms until it holds or `timeout` passes. Only
/// for states with no event to wait on (a pid disappearing).
pub fn eventually(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    condition()
}

/// CPU time of all threads of `pid`, from `/proc/<pid>/task/*/schedstat`
/// (its first field is nanoseconds on the CPU: far finer than the clock
/// ticks of `/proc/<pid>/stat`).
pub fn cpu_time(pid: i32) -> Result<Duration> {
    let tasks = format!("/proc/{pid}/task");
    let mut nanos = 0u64;
    for task in std::fs::read_dir(&tasks).context(|| format!("cannot list {tasks}"))? {
        let path = task
            .context(|| format!("cannot list {tasks}"))?
            .path()
            .join("schedstat");
        let text = std::fs::read_to_string(&path).unwrap_or_default(); // a thread may just have exited
        nanos += text
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
    }
    Ok(Duration::from_nanos(nanos))
}

/// Resident memory and open file descriptors of a process.
#[derive(Debug, Clone, Copy)]
pub struct Footprint {
    pub rss_kib: u64,
    pub fds: usize,
}

impl Footprint {
    pub fn of(pid: i32) -> Result<Footprint> {
        let path = format!("/proc/{pid}/status");
        let status = std::fs::read_to_string(&path).context(|| format!("cannot read {path}"))?;
        let rss = status.lines().find_map(|l| l.strip_prefix("VmRSS:"));
        let rss_kib = rss
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| crate::Error::Failed(format!("no VmRSS in {path}")))?;
        let dir = format!("/proc/{pid}/fd");
        let fds = std::fs::read_dir(&dir)
            .context(|| format!("cannot list {dir}"))?
            .count();
        Ok(Footprint { rss_kib, fds })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_seen_in_proc() {
        let me = std::process::id() as i32;
        assert!(alive(me));
        assert!(cpu_time(me).unwrap() > Duration::ZERO);
        assert!(Footprint::of(me).unwrap().fds >= 3);
        assert!(!alive(i32::MAX));
    }
}
