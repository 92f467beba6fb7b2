//! The QMP wire format: parsing one line from QEMU (greeting, reply, event)
//! and building request lines.
//!
//! Every number is kept as QEMU wrote it: the workspace builds `serde_json`
//! with `arbitrary_precision`, so a `Value` stores a number's text and
//! serialises it back unchanged (2^63-1 and 2^64-1 survive; nothing goes
//! through `f64`).

use serde_json::{Map, Value};

use super::QmpError;

/// How much of a bad line an error message quotes.
const QUOTE_LIMIT: usize = 200;

/// QEMU's version, from the greeting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuVersion {
    /// Major version (7 for QEMU 7.2.22).
    pub major: u64,
    /// Minor version.
    pub minor: u64,
    /// Micro version.
    pub micro: u64,
}

/// The QMP greeting QEMU sends when a client connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// QEMU's version.
    pub version: QemuVersion,
    /// The distribution's package string (may be empty).
    pub package: String,
    /// Capabilities QEMU offers (e.g. `oob`); none are enabled by this client.
    pub capabilities: Vec<String>,
}

/// One asynchronous event read from the monitor, as QEMU sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpEvent {
    /// The event name, e.g. `STOP`, `RESUME`, `SHUTDOWN`.
    pub name: String,
    /// QEMU's timestamp, seconds part (QEMU sends -1 when it has no clock).
    pub seconds: i64,
    /// QEMU's timestamp, microseconds part.
    pub microseconds: i64,
    /// The event's `data` object as JSON text; `{}` when QEMU sent none.
    pub data: String,
}

/// A parsed line that is not the greeting.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// A command reply (`return` or `error`), with its id when it is ours.
    Reply {
        /// The numeric id, or `None` when absent or not a u64.
        id: Option<u64>,
        /// The whole reply object.
        body: Map<String, Value>,
    },
    /// An event.
    Event(QmpEvent),
}

/// Quote a line for an error message, cut to `QUOTE_LIMIT` bytes.
pub(crate) fn quote(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end();
    let mut end = text.len().min(QUOTE_LIMIT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    if end < text.len() {
        format!("{}...", &text[..end])
    } else {
        text.to_owned()
    }
}

fn bad_greeting(reason: &str, line: &[u8]) -> QmpError {
    QmpError::BadGreeting {
        reason: reason.to_owned(),
        line: quote(line),
    }
}

/// Parse the greeting line `{"QMP": {"version": {...}, "capabilities": [...]}}`.
pub(crate) fn parse_greeting(line: &[u8]) -> Result<Greeting, QmpError> {
    let value: Value = serde_json::from_slice(line).map_err(|_| bad_greeting("not JSON", line))?;
    let qmp = value
        .get("QMP")
        .and_then(Value::as_object)
        .ok_or_else(|| bad_greeting("no \"QMP\" object", line))?;
    let version = qmp
        .get("version")
        .ok_or_else(|| bad_greeting("no version", line))?;
    let qemu = version
        .get("qemu")
        .ok_or_else(|| bad_greeting("no version.qemu", line))?;
    let number = |key: &str| {
        qemu.get(key)
            .and_then(Value::as_u64)
            .ok_or_else(|| bad_greeting("bad version number", line))
    };
    let version = QemuVersion {
        major: number("major")?,
        minor: number("minor")?,
        micro: number("micro")?,
    };
    let package = qmp
        .get("version")
        .and_then(|v| v.get("package"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let capabilities = qmp
        .get("capabilities")
        .and_then(Value::as_array)
        .ok_or_else(|| bad_greeting("no capabilities list", line))?
        .iter()
        .filter_map(|c| c.as_str().map(str::to_owned))
        .collect();
    Ok(Greeting {
        version,
        package,
        capabilities,
    })
}

/// An event line's `data` member, borrowed as the raw text QEMU sent.
#[derive(serde::Deserialize)]
struct RawData<'a> {
    #[serde(borrow, default)]
    data: Option<&'a serde_json::value::RawValue>,
}

/// Parse a line after the greeting. `Err` gives the reason it is not a reply
/// or an event.
pub(crate) fn parse_incoming(line: &[u8]) -> Result<Incoming, &'static str> {
    let value: Value = serde_json::from_slice(line).map_err(|_| "not JSON")?;
    let Value::Object(body) = value else {
        return Err("not a JSON object");
    };
    if let Some(name) = body.get("event") {
        let name = name
            .as_str()
            .ok_or("event name is not a string")?
            .to_owned();
        let stamp = body.get("timestamp");
        let part = |key: &str| {
            stamp
                .and_then(|t| t.get(key))
                .and_then(Value::as_i64)
                .unwrap_or(-1)
        };
        let (seconds, microseconds) = (part("seconds"), part("microseconds"));
        // The data member's own bytes, exactly as QEMU wrote them.
        let data = match serde_json::from_slice::<RawData<'_>>(line) {
            Ok(RawData { data: Some(raw) }) => raw.get().to_owned(),
            Ok(RawData { data: None }) => "{}".to_owned(),
            Err(_) => return Err("event data is not JSON"),
        };
        return Ok(Incoming::Event(QmpEvent {
            name,
            seconds,
            microseconds,
            data,
        }));
    }
    if !body.contains_key("return") && !body.contains_key("error") {
        return Err("neither a reply nor an event");
    }
    let id = body.get("id").and_then(Value::as_u64);
    Ok(Incoming::Reply { id, body })
}

