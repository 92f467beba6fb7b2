//! `deploy/docker-compose.yml` as docker-compose itself reads it: valid for
//! the compose schema, one service per qvirt daemon plus the QEMU launcher,
//! each gRPC service health-checked by `qvirtctl health`, only the gateway
//! published (on loopback), the backends on an internal network, and the
//! supervisor in the launcher's pid namespace.
//!
//! This validates the file with the real docker-compose, which needs no
//! container engine. Bringing the stack up is scripts/test-deploy.sh
//! (`make test-deploy`).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use qvirt_integration_tests::{COMMAND_TIMEOUT, run, text, tool_path, workspace_root};
use serde_yaml::Value;

fn compose_config() -> Value {
    let file = workspace_root().join("deploy/docker-compose.yml");
    // The bind-mounted paths need not exist for `config`.
    let out = run(
        &tool_path("docker-compose"),
        &[
            "-p",
            "qvirtconfigcheck",
            "-f",
            file.to_str().unwrap(),
            "config",
        ],
        COMMAND_TIMEOUT,
    );
    assert!(
        out.status.success(),
        "docker-compose config: {}",
        text(&out.stderr)
    );
    serde_yaml::from_slice(&out.stdout).unwrap()
}

#[test]
fn test_compose_file_runs_every_service_and_publishes_only_the_gateway() {
    let config = compose_config();
    let services = config["services"].as_mapping().unwrap();
    let names: BTreeSet<&str> = services.keys().filter_map(Value::as_str).collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "agentd",
            "eventbus",
            "gateway",
            "hookexec",
            "supervisor",
            "vmm"
        ])
    );
    assert_eq!(config["networks"]["backend"]["internal"], Value::Bool(true));

    let vmm = &services["vmm"];
    assert_eq!(vmm["command"][0].as_str(), Some("qvirt-vmm"));
    assert_eq!(vmm["network_mode"].as_str(), Some("none"));
    assert!(vmm.get("ports").is_none());
    let supervisor = &services["supervisor"];
    assert_eq!(supervisor["pid"].as_str(), Some("service:vmm"));
    let command = serde_yaml::to_string(&supervisor["command"]).unwrap();
    assert!(command.contains("--launcher-socket"), "{command}");

    for (name, svc) in services {
        let name = name.as_str().unwrap();
        if name == "vmm" {
            continue;
        }
        let command: Vec<&str> = svc["command"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(command[0], format!("qvirt-{name}"), "{name}: {command:?}");
        let listen = command[command.iter().position(|a| *a == "--listen").unwrap() + 1];
        let port = listen.rsplit(':').next().unwrap();

        let check: Vec<&str> = svc["healthcheck"]["test"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(
            check,
            [
                "CMD",
                "qvirtctl",
                "--connect",
                &format!("http://127.0.0.1:{port}"),
                "health"
            ],
            "{name}"
        );

        let ports = svc.get("ports").and_then(Value::as_sequence);
        if name == "gateway" {
            let published = ports.unwrap();
            assert_eq!(published.len(), 1);
            let text = serde_yaml::to_string(&published[0]).unwrap();
            assert!(
                text.contains("127.0.0.1"),
                "gateway must publish on loopback: {text}"
            );
            assert!(text.contains("50051"), "{text}");
        } else {
            assert!(ports.is_none(), "{name} must not publish a port");
            let networks = svc["networks"].as_mapping().unwrap();
            let networks: Vec<&str> = networks.keys().filter_map(Value::as_str).collect();
            assert_eq!(networks, ["backend"], "{name}");
        }
    }
}
