//! One RunHook call: the request checked, every script of the driver run in
//! order (all of them, even after a failure), filter output chained, and
//! libvirt's error text for the last failure (`virHookCall`).

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use qvirt_proto::v1::{HookDriver, RunHookRequest};
use tokio_util::sync::CancellationToken;

use crate::discovery::Driver;
use crate::exec::{self, Invocation, ScriptRun, Termination};

/// A request that cannot be run; every message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// `driver` is UNSPECIFIED.
    #[error("driver: required (one of daemon, qemu, network, lxc, libxl)")]
    NoDriver,
    /// `driver` is not a known value.
    #[error("driver: unknown value {0}")]
    UnknownDriver(i32),
    /// `op` is empty.
    #[error("op: required (e.g. prepare, start, started, stopped, release, migrate)")]
    EmptyOp,
    /// An argv field holds a NUL byte, which argv cannot carry.
    #[error("{0}: must not contain a NUL byte")]
    Nul(&'static str),
    /// `timeout` is not within (0, max].
    #[error("timeout: {0}")]
    Timeout(String),
}

/// A checked RunHook request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookCall {
    /// The driver whose hooks run.
    pub driver: Driver,
    /// `argv[1..]`: object, op, subop, extra (empty ones as `-`).
    pub args: [String; 4],
    /// The document for stdin.
    pub input: Vec<u8>,
    /// Per-script timeout.
    pub timeout: Duration,
}

impl HookCall {
    /// Checks `req`; `default_timeout` applies when it sets none, and a
    /// timeout above `max_timeout` is refused.
    pub fn from_request(
        req: RunHookRequest,
        default_timeout: Duration,
        max_timeout: Duration,
    ) -> Result<HookCall, RequestError> {
        let driver = match HookDriver::try_from(req.driver) {
            Ok(d) => Driver::from_proto(d).ok_or(RequestError::NoDriver)?,
            Err(_) => return Err(RequestError::UnknownDriver(req.driver)),
        };
        if req.op.is_empty() {
            return Err(RequestError::EmptyOp);
        }
        let timeout = match req.timeout {
            None => default_timeout,
            Some(t) => check_timeout(t, max_timeout)?,
        };
        let fields = [
            ("object", req.object),
            ("op", req.op),
            ("sub_op", req.sub_op),
            ("extra", req.extra),
        ];
        for (name, value) in &fields {
            if value.contains('\0') {
                return Err(RequestError::Nul(name));
            }
        }
        let args = fields.map(|(_, v)| if v.is_empty() { "-".to_owned() } else { v });
        Ok(HookCall {
            driver,
            args,
            input: req.input,
            timeout,
        })
    }

    /// The operation (`argv[2]`).
    pub fn op(&self) -> &str {
        &self.args[1]
    }

    /// Whether stdout is a filter result chained through the scripts: qemu
    /// `migrate` and `restore`, libxl `migrate`.
    pub fn is_filter(&self) -> bool {
        matches!(
            (self.driver, self.op()),
            (Driver::Qemu, "migrate" | "restore") | (Driver::Libxl, "migrate")
        )
    }

    /// Whether libvirt re-discovers the hooks before this call: the daemon
    /// hook's `reload` and `shutdown`.
    pub fn rediscovers(&self) -> bool {
        self.driver == Driver::Daemon && matches!(self.op(), "reload" | "shutdown")
    }
}

fn check_timeout(t: prost_types::Duration, max: Duration) -> Result<Duration, RequestError> {
    let bad = |why: String| RequestError::Timeout(why);
    if t.seconds < 0 || t.nanos < 0 || t.nanos >= 1_000_000_000 {
        return Err(bad(format!(
            "{}s {}ns is not a valid positive duration",
            t.seconds, t.nanos
        )));
    }
    let d = Duration::new(t.seconds.unsigned_abs(), t.nanos.unsigned_abs());
    if d.is_zero() {
        return Err(bad("must be more than 0".into()));
    }
    if d > max {
        return Err(bad(format!(
            "{d:?} is more than the maximum of {max:?} (max_timeout_secs)"
        )));
    }
    Ok(d)
}

/// Bytes of stdout kept per script for a non-filter operation (its end):
/// libvirt discards that output, so it is only a diagnostic tail.
pub const STDOUT_TAIL_BYTES: usize = 4 << 10;

