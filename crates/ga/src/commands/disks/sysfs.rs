//! Where a block device sits, from its sysfs path: the PCI controller and
//! its driver, the SCSI/IDE/SATA host and target numbers, virtio-blk,
//! virtio-scsi and virtio-mmio, and device-mapper/md slaves followed down
//! to their disks. The device node and serial come from what libudev
//! reports (the `uevent` file, then the udev database). This is the
//! `disk` list of guest-get-fsinfo and the `address` of guest-get-disks,
//! as qemu-ga 7.2 builds them.

use qvirt_qga::{Dict, QgaError, Value};

use crate::commands::with_errno;

/// What libudev knows of a sysfs device: its node and properties from
/// `uevent`, then the udev database.
pub(super) struct UdevInfo {
    props: Vec<(String, String)>,
}

impl UdevInfo {
    /// `None` where `udev_device_new_from_syspath` fails (no such device).
    pub(super) fn new(syspath: &str) -> Option<Self> {
        let real = std::fs::canonicalize(syspath).ok()?;
        let uevent = std::fs::read_to_string(real.join("uevent")).ok()?;
        let mut props: Vec<(String, String)> = uevent
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let get = |k: &str| props.iter().find(|(p, _)| p == k).map(|(_, v)| v.clone());
        if let (Some(major), Some(minor)) = (get("MAJOR"), get("MINOR")) {
            let db = format!("/run/udev/data/b{major}:{minor}");
            if let Ok(text) = std::fs::read_to_string(db) {
                for line in text.lines() {
                    if let Some((k, v)) = line.strip_prefix("E:").and_then(|e| e.split_once('=')) {
                        props.push((k.to_owned(), v.to_owned()));
                    }
                }
            }
        }
        Some(UdevInfo { props })
    }

    pub(super) fn property(&self, key: &str) -> Option<&str> {
        self.props
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn devnode(&self) -> Option<String> {
        self.property("DEVNAME").map(|n| {
            if n.starts_with('/') {
                n.to_owned()
            } else {
                format!("/dev/{n}")
            }
        })
    }
}

fn basename(path: &str) -> String {
    let trimmed = path.trim_end_matches('/');
    match trimmed.rsplit_once('/') {
        Some((_, b)) => b.to_owned(),
        None => trimmed.to_owned(),
    }
}

/// A disk address being built (GuestDiskAddress).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct DiskAddress {
    pci: [i64; 4],
    bus_type: &'static str,
    bus: i64,
    target: i64,
    unit: i64,
    serial: Option<String>,
    dev: Option<String>,
}

impl DiskAddress {
    fn new() -> Self {
        DiskAddress {
            pci: [-1; 4],
            bus_type: "unknown",
            bus: 0,
            target: 0,
            unit: 0,
            serial: None,
            dev: None,
        }
    }

    pub(super) fn to_value(&self) -> Value {
        let mut pci = Dict::new();
        pci.insert("domain", self.pci[0]);
        pci.insert("bus", self.pci[1]);
        pci.insert("slot", self.pci[2]);
        pci.insert("function", self.pci[3]);
        let mut d = Dict::new();
        d.insert("pci-controller", pci);
        d.insert("bus-type", self.bus_type);
        d.insert("bus", self.bus);
        d.insert("target", self.target);
        d.insert("unit", self.unit);
        if let Some(s) = &self.serial {
            d.insert("serial", s.as_str());
        }
        if let Some(s) = &self.dev {
            d.insert("dev", s.as_str());
        }
        Value::Object(d)
    }
}

/// What build_guest_fsinfo_for_device fills in.
#[derive(Default)]
pub(super) struct DeviceInfo {
    pub(super) name: Option<String>,
    /// In output order (qemu-ga prepends).
    pub(super) disks: Vec<DiskAddress>,
}

/// Reads `%x` (hex digits) from the start of `s`.
fn hex(s: &str) -> Option<(u32, &str)> {
    let end = s.find(|c: char| !c.is_ascii_hexdigit()).unwrap_or(s.len());
    if end == 0 {
        return None;
    }
    Some((u32::from_str_radix(&s[..end], 16).ok()?, &s[end..]))
}

/// Reads `%u` from the start of `s` (leading spaces and `+` as sscanf).
fn dec(s: &str) -> Option<(u32, &str)> {
    let s = s.trim_start();
    let s = s.strip_prefix('+').unwrap_or(s);
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if end == 0 {
        return None;
    }
    Some((s[..end].parse().ok()?, &s[end..]))
}

/// `"%x:%x:%x.%x"`: a PCI address; returns it and what follows.
fn pci_addr(s: &str) -> Option<([u32; 4], &str)> {
    let (d, s) = hex(s)?;
    let (b, s) = hex(s.strip_prefix(':')?)?;
    let (sl, s) = hex(s.strip_prefix(':')?)?;
    let (f, s) = hex(s.strip_prefix('.')?)?;
    Some(([d, b, sl, f], s))
}

