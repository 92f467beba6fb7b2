//! Reading: [`from_xml`] and [`from_xml_over`]. The document is read into
//! a small element tree with quick-xml's namespace-aware reader (bounded
//! in size and depth, no DOCTYPE), then mapped element by element.

use quick_xml::NsReader;
use quick_xml::escape::resolve_predefined_entity;
use quick_xml::events::{BytesStart, Event};
use quick_xml::name::ResolveResult;
use qvirt_proto::v1::network_spec::Backend;
use qvirt_proto::v1::{
    Accel, DiskFormat, DiskSpec, DomainSpec, NetworkSpec, TapNetwork, UserNetwork,
};

use super::{METADATA_NS, QEMU_NS, XmlReadError};

/// The largest document read: above what the hook executor returns as a
/// filter's output (at most 2 MiB), far above any definition.
pub const MAX_XML_BYTES: usize = 4 << 20;
/// Deepest element nesting accepted (libvirt's documents go about 5 deep).
const MAX_DEPTH: usize = 32;

/// One element: namespace (None: none), local name, attributes (by
/// qualified name, namespace declarations left out), text and children.
#[derive(Debug, Default)]
struct Element {
    ns: Option<String>,
    name: String,
    attrs: Vec<(String, String)>,
    text: String,
    children: Vec<Element>,
}

impl Element {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Children without a namespace (libvirt's own elements).
    fn plain(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter(|c| c.ns.is_none())
    }

    /// Children in namespace `ns` called `name`.
    fn in_ns<'a>(&'a self, ns: &'a str, name: &'a str) -> impl Iterator<Item = &'a Element> {
        self.children
            .iter()
            .filter(move |c| c.ns.as_deref() == Some(ns) && c.name == name)
    }
}

fn invalid(message: impl Into<String>) -> XmlReadError {
    XmlReadError::Invalid(message.into())
}

/// A value as it may appear in an error text: at most 64 characters.
fn short(value: &str) -> String {
    match value.char_indices().nth(64) {
        Some((i, _)) => format!("{}...", &value[..i]),
        None => value.to_owned(),
    }
}

/// Reads `xml` into its root element.
fn parse(xml: &str) -> Result<Element, XmlReadError> {
    if xml.len() > MAX_XML_BYTES {
        return Err(XmlReadError::TooLarge(xml.len()));
    }
    let mut reader = NsReader::from_str(xml);
    let syntax = |position: u64, message: String| XmlReadError::Syntax { position, message };
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    loop {
        let (ns, event) = match reader.read_resolved_event() {
            Ok(got) => got,
            Err(e) => return Err(syntax(reader.error_position(), e.to_string())),
        };
        let ns = match ns {
            ResolveResult::Unbound => None,
            ResolveResult::Bound(ns) => Some(String::from_utf8_lossy(ns.as_ref()).into_owned()),
            ResolveResult::Unknown(prefix) => {
                let prefix = String::from_utf8_lossy(&prefix).into_owned();
                return Err(syntax(
                    reader.buffer_position(),
                    format!("undeclared namespace prefix {:?}", short(&prefix)),
                ));
            }
        };
        let position = reader.buffer_position();
        let text = match event {
            Event::Start(ref e) | Event::Empty(ref e) => {
                if stack.len() >= MAX_DEPTH {
                    return Err(syntax(position, format!("nested deeper than {MAX_DEPTH}")));
                }
                if root.is_some() {
                    return Err(syntax(position, "more than one root element".into()));
                }
                let element = element(ns, e).map_err(|m| syntax(position, m))?;
                if matches!(event, Event::Start(_)) {
                    stack.push(element);
                } else {
                    close(&mut stack, &mut root, element);
                }
                continue;
            }
            Event::End(_) => {
                // quick-xml has checked that the names match.
                let Some(element) = stack.pop() else {
                    return Err(syntax(position, "unexpected end tag".into()));
                };
                close(&mut stack, &mut root, element);
                continue;
            }
            Event::Text(t) => t
                .decode()
                .map_err(|e| syntax(position, e.to_string()))?
                .into_owned(),
            Event::CData(t) => t
                .decode()
                .map_err(|e| syntax(position, e.to_string()))?
                .into_owned(),
            Event::GeneralRef(r) => match r.resolve_char_ref() {
                Ok(Some(c)) => c.to_string(),
                Ok(None) => {
                    let name = r.decode().map_err(|e| syntax(position, e.to_string()))?;
                    match resolve_predefined_entity(&name) {
                        Some(text) => text.to_owned(),
                        None => {
                            return Err(syntax(
                                position,
                                format!("unknown entity &{};", short(&name)),
                            ));
                        }
                    }
                }
                Err(e) => return Err(syntax(position, e.to_string())),
            },
            Event::DocType(_) => {
                return Err(syntax(position, "a DOCTYPE is not accepted".into()));
            }
            Event::Comment(_) | Event::PI(_) | Event::Decl(_) => continue,
            Event::Eof => break,
        };
        match stack.last_mut() {
            Some(element) => element.text.push_str(&text),
            None if text.trim().is_empty() => {}
            None => return Err(syntax(position, "text outside the root element".into())),
        }
    }
    if !stack.is_empty() {
        return Err(syntax(reader.buffer_position(), "unclosed element".into()));
    }
    root.ok_or_else(|| syntax(reader.buffer_position(), "no root element".into()))
}

