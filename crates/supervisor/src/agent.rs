//! The [`GuestPower`] that asks the agent service (`qvirt.v1.GuestAgent/
//! Shutdown`, i.e. `guest-shutdown` in the guest) to power a guest down or
//! reboot it, configured by `agentd`. The supervisor then follows the
//! guest's power-off over QMP as for an ACPI shutdown.

use std::time::Duration;

use qvirt_common::internal_auth::TokenInterceptor;
use qvirt_proto::v1::guest_agent_client::GuestAgentClient;
use qvirt_proto::v1::{GuestShutdownMode, ShutdownRequest};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::seams::{AgentError, AgentFuture, AgentPower, GuestPower};

/// How long connecting to the agent service may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Calls the agent service; see the module docs.
#[derive(Debug, Clone)]
pub struct AgentService {
    client: GuestAgentClient<InterceptedService<Channel, TokenInterceptor>>,
    call_timeout: Duration,
}

impl AgentService {
    /// A client of the agent service at `endpoint`, connecting on first
    /// use, presenting the internal `token`; each call is bounded by
    /// `call_timeout`.
    pub fn new(endpoint: Endpoint, call_timeout: Duration, token: TokenInterceptor) -> Self {
        let channel = endpoint.connect_timeout(CONNECT_TIMEOUT).connect_lazy();
        AgentService {
            client: GuestAgentClient::with_interceptor(channel, token),
            call_timeout,
        }
    }
}

impl GuestPower for AgentService {
    fn power<'a>(&'a self, domain: &'a str, op: AgentPower) -> AgentFuture<'a> {
        Box::pin(async move {
            let mode = match op {
                AgentPower::Powerdown => GuestShutdownMode::Powerdown,
                AgentPower::Reboot => GuestShutdownMode::Reboot,
            };
            let mut request = tonic::Request::new(ShutdownRequest {
                domain: domain.to_owned(),
                mode: mode as i32,
                ..Default::default()
            });
            request.set_timeout(self.call_timeout);
            let mut client = self.client.clone();
            match tokio::time::timeout(self.call_timeout, client.shutdown(request)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(status)) => Err(AgentError {
                    code: status.code(),
                    message: status.message().to_owned(),
                    reason: qvirt_common::rpc::reason_of(&status),
                }),
                Err(_) => Err(AgentError {
                    code: tonic::Code::DeadlineExceeded,
                    message: format!("no answer within {:?}", self.call_timeout),
                    reason: None,
                }),
            }
        })
    }
}
