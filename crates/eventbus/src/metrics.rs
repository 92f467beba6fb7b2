//! The bus's counters as a Prometheus text endpoint: a deliberately tiny
//! HTTP/1.1 responder (`GET /metrics`, one request per connection), off
//! unless `metrics_listen` is set.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use qvirt_common::accept::AcceptBackoff;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use std::sync::atomic::Ordering;

use crate::BusEvent;
use crate::hub::{Hub, HubStats};
use crate::nats::forward::ForwardStats;

/// The most request bytes read before answering.
const MAX_REQUEST: usize = 8 * 1024;
/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Renders `stats` in the Prometheus text exposition format.
pub fn render(stats: &HubStats) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
        let _ = writeln!(out, "# HELP qvirt_eventbus_{name} {help}");
        let _ = writeln!(out, "# TYPE qvirt_eventbus_{name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "qvirt_eventbus_{name}{labels} {value}");
        }
    };
    metric(
        "events_published_total",
        "counter",
        "Events stored by the bus.",
        &[("", stats.published)],
    );
    metric(
        "events_delivered_total",
        "counter",
        "Events handed to subscribers (queued live or replayed).",
        &[("", stats.delivered)],
    );
    metric(
        "events_dropped_total",
        "counter",
        "Events a subscriber did not get, by reason.",
        &[
            ("{reason=\"queue_full\"}", stats.dropped_queue_full),
            ("{reason=\"cut_off\"}", stats.dropped_cut_off),
            ("{reason=\"replay_expired\"}", stats.dropped_ring_evicted),
        ],
    );
    metric(
        "subscribers",
        "gauge",
        "Live subscriptions, by kind.",
        &[
            ("{kind=\"monitor\"}", stats.subscribers_monitor as u64),
            ("{kind=\"domain\"}", stats.subscribers_domain as u64),
        ],
    );
    metric(
        "subscriptions_rejected_total",
        "counter",
        "Subscriptions refused by a cap.",
        &[("", stats.rejected_subscriptions)],
    );
    metric(
        "ring_events",
        "gauge",
        "Events held in the replay ring.",
        &[("", stats.ring_len as u64)],
    );
    metric(
        "ring_bytes",
        "gauge",
        "Approximate bytes held in the replay ring.",
        &[("", stats.ring_bytes as u64)],
    );
    metric(
        "last_sequence",
        "gauge",
        "The last sequence number given.",
        &[("", stats.last_seq)],
    );
    out
}

/// At most this many metrics connections are served at once (a scraper
/// needs one); past it a connection gets [`BUSY`] and is closed, so idle
/// connections cannot make the bus hold a task and a buffer each.
pub const MAX_CONNECTIONS: usize = 16;

/// The answer to a connection past [`MAX_CONNECTIONS`].
const BUSY: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// Renders the forwarder's counters (a bus with `nats:`).
pub fn render_forward(stats: &ForwardStats) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(out, "# HELP qvirt_eventbus_nats_{name} {help}");
        let _ = writeln!(out, "# TYPE qvirt_eventbus_nats_{name} {kind}");
        let _ = writeln!(out, "qvirt_eventbus_nats_{name} {value}");
    };
    let get = |v: &std::sync::atomic::AtomicU64| v.load(Ordering::Relaxed);
    metric(
        "acked_total",
        "counter",
        "Events JetStream acknowledged.",
        get(&stats.acked),
    );
    metric(
        "duplicates_total",
        "counter",
        "Of those, events JetStream had already stored (sent again).",
        get(&stats.duplicates),
    );
    metric(
        "lost_total",
        "counter",
        "Events dropped before reaching the outbox.",
        get(&stats.lost),
    );
    metric(
        "retries_total",
        "counter",
        "Publish failures that made the forwarder go back.",
        get(&stats.retries),
    );
    metric(
        "outbox_records",
        "gauge",
        "Events in the outbox not yet acknowledged.",
        get(&stats.pending),
    );
    metric(
        "outbox_bytes",
        "gauge",
        "Bytes the outbox takes on disk.",
        get(&stats.outbox_bytes),
    );
    metric(
        "stream_ready",
        "gauge",
        "1 once the stream was found or created.",
        u64::from(stats.stream_ready.load(Ordering::Relaxed)),
    );
    out
}

