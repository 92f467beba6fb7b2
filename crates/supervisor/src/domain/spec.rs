//! Checking a [`DomainSpec`] and filling its defaults, as the comments in
//! `supervisor.proto` describe them: name rules, a generated (or checked)
//! UUID, memory/vcpus/machine/accel defaults, absolute paths, MAC
//! addresses, port forwards. [`normalize`] is the one entry point; its
//! [`SpecError`] names the field (`disks[1].path`) and maps to
//! INVALID_ARGUMENT.

use std::net::Ipv4Addr;
use std::path::Path;

use qvirt_proto::v1::network_spec::Backend;
use qvirt_proto::v1::{Accel, DiskFormat, DomainSpec, PortForwardProtocol};

use crate::config::DefaultAccel;

/// Default guest RAM, MiB.
pub const DEFAULT_MEMORY_MIB: u64 = 128;
/// Default vCPU count.
pub const DEFAULT_VCPUS: u32 = 1;
/// Default machine type.
pub const DEFAULT_MACHINE: &str = "q35";
/// Longest domain name, bytes.
pub const MAX_NAME_BYTES: usize = 64;
/// Longest virtio-blk serial, bytes.
pub const MAX_SERIAL_BYTES: usize = 20;
/// Most vCPUs accepted (`max_vcpus` in the config may lower it).
pub const MAX_VCPUS: u32 = 1024;
/// Longest path (`kernel`, `initrd`, `serial_log`, `disks[].path`), bytes.
pub const MAX_PATH_BYTES: usize = 1024;
/// Longest kernel command line, bytes.
pub const MAX_CMDLINE_BYTES: usize = 4096;
/// Most `extra_args`.
pub const MAX_EXTRA_ARGS: usize = 128;
/// Longest single extra argument, bytes.
pub const MAX_EXTRA_ARG_BYTES: usize = 4096;
/// Most disks.
pub const MAX_DISKS: usize = 32;
/// Most networks.
pub const MAX_NETWORKS: usize = 16;
/// Most port forwards of one user network.
pub const MAX_PORT_FORWARDS: usize = 32;
/// Most `metadata` entries.
pub const MAX_METADATA_ENTRIES: usize = 32;
/// Longest `metadata` key, bytes (keys are 1 or more of `[A-Za-z0-9._-]`).
pub const MAX_METADATA_KEY_BYTES: usize = 64;
/// Longest `metadata` value, bytes.
pub const MAX_METADATA_VALUE_BYTES: usize = 1024;
/// Longest short field (`machine`, `uuid`, `mac`, `tap.ifname`,
/// `host_address`), bytes: each has a tighter rule of its own, checked
/// after this bound (so no error message quotes a long value).
pub const MAX_SHORT_FIELD_BYTES: usize = 64;
/// Largest stored definition (the normalized spec, protobuf-encoded),
/// bytes.
pub const MAX_DEFINITION_BYTES: usize = 32 * 1024;
/// Longest stored definition as YAML, bytes: what a definition file may
/// hold, less room for its leading comment line.
pub const MAX_STORED_YAML_BYTES: usize = qvirt_proto::yaml::MAX_YAML_BYTES - 128;

