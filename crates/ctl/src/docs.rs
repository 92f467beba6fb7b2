//! The virsh → qvirtctl table of docs/LIBVIRT.md, generated from the
//! command line itself (clap's command tree), so a test can fail when a
//! command or flag changes and the docs do not.

use clap::CommandFactory;

/// For each qvirtctl command: the virsh command it stands for (with the
/// virsh flags it takes over), and the gRPC method it calls.
pub const VIRSH: &[(&str, &str, &str)] = &[
    ("list", "`list`", "`Supervisor/ListDomains`"),
    ("dominfo", "`dominfo`", "`Supervisor/GetDomain`"),
    ("domstate", "`domstate`", "`Supervisor/GetDomain`"),
    (
        "define",
        "`define` (YAML, not XML)",
        "`Supervisor/DefineDomain`",
    ),
    ("undefine", "`undefine`", "`Supervisor/UndefineDomain`"),
    ("start", "`start`", "`Supervisor/StartDomain`"),
    (
        "shutdown",
        "`shutdown` (`--timeout` is qvirt's: wait for shut off)",
        "`Supervisor/ShutdownDomain`",
    ),
    ("reboot", "`reboot`", "`Supervisor/RebootDomain`"),
    ("destroy", "`destroy`", "`Supervisor/DestroyDomain`"),
    ("suspend", "`suspend`", "`Supervisor/SuspendDomain`"),
    ("resume", "`resume`", "`Supervisor/ResumeDomain`"),
    ("reset", "`reset`", "`Supervisor/ResetDomain`"),
    (
        "save",
        "`managedsave` (`save FILE`: the supervisor keeps the image)",
        "`Supervisor/SaveDomain`",
    ),
    (
        "restore",
        "`start` of a managed-saved domain (`restore FILE`)",
        "`Supervisor/RestoreDomain`",
    ),
    ("event", "`event`", "`EventBus/SubscribeDomainEvents`"),
    (
        "qemu-monitor-event",
        "`qemu-monitor-event`",
        "`EventBus/SubscribeMonitorEvents`",
    ),
    (
        "qemu-monitor-command",
        "`qemu-monitor-command` (QMP only, no `--hmp`)",
        "`Supervisor/MonitorCommand`",
    ),
    (
        "qemu-agent-command",
        "`qemu-agent-command`",
        "`GuestAgent/Command`",
    ),
    (
        "guestinfo",
        "`guestinfo` (no `--disk`)",
        "`GuestAgent/ListUsers`, `GetOsInfo`, `GetTimezone`, `GetHostName`, `GetFsInfo`, `ListNetworkInterfaces`",
    ),
    (
        "domfsfreeze",
        "`domfsfreeze`",
        "`GuestAgent/FreezeFilesystems`",
    ),
    ("domfsthaw", "`domfsthaw`", "`GuestAgent/ThawFilesystems`"),
    (
        "guestvcpus",
        "`guestvcpus`",
        "`GuestAgent/GetGuestVcpus`, `SetGuestVcpus`",
    ),
    (
        "set-user-password",
        "`set-user-password`",
        "`GuestAgent/SetUserPassword`",
    ),
    (
        "get-user-sshkeys",
        "`get-user-sshkeys`",
        "`GuestAgent/GetAuthorizedKeys`",
    ),
    (
        "set-user-sshkeys",
        "`set-user-sshkeys`",
        "`GuestAgent/AddAuthorizedKeys`, `RemoveAuthorizedKeys`",
    ),
    (
        "guest-exec",
        "– (`qemu-agent-command` with `guest-exec`, then `guest-exec-status`)",
        "`GuestAgent/Exec`",
    ),
    (
        "guest-file-read",
        "– (`qemu-agent-command` with `guest-file-open`/`-read`/`-close`)",
        "`GuestAgent/ReadFile`",
    ),
    (
        "guest-file-write",
        "– (`qemu-agent-command` with `guest-file-open`/`-write`/`-close`)",
        "`GuestAgent/WriteFile`",
    ),
    (
        "hooks list",
        "– (libvirt has no hook listing)",
        "`HookExecutor/ListHooks` (internal: the gateway refuses it)",
    ),
    ("health", "–", "`grpc.health.v1.Health/Check`"),
    ("version", "`version`", "–"),
    ("completion", "– (virsh completes itself)", "–"),
];

