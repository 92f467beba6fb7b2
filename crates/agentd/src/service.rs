//! The `qvirt.v1.GuestAgent` RPCs: each finds the domain's channel
//! ([`crate::locate`], [`crate::channel`]), sends qemu-ga commands with the
//! request's timeout (or the configured default) and maps the replies
//! ([`crate::convert`]) and errors ([`crate::status`]). The multi-command
//! calls (Exec with wait, FileRead, FileWrite) live in [`crate::ops`].

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use qvirt_proto::v1 as pb;
use qvirt_proto::v1::guest_agent_server::GuestAgent;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::channel::{Channels, Outcome};
use crate::convert;
use crate::locate::Locator;
use crate::status;
use crate::wire::{self, MAX_JSON_VALUES, Reply};

/// The longest per-command timeout a request may ask for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Limits of the multi-command calls.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Per-command timeout when the request has none.
    pub default_timeout: Duration,
    /// Largest FileRead result / FileWrite payload.
    pub max_file_bytes: usize,
    /// Bytes per guest-file-read / guest-file-write.
    pub file_chunk_bytes: usize,
    /// Longest pause between guest-exec-status polls.
    pub exec_poll_max: Duration,
}

/// The `qvirt.v1.GuestAgent` service.
#[derive(Debug, Clone)]
pub struct GuestAgentService {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    locator: Locator,
    channels: Channels,
    pub(crate) limits: Limits,
}

/// One call's target: the guest's agent socket and the per-command
/// timeout. The first command's deadline counts from the start of the RPC
/// (the domain lookup and any wait in the guest's queue use it up); each
/// later command of a multi-command call gets the whole timeout.
pub(crate) struct Target<'a> {
    channels: &'a Channels,
    path: PathBuf,
    pub(crate) timeout: Duration,
    first_deadline: Instant,
    first_used: AtomicBool,
}

impl Target<'_> {
    /// Sends one raw command (an object with `execute`).
    pub(crate) async fn send(&self, request: Map<String, Value>) -> Result<Outcome, Status> {
        let deadline = if self.first_used.swap(true, Ordering::Relaxed) {
            Instant::now() + self.timeout
        } else {
            self.first_deadline
        };
        self.channels
            .call(&self.path, request, deadline, self.timeout)
            .await
            .map_err(status::channel)
    }

    /// Sends one command; an agent error becomes a status, a command
    /// without a success response yields `Value::Null`.
    pub(crate) async fn call(&self, execute: &str, args: Option<Value>) -> Result<Value, Status> {
        let mut request = Map::new();
        request.insert("execute".into(), Value::String(execute.to_owned()));
        if let Some(args) = args {
            request.insert("arguments".into(), args);
        }
        match self.send(request).await? {
            Outcome::Reply(Reply::Return(v)) => Ok(v),
            Outcome::Reply(Reply::Error(e)) => Err(status::agent(&e)),
            Outcome::Accepted => Ok(Value::Null),
        }
    }

    /// Sends one command and decodes its `return` as `T`.
    pub(crate) async fn get<T: DeserializeOwned>(
        &self,
        execute: &str,
        args: Option<Value>,
    ) -> Result<T, Status> {
        let v = self.call(execute, args).await?;
        serde_json::from_value(v).map_err(|e| status::bad_shape(execute, &e))
    }
}

impl GuestAgentService {
    /// A service over `locator` and `channels`.
    pub fn new(locator: Locator, channels: Channels, limits: Limits) -> Self {
        GuestAgentService {
            inner: Arc::new(Inner {
                locator,
                channels,
                limits,
            }),
        }
    }

