//! Generated protobuf and gRPC code for the `qvirt.v1` package.
//!
//! Owns nothing but generated code: every message, enum, client and server
//! trait declared under `proto/qvirt/v1/`, plus the encoded file descriptor
//! set that servers register for reflection. No hand-written copies of these
//! types exist anywhere else in the workspace.
//!
//! The domain spec messages also derive serde, so a YAML domain file is the
//! `DomainSpec` message itself ([`yaml`]).
//!
//! Server traits are generated with default methods that answer
//! `UNIMPLEMENTED`, so a service implements only the RPCs it supports.
#![allow(missing_docs, clippy::all)]

/// The `qvirt.v1` package: messages, enums, clients (`*_client`) and
/// servers (`*_server`).
pub mod v1 {
    tonic::include_proto!("qvirt.v1");
}

pub mod codec;
pub mod yaml;

/// The encoded `FileDescriptorSet` of every `qvirt.v1` file, for
/// `tonic_reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("qvirt_descriptor");
