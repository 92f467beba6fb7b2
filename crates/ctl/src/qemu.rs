//! Raw escapes: `qemu-monitor-command` (Supervisor.MonitorCommand, QMP)
//! and `qemu-agent-command` (GuestAgent.Command), each printing the peer's
//! reply as JSON, as virsh does.

use qvirt_proto::v1::{CommandRequest, MonitorCommandRequest};

use crate::CtlError;
use crate::conn::{Gateway, Global};
use crate::domain::seconds;
use crate::output::out_line;

/// The long `--help` of `AgentCommandArgs`'s command.
pub const AGENT_COMMAND_HELP: &str = "Send one raw command to a domain's guest agent and print its \
    reply, e.g. `qemu-agent-command demo '{\"execute\": \"guest-info\"}'`. The words \
    after DOMAIN are joined with spaces into the command.";

/// The long `--help` of `MonitorCommandArgs`'s command.
pub const MONITOR_COMMAND_HELP: &str = "Send one QMP command to a domain's monitor and print QEMU's \
    reply, e.g. `qemu-monitor-command demo '{\"execute\": \"query-status\"}'`. The \
    words after DOMAIN are joined with spaces into the command. QMP only: there is \
    no HMP mode (use {\"execute\": \"human-monitor-command\", \"arguments\": \
    {\"command-line\": \"info registers\"}}).";

/// `qemu-monitor-command`.
#[derive(Debug, clap::Args)]
pub struct MonitorCommandArgs {
    /// Domain name or UUID.
    pub domain: String,
    /// Pretty-print the reply.
    #[arg(long)]
    pub pretty: bool,
    /// Print only the reply's `return` value; a QMP error fails.
    #[arg(long)]
    pub return_value: bool,
    /// The QMP command as JSON.
    #[arg(required = true, num_args = 1.., value_name = "JSON")]
    pub command: Vec<String>,
}

/// `qemu-agent-command`.
#[derive(Debug, clap::Args)]
pub struct AgentCommandArgs {
    /// Domain name or UUID.
    pub domain: String,
    /// Seconds to wait for the agent's reply (default: the service's).
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u64>,
    /// Pretty-print the reply.
    #[arg(long)]
    pub pretty: bool,
    /// The agent command as JSON.
    #[arg(required = true, num_args = 1.., value_name = "JSON")]
    pub command: Vec<String>,
}

/// Prints a JSON reply as it came, or pretty (numbers kept exact).
fn print_reply(reply: &str, pretty: bool) -> Result<(), CtlError> {
    if pretty
        && let Ok(v) = serde_json::from_str::<serde_json::Value>(reply)
        && let Ok(text) = serde_json::to_string_pretty(&v)
    {
        return out_line(&text);
    }
    out_line(reply)
}

/// `qemu-monitor-command`.
pub async fn monitor_command(
    gw: &Gateway,
    _g: &Global,
    a: MonitorCommandArgs,
) -> Result<u8, CtlError> {
    let reply = gw
        .supervisor()
        .monitor_command(MonitorCommandRequest {
            domain: a.domain.clone(),
            command_json: a.command.join(" "),
            ..Default::default()
        })
        .await?
        .into_inner()
        .reply_json;
    if !a.return_value {
        print_reply(&reply, a.pretty)?;
        return Ok(0);
    }
    let v: serde_json::Value = serde_json::from_str(&reply)
        .map_err(|e| CtlError::Failed(format!("QEMU's reply is not JSON: {e}")))?;
    if let Some(r) = v.get("return") {
        print_reply(&r.to_string(), a.pretty)?;
        return Ok(0);
    }
    let class = v["error"]["class"].as_str().unwrap_or("unknown");
    let desc = v["error"]["desc"].as_str().unwrap_or("");
    Err(CtlError::Failed(format!("QEMU answered: {desc} ({class})")))
}

/// `qemu-agent-command`.
pub async fn agent_command(gw: &Gateway, _g: &Global, a: AgentCommandArgs) -> Result<u8, CtlError> {
    let reply = gw
        .agent()
        .command(CommandRequest {
            domain: a.domain.clone(),
            timeout: a.timeout.map(seconds),
            command_json: a.command.join(" "),
            ..Default::default()
        })
        .await?
        .into_inner()
        .reply_json;
    if !reply.is_empty() {
        print_reply(&reply, a.pretty)?;
    }
    Ok(0)
}
