//! Start, stop, restart, config errors and the child contract, against the
//! real binary (issue 2).

use std::process::Command;
use std::time::Duration;

use baton_testkit::harness::Launch;
use baton_testkit::procs::children;
use baton_testkit::{alive, eventually, Baton, ExitStatus, Failure, Listen, Notice, Setup};
use nix::sys::signal::Signal;

use crate::{get_generation, setup, start, unix_get_generation, BATON};

const EXIT: Duration = Duration::from_secs(20);

#[test]
fn sigterm_drains_every_generation_and_exits_zero() {
    let mut baton = start(&setup());
    let child = baton.current_pid();
    baton.signal(Signal::SIGTERM);
    assert_eq!(baton.wait_exit(EXIT).unwrap(), Some(0));
    // The app was drained, not killed.
    baton
        .wait_log("draining after SIGTERM", Duration::from_secs(10))
        .unwrap();
    assert!(!alive(child));
    assert!(!baton.control().exists(), "control socket removed");
}

#[test]
fn sigquit_kills_children_and_exits() {
    let mut baton = start(&setup().env("HELLO_FAIL", "ignore-term"));
    let child = baton.current_pid();
    baton.signal(Signal::SIGQUIT);
    assert_eq!(baton.wait_exit(EXIT).unwrap(), Some(0));
    assert!(!alive(child));
}

#[test]
fn stop_command_waits_until_baton_has_exited() {
    let mut baton = start(&setup());
    let child = baton.current_pid();
    let out = baton.cli(&["stop"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("stopped"));
    assert_eq!(baton.wait_exit(EXIT).unwrap(), Some(0));
    assert!(!alive(child));
}

#[test]
fn sighup_deploys_a_new_generation() {
    let mut baton = start(&setup());
    baton.signal(Signal::SIGHUP);
    baton.wait_drained(1).unwrap();
    assert_eq!(get_generation(baton.port()), 2);
}

#[test]
fn crashed_generation_is_restarted_and_clients_wait_in_the_backlog() {
    let mut baton = start(&setup());
    let child = baton.current_pid();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child), Signal::SIGKILL).unwrap();
    baton
        .wait_notice("the crash", Duration::from_secs(10), |n| {
            matches!(
                n,
                Notice::Crashed {
                    generation: 1,
                    status: ExitStatus::Signal(Signal::SIGKILL),
                    ..
                }
            )
        })
        .unwrap();
    // The listening socket never closed: this connection queues until the
    // restarted generation accepts it.
    assert_eq!(get_generation(baton.port()), 2);
    baton.wait_ready(2, Duration::from_secs(10)).unwrap();
}

/// Two reloads at once: the second arrives while the first one's candidate
/// boots, and is queued behind it as one follow-up deploy. The test holds
/// each generation at its boot gate (`HELLO_BOOT_GATE`) until it has seen
/// the second reload queued: no boot delay to outrun.
#[test]
fn concurrent_reloads_coalesce_into_one_follow_up() {
    let gates = tempfile::tempdir().unwrap();
    let open = |generation: u64| {
        std::fs::write(gates.path().join(generation.to_string()), "").unwrap();
    };
    let gated = setup().env("HELLO_BOOT_GATE", &gates.path().display().to_string());
    open(1);
    let mut baton = start(&gated);
    open(2);
    let (code, stdout, stderr) = baton.reload_wait();
    assert_eq!(code, 0, "{stdout}{stderr}");
    // Generation 2 is now serving. The first reload starts generation 3,
    // which waits at its gate; the second is queued behind it.
    let reload = ["reload", "--wait", "--timeout", "60s"];
    let mut a = baton.cli_start(&reload);
    a.wait_line("starting generation 3", Duration::from_secs(10))
        .unwrap();
    let mut b = baton.cli_start(&reload);
    b.wait_line("this reload follows it", Duration::from_secs(10))
        .unwrap();
    open(3);
    open(4);
    let (code, a_out, a_err) = a.finish(Duration::from_secs(60)).unwrap();
    assert_eq!(code, 0, "{a_out}{a_err}");
    assert!(a_out.contains("done: generation 3"), "{a_out}");
    let (code, b_out, b_err) = b.finish(Duration::from_secs(60)).unwrap();
    assert_eq!(code, 0, "{b_out}{b_err}");
    assert!(b_out.contains("done: generation 4"), "{b_out}");
    baton.wait_drained(3).unwrap();
    assert_eq!(get_generation(baton.port()), 4);
    assert_eq!(baton.started_generations().len(), 4, "one follow-up only");
}

