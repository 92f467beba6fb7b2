//! ListDomains answered from the view: every host's domains, sorted by
//! (name, host), filtered by `host`, `states` and `name_prefix`, a page
//! at a time with an opaque token that names the last (name, host) given
//! and the filter it belongs to. Any gateway accepts another's token: it
//! holds no state of the gateway that issued it.

use prost::Message as _;
use qvirt_proto::v1::{ListDomainsRequest, ListDomainsResponse};
use sha2::Digest as _;

use super::FleetError;
use super::index::Index;
use super::route::bounded;

/// Domains in a page when the request asks for 0.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// The most domains in a page.
pub const MAX_PAGE_SIZE: usize = 1000;
/// The longest `name_prefix`, bytes.
pub const MAX_NAME_PREFIX_BYTES: usize = 256;
/// The most bytes of domains in one answer (as the supervisor's budget),
/// so it stays under gRPC's default 4 MiB message limit.
pub const ANSWER_BUDGET: usize = 3 << 20;
/// The longest `page_token` accepted, characters.
const MAX_PAGE_TOKEN_CHARS: usize = 2048;
const PAGE_TOKEN_VERSION: u8 = 1;

/// One page of the fleet's domains.
pub fn list(
    index: &Index,
    request: &ListDomainsRequest,
) -> Result<ListDomainsResponse, FleetError> {
    let size = match usize::try_from(request.page_size) {
        Err(_) => return Err(invalid("page_size", "page_size must not be negative")),
        Ok(0) => DEFAULT_PAGE_SIZE,
        Ok(n) => n.min(MAX_PAGE_SIZE),
    };
    if request.name_prefix.len() > MAX_NAME_PREFIX_BYTES {
        return Err(invalid(
            "name_prefix",
            format!("name_prefix is longer than {MAX_NAME_PREFIX_BYTES} bytes"),
        ));
    }
    if !request.host.is_empty() && !index.hosts.contains_key(&request.host) {
        return Err(FleetError::HostNotFound {
            host: bounded(&request.host),
        });
    }
    let filter = filter_digest(request);
    let start = match request.page_token.as_str() {
        "" => 0,
        token => {
            let (name, host) = parse_page_token(token, filter)?;
            index
                .entries()
                .partition_point(|e| (e.name.as_str(), e.host.as_str()) <= (&name, &host))
        }
    };
    let wanted = |e: &&super::index::Entry| {
        (request.host.is_empty() || e.host == request.host)
            && e.name.starts_with(&request.name_prefix)
            && (request.states.is_empty() || request.states.contains(&e.domain.state))
    };
    let mut domains = Vec::new();
    let mut bytes = 0;
    let mut last = None;
    let mut more = false;
    for e in index.entries()[start..].iter().filter(wanted) {
        if domains.len() == size {
            more = true;
            break;
        }
        let mut d = e.domain.clone();
        let live = index.hosts.get(&e.host).is_some_and(|h| h.live);
        d.host_unreachable = !live;
        let len = d.encoded_len() + 8;
        if !domains.is_empty() && bytes + len > ANSWER_BUDGET {
            more = true;
            break;
        }
        bytes += len;
        domains.push(d);
        last = Some(e);
    }
    let next_page_token = match last {
        Some(e) if more => page_token(filter, &e.name, &e.host),
        _ => String::new(),
    };
    Ok(ListDomainsResponse {
        domains,
        next_page_token,
    })
}

fn invalid(field: &'static str, message: impl Into<String>) -> FleetError {
    FleetError::InvalidArgument {
        field,
        message: message.into(),
    }
}

/// The digest of a request's filter (`host`, `states`, `name_prefix`).
fn filter_digest(request: &ListDomainsRequest) -> u64 {
    let mut states = request.states.clone();
    states.sort_unstable();
    states.dedup();
    let mut h = sha2::Sha256::new();
    for s in states {
        h.update(s.to_le_bytes());
    }
    for part in [&request.host, &request.name_prefix] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    let d = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    u64::from_le_bytes(first)
}

fn page_token(filter: u64, name: &str, host: &str) -> String {
    let mut bytes = vec![PAGE_TOKEN_VERSION];
    bytes.extend_from_slice(&filter.to_le_bytes());
    bytes.extend_from_slice(&(name.len() as u32).to_le_bytes());
    bytes.extend_from_slice(name.as_bytes());
    bytes.extend_from_slice(host.as_bytes());
    hex::encode(bytes)
}

