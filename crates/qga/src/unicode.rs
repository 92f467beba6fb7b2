//! QEMU's "modified UTF-8" helpers (`util/unicode.c`): decoding one code
//! point the way QEMU does (so invalid input is rejected, or replaced, at the
//! same byte boundaries), and the lossy conversion used for error texts and
//! host strings.

/// Whether QEMU considers `cp` a valid code point: in range, not a
/// surrogate, not a noncharacter.
pub fn is_valid_codepoint(cp: u32) -> bool {
    if cp > 0x10FFFF {
        return false;
    }
    if (0xFDD0..=0xFDEF).contains(&cp) || (cp & 0xFFFE) == 0xFFFE {
        return false;
    }
    !(0xD800..=0xDFFF).contains(&cp)
}

/// Decodes one code point from the start of `s` as QEMU's
/// `mod_utf8_codepoint` does: returns the code point (or `None` when the
/// sequence is invalid) and the number of bytes consumed. `\xC0\x80` is the
/// modified-UTF-8 NUL and decodes to 0. A NUL byte (or the end of `s`) acts
/// as a missing continuation byte and is not consumed.
pub fn decode(s: &[u8]) -> (Option<u32>, usize) {
    const MIN_CP: [u32; 5] = [0x80, 0x800, 0x10000, 0x200000, 0x4000000];
    let Some(&lead) = s.first() else {
        return (None, 0);
    };
    if lead == 0 {
        return (None, 0);
    }
    if lead < 0x80 {
        return (Some(u32::from(lead)), 1);
    }
    if lead >= 0xFE || lead & 0x40 == 0 {
        return (None, 1);
    }
    let len = lead.leading_ones() as usize;
    let mut cp = u32::from(lead) & ((0x80u32 >> len) - 1);
    let mut used = 1;
    for _ in 1..len {
        let byte = s.get(used).copied().unwrap_or(0);
        if byte & 0xC0 != 0x80 {
            return (None, used);
        }
        used += 1;
        cp = (cp << 6) | u32::from(byte & 0x3F);
    }
    if !is_valid_codepoint(cp) || (cp < MIN_CP[len - 2] && !(cp == 0 && len == 2)) {
        return (None, used);
    }
    (Some(cp), used)
}

/// Converts bytes to a `String` the way QEMU's JSON writer would render
/// them: every invalid sequence becomes U+FFFD, `\xC0\x80` becomes NUL.
/// The input is cut at its first NUL byte, as a C string would be.
pub fn lossy(s: &[u8]) -> String {
    let s = match s.iter().position(|&b| b == 0) {
        Some(n) => &s[..n],
        None => s,
    };
    if let Ok(text) = std::str::from_utf8(s)
        && text.chars().all(|c| is_valid_codepoint(c as u32))
    {
        return text.to_owned();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while !rest.is_empty() {
        let (cp, used) = decode(rest);
        out.push(cp.and_then(char::from_u32).unwrap_or('\u{FFFD}'));
        rest = &rest[used.max(1)..];
    }
    out
}

/// The bytes QEMU would hold for `s` internally: NUL is stored as the
/// modified-UTF-8 pair `\xC0\x80`. Used for hashing keys and for C paths.
pub fn to_mod_utf8(s: &str) -> std::borrow::Cow<'_, [u8]> {
    if !s.contains('\0') {
        return std::borrow::Cow::Borrowed(s.as_bytes());
    }
    let mut out = Vec::with_capacity(s.len() + 4);
    for b in s.bytes() {
        if b == 0 {
            out.extend_from_slice(&[0xC0, 0x80]);
        } else {
            out.push(b);
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_decode_table() {
        let cases: &[(&[u8], Option<u32>, usize)] = &[
            (b"a", Some(0x61), 1),
            (b"\xC0\x80", Some(0), 2),
            (b"\xC1\x81", None, 2),
            (b"\xE2\x82\xAC", Some(0x20AC), 3),
            (b"\xE2\x82", None, 2),
            (b"\xE2\x82\"", None, 2),
            (b"\x80", None, 1),
            (b"\xFF", None, 1),
            (b"\xEF\xBF\xBF", None, 3),
            (b"\xED\xA0\x80", None, 3),
            (b"\xF0\x9F\x98\x80", Some(0x1F600), 4),
            (b"\xF4\x90\x80\x80", None, 4),
            (b"\xF8\x88\x80\x80\x80", None, 5),
        ];
        for (input, cp, used) in cases {
            assert_eq!(decode(input), (*cp, *used), "{input:?}");
        }
    }

    #[test]
    fn test_lossy() {
        assert_eq!(lossy(b"ab\xFFc"), "ab\u{FFFD}c");
        assert_eq!(lossy(b"ab\0cd"), "ab");
        assert_eq!(lossy(b"\xC0\x80x"), "\0x");
        assert_eq!(lossy(b"\xE2\x82"), "\u{FFFD}");
    }
}
