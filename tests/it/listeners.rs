//! Live listener changes (issue 10): a reload that adds or removes a
//! `[[listen]]` is a deploy like any other, with no failed request on the
//! listeners that stay.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use baton_testkit::{load, Listen, Load, Notice, Spec};

use crate::{get_generation, setup, start};

const WAIT: Duration = Duration::from_secs(20);

/// Issue 10, done-when 7: add a listener by reload, it answers; remove it,
/// it closes once the old generation has drained; the other port failed
/// no request throughout; a port already in use is refused, nothing
/// changes.
#[test]
fn listeners_added_and_removed_by_reload() {
    let base = setup();
    let mut baton = start(&base);
    let http: SocketAddr = ([127, 0, 0, 1], baton.port()).into();
    let load = Load::start(http, Instant::now(), Spec::default());
    let wider = base.clone().listen(Listen::new("admin", "127.0.0.1:0"));
    baton.rewrite(&wider).unwrap();
    let (code, _, stderr) = baton.reload_wait();
    assert_eq!(code, 0, "{stderr}");
    let doc = baton.status_doc().unwrap();
    let admin = doc.listeners.iter().find(|l| l.name == "admin").unwrap();
    let admin: SocketAddr = admin.address.parse().unwrap();
    assert_eq!(load::probe(admin, WAIT), Ok(2));
    baton.wait_drained(1).unwrap();
    // Removed: it stays open while generation 2, which has it, lives.
    baton.rewrite(&base).unwrap();
    let (code, _, stderr) = baton.reload_wait();
    assert_eq!(code, 0, "{stderr}");
    let closing = baton.status_doc().unwrap();
    let listed = closing.listeners.iter().find(|l| l.name == "admin");
    let closed_already = baton
        .notices()
        .iter()
        .any(|n| matches!(n, Notice::ListenerClosed { .. }));
    assert!(
        closed_already || listed.is_some_and(|l| l.closing),
        "{closing:?}"
    );
    baton.wait_drained(2).unwrap();
    let closed = baton
        .wait_notice_ever(
            "admin closed",
            WAIT,
            |n| matches!(n, Notice::ListenerClosed { name, .. } if name == "admin"),
        )
        .unwrap();
    assert!(matches!(closed, Notice::ListenerClosed { .. }));
    assert!(
        std::net::TcpStream::connect(admin).is_err(),
        "{admin} still open"
    );
    // A port someone else holds: refused, nothing changes.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_at = taken.local_addr().unwrap().to_string();
    let clash = base.clone().listen(Listen::new("other", &taken_at));
    baton.rewrite(&clash).unwrap();
    let (code, _, stderr) = baton.reload_wait();
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("nothing changed"), "{stderr}");
    assert!(stderr.contains(&taken_at), "{stderr}");
    assert_eq!(baton.generations(), [(3, "ready".to_owned())]);
    let tally = load.stop();
    eprintln!("{tally}");
    assert_eq!(tally.failed(), 0, "failed requests: {tally}");
    assert_eq!(get_generation(baton.port()), 3);
}
