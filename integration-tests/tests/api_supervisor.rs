//! The Supervisor's API conventions against the real binary: request ids
//! (a retried Start answers OK with the first response while a plain
//! second Start is DOMAIN_ALREADY_RUNNING; a Define retried across a
//! supervisor restart is replayed), etags (a stale one is ABORTED
//! ETAG_MISMATCH), validate_only (nothing on disk), paging through 250
//! domains, `host`, and the ErrorInfo / BadRequest details of error
//! paths as grpcurl prints them.
//!
//! QEMU runs (TCG, no guest OS) only in the Start test; it is destroyed
//! by the test or killed by pid on drop ([`QemuGuard`]).
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use qvirt_common::rpc::{reason_of, violated_fields};
use qvirt_integration_tests::{
    InternalChannel, QemuGuard, Service, grpcurl_internal, internal_channel, start_supervisor,
    text, tool_path,
};
use qvirt_proto::v1::supervisor_client::SupervisorClient;
use qvirt_proto::v1::{
    DefineDomainRequest, DestroyDomainRequest, Domain, DomainState, GetDomainRequest,
    ListDomainsRequest, StartDomainRequest, UndefineDomainRequest, define_domain_request,
};
use tonic::Code;

const NODE: &str = "api-node";

/// A supervisor over dirs that outlive it (for restarts).
struct Sup {
    _tmp: tempfile::TempDir,
    state: PathBuf,
    run: PathBuf,
    svc: Service,
    client: SupervisorClient<InternalChannel>,
}

impl Sup {
    async fn start() -> Sup {
        let tmp = tempfile::tempdir().unwrap();
        // QEMU runs as qvirt-qemu and opens images by path.
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let (state, run) = (tmp.path().join("state"), tmp.path().join("run"));
        let svc = Self::spawn(&state, &run).await;
        let client = SupervisorClient::new(internal_channel(svc.url()).await);
        Sup {
            _tmp: tmp,
            state,
            run,
            svc,
            client,
        }
    }

    async fn spawn(state: &Path, run: &Path) -> Service {
        start_supervisor(state, run, None, &["--node-name", NODE]).await
    }

    /// Stop this supervisor (SIGTERM) and start another on the same dirs.
    async fn restart(&mut self) {
        self.restart_then(|_| ()).await;
    }

    /// [`Sup::restart`], with `between` done to the state dir while no
    /// supervisor runs.
    async fn restart_then(&mut self, between: impl FnOnce(&Path)) {
        let status = self.svc.terminate();
        assert!(status.success(), "{status}");
        between(&self.state);
        self.svc = Self::spawn(&self.state, &self.run).await;
        self.client = SupervisorClient::new(internal_channel(self.svc.url()).await);
    }

    fn addr(&self) -> String {
        self.svc.url().trim_start_matches("http://").to_owned()
    }

    /// grpcurl `method` with JSON `body`: (success, stdout + stderr).
    fn grpcurl(&self, method: &str, body: &str) -> (bool, String) {
        let out = grpcurl_internal(&[
            "-plaintext",
            "-d",
            body,
            &self.addr(),
            &format!("qvirt.v1.Supervisor/{method}"),
        ]);
        let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
        (out.status.success(), all)
    }

    async fn define(&mut self, request: DefineDomainRequest) -> Result<Domain, tonic::Status> {
        self.client
            .define_domain(request)
            .await
            .map(|r| r.into_inner().domain.unwrap())
    }

    async fn get(&mut self, name: &str) -> Result<Domain, tonic::Status> {
        self.client
            .get_domain(GetDomainRequest {
                domain: name.into(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().domain.unwrap())
    }
}

fn yaml_request(yaml: &str) -> DefineDomainRequest {
    DefineDomainRequest {
        source: Some(define_domain_request::Source::SpecYaml(yaml.into())),
        ..Default::default()
    }
}

fn yaml(name: &str) -> String {
    format!("name: {name}\nmemory_mib: 64\naccel: tcg\n")
}

/// Every file under `dir` with its content, sorted.
fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut all = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else if p.exists() {
            all.push((p.clone(), std::fs::read(&p).unwrap_or_default()));
        }
    }
    all.sort();
    all
}

