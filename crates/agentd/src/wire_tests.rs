//! Framing and resync against a fake peer on a socketpair: garbage and
//! qemu-ga's parse error before the delimiter, stale and wrong sync ids,
//! a sync that times out and the late answer skipped by the next one, EOF,
//! the reply size cap.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::*;
use crate::socket::{AgentReader, AgentSocket, AgentWriter};

type TestConn = Conn<AgentReader, AgentWriter>;

fn pair(max_reply: usize) -> (TestConn, BufReader<UnixStream>) {
    let (a, b) = UnixStream::pair().unwrap();
    let (r, w) = AgentSocket::from_std(a.into_std().unwrap())
        .unwrap()
        .split();
    (Conn::new(r, w, max_reply), BufReader::new(b))
}

/// Reads one request line on the peer side: the number of leading 0xFF
/// bytes and the JSON after them.
async fn request(peer: &mut BufReader<UnixStream>) -> (usize, Value) {
    let mut line = Vec::new();
    peer.read_until(b'\n', &mut line).await.unwrap();
    let ffs = line.iter().take_while(|&&b| b == DELIMITER).count();
    (ffs, serde_json::from_slice(&line[ffs..]).unwrap())
}

fn sync_id(req: &Value) -> u64 {
    assert_eq!(req["execute"], "guest-sync-delimited");
    req["arguments"]["id"].as_u64().unwrap()
}

async fn send(peer: &mut BufReader<UnixStream>, bytes: &[u8]) {
    peer.get_mut().write_all(bytes).await.unwrap();
}

const PARSE_ERROR: &[u8] =
    b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray '\\uFFFD'\"}}\n";

#[tokio::test]
async fn test_sync_skips_garbage_and_the_parse_error_before_the_delimiter() {
    let (mut conn, mut peer) = pair(1 << 20);
    let peer_task = tokio::spawn(async move {
        let (ffs, req) = request(&mut peer).await;
        assert_eq!(ffs, 1, "the request starts with exactly one 0xFF");
        let id = sync_id(&req);
        send(
            &mut peer,
            b"{\"return\": {}, \"id\": \"old\"}\nnot json at all \x00\x01",
        )
        .await;
        send(&mut peer, PARSE_ERROR).await;
        send(&mut peer, "\u{0}\n".as_bytes()).await;
        let mut reply = vec![DELIMITER];
        reply.extend_from_slice(format!("{{\"return\": {id}}}\n").as_bytes());
        send(&mut peer, &reply).await;
        (id, peer)
    });
    let got = conn.sync().await.unwrap();
    let (id, _peer) = peer_task.await.unwrap();
    assert_eq!(got, id);
}

#[tokio::test]
async fn test_sync_skips_stale_delimited_replies_with_other_ids() {
    let (mut conn, mut peer) = pair(1 << 20);
    let peer_task = tokio::spawn(async move {
        let (_, req) = request(&mut peer).await;
        let id = sync_id(&req);
        send(
            &mut peer,
            b"\xff{\"return\": 12345}\n\xff{\"return\": \"x\"}\n\xff{broken\n",
        )
        .await;
        send(&mut peer, "\u{ff}".as_bytes()).await; // UTF-8 of U+00FF: no 0xFF byte
        send(&mut peer, "\n\x7f".as_bytes()).await;
        let mut reply = vec![DELIMITER];
        reply.extend_from_slice(format!("{{\"return\": {id}}}\n").as_bytes());
        send(&mut peer, &reply).await;
        peer
    });
    conn.sync().await.unwrap();
    let _peer = peer_task.await.unwrap();
}

#[tokio::test]
async fn test_sync_resends_when_an_attempt_sees_only_wrong_ids() {
    let (mut conn, mut peer) = pair(1 << 20);
    let peer_task = tokio::spawn(async move {
        let (_, first) = request(&mut peer).await;
        let first = sync_id(&first);
        for _ in 0..MAX_STALE_PER_ATTEMPT {
            send(&mut peer, "\u{0}".as_bytes()).await;
            let mut stale = vec![DELIMITER];
            stale.extend_from_slice(format!("{{\"return\": {}}}\n", first + 1).as_bytes());
            send(&mut peer, &stale).await;
        }
        let (ffs, second) = request(&mut peer).await;
        assert_eq!(ffs, 1);
        let second = sync_id(&second);
        assert_ne!(first, second, "each attempt uses a fresh id");
        let mut reply = vec![DELIMITER];
        reply.extend_from_slice(format!("{{\"return\": {second}}}\n").as_bytes());
        send(&mut peer, &reply).await;
        (second, peer)
    });
    let got = conn.sync().await.unwrap();
    let (second, _peer) = peer_task.await.unwrap();
    assert_eq!(got, second);
}

