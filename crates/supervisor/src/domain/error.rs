//! The errors of domain operations; `crate::status` maps them to gRPC codes.

use crate::domain::spec::SpecError;
use std::path::PathBuf;

use crate::domain::store::{DirProblem, StoreError};
use crate::launch::LaunchError;
use crate::qmp::QmpError;
use crate::seams::{AgentError, HookError};

/// Why a domain operation failed, named after what went wrong.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    /// No domain has that name or UUID.
    #[error("domain {0:?} not found")]
    NotFound(String),
    /// A domain with that name or UUID exists.
    #[error("a domain with {field} {value:?} already exists")]
    AlreadyExists {
        /// `name` or `uuid`.
        field: &'static str,
        /// The value.
        value: String,
    },
    /// The spec is invalid.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The YAML document does not parse as a domain spec (the text names
    /// the field, line and column).
    #[error("invalid domain YAML: {0}")]
    Yaml(String),
    /// A spec given as YAML is invalid (the field is the YAML field's
    /// path).
    #[error(transparent)]
    YamlSpec(SpecError),
    /// Some other argument is invalid.
    #[error("{message}")]
    InvalidArgument {
        /// The request field (path) at fault.
        field: &'static str,
        /// What is wrong, naming the field.
        message: String,
    },
    /// The request names a host other than this supervisor's.
    #[error("host {0:?} not found (this supervisor is host {1:?})")]
    HostNotFound(String, String),
    /// DefineDomain's etag is not the domain's current one.
    #[error(
        "domain {domain:?} changed since it was read (etag {given:?}, now {current:?}); read it again"
    )]
    EtagMismatch {
        /// The domain.
        domain: String,
        /// The etag the caller gave.
        given: String,
        /// Its current etag (empty: the domain does not exist).
        current: String,
    },
    /// A request id came back with a different request.
    #[error(
        "request_id {request_id:?} was already used for a different {method} request; use a new one"
    )]
    RequestIdReused {
        /// The RPC.
        method: &'static str,
        /// The id.
        request_id: String,
    },
    /// The domain is in the wrong state for the call.
    #[error("domain {domain:?} is {state}: {what}")]
    WrongState {
        /// The domain.
        domain: String,
        /// Its state, lowercase (`running`, `shut off`, ...).
        state: &'static str,
        /// What the call needs (the ErrorInfo reason follows from it).
        need: Need,
        /// What cannot be done.
        what: &'static str,
    },
    /// QEMU could not be started; the cause has its exit status and output.
    #[error("starting domain {domain:?} failed")]
    Start {
        /// The domain.
        domain: String,
        /// What the launcher saw.
        #[source]
        source: Box<LaunchError>,
    },
    /// A start hook refused the start (FAILED_PRECONDITION), or could not
    /// be run because the hook executor is unavailable (UNAVAILABLE).
    #[error("starting domain {domain:?} refused")]
    Hook {
        /// The domain.
        domain: String,
        /// The hook's failure.
        #[source]
        source: HookError,
    },
    /// A QMP command failed: QEMU answered with an error.
    #[error("QEMU refused {command}: {class}: {desc}")]
    QemuRefused {
        /// The domain.
        domain: String,
        /// The command.
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's message.
        desc: String,
    },
    /// The monitor is not reachable (QEMU gone or closing).
    #[error("QEMU monitor of domain {domain:?} unavailable")]
    Monitor {
        /// The domain.
        domain: String,
        /// The QMP error.
        #[source]
        source: QmpError,
    },
    /// QEMU's reply was over the monitor's line limit; it was discarded
    /// and the monitor stays usable.
    #[error("reply from QEMU of domain {domain:?} too large")]
    ReplyTooLarge {
        /// The domain.
        domain: String,
        /// [`QmpError::ReplyTooLarge`].
        #[source]
        source: QmpError,
    },
    /// The monitor connection was lost while QEMU (same pid and start
    /// time) still runs; the watcher is reconnecting.
    #[error(
        "QEMU monitor of domain {domain:?} lost while QEMU (pid {pid}) still runs; \
         reconnecting (DestroyDomain still stops it)"
    )]
    MonitorLost {
        /// The domain.
        domain: String,
        /// QEMU's pid.
        pid: u32,
    },
    /// QEMU runs but the supervisor could not re-attach to its monitor
    /// after a restart (another supervisor may hold it).
    #[error(
        "domain {0:?} runs but its QEMU monitor could not be re-attached after a restart \
         (is another supervisor using the same state and run dirs?); restart the supervisor"
    )]
    Detached(String),
    /// Stopping QEMU failed.
    #[error("stopping QEMU of domain {domain:?} failed")]
    Stop {
        /// The domain.
        domain: String,
        /// The error.
        #[source]
        source: Box<LaunchError>,
    },
    /// A file the guest needs could not be prepared for it (opened, or
    /// given to QEMU's user), or QEMU's user cannot be found.
    #[error("domain {domain:?}: {what}")]
    Confine {
        /// The domain (empty at supervisor start).
        domain: String,
        /// What failed, naming the file.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// QEMU's user or group cannot be found (at supervisor start).
    #[error(transparent)]
    QemuUser(#[from] crate::domain::confine::CredentialsError),
    /// Agent mode was asked for a domain defined without `agent: true`.
    #[error("domain {0:?} has no guest agent (`agent: true` in its definition)")]
    NoAgent(String),
    /// Agent mode was asked but no agent service is configured.
    #[error("no agent service configured (`agentd` / --agentd); use ACPI mode")]
    NoAgentService,
    /// The agent service refused or failed the call.
    #[error("guest agent of domain {domain:?} failed")]
    Agent {
        /// The domain.
        domain: String,
        /// The agent service's answer.
        #[source]
        source: AgentError,
    },
    /// A wait of ours expired.
    #[error("{0}")]
    Timeout(String),
    /// Persisting state failed.
    #[error("saving domain state failed")]
    Store(#[from] StoreError),
    /// The state or run dir cannot take the write: its filesystem is full
    /// or read-only. Nothing was changed.
    #[error("{which} {problem}: cannot write in {}", dir.display())]
    Storage {
        /// `state dir` or `run dir`.
        which: &'static str,
        /// What is wrong with it.
        problem: DirProblem,
        /// The configured dir.
        dir: PathBuf,
    },
    /// Storing one more definition would make the ListDomains answer
    /// larger than its budget.
    #[error(
        "the definitions would take {total} bytes in a ListDomains answer, more than its \
         budget of {budget} (gRPC clients take 4 MiB by default); undefine a domain or shorten the definition"
    )]
    ListFull {
        /// The bytes with this definition.
        total: usize,
        /// The budget.
        budget: usize,
    },
    /// A UUID-shaped key names one domain and is the UUID of another (a
    /// name from before such names were refused).
    #[error(
        "{key:?} is the name of domain {named_uuid:?} and the UUID of domain {other:?}; \
         use {named_uuid:?} or {other:?}"
    )]
    Ambiguous {
        /// The key asked for.
        key: String,
        /// The UUID of the domain named `key`.
        named_uuid: String,
        /// The name of the domain whose UUID is `key`.
        other: String,
    },
    /// RestoreDomain of a domain that has no saved image.
    #[error("domain {0:?} has no saved image (SaveDomain writes one)")]
    NoSavedImage(String),
    /// The definition to restore with (the domain's, as the restore hook
    /// left it) does not fit the saved image; `message` is libvirt's ABI
    /// check wording.
    #[error(
        "domain {domain:?} cannot be restored with this definition: unsupported configuration: {message}"
    )]
    Incompatible {
        /// The domain.
        domain: String,
        /// What differs, e.g. "Target domain max memory 262144 does not
        /// match source 131072".
        message: String,
    },
    /// QEMU could not write the guest's state (save) or load it (restore).
    #[error("{what} of domain {domain:?} failed: {message}")]
    Transfer {
        /// The domain.
        domain: String,
        /// `save` or `restore`.
        what: &'static str,
        /// QEMU's account (its migration error, or its exit and log tail).
        message: String,
    },
    /// A bug: a task died or a lock was lost.
    #[error("internal error: {0}")]
    Internal(String),
}

/// The state a call needs, for [`DomainError::WrongState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// A shut off domain (StartDomain): it runs.
    ShutOff,
    /// A shut off domain, or `destroy` (UndefineDomain): it runs.
    ShutOffOrDestroy,
    /// A running (or paused) domain: it is not.
    Running,
    /// A paused domain (ResumeDomain): it is not.
    Paused,
}

impl DomainError {
    /// An invalid request `field`.
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        DomainError::InvalidArgument {
            field,
            message: message.into(),
        }
    }

    /// A start refused by hook `source`.
    pub fn hook(domain: &str, source: HookError) -> Self {
        DomainError::Hook {
            domain: domain.to_owned(),
            source,
        }
    }

    /// Wrap a QMP error of `command` on `domain`.
    pub fn qmp(domain: &str, source: QmpError) -> Self {
        match source {
            QmpError::Command {
                command,
                class,
                desc,
            } => DomainError::QemuRefused {
                domain: domain.to_owned(),
                command,
                class,
                desc,
            },
            source @ QmpError::ReplyTooLarge { .. } => DomainError::ReplyTooLarge {
                domain: domain.to_owned(),
                source,
            },
            source => DomainError::Monitor {
                domain: domain.to_owned(),
                source,
            },
        }
    }
}
