//! Event bus errors as gRPC statuses: one table.

use tonic::Status;

use crate::filter::FilterError;
use crate::hub::{RecvError, SubscribeError};

/// A refused subscription: caps are RESOURCE_EXHAUSTED naming the cap, a
/// closing bus is UNAVAILABLE.
pub fn subscribe(e: SubscribeError) -> Status {
    match e {
        SubscribeError::PrincipalCap { .. }
        | SubscribeError::TotalCap { .. }
        | SubscribeError::DirectCap { .. } => Status::resource_exhausted(e.to_string()),
        SubscribeError::Closed => Status::unavailable(e.to_string()),
    }
}

/// A bad event-name filter: INVALID_ARGUMENT with the parser's message.
pub fn filter(e: FilterError) -> Status {
    Status::invalid_argument(format!("event: {}", qvirt_common::error_chain(&e)))
}

/// The end of a subscription: cut off is RESOURCE_EXHAUSTED, shutdown is
/// UNAVAILABLE.
pub fn recv(e: RecvError) -> Status {
    match e {
        RecvError::CutOff { .. } => Status::resource_exhausted(e.to_string()),
        RecvError::Closed => Status::unavailable(e.to_string()),
    }
}
