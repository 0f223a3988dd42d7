//! Every `unsafe` block of baton, and the raw fds they touch: the child side
//! of fork/exec, taking ownership of fds received over a socket, and
//! registering the cgroup watcher's fd with tokio.
//! Everywhere else, fds are held as `OwnedFd`/`BorrowedFd`.
//!
//! Between `fork` and `execve` the child makes raw, async-signal-safe
//! syscalls only: no allocation, no locks, no unwinding (signal-safety(7):
//! after `fork` in a process with threads, nothing else is safe). So all it
//! touches is prepared before `fork`: the [`ExecImage`] (program, argv,
//! envp) and the [`ChildSetup`] (fds, working directory), plus scratch space
//! allocated by [`fork_exec`].

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::signal::{SigSet, Signal};
use nix::unistd::Pid;

/// What `execve` gets: the program's path, and argv and envp as
/// NULL-terminated arrays of pointers into C strings this struct owns.
pub(crate) struct ExecImage {
    program: CString,
    /// Owned here so the pointers below stay valid; a `CString`'s bytes do
    /// not move when the `Vec` holding it does.
    _argv: Vec<CString>,
    _env: Vec<CString>,
    /// `LISTEN_PID=`, then room for the digits and a NUL, which the child
    /// writes after fork: its pid does not exist before. envp's last entry.
    listen_pid: Option<Vec<u8>>,
    argv_ptrs: Vec<*const libc::c_char>,
    envp_ptrs: Vec<*const libc::c_char>,
}

const LISTEN_PID: &[u8] = b"LISTEN_PID=";

impl ExecImage {
    /// `env` holds `KEY=VALUE` entries. With `listen_pid`, envp ends with one
    /// more entry, `LISTEN_PID=<the child's pid>`.
    pub(crate) fn new(
        program: CString,
        argv: Vec<CString>,
        env: Vec<CString>,
        listen_pid: bool,
    ) -> ExecImage {
        // Room for any pid (at most 10 digits) and the NUL.
        let listen_pid = listen_pid.then(|| {
            let mut slot = LISTEN_PID.to_vec();
            slot.resize(LISTEN_PID.len() + 24, 0);
            slot
        });
        let argv_ptrs = null_terminated(argv.iter().map(|a| a.as_ptr()));
        let slot_ptr = listen_pid.as_ref().map(|s| s.as_ptr().cast());
        let envp_ptrs = null_terminated(env.iter().map(|e| e.as_ptr()).chain(slot_ptr));
        ExecImage {
            program,
            _argv: argv,
            _env: env,
            listen_pid,
            argv_ptrs,
            envp_ptrs,
        }
    }

    /// Fills the `LISTEN_PID=` entry with `pid`. Allocation-free: the child
    /// calls it between fork and exec.
    fn fill_listen_pid(&mut self, pid: u32) {
        if let Some(slot) = self.listen_pid.as_mut() {
            write_decimal(pid, &mut slot[LISTEN_PID.len()..]);
            // Point envp at the slot again, through this `&mut`: the pointer
            // taken in `new` predates the write above, and Rust's aliasing
            // rules let a pointer outlive a write only if derived after it.
            if let Some(entry) = self.envp_ptrs.iter_mut().rev().nth(1) {
                *entry = slot.as_ptr().cast();
            }
        }
    }
}

fn null_terminated<'a>(
    ptrs: impl Iterator<Item = *const libc::c_char> + 'a,
) -> Vec<*const libc::c_char> {
    ptrs.chain(std::iter::once(std::ptr::null())).collect()
}