/// A new element from its start tag.
fn element(ns: Option<String>, start: &BytesStart<'_>) -> Result<Element, String> {
    let name = String::from_utf8_lossy(start.local_name().as_ref()).into_owned();
    let mut attrs = Vec::new();
    for attr in start.attributes() {
        let attr = attr.map_err(|e| e.to_string())?;
        let key = String::from_utf8_lossy(attr.key.as_ref()).into_owned();
        if key == "xmlns" || key.starts_with("xmlns:") {
            continue;
        }
        let value = attr.unescape_value().map_err(|e| e.to_string())?;
        attrs.push((key, value.into_owned()));
    }
    Ok(Element {
        ns,
        name,
        attrs,
        ..Element::default()
    })
}

/// Attaches a finished element to its parent, or makes it the root.
fn close(stack: &mut [Element], root: &mut Option<Element>, element: Element) {
    match stack.last_mut() {
        Some(parent) => parent.children.push(element),
        None => *root = Some(element),
    }
}

/// The definition in `xml`, as [`to_xml`](super::to_xml) writes it (see
/// the module docs for what is read). What XML does not carry is left at
/// its default: no agent, no port forwards, accel `tcg` for
/// `type='qemu'`. Nothing is checked beyond the mapping: the caller
/// normalizes the result as any definition.
pub fn from_xml(xml: &str) -> Result<DomainSpec, XmlReadError> {
    let root = parse(xml)?;
    if root.ns.is_some() || root.name != "domain" {
        return Err(invalid(format!(
            "the root element is <{}>, not <domain>",
            short(&root.name)
        )));
    }
    let mut spec = DomainSpec {
        accel: match root.attr("type") {
            Some("qemu") => Accel::Tcg as i32,
            Some("kvm") => Accel::Kvm as i32,
            Some(other) => {
                return Err(invalid(format!(
                    "domain type '{}' is not supported: 'qemu' or 'kvm'",
                    short(other)
                )));
            }
            None => return Err(invalid("<domain> has no type attribute")),
        },
        ..DomainSpec::default()
    };
    let mut seen: Vec<&str> = Vec::new();
    let mut current_kib = None;
    for child in root.plain() {
        let once = [
            "name",
            "uuid",
            "memory",
            "currentMemory",
            "vcpu",
            "os",
            "devices",
        ];
        if let Some(tag) = once.iter().find(|t| **t == child.name) {
            if seen.contains(tag) {
                return Err(invalid(format!("more than one <{tag}>")));
            }
            seen.push(tag);
        }
        match child.name.as_str() {
            "name" => spec.name = child.text.clone(),
            "uuid" => spec.uuid = child.text.trim().to_owned(),
            "memory" => spec.memory_mib = memory_mib(child)?,
            "currentMemory" => current_kib = Some(memory_mib(child)?),
            "vcpu" => spec.vcpus = number(child, "vcpu")?,
            "os" => read_os(child, &mut spec)?,
            "devices" => read_devices(child, &mut spec)?,
            "metadata" => read_metadata(child, &mut spec)?,
            _ => {}
        }
    }
    if !seen.contains(&"name") {
        return Err(invalid("<domain> has no <name>"));
    }
    if let Some(current) = current_kib
        && current != spec.memory_mib
    {
        return Err(invalid(format!(
            "currentMemory ({current} MiB) differs from memory ({} MiB): qvirt has no balloon",
            spec.memory_mib
        )));
    }
    for commandline in root.in_ns(QEMU_NS, "commandline") {
        for arg in commandline.in_ns(QEMU_NS, "arg") {
            let value = arg
                .attr("value")
                .ok_or_else(|| invalid("<qemu:arg> has no value attribute"))?;
            spec.extra_args.push(value.to_owned());
        }
    }
    Ok(spec)
}

