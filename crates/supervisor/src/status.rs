//! The RPC edge: one table from [`DomainError`] to a gRPC status and the
//! `google.rpc.ErrorInfo` reason it carries (domain `qvirt.dev`, metadata
//! `domain` = the domain's name where there is one). An INVALID_ARGUMENT
//! also carries a `google.rpc.BadRequest` naming the field path.
//!
//! | error | code | reason |
//! |---|---|---|
//! | `NotFound` | NOT_FOUND | DOMAIN_NOT_FOUND |
//! | `HostNotFound` | NOT_FOUND | HOST_NOT_FOUND (metadata `host`) |
//! | `AlreadyExists` | ALREADY_EXISTS | DOMAIN_ALREADY_EXISTS (metadata `domain` or `uuid`) |
//! | `Spec` | INVALID_ARGUMENT | INVALID_SPEC (field `spec.<path>`) |
//! | `YamlSpec`, `Yaml` | INVALID_ARGUMENT | INVALID_SPEC (field: the YAML field's path; `yaml` when it does not parse) |
//! | `InvalidArgument` | INVALID_ARGUMENT | INVALID_ARGUMENT (its field) |
//! | `RequestIdReused` | INVALID_ARGUMENT | REQUEST_ID_REUSED (field `request_id`) |
//! | `Ambiguous` (a legacy UUID-shaped name) | INVALID_ARGUMENT | DOMAIN_NAME_AMBIGUOUS (field `domain`) |
//! | `EtagMismatch` | ABORTED | ETAG_MISMATCH (metadata `current_etag`) |
//! | `WrongState`: start of a running domain | FAILED_PRECONDITION | DOMAIN_ALREADY_RUNNING |
//! | `WrongState`: undefine of a running domain without `destroy` | FAILED_PRECONDITION | DOMAIN_RUNNING |
//! | `WrongState`: a call that needs a running domain | FAILED_PRECONDITION | DOMAIN_NOT_RUNNING |
//! | `WrongState`: resume of a domain that is not paused | FAILED_PRECONDITION | DOMAIN_NOT_PAUSED |
//! | `Storage` full | RESOURCE_EXHAUSTED | STATE_DIR_FULL, RUN_DIR_FULL |
//! | `Storage` read-only | UNAVAILABLE | STATE_DIR_READ_ONLY, RUN_DIR_READ_ONLY |
//! | `ListFull` (ListDomains answer budget) | RESOURCE_EXHAUSTED | LIST_TOO_LARGE |
//! | `Start`: QEMU exited during startup or never greeted | FAILED_PRECONDITION | QEMU_START_FAILED |
//! | `Start`: QEMU's binary cannot be spawned | UNAVAILABLE | QEMU_SPAWN_FAILED |
//! | `Hook`: a hook script failed | FAILED_PRECONDITION | HOOK_FAILED |
//! | `Hook`: hook executor unavailable | UNAVAILABLE | HOOK_EXECUTOR_UNAVAILABLE |
//! | `QemuRefused` (QEMU answered a QMP error) | FAILED_PRECONDITION | QEMU_REFUSED |
//! | `Confine` (a file the guest needs cannot be prepared or given back) | FAILED_PRECONDITION | GUEST_FILE_FAILED |
//! | `Monitor` (QEMU or its monitor gone) | UNAVAILABLE | MONITOR_UNAVAILABLE |
//! | `MonitorLost` (QEMU runs, its monitor is being reconnected) | UNAVAILABLE | MONITOR_LOST |
//! | `Detached` (not re-attached after a restart) | UNAVAILABLE | DOMAIN_DETACHED |
//! | `ReplyTooLarge` (QEMU's reply over the 16 MiB monitor line limit) | RESOURCE_EXHAUSTED | QMP_REPLY_TOO_LARGE |
//! | `NoAgent` (agent mode, no `agent: true`) | FAILED_PRECONDITION | AGENT_NOT_CONFIGURED |
//! | `NoAgentService` (agent mode, no agent service) | FAILED_PRECONDITION | AGENT_SERVICE_NOT_CONFIGURED |
//! | `Agent` | the agent service's code (UNAVAILABLE for its INTERNAL/UNKNOWN) | the agent service's reason, else AGENT_ERROR |
//! | `Hook`: a filter hook (restore) printed no valid definition | FAILED_PRECONDITION | HOOK_OUTPUT_INVALID |
//! | `NoSavedImage` (RestoreDomain without a saved image) | FAILED_PRECONDITION | NO_SAVED_IMAGE |
//! | `Incompatible` (the definition to restore with does not fit the image) | FAILED_PRECONDITION | DEFINITION_INCOMPATIBLE |
//! | `Transfer`: QEMU failed to write (save) or load (restore) the image | FAILED_PRECONDITION | SAVE_FAILED, RESTORE_FAILED |
//! | `Timeout` | DEADLINE_EXCEEDED | TIMEOUT |
//! | `Stop`, `Store`, `QemuUser`, `Internal`, `Start` on the supervisor's side (run dir, log, monitor socket, launch task, signals) | INTERNAL | INTERNAL (generic text; the detail is logged) |
//!
//! Messages carry the error's whole cause chain on one line (QEMU's exit
//! status and the tail of its output for a failed start), never `{:?}`.

