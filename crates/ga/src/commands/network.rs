//! guest-network-get-interfaces: getifaddrs order, the MAC from
//! SIOCGIFHWADDR, addresses with prefix lengths, and /proc/net/dev
//! statistics once an interface has an address.

use std::ffi::CStr;
use std::net::{Ipv4Addr, Ipv6Addr};

use qvirt_qga::unicode::lossy;
use qvirt_qga::{Dict, Value};

use crate::agent::{Agent, CmdResult};
use crate::args::Args;
use crate::commands::with_errno;

struct Iface {
    name: String,
    hwaddr: Option<String>,
    addrs: Vec<Value>,
    stats: Option<Value>,
}

fn hw_address(name: &[u8]) -> Option<String> {
    // SAFETY: plain socket creation.
    let sock = unsafe { libc::socket(libc::PF_INET, libc::SOCK_STREAM, 0) };
    if sock < 0 {
        return None;
    }
    // SAFETY: ifreq is plain data.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in ifr
        .ifr_name
        .iter_mut()
        .zip(name.iter().take(libc::IF_NAMESIZE - 1))
    {
        *dst = src as libc::c_char;
    }
    // SAFETY: ifr is a valid ifreq for SIOCGIFHWADDR.
    let rc = unsafe { libc::ioctl(sock, libc::SIOCGIFHWADDR, &mut ifr) };
    // SAFETY: sock is ours.
    unsafe { libc::close(sock) };
    if rc < 0 {
        return None;
    }
    // SAFETY: after a successful SIOCGIFHWADDR the union holds ifru_hwaddr.
    let data = unsafe { ifr.ifr_ifru.ifru_hwaddr.sa_data };
    Some(
        data[..6]
            .iter()
            .map(|&b| format!("{:02x}", b as u8))
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
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free below.
    if unsafe { libc::getifaddrs(&mut head) } < 0 {
        return Err(with_errno(
            "getifaddrs failed",
            &std::io::Error::last_os_error(),
        ));
    }
    let mut list: Vec<Iface> = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        // SAFETY: ifa_name is a NUL-terminated string.
        let raw = unsafe { CStr::from_ptr(ifa.ifa_name) }.to_bytes();
        let name = lossy(raw);
        let idx = match list.iter().position(|i| i.name == name) {
            Some(i) => i,
            None => {
                list.push(Iface {
                    name: name.clone(),
                    hwaddr: hw_address(raw),
                    addrs: Vec::new(),
                    stats: None,
                });
                list.len() - 1
            }
        };
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points at a sockaddr of its family.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        let (addr, kind, prefix) = if family == libc::AF_INET {
            // SAFETY: family says sockaddr_in.
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            let prefix = if ifa.ifa_netmask.is_null() {
                0
            } else {
                // SAFETY: netmask has the address's family.
                let m = unsafe { &*(ifa.ifa_netmask as *const libc::sockaddr_in) };
                m.sin_addr.s_addr.count_ones()
            };
            (ip.to_string(), "ipv4", prefix)
        } else if family == libc::AF_INET6 {
            // SAFETY: family says sockaddr_in6.
            let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            let prefix = if ifa.ifa_netmask.is_null() {
                0
            } else {
                // SAFETY: netmask has the address's family.
                let m = unsafe { &*(ifa.ifa_netmask as *const libc::sockaddr_in6) };
                m.sin6_addr.s6_addr.iter().map(|b| b.count_ones()).sum()
            };
            (ip.to_string(), "ipv6", prefix)
        } else {
            continue;
        };
        let iface = &mut list[idx];
        let mut a = Dict::new();
        a.insert("ip-address", addr);
        a.insert("ip-address-type", kind);
        a.insert("prefix", i64::from(prefix));
        iface.addrs.push(Value::Object(a));
        if iface.stats.is_none() {
            iface.stats = stats(&iface.name);
        }
    }
    // SAFETY: head came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
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
