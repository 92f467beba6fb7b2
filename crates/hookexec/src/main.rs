//! `qvirt-hookexec`: flags and config only; the service lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use qvirt_common::cli::{CommonArgs, override_with};

/// qvirt hook executor: runs operator hook scripts with libvirt's argv, stdin and failure semantics.
#[derive(Debug, Parser)]
#[command(name = "qvirt-hookexec", version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Hooks directory (DRIVER and DRIVER.d/* scripts; /etc/libvirt/hooks
    /// runs libvirt's hooks unchanged). Overrides `hooks_dir` in the file.
    #[arg(long, value_name = "DIR")]
    hooks_dir: Option<PathBuf>,
    /// Per-script timeout when a request sets none, seconds. Overrides
    /// `timeout_secs` in the file.
    #[arg(long, value_name = "SECS")]
    timeout_secs: Option<u64>,
    /// Longest timeout a request may ask for, seconds. Overrides
    /// `max_timeout_secs` in the file.
    #[arg(long, value_name = "SECS")]
    max_timeout_secs: Option<u64>,
    /// Bytes of stdout and of stderr kept per script. Overrides
    /// `max_output_bytes` in the file.
    #[arg(long, value_name = "BYTES")]
    max_output_bytes: Option<usize>,
    /// RunHook calls running at once. Overrides `max_concurrent_runs` in
    /// the file.
    #[arg(long, value_name = "N")]
    max_concurrent_runs: Option<usize>,
    /// File holding the internal plane's shared secret. Overrides
    /// `internal_token_file` in the file.
    #[arg(long, value_name = "FILE")]
    internal_token_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = args.common.load().map(|mut c: qvirt_hookexec::Config| {
        override_with(&mut c.hooks_dir, args.hooks_dir);
        override_with(&mut c.timeout_secs, args.timeout_secs);
        override_with(&mut c.max_timeout_secs, args.max_timeout_secs);
        override_with(&mut c.max_output_bytes, args.max_output_bytes);
        override_with(&mut c.max_concurrent_runs, args.max_concurrent_runs);
        override_with(
            &mut c.internal_token_file,
            args.internal_token_file.map(Some),
        );
        c
    });
    qvirt_common::service::main("qvirt-hookexec", config, qvirt_hookexec::run)
}
