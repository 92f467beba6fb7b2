//! Agent service errors: the typed [`CallError`] every RPC returns, and the
//! one table that maps it to a gRPC status at the edge ([`reply`]). Every
//! status carries an ErrorInfo (domain `qvirt.dev`, metadata `domain` and
//! `host` of the request, plus `command`, `agent_class` and `agent_desc`
//! for the agent's own errors); an INVALID_ARGUMENT also carries a
//! BadRequest naming the field.
//!
//! | cause | code | reason |
//! |---|---|---|
//! | a bad request field (`domain` empty, `timeout` negative, `path` empty, `args[2]` with a NUL, raw `command_json` not a JSON object with `execute`, ...) | INVALID_ARGUMENT | `INVALID_ARGUMENT` (BadRequest: the field) |
//! | the supervisor refuses the domain key | INVALID_ARGUMENT | `INVALID_ARGUMENT` (BadRequest: `domain`) |
//! | domain in neither the static map nor the supervisor | NOT_FOUND | `DOMAIN_NOT_FOUND` |
//! | `host` is not the domain's host | NOT_FOUND | `HOST_NOT_FOUND` |
//! | domain not running | FAILED_PRECONDITION | `DOMAIN_NOT_RUNNING` |
//! | domain defined without `agent` | FAILED_PRECONDITION | `AGENT_NOT_CONFIGURED` |
//! | supervisor unreachable or failing | UNAVAILABLE | `SUPERVISOR_UNAVAILABLE` |
//! | agent socket missing / refused, EOF, I/O error, no answer to the sync handshake, sync ids never match | UNAVAILABLE | `AGENT_NOT_CONNECTED` |
//! | our per-command timeout expired (the supervisor lookup and connecting to the agent included) | DEADLINE_EXCEEDED | `AGENT_TIMEOUT` |
//! | too many commands queued for the guest | RESOURCE_EXHAUSTED | `AGENT_QUEUE_FULL` |
//! | reply over `max_reply_bytes` or over `MAX_JSON_VALUES` values | RESOURCE_EXHAUSTED | `AGENT_REPLY_TOO_LARGE` |
//! | file over `max_file_bytes` | RESOURCE_EXHAUSTED | `FILE_TOO_LARGE` |
//! | the service is shutting down | UNAVAILABLE | `SHUTTING_DOWN` |
//! | agent reply not a qemu-ga response, or not the shape the command promises (guest-controlled: details logged, not returned) | UNKNOWN | `AGENT_REPLY_INVALID` |
//! | `CommandNotFound` "The command X has not been found" | UNIMPLEMENTED | `AGENT_COMMAND_NOT_FOUND` |
//! | `CommandNotFound` "Command X has been disabled[: reason]" (blocked with `-b`, or frozen) | FAILED_PRECONDITION | `AGENT_COMMAND_DISABLED` |
//! | `GenericError` argument errors ("Parameter ...", "Invalid parameter ...", "... is invalid for argument ...", "invalid file open mode", "invalid whence code", "Base64 data ...", "QMP input ...", "JSON parse error ...") | INVALID_ARGUMENT | `AGENT_INVALID_ARGUMENT` (BadRequest: `arguments.NAME`, the agent's argument) |
//! | `GenericError` "this feature or command is not currently supported" | UNIMPLEMENTED | `AGENT_COMMAND_NOT_SUPPORTED` |
//! | `GenericError` "failed to open file ...: No such file or directory" | NOT_FOUND | `GUEST_FILE_NOT_FOUND` |
//! | `GenericError` "failed to lookup user 'X': ..." (SSH key calls) | NOT_FOUND | `GUEST_USER_NOT_FOUND` |
//! | any other `GenericError` (the command ran in the guest and failed: spawn, I/O, fsfreeze, shutdown, unknown handle) | FAILED_PRECONDITION | `AGENT_ERROR` |
//! | any other error class | UNKNOWN | `AGENT_ERROR` |
//! | the agent wrote fewer bytes than sent | FAILED_PRECONDITION | `AGENT_SHORT_WRITE` |
//!
//! Raw `Command` returns agent errors in its reply with OK; only the rows
//! above the agent's own rows apply to it.

use qvirt_common::rpc;
use tonic::{Code, Response, Status};

use crate::channel::ChannelError;
use crate::locate::LocateError;
use crate::wire::{AgentError, WireError};

