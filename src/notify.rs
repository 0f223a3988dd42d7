//! The sd_notify sockets (man sd_notify): the socket children report
//! readiness on, and the client baton uses to report to its own service
//! manager. What the datagrams say is [`sd_notify`](crate::sd_notify).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;

use nix::sys::socket::{self, ControlMessage, MsgFlags, UnixAddr};
use nix::unistd::Pid;
use socket2::{Domain, Socket, Type};
use tokio::io::Interest;

use crate::sd_notify::{render, Message, Upstream};

/// Receiving with fds and credentials takes ownership of raw fds the kernel
/// installed, so it lives in `sys`; the systemd integration test reads
/// baton's own fd store with it.
pub(crate) use crate::sys::recv_with_fds;

/// Datagrams are at most this long (systemd uses the same limit).
const MAX_DATAGRAM: usize = 4096;

/// The socket children send `READY=1` to. Every datagram carries the sender's
/// pid, attached by the kernel (SO_PASSCRED): a sender can name another pid
/// only with CAP_SYS_ADMIN, so children without it (`[app] user`) cannot
/// pass for each other.
pub(crate) struct NotifySocket {
    socket: tokio::net::UnixDatagram,
}

impl NotifySocket {
    /// Binds a fresh socket at `path` (replacing a stale file), mode 0600.
    pub(crate) fn bind(path: &Path) -> io::Result<NotifySocket> {
        let socket = Socket::new(Domain::UNIX, Type::DGRAM.nonblocking(), None)?;
        socket.set_passcred(true)?;
        // The mode of the socket inode becomes the file's mode at bind.
        nix::sys::stat::fchmod(&socket, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        socket.bind(&socket2::SockAddr::unix(path)?)?;
        let socket = UnixDatagram::from(std::os::fd::OwnedFd::from(socket));
        Ok(NotifySocket {
            socket: tokio::net::UnixDatagram::from_std(socket)?,
        })
    }

    /// The next datagram and the pid that sent it. Datagrams without
    /// credentials cannot happen with SO_PASSCRED and are skipped.
    pub(crate) async fn recv(&self) -> io::Result<(Pid, Message)> {
        loop {
            self.socket.readable().await?;
            let fd = self.socket.as_fd();
            match self.socket.try_io(Interest::READABLE, || receive(fd)) {
                Ok(Some(received)) => return Ok(received),
                Ok(None) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// One datagram and its sender; attached fds (FDSTORE=1 from an app) are
/// dropped, which closes them: baton keeps none.
fn receive(socket: BorrowedFd<'_>) -> io::Result<Option<(Pid, Message)>> {
    let mut buf = [0u8; MAX_DATAGRAM];
    let received = recv_with_fds(socket, &mut buf)?;
    Ok(received
        .pid
        .map(|pid| (pid, Message::parse(&buf[..received.len]))))
}

/// Reports to the service manager that started baton (systemd), when
/// `NOTIFY_SOCKET` was set for baton itself.
pub(crate) struct UpstreamNotifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    /// The same address for `sendmsg` (fd passing).
    unix_addr: UnixAddr,
}

impl UpstreamNotifier {
    /// Takes `NOTIFY_SOCKET` from baton's environment (a path, or `@name`
    /// for an abstract socket). `None` when unset or unusable.
    pub(crate) fn from_env() -> Option<UpstreamNotifier> {
        let value = std::env::var_os("NOTIFY_SOCKET")?;
        let value = value.to_string_lossy();
        let made = match value.strip_prefix('@') {
            Some(name) => SocketAddr::from_abstract_name(name.as_bytes())
                .and_then(|a| Ok((a, UnixAddr::new_abstract(name.as_bytes())?))),
            None => SocketAddr::from_pathname(&*value)
                .and_then(|a| Ok((a, UnixAddr::new(value.as_bytes())?))),
        };
        // Non-blocking: a service manager with a full queue must not stall
        // baton's event loop; such a message is dropped with a warning.
        let unbound = || -> io::Result<UnixDatagram> {
            let socket = UnixDatagram::unbound()?;
            socket.set_nonblocking(true)?;
            Ok(socket)
        };
        match made.and_then(|(addr, unix_addr)| Ok((unbound()?, addr, unix_addr))) {
            Ok((socket, addr, unix_addr)) => Some(UpstreamNotifier {
                socket,
                addr,
                unix_addr,
            }),
            Err(e) => {
                tracing::warn!("NOTIFY_SOCKET={value} is unusable: {e}");
                None
            }
        }
    }

    pub(crate) fn send(&self, message: &Upstream) {
        self.send_text(&render(message, std::process::id(), monotonic_usec()));
    }

    /// Sends one raw datagram (`WATCHDOG=1`, say).
    pub(crate) fn send_text(&self, text: &str) {
        if let Err(e) = self.socket.send_to_addr(text.as_bytes(), &self.addr) {
            tracing::warn!("cannot notify the service manager ({text:?}): {e}");
        }
    }

    /// Hands `fd` to the service manager's fd store under `name`
    /// (`FDSTORE=1`), so it comes back in LISTEN_FDS if baton restarts.
    pub(crate) fn store_fd(&self, name: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
        let text = format!("FDSTORE=1\nFDNAME={name}");
        let fds = [fd.as_raw_fd()];
        socket::sendmsg(
            self.socket.as_raw_fd(),
            &[io::IoSlice::new(text.as_bytes())],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::MSG_DONTWAIT,
            Some(&self.unix_addr),
        )?;
        Ok(())
    }
}

/// The watchdog interval systemd asks for (`WATCHDOG_USEC`), when it is
/// meant for this process (`WATCHDOG_PID` unset or ours).
pub(crate) fn watchdog_from_env() -> Option<std::time::Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    let for_us = match std::env::var("WATCHDOG_PID") {
        Ok(pid) => pid.parse::<u32>().ok() == Some(std::process::id()),
        Err(_) => true,
    };
    (for_us && usec > 0).then(|| std::time::Duration::from_micros(usec))
}

/// `CLOCK_MONOTONIC` in µs, as systemd wants it with `RELOADING=1`.
fn monotonic_usec() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fds attached to a notify datagram are closed, however many there
    /// are: the pipe's reader sees EOF only once every copy of its write
    /// end is gone.
    #[tokio::test(flavor = "current_thread")]
    async fn attached_fds_are_closed_even_past_sixteen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.notify");
        let socket = NotifySocket::bind(&path).unwrap();
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK).unwrap();
        let client = UnixDatagram::unbound().unwrap();
        let fds = [write.as_raw_fd(); 40];
        socket::sendmsg(
            client.as_raw_fd(),
            &[io::IoSlice::new(b"FDSTORE=1")],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            Some(&UnixAddr::new(&path).unwrap()),
        )
        .unwrap();
        drop(write);
        socket.recv().await.unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(
            nix::unistd::read(&read, &mut buf),
            Ok(0),
            "a copy of the write end leaked"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn authenticates_sender_by_pid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.notify");
        let socket = NotifySocket::bind(&path).unwrap();
        let client = UnixDatagram::unbound().unwrap();
        client.send_to(b"READY=1\nSTATUS=hi", &path).unwrap();
        let (pid, message) = socket.recv().await.unwrap();
        assert_eq!(pid.as_raw() as u32, std::process::id());
        assert!(message.ready);
        assert_eq!(message.status.as_deref(), Some("hi"));
    }
}