/// [`from_xml`], then what XML does not carry taken from `base` (the
/// definition the document was written from): the agent, the port
/// forwards of a user network that is still a user network at the same
/// place, `accel: auto` (or unset) where the document says `qemu`, and
/// an unset disk format where the document says `raw`.
pub fn from_xml_over(base: &DomainSpec, xml: &str) -> Result<DomainSpec, XmlReadError> {
    let mut spec = from_xml(xml)?;
    spec.agent = base.agent;
    if spec.accel() == Accel::Tcg && matches!(base.accel(), Accel::Auto | Accel::Unspecified) {
        spec.accel = base.accel;
    }
    for (net, old) in spec.networks.iter_mut().zip(&base.networks) {
        if let (Some(Backend::User(user)), Some(Backend::User(old))) =
            (&mut net.backend, &old.backend)
        {
            user.port_forwards.clone_from(&old.port_forwards);
        }
    }
    for (disk, old) in spec.disks.iter_mut().zip(&base.disks) {
        if disk.format() == DiskFormat::Raw && old.format() == DiskFormat::Unspecified {
            disk.format = DiskFormat::Unspecified as i32;
        }
    }
    Ok(spec)
}

/// The element's text as a number.
fn number<T: std::str::FromStr>(element: &Element, what: &str) -> Result<T, XmlReadError> {
    let text = element.text.trim();
    text.parse()
        .map_err(|_| invalid(format!("{what} '{}' is not a number", short(text))))
}

/// `<memory unit='U'>N</memory>` in MiB, with libvirt's units
/// (`virScaleInteger`: case-insensitive, `KiB`/`k` 1024, `KB` 1000, ...;
/// no unit: KiB). Must be a whole number of MiB.
fn memory_mib(element: &Element) -> Result<u64, XmlReadError> {
    let what = &element.name;
    let value: u64 = number(element, what)?;
    let unit = element.attr("unit").unwrap_or("KiB");
    let scale = unit_scale(unit)
        .ok_or_else(|| invalid(format!("{what} unit '{}' is not known", short(unit))))?;
    let bytes = value
        .checked_mul(scale)
        .ok_or_else(|| invalid(format!("{what} {value} {unit} is too large")))?;
    const MIB: u64 = 1 << 20;
    if bytes % MIB != 0 {
        return Err(invalid(format!(
            "{what} {value} {unit} is not a whole number of MiB"
        )));
    }
    Ok(bytes / MIB)
}

/// Bytes per unit, as libvirt's `virScaleInteger` reads units.
fn unit_scale(unit: &str) -> Option<u64> {
    let lower = unit.to_ascii_lowercase();
    if matches!(lower.as_str(), "b" | "byte" | "bytes") {
        return Some(1);
    }
    let mut chars = lower.chars();
    let power = match chars.next()? {
        'k' => 1,
        'm' => 2,
        'g' => 3,
        't' => 4,
        'p' => 5,
        'e' => 6,
        _ => return None,
    };
    let base: u64 = match chars.as_str() {
        "" | "ib" => 1024,
        "b" => 1000,
        _ => return None,
    };
    Some(base.pow(power))
}

fn read_os(os: &Element, spec: &mut DomainSpec) -> Result<(), XmlReadError> {
    for child in os.plain() {
        let field = match child.name.as_str() {
            "type" => {
                if let Some(arch) = child.attr("arch")
                    && arch != "x86_64"
                {
                    return Err(invalid(format!(
                        "architecture '{}' is not supported: x86_64 only",
                        short(arch)
                    )));
                }
                spec.machine = child.attr("machine").unwrap_or_default().to_owned();
                continue;
            }
            "kernel" => &mut spec.kernel,
            "initrd" => &mut spec.initrd,
            "cmdline" => &mut spec.cmdline,
            _ => continue,
        };
        field.clone_from(&child.text);
    }
    Ok(())
}