/// Options every command takes: not repeated in the table.
const GLOBAL: [&str; 5] = ["connect", "token-file", "json", "help", "version"];

/// Every command as `name` (nested ones `hooks list`) with its flags as
/// `name --flag ... ARG` (positionals in capitals, `-- PROGRAM...` for a
/// trailing command).
pub fn commands() -> Vec<(String, String)> {
    let root = crate::Cli::command();
    let mut out = Vec::new();
    for sub in root.get_subcommands() {
        if sub.has_subcommands() {
            for leaf in sub.get_subcommands() {
                let name = format!("{} {}", sub.get_name(), leaf.get_name());
                out.push((name.clone(), usage(&name, leaf)));
            }
        } else {
            out.push((sub.get_name().to_owned(), usage(sub.get_name(), sub)));
        }
    }
    out
}

fn usage(name: &str, cmd: &clap::Command) -> String {
    let mut words = vec![name.to_owned()];
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        if GLOBAL.contains(&id) {
            continue;
        }
        if let Some(long) = arg.get_long() {
            words.push(format!("--{long}"));
        } else if arg.is_positional() {
            let value = arg
                .get_value_names()
                .and_then(|v| v.first().map(|s| s.to_string()))
                .unwrap_or_else(|| id.to_uppercase());
            if arg.is_last_set() {
                words.push(format!("-- {value}..."));
            } else {
                words.push(value);
            }
        }
    }
    words.join(" ")
}

/// The table as docs/LIBVIRT.md holds it.
pub fn markdown_table() -> String {
    let mut out = String::from("| virsh | qvirtctl | calls |\n|---|---|---|\n");
    for (name, usage) in commands() {
        let (virsh, rpc) = VIRSH
            .iter()
            .find(|(n, _, _)| *n == name)
            .map_or(("?", "?"), |(_, v, r)| (*v, *r));
        out.push_str(&format!("| {virsh} | `{usage}` | {rpc} |\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_every_command_has_a_virsh_row_and_every_row_a_command() {
        let names: Vec<String> = commands().into_iter().map(|(n, _)| n).collect();
        for n in &names {
            assert!(VIRSH.iter().any(|(c, _, _)| c == n), "{n} has no VIRSH row");
        }
        for (c, _, _) in VIRSH {
            assert!(
                names.iter().any(|n| n == c),
                "VIRSH row {c} names no command"
            );
        }
    }

    #[test]
    fn test_usage_lists_virsh_flags() {
        let list = commands()
            .into_iter()
            .find(|(n, _)| n == "list")
            .map(|(_, u)| u);
        assert!(list.is_some_and(|u| u.starts_with("list --all --inactive --state-running")));
        let exec = commands()
            .into_iter()
            .find(|(n, _)| n == "guest-exec")
            .map(|(_, u)| u);
        assert!(
            exec.is_some_and(|u| u.ends_with("-- PROGRAM...")),
            "guest-exec"
        );
    }

    #[test]
    fn test_readme_example_guest_is_a_valid_definition() {
        let readme = include_str!("../../../README.md");
        let start = readme.find("# guest.yaml\n").expect("README's guest.yaml");
        let block = &readme[start..];
        let yaml = &block[..block.find("```").expect("end of the block")];
        let spec = qvirt_proto::v1::DomainSpec::from_yaml(yaml);
        assert!(spec.is_ok_and(|s| s.name == "guest" && s.agent), "{yaml}");
    }
}