/// Serves `/metrics` for `hub` (and the forwarder's `forward` counters)
/// on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    hub: Hub<BusEvent>,
    forward: Option<Arc<ForwardStats>>,
    shutdown: CancellationToken,
) {
    serve_limited(listener, hub, forward, shutdown, MAX_CONNECTIONS).await;
}

async fn serve_limited(
    listener: TcpListener,
    hub: Hub<BusEvent>,
    forward: Option<Arc<ForwardStats>>,
    shutdown: CancellationToken,
    limit: usize,
) {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(listen = ?addr, "serving metrics");
    let permits = Arc::new(Semaphore::new(limit));
    let mut backoff = AcceptBackoff::new("metrics");
    loop {
        let (conn, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors, accept fails at once every
                    // time: the shared rule pauses rather than spins.
                    if let Some(pause) = backoff.failed(&e) {
                        tokio::select! {
                            () = tokio::time::sleep(pause) => {}
                            () = shutdown.cancelled() => return,
                        }
                    }
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            // Never waits: the answer fits in any socket buffer, and a
            // client that cannot take it just loses it.
            let _ = conn.try_write(BUSY);
            continue;
        };
        let hub = hub.clone();
        let forward = forward.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(conn, &hub, forward.as_deref()).await {
                tracing::debug!(error = %e, "metrics request failed");
            }
            drop(permit);
        });
    }
}

async fn answer(
    mut conn: TcpStream,
    hub: &Hub<BusEvent>,
    forward: Option<&ForwardStats>,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let read = async {
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_REQUEST {
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(REQUEST_TIMEOUT, read)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
    let (status, body) = if line.starts_with(b"GET /metrics ") {
        let mut body = render(&hub.stats());
        if let Some(f) = forward {
            body.push_str(&render_forward(f));
        }
        ("200 OK", body)
    } else {
        (
            "404 Not Found",
            "only GET /metrics is served here\n".to_owned(),
        )
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    conn.shutdown().await
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use crate::hub::HubConfig;

    use super::*;

    /// Connects, sends a GET /metrics and returns the whole answer; a
    /// refused connection may be reset before its 503 is read (it is
    /// closed with the request unread): then "reset".
    async fn get(addr: SocketAddr) -> String {
        let mut conn = TcpStream::connect(addr).await.expect("connect");
        let mut out = Vec::new();
        let exchange = async {
            conn.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await?;
            conn.read_to_end(&mut out).await
        };
        match tokio::time::timeout(Duration::from_secs(20), exchange)
            .await
            .expect("answer in time")
        {
            Ok(_) => String::from_utf8_lossy(&out).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => "reset".to_owned(),
            Err(e) => panic!("{e}"),
        }
    }

    #[tokio::test]
    async fn test_idle_connections_are_bounded() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let hub = Hub::new(HubConfig::default()).expect("hub");
        let shutdown = CancellationToken::new();
        tokio::spawn(serve_limited(listener, hub, None, shutdown.clone(), 2));
        assert!(get(addr).await.starts_with("HTTP/1.1 200 OK\r\n"));
        // Two connections that never send a request hold both slots.
        let mut idle = Vec::new();
        for _ in 0..2 {
            idle.push(TcpStream::connect(addr).await.expect("connect"));
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            // Until the server has accepted both idle ones, this is served.
            let answer = get(addr).await;
            if answer.starts_with("HTTP/1.1 503 ") || answer == "reset" {
                break;
            }
            assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
            assert!(Instant::now() < deadline, "never refused past the limit");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Their slots come back when they go.
        drop(idle);
        loop {
            let answer = get(addr).await;
            if answer.starts_with("HTTP/1.1 200 OK\r\n") {
                break;
            }
            assert!(Instant::now() < deadline, "slots never freed: {answer}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        shutdown.cancel();
    }

    #[test]
    fn test_render_names_every_counter() {
        let stats = HubStats {
            published: 7,
            dropped_queue_full: 2,
            subscribers_monitor: 3,
            ..Default::default()
        };
        let text = render(&stats);
        assert!(
            text.contains("qvirt_eventbus_events_published_total 7\n"),
            "{text}"
        );
        assert!(
            text.contains("qvirt_eventbus_events_dropped_total{reason=\"queue_full\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("qvirt_eventbus_subscribers{kind=\"monitor\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE qvirt_eventbus_subscribers gauge\n"),
            "{text}"
        );
    }
}
