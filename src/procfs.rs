//! What /proc says about a generation's processes: who they are (the main
//! process and its descendants), their memory and CPU, and whether they
//! wait for connections on baton's listeners (`[readiness] check =
//! "accepting"`, issue 9).
//!
//! "Waiting" is seen three ways, each by the listener's socket inode (so
//! the fd number a process moved it to does not matter):
//! - registered in an epoll set: `/proc/P/fdinfo/E` of an epoll fd lists
//!   each target's inode (`tfd: ... ino:<hex>`); event loops (tokio, Go,
//!   Node, asyncio, nginx-style C servers, gunicorn's workers) all do this;
//! - a thread blocked in `accept`/`accept4` (or, for UDP, `recvfrom`,
//!   `recvmsg`, `recvmmsg`) on it: `/proc/P/task/T/syscall` names the call
//!   and its fd argument;
//! - a thread blocked in `poll`/`ppoll`/`select`/`pselect6` with it in the
//!   set: the set is read from `/proc/P/mem` at the address the call got
//!   (a parent may read its descendants' memory).
//!
//! Not seen: io_uring (accept submitted to a ring leaves no trace here) and
//! a process that accepts only between long sleeps. Everything is read
//! without `unsafe`; every walk is bounded.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::FileExt;

/// At most this many processes are looked at per generation.
const MAX_PROCESSES: usize = 4096;
/// At most this many fds of one poll/select set are read.
const MAX_SET: u64 = 4096;

/// `leader` and its descendants (by `/proc/P/task/T/children`), leader
/// first; only those that still exist.
pub(crate) fn descendants(leader: i32) -> Vec<i32> {
    let mut found = vec![leader];
    let mut seen = HashSet::from([leader]);
    let mut i = 0;
    while i < found.len() && found.len() < MAX_PROCESSES {
        let pid = found[i];
        i += 1;
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let children = fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                if seen.insert(child) {
                    found.push(child);
                }
            }
        }
    }
    found.retain(|pid| fs::metadata(format!("/proc/{pid}")).is_ok());
    found
}

/// The resident set of `pid` in bytes (`VmRSS` of /proc/PID/status).
pub(crate) fn rss_bytes(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// utime + stime of `pid` (/proc/PID/stat fields 14 and 15, in clock
/// ticks), in microseconds.
pub(crate) fn cpu_usec(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ...": comm may hold spaces and parentheses.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|&t| t > 0)? as u64;
    Some((utime + stime) * 1_000_000 / tick)
}

/// A listener to find, by the inode of its socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Wanted {
    pub inode: u64,
    /// A stream socket (accept) rather than a datagram one (recv).
    pub stream: bool,
}

/// Whether, for every listener in `wanted`, one of `pids` waits on it.
pub(crate) fn accepting(pids: &[i32], wanted: &[Wanted]) -> bool {
    let mut waiting = HashSet::new();
    for &pid in pids {
        waiting.extend(waiting_in(pid, wanted));
        if wanted.iter().all(|w| waiting.contains(&w.inode)) {
            return true;
        }
    }
    wanted.is_empty()
}

/// The inodes of `wanted` that process `pid` waits on.
fn waiting_in(pid: i32, wanted: &[Wanted]) -> HashSet<u64> {
    let mut waiting = HashSet::new();
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return waiting;
    };
    let inodes: HashSet<u64> = wanted.iter().map(|w| w.inode).collect();
    let mut sockets: HashMap<u64, u64> = HashMap::new();
    let mut epolls = Vec::new();
    for fd in fds.flatten() {
        let Some(number) = fd.file_name().to_str().and_then(|n| n.parse::<u64>().ok()) else {
            continue;
        };
        let Ok(target) = fs::read_link(fd.path()) else {
            continue;
        };
        let target = target.to_string_lossy();
        if let Some(inode) = socket_inode(&target).filter(|i| inodes.contains(i)) {
            sockets.insert(number, inode);
        } else if target == "anon_inode:[eventpoll]" {
            epolls.push(number);
        }
    }
    for epoll in epolls {
        let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{epoll}")).unwrap_or_default();
        waiting.extend(epoll_targets(&info).filter(|i| inodes.contains(i)));
    }
    if waiting.len() == inodes.len() || sockets.is_empty() {
        return waiting;
    }
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return waiting;
    };
    let mem = fs::File::open(format!("/proc/{pid}/mem")).ok();
    let read_mem = |address: u64, len: usize| -> Option<Vec<u8>> {
        let mut buf = vec![0; len];
        mem.as_ref()?.read_exact_at(&mut buf, address).ok()?;
        Some(buf)
    };
    for task in tasks.flatten() {
        let syscall = fs::read_to_string(task.path().join("syscall")).unwrap_or_default();
        let Some(call) = Blocked::parse(&syscall) else {
            continue;
        };
        let fds = call.fds(&read_mem);
        for (fd, stream_call) in fds {
            let Some(&inode) = sockets.get(&fd) else {
                continue;
            };
            let stream = wanted.iter().any(|w| w.inode == inode && w.stream);
            if stream_call.is_none_or(|s| s == stream) {
                waiting.insert(inode);
            }
        }
    }
    waiting
}

