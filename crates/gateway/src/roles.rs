//! The one role table: every public method and the role it needs.
//!
//! As libvirt's read-only connection: reads, and the typed domain-event
//! subscription, need `read-only`; every change, the raw escapes
//! (`MonitorCommand`, the agent's `Command`), anything that runs or reads
//! in the guest (`Exec`, its status, file reads and writes), freezing
//! filesystems, and raw monitor-event subscriptions (duplicate
//! registrations could exhaust the server's memory: not for read-only
//! users) need `read-write`.
//!
//! A method in a public service with no row here is not forwarded
//! (UNIMPLEMENTED, as for an unknown method); a test walks the descriptor
//! set and fails if a public method lacks a row or a row names no method.
//! `docs/GATEWAY.md`'s role table is [`markdown_table`], checked by a test.

use std::fmt;

use serde::{Deserialize, Serialize};

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Reads and domain-event subscriptions.
    ReadOnly,
    /// Everything public.
    ReadWrite,
}

impl Role {
    /// The role's name as config files and errors spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::ReadOnly => "read-only",
            Role::ReadWrite => "read-write",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "read-only" => Ok(Role::ReadOnly),
            "read-write" => Ok(Role::ReadWrite),
            other => Err(format!(
                "unknown role {other:?}: expected read-only or read-write"
            )),
        }
    }
}

/// The public services the gateway serves, each forwarded to its backend.
pub const PUBLIC_SERVICES: [&str; 3] = [
    "qvirt.v1.Supervisor",
    "qvirt.v1.EventBus",
    "qvirt.v1.GuestAgent",
];

/// The subscription counted by the per-principal monitor-event limit.
pub const MONITOR_SUBSCRIPTION: &str = "/qvirt.v1.EventBus/SubscribeMonitorEvents";

use Role::{ReadOnly as RO, ReadWrite as RW};

/// (service, method, role) for every public method.
pub const ROLES: &[(&str, &str, Role)] = &[
    ("qvirt.v1.Supervisor", "DefineDomain", RW),
    ("qvirt.v1.Supervisor", "UndefineDomain", RW),
    ("qvirt.v1.Supervisor", "ListDomains", RO),
    ("qvirt.v1.Supervisor", "GetDomain", RO),
    ("qvirt.v1.Supervisor", "StartDomain", RW),
    ("qvirt.v1.Supervisor", "ShutdownDomain", RW),
    ("qvirt.v1.Supervisor", "DestroyDomain", RW),
    ("qvirt.v1.Supervisor", "SuspendDomain", RW),
    ("qvirt.v1.Supervisor", "ResumeDomain", RW),
    ("qvirt.v1.Supervisor", "ResetDomain", RW),
    ("qvirt.v1.Supervisor", "RebootDomain", RW),
    ("qvirt.v1.Supervisor", "MonitorCommand", RW),
    ("qvirt.v1.Supervisor", "SaveDomain", RW),
    ("qvirt.v1.Supervisor", "RestoreDomain", RW),
    ("qvirt.v1.EventBus", "SubscribeDomainEvents", RO),
    ("qvirt.v1.EventBus", "SubscribeMonitorEvents", RW),
    ("qvirt.v1.GuestAgent", "Ping", RO),
    ("qvirt.v1.GuestAgent", "GetAgentInfo", RO),
    ("qvirt.v1.GuestAgent", "GetTime", RO),
    ("qvirt.v1.GuestAgent", "GetOsInfo", RO),
    ("qvirt.v1.GuestAgent", "GetHostName", RO),
    ("qvirt.v1.GuestAgent", "GetTimezone", RO),
    ("qvirt.v1.GuestAgent", "ListUsers", RO),
    ("qvirt.v1.GuestAgent", "ListNetworkInterfaces", RO),
    ("qvirt.v1.GuestAgent", "GetFsInfo", RO),
    ("qvirt.v1.GuestAgent", "GetFreezeStatus", RO),
    ("qvirt.v1.GuestAgent", "FreezeFilesystems", RW),
    ("qvirt.v1.GuestAgent", "ThawFilesystems", RW),
    ("qvirt.v1.GuestAgent", "Exec", RW),
    ("qvirt.v1.GuestAgent", "GetExecStatus", RW),
    ("qvirt.v1.GuestAgent", "ReadFile", RW),
    ("qvirt.v1.GuestAgent", "WriteFile", RW),
    ("qvirt.v1.GuestAgent", "Shutdown", RW),
    ("qvirt.v1.GuestAgent", "Command", RW),
    ("qvirt.v1.GuestAgent", "GetGuestVcpus", RO),
    ("qvirt.v1.GuestAgent", "SetGuestVcpus", RW),
    ("qvirt.v1.GuestAgent", "SetUserPassword", RW),
    ("qvirt.v1.GuestAgent", "GetAuthorizedKeys", RO),
    ("qvirt.v1.GuestAgent", "AddAuthorizedKeys", RW),
    ("qvirt.v1.GuestAgent", "RemoveAuthorizedKeys", RW),
];

