//! cgroup v2 containment (issue 8): each generation runs in a cgroup of its
//! own, `<base>/gen-<N>`, which nothing started inside can leave without
//! write access to another cgroup. Its kill is `cgroup.kill` (every process
//! in it, whatever its process group or parent), and it is gone only when
//! `cgroup.events` says `populated 0`; `memory.max`, `cpu.max` and
//! `pids.max` come from `[app]`. Without a usable cgroup, baton contains
//! generations by process group and its subreaper sweep (`daemon.rs`).
//!
//! The kernel's rules that shape this (Documentation/admin-guide/cgroup-v2.rst):
//! a cgroup with controllers enabled for its children ("subtree_control")
//! may hold no processes itself, so a baton that lives in its base directory
//! first moves itself into the leaf `<base>/supervisor`; a change of
//! `cgroup.events` is a "file modified" event, which baton watches with
//! inotify.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use nix::unistd::Pid;

use crate::config::{CgroupLimit, CgroupPlace};

/// Where baton moves itself when it lives in its base directory.
const SUPERVISOR: &str = "supervisor";

/// The cgroup v2 directory the generations' cgroups are made in.
#[derive(Debug)]
pub(crate) struct Cgroups {
    base: PathBuf,
    /// `base` as /proc/PID/cgroup names it (its path in the hierarchy).
    named: Option<PathBuf>,
    /// baton made `base` (a configured path that did not exist) and removes
    /// it when it exits.
    made: bool,
}

/// How generations are contained, as decided at start.
#[derive(Debug)]
pub(crate) enum Containment {
    Cgroups(Cgroups),
    /// Process groups only; why no cgroup is used.
    ProcessGroups(String),
}

/// What a generation's cgroup shows of it, for `baton status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    /// `memory.current`, or the processes' resident sets where the memory
    /// controller is not enabled.
    pub memory_bytes: Option<u64>,
    /// `usage_usec` of `cpu.stat` (always present in cgroup v2).
    pub cpu_usec: Option<u64>,
    pub processes: usize,
}

fn context(what: String) -> impl FnOnce(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
}

impl Containment {
    /// Decides where generations go, per `[app] cgroup`. An explicit
    /// directory that cannot be used is an error (what to do included);
    /// `auto` falls back to process groups and says why.
    pub(crate) fn open(place: &CgroupPlace, limits: &[CgroupLimit]) -> Result<Containment, String> {
        let cgroups = match place {
            CgroupPlace::Off => {
                return Ok(Containment::ProcessGroups("[app] cgroup = \"off\"".into()))
            }
            CgroupPlace::At(dir) => at(dir)?,
            CgroupPlace::Auto => match auto() {
                Ok(cgroups) => cgroups,
                Err(why) if limits.is_empty() => return Ok(Containment::ProcessGroups(why)),
                Err(why) => {
                    return Err(format!(
                        "[app] {} needs a cgroup, and none is usable: {why}",
                        limits[0].key
                    ))
                }
            },
        };
        let usable = cgroups
            .check_leftovers()
            .and_then(|()| cgroups.enable(limits));
        if let Err(e) = usable {
            cgroups.close();
            return Err(e);
        }
        Ok(Containment::Cgroups(cgroups))
    }

    pub(crate) fn cgroups(&self) -> Option<&Cgroups> {
        match self {
            Containment::Cgroups(c) => Some(c),
            Containment::ProcessGroups(_) => None,
        }
    }
}

/// baton's own cgroup, when it may be used: on a cgroup v2 hierarchy, not
/// its root, writable, and holding baton alone (a service of its own, a
/// container's init; never a login session's scope). `Err(why not)`.
fn auto() -> Result<Cgroups, String> {
    let own = own_cgroup().ok_or("no cgroup v2 hierarchy is mounted")?;
    if !own.join("cgroup.events").exists() {
        return Err(format!(
            "baton runs in the root cgroup ({}); set [app] cgroup to a directory for it",
            own.display()
        ));
    }
    let me = std::process::id();
    let procs = read_procs(&own).map_err(|e| format!("cannot read {}: {e}", own.display()))?;
    if procs != [me] {
        return Err(format!(
            "baton's cgroup {} holds other processes too; run baton as a service of its own \
             (systemd: Delegate=yes) or set [app] cgroup",
            own.display()
        ));
    }
    if nix::unistd::access(&own, nix::unistd::AccessFlags::W_OK).is_err() {
        return Err(format!(
            "baton may not write its cgroup {} (systemd: Delegate=yes)",
            own.display()
        ));
    }
    let cgroups = Cgroups::new(own, false);
    cgroups.leave_base()?;
    Ok(cgroups)
}

