//! `qvirtctl`: parses the command line and reports errors; the commands
//! live in the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = qvirtctl::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("qvirtctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(qvirtctl::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qvirtctl: {}", qvirt_common::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
