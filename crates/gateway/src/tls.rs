//! TLS on the `listen` port (rustls, accepted on the connection threads
//! of [`crate::serve`]) and mTLS:
//! the PEM files of the `tls` section, read bounded and checked before the
//! gateway binds ([`Material`]), and the mapping from a verified client
//! certificate's subject CN or subject alternative names (DNS, URI, email)
//! to a principal and role ([`ClientMap`]).
//!
//! rustls verifies the client's chain against `client_ca_file` during the
//! handshake (no certificate, or one from another CA: no connection). A
//! verified certificate that no `clients` entry names is UNAUTHENTICATED,
//! call by call, with reason `UNAUTHENTICATED_CERTIFICATE`.

use std::sync::Arc;

use qvirt_common::config::ConfigError;
use qvirt_common::pem::{load_certificates, read_private_key};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
pub use tokio_rustls::TlsAcceptor;
use x509_parser::extensions::GeneralName;

use crate::auth::{AuthError, Caller};
use crate::config::{CertNameKind, ClientCertEntry, MAX_CERT_NAME_LEN, TlsConfig};
use crate::roles::Role;

/// The most names (subject CNs plus subject alternative names) a client
/// certificate may carry; one with more is refused.
pub const MAX_CERT_NAMES: usize = 64;

/// The PEM text of the `tls` files, checked.
#[derive(Clone)]
pub struct Material {
    /// The server's certificate chain.
    pub cert_pem: Vec<u8>,
    /// The server's private key.
    pub key_pem: Vec<u8>,
    /// The client CAs, if mTLS.
    pub client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Material(..)")
    }
}

