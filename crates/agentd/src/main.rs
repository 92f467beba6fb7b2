//! `qvirt-agentd`: flags and config only; the service lives in the library.

use std::process::ExitCode;

use clap::Parser;
use qvirt_common::cli::{CommonArgs, override_with};

/// qvirt agent service: the gRPC face of the guest agents inside qvirt's domains.
#[derive(Debug, Parser)]
#[command(name = "qvirt-agentd", version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Supervisor endpoint (http://HOST:PORT) asked for agent sockets of
    /// domains not in `agents`. Overrides `supervisor`.
    #[arg(long, value_name = "URL")]
    supervisor: Option<String>,
    /// Default limit for one agent command, milliseconds. Overrides
    /// `command_timeout_ms`.
    #[arg(long, value_name = "MS")]
    command_timeout_ms: Option<u64>,
    /// Limit for the resynchronisation handshake, milliseconds. Overrides
    /// `sync_timeout_ms`.
    #[arg(long, value_name = "MS")]
    sync_timeout_ms: Option<u64>,
    /// Largest ReadFile result and WriteFile payload, bytes. Overrides
    /// `max_file_bytes`.
    #[arg(long, value_name = "BYTES")]
    max_file_bytes: Option<usize>,
    /// Close idle agent connections after this many seconds (0: never).
    /// Overrides `idle_close_secs`.
    #[arg(long, value_name = "SECS")]
    idle_close_secs: Option<u64>,
    /// Runtime threads: 1 = one thread, 0 = one per core. Overrides
    /// `worker_threads`.
    #[arg(long, value_name = "N")]
    worker_threads: Option<usize>,
    /// File holding the internal plane's shared secret, required of TCP
    /// callers and presented to the supervisor. Overrides
    /// `internal_token_file`.
    #[arg(long, value_name = "FILE")]
    internal_token_file: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = args.common.load().map(|mut c: qvirt_agentd::Config| {
        override_with(&mut c.supervisor, args.supervisor.map(Some));
        override_with(&mut c.command_timeout_ms, args.command_timeout_ms);
        override_with(&mut c.sync_timeout_ms, args.sync_timeout_ms);
        override_with(&mut c.max_file_bytes, args.max_file_bytes);
        override_with(&mut c.idle_close_secs, args.idle_close_secs);
        override_with(&mut c.worker_threads, args.worker_threads);
        override_with(
            &mut c.internal_token_file,
            args.internal_token_file.map(Some),
        );
        c
    });
    qvirt_common::service::main("qvirt-agentd", config, qvirt_agentd::run)
}
