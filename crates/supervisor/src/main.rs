//! `qvirt-supervisor`: flags and config only; the service lives in the library.

use std::process::ExitCode;

use clap::Parser;
use qvirt_common::cli::CommonArgs;

/// qvirt supervisor: defines domains and runs them as QEMU processes driven over QMP.
#[derive(Debug, Parser)]
#[command(name = "qvirt-supervisor", version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    qvirt_common::service::main(
        "qvirt-supervisor",
        args.common.load(),
        qvirt_supervisor::run,
    )
}
