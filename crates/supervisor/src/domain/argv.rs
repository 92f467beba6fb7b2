//! QEMU's command line for a (normalized) domain spec, without the monitor
//! arguments (the launcher adds those and `-S`).
//!
//! Fixed part: `-name guest=NAME -uuid U -machine M -accel A -m N -smp N
//! -display none -nodefaults -no-user-config -no-shutdown`. `-no-shutdown`
//! keeps QEMU alive when the guest powers off, as libvirt does: the
//! supervisor sees the SHUTDOWN event and then either quits QEMU (a normal
//! shutdown) or resets and resumes the guest (an ACPI reboot).
//! With the sandbox on, `-sandbox on,obsolete=deny,elevateprivileges=deny,
//! spawn=deny,resourcecontrol=deny` (libvirt's set).
//! Then kernel/initrd/append, disks (virtio-blk, explicit format, read-only,
//! serial), NICs (virtio-net on user backends, or on tap devices the
//! supervisor opened, by fd), the serial log (an
//! fd the supervisor opened, through `-add-fd` and `/dev/fdset/N`, in
//! append mode), the guest agent channel (a listening socket the
//! supervisor bound, by fd), `-incoming defer` for a restore, and finally
//! the operator's `extra_args`.
//!
//! Values embedded in QEMU option strings have their commas doubled
//! (QEMU's escape), so a path cannot inject options.

use std::ffi::OsString;
use std::os::fd::RawFd;

use qvirt_proto::v1::network_spec::Backend;
use qvirt_proto::v1::{Accel, DiskFormat, DomainSpec, PortForwardProtocol};

/// The virtio-serial port name qemu-ga and qvirt-ga look for.
pub const AGENT_PORT_NAME: &str = "org.qemu.guest_agent.0";

/// The accelerator actually used, after `auto` is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolvedAccel {
    /// `-accel kvm`.
    Kvm,
    /// `-accel tcg`.
    Tcg,
}

/// Resolve a spec's accelerator: `auto` means KVM only when `auto_uses_kvm`
/// allows it and `/dev/kvm` opens read-write.
pub fn resolve_accel(accel: Accel, auto_uses_kvm: bool) -> ResolvedAccel {
    match accel {
        Accel::Kvm => ResolvedAccel::Kvm,
        Accel::Auto if auto_uses_kvm && kvm_usable() => ResolvedAccel::Kvm,
        Accel::Tcg | Accel::Auto | Accel::Unspecified => ResolvedAccel::Tcg,
    }
}

/// Whether /dev/kvm can be opened read-write. Blocking (one open), so call
/// it from a blocking context.
pub fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// QEMU's seccomp sandbox as libvirt starts it: no obsolete system calls,
/// no privilege changes, no fork/exec, no scheduler/affinity changes.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The fdset QEMU's serial log fd goes in (`/dev/fdset/N`).
pub const SERIAL_FDSET: u32 = 1;

/// What the supervisor hands QEMU besides the spec: inherited fds and the
/// sandbox.
#[derive(Debug, Clone, Default)]
pub struct Host {
    /// The listening agent socket (used when the spec has `agent`).
    pub agent_fd: Option<RawFd>,
    /// The opened serial log (used when the spec has `serial_log`).
    pub serial_fd: Option<RawFd>,
    /// The opened tap devices, one per `tap` NIC in order.
    pub tap_fds: Vec<RawFd>,
    /// Whether to add `-sandbox` ([`SANDBOX`]).
    pub sandbox: bool,
    /// A restore: QEMU waits for its state (`-incoming defer`), which the
    /// supervisor then feeds it with `migrate-incoming`.
    pub incoming: bool,
}

/// Double the commas of a value embedded in a QEMU option string.
pub fn escape(value: &str) -> String {
    value.replace(',', ",,")
}

