//! `qvirt-agentd`: flags and config only; the service lives in the library.

use std::process::ExitCode;

use clap::Parser;
use qvirt_common::cli::CommonArgs;

/// qvirt agent service: the gRPC face of the guest agents inside qvirt's domains.
#[derive(Debug, Parser)]
#[command(name = "qvirt-agentd", version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    qvirt_common::service::main("qvirt-agentd", args.common.load(), qvirt_agentd::run)
}
