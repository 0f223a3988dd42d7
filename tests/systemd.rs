//! baton under systemd: socket activation, and the sd_notify messages it
//! sends to its own service manager (issue 2).

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use std::os::fd::AsFd;

use common::{unix_get_generation, Baton, Load, Setup, BATON};

/// Receives the next datagram as text.
fn next(upstream: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = upstream
        .recv(&mut buf)
        .expect("a notify message within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// A fake systemd: the notify socket baton reports to.
fn fake_systemd(dir: &std::path::Path) -> (UnixDatagram, String) {
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
    let mut baton = Baton::spawn(
        Setup::default(),
        "127.0.0.1:0",
        &[("NOTIFY_SOCKET", &notify)],
    );
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
    baton.rewrite(&Setup::default().env("HELLO_FAIL", "crash"));
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
    let text = std::fs::read_to_string(&baton.config).unwrap();
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
    std::fs::write(&baton.config, broken.join("\n")).unwrap();
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
    assert_eq!(baton.wait_exit(Duration::from_secs(20)), Some(0));
}

#[test]
fn watchdog_is_pinged_at_half_the_interval() {
    let dir = tempfile::tempdir().unwrap();
    let (upstream, notify) = fake_systemd(dir.path());
    let mut baton = Baton::spawn(
        Setup::default(),
        "127.0.0.1:0",
        &[("NOTIFY_SOCKET", &notify), ("WATCHDOG_USEC", "200000")],
    );
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
/// with the stored fd serves the same accept queue. Clients are never
/// refused; only requests in flight at the kill may fail.
#[test]
fn fd_store_keeps_the_socket_across_a_crash_of_baton() {
    let dir = tempfile::tempdir().unwrap();
    let (upstream, notify) = fake_systemd(dir.path());
    let setup_dir = tempfile::tempdir().unwrap();
    let config = setup_dir.path().join("app.toml");
    let control = setup_dir.path().join("baton.sock");
    std::fs::write(
        &config,
        format!(
            "[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:0\"\n\
             [app]\ncommand = [{:?}]\n[control]\nsocket = \"{}\"\n",
            common::hello().display().to_string(),
            control.display()
        ),
    )
    .unwrap();
    let mut first = Baton::spawn_with(
        setup_dir,
        config.clone(),
        "127.0.0.1:0",
        BATON,
        &["run", "--fd-store", "-c"],
        &[("NOTIFY_SOCKET", &notify)],
    );
    // What systemd keeps: the fd named "http".
    let mut buf = [0u8; 4096];
    let stored = baton::notify::recv_with_fds(upstream.as_fd(), &mut buf).unwrap();
    assert_eq!(&buf[..stored.len], b"FDSTORE=1\nFDNAME=http");
    assert_eq!(stored.fds.len(), 1);
    first.wait_log("generation 1 is ready", Duration::from_secs(20));
    let port = first.status()["listeners"][0]["address"]
        .as_str()
        .unwrap()
        .parse::<std::net::SocketAddr>()
        .unwrap()
        .port();

    let load = Load::start(port, 8, Duration::from_secs(60));
    assert!(common::eventually(Duration::from_secs(10), || {
        common::fresh_request(port).is_ok()
    }));
    first.kill_all();
    // baton is gone, the kernel queue is not: systemd holds the socket.
    let env: Vec<(std::ffi::OsString, std::ffi::OsString)> = std::env::vars_os()
        .filter(|(k, _)| k != "NOTIFY_SOCKET")
        .chain([
            ("LISTEN_FDS".into(), "1".into()),
            ("LISTEN_FDNAMES".into(), "http".into()),
            ("BATON_LOG".into(), "warn".into()),
        ])
        .collect();
    let argv: Vec<String> = vec![
        BATON.into(),
        "run".into(),
        "-c".into(),
        config.display().to_string(),
    ];
    let fds = [stored.fds[0].as_fd()];
    let second = Reaped(
        baton::spawn::spawn(&baton::spawn::Command {
            argv: &argv,
            env,
            workdir: None,
            listeners: &fds,
            user: None,
            umask: None,
            limits: Vec::new(),
        })
        .unwrap(),
    );
    let status = || {
        std::process::Command::new(BATON)
            .args(["status", "--json", "-c"])
            .arg(&config)
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("\"state\": \"ready\""))
    };
    assert!(common::eventually(Duration::from_secs(20), status));
    assert!(common::fresh_request(port).is_ok(), "the new baton serves");
    let tally = load.stop();
    eprintln!("{tally:?}");
    assert_eq!(
        tally.refused, 0,
        "no client was refused: {:?}",
        tally.errors
    );
    assert!(
        tally.failed() <= 9,
        "only requests in flight at the kill may fail: {tally:?}"
    );
    drop(second);
}

/// A baton started with `baton::spawn` (not std): stopped and reaped on drop.
struct Reaped(nix::unistd::Pid);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGQUIT);
        let _ = nix::sys::wait::waitpid(self.0, None);
    }
}