/// `"%*x:%*x/"` then a PCI address: the first device under a PCI root
/// (`pci0000:00/0000:00:02.0`).
fn pci_root_then_addr(s: &str) -> Option<([u32; 4], &str)> {
    let (_, s) = hex(s)?;
    let (_, s) = hex(s.strip_prefix(':')?)?;
    pci_addr(s.strip_prefix('/')?)
}

/// `"/target"` then `"%*u:%*u:%*u/%*u:%u:%u:%u"`.
fn scsi_target(syspath: &str) -> Option<[u32; 3]> {
    let p = syspath.find("/target")?;
    let s = &syspath[p + 7..];
    let (_, s) = dec(s)?;
    let (_, s) = dec(s.strip_prefix(':')?)?;
    let (_, s) = dec(s.strip_prefix(':')?)?;
    let (_, s) = dec(s.strip_prefix('/')?)?;
    let (a, s) = dec(s.strip_prefix(':')?)?;
    let (b, s) = dec(s.strip_prefix(':')?)?;
    let (c, _) = dec(s.strip_prefix(':')?)?;
    Some([a, b, c])
}

/// The driver name of the device at `path` (basename of its `driver` link).
fn driver_of(path: &str) -> Option<String> {
    let link = std::fs::read_link(format!("{path}/driver")).ok()?;
    Some(basename(&link.to_string_lossy()))
}

