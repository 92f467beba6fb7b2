//! guest-fsfreeze-status/freeze/freeze-list/thaw: the frozen mode and its
//! marker, the optional hook, FIFREEZE/FITHAW on the mounted block-device
//! filesystems (reverse mount order for freezing).

use std::os::fd::{AsFd, BorrowedFd};

use qvirt_qga::{QgaError, Value};

use crate::agent::{Agent, CmdResult};
use crate::args::Args;

use crate::sys;

/// guest-fsfreeze-status: the agent's own flag.
pub fn status(agent: &mut Agent, args: &mut Args) -> CmdResult {
    args.done()?;
    Ok(Some(Value::from(if agent.frozen {
        "frozen"
    } else {
        "thawed"
    })))
}

/// Mount points of block-device filesystems, in mount order (network
/// filesystems left out).
fn mounts() -> Vec<String> {
    crate::commands::disks::mounts()
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.fstype != "smbfs" && m.fstype != "cifs")
        .map(|m| m.dir)
        .collect()
}

/// Opens `path` and runs `op` (FIFREEZE or FITHAW) on its filesystem.
fn ioctl_path(path: &str, op: fn(BorrowedFd<'_>) -> std::io::Result<()>) -> std::io::Result<()> {
    let file = std::fs::File::open(path)?;
    op(file.as_fd())
}

fn run_hook(agent: &Agent, arg: &str) -> Result<(), QgaError> {
    let Some(hook) = &agent.options.fsfreeze_hook else {
        return Ok(());
    };
    let status = std::process::Command::new(hook)
        .arg(arg)
        .stdin(std::process::Stdio::null())
        .status()
        .map_err(|e| crate::commands::with_errno("can't execute fsfreeze hook", &e))?;
    match status.code() {
        Some(0) => Ok(()),
        Some(code) => Err(QgaError::generic(format!(
            "fsfreeze hook has failed with status {code}"
        ))),
        None => Err(QgaError::generic(
            "fsfreeze hook was terminated by a signal",
        )),
    }
}

fn do_freeze(agent: &mut Agent, only: Option<Vec<String>>) -> CmdResult {
    run_hook(agent, "freeze")?;
    let mut list = mounts();
    if let Some(only) = &only {
        list.retain(|m| only.contains(m));
    }
    agent
        .set_frozen()
        .map_err(|e| crate::commands::with_errno("failed to set frozen state", &e))?;
    let mut count = 0;
    for m in list.iter().rev() {
        match ioctl_path(m, sys::freeze_fs) {
            Ok(()) => count += 1,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::EBUSY)) => {}
            Err(e) => {
                let err = crate::commands::with_errno(&format!("failed to freeze {m}"), &e);
                thaw_all();
                let _ = agent.unset_frozen();
                return Err(err);
            }
        }
    }
    if count == 0 {
        let _ = agent.unset_frozen();
    }
    Ok(Some(Value::Int(count)))
}

/// FITHAW on every block-device mount; returns how many were thawed.
pub fn thaw_all() -> i64 {
    let mut count = 0;
    for m in mounts() {
        let mut thawed = false;
        while ioctl_path(&m, sys::thaw_fs).is_ok() {
            thawed = true;
        }
        if thawed {
            count += 1;
        }
    }
    count
}

/// guest-fsfreeze-freeze.
pub fn freeze(agent: &mut Agent, args: &mut Args) -> CmdResult {
    args.done()?;
    do_freeze(agent, None)
}

/// guest-fsfreeze-freeze-list.
pub fn freeze_list(agent: &mut Agent, args: &mut Args) -> CmdResult {
    let only = args.opt_str_list("mountpoints")?;
    args.done()?;
    do_freeze(agent, only)
}

/// guest-fsfreeze-thaw.
pub fn thaw(agent: &mut Agent, args: &mut Args) -> CmdResult {
    args.done()?;
    let count = thaw_all();
    let _ = agent.unset_frozen();
    run_hook(agent, "thaw")?;
    Ok(Some(Value::Int(count)))
}