fn read_devices(devices: &Element, spec: &mut DomainSpec) -> Result<(), XmlReadError> {
    for child in devices.plain() {
        match child.name.as_str() {
            "disk" => spec.disks.push(read_disk(child, spec.disks.len())?),
            "interface" => spec
                .networks
                .push(read_interface(child, spec.networks.len())?),
            "serial" if child.attr("type") == Some("file") => {
                if !spec.serial_log.is_empty() {
                    return Err(invalid("more than one <serial type='file'>"));
                }
                let source = child.plain().find(|c| c.name == "source");
                spec.serial_log = source
                    .and_then(|s| s.attr("path"))
                    .ok_or_else(|| invalid("<serial type='file'> has no <source path>"))?
                    .to_owned();
            }
            _ => {}
        }
    }
    Ok(())
}

fn read_disk(disk: &Element, index: usize) -> Result<DiskSpec, XmlReadError> {
    match disk.attr("type") {
        Some("file") => {}
        other => {
            return Err(invalid(format!(
                "disk {index}: type '{}' is not supported: only type='file'",
                short(other.unwrap_or_default())
            )));
        }
    }
    if let Some(device) = disk.attr("device")
        && device != "disk"
    {
        return Err(invalid(format!(
            "disk {index}: device '{}' is not supported: only device='disk'",
            short(device)
        )));
    }
    let mut spec = DiskSpec::default();
    let mut path = None;
    for child in disk.plain() {
        match child.name.as_str() {
            "driver" => {
                spec.format = match child.attr("type") {
                    None => DiskFormat::Unspecified,
                    Some("raw") => DiskFormat::Raw,
                    Some("qcow2") => DiskFormat::Qcow2,
                    Some(other) => {
                        return Err(invalid(format!(
                            "disk {index}: format '{}' is not supported: raw or qcow2",
                            short(other)
                        )));
                    }
                } as i32;
            }
            "source" => path = child.attr("file"),
            "serial" => spec.serial.clone_from(&child.text),
            "readonly" => spec.read_only = true,
            _ => {}
        }
    }
    spec.path = path
        .ok_or_else(|| invalid(format!("disk {index} has no <source file>")))?
        .to_owned();
    Ok(spec)
}

fn read_interface(iface: &Element, index: usize) -> Result<NetworkSpec, XmlReadError> {
    let child_attr = |tag: &str, key: &str| {
        iface
            .plain()
            .find(|c| c.name == tag)
            .and_then(|c| c.attr(key))
    };
    let backend = match iface.attr("type") {
        Some("user") => Backend::User(UserNetwork::default()),
        Some("ethernet") => Backend::Tap(TapNetwork {
            ifname: child_attr("target", "dev")
                .ok_or_else(|| {
                    invalid(format!(
                        "interface {index}: type 'ethernet' needs <target dev>"
                    ))
                })?
                .to_owned(),
        }),
        other => {
            return Err(invalid(format!(
                "interface {index}: type '{}' is not supported: 'user' or 'ethernet'",
                short(other.unwrap_or_default())
            )));
        }
    };
    Ok(NetworkSpec {
        backend: Some(backend),
        mac: child_attr("mac", "address").unwrap_or_default().to_owned(),
    })
}

