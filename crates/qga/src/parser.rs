//! QEMU's JSON parser (`qobject/json-parser.c`): turns the tokens of one
//! complete message into a [`Value`], with QEMU's error texts (the first
//! error found wins) and its string rules (single quotes, `\'`, `\u0000`,
//! surrogate pairs, no noncharacters, strict UTF-8).

use crate::lexer::TokenKind;
use crate::unicode::{decode, is_valid_codepoint};
use crate::value::{Dict, Value};

/// A token of a queued message: its kind and its span in the text buffer.
#[derive(Debug, Clone, Copy)]
pub struct Token {
    /// What the token is.
    pub kind: TokenKind,
    /// Start of its text.
    pub start: usize,
    /// End of its text.
    pub end: usize,
}

/// Longest detail text of a parse error: QEMU formats it into a 1024-byte
/// buffer.
const MAX_DETAIL: usize = 1023;

fn parse_error(detail: String) -> String {
    let mut detail = detail.into_bytes();
    detail.truncate(MAX_DETAIL);
    format!("JSON parse error, {}", crate::unicode::lossy(&detail))
}

type PResult<T> = Result<T, String>;

/// A container being filled. Iterative, so 1024 levels of nesting need no
/// deep native stack.
enum Frame {
    Array(Vec<Value>),
    ObjectKey(Dict),
    ObjectValue(Dict, String),
}

struct Ctx<'a> {
    tokens: &'a [Token],
    text: &'a [u8],
    pos: usize,
}

impl<'a> Ctx<'a> {
    fn peek(&self) -> Option<TokenKind> {
        self.tokens.get(self.pos).map(|t| t.kind)
    }

    fn pop(&mut self) -> Option<TokenKind> {
        let t = self.peek();
        if t.is_some() {
            self.pos += 1;
        }
        t
    }

    fn premature() -> String {
        parse_error("premature EOI".into())
    }

    /// Parses a scalar at the current token, or opens a container (pushing
    /// a frame and returning `None`).
    fn start_value(&mut self, stack: &mut Vec<Frame>) -> PResult<Option<Value>> {
        let Some(t) = self.tokens.get(self.pos).copied() else {
            return Err(Self::premature());
        };
        let text = &self.text[t.start..t.end];
        match t.kind {
            TokenKind::LCurly => {
                self.pos += 1;
                match self.peek() {
                    None => Err(Self::premature()),
                    Some(TokenKind::RCurly) => {
                        self.pos += 1;
                        Ok(Some(Value::Object(Dict::new())))
                    }
                    Some(_) => {
                        stack.push(Frame::ObjectKey(Dict::new()));
                        Ok(None)
                    }
                }
            }
            TokenKind::LSquare => {
                self.pos += 1;
                match self.peek() {
                    None => Err(Self::premature()),
                    Some(TokenKind::RSquare) => {
                        self.pos += 1;
                        Ok(Some(Value::Array(Vec::new())))
                    }
                    Some(_) => {
                        stack.push(Frame::Array(Vec::new()));
                        Ok(None)
                    }
                }
            }
            TokenKind::Integer | TokenKind::Float => {
                self.pos += 1;
                Ok(Some(parse_number(text, t.kind)))
            }
            TokenKind::String => {
                self.pos += 1;
                parse_string(text).map(|s| Some(Value::String(s)))
            }
            TokenKind::Keyword => {
                self.pos += 1;
                match text {
                    b"true" => Ok(Some(Value::Bool(true))),
                    b"false" => Ok(Some(Value::Bool(false))),
                    b"null" => Ok(Some(Value::Null)),
                    other => Err(parse_error(format!(
                        "invalid keyword '{}'",
                        String::from_utf8_lossy(other)
                    ))),
                }
            }
            _ => Err(parse_error("expecting value".into())),
        }
    }

