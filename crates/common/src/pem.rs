//! PEM files named by a config: read with a size bound and checked for
//! certificates that parse, before a service relies on them (the
//! gateway's TLS files, the CA of the fleet's NATS servers).

use std::io::Read as _;
use std::path::Path;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;

use crate::config::ConfigError;

/// The largest PEM file read, in bytes.
pub const MAX_PEM_FILE_BYTES: u64 = 1 << 20;

fn invalid(field: &'static str, path: &Path, reason: String) -> ConfigError {
    ConfigError::Invalid {
        field,
        value: path.display().to_string(),
        reason,
    }
}

/// Reads `path` (the value of config key `field`), refusing anything but
/// a regular file and files larger than [`MAX_PEM_FILE_BYTES`].
pub fn read_bounded(field: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    let file = std::fs::File::open(path).map_err(|e| invalid(field, path, e.to_string()))?;
    let meta = file
        .metadata()
        .map_err(|e| invalid(field, path, e.to_string()))?;
    if !meta.is_file() {
        return Err(invalid(field, path, "is not a regular file".into()));
    }
    let mut bytes = Vec::new();
    file.take(MAX_PEM_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| invalid(field, path, e.to_string()))?;
    if bytes.len() as u64 > MAX_PEM_FILE_BYTES {
        return Err(invalid(
            field,
            path,
            format!("larger than {MAX_PEM_FILE_BYTES} bytes"),
        ));
    }
    Ok(bytes)
}

/// Checks that `pem` (read from `path`, config key `field`) holds at
/// least one certificate and that each parses.
pub fn check_certificates(field: &'static str, path: &Path, pem: &[u8]) -> Result<(), ConfigError> {
    let mut n = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| invalid(field, path, format!("bad PEM: {e}")))?;
        x509_parser::parse_x509_certificate(&cert)
            .map_err(|e| invalid(field, path, format!("certificate {n}: {e}")))?;
        n += 1;
    }
    if n == 0 {
        return Err(invalid(field, path, "no CERTIFICATE in the file".into()));
    }
    Ok(())
}

/// Refuses a file every user may write (`path`, config key `field`): a
/// CA bundle that anyone can replace decides whom a service trusts.
pub fn check_not_world_writable(field: &'static str, path: &Path) -> Result<(), ConfigError> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path)
        .map_err(|e| invalid(field, path, e.to_string()))?
        .permissions()
        .mode();
    if mode & 0o002 != 0 {
        return Err(invalid(
            field,
            path,
            format!("is writable by every user (mode {:04o})", mode & 0o777),
        ));
    }
    Ok(())
}

/// Reads and checks a file of certificates (a CA bundle).
pub fn load_certificates(field: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    let pem = read_bounded(field, path)?;
    check_certificates(field, path, &pem)?;
    Ok(pem)
}