/// A configured directory: made if missing (its parent must be a cgroup v2
/// directory), else it must be one. `Err` says what to do.
fn at(dir: &Path) -> Result<Cgroups, String> {
    let on_cgroup2 = |p: &Path| {
        nix::sys::statfs::statfs(p)
            .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
    };
    let mut made = false;
    if !dir.exists() {
        let parent = dir.parent().unwrap_or(Path::new("/"));
        if !on_cgroup2(parent) {
            return Err(format!(
                "[app] cgroup: {} is not a cgroup v2 directory (see `grep cgroup2 \
                 /proc/self/mountinfo` for where the hierarchy is mounted)",
                parent.display()
            ));
        }
        fs::create_dir(dir)
            .map_err(|e| format!("[app] cgroup: cannot create {}: {e}", dir.display()))?;
        made = true;
    } else if !on_cgroup2(dir) {
        return Err(format!(
            "[app] cgroup: {} is not a cgroup v2 directory (see `grep cgroup2 \
             /proc/self/mountinfo` for where the hierarchy is mounted)",
            dir.display()
        ));
    }
    let cgroups = Cgroups::new(dir.to_owned(), made);
    if own_cgroup().as_deref() == Some(dir) {
        cgroups
            .leave_base()
            .map_err(|e| format!("[app] cgroup: {e}"))?;
    }
    Ok(cgroups)
}

/// baton's own cgroup v2 directory: its path in /proc/self/cgroup ("0::"),
/// under the mount point /proc/self/mountinfo gives for cgroup2 (on a
/// hybrid layout, /sys/fs/cgroup/unified).
fn own_cgroup() -> Option<PathBuf> {
    let cgroups = fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?;
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let (root, mount) = v2_mount(&mountinfo)?;
    let relative = Path::new(path).strip_prefix(&root).ok()?;
    Some(mount.join(relative))
}

/// How /proc/PID/cgroup names the directory `dir` (the reverse of
/// [`own_cgroup`]).
fn named(dir: &Path) -> Option<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let (root, mount) = v2_mount(&mountinfo)?;
    Some(root.join(dir.strip_prefix(&mount).ok()?))
}

/// (root, mount point) of the first cgroup2 mount in a mountinfo text.
fn v2_mount(mountinfo: &str) -> Option<(PathBuf, PathBuf)> {
    mountinfo.lines().find_map(|line| {
        // "36 25 0:31 / /sys/fs/cgroup rw,... - cgroup2 cgroup2 rw,..."
        let (mount, fs) = line.split_once(" - ")?;
        if fs.split_whitespace().next() != Some("cgroup2") {
            return None;
        }
        let mut fields = mount.split_whitespace().skip(3);
        let (root, point) = (fields.next()?, fields.next()?);
        Some((unescape(root).into(), unescape(point).into()))
    })
}

