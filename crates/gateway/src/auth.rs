//! Who is calling: bearer tokens (stored as SHA-256 hashes, compared in
//! constant time, replaced on SIGHUP), unix-socket peers, mTLS client
//! certificates ([`crate::tls`]), and the role each gets. A connection
//! that itself says who the caller is (a unix socket, a client
//! certificate) gives a role a token can only lower.
//!
//! Tokens are 256 random bits, so a fast hash is enough: nobody can guess
//! a preimage of a 256-bit random value, with or without a slow hash
//! (slow hashes protect low-entropy passwords from offline guessing).
//!
//! A token's open streams end with UNAUTHENTICATED when a reload removes
//! the token or changes its role or name: each caller holds the token's
//! [`CancellationToken`], which a reload cancels.

use std::io::Read as _;
use std::sync::{Arc, RwLock};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

use crate::config::TokenEntry;
use crate::roles::Role;

/// The longest `authorization` header value looked at, bytes.
pub const MAX_AUTHORIZATION_LEN: usize = 512;

/// How a connection reached the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Plaintext TCP (or a unix `listen` socket): tokens decide.
    Tcp,
    /// TLS on the `listen` port: tokens decide, or with mTLS the client
    /// certificate.
    Tls,
    /// The read-write unix socket.
    UnixRw,
    /// The read-only unix socket.
    UnixRo,
}

impl Transport {
    /// The name in audit lines.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
            Transport::UnixRw => "unix-rw",
            Transport::UnixRo => "unix-ro",
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The principal backends and limits see.
    pub principal: Arc<str>,
    /// What it may do.
    pub role: Role,
    /// Fires when the token it used is revoked (a reload).
    pub revoked: Option<CancellationToken>,
}

/// Why a caller is not authenticated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `authorization: Bearer` header where one is needed.
    #[error("no bearer token: send `authorization: Bearer TOKEN`")]
    Missing,
    /// The header is not `Bearer TOKEN`.
    #[error("the authorization header is not `Bearer TOKEN`")]
    Malformed,
    /// No configured token has this hash.
    #[error("the bearer token is not valid")]
    Unknown,
    /// The client certificate cannot be used (unreadable, too many names,
    /// or missing where mTLS requires one).
    #[error("the client certificate is refused: {0}")]
    Certificate(String),
    /// The client certificate is valid but no `tls.clients` entry names
    /// it.
    #[error("the client certificate ({0}) matches no tls.clients entry")]
    UnmappedCertificate(String),
}

impl AuthError {
    /// Whether the client certificate, not a token, was refused.
    pub fn is_certificate(&self) -> bool {
        matches!(
            self,
            AuthError::Certificate(_) | AuthError::UnmappedCertificate(_)
        )
    }
}

struct Entry {
    hash: [u8; 32],
    name: Arc<str>,
    role: Role,
    revoked: CancellationToken,
}

/// The configured tokens, replaceable at run time.
#[derive(Default)]
pub struct Tokens {
    entries: RwLock<Arc<Vec<Entry>>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tokens(..)")
    }
}

