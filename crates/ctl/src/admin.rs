//! The guest administration verbs virsh has over the guest agent:
//! `guestvcpus`, `set-user-password`, `get-user-sshkeys` and
//! `set-user-sshkeys`, with virsh's output.

use std::collections::BTreeSet;
use std::path::PathBuf;

use qvirt_proto::v1::{
    AddAuthorizedKeysRequest, GetAuthorizedKeysRequest, GetGuestVcpusRequest, GuestVcpuState,
    RemoveAuthorizedKeysRequest, SetGuestVcpusRequest, SetUserPasswordRequest,
};

use crate::CtlError;
use crate::conn::{Gateway, Global};
use crate::domain::seconds;
use crate::output::{self, out_line};

/// The most CPU numbers a `--cpulist` may name.
const MAX_CPUS: usize = 4096;
/// The largest keys file `set-user-sshkeys --file` reads.
const MAX_KEYS_FILE_BYTES: u64 = 1024 * 1024;

/// `guestvcpus`: the guest's CPUs, or with `--cpulist` and `--enable` /
/// `--disable`, bring those online or offline.
#[derive(Debug, clap::Args)]
pub struct GuestvcpusArgs {
    /// Domain name or UUID.
    pub domain: String,
    /// CPUs to change: numbers and ranges, e.g. `1,3-5`.
    #[arg(long, value_name = "LIST", requires = "action")]
    pub cpulist: Option<String>,
    /// Bring the CPUs in `--cpulist` online.
    #[arg(long, group = "action", requires = "cpulist")]
    pub enable: bool,
    /// Take the CPUs in `--cpulist` offline.
    #[arg(long, group = "action", requires = "cpulist")]
    pub disable: bool,
    /// Seconds to wait for the agent (default: the service's).
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u64>,
}

/// `set-user-password`.
#[derive(Debug, clap::Args)]
pub struct PasswordArgs {
    /// Domain name or UUID.
    pub domain: String,
    /// The guest user.
    pub user: String,
    /// The new password (with `--encrypted`, already crypted).
    pub password: String,
    /// The password is crypted already (as in /etc/shadow).
    #[arg(long)]
    pub encrypted: bool,
}

/// `get-user-sshkeys`.
#[derive(Debug, clap::Args)]
pub struct GetKeysArgs {
    /// Domain name or UUID.
    pub domain: String,
    /// The guest user.
    pub user: String,
}

/// `set-user-sshkeys`: add the keys of a file to the user's
/// `authorized_keys`, replace them all (`--reset`), or remove them
/// (`--remove`).
#[derive(Debug, clap::Args)]
pub struct SetKeysArgs {
    /// Domain name or UUID.
    pub domain: String,
    /// The guest user.
    pub user: String,
    /// A file of keys, one per line (`#` comments and blank lines skipped).
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Replace every key the user has with those of `--file` (none: remove
    /// them all).
    #[arg(long, conflicts_with = "remove")]
    pub reset: bool,
    /// Remove the keys of `--file` instead of adding them.
    #[arg(long, requires = "file")]
    pub remove: bool,
}

/// CPU numbers from virsh's list syntax: `N`, `N-M`, joined by commas.
pub fn parse_cpulist(text: &str) -> Result<BTreeSet<i64>, CtlError> {
    let bad = |why: &str| CtlError::Usage(format!("invalid --cpulist {text:?}: {why}"));
    let mut cpus = BTreeSet::new();
    for part in text.split(',') {
        let number = |s: &str| {
            s.trim()
                .parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| bad("not a CPU number"))
        };
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (number(a)?, number(b)?),
            None => {
                let n = number(part)?;
                (n, n)
            }
        };
        if first > last {
            return Err(bad("a range ends before it starts"));
        }
        for n in first..=last {
            cpus.insert(n);
            if cpus.len() > MAX_CPUS {
                return Err(bad("too many CPUs"));
            }
        }
    }
    Ok(cpus)
}

