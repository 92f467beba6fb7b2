//! The gateway over TLS and mTLS, as users meet it: certificates made in
//! the test (rcgen), real backends behind a real `qvirt-gateway`, called
//! with real grpcurl (`-cacert -cert -key`).
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use qvirt_integration_tests::pki::{self, Ca, CertFiles};
use qvirt_integration_tests::{
    Service, Token, audit_lines_until, bin_path, code_of, free_port, grpcurl, run,
    start_supervisor, text, token_new, write_internal_token,
};

/// Backends, a CA with server and client certificates, and a gateway
/// serving TLS (mTLS when `mtls`).
struct TlsStack {
    dir: tempfile::TempDir,
    _bus: Service,
    _sup: Service,
    gw: Service,
    ca: Ca,
    ro: CertFiles,
    rw: CertFiles,
    viewer: Token,
    operator: Token,
    audit: PathBuf,
}

impl TlsStack {
    async fn start(mtls: bool) -> TlsStack {
        let dir = tempfile::tempdir().unwrap();
        let mut bus = Service::start("qvirt-eventbus", &[]);
        bus.wait_serving("qvirt.v1.EventBus").await;
        let sup = start_supervisor(
            &dir.path().join("state"),
            &dir.path().join("run"),
            None,
            &["--eventbus", &bus.url()],
        )
        .await;
        let ca = Ca::new(dir.path(), "clients");
        let server = ca.server("server");
        let ro = ca.client("ro", "viewer-host", vec![pki::email("viewer@qvirt.test")]);
        let rw = ca.client(
            "rw",
            "operator-host",
            vec![pki::uri("spiffe://qvirt.test/operator")],
        );
        let viewer = token_new("viewer", "read-only");
        let operator = token_new("operator", "read-write");
        let audit = dir.path().join("audit.log");
        let tls = pki::gateway_tls_yaml(
            &server,
            mtls.then_some(ca.cert.as_path()),
            &[
                ("cert-ro", "read-only", "email", "viewer@qvirt.test"),
                (
                    "cert-rw",
                    "read-write",
                    "uri",
                    "spiffe://qvirt.test/operator",
                ),
            ],
        );
        let yaml = format!(
            "supervisor: {}\neventbus: {}\nagentd: http://127.0.0.1:{}\ninternal_token_file: {}\n\
             audit_file: {}\nhealth_poll_ms: 200\ntokens:\n{}{}{tls}",
            sup.url(),
            bus.url(),
            free_port(),
            write_internal_token(dir.path()).display(),
            audit.display(),
            viewer.entry,
            operator.entry,
        );
        let mut gw = Service::start_with_config("qvirt-gateway", &yaml, &[]);
        let client = mtls.then_some(&rw);
        gw.wait_serving_at(
            "qvirt.v1.Supervisor",
            pki::tls_endpoint(gw.addr, &ca.cert, client),
        )
        .await;
        TlsStack {
            dir,
            _bus: bus,
            _sup: sup,
            gw,
            ca,
            ro,
            rw,
            viewer,
            operator,
            audit,
        }
    }

    /// grpcurl over TLS trusting the CA, presenting `client` if given,
    /// with `token` if given.
    fn grpcurl(
        &self,
        client: Option<&CertFiles>,
        token: Option<&str>,
        data: &str,
        method: &str,
    ) -> Output {
        let ca = self.ca.cert.display().to_string();
        let mut args: Vec<String> = vec![
            "-cacert".into(),
            ca,
            "-max-time".into(),
            "20".into(),
            "-connect-timeout".into(),
            "5".into(),
        ];
        if let Some(c) = client {
            args.extend([
                "-cert".into(),
                c.cert.display().to_string(),
                "-key".into(),
                c.key.display().to_string(),
            ]);
        }
        if let Some(t) = token {
            args.extend(["-H".into(), format!("authorization: Bearer {t}")]);
        }
        args.extend([
            "-d".into(),
            data.into(),
            self.gw.addr.to_string(),
            method.into(),
        ]);
        grpcurl(&args)
    }
}

const LIST: &str = "qvirt.v1.Supervisor/ListDomains";
const DEFINE: &str = "qvirt.v1.Supervisor/DefineDomain";

