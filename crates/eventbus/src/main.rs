//! `qvirt-eventbus`: flags and config only; the service lives in the library.

use std::process::ExitCode;

use clap::Parser;
use qvirt_common::cli::{CommonArgs, override_with};

/// qvirt event bus: fans QEMU monitor events and domain lifecycle events out to subscribers, with filters and replay.
#[derive(Debug, Parser)]
#[command(name = "qvirt-eventbus", version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Serve Prometheus metrics on IP:PORT (path /metrics). Overrides
    /// `metrics_listen` in the file.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// What happens to a subscriber that cannot keep up. Overrides
    /// `slow_consumer` in the file.
    #[arg(long, value_enum)]
    slow_consumer: Option<qvirt_eventbus::config::SlowConsumer>,
    /// File holding the internal plane's shared secret. Overrides
    /// `internal_token_file` in the file.
    #[arg(long, value_name = "FILE")]
    internal_token_file: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = args.common.load().map(|mut c: qvirt_eventbus::Config| {
        override_with(&mut c.metrics_listen, args.metrics_listen.map(Some));
        override_with(&mut c.slow_consumer, args.slow_consumer);
        override_with(
            &mut c.internal_token_file,
            args.internal_token_file.map(Some),
        );
        c
    });
    qvirt_common::service::main("qvirt-eventbus", config, qvirt_eventbus::run)
}
