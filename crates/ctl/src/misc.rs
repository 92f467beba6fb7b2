//! `health`, `version`, `hooks list` and `completion`.

use clap::CommandFactory;
use qvirt_proto::v1::ListHooksRequest;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::CtlError;
use crate::conn::{Gateway, Global};
use crate::output::{self, out_line};

/// `health`.
#[derive(Debug, clap::Args)]
pub struct HealthArgs {
    /// A service, e.g. qvirt.v1.Supervisor; default: the gateway itself.
    #[arg(default_value = "")]
    pub service: String,
}

/// `hooks` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum HooksCommand {
    /// List the hook scripts the hook executor found.
    List,
}

/// `completion`.
#[derive(Debug, clap::Args)]
pub struct CompletionArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// `health`.
pub async fn health(gw: &Gateway, g: &Global, a: HealthArgs) -> Result<u8, CtlError> {
    let reply = HealthClient::new(gw.channel())
        .check(HealthCheckRequest {
            service: a.service.clone(),
        })
        .await?
        .into_inner();
    let status = reply.status().as_str_name();
    if g.json {
        output::print_json(&serde_json::json!({ "service": a.service, "status": status }))?;
    } else {
        out_line(status)?;
    }
    if status != "SERVING" {
        let name = if a.service.is_empty() {
            "the gateway"
        } else {
            a.service.as_str()
        };
        return Err(CtlError::Failed(format!("{name} is {status}")));
    }
    Ok(0)
}

/// `version`: qvirtctl's own version and the API it speaks (needs no
/// gateway).
pub fn version(g: &Global) -> Result<u8, CtlError> {
    let version = env!("CARGO_PKG_VERSION");
    if g.json {
        output::print_json(&serde_json::json!({ "qvirtctl": version, "api": "qvirt.v1" }))?;
    } else {
        out_line(&format!("qvirtctl {version}"))?;
        out_line("API: qvirt.v1")?;
    }
    Ok(0)
}

/// `hooks list`: the hook executor's discovery, where the gateway exposes
/// it; today's gateway does not (the hook executor is internal), and
/// qvirtctl says so.
pub async fn hooks(gw: &Gateway, g: &Global, command: HooksCommand) -> Result<u8, CtlError> {
    let HooksCommand::List = command;
    let reply = match gw.hooks().list_hooks(ListHooksRequest::default()).await {
        Ok(r) => r.into_inner(),
        Err(e) if e.code() == Code::Unimplemented => {
            return Err(CtlError::Failed(format!(
                "the gateway at {} does not expose the hook executor (an internal service): \
                 list the hooks on the host, in the hook executor's hooks_dir (UNIMPLEMENTED)",
                gw.url
            )));
        }
        Err(e) => return Err(e.into()),
    };
    if g.json {
        return output::print_message("qvirt.v1.ListHooksResponse", &reply).map(|()| 0);
    }
    let v = output::to_json("qvirt.v1.ListHooksResponse", &reply)?;
    out_line(&format!("hooks dir: {}", reply.hooks_dir))?;
    if let Some(drivers) = v["drivers"].as_array() {
        for d in drivers {
            out_line(&d.to_string())?;
        }
    }
    Ok(0)
}

/// `completion SHELL`: the completion script on stdout.
pub fn completion(a: CompletionArgs) -> Result<u8, CtlError> {
    let mut cmd = crate::Cli::command();
    clap_complete::generate(a.shell, &mut cmd, "qvirtctl", &mut std::io::stdout());
    Ok(0)
}
