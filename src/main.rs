//! The `baton` command line. Typed errors come up from the library; this is
//! the one place that prints them and maps them to exit codes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use baton::config::{self, Config};
use baton::control::{Client, Reply, Request};
use clap::{Parser, Subcommand, ValueEnum};

const EXIT_CODES: &str = "\
Exit codes:
  0  success (reload --wait: the new generation serves, the old one drains)
  1  the deploy failed or was refused; the old generation keeps serving
  2  usage, configuration or connection error";

/// Zero-downtime socket-handoff process supervisor.
///
/// baton holds the listening sockets of one application and passes them to
/// it (systemd socket activation: LISTEN_FDS). A deploy starts the new
/// version beside the old one and drains the old one only once the new one
/// is ready, so no connection is ever refused. A broken release never takes
/// the service down: the old generation keeps serving.
#[derive(Parser)]
#[command(name = "baton", version, after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the supervisor in the foreground (logs to stderr).
    ///
    /// Signals: HUP = reload (re-reads the file), TERM/INT = graceful stop
    /// (drain every generation, then exit 0), QUIT = fast stop (SIGKILL).
    Run {
        #[arg(short, long, default_value = config::DEFAULT_PATH, env = "BATON_CONFIG")]
        config: PathBuf,
        /// Log format; log level from BATON_LOG (default: info).
        #[arg(long, value_enum, default_value_t = LogFormat::Human)]
        log_format: LogFormat,
        /// Hand the listeners to systemd's fd store (needs
        /// FileDescriptorStoreMax= in the unit), so a restart of baton
        /// itself never closes them.
        #[arg(long)]
        fd_store: bool,
    },
    /// Ask the running daemon to deploy a new generation.
    ///
    /// The daemon re-reads the config file; an invalid file is refused and
    /// nothing changes. A reload during a deploy is queued as one follow-up
    /// deploy (--wait then waits for that one).
    #[command(after_help = EXIT_CODES)]
    Reload {
        #[arg(short, long, default_value = config::DEFAULT_PATH, env = "BATON_CONFIG")]
        config: PathBuf,
        /// Print progress and exit 0 only when the new generation serves.
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this long (e.g. "90s"); the deploy goes on.
        #[arg(long, value_parser = humantime::parse_duration, requires = "wait")]
        timeout: Option<Duration>,
    },
    /// Deploy release VERSION (`{version}` in the config), the config file
    /// re-read as for `reload`.
    ///
    /// A release whose program does not exist fails the deploy (exec
    /// failed); the old generation keeps serving. `[deploy] before` runs
    /// first, once.
    #[command(after_help = EXIT_CODES)]
    Deploy {
        /// The release, e.g. 1.4.2 (A-Z a-z 0-9 . _ + ~ -).
        version: String,
        #[arg(short, long, default_value = config::DEFAULT_PATH, env = "BATON_CONFIG")]
        config: PathBuf,
        /// Print progress and exit 0 only when the new generation serves
        /// (after its probation, if the config sets one).
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this long (e.g. "90s"); the deploy goes on.
        #[arg(long, value_parser = humantime::parse_duration, requires = "wait")]
        timeout: Option<Duration>,
    },
    /// Deploy the release that served before the current one, through the
    /// same zero-downtime path.
    #[command(after_help = EXIT_CODES)]
    Rollback {
        #[arg(short, long, default_value = config::DEFAULT_PATH, env = "BATON_CONFIG")]
        config: PathBuf,
        /// Roll back to this release instead.
        #[arg(long, value_name = "VERSION")]
        to: Option<String>,
        /// Run `[deploy] before` too (a rollback skips it: the release it
        /// goes back to has run its migrations already).
        #[arg(long)]
        with_hooks: bool,
        /// Print progress and exit 0 only when the release serves again.
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this long (e.g. "90s"); the deploy goes on.
        #[arg(long, value_parser = humantime::parse_duration, requires = "wait")]
        timeout: Option<Duration>,
    },
    /// The deploys, newest first: generation, release, when, how long,
    /// outcome and why (kept in `[state] dir`, the last 100).
    History {
        #[arg(short, long, default_value = config::DEFAULT_PATH, env = "BATON_CONFIG")]
        config: PathBuf,
        /// Print one JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show the generations, their state and the last deploy's outcome.
    Status {
        #[arg(short, long, default_value = config::DEFAULT_PATH, env = "BATON_CONFIG")]
        config: PathBuf,
        /// Print one JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Validate the config file (like `nginx -t`); needs no running daemon.
    ///
    /// Everything in the file is checked (keys, addresses, paths, users,
    /// groups, limits), with file, line and column on error. What depends on
    /// how baton is started is checked when it starts: `[app] user` needs
    /// baton to run as root; `[app] cgroup` must be a usable cgroup v2
    /// directory, and `memory_max`, `cpu_max` and `pids_max` need their
    /// controllers there.
    Check {
        #[arg(short, long, default_value = config::DEFAULT_PATH, env = "BATON_CONFIG")]
        config: PathBuf,
    },
    /// Graceful stop, like SIGTERM: waits until the daemon has exited.
    Stop {
        #[arg(short, long, default_value = config::DEFAULT_PATH, env = "BATON_CONFIG")]
        config: PathBuf,
    },
    /// Follow what the daemon does: one line per event (deploys, readiness,
    /// drains, exits, refusals) until interrupted.
    ///
    /// The lines are those of the daemon's log; with --json each is one
    /// JSON object with a `notice` field naming the event (the format the
    /// daemon's `--log-format json` records carry), for scripts.
    Events {
        #[arg(short, long, default_value = config::DEFAULT_PATH, env = "BATON_CONFIG")]
        config: PathBuf,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff) to stdout.
    #[command(hide = true)]
    Man,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

const OK: u8 = 0;
const FAILED: u8 = 1;
const USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Run {
            config,
            log_format,
            fd_store,
        } => {
            let options = baton::daemon::Options {
                fd_store,
                json_notices: matches!(log_format, LogFormat::Json),
            };
            run(config, log_format, options)
        }
        Command::Reload {
            config,
            wait,
            timeout,
        } => reload(config, &Request::Reload { wait }, timeout),
        Command::Deploy {
            version,
            config,
            wait,
            timeout,
        } => reload(config, &Request::Deploy { version, wait }, timeout),
        Command::Rollback {
            config,
            to,
            with_hooks,
            wait,
            timeout,
        } => {
            let request = Request::Rollback {
                to,
                wait,
                with_hooks,
            };
            reload(config, &request, timeout)
        }
        Command::History { config, json } => history(config, json),
        Command::Status { config, json } => status(config, json),
        Command::Check { config } => check(config),
        Command::Stop { config } => stop(config),
        Command::Events { config, json } => events(config, json),
        Command::Completions { shell } => {
            let mut cli = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut cli, "baton", &mut out);
            print_bytes(&out)
        }
        Command::Man => {
            let cli = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            clap_mangen::Man::new(cli)
                .render(&mut out)
                .expect("rendering into memory");
            print_bytes(&out)
        }
    };
    ExitCode::from(code)
}

