//! `deploy/docker-compose.yml` as docker-compose itself reads it: valid for
//! the compose schema, one service per qvirt daemon plus the QEMU launcher,
//! each gRPC service health-checked by `qvirtctl health`, only the gateway
//! published (on loopback), the backends on an internal network, and the
//! supervisor in the launcher's pid namespace.
//!
//! The fleet's `deploy/fleet/docker-compose.yml` likewise: 3 NATS servers
//! in one JetStream cluster, 3 hosts each with a state volume of its own,
//! 2 gateways each beside a fleet bus, only the gateways published.
//!
//! This validates the files with the real docker-compose, which needs no
//! container engine. Bringing them up is scripts/test-deploy.sh (`make
//! test-deploy`) and scripts/test-fleet.sh (`make test-fleet`).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use qvirt_integration_tests::{COMMAND_TIMEOUT, run, text, tool_path, workspace_root};
use serde_yaml::Value;

fn compose_config() -> Value {
    compose_config_of("deploy/docker-compose.yml")
}

fn compose_config_of(path: &str) -> Value {
    let file = workspace_root().join(path);
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
        // Every backend serves (and the gateway calls) with the internal
        // secret: a backend without it would refuse every caller.
        let token = command
            .iter()
            .position(|a| *a == "--internal-token-file")
            .map(|i| command[i + 1]);
        assert_eq!(
            token,
            Some("/etc/qvirt/internal-token"),
            "{name}: {command:?}"
        );
        let volumes = serde_yaml::to_string(&svc["volumes"]).unwrap();
        assert!(
            volumes.contains("internal-token:/etc/qvirt/internal-token:ro"),
            "{name}: {volumes}"
        );

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

fn strings(v: &Value) -> Vec<&str> {
    v.as_sequence()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect()
}

#[test]
fn test_fleet_compose_file_runs_three_nats_three_hosts_two_gateways() {
    let config = compose_config_of("deploy/fleet/docker-compose.yml");
    let services = config["services"].as_mapping().unwrap();
    let names: BTreeSet<&str> = services.keys().filter_map(Value::as_str).collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "nats1", "nats2", "nats3", "host1", "host2", "host3", "gw1", "gw1-bus", "gw2",
            "gw2-bus"
        ])
    );
    assert_eq!(config["networks"]["fleet"]["internal"], Value::Bool(true));
    let mut state_volumes = BTreeSet::new();
    for (name, svc) in services {
        let name = name.as_str().unwrap();
        let command = strings(&svc["command"]);
        let networks: Vec<&str> = svc["networks"]
            .as_mapping()
            .unwrap()
            .keys()
            .filter_map(Value::as_str)
            .collect();
        let ports = svc.get("ports").and_then(Value::as_sequence);
        if name.starts_with("gw") && !name.ends_with("-bus") {
            let published = serde_yaml::to_string(ports.unwrap()).unwrap();
            assert!(published.contains("127.0.0.1"), "{name}: {published}");
            assert_eq!(networks, ["fleet", "public"], "{name}");
            let bus = format!("http://{name}-bus:50053");
            assert_eq!(
                command[command.iter().position(|a| *a == "--eventbus").unwrap() + 1],
                bus,
                "{name} uses the fleet bus beside it"
            );
        } else {
            assert!(ports.is_none(), "{name} must not publish a port");
            assert_eq!(networks, ["fleet"], "{name}");
        }
        let volumes = serde_yaml::to_string(&svc["volumes"]).unwrap();
        if name.starts_with("nats") {
            // Cluster, JetStream and auth come from fleet-init's nats.conf
            // (secrets are not put on a command line).
            assert_eq!(
                command,
                [
                    "nats-server",
                    "--config",
                    "/etc/nats/nats.conf",
                    "--name",
                    name
                ]
            );
            assert!(
                volumes.contains("/nats.conf:/etc/nats/nats.conf:ro"),
                "{name}: {volumes}"
            );
        } else {
            assert!(
                volumes.contains("/nats-token:/etc/qvirt/nats-token:ro"),
                "{name} presents the NATS token: {volumes}"
            );
        }
        if name.starts_with("host") {
            assert_eq!(command, ["qvirt-host-init"]);
            assert_eq!(svc["hostname"].as_str(), Some(name));
            assert!(
                volumes.contains(&format!("/config/{name}")),
                "{name} mounts its own config dir: {volumes}"
            );
            for v in strings(&svc["volumes"]) {
                let mut parts = v.split(':');
                let (source, target) = (parts.next().unwrap(), parts.next().unwrap());
                if target == "/var/lib/qvirt" {
                    state_volumes.insert(source.to_owned());
                }
            }
            let check = strings(&svc["healthcheck"]["test"]).join(" ");
            assert!(check.contains("qvirtctl"), "{name}: {check}");
        }
    }
    assert_eq!(state_volumes.len(), 3, "one state volume per host");
}
