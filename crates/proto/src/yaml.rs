//! YAML domain files: the generated [`DomainSpec`] and its nested messages
//! derive serde (see `build.rs`), and this module holds the small adapters
//! those derives name:
//!
//! - enum fields read and write as short lowercase names (`accel: tcg`,
//!   `format: qcow2`, `protocol: udp`) instead of numbers;
//! - a network (hand-written serde for [`NetworkSpec`]) has its backend
//!   (the `backend` oneof) as its own key beside `mac`, as in protobuf's
//!   JSON mapping:
//!   `{user: {port_forwards: [...]}, mac: ...}` or `{tap: {ifname: tap0}}`.
//!
//! Unknown keys are errors carrying line and column. Entry points:
//! [`DomainSpec::from_yaml`] and [`DomainSpec::to_yaml`].
//!
//! Bounds: a document is at most [`MAX_YAML_BYTES`]. YAML aliases (`*a`)
//! repeat their anchor's content, and serde_yaml copies it out for every
//! use, so a small document can expand to gigabytes; before building the
//! spec, a first pass walks the document as serde_yaml expands it, without
//! copying anything, and refuses one that expands past
//! [`MAX_EXPANDED_BYTES`] of scalars or [`MAX_EXPANDED_NODES`] nodes.
//! Aliases that stay within those bounds are accepted.

use std::cell::Cell;

use serde::de::{self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};

use crate::v1::network_spec::Backend;
use crate::v1::{
    Accel, DiskFormat, DomainSpec, NetworkSpec, PortForwardProtocol, TapNetwork, UserNetwork,
};

/// Longest YAML domain document, bytes.
pub const MAX_YAML_BYTES: usize = 64 * 1024;
/// Most scalar bytes a document may hold once its aliases are expanded
/// (the same as its longest text: without aliases, no document reaches it).
pub const MAX_EXPANDED_BYTES: usize = MAX_YAML_BYTES;
/// Most nodes (scalars, sequences, mappings) a document may hold once its
/// aliases are expanded.
pub const MAX_EXPANDED_NODES: usize = 16 * 1024;

impl DomainSpec {
    /// Parses a YAML domain document. Fields left out take their zero value
    /// (the supervisor fills defaults); unknown fields, wrong types and
    /// unknown enum names are errors naming the field, line and column.
    /// A document longer than [`MAX_YAML_BYTES`], or one whose aliases
    /// expand it past [`MAX_EXPANDED_BYTES`] or [`MAX_EXPANDED_NODES`], is
    /// an error before any of it is copied.
    pub fn from_yaml(text: &str) -> Result<DomainSpec, serde_yaml::Error> {
        if text.len() > MAX_YAML_BYTES {
            return Err(de::Error::custom(format_args!(
                "the document is {} bytes, at most {MAX_YAML_BYTES}",
                text.len()
            )));
        }
        let budget = Budget::default();
        serde_yaml::Deserializer::from_str(text).deserialize_any(&budget)?;
        serde_yaml::from_str(text)
    }

    /// Writes the spec as a YAML document that [`DomainSpec::from_yaml`]
    /// reads back to the same value.
    pub fn to_yaml(&self) -> Result<String, serde_yaml::Error> {
        serde_yaml::to_string(self)
    }

    /// [`DomainSpec::from_yaml`] for a document [`DomainSpec::to_yaml`]
    /// wrote, with the same result at less cost. Such a document has no
    /// aliases, and each of its nodes takes at least two bytes of text
    /// (`''`, `[]`, `- x`), so one shorter than [`WALK_FREE_BYTES`] stays
    /// within both expansion bounds and needs no walk; a longer one is
    /// walked as any other.
    pub fn from_own_yaml(text: &str) -> Result<DomainSpec, serde_yaml::Error> {
        if text.len() >= WALK_FREE_BYTES {
            return DomainSpec::from_yaml(text);
        }
        serde_yaml::from_str(text)
    }
}

/// Below this length a document [`DomainSpec::to_yaml`] wrote cannot
/// reach [`MAX_EXPANDED_NODES`] (nor [`MAX_EXPANDED_BYTES`]): at two bytes
/// a node it holds at most half as many, and even at one a byte it would
/// stay within the bound.
pub const WALK_FREE_BYTES: usize = MAX_EXPANDED_NODES;

/// What a document holds once its aliases are expanded, counted by a walk
/// that borrows every scalar from the parser's events (an alias replays its
/// anchor's events; nothing is copied), and stops at the first bound.
#[derive(Debug, Default)]
struct Budget {
    bytes: Cell<usize>,
    nodes: Cell<usize>,
}

