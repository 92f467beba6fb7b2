//! Test certificates made with rcgen: a CA, a server certificate for
//! `localhost` and 127.0.0.1, and client certificates, written as PEM
//! files; and tonic TLS endpoints that use them.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

/// A certificate authority whose certificate is a PEM file.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    dir: PathBuf,
    /// The CA's certificate.
    pub cert: PathBuf,
}

fn write(path: PathBuf, text: &str) -> PathBuf {
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

/// A private key file, which only its owner may read (the gateway
/// refuses one that every user may).
fn write_key(path: PathBuf, text: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let path = write(path, text);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
    path
}

impl Ca {
    /// A fresh CA named `name`, its files under `dir`.
    pub fn new(dir: &Path, name: &str) -> Ca {
        let key = KeyPair::generate().expect("a CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("the CA certificate");
        let path = write(dir.join(format!("{name}-ca.pem")), &cert.pem());
        Ca {
            issuer: Issuer::new(params, key),
            dir: dir.to_owned(),
            cert: path,
        }
    }

    fn issue(
        &self,
        file: &str,
        cn: &str,
        sans: Vec<SanType>,
        usages: Vec<ExtendedKeyUsagePurpose>,
    ) -> CertFiles {
        let key = KeyPair::generate().expect("a key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.subject_alt_names = sans;
        params.extended_key_usages = usages;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(&key, &self.issuer).expect("a certificate");
        CertFiles {
            cert: write(self.dir.join(format!("{file}.pem")), &cert.pem()),
            key: write_key(
                self.dir.join(format!("{file}-key.pem")),
                &key.serialize_pem(),
            ),
        }
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    pub fn server(&self, file: &str) -> CertFiles {
        self.issue(
            file,
            "localhost",
            Self::loopback(),
            vec![ExtendedKeyUsagePurpose::ServerAuth],
        )
    }

    /// A certificate for `localhost` and 127.0.0.1 that serves and also
    /// dials as a client: what a NATS server presents on the routes of a
    /// cluster, where each side of a route checks the other's.
    pub fn peer(&self, file: &str) -> CertFiles {
        self.issue(
            file,
            "localhost",
            Self::loopback(),
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )
    }

    fn loopback() -> Vec<SanType> {
        vec![
            SanType::DnsName("localhost".try_into().expect("a DNS name")),
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        ]
    }

    /// A client certificate with subject CN `cn` and these subject
    /// alternative names.
    pub fn client(&self, file: &str, cn: &str, sans: Vec<SanType>) -> CertFiles {
        self.issue(file, cn, sans, vec![ExtendedKeyUsagePurpose::ClientAuth])
    }
}

/// A `SanType::URI` for [`Ca::client`].
pub fn uri(text: &str) -> SanType {
    SanType::URI(text.try_into().expect("an IA5 URI"))
}

/// A `SanType::DnsName` for [`Ca::client`].
pub fn dns(text: &str) -> SanType {
    SanType::DnsName(text.try_into().expect("an IA5 DNS name"))
}

/// A `SanType::Rfc822Name` for [`Ca::client`].
pub fn email(text: &str) -> SanType {
    SanType::Rfc822Name(text.try_into().expect("an IA5 email"))
}

/// A TLS endpoint for `addr` trusting `ca`, presenting `client` if given.
pub fn tls_endpoint(addr: SocketAddr, ca: &Path, client: Option<&CertFiles>) -> Endpoint {
    let read = |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(ca)))
        .domain_name("localhost");
    if let Some(c) = client {
        tls = tls.identity(Identity::from_pem(read(&c.cert), read(&c.key)));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .expect("an https URL")
        .tls_config(tls)
        .expect("a TLS config")
}

/// The gateway's `tls:` config section: `server`'s certificate and key,
/// and with `client_ca` mTLS mapping each `(principal, role, kind,
/// value)` of `clients` (`kind`: `cn`, `dns`, `uri` or `email`).
pub fn gateway_tls_yaml(
    server: &CertFiles,
    client_ca: Option<&Path>,
    clients: &[(&str, &str, &str, &str)],
) -> String {
    let mut yaml = format!(
        "tls:\n  cert_file: {}\n  key_file: {}\n",
        server.cert.display(),
        server.key.display()
    );
    if let Some(ca) = client_ca {
        yaml.push_str(&format!("  client_ca_file: {}\n  clients:\n", ca.display()));
        for (name, role, kind, value) in clients {
            yaml.push_str(&format!(
                "    - {{name: {name}, role: {role}, {kind}: \"{value}\"}}\n"
            ));
        }
    }
    yaml
}
