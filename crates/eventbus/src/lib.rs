//! qvirt-eventbus: fans QEMU monitor events and typed domain lifecycle
//! events out to subscribers (`qvirt.v1.EventBus`, public), with libvirt's
//! event-name filters, bounded per-subscriber queues and resuming after an
//! event's cursor. It does not produce events: supervisors publish them
//! through `qvirt.v1.EventIngest` (internal), served beside it.
//!
//! Entry point: [`run`], called by `main.rs` with a bound listener and the
//! shutdown token.
//!
//! - [`hub`]: the in-memory hub (sequence numbers, replay ring, bounded
//!   per-subscriber queues, caps); knows nothing of gRPC.
//! - [`filter`]: event-name filters as libvirt's (literal, regex, nocase)
//!   and domain filters.
//! - [`cursor`]: the opaque `1.EPOCH.SEQ` cursors and their parsing.
//! - [`service`]: the `EventBus` service over the hub: requests to
//!   filters and start points, hub items to stream messages.
//! - [`server`]: the `EventBus` server, which encodes each event once for
//!   every subscriber.
//! - [`ingest`]: the internal `EventIngest` service supervisors publish
//!   through.
//! - [`inflight`]: a byte bound on what a stream has handed to HTTP/2.
//! - [`coalesce`]: gathers the writes of streams woken together into one.
//! - [`metrics`]: the optional Prometheus text endpoint.
//! - [`nats`]: the fleet: forwarding to NATS JetStream (`nats:`), and
//!   subscriptions served from it (`fleet:`).
//! - [`config`]: the config file; [`status`]: errors to gRPC statuses.

pub mod coalesce;
pub mod config;
pub mod cursor;
pub mod filter;
pub mod hub;
pub mod inflight;
pub mod ingest;
pub mod metrics;
pub mod nats;
pub mod server;
pub mod service;
pub mod status;

use qvirt_common::cli::ServiceConfig as _;
use qvirt_common::internal_auth::{InternalAuth, InternalToken};
use qvirt_common::serve::{self, Listener, ServeError, Services};
use qvirt_proto::v1::event_ingest_server::EventIngestServer;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use ingest::EventIngestService;
pub use service::{BusEvent, EventBusService};