impl Budget {
    fn take<E: de::Error>(&self, bytes: usize) -> Result<(), E> {
        let nodes = self.nodes.get() + 1;
        let bytes = self.bytes.get().saturating_add(bytes);
        self.nodes.set(nodes);
        self.bytes.set(bytes);
        if bytes > MAX_EXPANDED_BYTES {
            return Err(E::custom(format_args!(
                "the document expands to more than {MAX_EXPANDED_BYTES} bytes of values \
                 (YAML aliases repeat their anchor's content)"
            )));
        }
        if nodes > MAX_EXPANDED_NODES {
            return Err(E::custom(format_args!(
                "the document expands to more than {MAX_EXPANDED_NODES} values \
                 (YAML aliases repeat their anchor's content)"
            )));
        }
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for &Budget {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

/// Bytes counted for a number, bool or null.
const SCALAR_WORD: usize = 8;

impl<'de> Visitor<'de> for &Budget {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.take(SCALAR_WORD)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.take(SCALAR_WORD)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.take(SCALAR_WORD)
    }

    fn visit_i128<E: de::Error>(self, _: i128) -> Result<(), E> {
        self.take(2 * SCALAR_WORD)
    }

    fn visit_u128<E: de::Error>(self, _: u128) -> Result<(), E> {
        self.take(2 * SCALAR_WORD)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.take(SCALAR_WORD)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.take(v.len())
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<(), E> {
        self.take(v.len())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.take(SCALAR_WORD)
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.take(SCALAR_WORD)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.take(0)?;
        while seq.next_element_seed(self)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.take(0)?;
        while map.next_key_seed(self)?.is_some() {
            map.next_value_seed(self)?;
        }
        Ok(())
    }

    /// A tagged value (`!tag value`): the tag and the value both count.
    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        let ((), variant) = data.variant_seed(self)?;
        de::VariantAccess::newtype_variant_seed(variant, self)
    }
}

/// Longest error text [`error_text`] returns, bytes: serde_yaml quotes
/// unknown keys and values, which a document may make long.
pub const MAX_ERROR_TEXT_BYTES: usize = 1024;

/// The text of a YAML error, always with its place: serde_yaml leaves out
/// "at line 1 column 1" when the error is at the very start of the
/// document; this puts it back. A text longer than
/// [`MAX_ERROR_TEXT_BYTES`] is cut in its middle (the place stays).
pub fn error_text(error: &serde_yaml::Error) -> String {
    let mut text = error.to_string();
    if let Some(loc) = error.location()
        && !text.contains(" at line ")
    {
        text = format!("{text} at line {} column {}", loc.line(), loc.column());
    }
    if text.len() <= MAX_ERROR_TEXT_BYTES {
        return text;
    }
    let half = MAX_ERROR_TEXT_BYTES / 2;
    let mut head = half;
    while !text.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = text.len() - half;
    while !text.is_char_boundary(tail) {
        tail += 1;
    }
    format!("{} ... {}", &text[..head], &text[tail..])
}

/// Defines a `serde(with = ...)` module for an `i32` enum field: the value
/// is written as the enum's protobuf name without its prefix, lowercased.
macro_rules! short_enum_names {
    ($(#[$doc:meta])* $module:ident, $enum:ty, $prefix:literal) => {
        $(#[$doc])*
        pub mod $module {
            use super::*;

            /// The short name of `value` (`"unspecified"` for 0), or the
            /// number itself when it is not a known value.
            pub fn name(value: i32) -> String {
                match <$enum>::try_from(value) {
                    Ok(v) => v
                        .as_str_name()
                        .trim_start_matches($prefix)
                        .to_ascii_lowercase(),
                    Err(_) => value.to_string(),
                }
            }

            /// Every accepted short name.
            pub fn names() -> Vec<String> {
                (0..64)
                    .filter(|v| <$enum>::try_from(*v).is_ok())
                    .map(name)
                    .collect()
            }

            /// Writes the short name.
            pub fn serialize<S: Serializer>(value: &i32, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&name(*value))
            }

            /// Reads a short name (any case). The check runs inside the
            /// YAML scalar's visit, so an error carries line and column.
            pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
                struct NameVisitor;

                impl Visitor<'_> for NameVisitor {
                    type Value = i32;

                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        write!(f, "one of: {}", names().join(", "))
                    }

                    fn visit_str<E: de::Error>(self, text: &str) -> Result<i32, E> {
                        let full = format!("{}{}", $prefix, text.to_ascii_uppercase());
                        match <$enum>::from_str_name(&full) {
                            Some(v) => Ok(v as i32),
                            None => Err(E::custom(format_args!(
                                "unknown value `{text}`, expected one of: {}",
                                names().join(", ")
                            ))),
                        }
                    }
                }

                d.deserialize_str(NameVisitor)
            }
        }
    };
}

