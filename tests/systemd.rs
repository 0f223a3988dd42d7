//! baton under systemd: socket activation, and the sd_notify messages it
//! sends to its own service manager (issue 2).

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use common::{get_generation, Baton, Setup, BATON};

/// Receives the next datagram as text.
fn next(upstream: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = upstream
        .recv(&mut buf)
        .expect("a notify message within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn upstream_gets_ready_reloading_ready_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("systemd.notify");
    let upstream = UnixDatagram::bind(&path).unwrap();
    upstream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let notify = path.display().to_string();
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
    assert_eq!(next(&upstream), "READY=1\nSTATUS=generation 2 serving");

    // A failed deploy still ends the reload, with READY=1 and why.
    baton.rewrite(&Setup::default().env("HELLO_FAIL", "crash"));
    let (code, _, _) = baton.reload_wait();
    assert_eq!(code, 1);
    assert!(next(&upstream).starts_with("RELOADING=1\n"));
    assert_eq!(
        next(&upstream),
        "READY=1\nSTATUS=generation 3 failed: exited with code 3 before it was ready; \
         generation 2 still serving"
    );

    baton.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(next(&upstream), "STOPPING=1\nSTATUS=stopping");
    assert_eq!(baton.wait_exit(Duration::from_secs(20)), Some(0));
}

#[test]
fn adopts_a_socket_from_systemd_socket_activate() {
    let activate = "/usr/bin/systemd-socket-activate";
    assert!(
        std::path::Path::new(activate).exists(),
        "{activate} is missing: install Debian's `systemd` package (.ci/run does)"
    );
    // systemd-socket-activate binds the address itself; take a free port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let address = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("app.toml");
    let control = dir.path().join("baton.sock");
    std::fs::write(
        &config,
        format!(
            "[[listen]]\nname = \"http\"\naddress = \"{address}\"\n\
             [app]\ncommand = [{:?}]\n[control]\nsocket = \"{}\"\n",
            common::hello().display().to_string(),
            control.display()
        ),
    )
    .unwrap();
    let listen = format!("--listen={address}");
    let mut baton = Baton::spawn_with(
        dir,
        config,
        &address,
        activate,
        &[
            &listen,
            "--fdname=http",
            "-E",
            "BATON_LOG=info",
            BATON,
            "run",
            "-c",
        ],
        &[],
    );
    baton.port = port;
    baton.wait_log("Listening on", Duration::from_secs(10));
    // systemd-socket-activate starts baton on the first connection; that
    // connection waits in the queue and is served by generation 1.
    assert_eq!(get_generation(port), 1);
    let line = baton.wait_log(
        "adopted socket `http` from systemd",
        Duration::from_secs(10),
    );
    assert!(line.contains("fd 3"), "{line}");
    assert!(
        !baton.log_contains("listening on"),
        "baton must not bind itself"
    );
    let (code, stdout, stderr) = baton.reload_wait();
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(get_generation(port), 2);
}
