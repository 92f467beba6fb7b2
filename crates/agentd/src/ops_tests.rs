//! The multi-command calls through the whole service, against a scripted
//! fake agent: chunking, and the file handle closed even when a read or
//! write fails half-way; Shutdown's marker.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::json;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request};

use qvirt_proto::v1::guest_agent_server::GuestAgent;

use super::*;
use crate::channel::Channels;
use crate::channel::tests::{Action, Script, fake_agent, log_of, settings};
use crate::locate::Locator;
use crate::service::GuestAgentService;

fn service(
    dir: &std::path::Path,
    script: Script,
) -> (GuestAgentService, Arc<std::sync::Mutex<Vec<String>>>) {
    let (path, log) = fake_agent(dir, script);
    let agents: BTreeMap<String, std::path::PathBuf> = [("vm".to_owned(), path)].into();
    let svc = GuestAgentService::new(
        Locator::new(
            agents,
            None,
            qvirt_common::internal_auth::TokenInterceptor::new(None),
        )
        .unwrap(),
        Channels::new(settings(), CancellationToken::new()),
        Limits {
            default_timeout: Duration::from_secs(10),
            max_file_bytes: 1024,
            file_chunk_bytes: 2,
            exec_poll_max: Duration::from_millis(20),
        },
    );
    (svc, log)
}

fn commands(log: &Arc<std::sync::Mutex<Vec<String>>>) -> Vec<String> {
    log_of(log)
        .into_iter()
        .filter(|l| l.starts_with("guest-file") || l.starts_with("guest-exec"))
        .collect()
}