short_enum_names!(
    /// `accel: kvm | tcg | auto`.
    accel,
    Accel,
    "ACCEL_"
);
short_enum_names!(
    /// `format: raw | qcow2`.
    disk_format,
    DiskFormat,
    "DISK_FORMAT_"
);
short_enum_names!(
    /// `protocol: tcp | udp`.
    port_forward_protocol,
    PortForwardProtocol,
    "PORT_FORWARD_PROTOCOL_"
);

/// The keys of a network entry.
const NETWORK_FIELDS: &[&str] = &["user", "tap", "mac"];

/// A network entry is a map with one backend key (`user` or `tap`) and an
/// optional `mac`, as protobuf's JSON mapping writes a oneof. Hand-written
/// (the derives cannot put a oneof's variants beside the other fields
/// without losing the unknown-field check); no type is copied.
impl<'de> Deserialize<'de> for NetworkSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct NetworkVisitor;

        impl<'de> Visitor<'de> for NetworkVisitor {
            type Value = NetworkSpec;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a network: a map with `user` or `tap`, and optionally `mac`")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<NetworkSpec, A::Error> {
                let mut spec = NetworkSpec::default();
                let mut seen_mac = false;
                while let Some(key) = map.next_key::<String>()? {
                    let backend = match key.as_str() {
                        "user" => Backend::User(map.next_value::<UserNetwork>()?),
                        "tap" => Backend::Tap(map.next_value::<TapNetwork>()?),
                        "mac" if seen_mac => return Err(de::Error::duplicate_field("mac")),
                        "mac" => {
                            seen_mac = true;
                            spec.mac = map.next_value()?;
                            continue;
                        }
                        other => return Err(de::Error::unknown_field(other, NETWORK_FIELDS)),
                    };
                    if spec.backend.is_some() {
                        return Err(de::Error::custom(
                            "a network has exactly one backend: `user` or `tap`, not both",
                        ));
                    }
                    spec.backend = Some(backend);
                }
                Ok(spec)
            }
        }

        d.deserialize_struct("NetworkSpec", NETWORK_FIELDS, NetworkVisitor)
    }
}

impl Serialize for NetworkSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        match &self.backend {
            Some(Backend::User(user)) => map.serialize_entry("user", user)?,
            Some(Backend::Tap(tap)) => map.serialize_entry("tap", tap)?,
            None => {}
        }
        map.serialize_entry("mac", &self.mac)?;
        map.end()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::v1::{DiskSpec, PortForward};

    const FULL: &str = r#"
name: web1
uuid: 4b9f1a52-3c1e-4f0a-9a57-1d2b3c4d5e6f
memory_mib: 256
vcpus: 2
machine: pc
accel: tcg
kernel: /srv/vmlinuz
initrd: /srv/initrd.gz
cmdline: console=ttyS0
disks:
  - path: /srv/root.qcow2
    format: qcow2
    serial: root
  - path: /srv/seed.img
    read_only: true
networks:
  - user:
      port_forwards:
        - host_port: 2222
          guest_port: 22
        - protocol: udp
          host_address: 0.0.0.0
          host_port: 5353
          guest_port: 53
    mac: "52:54:00:12:34:56"
  - tap:
      ifname: tap0
serial_log: /var/log/web1.serial
agent: true
extra_args: ["-device", "virtio-rng-pci"]
metadata:
  owner: ops
  tier.web-1: "a <b> & c"
