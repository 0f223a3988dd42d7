//! Releases, history and rollback (issue 9): `{version}` in the config,
//! `baton deploy VERSION`, `baton rollback`, `baton history`, and the
//! serving release surviving a restart of baton (also a SIGKILL of it and
//! its children, as a reboot would).

use std::path::{Path, PathBuf};
use std::time::Duration;

use baton_testkit::{Baton, Notice, Setup};

use crate::{binaries, get_generation, setup, start, BATON};

const WAIT: Duration = Duration::from_secs(20);

/// `releases/<v>/hello` for each of `versions` (a link to the example
/// app); others do not exist.
fn releases(dir: &Path, versions: &[&str]) -> PathBuf {
    let root = dir.join("releases");
    for v in versions {
        std::fs::create_dir_all(root.join(v)).unwrap();
        std::os::unix::fs::symlink(&binaries().hello, root.join(v).join("hello")).unwrap();
    }
    root
}

/// The example app as `<root>/{version}/hello`, state in `state`.
fn released(root: &Path, state: &Path, version: Option<&str>) -> Setup {
    let version = version.map_or_else(String::new, |v| format!("version = \"{v}\"\n"));
    Setup {
        command: vec![format!("{}/{{version}}/hello", root.display())],
        app: version,
        extra: format!("[state]\ndir = \"{}\"", state.display()),
        ..setup()
    }
}

/// The release the current generation runs, from its environment.
fn running_release(baton: &Baton) -> String {
    let pid = baton.current_pid();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ).into_owned();
    environ
        .split('\0')
        .find_map(|v| v.strip_prefix("BATON_VERSION="))
        .unwrap_or_else(|| panic!("no BATON_VERSION in {environ}"))
        .to_owned()
}

/// Issue 9, done-when 6: deploy 2, deploy 3 (broken), rollback; history
/// shows all with outcomes; a restarted baton runs the release that served
/// last, also after a SIGKILL of baton and its children.
#[test]
fn deploy_rollback_history_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let root = releases(dir.path(), &["1", "2"]);
    let state = dir.path().join("state");
    let setup = released(&root, &state, Some("1"));
    let mut baton = start(&setup);
    assert_eq!(running_release(&baton), "1");
    let cli = |baton: &Baton, args: &[&str]| {
        let out = baton.cli(args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text)
    };
    let (code, out) = cli(&baton, &["deploy", "2", "--wait"]);
    assert_eq!(code, 0, "{out}");
    baton.wait_drained(1).unwrap();
    assert_eq!(running_release(&baton), "2");
    let (code, out) = cli(&baton, &["deploy", "3", "--wait"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("exec failed: ENOENT"), "{out}");
    assert_eq!(get_generation(baton.port()), 2);
    let (code, out) = cli(&baton, &["rollback", "--wait"]);
    assert_eq!(code, 0, "{out}");
    baton.wait_drained(2).unwrap();
    assert_eq!(running_release(&baton), "1");
    let (code, out) = cli(&baton, &["history"]);
    assert_eq!(code, 0, "{out}");
    let rows: Vec<&str> = out.lines().skip(2).collect();
    assert_eq!(rows.len(), 4, "{out}");
    for (row, (generation, version, kind, outcome)) in rows.iter().zip([
        ("4", "1", "rollback", "served"),
        ("3", "3", "deploy", "exec failed: ENOENT"),
        ("2", "2", "deploy", "served"),
        ("1", "1", "start", "served"),
    ]) {
        let fields: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(&fields[..3], [generation, version, kind], "{row}");
        assert!(row.contains(outcome), "{outcome} in {row}");
    }
    assert!(out.starts_with("serving release: 1"), "{out}");
    // Back to 2, then baton stops and starts again: it runs 2, not the
    // config's version 1.
    let (code, out) = cli(&baton, &["deploy", "2", "--wait"]);
    assert_eq!(code, 0, "{out}");
    let stopped = baton.cli(&["stop"]);
    assert!(stopped.status.success());
    baton.wait_exit(WAIT).unwrap();
    drop(baton);
    let mut baton = start(&setup);
    assert_eq!(running_release(&baton), "2");
    // As after a reboot: baton and its children SIGKILLed.
    baton.kill_all();
    drop(baton);
    let baton = start(&setup);
    assert_eq!(running_release(&baton), "2");
    let json = baton.cli(&["history", "--json"]);
    let history: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(history["current"], "2");
    assert_eq!(history["deploys"][0]["kind"], "start");
    assert_eq!(history["deploys"][0]["version"], "2");
}

