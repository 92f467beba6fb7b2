//! `qvirt-supervisor`: flags and config only; the service lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use qvirt_common::cli::{CommonArgs, ServiceConfig, override_with};
use qvirt_common::config::ConfigError;
use qvirt_supervisor::config::{DefaultAccel, HookStdinFormat};

/// qvirt supervisor: defines domains and runs them as QEMU processes driven over QMP.
#[derive(Debug, Clone, Parser)]
#[command(name = "qvirt-supervisor", version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Persistent state dir (domain definitions, QEMU logs). Overrides `state_dir`.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Runtime dir (status files, monitor and agent sockets). Overrides `run_dir`.
    #[arg(long, value_name = "DIR")]
    run_dir: Option<PathBuf>,
    /// QEMU binary. Overrides `qemu_binary`.
    #[arg(long, value_name = "PATH")]
    qemu_binary: Option<PathBuf>,
    /// User QEMU runs as (when the supervisor is root). Overrides `qemu_user`.
    #[arg(long, value_name = "USER")]
    qemu_user: Option<String>,
    /// Group QEMU runs as (empty: the user's primary group). Overrides `qemu_group`.
    #[arg(long, value_name = "GROUP")]
    qemu_group: Option<String>,
    /// QEMU's seccomp sandbox. Overrides `qemu_sandbox`.
    #[arg(long, value_name = "BOOL")]
    qemu_sandbox: Option<bool>,
    /// A dir images may be in; repeat for more. Overrides `image_roots`.
    #[arg(long = "image-root", value_name = "DIR")]
    image_roots: Vec<PathBuf>,
    /// A dir serial logs may be in; repeat for more. Overrides `serial_log_roots`.
    #[arg(long = "serial-log-root", value_name = "DIR")]
    serial_log_roots: Vec<PathBuf>,
    /// Node name in domain records and events. Overrides `node_name`.
    #[arg(long, value_name = "NAME")]
    node_name: Option<String>,
    /// Accelerator for specs without one. Overrides `default_accel`.
    #[arg(long, value_enum, value_name = "ACCEL")]
    default_accel: Option<DefaultAccel>,
    /// Let `accel: auto` pick KVM when /dev/kvm is usable. Overrides `auto_uses_kvm`.
    #[arg(long, value_name = "BOOL")]
    auto_uses_kvm: Option<bool>,
    /// Bound on QEMU's startup handshake, seconds. Overrides `start_timeout_secs`.
    #[arg(long, value_name = "SECS")]
    start_timeout_secs: Option<u64>,
    /// Bound on one QMP command, seconds. Overrides `command_timeout_secs`.
    #[arg(long, value_name = "SECS")]
    command_timeout_secs: Option<u64>,
    /// Destroy: SIGKILL this many seconds after SIGTERM. Overrides `destroy_grace_secs`.
    #[arg(long, value_name = "SECS")]
    destroy_grace_secs: Option<u64>,
    /// Bound on a save's or restore's state transfer, seconds. Overrides `save_timeout_secs`.
    #[arg(long, value_name = "SECS")]
    save_timeout_secs: Option<u64>,
    /// Publish events to the event bus at URL (e.g. http://127.0.0.1:50053,
    /// or unix:PATH; the same for --hookexec and --agentd).
    /// Overrides `eventbus`.
    #[arg(long, value_name = "URL")]
    eventbus: Option<String>,
    /// Run hooks through the hook executor at URL (e.g. http://127.0.0.1:50054).
    /// Overrides `hookexec`.
    #[arg(long, value_name = "URL")]
    hookexec: Option<String>,
    /// Bound on one hook call, seconds. Overrides `hook_call_timeout_secs`.
    #[arg(long, value_name = "SECS")]
    hook_call_timeout_secs: Option<u64>,
    /// What hook scripts read on stdin: yaml or libvirt-xml. Overrides `hook_stdin_format`.
    #[arg(long, value_enum, value_name = "FORMAT")]
    hook_stdin_format: Option<HookStdinFormat>,
    /// Agent service for agent-mode shutdown/reboot at URL (e.g.
    /// http://127.0.0.1:50055). Overrides `agentd`.
    #[arg(long, value_name = "URL")]
    agentd: Option<String>,
    /// Most memory a domain may ask for, MiB (default: the host's). Overrides `max_memory_mib`.
    #[arg(long, value_name = "MIB")]
    max_memory_mib: Option<u64>,
    /// Most vCPUs a domain may ask for (default: 8 per host CPU). Overrides `max_vcpus`.
    #[arg(long, value_name = "N")]
    max_vcpus: Option<u32>,
    /// File holding the internal plane's shared secret, presented to the
    /// event bus, the hook executor and the agent service, and required of
    /// TCP callers. Overrides `internal_token_file`.
    #[arg(long, value_name = "FILE")]
    internal_token_file: Option<std::path::PathBuf>,
    /// Start QEMU through the launcher (qvirt-vmm) on this unix socket.
    /// Overrides `launcher_socket`.
    #[arg(long, value_name = "PATH")]
    launcher_socket: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = load(&args);
    // SIGHUP reads the file again, under the same flags.
    let reload: qvirt_supervisor::Reloader = Arc::new(move || {
        let config = load(&args)?;
        config.validate()?;
        Ok(config)
    });
    qvirt_common::service::main("qvirt-supervisor", config, move |c, l, s| {
        qvirt_supervisor::run_reloadable(c, l, s, Some(reload))
    })
}

/// The config file (or defaults) with the flags applied.
fn load(args: &Args) -> Result<qvirt_supervisor::Config, ConfigError> {
    let args = args.clone();
    args.common.load().map(|mut c: qvirt_supervisor::Config| {
        override_with(&mut c.state_dir, args.state_dir);
        override_with(&mut c.run_dir, args.run_dir);
        override_with(&mut c.qemu_binary, args.qemu_binary);
        override_with(&mut c.qemu_user, args.qemu_user);
        override_with(&mut c.qemu_group, args.qemu_group);
        override_with(&mut c.qemu_sandbox, args.qemu_sandbox);
        override_with(
            &mut c.image_roots,
            Some(args.image_roots).filter(|r| !r.is_empty()),
        );
        override_with(
            &mut c.serial_log_roots,
            Some(args.serial_log_roots).filter(|r| !r.is_empty()),
        );
        override_with(&mut c.node_name, args.node_name);
        override_with(&mut c.default_accel, args.default_accel);
        override_with(&mut c.auto_uses_kvm, args.auto_uses_kvm);
        override_with(&mut c.start_timeout_secs, args.start_timeout_secs);
        override_with(&mut c.command_timeout_secs, args.command_timeout_secs);
        override_with(&mut c.destroy_grace_secs, args.destroy_grace_secs);
        override_with(&mut c.save_timeout_secs, args.save_timeout_secs);
        override_with(&mut c.eventbus, args.eventbus.map(Some));
        override_with(&mut c.hookexec, args.hookexec.map(Some));
        override_with(&mut c.hook_call_timeout_secs, args.hook_call_timeout_secs);
        override_with(&mut c.hook_stdin_format, args.hook_stdin_format);
        override_with(&mut c.agentd, args.agentd.map(Some));
        override_with(&mut c.max_memory_mib, args.max_memory_mib.map(Some));
        override_with(&mut c.max_vcpus, args.max_vcpus.map(Some));
        override_with(
            &mut c.internal_token_file,
            args.internal_token_file.map(Some),
        );
        override_with(&mut c.launcher_socket, args.launcher_socket.map(Some));
        c
    })
}