impl Material {
    /// Reads and checks the files `tls` names.
    pub fn load(tls: &TlsConfig) -> Result<Material, ConfigError> {
        let cert_pem = load_certificates("tls.cert_file", &tls.cert_file)?;
        let key_pem = read_private_key("tls.key_file", &tls.key_file)?;
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            ConfigError::invalid_file(
                "tls.key_file",
                &tls.key_file,
                format!("no private key: {e}"),
            )
        })?;
        let client_ca_pem = tls
            .client_ca_file
            .as_deref()
            .map(|path| load_certificates("tls.client_ca_file", path))
            .transpose()?;
        Ok(Material {
            cert_pem,
            key_pem,
            client_ca_pem,
        })
    }

    /// The TLS acceptor for the `listen` port: HTTP/2 by ALPN, and with
    /// `client_ca_file` a client certificate chaining to it required.
    /// Fails on a key that does not match its certificate.
    pub fn acceptor(&self) -> Result<TlsAcceptor, TlsSetupError> {
        use tokio_rustls::rustls::server::WebPkiClientVerifier;
        use tokio_rustls::rustls::{RootCertStore, ServerConfig};
        let certs = CertificateDer::pem_slice_iter(&self.cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsSetupError(e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem)
            .map_err(|e| TlsSetupError(e.to_string()))?;
        let builder = ServerConfig::builder();
        let builder = match &self.client_ca_pem {
            None => builder.with_no_client_auth(),
            Some(pem) => {
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(pem) {
                    let cert = cert.map_err(|e| TlsSetupError(e.to_string()))?;
                    roots.add(cert).map_err(|e| TlsSetupError(e.to_string()))?;
                }
                let verifier = WebPkiClientVerifier::builder(roots.into())
                    .build()
                    .map_err(|e| TlsSetupError(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| TlsSetupError(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

/// The TLS files do not make a usable server configuration.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsSetupError(String);

/// The names a client certificate carries.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CertNames {
    names: Vec<(CertNameKind, String)>,
}

impl CertNames {
    /// Reads the subject CNs and the DNS, URI and email subject
    /// alternative names of a DER certificate.
    pub fn of(der: &[u8]) -> Result<CertNames, AuthError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| AuthError::Certificate(format!("cannot parse it: {e}")))?;
        let mut names = Vec::new();
        let mut push = |kind, value: &str| {
            if names.len() >= MAX_CERT_NAMES {
                return Err(AuthError::Certificate(format!(
                    "it carries more than {MAX_CERT_NAMES} names"
                )));
            }
            names.push((kind, value.to_owned()));
            Ok(())
        };
        for cn in cert.subject().iter_common_name() {
            if let Ok(cn) = cn.as_str() {
                push(CertNameKind::Cn, cn)?;
            }
        }
        let san = cert
            .subject_alternative_name()
            .map_err(|e| AuthError::Certificate(format!("bad subjectAltName: {e}")))?;
        for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
            match name {
                GeneralName::DNSName(v) => push(CertNameKind::Dns, v)?,
                GeneralName::URI(v) => push(CertNameKind::Uri, v)?,
                GeneralName::RFC822Name(v) => push(CertNameKind::Email, v)?,
                _ => {}
            }
        }
        Ok(CertNames { names })
    }

    fn has(&self, kind: CertNameKind, value: &str) -> bool {
        self.names.iter().any(|(k, v)| *k == kind && v == value)
    }

    /// A short description for errors: at most four names, each cut.
    fn describe(&self) -> String {
        if self.names.is_empty() {
            return "no CN and no DNS, URI or email names".into();
        }
        let mut shown: Vec<String> = self
            .names
            .iter()
            .take(4)
            .map(|(k, v)| {
                let v: String = v.chars().take(64).collect();
                format!("{}:{v:?}", k.as_str())
            })
            .collect();
        if self.names.len() > 4 {
            shown.push(format!("and {} more", self.names.len() - 4));
        }
        shown.join(", ")
    }
}

struct Mapping {
    kind: CertNameKind,
    value: String,
    principal: Arc<str>,
    role: Role,
}

/// `tls.clients`: client certificates to principals and roles.
pub struct ClientMap {
    entries: Vec<Mapping>,
}

impl std::fmt::Debug for ClientMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientMap({} entries)", self.entries.len())
    }
}

impl ClientMap {
    /// The mapping of checked config entries.
    pub fn new(entries: &[ClientCertEntry]) -> Self {
        let entries = entries
            .iter()
            .filter_map(|e| {
                let (kind, value) = e.identity()?;
                (value.len() <= MAX_CERT_NAME_LEN).then(|| Mapping {
                    kind,
                    value: value.to_owned(),
                    principal: e.name.as_str().into(),
                    role: e.role,
                })
            })
            .collect();
        ClientMap { entries }
    }

    /// The caller a verified client certificate (DER, leaf) authenticates:
    /// the first entry whose name the certificate carries.
    pub fn caller(&self, der: &[u8]) -> Result<Caller, AuthError> {
        let names = CertNames::of(der)?;
        self.entries
            .iter()
            .find(|m| names.has(m.kind, &m.value))
            .map(|m| Caller {
                principal: Arc::clone(&m.principal),
                role: m.role,
                revoked: None,
            })
            .ok_or_else(|| AuthError::UnmappedCertificate(names.describe()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn cert(cn: &str, sans: &[&str]) -> Vec<u8> {
        let mut params =
            rcgen::CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn entry(name: &str, role: Role, kind: &str, value: &str) -> ClientCertEntry {
        let mut e = ClientCertEntry {
            name: name.into(),
            role,
            cn: None,
            dns: None,
            uri: None,
            email: None,
        };
        let v = Some(value.to_owned());
        match kind {
            "cn" => e.cn = v,
            "dns" => e.dns = v,
            "uri" => e.uri = v,
            _ => e.email = v,
        }
        e
    }

    #[test]
    fn test_certificate_names_map_to_the_first_matching_entry() {
        let map = ClientMap::new(&[
            entry("by-uri", Role::ReadWrite, "uri", "spiffe://qvirt/ops"),
            entry("by-cn", Role::ReadOnly, "cn", "alice"),
            entry("by-dns", Role::ReadWrite, "dns", "host.example"),
        ]);
        let c = map.caller(&cert("alice", &["host.example"])).unwrap();
        assert_eq!((&*c.principal, c.role), ("by-cn", Role::ReadOnly));
        let c = map.caller(&cert("bob", &["host.example"])).unwrap();
        assert_eq!((&*c.principal, c.role), ("by-dns", Role::ReadWrite));
        let err = map.caller(&cert("carol", &["other.example"])).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, AuthError::UnmappedCertificate(_)), "{text}");
        assert!(text.contains("cn:\"carol\""), "{text}");
    }

    #[test]
    fn test_a_certificate_with_too_many_names_is_refused() {
        let sans: Vec<String> = (0..MAX_CERT_NAMES + 1)
            .map(|i| format!("h{i}.example"))
            .collect();
        let sans: Vec<&str> = sans.iter().map(String::as_str).collect();
        let map = ClientMap::new(&[entry("x", Role::ReadOnly, "cn", "x")]);
        let err = map.caller(&cert("x", &sans)).unwrap_err();
        assert!(matches!(err, AuthError::Certificate(_)), "{err}");
        assert!(map.caller(b"not a certificate").is_err());
    }
}