/// Why a GuestAgent call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// A request field is invalid.
    #[error("{field}: {description}")]
    Request {
        /// Its path, e.g. `timeout`, `args[2]`.
        field: String,
        /// What is wrong with it.
        description: String,
    },
    /// The domain's agent socket is not known.
    #[error(transparent)]
    Locate(#[from] LocateError),
    /// The command got no usable reply.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// The agent answered the command with an error.
    #[error("guest agent error in {command}")]
    Agent {
        /// The command.
        command: String,
        /// The agent's error reply.
        #[source]
        error: AgentError,
    },
    /// The agent's reply does not have the shape the command promises
    /// (guest-controlled text: logged, never returned).
    #[error("the guest agent's reply to {command} is unusable: {detail}")]
    BadReply {
        /// The command.
        command: String,
        /// What is wrong with the reply.
        detail: String,
    },
    /// A file read or written is over `max_file_bytes`.
    #[error("{what} exceeds this service's limit of {limit} bytes (max_file_bytes){hint}")]
    FileTooLarge {
        /// What is too large.
        what: String,
        /// The limit.
        limit: usize,
        /// How to get it anyway.
        hint: &'static str,
    },
    /// guest-file-write wrote less than it was given.
    #[error("guest agent wrote {written} of {asked} bytes")]
    ShortWrite {
        /// What the agent says it wrote.
        written: i64,
        /// What it was given.
        asked: usize,
    },
}

impl CallError {
    /// A bad request field.
    pub fn request(field: impl Into<String>, description: impl Into<String>) -> Self {
        CallError::Request {
            field: field.into(),
            description: description.into(),
        }
    }

    /// A reply of `command` that cannot be used.
    pub fn bad_reply(command: &str, detail: impl Into<String>) -> Self {
        CallError::BadReply {
            command: command.to_owned(),
            detail: detail.into(),
        }
    }
}

/// The result of an RPC as the client sees it: `Ok` as the response, an
/// error through the table, with the request's `domain` and `host`.
pub fn reply<T>(
    domain: &str,
    host: &str,
    result: Result<T, CallError>,
) -> Result<Response<T>, Status> {
    result
        .map(Response::new)
        .map_err(|e| status(&e, domain, host))
}

/// The code and reason of `e` (the table).
pub fn code_and_reason(e: &CallError) -> (Code, &'static str) {
    match e {
        CallError::Request { .. } => (Code::InvalidArgument, "INVALID_ARGUMENT"),
        CallError::Locate(e) => match e {
            LocateError::Empty
            | LocateError::Supervisor {
                code: Code::InvalidArgument,
                ..
            } => (Code::InvalidArgument, "INVALID_ARGUMENT"),
            LocateError::Unknown(_) => (Code::NotFound, "DOMAIN_NOT_FOUND"),
            LocateError::WrongHost { .. } => (Code::NotFound, "HOST_NOT_FOUND"),
            LocateError::NotRunning(_) => (Code::FailedPrecondition, "DOMAIN_NOT_RUNNING"),
            LocateError::NoAgent(_) => (Code::FailedPrecondition, "AGENT_NOT_CONFIGURED"),
            LocateError::Supervisor { .. } => (Code::Unavailable, "SUPERVISOR_UNAVAILABLE"),
            LocateError::Timeout { .. } => (Code::DeadlineExceeded, "AGENT_TIMEOUT"),
        },
        CallError::Channel(e) => match e {
            ChannelError::Timeout { .. } => (Code::DeadlineExceeded, "AGENT_TIMEOUT"),
            ChannelError::QueueFull { .. } => (Code::ResourceExhausted, "AGENT_QUEUE_FULL"),
            ChannelError::Wire(WireError::TooLong { .. } | WireError::TooManyValues { .. }) => {
                (Code::ResourceExhausted, "AGENT_REPLY_TOO_LARGE")
            }
            ChannelError::Wire(WireError::BadReply { .. }) => {
                (Code::Unknown, "AGENT_REPLY_INVALID")
            }
            ChannelError::Closed => (Code::Unavailable, "SHUTTING_DOWN"),
            ChannelError::Connect { .. }
            | ChannelError::NotResponding(_)
            | ChannelError::Wire(_)
            | ChannelError::Retired => (Code::Unavailable, "AGENT_NOT_CONNECTED"),
        },
        CallError::Agent { error, .. } => agent_code_and_reason(error),
        CallError::BadReply { .. } => (Code::Unknown, "AGENT_REPLY_INVALID"),
        CallError::FileTooLarge { .. } => (Code::ResourceExhausted, "FILE_TOO_LARGE"),
        CallError::ShortWrite { .. } => (Code::FailedPrecondition, "AGENT_SHORT_WRITE"),
    }
}

