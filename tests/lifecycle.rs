//! Start, stop, restart, config errors and the child contract, against the
//! real binary (issue 2).

mod common;

use std::time::Duration;

use common::{alive, eventually, get_generation, Baton, Setup, BATON};
use nix::sys::signal::Signal;

const EXIT: Duration = Duration::from_secs(20);

#[test]
fn sigterm_drains_every_generation_and_exits_zero() {
    let mut baton = Baton::start(Setup::default());
    let child = baton.current_pid();
    baton.signal(Signal::SIGTERM);
    assert_eq!(baton.wait_exit(EXIT), Some(0));
    // The app was drained, not killed.
    baton.wait_log("draining after SIGTERM", Duration::from_secs(10));
    assert!(!alive(child));
    assert!(
        !baton.dir.path().join("baton.sock").exists(),
        "control socket removed"
    );
}

#[test]
fn sigquit_kills_children_and_exits() {
    let mut baton = Baton::start(Setup::default().env("HELLO_FAIL", "ignore-term"));
    let child = baton.current_pid();
    baton.signal(Signal::SIGQUIT);
    assert_eq!(baton.wait_exit(EXIT), Some(0));
    assert!(!alive(child));
}

#[test]
fn stop_command_waits_until_baton_has_exited() {
    let mut baton = Baton::start(Setup::default());
    let child = baton.current_pid();
    let out = baton.cli(&["stop"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("stopped"));
    assert_eq!(baton.wait_exit(EXIT), Some(0));
    assert!(!alive(child));
}

#[test]
fn sighup_deploys_a_new_generation() {
    let mut baton = Baton::start(Setup::default());
    baton.signal(Signal::SIGHUP);
    baton.wait_drained(1);
    assert_eq!(get_generation(baton.port), 2);
}

#[test]
fn crashed_generation_is_restarted_and_clients_wait_in_the_backlog() {
    let mut baton = Baton::start(Setup::default());
    let child = baton.current_pid();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child), Signal::SIGKILL).unwrap();
    baton.wait_log(
        "killed by signal SIGKILL while serving",
        Duration::from_secs(10),
    );
    // The listening socket never closed: this connection queues until the
    // restarted generation accepts it.
    assert_eq!(get_generation(baton.port), 2);
    baton.wait_log("generation 2 is ready", Duration::from_secs(10));
}

