//! Starting a generation's process, in three steps: `prepare` everything
//! before fork; fork and exec (`sys::fork_exec`, the raw part);
//! `read_exec_report` from the child.
//!
//! Why not `std::process::Command`: the child contract needs `LISTEN_PID`
//! to equal the child's own pid, which only exists after fork, and std builds
//! the child's environment before fork and installs it after any `pre_exec`
//! hook. So everything the child needs (argv, envp with a reserved
//! `LISTEN_PID=` slot, fds, signal set) is prepared here before `fork`, and
//! between `fork` and `execve` the child makes raw, async-signal-safe
//! syscalls only: no allocation, no locks.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::unistd::Pid;

use crate::config::Credentials;
use crate::sys::{self, Stage};

/// What to start.
pub(crate) struct Command<'a> {
    /// argv; `argv[0]` is looked up on the `PATH` of `env` unless it has a `/`.
    pub argv: &'a [String],
    /// The child's whole environment, without `LISTEN_PID` (set here).
    pub env: Vec<(OsString, OsString)>,
    pub workdir: Option<&'a Path>,
    /// Become fds 3, 4, ... in the child, without CLOEXEC. Borrowed: the
    /// caller keeps ownership and they stay open in baton.
    pub listeners: &'a [BorrowedFd<'a>],
    /// Run as this user instead of baton's.
    pub user: Option<&'a Credentials>,
    pub umask: Option<u32>,
    /// Resource limits for the child, in order (a later one for the same
    /// resource wins).
    pub limits: Vec<(Resource, Option<u64>, Option<u64>)>,
    /// The generation's cgroup: its `cgroup.procs`, open for writing, and
    /// its path for messages.
    pub cgroup: Option<(BorrowedFd<'a>, &'a Path)>,
}

/// A resource of setrlimit(2), for [`Command::limits`].
pub(crate) use nix::sys::resource::Resource;

#[derive(Debug, thiserror::Error)]
pub(crate) enum SpawnError {
    #[error("exec failed: ENOENT: program `{0}` not found on PATH")]
    NotFound(String),
    #[error("exec failed: {errno} (program `{program}`){}", exec_hint(*errno))]
    Exec { program: String, errno: Errno },
    #[error("cannot change directory to {}: {errno}", dir.display())]
    Chdir { dir: PathBuf, errno: Errno },
    #[error("cannot prepare the child ({what}): {errno}")]
    Setup { what: &'static str, errno: Errno },
    #[error(
        "cannot become user `{user}`: {errno}{}",
        if *errno == Errno::EPERM { " (baton must run as root to start children as another user)" } else { "" }
    )]
    User { user: String, errno: Errno },
    #[error("cannot move the child into its cgroup {}: {errno}", dir.display())]
    Cgroup { dir: PathBuf, errno: Errno },
    #[error("{0}")]
    Listeners(String),
    #[error("[app] command is empty: name the program to run")]
    EmptyCommand,
    #[error("argument or environment contains a NUL byte")]
    Nul,
    #[error("cannot start a process: {0}")]
    Io(#[from] io::Error),
}

fn exec_hint(errno: Errno) -> &'static str {
    match errno {
        Errno::ENOENT => ": check [app] command (and workdir, for a relative path)",
        Errno::EACCES => {
            ": it must be an executable file (chmod +x) outside a noexec mount, \
             in directories baton's user may search"
        }
        Errno::ENOEXEC => ": not an executable format (a script needs a #! line)",
        _ => "",
    }
}

/// Forks and execs `cmd` in a new process group. Returns once the child has
/// exec'd (or failed to: then it has been reaped and the error says why).
///
/// fd contract: the child gets fd 0 = /dev/null, fds 1 and 2 inherited,
/// fds 3.. = `cmd.listeners` without CLOEXEC, and every other fd marked
/// CLOEXEC, so nothing else of baton's leaks into the application. The
/// caller's fds are untouched.
///
/// Three steps: `prepare` all the child needs, `sys::fork_exec`, and
/// `read_exec_report`.
pub(crate) fn spawn(cmd: &Command) -> Result<Pid, SpawnError> {
    let mut prepared = prepare(cmd)?;
    // CLOEXEC: a successful exec closes the child's write end, and the
    // report reader sees EOF.
    let (report, report_write) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(io::Error::from)?;
    let setup = sys::ChildSetup {
        listeners: cmd.listeners,
        stdin: prepared.devnull.as_fd(),
        report: report_write.as_fd(),
        workdir: prepared.workdir.as_deref(),
        limits: &prepared.limits,
        umask: cmd.umask,
        user: cmd.user.map(|u| sys::ChildUser {
            uid: u.uid,
            gid: u.gid,
            groups: &u.groups,
        }),
        max_fd: prepared.max_fd,
        cgroup_procs: cmd.cgroup.map(|(fd, _)| fd),
    };
    let pid = sys::fork_exec(&mut prepared.image, &setup).map_err(fork_error)?;
    // Ours must be closed too, or the read below never sees EOF.
    drop(report_write);
    read_exec_report(pid, &report, cmd)
}

/// Everything the child needs, built before fork by [`prepare`].
struct Prepared {
    image: sys::ExecImage,
    workdir: Option<CString>,
    /// Becomes the child's stdin.
    devnull: File,
    limits: Vec<(sys::RlimitResource, libc::rlimit)>,
    max_fd: RawFd,
}

