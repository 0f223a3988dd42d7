//! Where `baton` and the example app are, and building them in the profile
//! (and for the target) of the `baton` under test.
//!
//! cargo puts binaries in `<target dir>/[<triple>/]<profile dir>/`, examples
//! in its `examples/` subdirectory. From the directory of a binary we know
//! the target directory, the `--target` triple and the profile, so the
//! example app can be built to match: `cargo test --release` tests a
//! release `baton` with a release example app, in whatever target
//! directory it uses.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::{Context, Error, Result};

/// The programs the tests and the bench run.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub baton: PathBuf,
    /// The example app (`examples/hello.rs`).
    pub hello: PathBuf,
}

impl Binaries {
    /// The binaries in the profile directory `dir` (where cargo puts `baton`).
    pub fn in_dir(dir: &Path) -> Binaries {
        Binaries {
            baton: dir.join("baton"),
            hello: dir.join("examples").join("hello"),
        }
    }

    /// For the integration tests: `baton` is `env!("CARGO_BIN_EXE_baton")`,
    /// which cargo built for them; the example app is built once per
    /// process beside it, in the same profile (cargo only builds examples
    /// for `cargo test` without target filters, and a stale one would be
    /// tested without a word). Panics if the build fails: no test can run.
    pub fn for_tests(baton: &str) -> &'static Binaries {
        static BUILT: OnceLock<Binaries> = OnceLock::new();
        BUILT.get_or_init(|| {
            let dir = Path::new(baton).parent().expect("baton has a directory");
            let binaries = Binaries {
                baton: baton.into(),
                ..Binaries::in_dir(dir)
            };
            Profile::of(dir)
                .build(&["--example", "hello"])
                .and_then(|()| binaries.check())
                .unwrap_or_else(|e| panic!("{e}"));
            binaries
        })
    }

    /// An error naming the command that builds what is missing.
    pub fn check(&self) -> Result<()> {
        for path in [&self.baton, &self.hello] {
            if !path.exists() {
                let dir = self.baton.parent().unwrap_or(Path::new("."));
                return Err(Error::Failed(format!(
                    "{} is missing: build it with `{}`",
                    path.display(),
                    Profile::of(dir).command(&["--bin", "baton", "--example", "hello"])
                )));
            }
        }
        Ok(())
    }
}

/// How cargo built what is in one profile directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    pub target_dir: PathBuf,
    /// The `--target` triple, if one was given.
    pub triple: Option<String>,
    /// The profile's name (`dev` builds into `debug/`).
    pub name: String,
}

impl Profile {
    /// Reads the profile from a directory cargo built into:
    /// `<target dir>/[<triple>/]<profile dir>`. The target directory is the
    /// one holding cargo's `CACHEDIR.TAG`.
    pub fn of(dir: &Path) -> Profile {
        let dir_name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
        let name = match dir_name.as_deref() {
            None | Some("debug") => "dev".to_owned(),
            Some(other) => other.to_owned(),
        };
        let above = dir.parent().unwrap_or(Path::new("."));
        let tagged = |d: &Path| d.join("CACHEDIR.TAG").exists();
        let (target_dir, triple) = match above.parent() {
            Some(top) if !tagged(above) && tagged(top) => (
                top.to_owned(),
                above.file_name().map(|n| n.to_string_lossy().into_owned()),
            ),
            _ => (above.to_owned(), None),
        };
        Profile {
            target_dir,
            triple,
            name,
        }
    }

    /// `cargo build -p baton <what>` in this profile, for this target, into
    /// this target directory.
    pub fn build(&self, what: &[&str]) -> Result<()> {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(&cargo)
            .args(self.args(what))
            .arg("--quiet")
            .status()
            .context(|| format!("cannot run {}", Path::new(&cargo).display()))?;
        if !status.success() {
            return Err(Error::Failed(format!(
                "`{}` failed ({status})",
                self.command(what)
            )));
        }
        Ok(())
    }

    fn args(&self, what: &[&str]) -> Vec<String> {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let mut args: Vec<String> = ["build", "-p", "baton"]
            .into_iter()
            .chain(what.iter().copied())
            .map(str::to_owned)
            .collect();
        args.extend(["--profile".into(), self.name.clone()]);
        if let Some(triple) = &self.triple {
            args.extend(["--target".into(), triple.clone()]);
        }
        args.extend([
            "--target-dir".into(),
            self.target_dir.display().to_string(),
            "--manifest-path".into(),
            manifest.display().to_string(),
        ]);
        args
    }

    /// The build as a command line, for messages.
    pub fn command(&self, what: &[&str]) -> String {
        format!("cargo {}", self.args(what).join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_and_target_come_from_the_directory() {
        let top = tempfile::tempdir().unwrap();
        std::fs::write(top.path().join("CACHEDIR.TAG"), "").unwrap();
        let release = Profile::of(&top.path().join("release"));
        assert_eq!(release.name, "release");
        assert_eq!(release.triple, None);
        assert_eq!(release.target_dir, top.path());
        let debug = Profile::of(&top.path().join("debug"));
        assert_eq!(debug.name, "dev");
        let musl = top.path().join("x86_64-unknown-linux-musl");
        std::fs::create_dir(&musl).unwrap();
        let cross = Profile::of(&musl.join("release"));
        assert_eq!(cross.triple.as_deref(), Some("x86_64-unknown-linux-musl"));
        assert_eq!(cross.target_dir, top.path());
        assert!(cross
            .command(&["--example", "hello"])
            .contains("--profile release --target x86_64-unknown-linux-musl --target-dir"));
    }
}
