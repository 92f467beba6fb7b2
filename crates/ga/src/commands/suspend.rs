//! guest-suspend-disk, guest-suspend-ram and guest-suspend-hybrid as
//! qemu-ga 7.2 does them on Linux: systemd first (`systemctl status
//! systemd-<mode>` answering 1-3 means supported, then `systemctl <mode>`),
//! then pm-utils (`pm-is-supported`, `pm-<mode>`), then writing the mode
//! to `/sys/power/state`.
//!
//! The first method that supports the mode and succeeds ends the chain;
//! with none supporting it the answer is "the requested suspend mode is
//! not supported by the guest". These commands send no response on
//! success.

use std::process::Stdio;

use qvirt_qga::QgaError;

use crate::agent::{Agent, CmdResult};
use crate::args::Args;

const SYS_STATE: &str = "/sys/power/state";

/// The three suspend modes, in qemu-ga's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// guest-suspend-disk.
    Disk,
    /// guest-suspend-ram.
    Ram,
    /// guest-suspend-hybrid.
    Hybrid,
}

impl Mode {
    fn systemd_unit(self) -> &'static str {
        match self {
            Mode::Disk => "systemd-hibernate",
            Mode::Ram => "systemd-suspend",
            Mode::Hybrid => "systemd-hybrid-sleep",
        }
    }

    fn systemctl_verb(self) -> &'static str {
        match self {
            Mode::Disk => "hibernate",
            Mode::Ram => "suspend",
            Mode::Hybrid => "hybrid-sleep",
        }
    }

    fn pm_flag(self) -> &'static str {
        match self {
            Mode::Disk => "--hibernate",
            Mode::Ram => "--suspend",
            Mode::Hybrid => "--suspend-hybrid",
        }
    }

    fn pm_binary(self) -> &'static str {
        match self {
            Mode::Disk => "pm-hibernate",
            Mode::Ram => "pm-suspend",
            Mode::Hybrid => "pm-suspend-hybrid",
        }
    }

    fn sys_state(self) -> Option<&'static str> {
        match self {
            Mode::Disk => Some("disk"),
            Mode::Ram => Some("mem"),
            Mode::Hybrid => None,
        }
    }
}

/// guest-suspend-disk.
pub fn disk(_agent: &mut Agent, args: &mut Args) -> CmdResult {
    args.done()?;
    suspend(Mode::Disk)?;
    Ok(None)
}

/// guest-suspend-ram.
pub fn ram(_agent: &mut Agent, args: &mut Args) -> CmdResult {
    args.done()?;
    suspend(Mode::Ram)?;
    Ok(None)
}

/// guest-suspend-hybrid.
pub fn hybrid(_agent: &mut Agent, args: &mut Args) -> CmdResult {
    args.done()?;
    suspend(Mode::Hybrid)?;
    Ok(None)
}

/// `run_process_child`: runs `cmd` found in `PATH` with stdio on
/// /dev/null; `Ok(None)` if the program is not there, else its exit
/// status (0 if a signal killed it, as `WEXITSTATUS`).
fn run_process_child(cmd: &[&str]) -> Result<Option<i32>, QgaError> {
    let Some(program) =
        super::password::find_program_in_path(cmd[0], std::env::var_os("PATH").as_deref())
    else {
        return Ok(None);
    };
    let status = std::process::Command::new(&program)
        .args(&cmd[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| {
            QgaError::generic(format!(
                "failed to create child process, error 'Failed to execute child process \u{201C}{}\u{201D} ({})'",
                cmd[0],
                super::strerror(&e)
            ))
        })?;
    Ok(Some(status.code().unwrap_or(0)))
}

/// `systemd_supports_mode`: `systemctl status systemd-<mode>` exits 1 to
/// 3 (LSB "not running" and the like; 4 is "no such unit").
fn systemd_supports(mode: Mode) -> bool {
    matches!(
        run_process_child(&["systemctl", "status", mode.systemd_unit()]),
        Ok(Some(1..=3))
    )
}

/// `systemd_suspend`.
fn systemd_suspend(mode: Mode) -> Result<(), QgaError> {
    let verb = mode.systemctl_verb();
    match run_process_child(&["systemctl", verb])? {
        Some(0) => Ok(()),
        None => Err(QgaError::generic(format!(
            "the helper program 'systemctl {verb}' was not found"
        ))),
        Some(n) => Err(QgaError::generic(format!(
            "the helper program 'systemctl {verb}' returned an unexpected exit status code ({n})"
        ))),
    }
}

/// `pmutils_supports_mode`: `pm-is-supported` exits 0.
fn pmutils_supports(mode: Mode) -> bool {
    matches!(
        run_process_child(&["pm-is-supported", mode.pm_flag()]),
        Ok(Some(0))
    )
}

/// `pmutils_suspend`.
fn pmutils_suspend(mode: Mode) -> Result<(), QgaError> {
    let bin = mode.pm_binary();
    match run_process_child(&[bin])? {
        Some(0) => Ok(()),
        None => Err(QgaError::generic(format!(
            "the helper program '{bin}' was not found"
        ))),
        Some(n) => Err(QgaError::generic(format!(
            "the helper program '{bin}' returned an unexpected exit status code ({n})"
        ))),
    }
}

/// `linux_sys_state_supports_mode`: the mode's word is in the first 31
/// bytes of `/sys/power/state` (hybrid has none).
fn sys_state_supports(mode: Mode) -> bool {
    let Some(word) = mode.sys_state() else {
        return false;
    };
    use std::io::Read;
    let mut buf = [0u8; 31];
    let n = std::fs::File::open(SYS_STATE)
        .and_then(|mut f| f.read(&mut buf))
        .unwrap_or(0);
    buf[..n].windows(word.len()).any(|w| w == word.as_bytes())
}

/// `linux_sys_state_suspend`: writes the mode (qemu-ga does it in a
/// child it waits for; the write returns once the guest has resumed).
fn sys_state_suspend(mode: Mode) -> Result<(), QgaError> {
    use std::io::Write;
    let word = mode.sys_state().unwrap_or("");
    std::fs::OpenOptions::new()
        .write(true)
        .open(SYS_STATE)
        .and_then(|mut f| f.write_all(word.as_bytes()))
        .map_err(|_| QgaError::generic("child process has failed to suspend"))
}

/// `guest_suspend`: the first method that supports the mode and succeeds
/// ends the chain; if none supports it, "not supported"; else the last
/// error.
fn suspend(mode: Mode) -> Result<(), QgaError> {
    let mut supported = false;
    if systemd_supports(mode) {
        supported = true;
        if systemd_suspend(mode).is_ok() {
            return Ok(());
        }
    }
    if pmutils_supports(mode) {
        supported = true;
        if pmutils_suspend(mode).is_ok() {
            return Ok(());
        }
    }
    let mut err = None;
    if sys_state_supports(mode) {
        supported = true;
        err = sys_state_suspend(mode).err();
    }
    if !supported {
        return Err(QgaError::generic(
            "the requested suspend mode is not supported by the guest",
        ));
    }
    err.map_or(Ok(()), Err)
}
