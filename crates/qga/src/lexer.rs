//! QEMU's JSON lexer (`qobject/json-lexer.c`) as a byte-at-a-time state
//! machine: the same token boundaries, the same one-byte lookahead, the
//! same error tokens and the same error recovery (skip to a structural
//! character, an ASCII control character other than tab, or 0xFE/0xFF).

/// Largest token (and message) in bytes: 64 MiB.
pub const MAX_TOKEN_SIZE: usize = 64 << 20;

/// Kinds of complete tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// `{`
    LCurly,
    /// `}`
    RCurly,
    /// `[`
    LSquare,
    /// `]`
    RSquare,
    /// `:`
    Colon,
    /// `,`
    Comma,
    /// An integer literal.
    Integer,
    /// A literal with a fraction or exponent.
    Float,
    /// A run of lowercase letters.
    Keyword,
    /// A single- or double-quoted string, quotes included.
    String,
}

/// What the lexer hands to the message streamer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lexeme {
    /// A complete token.
    Token(TokenKind),
    /// A lexing error; the text is the offending partial token.
    Error,
    /// A token grew past [`MAX_TOKEN_SIZE`] and was cut off.
    Oversize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Recovery,
    DqString,
    DqEscape,
    SqString,
    SqEscape,
    Zero,
    ExpDigits,
    ExpSign,
    ExpE,
    Mantissa,
    MantissaDigits,
    Digits,
    Sign,
    Keyword,
    Start,
}

/// Result of one table lookup.
enum Step {
    /// Move to a non-terminal state, consuming the byte.
    Go(State),
    /// Complete a token; `consumed` is false when the byte was lookahead.
    Emit(TokenKind, bool),
    /// Whitespace in the start state (consumed, token dropped).
    Skip,
    /// Lexing error (the byte is consumed into the error token).
    Error,
    /// Leave recovery without consuming the byte.
    Resync,
}

fn step(state: State, ch: u8) -> Step {
    use State::*;
    let digit = ch.is_ascii_digit();
    match state {
        Recovery => match ch {
            b'\t' => Step::Go(Recovery),
            0..=0x1F | 0xFE | 0xFF | b'[' | b']' | b'{' | b'}' | b':' | b',' => Step::Resync,
            _ => Step::Go(Recovery),
        },
        DqString | SqString => {
            let quote = if state == DqString { b'"' } else { b'\'' };
            match ch {
                b'\\' => Step::Go(if state == DqString {
                    DqEscape
                } else {
                    SqEscape
                }),
                c if c == quote => Step::Emit(TokenKind::String, true),
                0x20..=0xFD => Step::Go(state),
                _ => Step::Error,
            }
        }
        DqEscape => match ch {
            0x20..=0xFD => Step::Go(DqString),
            _ => Step::Error,
        },
        SqEscape => match ch {
            0x20..=0xFD => Step::Go(SqString),
            _ => Step::Error,
        },
        Zero => match ch {
            b'0'..=b'9' => Step::Error,
            b'.' => Step::Go(Mantissa),
            _ => Step::Emit(TokenKind::Integer, false),
        },
        ExpDigits => match ch {
            _ if digit => Step::Go(ExpDigits),
            _ => Step::Emit(TokenKind::Float, false),
        },
        ExpSign => match ch {
            _ if digit => Step::Go(ExpDigits),
            _ => Step::Error,
        },
        ExpE => match ch {
            b'-' | b'+' => Step::Go(ExpSign),
            _ if digit => Step::Go(ExpDigits),
            _ => Step::Error,
        },
        MantissaDigits => match ch {
            _ if digit => Step::Go(MantissaDigits),
            b'e' | b'E' => Step::Go(ExpE),
            _ => Step::Emit(TokenKind::Float, false),
        },
        Mantissa => match ch {
            _ if digit => Step::Go(MantissaDigits),
            _ => Step::Error,
        },
        Digits => match ch {
            _ if digit => Step::Go(Digits),
            b'e' | b'E' => Step::Go(ExpE),
            b'.' => Step::Go(Mantissa),
            _ => Step::Emit(TokenKind::Integer, false),
        },
        Sign => match ch {
            b'0' => Step::Go(Zero),
            b'1'..=b'9' => Step::Go(Digits),
            _ => Step::Error,
        },
        Keyword => match ch {
            b'a'..=b'z' => Step::Go(Keyword),
            _ => Step::Emit(TokenKind::Keyword, false),
        },
        Start => match ch {
            b'"' => Step::Go(DqString),
            b'\'' => Step::Go(SqString),
            b'0' => Step::Go(Zero),
            b'1'..=b'9' => Step::Go(Digits),
            b'-' => Step::Go(Sign),
            b'{' => Step::Emit(TokenKind::LCurly, true),
            b'}' => Step::Emit(TokenKind::RCurly, true),
            b'[' => Step::Emit(TokenKind::LSquare, true),
            b']' => Step::Emit(TokenKind::RSquare, true),
            b',' => Step::Emit(TokenKind::Comma, true),
            b':' => Step::Emit(TokenKind::Colon, true),
            b'a'..=b'z' => Step::Go(Keyword),
            b' ' | b'\t' | b'\r' | b'\n' => Step::Skip,
            _ => Step::Error,
        },
    }
}

