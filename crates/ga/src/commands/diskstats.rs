//! guest-get-diskstats: /proc/diskstats lines as qemu-ga 7.2 reads them
//! (the 4-field old format, 14 fields, plus discard and flush fields when
//! the kernel has them).

use qvirt_qga::{Dict, Value};

use crate::agent::{Agent, CmdResult};
use crate::args::Args;
use crate::commands::with_errno;

/// guest-get-diskstats.
pub fn get_diskstats(_agent: &mut Agent, args: &mut Args) -> CmdResult {
    args.done()?;
    let text = std::fs::read_to_string("/proc/diskstats")
        .map_err(|e| with_errno("can't get diskstats", &e))?;
    let mut list = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(major), Some(minor), Some(name)) = (
            f.first().and_then(|x| x.parse::<u64>().ok()),
            f.get(1).and_then(|x| x.parse::<u64>().ok()),
            f.get(2),
        ) else {
            continue;
        };
        let v: Vec<u64> = f[3..]
            .iter()
            .take(17)
            .map_while(|x| x.parse().ok())
            .collect();
        // sscanf's count includes major, minor and name.
        let n = v.len() + 3;
        if n < 7 {
            continue;
        }
        let mut s: Vec<(&str, u64)> = Vec::new();
        if n == 7 {
            s.extend([
                ("read-sectors", v[1]),
                ("read-ios", v[0]),
                ("write-sectors", v[3]),
                ("write-ios", v[2]),
            ]);
        }
        if n >= 14 {
            s.extend([
                ("read-sectors", v[2]),
                ("read-ios", v[0]),
                ("read-merges", v[1]),
                ("write-sectors", v[6]),
                ("write-ios", v[4]),
                ("write-merges", v[5]),
            ]);
        }
        if n >= 18 {
            s.extend([
                ("discard-sectors", v[13]),
                ("discard-ios", v[11]),
                ("discard-merges", v[12]),
            ]);
        }
        if n >= 20 {
            s.push(("flush-ios", v[15]));
        }
        if n >= 14 {
            s.extend([("read-ticks", v[3]), ("write-ticks", v[7])]);
        }
        if n >= 18 {
            s.push(("discard-ticks", v[14]));
        }
        if n >= 20 {
            s.push(("flush-ticks", v[16]));
        }
        if n >= 14 {
            s.extend([
                ("ios-pgr", v[8]),
                ("total-ticks", v[9]),
                ("weight-ticks", v[10]),
            ]);
        }
        let mut stats = Dict::new();
        for (k, val) in s {
            stats.insert(k, val);
        }
        let mut d = Dict::new();
        d.insert("name", *name);
        d.insert("major", major);
        d.insert("minor", minor);
        d.insert("stats", stats);
        list.push(Value::Object(d));
    }
    Ok(Some(Value::Array(list)))
}
