//! guest-get-vcpus (`/sys/devices/system/cpu/cpuN` in directory order, as
//! qemu-ga lists them; no `online` file: online, cannot go offline),
//! guest-set-vcpus (writes `cpuN/online`, stops at the first failure),
//! guest-get-cpustats, guest-get-memory-blocks, guest-set-memory-blocks
//! and guest-get-memory-block-info. The sysfs directories are parameters
//! of the `*_in` functions, so tests run them on a scratch tree.

use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};

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

/// One item of guest-set-vcpus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuRequest {
    /// `logical-id`.
    pub logical_id: i64,
    /// `online`: the state wanted.
    pub online: bool,
}

/// guest-set-vcpus `{vcpus: [{logical-id, online, can-offline?}]}`.
pub fn set_vcpus(_agent: &mut Agent, args: &mut Args) -> CmdResult {
    let vcpus = args.struct_list("vcpus", |item| {
        let logical_id = item.int("logical-id")?;
        let online = item.bool("online")?;
        item.opt_bool("can-offline")?;
        Ok(VcpuRequest { logical_id, online })
    })?;
    args.done()?;
    Ok(Some(Value::Int(set_vcpus_in(CPU_DIR, &vcpus)?)))
}

/// Applies `vcpus` in order under `cpu_dir` as qemu-ga's transfer_vcpu
/// does: stops at the first failure and returns how many were
/// processed; the failure is the answer only if none was.
pub fn set_vcpus_in(cpu_dir: &str, vcpus: &[VcpuRequest]) -> Result<i64, QgaError> {
    let mut processed = 0;
    for vcpu in vcpus {
        if let Err(e) = transfer_vcpu(cpu_dir, vcpu) {
            if processed == 0 {
                return Err(e);
            }
            break;
        }
        processed += 1;
    }
    Ok(processed)
}

/// Brings one CPU to the state asked for (nothing to do if it is in it).
fn transfer_vcpu(cpu_dir: &str, vcpu: &VcpuRequest) -> Result<(), QgaError> {
    let dirpath = format!("{cpu_dir}/cpu{}/", vcpu.logical_id);
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(&dirpath)
        .map_err(|e| with_errno(&format!("open(\"{dirpath}\")"), &e))?;
    let fpath = format!("{dirpath}/online");
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fpath)
    {
        Ok(f) => f,
        // No `online` file: the CPU cannot go offline; asking it to be
        // online is a success.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if vcpu.online {
                return Ok(());
            }
            return Err(QgaError::generic(format!(
                "logical processor #{} can't be offlined",
                vcpu.logical_id
            )));
        }
        Err(e) => return Err(with_errno(&format!("open(\"{fpath}\")"), &e)),
    };
    let mut status = [0u8; 1];
    match file.read_at(&mut status, 0) {
        Err(e) => Err(with_errno(&format!("pread(\"{fpath}\")"), &e)),
        Ok(0) => Err(QgaError::generic(format!(
            "pread(\"{fpath}\"): unexpected EOF"
        ))),
        Ok(_) if (status[0] != b'0') == vcpu.online => Ok(()),
        Ok(_) => {
            let new = if vcpu.online { b"1" } else { b"0" };
            file.write_at(new, 0)
                .map(|_| ())
                .map_err(|e| with_errno(&format!("pwrite(\"{fpath}\")"), &e))
        }
    }
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

const MEMORY_DIR: &str = "/sys/devices/system/memory/";

/// One item of guest-set-memory-blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryBlockRequest {
    /// `phys-index`.
    pub phys_index: u64,
    /// `online`: the state wanted.
    pub online: bool,
}

/// guest-set-memory-blocks `{mem-blks: [{phys-index, online, can-offline?}]}`.
pub fn set_memory_blocks(_agent: &mut Agent, args: &mut Args) -> CmdResult {
    let blocks = args.struct_list("mem-blks", |item| {
        let phys_index = item.uint("phys-index")?;
        let online = item.bool("online")?;
        item.opt_bool("can-offline")?;
        Ok(MemoryBlockRequest { phys_index, online })
    })?;
    args.done()?;
    Ok(Some(Value::Array(set_memory_blocks_in(
        MEMORY_DIR, &blocks,
    ))))
}

/// The outcome of one block, as qemu-ga reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockResponse {
    Success,
    NotFound,
    NotSupported,
    Failed,
}

impl BlockResponse {
    fn name(self) -> &'static str {
        match self {
            BlockResponse::Success => "success",
            BlockResponse::NotFound => "not-found",
            BlockResponse::NotSupported => "operation-not-supported",
            BlockResponse::Failed => "operation-failed",
        }
    }
}

/// Applies every block under `mem_dir` (which ends in `/`) and answers one
/// response per block, as qemu-ga's transfer_memory_block: the
/// `error-code` is the errno of the step that failed.
pub fn set_memory_blocks_in(mem_dir: &str, blocks: &[MemoryBlockRequest]) -> Vec<Value> {
    blocks
        .iter()
        .map(|b| {
            let (response, errno) = transfer_memory_block(mem_dir, b);
            let mut d = Dict::new();
            d.insert("phys-index", b.phys_index);
            d.insert("response", response.name());
            if let Some(code) = errno {
                d.insert("error-code", i64::from(code));
            }
            Value::Object(d)
        })
        .collect()
}

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

