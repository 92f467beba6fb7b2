//! The channel task against a scripted fake agent on a unix socket:
//! resync before first use and after a timeout, reconnect after EOF,
//! commands without a success response, connect failures.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

use super::*;

/// What the fake agent does with one command.
#[derive(Debug, Clone)]
pub(crate) enum Action {
    /// `{"return": VALUE, "id": ...}`.
    Return(Value),
    /// `{"id": ..., "error": {...}}`.
    Error(&'static str, &'static str),
    /// Nothing.
    Silent,
    /// Close the connection.
    Close,
}

pub(crate) type Script = Arc<dyn Fn(&str, usize) -> Action + Send + Sync>;

/// A fake qemu-ga: answers 0xFF with the parse error, guest-sync-delimited
/// with 0xFF and the id, and every other command per `script(name, n)`
/// where n counts that command's calls. Logs every command name (and
/// "accept" per connection).
pub(crate) fn fake_agent(dir: &Path, script: Script) -> (PathBuf, Arc<Mutex<Vec<String>>>) {
    let path = dir.join("agent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let log2 = log.clone();
    tokio::spawn(async move {
        let mut counts: HashMap<String, usize> = HashMap::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            log2.lock().unwrap().push("accept".to_owned());
            let (r, mut w) = stream.into_split();
            let mut r = BufReader::new(r);
            loop {
                let mut line = Vec::new();
                if r.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
                    log2.lock().unwrap().push("eof".to_owned());
                    break;
                }
                let ffs = line.iter().take_while(|&&b| b == 0xFF).count();
                for _ in 0..ffs {
                    let err = "{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray '\\uFFFD'\"}}\n";
                    w.write_all(err.as_bytes()).await.unwrap();
                }
                let req: Value = serde_json::from_slice(&line[ffs..]).unwrap();
                let name = req["execute"].as_str().unwrap().to_owned();
                log2.lock().unwrap().push(name.clone());
                if name == "guest-sync-delimited" {
                    let id = &req["arguments"]["id"];
                    let mut out = vec![0xFF];
                    out.extend_from_slice(format!("{{\"return\": {id}}}\n").as_bytes());
                    w.write_all(&out).await.unwrap();
                    continue;
                }
                let n = counts.entry(name.clone()).or_default();
                *n += 1;
                let id = req.get("id").cloned().unwrap_or(Value::Null);
                let out = match script(&name, *n) {
                    Action::Return(v) => json!({"return": v, "id": id}).to_string(),
                    Action::Error(class, desc) => {
                        json!({"id": id, "error": {"class": class, "desc": desc}}).to_string()
                    }
                    Action::Silent => continue,
                    Action::Close => break,
                };
                w.write_all(format!("{out}\n").as_bytes()).await.unwrap();
            }
        }
    });
    (path, log)
}

pub(crate) fn settings() -> ChannelSettings {
    ChannelSettings {
        sync_timeout: Duration::from_secs(5),
        max_reply_bytes: 1 << 20,
        queue_depth: 8,
        idle_close: None,
    }
}

pub(crate) fn log_of(log: &Arc<Mutex<Vec<String>>>) -> Vec<String> {
    log.lock().unwrap().clone()
}

const T: Duration = Duration::from_secs(10);

#[tokio::test]
async fn test_first_command_is_preceded_by_a_sync_and_later_ones_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let (path, log) = fake_agent(dir.path(), Arc::new(|_, _| Action::Return(json!({}))));
    let ch = AgentChannel::spawn(path, settings(), CancellationToken::new());
    for _ in 0..2 {
        let out = ch.execute("guest-ping", None, T).await.unwrap();
        assert_eq!(out, Outcome::Reply(Reply::Return(json!({}))));
    }
    assert_eq!(
        log_of(&log),
        ["accept", "guest-sync-delimited", "guest-ping", "guest-ping"]
    );
}

