//! guest-get-host-name, guest-get-users, guest-get-timezone,
//! guest-get-osinfo and guest-shutdown.

use qvirt_qga::unicode::lossy;
use qvirt_qga::{Dict, QgaError, Value};

use crate::agent::{Agent, CmdResult};
use crate::args::Args;
use crate::sys;

/// guest-get-host-name: `gethostname()`, or "localhost" if it fails.
pub fn host_name(_agent: &mut Agent, args: &mut Args) -> CmdResult {
    args.done()?;
    let name = match sys::hostname() {
        Ok(name) => lossy(&name),
        Err(_) => "localhost".to_owned(),
    };
    let mut d = Dict::new();
    d.insert("host-name", name);
    Ok(Some(Value::Object(d)))
}

/// guest-get-timezone: zone abbreviation and offset east of UTC now.
pub fn timezone(_agent: &mut Agent, args: &mut Args) -> CmdResult {
    args.done()?;
    let (offset, zone) = local_zone();
    let mut d = Dict::new();
    if !zone.is_empty() {
        d.insert("zone", zone);
    }
    d.insert("offset", offset);
    Ok(Some(Value::Object(d)))
}

fn local_zone() -> (i64, String) {
    match sys::local_zone() {
        Some((offset, zone)) => (offset, zone.map(|z| lossy(&z)).unwrap_or_default()),
        None => (0, "UTC".to_owned()),
    }
}

/// guest-get-users: one entry per user with its earliest login (utmpx
/// USER_PROCESS records).
pub fn users(_agent: &mut Agent, args: &mut Args) -> CmdResult {
    args.done()?;
    let mut order: Vec<String> = Vec::new();
    let mut first: std::collections::HashMap<String, f64> = Default::default();
    for (raw, t) in sys::user_logins() {
        let user = lossy(&raw);
        match first.get_mut(&user) {
            Some(old) => {
                if t < *old {
                    *old = t;
                }
            }
            None => {
                order.push(user.clone());
                first.insert(user, t);
            }
        }
    }
    let list = order
        .into_iter()
        .map(|user| {
            let t = first.get(&user).copied().unwrap_or(0.0);
            let mut d = Dict::new();
            d.insert("user", user);
            d.insert("login-time", Value::Double(t));
            Value::Object(d)
        })
        .collect::<Vec<_>>();
    Ok(Some(Value::Array(list)))
}

/// guest-get-osinfo: uname plus os-release (`$QGA_OS_RELEASE`, else
/// /etc/os-release, else /usr/lib/os-release).
pub fn osinfo(_agent: &mut Agent, args: &mut Args) -> CmdResult {
    args.done()?;
    let mut d = Dict::new();
    if let Ok((release, version, machine)) = sys::uname() {
        d.insert("kernel-release", lossy(&release));
        d.insert("kernel-version", lossy(&version));
        d.insert("machine", lossy(&machine));
    }
    let text = match std::env::var_os("QGA_OS_RELEASE") {
        Some(p) => std::fs::read(p).ok(),
        None => std::fs::read("/etc/os-release")
            .or_else(|_| std::fs::read("/usr/lib/os-release"))
            .ok(),
    };
    if let Some(text) = text.and_then(|t| String::from_utf8(t).ok()) {
        let values = parse_os_release(&text);
        for (key, member) in [
            ("ID", "id"),
            ("NAME", "name"),
            ("PRETTY_NAME", "pretty-name"),
            ("VERSION", "version"),
            ("VERSION_ID", "version-id"),
            ("VARIANT", "variant"),
            ("VARIANT_ID", "variant-id"),
        ] {
            if let Some(v) = values.get(key) {
                d.insert(member, v.clone());
            }
        }
    }
    Ok(Some(Value::Object(d)))
}

/// Parses os-release lines `KEY=value`: quoted values are shell-unquoted,
/// unquoted ones end at the first space or `;`.
pub fn parse_os_release(text: &str) -> std::collections::HashMap<String, String> {
    let mut out = std::collections::HashMap::new();
    for line in text.lines() {
        let line = line.trim_start();
        if line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim_start();
        let value = if value.starts_with('"') || value.starts_with('\'') {
            match shell_unquote(value) {
                Some(v) => v,
                None => continue,
            }
        } else {
            value
                .split([' ', ';'])
                .next()
                .unwrap_or_default()
                .to_owned()
        };
        out.insert(key.trim().to_owned(), value);
    }
    out
}

