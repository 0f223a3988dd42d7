//! The example app's side of a handoff (issue 13, "the proof, made
//! honest"): a booting generation leaves the shared listeners out of its
//! event loop, and a draining one gives idle keep-alive connections a grace
//! for their next request instead of closing them under it.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, SystemTime};

use baton_testkit::{eventually, Baton, Launch, Mark, Notice};

use crate::{setup, start};

/// Bounds every wait of these tests.
const WAIT: Duration = Duration::from_secs(10);

/// A keep-alive request (HTTP/1.1 keeps the connection by default).
const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n";

/// The fd of the app's (only) listener: baton passes it as the first fd.
const LISTENER_FD: i32 = 3;

/// Issue 13: a booting generation registered the shared listener with its
/// event loop before its boot, so every connection the serving generation
/// got woke it too. Now it holds the listener unregistered until its boot
/// is over, and registers it before it becomes ready.
#[test]
fn the_listener_joins_the_event_loop_only_after_the_boot() {
    let gates = tempfile::tempdir().unwrap();
    let gated = setup().env("HELLO_BOOT_GATE", &gates.path().display().to_string());
    let mut baton = Baton::launch(&gated, Launch::default()).unwrap();
    let pid = started_pid(&baton, 1);
    // Past its boot delay and every setup step: it polls the gate now.
    baton
        .wait_log(&format!("generation 1 pid {pid} waiting for"), WAIT)
        .unwrap();
    let link = std::fs::read_link(format!("/proc/{pid}/fd/{LISTENER_FD}")).unwrap();
    assert!(
        link.to_string_lossy().starts_with("socket:"),
        "fd {LISTENER_FD} of pid {pid} is {link:?}, not the listener"
    );
    let (instances, watched) = epoll_watched(pid);
    assert!(instances > 0, "pid {pid} has no epoll instance yet");
    assert!(
        !watched.contains(&LISTENER_FD),
        "the booting generation (pid {pid}) has its listener in epoll: {watched:?}"
    );

    std::fs::write(gates.path().join("1"), "").unwrap();
    baton.wait_ready(1, WAIT).unwrap();
    assert!(
        eventually(WAIT, || epoll_watched(pid).1.contains(&LISTENER_FD)),
        "the ready generation (pid {pid}) never registered its listener: {:?}",
        epoll_watched(pid).1
    );
}

/// An app stuck in its init (`HELLO_FAIL=never-ready`) holds the listener
/// but never registers it.
#[test]
fn a_never_ready_app_never_registers_the_listener() {
    let stuck = setup().env("HELLO_FAIL", "never-ready");
    let mut baton = Baton::launch(&stuck, Launch::default()).unwrap();
    let pid = started_pid(&baton, 1);
    baton
        .wait_log("HELLO_FAIL=never-ready: holding the sockets", WAIT)
        .unwrap();
    let (instances, watched) = epoll_watched(pid);
    assert!(instances > 0, "pid {pid} has no epoll instance");
    assert!(
        !watched.contains(&LISTENER_FD),
        "the never-ready app (pid {pid}) has its listener in epoll: {watched:?}"
    );
    assert!(std::fs::read_link(format!("/proc/{pid}/fd/{LISTENER_FD}")).is_ok());
}

/// A keep-alive client that sends its next request just after the drain
/// signal (it cannot know) gets it answered by the old generation, with
/// `Connection: close`, then the connection closes: no read error.
#[test]
fn a_keep_alive_request_just_after_the_drain_signal_is_answered() {
    // A long grace: the test's own reaction time must not decide it.
    let mut baton = start(&setup().env("HELLO_DRAIN_IDLE_MS", "5000"));
    let mut client = connect(baton.port());
    client.write_all(GET).unwrap();
    let first = read_response(&mut client);
    assert!(first.contains("generation=1"), "{first}");
    assert!(!first.contains("Connection: close"), "{first}");

    let (code, stdout, stderr) = baton.reload_wait();
    assert_eq!(code, 0, "{stdout}{stderr}");
    baton.wait_mark(1, Mark::Draining, WAIT).unwrap();
    // The new generation's timing line, which the benchmark reads too.
    baton.wait_mark(2, Mark::AppReadySent, WAIT).unwrap();
    // The app itself logs that the signal reached it: from here on it
    // drains, so this request arrives during the drain.
    baton.wait_mark(1, Mark::AppDrainSignal, WAIT).unwrap();
    client.write_all(GET).unwrap();
    let second = read_response(&mut client);
    assert!(second.starts_with("HTTP/1.1 200 OK\r\n"), "{second}");
    assert!(second.contains("generation=1"), "{second}");
    assert!(second.contains("\r\nConnection: close\r\n"), "{second}");
    assert_eq!(read_or_eof(&mut client), 0, "EOF after the last response");
    drop(client);
    baton.wait_drained(1).unwrap();
}

