//! The host side of the qemu-ga wire protocol on one connection: writing
//! JSON requests, reading newline-terminated JSON replies with a size cap,
//! and the resynchronisation handshake (qga.md §1.3): send 0xFF and
//! `guest-sync-delimited` with a random id, discard input up to the next
//! 0xFF, parse the line after it and check its `return` is that id.
//!
//! No timeouts here: the caller ([`crate::channel`]) bounds every step and
//! decides what a failure means for the connection.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

/// The byte qemu-ga treats as a parser reset on input and writes before a
/// `guest-sync-delimited` reply on output.
pub const DELIMITER: u8 = 0xFF;

/// Delimited replies with someone else's id (or unreadable ones) skipped in
/// one sync attempt before the request is sent again.
pub const MAX_STALE_PER_ATTEMPT: usize = 32;

/// How many times a sync request is sent before giving up on a peer that
/// keeps answering with the wrong id.
pub const SYNC_ATTEMPTS: usize = 3;

/// What went wrong on the wire.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The peer closed the connection.
    #[error("the agent closed the connection")]
    Eof,
    /// Reading or writing failed.
    #[error("agent socket I/O failed")]
    Io(#[from] std::io::Error),
    /// A reply line is longer than the cap.
    #[error("agent reply exceeds {limit} bytes")]
    TooLong {
        /// The cap, in bytes.
        limit: usize,
    },
    /// A reply line holds more JSON values than [`MAX_JSON_VALUES`].
    #[error("agent reply has more than {limit} JSON values")]
    TooManyValues {
        /// The cap.
        limit: usize,
    },
    /// A reply line is not a JSON object with `return` or `error`.
    #[error("agent reply is not a valid qemu-ga response: {reason}")]
    BadReply {
        /// What is wrong with it.
        reason: String,
    },
    /// The peer answered sync requests, but never with our id.
    #[error("agent did not echo the sync id after {SYNC_ATTEMPTS} attempts")]
    SyncMismatch,
}

/// An error reply from the agent: `{"error": {"class": ..., "desc": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{class}: {desc}")]
pub struct AgentError {
    /// `CommandNotFound` or `GenericError` (qemu-ga uses only these).
    pub class: String,
    /// The agent's description.
    pub desc: String,
}

/// One reply from the agent.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// `{"return": VALUE}`.
    Return(Value),
    /// `{"error": {...}}`.
    Error(AgentError),
}

impl Reply {
    /// The reply as JSON text without `id`, numbers as the agent wrote
    /// them.
    pub fn to_json(&self) -> String {
        let mut obj = Map::new();
        match self {
            Reply::Return(v) => {
                obj.insert("return".into(), v.clone());
            }
            Reply::Error(e) => {
                let mut err = Map::new();
                err.insert("class".into(), Value::String(e.class.clone()));
                err.insert("desc".into(), Value::String(e.desc.clone()));
                obj.insert("error".into(), Value::Object(err));
            }
        }
        Value::Object(obj).to_string()
    }
}

/// A fresh pseudo-random number below 2^53 (exact in every JSON reader),
/// never 0. Not for secrets: sync ids only need to differ from stale ones.
pub fn random_id() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let v = RandomState::new().hash_one((n, nanos, std::process::id())) & ((1 << 53) - 1);
    v.max(1)
}

/// The request bytes of one command: `{"execute": NAME, "arguments": ARGS,
/// "id": ID}` plus a newline (optional for qemu-ga, but readable in
/// traces).
pub fn encode_request(mut request: Map<String, Value>, id: &str) -> Vec<u8> {
    request.insert("id".into(), Value::String(id.to_owned()));
    let mut bytes = Value::Object(request).to_string().into_bytes();
    bytes.push(b'\n');
    bytes
}

