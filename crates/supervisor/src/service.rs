//! `qvirt.v1.Supervisor` over the [`Manager`]: request checks (host,
//! paging, request ids) and the mapping of results; the work is in
//! [`crate::domain`], the error table in [`crate::status`], retries in
//! [`crate::request_ids`].

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use qvirt_proto::v1::define_domain_request::Source;
use qvirt_proto::v1::supervisor_server::Supervisor;
use qvirt_proto::v1::*;
use tonic::{Request, Response, Status};

use crate::domain::{DefineOptions, DomainError, Manager};
use crate::request_ids::{self, Claim, Outcome, RequestIds};

/// ListDomains page size when the request gives none.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest ListDomains page size; larger requests are clamped to it.
pub const MAX_PAGE_SIZE: usize = 1000;
/// Longest `name_prefix`, in bytes.
pub const MAX_NAME_PREFIX_BYTES: usize = 256;
/// Longest `page_token` accepted, in characters.
const MAX_PAGE_TOKEN_CHARS: usize = 1024;
/// Version byte of page tokens.
const PAGE_TOKEN_VERSION: u8 = 1;

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct SupervisorService {
    manager: Manager,
    requests: Arc<RequestIds>,
}

type Reply<T> = Result<Response<T>, Status>;

impl SupervisorService {
    /// A service over `manager`, remembering request ids in `requests`.
    pub fn new(manager: Manager, requests: RequestIds) -> Self {
        SupervisorService {
            manager,
            requests: Arc::new(requests),
        }
    }

    /// Refuse a `host` other than this supervisor's (empty: this one).
    fn check_host(&self, host: &str) -> Result<(), Status> {
        if host.is_empty() || host == self.manager.host() {
            return Ok(());
        }
        Err(DomainError::HostNotFound(bounded(host), self.manager.host().to_owned()).into())
    }

    /// Run the write `call` of `method` once per request id (see
    /// [`crate::request_ids`]); without an id, just run it. `fingerprint`
    /// gives the request's ([`fingerprint`]), asked only with an id.
    async fn write<M, F>(
        &self,
        method: &'static str,
        request_id: &str,
        fingerprint: impl FnOnce() -> u128,
        call: F,
    ) -> Reply<M>
    where
        M: Message + Default + 'static,
        F: Future<Output = Result<M, DomainError>> + Send + 'static,
    {
        if request_id.is_empty() {
            return detached(call).await.map(Response::new);
        }
        request_ids::check_request_id(request_id)?;
        match self.requests.claim(method, request_id, fingerprint())? {
            Claim::Replay(outcome) => request_ids::replay(outcome).await.map(Response::new),
            Claim::Run(ticket) => {
                // The outcome is recorded even when the caller is gone.
                let task = tokio::spawn(async move {
                    let result = call.await.map_err(Status::from);
                    ticket.finish(Outcome::of(&result)).await;
                    result
                });
                match task.await {
                    Ok(result) => result.map(Response::new),
                    Err(error) => Err(qvirt_common::rpc::internal("supervisor", &error)),
                }
            }
        }
    }
}

/// A write request on one named domain: what each such call carries.
trait OnDomain: Message + Send + 'static {
    /// The domain, the request id and the host the request names.
    fn target(&self) -> (&str, &str, &str);
}

macro_rules! on_domain {
    ($($request:ty),* $(,)?) => {$(
        impl OnDomain for $request {
            fn target(&self) -> (&str, &str, &str) {
                (&self.domain, &self.request_id, &self.host)
            }
        }
    )*};
}

on_domain!(
    UndefineDomainRequest,
    StartDomainRequest,
    ShutdownDomainRequest,
    DestroyDomainRequest,
    SaveDomainRequest,
    RestoreDomainRequest,
    SuspendDomainRequest,
    ResumeDomainRequest,
    ResetDomainRequest,
    RebootDomainRequest,
);

impl SupervisorService {
    /// The shape of every write on one domain: the call recorded on the
    /// span, the host and name checked, then `act` (given the manager, the
    /// domain's key, the request and, when it has a request id, its
    /// fingerprint; it may refuse the request's other fields) run once per
    /// request id.
    async fn on_domain<R, M, F, Fut>(
        &self,
        method: &'static str,
        request: Request<R>,
        act: F,
    ) -> Reply<M>
    where
        R: OnDomain,
        M: Message + Default + 'static,
        F: FnOnce(Manager, String, &R, Option<u128>) -> Result<Fut, Status>,
        Fut: Future<Output = Result<M, DomainError>> + Send + 'static,
    {
        let request = request.into_inner();
        let (domain, request_id, host) = request.target();
        qvirt_common::telemetry::record_call(domain, request_id, "");
        self.check_host(host)?;
        let key = domain_key(domain)?;
        // Computed once, for the call's record and for `act`.
        let digest = (!request_id.is_empty()).then(|| fingerprint(&request));
        let call = act(self.manager.clone(), key, &request, digest)?;
        self.write(
            method,
            request_id,
            || digest.unwrap_or_else(|| fingerprint(&request)),
            call,
        )
        .await
    }
}