    /// The channel of `domain` and the timeout a request asked for.
    pub(crate) async fn target(
        &self,
        domain: &str,
        timeout: Option<prost_types::Duration>,
    ) -> Result<Target<'_>, Status> {
        let start = Instant::now();
        let timeout = match timeout {
            None => self.inner.limits.default_timeout,
            Some(d) => match Duration::try_from(d) {
                Ok(d) if !d.is_zero() => d.min(MAX_TIMEOUT),
                _ => return Err(Status::invalid_argument("timeout must be positive")),
            },
        };
        let path = self
            .inner
            .locator
            .locate(domain, timeout)
            .await
            .map_err(status::locate)?;
        Ok(Target {
            channels: &self.inner.channels,
            path,
            timeout,
            first_deadline: start + timeout,
            first_used: AtomicBool::new(false),
        })
    }
}

#[tonic::async_trait]
impl GuestAgent for GuestAgentService {
    #[tracing::instrument(level = "debug", name = "ping", skip_all, fields(domain = %req.get_ref().domain))]
    async fn ping(
        &self,
        req: Request<pb::PingRequest>,
    ) -> Result<Response<pb::PingResponse>, Status> {
        let req = req.into_inner();
        let t = self.target(&req.domain, req.timeout).await?;
        t.call("guest-ping", None).await?;
        Ok(Response::new(pb::PingResponse {}))
    }

    #[tracing::instrument(level = "debug", name = "info", skip_all, fields(domain = %req.get_ref().domain))]
    async fn info(
        &self,
        req: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let req = req.into_inner();
        let t = self.target(&req.domain, req.timeout).await?;
        let info: convert::AgentInfo = t.get("guest-info", None).await?;
        Ok(Response::new(info.into()))
    }

    #[tracing::instrument(level = "debug", name = "get_time", skip_all, fields(domain = %req.get_ref().domain))]
    async fn get_time(
        &self,
        req: Request<pb::GetTimeRequest>,
    ) -> Result<Response<pb::GetTimeResponse>, Status> {
        let req = req.into_inner();
        let t = self.target(&req.domain, req.timeout).await?;
        let ns: i64 = t.get("guest-get-time", None).await?;
        Ok(Response::new(pb::GetTimeResponse {
            time: Some(convert::timestamp_from_nanos(ns)),
        }))
    }

    #[tracing::instrument(level = "debug", name = "os_info", skip_all, fields(domain = %req.get_ref().domain))]
    async fn os_info(
        &self,
        req: Request<pb::OsInfoRequest>,
    ) -> Result<Response<pb::OsInfoResponse>, Status> {
        let req = req.into_inner();
        let t = self.target(&req.domain, req.timeout).await?;
        let os: convert::OsInfo = t.get("guest-get-osinfo", None).await?;
        Ok(Response::new(os.into()))
    }

    #[tracing::instrument(level = "debug", name = "host_name", skip_all, fields(domain = %req.get_ref().domain))]
    async fn host_name(
        &self,
        req: Request<pb::HostNameRequest>,
    ) -> Result<Response<pb::HostNameResponse>, Status> {
        let req = req.into_inner();
        let t = self.target(&req.domain, req.timeout).await?;
        let h: convert::HostName = t.get("guest-get-host-name", None).await?;
        Ok(Response::new(pb::HostNameResponse {
            host_name: h.host_name,
        }))
    }

    #[tracing::instrument(level = "debug", name = "timezone", skip_all, fields(domain = %req.get_ref().domain))]
    async fn timezone(
        &self,
        req: Request<pb::TimezoneRequest>,
    ) -> Result<Response<pb::TimezoneResponse>, Status> {
        let req = req.into_inner();
        let t = self.target(&req.domain, req.timeout).await?;
        let tz: convert::Timezone = t.get("guest-get-timezone", None).await?;
        Ok(Response::new(tz.into()))
    }

    #[tracing::instrument(level = "debug", name = "users", skip_all, fields(domain = %req.get_ref().domain))]
    async fn users(
        &self,
        req: Request<pb::UsersRequest>,
    ) -> Result<Response<pb::UsersResponse>, Status> {
        let req = req.into_inner();
        let t = self.target(&req.domain, req.timeout).await?;
        let users: Vec<convert::User> = t.get("guest-get-users", None).await?;
        Ok(Response::new(pb::UsersResponse {
            users: users.into_iter().map(Into::into).collect(),
        }))
    }

