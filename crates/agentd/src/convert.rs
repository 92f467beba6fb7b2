//! qemu-ga's JSON replies (qapi-schema.json of 7.2, kebab-case members)
//! as serde structs, and their mapping to the `qvirt.v1` messages. Decoding
//! is lenient: members the schema marks optional may be absent, unknown
//! members are ignored, so newer agents still decode.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use qvirt_proto::v1 as pb;
use serde::Deserialize;

/// guest-info.
#[derive(Debug, Deserialize)]
pub struct AgentInfo {
    version: String,
    #[serde(default)]
    supported_commands: Vec<CommandInfo>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct CommandInfo {
    name: String,
    #[serde(default)]
    enabled: bool,
    #[serde(default)]
    success_response: bool,
}

impl From<AgentInfo> for pb::GetAgentInfoResponse {
    fn from(i: AgentInfo) -> Self {
        pb::GetAgentInfoResponse {
            version: i.version,
            supported_commands: i
                .supported_commands
                .into_iter()
                .map(|c| pb::GuestAgentCommandInfo {
                    name: c.name,
                    enabled: c.enabled,
                    success_response: c.success_response,
                })
                .collect(),
        }
    }
}

/// Nanoseconds since the epoch (guest-get-time) as a timestamp.
pub fn timestamp_from_nanos(ns: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ns.div_euclid(1_000_000_000),
        nanos: ns.rem_euclid(1_000_000_000) as i32,
    }
}

/// Seconds since the epoch with a fraction (guest-get-users' login-time)
/// as a timestamp.
pub fn timestamp_from_secs(secs: f64) -> prost_types::Timestamp {
    let whole = secs.floor();
    let nanos = ((secs - whole) * 1e9).round().clamp(0.0, 999_999_999.0);
    prost_types::Timestamp {
        seconds: whole as i64,
        nanos: nanos as i32,
    }
}

/// guest-get-osinfo.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct OsInfo {
    kernel_release: String,
    kernel_version: String,
    machine: String,
    id: String,
    name: String,
    pretty_name: String,
    version: String,
    version_id: String,
    variant: String,
    variant_id: String,
}

impl From<OsInfo> for pb::GetOsInfoResponse {
    fn from(o: OsInfo) -> Self {
        pb::GetOsInfoResponse {
            kernel_release: o.kernel_release,
            kernel_version: o.kernel_version,
            machine: o.machine,
            id: o.id,
            name: o.name,
            pretty_name: o.pretty_name,
            version: o.version,
            version_id: o.version_id,
            variant: o.variant,
            variant_id: o.variant_id,
        }
    }
}

/// guest-get-host-name.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct HostName {
    /// The host name.
    pub host_name: String,
}

/// guest-get-timezone.
#[derive(Debug, Deserialize)]
pub struct Timezone {
    #[serde(default)]
    zone: String,
    offset: i64,
}

impl From<Timezone> for pb::GetTimezoneResponse {
    fn from(t: Timezone) -> Self {
        pb::GetTimezoneResponse {
            zone: t.zone,
            offset_seconds: t.offset.clamp(i32::MIN.into(), i32::MAX.into()) as i32,
        }
    }
}

/// One entry of guest-get-users.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct User {
    user: String,
    #[serde(default)]
    domain: String,
    login_time: f64,
}

impl From<User> for pb::GuestUser {
    fn from(u: User) -> Self {
        pb::GuestUser {
            user: u.user,
            logon_domain: u.domain,
            login_time: Some(timestamp_from_secs(u.login_time)),
        }
    }
}

