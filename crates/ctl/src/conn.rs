//! The connection to the gateway: its URL (`--connect`, `QVIRT_URL`,
//! `unix:PATH`), the bearer token (`--token-file`, `QVIRT_TOKEN`) sent
//! with every call, and one client per public service.

use std::path::PathBuf;
use std::time::Duration;

use qvirt_common::internal_auth::{InternalToken, TokenInterceptor};
use qvirt_proto::v1::event_bus_client::EventBusClient;
use qvirt_proto::v1::guest_agent_client::GuestAgentClient;
use qvirt_proto::v1::hook_executor_client::HookExecutorClient;
use qvirt_proto::v1::supervisor_client::SupervisorClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::CtlError;

/// How long connecting to the gateway may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest token file read (a token is 64 hex digits).
pub const MAX_TOKEN_BYTES: u64 = 4096;
/// The largest message qvirtctl accepts (a guest file read, a big QMP
/// reply): above the services' own limits.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Options every command takes.
#[derive(Debug, Clone, clap::Args)]
pub struct Global {
    /// The gateway: http://HOST:PORT, or unix:PATH for its read-write or
    /// read-only unix socket.
    #[arg(
        short = 'c',
        long,
        env = "QVIRT_URL",
        default_value = crate::DEFAULT_URL,
        value_name = "URL",
        global = true
    )]
    pub connect: String,
    /// A file holding the bearer token (QVIRT_TOKEN holds one directly).
    #[arg(long, env = "QVIRT_TOKEN_FILE", value_name = "FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// A file holding the deployment's internal secret: call a backend
    /// (e.g. a host's own supervisor, http://127.0.0.1:50052) directly, as
    /// the gateway does, when no gateway can be reached. Not needed for
    /// the gateway.
    #[arg(
        long,
        env = "QVIRT_INTERNAL_TOKEN_FILE",
        value_name = "FILE",
        global = true
    )]
    pub internal_token_file: Option<PathBuf>,
    /// Print results as JSON (events: one object per line).
    #[arg(long, global = true)]
    pub json: bool,
}

/// Adds `authorization: Bearer TOKEN` to every call when there is a
/// token, and the internal secret when there is one.
#[derive(Debug, Clone)]
pub struct Auth {
    bearer: Option<MetadataValue<Ascii>>,
    internal: TokenInterceptor,
}

impl Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.bearer {
            req.metadata_mut().insert("authorization", v.clone());
        }
        self.internal.call(req)
    }
}

/// A channel with the caller's token on every call.
pub type Svc = InterceptedService<Channel, Auth>;

/// A connected gateway.
#[derive(Debug, Clone)]
pub struct Gateway {
    channel: Channel,
    auth: Auth,
    /// The URL connected to, for messages.
    pub url: String,
}

impl Gateway {
    /// Reads the token and connects to the gateway `global` names.
    pub async fn connect(global: &Global) -> Result<Gateway, CtlError> {
        let internal = InternalToken::load_optional(global.internal_token_file.as_ref())
            .map_err(|e| CtlError::Usage(qvirt_common::error_chain(&e)))?;
        let auth = Auth {
            bearer: token(global)?,
            internal: TokenInterceptor::new(internal.as_ref()),
        };
        let url = normalize_url(&global.connect);
        let endpoint = qvirt_common::config::endpoint(&url)
            .map_err(|_| {
                CtlError::Usage(format!(
                    "invalid --connect URL {:?}: expected http://HOST:PORT or unix:PATH",
                    global.connect
                ))
            })?
            .connect_timeout(CONNECT_TIMEOUT);
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| CtlError::Connect {
                url: url.clone(),
                source,
            })?;
        Ok(Gateway { channel, auth, url })
    }

    /// The channel without the token (health checks need none).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    fn svc(&self) -> Svc {
        InterceptedService::new(self.channel.clone(), self.auth.clone())
    }

    /// `qvirt.v1.Supervisor`.
    pub fn supervisor(&self) -> SupervisorClient<Svc> {
        SupervisorClient::new(self.svc()).max_decoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// `qvirt.v1.EventBus`.
    pub fn events(&self) -> EventBusClient<Svc> {
        EventBusClient::new(self.svc()).max_decoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// `qvirt.v1.GuestAgent`.
    pub fn agent(&self) -> GuestAgentClient<Svc> {
        GuestAgentClient::new(self.svc())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// `qvirt.v1.HookExecutor`, answered only where the gateway exposes it.
    pub fn hooks(&self) -> HookExecutorClient<Svc> {
        HookExecutorClient::new(self.svc())
    }
}

/// `HOST:PORT` alone means `http://HOST:PORT`.
fn normalize_url(url: &str) -> String {
    if url.contains("://") || url.starts_with("unix:") {
        url.to_owned()
    } else {
        format!("http://{url}")
    }
}

/// The bearer token: from `--token-file`, else `QVIRT_TOKEN`, else none.
fn token(global: &Global) -> Result<Option<MetadataValue<Ascii>>, CtlError> {
    let (text, from) = if let Some(path) = &global.token_file {
        (read_token_file(path)?, format!("{}", path.display()))
    } else {
        match std::env::var("QVIRT_TOKEN") {
            Ok(t) => (t, "QVIRT_TOKEN".to_owned()),
            Err(std::env::VarError::NotPresent) => return Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(CtlError::Usage("QVIRT_TOKEN is not valid text".into()));
            }
        }
    };
    let token = text.trim();
    if token.is_empty() {
        return Err(CtlError::Usage(format!("no token in {from}")));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(CtlError::Usage(format!(
            "the token in {from} has characters a token never has"
        )));
    }
    MetadataValue::try_from(format!("Bearer {token}"))
        .map(Some)
        .map_err(|_| CtlError::Usage(format!("the token in {from} is not usable")))
}

fn read_token_file(path: &std::path::Path) -> Result<String, CtlError> {
    use std::io::Read;
    let io = |source| CtlError::Io {
        what: format!("cannot read the token file {}", path.display()),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut text = String::new();
    file.take(MAX_TOKEN_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(io)?;
    if text.len() as u64 > MAX_TOKEN_BYTES {
        return Err(CtlError::Usage(format!(
            "the token file {} is larger than {MAX_TOKEN_BYTES} bytes: not a token",
            path.display()
        )));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_normalize_url_adds_http_to_host_port_only() {
        assert_eq!(normalize_url("127.0.0.1:1"), "http://127.0.0.1:1");
        assert_eq!(normalize_url("http://h:1"), "http://h:1");
        assert_eq!(normalize_url("unix:/run/q.sock"), "unix:/run/q.sock");
    }
}
