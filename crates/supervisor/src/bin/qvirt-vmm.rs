//! `qvirt-vmm`: the launcher that starts QEMU for a supervisor in another
//! container (see `qvirt_supervisor::vmm`). Flags only.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use qvirt_common::config::LogFormat;
use qvirt_supervisor::vmm::{self, VmmConfig};

/// qvirt launcher: starts QEMU for the supervisor, so guests outlive the supervisor's container.
#[derive(Debug, Parser)]
#[command(name = "qvirt-vmm", version, about)]
struct Args {
    /// Unix socket to listen on (mode 0600).
    #[arg(long, value_name = "PATH", default_value = vmm::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// A program requests may start, exactly as the supervisor names it
    /// (its `qemu_binary`); repeat for more.
    #[arg(
        long = "allow-binary",
        value_name = "PROGRAM",
        default_value = "qemu-system-x86_64"
    )]
    allowed_binaries: Vec<String>,
    /// At shutdown, how long to wait for QEMU after SIGTERM, seconds.
    #[arg(long, value_name = "SECS", default_value_t = 8)]
    stop_grace_secs: u64,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

fn main() -> ExitCode {
    let args = Args::parse();
    qvirt_common::telemetry::init(args.log_format);
    let config = VmmConfig {
        socket: args.socket,
        allowed_binaries: args.allowed_binaries,
        stop_grace: Duration::from_secs(args.stop_grace_secs),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("qvirt-vmm: starting the runtime: {error}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        let shutdown = qvirt_common::shutdown::on_signals()
            .map_err(|error| format!("installing signal handlers: {error}"))?;
        vmm::run(config, async move { shutdown.cancelled().await })
            .await
            .map_err(|error| qvirt_common::error_chain(&error))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("qvirt-vmm: {error}");
            ExitCode::from(1)
        }
    }
}
