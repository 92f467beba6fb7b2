//! guest-get-fsinfo, guest-get-disks and guest-fstrim, as qemu-ga 7.2 does
//! them on Linux: the mount list from `/proc/self/mountinfo` (block-device
//! mounts only; btrfs, which reports major 0, through its source device),
//! disk addresses, device nodes and serials from sysfs (the `sysfs`
//! submodule), and FITRIM per mounted filesystem. Lists that qemu-ga
//! builds by prepending come out in reverse, as there.

use std::os::fd::AsFd;
use std::path::Path;

use qvirt_qga::{Dict, QgaError, Value};

use crate::agent::{Agent, CmdResult};
use crate::args::Args;
use crate::commands::{strerror, with_errno};
use crate::sys;

mod sysfs;

use sysfs::{DeviceInfo, DiskAddress, UdevInfo, device_for_syspath, fsinfo_for_device};

/// One mounted block-device filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Mount point (octal escapes decoded).
    pub dir: String,
    /// Filesystem type.
    pub fstype: String,
    /// Device number of the filesystem.
    pub major: u32,
    /// Device number of the filesystem.
    pub minor: u32,
}

/// Decodes the `\ooo` escapes of a mountinfo field.
pub fn decode_mount_name(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = u32::from(b[i + 1] - b'0') * 64
                + u32::from(b[i + 2] - b'0') * 8
                + u32::from(b[i + 3] - b'0');
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The device number of a block device node.
fn block_dev_number(path: &str) -> Option<(u32, u32)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = std::fs::metadata(path).ok()?;
    if !meta.file_type().is_block_device() {
        return None;
    }
    let rdev = meta.rdev();
    Some((libc::major(rdev), libc::minor(rdev)))
}

/// Parses mountinfo text into the block-device mounts, in mount order.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    let mut out = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let (Some(devno), Some(dir)) = (fields.get(2), fields.get(4)) else {
            continue;
        };
        let Some((major, minor)) = devno
            .split_once(':')
            .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)))
        else {
            continue;
        };
        let Some(sep) = fields.iter().skip(5).position(|f| *f == "-").map(|p| p + 5) else {
            continue;
        };
        let Some(fstype) = fields.get(sep + 1).filter(|t| !t.is_empty()) else {
            continue;
        };
        let source = fields.get(sep + 2).map(|s| decode_mount_name(s));
        let (major, minor) = if major == 0 {
            // btrfs reports major 0: use its source device instead.
            match (*fstype, source.as_deref().and_then(block_dev_number)) {
                ("btrfs", Some(dev)) => dev,
                _ => continue,
            }
        } else {
            (major, minor)
        };
        out.push(Mount {
            dir: decode_mount_name(dir),
            fstype: (*fstype).to_owned(),
            major,
            minor,
        });
    }
    out
}

/// The block-device mounts of this process's mount namespace.
pub fn mounts() -> Result<Vec<Mount>, QgaError> {
    match std::fs::read_to_string("/proc/self/mountinfo") {
        Ok(text) => Ok(parse_mountinfo(&text)),
        Err(_) => mounts_from_mtab(),
    }
}

/// The fallback qemu-ga uses without mountinfo: /proc/self/mounts, with
/// the device number from each source device node.
fn mounts_from_mtab() -> Result<Vec<Mount>, QgaError> {
    let text = std::fs::read_to_string("/proc/self/mounts")
        .map_err(|e| with_errno("failed to open mtab file: '/proc/self/mounts'", &e))?;
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(src), Some(dir), Some(fstype)) = (f.first(), f.get(1), f.get(2)) else {
            continue;
        };
        if matches!(*fstype, "rootfs" | "devtmpfs") {
            continue;
        }
        let Some((major, minor)) = block_dev_number(&decode_mount_name(src)) else {
            continue;
        };
        out.push(Mount {
            dir: decode_mount_name(dir),
            fstype: (*fstype).to_owned(),
            major,
            minor,
        });
    }
    Ok(out)
}

fn fsinfo_for_mount(m: &Mount) -> Result<Value, QgaError> {
    let mut info = DeviceInfo::default();
    fsinfo_for_device(
        &format!("/sys/dev/block/{}:{}", m.major, m.minor),
        &mut info,
    )?;
    let mut d = Dict::new();
    d.insert("name", info.name.unwrap_or_default());
    d.insert("mountpoint", m.dir.as_str());
    d.insert("type", m.fstype.as_str());
    if let Some((used, total)) = usage(&m.dir) {
        d.insert("used-bytes", used);
        d.insert("total-bytes", total);
    }
    d.insert(
        "disk",
        info.disks
            .iter()
            .map(DiskAddress::to_value)
            .collect::<Vec<_>>(),
    );
    Ok(Value::Object(d))
}

/// (used, total for non-root) bytes from statvfs.
fn usage(dir: &str) -> Option<(u64, u64)> {
    let (frsize, blocks, bfree, bavail) = sys::statvfs(Path::new(dir)).ok()?;
    let used = blocks.wrapping_sub(bfree);
    let total = used.wrapping_add(bavail);
    Some((used.wrapping_mul(frsize), total.wrapping_mul(frsize)))
}