#[test]
fn config_errors_name_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[app]\ncommand = [\"/bin/true\"]\n[drain]\nsignal = \"SIGNOPE\"\n",
    )
    .unwrap();
    let out = Command::new(BATON)
        .args(["check", "-c"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.toml:4:10: unknown signal `SIGNOPE`"),
        "{stderr}"
    );

    let out = Command::new(BATON)
        .args(["run", "-c"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.toml:4:10"));

    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[app]\ncommand = [\"/bin/true\"]\n").unwrap();
    let out = Command::new(BATON)
        .args(["check", "-c"])
        .arg(&good)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn invalid_config_on_reload_is_refused_and_nothing_changes() {
    let baton = start(&setup());
    let good = std::fs::read_to_string(baton.config()).unwrap();
    std::fs::write(
        baton.config(),
        good.replace("[drain]", "[drain]\nsignal = 42"),
    )
    .unwrap();
    let (code, stdout, stderr) = baton.reload_wait();
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stderr.contains("reload refused, nothing changed"),
        "{stderr}"
    );
    assert!(stderr.contains("app.toml:"), "position in {stderr}");
    let out = baton.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "refused without --wait too");
    assert_eq!(baton.generations(), [(1, "ready".to_owned())]);
    assert_eq!(get_generation(baton.port()), 1);
}

#[test]
fn no_fd_or_zombie_leaks_across_fifty_deploys() {
    let baton = start(&setup());
    let fds = |pid: i32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let (code, _, _) = baton.reload_wait();
    assert_eq!(code, 0);
    // The drained generation has exited and been reaped.
    let one_child = || children(baton.pid()).len() == 1;
    assert!(eventually(Duration::from_secs(10), one_child));
    let after_one = fds(baton.pid());
    for _ in 0..50 {
        let (code, stdout, stderr) = baton.reload_wait();
        assert_eq!(code, 0, "{stdout}{stderr}");
    }
    assert!(
        eventually(Duration::from_secs(10), one_child),
        "{:?}",
        children(baton.pid())
    );
    assert_eq!(children(baton.pid()), [baton.current_pid()]);
    // A control connection just served may hold an fd in baton for a
    // moment after its client left, at either count: no more than after
    // one deploy (a leak of one fd per deploy would be 50 more).
    let settled = eventually(Duration::from_secs(10), || fds(baton.pid()) <= after_one);
    assert!(settled, "{} fds, {after_one} before", fds(baton.pid()));
}

/// The exact child contract, read from /proc of the running app (`sleep`,
/// which opens nothing itself): fds 3.. are the listeners and nothing else
/// of baton's is open; LISTEN_PID is the app's own pid; names and counts
/// are as configured; own process group; signal mask and ignores reset.
#[test]
fn child_sees_exactly_the_socket_activation_contract() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        command: vec!["sleep".into(), "60".into()],
        readiness: "check = \"delay\"\ndelay = \"200ms\"\ntimeout = \"10s\"".into(),
        ..setup()
    }
    .listen(Listen::unix("admin", &dir.path().join("admin.sock")));
    let baton = start(&setup);
    let pid = baton.current_pid();
    let mut fds: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().parse().unwrap())
        .collect();
    fds.sort();
    assert_eq!(fds, [0, 1, 2, 3, 4], "only stdio and the two listeners");
    let target = |fd: u32| std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
    assert_eq!(target(0), std::path::Path::new("/dev/null"));
    assert!(target(3).to_string_lossy().starts_with("socket:"));
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let env: Vec<String> = environ
        .split(|&b| b == 0)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    let has = |var: &str| env.iter().any(|v| v == var);
    assert!(has(&format!("LISTEN_PID={pid}")), "{env:?}");
    assert!(has("LISTEN_FDS=2") && has("LISTEN_FDNAMES=http:admin") && has("BATON_GENERATION=1"));
    assert!(env.iter().any(|v| v.starts_with("NOTIFY_SOCKET=/")));
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let pgid = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .nth(2)
        .unwrap();
    assert_eq!(pgid, pid.to_string(), "own process group");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        status.contains("SigBlk:\t0000000000000000"),
        "mask reset: {status}"
    );
    assert!(
        status.contains("SigIgn:\t0000000000000000"),
        "no ignored signals: {status}"
    );
}

