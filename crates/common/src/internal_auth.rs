//! The internal plane's authentication: one shared secret for the
//! deployment, and peer credentials on unix sockets.
//!
//! A backend serves its public services (which users reach through the
//! gateway) wrapped in [`InternalAuth::only`], and its internal methods
//! (the bus's `EventIngest`, the hook executor's) call
//! [`InternalAuth::check`] first. Both accept a caller that (a) presents
//! the secret in [`TOKEN_METADATA`] (compared in constant time), or (b) is
//! connected over a unix socket as uid 0, as the server's own uid, or as a
//! uid listed in the service's `internal_uids`.
//! Anyone else gets UNAUTHENTICATED with the ErrorInfo reason
//! [`REASON_INTERNAL_CALLER_REQUIRED`], and with no secret configured every
//! TCP caller does: secure by default.
//!
//! Clients present the secret with [`TokenInterceptor`]. The secret comes
//! from a file ([`InternalToken::load`]: `internal_token_file` in a
//! service's config, `--internal-token-file` on its command line), which
//! must hold at least [`MIN_TOKEN_BYTES`] bytes of printable text and must
//! not be readable by every user.

use std::convert::Infallible;
use std::fmt;
use std::future::Ready;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use tonic::metadata::AsciiMetadataValue;
use tonic::server::NamedService;
use tonic::service::Interceptor;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Status};

use crate::config::ConfigError;

/// The metadata key in which internal callers present the secret.
pub const TOKEN_METADATA: &str = "x-qvirt-internal-token";

/// `ErrorInfo.reason` of the UNAUTHENTICATED status an internal method
/// answers a caller outside the internal plane (metadata `method`).
pub const REASON_INTERNAL_CALLER_REQUIRED: &str = "INTERNAL_CALLER_REQUIRED";

/// The shortest secret accepted, in bytes (e.g. `openssl rand -hex 32`
/// writes 64).
pub const MIN_TOKEN_BYTES: usize = 32;

/// The longest token file read, in bytes.
pub const MAX_TOKEN_FILE_BYTES: u64 = 4096;

/// The fewest distinct bytes a secret must use: refuses `aaaa...` and
/// other placeholders that are long but guessable.
pub const MIN_DISTINCT_BYTES: usize = 8;

/// The config key (and, with dashes, the flag) naming the token file.
pub const TOKEN_FILE_FIELD: &str = "internal_token_file";

/// The internal secret. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct InternalToken(Arc<str>);

impl fmt::Debug for InternalToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("InternalToken(..)")
    }
}

impl InternalToken {
    /// Reads the secret from `path` ([`read_secret_file`]).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        read_secret_file(path, TOKEN_FILE_FIELD).map(|text| InternalToken(text.into()))
    }

    /// The secret `text`, checked as [`load`](Self::load) checks a file's.
    pub fn from_text(text: &str) -> Result<Self, String> {
        check_secret(text)?;
        Ok(InternalToken(text.into()))
    }

    /// Loads the secret from `path` when one is configured.
    pub fn load_optional(path: Option<&PathBuf>) -> Result<Option<Self>, ConfigError> {
        path.map(|p| Self::load(p)).transpose()
    }

    /// A client interceptor presenting this secret.
    pub fn interceptor(&self) -> TokenInterceptor {
        TokenInterceptor::new(Some(self))
    }

    fn matches(&self, got: &[u8]) -> bool {
        same_secret(self.0.as_bytes(), got)
    }
}

/// Reads a secret from `path` (the value of config key `field`):
/// surrounding whitespace (a trailing newline) is dropped; the rest must
/// pass [`check_secret`], and the file must not be readable or writable
/// by every user. The internal token and the fleet's NATS token are read
/// with it.
pub fn read_secret_file(path: &Path, field: &'static str) -> Result<String, ConfigError> {
    let bytes = crate::config::read_named_file(
        field,
        path,
        MAX_TOKEN_FILE_BYTES,
        crate::config::OthersMay::Nothing,
    )?;
    let invalid = |reason: String| ConfigError::invalid_file(field, path, reason);
    let text = String::from_utf8(bytes).map_err(|e| invalid(format!("is not text: {e}")))?;
    let text = text.trim();
    check_secret(text).map_err(invalid)?;
    Ok(text.to_owned())
}