/// GLib's `g_shell_unquote`: single quotes literal, double quotes with
/// `\` escaping only `$ \` " \\` and newline, backslash outside quotes.
fn shell_unquote(s: &str) -> Option<String> {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => loop {
                match chars.next()? {
                    '\'' => break,
                    x => out.push(x),
                }
            },
            '"' => loop {
                match chars.next()? {
                    '"' => break,
                    '\\' => match chars.next()? {
                        x @ ('"' | '\\' | '`' | '$' | '\n') => out.push(x),
                        x => {
                            out.push('\\');
                            out.push(x);
                        }
                    },
                    x => out.push(x),
                }
            },
            '\\' => match chars.next() {
                Some('\n') | None => {}
                Some(x) => out.push(x),
            },
            x => out.push(x),
        }
    }
    Some(out)
}

/// guest-shutdown: runs `/sbin/shutdown` and sends nothing on success.
pub fn shutdown(_agent: &mut Agent, args: &mut Args) -> CmdResult {
    let mode = args.opt_str("mode")?;
    args.done()?;
    let flag = match mode.as_deref() {
        None | Some("powerdown") => "-P",
        Some("halt") => "-H",
        Some("reboot") => "-r",
        Some(_) => {
            return Err(QgaError::generic(
                "mode is invalid (valid values are: halt|powerdown|reboot",
            ));
        }
    };
    run_helper(
        "/sbin/shutdown",
        "shutdown",
        &["-h", flag, "+0", "hypervisor initiated shutdown"],
    )
    .map_err(|e| match e {
        HelperError::Failed => QgaError::generic("child process has failed to shutdown"),
        other => other.into(),
    })?;
    Ok(None)
}

/// Why a helper program (shutdown, hwclock) failed.
pub enum HelperError {
    /// fork/exec failed.
    Spawn(std::io::Error),
    /// It died from a signal.
    Abnormal,
    /// It exited non-zero.
    Failed,
}

impl From<HelperError> for QgaError {
    fn from(e: HelperError) -> Self {
        match e {
            HelperError::Spawn(e) => {
                crate::commands::with_errno("failed to create child process", &e)
            }
            HelperError::Abnormal => QgaError::generic("child process has terminated abnormally"),
            HelperError::Failed => QgaError::generic("child process has failed"),
        }
    }
}

/// Runs a helper as qemu-ga does: own session, stdio on /dev/null, and
/// waits for it.
pub fn run_helper(path: &str, argv0: &str, args: &[&str]) -> Result<(), HelperError> {
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    let mut cmd = std::process::Command::new(path);
    cmd.arg0(argv0)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    let status = cmd.status().map_err(HelperError::Spawn)?;
    match status.code() {
        Some(0) => Ok(()),
        Some(_) => Err(HelperError::Failed),
        None => Err(HelperError::Abnormal),
    }
}

const HWCLOCK: &str = "/sbin/hwclock";

/// guest-set-time: with `time` (ns) set the system clock and then the RTC
/// (`hwclock -w`); without, set the system clock from the RTC
/// (`hwclock -s`). Unsupported when /sbin/hwclock is not executable.
pub fn set_time(_agent: &mut Agent, args: &mut Args) -> CmdResult {
    let time = args.opt_int("time")?;
    args.done()?;
    if !sys::is_executable(std::path::Path::new(HWCLOCK)) {
        return Err(crate::commands::unsupported_error());
    }
    if let Some(ns) = time {
        let secs = ns / 1_000_000_000;
        let usecs = (ns % 1_000_000_000) / 1000;
        // Years 1970..2070 only, as qemu-ga (GDate of the seconds).
        let year = 1970 + secs.div_euclid(31_556_952);
        if !(1970..2070).contains(&year) {
            return Err(crate::commands::with_errno(
                "Invalid time",
                &std::io::Error::last_os_error(),
            ));
        }
        if let Err(e) = sys::set_time_of_day(secs, usecs) {
            return Err(crate::commands::with_errno(
                "Failed to set time to guest",
                &e,
            ));
        }
    }
    let flag = if time.is_some() { "-w" } else { "-s" };
    run_helper(HWCLOCK, "hwclock", &[flag]).map_err(|e| match e {
        HelperError::Failed => {
            QgaError::generic("hwclock failed to set hardware clock to system time")
        }
        other => other.into(),
    })?;
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_os_release_parsing_matches_test_qga() {
        let text = "ID=qemu-ga-test\nNAME=QEMU-GA\nPRETTY_NAME=\"QEMU Guest Agent test\"\nVERSION=\"Test 1\"\nVERSION_ID=1\nVARIANT=\"Unit test \\\"'$\\`\\\\ and \\\\\\\\ etc.\"\nVARIANT_ID=\"unit-test\"\n";
        let v = parse_os_release(text);
        assert_eq!(v["ID"], "qemu-ga-test");
        assert_eq!(v["PRETTY_NAME"], "QEMU Guest Agent test");
        assert_eq!(v["VERSION_ID"], "1");
        assert_eq!(v["VARIANT"], "Unit test \"'$`\\ and \\\\ etc.");
    }
}
