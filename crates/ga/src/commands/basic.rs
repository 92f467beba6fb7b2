//! guest-sync, guest-sync-delimited, guest-ping, guest-info,
//! guest-get-time.

use qvirt_qga::{Dict, Value};

use crate::agent::{Agent, COMMANDS, CmdResult};
use crate::args::Args;

/// The version guest-info reports. qemu-ga reports its QEMU version;
/// libvirt reads it, so we report the qemu-ga release we are compatible
/// with (see README.md).
pub const QGA_VERSION: &str = "7.2.22";

/// guest-sync: echoes `id`.
pub fn sync(_agent: &mut Agent, args: &mut Args) -> CmdResult {
    let id = args.int("id")?;
    args.done()?;
    Ok(Some(Value::Int(id)))
}

/// guest-sync-delimited: echoes `id`, its response preceded by 0xFF.
pub fn sync_delimited(agent: &mut Agent, args: &mut Args) -> CmdResult {
    let id = args.int("id")?;
    args.done()?;
    agent.delimit_next = true;
    Ok(Some(Value::Int(id)))
}

/// guest-ping.
pub fn ping(_agent: &mut Agent, args: &mut Args) -> CmdResult {
    args.done()?;
    Ok(None)
}

/// guest-info: version and commands, newest registration first.
pub fn info(agent: &mut Agent, args: &mut Args) -> CmdResult {
    args.done()?;
    let commands = COMMANDS
        .iter()
        .rev()
        .map(|c| {
            let mut d = Dict::new();
            d.insert("name", c.name);
            d.insert("enabled", agent.disabled_reason(c.name).is_none());
            d.insert("success-response", c.success_response);
            Value::Object(d)
        })
        .collect::<Vec<_>>();
    let mut d = Dict::new();
    d.insert("version", QGA_VERSION);
    d.insert("supported_commands", commands);
    Ok(Some(Value::Object(d)))
}

/// guest-get-time: nanoseconds since the epoch at microsecond resolution,
/// as `g_get_real_time() * 1000`.
pub fn get_time(_agent: &mut Agent, args: &mut Args) -> CmdResult {
    args.done()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    Ok(Some(Value::Int(now * 1000)))
}