#[tokio::test]
async fn test_file_read_in_chunks_until_eof() {
    let dir = tempfile::tempdir().unwrap();
    let (svc, log) = service(
        dir.path(),
        Arc::new(|name, n| match (name, n) {
            ("guest-file-open", _) => Action::Return(json!(1000)),
            ("guest-file-read", 1) => {
                Action::Return(json!({"count": 2, "buf-b64": "YWI=", "eof": false}))
            }
            ("guest-file-read", 2) => {
                Action::Return(json!({"count": 1, "buf-b64": "Yw==", "eof": true}))
            }
            _ => Action::Return(json!({})),
        }),
    );
    let r = svc
        .read_file(Request::new(pb::ReadFileRequest {
            domain: "vm".into(),
            path: "/f".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.data, b"abc");
    assert!(r.eof);
    assert_eq!(
        commands(&log),
        [
            "guest-file-open",
            "guest-file-read",
            "guest-file-read",
            "guest-file-close"
        ]
    );
}

#[tokio::test]
async fn test_file_read_error_half_way_still_closes_the_handle() {
    let dir = tempfile::tempdir().unwrap();
    let (svc, log) = service(
        dir.path(),
        Arc::new(|name, n| match (name, n) {
            ("guest-file-open", _) => Action::Return(json!(1000)),
            ("guest-file-read", 1) => {
                Action::Return(json!({"count": 2, "buf-b64": "YWI=", "eof": false}))
            }
            ("guest-file-read", _) => {
                Action::Error("GenericError", "failed to read file: Input/output error")
            }
            _ => Action::Return(json!({})),
        }),
    );
    let err = svc
        .read_file(Request::new(pb::ReadFileRequest {
            domain: "vm".into(),
            path: "/f".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("Input/output error"), "{err:?}");
    assert_eq!(
        commands(&log),
        [
            "guest-file-open",
            "guest-file-read",
            "guest-file-read",
            "guest-file-close"
        ]
    );
}

#[tokio::test]
async fn test_file_read_refuses_a_chunk_longer_than_asked() {
    let dir = tempfile::tempdir().unwrap();
    // Chunks of 2 bytes are asked for; this guest answers with 6.
    let (svc, log) = service(
        dir.path(),
        Arc::new(|name, _| match name {
            "guest-file-open" => Action::Return(json!(1000)),
            "guest-file-read" => {
                Action::Return(json!({"count": 6, "buf-b64": "YWJjZGVm", "eof": false}))
            }
            _ => Action::Return(json!({})),
        }),
    );
    let err = svc
        .read_file(Request::new(pb::ReadFileRequest {
            domain: "vm".into(),
            path: "/f".into(),
            length: 4,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unknown, "{err:?}");
    assert_eq!(
        qvirt_common::rpc::reason_of(&err).as_deref(),
        Some("AGENT_REPLY_INVALID")
    );
    assert_eq!(
        commands(&log),
        ["guest-file-open", "guest-file-read", "guest-file-close"]
    );
}

#[tokio::test]
async fn test_file_write_chunks_and_closes_after_a_failed_write() {
    let dir = tempfile::tempdir().unwrap();
    let (svc, log) = service(
        dir.path(),
        Arc::new(|name, n| match (name, n) {
            ("guest-file-open", _) => Action::Return(json!(1000)),
            ("guest-file-write", 1) => Action::Return(json!({"count": 2, "eof": false})),
            ("guest-file-write", 2) => Action::Return(json!({"count": 1, "eof": false})),
            ("guest-file-write", _) => Action::Error(
                "GenericError",
                "failed to write to file: No space left on device",
            ),
            _ => Action::Return(json!({})),
        }),
    );
    let write = |data: &[u8]| pb::WriteFileRequest {
        domain: "vm".into(),
        path: "/f".into(),
        data: data.to_vec(),
        ..Default::default()
    };
    let r = svc.write_file(Request::new(write(b"abc"))).await.unwrap();
    assert_eq!(r.into_inner().written_bytes, 3);
    let err = svc
        .write_file(Request::new(write(b"de")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(
        commands(&log),
        [
            "guest-file-open",
            "guest-file-write",
            "guest-file-write",
            "guest-file-close",
            "guest-file-open",
            "guest-file-write",
            "guest-file-close"
        ]
    );
    let err = svc
        .write_file(Request::new(write(&[0; 2000])))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(
        qvirt_common::rpc::reason_of(&err).as_deref(),
        Some("FILE_TOO_LARGE")
    );
}

#[tokio::test]
async fn test_bad_request_fields_are_named_before_the_guest_is_asked() {
    use qvirt_common::rpc::{reason_of, violated_fields};
    let dir = tempfile::tempdir().unwrap();
    let (svc, log) = service(
        dir.path(),
        Arc::new(|name, _| match name {
            "guest-exec" => Action::Return(json!({"pid": 7})),
            _ => Action::Return(json!({})),
        }),
    );
    let exec = |args: &[&str], timeout: Option<prost_types::Duration>| pb::ExecRequest {
        domain: "vm".into(),
        path: "/bin/true".into(),
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        timeout,
        ..Default::default()
    };
    let cases = [
        (exec(&["a", "b\0c"], None), "args[1]"),
        (
            exec(
                &[],
                Some(prost_types::Duration {
                    seconds: -1,
                    nanos: 0,
                }),
            ),
            "timeout",
        ),
        (
            pb::ExecRequest {
                path: String::new(),
                ..exec(&[], None)
            },
            "path",
        ),
        (
            pb::ExecRequest {
                domain: String::new(),
                ..exec(&[], None)
            },
            "domain",
        ),
    ];
    for (req, field) in cases {
        let err = svc.exec(Request::new(req)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert_eq!(reason_of(&err).as_deref(), Some("INVALID_ARGUMENT"));
        assert_eq!(violated_fields(&err), [field]);
    }
    assert!(commands(&log).is_empty(), "{:?}", commands(&log));
    // A zero timeout is the default one, as unset.
    let zero = Some(prost_types::Duration::default());
    let r = svc.exec(Request::new(exec(&[], zero))).await.unwrap();
    assert_eq!(r.into_inner().pid, 7);
    // A host other than this one: the static entry is not there.
    let err = svc
        .exec(Request::new(pb::ExecRequest {
            host: "elsewhere.example".into(),
            ..exec(&[], None)
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(reason_of(&err).as_deref(), Some("HOST_NOT_FOUND"));
    assert_eq!(commands(&log), ["guest-exec"]);
}

#[tokio::test]
async fn test_exec_wait_polls_until_exit_and_shutdown_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let (svc, log) = service(
        dir.path(),
        Arc::new(|name, n| match (name, n) {
            ("guest-exec", _) => Action::Return(json!({"pid": 4242})),
            ("guest-exec-status", 1 | 2) => Action::Return(json!({"exited": false})),
            ("guest-exec-status", _) => {
                Action::Return(json!({"exited": true, "exitcode": 0, "out-data": "aGkK"}))
            }
            ("guest-shutdown", _) => Action::Silent,
            _ => Action::Return(json!({})),
        }),
    );
    let r = svc
        .exec(Request::new(pb::ExecRequest {
            domain: "vm".into(),
            path: "/bin/echo".into(),
            wait: true,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.pid, 4242);
    assert_eq!(r.status.unwrap().stdout, b"hi\n");
    assert_eq!(
        commands(&log),
        [
            "guest-exec",
            "guest-exec-status",
            "guest-exec-status",
            "guest-exec-status"
        ]
    );
    svc.shutdown(Request::new(pb::ShutdownRequest {
        domain: "vm".into(),
        ..Default::default()
    }))
    .await
    .unwrap();
    let reply = svc
        .command(Request::new(pb::CommandRequest {
            domain: "vm".into(),
            command_json: r#"{"execute":"guest-shutdown","arguments":{"mode":"halt"}}"#.into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.reply_json, "");
}

#[tokio::test]
async fn test_raw_command_with_too_many_json_values_is_refused_unparsed() {
    let dir = tempfile::tempdir().unwrap();
    let (svc, log) = service(dir.path(), Arc::new(|_, _| Action::Return(json!({}))));
    let mut json = String::from(r#"{"execute":"guest-sync","arguments":{"id":["#);
    json.push_str(&"0,".repeat(crate::wire::MAX_JSON_VALUES));
    json.push_str("0]}}");
    let err = svc
        .command(Request::new(pb::CommandRequest {
            domain: "vm".into(),
            command_json: json,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("JSON values"), "{err:?}");
    assert!(!log_of(&log).iter().any(|l| l == "guest-sync"));
}
