//! Domains: `list`, `dominfo`, `domstate`, `define`, `undefine`, and the
//! lifecycle (`start`, `shutdown`, `reboot`, `destroy`, `suspend`,
//! `resume`, `reset`), each one Supervisor call printed as virsh prints
//! it. `save` and `restore` are libvirt's managed save: the supervisor
//! keeps the image, so neither takes a file.

use std::io::Read;
use std::path::PathBuf;

use qvirt_proto::v1::{
    DefineDomainRequest, DestroyDomainRequest, Domain, DomainState, DomainStateReason,
    GetDomainRequest, ListDomainsRequest, RebootDomainRequest, ResetDomainRequest,
    RestoreDomainRequest, ResumeDomainRequest, SaveDomainRequest, ShutdownDomainRequest,
    ShutdownMode, StartDomainRequest, SuspendDomainRequest, UndefineDomainRequest,
    define_domain_request,
};

use crate::CtlError;
use crate::conn::{Gateway, Global};
use crate::output::{self, fields, out_line, table, waiting};

/// The long `--help` of `DefineArgs`'s command.
pub const DEFINE_HELP: &str = "Define a domain from a YAML file (DomainSpec's fields, as \
    `grpcurl HOST describe qvirt.v1.DomainSpec` lists them), or `-` for stdin. \
    A domain of that name that exists already gets the new definition, as \
    virsh's define does; a running one keeps its old definition until its \
    next start.\n\nExample file:\n  name: guest\n  memory_mib: 256\n  vcpus: 1\n  \
    accel: tcg\n  kernel: /var/lib/qvirt/images/vmlinux\n  agent: true";

/// The largest definition file `define` reads.
pub const MAX_DEFINITION_BYTES: u64 = 1024 * 1024;
/// Most pages `list` fetches (1000 domains each).
const MAX_LIST_PAGES: usize = 100;

/// One domain, by name or UUID.
#[derive(Debug, clap::Args)]
pub struct DomArg {
    /// Domain name or UUID.
    pub domain: String,
}

/// `list`: virsh's filters.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Running and shut-off domains alike.
    #[arg(long)]
    pub all: bool,
    /// Only shut-off domains.
    #[arg(long)]
    pub inactive: bool,
    /// Only running domains.
    #[arg(long)]
    pub state_running: bool,
    /// Only paused domains.
    #[arg(long)]
    pub state_paused: bool,
    /// Only shut-off domains.
    #[arg(long)]
    pub state_shutoff: bool,
    /// Only domains in another state (shutting down, crashed, ...).
    #[arg(long)]
    pub state_other: bool,
    /// Print only the names.
    #[arg(long, conflicts_with = "uuid")]
    pub name: bool,
    /// Print only the UUIDs.
    #[arg(long)]
    pub uuid: bool,
    /// Only the domains of this host (a fleet gateway; on one host, its
    /// own name or nothing).
    #[arg(long, value_name = "HOST")]
    pub host: Option<String>,
}

/// `domstate`.
#[derive(Debug, clap::Args)]
pub struct DomstateArgs {
    /// Domain name or UUID.
    pub domain: String,
    /// Also say why the domain is in that state.
    #[arg(long)]
    pub reason: bool,
}

/// `define`.
#[derive(Debug, clap::Args)]
pub struct DefineArgs {
    /// The YAML file, or `-` for stdin.
    pub file: PathBuf,
}

/// `start`.
#[derive(Debug, clap::Args)]
pub struct StartArgs {
    /// Domain name or UUID.
    pub domain: String,
    /// Leave the vCPUs stopped (resume later).
    #[arg(long)]
    pub paused: bool,
}

/// How to ask a guest to shut down or reboot.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Mode {
    /// The ACPI power button.
    Acpi,
    /// The guest agent (`guest-shutdown`).
    Agent,
}

impl Mode {
    fn proto(mode: Option<Mode>) -> i32 {
        match mode {
            None => ShutdownMode::Unspecified as i32,
            Some(Mode::Acpi) => ShutdownMode::Acpi as i32,
            Some(Mode::Agent) => ShutdownMode::Agent as i32,
        }
    }
}

/// `shutdown`.
#[derive(Debug, clap::Args)]
pub struct ShutdownArgs {
    /// Domain name or UUID.
    pub domain: String,
    /// How to ask the guest (default acpi).
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// Wait up to SECONDS for the domain to shut off (it is never killed).
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u64>,
}