/// Why the event bus stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The hub settings are unusable.
    #[error("invalid event bus settings")]
    Hub(#[from] hub::HubConfigError),
    /// The internal token, the NATS token or the NATS CA file is unusable
    /// (it was fine when the config was checked).
    #[error(transparent)]
    Secret(qvirt_common::config::ConfigError),
    /// This run's epoch cannot be carried in a cursor (a bug).
    #[error("epoch {0:?} cannot be carried in a cursor")]
    Epoch(String),
    /// The NATS forwarder could not start (its outbox).
    #[error("cannot forward events to NATS")]
    Forward(#[from] nats::forward::ForwardError),
    /// Serving failed.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// The metrics address could not be bound.
    #[error("cannot listen on metrics_listen {addr}")]
    Metrics {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// Why binding failed.
        #[source]
        source: std::io::Error,
    },
}

/// Serves `qvirt.v1.EventBus`, `qvirt.v1.EventIngest`, health and
/// reflection on `listener` until `shutdown` fires; then every
/// subscription ends with UNAVAILABLE.
pub async fn run(
    config: Config,
    listener: Listener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let token = InternalToken::load_optional(config.internal_token_file.as_ref())
        .map_err(RunError::Secret)?;
    let auth = InternalAuth::new(token, &config.internal_uids);
    auth.log_policy("EventBus/*, EventIngest/Publish, x-qvirt-principal");
    let hub = hub::Hub::with_size_and_key_fn(config.hub(), BusEvent::weight, BusEvent::key)?;
    let epoch = new_epoch();
    if !cursor::valid_epoch(&epoch) {
        return Err(RunError::Epoch(epoch));
    }
    // The receive windows stated, not inherited: what a connection may make
    // the bus hold is part of its documented memory bound
    // (`config::CONNECTION_BYTES`).
    let options = qvirt_common::serve::ServeOptions {
        initial_connection_window_size: Some(config::CONNECTION_WINDOW_BYTES),
        initial_stream_window_size: Some(config::STREAM_WINDOW_BYTES),
        ..config.serve_options()
    };
    // The forwarder outlives the server by its drain: it gets its own
    // token, cancelled once serving has stopped.
    let forward_stop = CancellationToken::new();
    let forwarder = match &config.nats {
        Some(nats) => Some(nats::forward::Forwarder::start(
            nats,
            &hub,
            &epoch,
            forward_stop.clone(),
        )?),
        None => None,
    };
    tracing::info!(%epoch, ring = config.ring_capacity, queue = config.queue_capacity, "event bus ready");
    if let Some(addr) = config.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| RunError::Metrics { addr, source })?;
        let stats = forwarder.as_ref().map(|f| f.stats.clone());
        tokio::spawn(metrics::serve(
            listener,
            hub.clone(),
            stats,
            shutdown.clone(),
        ));
    }
    tokio::spawn(trim_memory(hub.clone(), shutdown.clone()));
    // On shutdown every subscription stream ends at once (UNAVAILABLE), so
    // the server need not wait out its grace period for them.
    tokio::spawn({
        let (hub, shutdown) = (hub.clone(), shutdown.clone());
        async move {
            shutdown.cancelled().await;
            hub.close();
        }
    });
    let ingest = EventIngestService::new(hub.clone(), &epoch, shutdown.clone())
        .with_internal_auth(auth.clone())
        .with_max_event_bytes(config.max_event_bytes);
    let guard = auth.clone();
    let mut service =
        EventBusService::new(hub.clone(), epoch, config.policy()).with_internal_auth(auth);
    let mut services = Services::new().options(options);
    if let Some(fleet) = &config.fleet {
        // A gateway's bus: subscriptions from the fleet's stream, nothing
        // published here (EventIngest is not served).
        // Serving starts at once; subscriptions are UNAVAILABLE until the
        // stream is found. Health says NOT_SERVING for EventBus until
        // then, and again whenever the broker connection is down.
        let cell = std::sync::Arc::new(std::sync::OnceLock::new());
        let (ready, health) = tokio::sync::watch::channel(false);
        let access = fleet.broker().access("fleet").map_err(RunError::Secret)?;
        tokio::spawn({
            let (cell, fleet, shutdown) = (cell.clone(), fleet.clone(), shutdown.clone());
            async move {
                if let Some(fleet) = nats::fleet::Fleet::connect(&fleet, &access, &shutdown).await {
                    let client = fleet.client();
                    // The registry's view: its host liveness changes
                    // become host events in the stream.
                    let view = qvirt_registry::View::start(client.clone(), shutdown.clone());
                    fleet.publish_host_events(&view, shutdown.clone());
                    let _ = cell.set(fleet);
                    nats::follow_connection(&client, &ready, &shutdown).await;
                }
            }
        });
        service = service.with_fleet(cell);
        services = services
            .with(guard.only(server::BusServer::new(service)))
            .health_follows(
                <server::BusServer as tonic::server::NamedService>::NAME,
                health,
            );
    } else {
        services = services
            .with(guard.only(server::BusServer::new(service)))
            .with(EventIngestServer::new(ingest));
    }
    let result =
        serve::serve_wrapped(listener, services, shutdown, coalesce::GatherWrites::here()).await;
    hub.close();
    forward_stop.cancel();
    if let Some(f) = forwarder {
        // The forwarder writes what it holds to the outbox and gets what
        // it can acknowledged within its own grace.
        if tokio::time::timeout(std::time::Duration::from_secs(5), f.finished())
            .await
            .is_err()
        {
            tracing::warn!("nats forwarder did not stop in time");
        }
    }
    Ok(result?)
}

/// A fresh name for this run's sequence space: sequence numbers restart at 1
/// whenever the bus restarts (the ring is not persisted).
fn new_epoch() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:x}-{:x}", nanos, std::process::id())
}

/// How often the bus checks whether subscriptions went away.
const TRIM_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// Gives memory back to the system after subscriptions close. glibc keeps
/// freed heap in its arenas, so without this a burst of 10,000
/// subscriptions would leave the bus that much bigger for good. Runs
/// `malloc_trim` only when the subscriber count has fallen since the last
/// check, so an idle or growing bus pays nothing.
async fn trim_memory(hub: hub::Hub<BusEvent>, shutdown: CancellationToken) {
    let count = |h: &hub::Hub<BusEvent>| {
        let s = h.stats();
        s.subscribers_monitor + s.subscribers_domain
    };
    let mut last = count(&hub);
    loop {
        tokio::select! {
            () = tokio::time::sleep(TRIM_INTERVAL) => {}
            () = shutdown.cancelled() => return,
        }
        let now = count(&hub);
        if now < last {
            // It walks the whole heap: not on an async worker.
            let _ = tokio::task::spawn_blocking(release_free_memory).await;
        }
        last = now;
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_free_memory() {
    // SAFETY: malloc_trim only walks glibc's own heap structures.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_memory() {}
