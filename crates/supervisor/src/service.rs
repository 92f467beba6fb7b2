//! `qvirt.v1.Supervisor` over the [`Manager`]: request checks and the
//! mapping of results; the work is in [`crate::domain`], the error table
//! in [`crate::status`].

use std::time::Duration;

use qvirt_proto::v1::define_domain_request::Source;
use qvirt_proto::v1::supervisor_server::Supervisor;
use qvirt_proto::v1::*;
use tonic::{Request, Response, Status};

use crate::domain::{DomainError, Manager};

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct SupervisorService {
    manager: Manager,
}

impl SupervisorService {
    /// A service over `manager`.
    pub fn new(manager: Manager) -> Self {
        SupervisorService { manager }
    }
}

fn domain_key(key: &str) -> Result<&str, Status> {
    if key.is_empty() {
        return Err(Status::invalid_argument(
            "domain (name or UUID) is required",
        ));
    }
    Ok(key)
}

fn timeout(d: Option<prost_types::Duration>) -> Result<Option<Duration>, Status> {
    match d {
        None => Ok(None),
        Some(d) => Duration::try_from(d)
            .map(Some)
            .map_err(|_| Status::invalid_argument("timeout must not be negative")),
    }
}

type Reply<T> = Result<Response<T>, Status>;

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
        Err(error) => Err(Status::internal(format!("domain task failed: {error}"))),
    }
}

#[tonic::async_trait]
impl Supervisor for SupervisorService {
    async fn define_domain(
        &self,
        request: Request<DefineDomainRequest>,
    ) -> Reply<DefineDomainResponse> {
        let request = request.into_inner();
        let spec = match request.source {
            Some(Source::Spec(spec)) => spec,
            Some(Source::SpecYaml(text)) => DomainSpec::from_yaml(&text)
                .map_err(|e| DomainError::Yaml(qvirt_proto::yaml::error_text(&e)))?,
            None => {
                return Err(Status::invalid_argument(
                    "one of spec or spec_yaml is required",
                ));
            }
        };
        let manager = self.manager.clone();
        let allow_update = request.allow_update;
        let domain = detached(async move { manager.define(spec, allow_update).await }).await?;
        Ok(Response::new(DefineDomainResponse {
            domain: Some(domain),
        }))
    }

    async fn undefine_domain(
        &self,
        request: Request<UndefineDomainRequest>,
    ) -> Reply<UndefineDomainResponse> {
        let request = request.into_inner();
        let key = domain_key(&request.domain)?.to_owned();
        let manager = self.manager.clone();
        let destroy = request.destroy;
        detached(async move { manager.undefine(&key, destroy).await }).await?;
        Ok(Response::new(UndefineDomainResponse {}))
    }

    async fn list_domains(
        &self,
        request: Request<ListDomainsRequest>,
    ) -> Reply<ListDomainsResponse> {
        let domains = self.manager.list(&request.into_inner().states);
        Ok(Response::new(ListDomainsResponse { domains }))
    }

    async fn get_domain(&self, request: Request<GetDomainRequest>) -> Reply<GetDomainResponse> {
        let domain = self
            .manager
            .get(domain_key(&request.into_inner().domain)?)?;
        Ok(Response::new(GetDomainResponse {
            domain: Some(domain),
        }))
    }

    async fn start_domain(
        &self,
        request: Request<StartDomainRequest>,
    ) -> Reply<StartDomainResponse> {
        let request = request.into_inner();
        let key = domain_key(&request.domain)?.to_owned();
        let manager = self.manager.clone();
        let paused = request.paused;
        let domain = detached(async move { manager.start(&key, paused).await }).await?;
        Ok(Response::new(StartDomainResponse {
            domain: Some(domain),
        }))
    }

    async fn shutdown_domain(
        &self,
        request: Request<ShutdownDomainRequest>,
    ) -> Reply<ShutdownDomainResponse> {
        let request = request.into_inner();
        let mode = request.mode();
        let key = domain_key(&request.domain)?.to_owned();
        let timeout = timeout(request.timeout)?;
        let manager = self.manager.clone();
        let domain = detached(async move { manager.shutdown(&key, mode, timeout).await }).await?;
        Ok(Response::new(ShutdownDomainResponse {
            domain: Some(domain),
        }))
    }

    async fn destroy_domain(
        &self,
        request: Request<DestroyDomainRequest>,
    ) -> Reply<DestroyDomainResponse> {
        let request = request.into_inner();
        let key = domain_key(&request.domain)?.to_owned();
        let manager = self.manager.clone();
        let graceful = request.graceful;
        let domain = detached(async move { manager.destroy(&key, graceful).await }).await?;
        Ok(Response::new(DestroyDomainResponse {
            domain: Some(domain),
        }))
    }

    async fn suspend_domain(
        &self,
        request: Request<SuspendDomainRequest>,
    ) -> Reply<SuspendDomainResponse> {
        let key = domain_key(&request.into_inner().domain)?.to_owned();
        let manager = self.manager.clone();
        let domain = detached(async move { manager.suspend(&key).await }).await?;
        Ok(Response::new(SuspendDomainResponse {
            domain: Some(domain),
        }))
    }

    async fn resume_domain(
        &self,
        request: Request<ResumeDomainRequest>,
    ) -> Reply<ResumeDomainResponse> {
        let key = domain_key(&request.into_inner().domain)?.to_owned();
        let manager = self.manager.clone();
        let domain = detached(async move { manager.resume(&key).await }).await?;
        Ok(Response::new(ResumeDomainResponse {
            domain: Some(domain),
        }))
    }

    async fn reset_domain(
        &self,
        request: Request<ResetDomainRequest>,
    ) -> Reply<ResetDomainResponse> {
        let key = domain_key(&request.into_inner().domain)?.to_owned();
        let manager = self.manager.clone();
        let domain = detached(async move { manager.reset(&key).await }).await?;
        Ok(Response::new(ResetDomainResponse {
            domain: Some(domain),
        }))
    }

    async fn reboot_domain(
        &self,
        request: Request<RebootDomainRequest>,
    ) -> Reply<RebootDomainResponse> {
        let request = request.into_inner();
        let mode = request.mode();
        let key = domain_key(&request.domain)?.to_owned();
        let manager = self.manager.clone();
        let domain = detached(async move { manager.reboot(&key, mode).await }).await?;
        Ok(Response::new(RebootDomainResponse {
            domain: Some(domain),
        }))
    }

    async fn monitor_command(
        &self,
        request: Request<MonitorCommandRequest>,
    ) -> Reply<MonitorCommandResponse> {
        let request = request.into_inner();
        let reply_json = self
            .manager
            .monitor_command(domain_key(&request.domain)?, &request.command_json)
            .await?;
        Ok(Response::new(MonitorCommandResponse { reply_json }))
    }
}