    #[tracing::instrument(level = "debug", name = "network_interfaces", skip_all, fields(domain = %req.get_ref().domain))]
    async fn network_interfaces(
        &self,
        req: Request<pb::NetworkInterfacesRequest>,
    ) -> Result<Response<pb::NetworkInterfacesResponse>, Status> {
        let req = req.into_inner();
        let t = self.target(&req.domain, req.timeout).await?;
        let ifs: Vec<convert::Interface> = t.get("guest-network-get-interfaces", None).await?;
        Ok(Response::new(pb::NetworkInterfacesResponse {
            interfaces: ifs.into_iter().map(Into::into).collect(),
        }))
    }

    #[tracing::instrument(level = "debug", name = "fs_info", skip_all, fields(domain = %req.get_ref().domain))]
    async fn fs_info(
        &self,
        req: Request<pb::FsInfoRequest>,
    ) -> Result<Response<pb::FsInfoResponse>, Status> {
        let req = req.into_inner();
        let t = self.target(&req.domain, req.timeout).await?;
        let fs: Vec<convert::Filesystem> = t.get("guest-get-fsinfo", None).await?;
        Ok(Response::new(pb::FsInfoResponse {
            filesystems: fs.into_iter().map(Into::into).collect(),
        }))
    }

    #[tracing::instrument(level = "debug", name = "fs_freeze", skip_all, fields(domain = %req.get_ref().domain))]
    async fn fs_freeze(
        &self,
        req: Request<pb::FsFreezeRequest>,
    ) -> Result<Response<pb::FsFreezeResponse>, Status> {
        let req = req.into_inner();
        let t = self.target(&req.domain, req.timeout).await?;
        let n: i64 = if req.mountpoints.is_empty() {
            t.get("guest-fsfreeze-freeze", None).await?
        } else {
            let args = json!({ "mountpoints": req.mountpoints });
            t.get("guest-fsfreeze-freeze-list", Some(args)).await?
        };
        Ok(Response::new(pb::FsFreezeResponse {
            frozen: u32::try_from(n).unwrap_or(0),
        }))
    }

    #[tracing::instrument(level = "debug", name = "fs_thaw", skip_all, fields(domain = %req.get_ref().domain))]
    async fn fs_thaw(
        &self,
        req: Request<pb::FsThawRequest>,
    ) -> Result<Response<pb::FsThawResponse>, Status> {
        let req = req.into_inner();
        let t = self.target(&req.domain, req.timeout).await?;
        let n: i64 = t.get("guest-fsfreeze-thaw", None).await?;
        Ok(Response::new(pb::FsThawResponse {
            thawed: u32::try_from(n).unwrap_or(0),
        }))
    }

    #[tracing::instrument(level = "debug", name = "fs_freeze_status", skip_all, fields(domain = %req.get_ref().domain))]
    async fn fs_freeze_status(
        &self,
        req: Request<pb::FsFreezeStatusRequest>,
    ) -> Result<Response<pb::FsFreezeStatusResponse>, Status> {
        let req = req.into_inner();
        let t = self.target(&req.domain, req.timeout).await?;
        let s: String = t.get("guest-fsfreeze-status", None).await?;
        let state = match s.as_str() {
            "thawed" => pb::FsFreezeState::Thawed,
            "frozen" => pb::FsFreezeState::Frozen,
            other => {
                return Err(status::untrusted_reply(&format!(
                    "unknown fsfreeze state {other:?}"
                )));
            }
        };
        Ok(Response::new(pb::FsFreezeStatusResponse {
            state: state as i32,
        }))
    }

    #[tracing::instrument(level = "debug", name = "exec", skip_all, fields(domain = %req.get_ref().domain))]
    async fn exec(
        &self,
        req: Request<pb::ExecRequest>,
    ) -> Result<Response<pb::ExecResponse>, Status> {
        let req = req.into_inner();
        let t = self.target(&req.domain, req.timeout).await?;
        Ok(Response::new(
            crate::ops::exec(&t, &self.inner.limits, req).await?,
        ))
    }