/// A request's fingerprint for [`crate::request_ids`]: the digest of the
/// message as decoded and encoded again.
fn fingerprint(request: &impl Message) -> u128 {
    request_ids::digest(&[&request.encode_to_vec()])
}

/// At most 256 bytes of a client's string, for messages.
fn bounded(text: &str) -> String {
    let mut end = text.len().min(256);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

fn domain_key(key: &str) -> Result<String, Status> {
    if key.is_empty() {
        return Err(DomainError::invalid("domain", "domain (name or UUID) is required").into());
    }
    Ok(key.to_owned())
}

/// A request's `timeout` by the rule every qvirt service applies
/// ([`qvirt_common::rpc::request_timeout`]).
fn timeout(d: Option<prost_types::Duration>) -> Result<Option<Duration>, Status> {
    qvirt_common::rpc::request_timeout(d)
        .map_err(|e| DomainError::invalid("timeout", format!("timeout {e}")).into())
}

/// Run a domain-changing manager call on its own task and wait for it.
///
/// tonic drops a request's future when the client's deadline passes or it
/// hangs up; dropped midway, a start would leave a launched QEMU nobody
/// records (or skip the stop hooks). On its own task the call always runs
/// to its end; only the answer is lost.
async fn detached<T, F>(call: F) -> Result<T, Status>
where
    T: Send + 'static,
    F: Future<Output = Result<T, DomainError>> + Send + 'static,
{
    match tokio::spawn(call).await {
        Ok(result) => result.map_err(Status::from),
        Err(error) => Err(qvirt_common::rpc::internal("supervisor", &error)),
    }
}

/// The digest of a ListDomains filter, carried in its page tokens.
fn filter_digest(states: &[i32], prefix: &str) -> u64 {
    let mut states = states.to_vec();
    states.sort_unstable();
    states.dedup();
    let states: Vec<u8> = states.iter().flat_map(|s| s.to_le_bytes()).collect();
    let digest = request_ids::digest(&[&states, prefix.as_bytes()]);
    (digest >> 64) as u64 ^ digest as u64
}

/// The page token naming the page after `last` under `filter`.
fn page_token(filter: u64, last: &str) -> String {
    let mut bytes = vec![PAGE_TOKEN_VERSION];
    bytes.extend_from_slice(&filter.to_le_bytes());
    bytes.extend_from_slice(last.as_bytes());
    hex::encode(&bytes)
}

/// The last name of the previous page from `token`, checked against
/// `filter`.
fn parse_page_token(token: &str, filter: u64) -> Result<String, DomainError> {
    let garbage =
        || DomainError::invalid("page_token", "page_token is not one this service issued");
    if token.len() > MAX_PAGE_TOKEN_CHARS {
        return Err(garbage());
    }
    let bytes = hex::decode(token).map_err(|_| garbage())?;
    let (version, rest) = bytes.split_first().ok_or_else(garbage)?;
    if *version != PAGE_TOKEN_VERSION || rest.len() < 8 {
        return Err(garbage());
    }
    let (digest, name) = rest.split_at(8);
    let digest = u64::from_le_bytes(digest.try_into().map_err(|_| garbage())?);
    if digest != filter {
        return Err(DomainError::invalid(
            "page_token",
            "page_token belongs to a ListDomains call with other filters (states, name_prefix)",
        ));
    }
    String::from_utf8(name.to_vec()).map_err(|_| garbage())
}

/// The page size a request asks for.
fn page_size(size: i32) -> Result<usize, DomainError> {
    match usize::try_from(size) {
        Err(_) => Err(DomainError::invalid(
            "page_size",
            "page_size must not be negative",
        )),
        Ok(0) => Ok(DEFAULT_PAGE_SIZE),
        Ok(n) => Ok(n.min(MAX_PAGE_SIZE)),
    }
}

#[tonic::async_trait]
impl Supervisor for SupervisorService {
    async fn define_domain(
        &self,
        request: Request<DefineDomainRequest>,
    ) -> Reply<DefineDomainResponse> {
        let request = request.into_inner();
        self.check_host(&request.host)?;
        let (spec, from_yaml) = match &request.source {
            Some(Source::Spec(spec)) => (spec.clone(), false),
            Some(Source::SpecYaml(text)) => (
                DomainSpec::from_yaml(text)
                    .map_err(|e| DomainError::Yaml(qvirt_proto::yaml::error_text(&e)))?,
                true,
            ),
            None => {
                return Err(
                    DomainError::invalid("spec", "one of spec or spec_yaml is required").into(),
                );
            }
        };
        qvirt_common::telemetry::record_call(&spec.name, &request.request_id, "");
        let manager = self.manager.clone();
        // Computed once: the definition file keeps it too.
        let digest = (!request.request_id.is_empty()).then(|| fingerprint(&request));
        let mark = digest
            .filter(|_| !request.validate_only)
            .map(|fingerprint| crate::domain::store::RequestMark {
                id: request.request_id.clone(),
                fingerprint,
            });
        let options = DefineOptions {
            allow_update: request.allow_update,
            etag: request.etag.clone(),
            validate_only: request.validate_only,
            request: mark,
        };
        let call = async move {
            let domain = manager
                .define_with(spec, options)
                .await
                .map_err(|e| match e {
                    // The path is the YAML document's own.
                    DomainError::Spec(e) if from_yaml => DomainError::YamlSpec(e),
                    e => e,
                })?;
            Ok(DefineDomainResponse {
                domain: Some(domain),
            })
        };
        if request.validate_only {
            // Nothing happens, so there is nothing to replay.
            return detached(call).await.map(Response::new);
        }
        self.write(
            "DefineDomain",
            &request.request_id,
            || digest.unwrap_or_else(|| fingerprint(&request)),
            call,
        )
        .await
    }

    async fn undefine_domain(
        &self,
        request: Request<UndefineDomainRequest>,
    ) -> Reply<UndefineDomainResponse> {
        let requests = Arc::clone(&self.requests);
        self.on_domain("UndefineDomain", request, |manager, key, r, digest| {
            let destroy = r.destroy;
            // Its record, written before the removal: a crash between the
            // removal and the record still answers the retry.
            let promise = digest.and_then(|digest| {
                requests.promise(
                    "UndefineDomain",
                    &r.request_id,
                    digest,
                    &Outcome::of(&Ok::<_, Status>(UndefineDomainResponse {})),
                )
            });
            Ok(async move {
                manager.undefine(&key, destroy, promise).await?;
                Ok(UndefineDomainResponse {})
            })
        })
        .await
    }

    async fn list_domains(
        &self,
        request: Request<ListDomainsRequest>,
    ) -> Reply<ListDomainsResponse> {
        let request = request.into_inner();
        self.check_host(&request.host)?;
        let size = page_size(request.page_size)?;
        if request.name_prefix.len() > MAX_NAME_PREFIX_BYTES {
            return Err(DomainError::invalid(
                "name_prefix",
                format!("name_prefix is longer than {MAX_NAME_PREFIX_BYTES} bytes"),
            )
            .into());
        }
        let filter = filter_digest(&request.states, &request.name_prefix);
        let after = match request.page_token.as_str() {
            "" => None,
            token => Some(parse_page_token(token, filter)?),
        };
        let (domains, more) = self.manager.list_page(
            &request.states,
            &request.name_prefix,
            after.as_deref(),
            size,
        );
        let next_page_token = match domains.last().and_then(|d| d.spec.as_ref()) {
            Some(last) if more => page_token(filter, &last.name),
            _ => String::new(),
        };
        Ok(Response::new(ListDomainsResponse {
            domains,
            next_page_token,
        }))
    }

    async fn get_domain(&self, request: Request<GetDomainRequest>) -> Reply<GetDomainResponse> {
        let request = request.into_inner();
        qvirt_common::telemetry::record_call(&request.domain, "", "");
        self.check_host(&request.host)?;
        let domain = self.manager.get(&domain_key(&request.domain)?)?;
        Ok(Response::new(GetDomainResponse {
            domain: Some(domain),
        }))
    }

    async fn start_domain(
        &self,
        request: Request<StartDomainRequest>,
    ) -> Reply<StartDomainResponse> {
        self.on_domain("StartDomain", request, |manager, key, r, _| {
            let paused = r.paused;
            Ok(async move {
                let domain = manager.start(&key, paused).await?;
                Ok(StartDomainResponse {
                    domain: Some(domain),
                })
            })
        })
        .await
    }

    async fn shutdown_domain(
        &self,
        request: Request<ShutdownDomainRequest>,
    ) -> Reply<ShutdownDomainResponse> {
        self.on_domain("ShutdownDomain", request, |manager, key, r, _| {
            let mode = r.mode();
            let timeout = timeout(r.timeout)?;
            Ok(async move {
                let domain = manager.shutdown(&key, mode, timeout).await?;
                Ok(ShutdownDomainResponse {
                    domain: Some(domain),
                })
            })
        })
        .await
    }

    async fn destroy_domain(
        &self,
        request: Request<DestroyDomainRequest>,
    ) -> Reply<DestroyDomainResponse> {
        self.on_domain("DestroyDomain", request, |manager, key, r, _| {
            let graceful = r.graceful;
            Ok(async move {
                let domain = manager.destroy(&key, graceful).await?;
                Ok(DestroyDomainResponse {
                    domain: Some(domain),
                })
            })
        })
        .await
    }

    async fn save_domain(&self, request: Request<SaveDomainRequest>) -> Reply<SaveDomainResponse> {
        self.on_domain("SaveDomain", request, |manager, key, _, _| {
            Ok(async move {
                let domain = manager.save(&key).await?;
                Ok(SaveDomainResponse {
                    domain: Some(domain),
                })
            })
        })
        .await
    }

    async fn restore_domain(
        &self,
        request: Request<RestoreDomainRequest>,
    ) -> Reply<RestoreDomainResponse> {
        self.on_domain("RestoreDomain", request, |manager, key, r, _| {
            let paused = r.paused;
            Ok(async move {
                let domain = manager.restore(&key, paused).await?;
                Ok(RestoreDomainResponse {
                    domain: Some(domain),
                })
            })
        })
        .await
    }

    async fn suspend_domain(
        &self,
        request: Request<SuspendDomainRequest>,
    ) -> Reply<SuspendDomainResponse> {
        self.on_domain("SuspendDomain", request, |manager, key, _, _| {
            Ok(async move {
                let domain = manager.suspend(&key).await?;
                Ok(SuspendDomainResponse {
                    domain: Some(domain),
                })
            })
        })
        .await
    }

    async fn resume_domain(
        &self,
        request: Request<ResumeDomainRequest>,
    ) -> Reply<ResumeDomainResponse> {
        self.on_domain("ResumeDomain", request, |manager, key, _, _| {
            Ok(async move {
                let domain = manager.resume(&key).await?;
                Ok(ResumeDomainResponse {
                    domain: Some(domain),
                })
            })
        })
        .await
    }

    async fn reset_domain(
        &self,
        request: Request<ResetDomainRequest>,
    ) -> Reply<ResetDomainResponse> {
        self.on_domain("ResetDomain", request, |manager, key, _, _| {
            Ok(async move {
                let domain = manager.reset(&key).await?;
                Ok(ResetDomainResponse {
                    domain: Some(domain),
                })
            })
        })
        .await
    }

    async fn reboot_domain(
        &self,
        request: Request<RebootDomainRequest>,
    ) -> Reply<RebootDomainResponse> {
        self.on_domain("RebootDomain", request, |manager, key, r, _| {
            let mode = r.mode();
            Ok(async move {
                let domain = manager.reboot(&key, mode).await?;
                Ok(RebootDomainResponse {
                    domain: Some(domain),
                })
            })
        })
        .await
    }

    async fn monitor_command(
        &self,
        request: Request<MonitorCommandRequest>,
    ) -> Reply<MonitorCommandResponse> {
        let request = request.into_inner();
        qvirt_common::telemetry::record_call(&request.domain, "", "");
        self.check_host(&request.host)?;
        let reply_json = self
            .manager
            .monitor_command(&domain_key(&request.domain)?, &request.command_json)
            .await?;
        Ok(Response::new(MonitorCommandResponse { reply_json }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn test_page_tokens_round_trip_and_are_tied_to_their_filter() {
        let filter = filter_digest(&[5, 1], "web-");
        assert_eq!(filter, filter_digest(&[1, 5, 5], "web-"));
        let token = page_token(filter, "web-042");
        assert_eq!(parse_page_token(&token, filter).unwrap(), "web-042");
        let other = filter_digest(&[1], "web-");
        assert!(matches!(
            parse_page_token(&token, other),
            Err(DomainError::InvalidArgument {
                field: "page_token",
                ..
            })
        ));
        for garbage in ["zz", "", "01", &"0".repeat(4096), "02000000000000000000"] {
            assert!(
                matches!(
                    parse_page_token(garbage, filter),
                    Err(DomainError::InvalidArgument {
                        field: "page_token",
                        ..
                    })
                ),
                "{garbage:?}"
            );
        }
    }

    #[test]
    fn test_page_sizes() {
        assert_eq!(page_size(0).unwrap(), DEFAULT_PAGE_SIZE);
        assert_eq!(page_size(7).unwrap(), 7);
        assert_eq!(page_size(i32::MAX).unwrap(), MAX_PAGE_SIZE);
        assert!(page_size(-1).is_err());
    }
}
