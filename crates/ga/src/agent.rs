//! The agent's dispatcher: qemu-ga's command table (schema order, the
//! `success-response` flags), enabling and disabling (the `-b` list, the
//! platform block list, the frozen allow-list), and the path of one message
//! from parsed JSON to response bytes.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use qvirt_qga::{
    Message, QgaError, Value, check_request, error_response, success_response, write_response,
};

use crate::args::Args;
use crate::commands;
use crate::log;
use crate::state::PersistentState;

/// What a command handler returns: `Ok(None)` for commands without a
/// return value (answered `{}`).
pub type CmdResult = Result<Option<Value>, QgaError>;

type Handler = fn(&mut Agent, &mut Args) -> CmdResult;

/// One registered command.
pub struct Command {
    /// Its name.
    pub name: &'static str,
    /// False for commands that answer nothing on success.
    pub success_response: bool,
    handler: Handler,
}

const fn cmd(name: &'static str, handler: Handler) -> Command {
    Command {
        name,
        success_response: true,
        handler,
    }
}

const fn quiet(name: &'static str, handler: Handler) -> Command {
    Command {
        name,
        success_response: false,
        handler,
    }
}

/// qemu-ga 7.2's commands on Linux, in schema (registration) order.
pub static COMMANDS: &[Command] = {
    use commands::*;
    &[
        cmd("guest-sync-delimited", basic::sync_delimited),
        cmd("guest-sync", basic::sync),
        cmd("guest-ping", basic::ping),
        cmd("guest-get-time", basic::get_time),
        cmd("guest-set-time", sysinfo::set_time),
        cmd("guest-info", basic::info),
        quiet("guest-shutdown", sysinfo::shutdown),
        cmd("guest-file-open", file::open),
        cmd("guest-file-close", file::close),
        cmd("guest-file-read", file::read),
        cmd("guest-file-write", file::write),
        cmd("guest-file-seek", file::seek),
        cmd("guest-file-flush", file::flush),
        cmd("guest-fsfreeze-status", fsfreeze::status),
        cmd("guest-fsfreeze-freeze", fsfreeze::freeze),
        cmd("guest-fsfreeze-freeze-list", fsfreeze::freeze_list),
        cmd("guest-fsfreeze-thaw", fsfreeze::thaw),
        cmd("guest-fstrim", disks::fstrim),
        quiet("guest-suspend-disk", suspend::disk),
        quiet("guest-suspend-ram", suspend::ram),
        quiet("guest-suspend-hybrid", suspend::hybrid),
        cmd("guest-network-get-interfaces", network::interfaces),
        cmd("guest-get-vcpus", cpu::get_vcpus),
        cmd("guest-set-vcpus", cpu::set_vcpus),
        cmd("guest-get-disks", disks::get_disks),
        cmd("guest-get-fsinfo", disks::get_fsinfo),
        cmd("guest-set-user-password", password::set_user_password),
        cmd("guest-get-memory-blocks", cpu::get_memory_blocks),
        cmd("guest-set-memory-blocks", cpu::set_memory_blocks),
        cmd("guest-get-memory-block-info", cpu::get_memory_block_info),
        cmd("guest-exec-status", exec::status),
        cmd("guest-exec", exec::exec),
        cmd("guest-get-host-name", sysinfo::host_name),
        cmd("guest-get-users", sysinfo::users),
        cmd("guest-get-timezone", sysinfo::timezone),
        cmd("guest-get-osinfo", sysinfo::osinfo),
        cmd("guest-get-devices", unsupported::no_args),
        cmd("guest-ssh-get-authorized-keys", ssh::get),
        cmd("guest-ssh-add-authorized-keys", ssh::add),
        cmd("guest-ssh-remove-authorized-keys", ssh::remove),
        cmd("guest-get-diskstats", diskstats::get_diskstats),
        cmd("guest-get-cpustats", cpu::get_cpustats),
    ]
};

/// Commands qemu-ga blocks on every POSIX build.
pub const PLATFORM_BLOCKED: &[&str] = &["guest-get-devices"];

/// The commands that still run while filesystems are frozen.
pub const FREEZE_ALLOWLIST: &[&str] = &[
    "guest-ping",
    "guest-info",
    "guest-sync",
    "guest-sync-delimited",
    "guest-fsfreeze-status",
    "guest-fsfreeze-thaw",
];

/// The disable reason while frozen.
const FROZEN: &str = "the agent is in frozen state";
/// The disable reason of a command left out of `-a`.
const NOT_ALLOWED: &str = "the command is not allowed";

/// Static settings the agent runs with.
#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// The state directory.
    pub statedir: PathBuf,
    /// Commands blocked with `-b` (unknown names are ignored).
    pub blocked: Vec<String>,
    /// The fsfreeze hook script, if `-F` was given.
    pub fsfreeze_hook: Option<PathBuf>,
    /// `-a`: if not empty, only these commands are enabled.
    pub allowed: Vec<String>,
    /// `-l` when the agent started frozen: opened at the thaw, as
    /// qemu-ga defers it (the file may be on a frozen filesystem).
    pub deferred_logfile: Option<PathBuf>,
    /// `-f` of a daemon that started frozen: written and locked at the
    /// thaw.
    pub deferred_pidfile: Option<PathBuf>,
}

