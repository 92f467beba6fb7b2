//! Config files and the values they share across services.
//!
//! Every service has one `Config` struct with `#[serde(deny_unknown_fields)]`
//! and `#[serde(default)]`; [`load`] reads it from an optional YAML file. The
//! precedence is: built-in defaults, then the file, then command-line flags
//! (see [`crate::cli`]), then the service's own `validate()`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Why a configuration could not be used. Each variant names the file or the
/// field, so the one line a binary prints says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {}", path.display())]
    Read {
        /// The file given with `--config`.
        path: PathBuf,
        /// Why reading failed.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid YAML for this service (syntax, unknown or
    /// mistyped field); the cause carries the line and column.
    #[error("invalid config file {}", path.display())]
    Parse {
        /// The file given with `--config`.
        path: PathBuf,
        /// The YAML error, with its location.
        #[source]
        source: serde_yaml::Error,
    },
    /// A field holds a value the service cannot use.
    #[error("invalid config: {field} = {value:?}: {reason}")]
    Invalid {
        /// The field's name as written in the YAML file.
        field: &'static str,
        /// The offending value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl ConfigError {
    /// [`ConfigError::Invalid`] for the file at `path`, the value of
    /// config key `field`.
    pub fn invalid_file(field: &'static str, path: &Path, reason: String) -> Self {
        ConfigError::Invalid {
            field,
            value: path.display().to_string(),
            reason,
        }
    }
}

/// Loads a service config: `T::default()` when `path` is `None`, else the
/// YAML file at `path` (missing fields take their defaults; unknown fields
/// are an error). An empty file is the same as no file.
pub fn load<T: DeserializeOwned + Default>(path: Option<&Path>) -> Result<T, ConfigError> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text)
}

/// What other users (neither the owner nor the group) may do with a file
/// a config names, checked by [`read_named_file`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OthersMay {
    /// Read it (certificates): refused if every user may write it, as
    /// anyone could put other content in it.
    Read,
    /// Nothing (secrets, private keys): refused if every user may read or
    /// write it; `chmod o-rw` (0600 or 0640) is the fix.
    Nothing,
}

/// Reads the file at `path`, the value of config key `field`: a regular
/// file of at most `max_bytes`, with a mode that gives other users no
/// more than `others` allows. One `fstat` of the open file answers the
/// checks, so they hold for the bytes read.
pub fn read_named_file(
    field: &'static str,
    path: &Path,
    max_bytes: u64,
    others: OthersMay,
) -> Result<Vec<u8>, ConfigError> {
    use std::io::Read as _;
    use std::os::unix::fs::PermissionsExt as _;
    let invalid = |reason: String| ConfigError::invalid_file(field, path, reason);
    let file = std::fs::File::open(path).map_err(|e| invalid(format!("cannot open: {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| invalid(format!("cannot stat: {e}")))?;
    if !meta.is_file() {
        return Err(invalid("is not a regular file".into()));
    }
    let mode = meta.permissions().mode() & 0o777;
    match others {
        OthersMay::Read if mode & 0o002 != 0 => {
            return Err(invalid(format!(
                "is writable by every user (mode {mode:04o}): chmod o-w it"
            )));
        }
        OthersMay::Nothing if mode & 0o006 != 0 => {
            return Err(invalid(format!(
                "is readable or writable by every user (mode {mode:04o}): chmod o-rw it (0600 or 0640)"
            )));
        }
        _ => {}
    }
    let mut bytes = Vec::new();
    file.take(max_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| invalid(format!("cannot read: {e}")))?;
    if bytes.len() as u64 > max_bytes {
        return Err(invalid(format!("is larger than {max_bytes} bytes")));
    }
    Ok(bytes)
}

/// Parses YAML config text; `path` only names the source in errors.
pub fn parse<T: DeserializeOwned + Default>(path: &Path, text: &str) -> Result<T, ConfigError> {
    if text.trim().is_empty() {
        return Ok(T::default());
    }
    serde_yaml::from_str(text).map_err(|source| ConfigError::Parse {
        path: path.to_owned(),
        source,
    })
}

/// Where a gRPC server listens: a TCP socket address, or a unix socket path
/// written `unix:PATH`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ListenAddr {
    /// `IP:PORT`, e.g. `127.0.0.1:50052` or `[::1]:0`.
    Tcp(SocketAddr),
    /// `unix:PATH`; the socket file is created (replacing a stale one) when
    /// the server binds and removed when it stops.
    Unix(PathBuf),
}

impl ListenAddr {
    /// The loopback TCP address on `port`: the default for internal
    /// services.
    pub fn loopback(port: u16) -> Self {
        ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], port)))
    }
}

/// A listen address that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("invalid listen address {0:?}: expected IP:PORT (e.g. 127.0.0.1:50051) or unix:PATH")]
pub struct BadListenAddr(String);

impl FromStr for ListenAddr {
    type Err = BadListenAddr;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() || path.contains('\0') {
                return Err(BadListenAddr(s.to_owned()));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        if let Some(port) = s.strip_prefix("localhost:") {
            let port = port.parse().map_err(|_| BadListenAddr(s.to_owned()))?;
            return Ok(ListenAddr::loopback(port));
        }
        s.parse()
            .map(ListenAddr::Tcp)
            .map_err(|_| BadListenAddr(s.to_owned()))
    }
}

