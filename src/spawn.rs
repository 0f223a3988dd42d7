//! Starting a generation's process, and taking ownership of fds received
//! over a socket: the one module with `unsafe` and raw fds.
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
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::unistd::Pid;

/// What to start.
pub struct Command<'a> {
    /// argv; `argv[0]` is looked up on the `PATH` of `env` unless it has a `/`.
    pub argv: &'a [String],
    /// The child's whole environment, without `LISTEN_PID` (set here).
    pub env: Vec<(OsString, OsString)>,
    pub workdir: Option<&'a Path>,
    /// Become fds 3, 4, ... in the child, without CLOEXEC. Borrowed: the
    /// caller keeps ownership and they stay open in baton.
    pub listeners: &'a [BorrowedFd<'a>],
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("exec failed: ENOENT: program `{0}` not found on PATH")]
    NotFound(String),
    #[error("exec failed: {errno} (program `{program}`){}", exec_hint(*errno))]
    Exec { program: String, errno: Errno },
    #[error("cannot change directory to {}: {errno}", dir.display())]
    Chdir { dir: PathBuf, errno: Errno },
    #[error("cannot prepare the child ({what}): {errno}")]
    Setup { what: &'static str, errno: Errno },
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

/// What a child reports on the error pipe before `_exit(127)`.
#[derive(Clone, Copy)]
#[repr(u32)]
enum Stage {
    Setpgid = 1,
    Dup = 2,
    Chdir = 3,
    Exec = 4,
}

/// `CLOSE_RANGE_CLOEXEC` from linux/close_range.h (Linux 5.11).
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

/// Everything the child touches between fork and exec, prepared by the parent.
struct Plan<'a> {
    program: &'a CString,
    argv: &'a [*const libc::c_char],
    envp: &'a [*const libc::c_char],
    /// The `LISTEN_PID=` entry's buffer: digits go after `prefix` bytes.
    listen_pid: Option<(*mut u8, usize, usize)>,
    workdir: Option<&'a CString>,
    listeners: &'a [RawFd],
    /// Scratch space for the listeners' temporary copies (one per listener).
    scratch: *mut RawFd,
    devnull: RawFd,
    error_pipe: RawFd,
    empty_mask: &'a libc::sigset_t,
    /// Upper bound of open fds (RLIMIT_NOFILE, capped), for the fallback
    /// that marks fds CLOEXEC one by one.
    max_fd: RawFd,
}

