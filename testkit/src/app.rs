//! The example app run alone, binding its own port or given a socket that
//! someone else holds across its restarts (as plain socket activation
//! does): the baselines baton is compared with.

use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::procs;
use crate::{Context, Error, Result};

/// hello binding `HELLO_ADDR` itself. Its process group is SIGKILLed on
/// drop unless it exited.
pub struct App {
    child: Child,
    pid: i32,
    exited: bool,
}

impl App {
    /// Starts hello on `address`; `generation` goes into its answers.
    pub fn start(
        hello: &Path,
        address: SocketAddr,
        generation: Option<u64>,
        boot_delay: Duration,
    ) -> Result<App> {
        let mut command = Command::new(hello);
        procs::clean_env(&mut command);
        command.env("HELLO_ADDR", address.to_string());
        App::spawn(command, generation, boot_delay)
    }

    /// Starts hello on a listening socket the caller holds (fd 3,
    /// `LISTEN_FDS=1`, `LISTEN_PID` its own pid): the socket, and the
    /// connections waiting in its queue, outlive the app.
    pub fn start_on(
        hello: &Path,
        listener: BorrowedFd<'_>,
        generation: Option<u64>,
        boot_delay: Duration,
    ) -> Result<App> {
        let command = crate::activate::command(hello, &[] as &[&str], &[("http", listener)])
            .context(|| "cannot pass the socket to the example app")?;
        App::spawn(command, generation, boot_delay)
    }

    fn spawn(mut command: Command, generation: Option<u64>, boot_delay: Duration) -> Result<App> {
        command
            .env("HELLO_BOOT_DELAY_MS", boot_delay.as_millis().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(generation) = generation {
            command.env("BATON_GENERATION", generation.to_string());
        }
        let (child, pid) = procs::spawn(&mut command, "the example app")?;
        Ok(App {
            child,
            pid,
            exited: false,
        })
    }

    /// Asks the app to drain and exit.
    pub fn terminate(&self) {
        procs::signal(self.pid, Signal::SIGTERM);
    }

    /// An error if the app has exited (it should be serving).
    pub fn check_running(&mut self) -> Result<()> {
        match self.try_wait()? {
            Some(status) => Err(Error::Failed(format!(
                "the example app (pid {}) {status}; is its port taken?",
                self.pid
            ))),
            None => Ok(()),
        }
    }

    /// Waits until the app has exited; when it was seen gone (checked every
    /// millisecond, for the timeline).
    pub fn wait_exit(&mut self, limit: Duration) -> Result<Instant> {
        let deadline = Instant::now() + limit;
        loop {
            if self.try_wait()?.is_some() {
                return Ok(Instant::now());
            }
            if Instant::now() >= deadline {
                return Err(Error::Failed(format!(
                    "the example app (pid {}) did not exit within {limit:?} of SIGTERM",
                    self.pid
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        let status = self.child.try_wait().context(|| "waitpid")?;
        if status.is_some() && !self.exited {
            self.exited = true;
            procs::unregister(self.pid);
        }
        Ok(status)
    }
}

/// A listening socket on 127.0.0.1 at a port the kernel picks, with the
/// backlog baton gives its listeners (1024): for [`App::start_on`].
pub fn held_listener() -> Result<std::net::TcpListener> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context(|| "cannot bind 127.0.0.1:0")?;
    // listen(2) again on a listening socket sets its backlog.
    nix::sys::socket::Backlog::new(1024)
        .and_then(|backlog| nix::sys::socket::listen(&listener, backlog))
        .map_err(std::io::Error::from)
        .context(|| "listen(1024)")?;
    Ok(listener)
}

impl Drop for App {
    fn drop(&mut self) {
        if !self.exited {
            procs::kill_group(self.pid);
            let _ = self.child.wait();
            procs::unregister(self.pid);
        }
    }
}
