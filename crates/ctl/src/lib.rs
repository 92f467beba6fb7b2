//! qvirtctl: a virsh-like client of the qvirt gateway. It owns the command
//! line and the way results are printed; every operation is one gRPC call to
//! the gateway (never to a backend directly).
//!
//! Entry point: [`run`] with a parsed [`Cli`].

use std::time::Duration;

use clap::{Parser, Subcommand};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// How long connecting to the gateway may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// qvirtctl: manage qvirt domains through the qvirt gateway.
#[derive(Debug, Parser)]
#[command(name = "qvirtctl", version, about)]
pub struct Cli {
    /// The gateway to talk to.
    #[arg(
        short = 'c',
        long,
        env = "QVIRT_CONNECT",
        default_value = "http://127.0.0.1:50051",
        value_name = "URL"
    )]
    pub connect: String,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The qvirtctl commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check that the gateway (or one of its services) is serving.
    Health {
        /// A service name, e.g. qvirt.v1.Supervisor; empty = the gateway.
        #[arg(default_value = "")]
        service: String,
    },
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The `--connect` URL is not usable.
    #[error("invalid --connect URL {url:?}")]
    BadUrl {
        /// The URL given.
        url: String,
        /// Why it was rejected.
        #[source]
        source: tonic::transport::Error,
    },
    /// The gateway could not be reached.
    #[error("cannot connect to {url}")]
    Connect {
        /// The URL given.
        url: String,
        /// Why connecting failed.
        #[source]
        source: tonic::transport::Error,
    },
    /// The gateway answered with an error status.
    #[error("{}: {}", .0.code(), .0.message())]
    Rpc(#[from] tonic::Status),
    /// The service is known but not serving.
    #[error("{service}: {status}")]
    NotServing {
        /// The service asked about ("" = the gateway).
        service: String,
        /// Its reported status.
        status: String,
    },
}

/// Runs one qvirtctl command, printing its result on stdout.
pub async fn run(cli: Cli) -> Result<(), CtlError> {
    let channel = connect(&cli.connect).await?;
    match cli.command {
        Command::Health { service } => health(channel, service).await,
    }
}

async fn connect(url: &str) -> Result<Channel, CtlError> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|source| CtlError::BadUrl {
            url: url.to_owned(),
            source,
        })?
        .connect_timeout(CONNECT_TIMEOUT);
    endpoint
        .connect()
        .await
        .map_err(|source| CtlError::Connect {
            url: url.to_owned(),
            source,
        })
}

async fn health(channel: Channel, service: String) -> Result<(), CtlError> {
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.clone(),
        })
        .await?
        .into_inner();
    let status = reply.status().as_str_name().to_owned();
    if status != "SERVING" {
        return Err(CtlError::NotServing { service, status });
    }
    println!("{status}");
    Ok(())
}