/// Writes `n` in decimal (no leading zeros: libsystemd would read octal)
/// followed by a NUL at the start of `out`, which needs room for 11 bytes.
/// No allocation and no panic: the child calls it between fork and exec.
fn write_decimal(mut n: u32, out: &mut [u8]) {
    // u32::MAX has 10 digits; they fill `digits` from the end.
    let mut digits = [0u8; 10];
    let mut start = digits.len();
    while start > 0 {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    debug_assert!(out.len() > digits.len() - start);
    let text = digits[start..].iter().chain(&[0]);
    for (dst, &byte) in out.iter_mut().zip(text) {
        *dst = byte;
    }
}

/// The fds and directory the child sets up between fork and exec.
pub(crate) struct ChildSetup<'a> {
    /// Become fds 3, 4, ... in the child, without CLOEXEC. Borrowed: the
    /// caller keeps ownership and they stay open in baton.
    pub listeners: &'a [BorrowedFd<'a>],
    /// Becomes the child's fd 0 (baton passes /dev/null). Borrowed.
    pub stdin: BorrowedFd<'a>,
    /// The write end of the exec-report pipe; must be CLOEXEC, so a
    /// successful exec closes it and the reader sees EOF. Borrowed: the
    /// caller closes its own copy once [`fork_exec`] returns.
    pub report: BorrowedFd<'a>,
    pub workdir: Option<&'a CStr>,
    /// setrlimit(2) calls, in order: (resource, soft and hard limit).
    pub limits: &'a [(RlimitResource, libc::rlimit)],
    pub umask: Option<libc::mode_t>,
    /// Become this user: supplementary groups, then gid, then uid.
    pub user: Option<ChildUser<'a>>,
    /// Upper bound of open fds (RLIMIT_NOFILE, capped), for the fallback
    /// that marks fds CLOEXEC one by one.
    pub max_fd: RawFd,
    /// The `cgroup.procs` file of the generation's cgroup, open for
    /// writing: the child moves itself there first of all, so everything
    /// it ever starts is inside. Borrowed; CLOEXEC.
    pub cgroup_procs: Option<BorrowedFd<'a>>,
}

/// setrlimit(2)'s resource argument: glibc declares an enum type, musl an
/// int.
#[cfg(target_env = "gnu")]
pub(crate) type RlimitResource = libc::__rlimit_resource_t;
#[cfg(not(target_env = "gnu"))]
pub(crate) type RlimitResource = libc::c_int;

/// The identity a child takes before exec (all looked up before fork).
#[derive(Clone, Copy)]
pub(crate) struct ChildUser<'a> {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    pub groups: &'a [libc::gid_t],
}

/// Where the child failed before exec, in its report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Stage {
    Setpgid = 1,
    /// Placing /dev/null at fd 0 or the listeners at fds 3..
    Dup = 2,
    Chdir = 3,
    Exec = 4,
    /// Emptying the signal mask (sigprocmask).
    SignalMask = 5,
    /// Setting `[app] limits` (setrlimit).
    Limits = 6,
    /// Becoming `[app] user` (setgroups, setgid, setuid).
    User = 7,
    /// Moving into the generation's cgroup (writing `cgroup.procs`).
    Cgroup = 8,
}

/// Length of the one record the child writes on the exec-report pipe when
/// it fails before exec: the [`Stage`] as a native-endian `u32`, then errno
/// as a native-endian `i32`. EOF without a record means exec succeeded.
pub(crate) const REPORT_LEN: usize = 8;

fn encode_report(stage: Stage, errno: i32) -> [u8; REPORT_LEN] {
    let mut record = [0u8; REPORT_LEN];
    record[..4].copy_from_slice(&(stage as u32).to_ne_bytes());
    record[4..].copy_from_slice(&errno.to_ne_bytes());
    record
}

/// Reads a record written by the child. A stage number the child never
/// writes counts as [`Stage::Dup`], as it always has.
pub(crate) fn decode_report(record: [u8; REPORT_LEN]) -> (Stage, Errno) {
    let [s0, s1, s2, s3, e0, e1, e2, e3] = record;
    let stage = match u32::from_ne_bytes([s0, s1, s2, s3]) {
        1 => Stage::Setpgid,
        3 => Stage::Chdir,
        4 => Stage::Exec,
        5 => Stage::SignalMask,
        6 => Stage::Limits,
        7 => Stage::User,
        8 => Stage::Cgroup,
        _ => Stage::Dup,
    };
    (stage, Errno::from_raw(i32::from_ne_bytes([e0, e1, e2, e3])))
}

/// Why [`fork_exec`] left no child behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ForkError {
    /// `pthread_sigmask` failed to block signals before fork.
    BlockSignals(Errno),
    /// `fork` failed.
    Fork(Errno),
    /// `pthread_sigmask` failed to restore baton's mask after fork; the
    /// child has been killed and reaped.
    RestoreSignals(Errno),
}

/// `CLOSE_RANGE_CLOEXEC` from linux/close_range.h (Linux 5.11).
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