/// The streaming lexer. Feed it bytes; it calls back with each lexeme and
/// the text of its token.
#[derive(Debug)]
pub struct Lexer {
    state: State,
    token: Vec<u8>,
}

impl Default for Lexer {
    fn default() -> Self {
        Self::new()
    }
}

impl Lexer {
    /// A lexer in its start state.
    pub fn new() -> Self {
        Lexer {
            state: State::Start,
            token: Vec::new(),
        }
    }

    /// Bytes of the token in progress (bounded by [`MAX_TOKEN_SIZE`]).
    pub fn pending(&self) -> usize {
        self.token.len()
    }

    /// Feeds one byte.
    #[inline]
    pub fn feed_byte(&mut self, ch: u8, emit: &mut impl FnMut(Lexeme, &[u8])) {
        loop {
            let consumed = match step(self.state, ch) {
                Step::Go(next) => {
                    self.token.push(ch);
                    if next == State::Recovery {
                        self.token.clear();
                    }
                    self.state = next;
                    true
                }
                Step::Emit(kind, consumed) => {
                    if consumed {
                        self.token.push(ch);
                    }
                    emit(Lexeme::Token(kind), &self.token);
                    self.token.clear();
                    self.state = State::Start;
                    consumed
                }
                Step::Skip => {
                    self.token.clear();
                    true
                }
                Step::Error => {
                    self.token.push(ch);
                    emit(Lexeme::Error, &self.token);
                    self.token.clear();
                    self.state = State::Recovery;
                    true
                }
                Step::Resync => {
                    self.token.clear();
                    self.state = State::Start;
                    false
                }
            };
            if consumed {
                break;
            }
        }
        if self.token.len() > MAX_TOKEN_SIZE {
            emit(Lexeme::Oversize, &self.token);
            self.token = Vec::new();
            self.state = State::Start;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lex(input: &[u8]) -> Vec<(Lexeme, String)> {
        let mut lexer = Lexer::new();
        let mut out = Vec::new();
        for &b in input {
            lexer.feed_byte(b, &mut |l, t| {
                out.push((l, String::from_utf8_lossy(t).into_owned()))
            });
        }
        out
    }

    #[test]
    fn test_lexer_tokens_table() {
        use Lexeme::*;
        use TokenKind::*;
        type Case<'a> = (&'a [u8], &'a [(Lexeme, &'a str)]);
        let cases: &[Case] = &[
            (
                b"{'a':1}",
                &[
                    (Token(LCurly), "{"),
                    (Token(String), "'a'"),
                    (Token(Colon), ":"),
                    (Token(Integer), "1"),
                    (Token(RCurly), "}"),
                ],
            ),
            (b"43", &[]),
            (b"43 ", &[(Token(Integer), "43")]),
            (
                b"-0.5e+3,",
                &[(Token(Float), "-0.5e+3"), (Token(Comma), ",")],
            ),
            (b"01", &[(Error, "01")]),
            (b"TRUE}", &[(Error, "T"), (Token(RCurly), "}")]),
            (b"nul ", &[(Token(Keyword), "nul")]),
            (
                b"\"a\xffb\"}",
                &[(Error, "\"a\u{FFFD}"), (Token(RCurly), "}")],
            ),
            (b"\xff\xff", &[(Error, "\u{FFFD}"), (Error, "\u{FFFD}")]),
            (b"\"a\nb\",", &[(Error, "\"a\n"), (Token(Comma), ",")]),
            (b"1.e", &[(Error, "1.e")]),
            (b"%", &[(Error, "%")]),
            (b"\t X\tyz\n1 ", &[(Error, "X"), (Token(Integer), "1")]),
        ];
        for (input, want) in cases {
            let got = lex(input);
            let want: Vec<(Lexeme, std::string::String)> =
                want.iter().map(|(l, t)| (*l, (*t).to_owned())).collect();
            assert_eq!(
                got,
                want,
                "{:?}",
                std::string::String::from_utf8_lossy(input)
            );
        }
    }
}
