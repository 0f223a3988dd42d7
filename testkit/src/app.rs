//! The example app run alone, binding its own port: the baseline baton is
//! compared with.

use std::net::SocketAddr;
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
        command
            .env("HELLO_ADDR", address.to_string())
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

impl Drop for App {
    fn drop(&mut self) {
        if !self.exited {
            procs::kill_group(self.pid);
            let _ = self.child.wait();
            procs::unregister(self.pid);
        }
    }
}