/// Issue 9, done-when 7: bad input is refused with a clear error and
/// nothing changes.
#[test]
fn bad_releases_and_state_are_refused_or_reported() {
    let dir = tempfile::tempdir().unwrap();
    let root = releases(dir.path(), &["1"]);
    let state = dir.path().join("state");
    // `check` on a file with `{version}` and no release named.
    let config = dir.path().join("no-version.toml");
    let text = released(&root, &state, None).render(&dir.path().join("x.sock"));
    std::fs::write(&config, text).unwrap();
    let out = std::process::Command::new(BATON)
        .args(["check", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    // file:line:column of the first {version} (its column in `command`).
    assert!(stderr.contains("no-version.toml:"), "{stderr}");
    assert!(
        stderr.contains(":11: {version} needs a release"),
        "{stderr}"
    );
    // A typo in a placeholder.
    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, "[app]\ncommand = [\"/opt/{verison}/server\"]\n").unwrap();
    let out = std::process::Command::new(BATON)
        .args(["check", "-c"])
        .arg(&typo)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("typo.toml:2:11: unknown placeholder `{verison}`"),
        "{stderr}"
    );
    // A corrupt history: reported, set aside, baton runs the config's
    // release.
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("history.json"), "{ corrupt").unwrap();
    let baton = start(&released(&root, &state, Some("1")));
    let problem = baton
        .wait_notice_ever("the history reported", WAIT, |n| {
            matches!(n, Notice::HistoryUnusable { .. })
        })
        .unwrap();
    let Notice::HistoryUnusable { problem } = problem else {
        unreachable!()
    };
    assert!(
        problem.contains("is unusable") && problem.contains("moved to"),
        "{problem}"
    );
    assert!(state.join("history.json.corrupt").exists());
    assert_eq!(running_release(&baton), "1");
    // A release name that is not one, and a release that does not exist.
    let out = baton.cli(&["deploy", "../../bin", "--wait"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is not a valid version"), "{stderr}");
    let out = baton.cli(&["deploy", "9", "--wait"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("exec failed: ENOENT"), "{stderr}");
    assert_eq!(baton.generations(), [(1, "ready".to_owned())]);
    assert_eq!(running_release(&baton), "1");
    // The history was written anew, with both.
    let history: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("history.json")).unwrap()).unwrap();
    assert_eq!(history["deploys"].as_array().unwrap().len(), 2);
    assert_eq!(history["current"], "1");
}

/// Issue 9, done-when 8: a `[deploy] before` hook that fails cancels the
/// deploy with its output, no candidate started; one that succeeds runs
/// exactly once per deploy, with the release's variables; `after` runs
/// once the new generation serves.
#[test]
fn before_hook_gates_the_deploy_after_hook_follows() {
    let dir = tempfile::tempdir().unwrap();
    let root = releases(dir.path(), &["1", "2", "3"]);
    let state = dir.path().join("state");
    let log = dir.path().join("hooks.log");
    // release 3's migration fails, loudly.
    let hook = format!(
        "echo before $BATON_VERSION $BATON_GENERATION >> {log}; \
         if [ \"$BATON_VERSION\" = 3 ]; then echo 'ERROR: relation \"users\" does not exist'; \
         exit 4; fi",
        log = log.display()
    );
    let after = format!("echo after $BATON_VERSION >> {}", log.display());
    let mut setup = released(&root, &state, Some("1"));
    setup.extra += &format!(
        "\n[deploy]\nbefore = [\"sh\", \"-c\", {hook:?}]\nafter = [\"sh\", \"-c\", {after:?}]\n"
    );
    let mut baton = start(&setup);
    let out = baton.cli(&["deploy", "2", "--wait"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    baton.wait_drained(1).unwrap();
    // The after hook of deploy 2 runs once it served; deploy 3 follows it.
    baton
        .wait_notice_ever("deploy 2's after hook", WAIT, |n| {
            matches!(n, Notice::AfterHookPassed { generation: 2 })
        })
        .unwrap();
    let out = baton.cli(&["deploy", "3", "--wait"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("[deploy] before failed, nothing was started:")
            && stderr.contains("exited with code 4; its last lines:")
            && stderr.contains("ERROR: relation \"users\" does not exist"),
        "{stderr}"
    );
    // Generation 3 never got a process.
    let started = baton.started_generations();
    assert!(!started.contains_key(&3), "{started:?}");
    assert_eq!(get_generation(baton.port()), 2);
    let lines = std::fs::read_to_string(&log).unwrap();
    assert_eq!(lines, "before 2 2\nafter 2\nbefore 3 3\n");
    let history = baton.cli(&["history"]);
    let history = String::from_utf8_lossy(&history.stdout);
    assert!(history.contains("hook failed"), "{history}");
}
