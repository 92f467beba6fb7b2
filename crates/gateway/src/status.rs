//! The gateway's own errors as gRPC statuses: one table. Backend statuses
//! pass through unchanged and never come here.
//!
//! | error | code | reason | metadata |
//! |---|---|---|---|
//! | no, malformed or unknown token | UNAUTHENTICATED | `UNAUTHENTICATED_TOKEN` | `method` |
//! | mTLS client certificate unmapped or unusable | UNAUTHENTICATED | `UNAUTHENTICATED_CERTIFICATE` | `method` |
//! | token revoked while the call ran | UNAUTHENTICATED | `TOKEN_REVOKED` | `method` |
//! | role too low | PERMISSION_DENIED | `PERMISSION_DENIED_ROLE` | `method`, `required_role`, `role` |
//! | unknown or internal method | UNIMPLEMENTED | `METHOD_NOT_FOUND` | `method` |
//! | backend down or gone mid-call | UNAVAILABLE | `BACKEND_UNAVAILABLE` | `method`, `service` |
//! | a per-principal limit | RESOURCE_EXHAUSTED | `LIMIT_EXCEEDED` | `method`, `limit` |
//! | the client's request body broke off | CANCELLED | `REQUEST_INCOMPLETE` | `method` |
//!
//! A fleet gateway's own answers ([`FleetError`]), each also with `method`:
//!
//! | error | code | reason | metadata |
//! |---|---|---|---|
//! | no domain named | INVALID_ARGUMENT | `INVALID_ARGUMENT` (field `domain`) | |
//! | no host has the domain | NOT_FOUND | `DOMAIN_NOT_FOUND` | `domain` |
//! | several hosts have the name, no `host` given | INVALID_ARGUMENT | `DOMAIN_AMBIGUOUS` (field `host`) | `domain`, `hosts` (comma-separated) |
//! | `host` unknown to the registry | NOT_FOUND | `HOST_NOT_FOUND` | `host` |
//! | the host has no live heartbeat | UNAVAILABLE | `HOST_UNREACHABLE` | `host` |
//! | the host advertises no agent service | FAILED_PRECONDITION | `AGENT_SERVICE_NOT_CONFIGURED` | `host` |
//! | no live host to place a define on | UNAVAILABLE | `NO_HOST_AVAILABLE` | |
//! | the registry is not reachable | UNAVAILABLE | `FLEET_UNAVAILABLE` | |
//! | a bad ListDomains argument | INVALID_ARGUMENT | `INVALID_ARGUMENT` (its field) | |
//! | a public method that names no domain (none today) | UNIMPLEMENTED | `NOT_ROUTABLE` | |
//! | a request it cannot read to route (compressed) | INVALID_ARGUMENT | `REQUEST_UNREADABLE` | |

use tonic::{Code, Status};

use crate::auth::AuthError;
use crate::fleet::FleetError;
use crate::limits::LimitError;
use crate::roles::Role;

/// Why the gateway itself answered a call.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// Not authenticated.
    #[error("{method}: {source}")]
    Unauthenticated {
        /// The method called.
        method: String,
        /// Why.
        #[source]
        source: AuthError,
    },
    /// The token was revoked by a reload.
    #[error("{method}: the bearer token was revoked")]
    Revoked {
        /// The method called.
        method: String,
    },
    /// The caller's role is too low.
    #[error("{method} needs the {required} role; {principal} has {role}")]
    PermissionDenied {
        /// The method called.
        method: String,
        /// What it needs.
        required: Role,
        /// Who called.
        principal: String,
        /// What the caller has.
        role: Role,
    },
    /// Not a public method.
    #[error("unknown method {method}")]
    UnknownMethod {
        /// The path called.
        method: String,
    },
    /// The backend is unreachable or went away.
    #[error("{service} is unavailable: {cause}")]
    BackendUnavailable {
        /// The method called.
        method: String,
        /// The backend's service.
        service: &'static str,
        /// What failed, one line.
        cause: String,
    },
    /// The caller's deadline passed while the backend had the call.
    #[error("{method}: the deadline passed before {service} answered")]
    DeadlineExceeded {
        /// The method called.
        method: String,
        /// The backend's service.
        service: &'static str,
    },
    /// A per-principal limit.
    #[error("{method}: {source}")]
    Limit {
        /// The method called.
        method: String,
        /// Which limit.
        #[source]
        source: LimitError,
    },
    /// The request body failed while being read.
    #[error("{method}: the request did not arrive whole")]
    RequestIncomplete {
        /// The method called.
        method: String,
    },
    /// A fleet gateway answered itself (routing, the registry).
    #[error("{source}")]
    Fleet {
        /// The method called.
        method: String,
        /// Why.
        #[source]
        source: FleetError,
    },
}

