//! The guest agent's typed calls: `guestinfo` (virsh's `key : value`
//! lines), `domfsfreeze` / `domfsthaw`, `guest-exec` (the program's
//! output decoded, its exit status qvirtctl's), `guest-file-read` and
//! `guest-file-write`.

use std::io::{Read, Write};
use std::path::PathBuf;

use qvirt_proto::v1::{
    ExecRequest, FileWriteMode, FreezeFilesystemsRequest, GetFsInfoRequest, GetHostNameRequest,
    GetOsInfoRequest, GetTimezoneRequest, ListNetworkInterfacesRequest, ListUsersRequest,
    ReadFileRequest, ThawFilesystemsRequest, WriteFileRequest, guest_exec_status,
};
use tonic::Code;

use crate::CtlError;
use crate::conn::{Gateway, Global};
use crate::domain::seconds;
use crate::output::{self, out_line, waiting};

/// The long `--help` of `ExecArgs`'s command.
pub const EXEC_HELP: &str = "Run a program in the guest through its agent, wait for it, \
    and write its standard output and error here; qvirtctl exits with the program's \
    exit status (128 + N when signal N killed it). Example: \
    `qvirtctl guest-exec demo -- uname -a`.";

/// The most `guest-file-write` and `guest-exec --stdin` read from stdin.
pub const MAX_INPUT_BYTES: u64 = 64 * 1024 * 1024;

/// One domain, and the agent timeout.
#[derive(Debug, clap::Args)]
pub struct DomArgTimeout {
    /// Domain name or UUID.
    pub domain: String,
    /// Seconds to wait for the agent (default: the service's).
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u64>,
}

/// `guestinfo`: virsh's groups; none given means all.
#[derive(Debug, clap::Args)]
pub struct GuestinfoArgs {
    /// Domain name or UUID.
    pub domain: String,
    /// Logged-in users.
    #[arg(long, visible_alias = "users")]
    pub user: bool,
    /// The operating system.
    #[arg(long)]
    pub os: bool,
    /// The time zone.
    #[arg(long)]
    pub timezone: bool,
    /// The host name.
    #[arg(long)]
    pub hostname: bool,
    /// Mounted filesystems.
    #[arg(long)]
    pub filesystem: bool,
    /// Network interfaces and addresses.
    #[arg(long)]
    pub interface: bool,
}

/// `domfsfreeze`.
#[derive(Debug, clap::Args)]
pub struct FsfreezeArgs {
    /// Domain name or UUID.
    pub domain: String,
    /// Freeze only this mount point (repeatable); default: all.
    #[arg(long, value_name = "PATH")]
    pub mountpoint: Vec<String>,
    /// Seconds to wait for the agent (default: the service's).
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u64>,
}

/// `guest-exec`.
#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// Domain name or UUID.
    pub domain: String,
    /// Environment of the program, NAME=VALUE (repeatable; replaces the
    /// agent's whole environment).
    #[arg(long, value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// Pass qvirtctl's standard input to the program.
    #[arg(long)]
    pub stdin: bool,
    /// Give up waiting after SECONDS (the program keeps running).
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u64>,
    /// The program and its arguments.
    #[arg(required = true, last = true, value_name = "PROGRAM")]
    pub command: Vec<String>,
}

/// `guest-file-read`.
#[derive(Debug, clap::Args)]
pub struct FileReadArgs {
    /// Domain name or UUID.
    pub domain: String,
    /// Absolute path in the guest.
    pub path: String,
    /// Start at this byte.
    #[arg(long, default_value_t = 0)]
    pub offset: u64,
    /// Read at most this many bytes (default: to the end).
    #[arg(long)]
    pub length: Option<u64>,
    /// Write the bytes to this file instead of stdout.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// `guest-file-write`.
#[derive(Debug, clap::Args)]
pub struct FileWriteArgs {
    /// Domain name or UUID.
    pub domain: String,
    /// Absolute path in the guest (its directory must exist).
    pub path: String,
    /// The local file to send; `-` (the default) reads stdin.
    #[arg(default_value = "-")]
    pub input: PathBuf,
    /// Append instead of truncating.
    #[arg(long)]
    pub append: bool,
}

/// Reads at most [`MAX_INPUT_BYTES`] from `path` (`-`: stdin).
fn read_input(path: &std::path::Path) -> Result<Vec<u8>, CtlError> {
    let from = if path.as_os_str() == "-" {
        "stdin".to_owned()
    } else {
        path.display().to_string()
    };
    let io = |source| CtlError::Io {
        what: format!("cannot read {from}"),
        source,
    };
    let mut bytes = Vec::new();
    if path.as_os_str() == "-" {
        std::io::stdin()
            .take(MAX_INPUT_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(io)?;
    } else {
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_INPUT_BYTES + 1).read_to_end(&mut bytes))
            .map_err(io)?;
    }
    if bytes.len() as u64 > MAX_INPUT_BYTES {
        return Err(CtlError::Usage(format!(
            "{from} is larger than {MAX_INPUT_BYTES} bytes"
        )));
    }
    Ok(bytes)
}