fn read_metadata(metadata: &Element, spec: &mut DomainSpec) -> Result<(), XmlReadError> {
    for ours in metadata.in_ns(METADATA_NS, "metadata") {
        for entry in ours.in_ns(METADATA_NS, "entry") {
            let key = entry
                .attr("key")
                .ok_or_else(|| invalid("a metadata entry has no key attribute"))?;
            if spec
                .metadata
                .insert(key.to_owned(), entry.text.clone())
                .is_some()
            {
                return Err(invalid(format!(
                    "metadata key '{}' appears twice",
                    short(key)
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use qvirt_proto::v1::PortForward;

    use super::*;
    use crate::hook_xml::{full_spec, to_xml};

    /// Written and read back, a definition is itself (accel `tcg`, no
    /// agent, no port forwards: what XML carries).
    #[test]
    fn test_round_trip_of_every_element() {
        let mut spec = full_spec();
        // XML has no "unset" format: raw is what an unset one means.
        spec.disks[1].format = DiskFormat::Raw as i32;
        assert_eq!(from_xml(&to_xml(&spec).unwrap()).unwrap(), spec);
        let minimal = DomainSpec {
            name: "a".into(),
            uuid: "4b9f1a52-3c1e-4f0a-9a57-1d2b3c4d5e6f".into(),
            memory_mib: 128,
            vcpus: 1,
            machine: "q35".into(),
            accel: Accel::Kvm as i32,
            ..Default::default()
        };
        assert_eq!(from_xml(&to_xml(&minimal).unwrap()).unwrap(), minimal);
        // Markup and whitespace in values survive.
        let mut nasty = spec.clone();
        nasty.name = "a<b>&c'd\"e</name><x/>".into();
        nasty.cmdline = "  console=ttyS0 \t a&b  ".into();
        nasty.metadata.insert("k".into(), "x\ny <&> ]]>".into());
        nasty.extra_args.push("'\"&<>".into());
        assert_eq!(from_xml(&to_xml(&nasty).unwrap()).unwrap(), nasty);
    }

    /// What XML does not carry comes from the base definition.
    #[test]
    fn test_round_trip_over_the_base_keeps_what_xml_lacks() {
        let mut base = full_spec();
        base.agent = true;
        base.accel = Accel::Auto as i32;
        base.disks[1].format = DiskFormat::Unspecified as i32;
        if let Some(Backend::User(user)) = &mut base.networks[0].backend {
            user.port_forwards.push(PortForward {
                host_port: 2222,
                guest_port: 22,
                ..Default::default()
            });
        }
        let xml = to_xml(&base).unwrap();
        assert_ne!(from_xml(&xml).unwrap(), base);
        assert_eq!(from_xml_over(&base, &xml).unwrap(), base);
        // A document that asks for KVM gets it, whatever the base said.
        let kvm = xml.replacen("type=\"qemu\"", "type=\"kvm\"", 1);
        assert_eq!(from_xml_over(&base, &kvm).unwrap().accel(), Accel::Kvm);
    }

    /// A document as a libvirt script edits it: other prefixes (Python's
    /// ElementTree writes ns0:), single quotes, other units, unknown
    /// elements, comments and a declaration.
    #[test]
    fn test_reads_libvirt_style_edits() {
        let xml = r#"<?xml version="1.0"?>
<!-- edited by a hook -->
<domain type='qemu' id='3'>
  <name>tiny</name>
  <uuid> 4b9f1a52-3c1e-4f0a-9a57-1d2b3c4d5e6f </uuid>
  <description>added by the hook</description>
  <metadata>
    <ns0:metadata xmlns:ns0="https://qvirt.dev/xmlns/metadata/1">
      <ns0:entry key="owner">ops &amp; dev &#233;</ns0:entry>
    </ns0:metadata>
    <other:x xmlns:other="urn:other"><other:entry key="no">ignored</other:entry></other:x>
  </metadata>
  <memory unit='MiB'>64</memory>
  <currentMemory>65536</currentMemory>
  <vcpu placement='static' current='1'>1</vcpu>
  <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type><boot dev='hd'/></os>
  <features><acpi/></features>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/srv/a b.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='user'><mac address='52:54:00:00:00:01'/><model type='virtio'/></interface>
    <serial type='pty'><target port='0'/></serial>
    <serial type='file'><source path='/var/log/s.log'/></serial>
  </devices>
  <q:commandline xmlns:q="http://libvirt.org/schemas/domain/qemu/1.0"><q:arg value='-S'/></q:commandline>
</domain>
"#;
        let spec = from_xml(xml).unwrap();
        assert_eq!(spec.name, "tiny");
        assert_eq!(spec.uuid, "4b9f1a52-3c1e-4f0a-9a57-1d2b3c4d5e6f");
        assert_eq!(spec.memory_mib, 64);
        assert_eq!(spec.vcpus, 1);
        assert_eq!(spec.machine, "pc-i440fx-7.2");
        assert_eq!(spec.disks.len(), 1);
        assert_eq!(spec.disks[0].path, "/srv/a b.qcow2");
        assert_eq!(spec.disks[0].format(), DiskFormat::Qcow2);
        assert_eq!(spec.networks[0].mac, "52:54:00:00:00:01");
        assert_eq!(spec.serial_log, "/var/log/s.log");
        assert_eq!(spec.metadata.len(), 1);
        assert_eq!(spec.metadata["owner"], "ops & dev \u{e9}");
        assert_eq!(spec.extra_args, ["-S"]);
    }

    #[test]
    fn test_memory_units_as_libvirt() {
        for (value, unit, mib) in [
            ("1048576", "KiB", Some(1024)),
            ("1048576", "k", Some(1024)),
            ("1024", "M", Some(1024)),
            ("1024", "mib", Some(1024)),
            ("1", "GiB", Some(1024)),
            ("1", "g", Some(1024)),
            ("1073741824", "bytes", Some(1024)),
            ("1048576000", "B", Some(1000)),
            ("1048576", "KB", Some(1000)),
            ("1000", "KiB", None),
            ("1", "GB", None),
            ("64", "parsecs", None),
            ("18446744073709551615", "GiB", None),
            ("-1", "MiB", None),
        ] {
            let element = Element {
                name: "memory".into(),
                attrs: vec![("unit".into(), unit.into())],
                text: value.into(),
                ..Element::default()
            };
            assert_eq!(memory_mib(&element).ok(), mib, "{value} {unit}");
        }
    }

    #[test]
    fn test_refusals_name_what_is_wrong() {
        let good = to_xml(&full_spec()).unwrap();
        let cases: Vec<(String, &str)> = vec![
            ("not xml".into(), "not well-formed"),
            (
                "<domain type='qemu'><name>a</name>".into(),
                "not well-formed",
            ),
            (
                "<domain type='qemu'><name>a</name></domain><domain/>".into(),
                "more than one root",
            ),
            (
                "<!DOCTYPE d [<!ENTITY x 'y'>]><domain type='qemu'><name>&x;</name></domain>"
                    .into(),
                "DOCTYPE",
            ),
            (
                "<domain type='qemu'><name>&x;</name></domain>".into(),
                "unknown entity",
            ),
            ("<dom type='qemu'/>".into(), "not <domain>"),
            (
                "<domain><name>a</name></domain>".into(),
                "no type attribute",
            ),
            (
                "<domain type='xen'><name>a</name></domain>".into(),
                "type 'xen'",
            ),
            ("<domain type='qemu'/>".into(), "no <name>"),
            (
                "<domain type='qemu'><name>a</name><name>b</name></domain>".into(),
                "more than one <name>",
            ),
            (
                good.replacen(
                    "<currentMemory unit=\"KiB\">262144",
                    "<currentMemory unit=\"KiB\">131072",
                    1,
                ),
                "no balloon",
            ),
            (
                good.replacen(
                    "type=\"file\" device=\"disk\"",
                    "type=\"block\" device=\"disk\"",
                    1,
                ),
                "disk 0: type 'block'",
            ),
            (
                good.replacen(
                    "type=\"file\" device=\"disk\"",
                    "type=\"file\" device=\"cdrom\"",
                    1,
                ),
                "device 'cdrom'",
            ),
            (
                good.replacen("<source file=", "<source dev=", 1),
                "disk 0 has no <source file>",
            ),
            (
                good.replacen(
                    "<interface type=\"user\">",
                    "<interface type=\"bridge\">",
                    1,
                ),
                "interface 0: type 'bridge'",
            ),
            (
                good.replacen("<vcpu placement=\"static\">2", "<vcpu>two", 1),
                "vcpu 'two'",
            ),
            (
                good.replacen("arch=\"x86_64\"", "arch=\"aarch64\"", 1),
                "aarch64",
            ),
            (
                format!("{}{}", "<a>".repeat(40), "</a>".repeat(40)),
                "nested deeper",
            ),
            (
                "<domain type='qemu'><x:name>a</x:name></domain>".into(),
                "undeclared namespace prefix",
            ),
        ];
        for (xml, needle) in cases {
            let error = from_xml(&xml).expect_err(&xml).to_string();
            assert!(error.contains(needle), "{needle:?} not in {error:?}");
        }
        let huge = " ".repeat(MAX_XML_BYTES + 1);
        assert_eq!(
            from_xml(&huge),
            Err(XmlReadError::TooLarge(MAX_XML_BYTES + 1))
        );
    }
}
