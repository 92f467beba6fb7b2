//! Event bus errors as gRPC statuses: one table ([`BusError::into_status`])
//! from each error to its code and its stable `ErrorInfo` reason (listed
//! in docs/API.md, "Errors"). Every status the bus builds goes through it,
//! except the internal-caller check, whose status
//! `qvirt_common::internal_auth` builds (reason `INTERNAL_CALLER_REQUIRED`).

use qvirt_common::rpc;
use tonic::{Code, Status};

use crate::cursor::CursorError;
use crate::filter::FilterError;
use crate::hub::{RecvError, SubscribeError};

/// A subscription or Publish call the bus refuses or ends.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// A subscription cap is reached.
    #[error(transparent)]
    Subscribe(#[from] SubscribeError),
    /// A subscription ends (cut off, or the bus shuts down).
    #[error(transparent)]
    Recv(#[from] RecvError),
    /// The event-name filter is unusable.
    #[error("event: {}", qvirt_common::error_chain(.0))]
    Filter(FilterError),
    /// A `flags` entry is not a flag.
    #[error("flags[{index}]: unknown monitor event filter flag {value}")]
    Flag {
        /// Its index in `flags`.
        index: usize,
        /// Its value.
        value: i32,
    },
    /// A filter field is longer than the bus keeps.
    #[error("{field}: is {len} bytes, at most {max}")]
    FieldTooLong {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// `resume_after` is not a cursor.
    #[error("resume_after: {0}")]
    Cursor(#[source] CursorError),
    /// `resume_after` names an event of this run the bus has not stored yet:
    /// it never issued that cursor.
    #[error(
        "resume_after: names event {seq} of this event bus, beyond its newest ({last}): not a cursor it issued"
    )]
    CursorBeyondHead {
        /// The sequence number the cursor names.
        seq: u64,
        /// The newest event's sequence number.
        last: u64,
        /// The newest event's cursor.
        last_cursor: String,
    },
    /// `replay_held` together with `resume_after`.
    #[error("replay_held: only with an empty resume_after (a cursor already says where to start)")]
    ReplayWithCursor,
    /// A Publish message carries no event.
    #[error("event: exactly one must be set")]
    NoEvent,
    /// A published event is over `max_event_bytes`.
    #[error("event: {size} bytes encoded, over the bus's max_event_bytes of {max}")]
    EventTooLarge {
        /// Its encoded size.
        size: usize,
        /// The cap.
        max: usize,
    },
    /// A subscription request cannot be decoded.
    #[error("cannot decode the request: {0}")]
    Undecodable(#[source] prost::DecodeError),
    /// Reading the Publish stream failed (the status tonic reported).
    #[error("{}", .0.message())]
    PublishStream(Status),
    /// The fleet's stream cannot be read (NATS unreachable, no leader):
    /// what failed, the cause logged.
    #[error("fleet events: {0}")]
    Fleet(String),
}

impl BusError {
    /// The gRPC status of this error: the bus's one table.
    pub fn into_status(self) -> Status {
        let message = self.to_string();
        let bad = |reason: &str, field: &str| {
            rpc::invalid_argument(
                reason,
                message.clone(),
                [(field.to_owned(), message.clone())],
                [],
            )
        };
        match self {
            BusError::Subscribe(e) => {
                let (cap, kind, limit, principal) = match &e {
                    SubscribeError::PrincipalCap {
                        kind,
                        principal,
                        limit,
                    } => ("per_principal", *kind, *limit, principal.clone()),
                    SubscribeError::TotalCap { kind, limit } => {
                        ("total", *kind, *limit, String::new())
                    }
                    SubscribeError::DirectCap { kind, limit } => {
                        ("direct", *kind, *limit, String::new())
                    }
                    SubscribeError::Closed => {
                        return rpc::error(Code::Unavailable, REASON_SHUTTING_DOWN, message, []);
                    }
                };
                rpc::error(
                    Code::ResourceExhausted,
                    REASON_SUBSCRIPTION_CAP,
                    message,
                    [
                        ("cap", cap.to_owned()),
                        ("kind", kind.as_str().to_owned()),
                        ("limit", limit.to_string()),
                        ("principal", principal),
                    ],
                )
            }
            BusError::Recv(RecvError::CutOff { capacity }) => rpc::error(
                Code::ResourceExhausted,
                REASON_CUT_OFF,
                message,
                [("queue_capacity", capacity.to_string())],
            ),
            BusError::Recv(RecvError::Closed) => {
                rpc::error(Code::Unavailable, REASON_SHUTTING_DOWN, message, [])
            }
            BusError::Filter(_) => bad(REASON_INVALID_FILTER, "event"),
            BusError::Flag { index, .. } => bad(REASON_INVALID_FILTER, &format!("flags[{index}]")),
            BusError::FieldTooLong { field, .. } => bad(REASON_FIELD_TOO_LONG, field),
            BusError::Cursor(_) => bad(REASON_INVALID_CURSOR, "resume_after"),
            BusError::CursorBeyondHead { last_cursor, .. } => rpc::error(
                Code::OutOfRange,
                REASON_CURSOR_BEYOND_HEAD,
                message,
                [("last_cursor", last_cursor)],
            ),
            BusError::ReplayWithCursor => bad(REASON_CONFLICTING_FIELDS, "replay_held"),
            BusError::NoEvent => bad(REASON_INVALID_EVENT, "event"),
            BusError::EventTooLarge { max, .. } => rpc::invalid_argument(
                REASON_EVENT_TOO_LARGE,
                message.clone(),
                [("event".to_owned(), message)],
                [("max_event_bytes", max.to_string())],
            ),
            BusError::Undecodable(_) => {
                rpc::invalid_argument(REASON_UNDECODABLE_REQUEST, message, [], [])
            }
            BusError::PublishStream(status) => {
                rpc::error(status.code(), REASON_PUBLISH_STREAM_FAILED, message, [])
            }
            BusError::Fleet(_) => {
                rpc::error(Code::Unavailable, REASON_FLEET_UNAVAILABLE, message, [])
            }
        }
    }
}

impl From<BusError> for Status {
    fn from(e: BusError) -> Status {
        e.into_status()
    }
}

/// RESOURCE_EXHAUSTED: a subscription cap is reached (metadata `cap`:
/// `per_principal`, `total` or `direct`; `kind`; `limit`).
pub const REASON_SUBSCRIPTION_CAP: &str = "SUBSCRIPTION_CAP";
/// RESOURCE_EXHAUSTED: the subscriber fell behind under `slow_consumer:
/// cut-off`.
pub const REASON_CUT_OFF: &str = "SLOW_CONSUMER_CUT_OFF";
/// UNAVAILABLE: the bus is shutting down.
pub const REASON_SHUTTING_DOWN: &str = "BUS_SHUTTING_DOWN";
/// INVALID_ARGUMENT: the event-name filter or a flag is unusable.
pub const REASON_INVALID_FILTER: &str = "INVALID_EVENT_FILTER";
/// INVALID_ARGUMENT: `domain` or `host` is too long.
pub const REASON_FIELD_TOO_LONG: &str = "FIELD_TOO_LONG";
/// INVALID_ARGUMENT: `resume_after` is not a cursor.
pub const REASON_INVALID_CURSOR: &str = "INVALID_CURSOR";
/// OUT_OF_RANGE: `resume_after` is beyond the newest event.
pub const REASON_CURSOR_BEYOND_HEAD: &str = "CURSOR_BEYOND_HEAD";
/// INVALID_ARGUMENT: `replay_held` with `resume_after`.
pub const REASON_CONFLICTING_FIELDS: &str = "CONFLICTING_FIELDS";
/// INVALID_ARGUMENT: a Publish message without an event.
pub const REASON_INVALID_EVENT: &str = "INVALID_EVENT";
/// INVALID_ARGUMENT: a published event over `max_event_bytes`.
pub const REASON_EVENT_TOO_LARGE: &str = "EVENT_TOO_LARGE";
/// INVALID_ARGUMENT: a subscription request that is not protobuf.
pub const REASON_UNDECODABLE_REQUEST: &str = "UNDECODABLE_REQUEST";
/// UNAVAILABLE: the fleet's stream cannot be read now; try again.
pub const REASON_FLEET_UNAVAILABLE: &str = "FLEET_UNAVAILABLE";
/// The Publish stream broke (its code as tonic reported it).
pub const REASON_PUBLISH_STREAM_FAILED: &str = "PUBLISH_STREAM_FAILED";

#[cfg(test)]
mod tests {
    use tonic_types::StatusExt as _;

    use super::*;
    use crate::hub::SubscriberKind;

    /// The filter error of an unclosed group.
    fn invalid_regex() -> FilterError {
        let flags = crate::filter::FilterFlags {
            regex: true,
            nocase: false,
        };
        match crate::filter::EventNameFilter::new("(", flags) {
            Ok(_) => panic!("\"(\" compiled"),
            Err(e) => e,
        }
    }

    /// prost's error for bytes that are not a message.
    fn undecodable() -> prost::DecodeError {
        use prost::Message as _;
        qvirt_proto::v1::SubscribeDomainEventsRequest::decode(&[0xff_u8][..])
            .expect_err("not a message")
    }

    /// One error of each row, with its code, reason and BadRequest fields.
    fn table() -> Vec<(BusError, Code, &'static str, Vec<&'static str>)> {
        let kind = SubscriberKind::Monitor;
        let regex = invalid_regex();
        vec![
            (
                SubscribeError::PrincipalCap {
                    kind,
                    principal: "p".into(),
                    limit: 2,
                }
                .into(),
                Code::ResourceExhausted,
                "SUBSCRIPTION_CAP",
                vec![],
            ),
            (
                SubscribeError::TotalCap { kind, limit: 2 }.into(),
                Code::ResourceExhausted,
                "SUBSCRIPTION_CAP",
                vec![],
            ),
            (
                SubscribeError::DirectCap { kind, limit: 1 }.into(),
                Code::ResourceExhausted,
                "SUBSCRIPTION_CAP",
                vec![],
            ),
            (
                SubscribeError::Closed.into(),
                Code::Unavailable,
                "BUS_SHUTTING_DOWN",
                vec![],
            ),
            (
                RecvError::CutOff { capacity: 4 }.into(),
                Code::ResourceExhausted,
                "SLOW_CONSUMER_CUT_OFF",
                vec![],
            ),
            (
                RecvError::Closed.into(),
                Code::Unavailable,
                "BUS_SHUTTING_DOWN",
                vec![],
            ),
            (
                BusError::Filter(regex),
                Code::InvalidArgument,
                "INVALID_EVENT_FILTER",
                vec!["event"],
            ),
            (
                BusError::Flag { index: 1, value: 0 },
                Code::InvalidArgument,
                "INVALID_EVENT_FILTER",
                vec!["flags[1]"],
            ),
            (
                BusError::FieldTooLong {
                    field: "host",
                    len: 300,
                    max: 256,
                },
                Code::InvalidArgument,
                "FIELD_TOO_LONG",
                vec!["host"],
            ),
            (
                BusError::Cursor(CursorError::Malformed),
                Code::InvalidArgument,
                "INVALID_CURSOR",
                vec!["resume_after"],
            ),
            (
                BusError::CursorBeyondHead {
                    seq: 9,
                    last: 3,
                    last_cursor: "1.e.3".into(),
                },
                Code::OutOfRange,
                "CURSOR_BEYOND_HEAD",
                vec![],
            ),
            (
                BusError::ReplayWithCursor,
                Code::InvalidArgument,
                "CONFLICTING_FIELDS",
                vec!["replay_held"],
            ),
            (
                BusError::NoEvent,
                Code::InvalidArgument,
                "INVALID_EVENT",
                vec!["event"],
            ),
            (
                BusError::EventTooLarge {
                    size: 2049,
                    max: 2048,
                },
                Code::InvalidArgument,
                "EVENT_TOO_LARGE",
                vec!["event"],
            ),
            (
                BusError::Undecodable(undecodable()),
                Code::InvalidArgument,
                "UNDECODABLE_REQUEST",
                vec![],
            ),
            (
                BusError::PublishStream(Status::cancelled("gone")),
                Code::Cancelled,
                "PUBLISH_STREAM_FAILED",
                vec![],
            ),
        ]
    }

    #[test]
    fn test_every_error_has_its_code_reason_and_fields() {
        for (error, code, reason, fields) in table() {
            let message = error.to_string();
            let status = error.into_status();
            assert_eq!(status.code(), code, "{message}");
            assert_eq!(status.message(), message);
            let info = status.get_details_error_info().expect("ErrorInfo");
            assert_eq!(info.reason, reason, "{message}");
            assert_eq!(info.domain, rpc::ERROR_DOMAIN);
            assert_eq!(rpc::violated_fields(&status), fields, "{message}");
            if code == Code::InvalidArgument {
                assert!(
                    status.get_details_bad_request().is_some() || reason == "UNDECODABLE_REQUEST",
                    "{message}: INVALID_ARGUMENT names its field"
                );
            }
        }
    }

    #[test]
    fn test_metadata_a_client_acts_on() {
        let status = BusError::from(SubscribeError::PrincipalCap {
            kind: SubscriberKind::Domain,
            principal: "alice".into(),
            limit: 2,
        })
        .into_status();
        let info = status.get_details_error_info().expect("ErrorInfo");
        let md = |k: &str| info.metadata.get(k).map(String::as_str);
        assert_eq!(
            (md("cap"), md("kind"), md("limit"), md("principal")),
            (
                Some("per_principal"),
                Some("domain"),
                Some("2"),
                Some("alice")
            )
        );
        let status = BusError::CursorBeyondHead {
            seq: 9,
            last: 3,
            last_cursor: "1.e.3".into(),
        }
        .into_status();
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(
            info.metadata.get("last_cursor").map(String::as_str),
            Some("1.e.3")
        );
        // The filter's message keeps the regex parser's own words.
        let regex = invalid_regex();
        let status = BusError::Filter(regex).into_status();
        assert!(status.message().starts_with("event: "), "{status}");
        assert!(status.message().contains("unclosed group"), "{status}");
    }
}
