//! The control protocol: newline-delimited JSON over baton's unix control
//! socket. One request per connection; the daemon answers with one or more
//! reply lines (a reload with `wait` streams progress) and closes.
//!
//! ```text
//! → {"v":1,"command":"reload","wait":true}
//! ← {"v":1,"event":"started","generation":7,"pid":4121}
//! ← {"v":1,"event":"ready","generation":7,"after_ms":420}
//! ← {"v":1,"event":"draining","generation":6,"pid":3990}
//! ← {"v":1,"event":"done","ok":true,"message":"generation 7 is serving (ready after 0.42 s)"}
//! ```
//!
//! `v` is the protocol version ([`VERSION`]); a request without one is taken
//! as version 1. Fields may be added within a version; removing or changing
//! one makes a new version.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::core::{Progress, Status};
use crate::notice::{secs, Notice, Outcome};

/// Longest request line the daemon reads.
pub(crate) const MAX_REQUEST: usize = 64 * 1024;

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;

/// A message on the wire: the version beside the request or reply fields.
#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    #[serde(default = "version_one")]
    v: u32,
    #[serde(flatten)]
    body: T,
}

fn version_one() -> u32 {
    1
}

/// Parses one request line; the error says what a valid request looks like.
pub(crate) fn parse_request(line: &str) -> Result<Request, String> {
    let envelope: Envelope<Request> = serde_json::from_str(line).map_err(|e| {
        format!(
            "bad request ({e}); expected one JSON object per line, e.g. \
             {{\"v\":1,\"command\":\"status\"}} (commands: reload, deploy, rollback, history, status, stop, events)"
        )
    })?;
    if envelope.v != VERSION {
        return Err(format!(
            "protocol version {} is not supported: this baton speaks version {VERSION}",
            envelope.v
        ));
    }
    Ok(envelope.body)
}