#[tokio::test(flavor = "multi_thread")]
async fn test_a_retried_start_is_answered_once_and_a_second_start_is_refused() {
    tool_path("qemu-system-x86_64");
    let mut sup = Sup::start().await;
    sup.define(yaml_request(&yaml("r1"))).await.unwrap();
    let start = |request_id: &str, paused: bool| StartDomainRequest {
        domain: "r1".into(),
        paused,
        request_id: request_id.into(),
        ..Default::default()
    };
    let first = sup
        .client
        .start_domain(start("start-1", false))
        .await
        .unwrap()
        .into_inner()
        .domain
        .unwrap();
    let _guard = QemuGuard(first.pid, first.spec.clone().unwrap().uuid);
    assert_eq!(first.state(), DomainState::Running);
    // The retry: OK, the first call's response (same QEMU).
    let again = sup
        .client
        .start_domain(start("start-1", false))
        .await
        .unwrap()
        .into_inner()
        .domain
        .unwrap();
    assert_eq!(again, first);
    // A plain second start: the domain runs.
    let plain = sup.client.start_domain(start("", false)).await.unwrap_err();
    assert_eq!(plain.code(), Code::FailedPrecondition, "{plain:?}");
    assert_eq!(reason_of(&plain).as_deref(), Some("DOMAIN_ALREADY_RUNNING"));
    // The same id with another request.
    let reused = sup
        .client
        .start_domain(start("start-1", true))
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Code::InvalidArgument, "{reused:?}");
    assert_eq!(reason_of(&reused).as_deref(), Some("REQUEST_ID_REUSED"));
    assert_eq!(violated_fields(&reused), ["request_id"]);
    // grpcurl prints the ErrorInfo of the plain second start.
    let (ok, out) = sup.grpcurl("StartDomain", r#"{"domain":"r1"}"#);
    assert!(!ok, "{out}");
    assert!(out.contains("FailedPrecondition"), "{out}");
    assert!(out.contains("DOMAIN_ALREADY_RUNNING"), "{out}");
    assert!(out.contains("qvirt.dev"), "{out}");
    sup.client
        .destroy_domain(DestroyDomainRequest {
            domain: "r1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn test_a_define_retried_across_a_restart_is_replayed() {
    let mut sup = Sup::start().await;
    let request = DefineDomainRequest {
        request_id: "define-1".into(),
        ..yaml_request(&yaml("kept"))
    };
    let first = sup.define(request.clone()).await.unwrap();
    let undefine = UndefineDomainRequest {
        domain: "gone".into(),
        request_id: "undefine-1".into(),
        ..Default::default()
    };
    sup.define(yaml_request(&yaml("gone"))).await.unwrap();
    sup.client.undefine_domain(undefine.clone()).await.unwrap();
    sup.restart().await;
    // The same Define: the first answer (its generated UUID), not
    // ALREADY_EXISTS.
    let again = sup.define(request.clone()).await.unwrap();
    assert_eq!(again.spec, first.spec);
    // The same Undefine: OK again, not NOT_FOUND.
    sup.client.undefine_domain(undefine).await.unwrap();
    // Without the id, a second define is refused as before.
    let plain = sup.define(yaml_request(&yaml("kept"))).await.unwrap_err();
    assert_eq!(plain.code(), Code::AlreadyExists);
    assert_eq!(reason_of(&plain).as_deref(), Some("DOMAIN_ALREADY_EXISTS"));
    // The id with another spec.
    let other = DefineDomainRequest {
        request_id: "define-1".into(),
        ..yaml_request(&yaml("kept2"))
    };
    let reused = sup.define(other).await.unwrap_err();
    assert_eq!(reason_of(&reused).as_deref(), Some("REQUEST_ID_REUSED"));
}

#[tokio::test(flavor = "multi_thread")]
async fn test_a_define_whose_record_a_crash_lost_is_still_replayed() {
    let mut sup = Sup::start().await;
    let request = DefineDomainRequest {
        request_id: "define-lost".into(),
        ..yaml_request(&yaml("lost"))
    };
    let first = sup.define(request.clone()).await.unwrap();
    // A crash between the definition and the id's own record: the
    // record never reached the state dir.
    sup.restart_then(|state| {
        let records = state.join("requests");
        let mut removed = 0;
        for entry in std::fs::read_dir(&records).unwrap() {
            std::fs::remove_file(entry.unwrap().path()).unwrap();
            removed += 1;
        }
        assert_eq!(removed, 1, "the define's record");
    })
    .await;
    // The retry gets the first answer (its generated UUID), not
    // ALREADY_EXISTS.
    let again = sup.define(request).await.unwrap();
    assert_eq!(again.spec, first.spec);
    // The id with another spec is still a reuse.
    let other = DefineDomainRequest {
        request_id: "define-lost".into(),
        ..yaml_request(&yaml("lost2"))
    };
    let reused = sup.define(other).await.unwrap_err();
    assert_eq!(reason_of(&reused).as_deref(), Some("REQUEST_ID_REUSED"));
    // Another id, or none, for the same name: refused as before.
    for id in ["define-other", ""] {
        let plain = DefineDomainRequest {
            request_id: id.into(),
            ..yaml_request(&yaml("lost"))
        };
        let err = sup.define(plain).await.unwrap_err();
        assert_eq!(err.code(), Code::AlreadyExists, "{id:?}: {err:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn test_a_stale_etag_is_aborted_and_validate_only_writes_nothing() {
    let mut sup = Sup::start().await;
    let first = sup.define(yaml_request(&yaml("e1"))).await.unwrap();
    assert!(!first.etag.is_empty());
    let update = |etag: &str, memory: u32| DefineDomainRequest {
        etag: etag.into(),
        ..yaml_request(&format!("name: e1\nmemory_mib: {memory}\naccel: tcg\n"))
    };
    let second = sup.define(update(&first.etag, 96)).await.unwrap();
    assert_ne!(second.etag, first.etag);
    assert_eq!(sup.get("e1").await.unwrap().etag, second.etag);
    // The first etag is stale now.
    let stale = sup.define(update(&first.etag, 128)).await.unwrap_err();
    assert_eq!(stale.code(), Code::Aborted, "{stale:?}");
    assert_eq!(reason_of(&stale).as_deref(), Some("ETAG_MISMATCH"));
    assert_eq!(sup.get("e1").await.unwrap().spec.unwrap().memory_mib, 96);
    // As grpcurl prints it.
    let body = format!(
        r#"{{"spec":{{"name":"e1","memory_mib":128}},"etag":"{}"}}"#,
        first.etag
    );
    let (ok, out) = sup.grpcurl("DefineDomain", &body);
    assert!(!ok, "{out}");
    assert!(
        out.contains("Aborted") && out.contains("ETAG_MISMATCH"),
        "{out}"
    );
    assert!(out.contains(&second.etag), "current_etag missing: {out}");

    // validate_only: the answer, and nothing on disk.
    let before = (tree(&sup.state), tree(&sup.run));
    let validate = |yaml: &str| DefineDomainRequest {
        validate_only: true,
        allow_update: true,
        ..yaml_request(yaml)
    };
    let would = sup.define(validate(&yaml("v1"))).await.unwrap();
    assert_eq!(would.spec.unwrap().name, "v1");
    let would = sup
        .define(validate("name: e1\nmemory_mib: 200\naccel: tcg\n"))
        .await
        .unwrap();
    assert_eq!(would.spec.unwrap().memory_mib, 200);
    let bad = sup
        .define(validate("name: v2\nmemory_mib: 64\ndisks:\n- path: ''\n"))
        .await
        .unwrap_err();
    assert_eq!(reason_of(&bad).as_deref(), Some("INVALID_SPEC"));
    assert_eq!(violated_fields(&bad), ["disks[0].path"]);
    assert_eq!((tree(&sup.state), tree(&sup.run)), before);
    assert_eq!(sup.get("v1").await.unwrap_err().code(), Code::NotFound);
    assert_eq!(sup.get("e1").await.unwrap().spec.unwrap().memory_mib, 96);
}

#[tokio::test(flavor = "multi_thread")]
async fn test_list_pages_through_250_domains_each_seen_once() {
    let mut sup = Sup::start().await;
    let mut names: Vec<String> = (0..250).map(|i| format!("p{i:03}")).collect();
    // Defined out of order: the list is sorted by name.
    for name in names.iter().rev() {
        sup.define(yaml_request(&yaml(name))).await.unwrap();
    }
    sup.define(yaml_request(&yaml("q-other"))).await.unwrap();
    let list = |page_token: String, prefix: &str| ListDomainsRequest {
        page_size: 100,
        page_token,
        name_prefix: prefix.into(),
        ..Default::default()
    };
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = sup
            .client
            .list_domains(list(token, "p"))
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.domains.len() <= 100);
        seen.extend(page.domains.into_iter().map(|d| d.spec.unwrap().name));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
        // A token is tied to its filter.
        let other = sup
            .client
            .list_domains(list(token.clone(), "q"))
            .await
            .unwrap_err();
        assert_eq!(other.code(), Code::InvalidArgument);
        assert_eq!(violated_fields(&other), ["page_token"]);
    }
    assert_eq!(pages, 3);
    names.sort();
    assert_eq!(seen, names);
    // Default page size 100, and the whole list has 251.
    let first = sup
        .client
        .list_domains(ListDomainsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.domains.len(), 100);
    assert!(!first.next_page_token.is_empty());
    // Garbage and a negative size, as grpcurl prints them.
    let (ok, out) = sup.grpcurl("ListDomains", r#"{"page_token":"not-a-token"}"#);
    assert!(!ok && out.contains("InvalidArgument"), "{out}");
    assert!(
        out.contains("page_token") && out.contains("google.rpc.BadRequest"),
        "{out}"
    );
    let (ok, out) = sup.grpcurl("ListDomains", r#"{"page_size":-1}"#);
    assert!(!ok && out.contains("page_size"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn test_error_paths_carry_error_info_as_grpcurl_prints_it() {
    let mut sup = Sup::start().await;
    sup.define(yaml_request(&yaml("off"))).await.unwrap();
    // (method, body, code as grpcurl prints it, reason, more text).
    let cases = [
        (
            "GetDomain",
            r#"{"domain":"nope"}"#,
            "NotFound",
            "DOMAIN_NOT_FOUND",
            "nope",
        ),
        (
            "GetDomain",
            r#"{"domain":"off","host":"elsewhere"}"#,
            "NotFound",
            "HOST_NOT_FOUND",
            "elsewhere",
        ),
        (
            "GetDomain",
            r#"{"domain":""}"#,
            "InvalidArgument",
            "INVALID_ARGUMENT",
            "BadRequest",
        ),
        (
            "DefineDomain",
            r#"{"spec":{"name":"off","memory_mib":64}}"#,
            "AlreadyExists",
            "DOMAIN_ALREADY_EXISTS",
            "off",
        ),
        (
            "DefineDomain",
            r#"{"spec":{"name":"bad","disks":[{"path":"/i/a.img"},{"path":""}]}}"#,
            "InvalidArgument",
            "INVALID_SPEC",
            "spec.disks[1].path",
        ),
        (
            "DefineDomain",
            r#"{"spec_yaml":"name: y\nbogus: 1\n"}"#,
            "InvalidArgument",
            "INVALID_SPEC",
            "yaml",
        ),
        (
            "ResumeDomain",
            r#"{"domain":"off"}"#,
            "FailedPrecondition",
            "DOMAIN_NOT_RUNNING",
            "off",
        ),
        (
            "DestroyDomain",
            r#"{"domain":"off"}"#,
            "FailedPrecondition",
            "DOMAIN_NOT_RUNNING",
            "off",
        ),
        (
            "StartDomain",
            r#"{"domain":"off","request_id":"bad\u0001id"}"#,
            "InvalidArgument",
            "INVALID_ARGUMENT",
            "request_id",
        ),
        (
            "ShutdownDomain",
            r#"{"domain":"off","timeout":"-1s"}"#,
            "InvalidArgument",
            "INVALID_ARGUMENT",
            "timeout",
        ),
        (
            "MonitorCommand",
            r#"{"domain":"off","command_json":"[]"}"#,
            "InvalidArgument",
            "INVALID_ARGUMENT",
            "command_json",
        ),
        (
            "DefineDomain",
            r#"{"spec":{"name":"off","memory_mib":64},"etag":"0000"}"#,
            "Aborted",
            "ETAG_MISMATCH",
            "current_etag",
        ),
    ];
    for (method, body, code, reason, more) in cases {
        let (ok, out) = sup.grpcurl(method, body);
        assert!(!ok, "{method} {body}: {out}");
        for want in [code, reason, more, "google.rpc.ErrorInfo", "qvirt.dev"] {
            assert!(out.contains(want), "{method} {body}: no {want:?} in {out}");
        }
    }
}
