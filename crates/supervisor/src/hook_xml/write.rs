//! Writing: [`to_xml`].

use quick_xml::Writer;
use quick_xml::events::{BytesEnd, BytesStart, BytesText, Event};
use qvirt_proto::v1::network_spec::Backend;
use qvirt_proto::v1::{Accel, DiskFormat, DomainSpec};

use super::{METADATA_NS, QEMU_NS, XmlError};

/// Whether XML 1.0 allows `c` in a document (its `Char` production).
fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

/// `value`, if XML can carry it; else the error naming `field`.
fn checked(field: impl FnOnce() -> String, value: &str) -> Result<&str, XmlError> {
    match value.chars().find(|c| !is_xml_char(*c)) {
        None => Ok(value),
        Some(found) => Err(XmlError::Unrepresentable {
            field: field(),
            found,
        }),
    }
}

/// libvirt's name of the `index`th virtio disk: vda ... vdz, vdaa, ...
fn disk_target(index: usize) -> String {
    let mut letters = Vec::new();
    let mut n = index + 1;
    while n > 0 {
        n -= 1;
        // n % 26 < 26: always an ASCII letter.
        letters.push(b'a' + (n % 26) as u8);
        n /= 26;
    }
    letters.reverse();
    format!("vd{}", String::from_utf8_lossy(&letters))
}

type W = Writer<Vec<u8>>;

/// `<tag attrs...>text</tag>`.
fn text_element(w: &mut W, tag: &str, attrs: &[(&str, &str)], text: &str) -> Result<(), XmlError> {
    w.create_element(tag)
        .with_attributes(attrs.iter().copied())
        .write_text_content(BytesText::new(text))?;
    Ok(())
}

/// `<tag attrs.../>`.
fn empty_element(w: &mut W, tag: &str, attrs: &[(&str, &str)]) -> Result<(), XmlError> {
    w.create_element(tag)
        .with_attributes(attrs.iter().copied())
        .write_empty()?;
    Ok(())
}

fn start(w: &mut W, tag: &str, attrs: &[(&str, &str)]) -> Result<(), XmlError> {
    let element = BytesStart::new(tag).with_attributes(attrs.iter().copied());
    w.write_event(Event::Start(element))?;
    Ok(())
}

fn end(w: &mut W, tag: &str) -> Result<(), XmlError> {
    w.write_event(Event::End(BytesEnd::new(tag)))?;
    Ok(())
}

