//! A caller's raw QAPI command, as `virsh qemu-monitor-command` and
//! `virsh qemu-agent-command` take it (`{"execute": NAME, "arguments":
//! {...}}`): the one check the supervisor's MonitorCommand and the agent
//! service's raw Command share. Numbers keep their text (serde_json's
//! `arbitrary_precision`), so 2^64-1 reaches QEMU unchanged.

use serde_json::{Map, Value};

/// Why a caller's command text is refused (the field is the caller's
/// `command_json`).
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// Not JSON at all.
    #[error("command_json is not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    /// JSON, but not an object.
    #[error("command_json must be a JSON object with `execute`")]
    NotObject,
    /// An object without a string `execute` member.
    #[error("command_json must have a string member `execute`")]
    NoExecute,
}

/// A checked command: the request object without the caller's `id` (the
/// service puts its own on the wire, and the reply carries none).
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// The command's name (`execute`).
    pub name: String,
    /// The whole request object, `id` removed.
    pub request: Map<String, Value>,
}

/// Parses and checks `text` as a QAPI command.
pub fn parse_command(text: &str) -> Result<Command, CommandError> {
    let value: Value = serde_json::from_str(text).map_err(CommandError::NotJson)?;
    let Value::Object(mut request) = value else {
        return Err(CommandError::NotObject);
    };
    let name = request
        .get("execute")
        .and_then(Value::as_str)
        .ok_or(CommandError::NoExecute)?
        .to_owned();
    request.remove("id");
    Ok(Command { name, request })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_a_command_keeps_its_numbers_and_loses_its_id() {
        let c = parse_command(
            r#"{"execute": "x", "id": "mine", "arguments": {"a": 18446744073709551615, "b": 1.00000000000000000001}}"#,
        )
        .expect("a command");
        assert_eq!(c.name, "x");
        assert!(!c.request.contains_key("id"));
        assert_eq!(
            Value::Object(c.request).to_string(),
            r#"{"arguments":{"a":18446744073709551615,"b":1.00000000000000000001},"execute":"x"}"#
        );
    }

    #[test]
    fn test_what_is_not_a_command_is_refused() {
        assert!(matches!(
            parse_command("nope"),
            Err(CommandError::NotJson(_))
        ));
        assert!(matches!(parse_command("[]"), Err(CommandError::NotObject)));
        for text in [
            r#"{"arguments": {}}"#,
            r#"{"execute": 5}"#,
            r#"{"exec-oob": "x"}"#,
        ] {
            assert!(
                matches!(parse_command(text), Err(CommandError::NoExecute)),
                "{text}"
            );
        }
    }
}