/// The (name, host) after which the page starts.
fn parse_page_token(token: &str, filter: u64) -> Result<(String, String), FleetError> {
    let garbage = || invalid("page_token", "page_token is not one a fleet gateway issued");
    if token.len() > MAX_PAGE_TOKEN_CHARS {
        return Err(garbage());
    }
    let bytes = hex::decode(token).map_err(|_| garbage())?;
    let (version, rest) = bytes.split_first().ok_or_else(garbage)?;
    let (digest, rest) = rest.split_first_chunk::<8>().ok_or_else(garbage)?;
    let (len, rest) = rest.split_first_chunk::<4>().ok_or_else(garbage)?;
    if *version != PAGE_TOKEN_VERSION {
        return Err(garbage());
    }
    if u64::from_le_bytes(*digest) != filter {
        return Err(invalid(
            "page_token",
            "page_token belongs to a ListDomains call with other filters (host, states, name_prefix)",
        ));
    }
    let len = usize::try_from(u32::from_le_bytes(*len)).map_err(|_| garbage())?;
    if len > rest.len() {
        return Err(garbage());
    }
    let (name, host) = rest.split_at(len);
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| garbage());
    Ok((text(name)?, text(host)?))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use qvirt_proto::v1::DomainState::{self, Running, Shutoff};

    use super::super::index::tests::{domain, snapshot};
    use super::*;

    fn uuid(i: usize) -> String {
        format!("00000000-0000-4000-8000-{i:012x}")
    }

    fn fleet() -> Index {
        let mut domains = Vec::new();
        for i in 0..7 {
            let state = if i % 2 == 0 { Running } else { Shutoff };
            domains.push(domain("h1", &format!("vm-{i}"), &uuid(i), state, 128));
            domains.push(domain(
                "h2",
                &format!("vm-{i}"),
                &uuid(100 + i),
                Shutoff,
                128,
            ));
        }
        domains.push(domain("h3", "db", &uuid(200), Running, 128));
        Index::build(
            &snapshot(
                &[
                    ("h1", true, 4096, 0),
                    ("h2", true, 4096, 0),
                    ("h3", false, 4096, 0),
                ],
                &domains,
            ),
            true,
            None,
        )
    }

    fn names(r: &ListDomainsResponse) -> Vec<String> {
        r.domains
            .iter()
            .map(|d| format!("{}@{}", d.spec.as_ref().unwrap().name, d.host))
            .collect()
    }

    #[test]
    fn test_pages_walk_the_fleet_sorted_by_name_then_host() {
        let index = fleet();
        let mut request = ListDomainsRequest {
            page_size: 4,
            ..Default::default()
        };
        let mut all = Vec::new();
        loop {
            let page = list(&index, &request).unwrap();
            assert!(page.domains.len() <= 4);
            all.extend(names(&page));
            if page.next_page_token.is_empty() {
                break;
            }
            request.page_token = page.next_page_token;
        }
        let mut want = vec!["db@h3".to_owned()];
        for i in 0..7 {
            want.push(format!("vm-{i}@h1"));
            want.push(format!("vm-{i}@h2"));
        }
        assert_eq!(all, want);
    }

    #[test]
    fn test_filters_by_host_state_and_prefix() {
        let index = fleet();
        let page = list(
            &index,
            &ListDomainsRequest {
                host: "h1".into(),
                states: vec![Running as i32],
                name_prefix: "vm-".into(),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(names(&page), ["vm-0@h1", "vm-2@h1", "vm-4@h1", "vm-6@h1"]);
        assert!(page.next_page_token.is_empty());
        let page = list(
            &index,
            &ListDomainsRequest {
                name_prefix: "d".into(),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(names(&page), ["db@h3"]);
    }

    #[test]
    fn test_domains_of_a_host_without_heartbeat_are_marked() {
        let index = fleet();
        let page = list(&index, &ListDomainsRequest::default()).unwrap();
        for d in &page.domains {
            assert_eq!(d.host_unreachable, d.host == "h3", "{d:?}");
        }
    }

    #[test]
    fn test_bad_arguments_and_tokens_are_refused() {
        let index = fleet();
        let err = |r: ListDomainsRequest| list(&index, &r).unwrap_err();
        assert!(matches!(
            err(ListDomainsRequest {
                page_size: -1,
                ..Default::default()
            }),
            FleetError::InvalidArgument {
                field: "page_size",
                ..
            }
        ));
        assert!(matches!(
            err(ListDomainsRequest {
                name_prefix: "x".repeat(257),
                ..Default::default()
            }),
            FleetError::InvalidArgument {
                field: "name_prefix",
                ..
            }
        ));
        assert!(matches!(
            err(ListDomainsRequest {
                host: "h9".into(),
                ..Default::default()
            }),
            FleetError::HostNotFound { .. }
        ));
        for garbage in ["zz", "01", "", &"ab".repeat(2000)] {
            if garbage.is_empty() {
                continue;
            }
            assert!(matches!(
                err(ListDomainsRequest {
                    page_token: garbage.into(),
                    ..Default::default()
                }),
                FleetError::InvalidArgument {
                    field: "page_token",
                    ..
                }
            ));
        }
        let first = list(
            &index,
            &ListDomainsRequest {
                page_size: 1,
                ..Default::default()
            },
        )
        .unwrap();
        let other_filter = ListDomainsRequest {
            page_token: first.next_page_token,
            states: vec![DomainState::Running as i32],
            ..Default::default()
        };
        match err(other_filter) {
            FleetError::InvalidArgument { field, message } => {
                assert_eq!(field, "page_token");
                assert!(message.contains("other filters"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn test_a_token_survives_a_change_of_the_fleet() {
        let index = fleet();
        let first = list(
            &index,
            &ListDomainsRequest {
                page_size: 2,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(names(&first), ["db@h3", "vm-0@h1"]);
        // vm-0@h1 is gone by the next call: the page starts after it all
        // the same.
        let mut domains = Vec::new();
        for i in 1..3 {
            domains.push(domain("h1", &format!("vm-{i}"), &uuid(i), Shutoff, 128));
        }
        let changed = Index::build(&snapshot(&[("h1", true, 4096, 0)], &domains), true, None);
        let next = list(
            &changed,
            &ListDomainsRequest {
                page_size: 2,
                page_token: first.next_page_token,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(names(&next), ["vm-1@h1", "vm-2@h1"]);
    }
}
