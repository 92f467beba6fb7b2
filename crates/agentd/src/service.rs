//! The `qvirt.v1.GuestAgent` RPCs: each finds the domain's channel
//! ([`crate::locate`], [`crate::channel`]), sends qemu-ga commands with the
//! request's timeout (or the configured default) and maps the replies
//! ([`crate::convert`]) and errors ([`crate::status`]). The multi-command
//! calls (Exec with wait, ReadFile, WriteFile) live in [`crate::ops`], the
//! guest administration calls (CPUs, password, SSH keys) in
//! [`crate::admin`].

use std::sync::Arc;

use qvirt_proto::v1 as pb;
use qvirt_proto::v1::guest_agent_server::GuestAgent;
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::admin;
use crate::call::{Limits, Target, no_nul, request_timeout};
use crate::channel::{Channels, Outcome};
use crate::convert;
use crate::locate::Locator;
use crate::status::{self, CallError};
use crate::wire::{self, MAX_JSON_VALUES};

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

    /// The channel of `domain` on `host` and the timeout a request asked
    /// for.
    pub(crate) async fn target(
        &self,
        domain: &str,
        host: &str,
        timeout: Option<prost_types::Duration>,
    ) -> Result<Target<'_>, CallError> {
        // Every RPC finds its guest here: the call's log line names it.
        qvirt_common::telemetry::record_call(domain, "", "");
        let start = Instant::now();
        let timeout = request_timeout(timeout, self.inner.limits.default_timeout)?;
        let path = self.inner.locator.locate(domain, host, timeout).await?;
        Ok(Target::new(&self.inner.channels, path, timeout, start))
    }
}

impl GuestAgentService {
    /// A call of one command without arguments, its `return` decoded as
    /// `T`.
    async fn get<T: DeserializeOwned>(
        &self,
        domain: &str,
        host: &str,
        timeout: Option<prost_types::Duration>,
        execute: &str,
    ) -> Result<T, CallError> {
        let t = self.target(domain, host, timeout).await?;
        t.get(execute, None).await
    }

    async fn freeze(&self, req: &pb::FreezeFilesystemsRequest) -> Result<i64, CallError> {
        for (i, m) in req.mountpoints.iter().enumerate() {
            no_nul(&format!("mountpoints[{i}]"), m)?;
        }
        let t = self.target(&req.domain, &req.host, req.timeout).await?;
        if req.mountpoints.is_empty() {
            t.get("guest-fsfreeze-freeze", None).await
        } else {
            let args = json!({ "mountpoints": req.mountpoints });
            t.get("guest-fsfreeze-freeze-list", Some(args)).await
        }
    }

    async fn freeze_status(
        &self,
        req: &pb::GetFreezeStatusRequest,
    ) -> Result<pb::FsFreezeState, CallError> {
        let execute = "guest-fsfreeze-status";
        let s: String = self
            .get(&req.domain, &req.host, req.timeout, execute)
            .await?;
        match s.as_str() {
            "thawed" => Ok(pb::FsFreezeState::Thawed),
            "frozen" => Ok(pb::FsFreezeState::Frozen),
            other => Err(CallError::bad_reply(
                execute,
                format!("unknown fsfreeze state {other:?}"),
            )),
        }
    }

    async fn shutdown_guest(&self, req: &pb::ShutdownRequest) -> Result<(), CallError> {
        let mode = match pb::GuestShutdownMode::try_from(req.mode) {
            Ok(pb::GuestShutdownMode::Unspecified | pb::GuestShutdownMode::Powerdown) => {
                "powerdown"
            }
            Ok(pb::GuestShutdownMode::Halt) => "halt",
            Ok(pb::GuestShutdownMode::Reboot) => "reboot",
            Err(_) => return Err(CallError::request("mode", "unknown shutdown mode")),
        };
        let t = self.target(&req.domain, &req.host, req.timeout).await?;
        t.call("guest-shutdown", Some(json!({ "mode": mode })))
            .await
            .map(drop)
    }