fn transfer_memory_block(
    mem_dir: &str,
    block: &MemoryBlockRequest,
) -> (BlockResponse, Option<i32>) {
    use BlockResponse::*;
    if let Err(e) = std::fs::read_dir(mem_dir) {
        let r = if e.kind() == std::io::ErrorKind::NotFound {
            NotSupported
        } else {
            Success
        };
        return (r, Some(errno_of(&e)));
    }
    let dirpath = format!("{mem_dir}memory{}/", block.phys_index);
    let dir_ok = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(&dirpath);
    if let Err(e) = dir_ok {
        let r = if e.kind() == std::io::ErrorKind::NotFound {
            NotFound
        } else {
            Failed
        };
        return (r, Some(errno_of(&e)));
    }
    let state_path = format!("{dirpath}state");
    let mut status = [0u8; 10];
    let read = std::fs::File::open(&state_path).and_then(|f| f.read_at(&mut status, 0));
    match read {
        // A kernel without `state`: the block cannot go offline.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let r = if block.online { Success } else { NotSupported };
            (r, Some(errno_of(&e)))
        }
        Err(e) => (Failed, Some(errno_of(&e))),
        // qemu-ga's "unexpected EOF", with errno still 0.
        Ok(0) => (Failed, Some(0)),
        Ok(_) => {
            let online = status.starts_with(b"online");
            if online == block.online {
                return (Success, None);
            }
            let new: &[u8] = if block.online { b"online" } else { b"offline" };
            let written = std::fs::OpenOptions::new()
                .write(true)
                .open(&state_path)
                .and_then(|f| f.write_at(new, 0));
            match written {
                Ok(_) => (Success, None),
                Err(e) => (Failed, Some(errno_of(&e))),
            }
        }
    }
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

    fn write(path: &std::path::Path, text: &str) {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
    }

    fn read(path: &std::path::Path) -> String {
        std::fs::read_to_string(path).expect("read")
    }

    fn vcpu(logical_id: i64, online: bool) -> VcpuRequest {
        VcpuRequest { logical_id, online }
    }

    #[test]
    fn test_set_vcpus_stops_at_the_first_failure() {
        let root = tempfile::tempdir().expect("tempdir");
        let r = root.path();
        std::fs::create_dir_all(r.join("cpu0")).expect("mkdir");
        write(&r.join("cpu1/online"), "1\n");
        write(&r.join("cpu2/online"), "0\n");
        let dir = r.to_str().expect("utf-8");
        // cpu1 off, cpu2 on, then cpu0 (no `online` file) cannot go off:
        // two processed, the rest (cpu1 back on) not tried.
        let n = set_vcpus_in(
            dir,
            &[vcpu(1, false), vcpu(2, true), vcpu(0, false), vcpu(1, true)],
        )
        .expect("set");
        assert_eq!(n, 2);
        assert_eq!(read(&r.join("cpu1/online")), "0\n");
        assert_eq!(read(&r.join("cpu2/online")), "1\n");
        // Re-onlining a CPU without `online`, or one already in the state
        // asked for, is a success with nothing written.
        assert_eq!(set_vcpus_in(dir, &[vcpu(0, true), vcpu(2, true)]), Ok(2));
        assert_eq!(set_vcpus_in(dir, &[]), Ok(0));
        // The first failing: its error is the answer.
        let e = set_vcpus_in(dir, &[vcpu(0, false)]).expect_err("offline cpu0");
        assert_eq!(e.desc, "logical processor #0 can't be offlined");
        let e = set_vcpus_in(dir, &[vcpu(7, true)]).expect_err("cpu7");
        assert_eq!(
            e.desc,
            format!("open(\"{dir}/cpu7/\"): No such file or directory")
        );
        write(&r.join("cpu3/online"), "");
        let e = set_vcpus_in(dir, &[vcpu(3, true)]).expect_err("empty");
        assert_eq!(
            e.desc,
            format!("pread(\"{dir}/cpu3//online\"): unexpected EOF")
        );
    }

    #[test]
    fn test_set_memory_blocks_answers_per_block() {
        let root = tempfile::tempdir().expect("tempdir");
        let r = root.path();
        write(&r.join("memory0/state"), "online\n");
        write(&r.join("memory1/state"), "offline\n");
        std::fs::create_dir_all(r.join("memory2")).expect("mkdir");
        let dir = format!("{}/", r.display());
        let blk = |phys_index, online| MemoryBlockRequest { phys_index, online };
        let got = set_memory_blocks_in(
            &dir,
            &[
                blk(0, false),
                blk(1, false),
                blk(2, false),
                blk(2, true),
                blk(9, true),
            ],
        );
        let mut text = Vec::new();
        for v in &got {
            qvirt_qga::writer::write_value(&mut text, v);
            text.push(b'\n');
        }
        assert_eq!(
            String::from_utf8_lossy(&text),
            "{\"response\": \"success\", \"phys-index\": 0}\n\
             {\"response\": \"success\", \"phys-index\": 1}\n\
             {\"response\": \"operation-not-supported\", \"error-code\": 2, \"phys-index\": 2}\n\
             {\"response\": \"success\", \"error-code\": 2, \"phys-index\": 2}\n\
             {\"response\": \"not-found\", \"error-code\": 2, \"phys-index\": 9}\n"
        );
        assert!(read(&r.join("memory0/state")).starts_with("offline"));
        let missing = format!("{}/none/", r.display());
        let got = set_memory_blocks_in(&missing, &[blk(0, true)]);
        let d = got[0].as_object().expect("object");
        assert_eq!(
            d.get("response").and_then(Value::as_str),
            Some("operation-not-supported")
        );
    }
}
