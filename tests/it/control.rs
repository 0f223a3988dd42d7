//! The control socket: who may use it, and what a misbehaving client gets
//! (issue 3). Bad requests get an error line and never block the daemon.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use baton_testkit::{skip, Baton, Notice};

use crate::{setup, start, BATON};

/// Sends raw bytes, returns the first reply line.
fn raw(path: &Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(bytes).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    line
}

#[test]
fn bad_requests_get_an_error_line_and_the_daemon_keeps_serving() {
    let baton = start(&setup());
    let path = baton.control();
    // A silent client holds a connection open the whole time.
    let _silent = UnixStream::connect(path).unwrap();

    let reply = raw(path, b"this is not json\n");
    assert!(
        reply.starts_with(r#"{"v":1,"event":"error","message":"bad request"#),
        "{reply}"
    );
    let reply = raw(path, b"{\"command\":\"explode\"}\n");
    assert!(reply.contains("unknown variant `explode`"), "{reply}");
    let reply = raw(path, b"{\"v\":9,\"command\":\"status\"}\n");
    assert!(reply.contains("version 9 is not supported"), "{reply}");
    let mut huge = vec![b'x'; 70 * 1024];
    huge.push(b'\n');
    let reply = raw(path, &huge);
    assert!(reply.contains("longer than 64 KiB"), "{reply}");

    let reply = raw(path, b"{\"v\":1,\"command\":\"status\"}\n");
    assert!(reply.starts_with(r#"{"v":1,"event":"status""#), "{reply}");
    assert_eq!(baton.generations(), [(1, "ready".to_owned())]);
}

#[test]
fn status_prints_a_table_and_stable_json() {
    let baton = start(&setup());
    let (code, _, _) = baton.reload_wait();
    assert_eq!(code, 0);
    let out = baton.cli(&["status"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("GEN    PID      STATE"), "{table}");
    assert!(
        table.contains("last deploy: generation 2 is serving"),
        "{table}"
    );
    assert!(
        table.contains(&format!("listener http: 127.0.0.1:{}", baton.port())),
        "{table}"
    );
    let json = baton.status();
    let keys: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    assert_eq!(
        keys,
        [
            "config",
            "containment",
            "deploying",
            "generations",
            "last_deploy",
            "listeners",
            "pid",
            "reload_queued",
            "replaced",
            "restarting_in_ms",
            "stopping"
        ]
    );
    assert_eq!(json["last_deploy"]["ok"], true);
    assert_eq!(json["generations"][0]["generation"], 2);
    // Without a cgroup (the tests' baton runs in the root cgroup): the
    // main process's own memory and CPU, and why no cgroup.
    let containment = json["containment"].as_str().unwrap();
    assert!(containment.starts_with("process groups ("), "{containment}");
    assert!(json["generations"][0]["memory_bytes"].as_u64().unwrap() > 0);
    assert!(json["generations"][0]["cpu_usec"].is_u64());
    assert_eq!(json["generations"][0]["escapees"], serde_json::json!([]));
}

/// Runs `baton status` as another user (via util-linux `setpriv`).
fn status_as(baton: &Baton, uid: u32, gid: u32, groups: &str) -> std::process::Output {
    Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            &format!("--groups={groups}"),
            BATON,
            "status",
            "-c",
        ])
        .arg(baton.config())
        .output()
        .expect("setpriv (util-linux) runs")
}

/// Needs root (to act as other users through `setpriv`): without it, it
/// says SKIPPED on stderr, past the test harness's capture. CI runs as root.
#[test]
fn control_group_members_may_connect_others_are_refused() {
    if !nix::unistd::geteuid().is_root() {
        skip(
            "control::control_group_members_may_connect_others_are_refused",
            "needs root to run clients as other users (setpriv); CI runs it as root",
        );
        return;
    }
    let mut baton = start(&baton_testkit::Setup {
        control: "group = \"nogroup\"".into(),
        ..setup()
    });
    let path = baton.control().to_owned();
    // Let other users reach the socket file itself (and read the config).
    std::fs::set_permissions(baton.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(baton.config(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(meta.gid(), 65534);

    // Primary group, and supplementary group.
    let out = status_as(&baton, 4242, 65534, "65534");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = status_as(&baton, 4242, 4242, "65534");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // An operator loosened the mode by hand: baton still checks the peer.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = status_as(&baton, 4242, 4242, "4242");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("permission denied"), "{stderr}");
    baton
        .wait_notice("the refusal", Duration::from_secs(10), |n| {
            matches!(n, Notice::ControlRefused { uid: 4242, .. })
        })
        .unwrap();
}

#[test]
fn slow_client_does_not_block_the_daemon() {
    let baton = start(&setup());
    let mut slow = UnixStream::connect(baton.control()).unwrap();
    slow.write_all(b"{\"command\":").unwrap(); // and nothing more, for now
    let (code, stdout, stderr) = baton.reload_wait();
    assert_eq!(code, 0, "{stdout}{stderr}");
    slow.write_all(b"\"status\"}\n").unwrap();
    let mut reply = String::new();
    slow.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    slow.read_to_string(&mut reply).unwrap();
    assert!(reply.contains("\"generation\":2"), "{reply}");
}

/// `baton events` (issue 7): every notice, typed, for as long as baton
/// runs; the CLI prints the log's lines, the protocol carries the types.
#[test]
fn events_stream_every_notice_until_baton_exits() {
    const WAIT: Duration = Duration::from_secs(10);
    let baton = start(&setup());
    let mut human = baton.cli_start(&["events"]);
    human.wait_line("following baton's events", WAIT).unwrap();
    let mut stream = UnixStream::connect(baton.control()).unwrap();
    stream
        .write_all(b"{\"v\":1,\"command\":\"events\"}\n")
        .unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut replies = BufReader::new(stream).lines();
    let mut next = || -> baton::control::Reply {
        let line = replies.next().expect("a reply line").unwrap();
        serde_json::from_str(&line).unwrap()
    };
    assert_eq!(next(), baton::control::Reply::Following);

    let (code, _, stderr) = baton.reload_wait();
    assert_eq!(code, 0, "{stderr}");
    let mut notices = Vec::new();
    loop {
        match next() {
            baton::control::Reply::Notice(n) => {
                let last = matches!(&n, Notice::DeploySummary(s) if s.generation == 2);
                notices.push(n);
                if last {
                    break;
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // The deploy's own steps, in order. What the app says (STATUS=,
    // STOPPING=1) interleaves with them as its datagrams and its exit race.
    let kinds: Vec<String> = notices
        .iter()
        .map(|n| n.to_json().split('"').nth(3).unwrap_or("").to_owned())
        .filter(|k| !k.starts_with("app_") && k != "foreign_notify")
        .collect();
    assert_eq!(
        kinds,
        [
            "starting",
            "started",
            "ready",
            "draining",
            "deploy_finished",
            "exited",
            "deploy_summary"
        ]
    );
    human
        .wait_line("deploy summary: generation 2 ok", WAIT)
        .unwrap();

    // The stream ends when baton does; the CLI then exits 0.
    let out = baton.cli(&["stop"]);
    assert!(out.status.success());
    let (code, _, stderr) = human.finish(WAIT).unwrap();
    assert_eq!(code, 0, "{stderr}");
}