    async fn raw_command(&self, req: &pb::CommandRequest) -> Result<String, CallError> {
        let bad = |description: String| CallError::request("command_json", description);
        if !wire::json_values_at_most(req.command_json.as_bytes(), MAX_JSON_VALUES) {
            return Err(bad(format!(
                "holds more than {MAX_JSON_VALUES} JSON values"
            )));
        }
        let command =
            qvirt_common::qapi::parse_command(&req.command_json).map_err(|e| bad(e.to_string()))?;
        let t = self.target(&req.domain, &req.host, req.timeout).await?;
        Ok(match t.send(command.request).await? {
            Outcome::Reply(r) => r.to_json(),
            Outcome::Accepted => String::new(),
        })
    }
}

/// A count the agent reported, as the proto's `uint32`.
fn count(n: i64) -> u32 {
    u32::try_from(n).unwrap_or(0)
}

#[tonic::async_trait]
impl GuestAgent for GuestAgentService {
    async fn ping(
        &self,
        req: Request<pb::PingRequest>,
    ) -> Result<Response<pb::PingResponse>, Status> {
        let req = req.into_inner();
        let r = async {
            let t = self.target(&req.domain, &req.host, req.timeout).await?;
            t.call("guest-ping", None).await?;
            Ok::<_, CallError>(pb::PingResponse {})
        }
        .await;
        status::reply(&req.domain, &req.host, r)
    }

    async fn get_agent_info(
        &self,
        req: Request<pb::GetAgentInfoRequest>,
    ) -> Result<Response<pb::GetAgentInfoResponse>, Status> {
        let req = req.into_inner();
        let r = self
            .get::<convert::AgentInfo>(&req.domain, &req.host, req.timeout, "guest-info")
            .await
            .map(Into::into);
        status::reply(&req.domain, &req.host, r)
    }

    async fn get_time(
        &self,
        req: Request<pb::GetTimeRequest>,
    ) -> Result<Response<pb::GetTimeResponse>, Status> {
        let req = req.into_inner();
        let r = self
            .get::<i64>(&req.domain, &req.host, req.timeout, "guest-get-time")
            .await
            .map(|ns| pb::GetTimeResponse {
                time: Some(convert::timestamp_from_nanos(ns)),
            });
        status::reply(&req.domain, &req.host, r)
    }

    async fn get_os_info(
        &self,
        req: Request<pb::GetOsInfoRequest>,
    ) -> Result<Response<pb::GetOsInfoResponse>, Status> {
        let req = req.into_inner();
        let r = self
            .get::<convert::OsInfo>(&req.domain, &req.host, req.timeout, "guest-get-osinfo")
            .await
            .map(Into::into);
        status::reply(&req.domain, &req.host, r)
    }

    async fn get_host_name(
        &self,
        req: Request<pb::GetHostNameRequest>,
    ) -> Result<Response<pb::GetHostNameResponse>, Status> {
        let req = req.into_inner();
        let r = self
            .get::<convert::HostName>(&req.domain, &req.host, req.timeout, "guest-get-host-name")
            .await
            .map(|h| pb::GetHostNameResponse {
                host_name: h.host_name,
            });
        status::reply(&req.domain, &req.host, r)
    }

    async fn get_timezone(
        &self,
        req: Request<pb::GetTimezoneRequest>,
    ) -> Result<Response<pb::GetTimezoneResponse>, Status> {
        let req = req.into_inner();
        let r = self
            .get::<convert::Timezone>(&req.domain, &req.host, req.timeout, "guest-get-timezone")
            .await
            .map(Into::into);
        status::reply(&req.domain, &req.host, r)
    }

    async fn list_users(
        &self,
        req: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        let req = req.into_inner();
        let r = self
            .get::<Vec<convert::User>>(&req.domain, &req.host, req.timeout, "guest-get-users")
            .await
            .map(|users| pb::ListUsersResponse {
                users: users.into_iter().map(Into::into).collect(),
            });
        status::reply(&req.domain, &req.host, r)
    }

    async fn list_network_interfaces(
        &self,
        req: Request<pb::ListNetworkInterfacesRequest>,
    ) -> Result<Response<pb::ListNetworkInterfacesResponse>, Status> {
        let req = req.into_inner();
        let execute = "guest-network-get-interfaces";
        let r = self
            .get::<Vec<convert::Interface>>(&req.domain, &req.host, req.timeout, execute)
            .await
            .map(|ifs| pb::ListNetworkInterfacesResponse {
                interfaces: ifs.into_iter().map(Into::into).collect(),
            });
        status::reply(&req.domain, &req.host, r)
    }

