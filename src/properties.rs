//! Fuzzing, as property tests (issue 8): the three inputs others hand
//! baton — the config file, a control request line, a notify datagram —
//! mutated from the seed corpus in `fuzz/corpus/` and generated from
//! scratch. Properties: no panic, and for the config either a valid result
//! or an error that names its position (`file:line:column:`).
//!
//! proptest, not cargo-fuzz: cargo-fuzz needs a nightly toolchain, which
//! this project's machines do not have. Each test runs a bounded number of
//! cases (a few seconds in all); a failing case is saved under
//! `proptest-regressions/` and replayed first on the next run.

use std::path::Path;

use proptest::prelude::*;

use crate::config::Config;
use crate::control::parse_request;
use crate::sd_notify::Message;

/// The seed files of one corpus directory.
fn corpus(kind: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(kind);
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| std::fs::read(entry.unwrap().path()).unwrap())
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

/// One edit of a seed: the tokens a careless operator or a hostile peer
/// types, at any byte.
#[derive(Debug, Clone)]
enum Edit {
    Insert(usize, String),
    Delete(usize, usize),
    Replace(usize, usize, String),
}

const TOKENS: &[&str] = &[
    "\"",
    "'",
    "[",
    "]",
    "[[",
    "]]",
    "{",
    "}",
    "=",
    ",",
    "\n",
    "\0",
    "\\",
    "\\u0000",
    "#",
    "-1",
    "0",
    "99999999999999999999",
    "1e309",
    "NaN",
    "\"10000000000000000000s\"",
    "\"0s\"",
    "\"\"",
    "unix:",
    "udp:",
    "[::1]:0",
    "256.0.0.1:1",
    "command",
    "listen",
    "address",
    "name",
    "timeout",
    "delay",
    "signal",
    "SIGKILL",
    "user",
    "group",
    "umask",
    "limits",
    "nofile",
    "\u{feff}",
    "é",
    "\u{10ffff}",
    "true",
    "null",
    "v",
    ":",
];

fn edit() -> impl Strategy<Value = Edit> {
    let token = prop_oneof![
        proptest::sample::select(TOKENS).prop_map(str::to_owned),
        "\\PC{0,12}",
    ];
    prop_oneof![
        (any::<usize>(), token.clone()).prop_map(|(at, t)| Edit::Insert(at, t)),
        (any::<usize>(), 1..16usize).prop_map(|(at, n)| Edit::Delete(at, n)),
        (any::<usize>(), 1..8usize, token).prop_map(|(at, n, t)| Edit::Replace(at, n, t)),
    ]
}

/// `seed` with `edits` applied at byte offsets (modulo its length), which
/// may well split a UTF-8 sequence: the result is bytes.
fn mutate(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for edit in edits {
        let len = bytes.len();
        let at = |i: usize| if len == 0 { 0 } else { i % (len + 1) };
        match edit {
            Edit::Insert(i, t) => {
                let i = at(*i);
                bytes.splice(i..i, t.bytes());
            }
            Edit::Delete(i, n) => {
                let i = at(*i);
                bytes.drain(i..(i + n).min(len));
            }
            Edit::Replace(i, n, t) => {
                let i = at(*i);
                bytes.splice(i..(i + n).min(len), t.bytes());
            }
        }
    }
    bytes
}

/// The config property: parsing never panics, and an error starts with
/// `file:line:column: ` (or says the file is not UTF-8, also with its
/// position).
fn check_config(bytes: &[u8]) -> Result<(), TestCaseError> {
    let path = Path::new("/etc/baton/fuzz.toml");
    let result = match std::str::from_utf8(bytes) {
        Ok(text) => Config::parse(path, text),
        // Config::load's path for non-UTF-8 files, through a real file.
        Err(_) => {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("fuzz.toml");
            std::fs::write(&file, bytes).unwrap();
            return match Config::load(&file) {
                Ok(_) => Err(TestCaseError::fail("invalid UTF-8 accepted")),
                Err(e) => {
                    let e = e.to_string();
                    let positioned = e
                        .strip_prefix(&format!("{}:", file.display()))
                        .is_some_and(has_position);
                    prop_assert!(positioned, "no position: {e}");
                    Ok(())
                }
            };
        }
    };
    if let Err(e) = result {
        let e = e.to_string();
        let positioned = e
            .strip_prefix("/etc/baton/fuzz.toml:")
            .is_some_and(has_position);
        prop_assert!(positioned, "no position: {e}");
    }
    Ok(())
}

/// "12:7: message": a line and a column, then the message.
fn has_position(rest: &str) -> bool {
    let mut parts = rest.splitn(3, ':');
    let number = |p: Option<&str>| p.is_some_and(|n| n.parse::<usize>().is_ok_and(|n| n > 0));
    number(parts.next()) && number(parts.next()) && parts.next().is_some_and(|m| m.len() > 1)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, ..ProptestConfig::default() })]

    #[test]
    fn config_mutations_parse_or_fail_with_a_position(
        seed in proptest::sample::select(corpus("config")),
        edits in proptest::collection::vec(edit(), 1..6),
    ) {
        check_config(&mutate(&seed, &edits))?;
    }

    #[test]
    fn any_text_as_config_parses_or_fails_with_a_position(text in "\\PC{0,200}") {
        check_config(text.as_bytes())?;
    }

    #[test]
    fn control_request_lines_never_panic(
        seed in proptest::sample::select(corpus("control")),
        edits in proptest::collection::vec(edit(), 0..6),
    ) {
        let line = String::from_utf8_lossy(&mutate(&seed, &edits)).into_owned();
        if let Err(e) = parse_request(line.trim_end()) {
            prop_assert!(!e.is_empty());
        }
    }

    #[test]
    fn notify_datagrams_never_panic(
        seed in proptest::sample::select(corpus("notify")),
        edits in proptest::collection::vec(edit(), 0..6),
        noise in proptest::collection::vec(any::<u8>(), 0..4096),
    ) {
        Message::parse(&mutate(&seed, &edits));
        Message::parse(&noise);
    }
}

#[test]
fn the_seeds_themselves_are_valid() {
    for seed in corpus("config") {
        let text = String::from_utf8(seed).unwrap();
        // Users and groups in the seeds exist on any Linux (root).
        Config::parse(Path::new("/etc/baton/seed.toml"), &text).unwrap();
    }
    for seed in corpus("control") {
        parse_request(String::from_utf8(seed).unwrap().trim_end()).unwrap();
    }
    assert!(corpus("notify").iter().any(|s| Message::parse(s).ready));
}
