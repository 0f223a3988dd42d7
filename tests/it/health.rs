//! Deploys baton can trust (issue 9): probation, health checks that cancel
//! a bad deploy, a wedged generation replaced; readiness that needs no code
//! in the app ("accepting", "exec", READY=1 from a wrapper). Each under
//! load with 0 failed requests where the issue asks for it.

use std::path::Path;
use std::time::{Duration, Instant};

use baton_testkit::{Baton, Load, Mix, Notice, Setup, Spec};

use crate::{get_generation, setup, start};

const WAIT: Duration = Duration::from_secs(20);

/// The load: 32 clients, a third keep-alive, 5 s per request.
fn load(port: u16) -> Load {
    let spec = Spec {
        mix: Mix {
            fresh: 22,
            keep_alive: 10,
        },
        request_timeout: Duration::from_secs(5),
        limit: Duration::from_secs(120),
        ..Spec::default()
    };
    Load::start(([127, 0, 0, 1], port).into(), Instant::now(), spec)
}

/// Generation 1 serving under `setup`, then a deploy of `next` under load:
/// `reload --wait`'s exit code and stderr, and the load's tally checked
/// for 0 failed requests.
fn deploy_under_load(baton: &Baton, next: &Setup) -> (i32, String) {
    let load = load(baton.port());
    baton.rewrite(next).unwrap();
    let (code, stdout, stderr) = baton.reload_wait();
    let tally = load.stop();
    eprintln!("{tally}");
    assert_eq!(tally.failed(), 0, "failed requests: {tally}");
    (code, format!("{stdout}{stderr}"))
}

/// Issue 9, done-when 1: a release that sends READY=1 and exits 1 s later
/// was promoted, the old generation drained, and the broken one restarted
/// forever. On probation the deploy fails with the reason and the old
/// generation goes on serving; nothing restarts.
#[test]
fn release_that_dies_after_ready_is_cancelled_in_probation() {
    let base = Setup {
        health: "probation = \"5s\"".into(),
        ..setup()
    };
    let mut baton = start(&base);
    let lying = base
        .clone()
        .env("HELLO_FAIL", "exit-after-ready")
        .env("HELLO_EXIT_AFTER_MS", "1000");
    let (code, out) = deploy_under_load(&baton, &lying);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("generation 2 failed: exited with code 3 during probation"),
        "{out}"
    );
    assert_eq!(baton.generations(), [(1, "ready".to_owned())]);
    assert_eq!(get_generation(baton.port()), 1);
    // No restart loop: the next thing baton starts is the next deploy's.
    baton.rewrite(&base).unwrap();
    let (code, _, stderr) = baton.reload_wait();
    assert_eq!(code, 0, "{stderr}");
    let starts: Vec<u64> = baton
        .notices()
        .iter()
        .filter_map(|n| match n {
            Notice::Starting { generation, .. } => Some(*generation),
            _ => None,
        })
        .collect();
    assert_eq!(starts, [1, 2, 3]);
    baton.wait_drained(1).unwrap();
}

/// Issue 9, done-when 2: a release whose health endpoint says 500 is
/// cancelled during probation, with the reason.
#[test]
fn unhealthy_release_is_cancelled_in_probation() {
    let mut baton = start(&setup());
    let health = format!(
        "check = \"http\"\nurl = \"http://127.0.0.1:{}/healthz\"\ninterval = \"100ms\"\n\
         failures = 3\nprobation = \"10s\"",
        baton.port()
    );
    let unhealthy = Setup {
        health,
        ..setup().env("HELLO_HEALTH", "fail")
    };
    let (code, out) = deploy_under_load(&baton, &unhealthy);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(
            "generation 2 failed: health check failed 3 times during probation: \
             GET /healthz: HTTP 500"
        ),
        "{out}"
    );
    assert_eq!(baton.generations()[0], (1, "ready".to_owned()));
    baton.wait_drained(2).unwrap();
    assert_eq!(get_generation(baton.port()), 1);
}

