//! Hook executor errors as gRPC statuses: one table. Every status carries
//! an ErrorInfo (domain `qvirt.dev`; metadata `domain`, the hook's object,
//! for the drivers whose object is a domain: qemu, lxc, libxl); an
//! INVALID_ARGUMENT also carries a BadRequest naming the field.
//!
//! | error | code | reason |
//! |---|---|---|
//! | [`RequestError`] (bad `driver`, `op`, argv field, `timeout`) | INVALID_ARGUMENT | `INVALID_ARGUMENT` (BadRequest: the field) |
//! | [`HookError::Busy`] (no free slot before the deadline) | RESOURCE_EXHAUSTED | `HOOK_EXECUTOR_BUSY` |
//! | [`HookError::DeadlineExceeded`] (the call's deadline came while its scripts ran) | DEADLINE_EXCEEDED | `HOOK_DEADLINE_EXCEEDED` |
//! | [`HookError::ShuttingDown`], [`HookError::Stopping`] | UNAVAILABLE | `SHUTTING_DOWN` |
//! | [`HookError::Task`] (the executor's own failure) | INTERNAL | `INTERNAL` (generic text; the detail is logged) |
//!
//! A failing hook script is not an error: RunHook answers OK with outcome
//! FAILED (a script over its timeout too: `timed_out`).

use qvirt_common::rpc;
use tonic::{Code, Status};

use crate::run::RequestError;

/// The executor's own failures (never a script's).
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The task running the hooks, or a directory scan, panicked.
    #[error("hook task failed")]
    Task(#[source] tokio::task::JoinError),
    /// `max_concurrent_runs` calls ran until the call's deadline: none of
    /// its scripts ran.
    #[error(
        "{0} hook runs were in progress until the call's deadline (max_concurrent_runs): no hook ran"
    )]
    Busy(usize),
    /// The call's deadline came while its scripts ran: the running one had
    /// its process group killed, the rest were not started.
    #[error(
        "the call's deadline came while its hooks ran: {ran} of {total} scripts started \
         (one still running was killed), the rest not started"
    )]
    DeadlineExceeded {
        /// Scripts started.
        ran: usize,
        /// Scripts the call had.
        total: usize,
    },
    /// The executor began shutting down before the call's scripts started.
    #[error("the hook executor is shutting down: no hook ran")]
    Stopping,
    /// The executor is stopping: scripts still running were killed (their
    /// process groups), the rest not started.
    #[error(
        "the hook executor is shutting down: {ran} of {total} scripts ran, the last one killed"
    )]
    ShuttingDown {
        /// Scripts started (the last one killed).
        ran: usize,
        /// Scripts the call had.
        total: usize,
    },
}

/// The BadRequest field of a request error.
pub fn request_field(e: &RequestError) -> &'static str {
    match e {
        RequestError::NoDriver | RequestError::UnknownDriver(_) => "driver",
        RequestError::EmptyOp => "op",
        RequestError::Nul(field) => field,
        RequestError::Timeout(_) => "timeout",
    }
}

/// A bad request: INVALID_ARGUMENT naming the field.
pub fn request(e: RequestError) -> Status {
    let field = request_field(&e);
    let message = e.to_string();
    rpc::invalid_argument(
        "INVALID_ARGUMENT",
        message.clone(),
        [(field.to_owned(), message)],
        [],
    )
}

/// The code and reason of an executor failure (the table).
pub fn executor_code_and_reason(e: &HookError) -> (Code, &'static str) {
    match e {
        HookError::ShuttingDown { .. } | HookError::Stopping => {
            (Code::Unavailable, "SHUTTING_DOWN")
        }
        HookError::DeadlineExceeded { .. } => (Code::DeadlineExceeded, "HOOK_DEADLINE_EXCEEDED"),
        HookError::Busy(_) => (Code::ResourceExhausted, "HOOK_EXECUTOR_BUSY"),
        HookError::Task(_) => (Code::Internal, rpc::REASON_INTERNAL),
    }
}

/// An executor failure of a call about `domain` (empty: none): UNAVAILABLE
/// when shutting down, else INTERNAL with a generic text (the cause is
/// logged).
pub fn executor(e: HookError, domain: &str) -> Status {
    let (code, reason) = executor_code_and_reason(&e);
    if code == Code::Internal {
        return rpc::internal("hook executor", &e);
    }
    rpc::error(code, reason, e.to_string(), [("domain", domain.to_owned())])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use tonic_types::StatusExt;

    use super::*;

    #[test]
    fn test_every_request_error_names_its_field() {
        let cases = [
            (RequestError::NoDriver, "driver"),
            (RequestError::UnknownDriver(9), "driver"),
            (RequestError::EmptyOp, "op"),
            (RequestError::Nul("sub_op"), "sub_op"),
            (
                RequestError::Timeout("must be more than 0".into()),
                "timeout",
            ),
        ];
        for (e, field) in cases {
            let what = format!("{e:?}");
            let status = request(e);
            assert_eq!(status.code(), Code::InvalidArgument, "{what}");
            assert_eq!(
                rpc::reason_of(&status).as_deref(),
                Some("INVALID_ARGUMENT"),
                "{what}"
            );
            assert_eq!(rpc::violated_fields(&status), [field], "{what}");
        }
    }

    #[tokio::test]
    async fn test_every_executor_error_maps_to_its_code_and_reason() {
        let panicked = tokio::spawn(async { panic!("/secret/path") })
            .await
            .unwrap_err();
        let cases = [
            (
                HookError::Busy(4),
                Code::ResourceExhausted,
                "HOOK_EXECUTOR_BUSY",
            ),
            (
                HookError::DeadlineExceeded { ran: 1, total: 2 },
                Code::DeadlineExceeded,
                "HOOK_DEADLINE_EXCEEDED",
            ),
            (HookError::Stopping, Code::Unavailable, "SHUTTING_DOWN"),
            (
                HookError::ShuttingDown { ran: 1, total: 2 },
                Code::Unavailable,
                "SHUTTING_DOWN",
            ),
            (HookError::Task(panicked), Code::Internal, "INTERNAL"),
        ];
        for (e, code, reason) in cases {
            let what = format!("{e:?}");
            assert_eq!(executor_code_and_reason(&e), (code, reason), "{what}");
            let status = executor(e, "vm1");
            assert_eq!(status.code(), code, "{what}");
            let info = status.get_details_error_info().expect("ErrorInfo");
            assert_eq!(
                (info.reason.as_str(), info.domain.as_str()),
                (reason, "qvirt.dev")
            );
            if code == Code::Internal {
                assert!(!status.message().contains("secret"), "{status:?}");
            } else {
                assert_eq!(info.metadata["domain"], "vm1", "{what}");
            }
            assert!(status.get_details_bad_request().is_none(), "{what}");
        }
    }
}