    fn value(&mut self) -> PResult<Value> {
        let mut stack: Vec<Frame> = Vec::new();
        'value: loop {
            let Some(mut v) = self.start_value(&mut stack)? else {
                continue 'value;
            };
            // Fold the finished value into the containers above it.
            loop {
                match stack.pop() {
                    None => return Ok(v),
                    Some(Frame::Array(mut list)) => {
                        list.push(v);
                        match self.pop() {
                            None => return Err(Self::premature()),
                            Some(TokenKind::RSquare) => v = Value::Array(list),
                            Some(TokenKind::Comma) => {
                                stack.push(Frame::Array(list));
                                continue 'value;
                            }
                            Some(_) => {
                                return Err(parse_error("expected separator in list".into()));
                            }
                        }
                    }
                    Some(Frame::ObjectKey(dict)) => {
                        let Value::String(key) = v else {
                            return Err(parse_error("key is not a string in object".into()));
                        };
                        match self.pop() {
                            None => return Err(Self::premature()),
                            Some(TokenKind::Colon) => {
                                stack.push(Frame::ObjectValue(dict, key));
                                continue 'value;
                            }
                            Some(_) => return Err(parse_error("missing : in object pair".into())),
                        }
                    }
                    Some(Frame::ObjectValue(mut dict, key)) => {
                        if dict.contains_key(&key) {
                            return Err(parse_error("duplicate key".into()));
                        }
                        dict.insert(key, v);
                        match self.pop() {
                            None => return Err(Self::premature()),
                            Some(TokenKind::RCurly) => v = Value::Object(dict),
                            Some(TokenKind::Comma) => {
                                if self.peek().is_none() {
                                    return Err(Self::premature());
                                }
                                stack.push(Frame::ObjectKey(dict));
                                continue 'value;
                            }
                            Some(_) => {
                                return Err(parse_error("expected separator in dict".into()));
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Parses the tokens of one complete message.
pub fn parse(tokens: &[Token], text: &[u8]) -> Result<Value, String> {
    let mut ctx = Ctx {
        tokens,
        text,
        pos: 0,
    };
    ctx.value()
}

/// int64 if it fits, else uint64 if non-negative and it fits, else double
/// (as `parse_literal`).
fn parse_number(text: &[u8], kind: TokenKind) -> Value {
    let s = std::str::from_utf8(text).unwrap_or("0");
    if kind == TokenKind::Integer {
        if let Ok(i) = s.parse::<i64>() {
            return Value::Int(i);
        }
        if !s.starts_with('-')
            && let Ok(u) = s.parse::<u64>()
        {
            return Value::UInt(u);
        }
    }
    Value::Double(s.parse::<f64>().unwrap_or(0.0))
}

fn hex4(s: &[u8]) -> Option<u32> {
    let digits = s.get(..4)?;
    let mut cp = 0u32;
    for &d in digits {
        cp = (cp << 4) | char::from(d).to_digit(16)?;
    }
    Some(cp)
}

/// Decodes a string token (quotes included) as `parse_string` does.
pub fn parse_string(token: &[u8]) -> Result<String, String> {
    let quote = token.first().copied().unwrap_or(b'"');
    let body = &token[1.min(token.len())..];
    let mut out = String::new();
    let mut i = 0;
    while i < body.len() && body[i] != quote {
        let b = body[i];
        if b == b'\\' {
            let beg = i;
            i += 1;
            let esc = body.get(i).copied().unwrap_or(0);
            i += 1;
            match esc {
                b'"' => out.push('"'),
                b'\'' => out.push('\''),
                b'\\' => out.push('\\'),
                b'/' => out.push('/'),
                b'b' => out.push('\u{8}'),
                b'f' => out.push('\u{c}'),
                b'n' => out.push('\n'),
                b'r' => out.push('\r'),
                b't' => out.push('\t'),
                b'u' => {
                    let mut cp = hex4(&body[i.min(body.len())..]);
                    i += 4;
                    if let Some(lead) = cp
                        && (0xD800..=0xDBFF).contains(&lead)
                        && body.get(i) == Some(&b'\\')
                        && body.get(i + 1) == Some(&b'u')
                    {
                        let trail = hex4(&body[(i + 2).min(body.len())..]);
                        match trail {
                            Some(t) if (0xDC00..=0xDFFF).contains(&t) => {
                                cp = Some(0x10000 + ((lead & 0x3FF) << 10) + (t & 0x3FF));
                                i += 6;
                            }
                            _ => cp = None,
                        }
                    }
                    match cp
                        .filter(|&c| is_valid_codepoint(c))
                        .and_then(char::from_u32)
                    {
                        Some(c) => out.push(c),
                        None => {
                            // QEMU prints the escape as written, up to the
                            // end of the token (%.*s stops at its NUL).
                            let end = i.min(token.len() - 1);
                            let shown = &body[beg..end.max(beg)];
                            return Err(parse_error(format!(
                                "{} is not a valid Unicode character",
                                crate::unicode::lossy(shown)
                            )));
                        }
                    }
                }
                _ => return Err(parse_error("invalid escape sequence in string".into())),
            }
        } else {
            let (cp, used) = decode(&body[i..]);
            match cp.and_then(char::from_u32) {
                Some(c) => out.push(c),
                None => return Err(parse_error("invalid UTF-8 sequence in string".into())),
            }
            i += used.max(1);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_string_table() {
        let ok: &[(&[u8], &str)] = &[
            (b"'a\\'b\"c'", "a'b\"c"),
            (b"\"\\u0000x\"", "\0x"),
            (b"\"\\ud83d\\ude00\"", "😀"),
            (b"\"\\/\\b\\f\\n\\r\\t\"", "/\u{8}\u{c}\n\r\t"),
            (b"\"\xc0\x80\"", "\0"),
            (b"\"%s\"", "%s"),
        ];
        for (input, want) in ok {
            assert_eq!(parse_string(input).as_deref(), Ok(*want), "{input:?}");
        }
        let bad: &[(&[u8], &str)] = &[
            (
                b"\"\\ud800\"",
                "JSON parse error, \\ud800 is not a valid Unicode character",
            ),
            (
                b"\"\\u12\"",
                "JSON parse error, \\u12\" is not a valid Unicode character",
            ),
            (
                b"\"\\u\"",
                "JSON parse error, \\u\" is not a valid Unicode character",
            ),
            (
                b"\"\\uFFFF\"",
                "JSON parse error, \\uFFFF is not a valid Unicode character",
            ),
            (
                b"\"\\uD800\\u0041\"",
                "JSON parse error, \\uD800 is not a valid Unicode character",
            ),
            (
                b"\"\\uDBFF\\uDFFF\"",
                "JSON parse error, \\uDBFF\\uDFFF is not a valid Unicode character",
            ),
            (
                b"\"\\x\"",
                "JSON parse error, invalid escape sequence in string",
            ),
            (
                b"\"\xff\"",
                "JSON parse error, invalid UTF-8 sequence in string",
            ),
            (
                b"\"\xc1\x81\"",
                "JSON parse error, invalid UTF-8 sequence in string",
            ),
            (
                b"\"\xe2\x82\"",
                "JSON parse error, invalid UTF-8 sequence in string",
            ),
        ];
        for (input, want) in bad {
            assert_eq!(parse_string(input), Err((*want).to_owned()), "{input:?}");
        }
    }

    #[test]
    fn test_numbers_keep_their_kind() {
        let cases: &[(&str, TokenKind, Value)] = &[
            (
                "9223372036854775807",
                TokenKind::Integer,
                Value::Int(i64::MAX),
            ),
            (
                "9223372036854775808",
                TokenKind::Integer,
                Value::UInt(1 << 63),
            ),
            ("-0", TokenKind::Integer, Value::Int(0)),
            (
                "18446744073709551616",
                TokenKind::Integer,
                Value::Double(18446744073709551616.0),
            ),
            (
                "-9223372036854775809",
                TokenKind::Integer,
                Value::Double(-9223372036854775809.0),
            ),
            ("1.0", TokenKind::Float, Value::Double(1.0)),
            ("1e400", TokenKind::Float, Value::Double(f64::INFINITY)),
        ];
        for (text, kind, want) in cases {
            assert_eq!(parse_number(text.as_bytes(), *kind), *want, "{text}");
        }
    }
}