use std::borrow::Cow;

use qvirt_common::{error_chain, rpc};
use tonic::{Code, Status};

use crate::domain::store::DirProblem;
use crate::domain::{DomainError, Need};
use crate::launch::LaunchError;
use crate::seams::HookError;

/// The gRPC code and ErrorInfo reason of `error`.
pub fn classify(error: &DomainError) -> (Code, Cow<'static, str>) {
    use DomainError as E;
    let (code, reason) = match error {
        E::NotFound(_) => (Code::NotFound, "DOMAIN_NOT_FOUND"),
        E::HostNotFound(..) => (Code::NotFound, "HOST_NOT_FOUND"),
        E::AlreadyExists { .. } => (Code::AlreadyExists, "DOMAIN_ALREADY_EXISTS"),
        E::Spec(_) | E::YamlSpec(_) | E::Yaml(_) => (Code::InvalidArgument, "INVALID_SPEC"),
        E::InvalidArgument { .. } => (Code::InvalidArgument, "INVALID_ARGUMENT"),
        E::RequestIdReused { .. } => (Code::InvalidArgument, "REQUEST_ID_REUSED"),
        E::Ambiguous { .. } => (Code::InvalidArgument, "DOMAIN_NAME_AMBIGUOUS"),
        E::EtagMismatch { .. } => (Code::Aborted, "ETAG_MISMATCH"),
        E::WrongState { need, .. } => (
            Code::FailedPrecondition,
            match need {
                Need::ShutOff => "DOMAIN_ALREADY_RUNNING",
                Need::ShutOffOrDestroy => "DOMAIN_RUNNING",
                Need::Running => "DOMAIN_NOT_RUNNING",
                Need::Paused => "DOMAIN_NOT_PAUSED",
            },
        ),
        E::Storage { which, problem, .. } => match (problem, *which == "run dir") {
            (DirProblem::Full, false) => (Code::ResourceExhausted, "STATE_DIR_FULL"),
            (DirProblem::Full, true) => (Code::ResourceExhausted, "RUN_DIR_FULL"),
            (DirProblem::ReadOnly, false) => (Code::Unavailable, "STATE_DIR_READ_ONLY"),
            (DirProblem::ReadOnly, true) => (Code::Unavailable, "RUN_DIR_READ_ONLY"),
        },
        E::ListFull { .. } => (Code::ResourceExhausted, "LIST_TOO_LARGE"),
        E::Start { source, .. } => match **source {
            LaunchError::Spawn { .. }
            | LaunchError::Launcher(crate::launch::remote::RemoteError::Refused(_)) => {
                (Code::Unavailable, "QEMU_SPAWN_FAILED")
            }
            // The launcher (a container deployment's qvirt-vmm) is down or
            // stopped answering: retry once it is back.
            LaunchError::Launcher(
                crate::launch::remote::RemoteError::Connect { .. }
                | crate::launch::remote::RemoteError::Send(_)
                | crate::launch::remote::RemoteError::Reply(_),
            ) => (Code::Unavailable, "QEMU_LAUNCHER_UNAVAILABLE"),
            // QEMU itself refused (its exit status and output) or never
            // greeted: the domain's definition or the host's QEMU.
            LaunchError::Exited { .. } | LaunchError::Handshake { .. } => {
                (Code::FailedPrecondition, "QEMU_START_FAILED")
            }
            // The supervisor's own side (run dir, log, socket, tasks,
            // signals) failed: nothing the caller can change.
            _ => (Code::Internal, rpc::REASON_INTERNAL),
        },
        E::Hook {
            source: HookError::Unavailable { .. },
            ..
        } => (Code::Unavailable, "HOOK_EXECUTOR_UNAVAILABLE"),
        E::Hook {
            source: HookError::Failed { .. },
            ..
        } => (Code::FailedPrecondition, "HOOK_FAILED"),
        E::Hook {
            source: HookError::BadOutput { .. },
            ..
        } => (Code::FailedPrecondition, "HOOK_OUTPUT_INVALID"),
        E::NoSavedImage(_) => (Code::FailedPrecondition, "NO_SAVED_IMAGE"),
        E::Incompatible { .. } => (Code::FailedPrecondition, "DEFINITION_INCOMPATIBLE"),
        E::Transfer { what, .. } => (
            Code::FailedPrecondition,
            if *what == "save" {
                "SAVE_FAILED"
            } else {
                "RESTORE_FAILED"
            },
        ),
        E::QemuRefused { .. } => (Code::FailedPrecondition, "QEMU_REFUSED"),
        E::Confine { .. } => (Code::FailedPrecondition, "GUEST_FILE_FAILED"),
        E::Monitor { .. } => (Code::Unavailable, "MONITOR_UNAVAILABLE"),
        E::MonitorLost { .. } => (Code::Unavailable, "MONITOR_LOST"),
        E::Detached(_) => (Code::Unavailable, "DOMAIN_DETACHED"),
        E::ReplyTooLarge { .. } => (Code::ResourceExhausted, "QMP_REPLY_TOO_LARGE"),
        E::NoAgent(_) => (Code::FailedPrecondition, "AGENT_NOT_CONFIGURED"),
        E::NoAgentService => (Code::FailedPrecondition, "AGENT_SERVICE_NOT_CONFIGURED"),
        E::Agent { source, .. } => {
            let code = match source.code {
                // Its own bugs are not ours to hide behind INTERNAL.
                Code::Ok | Code::Internal | Code::Unknown => Code::Unavailable,
                code => code,
            };
            let reason = source
                .reason
                .clone()
                .filter(|r| !r.is_empty() && r != rpc::REASON_INTERNAL);
            return (
                code,
                reason.map_or(Cow::Borrowed("AGENT_ERROR"), Cow::Owned),
            );
        }
        E::Timeout(_) => (Code::DeadlineExceeded, "TIMEOUT"),
        E::Stop { .. } | E::Store(_) | E::QemuUser(_) | E::Internal(_) => {
            (Code::Internal, rpc::REASON_INTERNAL)
        }
    };
    (code, Cow::Borrowed(reason))
}

