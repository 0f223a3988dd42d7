//! Deploys under load against the real binary: zero failed requests, with
//! good and with broken releases (issue 2).

use std::time::{Duration, Instant};

use baton_testkit::procs::socket_count;
use baton_testkit::{alive, eventually, ExitStatus, Load, Notice, Setup, Spec};

use crate::{get_generation, setup, start};

/// The kit's default load: 16 fresh-connection clients and 8 keep-alive
/// clients, closed loop, bounded at two minutes. Every failure counts,
/// keep-alive ones included (issue 13): hello drains keep-alive
/// connections without closing one under a request.
fn load(port: u16) -> Load {
    Load::start(
        ([127, 0, 0, 1], port).into(),
        Instant::now(),
        Spec::default(),
    )
}

#[test]
fn twenty_deploys_under_load_fail_no_request() {
    let baton = start(&setup());
    let load = load(baton.port());
    // requested[g]: when the deploy that created generation g was asked for.
    let mut requested = std::collections::BTreeMap::new();
    for round in 0..20u64 {
        requested.insert(round + 2, Instant::now());
        let (code, stdout, stderr) = baton.reload_wait();
        assert_eq!(code, 0, "deploy {round}: {stdout}{stderr}");
        let done = format!("done: generation {} is serving", round + 2);
        assert!(stdout.contains(&done), "{stdout}");
    }
    let tally = load.stop();
    eprintln!("{tally}");
    assert_eq!(tally.failed(), 0, "failed requests: {tally}");
    assert!(
        tally.ok() > 100,
        "too little load to mean anything: {tally}"
    );
    // Every answer came from a generation baton started for a deploy, after
    // that deploy was asked for (the example app accepts only once it has
    // sent READY=1; that baton drains the old only after READY=1 is the
    // core's unit tests' business).
    for (generation, first) in &tally.first_answer {
        if *generation > 1 {
            let asked = requested
                .get(generation)
                .expect("a generation baton started");
            assert!(
                first >= asked,
                "generation {generation} answered before it was deployed"
            );
        }
    }
    assert!(
        tally.by_generation().len() > 2,
        "responses came from several generations: {tally}"
    );
    assert_eq!(baton.generations()[0], (21, "ready".to_owned()));
}

/// Each kind of broken release: the deploy fails with the reason, `reload
/// --wait` exits 1, the old generation keeps serving every request.
#[test]
fn broken_releases_never_fail_a_request() {
    let mut baton = start(&setup());
    let load = load(baton.port());
    let cases = [
        (
            setup().env("HELLO_FAIL", "crash"),
            "exited with code 3 before it was ready",
        ),
        (
            setup()
                .readiness_timeout(Duration::from_secs(1))
                .env("HELLO_FAIL", "never-ready"),
            "not ready within 1.00 s",
        ),
        (
            Setup {
                command: vec!["/nonexistent/server".into()],
                ..setup()
            },
            "exec failed: ENOENT",
        ),
        (
            Setup {
                command: vec!["no-such-server-on-path".into()],
                ..setup()
            },
            "not found on PATH",
        ),
    ];
    for (setup, reason) in cases {
        baton.rewrite(&setup).unwrap();
        let (code, stdout, stderr) = baton.reload_wait();
        assert_eq!(code, 1, "{stdout}{stderr}");
        assert!(stderr.contains(reason), "expected {reason:?} in {stderr}");
        let status = baton.status();
        let current = &status["generations"][0];
        assert_eq!(
            (current["generation"].as_u64(), current["state"].as_str()),
            (Some(1), Some("ready"))
        );
        assert_eq!(status["last_deploy"]["ok"], false);
        assert!(status["last_deploy"]["message"]
            .as_str()
            .unwrap()
            .contains(reason));
    }
    let tally = load.stop();
    eprintln!("{tally}");
    assert_eq!(tally.failed(), 0, "failed requests: {tally}");
    assert_eq!(
        tally.by_generation().into_keys().collect::<Vec<_>>(),
        [1],
        "only generation 1 ever answered: {tally}"
    );

    // And a good release after all that still deploys.
    baton.rewrite(&setup()).unwrap();
    let (code, stdout, stderr) = baton.reload_wait();
    assert_eq!(code, 0, "{stdout}{stderr}");
    baton.wait_drained(1).unwrap();
    assert_eq!(get_generation(baton.port()), 6);
}

/// A candidate stuck in its init after its readiness deadline is stopped
/// like a draining generation: drain signal, then SIGKILL.
#[test]
fn candidate_missing_its_deadline_is_stopped() {
    let mut baton = start(&setup());
    let stuck = setup()
        .readiness_timeout(Duration::from_millis(300))
        .drain_timeout(Duration::from_millis(300))
        .env("HELLO_FAIL", "never-ready");
    baton.rewrite(&stuck).unwrap();
    let (code, _, stderr) = baton.reload_wait();
    assert_eq!(code, 1, "{stderr}");
    // The stuck app exits on SIGTERM (no SIGKILL needed).
    baton
        .wait_notice("generation 2's exit", Duration::from_secs(10), |n| {
            matches!(
                n,
                Notice::Exited {
                    generation: 2,
                    status: ExitStatus::Code(0),
                    ..
                }
            )
        })
        .unwrap();
    assert_eq!(baton.generations(), [(1, "ready".to_owned())]);
}

/// A generation that ignores the drain signal is SIGKILLed at its drain
/// deadline. No wall-clock margin: that it was still running at the
/// deadline is baton's own observation, logged with its pid.
#[test]
fn child_ignoring_the_drain_signal_is_killed_at_the_deadline() {
    let short = setup().drain_timeout(Duration::from_millis(300));
    let mut baton = start(&short.clone().env("HELLO_FAIL", "ignore-term"));
    let old = baton.current_pid();
    baton.rewrite(&short).unwrap();
    let (code, stdout, stderr) = baton.reload_wait();
    assert_eq!(code, 0, "{stdout}{stderr}");
    let timed_out = baton
        .wait_notice("the drain timeout", Duration::from_secs(10), |n| {
            matches!(n, Notice::DrainTimedOut { .. })
        })
        .unwrap();
    assert!(
        matches!(timed_out, Notice::DrainTimedOut { generation: 1, pid: Some(p), .. } if p == old),
        "{timed_out:?}"
    );
    baton
        .wait_notice("generation 1's exit", Duration::from_secs(10), |n| {
            matches!(
                n,
                Notice::Exited {
                    generation: 1,
                    status: ExitStatus::Signal(nix::sys::signal::Signal::SIGKILL),
                    ..
                }
            )
        })
        .unwrap();
    assert!(!alive(old), "reaped once baton logged its death");
    assert_eq!(baton.generations(), [(2, "ready".to_owned())]);
}

/// In-flight requests on the old generation complete during its drain.
#[test]
fn in_flight_request_survives_the_deploy() {
    let baton = start(&setup());
    let port = baton.port();
    let old = baton.current_pid();
    let sockets_before = socket_count(old);
    let slow = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(b"GET /slow?ms=1500 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut response = String::new();
        s.read_to_string(&mut response).unwrap();
        response
    });
    // Deploy only once generation 1 has accepted the slow request.
    assert!(eventually(Duration::from_secs(5), || socket_count(old)
        > sockets_before));
    let (code, stdout, stderr) = baton.reload_wait();
    assert_eq!(code, 0, "{stdout}{stderr}");
    let response = slow.join().unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("generation=1"), "{response}");
    assert!(response.contains("Connection: close"), "{response}");
}