/// `reboot`.
#[derive(Debug, clap::Args)]
pub struct RebootArgs {
    /// Domain name or UUID.
    pub domain: String,
    /// How to ask the guest (default acpi).
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
}

/// `destroy`.
#[derive(Debug, clap::Args)]
pub struct DestroyArgs {
    /// Domain name or UUID.
    pub domain: String,
    /// Only SIGTERM: fail rather than SIGKILL a QEMU that does not exit.
    #[arg(long)]
    pub graceful: bool,
}

/// virsh's name of a state (`virsh domstate`).
pub fn state_name(state: i32) -> &'static str {
    match DomainState::try_from(state).unwrap_or(DomainState::Unspecified) {
        DomainState::Unspecified => "no state",
        DomainState::Running => "running",
        DomainState::Blocked => "idle",
        DomainState::Paused => "paused",
        DomainState::Shutdown => "in shutdown",
        DomainState::Shutoff => "shut off",
        DomainState::Crashed => "crashed",
        DomainState::Pmsuspended => "pmsuspended",
    }
}

/// virsh's name of a state reason (`virsh domstate --reason`).
pub fn reason_name(reason: i32) -> &'static str {
    use DomainStateReason as R;
    match R::try_from(reason).unwrap_or(R::Unspecified) {
        R::Unspecified
        | R::RunningUnknown
        | R::BlockedUnknown
        | R::PausedUnknown
        | R::ShutdownUnknown
        | R::ShutoffUnknown
        | R::CrashedUnknown
        | R::PmsuspendedUnknown => "unknown",
        R::RunningBooted => "booted",
        R::RunningMigrated | R::ShutoffMigrated => "migrated",
        R::RunningRestored => "restored",
        R::RunningFromSnapshot | R::PausedFromSnapshot | R::ShutoffFromSnapshot => "from snapshot",
        R::RunningUnpaused => "unpaused",
        R::RunningMigrationCanceled => "migration canceled",
        R::RunningSaveCanceled => "save canceled",
        R::RunningWakeup => "event wakeup",
        R::RunningCrashed | R::PausedCrashed | R::ShutoffCrashed => "crashed",
        R::RunningPostcopy | R::PausedPostcopy => "post-copy",
        R::RunningPostcopyFailed | R::PausedPostcopyFailed => "post-copy failed",
        R::PausedUser | R::ShutdownUser => "user",
        R::PausedMigration => "migrating",
        R::PausedSave => "saving",
        R::PausedDump => "dumping",
        R::PausedIoerror => "I/O error",
        R::PausedWatchdog => "watchdog",
        R::PausedShuttingDown => "shutting down",
        R::PausedSnapshot => "creating snapshot",
        R::PausedStartingUp => "starting up",
        R::PausedApiError => "api error",
        R::ShutoffShutdown => "shutdown",
        R::ShutoffDestroyed => "destroyed",
        R::ShutoffSaved => "saved",
        R::ShutoffFailed => "failed",
        R::ShutoffDaemon => "daemon",
        R::CrashedPanicked => "panicked",
    }
}

fn name_of(d: &Domain) -> &str {
    d.spec.as_ref().map_or("", |s| s.name.as_str())
}

fn uuid_of(d: &Domain) -> &str {
    d.spec.as_ref().map_or("", |s| s.uuid.as_str())
}

/// The states `list` asks for; empty means every state.
fn list_states(a: &ListArgs) -> Vec<DomainState> {
    use DomainState as S;
    let mut states = Vec::new();
    if a.state_running {
        states.push(S::Running);
    }
    if a.state_paused {
        states.push(S::Paused);
    }
    if a.state_shutoff {
        states.push(S::Shutoff);
    }
    if a.state_other {
        states.extend([
            S::Unspecified,
            S::Blocked,
            S::Shutdown,
            S::Crashed,
            S::Pmsuspended,
        ]);
    }
    if !states.is_empty() || a.all {
        return states;
    }
    if a.inactive {
        return vec![S::Shutoff];
    }
    // virsh's default: the active domains.
    vec![
        S::Running,
        S::Paused,
        S::Blocked,
        S::Shutdown,
        S::Crashed,
        S::Pmsuspended,
    ]
}

