//! The bus's counters as a Prometheus text endpoint: a deliberately tiny
//! HTTP/1.1 responder (`GET /metrics`, one request per connection), off
//! unless `metrics_listen` is set.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::BusEvent;
use crate::hub::{Hub, HubStats};

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

/// Serves `/metrics` for `hub` on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, hub: Hub<BusEvent>, shutdown: CancellationToken) {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(listen = ?addr, "serving metrics");
    loop {
        let (conn, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let hub = hub.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(conn, &hub).await {
                tracing::debug!(error = %e, "metrics request failed");
            }
        });
    }
}

async fn answer(mut conn: TcpStream, hub: &Hub<BusEvent>) -> std::io::Result<()> {
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
        ("200 OK", render(&hub.stats()))
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
    use super::*;

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
