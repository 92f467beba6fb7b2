//! The JSON value model of QEMU's QObject: integers keep their int64 or
//! uint64 identity and doubles stay doubles (no float round trip), and
//! objects remember enough to be written in QDict's member order.

use std::collections::HashMap;

use crate::unicode::to_mod_utf8;

/// A JSON value as QEMU's QObject holds it.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `null`
    Null,
    /// `true` / `false`
    Bool(bool),
    /// An integer that fits int64 (QNUM_I64).
    Int(i64),
    /// An integer above `i64::MAX` that fits uint64 (QNUM_U64).
    UInt(u64),
    /// Any other number (QNUM_DOUBLE), written with `%.17g`.
    Double(f64),
    /// A string; NUL is allowed (QEMU stores it as `\xC0\x80`).
    String(String),
    /// An array.
    Array(Vec<Value>),
    /// An object.
    Object(Dict),
}

impl Value {
    /// The value as an object, if it is one.
    pub fn as_object(&self) -> Option<&Dict> {
        match self {
            Value::Object(d) => Some(d),
            _ => None,
        }
    }

    /// The value as a string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as int64, as QEMU's `qnum_get_try_int` sees it: only
    /// integers that fit int64 (never doubles).
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::Int(i) => Some(i),
            Value::UInt(u) => i64::try_from(u).ok(),
            _ => None,
        }
    }

    /// A short name of the JSON type (for diagnostics).
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Int(_) | Value::UInt(_) | Value::Double(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        }
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::String(s.to_owned())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::String(s)
    }
}

impl From<i64> for Value {
    fn from(i: i64) -> Self {
        Value::Int(i)
    }
}

impl From<u64> for Value {
    fn from(u: u64) -> Self {
        match i64::try_from(u) {
            Ok(i) => Value::Int(i),
            Err(_) => Value::UInt(u),
        }
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}

impl From<Dict> for Value {
    fn from(d: Dict) -> Self {
        Value::Object(d)
    }
}

impl From<Vec<Value>> for Value {
    fn from(v: Vec<Value>) -> Self {
        Value::Array(v)
    }
}

/// Number of QDict hash buckets (`QDICT_BUCKET_MAX`).
const BUCKETS: u32 = 512;

/// The QDict bucket of `key`: the tdb string hash of QEMU's `qdict.c`,
/// modulo 512, over the key's modified-UTF-8 bytes.
pub fn qdict_bucket(key: &str) -> u32 {
    let bytes = to_mod_utf8(key);
    let mut value = 0x238F_13AFu32.wrapping_mul(bytes.len() as u32);
    for (i, &b) in bytes.iter().enumerate() {
        value = value.wrapping_add(u32::from(b) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345) % BUCKETS
}

/// A JSON object. Members are kept in insertion order; [`Dict::iter`]
/// yields them in QDict order (ascending bucket, newest first within a
/// bucket), which is the order qemu-ga writes and checks them in.
#[derive(Debug, Clone, Default)]
pub struct Dict {
    entries: Vec<(String, Value)>,
    index: HashMap<String, usize>,
}

/// Below this many members lookups scan instead of using the index.
const SCAN_LIMIT: usize = 8;

impl PartialEq for Dict {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len()
            && self
                .entries
                .iter()
                .all(|(k, v)| other.get(k).is_some_and(|o| o == v))
    }
}

impl Dict {
    /// An empty object.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no members.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn position(&self, key: &str) -> Option<usize> {
        if self.entries.len() <= SCAN_LIMIT {
            self.entries.iter().position(|(k, _)| k == key)
        } else {
            self.index.get(key).copied()
        }
    }

    /// Whether `key` is a member.
    pub fn contains_key(&self, key: &str) -> bool {
        self.position(key).is_some()
    }

    /// The member `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.position(key).map(|i| &self.entries[i].1)
    }

    /// Adds or replaces a member. As `qdict_put_obj`, replacing keeps the
    /// member's place.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<Value>) {
        let key = key.into();
        let value = value.into();
        if let Some(i) = self.position(&key) {
            self.entries[i].1 = value;
            return;
        }
        self.entries.push((key, value));
        let n = self.entries.len();
        if n > SCAN_LIMIT {
            if n == SCAN_LIMIT + 1 {
                for (i, (k, _)) in self.entries.iter().enumerate() {
                    self.index.insert(k.clone(), i);
                }
            } else {
                self.index.insert(self.entries[n - 1].0.clone(), n - 1);
            }
        }
    }

    /// Moves the value of member `key` out, leaving `null` in its place.
    pub fn take_value(&mut self, key: &str) -> Option<Value> {
        let i = self.position(key)?;
        Some(std::mem::replace(&mut self.entries[i].1, Value::Null))
    }

    /// Members in insertion order.
    pub fn iter_inserted(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Members in QDict order: ascending hash bucket, and within a bucket
    /// the newest first.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        let mut order: Vec<(u32, usize)> = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (qdict_bucket(k), i))
            .collect();
        order.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        order.into_iter().map(|(_, i)| {
            let (k, v) = &self.entries[i];
            (k.as_str(), v)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(d: &Dict) -> Vec<&str> {
        d.iter().map(|(k, _)| k).collect()
    }

    #[test]
    fn test_qdict_order_matches_qemu_ga() {
        let mut d = Dict::new();
        d.insert("return", 1i64);
        d.insert("id", 1i64);
        assert_eq!(keys(&d), ["return", "id"]);
        let mut d = Dict::new();
        d.insert("error", 1i64);
        d.insert("id", 1i64);
        assert_eq!(keys(&d), ["id", "error"]);
        let mut d = Dict::new();
        for k in ["count", "buf-b64", "eof"] {
            d.insert(k, 0i64);
        }
        assert_eq!(keys(&d), ["count", "buf-b64", "eof"]);
        let mut d = Dict::new();
        for k in ["position", "eof"] {
            d.insert(k, 0i64);
        }
        assert_eq!(keys(&d), ["eof", "position"]);
        let mut d = Dict::new();
        for k in ["name", "enabled", "success-response"] {
            d.insert(k, 0i64);
        }
        assert_eq!(keys(&d), ["enabled", "name", "success-response"]);
        let mut d = Dict::new();
        for k in [
            "exited",
            "exitcode",
            "signal",
            "out-data",
            "err-data",
            "out-truncated",
            "err-truncated",
        ] {
            d.insert(k, 0i64);
        }
        assert_eq!(
            keys(&d),
            [
                "exitcode",
                "err-data",
                "out-data",
                "err-truncated",
                "signal",
                "out-truncated",
                "exited"
            ]
        );
    }

    #[test]
    fn test_insert_replaces_in_place_and_index_works() {
        let mut d = Dict::new();
        for i in 0..100i64 {
            d.insert(format!("k{i}"), i);
        }
        d.insert("k5", 500i64);
        assert_eq!(d.len(), 100);
        assert_eq!(d.get("k5"), Some(&Value::Int(500)));
        assert_eq!(d.get("k99"), Some(&Value::Int(99)));
        assert!(!d.contains_key("k100"));
    }
}