/// Step 1, before fork: resolves the program on the child's `PATH`, builds
/// argv and envp as C strings (envp with a `LISTEN_PID=` slot when there
/// are sockets to pass) and opens /dev/null.
fn prepare(cmd: &Command) -> Result<Prepared, SpawnError> {
    let name = cmd.argv.first().ok_or(SpawnError::EmptyCommand)?;
    let path_var = cmd
        .env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_os_str());
    let program = resolve(name, path_var).ok_or_else(|| SpawnError::NotFound(name.clone()))?;
    let program = cstring(program.as_os_str().as_bytes())?;
    let argv = cmd
        .argv
        .iter()
        .map(|a| cstring(a.as_bytes()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut env = Vec::with_capacity(cmd.env.len());
    for (k, v) in &cmd.env {
        let mut entry = k.as_bytes().to_vec();
        entry.push(b'=');
        entry.extend_from_slice(v.as_bytes());
        env.push(cstring(&entry)?);
    }
    let workdir = cmd
        .workdir
        .map(|d| cstring(d.as_os_str().as_bytes()))
        .transpose()?;
    let devnull = File::options().read(true).write(true).open("/dev/null")?;
    let infinity = |v: Option<u64>| v.unwrap_or(libc::RLIM_INFINITY);
    let limits = cmd
        .limits
        .iter()
        .map(|&(resource, soft, hard)| {
            let limit = libc::rlimit {
                rlim_cur: infinity(soft),
                rlim_max: infinity(hard),
            };
            (resource as sys::RlimitResource, limit)
        })
        .collect();
    Ok(Prepared {
        image: sys::ExecImage::new(program, argv, env, !cmd.listeners.is_empty()),
        workdir,
        devnull,
        limits,
        max_fd: nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(1024, |(soft, _)| soft.min(65_536) as RawFd),
    })
}

fn fork_error(e: sys::ForkError) -> SpawnError {
    match e {
        sys::ForkError::BlockSignals(errno) => SpawnError::Setup {
            what: "pthread_sigmask before fork",
            errno,
        },
        sys::ForkError::Fork(errno) => SpawnError::Io(errno.into()),
        sys::ForkError::RestoreSignals(errno) => SpawnError::Setup {
            what: "pthread_sigmask after fork",
            errno,
        },
    }
}

/// Step 3: waits for the child's exec report on `report`. EOF without a
/// record: the exec succeeded. A record: the child failed before exec and
/// `_exit`ed; it is reaped here, so the main reaper never sees its pid.
fn read_exec_report(pid: Pid, report: &OwnedFd, cmd: &Command) -> Result<Pid, SpawnError> {
    let mut record = [0u8; sys::REPORT_LEN];
    if read_full(report, &mut record) < record.len() {
        return Ok(pid);
    }
    let _ = nix::sys::wait::waitpid(pid, None);
    let (stage, errno) = sys::decode_report(record);
    Err(match stage {
        Stage::Exec => SpawnError::Exec {
            program: cmd.argv.first().cloned().unwrap_or_default(),
            errno,
        },
        Stage::Chdir => SpawnError::Chdir {
            dir: cmd.workdir.map(Path::to_owned).unwrap_or_default(),
            errno,
        },
        Stage::Setpgid => SpawnError::Setup {
            what: "setpgid",
            errno,
        },
        Stage::SignalMask => SpawnError::Setup {
            what: "sigprocmask in the child",
            errno,
        },
        Stage::Dup => SpawnError::Setup {
            what: "moving the listening sockets to fds 3..",
            errno,
        },
        Stage::Limits => SpawnError::Setup {
            what: "setting [app] limits (setrlimit; raising a hard limit needs root)",
            errno,
        },
        Stage::User => SpawnError::User {
            user: cmd.user.map(|u| u.name.clone()).unwrap_or_default(),
            errno,
        },
        Stage::Cgroup => SpawnError::Cgroup {
            dir: cmd.cgroup.map(|(_, d)| d.to_owned()).unwrap_or_default(),
            errno,
        },
    })
}

/// Reads until `buf` is full or EOF; returns how many bytes arrived.
fn read_full(fd: &OwnedFd, buf: &mut [u8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        match nix::unistd::read(fd, &mut buf[got..]) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(Errno::EINTR) => continue,
            Err(_) => break,
        }
    }
    got
}

fn cstring(bytes: &[u8]) -> Result<CString, SpawnError> {
    CString::new(bytes).map_err(|_| SpawnError::Nul)
}

/// Finds `name` as execvp would: as given if it has a `/` (relative to the
/// working directory the child will have), else in each `PATH` directory.
pub(crate) fn resolve(name: &str, path_var: Option<&OsStr>) -> Option<PathBuf> {
    if name.contains('/') {
        // Let execve itself report a missing file: its errno says more.
        return Some(PathBuf::from(name));
    }
    let path_var = path_var.unwrap_or(OsStr::new("/usr/local/bin:/usr/bin:/bin"));
    std::env::split_paths(path_var)
        .map(|dir| dir.join(name))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_on_path_like_execvp() {
        let found = resolve("sh", Some(OsStr::new("/nonexistent:/bin"))).unwrap();
        assert_eq!(found, Path::new("/bin/sh"));
        assert!(resolve("no-such-program-baton", None).is_none());
        assert_eq!(resolve("./x", None).unwrap(), Path::new("./x"));
    }

    /// Refused before anything is built or forked, with a message that
    /// names the config key (not the NUL-byte error it used to get).
    #[test]
    fn empty_command_is_its_own_error() {
        let err = spawn(&Command {
            argv: &[],
            env: Vec::new(),
            workdir: None,
            listeners: &[],
            user: None,
            umask: None,
            limits: Vec::new(),
            cgroup: None,
        })
        .unwrap_err();
        assert!(matches!(err, SpawnError::EmptyCommand), "{err:?}");
        assert_eq!(
            err.to_string(),
            "[app] command is empty: name the program to run"
        );
    }
}
