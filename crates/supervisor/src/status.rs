//! The RPC edge: one table from [`DomainError`] to a gRPC status.
//!
//! | error | code |
//! |---|---|
//! | `NotFound` | NOT_FOUND |
//! | `AlreadyExists` | ALREADY_EXISTS |
//! | `Spec`, `Yaml`, `InvalidArgument`, `Ambiguous` (a legacy UUID-shaped name) | INVALID_ARGUMENT |
//! | `Storage` full, `ListFull` (ListDomains answer budget) | RESOURCE_EXHAUSTED |
//! | `Storage` read-only | UNAVAILABLE |
//! | `WrongState`, `Start` (QEMU exited during startup or never greeted), `Hook` (a hook script failed), `QemuRefused` | FAILED_PRECONDITION |
//! | `Monitor` (QEMU or its monitor gone), `MonitorLost` (QEMU runs, its monitor is being reconnected), `Detached` (not re-attached after a restart), `Start` (binary cannot be spawned), `Hook` (hook executor unavailable) | UNAVAILABLE |
//! | `ReplyTooLarge` (QEMU's reply over the 16 MiB monitor line limit) | RESOURCE_EXHAUSTED |
//! | `NoAgent`, `NoAgentService` (agent mode without an agent or agent service) | FAILED_PRECONDITION |
//! | `Agent` | the agent service's code (UNAVAILABLE for its INTERNAL/UNKNOWN) |
//! | `Timeout` | DEADLINE_EXCEEDED |
//! | `Stop`, `Store`, `Internal`, `Start` on the supervisor's side (run dir, log, monitor socket, launch task, signals) | INTERNAL (generic text; the detail is logged) |
//!
//! Messages carry the error's whole cause chain on one line (QEMU's exit
//! status and the tail of its output for a failed start), never `{:?}`.

use qvirt_common::error_chain;
use tonic::{Code, Status};

use crate::domain::DomainError;
use crate::domain::store::DirProblem;
use crate::launch::LaunchError;
use crate::seams::HookError;

/// The gRPC code for `error`.
pub fn code(error: &DomainError) -> Code {
    match error {
        DomainError::NotFound(_) => Code::NotFound,
        DomainError::AlreadyExists { .. } => Code::AlreadyExists,
        DomainError::Spec(_)
        | DomainError::Yaml(_)
        | DomainError::InvalidArgument(_)
        | DomainError::Ambiguous { .. } => Code::InvalidArgument,
        DomainError::Storage {
            problem: DirProblem::Full,
            ..
        }
        | DomainError::ListFull { .. } => Code::ResourceExhausted,
        DomainError::Storage {
            problem: DirProblem::ReadOnly,
            ..
        } => Code::Unavailable,
        DomainError::Start { source, .. } => match **source {
            LaunchError::Spawn { .. } => Code::Unavailable,
            // QEMU itself refused (its exit status and output) or never
            // greeted: the domain's definition or the host's QEMU.
            LaunchError::Exited { .. } | LaunchError::Handshake { .. } => Code::FailedPrecondition,
            // The supervisor's own side (run dir, log, socket, tasks,
            // signals) failed: nothing the caller can change.
            _ => Code::Internal,
        },
        DomainError::Hook {
            source: HookError::Unavailable { .. },
            ..
        }
        | DomainError::Monitor { .. }
        | DomainError::MonitorLost { .. }
        | DomainError::Detached(_) => Code::Unavailable,
        DomainError::ReplyTooLarge { .. } => Code::ResourceExhausted,
        DomainError::Agent { source, .. } => match source.code {
            // Its own bugs are not ours to hide behind INTERNAL.
            Code::Ok | Code::Internal | Code::Unknown => Code::Unavailable,
            code => code,
        },
        DomainError::WrongState { .. }
        | DomainError::NoAgent(_)
        | DomainError::NoAgentService
        | DomainError::Hook { .. }
        | DomainError::Confine { .. }
        | DomainError::QemuRefused { .. } => Code::FailedPrecondition,
        DomainError::Timeout(_) => Code::DeadlineExceeded,
        DomainError::Stop { .. }
        | DomainError::Store(_)
        | DomainError::QemuUser(_)
        | DomainError::Internal(_) => Code::Internal,
    }
}

/// Convert a domain error to the status the client sees.
pub fn to_status(error: &DomainError) -> Status {
    let code = code(error);
    let line = error_chain(error);
    if code == Code::Internal {
        tracing::error!(error = %line, "internal error");
        return Status::internal(
            "internal error in the supervisor (details in its log)".to_owned(),
        );
    }
    Status::new(code, line)
}