#[tokio::test]
async fn test_sync_gives_up_when_the_id_never_matches() {
    let (mut conn, mut peer) = pair(1 << 20);
    let peer_task = tokio::spawn(async move {
        for _ in 0..SYNC_ATTEMPTS {
            let (_, req) = request(&mut peer).await;
            let id = sync_id(&req);
            for _ in 0..MAX_STALE_PER_ATTEMPT {
                let mut stale = vec![DELIMITER];
                stale.extend_from_slice(format!("{{\"return\": {}}}\n", id ^ 1).as_bytes());
                send(&mut peer, &stale).await;
            }
        }
        peer
    });
    let err = conn.sync().await.unwrap_err();
    assert!(matches!(err, WireError::SyncMismatch), "{err:?}");
    let _peer = peer_task.await.unwrap();
}

#[tokio::test]
async fn test_sync_timeout_then_the_next_sync_skips_the_late_answer() {
    let (mut conn, mut peer) = pair(1 << 20);
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    let peer_task = tokio::spawn(async move {
        let (_, first) = request(&mut peer).await;
        let first = sync_id(&first);
        first_tx.send(first).unwrap();
        // Silent until the host gives up and sends a second sync.
        let (_, second) = request(&mut peer).await;
        let second = sync_id(&second);
        // The late answer to the first, then the answer to the second,
        // each after qemu-ga's complaint about the 0xFF.
        for id in [first, second] {
            send(&mut peer, PARSE_ERROR).await;
            let mut reply = vec![DELIMITER];
            reply.extend_from_slice(format!("{{\"return\": {id}}}\n").as_bytes());
            send(&mut peer, &reply).await;
        }
        (second, peer)
    });
    let timed_out = tokio::time::timeout(Duration::from_millis(100), conn.sync()).await;
    assert!(timed_out.is_err(), "the silent peer must time the sync out");
    let first = first_rx.await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), conn.sync())
        .await
        .unwrap()
        .unwrap();
    let (second, _peer) = peer_task.await.unwrap();
    assert_eq!(got, second);
    assert_ne!(got, first);
}

#[tokio::test]
async fn test_eof_during_sync_and_during_a_reply() {
    let (mut conn, peer) = pair(1 << 20);
    drop(peer);
    let err = conn.sync().await.unwrap_err();
    assert!(matches!(err, WireError::Eof), "{err:?}");

    let (mut conn, mut peer) = pair(1 << 20);
    send(&mut peer, b"{\"return\": {}, \"id\": \"a\"").await;
    drop(peer);
    let err = conn.read_reply(&["a"]).await.unwrap_err();
    assert!(matches!(err, WireError::Eof), "{err:?}");
}

