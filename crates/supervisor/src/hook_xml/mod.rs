//! libvirt-style domain XML for hook scripts written for libvirt's
//! `/etc/libvirt/hooks/qemu` (which read the domain XML on stdin): written
//! from a [`DomainSpec`](qvirt_proto::v1::DomainSpec) by [`to_xml`] when the supervisor's
//! `hook_stdin_format` is `libvirt-xml`, and read back by [`from_xml`] (a
//! filter hook's output, such as libvirt's `restore` hook, is a domain
//! document). Both go through quick-xml: values are escaped and unescaped
//! by the crate, never by string formatting.
//!
//! The mapping, in libvirt's element order:
//!
//! - `<domain type='kvm'>` when the spec asks for KVM, else `type='qemu'`;
//! - `<name>`, `<uuid>`;
//! - `<metadata>` with the spec's `metadata` entries as
//!   `<qvirt:entry key='K'>V</qvirt:entry>` in a `<qvirt:metadata>` element
//!   of namespace [`METADATA_NS`] (libvirt wants metadata children
//!   namespaced); absent when there are none;
//! - `<memory unit='KiB'>` and `<currentMemory unit='KiB'>` (`memory_mib`
//!   times 1024), `<vcpu placement='static'>`;
//! - `<os>`: `<type arch='x86_64' machine='M'>hvm</type>`, and `<kernel>`,
//!   `<initrd>`, `<cmdline>` when set;
//! - `<devices>`: per disk `<disk type='file' device='disk'>` with
//!   `<driver name='qemu' type='raw|qcow2'/>`, `<source file='P'/>`,
//!   `<target dev='vdX' bus='virtio'/>` (vda, vdb, ... vdz, vdaa, as
//!   libvirt names them), `<serial>` and `<readonly/>` when set; per
//!   network `<interface type='user'>` or `<interface type='ethernet'>`
//!   with `<target dev='TAP' managed='no'/>`, each with `<mac address/>`
//!   and `<model type='virtio'/>`; the serial log as
//!   `<serial type='file'>`;
//! - `extra_args` as libvirt's `<qemu:commandline>` `<qemu:arg value/>`.
//!
//! Not produced: `<emulator>`, `<features>`, `<clock>`, `<on_*>`, port
//! forwards (libvirt has them only for the passt backend), the agent
//! channel (its socket path is known only once the domain runs), and
//! anything runtime (`id`, aliases, PCI addresses). A value XML 1.0 cannot
//! carry (control characters other than tab, newline and carriage return)
//! is refused with its field named rather than altered.
//!
//! Reading takes back exactly these elements, matched by namespace (a
//! script may rename prefixes, as Python's ElementTree does), memory in any
//! of libvirt's units; elements it does not know (`<description>`,
//! `<features>`, ...) are ignored, and a device it cannot express (a
//! block disk, a bridge interface) is refused. What XML does not carry
//! (the agent, port forwards, `accel: auto`) is taken from a base
//! definition by [`from_xml_over`].

mod read;
mod write;

pub use read::{MAX_XML_BYTES, from_xml, from_xml_over};
pub use write::to_xml;

/// The XML namespace of the `<qvirt:metadata>` element.
pub const METADATA_NS: &str = "https://qvirt.dev/xmlns/metadata/1";
/// libvirt's namespace of `<qemu:commandline>`.
pub const QEMU_NS: &str = "http://libvirt.org/schemas/domain/qemu/1.0";

/// Why a definition cannot be written as XML.
#[derive(Debug, thiserror::Error)]
pub enum XmlError {
    /// A value holds a character XML 1.0 cannot carry.
    #[error("{field} holds a character XML cannot carry ({found:?})")]
    Unrepresentable {
        /// The spec field, e.g. `disks[0].path`.
        field: String,
        /// The first such character.
        found: char,
    },
    /// Writing to the in-memory buffer failed.
    #[error("cannot write the XML: {0}")]
    Write(#[from] std::io::Error),
}

/// Why a document does not read as a domain definition. The texts name
/// the element or attribute at fault; none quotes more than a short value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum XmlReadError {
    /// The document is larger than [`MAX_XML_BYTES`].
    #[error("the domain XML is {0} bytes, more than {MAX_XML_BYTES}")]
    TooLarge(usize),
    /// Not well-formed XML (or a construct refused on purpose: a DOCTYPE,
    /// nesting deeper than libvirt's documents go).
    #[error("the domain XML is not well-formed at byte {position}: {message}")]
    Syntax {
        /// Byte offset of the error.
        position: u64,
        /// What is wrong.
        message: String,
    },
    /// Well-formed, but not a definition qvirt can run.
    #[error("{0}")]
    Invalid(String),
}

/// A definition using every element the mapping knows.
#[cfg(test)]
fn full_spec() -> qvirt_proto::v1::DomainSpec {
    use qvirt_proto::v1::network_spec::Backend;
    use qvirt_proto::v1::{
        Accel, DiskFormat, DiskSpec, DomainSpec, NetworkSpec, TapNetwork, UserNetwork,
    };
    DomainSpec {
        name: "web1".into(),
        uuid: "4b9f1a52-3c1e-4f0a-9a57-1d2b3c4d5e6f".into(),
        memory_mib: 256,
        vcpus: 2,
        machine: "pc".into(),
        accel: Accel::Tcg as i32,
        kernel: "/srv/images/vmlinuz".into(),
        initrd: "/srv/images/initrd.gz".into(),
        cmdline: "console=ttyS0 quiet".into(),
        disks: vec![
            DiskSpec {
                path: "/srv/images/root.qcow2".into(),
                format: DiskFormat::Qcow2 as i32,
                serial: "root".into(),
                ..Default::default()
            },
            DiskSpec {
                path: "/srv/images/seed.img".into(),
                read_only: true,
                ..Default::default()
            },
        ],
        networks: vec![
            NetworkSpec {
                backend: Some(Backend::User(UserNetwork::default())),
                mac: "52:54:00:12:34:56".into(),
            },
            NetworkSpec {
                backend: Some(Backend::Tap(TapNetwork {
                    ifname: "tap0".into(),
                })),
                mac: "52:54:00:ab:cd:ef".into(),
            },
        ],
        serial_log: "/var/lib/qvirt/serial/web1/ttyS0.log".into(),
        extra_args: vec!["-device".into(), "virtio-rng-pci".into()],
        metadata: [("owner", "ops"), ("tier", "web")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        ..Default::default()
    }
}