/// A spec field that is wrong: the field's path and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid domain spec: {field}: {reason}")]
pub struct SpecError {
    /// The field, e.g. `name`, `disks[0].path`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

fn bad(field: impl Into<String>, reason: impl Into<String>) -> SpecError {
    SpecError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Check a domain name: 1-64 bytes, no '/', no control characters, not
/// "." or "..", and not a UUID in any written form (canonical, 32 hex
/// digits, braced, `urn:uuid:`): domains are found by name or UUID, and a
/// name that reads as another domain's UUID would shadow it.
pub fn check_name(name: &str) -> Result<(), SpecError> {
    if name.is_empty() {
        return Err(bad("name", "is required"));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(bad(
            "name",
            format!("is {} bytes, at most {MAX_NAME_BYTES}", name.len()),
        ));
    }
    if name == "." || name == ".." {
        return Err(bad("name", "must not be \".\" or \"..\""));
    }
    if name.contains('/') {
        return Err(bad("name", "must not contain '/'"));
    }
    if name.chars().any(char::is_control) {
        return Err(bad("name", "must not contain control characters"));
    }
    if uuid::Uuid::try_parse(name).is_ok() {
        return Err(bad(
            "name",
            "must not be a UUID (domains are looked up by name or UUID)",
        ));
    }
    Ok(())
}

/// Refuse a string field longer than `max` bytes.
fn check_len(field: impl FnOnce() -> String, value: &str, max: usize) -> Result<(), SpecError> {
    if value.len() > max {
        return Err(bad(
            field(),
            format!("is {} bytes, at most {max}", value.len()),
        ));
    }
    Ok(())
}

/// Refuse a list field with more than `max` entries.
fn check_count(field: &str, len: usize, max: usize) -> Result<(), SpecError> {
    if len > max {
        return Err(bad(field, format!("has {len} entries, at most {max}")));
    }
    Ok(())
}

/// The size bounds of every string and list field (see the `MAX_*`
/// constants), checked before anything else looks at the values.
pub fn check_sizes(spec: &DomainSpec) -> Result<(), SpecError> {
    let short = MAX_SHORT_FIELD_BYTES;
    check_len(|| "uuid".into(), &spec.uuid, short)?;
    check_len(|| "machine".into(), &spec.machine, short)?;
    for (field, value) in [
        ("kernel", &spec.kernel),
        ("initrd", &spec.initrd),
        ("serial_log", &spec.serial_log),
    ] {
        check_len(|| field.into(), value, MAX_PATH_BYTES)?;
    }
    check_len(|| "cmdline".into(), &spec.cmdline, MAX_CMDLINE_BYTES)?;
    check_count("extra_args", spec.extra_args.len(), MAX_EXTRA_ARGS)?;
    for (i, arg) in spec.extra_args.iter().enumerate() {
        check_len(|| format!("extra_args[{i}]"), arg, MAX_EXTRA_ARG_BYTES)?;
    }
    check_count("disks", spec.disks.len(), MAX_DISKS)?;
    for (i, disk) in spec.disks.iter().enumerate() {
        check_len(|| format!("disks[{i}].path"), &disk.path, MAX_PATH_BYTES)?;
        check_len(|| format!("disks[{i}].serial"), &disk.serial, short)?;
    }
    check_metadata(spec)?;
    check_count("networks", spec.networks.len(), MAX_NETWORKS)?;
    for (i, net) in spec.networks.iter().enumerate() {
        check_len(|| format!("networks[{i}].mac"), &net.mac, short)?;
        match &net.backend {
            Some(Backend::Tap(tap)) => {
                check_len(|| format!("networks[{i}].tap.ifname"), &tap.ifname, short)?;
            }
            Some(Backend::User(user)) => {
                let field = format!("networks[{i}].user.port_forwards");
                check_count(&field, user.port_forwards.len(), MAX_PORT_FORWARDS)?;
                for (j, fwd) in user.port_forwards.iter().enumerate() {
                    check_len(
                        || format!("{field}[{j}].host_address"),
                        &fwd.host_address,
                        short,
                    )?;
                }
            }
            None => {}
        }
    }
    Ok(())
}

/// The bounds of `metadata`: at most [`MAX_METADATA_ENTRIES`] entries,
/// keys 1-[`MAX_METADATA_KEY_BYTES`] bytes of `[A-Za-z0-9._-]`, values at
/// most [`MAX_METADATA_VALUE_BYTES`] without control characters other than
/// tab and newline (values reach hook scripts as YAML or XML text, and XML
/// cannot carry the others).
fn check_metadata(spec: &DomainSpec) -> Result<(), SpecError> {
    check_count("metadata", spec.metadata.len(), MAX_METADATA_ENTRIES)?;
    for (key, value) in &spec.metadata {
        if key.is_empty() || key.len() > MAX_METADATA_KEY_BYTES {
            return Err(bad(
                "metadata",
                format!(
                    "a key is {} bytes, keys are 1-{MAX_METADATA_KEY_BYTES}",
                    key.len()
                ),
            ));
        }
        if !key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(bad(
                "metadata",
                format!("key {key:?} has a character outside [A-Za-z0-9._-]"),
            ));
        }
        let field = || format!("metadata.{key}");
        check_len(field, value, MAX_METADATA_VALUE_BYTES)?;
        if value
            .chars()
            .any(|c| c.is_control() && c != '\t' && c != '\n')
        {
            return Err(bad(
                field(),
                "must not contain control characters other than tab and newline",
            ));
        }
    }
    Ok(())
}

/// Refuse a normalized definition larger than [`MAX_DEFINITION_BYTES`]
/// once encoded (every field may be within its own bound and the whole
/// still too large to store and list).
pub fn check_definition_size(spec: &DomainSpec) -> Result<(), SpecError> {
    let size = prost::Message::encoded_len(spec);
    if size > MAX_DEFINITION_BYTES {
        return Err(bad(
            "spec",
            format!("the definition is {size} bytes encoded, at most {MAX_DEFINITION_BYTES}"),
        ));
    }
    Ok(())
}

/// The definition file's YAML for a normalized `spec`, or why it cannot
/// be stored: one whose YAML would not load again within the YAML bounds
/// (escapes can make it longer than its protobuf form) is refused, so
/// every stored definition loads after a restart.
pub fn stored_yaml(spec: &DomainSpec) -> Result<String, SpecError> {
    let text = spec
        .to_yaml()
        .map_err(|e| qvirt_proto::yaml::error_text(&e));
    let reloads = text.and_then(|text| {
        if text.len() > MAX_STORED_YAML_BYTES {
            return Err(format!(
                "is {} bytes, at most {MAX_STORED_YAML_BYTES}",
                text.len()
            ));
        }
        DomainSpec::from_own_yaml(&text)
            .map(|_| text)
            .map_err(|e| qvirt_proto::yaml::error_text(&e))
    });
    reloads.map_err(|reason| bad("spec", format!("the definition as YAML {reason}")))
}

/// Whether `text` is a UUID in canonical 8-4-4-4-12 form (any case).
pub fn is_canonical_uuid(text: &str) -> bool {
    text.len() == 36
        && text.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

fn check_path(field: &str, path: &str, required: bool) -> Result<(), SpecError> {
    if path.is_empty() {
        return if required {
            Err(bad(field, "is required"))
        } else {
            Ok(())
        };
    }
    if !Path::new(path).is_absolute() {
        return Err(bad(field, format!("{path:?} is not an absolute path")));
    }
    if path.contains('\0') {
        return Err(bad(field, "must not contain NUL"));
    }
    Ok(())
}

fn random_mac() -> String {
    let b = uuid::Uuid::new_v4().into_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

fn check_mac(field: &str, mac: &str) -> Result<String, SpecError> {
    let parts: Vec<&str> = mac.split(':').collect();
    let ok = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()));
    if !ok {
        return Err(bad(
            field,
            format!("{mac:?} is not a MAC address xx:xx:xx:xx:xx:xx"),
        ));
    }
    let first = u8::from_str_radix(parts[0], 16).unwrap_or(1);
    if first & 1 == 1 {
        return Err(bad(field, format!("{mac:?} is a multicast address")));
    }
    Ok(mac.to_ascii_lowercase())
}

/// Check `spec` and fill every default: the stored form of a definition.
/// `default_accel` replaces an unset `accel`.
pub fn normalize(
    mut spec: DomainSpec,
    default_accel: DefaultAccel,
) -> Result<DomainSpec, SpecError> {
    check_sizes(&spec)?;
    check_name(&spec.name)?;
    if spec.uuid.is_empty() {
        spec.uuid = uuid::Uuid::new_v4().hyphenated().to_string();
    } else if is_canonical_uuid(&spec.uuid) {
        spec.uuid = spec.uuid.to_ascii_lowercase();
    } else {
        return Err(bad(
            "uuid",
            format!(
                "{:?} is not a UUID in canonical form (8-4-4-4-12 hex digits)",
                spec.uuid
            ),
        ));
    }
    if spec.memory_mib == 0 {
        spec.memory_mib = DEFAULT_MEMORY_MIB;
    }
    if spec.vcpus == 0 {
        spec.vcpus = DEFAULT_VCPUS;
    }
    if spec.vcpus > MAX_VCPUS {
        return Err(bad(
            "vcpus",
            format!("{} is more than {MAX_VCPUS}", spec.vcpus),
        ));
    }
    if spec.machine.is_empty() {
        spec.machine = DEFAULT_MACHINE.to_owned();
    }
    if !spec
        .machine
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    {
        return Err(bad(
            "machine",
            format!("{:?}: only letters, digits, '.', '-', '_'", spec.machine),
        ));
    }
    match Accel::try_from(spec.accel) {
        Ok(Accel::Unspecified) => {
            spec.accel = match default_accel {
                DefaultAccel::Tcg => Accel::Tcg,
                DefaultAccel::Kvm => Accel::Kvm,
                DefaultAccel::Auto => Accel::Auto,
            } as i32;
        }
        Ok(_) => {}
        Err(_) => return Err(bad("accel", format!("unknown value {}", spec.accel))),
    }
    check_path("kernel", &spec.kernel, false)?;
    check_path("initrd", &spec.initrd, false)?;
    if spec.kernel.is_empty() {
        if !spec.initrd.is_empty() {
            return Err(bad("initrd", "needs `kernel`"));
        }
        if !spec.cmdline.is_empty() {
            return Err(bad("cmdline", "needs `kernel`"));
        }
    }
    check_path("serial_log", &spec.serial_log, false)?;
    for (i, disk) in spec.disks.iter_mut().enumerate() {
        check_path(&format!("disks[{i}].path"), &disk.path, true)?;
        match DiskFormat::try_from(disk.format) {
            Ok(DiskFormat::Unspecified) => disk.format = DiskFormat::Raw as i32,
            Ok(_) => {}
            Err(_) => {
                return Err(bad(
                    format!("disks[{i}].format"),
                    format!("unknown value {}", disk.format),
                ));
            }
        }
        if disk.serial.len() > MAX_SERIAL_BYTES {
            return Err(bad(
                format!("disks[{i}].serial"),
                format!("is {} bytes, at most {MAX_SERIAL_BYTES}", disk.serial.len()),
            ));
        }
        if !disk
            .serial
            .chars()
            .all(|c| c.is_ascii_graphic() && c != ',')
        {
            return Err(bad(
                format!("disks[{i}].serial"),
                "only printable ASCII without spaces or commas",
            ));
        }
    }
    for (i, net) in spec.networks.iter_mut().enumerate() {
        let field = format!("networks[{i}]");
        net.mac = if net.mac.is_empty() {
            random_mac()
        } else {
            check_mac(&format!("{field}.mac"), &net.mac)?
        };
        match &mut net.backend {
            None => return Err(bad(field, "needs a backend: `user` or `tap`")),
            Some(Backend::Tap(tap)) => {
                let ok = !tap.ifname.is_empty()
                    && tap.ifname.len() < 16
                    && tap
                        .ifname
                        .chars()
                        .all(|c| c.is_ascii_graphic() && c != '/' && c != ',' && c != ':');
                if !ok {
                    return Err(bad(
                        format!("{field}.tap.ifname"),
                        format!(
                            "{:?} is not an interface name (1-15 characters)",
                            tap.ifname
                        ),
                    ));
                }
            }
            Some(Backend::User(user)) => {
                for (j, fwd) in user.port_forwards.iter_mut().enumerate() {
                    let f = format!("{field}.user.port_forwards[{j}]");
                    match PortForwardProtocol::try_from(fwd.protocol) {
                        Ok(PortForwardProtocol::Unspecified) => {
                            fwd.protocol = PortForwardProtocol::Tcp as i32;
                        }
                        Ok(_) => {}
                        Err(_) => {
                            return Err(bad(
                                format!("{f}.protocol"),
                                format!("unknown value {}", fwd.protocol),
                            ));
                        }
                    }
                    if fwd.host_address.is_empty() {
                        fwd.host_address = Ipv4Addr::LOCALHOST.to_string();
                    }
                    if fwd.host_address.parse::<Ipv4Addr>().is_err() {
                        return Err(bad(
                            format!("{f}.host_address"),
                            format!("{:?} is not an IPv4 address", fwd.host_address),
                        ));
                    }
                    for (name, port) in
                        [("host_port", fwd.host_port), ("guest_port", fwd.guest_port)]
                    {
                        if !(1..=65535).contains(&port) {
                            return Err(bad(
                                format!("{f}.{name}"),
                                format!("{port} is not 1-65535"),
                            ));
                        }
                    }
                }
            }
        }
    }
    // Strings that reach QEMU's argv (the others are checked above).
    if spec.cmdline.contains('\0') {
        return Err(bad("cmdline", "must not contain NUL"));
    }
    for (i, arg) in spec.extra_args.iter().enumerate() {
        if arg.contains('\0') {
            return Err(bad(format!("extra_args[{i}]"), "must not contain NUL"));
        }
    }
    check_definition_size(&spec)?;
    Ok(spec)
}

/// Refuse a normalized spec asking for more memory or vCPUs than this
/// host allows (`max_memory_mib`, `max_vcpus` in the config), at define
/// time rather than with QEMU's message at start.
pub fn check_host_limits(
    spec: &DomainSpec,
    max_memory_mib: u64,
    max_vcpus: u32,
) -> Result<(), SpecError> {
    if spec.memory_mib > max_memory_mib {
        return Err(bad(
            "memory_mib",
            format!(
                "{} MiB is more than this host allows ({max_memory_mib} MiB, `max_memory_mib`)",
                spec.memory_mib
            ),
        ));
    }
    if spec.vcpus > max_vcpus {
        return Err(bad(
            "vcpus",
            format!(
                "{} is more than this host allows ({max_vcpus}, `max_vcpus`)",
                spec.vcpus
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn parse(yaml: &str) -> DomainSpec {
        DomainSpec::from_yaml(yaml).unwrap()
    }

    #[test]
    fn test_nul_in_argv_strings_is_refused_naming_the_field() {
        let mut spec = parse("name: a\nkernel: /k");
        spec.cmdline = "console=ttyS0\0x".into();
        let err = normalize(spec, DefaultAccel::Tcg).unwrap_err();
        assert_eq!(err.field, "cmdline");
        let mut spec = parse("name: a");
        spec.extra_args = vec!["-a".into(), "b\0".into()];
        assert_eq!(
            normalize(spec, DefaultAccel::Tcg).unwrap_err().field,
            "extra_args[1]"
        );
        let mut spec = parse("name: a");
        spec.disks = vec![qvirt_proto::v1::DiskSpec {
            path: "/d\0.img".into(),
            ..Default::default()
        }];
        assert_eq!(
            normalize(spec, DefaultAccel::Tcg).unwrap_err().field,
            "disks[0].path"
        );
    }

    #[test]
    fn test_uuid_shaped_names_are_refused() {
        for name in [
            "4b9f1a52-3c1e-4f0a-9a57-1d2b3c4d5e6f",
            "4B9F1A52-3C1E-4F0A-9A57-1D2B3C4D5E6F",
            "4b9f1a523c1e4f0a9a571d2b3c4d5e6f",
            "{4b9f1a52-3c1e-4f0a-9a57-1d2b3c4d5e6f}",
            "urn:uuid:4b9f1a52-3c1e-4f0a-9a57-1d2b3c4d5e6f",
        ] {
            let err = check_name(name).expect_err(name);
            assert!(err.reason.contains("UUID"), "{name}: {err}");
        }
        for name in [
            "web-4b9f1a52",
            "4b9f1a52-3c1e-4f0a-9a57-1d2b3c4d5e6",
            "deadbeef",
        ] {
            check_name(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn test_every_string_and_list_field_is_bounded() {
        let long = |n: usize| "x".repeat(n);
        let path = |n: usize| format!("/{}", "p".repeat(n - 1));
        let mut cases: Vec<(DomainSpec, &str)> = Vec::new();
        let base = || parse("name: a\nkernel: /k");
        let mut s = base();
        s.machine = long(MAX_SHORT_FIELD_BYTES + 1);
        cases.push((s, "machine"));
        let mut s = base();
        s.uuid = long(10_000);
        cases.push((s, "uuid"));
        for field in ["kernel", "initrd", "serial_log"] {
            let mut s = base();
            let value = path(MAX_PATH_BYTES + 1);
            match field {
                "kernel" => s.kernel = value,
                "initrd" => s.initrd = value,
                _ => s.serial_log = value,
            }
            cases.push((s, field));
        }
        let mut s = base();
        s.cmdline = long(MAX_CMDLINE_BYTES + 1);
        cases.push((s, "cmdline"));
        let mut s = base();
        s.extra_args = vec!["-a".into(); MAX_EXTRA_ARGS + 1];
        cases.push((s, "extra_args"));
        let mut s = base();
        s.extra_args = vec!["-a".into(), long(MAX_EXTRA_ARG_BYTES + 1)];
        cases.push((s, "extra_args[1]"));
        let disk = |p: String| qvirt_proto::v1::DiskSpec {
            path: p,
            ..Default::default()
        };
        let mut s = base();
        s.disks = vec![disk("/d".into()); MAX_DISKS + 1];
        cases.push((s, "disks"));
        let mut s = base();
        s.disks = vec![disk(path(MAX_PATH_BYTES + 1))];
        cases.push((s, "disks[0].path"));
        let mut s = parse("name: a\nnetworks: [{user: {}}]");
        s.networks = vec![s.networks[0].clone(); MAX_NETWORKS + 1];
        cases.push((s, "networks"));
        let mut s = parse("name: a\nnetworks: [{user: {}}]");
        s.networks[0].mac = long(100_000);
        cases.push((s, "networks[0].mac"));
        let mut s = parse("name: a\nnetworks: [{tap: {ifname: t}}]");
        if let Some(Backend::Tap(tap)) = &mut s.networks[0].backend {
            tap.ifname = long(100_000);
        }
        cases.push((s, "networks[0].tap.ifname"));
        let fwd = "{host_port: 1, guest_port: 2}";
        let many = vec![fwd; MAX_PORT_FORWARDS + 1].join(", ");
        let s = parse(&format!(
            "name: a\nnetworks: [{{user: {{port_forwards: [{many}]}}}}]"
        ));
        cases.push((s, "networks[0].user.port_forwards"));
        let mut s = parse(&format!(
            "name: a\nnetworks: [{{user: {{port_forwards: [{fwd}]}}}}]"
        ));
        if let Some(Backend::User(user)) = &mut s.networks[0].backend {
            user.port_forwards[0].host_address = long(100_000);
        }
        cases.push((s, "networks[0].user.port_forwards[0].host_address"));
        let mut s = base();
        s.metadata = (0..=MAX_METADATA_ENTRIES)
            .map(|i| (format!("k{i}"), "v".into()))
            .collect();
        cases.push((s, "metadata"));
        for key in [String::new(), long(MAX_METADATA_KEY_BYTES + 1)] {
            let mut s = base();
            s.metadata.insert(key, "v".into());
            cases.push((s, "metadata"));
        }
        let mut s = base();
        s.metadata
            .insert("ok".into(), long(MAX_METADATA_VALUE_BYTES + 1));
        cases.push((s, "metadata.ok"));
        for (spec, field) in cases {
            let err = normalize(spec, DefaultAccel::Tcg).expect_err(field);
            assert_eq!(err.field, field, "{err}");
            // No message quotes a long value back.
            assert!(err.to_string().len() < 200, "{err}");
        }
    }

    #[test]
    fn test_metadata_keys_and_values() {
        let mut spec = parse("name: a\nmetadata: {owner: ops, tier.web-1_x: \"a\\tb\\nc <&>\"}");
        spec.metadata.insert(
            "k".repeat(MAX_METADATA_KEY_BYTES),
            "v".repeat(MAX_METADATA_VALUE_BYTES),
        );
        let spec = normalize(spec, DefaultAccel::Tcg).unwrap();
        assert_eq!(spec.metadata["owner"], "ops");
        assert_eq!(spec.metadata["tier.web-1_x"], "a\tb\nc <&>");
        for (key, value, field, reason) in [
            ("a b", "v", "metadata", "outside [A-Za-z0-9._-]"),
            ("k\u{e9}", "v", "metadata", "outside [A-Za-z0-9._-]"),
            ("a/b", "v", "metadata", "outside [A-Za-z0-9._-]"),
            ("k", "bell\u{7}", "metadata.k", "control characters"),
            ("k", "cr\r", "metadata.k", "control characters"),
        ] {
            let mut spec = parse("name: a");
            spec.metadata.insert(key.into(), value.into());
            let err = normalize(spec, DefaultAccel::Tcg).expect_err(key);
            assert_eq!(err.field, field, "{err}");
            assert!(err.reason.contains(reason), "{err}");
        }
    }

    #[test]
    fn test_the_whole_definition_is_bounded() {
        // Each argument within its bound, the whole too large.
        let mut spec = parse("name: a");
        spec.extra_args = vec!["y".repeat(MAX_EXTRA_ARG_BYTES); 9];
        let err = normalize(spec.clone(), DefaultAccel::Tcg).unwrap_err();
        assert_eq!(err.field, "spec");
        assert!(err.reason.contains("at most 32768"), "{err}");
        spec.extra_args.truncate(7);
        normalize(spec, DefaultAccel::Tcg).unwrap();
    }

    #[test]
    fn test_every_accepted_definition_loads_again() {
        let fwd = "{host_port: 1, guest_port: 2}";
        let forwards = vec![fwd; MAX_PORT_FORWARDS].join(", ");
        let nets = vec![format!("{{user: {{port_forwards: [{forwards}]}}}}"); MAX_NETWORKS];
        let mut widest = parse(&format!("name: a\nnetworks: [{}]", nets.join(", ")));
        widest.extra_args = vec!["-a".into(); MAX_EXTRA_ARGS];
        widest.disks = vec![
            qvirt_proto::v1::DiskSpec {
                path: "/d".into(),
                serial: "s".into(),
                ..Default::default()
            };
            MAX_DISKS
        ];
        let spec = normalize(widest, DefaultAccel::Tcg).unwrap();
        let text = stored_yaml(&spec).unwrap();
        assert!(text.len() >= qvirt_proto::yaml::WALK_FREE_BYTES, "walked");
        assert_eq!(DomainSpec::from_yaml(&text).unwrap(), spec);
        // Control characters are escaped 4 to 1 in YAML: small encoded,
        // too long as a file.
        let mut escaped = parse("name: a");
        escaped.extra_args = vec!["\u{1}".repeat(4000); 6];
        let err = stored_yaml(&normalize(escaped, DefaultAccel::Tcg).unwrap()).unwrap_err();
        assert_eq!(err.field, "spec");
        assert!(err.reason.contains("as YAML is"), "{err}");
    }

    #[test]
    fn test_host_limits() {
        let spec = normalize(
            parse("name: a\nmemory_mib: 4096\nvcpus: 4"),
            DefaultAccel::Tcg,
        )
        .unwrap();
        check_host_limits(&spec, 4096, 4).unwrap();
        let err = check_host_limits(&spec, 4095, 4).unwrap_err();
        assert_eq!(err.field, "memory_mib");
        assert!(err.reason.contains("4095 MiB"), "{err}");
        assert_eq!(
            check_host_limits(&spec, 4096, 3).unwrap_err().field,
            "vcpus"
        );
    }

    #[test]
    fn test_defaults_are_filled() {
        let spec = normalize(parse("name: a\nnetworks: [{user: {port_forwards: [{host_port: 2222, guest_port: 22}]}}]\ndisks: [{path: /d.img}]"), DefaultAccel::Tcg).unwrap();
        assert_eq!(spec.memory_mib, 128);
        assert_eq!(spec.vcpus, 1);
        assert_eq!(spec.machine, "q35");
        assert_eq!(spec.accel(), Accel::Tcg);
        assert!(is_canonical_uuid(&spec.uuid), "{}", spec.uuid);
        assert!(spec.networks[0].mac.starts_with("52:54:00:"));
        assert_eq!(spec.disks[0].format(), DiskFormat::Raw);
        let Some(Backend::User(user)) = &spec.networks[0].backend else {
            panic!("user backend")
        };
        assert_eq!(user.port_forwards[0].host_address, "127.0.0.1");
        assert_eq!(user.port_forwards[0].protocol(), PortForwardProtocol::Tcp);
        // Normalizing twice changes nothing.
        assert_eq!(normalize(spec.clone(), DefaultAccel::Kvm).unwrap(), spec);
    }

    #[test]
    fn test_default_accel_comes_from_config_and_explicit_wins() {
        let s = normalize(parse("name: a"), DefaultAccel::Auto).unwrap();
        assert_eq!(s.accel(), Accel::Auto);
        let s = normalize(parse("name: a\naccel: kvm"), DefaultAccel::Tcg).unwrap();
        assert_eq!(s.accel(), Accel::Kvm);
    }

    #[test]
    fn test_given_uuid_is_kept_lowercased() {
        let s = normalize(
            parse("name: a\nuuid: 4B9F1A52-3C1E-4F0A-9A57-1D2B3C4D5E6F"),
            DefaultAccel::Tcg,
        )
        .unwrap();
        assert_eq!(s.uuid, "4b9f1a52-3c1e-4f0a-9a57-1d2b3c4d5e6f");
    }

    #[test]
    fn test_bad_specs_name_the_field() {
        let long = format!("name: {}", "x".repeat(65));
        let cases: Vec<(&str, &str)> = vec![
            ("{}", "name"),
            (&long, "name"),
            ("name: a/b", "name"),
            ("name: \"..\"", "name"),
            ("name: \"a\\tb\"", "name"),
            ("name: a\nuuid: nope", "uuid"),
            ("name: a\nuuid: 4b9f1a523c1e4f0a9a571d2b3c4d5e6f", "uuid"),
            ("name: a\nkernel: vmlinuz", "kernel"),
            ("name: a\ninitrd: /i", "initrd"),
            ("name: a\ncmdline: quiet", "cmdline"),
            ("name: a\nmachine: \"q35,accel=kvm\"", "machine"),
            ("name: a\nvcpus: 5000", "vcpus"),
            ("name: a\ndisks: [{format: qcow2}]", "disks[0].path"),
            (
                "name: a\ndisks: [{path: /a}, {path: rel.img}]",
                "disks[1].path",
            ),
            (
                "name: a\ndisks: [{path: /a, serial: \"a,b\"}]",
                "disks[0].serial",
            ),
            (
                "name: a\ndisks: [{path: /a, serial: 123456789012345678901}]",
                "disks[0].serial",
            ),
            (
                "name: a\nnetworks: [{mac: \"52:54:00:00:00:01\"}]",
                "networks[0]",
            ),
            (
                "name: a\nnetworks: [{user: {}, mac: zz}]",
                "networks[0].mac",
            ),
            (
                "name: a\nnetworks: [{user: {}, mac: \"01:00:00:00:00:01\"}]",
                "networks[0].mac",
            ),
            (
                "name: a\nnetworks: [{tap: {ifname: \"\"}}]",
                "networks[0].tap.ifname",
            ),
            (
                "name: a\nnetworks: [{user: {port_forwards: [{host_port: 0, guest_port: 22}]}}]",
                "networks[0].user.port_forwards[0].host_port",
            ),
            (
                "name: a\nnetworks: [{user: {port_forwards: [{host_port: 1, guest_port: 70000}]}}]",
                "networks[0].user.port_forwards[0].guest_port",
            ),
            (
                "name: a\nnetworks: [{user: {port_forwards: [{host_address: \"::1\", host_port: 1, guest_port: 2}]}}]",
                "networks[0].user.port_forwards[0].host_address",
            ),
            ("name: a\nserial_log: log.txt", "serial_log"),
        ];
        for (yaml, field) in cases {
            let err = normalize(parse(yaml), DefaultAccel::Tcg).expect_err(yaml);
            assert_eq!(err.field, field, "{yaml}: {err}");
            assert!(err.to_string().contains(field), "{err}");
        }
    }
}
