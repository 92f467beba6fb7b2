//! Finding a guest's agent socket: first the static `agents` map of the
//! config (domain name or UUID -> socket path), then, when a supervisor
//! endpoint is configured, `Supervisor.GetDomain` -> `Domain.agent_socket`.
//!
//! A request's `host` must name the domain's host: empty or this machine's
//! host name for a static entry, empty or the supervisor's `Domain.host`
//! otherwise (a supervisor that itself refuses the host with
//! `HOST_NOT_FOUND` counts the same).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use qvirt_common::internal_auth::TokenInterceptor;
use qvirt_proto::v1::GetDomainRequest;
use qvirt_proto::v1::supervisor_client::SupervisorClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// Why a domain's agent socket is not known.
#[derive(Debug, thiserror::Error)]
pub enum LocateError {
    /// The request names no domain.
    #[error("domain is required (a name or UUID)")]
    Empty,
    /// Neither the static map nor the supervisor knows the domain.
    #[error("domain {0:?} not found")]
    Unknown(String),
    /// The domain is not on the host the request names.
    #[error("domain {domain:?} not found on host {host:?}")]
    WrongHost {
        /// The domain asked about.
        domain: String,
        /// The host the request named.
        host: String,
    },
    /// The domain is defined without an agent channel.
    #[error("domain {0:?} has no guest agent channel (define it with agent: true)")]
    NoAgent(String),
    /// The domain has an agent channel but is not running.
    #[error("domain {0:?} is not running")]
    NotRunning(String),
    /// The supervisor did not answer within the request's timeout.
    #[error("the supervisor did not say where domain {domain:?}'s agent is within {after:?}")]
    Timeout {
        /// The domain asked about.
        domain: String,
        /// The timeout that expired.
        after: Duration,
    },
    /// The supervisor could not be asked.
    #[error("cannot ask the supervisor about domain {domain:?}: {message}")]
    Supervisor {
        /// The domain asked about.
        domain: String,
        /// The supervisor's (or the transport's) status code.
        code: tonic::Code,
        /// Its message.
        message: String,
    },
}

/// Resolves domains to agent socket paths.
#[derive(Debug, Clone)]
pub struct Locator {
    agents: BTreeMap<String, PathBuf>,
    supervisor: Option<SupervisorClient<InterceptedService<Channel, TokenInterceptor>>>,
    /// This machine's host name: the host of the static entries.
    local_host: String,
}

impl Locator {
    /// A locator over the static map and, if given, the supervisor at
    /// `supervisor` (connected lazily, on first use), presenting the
    /// internal `token` to it.
    pub fn new(
        agents: BTreeMap<String, PathBuf>,
        supervisor: Option<&str>,
        token: TokenInterceptor,
    ) -> Result<Self, tonic::transport::Error> {
        let supervisor = match supervisor {
            Some(url) => {
                let channel = Endpoint::from_shared(url.to_owned())?
                    .connect_timeout(Duration::from_secs(5))
                    .connect_lazy();
                Some(SupervisorClient::with_interceptor(channel, token))
            }
            None => None,
        };
        Ok(Locator {
            agents,
            supervisor,
            local_host: qvirt_common::config::host_name(),
        })
    }

