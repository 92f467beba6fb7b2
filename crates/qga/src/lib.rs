//! The QEMU guest agent wire protocol, byte for byte as qemu-ga 7.2 speaks
//! it, as the guest agent (`qvirt-ga`) uses it. The host side
//! (`qvirt-agentd`) reads agent replies with `serde_json` and its own
//! framing instead: it needs the replies, not qemu-ga's exact bytes.
//!
//! - [`stream::StreamParser`] is the entry point for input: feed it bytes
//!   split anywhere and it yields one [`stream::Message`] per complete JSON
//!   message or error, as QEMU's lexer, streamer and parser would
//!   (single-quoted strings, `\u0000`, lexer error recovery, 0xFF resets,
//!   the 64 MiB / 2,097,152-token / depth-1024 limits and their texts).
//! - [`value::Value`] keeps int64, uint64 and double apart; [`value::Dict`]
//!   iterates in QDict hash order.
//! - [`writer`] writes values exactly as qemu-ga does (ASCII only,
//!   uppercase `\uXXXX`, `%.17g`, `": "` / `", "`).
//! - [`envelope`] checks requests as `qmp_dispatch` does and builds
//!   responses (`id` echo rules, one line each, optional 0xFF delimiter).
//!
//! Not here: commands, transports, the agent's state (that is `qvirt-ga`).

pub mod envelope;
pub mod lexer;
pub mod parser;
pub mod stream;
pub mod unicode;
pub mod value;
pub mod writer;

pub use envelope::{
    ErrorClass, QgaError, Rejected, Request, check_request, error_response, success_response,
    write_response,
};
pub use stream::{JsonError, Message, StreamParser};
pub use value::{Dict, Value};

/// The byte qemu-ga writes before a `guest-sync-delimited` response, and
/// that clients send to reset the agent's parser.
pub const SENTINEL: u8 = 0xFF;