/// Writes to stdout; a closed pipe (`| head`) is not an error.
fn print_bytes(bytes: &[u8]) -> u8 {
    use std::io::Write;
    match std::io::stdout().write_all(bytes) {
        Ok(()) => OK,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => OK,
        Err(e) => {
            eprintln!("baton: {e}");
            FAILED
        }
    }
}

fn run(path: PathBuf, format: LogFormat, options: baton::daemon::Options) -> u8 {
    init_logging(format);
    let code = match baton::daemon::run(&path, options) {
        Ok(code) => code.clamp(0, 255) as u8,
        Err(e) => {
            tracing::error!("{e:#}");
            match e {
                baton::daemon::DaemonError::Config(_)
                | baton::daemon::DaemonError::Unrunnable(_) => USAGE,
                _ => FAILED,
            }
        }
    };
    if std::process::id() == 1 {
        power_off();
    }
    code
}

/// As init (PID 1) baton must not exit: the kernel would panic. Shut the
/// machine down instead, as an init does; in a container's PID namespace
/// this ends the container.
fn power_off() {
    tracing::info!("baton is PID 1 and has stopped: powering off");
    nix::unistd::sync();
    // Returns only on failure (Ok is uninhabited).
    let Err(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    tracing::error!("cannot power off: {e}");
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("BATON_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    // Under journald the journal adds its own timestamps.
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human if journald => builder.event_format(Journald).init(),
        LogFormat::Human => builder.init(),
    }
}

/// Lines for journald's stream: `<N>` priority prefixes (sd-daemon(3)),
/// no timestamps (the journal adds its own), no colours.
struct Journald;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for Journald
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        use tracing::Level;
        let priority = match *event.metadata().level() {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            Level::DEBUG | Level::TRACE => 7,
        };
        write!(writer, "<{priority}>")?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

fn connect(
    path: &std::path::Path,
    request: &Request,
    timeout: Option<Duration>,
) -> Result<Client, u8> {
    let socket = config::control_socket_of(path);
    Client::send(&socket, request, timeout).map_err(|e| {
        eprintln!(
            "baton: cannot reach the daemon at {}: {e}\n(is `baton run -c {}` running?)",
            socket.display(),
            path.display()
        );
        USAGE
    })
}

/// `reload`, `deploy` and `rollback`: one request, then its progress.
fn reload(path: PathBuf, request: &Request, timeout: Option<Duration>) -> u8 {
    let mut client = match connect(&path, request, timeout) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let deadline = timeout.map(|t| std::time::Instant::now() + t);
    loop {
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            // A zero timeout means "block forever" to the socket.
            let _ = client.set_timeout(Some(left.max(Duration::from_millis(1))));
        }
        let reply = match client.receive() {
            Ok(Some(reply)) => reply,
            Ok(None) => {
                eprintln!("baton: the daemon closed the connection before the deploy finished");
                return USAGE;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                eprintln!("baton: no outcome within the --timeout; the deploy goes on (see `baton status`)");
                return USAGE;
            }
            Err(e) => {
                eprintln!("baton: {e}");
                return USAGE;
            }
        };
        match reply {
            Reply::Accepted => {
                println!("reload requested (follow it with `baton status`)");
                return OK;
            }
            Reply::Queued => println!("another deploy is running; this reload follows it…"),
            Reply::Started { generation, pid } => {
                println!("starting generation {generation} (pid {pid})…")
            }
            Reply::Ready {
                generation,
                after_ms,
            } => println!(
                "generation {generation} ready in {}",
                baton::notice::secs(Duration::from_secs_f64(after_ms / 1000.0))
            ),
            Reply::Draining { generation, pid } => {
                println!("draining generation {generation} (pid {pid})…")
            }
            Reply::Done { ok: true, message } => {
                println!("done: {message}");
                return OK;
            }
            Reply::Done { ok: false, message } => {
                eprintln!("deploy failed: {message}");
                return FAILED;
            }
            Reply::Error { message } => {
                eprintln!("baton: {message}");
                return FAILED;
            }
            Reply::Status(_)
            | Reply::History(_)
            | Reply::Stopping
            | Reply::Notice(_)
            | Reply::Following => {}
        }
    }
}

