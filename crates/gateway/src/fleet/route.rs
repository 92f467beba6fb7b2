//! Where a call on one domain goes: the routing rule of a fleet gateway.
//!
//! - `host` given: that host; unknown: HOST_NOT_FOUND; without a live
//!   heartbeat: the domain as last known (GetDomain answers with it),
//!   else HOST_UNREACHABLE.
//! - no `host`: the one host whose domain the name or UUID names; two or
//!   more: DOMAIN_AMBIGUOUS naming them; none: DOMAIN_NOT_FOUND.

use super::FleetError;
use super::index::{Entry, Index};

/// Where a call goes.
#[derive(Debug, Clone, Copy)]
pub enum Decision<'a> {
    /// To this live host.
    Host(&'a str),
    /// Nowhere: the domain's host has no live heartbeat; this is the
    /// domain as last known.
    Stale(&'a Entry),
}

/// The host a call naming `domain` (and `host`, empty when not given)
/// goes to.
pub fn route<'a>(index: &'a Index, domain: &str, host: &str) -> Result<Decision<'a>, FleetError> {
    if domain.is_empty() {
        return Err(FleetError::DomainRequired);
    }
    if !host.is_empty() {
        let Some((id, h)) = index.hosts.get_key_value(host) else {
            return Err(FleetError::HostNotFound {
                host: bounded(host),
            });
        };
        if h.live {
            return Ok(Decision::Host(id));
        }
        return match index.lookup_on(host, domain) {
            Some(e) => Ok(Decision::Stale(e)),
            None => Err(FleetError::HostUnreachable {
                host: bounded(host),
            }),
        };
    }
    match index.lookup(domain).as_slice() {
        [] => Err(FleetError::DomainNotFound {
            domain: bounded(domain),
        }),
        [e] => match index.hosts.get(&e.host) {
            Some(h) if h.live => Ok(Decision::Host(&e.host)),
            _ => Ok(Decision::Stale(e)),
        },
        many => Err(FleetError::DomainAmbiguous {
            domain: bounded(domain),
            hosts: many.iter().map(|e| e.host.clone()).collect(),
        }),
    }
}

/// At most 256 bytes of a client's string, for messages.
pub fn bounded(text: &str) -> String {
    let mut end = text.len().min(256);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use qvirt_proto::v1::DomainState::{Running, Shutoff};

    use super::super::index::tests::{U1, U2, U3, domain, snapshot};
    use super::*;

    fn index() -> Index {
        Index::build(
            &snapshot(
                &[
                    ("h1", true, 4096, 0),
                    ("h2", true, 4096, 0),
                    ("h3", false, 4096, 0),
                ],
                &[
                    domain("h1", "web", U1, Shutoff, 128),
                    domain("h2", "web", U2, Running, 128),
                    domain("h3", "db", U3, Running, 128),
                ],
            ),
            true,
            None,
        )
    }

    fn host(d: Result<Decision<'_>, FleetError>) -> String {
        match d {
            Ok(Decision::Host(h)) => h.to_owned(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn test_a_name_on_one_host_or_a_uuid_goes_to_its_host() {
        let index = index();
        assert_eq!(host(route(&index, U2, "")), "h2");
        assert_eq!(host(route(&index, &U1.to_uppercase(), "")), "h1");
        assert_eq!(host(route(&index, "web", "h1")), "h1");
        // A live host is asked even for a name the view does not show:
        // it answers for itself.
        assert_eq!(host(route(&index, "new", "h2")), "h2");
    }

    #[test]
    fn test_a_name_on_two_hosts_is_ambiguous_naming_them() {
        let index = index();
        match route(&index, "web", "") {
            Err(FleetError::DomainAmbiguous { domain, hosts }) => {
                assert_eq!(domain, "web");
                assert_eq!(hosts, ["h1", "h2"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn test_unknown_names_and_hosts_are_not_found() {
        let index = index();
        assert!(matches!(
            route(&index, "nope", ""),
            Err(FleetError::DomainNotFound { .. })
        ));
        assert!(matches!(
            route(&index, "web", "h9"),
            Err(FleetError::HostNotFound { host }) if host == "h9"
        ));
        assert!(matches!(
            route(&index, "", "h1"),
            Err(FleetError::DomainRequired)
        ));
    }

    #[test]
    fn test_a_host_without_heartbeat_gives_the_last_known_domain_or_unreachable() {
        let index = index();
        for (key, h) in [("db", ""), ("db", "h3"), (U3, "")] {
            match route(&index, key, h) {
                Ok(Decision::Stale(e)) => {
                    assert_eq!(e.host, "h3");
                    assert_eq!(e.name, "db");
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            route(&index, "web", "h3"),
            Err(FleetError::HostUnreachable { host }) if host == "h3"
        ));
    }

    #[test]
    fn test_bounded_cuts_on_a_char_boundary() {
        let long = "é".repeat(200);
        let b = bounded(&long);
        assert!(b.len() <= 256);
        assert!(long.starts_with(&b));
    }
}
