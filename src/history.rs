//! Releases and the deploy history on disk (issue 9): `[state] dir` holds
//! `history.json`, the release that serves and the last
//! [`KEPT`] deploys, newest first. Written atomically (a temp file in the
//! same directory, fsync, rename, fsync of the directory), read leniently:
//! a missing file is an empty history; a corrupt or foreign one is moved
//! aside (`history.json.corrupt`), reported, and replaced: it never stops
//! baton.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::core::{Record, Releases};
use crate::notice::{Cause, Failure, Outcome};

/// Deploys kept.
pub(crate) const KEPT: usize = 100;
/// The file's format; another one is reported and set aside.
const FORMAT: u32 = 1;
const FILE: &str = "history.json";

/// What `history.json` holds (and `baton history --json` prints).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    pub format: u32,
    /// The release serving now: a restarted baton starts it.
    pub current: Option<String>,
    /// Newest first.
    pub deploys: Vec<Entry>,
}

/// One deploy (or start, or replacement) and how it ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub generation: u64,
    pub version: Option<String>,
    /// "start", "deploy", "rollback" or "replace" (a wedged generation).
    pub kind: String,
    /// RFC 3339, UTC.
    pub started: String,
    pub took_ms: u64,
    /// "served", "cancelled in probation", "not ready", "exec failed",
    /// "exited", "hook failed", "cancelled".
    pub outcome: String,
    /// Why it failed, in baton's words.
    pub reason: Option<String>,
}

impl History {
    /// What the core starts from: the serving release, and those that
    /// served, oldest first.
    pub(crate) fn releases(&self) -> Releases {
        let mut served: Vec<String> = Vec::new();
        for entry in self.deploys.iter().rev().filter(|e| e.outcome == "served") {
            if let Some(v) = &entry.version {
                served.retain(|s| s != v);
                served.push(v.clone());
            }
        }
        Releases {
            current: self.current.clone(),
            served,
        }
    }

    /// Adds a deploy that began `ago` before now (wall clock).
    pub(crate) fn add(&mut self, record: &Record, current: Option<String>, ago: Duration) {
        let started = SystemTime::now()
            .checked_sub(ago)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let kind = match (record.cause, record.rollback) {
            (_, true) => "rollback",
            (Cause::Initial, _) => "start",
            (Cause::Replace, _) => "replace",
            _ => "deploy",
        };
        let (outcome, reason) = match &record.outcome {
            Outcome::Succeeded { .. } => ("served", None),
            Outcome::Cancelled => ("cancelled", Some("baton is stopping".to_owned())),
            Outcome::Failed { reason, .. } => {
                let outcome = match reason {
                    Failure::ExitedInProbation(_) | Failure::Unhealthy { .. } => {
                        "cancelled in probation"
                    }
                    Failure::NotReady(_) => "not ready",
                    Failure::SpawnFailed(_) => "exec failed",
                    Failure::Exited(_) => "exited",
                    Failure::HookFailed { .. } => "hook failed",
                };
                (outcome, Some(reason.to_string()))
            }
        };
        self.format = FORMAT;
        self.current = current;
        self.deploys.insert(
            0,
            Entry {
                generation: record.generation,
                version: record.version.clone(),
                kind: kind.into(),
                started: humantime::format_rfc3339_seconds(started).to_string(),
                took_ms: record.took.as_millis() as u64,
                outcome: outcome.into(),
                reason,
            },
        );
        self.deploys.truncate(KEPT);
    }
}

/// The history in `dir`; a problem with the file comes back as text (the
/// history is then empty). With `set_aside`, a corrupt or foreign file is
/// moved to `history.json.corrupt` (the daemon does; `baton check` must
/// change nothing).
pub(crate) fn load(dir: &Path, set_aside: bool) -> (History, Option<String>) {
    let path = dir.join(FILE);
    let text = match fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return (History::default(), None),
        Err(e) => {
            let problem = format!(
                "cannot read {}: {e}; starting without history",
                path.display()
            );
            return (History::default(), Some(problem));
        }
    };
    let parsed = serde_json::from_slice::<History>(&text)
        .map_err(|e| e.to_string())
        .and_then(|h| match h.format {
            FORMAT => Ok(h),
            other => Err(format!("format {other}, not {FORMAT}")),
        })
        // Versions become paths: only names `deploy` would take.
        .and_then(|h| {
            let versions = h
                .current
                .iter()
                .chain(h.deploys.iter().flat_map(|e| &e.version));
            for v in versions {
                crate::config::valid_version(v)?;
            }
            Ok(h)
        });
    let why = match parsed {
        Ok(history) => return (history, None),
        Err(why) => why,
    };
    let aside = path.with_extension("json.corrupt");
    let what = match set_aside.then(|| fs::rename(&path, &aside)) {
        None => "left as it is".to_owned(),
        Some(Ok(())) => format!("moved to {}", aside.display()),
        Some(Err(e)) => format!("cannot move it aside: {e}"),
    };
    let problem = format!(
        "{} is unusable ({why}); {what}; starting without history",
        path.display()
    );
    (History::default(), Some(problem))
}