/// Checks that `text` can be a shared secret: at least
/// [`MIN_TOKEN_BYTES`] printable ASCII bytes without spaces, using at
/// least [`MIN_DISTINCT_BYTES`] distinct ones.
pub fn check_secret(text: &str) -> Result<(), String> {
    if text.len() < MIN_TOKEN_BYTES {
        return Err(format!(
            "holds {} bytes, at least {MIN_TOKEN_BYTES} are needed (e.g. `openssl rand -hex 32`)",
            text.len()
        ));
    }
    if !text.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must be printable ASCII without spaces (it is sent in a header)".into());
    }
    let mut seen = [false; 256];
    text.bytes().for_each(|b| seen[usize::from(b)] = true);
    if seen.iter().filter(|s| **s).count() < MIN_DISTINCT_BYTES {
        return Err(format!(
            "uses fewer than {MIN_DISTINCT_BYTES} distinct characters: not a secret"
        ));
    }
    Ok(())
}

/// Compares two secrets in time that depends only on their lengths.
pub fn same_secret(want: &[u8], got: &[u8]) -> bool {
    want.len() == got.len() && want.iter().zip(got).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// Adds [`TOKEN_METADATA`] to every call when a secret is configured
/// (without one it adds nothing, and internal servers refuse the calls).
/// Its `Debug` never shows the secret.
#[derive(Clone)]
pub struct TokenInterceptor(Option<AsciiMetadataValue>);

impl fmt::Debug for TokenInterceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = if self.0.is_some() { "(..)" } else { "(none)" };
        write!(f, "TokenInterceptor{shown}")
    }
}

impl TokenInterceptor {
    /// An interceptor presenting `token`, if any.
    pub fn new(token: Option<&InternalToken>) -> Self {
        // A checked token is printable ASCII, so it always parses.
        TokenInterceptor(token.and_then(|t| t.0.parse().ok()))
    }
}

impl Interceptor for TokenInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert(TOKEN_METADATA, value.clone());
        }
        Ok(request)
    }
}

/// How an internal caller was recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InternalCaller {
    /// It presented the secret.
    Token,
    /// It is on a unix socket as this uid.
    UnixPeer(u32),
}

/// The server side: which callers of internal methods are accepted.
#[derive(Debug, Clone)]
pub struct InternalAuth {
    token: Option<InternalToken>,
    /// Accepted unix-socket peer uids: 0, the server's own, the configured
    /// ones.
    uids: Arc<[u32]>,
}

impl InternalAuth {
    /// Accepts holders of `token` (if any) and unix-socket peers running as
    /// uid 0, as this process's effective uid, or as one of `extra_uids`.
    pub fn new(token: Option<InternalToken>, extra_uids: &[u32]) -> Self {
        let mut uids = vec![0, effective_uid()];
        uids.extend_from_slice(extra_uids);
        uids.sort_unstable();
        uids.dedup();
        InternalAuth {
            token,
            uids: uids.into(),
        }
    }

    /// Logs (once, at startup) which callers the internal `methods` of
    /// `service` accept.
    pub fn log_policy(&self, methods: &str) {
        let uids = self.uid_list();
        match &self.token {
            Some(_) => tracing::info!(
                methods,
                token = TOKEN_METADATA,
                unix_uids = %uids,
                "internal methods accept callers presenting the internal token, or on a unix socket as one of these uids"
            ),
            None => tracing::warn!(
                methods,
                unix_uids = %uids,
                "no internal_token_file: internal methods refuse every TCP caller and accept only unix-socket peers with these uids"
            ),
        }
    }

    fn uid_list(&self) -> String {
        let list: Vec<String> = self.uids.iter().map(u32::to_string).collect();
        list.join(",")
    }

    /// The caller of internal `method` if it is accepted; otherwise
    /// UNAUTHENTICATED (reason [`REASON_INTERNAL_CALLER_REQUIRED`]) saying
    /// how to get in.
    pub fn check<T>(&self, request: &Request<T>, method: &str) -> Result<InternalCaller, Status> {
        let presented = request.metadata().get(TOKEN_METADATA).map(|v| v.as_bytes());
        let uid = peer_uid(request.extensions().get::<UdsConnectInfo>());
        self.decide(presented, uid)
            .map_err(|why| self.refusal(&format!("{method} is internal"), method, &why))
    }

