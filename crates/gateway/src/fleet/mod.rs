//! Fleet mode: a gateway in front of many hosts, configured with a
//! `fleet:` section. The registry's view ([`view`]) is indexed once per
//! change ([`index`]); calls that name a domain are routed to its
//! host by it ([`route`]), ListDomains is answered from it ([`list`]),
//! and defines are placed by it ([`place`]).

pub mod index;
pub mod list;
pub mod place;
pub mod route;
pub mod view;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use prost::Message;
use qvirt_proto::v1::{
    DefineDomainRequest, DomainSpec, GetDomainResponse, ListDomainsRequest, define_domain_request,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

pub use index::Index;
pub use qvirt_registry::Snapshot;

use crate::descriptors::{self, Method};
use crate::proxy::Backend;
use crate::status::GatewayError;
use crate::upstream::Upstream;

/// Why a fleet gateway answered a call itself. Mapped to gRPC statuses
/// in [`crate::status`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FleetError {
    /// The request names no domain.
    #[error("domain (name or UUID) is required")]
    DomainRequired,
    /// No host has a domain of that name or UUID.
    #[error("no host has a domain {domain:?}")]
    DomainNotFound {
        /// The name or UUID asked for.
        domain: String,
    },
    /// Several hosts have a domain of that name.
    #[error("{domain:?} names a domain on each of the hosts {hosts:?}: give `host`")]
    DomainAmbiguous {
        /// The name asked for.
        domain: String,
        /// The hosts that have it.
        hosts: Vec<String>,
    },
    /// The registry knows no such host.
    #[error("no host {host:?} in the fleet")]
    HostNotFound {
        /// The host asked for.
        host: String,
    },
    /// The host has no live heartbeat.
    #[error("host {host:?} has no live heartbeat")]
    HostUnreachable {
        /// The host.
        host: String,
    },
    /// The host advertises no agent service.
    #[error("host {host:?} has no agent service")]
    NoAgentService {
        /// The host.
        host: String,
    },
    /// No live host to place a domain on.
    #[error("no host with a live heartbeat to place the domain on")]
    NoHostAvailable,
    /// The registry's view is not (yet) connected to the broker.
    #[error("the fleet registry is not reachable")]
    RegistryUnavailable,
    /// A field of the request is invalid.
    #[error("{message}")]
    InvalidArgument {
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The method names no domain, so it has no host to go to.
    #[error("the method names no domain: a fleet gateway cannot route it")]
    NotRoutable,
    /// The request could not be read to route it (compressed, or not
    /// protobuf).
    #[error("the request cannot be read to route it (send it uncompressed)")]
    Unreadable,
}

/// The gRPC path of the methods a fleet gateway treats apart.
pub const LIST_DOMAINS: &str = "/qvirt.v1.Supervisor/ListDomains";
/// Answered from the view for a domain whose host has no heartbeat.
pub const GET_DOMAIN: &str = "/qvirt.v1.Supervisor/GetDomain";
/// Placed.
pub const DEFINE_DOMAIN: &str = "/qvirt.v1.Supervisor/DefineDomain";

/// What a fleet gateway does with a call.
#[derive(Debug)]
pub enum Dispatch {
    /// Forward it unchanged to this backend (of the given host).
    Forward {
        /// The host's backend.
        backend: Backend,
        /// The host.
        host: String,
        /// The name of a define sent there by placement.
        placed: Option<String>,
    },
    /// Answer with this message (encoded, without the gRPC frame prefix).
    Answer(Bytes),
}

/// A fleet gateway's routing state: the view's index, the connections to
/// the hosts' backends (one per URL, kept while a live host names it),
/// and the defines it placed that the view does not show yet.
#[derive(Debug)]
pub struct Fleet {
    index: watch::Receiver<Arc<Index>>,
    upstreams: Mutex<HashMap<String, Arc<Upstream>>>,
    pending: Mutex<Vec<place::Placed>>,
}

/// Feeds a [`Fleet`] new snapshots.
#[derive(Debug)]
pub struct Updater {
    index: watch::Sender<Arc<Index>>,
}

impl Fleet {
    /// A fleet with an empty, unconnected view, and what feeds it.
    pub fn new() -> (Arc<Fleet>, Updater) {
        let (tx, rx) = watch::channel(Arc::new(Index::default()));
        (
            Arc::new(Fleet {
                index: rx,
                upstreams: Mutex::new(HashMap::new()),
                pending: Mutex::new(Vec::new()),
            }),
            Updater { index: tx },
        )
    }

    /// The current index.
    pub fn index(&self) -> Arc<Index> {
        Arc::clone(&self.index.borrow())
    }

    /// Whether the fleet can serve `qvirt.v1.Supervisor` and
    /// `qvirt.v1.GuestAgent`: the view is connected and some host lives.
    pub fn serving(index: &Index) -> bool {
        index.connected && index.any_live()
    }

    /// Takes a new snapshot: indexes it, forgets placements it shows and
    /// connections no live host names any more.
    pub fn update(&self, updater: &Updater, snapshot: &Snapshot, connected: bool) {
        let index = Index::build(snapshot, connected, Some(&self.index()));
        {
            let wanted: HashSet<&str> = index
                .hosts
                .values()
                .filter(|h| h.live)
                .flat_map(|h| [h.supervisor_url.as_str(), h.agentd_url.as_str()])
                .collect();
            lock(&self.upstreams).retain(|url, _| wanted.contains(url.as_str()));
        }
        // Pruned and published under one hold of the pending lock, which
        // a define places under: it always sees a placement either in
        // the pending list or in the index, never in neither.
        let mut pending = lock(&self.pending);
        place::prune(&mut pending, &index, Instant::now());
        updater.index.send_replace(Arc::new(index));
    }

    /// What to do with a call to `method` (at `path`) whose request is
    /// `frame` (gRPC-framed).
    pub fn dispatch(
        &self,
        method: &Method,
        path: &str,
        frame: &[u8],
    ) -> Result<Dispatch, GatewayError> {
        let fail = |source| GatewayError::Fleet {
            method: path.to_owned(),
            source,
        };
        let index = self.index();
        if !index.connected && index.hosts.is_empty() {
            return Err(fail(FleetError::RegistryUnavailable));
        }
        match path {
            LIST_DOMAINS => {
                let request: ListDomainsRequest = decode(frame).map_err(fail)?;
                let answer = list::list(&index, &request).map_err(fail)?;
                return Ok(Dispatch::Answer(answer.encode_to_vec().into()));
            }
            DEFINE_DOMAIN => return self.define(method, path, frame),
            _ => {}
        }
        let Some(domain_field) = method.domain_field else {
            return Err(fail(FleetError::NotRoutable));
        };
        let [domain, host] = descriptors::strings_in_frame(
            frame,
            [domain_field, method.host_field.unwrap_or(domain_field)],
        )
        .ok_or_else(|| fail(FleetError::Unreadable))?;
        let host = if method.host_field.is_some() {
            host
        } else {
            String::new()
        };
        let decided = match route::route(&index, &domain, &host) {
            Err(not_found @ FleetError::DomainNotFound { .. }) if host.is_empty() => {
                // Defined through this gateway, not in the view yet.
                let placed = lock(&self.pending)
                    .iter()
                    .find(|p| p.name == domain)
                    .map(|p| p.host.clone());
                match placed {
                    Some(h) => route::route(&index, &domain, &h).map(|d| match d {
                        route::Decision::Host(_) => Target::Host(h),
                        route::Decision::Stale(e) => Target::Stale(Box::new(e.clone())),
                    }),
                    None => Err(not_found),
                }
            }
            other => other.map(Target::from),
        }
        .map_err(fail)?;
        match decided {
            Target::Host(h) => Ok(Dispatch::Forward {
                backend: self.backend(&index, method.service, &h, path)?,
                host: h,
                placed: None,
            }),
            Target::Stale(e) if path == GET_DOMAIN => {
                let mut domain = e.domain.clone();
                domain.host_unreachable = true;
                let answer = GetDomainResponse {
                    domain: Some(domain),
                };
                Ok(Dispatch::Answer(answer.encode_to_vec().into()))
            }
            Target::Stale(e) => Err(fail(FleetError::HostUnreachable {
                host: route::bounded(&e.host),
            })),
        }
    }

    fn define(&self, method: &Method, path: &str, frame: &[u8]) -> Result<Dispatch, GatewayError> {
        let fail = |source| GatewayError::Fleet {
            method: path.to_owned(),
            source,
        };
        let request: DefineDomainRequest = decode(frame).map_err(fail)?;
        // A spec that does not read is the host's to refuse, wherever it
        // is placed.
        let spec = match &request.source {
            Some(define_domain_request::Source::Spec(s)) => Some(s.clone()),
            Some(define_domain_request::Source::SpecYaml(text)) => DomainSpec::from_yaml(text).ok(),
            None => None,
        };
        let name = spec.as_ref().map(|s| s.name.as_str());
        let mut pending = lock(&self.pending);
        // The index the pending list was last pruned with (see `update`),
        // not the one this call started with.
        let current = self.index();
        let index: &Index = &current;
        let uuid = spec.as_ref().map_or("", |s| s.uuid.as_str());
        let target =
            place::define_target(index, &pending, name, uuid, &request.host).map_err(fail)?;
        let backend = self.backend(index, method.service, &target.host, path)?;
        let placed = match (&spec, target.placed && !request.validate_only) {
            (Some(spec), true) => {
                let mib = if spec.memory_mib == 0 {
                    DEFAULT_MEMORY_MIB
                } else {
                    spec.memory_mib
                };
                pending.push(place::Placed {
                    name: spec.name.clone(),
                    host: target.host.clone(),
                    memory_bytes: mib.saturating_mul(1 << 20),
                    at: Instant::now(),
                });
                Some(spec.name.clone())
            }
            _ => None,
        };
        Ok(Dispatch::Forward {
            backend,
            host: target.host,
            placed,
        })
    }

    /// Forgets a placement whose define failed.
    pub fn unplace(&self, name: &str, host: &str) {
        lock(&self.pending).retain(|p| !(p.name == name && p.host == host));
    }

    /// The backend of `service` on live host `host`.
    fn backend(
        &self,
        index: &Index,
        service: &'static str,
        host: &str,
        path: &str,
    ) -> Result<Backend, GatewayError> {
        let h = index.hosts.get(host);
        let url = match (service, h) {
            ("qvirt.v1.Supervisor", Some(h)) => h.supervisor_url.as_str(),
            ("qvirt.v1.GuestAgent", Some(h)) => h.agentd_url.as_str(),
            _ => "",
        };
        if url.is_empty() {
            let host = route::bounded(host);
            let source = if service == "qvirt.v1.GuestAgent" {
                FleetError::NoAgentService { host }
            } else {
                FleetError::HostUnreachable { host }
            };
            return Err(GatewayError::Fleet {
                method: path.to_owned(),
                source,
            });
        }
        let mut upstreams = lock(&self.upstreams);
        let upstream = match upstreams.get(url) {
            Some(u) => Arc::clone(u),
            None => {
                let u = Upstream::new(url).map_err(|e| GatewayError::BackendUnavailable {
                    method: path.to_owned(),
                    service,
                    cause: qvirt_common::error_chain(&e),
                })?;
                let u = Arc::new(u);
                upstreams.insert(url.to_owned(), Arc::clone(&u));
                u
            }
        };
        Ok(Backend { service, upstream })
    }
}

/// Keeps `fleet` on the view's snapshots (`snapshots`, `connected`) and
/// the health of the services it routes (`qvirt.v1.Supervisor`,
/// `qvirt.v1.GuestAgent`: SERVING while the view is connected and some
/// host lives) until `shutdown`.
pub async fn follow(
    fleet: Arc<Fleet>,
    updater: Updater,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    mut connected: watch::Receiver<bool>,
    reporter: HealthReporter,
    shutdown: CancellationToken,
) {
    let mut was = None;
    loop {
        let snapshot = Arc::clone(&snapshots.borrow_and_update());
        let up = *connected.borrow_and_update();
        fleet.update(&updater, &snapshot, up);
        let serving = Fleet::serving(&fleet.index());
        if was != Some(serving) {
            let live = fleet.index().hosts.values().filter(|h| h.live).count();
            if serving {
                tracing::info!(live_hosts = live, "fleet: serving");
            } else {
                tracing::warn!(connected = up, live_hosts = live, "fleet: not serving");
            }
            let status = if serving {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            for service in ROUTED_SERVICES {
                reporter.set_service_status(service, status).await;
            }
            was = Some(serving);
        }
        tokio::select! {
            r = snapshots.changed() => if r.is_err() { return },
            r = connected.changed() => if r.is_err() { return },
            () = shutdown.cancelled() => return,
        }
    }
}

/// The services a fleet gateway routes to hosts.
pub const ROUTED_SERVICES: [&str; 2] = ["qvirt.v1.Supervisor", "qvirt.v1.GuestAgent"];

/// Where a routed call goes (owned, so no borrow of the index outlives
/// the decision).
enum Target {
    Host(String),
    Stale(Box<index::Entry>),
}

impl From<route::Decision<'_>> for Target {
    fn from(d: route::Decision<'_>) -> Target {
        match d {
            route::Decision::Host(h) => Target::Host(h.to_owned()),
            route::Decision::Stale(e) => Target::Stale(Box::new(e.clone())),
        }
    }
}

/// The memory a spec without `memory_mib` gets (the supervisor's
/// default), counted for placement.
const DEFAULT_MEMORY_MIB: u64 = 128;

/// The message in a gRPC frame.
fn decode<M: Message + Default>(frame: &[u8]) -> Result<M, FleetError> {
    let (head, msg) = frame
        .split_first_chunk::<5>()
        .ok_or(FleetError::Unreadable)?;
    let [compressed, a, b, c, d] = *head;
    let len = u32::from_be_bytes([a, b, c, d]) as usize;
    if compressed != 0 || msg.len() != len {
        return Err(FleetError::Unreadable);
    }
    M::decode(msg).map_err(|_| FleetError::Unreadable)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use qvirt_proto::v1::DomainState::{Running, Shutoff};
    use qvirt_proto::v1::{ExecRequest, GetDomainRequest, ListDomainsResponse, StartDomainRequest};

    use super::index::tests::{U1, U2, U3, domain, snapshot};
    use super::*;

    fn frame(m: &impl Message) -> Vec<u8> {
        let msg = m.encode_to_vec();
        let mut f = vec![0];
        f.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        f.extend_from_slice(&msg);
        f
    }

    fn fleet() -> Arc<Fleet> {
        let (fleet, updater) = Fleet::new();
        let mut s = snapshot(
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
        );
        Arc::make_mut(&mut s.hosts)
            .get_mut("h2")
            .unwrap()
            .record
            .agentd_url
            .clear();
        fleet.update(&updater, &s, true);
        // The updater is dropped: the last index stays.
        fleet
    }

    fn call(fleet: &Fleet, path: &str, f: &[u8]) -> Result<Dispatch, GatewayError> {
        let methods = descriptors::methods().unwrap();
        fleet.dispatch(&methods[path], path, f)
    }

    fn forwarded(d: Result<Dispatch, GatewayError>) -> (String, String) {
        match d {
            Ok(Dispatch::Forward { backend, host, .. }) => {
                (host, backend.upstream.url().to_owned())
            }
            other => panic!("{other:?}"),
        }
    }

    fn reason(d: Result<Dispatch, GatewayError>) -> String {
        qvirt_common::rpc::reason_of(&d.unwrap_err().to_status()).unwrap()
    }

    #[test]
    fn test_calls_go_to_their_hosts_backend_of_their_service() {
        let fleet = fleet();
        let start = |domain: &str, host: &str| {
            frame(&StartDomainRequest {
                domain: domain.into(),
                host: host.into(),
                ..Default::default()
            })
        };
        const START: &str = "/qvirt.v1.Supervisor/StartDomain";
        assert_eq!(
            forwarded(call(&fleet, START, &start(U2, ""))),
            ("h2".into(), "http://h2:50052".into())
        );
        assert_eq!(forwarded(call(&fleet, START, &start("web", "h1"))).0, "h1");
        assert_eq!(
            reason(call(&fleet, START, &start("web", ""))),
            "DOMAIN_AMBIGUOUS"
        );
        assert_eq!(
            reason(call(&fleet, START, &start("db", ""))),
            "HOST_UNREACHABLE"
        );
        assert_eq!(
            reason(call(&fleet, START, &start("x", ""))),
            "DOMAIN_NOT_FOUND"
        );
        assert_eq!(
            reason(call(&fleet, START, &start("x", "h9"))),
            "HOST_NOT_FOUND"
        );
        const EXEC: &str = "/qvirt.v1.GuestAgent/Exec";
        let exec = |host: &str| {
            frame(&ExecRequest {
                domain: "web".into(),
                host: host.into(),
                ..Default::default()
            })
        };
        assert_eq!(
            forwarded(call(&fleet, EXEC, &exec("h1"))).1,
            "http://h1:50055"
        );
        assert_eq!(
            reason(call(&fleet, EXEC, &exec("h2"))),
            "AGENT_SERVICE_NOT_CONFIGURED"
        );
        // One connection per URL, shared by calls.
        let a = call(&fleet, START, &start(U2, ""));
        let b = call(&fleet, START, &start(U2, ""));
        match (a, b) {
            (
                Ok(Dispatch::Forward { backend: a, .. }),
                Ok(Dispatch::Forward { backend: b, .. }),
            ) => {
                assert!(Arc::ptr_eq(&a.upstream, &b.upstream));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn test_list_and_a_stale_get_are_answered_from_the_view() {
        let fleet = fleet();
        let Ok(Dispatch::Answer(list)) =
            call(&fleet, LIST_DOMAINS, &frame(&ListDomainsRequest::default()))
        else {
            panic!()
        };
        let list = ListDomainsResponse::decode(list).unwrap();
        assert_eq!(list.domains.len(), 3);
        let get = frame(&GetDomainRequest {
            domain: "db".into(),
            ..Default::default()
        });
        let Ok(Dispatch::Answer(got)) = call(&fleet, GET_DOMAIN, &get) else {
            panic!()
        };
        let got = GetDomainResponse::decode(got).unwrap().domain.unwrap();
        assert_eq!(got.host, "h3");
        assert!(got.host_unreachable);
        let mut compressed = get.clone();
        compressed[0] = 1;
        assert_eq!(
            reason(call(&fleet, GET_DOMAIN, &compressed)),
            "REQUEST_UNREADABLE"
        );
    }

    #[test]
    fn test_a_placed_define_is_routed_before_the_view_shows_it() {
        let fleet = fleet();
        let define = |name: &str| {
            frame(&DefineDomainRequest {
                source: Some(define_domain_request::Source::Spec(DomainSpec {
                    name: name.into(),
                    memory_mib: 512,
                    ..Default::default()
                })),
                ..Default::default()
            })
        };
        let (first, _) = forwarded(call(&fleet, DEFINE_DOMAIN, &define("new1")));
        let (second, _) = forwarded(call(&fleet, DEFINE_DOMAIN, &define("new2")));
        assert_ne!(first, second, "defines spread over the live hosts");
        let start = frame(&StartDomainRequest {
            domain: "new1".into(),
            ..Default::default()
        });
        assert_eq!(
            forwarded(call(&fleet, "/qvirt.v1.Supervisor/StartDomain", &start)).0,
            first
        );
        fleet.unplace("new1", &first);
        assert_eq!(
            reason(call(&fleet, "/qvirt.v1.Supervisor/StartDomain", &start)),
            "DOMAIN_NOT_FOUND"
        );
        // The same name again goes where the first define went.
        assert_eq!(
            forwarded(call(&fleet, DEFINE_DOMAIN, &define("new2"))).0,
            second
        );
        let yaml = frame(&DefineDomainRequest {
            source: Some(define_domain_request::Source::SpecYaml(
                "name: web\n".into(),
            )),
            ..Default::default()
        });
        assert_eq!(
            reason(call(&fleet, DEFINE_DOMAIN, &yaml)),
            "DOMAIN_AMBIGUOUS"
        );
    }

    #[test]
    fn test_an_unconnected_empty_view_is_unavailable() {
        let (fleet, _updater) = Fleet::new();
        let get = frame(&GetDomainRequest {
            domain: "db".into(),
            ..Default::default()
        });
        assert_eq!(reason(call(&fleet, GET_DOMAIN, &get)), "FLEET_UNAVAILABLE");
        assert!(!Fleet::serving(&fleet.index()));
    }
}