impl From<DomainError> for Status {
    fn from(error: DomainError) -> Status {
        to_status(&error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::spec::SpecError;
    use crate::seams::{AgentError, HookOp};

    #[test]
    fn test_table() {
        let cases = [
            (DomainError::NotFound("x".into()), Code::NotFound),
            (
                DomainError::AlreadyExists {
                    field: "name",
                    value: "x".into(),
                },
                Code::AlreadyExists,
            ),
            (
                DomainError::Spec(SpecError {
                    field: "name".into(),
                    reason: "is required".into(),
                }),
                Code::InvalidArgument,
            ),
            (
                DomainError::WrongState {
                    domain: "x".into(),
                    state: "running",
                    what: "w",
                },
                Code::FailedPrecondition,
            ),
            (
                DomainError::Start {
                    domain: "x".into(),
                    source: Box::new(LaunchError::Spawn {
                        binary: "q".into(),
                        source: std::io::Error::other("nope"),
                    }),
                },
                Code::Unavailable,
            ),
            (
                DomainError::Start {
                    domain: "x".into(),
                    source: Box::new(LaunchError::BindMonitor {
                        path: "/r/x/monitor.sock".into(),
                        source: std::io::Error::other("in use"),
                    }),
                },
                Code::Internal,
            ),
            (
                DomainError::Start {
                    domain: "x".into(),
                    source: Box::new(LaunchError::PrepareTask("panicked".into())),
                },
                Code::Internal,
            ),
            (
                DomainError::Start {
                    domain: "x".into(),
                    source: Box::new(LaunchError::Exited {
                        status: std::os::unix::process::ExitStatusExt::from_raw(256),
                        log_tail: "qemu: -bogus: invalid option".into(),
                    }),
                },
                Code::FailedPrecondition,
            ),
            (
                DomainError::hook(
                    "x",
                    HookError::Failed {
                        op: HookOp::Prepare,
                        message: "no".into(),
                    },
                ),
                Code::FailedPrecondition,
            ),
            (
                DomainError::hook(
                    "x",
                    HookError::Unavailable {
                        op: HookOp::Start,
                        message: "down".into(),
                    },
                ),
                Code::Unavailable,
            ),
            (DomainError::NoAgent("x".into()), Code::FailedPrecondition),
            (DomainError::NoAgentService, Code::FailedPrecondition),
            (
                DomainError::Agent {
                    domain: "x".into(),
                    source: AgentError {
                        code: Code::DeadlineExceeded,
                        message: "slow".into(),
                    },
                },
                Code::DeadlineExceeded,
            ),
            (
                DomainError::Agent {
                    domain: "x".into(),
                    source: AgentError {
                        code: Code::Internal,
                        message: "bug".into(),
                    },
                },
                Code::Unavailable,
            ),
            (DomainError::Timeout("t".into()), Code::DeadlineExceeded),
            (
                DomainError::qmp(
                    "x",
                    crate::qmp::QmpError::ReplyTooLarge {
                        limit: crate::qmp::MAX_LINE_BYTES,
                    },
                ),
                Code::ResourceExhausted,
            ),
            (
                DomainError::MonitorLost {
                    domain: "x".into(),
                    pid: 7,
                },
                Code::Unavailable,
            ),
            (
                DomainError::Storage {
                    which: "state dir",
                    problem: DirProblem::Full,
                    dir: "/s".into(),
                },
                Code::ResourceExhausted,
            ),
            (
                DomainError::Storage {
                    which: "run dir",
                    problem: DirProblem::ReadOnly,
                    dir: "/r".into(),
                },
                Code::Unavailable,
            ),
            (
                DomainError::ListFull {
                    total: 2,
                    budget: 1,
                },
                Code::ResourceExhausted,
            ),
            (
                DomainError::Ambiguous {
                    key: "k".into(),
                    named_uuid: "u".into(),
                    other: "o".into(),
                },
                Code::InvalidArgument,
            ),
            (DomainError::Internal("secret".into()), Code::Internal),
        ];
        for (error, want) in cases {
            let status = to_status(&error);
            assert_eq!(status.code(), want, "{error}");
            if want == Code::Internal {
                assert!(!status.message().contains("secret"));
            }
        }
    }

    #[test]
    fn test_reply_too_large_message_names_the_limit() {
        let status = to_status(&DomainError::qmp(
            "h",
            crate::qmp::QmpError::ReplyTooLarge {
                limit: crate::qmp::MAX_LINE_BYTES,
            },
        ));
        assert_eq!(
            status.message(),
            "reply from QEMU of domain \"h\" too large: QMP reply longer than 16777216 bytes (16 MiB), the monitor's limit; reply discarded"
        );
    }

    #[test]
    fn test_full_state_dir_says_so_and_names_the_dir() {
        let status = to_status(&DomainError::Storage {
            which: "state dir",
            problem: DirProblem::Full,
            dir: "/var/lib/qvirt".into(),
        });
        assert_eq!(
            status.message(),
            "state dir full: cannot write in /var/lib/qvirt"
        );
    }

    #[test]
    fn test_message_names_the_field() {
        let status = to_status(&DomainError::Spec(SpecError {
            field: "disks[0].path".into(),
            reason: "is required".into(),
        }));
        assert_eq!(
            status.message(),
            "invalid domain spec: disks[0].path: is required"
        );
    }
}