/// The gRPC code for `error`.
pub fn code(error: &DomainError) -> Code {
    classify(error).0
}

/// The ErrorInfo metadata of `error` (empty values are left out).
fn metadata(error: &DomainError) -> Vec<(&'static str, String)> {
    use DomainError as E;
    match error {
        E::NotFound(key) => vec![("domain", key.clone())],
        E::HostNotFound(host, _) => vec![("host", host.clone())],
        E::AlreadyExists { field, value } => vec![(*field, value.clone())]
            .into_iter()
            .map(|(f, v)| (if f == "name" { "domain" } else { f }, v))
            .collect(),
        E::EtagMismatch {
            domain, current, ..
        } => vec![
            ("domain", domain.clone()),
            ("current_etag", current.clone()),
        ],
        E::RequestIdReused { method, request_id } => vec![
            ("method", (*method).to_owned()),
            ("request_id", request_id.clone()),
        ],
        E::Ambiguous { key, .. } => vec![("domain", key.clone())],
        E::WrongState { domain, state, .. } => {
            vec![("domain", domain.clone()), ("state", (*state).to_owned())]
        }
        E::Storage { which, .. } => vec![("dir", (*which).to_owned())],
        E::Hook { domain, source } => {
            vec![
                ("domain", domain.clone()),
                ("hook", source.op().to_string()),
            ]
        }
        E::QemuRefused {
            domain,
            command,
            class,
            ..
        } => vec![
            ("domain", domain.clone()),
            ("command", command.clone()),
            ("class", class.clone()),
        ],
        E::Start { domain, .. }
        | E::Monitor { domain, .. }
        | E::ReplyTooLarge { domain, .. }
        | E::MonitorLost { domain, .. }
        | E::Confine { domain, .. }
        | E::Agent { domain, .. }
        | E::Incompatible { domain, .. }
        | E::Transfer { domain, .. } => vec![("domain", domain.clone())],
        E::Detached(domain) | E::NoAgent(domain) | E::NoSavedImage(domain) => {
            vec![("domain", domain.clone())]
        }
        E::Spec(_)
        | E::YamlSpec(_)
        | E::Yaml(_)
        | E::InvalidArgument { .. }
        | E::ListFull { .. }
        | E::NoAgentService
        | E::Timeout(_)
        | E::Stop { .. }
        | E::Store(_)
        | E::QemuUser(_)
        | E::Internal(_) => Vec::new(),
    }
}