/// Forks and execs `cmd` in a new process group. Returns once the child has
/// exec'd (or failed to: then it has been reaped and the error says why).
///
/// fd contract: the child gets fd 0 = /dev/null, fds 1 and 2 inherited,
/// fds 3.. = `cmd.listeners` without CLOEXEC, and every other fd marked
/// CLOEXEC, so nothing else of baton's leaks into the application. The
/// caller's fds are untouched.
pub fn spawn(cmd: &Command) -> Result<Pid, SpawnError> {
    let name = cmd.argv.first().ok_or(SpawnError::Nul)?;
    let path_var = cmd
        .env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_os_str());
    let program = resolve(name, path_var).ok_or_else(|| SpawnError::NotFound(name.clone()))?;
    let program = cstring(program.as_os_str().as_bytes())?;

    let argv_owned = cmd
        .argv
        .iter()
        .map(|a| cstring(a.as_bytes()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut env_owned = Vec::with_capacity(cmd.env.len());
    for (k, v) in &cmd.env {
        let mut entry = k.as_bytes().to_vec();
        entry.push(b'=');
        entry.extend_from_slice(v.as_bytes());
        env_owned.push(cstring(&entry)?);
    }
    // "LISTEN_PID=" + room for any pid + NUL, filled in by the child.
    const PREFIX: &[u8] = b"LISTEN_PID=";
    let mut listen_pid_buf = PREFIX.to_vec();
    listen_pid_buf.resize(PREFIX.len() + 24, 0);
    let slot = listen_pid_buf.as_mut_ptr();
    let argv = null_terminated(argv_owned.iter().map(|c| c.as_ptr()));
    let with_slot = !cmd.listeners.is_empty();
    let slot_ptr = with_slot.then_some(slot.cast_const().cast::<libc::c_char>());
    let envp = null_terminated(env_owned.iter().map(|c| c.as_ptr()).chain(slot_ptr));
    let workdir = cmd
        .workdir
        .map(|d| cstring(d.as_os_str().as_bytes()))
        .transpose()?;

    let listeners: Vec<RawFd> = cmd.listeners.iter().map(|l| l.as_raw_fd()).collect();
    let mut scratch: Vec<RawFd> = vec![-1; listeners.len()];
    let devnull = File::options().read(true).write(true).open("/dev/null")?;
    let (error_read, error_write) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(io::Error::from)?;
    // SAFETY: sigemptyset only writes the set it is given.
    let empty_mask = unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        set
    };
    let plan = Plan {
        program: &program,
        argv: &argv,
        envp: &envp,
        listen_pid: with_slot.then_some((slot, PREFIX.len(), listen_pid_buf.len())),
        workdir: workdir.as_ref(),
        listeners: &listeners,
        scratch: scratch.as_mut_ptr(),
        devnull: devnull.as_raw_fd(),
        error_pipe: error_write.as_raw_fd(),
        empty_mask: &empty_mask,
        max_fd: nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(1024, |(soft, _)| soft.min(65_536) as RawFd),
    };

    // Block every signal across fork: until the child has reset its
    // dispositions, a signal sent to it would run baton's handler, which
    // writes to the signal pipe it shares with baton.
    // SAFETY: sigfillset and sigprocmask only touch the sets they are given.
    let saved_mask = unsafe {
        let mut all = std::mem::zeroed::<libc::sigset_t>();
        let mut saved = std::mem::zeroed::<libc::sigset_t>();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut saved);
        saved
    };
    // SAFETY: fork has no memory-safety preconditions. baton's event loop is
    // single-threaded, and the child below runs only async-signal-safe
    // syscalls on memory prepared above until it execs or _exits, so no lock
    // held by another thread at fork time is ever touched.
    let pid = unsafe { libc::fork() };
    // SAFETY: restores the mask saved above (in the parent; the child sets
    // its own before exec).
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &saved_mask, std::ptr::null_mut()) };
    if pid < 0 {
        return Err(io::Error::last_os_error().into());
    }
    if pid == 0 {
        // SAFETY: we are the freshly forked child; `plan` points into the
        // (copy-on-write) memory of the parent's stack frame, which stays
        // valid because this call never returns.
        unsafe { exec_child(&plan) }
    }
    drop(error_write);
    let pid = Pid::from_raw(pid);
    // Also from the parent, so the group exists before we might signal it
    // (the child may not have run yet). EACCES once it exec'd is harmless.
    let _ = nix::unistd::setpgid(pid, pid);

    let mut report = [0u8; 8];
    let got = read_full(&error_read, &mut report);
    if got < report.len() {
        // EOF without a report: the exec succeeded (the pipe was CLOEXEC).
        return Ok(pid);
    }
    // The child reported a failure and _exited: reap it here, so the main
    // reaper never sees this pid.
    let _ = nix::sys::wait::waitpid(pid, None);
    let stage = u32::from_ne_bytes(report[..4].try_into().expect("4 bytes"));
    let errno = Errno::from_raw(i32::from_ne_bytes(report[4..].try_into().expect("4 bytes")));
    Err(match stage {
        s if s == Stage::Exec as u32 => SpawnError::Exec {
            program: name.clone(),
            errno,
        },
        s if s == Stage::Chdir as u32 => SpawnError::Chdir {
            dir: cmd.workdir.map(Path::to_owned).unwrap_or_default(),
            errno,
        },
        s if s == Stage::Setpgid as u32 => SpawnError::Setup {
            what: "setpgid",
            errno,
        },
        _ => SpawnError::Setup {
            what: "moving the listening sockets to fds 3..",
            errno,
        },
    })
}