#[tokio::test]
async fn test_timeout_is_deadline_then_the_channel_resyncs_and_skips_the_late_reply() {
    let dir = tempfile::tempdir().unwrap();
    let (path, log) = fake_agent(
        dir.path(),
        Arc::new(|name, n| match (name, n) {
            ("guest-get-time", 1) => Action::Silent,
            _ => Action::Return(json!(42)),
        }),
    );
    let ch = AgentChannel::spawn(path, settings(), CancellationToken::new());
    let err = ch
        .execute("guest-get-time", None, Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(matches!(err, ChannelError::Timeout { .. }), "{err:?}");
    let out = ch.execute("guest-get-time", None, T).await.unwrap();
    assert_eq!(out, Outcome::Reply(Reply::Return(json!(42))));
    assert_eq!(
        log_of(&log),
        [
            "accept",
            "guest-sync-delimited",
            "guest-get-time",
            "guest-sync-delimited",
            "guest-get-time"
        ]
    );
}

#[tokio::test]
async fn test_eof_is_an_error_and_the_next_command_reconnects_and_resyncs() {
    let dir = tempfile::tempdir().unwrap();
    let (path, log) = fake_agent(
        dir.path(),
        Arc::new(|name, n| match (name, n) {
            ("guest-info", 1) => Action::Close,
            _ => Action::Return(json!({"version": "7.2.22"})),
        }),
    );
    let ch = AgentChannel::spawn(path, settings(), CancellationToken::new());
    let err = ch.execute("guest-info", None, T).await.unwrap_err();
    assert!(matches!(err, ChannelError::Wire(WireError::Eof)), "{err:?}");
    let out = ch.execute("guest-info", None, T).await.unwrap();
    assert_eq!(
        out,
        Outcome::Reply(Reply::Return(json!({"version": "7.2.22"})))
    );
    assert_eq!(
        log_of(&log),
        [
            "accept",
            "guest-sync-delimited",
            "guest-info",
            "accept",
            "guest-sync-delimited",
            "guest-info"
        ]
    );
}

#[tokio::test]
async fn test_shutdown_without_reply_is_accepted_by_the_marker_and_errors_pass() {
    let dir = tempfile::tempdir().unwrap();
    let (path, log) = fake_agent(
        dir.path(),
        Arc::new(|name, n| match (name, n) {
            ("guest-shutdown", 1) => Action::Silent,
            ("guest-shutdown", _) => {
                Action::Error("GenericError", "child process has failed to shutdown")
            }
            _ => Action::Return(json!({})),
        }),
    );
    let ch = AgentChannel::spawn(path, settings(), CancellationToken::new());
    let args = Some(json!({"mode": "powerdown"}));
    let out = ch.execute("guest-shutdown", args.clone(), T).await.unwrap();
    assert_eq!(out, Outcome::Accepted);
    let out = ch.execute("guest-shutdown", args, T).await.unwrap();
    assert!(
        matches!(&out, Outcome::Reply(Reply::Error(e)) if e.desc.contains("failed to shutdown")),
        "{out:?}"
    );
    // The marker of the failed shutdown is answered too; the next command
    // must not mistake it for its own reply.
    let out = ch.execute("guest-get-time", None, T).await.unwrap();
    assert_eq!(out, Outcome::Reply(Reply::Return(json!({}))));
    assert_eq!(
        log_of(&log),
        [
            "accept",
            "guest-sync-delimited",
            "guest-shutdown",
            "guest-ping",
            "guest-shutdown",
            "guest-ping",
            "guest-get-time"
        ]
    );
}

#[tokio::test]
async fn test_shutdown_then_eof_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _log) = fake_agent(
        dir.path(),
        Arc::new(|name, _| match name {
            "guest-shutdown" => Action::Close,
            _ => Action::Return(json!({})),
        }),
    );
    let ch = AgentChannel::spawn(path, settings(), CancellationToken::new());
    let out = ch.execute("guest-shutdown", None, T).await.unwrap();
    assert_eq!(out, Outcome::Accepted);
}

