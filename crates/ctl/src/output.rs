//! How results are shown: virsh-like tables and `Label:  value` lists,
//! JSON (protobuf's JSON mapping of the reply, proto field names, defaults
//! included), virsh's timestamps, and a spinner on long waits.

use std::future::Future;
use std::io::{IsTerminal, Write};
use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};

use crate::CtlError;

/// A wait shorter than this shows no spinner.
pub const SPINNER_DELAY: Duration = Duration::from_secs(1);

static POOL: LazyLock<Result<DescriptorPool, String>> = LazyLock::new(|| {
    DescriptorPool::decode(qvirt_proto::FILE_DESCRIPTOR_SET).map_err(|e| e.to_string())
});

/// `message` (of protobuf type `full_name`, e.g. `qvirt.v1.Domain`) as
/// JSON: protobuf's JSON mapping, proto field names, defaults included.
pub fn to_json<M: prost::Message>(
    full_name: &str,
    message: &M,
) -> Result<serde_json::Value, CtlError> {
    let failed = |why: String| CtlError::Failed(format!("cannot print {full_name} as JSON: {why}"));
    let pool = POOL.as_ref().map_err(|e| failed(e.clone()))?;
    let desc = pool
        .get_message_by_name(full_name)
        .ok_or_else(|| failed("no such message".into()))?;
    let dynamic = DynamicMessage::decode(desc, message.encode_to_vec().as_slice())
        .map_err(|e| failed(e.to_string()))?;
    let options = SerializeOptions::new()
        .use_proto_field_name(true)
        .skip_default_fields(false);
    dynamic
        .serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(|e| failed(e.to_string()))
}

/// Prints a JSON value, pretty, on stdout.
pub fn print_json(value: &serde_json::Value) -> Result<(), CtlError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| CtlError::Failed(format!("cannot print JSON: {e}")))?;
    out_line(&text)
}

/// Prints a JSON value on one line (a stream of events).
pub fn print_json_line(value: &serde_json::Value) -> Result<(), CtlError> {
    out_line(&value.to_string())
}

/// Prints `message` as JSON.
pub fn print_message<M: prost::Message>(full_name: &str, message: &M) -> Result<(), CtlError> {
    print_json(&to_json(full_name, message)?)
}

/// Writes one line on stdout and flushes it (events arrive one by one);
/// a closed pipe (`| head`) is an error the caller stops on.
pub fn out_line(line: &str) -> Result<(), CtlError> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(|source| CtlError::Io {
            what: "cannot write to stdout".into(),
            source,
        })
}

/// A virsh-style table: a header row, a dashed rule, then the rows, each
/// column left-aligned and padded, three spaces apart, one leading space.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            s.push_str(if i == 0 { " " } else { "   " });
            s.push_str(cell);
            s.extend(std::iter::repeat_n(' ', w - cell.chars().count()));
        }
        s.trim_end().to_owned()
    };
    let mut out = line(&mut header.iter().copied());
    let rule_len = widths.iter().sum::<usize>() + 3 * widths.len().saturating_sub(1) + 2;
    out.push('\n');
    out.push_str(&"-".repeat(rule_len));
    out.push('\n');
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
        out.push('\n');
    }
    out
}

/// virsh's `Label:         value` lines (label padded to 15 columns).
pub fn fields(rows: &[(&str, String)]) -> String {
    let mut out = String::new();
    for (label, value) in rows {
        out.push_str(&format!("{:<15} {value}\n", format!("{label}:")));
    }
    out
}

/// Awaits `fut`; past [`SPINNER_DELAY`], and only when stdout and stderr
/// are terminals, shows a spinner with `what` on stderr meanwhile.
pub async fn waiting<F: Future>(what: &str, fut: F) -> F::Output {
    if !(std::io::stdout().is_terminal() && std::io::stderr().is_terminal()) {
        return fut.await;
    }
    let mut fut = std::pin::pin!(fut);
    tokio::select! {
        out = &mut fut => return out,
        () = tokio::time::sleep(SPINNER_DELAY) => {}
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_message(what.to_owned());
    bar.enable_steady_tick(Duration::from_millis(100));
    let out = fut.await;
    bar.finish_and_clear();
    out
}

/// A protobuf timestamp as virsh prints times, or "-" when unset.
pub fn timestamp(ts: Option<&prost_types::Timestamp>) -> String {
    match ts {
        Some(t) => utc(t.seconds, t.nanos.clamp(0, 999_999_999) as u32 / 1_000_000),
        None => "-".to_owned(),
    }
}

/// Now, as virsh's `--timestamp` prints it.
pub fn now() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    utc(d.as_secs() as i64, d.subsec_millis())
}

/// `YYYY-MM-DD HH:MM:SS.mmm+0000`, virsh's `virTimeStringNowRaw` format.
pub fn utc(seconds: i64, millis: u32) -> String {
    let days = seconds.div_euclid(86_400);
    let secs = seconds.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{millis:03}+0000",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// (year, month, day) of a day count since 1970-01-01 (H. Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_utc_formats_as_virsh() {
        assert_eq!(utc(0, 0), "1970-01-01 00:00:00.000+0000");
        assert_eq!(utc(951_782_400, 5), "2000-02-29 00:00:00.005+0000");
        assert_eq!(utc(1_796_613_845, 123), "2026-12-07 03:24:05.123+0000");
    }

    #[test]
    fn test_table_pads_columns_as_virsh() {
        let t = table(
            &["Name", "State"],
            &[
                vec!["demo".into(), "running".into()],
                vec!["a-longer-name".into(), "shut off".into()],
            ],
        );
        assert_eq!(
            t,
            " Name            State\n--------------------------\n demo            running\n a-longer-name   shut off\n"
        );
    }

    #[test]
    fn test_to_json_uses_proto_names_and_enum_names() {
        let d = qvirt_proto::v1::Domain {
            state: qvirt_proto::v1::DomainState::Running as i32,
            spec: Some(qvirt_proto::v1::DomainSpec {
                name: "demo".into(),
                memory_mib: 128,
                ..Default::default()
            }),
            ..Default::default()
        };
        let v = to_json("qvirt.v1.Domain", &d).unwrap_or_default();
        assert_eq!(v["state"], "DOMAIN_STATE_RUNNING");
        assert_eq!(v["spec"]["name"], "demo");
        assert_eq!(v["spec"]["memory_mib"], "128");
        assert_eq!(v["pid"], 0);
    }
}