/// guest-get-fsinfo.
pub fn get_fsinfo(_agent: &mut Agent, args: &mut Args) -> CmdResult {
    args.done()?;
    let mut list = Vec::new();
    for m in mounts()?.iter().rev() {
        list.push(fsinfo_for_mount(m)?);
    }
    Ok(Some(Value::Array(list)))
}

/// guest-get-disks.
pub fn get_disks(_agent: &mut Agent, args: &mut Args) -> CmdResult {
    args.done()?;
    let dir = std::fs::read_dir("/sys/block")
        .map_err(|e| with_errno("Can't open directory \"/sys/block\"", &e))?;
    // Built by prepending, as qemu-ga: reversed at the end.
    let mut list: Vec<Value> = Vec::new();
    for entry in dir.flatten() {
        if !entry.file_type().is_ok_and(|t| t.is_symlink()) {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        match std::fs::read(format!("/sys/block/{name}/size")) {
            Ok(size) if size != b"0\n" => {}
            _ => continue,
        }
        let disk_dir = format!("/sys/block/{name}");
        let Some(dev_name) = device_for_syspath(&disk_dir) else {
            continue;
        };
        let mut d = Dict::new();
        d.insert("name", dev_name.as_str());
        d.insert("partition", false);
        if let Ok(deps) = std::fs::read_dir(format!("{disk_dir}/slaves")) {
            let mut names: Vec<Value> = Vec::new();
            for dep in deps.flatten() {
                let dep_dir = format!("{disk_dir}/slaves/{}", dep.file_name().to_string_lossy());
                if let Some(dev) = device_for_syspath(&dep_dir) {
                    names.insert(0, Value::from(dev));
                }
            }
            d.insert("dependencies", names);
        }
        let mut info = DeviceInfo::default();
        // An error here only leaves the address out, as in qemu-ga.
        if fsinfo_for_device(&disk_dir, &mut info).is_ok()
            && let Some(addr) = info.disks.first()
        {
            d.insert("address", addr.to_value());
        }
        if let Some(alias) =
            UdevInfo::new(&disk_dir).and_then(|u| u.property("DM_NAME").map(str::to_owned))
        {
            d.insert("alias", alias);
        }
        list.push(Value::Object(d));
        // Partitions: entries of the disk's directory named after it.
        if let Ok(parts) = std::fs::read_dir(&disk_dir) {
            for part in parts.flatten() {
                let part_name = part.file_name().to_string_lossy().into_owned();
                if !part_name.starts_with(&name) {
                    continue;
                }
                let Some(part_dev) = device_for_syspath(&format!("{disk_dir}/{part_name}")) else {
                    continue;
                };
                let mut p = Dict::new();
                p.insert("name", part_dev);
                p.insert("partition", true);
                p.insert("dependencies", vec![Value::from(dev_name.as_str())]);
                list.push(Value::Object(p));
            }
        }
    }
    list.reverse();
    Ok(Some(Value::Array(list)))
}

/// guest-fstrim `{minimum?: int}`: FITRIM on every mounted block-device
/// filesystem; one result per mount, errors per path.
pub fn fstrim(_agent: &mut Agent, args: &mut Args) -> CmdResult {
    let minimum = args.opt_int("minimum")?;
    args.done()?;
    let mut paths = Vec::new();
    for m in mounts()?.iter().rev() {
        paths.push(Value::Object(trim_one(&m.dir, minimum)));
    }
    let mut d = Dict::new();
    d.insert("paths", paths);
    Ok(Some(Value::Object(d)))
}

fn trim_one(dir: &str, minimum: Option<i64>) -> Dict {
    let mut d = Dict::new();
    d.insert("path", dir);
    let file = match open_dir_readonly(Path::new(dir)) {
        Ok(f) => f,
        Err(e) => {
            d.insert("error", format!("failed to open: {}", strerror(&e)));
            return d;
        }
    };
    let (trimmed, minlen) = match sys::fitrim(file.as_fd(), minimum.unwrap_or(0) as u64) {
        Ok(r) => r,
        Err(e) => {
            let msg = match e.raw_os_error() {
                Some(libc::ENOTTY) | Some(libc::EOPNOTSUPP) => "trim not supported".to_owned(),
                _ => format!("failed to trim: {}", strerror(&e)),
            };
            d.insert("error", msg);
            return d;
        }
    };
    d.insert("trimmed", trimmed as i64);
    d.insert("minimum", minlen as i64);
    d
}

fn open_dir_readonly(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_mountinfo_keeps_block_devices_and_decodes_names() {
        let text = "22 27 0:21 / /proc rw,relatime - proc proc rw\n\
                    27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
                    40 27 7:3 / /mnt/a\\040b rw shared:1 - ext4 /dev/loop3 rw\n\
                    41 27 0:50 / /b rw - btrfs /nonexistent-dev rw\n\
                    garbage line\n";
        let m = parse_mountinfo(text);
        assert_eq!(
            m,
            vec![
                Mount {
                    dir: "/".into(),
                    fstype: "ext4".into(),
                    major: 254,
                    minor: 0
                },
                Mount {
                    dir: "/mnt/a b".into(),
                    fstype: "ext4".into(),
                    major: 7,
                    minor: 3
                },
            ]
        );
    }
}