/// One line on the wire, newline included.
pub fn encode<T: Serialize>(body: T) -> String {
    let mut line =
        serde_json::to_string(&Envelope { v: VERSION, body }).expect("protocol types serialize");
    line.push('\n');
    line
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    /// Re-read the config file and deploy a new generation (of the
    /// release that serves).
    Reload {
        #[serde(default)]
        wait: bool,
    },
    /// Re-read the config file and deploy release `version`.
    Deploy {
        version: String,
        #[serde(default)]
        wait: bool,
    },
    /// Deploy the release that served before the current one (or `to`);
    /// `[deploy] before` runs only `with_hooks`.
    Rollback {
        #[serde(default)]
        to: Option<String>,
        #[serde(default)]
        wait: bool,
        #[serde(default)]
        with_hooks: bool,
    },
    /// The deploy history.
    History,
    Status,
    /// Graceful stop; the connection stays open until baton exits.
    Stop,
    /// Every notice from now on, one `notice` reply each, until the client
    /// closes the connection.
    Events,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Reply {
    /// A reload without `wait` was taken.
    Accepted,
    /// Another deploy runs; this reload follows it.
    Queued,
    Started {
        generation: u64,
        pid: i32,
    },
    Ready {
        generation: u64,
        /// Fractional milliseconds.
        after_ms: f64,
    },
    Draining {
        generation: u64,
        pid: i32,
    },
    Done {
        ok: bool,
        message: String,
    },
    Status(StatusDoc),
    History(crate::history::History),
    Stopping,
    /// The request was refused (bad request, invalid config, ...).
    Error {
        message: String,
    },
    /// An `events` request is registered: every notice from now on follows.
    Following,
    /// Something happened (`events` requests).
    Notice(Notice),
}

impl Reply {
    /// What a waiting client hears of its reload's progress.
    pub(crate) fn progress(p: Progress) -> Reply {
        match p {
            Progress::Accepted => Reply::Accepted,
            Progress::Refused(message) => Reply::Error { message },
            Progress::Queued => Reply::Queued,
            Progress::Started { generation, pid } => Reply::Started {
                generation,
                pid: pid.as_raw(),
            },
            Progress::Ready { generation, after } => Reply::Ready {
                generation,
                after_ms: fractional_ms(after),
            },
            Progress::Draining { generation, pid } => Reply::Draining {
                generation,
                pid: pid.as_raw(),
            },
            Progress::Done(outcome) => done(&outcome),
        }
    }
}

fn done(outcome: &Outcome) -> Reply {
    Reply::Done {
        ok: outcome.succeeded(),
        message: outcome.to_string(),
    }
}

/// What `baton status --json` prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusDoc {
    /// baton's own pid.
    pub pid: u32,
    pub config: String,
    pub generations: Vec<GenerationDoc>,
    pub deploying: bool,
    pub reload_queued: bool,
    pub restarting_in_ms: Option<u64>,
    pub stopping: bool,
    pub last_deploy: Option<DeployDoc>,
    pub listeners: Vec<ListenerDoc>,
    /// How generations are contained: "cgroup DIR" (each in `DIR/gen-N`)
    /// or "process groups (why no cgroup)".
    #[serde(default)]
    pub containment: Option<String>,
    /// Current generations replaced for failing their health checks.
    #[serde(default)]
    pub replaced: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationDoc {
    pub generation: u64,
    pub pid: Option<i32>,
    /// "starting", "probation", "ready" or "draining".
    pub state: String,
    /// On probation: how long until it is promoted.
    #[serde(default)]
    pub probation_left_ms: Option<u64>,
    /// Health checks failed in a row.
    #[serde(default)]
    pub health_failures: u32,
    /// With `[health]` checks: whether one has passed since it serves.
    #[serde(default)]
    pub health_passed: Option<bool>,
    pub age_ms: u64,
    pub ready_after_ms: Option<f64>,
    pub command: String,
    /// The application's own `STATUS=` text.
    pub status: Option<String>,
    /// Its cgroup, when generations have one.
    #[serde(default)]
    pub cgroup: Option<String>,
    /// Memory in use: its cgroup's `memory.current`, else the resident
    /// set of its processes (of its main process without a cgroup).
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    /// CPU time used, in microseconds (its cgroup's, else its main
    /// process's).
    #[serde(default)]
    pub cpu_usec: Option<u64>,
    /// Processes in its cgroup.
    #[serde(default)]
    pub processes: Option<usize>,
    /// Without a cgroup: its processes that left its process group
    /// (setsid) and were adopted by baton; killed when it ends.
    #[serde(default)]
    pub escapees: Vec<i32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeployDoc {
    pub ok: bool,
    pub message: String,
    pub took_ms: f64,
    pub ago_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListenerDoc {
    pub name: String,
    pub address: String,
    /// A reload removed it; it closes once no generation holds it.
    #[serde(default)]
    pub closing: bool,
}

impl StatusDoc {
    pub(crate) fn new(
        status: Status,
        config: &Path,
        listeners: Vec<(String, String, bool)>,
    ) -> StatusDoc {
        let ms = |d: Duration| d.as_millis() as u64;
        StatusDoc {
            pid: std::process::id(),
            config: config.display().to_string(),
            generations: status
                .generations
                .into_iter()
                .map(|g| GenerationDoc {
                    generation: g.generation,
                    pid: g.pid,
                    state: g.state.to_owned(),
                    probation_left_ms: g.probation_left.map(ms),
                    health_failures: g.health_failures,
                    health_passed: g.health_passed,
                    age_ms: ms(g.age),
                    ready_after_ms: g.ready_after.map(fractional_ms),
                    command: g.command,
                    status: g.status,
                    cgroup: None,
                    memory_bytes: None,
                    cpu_usec: None,
                    processes: None,
                    escapees: Vec::new(),
                })
                .collect(),
            deploying: status.deploying,
            reload_queued: status.queued,
            restarting_in_ms: status.restarting_in.map(ms),
            stopping: status.stopping,
            last_deploy: status.last_deploy.map(|(last, now)| DeployDoc {
                ok: last.outcome.succeeded(),
                message: last.outcome.to_string(),
                took_ms: fractional_ms(last.took),
                ago_ms: ms(now.saturating_duration_since(last.finished)),
            }),
            listeners: listeners
                .into_iter()
                .map(|(name, address, closing)| ListenerDoc {
                    name,
                    address,
                    closing,
                })
                .collect(),
            containment: None,
            replaced: status.replaced,
        }
    }

    /// The human table of `baton status`.
    pub fn render(&self) -> String {
        let mut out = format!("baton pid {} ({})\n", self.pid, self.config);
        out += &format!(
            "{:<6} {:<8} {:<9} {:>9} {:>9} {:>8} {:>8}  {}\n",
            "GEN", "PID", "STATE", "AGE", "READY", "MEM", "CPU", "COMMAND"
        );
        for g in &self.generations {
            let pid = g.pid.map_or_else(|| "-".to_owned(), |p| p.to_string());
            let ready = g.ready_after_ms.map_or_else(
                || "-".to_owned(),
                |ms| secs(Duration::from_secs_f64(ms / 1000.0)),
            );
            let memory = g.memory_bytes.map_or_else(|| "-".to_owned(), mebibytes);
            let cpu = g
                .cpu_usec
                .map_or_else(|| "-".to_owned(), |us| secs(Duration::from_micros(us)));
            out += &format!(
                "{:<6} {:<8} {:<9} {:>9} {:>9} {:>8} {:>8}  {}\n",
                g.generation,
                pid,
                g.state,
                age(g.age_ms),
                ready,
                memory,
                cpu,
                g.command
            );
        }
        if self.generations.is_empty() {
            out += "(no generation running)\n";
        }
        for g in &self.generations {
            if let Some(status) = &g.status {
                out += &format!("generation {} says: {status}\n", g.generation);
            }
            if let Some(ms) = g.probation_left_ms {
                out += &format!(
                    "generation {} on probation: promoted in {} unless it fails\n",
                    g.generation,
                    age(ms)
                );
            }
            if g.health_failures > 0 {
                out += &format!(
                    "generation {}: {} health checks failed in a row\n",
                    g.generation, g.health_failures
                );
            }
            if let (Some(cgroup), Some(n)) = (&g.cgroup, g.processes) {
                out += &format!(
                    "generation {}: cgroup {cgroup} ({n} processes)\n",
                    g.generation
                );
            }
            if !g.escapees.is_empty() {
                let pids: Vec<String> = g.escapees.iter().map(i32::to_string).collect();
                out += &format!(
                    "generation {}: left its process group (killed when it ends): pids {}\n",
                    g.generation,
                    pids.join(" ")
                );
            }
        }
        if self.replaced > 0 {
            out += &format!(
                "replaced for failing health checks since start: {}\n",
                self.replaced
            );
        }
        if let Some(containment) = &self.containment {
            out += &format!("containment: {containment}\n");
        }
        if let Some(ms) = self.restarting_in_ms {
            out += &format!("restarting in {:.1}s\n", ms as f64 / 1000.0);
        }
        if self.deploying {
            out += "deploy in progress";
            out += if self.reload_queued {
                " (another queued)\n"
            } else {
                "\n"
            };
        }
        match &self.last_deploy {
            Some(d) => {
                out += &format!(
                    "last deploy: {} ({} ago, took {})\n",
                    d.message,
                    age(d.ago_ms),
                    secs(Duration::from_secs_f64(d.took_ms / 1000.0))
                )
            }
            None => out += "last deploy: none since start\n",
        }
        for l in &self.listeners {
            let closing = if l.closing { " (closing)" } else { "" };
            out += &format!("listener {}: {}{closing}\n", l.name, l.address);
        }
        if self.stopping {
            out += "stopping\n";
        }
        out
    }
}

fn mebibytes(bytes: u64) -> String {
    format!("{:.1}M", bytes as f64 / (1024.0 * 1024.0))
}

fn fractional_ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// A client connection to a running daemon (the CLI side).
pub struct Client {
    reader: BufReader<UnixStream>,
}

impl Client {
    /// Connects and sends `request`. `timeout` bounds each read.
    pub fn send(socket: &Path, request: &Request, timeout: Option<Duration>) -> io::Result<Client> {
        let mut stream = UnixStream::connect(socket)?;
        // Whoever listens there must be root or this user: another user
        // who planted a socket at this path (a /tmp directory made first)
        // would otherwise be believed when it says "deployed".
        let peer =
            nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
                .map_err(io::Error::from)?;
        let me = nix::unistd::geteuid().as_raw();
        if peer.uid() != 0 && peer.uid() != me {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} is served by uid {} (pid {}), neither root nor you (uid {me}): \
                     not trusting it; check who made that directory",
                    socket.display(),
                    peer.uid(),
                    peer.pid()
                ),
            ));
        }
        stream.set_read_timeout(timeout)?;
        match stream.write_all(encode(request).as_bytes()) {
            // The daemon refused the connection before reading the request;
            // its reply (why) is still there to read.
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
            other => other?,
        }
        Ok(Client {
            reader: BufReader::new(stream),
        })
    }

    /// Bounds the wait for the next reply (`None`: wait as long as it takes).
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.reader.get_ref().set_read_timeout(timeout)
    }

    /// The next reply; `None` when the daemon closed the connection.
    pub fn receive(&mut self) -> io::Result<Option<Reply>> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        serde_json::from_str(&line).map(Some).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad reply {line:?}: {e}"),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_is_stable() {
        let r: Request = serde_json::from_str(r#"{"command":"reload","wait":true}"#).unwrap();
        assert_eq!(r, Request::Reload { wait: true });
        let r: Request = serde_json::from_str(r#"{"command":"reload"}"#).unwrap();
        assert_eq!(r, Request::Reload { wait: false });
        assert!(serde_json::from_str::<Request>(r#"{"command":"explode"}"#).is_err());
        let line = serde_json::to_string(&Reply::Started {
            generation: 7,
            pid: 4121,
        })
        .unwrap();
        assert_eq!(line, r#"{"event":"started","generation":7,"pid":4121}"#);
    }
}