/// mountinfo writes space, tab, newline and backslash as octal escapes.
fn unescape(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

fn read_procs(dir: &Path) -> io::Result<Vec<u32>> {
    let text = fs::read_to_string(dir.join("cgroup.procs"))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    fs::write(path, value).map_err(context(format!(
        "cannot write {value:?} to {}",
        path.display()
    )))
}

impl Cgroups {
    fn new(base: PathBuf, made: bool) -> Cgroups {
        Cgroups {
            named: named(&base),
            base,
            made,
        }
    }

    pub(crate) fn base(&self) -> &Path {
        &self.base
    }

    /// The cgroup of `generation`.
    pub(crate) fn dir(&self, generation: u64) -> PathBuf {
        self.base.join(format!("gen-{generation}"))
    }

    /// Moves baton out of `base` into the leaf `base/supervisor`: a cgroup
    /// that hands controllers to its children may hold no process itself.
    fn leave_base(&self) -> Result<(), String> {
        let leaf = self.base.join(SUPERVISOR);
        match fs::create_dir(&leaf) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot create {}: {e}", leaf.display())),
        }
        write(&leaf.join("cgroup.procs"), &std::process::id().to_string())
            .map_err(|e| e.to_string())
    }

    /// Generation cgroups left by an earlier run: empty ones are removed;
    /// one that still holds processes stops baton from starting (they may
    /// serve old code and hold the ports; baton did not start them).
    fn check_leftovers(&self) -> Result<(), String> {
        let entries = fs::read_dir(&self.base)
            .map_err(|e| format!("cannot read the cgroup {}: {e}", self.base.display()))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let is_generation = name.to_str().is_some_and(|n| n.starts_with("gen-"));
            if !is_generation || !entry.path().is_dir() {
                continue;
            }
            let dir = entry.path();
            let procs = read_procs(&dir).unwrap_or_default();
            if procs.is_empty() {
                let _ = fs::remove_dir(&dir);
                continue;
            }
            let pids: Vec<String> = procs.iter().map(u32::to_string).collect();
            return Err(format!(
                "the cgroup {} still holds processes of an earlier baton (pids {}): they may \
                 still serve and hold the listeners. Stop them (echo 1 > {}/cgroup.kill) and \
                 start baton again",
                dir.display(),
                pids.join(" "),
                dir.display()
            ));
        }
        Ok(())
    }

    /// Enables the controllers `limits` need for the generations' cgroups
    /// (`base/cgroup.subtree_control`).
    pub(crate) fn enable(&self, limits: &[CgroupLimit]) -> Result<(), String> {
        let read = |file: &str| fs::read_to_string(self.base.join(file)).unwrap_or_default();
        let enabled = read("cgroup.subtree_control");
        for limit in limits {
            if enabled.split_whitespace().any(|c| c == limit.controller) {
                continue;
            }
            let available = read("cgroup.controllers");
            if !available.split_whitespace().any(|c| c == limit.controller) {
                return Err(format!(
                    "[app] {} needs the {} controller, which the cgroup {} does not have \
                     (it has: {}). Under systemd give the unit Delegate=yes; elsewhere enable \
                     it in the parent's cgroup.subtree_control (on a hybrid layout it may be \
                     bound to cgroup v1)",
                    limit.key,
                    limit.controller,
                    self.base.display(),
                    if available.trim().is_empty() {
                        "none"
                    } else {
                        available.trim()
                    }
                ));
            }
            let file = self.base.join("cgroup.subtree_control");
            write(&file, &format!("+{}", limit.controller)).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Makes the cgroup of `generation` with `limits` written, and opens
    /// its `cgroup.procs` for the child to move itself into (CLOEXEC).
    /// Their controllers are enabled already (at start, and when a reload
    /// is admitted: the daemon's `runnable`).
    pub(crate) fn create(&self, generation: u64, limits: &[CgroupLimit]) -> io::Result<OwnedFd> {
        let dir = self.dir(generation);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(context(format!(
                    "cannot create the cgroup {}",
                    dir.display()
                ))(e))
            }
        }
        for limit in limits {
            write(&dir.join(limit.file), &limit.value)?;
        }
        let procs = dir.join("cgroup.procs");
        let file = fs::OpenOptions::new()
            .write(true)
            .open(&procs)
            .map_err(context(format!("cannot open {}", procs.display())))?;
        Ok(OwnedFd::from(file))
    }

    /// SIGKILL to every process in the cgroup of `generation`
    /// (`cgroup.kill`, Linux 5.14; before that, to each pid it lists).
    pub(crate) fn kill(&self, generation: u64) {
        let dir = self.dir(generation);
        if fs::write(dir.join("cgroup.kill"), "1").is_ok() {
            return;
        }
        for pid in read_procs(&dir).unwrap_or_default() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// The generation whose cgroup `pid` is in, if it is in one of them.
    pub(crate) fn generation_of(&self, pid: Pid) -> Option<u64> {
        let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        let path = Path::new(text.lines().find_map(|l| l.strip_prefix("0::"))?.trim_end());
        if path.parent()? != self.named.as_deref()? {
            return None;
        }
        path.file_name()?
            .to_str()?
            .strip_prefix("gen-")?
            .parse()
            .ok()
    }

    /// The processes in the cgroup of `generation`.
    pub(crate) fn procs(&self, generation: u64) -> Vec<i32> {
        let procs = read_procs(&self.dir(generation)).unwrap_or_default();
        procs.into_iter().map(|p| p as i32).collect()
    }

    /// Whether the cgroup of `generation` still holds a process (`None`:
    /// it cannot be read, e.g. it was removed).
    pub(crate) fn populated(&self, generation: u64) -> Option<bool> {
        let events = fs::read_to_string(self.dir(generation).join("cgroup.events")).ok()?;
        events
            .lines()
            .find_map(|l| l.strip_prefix("populated "))
            .map(|v| v.trim() != "0")
    }

    /// Removes the (empty) cgroup of `generation`; false if it is still
    /// there.
    pub(crate) fn remove(&self, generation: u64) -> bool {
        match fs::remove_dir(self.dir(generation)) {
            Ok(()) => true,
            Err(e) => e.kind() == io::ErrorKind::NotFound,
        }
    }

    pub(crate) fn usage(&self, generation: u64) -> Usage {
        let dir = self.dir(generation);
        let procs = read_procs(&dir).unwrap_or_default();
        let memory = fs::read_to_string(dir.join("memory.current"))
            .ok()
            .and_then(|m| m.trim().parse().ok())
            .or_else(|| procs.iter().map(|&p| crate::procfs::rss_bytes(p)).sum());
        let cpu = fs::read_to_string(dir.join("cpu.stat")).ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse().ok())
        });
        Usage {
            memory_bytes: memory,
            cpu_usec: cpu,
            processes: procs.len(),
        }
    }

    /// At exit: the base directory goes too if baton made it.
    pub(crate) fn close(&self) {
        if self.made {
            let _ = fs::remove_dir(&self.base);
        }
    }
}

