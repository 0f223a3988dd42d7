//! baton under systemd: socket activation, the fd store, and the sd_notify
//! messages it sends to its own service manager (issue 2). Nothing here
//! needs systemd: the kit passes sockets as systemd does and plays its
//! notify socket. One extra test runs baton under the real
//! `systemd-socket-activate` when it is installed (CI installs it).

use std::os::fd::AsFd;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use baton_testkit::activate::recv_with_fds;
use baton_testkit::{
    eventually, load, skip, Baton, Launch, Listen, Load, Mix, Notice, Setup, Spec,
};

use crate::{setup, unix_get_generation};

/// Receives the next datagram as text.
fn next(upstream: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = upstream
        .recv(&mut buf)
        .expect("a notify message within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// A fake systemd: the notify socket baton reports to.
fn fake_systemd(dir: &Path) -> (UnixDatagram, String) {
    let path = dir.join("systemd.notify");
    let upstream = UnixDatagram::bind(&path).unwrap();
    upstream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    (upstream, path.display().to_string())
}

#[test]
fn upstream_gets_the_exact_sd_notify_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let (upstream, notify) = fake_systemd(dir.path());
    let mut baton =
        Baton::launch(&setup(), Launch::default().env("NOTIFY_SOCKET", &notify)).unwrap();
    let pid = baton.pid();

    assert_eq!(
        next(&upstream),
        format!("READY=1\nMAINPID={pid}\nSTATUS=generation 1 serving")
    );

    let (code, _, stderr) = baton.reload_wait();
    assert_eq!(code, 0, "{stderr}");
    let reloading = next(&upstream);
    let usec: u64 = reloading
        .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
        .unwrap_or_else(|| panic!("{reloading:?}"))
        .parse()
        .unwrap();
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    let now_usec = now.tv_sec() as u64 * 1_000_000 + now.tv_nsec() as u64 / 1000;
    assert!(
        usec <= now_usec && now_usec - usec < 20_000_000,
        "{usec} vs {now_usec}"
    );
    // Readiness timeout (20 s) plus slack: a slow boot is not cut short.
    assert_eq!(next(&upstream), "EXTEND_TIMEOUT_USEC=25000000");
    assert_eq!(next(&upstream), "READY=1\nSTATUS=generation 2 serving");

    // A failed deploy still ends the reload, with READY=1 and why.
    baton.rewrite(&setup().env("HELLO_FAIL", "crash")).unwrap();
    let (code, _, _) = baton.reload_wait();
    assert_eq!(code, 1);
    assert!(next(&upstream).starts_with("RELOADING=1\n"));
    assert_eq!(next(&upstream), "EXTEND_TIMEOUT_USEC=25000000");
    assert_eq!(
        next(&upstream),
        "READY=1\nSTATUS=generation 3 failed: exited with code 3 before it was ready; \
         generation 2 still serving"
    );

    // So does a refused one (Type=notify-reload waits for both messages).
    let text = std::fs::read_to_string(baton.config()).unwrap();
    let broken: Vec<&str> = text
        .lines()
        .map(|l| {
            if l.starts_with("command = ") {
                "command = []"
            } else {
                l
            }
        })
        .collect();
    std::fs::write(baton.config(), broken.join("\n")).unwrap();
    let (code, _, _) = baton.reload_wait();
    assert_eq!(code, 1);
    assert!(next(&upstream).starts_with("RELOADING=1\n"));
    let refused = next(&upstream);
    assert!(
        refused.starts_with("READY=1\nSTATUS=reload refused, nothing changed: "),
        "{refused}"
    );
    assert!(
        refused.contains("app.toml:6:11: command must name a program"),
        "{refused}"
    );

    baton.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(next(&upstream), "STOPPING=1\nSTATUS=stopping");
    // The drain may take its whole timeout (20 s): systemd is told.
    let extend = next(&upstream);
    let usec: u64 = extend
        .strip_prefix("EXTEND_TIMEOUT_USEC=")
        .unwrap()
        .parse()
        .unwrap();
    assert!((20_000_000..=25_000_000).contains(&usec), "{extend}");
    assert_eq!(baton.wait_exit(Duration::from_secs(20)).unwrap(), Some(0));
}

#[test]
fn watchdog_is_pinged_at_half_the_interval() {
    let dir = tempfile::tempdir().unwrap();
    let (upstream, notify) = fake_systemd(dir.path());
    let launch = Launch::default()
        .env("NOTIFY_SOCKET", &notify)
        .env("WATCHDOG_USEC", "200000");
    let mut baton = Baton::launch(&setup(), launch).unwrap();
    let start = std::time::Instant::now();
    let mut pings = 0;
    // Bounded: 400 datagrams or the 20 s read timeout, whichever first.
    for _ in 0..400 {
        if next(&upstream) == "WATCHDOG=1" {
            pings += 1;
            if pings == 5 {
                break;
            }
        }
    }
    assert_eq!(pings, 5);
    // Five pings at a 100 ms period take at least 400 ms (the first is at
    // once); a much shorter time would mean a busy loop.
    assert!(
        start.elapsed() >= Duration::from_millis(400),
        "{:?}",
        start.elapsed()
    );
    baton.kill_all();
}

/// Surviving baton's own crash: baton hands its listener to systemd's fd
/// store; after baton and its children are SIGKILLed, a new baton started
/// with the stored fd (as systemd passes it: LISTEN_FDS, by name) serves
/// the same accept queue. Clients are never refused; only requests in
/// flight at the kill may fail.
#[test]
fn fd_store_keeps_the_socket_across_a_crash_of_baton() {
    let dir = tempfile::tempdir().unwrap();
    let (upstream, notify) = fake_systemd(dir.path());
    let launch = Launch::default()
        .arg("--fd-store")
        .env("NOTIFY_SOCKET", &notify);
    let mut first = Baton::launch(&setup(), launch).unwrap();
    // What systemd keeps: the fd named "http".
    let stored = recv_with_fds(&upstream).unwrap();
    assert_eq!(stored.text, "FDSTORE=1\nFDNAME=http");
    assert_eq!(stored.fds.len(), 1);
    first.wait_ready(1, Duration::from_secs(20)).unwrap();
    let address = first.addresses().unwrap()[0];

    let spec = Spec {
        mix: Mix {
            fresh: 8,
            keep_alive: 1,
        },
        limit: Duration::from_secs(60),
        ..Spec::default()
    };
    let load = Load::start(address, Instant::now(), spec);
    let answered = || load::probe(address, Duration::from_secs(10)).is_ok();
    assert!(eventually(Duration::from_secs(10), answered));
    first.kill_all();
    // baton is gone, the kernel queue is not: systemd holds the socket.
    let launch = Launch::default().socket("http", stored.fds[0].as_fd());
    let second = Baton::start_with(&setup(), launch).unwrap();
    assert_eq!(second.port(), address.port(), "the same socket");
    assert!(answered(), "the new baton serves");
    let tally = load.stop();
    eprintln!("{tally}");
    assert_eq!(tally.all().refused, 0, "no client was refused: {tally}");
    assert!(
        tally.failed() <= 9,
        "only requests in flight at the kill may fail: {tally}"
    );
}

/// Two unix sockets, named, listed in the config in the other order than
/// they are passed: the app must get them in config order with matching
/// LISTEN_FDNAMES. Unix sockets, so no port has to be guessed free.
fn named_sockets(dir: &Path) -> (Setup, PathBuf, PathBuf) {
    let (http, admin) = (dir.join("http.sock"), dir.join("admin.sock"));
    let setup = Setup {
        listeners: vec![Listen::unix("admin", &admin), Listen::unix("http", &http)],
        ..setup()
    }
    .env("HELLO_EXPECT_FDNAMES", "admin:http");
    (setup, http, admin)
}

/// Named sockets passed as systemd passes them (by the kit, which binds
/// them and starts baton with them: what `systemd-socket-activate` does)
/// are adopted by name, not position.
#[test]
fn adopts_named_sockets_passed_like_systemd() {
    let dir = tempfile::tempdir().unwrap();
    let (setup, http, admin) = named_sockets(dir.path());
    let http_socket = UnixListener::bind(&http).unwrap();
    let admin_socket = UnixListener::bind(&admin).unwrap();
    let launch = Launch::default()
        .socket("http", http_socket.as_fd())
        .socket("admin", admin_socket.as_fd());
    let mut baton = Baton::launch(&setup, launch).unwrap();
    drop((http_socket, admin_socket));
    adopted_and_deployed(&mut baton, &http, &admin);
}

/// The same under the real `systemd-socket-activate`, which binds the
/// sockets and starts baton on the first connection. Skipped, visibly,
/// where it is not installed (Debian's `systemd` package; CI installs it).
#[test]
fn adopts_named_sockets_from_systemd_socket_activate() {
    let Some(activate) = on_path("systemd-socket-activate") else {
        skip(
            "systemd::adopts_named_sockets_from_systemd_socket_activate",
            "systemd-socket-activate is not on PATH (Debian's `systemd` package); \
             adopts_named_sockets_passed_like_systemd covers the same without it",
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (setup, http, admin) = named_sockets(dir.path());
    let listen_http = format!("--listen={}", http.display());
    let listen_admin = format!("--listen={}", admin.display());
    let wrapper = [
        activate.to_str().unwrap(),
        &listen_http,
        &listen_admin,
        "--fdname=http:admin",
        "-E",
        "BATON_LOG=info",
    ];
    let mut baton = Baton::launch(&setup, Launch::default().wrapper(&wrapper)).unwrap();
    baton
        .wait_log("Listening on", Duration::from_secs(10))
        .unwrap();
    baton
        .wait_log("Listening on", Duration::from_secs(10))
        .unwrap();
    adopted_and_deployed(&mut baton, &http, &admin);
}

/// The first connection waits in the queue and is served by generation 1;
/// baton adopted both sockets by name (and bound nothing itself); a deploy
/// hands both to generation 2.
fn adopted_and_deployed(baton: &mut Baton, http: &Path, admin: &Path) {
    assert_eq!(unix_get_generation(http), 1);
    // Logged before generation 1 started, which has answered.
    let listening: Vec<(String, Option<i32>)> = baton
        .notices()
        .into_iter()
        .filter_map(|n| match n {
            Notice::Listening {
                name, adopted_fd, ..
            } => Some((name, adopted_fd)),
            _ => None,
        })
        .collect();
    // In config order (admin, http), each adopted by name from the fd it
    // was passed on (http on 3, admin on 4); none bound by baton itself.
    assert_eq!(
        listening,
        [("admin".to_owned(), Some(4)), ("http".to_owned(), Some(3))]
    );
    assert_eq!(unix_get_generation(admin), 1);
    let (code, stdout, stderr) = baton.reload_wait();
    assert_eq!(code, 0, "{stdout}{stderr}");
    baton.wait_drained(1).unwrap();
    assert_eq!(unix_get_generation(http), 2);
    assert_eq!(unix_get_generation(admin), 2);
}

/// Where `program` is on PATH, if it is.
fn on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}
