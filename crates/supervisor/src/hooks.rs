//! The [`Hooks`] that asks the hook executor (`qvirt.v1.HookExecutor/RunHook`)
//! to run libvirt-style hook scripts, configured by `hookexec`.
//!
//! Each domain hook is one RunHook call: driver `qemu`, object the domain
//! name, op and sub-op as libvirt (`prepare begin`, `start begin`, `started
//! begin`, `stopped end`, `release end`, `reconnect begin`), extra `-` (the
//! shut-off reason for `release`, as libvirt 10.5 and later pass it), and
//! on stdin the domain definition: as YAML (our definition format, the one
//! `qvirtctl define` reads) by default, or, with `hook_stdin_format:
//! libvirt-xml`, as libvirt-style domain XML generated from it
//! ([`crate::hook_xml`]), where libvirt sends its domain XML. The daemon
//! hook gets `- start - start` when the supervisor starts and `- shutdown -
//! shutdown` when it stops, with nothing on stdin; its failures are logged.
//!
//! A hook that ran and failed is [`HookError::Failed`] with the executor's
//! libvirt-style message (it quotes the failing script's stderr). An
//! executor that cannot be reached, answers with a gRPC error, or does not
//! answer within `hook_call_timeout_secs` is [`HookError::Unavailable`]:
//! nothing is known to have run.
//!
//! The call carries `hook_call_timeout_secs` as its gRPC deadline: the
//! executor kills any script still running shortly before it and answers
//! DEADLINE_EXCEEDED; we wait [`ANSWER_GRACE`] longer for that answer, so
//! the stop path's hooks never start while a script of the call still runs.
//! Answers may be up to [`MAX_ANSWER_BYTES`] (the executor keeps them near
//! 3 MiB). What the supervisor does with each is
//! decided by the caller (see `crate::domain`): a begin-type hook of a
//! start that cannot be run refuses the start, so no guest starts behind
//! an operator's policy.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use qvirt_common::internal_auth::TokenInterceptor;
use qvirt_proto::v1::hook_executor_client::HookExecutorClient;
use qvirt_proto::v1::{DomainSpec, HookDriver, HookOutcome, RunHookRequest, RunHookResponse};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, warn};

use crate::config::HookStdinFormat;
use crate::seams::{DaemonHookOp, FilterFuture, HookError, HookFuture, HookOp, Hooks};

/// How long connecting to the hook executor may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How much longer than the call's deadline we wait for the executor's
/// answer (it kills what still runs just before the deadline).
const ANSWER_GRACE: Duration = Duration::from_secs(2);
/// Largest RunHook answer accepted: above the executor's bound of about
/// 3 MiB (and tonic's 4 MiB default), with room to spare.
pub const MAX_ANSWER_BYTES: usize = 8 << 20;

/// Runs hooks through the hook executor; see the module docs.
#[derive(Debug, Clone)]
pub struct ExecutorHooks {
    client: HookExecutorClient<InterceptedService<Channel, TokenInterceptor>>,
    /// Read at the start of each call; replaced by a SIGHUP reload.
    settings: Arc<Mutex<Settings>>,
}

/// What a SIGHUP may change while hooks run.
#[derive(Debug, Clone, Copy)]
struct Settings {
    call_timeout: Duration,
    stdin_format: HookStdinFormat,
}

impl ExecutorHooks {
    /// A client of the executor at `endpoint`, presenting the internal
    /// token through `token`. It connects on first use (and again after a
    /// failure), so the executor may start later.
    pub fn new(endpoint: Endpoint, call_timeout: Duration, token: TokenInterceptor) -> Self {
        let channel = endpoint.connect_timeout(CONNECT_TIMEOUT).connect_lazy();
        ExecutorHooks {
            client: HookExecutorClient::with_interceptor(channel, token)
                .max_decoding_message_size(MAX_ANSWER_BYTES),
            settings: Arc::new(Mutex::new(Settings {
                call_timeout,
                stdin_format: HookStdinFormat::Yaml,
            })),
        }
    }

    /// Send domain hooks' scripts the definition in `format` (default
    /// YAML).
    pub fn with_stdin_format(self, format: HookStdinFormat) -> Self {
        self.lock().stdin_format = format;
        self
    }