    /// The caller, from the secret it `presented` and its unix-socket peer
    /// `uid`; otherwise why it is refused.
    fn decide(&self, presented: Option<&[u8]>, uid: Option<u32>) -> Result<InternalCaller, String> {
        if let (Some(token), Some(got)) = (&self.token, presented)
            && token.matches(got)
        {
            return Ok(InternalCaller::Token);
        }
        if let Some(uid) = uid
            && self.uids.contains(&uid)
        {
            return Ok(InternalCaller::UnixPeer(uid));
        }
        Err(match (&self.token, presented, uid) {
            (_, None, Some(uid)) => {
                format!("uid {uid} is not an internal uid ({})", self.uid_list())
            }
            (None, _, _) => "this server has no internal token configured".to_owned(),
            (Some(_), Some(_), _) => format!("the {TOKEN_METADATA} presented is wrong"),
            (Some(_), None, _) => format!("no {TOKEN_METADATA} presented"),
        })
    }

    /// The UNAUTHENTICATED status refusing `method`: `what` leads its
    /// message, `why` ends it.
    fn refusal(&self, what: &str, method: &str, why: &str) -> Status {
        crate::rpc::error(
            tonic::Code::Unauthenticated,
            REASON_INTERNAL_CALLER_REQUIRED,
            format!(
                "{what}: present the internal token or connect over the unix socket as uid {} ({why})",
                self.uid_list()
            ),
            [("method", method.to_owned())],
        )
    }

    /// `service` (a generated tonic server) served to internal callers
    /// only: a backend's public service, which outside callers reach
    /// through the gateway. Every method is checked before the service
    /// sees the call, so a method added later is covered too.
    pub fn only<S>(&self, service: S) -> InternalOnly<S> {
        InternalOnly {
            inner: service,
            auth: self.clone(),
        }
    }

    /// Whether the caller would pass [`check`](Self::check).
    pub fn is_internal<T>(&self, request: &Request<T>) -> bool {
        self.check(request, "").is_ok()
    }
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid(2) takes no arguments, cannot fail and touches no
    // memory of ours.
    unsafe { libc::geteuid() }
}

/// The uid of a unix-socket peer, from its connection info.
fn peer_uid(info: Option<&UdsConnectInfo>) -> Option<u32> {
    info.and_then(|info| info.peer_cred).map(|cred| cred.uid())
}

/// A tonic service that only internal callers reach (see
/// [`InternalAuth::only`]); anyone else gets UNAUTHENTICATED without the
/// call reaching it.
#[derive(Debug, Clone)]
pub struct InternalOnly<S> {
    inner: S,
    auth: InternalAuth,
}