/// One connection to an agent: a buffered reader and a writer.
#[derive(Debug)]
pub struct Conn<R, W> {
    reader: BufReader<R>,
    writer: W,
    max_reply: usize,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Conn<R, W> {
    /// Wraps the two halves of a connection; replies longer than
    /// `max_reply` bytes are refused.
    pub fn new(reader: R, writer: W, max_reply: usize) -> Self {
        Conn {
            reader: BufReader::with_capacity(64 * 1024, reader),
            writer,
            max_reply,
        }
    }

    /// Writes `bytes` and flushes.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        self.writer.write_all(bytes).await.map_err(io_or_eof)?;
        self.writer.flush().await.map_err(io_or_eof)?;
        Ok(())
    }

    /// Whether input is waiting or the peer has closed, checked without
    /// waiting: `Some(true)` input is buffered (out of sync), `Some(false)`
    /// EOF, `None` nothing pending. Used before reusing an idle connection.
    pub fn poll_idle(&mut self) -> Option<bool> {
        use futures_util::FutureExt;
        if !self.reader.buffer().is_empty() {
            return Some(true);
        }
        match self.reader.fill_buf().now_or_never() {
            None => None,
            Some(Ok([])) | Some(Err(_)) => Some(false),
            Some(Ok(_)) => Some(true),
        }
    }

    /// Discards input up to and including the next 0xFF byte.
    pub async fn skip_to_delimiter(&mut self) -> Result<(), WireError> {
        loop {
            let buf = self.reader.fill_buf().await.map_err(io_or_eof)?;
            if buf.is_empty() {
                return Err(WireError::Eof);
            }
            match buf.iter().position(|&b| b == DELIMITER) {
                Some(i) => {
                    self.reader.consume(i + 1);
                    return Ok(());
                }
                None => {
                    let n = buf.len();
                    self.reader.consume(n);
                }
            }
        }
    }

    /// Reads one line up to `\n` (not included), at most the cap. A
    /// leading 0xFF (a `guest-sync-delimited` reply) is dropped.
    pub async fn read_line(&mut self) -> Result<Vec<u8>, WireError> {
        let mut line = Vec::new();
        loop {
            let buf = self.reader.fill_buf().await.map_err(io_or_eof)?;
            if buf.is_empty() {
                return Err(WireError::Eof);
            }
            let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (&buf[..i], Some(i + 1)),
                None => (buf, None),
            };
            if line.len() + chunk.len() > self.max_reply {
                return Err(WireError::TooLong {
                    limit: self.max_reply,
                });
            }
            line.extend_from_slice(chunk);
            let used = done.unwrap_or(chunk.len());
            self.reader.consume(used);
            if done.is_some() {
                if line.first() == Some(&DELIMITER) {
                    line.remove(0);
                }
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
        }
    }

    /// Reads replies until one carrying an id in `ids`, and returns its
    /// index there; replies with another id (stale answers to commands
    /// that timed out) are skipped. Blank lines are ignored.
    ///
    /// An error reply without any id is returned with index `None`: the
    /// agent could not read a request far enough to see its id (a JSON
    /// error such as a string qemu-ga refuses), and on a channel in step
    /// that request is the one being waited for. Waiting on would only end
    /// at the timeout. The caller should resynchronise afterwards, in case
    /// the agent answered the same request more than once.
    pub async fn read_reply(&mut self, ids: &[&str]) -> Result<(Option<usize>, Reply), WireError> {
        loop {
            let line = self.read_line().await?;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let (reply_id, reply) = parse_reply(&line)?;
            let got = reply_id.as_ref().and_then(Value::as_str);
            if let Some(i) = ids.iter().position(|id| Some(*id) == got) {
                return Ok((Some(i), reply));
            }
            if reply_id.is_none() && matches!(reply, Reply::Error(_)) {
                return Ok((None, reply));
            }
            tracing::debug!(want = ?ids, got = ?reply_id, "skipping a reply for another request");
        }
    }

