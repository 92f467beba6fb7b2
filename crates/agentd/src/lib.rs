//! qvirt-agentd: the gRPC face of guest agents (`qvirt.v1.GuestAgent`). It
//! finds a domain's agent socket ([`locate`]: a static map or the
//! supervisor), keeps one connection per guest that it resynchronises
//! before first use and after any timeout or error ([`channel`] over the
//! qemu-ga framing of [`wire`]), runs that guest's commands one at a time
//! with a timeout each, and maps qemu-ga's replies to the typed messages
//! ([`convert`]) and its errors to gRPC codes (the table in `status.rs`).
//! It does not run guests (the supervisor does) and does not run inside
//! them (`qvirt-ga` does).
//!
//! Modules: [`service`] (the RPCs), [`call`] (a call's target, limits and
//! timeout rule), `ops` (Exec, ReadFile, WriteFile: calls of several agent
//! commands), `admin` (vCPUs, passwords, SSH keys), [`convert`] (replies
//! to messages), [`channel`], [`wire`] and [`socket`] (one connection per
//! guest and its framing), [`locate`] (where a guest's agent is),
//! [`config`], and `status` (errors to gRPC statuses).
//!
//! Entry point: [`run`], called by `main.rs` with a bound listener and the
//! shutdown token.

mod admin;
pub mod call;
pub mod channel;
pub mod config;
pub mod convert;
pub mod locate;
mod ops;
pub mod service;
pub mod socket;
mod status;
pub mod wire;

use std::time::Duration;

use qvirt_common::cli::ServiceConfig as _;
use qvirt_common::internal_auth::{InternalAuth, InternalToken, TokenInterceptor};
use qvirt_common::serve::{self, Listener, ServeError, Services};
use qvirt_proto::v1::guest_agent_server::GuestAgentServer;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use service::GuestAgentService;

/// gRPC framing room on top of the payload limits in a message.
const MESSAGE_OVERHEAD: usize = 64 * 1024;

/// Why the agent service stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The supervisor endpoint is unusable.
    #[error("invalid supervisor endpoint")]
    Supervisor(#[source] tonic::transport::Error),
    /// The internal token file is unusable (it was fine when the config
    /// was checked).
    #[error("internal token")]
    InternalToken(#[source] qvirt_common::config::ConfigError),
    /// Serving failed.
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// Serves `qvirt.v1.GuestAgent`, health and reflection on `listener` until
/// `shutdown` fires; then every guest channel closes.
pub async fn run(
    config: Config,
    listener: Listener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let options = config.serve_options();
    let token = InternalToken::load_optional(config.internal_token_file.as_ref())
        .map_err(RunError::InternalToken)?;
    let auth = InternalAuth::new(token.clone(), &config.internal_uids);
    auth.log_policy("GuestAgent/*");
    let locator = locate::Locator::new(
        config.agents.clone(),
        config.supervisor.as_deref(),
        TokenInterceptor::new(token.as_ref()),
    )
    .map_err(RunError::Supervisor)?;
    let channels = channel::Channels::new(
        channel::ChannelSettings {
            sync_timeout: Duration::from_millis(config.sync_timeout_ms),
            max_reply_bytes: config.max_reply_bytes,
            queue_depth: config.queue_depth,
            idle_close: (config.idle_close_secs > 0)
                .then(|| Duration::from_secs(config.idle_close_secs)),
        },
        shutdown.child_token(),
    );
    let limits = call::Limits {
        default_timeout: config.command_timeout(),
        max_file_bytes: config.max_file_bytes,
        file_chunk_bytes: config.file_chunk_bytes,
        exec_poll_max: Duration::from_millis(config.exec_poll_max_ms),
    };
    tracing::info!(
        static_agents = config.agents.len(),
        supervisor = config.supervisor.as_deref().unwrap_or("none"),
        command_timeout_ms = config.command_timeout_ms,
        "agent service ready"
    );
    // Requests carry at most a file to write (or a raw command of that
    // size); a response is built from one agent reply (at most
    // max_reply_bytes: GetExecStatus output, a raw Command's reply) or from a
    // whole file read in chunks.
    let request_limit = config.max_file_bytes + MESSAGE_OVERHEAD;
    let response_limit = config.max_file_bytes.max(config.max_reply_bytes) + MESSAGE_OVERHEAD;
    let server = GuestAgentServer::new(GuestAgentService::new(locator, channels, limits))
        .max_decoding_message_size(request_limit)
        .max_encoding_message_size(response_limit);
    let services = Services::new().options(options).with(auth.only(server));
    Ok(serve::serve(listener, services, shutdown).await?)
}
