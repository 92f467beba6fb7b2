//! Why a command failed, reported as one line on stderr:
//! `error: WHAT (CODE, REASON)`, CODE the gRPC code's canonical name and
//! REASON the `google.rpc.ErrorInfo` reason where the status has one.

use tonic::Code;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The command line or an option's value is unusable (exit 2).
    #[error("{0}")]
    Usage(String),
    /// The gateway could not be reached.
    #[error("cannot connect to the gateway at {url}")]
    Connect {
        /// The URL tried.
        url: String,
        /// Why connecting failed.
        #[source]
        source: tonic::transport::Error,
    },
    /// The gateway answered with an error status.
    #[error("{}", status_text(.0))]
    Rpc(#[from] tonic::Status),
    /// A local file or stream failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Something the command checks failed (e.g. a QMP error reply).
    #[error("{0}")]
    Failed(String),
}

impl CtlError {
    /// The exit status: 2 for usage errors, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::Usage(_) => 2,
            _ => 1,
        }
    }

    /// The one line printed on stderr.
    pub fn report(&self) -> String {
        let line = match self {
            CtlError::Rpc(status) => {
                let code = code_name(status.code());
                match qvirt_common::rpc::reason_of(status) {
                    Some(reason) if reason != code => {
                        format!("{} ({code}, {reason})", status_text(status))
                    }
                    _ => format!("{} ({code})", status_text(status)),
                }
            }
            CtlError::Connect { .. } => {
                format!("{} (UNAVAILABLE)", qvirt_common::error_chain(self))
            }
            other => qvirt_common::error_chain(other),
        };
        format!("error: {}", one_line(&line))
    }
}

fn status_text(status: &tonic::Status) -> String {
    if status.message().is_empty() {
        status.code().description().to_owned()
    } else {
        status.message().trim_end().to_owned()
    }
}

/// Newlines (a QEMU stderr tail) folded so the report stays one line.
fn one_line(text: &str) -> String {
    text.trim_end()
        .lines()
        .map(str::trim_end)
        .collect::<Vec<_>>()
        .join(" | ")
}

/// A gRPC code's canonical name, as the protos and docs spell it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_report_has_code_and_reason_on_one_line() {
        let status = qvirt_common::rpc::error(
            Code::NotFound,
            "DOMAIN_NOT_FOUND",
            "domain \"x\" not found",
            [],
        );
        assert_eq!(
            CtlError::Rpc(status).report(),
            "error: domain \"x\" not found (NOT_FOUND, DOMAIN_NOT_FOUND)"
        );
        let plain = tonic::Status::unavailable("QEMU exited\nstderr: boom\n");
        assert_eq!(
            CtlError::Rpc(plain).report(),
            "error: QEMU exited | stderr: boom (UNAVAILABLE)"
        );
    }
}