/// What a whole call gave.
#[derive(Debug, Clone)]
pub struct HookRun {
    /// Every script run, in order.
    pub scripts: Vec<ScriptRun>,
    /// libvirt's message for the last failing script; `None` if none failed.
    pub error: Option<String>,
    /// The chained filter output (empty: keep the input).
    pub output: Vec<u8>,
    /// The executor began shutting down: the running script was killed and
    /// the rest were not started.
    pub interrupted: bool,
    /// The call's deadline came: the running script was killed (or none
    /// was left to start) and the rest were not started.
    pub deadline_exceeded: bool,
}

/// Settings every call shares.
#[derive(Debug, Clone)]
pub struct RunSettings {
    /// The hook environment ([`exec::hook_env`]).
    pub env: Vec<(String, OsString)>,
    /// Bytes kept per stream per script.
    pub max_output: usize,
}

/// Runs `scripts` (already discovered, in order) for `call`. With a
/// `deadline`, each script's timeout is cut to what is left of it; a script
/// killed by it, or the deadline passing between scripts, ends the run with
/// `deadline_exceeded` and the remaining scripts not started.
pub async fn run_hooks(
    call: &HookCall,
    scripts: &[impl AsRef<Path>],
    settings: &RunSettings,
    shutdown: &CancellationToken,
    deadline: Option<tokio::time::Instant>,
) -> HookRun {
    let filter = call.is_filter();
    let mut runs = Vec::with_capacity(scripts.len());
    let mut error = None;
    let mut failed = false;
    // The chained document: the last successful non-blank stdout.
    let mut chained: Vec<u8> = Vec::new();
    let mut interrupted = false;
    let mut deadline_exceeded = false;
    for path in scripts {
        if shutdown.is_cancelled() {
            interrupted = true;
            break;
        }
        // The per-script timeout, or what is left of the call's deadline.
        let (timeout, by_deadline) = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    deadline_exceeded = true;
                    break;
                }
                (left.min(call.timeout), left < call.timeout)
            }
            None => (call.timeout, false),
        };
        let path = path.as_ref();
        // After a failure, later scripts get the original document again.
        let input = if filter && !failed && !chained.is_empty() {
            &chained
        } else {
            &call.input
        };
        tracing::debug!(script = %path.display(), args = ?call.args, "calling hook");
        let inv = Invocation {
            path,
            args: &call.args,
            env: &settings.env,
            input,
            timeout,
            max_output: settings.max_output,
            stdout_tail: if filter {
                None
            } else {
                Some(STDOUT_TAIL_BYTES.min(settings.max_output))
            },
        };
        let run = exec::run_script(&inv, shutdown).await;
        interrupted |= run.cancelled;
        if run.timed_out && by_deadline {
            tracing::warn!(script = %path.display(), "call deadline reached: script killed, no more scripts started");
            deadline_exceeded = true;
            runs.push(run);
            break;
        }
        // A cut filter result is not a document: that script fails.
        let cut_filter = filter && run.stdout.truncated;
        if run.success() && !cut_filter {
            if filter && !is_blank(&run.stdout.bytes) {
                chained = run.stdout.bytes.clone();
            }
        } else {
            failed = true;
            let message =
                failure_message(&settings.env, &call.args, &run, call.timeout, cut_filter);
            tracing::warn!(script = %path.display(), error = %message, "hook script failed");
            error = Some(message);
        }
        runs.push(run);
    }
    HookRun {
        scripts: runs,
        error,
        output: if filter { chained } else { Vec::new() },
        interrupted,
        deadline_exceeded,
    }
}

/// Whether the script succeeded as far as the caller is concerned (a cut
/// filter result counts as a failure).
pub fn script_succeeded(call: &HookCall, run: &ScriptRun) -> bool {
    run.success() && !(call.is_filter() && run.stdout.truncated)
}

/// libvirt's "blank": empty or only C-locale whitespace.
pub fn is_blank(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .all(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c))
}

