//! Every RPC logs one line when it ends, in a span that names the method,
//! the peer and the domain: with `--log-format json` an operator greps a
//! guest's calls by domain.

use std::time::Duration;

use qvirt_integration_tests::{Service, grpcurl_internal, start_supervisor, text};

/// The `rpc done` JSON line of the call to `method`, once it is logged.
async fn done_line(svc: &mut Service, method: &str) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let found = svc.stderr().lines().find_map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            (v["fields"]["message"] == "rpc done" && v["span"]["method"] == method).then_some(v)
        });
        if let Some(v) = found {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no `rpc done` line for {method}; stderr:\n{}",
            svc.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn test_a_calls_log_line_carries_its_method_domain_and_code() {
    let dir = tempfile::tempdir().unwrap();
    let (state, run) = (dir.path().join("state"), dir.path().join("run"));
    let mut supervisor = start_supervisor(&state, &run, None, &["--log-format", "json"]).await;
    let out = grpcurl_internal(&[
        "-plaintext",
        "-d",
        r#"{"domain": "ghost-vm", "request_id": "r-42"}"#,
        &supervisor.addr.to_string(),
        "qvirt.v1.Supervisor/StartDomain",
    ]);
    assert!(text(&out.stderr).contains("NotFound"), "{out:?}");
    let line = done_line(&mut supervisor, "/qvirt.v1.Supervisor/StartDomain").await;
    assert_eq!(line["level"], "INFO", "{line}");
    assert_eq!(line["span"]["domain"], "ghost-vm", "{line}");
    assert_eq!(line["span"]["request_id"], "r-42", "{line}");
    assert_eq!(line["fields"]["code"], "NotFound", "{line}");
    assert!(
        line["span"]["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{line}"
    );

    let mut agentd = Service::start("qvirt-agentd", &["--log-format", "json"]);
    agentd.wait_serving("").await;
    let out = grpcurl_internal(&[
        "-plaintext",
        "-d",
        r#"{"domain": "ghost-vm"}"#,
        &agentd.addr.to_string(),
        "qvirt.v1.GuestAgent/GetOsInfo",
    ]);
    assert!(text(&out.stderr).contains("NotFound"), "{out:?}");
    let line = done_line(&mut agentd, "/qvirt.v1.GuestAgent/GetOsInfo").await;
    assert_eq!(line["span"]["domain"], "ghost-vm", "{line}");
    assert_eq!(line["fields"]["code"], "NotFound", "{line}");
}
