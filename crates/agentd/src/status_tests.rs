//! The status table: every error's code, reason, ErrorInfo and (for
//! INVALID_ARGUMENT) BadRequest field.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tonic::Code;
use tonic_types::StatusExt;

use super::*;

fn agent_err(class: &str, desc: &str) -> CallError {
    CallError::Agent {
        command: "guest-exec".into(),
        error: AgentError {
            class: class.into(),
            desc: desc.into(),
        },
    }
}

/// One example of every error, with the code, reason and (for
/// INVALID_ARGUMENT) the BadRequest field a client sees.
fn table() -> Vec<(CallError, Code, &'static str, Option<&'static str>)> {
    use Code::*;
    let io = || std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
    vec![
        (
            CallError::request("args[2]", "must not contain a NUL byte"),
            InvalidArgument,
            "INVALID_ARGUMENT",
            Some("args[2]"),
        ),
        (
            LocateError::Empty.into(),
            InvalidArgument,
            "INVALID_ARGUMENT",
            Some("domain"),
        ),
        (
            LocateError::Supervisor {
                domain: "vm".into(),
                code: InvalidArgument,
                message: "bad name".into(),
            }
            .into(),
            InvalidArgument,
            "INVALID_ARGUMENT",
            Some("domain"),
        ),
        (
            LocateError::Unknown("vm".into()).into(),
            NotFound,
            "DOMAIN_NOT_FOUND",
            None,
        ),
        (
            LocateError::WrongHost {
                domain: "vm".into(),
                host: "h2".into(),
            }
            .into(),
            NotFound,
            "HOST_NOT_FOUND",
            None,
        ),
        (
            LocateError::NotRunning("vm".into()).into(),
            FailedPrecondition,
            "DOMAIN_NOT_RUNNING",
            None,
        ),
        (
            LocateError::NoAgent("vm".into()).into(),
            FailedPrecondition,
            "AGENT_NOT_CONFIGURED",
            None,
        ),
        (
            LocateError::Supervisor {
                domain: "vm".into(),
                code: Unavailable,
                message: "connection refused".into(),
            }
            .into(),
            Unavailable,
            "SUPERVISOR_UNAVAILABLE",
            None,
        ),
        (
            LocateError::Timeout {
                domain: "vm".into(),
                after: Duration::from_secs(1),
            }
            .into(),
            DeadlineExceeded,
            "AGENT_TIMEOUT",
            None,
        ),
        (
            ChannelError::Timeout {
                command: "guest-ping".into(),
                after: Duration::from_millis(5),
            }
            .into(),
            DeadlineExceeded,
            "AGENT_TIMEOUT",
            None,
        ),
        (
            ChannelError::QueueFull { depth: 1 }.into(),
            ResourceExhausted,
            "AGENT_QUEUE_FULL",
            None,
        ),
        (
            ChannelError::Wire(WireError::TooLong { limit: 1 }).into(),
            ResourceExhausted,
            "AGENT_REPLY_TOO_LARGE",
            None,
        ),
        (
            ChannelError::Wire(WireError::TooManyValues { limit: 1 }).into(),
            ResourceExhausted,
            "AGENT_REPLY_TOO_LARGE",
            None,
        ),
        (
            ChannelError::Wire(WireError::BadReply {
                reason: "guest text".into(),
            })
            .into(),
            Unknown,
            "AGENT_REPLY_INVALID",
            None,
        ),
        (
            ChannelError::Closed.into(),
            Unavailable,
            "SHUTTING_DOWN",
            None,
        ),
        (
            ChannelError::Connect {
                path: "/run/x.sock".into(),
                source: io(),
            }
            .into(),
            Unavailable,
            "AGENT_NOT_CONNECTED",
            None,
        ),
        (
            ChannelError::NotResponding(Duration::from_secs(1)).into(),
            Unavailable,
            "AGENT_NOT_CONNECTED",
            None,
        ),
        (
            ChannelError::Wire(WireError::Eof).into(),
            Unavailable,
            "AGENT_NOT_CONNECTED",
            None,
        ),
        (
            ChannelError::Wire(WireError::Io(io())).into(),
            Unavailable,
            "AGENT_NOT_CONNECTED",
            None,
        ),
        (
            ChannelError::Wire(WireError::SyncMismatch).into(),
            Unavailable,
            "AGENT_NOT_CONNECTED",
            None,
        ),
        (
            ChannelError::Retired.into(),
            Unavailable,
            "AGENT_NOT_CONNECTED",
            None,
        ),
        (
            agent_err(
                "CommandNotFound",
                "The command guest-nope has not been found",
            ),
            Unimplemented,
            "AGENT_COMMAND_NOT_FOUND",
            None,
        ),
        (
            agent_err("CommandNotFound", "Command guest-ping has been disabled"),
            FailedPrecondition,
            "AGENT_COMMAND_DISABLED",
            None,
        ),
        (
            agent_err(
                "CommandNotFound",
                "Command guest-exec has been disabled: the agent is in frozen state",
            ),
            FailedPrecondition,
            "AGENT_COMMAND_DISABLED",
            None,
        ),
        (
            agent_err("GenericError", "Parameter 'path' is missing"),
            InvalidArgument,
            "AGENT_INVALID_ARGUMENT",
            Some("arguments.path"),
        ),
        (
            agent_err("GenericError", "Parameter 'foo' is unexpected"),
            InvalidArgument,
            "AGENT_INVALID_ARGUMENT",
            Some("arguments.foo"),
        ),
        (
            agent_err(
                "GenericError",
                "Invalid parameter type for 'id', expected: integer",
            ),
            InvalidArgument,
            "AGENT_INVALID_ARGUMENT",
            Some("arguments.id"),
        ),
        (
            agent_err("GenericError", "Invalid parameter 'pid'"),
            InvalidArgument,
            "AGENT_INVALID_ARGUMENT",
            Some("arguments.pid"),
        ),
        (
            agent_err("GenericError", "value '-1' is invalid for argument count"),
            InvalidArgument,
            "AGENT_INVALID_ARGUMENT",
            Some("arguments.count"),
        ),
        (
            agent_err("GenericError", "invalid file open mode 'z'"),
            InvalidArgument,
            "AGENT_INVALID_ARGUMENT",
            Some("arguments"),
        ),
        (
            agent_err("GenericError", "Base64 data contains invalid characters"),
            InvalidArgument,
            "AGENT_INVALID_ARGUMENT",
            Some("arguments"),
        ),
        (
            agent_err(
                "GenericError",
                "this feature or command is not currently supported",
            ),
            Unimplemented,
            "AGENT_COMMAND_NOT_SUPPORTED",
            None,
        ),
        (
            agent_err(
                "GenericError",
                "failed to open file '/nope' (mode: 'r'): No such file or directory",
            ),
            NotFound,
            "GUEST_FILE_NOT_FOUND",
            None,
        ),
        (
            agent_err(
                "GenericError",
                "failed to lookup user 'nosuchuser': Success",
            ),
            NotFound,
            "GUEST_USER_NOT_FOUND",
            None,
        ),
        (
            agent_err(
                "GenericError",
                "failed to open file '/root/x' (mode: 'r'): Permission denied",
            ),
            FailedPrecondition,
            "AGENT_ERROR",
            None,
        ),
        (
            agent_err("GenericError", "handle '1234' has not been found"),
            FailedPrecondition,
            "AGENT_ERROR",
            None,
        ),
        (
            agent_err("GenericError", "child process has failed to shutdown"),
            FailedPrecondition,
            "AGENT_ERROR",
            None,
        ),
        (
            agent_err("SomethingNew", "whatever"),
            Unknown,
            "AGENT_ERROR",
            None,
        ),
        (
            CallError::bad_reply("guest-get-osinfo", "guest text"),
            Unknown,
            "AGENT_REPLY_INVALID",
            None,
        ),
        (
            CallError::FileTooLarge {
                what: "the file".into(),
                limit: 1024,
                hint: "",
            },
            ResourceExhausted,
            "FILE_TOO_LARGE",
            None,
        ),
        (
            CallError::ShortWrite {
                written: 1,
                asked: 2,
            },
            FailedPrecondition,
            "AGENT_SHORT_WRITE",
            None,
        ),
    ]
}