/// One entry of guest-network-get-interfaces.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Interface {
    name: String,
    #[serde(default)]
    hardware_address: String,
    #[serde(default)]
    ip_addresses: Vec<IpAddress>,
    statistics: Option<InterfaceStats>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct IpAddress {
    ip_address: String,
    ip_address_type: String,
    prefix: i64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
struct InterfaceStats {
    rx_bytes: u64,
    rx_packets: u64,
    rx_errs: u64,
    rx_dropped: u64,
    tx_bytes: u64,
    tx_packets: u64,
    tx_errs: u64,
    tx_dropped: u64,
}

impl From<Interface> for pb::GuestNetworkInterface {
    fn from(i: Interface) -> Self {
        pb::GuestNetworkInterface {
            name: i.name,
            hardware_address: i.hardware_address,
            ip_addresses: i
                .ip_addresses
                .into_iter()
                .map(|a| pb::GuestIpAddress {
                    ip_address: a.ip_address,
                    ip_address_type: match a.ip_address_type.as_str() {
                        "ipv4" => pb::GuestIpAddressType::Ipv4,
                        "ipv6" => pb::GuestIpAddressType::Ipv6,
                        _ => pb::GuestIpAddressType::Unspecified,
                    } as i32,
                    prefix: to_u32(a.prefix),
                })
                .collect(),
            statistics: i.statistics.map(|s| pb::GuestNetworkInterfaceStatistics {
                rx_bytes: s.rx_bytes,
                rx_packets: s.rx_packets,
                rx_errs: s.rx_errs,
                rx_dropped: s.rx_dropped,
                tx_bytes: s.tx_bytes,
                tx_packets: s.tx_packets,
                tx_errs: s.tx_errs,
                tx_dropped: s.tx_dropped,
            }),
        }
    }
}

/// One entry of guest-get-fsinfo.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Filesystem {
    name: String,
    mountpoint: String,
    #[serde(rename = "type")]
    fs_type: String,
    used_bytes: Option<u64>,
    total_bytes: Option<u64>,
    #[serde(default)]
    disk: Vec<DiskAddress>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct DiskAddress {
    pci_controller: Option<PciAddress>,
    #[serde(default)]
    bus_type: String,
    #[serde(default)]
    bus: i64,
    #[serde(default)]
    target: i64,
    #[serde(default)]
    unit: i64,
    #[serde(default)]
    serial: String,
    #[serde(default)]
    dev: String,
    ccw_address: Option<CcwAddress>,
}

#[derive(Debug, Deserialize)]
struct PciAddress {
    domain: i64,
    bus: i64,
    slot: i64,
    function: i64,
}

#[derive(Debug, Deserialize)]
struct CcwAddress {
    cssid: i64,
    ssid: i64,
    subchno: i64,
    devno: i64,
}

/// qemu-ga's GuestDiskBusType name as the proto enum.
pub fn bus_type(name: &str) -> pb::GuestDiskBusType {
    use pb::GuestDiskBusType as B;
    match name {
        "ide" => B::Ide,
        "fdc" => B::Fdc,
        "scsi" => B::Scsi,
        "virtio" => B::Virtio,
        "xen" => B::Xen,
        "usb" => B::Usb,
        "uml" => B::Uml,
        "sata" => B::Sata,
        "sd" => B::Sd,
        "unknown" => B::Unknown,
        "ieee1394" => B::Ieee1394,
        "ssa" => B::Ssa,
        "fibre" => B::Fibre,
        "raid" => B::Raid,
        "iscsi" => B::Iscsi,
        "sas" => B::Sas,
        "mmc" => B::Mmc,
        "virtual" => B::Virtual,
        "file-backed-virtual" => B::FileBackedVirtual,
        "nvme" => B::Nvme,
        _ => B::Unspecified,
    }
}

impl From<Filesystem> for pb::GuestFilesystem {
    fn from(f: Filesystem) -> Self {
        pb::GuestFilesystem {
            name: f.name,
            mountpoint: f.mountpoint,
            r#type: f.fs_type,
            used_bytes: f.used_bytes,
            total_bytes: f.total_bytes,
            disks: f
                .disk
                .into_iter()
                .map(|d| pb::GuestDiskAddress {
                    pci_controller: d.pci_controller.map(|p| pb::GuestPciAddress {
                        pci_domain: to_u32(p.domain),
                        bus: to_u32(p.bus),
                        slot: to_u32(p.slot),
                        function: to_u32(p.function),
                    }),
                    bus_type: bus_type(&d.bus_type) as i32,
                    bus: to_u32(d.bus),
                    target: to_u32(d.target),
                    unit: to_u32(d.unit),
                    serial: d.serial,
                    dev: d.dev,
                    ccw_address: d.ccw_address.map(|c| pb::GuestCcwAddress {
                        cssid: to_u32(c.cssid),
                        ssid: to_u32(c.ssid),
                        subchno: to_u32(c.subchno),
                        devno: to_u32(c.devno),
                    }),
                })
                .collect(),
        }
    }
}

/// guest-exec.
#[derive(Debug, Deserialize)]
pub struct ExecStarted {
    /// The guest pid.
    pub pid: i64,
}

/// guest-exec-status.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ExecStatus {
    /// Exited, and both capture pipes closed.
    pub exited: bool,
    exitcode: Option<i64>,
    signal: Option<i64>,
    out_data: Option<String>,
    err_data: Option<String>,
    #[serde(default)]
    out_truncated: bool,
    #[serde(default)]
    err_truncated: bool,
}

impl ExecStatus {
    /// The proto message; `Err` names a member that is not valid base64.
    pub fn into_proto(self) -> Result<pb::GuestExecStatus, &'static str> {
        use pb::guest_exec_status::Termination;
        let decode = |data: Option<String>, name| {
            data.map(|d| B64.decode(d).map_err(|_| name))
                .transpose()
                .map(Option::unwrap_or_default)
        };
        let termination = match (self.exitcode, self.signal) {
            (_, Some(sig)) => Some(Termination::Signal(to_i32(sig))),
            (Some(code), None) => Some(Termination::ExitCode(to_i32(code))),
            (None, None) => None,
        };
        Ok(pb::GuestExecStatus {
            exited: self.exited,
            termination,
            stdout: decode(self.out_data, "out-data")?,
            stdout_truncated: self.out_truncated,
            stderr: decode(self.err_data, "err-data")?,
            stderr_truncated: self.err_truncated,
        })
    }
}