/// `e` as a status, with the request's `domain` and `host` in its
/// ErrorInfo.
pub fn status(e: &CallError, domain: &str, host: &str) -> Status {
    let (code, reason) = code_and_reason(e);
    let mut metadata = vec![("domain", domain.to_owned()), ("host", host.to_owned())];
    let message = match e {
        CallError::Agent { command, error } => {
            let desc = guest_text(&error.desc).into_owned();
            metadata.push(("command", command.clone()));
            metadata.push(("agent_class", guest_text(&error.class).into_owned()));
            metadata.push(("agent_desc", desc.clone()));
            format!("guest agent: {desc}")
        }
        CallError::BadReply { .. }
        | CallError::Channel(ChannelError::Wire(WireError::BadReply { .. })) => {
            // What the agent sent is guest-controlled: the log gets it,
            // the caller a fixed text.
            let detail = qvirt_common::error_chain(e);
            tracing::warn!(domain, detail = %guest_text(&detail), "unusable reply from a guest agent");
            "the guest agent sent a reply this service cannot use (details in the agent service log)"
                .to_owned()
        }
        CallError::Channel(ChannelError::Timeout { command, .. }) => {
            metadata.push(("command", command.clone()));
            qvirt_common::error_chain(e)
        }
        _ => qvirt_common::error_chain(e),
    };
    if code != Code::InvalidArgument {
        return rpc::error(code, reason, message, metadata);
    }
    let violation = match e {
        CallError::Request { field, description } => (field.clone(), description.clone()),
        CallError::Agent { error, .. } => (
            agent_argument(&error.desc),
            guest_text(&error.desc).into_owned(),
        ),
        _ => ("domain".to_owned(), message.clone()),
    };
    rpc::invalid_argument(reason, message, [violation], metadata)
}

/// Guest-controlled text put in a status message or a log line is cut to
/// this many bytes. qemu-ga's error texts are far shorter (the longest
/// carry a file path); an unbounded one in `grpc-message` would be a
/// header that HTTP/2 clients refuse (hyper's default limit is 16 KiB;
/// past 64 KiB h2 drops the whole connection, every other call on it
/// with it). The ErrorInfo in `grpc-status-details-bin` carries it too.
pub const GUEST_TEXT_MAX: usize = 1024;

/// `text` cut to at most [`GUEST_TEXT_MAX`] bytes at a character boundary,
/// saying how much was cut.
pub fn guest_text(text: &str) -> std::borrow::Cow<'_, str> {
    if text.len() <= GUEST_TEXT_MAX {
        return text.into();
    }
    let mut end = GUEST_TEXT_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} more bytes)", &text[..end], text.len() - end).into()
}

/// The code and reason of an agent error reply (the table's agent rows).
pub fn agent_code_and_reason(e: &AgentError) -> (Code, &'static str) {
    let desc = e.desc.as_str();
    match e.class.as_str() {
        "CommandNotFound" if desc.contains("has been disabled") => {
            (Code::FailedPrecondition, "AGENT_COMMAND_DISABLED")
        }
        "CommandNotFound" => (Code::Unimplemented, "AGENT_COMMAND_NOT_FOUND"),
        "GenericError" if is_argument_error(desc) => {
            (Code::InvalidArgument, "AGENT_INVALID_ARGUMENT")
        }
        "GenericError" if desc.contains("not currently supported") => {
            (Code::Unimplemented, "AGENT_COMMAND_NOT_SUPPORTED")
        }
        "GenericError"
            if desc.starts_with("failed to open file")
                && desc.ends_with("No such file or directory") =>
        {
            (Code::NotFound, "GUEST_FILE_NOT_FOUND")
        }
        "GenericError" if desc.starts_with("failed to lookup user '") => {
            (Code::NotFound, "GUEST_USER_NOT_FOUND")
        }
        "GenericError" => (Code::FailedPrecondition, "AGENT_ERROR"),
        _ => (Code::Unknown, "AGENT_ERROR"),
    }
}

fn is_argument_error(desc: &str) -> bool {
    const PREFIXES: [&str; 8] = [
        "Parameter '",
        "Invalid parameter",
        "invalid file open mode",
        "invalid whence code",
        "Base64 data",
        "QMP input",
        "JSON parse error",
        "Expected '",
    ];
    PREFIXES.iter().any(|p| desc.starts_with(p))
        || (desc.starts_with("value '") && desc.contains("is invalid for argument"))
}

/// The BadRequest field of an agent argument error: `arguments.NAME` when
/// the agent's text names the argument (qemu-ga's spelling, e.g.
/// `arguments.pid`), else `arguments`.
fn agent_argument(desc: &str) -> String {
    let quoted = |s: &str| {
        let rest = &s[s.find('\'')? + 1..];
        Some(rest[..rest.find('\'')?].to_owned())
    };
    let name = if desc.starts_with("Parameter '") || desc.starts_with("Invalid parameter") {
        quoted(desc)
    } else if let Some((_, arg)) = desc.split_once("is invalid for argument ") {
        arg.split_whitespace().next().map(str::to_owned)
    } else {
        None
    };
    match name {
        Some(n) if !n.is_empty() && n.len() <= 64 => format!("arguments.{n}"),
        _ => "arguments".to_owned(),
    }
}

#[cfg(test)]
#[path = "status_tests.rs"]
mod tests;