/// Forks a child that sets itself up per `setup` and execs `image`, and
/// returns its pid at once; whether the exec worked arrives on the report
/// pipe (see [`REPORT_LEN`]).
///
/// fd contract: the child gets fd 0 = `setup.stdin`, fds 1 and 2 inherited,
/// fds 3.. = `setup.listeners` without CLOEXEC, and every other fd marked
/// CLOEXEC, so nothing else of baton's leaks into the application. The
/// caller's fds are all borrowed and untouched.
///
/// The child leads its own process group. Signals are blocked in baton
/// across fork and restored after; the child keeps them blocked until it
/// has reset every disposition to the default, then empties its mask.
pub(crate) fn fork_exec(image: &mut ExecImage, setup: &ChildSetup<'_>) -> Result<Pid, ForkError> {
    // All the child writes to besides `image` is allocated here, before fork.
    let mut scratch: Vec<RawFd> = vec![-1; setup.listeners.len()];
    let empty_mask = SigSet::empty();
    // Block every signal across fork: until the child has reset its
    // dispositions, a signal sent to it would run baton's handler, which
    // writes to the signal pipe it shares with baton.
    let saved_mask = set_signal_mask(SigSet::all().as_ref()).map_err(ForkError::BlockSignals)?;
    // SAFETY: fork has no memory-safety preconditions. baton's event loop is
    // single-threaded, and the child below runs only async-signal-safe
    // syscalls on memory prepared above until it execs or _exits, so no lock
    // held by another thread at fork time is ever touched.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: we are the freshly forked child; `image`, `setup` and the
        // scratch space are (copy-on-write) memory of the parent's frames,
        // which stays valid because this call never returns.
        unsafe { exec_child(image, setup, &mut scratch, empty_mask.as_ref()) }
    }
    let fork_errno = Errno::last();
    let restored = set_signal_mask(&saved_mask);
    if pid < 0 {
        restored.map_err(ForkError::RestoreSignals)?;
        return Err(ForkError::Fork(fork_errno));
    }
    let pid = Pid::from_raw(pid);
    if let Err(errno) = restored {
        // The caller hears only the error, so nothing would track this
        // child: do not leave it running. SIGKILL cannot be blocked.
        let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(pid, None);
        return Err(ForkError::RestoreSignals(errno));
    }
    // Also from the parent, so the group exists before we might signal it
    // (the child may not have run yet). EACCES once it exec'd is harmless.
    let _ = nix::unistd::setpgid(pid, pid);
    Ok(pid)
}

/// Sets the calling thread's signal mask to `mask`; returns the old one.
fn set_signal_mask(mask: &libc::sigset_t) -> Result<libc::sigset_t, Errno> {
    let mut old = *SigSet::empty().as_ref();
    // SAFETY: both pointers are to sigsets that outlive the call.
    let ret = unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, mask, &mut old) };
    // pthread_sigmask returns the error number itself, not -1 and errno
    // (nix 0.32's wrapper checks for -1, so it never sees a failure).
    match ret {
        0 => Ok(old),
        errno => Err(Errno::from_raw(errno)),
    }
}

