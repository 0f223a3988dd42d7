//! The sd_notify protocol itself (man sd_notify), without sockets: what a
//! child's datagram means to baton, and what baton says to its own service
//! manager. Plain data, so both [`core`](crate::core) and
//! [`notify`](crate::notify) (the sockets) can use it without depending on
//! each other.

use std::time::Duration;

/// The fields of one notify datagram that baton acts on. Unknown keys are
/// ignored, as systemd does.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Message {
    pub ready: bool,
    pub stopping: bool,
    pub status: Option<String>,
    /// Sent by apps written for systemd; baton ignores it with a warning.
    pub mainpid: Option<String>,
}

impl Message {
    /// Parses newline-separated `KEY=VALUE` assignments.
    pub(crate) fn parse(datagram: &[u8]) -> Message {
        let text = String::from_utf8_lossy(datagram);
        let mut m = Message::default();
        for line in text.split('\n') {
            match line.split_once('=') {
                Some(("READY", "1")) => m.ready = true,
                Some(("STOPPING", "1")) => m.stopping = true,
                Some(("STATUS", s)) => m.status = Some(s.to_owned()),
                Some(("MAINPID", p)) => m.mainpid = Some(p.to_owned()),
                _ => {}
            }
        }
        m
    }
}

/// Messages for the service manager that started baton (sd_notify).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Upstream {
    /// The first generation is serving: `READY=1` + `MAINPID`.
    Ready {
        status: String,
    },
    /// A deploy began: `RELOADING=1` + `MONOTONIC_USEC`.
    Reloading,
    /// A deploy ended either way: `READY=1` + `STATUS=`.
    Reloaded {
        status: String,
    },
    Status(String),
    Stopping,
    /// A stop or deploy may take this long: `EXTEND_TIMEOUT_USEC`, so a
    /// long drain is not cut short by systemd's own timeout.
    ExtendTimeout(Duration),
}

/// The datagram for `message`. `RELOADING=1` without `MONOTONIC_USEC` is
/// ignored by systemd ≥ 253, so it always carries one.
pub(crate) fn render(message: &Upstream, mainpid: u32, monotonic_usec: u64) -> String {
    match message {
        Upstream::Ready { status } => format!("READY=1\nMAINPID={mainpid}\nSTATUS={status}"),
        Upstream::Reloading => format!("RELOADING=1\nMONOTONIC_USEC={monotonic_usec}"),
        Upstream::Reloaded { status } => format!("READY=1\nSTATUS={status}"),
        Upstream::Status(status) => format!("STATUS={status}"),
        Upstream::Stopping => "STOPPING=1\nSTATUS=stopping".to_owned(),
        Upstream::ExtendTimeout(d) => format!("EXTEND_TIMEOUT_USEC={}", d.as_micros()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sd_notify_assignments() {
        let m = Message::parse(b"READY=1\nSTATUS=serving 3 clients\nX_CUSTOM=1\nMAINPID=42");
        assert!(m.ready);
        assert!(!m.stopping);
        assert_eq!(m.status.as_deref(), Some("serving 3 clients"));
        assert_eq!(m.mainpid.as_deref(), Some("42"));
        assert!(Message::parse(b"STOPPING=1\n").stopping);
        assert!(!Message::parse(b"READY=0").ready);
        assert_eq!(Message::parse(b"garbage\xff\n"), Message::default());
    }

    #[test]
    fn renders_upstream_messages() {
        assert_eq!(
            render(
                &Upstream::Ready {
                    status: "up".into()
                },
                7,
                0
            ),
            "READY=1\nMAINPID=7\nSTATUS=up"
        );
        assert_eq!(
            render(&Upstream::Reloading, 7, 123),
            "RELOADING=1\nMONOTONIC_USEC=123"
        );
    }
}