/// "socket:[12345]" → 12345.
fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The target inodes of an epoll fd's fdinfo:
/// `tfd:        3 events:       19 data: ... pos:0 ino:2b1a sdev:8`.
fn epoll_targets(fdinfo: &str) -> impl Iterator<Item = u64> + '_ {
    fdinfo
        .lines()
        .filter(|l| l.starts_with("tfd:"))
        .filter_map(|l| {
            let ino = l.split_whitespace().find_map(|f| f.strip_prefix("ino:"))?;
            u64::from_str_radix(ino, 16).ok()
        })
}

/// A thread blocked in a call that waits for connections or datagrams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Blocked {
    /// accept/accept4 on the fd (stream sockets).
    Accept(u64),
    /// recvfrom/recvmsg/recvmmsg on the fd (datagram sockets).
    Recv(u64),
    /// poll/ppoll on `count` pollfds at `address`.
    Poll { address: u64, count: u64 },
    /// select/pselect6 on `nfds` with the read set at `address`.
    Select { nfds: u64, address: u64 },
}

impl Blocked {
    /// `/proc/P/task/T/syscall`: "NR ARG0 ARG1 ... SP PC" (args in hex), or
    /// "running" / "-1 ..." when the thread is not in a call.
    fn parse(text: &str) -> Option<Blocked> {
        let mut fields = text.split_whitespace();
        let nr: i64 = fields.next()?.parse().ok()?;
        let args: Vec<u64> = fields
            .take(6)
            .filter_map(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok())
            .collect();
        let arg = |i: usize| args.get(i).copied();
        let nr = nr as libc::c_long;
        let call = match nr {
            _ if nr == libc::SYS_accept || nr == libc::SYS_accept4 => Blocked::Accept(arg(0)?),
            _ if nr == libc::SYS_recvfrom
                || nr == libc::SYS_recvmsg
                || nr == libc::SYS_recvmmsg =>
            {
                Blocked::Recv(arg(0)?)
            }
            _ if nr == libc::SYS_ppoll || legacy_poll(nr) => Blocked::Poll {
                address: arg(0)?,
                count: arg(1)?.min(MAX_SET),
            },
            _ if nr == libc::SYS_pselect6 || legacy_select(nr) => Blocked::Select {
                nfds: arg(0)?.min(MAX_SET),
                address: arg(1)?,
            },
            _ => return None,
        };
        Some(call)
    }

    /// The fds the call waits on, each with whether the call is for stream
    /// sockets (`Some(true)`: accept; `Some(false)`: recv; `None`: either,
    /// poll and select).
    fn fds(&self, read_mem: &dyn Fn(u64, usize) -> Option<Vec<u8>>) -> Vec<(u64, Option<bool>)> {
        match *self {
            Blocked::Accept(fd) => vec![(fd, Some(true))],
            Blocked::Recv(fd) => vec![(fd, Some(false))],
            Blocked::Poll { address, count } => {
                // struct pollfd { int fd; short events; short revents; }
                let Some(set) = read_mem(address, count as usize * 8) else {
                    return Vec::new();
                };
                set.chunks_exact(8)
                    .filter_map(|p| {
                        let fd = i32::from_ne_bytes([p[0], p[1], p[2], p[3]]);
                        let events = i16::from_ne_bytes([p[4], p[5]]);
                        (fd >= 0 && events & libc::POLLIN != 0).then_some((fd as u64, None))
                    })
                    .collect()
            }
            Blocked::Select { nfds, address } => {
                if address == 0 {
                    return Vec::new();
                }
                // An fd_set: bits in native-endian 64-bit words.
                let words = nfds.div_ceil(64) as usize;
                let Some(set) = read_mem(address, words * 8) else {
                    return Vec::new();
                };
                let mut fds = Vec::new();
                for (w, word) in set.chunks_exact(8).enumerate() {
                    let bits = u64::from_ne_bytes(word.try_into().expect("8 bytes"));
                    for bit in 0..64 {
                        let fd = (w * 64 + bit) as u64;
                        if fd < nfds && bits & (1 << bit) != 0 {
                            fds.push((fd, None));
                        }
                    }
                }
                fds
            }
        }
    }
}

