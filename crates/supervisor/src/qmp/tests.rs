//! Fault tests against a fake QEMU on a socket pair: what real QEMU cannot be
//! made to do on demand.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use super::*;

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "fake"}, "capabilities": ["oob"]}}"#;

/// Every wait in these tests is bounded by this.
const WAIT: Duration = Duration::from_secs(10);

/// The QEMU side of a socket pair.
struct FakeQemu {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl FakeQemu {
    async fn send(&mut self, line: &str) {
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("fake write");
    }

    /// Read one request; panic on EOF.
    async fn request(&mut self) -> Value {
        let mut line = String::new();
        let n = tokio::time::timeout(WAIT, self.reader.read_line(&mut line))
            .await
            .expect("request in time")
            .expect("fake read");
        assert!(n > 0, "client closed");
        serde_json::from_str(&line).expect("request is JSON")
    }

    /// Answer `qmp_capabilities`.
    async fn negotiate(&mut self) {
        let request = self.request().await;
        assert_eq!(request["execute"], "qmp_capabilities");
        self.reply(&request, json!({})).await;
    }

    async fn reply(&mut self, request: &Value, ret: Value) {
        let line = json!({"return": ret, "id": request["id"]}).to_string();
        self.send(&line).await;
    }
}

fn pair() -> (UnixStream, FakeQemu) {
    let (client, server) = UnixStream::pair().expect("socket pair");
    let (reader, writer) = server.into_split();
    (
        client,
        FakeQemu {
            reader: BufReader::new(reader),
            writer,
        },
    )
}

/// A negotiated client and its fake QEMU.
async fn connected() -> (QmpConnection, FakeQemu) {
    let (client, mut fake) = pair();
    let fake_side = async {
        fake.send(GREETING).await;
        fake.negotiate().await;
    };
    let (conn, ()) = tokio::join!(QmpClient::handshake(client, WAIT), fake_side);
    (conn.expect("handshake"), fake)
}

fn event_line(name: &str, data: &str) -> String {
    format!(
        r#"{{"timestamp": {{"seconds": 1700000000, "microseconds": 42}}, "event": "{name}", "data": {data}}}"#
    )
}

#[tokio::test]
async fn test_handshake_reads_greeting_and_negotiates() {
    let (conn, _fake) = connected().await;
    assert_eq!(conn.greeting.version.major, 7);
    assert_eq!(conn.greeting.package, "fake");
    assert!(!conn.client.is_closed());
}

#[tokio::test]
async fn test_bad_greeting_is_rejected() {
    let (client, mut fake) = pair();
    fake.send(r#"{"hello": "world"}"#).await;
    match QmpClient::handshake(client, WAIT).await {
        Err(QmpError::BadGreeting { line, .. }) => assert!(line.contains("hello"), "{line}"),
        other => panic!("expected BadGreeting, got {other:?}"),
    }
}

#[tokio::test]
async fn test_greeting_timeout_when_peer_is_silent() {
    let (client, _fake) = pair();
    // A negative wait: nothing will ever come, so a short timeout is the test.
    let after = Duration::from_millis(100);
    match QmpClient::handshake(client, after).await {
        Err(QmpError::GreetingTimeout { after: got }) => assert_eq!(got, after),
        other => panic!("expected GreetingTimeout, got {other:?}"),
    }
}

#[tokio::test]
async fn test_eof_before_greeting_is_monitor_closed() {
    let (client, fake) = pair();
    drop(fake);
    assert!(matches!(
        QmpClient::handshake(client, WAIT).await,
        Err(QmpError::MonitorClosed)
    ));
}

#[tokio::test]
async fn test_eof_mid_greeting_is_monitor_closed() {
    let (client, mut fake) = pair();
    fake.writer
        .write_all(br#"{"QMP": {"vers"#)
        .await
        .expect("write");
    drop(fake);
    assert!(matches!(
        QmpClient::handshake(client, WAIT).await,
        Err(QmpError::MonitorClosed)
    ));
}

#[tokio::test]
async fn test_capabilities_error_is_reported() {
    let (client, mut fake) = pair();
    let fake_side = async {
        fake.send(GREETING).await;
        let request = fake.request().await;
        let line = json!({"error": {"class": "GenericError", "desc": "nope"}, "id": request["id"]});
        fake.send(&line.to_string()).await;
    };
    let (result, ()) = tokio::join!(QmpClient::handshake(client, WAIT), fake_side);
    match result {
        Err(QmpError::Capabilities { source }) => {
            assert!(
                matches!(*source, QmpError::Command { ref class, .. } if class == "GenericError")
            );
        }
        other => panic!("expected Capabilities error, got {other:?}"),
    }
}

#[tokio::test]
async fn test_eof_mid_reply_fails_waiter_and_ends_events() {
    let (mut conn, mut fake) = connected().await;
    let fake_side = async move {
        let _request = fake.request().await;
        fake.writer
            .write_all(br#"{"return": {"sta"#)
            .await
            .expect("write");
        drop(fake);
    };
    let (result, ()) = tokio::join!(conn.client.execute("query-status", None), fake_side);
    assert!(matches!(result, Err(QmpError::MonitorClosed)), "{result:?}");
    let end = tokio::time::timeout(WAIT, conn.events.recv())
        .await
        .expect("events end");
    assert!(end.is_none());
    tokio::time::timeout(WAIT, conn.client.closed())
        .await
        .expect("closed");
    assert!(matches!(
        conn.client.execute("query-status", None).await,
        Err(QmpError::MonitorClosed)
    ));
}

#[tokio::test]
async fn test_connection_reset_fails_every_waiter() {
    let (conn, mut fake) = connected().await;
    let fake_side = async move {
        let _first = fake.request().await;
        let _second = fake.request().await;
        drop(fake);
    };
    let (a, b, ()) = tokio::join!(
        conn.client.execute("query-status", None),
        conn.client.execute("query-version", None),
        fake_side
    );
    assert!(matches!(a, Err(QmpError::MonitorClosed)), "{a:?}");
    assert!(matches!(b, Err(QmpError::MonitorClosed)), "{b:?}");
}

#[tokio::test]
async fn test_event_before_reply_is_delivered_and_reply_matched() {
    let (mut conn, mut fake) = connected().await;
    let fake_side = async move {
        let request = fake.request().await;
        fake.send(&event_line("RESUME", "{}")).await;
        fake.send(&event_line("BIG", r#"{"n": 18446744073709551615}"#))
            .await;
        fake.reply(&request, json!({})).await;
        fake
    };
    let (result, _fake) = tokio::join!(conn.client.execute("cont", None), fake_side);
    assert_eq!(result.expect("cont"), json!({}));
    let first = conn.events.recv().await.expect("event");
    assert_eq!(first.name, "RESUME");
    assert_eq!((first.seconds, first.microseconds), (1_700_000_000, 42));
    let second = conn.events.recv().await.expect("event");
    assert_eq!(second.name, "BIG");
    assert_eq!(second.data, r#"{"n": 18446744073709551615}"#);
}

#[tokio::test]
async fn test_unknown_id_reply_is_dropped() {
    let (conn, mut fake) = connected().await;
    let fake_side = async move {
        let request = fake.request().await;
        fake.send(r#"{"return": {"wrong": true}, "id": 999999}"#)
            .await;
        fake.send(r#"{"return": {"wrong": true}}"#).await;
        fake.send("this is not json").await;
        fake.reply(&request, json!({"right": true})).await;
        fake
    };
    let (result, _fake) = tokio::join!(conn.client.execute("query-status", None), fake_side);
    assert_eq!(result.expect("reply"), json!({"right": true}));
}

#[tokio::test]
async fn test_replies_out_of_order_reach_their_commands() {
    let (conn, mut fake) = connected().await;
    let fake_side = async move {
        let first = fake.request().await;
        let second = fake.request().await;
        fake.reply(&second, json!({"for": second["execute"]})).await;
        fake.reply(&first, json!({"for": first["execute"]})).await;
        fake
    };
    let (a, b, _fake) = tokio::join!(
        conn.client.execute("query-status", None),
        conn.client.execute("query-version", None),
        fake_side
    );
    assert_eq!(a.expect("a"), json!({"for": "query-status"}));
    assert_eq!(b.expect("b"), json!({"for": "query-version"}));
}

#[tokio::test]
async fn test_raw_reply_keeps_big_integers() {
    let (conn, mut fake) = connected().await;
    let fake_side = async move {
        let request = fake.request().await;
        assert_eq!(request["execute"], "query-big");
        let line = format!(
            r#"{{"return": {{"max": 9223372036854775807, "u": 18446744073709551615}}, "id": {}}}"#,
            request["id"]
        );
        fake.send(&line).await;
        let request = fake.request().await;
        let line = format!(
            r#"{{"return": {{"max": 9223372036854775807}}, "id": {}}}"#,
            request["id"]
        );
        fake.send(&line).await;
        fake
    };
    let client = &conn.client;
    let both = async {
        let raw = client
            .execute_raw(raw(r#"{"execute": "query-big"}"#))
            .await
            .expect("raw");
        let typed = client.execute("query-big", None).await.expect("typed");
        (raw, typed)
    };
    let ((raw, typed), _fake) = tokio::join!(both, fake_side);
    assert!(raw.contains("9223372036854775807"), "{raw}");
    assert!(raw.contains("18446744073709551615"), "{raw}");
    assert!(!raw.contains("\"id\""), "{raw}");
    assert_eq!(typed["max"].as_i64(), Some(i64::MAX));
}

#[tokio::test]
async fn test_raw_error_reply_is_text_not_err() {
    let (conn, mut fake) = connected().await;
    let fake_side = async move {
        let request = fake.request().await;
        let line =
            json!({"error": {"class": "CommandNotFound", "desc": "no"}, "id": request["id"]});
        fake.send(&line.to_string()).await;
        fake
    };
    let (raw, _fake) = tokio::join!(
        conn.client.execute_raw(raw(r#"{"execute": "nope"}"#)),
        fake_side
    );
    let raw: Value = serde_json::from_str(&raw.expect("raw")).expect("json");
    assert_eq!(raw["error"]["class"], "CommandNotFound");
}

#[tokio::test]
async fn test_full_event_queue_drops_and_counts_but_replies_flow() {
    let (mut conn, mut fake) = connected().await;
    let extra = 5;
    let fake_side = async move {
        let request = fake.request().await;
        for i in 0..EVENT_QUEUE_CAPACITY + extra {
            fake.send(&event_line("TICK", &format!(r#"{{"i": {i}}}"#)))
                .await;
        }
        fake.reply(&request, json!({})).await;
        fake
    };
    let (result, _fake) = tokio::join!(conn.client.execute("query-status", None), fake_side);
    result.expect("reply not blocked by full event queue");
    assert_eq!(
        conn.client.events_lost(),
        u64::try_from(extra).expect("small")
    );
    let first = conn.events.recv().await.expect("event");
    assert_eq!(first.data, r#"{"i": 0}"#);
}

#[tokio::test]
async fn test_cancelled_command_does_not_disturb_the_next() {
    let (conn, mut fake) = connected().await;
    let abandoned =
        tokio::time::timeout(Duration::from_millis(50), conn.client.execute("slow", None)).await;
    assert!(abandoned.is_err(), "the fake never answered");
    let slow = fake.request().await;
    let fake_side = async move {
        let next = fake.request().await;
        fake.reply(&slow, json!({"late": true})).await;
        fake.reply(&next, json!({"next": true})).await;
        fake
    };
    let (result, _fake) = tokio::join!(conn.client.execute("next", None), fake_side);
    assert_eq!(result.expect("next"), json!({"next": true}));
}

#[tokio::test]
async fn test_close_fails_commands_and_peer_sees_eof() {
    let (conn, mut fake) = connected().await;
    conn.client.close();
    assert!(conn.client.is_closed());
    assert!(matches!(
        conn.client.execute("query-status", None).await,
        Err(QmpError::MonitorClosed)
    ));
    let mut line = String::new();
    let n = tokio::time::timeout(WAIT, fake.reader.read_line(&mut line))
        .await
        .expect("eof in time")
        .expect("read");
    assert_eq!(n, 0, "peer sees EOF after close");
}

/// A reply line of `len` bytes (newline included) to request `id`.
fn reply_of_len(id: &Value, len: usize) -> Vec<u8> {
    let head = r#"{"return": ""#;
    let tail = format!(r#"", "id": {id}}}"#);
    let fill = len - head.len() - tail.len() - 1;
    let mut line = Vec::with_capacity(len);
    line.extend_from_slice(head.as_bytes());
    line.resize(head.len() + fill, b'x');
    line.extend_from_slice(tail.as_bytes());
    line.push(b'\n');
    line
}

#[tokio::test]
async fn test_over_long_reply_fails_its_command_and_the_monitor_stays_usable() {
    let (mut conn, mut fake) = connected().await;
    let fake_side = async move {
        let big = fake.request().await;
        let line = reply_of_len(&big["id"], MAX_LINE_BYTES + 3 * 1024 * 1024);
        fake.writer.write_all(&line).await.expect("write");
        fake
    };
    let (result, mut fake) = tokio::join!(
        conn.client.execute_raw(raw(r#"{"execute": "big"}"#)),
        fake_side
    );
    match result {
        Err(QmpError::ReplyTooLarge { limit }) => assert_eq!(limit, MAX_LINE_BYTES),
        other => panic!("expected ReplyTooLarge, got {other:?}"),
    }
    assert!(!conn.client.is_closed());
    // The next event and command go through.
    let fake_side = async move {
        let request = fake.request().await;
        fake.send(&event_line("AFTER", "{}")).await;
        fake.reply(&request, json!({"status": "running"})).await;
        fake
    };
    let (result, _fake) = tokio::join!(conn.client.execute("query-status", None), fake_side);
    assert_eq!(result.expect("next command"), json!({"status": "running"}));
    let event = tokio::time::timeout(WAIT, conn.events.recv())
        .await
        .expect("event in time")
        .expect("event");
    assert_eq!(event.name, "AFTER");
}

#[tokio::test]
async fn test_largest_accepted_reply_is_delivered_whole() {
    let (conn, mut fake) = connected().await;
    let fake_side = async move {
        let request = fake.request().await;
        let line = reply_of_len(&request["id"], MAX_LINE_BYTES);
        fake.writer.write_all(&line).await.expect("write");
        fake
    };
    let (result, _fake) = tokio::join!(conn.client.execute("big", None), fake_side);
    let value = result.expect("a reply of exactly the limit is accepted");
    let len = value.as_str().expect("string").len();
    // All of the line but `{"return": "", "id": N}` and the newline.
    assert!(len > MAX_LINE_BYTES - 32, "{len}");
}

/// In issue order: the skipped reply belongs to the oldest command on the
/// wire, even one its caller gave up on; the next command gets its own.
#[tokio::test]
async fn test_over_long_reply_is_charged_to_the_oldest_command_on_the_wire() {
    let (conn, mut fake) = connected().await;
    let abandoned =
        tokio::time::timeout(Duration::from_millis(50), conn.client.execute("slow", None)).await;
    assert!(abandoned.is_err(), "the fake never answered");
    let slow = fake.request().await;
    let fake_side = async move {
        let first = fake.request().await;
        let second = fake.request().await;
        assert_eq!(
            (&first["execute"], &second["execute"]),
            (&json!("first"), &json!("second"))
        );
        for request in [&slow, &first] {
            let line = reply_of_len(&request["id"], MAX_LINE_BYTES + 1);
            fake.writer.write_all(&line).await.expect("write");
        }
        fake.reply(&second, json!({"second": true})).await;
        fake
    };
    let client = &conn.client;
    let commands = async {
        let first = client.execute("first", None);
        let second = async {
            // Issued after `first` is on the wire.
            tokio::task::yield_now().await;
            client.execute("second", None).await
        };
        tokio::join!(first, second)
    };
    let ((first, second), _fake) = tokio::join!(commands, fake_side);
    assert!(
        matches!(first, Err(QmpError::ReplyTooLarge { .. })),
        "{first:?}"
    );
    assert_eq!(second.expect("second"), json!({"second": true}));
}

#[tokio::test]
async fn test_over_long_greeting_is_a_bad_greeting() {
    let (client, mut fake) = pair();
    let writer = tokio::spawn(async move {
        let mut line = vec![b'{'; MAX_LINE_BYTES + 1];
        line.push(b'\n');
        // The client gives up on the greeting: a write error is fine.
        let _ = fake.writer.write_all(&line).await;
        fake
    });
    match QmpClient::handshake(client, WAIT).await {
        Err(QmpError::BadGreeting { reason, .. }) => {
            assert!(reason.contains("over the"), "{reason}");
        }
        other => panic!("expected BadGreeting, got {other:?}"),
    }
    drop(writer.await);
}

mod line_reader {
    //! `read_line` on its own, with a small limit: lines up to the limit
    //! come whole, longer ones are reported with their length and skipped,
    //! whatever the chunking of the input.

    use proptest::prelude::*;

    use super::super::{KEPT_LINE_CAPACITY, LineRead, read_line};

    /// Read `input` through a buffer of `capacity` bytes (so it arrives in
    /// chunks of that size) with `limit`, until EOF.
    fn read_all(input: &[u8], capacity: usize, limit: usize) -> Vec<(LineRead, Vec<u8>)> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let mut reader = tokio::io::BufReader::with_capacity(capacity, input);
            let mut buf = Vec::new();
            let mut out = Vec::new();
            loop {
                let read = read_line(&mut reader, &mut buf, limit).await.expect("read");
                assert!(buf.capacity() <= limit.max(KEPT_LINE_CAPACITY) * 2);
                let eof = read == LineRead::Eof;
                out.push((read, buf.clone()));
                if eof {
                    return out;
                }
            }
        })
    }

    #[test]
    fn test_read_line_table() {
        let limit = 8;
        type Want<'a> = &'a [(LineRead, &'a [u8])];
        let table: [(&[u8], Want<'_>); 7] = [
            (b"", &[(LineRead::Eof, b"")]),
            (
                b"abc\n",
                &[(LineRead::Line, b"abc\n"), (LineRead::Eof, b"")],
            ),
            // Exactly the limit, newline included.
            (
                b"1234567\nx\n",
                &[
                    (LineRead::Line, b"1234567\n"),
                    (LineRead::Line, b"x\n"),
                    (LineRead::Eof, b""),
                ],
            ),
            // One over: skipped, the next line is intact.
            (
                b"12345678\nok\n",
                &[
                    (LineRead::TooLong { bytes: 9 }, b""),
                    (LineRead::Line, b"ok\n"),
                    (LineRead::Eof, b""),
                ],
            ),
            (
                b"123456789012345678901234567890\n\n",
                &[
                    (LineRead::TooLong { bytes: 31 }, b""),
                    (LineRead::Line, b"\n"),
                    (LineRead::Eof, b""),
                ],
            ),
            // EOF inside an over-long line, or a short one.
            (b"1234567890", &[(LineRead::Eof, b"")]),
            (b"ab", &[(LineRead::Eof, b"ab")]),
        ];
        for capacity in [1, 3, 8, 64] {
            for (input, want) in &table {
                let got = read_all(input, capacity, limit);
                let want: Vec<(LineRead, Vec<u8>)> = want
                    .iter()
                    .map(|(read, bytes)| {
                        let read = match read {
                            LineRead::Line => LineRead::Line,
                            LineRead::TooLong { bytes } => LineRead::TooLong { bytes: *bytes },
                            LineRead::Eof => LineRead::Eof,
                        };
                        (read, bytes.to_vec())
                    })
                    .collect();
                assert_eq!(
                    got,
                    want,
                    "{:?} at capacity {capacity}",
                    String::from_utf8_lossy(input)
                );
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn prop_short_lines_whole_long_lines_skipped_with_their_length(
            lines in prop::collection::vec(prop::collection::vec(any::<u8>().prop_filter("no newline", |b| *b != b'\n'), 0..40), 0..12),
            capacity in 1usize..50,
            limit in 1usize..30,
        ) {
            let mut input = Vec::new();
            for line in &lines {
                input.extend_from_slice(line);
                input.push(b'\n');
            }
            let got = read_all(&input, capacity, limit);
            prop_assert_eq!(got.len(), lines.len() + 1);
            for (line, (read, buf)) in lines.iter().zip(&got) {
                let len = line.len() + 1;
                if len <= limit {
                    prop_assert_eq!(read, &LineRead::Line);
                    prop_assert_eq!(&buf[..line.len()], &line[..]);
                    prop_assert_eq!(buf.len(), len);
                } else {
                    prop_assert_eq!(read, &LineRead::TooLong { bytes: len as u64 });
                    prop_assert!(buf.is_empty());
                }
            }
            prop_assert_eq!(&got[lines.len()].0, &LineRead::Eof);
        }
    }
}

mod framing {
    //! Property: whatever the interleaving of events and (reordered)
    //! replies, every command gets its own reply and events arrive in order
    //! with their numbers' text intact.

    use proptest::prelude::*;

    use super::*;

    /// One scenario: how many commands, the order their replies go out, and
    /// where events (with a number each) are slipped in.
    #[derive(Debug, Clone)]
    struct Scenario {
        commands: usize,
        reply_order: Vec<usize>,
        events_before: Vec<Vec<String>>,
    }

    fn number_text() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<u64>().prop_map(|n| n.to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            "[1-9][0-9]{19,30}",
            "-?[1-9][0-9]{0,5}\\.[0-9]{1,25}",
        ]
    }

    fn scenario() -> impl Strategy<Value = Scenario> {
        (1usize..6).prop_flat_map(|commands| {
            (
                Just(commands),
                Just((0..commands).collect::<Vec<_>>()).prop_shuffle(),
                prop::collection::vec(prop::collection::vec(number_text(), 0..4), commands + 1),
            )
                .prop_map(|(commands, reply_order, events_before)| Scenario {
                    commands,
                    reply_order,
                    events_before,
                })
        })
    }

    async fn run(scenario: Scenario) -> Result<(), TestCaseError> {
        let (mut conn, mut fake) = connected().await;
        let expected_events: Vec<String> = scenario.events_before.concat();
        let fake_side = async move {
            let mut requests = Vec::new();
            for _ in 0..scenario.commands {
                requests.push(fake.request().await);
            }
            for (slot, index) in scenario.reply_order.iter().enumerate() {
                for number in &scenario.events_before[slot] {
                    fake.send(&event_line("NUM", &format!(r#"{{"n": {number}}}"#)))
                        .await;
                }
                let request = &requests[*index];
                fake.reply(request, json!({"echo": request["execute"]}))
                    .await;
            }
            for number in &scenario.events_before[scenario.commands] {
                fake.send(&event_line("NUM", &format!(r#"{{"n": {number}}}"#)))
                    .await;
            }
            fake
        };
        let client = &conn.client;
        let calls = (0..scenario.commands)
            .map(|i| async move {
                let name = format!("cmd-{i}");
                let reply = client.execute(&name, None).await;
                (name, reply)
            })
            .collect();
        let commands = join_all(calls);
        let (results, _fake) = tokio::join!(commands, fake_side);
        for (name, reply) in results {
            let reply = reply.map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(reply, json!({"echo": name}));
        }
        for number in expected_events {
            let event = conn.events.recv().await.expect("event");
            prop_assert_eq!(event.data, format!(r#"{{"n": {number}}}"#));
        }
        Ok(())
    }

    /// Poll a set of futures together (no extra dependency for join_all).
    async fn join_all<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
        let mut set = Vec::new();
        for future in futures {
            set.push(Box::pin(future));
        }
        let mut outputs: Vec<Option<F::Output>> = set.iter().map(|_| None).collect();
        std::future::poll_fn(|cx| {
            let mut pending = false;
            for (future, output) in set.iter_mut().zip(outputs.iter_mut()) {
                if output.is_none() {
                    match future.as_mut().poll(cx) {
                        std::task::Poll::Ready(value) => *output = Some(value),
                        std::task::Poll::Pending => pending = true,
                    }
                }
            }
            if pending {
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(())
            }
        })
        .await;
        outputs.into_iter().flatten().collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn prop_replies_match_ids_and_events_keep_order(scenario in scenario()) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async { tokio::time::timeout(WAIT, run(scenario)).await })
                .map_err(|_| TestCaseError::fail("scenario timed out"))??;
        }
    }
}

/// A caller's command, checked as the service checks it.
fn raw(text: &str) -> qvirt_common::qapi::Command {
    qvirt_common::qapi::parse_command(text).expect("a command")
}
