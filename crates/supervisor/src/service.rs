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
        let domain = self.manager.define(spec, request.allow_update).await?;
        Ok(Response::new(DefineDomainResponse {
            domain: Some(domain),
        }))
    }

    async fn undefine_domain(
        &self,
        request: Request<UndefineDomainRequest>,
    ) -> Reply<UndefineDomainResponse> {
        let request = request.into_inner();
        self.manager
            .undefine(domain_key(&request.domain)?, request.destroy)
            .await?;
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
        let domain = self
            .manager
            .start(domain_key(&request.domain)?, request.paused)
            .await?;
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
        let domain = self
            .manager
            .shutdown(
                domain_key(&request.domain)?,
                mode,
                timeout(request.timeout)?,
            )
            .await?;
        Ok(Response::new(ShutdownDomainResponse {
            domain: Some(domain),
        }))
    }

    async fn destroy_domain(
        &self,
        request: Request<DestroyDomainRequest>,
    ) -> Reply<DestroyDomainResponse> {
        let request = request.into_inner();
        let domain = self
            .manager
            .destroy(domain_key(&request.domain)?, request.graceful)
            .await?;
        Ok(Response::new(DestroyDomainResponse {
            domain: Some(domain),
        }))
    }

    async fn suspend_domain(
        &self,
        request: Request<SuspendDomainRequest>,
    ) -> Reply<SuspendDomainResponse> {
        let domain = self
            .manager
            .suspend(domain_key(&request.into_inner().domain)?)
            .await?;
        Ok(Response::new(SuspendDomainResponse {
            domain: Some(domain),
        }))
    }

    async fn resume_domain(
        &self,
        request: Request<ResumeDomainRequest>,
    ) -> Reply<ResumeDomainResponse> {
        let domain = self
            .manager
            .resume(domain_key(&request.into_inner().domain)?)
            .await?;
        Ok(Response::new(ResumeDomainResponse {
            domain: Some(domain),
        }))
    }

    async fn reset_domain(
        &self,
        request: Request<ResetDomainRequest>,
    ) -> Reply<ResetDomainResponse> {
        let domain = self
            .manager
            .reset(domain_key(&request.into_inner().domain)?)
            .await?;
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
        let domain = self
            .manager
            .reboot(domain_key(&request.domain)?, mode)
            .await?;
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
