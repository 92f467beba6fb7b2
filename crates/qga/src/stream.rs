//! The message streamer (`qobject/json-streamer.c`): collects the lexer's
//! tokens until braces and brackets balance, enforces the per-message
//! limits with QEMU's error texts, and hands each complete message to the
//! parser. Its state (a half-received message) lives until more bytes come,
//! whatever the transport does in between.

use crate::lexer::{Lexeme, Lexer, MAX_TOKEN_SIZE, TokenKind};
use crate::parser::{Token, parse};
use crate::unicode::lossy;
use crate::value::Value;

/// Most tokens in one message: 2,097,152.
pub const MAX_TOKEN_COUNT: usize = 2 << 20;
/// Deepest nesting of `{` and `[` together.
pub const MAX_NESTING: i64 = 1 << 10;

/// Why a message produced no value. `desc` is qemu-ga's text, e.g.
/// `JSON parse error, stray 'T'`; it is answered as a GenericError.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{desc}")]
pub struct JsonError {
    /// The error text as qemu-ga reports it.
    pub desc: String,
}

impl JsonError {
    fn new(desc: impl Into<String>) -> Self {
        JsonError { desc: desc.into() }
    }
}

/// One message out of the stream: a value or the error it produced.
pub type Message = Result<Value, JsonError>;

/// Streaming JSON message parser in QEMU's dialect. Feed it bytes split
/// anywhere; it calls back once per complete message or error, in order.
#[derive(Debug, Default)]
pub struct StreamParser {
    lexer: Lexer,
    tokens: Vec<Token>,
    text: Vec<u8>,
    brace: i64,
    bracket: i64,
    token_size: usize,
}

/// Above this capacity buffers are released after a message, so one huge
/// message does not pin its memory forever.
const KEEP_CAPACITY: usize = 64 * 1024;

impl StreamParser {
    /// A parser in its initial state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes; `emit` is called for each complete message.
    pub fn feed(&mut self, data: &[u8], emit: &mut impl FnMut(Message)) {
        let StreamParser {
            lexer,
            tokens,
            text,
            brace,
            bracket,
            token_size,
        } = self;
        let mut state = Streamer {
            tokens,
            text,
            brace,
            bracket,
            token_size,
        };
        for &b in data {
            lexer.feed_byte(b, &mut |lexeme, tok| state.process(lexeme, tok, emit));
        }
    }

    /// Convenience: feeds bytes and collects the messages.
    pub fn feed_collect(&mut self, data: &[u8]) -> Vec<Message> {
        let mut out = Vec::new();
        self.feed(data, &mut |m| out.push(m));
        out
    }

    /// Bytes held for the message in progress (tokens plus the partial
    /// token); bounded by the 64 MiB limits.
    pub fn pending_bytes(&self) -> usize {
        self.text.len() + self.lexer.pending()
    }

    /// Tokens held for the message in progress; at most
    /// [`MAX_TOKEN_COUNT`].
    pub fn pending_tokens(&self) -> usize {
        self.tokens.len()
    }
}

struct Streamer<'a> {
    tokens: &'a mut Vec<Token>,
    text: &'a mut Vec<u8>,
    brace: &'a mut i64,
    bracket: &'a mut i64,
    token_size: &'a mut usize,
}

impl Streamer<'_> {
    fn reset(&mut self) {
        *self.brace = 0;
        *self.bracket = 0;
        *self.token_size = 0;
        self.tokens.clear();
        self.text.clear();
        if self.text.capacity() > KEEP_CAPACITY {
            *self.text = Vec::new();
        }
        if self.tokens.capacity() > KEEP_CAPACITY {
            *self.tokens = Vec::new();
        }
    }

    fn fail(&mut self, desc: impl Into<String>, emit: &mut impl FnMut(Message)) {
        self.reset();
        emit(Err(JsonError::new(desc)));
    }

    fn process(&mut self, lexeme: Lexeme, tok: &[u8], emit: &mut impl FnMut(Message)) {
        let kind = match lexeme {
            Lexeme::Error => {
                let desc = format!("JSON parse error, stray '{}'", lossy(tok));
                return self.fail(desc, emit);
            }
            Lexeme::Oversize => return self.fail("JSON token size limit exceeded", emit),
            Lexeme::Token(kind) => kind,
        };
        match kind {
            TokenKind::LCurly => *self.brace += 1,
            TokenKind::RCurly => *self.brace -= 1,
            TokenKind::LSquare => *self.bracket += 1,
            TokenKind::RSquare => *self.bracket -= 1,
            _ => {}
        }
        if *self.token_size + tok.len() + 1 > MAX_TOKEN_SIZE {
            return self.fail("JSON token size limit exceeded", emit);
        }
        if self.tokens.len() + 1 > MAX_TOKEN_COUNT {
            return self.fail("JSON token count limit exceeded", emit);
        }
        if *self.bracket + *self.brace > MAX_NESTING {
            return self.fail("JSON nesting depth limit exceeded", emit);
        }
        let start = self.text.len();
        self.text.extend_from_slice(tok);
        self.tokens.push(Token {
            kind,
            start,
            end: self.text.len(),
        });
        *self.token_size += tok.len();
        if (*self.brace > 0 || *self.bracket > 0) && *self.brace >= 0 && *self.bracket >= 0 {
            return;
        }
        let result = parse(self.tokens, self.text).map_err(JsonError::new);
        self.reset();
        emit(result);
    }
}
