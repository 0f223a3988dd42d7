//! Sockets passed the way systemd passes them, with nothing from systemd:
//! what `systemd-socket-activate` does when it starts a program, and what
//! systemd's fd store receives. The kit's only `unsafe`.

use std::ffi::OsStr;
use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::fcntl::{fcntl, FcntlArg};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

/// Sets `LISTEN_PID` to the shell's own pid, which `exec` hands on to the
/// program: the pid the program sees as its own.
const SHIM: &str = r#"LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@""#;

/// A command that runs `program args...` with `sockets` as fds 3, 4, ...
/// and `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PID` set exactly as
/// systemd sets them (man sd_listen_fds), `LISTEN_PID` being the program's
/// own pid. It runs through `/bin/sh -c`, which sets `LISTEN_PID=$$` and
/// execs the program, keeping its pid. The environment is cleaned first of
/// what the caller's would wrongly pass on (its own `LISTEN_*`, ...).
///
/// fd contract: `sockets` are borrowed; copies above fd `2 + n` (CLOEXEC)
/// live in the returned command and close when it drops. Between fork and
/// exec the child only `dup2`s each copy onto its place (which clears
/// CLOEXEC there), so nothing else of the caller's leaks into the program.
/// A `dup2` may replace std's internal exec-error pipe in the child; an
/// exec failure of `/bin/sh` is then reported as an exit, not as an error
/// of `spawn`.
pub fn command(
    program: impl AsRef<OsStr>,
    args: &[impl AsRef<OsStr>],
    sockets: &[(&str, BorrowedFd<'_>)],
) -> io::Result<Command> {
    let count = sockets.len();
    let lowest = RawFd::try_from(3 + count).expect("a handful of sockets");
    // Above the targets 3..3+n, so no dup2 overwrites a copy not yet moved.
    let copies = sockets
        .iter()
        .map(|(_, fd)| {
            let raw = fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(lowest))?;
            // SAFETY: fcntl returned a new fd that nothing else owns.
            Ok(unsafe { OwnedFd::from_raw_fd(raw) })
        })
        .collect::<io::Result<Vec<OwnedFd>>>()?;
    let names: Vec<&str> = sockets.iter().map(|(name, _)| *name).collect();
    let mut command = Command::new("/bin/sh");
    crate::procs::clean_env(&mut command);
    command
        .args(["-c", SHIM])
        .arg(program)
        .args(args)
        .env("LISTEN_FDS", count.to_string())
        .env("LISTEN_FDNAMES", names.join(":"));
    // SAFETY: the closure only calls dup2, which is async-signal-safe, on
    // fds it owns, and allocates nothing (last_os_error reads errno).
    unsafe {
        command.pre_exec(move || {
            for (target, copy) in (3..).zip(&copies) {
                if libc::dup2(copy.as_raw_fd(), target) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(command)
}

/// A datagram received with the fds attached to it (SCM_RIGHTS), as
/// systemd's fd store receives `FDSTORE=1` messages.
pub struct Received {
    pub text: String,
    pub fds: Vec<OwnedFd>,
}

/// Receives one datagram and takes ownership of the fds it carries.
pub fn recv_with_fds(socket: &UnixDatagram) -> io::Result<Received> {
    let mut buf = [0u8; 4096];
    let mut space = nix::cmsg_space!([RawFd; 16]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let message = recvmsg::<()>(
        socket.as_fd().as_raw_fd(),
        &mut iov,
        Some(space.as_mut_slice()),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for cmsg in message.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: the kernel installed these fds for us; nothing else
            // owns them.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    let len = message.bytes;
    let text = String::from_utf8_lossy(&buf[..len]).into_owned();
    Ok(Received { text, fds })
}