/// Named sockets from systemd (here `systemd-socket-activate`, which binds
/// them and starts baton on the first connection) are adopted by name, not
/// position: the config lists them in the other order, and the app gets
/// them in config order with matching LISTEN_FDNAMES. Unix sockets, so no
/// port has to be guessed free.
#[test]
fn adopts_named_sockets_from_systemd_socket_activate() {
    let activate = "/usr/bin/systemd-socket-activate";
    assert!(
        std::path::Path::new(activate).exists(),
        "{activate} is missing: install Debian's `systemd` package (.ci/run does)"
    );
    let dir = tempfile::tempdir().unwrap();
    let http = dir.path().join("http.sock");
    let admin = dir.path().join("admin.sock");
    let config = dir.path().join("app.toml");
    std::fs::write(
        &config,
        format!(
            "[[listen]]\nname = \"admin\"\naddress = \"unix:{}\"\n\
             [[listen]]\nname = \"http\"\naddress = \"unix:{}\"\n\
             [app]\ncommand = [{:?}]\nenv = {{ HELLO_EXPECT_FDNAMES = \"admin:http\" }}\n\
             [control]\nsocket = \"{}\"\n",
            admin.display(),
            http.display(),
            common::hello().display().to_string(),
            dir.path().join("baton.sock").display()
        ),
    )
    .unwrap();
    let listen_http = format!("--listen={}", http.display());
    let listen_admin = format!("--listen={}", admin.display());
    let mut baton = Baton::spawn_with(
        dir,
        config,
        "",
        activate,
        &[
            &listen_http,
            &listen_admin,
            "--fdname=http:admin",
            "-E",
            "BATON_LOG=info",
            BATON,
            "run",
            "-c",
        ],
        &[],
    );
    baton.wait_log("Listening on", Duration::from_secs(10));
    baton.wait_log("Listening on", Duration::from_secs(10));
    // The first connection starts baton; it waits in the queue and is
    // served by generation 1.
    assert_eq!(unix_get_generation(&http), 1);
    let line = baton.wait_log(
        "adopted socket `admin` from systemd",
        Duration::from_secs(10),
    );
    assert!(line.contains("fd 4"), "{line}");
    let line = baton.wait_log(
        "adopted socket `http` from systemd",
        Duration::from_secs(10),
    );
    assert!(line.contains("fd 3"), "{line}");
    assert!(
        !baton.log_contains("listening on"),
        "baton must not bind itself"
    );
    assert_eq!(unix_get_generation(&admin), 1);
    let (code, stdout, stderr) = baton.reload_wait();
    assert_eq!(code, 0, "{stdout}{stderr}");
    baton.wait_drained(1);
    assert_eq!(unix_get_generation(&http), 2);
    assert_eq!(unix_get_generation(&admin), 2);
}
