//! guest-get-vcpus (`/sys/devices/system/cpu/cpuN` in directory order, as
//! qemu-ga lists them; no `online` file: online, cannot go offline),
//! guest-get-cpustats, guest-get-memory-blocks and
//! guest-get-memory-block-info.

use std::io::Read;

use qvirt_qga::{Dict, QgaError, Value};

use crate::agent::{Agent, CmdResult};
use crate::args::Args;
use crate::commands::with_errno;

const CPU_DIR: &str = "/sys/devices/system/cpu";

/// The number after "cpu" in a directory entry name, as `sscanf("cpu%ld")`.
fn cpu_id(name: &str) -> Option<i64> {
    let rest = name.strip_prefix("cpu")?;
    let digits: String = rest
        .char_indices()
        .take_while(|(i, c)| c.is_ascii_digit() || (*i == 0 && (*c == '-' || *c == '+')))
        .map(|(_, c)| c)
        .collect();
    digits.parse().ok()
}

/// guest-get-vcpus.
pub fn get_vcpus(_agent: &mut Agent, args: &mut Args) -> CmdResult {
    args.done()?;
    let dir = std::fs::read_dir(CPU_DIR)
        .map_err(|e| with_errno(&format!("failed to list entries: {CPU_DIR}"), &e))?;
    let mut list = Vec::new();
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(id) = cpu_id(&name) else { continue };
        let path = format!("{CPU_DIR}/cpu{id}/");
        let (online, can_offline) = match std::fs::File::open(format!("{path}online")) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (true, false),
            Err(e) => return Err(with_errno(&format!("open(\"{path}/online\")"), &e)),
            Ok(mut f) => {
                let mut status = [0u8; 1];
                match f.read(&mut status) {
                    Err(e) => return Err(with_errno(&format!("pread(\"{path}/online\")"), &e)),
                    Ok(0) => {
                        return Err(QgaError::generic(format!(
                            "pread(\"{path}/online\"): unexpected EOF"
                        )));
                    }
                    Ok(_) => (status[0] != b'0', true),
                }
            }
        };
        let mut d = Dict::new();
        d.insert("logical-id", id);
        d.insert("online", online);
        d.insert("can-offline", can_offline);
        list.push(Value::Object(d));
    }
    Ok(Some(Value::Array(list)))
}

fn clk_tck() -> u64 {
    crate::sys::clock_ticks().unwrap_or(100)
}

/// guest-get-cpustats: per-CPU lines of /proc/stat in milliseconds
/// (`jiffies * 1000 / CLK_TCK`), with the optional fields present as the
/// kernel provides them.
pub fn get_cpustats(_agent: &mut Agent, args: &mut Args) -> CmdResult {
    args.done()?;
    let text = std::fs::read_to_string("/proc/stat")
        .map_err(|e| with_errno("open(\"/proc/stat\")", &e))?;
    let tck = clk_tck();
    let mut list = Vec::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let Some(name) = fields.next() else { continue };
        let Some(num) = name.strip_prefix("cpu").filter(|n| !n.is_empty()) else {
            continue;
        };
        let values: Vec<u64> = fields.take(10).map_while(|f| f.parse().ok()).collect();
        if values.len() < 4 {
            break;
        }
        let ms = |i: usize| values[i] * 1000 / tck;
        let cpu: i64 = num
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect::<String>()
            .parse()
            .unwrap_or(0);
        let mut d = Dict::new();
        d.insert("type", "linux");
        d.insert("cpu", cpu);
        d.insert("user", ms(0));
        d.insert("nice", ms(1));
        d.insert("system", ms(2));
        d.insert("idle", ms(3));
        if values.len() > 4 {
            d.insert("iowait", ms(4));
        }
        if values.len() > 5 {
            d.insert("irq", ms(5));
            d.insert("softirq", ms(6.min(values.len() - 1)));
        }
        if values.len() > 7 {
            d.insert("steal", ms(7));
        }
        if values.len() > 8 {
            d.insert("guest", ms(8));
        }
        if values.len() > 9 {
            d.insert("guestnice", ms(9));
        }
        list.push(Value::Object(d));
    }
    Ok(Some(Value::Array(list)))
}

/// guest-get-memory-block-info: the hex block size in sysfs.
pub fn get_memory_block_info(_agent: &mut Agent, args: &mut Args) -> CmdResult {
    args.done()?;
    let dir = "/sys/devices/system/memory/";
    let text = std::fs::read_to_string(format!("{dir}block_size_bytes"))
        .map_err(|e| with_errno(&format!("open(\"{dir}\")"), &e))?;
    let size = u64::from_str_radix(text.trim(), 16).unwrap_or(0);
    let mut d = Dict::new();
    d.insert("size", size);
    Ok(Some(Value::Object(d)))
}

/// guest-get-memory-blocks: `/sys/devices/system/memory/memoryN` in
/// directory order with `state` and `removable`.
pub fn get_memory_blocks(_agent: &mut Agent, args: &mut Args) -> CmdResult {
    args.done()?;
    let dir = "/sys/devices/system/memory/";
    let entries = std::fs::read_dir(dir)
        .map_err(|e| with_errno(&format!("Can't open directory\"{dir}\""), &e))?;
    let mut list = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(index) = name.strip_prefix("memory") else {
            continue;
        };
        if !entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            continue;
        }
        let phys: u64 = index
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect::<String>()
            .parse()
            .unwrap_or(0);
        let path = format!("{dir}memory{phys}/");
        let (online, can_offline) = match std::fs::read(format!("{path}state")) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (true, false),
            Err(e) => return Err(with_errno(&format!("open(\"{path}/state\")"), &e)),
            Ok(state) => {
                let online = state.starts_with(b"online");
                let can_offline = match std::fs::read(format!("{path}removable")) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
                    Err(e) => {
                        return Err(with_errno(&format!("open(\"{path}/removable\")"), &e));
                    }
                    Ok(r) => r.first().is_some_and(|&c| c != b'0'),
                };
                (online, can_offline)
            }
        };
        let mut d = Dict::new();
        d.insert("phys-index", phys);
        d.insert("online", online);
        d.insert("can-offline", can_offline);
        list.push(Value::Object(d));
    }
    Ok(Some(Value::Array(list)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_cpu_id_like_sscanf() {
        assert_eq!(cpu_id("cpu0"), Some(0));
        assert_eq!(cpu_id("cpu12"), Some(12));
        assert_eq!(cpu_id("cpufreq"), None);
        assert_eq!(cpu_id("online"), None);
    }
}
