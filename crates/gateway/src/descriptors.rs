//! What the gateway knows of the public API, from the embedded descriptor
//! set: the files its reflection describes (public services only, their
//! internal methods removed), and per public method its streaming shape
//! and where its request keeps `domain`, `host` and `request_id` (for
//! audit lines and a fleet gateway's routing, read from the raw bytes
//! without decoding the message).

use std::collections::HashMap;

use prost::Message as _;
use prost_types::field_descriptor_proto::Type;
use prost_types::{DescriptorProto, FileDescriptorProto, FileDescriptorSet};

use crate::roles::{self, Role};

/// One public method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Method {
    /// `qvirt.v1.Supervisor` etc.
    pub service: &'static str,
    /// The role it needs.
    pub role: Role,
    /// The client sends a stream of messages.
    pub client_streaming: bool,
    /// The server answers with a stream.
    pub server_streaming: bool,
    /// Field number of a top-level string `domain` in the request.
    pub domain_field: Option<u32>,
    /// Field number of a top-level string `request_id` in the request.
    pub request_id_field: Option<u32>,
    /// Field number of a top-level string `host` in the request (the
    /// host a fleet gateway routes a domain's call to).
    pub host_field: Option<u32>,
}

/// The descriptor set does not hold what the role table names (a build
/// defect, caught by the role table's tests).
#[derive(Debug, thiserror::Error)]
pub enum DescriptorError {
    /// The embedded set does not decode.
    #[error("cannot decode the embedded descriptor set")]
    Decode(#[source] prost::DecodeError),
    /// A role-table row names no method.
    #[error("the role table names {0}, which the descriptor set does not define")]
    Missing(String),
}

fn full_name(file: &FileDescriptorProto, name: &str) -> String {
    format!("{}.{}", file.package(), name)
}

fn message<'a>(set: &'a FileDescriptorSet, type_name: &str) -> Option<&'a DescriptorProto> {
    let wanted = type_name.strip_prefix('.').unwrap_or(type_name);
    set.file.iter().find_map(|f| {
        f.message_type
            .iter()
            .find(|m| full_name(f, m.name()) == wanted)
    })
}

fn string_field(msg: Option<&DescriptorProto>, name: &str) -> Option<u32> {
    msg?.field
        .iter()
        .find(|f| f.name() == name && f.r#type() == Type::String)
        .and_then(|f| u32::try_from(f.number()).ok())
}

/// Every public method by its path `/SERVICE/METHOD`.
pub fn methods() -> Result<HashMap<String, Method>, DescriptorError> {
    let set = FileDescriptorSet::decode(qvirt_proto::FILE_DESCRIPTOR_SET)
        .map_err(DescriptorError::Decode)?;
    let mut out = HashMap::new();
    for &(service, method, role) in roles::ROLES {
        let found = set.file.iter().find_map(|f| {
            f.service
                .iter()
                .filter(|s| full_name(f, s.name()) == service)
                .find_map(|s| s.method.iter().find(|m| m.name() == method))
        });
        let m = found.ok_or_else(|| DescriptorError::Missing(format!("{service}/{method}")))?;
        let input = message(&set, m.input_type());
        out.insert(
            format!("/{service}/{method}"),
            Method {
                service,
                role,
                client_streaming: m.client_streaming(),
                server_streaming: m.server_streaming(),
                domain_field: string_field(input, "domain"),
                request_id_field: string_field(input, "request_id"),
                host_field: string_field(input, "host"),
            },
        );
    }
    Ok(out)
}

/// The files reflection describes: those defining a public service, with
/// their imports, every other service removed and the public services'
/// internal methods removed.
pub fn reflection_files() -> Result<FileDescriptorSet, DescriptorError> {
    let all = FileDescriptorSet::decode(qvirt_proto::FILE_DESCRIPTOR_SET)
        .map_err(DescriptorError::Decode)?;
    let defines_public = |f: &FileDescriptorProto| {
        f.service
            .iter()
            .any(|s| roles::PUBLIC_SERVICES.contains(&full_name(f, s.name()).as_str()))
    };
    let mut wanted: Vec<String> = all
        .file
        .iter()
        .filter(|f| defines_public(f))
        .map(|f| f.name().to_owned())
        .collect();
    let mut i = 0;
    while let Some(name) = wanted.get(i).cloned() {
        if let Some(file) = all.file.iter().find(|f| f.name() == name) {
            for dep in &file.dependency {
                if !wanted.contains(dep) {
                    wanted.push(dep.clone());
                }
            }
        }
        i += 1;
    }
    let file = all
        .file
        .into_iter()
        .filter(|f| wanted.iter().any(|w| w == f.name()))
        .map(|mut f| {
            let package = f.package().to_owned();
            f.service.retain(|s| {
                roles::PUBLIC_SERVICES.contains(&format!("{package}.{}", s.name()).as_str())
            });
            f
        })
        .collect();
    Ok(FileDescriptorSet { file })
}

/// The values of the top-level string fields `numbers` in the gRPC-framed,
/// uncompressed protobuf message `frame`: `None` when the frame is
/// compressed or malformed (so a router never guesses), else for each
/// number its value (empty when absent, as protobuf reads it; the last
/// occurrence wins).
pub fn strings_in_frame<const N: usize>(frame: &[u8], numbers: [u32; N]) -> Option<[String; N]> {
    let (head, msg) = frame.split_first_chunk::<5>()?;
    let [compressed, a, b, c, d] = *head;
    if compressed != 0 {
        return None;
    }
    let len = u32::from_be_bytes([a, b, c, d]) as usize;
    let mut buf = msg.get(..len)?;
    if msg.len() != len {
        return None;
    }
    let mut found: [String; N] = std::array::from_fn(|_| String::new());
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                varint(&mut buf)?;
            }
            1 => buf = buf.get(8..)?,
            5 => buf = buf.get(4..)?,
            2 => {
                let n = usize::try_from(varint(&mut buf)?).ok()?;
                let value = buf.get(..n)?;
                for (slot, wanted) in found.iter_mut().zip(numbers) {
                    if field == u64::from(wanted) {
                        *slot = std::str::from_utf8(value).ok()?.to_owned();
                    }
                }
                buf = &buf[n..];
            }
            _ => return None,
        }
    }
    Some(found)
}