/// `list`.
pub async fn list(gw: &Gateway, g: &Global, a: ListArgs) -> Result<u8, CtlError> {
    let states: Vec<i32> = list_states(&a).into_iter().map(|s| s as i32).collect();
    let mut client = gw.supervisor();
    let mut domains = Vec::new();
    let mut page_token = String::new();
    for _ in 0..MAX_LIST_PAGES {
        let reply = client
            .list_domains(ListDomainsRequest {
                states: states.clone(),
                page_size: 1000,
                page_token: page_token.clone(),
                host: a.host.clone().unwrap_or_default(),
                ..Default::default()
            })
            .await?
            .into_inner();
        domains.extend(reply.domains);
        page_token = reply.next_page_token;
        if page_token.is_empty() {
            break;
        }
    }
    if g.json {
        let list = domains
            .iter()
            .map(|d| output::to_json("qvirt.v1.Domain", d))
            .collect::<Result<Vec<_>, _>>()?;
        return output::print_json(&serde_json::Value::Array(list)).map(|()| 0);
    }
    if a.name || a.uuid {
        for d in &domains {
            out_line(if a.name { name_of(d) } else { uuid_of(d) })?;
        }
        return Ok(0);
    }
    print!("{}", list_table(&domains));
    Ok(0)
}

/// `list`'s table: a Host column once the domains are on more than one
/// host (a fleet gateway's answer), and the state of a domain whose host
/// does not answer marked so (it is the last one the host reported).
fn list_table(domains: &[Domain]) -> String {
    let mut hosts: Vec<&str> = domains.iter().map(|d| d.host.as_str()).collect();
    hosts.sort_unstable();
    hosts.dedup();
    let fleet = hosts.len() > 1 || domains.iter().any(|d| d.host_unreachable);
    let rows: Vec<Vec<String>> = domains
        .iter()
        .map(|d| {
            let mut state = state_name(d.state).to_owned();
            if d.host_unreachable {
                state.push_str(" (host unreachable)");
            }
            let mut row = vec![name_of(d).to_owned(), state, uuid_of(d).to_owned()];
            if fleet {
                row.push(d.host.clone());
            }
            row
        })
        .collect();
    if fleet {
        table(&["Name", "State", "UUID", "Host"], &rows)
    } else {
        table(&["Name", "State", "UUID"], &rows)
    }
}

