//! The checks baton runs for the core (issue 9): readiness by "exec" or
//! "accepting", health by "http", "tcp", "exec" and `max_rss`. Each is
//! bounded in time and always answered, as an `Event::ReadyCheck` or an
//! `Event::Probed`: at once (a /proc scan, a check that could not start),
//! through a channel (an HTTP or TCP probe, a task of the loop), or when
//! baton reaps a check process (an exec check; baton is the one reaper of
//! its children, so it never waits on them otherwise).

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::config::{Config, Probe, ReadinessCheck};
use crate::core::{Event, ExitStatus, Hook};

/// What a check process answers.
enum Purpose {
    Ready,
    /// `also`: a failure found before the probe ran (memory).
    Health {
        also: Option<String>,
    },
    /// A `[deploy]` hook; its output goes to `output` (a memfd).
    Hook {
        hook: Hook,
        output: std::fs::File,
    },
}

/// A check process that runs.
struct Running {
    generation: u64,
    purpose: Purpose,
    /// The command, for the failure's detail.
    what: String,
    deadline: Instant,
    bound: Duration,
    timed_out: bool,
}

/// Lines of a hook's output kept for its outcome.
const HOOK_LINES: usize = 20;
/// At most this much of the end of a hook's output is read.
const HOOK_TAIL: u64 = 16 * 1024;

/// The checks in flight that baton must answer for.
pub(crate) struct Checks {
    running: HashMap<Pid, Running>,
    results: mpsc::UnboundedSender<Event>,
}

/// What a check needs to know of the generation it checks.
pub(crate) struct Subject<'a> {
    pub generation: u64,
    /// Its main process (none yet for a before hook).
    pub pid: Option<Pid>,
    pub config: &'a Config,
    /// baton's environment for children, less what systemd set for baton.
    pub env: &'a [(OsString, OsString)],
}

impl Checks {
    /// Answers that come later are sent on `results`.
    pub(crate) fn new(results: mpsc::UnboundedSender<Event>) -> Checks {
        Checks {
            running: HashMap::new(),
            results,
        }
    }

    /// Starts an "exec" readiness check of `subject`. `accepting` is the
    /// answer of an "accepting" check, which the caller made (a scan of
    /// /proc, at once). Returns the answer when it is known now.
    pub(crate) fn ready(
        &mut self,
        subject: &Subject,
        accepting: impl FnOnce() -> bool,
    ) -> Option<Event> {
        let generation = subject.generation;
        match &subject.config.readiness.check {
            ReadinessCheck::Exec { command, interval } => {
                match self.spawn(subject, command, *interval, Purpose::Ready) {
                    Ok(()) => None,
                    // Not ready; the next try comes after the interval.
                    Err(e) => {
                        tracing::warn!("generation {generation}: readiness check: {e}");
                        Some(Event::ReadyCheck {
                            generation,
                            ok: false,
                        })
                    }
                }
            }
            ReadinessCheck::Accepting => Some(Event::ReadyCheck {
                generation,
                ok: accepting(),
            }),
            // Nothing to check: only "exec" and "accepting" ask.
            _ => Some(Event::ReadyCheck {
                generation,
                ok: false,
            }),
        }
    }

    /// Probes `subject`'s health; `memory` is what its processes use now,
    /// checked against `max_rss`. Returns the answer when it is known now.
    pub(crate) fn probe(&mut self, subject: &Subject, memory: Option<u64>) -> Option<Event> {
        let generation = subject.generation;
        let health = &subject.config.health;
        let over = health
            .max_rss
            .zip(memory)
            .filter(|&(max, used)| used > max)
            .map(|(max, used)| format!("memory {} above max_rss {}", mib(used), mib(max)));
        let also = over.clone();
        let answer = move |result: Result<(), String>| {
            let result = match (&over, result) {
                (Some(over), _) => Err(over.clone()),
                (None, result) => result,
            };
            Event::Probed {
                generation,
                ok: result.is_ok(),
                detail: result.err().unwrap_or_default(),
            }
        };
        let timeout = health.timeout;
        match &health.probe {
            None => Some(answer(Ok(()))),
            Some(Probe::Exec(command)) => {
                match self.spawn(subject, command, timeout, Purpose::Health { also }) {
                    Ok(()) => None,
                    Err(e) => Some(answer(Err(e))),
                }
            }
            Some(probe) => {
                let (probe, results) = (probe.clone(), self.results.clone());
                tokio::spawn(async move {
                    let result = tokio::time::timeout(timeout, network(&probe))
                        .await
                        .unwrap_or_else(|_| Err(format!("no answer within {}", secs(timeout))));
                    let _ = results.send(answer(result));
                });
                None
            }
        }
    }