/// The status of a fleet gateway's own answer to `method`.
fn fleet_status(method: &str, err: &FleetError) -> Status {
    use qvirt_common::rpc::{error, invalid_argument};
    let message = err.to_string();
    let m = || ("method", method.to_owned());
    match err {
        FleetError::DomainRequired => invalid_argument(
            "INVALID_ARGUMENT",
            message.clone(),
            [("domain".to_owned(), message)],
            [m()],
        ),
        FleetError::DomainNotFound { domain } => error(
            Code::NotFound,
            "DOMAIN_NOT_FOUND",
            message,
            [m(), ("domain", domain.clone())],
        ),
        FleetError::DomainAmbiguous { domain, hosts } => invalid_argument(
            "DOMAIN_AMBIGUOUS",
            message.clone(),
            [("host".to_owned(), message)],
            [m(), ("domain", domain.clone()), ("hosts", hosts.join(","))],
        ),
        FleetError::HostNotFound { host } => error(
            Code::NotFound,
            "HOST_NOT_FOUND",
            message,
            [m(), ("host", host.clone())],
        ),
        FleetError::HostUnreachable { host } => error(
            Code::Unavailable,
            "HOST_UNREACHABLE",
            message,
            [m(), ("host", host.clone())],
        ),
        FleetError::NoAgentService { host } => error(
            Code::FailedPrecondition,
            "AGENT_SERVICE_NOT_CONFIGURED",
            message,
            [m(), ("host", host.clone())],
        ),
        FleetError::NoHostAvailable => {
            error(Code::Unavailable, "NO_HOST_AVAILABLE", message, [m()])
        }
        FleetError::RegistryUnavailable => {
            error(Code::Unavailable, "FLEET_UNAVAILABLE", message, [m()])
        }
        FleetError::InvalidArgument { field, message } => invalid_argument(
            "INVALID_ARGUMENT",
            message.clone(),
            [((*field).to_owned(), message.clone())],
            [m()],
        ),
        FleetError::NotRoutable => error(Code::Unimplemented, "NOT_ROUTABLE", message, [m()]),
        FleetError::Unreadable => {
            invalid_argument("REQUEST_UNREADABLE", message.clone(), [], [m()])
        }
    }
}

impl GatewayError {
    /// The status a client gets.
    pub fn to_status(&self) -> Status {
        use qvirt_common::rpc::error;
        let message = qvirt_common::error_chain(self);
        match self {
            GatewayError::Unauthenticated { method, source } => error(
                Code::Unauthenticated,
                if source.is_certificate() {
                    "UNAUTHENTICATED_CERTIFICATE"
                } else {
                    "UNAUTHENTICATED_TOKEN"
                },
                message,
                [("method", method.clone())],
            ),
            GatewayError::Revoked { method } => error(
                Code::Unauthenticated,
                "TOKEN_REVOKED",
                message,
                [("method", method.clone())],
            ),
            GatewayError::PermissionDenied {
                method,
                required,
                role,
                ..
            } => error(
                Code::PermissionDenied,
                "PERMISSION_DENIED_ROLE",
                message,
                [
                    ("method", method.clone()),
                    ("required_role", required.to_string()),
                    ("role", role.to_string()),
                ],
            ),
            GatewayError::UnknownMethod { method } => error(
                Code::Unimplemented,
                "METHOD_NOT_FOUND",
                message,
                [("method", method.clone())],
            ),
            GatewayError::BackendUnavailable {
                method, service, ..
            } => error(
                Code::Unavailable,
                "BACKEND_UNAVAILABLE",
                message,
                [
                    ("method", method.clone()),
                    ("service", (*service).to_owned()),
                ],
            ),
            GatewayError::DeadlineExceeded { method, service } => error(
                Code::DeadlineExceeded,
                "DEADLINE_EXCEEDED",
                message,
                [
                    ("method", method.clone()),
                    ("service", (*service).to_owned()),
                ],
            ),
            GatewayError::Limit { method, source } => error(
                Code::ResourceExhausted,
                "LIMIT_EXCEEDED",
                message,
                [
                    ("method", method.clone()),
                    ("limit", source.key().to_owned()),
                ],
            ),
            GatewayError::RequestIncomplete { method } => error(
                Code::Cancelled,
                "REQUEST_INCOMPLETE",
                message,
                [("method", method.clone())],
            ),
            GatewayError::Fleet { method, source } => fleet_status(method, source),
        }
    }
}

#[cfg(test)]
mod tests {
    use qvirt_common::rpc::reason_of;
    use tonic_types::StatusExt as _;

    use super::*;