    #[tracing::instrument(level = "debug", name = "exec_status", skip_all, fields(domain = %req.get_ref().domain))]
    async fn exec_status(
        &self,
        req: Request<pb::ExecStatusRequest>,
    ) -> Result<Response<pb::ExecStatusResponse>, Status> {
        let req = req.into_inner();
        let t = self.target(&req.domain, req.timeout).await?;
        let status = crate::ops::exec_status(&t, req.pid).await?;
        Ok(Response::new(pb::ExecStatusResponse {
            status: Some(status),
        }))
    }

    #[tracing::instrument(level = "debug", name = "file_read", skip_all, fields(domain = %req.get_ref().domain))]
    async fn file_read(
        &self,
        req: Request<pb::FileReadRequest>,
    ) -> Result<Response<pb::FileReadResponse>, Status> {
        let req = req.into_inner();
        let t = self.target(&req.domain, req.timeout).await?;
        Ok(Response::new(
            crate::ops::file_read(&t, &self.inner.limits, req).await?,
        ))
    }

    #[tracing::instrument(level = "debug", name = "file_write", skip_all, fields(domain = %req.get_ref().domain))]
    async fn file_write(
        &self,
        req: Request<pb::FileWriteRequest>,
    ) -> Result<Response<pb::FileWriteResponse>, Status> {
        let req = req.into_inner();
        let t = self.target(&req.domain, req.timeout).await?;
        Ok(Response::new(
            crate::ops::file_write(&t, &self.inner.limits, req).await?,
        ))
    }

    #[tracing::instrument(level = "debug", name = "shutdown", skip_all, fields(domain = %req.get_ref().domain))]
    async fn shutdown(
        &self,
        req: Request<pb::ShutdownRequest>,
    ) -> Result<Response<pb::ShutdownResponse>, Status> {
        let req = req.into_inner();
        let mode = match pb::GuestShutdownMode::try_from(req.mode) {
            Ok(pb::GuestShutdownMode::Unspecified | pb::GuestShutdownMode::Powerdown) => {
                "powerdown"
            }
            Ok(pb::GuestShutdownMode::Halt) => "halt",
            Ok(pb::GuestShutdownMode::Reboot) => "reboot",
            Err(_) => return Err(Status::invalid_argument("mode: unknown shutdown mode")),
        };
        let t = self.target(&req.domain, req.timeout).await?;
        t.call("guest-shutdown", Some(json!({ "mode": mode })))
            .await?;
        Ok(Response::new(pb::ShutdownResponse {}))
    }

    #[tracing::instrument(level = "debug", name = "command", skip_all, fields(domain = %req.get_ref().domain))]
    async fn command(
        &self,
        req: Request<pb::CommandRequest>,
    ) -> Result<Response<pb::CommandResponse>, Status> {
        let req = req.into_inner();
        if !wire::json_values_at_most(req.command_json.as_bytes(), MAX_JSON_VALUES) {
            return Err(Status::invalid_argument(format!(
                "command_json holds more than {} JSON values",
                MAX_JSON_VALUES
            )));
        }
        let value: Value = serde_json::from_str(&req.command_json)
            .map_err(|e| Status::invalid_argument(format!("command_json is not JSON: {e}")))?;
        let Value::Object(mut request) = value else {
            return Err(Status::invalid_argument(
                "command_json must be a JSON object",
            ));
        };
        if !request.get("execute").is_some_and(Value::is_string) {
            return Err(Status::invalid_argument(
                "command_json must have an \"execute\" string member",
            ));
        }
        request.remove("id");
        let t = self.target(&req.domain, req.timeout).await?;
        let outcome = t.send(request).await?;
        let reply_json = match outcome {
            Outcome::Reply(r) => r.to_json(),
            Outcome::Accepted => String::new(),
        };
        Ok(Response::new(pb::CommandResponse { reply_json }))
    }
}