fn history(path: PathBuf, json: bool) -> u8 {
    let mut client = match connect(&path, &Request::History, Some(Duration::from_secs(10))) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let history = match client.receive() {
        Ok(Some(Reply::History(history))) => history,
        Ok(Some(Reply::Error { message })) => {
            eprintln!("baton: {message}");
            return FAILED;
        }
        Ok(_) => {
            eprintln!("baton: the daemon answered something other than a history");
            return USAGE;
        }
        Err(e) => {
            eprintln!("baton: {e}");
            return USAGE;
        }
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&history).expect("the history serializes")
        );
        return OK;
    }
    let serving = history.current.as_deref().unwrap_or("-");
    println!("serving release: {serving}");
    println!(
        "{:<6} {:<14} {:<9} {:<20} {:>8}  OUTCOME",
        "GEN", "RELEASE", "KIND", "STARTED", "TOOK"
    );
    for e in &history.deploys {
        let took = baton::notice::secs(Duration::from_millis(e.took_ms));
        // The reason often starts with the outcome's words ("exec failed").
        let outcome = match &e.reason {
            Some(reason) if reason.starts_with(&e.outcome) => reason.clone(),
            Some(reason) => format!("{}: {reason}", e.outcome),
            None => e.outcome.clone(),
        };
        println!(
            "{:<6} {:<14} {:<9} {:<20} {:>8}  {outcome}",
            e.generation,
            e.version.as_deref().unwrap_or("-"),
            e.kind,
            e.started,
            took
        );
    }
    if history.deploys.is_empty() {
        println!("(no deploy recorded)");
    }
    OK
}