#[tokio::test]
async fn test_missing_socket_is_a_connect_error_and_silent_agent_not_responding() {
    let dir = tempfile::tempdir().unwrap();
    let ch = AgentChannel::spawn(
        dir.path().join("nope.sock"),
        settings(),
        CancellationToken::new(),
    );
    let err = ch.execute("guest-ping", None, T).await.unwrap_err();
    assert!(matches!(err, ChannelError::Connect { .. }), "{err:?}");

    // A listener that accepts but never reads: like a QEMU chardev whose
    // guest runs no agent.
    let path = dir.path().join("mute.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let ch = AgentChannel::spawn(
        path,
        ChannelSettings {
            sync_timeout: Duration::from_millis(100),
            ..settings()
        },
        CancellationToken::new(),
    );
    let err = ch.execute("guest-ping", None, T).await.unwrap_err();
    assert!(matches!(err, ChannelError::NotResponding(_)), "{err:?}");
    // A command timeout shorter than the sync budget is that timeout.
    let err = ch
        .execute("guest-ping", None, Duration::from_millis(30))
        .await
        .unwrap_err();
    assert!(matches!(err, ChannelError::Timeout { .. }), "{err:?}");
    drop(listener);
}

#[tokio::test]
async fn test_shutdown_token_closes_the_channel() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _log) = fake_agent(dir.path(), Arc::new(|_, _| Action::Return(json!({}))));
    let token = CancellationToken::new();
    let ch = AgentChannel::spawn(path, settings(), token.clone());
    ch.execute("guest-ping", None, T).await.unwrap();
    token.cancel();
    let deadline = Instant::now() + T;
    loop {
        match ch.execute("guest-ping", None, T).await {
            Err(ChannelError::Closed) => break,
            other => assert!(Instant::now() < deadline, "still open: {other:?}"),
        }
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn test_channels_share_one_task_per_socket_path() {
    let dir = tempfile::tempdir().unwrap();
    let (path, log) = fake_agent(dir.path(), Arc::new(|_, _| Action::Return(json!({}))));
    let channels = Channels::new(settings(), CancellationToken::new());
    channels
        .get(&path)
        .execute("guest-ping", None, T)
        .await
        .unwrap();
    channels
        .get(&path)
        .execute("guest-ping", None, T)
        .await
        .unwrap();
    assert_eq!(log_of(&log).iter().filter(|l| *l == "accept").count(), 1);
}

#[tokio::test]
async fn test_idle_connection_is_closed_and_reopened_with_a_sync() {
    let dir = tempfile::tempdir().unwrap();
    let (path, log) = fake_agent(dir.path(), Arc::new(|_, _| Action::Return(json!({}))));
    let ch = AgentChannel::spawn(
        path,
        ChannelSettings {
            idle_close: Some(Duration::from_millis(50)),
            ..settings()
        },
        CancellationToken::new(),
    );
    ch.execute("guest-ping", None, T).await.unwrap();
    let deadline = Instant::now() + T;
    while !log_of(&log).contains(&"eof".to_owned()) {
        assert!(Instant::now() < deadline, "idle connection never closed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    ch.execute("guest-ping", None, T).await.unwrap();
    assert_eq!(
        log_of(&log),
        [
            "accept",
            "guest-sync-delimited",
            "guest-ping",
            "eof",
            "accept",
            "guest-sync-delimited",
            "guest-ping"
        ]
    );
}

#[tokio::test]
async fn test_a_caller_dropped_mid_command_frees_the_channel_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (path, log) = fake_agent(
        dir.path(),
        Arc::new(|name, n| match (name, n) {
            ("guest-get-time", 1) => Action::Silent,
            _ => Action::Return(json!(n)),
        }),
    );
    let ch = AgentChannel::spawn(path, settings(), CancellationToken::new());
    // The abandoned command asks for an hour: if the task waited for it,
    // the next command could not finish within the bound below.
    let hour = Duration::from_secs(3600);
    let dropped = tokio::time::timeout(
        Duration::from_millis(50),
        ch.execute("guest-get-time", None, hour),
    )
    .await;
    assert!(dropped.is_err(), "the silent agent must outlast the caller");
    // The task stops waiting, resyncs (skipping a late reply), then runs
    // this one.
    let out = tokio::time::timeout(T, ch.execute("guest-get-time", None, hour))
        .await
        .expect("the channel stayed busy with the abandoned command")
        .unwrap();
    assert_eq!(out, Outcome::Reply(Reply::Return(json!(2))));
    assert_eq!(
        log_of(&log),
        [
            "accept",
            "guest-sync-delimited",
            "guest-get-time",
            "guest-sync-delimited",
            "guest-get-time"
        ]
    );
}

#[tokio::test]
async fn test_time_in_the_queue_counts_against_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let (path, log) = fake_agent(
        dir.path(),
        Arc::new(|name, _| match name {
            "guest-get-time" => Action::Silent,
            _ => Action::Return(json!({})),
        }),
    );
    let ch = AgentChannel::spawn(path, settings(), CancellationToken::new());
    let running = tokio::spawn({
        let ch = ch.clone();
        async move {
            ch.execute("guest-get-time", None, Duration::from_secs(2))
                .await
        }
    });
    let deadline = Instant::now() + T;
    while !log_of(&log).contains(&"guest-get-time".to_owned()) {
        assert!(Instant::now() < deadline, "first command never ran");
        tokio::task::yield_now().await;
    }
    // Queued behind a command that holds the channel for 2 s: it times out
    // on its own deadline while still queued, and is never sent.
    let err = ch
        .execute("guest-ping", None, Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(matches!(err, ChannelError::Timeout { .. }), "{err:?}");
    assert!(!running.is_finished(), "the first command must still run");
    let first = running.await.unwrap().unwrap_err();
    assert!(matches!(first, ChannelError::Timeout { .. }), "{first:?}");
    ch.execute("guest-info", None, T).await.unwrap();
    let log = log_of(&log);
    assert!(!log.contains(&"guest-ping".to_owned()), "{log:?}");
    assert_eq!(log.last().map(String::as_str), Some("guest-info"));
}

#[tokio::test]
async fn test_an_idle_channel_leaves_the_registry_and_comes_back_on_use() {
    let dir = tempfile::tempdir().unwrap();
    let (path, log) = fake_agent(dir.path(), Arc::new(|_, _| Action::Return(json!({}))));
    let channels = Channels::new(
        ChannelSettings {
            idle_close: Some(Duration::from_millis(20)),
            ..settings()
        },
        CancellationToken::new(),
    );
    let far = Instant::now() + T;
    channels.call(&path, ping(), far, T).await.unwrap();
    assert_eq!(channels.len(), 1);
    let deadline = Instant::now() + T;
    while !channels.is_empty() {
        assert!(Instant::now() < deadline, "idle channel never retired");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    channels
        .call(&path, ping(), Instant::now() + T, T)
        .await
        .unwrap();
    assert_eq!(log_of(&log).iter().filter(|l| *l == "accept").count(), 2);
}

fn ping() -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("execute".into(), json!("guest-ping"));
    m
}

#[tokio::test]
async fn test_commands_beyond_the_queue_depth_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (path, log) = fake_agent(
        dir.path(),
        Arc::new(|name, _| match name {
            "guest-get-time" => Action::Silent,
            _ => Action::Return(json!({})),
        }),
    );
    let ch = AgentChannel::spawn(
        path,
        ChannelSettings {
            queue_depth: 1,
            ..settings()
        },
        CancellationToken::new(),
    );
    let running = tokio::spawn({
        let ch = ch.clone();
        async move {
            ch.execute("guest-get-time", None, Duration::from_millis(300))
                .await
        }
    });
    let deadline = Instant::now() + T;
    while !log_of(&log).contains(&"guest-get-time".to_owned()) {
        assert!(Instant::now() < deadline, "first command never ran");
        tokio::task::yield_now().await;
    }
    let waiting = tokio::spawn({
        let ch = ch.clone();
        async move { ch.execute("guest-ping", None, T).await }
    });
    while ch.tx.capacity() > 0 {
        assert!(Instant::now() < deadline, "second command never queued");
        tokio::task::yield_now().await;
    }
    let err = ch.execute("guest-ping", None, T).await.unwrap_err();
    assert!(
        matches!(err, ChannelError::QueueFull { depth: 1 }),
        "{err:?}"
    );
    let first = running.await.unwrap().unwrap_err();
    assert!(matches!(first, ChannelError::Timeout { .. }), "{first:?}");
    assert_eq!(
        waiting.await.unwrap().unwrap(),
        Outcome::Reply(Reply::Return(json!({})))
    );
}