    /// The agent socket of `domain` (a name or UUID) on `host` (empty:
    /// wherever it is). `timeout` bounds the supervisor call.
    pub async fn locate(
        &self,
        domain: &str,
        host: &str,
        timeout: Duration,
    ) -> Result<PathBuf, LocateError> {
        if domain.is_empty() {
            return Err(LocateError::Empty);
        }
        let wrong_host = || LocateError::WrongHost {
            domain: domain.to_owned(),
            host: host.to_owned(),
        };
        if let Some(path) = self.lookup_static(domain) {
            if !host.is_empty() && host != self.local_host {
                return Err(wrong_host());
            }
            return Ok(path);
        }
        let Some(client) = &self.supervisor else {
            return Err(LocateError::Unknown(domain.to_owned()));
        };
        // The supervisor refuses another host (HOST_NOT_FOUND); the host is
        // also checked below, against the domain record.
        let mut request = tonic::Request::new(GetDomainRequest {
            domain: domain.to_owned(),
            host: host.to_owned(),
        });
        request.set_timeout(timeout);
        let start = std::time::Instant::now();
        let reply = client
            .clone()
            .get_domain(request)
            .await
            .map_err(|s| match s.code() {
                tonic::Code::NotFound
                    if qvirt_common::rpc::reason_of(&s).as_deref() == Some("HOST_NOT_FOUND") =>
                {
                    wrong_host()
                }
                tonic::Code::NotFound => LocateError::Unknown(domain.to_owned()),
                // The timeout ran out, whoever noticed first: this client
                // (its own status is CANCELLED) or the supervisor.
                _ if start.elapsed() >= timeout => LocateError::Timeout {
                    domain: domain.to_owned(),
                    after: timeout,
                },
                code => LocateError::Supervisor {
                    domain: domain.to_owned(),
                    code,
                    message: s.message().to_owned(),
                },
            })?;
        let Some(d) = reply.into_inner().domain else {
            return Err(LocateError::Unknown(domain.to_owned()));
        };
        if !host.is_empty() && host != d.host {
            return Err(wrong_host());
        }
        if !d.agent_socket.is_empty() {
            return Ok(PathBuf::from(d.agent_socket));
        }
        if d.spec.as_ref().is_some_and(|s| s.agent) {
            Err(LocateError::NotRunning(domain.to_owned()))
        } else {
            Err(LocateError::NoAgent(domain.to_owned()))
        }
    }

    /// The static map: an exact key, or a UUID key in any letter case.
    fn lookup_static(&self, domain: &str) -> Option<PathBuf> {
        if let Some(p) = self.agents.get(domain) {
            return Some(p.clone());
        }
        if looks_like_uuid(domain) {
            return self
                .agents
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(domain))
                .map(|(_, p)| p.clone());
        }
        None
    }
}

