//! The request envelope as qemu-ga's `qmp_dispatch` checks it, and the
//! response shapes it writes: `{"return": V}`, `{"error": {"class": C,
//! "desc": D}}`, with `id` copied for everything that was an object.

use crate::value::{Dict, Value};
use crate::writer::write_value;

/// The error classes qemu-ga uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Almost every failure.
    GenericError,
    /// Unknown or disabled command.
    CommandNotFound,
}

impl ErrorClass {
    /// The class name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
        }
    }

    /// Parses a class name from the wire.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "GenericError" => Some(ErrorClass::GenericError),
            "CommandNotFound" => Some(ErrorClass::CommandNotFound),
            _ => None,
        }
    }
}

/// An error answer: class and description.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{desc}")]
pub struct QgaError {
    /// The class.
    pub class: ErrorClass,
    /// The text.
    pub desc: String,
}

impl QgaError {
    /// A GenericError with `desc`.
    pub fn generic(desc: impl Into<String>) -> Self {
        QgaError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    /// A CommandNotFound error with `desc`.
    pub fn not_found(desc: impl Into<String>) -> Self {
        QgaError {
            class: ErrorClass::CommandNotFound,
            desc: desc.into(),
        }
    }
}

/// A request that passed the envelope checks.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The command name.
    pub execute: String,
    /// The arguments (`{}` when absent).
    pub arguments: Dict,
    /// The `id` member, if any, to copy into the response.
    pub id: Option<Value>,
}

/// A message rejected by the envelope checks: the error and the `id` to
/// copy (none when the input was not an object).
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    /// The error to answer.
    pub error: QgaError,
    /// The `id` to echo, if any.
    pub id: Option<Value>,
}

/// Checks a parsed message the way `qmp_dispatch` and
/// `qmp_dispatch_check_obj` do (members in QDict order, then `execute`
/// present). OOB is never allowed, so `exec-oob` is just unexpected.
pub fn check_request(message: Value) -> Result<Request, Rejected> {
    let Value::Object(mut dict) = message else {
        return Err(Rejected {
            error: QgaError::generic("QMP input must be a JSON object"),
            id: None,
        });
    };
    let id = dict.get("id").cloned();
    let reject = |desc: String| Rejected {
        error: QgaError::generic(desc),
        id: id.clone(),
    };
    let mut has_execute = false;
    for (key, value) in dict.iter() {
        match key {
            "execute" => {
                if !matches!(value, Value::String(_)) {
                    return Err(reject("QMP input member 'execute' must be a string".into()));
                }
                has_execute = true;
            }
            "arguments" => {
                if !matches!(value, Value::Object(_)) {
                    return Err(reject(
                        "QMP input member 'arguments' must be an object".into(),
                    ));
                }
            }
            "id" => {}
            other => {
                return Err(reject(format!("QMP input member '{other}' is unexpected")));
            }
        }
    }
    if !has_execute {
        return Err(reject("QMP input lacks member 'execute'".into()));
    }
    let execute = match dict.get("execute") {
        Some(Value::String(s)) => s.clone(),
        _ => String::new(),
    };
    let arguments = match dict.take_value("arguments") {
        Some(Value::Object(d)) => d,
        _ => Dict::new(),
    };
    Ok(Request {
        execute,
        arguments,
        id,
    })
}

/// Builds a success response `{"return": value}` (+ `id`).
pub fn success_response(value: Value, id: Option<Value>) -> Value {
    let mut rsp = Dict::new();
    rsp.insert("return", value);
    if let Some(id) = id {
        rsp.insert("id", id);
    }
    Value::Object(rsp)
}

/// Builds an error response `{"error": {"class", "desc"}}` (+ `id`).
pub fn error_response(error: &QgaError, id: Option<Value>) -> Value {
    let mut err = Dict::new();
    err.insert("class", error.class.as_str());
    err.insert("desc", error.desc.as_str());
    let mut rsp = Dict::new();
    rsp.insert("error", err);
    if let Some(id) = id {
        rsp.insert("id", id);
    }
    Value::Object(rsp)
}

/// Writes one response line as qemu-ga's `send_response`: an optional
/// 0xFF delimiter, the JSON, then `\n`.
pub fn write_response(out: &mut Vec<u8>, response: &Value, delimited: bool) {
    if delimited {
        out.push(0xFF);
    }
    write_value(out, response);
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::StreamParser;

    fn run(input: &str) -> String {
        let mut p = StreamParser::new();
        let mut out = Vec::new();
        for m in p.feed_collect(input.as_bytes()) {
            let rsp = match m {
                Err(e) => error_response(&QgaError::generic(e.desc), None),
                Ok(v) => match check_request(v) {
                    Ok(r) => success_response(Value::String(r.execute), r.id),
                    Err(rej) => error_response(&rej.error, rej.id),
                },
            };
            write_response(&mut out, &rsp, false);
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn test_envelope_table() {
        let cases: &[(&str, &str)] = &[
            ("{'execute':'x'}", "{\"return\": \"x\"}\n"),
            (
                "{\"id\":5}",
                "{\"id\": 5, \"error\": {\"class\": \"GenericError\", \"desc\": \"QMP input lacks member 'execute'\"}}\n",
            ),
            (
                "[]",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"QMP input must be a JSON object\"}}\n",
            ),
            (
                "{'execute':1,'id':'a'}",
                "{\"id\": \"a\", \"error\": {\"class\": \"GenericError\", \"desc\": \"QMP input member 'execute' must be a string\"}}\n",
            ),
            (
                "{'execute':'x','arguments':[]}",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"QMP input member 'arguments' must be an object\"}}\n",
            ),
            (
                "{'exec-oob':'guest-ping'}",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"QMP input member 'exec-oob' is unexpected\"}}\n",
            ),
            (
                "{'execute':'x','control':1}",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"QMP input member 'control' is unexpected\"}}\n",
            ),
            (
                "{'execute':'x','id':0.1}",
                "{\"return\": \"x\", \"id\": 0.10000000000000001}\n",
            ),
            (
                "{\"a\":1}}",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"QMP input member 'a' is unexpected\"}}\n{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, expecting value\"}}\n",
            ),
            (
                "[1}",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, expected separator in list\"}}\n",
            ),
            (
                "{'execute':'x','id':TRUE}",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray 'T'\"}}\n{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, expecting value\"}}\n",
            ),
            (
                "43\u{0}",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"QMP input must be a JSON object\"}}\n{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray ''\"}}\n",
            ),
            (
                "{'a':1,'a':2}",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, duplicate key\"}}\n",
            ),
            (
                "{1:2}",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, key is not a string in object\"}}\n",
            ),
            (
                "{'a' 2}",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, missing : in object pair\"}}\n",
            ),
            (
                "{'a':nul}",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, invalid keyword 'nul'\"}}\n",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(run(input), *want, "{input}");
        }
    }
}