/// The running agent: its state and the one-shot delimiter flag.
pub struct Agent {
    /// Settings.
    pub options: AgentOptions,
    /// Persistent state (file handle counter, frozen marker).
    pub state: PersistentState,
    /// Whether the agent is in frozen mode.
    pub frozen: bool,
    /// Set by guest-sync-delimited: the next response gets a 0xFF.
    pub delimit_next: bool,
    /// `-b` plus the platform list (what a thaw leaves disabled).
    blocked: HashSet<&'static str>,
    /// Disabled commands and their reason (`""`: none), as qemu-ga's
    /// command table keeps one per command.
    disabled: HashMap<&'static str, &'static str>,
    /// Open files.
    pub files: commands::file::Files,
    /// Processes started by guest-exec.
    pub execs: commands::exec::Execs,
}

impl Agent {
    /// Sets the agent up from `options`; starts frozen if the marker is in
    /// the state directory.
    pub fn new(options: AgentOptions) -> std::io::Result<Self> {
        let state = PersistentState::load(&options.statedir)?;
        let frozen = state.marker_exists();
        let mut blocked: HashSet<&'static str> = COMMANDS
            .iter()
            .map(|c| c.name)
            .filter(|n| options.blocked.iter().any(|b| b == n))
            .collect();
        blocked.extend(PLATFORM_BLOCKED.iter().copied());
        let mut agent = Agent {
            options,
            state,
            frozen,
            delimit_next: false,
            blocked,
            disabled: HashMap::new(),
            files: Default::default(),
            execs: Default::default(),
        };
        // qemu-ga's start-up order: a frozen marker disables with the
        // frozen reason, then the block list overwrites that with no reason
        // (checked against it). `-a` (not in 7.2) sits between the two.
        if frozen {
            // qemu-ga starts with logging off when the marker is there.
            log::set_enabled(false);
            agent.disable_not_allowed_freeze();
        }
        if !agent.options.allowed.is_empty() {
            for c in COMMANDS {
                if !agent.options.allowed.iter().any(|a| a == c.name) {
                    agent.disabled.insert(c.name, NOT_ALLOWED);
                }
            }
        }
        // Logged in qemu-ga's order: the `-b` list, then the platform's.
        let names = agent.options.blocked.iter().map(String::as_str);
        for name in names.chain(PLATFORM_BLOCKED.iter().copied()) {
            log::debug(&format!("disabling command: {name}"));
        }
        for &name in &agent.blocked {
            agent.disabled.insert(name, "");
        }
        Ok(agent)
    }