/// CPU numbers in virsh's compact form: `0-2,5`.
pub fn format_cpulist(cpus: impl IntoIterator<Item = i64>) -> String {
    let mut ranges: Vec<(i64, i64)> = Vec::new();
    for n in cpus {
        match ranges.last_mut() {
            Some((_, last)) if *last + 1 == n => *last = n,
            _ => ranges.push((n, n)),
        }
    }
    ranges
        .iter()
        .map(|&(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `guestvcpus`.
pub async fn guestvcpus(gw: &Gateway, g: &Global, a: GuestvcpusArgs) -> Result<u8, CtlError> {
    if let Some(list) = &a.cpulist {
        let vcpus = parse_cpulist(list)?
            .into_iter()
            .map(|logical_id| GuestVcpuState {
                logical_id,
                online: a.enable,
            })
            .collect();
        gw.agent()
            .set_guest_vcpus(SetGuestVcpusRequest {
                domain: a.domain.clone(),
                timeout: a.timeout.map(seconds),
                vcpus,
                ..Default::default()
            })
            .await?;
        if g.json {
            output::print_json(&serde_json::json!({}))?;
        }
        return Ok(0);
    }
    let vcpus = gw
        .agent()
        .get_guest_vcpus(GetGuestVcpusRequest {
            domain: a.domain.clone(),
            timeout: a.timeout.map(seconds),
            ..Default::default()
        })
        .await?
        .into_inner()
        .vcpus;
    let pick = |keep: fn(&qvirt_proto::v1::GuestVcpu) -> bool| {
        let mut ids: Vec<i64> = vcpus
            .iter()
            .filter(|v| keep(v))
            .map(|v| v.logical_id)
            .collect();
        ids.sort_unstable();
        format_cpulist(ids)
    };
    let (all, online, offlinable) = (pick(|_| true), pick(|v| v.online), pick(|v| v.can_offline));
    if g.json {
        let value = serde_json::json!({ "vcpus": all, "online": online, "offlinable": offlinable });
        return output::print_json(&value).map(|()| 0);
    }
    out_line(&format!("{:<15}: {all}", "vcpus"))?;
    out_line(&format!("{:<15}: {online}", "online"))?;
    out_line(&format!("{:<15}: {offlinable}", "offlinable"))?;
    Ok(0)
}

/// `set-user-password`.
pub async fn set_password(gw: &Gateway, g: &Global, a: PasswordArgs) -> Result<u8, CtlError> {
    gw.agent()
        .set_user_password(SetUserPasswordRequest {
            domain: a.domain.clone(),
            user: a.user.clone(),
            password: a.password,
            crypted: a.encrypted,
            ..Default::default()
        })
        .await?;
    if g.json {
        return output::print_json(&serde_json::json!({})).map(|()| 0);
    }
    out_line(&format!(
        "Password set successfully for {} in {}",
        a.user, a.domain
    ))?;
    Ok(0)
}

/// `get-user-sshkeys`.
pub async fn get_keys(gw: &Gateway, g: &Global, a: GetKeysArgs) -> Result<u8, CtlError> {
    let keys = gw
        .agent()
        .get_authorized_keys(GetAuthorizedKeysRequest {
            domain: a.domain,
            user: a.user,
            ..Default::default()
        })
        .await?
        .into_inner()
        .keys;
    if g.json {
        return output::print_json(&serde_json::json!({ "keys": keys })).map(|()| 0);
    }
    for key in keys {
        out_line(&key)?;
    }
    Ok(0)
}

/// The keys in `path`: one a line, blank lines and `#` comments skipped.
fn read_keys(path: &std::path::Path) -> Result<Vec<String>, CtlError> {
    use std::io::Read as _;
    let failed = |source| CtlError::Io {
        what: format!("cannot read {}", path.display()),
        source,
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(failed)?
        .take(MAX_KEYS_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(failed)?;
    if text.len() as u64 > MAX_KEYS_FILE_BYTES {
        return Err(CtlError::Usage(format!(
            "{} is larger than {MAX_KEYS_FILE_BYTES} bytes",
            path.display()
        )));
    }
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect())
}

/// `set-user-sshkeys`.
pub async fn set_keys(gw: &Gateway, g: &Global, a: SetKeysArgs) -> Result<u8, CtlError> {
    let keys = match &a.file {
        Some(path) => read_keys(path)?,
        None if a.reset => Vec::new(),
        None => {
            return Err(CtlError::Usage(
                "set-user-sshkeys needs --file, or --reset to remove every key".into(),
            ));
        }
    };
    if a.remove {
        gw.agent()
            .remove_authorized_keys(RemoveAuthorizedKeysRequest {
                domain: a.domain,
                user: a.user,
                keys,
                ..Default::default()
            })
            .await?;
    } else {
        gw.agent()
            .add_authorized_keys(AddAuthorizedKeysRequest {
                domain: a.domain,
                user: a.user,
                keys,
                reset: a.reset,
                ..Default::default()
            })
            .await?;
    }
    if g.json {
        output::print_json(&serde_json::json!({}))?;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn test_cpulists_read_and_print_as_virsh_writes_them() {
        let cpus = parse_cpulist("3,0-1,5-6,1").unwrap();
        assert_eq!(cpus.iter().copied().collect::<Vec<_>>(), [0, 1, 3, 5, 6]);
        assert_eq!(format_cpulist(cpus), "0-1,3,5-6");
        assert_eq!(format_cpulist([2]), "2");
        assert_eq!(format_cpulist([]), "");
        for bad in ["", "a", "-1", "3-1", "1,,2", "0-100000"] {
            assert!(parse_cpulist(bad).is_err(), "{bad:?}");
        }
    }
}