    #[test]
    fn test_every_error_has_its_code_reason_and_method() {
        let m = || "/qvirt.v1.Supervisor/StartDomain".to_owned();
        let cases = [
            (
                GatewayError::Unauthenticated {
                    method: m(),
                    source: AuthError::Missing,
                },
                Code::Unauthenticated,
                "UNAUTHENTICATED_TOKEN",
            ),
            (
                GatewayError::Unauthenticated {
                    method: m(),
                    source: AuthError::UnmappedCertificate("cn:\"x\"".into()),
                },
                Code::Unauthenticated,
                "UNAUTHENTICATED_CERTIFICATE",
            ),
            (
                GatewayError::Revoked { method: m() },
                Code::Unauthenticated,
                "TOKEN_REVOKED",
            ),
            (
                GatewayError::PermissionDenied {
                    method: m(),
                    required: Role::ReadWrite,
                    principal: "ro".into(),
                    role: Role::ReadOnly,
                },
                Code::PermissionDenied,
                "PERMISSION_DENIED_ROLE",
            ),
            (
                GatewayError::UnknownMethod { method: m() },
                Code::Unimplemented,
                "METHOD_NOT_FOUND",
            ),
            (
                GatewayError::BackendUnavailable {
                    method: m(),
                    service: "qvirt.v1.Supervisor",
                    cause: "connection refused".into(),
                },
                Code::Unavailable,
                "BACKEND_UNAVAILABLE",
            ),
            (
                GatewayError::DeadlineExceeded {
                    method: m(),
                    service: "qvirt.v1.Supervisor",
                },
                Code::DeadlineExceeded,
                "DEADLINE_EXCEEDED",
            ),
            (
                GatewayError::Limit {
                    method: m(),
                    source: LimitError::RequestSize { limit: 1 },
                },
                Code::ResourceExhausted,
                "LIMIT_EXCEEDED",
            ),
            (
                GatewayError::RequestIncomplete { method: m() },
                Code::Cancelled,
                "REQUEST_INCOMPLETE",
            ),
        ];
        let fleet = |source| GatewayError::Fleet {
            method: m(),
            source,
        };
        let cases = cases.into_iter().chain([
            (
                fleet(FleetError::DomainRequired),
                Code::InvalidArgument,
                "INVALID_ARGUMENT",
            ),
            (
                fleet(FleetError::DomainNotFound {
                    domain: "vm".into(),
                }),
                Code::NotFound,
                "DOMAIN_NOT_FOUND",
            ),
            (
                fleet(FleetError::DomainAmbiguous {
                    domain: "vm".into(),
                    hosts: vec!["h1".into(), "h2".into()],
                }),
                Code::InvalidArgument,
                "DOMAIN_AMBIGUOUS",
            ),
            (
                fleet(FleetError::HostNotFound { host: "h9".into() }),
                Code::NotFound,
                "HOST_NOT_FOUND",
            ),
            (
                fleet(FleetError::HostUnreachable { host: "h1".into() }),
                Code::Unavailable,
                "HOST_UNREACHABLE",
            ),
            (
                fleet(FleetError::NoAgentService { host: "h1".into() }),
                Code::FailedPrecondition,
                "AGENT_SERVICE_NOT_CONFIGURED",
            ),
            (
                fleet(FleetError::NoHostAvailable),
                Code::Unavailable,
                "NO_HOST_AVAILABLE",
            ),
            (
                fleet(FleetError::RegistryUnavailable),
                Code::Unavailable,
                "FLEET_UNAVAILABLE",
            ),
            (
                fleet(FleetError::InvalidArgument {
                    field: "page_size",
                    message: "page_size must not be negative".into(),
                }),
                Code::InvalidArgument,
                "INVALID_ARGUMENT",
            ),
            (
                fleet(FleetError::Unreadable),
                Code::InvalidArgument,
                "REQUEST_UNREADABLE",
            ),
        ]);
        for (err, code, reason) in cases {
            let status = err.to_status();
            assert_eq!(status.code(), code, "{err}");
            assert_eq!(reason_of(&status).as_deref(), Some(reason));
            let info = status.get_details_error_info().expect("ErrorInfo");
            assert_eq!(
                info.metadata.get("method").map(String::as_str),
                Some(m().as_str())
            );
        }
        let ambiguous = GatewayError::Fleet {
            method: m(),
            source: FleetError::DomainAmbiguous {
                domain: "vm".into(),
                hosts: vec!["h1".into(), "h2".into()],
            },
        }
        .to_status();
        assert!(
            ambiguous.message().contains("\"h1\", \"h2\""),
            "{}",
            ambiguous.message()
        );
        let info = ambiguous.get_details_error_info().expect("ErrorInfo");
        assert_eq!(
            info.metadata.get("hosts").map(String::as_str),
            Some("h1,h2")
        );
        assert_eq!(qvirt_common::rpc::violated_fields(&ambiguous), ["host"]);
        let denied = GatewayError::PermissionDenied {
            method: m(),
            required: Role::ReadWrite,
            principal: "ro".into(),
            role: Role::ReadOnly,
        }
        .to_status();
        assert!(
            denied
                .message()
                .contains("StartDomain needs the read-write role")
        );
        let info = denied.get_details_error_info().expect("ErrorInfo");
        assert_eq!(
            info.metadata.get("required_role").map(String::as_str),
            Some("read-write")
        );
    }
}