/// The string value of top-level field `number` in the gRPC-framed,
/// uncompressed protobuf message `frame`, as [`strings_in_frame`] reads
/// it; `None` when absent or empty, or when the frame is compressed or
/// malformed.
pub fn string_in_frame(frame: &[u8], number: u32) -> Option<String> {
    let [value] = strings_in_frame(frame, [number])?;
    (!value.is_empty()).then_some(value)
}

fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for i in 0..10 {
        let (&byte, rest) = buf.split_first()?;
        *buf = rest;
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use prost::Message as _;
    use qvirt_proto::v1::StartDomainRequest;

    use super::*;

    #[test]
    fn test_methods_know_shapes_and_audit_fields() {
        let methods = methods().unwrap();
        let start = &methods["/qvirt.v1.Supervisor/StartDomain"];
        assert_eq!(start.role, Role::ReadWrite);
        assert!(!start.server_streaming);
        assert!(start.domain_field.is_some());
        let sub = &methods["/qvirt.v1.EventBus/SubscribeMonitorEvents"];
        assert!(sub.server_streaming);
        assert!(!methods.contains_key("/qvirt.v1.EventBus/Publish"));
    }

    #[test]
    fn test_reflection_files_hold_public_services_without_internal_methods() {
        let set = reflection_files().unwrap();
        let services: Vec<String> = set
            .file
            .iter()
            .flat_map(|f| f.service.iter().map(move |s| full_name(f, s.name())))
            .collect();
        let mut sorted = services.clone();
        sorted.sort();
        let mut want: Vec<String> = roles::PUBLIC_SERVICES
            .iter()
            .map(|s| s.to_string())
            .collect();
        want.sort();
        assert_eq!(sorted, want);
        let bus = set
            .file
            .iter()
            .flat_map(|f| f.service.iter())
            .find(|s| s.name() == "EventBus")
            .unwrap();
        assert!(bus.method.iter().all(|m| m.name() != "Publish"));
    }

    #[test]
    fn test_string_in_frame_reads_one_field() {
        let method = &methods().unwrap()["/qvirt.v1.Supervisor/StartDomain"];
        let field = method.domain_field.unwrap();
        let msg = StartDomainRequest {
            domain: "vm-é".into(),
            paused: true,
            request_id: "r-1".into(),
            ..Default::default()
        }
        .encode_to_vec();
        let mut frame = vec![0];
        frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        frame.extend_from_slice(&msg);
        assert_eq!(string_in_frame(&frame, field).as_deref(), Some("vm-é"));
        let request_id = method.request_id_field.unwrap();
        assert_eq!(string_in_frame(&frame, request_id).as_deref(), Some("r-1"));
        assert_eq!(string_in_frame(&frame, 99), None);
        assert_eq!(string_in_frame(&frame[..4], field), None);
        frame[0] = 1;
        assert_eq!(string_in_frame(&frame, field), None);
        // Truncated garbage never panics.
        for cut in 0..frame.len() {
            let mut f = frame[..cut].to_vec();
            if f.len() > 4 {
                f[0] = 0;
            }
            let _ = string_in_frame(&f, field);
        }
    }

    #[test]
    fn test_strings_in_frame_reads_domain_and_host_or_refuses() {
        let methods = methods().unwrap();
        let method = &methods["/qvirt.v1.Supervisor/StartDomain"];
        let fields = [method.domain_field.unwrap(), method.host_field.unwrap()];
        let frame = |msg: Vec<u8>| {
            let mut frame = vec![0];
            frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
            frame.extend_from_slice(&msg);
            frame
        };
        let with_host = frame(
            StartDomainRequest {
                domain: "vm".into(),
                host: "h2".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        );
        assert_eq!(
            strings_in_frame(&with_host, fields),
            Some(["vm".to_owned(), "h2".to_owned()])
        );
        let without = frame(
            StartDomainRequest {
                domain: "vm".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        );
        assert_eq!(
            strings_in_frame(&without, fields),
            Some(["vm".to_owned(), String::new()])
        );
        assert_eq!(
            strings_in_frame(&frame(Vec::new()), fields),
            Some([String::new(), String::new()])
        );
        let mut compressed = with_host.clone();
        compressed[0] = 1;
        assert_eq!(strings_in_frame(&compressed, fields), None);
        assert_eq!(
            strings_in_frame(&with_host[..with_host.len() - 1], fields),
            None
        );
        let mut longer = with_host.clone();
        longer.push(0);
        assert_eq!(strings_in_frame(&longer, fields), None);
        assert!(methods["/qvirt.v1.GuestAgent/Exec"].host_field.is_some());
        assert!(
            methods["/qvirt.v1.Supervisor/ListDomains"]
                .domain_field
                .is_none()
        );
    }
}
