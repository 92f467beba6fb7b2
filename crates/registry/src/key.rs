//! KV keys of the registry.
//!
//! A JetStream KV key may hold `[-/_=.A-Za-z0-9]` only, and `.` separates
//! tokens, so a host id is escaped into one token: ASCII letters, digits,
//! `_` and `-` stand for themselves, every other byte of its UTF-8 becomes
//! `=XX` (upper-case hex), and the empty id is `=-`. The mapping is
//! one-to-one (only the canonical form decodes), like the event subjects'
//! `%XX` escaping.

/// The escape character of keys.
const ESCAPE: u8 = b'=';

/// The key of `host` in `QVIRT_HOSTS`, and the first token of its
/// domains' keys in `QVIRT_DOMAINS`.
pub fn host_key(host: &str) -> String {
    escape(host)
}

/// The host id a `QVIRT_HOSTS` key stands for; `None` if `key` is not a
/// key [`host_key`] makes.
pub fn parse_host_key(key: &str) -> Option<String> {
    unescape(key)
}

/// The key of domain `uuid` of `host` in `QVIRT_DOMAINS`:
/// `host_key(host) + "." + uuid` (a UUID needs no escaping; anything else
/// is escaped the same way).
pub fn domain_key(host: &str, uuid: &str) -> String {
    format!("{}.{}", escape(host), escape(uuid))
}

/// The host id and UUID a `QVIRT_DOMAINS` key stands for; `None` if `key`
/// is not a key [`domain_key`] makes.
pub fn parse_domain_key(key: &str) -> Option<(String, String)> {
    let (host, uuid) = key.split_once('.')?;
    Some((unescape(host)?, unescape(uuid)?))
}

/// The prefix every `QVIRT_DOMAINS` key of `host` starts with (its watch
/// filter is this followed by `>`).
pub fn domain_prefix(host: &str) -> String {
    format!("{}.", escape(host))
}

fn plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

fn escape(s: &str) -> String {
    escape_with(s, ESCAPE)
}

fn unescape(token: &str) -> Option<String> {
    unescape_with(token, ESCAPE)
}

/// `s` as one token of a KV key or NATS subject, with `esc` as the escape
/// character: ASCII letters, digits, `_` and `-` stand for themselves,
/// every other byte becomes `esc` and two upper-case hex digits, and the
/// empty string is `esc` followed by `-`. One-to-one. Keys use `=`, event
/// subjects `%`.
pub fn escape_with(s: &str, esc: u8) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(s.len() + 1);
    if s.is_empty() {
        out.push(char::from(esc));
        out.push('-');
        return out;
    }
    for &b in s.as_bytes() {
        if plain(b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "{}{b:02X}", char::from(esc));
        }
    }
    out
}

/// The string [`escape_with`] made `token` from with `esc`; `None` for a
/// token it never makes (only the canonical form decodes).
pub fn unescape_with(token: &str, esc: u8) -> Option<String> {
    let bytes = token.as_bytes();
    if bytes == [esc, b'-'] {
        return Some(String::new());
    }
    if token.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if plain(b) {
            out.push(b);
            i += 1;
        } else if b == esc {
            let hex = bytes.get(i + 1..i + 3)?;
            if !hex
                .iter()
                .all(|h| h.is_ascii_digit() || (b'A'..=b'F').contains(h))
            {
                return None;
            }
            let v = u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
            // Only the canonical form: a plain byte is never escaped.
            if plain(v) {
                return None;
            }
            out.push(v);
            i += 3;
        } else {
            return None;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    /// What the KV store accepts as a key (async-nats' own check).
    fn valid_kv_key(k: &str) -> bool {
        !k.is_empty()
            && !k.starts_with('.')
            && !k.ends_with('.')
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-/_=.".contains(&b))
    }

    #[test]
    fn test_host_keys() {
        for (host, key) in [
            ("node-a", "node-a"),
            ("host_1", "host_1"),
            ("web.1", "web=2E1"),
            ("", "=-"),
            ("a b", "a=20b"),
            ("=", "=3D"),
            ("é", "=C3=A9"),
            ("a/b", "a=2Fb"),
        ] {
            assert_eq!(host_key(host), key, "{host:?}");
            assert_eq!(parse_host_key(key).as_deref(), Some(host), "{key:?}");
        }
    }

    #[test]
    fn test_non_canonical_keys_do_not_parse() {
        for key in [
            "", "=2e", "=41", "=4", "a=", "a.b", "a b", "=--", "-=-", "=FF",
        ] {
            assert_eq!(parse_host_key(key), None, "{key:?}");
        }
    }

    #[test]
    fn test_domain_keys() {
        let uuid = "0b9f6a2e-1c1d-4b8e-9a57-3f1f6d7c2a10";
        let key = domain_key("web.1", uuid);
        assert_eq!(key, format!("web=2E1.{uuid}"));
        assert!(key.starts_with(&domain_prefix("web.1")));
        assert_eq!(
            parse_domain_key(&key),
            Some(("web.1".to_owned(), uuid.to_owned()))
        );
        assert_eq!(parse_domain_key("web"), None);
        assert_eq!(parse_domain_key("a.b.c"), None);
    }

    proptest! {
        #[test]
        fn test_round_trip_and_valid(host in ".{0,40}", uuid in ".{0,40}") {
            let k = host_key(&host);
            prop_assert!(valid_kv_key(&k));
            prop_assert!(!k.contains('.'));
            prop_assert_eq!(parse_host_key(&k), Some(host.clone()));
            let d = domain_key(&host, &uuid);
            prop_assert!(valid_kv_key(&d));
            prop_assert_eq!(parse_domain_key(&d), Some((host, uuid)));
        }

        #[test]
        fn test_one_to_one(a in ".{0,12}", b in ".{0,12}") {
            prop_assert_eq!(a == b, host_key(&a) == host_key(&b));
        }

        #[test]
        fn test_parse_then_format_is_identity(key in "[-_=.A-Za-z0-9]{0,16}") {
            if let Some(host) = parse_host_key(&key) {
                prop_assert_eq!(host_key(&host), key);
            }
        }
    }
}