async fn get(gw: &Gateway, domain: &str) -> Result<Domain, CtlError> {
    gw.supervisor()
        .get_domain(GetDomainRequest {
            domain: domain.to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .domain
        .ok_or_else(|| CtlError::Failed("the gateway returned no domain".into()))
}

/// `dominfo`.
pub async fn dominfo(gw: &Gateway, g: &Global, a: DomArg) -> Result<u8, CtlError> {
    let d = get(gw, &a.domain).await?;
    if g.json {
        return output::print_message("qvirt.v1.Domain", &d).map(|()| 0);
    }
    let spec = d.spec.clone().unwrap_or_default();
    let yes = |b: bool| if b { "yes" } else { "no" }.to_owned();
    let running = d.pid != 0;
    let mut rows = vec![
        ("Name", spec.name.clone()),
        ("UUID", spec.uuid.clone()),
        ("Host", d.host.clone()),
        ("Host reachable", yes(!d.host_unreachable)),
        ("OS Type", "hvm".to_owned()),
        ("State", state_name(d.state).to_owned()),
        ("Reason", reason_name(d.reason).to_owned()),
        ("CPU(s)", spec.vcpus.to_string()),
        (
            "Max memory",
            format!("{} KiB", spec.memory_mib.saturating_mul(1024)),
        ),
        ("Machine", spec.machine.clone()),
        ("Accelerator", accel_name(spec.accel).to_owned()),
        ("Persistent", "yes".to_owned()),
        ("Agent", yes(spec.agent)),
        ("Disks", spec.disks.len().to_string()),
        ("Interfaces", spec.networks.len().to_string()),
    ];
    if running {
        rows.push(("PID", d.pid.to_string()));
        rows.push(("Started", output::timestamp(d.start_time.as_ref())));
    }
    rows.push((
        "State changed",
        output::timestamp(d.state_change_time.as_ref()),
    ));
    rows.push(("Defined", output::timestamp(d.create_time.as_ref())));
    print!("{}", fields(&rows));
    Ok(0)
}

fn accel_name(accel: i32) -> &'static str {
    match qvirt_proto::v1::Accel::try_from(accel).unwrap_or(qvirt_proto::v1::Accel::Unspecified) {
        qvirt_proto::v1::Accel::Unspecified => "default",
        qvirt_proto::v1::Accel::Kvm => "kvm",
        qvirt_proto::v1::Accel::Tcg => "tcg",
        qvirt_proto::v1::Accel::Auto => "auto",
    }
}

/// `domstate`.
pub async fn domstate(gw: &Gateway, g: &Global, a: DomstateArgs) -> Result<u8, CtlError> {
    let d = get(gw, &a.domain).await?;
    if g.json {
        let v = serde_json::json!({
            "state": DomainState::try_from(d.state).unwrap_or(DomainState::Unspecified).as_str_name(),
            "reason": DomainStateReason::try_from(d.reason)
                .unwrap_or(DomainStateReason::Unspecified)
                .as_str_name(),
        });
        return output::print_json(&v).map(|()| 0);
    }
    let line = if a.reason {
        format!("{} ({})", state_name(d.state), reason_name(d.reason))
    } else {
        state_name(d.state).to_owned()
    };
    out_line(&line)?;
    Ok(0)
}

fn read_definition(file: &std::path::Path) -> Result<(String, String), CtlError> {
    let stdin = file.as_os_str() == "-";
    let from = if stdin {
        "stdin".to_owned()
    } else {
        file.display().to_string()
    };
    let io = |source| CtlError::Io {
        what: format!("cannot read {from}"),
        source,
    };
    let mut bytes = Vec::new();
    if stdin {
        std::io::stdin()
            .take(MAX_DEFINITION_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(io)?;
    } else {
        std::fs::File::open(file)
            .and_then(|f| f.take(MAX_DEFINITION_BYTES + 1).read_to_end(&mut bytes))
            .map_err(io)?;
    }
    if bytes.len() as u64 > MAX_DEFINITION_BYTES {
        return Err(CtlError::Usage(format!(
            "{from} is larger than {MAX_DEFINITION_BYTES} bytes: not a domain definition"
        )));
    }
    let text = String::from_utf8(bytes)
        .map_err(|_| CtlError::Usage(format!("{from} is not UTF-8 text")))?;
    Ok((text, from))
}

/// `define`.
pub async fn define(gw: &Gateway, g: &Global, a: DefineArgs) -> Result<u8, CtlError> {
    let (yaml, from) = read_definition(&a.file)?;
    let d = gw
        .supervisor()
        .define_domain(DefineDomainRequest {
            source: Some(define_domain_request::Source::SpecYaml(yaml)),
            allow_update: true,
            ..Default::default()
        })
        .await?
        .into_inner()
        .domain
        .unwrap_or_default();
    if g.json {
        return output::print_message("qvirt.v1.Domain", &d).map(|()| 0);
    }
    out_line(&format!("Domain '{}' defined from {from}", name_of(&d)))?;
    Ok(0)
}

/// `undefine`.
pub async fn undefine(gw: &Gateway, g: &Global, a: DomArg) -> Result<u8, CtlError> {
    gw.supervisor()
        .undefine_domain(UndefineDomainRequest {
            domain: a.domain.clone(),
            ..Default::default()
        })
        .await?;
    done(
        g,
        None,
        &format!("Domain '{}' has been undefined", a.domain),
    )
}

/// Prints a lifecycle call's result: the domain as JSON, or virsh's line.
fn done(g: &Global, domain: Option<&Domain>, line: &str) -> Result<u8, CtlError> {
    if g.json {
        match domain {
            Some(d) => output::print_message("qvirt.v1.Domain", d)?,
            None => output::print_json(&serde_json::json!({}))?,
        }
    } else {
        out_line(line)?;
    }
    Ok(0)
}

/// `start`.
pub async fn start(gw: &Gateway, g: &Global, a: StartArgs) -> Result<u8, CtlError> {
    let mut client = gw.supervisor();
    let call = client.start_domain(StartDomainRequest {
        domain: a.domain.clone(),
        paused: a.paused,
        ..Default::default()
    });
    let d = waiting(&format!("starting {}", a.domain), call)
        .await?
        .into_inner()
        .domain;
    done(g, d.as_ref(), &format!("Domain '{}' started", a.domain))
}

/// `shutdown`.
pub async fn shutdown(gw: &Gateway, g: &Global, a: ShutdownArgs) -> Result<u8, CtlError> {
    let mut client = gw.supervisor();
    let call = client.shutdown_domain(ShutdownDomainRequest {
        domain: a.domain.clone(),
        mode: Mode::proto(a.mode),
        timeout: a.timeout.map(seconds),
        ..Default::default()
    });
    let d = waiting(&format!("shutting {} down", a.domain), call)
        .await?
        .into_inner()
        .domain;
    let line = if a.timeout.is_some() {
        format!("Domain '{}' is shut off", a.domain)
    } else {
        format!("Domain '{}' is being shutdown", a.domain)
    };
    done(g, d.as_ref(), &line)
}

/// `reboot`.
pub async fn reboot(gw: &Gateway, g: &Global, a: RebootArgs) -> Result<u8, CtlError> {
    let d = gw
        .supervisor()
        .reboot_domain(RebootDomainRequest {
            domain: a.domain.clone(),
            mode: Mode::proto(a.mode),
            ..Default::default()
        })
        .await?
        .into_inner()
        .domain;
    done(
        g,
        d.as_ref(),
        &format!("Domain '{}' is being rebooted", a.domain),
    )
}

/// `destroy`.
pub async fn destroy(gw: &Gateway, g: &Global, a: DestroyArgs) -> Result<u8, CtlError> {
    let mut client = gw.supervisor();
    let call = client.destroy_domain(DestroyDomainRequest {
        domain: a.domain.clone(),
        graceful: a.graceful,
        ..Default::default()
    });
    let d = waiting(&format!("destroying {}", a.domain), call)
        .await?
        .into_inner()
        .domain;
    done(g, d.as_ref(), &format!("Domain '{}' destroyed", a.domain))
}

/// `suspend`.
pub async fn suspend(gw: &Gateway, g: &Global, a: DomArg) -> Result<u8, CtlError> {
    let d = gw
        .supervisor()
        .suspend_domain(SuspendDomainRequest {
            domain: a.domain.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .domain;
    done(g, d.as_ref(), &format!("Domain '{}' suspended", a.domain))
}

/// `save`: the guest's memory to the supervisor's image, then shut off
/// (SAVED).
pub async fn save(gw: &Gateway, g: &Global, a: DomArg) -> Result<u8, CtlError> {
    let mut client = gw.supervisor();
    let call = client.save_domain(SaveDomainRequest {
        domain: a.domain.clone(),
        ..Default::default()
    });
    let d = waiting(&format!("saving {}", a.domain), call)
        .await?
        .into_inner()
        .domain;
    done(g, d.as_ref(), &format!("Domain '{}' saved", a.domain))
}

/// `restore`: a saved domain back from its image.
pub async fn restore(gw: &Gateway, g: &Global, a: StartArgs) -> Result<u8, CtlError> {
    let mut client = gw.supervisor();
    let call = client.restore_domain(RestoreDomainRequest {
        domain: a.domain.clone(),
        paused: a.paused,
        ..Default::default()
    });
    let d = waiting(&format!("restoring {}", a.domain), call)
        .await?
        .into_inner()
        .domain;
    done(g, d.as_ref(), &format!("Domain '{}' restored", a.domain))
}

/// `resume`.
pub async fn resume(gw: &Gateway, g: &Global, a: DomArg) -> Result<u8, CtlError> {
    let d = gw
        .supervisor()
        .resume_domain(ResumeDomainRequest {
            domain: a.domain.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .domain;
    done(g, d.as_ref(), &format!("Domain '{}' resumed", a.domain))
}

/// `reset`.
pub async fn reset(gw: &Gateway, g: &Global, a: DomArg) -> Result<u8, CtlError> {
    let d = gw
        .supervisor()
        .reset_domain(ResetDomainRequest {
            domain: a.domain.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .domain;
    done(g, d.as_ref(), &format!("Domain '{}' was reset", a.domain))
}

/// A timeout in whole seconds as a protobuf Duration.
pub fn seconds(s: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(s).unwrap_or(i64::MAX),
        nanos: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_every_reason_has_a_virsh_name() {
        for r in 0..800 {
            if DomainStateReason::try_from(r).is_ok() {
                assert!(!reason_name(r).is_empty());
            }
        }
        assert_eq!(
            reason_name(DomainStateReason::ShutoffDestroyed as i32),
            "destroyed"
        );
        assert_eq!(state_name(DomainState::Shutoff as i32), "shut off");
    }
}
