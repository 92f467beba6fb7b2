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
/// Most vCPUs accepted.
pub const MAX_VCPUS: u32 = 1024;

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
/// "." or "..".
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
    Ok(())
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
    Ok(spec)
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