/// The child side, between fork and exec. Never returns: it execs, or
/// reports the failing [`Stage`] and errno on `setup.report` and
/// `_exit(127)`s.
///
/// fd contract: as [`fork_exec`]; the child's copy of the report pipe is
/// CLOEXEC, so exec closes it.
///
/// # Safety
/// Call only in a just-forked child of [`fork_exec`]: it takes over fd 0
/// and fds 3.., which in baton belong to others.
unsafe fn exec_child(
    image: &mut ExecImage,
    setup: &ChildSetup<'_>,
    scratch: &mut [RawFd],
    empty_mask: &libc::sigset_t,
) -> ! {
    let floor = 3 + setup.listeners.len() as RawFd;
    // SAFETY (whole body): only raw syscalls on fds and buffers the parent
    // prepared; no allocation, no locks, no unwinding (errors `_exit`).
    unsafe {
        // Move every fd we still need above 3+n, so placing the listeners at
        // 3.. cannot overwrite one of them. The copies are CLOEXEC.
        let report = libc::fcntl(setup.report.as_raw_fd(), libc::F_DUPFD_CLOEXEC, floor);
        if report < 0 {
            libc::_exit(127);
        }
        let fail = |stage: Stage| -> ! {
            let record = encode_report(stage, Errno::last_raw());
            libc::write(report, record.as_ptr().cast(), record.len());
            libc::_exit(127)
        };
        // Into the cgroup before anything else (and before the fd shuffle
        // below could overwrite this fd): "0" is the writing process.
        if let Some(procs) = setup.cgroup_procs {
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                fail(Stage::Cgroup);
            }
        }
        let devnull = libc::fcntl(setup.stdin.as_raw_fd(), libc::F_DUPFD_CLOEXEC, floor);
        if devnull < 0 || libc::dup2(devnull, 0) < 0 {
            fail(Stage::Dup);
        }
        for (high, listener) in scratch.iter_mut().zip(setup.listeners) {
            *high = libc::fcntl(listener.as_raw_fd(), libc::F_DUPFD_CLOEXEC, floor);
            if *high < 0 {
                fail(Stage::Dup);
            }
        }
        // dup2 onto a different fd leaves the new fd without CLOEXEC: these
        // are the only fds the application inherits besides 0-2.
        for (i, &high) in scratch.iter().enumerate() {
            if libc::dup2(high, 3 + i as RawFd) < 0 {
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
            for fd in floor..setup.max_fd {
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
        // mask on every architecture. Results are ignored: the kernel
        // refuses only SIGKILL and SIGSTOP, which are always SIG_DFL.
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
        if libc::sigprocmask(libc::SIG_SETMASK, empty_mask, std::ptr::null_mut()) < 0 {
            fail(Stage::SignalMask);
        }
        for (resource, limit) in setup.limits {
            if libc::setrlimit(*resource, limit) < 0 {
                fail(Stage::Limits);
            }
        }
        if let Some(mask) = setup.umask {
            libc::umask(mask);
        }
        // Groups first (that needs privilege), then the gid, then the uid:
        // after setuid nothing else could be changed.
        if let Some(user) = setup.user {
            if libc::setgroups(user.groups.len(), user.groups.as_ptr()) < 0
                || libc::setgid(user.gid) < 0
                || libc::setuid(user.uid) < 0
            {
                fail(Stage::User);
            }
        }
        // As the application's user: its working directory is its own.
        if let Some(dir) = setup.workdir {
            if libc::chdir(dir.as_ptr()) < 0 {
                fail(Stage::Chdir);
            }
        }
        image.fill_listen_pid(libc::getpid() as u32);
        libc::execve(
            image.program.as_ptr(),
            image.argv_ptrs.as_ptr(),
            image.envp_ptrs.as_ptr(),
        );
        fail(Stage::Exec)
    }
}

/// One datagram received with [`recv_with_fds`].
pub(crate) struct Received {
    pub len: usize,
    /// The sender's pid, when the socket has SO_PASSCRED.
    pub pid: Option<Pid>,
    /// Fds the sender attached (SCM_RIGHTS), now owned by the receiver:
    /// dropping them closes them.
    pub fds: Vec<OwnedFd>,
}

/// Receives one datagram into `buf` from the non-blocking socket `socket`.
///
/// fd contract: `socket` is borrowed. Attached fds arrive CLOEXEC
/// (MSG_CMSG_CLOEXEC) and are returned as `OwnedFd`s, so none can leak.
pub(crate) fn recv_with_fds(socket: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
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

/// Registers the cgroup watcher with tokio's reactor.
///
/// fd contract: the watcher's inotify fd stays owned by the watcher, which
/// the returned `AsyncFd` owns; it is deregistered before it is closed.
pub(crate) fn register_watcher(
    watcher: crate::cgroup::Watcher,
) -> io::Result<tokio::io::unix::AsyncFd<crate::cgroup::Watcher>> {
    // SAFETY: `Watcher::as_raw_fd` returns the fd of the `OwnedFd` inside
    // its `Inotify`, which the watcher never replaces or closes while it
    // lives; the `AsyncFd` owns the watcher, so that fd stays open and the
    // same for the `AsyncFd`'s whole life.
    unsafe { tokio::io::unix::AsyncFd::register(watcher) }.map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_pid_has_no_leading_zero() {
        for (n, text) in [
            (0u32, "0"),
            (7, "7"),
            (4121, "4121"),
            (u32::MAX, "4294967295"),
        ] {
            let mut buf = [0xffu8; 12];
            write_decimal(n, &mut buf);
            let end = buf.iter().position(|&b| b == 0).unwrap();
            assert_eq!(&buf[..end], text.as_bytes());
        }
    }

    #[test]
    fn report_round_trips() {
        for stage in [
            Stage::Setpgid,
            Stage::Dup,
            Stage::Chdir,
            Stage::Exec,
            Stage::SignalMask,
            Stage::Limits,
            Stage::User,
            Stage::Cgroup,
        ] {
            let record = encode_report(stage, Errno::ENOENT as i32);
            assert_eq!(decode_report(record), (stage, Errno::ENOENT));
        }
    }
}