#[test]
fn test_every_error_maps_to_its_code_reason_and_error_info() {
    for (e, code, reason, field) in table() {
        let what = format!("{e:?}");
        assert_eq!(code_and_reason(&e), (code, reason), "{what}");
        let status = status(&e, "vm", "h1");
        assert_eq!(status.code(), code, "{what}");
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, reason, "{what}");
        assert_eq!(info.domain, "qvirt.dev", "{what}");
        assert_eq!(info.metadata["domain"], "vm", "{what}");
        assert_eq!(info.metadata["host"], "h1", "{what}");
        match field {
            Some(field) => assert_eq!(rpc::violated_fields(&status), [field], "{what}"),
            None => assert!(status.get_details_bad_request().is_none(), "{what}"),
        }
        // What a guest agent sent in an unusable reply never reaches the
        // caller.
        assert!(!status.message().contains("guest text"), "{status:?}");
    }
}

#[test]
fn test_agent_errors_carry_class_desc_and_command() {
    let e = agent_err("GenericError", "child process has failed to shutdown");
    let status = status(&e, "vm", "");
    assert!(
        status
            .message()
            .contains("child process has failed to shutdown")
    );
    let info = status.get_details_error_info().unwrap();
    assert_eq!(info.metadata["command"], "guest-exec");
    assert_eq!(info.metadata["agent_class"], "GenericError");
    assert_eq!(
        info.metadata["agent_desc"],
        "child process has failed to shutdown"
    );
    assert!(!info.metadata.contains_key("host"), "empty host left out");
}

#[test]
fn test_long_agent_desc_is_cut_at_a_char_boundary() {
    // 3-byte characters: the cut falls inside one at GUEST_TEXT_MAX.
    let desc = "é€".repeat(4000);
    let e = agent_err("GenericError", &desc);
    let st = status(&e, "vm", "");
    let msg = st.message().to_owned();
    assert!(msg.len() < GUEST_TEXT_MAX + 64, "{} bytes", msg.len());
    let kept = msg
        .strip_prefix("guest agent: ")
        .and_then(|m| m.split("... (").next())
        .unwrap();
    assert!(desc.starts_with(kept) && kept.len() > GUEST_TEXT_MAX - 4);
    assert!(msg.ends_with(&format!("({} more bytes)", desc.len() - kept.len())));
    let info = st.get_details_error_info().unwrap();
    assert!(info.metadata["agent_desc"].len() < GUEST_TEXT_MAX + 64);
    // A short one is untouched.
    assert_eq!(
        guest_text("Parameter 'id' missing"),
        "Parameter 'id' missing"
    );
}
