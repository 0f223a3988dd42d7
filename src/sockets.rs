//! The listening sockets baton owns for its whole life: bound here with
//! socket2, or adopted from systemd's `LISTEN_FDS` by name. Also the unix
//! socket files of baton's own control socket.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use listenfd::ListenFd;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::config::{Address, Config, Listener};

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("cannot listen on {address} (listener `{name}`): {source}{hint}")]
    Bind {
        name: String,
        address: String,
        source: io::Error,
        hint: &'static str,
    },
    #[error("{0}")]
    Adopt(String),
    #[error("{}: {message}", path.display())]
    Path { path: PathBuf, message: String },
}

/// The sockets baton holds: those of the latest config, and those an
/// older generation still holds after a reload changed `[[listen]]` (closed
/// once no generation holds them). A generation gets the ones its config
/// names, in its order (fd 3, 4, ...).
pub(crate) struct Listeners {
    entries: Vec<Entry>,
}

/// One socket and what baton knows of it.
struct Entry {
    listener: Listener,
    socket: Socket,
    /// The fd systemd passed it on, if it was adopted.
    adopted_fd: Option<i32>,
    /// For an IP socket, the address it was bound to when opened.
    bound: Option<std::net::SocketAddr>,
    /// The unix socket file baton created (removed when it is closed).
    created_file: Option<PathBuf>,
}

/// The same socket in two configs: the same name and address (a changed
/// address is another socket; a changed backlog is not).
pub(crate) fn same(a: &Listener, b: &Listener) -> bool {
    a.name == b.name && a.address == b.address
}

impl Entry {
    fn bind(l: &Listener) -> Result<Entry, SocketError> {
        let socket = bind(l).map_err(|source| SocketError::Bind {
            name: l.name.clone(),
            address: l.address.to_string(),
            hint: hint(&source),
            source,
        })?;
        Ok(Entry {
            created_file: match &l.address {
                Address::Unix(path) => Some(path.clone()),
                _ => None,
            },
            bound: ip_address(&socket),
            listener: l.clone(),
            socket,
            adopted_fd: None,
        })
    }
}

impl Listeners {
    /// Adopts the sockets systemd passed (socket activation, or its fd store)
    /// when `LISTEN_FDS` is set for baton, else binds every listener.
    pub(crate) fn open(config: &Config) -> Result<Listeners, SocketError> {
        // Read before ListenFd, which removes LISTEN_FDS and LISTEN_PID.
        let names = std::env::var("LISTEN_FDNAMES").ok();
        let mut inherited = ListenFd::from_env();
        if inherited.len() > 0 {
            return adopt(config, &mut inherited, names.as_deref());
        }
        let entries = config
            .listeners
            .iter()
            .map(Entry::bind)
            .collect::<Result<_, _>>()?;
        Ok(Listeners { entries })
    }

    /// Makes sure every listener of `config` is open: binds those baton
    /// does not hold yet, listens again with a changed backlog. Returns the
    /// names of those it bound. On an error nothing is left bound.
    pub(crate) fn prepare(&mut self, config: &Config) -> Result<Vec<String>, SocketError> {
        let mut added = Vec::new();
        for l in &config.listeners {
            match self.entries.iter_mut().find(|e| same(&e.listener, l)) {
                Some(e) if e.listener.backlog != l.backlog => {
                    // listen(2) again sets the new backlog.
                    let _ = e.socket.listen(l.backlog);
                    e.listener.backlog = l.backlog;
                }
                Some(_) => {}
                None => match Entry::bind(l) {
                    Ok(entry) => added.push(entry),
                    Err(e) => {
                        for entry in &added {
                            entry.remove_file();
                        }
                        return Err(e);
                    }
                },
            }
        }
        let names = added.iter().map(|e| e.listener.name.clone()).collect();
        self.entries.extend(added);
        Ok(names)
    }