impl Usage {
    /// What /proc shows of one process (a generation without a cgroup).
    pub(crate) fn of_process(pid: u32) -> Usage {
        Usage {
            memory_bytes: crate::procfs::rss_bytes(pid),
            cpu_usec: crate::procfs::cpu_usec(pid),
            processes: 1,
        }
    }
}

/// Tells which generations' cgroups changed (`cgroup.events` written):
/// one inotify instance, one watch per generation.
pub(crate) struct Watcher {
    inotify: Inotify,
    watches: HashMap<WatchDescriptor, u64>,
}

impl AsRawFd for Watcher {
    fn as_raw_fd(&self) -> RawFd {
        self.inotify.as_fd().as_raw_fd()
    }
}

impl Watcher {
    pub(crate) fn new() -> io::Result<Watcher> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        Ok(Watcher {
            inotify,
            watches: HashMap::new(),
        })
    }

    /// Watches the `cgroup.events` of `generation`'s cgroup `dir`.
    pub(crate) fn watch(&mut self, generation: u64, dir: &Path) -> io::Result<()> {
        let wd = self
            .inotify
            .add_watch(&dir.join("cgroup.events"), AddWatchFlags::IN_MODIFY)?;
        self.watches.insert(wd, generation);
        Ok(())
    }

    /// The generations whose cgroups changed since the last call (each
    /// once); removed cgroups drop their watch.
    pub(crate) fn changed(&mut self) -> Vec<u64> {
        let mut changed = Vec::new();
        while let Ok(events) = self.inotify.read_events() {
            if events.is_empty() {
                break;
            }
            for event in events {
                let generation = self.watches.get(&event.wd).copied();
                if event.mask.contains(AddWatchFlags::IN_IGNORED) {
                    self.watches.remove(&event.wd);
                }
                if let Some(g) = generation.filter(|g| !changed.contains(g)) {
                    changed.push(g);
                }
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_v2_mount_of_a_hybrid_layout() {
        let mountinfo = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(
            v2_mount(mountinfo),
            Some(("/".into(), "/sys/fs/cgroup/unified".into()))
        );
        let unified =
            "36 25 0:31 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            v2_mount(unified),
            Some(("/".into(), "/sys/fs/cgroup".into()))
        );
        let spaced = "36 25 0:31 / /mnt/my\\040cgroups rw - cgroup2 none rw\n";
        assert_eq!(
            v2_mount(spaced),
            Some(("/".into(), "/mnt/my cgroups".into()))
        );
        assert_eq!(
            v2_mount("35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"),
            None
        );
    }
}