#[test]
fn concurrent_reloads_coalesce_into_one_follow_up() {
    let mut baton = Baton::start(Setup::default().env("HELLO_BOOT_DELAY_MS", "700"));
    let config = baton.config.clone();
    let (code, stdout, stderr) = baton.reload_wait();
    assert_eq!(code, 0, "{stdout}{stderr}");
    // Generation 2 is now serving. Start two reloads at once: the second
    // arrives while generation 3 boots and is queued behind it.
    let a = std::process::Command::new(BATON)
        .args(["reload", "--wait", "-c"])
        .arg(&config)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    baton.wait_log("starting generation 3", Duration::from_secs(10));
    let b = baton.cli(&["reload", "--wait"]);
    let a = a.wait_with_output().unwrap();
    let a_out = String::from_utf8_lossy(&a.stdout);
    assert!(a.status.success(), "{a_out}");
    assert!(a_out.contains("done: generation 3"), "{a_out}");
    let b_out = String::from_utf8_lossy(&b.stdout);
    assert!(b.status.success(), "{b_out}");
    assert!(b_out.contains("this reload follows it"), "{b_out}");
    assert!(b_out.contains("done: generation 4"), "{b_out}");
    baton.wait_drained(3);
    assert_eq!(get_generation(baton.port), 4);
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
    let out = std::process::Command::new(BATON)
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

    let out = std::process::Command::new(BATON)
        .args(["run", "-c"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.toml:4:10"));

    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[app]\ncommand = [\"/bin/true\"]\n").unwrap();
    let out = std::process::Command::new(BATON)
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
    let baton = Baton::start(Setup::default());
    let good = std::fs::read_to_string(&baton.config).unwrap();
    std::fs::write(
        &baton.config,
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
    // Changing the listeners is refused too.
    std::fs::write(&baton.config, good.replace("127.0.0.1:0", "127.0.0.2:0")).unwrap();
    let (code, _, stderr) = baton.reload_wait();
    assert_eq!(code, 1);
    assert!(
        stderr.contains("changes the [[listen]] sockets"),
        "{stderr}"
    );
    assert_eq!(baton.generations(), [(1, "ready".to_owned())]);
    assert_eq!(get_generation(baton.port), 1);
}

#[test]
fn no_fd_or_zombie_leaks_across_fifty_deploys() {
    let baton = Baton::start(Setup::default());
    let fds = |pid: i32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let (code, _, _) = baton.reload_wait();
    assert_eq!(code, 0);
    // The drained generation has exited and been reaped.
    let children =
        || std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", baton.pid())).unwrap();
    assert!(eventually(Duration::from_secs(10), || children()
        .split_whitespace()
        .count()
        == 1));
    let after_one = fds(baton.pid());
    for _ in 0..50 {
        let (code, stdout, stderr) = baton.reload_wait();
        assert_eq!(code, 0, "{stdout}{stderr}");
    }
    assert!(
        eventually(Duration::from_secs(10), || children()
            .split_whitespace()
            .count()
            == 1),
        "{}",
        children()
    );
    assert_eq!(children().trim(), baton.current_pid().to_string());
    assert_eq!(fds(baton.pid()), after_one);
}

/// The exact child contract, read from /proc of the running app (`sleep`,
/// which opens nothing itself): fds 3.. are the listeners and nothing else
/// of baton's is open; LISTEN_PID is the app's own pid; names and counts
/// are as configured; own process group; signal mask and ignores reset.
#[test]
fn child_sees_exactly_the_socket_activation_contract() {
    let dir = tempfile::tempdir().unwrap();
    let unix = dir.path().join("admin.sock");
    let setup = Setup {
        command: vec!["sleep".into(), "60".into()],
        readiness: "check = \"delay\"\ndelay = \"200ms\"\ntimeout = \"10s\"".into(),
        extra_listen: format!(
            "[[listen]]\nname = \"admin\"\naddress = \"unix:{}\"\n",
            unix.display()
        ),
        ..Setup::default()
    };
    let baton = Baton::start(setup);
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
    let setup = Setup {
        extra_listen: format!(
            "[[listen]]\nname = \"local\"\naddress = \"unix:{}\"\nmode = \"0600\"\n",
            unix.display()
        ),
        ..Setup::default()
    }
    .env("HELLO_EXPECT_FDNAMES", "http:local");
    let baton = Baton::start(setup);
    assert_eq!(get_generation(baton.port), 1);
    assert_eq!(common::unix_get_generation(&unix), 1);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&unix).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn second_baton_on_the_same_config_is_refused() {
    let baton = Baton::start(Setup::default());
    let out = std::process::Command::new(BATON)
        .args(["run", "-c"])
        .arg(&baton.config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = format!(
        "in use by a running process (pid {} (baton)): another baton runs",
        baton.pid()
    );
    assert!(stderr.contains(&expected), "{stderr}");
    assert_eq!(get_generation(baton.port), 1);
    assert_eq!(baton.generations(), [(1, "ready".to_owned())]);
}

/// READY=1 from a process baton did not start is ignored and logged: a
/// stray sender cannot promote a candidate.
#[test]
fn notify_from_a_foreign_pid_is_ignored() {
    let mut baton = Baton::start(Setup::default());
    let stuck = Setup {
        readiness: "timeout = \"2s\"".into(),
        drain_timeout: "1s".into(),
        ..Setup::default()
    };
    baton.rewrite(&stuck.env("HELLO_FAIL", "never-ready"));
    let reload = std::process::Command::new(BATON)
        .args(["reload", "--wait", "-c"])
        .arg(&baton.config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    baton.wait_log("generation 2 started as pid", Duration::from_secs(10));
    let notify = baton.dir.path().join("baton.notify");
    let sender = std::os::unix::net::UnixDatagram::unbound().unwrap();
    sender.send_to(b"READY=1", &notify).unwrap();
    let me = std::process::id();
    baton.wait_log(
        &format!("ignoring READY=1 from pid {me}"),
        Duration::from_secs(10),
    );
    let out = reload.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not ready within 2.00 s"));
    assert_eq!(baton.generations()[0], (1, "ready".to_owned()));
}

/// Every deploy logs one summary line, with ready latency and drain time.
#[test]
fn each_deploy_logs_one_summary_line() {
    let mut baton = Baton::start(Setup::default());
    let (code, _, _) = baton.reload_wait();
    assert_eq!(code, 0);
    let line = baton.wait_log("deploy summary: generation 2", Duration::from_secs(10));
    assert!(
        line.contains("ok, ready in") && line.contains("generation 1 drained in"),
        "{line}"
    );
    baton.rewrite(&Setup::default().env("HELLO_FAIL", "crash"));
    let (code, _, _) = baton.reload_wait();
    assert_eq!(code, 1);
    let line = baton.wait_log("deploy summary: generation 3", Duration::from_secs(10));
    assert!(
        line.contains("failed after") && line.contains("exited with code 3"),
        "{line}"
    );
}

/// baton is a child subreaper: a process the app orphans (a daemonizing
/// helper) becomes baton's child and is reaped when it exits, as PID 1
/// would do in an appliance image.
#[test]
fn orphans_of_the_app_are_adopted_and_reaped() {
    let setup = Setup {
        command: vec![
            "/bin/sh".into(),
            "-c".into(),
            "(sleep 1 &); exec sleep 60".into(),
        ],
        readiness: "check = \"delay\"\ndelay = \"100ms\"\ntimeout = \"10s\"".into(),
        ..Setup::default()
    };
    let baton = Baton::start(setup);
    let app = baton.current_pid();
    let children = || -> Vec<i32> {
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", baton.pid()))
            .unwrap()
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect()
    };
    let mut orphan = None;
    assert!(eventually(Duration::from_secs(5), || {
        orphan = children().into_iter().find(|&p| p != app);
        orphan.is_some()
    }));
    let orphan = orphan.unwrap();
    // It exits after a second and is reaped: gone, not a zombie.
    assert!(eventually(Duration::from_secs(10), || !children().contains(&orphan)));
    assert!(!std::path::Path::new(&format!("/proc/{orphan}")).exists());
    assert_eq!(children(), [app]);
}

/// Under journald (JOURNAL_STREAM set): `<N>` priority prefixes and no
/// timestamps; with --log-format json: one JSON object per line.
#[test]
fn logs_suit_journald_and_log_shippers() {
    let mut journald = Baton::spawn(
        Setup::default(),
        "127.0.0.1:0",
        &[("JOURNAL_STREAM", "8:4242")],
    );
    let line = journald.wait_log("generation 1 is ready", Duration::from_secs(20));
    assert!(
        line.starts_with("<6>generation 1 is ready after"),
        "{line:?}"
    );
    journald.kill_all();

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("app.toml");
    std::fs::write(
        &config,
        format!(
            "[app]\ncommand = [\"sleep\", \"60\"]\n[readiness]\ncheck = \"delay\"\ndelay = \"50ms\"\n\
             [control]\nsocket = \"{}\"\n",
            dir.path().join("baton.sock").display()
        ),
    )
    .unwrap();
    let mut json = Baton::spawn_with(
        dir,
        config,
        "",
        BATON,
        &["run", "--log-format", "json", "-c"],
        &[],
    );
    let line = json.wait_log("generation 1 is ready", Duration::from_secs(20));
    let event: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["level"], "INFO");
    assert!(event["fields"]["message"]
        .as_str()
        .unwrap()
        .starts_with("generation 1 is ready"));
    assert_eq!(event["fields"]["generation"], 1);
}