    /// Closes the sockets `keep` says no one needs; their names and
    /// addresses.
    pub(crate) fn close_unless(
        &mut self,
        keep: impl Fn(&Listener) -> bool,
    ) -> Vec<(String, String)> {
        let mut closed = Vec::new();
        self.entries.retain(|e| {
            if keep(&e.listener) {
                return true;
            }
            e.remove_file();
            closed.push((e.listener.name.clone(), e.listener.address.to_string()));
            false
        });
        closed
    }

    /// The entries of `listeners` (a config's), in their order; one baton
    /// does not hold is left out (`prepare` first).
    fn of<'a>(&'a self, listeners: &'a [Listener]) -> impl Iterator<Item = &'a Entry> + 'a {
        listeners
            .iter()
            .filter_map(|l| self.entries.iter().find(|e| same(&e.listener, l)))
    }

    /// Each socket's inode and whether it is a stream socket: what a
    /// process waiting on it shows in /proc (`[readiness] check =
    /// "accepting"`). Read now: a listener baton listened again on may be a
    /// new socket.
    pub(crate) fn wanted(&self, listeners: &[Listener]) -> Vec<crate::procfs::Wanted> {
        self.of(listeners)
            .filter_map(|e| {
                let stat = nix::sys::stat::fstat(e.socket.as_fd()).ok()?;
                Some(crate::procfs::Wanted {
                    inode: stat.st_ino,
                    stream: !matches!(e.listener.address, Address::Udp(_)),
                })
            })
            .collect()
    }

    /// The fds a generation of these listeners gets, in order.
    pub(crate) fn fds<'a>(&'a self, listeners: &'a [Listener]) -> Vec<BorrowedFd<'a>> {
        self.of(listeners).map(|e| e.socket.as_fd()).collect()
    }

    /// Name, address, the fd systemd passed it on (if adopted) and whether
    /// `current` (the latest config's listeners) still has it, of every
    /// socket; for IP sockets the address the kernel bound, so a configured
    /// port 0 shows the port it got.
    pub(crate) fn describe(
        &self,
        current: &[Listener],
    ) -> Vec<(String, String, Option<i32>, bool)> {
        self.entries
            .iter()
            .map(|e| {
                let l = &e.listener;
                let bound = e.socket.local_addr().ok().and_then(|a| a.as_socket());
                let address = match (&l.address, bound) {
                    (Address::Tcp(_), Some(a)) => Address::Tcp(a).to_string(),
                    (Address::Udp(_), Some(a)) => Address::Udp(a).to_string(),
                    (other, _) => other.to_string(),
                };
                let kept = current.iter().any(|c| same(c, l));
                (l.name.clone(), address, e.adopted_fd, kept)
            })
            .collect()
    }

    /// A child that called `shutdown()` on its copy of a listener stops it
    /// for every process (SO_ACCEPTCONN drops to 0). Listens again on each
    /// such socket; returns their names and addresses, and the error if
    /// listening again failed.
    pub(crate) fn relisten_if_shut_down(&self) -> Vec<(String, String, Option<String>)> {
        let mut restored = Vec::new();
        for e in &self.entries {
            let l = &e.listener;
            if matches!(l.address, Address::Udp(_)) {
                continue;
            }
            if let Ok(false) = e.socket.is_listener() {
                let error = relisten(&e.socket, l, e.bound).err().map(|e| e.to_string());
                restored.push((l.name.clone(), l.address.to_string(), error));
            }
        }
        restored
    }

    /// Pushes the listeners named `names` (all when `None`) into systemd's
    /// fd store under their names; they come back through LISTEN_FDS (by
    /// name) if baton is restarted. systemd ignores an fd it already
    /// stores, so re-pushing is harmless.
    pub(crate) fn store_in(
        &self,
        upstream: &crate::notify::UpstreamNotifier,
        names: Option<&[String]>,
    ) {
        let wanted = |e: &&Entry| names.is_none_or(|n| n.contains(&e.listener.name));
        for e in self.entries.iter().filter(wanted) {
            let name = &e.listener.name;
            match upstream.store_fd(name, e.socket.as_fd()) {
                Ok(()) => tracing::info!("listener `{name}` handed to systemd's fd store"),
                Err(e) => tracing::warn!("cannot store listener `{name}` with systemd: {e}"),
            }
        }
    }

    /// Removes the unix socket files baton bound (not adopted ones).
    pub(crate) fn remove_files(&self) {
        for e in &self.entries {
            e.remove_file();
        }
    }
}