/// guest-file-read.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct FileRead {
    /// Bytes read.
    pub count: i64,
    /// The bytes, base64.
    pub buf_b64: String,
    /// stdio's feof after the read.
    #[serde(default)]
    pub eof: bool,
}

/// guest-file-write.
#[derive(Debug, Deserialize)]
pub struct FileWrite {
    /// Bytes written.
    pub count: i64,
}

/// Encodes bytes as base64 for the agent.
pub fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

/// Decodes the agent's base64.
pub fn unb64(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    B64.decode(text)
}

fn to_u32(v: i64) -> u32 {
    u32::try_from(v).unwrap_or(if v < 0 { 0 } else { u32::MAX })
}

fn to_i32(v: i64) -> i32 {
    v.clamp(i32::MIN.into(), i32::MAX.into()) as i32
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    #[test]
    fn test_numbers_decode_under_arbitrary_precision() {
        let v: serde_json::Value =
            serde_json::from_str(r#"{"count": 14, "buf-b64": "aGk=", "eof": true}"#).unwrap();
        let r: FileRead = serde_json::from_value(v).unwrap();
        assert_eq!(r.count, 14);
        assert!(r.eof);
        let t: i64 = serde_json::from_str("1700000000123456000").unwrap();
        let ts = timestamp_from_nanos(t);
        assert_eq!((ts.seconds, ts.nanos), (1_700_000_000, 123_456_000));
        let ts = timestamp_from_nanos(-1);
        assert_eq!((ts.seconds, ts.nanos), (-1, 999_999_999));
    }

    #[test]
    fn test_exec_status_maps_exit_signal_and_output() {
        let v = json!({"exitcode": 3, "err-data": "ZXJyCg==", "out-data": "b3V0Cg==",
                       "err-truncated": false, "out-truncated": true, "exited": true});
        let s: ExecStatus = serde_json::from_value(v).unwrap();
        let p = s.into_proto().unwrap();
        assert!(p.exited);
        assert_eq!(
            p.termination,
            Some(pb::guest_exec_status::Termination::ExitCode(3))
        );
        assert_eq!(p.stdout, b"out\n");
        assert_eq!(p.stderr, b"err\n");
        assert!(p.stdout_truncated && !p.stderr_truncated);

        let s: ExecStatus = serde_json::from_value(json!({"exited": true, "signal": 9})).unwrap();
        assert_eq!(
            s.into_proto().unwrap().termination,
            Some(pb::guest_exec_status::Termination::Signal(9))
        );
        let s: ExecStatus =
            serde_json::from_value(json!({"exited": true, "out-data": "!!"})).unwrap();
        assert_eq!(s.into_proto().unwrap_err(), "out-data");
    }

    #[test]
    fn test_fsinfo_and_interfaces_map_enums_and_optionals() {
        let fs: Filesystem = serde_json::from_value(json!({
            "name": "vda1", "mountpoint": "/", "type": "ext4", "used-bytes": 10,
            "total-bytes": 20, "disk": [{"serial": "S1", "bus-type": "virtio", "bus": 0,
            "unit": 0, "pci-controller": {"bus": 0, "slot": 4, "domain": 0, "function": 0},
            "dev": "/dev/vda1", "target": 0}]}))
        .unwrap();
        let p = pb::GuestFilesystem::from(fs);
        assert_eq!(p.used_bytes, Some(10));
        assert_eq!(p.disks[0].bus_type, pb::GuestDiskBusType::Virtio as i32);
        assert_eq!(p.disks[0].pci_controller.as_ref().unwrap().slot, 4);
        assert_eq!(p.disks[0].serial, "S1");

        let i: Interface = serde_json::from_value(json!({
            "name": "lo", "ip-addresses": [{"ip-address": "127.0.0.1",
            "ip-address-type": "ipv4", "prefix": 8}],
            "statistics": {"rx-bytes": 18446744073709551615u64}}))
        .unwrap();
        let p = pb::GuestNetworkInterface::from(i);
        assert_eq!(
            p.ip_addresses[0].ip_address_type,
            pb::GuestIpAddressType::Ipv4 as i32
        );
        assert_eq!(p.statistics.unwrap().rx_bytes, u64::MAX);
        assert_eq!(bus_type("nope"), pb::GuestDiskBusType::Unspecified);
    }

    #[test]
    fn test_login_time_fraction() {
        let ts = timestamp_from_secs(1_700_000_000.25);
        assert_eq!((ts.seconds, ts.nanos), (1_700_000_000, 250_000_000));
    }
}