impl<S: NamedService> NamedService for InternalOnly<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower_service::Service<http::Request<B>> for InternalOnly<S>
where
    S: tower_service::Service<
            http::Request<B>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
        >,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Either<S::Future, Ready<Result<Self::Response, Infallible>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let presented = request.headers().get(TOKEN_METADATA).map(|v| v.as_bytes());
        let uid = peer_uid(request.extensions().get::<UdsConnectInfo>());
        match self.auth.decide(presented, uid) {
            Ok(_) => Either::Left(self.inner.call(request)),
            Err(why) => {
                // `/package.Service/Method`
                let method = request.uri().path().trim_start_matches('/');
                let what = format!(
                    "{method} is served here to internal callers only (clients call it through the gateway)"
                );
                let status = self.auth.refusal(&what, method, &why);
                Either::Right(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const GOOD: &str = "0123456789abcdef0123456789abcdef";

    fn file(dir: &Path, text: &str, mode: u32) -> PathBuf {
        let path = dir.join("token");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn test_token_file_checks() {
        let dir = tempfile::tempdir().unwrap();
        let ok = InternalToken::load(&file(dir.path(), &format!("{GOOD}\n"), 0o600)).unwrap();
        assert_eq!(&*ok.0, GOOD);
        assert!(InternalToken::load(&file(dir.path(), GOOD, 0o640)).is_ok());
        let cases = [
            (
                GOOD,
                0o644,
                "readable or writable by every user (mode 0644)",
            ),
            (GOOD, 0o602, "readable or writable by every user"),
            ("", 0o600, "holds 0 bytes"),
            ("0123456789abcdef", 0o600, "holds 16 bytes"),
            (&"ab".repeat(20), 0o600, "fewer than 8 distinct"),
            (
                "0123456789abcdef 0123456789abcdef",
                0o600,
                "printable ASCII",
            ),
        ];
        for (text, mode, want) in cases {
            let err = InternalToken::load(&file(dir.path(), text, mode)).unwrap_err();
            let line = crate::error_chain(&err);
            assert!(line.contains("internal_token_file"), "{line}");
            assert!(line.contains(want), "{text:?} {mode:o}: {line}");
        }
        let err = InternalToken::load(&dir.path().join("absent")).unwrap_err();
        assert!(err.to_string().contains("cannot open"), "{err}");
    }

    #[test]
    fn test_debug_hides_the_secret() {
        let t = InternalToken::from_text(GOOD).unwrap();
        assert!(!format!("{t:?}").contains(GOOD));
        assert!(!format!("{:?}", t.interceptor()).contains(GOOD));
    }

    #[test]
    fn test_check_accepts_the_token_and_refuses_others() {
        let token = InternalToken::from_text(GOOD).unwrap();
        let auth = InternalAuth::new(Some(token.clone()), &[]);
        let mut with = token.interceptor().call(Request::new(())).unwrap();
        assert_eq!(auth.check(&with, "Publish").unwrap(), InternalCaller::Token);
        with.metadata_mut().insert(
            TOKEN_METADATA,
            "0123456789abcdef0123456789abcdeX".parse().unwrap(),
        );
        let err = auth.check(&with, "Publish").unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert_eq!(
            crate::rpc::reason_of(&err).as_deref(),
            Some(REASON_INTERNAL_CALLER_REQUIRED)
        );
        assert!(
            err.message().starts_with("Publish is internal: "),
            "{}",
            err.message()
        );
        assert!(err.message().contains("is wrong"), "{}", err.message());
        let err = auth.check(&Request::new(()), "RunHook").unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert_eq!(
            crate::rpc::reason_of(&err).as_deref(),
            Some(REASON_INTERNAL_CALLER_REQUIRED)
        );
        assert!(
            err.message().contains("no x-qvirt-internal-token"),
            "{}",
            err.message()
        );
        let none = InternalAuth::new(None, &[]);
        let with = token.interceptor().call(Request::new(())).unwrap();
        assert!(none.check(&with, "Publish").is_err());
    }

    /// A stand-in for a generated server: answers 200 and counts calls.
    #[derive(Clone)]
    struct Counted(Arc<std::sync::atomic::AtomicUsize>);

    impl NamedService for Counted {
        const NAME: &'static str = "test.Counted";
    }

    impl tower_service::Service<http::Request<()>> for Counted {
        type Response = http::Response<tonic::body::Body>;
        type Error = Infallible;
        type Future = Ready<Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::future::ready(Ok(http::Response::new(tonic::body::Body::empty())))
        }
    }

    #[tokio::test]
    async fn test_only_lets_internal_callers_reach_the_service() {
        use tower_service::Service as _;

        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let auth = InternalAuth::new(Some(InternalToken::from_text(GOOD).unwrap()), &[]);
        let mut svc = auth.only(Counted(Arc::clone(&calls)));
        assert_eq!(
            <InternalOnly<Counted> as NamedService>::NAME,
            "test.Counted"
        );
        let request = |token: Option<&str>| {
            let mut b = http::Request::builder().uri("/test.Counted/Write");
            if let Some(t) = token {
                b = b.header(TOKEN_METADATA, t);
            }
            b.body(()).unwrap()
        };

        for token in [None, Some("0123456789abcdef0123456789abcdeX")] {
            let refused = svc.call(request(token)).await.unwrap();
            let status = Status::from_header_map(refused.headers()).unwrap();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{token:?}");
            assert!(
                status.message().starts_with(
                    "test.Counted/Write is served here to internal callers only (clients call it through the gateway): "
                ),
                "{}",
                status.message()
            );
            assert_eq!(
                crate::rpc::reason_of(&status).as_deref(),
                Some(REASON_INTERNAL_CALLER_REQUIRED)
            );
        }
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 0);

        let served = svc.call(request(Some(GOOD))).await.unwrap();
        assert!(Status::from_header_map(served.headers()).is_none());
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn test_no_token_interceptor_adds_nothing() {
        let req = TokenInterceptor::new(None).call(Request::new(())).unwrap();
        assert!(req.metadata().get(TOKEN_METADATA).is_none());
    }

    #[test]
    fn test_same_secret() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
        assert!(!same_secret(b"", b"a"));
    }
}