fn define(name: &str) -> String {
    format!(r#"{{"spec_yaml": "name: {name}\naccel: tcg\n"}}"#)
}

#[tokio::test(flavor = "multi_thread")]
async fn test_mtls_certificates_decide_the_role_and_a_token_only_lowers_it() {
    let s = TlsStack::start(true).await;

    // The read-only certificate (mapped by its email SAN) lists, and is
    // denied a write.
    let out = s.grpcurl(Some(&s.ro), None, "{}", LIST);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = s.grpcurl(Some(&s.ro), None, &define("by-ro"), DEFINE);
    assert_eq!(code_of(&out), "PermissionDenied", "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("cert-ro has read-only"),
        "{}",
        text(&out.stderr)
    );
    // A read-write token does not raise it.
    let out = s.grpcurl(
        Some(&s.ro),
        Some(&s.operator.token),
        &define("by-ro"),
        DEFINE,
    );
    assert_eq!(code_of(&out), "PermissionDenied", "{}", text(&out.stderr));

    // The read-write certificate (mapped by its URI SAN) writes.
    let out = s.grpcurl(Some(&s.rw), None, &define("by-rw"), DEFINE);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // A read-only token lowers it.
    let out = s.grpcurl(
        Some(&s.rw),
        Some(&s.viewer.token),
        &define("by-rw2"),
        DEFINE,
    );
    assert_eq!(code_of(&out), "PermissionDenied", "{}", text(&out.stderr));
    // A forged token is refused, as anywhere.
    let forged = "0".repeat(64);
    let out = s.grpcurl(Some(&s.rw), Some(&forged), "{}", LIST);
    assert_eq!(code_of(&out), "Unauthenticated", "{}", text(&out.stderr));

    let out = s.grpcurl(Some(&s.ro), None, "{}", LIST);
    assert!(text(&out.stdout).contains("by-rw"), "{}", text(&out.stdout));

    // Audit lines say tls and name the certificate's principal.
    let has = |lines: &[serde_json::Value], principal: &str, status: &str| {
        lines.iter().any(|l| {
            l["transport"] == "tls"
                && l["principal"] == principal
                && l["method"] == format!("/{DEFINE}")
                && l["status"] == status
        })
    };
    audit_lines_until(&s.audit, |lines| {
        has(lines, "cert-rw", "OK")
            && has(lines, "cert-ro", "PERMISSION_DENIED")
            && has(lines, "operator", "PERMISSION_DENIED")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn test_mtls_refuses_no_certificate_a_foreign_ca_and_an_unmapped_certificate() {
    let s = TlsStack::start(true).await;

    // No client certificate: the connection is refused in the handshake
    // (grpcurl never gets to make a call), whatever the token.
    let out = s.grpcurl(None, Some(&s.operator.token), "{}", LIST);
    assert!(!out.status.success(), "{}", text(&out.stdout));
    let stderr = text(&out.stderr);
    assert!(
        !stderr.contains("Code: "),
        "refused before any call: {stderr}"
    );
    assert!(stderr.contains("Failed to dial target host"), "{stderr}");

    // A certificate from another CA, even with a mapped name: refused in
    // the handshake.
    let other = Ca::new(s.dir.path(), "other");
    let foreign = other.client(
        "foreign",
        "operator-host",
        vec![pki::uri("spiffe://qvirt.test/operator")],
    );
    let out = s.grpcurl(Some(&foreign), None, "{}", LIST);
    assert!(!out.status.success(), "{}", text(&out.stdout));
    let stderr = text(&out.stderr);
    assert!(
        !stderr.contains("Code: "),
        "refused before any call: {stderr}"
    );
    assert!(stderr.contains("Failed to dial target host"), "{stderr}");
    // The same port answers a certificate it maps.
    let out = s.grpcurl(Some(&s.rw), None, "{}", LIST);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // A certificate of the right CA that no entry maps: UNAUTHENTICATED,
    // naming what the certificate carries, even with a valid token.
    let unmapped =
        s.ca.client("unmapped", "stranger", vec![pki::dns("stranger.test")]);
    for token in [None, Some(s.operator.token.as_str())] {
        let out = s.grpcurl(Some(&unmapped), token, "{}", LIST);
        assert_eq!(code_of(&out), "Unauthenticated", "{}", text(&out.stderr));
        let stderr = text(&out.stderr);
        assert!(stderr.contains("matches no tls.clients entry"), "{stderr}");
        assert!(stderr.contains(r#"cn:"stranger""#), "{stderr}");
        assert!(stderr.contains("UNAUTHENTICATED_CERTIFICATE"), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn test_tls_without_client_ca_authenticates_by_token_and_refuses_plaintext() {
    let s = TlsStack::start(false).await;
    let out = s.grpcurl(None, Some(&s.viewer.token), "{}", LIST);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = s.grpcurl(None, None, "{}", LIST);
    assert_eq!(code_of(&out), "Unauthenticated", "{}", text(&out.stderr));
    // The port speaks only TLS.
    let out = grpcurl(&[
        "-plaintext",
        "-max-time",
        "10",
        "-H",
        &format!("authorization: Bearer {}", s.operator.token),
        &s.gw.addr.to_string(),
        LIST,
    ]);
    assert!(!out.status.success(), "{}", text(&out.stdout));
    assert!(
        !text(&out.stderr).contains("Code: "),
        "{}",
        text(&out.stderr)
    );
    let out = s.grpcurl(None, Some(&s.operator.token), &define("over-tls"), DEFINE);
    assert!(out.status.success(), "{}", text(&out.stderr));
    audit_lines_until(&s.audit, |lines| {
        lines
            .iter()
            .any(|l| l["transport"] == "tls" && l["principal"] == "operator")
    })
    .await;
}

#[test]
fn test_plaintext_beyond_loopback_and_bad_tls_files_stop_the_gateway_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = bin_path("qvirt-gateway");
    let start = |yaml: &str, extra: &[&str]| {
        let config = dir.path().join("gw.yaml");
        std::fs::write(&config, yaml).unwrap();
        let mut args = vec!["--config", config.to_str().unwrap()];
        args.extend_from_slice(extra);
        run(&gateway, &args, Duration::from_secs(30))
    };
    let out = start("listen: 0.0.0.0:0\n", &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("listen"), "{stderr}");
    assert!(stderr.contains("plaintext: true"), "{stderr}");

    let ca = Ca::new(dir.path(), "ca");
    let server = ca.server("server");
    let missing = CertFiles {
        cert: dir.path().join("missing.pem"),
        key: server.key.clone(),
    };
    let swapped = CertFiles {
        cert: server.key.clone(),
        key: server.key.clone(),
    };
    let huge = dir.path().join("huge.pem");
    std::fs::write(&huge, vec![b'A'; 2 << 20]).unwrap();
    let too_big = CertFiles {
        cert: huge,
        key: server.key.clone(),
    };
    for (files, field) in [
        (&missing, "tls.cert_file"),
        (&swapped, "tls.cert_file"),
        (&too_big, "tls.cert_file"),
    ] {
        let out = start(&pki::gateway_tls_yaml(files, None, &[]), &[]);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains(field), "{}", text(&out.stderr));
    }
    // A private key every user may read, a client CA every user may
    // write: refused, naming the file and the fix.
    use std::os::unix::fs::PermissionsExt as _;
    let open_key = dir.path().join("open-key.pem");
    std::fs::copy(&server.key, &open_key).unwrap();
    std::fs::set_permissions(&open_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let open = CertFiles {
        cert: server.cert.clone(),
        key: open_key,
    };
    let out = start(&pki::gateway_tls_yaml(&open, None, &[]), &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("tls.key_file") && stderr.contains("chmod o-rw"),
        "{stderr}"
    );
    let open_ca = dir.path().join("open-ca.pem");
    std::fs::copy(&ca.cert, &open_ca).unwrap();
    std::fs::set_permissions(&open_ca, std::fs::Permissions::from_mode(0o666)).unwrap();
    let yaml = pki::gateway_tls_yaml(&server, Some(&open_ca), &[("x", "read-only", "cn", "x")]);
    let out = start(&yaml, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("tls.client_ca_file") && stderr.contains("writable by every user"),
        "{stderr}"
    );
    // A key that is not the certificate's: the gateway stops before it
    // serves, saying so.
    let other = ca.server("other");
    let mismatched = CertFiles {
        cert: server.cert.clone(),
        key: other.key.clone(),
    };
    let out = start(&pki::gateway_tls_yaml(&mismatched, None, &[]), &[]);
    assert!(!out.status.success(), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("cannot set up TLS"), "{stderr}");
    // mTLS with an entry naming two certificate names.
    let yaml = pki::gateway_tls_yaml(&server, Some(&ca.cert), &[("x", "read-only", "cn", "x")])
        .replace("cn: \"x\"", "cn: x, dns: x.test");
    let out = start(&yaml, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("exactly one of cn, dns, uri, email"),
        "{}",
        text(&out.stderr)
    );
}
