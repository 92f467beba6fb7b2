//! The JSON writer of qemu-ga (`qobject/json-writer.c`, compact mode):
//! ASCII only, uppercase `\uXXXX` escapes with surrogate pairs, the short
//! escapes, `": "` and `", "` separators, `%.17g` doubles and QDict member
//! order.

use std::io::Write as _;

use crate::unicode::is_valid_codepoint;
use crate::value::Value;

/// Serialises `value` exactly as qemu-ga's `qobject_to_json` would,
/// appending to `out` (no trailing newline).
pub fn write_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Value::UInt(u) => {
            let _ = write!(out, "{u}");
        }
        Value::Double(d) => out.extend_from_slice(format_g17(*d).as_bytes()),
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.extend_from_slice(b", ");
                }
                write_value(out, item);
            }
            out.push(b']');
        }
        Value::Object(dict) => {
            out.push(b'{');
            for (i, (k, v)) in dict.iter().enumerate() {
                if i > 0 {
                    out.extend_from_slice(b", ");
                }
                write_str(out, k);
                out.extend_from_slice(b": ");
                write_value(out, v);
            }
            out.push(b'}');
        }
    }
}

/// Serialises `value` into a new buffer.
pub fn to_json(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_value(&mut out, value);
    out
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn push_u4(out: &mut Vec<u8>, cp: u32) {
    out.extend_from_slice(b"\\u");
    for shift in [12, 8, 4, 0] {
        out.push(HEX[((cp >> shift) & 0xF) as usize]);
    }
}

/// Writes a quoted string the way `quoted_str` does.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    for c in s.chars() {
        let cp = c as u32;
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\u{8}' => out.extend_from_slice(b"\\b"),
            '\u{c}' => out.extend_from_slice(b"\\f"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            _ if (0x20..0x7F).contains(&cp) => out.push(cp as u8),
            _ => {
                let cp = if is_valid_codepoint(cp) { cp } else { 0xFFFD };
                if cp > 0xFFFF {
                    push_u4(out, 0xD800 + ((cp - 0x10000) >> 10));
                    push_u4(out, 0xDC00 + ((cp - 0x10000) & 0x3FF));
                } else {
                    push_u4(out, cp);
                }
            }
        }
    }
    out.push(b'"');
}

/// Formats a double like C's `printf("%.17g", d)`.
pub fn format_g17(d: f64) -> String {
    if d.is_nan() {
        return if d.is_sign_negative() { "-nan" } else { "nan" }.to_owned();
    }
    if d.is_infinite() {
        return if d < 0.0 { "-inf" } else { "inf" }.to_owned();
    }
    const P: i32 = 17;
    // 17 significant digits, correctly rounded: "d.dddddddddddddddde±X".
    let sci = format!("{:.16e}", d);
    let (mantissa, exp) = match sci.split_once('e') {
        Some((m, e)) => (m, e.parse::<i32>().unwrap_or(0)),
        None => (sci.as_str(), 0),
    };
    let negative = mantissa.starts_with('-');
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    let mut out = String::new();
    if negative {
        out.push('-');
    }
    if !(-4..P).contains(&exp) {
        let (first, rest) = digits.split_at(1);
        out.push_str(first);
        let rest = rest.trim_end_matches('0');
        if !rest.is_empty() {
            out.push('.');
            out.push_str(rest);
        }
        out.push('e');
        out.push(if exp < 0 { '-' } else { '+' });
        out.push_str(&format!("{:02}", exp.abs()));
    } else if exp >= 0 {
        let split = (exp + 1) as usize;
        let (int, frac) = digits.split_at(split);
        out.push_str(int);
        let frac = frac.trim_end_matches('0');
        if !frac.is_empty() {
            out.push('.');
            out.push_str(frac);
        }
    } else {
        out.push_str("0.");
        for _ in 0..(-exp - 1) {
            out.push('0');
        }
        out.push_str(digits.trim_end_matches('0'));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::Dict;

    #[test]
    fn test_format_g17_table() {
        let cases: &[(f64, &str)] = &[
            (0.1, "0.10000000000000001"),
            (1000.0, "1000"),
            (0.0, "0"),
            (-0.0, "-0"),
            (1.8446744073709552e19, "1.8446744073709552e+19"),
            (-9.223_372_036_854_776e18, "-9.2233720368547758e+18"),
            (1.5e-7, "1.4999999999999999e-07"),
            (1e21, "1e+21"),
            (1.5, "1.5"),
            (0.0001, "0.0001"),
            (1e16, "10000000000000000"),
            (1e17, "1e+17"),
            (123.456, "123.456"),
            (f64::INFINITY, "inf"),
            (f64::NEG_INFINITY, "-inf"),
            (5e-324, "4.9406564584124654e-324"),
        ];
        for (d, want) in cases {
            assert_eq!(format_g17(*d), *want, "{d:e}");
        }
    }

    #[test]
    fn test_strings_escape_like_qemu() {
        let cases: &[(&str, &str)] = &[
            ("a\"b\\c/", r#""a\"b\\c/""#),
            ("\u{8}\u{c}\n\r\t", r#""\b\f\n\r\t""#),
            ("\0\u{1f}\u{7f}", r#""\u0000\u001F\u007F""#),
            ("é€", r#""\u00E9\u20AC""#),
            ("😀", r#""\uD83D\uDE00""#),
            ("\u{FFFE}\u{FDD0}", r#""\uFFFD\uFFFD""#),
        ];
        for (s, want) in cases {
            let mut out = Vec::new();
            write_str(&mut out, s);
            assert_eq!(String::from_utf8_lossy(&out), *want);
        }
    }

    #[test]
    fn test_containers_use_qemu_separators() {
        let mut d = Dict::new();
        d.insert("return", Dict::new());
        d.insert(
            "id",
            Value::Array(vec![Value::Int(1), Value::UInt(u64::MAX), Value::Null]),
        );
        assert_eq!(
            String::from_utf8_lossy(&to_json(&Value::Object(d))),
            r#"{"return": {}, "id": [1, 18446744073709551615, null]}"#
        );
        assert_eq!(to_json(&Value::Array(vec![])), b"[]");
    }
}
