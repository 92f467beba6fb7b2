//! The fan-out subscribers' gRPC client: gRPC over the `h2` crate (the
//! HTTP/2 implementation under hyper and tonic), reading each DATA chunk's
//! length-prefixed messages in one loop and decoding only what the bench
//! measures.
//!
//! The bench's 1,000 clients share the machine's 2 cores with the bus, so
//! what they spend per delivery is taken from the bus. Decoding every field
//! into owned strings, as the generated client does, cost them twice the
//! bus's CPU (1.3 cores at 2.1M deliveries/s); tonic's per-message stream
//! with a tonic codec that read two fields with prost's generic field
//! reader still cost ~0.24 µs per delivery at 10k events/s, about half of
//! it in that reader (perf). This client sends the same request and reads
//! the same bytes; at 10k events/s it costs ~0.16 µs per delivery.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;
use qvirt_proto::v1::SubscribeMonitorEventsRequest;

/// What a fan-out subscriber needs of one stream message.
pub enum Delivery {
    /// SubscriptionEstablished.
    Established,
    /// Anything else of no interest.
    Other,
    /// An event whose details carry its send time in ns since the epoch.
    Sent(u64),
    /// The END marker.
    End,
    /// EventsLost with this count.
    Lost(u64),
}

/// A varint at `buf[*at..]`, moving `at` past it.
fn varint(buf: &[u8], at: &mut usize) -> u64 {
    let (mut value, mut shift) = (0u64, 0);
    loop {
        let b = buf[*at];
        *at += 1;
        value |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return value;
        }
        shift += 7;
    }
}

/// Reads the fields of one (sub)message: `f(field number, value)` for
/// varint and length-delimited fields, others skipped.
fn fields(buf: &[u8], mut f: impl FnMut(u64, Field<'_>)) {
    let mut at = 0;
    while at < buf.len() {
        let key = varint(buf, &mut at);
        match key & 7 {
            0 => f(key >> 3, Field::Varint(varint(buf, &mut at))),
            2 => {
                let len = varint(buf, &mut at) as usize;
                f(key >> 3, Field::Bytes(&buf[at..at + len]));
                at += len;
            }
            1 => at += 8,
            5 => at += 4,
            other => panic!("unexpected wire type {other}"),
        }
    }
}

enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

/// A decimal number in ASCII.
fn decimal(digits: &[u8]) -> u64 {
    digits.iter().fold(0, |n, &d| {
        assert!(d.is_ascii_digit(), "details are not a send time");
        n * 10 + u64::from(d - b'0')
    })
}

/// One `SubscribeMonitorEventsResponse`, reading only
/// `event.details_json` and `lost.count` (by their field numbers in
/// eventbus.proto).
fn decode(msg: &[u8]) -> Delivery {
    let mut out = Delivery::Other;
    fields(msg, |tag, v| match (tag, v) {
        // SubscribeMonitorEventsResponse.established = 1
        (1, Field::Bytes(_)) => out = Delivery::Established,
        // .event = 2: MonitorEvent.details_json = 8
        (2, Field::Bytes(event)) => fields(event, |tag, v| {
            if let (8, Field::Bytes(details)) = (tag, v) {
                out = if details == b"\"END\"" {
                    Delivery::End
                } else {
                    Delivery::Sent(decimal(details))
                };
            }
        }),
        // .lost = 3: EventsLost.count = 2
        (3, Field::Bytes(lost)) => fields(lost, |tag, v| {
            if let (2, Field::Varint(n)) = (tag, v) {
                out = Delivery::Lost(n);
            }
        }),
        _ => {}
    });
    out
}

/// An HTTP/2 connection to the bus for many subscriptions, with hyper's
/// client defaults for the flow-control windows (as tonic's `Channel`).
pub async fn connect(addr: &str) -> h2::client::SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(2 << 20)
        .initial_connection_window_size(5 << 20)
        .max_frame_size(16 << 10)
        .handshake(tcp)
        .await
        .unwrap();
    tokio::spawn(async move {
        // Ends when the bench drops the connection's streams.
        let _ = connection.await;
    });
    client
}