/// Build `{"execute": command, "arguments": ..., "id": id}` plus newline.
pub(crate) fn request_line(command: &str, arguments: Option<Value>, id: u64) -> Vec<u8> {
    let mut request = Map::new();
    request.insert("execute".to_owned(), Value::String(command.to_owned()));
    if let Some(arguments) = arguments {
        request.insert("arguments".to_owned(), arguments);
    }
    request.insert("id".to_owned(), Value::from(id));
    finish_line(&Value::Object(request))
}

fn finish_line(request: &Value) -> Vec<u8> {
    // serde_json's compact output never contains a raw newline.
    let mut line = request.to_string().into_bytes();
    line.push(b'\n');
    line
}

/// A caller's checked command (`qvirt_common::qapi`) with our `id`, as the
/// line to send.
pub(crate) fn raw_line(mut request: Map<String, Value>, id: u64) -> Vec<u8> {
    request.insert("id".to_owned(), Value::from(id));
    finish_line(&Value::Object(request))
}

/// A reply to a raw command as JSON text, without our `id`.
pub(crate) fn raw_reply(mut body: Map<String, Value>) -> String {
    body.remove("id");
    Value::Object(body).to_string()
}

/// Turn a reply to `command` into its `return` value or a typed error.
pub(crate) fn into_result(command: &str, mut body: Map<String, Value>) -> Result<Value, QmpError> {
    if let Some(value) = body.remove("return") {
        return Ok(value);
    }
    if let Some(error) = body.get("error") {
        let text = |key: &str| {
            error
                .get(key)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        return Err(QmpError::Command {
            command: command.to_owned(),
            class: text("class"),
            desc: text("desc"),
        });
    }
    Err(QmpError::BadReply {
        command: command.to_owned(),
        reason: "neither return nor error".to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}"#;

    #[test]
    fn test_greeting_parses_version_and_capabilities() {
        let greeting = parse_greeting(GREETING.as_bytes()).expect("greeting");
        assert_eq!(
            greeting.version,
            QemuVersion {
                major: 7,
                minor: 2,
                micro: 22
            }
        );
        assert_eq!(greeting.package, "Debian 1:7.2+dfsg-7+deb12u18+b3");
        assert_eq!(greeting.capabilities, vec!["oob".to_owned()]);
    }

    #[test]
    fn test_bad_greetings_are_rejected_with_reason() {
        let table = [
            ("garbage", "not JSON"),
            (r#"{"return": {}}"#, "no \"QMP\" object"),
            (r#"{"QMP": {"capabilities": []}}"#, "no version"),
            (
                r#"{"QMP": {"version": {"qemu": {"major": "7", "minor": 2, "micro": 0}}, "capabilities": []}}"#,
                "bad version number",
            ),
            (
                r#"{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}}}"#,
                "no capabilities list",
            ),
        ];
        for (line, want) in table {
            match parse_greeting(line.as_bytes()) {
                Err(QmpError::BadGreeting { reason, .. }) => assert_eq!(reason, want, "{line}"),
                other => panic!("{line}: expected BadGreeting, got {other:?}"),
            }
        }
    }

    #[test]
    fn test_event_data_is_byte_for_byte_what_qemu_sent() {
        let line = br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "X", "data": {"z": 1.50, "a": [ 18446744073709551615 ]}}"#;
        let Ok(Incoming::Event(event)) = parse_incoming(line) else {
            panic!("not an event");
        };
        assert_eq!(event.data, r#"{"z": 1.50, "a": [ 18446744073709551615 ]}"#);
    }

    #[test]
    fn test_event_keeps_timestamp_and_raw_data() {
        let line = br#"{"timestamp": {"seconds": 1700000000, "microseconds": 123456}, "event": "BLOCK_IO_ERROR", "data": {"offset": 18446744073709551615, "big": 9223372036854775807}}"#;
        let Ok(Incoming::Event(event)) = parse_incoming(line) else {
            panic!("not an event");
        };
        assert_eq!(event.name, "BLOCK_IO_ERROR");
        assert_eq!(
            (event.seconds, event.microseconds),
            (1_700_000_000, 123_456)
        );
        assert!(
            event.data.contains("18446744073709551615"),
            "{}",
            event.data
        );
        assert!(event.data.contains("9223372036854775807"), "{}", event.data);
    }

    #[test]
    fn test_event_without_data_has_empty_object() {
        let line = br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#;
        let Ok(Incoming::Event(event)) = parse_incoming(line) else {
            panic!("not an event");
        };
        assert_eq!(event.data, "{}");
    }

    #[test]
    fn test_incoming_classification_table() {
        type Want = Result<Option<u64>, &'static str>;
        let table: [(&[u8], Want); 6] = [
            (br#"{"return": {}, "id": 7}"#, Ok(Some(7))),
            (
                br#"{"error": {"class": "X", "desc": "y"}, "id": 8}"#,
                Ok(Some(8)),
            ),
            (br#"{"return": {}}"#, Ok(None)),
            (br#"{"return": {}, "id": "libvirt-1"}"#, Ok(None)),
            (br#"{"foo": 1}"#, Err("neither a reply nor an event")),
            (br#"[1, 2]"#, Err("not a JSON object")),
        ];
        for (line, want) in table {
            let got = match parse_incoming(line) {
                Ok(Incoming::Reply { id, .. }) => Ok(id),
                Ok(Incoming::Event(_)) => Err("event"),
                Err(reason) => Err(reason),
            };
            assert_eq!(got, want, "{}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn test_raw_line_carries_our_id_and_the_reply_none() {
        let command = qvirt_common::qapi::parse_command(
            r#"{"execute": "x", "id": "mine", "arguments": {"a": 9223372036854775807, "b": 18446744073709551616, "c": 1.00000000000000000001}}"#,
        )
        .expect("a command");
        let line = raw_line(command.request, 42);
        assert_eq!(line.last(), Some(&b'\n'));
        let text = String::from_utf8_lossy(&line);
        for n in [
            "9223372036854775807",
            "18446744073709551616",
            "1.00000000000000000001",
        ] {
            assert!(text.contains(n), "{n} lost in {text}");
        }
        let sent: Value = serde_json::from_slice(&line).expect("json");
        assert_eq!(sent["id"], Value::from(42u64));
        let mut body = Map::new();
        body.insert("return".to_owned(), serde_json::json!({"n": 1}));
        body.insert("id".to_owned(), Value::from(42u64));
        let reply: Value = serde_json::from_str(&raw_reply(body)).expect("json");
        assert_eq!(reply, serde_json::json!({"return": {"n": 1}}));
    }

    #[test]
    fn test_error_reply_becomes_typed_error() {
        let Ok(Incoming::Reply { body, .. }) = parse_incoming(
            br#"{"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}, "id": 3}"#,
        ) else {
            panic!("not a reply");
        };
        match into_result("nope", body) {
            Err(QmpError::Command {
                command,
                class,
                desc,
            }) => {
                assert_eq!(command, "nope");
                assert_eq!(class, "CommandNotFound");
                assert_eq!(desc, "The command nope has not been found");
            }
            other => panic!("expected Command error, got {other:?}"),
        }
    }

    #[test]
    fn test_quote_cuts_long_lines_on_char_boundary() {
        let long = "é".repeat(300);
        let quoted = quote(long.as_bytes());
        assert!(quoted.ends_with("..."));
        assert!(quoted.len() <= QUOTE_LIMIT + 3);
    }
}