    /// Why `name` is disabled: `None` if enabled, `Some("")` if disabled
    /// without a reason, `Some(reason)` otherwise.
    pub fn disabled_reason(&self, name: &str) -> Option<&'static str> {
        self.disabled.get(name).copied()
    }

    /// ga_disable_not_allowed_freeze: every command outside the allow-list
    /// gets the frozen reason, blocked ones included.
    fn disable_not_allowed_freeze(&mut self) {
        for c in COMMANDS {
            if !FREEZE_ALLOWLIST.contains(&c.name) {
                log::debug(&format!("disabling command: {}", c.name));
                self.disabled.insert(c.name, FROZEN);
            }
        }
    }

    /// ga_enable_non_blocked: re-enables what is not blocked (or, with
    /// `-a`, not allowed); the others keep the reason they have, so a
    /// blocked command keeps the frozen reason after a thaw, as in qemu-ga.
    fn enable_non_blocked(&mut self) {
        let allowed = &self.options.allowed;
        let blocked = &self.blocked;
        let keep = |name: &str| {
            blocked.contains(name) || (!allowed.is_empty() && !allowed.iter().any(|a| a == name))
        };
        for c in COMMANDS {
            if self.disabled.contains_key(c.name) && !keep(c.name) {
                log::debug(&format!("enabling command: {}", c.name));
            }
        }
        self.disabled.retain(|name, _| keep(name));
    }

    /// Enters frozen mode (ga_set_frozen).
    pub fn set_frozen(&mut self) -> std::io::Result<()> {
        if self.frozen {
            return Ok(());
        }
        self.disable_not_allowed_freeze();
        log::warning("disabling logging due to filesystem freeze");
        log::set_enabled(false);
        self.frozen = true;
        self.state.set_marker(true)
    }

    /// Leaves frozen mode (ga_unset_frozen).
    pub fn unset_frozen(&mut self) -> std::io::Result<()> {
        if !self.frozen {
            return Ok(());
        }
        // ga_unset_frozen: the deferred log file first (stderr if it
        // cannot be opened), then logging back on, then the pidfile.
        if let Some(path) = self.options.deferred_logfile.take()
            && log::open_file(&path).is_err()
        {
            log::init(None, log::debug_verbose());
        }
        log::set_enabled(true);
        log::warning("logging re-enabled due to filesystem unfreeze");
        if let Some(pidfile) = self.options.deferred_pidfile.take()
            && let Err(e) = crate::daemon::write_pidfile(&pidfile)
        {
            log::warning(&e.to_string());
        }
        self.enable_non_blocked();
        self.frozen = false;
        self.state.set_marker(false)
    }

    /// Handles one message from the stream, appending the response (if
    /// any) to `out`.
    pub fn handle(&mut self, message: Message, out: &mut Vec<u8>) {
        if !self.execs.is_empty() {
            commands::exec::reap(&mut self.execs);
        }
        log::debug("process_event: called");
        let response = match message {
            Err(e) => Some(error_response(&QgaError::generic(e.desc), None)),
            Ok(value) => {
                log::debug("processing command");
                match check_request(value) {
                    Err(rejected) => Some(error_response(&rejected.error, rejected.id)),
                    Ok(req) => self.dispatch(req.execute, req.arguments, req.id),
                }
            }
        };
        if let Some(response) = response {
            let delimited = std::mem::take(&mut self.delimit_next);
            let before = out.len();
            write_response(out, &response, delimited);
            if log::debug_enabled() {
                // The count includes a leading 0xFF, as in qemu-ga.
                log::debug(&format!("sending data, count: {}", out.len() - before));
            }
        }
    }

    fn dispatch(
        &mut self,
        name: String,
        arguments: qvirt_qga::Dict,
        id: Option<Value>,
    ) -> Option<Value> {
        let Some(command) = COMMANDS.iter().find(|c| c.name == name) else {
            let err = QgaError::not_found(format!("The command {name} has not been found"));
            return Some(error_response(&err, id));
        };
        if let Some(reason) = self.disabled_reason(command.name) {
            let sep = if reason.is_empty() { "" } else { ": " };
            let err = QgaError::not_found(format!("Command {name} has been disabled{sep}{reason}"));
            return Some(error_response(&err, id));
        }
        let mut args = Args::new(arguments);
        match (command.handler)(self, &mut args) {
            Err(err) => Some(error_response(&err, id)),
            Ok(_) if !command.success_response => None,
            Ok(ret) => Some(success_response(
                ret.unwrap_or_else(|| Value::Object(qvirt_qga::Dict::new())),
                id,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(blocked: &[&str], allowed: &[&str]) -> (Agent, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = AgentOptions {
            statedir: dir.path().to_owned(),
            blocked: blocked.iter().map(|s| s.to_string()).collect(),
            allowed: allowed.iter().map(|s| s.to_string()).collect(),
            ..AgentOptions::default()
        };
        (Agent::new(options).expect("agent"), dir)
    }

    /// qemu-ga's per-command reasons through a freeze and a thaw: the
    /// freeze overwrites every non-allow-listed command's reason, blocked
    /// ones included; the thaw re-enables only what is neither blocked nor
    /// left out of `-a`, the others keep the frozen reason.
    #[test]
    fn test_disable_reasons_through_freeze_and_thaw() {
        let (mut a, _dir) = agent(&["guest-get-time", "guest-ping", "guest-nope"], &[]);
        assert_eq!(a.disabled_reason("guest-get-time"), Some(""));
        assert_eq!(a.disabled_reason("guest-ping"), Some(""));
        assert_eq!(a.disabled_reason("guest-get-devices"), Some(""));
        assert_eq!(a.disabled_reason("guest-info"), None);
        a.set_frozen().expect("freeze");
        assert_eq!(a.disabled_reason("guest-get-time"), Some(FROZEN));
        assert_eq!(a.disabled_reason("guest-get-devices"), Some(FROZEN));
        assert_eq!(a.disabled_reason("guest-exec"), Some(FROZEN));
        // Allow-listed while frozen: untouched, blocked or not.
        assert_eq!(a.disabled_reason("guest-ping"), Some(""));
        assert_eq!(a.disabled_reason("guest-info"), None);
        a.unset_frozen().expect("thaw");
        assert_eq!(a.disabled_reason("guest-get-time"), Some(FROZEN));
        assert_eq!(a.disabled_reason("guest-get-devices"), Some(FROZEN));
        assert_eq!(a.disabled_reason("guest-ping"), Some(""));
        assert_eq!(a.disabled_reason("guest-exec"), None);

        let (mut a, _dir) = agent(&["guest-info"], &["guest-info", "guest-exec"]);
        assert_eq!(a.disabled_reason("guest-info"), Some(""));
        assert_eq!(a.disabled_reason("guest-exec"), None);
        assert_eq!(a.disabled_reason("guest-get-time"), Some(NOT_ALLOWED));
        a.set_frozen().expect("freeze");
        assert_eq!(a.disabled_reason("guest-exec"), Some(FROZEN));
        a.unset_frozen().expect("thaw");
        assert_eq!(a.disabled_reason("guest-exec"), None);
        assert_eq!(a.disabled_reason("guest-get-time"), Some(FROZEN));
        assert_eq!(a.disabled_reason("guest-info"), Some(""));
    }
}