impl Entry {
    fn remove_file(&self) {
        if let Some(path) = &self.created_file {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EADDRINUSE) => {
            " (another process holds this address: stop it, or pick another address)"
        }
        Some(libc::EACCES) => {
            " (ports below 1024 need root or CAP_NET_BIND_SERVICE; for unix sockets check the directory's permissions)"
        }
        Some(libc::EADDRNOTAVAIL) => " (no local interface has this IP address)",
        Some(libc::ENOENT) => " (the socket's directory does not exist: create it first)",
        _ => "",
    }
}

/// Listens again on a socket a child shut down. A TCP socket whose port
/// the kernel chose (`:0`) loses that port at shutdown(); it is bound to
/// `bound` (its address when baton opened it) first, or listen() would
/// pick another port.
fn relisten(s: &Socket, l: &Listener, bound: Option<std::net::SocketAddr>) -> io::Result<()> {
    if let (Address::Tcp(_), Some(addr)) = (&l.address, bound) {
        // EINVAL: still bound (an explicit port is kept), as it should be.
        match s.bind(&addr.into()) {
            Err(e) if e.raw_os_error() != Some(libc::EINVAL) => return Err(e),
            _ => {}
        }
    }
    s.listen(l.backlog)
}

fn ip_address(s: &Socket) -> Option<std::net::SocketAddr> {
    s.local_addr().ok()?.as_socket()
}

fn bind(l: &Listener) -> io::Result<Socket> {
    match &l.address {
        Address::Tcp(addr) => {
            let socket = Socket::new(
                Domain::for_address(*addr),
                Type::STREAM,
                Some(Protocol::TCP),
            )?;
            if addr.is_ipv6() {
                // Explicit, whatever net.ipv6.bindv6only says.
                socket.set_only_v6(true)?;
            }
            socket.set_reuse_address(true)?;
            socket.bind(&(*addr).into())?;
            socket.listen(l.backlog)?;
            Ok(socket)
        }
        Address::Udp(addr) => {
            let socket = Socket::new(Domain::for_address(*addr), Type::DGRAM, Some(Protocol::UDP))?;
            if addr.is_ipv6() {
                socket.set_only_v6(true)?;
            }
            socket.set_reuse_address(true)?;
            socket.bind(&(*addr).into())?;
            Ok(socket)
        }
        Address::Unix(path) => {
            let socket = bind_unix(path, l.mode.unwrap_or(0o666))?;
            socket.listen(l.backlog)?;
            Ok(socket)
        }
    }
}

/// Binds a unix stream socket at `path` with file mode `mode`. A socket file
/// nobody listens on (left by a dead process) is replaced; a live one is an
/// error, as is any other kind of file.
pub(crate) fn bind_unix(path: &Path, mode: u32) -> io::Result<Socket> {
    remove_stale(path)?;
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.bind(&SockAddr::unix(path)?)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(socket)
}

fn remove_stale(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        other => other?,
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket: remove it or choose another path",
                path.display()
            ),
        ));
    }
    match UnixStream::connect(path) {
        Ok(stream) => {
            // The kernel records who called listen(); that process may be
            // gone (a killed baton whose children still hold the socket),
            // so name the processes that hold it now.
            let listened =
                nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
                    .map(|c| c.pid())
                    .ok();
            let mut holders = holders_of(path);
            if holders.is_empty() {
                holders.extend(listened.filter(|&pid| Path::new(&format!("/proc/{pid}")).exists()));
            }
            let owner = match holders.as_slice() {
                [] => String::new(),
                pids => {
                    let named: Vec<String> = pids.iter().map(|&p| describe_pid(p)).collect();
                    format!(" ({})", named.join(", "))
                }
            };
            Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is in use by a running process{owner}", path.display()),
            ))
        }
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            tracing::info!("removing stale socket file {}", path.display());
            std::fs::remove_file(path)
        }
        Err(e) => Err(e),
    }
}