/// The libvirt-style domain XML of `spec` (see the module docs).
pub fn to_xml(spec: &DomainSpec) -> Result<String, XmlError> {
    let mut w = Writer::new_with_indent(Vec::new(), b' ', 2);
    let domain_type = if spec.accel() == Accel::Kvm {
        "kvm"
    } else {
        "qemu"
    };
    start(&mut w, "domain", &[("type", domain_type)])?;
    text_element(&mut w, "name", &[], checked(|| "name".into(), &spec.name)?)?;
    text_element(&mut w, "uuid", &[], checked(|| "uuid".into(), &spec.uuid)?)?;
    if !spec.metadata.is_empty() {
        start(&mut w, "metadata", &[])?;
        start(&mut w, "qvirt:metadata", &[("xmlns:qvirt", METADATA_NS)])?;
        for (key, value) in &spec.metadata {
            let key = checked(|| "metadata".into(), key)?;
            let value = checked(|| format!("metadata.{key}"), value)?;
            text_element(&mut w, "qvirt:entry", &[("key", key)], value)?;
        }
        end(&mut w, "qvirt:metadata")?;
        end(&mut w, "metadata")?;
    }
    let kib = spec.memory_mib.saturating_mul(1024).to_string();
    text_element(&mut w, "memory", &[("unit", "KiB")], &kib)?;
    text_element(&mut w, "currentMemory", &[("unit", "KiB")], &kib)?;
    let vcpus = spec.vcpus.to_string();
    text_element(&mut w, "vcpu", &[("placement", "static")], &vcpus)?;

    start(&mut w, "os", &[])?;
    let machine = checked(|| "machine".into(), &spec.machine)?;
    let type_attrs = [("arch", "x86_64"), ("machine", machine)];
    text_element(&mut w, "type", &type_attrs, "hvm")?;
    for (tag, value) in [
        ("kernel", &spec.kernel),
        ("initrd", &spec.initrd),
        ("cmdline", &spec.cmdline),
    ] {
        if !value.is_empty() {
            text_element(&mut w, tag, &[], checked(|| tag.into(), value)?)?;
        }
    }
    end(&mut w, "os")?;

    start(&mut w, "devices", &[])?;
    for (i, disk) in spec.disks.iter().enumerate() {
        start(&mut w, "disk", &[("type", "file"), ("device", "disk")])?;
        let format = match disk.format() {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw | DiskFormat::Unspecified => "raw",
        };
        empty_element(&mut w, "driver", &[("name", "qemu"), ("type", format)])?;
        let path = checked(|| format!("disks[{i}].path"), &disk.path)?;
        empty_element(&mut w, "source", &[("file", path)])?;
        let target = disk_target(i);
        empty_element(&mut w, "target", &[("dev", &target), ("bus", "virtio")])?;
        if !disk.serial.is_empty() {
            let serial = checked(|| format!("disks[{i}].serial"), &disk.serial)?;
            text_element(&mut w, "serial", &[], serial)?;
        }
        if disk.read_only {
            empty_element(&mut w, "readonly", &[])?;
        }
        end(&mut w, "disk")?;
    }
    for (i, net) in spec.networks.iter().enumerate() {
        let tap = match &net.backend {
            Some(Backend::Tap(tap)) => Some(checked(
                || format!("networks[{i}].tap.ifname"),
                &tap.ifname,
            )?),
            Some(Backend::User(_)) | None => None,
        };
        let kind = if tap.is_some() { "ethernet" } else { "user" };
        start(&mut w, "interface", &[("type", kind)])?;
        if !net.mac.is_empty() {
            let mac = checked(|| format!("networks[{i}].mac"), &net.mac)?;
            empty_element(&mut w, "mac", &[("address", mac)])?;
        }
        if let Some(ifname) = tap {
            empty_element(&mut w, "target", &[("dev", ifname), ("managed", "no")])?;
        }
        empty_element(&mut w, "model", &[("type", "virtio")])?;
        end(&mut w, "interface")?;
    }
    if !spec.serial_log.is_empty() {
        let path = checked(|| "serial_log".into(), &spec.serial_log)?;
        start(&mut w, "serial", &[("type", "file")])?;
        empty_element(&mut w, "source", &[("path", path), ("append", "on")])?;
        empty_element(&mut w, "target", &[("port", "0")])?;
        end(&mut w, "serial")?;
    }
    end(&mut w, "devices")?;

    if !spec.extra_args.is_empty() {
        start(&mut w, "qemu:commandline", &[("xmlns:qemu", QEMU_NS)])?;
        for (i, arg) in spec.extra_args.iter().enumerate() {
            let arg = checked(|| format!("extra_args[{i}]"), arg)?;
            empty_element(&mut w, "qemu:arg", &[("value", arg)])?;
        }
        end(&mut w, "qemu:commandline")?;
    }
    end(&mut w, "domain")?;
    let mut bytes = w.into_inner();
    bytes.push(b'\n');
    // Every piece written is a &str and every escape ASCII.
    String::from_utf8(bytes).map_err(|e| XmlError::Write(std::io::Error::other(e)))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use quick_xml::Reader;
    use quick_xml::escape::resolve_predefined_entity;

    use super::*;
    use crate::hook_xml::full_spec;

    /// One element of a parsed document: its path from the root
    /// (`domain/devices/disk`), attributes (unescaped) and text.
    #[derive(Debug, Default, Clone)]
    struct Node {
        path: String,
        attrs: BTreeMap<String, String>,
        text: String,
    }

    /// Parse `xml` back with quick-xml (end names checked), unescaping
    /// every attribute and text; fails on anything not well-formed.
    fn parse(xml: &str) -> Vec<Node> {
        let mut reader = Reader::from_str(xml);
        let mut stack: Vec<usize> = Vec::new();
        let mut nodes: Vec<Node> = Vec::new();
        let mut roots = 0;
        loop {
            let event = reader.read_event().expect("well-formed");
            match event {
                Event::Start(_) | Event::Empty(_) => {
                    let (e, empty) = match &event {
                        Event::Start(e) => (e, false),
                        Event::Empty(e) => (e, true),
                        _ => unreachable!(),
                    };
                    let name = String::from_utf8(e.name().as_ref().to_vec()).unwrap();
                    let parent = stack.last().map(|&i| nodes[i].path.clone());
                    if parent.is_none() {
                        roots += 1;
                    }
                    let mut node = Node {
                        path: parent.map_or(name.clone(), |p| format!("{p}/{name}")),
                        ..Node::default()
                    };
                    for attr in e.attributes() {
                        let attr = attr.expect("attribute");
                        let key = String::from_utf8(attr.key.as_ref().to_vec()).unwrap();
                        let value = attr.unescape_value().expect("value").into_owned();
                        assert!(node.attrs.insert(key, value).is_none(), "duplicate");
                    }
                    nodes.push(node);
                    if !empty {
                        stack.push(nodes.len() - 1);
                    }
                }
                Event::End(_) => {
                    stack.pop().expect("balanced");
                }
                Event::Text(t) => {
                    let text = t.decode().expect("utf-8");
                    match stack.last() {
                        Some(&i) => nodes[i].text.push_str(&text),
                        None => assert!(text.trim().is_empty(), "text outside: {text:?}"),
                    }
                }
                Event::GeneralRef(r) => {
                    let text = match r.resolve_char_ref().expect("char ref") {
                        Some(c) => c.to_string(),
                        None => {
                            let name = r.decode().expect("utf-8");
                            resolve_predefined_entity(&name)
                                .expect("predefined entity")
                                .to_owned()
                        }
                    };
                    nodes[*stack.last().expect("inside")].text.push_str(&text);
                }
                Event::Eof => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(stack.is_empty(), "unclosed elements");
        assert_eq!(roots, 1, "one root element");
        // Indentation around child elements is not content.
        for node in &mut nodes {
            if node.text.trim().is_empty() {
                node.text.clear();
            }
        }
        nodes
    }

    fn all<'n>(nodes: &'n [Node], path: &str) -> Vec<&'n Node> {
        nodes.iter().filter(|n| n.path == path).collect()
    }

    fn one<'n>(nodes: &'n [Node], path: &str) -> &'n Node {
        match all(nodes, path).as_slice() {
            [node] => node,
            other => panic!("{path}: {} elements", other.len()),
        }
    }

    #[test]
    fn test_elements_attributes_and_units() {
        let xml = to_xml(&full_spec()).unwrap();
        let nodes = parse(&xml);
        let attr = |path: &str, key: &str| {
            one(&nodes, path)
                .attrs
                .get(key)
                .cloned()
                .unwrap_or_else(|| panic!("{path} has no {key}: {xml}"))
        };
        assert_eq!(attr("domain", "type"), "qemu");
        assert_eq!(one(&nodes, "domain/name").text, "web1");
        assert_eq!(
            one(&nodes, "domain/uuid").text,
            "4b9f1a52-3c1e-4f0a-9a57-1d2b3c4d5e6f"
        );
        for tag in ["domain/memory", "domain/currentMemory"] {
            assert_eq!(one(&nodes, tag).text, "262144");
            assert_eq!(attr(tag, "unit"), "KiB");
        }
        assert_eq!(one(&nodes, "domain/vcpu").text, "2");
        assert_eq!(attr("domain/vcpu", "placement"), "static");
        assert_eq!(one(&nodes, "domain/os/type").text, "hvm");
        assert_eq!(attr("domain/os/type", "arch"), "x86_64");
        assert_eq!(attr("domain/os/type", "machine"), "pc");
        assert_eq!(one(&nodes, "domain/os/kernel").text, "/srv/images/vmlinuz");
        assert_eq!(
            one(&nodes, "domain/os/initrd").text,
            "/srv/images/initrd.gz"
        );
        assert_eq!(one(&nodes, "domain/os/cmdline").text, "console=ttyS0 quiet");

        let disks = all(&nodes, "domain/devices/disk");
        assert_eq!(disks.len(), 2);
        for disk in &disks {
            assert_eq!(disk.attrs["type"], "file");
            assert_eq!(disk.attrs["device"], "disk");
        }
        let drivers = all(&nodes, "domain/devices/disk/driver");
        assert_eq!(drivers[0].attrs["name"], "qemu");
        assert_eq!(drivers[0].attrs["type"], "qcow2");
        assert_eq!(drivers[1].attrs["type"], "raw");
        let sources = all(&nodes, "domain/devices/disk/source");
        assert_eq!(sources[0].attrs["file"], "/srv/images/root.qcow2");
        assert_eq!(sources[1].attrs["file"], "/srv/images/seed.img");
        let targets = all(&nodes, "domain/devices/disk/target");
        assert_eq!(targets[0].attrs["dev"], "vda");
        assert_eq!(targets[1].attrs["dev"], "vdb");
        assert!(targets.iter().all(|t| t.attrs["bus"] == "virtio"));
        assert_eq!(one(&nodes, "domain/devices/disk/serial").text, "root");
        // Only the second disk is read-only: <readonly/> follows its target.
        assert_eq!(all(&nodes, "domain/devices/disk/readonly").len(), 1);
        let readonly_at = nodes
            .iter()
            .position(|n| n.path == "domain/devices/disk/readonly")
            .unwrap();
        let second_disk_at = nodes
            .iter()
            .rposition(|n| n.path == "domain/devices/disk")
            .unwrap();
        assert!(readonly_at > second_disk_at, "{xml}");

        let ifaces = all(&nodes, "domain/devices/interface");
        assert_eq!(ifaces[0].attrs["type"], "user");
        assert_eq!(ifaces[1].attrs["type"], "ethernet");
        let macs = all(&nodes, "domain/devices/interface/mac");
        assert_eq!(macs[0].attrs["address"], "52:54:00:12:34:56");
        assert_eq!(macs[1].attrs["address"], "52:54:00:ab:cd:ef");
        assert_eq!(attr("domain/devices/interface/target", "dev"), "tap0");
        let models = all(&nodes, "domain/devices/interface/model");
        assert_eq!(models.len(), 2);
        assert!(models.iter().all(|m| m.attrs["type"] == "virtio"));
        assert_eq!(
            attr("domain/devices/serial/source", "path"),
            "/var/lib/qvirt/serial/web1/ttyS0.log"
        );

        assert_eq!(
            attr("domain/metadata/qvirt:metadata", "xmlns:qvirt"),
            METADATA_NS
        );
        let entries: Vec<(String, String)> =
            all(&nodes, "domain/metadata/qvirt:metadata/qvirt:entry")
                .iter()
                .map(|e| (e.attrs["key"].clone(), e.text.clone()))
                .collect();
        assert_eq!(
            entries,
            [
                ("owner".into(), "ops".into()),
                ("tier".into(), "web".into())
            ]
        );
        assert_eq!(attr("domain/qemu:commandline", "xmlns:qemu"), QEMU_NS);
        let args: Vec<&str> = all(&nodes, "domain/qemu:commandline/qemu:arg")
            .iter()
            .map(|a| a.attrs["value"].as_str())
            .collect();
        assert_eq!(args, ["-device", "virtio-rng-pci"]);
    }

    #[test]
    fn test_markup_in_values_is_escaped() {
        let mut spec = full_spec();
        let nasty = "a<b>&c'd\"e</name><x/>";
        spec.name = nasty.into();
        spec.cmdline = format!("console=ttyS0 {nasty}");
        spec.disks[0].path = format!("/srv/images/{nasty}");
        spec.metadata
            .insert("k".into(), format!("{nasty}\tline\nnext"));
        spec.extra_args = vec![nasty.into()];
        let xml = to_xml(&spec).unwrap();
        assert!(!xml.contains(nasty), "{xml}");
        let nodes = parse(&xml);
        assert_eq!(one(&nodes, "domain/name").text, nasty);
        assert_eq!(
            one(&nodes, "domain/os/cmdline").text,
            format!("console=ttyS0 {nasty}")
        );
        assert_eq!(
            all(&nodes, "domain/devices/disk/source")[0].attrs["file"],
            format!("/srv/images/{nasty}")
        );
        let entry = all(&nodes, "domain/metadata/qvirt:metadata/qvirt:entry")
            .into_iter()
            .find(|e| e.attrs["key"] == "k")
            .unwrap();
        assert_eq!(entry.text, format!("{nasty}\tline\nnext"));
        assert_eq!(
            one(&nodes, "domain/qemu:commandline/qemu:arg").attrs["value"],
            nasty
        );
        // Nothing but the escaped value became an element.
        assert_eq!(all(&nodes, "domain/name/x").len(), 0);
    }

    #[test]
    fn test_minimal_spec_leaves_optional_elements_out() {
        let spec = DomainSpec {
            name: "a".into(),
            uuid: "4b9f1a52-3c1e-4f0a-9a57-1d2b3c4d5e6f".into(),
            memory_mib: 128,
            vcpus: 1,
            machine: "q35".into(),
            accel: Accel::Kvm as i32,
            ..Default::default()
        };
        let xml = to_xml(&spec).unwrap();
        let nodes = parse(&xml);
        assert_eq!(one(&nodes, "domain").attrs["type"], "kvm");
        assert_eq!(one(&nodes, "domain/memory").text, "131072");
        for absent in [
            "domain/metadata",
            "domain/os/kernel",
            "domain/os/initrd",
            "domain/os/cmdline",
            "domain/devices/disk",
            "domain/devices/interface",
            "domain/devices/serial",
            "domain/qemu:commandline",
        ] {
            assert!(all(&nodes, absent).is_empty(), "{absent}: {xml}");
        }
        assert!(
            xml.starts_with("<domain type=\"kvm\">\n  <name>a</name>\n"),
            "{xml}"
        );
    }

    #[test]
    fn test_values_xml_cannot_carry_are_refused_by_field() {
        let mut spec = full_spec();
        spec.cmdline = "console=ttyS0\u{1}".into();
        match to_xml(&spec) {
            Err(XmlError::Unrepresentable { field, found }) => {
                assert_eq!(field, "cmdline");
                assert_eq!(found, '\u{1}');
            }
            other => panic!("{other:?}"),
        }
        let mut spec = full_spec();
        spec.extra_args.push("\u{FFFE}".into());
        match to_xml(&spec) {
            Err(XmlError::Unrepresentable { field, .. }) => assert_eq!(field, "extra_args[2]"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn test_disk_targets_are_libvirts() {
        let names: Vec<String> = [0, 1, 25, 26, 27, 51, 52, 701, 702]
            .into_iter()
            .map(disk_target)
            .collect();
        assert_eq!(
            names,
            [
                "vda", "vdb", "vdz", "vdaa", "vdab", "vdaz", "vdba", "vdzz", "vdaaa"
            ]
        );
    }
}
