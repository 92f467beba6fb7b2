//! `qvirt-hookexec`: flags and config only; the service lives in the library.

use std::process::ExitCode;

use clap::Parser;
use qvirt_common::cli::CommonArgs;

/// qvirt hook executor: runs operator hook scripts with libvirt's argv, stdin and failure semantics.
#[derive(Debug, Parser)]
#[command(name = "qvirt-hookexec", version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    qvirt_common::service::main("qvirt-hookexec", args.common.load(), qvirt_hookexec::run)
}
