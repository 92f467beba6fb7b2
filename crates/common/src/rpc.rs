//! Errors a program can act on: every non-OK status a qvirt service returns
//! carries a `google.rpc.ErrorInfo` (a stable `reason`, the domain
//! [`ERROR_DOMAIN`], and metadata such as the domain name), and an
//! INVALID_ARGUMENT also carries `google.rpc.BadRequest` field violations
//! naming the field path (`spec.disks[1].path`). The encoding is
//! `tonic-types`' rich error model, so grpcurl and every gRPC client that
//! knows `google.rpc.Status` details read them.
//!
//! Each service keeps one table from its errors to code + reason (its
//! `status.rs`) and builds statuses only through [`error`],
//! [`invalid_argument`] and [`internal`].

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// `ErrorInfo.domain` of every qvirt error.
pub const ERROR_DOMAIN: &str = "qvirt.dev";

/// `ErrorInfo.reason` of an INTERNAL status (the cause is in the log).
pub const REASON_INTERNAL: &str = "INTERNAL";

/// Where a request's timeout is clamped: requests may ask for any length,
/// but deadline arithmetic needs a bound; no call lives this long.
pub const TIMEOUT_HORIZON: std::time::Duration =
    std::time::Duration::from_secs(30 * 365 * 24 * 3600);

/// A request asked for a negative timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("must not be negative")]
pub struct NegativeTimeout;

/// A request's `timeout` field, by the rule every qvirt service applies:
/// unset or zero is `None` (the service's default for that call); negative
/// is an error the service answers as INVALID_ARGUMENT on the field; there
/// is no upper limit (it is clamped to [`TIMEOUT_HORIZON`]).
pub fn request_timeout(
    timeout: Option<prost_types::Duration>,
) -> Result<Option<std::time::Duration>, NegativeTimeout> {
    match timeout.map(std::time::Duration::try_from) {
        None => Ok(None),
        Some(Ok(d)) if d.is_zero() => Ok(None),
        Some(Ok(d)) => Ok(Some(d.min(TIMEOUT_HORIZON))),
        Some(Err(_)) => Err(NegativeTimeout),
    }
}

/// A `grpc-timeout` header's value: at most 8 digits and a unit (`H`,
/// `M`, `S`, `m`, `u`, `n`), as gRPC over HTTP/2 defines it; `None` when
/// malformed (no deadline, as tonic treats it).
pub fn parse_grpc_timeout(value: &str) -> Option<std::time::Duration> {
    use std::time::Duration;
    let unit_at = value.len().checked_sub(1)?;
    if !value.is_char_boundary(unit_at) {
        return None;
    }
    let (digits, unit) = value.split_at(unit_at);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// How long a service gives itself of a caller's `timeout`: a tenth of it,
/// at most `margin`, less, so that its own answer (not the caller's
/// timer, nor tonic's CANCELLED "Timeout expired") ends the call.
pub fn within_deadline(
    timeout: std::time::Duration,
    margin: std::time::Duration,
) -> std::time::Duration {
    timeout - (timeout / 10).min(margin)
}

/// A status with `code`, `message`, and an ErrorInfo with `reason` and
/// `metadata` (empty values are left out).
pub fn error<'a>(
    code: Code,
    reason: &str,
    message: impl Into<String>,
    metadata: impl IntoIterator<Item = (&'a str, String)>,
) -> Status {
    Status::with_error_details(code, message, details(reason, metadata))
}

/// An INVALID_ARGUMENT status whose ErrorInfo has `reason` and whose
/// BadRequest lists each `(field path, description)`.
pub fn invalid_argument<'a>(
    reason: &str,
    message: impl Into<String>,
    violations: impl IntoIterator<Item = (String, String)>,
    metadata: impl IntoIterator<Item = (&'a str, String)>,
) -> Status {
    let mut details = details(reason, metadata);
    for (field, description) in violations {
        details.add_bad_request_violation(field, description);
    }
    Status::with_error_details(Code::InvalidArgument, message, details)
}

/// An INTERNAL status for a failure on the service's own side: the cause
/// goes to the log, the client gets generic text naming `service` (so a
/// path, a task's panic message or another secret never leaves the host).
pub fn internal(service: &str, cause: &(dyn std::error::Error + 'static)) -> Status {
    let line = crate::error_chain(cause);
    tracing::error!(error = %line, "internal error");
    error(
        Code::Internal,
        REASON_INTERNAL,
        format!("internal error in the {service} (details in its log)"),
        [],
    )
}

fn details<'a>(
    reason: &str,
    metadata: impl IntoIterator<Item = (&'a str, String)>,
) -> ErrorDetails {
    let metadata: HashMap<String, String> = metadata
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata)
}

/// The ErrorInfo reason of `status`, if it carries one (for tests and
/// clients).
pub fn reason_of(status: &Status) -> Option<String> {
    status.get_details_error_info().map(|info| info.reason)
}

/// The BadRequest field paths of `status` (empty if none).
pub fn violated_fields(status: &Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_grpc_timeout_reads_every_unit_and_refuses_the_rest() {
        use std::time::Duration;
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("300m"), Some(Duration::from_millis(300)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "S", "5", "5s", "123456789S", "-5S", "5 S", "5é"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn test_within_deadline_keeps_a_tenth_at_most_the_margin() {
        use std::time::Duration;
        let margin = Duration::from_millis(10);
        assert_eq!(
            within_deadline(Duration::from_secs(5), margin),
            Duration::from_millis(4990)
        );
        assert_eq!(
            within_deadline(Duration::from_millis(20), margin),
            Duration::from_millis(18)
        );
        assert_eq!(within_deadline(Duration::ZERO, margin), Duration::ZERO);
    }

    #[test]
    fn test_error_carries_reason_domain_and_metadata() {
        let status = error(
            Code::NotFound,
            "DOMAIN_NOT_FOUND",
            "domain \"x\" not found",
            [("domain", "x".to_owned()), ("host", String::new())],
        );
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(status.message(), "domain \"x\" not found");
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "DOMAIN_NOT_FOUND");
        assert_eq!(info.domain, ERROR_DOMAIN);
        assert_eq!(info.metadata.get("domain").map(String::as_str), Some("x"));
        assert!(!info.metadata.contains_key("host"), "empty values left out");
    }

    #[test]
    fn test_invalid_argument_names_the_fields() {
        let status = invalid_argument(
            "INVALID_SPEC",
            "bad",
            [("spec.disks[1].path".to_owned(), "is required".to_owned())],
            [],
        );
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(reason_of(&status).as_deref(), Some("INVALID_SPEC"));
        assert_eq!(violated_fields(&status), ["spec.disks[1].path"]);
    }

    #[test]
    fn test_internal_hides_the_cause() {
        let cause = std::io::Error::other("/secret/path: task panicked");
        let status = internal("supervisor", &cause);
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("secret"));
        assert_eq!(reason_of(&status).as_deref(), Some(REASON_INTERNAL));
    }
}