/// The example app refuses to serve when LISTEN_PID is not its own pid,
/// like gunicorn and lighttpd; under baton it serves, on both listeners.
#[test]
fn strict_socket_activation_app_serves_on_every_listener() {
    let dir = tempfile::tempdir().unwrap();
    let unix = dir.path().join("hello.sock");
    let setup = setup()
        .listen(Listen::unix("local", &unix).with("mode = \"0600\""))
        .env("HELLO_EXPECT_FDNAMES", "http:local");
    let baton = start(&setup);
    assert_eq!(get_generation(baton.port()), 1);
    assert_eq!(unix_get_generation(&unix), 1);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&unix).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn second_baton_on_the_same_config_is_refused() {
    let baton = start(&setup());
    let out = Command::new(BATON)
        .args(["run", "-c"])
        .arg(baton.config())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = format!(
        "in use by a running process (pid {} (baton)): another baton runs",
        baton.pid()
    );
    assert!(stderr.contains(&expected), "{stderr}");
    assert_eq!(get_generation(baton.port()), 1);
    assert_eq!(baton.generations(), [(1, "ready".to_owned())]);
}

/// READY=1 from a process baton did not start is ignored and logged: a
/// stray sender cannot promote a candidate.
#[test]
fn notify_from_a_foreign_pid_is_ignored() {
    let mut baton = start(&setup());
    let stuck = setup()
        .readiness_timeout(Duration::from_secs(2))
        .drain_timeout(Duration::from_secs(1))
        .env("HELLO_FAIL", "never-ready");
    baton.rewrite(&stuck).unwrap();
    let reload = baton.cli_start(&["reload", "--wait", "--timeout", "60s"]);
    baton
        .wait_notice("generation 2 started", Duration::from_secs(10), |n| {
            matches!(n, Notice::Started { generation: 2, .. })
        })
        .unwrap();
    let notify = baton.dir().join("baton.notify");
    let sender = std::os::unix::net::UnixDatagram::unbound().unwrap();
    sender.send_to(b"READY=1", &notify).unwrap();
    let me = std::process::id() as i32;
    baton
        .wait_notice("the foreign READY=1", Duration::from_secs(10), |n| {
            *n == Notice::ForeignNotify {
                pid: me,
                ready: true,
            }
        })
        .unwrap();
    let (code, _, stderr) = reload.finish(Duration::from_secs(60)).unwrap();
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("not ready within 2.00 s"), "{stderr}");
    assert_eq!(baton.generations()[0], (1, "ready".to_owned()));
}

/// Every deploy logs one summary line, with ready latency and drain time.
#[test]
fn each_deploy_logs_one_summary_line() {
    let mut baton = start(&setup());
    let (code, _, _) = baton.reload_wait();
    assert_eq!(code, 0);
    let summary = |baton: &mut Baton, generation: u64| {
        let notice = baton
            .wait_notice(
                "a deploy summary",
                Duration::from_secs(10),
                |n| matches!(n, Notice::DeploySummary(s) if s.generation == generation),
            )
            .unwrap();
        match notice {
            Notice::DeploySummary(s) => s,
            _ => unreachable!(),
        }
    };
    let ok = summary(&mut baton, 2);
    assert!(ok.ok && ok.ready.is_some() && ok.reason.is_none(), "{ok:?}");
    let drained = ok.drained.expect("generation 1 drained");
    assert_eq!(drained.generation, 1);
    assert_eq!(drained.status, ExitStatus::Code(0));
    baton.rewrite(&setup().env("HELLO_FAIL", "crash")).unwrap();
    let (code, _, _) = baton.reload_wait();
    assert_eq!(code, 1);
    let failed = summary(&mut baton, 3);
    assert!(!failed.ok && failed.drained.is_none(), "{failed:?}");
    assert_eq!(failed.reason, Some(Failure::Exited(ExitStatus::Code(3))));
    // One summary per deploy: none for the first generation.
    let summaries = baton
        .notices()
        .into_iter()
        .filter(|n| matches!(n, Notice::DeploySummary(_)))
        .count();
    assert_eq!(summaries, 2);
}