/// The role `/SERVICE/METHOD` needs, if it is a public method.
pub fn role_of(path: &str) -> Option<Role> {
    let (service, method) = split_path(path)?;
    ROLES
        .iter()
        .find(|(s, m, _)| *s == service && *m == method)
        .map(|(_, _, r)| *r)
}

/// `("SERVICE", "METHOD")` of a gRPC path `/SERVICE/METHOD`.
pub fn split_path(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix('/')?;
    let (service, method) = rest.split_once('/')?;
    (!service.is_empty() && !method.is_empty() && !method.contains('/'))
        .then_some((service, method))
}

/// The role table as the markdown table in `docs/GATEWAY.md`.
pub fn markdown_table() -> String {
    let mut out = String::from("| method | role |\n|---|---|\n");
    for (service, method, role) in ROLES {
        out.push_str(&format!("| `{service}/{method}` | {role} |\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeSet;

    use prost::Message as _;
    use prost_types::FileDescriptorSet;

    use super::*;

    /// Every method of every public service in the descriptor set (what
    /// the gateway's reflection is built from), internal ones left out.
    fn public_methods() -> BTreeSet<(String, String)> {
        let set = FileDescriptorSet::decode(qvirt_proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut out = BTreeSet::new();
        for file in &set.file {
            for svc in &file.service {
                let name = format!("{}.{}", file.package(), svc.name());
                if !PUBLIC_SERVICES.contains(&name.as_str()) {
                    continue;
                }
                for m in &svc.method {
                    out.insert((name.clone(), m.name().to_owned()));
                }
            }
        }
        out
    }

    #[test]
    fn test_every_public_method_has_exactly_one_row_and_every_row_a_method() {
        let methods = public_methods();
        let rows: Vec<(String, String)> = ROLES
            .iter()
            .map(|(s, m, _)| ((*s).to_owned(), (*m).to_owned()))
            .collect();
        let unique: BTreeSet<_> = rows.iter().cloned().collect();
        assert_eq!(unique.len(), rows.len(), "a method has two rows");
        let missing: Vec<_> = methods.difference(&unique).collect();
        assert!(
            missing.is_empty(),
            "public methods without a role: {missing:?}"
        );
        let stale: Vec<_> = unique.difference(&methods).collect();
        assert!(stale.is_empty(), "rows naming no public method: {stale:?}");
    }

    #[test]
    fn test_libvirt_rule_monitor_events_need_read_write() {
        assert_eq!(role_of(MONITOR_SUBSCRIPTION), Some(Role::ReadWrite));
        assert_eq!(
            role_of("/qvirt.v1.EventBus/SubscribeDomainEvents"),
            Some(Role::ReadOnly)
        );
        assert_eq!(
            role_of("/qvirt.v1.Supervisor/MonitorCommand"),
            Some(Role::ReadWrite)
        );
        assert_eq!(role_of("/qvirt.v1.HookExecutor/RunHook"), None);
        assert_eq!(role_of("/qvirt.v1.Supervisor/"), None);
        assert_eq!(role_of("qvirt.v1.Supervisor/ListDomains"), None);
    }

    #[test]
    fn test_docs_role_table_is_the_code_table() {
        let doc = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/GATEWAY.md"),
        )
        .unwrap();
        let begin = "<!-- role-table:begin -->\n";
        let end = "<!-- role-table:end -->";
        let start = doc.find(begin).expect("role-table:begin marker") + begin.len();
        let stop = doc.find(end).expect("role-table:end marker");
        assert_eq!(
            &doc[start..stop],
            markdown_table(),
            "docs/GATEWAY.md's role table differs from roles::ROLES; paste markdown_table()"
        );
    }
}