    async fn get_fs_info(
        &self,
        req: Request<pb::GetFsInfoRequest>,
    ) -> Result<Response<pb::GetFsInfoResponse>, Status> {
        let req = req.into_inner();
        let r = self
            .get::<Vec<convert::Filesystem>>(
                &req.domain,
                &req.host,
                req.timeout,
                "guest-get-fsinfo",
            )
            .await
            .map(|fs| pb::GetFsInfoResponse {
                filesystems: fs.into_iter().map(Into::into).collect(),
            });
        status::reply(&req.domain, &req.host, r)
    }

    async fn freeze_filesystems(
        &self,
        req: Request<pb::FreezeFilesystemsRequest>,
    ) -> Result<Response<pb::FreezeFilesystemsResponse>, Status> {
        let req = req.into_inner();
        let r = self
            .freeze(&req)
            .await
            .map(|n| pb::FreezeFilesystemsResponse {
                frozen_count: count(n),
            });
        status::reply(&req.domain, &req.host, r)
    }

    async fn thaw_filesystems(
        &self,
        req: Request<pb::ThawFilesystemsRequest>,
    ) -> Result<Response<pb::ThawFilesystemsResponse>, Status> {
        let req = req.into_inner();
        let r = self
            .get::<i64>(&req.domain, &req.host, req.timeout, "guest-fsfreeze-thaw")
            .await
            .map(|n| pb::ThawFilesystemsResponse {
                thawed_count: count(n),
            });
        status::reply(&req.domain, &req.host, r)
    }

    async fn get_freeze_status(
        &self,
        req: Request<pb::GetFreezeStatusRequest>,
    ) -> Result<Response<pb::GetFreezeStatusResponse>, Status> {
        let req = req.into_inner();
        let r = self
            .freeze_status(&req)
            .await
            .map(|state| pb::GetFreezeStatusResponse {
                state: state as i32,
            });
        status::reply(&req.domain, &req.host, r)
    }

    async fn exec(
        &self,
        req: Request<pb::ExecRequest>,
    ) -> Result<Response<pb::ExecResponse>, Status> {
        let req = req.into_inner();
        let (domain, host) = (req.domain.clone(), req.host.clone());
        let r = async {
            crate::ops::check_exec(&req)?;
            let t = self.target(&req.domain, &req.host, req.timeout).await?;
            crate::ops::exec(&t, &self.inner.limits, req).await
        }
        .await;
        status::reply(&domain, &host, r)
    }

    async fn get_exec_status(
        &self,
        req: Request<pb::GetExecStatusRequest>,
    ) -> Result<Response<pb::GetExecStatusResponse>, Status> {
        let req = req.into_inner();
        let r = async {
            let t = self.target(&req.domain, &req.host, req.timeout).await?;
            let status = crate::ops::exec_status(&t, req.pid).await?;
            Ok::<_, CallError>(pb::GetExecStatusResponse {
                status: Some(status),
            })
        }
        .await;
        status::reply(&req.domain, &req.host, r)
    }

    async fn read_file(
        &self,
        req: Request<pb::ReadFileRequest>,
    ) -> Result<Response<pb::ReadFileResponse>, Status> {
        let req = req.into_inner();
        let (domain, host) = (req.domain.clone(), req.host.clone());
        let r = async {
            crate::ops::check_read(&self.inner.limits, &req)?;
            let t = self.target(&req.domain, &req.host, req.timeout).await?;
            crate::ops::file_read(&t, &self.inner.limits, req).await
        }
        .await;
        status::reply(&domain, &host, r)
    }

    async fn write_file(
        &self,
        req: Request<pb::WriteFileRequest>,
    ) -> Result<Response<pb::WriteFileResponse>, Status> {
        let req = req.into_inner();
        let (domain, host) = (req.domain.clone(), req.host.clone());
        let r = async {
            let mode = crate::ops::check_write(&self.inner.limits, &req)?;
            let t = self.target(&req.domain, &req.host, req.timeout).await?;
            crate::ops::file_write(&t, &self.inner.limits, mode, req).await
        }
        .await;
        status::reply(&domain, &host, r)
    }