/// poll(2) and select(2) themselves exist on x86-64 only (aarch64 has just
/// ppoll and pselect6).
#[cfg(target_arch = "x86_64")]
fn legacy_poll(nr: libc::c_long) -> bool {
    nr == libc::SYS_poll
}
#[cfg(not(target_arch = "x86_64"))]
fn legacy_poll(_: libc::c_long) -> bool {
    false
}
#[cfg(target_arch = "x86_64")]
fn legacy_select(nr: libc::c_long) -> bool {
    nr == libc::SYS_select
}
#[cfg(not(target_arch = "x86_64"))]
fn legacy_select(_: libc::c_long) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoll_fdinfo_targets_are_inodes_in_hex() {
        let info = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\n\
                    tfd:        9 events:       19 data:                9  pos:0 ino:2b1a sdev:8\n\
                    tfd:        3 events:       19 data:                3  pos:0 ino:1f4 sdev:8\n";
        assert_eq!(epoll_targets(info).collect::<Vec<_>>(), [0x2b1a, 0x1f4]);
    }

    #[test]
    fn blocked_calls_are_parsed_from_the_syscall_file() {
        let accept = format!(
            "{} 0x3 0x7ffd 0x7ffe 0x80800 0x0 0x0 0x7ff 0x7f1",
            libc::SYS_accept4
        );
        assert_eq!(Blocked::parse(&accept), Some(Blocked::Accept(3)));
        let ppoll = format!(
            "{} 0x55d0c0 0x2 0x0 0x0 0x8 0x0 0x7ff 0x7f1",
            libc::SYS_ppoll
        );
        assert_eq!(
            Blocked::parse(&ppoll),
            Some(Blocked::Poll {
                address: 0x55d0c0,
                count: 2
            })
        );
        assert_eq!(Blocked::parse("running"), None);
        assert_eq!(Blocked::parse("-1 0x7ffd 0x7f1"), None);
        let read = format!(
            "{} 0x3 0x7ffd 0x1000 0x0 0x0 0x0 0x7ff 0x7f1",
            libc::SYS_read
        );
        assert_eq!(Blocked::parse(&read), None);
    }

    #[test]
    fn poll_and_select_sets_are_read_from_memory() {
        // Two pollfds: fd 5 for reading, fd 7 for writing only.
        let mut set = Vec::new();
        for (fd, events) in [(5i32, libc::POLLIN), (7, libc::POLLOUT)] {
            set.extend_from_slice(&fd.to_ne_bytes());
            set.extend_from_slice(&events.to_ne_bytes());
            set.extend_from_slice(&0i16.to_ne_bytes());
        }
        let memory = |address: u64, len: usize| (address == 0x1000).then(|| set[..len].to_vec());
        let poll = Blocked::Poll {
            address: 0x1000,
            count: 2,
        };
        assert_eq!(poll.fds(&memory), [(5, None)]);
        // A read set with fds 3 and 66.
        let mut bits = [0u8; 16];
        bits[0] = 1 << 3;
        bits[8] = 1 << 2;
        let memory = |_: u64, len: usize| Some(bits[..len].to_vec());
        let select = Blocked::Select {
            nfds: 67,
            address: 0x2000,
        };
        assert_eq!(select.fds(&memory), [(3, None), (66, None)]);
    }

    #[test]
    fn socket_links_give_their_inode() {
        assert_eq!(socket_inode("socket:[4242]"), Some(4242));
        assert_eq!(socket_inode("anon_inode:[eventpoll]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
    }
}