/// A subscription's response body, past its first message.
pub struct Subscription {
    body: h2::RecvStream,
    buf: BytesMut,
}

/// Subscribes to monitor events named `filter` on `client`.
pub async fn subscribe(client: &h2::client::SendRequest<Bytes>, filter: &str) -> Subscription {
    let request = http::Request::post("http://bus/qvirt.v1.EventBus/SubscribeMonitorEvents")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        // The bus serves internal callers only.
        .header(
            qvirt_common::internal_auth::TOKEN_METADATA,
            qvirt_integration_tests::internal_token(),
        )
        .body(())
        .unwrap();
    let mut client = client.clone().ready().await.unwrap();
    let (response, mut send) = client.send_request(request, false).unwrap();
    let msg = SubscribeMonitorEventsRequest {
        event: filter.into(),
        ..Default::default()
    }
    .encode_to_vec();
    let mut framed = BytesMut::with_capacity(5 + msg.len());
    framed.put_u8(0);
    framed.put_u32(u32::try_from(msg.len()).unwrap());
    framed.put_slice(&msg);
    send.send_data(framed.freeze(), true).unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), 200);
    // A refusal (a cap, a bad filter) is a trailers-only response: the
    // status comes with the headers.
    if let Some(status) = response.headers().get("grpc-status") {
        panic!(
            "subscription refused: grpc-status {status:?}, {:?}",
            response.headers().get("grpc-message")
        );
    }
    let mut sub = Subscription {
        body: response.into_body(),
        buf: BytesMut::new(),
    };
    let mut first = None;
    while first.is_none() {
        let open = sub
            .next_chunk(|d| {
                first.get_or_insert(matches!(d, Delivery::Established));
            })
            .await;
        if !open {
            panic!("subscription refused: {}", sub.end_status().await);
        }
    }
    assert_eq!(first, Some(true), "SubscriptionEstablished first");
    sub
}

impl Subscription {
    /// How an ended stream ended: its gRPC status and message, from the
    /// trailers (or the transport's error).
    pub async fn end_status(&mut self) -> String {
        match self.body.trailers().await {
            Ok(Some(t)) => format!(
                "grpc-status {:?}, {:?}",
                t.get("grpc-status"),
                t.get("grpc-message")
            ),
            Ok(None) => "no trailers".to_owned(),
            Err(e) => format!("transport error: {e}"),
        }
    }

    /// Waits for the next DATA chunk and hands each message it completes
    /// to `each`; false when the stream ended or failed (then see
    /// [`Subscription::end_status`]).
    pub async fn next_chunk(&mut self, mut each: impl FnMut(Delivery)) -> bool {
        let Some(Ok(chunk)) = self.body.data().await else {
            return false;
        };
        self.body
            .flow_control()
            .release_capacity(chunk.len())
            .unwrap();
        if self.buf.is_empty() {
            // Parsed where it lies; only a message cut at the chunk's end
            // is kept for the next one.
            let n = messages(&chunk, &mut each);
            self.buf.extend_from_slice(&chunk[n..]);
        } else {
            self.buf.extend_from_slice(&chunk);
            let n = messages(&self.buf, &mut each);
            self.buf.advance(n);
        }
        true
    }
}

/// Hands each whole length-prefixed message at the start of `data` to
/// `each`; returns how many bytes they took.
fn messages(data: &[u8], each: &mut impl FnMut(Delivery)) -> usize {
    let mut at = 0;
    while let Some(header) = data.get(at..at + 5) {
        assert_eq!(header[0], 0, "compressed message (never asked for)");
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        let Some(msg) = data.get(at + 5..at + 5 + len) else {
            break;
        };
        each(decode(msg));
        at += 5 + len;
    }
    at
}