/// The pids holding the listening unix socket bound at `path`: its inode
/// from /proc/net/unix, then every /proc/PID/fd pointing at it (only the
/// processes this user may inspect; a few at most are named).
fn holders_of(path: &Path) -> Vec<i32> {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return Vec::new();
    };
    let wanted = path.as_os_str().to_string_lossy();
    // "Num RefCount Protocol Flags Type St Inode Path"; St 01 = listening.
    let inode = table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.len() >= 8 && fields[5] == "01" && fields[7] == wanted).then(|| fields[6])
    });
    let Some(inode) = inode else {
        return Vec::new();
    };
    let target = format!("socket:[{inode}]");
    let mut pids = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let holds = fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == &*target));
        if holds {
            pids.push(pid);
            if pids.len() == 4 {
                break;
            }
        }
    }
    pids
}

/// "pid 4121 (hello)".
fn describe_pid(pid: i32) -> String {
    match std::fs::read_to_string(format!("/proc/{pid}/comm")) {
        Ok(comm) => format!("pid {pid} ({})", comm.trim_end()),
        Err(_) => format!("pid {pid}"),
    }
}

/// Takes each configured listener from the fds systemd passed, by name
/// (`FileDescriptorName=` in the .socket unit), or by position when systemd
/// passed no names and the counts match.
fn adopt(
    config: &Config,
    inherited: &mut ListenFd,
    names: Option<&str>,
) -> Result<Listeners, SocketError> {
    let names: Vec<&str> = names.map(|n| n.split(':').collect()).unwrap_or_default();
    let count = inherited.len();
    let mut entries = Vec::new();
    for (i, l) in config.listeners.iter().enumerate() {
        let index = match names.iter().position(|n| *n == l.name) {
            Some(index) => index,
            None if names.is_empty() && count == config.listeners.len() => i,
            None => {
                return Err(SocketError::Adopt(format!(
                    "systemd passed {count} socket(s) named [{}] but none is named `{}`: set \
                     FileDescriptorName={} in the .socket unit (or name the listener after it)",
                    names.join(", "),
                    l.name,
                    l.name
                )))
            }
        };
        let taken = match &l.address {
            Address::Tcp(_) => inherited
                .take_tcp_listener(index)
                .map(|s| s.map(Socket::from)),
            Address::Udp(_) => inherited
                .take_udp_socket(index)
                .map(|s| s.map(Socket::from)),
            Address::Unix(_) => inherited
                .take_unix_listener(index)
                .map(|s| s.map(Socket::from)),
        };
        let socket = match taken {
            Ok(Some(socket)) => socket,
            Ok(None) => {
                return Err(SocketError::Adopt(format!(
                    "socket {index} from systemd was already taken by another listener"
                )))
            }
            Err(e) => {
                return Err(SocketError::Adopt(format!(
                    "socket `{}` from systemd (fd {}) does not fit listener address {}: {e}",
                    l.name,
                    3 + index,
                    l.address
                )))
            }
        };
        entries.push(Entry {
            listener: l.clone(),
            bound: ip_address(&socket),
            socket,
            adopted_fd: Some(3 + index as i32),
            created_file: None,
        });
    }
    if count > entries.len() {
        tracing::warn!(
            "systemd passed {count} socket(s), the config uses {}: the others are not passed on",
            entries.len()
        );
    }
    Ok(Listeners { entries })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_unix_socket_is_replaced_live_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.sock");
        let first = bind_unix(&path, 0o600).unwrap();
        first.listen(8).unwrap();
        let err = bind_unix(&path, 0o600).unwrap_err();
        assert!(
            err.to_string().contains("in use by a running process"),
            "{err}"
        );
        drop(first); // the file stays, nobody listens: stale
        assert!(path.exists());
        bind_unix(&path, 0o640).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
    }

    /// Issue 8: the error named the pid that called listen() (a killed
    /// baton), not the children that still held the socket.
    #[test]
    fn live_socket_error_names_the_process_holding_it() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("held.sock");
        let first = bind_unix(&path, 0o600).unwrap();
        first.listen(8).unwrap();
        // Hand it to a child, as baton hands listeners to a generation.
        let fd = first.as_raw_fd();
        nix::fcntl::fcntl(
            &first,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )
        .unwrap();
        let mut holder = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        drop(first);
        let err = bind_unix(&path, 0o600).unwrap_err().to_string();
        let _ = holder.kill();
        let _ = holder.wait();
        assert!(
            err.contains(&format!("pid {} (sleep)", holder.id())),
            "{err} (fd {fd})"
        );
        assert!(
            !err.contains(&format!("pid {} ", std::process::id())),
            "{err}"
        );
    }

    #[test]
    fn regular_file_in_the_way_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.sock");
        std::fs::write(&path, "x").unwrap();
        let err = bind_unix(&path, 0o600).unwrap_err();
        assert!(err.to_string().contains("is not a socket"), "{err}");
    }

    #[test]
    fn shut_down_listener_is_detected_and_relistens() {
        let l = Listener {
            name: "http".into(),
            address: Address::Tcp("127.0.0.1:0".parse().unwrap()),
            backlog: 16,
            mode: None,
        };
        let listeners = Listeners {
            entries: vec![Entry::bind(&l).unwrap()],
        };
        let s = &listeners.entries[0].socket;
        let port = ip_address(s);
        assert!(s.is_listener().unwrap());
        s.shutdown(std::net::Shutdown::Read).unwrap();
        assert!(!s.is_listener().unwrap());
        let restored = listeners.relisten_if_shut_down();
        assert_eq!(restored.len(), 1);
        assert_eq!(restored[0].2, None);
        assert!(s.is_listener().unwrap());
        // The port the kernel chose is kept (shutdown() released it).
        assert_eq!(ip_address(s), port);
        std::net::TcpStream::connect(port.unwrap()).unwrap();
        assert!(listeners.relisten_if_shut_down().is_empty());
    }

    /// Issue 10: a reload's listeners are opened before it is taken; a
    /// removed one closes once nothing needs it; a bind error leaves
    /// nothing behind.
    #[test]
    fn listeners_are_added_kept_and_closed() {
        let text = |listen: &str| format!("{listen}[app]\ncommand = [\"x\"]\n");
        let listen = |name: &str, address: &str| {
            format!("[[listen]]\nname = \"{name}\"\naddress = \"{address}\"\n")
        };
        let parse = |t: &str| Config::parse(Path::new("/etc/baton/t.toml"), t).unwrap();
        let one = parse(&text(&listen("a", "127.0.0.1:0")));
        let mut listeners = Listeners::open(&one).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let sock = format!("unix:{}", dir.path().join("b.sock").display());
        let two = parse(&text(&(listen("a", "127.0.0.1:0") + &listen("b", &sock))));
        assert_eq!(listeners.prepare(&two).unwrap(), ["b"]);
        assert_eq!(listeners.fds(&two.listeners).len(), 2);
        assert!(listeners.prepare(&two).unwrap().is_empty(), "opened once");
        // `b`'s address is taken by another socket: refused, `c` not left.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap();
        let three = parse(&text(
            &(listen("a", "127.0.0.1:0")
                + &listen("c", &sock.replace("b.sock", "c.sock"))
                + &listen("d", &port.to_string())),
        ));
        assert!(listeners.prepare(&three).is_err());
        assert!(!dir.path().join("c.sock").exists());
        assert_eq!(listeners.describe(&two.listeners).len(), 2);
        // Back to `a` alone: `b` closes when nothing needs it.
        let closed = listeners.close_unless(|l| one.listeners.contains(l));
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].0, "b");
        assert!(!dir.path().join("b.sock").exists());
    }
}