/// The BadRequest field violations of an INVALID_ARGUMENT `error`.
fn violations(error: &DomainError) -> Vec<(String, String)> {
    match error {
        DomainError::Spec(e) => vec![(format!("spec.{}", e.field), e.reason.clone())],
        DomainError::YamlSpec(e) => vec![(e.field.clone(), e.reason.clone())],
        DomainError::Yaml(text) => vec![("yaml".to_owned(), text.clone())],
        DomainError::InvalidArgument { field, message } => {
            vec![((*field).to_owned(), message.clone())]
        }
        DomainError::RequestIdReused { .. } => vec![(
            "request_id".to_owned(),
            "already used for a different request".to_owned(),
        )],
        DomainError::Ambiguous { .. } => vec![(
            "domain".to_owned(),
            "is a name of one domain and the UUID of another".to_owned(),
        )],
        _ => Vec::new(),
    }
}

/// Convert a domain error to the status the client sees.
pub fn to_status(error: &DomainError) -> Status {
    let (code, reason) = classify(error);
    if code == Code::Internal {
        return rpc::internal("supervisor", error);
    }
    let line = error_chain(error);
    if code == Code::InvalidArgument {
        return rpc::invalid_argument(&reason, line, violations(error), metadata(error));
    }
    rpc::error(code, &reason, line, metadata(error))
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
    use tonic_types::StatusExt;

    /// The variant's name; a match without a wildcard, so a new variant
    /// does not compile until the table test covers it.
    fn variant(error: &DomainError) -> &'static str {
        use DomainError as E;
        match error {
            E::NotFound(_) => "NotFound",
            E::AlreadyExists { .. } => "AlreadyExists",
            E::Spec(_) => "Spec",
            E::Yaml(_) => "Yaml",
            E::YamlSpec(_) => "YamlSpec",
            E::InvalidArgument { .. } => "InvalidArgument",
            E::HostNotFound(..) => "HostNotFound",
            E::EtagMismatch { .. } => "EtagMismatch",
            E::RequestIdReused { .. } => "RequestIdReused",
            E::WrongState { .. } => "WrongState",
            E::Start { .. } => "Start",
            E::Hook { .. } => "Hook",
            E::QemuRefused { .. } => "QemuRefused",
            E::Monitor { .. } => "Monitor",
            E::ReplyTooLarge { .. } => "ReplyTooLarge",
            E::MonitorLost { .. } => "MonitorLost",
            E::Detached(_) => "Detached",
            E::Stop { .. } => "Stop",
            E::Confine { .. } => "Confine",
            E::QemuUser(_) => "QemuUser",
            E::NoAgent(_) => "NoAgent",
            E::NoAgentService => "NoAgentService",
            E::Agent { .. } => "Agent",
            E::Timeout(_) => "Timeout",
            E::Store(_) => "Store",
            E::Storage { .. } => "Storage",
            E::ListFull { .. } => "ListFull",
            E::Ambiguous { .. } => "Ambiguous",
            E::NoSavedImage(_) => "NoSavedImage",
            E::Incompatible { .. } => "Incompatible",
            E::Transfer { .. } => "Transfer",
            E::Internal(_) => "Internal",
        }
    }

    const ALL_VARIANTS: usize = 32;

    fn wrong_state(need: Need) -> DomainError {
        DomainError::WrongState {
            domain: "x".into(),
            state: "running",
            need,
            what: "w",
        }
    }

    fn start(source: LaunchError) -> DomainError {
        DomainError::Start {
            domain: "x".into(),
            source: Box::new(source),
        }
    }

    fn agent(code: Code, reason: Option<&str>) -> DomainError {
        DomainError::Agent {
            domain: "x".into(),
            source: AgentError {
                code,
                message: "m".into(),
                reason: reason.map(str::to_owned),
            },
        }
    }

    /// One case per row of the table (and per sub-case of a row).
    fn table() -> Vec<(DomainError, Code, &'static str)> {
        let io = || std::io::Error::other("secret");
        let spec_error = || SpecError {
            field: "disks[1].path".into(),
            reason: "is required".into(),
        };
        vec![
            (
                DomainError::NotFound("x".into()),
                Code::NotFound,
                "DOMAIN_NOT_FOUND",
            ),
            (
                DomainError::HostNotFound("h2".into(), "h1".into()),
                Code::NotFound,
                "HOST_NOT_FOUND",
            ),
            (
                DomainError::AlreadyExists {
                    field: "name",
                    value: "x".into(),
                },
                Code::AlreadyExists,
                "DOMAIN_ALREADY_EXISTS",
            ),
            (
                DomainError::Spec(spec_error()),
                Code::InvalidArgument,
                "INVALID_SPEC",
            ),
            (
                DomainError::YamlSpec(spec_error()),
                Code::InvalidArgument,
                "INVALID_SPEC",
            ),
            (
                DomainError::Yaml("line 1".into()),
                Code::InvalidArgument,
                "INVALID_SPEC",
            ),
            (
                DomainError::invalid("page_size", "negative"),
                Code::InvalidArgument,
                "INVALID_ARGUMENT",
            ),
            (
                DomainError::RequestIdReused {
                    method: "StartDomain",
                    request_id: "r".into(),
                },
                Code::InvalidArgument,
                "REQUEST_ID_REUSED",
            ),
            (
                DomainError::Ambiguous {
                    key: "k".into(),
                    named_uuid: "u".into(),
                    other: "o".into(),
                },
                Code::InvalidArgument,
                "DOMAIN_NAME_AMBIGUOUS",
            ),
            (
                DomainError::EtagMismatch {
                    domain: "x".into(),
                    given: "a".into(),
                    current: "b".into(),
                },
                Code::Aborted,
                "ETAG_MISMATCH",
            ),
            (
                wrong_state(Need::ShutOff),
                Code::FailedPrecondition,
                "DOMAIN_ALREADY_RUNNING",
            ),
            (
                wrong_state(Need::ShutOffOrDestroy),
                Code::FailedPrecondition,
                "DOMAIN_RUNNING",
            ),
            (
                wrong_state(Need::Running),
                Code::FailedPrecondition,
                "DOMAIN_NOT_RUNNING",
            ),
            (
                wrong_state(Need::Paused),
                Code::FailedPrecondition,
                "DOMAIN_NOT_PAUSED",
            ),
            (
                DomainError::Storage {
                    which: "state dir",
                    problem: DirProblem::Full,
                    dir: "/s".into(),
                },
                Code::ResourceExhausted,
                "STATE_DIR_FULL",
            ),
            (
                DomainError::Storage {
                    which: "run dir",
                    problem: DirProblem::Full,
                    dir: "/r".into(),
                },
                Code::ResourceExhausted,
                "RUN_DIR_FULL",
            ),
            (
                DomainError::Storage {
                    which: "state dir",
                    problem: DirProblem::ReadOnly,
                    dir: "/s".into(),
                },
                Code::Unavailable,
                "STATE_DIR_READ_ONLY",
            ),
            (
                DomainError::Storage {
                    which: "run dir",
                    problem: DirProblem::ReadOnly,
                    dir: "/r".into(),
                },
                Code::Unavailable,
                "RUN_DIR_READ_ONLY",
            ),
            (
                DomainError::ListFull {
                    total: 2,
                    budget: 1,
                },
                Code::ResourceExhausted,
                "LIST_TOO_LARGE",
            ),
            (
                start(LaunchError::Spawn {
                    binary: "q".into(),
                    source: std::io::Error::other("nope"),
                }),
                Code::Unavailable,
                "QEMU_SPAWN_FAILED",
            ),
            (
                start(LaunchError::Exited {
                    status: std::os::unix::process::ExitStatusExt::from_raw(256),
                    log_tail: "qemu: -bogus: invalid option".into(),
                }),
                Code::FailedPrecondition,
                "QEMU_START_FAILED",
            ),
            (
                start(LaunchError::BindMonitor {
                    path: "/r/x/monitor.sock".into(),
                    source: io(),
                }),
                Code::Internal,
                "INTERNAL",
            ),
            (
                start(LaunchError::PrepareTask("secret panicked".into())),
                Code::Internal,
                "INTERNAL",
            ),
            (
                start(LaunchError::Launcher(
                    crate::launch::remote::RemoteError::Connect {
                        path: "/run/qvirt-vmm/vmm.sock".into(),
                        source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
                    },
                )),
                Code::Unavailable,
                "QEMU_LAUNCHER_UNAVAILABLE",
            ),
            (
                start(LaunchError::Launcher(
                    crate::launch::remote::RemoteError::Refused("not allowed".into()),
                )),
                Code::Unavailable,
                "QEMU_SPAWN_FAILED",
            ),
            (
                start(LaunchError::Launcher(
                    crate::launch::remote::RemoteError::PidNamespace {
                        reported: 1,
                        seen: 0,
                    },
                )),
                Code::Internal,
                "INTERNAL",
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
                "HOOK_FAILED",
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
                "HOOK_EXECUTOR_UNAVAILABLE",
            ),
            (
                DomainError::hook(
                    "x",
                    HookError::BadOutput {
                        op: HookOp::Restore,
                        message: "not YAML".into(),
                    },
                ),
                Code::FailedPrecondition,
                "HOOK_OUTPUT_INVALID",
            ),
            (
                DomainError::NoSavedImage("x".into()),
                Code::FailedPrecondition,
                "NO_SAVED_IMAGE",
            ),
            (
                DomainError::Incompatible {
                    domain: "x".into(),
                    message: "Target domain name 'y' does not match source 'x'".into(),
                },
                Code::FailedPrecondition,
                "DEFINITION_INCOMPATIBLE",
            ),
            (
                DomainError::Transfer {
                    domain: "x".into(),
                    what: "save",
                    message: "m".into(),
                },
                Code::FailedPrecondition,
                "SAVE_FAILED",
            ),
            (
                DomainError::Transfer {
                    domain: "x".into(),
                    what: "restore",
                    message: "m".into(),
                },
                Code::FailedPrecondition,
                "RESTORE_FAILED",
            ),
            (
                DomainError::qmp(
                    "x",
                    crate::qmp::QmpError::Command {
                        command: "cont".into(),
                        class: "GenericError".into(),
                        desc: "no".into(),
                    },
                ),
                Code::FailedPrecondition,
                "QEMU_REFUSED",
            ),
            (
                DomainError::Confine {
                    domain: "x".into(),
                    what: "opening /i/d.img".into(),
                    source: io(),
                },
                Code::FailedPrecondition,
                "GUEST_FILE_FAILED",
            ),
            (
                DomainError::qmp("x", crate::qmp::QmpError::MonitorClosed),
                Code::Unavailable,
                "MONITOR_UNAVAILABLE",
            ),
            (
                DomainError::MonitorLost {
                    domain: "x".into(),
                    pid: 7,
                },
                Code::Unavailable,
                "MONITOR_LOST",
            ),
            (
                DomainError::Detached("x".into()),
                Code::Unavailable,
                "DOMAIN_DETACHED",
            ),
            (
                DomainError::qmp(
                    "x",
                    crate::qmp::QmpError::ReplyTooLarge {
                        limit: crate::qmp::MAX_LINE_BYTES,
                    },
                ),
                Code::ResourceExhausted,
                "QMP_REPLY_TOO_LARGE",
            ),
            (
                DomainError::NoAgent("x".into()),
                Code::FailedPrecondition,
                "AGENT_NOT_CONFIGURED",
            ),
            (
                DomainError::NoAgentService,
                Code::FailedPrecondition,
                "AGENT_SERVICE_NOT_CONFIGURED",
            ),
            (
                agent(Code::DeadlineExceeded, None),
                Code::DeadlineExceeded,
                "AGENT_ERROR",
            ),
            (
                agent(Code::Internal, Some("INTERNAL")),
                Code::Unavailable,
                "AGENT_ERROR",
            ),
            (
                agent(Code::Unavailable, Some("AGENT_NOT_CONNECTED")),
                Code::Unavailable,
                "AGENT_NOT_CONNECTED",
            ),
            (
                DomainError::Timeout("t".into()),
                Code::DeadlineExceeded,
                "TIMEOUT",
            ),
            (
                DomainError::Stop {
                    domain: "x".into(),
                    source: Box::new(LaunchError::PrepareTask("secret".into())),
                },
                Code::Internal,
                "INTERNAL",
            ),
            (
                DomainError::Store(crate::domain::store::StoreError::Write {
                    path: "/secret".into(),
                    source: io(),
                }),
                Code::Internal,
                "INTERNAL",
            ),
            (
                DomainError::QemuUser(crate::domain::confine::CredentialsError::NoUser(
                    "secret".into(),
                )),
                Code::Internal,
                "INTERNAL",
            ),
            (
                DomainError::Internal("secret".into()),
                Code::Internal,
                "INTERNAL",
            ),
        ]
    }

    #[test]
    fn test_every_error_carries_its_code_reason_and_details() {
        let cases = table();
        let mut seen: Vec<&str> = cases.iter().map(|(e, ..)| variant(e)).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), ALL_VARIANTS, "a variant lacks a case: {seen:?}");
        for (error, want_code, want_reason) in cases {
            let status = to_status(&error);
            assert_eq!(status.code(), want_code, "{error}");
            let info = status
                .get_details_error_info()
                .unwrap_or_else(|| panic!("no ErrorInfo: {error}"));
            assert_eq!(info.reason, want_reason, "{error}");
            assert_eq!(info.domain, rpc::ERROR_DOMAIN);
            if want_code == Code::Internal {
                assert!(!status.message().contains("secret"), "{error}");
            } else if !matches!(
                error,
                DomainError::Spec(_)
                    | DomainError::YamlSpec(_)
                    | DomainError::Yaml(_)
                    | DomainError::InvalidArgument { .. }
                    | DomainError::ListFull { .. }
                    | DomainError::NoAgentService
                    | DomainError::Timeout(_)
                    | DomainError::Storage { .. }
                    | DomainError::RequestIdReused { .. }
            ) {
                assert!(
                    info.metadata.contains_key("domain") || info.metadata.contains_key("host"),
                    "no domain in the metadata: {error}"
                );
            }
            if want_code == Code::InvalidArgument {
                assert!(
                    !rpc::violated_fields(&status).is_empty(),
                    "no field violation: {error}"
                );
            }
        }
    }

    #[test]
    fn test_field_paths_of_invalid_arguments() {
        let spec = SpecError {
            field: "disks[1].path".into(),
            reason: "is required".into(),
        };
        let typed = to_status(&DomainError::Spec(spec.clone()));
        assert_eq!(rpc::violated_fields(&typed), ["spec.disks[1].path"]);
        let yaml = to_status(&DomainError::YamlSpec(spec));
        assert_eq!(rpc::violated_fields(&yaml), ["disks[1].path"]);
        let parse = to_status(&DomainError::Yaml("bad".into()));
        assert_eq!(rpc::violated_fields(&parse), ["yaml"]);
        let etag = to_status(&DomainError::EtagMismatch {
            domain: "x".into(),
            given: "a".into(),
            current: "b".into(),
        });
        let info = etag.get_details_error_info().expect("ErrorInfo");
        assert_eq!(
            info.metadata.get("current_etag").map(String::as_str),
            Some("b")
        );
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