/// baton is a child subreaper: a process the app orphans (a daemonizing
/// helper) becomes baton's child and is reaped when it exits, as PID 1
/// would do in an appliance image. The orphan (`cat` of a FIFO) lives
/// until the test releases it by opening the FIFO and closing it again.
#[test]
fn orphans_of_the_app_are_adopted_and_reaped() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("release");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let setup = Setup {
        command: vec![
            "/bin/sh".into(),
            "-c".into(),
            r#"(cat "$1" > /dev/null &); exec sleep 60"#.into(),
            "sh".into(),
            fifo.display().to_string(),
        ],
        readiness: "check = \"delay\"\ndelay = \"100ms\"\ntimeout = \"10s\"".into(),
        ..setup()
    };
    let baton = start(&setup);
    let app = baton.current_pid();
    let mut orphan = None;
    assert!(eventually(Duration::from_secs(10), || {
        orphan = children(baton.pid()).into_iter().find(|&p| p != app);
        orphan.is_some()
    }));
    let orphan = orphan.unwrap();
    assert!(alive(orphan), "held by the FIFO until released");
    // Opening for writing succeeds once the orphan has opened it for
    // reading (never blocks: O_NONBLOCK); closing it ends the orphan.
    let writer = || {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(&fifo)
            .is_ok()
    };
    assert!(eventually(Duration::from_secs(10), writer));
    // It exits and is reaped: gone, not a zombie.
    assert!(eventually(Duration::from_secs(10), || !children(
        baton.pid()
    )
    .contains(&orphan)));
    assert!(!std::path::Path::new(&format!("/proc/{orphan}")).exists());
    assert_eq!(children(baton.pid()), [app]);
}

/// Under journald (JOURNAL_STREAM set): `<N>` priority prefixes and no
/// timestamps; with --log-format json: one JSON object per line.
#[test]
fn logs_suit_journald_and_log_shippers() {
    let human = Launch::default()
        .arg("--log-format")
        .arg("human")
        .env("JOURNAL_STREAM", "8:4242");
    let mut journald = Baton::launch(&setup(), human).unwrap();
    let line = journald
        .wait_log("generation 1 is ready", Duration::from_secs(20))
        .unwrap();
    assert!(
        line.starts_with("<6>generation 1 is ready after"),
        "{line:?}"
    );
    journald.kill_all();

    let quiet = Setup {
        listeners: Vec::new(),
        command: vec!["sleep".into(), "60".into()],
        readiness: "check = \"delay\"\ndelay = \"50ms\"".into(),
        ..setup()
    };
    let mut json =
        Baton::launch(&quiet, Launch::default().arg("--log-format").arg("json")).unwrap();
    let line = json
        .wait_log("generation 1 is ready", Duration::from_secs(20))
        .unwrap();
    let event: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["level"], "INFO");
    assert!(event["fields"]["message"]
        .as_str()
        .unwrap()
        .starts_with("generation 1 is ready"));
    assert_eq!(event["fields"]["generation"], 1);
    // The record carries the typed notice, for shippers and the test kit.
    let notice: Notice = serde_json::from_str(event["fields"]["notice"].as_str().unwrap()).unwrap();
    assert!(
        matches!(notice, Notice::Ready { generation: 1, .. }),
        "{notice:?}"
    );
}