"#;

    #[test]
    fn test_full_document_reads_every_field() {
        let spec = DomainSpec::from_yaml(FULL).unwrap();
        assert_eq!(spec.name, "web1");
        assert_eq!(spec.memory_mib, 256);
        assert_eq!(spec.vcpus, 2);
        assert_eq!(spec.accel(), Accel::Tcg);
        assert!(spec.agent);
        assert_eq!(
            spec.disks,
            vec![
                DiskSpec {
                    path: "/srv/root.qcow2".into(),
                    format: DiskFormat::Qcow2 as i32,
                    read_only: false,
                    serial: "root".into(),
                },
                DiskSpec {
                    path: "/srv/seed.img".into(),
                    format: 0,
                    read_only: true,
                    serial: String::new(),
                },
            ]
        );
        assert_eq!(
            spec.networks[0],
            NetworkSpec {
                backend: Some(Backend::User(UserNetwork {
                    port_forwards: vec![
                        PortForward {
                            protocol: 0,
                            host_address: String::new(),
                            host_port: 2222,
                            guest_port: 22,
                        },
                        PortForward {
                            protocol: PortForwardProtocol::Udp as i32,
                            host_address: "0.0.0.0".into(),
                            host_port: 5353,
                            guest_port: 53,
                        },
                    ],
                })),
                mac: "52:54:00:12:34:56".into(),
            }
        );
        assert_eq!(
            spec.networks[1].backend,
            Some(Backend::Tap(TapNetwork {
                ifname: "tap0".into()
            }))
        );
        assert_eq!(spec.extra_args, ["-device", "virtio-rng-pci"]);
        assert_eq!(
            spec.metadata.into_iter().collect::<Vec<_>>(),
            [
                ("owner".to_owned(), "ops".to_owned()),
                ("tier.web-1".to_owned(), "a <b> & c".to_owned())
            ]
        );
    }

    #[test]
    fn test_yaml_round_trips() {
        let spec = DomainSpec::from_yaml(FULL).unwrap();
        let text = spec.to_yaml().unwrap();
        assert!(text.contains("accel: tcg"), "{text}");
        assert!(text.contains("format: qcow2"), "{text}");
        assert!(text.contains("tap:"), "{text}");
        assert_eq!(DomainSpec::from_yaml(&text).unwrap(), spec);
    }

    /// A document `to_yaml` wrote holds at most one node per two bytes,
    /// which lets `from_own_yaml` skip the walk below `WALK_FREE_BYTES`.
    #[test]
    fn test_own_documents_hold_at_most_a_node_per_two_bytes() {
        let mut dense = DomainSpec::from_yaml("name: a").unwrap();
        dense.extra_args = vec![String::new(); 3000];
        dense.metadata = (0..500).map(|i| (i.to_string(), String::new())).collect();
        for spec in [DomainSpec::from_yaml(FULL).unwrap(), dense] {
            let text = spec.to_yaml().unwrap();
            let budget = Budget::default();
            serde_yaml::Deserializer::from_str(&text)
                .deserialize_any(&budget)
                .unwrap();
            let nodes = budget.nodes.get();
            assert!(
                nodes <= text.len() / 2 + 1,
                "{nodes} nodes in {} bytes",
                text.len()
            );
            assert_eq!(DomainSpec::from_own_yaml(&text).unwrap(), spec);
        }
    }

    #[test]
    fn test_good_documents() {
        let cases: &[(&str, fn(&DomainSpec) -> bool)] = &[
            ("name: a", |s| s.name == "a" && s.accel == 0),
            ("name: a\naccel: KVM", |s| s.accel() == Accel::Kvm),
            ("name: a\naccel: auto", |s| s.accel() == Accel::Auto),
            ("name: a\naccel: unspecified", |s| s.accel == 0),
            ("{}", |s| s.name.is_empty()),
            ("name: a\nnetworks: [{}]", |s| {
                s.networks[0].backend.is_none()
            }),
            ("name: a\nnetworks: [{user: {}}]", |s| {
                s.networks[0].backend == Some(Backend::User(UserNetwork::default()))
            }),
            ("name: a\ndisks: [{path: /x, format: raw}]", |s| {
                s.disks[0].format() == DiskFormat::Raw
            }),
        ];
        for (text, check) in cases {
            let spec = DomainSpec::from_yaml(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert!(check(&spec), "{text}: {spec:?}");
        }
    }

    #[test]
    fn test_bad_documents_name_the_problem_and_place() {
        let cases = [
            (
                "name: a\nmemroy_mib: 5\n",
                "unknown field `memroy_mib`",
                Some("line 2"),
            ),
            (
                "name: a\naccel: fast\n",
                "unknown value `fast`, expected one of: unspecified, kvm, tcg, auto",
                Some("line 2"),
            ),
            (
                "name: a\ndisks:\n  - path: /x\n    fromat: raw\n",
                "unknown field `fromat`",
                Some("line 4"),
            ),
            (
                "name: a\ndisks:\n  - path: /x\n    format: vmdk\n",
                "unknown value `vmdk`",
                Some("line 4"),
            ),
            (
                "name: a\nnetworks:\n  - user: {}\n    tap: {ifname: t}\n",
                "exactly one backend",
                Some("line 3"),
            ),
            (
                "name: a\nnetworks:\n  - bridge: br0\n",
                "unknown field `bridge`, expected one of `user`, `tap`, `mac`",
                Some("line 3"),
            ),
            (
                "name: a\nnetworks:\n  - mac: x\n    mac: y\n",
                "duplicate field `mac`",
                Some("line 3"),
            ),
            ("name: a\nnetworks: [5]\n", "a network", Some("line 2")),
            (
                "name: a\nnetworks:\n  - user: {port_forwards: [{host_port: 1, guest_port: 2, proto: tcp}]}\n",
                "unknown field `proto`",
                Some("line 3"),
            ),
            ("name: a\nmemory_mib: lots\n", "memory_mib", Some("line 2")),
            ("name: a\nvcpus: -1\n", "vcpus", Some("line 2")),
            (
                "name: a\nmetadata:\n  k: {v: 1}\n",
                "metadata.k: invalid type: map, expected a string",
                Some("line 3"),
            ),
            ("name: [a\n", "", None),
            ("- a\n- b\n", "struct DomainSpec", None),
        ];
        for (text, want, place) in cases {
            let err = DomainSpec::from_yaml(text).expect_err(text).to_string();
            assert!(err.contains(want), "{text:?}: {err}");
            if let Some(place) = place {
                assert!(err.contains(place), "{text:?}: {err}");
                assert!(err.contains("column"), "{text:?}: {err}");
            }
        }
    }

    #[test]
    fn test_error_at_the_start_still_has_its_place() {
        let err = DomainSpec::from_yaml("nmae: a\n").unwrap_err();
        let text = error_text(&err);
        assert!(text.contains("unknown field `nmae`"), "{text}");
        assert!(text.ends_with("at line 1 column 1"), "{text}");
        let err = DomainSpec::from_yaml("name: a\nnmae: b\n").unwrap_err();
        assert_eq!(error_text(&err), err.to_string());
    }

    #[test]
    fn test_aliases_that_expand_past_the_bound_are_refused_before_copying() {
        // A small document with one large anchor used thousands of times
        // (here 30 KB x 8000 = 240 MB expanded, from 62 KB of text).
        let mut text = format!("name: a\nextra_args: [&a \"{}\"", "x".repeat(30_000));
        text.push_str(&", *a".repeat(8_000));
        text.push_str("]\n");
        assert!(text.len() <= MAX_YAML_BYTES, "{}", text.len());
        let err = error_text(&DomainSpec::from_yaml(&text).unwrap_err());
        assert!(err.contains("expands to more than 65536 bytes"), "{err}");
        assert!(err.contains("aliases"), "{err}");
        // Nested aliases ("billion laughs"): few bytes, many nodes.
        let mut laughs = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..9 {
            let j = i - 1;
            laughs.push_str(&format!(
                "a{i}: &a{i} [{}]\n",
                vec![format!("*a{j}"); 10].join(", ")
            ));
        }
        let err = error_text(&DomainSpec::from_yaml(&laughs).unwrap_err());
        assert!(err.contains("expands to more than 16384 values"), "{err}");
    }

    #[test]
    fn test_aliases_within_the_bound_are_kept() {
        let spec = DomainSpec::from_yaml(
            "name: a\nkernel: &k /srv/vmlinuz\nserial_log: *k\nextra_args: [&d -device, virtio-rng-pci, *d, e1000]\n",
        )
        .unwrap();
        assert_eq!(spec.serial_log, "/srv/vmlinuz");
        assert_eq!(
            spec.extra_args,
            ["-device", "virtio-rng-pci", "-device", "e1000"]
        );
        // Tags pass the first walk; the spec itself decides.
        assert_eq!(DomainSpec::from_yaml("name: !!str b\n").unwrap().name, "b");
    }

    #[test]
    fn test_a_document_past_the_size_bound_is_refused() {
        let text = format!("name: a\ncmdline: \"{}\"\n", "x".repeat(MAX_YAML_BYTES));
        let err = error_text(&DomainSpec::from_yaml(&text).unwrap_err());
        assert!(err.contains("at most 65536"), "{err}");
    }

    #[test]
    fn test_error_text_is_bounded_and_keeps_its_place() {
        let text = format!("name: a\naccel: {}\n", "k".repeat(20_000));
        let err = error_text(&DomainSpec::from_yaml(&text).unwrap_err());
        assert!(err.len() <= MAX_ERROR_TEXT_BYTES + 5, "{}", err.len());
        assert!(err.starts_with("accel: unknown value `kkk"), "{err}");
        assert!(err.ends_with("at line 2 column 8"), "{err}");
    }

    #[test]
    fn test_short_names_list() {
        assert_eq!(accel::names(), ["unspecified", "kvm", "tcg", "auto"]);
        assert_eq!(disk_format::name(2), "qcow2");
        assert_eq!(port_forward_protocol::name(99), "99");
    }
}