    async fn shutdown(
        &self,
        req: Request<pb::ShutdownRequest>,
    ) -> Result<Response<pb::ShutdownResponse>, Status> {
        let req = req.into_inner();
        let r = self
            .shutdown_guest(&req)
            .await
            .map(|()| pb::ShutdownResponse {});
        status::reply(&req.domain, &req.host, r)
    }

    async fn command(
        &self,
        req: Request<pb::CommandRequest>,
    ) -> Result<Response<pb::CommandResponse>, Status> {
        let req = req.into_inner();
        let r = self
            .raw_command(&req)
            .await
            .map(|reply_json| pb::CommandResponse { reply_json });
        status::reply(&req.domain, &req.host, r)
    }

    async fn get_guest_vcpus(
        &self,
        req: Request<pb::GetGuestVcpusRequest>,
    ) -> Result<Response<pb::GetGuestVcpusResponse>, Status> {
        let req = req.into_inner();
        let r = async {
            let t = self.target(&req.domain, &req.host, req.timeout).await?;
            admin::get_vcpus(&t).await
        }
        .await;
        status::reply(&req.domain, &req.host, r)
    }

    async fn set_guest_vcpus(
        &self,
        req: Request<pb::SetGuestVcpusRequest>,
    ) -> Result<Response<pb::SetGuestVcpusResponse>, Status> {
        let req = req.into_inner();
        let r = async {
            admin::check_vcpus(&req)?;
            let t = self.target(&req.domain, &req.host, req.timeout).await?;
            admin::set_vcpus(&t, &req).await
        }
        .await;
        status::reply(&req.domain, &req.host, r)
    }

    async fn set_user_password(
        &self,
        req: Request<pb::SetUserPasswordRequest>,
    ) -> Result<Response<pb::SetUserPasswordResponse>, Status> {
        let req = req.into_inner();
        let r = async {
            admin::check_password(&req)?;
            let t = self.target(&req.domain, &req.host, req.timeout).await?;
            admin::set_password(&t, &req).await?;
            Ok(pb::SetUserPasswordResponse {})
        }
        .await;
        status::reply(&req.domain, &req.host, r)
    }

    async fn get_authorized_keys(
        &self,
        req: Request<pb::GetAuthorizedKeysRequest>,
    ) -> Result<Response<pb::GetAuthorizedKeysResponse>, Status> {
        let req = req.into_inner();
        let r = async {
            admin::check_keys_user(&req.user)?;
            let t = self.target(&req.domain, &req.host, req.timeout).await?;
            let keys = admin::get_keys(&t, &req.user).await?;
            Ok(pb::GetAuthorizedKeysResponse { keys })
        }
        .await;
        status::reply(&req.domain, &req.host, r)
    }

    async fn add_authorized_keys(
        &self,
        req: Request<pb::AddAuthorizedKeysRequest>,
    ) -> Result<Response<pb::AddAuthorizedKeysResponse>, Status> {
        let req = req.into_inner();
        let r = async {
            admin::check_keys(&req.user, &req.keys)?;
            let t = self.target(&req.domain, &req.host, req.timeout).await?;
            admin::add_keys(&t, &req).await?;
            Ok(pb::AddAuthorizedKeysResponse {})
        }
        .await;
        status::reply(&req.domain, &req.host, r)
    }

    async fn remove_authorized_keys(
        &self,
        req: Request<pb::RemoveAuthorizedKeysRequest>,
    ) -> Result<Response<pb::RemoveAuthorizedKeysResponse>, Status> {
        let req = req.into_inner();
        let r = async {
            admin::check_keys(&req.user, &req.keys)?;
            let t = self.target(&req.domain, &req.host, req.timeout).await?;
            admin::remove_keys(&t, &req).await?;
            Ok(pb::RemoveAuthorizedKeysResponse {})
        }
        .await;
        status::reply(&req.domain, &req.host, r)
    }
}