impl TryFrom<String> for ListenAddr {
    type Error = BadListenAddr;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<ListenAddr> for String {
    fn from(a: ListenAddr) -> String {
        a.to_string()
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// This machine's host name (the kernel's), or `localhost` if it has
/// none: the default node name of a supervisor and host id of a bus.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Longest unix socket path a client can dial: `sun_path` holds 108 bytes
/// with the terminating NUL.
pub const MAX_UNIX_SOCKET_PATH_BYTES: usize = 107;

/// The socket path of a `unix:PATH` (or `unix://PATH`) endpoint, as tonic
/// reads it.
fn unix_socket_path(url: &str) -> Option<&str> {
    url.strip_prefix("unix://")
        .or_else(|| url.strip_prefix("unix:"))
}

/// Checks a config field naming another qvirt service's gRPC endpoint: an
/// `http://` or `https://` URL tonic can dial, e.g. `http://127.0.0.1:50053`,
/// or `unix:PATH` for a service listening on a unix socket (the path as
/// the service's `listen: unix:PATH`, at most
/// [`MAX_UNIX_SOCKET_PATH_BYTES`]).
pub fn check_endpoint(field: &'static str, url: &str) -> Result<(), ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid {
        field,
        value: url.to_owned(),
        reason,
    };
    if let Some(path) = unix_socket_path(url) {
        if path.is_empty() || path.contains('\0') {
            return Err(invalid("expected unix:PATH with a socket path".into()));
        }
        if path.len() > MAX_UNIX_SOCKET_PATH_BYTES {
            return Err(invalid(format!(
                "the socket path is {} bytes, more than the {MAX_UNIX_SOCKET_PATH_BYTES} \
                 a unix socket address holds",
                path.len()
            )));
        }
        return Ok(());
    }
    let scheme_ok = url.starts_with("http://") || url.starts_with("https://");
    if scheme_ok && tonic::transport::Endpoint::from_shared(url.to_owned()).is_ok() {
        return Ok(());
    }
    Err(invalid(
        "expected an endpoint URL such as http://127.0.0.1:50053 or unix:/run/qvirt/bus.sock"
            .into(),
    ))
}

/// The client endpoint of a URL that [`check_endpoint`] accepts: TCP for
/// `http(s)://`, a unix socket for `unix:PATH` (tonic's own connector:
/// it connects to the path and sends `:authority` `tonic`, which every
/// HTTP/2 server accepts). Every qvirt client of another qvirt service
/// builds its endpoint here.
pub fn endpoint(url: &str) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
    tonic::transport::Endpoint::from_shared(url.to_owned())
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines for a terminal.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error_chain;

    #[derive(Debug, Default, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Sample {
        listen: Option<ListenAddr>,
        log_format: LogFormat,
        depth: u32,
    }

    #[test]
    fn test_listen_addr_parses_every_form() {
        let cases = [
            ("127.0.0.1:50051", Some(ListenAddr::loopback(50051))),
            ("localhost:7", Some(ListenAddr::loopback(7))),
            ("[::1]:0", Some(ListenAddr::Tcp("[::1]:0".parse().unwrap()))),
            (
                "unix:/run/q.sock",
                Some(ListenAddr::Unix("/run/q.sock".into())),
            ),
            ("unix:", None),
            ("0.0.0.0", None),
            ("example.org:80", None),
            ("127.0.0.1:99999", None),
            ("", None),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<ListenAddr>().ok(), want, "{text}");
        }
    }

    #[test]
    fn test_listen_addr_round_trips_through_display() {
        for text in ["127.0.0.1:1", "[::1]:2", "unix:/tmp/x y.sock"] {
            assert_eq!(text.parse::<ListenAddr>().unwrap().to_string(), text);
        }
    }

    #[test]
    fn test_unknown_field_names_field_line_and_column() {
        let err =
            parse::<Sample>(Path::new("svc.yaml"), "depth: 3\nlisten_adress: x\n").unwrap_err();
        let line = error_chain(&err);
        assert!(line.starts_with("invalid config file svc.yaml: "), "{line}");
        assert!(line.contains("unknown field `listen_adress`"), "{line}");
        assert!(line.contains("line 2 column 1"), "{line}");
    }

    #[test]
    fn test_bad_listen_address_is_named() {
        let err = parse::<Sample>(Path::new("s.yaml"), "listen: nowhere\n").unwrap_err();
        let line = error_chain(&err);
        assert!(
            line.contains("invalid listen address \"nowhere\""),
            "{line}"
        );
    }

    #[test]
    fn test_empty_file_and_no_file_give_defaults() {
        let s: Sample = parse(Path::new("e.yaml"), "  \n").unwrap();
        assert_eq!(s.depth, 0);
        let s: Sample = load(None).unwrap();
        assert_eq!(s.log_format, LogFormat::Text);
    }

    #[test]
    fn test_unreadable_file_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("absent.yaml");
        let err = load::<Sample>(Some(&missing)).unwrap_err();
        let line = error_chain(&err);
        assert!(line.starts_with("cannot read config file "), "{line}");
        assert!(line.contains("absent.yaml"), "{line}");
    }

    #[test]
    fn test_endpoint_urls_are_checked() {
        for good in [
            "http://127.0.0.1:50053",
            "https://bus.example:443",
            "unix:/run/bus.sock",
            "unix:///run/bus.sock",
            "unix:bus.sock",
        ] {
            assert!(check_endpoint("eventbus", good).is_ok(), "{good}");
            assert!(endpoint(good).is_ok(), "{good}");
        }
        let long = format!("unix:/{}", "s".repeat(MAX_UNIX_SOCKET_PATH_BYTES));
        for bad in [
            "127.0.0.1:50053",
            "unix:",
            "unix://",
            "unix:/a\0b",
            &long,
            "http://",
            "",
        ] {
            let err = check_endpoint("eventbus", bad).unwrap_err();
            assert!(
                err.to_string().starts_with("invalid config: eventbus = "),
                "{err}"
            );
        }
    }

    #[test]
    fn test_malformed_yaml_is_a_parse_error() {
        let err = parse::<Sample>(Path::new("m.yaml"), "depth: [1,\n").unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }));
    }
}