    /// The resynchronisation handshake with a fresh random id: 0xFF, then
    /// `guest-sync-delimited`; input up to the next 0xFF is discarded
    /// (including qemu-ga's parse error for our 0xFF), the line after it
    /// must return the id. Delimited replies carrying another id are
    /// stale and skipped; after [`MAX_STALE_PER_ATTEMPT`] of them the
    /// request is sent again, at most [`SYNC_ATTEMPTS`] times.
    pub async fn sync(&mut self) -> Result<u64, WireError> {
        for _ in 0..SYNC_ATTEMPTS {
            let id = random_id();
            let mut req = vec![DELIMITER];
            req.extend_from_slice(
                format!(r#"{{"execute":"guest-sync-delimited","arguments":{{"id":{id}}}}}"#)
                    .as_bytes(),
            );
            req.push(b'\n');
            self.write(&req).await?;
            for _ in 0..MAX_STALE_PER_ATTEMPT {
                self.skip_to_delimiter().await?;
                let line = self.read_line().await?;
                match parse_reply(&line) {
                    Ok((_, Reply::Return(v))) if v.as_u64() == Some(id) => return Ok(id),
                    Ok((_, other)) => {
                        tracing::debug!(want = id, got = ?other, "stale sync reply skipped");
                    }
                    Err(e) => tracing::debug!(error = %e, "unreadable sync reply skipped"),
                }
            }
        }
        Err(WireError::SyncMismatch)
    }
}

/// The most JSON values (scalars, arrays, objects and member names) a
/// reply, or a raw command from a client, may hold. Parsed into a
/// `serde_json::Value` tree, a value costs up to ~100 bytes whatever its
/// text's size: `[0,0,...]` grows ~35 times, so a 64 MiB reply of it
/// would take ~2 GiB. qemu-ga's largest replies (memory blocks, vCPUs,
/// file systems of a big guest) hold thousands; this cap bounds a parse
/// to ~100 MB.
pub const MAX_JSON_VALUES: usize = 1_000_000;

/// Whether `text` holds at most `max` JSON values, counted without parsing
/// (one per `,`, `:`, `[` and `{` outside strings, plus one): an upper
/// bound for well-formed text, and cheap to check before a parse.
pub fn json_values_at_most(text: &[u8], max: usize) -> bool {
    let (mut n, mut in_string, mut escaped) = (1usize, false, false);
    for &b in text {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b',' | b':' | b'[' | b'{' => {
                n += 1;
                if n > max {
                    return false;
                }
            }
            _ => {}
        }
    }
    true
}

/// Parses one reply line: its `id` member (if any) and its body.
pub fn parse_reply(line: &[u8]) -> Result<(Option<Value>, Reply), WireError> {
    let bad = |reason: String| WireError::BadReply { reason };
    if !json_values_at_most(line, MAX_JSON_VALUES) {
        return Err(WireError::TooManyValues {
            limit: MAX_JSON_VALUES,
        });
    }
    let value: Value = serde_json::from_slice(line).map_err(|e| bad(e.to_string()))?;
    let Value::Object(mut obj) = value else {
        return Err(bad("not a JSON object".into()));
    };
    let id = obj.remove("id");
    if let Some(ret) = obj.remove("return") {
        return Ok((id, Reply::Return(ret)));
    }
    match obj.remove("error") {
        Some(Value::Object(err)) => {
            let text = |k: &str| err.get(k).and_then(Value::as_str).map(str::to_owned);
            let (Some(class), Some(desc)) = (text("class"), text("desc")) else {
                return Err(bad("error without class and desc strings".into()));
            };
            Ok((id, Reply::Error(AgentError { class, desc })))
        }
        _ => Err(bad("neither `return` nor `error`".into())),
    }
}

fn io_or_eof(e: std::io::Error) -> WireError {
    use std::io::ErrorKind::{BrokenPipe, ConnectionReset, UnexpectedEof};
    match e.kind() {
        BrokenPipe | ConnectionReset | UnexpectedEof => WireError::Eof,
        _ => WireError::Io(e),
    }
}

#[cfg(test)]
#[path = "wire_tests.rs"]
mod tests;