fn looks_like_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn locator() -> Locator {
        let mut agents = BTreeMap::new();
        agents.insert("web1".to_owned(), PathBuf::from("/run/web1.sock"));
        agents.insert(
            "6f9619ff-8b86-d011-b42d-00c04fc964ff".to_owned(),
            PathBuf::from("/run/uuid.sock"),
        );
        Locator::new(agents, None, TokenInterceptor::new(None)).unwrap()
    }

    #[tokio::test]
    async fn test_static_map_by_name_and_uuid_any_case() {
        let l = locator();
        let t = Duration::from_secs(1);
        assert_eq!(
            l.locate("web1", "", t).await.unwrap(),
            PathBuf::from("/run/web1.sock")
        );
        assert_eq!(
            l.locate("6F9619FF-8B86-D011-B42D-00C04FC964FF", "", t)
                .await
                .unwrap(),
            PathBuf::from("/run/uuid.sock")
        );
        assert!(matches!(
            l.locate("WEB1", "", t).await,
            Err(LocateError::Unknown(_))
        ));
        assert!(matches!(l.locate("", "", t).await, Err(LocateError::Empty)));
    }

    #[tokio::test]
    async fn test_static_entries_are_on_this_host() {
        let l = locator();
        let t = Duration::from_secs(1);
        let here = qvirt_common::config::host_name();
        assert_eq!(
            l.locate("web1", &here, t).await.unwrap(),
            PathBuf::from("/run/web1.sock")
        );
        let err = l.locate("web1", "elsewhere.example", t).await.unwrap_err();
        assert!(
            matches!(&err, LocateError::WrongHost { host, .. } if host == "elsewhere.example"),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn test_supervisor_silent_past_the_timeout_is_a_timeout() {
        // Accepts connections and never says a word.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let l = Locator::new(
            BTreeMap::new(),
            Some(&format!("http://{addr}")),
            TokenInterceptor::new(None),
        )
        .unwrap();
        let t = Duration::from_millis(300);
        let err = tokio::time::timeout(Duration::from_secs(10), l.locate("vm", "", t))
            .await
            .unwrap()
            .unwrap_err();
        assert!(
            matches!(err, LocateError::Timeout { after, .. } if after == t),
            "{err:?}"
        );
        task.abort();
    }

    #[tokio::test]
    async fn test_unreachable_supervisor_is_a_supervisor_error() {
        // Port 1 on loopback: nothing listens there.
        let l = Locator::new(
            BTreeMap::new(),
            Some("http://127.0.0.1:1"),
            TokenInterceptor::new(None),
        )
        .unwrap();
        let err = l
            .locate("vm", "", Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                LocateError::Supervisor {
                    code: tonic::Code::Unavailable,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    /// A supervisor that knows three domains: "run" (running with an
    /// agent), "off" (agent, shut off) and "bare" (no agent).
    struct FakeSupervisor;

    #[tonic::async_trait]
    impl qvirt_proto::v1::supervisor_server::Supervisor for FakeSupervisor {
        async fn get_domain(
            &self,
            req: tonic::Request<GetDomainRequest>,
        ) -> Result<tonic::Response<qvirt_proto::v1::GetDomainResponse>, tonic::Status> {
            use qvirt_proto::v1::{Domain, DomainSpec, GetDomainResponse};
            let name = req.into_inner().domain;
            let (agent, socket) = match name.as_str() {
                "run" => (true, "/run/qvirt/run/agent.sock"),
                "off" => (true, ""),
                "bare" => (false, ""),
                "bad/name" => return Err(tonic::Status::invalid_argument("bad name")),
                "remote" => {
                    return Err(qvirt_common::rpc::error(
                        tonic::Code::NotFound,
                        "HOST_NOT_FOUND",
                        "host not found",
                        [],
                    ));
                }
                _ => return Err(tonic::Status::not_found("no such domain")),
            };
            Ok(tonic::Response::new(GetDomainResponse {
                domain: Some(Domain {
                    spec: Some(DomainSpec {
                        name,
                        agent,
                        ..Default::default()
                    }),
                    agent_socket: socket.into(),
                    host: "node1".into(),
                    ..Default::default()
                }),
            }))
        }
    }

    #[tokio::test]
    async fn test_supervisor_lookup_maps_every_answer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let server = tonic::transport::Server::builder()
            .add_service(qvirt_proto::v1::supervisor_server::SupervisorServer::new(
                FakeSupervisor,
            ))
            .serve_with_incoming(incoming);
        let task = tokio::spawn(server);
        let mut agents = BTreeMap::new();
        agents.insert("run".to_owned(), PathBuf::from("/static/wins.sock"));
        let l = Locator::new(
            agents,
            Some(&format!("http://{addr}")),
            TokenInterceptor::new(None),
        )
        .unwrap();
        let t = Duration::from_secs(5);
        assert_eq!(
            l.locate("run", "", t).await.unwrap(),
            PathBuf::from("/static/wins.sock")
        );
        let l = Locator::new(
            BTreeMap::new(),
            Some(&format!("http://{addr}")),
            TokenInterceptor::new(None),
        )
        .unwrap();
        assert_eq!(
            l.locate("run", "", t).await.unwrap(),
            PathBuf::from("/run/qvirt/run/agent.sock")
        );
        assert_eq!(
            l.locate("run", "node1", t).await.unwrap(),
            PathBuf::from("/run/qvirt/run/agent.sock")
        );
        assert!(matches!(
            l.locate("run", "node2", t).await,
            Err(LocateError::WrongHost { .. })
        ));
        assert!(matches!(
            l.locate("remote", "node2", t).await,
            Err(LocateError::WrongHost { .. })
        ));
        assert!(matches!(
            l.locate("off", "", t).await,
            Err(LocateError::NotRunning(_))
        ));
        assert!(matches!(
            l.locate("bare", "", t).await,
            Err(LocateError::NoAgent(_))
        ));
        assert!(matches!(
            l.locate("ghost", "", t).await,
            Err(LocateError::Unknown(_))
        ));
        let err = l.locate("bad/name", "", t).await.unwrap_err();
        assert!(
            matches!(
                err,
                LocateError::Supervisor {
                    code: tonic::Code::InvalidArgument,
                    ..
                }
            ),
            "{err:?}"
        );
        task.abort();
    }
}