/// libvirt's error text: `Hook script execution failed: internal error:
/// Child process (ENV SCRIPT ARGS) unexpected exit status N: STDERR`
/// (`fatal signal N` for a signal; no `: STDERR` when stderr is empty).
pub fn failure_message(
    env: &[(String, OsString)],
    args: &[String; 4],
    run: &ScriptRun,
    timeout: Duration,
    cut_filter: bool,
) -> String {
    let mut command = String::new();
    for (k, v) in env {
        command.push_str(k);
        command.push('=');
        command.push_str(&shell_quote(&v.to_string_lossy()));
        command.push(' ');
    }
    command.push_str(&shell_quote(&run.path.to_string_lossy()));
    for a in args {
        command.push(' ');
        command.push_str(&shell_quote(a));
    }
    let what = if run.cancelled {
        "was killed because the hook executor is shutting down".to_owned()
    } else if run.timed_out {
        format!("timed out after {timeout:?} and its process group was killed")
    } else if cut_filter {
        "printed more output than the capture cap; a cut document cannot be used".to_owned()
    } else {
        match run.termination {
            Termination::Exited(n) => format!("unexpected exit status {n}"),
            Termination::Signaled(n) => format!("unexpected fatal signal {n}"),
            Termination::Unknown => "could not be waited for".to_owned(),
        }
    };
    let mut msg =
        format!("Hook script execution failed: internal error: Child process ({command}) {what}");
    if !run.stderr.bytes.is_empty() {
        msg.push_str(": ");
        msg.push_str(&String::from_utf8_lossy(&run.stderr.bytes));
    }
    msg
}

/// The bytes for which libvirt's `virBufferEscapeShell` quotes a word
/// (its `strpbrk` set); any other byte, non-ASCII included, stays bare.
const SHELL_METACHARACTERS: &[u8] = b"\r\t\n !\"#$&'()*;<>?[\\]^`{|}~";