    /// Applies a reloaded `hook_call_timeout_secs` and `hook_stdin_format`
    /// to the calls that start from now on.
    pub fn reconfigure(&self, call_timeout: Duration, stdin_format: HookStdinFormat) {
        *self.lock() = Settings {
            call_timeout,
            stdin_format,
        };
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Settings> {
        // Only Copy values are written under it: a poisoned lock still
        // holds a whole value.
        self.settings.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What a domain hook's scripts read on stdin.
    fn input(&self, spec: &DomainSpec) -> Result<String, String> {
        let format = self.lock().stdin_format;
        match format {
            HookStdinFormat::Yaml => spec
                .to_yaml()
                .map_err(|error| format!("cannot encode the definition as YAML: {error}")),
            HookStdinFormat::LibvirtXml => crate::hook_xml::to_xml(spec)
                .map_err(|error| format!("cannot encode the definition as XML: {error}")),
        }
    }

    async fn call(&self, request: RunHookRequest) -> Result<RunHookResponse, String> {
        let mut client = self.client.clone();
        let call_timeout = self.lock().call_timeout;
        let mut request = tonic::Request::new(request);
        request.set_timeout(call_timeout);
        let wait = call_timeout + ANSWER_GRACE;
        match tokio::time::timeout(wait, client.run_hook(request)).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
            Err(_) => Err(format!("no answer within {wait:?}")),
        }
    }

    async fn run_domain_hook(&self, spec: &DomainSpec, op: HookOp) -> Result<(), HookError> {
        self.call_domain_hook(spec, op).await.map(drop)
    }

    /// Run hook `op` for `spec`; the executor's answer when it succeeded.
    async fn call_domain_hook(
        &self,
        spec: &DomainSpec,
        op: HookOp,
    ) -> Result<RunHookResponse, HookError> {
        let input = self
            .input(spec)
            .map_err(|message| HookError::Unavailable { op, message })?;
        let request = RunHookRequest {
            driver: HookDriver::Qemu as i32,
            object: spec.name.clone(),
            op: op.op().to_owned(),
            sub_op: op.sub_op().to_owned(),
            extra: op.extra().to_owned(),
            input: input.into_bytes(),
            timeout: None,
        };
        let began = Instant::now();
        let response = self
            .call(request)
            .await
            .map_err(|message| HookError::Unavailable { op, message })?;
        debug!(
            domain = %spec.name,
            hook = %op,
            outcome = response.outcome,
            scripts = response.results.len(),
            took_us = began.elapsed().as_micros(),
            "hook ran"
        );
        outcome(op, &response)?;
        Ok(response)
    }

    /// Run the filter hook `op`: the definition its scripts printed, or
    /// `None` when they printed nothing but blanks.
    async fn run_filter(
        &self,
        spec: &DomainSpec,
        op: HookOp,
    ) -> Result<Option<DomainSpec>, HookError> {
        let response = self.call_domain_hook(spec, op).await?;
        if response.output.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        let format = self.lock().stdin_format;
        filter_output(format, spec, &response.output)
            .map(Some)
            .map_err(|message| HookError::BadOutput { op, message })
    }
}

/// The definition a filter hook's scripts printed (`restore begin`), read
/// in the format their stdin had: the one place the output of a filter is
/// parsed. Libvirt XML cannot carry every field of a definition; those are
/// taken from `base`, the definition the hook was given. Only parsed here;
/// the caller checks it as any definition and against the one it replaces.
pub fn filter_output(
    format: HookStdinFormat,
    base: &DomainSpec,
    output: &[u8],
) -> Result<DomainSpec, String> {
    let text = std::str::from_utf8(output)
        .map_err(|error| format!("the output is not UTF-8 ({error})"))?;
    match format {
        HookStdinFormat::Yaml => {
            DomainSpec::from_yaml(text).map_err(|error| qvirt_proto::yaml::error_text(&error))
        }
        HookStdinFormat::LibvirtXml => {
            crate::hook_xml::from_xml_over(base, text).map_err(|error| error.to_string())
        }
    }
}

/// The verdict of a RunHook answer.
fn outcome(op: HookOp, response: &RunHookResponse) -> Result<(), HookError> {
    match HookOutcome::try_from(response.outcome) {
        Ok(HookOutcome::Success | HookOutcome::NoHooks) => Ok(()),
        Ok(HookOutcome::Failed) => Err(HookError::Failed {
            op,
            message: if response.error.is_empty() {
                "a hook script failed".to_owned()
            } else {
                response.error.trim_end().to_owned()
            },
        }),
        Ok(HookOutcome::Unspecified) | Err(_) => Err(HookError::Unavailable {
            op,
            message: format!("the executor answered outcome {}", response.outcome),
        }),
    }
}

impl Hooks for ExecutorHooks {
    fn run<'a>(&'a self, spec: &'a DomainSpec, op: HookOp) -> HookFuture<'a> {
        Box::pin(self.run_domain_hook(spec, op))
    }

