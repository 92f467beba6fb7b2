//! The operations page stays true to the code: every config key of every
//! service is documented in its section of docs/OPERATIONS.md, and every
//! key documented there exists.

use std::collections::BTreeSet;
use std::path::Path;

/// The top-level keys of a service's config, as its YAML file spells them.
fn keys<T: serde::Serialize>(config: &T) -> BTreeSet<String> {
    let value = serde_yaml::to_value(config).expect("config serializes");
    let map = value.as_mapping().expect("config is a mapping");
    map.keys()
        .map(|k| k.as_str().expect("string key").to_owned())
        .collect()
}

/// The text of the `### TITLE...` section of `doc`, up to the next heading.
fn section<'a>(doc: &'a str, title: &str) -> &'a str {
    let start = doc
        .find(&format!("### {title}"))
        .unwrap_or_else(|| panic!("docs/OPERATIONS.md has no section `### {title}`"));
    let rest = &doc[start + 4..];
    let end = rest.find("\n#").map_or(rest.len(), |i| i + 1);
    &rest[..end]
}

/// The keys named in the first column of the section's config tables
/// (those whose header's first cell is `key`).
fn documented(section: &str) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut in_key_table = false;
    for line in section.lines() {
        if !line.starts_with('|') {
            in_key_table = false;
        } else if line.starts_with("| key |") {
            in_key_table = true;
        } else if in_key_table && let Some(rest) = line.strip_prefix("| `") {
            keys.extend(rest.split('`').next().map(str::to_owned));
        }
    }
    keys
}

#[test]
fn test_every_config_key_is_in_the_operations_page() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/OPERATIONS.md");
    let doc = std::fs::read_to_string(&path).expect("read docs/OPERATIONS.md");
    let shared = documented(section(&doc, "Every service"));
    let services = [
        ("Supervisor", keys(&qvirt_supervisor::Config::default())),
        ("Event bus", keys(&qvirt_eventbus::Config::default())),
        ("Hook executor", keys(&qvirt_hookexec::Config::default())),
        ("Agent service", keys(&qvirt_agentd::Config::default())),
        ("Gateway", keys(&qvirt_gateway::Config::default())),
    ];
    let mut problems = Vec::new();
    let mut all_keys = BTreeSet::new();
    for (title, keys) in &services {
        let own = documented(section(&doc, title));
        for key in keys {
            if !own.contains(key) && !shared.contains(key) {
                problems.push(format!("{title}: `{key}` is not documented"));
            }
        }
        for key in &own {
            if !keys.contains(key) {
                problems.push(format!(
                    "{title}: `{key}` is documented but is no config key"
                ));
            }
        }
        all_keys.extend(keys.iter().cloned());
    }
    for key in &shared {
        if services.iter().any(|(_, keys)| !keys.contains(key)) {
            problems.push(format!(
                "Every service: `{key}` is not a key of every service"
            ));
        }
    }
    assert!(problems.is_empty(), "docs/OPERATIONS.md: {problems:#?}");
}
