//! Base64 as qemu-ga does it: `qbase64_decode` (reject characters outside
//! the alphabet, `=` and newline, then GLib's lenient decoder, which drops
//! an incomplete final group) and `g_base64_encode` (padded).

use qvirt_qga::QgaError;

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Encodes with padding.
pub fn encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let v = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(ALPHABET[(v >> 18) as usize & 63] as char);
        out.push(ALPHABET[(v >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            ALPHABET[(v >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            ALPHABET[v as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

fn rank(c: u8) -> Option<u32> {
    match c {
        b'A'..=b'Z' => Some(u32::from(c - b'A')),
        b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
        b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        b'=' => Some(0),
        _ => None,
    }
}

/// Decodes `input` (its C bytes: NUL is `\xC0\x80`) as `qbase64_decode`.
pub fn decode(input: &str) -> Result<Vec<u8>, QgaError> {
    let bytes = qvirt_qga::unicode::to_mod_utf8(input);
    if !bytes.iter().all(|&c| rank(c).is_some() || c == b'\n') {
        return Err(QgaError::generic("Base64 data contains invalid characters"));
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    let (mut v, mut n) = (0u32, 0);
    let mut last = [0u8; 2];
    for &c in bytes.iter() {
        let Some(r) = rank(c) else { continue };
        last[1] = last[0];
        last[0] = c;
        v = (v << 6) | r;
        n += 1;
        if n == 4 {
            out.push((v >> 16) as u8);
            if last[1] != b'=' {
                out.push((v >> 8) as u8);
            }
            if last[0] != b'=' {
                out.push(v as u8);
            }
            n = 0;
            v = 0;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_base64_table() {
        assert_eq!(encode(b"Hello World!\n\0"), "SGVsbG8gV29ybGQhCgA=");
        assert_eq!(encode(b""), "");
        assert_eq!(encode(b"ab"), "YWI=");
        assert_eq!(
            decode("SGVsbG8gV29ybGQhCgA=").ok(),
            Some(b"Hello World!\n\0".to_vec())
        );
        assert_eq!(decode("QUJ").ok(), Some(vec![]));
        assert_eq!(decode("QUJD\nQQ==").ok(), Some(b"ABCA".to_vec()));
        assert!(decode("QU!J").is_err());
        assert!(decode("a\0").is_err());
    }
}
