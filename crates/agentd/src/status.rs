//! Agent service errors as gRPC statuses: one table.
//!
//! | cause | code |
//! |---|---|
//! | request without `domain`, bad request field, raw command not a JSON object with `execute` | INVALID_ARGUMENT |
//! | domain in neither the static map nor the supervisor | NOT_FOUND |
//! | domain defined without `agent`, or not running | FAILED_PRECONDITION |
//! | supervisor unreachable or failing | UNAVAILABLE (its INVALID_ARGUMENT passes through) |
//! | agent socket missing / refused, EOF, I/O error, no answer to the sync handshake, sync ids never match | UNAVAILABLE |
//! | our per-command timeout expired (the supervisor lookup and connecting to the agent included) | DEADLINE_EXCEEDED |
//! | too many commands queued for the guest, reply over `max_reply_bytes` or over `MAX_JSON_VALUES` values, file over `max_file_bytes` | RESOURCE_EXHAUSTED |
//! | agent reply not a qemu-ga response, or not the shape the command promises (guest-controlled: details logged, not returned) | UNKNOWN |
//! | `CommandNotFound` "The command X has not been found" | UNIMPLEMENTED |
//! | `CommandNotFound` "Command X has been disabled[: reason]" (blocked with `-b`, or frozen) | FAILED_PRECONDITION, the agent's desc |
//! | `GenericError` argument errors ("Parameter ...", "Invalid parameter ...", "... is invalid for argument ...", "invalid file open mode", "invalid whence code", "Base64 data ...", "QMP input ...", "JSON parse error ...") | INVALID_ARGUMENT |
//! | `GenericError` "this feature or command is not currently supported" | UNIMPLEMENTED |
//! | `GenericError` "failed to open file ...: No such file or directory" | NOT_FOUND |
//! | any other `GenericError` (the command ran in the guest and failed: spawn, I/O, fsfreeze, shutdown, unknown handle) | FAILED_PRECONDITION, the agent's desc |
//! | any other error class | UNKNOWN, class and desc |
//!
//! Raw `Command` returns agent errors in its reply with OK; only the rows
//! above the agent's own rows apply to it.

use tonic::Status;

use crate::channel::ChannelError;
use crate::locate::LocateError;
use crate::wire::{AgentError, WireError};

/// An error of the domain lookup.
pub fn locate(e: LocateError) -> Status {
    let text = e.to_string();
    match e {
        LocateError::Empty => Status::invalid_argument(text),
        LocateError::Unknown(_) => Status::not_found(text),
        LocateError::NoAgent(_) | LocateError::NotRunning(_) => Status::failed_precondition(text),
        LocateError::Supervisor {
            code: tonic::Code::InvalidArgument,
            ..
        } => Status::invalid_argument(text),
        LocateError::Supervisor { .. } => Status::unavailable(text),
        LocateError::Timeout { .. } => Status::deadline_exceeded(text),
    }
}

/// An error of the channel to the agent.
pub fn channel(e: ChannelError) -> Status {
    let text = qvirt_common::error_chain(&e);
    match e {
        ChannelError::Timeout { .. } => Status::deadline_exceeded(text),
        ChannelError::QueueFull { .. }
        | ChannelError::Wire(WireError::TooLong { .. } | WireError::TooManyValues { .. }) => {
            Status::resource_exhausted(text)
        }
        ChannelError::Wire(WireError::BadReply { .. }) => untrusted_reply(&text),
        ChannelError::Connect { .. }
        | ChannelError::NotResponding(_)
        | ChannelError::Wire(_)
        | ChannelError::Closed
        | ChannelError::Retired => Status::unavailable(text),
    }
}

/// An error reply of the agent to a typed call. The desc is the guest's
/// text and travels in the `grpc-message` header: bounded by
/// [`guest_text`].
pub fn agent(e: &AgentError) -> Status {
    let code = agent_code(e);
    Status::new(code, format!("guest agent: {}", guest_text(&e.desc)))
}

/// Guest-controlled text put in a status message or a log line is cut to
/// this many bytes. qemu-ga's error texts are far shorter (the longest
/// carry a file path); an unbounded one in `grpc-message` would be a
/// header that HTTP/2 clients refuse (hyper's default limit is 16 KiB;
/// past 64 KiB h2 drops the whole connection, every other call on it
/// with it).
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

