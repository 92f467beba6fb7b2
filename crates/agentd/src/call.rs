//! The vocabulary of one call, shared by the RPC handlers (`service`) and
//! the multi-command operations (`ops`): where it goes ([`Target`]), the
//! limits it runs under ([`Limits`]), the request-timeout rule, and the
//! check of strings that become agent arguments.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use tokio::time::Instant;

use crate::channel::{Channels, Outcome};
use crate::status::CallError;
use crate::wire::Reply;

/// A request's per-command `timeout` by the rule every qvirt service
/// applies ([`qvirt_common::rpc::request_timeout`]); unset or zero is
/// `default`.
pub fn request_timeout(
    timeout: Option<prost_types::Duration>,
    default: Duration,
) -> Result<Duration, CallError> {
    qvirt_common::rpc::request_timeout(timeout)
        .map(|t| t.unwrap_or(default))
        .map_err(|e| CallError::request("timeout", e.to_string()))
}

/// Limits of the multi-command calls.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Per-command timeout when the request has none.
    pub default_timeout: Duration,
    /// Largest ReadFile result / WriteFile payload.
    pub max_file_bytes: usize,
    /// Bytes per guest-file-read / guest-file-write.
    pub file_chunk_bytes: usize,
    /// Longest pause between guest-exec-status polls.
    pub exec_poll_max: Duration,
}

/// One call's target: the guest's agent socket and the per-command
/// timeout. The first command's deadline counts from the start of the RPC
/// (the domain lookup and any wait in the guest's queue use it up); each
/// later command of a multi-command call gets the whole timeout.
pub(crate) struct Target<'a> {
    channels: &'a Channels,
    path: PathBuf,
    pub(crate) timeout: Duration,
    first_deadline: Instant,
    first_used: AtomicBool,
}

impl<'a> Target<'a> {
    /// The target `path` on `channels`, for a call that started at
    /// `start` with `timeout` per command.
    pub(crate) fn new(
        channels: &'a Channels,
        path: PathBuf,
        timeout: Duration,
        start: Instant,
    ) -> Self {
        Target {
            channels,
            path,
            timeout,
            first_deadline: start + timeout,
            first_used: AtomicBool::new(false),
        }
    }

    /// Sends one raw command (an object with `execute`).
    pub(crate) async fn send(&self, request: Map<String, Value>) -> Result<Outcome, CallError> {
        let deadline = if self.first_used.swap(true, Ordering::Relaxed) {
            Instant::now() + self.timeout
        } else {
            self.first_deadline
        };
        self.channels
            .call(&self.path, request, deadline, self.timeout)
            .await
            .map_err(CallError::from)
    }

    /// Sends one command; an agent error becomes [`CallError::Agent`], a command
    /// without a success response yields `Value::Null`.
    pub(crate) async fn call(
        &self,
        execute: &str,
        args: Option<Value>,
    ) -> Result<Value, CallError> {
        let mut request = Map::new();
        request.insert("execute".into(), Value::String(execute.to_owned()));
        if let Some(args) = args {
            request.insert("arguments".into(), args);
        }
        match self.send(request).await? {
            Outcome::Reply(Reply::Return(v)) => Ok(v),
            Outcome::Reply(Reply::Error(error)) => Err(CallError::Agent {
                command: execute.to_owned(),
                error,
            }),
            Outcome::Accepted => Ok(Value::Null),
        }
    }

    /// Sends one command and decodes its `return` as `T`.
    pub(crate) async fn get<T: DeserializeOwned>(
        &self,
        execute: &str,
        args: Option<Value>,
    ) -> Result<T, CallError> {
        let v = self.call(execute, args).await?;
        serde_json::from_value(v)
            .map_err(|e| CallError::bad_reply(execute, format!("unexpected shape: {e}")))
    }
}

/// A string request field that becomes an agent argument: C strings in
/// the guest cannot carry a NUL byte.
pub(crate) fn no_nul(field: &str, value: &str) -> Result<(), CallError> {
    if value.contains('\0') {
        return Err(CallError::request(field, "must not contain a NUL byte"));
    }
    Ok(())
}
