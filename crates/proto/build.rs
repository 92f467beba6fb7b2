//! Compiles `proto/qvirt/v1/*.proto` with protox (pure Rust, no system
//! `protoc`), writes the encoded descriptor set for server reflection, and
//! hands the same set to tonic's prost code generator.

use std::path::PathBuf;

use prost::Message;

/// Messages that make up a YAML domain file.
/// (`NetworkSpec` implements serde by hand in `src/yaml.rs`: its oneof is
/// written as its own key, which derives cannot express, since prost hands
/// a oneof field's attributes to the oneof's variants too.)
const YAML_MESSAGES: [&str; 5] = [
    ".qvirt.v1.DomainSpec",
    ".qvirt.v1.DiskSpec",
    ".qvirt.v1.UserNetwork",
    ".qvirt.v1.PortForward",
    ".qvirt.v1.TapNetwork",
];

/// Per-field serde adapters of the YAML domain file.
const YAML_FIELDS: [(&str, &str); 3] = [
    (
        ".qvirt.v1.DomainSpec.accel",
        "#[serde(with = \"crate::yaml::accel\")]",
    ),
    (
        ".qvirt.v1.DiskSpec.format",
        "#[serde(with = \"crate::yaml::disk_format\")]",
    ),
    (
        ".qvirt.v1.PortForward.protocol",
        "#[serde(with = \"crate::yaml::port_forward_protocol\")]",
    ),
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let dir = root.join("qvirt/v1");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    files.sort();
    println!("cargo:rerun-if-changed={}", dir.display());
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }

    let fds = protox::compile(&files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("qvirt_descriptor.bin"), fds.encode_to_vec())?;

    let mut builder = tonic_prost_build::configure();
    // YAML domain files are the DomainSpec message itself: serde derives on
    // the generated types, enum fields as short lowercase names, unknown
    // keys rejected (adapters in `src/yaml.rs`).
    for message in YAML_MESSAGES {
        builder = builder.message_attribute(
            message,
            "#[derive(serde::Deserialize, serde::Serialize)] \
             #[serde(default, deny_unknown_fields)]",
        );
    }
    for (field, attribute) in YAML_FIELDS {
        builder = builder.field_attribute(field, attribute);
    }
    // Metadata in key order, so its YAML and XML are the same every time.
    builder = builder.btree_map(".qvirt.v1.DomainSpec.metadata");
    builder
        .build_client(true)
        .build_server(true)
        .generate_default_stubs(true)
        // Small initial codec buffers: long-lived streams (event
        // subscriptions) would otherwise hold 8 KiB each while idle.
        .codec_path("crate::codec::Codec")
        .compile_fds(fds)?;
    Ok(())
}
