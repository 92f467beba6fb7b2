//! `qvirt-eventbus`: flags and config only; the service lives in the library.

use std::process::ExitCode;

use clap::Parser;
use qvirt_common::cli::CommonArgs;

/// qvirt event bus: fans QEMU monitor events and domain lifecycle events out to subscribers, with filters and replay.
#[derive(Debug, Parser)]
#[command(name = "qvirt-eventbus", version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    qvirt_common::service::main("qvirt-eventbus", args.common.load(), qvirt_eventbus::run)
}