/// Issue 9, done-when 5: a current generation that stops answering its
/// health check (wedged, not crashed) is replaced through the usual
/// handoff, with no failed request, and `status` counts it.
#[test]
fn wedged_generation_is_replaced_without_a_failed_request() {
    let gate = tempfile::tempdir().unwrap();
    let plain = setup().env("HELLO_WEDGE_GATE", &gate.path().display().to_string());
    let mut baton = start(&plain);
    // The health check names the port the kernel chose for generation 1.
    let wedging = Setup {
        health: format!(
            "check = \"http\"\nurl = \"http://127.0.0.1:{}/healthz\"\n\
             interval = \"100ms\"\ntimeout = \"200ms\"\nfailures = 3",
            baton.port()
        ),
        ..plain
    };
    baton.rewrite(&wedging).unwrap();
    let (code, _, stderr) = baton.reload_wait();
    assert_eq!(code, 0, "{stderr}");
    baton.wait_drained(1).unwrap();
    // Wedged means it passed before: wait until it has.
    let passed = || {
        baton.status_doc().is_ok_and(|d| {
            d.generations
                .iter()
                .any(|g| g.generation == 2 && g.health_passed == Some(true))
        })
    };
    assert!(baton_testkit::eventually(WAIT, passed));
    let load = load(baton.port());
    std::fs::write(gate.path().join("2-wedged"), "").unwrap();
    let replacing = baton
        .wait_notice("generation 2 replaced", WAIT, |n| {
            matches!(n, Notice::Replacing { generation: 2, .. })
        })
        .unwrap();
    let Notice::Replacing {
        failures, detail, ..
    } = replacing
    else {
        unreachable!()
    };
    assert_eq!(failures, 3);
    assert!(detail.contains("no answer within"), "{detail}");
    baton.wait_ready(3, WAIT).unwrap();
    baton.wait_drained(2).unwrap();
    let tally = load.stop();
    eprintln!("{tally}");
    assert_eq!(tally.failed(), 0, "failed requests: {tally}");
    assert_eq!(baton.status_doc().unwrap().replaced, 1);
    assert_eq!(get_generation(baton.port()), 3);
}

/// The Python test server for the "accepting" readiness check.
fn python_server(mode: &str, sleep_ms: u64) -> Setup {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/servers/accepting.py");
    Setup {
        command: vec![
            "python3".into(),
            script.display().to_string(),
            mode.into(),
            sleep_ms.to_string(),
        ],
        readiness: "check = \"accepting\"\ntimeout = \"10s\"".into(),
        ..setup()
    }
}

/// Issue 9, done-when 3: `check = "accepting"` sees servers that wait by
/// epoll, by a blocking accept, by poll and by select, with no READY=1.
#[test]
fn accepting_sees_epoll_accept_poll_and_select_servers() {
    for mode in ["epoll", "accept", "poll", "select"] {
        let baton = Baton::start(&python_server(mode, 0)).unwrap_or_else(|e| panic!("{mode}: {e}"));
        assert_eq!(get_generation(baton.port()), 1, "{mode}");
    }
}

