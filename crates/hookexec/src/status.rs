//! Hook executor errors as gRPC statuses: one table.
//!
//! | error | code |
//! |---|---|
//! | [`RequestError`] (bad driver, op, argv field, timeout) | INVALID_ARGUMENT |
//! | [`HookError::Busy`] (no free slot before the deadline) | RESOURCE_EXHAUSTED |
//! | [`HookError::DeadlineExceeded`] | DEADLINE_EXCEEDED |
//! | [`HookError::ShuttingDown`], [`HookError::Stopping`] | UNAVAILABLE |
//! | [`HookError::Task`] (the executor's own failure) | INTERNAL (generic text; the detail is logged) |
//!
//! A failing hook script is not an error: RunHook answers OK with outcome
//! FAILED.

use tonic::Status;

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

/// A bad request: INVALID_ARGUMENT naming the field.
pub fn request(e: RequestError) -> Status {
    Status::invalid_argument(e.to_string())
}

/// An executor failure: UNAVAILABLE when shutting down, else INTERNAL
/// with a generic text (the cause is logged).
pub fn executor(e: HookError) -> Status {
    match e {
        HookError::ShuttingDown { .. } | HookError::Stopping => Status::unavailable(e.to_string()),
        HookError::DeadlineExceeded { .. } => Status::deadline_exceeded(e.to_string()),
        HookError::Busy(_) => Status::resource_exhausted(e.to_string()),
        HookError::Task(_) => {
            tracing::error!(error = %qvirt_common::error_chain(&e), "internal error");
            Status::internal("internal error in the hook executor (see its log)")
        }
    }
}