/// A keep-alive connection that stays idle through the drain is closed by
/// the old generation once the grace is over (not before: that raced the
/// client's next request), with a FIN, and the old generation then exits.
#[test]
fn an_idle_keep_alive_connection_is_closed_after_the_grace() {
    let grace = Duration::from_millis(300);
    let idle = setup().env("HELLO_DRAIN_IDLE_MS", &grace.as_millis().to_string());
    let mut baton = start(&idle);
    let mut client = connect(baton.port());
    client.write_all(GET).unwrap();
    let first = read_response(&mut client);
    assert!(first.contains("generation=1"), "{first}");

    let (code, stdout, stderr) = baton.reload_wait();
    assert_eq!(code, 0, "{stdout}{stderr}");
    let signal = baton.wait_mark(1, Mark::AppDrainSignal, WAIT).unwrap();
    assert_eq!(read_or_eof(&mut client), 0, "the idle connection is closed");
    // Both clocks are the wall clock of this machine.
    let closed_after = SystemTime::now().duration_since(signal).unwrap_or_default();
    assert!(
        closed_after >= grace,
        "closed {closed_after:?} after the drain signal, within the grace of {grace:?}"
    );
    drop(client);
    baton.wait_drained(1).unwrap();
}

/// The pid of generation `generation`, once baton started it.
fn started_pid(baton: &Baton, generation: u64) -> i32 {
    let started = baton
        .wait_notice_ever(
            &format!("generation {generation} started"),
            WAIT,
            |n| matches!(n, Notice::Started { generation: g, .. } if *g == generation),
        )
        .unwrap();
    let Notice::Started { pid, .. } = started else {
        unreachable!("matched a Started notice")
    };
    pid
}

/// The number of epoll instances of `pid`, and the fds they watch: the
/// `tfd:` lines of the fdinfo of each `anon_inode:[eventpoll]` fd
/// (proc_pid_fdinfo(5)).
fn epoll_watched(pid: i32) -> (usize, BTreeSet<i32>) {
    let dir = format!("/proc/{pid}/fd");
    let mut instances = 0;
    let mut watched = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir}: {e}")) {
        let Ok(entry) = entry else { continue };
        let is_epoll = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.as_os_str() == "anon_inode:[eventpoll]");
        let fd = entry.file_name();
        let info = format!("/proc/{pid}/fdinfo/{}", fd.to_string_lossy());
        // An fd closed since the listing was read is no instance.
        let Some(info) = is_epoll
            .then(|| std::fs::read_to_string(info).ok())
            .flatten()
        else {
            continue;
        };
        instances += 1;
        watched.extend(info.lines().filter_map(|line| {
            line.strip_prefix("tfd:")?
                .split_whitespace()
                .next()?
                .parse::<i32>()
                .ok()
        }));
    }
    (instances, watched)
}

fn connect(port: u16) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream
}

/// Reads one whole response (head and `Content-Length` body), and nothing
/// after it.
fn read_response(stream: &mut TcpStream) -> String {
    let mut bytes = Vec::new();
    let mut chunk = [0; 4096];
    loop {
        let text = String::from_utf8_lossy(&bytes).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|line| line.strip_prefix("Content-Length: "))
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or_else(|| panic!("no Content-Length in {text:?}"));
            if bytes.len() >= end + 4 + length {
                assert_eq!(bytes.len(), end + 4 + length, "more than one response");
                return text;
            }
        }
        let n = stream
            .read(&mut chunk)
            .unwrap_or_else(|e| panic!("no whole response within {WAIT:?} ({e}): {text:?}"));
        assert!(n > 0, "EOF before a whole response: {text:?}");
        bytes.extend_from_slice(&chunk[..n]);
    }
}

/// One read within the stream's timeout: how many bytes (0: EOF). A reset
/// or a timeout fails the test.
fn read_or_eof(stream: &mut TcpStream) -> usize {
    let mut chunk = [0; 4096];
    stream
        .read(&mut chunk)
        .unwrap_or_else(|e| panic!("neither data nor EOF within {WAIT:?}: {e}"))
}