    fn filter<'a>(&'a self, spec: &'a DomainSpec, op: HookOp) -> FilterFuture<'a> {
        Box::pin(self.run_filter(spec, op))
    }

    fn daemon(
        &self,
        op: DaemonHookOp,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        let (name, sub_op, extra) = match op {
            DaemonHookOp::Start => ("start", "-", "start"),
            DaemonHookOp::Shutdown => ("shutdown", "-", "shutdown"),
            DaemonHookOp::Reload => ("reload", "begin", "SIGHUP"),
        };
        let request = RunHookRequest {
            driver: HookDriver::Daemon as i32,
            object: "-".to_owned(),
            op: name.to_owned(),
            sub_op: sub_op.to_owned(),
            extra: extra.to_owned(),
            input: Vec::new(),
            timeout: None,
        };
        Box::pin(async move {
            match self.call(request).await {
                Ok(response) if response.outcome == HookOutcome::Failed as i32 => {
                    warn!(hook = name, error = %response.error.trim_end(), "daemon hook failed (ignored)");
                }
                Ok(_) => debug!(hook = name, "daemon hook ran"),
                Err(error) => {
                    warn!(hook = name, %error, "daemon hook not run: hook executor unavailable");
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use qvirt_proto::v1::DomainStateReason;

    use super::*;
    use crate::seams::release_reason;

    fn response(outcome: HookOutcome, error: &str) -> RunHookResponse {
        RunHookResponse {
            outcome: outcome as i32,
            error: error.to_owned(),
            ..RunHookResponse::default()
        }
    }

    #[test]
    fn test_outcomes_table() {
        assert!(outcome(HookOp::Prepare, &response(HookOutcome::Success, "")).is_ok());
        assert!(outcome(HookOp::Prepare, &response(HookOutcome::NoHooks, "")).is_ok());
        match outcome(HookOp::Start, &response(HookOutcome::Failed, "no way\n")) {
            Err(HookError::Failed { op, message }) => {
                assert_eq!(op, HookOp::Start);
                assert_eq!(message, "no way");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            outcome(HookOp::Start, &response(HookOutcome::Unspecified, "")),
            Err(HookError::Unavailable { .. })
        ));
    }

    /// libvirt's `virDomainShutoffReason` names, as its release hook
    /// passes them.
    #[test]
    fn test_release_reasons_are_libvirts() {
        use DomainStateReason as R;
        let words: Vec<&str> = [
            R::ShutoffUnknown,
            R::ShutoffShutdown,
            R::ShutoffDestroyed,
            R::ShutoffCrashed,
            R::ShutoffMigrated,
            R::ShutoffSaved,
            R::ShutoffFailed,
            R::ShutoffFromSnapshot,
            R::ShutoffDaemon,
            R::RunningBooted,
        ]
        .into_iter()
        .map(release_reason)
        .collect();
        assert_eq!(
            words,
            [
                "unknown",
                "shutdown",
                "destroyed",
                "crashed",
                "migrated",
                "saved",
                "failed",
                "from snapshot",
                "daemon",
                "unknown"
            ]
        );
    }

    #[test]
    fn test_hook_argv_words_are_libvirts() {
        let words: Vec<String> = [
            HookOp::Prepare,
            HookOp::Start,
            HookOp::Started,
            HookOp::Stopped,
            HookOp::Release(DomainStateReason::ShutoffDestroyed),
            HookOp::Reconnect,
            HookOp::Restore,
        ]
        .iter()
        .map(|op| format!("{op} {}", op.extra()))
        .collect();
        assert_eq!(
            words,
            [
                "prepare begin -",
                "start begin -",
                "started begin -",
                "stopped end -",
                "release end destroyed",
                "reconnect begin -",
                "restore begin -"
            ]
        );
    }

    #[test]
    fn test_filter_output_reads_the_stdin_format() {
        let base = DomainSpec {
            name: "vm".to_owned(),
            memory_mib: 128,
            vcpus: 1,
            agent: true,
            ..Default::default()
        };
        let yaml = HookStdinFormat::Yaml;
        let spec = filter_output(yaml, &base, b"name: vm\nmemory_mib: 256\n").unwrap();
        assert_eq!((spec.name.as_str(), spec.memory_mib), ("vm", 256));
        let error = filter_output(yaml, &base, b"name: vm\nmemroy_mib: 1\n").unwrap_err();
        assert!(error.contains("memroy_mib"), "{error}");
        let error = filter_output(yaml, &base, b"name: \xff\n").unwrap_err();
        assert!(error.contains("not UTF-8"), "{error}");
        // Libvirt XML, as a script edits what it was given: what XML
        // cannot say (the agent) comes from the definition it was given.
        let xml = crate::hook_xml::to_xml(&base).unwrap();
        let edited = xml.replace("</domain>", "<description>x</description></domain>");
        let xml_format = HookStdinFormat::LibvirtXml;
        let spec = filter_output(xml_format, &base, edited.as_bytes()).unwrap();
        assert_eq!(
            (spec.name.as_str(), spec.memory_mib, spec.agent),
            ("vm", 128, true)
        );
        let error = filter_output(xml_format, &base, b"<domain").unwrap_err();
        assert!(!error.is_empty());
    }

    /// An executor answering with `stderr_bytes` of stderr.
    struct BigAnswers(usize);

    #[tonic::async_trait]
    impl qvirt_proto::v1::hook_executor_server::HookExecutor for BigAnswers {
        async fn run_hook(
            &self,
            _request: tonic::Request<RunHookRequest>,
        ) -> Result<tonic::Response<RunHookResponse>, tonic::Status> {
            Ok(tonic::Response::new(RunHookResponse {
                outcome: HookOutcome::Success as i32,
                results: vec![qvirt_proto::v1::HookScriptResult {
                    stderr: vec![b'e'; self.0],
                    ..Default::default()
                }],
                ..Default::default()
            }))
        }

        async fn list_hooks(
            &self,
            _request: tonic::Request<qvirt_proto::v1::ListHooksRequest>,
        ) -> Result<tonic::Response<qvirt_proto::v1::ListHooksResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("not in this test"))
        }

        async fn reload_hooks(
            &self,
            _request: tonic::Request<qvirt_proto::v1::ReloadHooksRequest>,
        ) -> Result<tonic::Response<qvirt_proto::v1::ReloadHooksResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("not in this test"))
        }
    }

    /// An answer above tonic's 4 MiB decoding default (an older executor,
    /// or one configured with large captures) is still a verdict, not
    /// "executor unavailable".
    #[tokio::test]
    async fn test_answers_above_4_mib_are_accepted() {
        use qvirt_common::config::ListenAddr;
        use qvirt_common::serve::{Listener, Services, serve};
        use qvirt_proto::v1::hook_executor_server::HookExecutorServer;

        let listener = Listener::bind(&ListenAddr::loopback(0))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let stop = tokio_util::sync::CancellationToken::new();
        let services = Services::new().with(HookExecutorServer::new(BigAnswers(5 << 20)));
        let server = tokio::spawn(serve(listener, services, stop.clone()));
        let endpoint = Endpoint::from_shared(format!("http://{addr}")).expect("url");
        let hooks = ExecutorHooks::new(
            endpoint,
            Duration::from_secs(20),
            TokenInterceptor::new(None),
        );
        let spec = DomainSpec {
            name: "vm".into(),
            ..DomainSpec::default()
        };
        let verdict = hooks.run(&spec, HookOp::Prepare).await;
        stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(20), server).await;
        assert!(verdict.is_ok(), "{verdict:?}");
    }

    /// Nothing listens on the port: a domain hook is Unavailable, a daemon
    /// hook only logs.
    #[tokio::test]
    async fn test_unreachable_executor_is_unavailable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let endpoint = Endpoint::from_shared(format!("http://127.0.0.1:{port}")).expect("url");
        let hooks = ExecutorHooks::new(
            endpoint,
            Duration::from_secs(10),
            TokenInterceptor::new(None),
        );
        let spec = DomainSpec {
            name: "vm".into(),
            ..DomainSpec::default()
        };
        match hooks.run(&spec, HookOp::Prepare).await {
            Err(HookError::Unavailable { op, .. }) => assert_eq!(op, HookOp::Prepare),
            other => panic!("{other:?}"),
        }
        hooks.daemon(DaemonHookOp::Start).await;
    }
}