/// Issue 9, done-when 3: an app that sleeps 1 s before it polls its
/// listener is ready only then; one that never polls is not ready, and
/// stopped; 20 deploys under load fail no request.
#[test]
fn accepting_waits_until_the_app_waits_for_connections() {
    let mut baton = Baton::start(&python_server("epoll", 1000)).unwrap();
    let ready = baton
        .wait_notice_ever("generation 1 ready", WAIT, |n| {
            matches!(n, Notice::Ready { generation: 1, .. })
        })
        .unwrap();
    let Notice::Ready { after, .. } = ready else {
        unreachable!()
    };
    assert!(
        after >= Duration::from_millis(1000),
        "ready after {after:?}"
    );
    // The example app joins its event loop only after its boot: it is
    // ready under "accepting" without READY=1 counting.
    let hello = Setup {
        readiness: "check = \"accepting\"\ntimeout = \"10s\"".into(),
        ..setup().env("HELLO_BOOT_DELAY_MS", "100")
    };
    baton.rewrite(&hello).unwrap();
    // The Python server's drain is crude (it may drop a request it has
    // just accepted): it goes before the load starts.
    let (code, _, stderr) = baton.reload_wait();
    assert_eq!(code, 0, "{stderr}");
    baton.wait_drained(1).unwrap();
    let load = load(baton.port());
    for round in 0..20 {
        let (code, stdout, stderr) = baton.reload_wait();
        assert_eq!(code, 0, "deploy {round}: {stdout}{stderr}");
    }
    let tally = load.stop();
    eprintln!("{tally}");
    assert_eq!(tally.failed(), 0, "failed requests: {tally}");
    let never = Setup {
        readiness: "check = \"accepting\"\ntimeout = \"1s\"".into(),
        ..setup().env("HELLO_FAIL", "never-ready")
    };
    baton.rewrite(&never).unwrap();
    let (code, _, stderr) = baton.reload_wait();
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("not ready within 1.00 s"), "{stderr}");
    baton.wait_drained(23).unwrap();
}

/// Issue 9, done-when 4: `check = "exec"` runs the command until it exits
/// 0, with BATON_PID set to the candidate's pid; a command that never
/// passes leaves the candidate not ready, stopped.
#[test]
fn exec_readiness_ready_and_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        "echo run >> {d}/runs-$BATON_GENERATION; test -e {d}/ready-$BATON_GENERATION && \
         echo $BATON_PID > {d}/pid-$BATON_GENERATION",
        d = dir.path().display()
    );
    let exec = |script: &str, timeout: &str| Setup {
        readiness: format!(
            "check = \"exec\"\ncommand = [\"sh\", \"-c\", {script:?}]\ninterval = \"50ms\"\n\
             timeout = \"{timeout}\""
        ),
        ..setup()
    };
    std::fs::write(dir.path().join("ready-1"), "").unwrap();
    let mut baton = start(&exec(&script, "20s"));
    let pid = std::fs::read_to_string(dir.path().join("pid-1")).unwrap();
    assert_eq!(pid.trim(), baton.current_pid().to_string());
    // Generation 2 becomes ready when its file appears, not before: its
    // check has failed twice (each run leaves a line), and it still starts.
    let mut waiting = baton.cli_start(&["reload", "--wait"]);
    waiting.wait_line("generation 2", WAIT).unwrap();
    let runs = dir.path().join("runs-2");
    let failed_twice = || std::fs::read_to_string(&runs).is_ok_and(|r| r.lines().count() >= 2);
    assert!(baton_testkit::eventually(WAIT, failed_twice));
    let states = baton.generations();
    assert_eq!(states[0], (1, "ready".to_owned()));
    assert_eq!(states[1], (2, "starting".to_owned()));
    std::fs::write(dir.path().join("ready-2"), "").unwrap();
    let (code, stdout, stderr) = waiting.finish(WAIT).unwrap();
    assert_eq!(code, 0, "{stdout}{stderr}");
    baton.wait_drained(1).unwrap();
    baton.rewrite(&exec("exit 1", "2s")).unwrap();
    let (code, _, stderr) = baton.reload_wait();
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("not ready within 2.00 s"), "{stderr}");
    assert_eq!(get_generation(baton.port()), 2);
}

/// Issue 9: READY=1 from another process of the candidate's process group
/// (a start script's helper) counts; before, only the main process's did.
#[test]
fn ready_from_a_wrapper_process_counts() {
    let send = "import os, socket, time; s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); \
                s.sendto(b'READY=1', os.environ['NOTIFY_SOCKET']); time.sleep(2)";
    let wrapper = Setup {
        listeners: Vec::new(),
        command: vec![
            "sh".into(),
            "-c".into(),
            format!("python3 -c \"{send}\" & exec sleep 600"),
        ],
        ..setup()
    };
    let baton = start(&wrapper);
    assert_eq!(baton.generations(), [(1, "ready".to_owned())]);
}
