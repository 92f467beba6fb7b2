//! `qvirtctl`: parses the command line, runs the command, and turns its
//! result into an exit status (a guest program's for `guest-exec`) or a
//! one-line `error: ...` on stderr. The commands live in the library.

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
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(qvirtctl::run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("{}", e.report());
            ExitCode::from(e.exit_code())
        }
    }
}
