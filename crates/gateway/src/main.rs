//! `qvirt-gateway`: flags and config only; the service lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use qvirt_common::cli::{CommonArgs, override_with};
use qvirt_gateway::config::{Config, TokenEntry, check_tokens};
use qvirt_gateway::roles::Role;

/// qvirt gateway: the one public endpoint (bearer tokens, TLS and mTLS,
/// read-write and read-only unix sockets, per-method roles, audit).
#[derive(Debug, Parser)]
#[command(name = "qvirt-gateway", version, about)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    common: CommonArgs,
    /// The supervisor's endpoint. Overrides `supervisor`.
    #[arg(long, value_name = "URL")]
    supervisor: Option<String>,
    /// The event bus's endpoint. Overrides `eventbus`.
    #[arg(long, value_name = "URL")]
    eventbus: Option<String>,
    /// The agent service's endpoint. Overrides `agentd`.
    #[arg(long, value_name = "URL")]
    agentd: Option<String>,
    /// The internal plane's secret, presented to backends. Overrides
    /// `internal_token_file`.
    #[arg(long, value_name = "FILE")]
    internal_token_file: Option<PathBuf>,
    /// Append audit lines here. Overrides `audit_file`.
    #[arg(long, value_name = "FILE")]
    audit_file: Option<PathBuf>,
    /// A NATS server of the fleet registry (repeat for several): fleet
    /// mode. Overrides `fleet.urls`.
    #[arg(long = "fleet-url", value_name = "URL")]
    fleet_urls: Vec<String>,
    /// The file holding the fleet NATS servers' client token. Overrides
    /// `fleet.token_file`.
    #[arg(long, value_name = "FILE")]
    fleet_token_file: Option<PathBuf>,
    /// The CA of the fleet NATS servers' certificates (TLS). Overrides
    /// `fleet.ca_file`.
    #[arg(long, value_name = "FILE")]
    fleet_ca_file: Option<PathBuf>,
    /// Allow a plaintext TCP `listen` beyond loopback (development only).
    /// Sets `plaintext`.
    #[arg(long)]
    plaintext: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Bearer tokens.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Print a fresh random token (once) and the config entry holding its
    /// hash.
    New {
        /// The principal the token authenticates.
        #[arg(long)]
        name: String,
        /// read-only or read-write.
        #[arg(long, value_parser = |s: &str| s.parse::<Role>())]
        role: Role,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::Token(TokenCommand::New { name, role })) = args.command {
        return token_new(name, role);
    }
    let path = args.common.config.clone();
    let config = args.common.load::<Config>().map(|mut c| {
        override_with(&mut c.supervisor, args.supervisor);
        override_with(&mut c.eventbus, args.eventbus);
        override_with(&mut c.agentd, args.agentd);
        override_with(
            &mut c.internal_token_file,
            args.internal_token_file.map(Some),
        );
        override_with(&mut c.audit_file, args.audit_file.map(Some));
        c.plaintext |= args.plaintext;
        if !args.fleet_urls.is_empty() {
            c.fleet.get_or_insert_with(Default::default).urls = args.fleet_urls;
        }
        // Without URLs from either place, the check says fleet.urls.
        if let Some(file) = args.fleet_token_file {
            c.fleet.get_or_insert_with(Default::default).token_file = Some(file);
        }
        if let Some(file) = args.fleet_ca_file {
            c.fleet.get_or_insert_with(Default::default).ca_file = Some(file);
        }
        c
    });
    let options = qvirt_common::service::MainOptions {
        reloads_on_hangup: true,
        // Callers are served on the connection threads (`worker_threads`
        // of them); the main runtime keeps the gateway's own tasks.
        serves_on_own_threads: true,
    };
    qvirt_common::service::main_with("qvirt-gateway", config, options, move |c, l, s| {
        qvirt_gateway::run(c, l, s, path)
    })
}

fn token_new(name: String, role: Role) -> ExitCode {
    let (token, sha256) = match qvirt_gateway::auth::new_token() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("qvirt-gateway: cannot read random bytes: {e}");
            return ExitCode::from(qvirt_common::service::EXIT_RUNTIME);
        }
    };
    let entry = TokenEntry { name, role, sha256 };
    if let Err(e) = check_tokens(std::slice::from_ref(&entry)) {
        eprintln!("qvirt-gateway: {}", qvirt_common::error_chain(&e));
        return ExitCode::from(qvirt_common::service::EXIT_USAGE);
    }
    println!("{token}");
    eprintln!(
        "The line above is the token for {:?} ({}); it is shown only this once.\n\
         Add this entry under `tokens:` in the gateway's config, then send it SIGHUP:",
        entry.name, entry.role
    );
    println!(
        "  - name: {}\n    role: {}\n    sha256: {}",
        entry.name, entry.role, entry.sha256
    );
    ExitCode::SUCCESS
}