fn on_off(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

/// QEMU's arguments for `spec` (normalized by [`super::spec::normalize`]).
pub fn build(spec: &DomainSpec, accel: ResolvedAccel, host: &Host) -> Vec<OsString> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| (*s).to_owned()));
    push(&["-name", &format!("guest={}", escape(&spec.name))]);
    push(&["-uuid", &spec.uuid]);
    push(&["-machine", &spec.machine]);
    push(&[
        "-accel",
        match accel {
            ResolvedAccel::Kvm => "kvm",
            ResolvedAccel::Tcg => "tcg",
        },
    ]);
    push(&["-m", &spec.memory_mib.to_string()]);
    push(&["-smp", &spec.vcpus.to_string()]);
    push(&[
        "-display",
        "none",
        "-nodefaults",
        "-no-user-config",
        "-no-shutdown",
    ]);
    if host.sandbox {
        push(&["-sandbox", SANDBOX]);
    }
    if !spec.kernel.is_empty() {
        push(&["-kernel", &spec.kernel]);
        if !spec.initrd.is_empty() {
            push(&["-initrd", &spec.initrd]);
        }
        if !spec.cmdline.is_empty() {
            push(&["-append", &spec.cmdline]);
        }
    }
    for (i, disk) in spec.disks.iter().enumerate() {
        let format = match disk.format() {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw | DiskFormat::Unspecified => "raw",
        };
        push(&[
            "-drive",
            &format!(
                "file={},format={format},if=none,id=drive{i},readonly={}",
                escape(&disk.path),
                on_off(disk.read_only)
            ),
        ]);
        let mut device = format!("virtio-blk-pci,drive=drive{i},id=disk{i}");
        if !disk.serial.is_empty() {
            device.push_str(&format!(",serial={}", escape(&disk.serial)));
        }
        push(&["-device", &device]);
    }
    let mut tap_fds = host.tap_fds.iter();
    for (i, net) in spec.networks.iter().enumerate() {
        let netdev = match &net.backend {
            Some(Backend::Tap(_)) => match tap_fds.next() {
                // Opened by the supervisor: QEMU cannot (no CAP_NET_ADMIN).
                Some(fd) => format!("tap,id=net{i},fd={fd}"),
                None => continue,
            },
            Some(Backend::User(user)) => {
                let mut s = format!("user,id=net{i}");
                for fwd in &user.port_forwards {
                    let proto = match fwd.protocol() {
                        PortForwardProtocol::Udp => "udp",
                        _ => "tcp",
                    };
                    s.push_str(&format!(
                        ",hostfwd={proto}:{}:{}-:{}",
                        fwd.host_address, fwd.host_port, fwd.guest_port
                    ));
                }
                s
            }
            // Refused by validation; keep the NIC unplugged rather than panic.
            None => continue,
        };
        push(&["-netdev", &netdev]);
        push(&[
            "-device",
            &format!("virtio-net-pci,netdev=net{i},mac={}", net.mac),
        ]);
    }
    if !spec.serial_log.is_empty()
        && let Some(fd) = host.serial_fd
    {
        push(&[
            "-add-fd",
            &format!("fd={fd},set={SERIAL_FDSET},opaque=serial-log"),
            "-chardev",
            &format!("file,id=serial0,path=/dev/fdset/{SERIAL_FDSET},append=on"),
            "-serial",
            "chardev:serial0",
        ]);
    }
    if spec.agent
        && let Some(fd) = host.agent_fd
    {
        push(&[
            "-chardev",
            &format!("socket,id=qga0,fd={fd},server=on,wait=off"),
            "-device",
            "virtio-serial-pci,id=virtio-serial0",
            "-device",
            &format!("virtserialport,bus=virtio-serial0.0,chardev=qga0,name={AGENT_PORT_NAME}"),
        ]);
    }
    if host.incoming {
        push(&["-incoming", "defer"]);
    }
    let mut args: Vec<OsString> = a.into_iter().map(OsString::from).collect();
    args.extend(spec.extra_args.iter().map(OsString::from));
    args
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::config::DefaultAccel;
    use crate::domain::spec::normalize;

    fn argv(yaml: &str) -> Vec<String> {
        let spec = normalize(DomainSpec::from_yaml(yaml).unwrap(), DefaultAccel::Tcg).unwrap();
        let host = Host {
            agent_fd: Some(7),
            serial_fd: Some(8),
            tap_fds: vec![9],
            sandbox: yaml.contains("name: \"web,1\""),
            incoming: false,
        };
        build(&spec, ResolvedAccel::Tcg, &host)
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect()
    }

    #[test]
    fn test_minimal_spec() {
        let a = argv("name: vm1\nuuid: 4b9f1a52-3c1e-4f0a-9a57-1d2b3c4d5e6f");
        assert_eq!(
            a.join(" "),
            "-name guest=vm1 -uuid 4b9f1a52-3c1e-4f0a-9a57-1d2b3c4d5e6f -machine q35 \
             -accel tcg -m 128 -smp 1 -display none -nodefaults -no-user-config -no-shutdown"
        );
    }

    #[test]
    fn test_kernel_disks_networks_serial_agent_extra() {
        let a = argv(
            r#"
name: "web,1"
memory_mib: 256
vcpus: 2
machine: pc
kernel: /k/vmlinuz
initrd: /k/initrd.gz
cmdline: console=ttyS0 quiet
disks:
  - {path: "/img/root,x.qcow2", format: qcow2, serial: root}
  - {path: /img/seed.img, read_only: true}
networks:
  - user: {port_forwards: [{host_port: 2222, guest_port: 22}, {protocol: udp, host_address: 0.0.0.0, host_port: 5353, guest_port: 53}]}
    mac: "52:54:00:AA:bb:01"
  - tap: {ifname: tap0}
    mac: "52:54:00:00:00:02"
serial_log: /var/log/web1.serial
agent: true
extra_args: ["-device", "virtio-rng-pci"]
"#,
        );
        let text = a.join(" ");
        for want in [
            "-name guest=web,,1 ",
            "-machine pc -accel tcg -m 256 -smp 2 ",
            "-kernel /k/vmlinuz -initrd /k/initrd.gz -append console=ttyS0 quiet ",
            "-drive file=/img/root,,x.qcow2,format=qcow2,if=none,id=drive0,readonly=off -device virtio-blk-pci,drive=drive0,id=disk0,serial=root ",
            "-drive file=/img/seed.img,format=raw,if=none,id=drive1,readonly=on -device virtio-blk-pci,drive=drive1,id=disk1 ",
            "-netdev user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=udp:0.0.0.0:5353-:53 -device virtio-net-pci,netdev=net0,mac=52:54:00:aa:bb:01 ",
            "-netdev tap,id=net1,fd=9 -device virtio-net-pci,netdev=net1,mac=52:54:00:00:00:02 ",
            "-no-shutdown -sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny ",
            "-add-fd fd=8,set=1,opaque=serial-log -chardev file,id=serial0,path=/dev/fdset/1,append=on -serial chardev:serial0 ",
            "-chardev socket,id=qga0,fd=7,server=on,wait=off -device virtio-serial-pci,id=virtio-serial0 -device virtserialport,bus=virtio-serial0.0,chardev=qga0,name=org.qemu.guest_agent.0 ",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert!(text.ends_with("-device virtio-rng-pci"), "{text}");
        // The cmdline stays one argv element.
        assert!(a.contains(&"console=ttyS0 quiet".to_owned()));
    }

    #[test]
    fn test_accel_resolution() {
        assert_eq!(resolve_accel(Accel::Tcg, true), ResolvedAccel::Tcg);
        assert_eq!(resolve_accel(Accel::Kvm, false), ResolvedAccel::Kvm);
        assert_eq!(resolve_accel(Accel::Auto, false), ResolvedAccel::Tcg);
        let auto = resolve_accel(Accel::Auto, true);
        assert_eq!(auto == ResolvedAccel::Kvm, kvm_usable());
    }
}
