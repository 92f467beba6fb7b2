//! `qvirt-gateway`: flags and config only; the service lives in the library.

use std::process::ExitCode;

use clap::Parser;
use qvirt_common::cli::CommonArgs;

/// qvirt gateway: the one public endpoint (not built yet: its RPCs answer UNIMPLEMENTED).
#[derive(Debug, Parser)]
#[command(name = "qvirt-gateway", version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    qvirt_common::service::main("qvirt-gateway", args.common.load(), qvirt_gateway::run)
}