/// The child side, between fork and exec. Never returns.
///
/// # Safety
/// Call only in a just-forked child, with `plan` prepared by [`spawn`].
unsafe fn exec_child(plan: &Plan) -> ! {
    let n = plan.listeners.len() as RawFd;
    let floor = 3 + n;
    // SAFETY (whole body): only raw syscalls on fds and buffers the parent
    // prepared; no allocation, no locks, no unwinding (errors `_exit`).
    unsafe {
        // Move every fd we still need above 3+n, so placing the listeners at
        // 3.. cannot overwrite one of them. The copies are CLOEXEC.
        let error_pipe = libc::fcntl(plan.error_pipe, libc::F_DUPFD_CLOEXEC, floor);
        if error_pipe < 0 {
            libc::_exit(127);
        }
        let fail = |stage: Stage| -> ! {
            let errno = *libc::__errno_location();
            let mut report = [0u8; 8];
            report[..4].copy_from_slice(&(stage as u32).to_ne_bytes());
            report[4..].copy_from_slice(&errno.to_ne_bytes());
            libc::write(error_pipe, report.as_ptr().cast(), report.len());
            libc::_exit(127)
        };
        let devnull = libc::fcntl(plan.devnull, libc::F_DUPFD_CLOEXEC, floor);
        if devnull < 0 || libc::dup2(devnull, 0) < 0 {
            fail(Stage::Dup);
        }
        for (i, &fd) in plan.listeners.iter().enumerate() {
            let high = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, floor);
            if high < 0 {
                fail(Stage::Dup);
            }
            *plan.scratch.add(i) = high;
        }
        // dup2 onto a different fd leaves the new fd without CLOEXEC: these
        // are the only fds the application inherits besides 0-2.
        for i in 0..plan.listeners.len() {
            if libc::dup2(*plan.scratch.add(i), 3 + i as RawFd) < 0 {
                fail(Stage::Dup);
            }
        }
        // Anything else open above the listeners (fds systemd passed that
        // the config does not use, say) must not reach the application.
        // Kernels before 5.11 lack close_range: mark them one by one.
        let marked = libc::syscall(
            libc::SYS_close_range,
            floor as libc::c_uint,
            libc::c_uint::MAX,
            CLOSE_RANGE_CLOEXEC,
        );
        if marked < 0 {
            for fd in floor..plan.max_fd {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
        if libc::setpgid(0, 0) < 0 {
            fail(Stage::Setpgid);
        }
        // Signal dispositions: ignored ones survive exec (Rust ignores
        // SIGPIPE), and the mask is inherited; reset both, as tini does.
        // The raw syscall, because glibc's sigaction refuses its internal
        // signals 32 and 33, which a parent may have left ignored. An
        // all-zero kernel `struct sigaction` is SIG_DFL, no flags, empty
        // mask on every architecture.
        let default_action = [0u64; 4];
        for signal in 1..=64 {
            libc::syscall(
                libc::SYS_rt_sigaction,
                signal,
                default_action.as_ptr(),
                std::ptr::null_mut::<u64>(),
                8usize,
            );
        }
        libc::sigprocmask(libc::SIG_SETMASK, plan.empty_mask, std::ptr::null_mut());
        if let Some(dir) = plan.workdir {
            if libc::chdir(dir.as_ptr()) < 0 {
                fail(Stage::Chdir);
            }
        }
        if let Some((buf, start, len)) = plan.listen_pid {
            write_decimal(libc::getpid() as u32, buf.add(start), len - start);
        }
        libc::execve(
            plan.program.as_ptr(),
            plan.argv.as_ptr(),
            plan.envp.as_ptr(),
        );
        fail(Stage::Exec)
    }
}

/// Writes `n` in decimal (no leading zeros: libsystemd would read octal)
/// followed by a NUL, into `room` bytes at `out`.
///
/// # Safety
/// `out` must be valid for `room` bytes; `room` >= 11.
unsafe fn write_decimal(mut n: u32, out: *mut u8, room: usize) {
    let mut digits = [0u8; 10];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    debug_assert!(room > len);
    for i in 0..len {
        // SAFETY: i < len < room, as the caller guarantees.
        unsafe { *out.add(i) = digits[len - 1 - i] };
    }
    // SAFETY: len < room.
    unsafe { *out.add(len) = 0 };
}

/// Reads until `buf` is full or EOF; returns how many bytes arrived.
fn read_full(fd: &std::os::fd::OwnedFd, buf: &mut [u8]) -> usize {
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

fn null_terminated<'a>(
    ptrs: impl Iterator<Item = *const libc::c_char> + 'a,
) -> Vec<*const libc::c_char> {
    ptrs.chain(std::iter::once(std::ptr::null())).collect()
}

/// Finds `name` as execvp would: as given if it has a `/` (relative to the
/// working directory the child will have), else in each `PATH` directory.
pub fn resolve(name: &str, path_var: Option<&OsStr>) -> Option<PathBuf> {
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

/// One datagram received with [`recv_with_fds`].
pub struct Received {
    pub len: usize,
    /// The sender's pid, when the socket has SO_PASSCRED.
    pub pid: Option<Pid>,
    /// Fds the sender attached (SCM_RIGHTS), now owned by the receiver:
    /// dropping them closes them.
    pub fds: Vec<OwnedFd>,
}

/// Receives one datagram into `buf` from the non-blocking socket `socket`.
///
/// fd contract: attached fds arrive CLOEXEC (MSG_CMSG_CLOEXEC) and are
/// returned as `OwnedFd`s, so none can leak.
pub fn recv_with_fds(socket: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixCredentials};
    let mut iov = [io::IoSliceMut::new(buf)];
    // Room for the kernel's maximum of 253 fds per message (SCM_MAX_FD): a
    // truncated control message would leave fds in baton that nobody closes.
    let mut cmsg = nix::cmsg_space!(UnixCredentials, [RawFd; 253]);
    let msg = recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut received = Received {
        len: msg.bytes,
        pid: None,
        fds: Vec::new(),
    };
    for c in msg.cmsgs()? {
        match c {
            ControlMessageOwned::ScmCredentials(cred) => {
                received.pid = Some(Pid::from_raw(cred.pid()))
            }
            ControlMessageOwned::ScmRights(fds) => {
                for fd in fds {
                    // SAFETY: the kernel just installed `fd` in this process
                    // for this message; nothing else knows or owns it.
                    received.fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
            _ => {}
        }
    }
    Ok(received)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_pid_has_no_leading_zero() {
        let mut buf = [0xffu8; 12];
        for (n, text) in [
            (0u32, "0"),
            (7, "7"),
            (4121, "4121"),
            (u32::MAX, "4294967295"),
        ] {
            // SAFETY: buf has 12 bytes, enough for 10 digits and a NUL.
            unsafe { write_decimal(n, buf.as_mut_ptr(), buf.len()) };
            let end = buf.iter().position(|&b| b == 0).unwrap();
            assert_eq!(&buf[..end], text.as_bytes());
        }
    }

    #[test]
    fn resolves_on_path_like_execvp() {
        let found = resolve("sh", Some(OsStr::new("/nonexistent:/bin"))).unwrap();
        assert_eq!(found, Path::new("/bin/sh"));
        assert!(resolve("no-such-program-baton", None).is_none());
        assert_eq!(resolve("./x", None).unwrap(), Path::new("./x"));
    }
}
