//! guest-network-get-interfaces: getifaddrs order, the MAC from
//! SIOCGIFHWADDR, addresses with prefix lengths, and /proc/net/dev
//! statistics once an interface has an address.

use std::net::IpAddr;

use qvirt_qga::unicode::lossy;
use qvirt_qga::{Dict, Value};

use crate::agent::{Agent, CmdResult};
use crate::args::Args;
use crate::commands::with_errno;
use crate::sys;

struct Iface {
    name: String,
    hwaddr: Option<String>,
    addrs: Vec<Value>,
    stats: Option<Value>,
}

fn hw_address(name: &[u8]) -> Option<String> {
    let mac = sys::hw_address(name).ok()?;
    Some(
        mac.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":"),
    )
}

fn stats(name: &str) -> Option<Value> {
    let text = std::fs::read_to_string("/proc/net/dev").ok()?;
    for line in text.lines().skip(2) {
        let (n, rest) = line.split_once(':')?;
        if n.trim() != name {
            continue;
        }
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        if f.len() < 12 {
            return None;
        }
        let mut d = Dict::new();
        for (key, idx) in [
            ("rx-bytes", 0),
            ("rx-packets", 1),
            ("rx-errs", 2),
            ("rx-dropped", 3),
            ("tx-bytes", 8),
            ("tx-packets", 9),
            ("tx-errs", 10),
            ("tx-dropped", 11),
        ] {
            d.insert(key, f[idx]);
        }
        return Some(Value::Object(d));
    }
    None
}

/// guest-network-get-interfaces.
pub fn interfaces(_agent: &mut Agent, args: &mut Args) -> CmdResult {
    args.done()?;
    let entries = sys::interface_addresses().map_err(|e| with_errno("getifaddrs failed", &e))?;
    let mut list: Vec<Iface> = Vec::new();
    for entry in entries {
        let name = lossy(&entry.name);
        let idx = match list.iter().position(|i| i.name == name) {
            Some(i) => i,
            None => {
                list.push(Iface {
                    name: name.clone(),
                    hwaddr: hw_address(&entry.name),
                    addrs: Vec::new(),
                    stats: None,
                });
                list.len() - 1
            }
        };
        let Some((ip, prefix)) = entry.addr else {
            continue;
        };
        let kind = match ip {
            IpAddr::V4(_) => "ipv4",
            IpAddr::V6(_) => "ipv6",
        };
        let iface = &mut list[idx];
        let mut a = Dict::new();
        a.insert("ip-address", ip.to_string());
        a.insert("ip-address-type", kind);
        a.insert("prefix", i64::from(prefix));
        iface.addrs.push(Value::Object(a));
        if iface.stats.is_none() {
            iface.stats = stats(&iface.name);
        }
    }
    let out = list
        .into_iter()
        .map(|i| {
            let mut d = Dict::new();
            d.insert("name", i.name);
            if let Some(hw) = i.hwaddr {
                d.insert("hardware-address", hw);
            }
            if !i.addrs.is_empty() {
                d.insert("ip-addresses", i.addrs);
            }
            if let Some(s) = i.stats {
                d.insert("statistics", s);
            }
            Value::Object(d)
        })
        .collect::<Vec<_>>();
    Ok(Some(Value::Array(out)))
}