/// Writes `history` to `dir` atomically (the directory is made if
/// missing, 0700 when made).
pub(crate) fn save(dir: &Path, history: &History) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let path = dir.join(FILE);
    let temp = temp_path(&path);
    let text = serde_json::to_vec_pretty(history).expect("the history serializes");
    let written = (|| {
        // Reasons quote hook output, which may say more than it should.
        let mut file = {
            use std::os::unix::fs::OpenOptionsExt;
            fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&temp)?
        };
        file.write_all(&text)?;
        file.sync_all()?;
        fs::rename(&temp, &path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written
}

fn temp_path(path: &Path) -> PathBuf {
    path.with_extension(format!("json.tmp.{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notice::ExitStatus;
    use std::time::Instant;

    fn record(generation: u64, version: &str, outcome: Outcome) -> Record {
        Record {
            generation,
            version: Some(version.into()),
            cause: Cause::Deploy,
            rollback: false,
            outcome,
            began: Instant::now(),
            took: Duration::from_millis(1234),
        }
    }

    fn served(generation: u64) -> Outcome {
        Outcome::Succeeded {
            generation,
            ready_after: Duration::from_millis(200),
        }
    }

    #[test]
    fn saved_atomically_loaded_back_and_releases_derived() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let mut h = History::default();
        h.add(&record(1, "1", served(1)), Some("1".into()), Duration::ZERO);
        h.add(&record(2, "2", served(2)), Some("2".into()), Duration::ZERO);
        let broken = Outcome::Failed {
            generation: 3,
            reason: Failure::ExitedInProbation(ExitStatus::Code(3)),
        };
        h.add(&record(3, "3", broken), Some("2".into()), Duration::ZERO);
        save(&state, &h).unwrap();
        let (loaded, problem) = load(&state, true);
        assert_eq!((loaded.clone(), problem), (h, None));
        assert_eq!(loaded.deploys[0].outcome, "cancelled in probation");
        assert_eq!(
            loaded.deploys[0].reason.as_deref(),
            Some("exited with code 3 during probation")
        );
        assert_eq!(loaded.deploys[0].took_ms, 1234);
        assert_eq!(
            loaded.releases(),
            Releases {
                current: Some("2".into()),
                served: vec!["1".into(), "2".into()]
            }
        );
        // No temp file is left behind.
        let names: Vec<_> = fs::read_dir(&state)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, ["history.json"]);
    }

    #[test]
    fn a_corrupt_or_foreign_file_is_set_aside_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILE), "{ not json").unwrap();
        let (_, problem) = load(dir.path(), false);
        assert!(problem.unwrap().contains("left as it is"));
        assert!(dir.path().join(FILE).exists());
        let (history, problem) = load(dir.path(), true);
        assert_eq!(history, History::default());
        let problem = problem.unwrap();
        assert!(
            problem.contains("is unusable") && problem.contains("moved to"),
            "{problem}"
        );
        assert!(dir.path().join("history.json.corrupt").exists());
        fs::write(
            dir.path().join(FILE),
            r#"{"format":7,"current":null,"deploys":[]}"#,
        )
        .unwrap();
        let (_, problem) = load(dir.path(), true);
        assert!(problem.unwrap().contains("format 7, not 1"));
        // Missing: an empty history, nothing to report.
        let (history, problem) = load(&dir.path().join("none"), true);
        assert_eq!((history, problem), (History::default(), None));
    }

    #[test]
    fn at_most_the_last_hundred_are_kept() {
        let mut h = History::default();
        for g in 1..=150 {
            h.add(&record(g, "1", served(g)), Some("1".into()), Duration::ZERO);
        }
        assert_eq!(h.deploys.len(), KEPT);
        assert_eq!(h.deploys[0].generation, 150);
    }
}