    /// Runs `subject`'s `[deploy]` `hook`, bounded by `before_timeout`; its
    /// output (stdout and stderr) is kept for the answer. Returns the
    /// answer when it is known now (the hook could not start).
    pub(crate) fn hook(&mut self, subject: &Subject, hook: Hook) -> Option<Event> {
        let hooks = &subject.config.hooks;
        let command = match hook {
            Hook::Before => hooks.before.as_ref(),
            Hook::After => hooks.after.as_ref(),
        };
        let generation = subject.generation;
        let failed = |output: String| Event::HookDone {
            generation,
            hook,
            ok: false,
            output,
        };
        let Some(command) = command else {
            return Some(failed("no such hook in the config".into()));
        };
        let output =
            nix::sys::memfd::memfd_create(c"baton-hook", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .map(std::fs::File::from)
                .map_err(|e| format!("cannot make a file for the hook's output: {e}"));
        let spawned = output.and_then(|output| {
            let purpose = Purpose::Hook { hook, output };
            self.spawn(subject, command, hooks.before_timeout, purpose)
        });
        spawned.err().map(failed)
    }

    /// Kills the hook running for `generation`, if one is; its answer, when
    /// reaped, no longer matters.
    pub(crate) fn cancel(&mut self, generation: u64) {
        let hooks = self.running.iter_mut().filter(|(_, r)| {
            r.generation == generation && matches!(r.purpose, Purpose::Hook { .. })
        });
        for (pid, run) in hooks {
            run.timed_out = true;
            kill(*pid);
        }
    }

    /// Starts `command` for `subject`, bounded by `bound`.
    fn spawn(
        &mut self,
        subject: &Subject,
        command: &[String],
        bound: Duration,
        purpose: Purpose,
    ) -> Result<(), String> {
        let app = &subject.config.app;
        let mut child = Command::new(&command[0]);
        child
            .args(&command[1..])
            .env_clear()
            .envs(subject.env.iter().map(|(k, v)| (k, v)))
            .envs(&app.env)
            .env("BATON_GENERATION", subject.generation.to_string())
            .stdin(Stdio::null())
            .process_group(0);
        match &purpose {
            Purpose::Hook { output, .. } => {
                let copy = |f: &std::fs::File| {
                    f.try_clone()
                        .map(Stdio::from)
                        .map_err(|e| format!("cannot pass the hook its output file: {e}"))
                };
                child.stdout(copy(output)?).stderr(copy(output)?);
            }
            _ => {
                child.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        if let Some(pid) = subject.pid {
            child.env("BATON_PID", pid.to_string());
        }
        if let Some(dir) = &app.workdir {
            child.current_dir(dir);
        }
        // As the app's user, when baton may switch to it.
        if let Some(user) = app
            .user
            .as_ref()
            .filter(|_| nix::unistd::geteuid().is_root())
        {
            child.uid(user.uid).gid(user.gid);
        }
        let what = command.join(" ");
        let spawned = child
            .spawn()
            .map_err(|e| format!("cannot run `{what}`: {e}"))?;
        let pid = Pid::from_raw(spawned.id() as i32);
        // Not waited for here: baton's reaper reaps it (`exited`).
        drop(spawned);
        self.running.insert(
            pid,
            Running {
                generation: subject.generation,
                purpose,
                what,
                deadline: Instant::now() + bound,
                bound,
                timed_out: false,
            },
        );
        Ok(())
    }

    /// The answer of the check process `pid` that was reaped, if it was
    /// one.
    pub(crate) fn exited(&mut self, pid: Pid, status: ExitStatus) -> Option<Event> {
        let run = self.running.remove(&pid)?;
        let result = if run.timed_out {
            Err(format!(
                "`{}` took longer than {}",
                run.what,
                secs(run.bound)
            ))
        } else if status == ExitStatus::Code(0) {
            Ok(())
        } else {
            Err(format!("`{}` {status}", run.what))
        };
        Some(match run.purpose {
            Purpose::Ready => Event::ReadyCheck {
                generation: run.generation,
                ok: result.is_ok(),
            },
            Purpose::Health { also } => {
                let result = match also {
                    Some(also) => Err(also),
                    None => result,
                };
                Event::Probed {
                    generation: run.generation,
                    ok: result.is_ok(),
                    detail: result.err().unwrap_or_default(),
                }
            }
            Purpose::Hook { hook, mut output } => {
                let lines = tail(&mut output);
                let text = match (&result, lines.is_empty()) {
                    (Ok(()), _) => lines,
                    (Err(why), true) => format!("{why} (it wrote nothing)"),
                    (Err(why), false) => format!("{why}; its last lines:\n{lines}"),
                };
                Event::HookDone {
                    generation: run.generation,
                    hook,
                    ok: result.is_ok(),
                    output: text,
                }
            }
        })
    }

    /// When the first running check is due to be killed.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.running
            .values()
            .filter(|r| !r.timed_out)
            .map(|r| r.deadline)
            .min()
    }

    /// SIGKILLs (the process group of) every check past its bound; its
    /// exit, when reaped, answers "took longer than".
    pub(crate) fn expire(&mut self, now: Instant) {
        for (pid, run) in &mut self.running {
            if !run.timed_out && run.deadline <= now {
                run.timed_out = true;
                kill(*pid);
            }
        }
    }

    /// Whether `pid` is one of baton's check or hook processes (they carry
    /// a generation's `BATON_GENERATION` but are not its escapees).
    pub(crate) fn runs(&self, pid: Pid) -> bool {
        self.running.contains_key(&pid)
    }
}

/// SIGKILL to a check's process group, and to the process itself should it
/// have left the group: its exit, reaped, is the answer.
fn kill(pid: Pid) {
    let _ = killpg(pid, Signal::SIGKILL);
    let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
}

/// The last [`HOOK_LINES`] lines of what a hook wrote to `output`.
fn tail(output: &mut std::fs::File) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let len = output.seek(SeekFrom::End(0)).unwrap_or(0);
    let mut bytes = Vec::new();
    let read = output
        .seek(SeekFrom::Start(len.saturating_sub(HOOK_TAIL)))
        .and_then(|_| output.read_to_end(&mut bytes));
    if read.is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(HOOK_LINES);
    crate::notice::printable(&lines[from..].join("\n")).into_owned()
}

/// An HTTP or TCP probe, unbounded (the caller bounds it).
async fn network(probe: &Probe) -> Result<(), String> {
    match probe {
        Probe::Tcp(address) => TcpStream::connect(address)
            .await
            .map(drop)
            .map_err(|e| format!("connect to {address}: {e}")),
        Probe::Http {
            address,
            host,
            path,
        } => {
            let mut stream = TcpStream::connect(address)
                .await
                .map_err(|e| format!("connect to {address}: {e}"))?;
            let request = format!(
                "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: baton\r\nConnection: close\r\n\r\n"
            );
            stream
                .write_all(request.as_bytes())
                .await
                .map_err(|e| format!("GET {path}: {e}"))?;
            let mut line = String::new();
            let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(stream, 1024));
            reader
                .read_line(&mut line)
                .await
                .map_err(|e| format!("GET {path}: {e}"))?;
            match status_code(&line) {
                Some(code) if (200..400).contains(&code) => Ok(()),
                Some(code) => Err(format!("GET {path}: HTTP {code}")),
                None if line.is_empty() => Err(format!("GET {path}: closed without an answer")),
                None => Err(format!(
                    "GET {path}: not an HTTP answer: {:?}",
                    line.trim_end()
                )),
            }
        }
        Probe::Exec(_) => Err("an exec probe is a process, not a request".into()),
    }
}

/// "HTTP/1.1 503 Service Unavailable" → 503.
fn status_code(line: &str) -> Option<u16> {
    let mut parts = line.split_whitespace();
    parts.next().filter(|v| v.starts_with("HTTP/1."))?;
    parts.next()?.parse().ok()
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_status_lines() {
        assert_eq!(status_code("HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(status_code("HTTP/1.0 503 Busy\r\n"), Some(503));
        assert_eq!(status_code("SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(status_code(""), None);
    }
}
