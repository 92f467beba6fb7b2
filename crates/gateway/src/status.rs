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

use tonic::{Code, Status};

use crate::auth::AuthError;
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