fn status(path: PathBuf, json: bool) -> u8 {
    let mut client = match connect(&path, &Request::Status, Some(Duration::from_secs(10))) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match client.receive() {
        Ok(Some(Reply::Status(doc))) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&doc).expect("status serializes")
                );
            } else {
                print!("{}", doc.render());
            }
            OK
        }
        Ok(Some(Reply::Error { message })) => {
            eprintln!("baton: {message}");
            USAGE
        }
        Ok(None) => {
            eprintln!("baton: the daemon closed the connection without a status");
            USAGE
        }
        Ok(Some(_)) => {
            eprintln!("baton: the daemon answered something other than a status");
            USAGE
        }
        Err(e) => {
            eprintln!("baton: {e}");
            USAGE
        }
    }
}

fn check(path: PathBuf) -> u8 {
    match Config::load(&path).and_then(|c| c.check_release().map(|()| c)) {
        Ok(c) => {
            println!("{}: ok ({})", path.display(), c.summary());
            OK
        }
        Err(e) => {
            eprintln!("{e}");
            USAGE
        }
    }
}

fn stop(path: PathBuf) -> u8 {
    let mut client = match connect(&path, &Request::Stop, None) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // The daemon says `stopping` first, then keeps the connection open
    // until it exits.
    loop {
        match client.receive() {
            Ok(Some(Reply::Error { message })) => {
                eprintln!("baton: {message}");
                return FAILED;
            }
            Ok(Some(Reply::Stopping)) => println!("stopping: draining every generation…"),
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => {
                println!("stopped");
                return OK;
            }
        }
    }
}

fn events(path: PathBuf, json: bool) -> u8 {
    let mut client = match connect(&path, &Request::Events, None) {
        Ok(c) => c,
        Err(code) => return code,
    };
    loop {
        let line = match client.receive() {
            Ok(Some(Reply::Following)) if json => continue,
            Ok(Some(Reply::Following)) => "following baton's events (Ctrl-C to stop)".to_owned(),
            Ok(Some(Reply::Notice(notice))) if json => notice.to_json(),
            Ok(Some(Reply::Notice(notice))) => {
                baton::notice::printable(&notice.to_string()).into_owned()
            }
            Ok(Some(Reply::Error { message })) => {
                eprintln!("baton: {message}");
                return FAILED;
            }
            Ok(Some(_)) => continue,
            // The daemon exited: the stream is over.
            Ok(None) => return OK,
            Err(e) => {
                eprintln!("baton: {e}");
                return USAGE;
            }
        };
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
            // `| head` closed the pipe: done.
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return OK;
            }
            eprintln!("baton: {e}");
            return FAILED;
        }
    }
}