#[tokio::test]
async fn test_read_reply_skips_other_ids_blank_lines_and_a_leading_delimiter() {
    let (mut conn, mut peer) = pair(1 << 20);
    send(
        &mut peer,
        b"{\"return\": 1, \"id\": \"old\"}\n\r\n\xff{\"return\": 18446744073709551616123, \"id\": \"b\"}\r\n\
          {\"id\": \"c\", \"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command x has not been found\"}}\n",
    )
    .await;
    let (i, reply) = conn.read_reply(&["a", "b"]).await.unwrap();
    assert_eq!(i, Some(1));
    assert_eq!(reply.to_json(), r#"{"return":18446744073709551616123}"#);
    let (_, reply) = conn.read_reply(&["c"]).await.unwrap();
    assert_eq!(
        reply,
        Reply::Error(AgentError {
            class: "CommandNotFound".into(),
            desc: "The command x has not been found".into()
        })
    );
}

#[tokio::test]
async fn test_an_error_without_id_answers_but_a_return_without_id_is_skipped() {
    let (mut conn, mut peer) = pair(1 << 20);
    send(
        &mut peer,
        b"{\"return\": {}}\n\
          {\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, invalid UTF-8 sequence in string\"}}\n",
    )
    .await;
    let (i, reply) = conn.read_reply(&["a"]).await.unwrap();
    assert_eq!(i, None);
    assert!(
        matches!(&reply, Reply::Error(e) if e.desc.starts_with("JSON parse error")),
        "{reply:?}"
    );
}

#[test]
fn test_json_values_are_counted_outside_strings_only() {
    assert!(json_values_at_most(b"[0,0,0]", 4));
    assert!(!json_values_at_most(b"[0,0,0]", 3));
    // Separators inside strings, escaped quotes included, do not count.
    let text = br#"{"return": "a,b:[{\",,,"}"#;
    assert!(json_values_at_most(text, 3));
    assert!(!json_values_at_most(text, 2));
    assert!(json_values_at_most(b"", 1));
}

#[tokio::test]
async fn test_reply_with_too_many_values_is_refused_before_parsing() {
    let (mut conn, mut peer) = pair(8 << 20);
    let mut big = b"{\"return\": [".to_vec();
    big.extend(b"0,".repeat(MAX_JSON_VALUES));
    big.extend(b"0], \"id\": \"a\"}\n");
    let writer = tokio::spawn(async move {
        send(&mut peer, &big).await;
        peer
    });
    let err = conn.read_reply(&["a"]).await.unwrap_err();
    assert!(
        matches!(
            err,
            WireError::TooManyValues {
                limit: MAX_JSON_VALUES
            }
        ),
        "{err:?}"
    );
    let _peer = writer.await.unwrap();
}

#[tokio::test]
async fn test_reply_longer_than_the_cap_is_refused() {
    let (mut conn, mut peer) = pair(4096);
    let big = format!("{{\"return\": \"{}\", \"id\": \"a\"}}\n", "x".repeat(5000));
    let writer = tokio::spawn(async move {
        send(&mut peer, big.as_bytes()).await;
        peer
    });
    let err = conn.read_reply(&["a"]).await.unwrap_err();
    assert!(matches!(err, WireError::TooLong { limit: 4096 }), "{err:?}");
    let _peer = writer.await.unwrap();
}

#[tokio::test]
async fn test_poll_idle_sees_pending_input_and_eof() {
    let (mut conn, mut peer) = pair(1 << 20);
    assert_eq!(conn.poll_idle(), None);
    send(&mut peer, b"late\n").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while conn.poll_idle().is_none() {
        assert!(tokio::time::Instant::now() < deadline, "input never seen");
        tokio::task::yield_now().await;
    }
    assert_eq!(conn.poll_idle(), Some(true));

    let (mut conn, peer) = pair(1 << 20);
    drop(peer);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match conn.poll_idle() {
            Some(false) => break,
            other => assert!(
                tokio::time::Instant::now() < deadline,
                "EOF never seen: {other:?}"
            ),
        }
        tokio::task::yield_now().await;
    }
}

#[test]
fn test_parse_reply_table() {
    let ok = |line: &str| parse_reply(line.as_bytes());
    let (id, r) = ok(r#"{"return": {}, "id": "abc"}"#).unwrap();
    assert_eq!(id, Some(Value::String("abc".into())));
    assert_eq!(r.to_json(), r#"{"return":{}}"#);
    let (_, r) = ok(r#"{"return": 9223372036854775807}"#).unwrap();
    assert_eq!(r.to_json(), r#"{"return":9223372036854775807}"#);
    let (_, r) = ok(r#"{"id": 99, "error": {"class": "GenericError", "desc": "d"}}"#).unwrap();
    assert_eq!(
        r.to_json(),
        r#"{"error":{"class":"GenericError","desc":"d"}}"#
    );
    for bad in [
        "[1]",
        "{}",
        "not json",
        r#"{"error": {"class": 1, "desc": "d"}}"#,
        r#"{"error": "x"}"#,
    ] {
        assert!(
            matches!(parse_reply(bad.as_bytes()), Err(WireError::BadReply { .. })),
            "{bad}"
        );
    }
}

#[test]
fn test_encode_request_sets_our_id_and_keeps_big_numbers() {
    let v: Value = serde_json::from_str(
        r#"{"execute":"guest-sync","arguments":{"id":18446744073709551615},"id":1}"#,
    )
    .unwrap();
    let Value::Object(m) = v else { panic!() };
    let bytes = encode_request(m, "qa-1");
    let text = String::from_utf8(bytes).unwrap();
    assert!(text.ends_with('\n'));
    assert!(text.contains("18446744073709551615"), "{text}");
    assert!(text.contains(r#""id":"qa-1""#), "{text}");
}

#[test]
fn test_random_ids_are_nonzero_exact_and_differ() {
    let ids: std::collections::HashSet<u64> = (0..1000).map(|_| random_id()).collect();
    assert_eq!(ids.len(), 1000);
    assert!(ids.iter().all(|&i| i > 0 && i < (1 << 53)));
}