fn parse_hash(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

impl Tokens {
    /// Tokens from checked config entries.
    pub fn new(entries: &[TokenEntry]) -> Self {
        let tokens = Tokens::default();
        tokens.replace(entries);
        tokens
    }

    /// Replaces the tokens; a token removed, or whose name or role
    /// changed, is revoked (its open streams end). Returns how many were
    /// revoked.
    pub fn replace(&self, entries: &[TokenEntry]) -> usize {
        let mut guard = self.entries.write().unwrap_or_else(|p| p.into_inner());
        let old = Arc::clone(&guard);
        let mut kept = vec![false; old.len()];
        let new: Vec<Entry> = entries
            .iter()
            .filter_map(|e| {
                let hash = parse_hash(&e.sha256)?;
                let same = old
                    .iter()
                    .position(|o| o.hash == hash && *o.name == *e.name && o.role == e.role);
                let revoked = match same {
                    Some(i) => {
                        kept[i] = true;
                        old[i].revoked.clone()
                    }
                    None => CancellationToken::new(),
                };
                Some(Entry {
                    hash,
                    name: e.name.as_str().into(),
                    role: e.role,
                    revoked,
                })
            })
            .collect();
        *guard = Arc::new(new);
        drop(guard);
        let mut revoked = 0;
        for (entry, kept) in old.iter().zip(kept) {
            if !kept {
                entry.revoked.cancel();
                revoked += 1;
            }
        }
        revoked
    }

    /// How many tokens are configured.
    pub fn len(&self) -> usize {
        self.snapshot().len()
    }

    /// Whether no token is configured.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn snapshot(&self) -> Arc<Vec<Entry>> {
        Arc::clone(&self.entries.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The caller holding `token`, compared against every entry in
    /// constant time.
    pub fn lookup(&self, token: &str) -> Option<Caller> {
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let entries = self.snapshot();
        let mut found = None;
        for e in entries.iter() {
            if bool::from(e.hash.ct_eq(&hash)) {
                found = Some(Caller {
                    principal: Arc::clone(&e.name),
                    role: e.role,
                    revoked: Some(e.revoked.clone()),
                });
            }
        }
        found
    }
}

/// The token in an `authorization` header value, if it is `Bearer TOKEN`.
pub fn bearer(value: Option<&http::HeaderValue>) -> Result<Option<&str>, AuthError> {
    let Some(value) = value else {
        return Ok(None);
    };
    if value.len() > MAX_AUTHORIZATION_LEN {
        return Err(AuthError::Malformed);
    }
    let text = value.to_str().map_err(|_| AuthError::Malformed)?;
    let (scheme, token) = text.split_once(' ').ok_or(AuthError::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(AuthError::Malformed);
    }
    Ok(Some(token.trim()))
}

/// The caller a unix socket itself authenticates: its role, and
/// `unix:uid:N` from the peer's credentials. `None` for other transports.
pub fn socket_caller(transport: Transport, uid: Option<u32>) -> Option<Caller> {
    let role = match transport {
        Transport::Tcp | Transport::Tls => return None,
        Transport::UnixRw => Role::ReadWrite,
        Transport::UnixRo => Role::ReadOnly,
    };
    Some(Caller {
        principal: match uid {
            Some(uid) => format!("unix:uid:{uid}").into(),
            None => "unix:uid:unknown".into(),
        },
        role,
        revoked: None,
    })
}

/// Who is calling, given its `authorization` header and the caller its
/// connection authenticates (`connection`: a unix socket's peer, an mTLS
/// client certificate's principal), if any. Without one, a token is
/// needed; with one, a token can only lower the role (and names the
/// principal).
pub fn authenticate(
    tokens: &Tokens,
    connection: Option<Caller>,
    authorization: Option<&http::HeaderValue>,
) -> Result<Caller, AuthError> {
    let token = bearer(authorization)?;
    let by_token = token
        .map(|t| tokens.lookup(t).ok_or(AuthError::Unknown))
        .transpose()?;
    match (connection, by_token) {
        (None, Some(caller)) => Ok(caller),
        (None, None) => Err(AuthError::Missing),
        (Some(conn), Some(caller)) => Ok(Caller {
            role: conn.role.min(caller.role),
            ..caller
        }),
        (Some(conn), None) => Ok(conn),
    }
}

/// A fresh random token (256 bits from the kernel, 64 hex digits) and its
/// SHA-256 hash as the config stores it.
pub fn new_token() -> std::io::Result<(String, String)> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    let token = hex::encode(bytes);
    let hash = hash_hex(&token);
    Ok((token, hash))
}

/// The SHA-256 hash of `token` as 64 lowercase hex digits.
pub fn hash_hex(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn entry(name: &str, role: Role, token: &str) -> TokenEntry {
        TokenEntry {
            name: name.into(),
            role,
            sha256: hash_hex(token),
        }
    }

    fn header(v: &str) -> http::HeaderValue {
        http::HeaderValue::from_str(v).unwrap()
    }

    #[test]
    fn test_new_tokens_are_random_and_hash_to_their_entry() {
        let (a, ha) = new_token().unwrap();
        let (b, _) = new_token().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert_eq!(hash_hex(&a), ha);
        assert!(crate::config::check_tokens(&[entry("x", Role::ReadOnly, &a)]).is_ok());
    }

    #[test]
    fn test_tokens_decide_principal_and_role_on_tcp() {
        let tokens = Tokens::new(&[
            entry("ro", Role::ReadOnly, "tok-ro"),
            entry("rw", Role::ReadWrite, "tok-rw"),
        ]);
        let c = authenticate(&tokens, None, Some(&header("Bearer tok-rw"))).unwrap();
        assert_eq!((&*c.principal, c.role), ("rw", Role::ReadWrite));
        let c = authenticate(&tokens, None, Some(&header("bearer tok-ro"))).unwrap();
        assert_eq!((&*c.principal, c.role), ("ro", Role::ReadOnly));
        for (h, want) in [
            (None, AuthError::Missing),
            (Some("Bearer nope"), AuthError::Unknown),
            (Some("Basic tok-rw"), AuthError::Malformed),
            (Some("tok-rw"), AuthError::Malformed),
        ] {
            let h = h.map(header);
            let err = authenticate(&tokens, None, h.as_ref()).unwrap_err();
            assert_eq!(err, want);
        }
    }

    #[test]
    fn test_a_token_on_a_socket_only_lowers_the_role() {
        let tokens = Tokens::new(&[
            entry("ro", Role::ReadOnly, "tok-ro"),
            entry("rw", Role::ReadWrite, "tok-rw"),
        ]);
        let ro = || socket_caller(Transport::UnixRo, Some(1000));
        let rw = || socket_caller(Transport::UnixRw, Some(0));
        assert!(socket_caller(Transport::Tcp, Some(0)).is_none());
        assert!(socket_caller(Transport::Tls, Some(0)).is_none());
        let c = authenticate(&tokens, ro(), None).unwrap();
        assert_eq!((&*c.principal, c.role), ("unix:uid:1000", Role::ReadOnly));
        let c = authenticate(&tokens, ro(), Some(&header("Bearer tok-rw"))).unwrap();
        assert_eq!(c.role, Role::ReadOnly);
        let c = authenticate(&tokens, rw(), Some(&header("Bearer tok-ro"))).unwrap();
        assert_eq!(c.role, Role::ReadOnly);
        let c = authenticate(&tokens, rw(), None).unwrap();
        assert_eq!(c.role, Role::ReadWrite);
        let err = authenticate(&tokens, rw(), Some(&header("Bearer forged"))).unwrap_err();
        assert_eq!(err, AuthError::Unknown);
    }

    #[test]
    fn test_reload_revokes_removed_and_changed_tokens_only() {
        let tokens = Tokens::new(&[
            entry("a", Role::ReadWrite, "tok-a"),
            entry("b", Role::ReadWrite, "tok-b"),
            entry("c", Role::ReadWrite, "tok-c"),
        ]);
        let a = tokens.lookup("tok-a").unwrap().revoked.unwrap();
        let b = tokens.lookup("tok-b").unwrap().revoked.unwrap();
        let c = tokens.lookup("tok-c").unwrap().revoked.unwrap();
        let n = tokens.replace(&[
            entry("a", Role::ReadWrite, "tok-a"),
            entry("c", Role::ReadOnly, "tok-c"),
        ]);
        assert_eq!(n, 2);
        assert!(!a.is_cancelled());
        assert!(b.is_cancelled());
        assert!(c.is_cancelled());
        assert!(tokens.lookup("tok-b").is_none());
        assert_eq!(tokens.lookup("tok-c").unwrap().role, Role::ReadOnly);
    }
}