/// The code for an agent error reply (the table's agent rows).
pub fn agent_code(e: &AgentError) -> tonic::Code {
    use tonic::Code;
    let desc = e.desc.as_str();
    match e.class.as_str() {
        "CommandNotFound" if desc.contains("has been disabled") => Code::FailedPrecondition,
        "CommandNotFound" => Code::Unimplemented,
        "GenericError" if is_argument_error(desc) => Code::InvalidArgument,
        "GenericError" if desc.contains("not currently supported") => Code::Unimplemented,
        "GenericError"
            if desc.starts_with("failed to open file")
                && desc.ends_with("No such file or directory") =>
        {
            Code::NotFound
        }
        "GenericError" => Code::FailedPrecondition,
        _ => Code::Unknown,
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

/// A reply whose shape does not match the command's schema.
pub fn bad_shape(command: &str, e: &serde_json::Error) -> Status {
    untrusted_reply(&format!(
        "guest agent reply to {command} has an unexpected shape: {e}"
    ))
}

/// A guest agent answered something unusable. That is the guest's doing,
/// not a fault of this service: UNKNOWN, not INTERNAL. What the agent sent
/// is guest-controlled, so the details go to the log and the caller gets
/// a fixed text.
pub fn untrusted_reply(detail: &str) -> Status {
    let detail = guest_text(detail);
    tracing::warn!(detail = %detail, "unusable reply from a guest agent");
    Status::unknown(
        "the guest agent sent a reply this service cannot use (details in the agent service log)",
    )
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    #[test]
    fn test_agent_error_table() {
        let cases = [
            (
                "CommandNotFound",
                "The command guest-nope has not been found",
                Code::Unimplemented,
            ),
            (
                "CommandNotFound",
                "Command guest-ping has been disabled",
                Code::FailedPrecondition,
            ),
            (
                "CommandNotFound",
                "Command guest-exec has been disabled: the agent is in frozen state",
                Code::FailedPrecondition,
            ),
            (
                "GenericError",
                "Parameter 'path' is missing",
                Code::InvalidArgument,
            ),
            (
                "GenericError",
                "Parameter 'foo' is unexpected",
                Code::InvalidArgument,
            ),
            (
                "GenericError",
                "Invalid parameter type for 'id', expected: integer",
                Code::InvalidArgument,
            ),
            (
                "GenericError",
                "Invalid parameter 'pid'",
                Code::InvalidArgument,
            ),
            (
                "GenericError",
                "value '-1' is invalid for argument count",
                Code::InvalidArgument,
            ),
            (
                "GenericError",
                "invalid file open mode 'z'",
                Code::InvalidArgument,
            ),
            (
                "GenericError",
                "Base64 data contains invalid characters",
                Code::InvalidArgument,
            ),
            (
                "GenericError",
                "this feature or command is not currently supported",
                Code::Unimplemented,
            ),
            (
                "GenericError",
                "failed to open file '/nope' (mode: 'r'): No such file or directory",
                Code::NotFound,
            ),
            (
                "GenericError",
                "failed to open file '/root/x' (mode: 'r'): Permission denied",
                Code::FailedPrecondition,
            ),
            (
                "GenericError",
                "handle '1234' has not been found",
                Code::FailedPrecondition,
            ),
            (
                "GenericError",
                "child process has failed to shutdown",
                Code::FailedPrecondition,
            ),
            ("SomethingNew", "whatever", Code::Unknown),
        ];
        for (class, desc, want) in cases {
            let e = AgentError {
                class: class.into(),
                desc: desc.into(),
            };
            assert_eq!(agent_code(&e), want, "{class}: {desc}");
            assert!(agent(&e).message().contains(desc));
        }
    }

    #[test]
    fn test_long_agent_desc_is_cut_at_a_char_boundary() {
        // 3-byte characters: the cut falls inside one at GUEST_TEXT_MAX.
        let desc = "é€".repeat(4000);
        let e = AgentError {
            class: "GenericError".into(),
            desc: desc.clone(),
        };
        let msg = agent(&e).message().to_owned();
        assert!(msg.len() < GUEST_TEXT_MAX + 64, "{} bytes", msg.len());
        let kept = msg
            .strip_prefix("guest agent: ")
            .and_then(|m| m.split("... (").next())
            .unwrap();
        assert!(desc.starts_with(kept) && kept.len() > GUEST_TEXT_MAX - 4);
        assert!(msg.ends_with(&format!("({} more bytes)", desc.len() - kept.len())));
        // A short one is untouched.
        assert_eq!(
            guest_text("Parameter 'id' missing"),
            "Parameter 'id' missing"
        );
    }

    #[test]
    fn test_channel_errors() {
        use std::time::Duration;
        let cases = [
            (
                ChannelError::Timeout {
                    command: "guest-ping".into(),
                    after: Duration::from_millis(5),
                },
                Code::DeadlineExceeded,
            ),
            (
                ChannelError::NotResponding(Duration::from_secs(1)),
                Code::Unavailable,
            ),
            (ChannelError::Wire(WireError::Eof), Code::Unavailable),
            (
                ChannelError::QueueFull { depth: 1 },
                Code::ResourceExhausted,
            ),
            (
                ChannelError::Wire(WireError::TooLong { limit: 1 }),
                Code::ResourceExhausted,
            ),
            (
                ChannelError::Wire(WireError::BadReply {
                    reason: "guest text".into(),
                }),
                Code::Unknown,
            ),
            (ChannelError::Retired, Code::Unavailable),
        ];
        for (e, want) in cases {
            let status = channel(e);
            assert_eq!(status.code(), want);
            // What a guest agent sent never reaches the caller.
            assert!(!status.message().contains("guest text"), "{status:?}");
        }
        assert_eq!(
            locate(LocateError::Unknown("x".into())).code(),
            Code::NotFound
        );
        assert_eq!(
            locate(LocateError::NotRunning("x".into())).code(),
            Code::FailedPrecondition
        );
    }
}