fn write_out(what: &str, out: &mut dyn Write, bytes: &[u8]) -> Result<(), CtlError> {
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(|source| CtlError::Io {
            what: format!("cannot write {what}"),
            source,
        })
}

/// `guestinfo`.
pub async fn guestinfo(gw: &Gateway, g: &Global, a: GuestinfoArgs) -> Result<u8, CtlError> {
    let all = !(a.user || a.os || a.timezone || a.hostname || a.filesystem || a.interface);
    let mut agent = gw.agent();
    let domain = a.domain.clone();
    let mut info: Vec<(String, String)> = Vec::new();
    // With no group named, groups the agent cannot report are left out,
    // as virsh does; a group asked for by name fails instead.
    let skip = |e: &tonic::Status, asked: bool| {
        !asked && matches!(e.code(), Code::Unimplemented | Code::FailedPrecondition)
    };
    if all || a.user {
        match agent
            .list_users(ListUsersRequest {
                domain: domain.clone(),
                ..Default::default()
            })
            .await
        {
            Ok(r) => {
                let users = r.into_inner().users;
                info.push(("user.count".into(), users.len().to_string()));
                for (i, u) in users.iter().enumerate() {
                    info.push((format!("user.{i}.name"), u.user.clone()));
                    if !u.logon_domain.is_empty() {
                        info.push((format!("user.{i}.domain"), u.logon_domain.clone()));
                    }
                    if let Some(t) = &u.login_time {
                        let ms = t.seconds.saturating_mul(1000) + i64::from(t.nanos / 1_000_000);
                        info.push((format!("user.{i}.login-time"), ms.to_string()));
                    }
                }
            }
            Err(e) if skip(&e, a.user) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if all || a.os {
        match agent
            .get_os_info(GetOsInfoRequest {
                domain: domain.clone(),
                ..Default::default()
            })
            .await
        {
            Ok(r) => {
                let o = r.into_inner();
                for (k, v) in [
                    ("os.id", o.id),
                    ("os.name", o.name),
                    ("os.pretty-name", o.pretty_name),
                    ("os.version", o.version),
                    ("os.version-id", o.version_id),
                    ("os.variant", o.variant),
                    ("os.variant-id", o.variant_id),
                    ("os.kernel-release", o.kernel_release),
                    ("os.kernel-version", o.kernel_version),
                    ("os.machine", o.machine),
                ] {
                    if !v.is_empty() {
                        info.push((k.into(), v));
                    }
                }
            }
            Err(e) if skip(&e, a.os) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if all || a.timezone {
        match agent
            .get_timezone(GetTimezoneRequest {
                domain: domain.clone(),
                ..Default::default()
            })
            .await
        {
            Ok(r) => {
                let t = r.into_inner();
                if !t.zone.is_empty() {
                    info.push(("timezone.name".into(), t.zone));
                }
                info.push(("timezone.offset".into(), t.offset_seconds.to_string()));
            }
            Err(e) if skip(&e, a.timezone) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if all || a.hostname {
        match agent
            .get_host_name(GetHostNameRequest {
                domain: domain.clone(),
                ..Default::default()
            })
            .await
        {
            Ok(r) => info.push(("hostname".into(), r.into_inner().host_name)),
            Err(e) if skip(&e, a.hostname) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if all || a.filesystem {
        match agent
            .get_fs_info(GetFsInfoRequest {
                domain: domain.clone(),
                ..Default::default()
            })
            .await
        {
            Ok(r) => {
                let fss = r.into_inner().filesystems;
                info.push(("fs.count".into(), fss.len().to_string()));
                for (i, f) in fss.iter().enumerate() {
                    info.push((format!("fs.{i}.name"), f.name.clone()));
                    info.push((format!("fs.{i}.mountpoint"), f.mountpoint.clone()));
                    info.push((format!("fs.{i}.fstype"), f.r#type.clone()));
                    if let Some(t) = f.total_bytes {
                        info.push((format!("fs.{i}.total-bytes"), t.to_string()));
                    }
                    if let Some(u) = f.used_bytes {
                        info.push((format!("fs.{i}.used-bytes"), u.to_string()));
                    }
                    info.push((format!("fs.{i}.disk.count"), f.disks.len().to_string()));
                    for (j, d) in f.disks.iter().enumerate() {
                        if !d.serial.is_empty() {
                            info.push((format!("fs.{i}.disk.{j}.serial"), d.serial.clone()));
                        }
                        if !d.dev.is_empty() {
                            info.push((format!("fs.{i}.disk.{j}.device"), d.dev.clone()));
                        }
                    }
                }
            }
            Err(e) if skip(&e, a.filesystem) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if all || a.interface {
        match agent
            .list_network_interfaces(ListNetworkInterfacesRequest {
                domain: domain.clone(),
                ..Default::default()
            })
            .await
        {
            Ok(r) => {
                let ifs = r.into_inner().interfaces;
                info.push(("if.count".into(), ifs.len().to_string()));
                for (i, n) in ifs.iter().enumerate() {
                    info.push((format!("if.{i}.name"), n.name.clone()));
                    if !n.hardware_address.is_empty() {
                        info.push((format!("if.{i}.hwaddr"), n.hardware_address.clone()));
                    }
                    info.push((
                        format!("if.{i}.addr.count"),
                        n.ip_addresses.len().to_string(),
                    ));
                    for (j, ip) in n.ip_addresses.iter().enumerate() {
                        let family = match ip.ip_address_type() {
                            qvirt_proto::v1::GuestIpAddressType::Ipv4 => "ipv4",
                            qvirt_proto::v1::GuestIpAddressType::Ipv6 => "ipv6",
                            qvirt_proto::v1::GuestIpAddressType::Unspecified => "unknown",
                        };
                        info.push((format!("if.{i}.addr.{j}.type"), family.into()));
                        info.push((format!("if.{i}.addr.{j}.addr"), ip.ip_address.clone()));
                        info.push((format!("if.{i}.addr.{j}.prefix"), ip.prefix.to_string()));
                    }
                }
            }
            Err(e) if skip(&e, a.interface) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if g.json {
        let map: serde_json::Map<String, serde_json::Value> = info
            .into_iter()
            .map(|(k, v)| (k, serde_json::Value::String(v)))
            .collect();
        return output::print_json(&serde_json::Value::Object(map)).map(|()| 0);
    }
    for (k, v) in &info {
        out_line(&format!("{k:<20}: {v}"))?;
    }
    Ok(0)
}

/// `domfsfreeze`.
pub async fn fsfreeze(gw: &Gateway, g: &Global, a: FsfreezeArgs) -> Result<u8, CtlError> {
    let n = gw
        .agent()
        .freeze_filesystems(FreezeFilesystemsRequest {
            domain: a.domain.clone(),
            timeout: a.timeout.map(seconds),
            mountpoints: a.mountpoint.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .frozen_count;
    if g.json {
        return output::print_json(&serde_json::json!({ "frozen_count": n })).map(|()| 0);
    }
    out_line(&format!("Froze {n} filesystem(s)"))?;
    Ok(0)
}

/// `domfsthaw`.
pub async fn fsthaw(gw: &Gateway, g: &Global, a: DomArgTimeout) -> Result<u8, CtlError> {
    let n = gw
        .agent()
        .thaw_filesystems(ThawFilesystemsRequest {
            domain: a.domain.clone(),
            timeout: a.timeout.map(seconds),
            ..Default::default()
        })
        .await?
        .into_inner()
        .thawed_count;
    if g.json {
        return output::print_json(&serde_json::json!({ "thawed_count": n })).map(|()| 0);
    }
    out_line(&format!("Thawed {n} filesystem(s)"))?;
    Ok(0)
}

/// `guest-exec`.
pub async fn exec(gw: &Gateway, g: &Global, a: ExecArgs) -> Result<u8, CtlError> {
    let input = if a.stdin {
        read_input(std::path::Path::new("-"))?
    } else {
        Vec::new()
    };
    let (path, args) = a
        .command
        .split_first()
        .ok_or_else(|| CtlError::Usage("guest-exec needs a program after --".into()))?;
    let mut agent = gw.agent();
    let call = agent.exec(ExecRequest {
        domain: a.domain.clone(),
        path: path.clone(),
        args: args.to_vec(),
        env: a.env.clone(),
        input,
        capture_output: true,
        wait: true,
        wait_timeout: a.timeout.map(seconds),
        ..Default::default()
    });
    let reply = waiting(&format!("running {path} in {}", a.domain), call)
        .await?
        .into_inner();
    let status = reply.status.clone().unwrap_or_default();
    if g.json {
        let mut v = output::to_json("qvirt.v1.ExecResponse", &reply)?;
        // Output as text where it is UTF-8 (the JSON mapping gives base64).
        for (key, bytes) in [("stdout", &status.stdout), ("stderr", &status.stderr)] {
            if let Ok(text) = std::str::from_utf8(bytes) {
                v["status"][key] = serde_json::Value::String(text.to_owned());
            }
        }
        output::print_json(&v)?;
    } else {
        write_out("stdout", &mut std::io::stdout().lock(), &status.stdout)?;
        write_out("stderr", &mut std::io::stderr().lock(), &status.stderr)?;
        if status.stdout_truncated || status.stderr_truncated {
            eprintln!("warning: the agent cut the program's output at its limit");
        }
    }
    if !status.exited {
        return Err(CtlError::Failed(format!(
            "the program still runs in the guest after {}s (agent pid {})",
            a.timeout.unwrap_or(0),
            reply.pid
        )));
    }
    Ok(match status.termination {
        Some(guest_exec_status::Termination::ExitCode(c)) => {
            u8::try_from(c.clamp(0, 255)).unwrap_or(255)
        }
        Some(guest_exec_status::Termination::Signal(s)) => {
            u8::try_from((128 + s).clamp(0, 255)).unwrap_or(255)
        }
        None => 0,
    })
}

/// `guest-file-read`: the bytes on stdout or into `--output`; with
/// `--json`, `ReadFileResponse` in protobuf's JSON mapping (`data` in
/// base64, `eof`) plus `path`, `offset` and `size`, and no `data` when
/// the bytes went to `--output`.
pub async fn file_read(gw: &Gateway, g: &Global, a: FileReadArgs) -> Result<u8, CtlError> {
    let reply = gw
        .agent()
        .read_file(ReadFileRequest {
            domain: a.domain.clone(),
            path: a.path.clone(),
            offset: a.offset,
            length: a.length.unwrap_or(0),
            ..Default::default()
        })
        .await?
        .into_inner();
    if let Some(file) = &a.output {
        std::fs::write(file, &reply.data).map_err(|source| CtlError::Io {
            what: format!("cannot write {}", file.display()),
            source,
        })?;
    }
    if g.json {
        let mut v = output::to_json("qvirt.v1.ReadFileResponse", &reply)?;
        v["path"] = a.path.clone().into();
        v["offset"] = a.offset.into();
        v["size"] = reply.data.len().into();
        if let (Some(file), Some(map)) = (&a.output, v.as_object_mut()) {
            map.remove("data");
            map.insert("output".into(), file.display().to_string().into());
        }
        return output::print_json(&v).map(|()| 0);
    }
    if a.output.is_none() {
        write_out("stdout", &mut std::io::stdout().lock(), &reply.data)?;
    }
    Ok(0)
}

/// `guest-file-write`.
pub async fn file_write(gw: &Gateway, g: &Global, a: FileWriteArgs) -> Result<u8, CtlError> {
    let data = read_input(&a.input)?;
    let mode = if a.append {
        FileWriteMode::Append
    } else {
        FileWriteMode::Create
    };
    let n = gw
        .agent()
        .write_file(WriteFileRequest {
            domain: a.domain.clone(),
            path: a.path.clone(),
            data,
            mode: mode as i32,
            ..Default::default()
        })
        .await?
        .into_inner()
        .written_bytes;
    if g.json {
        return output::print_json(&serde_json::json!({ "written_bytes": n })).map(|()| 0);
    }
    out_line(&format!("Wrote {n} bytes to {}", a.path))?;
    Ok(0)
}