/// The `ataN` or `hostN` numbers in the directory holding `prefix`'s last
/// component, sorted.
fn hosts(dir: &str, ata: bool) -> Result<Vec<u32>, QgaError> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| with_errno(&format!("opendir(\"{dir}\")"), &e))?;
    let mut out = Vec::new();
    for entry in entries.flatten() {
        if out.len() >= 8 {
            break;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let rest = if ata {
            name.strip_prefix("ata")
        } else {
            name.strip_prefix("host")
        };
        if let Some((n, _)) = rest.and_then(|r| {
            // sscanf "%d": an optional sign, then digits.
            let neg = r.starts_with('-');
            let r = r.strip_prefix('-').or(Some(r))?;
            dec(r).map(|(n, rest)| (if neg { n.wrapping_neg() } else { n }, rest))
        }) {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

const PCI_DRIVERS: &[&str] = &["ata_piix", "sym53c8xx", "virtio-pci", "ahci", "nvme"];

/// The address of a disk behind a PCI controller.
fn fsinfo_for_pci_dev(syspath: &str, disk: &mut DiskAddress) -> Result<bool, QgaError> {
    let Some(p) = syspath.find("/devices/pci") else {
        return Ok(false);
    };
    let Some((mut pci, mut rest)) = pci_root_then_addr(&syspath[p + 12..]) else {
        return Ok(false);
    };
    // Walk down through bridges to the first device with a known driver.
    let driver = loop {
        let upto = syspath.len() - rest.len();
        if let Some(d) = driver_of(&syspath[..upto])
            && PCI_DRIVERS.contains(&d.as_str())
        {
            break d;
        }
        match rest.strip_prefix('/').and_then(pci_addr) {
            Some((next, r)) => {
                pci = next;
                rest = r;
            }
            None => return Ok(false),
        }
    };
    let tgt = scsi_target(syspath);
    let (host_at, ata) = match syspath.find("/ata") {
        Some(i) => (Some((i, i + 4)), true),
        None => (syspath.find("/host").map(|i| (i, i + 5)), false),
    };
    let mut host = None;
    let mut host_list = Vec::new();
    if let Some((at, num)) = host_at
        && let Some((h, _)) = dec(&syspath[num..])
    {
        host = Some(h);
        host_list = hosts(&syspath[..at], ata)?;
    }
    let host_index = || host.and_then(|h| host_list.iter().position(|&x| x == h));
    disk.pci = pci.map(i64::from);
    match driver.as_str() {
        "ata_piix" => {
            // One host per IDE bus; target*:0:<unit>:0.
            let (Some(t), Some(i)) = (tgt, host_index()) else {
                return Ok(false);
            };
            disk.bus_type = "ide";
            disk.bus = i as i64;
            disk.unit = i64::from(t[1]);
        }
        "sym53c8xx" => {
            let Some(t) = tgt else { return Ok(false) };
            disk.bus_type = "scsi";
            disk.unit = i64::from(t[1]);
        }
        "virtio-pci" => match tgt {
            // virtio-scsi: target*:0:0:<unit>.
            Some(t) => {
                disk.bus_type = "scsi";
                disk.unit = i64::from(t[2]);
            }
            // virtio-blk: one disk per device.
            None => disk.bus_type = "virtio",
        },
        "ahci" => {
            // One host per unit.
            let (Some(_), Some(i)) = (tgt, host_index()) else {
                return Ok(false);
            };
            disk.bus_type = "sata";
            disk.unit = i as i64;
        }
        _ => disk.bus_type = "nvme",
    }
    Ok(true)
}

/// A virtio disk not behind PCI (virtio-mmio).
fn fsinfo_for_nonpci_virtio(syspath: &str, disk: &mut DiskAddress) -> bool {
    if !syspath.contains("/virtio") || !syspath.contains("/block") {
        return false;
    }
    match scsi_target(syspath) {
        Some(t) => {
            disk.bus_type = "scsi";
            disk.bus = i64::from(t[0]);
            disk.target = i64::from(t[1]);
            disk.unit = i64::from(t[2]);
        }
        None => disk.bus_type = "virtio",
    }
    true
}

fn fsinfo_for_real_device(syspath: &str, info: &mut DeviceInfo) -> Result<(), QgaError> {
    let mut disk = DiskAddress::new();
    if let Some(udev) = UdevInfo::new(syspath) {
        disk.dev = udev.devnode();
        disk.serial = udev
            .property("ID_SERIAL")
            .filter(|s| !s.is_empty())
            .map(str::to_owned);
    }
    let has_hwinfo = if syspath.contains("/devices/pci") {
        fsinfo_for_pci_dev(syspath, &mut disk)?
    } else if syspath.contains("/virtio") {
        fsinfo_for_nonpci_virtio(syspath, &mut disk)
    } else {
        false
    };
    if has_hwinfo || disk.dev.is_some() || disk.serial.is_some() {
        info.disks.insert(0, disk);
    }
    Ok(())
}

/// A device-mapper or md device: the disks of each of its slaves.
fn fsinfo_for_virtual_device(syspath: &str, info: &mut DeviceInfo) -> Result<(), QgaError> {
    let dirpath = format!("{syspath}/slaves");
    let entries = match std::fs::read_dir(&dirpath) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(with_errno(&format!("opendir(\"{dirpath}\")"), &e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| with_errno(&format!("readdir(\"{dirpath}\")"), &e))?;
        if entry.file_type().is_ok_and(|t| t.is_symlink()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            fsinfo_for_device(&format!("{syspath}/slaves/{name}"), info)?;
        }
    }
    Ok(())
}

pub(super) fn fsinfo_for_device(devpath: &str, info: &mut DeviceInfo) -> Result<(), QgaError> {
    let syspath = match std::fs::canonicalize(devpath) {
        Ok(p) => p.to_string_lossy().into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Containers may hide the device.
            info.name.get_or_insert_with(|| basename(devpath));
            return Ok(());
        }
        Err(e) => return Err(with_errno(&format!("realpath(\"{devpath}\")"), &e)),
    };
    info.name.get_or_insert_with(|| basename(&syspath));
    if syspath.contains("/devices/virtual/block/") {
        fsinfo_for_virtual_device(&syspath, info)
    } else {
        fsinfo_for_real_device(&syspath, info)
    }
}

/// The device node of a sysfs device, as libudev gives it.
pub(super) fn device_for_syspath(syspath: &str) -> Option<String> {
    UdevInfo::new(syspath)?.devnode()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// A fake sysfs device tree under a temp dir: `dev` is the block
    /// device's path below `devices/`, `drivers` the (PCI device dir,
    /// driver) links, `dirs` extra directories (sibling hosts).
    fn fake_device(root: &Path, dev: &str, drivers: &[(&str, &str)], dirs: &[&str]) -> String {
        let path = root.join("devices").join(dev);
        std::fs::create_dir_all(&path).expect("mkdir");
        let name = basename(dev);
        std::fs::write(
            path.join("uevent"),
            format!("MAJOR=8\nMINOR=0\nDEVNAME={name}\nDEVTYPE=disk\n"),
        )
        .expect("uevent");
        for (pci, driver) in drivers {
            let d = root.join("devices").join(pci);
            std::fs::create_dir_all(&d).expect("mkdir");
            std::os::unix::fs::symlink(
                format!("../../../bus/pci/drivers/{driver}"),
                d.join("driver"),
            )
            .expect("symlink");
        }
        for d in dirs {
            std::fs::create_dir_all(root.join("devices").join(d)).expect("mkdir");
        }
        path.to_string_lossy().into_owned()
    }

    fn address_of(syspath: &str) -> (Option<String>, Vec<DiskAddress>) {
        let mut info = DeviceInfo::default();
        fsinfo_for_device(syspath, &mut info).expect("fsinfo");
        (info.name, info.disks)
    }

    fn want(
        pci: [i64; 4],
        bus_type: &'static str,
        bus: i64,
        target: i64,
        unit: i64,
        dev: &str,
    ) -> DiskAddress {
        DiskAddress {
            pci,
            bus_type,
            bus,
            target,
            unit,
            serial: None,
            dev: Some(dev.to_owned()),
        }
    }

    #[test]
    fn test_disk_addresses_from_sysfs_paths() {
        let root = tempfile::tempdir().expect("tempdir");
        let r = root.path();
        // IDE (ata_piix): the bus is the host's index among the ataN hosts.
        let p = fake_device(
            r,
            "pci0000:00/0000:00:01.1/ata2/host1/target1:0:1/1:0:1:0/block/sdb",
            &[("pci0000:00/0000:00:01.1", "ata_piix")],
            &["pci0000:00/0000:00:01.1/ata1"],
        );
        assert_eq!(
            address_of(&p),
            (
                Some("sdb".into()),
                vec![want([0, 0, 1, 1], "ide", 1, 0, 1, "/dev/sdb")]
            )
        );
        // SATA (ahci): the unit is the host's index.
        let p = fake_device(
            r,
            "pci0000:00/0000:00:1f.2/ata3/host2/target2:0:0/2:0:0:0/block/sdc",
            &[("pci0000:00/0000:00:1f.2", "ahci")],
            &[
                "pci0000:00/0000:00:1f.2/ata1",
                "pci0000:00/0000:00:1f.2/ata2",
            ],
        );
        assert_eq!(
            address_of(&p).1,
            vec![want([0, 0, 0x1f, 2], "sata", 0, 0, 2, "/dev/sdc")]
        );
        // virtio-blk and virtio-scsi (unit is the LUN).
        let p = fake_device(
            r,
            "pci0000:00/0000:00:05.0/virtio3/block/vdb",
            &[("pci0000:00/0000:00:05.0", "virtio-pci")],
            &[],
        );
        assert_eq!(
            address_of(&p).1,
            vec![want([0, 0, 5, 0], "virtio", 0, 0, 0, "/dev/vdb")]
        );
        let p = fake_device(
            r,
            "pci0000:00/0000:00:06.0/virtio4/host3/target3:0:0/3:0:0:7/block/sdd",
            &[("pci0000:00/0000:00:06.0", "virtio-pci")],
            &[],
        );
        assert_eq!(
            address_of(&p).1,
            vec![want([0, 0, 6, 0], "scsi", 0, 0, 7, "/dev/sdd")]
        );
        // NVMe behind a PCI bridge: the address is the controller's.
        let p = fake_device(
            r,
            "pci0000:00/0000:00:1c.0/0000:01:00.0/nvme/nvme0/nvme0n1",
            &[
                ("pci0000:00/0000:00:1c.0", "pcieport"),
                ("pci0000:00/0000:00:1c.0/0000:01:00.0", "nvme"),
            ],
            &[],
        );
        assert_eq!(
            address_of(&p).1,
            vec![want([0, 1, 0, 0], "nvme", 0, 0, 0, "/dev/nvme0n1")]
        );
        // An unknown controller: only the device node, address fields unset.
        let p = fake_device(
            r,
            "pci0000:00/0000:00:07.0/host9/block/sde",
            &[("pci0000:00/0000:00:07.0", "mystery")],
            &[],
        );
        assert_eq!(
            address_of(&p).1,
            vec![want([-1; 4], "unknown", 0, 0, 0, "/dev/sde")]
        );
        // virtio-mmio (no PCI).
        let p = fake_device(
            r,
            "platform/a003e00.virtio_mmio/virtio5/block/vdc",
            &[],
            &[],
        );
        assert_eq!(
            address_of(&p).1,
            vec![want([-1; 4], "virtio", 0, 0, 0, "/dev/vdc")]
        );
        // A missing device: its name, no disks.
        assert_eq!(
            address_of(&r.join("devices/nonexistent/dm-9").to_string_lossy()),
            (Some("dm-9".into()), vec![])
        );
    }

    #[test]
    fn test_sysfs_path_parsers() {
        assert_eq!(
            pci_root_then_addr("0000:00/0000:00:1f.2/ata1/host0"),
            Some(([0, 0, 0x1f, 2], "/ata1/host0"))
        );
        assert_eq!(
            scsi_target(
                "/sys/devices/pci0000:00/0000:00:03.0/virtio0/host2/target2:0:1/2:0:1:5/block/sda"
            ),
            Some([0, 1, 5])
        );
        assert_eq!(scsi_target("/sys/devices/x/target2:0"), None);
        assert_eq!(basename("/sys/block/vda/"), "vda");
    }
}