/// Quotes `s` for a shell exactly as libvirt's command strings do
/// (`virBufferEscapeShell`): an empty word is `''`; a word with none of
/// [`SHELL_METACHARACTERS`] stays as it is (`café` stays `café`); any
/// other is put in `'...'` with `'` written `'\''`.
pub fn shell_quote(s: &str) -> String {
    if s.is_empty() {
        return "''".to_owned();
    }
    if !s.bytes().any(|b| SHELL_METACHARACTERS.contains(&b)) {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    use super::*;
    use crate::exec::Capture;

    fn req(driver: HookDriver, op: &str) -> RunHookRequest {
        RunHookRequest {
            driver: driver as i32,
            op: op.into(),
            ..Default::default()
        }
    }

    fn check(r: RunHookRequest) -> Result<HookCall, RequestError> {
        HookCall::from_request(r, Duration::from_secs(60), Duration::from_secs(3600))
    }

    #[test]
    fn test_empty_fields_become_dashes() {
        let call = check(req(HookDriver::Daemon, "start")).unwrap();
        assert_eq!(call.args, ["-", "start", "-", "-"]);
        assert_eq!(call.timeout, Duration::from_secs(60));
    }

    #[test]
    fn test_bad_requests_name_the_field() {
        let mut nul = req(HookDriver::Qemu, "start");
        nul.extra = "a\0b".into();
        let mut long = req(HookDriver::Qemu, "start");
        long.timeout = Some(prost_types::Duration {
            seconds: 3601,
            nanos: 0,
        });
        let mut zero = req(HookDriver::Qemu, "start");
        zero.timeout = Some(prost_types::Duration::default());
        let mut neg = req(HookDriver::Qemu, "start");
        neg.timeout = Some(prost_types::Duration {
            seconds: -1,
            nanos: 0,
        });
        let mut unknown = req(HookDriver::Qemu, "start");
        unknown.driver = 42;
        let cases = [
            (req(HookDriver::Unspecified, "start"), "driver: required"),
            (unknown, "driver: unknown value 42"),
            (req(HookDriver::Qemu, ""), "op: required"),
            (nul, "extra: must not contain a NUL byte"),
            (long, "timeout: 3601s is more than"),
            (zero, "timeout: must be more than 0"),
            (neg, "timeout: -1s 0ns is not"),
        ];
        for (r, want) in cases {
            let err = check(r).unwrap_err().to_string();
            assert!(err.starts_with(want), "{err} vs {want}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]

        /// Whatever the four argv strings hold (spaces, quotes, `$(...)`,
        /// newlines, any Unicode), the script gets them as four arguments,
        /// byte for byte, empty ones as `-`: never through a shell.
        #[test]
        fn test_any_argv_reaches_the_script_unchanged(
            fields in proptest::array::uniform4("[^\\x00]{0,24}")
        ) {
            let dir = tempfile::tempdir().unwrap();
            let script = dir.path().join("hook");
            std::fs::write(
                &script,
                format!(
                    "#!/bin/sh\nprintf '%s' \"$#\" > '{0}/argc'\ni=0\n\
                     for a; do i=$((i+1)); printf '%s' \"$a\" > \"{0}/$i\"; done\n",
                    dir.path().display()
                ),
            )
            .unwrap();
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
            let [object, op, sub_op, extra] = fields.clone();
            let req = RunHookRequest {
                driver: HookDriver::Qemu as i32,
                object,
                op: if op.is_empty() { "x".into() } else { op },
                sub_op,
                extra,
                ..Default::default()
            };
            let call = check(req).unwrap();
            let settings = RunSettings { env: crate::exec::hook_env(|_| None), max_output: 1024 };
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let run = rt.block_on(run_hooks(&call, &[&script], &settings, &CancellationToken::new(), None));
            proptest::prop_assert!(run.error.is_none(), "{:?}", run.error);
            proptest::prop_assert_eq!(std::fs::read_to_string(dir.path().join("argc")).unwrap(), "4");
            for (i, want) in call.args.iter().enumerate() {
                let got = std::fs::read(dir.path().join((i + 1).to_string())).unwrap();
                proptest::prop_assert_eq!(&got, want.as_bytes());
            }
            for (field, arg) in fields.iter().zip(&call.args) {
                if !field.is_empty() {
                    proptest::prop_assert_eq!(field, arg);
                }
            }
        }
    }

    #[test]
    fn test_filter_ops() {
        let f = |d, op| check(req(d, op)).unwrap().is_filter();
        assert!(f(HookDriver::Qemu, "migrate"));
        assert!(f(HookDriver::Qemu, "restore"));
        assert!(f(HookDriver::Libxl, "migrate"));
        assert!(!f(HookDriver::Libxl, "restore"));
        assert!(!f(HookDriver::Qemu, "prepare"));
        assert!(!f(HookDriver::Lxc, "migrate"));
    }

    #[test]
    fn test_blank_is_c_whitespace_only() {
        assert!(is_blank(b""));
        assert!(is_blank(b"  \n\n\t\r\x0b\x0c"));
        assert!(!is_blank(b" x "));
    }

    #[test]
    fn test_message_has_libvirts_shape() {
        let env = vec![
            ("LC_ALL".to_owned(), OsString::from("C")),
            ("PATH".to_owned(), OsString::from("/bin:/usr/bin")),
        ];
        let args = ["vm1", "release", "end", "from snapshot"].map(String::from);
        let mut run = ScriptRun {
            path: PathBuf::from("/h/qemu"),
            termination: Termination::Exited(3),
            stdout: Capture::default(),
            stderr: Capture {
                bytes: b"refused\n".to_vec(),
                truncated: false,
            },
            duration: Duration::ZERO,
            timed_out: false,
            cancelled: false,
        };
        let t = Duration::from_secs(5);
        assert_eq!(
            failure_message(&env, &args, &run, t, false),
            "Hook script execution failed: internal error: Child process (LC_ALL=C \
             PATH=/bin:/usr/bin /h/qemu vm1 release end 'from snapshot') unexpected exit \
             status 3: refused\n"
        );
        run.stderr.bytes.clear();
        run.termination = Termination::Signaled(15);
        assert!(
            failure_message(&env, &args, &run, t, false).ends_with(") unexpected fatal signal 15")
        );
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    /// libvirt quotes a word only when it holds one of its metacharacters;
    /// everything else, non-ASCII and `%+=:,./-_@` included, stays bare.
    #[test]
    fn test_shell_quote_as_vir_buffer_escape_shell() {
        let table = [
            ("café", "café"),
            ("/h/qemu.d/10-a", "/h/qemu.d/10-a"),
            ("a%b+c=d:e,f.g/h-i_j@k", "a%b+c=d:e,f.g/h-i_j@k"),
            ("x~y", "'x~y'"),
            ("from snapshot", "'from snapshot'"),
            ("a\tb", "'a\tb'"),
            ("$(id)", "'$(id)'"),
            ("[x]", "'[x]'"),
            (r"a\b", r"'a\b'"),
            ("q?", "'q?'"),
            ("it's", r"'it'\''s'"),
            ("", "''"),
        ];
        for (word, quoted) in table {
            assert_eq!(shell_quote(word), quoted, "{word:?}");
        }
        // Each printable ASCII byte is bare exactly when libvirt leaves it.
        for b in 0x21u8..0x7f {
            let word = char::from(b).to_string();
            let bare = !b"!\"#$&'()*;<>?[\\]^`{|}~".contains(&b);
            assert_eq!(shell_quote(&word) == word, bare, "{word:?}");
        }
    }
}
