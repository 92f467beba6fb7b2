//! What every qvirt service shares, so that each service crate holds only
//! its own logic.
//!
//! - [`config`]: YAML config files (unknown keys rejected with line and
//!   column), listen addresses, log formats, and the error a bad config
//!   gives.
//! - [`cli`]: the flags every service binary takes (`--config`, `--listen`,
//!   `--log-format`) and how they override the file.
//! - [`telemetry`]: `tracing` set-up, text or JSON, filtered by `RUST_LOG`.
//! - [`shutdown`]: a cancellation token that fires on SIGTERM or SIGINT.
//! - [`serve`]: binds TCP or a unix socket, adds `grpc.health.v1` and server
//!   reflection, and serves until shut down.
//! - [`accept`]: accept loops that back off when out of file descriptors,
//!   and the HTTP/2 preface deadline.
//! - [`internal_auth`]: the internal plane's shared secret: loading it,
//!   checking callers of internal methods, and the client interceptor that
//!   presents it.
//! - [`pem`]: PEM files a config names (TLS certificates, CA bundles),
//!   read bounded and checked.
//! - [`qapi`]: a caller's raw QAPI command (MonitorCommand, the agent's raw
//!   Command), checked in one place.
//! - [`rpc`]: statuses with `google.rpc.ErrorInfo` reasons and `BadRequest`
//!   field violations, and the INTERNAL status that logs its cause.
//! - [`service`]: the body of every service's `main`: config errors to exit
//!   code 2, runtime errors to exit code 1, one line on stderr each.
//!
//! Not here: anything specific to one service, and generated protobuf code
//! (that is `qvirt-proto`).

pub mod accept;
pub mod cli;
pub mod config;
pub mod internal_auth;
pub mod pem;
pub mod qapi;
pub mod rpc;
pub mod serve;
pub mod service;
pub mod shutdown;
pub mod telemetry;

/// Formats an error and its whole `source()` chain on one line, joined by
/// `": "`, the way every qvirt binary reports a fatal error.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut line = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        let text = c.to_string();
        // Some errors repeat their source's text in their own message.
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer step failed")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn test_error_chain_joins_causes_on_one_line() {
        let err = Outer(std::io::Error::other("disk on fire"));
        assert_eq!(error_chain(&err), "outer step failed: disk on fire");
    }
}
