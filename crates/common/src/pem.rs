//! PEM files named by a config: read with a size bound and checked for
//! certificates that parse, before a service relies on them (the
//! gateway's TLS files, the CA of the fleet's NATS servers).

use std::path::Path;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;

use crate::config::{ConfigError, OthersMay, read_named_file};

/// The largest PEM file read, in bytes.
pub const MAX_PEM_FILE_BYTES: u64 = 1 << 20;

/// Reads a private key file (config key `field`): at most
/// [`MAX_PEM_FILE_BYTES`], and refused if every user may read or write it.
pub fn read_private_key(field: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    read_named_file(field, path, MAX_PEM_FILE_BYTES, OthersMay::Nothing)
}

/// Checks that `pem` (read from `path`, config key `field`) holds at
/// least one certificate and that each parses.
pub fn check_certificates(field: &'static str, path: &Path, pem: &[u8]) -> Result<(), ConfigError> {
    let mut n = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert =
            cert.map_err(|e| ConfigError::invalid_file(field, path, format!("bad PEM: {e}")))?;
        x509_parser::parse_x509_certificate(&cert)
            .map_err(|e| ConfigError::invalid_file(field, path, format!("certificate {n}: {e}")))?;
        n += 1;
    }
    if n == 0 {
        return Err(ConfigError::invalid_file(
            field,
            path,
            "no CERTIFICATE in the file".into(),
        ));
    }
    Ok(())
}

/// Reads and checks a file of certificates (a server's, or a CA bundle
/// that decides whom a service trusts): one every user may write is
/// refused, as anyone could put other certificates in it.
pub fn load_certificates(field: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    let pem = read_named_file(field, path, MAX_PEM_FILE_BYTES, OthersMay::Read)?;
    check_certificates(field, path, &pem)?;
    Ok(pem)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    /// A self-signed certificate, PEM.
    fn certificate() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        rcgen::CertificateParams::new(vec!["ca.test".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap()
            .pem()
    }

    fn file(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn refused(result: Result<Vec<u8>, ConfigError>, reason: &str) {
        let err = result.unwrap_err().to_string();
        assert!(err.contains("tls.ca") && err.contains(reason), "{err}");
    }

    #[test]
    fn test_certificates_load_unless_every_user_may_write_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let pem = certificate();
        for mode in [0o644, 0o600, 0o664] {
            let path = file(dir.path(), "ok.pem", pem.as_bytes(), mode);
            assert_eq!(load_certificates("tls.ca", &path).unwrap(), pem.as_bytes());
        }
        let open = file(dir.path(), "open.pem", pem.as_bytes(), 0o666);
        refused(
            load_certificates("tls.ca", &open),
            "writable by every user (mode 0666)",
        );
    }

    #[test]
    fn test_a_private_key_every_user_may_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o600, 0o640] {
            let path = file(dir.path(), "key.pem", b"KEY", mode);
            assert_eq!(read_private_key("tls.ca", &path).unwrap(), b"KEY");
        }
        for mode in [0o644, 0o602] {
            let path = file(dir.path(), "key.pem", b"KEY", mode);
            refused(
                read_private_key("tls.ca", &path),
                "readable or writable by every user",
            );
        }
    }

    #[test]
    fn test_what_is_no_bounded_file_of_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        refused(
            load_certificates("tls.ca", dir.path()),
            "not a regular file",
        );
        refused(
            load_certificates("tls.ca", &dir.path().join("absent")),
            "No such file",
        );
        let big = vec![b'a'; MAX_PEM_FILE_BYTES as usize + 1];
        refused(
            load_certificates("tls.ca", &file(dir.path(), "big", &big, 0o644)),
            "larger than 1048576 bytes",
        );
        let empty = file(dir.path(), "none.pem", b"no certificate here\n", 0o644);
        refused(load_certificates("tls.ca", &empty), "no CERTIFICATE");
        let torn = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let torn = file(dir.path(), "torn.pem", torn.as_bytes(), 0o644);
        refused(load_certificates("tls.ca", &torn), "certificate 0");
    }
}
