//! The subjects events travel under on NATS, and how names become subject
//! tokens.
//!
//! ```text
//! qvirt.events.<host>.<domain>.lifecycle          a DomainEvent
//! qvirt.events.<host>.<domain>.monitor.<EVENT>    a MonitorEvent (QMP name)
//! qvirt.events.<host>.%.lost                      a host's loss marker
//! ```
//!
//! A NATS subject token may not be empty nor hold `.`, `*`, `>` or
//! whitespace, so host, domain and event names are escaped ([`token`]):
//! ASCII letters, digits, `-` and `_` stand for themselves; every other
//! byte of the UTF-8 name becomes `%XX` (upper-case hex); the empty name
//! is `%-`. The escaping is one-to-one, so a subject filter on a name
//! matches exactly that name. A lone `%` is never an escaped name: it is
//! the domain token of host-level messages (loss markers). Filters built
//! from a subscription only narrow what the broker sends; the bus's own
//! filters still decide (a filter by UUID cannot be put in a subject).

/// The prefix of every event subject; the stream captures
/// `qvirt.events.>`.
pub const PREFIX: &str = "qvirt.events";

/// The domain token of host-level messages: never an escaped name.
pub const HOST_LEVEL: &str = "%";

/// The kind token of a lifecycle event.
pub const LIFECYCLE: &str = "lifecycle";
/// The kind token of a monitor event (followed by the event's name).
pub const MONITOR: &str = "monitor";
/// The kind token of a loss marker.
pub const LOST: &str = "lost";

/// The last token of a host's liveness event.
pub const HOST_EVENT: &str = "host";

/// `name` as one subject token (see the module docs).
pub fn token(name: &str) -> String {
    qvirt_registry::key::escape_with(name, b'%')
}

/// The name a [`token`] stands for, or `None` for a token [`token`]
/// never makes.
pub fn untoken(token: &str) -> Option<String> {
    qvirt_registry::key::unescape_with(token, b'%')
}

/// The subject of a lifecycle event of `domain` on `host`.
pub fn lifecycle(host: &str, domain: &str) -> String {
    format!("{PREFIX}.{}.{}.{LIFECYCLE}", token(host), token(domain))
}

/// The subject of monitor event `event` of `domain` on `host`.
pub fn monitor(host: &str, domain: &str, event: &str) -> String {
    format!(
        "{PREFIX}.{}.{}.{MONITOR}.{}",
        token(host),
        token(domain),
        token(event)
    )
}

/// The subject of `host`'s loss markers.
pub fn lost(host: &str) -> String {
    format!("{PREFIX}.{}.{HOST_LEVEL}.{LOST}", token(host))
}

/// The subject of a host's liveness event (a `HostEvent`, published by
/// the fleet buses beside the gateways from the registry's heartbeats).
pub fn host_event(host: &str) -> String {
    format!("{PREFIX}.{}.{HOST_LEVEL}.{HOST_EVENT}", token(host))
}

/// Whether `subject` is a host's liveness event.
pub fn is_host_event(subject: &str) -> bool {
    let mut parts = subject.rsplitn(3, '.');
    parts.next() == Some(HOST_EVENT) && parts.next() == Some(HOST_LEVEL)
}

/// What a fleet subscription asks the broker for; `None` fields match
/// every value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubjectFilter<'a> {
    /// One host.
    pub host: Option<&'a str>,
    /// One domain, by name.
    pub domain: Option<&'a str>,
    /// One monitor event name (monitor subscriptions only).
    pub event: Option<&'a str>,
}

impl SubjectFilter<'_> {
    fn host_token(&self) -> String {
        self.host.map_or_else(|| "*".to_owned(), token)
    }

    /// The subjects of lifecycle events it matches, and of the loss
    /// markers of the hosts it covers (two filters that never overlap, as
    /// a consumer's `filter_subjects` must).
    pub fn lifecycle_subjects(&self) -> Vec<String> {
        let domain = self.domain.map_or_else(|| "*".to_owned(), token);
        let host = self.host_token();
        vec![
            format!("{PREFIX}.{host}.{domain}.{LIFECYCLE}"),
            format!("{PREFIX}.{host}.{HOST_LEVEL}.{LOST}"),
            // A domain filter does not exclude host events.
            format!("{PREFIX}.{host}.{HOST_LEVEL}.{HOST_EVENT}"),
        ]
    }

    /// The subjects of monitor events it matches, and of the loss markers
    /// of the hosts it covers.
    pub fn monitor_subjects(&self) -> Vec<String> {
        let domain = self.domain.map_or_else(|| "*".to_owned(), token);
        let host = self.host_token();
        let event = self.event.map_or_else(|| "*".to_owned(), token);
        vec![
            format!("{PREFIX}.{host}.{domain}.{MONITOR}.{event}"),
            format!("{PREFIX}.{host}.{HOST_LEVEL}.{LOST}"),
        ]
    }
}

/// Whether `subject` is a loss marker's.
pub fn is_lost(subject: &str) -> bool {
    let mut parts = subject.rsplitn(3, '.');
    parts.next() == Some(LOST) && parts.next() == Some(HOST_LEVEL)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn test_tokens_are_valid_subject_tokens() {
        let cases = [
            ("web-1", "web-1"),
            ("a.b", "a%2Eb"),
            ("*", "%2A"),
            (">", "%3E"),
            ("two words", "two%20words"),
            ("tab\there", "tab%09here"),
            ("100%", "100%25"),
            ("", "%-"),
            ("é", "%C3%A9"),
        ];
        for (name, want) in cases {
            assert_eq!(token(name), want, "{name:?}");
            assert_eq!(untoken(want).as_deref(), Some(name), "{want:?}");
        }
        // Tokens escaping never makes.
        for bad in ["%", "%2", "%zz", "%41", "a.b", "", "%2a"] {
            assert_eq!(untoken(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn test_subjects() {
        assert_eq!(lifecycle("h1", "vm.1"), "qvirt.events.h1.vm%2E1.lifecycle");
        assert_eq!(
            monitor("h1", "vm", "BLOCK_JOB_READY"),
            "qvirt.events.h1.vm.monitor.BLOCK_JOB_READY"
        );
        assert_eq!(lost("h 1"), "qvirt.events.h%201.%.lost");
        assert!(is_lost(&lost("x.y")));
        assert!(!is_lost(&lifecycle("x", "%")));
        let f = SubjectFilter {
            host: Some("h1"),
            domain: None,
            event: Some("STOP"),
        };
        assert_eq!(
            f.monitor_subjects(),
            ["qvirt.events.h1.*.monitor.STOP", "qvirt.events.h1.%.lost"]
        );
        assert_eq!(
            SubjectFilter::default().lifecycle_subjects(),
            [
                "qvirt.events.*.*.lifecycle",
                "qvirt.events.*.%.lost",
                "qvirt.events.*.%.host"
            ]
        );
        assert_eq!(host_event("web.1"), "qvirt.events.web%2E1.%.host");
        assert!(is_host_event(&host_event("x.y")));
        assert!(!is_host_event(&lifecycle("x", "%")));
        assert!(!is_lost(&host_event("x")));
    }

    proptest! {
        #[test]
        fn prop_token_round_trips_and_is_one_token(name in ".{0,40}") {
            let t = token(&name);
            prop_assert!(!t.is_empty());
            prop_assert!(t.bytes().all(|b| b.is_ascii_graphic() && b != b'.' && b != b'*' && b != b'>'));
            prop_assert_ne!(&t, HOST_LEVEL);
            prop_assert_eq!(untoken(&t), Some(name));
        }
    }
}
